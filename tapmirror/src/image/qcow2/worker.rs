//! The thread that owns an open chain.
//!
//! imago's format layer is built on `async_trait(?Send)`: its futures are not `Send`, so they
//! cannot run on tokio's multi-threaded runtime where the NBD server and the copy live. Each open
//! image therefore gets one thread running a current-thread runtime and a `LocalSet`; requests
//! arrive over a channel and each runs as its own local task, so many are in flight at once (their
//! file I/O is asynchronous through `FileIo`). Replies go back over oneshot channels, which keeps
//! the `Image` futures `Send`. Buffers move by ownership both ways, so nothing is copied here.
//!
//! A `tokio::sync::RwLock` around the top layer lets every request share it except discards:
//! imago's safe discard needs `&mut`, because freeing clusters while another request holds a
//! mapping to them could send that request's data to a reused cluster.

use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use imago::format::Format;
use imago::qcow2::Qcow2;
use imago::raw::Raw;
use imago::{DenyImplicitOpenGate, FormatAccess, FormatDriverBuilder, ShallowMapping};
use tokio::sync::{mpsc, oneshot};

use super::chain::{Layer, LayerFormat, io_error};
use super::direct::{Learnt, Remapping};
use super::guard::{Guard, Overlap};
use super::header::Header;
use super::storage::IoStorage;
use super::{BackingSlot, Qcow2Error};
use crate::image::{Access, Extent, ExtentState, ImageError, Result};
use crate::io::{Durability, EngineKind, FileIo, IoBuf};

/// Most extents one `allocation` call returns; callers continue from where it stopped.
const MAX_EXTENTS: usize = 4096;

/// A request to the image thread.
pub(super) enum Req {
    /// With `learn`, the reply of a read or write names the clusters of its range that later
    /// ones may reach directly (see `direct`).
    Read { offset: u64, buf: IoBuf, learn: bool, reply: oneshot::Sender<(IoBuf, Result<Learnt>)> },
    Write { offset: u64, buf: Arc<IoBuf>, durability: Durability, learn: bool, reply: oneshot::Sender<Result<Learnt>> },
    /// Zeroing and trims carry the guard that keeps their clusters' mappings forgotten (and,
    /// for a trim, direct reads and writes off) until they are done here (see `direct`).
    Zero { offset: u64, length: u64, durability: Durability, remapping: Option<Remapping>, reply: oneshot::Sender<Result<()>> },
    Trim { offset: u64, length: u64, remapping: Option<Remapping>, reply: oneshot::Sender<Result<()>> },
    Flush { reply: oneshot::Sender<Result<()>> },
    Map { offset: u64, length: u64, limit: usize, reply: oneshot::Sender<Result<Vec<Extent>>> },
    /// What the top `depth` layers of the chain hold themselves (not falling through).
    Own { depth: usize, reply: oneshot::Sender<Result<Vec<(u64, u64)>>> },
    Close { reply: oneshot::Sender<Result<()>> },
}

/// What the opener learns about the chain.
pub(super) struct Opened {
    pub size: u64,
    /// The top file, when it is open for writing.
    pub top_io: Option<Arc<FileIo>>,
}

/// The image thread's state.
struct State {
    top: tokio::sync::RwLock<FormatAccess<IoStorage>>,
    size: u64,
    cluster: u64,
    version: u32,
    writable: bool,
    backing: Arc<BackingSlot>,
    path: std::path::PathBuf,
    /// The top file's metadata, kept out of guest writes (open for writing; see `guard`).
    guard: Option<RefCell<Guard>>,
    /// Set once a request was found aimed at that metadata; shared with the image's handle.
    corrupt: Arc<AtomicBool>,
    /// Guest clusters writes and zeroings in flight are changing.
    changing: ClusterLocks,
}

/// The guest clusters requests in flight are changing. imago gives a cluster the top file does
/// not hold a new host cluster for each request that touches it, so two requests on one such
/// cluster at once (a data write and a zeroing of its other half, as a copy sends them) would
/// each allocate it, and the mapping written last would drop the other's data. Requests that
/// share a cluster therefore take turns; the others run at once. Held as ranges: in-flight
/// requests are few, and a range is one entry however small the clusters.
#[derive(Default)]
struct ClusterLocks {
    held: RefCell<Vec<(u64, u64)>>,
    released: tokio::sync::Notify,
}

