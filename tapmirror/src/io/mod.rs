//! File I/O for image drivers: io_uring when the kernel allows it, a portable thread-pool path
//! when it does not.
//!
//! The engine is chosen once per process (probe, cache, log the choice) and can be forced with
//! `TAPMIRROR_IO_ENGINE=uring|portable` or `tapmirror serve --io-engine`, so both paths are
//! testable on one machine. `kernel.io_uring_disabled` and container seccomp profiles are the
//! usual reasons io_uring is refused.

mod buf;
mod uring;

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicUsize, Ordering as AtomicOrdering};
use std::sync::{Arc, OnceLock};

pub use buf::{FixedPool, IoBuf, SLOT_COUNT, SLOT_SIZE};
use uring::{Op, Target, UringDriver};

/// Which implementation moves bytes between buffers and files.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    /// io_uring with registered buffers and fixed files.
    Uring,
    /// `pread`/`pwrite`/`fdatasync`/`fallocate` on tokio's blocking pool.
    Portable,
}

/// What the caller asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum EngineChoice {
    /// io_uring when the probe succeeds, else portable.
    #[default]
    Auto,
    /// io_uring or fail.
    Uring,
    /// Always portable.
    Portable,
}

impl EngineChoice {
    /// The choice from `TAPMIRROR_IO_ENGINE`, defaulting to `Auto`.
    pub fn from_env() -> EngineChoice {
        match std::env::var("TAPMIRROR_IO_ENGINE").as_deref() {
            Ok("uring") => EngineChoice::Uring,
            Ok("portable") => EngineChoice::Portable,
            _ => EngineChoice::Auto,
        }
    }

    /// Resolves the choice against this kernel.
    pub fn resolve(self) -> io::Result<EngineKind> {
        match self {
            EngineChoice::Portable => Ok(EngineKind::Portable),
            EngineChoice::Uring => UringDriver::global()
                .map(|_| EngineKind::Uring)
                .map_err(|e| io::Error::new(io::ErrorKind::Unsupported, format!("io_uring unavailable: {e}"))),
            EngineChoice::Auto => Ok(auto_engine()),
        }
    }
}

fn auto_engine() -> EngineKind {
    static CHOICE: OnceLock<EngineKind> = OnceLock::new();
    *CHOICE.get_or_init(|| match UringDriver::global() {
        Ok(_) => EngineKind::Uring,
        Err(e) => {
            tracing::info!(reason = %e, "io_uring unavailable, using the portable I/O engine");
            EngineKind::Portable
        }
    })
}

/// Largest write done by `pwrite` on the calling thread (see [`FileIo::write_inline`]).
pub const INLINE_WRITE_MAX: usize = 64 << 10;

/// Threads inside an inline `pwrite` right now, and how many may be at once: all CPUs but
/// one, so a write that blocks (dirty-page throttling can sleep for a while) never holds every
/// runtime worker; the rest take the engine's way meanwhile.
static INLINE_ACTIVE: AtomicUsize = AtomicUsize::new(0);
fn inline_max() -> usize {
    static MAX: OnceLock<usize> = OnceLock::new();
    *MAX.get_or_init(|| std::thread::available_parallelism().map(|n| n.get().saturating_sub(1)).unwrap_or(1).max(1))
}

thread_local!(static BACKGROUND: std::cell::Cell<bool> = const { std::cell::Cell::new(false) });

/// Marks the calling thread as doing background I/O (a full mirror's pass): its io_uring
/// operations go to a ring of their own. A read that the page cache holds completes inside the
/// `io_uring_enter` that submits it, copying all its bytes while the kernel holds that ring's
/// submission lock; a 1 MiB read of the pass would hold up any guest write submitted to the same
/// ring meanwhile (measured: the steady guest's p90 latency doubled under a pass capped at
/// 50 MB/s, and came back with a ring apart).
pub fn serve_background_io() {
    BACKGROUND.with(|b| b.set(true));
}

/// How durable a write must be when it completes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// In the page cache is enough; a later flush makes it durable.
    Cached,
    /// On stable storage before completion (NBD's FUA).
    Stable,
}

