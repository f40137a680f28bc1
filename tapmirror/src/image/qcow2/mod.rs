//! qcow2 images through `imago` 0.2.6 (pinned; `../shared/research/ecosystem.md` says why),
//! behind the [`Image`] trait, as the SMAPIv3 backend keeps volumes.
//!
//! ```text
//!  Qcow2Image (Image: Send futures)
//!      │ a read or write in clusters the top file holds ─▶ the top file directly (`direct`)
//!      │ anything else: Req + owned IoBuf over a channel, reply over a oneshot
//!      ▼
//!  image thread: current-thread runtime + LocalSet, one local task per request
//!      imago FormatAccess (top qcow2) ─▶ backing qcow2 ─▶ … ─▶ qcow2 or raw base
//!      each layer's storage: IoStorage ─▶ FileIo (io_uring, or the portable thread pool)
//!
//!  create, create_overlay(_with), rebase, resize, info, check: standalone, by path
//! ```
//!
//! Files: `header` parses and rewrites the qcow2 header, `chain` resolves backing chains,
//! `storage` puts imago's `Storage` trait on our `FileIo`, `worker` owns the open chain,
//! `direct` reads and writes clusters the top file holds without it, `check` walks metadata
//! like `qemu-img check`, `guard` keeps guest writes off the metadata of a damaged image.
//!
//! # Does imago's `Storage` sit on our `FileIo`? Yes, for one copy per request
//!
//! `storage::IoStorage` implements `imago::Storage` with `FileIo`, so qcow2 data and metadata
//! take the io_uring path whenever raw images do. Two things in imago 0.2.6 shape the fit:
//!
//! - imago lends a storage driver *borrowed* buffers inside futures it may drop at any moment.
//!   Handing borrowed memory to io_uring is unsound (a dropped future frees what the kernel still
//!   writes), so every request is bounced through an owned `IoBuf`: one `memcpy` per request,
//!   into a registered slot up to 256 KiB. Modifying requests run in their own task and are
//!   counted, so `settle_writes` (which imago requires of drivers whose writes can outlive their
//!   future) really waits for them. Bytes reach imago without a copy on our side: the caller's
//!   `IoBuf` is lent to imago on the image thread.
//! - imago's format layer uses `async_trait(?Send)`, so its futures are not `Send` and cannot run
//!   as tasks of the multi-threaded runtime. Each open image gets its own thread (see `worker`);
//!   the price is a channel hop per request, which reads and writes in clusters the top file
//!   already holds skip (see `direct`). imago's own `file::File` driver would not help
//!   there either: in async mode it calls `preadv`/`pwritev` synchronously inside its futures,
//!   blocking whichever thread polls them and serialising every request of the image.
//!
//! # Overlays on a backing that is still being filled
//!
//! During a live migration the destination disk is a qcow2 overlay whose backing is filled by a
//! background copy while the guest's mirrored writes land in the overlay. A write that covers
//! only part of a cluster the overlay does not hold yet makes qcow2 copy-on-write the rest of
//! that cluster from the backing *at that moment*. imago does exactly what QEMU does here
//! (`qcow2/cow.rs`: `prepare_cow_cluster` → `cow_copy_format` reads the backing and writes the
//! whole cluster before mapping it), and it has no subclusters (it refuses extended-L2 images,
//! incompatible bit 4). If the copy has not reached that cluster yet, stale backing bytes would
//! be frozen into the overlay and the later copy could never replace them. Two mechanisms
//! prevent it, and they compose:
//!
//! 1. **Geometry.** [`create_overlay_with`] with [`OverlayKind::FillingBacking`] gives the
//!    overlay the smallest cluster size QEMU accepts for the disk size: 512 bytes up to 128 GiB
//!    (1 KiB up to 512 GiB, 2 KiB up to 2 TiB; QEMU caps the L1 table at 32 MiB). With 512-byte
//!    clusters every sector-aligned write covers whole clusters, imago skips the copy entirely
//!    (`full_skip_cow`), and the rest of what the guest did not write keeps falling through to
//!    the backing, which the copy may still fill. Tested by
//!    `tests::sector_writes_on_a_filling_overlay_never_freeze_stale_backing_bytes`.
//! 2. **Ordering.** [`Qcow2Image::open_with`] and [`BackingState::Filling`] make the driver,
//!    before a write or zeroing that covers only part of a cluster still falling through to the
//!    backing, await [`BackingFill::ready`] for that cluster's range: the background copy
//!    resolves it once that range of the backing holds its final bytes (it would copy that range
//!    next). This covers what geometry cannot: writes not aligned to 512 bytes, disks above
//!    128 GiB, overlays with larger clusters. After the wait the driver drops imago's cached
//!    metadata of the backing chain (under an exclusive lock), so a qcow2 backing filled through
//!    another handle is read afresh: without that, the copy-on-write would read the backing
//!    through L2 tables cached before the fill. Whole-cluster writes and clusters the overlay
//!    already holds never wait. [`Qcow2Image::set_backing_state`] switches back to
//!    [`BackingState::Complete`] when the copy has finished. Tested by
//!    `tests::a_partial_write_waits_for_the_backing_cluster_when_filling`.
//!
//! Reads of clusters the overlay does not hold show the backing as it is at that moment; that is
//! inherent and harmless (nothing is persisted, and the guest reads the destination only after
//! the copy ends). Small clusters cost metadata: a 512-byte L2 table maps 32 KiB, so overlays
//! meant to last should be committed or rebased once the migration is over.
//!
//! # Other choices
//!
//! - Chains are resolved from the headers by us (`chain`) and opened bottom-up with every
//!   dependency passed explicitly and imago's `DenyImplicitOpenGate`, so nothing is opened that
//!   we did not check; backings are opened read-only.
//! - Allocation of a chain: `Data` where the first layer that allocates a range holds data (a raw
//!   layer answers with its file's data and holes), `Zero` where that layer says zero cluster,
//!   `Hole` where no layer allocates it.
//! - `write_zeroes` turns whole clusters into zero clusters and writes zeroes into partial ones;
//!   `trim` frees whole clusters (they read as zeroes) and leaves partial ones, which a trim may.
//!   Freeing clusters needs the image to itself, so a trim briefly waits for in-flight requests.
//! - `Durability::Stable` writes back imago's metadata caches and `fdatasync`s. Closing (or
//!   dropping) an image waits for its requests and flushes.
//! - Persistent dirty bitmaps survive reads but not writes: imago does not know them and, as the
//!   specification asks of such writers, clears their autoclear bit on a writable open; QEMU
//!   then drops the bitmaps and reports their clusters as leaks until `qemu-img check -r leaks`
//!   (a warning is logged on such an open; our `check` agrees with QEMU).
//! - Not handled: external data files, encryption, extended L2, zstd compression, images left
//!   dirty by lazy refcounts (refused with the reason), and discard on version 2 images (a no-op).
//!   An image must not be open for writing twice: we take no lock yet (QEMU's OFD locks are not
//!   honoured either way).

