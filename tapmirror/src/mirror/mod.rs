//! Live mirroring: every guest write also goes to a remote NBD target.
//!
//! In `sync` mode the server sends each guest `WRITE`, `WRITE_ZEROES` and `TRIM` to the local
//! image and to the target at the same time, from the same buffer, and answers the guest when
//! both are done, so the guest's latency is max(local, remote) rather than their sum (QEMU's
//! write-blocking mirror pays the sum and a bounce copy). If the target fails, disconnects or
//! answers nothing for the timeout while requests wait on it (the client's watch, not a timer
//! per request, so a queue on a slow link is no stall), the mirror is marked failed and detached: the guest's
//! request still succeeds locally, and the failure shows in `stats` and in the log, never as a
//! silent divergence (tapdisk drops a failed mirror without a word).
//!
//! In `full` mode (the SMAPIv3 way: no snapshot) a dirty bitmap records what the target may
//! lack, and a background pass copies it. The pass runs in two phases:
//!
//! - **Catch-up.** A guest write goes to the local image only and marks its range dirty, so the
//!   guest never waits on the target, nor on the copy traffic queued in it (a target such as
//!   qemu-nbd serves all connections on one thread). The pass sweeps the bitmap again and again,
//!   each sweep copying what the guest dirtied during the one before, as pre-copy VM migration
//!   does with memory.
//! - **Converge.** Once a sweep leaves nothing dirty, or fails to halve what is dirty (a guest
//!   writing faster than the pass copies), guest writes to ranges already copied are mirrored
//!   synchronously. They then never add to the bitmap, so the pass only ever shrinks it: the
//!   mirror converges under any guest write rate. This phase is short when the guest is slower
//!   than the pass: it starts with little or nothing dirty.
//!
//! A range being copied is locked (dirty bits cleared, source read, target written). In
//! catch-up a guest write takes no lock: it marks its range once its local write is done, so a
//! copy that cleared the bits and read the range before the write landed copies it again
//! later, and a write never waits for a copy of its range held up by the target (a stopped
//! target held guest writes for the whole timeout). The switch to converge waits such writes
//! out. In converge a guest write locks its range, so a copy can never overwrite the target
//! with data older than a guest write; a write whose whole range is still dirty stays local
//! (Storage vMotion's rule) and does not mark it again (`Mirror::kept_local` says why).
//!
//! Ready means converging, nothing dirty, nothing in flight and the target flushed. Guest
//! flushes reach the target from the ready flush on: before it the target is not a consistent
//! disk, and the ready flush covers every write completed before it.

pub mod dirty;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use dirty::{DirtyBitmap, RangeGuard, RangeLocks};

use crate::image::{ExtentState, Image};
use crate::io::IoBuf;
use crate::nbd::proto::tflags;
use crate::nbd::{ClientError, NbdClient};

/// How a mirror runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum MirrorMode {
    /// New writes only: the existing data reaches the target by a separate copy.
    Sync,
    /// Everything: new writes synchronously and the existing data by a background pass.
    Full,
}

/// Where a mirror stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MirrorState {
    /// No mirror attached.
    None,
    /// Attached; existing data still being copied (full mode).
    Syncing,
    /// Attached and in step: every write so far is on the target.
    Ready,
    /// The target failed; the mirror was detached.
    Failed,
}

/// Counters of one mirror.
#[derive(Debug, Default, serde::Serialize)]
pub struct MirrorCounters {
    /// Guest writes mirrored.
    pub writes: u64,
    /// Guest bytes mirrored (writes and zeroes).
    pub bytes: u64,
    /// Flushes mirrored.
    pub flushes: u64,
}

/// The background half of a full mirror.
pub struct FullSync {
    /// A second connection for the background pass, when the engine passed one: guest writes
    /// then never queue behind megabytes of copy traffic in the target.
    copier: Option<NbdClient>,
    bitmap: DirtyBitmap,
    /// Bytes the background pass has copied (data or zeroes).
    copied: AtomicU64,
    /// Of those, bytes sent as data.
    sent: AtomicU64,
    /// Bytes cleared from the bitmap and being copied now.
    in_flight: AtomicU64,
    /// Converge phase: guest writes to copied ranges are mirrored (see the module's docs).
    converging: AtomicBool,
    /// Why it began.
    converge_cause: std::sync::OnceLock<&'static str>,
    /// Guest flushes reach the target: set just before the ready flush is sent.
    flush_remote: AtomicBool,
    /// Guest writes kept local (deferred, or to a dirty range), and their bytes.
    deferred: AtomicU64,
    deferred_bytes: AtomicU64,
    ready: AtomicBool,
    started: Instant,
    /// Bytes of data per second the pass may send, 0 for no limit; settable while it runs.
    rate: AtomicU64,
    /// The same while the guest writes ([`DEFAULT_BUSY_RATE`]); the lower of the two applies.
    busy_rate: AtomicU64,
    /// Whether the pass last saw the guest writing (and so kept to the busy rate).
    guest_busy: AtomicBool,
    /// The pass's token bucket: when it was last looked at and its credit then (bytes).
    bucket: std::sync::Mutex<(Instant, f64)>,
    /// Signalled when a copy gives back credit it took for holes.
    given_back: tokio::sync::Notify,
    /// Guest writes under way in catch-up, which hold no range lock ([`Deferral`]), and the
    /// signal that the last of them ended.
    unlocked: AtomicU64,
    unlocked_done: tokio::sync::Notify,
}

/// A guest write kept local in a full mirror's catch-up, holding no range lock (see
/// [`Mirror::unlocked_deferral`]): the switch to converge waits until none is under way.
pub struct Deferral<'a> {
    f: &'a FullSync,
}

impl Drop for Deferral<'_> {
    fn drop(&mut self) {
        if self.f.unlocked.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.f.unlocked_done.notify_waiters();
        }
    }
}

