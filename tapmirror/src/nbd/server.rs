//! The NBD server: one export of one `Image`, many connections.
//!
//! Per connection:
//!
//! ```text
//!  socket ─▶ reader loop ──(permits: request count, payload bytes)──▶ tokio task per request
//!                                                                         │ image I/O
//!  socket ◀─ writer task (batches replies into one writev) ◀── mpsc ◀─────┘
//! ```
//!
//! The export's minimum block size is the image's write unit (`Features::min_block`: 1, or 512
//! for VHD); requests not aligned to it get `EINVAL` (proto.md, "Block size constraints": a
//! client that negotiated sizes must honour them, and qemu, nbdcopy and libnbd do, splitting or
//! read-modify-writing on their side, where the data they complete a sector with is the
//! export's own).
//!
//! Requests run concurrently and reply out of order, as the protocol allows. The reader takes
//! permits before it reads a payload, so a fast client is slowed by the socket, not by memory.
//! A request the protocol can answer (out of range, too long, unknown command or flag, write to
//! a read-only export) gets its error reply and the connection goes on; a write's payload is read
//! and dropped first so the stream stays in step. Only a broken stream (bad magic, truncated
//! header, garbage in negotiation) closes the connection, and only that one.

use std::future::Future;
use std::io::{self, IoSlice};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use super::proto::{self, BlockSize, Errno, Request, alloc_flags, chunk, cmd, cmd_flags, opt, rep, tflags};
use crate::image::{ExtentState, Image, ImageError, ZeroAlloc, ZeroSpeed};
use crate::io::{Durability, IoBuf};
use crate::mirror::{Mirror, MirrorSlot, Route};

/// Largest payload (read or write) a request may carry.
pub const MAX_PAYLOAD: u32 = 32 * 1024 * 1024;
/// Largest option data accepted during negotiation.
const MAX_OPTION_DATA: u32 = 64 * 1024;
/// Options a client may send before it must pick an export.
const MAX_OPTIONS: usize = 256;
/// Reads at least this long are split into data and hole chunks from the allocation map.
const HOLE_SCAN_MIN: u32 = 64 * 1024;
/// Context id we give `base:allocation`.
const BASE_ALLOCATION_ID: u32 = 1;

/// Tunables of a server.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Requests in flight per connection.
    pub max_requests: usize,
    /// Payload bytes in flight per connection (at least `MAX_PAYLOAD`).
    pub max_bytes: usize,
    /// Time a client has to finish negotiation.
    pub handshake_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits { max_requests: 128, max_bytes: 64 << 20, handshake_timeout: Duration::from_secs(30) }
    }
}

/// The one export a server offers.
#[derive(Clone, Debug)]
pub struct ExportConfig {
    /// Its name; the empty name also selects it.
    pub name: String,
    /// Optional description sent with `NBD_INFO_DESCRIPTION`.
    pub description: Option<String>,
    /// Refuse writes even when the image allows them.
    pub read_only: bool,
}

/// How a connection is greeted. The default is the listening socket's: fixed newstyle, and
/// only the export's name (or the empty name) opens it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Handshake {
    /// The old-style greeting instead (tapdisk's mirror client, on xapi's `/services/SM/nbd/`).
    pub oldstyle: bool,
    /// Any export name opens the export (tapdisk asks for `tapdisk_client`).
    pub any_export: bool,
}

/// Counters of what a server did, for logs and the control socket.
#[derive(Debug)]
pub struct Stats {
    /// When the server started (rates are averages since then).
    pub started: std::time::Instant,
    /// Connections accepted.
    pub connections: AtomicU64,
    /// Connections open now (a migration's destination is finalized only once its source's
    /// mirror connection has gone).
    pub open_connections: AtomicU64,
    /// Requests answered.
    pub requests: AtomicU64,
    /// Requests answered with an error.
    pub errors: AtomicU64,
    /// Bytes read by clients.
    pub bytes_read: AtomicU64,
    /// Bytes written by clients.
    pub bytes_written: AtomicU64,
}

impl Default for Stats {
    fn default() -> Stats {
        Stats {
            started: std::time::Instant::now(),
            connections: AtomicU64::new(0),
            open_connections: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            bytes_read: AtomicU64::new(0),
            bytes_written: AtomicU64::new(0),
        }
    }
}

/// One connection counted in [`Stats::open_connections`] while it lives, however it ends.
struct OpenConnection<I: Image>(Arc<NbdServer<I>>);

impl<I: Image> OpenConnection<I> {
    fn count(server: &Arc<NbdServer<I>>) -> OpenConnection<I> {
        server.stats.open_connections.fetch_add(1, Ordering::Relaxed);
        OpenConnection(Arc::clone(server))
    }
}

impl<I: Image> Drop for OpenConnection<I> {
    fn drop(&mut self) {
        self.0.stats.open_connections.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Why a connection ended abnormally.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    /// The socket failed or closed mid-message.
    #[error("connection I/O")]
    Io(#[from] io::Error),
    /// The client broke the protocol in a way that desynchronises the stream.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// Negotiation took longer than allowed.
    #[error("negotiation timed out")]
    Timeout,
}

impl From<proto::WireError> for ConnError {
    fn from(e: proto::WireError) -> ConnError {
        ConnError::Protocol(e.to_string())
    }
}

/// What negotiation settled for one connection.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Session {
    /// Structured replies are on.
    pub structured: bool,
    /// `base:allocation` is selected for `BLOCK_STATUS`.
    pub base_allocation: bool,
}

/// An NBD server for one image.
pub struct NbdServer<I: Image> {
    /// Swappable while paused (`unpause --leaf`: the snapshot switch).
    image: std::sync::RwLock<Arc<I>>,
    /// Whether the export refuses writes: fixed at creation, since a paused server may hold a
    /// read-only stand-in of a writable image.
    read_only: bool,
    /// The minimum block size clients are told: fixed at creation, as clients learn it once.
    min_block: u32,
    export: ExportConfig,
    limits: Limits,
    stats: Stats,
    mirror: Arc<MirrorSlot>,
    /// Every request holds this for reading while it runs; `pause` takes it for writing.
    gate: Arc<tokio::sync::RwLock<()>>,
    paused: std::sync::Mutex<Option<tokio::sync::OwnedRwLockWriteGuard<()>>>,
    /// Requests dispatched and not yet answered, for `drain`.
    outstanding: AtomicU64,
    idle: tokio::sync::Notify,
    /// The TCP connections this server holds, as (its address, the client's), so that a
    /// mirror target that is this very server over TCP can be told (`is_own_tcp`).
    tcp_connections: TcpConnections,
}

/// (the server's address, the client's) of each TCP connection a server holds.
type TcpConnections = Arc<std::sync::Mutex<std::collections::HashSet<(std::net::SocketAddr, std::net::SocketAddr)>>>;

/// A TCP connection's read half, which keeps the connection in its server's
/// [`TcpConnections`] for as long as it lives (the connection's task holds it to the end).
struct TrackedTcp {
    inner: tokio::net::tcp::OwnedReadHalf,
    set: TcpConnections,
    key: (std::net::SocketAddr, std::net::SocketAddr),
}

impl AsyncRead for TrackedTcp {
    fn poll_read(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>, buf: &mut tokio::io::ReadBuf<'_>) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl Drop for TrackedTcp {
    fn drop(&mut self) {
        if let Ok(mut set) = self.set.lock() {
            set.remove(&self.key);
        }
    }
}

/// An address as a socket of the other family would see it: an IPv4 client of a server
/// listening on `[::]` shows as `::ffff:a.b.c.d`.
fn canonical(a: std::net::SocketAddr) -> std::net::SocketAddr {
    std::net::SocketAddr::new(a.ip().to_canonical(), a.port())
}

/// Counts a request as outstanding for as long as it lives.
struct Outstanding<'a>(&'a AtomicU64, &'a tokio::sync::Notify);

impl Drop for Outstanding<'_> {
    fn drop(&mut self) {
        if self.0.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.1.notify_waiters();
        }
    }
}