mod chain;
mod check;
mod direct;
mod guard;
mod header;
mod storage;
mod worker;

use std::fmt;
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use imago::qcow2::Qcow2;
use imago::FormatCreateBuilder;
use tokio::sync::{mpsc, oneshot};

use self::chain::{io_error, problem};
use self::header::Header;
use self::storage::IoStorage;
use self::worker::Req;
use super::{Access, Extent, Features, Image, ImageError, Result, ZeroSpeed, check_range};
use crate::io::{Durability, EngineKind, IoBuf};

pub use header::MAGIC;

/// Default cluster size for new images, as QEMU's.
pub const DEFAULT_CLUSTER_SIZE: u32 = 65536;

/// The largest virtual size [`create`] makes with [`DEFAULT_CLUSTER_SIZE`] (2 PiB).
pub fn max_default_size() -> u64 {
    header::max_size(DEFAULT_CLUSTER_SIZE.trailing_zeros())
}

/// Why a qcow2 operation failed. Every variant names the file it is about.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Qcow2Error {
    /// The file breaks the qcow2 format (or QEMU marked it corrupt).
    #[error("{}: corrupt qcow2 image: {reason}", path.display())]
    Corrupt {
        /// The image.
        path: PathBuf,
        /// What is wrong, first problem found.
        reason: String,
    },
    /// A backing file the chain names does not exist.
    #[error("{}: backing file {} not found", path.display(), backing.display())]
    MissingBacking {
        /// The image that names the backing.
        path: PathBuf,
        /// Where the backing was looked for.
        backing: PathBuf,
    },
    /// A valid image using a feature this driver does not handle.
    #[error("{}: unsupported: {what}", path.display())]
    Unsupported {
        /// The image.
        path: PathBuf,
        /// The feature.
        what: String,
    },
    /// The request does not make sense for this image.
    #[error("{}: {reason}", path.display())]
    InvalidArgument {
        /// The image.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// Another process (a datapath, a QEMU process) or another open in this one has the image
    /// open for writing.
    #[error("{}: in use: another writer (a datapath, or a QEMU process) has it open", path.display())]
    Busy {
        /// The image.
        path: PathBuf,
    },
    /// The operating system refused I/O.
    #[error("{}: {op}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

impl Qcow2Error {
    /// The file the error is about.
    pub fn path(&self) -> &Path {
        match self {
            Qcow2Error::Corrupt { path, .. }
            | Qcow2Error::MissingBacking { path, .. }
            | Qcow2Error::Unsupported { path, .. }
            | Qcow2Error::InvalidArgument { path, .. }
            | Qcow2Error::Busy { path }
            | Qcow2Error::Io { path, .. } => path,
        }
    }
}

fn invalid(path: &Path, reason: impl Into<String>) -> Qcow2Error {
    Qcow2Error::InvalidArgument { path: path.to_owned(), reason: reason.into() }
}

/// Whether `head` (a file's first bytes) starts with the qcow2 magic `QFI\xfb`.
pub fn is_qcow2(head: &[u8]) -> bool {
    head.len() >= 4 && head[..4] == MAGIC
}

/// Tells an overlay's driver when the backing holds its final bytes for a range (implemented by
/// whatever fills the backing, e.g. the migration's background copy).
pub trait BackingFill: Send + Sync + 'static {
    /// Resolves once `[offset, offset + length)` of the backing (guest offsets) holds its final
    /// content, written to the backing's file (for a qcow2 backing, its metadata too: the driver
    /// then drops its cached view of the backing and reads it afresh). An error fails the write
    /// that waited for it. The future is polled on the image's own thread (a current-thread
    /// runtime with I/O and timers): it should wait for the filler, e.g. on a channel, rather
    /// than do the filling itself.
    fn ready(&self, offset: u64, length: u64) -> Pin<Box<dyn Future<Output = io::Result<()>> + Send + 'static>>;
}

/// What an overlay's backing holds while the overlay takes writes.
#[derive(Clone, Default)]
pub enum BackingState {
    /// Its final content (a snapshot's backing, or a finished copy): qcow2's copy-on-write is
    /// always right.
    #[default]
    Complete,
    /// Still being filled: partial-cluster writes onto clusters that fall through to the backing
    /// wait for `ready` first (see the module docs).
    Filling(Arc<dyn BackingFill>),
}