impl FullSync {
    /// Enters the converge phase. Writes deferred before the switch mark their ranges under
    /// their range guards; the barrier waits them out, so the bitmap holds them before the pass
    /// looks at it again.
    async fn converge(&self, locks: &RangeLocks, why: &'static str) {
        // SeqCst, against `Mirror::unlocked_deferral`: either a write sees the switch and
        // takes its lock, or the switch sees the write under way and waits for it.
        if self.converging.swap(true, Ordering::SeqCst) {
            return;
        }
        let _ = self.converge_cause.set(why);
        self.unlocked_drained().await;
        drop(locks.lock(0, u64::MAX, true).await);
        tracing::info!(why, dirty = self.bitmap.dirty_bytes(), "full mirror converging: guest writes to copied ranges are mirrored from now on");
    }

    /// Waits until no catch-up write is under way ([`Deferral`]). At once when none is, with
    /// no waiter registered: a converge write asks this before every guard.
    async fn unlocked_drained(&self) {
        while self.unlocked.load(Ordering::SeqCst) != 0 {
            let done = self.unlocked_done.notified();
            tokio::pin!(done);
            done.as_mut().enable();
            if self.unlocked.load(Ordering::SeqCst) == 0 {
                return;
            }
            done.await;
        }
    }

    /// The cap on the pass now, bytes per second (0: none): the operator's cap, and while the
    /// guest writes the busy rate too, whichever is lower.
    fn cap(&self, guest_busy: bool) -> u64 {
        let rate = self.rate.load(Ordering::Relaxed);
        let busy = if guest_busy { self.busy_rate.load(Ordering::Relaxed) } else { 0 };
        match (rate, busy) {
            (0, b) => b,
            (r, 0) => r,
            (r, b) => r.min(b),
        }
    }

    /// Waits until the pass may send again under `rate()`: until what it took so far is paid
    /// off (100 ms of credit at most). The wait follows the rate as it is set meanwhile, so
    /// lifting or raising a cap frees a waiting pass within one slice. Gives up early once
    /// `stop` says so (the mirror failed or was detached).
    async fn pace(&self, rate: impl Fn() -> u64, stop: impl Fn() -> bool) {
        const SLICE: Duration = Duration::from_millis(50);
        loop {
            if stop() {
                return;
            }
            let rate = rate();
            let wait = {
                let mut b = self.bucket.lock().unwrap_or_else(|e| e.into_inner());
                let now = Instant::now();
                if rate == 0 {
                    *b = (now, 0.0);
                    return;
                }
                let rate = rate as f64;
                let credit = (b.1 + now.duration_since(b.0).as_secs_f64() * rate).min(rate / 10.0);
                *b = (now, credit);
                if credit >= 0.0 {
                    return;
                }
                Duration::from_secs_f64(-credit / rate)
            };
            tokio::select! {
                _ = tokio::time::sleep(wait.min(SLICE)) => {}
                _ = self.given_back.notified() => {}
            }
        }
    }

    /// Takes `bytes` from the pass's credit, as debt that the next `pace` waits out.
    fn take(&self, bytes: u64) {
        self.bucket.lock().unwrap_or_else(|e| e.into_inner()).1 -= bytes as f64;
    }

    /// Gives back `bytes` taken but not sent as data, and wakes a waiting `pace` to see them:
    /// a run of holes then costs the pass no wait at all.
    fn give_back(&self, bytes: u64) {
        if bytes > 0 {
            self.bucket.lock().unwrap_or_else(|e| e.into_inner()).1 += bytes as f64;
            self.given_back.notify_one();
        }
    }
}

/// Progress of a full mirror.
#[derive(Debug, serde::Serialize)]
pub struct FullProgress {
    /// Bytes the background pass has copied, ranges the guest dirtied again and the pass
    /// copied again counted each time: it may pass the disk's size, and the pass's progress
    /// is `bytes_done / (bytes_done + bytes_left)`, as QEMU's job offset against its length.
    pub bytes_done: u64,
    /// Bytes still to copy.
    pub bytes_left: u64,
    /// Bytes the background pass sent as data (zeroes travel as WRITE_ZEROES).
    pub bytes_sent: u64,
    /// Background copy rate, bytes per second, averaged since the mirror started.
    pub rate: f64,
    /// Seconds to ready at that rate.
    pub eta_s: Option<f64>,
    /// Guest write rate, bytes per second, since the mirror started.
    pub guest_write_rate: f64,
    /// `catch-up` (guest writes stay local and mark the bitmap) or `converge` (guest writes to
    /// copied ranges are mirrored).
    pub phase: &'static str,
    /// Why the converge phase began: `nothing-dirty` (the pass caught up), `guest-outpaced`
    /// (a sweep did not halve what was dirty) or `requested` (`mirror-converge`).
    pub converge_cause: Option<&'static str>,
    /// Guest writes kept local because the pass copies their range later.
    pub deferred_writes: u64,
    /// Granularity of the dirty bitmap.
    pub granularity: u64,
    /// Cap on the pass while the guest writes, bytes per second (0: none).
    pub busy_rate: u64,
    /// Whether the guest is writing now, so that the busy rate applies (why a pass may run
    /// slower than the target could take).
    pub guest_busy: bool,
}

/// An attached target.
pub struct Mirror {
    client: NbdClient,
    /// The target's write unit (its minimum block size): a guest write that is not whole
    /// units reaches it as the units around it, read back from the image.
    unit: u64,
    /// Guest writes hold their range (in whole units) exclusively from before either side is
    /// written until both are: two overlapping writes in flight at once would otherwise land
    /// in one order here and, the target serving requests in parallel as the protocol allows,
    /// in the other there, and the two disks would differ for good. The background pass holds
    /// what it copies the same way.
    locks: RangeLocks,
    mode: MirrorMode,
    timeout: Duration,
    failed: AtomicBool,
    writes: AtomicU64,
    bytes: AtomicU64,
    flushes: AtomicU64,
    /// Guest writes of any route, so the pass knows when the guest is busy.
    guest_writes: AtomicU64,
    full: Option<FullSync>,
}

/// Where a guest write goes under a mirror.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// To the local image and the target at once.
    Both,
    /// To the local image only, its range being dirty already: the pass copies it after the
    /// write releases its guard, so it reads what the write left.
    Dirty,
    /// To the local image only, in catch-up: `Mirror::kept_local` then marks the range.
    Deferred,
}

