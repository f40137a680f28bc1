//! sxm-smapiv3's integration tests: real qcow2 volumes, real `tapmirror serve` processes, real
//! peers (qemu-img, qemu-io), each test in its own SR under /tmp. Peers are required under CI
//! (`CI` set) and skipped with a message elsewhere when missing.

mod harness;

/// `require!(tools…)`: skips the calling test unless every tool is installed (tapmirror's testkit).
pub(crate) use tapmirror::require;

mod datapath;
mod vdi;