impl fmt::Debug for BackingState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackingState::Complete => "Complete",
            BackingState::Filling(_) => "Filling",
        })
    }
}

/// The backing state shared by an image's handle and its thread.
pub(super) struct BackingSlot(RwLock<BackingState>);

impl BackingSlot {
    fn filling(&self) -> Option<Arc<dyn BackingFill>> {
        match &*self.0.read().unwrap_or_else(|e| e.into_inner()) {
            BackingState::Filling(f) => Some(Arc::clone(f)),
            BackingState::Complete => None,
        }
    }
}

/// How [`create_overlay_with`] lays out a new overlay.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OverlayKind {
    /// A snapshot: the backing is final. Cluster size: the backing's when it is qcow2, else 64 KiB.
    #[default]
    Snapshot,
    /// A migration destination whose backing is still being filled: the smallest cluster size
    /// QEMU accepts for the disk size (512 B up to 128 GiB), so that sector-aligned writes never
    /// copy from the backing.
    FillingBacking,
}

/// An open qcow2 image and its backing chain; writes go to the top file.
pub struct Qcow2Image {
    tx: mpsc::UnboundedSender<Req>,
    thread: Option<std::thread::JoinHandle<()>>,
    chain: Vec<PathBuf>,
    size: u64,
    cluster_size: u64,
    version: u32,
    access: Access,
    engine: EngineKind,
    backing: Arc<BackingSlot>,
    /// Reads and writes in clusters the top file holds, without the image thread (open for
    /// writing).
    direct: Option<Arc<direct::Direct>>,
    /// Set when a write was found aimed at the image's metadata (see `guard`): no write is
    /// taken after that.
    corrupt: Arc<AtomicBool>,
    /// The top file's writer lock (open for writing), released when this closes.
    _writer_lock: Option<(std::fs::File, crate::image::QemuLock)>,
}

/// What [`info`] reports.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Qcow2Info {
    /// Always "qcow2".
    pub format: &'static str,
    /// qcow2 version (2 or 3).
    pub version: u32,
    /// Virtual disk size in bytes.
    pub virtual_size: u64,
    /// Cluster size in bytes.
    pub cluster_size: u64,
    /// The chain, this image first, then each backing as resolved.
    pub chain: Vec<PathBuf>,
    /// The backing name as recorded in the header.
    pub backing_file: Option<String>,
    /// The backing format as recorded in the header.
    pub backing_format: Option<String>,
    /// Guest bytes whose data this file holds (data and compressed clusters; zero clusters and
    /// what falls through to the backing count nothing).
    pub allocated_bytes: u64,
    /// Bytes the file occupies on disk.
    pub disk_bytes: u64,
    /// Marked corrupt (incompatible bit 1), by QEMU or by the write guard: it opens read-only
    /// only, as in QEMU, until `qemu-img check -r all` repairs it.
    pub corrupt: bool,
}

impl Qcow2Image {
    /// Opens the qcow2 image at `path` and its backing chain, with a complete backing.
    pub async fn open(path: &Path, access: Access, engine: EngineKind) -> std::result::Result<Qcow2Image, Qcow2Error> {
        Qcow2Image::open_with(path, access, engine, BackingState::Complete).await
    }

    /// Opens the qcow2 image at `path` and its backing chain, stating what the backing holds.
    pub async fn open_with(
        path: &Path,
        access: Access,
        engine: EngineKind,
        backing: BackingState,
    ) -> std::result::Result<Qcow2Image, Qcow2Error> {
        let writer_lock = match access {
            Access::ReadWrite => Some(lock_writer(path).await?),
            Access::ReadOnly => None,
        };
        let (chain, guard) = resolve_for_open(path, access).await?;
        let paths = chain.iter().map(|l| l.path.clone()).collect();
        let (cluster_size, version) = chain[0].header().map(|h| (h.cluster_size(), h.version)).unwrap_or((65536, 3));
        if access == Access::ReadWrite && chain[0].header().is_some_and(Header::has_valid_bitmaps) {
            // imago does not know persistent bitmaps; per the spec it clears their autoclear bit
            // on a writable open, so QEMU drops them and then counts their clusters as leaks
            // (`qemu-img check -r leaks` reclaims them).
            tracing::warn!(path = %path.display(), "writing invalidates this image's persistent dirty bitmaps");
        }
        let slot = Arc::new(BackingSlot(RwLock::new(backing)));
        let corrupt = Arc::new(AtomicBool::new(false));
        let (tx, thread, opened) = worker::start(chain, access, engine, Arc::clone(&slot), guard, Arc::clone(&corrupt)).await?;
        tracing::debug!(path = %path.display(), size = opened.size, cluster_size, ?engine, "qcow2 image open");
        let direct = opened.top_io.map(|io| Arc::new(direct::Direct::new(io, cluster_size.trailing_zeros(), opened.size)));
        Ok(Qcow2Image {
            tx,
            thread: Some(thread),
            chain: paths,
            size: opened.size,
            cluster_size,
            version,
            access,
            engine,
            backing: slot,
            direct,
            corrupt,
            _writer_lock: writer_lock,
        })
    }

    /// The files of the chain, this image first.
    pub fn chain(&self) -> Vec<PathBuf> {
        self.chain.clone()
    }

    /// The top file.
    pub fn path(&self) -> &Path {
        &self.chain[0]
    }

    /// The cluster size of the top file.
    pub fn cluster_size(&self) -> u64 {
        self.cluster_size
    }

    /// The I/O engine in use.
    pub fn engine(&self) -> EngineKind {
        self.engine
    }

    /// Changes what the backing is said to hold, e.g. to `Complete` once the copy has finished.
    pub fn set_backing_state(&self, state: BackingState) {
        *self.backing.0.write().unwrap_or_else(|e| e.into_inner()) = state;
    }

