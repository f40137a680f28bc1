//! Sparse copy: an image (or NBD export) into an NBD export (or file), sending only what holds
//! data.
//!
//! ```text
//!  allocation map ─▶ slices ─▶ data: read ─▶ zero scan ─▶ data runs → WRITE (shared buffer)
//!                           │                           └─ zero runs → WRITE_ZEROES / nothing
//!                           └▶ holes and zeroes ───────────────────────▶ WRITE_ZEROES / nothing
//! ```
//!
//! Requests run concurrently up to `connections × requests`, each at most `request_size`
//! bytes (clamped to both ends' limits), spread over the destination's connections. Zero runs
//! cost nothing when the target is known to read as zero. What has been written and flushed is
//! tracked as a low-water mark (every byte below it is on the target), which `--checkpoint`
//! persists so an interrupted copy resumes without resending it.

mod endpoints;
pub mod into_connection;
mod progress;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use tokio::sync::Semaphore;

pub use endpoints::{Dest, Source};
pub use into_connection::{Chain, into_connection};
pub use progress::{Progress, ProgressMode};

use crate::image::{Extent, ExtentState, Image};

/// How a copy runs.
#[derive(Clone)]
pub struct CopyOptions {
    /// Requests in flight per destination connection. A few large ones keep a target busy;
    /// more only push the buffers out of the CPU cache on both ends (benches/README.md, Copy).
    pub requests: usize,
    /// Largest request in bytes (clamped to what both ends accept).
    pub request_size: usize,
    /// The destination reads as zeroes already: skip zero runs entirely.
    pub target_is_zero: bool,
    /// Bytes of data per second at most (zeroing is not counted: it moves no data); `None` or
    /// 0 for no cap.
    pub bwlimit: Option<u64>,
    /// Where to persist progress, to resume an interrupted copy.
    pub checkpoint: Option<PathBuf>,
    /// What the files of the copy were when it began ([`files_stamp`]): a checkpoint made
    /// for others is refused, since what it says the destination holds is not there.
    pub files_stamp: Option<String>,
    /// Persist progress after this many bytes (or every 5 s, whichever comes first). Each
    /// checkpoint costs a flush of the destination.
    pub checkpoint_every: u64,
    /// Flush the destination in the background after every this many data bytes sent (0:
    /// only at the end). The target then writes back while data keeps arriving instead of
    /// all at once at the final flush, which is what a copy that ends durable waits for, and
    /// its dirty page cache stays bounded.
    pub writeback_every: u64,
    /// How to report progress.
    pub progress: ProgressMode,
    /// Granularity of zero detection in data read from the source.
    pub sparse_size: usize,
    /// Also counts the bytes done (copied, zeroed or skipped; resumed ones included) here, as
    /// requests complete, for a caller that reports progress its own way.
    pub done_counter: Option<Arc<std::sync::atomic::AtomicU64>>,
    /// A pace shared with other copies: asked before each data request how long its bytes
    /// must wait (several copies under one bandwidth limit that can change while they run).
    pub throttle: Option<Throttle>,
    /// Set to stop the copy early: nothing more is sent, what is in flight completes, and with
    /// a checkpoint the destination is flushed and the checkpoint written where the copy got
    /// to; the copy then ends with [`Stopped`]. (A copy stopped by dropping its future resent
    /// up to 5 s of data on the resume.)
    pub stop: Option<Arc<std::sync::atomic::AtomicBool>>,
}

/// What a copy stopped through [`CopyOptions::stop`] ends with.
#[derive(Debug)]
pub struct Stopped {
    /// Bytes below this the destination holds, flushed (the checkpoint's mark, if there is one).
    pub done: u64,
}

impl std::fmt::Display for Stopped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "stopped with the first {} bytes copied", self.done)
    }
}

impl std::error::Error for Stopped {}

/// How long a copy waits on an NBD end that answers nothing while requests wait on it
/// ([`crate::nbd::ClientOptions::answer_timeout`]). A server answers a 1 MiB write in
/// milliseconds; minutes of silence are a stopped process or a dead network, not a busy disk
/// (a copy flushes every `writeback_every` bytes, so no flush waits on gigabytes).
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(120);

/// Asked before a request of that many data bytes: zero means go now (the bytes are taken from
/// the pace), anything else how long until they could go at the present pace, after which it
/// is asked again (at most [`THROTTLE_RECHECK`] later), so a pace that changes applies at once.
pub type Throttle = Arc<dyn Fn(u64) -> Duration + Send + Sync>;