/// `fallocate` modes we use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fallocate {
    /// Deallocate the range; it reads as zeroes. The file size is kept.
    PunchHole,
    /// Make the range read as zeroes and stay allocated.
    ZeroRange,
}

impl Fallocate {
    fn mode(self) -> i32 {
        match self {
            Fallocate::PunchHole => libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            Fallocate::ZeroRange => libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
        }
    }
}

/// A file opened for one of the engines.
pub struct FileIo {
    target: Target,
    kind: EngineKind,
}

impl FileIo {
    /// Wraps `file` for `kind`, registering it as a fixed file on io_uring.
    pub async fn new(file: File, kind: EngineKind) -> io::Result<FileIo> {
        let file = Arc::new(file);
        let slot = match kind {
            EngineKind::Uring => {
                let driver = UringDriver::global().map_err(io::Error::other)?;
                driver.register_file(&file).await
            }
            EngineKind::Portable => None,
        };
        Ok(FileIo { target: Target { file, slot }, kind })
    }

    /// The engine this file uses.
    pub fn kind(&self) -> EngineKind {
        self.kind
    }

    /// The underlying file (for metadata calls such as `lseek(SEEK_DATA)`).
    pub fn file(&self) -> &File {
        &self.target.file
    }

    /// Whether reads and writes use registered buffers (io_uring with the pool registered).
    pub fn uses_fixed_buffers(&self) -> bool {
        self.kind == EngineKind::Uring && UringDriver::global().map(|d| d.fixed_buffers).unwrap_or(false)
    }

    /// Fills all of `buf` from `offset`. Hitting end of file is an error (`UnexpectedEof`).
    pub async fn read_exact_at(&self, buf: IoBuf, offset: u64) -> (IoBuf, io::Result<()>) {
        match self.kind {
            EngineKind::Portable => {
                let file = Arc::clone(&self.target.file);
                let mut buf = buf;
                match tokio::task::spawn_blocking(move || {
                    let r = file.read_exact_at(&mut buf, offset);
                    (buf, r)
                })
                .await
                {
                    Ok(out) => out,
                    Err(e) => (IoBuf::new(0), Err(io::Error::other(e))),
                }
            }
            EngineKind::Uring => {
                let Ok(driver) = UringDriver::global() else {
                    return (buf, Err(io::Error::other("io_uring driver gone")));
                };
                let mut buf = buf;
                let mut done = 0usize;
                while done < buf.len() {
                    let op = Op::Read { buf, buf_start: done, offset: offset + done as u64 };
                    let out = match driver.submit(self.target.clone(), op).await {
                        Ok(out) => out,
                        Err(e) => return (IoBuf::new(0), Err(e)),
                    };
                    buf = match out.buf {
                        Some(b) => b,
                        None => return (IoBuf::new(0), Err(io::Error::other("read buffer lost"))),
                    };
                    match out.result {
                        n if n == -libc::EINTR || n == -libc::EAGAIN => continue,
                        n if n < 0 => return (buf, Err(io::Error::from_raw_os_error(-n))),
                        0 => return (buf, Err(io::ErrorKind::UnexpectedEof.into())),
                        n => done += n as usize,
                    }
                }
                (buf, Ok(()))
            }
        }
    }