    /// Waits for every request, writes back imago's caches and syncs, and closes the image,
    /// reporting a failure that dropping could only log.
    pub async fn close(mut self) -> Result<()> {
        let (reply, rx) = oneshot::channel();
        let r = match self.tx.send(Req::Close { reply }) {
            Ok(()) => rx.await.unwrap_or_else(|_| Err(gone("close", 0))),
            Err(_) => Err(gone("close", 0)),
        };
        if let Some(t) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
        r
    }

    fn writable(&self, op: &'static str, offset: u64) -> Result<()> {
        match self.access {
            Access::ReadOnly => Err(ImageError::ReadOnly),
            Access::ReadWrite if self.corrupt.load(Ordering::Acquire) => {
                Err(ImageError::Io { op, offset, source: worker::marked_corrupt() })
            }
            Access::ReadWrite => Ok(()),
        }
    }

    /// Zeroes `[offset, offset + length)` of a version 2 image, which has no zero clusters (imago
    /// refuses to zero one): what the chain does not already read as zeroes gets zero data, as
    /// QEMU does. Ranges that read as zeroes are left alone, so that a copy into a fresh image
    /// keeps its holes.
    async fn zero_by_writing(&self, offset: u64, length: u64, durability: Durability) -> Result<()> {
        const CHUNK: u64 = 1 << 20;
        let zeroes = Arc::new(IoBuf::new(length.min(CHUNK) as usize));
        let end = offset + length;
        let mut at = offset;
        while at < end {
            let extents = self.allocation(at, end - at, 1024).await?;
            let Some(last) = extents.last() else { break };
            let next = last.offset + last.length;
            for e in extents.iter().filter(|e| e.state == super::ExtentState::Data) {
                let mut from = e.offset;
                while from < e.offset + e.length {
                    let n = (e.offset + e.length - from).min(CHUNK);
                    let buf = if n == zeroes.len() as u64 { Arc::clone(&zeroes) } else { Arc::new(IoBuf::new(n as usize)) };
                    self.write(from, buf, Durability::Cached).await?;
                    from += n;
                }
            }
            if next <= at {
                break;
            }
            at = next;
        }
        if durability == Durability::Stable {
            self.flush().await?;
        }
        Ok(())
    }

    /// What the top `depth` layers of the chain decide themselves, as `(start, end)` ranges.
    pub async fn own_ranges(&self, depth: usize) -> Result<Vec<(u64, u64)>> {
        self.call("map", 0, |reply| Req::Own { depth, reply }).await
    }

    /// Writes that went straight into the top file (see `direct`), skipping the image thread.
    pub fn direct_writes(&self) -> u64 {
        self.direct.as_ref().map_or(0, |d| d.writes())
    }

    /// Reads served straight from the top file, likewise.
    pub fn direct_reads(&self) -> u64 {
        self.direct.as_ref().map_or(0, |d| d.reads())
    }

    /// For a request that may change what clusters map to: see `direct`.
    async fn remapping(&self, offset: u64, length: u64, exclusive: bool) -> Option<direct::Remapping> {
        match &self.direct {
            Some(d) => Some(d.remapping(offset, length, exclusive).await),
            None => None,
        }
    }

    async fn call<T>(&self, op: &'static str, offset: u64, make: impl FnOnce(oneshot::Sender<Result<T>>) -> Req) -> Result<T> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(make(reply)).map_err(|_| gone(op, offset))?;
        rx.await.unwrap_or_else(|_| Err(gone(op, offset)))
    }
}

fn gone(op: &'static str, offset: u64) -> ImageError {
    ImageError::Io { op, offset, source: io::Error::other("qcow2 image thread is gone") }
}

impl Drop for Qcow2Image {
    fn drop(&mut self) {
        // The thread flushes on Close (or when the channel closes) and then ends; waiting for it
        // means a dropped image is complete on disk, for whoever opens the file next.
        let (reply, _) = oneshot::channel();
        let _ = self.tx.send(Req::Close { reply });
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            tracing::error!(path = %self.chain[0].display(), "qcow2 image thread panicked");
        }
    }
}

impl Image for Qcow2Image {
    fn size(&self) -> u64 {
        self.size
    }

    fn features(&self) -> Features {
        Features {
            read_only: self.access == Access::ReadOnly,
            trim: self.version >= 3,
            fast_zero: self.version >= 3,
            // One imago instance per open image serves every connection.
            multi_conn: true,
            // Sector-granular, as a disk is: the driver could take any byte range (a partly
            // written cluster on a backing still being filled waits for the fill), but a
            // migration may mirror these writes onto a VHD, which keeps whole sectors only.
            min_block: 512,
        }
    }

    async fn read(&self, offset: u64, buf: IoBuf) -> (IoBuf, Result<()>) {
        if let Err(e) = check_range(offset, buf.len() as u64, self.size) {
            return (buf, Err(e));
        }
        // Not served directly: the image thread's answer teaches the direct path, unless a
        // zeroing or trim came in between (the epoch).
        let (buf, epoch) = match &self.direct {
            Some(d) => match d.read(offset, buf).await {
                Ok((buf, r)) => return (buf, r.map_err(|source| ImageError::Io { op: "read", offset, source })),
                Err(buf) => (buf, Some(d.epoch())),
            },
            None => (buf, None),
        };
        let (reply, rx) = oneshot::channel();
        if let Err(mpsc::error::SendError(req)) = self.tx.send(Req::Read { offset, buf, learn: epoch.is_some(), reply }) {
            let Req::Read { buf, .. } = req else { unreachable!() };
            return (buf, Err(gone("read", offset)));
        }
        let (buf, r) = rx.await.unwrap_or_else(|_| (IoBuf::new(0), Err(gone("read", offset))));
        if let (Some(d), Some(epoch), Ok(learnt)) = (&self.direct, epoch, &r) {
            d.learn(epoch, learnt);
        }
        (buf, r.map(drop))
    }

