//! The copy step of a migration (`Backend::vdi_copy_into`): a VDI's qcow2 chain into an NBD
//! connection, in this process, with tapmirror's sparse copy; the same shape as the `ext`
//! SR's copy (own runtime on a scoped thread, raced against the cancel token, progress sampled
//! every [`PROGRESS_EVERY`]).
//!
//! With a `base`, the destination holds the base's content: there is no qcow2 difference map
//! in tapmirror yet, so the whole chain's allocation is sent, and everything the chain does
//! not hold as data is written as zeroes (`target_is_zero` off), which is correct whatever
//! the base holds, just not minimal.

use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use sxm_engine::backend::{CopyStats, StorageResult};
use sxm_engine::model::StorageError;
use tapmirror::copy::{CopyOptions, CopyReport, Dest, Source};
use tapmirror::image::{Access, AnyImage, Format};
use tapmirror::io::EngineChoice;
use tapmirror::nbd::{ClientOptions, NbdClient};
use tokio_util::sync::CancellationToken;

use crate::datapath::block_on;
use crate::errors;

/// How often progress is reported.
pub const PROGRESS_EVERY: Duration = Duration::from_millis(200);

/// Copies the chain at `image` (VDI `vdi`) into `dest`, an NBD connection to `export`.
pub fn copy_into(
    vdi: &str,
    image: &Path,
    has_base: bool,
    dest: OwnedFd,
    export: &str,
    progress: &(dyn Fn(u64, u64) + Sync),
    cancel: &CancellationToken,
) -> StorageResult<CopyStats> {
    let cancelled = || StorageError::Cancelled(vdi.to_owned());
    if cancel.is_cancelled() {
        return Err(cancelled());
    }
    let done = Arc::new(AtomicU64::new(0));
    let size = AtomicU64::new(0);
    let outcome = block_on(async {
        let work = run(image, has_base, dest, export, &done, &size);
        tokio::pin!(work);
        let mut tick = tokio::time::interval(PROGRESS_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = cancel.cancelled() => return None,
                r = &mut work => return Some(r),
                _ = tick.tick() => {
                    let size = size.load(Ordering::Relaxed);
                    if size > 0 {
                        progress(done.load(Ordering::Relaxed).min(size), size);
                    }
                }
            }
        }
    })?;
    match outcome {
        None => {
            tracing::info!(vdi, export, "copy cancelled");
            Err(cancelled())
        }
        Some(Err(e)) => {
            tracing::error!(vdi, export, error = %e, "copy failed");
            Err(errors::failure("copy", format!("copy of VDI {vdi} into {export}: {e}")))
        }
        Some(Ok(report)) => {
            progress(report.size, report.size);
            tracing::info!(vdi, export, has_base, ?report, "copied a VDI");
            Ok(CopyStats { size: report.size, data_bytes: report.data_bytes, zero_bytes: report.zeroed_bytes })
        }
    }
}

async fn run(image: &Path, has_base: bool, dest: OwnedFd, export: &str, done: &Arc<AtomicU64>, size: &AtomicU64) -> Result<CopyReport, String> {
    let engine = EngineChoice::from_env().resolve().map_err(|e| format!("choosing the I/O engine: {e}"))?;
    let chain = AnyImage::open(image, Some(Format::Qcow2), Access::ReadOnly, engine)
        .await
        .map_err(|e| format!("opening {}: {e:#}", image.display()))?;
    let source = Source::Image(Arc::new(chain));
    size.store(source.size(), Ordering::Relaxed);
    let client = NbdClient::from_fd(dest, ClientOptions { export: export.to_owned(), ..ClientOptions::default() })
        .await
        .map_err(|e| format!("NBD on the destination socket: {e}"))?;
    let goodbye = client.clone();
    let dest: Dest<AnyImage> = Dest::nbd(vec![client]).map_err(|e| format!("{e:#}"))?;
    let opts = CopyOptions { target_is_zero: !has_base, done_counter: Some(Arc::clone(done)), ..CopyOptions::default() };
    let names = (image.to_str().unwrap_or("source"), export);
    let report = tapmirror::copy::copy(Arc::new(source), Arc::new(dest), 1, &opts, names).await.map_err(|e| format!("{e:#}"))?;
    let _ = goodbye.disconnect().await;
    Ok(report)
}
