//! The io_uring engine: a few rings for the whole process, fed directly by tokio tasks.
//!
//! ```text
//!  tokio task ─lock─▶ push SQE ─unlock─▶ io_uring_enter(submit) ─▶ kernel
//!      ▲                                   │ page-cache hit: completes inside the enter
//!      └── oneshot ◀── reap CQEs (lock) ◀──┤
//!      ▲                                   │ otherwise: the ring's fd polls readable
//!      └── the task's own runtime's reactor┘ (the waiting task reaps)
//!
//!  reaper thread: for waiters outside a tokio runtime with I/O, woken by the ring's fd; else
//!                 asleep on a kick eventfd, sweeping now and then as a safety net
//! ```
//!
//! A read served from the page cache therefore costs no thread hop at all: the submitting task
//! reaps its own completion right after `io_uring_enter` returns. A completion that comes later
//! is of one of two kinds: one an io-wq worker posts (buffered writes on ext4), or one posted
//! through task_work in the submitting thread (a read that missed the page cache, a direct
//! I/O's completion). The ring's fd polls readable for both. A waiting task watches that fd on
//! its own runtime's reactor ([`Ring::watcher`]), so the thread woken for it is the one that
//! runs the task: a cold read at queue depth 1 costs one wake-up. It used to go through the
//! reaper thread, which woke, reaped and then woke the task's thread: 6-7 context switches
//! per cold read at queue depth 1, against 2 now and qemu-nbd's 2. Earlier still, the reaper
//! found task_work completions only at its next timed sweep, so a cold read at queue depth 1
//! waited up to 50 ms (34 reads/s off a disk doing 12 000).
//!
//! The kernel issues a ring's inline work under that ring's `uring_lock`, copy included, so
//! threads sharing one ring serialise (measured: 13% of server time spinning on it while nbdcopy
//! read through two workers). Each thread is therefore assigned a ring of its own, round-robin
//! over one ring per CPU; the buffer pool is registered with every ring, and every file sits at
//! the same fixed-file slot in all of them.
//!
//! Every operation owns what the kernel touches (its buffer and an `Arc` of its file) inside the
//! in-flight table until its CQE is reaped, so cancelling the waiting future is always
//! memory-safe: the buffer is dropped only after the kernel is done with it. Buffers from the
//! registered pool use `READ_FIXED`/`WRITE_FIXED`; files are registered in a sparse table and
//! addressed as fixed files. The submission and completion queues are only touched under
//! `state`'s mutex; `io_uring_enter` runs outside it so inline work on two threads overlaps.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};

use io_uring::{IoUring, Probe, opcode, types};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::sync::oneshot;

use super::buf::{FixedPool, IoBuf};

const RING_ENTRIES: u32 = 256;
/// At most this many operations in the kernel at once, so the completion queue (twice the
/// submission queue) can never overflow; more wait in a backlog.
const MAX_IN_FLIGHT: usize = RING_ENTRIES as usize;
/// Size of the sparse fixed-file table.
const FILE_SLOTS: u32 = 1024;
/// How often the reaper sweeps the completion queue while it watches the ring for waiters, in
/// ms: a safety net under the ring fd's readiness, never the way completions are normally found.
const SWEEP_MS: i32 = 20;
/// How often the reaper sweeps otherwise, in ms (a safety net under the kick and under the
/// waiters' own watch).
const IDLE_SWEEP_MS: i32 = 200;

/// Completions the reaper found only at a timed sweep (nothing had announced them): each cost
/// its operation up to a sweep's wait. For tests, which check that it stays rare.
static SWEPT: AtomicU64 = AtomicU64::new(0);
/// Completions the reaper thread handed out (announced or swept); the rest were reaped by the
/// tasks themselves. For tests.
static REAPER_HANDED: AtomicU64 = AtomicU64::new(0);

/// How many completions so far were found only by a timed sweep.
#[cfg(test)]
pub(crate) fn swept_completions() -> u64 {
    SWEPT.load(Ordering::Relaxed)
}