impl<I: Image> NbdServer<I> {
    /// A server for `image` with default limits.
    pub fn new(image: Arc<I>, export: ExportConfig) -> Arc<Self> {
        Self::with_limits(image, export, Limits::default())
    }

    /// A server for `image` with the given limits.
    pub fn with_limits(image: Arc<I>, export: ExportConfig, limits: Limits) -> Arc<Self> {
        Arc::new(NbdServer {
            read_only: export.read_only || image.features().read_only,
            min_block: image.features().min_block.max(1),
            image: std::sync::RwLock::new(image),
            export,
            limits,
            stats: Stats::default(),
            mirror: Arc::new(MirrorSlot::default()),
            gate: Arc::new(tokio::sync::RwLock::new(())),
            paused: std::sync::Mutex::new(None),
            outstanding: AtomicU64::new(0),
            idle: tokio::sync::Notify::new(),
            tcp_connections: TcpConnections::default(),
        })
    }

    /// Whether the TCP connection from `local` to `peer` (a client's view) is one this server
    /// accepted: a client in this process connected to this server.
    pub fn is_own_tcp(&self, local: std::net::SocketAddr, peer: std::net::SocketAddr) -> bool {
        self.tcp_connections.lock().is_ok_and(|set| set.contains(&(canonical(peer), canonical(local))))
    }

    /// The image served now.
    pub fn image(&self) -> Arc<I> {
        match self.image.read() {
            Ok(i) => Arc::clone(&i),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// Serves `new` from now on (the snapshot switch). Only while paused, so no request runs
    /// across the switch, and only an image of the same size, which clients already know.
    pub fn replace_image(&self, new: Arc<I>) -> Result<Arc<I>, String> {
        if !self.is_paused() {
            return Err("the server must be paused to switch images".into());
        }
        let mut cur = self.image.write().map_err(|_| "image slot poisoned".to_owned())?;
        if new.size() != cur.size() {
            return Err(format!("new image is {} bytes, clients know {}", new.size(), cur.size()));
        }
        if new.features().min_block > self.min_block {
            return Err(format!("new image writes in units of {} bytes, clients know {}", new.features().min_block, self.min_block));
        }
        Ok(std::mem::replace(&mut *cur, new))
    }

    /// The mirror slot.
    pub fn mirror(&self) -> &Arc<MirrorSlot> {
        &self.mirror
    }

    /// Lets in-flight requests finish and holds new ones until `unpause`.
    pub async fn pause(&self) {
        let guard = Arc::clone(&self.gate).write_owned().await;
        if let Ok(mut p) = self.paused.lock() {
            *p = Some(guard);
        }
    }

    /// Releases requests held by `pause`. Returns whether the server was paused.
    pub fn unpause(&self) -> bool {
        self.paused.lock().map(|mut p| p.take().is_some()).unwrap_or(false)
    }

    /// Whether `pause` is in force.
    pub fn is_paused(&self) -> bool {
        self.paused.lock().map(|p| p.is_some()).unwrap_or(false)
    }

    /// Requests dispatched and not yet answered.
    pub fn outstanding(&self) -> u64 {
        self.outstanding.load(Ordering::Acquire)
    }

    /// Waits until no request is outstanding (with a mirror, a write is outstanding until both
    /// sides have it). `false` if that did not happen within `timeout`.
    pub async fn drain(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let idle = self.idle.notified();
            if self.outstanding() == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, idle).await.is_err() {
                return self.outstanding() == 0;
            }
        }
    }