/// The longest a copy sleeps on its [`Throttle`] before asking it again.
pub const THROTTLE_RECHECK: Duration = Duration::from_millis(100);

impl std::fmt::Debug for CopyOptions {
    // By hand: the throttle is a closure.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CopyOptions")
            .field("requests", &self.requests)
            .field("request_size", &self.request_size)
            .field("target_is_zero", &self.target_is_zero)
            .field("bwlimit", &self.bwlimit)
            .field("checkpoint", &self.checkpoint)
            .field("throttle", &self.throttle.is_some())
            .finish_non_exhaustive()
    }
}

impl Default for CopyOptions {
    fn default() -> CopyOptions {
        CopyOptions {
            requests: 8,
            request_size: 1 << 20,
            target_is_zero: false,
            bwlimit: None,
            checkpoint: None,
            files_stamp: None,
            checkpoint_every: 1 << 30,
            writeback_every: 64 << 20,
            progress: ProgressMode::None,
            sparse_size: 4096,
            done_counter: None,
            throttle: None,
            stop: None,
        }
    }
}

/// What a finished copy did.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct CopyReport {
    /// Size of the source.
    pub size: u64,
    /// Bytes sent as data.
    pub data_bytes: u64,
    /// Bytes zeroed on the target (by WRITE_ZEROES or equivalent).
    pub zeroed_bytes: u64,
    /// Bytes skipped because the target already reads as zero there.
    pub skipped_bytes: u64,
    /// Bytes not copied again because a checkpoint said they were already on the target.
    pub resumed_bytes: u64,
}

/// Every byte below `mark` has been written (not necessarily flushed).
struct Watermark {
    mark: u64,
    done: BTreeMap<u64, u64>,
}

impl Watermark {
    fn new(start: u64) -> Watermark {
        Watermark { mark: start, done: BTreeMap::new() }
    }

    fn complete(&mut self, offset: u64, len: u64) {
        self.done.insert(offset, len);
        while let Some(len) = self.done.remove(&self.mark) {
            self.mark += len;
        }
    }
}

/// The persisted state of a resumable copy.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Checkpoint {
    /// Format version.
    pub version: u32,
    /// What is copied (as given on the command line).
    pub source: String,
    /// Where to.
    pub dest: String,
    /// Source size: a different size means a different copy.
    pub size: u64,
    /// Every byte below this is written and flushed on the destination.
    pub done: u64,
    /// The files as they were ([`CopyOptions::files_stamp`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files_stamp: Option<String>,
}

/// The identity, size and modification time of each of `source` (an image's chain), and the
/// identity of the destination file if there is one: two stamps differ when a source file was
/// written, replaced or truncated in between, or the destination is another file under the
/// same name (one put back empty). A block device's writes leave no trace in its metadata, so
/// a source on one is refused: a checkpoint could not tell it changed.
pub fn files_stamp(source: &[PathBuf], dest: Option<&std::fs::Metadata>) -> Result<String> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let mut parts = Vec::with_capacity(source.len() + 1);
    for f in source {
        let m = std::fs::metadata(f).with_context(|| format!("looking at {}", f.display()))?;
        if m.file_type().is_block_device() {
            bail!(
                "{} is a block device, whose writes change nothing a checkpoint can record: a resume could not tell that it changed; copy it without --checkpoint",
                f.display()
            );
        }
        // With the change time, which no one can set back: a write followed by `touch -r`
        // restores the modification time, and the resume took the changed source for the same.
        parts.push(format!("{}:{}:{}:{}.{:09}:{}.{:09}", m.dev(), m.ino(), m.len(), m.mtime(), m.mtime_nsec(), m.ctime(), m.ctime_nsec()));
    }
    if let Some(m) = dest {
        // With its birth time where the file system keeps one: a file removed and made again
        // at once often gets the inode number back.
        let born = m.created().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map_or(0, |d| d.as_nanos());
        parts.push(format!("-> {}:{}:{born}", m.dev(), m.ino()));
    }
    Ok(parts.join(" "))
}

