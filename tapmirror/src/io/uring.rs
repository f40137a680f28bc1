//! The io_uring engine: one worker thread owns one ring for the whole process.
//!
//! ```text
//!  tokio tasks ──Submission──▶ queue (mutex) ──▶ worker thread ──SQE──▶ kernel
//!       ▲                        │ eventfd write when the worker sleeps      │
//!       └──────── oneshot ◀── completion table (slab keyed by user_data) ◀─CQE
//! ```
//!
//! Every operation owns what the kernel touches (its buffer and an `Arc` of its file) inside the
//! worker's in-flight table until its CQE arrives, so cancelling the waiting future is always
//! memory-safe: the buffer is simply dropped after the kernel is done with it. Buffers from the
//! registered pool use `READ_FIXED`/`WRITE_FIXED`; files are registered in a sparse table and
//! addressed as fixed files. The worker waits for completions and for new work in one
//! `io_uring_enter`, because a read of the wake-up eventfd is itself armed in the ring.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use io_uring::{IoUring, Probe, opcode, types};
use tokio::sync::oneshot;

use super::buf::{FixedPool, IoBuf};

const RING_ENTRIES: u32 = 256;
/// At most this many operations in the kernel at once, so the completion queue (twice the
/// submission queue) can never overflow.
const MAX_IN_FLIGHT: usize = RING_ENTRIES as usize;
/// Size of the sparse fixed-file table.
const FILE_SLOTS: u32 = 1024;
const WAKE_TOKEN: u64 = u64::MAX;

/// What the worker does for one submission.
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

enum Submission {
    Io { target: Target, op: Op, done: oneshot::Sender<Done> },
    RegisterFile { fd: RawFd, done: oneshot::Sender<Option<u32>> },
    UnregisterFile { slot: u32 },
}

struct InFlight {
    done: oneshot::Sender<Done>,
    _file: Arc<File>,
    read_buf: Option<IoBuf>,
    _write_buf: Option<Arc<IoBuf>>,
}

/// Handle to the process's io_uring worker.
pub(crate) struct UringDriver {
    queue: Mutex<VecDeque<Submission>>,
    sleeping: AtomicBool,
    wake: OwnedFd,
    /// Whether the registered pool is registered with the ring (else fixed ops are not used).
    pub fixed_buffers: bool,
}