/// How many completions so far the reaper thread handed out.
#[cfg(test)]
pub(crate) fn reaper_handed_completions() -> u64 {
    REAPER_HANDED.load(Ordering::Relaxed)
}

/// What the kernel does for one submission.
pub(crate) enum Op {
    /// Read into `buf[buf_start..]` from `offset`.
    Read { buf: IoBuf, buf_start: usize, offset: u64 },
    /// Write `buf[start..end]` at `offset`; `dsync` asks for `RWF_DSYNC`.
    Write { buf: Arc<IoBuf>, start: usize, end: usize, offset: u64, dsync: bool },
    /// `fdatasync`.
    SyncData,
    /// `fallocate(mode, offset, len)`.
    Fallocate { mode: i32, offset: u64, len: u64 },
}

/// The file an operation targets: kept alive by the `Arc` until the CQE, addressed through its
/// fixed slot when it has one.
#[derive(Clone)]
pub(crate) struct Target {
    pub file: Arc<File>,
    pub slot: Option<u32>,
}

/// The outcome of one operation: the kernel's result and, for reads, the buffer back.
pub(crate) struct Done {
    pub result: i32,
    pub buf: Option<IoBuf>,
}

struct Queued {
    target: Target,
    op: Op,
    done: oneshot::Sender<Done>,
}

struct InFlight {
    done: oneshot::Sender<Done>,
    _file: Arc<File>,
    read_buf: Option<IoBuf>,
    _write_buf: Option<Arc<IoBuf>>,
}

struct State {
    table: Vec<Option<InFlight>>,
    free_keys: Vec<usize>,
    in_flight: usize,
    backlog: VecDeque<Queued>,
}

/// The process's rings.
pub(crate) struct UringDriver {
    /// One ring per CPU (threads take them in turn), and one more, last, for background threads
    /// only ([`super::serve_background_io`]).
    rings: Vec<Arc<Ring>>,
    /// Free fixed-file slots; a slot means the same file in every ring.
    free_slots: Mutex<Vec<u32>>,
    /// Whether the registered pool is registered with every ring (else fixed ops are not used).
    pub fixed_buffers: bool,
}

impl UringDriver {
    /// The process-wide driver, started on first use, or why io_uring cannot be used here.
    pub fn global() -> Result<&'static Arc<UringDriver>, String> {
        static DRIVER: OnceLock<Result<Arc<UringDriver>, String>> = OnceLock::new();
        DRIVER.get_or_init(|| UringDriver::start().map_err(|e| e.to_string())).as_ref().map_err(Clone::clone)
    }

    fn start() -> io::Result<Arc<UringDriver>> {
        let count = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2).clamp(2, 8);
        let rings = (0..=count).map(|_| Ring::start()).collect::<io::Result<Vec<_>>>()?;
        let fixed_buffers = rings.iter().all(|r| r.fixed_buffers);
        tracing::debug!(rings = rings.len(), fixed_buffers, "io_uring ready");
        Ok(Arc::new(UringDriver { rings, free_slots: Mutex::new((0..FILE_SLOTS).rev().collect()), fixed_buffers }))
    }

    /// This thread's ring: the background ring on a background thread, else one of the others
    /// in turn.
    fn ring(&self) -> &Ring {
        use std::cell::Cell;
        use std::sync::atomic::{AtomicUsize, Ordering};
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        thread_local!(static INDEX: Cell<Option<usize>> = const { Cell::new(None) });
        // `start` makes at least three rings, the last the background one.
        let shared = self.rings.len() - 1;
        if super::BACKGROUND.with(|b| b.get()) {
            return &self.rings[shared];
        }
        let index = INDEX.with(|i| {
            *i.get().get_or_insert_with(|| {
                let n = NEXT.fetch_add(1, Ordering::Relaxed);
                i.set(Some(n));
                n
            })
        });
        &self.rings[index % shared]
    }

    /// Runs `op` on `target` (on this thread's ring) and waits for its completion.
    pub async fn submit(&self, target: Target, op: Op) -> io::Result<Done> {
        self.ring().submit(target, op).await
    }

    /// Puts `file` in the fixed-file table of every ring, at one slot; `None` when the table
    /// is full or a ring refuses (plain descriptors then work).
    pub async fn register_file(&self, file: &File) -> Option<u32> {
        let slot = self.free_slots.lock().ok()?.pop()?;
        for (i, ring) in self.rings.iter().enumerate() {
            if let Err(e) = ring.ring.submitter().register_files_update(slot, &[file.as_raw_fd()]) {
                tracing::debug!(error = %e, "fixed file registration failed");
                for r in &self.rings[..i] {
                    let _ = r.ring.submitter().register_files_update(slot, &[-1 as RawFd]);
                }
                if let Ok(mut f) = self.free_slots.lock() {
                    f.push(slot);
                }
                return None;
            }
        }
        Some(slot)
    }

    /// Frees a fixed-file slot. In-flight operations keep their own reference in the kernel.
    pub fn unregister_file(&self, slot: u32) {
        let all = self.rings.iter().all(|r| r.ring.submitter().register_files_update(slot, &[-1 as RawFd]).is_ok());
        if all && let Ok(mut f) = self.free_slots.lock() {
            f.push(slot);
        }
    }
}

