//! tapmirror's integration tests: one binary, real processes, real peers.
//!
//! Each test starts `tapmirror serve` (or a peer server) in its own temporary folder and kills it
//! on drop. Peers (nbdinfo, nbdcopy, qemu-io, qemu-img, qemu-nbd, nbdkit, fio) are required under
//! CI (`CI` set) and skipped with a message elsewhere when missing.

mod harness;

/// `require!(tools…)`: skips the calling test unless every tool is installed (tapmirror's testkit).
pub(crate) use tapmirror::require;

mod bad_input;
mod blockdev;
mod client;
mod copy;
mod crash;
mod image_cli;
mod migrate;
mod mirror;
mod mirror_targets;
mod peers;
mod process;
mod qcow2;
mod vhd;
