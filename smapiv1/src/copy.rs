//! The copy step of a migration (`Backend::vdi_copy_into`): a VDI's VHD chain into an NBD
//! connection, in this process, with tapmirror's sparse copy.
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
//!
//! # Where it runs
//!
//! The engine calls from a blocking thread. The copy runs on a current-thread runtime of its
//! own, on a scoped thread ([`crate::datapath::block_on`]): it works whatever the caller's
//! runtime is (or none, in tests), a copy's CPU work (the zero scan of every byte read) never
//! takes the engine's worker threads, and dropping that runtime at the end ends every task
//! the copy started, on success, error and cancellation alike. One thread is plenty: the work
//! is I/O with 16 requests of 1 MiB in flight.
//!
//! # Cancellation and progress
//!
//! The copy future is raced against the caller's token: when it fires, the future is dropped
//! (its requests abandoned, the connection closed) and the call answers `Cancelled` at once,
//! even if the destination has stopped answering. Progress is sampled every
//! [`PROGRESS_EVERY`] from tapmirror's counter of bytes done (copied, zeroed or skipped) and
//! reported as `(done, size)`, and once more at the end.

use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use sxm_engine::backend::{CopyStats, StorageResult};
use sxm_engine::model::StorageError;
use tapmirror::copy::{CopyOptions, CopyReport, Dest, Source};
use tapmirror::image::{Access, AnyImage, Format, vhd};
use tapmirror::io::EngineChoice;
use tapmirror::nbd::{ClientOptions, NbdClient};
use tokio_util::sync::CancellationToken;

use crate::datapath::block_on;
use crate::errors;

/// How often progress is reported.
pub const PROGRESS_EVERY: Duration = Duration::from_millis(200);

/// Bytes done and to do, shared between the copy and its reporter.
#[derive(Default)]
struct Counters {
    done: Arc<AtomicU64>,
    size: AtomicU64,
}

/// Copies the chain at `image` (VDI `vdi`) into `dest`, an NBD connection to `export`; with
/// `base` (the chain of a VDI whose content the destination holds), only what differs.
pub fn copy_into(
    vdi: &str,
    image: &Path,
    base: Option<&Path>,
    dest: OwnedFd,
    export: &str,
    progress: &(dyn Fn(u64, u64) + Sync),
    cancel: &CancellationToken,
) -> StorageResult<CopyStats> {
    let cancelled = || StorageError::Cancelled(vdi.to_owned());
    if cancel.is_cancelled() {
        return Err(cancelled());
    }
    let counters = Counters::default();
    let outcome = block_on(async {
        let work = run(image, base, dest, export, &counters);
        tokio::pin!(work);
        let mut tick = tokio::time::interval(PROGRESS_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = cancel.cancelled() => return None,
                r = &mut work => return Some(r),
                _ = tick.tick() => {
                    let size = counters.size.load(Ordering::Relaxed);
                    if size > 0 {
                        progress(counters.done.load(Ordering::Relaxed).min(size), size);
                    }
                }
            }
        }
    })?;
    match outcome {
        None => {
            tracing::info!(vdi, export, done = counters.done.load(Ordering::Relaxed), "copy cancelled");
            Err(cancelled())
        }
        Some(Err(e)) => {
            tracing::error!(vdi, export, error = %e, "copy failed");
            Err(errors::failure("copy", format!("copy of VDI {vdi} into {export}: {e}")))
        }
        Some(Ok(report)) => {
            progress(report.size, report.size);
            tracing::info!(vdi, export, base = ?base.map(Path::display), ?report, "copied a VDI");
            Ok(CopyStats { size: report.size, data_bytes: report.data_bytes, zero_bytes: report.zeroed_bytes })
        }
    }
}

async fn run(image: &Path, base: Option<&Path>, dest: OwnedFd, export: &str, counters: &Counters) -> Result<CopyReport, String> {
    let engine = EngineChoice::from_env().resolve().map_err(|e| format!("choosing the I/O engine: {e}"))?;
    let chain = AnyImage::open(image, Some(Format::Vhd), Access::ReadOnly, engine)
        .await
        .map_err(|e| format!("opening {}: {e:#}", image.display()))?;
    let source = match base {
        None => Source::Image(Arc::new(chain)),
        Some(b) => {
            let ranges =
                vhd::diff_map(image, b).await.map_err(|e| format!("comparing {} with {}: {e:#}", image.display(), b.display()))?;
            Source::Diff { image: Arc::new(chain), ranges }
        }
    };
    counters.size.store(source.size(), Ordering::Relaxed);
    let client = NbdClient::from_fd(dest, ClientOptions { export: export.to_owned(), ..ClientOptions::default() })
        .await
        .map_err(|e| format!("NBD on the destination socket: {e}"))?;
    let goodbye = client.clone();
    let dest: Dest<AnyImage> = Dest::nbd(vec![client]).map_err(|e| format!("{e:#}"))?;
    let opts = CopyOptions {
        // A new VDI reads as zeroes; a clone of the base holds the base, which the zero runs
        // of what differs must overwrite (see the module documentation).
        target_is_zero: base.is_none(),
        done_counter: Some(Arc::clone(&counters.done)),
        ..CopyOptions::default()
    };
    let names = (image.to_str().unwrap_or("source"), export);
    let report = tapmirror::copy::copy(Arc::new(source), Arc::new(dest), 1, &opts, names).await.map_err(|e| format!("{e:#}"))?;
    // Flushed by the copy; say goodbye so the destination's datapath ends the connection cleanly.
    let _ = goodbye.disconnect().await;
    Ok(report)
}