impl Mirror {
    /// A mirror onto `client`'s export. In full mode the whole disk starts dirty in a bitmap
    /// of `granularity` bytes a bit (an error where its memory cannot be had), and
    /// `run_full_copy` must then be started to copy it. `client` (and a copier) must watch its
    /// answers with `timeout` ([`crate::nbd::ClientOptions::answer_timeout`]): nothing else
    /// times the target, and `timeout` is kept only for the detach's own waits.
    pub fn with_granularity(client: NbdClient, mode: MirrorMode, timeout: Duration, granularity: u64) -> Result<Arc<Mirror>, String> {
        let bitmap = match mode {
            MirrorMode::Full => Some(DirtyBitmap::try_new(client.size(), granularity)?),
            MirrorMode::Sync => None,
        };
        let full = bitmap.map(|bitmap| {
            bitmap.mark(0, client.size());
            FullSync {
                copier: None,
                bitmap,
                copied: AtomicU64::new(0),
                sent: AtomicU64::new(0),
                in_flight: AtomicU64::new(0),
                converging: AtomicBool::new(false),
                converge_cause: std::sync::OnceLock::new(),
                flush_remote: AtomicBool::new(false),
                deferred: AtomicU64::new(0),
                deferred_bytes: AtomicU64::new(0),
                ready: AtomicBool::new(false),
                started: Instant::now(),
                rate: AtomicU64::new(0),
                busy_rate: AtomicU64::new(DEFAULT_BUSY_RATE),
                guest_busy: AtomicBool::new(false),
                bucket: std::sync::Mutex::new((Instant::now(), 0.0)),
                given_back: tokio::sync::Notify::new(),
                unlocked: AtomicU64::new(0),
                unlocked_done: tokio::sync::Notify::new(),
            }
        });
        Ok(Arc::new(Mirror {
            unit: u64::from(client.info().block_size.minimum.max(1)),
            client,
            locks: RangeLocks::default(),
            mode,
            timeout,
            failed: AtomicBool::new(false),
            writes: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
            guest_writes: AtomicU64::new(0),
            full,
        }))
    }

    /// Gives the background pass its own connection to the target (full mode; before the pass
    /// starts).
    pub fn with_copier(mut self: Arc<Self>, copier: NbdClient) -> Arc<Self> {
        if let Some(m) = Arc::get_mut(&mut self)
            && let Some(f) = m.full.as_mut()
        {
            f.copier = Some(copier);
        }
        self
    }

    fn copy_client(&self) -> &NbdClient {
        self.full.as_ref().and_then(|f| f.copier.as_ref()).unwrap_or(&self.client)
    }

    /// Progress of the background pass (full mode).
    pub fn progress(&self) -> Option<FullProgress> {
        let f = self.full.as_ref()?;
        let secs = f.started.elapsed().as_secs_f64().max(1e-3);
        let done = f.copied.load(Ordering::Relaxed);
        let left = f.bitmap.dirty_bytes() + f.in_flight.load(Ordering::Relaxed);
        let rate = done as f64 / secs;
        Some(FullProgress {
            bytes_done: done,
            bytes_left: left,
            bytes_sent: f.sent.load(Ordering::Relaxed),
            rate,
            eta_s: (rate > 0.0).then(|| left as f64 / rate),
            guest_write_rate: (self.bytes.load(Ordering::Relaxed) + f.deferred_bytes.load(Ordering::Relaxed)) as f64 / secs,
            granularity: f.bitmap.granularity(),
            phase: if f.converging.load(Ordering::Relaxed) { "converge" } else { "catch-up" },
            converge_cause: f.converge_cause.get().copied(),
            deferred_writes: f.deferred.load(Ordering::Relaxed),
            busy_rate: f.busy_rate.load(Ordering::Relaxed),
            guest_busy: f.guest_busy.load(Ordering::Relaxed),
        })
    }

    /// Caps the background pass at `bytes_per_s` bytes of data per second (0: no cap), from
    /// its next request on. `false` outside full mode.
    pub fn set_rate(&self, bytes_per_s: u64) -> bool {
        match &self.full {
            Some(f) => {
                f.rate.store(bytes_per_s, Ordering::Relaxed);
                true
            }
            None => false,
        }
    }

    /// Caps the background pass at `bytes_per_s` while the guest writes (0: no cap then but
    /// [`Mirror::set_rate`]'s), from its next request on. `false` outside full mode.
    pub fn set_busy_rate(&self, bytes_per_s: u64) -> bool {
        match &self.full {
            Some(f) => {
                f.busy_rate.store(bytes_per_s, Ordering::Relaxed);
                true
            }
            None => false,
        }
    }

    /// Ends a full mirror's catch-up now: guest writes to copied ranges are mirrored from here
    /// on, as they are once the pass catches up. For an operator who wants the mirror ready
    /// sooner (no more sweeps over what the guest rewrites) at the cost of the guest's writes
    /// waiting on the target meanwhile. `false` outside full mode.
    pub async fn converge_now(&self) -> bool {
        match &self.full {
            Some(f) => {
                f.converge(&self.locks, "requested").await;
                true
            }
            None => false,
        }
    }

    /// Marks ranges the target is known to hold already (what a mirrored guest write just
    /// wrote) as clean.
    pub fn mark_clean(&self, offset: u64, len: u64) {
        if let Some(f) = &self.full {
            f.bitmap.clear_covered(offset, len);
        }
    }

