//! tapmirror: the data path of sxm, one process per datapath.
//!
//! It knows disks and blocks, never SRs, VDIs or RPC (see `../shared/DESIGN.md`). Modules:
//!
//! - [`io`]: file I/O on io_uring (registered buffers, fixed files) with a portable fallback
//!   chosen at run time;
//! - [`image`]: the `Image` trait and its drivers (raw today);
//! - [`nbd`]: the NBD wire codec, a server that exports an `Image`, and an async client;
//! - [`copy`]: sparse copy of an image or export into an export or file;
//! - [`mirror`]: live mirroring of guest writes to a remote target;
//! - [`control`]: the control socket (stats, pause, mirror attach by descriptor, drain);
//! - [`process`]: `tapmirror serve` as a detached process that outlives its starter: spawn,
//!   adopt after a restart, stop, reap.

pub mod control;
pub mod copy;
pub mod image;
pub mod io;
pub mod mirror;
pub mod nbd;
pub mod process;
