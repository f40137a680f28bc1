//! A whole copy as a storage backend runs it for a migration: an image chain (or only where it
//! differs from a related chain) into an NBD connection someone else opened, from blocking
//! code, with progress and cancellation.
//!
//! # Where it runs
//!
//! On a current-thread runtime of its own, on a scoped thread
//! ([`crate::datapaths::block_on`]): it works whatever the caller's runtime is (or none, in
//! tests), the copy's CPU work (the zero scan of every byte read) never takes the caller's
//! worker threads, and dropping that runtime at the end ends every task the copy started, on
//! success, error and cancellation alike. One thread is plenty: the work is I/O with 8
//! requests of 1 MiB in flight.
//!
//! # Cancellation and progress
//!
//! The copy future is raced against the caller's token: when it fires, the future is dropped
//! (its requests abandoned, the connection closed) and the call answers `Ok(None)` at once,
//! even if the destination has stopped answering. Progress is sampled every `every` from the
//! copy's counter of bytes done (copied, zeroed or skipped), reported as `(done, size)`, and
//! once more at the end.

use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{CopyOptions, CopyReport, Dest, Source};
use crate::image::{Access, AnyImage, Format, qcow2, vhd};
use crate::io::EngineChoice;
use crate::nbd::{ClientOptions, NbdClient};

/// What [`into_connection`] copies.
#[derive(Clone, Copy)]
pub struct Chain<'a> {
    /// The chain's top image.
    pub image: &'a Path,
    /// Its format.
    pub format: Format,
    /// A related chain whose content the destination holds: only what the layers one chain
    /// has and the other lacks hold travels (`vhd::diff_map`, `qcow2::diff_map`).
    pub diff_base: Option<&'a Path>,
    /// The destination reads as zeroes already: zero runs are skipped rather than written.
    pub target_is_zero: bool,
    /// A pace shared with other copies (see [`CopyOptions::throttle`]).
    pub throttle: Option<&'a super::Throttle>,
}

/// Copies `chain` into `dest`, an NBD connection to `export` (see the module documentation).
/// `Ok(None)` when cancelled; `Err` says what failed.
pub fn into_connection(
    chain: &Chain<'_>,
    dest: OwnedFd,
    export: &str,
    every: Duration,
    progress: &(dyn Fn(u64, u64) + Sync),
    cancel: &CancellationToken,
) -> Result<Option<CopyReport>, String> {
    if cancel.is_cancelled() {
        return Ok(None);
    }
    let done = Arc::new(AtomicU64::new(0));
    let size = AtomicU64::new(0);
    let outcome = crate::datapaths::block_on(async {
        let work = run(chain, dest, export, &done, &size);
        tokio::pin!(work);
        let mut tick = tokio::time::interval(every);
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
    })
    .map_err(|e| format!("starting a runtime for the copy: {e}"))?;
    match outcome {
        None => Ok(None),
        Some(Err(e)) => Err(e),
        Some(Ok(report)) => {
            progress(report.size, report.size);
            Ok(Some(report))
        }
    }
}

async fn run(chain: &Chain<'_>, dest: OwnedFd, export: &str, done: &Arc<AtomicU64>, size: &AtomicU64) -> Result<CopyReport, String> {
    let image = chain.image;
    let engine = EngineChoice::from_env().resolve().map_err(|e| format!("choosing the I/O engine: {e}"))?;
    let opened = AnyImage::open(image, Some(chain.format), Access::ReadOnly, engine)
        .await
        .map_err(|e| format!("opening {}: {e:#}", image.display()))?;
    let source = match chain.diff_base {
        None => Source::Image(Arc::new(opened)),
        Some(b) if chain.format == Format::Vhd => {
            let ranges =
                vhd::diff_map(image, b).await.map_err(|e| format!("comparing {} with {}: {e:#}", image.display(), b.display()))?;
            Source::Diff { image: Arc::new(opened), ranges }
        }
        Some(b) if chain.format == Format::Qcow2 => {
            match qcow2::diff_map(image, b).await.map_err(|e| format!("comparing {} with {}: {e}", image.display(), b.display()))? {
                Some(ranges) => Source::Diff { image: Arc::new(opened), ranges },
                // The base holds layers this chain lacks: only the whole chain is sure to do.
                None => Source::Image(Arc::new(opened)),
            }
        }
        Some(_) => return Err(format!("{}: a difference map needs VHD or qcow2 chains", image.display())),
    };
    size.store(source.size(), Ordering::Relaxed);
    let opts = ClientOptions { export: export.to_owned(), answer_timeout: Some(super::ANSWER_TIMEOUT), ..ClientOptions::default() };
    let client = NbdClient::from_fd(dest, opts)
        .await
        .map_err(|e| format!("NBD on the destination socket: {e}"))?;
    let goodbye = client.clone();
    let dest: Dest<AnyImage> = Dest::nbd(vec![client]).map_err(|e| format!("{e:#}"))?;
    let opts = CopyOptions {
        target_is_zero: chain.target_is_zero,
        done_counter: Some(Arc::clone(done)),
        throttle: chain.throttle.cloned(),
        ..CopyOptions::default()
    };
    let names = (image.to_str().unwrap_or("source"), export);
    let report = super::copy(Arc::new(source), Arc::new(dest), 1, &opts, names).await.map_err(|e| format!("{e:#}"))?;
    // Flushed by the copy; say goodbye so the destination's datapath ends the connection cleanly.
    let _ = goodbye.disconnect().await;
    Ok(report)
}