impl ClusterLocks {
    /// Waits until no other request holds a cluster of `[offset, offset + length)` (clusters
    /// of `cluster` bytes), then holds them until the guard drops.
    async fn lock(&self, cluster: u64, offset: u64, length: u64) -> ClusterGuard<'_> {
        let range = (offset / cluster, (offset + length.max(1) - 1) / cluster);
        loop {
            // Registered before the look, so a release between the two is not missed.
            let released = self.released.notified();
            {
                let mut held = self.held.borrow_mut();
                if !held.iter().any(|&(first, last)| first <= range.1 && range.0 <= last) {
                    held.push(range);
                    return ClusterGuard { locks: self, range };
                }
            }
            released.await;
        }
    }
}

struct ClusterGuard<'a> {
    locks: &'a ClusterLocks,
    range: (u64, u64),
}

impl Drop for ClusterGuard<'_> {
    fn drop(&mut self) {
        let mut held = self.locks.held.borrow_mut();
        if let Some(i) = held.iter().position(|r| *r == self.range) {
            held.swap_remove(i);
        }
        drop(held);
        self.locks.released.notify_waiters();
    }
}

fn io_err(op: &'static str, offset: u64) -> impl FnOnce(io::Error) -> ImageError {
    move |source| ImageError::Io { op, offset, source }
}

/// Maps an imago error met while opening or changing `path`.
pub(super) fn imago_error(path: &std::path::Path, op: &'static str, e: io::Error) -> Qcow2Error {
    match e.kind() {
        io::ErrorKind::InvalidData => Qcow2Error::Corrupt { path: path.to_owned(), reason: e.to_string() },
        io::ErrorKind::Unsupported => Qcow2Error::Unsupported { path: path.to_owned(), what: e.to_string() },
        _ => io_error(path, op, e),
    }
}

/// Opens `chain` (top first) bottom-up with imago, every dependency given explicitly; also
/// returns the top file's I/O handle.
pub(super) async fn open_chain(
    chain: &[Layer],
    access: Access,
    engine: EngineKind,
) -> std::result::Result<(FormatAccess<IoStorage>, Arc<FileIo>), Qcow2Error> {
    let mut lower: Option<FormatAccess<IoStorage>> = None;
    let mut top_io = None;
    for (depth, layer) in chain.iter().enumerate().rev() {
        let writable = depth == 0 && access == Access::ReadWrite;
        let mut storage = IoStorage::open(&layer.path, writable, engine).await.map_err(|e| io_error(&layer.path, "open", e))?;
        if !writable && layer.header().is_some_and(Header::is_marked_corrupt) {
            storage = storage.hide_corrupt_bit();
        }
        top_io = Some(storage.file_io());
        let gate = DenyImplicitOpenGate::default();
        let opened = match &layer.format {
            LayerFormat::Raw => Raw::builder(storage).write(writable).open(gate).await.map(FormatAccess::new),
            LayerFormat::Qcow2(_) => Qcow2::<IoStorage>::builder(storage)
                .backing(lower.take())
                .data_file(None)
                .write(writable)
                .open(gate)
                .await
                .map(FormatAccess::new),
        };
        lower = Some(opened.map_err(|e| imago_error(&layer.path, "open", e))?);
    }
    match (lower, top_io) {
        (Some(top), Some(io)) => Ok((top, io)),
        _ => Err(Qcow2Error::InvalidArgument { path: Default::default(), reason: "empty chain".into() }),
    }
}

/// Runs `f` on a fresh thread with a current-thread runtime and a `LocalSet`, for imago work
/// whose futures are not `Send`; the returned future is.
pub(super) async fn on_local_thread<T, F, Fut>(f: F) -> io::Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = T> + 'static,
{
    let (tx, rx) = oneshot::channel();
    std::thread::Builder::new().name("qcow2-admin".into()).spawn(move || {
        let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(rt) => rt,
            Err(e) => {
                tracing::error!(error = %e, "no runtime for a qcow2 operation");
                return;
            }
        };
        let local = tokio::task::LocalSet::new();
        let _ = tx.send(local.block_on(&rt, f()));
    })?;
    rx.await.map_err(|_| io::Error::other("qcow2 operation thread ended without an answer"))
}