    async fn write(&self, offset: u64, buf: Arc<IoBuf>, durability: Durability) -> Result<()> {
        self.writable("write", offset)?;
        check_range(offset, buf.len() as u64, self.size)?;
        let Some(direct) = &self.direct else {
            return self.call("write", offset, |reply| Req::Write { offset, buf, durability, learn: false, reply }).await.map(drop);
        };
        if durability == Durability::Cached
            && let Some(r) = direct.write(offset, &buf).await
        {
            return r.map_err(|source| ImageError::Io { op: "write", offset, source });
        }
        let epoch = direct.epoch();
        let learnt = self.call("write", offset, |reply| Req::Write { offset, buf, durability, learn: true, reply }).await?;
        direct.learn(epoch, &learnt);
        Ok(())
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        length: u64,
        alloc: super::ZeroAlloc,
        speed: ZeroSpeed,
        durability: Durability,
    ) -> Result<()> {
        self.writable("write zeroes", offset)?;
        check_range(offset, length, self.size)?;
        if length == 0 {
            return Ok(());
        }
        // A range that reads as zeroes already, and may stay unallocated, is left as it is:
        // zeroing it wrote zero-cluster entries into new L2 tables, 13 GB of them for a copy
        // of a 100 TiB volume holding 3 MiB into an existing qcow2 file.
        if alloc == super::ZeroAlloc::MayDeallocate && self.reads_as_zeroes(offset, length).await? {
            if durability == Durability::Stable {
                self.flush().await?;
            }
            return Ok(());
        }
        if self.version < 3 && speed == ZeroSpeed::FastOnly {
            // Version 2 has no zero clusters: zeroing means writing zero data.
            return Err(ImageError::NotFast);
        }
        if self.version < 3 {
            return self.zero_by_writing(offset, length, durability).await;
        }
        // Zero clusters keep their host clusters, so both ZeroAlloc modes are served alike.
        let remapping = self.remapping(offset, length, false).await;
        self.call("write zeroes", offset, |reply| Req::Zero { offset, length, durability, remapping, reply }).await
    }

    async fn trim(&self, offset: u64, length: u64) -> Result<()> {
        self.writable("trim", offset)?;
        check_range(offset, length, self.size)?;
        if length == 0 {
            return Ok(());
        }
        let remapping = self.remapping(offset, length, true).await;
        self.call("trim", offset, |reply| Req::Trim { offset, length, remapping, reply }).await
    }

    async fn flush(&self) -> Result<()> {
        self.call("flush", 0, |reply| Req::Flush { reply }).await
    }

    async fn allocation(&self, offset: u64, length: u64, limit: usize) -> Result<Vec<Extent>> {
        check_range(offset, length, self.size)?;
        if length == 0 {
            return Ok(Vec::new());
        }
        self.call("map", offset, |reply| Req::Map { offset, length, limit, reply }).await
    }
}

impl Qcow2Image {
    /// Whether `[offset, offset + length)` reads as zeroes by the chain's metadata alone: no
    /// layer holds data there (holes, zero clusters). Stops at the first data.
    async fn reads_as_zeroes(&self, offset: u64, length: u64) -> Result<bool> {
        let end = offset + length;
        let mut at = offset;
        while at < end {
            let extents = self.allocation(at, end - at, 1024).await?;
            let Some(last) = extents.last() else { return Ok(false) };
            if extents.iter().any(|e| e.state == crate::image::ExtentState::Data) {
                return Ok(false);
            }
            at = last.offset + last.length;
        }
        Ok(true)
    }
}

/// Runs blocking header and metadata work off the async threads.
async fn blocking<T: Send + 'static>(
    path: &Path,
    f: impl FnOnce() -> std::result::Result<T, Qcow2Error> + Send + 'static,
) -> std::result::Result<T, Qcow2Error> {
    tokio::task::spawn_blocking(f).await.map_err(|e| io_error(path, "run blocking task", io::Error::other(e)))?
}

/// Takes the writer lock of the image at `path` ([`crate::image::lock_exclusive`]) on a
/// descriptor of its own, and QEMU's "write not shared" lock, which the caller keeps for as long
/// as it writes.
async fn lock_writer(path: &Path) -> std::result::Result<(std::fs::File, crate::image::QemuLock), Qcow2Error> {
    let p = path.to_owned();
    blocking(path, move || {
        // Before the open, which blocks for ever on a FIFO.
        chain::require_image_file(&p)?;
        let file = std::fs::File::open(&p).map_err(|e| io_error(&p, "open", e))?;
        lock_file(&file, &p)?;
        let qemu = crate::image::QemuLock::on(&file);
        Ok((file, qemu))
    })
    .await
}

fn lock_file(file: &std::fs::File, path: &Path) -> std::result::Result<(), Qcow2Error> {
    match crate::image::lock_exclusive(file) {
        Ok(true) => Ok(()),
        Ok(false) => Err(Qcow2Error::Busy { path: path.to_owned() }),
        Err(e) => Err(io_error(path, "flock", e)),
    }
}

