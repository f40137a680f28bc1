//! Progress of a copy: a human line with rate and ETA, or JSON lines for machines.

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How progress is shown.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum ProgressMode {
    /// Not at all.
    #[default]
    None,
    /// One line on stderr, rewritten in place: done, total, rate, ETA.
    Human,
    /// One JSON object per second on stdout: {"done","total","rate","eta_s"}; a last one with
    /// "finished".
    Json,
}

/// Counts bytes done (copied, zeroed or skipped) against the total.
pub struct Progress {
    mode: ProgressMode,
    total: u64,
    done: AtomicU64,
    /// Bytes already done when this run started (a resumed copy): not part of the rate.
    resumed: u64,
    started: Instant,
    /// A caller's counter that follows `done`.
    also: Option<Arc<AtomicU64>>,
}

impl Progress {
    /// A counter for `total` bytes of which `resumed` were done before this run.
    pub fn new(mode: ProgressMode, total: u64, resumed: u64) -> Progress {
        Progress { mode, total, done: AtomicU64::new(resumed), resumed, started: Instant::now(), also: None }
    }

    /// Also counts into `counter` (which gets the resumed bytes now), when given.
    pub fn counting_into(mut self, counter: Option<Arc<AtomicU64>>) -> Progress {
        if let Some(c) = &counter {
            c.fetch_add(self.resumed, Ordering::Relaxed);
        }
        self.also = counter;
        self
    }

    /// Records `n` more bytes done.
    pub fn add(&self, n: u64) {
        self.done.fetch_add(n, Ordering::Relaxed);
        if let Some(c) = &self.also {
            c.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Bytes done so far.
    pub fn done(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }

    fn snapshot(&self) -> (u64, f64, Option<f64>) {
        let done = self.done();
        let secs = self.started.elapsed().as_secs_f64().max(1e-3);
        let rate = (done - self.resumed.min(done)) as f64 / secs;
        let eta = (rate > 0.0).then(|| (self.total.saturating_sub(done)) as f64 / rate);
        (done, rate, eta)
    }

    fn emit(&self, finished: Option<bool>) {
        let (done, rate, eta) = self.snapshot();
        match self.mode {
            ProgressMode::None => {}
            ProgressMode::Json => {
                let mut line = serde_json::json!({ "done": done, "total": self.total, "rate": rate.round(), "eta_s": eta.map(|e| (e * 10.0).round() / 10.0) });
                if let (Some(ok), Some(o)) = (finished, line.as_object_mut()) {
                    o.insert("finished".into(), ok.into());
                    o.insert("elapsed_s".into(), self.started.elapsed().as_secs_f64().into());
                }
                // Best effort, as the human form: a reader gone never fails the copy.
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, "{line}").and_then(|()| out.flush());
            }
            ProgressMode::Human => {
                let pct = if self.total == 0 { 100.0 } else { done as f64 * 100.0 / self.total as f64 };
                let eta = eta.map(|e| format!("{e:.0}s")).unwrap_or_else(|| "?".into());
                let mut err = std::io::stderr().lock();
                let _ = write!(err, "\r{} / {} ({pct:.1}%), {}/s, ETA {eta}   ", human(done), human(self.total), human(rate as u64));
                if finished.is_some() {
                    let _ = writeln!(err);
                }
                let _ = err.flush();
            }
        }
    }

    /// Reports once a second until the returned [`Ticker`] finishes or is dropped.
    pub fn spawn_ticker(self: &Arc<Self>) -> Ticker {
        let this = Arc::clone(self);
        let handle = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            loop {
                tick.tick().await;
                this.emit(None);
            }
        });
        Ticker { handle, progress: Arc::clone(self), finished: false }
    }

    fn finish(&self, ok: bool) {
        self.emit(Some(ok));
    }
}

/// The once-a-second report of a copy under way. Dropped unfinished (the copy failed on the
/// way, or was stopped by a signal and its future dropped), it makes the last report, an
/// unfinished one: the human line ends before any error is printed after it, and a JSON reader
/// learns the copy ended.
pub struct Ticker {
    handle: tokio::task::JoinHandle<()>,
    progress: Arc<Progress>,
    finished: bool,
}

impl Ticker {
    /// Stops the reports and makes the last one.
    pub fn finish(mut self, ok: bool) {
        self.handle.abort();
        self.progress.finish(ok);
        self.finished = true;
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.handle.abort();
        if !self.finished {
            self.progress.finish(false);
        }
    }
}

fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 { format!("{bytes} B") } else { format!("{v:.1} {}", UNITS[u]) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_sizes_read_naturally() {
        assert_eq!(human(512), "512 B");
        assert_eq!(human(1536), "1.5 KiB");
        assert_eq!(human(3 << 30), "3.0 GiB");
    }

    #[test]
    fn resumed_bytes_count_as_done_but_not_toward_the_rate() {
        let p = Progress::new(ProgressMode::None, 100, 40);
        assert_eq!(p.done(), 40);
        let (_, rate, _) = p.snapshot();
        assert_eq!(rate, 0.0);
        p.add(10);
        assert_eq!(p.done(), 50);
    }

    #[test]
    fn a_callers_counter_follows_the_bytes_done() {
        let c = Arc::new(AtomicU64::new(0));
        let p = Progress::new(ProgressMode::None, 100, 40).counting_into(Some(Arc::clone(&c)));
        assert_eq!(c.load(Ordering::Relaxed), 40);
        p.add(25);
        assert_eq!((p.done(), c.load(Ordering::Relaxed)), (65, 65));
    }
}
