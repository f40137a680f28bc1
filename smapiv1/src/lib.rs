//! sxm-smapiv1: the `ext` SR, SMAPIv1 style: one VHD file per VDI (dynamic or differencing) in
//! the SR's folder, its metadata persisted atomically, and one `tapmirror serve` per attached
//! VDI. [`ExtBackend`] implements the engine's `Backend` trait; this crate knows nothing of RPC
//! encodings.
//!
//! ```text
//!   ext.rs       ExtBackend: the Backend calls, and the order of each change's steps
//!   meta.rs      the SR's record: the VHD tree, which nodes are VDIs, their vdi_info
//!   recover.rs   SR.attach: temporaries, destroys cut short, the files' tree over the
//!                record's, orphans
//!   datapath.rs  the adapter to tapmirror::datapaths, the process manager both SR types
//!                share (attach, activate, quiesce, adopt after a restart; a migration's
//!                data path on them: serve NBD, mirror, drain)
//!   copy.rs      a migration's copy: a VDI's chain (or its difference from a base) over NBD
//!   errors.rs    failures as the storage interface's errors
//! ```
//!
//! # On disk
//!
//! ```text
//!   <SrContext.dir>/
//!     .sxm-ext.json        the SR's record (meta.rs), replaced atomically on every change
//!     <uuid>.vhd           one per node of the VHD tree: each VDI (always a leaf) and each
//!                          hidden parent; the VDI's id is its file's name
//!     .sxm-reserve         1 MiB kept aside so the record can be rewritten on a full file
//!                          system (engine::state::ensure_reserve)
//!     .<uuid>.vhd.destroyed  only after a crash: a destroy that emptied the file to make
//!                          room before its record was written; attach finishes it
//!   <SrContext.run_dir>/
//!     <8 hex>/             one per attached VDI (datapath.rs)
//!       owner.json         which VDI, read-write or not
//!       nbd.sock           the export (named after the VDI), for the guest
//!       control.sock       tapmirror's control socket
//!       serve.pid, serve.log
//! ```
//!
//! # The SMAPIv1 model
//!
//! A snapshot or clone moves the VDI's data into a new hidden base; the VDI and the new VDI are
//! both empty leaves on it. Destroying a VDI deletes its file and every hidden parent nothing
//! else reads through; a hidden parent left with one child, a VDI, is then coalesced into it
//! (SM's leaf-coalesce, for VDIs holding up to 64 MiB). Compose re-parents the child onto the parent, which becomes hidden (as
//! SM hides it and xapi unmanages it); the child's old parents go when no VDI needs them.
//! `SR.scan` lists the visible VDIs only.

mod copy;
mod datapath;
mod errors;
pub mod ext;
pub mod meta;
pub mod recover;

pub use datapath::{DRAIN_TIMEOUT, OWNER_FILE};
pub use ext::ExtBackend;