/// Resolves the chain at `path` and checks each layer's metadata as far as an open needs: the
/// top one further when it is to be written (`check::for_writing`), which also gives the guard
/// that keeps guest writes off that metadata.
async fn resolve_for_open(
    path: &Path,
    access: Access,
) -> std::result::Result<(Vec<chain::Layer>, Option<guard::Guard>), Qcow2Error> {
    let p = path.to_owned();
    blocking(path, move || {
        require_qcow2(&p)?;
        let chain = chain::resolve(&p, Some("qcow2"))?;
        let mut guard = None;
        for (i, layer) in chain.iter().enumerate() {
            let Some(h) = layer.header() else { continue };
            let writing = i == 0 && access == Access::ReadWrite;
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(writing)
                .open(&layer.path)
                .map_err(|e| io_error(&layer.path, "open", e))?;
            if writing {
                h.writable().map_err(|e| problem(&layer.path, e))?;
                // A crash while a table was allocated leaves it uncounted: counted in here, the
                // image opens as QEMU's would (whatever else is wrong, `for_writing` refuses).
                match check::repair_uncounted_tables(&f, h, layer.file_len) {
                    Ok(fixed) if !fixed.is_empty() => tracing::warn!(
                        path = %layer.path.display(),
                        offsets = ?fixed,
                        "repaired the refcounts of tables a crash left uncounted (written before their refcounts were)"
                    ),
                    Ok(_) => {}
                    Err(e) => tracing::debug!(path = %layer.path.display(), error = ?e, "no repair of uncounted tables"),
                }
                let regions = check::for_writing(&f, h, layer.file_len).map_err(|e| check_error(&layer.path, e))?;
                guard = Some(guard::Guard::new(f, h, &regions));
            } else {
                check::quick(&f, h, layer.file_len).map_err(|e| check_error(&layer.path, e))?;
            }
        }
        Ok((chain, guard))
    })
    .await
}

fn require_qcow2(path: &Path) -> std::result::Result<(), Qcow2Error> {
    use std::io::Read;
    chain::require_image_file(path)?;
    let mut head = [0u8; 4];
    let mut f = std::fs::File::open(path).map_err(|e| io_error(path, "open", e))?;
    let n = f.read(&mut head).map_err(|e| io_error(path, "read", e))?;
    if !is_qcow2(&head[..n]) {
        return Err(invalid(path, "not a qcow2 image (no QFI\\xfb magic)"));
    }
    Ok(())
}

fn check_error(path: &Path, e: check::CheckError) -> Qcow2Error {
    match e {
        check::CheckError::Problem(p) => problem(path, p),
        check::CheckError::Io(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
            Qcow2Error::Corrupt { path: path.to_owned(), reason: "metadata lies beyond the end of the file".into() }
        }
        check::CheckError::Io(e) => io_error(path, "read metadata", e),
    }
}

fn cluster_bits_of(path: &Path, cluster_size: u32) -> std::result::Result<u32, Qcow2Error> {
    let bits = cluster_size.trailing_zeros();
    if !cluster_size.is_power_of_two() || !(header::MIN_CLUSTER_BITS..=header::MAX_CLUSTER_BITS).contains(&bits) {
        return Err(invalid(path, format!("cluster size {cluster_size} is not a power of two from 512 to 2 MiB")));
    }
    Ok(bits)
}

fn check_size(path: &Path, size: u64, bits: u32) -> std::result::Result<(), Qcow2Error> {
    if !size.is_multiple_of(512) {
        return Err(invalid(path, format!("size {size} is not a multiple of 512")));
    }
    let max = header::max_size(bits);
    if size > max {
        return Err(invalid(path, format!("size {size} exceeds {max}, the most {}-byte clusters can map", 1u64 << bits)));
    }
    Ok(())
}

/// Creates a qcow2 image and makes it durable; removes the file again on failure.
async fn create_file(
    path: &Path,
    size: u64,
    bits: u32,
    backing: Option<(String, String)>,
) -> std::result::Result<(), Qcow2Error> {
    let p = path.to_owned();
    let r = worker::on_local_thread(move || async move {
        let storage = IoStorage::create_new(&p, EngineKind::Portable).await.map_err(|e| io_error(&p, "create", e))?;
        let mut builder = Qcow2::<IoStorage>::create_builder(storage).size(size).cluster_size(1 << bits);
        if let Some((name, format)) = backing {
            builder = builder.backing(name, format);
        }
        let r = builder.create().await.map_err(|e| worker::imago_error(&p, "create", e));
        if let Err(e) = r {
            let _ = std::fs::remove_file(&p);
            return Err(e);
        }
        sync_file_and_dir(&p)
    })
    .await;
    r.map_err(|e| io_error(path, "create", e))?
}

fn sync_file_and_dir(path: &Path) -> std::result::Result<(), Qcow2Error> {
    std::fs::File::open(path).and_then(|f| f.sync_all()).map_err(|e| io_error(path, "sync", e))?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir).and_then(|f| f.sync_all()).map_err(|e| io_error(dir, "sync folder", e))?;
    }
    Ok(())
}

/// Creates an empty qcow2 image (version 3, no backing) of `size` bytes at `path`, which must
/// not exist. `cluster_size` defaults to 64 KiB.
pub async fn create(path: &Path, size: u64, cluster_size: Option<u32>) -> std::result::Result<(), Qcow2Error> {
    let bits = cluster_bits_of(path, cluster_size.unwrap_or(DEFAULT_CLUSTER_SIZE))?;
    check_size(path, size, bits)?;
    create_file(path, size, bits, None).await
}

/// The overlay snapshot: a new, empty qcow2 image at `path` on top of `backing` (qcow2 or raw),
/// of the backing's size, with the backing's format recorded. See [`create_overlay_with`].
pub async fn create_overlay(path: &Path, backing: &Path) -> std::result::Result<(), Qcow2Error> {
    create_overlay_with(path, backing, OverlayKind::Snapshot).await
}