    fn begin(&self) -> Outstanding<'_> {
        self.outstanding.fetch_add(1, Ordering::AcqRel);
        Outstanding(&self.outstanding, &self.idle)
    }

    /// Counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn transmission_flags(&self, session: &Session) -> u16 {
        let f = self.image().features();
        let mut flags = tflags::HAS_FLAGS | tflags::SEND_FLUSH | tflags::SEND_FUA;
        if f.multi_conn {
            flags |= tflags::CAN_MULTI_CONN;
        }
        if session.structured {
            flags |= tflags::SEND_DF;
        }
        if self.read_only() {
            flags |= tflags::READ_ONLY;
        } else {
            flags |= tflags::SEND_TRIM | tflags::SEND_WRITE_ZEROES;
            if f.fast_zero {
                flags |= tflags::SEND_FAST_ZERO;
            }
        }
        flags
    }

    fn block_size(&self) -> BlockSize {
        BlockSize { minimum: self.min_block, preferred: 4096.max(self.min_block), maximum: MAX_PAYLOAD }
    }

    fn export_matches(&self, name: &str) -> bool {
        name.is_empty() || name == self.export.name
    }

    /// Accepts connections on a Unix socket until `shutdown`, serving each in its own task;
    /// returns once every connection has ended.
    pub async fn serve_unix(self: Arc<Self>, listener: UnixListener, shutdown: CancellationToken) {
        self.accept_loop(shutdown, || async {
            let (s, _) = listener.accept().await?;
            super::unix::split(s.into_std()?)
        })
        .await
    }

    /// As `serve_unix`, for TCP (with `TCP_NODELAY`: replies are small and latency matters).
    pub async fn serve_tcp(self: Arc<Self>, listener: TcpListener, shutdown: CancellationToken) {
        let set = Arc::clone(&self.tcp_connections);
        self.accept_loop(shutdown, || async {
            let (stream, peer) = listener.accept().await?;
            stream.set_nodelay(true)?;
            tracing::debug!(%peer, "tcp connection");
            let key = (canonical(stream.local_addr()?), canonical(peer));
            if let Ok(mut s) = set.lock() {
                s.insert(key);
            }
            let (r, w) = stream.into_split();
            Ok((TrackedTcp { inner: r, set: Arc::clone(&set), key }, w))
        })
        .await
    }

    async fn accept_loop<A, F, R, W>(self: Arc<Self>, shutdown: CancellationToken, mut accept: A)
    where
        A: FnMut() -> F,
        F: Future<Output = io::Result<(R, W)>>,
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let tracker = tokio_util::task::TaskTracker::new();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                accepted = accept() => match accepted {
                    Ok((r, w)) => {
                        let this = Arc::clone(&self);
                        let stop = shutdown.child_token();
                        tracker.spawn(async move { this.serve_logged(r, w, stop).await });
                    }
                    Err(e) => {
                        // Out of descriptors and the like: back off rather than spin.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        }
        tracker.close();
        tracker.wait().await;
    }

    async fn serve_logged<R, W>(self: Arc<Self>, r: R, w: W, stop: CancellationToken)
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        match self.serve_connection(r, w, stop).await {
            Ok(()) => tracing::debug!("connection closed"),
            Err(ConnError::Io(e)) if e.kind() == io::ErrorKind::UnexpectedEof => {
                tracing::debug!("client went away mid-message")
            }
            Err(e) => tracing::info!(error = %e, "connection dropped"),
        }
    }

    /// Serves one connection: negotiation, then transmission until the client disconnects or
    /// `stop` is cancelled (then in-flight requests finish and the connection closes).
    pub async fn serve_connection<R, W>(self: Arc<Self>, r: R, w: W, stop: CancellationToken) -> Result<(), ConnError>
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        self.serve_with(r, w, stop, Handshake::default()).await
    }

    /// As [`NbdServer::serve_connection`], greeting the client as `how` says.
    pub async fn serve_with<R, W>(self: Arc<Self>, r: R, mut w: W, stop: CancellationToken, how: Handshake) -> Result<(), ConnError>
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        self.stats.connections.fetch_add(1, Ordering::Relaxed);
        let _open = OpenConnection::count(&self);
        let mut r = BufReader::with_capacity(256 * 1024, r);
        let negotiation = tokio::time::timeout(self.limits.handshake_timeout, async {
            if how.oldstyle { self.greet_oldstyle(&mut w).await } else { self.negotiate(&mut r, &mut w, how.any_export).await }
        });
        let session = tokio::select! {
            // Shutting down: a client still negotiating has nothing in flight to lose.
            _ = stop.cancelled() => return Ok(()),
            res = negotiation => match res {
                Err(_) => return Err(ConnError::Timeout),
                Ok(res) => match res? {
                    Some(s) => s,
                    None => return Ok(()),
                },
            },
        };
        self.transmit(r, w, session, stop).await
    }

    /// The old-style greeting: magic, size and flags, and transmission begins. No option can
    /// be asked, so replies are simple ones and there is no block status.
    async fn greet_oldstyle<W: AsyncWrite + Unpin>(&self, w: &mut W) -> Result<Option<Session>, ConnError> {
        let session = Session::default();
        let mut greeting = Vec::with_capacity(152);
        greeting.extend_from_slice(&proto::NBD_MAGIC.to_be_bytes());
        greeting.extend_from_slice(&proto::CLISERV_MAGIC.to_be_bytes());
        greeting.extend_from_slice(&self.image().size().to_be_bytes());
        greeting.extend_from_slice(&u32::from(self.transmission_flags(&session)).to_be_bytes());
        greeting.extend_from_slice(&[0u8; 124]);
        w.write_all(&greeting).await?;
        w.flush().await?;
        Ok(Some(session))
    }

    /// Fixed-newstyle negotiation. `any_export`: every export name opens this export (a
    /// connection passed by descriptor, whose caller chose the export already).
    async fn negotiate<R, W>(&self, r: &mut R, w: &mut W, any_export: bool) -> Result<Option<Session>, ConnError>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let export_matches = |name: &str| any_export || self.export_matches(name);
        let mut greeting = Vec::with_capacity(18);
        greeting.extend_from_slice(&proto::NBD_MAGIC.to_be_bytes());
        greeting.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
        greeting.extend_from_slice(&(proto::handshake::FIXED_NEWSTYLE | proto::handshake::NO_ZEROES).to_be_bytes());
        w.write_all(&greeting).await?;
        w.flush().await?;

        let client_flags = r.read_u32().await?;
        if client_flags & !proto::client_flags::KNOWN != 0 {
            return Err(ConnError::Protocol(format!("unknown client flags {client_flags:#x}")));
        }
        // A plain newstyle client (an old one) sends only NBD_OPT_EXPORT_NAME, which is
        // answered the same either way: served, as qemu-nbd serves it.
        if client_flags & proto::client_flags::FIXED_NEWSTYLE == 0 {
            tracing::debug!("client speaks plain newstyle, not fixed");
        }
        let no_zeroes = client_flags & proto::client_flags::NO_ZEROES != 0;
        let mut session = Session::default();

        for _ in 0..MAX_OPTIONS {
            let mut h = [0u8; proto::OPTION_HEADER_LEN];
            r.read_exact(&mut h).await?;
            let header = proto::OptionHeader::decode(&h)?;
            let option = header.option;
            if header.length > MAX_OPTION_DATA {
                if option == opt::EXPORT_NAME {
                    return Err(ConnError::Protocol("export name too long".into()));
                }
                discard(r, u64::from(header.length)).await?;
                reply(w, option, rep::ERR_TOO_BIG, b"option data too large").await?;
                continue;
            }
            let mut data = vec![0u8; header.length as usize];
            r.read_exact(&mut data).await?;
            match option {
                opt::EXPORT_NAME => {
                    let name = String::from_utf8_lossy(&data);
                    if !export_matches(&name) {
                        return Err(ConnError::Protocol(format!("unknown export {name:?}")));
                    }
                    let mut out = Vec::with_capacity(134);
                    out.extend_from_slice(&self.image().size().to_be_bytes());
                    out.extend_from_slice(&self.transmission_flags(&session).to_be_bytes());
                    if !no_zeroes {
                        out.extend_from_slice(&[0u8; 124]);
                    }
                    w.write_all(&out).await?;
                    w.flush().await?;
                    return Ok(Some(session));
                }
                opt::ABORT => {
                    // The client may hang up without reading the ACK; ignore write errors.
                    let _ = reply(w, option, rep::ACK, &[]).await;
                    return Ok(None);
                }
                opt::LIST => {
                    if !data.is_empty() {
                        reply(w, option, rep::ERR_INVALID, b"NBD_OPT_LIST takes no data").await?;
                        continue;
                    }
                    reply(w, option, rep::SERVER, &proto::encode_server_reply(&self.export.name)).await?;
                    reply(w, option, rep::ACK, &[]).await?;
                }
                opt::INFO | opt::GO => {
                    let req = match proto::InfoRequest::decode(&data) {
                        Ok(req) => req,
                        Err(e) => {
                            reply(w, option, rep::ERR_INVALID, e.to_string().as_bytes()).await?;
                            continue;
                        }
                    };
                    if !export_matches(&req.name) {
                        reply(w, option, rep::ERR_UNKNOWN, format!("no export {:?}", req.name).as_bytes()).await?;
                        continue;
                    }
                    let flags = self.transmission_flags(&session);
                    reply(w, option, rep::INFO, &proto::encode_info_export(self.image().size(), flags)).await?;
                    reply(w, option, rep::INFO, &self.block_size().encode_info()).await?;
                    if req.requests.contains(&proto::info::NAME) {
                        let mut d = proto::info::NAME.to_be_bytes().to_vec();
                        d.extend_from_slice(self.export.name.as_bytes());
                        reply(w, option, rep::INFO, &d).await?;
                    }
                    if req.requests.contains(&proto::info::DESCRIPTION)
                        && let Some(desc) = &self.export.description
                    {
                        let mut d = proto::info::DESCRIPTION.to_be_bytes().to_vec();
                        d.extend_from_slice(desc.as_bytes());
                        reply(w, option, rep::INFO, &d).await?;
                    }
                    reply(w, option, rep::ACK, &[]).await?;
                    if option == opt::GO {
                        return Ok(Some(session));
                    }
                }
                opt::STRUCTURED_REPLY => {
                    if !data.is_empty() {
                        reply(w, option, rep::ERR_INVALID, b"NBD_OPT_STRUCTURED_REPLY takes no data").await?;
                    } else if session.structured {
                        reply(w, option, rep::ERR_INVALID, b"structured replies already negotiated").await?;
                    } else {
                        session.structured = true;
                        reply(w, option, rep::ACK, &[]).await?;
                    }
                }
                opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => {
                    if !session.structured {
                        reply(w, option, rep::ERR_INVALID, b"negotiate structured replies first").await?;
                        continue;
                    }
                    let req = match proto::MetaContextRequest::decode(&data) {
                        Ok(req) => req,
                        Err(e) => {
                            reply(w, option, rep::ERR_INVALID, e.to_string().as_bytes()).await?;
                            continue;
                        }
                    };
                    if !export_matches(&req.export) {
                        reply(w, option, rep::ERR_UNKNOWN, format!("no export {:?}", req.export).as_bytes()).await?;
                        continue;
                    }
                    let listing = option == opt::LIST_META_CONTEXT;
                    let selected = if listing {
                        req.queries.is_empty() || req.queries.iter().any(|q| q == "base:" || q == proto::BASE_ALLOCATION)
                    } else {
                        req.queries.iter().any(|q| q == proto::BASE_ALLOCATION)
                    };
                    if !listing {
                        session.base_allocation = selected;
                    }
                    if selected {
                        // A listing's context id is reserved and zero (the spec's
                        // NBD_OPT_LIST_META_CONTEXT); only a selection names the id replies use.
                        let id = if listing { 0 } else { BASE_ALLOCATION_ID };
                        let d = proto::encode_meta_context_reply(id, proto::BASE_ALLOCATION);
                        reply(w, option, rep::META_CONTEXT, &d).await?;
                    }
                    reply(w, option, rep::ACK, &[]).await?;
                }
                opt::STARTTLS => reply(w, option, rep::ERR_UNSUP, b"TLS is not offered").await?,
                _ => reply(w, option, rep::ERR_UNSUP, b"option not supported").await?,
            }
        }
        Err(ConnError::Protocol("too many options".into()))
    }

    async fn transmit<R, W>(self: Arc<Self>, mut r: R, w: W, session: Session, stop: CancellationToken) -> Result<(), ConnError>
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let (tx, rx) = mpsc::unbounded_channel::<OutMsg>();
        let broken = CancellationToken::new();
        let writer = tokio::spawn(write_replies(w, rx, broken.clone()));
        let requests = Arc::new(Semaphore::new(self.limits.max_requests));
        let byte_units = units(self.limits.max_bytes.max(MAX_PAYLOAD as usize));
        let bytes = Arc::new(Semaphore::new(byte_units as usize));

        let result: Result<(), ConnError> = loop {
            let mut h = [0u8; proto::REQUEST_LEN];
            let read = tokio::select! {
                _ = stop.cancelled() => break Ok(()),
                _ = broken.cancelled() => break Ok(()),
                read = r.read_exact(&mut h) => read,
            };
            match read {
                Ok(_) => {}
                // A clean close between requests (no NBD_CMD_DISC) is common and harmless.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break Ok(()),
                Err(e) => break Err(e.into()),
            }
            let req = match Request::decode(&h) {
                Ok(req) => req,
                Err(e) => break Err(e.into()),
            };
            tracing::trace!(pid = std::process::id(), cookie = req.cookie, kind = req.kind, offset = req.offset, length = req.length, "request header read");
            if req.kind == cmd::DISC {
                break Ok(());
            }
            let carries_data = matches!(req.kind, cmd::READ | cmd::WRITE) && req.length <= MAX_PAYLOAD;
            let cost = if carries_data { units(req.length as usize) } else { 1 };
            let (Ok(req_permit), Ok(byte_permit)) = (
                Arc::clone(&requests).acquire_owned().await,
                Arc::clone(&bytes).acquire_many_owned(cost).await,
            ) else {
                break Ok(());
            };
            let permits = Permits { _request: req_permit, _bytes: byte_permit };
            tracing::trace!(pid = std::process::id(), cookie = req.cookie, "permits taken");

            let verdict = validate(&req, &session, self.image().size(), self.read_only(), self.min_block);
            if req.kind == cmd::WRITE {
                if let Err(errno) = verdict {
                    // Keep the stream in step: the payload follows whatever we think of it.
                    let drained = tokio::select! {
                        _ = stop.cancelled() => break Ok(()),
                        d = discard(&mut r, u64::from(req.length)) => d,
                    };
                    if let Err(e) = drained {
                        break Err(e.into());
                    }
                    self.count_reply(Some(errno));
                    let _ = tx.send(simple_reply(req.cookie, Some(errno), permits));
                    continue;
                }
                let mut buf = IoBuf::for_overwrite(req.length as usize);
                // A client that stalls mid-payload must not hold up shutdown; its half-sent
                // write was never acknowledged, so dropping it loses nothing it was promised.
                let read = tokio::select! {
                    _ = stop.cancelled() => break Ok(()),
                    read = r.read_exact(&mut buf) => read,
                };
                if let Err(e) = read {
                    break Err(e.into());
                }
                let this = Arc::clone(&self);
                let tx = tx.clone();
                let stop = stop.clone();
                tracing::trace!(pid = std::process::id(), cookie = req.cookie, "payload read");
                tokio::spawn(async move {
                    let Some(_running) = this.admit(&stop).await else { return };
                    let _outstanding = this.begin();
                    let msg = this.handle_write(req, buf, permits).await;
                    tracing::trace!(pid = std::process::id(), cookie = req.cookie, "reply queued");
                    let _ = tx.send(msg);
                });
                continue;
            }
            if let Err(errno) = verdict {
                self.count_reply(Some(errno));
                let msg = if req.kind == cmd::READ && session.structured {
                    OutMsg::error_chunk(req.cookie, errno, "request rejected", Some(permits))
                } else {
                    simple_reply(req.cookie, Some(errno), permits)
                };
                let _ = tx.send(msg);
                continue;
            }
            let this = Arc::clone(&self);
            let tx = tx.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let Some(_running) = this.admit(&stop).await else { return };
                let _outstanding = this.begin();
                let msg = this.handle(req, session, permits).await;
                tracing::trace!(pid = std::process::id(), cookie = req.cookie, "reply queued");
                let _ = tx.send(msg);
            });
        };

        // Every spawned handler holds a sender; the writer ends once they have all replied.
        drop(tx);
        let written = writer.await.map_err(|e| ConnError::Protocol(format!("writer task: {e}")))?;
        result?;
        written.map_err(ConnError::Io)
    }

    /// Waits until the request may run (not paused). `None` when the connection is stopped
    /// (shutdown) first: a request held by `pause` has not started, and its client gets no
    /// reply on a connection that is closing, so it is dropped rather than holding shutdown up
    /// until an unpause that may never come (a datapath detached while attached but inactive).
    async fn admit(&self, stop: &CancellationToken) -> Option<tokio::sync::RwLockReadGuard<'_, ()>> {
        tokio::select! {
            biased;
            g = self.gate.read() => Some(g),
            _ = stop.cancelled() => None,
        }
    }

    fn count_reply(&self, error: Option<Errno>) {
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        if error.is_some() {
            self.stats.errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    async fn handle_write(&self, req: Request, buf: IoBuf, permits: Permits) -> OutMsg {
        let durability = if req.flags & cmd_flags::FUA != 0 { Durability::Stable } else { Durability::Cached };
        let len = buf.len() as u64;
        let buf = Arc::new(buf);
        let image = self.image();
        let local = image.write(req.offset, Arc::clone(&buf), durability);
        // With a mirror, both sides write the same buffer at once; the guest hears back when
        // both are done, and only the local result decides its answer. The remote request is
        // polled first, so it is on the wire before the local submission (which costs a few
        // microseconds in io_uring_enter) and the target works while the local write runs.
        let mirror = self.mirror.get();
        let r = match &mirror {
            None => local.await,
            Some(m) if let Some(_deferral) = m.unlocked_deferral() => {
                // A full mirror catching up: local only, marked once written.
                let r = local.await;
                m.kept_local(req.offset, len, Route::Deferred);
                r
            }
            Some(m) => {
                let fua = durability == Durability::Stable;
                // Held across both sides: against overlapping writes and the background copy.
                let _range = m.guard(req.offset, len).await;
                match m.route(req.offset, len) {
                    Route::Both if m.takes_as_is(req.offset, len) => {
                        let r = tokio::join!(self.mirror.write(m, req.offset, &buf, fua), local).1;
                        self.check_local(m, "write", r)
                    }
                    Route::Both => {
                        let r = self.check_local(m, "write", local.await);
                        if r.is_ok() {
                            self.mirror.write_from_image(m, &*image, req.offset, len, false, fua).await;
                        }
                        r
                    }
                    route => {
                        let r = local.await;
                        m.kept_local(req.offset, len, route);
                        r
                    }
                }
            }
        };
        if r.is_ok() {
            self.stats.bytes_written.fetch_add(len, Ordering::Relaxed);
        }
        let errno = r.err().map(|e| errno_of(&e, "write"));
        self.count_reply(errno);
        simple_reply(req.cookie, errno, permits)
    }

    async fn handle(&self, req: Request, session: Session, permits: Permits) -> OutMsg {
        let fua = req.flags & cmd_flags::FUA != 0;
        let durability = if fua { Durability::Stable } else { Durability::Cached };
        let image = self.image();
        let mirror = self.mirror.get();
        let result: Result<(), ImageError> = match (req.kind, &mirror) {
            (cmd::READ, _) => return self.handle_read(req, session, permits).await,
            (cmd::BLOCK_STATUS, _) => return self.handle_block_status(req, permits).await,
            (cmd::FLUSH, None) => image.flush().await,
            (cmd::FLUSH, Some(m)) => tokio::join!(image.flush(), self.mirror.flush(m)).0,
            (cmd::TRIM, None) => match image.trim(req.offset, u64::from(req.length)).await {
                Ok(()) if fua => image.flush().await,
                other => other,
            },
            // Under a mirror a trim zeroes both sides: what a trim leaves is up to each image,
            // and the two must keep reading alike. Zeroes are a valid result of a trim.
            (cmd::TRIM, Some(m)) if let Some(_deferral) = m.unlocked_deferral() => {
                let r = image.write_zeroes(req.offset, u64::from(req.length), ZeroAlloc::MayDeallocate, ZeroSpeed::Any, durability).await;
                m.kept_local(req.offset, u64::from(req.length), Route::Deferred);
                r
            }
            (cmd::TRIM, Some(m)) => {
                let _range = m.guard(req.offset, u64::from(req.length)).await;
                let local = image.write_zeroes(req.offset, u64::from(req.length), ZeroAlloc::MayDeallocate, ZeroSpeed::Any, durability);
                match m.route(req.offset, u64::from(req.length)) {
                    Route::Both => self.mirror_zeroes(m, &*image, &req, "trim", local).await,
                    route => {
                        let r = local.await;
                        m.kept_local(req.offset, u64::from(req.length), route);
                        r
                    }
                }
            }
            (cmd::WRITE_ZEROES, Some(m)) if let Some(_deferral) = m.unlocked_deferral() => {
                let (alloc, speed) = zeroing_of(&req);
                let r = image.write_zeroes(req.offset, u64::from(req.length), alloc, speed, durability).await;
                m.kept_local(req.offset, u64::from(req.length), Route::Deferred);
                r
            }
            (cmd::WRITE_ZEROES, _) => {
                let (alloc, speed) = zeroing_of(&req);
                let _range = match &mirror {
                    Some(m) => Some(m.guard(req.offset, u64::from(req.length)).await),
                    None => None,
                };
                let local = image.write_zeroes(req.offset, u64::from(req.length), alloc, speed, durability);
                match &mirror {
                    None => local.await,
                    Some(m) => match m.route(req.offset, u64::from(req.length)) {
                        // A fast zero that fails locally fails before any I/O, so mirroring it
                        // afterwards would zero the target alone: mirror only what succeeded.
                        Route::Both if speed == ZeroSpeed::FastOnly => match local.await {
                            Ok(()) => self.mirror_zeroes(m, &*image, &req, "write zeroes", std::future::ready(Ok(()))).await,
                            e => e,
                        },
                        Route::Both => self.mirror_zeroes(m, &*image, &req, "write zeroes", local).await,
                        route => {
                            let r = local.await;
                            m.kept_local(req.offset, u64::from(req.length), route);
                            r
                        }
                    },
                }
            }
            // `validate` let through only the commands above.
            _ => Ok(()),
        };
        let errno = result.err().map(|e| errno_of(&e, "request"));
        self.count_reply(errno);
        simple_reply(req.cookie, errno, permits)
    }

    /// Zeroes the range of `req` (a trim or a zeroing) on the target beside `local`, the
    /// image's side: at once where the target takes the range as it is, else after it, from
    /// the image.
    async fn mirror_zeroes(&self, m: &Mirror, image: &I, req: &Request, what: &str, local: impl Future<Output = Result<(), ImageError>>) -> Result<(), ImageError> {
        let (offset, length, fua) = (req.offset, req.length, req.flags & cmd_flags::FUA != 0);
        if m.takes_as_is(offset, u64::from(length)) {
            let r = tokio::join!(local, self.mirror.write_zeroes(m, offset, length, fua)).0;
            return self.check_local(m, what, r);
        }
        let r = self.check_local(m, what, local.await);
        if r.is_ok() {
            self.mirror.write_from_image(m, image, offset, u64::from(length), true, fua).await;
        }
        r
    }

    /// Passes on the local result of a mirrored request, failing the mirror when it is an
    /// error: the target took the request, or may have.
    fn check_local(&self, m: &Mirror, what: &str, r: Result<(), ImageError>) -> Result<(), ImageError> {
        if let Err(e) = &r {
            self.mirror.local_failed(m, what, e);
        }
        r
    }

    async fn handle_read(&self, req: Request, session: Session, permits: Permits) -> OutMsg {
        let len = req.length;
        if !session.structured {
            let (buf, r) = self.image().read(req.offset, IoBuf::for_overwrite(len as usize)).await;
            return match r {
                Ok(()) => {
                    self.count_reply(None);
                    self.stats.bytes_read.fetch_add(u64::from(len), Ordering::Relaxed);
                    let mut m = simple_reply(req.cookie, None, permits);
                    m.segments.push(Segment::Buf(buf));
                    m
                }
                Err(e) => {
                    let errno = errno_of(&e, "read");
                    self.count_reply(Some(errno));
                    simple_reply(req.cookie, Some(errno), permits)
                }
            };
        }

        // Structured: data chunks for data, hole chunks for what reads as zeroes.
        let mut pieces: Vec<(u64, u64, bool)> = Vec::new();
        if len >= HOLE_SCAN_MIN && req.flags & cmd_flags::DF == 0
            && let Ok(extents) = self.image().allocation(req.offset, u64::from(len), usize::MAX).await {
                for e in extents {
                    let zero = matches!(e.state, ExtentState::Hole | ExtentState::Zero);
                    pieces.push((e.offset, e.length, zero));
                }
            }
        let covered = pieces.last().map(|&(o, l, _)| o + l).unwrap_or(req.offset);
        let end = req.offset + u64::from(len);
        if covered < end {
            pieces.push((covered, end - covered, false));
        }
        let mut msg = OutMsg { segments: Vec::with_capacity(pieces.len() * 2 + 1), _permits: Some(permits) };
        if pieces.is_empty() {
            // A zero-length read still needs a reply, and a structured reply ends with a chunk
            // flagged DONE: a NONE chunk says "nothing more".
            let mut b = [0u8; 32];
            b[..20].copy_from_slice(&proto::encode_chunk_header(chunk::FLAG_DONE, chunk::NONE, req.cookie, 0));
            msg.segments.push(Segment::Small(b, 20));
        }
        let last = pieces.len().saturating_sub(1);
        for (i, (offset, length, zero)) in pieces.into_iter().enumerate() {
            let flags = if i == last { chunk::FLAG_DONE } else { 0 };
            if zero {
                let mut b = [0u8; 32];
                b[..20].copy_from_slice(&proto::encode_chunk_header(flags, chunk::OFFSET_HOLE, req.cookie, 12));
                b[20..28].copy_from_slice(&offset.to_be_bytes());
                // Pieces lie inside a request of at most 32 MiB.
                b[28..32].copy_from_slice(&(length as u32).to_be_bytes());
                msg.segments.push(Segment::Small(b, 32));
                continue;
            }
            let (buf, r) = self.image().read(offset, IoBuf::for_overwrite(length as usize)).await;
            if let Err(e) = r {
                let errno = errno_of(&e, "read");
                self.count_reply(Some(errno));
                let permits = msg._permits.take();
                return OutMsg::error_chunk(req.cookie, errno, &e.to_string(), permits);
            }
            let mut b = [0u8; 32];
            b[..20].copy_from_slice(&proto::encode_chunk_header(flags, chunk::OFFSET_DATA, req.cookie, length as u32 + 8));
            b[20..28].copy_from_slice(&offset.to_be_bytes());
            msg.segments.push(Segment::Small(b, 28));
            msg.segments.push(Segment::Buf(buf));
        }
        self.count_reply(None);
        self.stats.bytes_read.fetch_add(u64::from(len), Ordering::Relaxed);
        msg
    }

    async fn handle_block_status(&self, req: Request, permits: Permits) -> OutMsg {
        // REQ_ONE (how qemu asks) wants one extent: compute only that, or a client walking a
        // fragmented disk extent by extent would cost quadratic work.
        let limit = if req.flags & cmd_flags::REQ_ONE != 0 { 1 } else { usize::MAX };
        let extents = match self.image().allocation(req.offset, u64::from(req.length), limit).await {
            Ok(e) if !e.is_empty() => e,
            Ok(_) => {
                // The trait promises at least one extent; never send an empty reply.
                vec![crate::image::Extent { offset: req.offset, length: u64::from(req.length), state: ExtentState::Data }]
            }
            Err(e) => {
                let errno = errno_of(&e, "block status");
                self.count_reply(Some(errno));
                return OutMsg::error_chunk(req.cookie, errno, &e.to_string(), Some(permits));
            }
        };
        let mut descriptors: Vec<proto::Descriptor> = Vec::with_capacity(extents.len());
        for e in extents {
            let flags = match e.state {
                ExtentState::Data => 0,
                ExtentState::Zero => alloc_flags::ZERO,
                ExtentState::Hole => alloc_flags::HOLE | alloc_flags::ZERO,
            };
            // Extents lie inside the request, whose length is a u32.
            let length = e.length as u32;
            match descriptors.last_mut() {
                Some(d) if d.flags == flags => d.length += length,
                _ => descriptors.push(proto::Descriptor { length, flags }),
            }
        }
        if req.flags & cmd_flags::REQ_ONE != 0 {
            descriptors.truncate(1);
        }
        let payload = proto::encode_block_status(BASE_ALLOCATION_ID, &descriptors);
        let header = proto::encode_chunk_header(chunk::FLAG_DONE, chunk::BLOCK_STATUS, req.cookie, payload.len() as u32);
        self.count_reply(None);
        let mut b = [0u8; 32];
        b[..20].copy_from_slice(&header);
        OutMsg { segments: vec![Segment::Small(b, 20), Segment::Vec(payload)], _permits: Some(permits) }
    }
}

/// Checks a request against the protocol before any I/O: the error reply it gets, if any.
/// `WRITE` past the end is `ENOSPC`, other ranges past the end `EINVAL`, writes to a read-only
/// export `EPERM`, unknown commands and flags `EINVAL` (proto.md, "Error values"), and so are
/// reads, writes, zeroes and trims whose offset or length is not a multiple of `min_block`, the
/// advertised minimum block size (proto.md, "Block size constraints"; block status is exempt).
pub fn validate(req: &Request, session: &Session, size: u64, read_only: bool, min_block: u32) -> Result<(), Errno> {
    use cmd_flags::*;
    let allowed = match req.kind {
        cmd::READ if session.structured => FUA | DF,
        cmd::READ | cmd::WRITE | cmd::FLUSH | cmd::TRIM => FUA,
        cmd::WRITE_ZEROES => FUA | NO_HOLE | FAST_ZERO,
        cmd::BLOCK_STATUS => FUA | REQ_ONE,
        _ => return Err(Errno::Inval),
    };
    if req.flags & !allowed != 0 {
        return Err(Errno::Inval);
    }
    let in_range = req.offset.checked_add(u64::from(req.length)).is_some_and(|end| end <= size);
    let unit = u64::from(min_block.max(1));
    let aligned = req.offset.is_multiple_of(unit) && u64::from(req.length).is_multiple_of(unit);
    match req.kind {
        cmd::READ
            if (req.length > MAX_PAYLOAD || !in_range || !aligned) => {
                return Err(Errno::Inval);
            }
        cmd::WRITE => {
            if read_only {
                return Err(Errno::Perm);
            }
            if req.length > MAX_PAYLOAD || !aligned {
                return Err(Errno::Inval);
            }
            if !in_range {
                return Err(Errno::NoSpc);
            }
        }
        cmd::WRITE_ZEROES | cmd::TRIM => {
            if read_only {
                return Err(Errno::Perm);
            }
            if !aligned {
                return Err(Errno::Inval);
            }
            if !in_range {
                return Err(if req.kind == cmd::TRIM { Errno::Inval } else { Errno::NoSpc });
            }
        }
        cmd::BLOCK_STATUS
            if (!session.structured || !session.base_allocation || req.length == 0 || !in_range) => {
                return Err(Errno::Inval);
            }
        _ => {}
    }
    Ok(())
}

/// What a `WRITE_ZEROES` asks of the image: keep the zeroes allocated (`NO_HOLE`), and fail
/// rather than write slowly (`FAST_ZERO`).
fn zeroing_of(req: &Request) -> (ZeroAlloc, ZeroSpeed) {
    let alloc = if req.flags & cmd_flags::NO_HOLE != 0 { ZeroAlloc::Keep } else { ZeroAlloc::MayDeallocate };
    let speed = if req.flags & cmd_flags::FAST_ZERO != 0 { ZeroSpeed::FastOnly } else { ZeroSpeed::Any };
    (alloc, speed)
}

fn errno_of(e: &ImageError, what: &str) -> Errno {
    let errno = match e {
        ImageError::OutOfRange { .. } => Errno::Inval,
        ImageError::ReadOnly => Errno::Perm,
        ImageError::NotFast => Errno::NotSup,
        ImageError::Io { .. } => match e.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) | Some(libc::EFBIG) => Errno::NoSpc,
            Some(libc::EPERM) | Some(libc::EACCES) | Some(libc::EROFS) => Errno::Perm,
            Some(libc::ENOMEM) => Errno::NoMem,
            _ => Errno::Io,
        },
    };
    if !matches!(e, ImageError::NotFast) {
        tracing::warn!(error = %crate::error_chain(e), %errno, "{what} failed");
    }
    errno
}

