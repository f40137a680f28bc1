//! tapmirror: the data path of sxm, one process per datapath.
//!
//! It knows disks and blocks, never SRs, VDIs or RPC (see `../shared/DESIGN.md`). Modules:
//!
//! - [`io`]: file I/O on io_uring (registered buffers, fixed files) with a portable fallback
//!   chosen at run time;
//! - [`image`]: the `Image` trait and its drivers (raw, VHD chains, qcow2);
//! - [`nbd`]: the NBD wire codec, a server that exports an `Image`, and an async client;
//! - [`forest`]: the tree of layered images an owner records (walks, checks), and a cache of
//!   parsed record files;
//! - [`copy`]: sparse copy of an image or export into an export or file;
//! - [`mirror`]: live mirroring of guest writes to a remote target;
//! - [`control`]: the control socket (stats, pause, mirror attach by descriptor, drain);
//! - [`process`]: `tapmirror serve` as a detached process that outlives its starter: spawn,
//!   adopt after a restart, stop, reap;
//! - [`datapaths`]: a manager of many such processes, one per image served, each in a folder of
//!   its own: attach, activate, quiesce, mirror, drain, recover after a restart.

pub mod control;
pub mod copy;
pub mod datapaths;
pub mod forest;
pub mod image;
pub mod io;
pub mod mirror;
pub mod nbd;
pub mod process;
#[doc(hidden)]
pub mod testkit;

/// An error and its sources, `: `-separated.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        next = cause.source();
    }
    s
}