    /// Holds `[offset, offset + len)`, widened to whole units of the target, against other
    /// guest writes and the background copy for the life of the guard (see `locks`). A guest
    /// write takes this before writing either side.
    pub async fn guard(&self, offset: u64, len: u64) -> RangeGuard<'_> {
        // In converge, after the catch-up writes still landing (`unlocked_drained`).
        self.unlocked_drained().await;
        let (start, end) = self.envelope(offset, len);
        self.locks.lock(start, end, true).await
    }

    /// `[offset, offset + len)` widened to whole units of the target.
    fn envelope(&self, offset: u64, len: u64) -> (u64, u64) {
        let end = offset.saturating_add(len);
        (offset / self.unit * self.unit, end.div_ceil(self.unit).saturating_mul(self.unit))
    }

    /// Whether the target can take a write of `[offset, offset + len)` as it is: whole units.
    /// Otherwise it is mirrored after the local write, as the units around it read then
    /// ([`MirrorSlot::write_from_image`]).
    pub fn takes_as_is(&self, offset: u64, len: u64) -> bool {
        offset.is_multiple_of(self.unit) && len.is_multiple_of(self.unit)
    }

    /// A guest write in a full mirror's catch-up: it goes to the local image only, takes no
    /// range lock, and marks its range when its local write is done ([`Mirror::kept_local`]
    /// with [`Route::Deferred`]), holding the answer until then. `None` otherwise: the write
    /// takes its `guard` and asks its `route`.
    pub fn unlocked_deferral(&self) -> Option<Deferral<'_>> {
        let f = self.full.as_ref()?;
        f.unlocked.fetch_add(1, Ordering::SeqCst);
        let deferral = Deferral { f };
        if f.converging.load(Ordering::SeqCst) {
            return None;
        }
        self.guest_writes.fetch_add(1, Ordering::Relaxed);
        Some(deferral)
    }

    /// Waits until no catch-up write is under way (they hold no range lock): a guest write
    /// in converge waits for them before it takes its guard (`guard` does). Otherwise a
    /// converge write that overlaps one still landing could be mirrored and clear the range
    /// after that one marked it, though the image ended with the other's data. Only writes
    /// begun before the switch to converge are waited for, which are in their local write.
    pub async fn unlocked_drained(&self) {
        if let Some(f) = &self.full {
            f.unlocked_drained().await;
        }
    }

    /// Where a guest write to `[offset, offset + len)` goes; asked under the write's `guard`,
    /// once per guest write (it also counts the write, which is how the pass sees a busy guest).
    pub fn route(&self, offset: u64, len: u64) -> Route {
        self.guest_writes.fetch_add(1, Ordering::Relaxed);
        match &self.full {
            None => Route::Both,
            Some(f) if f.bitmap.all_dirty(offset, len) => Route::Dirty,
            Some(f) if !f.converging.load(Ordering::Acquire) => Route::Deferred,
            Some(_) => Route::Both,
        }
    }

    /// Records a guest write that `route` kept local. Called under the write's `guard`, after
    /// the local write, whatever its result. A deferred write marks its range dirty. A write
    /// to a range dirty already must not: the pass may have cleared the bits meanwhile and be
    /// waiting for this write's guard to copy the range, and marking again would have it copy
    /// the range once more. A guest hammering one block would then keep that block dirty for
    /// ever, and the mirror would never converge.
    pub fn kept_local(&self, offset: u64, len: u64, route: Route) {
        if let Some(f) = &self.full {
            if route == Route::Deferred {
                f.bitmap.mark(offset, len);
            }
            f.deferred.fetch_add(1, Ordering::Relaxed);
            f.deferred_bytes.fetch_add(len, Ordering::Relaxed);
        }
    }

    /// The dirty bitmap's granularity (full mode).
    pub fn granularity(&self) -> Option<u64> {
        self.full.as_ref().map(|f| f.bitmap.granularity())
    }

    /// How long the target may take over one request (or one split write) before the mirror
    /// fails.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The mode.
    pub fn mode(&self) -> MirrorMode {
        self.mode
    }

    /// The target's client.
    pub fn client(&self) -> &NbdClient {
        &self.client
    }

    /// Counters so far.
    pub fn counters(&self) -> MirrorCounters {
        MirrorCounters {
            writes: self.writes.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            flushes: self.flushes.load(Ordering::Relaxed),
        }
    }
}

/// The server's mirror, if any, and what became of the last one.
#[derive(Default)]
pub struct MirrorSlot {
    current: RwLock<Option<Arc<Mirror>>>,
    last_failure: Mutex<Option<String>>,
}

impl MirrorSlot {
    /// The attached, healthy mirror.
    pub fn get(&self) -> Option<Arc<Mirror>> {
        let m = self.current.read().ok()?.clone()?;
        (!m.failed.load(Ordering::Acquire)).then_some(m)
    }

    /// Attaches `m`; refused while another mirror is attached.
    pub fn attach(&self, m: Arc<Mirror>) -> Result<(), String> {
        let mut cur = self.current.write().map_err(|_| "mirror slot poisoned".to_owned())?;
        if cur.as_ref().is_some_and(|c| !c.failed.load(Ordering::Acquire)) {
            return Err("a mirror is already attached".into());
        }
        *cur = Some(m);
        if let Ok(mut f) = self.last_failure.lock() {
            *f = None;
        }
        Ok(())
    }

    /// Detaches the current mirror (healthy or not), returning it.
    pub fn detach(&self) -> Option<Arc<Mirror>> {
        self.current.write().ok()?.take()
    }

    /// Where the mirror stands.
    pub fn state(&self) -> MirrorState {
        match self.current.read().ok().and_then(|c| c.clone()) {
            Some(m) if m.failed.load(Ordering::Acquire) => MirrorState::Failed,
            Some(m) => match &m.full {
                None => MirrorState::Ready,
                Some(f) if f.ready.load(Ordering::Acquire) => MirrorState::Ready,
                Some(_) => MirrorState::Syncing,
            },
            None if self.last_failure.lock().map(|f| f.is_some()).unwrap_or(false) => MirrorState::Failed,
            None => MirrorState::None,
        }
    }

    /// Whether `m` is the attached mirror.
    pub fn is_current(&self, m: &Arc<Mirror>) -> bool {
        self.current.read().ok().and_then(|c| c.clone()).is_some_and(|c| Arc::ptr_eq(&c, m))
    }