/// Starts the thread for `chain`; resolves once imago has opened it (or failed to).
pub(super) async fn start(
    chain: Vec<Layer>,
    access: Access,
    engine: EngineKind,
    backing: Arc<BackingSlot>,
    guard: Option<Guard>,
    corrupt: Arc<AtomicBool>,
) -> std::result::Result<(mpsc::UnboundedSender<Req>, std::thread::JoinHandle<()>, Opened), Qcow2Error> {
    let path = chain[0].path.clone();
    let (tx, rx) = mpsc::unbounded_channel();
    let (ready_tx, ready_rx) = oneshot::channel();
    let thread = std::thread::Builder::new()
        .name("qcow2".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(io_error(&chain[0].path, "start runtime", e)));
                    return;
                }
            };
            let local = tokio::task::LocalSet::new();
            local.block_on(&rt, async move {
                let (top, top_io) = match open_chain(&chain, access, engine).await {
                    Ok(opened) => opened,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let h = chain[0].header();
                let state = Rc::new(State {
                    // Whole sectors (`Header::disk_size`); imago takes the header's as it is.
                    size: h.map_or(top.size(), |h| top.size().min(h.disk_size())),
                    cluster: h.map(|h| h.cluster_size()).unwrap_or(65536),
                    version: h.map(|h| h.version).unwrap_or(3),
                    writable: access == Access::ReadWrite,
                    top: tokio::sync::RwLock::new(top),
                    backing,
                    path: chain[0].path.clone(),
                    guard: guard.map(RefCell::new),
                    corrupt,
                    changing: ClusterLocks::default(),
                });
                let top_io = state.writable.then_some(top_io);
                let _ = ready_tx.send(Ok(Opened { size: state.size, top_io }));
                serve(state, rx).await;
            });
        })
        .map_err(|e| io_error(&path, "start thread", e))?;
    match ready_rx.await {
        Ok(Ok(opened)) => Ok((tx, thread, opened)),
        Ok(Err(e)) => {
            let _ = thread.join();
            Err(e)
        }
        Err(_) => {
            let _ = thread.join();
            Err(io_error(&path, "open", io::Error::other("image thread ended during open")))
        }
    }
}

async fn serve(state: Rc<State>, mut rx: mpsc::UnboundedReceiver<Req>) {
    let mut tasks = tokio::task::JoinSet::new();
    let mut closing = None;
    loop {
        tokio::select! {
            req = rx.recv() => match req {
                Some(Req::Close { reply }) => {
                    closing = Some(reply);
                    break;
                }
                Some(req) => {
                    tasks.spawn_local(handle(Rc::clone(&state), req));
                }
                None => break,
            },
            Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                if let Err(e) = done {
                    tracing::error!(error = %e, "qcow2 request task failed");
                }
            }
        }
    }
    while tasks.join_next().await.is_some() {}
    // imago keeps L2 and refcount updates in its caches until flushed; never leave them there.
    let r = flush(&state).await;
    if let Err(e) = &r {
        tracing::error!(path = %state.path.display(), error = %e, "flushing qcow2 image on close");
    }
    if let Some(reply) = closing {
        let _ = reply.send(r);
    }
}

async fn flush(state: &State) -> Result<()> {
    if !state.writable {
        return Ok(());
    }
    let top = state.top.read().await;
    top.flush().await.map_err(io_err("flush", 0))?;
    top.sync().await.map_err(io_err("flush", 0))
}

