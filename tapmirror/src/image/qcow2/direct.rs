//! Writes into clusters the top file already holds go straight to the file, from the caller's
//! thread, as raw images' writes do; so do reads of them.
//!
//! Every other request crosses to the image thread (see `worker`) and back, and bounces its
//! data through an owned buffer for imago: a QD1 4 KiB write into an allocated cluster cost
//! 34-36 µs there against 20-24 µs into raw (benches/README.md, "Image formats"). Yet a write
//! into a cluster the top file holds, with its `COPIED` flag set, changes no metadata: imago
//! itself serves it by writing at the mapped host offset, and documents that a `Raw` mapping
//! with `writable: true` may be written to directly. So [`Direct`] remembers such mappings,
//! learnt from the image thread after each read or write it served, and reads and writes there
//! itself.
//!
//! What can make a remembered mapping wrong, and how each is kept out:
//!
//! - **Zeroing** turns whole clusters into zero clusters that keep their host clusters (imago
//!   promises that of `write_zeroes`): a direct write still in flight then lands in a cluster
//!   nobody reads, which is an order two overlapping requests may take. So zeroing only forgets
//!   its range, when it starts and when it is done.
//! - **A trim** frees clusters for reuse, as data or as metadata, where a late direct write
//!   would destroy what now lives there. A trim forgets its range likewise and runs under
//!   [`Direct::remap`] held exclusively, so no direct write is in flight meanwhile. The guard
//!   travels with the request to the image thread and is let go there when the request is
//!   done, even if its caller has gone (a dropped future must not free the lock while the
//!   thread still frees clusters). A direct write holds its shared guard until its bytes are
//!   written: a small one is a `pwrite` on the calling thread, done when it returns; a larger
//!   one runs as a task of its own, since an io_uring write outlives a dropped future.
//!   Zeroing does not take the guard because it may wait a long time, for a backing still being
//!   filled (`worker::wait_for_backing`), and would hold up every direct write meanwhile.
//! - **A mapping learnt across one of those.** A write served by the image thread learns its
//!   mappings after it wrote, and that lookup may have run before a zeroing that ended since.
//!   Each zeroing and trim bumps [`Map::epoch`] at its start and at its end; a write keeps
//!   what it learnt only if the epoch is the one it began under.
//! - Nothing else moves a data cluster: imago copies a cluster on write only when it is not
//!   `COPIED` (shared with an internal snapshot), and such mappings are never remembered.
//!
//! Durability is unchanged: the data lands in the same file's page cache, which a flush's
//! `fdatasync` covers; `Stable` writes take the image thread's path, which syncs.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::io::{Durability, FileIo, IoBuf};

/// Most mappings remembered: 2 MiB of slots, enough for 8 GiB of 64 KiB clusters.
const SLOTS: u64 = 1 << 17;

/// The top file and what is known of its cluster mappings.
pub(super) struct Direct {
    io: Arc<FileIo>,
    cluster_bits: u32,
    map: Mutex<Map>,
    /// Held shared by direct reads and writes, and exclusively by trims.
    remap: Arc<tokio::sync::RwLock<()>>,
    /// Writes served here.
    writes: AtomicU64,
    /// Reads served here.
    reads: AtomicU64,
}

/// Guest cluster → host cluster offset, one direct-mapped slot per guest cluster modulo the
/// table's length: `(guest cluster + 1, host offset)`, 0 for empty.
struct Map {
    slots: Vec<(u64, u64)>,
    /// Bumped at the start and at the end of each zeroing and trim.
    epoch: u64,
}

/// Mappings the image thread found after a read or write: guest cluster index, host cluster
/// offset.
pub(super) type Learnt = Vec<(u64, u64)>;

impl Direct {
    pub(super) fn new(io: Arc<FileIo>, cluster_bits: u32, size: u64) -> Direct {
        let clusters = size.div_ceil(1 << cluster_bits).clamp(1, SLOTS);
        Direct {
            io,
            cluster_bits,
            map: Mutex::new(Map { slots: vec![(0, 0); clusters as usize], epoch: 0 }),
            remap: Arc::new(tokio::sync::RwLock::new(())),
            writes: AtomicU64::new(0),
            reads: AtomicU64::new(0),
        }
    }

    /// Writes served here so far.
    pub(super) fn writes(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }

    /// Reads served here so far.
    pub(super) fn reads(&self) -> u64 {
        self.reads.load(Ordering::Relaxed)
    }

    fn map(&self) -> std::sync::MutexGuard<'_, Map> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The epoch a read or write served by the image thread begins under.
    pub(super) fn epoch(&self) -> u64 {
        self.map().epoch
    }

    /// Remembers what a read or write that began under `epoch` learnt, unless a zeroing or
    /// trim began or ended since.
    pub(super) fn learn(&self, epoch: u64, learnt: &[(u64, u64)]) {
        let mut map = self.map();
        if map.epoch != epoch {
            return;
        }
        let n = map.slots.len() as u64;
        for &(cluster, host) in learnt {
            map.slots[(cluster % n) as usize] = (cluster + 1, host);
        }
    }