    /// Writes `buf[range]` at `offset`.
    pub async fn write_all_at(
        &self,
        buf: &Arc<IoBuf>,
        range: std::ops::Range<usize>,
        offset: u64,
        durability: Durability,
    ) -> io::Result<()> {
        if range.end > buf.len() || range.start > range.end {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "write range outside its buffer"));
        }
        if durability == Durability::Cached
            && let Some(r) = self.write_inline(&buf[range.clone()], offset)
        {
            return r;
        }
        match self.kind {
            EngineKind::Portable => {
                let file = Arc::clone(&self.target.file);
                let buf = Arc::clone(buf);
                tokio::task::spawn_blocking(move || {
                    file.write_all_at(&buf[range], offset)?;
                    if durability == Durability::Stable {
                        file.sync_data()?;
                    }
                    Ok(())
                })
                .await
                .map_err(io::Error::other)?
            }
            EngineKind::Uring => {
                let driver = UringDriver::global().map_err(io::Error::other)?;
                let mut start = range.start;
                while start < range.end {
                    let op = Op::Write {
                        buf: Arc::clone(buf),
                        start,
                        end: range.end,
                        offset: offset + (start - range.start) as u64,
                        dsync: durability == Durability::Stable,
                    };
                    match driver.submit(self.target.clone(), op).await?.result {
                        n if n == -libc::EINTR || n == -libc::EAGAIN => continue,
                        n if n < 0 => return Err(io::Error::from_raw_os_error(-n)),
                        0 => return Err(io::ErrorKind::WriteZero.into()),
                        n => start += n as usize,
                    }
                }
                Ok(())
            }
        }
    }

    /// Writes `data` at `offset` with `pwrite` on the calling thread, if it is small enough
    /// and not too many threads are inside such a write already; `None` when not done.
    ///
    /// A small page-cache write takes a few microseconds of CPU; either engine's way costs
    /// more in thread hand-offs (ext4 cannot write buffered without blocking, so io_uring
    /// punts every such write to a worker thread, whose completion then wakes a reaper, which
    /// wakes the task). Measured with fio over NBD: QD1 4 KiB writes 9.4 µs instead of 15.8
    /// (p99 13.9 instead of 34.8), QD16 about 1.4x the IOPS. It is also done once it returns:
    /// nothing of it outlives the call, which the engines' writes do when their future is
    /// dropped.
    pub fn write_inline(&self, data: &[u8], offset: u64) -> Option<io::Result<()>> {
        if data.len() > INLINE_WRITE_MAX {
            return None;
        }
        let r = (INLINE_ACTIVE.fetch_add(1, AtomicOrdering::AcqRel) < inline_max()).then(|| self.target.file.write_all_at(data, offset));
        INLINE_ACTIVE.fetch_sub(1, AtomicOrdering::AcqRel);
        r
    }

    /// `fdatasync`: every completed write is on stable storage afterwards.
    pub async fn sync_data(&self) -> io::Result<()> {
        match self.kind {
            EngineKind::Portable => {
                let file = Arc::clone(&self.target.file);
                tokio::task::spawn_blocking(move || file.sync_data()).await.map_err(io::Error::other)?
            }
            EngineKind::Uring => {
                let driver = UringDriver::global().map_err(io::Error::other)?;
                errno_result(driver.submit(self.target.clone(), Op::SyncData).await?.result)
            }
        }
    }

    /// `fallocate` with `mode` over `[offset, offset + len)`. `Unsupported` when the file system
    /// does not implement the mode (callers fall back to writing zeroes).
    pub async fn fallocate(&self, mode: Fallocate, offset: u64, len: u64) -> io::Result<()> {
        let r = match self.kind {
            EngineKind::Portable => {
                let file = Arc::clone(&self.target.file);
                tokio::task::spawn_blocking(move || {
                    let (Ok(off), Ok(l)) = (i64::try_from(offset), i64::try_from(len)) else {
                        return Err(io::Error::from_raw_os_error(libc::EINVAL));
                    };
                    // SAFETY: plain syscall on a descriptor kept open by the `Arc<File>`.
                    let rc = unsafe { libc::fallocate(file.as_raw_fd(), mode.mode(), off, l) };
                    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
                })
                .await
                .map_err(io::Error::other)?
            }
            EngineKind::Uring => {
                let driver = UringDriver::global().map_err(io::Error::other)?;
                let op = Op::Fallocate { mode: mode.mode(), offset, len };
                errno_result(driver.submit(self.target.clone(), op).await?.result)
            }
        };
        r.map_err(|e| match e.raw_os_error() {
            Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) => io::Error::new(io::ErrorKind::Unsupported, e),
            _ => e,
        })
    }
}

impl Drop for FileIo {
    fn drop(&mut self) {
        if let (Some(slot), Ok(driver)) = (self.target.slot, UringDriver::global()) {
            driver.unregister_file(slot);
        }
    }
}