async fn handle(state: Rc<State>, req: Req) {
    match req {
        Req::Read { offset, mut buf, learn, reply } => {
            let r = async {
                let top = state.top.read().await;
                top.read(&mut buf[..], offset).await.map_err(io_err("read", offset))?;
                Ok(if learn { writable_clusters(&state, &top, offset, buf.len() as u64).await } else { Vec::new() })
            }
            .await;
            let _ = reply.send((buf, r));
        }
        Req::Write { offset, buf, durability, learn, reply } => {
            let r = async {
                wait_for_backing(&state, offset, buf.len() as u64).await?;
                let _turn = state.changing.lock(state.cluster, offset, buf.len() as u64).await;
                let top = state.top.read().await;
                keep_off_metadata(&state, &top, "write", offset, buf.len() as u64).await?;
                top.write(&buf[..], offset).await.map_err(io_err("write", offset))?;
                let learnt = if learn { writable_clusters(&state, &top, offset, buf.len() as u64).await } else { Vec::new() };
                drop(top);
                if durability == Durability::Stable {
                    flush(&state).await?;
                }
                Ok(learnt)
            }
            .await;
            let _ = reply.send(r);
        }
        Req::Zero { offset, length, durability, remapping, reply } => {
            let r = async {
                wait_for_backing(&state, offset, length).await?;
                let _turn = state.changing.lock(state.cluster, offset, length).await;
                let top = state.top.read().await;
                keep_off_metadata(&state, &top, "write zeroes", offset, length).await?;
                // Whole clusters become zero clusters (their host clusters stay allocated, so
                // concurrent requests' mappings remain valid); partial ones get zero data.
                top.write_zeroes(offset, length).await.map_err(io_err("write zeroes", offset))?;
                drop(top);
                if durability == Durability::Stable {
                    flush(&state).await?;
                }
                Ok(())
            }
            .await;
            drop(remapping);
            let _ = reply.send(r);
        }
        Req::Trim { offset, length, remapping, reply } => {
            let r = trim(&state, offset, length).await;
            drop(remapping);
            let _ = reply.send(r);
        }
        Req::Flush { reply } => {
            let _ = reply.send(flush(&state).await);
        }
        Req::Map { offset, length, limit, reply } => {
            let top = state.top.read().await;
            let _ = reply.send(allocation(&top, offset, length, limit).await);
        }
        Req::Own { depth, reply } => {
            let top = state.top.read().await;
            let _ = reply.send(own_ranges(&top, depth, state.size).await);
        }
        Req::Close { reply } => {
            let _ = reply.send(Ok(()));
        }
    }
}

/// The clusters of `[offset, offset + length)` that the top file holds and may be written in
/// place, as (guest cluster index, host cluster offset). Only an aid: a lookup that fails ends
/// the list there, and the request it follows succeeded all the same. A cluster mapped onto
/// the file's metadata (see `guard`) is left out, so that its writes keep coming here.
async fn writable_clusters(state: &State, top: &FormatAccess<IoStorage>, offset: u64, length: u64) -> Learnt {
    let cluster = state.cluster;
    let mut out = Vec::new();
    let (mut pos, end) = (offset / cluster * cluster, offset + length);
    while pos < end {
        let Ok((mapping, l)) = top.get_shallow_mapping(pos, end - pos).await else { break };
        if l == 0 {
            break;
        }
        // Whole clusters: `pos` is at a cluster's start, and a run ends at one or at `end`.
        let run_end = (pos + l).min(end).next_multiple_of(cluster);
        if let ShallowMapping::Raw { offset: host, writable: true, .. } = mapping {
            let on_metadata = |at: u64, len: u64| {
                state.guard.as_ref().is_some_and(|g| g.borrow_mut().overlap(at, len).map_or(true, |o| o.is_some()))
            };
            // One lookup for the run; cluster by cluster only where it meets metadata.
            let run_on_metadata = on_metadata(host, run_end - pos);
            let mut c = pos;
            while c < run_end {
                if !run_on_metadata || !on_metadata(host + (c - pos), cluster) {
                    out.push((c / cluster, host + (c - pos)));
                }
                c += cluster;
            }
        }
        pos = run_end;
    }
    out
}