    /// Forgets the mappings of `[offset, offset + length)` now and again when the guard is
    /// dropped. With `exclusive` (a trim), first waits until no direct read or write is in
    /// flight, and holds them off until then.
    pub(super) async fn remapping(self: &Arc<Self>, offset: u64, length: u64, exclusive: bool) -> Remapping {
        let guard = if exclusive { Some(Arc::clone(&self.remap).write_owned().await) } else { None };
        self.forget(offset, length);
        Remapping { direct: Arc::clone(self), offset, length, _guard: guard }
    }

    fn forget(&self, offset: u64, length: u64) {
        let mut map = self.map();
        map.epoch += 1;
        if length == 0 {
            return;
        }
        let n = map.slots.len() as u64;
        let (first, last) = (offset >> self.cluster_bits, (offset + length - 1) >> self.cluster_bits);
        if last - first + 1 >= n {
            map.slots.fill((0, 0));
            return;
        }
        for c in first..=last {
            let slot = &mut map.slots[(c % n) as usize];
            if slot.0 == c + 1 {
                *slot = (0, 0);
            }
        }
    }

    /// Writes `buf` at guest `offset` straight into the file if every cluster it touches is
    /// remembered; `None` when one is not, and the image thread must serve the write.
    pub(super) async fn write(&self, offset: u64, buf: &Arc<IoBuf>) -> Option<io::Result<()>> {
        let shared = Arc::clone(&self.remap).read_owned().await;
        let runs = self.runs(offset, buf.len())?;
        self.writes.fetch_add(1, Ordering::Relaxed);
        let mut runs = runs.into_iter().peekable();
        while let Some(&(host, start, stop)) = runs.peek() {
            match self.io.write_inline(&buf[start..stop], host) {
                Some(Ok(())) => _ = runs.next(),
                Some(Err(e)) => return Some(Err(e)),
                None => break,
            }
        }
        if runs.peek().is_none() {
            return Some(Ok(()));
        }
        let (io, buf, rest): (_, _, Vec<_>) = (Arc::clone(&self.io), Arc::clone(buf), runs.collect());
        let task = tokio::spawn(async move {
            let _shared = shared;
            for (host, start, stop) in rest {
                io.write_all_at(&buf, start..stop, host, Durability::Cached).await?;
            }
            Ok(())
        });
        Some(task.await.unwrap_or_else(|e| Err(io::Error::other(e))))
    }

    /// Reads guest `[offset, offset + buf.len())` straight from the file if it lies in clusters
    /// that are remembered and adjacent in the file; gives `buf` back when not, for the image
    /// thread. A read needs no task of its own: one whose future is dropped mid-flight may read
    /// a cluster a trim frees meanwhile, into a buffer nobody looks at.
    pub(super) async fn read(&self, offset: u64, buf: IoBuf) -> std::result::Result<(IoBuf, io::Result<()>), IoBuf> {
        let _shared = self.remap.read().await;
        let host = match self.runs(offset, buf.len()).as_deref() {
            Some(&[(host, _, _)]) => host,
            _ => return Err(buf),
        };
        match self.io.read_exact_at(buf, host).await {
            // The cluster runs past the end of the file, which reads as zeroes there (as QEMU
            // reads it); the image thread's storage layer fills that in. A file cut short inside
            // its last cluster is valid qcow2 (found by fuzzing: `tapmirror/fuzz`, qcow2_parse).
            (buf, Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => Err(buf),
            done => {
                self.reads.fetch_add(1, Ordering::Relaxed);
                Ok(done)
            }
        }
    }

    /// Where guest `[offset, offset + len)` lies in the file, if every cluster of it is
    /// remembered: (host offset, start and end within the range), merged where clusters are
    /// adjacent in the file too.
    fn runs(&self, offset: u64, len: usize) -> Option<Vec<(u64, usize, usize)>> {
        let mut runs: Vec<(u64, usize, usize)> = Vec::with_capacity(1);
        let map = self.map();
        let n = map.slots.len() as u64;
        let (cs, end) = (1u64 << self.cluster_bits, offset + len as u64);
        let mut at = offset;
        while at < end {
            let c = at >> self.cluster_bits;
            let (key, host_cluster) = map.slots[(c % n) as usize];
            if key != c + 1 {
                return None;
            }
            let take = ((c + 1) * cs).min(end) - at;
            let host = host_cluster + (at - c * cs);
            let (start, stop) = ((at - offset) as usize, (at - offset + take) as usize);
            match runs.last_mut() {
                Some(last) if last.0 + (last.2 - last.1) as u64 == host => last.2 = stop,
                _ => runs.push((host, start, stop)),
            }
            at += take;
        }
        Some(runs)
    }
}

/// Held by a zeroing or trim until the image thread is done with it: see
/// [`Direct::remapping`].
pub(super) struct Remapping {
    direct: Arc<Direct>,
    offset: u64,
    length: u64,
    _guard: Option<tokio::sync::OwnedRwLockWriteGuard<()>>,
}

impl Drop for Remapping {
    fn drop(&mut self) {
        self.direct.forget(self.offset, self.length);
    }
}
