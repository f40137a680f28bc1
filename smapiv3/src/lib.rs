//! sxm-smapiv3: the `qcow2` SR, SMAPIv3 style: one qcow2 volume per VDI in the SR's folder
//! (tapmirror's qcow2 driver), its metadata persisted atomically, and one `tapmirror serve`
//! per attached VDI. [`Qcow2Backend`] implements the engine's `Backend` trait.
//!
//! ```text
//!   qcow2.rs     Qcow2Backend: the Backend calls, and the order of each change's steps
//!   meta.rs      the SR's record: the volume tree, which volumes are VDIs, their vdi_info
//!   recover.rs   SR.attach: temporaries, destroys cut short, the files' backing links over
//!                the record's, orphans
//!   datapath.rs  the adapter to tapmirror::datapaths (the process manager both SR types share)
//!   copy.rs      a migration's copy: a VDI's qcow2 chain (or its difference from a base) over NBD
//!   errors.rs    failures as the storage interface's errors
//! ```
//!
//! # On disk
//!
//! ```text
//!   <SrContext.dir>/
//!     .sxm-qcow2.json      the SR's record (meta.rs), replaced atomically on every change
//!     <uuid>.qcow2         one per volume: each VDI and each hidden base; a VDI's id is its
//!                          file's name; backing links name files of the same folder
//!     .sxm-reserve         1 MiB kept aside so the record can be rewritten on a full file
//!                          system (engine::state::ensure_reserve)
//!     .<uuid>.qcow2.destroyed  only after a crash: a destroy that emptied the volume to make
//!                          room before its record was written; attach finishes it
//!   <SrContext.run_dir>/<8 hex>/   one per attached VDI (datapath.rs)
//! ```
//!
//! # The SMAPIv3 model
//!
//! A snapshot *is* the volume the VDI had: the VDI's file is hard-linked under the snapshot's
//! id, and a new empty overlay backed by it is renamed over the VDI's name (while the VDI's
//! datapath is paused). The snapshot is read-only, so what the VDI reads through it never
//! changes. A clone of a read-only VDI is an overlay on it; a clone of a writable VDI first
//! freezes the VDI's volume as a hidden base (as a snapshot does, but not listed) and puts
//! both the VDI and the clone on it as overlays. Destroying a VDI others read through hides it
//! instead; hidden bases nothing reads through any more are deleted, and one left with a
//! single child, a VDI, is coalesced into it (`qcow2::commit`, for VDIs holding up to 64 MiB,
//! SM's leaf-coalesce). Compose rebases the
//! child onto the parent (a header rewrite, like `qemu-img rebase -u`), which becomes hidden.

//! # Status
//!
//! Tested here (tests/it): the VDI calls, records, recovery at `SR.attach`, datapaths (attach,
//! activate, live snapshot, re-adoption after a restart). The migration primitives (serve NBD,
//! mirror attach sync and full, status, detach, drain, `copy_into`, the undo) are tested
//! through whole migrations between two hosts, in every pairing with `ext`, in the workspace's
//! `tests/host/migrate.rs`.

mod copy;
mod datapath;
mod errors;
pub mod meta;
pub mod qcow2;
pub mod recover;

pub use datapath::{DRAIN_TIMEOUT, OWNER_FILE};
pub use qcow2::Qcow2Backend;
