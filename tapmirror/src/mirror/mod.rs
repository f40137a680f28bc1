//! Live mirroring: every guest write also goes to a remote NBD target.
//!
//! In `sync` mode the server sends each guest `WRITE`, `WRITE_ZEROES` and `TRIM` to the local
//! image and to the target at the same time, from the same buffer, and answers the guest when
//! both are done, so the guest's latency is max(local, remote) rather than their sum (QEMU's
//! write-blocking mirror pays the sum and a bounce copy). If the target fails, disconnects or
//! does not answer within the timeout, the mirror is marked failed and detached: the guest's
//! request still succeeds locally, and the failure shows in `stats` and in the log, never as a
//! silent divergence (tapdisk drops a failed mirror without a word).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use crate::io::IoBuf;
use crate::nbd::{ClientError, NbdClient, Payload};

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

/// An attached target.
pub struct Mirror {
    client: NbdClient,
    mode: MirrorMode,
    timeout: Duration,
    failed: AtomicBool,
    writes: AtomicU64,
    bytes: AtomicU64,
    flushes: AtomicU64,
}

impl Mirror {
    /// A mirror onto `client`'s export.
    pub fn new(client: NbdClient, mode: MirrorMode, timeout: Duration) -> Arc<Mirror> {
        Arc::new(Mirror {
            client,
            mode,
            timeout,
            failed: AtomicBool::new(false),
            writes: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
        })
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
            Some(m) => match m.mode {
                MirrorMode::Sync => MirrorState::Ready,
                MirrorMode::Full => MirrorState::Syncing,
            },
            None if self.last_failure.lock().map(|f| f.is_some()).unwrap_or(false) => MirrorState::Failed,
            None => MirrorState::None,
        }
    }

    /// Why the last mirror failed, if it did.
    pub fn failure(&self) -> Option<String> {
        self.last_failure.lock().ok()?.clone()
    }

    fn fail(&self, m: &Mirror, why: String) {
        if m.failed.swap(true, Ordering::AcqRel) {
            return;
        }
        tracing::error!(reason = %why, "mirror target failed; mirror detached, guest I/O continues locally");
        if let Ok(mut f) = self.last_failure.lock() {
            *f = Some(why);
        }
        if let Ok(mut cur) = self.current.write()
            && cur.as_ref().is_some_and(|c| std::ptr::eq(Arc::as_ptr(c), m))
        {
            *cur = None;
        }
    }

    async fn run<T>(&self, m: &Mirror, what: &str, op: impl Future<Output = Result<T, ClientError>>) -> bool {
        match tokio::time::timeout(m.timeout, op).await {
            Ok(Ok(_)) => true,
            Ok(Err(e)) => {
                self.fail(m, format!("{what}: {e}"));
                false
            }
            Err(_) => {
                self.fail(m, format!("{what}: no answer within {:?}", m.timeout));
                false
            }
        }
    }

    /// Mirrors a guest write of `buf` at `offset`.
    pub async fn write(&self, m: &Mirror, offset: u64, buf: &Arc<IoBuf>, fua: bool) {
        let len = buf.len() as u64;
        if self.run(m, "write", m.client.write(offset, Payload::Shared(Arc::clone(buf)), fua)).await {
            m.writes.fetch_add(1, Ordering::Relaxed);
            m.bytes.fetch_add(len, Ordering::Relaxed);
        }
    }

    /// Mirrors a guest zeroing (or a trim, which the server turns into zeroing under a mirror
    /// so both sides keep reading alike).
    pub async fn write_zeroes(&self, m: &Mirror, offset: u64, len: u32) {
        if self.run(m, "write zeroes", m.client.write_zeroes(offset, len, false, false)).await {
            m.writes.fetch_add(1, Ordering::Relaxed);
            m.bytes.fetch_add(u64::from(len), Ordering::Relaxed);
        }
    }

    /// Mirrors a guest flush.
    pub async fn flush(&self, m: &Mirror) {
        if self.run(m, "flush", m.client.flush()).await {
            m.flushes.fetch_add(1, Ordering::Relaxed);
        }
    }
}