impl Checkpoint {
    /// Loads a checkpoint; `None` when the file does not exist.
    pub fn load(path: &Path) -> Result<Option<Checkpoint>> {
        match std::fs::read(path) {
            Ok(b) => {
                let cp: Checkpoint = serde_json::from_slice(&b).with_context(|| format!("corrupt checkpoint {}", path.display()))?;
                if cp.version != 1 {
                    bail!("checkpoint {} is of version {}, which this tapmirror does not know: remove it to copy from the start", path.display(), cp.version);
                }
                Ok(Some(cp))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading checkpoint {}", path.display())),
        }
    }

    /// Whether a checkpoint can be stored at `path`: its temporary file made and removed again.
    pub fn check_writable(path: &Path) -> Result<()> {
        let tmp = Checkpoint::temporary(path);
        std::fs::File::create(&tmp).with_context(|| format!("--checkpoint {}: cannot write beside it ({})", path.display(), tmp.display()))?;
        std::fs::remove_file(&tmp).with_context(|| format!("removing {}", tmp.display()))
    }

    /// The file a checkpoint is written to before it is renamed onto `path`.
    fn temporary(path: &Path) -> PathBuf {
        let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        dir.join(format!(".{}.tmp", path.file_name().and_then(|n| n.to_str()).unwrap_or("checkpoint")))
    }

    /// Writes it atomically: temporary file, fsync, rename, fsync of the folder.
    pub fn store(&self, path: &Path) -> Result<()> {
        use std::io::Write;
        let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let tmp = Checkpoint::temporary(path);
        let mut f = std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(&serde_json::to_vec(self)?)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path).with_context(|| format!("renaming onto {}", path.display()))?;
        std::fs::File::open(dir)?.sync_all()?;
        Ok(())
    }
}

/// A token bucket over data bytes. It reads tokio's clock, which is the system's except in
/// tests that pause time.
struct Limiter {
    rate: u64,
    state: Mutex<(tokio::time::Instant, f64)>,
}

impl Limiter {
    fn new(rate: u64) -> Limiter {
        Limiter { rate: rate.max(1), state: Mutex::new((tokio::time::Instant::now(), 0.0)) }
    }

