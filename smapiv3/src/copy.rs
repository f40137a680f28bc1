//! The copy step of a migration (`Backend::vdi_copy_into`): a VDI's qcow2 chain into an NBD
//! connection, in this process, with tapmirror's [`into_connection`] (its own runtime on a
//! scoped thread, raced against the cancel token, progress sampled every [`PROGRESS_EVERY`]).
//!
//! With a `base`, the destination holds the base's content: only what the layers above the
//! layers the two chains share decide travels (`tapmirror::image::qcow2::diff_map`), zero
//! clusters among them written as zeroes since the base may hold data there.

use std::os::fd::OwnedFd;
use std::path::Path;
use std::time::Duration;

use sxm_engine::backend::{CopyControl, CopyStats, StorageResult};
use tapmirror::copy::{Chain, into_connection};
use tapmirror::image::Format;

use crate::errors;

/// How often progress is reported.
pub const PROGRESS_EVERY: Duration = Duration::from_millis(200);

/// Copies the chain at `image` (VDI `vdi`) into `dest`, an NBD connection to `export`.
pub fn copy_into(
    vdi: &str,
    image: &Path,
    base: Option<&Path>,
    dest: OwnedFd,
    export: &str,
    ctl: &CopyControl<'_>,
) -> StorageResult<CopyStats> {
    let chain = Chain { image, format: Format::Qcow2, diff_base: base, target_is_zero: base.is_none(), throttle: ctl.throttle.as_ref() };
    let report = into_connection(&chain, dest, export, PROGRESS_EVERY, ctl.progress, ctl.cancel);
    errors::copied(vdi, export, report).inspect(|stats| tracing::info!(vdi, export, base = ?base, ?stats, "copied a VDI"))
}