/// Refuses a write, zeroing or trim of `[offset, offset + length)` where the top file maps any
/// of it onto its own metadata (see `guard`) in a way that would destroy that metadata: with the
/// COPIED bit imago writes (or, for a trim, frees) that cluster in place; without it, imago
/// copies the cluster away and lets go of its reference, which is safe only if the stored
/// refcount counts the metadata's own reference too. The first refused request marks the image
/// corrupt, on disk and here, and no write is taken after it, as QEMU does.
async fn keep_off_metadata(state: &State, top: &FormatAccess<IoStorage>, op: &'static str, offset: u64, length: u64) -> Result<()> {
    if state.corrupt.load(Ordering::Acquire) {
        return Err(ImageError::Io { op, offset, source: marked_corrupt() });
    }
    let Some(guard) = &state.guard else { return Ok(()) };
    let (mut pos, end) = (offset / state.cluster * state.cluster, offset + length);
    while pos < end {
        let (mapping, l) = top.get_shallow_mapping(pos, end - pos).await.map_err(io_err(op, pos))?;
        if l == 0 {
            break;
        }
        match mapping {
            ShallowMapping::Raw { offset: host, writable, .. } => {
                keep_off(state, top, op, pos, host, l, writable).await?;
            }
            // A zero cluster may keep a host cluster, which imago writes into in place (COPIED)
            // or lets go of, and a compressed cluster's bytes are let go of when it is copied
            // away; the mapping does not say where either lies, the L2 entry does.
            ShallowMapping::Zero { explicit: true, .. } | ShallowMapping::Special { .. } => {
                let hidden = guard.borrow().hosts_the_mapping_hides(pos, l).map_err(io_err(op, pos))?;
                for (guest, host, len, copied) in hidden {
                    keep_off(state, top, op, guest, host, len, copied).await?;
                }
            }
            _ => {}
        }
        pos += l;
    }
    Ok(())
}

/// [`keep_off_metadata`] for guest bytes from `guest` that map onto host bytes
/// `[host, host + len)`, `copied` as the mapping's COPIED bit.
async fn keep_off(
    state: &State,
    top: &FormatAccess<IoStorage>,
    op: &'static str,
    guest: u64,
    host: u64,
    len: u64,
    copied: bool,
) -> Result<()> {
    let Some(guard) = &state.guard else { return Ok(()) };
    let mut at = host;
    loop {
        // Not in a `while let`: its temporary borrow would last through the body.
        let found = guard.borrow_mut().overlap(at, (host + len).saturating_sub(at));
        let Some(o) = found.map_err(io_err(op, guest))? else { return Ok(()) };
        at = o.host + state.cluster;
        if !copied {
            // Go by the refcount on disk once imago's caches are written back to it.
            top.flush().await.map_err(io_err(op, guest))?;
            if guard.borrow().keeps_its_reference(o.host).map_err(io_err(op, guest))? {
                continue;
            }
        }
        return Err(signal_corruption(state, guard, op, guest + (o.host.max(host) - host), o));
    }
}

/// Marks the image corrupt (see [`keep_off_metadata`]) and gives the refused request's error.
fn signal_corruption(state: &State, guard: &RefCell<Guard>, op: &'static str, guest: u64, o: Overlap) -> ImageError {
    state.corrupt.store(true, Ordering::Release);
    let marked = guard.borrow().mark_corrupt();
    tracing::error!(
        path = %state.path.display(),
        guest,
        host = o.host,
        metadata = o.what,
        "refused a {op}: the image maps guest data onto its own metadata; \
         marked corrupt, repair with `qemu-img check -r all`"
    );
    if let Err(e) = marked {
        tracing::error!(path = %state.path.display(), error = %e, "could not set the image's corrupt bit");
    }
    ImageError::Io {
        op,
        offset: guest,
        source: io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "corrupt qcow2 image: guest offset {guest:#x} maps onto the {} at host offset {:#x}; \
                 writes refused, repair with `qemu-img check -r all`",
                o.what, o.host
            ),
        ),
    }
}

/// The error of every write after the image was found corrupt.
pub(super) fn marked_corrupt() -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        "corrupt qcow2 image: guest data maps onto its metadata; writes refused, repair with `qemu-img check -r all`",
    )
}