    /// Fails `m` as soon as its target's connection breaks, with or without a write in flight:
    /// a target that dies while the guest is idle would otherwise be reported in step until
    /// the guest's next write (and a switch-over could go ahead into it). Ends once `m` is no
    /// longer the attached mirror.
    pub fn watch_target(self: &Arc<Self>, m: &Arc<Mirror>) {
        let (slot, m) = (Arc::clone(self), Arc::clone(m));
        tokio::spawn(async move {
            let closed = m.client.closed();
            tokio::pin!(closed);
            let mut every = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    why = &mut closed => return slot.fail(&m, format!("target connection: {why}")),
                    _ = every.tick() => if !slot.is_current(&m) {
                        return;
                    },
                }
            }
        });
    }

    /// Why the last mirror failed, if it did.
    pub fn failure(&self) -> Option<String> {
        self.last_failure.lock().ok()?.clone()
    }

    fn fail(&self, m: &Mirror, why: String) {
        if m.failed.swap(true, Ordering::AcqRel) {
            return;
        }
        // Every request still waiting on the target fails now, rather than each waiting out a
        // timeout of its own: guest writes to one busy block queue on its range lock, and behind
        // a target that stopped answering they took a timeout each (8 writes, 16 s at 2 s).
        m.client.abort(&format!("the mirror failed: {why}"));
        if let Some(c) = m.full.as_ref().and_then(|f| f.copier.as_ref()) {
            c.abort(&format!("the mirror failed: {why}"));
        }
        let Ok(mut cur) = self.current.write() else { return };
        if !cur.as_ref().is_some_and(|c| std::ptr::eq(Arc::as_ptr(c), m)) {
            // Detached already (by `mirror-detach`): its late failure says nothing of the slot.
            tracing::debug!(reason = %why, "a detached mirror's request failed");
            return;
        }
        *cur = None;
        tracing::error!(reason = %why, "mirror target failed; mirror detached, guest I/O continues locally");
        if let Ok(mut f) = self.last_failure.lock() {
            *f = Some(why);
        }
    }

    async fn run<T>(&self, m: &Mirror, what: &str, op: impl Future<Output = Result<T, ClientError>>) -> bool {
        // A request that waited (on a range lock) while the mirror failed is not sent.
        if m.failed.load(Ordering::Acquire) {
            return false;
        }
        match op.await {
            Ok(_) => true,
            Err(e) => {
                self.fail(m, format!("{what}: {e}"));
                false
            }
        }
    }

    /// Mirrors a guest write of `buf` at `offset` (whole units of the target: see
    /// [`Mirror::takes_as_is`]), split to the target's largest request.
    pub async fn write(&self, m: &Mirror, offset: u64, buf: &Arc<IoBuf>, fua: bool) {
        let len = buf.len() as u64;
        if self.run(m, "write", m.client.write_split(offset, buf, 0..buf.len(), fua)).await {
            self.mirrored(m, offset, len);
        }
    }

    /// Mirrors a guest zeroing (or a trim, which the server turns into zeroing under a mirror
    /// so both sides keep reading alike), of whole units of the target. The target keeps the
    /// zeroes allocated (`NO_HOLE`): a migration's leaf reads through a stand-in that it is later
    /// composed off of, onto the copied disk, so zeroes it left to the stand-in (which read as
    /// zeroes) came back as the disk's old data once composed.
    pub async fn write_zeroes(&self, m: &Mirror, offset: u64, len: u32, fua: bool) {
        if self.run(m, "write zeroes", m.client.zero(offset, u64::from(len), fua, true)).await {
            self.mirrored(m, offset, u64::from(len));
        }
    }

    /// Mirrors a guest write, zeroing or trim of `[offset, offset + len)` that is not whole
    /// units of the target, once the local side is done: the units around it go as `image`
    /// holds them now (read under the write's guard, so no other write is in them), and
    /// the whole units of a zeroing in between as zeroes.
    pub async fn write_from_image<I: Image>(&self, m: &Mirror, image: &I, offset: u64, len: u64, zeroes: bool, fua: bool) {
        let (start, end) = m.envelope(offset, len);
        let end = end.min(image.size());
        let (inner_start, inner_end) = (offset.div_ceil(m.unit) * m.unit, (offset + len) / m.unit * m.unit);
        let ok = if zeroes && inner_start < inner_end {
            self.copy_from_image(m, image, start, inner_start - start, fua).await
                && self.run(m, "write zeroes", m.client.zero(inner_start, inner_end - inner_start, fua, true)).await
                && self.copy_from_image(m, image, inner_end, end - inner_end, fua).await
        } else {
            self.copy_from_image(m, image, start, end - start, fua).await
        };
        if ok {
            self.mirrored(m, start, end - start);
        }
    }

    /// Sends `[offset, offset + len)` of `image` to the target as data.
    async fn copy_from_image<I: Image>(&self, m: &Mirror, image: &I, offset: u64, len: u64, fua: bool) -> bool {
        if len == 0 {
            return true;
        }
        let (buf, r) = image.read(offset, IoBuf::for_overwrite(len as usize)).await;
        if let Err(e) = r {
            self.fail(m, format!("reading the image at {offset} to complete the target's units: {e}"));
            return false;
        }
        let buf = Arc::new(buf);
        self.run(m, "write", m.client.write_split(offset, &buf, 0..buf.len(), fua)).await
    }

    fn mirrored(&self, m: &Mirror, offset: u64, len: u64) {
        m.writes.fetch_add(1, Ordering::Relaxed);
        m.bytes.fetch_add(len, Ordering::Relaxed);
        // Whole granules the guest just wrote are on the target: no need to copy them.
        m.mark_clean(offset, len);
    }

    /// Fails `m` because the local side of a mirrored guest request failed: the target took
    /// it (or may have), the image did not, or only in part, and the two may differ.
    pub fn local_failed(&self, m: &Mirror, what: &str, error: &dyn std::fmt::Display) {
        self.fail(m, format!("the local {what} failed ({error}) where the target's may not have: the two may differ"));
    }

    /// Mirrors a guest flush (a full mirror's target only from the ready flush on).
    pub async fn flush(&self, m: &Mirror) {
        if m.full.as_ref().is_some_and(|f| !f.flush_remote.load(Ordering::Acquire)) {
            return;
        }
        if self.run(m, "flush", m.client.flush_if_offered()).await && m.client.info().has(tflags::SEND_FLUSH) {
            m.flushes.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The runtime full mirrors' background passes run on: one worker thread of its own, with its
/// own I/O driver, so the pass's work never queues in front of a guest request on the runtime
/// that serves the guest (whose workers then only ever wait for the CPU, like any other
/// process's). Built on first use and kept for the life of the process, since a process serves
/// one image and so runs at most one pass at a time. `None` if it cannot be built: the pass then
/// shares the caller's runtime.
pub fn pass_runtime() -> Option<&'static tokio::runtime::Runtime> {
    static RT: std::sync::OnceLock<Option<tokio::runtime::Runtime>> = std::sync::OnceLock::new();
    RT.get_or_init(|| {
        let built = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("tapmirror-pass")
            .on_thread_start(crate::io::serve_background_io)
            .enable_all()
            .build();
        built.map_err(|e| tracing::warn!(error = %e, "no runtime of its own for the background pass: it shares the guest's")).ok()
    })
    .as_ref()
}

/// Requests of the background pass in flight at once while the guest is idle.
const COPY_DEPTH: u32 = 4;
/// Largest background copy request. Fewer, larger copies cost the guest less than many small
/// ones at the same rate: at 50 MB/s into qemu-nbd beside the steady guest, 32 KiB requests
/// took its p99 from 10 to 41 µs, 1 MiB ones left it as it was.
const COPY_CHUNK: u64 = 1 << 20;
/// While the guest writes, the pass steps aside: one request at a time, at most this many
/// bytes of data per second ([`Mirror::set_busy_rate`]). Every copy costs CPU on both ends,
/// and on a machine with few cores each one can delay a guest write waiting for a CPU. On 2
/// cores with the target on the same machine (benches/mirror-vs-qemu.py: a steady guest's p99
/// write latency while the pass runs, against its own before, the worse of 4 and 64 KiB
/// writes): unpaced 6.7-17x; at 200 MB/s 2.3x; at 100 MB/s 1.33-1.55x into qemu-nbd and 2.79x
/// into `tapmirror serve`; at 64 MiB/s 0.89-2.93x into qemu-nbd and 0.84-3.12x into
/// `tapmirror serve`, over a day of runs on a host whose noise moves them as much as the pass
/// does; since the flushes while the guest writes are smaller (`WRITEBACK_EVERY_BUSY`),
/// 1.26-3.61x and 1.31-2.69x. The price is time: a 4 GiB disk ready in 45 s against 1-2 s
/// unpaced, so hosts may choose (`sxm serve --mirror-busy-rate`).
pub const DEFAULT_BUSY_RATE: u64 = 64 << 20;
/// A guest write within this long makes the guest count as busy. Long enough that a guest
/// writing in bursts, or held off the CPU for a moment on a loaded host, is still a busy
/// guest: at 20 ms, any pause of the guest's longer than that let the pass go at full speed
/// (a test of the busy rate failed half its runs on a loaded machine, the pass copying megabytes
/// in the gaps). An idle guest's pass reaches full speed half a second later.
const BUSY_WINDOW: Duration = Duration::from_millis(500);
/// How long the pass takes the guest for busy when it starts, before it has seen a write.
const FIRST_LOOK: Duration = Duration::from_millis(100);
/// The pass flushes the target after each this many bytes it sent (one flush in flight at a
/// time), as `tapmirror copy` does. Left to the kernel, a target's page cache holds gigabytes
/// of the pass's data when the ready flush writes it all back at once. On 2 cores with a 4 GiB
/// disk that last second held 14-18% of the steady guest's slowest 1% of 4 KiB writes; with
/// the flushes along the way, 6-11%.
const WRITEBACK_EVERY: u64 = 64 << 20;
/// The same while the guest writes. The guest's writes stall around each flush, the longer the
/// more the target writes back: at 64 MiB, once a second at the busy rate, the steady guest's
/// p99 over 100 ms peaked at 0.8-3.8 ms once a second, in step with the flushes (4 GiB into
/// qemu-nbd on 2 cores, where the target's `fdatasync` runs on the guest's CPUs). At 8 MiB, with
/// [`write_back`] before converging, its writes over 1 ms went from 1.2-1.5 a second to 0.8, in
/// the same time to ready (benches/README.md).
const WRITEBACK_EVERY_BUSY: u64 = 8 << 20;

/// The background pass of a full mirror: copies dirty ranges from the image (as `image` gives
/// it at each step, so a leaf switch is followed) until nothing is dirty, then flushes the
/// target and marks the mirror ready. On a target that reads as zeroes (`target_is_zero`) it
/// first clears the image's holes from the bitmap. Ends early when the mirror fails or is
/// detached.
pub async fn run_full_copy<I: Image>(
    slot: Arc<MirrorSlot>,
    m: Arc<Mirror>,
    target_is_zero: bool,
    image: impl Fn() -> Arc<I> + Send + Sync + 'static,
) {
    let Some(f) = m.full.as_ref() else { return };
    if target_is_zero {
        skip_holes(f, &m.locks, &image, || m.failed.load(Ordering::Acquire) || !slot.is_current(&m)).await;
    }
    let image = Arc::new(image);
    let depth = Arc::new(tokio::sync::Semaphore::new(COPY_DEPTH as usize));
    let mut tasks = tokio::task::JoinSet::new();
    let mut writeback = tokio::task::JoinSet::new();
    let mut written_back = 0;
    let can_flush = m.copy_client().info().has(tflags::SEND_FLUSH);
    let mut cursor = 0;
    // What was dirty when the current sweep over the bitmap began.
    let mut sweep_start = f.bitmap.dirty_bytes();
    // The guest counts as busy until it has been seen idle for FIRST_LOOK: otherwise, with no
    // hole walk first, the first requests go out at full depth before its first write is
    // noticed (3.2 MB in the first second under a 1 MiB/s busy rate, in the test that now keeps
    // this from coming back). Not for a whole BUSY_WINDOW: an idle guest's pass would start
    // paced, and flush as often as a busy guest's, for half a second.
    let first_seen = Instant::now().checked_sub(BUSY_WINDOW.saturating_sub(FIRST_LOOK)).unwrap_or_else(Instant::now);
    let guest = GuestWatch { m: &m, seen: Mutex::new((m.guest_writes.load(Ordering::Relaxed), first_seen)) };
    loop {
        if m.failed.load(Ordering::Acquire) || !slot.is_current(&m) {
            return;
        }
        let busy = guest.busy();
        while writeback.try_join_next().is_some() {}
        let sent = f.sent.load(Ordering::Relaxed);
        let every = if busy { WRITEBACK_EVERY_BUSY } else { WRITEBACK_EVERY };
        if can_flush && writeback.is_empty() && sent - written_back >= every {
            written_back = sent;
            let (m, slot) = (Arc::clone(&m), Arc::clone(&slot));
            writeback.spawn(async move { slot.run(&m, "writeback flush", m.copy_client().flush()).await });
        }
        let Some((offset, len)) = f.bitmap.next_run(cursor, COPY_CHUNK) else {
            while tasks.join_next().await.is_some() {}
            while writeback.join_next().await.is_some() {}
            if f.bitmap.dirty_granules() > 0 {
                continue;
            }
            if !f.converging.load(Ordering::Acquire) {
                write_back(&slot, &m, can_flush).await;
                f.converge(&m.locks, "nothing-dirty").await;
                continue;
            }
            // Ready means flushed on every connection the pass or the guest wrote through. Guest
            // flushes go to the target from here on; the ones before are covered by this one.
            f.flush_remote.store(true, Ordering::Release);
            let flushed = slot.run(&m, "flush", m.client.flush_if_offered()).await
                && match &f.copier {
                    Some(c) => slot.run(&m, "flush", c.flush_if_offered()).await,
                    None => true,
                };
            if flushed {
                f.ready.store(true, Ordering::Release);
                tracing::info!(sent = f.sent.load(Ordering::Relaxed), "full mirror ready");
            }
            return;
        };
        if offset < cursor {
            // A sweep ended. In catch-up the guest dirtied what is left while it ran; unless
            // that is at most half of what the sweep began with, the guest keeps pace with the
            // pass, and only mirroring its writes bounds the work.
            let left = f.bitmap.dirty_bytes() + f.in_flight.load(Ordering::Relaxed);
            tracing::debug!(began_with = sweep_start, left, granules = f.bitmap.dirty_granules(), "full mirror sweep ended");
            if left * 2 > sweep_start && !f.converging.load(Ordering::Acquire) {
                // The copies in flight first, so that the flush covers all the pass sent.
                while tasks.join_next().await.is_some() {}
                while writeback.join_next().await.is_some() {}
                write_back(&slot, &m, can_flush).await;
                f.converge(&m.locks, "guest-outpaced").await;
            }
            sweep_start = left;
        }
        // Under a cap, wait until what was sent so far is paid for, then take the whole run as
        // if it were data; the copy gives back what it sent as zeroes once it knows (only data
        // counts). Never wait while holding the run's range, where a guest write would wait
        // with it. The run's extents are looked up once, by the copy under the range's lock:
        // a second lookup here, for pacing only, was half the pass's `lseek`s over the later
        // sweeps' small runs.
        let taken = if f.cap(busy) != 0 {
            f.pace(|| f.cap(guest.busy()), || m.failed.load(Ordering::Acquire) || !slot.is_current(&m)).await;
            f.take(len);
            len
        } else {
            0
        };
        // A busy guest gets the whole depth taken: one copy at a time.
        let Ok(permit) = Arc::clone(&depth).acquire_many_owned(if guest.busy() { COPY_DEPTH } else { 1 }).await else { return };
        // Clear first: a guest write that lands after this is mirrored synchronously or marks
        // the range again. The exclusive lock below orders this copy after any converge write
        // still in flight; a catch-up write still landing (it holds no lock) marks the range
        // once written, after this clear, so the range is copied again.
        f.bitmap.clear_covered(offset, len);
        f.in_flight.fetch_add(len, Ordering::Relaxed);
        cursor = offset + len;
        let (m, slot, image) = (Arc::clone(&m), Arc::clone(&slot), Arc::clone(&image));
        tasks.spawn(async move {
            let Some(f) = m.full.as_ref() else { return };
            let data = {
                let _exclusive = m.locks.lock(offset, offset + len, true).await;
                copy_range(&slot, &m, &*image(), offset, len).await
            };
            f.in_flight.fetch_sub(len, Ordering::Relaxed);
            if let Some(data) = data {
                f.give_back(taken.saturating_sub(data));
            }
            if data.is_some() {
                f.copied.fetch_add(len, Ordering::Relaxed);
            } else {
                f.bitmap.mark(offset, len);
            }
            drop(permit);
        });
        while tasks.try_join_next().is_some() {}
    }
}

/// Whether the guest is writing, for the pass: a write seen within [`BUSY_WINDOW`]. Asked at
/// each step and on every slice of a pacing wait, so that a guest that stops frees the pass
/// within a slice rather than after the request it waits to send (at a 1 MiB/s cap, a second).
struct GuestWatch<'a> {
    m: &'a Mirror,
    /// The count of guest writes last seen, and when it last changed.
    seen: Mutex<(u64, Instant)>,
}