/// Payload bytes expressed in 4 KiB permit units.
fn units(bytes: usize) -> u32 {
    u32::try_from(bytes.div_ceil(4096).max(1)).unwrap_or(u32::MAX)
}

struct Permits {
    _request: OwnedSemaphorePermit,
    _bytes: OwnedSemaphorePermit,
}

enum Segment {
    Small([u8; 32], usize),
    Vec(Vec<u8>),
    Buf(IoBuf),
}

impl Segment {
    fn bytes(&self) -> &[u8] {
        match self {
            Segment::Small(b, n) => &b[..*n],
            Segment::Vec(v) => v,
            Segment::Buf(b) => b,
        }
    }
}

/// One complete reply; the permits it holds are released once it is on the wire.
struct OutMsg {
    segments: Vec<Segment>,
    _permits: Option<Permits>,
}

impl OutMsg {
    fn error_chunk(cookie: u64, errno: Errno, message: &str, permits: Option<Permits>) -> OutMsg {
        let payload = proto::encode_error_payload(errno, message);
        let header = proto::encode_chunk_header(chunk::FLAG_DONE, chunk::ERROR, cookie, payload.len() as u32);
        let mut b = [0u8; 32];
        b[..20].copy_from_slice(&header);
        OutMsg { segments: vec![Segment::Small(b, 20), Segment::Vec(payload)], _permits: permits }
    }
}

