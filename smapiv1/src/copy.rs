//! The copy step of a migration (`Backend::vdi_copy_into`): a VDI's VHD chain into an NBD
//! connection, in this process, with tapmirror's [`into_connection`] (its own runtime on a
//! scoped thread, raced against the cancel token, progress sampled every [`PROGRESS_EVERY`]).
//!
//! # What travels
//!
//! | base | source | target holds before | non-data | zero runs in data |
//! | --- | --- | --- | --- | --- |
//! | none | every allocated extent of the chain | zeroes (a new VDI) | skipped | skipped |
//! | `base` | only sectors allocated in a layer that one of the two chains has and the other lacks (`vhd::diff_map`) | `base`'s content (a clone of it) | skipped: equal to `base` | written as zeroes: `base` may hold data there |
//!
//! The second row is why "target is zero" is off with a base: a sector the VDI holds as zeroes
//! where the base holds data must be zeroed on the target, not skipped.

use std::os::fd::OwnedFd;
use std::path::Path;
use std::time::Duration;

use sxm_engine::backend::{CopyControl, CopyStats, StorageResult};
use tapmirror::copy::{Chain, into_connection};
use tapmirror::image::Format;

use crate::errors;

/// How often progress is reported.
pub const PROGRESS_EVERY: Duration = Duration::from_millis(200);

/// Copies the chain at `image` (VDI `vdi`) into `dest`, an NBD connection to `export`; with
/// `base` (the chain of a VDI whose content the destination holds), only what differs.
pub fn copy_into(
    vdi: &str,
    image: &Path,
    base: Option<&Path>,
    dest: OwnedFd,
    export: &str,
    ctl: &CopyControl<'_>,
) -> StorageResult<CopyStats> {
    // A new VDI reads as zeroes; a clone of the base holds the base, which the zero runs of
    // what differs must overwrite (see the module documentation).
    let chain = Chain { image, format: Format::Vhd, diff_base: base, target_is_zero: base.is_none(), throttle: ctl.throttle.as_ref() };
    let report = into_connection(&chain, dest, export, PROGRESS_EVERY, ctl.progress, ctl.cancel);
    errors::copied(vdi, export, report).inspect(|stats| tracing::info!(vdi, export, base = ?base.map(Path::display), ?stats, "copied a VDI"))
}