impl UringDriver {
    /// The process-wide driver, started on first use, or why io_uring cannot be used here.
    pub fn global() -> Result<&'static Arc<UringDriver>, String> {
        static DRIVER: OnceLock<Result<Arc<UringDriver>, String>> = OnceLock::new();
        DRIVER.get_or_init(|| UringDriver::start().map_err(|e| e.to_string())).as_ref().map_err(Clone::clone)
    }

    fn start() -> io::Result<Arc<UringDriver>> {
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
        // SAFETY: eventfd has no memory-safety preconditions; the result is checked below.
        let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh, valid descriptor that nothing else owns.
        let wake = unsafe { OwnedFd::from_raw_fd(raw) };
        let driver = Arc::new(UringDriver {
            queue: Mutex::new(VecDeque::new()),
            sleeping: AtomicBool::new(false),
            wake,
            fixed_buffers,
        });
        let worker = Arc::clone(&driver);
        std::thread::Builder::new().name("tapmirror-uring".into()).spawn(move || worker.run(ring))?;
        tracing::debug!(fixed_buffers, "io_uring worker started");
        Ok(driver)
    }

    fn enqueue(&self, s: Submission) -> io::Result<()> {
        self.queue.lock().map_err(|_| io::Error::other("io_uring queue poisoned"))?.push_back(s);
        if self.sleeping.swap(false, Ordering::SeqCst) {
            let one: u64 = 1;
            // SAFETY: writes 8 bytes from a live u64 to our own eventfd.
            let n = unsafe { libc::write(self.wake.as_raw_fd(), (&raw const one).cast(), 8) };
            if n != 8 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    }

    /// Runs `op` on `target` and waits for its completion.
    pub async fn submit(&self, target: Target, op: Op) -> io::Result<Done> {
        let (tx, rx) = oneshot::channel();
        self.enqueue(Submission::Io { target, op, done: tx })?;
        rx.await.map_err(|_| io::Error::other("io_uring worker dropped the operation"))
    }

    /// Puts `file` in the fixed-file table; `None` when the table is full (plain fds then work).
    pub async fn register_file(&self, file: &File) -> Option<u32> {
        let (tx, rx) = oneshot::channel();
        self.enqueue(Submission::RegisterFile { fd: file.as_raw_fd(), done: tx }).ok()?;
        rx.await.ok().flatten()
    }

    /// Frees a fixed-file slot. In-flight operations keep their own reference in the kernel.
    pub fn unregister_file(&self, slot: u32) {
        let _ = self.enqueue(Submission::UnregisterFile { slot });
    }

    fn run(self: Arc<Self>, mut ring: IoUring) {
        let mut table: Vec<Option<InFlight>> = Vec::with_capacity(MAX_IN_FLIGHT);
        let mut free_keys: Vec<usize> = Vec::new();
        let mut in_flight = 0usize;
        let mut backlog: VecDeque<Submission> = VecDeque::new();
        let mut free_slots: Vec<u32> = (0..FILE_SLOTS).rev().collect();
        let mut wake_buf: Box<u64> = Box::new(0);
        let mut wake_armed = false;

        loop {
            if !wake_armed {
                let e = opcode::Read::new(types::Fd(self.wake.as_raw_fd()), (&raw mut *wake_buf).cast(), 8)
                    .build()
                    .user_data(WAKE_TOKEN);
                // SAFETY: `wake_buf` is boxed and lives as long as this loop, which outlives the op.
                if unsafe { ring.submission().push(&e) }.is_ok() {
                    wake_armed = true;
                }
            }
            if let Ok(mut q) = self.queue.lock() {
                backlog.extend(q.drain(..));
            }
            while in_flight < MAX_IN_FLIGHT {
                let Some(sub) = backlog.pop_front() else { break };
                match sub {
                    Submission::RegisterFile { fd, done } => {
                        let slot = free_slots.pop();
                        let registered = slot.and_then(|s| match ring.submitter().register_files_update(s, &[fd]) {
                            Ok(_) => Some(s),
                            Err(e) => {
                                free_slots.push(s);
                                tracing::debug!(error = %e, "fixed file registration failed");
                                None
                            }
                        });
                        let _ = done.send(registered);
                    }
                    Submission::UnregisterFile { slot } => {
                        if ring.submitter().register_files_update(slot, &[-1]).is_ok() {
                            free_slots.push(slot);
                        }
                    }
                    Submission::Io { target, op, done } => {
                        let key = free_keys.pop().unwrap_or_else(|| {
                            table.push(None);
                            table.len() - 1
                        });
                        let (entry, flight) = self.prepare(key as u64, &target, op, done);
                        if ring.submission().is_full() {
                            let _ = ring.submit();
                        }
                        // SAFETY: everything the entry points at (buffer, file) is owned by
                        // `flight`, stored in `table` until this key's CQE is reaped.
                        match unsafe { ring.submission().push(&entry) } {
                            Ok(()) => {
                                table[key] = Some(flight);
                                in_flight += 1;
                            }
                            Err(_) => {
                                // Cannot happen after the submit above freed the queue; fail the
                                // op rather than lose it.
                                let _ = flight.done.send(Done { result: -libc::EAGAIN, buf: flight.read_buf });
                                free_keys.push(key);
                            }
                        }
                    }
                }
            }

            let must_wait = in_flight > 0 || wake_armed;
            let queued = self.queue.lock().map(|q| !q.is_empty()).unwrap_or(false);
            let result = if backlog.is_empty() && !queued && must_wait {
                self.sleeping.store(true, Ordering::SeqCst);
                // Re-check after announcing sleep: a submitter that enqueued before seeing the
                // flag would not have written the eventfd.
                let queued = self.queue.lock().map(|q| !q.is_empty()).unwrap_or(false);
                if queued {
                    self.sleeping.store(false, Ordering::SeqCst);
                    ring.submit()
                } else {
                    ring.submit_and_wait(1)
                }
            } else if !backlog.is_empty() {
                ring.submit_and_wait(1)
            } else {
                ring.submit()
            };
            if let Err(e) = result
                && e.raw_os_error() != Some(libc::EINTR)
                && e.raw_os_error() != Some(libc::EBUSY)
            {
                tracing::error!(error = %e, "io_uring_enter failed");
            }

            for cqe in ring.completion() {
                let key = cqe.user_data();
                if key == WAKE_TOKEN {
                    wake_armed = false;
                    self.sleeping.store(false, Ordering::SeqCst);
                    continue;
                }
                let Some(slot) = usize::try_from(key).ok().and_then(|k| table.get_mut(k)) else { continue };
                if let Some(flight) = slot.take() {
                    in_flight -= 1;
                    free_keys.push(key as usize);
                    let _ = flight.done.send(Done { result: cqe.result(), buf: flight.read_buf });
                }
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