    /// Waits until `bytes` may be sent. The bucket holds at most 100 ms of credit, so bursts
    /// stay short.
    async fn take(&self, bytes: u64) {
        let wait = {
            let Ok(mut s) = self.state.lock() else { return };
            let now = tokio::time::Instant::now();
            let rate = self.rate as f64;
            let credit = (s.1 + now.duration_since(s.0).as_secs_f64() * rate).min(rate / 10.0);
            let after = credit - bytes as f64;
            *s = (now, after);
            if after >= 0.0 { Duration::ZERO } else { Duration::from_secs_f64(-after / rate) }
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

/// `extents` (contiguous, from an aligned offset) on `unit` boundaries: a unit that holds any
/// data becomes data (read whole, its zero runs found by `copy_chunk`), a run of units that
/// hold none keeps its state. The last unit the run only partly covers is left for the next
/// call, unless the image ends there.
fn aligned(extents: Vec<Extent>, unit: u64, size: u64) -> Vec<Extent> {
    let mut out: Vec<Extent> = Vec::with_capacity(extents.len());
    let Some(first) = extents.first().map(|e| e.offset) else { return extents };
    let end = extents.last().map_or(0, |e| e.offset + e.length);
    let end = if end >= size { size } else { end / unit * unit };
    for e in extents {
        let (mut start, mut stop) = (e.offset, (e.offset + e.length).min(end));
        if e.state == ExtentState::Data {
            start = start / unit * unit;
            stop = stop.next_multiple_of(unit).min(end);
        } else {
            start = start.next_multiple_of(unit);
            stop = if stop == size { stop } else { stop / unit * unit };
        }
        // What the previous extent (grown to whole units) covers already.
        if let Some(last) = out.last() {
            start = start.max(last.offset + last.length);
        }
        if start >= stop {
            continue;
        }
        // A gap left by two shrunk non-data runs: a unit of mixed zeroes, copied as data.
        if let Some(last) = out.last()
            && last.offset + last.length < start
        {
            let gap = last.offset + last.length;
            out.push(Extent { offset: gap, length: start - gap, state: ExtentState::Data });
        }
        match out.last_mut() {
            Some(last) if last.state == e.state && last.offset + last.length == start => last.length += stop - start,
            _ => out.push(Extent { offset: start, length: stop - start, state: e.state }),
        }
    }
    // A unit left between the last run and the end (two shrunk non-data runs meet there).
    if let Some(last) = out.last()
        && last.offset + last.length < end
    {
        let gap = last.offset + last.length;
        out.push(Extent { offset: gap, length: end - gap, state: ExtentState::Data });
    }
    // Runs shorter than one unit in all: that unit, as data, so that the walk moves on.
    if out.is_empty() {
        out.push(Extent { offset: first, length: unit.min(size - first), state: ExtentState::Data });
    }
    out
}

/// Whether `b` is all zeroes (word-wise: this runs over every byte read).
pub fn is_zero(b: &[u8]) -> bool {
    // SAFETY: any bytes are valid u128s; align_to only splits the slice at alignment bounds.
    let (head, mid, tail) = unsafe { b.align_to::<u128>() };
    head.iter().all(|&x| x == 0) && mid.iter().all(|&x| x == 0) && tail.iter().all(|&x| x == 0)
}

/// Copies `source` into `dest`. `names` identify the two ends in a checkpoint.
pub async fn copy<I: Image, J: Image>(
    source: Arc<Source<I>>,
    dest: Arc<Dest<J>>,
    connections: usize,
    opts: &CopyOptions,
    names: (&str, &str),
) -> Result<CopyReport> {
    let size = source.size();
    if dest.size() < size {
        bail!("destination ({} bytes) is smaller than the source ({size} bytes)", dest.size());
    }
    // At least 4 KiB unless the destination takes less in one request (a server may
    // advertise a maximum block size below that); never more than it takes. A source that
    // takes less is read in several requests (`Source::read`).
    let request_size = opts.request_size.max(4096).min(dest.max_write()).max(1);
    // Every request starts and ends on the destination's unit (a 4 KiB-sector disk behind
    // qemu-nbd, say), whatever the source's granularity (a VHD's is the 512-byte sector).
    let unit = dest.min_write();
    // The walk covers the destination's last unit whole: the source pads it with zeroes.
    let walk_end = size.next_multiple_of(unit);
    if walk_end > dest.size() {
        bail!(
            "the destination writes in units of {unit} bytes and ends at {} bytes, within its last unit: the source's last {} bytes cannot be written",
            dest.size(),
            size % unit
        );
    }
    let request_size = (request_size as u64).max(unit) / unit * unit;
    let request_size = usize::try_from(request_size).unwrap_or(usize::MAX);
    let sparse = (opts.sparse_size.max(512).min(request_size) as u64).next_multiple_of(unit) as usize;

    // Resume from a checkpoint of the same copy.
    let mut start = 0;
    if let Some(path) = &opts.checkpoint
        && let Some(cp) = Checkpoint::load(path)?
    {
        if cp.source != names.0 || cp.dest != names.1 || cp.size != size {
            bail!("checkpoint {} is for another copy ({} -> {}, {} bytes)", path.display(), cp.source, cp.dest, cp.size);
        }
        if cp.files_stamp != opts.files_stamp {
            bail!(
                "checkpoint {} was made for files that have changed since (the source {} written, or another destination file put under the name {}): what it says the destination holds is not there; remove it to copy from the start",
                path.display(),
                cp.source,
                cp.dest
            );
        }
        start = cp.done.min(size);
        check_resume(&source, &dest, start, unit, path).await?;
        tracing::info!(resume_at = start, "resuming from checkpoint");
    }

    let report = Arc::new(Mutex::new(CopyReport { size, resumed_bytes: start, ..CopyReport::default() }));
    let progress = Arc::new(Progress::new(opts.progress, walk_end, start).counting_into(opts.done_counter.clone()));
    let slots = Arc::new(Semaphore::new(connections.max(1) * opts.requests.max(1)));
    let watermark = Arc::new(Mutex::new(Watermark::new(start)));
    let limiter = opts.bwlimit.filter(|&r| r > 0).map(|r| Arc::new(Limiter::new(r)));
    let failed: Arc<Mutex<Option<anyhow::Error>>> = Arc::new(Mutex::new(None));
    let mut tasks = tokio::task::JoinSet::new();
    let ticker = progress.spawn_ticker();
    let mut checkpoints = opts.checkpoint.as_deref().map(|path| Checkpointer {
        path,
        every: opts.checkpoint_every,
        last: (Instant::now(), start),
        names,
        size,
        files_stamp: opts.files_stamp.as_deref(),
    });
    // Early writeback (see `CopyOptions::writeback_every`): one flush in flight at a time, in a
    // set of its own so that leaving early (an error) aborts it rather than leaving it behind.
    let mut writeback: tokio::task::JoinSet<Result<()>> = tokio::task::JoinSet::new();
    let target = Arc::clone(&dest);
    // Data bytes written (zero blocks found in data sent as zeroing are not) when the last
    // early flush was sent: the flush is for what sits dirty in the target's cache.
    let mut data_at_writeback = 0u64;
    let stopping = || opts.stop.as_ref().is_some_and(|s| s.load(std::sync::atomic::Ordering::SeqCst));
    let a_request_failed = || failed.lock().map(|f| f.is_some()).unwrap_or(true);
    // Failed, or asked to stop: either way nothing more is sent.
    let has_failed = || stopping() || a_request_failed();
    let data_written = || report.lock().map(|r| r.data_bytes).unwrap_or(0);

    let mut at = start;
    'walk: while at < walk_end {
        let extents = source.allocation(at, (walk_end - at).min(source.allocation_window())).await?;
        if extents.is_empty() {
            bail!("source reported no allocation at offset {at}");
        }
        let extents = if unit > 1 { aligned(extents, unit, walk_end) } else { extents };
        for e in extents {
            let end = e.offset + e.length;
            if e.state != ExtentState::Data {
                // Zeroes and holes: nothing on the wire when the target already reads as zero.
                let len = e.length;
                let (dest, report, watermark, failed, progress) =
                    (Arc::clone(&dest), Arc::clone(&report), Arc::clone(&watermark), Arc::clone(&failed), Arc::clone(&progress));
                let permit = Arc::clone(&slots).acquire_owned().await?;
                // Zero where the target could hold something else; leave alone where it holds
                // this already (a known-zero target, or what a diff source says is unchanged).
                let skip = opts.target_is_zero || source.skips_non_data();
                let offset = e.offset;
                tasks.spawn(async move {
                    let r = if skip { Ok(()) } else { dest.write_zeroes(offset, len).await };
                    finish(r, offset, len, &watermark, &failed, &progress, |rep| {
                        if skip { rep.skipped_bytes += len } else { rep.zeroed_bytes += len }
                    }, &report);
                    drop(permit);
                });
            } else {
                let mut off = e.offset;
                while off < end {
                    // A request failed: send no more. A connection sent to now, with nothing
                    // in flight, would wait out a whole answer timeout of its own.
                    if has_failed() {
                        break 'walk;
                    }
                    // Inside a long data extent too (a whole raw disk is one).
                    if let Some(c) = &mut checkpoints {
                        c.record_if_due(off, &watermark, &dest).await?;
                    }
                    let len = (end - off).min(request_size as u64) as usize;
                    if let Some(l) = &limiter {
                        l.take(len as u64).await;
                    }
                    if let Some(t) = &opts.throttle {
                        // Asked again after a short sleep rather than slept out in one: a pace
                        // raised meanwhile (a job's limit lifted) applies within 100 ms.
                        loop {
                            let wait = t(len as u64);
                            if wait.is_zero() {
                                break;
                            }
                            tokio::time::sleep(wait.min(THROTTLE_RECHECK)).await;
                        }
                    }
                    let permit = Arc::clone(&slots).acquire_owned().await?;
                    // The slot may have come free by a request failing.
                    if has_failed() {
                        break 'walk;
                    }
                    let (source, dest, report, watermark, failed, progress) = (
                        Arc::clone(&source),
                        Arc::clone(&dest),
                        Arc::clone(&report),
                        Arc::clone(&watermark),
                        Arc::clone(&failed),
                        Arc::clone(&progress),
                    );
                    let skip_zero = opts.target_is_zero;
                    tasks.spawn(async move {
                        let r = copy_chunk(&source, &dest, off, len, sparse, skip_zero).await;
                        let (data, zero) = *r.as_ref().unwrap_or(&(0, 0));
                        finish(r.map(|_| ()), off, len as u64, &watermark, &failed, &progress, |rep| {
                            rep.data_bytes += data;
                            if skip_zero { rep.skipped_bytes += zero } else { rep.zeroed_bytes += zero }
                        }, &report);
                        drop(permit);
                    });
                    off += len as u64;
                    let written = data_written();
                    if opts.writeback_every > 0 && written.saturating_sub(data_at_writeback) >= opts.writeback_every {
                        if let Some(done) = writeback.try_join_next() {
                            done??;
                        }
                        if writeback.is_empty() {
                            let target = Arc::clone(&target);
                            writeback.spawn(async move { target.flush().await });
                            data_at_writeback = written;
                        }
                    }
                }
            }
            at = end;
            // Reap finished tasks so the set does not grow with the disk.
            while let Some(r) = tasks.try_join_next() {
                r?;
            }
            if has_failed() {
                break 'walk;
            }
            if let Some(c) = &mut checkpoints {
                c.record_if_due(at, &watermark, &dest).await?;
            }
        }
    }
    if a_request_failed() {
        // The first failure ends the copy. What is still in flight is not waited for: on
        // other connections to a server that stopped, each would wait out its own timeout.
        // A request dropped unanswered is not acknowledged, so a checkpoint never counts it.
        tasks.shutdown().await;
        writeback.shutdown().await;
    }
    while let Some(r) = tasks.join_next().await {
        r?;
    }
    while let Some(done) = writeback.join_next().await {
        done??;
    }
    if let Some(e) = failed.lock().ok().and_then(|mut f| f.take()) {
        ticker.finish(false);
        return Err(e);
    }
    if stopping() && at < walk_end {
        // What was sent is done: made durable and recorded, so the resume starts there.
        let done = watermark.lock().map(|w| w.mark).unwrap_or(0);
        if let Some(c) = &mut checkpoints {
            c.record(&watermark, &dest).await?;
        }
        ticker.finish(false);
        return Err(Stopped { done }.into());
    }
    // The ticker goes on through the flush, which can take long (a target writing back
    // gigabytes): progress lines that stop would look like a hang.
    dest.flush().await?;
    // The copy is done: its checkpoint goes, so that the same command run again (the source
    // changed since) copies again rather than finding everything already done.
    if let Some(path) = &opts.checkpoint {
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing the finished copy's checkpoint {}", path.display())),
        }
    }
    ticker.finish(true);
    let report = report.lock().map(|r| r.clone()).unwrap_or_default();
    Ok(report)
}

/// Places below a checkpoint's mark read from both ends: spread evenly, and where the source's
/// first runs of data begin.
const RESUME_CHECKS: u64 = 16;

/// How much of the source below a checkpoint's mark a resume reads, at most, looking for a
/// block that holds something when every place it compared reads as zeroes, and in what reads.
const RESUME_SCAN_BYTES: u64 = 64 << 20;
const RESUME_SCAN_CHUNK: u64 = 1 << 20;

/// Reads a few places below a checkpoint's `mark` from both ends: the destination must hold
/// there what the source does, or the checkpoint speaks of another file. Its stamp cannot see
/// a destination made again in place (`qemu-img create` over it, zeroed with `dd`): the same
/// file, and what the checkpoint says it holds gone.
async fn check_resume<I: Image, J: Image>(source: &Source<I>, dest: &Dest<J>, mark: u64, unit: u64, checkpoint: &Path) -> Result<()> {
    let len = unit.max(4096);
    let mut places: Vec<u64> = (0..RESUME_CHECKS).map(|i| mark / RESUME_CHECKS * i / unit * unit).collect();
    let extents = source.allocation(0, mark.min(source.allocation_window())).await?;
    places.extend(extents.iter().filter(|e| e.state == ExtentState::Data).take(RESUME_CHECKS as usize).map(|e| e.offset / unit * unit));
    places.sort_unstable();
    places.dedup();
    let n = usize::try_from(len).unwrap_or(4096);
    let differs = |at: u64| {
        anyhow!(
            "checkpoint {} says the destination holds the source up to byte {mark}, but at {at} it does not (the destination was made again, or written, since): remove the checkpoint to copy from the start",
            checkpoint.display()
        )
    };
    let mut saw_data = false;
    for at in places.into_iter().filter(|&at| at + len <= mark) {
        let (theirs, ours) = (dest.read(at, n).await?, source.read(at, n).await?);
        if theirs[..] != ours[..] {
            return Err(differs(at));
        }
        saw_data |= !is_zero(&ours);
    }
    if saw_data {
        return Ok(());
    }
    // Every place looked at reads as zeroes in the source, as a destination emptied in place
    // reads everywhere (a disk whose blocks each begin with zeroes hid one): look on, through
    // the data below the mark, for the first block that holds something, and compare that.
    let mut budget = RESUME_SCAN_BYTES;
    for e in extents.iter().filter(|e| e.state == ExtentState::Data) {
        let mut at = e.offset / unit * unit;
        let end = (e.offset + e.length).min(mark);
        while at + len <= end && budget > 0 {
            let chunk = (RESUME_SCAN_CHUNK / len).max(1) * len;
            let take = chunk.min((end - at) / len * len);
            let ours = source.read(at, usize::try_from(take).unwrap_or(n)).await?;
            budget = budget.saturating_sub(take);
            if let Some(i) = ours.chunks(n).position(|b| !is_zero(b)) {
                let found = at + i as u64 * len;
                let theirs = dest.read(found, n).await?;
                return if theirs[..] == ours[i * n..(i + 1) * n] { Ok(()) } else { Err(differs(found)) };
            }
            at += take;
        }
    }
    Ok(())
}

/// Writes a copy's checkpoint every 5 s or `every` bytes walked.
struct Checkpointer<'a> {
    path: &'a Path,
    every: u64,
    /// When the last was written, and where the walk was then.
    last: (Instant, u64),
    names: (&'a str, &'a str),
    size: u64,
    files_stamp: Option<&'a str>,
}