fn errno_result(r: i32) -> io::Result<()> {
    if r < 0 { Err(io::Error::from_raw_os_error(-r)) } else { Ok(()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn engines() -> Vec<EngineKind> {
        let mut v = vec![EngineKind::Portable];
        if EngineChoice::Uring.resolve().is_ok() {
            v.push(EngineKind::Uring);
        }
        v
    }

    /// Reads the page cache does not hold complete through task_work in the submitting
    /// thread, which no eventfd announces; the reaper must find them by the ring's readiness,
    /// not at its next timed sweep (which once cost each cold read at queue depth 1 up to
    /// 50 ms). Counted, not timed: sweeps must find almost none of them. On a file system whose
    /// pages cannot be dropped (tmpfs) every read completes inline, and none is swept either.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reads_that_miss_the_page_cache_are_found_without_a_sweep() {
        if EngineChoice::Uring.resolve().is_err() {
            eprintln!("skipping: no io_uring here");
            return;
        }
        let (f, data) = cold_file();
        let io = FileIo::new(f, EngineKind::Uring).await.expect("open");
        let before = uring::swept_completions();
        const READS: u64 = 60;
        read_spread(&io, &data, READS).await;
        let swept = uring::swept_completions() - before;
        assert!(swept < READS / 4, "{swept} of {READS} cold reads were found only by a timed sweep");
    }

    /// A 32 MiB file on the disk file system holding a known pattern, its pages dropped.
    fn cold_file() -> (std::fs::File, Vec<u8>) {
        use std::os::fd::AsRawFd;
        let f = tempfile::tempfile_in("/var/tmp").or_else(|_| tempfile::tempfile()).expect("tempfile");
        let data: Vec<u8> = (0..32usize << 20).map(|i| (i * 7 % 251) as u8).collect();
        std::os::unix::fs::FileExt::write_all_at(&f, &data, 0).expect("write");
        f.sync_all().expect("sync");
        // SAFETY: advises on a live descriptor; no memory is involved.
        unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        (f, data)
    }

    /// Reads `count` 4 KiB blocks spread over `data`'s file, one at a time, as a guest at queue
    /// depth 1, checking each.
    async fn read_spread(io: &FileIo, data: &[u8], count: u64) {
        for i in 0..count {
            let at = (i * 7919 % (data.len() as u64 / 4096)) * 4096;
            let (b, r) = io.read_exact_at(IoBuf::new(4096), at).await;
            r.expect("read");
            assert_eq!(&b[..], &data[at as usize..at as usize + 4096], "read at {at}");
        }
    }

    /// Polls `f` to completion on this thread, outside any tokio runtime.
    fn block_on_outside_tokio<F: std::future::Future>(f: F) -> F::Output {
        struct Unpark(std::thread::Thread);
        impl std::task::Wake for Unpark {
            fn wake(self: Arc<Self>) {
                self.0.unpark();
            }
        }
        let waker = std::task::Waker::from(Arc::new(Unpark(std::thread::current())));
        let mut cx = std::task::Context::from_waker(&waker);
        let mut f = std::pin::pin!(f);
        loop {
            if let std::task::Poll::Ready(v) = f.as_mut().poll(&mut cx) {
                return v;
            }
            std::thread::park();
        }
    }

    /// A cold read's completion wakes the thread that runs its task, through the task's own
    /// runtime, rather than a reaper thread that then wakes the task's (two wake-ups more per
    /// read; qemu-nbd's cold reads at queue depth 1 took 0.69× our time). Outside a runtime
    /// the reaper still watches for them. Counted, not timed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cold_reads_wake_their_own_task_and_outside_tokio_the_reaper() {
        if EngineChoice::Uring.resolve().is_err() {
            eprintln!("skipping: no io_uring here");
            return;
        }
        const READS: u64 = 60;
        let (f, data) = cold_file();
        let io = Arc::new(FileIo::new(f, EngineKind::Uring).await.expect("open"));
        let before = uring::reaper_handed_completions();
        read_spread(&io, &data, READS).await;
        let handed = uring::reaper_handed_completions() - before;
        assert!(handed < READS / 4, "the reaper thread handed out {handed} of {READS} cold reads in a runtime");

        let (f, data) = cold_file();
        let io = Arc::new(FileIo::new(f, EngineKind::Uring).await.expect("open"));
        let (before_swept, before_handed) = (uring::swept_completions(), uring::reaper_handed_completions());
        let reader = std::thread::spawn(move || block_on_outside_tokio(read_spread(&io, &data, READS)));
        tokio::task::spawn_blocking(move || reader.join()).await.expect("join").expect("reads outside tokio");
        let swept = uring::swept_completions() - before_swept;
        let handed = uring::reaper_handed_completions() - before_handed;
        assert!(swept < READS / 4, "{swept} of {READS} cold reads outside tokio were found only by a timed sweep");
        assert!(handed > 0, "outside tokio, no cold read went through the reaper thread (were any cold?)");
    }

    #[tokio::test]
    async fn every_engine_writes_reads_syncs_and_punches() {
        for kind in engines().await {
            let f = tempfile::tempfile().expect("tempfile");
            f.set_len(1 << 20).expect("set_len");
            let io = FileIo::new(f, kind).await.expect("open");
            // A registered-slot write and a heap write larger than one slot.
            for len in [4096usize, SLOT_SIZE + 4096] {
                let mut b = IoBuf::new(len);
                for (i, x) in b.iter_mut().enumerate() {
                    *x = (i % 251) as u8;
                }
                let b = Arc::new(b);
                io.write_all_at(&b, 0..len, 8192, Durability::Stable).await.expect("write");
                let (r, res) = io.read_exact_at(IoBuf::new(len), 8192).await;
                res.expect("read");
                assert_eq!(&r[..], &b[..], "{kind:?} round trip of {len} bytes");
            }
            io.sync_data().await.expect("sync");
            match io.fallocate(Fallocate::PunchHole, 8192, 4096).await {
                Ok(()) => {
                    let (r, res) = io.read_exact_at(IoBuf::new(4096), 8192).await;
                    res.expect("read");
                    assert!(r.iter().all(|&x| x == 0), "{kind:?}: punched range reads as zero");
                }
                Err(e) => assert_eq!(e.kind(), io::ErrorKind::Unsupported),
            }
            let (_, res) = io.read_exact_at(IoBuf::new(4096), (1 << 20) - 1024).await;
            assert_eq!(res.expect_err("past end").kind(), io::ErrorKind::UnexpectedEof, "{kind:?}");
        }
    }

    /// Many small cached writes at once, more than may go inline, mixed with writes too large
    /// to: some take `pwrite` on the calling thread, the rest the engine, and every byte must
    /// land where it was sent whichever way it went.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_small_and_large_writes_all_land_on_every_engine() {
        const SMALL: usize = 4096;
        const LARGE: usize = INLINE_WRITE_MAX + SMALL;
        for kind in engines().await {
            let io = Arc::new(FileIo::new(tempfile::tempfile().expect("tempfile"), kind).await.expect("open"));
            let mut writes = tokio::task::JoinSet::new();
            // 64 small writes, then 4 large ones, each its own byte value, none overlapping.
            for i in 0..68usize {
                let (len, offset) = if i < 64 { (SMALL, i * SMALL) } else { (LARGE, 64 * SMALL + (i - 64) * LARGE) };
                let io = Arc::clone(&io);
                writes.spawn(async move {
                    let b = Arc::new(IoBuf::from_vec(vec![i as u8 + 1; len]));
                    io.write_all_at(&b, 0..len, offset as u64, Durability::Cached).await.map(|()| (offset, len, i as u8 + 1))
                });
            }
            while let Some(done) = writes.join_next().await {
                let (offset, len, value) = done.expect("task").expect("write");
                let (r, res) = io.read_exact_at(IoBuf::new(len), offset as u64).await;
                res.expect("read back");
                assert!(r.iter().all(|&x| x == value), "{kind:?}: write of {len} bytes at {offset} came back different");
            }
        }
    }

    #[tokio::test]
    async fn uring_is_chosen_where_the_kernel_allows_it() {
        if let Ok(kind) = EngineChoice::Uring.resolve() {
            assert_eq!(kind, EngineKind::Uring);
            assert_eq!(EngineChoice::Auto.resolve().ok(), Some(EngineKind::Uring));
        }
        assert_eq!(EngineChoice::Portable.resolve().ok(), Some(EngineKind::Portable));
    }
}