impl GuestWatch<'_> {
    fn busy(&self) -> bool {
        let writes = self.m.guest_writes.load(Ordering::Relaxed);
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if writes != seen.0 {
            *seen = (writes, Instant::now());
        }
        let busy = seen.1.elapsed() < BUSY_WINDOW;
        if let Some(f) = &self.m.full {
            f.guest_busy.store(busy, Ordering::Relaxed);
        }
        busy
    }
}

/// Flushes what the pass left in the target's cache before the converge phase, where guest
/// writes wait on the target: a flush there holds them up for as long as it writes back (the
/// ready flush, with up to 64 MiB behind it, stalled the steady guest's writes for 3-6 ms in its
/// last 100 ms before ready). Not when an operator asks to converge at once (`mirror-converge`):
/// that asks for ready sooner.
async fn write_back(slot: &MirrorSlot, m: &Mirror, can_flush: bool) {
    if can_flush {
        slot.run(m, "writeback flush", m.copy_client().flush()).await;
    }
}

/// The hole walk works in bursts of at most this long, each followed by [`WALK_PAUSE`]. A
/// thread that stays on a CPU for milliseconds can keep a guest-path thread woken on that CPU
/// waiting for up to the scheduler's slice. Measured at the attach of a 4 GiB image: guest
/// writes of 0.4-5.7 ms while a walk over 2048 holes ran its 3 ms without a pause, at most
/// 1.3 ms with no walk, none over 300 µs with these pauses; a 12 ms busy loop in another
/// process stalls the guest alike (4.5 ms). Not the inode lock each `SEEK_DATA`/`SEEK_HOLE`
/// takes: a loop of them in another process leaves a `pwrite` beside it at 160 µs at worst.
/// The walk takes about twenty times longer (11 000 holes: under a second).
const WALK_BURST: Duration = Duration::from_micros(50);
const WALK_PAUSE: Duration = Duration::from_millis(1);
/// Extents the hole walk asks for at a time, so that one request stays within a burst.
const WALK_EXTENTS: usize = 64;