impl Checkpointer<'_> {
    /// Records the watermark when a checkpoint is due, the walk being at `at`. The mark is
    /// persisted only after a flush that covers it.
    async fn record_if_due<J: Image>(&mut self, at: u64, watermark: &Mutex<Watermark>, dest: &Dest<J>) -> Result<()> {
        if self.last.0.elapsed() <= Duration::from_secs(5) && at.saturating_sub(self.last.1) < self.every {
            return Ok(());
        }
        self.record(watermark, dest).await?;
        self.last = (Instant::now(), at);
        Ok(())
    }

    /// Flushes the destination and records the watermark.
    async fn record<J: Image>(&mut self, watermark: &Mutex<Watermark>, dest: &Dest<J>) -> Result<()> {
        let mark = watermark.lock().map(|w| w.mark).unwrap_or(0);
        dest.flush().await?;
        Checkpoint {
            version: 1,
            source: self.names.0.into(),
            dest: self.names.1.into(),
            size: self.size,
            done: mark,
            files_stamp: self.files_stamp.map(str::to_owned),
        }
        .store(self.path)
    }
}

/// Copies one chunk of source data: reads it, sends its data runs, zeroes (or skips) its zero
/// runs. Returns (data bytes, zero bytes).
async fn copy_chunk<I: Image, J: Image>(
    source: &Source<I>,
    dest: &Dest<J>,
    offset: u64,
    len: usize,
    sparse: usize,
    target_is_zero: bool,
) -> Result<(u64, u64)> {
    let buf = Arc::new(source.read(offset, len).await?);
    let (mut data, mut zero) = (0u64, 0u64);
    let mut run_start = 0usize;
    let mut run_zero = None::<bool>;
    let mut pos = 0usize;
    let mut runs = Vec::new();
    while pos < len {
        let n = sparse.min(len - pos);
        let z = is_zero(&buf[pos..pos + n]);
        match run_zero {
            Some(prev) if prev == z => {}
            Some(prev) => {
                runs.push((run_start, pos, prev));
                run_start = pos;
                run_zero = Some(z);
            }
            None => run_zero = Some(z),
        }
        pos += n;
    }
    if let Some(z) = run_zero {
        runs.push((run_start, len, z));
    }
    for (s, e, z) in runs {
        let at = offset + s as u64;
        if z {
            zero += (e - s) as u64;
            if !target_is_zero {
                dest.write_zeroes(at, (e - s) as u64).await?;
            }
        } else {
            data += (e - s) as u64;
            dest.write(at, &buf, s..e).await?;
        }
    }
    Ok((data, zero))
}