/// Frees whole clusters inside the range (they read as zeroes afterwards); partial clusters at
/// the ends are left alone, which a trim (a hint) allows, and which never copies a cluster.
async fn trim(state: &State, offset: u64, length: u64) -> Result<()> {
    if state.version < 3 {
        // v2 has no zero clusters, so imago cannot discard safely there; a no-op is a valid trim.
        return Ok(());
    }
    let cs = state.cluster;
    let start = offset.next_multiple_of(cs);
    let end = if offset + length >= state.size { state.size } else { (offset + length) / cs * cs };
    if start >= end {
        return Ok(());
    }
    let mut top = state.top.write().await;
    keep_off_metadata(state, &top, "trim", start, end - start).await?;
    top.discard_to_zero(start, end - start).await.map_err(io_err("trim", start))
}

/// Before a write or zeroing that covers only part of a cluster the overlay does not hold yet,
/// wait until the backing holds that cluster's final bytes (see the module docs, "Overlays on a
/// backing that is still being filled").
async fn wait_for_backing(state: &State, offset: u64, length: u64) -> Result<()> {
    let Some(fill) = state.backing.filling() else { return Ok(()) };
    if length == 0 {
        return Ok(());
    }
    let (cs, size, end) = (state.cluster, state.size, offset + length);
    let head = offset / cs * cs;
    let tail = (end - 1) / cs * cs;
    let partial = |c: u64| offset > c || end < (c + cs).min(size);
    let mut clusters = Vec::with_capacity(2);
    if partial(head) {
        clusters.push(head);
    }
    if tail != head && partial(tail) {
        clusters.push(tail);
    }
    for c in clusters {
        let falls_through = {
            let top = state.top.read().await;
            let (m, _) = top.get_shallow_mapping(c, 1).await.map_err(io_err("map", c))?;
            matches!(m, ShallowMapping::Indirect { .. })
        };
        if falls_through {
            let len = (c + cs).min(size) - c;
            fill.ready(c, len).await.map_err(io_err("wait for backing", c))?;
            forget_backing_metadata(state, c).await?;
        }
    }
    Ok(())
}

/// Drops what imago has cached of the backing chain's metadata (L1/L2 tables, header), so a
/// qcow2 backing filled through another handle is read afresh before the copy-on-write.
async fn forget_backing_metadata(state: &State, offset: u64) -> Result<()> {
    // Exclusive: no request may hold a cached table while the caches are emptied.
    let top = state.top.write().await;
    let (m, _) = top.get_shallow_mapping(offset, 1).await.map_err(io_err("map", offset))?;
    if let ShallowMapping::Indirect { layer, .. } = m {
        // SAFETY: imago requires the on-disk state to be consistent and nothing unwritten to be
        // dropped. Backing layers are opened read-only, so they hold no unwritten state; the
        // `BackingFill::ready` contract says the filler has written the range (metadata included)
        // to the file; and the exclusive lock above means no request is using a cached table.
        unsafe { layer.invalidate_cache() }.await.map_err(io_err("reload backing metadata", offset))?;
    }
    Ok(())
}

/// Resizes `top` (opened writable, alone) to `new_size`. `backing_size` is the size of its
/// backing, if any: growing past the old end must not let a longer backing show through the new
/// area, so that part is zeroed, as QEMU does (with zero clusters from version 3, with zero
/// data in version 2, which has none).
pub(super) async fn resize(
    top: &mut FormatAccess<IoStorage>,
    path: &std::path::Path,
    new_size: u64,
    backing_size: Option<u64>,
    version: u32,
) -> std::result::Result<(), Qcow2Error> {
    let old = top.size();
    top.resize(new_size, imago::format::PreallocateMode::None).await.map_err(|e| imago_error(path, "resize", e))?;
    if let Some(b) = backing_size
        && new_size > old
        && b > old
    {
        let end = b.min(new_size);
        if version >= 3 {
            top.write_zeroes(old, end - old).await.map_err(|e| imago_error(path, "zero the new area", e))?;
        } else {
            let zeroes = vec![0u8; (end - old).min(1 << 20) as usize];
            let mut at = old;
            while at < end {
                let n = (end - at).min(zeroes.len() as u64) as usize;
                top.write(&zeroes[..n], at).await.map_err(|e| imago_error(path, "zero the new area", e))?;
                at += n as u64;
            }
        }
    }
    top.flush().await.map_err(|e| imago_error(path, "flush", e))?;
    top.sync().await.map_err(|e| imago_error(path, "sync", e))
}