/// Clears the image's holes from the bitmap: a target that reads as zeroes holds them already.
/// The guest keeps writing meanwhile, and a write may fill a hole just after the walk saw it.
/// A write in catch-up holds no range lock: it writes the image, then marks its range. So each
/// hole is cleared as the image shows it under an exclusive lock on its range (against the
/// pass's copies and converge's locked writes), then looked at once more, and what has become
/// data since is marked again: a write whose mark the clear erased was in the image by then.
async fn skip_holes<I: Image>(f: &FullSync, locks: &RangeLocks, image: &impl Fn() -> Arc<I>, stop: impl Fn() -> bool) {
    let size = image().size();
    let started = Instant::now();
    let (mut holes, mut bytes) = (0u64, 0u64);
    let mut burst = Instant::now();
    let mut at = 0;
    while at < size && !stop() {
        let Ok(extents) = image().allocation(at, size - at, WALK_EXTENTS).await else { return };
        let Some(last) = extents.last() else { return };
        at = last.offset + last.length;
        for e in extents.iter().filter(|e| e.state == ExtentState::Hole) {
            if burst.elapsed() >= WALK_BURST {
                tokio::time::sleep(WALK_PAUSE).await;
                burst = Instant::now();
            }
            let _exclusive = locks.lock(e.offset, e.offset + e.length, true).await;
            let mut from = e.offset;
            while from < e.offset + e.length {
                let Ok(now) = image().allocation(from, e.offset + e.length - from, WALK_EXTENTS).await else { break };
                let Some(last) = now.last() else { break };
                from = last.offset + last.length;
                if let Some(pause) = hole_walk_test_pause() {
                    tokio::time::sleep(pause).await;
                }
                for hole in now.iter().filter(|n| n.state == ExtentState::Hole) {
                    f.bitmap.clear_covered(hole.offset, hole.length);
                    (holes, bytes) = (holes + 1, bytes + hole.length);
                }
            }
            // A catch-up write that filled a hole and marked it between the look and the
            // clear had its mark erased, and the target kept zeroes there for good (1 run in
            // about 20 of a test's guest): what is data now is marked again.
            let mut from = e.offset;
            while from < e.offset + e.length {
                let Ok(now) = image().allocation(from, e.offset + e.length - from, WALK_EXTENTS).await else {
                    // Not knowable: the whole hole copies as it would have.
                    f.bitmap.mark(from, e.offset + e.length - from);
                    break;
                };
                let Some(last) = now.last() else { break };
                from = last.offset + last.length;
                for data in now.iter().filter(|n| n.state != ExtentState::Hole) {
                    f.bitmap.mark(data.offset, data.length);
                }
            }
        }
    }
    tracing::info!(holes, bytes, ms = started.elapsed().as_millis() as u64, "holes skipped: the target reads as zeroes there");
}