#[allow(clippy::too_many_arguments)]
fn finish(
    r: Result<()>,
    offset: u64,
    len: u64,
    watermark: &Mutex<Watermark>,
    failed: &Mutex<Option<anyhow::Error>>,
    progress: &Progress,
    count: impl FnOnce(&mut CopyReport),
    report: &Mutex<CopyReport>,
) {
    match r {
        Ok(()) => {
            if let Ok(mut w) = watermark.lock() {
                w.complete(offset, len);
            }
            if let Ok(mut rep) = report.lock() {
                count(&mut rep);
            }
            progress.add(len);
        }
        Err(e) => {
            if let Ok(mut f) = failed.lock() {
                f.get_or_insert(e);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extents_are_aligned_to_the_destinations_unit_with_mixed_units_as_data() {
        use ExtentState::{Data, Hole, Zero};
        let e = |offset, length, state| Extent { offset, length, state };
        let unit = 4096;
        // Sector-granular runs (a VHD's): data at 512..1024 and 5000..8000, zeroes and holes.
        let got = aligned(vec![e(0, 512, Hole), e(512, 512, Data), e(1024, 3976, Hole), e(5000, 3000, Data), e(8000, 10000, Zero), e(18000, 6576, Hole)], unit, 24576);
        assert_eq!(got, vec![e(0, 8192, Data), e(8192, 8192, Zero), e(16384, 4096, Data), e(20480, 4096, Hole)]);
        for x in &got {
            assert!(x.offset % unit == 0 && x.length % unit == 0, "{x:?}");
        }
        // A window that ends inside a unit leaves that unit for the next call, unless the
        // image ends there.
        assert_eq!(aligned(vec![e(0, 6000, Data)], unit, 1 << 20), vec![e(0, 4096, Data)]);
        assert_eq!(aligned(vec![e(0, 6000, Hole)], unit, 6000), vec![e(0, 6000, Hole)]);
        // Less than a unit in all: that unit, as data, so the walk moves on.
        assert_eq!(aligned(vec![e(8192, 512, Hole)], unit, 1 << 20), vec![e(8192, 4096, Data)]);
    }

    #[test]
    fn watermark_advances_only_over_contiguous_completions() {
        let mut w = Watermark::new(0);
        w.complete(100, 50);
        assert_eq!(w.mark, 0);
        w.complete(0, 100);
        assert_eq!(w.mark, 150);
        w.complete(200, 10);
        w.complete(150, 50);
        assert_eq!(w.mark, 210);
    }

    #[test]
    fn zero_scan_sees_any_nonzero_byte_at_any_alignment() {
        let mut b = vec![0u8; 4096 + 7];
        assert!(is_zero(&b));
        for i in [0, 1, 15, 16, 2048, 4095, 4102] {
            b[i] = 1;
            assert!(!is_zero(&b), "byte {i}");
            assert!(!is_zero(&b[i.min(3)..]) || i < 3, "byte {i} in an unaligned slice");
            b[i] = 0;
        }
    }

    /// On tokio's paused clock (virtual time, so nothing here depends on machine speed):
    /// 10 MB through a 1 MB/s limiter must take about 10 virtual seconds, minus the 100 ms of
    /// burst credit.
    #[tokio::test(start_paused = true)]
    async fn limiter_holds_data_to_the_rate() {
        let l = Limiter::new(1_000_000);
        let start = tokio::time::Instant::now();
        for _ in 0..100 {
            l.take(100_000).await;
        }
        let elapsed = start.elapsed().as_secs_f64();
        assert!((9.8..=10.1).contains(&elapsed), "10 MB at 1 MB/s took {elapsed} virtual seconds");
    }

    /// A block device's writes leave its metadata as it was: a checkpoint of one is refused.
    #[test]
    fn a_block_device_source_gets_no_stamp() {
        use std::os::unix::fs::FileTypeExt;
        let Some(dev) = std::fs::read_dir("/dev").into_iter().flatten().flatten().map(|e| e.path()).find(|p| std::fs::metadata(p).is_ok_and(|m| m.file_type().is_block_device())) else {
            return; // no block device here to try
        };
        let e = files_stamp(&[dev], None).expect_err("a block device stamped");
        assert!(e.to_string().contains("block device"), "{e}");
    }

    #[test]
    fn checkpoint_round_trips_atomically() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("cp.json");
        assert_eq!(Checkpoint::load(&p).expect("load missing"), None);
        let cp = Checkpoint { version: 1, source: "a".into(), dest: "b".into(), size: 10, done: 5, files_stamp: Some("1:2:3:4.5".into()) };
        cp.store(&p).expect("store");
        assert_eq!(Checkpoint::load(&p).expect("load"), Some(cp.clone()));
        std::fs::write(&p, b"{not json").expect("corrupt");
        assert!(Checkpoint::load(&p).is_err());
        // A version this build does not know is not taken for its own.
        Checkpoint { version: 7, ..cp }.store(&p).expect("store");
        let e = Checkpoint::load(&p).expect_err("version 7");
        assert!(e.to_string().contains("version 7"), "{e}");
    }
}