/// The ranges of chain `a` that may differ from chain `b`, for a copy whose destination
/// already holds `b`'s content: what the layers of `a` above the layers it shares with `b`
/// decide. `None` when `b` holds a layer `a` lacks (then nothing short of the whole chain is
/// known to be enough). Layers are the same when they are the same file (device and inode).
pub async fn diff_map(a: &Path, b: &Path) -> std::result::Result<Option<Vec<crate::image::Extent>>, Qcow2Error> {
    let (pa, pb) = (a.to_owned(), b.to_owned());
    let (a_ids, b_ids) = blocking(a, move || {
        use std::os::unix::fs::MetadataExt;
        let ids = |p: &Path| -> std::result::Result<Vec<(u64, u64)>, Qcow2Error> {
            chain::resolve(p, None)?
                .iter()
                .map(|l| std::fs::metadata(&l.path).map(|m| (m.dev(), m.ino())).map_err(|e| io_error(&l.path, "stat", e)))
                .collect()
        };
        Ok((ids(&pa)?, ids(&pb)?))
    })
    .await?;
    if b_ids.iter().any(|id| !a_ids.contains(id)) {
        return Ok(None);
    }
    let depth = a_ids.iter().take_while(|id| !b_ids.contains(id)).count();
    let image = Qcow2Image::open(a, Access::ReadOnly, EngineKind::Portable).await?;
    let ranges = image.own_ranges(depth).await.map_err(|e| io_error(a, "map", io::Error::other(e.to_string())))?;
    Ok(Some(ranges.into_iter().map(|(s, e)| crate::image::Extent { offset: s, length: e - s, state: crate::image::ExtentState::Data }).collect()))
}

/// As [`create_overlay`], laid out for `kind`. The backing is named by its file name when it
/// lives in the overlay's folder, else by its absolute path; its whole chain must open.
pub async fn create_overlay_with(path: &Path, backing: &Path, kind: OverlayKind) -> std::result::Result<(), Qcow2Error> {
    let (p, b) = (path.to_owned(), backing.to_owned());
    let (name, format, size, base_bits) = blocking(path, move || {
        let chain = chain::resolve(&b, None)?;
        // The overlay must open too: a chain one deeper than the deepest that opens was made,
        // and nothing could open it (or make another overlay on it) after.
        if chain.len() >= chain::MAX_DEPTH {
            return Err(Qcow2Error::Unsupported { path: p.clone(), what: format!("an overlay on {} would make a backing chain deeper than {}", b.display(), chain::MAX_DEPTH) });
        }
        let name = chain::backing_reference(&p, &b)?;
        let base = &chain[0];
        Ok((name, base.format_name().to_owned(), base.size, base.header().map(|h| h.cluster_bits)))
    })
    .await?;
    // A raw base may be any length; a qcow2's size is whole sectors, rounded up as
    // `qemu-img create -b` does (the tail past the base reads as zeroes).
    let size = size.next_multiple_of(512);
    let bits = match kind {
        OverlayKind::Snapshot => base_bits.unwrap_or(DEFAULT_CLUSTER_SIZE.trailing_zeros()),
        OverlayKind::FillingBacking => header::smallest_cluster_bits(size)
            .ok_or_else(|| invalid(path, format!("no cluster size maps {size} bytes")))?,
    };
    if size > header::max_size(bits) {
        return Err(invalid(path, format!("backing of {size} bytes is too large for {}-byte clusters", 1u64 << bits)));
    }
    create_file(path, size, bits, Some((name, format))).await
}

/// Points the overlay at `path` to `new_backing` by rewriting its header only, like
/// `qemu-img rebase -u`: no data is copied, so the caller vouches that the new backing holds
/// what the old one did where the overlay falls through. Refused when the new backing (whose
/// chain must open) is larger than the overlay or would make the chain loop. The image must not
/// be open.
pub async fn rebase(path: &Path, new_backing: &Path) -> std::result::Result<(), Qcow2Error> {
    let (p, b) = (path.to_owned(), new_backing.to_owned());
    blocking(path, move || {
        require_qcow2(&p)?;
        let file = std::fs::OpenOptions::new().read(true).write(true).open(&p).map_err(|e| io_error(&p, "open", e))?;
        lock_file(&file, &p)?;
        let (h, file_len) = chain::read_header_of(&file, &p)?;
        // It writes only the header, but into an image it would then take to be writable.
        h.writable().map_err(|e| problem(&p, e))?;
        check::for_writing(&file, &h, file_len).map_err(|e| check_error(&p, e))?;
        let new_chain = chain::resolve(&b, None)?;
        let me = std::fs::canonicalize(&p).map_err(|e| io_error(&p, "resolve path", e))?;
        for layer in &new_chain {
            if std::fs::canonicalize(&layer.path).is_ok_and(|c| c == me) {
                return Err(invalid(&p, format!("rebasing onto {} would make the chain loop", b.display())));
            }
        }
        let base = &new_chain[0];
        if base.size > h.size {
            return Err(invalid(
                &p,
                format!("new backing {} is larger than the image ({} > {} bytes)", b.display(), base.size, h.size),
            ));
        }
        let name = chain::backing_reference(&p, &b)?;
        let bytes = h.with_backing(Some((&name, base.format_name()))).map_err(|e| problem(&p, e))?;
        use std::os::unix::fs::FileExt;
        file.write_all_at(&bytes, 0).map_err(|e| io_error(&p, "write header", e))?;
        file.sync_all().map_err(|e| io_error(&p, "sync", e))
    })
    .await
}

