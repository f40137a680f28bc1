//! sxm-smapiv1: the `ext` SR, SMAPIv1 style: one VHD file per VDI (dynamic or differencing) in
//! the SR's folder, its metadata persisted atomically, and one `tapmirror serve` per attached
//! VDI. [`ExtBackend`] implements the engine's `Backend` trait; this crate knows nothing of RPC
//! encodings.
//!
//! ```text
//!   ext.rs       ExtBackend: the Backend calls, and the order of each change's steps
//!   meta.rs      the SR's record: the VHD tree, which nodes are VDIs, their vdi_info
//!   recover.rs   SR.attach: temporaries, the files' tree over the record's, orphans
//!   datapath.rs  tapmirror processes: attach, activate, quiesce, adopt after a restart
//!   errors.rs    failures as the storage interface's errors
//! ```

mod datapath;
mod errors;
pub mod ext;
pub mod meta;
pub mod recover;

pub use ext::ExtBackend;