fn simple_reply(cookie: u64, errno: Option<Errno>, permits: Permits) -> OutMsg {
    let mut b = [0u8; 32];
    b[..16].copy_from_slice(&proto::encode_simple_reply(errno.map(|e| e as u32).unwrap_or(0), cookie));
    OutMsg { segments: vec![Segment::Small(b, 16)], _permits: Some(permits) }
}

async fn write_replies<W: AsyncWrite + Unpin>(
    mut w: W,
    mut rx: mpsc::UnboundedReceiver<OutMsg>,
    broken: CancellationToken,
) -> io::Result<()> {
    let mut batch: Vec<OutMsg> = Vec::with_capacity(64);
    while let Some(first) = rx.recv().await {
        batch.push(first);
        while batch.len() < 64 {
            match rx.try_recv() {
                Ok(m) => batch.push(m),
                Err(_) => break,
            }
        }
        let r = write_batch(&mut w, &batch).await;
        tracing::trace!(pid = std::process::id(), replies = batch.len(), ok = r.is_ok(), "replies written");
        batch.clear();
        if let Err(e) = r {
            broken.cancel();
            // Drain so handlers never block; their replies have nowhere to go.
            while rx.recv().await.is_some() {}
            return Err(e);
        }
    }
    w.flush().await?;
    let _ = w.shutdown().await;
    Ok(())
}