/// For tests only: a pause between the hole walk's look at a hole and its clear
/// (`TAPMIRROR_TEST_HOLE_WALK_PAUSE_MS`), widening the window a guest write can land in to
/// where a test sees what happens then. Unset (always, outside tests), none.
fn hole_walk_test_pause() -> Option<Duration> {
    static PAUSE: std::sync::OnceLock<Option<Duration>> = std::sync::OnceLock::new();
    *PAUSE.get_or_init(|| std::env::var("TAPMIRROR_TEST_HOLE_WALK_PAUSE_MS").ok().and_then(|v| v.parse().ok()).map(Duration::from_millis))
}

/// Copies `[offset, offset + len)` to the target: data as data, the rest as zeroes. Answers
/// the bytes it sent as data, or `None` if the mirror failed.
async fn copy_range<I: Image>(slot: &MirrorSlot, m: &Mirror, image: &I, offset: u64, len: u64) -> Option<u64> {
    let whole = || vec![crate::image::Extent { offset, length: len, state: ExtentState::Data }];
    let extents = match image.allocation(offset, len, usize::MAX).await {
        // A target that writes in units larger than the image's extents (a qcow2 of 512-byte
        // clusters into a 4 KiB target) gets the run as data: holes read as zeroes.
        Ok(e) if !e.iter().all(|e| m.takes_as_is(e.offset, e.length) || e.offset.is_multiple_of(m.unit) && e.offset + e.length == image.size()) => whole(),
        Ok(e) if !e.is_empty() => e,
        _ => whole(),
    };
    let mut at = offset;
    let mut data = 0;
    for e in extents {
        at = e.offset + e.length;
        let ok = if e.state == ExtentState::Data {
            let (buf, r) = image.read(e.offset, IoBuf::for_overwrite(e.length as usize)).await;
            if let Err(err) = r {
                slot.fail(m, format!("reading the source at {}: {err}", e.offset));
                return None;
            }
            let buf = Arc::new(buf);
            let sent = slot.run(m, "background copy", m.copy_client().write_split(e.offset, &buf, 0..buf.len(), false)).await;
            if sent && let Some(f) = &m.full {
                f.sent.fetch_add(e.length, Ordering::Relaxed);
                data += e.length;
            }
            sent
        } else {
            slot.run(m, "background zeroing", m.copy_client().zero(e.offset, e.length, false, false)).await
        };
        if !ok {
            return None;
        }
    }
    // Extents may stop short of the range; what is left is copied as data.
    if at < offset + len {
        return Box::pin(copy_range(slot, m, image, at, offset + len - at)).await.map(|rest| data + rest);
    }
    Some(data)
}