/// One ring, its in-flight table and its reaper thread.
struct Ring {
    ring: IoUring,
    state: Mutex<State>,
    async_completions: OwnedFd,
    /// Written by a waiter the reaper must watch for while the reaper is idle.
    kick: OwnedFd,
    /// The reaper sleeps on `kick` (no waiter needed it when it looked).
    reaper_idle: AtomicBool,
    /// Waiters the reaper watches the ring for: those with no tokio reactor of their own.
    reaper_waiters: AtomicUsize,
    /// The ring's fd registered with the reactor of each runtime whose tasks wait on it, while
    /// any does; one registration per runtime, as epoll takes a descriptor once.
    watchers: Mutex<Vec<(tokio::runtime::Id, Weak<AsyncFd<OwnedFd>>)>>,
    fixed_buffers: bool,
}

/// A waiter counted in [`Ring::reaper_waiters`] until dropped (its operation done, or its
/// future cancelled).
struct ReaperWaiter<'a>(&'a Ring);

impl Drop for ReaperWaiter<'_> {
    fn drop(&mut self) {
        self.0.reaper_waiters.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A new eventfd.
fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: eventfd has no memory-safety preconditions; the result is checked below.
    let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh, valid descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Empties an eventfd (non-blocking: nothing to read is fine).
fn drain(fd: RawFd) {
    let mut count = [0u8; 8];
    // SAFETY: reads 8 bytes into a live local buffer from our own eventfd.
    let _ = unsafe { libc::read(fd, count.as_mut_ptr().cast(), 8) };
}

impl Ring {
    fn start() -> io::Result<Arc<Ring>> {
        let ring = IoUring::builder().build(RING_ENTRIES)?;
        let mut probe = Probe::new();
        ring.submitter().register_probe(&mut probe)?;
        for (code, name) in [
            (opcode::Read::CODE, "READ"),
            (opcode::Write::CODE, "WRITE"),
            (opcode::ReadFixed::CODE, "READ_FIXED"),
            (opcode::WriteFixed::CODE, "WRITE_FIXED"),
            (opcode::Fsync::CODE, "FSYNC"),
            (opcode::Fallocate::CODE, "FALLOCATE"),
        ] {
            if !probe.is_supported(code) {
                return Err(io::Error::new(io::ErrorKind::Unsupported, format!("io_uring lacks {name}")));
            }
        }
        ring.submitter().register_files_sparse(FILE_SLOTS)?;
        let fixed_buffers = match FixedPool::global() {
            Some(pool) => {
                let iovecs = pool.iovecs();
                // SAFETY: the pool's mapping lives for the whole process (a static) and is never
                // unmapped, so the registered memory outlives the ring.
                match unsafe { ring.submitter().register_buffers(&iovecs) } {
                    Ok(()) => true,
                    Err(e) => {
                        tracing::info!(error = %e, "io_uring buffer registration refused; plain READ/WRITE");
                        false
                    }
                }
            }
            None => false,
        };
        let async_completions = eventfd()?;
        ring.submitter().register_eventfd_async(async_completions.as_raw_fd())?;
        let driver = Arc::new(Ring {
            ring,
            state: Mutex::new(State {
                table: Vec::with_capacity(MAX_IN_FLIGHT),
                free_keys: Vec::new(),
                in_flight: 0,
                backlog: VecDeque::new(),
            }),
            async_completions,
            kick: eventfd()?,
            reaper_idle: AtomicBool::new(false),
            reaper_waiters: AtomicUsize::new(0),
            watchers: Mutex::new(Vec::new()),
            fixed_buffers,
        });
        let reaper = Arc::clone(&driver);
        std::thread::Builder::new().name("tapmirror-uring".into()).spawn(move || reaper.reap_async_forever())?;
        Ok(driver)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the queues half-updated in a way that
        // matters more than losing the process's I/O altogether; keep going with the data.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    async fn submit(&self, target: Target, op: Op) -> io::Result<Done> {
        let (tx, mut rx) = oneshot::channel();
        let pushed = {
            let mut st = self.lock();
            st.backlog.push_back(Queued { target, op, done: tx });
            self.pump(&mut st)
        };
        if pushed {
            self.enter_submit();
            // Page-cache hits completed inside the enter: hand them out without a thread hop.
            let _ = self.reap();
        }
        match rx.try_recv() {
            Ok(done) => return Ok(done),
            Err(oneshot::error::TryRecvError::Empty) => {}
            Err(oneshot::error::TryRecvError::Closed) => return Err(io::Error::other("io_uring dropped the operation")),
        }
        if let Some(watch) = self.watcher() {
            loop {
                // `rx` first: another task may have reaped this completion already.
                tokio::select! {
                    biased;
                    done = &mut rx => return done.map_err(|_| io::Error::other("io_uring dropped the operation")),
                    ready = watch.readable() => match ready {
                        Ok(mut ready) => {
                            // Cleared before reaping: a completion posted after the reap
                            // makes the fd ready again.
                            ready.clear_ready();
                            let _ = self.reap();
                        }
                        // The runtime is shutting down: the reaper takes over.
                        Err(e) => {
                            tracing::debug!(error = %e, "io_uring watch lost; waiting through the reaper");
                            break;
                        }
                    },
                }
            }
        }
        let _counted = self.reaper_waiter();
        rx.await.map_err(|_| io::Error::other("io_uring dropped the operation"))
    }

    /// This ring's fd on the current runtime's reactor, registered while any task of that
    /// runtime waits on it. `None` outside a runtime, or in one without I/O.
    fn watcher(&self) -> Option<Arc<AsyncFd<OwnedFd>>> {
        let runtime = tokio::runtime::Handle::try_current().ok()?.id();
        let mut watchers = self.watchers.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        watchers.retain(|(_, w)| w.strong_count() > 0);
        if let Some(watch) = watchers.iter().find(|(id, _)| *id == runtime).and_then(|(_, w)| w.upgrade()) {
            return Some(watch);
        }
        // A descriptor of its own: the registration goes with it, and never with the ring's.
        // SAFETY: the ring's fd is open for as long as `self` lives, which spans this borrow.
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(self.ring.as_raw_fd()) }.try_clone_to_owned().ok()?;
        // SAFETY: the `AsyncFd` owns `fd`, which stays open and the same until it is dropped.
        match unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) } {
            Ok(watch) => {
                let watch = Arc::new(watch);
                watchers.push((runtime, Arc::downgrade(&watch)));
                Some(watch)
            }
            Err(e) => {
                tracing::trace!(error = %e.into_parts().1, "no reactor to watch io_uring on");
                None
            }
        }
    }

    /// Counts a waiter the reaper must watch the ring for, waking the reaper if it is idle.
    /// (The reaper marks itself idle before it last looks at the count, and this waiter is
    /// counted before this swap, so either it saw the waiter or this sees it idle.)
    fn reaper_waiter(&self) -> ReaperWaiter<'_> {
        self.reaper_waiters.fetch_add(1, Ordering::SeqCst);
        if self.reaper_idle.swap(false, Ordering::SeqCst) {
            let one = 1u64.to_ne_bytes();
            // SAFETY: writes 8 bytes from a live local buffer to our own eventfd.
            let _ = unsafe { libc::write(self.kick.as_raw_fd(), one.as_ptr().cast(), 8) };
        }
        ReaperWaiter(self)
    }

    /// Moves backlog entries into the submission queue while there is room. Returns whether
    /// anything was pushed (and so needs an `io_uring_enter`).
    fn pump(&self, st: &mut State) -> bool {
        let mut pushed = false;
        // SAFETY: the submission queue is only ever accessed under `state`'s mutex, which the
        // caller holds through `st`.
        let mut sq = unsafe { self.ring.submission_shared() };
        while st.in_flight < MAX_IN_FLIGHT && !sq.is_full() {
            let Some(q) = st.backlog.pop_front() else { break };
            let key = st.free_keys.pop().unwrap_or_else(|| {
                st.table.push(None);
                st.table.len() - 1
            });
            let (entry, flight) = self.prepare(key as u64, &q.target, q.op, q.done);
            // SAFETY: everything the entry points at (buffer, file) is owned by `flight`,
            // stored in the table until this key's CQE is reaped; `is_full` was checked.
            if unsafe { sq.push(&entry) }.is_err() {
                let _ = flight.done.send(Done { result: -libc::EAGAIN, buf: flight.read_buf });
                st.free_keys.push(key);
                break;
            }
            st.table[key] = Some(flight);
            st.in_flight += 1;
            pushed = true;
        }
        pushed
    }

    fn enter_submit(&self) {
        loop {
            match self.ring.submit() {
                Ok(_) => return,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                // EBUSY/EAGAIN: the kernel is short of resources or completions must be reaped
                // first; the entries stay queued and the next enter submits them.
                Err(e) => {
                    tracing::debug!(error = %e, "io_uring submit deferred");
                    return;
                }
            }
        }
    }

    /// Hands out every available completion and refills the ring from the backlog; returns how
    /// many completions it handed out.
    fn reap(&self) -> usize {
        let mut handed = 0;
        let pushed = {
            let mut st = self.lock();
            // SAFETY: the completion queue is only ever accessed under `state`'s mutex.
            let cq = unsafe { self.ring.completion_shared() };
            for cqe in cq {
                let Some(slot) = usize::try_from(cqe.user_data()).ok().and_then(|k| st.table.get_mut(k)) else {
                    continue;
                };
                if let Some(flight) = slot.take() {
                    st.in_flight -= 1;
                    st.free_keys.push(cqe.user_data() as usize);
                    let _ = flight.done.send(Done { result: cqe.result(), buf: flight.read_buf });
                    handed += 1;
                }
            }
            !st.backlog.is_empty() && self.pump(&mut st)
        };
        if pushed {
            self.enter_submit();
        }
        handed
    }

    fn reap_async_forever(self: Arc<Self>) {
        let (ring_fd, async_fd, kick_fd) = (self.ring.as_raw_fd(), self.async_completions.as_raw_fd(), self.kick.as_raw_fd());
        loop {
            // While a waiter with no reactor of its own waits, the ring fd is readable as soon
            // as a completion is posted, whoever posts it. Otherwise the ring fd would wake this
            // thread for completions the submitters and the waiters' reactors take care of:
            // it sleeps on the kick instead, marked idle first, then looking at the count once
            // more (see `reaper_waiter` for the other half). Both waits are bounded: a lost
            // wake-up of any kind costs a sweep, never a hung request.
            let mut busy = self.reaper_waiters.load(Ordering::SeqCst) > 0;
            if !busy {
                self.reaper_idle.store(true, Ordering::SeqCst);
                busy = self.reaper_waiters.load(Ordering::SeqCst) > 0;
                if busy {
                    self.reaper_idle.store(false, Ordering::SeqCst);
                }
            }
            let (watch, timeout) = if busy { (ring_fd, SWEEP_MS) } else { (kick_fd, IDLE_SWEEP_MS) };
            let mut fds = [
                libc::pollfd { fd: watch, events: libc::POLLIN, revents: 0 },
                libc::pollfd { fd: async_fd, events: libc::POLLIN, revents: 0 },
            ];
            // Idle, the async eventfd is left to the waiters' reactors too (it announces
            // nothing the ring fd does not).
            let watched = if busy { 2 } else { 1 };
            // SAFETY: polls live pollfds on our own descriptors.
            let ready = unsafe { libc::poll(fds.as_mut_ptr(), watched, timeout) };
            if ready < 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
                tracing::error!(error = %io::Error::last_os_error(), "polling the io_uring completions failed");
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            if !busy {
                self.reaper_idle.store(false, Ordering::SeqCst);
                drain(kick_fd);
            }
            drain(async_fd);
            if ready == 0 {
                // Also submit anything an earlier io_uring_enter left queued (EBUSY, EAGAIN):
                // at queue depth 1 nothing else would.
                self.enter_submit();
            }
            let handed = self.reap();
            REAPER_HANDED.fetch_add(handed as u64, Ordering::Relaxed);
            if ready == 0 && handed > 0 {
                SWEPT.fetch_add(handed as u64, Ordering::Relaxed);
                tracing::debug!(completions = handed, "sweep reaped completions nothing announced");
            }
        }
    }

    fn prepare(
        &self,
        key: u64,
        target: &Target,
        op: Op,
        done: oneshot::Sender<Done>,
    ) -> (io_uring::squeue::Entry, InFlight) {
        let raw_fd = types::Fd(target.file.as_raw_fd());
        let mut flight = InFlight { done, _file: Arc::clone(&target.file), read_buf: None, _write_buf: None };
        macro_rules! with_fd {
            ($build:expr) => {
                match target.slot {
                    Some(s) => $build(types::Fixed(s)),
                    None => $build(raw_fd),
                }
            };
        }
        let entry = match op {
            Op::Read { mut buf, buf_start, offset } => {
                let start = buf_start.min(buf.len());
                // Lengths are bounded by the 32 MiB request limit (or a registered slot).
                let len = u32::try_from(buf.len() - start).unwrap_or(u32::MAX);
                let ptr = buf[start..].as_mut_ptr();
                let e = match (self.fixed_buffers, buf.fixed_index()) {
                    (true, Some(idx)) => {
                        with_fd!(|fd| opcode::ReadFixed::new(fd, ptr, len, idx).offset(offset).build())
                    }
                    _ => with_fd!(|fd| opcode::Read::new(fd, ptr, len).offset(offset).build()),
                };
                flight.read_buf = Some(buf);
                e
            }
            Op::Write { buf, start, end, offset, dsync } => {
                let end = end.min(buf.len());
                let start = start.min(end);
                let len = u32::try_from(end - start).unwrap_or(u32::MAX);
                let ptr = buf[start..end].as_ptr();
                let flags = if dsync { libc::RWF_DSYNC } else { 0 };
                let e = match (self.fixed_buffers, buf.fixed_index()) {
                    (true, Some(idx)) => with_fd!(|fd| opcode::WriteFixed::new(fd, ptr, len, idx)
                        .offset(offset)
                        .rw_flags(flags)
                        .build()),
                    _ => with_fd!(|fd| opcode::Write::new(fd, ptr, len).offset(offset).rw_flags(flags).build()),
                };
                flight._write_buf = Some(buf);
                e
            }
            Op::SyncData => {
                with_fd!(|fd| opcode::Fsync::new(fd).flags(types::FsyncFlags::DATASYNC).build())
            }
            Op::Fallocate { mode, offset, len } => {
                with_fd!(|fd| opcode::Fallocate::new(fd, len).offset(offset).mode(mode).build())
            }
        };
        (entry.user_data(key), flight)
    }
}