/// What `[offset, ..)` holds across the chain, and for how long (at most `max`).
///
/// Walks the layers with imago's shallow mappings: the first layer that allocates the range
/// decides it (data, or zero for a zero cluster); a raw layer answers with its file's data and
/// holes; falling off the bottom (or past a shorter backing's end) is a hole.
async fn extent_at(top: &FormatAccess<IoStorage>, offset: u64, max: u64) -> io::Result<(ExtentState, u64)> {
    let (mut layer, mut off, mut len) = (top, offset, max);
    loop {
        let (mapping, l) = layer.get_shallow_mapping(off, len).await?;
        let l = l.min(len);
        match mapping {
            ShallowMapping::Raw { storage, offset: host, .. } if layer.inner().format() == Format::Raw => {
                let data = storage.seek_data(host)?.unwrap_or(u64::MAX);
                if data > host {
                    return Ok((ExtentState::Hole, l.min(data - host)));
                }
                let hole = storage.seek_hole(host)?.unwrap_or(u64::MAX).max(host + 1);
                return Ok((ExtentState::Data, l.min(hole - host)));
            }
            ShallowMapping::Raw { .. } | ShallowMapping::Special { .. } => return Ok((ExtentState::Data, l)),
            ShallowMapping::Indirect { layer: lower, offset: o, .. } => {
                (layer, off, len) = (lower, o, l);
            }
            ShallowMapping::Zero { explicit: true, .. } => return Ok((ExtentState::Zero, l)),
            ShallowMapping::Zero { .. } => return Ok((ExtentState::Hole, l)),
            ShallowMapping::Eof { .. } => return Ok((ExtentState::Hole, len)),
            _ => return Ok((ExtentState::Data, l)),
        }
    }
}

/// The ranges whose content one of the top `depth` layers decides (data or a zero cluster),
/// rather than a layer below them: what a copy must send to a destination that already holds
/// the chain below those layers. Sorted and merged.
async fn own_ranges(top: &FormatAccess<IoStorage>, depth: usize, size: u64) -> Result<Vec<(u64, u64)>> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut pos = 0;
    while pos < size {
        let (mut layer, mut off, mut len, mut d) = (top, pos, size - pos, 0);
        let (own, l) = loop {
            if d == depth {
                break (false, len);
            }
            let (mapping, l) = layer.get_shallow_mapping(off, len).await.map_err(io_err("map", pos))?;
            let l = l.min(len);
            match mapping {
                ShallowMapping::Indirect { layer: lower, offset: o, .. } => (layer, off, len, d) = (lower, o, l, d + 1),
                // Past the end of a shorter layer, or unallocated with nothing below.
                ShallowMapping::Eof { .. } => break (false, len),
                ShallowMapping::Zero { explicit: false, .. } => break (false, l),
                _ => break (true, l),
            }
        };
        if l == 0 {
            return Err(ImageError::Io { op: "map", offset: pos, source: io::Error::other("empty mapping") });
        }
        if own {
            match out.last_mut() {
                Some(last) if last.1 == pos => last.1 += l,
                _ => out.push((pos, pos + l)),
            }
        }
        pos += l;
    }
    Ok(out)
}

async fn allocation(top: &FormatAccess<IoStorage>, offset: u64, length: u64, limit: usize) -> Result<Vec<Extent>> {
    let limit = limit.clamp(1, MAX_EXTENTS);
    let end = offset + length;
    let mut out: Vec<Extent> = Vec::new();
    let mut pos = offset;
    // An extent is only final once the next one has started, so stop one past the limit.
    while pos < end && out.len() <= limit {
        let (state, len) = extent_at(top, pos, end - pos).await.map_err(io_err("map", pos))?;
        if len == 0 {
            return Err(ImageError::Io { op: "map", offset: pos, source: io::Error::other("empty mapping") });
        }
        match out.last_mut() {
            Some(last) if last.state == state && last.offset + last.length == pos => last.length += len,
            _ => out.push(Extent { offset: pos, length: len, state }),
        }
        pos += len;
    }
    out.truncate(limit);
    Ok(out)
}
