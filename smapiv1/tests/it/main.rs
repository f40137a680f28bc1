//! sxm-smapiv1's integration tests: one binary, real VHD files, real `tapmirror serve`
//! processes, real peers (qemu-img, qemu-io, nbdcopy), each test in its own SR under /tmp.
//! Peers are required under CI (`CI` set) and skipped with a message elsewhere when missing.

mod harness;

/// `require!(tools…)`: skips the calling test unless every tool is installed (tapmirror's testkit).
pub(crate) use tapmirror::require;

mod bad_input;
mod datapath;
mod migrate;
mod recovery;
mod vdi;