/// Folds the clusters the overlay at `top` holds into its backing, which is grown first if
/// smaller: `qemu-img commit` without emptying the overlay. The chain read through `top` is the
/// same at every moment (the overlay still covers what it holds), so a crash leaves a sound
/// state and running it again finishes the job. The backing must be qcow2; the caller makes
/// sure nothing else reads through it and nothing writes `top` meanwhile.
pub async fn commit(top: &Path) -> std::result::Result<(), Qcow2Error> {
    /// The most one read and write of the fold moves.
    const CHUNK: u64 = 4 << 20;
    let t = top.to_owned();
    let chain = blocking(top, move || chain::resolve(&t, Some("qcow2"))).await?;
    let Some(backing) = chain.get(1) else { return Err(invalid(top, "no backing file: nothing to commit into")) };
    if backing.format_name() != "qcow2" {
        return Err(invalid(top, format!("its backing {} is {}, not qcow2", backing.path.display(), backing.format_name())));
    }
    let (base, size) = (backing.path.clone(), chain[0].size);
    if backing.size < size {
        resize(&base, size).await?;
    }
    let child = Qcow2Image::open(top, Access::ReadOnly, EngineKind::Portable).await?;
    let ranges = child.own_ranges(1).await.map_err(|e| io_error(top, "map", io::Error::other(e.to_string())))?;
    let target = Qcow2Image::open(&base, Access::ReadWrite, EngineKind::Portable).await?;
    for (start, end) in ranges {
        let mut at = start;
        while at < end {
            let n = (end - at).min(CHUNK);
            let (buf, r) = child.read(at, IoBuf::for_overwrite(n as usize)).await;
            r.map_err(|e| io_error(top, "read", io::Error::other(e.to_string())))?;
            target.write(at, Arc::new(buf), Durability::Cached).await.map_err(|e| io_error(&base, "write", io::Error::other(e.to_string())))?;
            at += n;
        }
    }
    target.flush().await.map_err(|e| io_error(&base, "flush", io::Error::other(e.to_string())))
}

/// Changes the virtual size of the qcow2 image at `path` to `new_size` (a multiple of 512).
/// Growing an overlay zeroes the new area where a longer backing would otherwise show through;
/// shrinking drops the data past the new end. The image must not be open.
pub async fn resize(path: &Path, new_size: u64) -> std::result::Result<(), Qcow2Error> {
    let _writer_lock = lock_writer(path).await?;
    let (chain, _) = resolve_for_open(path, Access::ReadWrite).await?;
    let bits = chain[0].header().map(|h| h.cluster_bits).unwrap_or(16);
    let version = chain[0].header().map(|h| h.version).unwrap_or(3);
    check_size(path, new_size, bits)?;
    let p = path.to_owned();
    let r = worker::on_local_thread(move || async move {
        let (mut top, _) = worker::open_chain(&chain, Access::ReadWrite, EngineKind::Portable).await?;
        let backing_size = chain.get(1).map(|l| l.size);
        worker::resize(&mut top, &p, new_size, backing_size, version).await
    })
    .await;
    r.map_err(|e| io_error(path, "resize", e))?
}

/// Describes the qcow2 image at `path` and its chain.
pub async fn info(path: &Path) -> std::result::Result<Qcow2Info, Qcow2Error> {
    let p = path.to_owned();
    blocking(path, move || {
        require_qcow2(&p)?;
        let chain = chain::resolve(&p, Some("qcow2"))?;
        let h: &Header = chain[0].header().ok_or_else(|| invalid(&p, "not a qcow2 image"))?;
        let file = std::fs::File::open(&p).map_err(|e| io_error(&p, "open", e))?;
        let meta = file.metadata().map_err(|e| io_error(&p, "stat", e))?;
        let file_len = crate::image::byte_len(&file).map_err(|e| io_error(&p, "stat", e))?;
        let allocated_bytes = check::allocated_bytes(&file, h, file_len).map_err(|e| check_error(&p, e))?;
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        // A block device takes all of its length, whatever it holds.
        let disk_bytes = if meta.file_type().is_block_device() { file_len } else { meta.blocks() * 512 };
        Ok(Qcow2Info {
            format: "qcow2",
            version: h.version,
            virtual_size: h.disk_size(),
            cluster_size: h.cluster_size(),
            backing_file: h.backing_file.clone(),
            backing_format: h.backing_format(),
            chain: chain.iter().map(|l| l.path.clone()).collect(),
            allocated_bytes,
            disk_bytes,
            corrupt: h.is_marked_corrupt(),
        })
    })
    .await
}

/// What a sound image's check found.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Qcow2Check {
    /// Clusters counted as used but referenced by nothing: wasted space, not corruption (a crash
    /// during allocation can leave them; `qemu-img check -r leaks` reclaims them).
    pub leaked_clusters: u64,
}

/// Checks the qcow2 image at `path`: its header and every backing's (and that they exist), then
/// its metadata as `qemu-img check` does (tables inside the file, reserved bits clear, refcounts
/// matching references, COPIED flags). Returns the first corruption found as the error; leaks
/// are counted in the report, as `qemu-img check` tells them apart (exit 3, not 2).
pub async fn check(path: &Path) -> std::result::Result<Qcow2Check, Qcow2Error> {
    let p = path.to_owned();
    blocking(path, move || {
        require_qcow2(&p)?;
        let chain = chain::resolve(&p, Some("qcow2"))?;
        let h = chain[0].header().ok_or_else(|| invalid(&p, "not a qcow2 image"))?;
        // Marked corrupt is a finding until `qemu-img check -r all` clears it.
        h.writable().map_err(|e| problem(&p, e))?;
        let file = std::fs::File::open(&p).map_err(|e| io_error(&p, "open", e))?;
        check::check(&file, h, chain[0].file_len).map(|leaked_clusters| Qcow2Check { leaked_clusters }).map_err(|e| check_error(&p, e))
    })
    .await
}

#[cfg(test)]
mod tests;