async fn write_batch<W: AsyncWrite + Unpin>(w: &mut W, batch: &[OutMsg]) -> io::Result<()> {
    let mut slices: Vec<IoSlice<'_>> =
        batch.iter().flat_map(|m| m.segments.iter()).map(|s| IoSlice::new(s.bytes())).filter(|s| !s.is_empty()).collect();
    let mut rest: &mut [IoSlice<'_>] = &mut slices;
    while !rest.is_empty() {
        let n = w.write_vectored(rest).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut rest, n);
    }
    w.flush().await
}

async fn reply<W: AsyncWrite + Unpin>(w: &mut W, option: u32, kind: u32, data: &[u8]) -> io::Result<()> {
    w.write_all(&proto::encode_option_reply(option, kind, data)).await?;
    w.flush().await
}

/// Reads and drops `n` bytes without holding them all in memory.
async fn discard<R: AsyncRead + Unpin>(r: &mut R, n: u64) -> io::Result<()> {
    let copied = tokio::io::copy(&mut r.take(n), &mut tokio::io::sink()).await?;
    if copied < n { Err(io::ErrorKind::UnexpectedEof.into()) } else { Ok(()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(kind: u16, flags: u16, offset: u64, length: u32) -> Request {
        Request { flags, kind, cookie: 7, offset, length }
    }

    const SIZE: u64 = 1 << 20;
    const S: Session = Session { structured: true, base_allocation: true };
    const PLAIN: Session = Session { structured: false, base_allocation: false };

    #[test]
    fn in_range_requests_pass() {
        for kind in [cmd::READ, cmd::WRITE, cmd::TRIM, cmd::WRITE_ZEROES, cmd::BLOCK_STATUS] {
            assert_eq!(validate(&req(kind, 0, SIZE - 4096, 4096), &S, SIZE, false, 1), Ok(()), "{kind}");
        }
        assert_eq!(validate(&req(cmd::FLUSH, 0, 0, 0), &S, SIZE, false, 1), Ok(()));
    }

    #[test]
    fn past_the_end_gets_the_spec_errors() {
        assert_eq!(validate(&req(cmd::READ, 0, SIZE, 1), &S, SIZE, false, 1), Err(Errno::Inval));
        assert_eq!(validate(&req(cmd::WRITE, 0, SIZE - 1, 2), &S, SIZE, false, 1), Err(Errno::NoSpc));
        assert_eq!(validate(&req(cmd::WRITE_ZEROES, 0, SIZE, 512), &S, SIZE, false, 1), Err(Errno::NoSpc));
        assert_eq!(validate(&req(cmd::TRIM, 0, SIZE, 512), &S, SIZE, false, 1), Err(Errno::Inval));
        assert_eq!(validate(&req(cmd::BLOCK_STATUS, 0, SIZE, 512), &S, SIZE, false, 1), Err(Errno::Inval));
        // Offsets that overflow u64 when the length is added.
        assert_eq!(validate(&req(cmd::READ, 0, u64::MAX, 2), &S, SIZE, false, 1), Err(Errno::Inval));
    }

    #[test]
    fn lengths_over_the_maximum_are_invalid() {
        assert_eq!(validate(&req(cmd::READ, 0, 0, MAX_PAYLOAD + 1), &S, u64::MAX, false, 1), Err(Errno::Inval));
        assert_eq!(validate(&req(cmd::WRITE, 0, 0, MAX_PAYLOAD + 1), &S, u64::MAX, false, 1), Err(Errno::Inval));
        // Zeroing and trimming carry no payload and may be long.
        assert_eq!(validate(&req(cmd::WRITE_ZEROES, 0, 0, u32::MAX), &S, u64::MAX, false, 1), Ok(()));
    }

    #[test]
    fn read_only_refuses_every_write_kind_with_eperm() {
        for kind in [cmd::WRITE, cmd::TRIM, cmd::WRITE_ZEROES] {
            assert_eq!(validate(&req(kind, 0, 0, 512), &S, SIZE, true, 1), Err(Errno::Perm), "{kind}");
        }
        assert_eq!(validate(&req(cmd::READ, 0, 0, 512), &S, SIZE, true, 1), Ok(()));
    }

    #[test]
    fn unknown_commands_and_inapplicable_flags_are_invalid() {
        assert_eq!(validate(&req(cmd::CACHE, 0, 0, 512), &S, SIZE, false, 1), Err(Errno::Inval));
        assert_eq!(validate(&req(99, 0, 0, 512), &S, SIZE, false, 1), Err(Errno::Inval));
        assert_eq!(validate(&req(cmd::WRITE, cmd_flags::NO_HOLE, 0, 512), &S, SIZE, false, 1), Err(Errno::Inval));
        assert_eq!(validate(&req(cmd::READ, cmd_flags::DF, 0, 512), &PLAIN, SIZE, false, 1), Err(Errno::Inval));
        assert_eq!(validate(&req(cmd::READ, 1 << 9, 0, 512), &S, SIZE, false, 1), Err(Errno::Inval));
        // FUA is valid on every command.
        assert_eq!(validate(&req(cmd::READ, cmd_flags::FUA, 0, 512), &S, SIZE, false, 1), Ok(()));
    }

    #[test]
    fn requests_off_the_minimum_block_size_are_invalid() {
        for kind in [cmd::READ, cmd::WRITE, cmd::TRIM, cmd::WRITE_ZEROES] {
            assert_eq!(validate(&req(kind, 0, 512, 1024), &S, SIZE, false, 512), Ok(()), "{kind}");
            assert_eq!(validate(&req(kind, 0, 100, 512), &S, SIZE, false, 512), Err(Errno::Inval), "{kind} offset");
            assert_eq!(validate(&req(kind, 0, 512, 100), &S, SIZE, false, 512), Err(Errno::Inval), "{kind} length");
            // A byte-granular export takes any range.
            assert_eq!(validate(&req(kind, 0, 100, 3), &S, SIZE, false, 1), Ok(()), "{kind} at 1");
        }
        // Block status is exempt (its length is a hint), and a flush has no range.
        assert_eq!(validate(&req(cmd::BLOCK_STATUS, 0, 100, 3), &S, SIZE, false, 512), Ok(()));
        assert_eq!(validate(&req(cmd::FLUSH, 0, 0, 0), &S, SIZE, false, 512), Ok(()));
        // A read-only export still answers EPERM to any write.
        assert_eq!(validate(&req(cmd::WRITE, 0, 1, 1), &S, SIZE, true, 512), Err(Errno::Perm));
    }

    #[test]
    fn block_status_needs_structured_replies_and_a_context() {
        assert_eq!(validate(&req(cmd::BLOCK_STATUS, 0, 0, 512), &PLAIN, SIZE, false, 1), Err(Errno::Inval));
        let no_ctx = Session { structured: true, base_allocation: false };
        assert_eq!(validate(&req(cmd::BLOCK_STATUS, 0, 0, 512), &no_ctx, SIZE, false, 1), Err(Errno::Inval));
        assert_eq!(validate(&req(cmd::BLOCK_STATUS, 0, 0, 0), &S, SIZE, false, 1), Err(Errno::Inval));
    }
}
