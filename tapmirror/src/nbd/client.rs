//! An async NBD client: many requests in flight on one connection.
//!
//! ```text
//!  callers ─(header + owned payload)─▶ writer task ─writev─▶ socket
//!     ▲                                                        │
//!     └── oneshot ◀── pending table (by cookie) ◀── reader task ┘
//! ```
//!
//! Requests go to a writer task with their payload owned (`Payload`), so a caller that drops
//! its future can never leave half a request on the wire. The reader task matches replies to
//! requests by cookie and reads data chunks straight into the request's buffer. The client is a
//! cheap `Clone` handle; when the connection fails, every pending and later request gets the
//! error that broke it.

use std::collections::HashMap;
use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::{Semaphore, oneshot};

use super::proto::{self, BlockSize, Descriptor, Errno, InfoItem, Request, ReplyHeader, chunk, cmd, cmd_flags, opt, rep, tflags};
use crate::io::IoBuf;

/// Where an NBD server listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// A Unix stream socket.
    Unix(PathBuf),
    /// A TCP host and port.
    Tcp(String, u16),
}

/// An NBD URI: `nbd+unix:///EXPORT?socket=PATH` or `nbd://HOST[:PORT]/EXPORT`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NbdUri {
    /// Where to connect.
    pub endpoint: Endpoint,
    /// Export name ("" for the default).
    pub export: String,
}

impl NbdUri {
    /// Parses the subset of the NBD URI scheme that local and TCP peers use.
    pub fn parse(s: &str) -> Result<NbdUri, ClientError> {
        let bad = |why: &str| ClientError::BadUri(format!("{s}: {why}"));
        // What the URI asks beyond where to connect (TLS, say) must not be dropped unseen, nor
        // taken into the export's name.
        let unknown = |query: &str, known: &[&str]| {
            query.split('&').filter(|kv| !kv.is_empty()).map(|kv| kv.split_once('=').map_or(kv, |(k, _)| k)).find(|k| !known.contains(k)).map(str::to_owned)
        };
        if let Some(rest) = s.strip_prefix("nbd+unix://") {
            let (path, query) = rest.split_once('?').ok_or_else(|| bad("missing ?socket="))?;
            let path = path.strip_prefix('/').unwrap_or(path);
            if let Some(k) = unknown(query, &["socket"]) {
                return Err(bad(&format!("unsupported parameter {k:?} (only socket= is)")));
            }
            let socket = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("socket="))
                .ok_or_else(|| bad("missing socket= parameter"))?;
            Ok(NbdUri { endpoint: Endpoint::Unix(PathBuf::from(percent_decode(socket))), export: percent_decode(path) })
        } else if let Some(rest) = s.strip_prefix("nbd://") {
            let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
            if let Some(k) = unknown(query, &[]) {
                return Err(bad(&format!("unsupported parameter {k:?} (nbd:// takes none)")));
            }
            let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
            let (host, port) = match authority.rsplit_once(':') {
                Some((h, p)) if !h.ends_with(']') || authority.starts_with('[') => {
                    (h.trim_start_matches('[').trim_end_matches(']').to_owned(), p.parse().map_err(|_| bad("bad port"))?)
                }
                _ => (authority.to_owned(), 10809),
            };
            if host.is_empty() {
                return Err(bad("missing host"));
            }
            Ok(NbdUri { endpoint: Endpoint::Tcp(host, port), export: percent_decode(path) })
        } else if s.starts_with("nbds://") || s.starts_with("nbds+unix://") {
            Err(bad("NBD over TLS is not supported: use nbd:// or nbd+unix:// (over a tunnel, for TLS)"))
        } else {
            Err(bad("expected nbd:// or nbd+unix://"))
        }
    }
}

fn percent_decode(s: &str) -> String {
    fn hex(c: u8) -> Option<u8> {
        (c as char).to_digit(16).map(|d| d as u8)
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 3 <= b.len()
            && let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2]))
        {
            out.push(h << 4 | l);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Why a client operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The URI cannot be used.
    #[error("bad NBD URI {0}")]
    BadUri(String),
    /// Connecting or talking to the socket failed.
    #[error("NBD connection")]
    Io(#[from] io::Error),
    /// The server broke the protocol.
    #[error("NBD protocol: {0}")]
    Protocol(String),
    /// The server refused an option during negotiation.
    #[error("server refused option {option}: reply {reply:#x} {message:?}")]
    Refused {
        /// The option.
        option: u32,
        /// The error reply type.
        reply: u32,
        /// The server's message.
        message: String,
    },
    /// The server answered a request with an error.
    #[error("server error {errno}{}", message.as_deref().filter(|m| !m.is_empty()).map(|m| format!(": {m}")).unwrap_or_default())]
    Server {
        /// The error value.
        errno: Errno,
        /// The message of a structured error chunk.
        message: Option<String>,
    },
    /// The request is not possible on this export (too long, unsupported command).
    #[error("request not possible: {0}")]
    Unsupported(String),
    /// The connection is gone, or given up on (the server silent past the timeout): said
    /// "ended", not "closed", since a silent server closed nothing.
    #[error("NBD connection ended: {0}")]
    Closed(String),
}

impl ClientError {
    /// The server's error value, if this is a server error.
    pub fn errno(&self) -> Option<Errno> {
        match self {
            ClientError::Server { errno, .. } => Some(*errno),
            _ => None,
        }
    }
}

/// What negotiation learnt about the export.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportInfo {
    /// Export name used.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Transmission flags.
    pub flags: u16,
    /// Block size constraints (the protocol's defaults when the server sent none).
    pub block_size: BlockSize,
    /// Structured replies are on.
    pub structured: bool,
    /// Context id of `base:allocation`, when selected.
    pub base_allocation: Option<u32>,
}

impl ExportInfo {
    /// Whether a transmission flag is set.
    pub fn has(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }
}

/// Tunables of a client connection.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// Export to open.
    pub export: String,
    /// Ask for structured replies (and `base:allocation`).
    pub structured: bool,
    /// Most requests in flight at once.
    pub max_in_flight: usize,
    /// Give up on a server that has answered nothing for this long while requests wait on it
    /// (stopped, or behind a network that drops everything, where TCP itself takes a quarter
    /// of an hour to notice): every request then fails with why. Counted from the last reply,
    /// or from when a request came to a client that had none in flight, never per request,
    /// so that a deep queue over a slow link is not mistaken for a stall. `None`: wait for ever.
    pub answer_timeout: Option<std::time::Duration>,
}

impl Default for ClientOptions {
    fn default() -> ClientOptions {
        ClientOptions { export: String::new(), structured: true, max_in_flight: 64, answer_timeout: None }
    }
}

/// A write payload the writer task owns until it is on the wire.
pub enum Payload {
    /// A buffer shared with other users (e.g. the local write of a mirrored request).
    Shared(Arc<IoBuf>),
    /// Part of a shared buffer: a copy sends the data runs of one read without copying them.
    Slice(Arc<IoBuf>, std::ops::Range<usize>),
    /// A plain vector.
    Owned(Vec<u8>),
}

impl Payload {
    fn bytes(&self) -> &[u8] {
        match self {
            Payload::Shared(b) => b,
            // Ranges come from the buffer's own length; a bad one sends nothing rather than panic.
            Payload::Slice(b, r) => b.get(r.clone()).unwrap_or(&[]),
            Payload::Owned(v) => v,
        }
    }
}

impl From<Vec<u8>> for Payload {
    fn from(v: Vec<u8>) -> Payload {
        Payload::Owned(v)
    }
}

impl From<Arc<IoBuf>> for Payload {
    fn from(b: Arc<IoBuf>) -> Payload {
        Payload::Shared(b)
    }
}

/// A run in a block status answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct StatusExtent {
    /// First byte.
    pub offset: u64,
    /// Length.
    pub length: u64,
    /// `base:allocation` flags (`HOLE` = 1, `ZERO` = 2).
    pub flags: u32,
}

struct Outgoing {
    header: [u8; proto::REQUEST_LEN],
    payload: Option<Payload>,
    /// Bytes of this request already on the wire (a direct write the socket took in part).
    sent: usize,
}

impl Outgoing {
    fn new(header: [u8; proto::REQUEST_LEN], payload: Option<Payload>) -> Outgoing {
        Outgoing { header, payload, sent: 0 }
    }

    fn len(&self) -> usize {
        self.header.len() + self.payload.as_ref().map(|p| p.bytes().len()).unwrap_or(0)
    }

    fn is_disc(&self) -> bool {
        self.header[6..8] == cmd::DISC.to_be_bytes()
    }

    /// The slices still to send.
    fn slices(&self) -> Vec<IoSlice<'_>> {
        let mut v = Vec::with_capacity(2);
        let mut skip = self.sent;
        for part in [&self.header[..], self.payload.as_ref().map(|p| p.bytes()).unwrap_or(&[])] {
            if skip >= part.len() {
                skip -= part.len();
                continue;
            }
            v.push(IoSlice::new(&part[skip..]));
            skip = 0;
        }
        v
    }
}

/// The write side of a connection. Unix and TCP sockets can be written without waiting
/// (`try_write_vectored`), so a request usually goes on the wire from the task that makes it,
/// with no hop to the writer task; other streams always go through the writer task.
enum Sink {
    Unix(super::unix::WriteHalf),
    Tcp(tokio::net::tcp::OwnedWriteHalf),
    Other(tokio::sync::Mutex<std::pin::Pin<Box<dyn AsyncWrite + Send>>>),
}

impl Sink {
    /// Bytes handed to the kernel that the peer has not yet taken, where the socket says.
    fn unsent(&self) -> Option<u64> {
        match self {
            Sink::Unix(w) => w.unsent(),
            Sink::Tcp(w) => super::unix::unsent(w.as_ref().as_raw_fd()),
            Sink::Other(_) => None,
        }
    }

    fn try_write(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Sink::Unix(w) => w.try_write_vectored(bufs),
            Sink::Tcp(w) => w.try_write_vectored(bufs),
            Sink::Other(_) => Err(io::ErrorKind::WouldBlock.into()),
        }
    }

    /// Writes every byte of `rest`, calling `taken` each time the stream takes some.
    async fn write_all(&self, mut rest: &mut [IoSlice<'_>], taken: &(dyn Fn() + Sync)) -> io::Result<()> {
        if let Sink::Other(m) = self {
            let mut w = m.lock().await;
            while !rest.is_empty() {
                let n = w.write_vectored(rest).await?;
                if n == 0 {
                    return Err(io::ErrorKind::WriteZero.into());
                }
                taken();
                IoSlice::advance_slices(&mut rest, n);
            }
            return w.flush().await;
        }
        // Write first and wait only for a full socket: a Unix socket's wait registers the
        // descriptor for just that wait (`nbd::unix`), two system calls to spare when it has room.
        while !rest.is_empty() {
            match self.try_write(rest) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    taken();
                    IoSlice::advance_slices(&mut rest, n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => match self {
                    Sink::Unix(w) => w.writable().await?,
                    Sink::Tcp(w) => w.writable().await?,
                    Sink::Other(_) => {}
                },
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// Orders requests onto the sink: directly when nothing is queued and the writer task is idle,
/// else through the queue, which only the writer task drains. Only the task that holds
/// `state` writes directly, and only while the writer task is idle, so requests never
/// interleave on the wire. A direct write never awaits, so a caller that drops its future
/// cannot leave half a request behind.
struct Writer {
    sink: Sink,
    state: Mutex<WriterState>,
    wake: tokio::sync::Notify,
    /// Told of every byte the server takes: a large write trickling out to a slow server is
    /// the server at work, not silence ([`ClientOptions::answer_timeout`]).
    shared: Arc<Shared>,
}

#[derive(Default)]
struct WriterState {
    queue: std::collections::VecDeque<Outgoing>,
    /// The writer task owns the wire until the queue is empty.
    busy: bool,
    /// Why nothing more may be sent (after DISC, an error, or the client's end).
    closed: Option<String>,
}

impl Writer {
    fn send(&self, mut out: Outgoing) -> Result<(), ClientError> {
        let mut st = self.state.lock().map_err(|_| ClientError::Closed("writer poisoned".into()))?;
        if let Some(why) = &st.closed {
            return Err(ClientError::Closed(why.clone()));
        }
        let disc = out.is_disc();
        if !st.busy && st.queue.is_empty() {
            let total = out.len();
            match self.sink.try_write(&out.slices()) {
                Ok(n) if n == total => {
                    self.shared.heard_now();
                    if disc {
                        st.closed = Some("disconnected by the client".into());
                    }
                    return Ok(());
                }
                Ok(n) => {
                    if n > 0 {
                        self.shared.heard_now();
                    }
                    out.sent = n;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    st.closed = Some(format!("write failed: {e}"));
                    return Err(ClientError::Io(e));
                }
            }
        }
        st.queue.push_back(out);
        if disc {
            // Nothing may follow NBD_CMD_DISC on the wire.
            st.closed = Some("disconnected by the client".into());
        }
        if !st.busy {
            st.busy = true;
            self.wake.notify_one();
        }
        Ok(())
    }

    fn close(&self, why: &str) {
        if let Ok(mut st) = self.state.lock() {
            st.closed.get_or_insert_with(|| why.to_owned());
        }
        self.wake.notify_one();
    }

    /// The writer task: drains the queue whenever a sender handed the wire over.
    async fn run(&self) -> io::Result<()> {
        loop {
            self.wake.notified().await;
            loop {
                let batch: Vec<Outgoing> = {
                    let Ok(mut st) = self.state.lock() else { return Ok(()) };
                    if st.queue.is_empty() {
                        st.busy = false;
                        if st.closed.is_some() {
                            return Ok(());
                        }
                        break;
                    }
                    let n = st.queue.len().min(64);
                    st.queue.drain(..n).collect()
                };
                let mut slices: Vec<IoSlice<'_>> = batch.iter().flat_map(|o| o.slices()).collect();
                self.sink.write_all(&mut slices, &|| self.shared.heard_now()).await?;
            }
        }
    }
}

enum Expect {
    Simple,
    /// `covered` collects the (start, end) ranges of the request that data and hole chunks
    /// filled, so a reply that leaves a gap is caught rather than read as zeroes.
    Read { buf: Vec<u8>, offset: u64, covered: Vec<(usize, usize)> },
    Status { descriptors: Vec<Descriptor> },
}

enum Answer {
    Done,
    Data(Vec<u8>),
    Status(Vec<Descriptor>),
}

struct Pending {
    expect: Expect,
    error: Option<ClientError>,
    tx: oneshot::Sender<Result<Answer, ClientError>>,
}

struct Shared {
    pending: Mutex<HashMap<u64, Pending>>,
    /// Set once the connection is broken, with why: later requests fail with it, and
    /// [`NbdClient::closed`] waits on it.
    broken: tokio::sync::watch::Sender<Option<String>>,
    /// Milliseconds after `born` of the last sign the server is answering: a reply, or a
    /// request arriving when none was in flight (the wait starts there).
    heard: AtomicU64,
    born: std::time::Instant,
    /// Whether anything watches `heard` ([`ClientOptions::answer_timeout`]): if not, no clock
    /// is read for it on the request path (the mirror's guest writes go through here).
    watched: bool,
}

impl Shared {
    fn new(watched: bool) -> Shared {
        Shared {
            pending: Mutex::new(HashMap::new()),
            broken: tokio::sync::watch::Sender::new(None),
            heard: AtomicU64::new(0),
            born: std::time::Instant::now(),
            watched,
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.born.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn heard_now(&self) {
        if self.watched {
            self.heard.store(self.now_ms(), Ordering::Relaxed);
        }
    }

    /// Fails the connection once requests have waited `limit` with no answer at all. Ends
    /// when the connection breaks for any reason. `unsent` is what the socket still holds of
    /// what was written: while it shrinks, the server is taking our bytes (a large write over
    /// a slow link sits in the kernel's send buffer long after the writer handed it over).
    async fn watch_answers(&self, limit: std::time::Duration, unsent: impl Fn() -> Option<u64>) {
        let limit_ms = u64::try_from(limit.as_millis()).unwrap_or(u64::MAX).max(1);
        let tick = (limit / 4).clamp(std::time::Duration::from_millis(10), std::time::Duration::from_secs(1));
        let mut last_unsent = None;
        loop {
            tokio::time::sleep(tick).await;
            if self.broken().is_some() {
                return;
            }
            let now_unsent = unsent();
            if let (Some(before), Some(now)) = (last_unsent, now_unsent)
                && now < before
            {
                self.heard_now();
            }
            last_unsent = now_unsent;
            let waiting = self.pending.lock().map(|p| p.len()).unwrap_or(0);
            let silent = self.now_ms().saturating_sub(self.heard.load(Ordering::Relaxed));
            if waiting > 0 && silent >= limit_ms {
                let requests = if waiting == 1 { "request" } else { "requests" };
                self.fail_all(&format!("the server answered nothing for {:.1} s with {waiting} {requests} waiting", silent as f64 / 1000.0));
                return;
            }
        }
    }

    /// Marks the connection broken, unless it is already (the first reason stays).
    fn mark_broken(&self, why: &str) {
        self.broken.send_if_modified(|b| b.is_none() && b.replace(why.to_owned()).is_none());
    }

    /// Why the connection is broken, if it is.
    fn broken(&self) -> Option<String> {
        self.broken.borrow().clone()
    }

    fn fail_all(&self, why: &str) {
        self.mark_broken(why);
        let drained: Vec<Pending> = match self.pending.lock() {
            Ok(mut p) => p.drain().map(|(_, v)| v).collect(),
            Err(_) => Vec::new(),
        };
        for p in drained {
            let _ = p.tx.send(Err(ClientError::Closed(why.to_owned())));
        }
    }
}

struct Inner {
    info: ExportInfo,
    writer: Arc<Writer>,
    shared: Arc<Shared>,
    next_cookie: AtomicU64,
    slots: Semaphore,
    reader: tokio::task::JoinHandle<()>,
    /// The [`ClientOptions::answer_timeout`] watch, if asked for.
    watchdog: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.reader.abort();
        if let Some(w) = &self.watchdog {
            w.abort();
        }
        self.writer.close("client dropped");
    }
}

/// Requests one split call keeps in flight at once: enough to overlap the server's round trips,
/// few enough that a 1 TiB zeroing into a server without WRITE_ZEROES (a million 1 MiB
/// writes) is not a million tasks at once.
const PIECES_IN_FLIGHT: usize = 64;

/// The requests of one split call: at most [`PIECES_IN_FLIGHT`] at a time, and the first error.
#[derive(Default)]
struct Pieces {
    set: tokio::task::JoinSet<Result<(), ClientError>>,
    first: Option<ClientError>,
}

impl Pieces {
    /// Starts `piece` once fewer than [`PIECES_IN_FLIGHT`] are in flight.
    async fn start(&mut self, piece: impl Future<Output = Result<(), ClientError>> + Send + 'static) {
        if self.set.len() >= PIECES_IN_FLIGHT {
            self.reap_one().await;
        }
        self.set.spawn(piece);
    }

    async fn reap_one(&mut self) {
        if let Some(done) = self.set.join_next().await
            && let Err(e) = done.unwrap_or_else(|e| Err(ClientError::Closed(format!("a request's task failed: {e}"))))
        {
            self.first.get_or_insert(e);
        }
    }

    /// Waits for every piece; the first error, if any (the rest still run to their end, so
    /// none outlives the call).
    async fn finish(mut self) -> Result<(), ClientError> {
        while !self.set.is_empty() {
            self.reap_one().await;
        }
        self.first.map_or(Ok(()), Err)
    }
}

/// A connected NBD client. Clones share the connection.
#[derive(Clone)]
pub struct NbdClient {
    inner: Arc<Inner>,
}

impl NbdClient {
    /// Connects to `uri` with default options and its export name.
    pub async fn connect(uri: &NbdUri) -> Result<NbdClient, ClientError> {
        let opts = ClientOptions { export: uri.export.clone(), ..ClientOptions::default() };
        Self::connect_with(&uri.endpoint, opts).await
    }

    /// Connects to `endpoint` with `opts`.
    pub async fn connect_with(endpoint: &Endpoint, opts: ClientOptions) -> Result<NbdClient, ClientError> {
        match endpoint {
            Endpoint::Unix(path) => Self::connect_unix(path, opts).await,
            Endpoint::Tcp(host, port) => {
                let s = tokio::net::TcpStream::connect((host.as_str(), *port)).await?;
                s.set_nodelay(true)?;
                let (r, w) = s.into_split();
                Self::start(r, w, opts, Sink::Tcp).await
            }
        }
    }

    /// Connects over a Unix socket.
    pub async fn connect_unix(path: &Path, opts: ClientOptions) -> Result<NbdClient, ClientError> {
        let s = tokio::net::UnixStream::connect(path)
            .await
            .map_err(|e| io::Error::new(e.kind(), format!("connect {}: {e}", path.display())))?
            .into_std()?;
        let (r, w) = super::unix::split(s)?;
        Self::start(r, w, opts, Sink::Unix).await
    }

    /// Uses an already connected socket (Unix or TCP), e.g. one handed over by `SCM_RIGHTS`
    /// after an HTTP upgrade. Must be called inside a tokio runtime.
    pub async fn from_fd(fd: OwnedFd, opts: ClientOptions) -> Result<NbdClient, ClientError> {
        use nix::sys::socket::SockaddrLike;
        let family = nix::sys::socket::getsockname::<nix::sys::socket::SockaddrStorage>(fd.as_raw_fd())
            .map_err(|e| io::Error::from_raw_os_error(e as i32))?
            .family();
        match family {
            Some(nix::sys::socket::AddressFamily::Unix) => {
                let (r, w) = super::unix::split(std::os::unix::net::UnixStream::from(fd))?;
                Self::start(r, w, opts, Sink::Unix).await
            }
            Some(nix::sys::socket::AddressFamily::Inet) | Some(nix::sys::socket::AddressFamily::Inet6) => {
                let std = std::net::TcpStream::from(fd);
                std.set_nonblocking(true)?;
                std.set_nodelay(true)?;
                let (r, w) = tokio::net::TcpStream::from_std(std)?.into_split();
                Self::start(r, w, opts, Sink::Tcp).await
            }
            other => Err(ClientError::Unsupported(format!("socket family {other:?}"))),
        }
    }

    /// Negotiates over any byte stream halves and starts the connection's tasks.
    pub async fn handshake<R, W>(r: R, w: W, opts: ClientOptions) -> Result<NbdClient, ClientError>
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        Self::start(r, w, opts, |w| Sink::Other(tokio::sync::Mutex::new(Box::pin(w)))).await
    }

    async fn start<R, W>(r: R, mut w: W, opts: ClientOptions, sink: impl FnOnce(W) -> Sink) -> Result<NbdClient, ClientError>
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let mut r = BufReader::with_capacity(256 * 1024, r);
        let info = negotiate(&mut r, &mut w, &opts).await?;
        let shared = Arc::new(Shared::new(opts.answer_timeout.is_some()));
        let writer =
            Arc::new(Writer { sink: sink(w), state: Mutex::new(WriterState::default()), wake: tokio::sync::Notify::new(), shared: Arc::clone(&shared) });
        let reader_shared = Arc::clone(&shared);
        let writer_shared = Arc::clone(&shared);
        let writer_task = Arc::clone(&writer);
        tokio::spawn(async move {
            if let Err(e) = writer_task.run().await {
                writer_task.close(&format!("write failed: {e}"));
                writer_shared.fail_all(&format!("write failed: {e}"));
            }
        });
        let reader = tokio::spawn(async move {
            let why = match read_replies(&mut r, &reader_shared).await {
                Ok(()) => "server closed the connection".to_owned(),
                // With its cause: "NBD connection" alone said nothing of a reset.
                Err(e) => crate::error_chain(&e),
            };
            reader_shared.fail_all(&why);
        });
        let watchdog = opts.answer_timeout.map(|limit| {
            let shared = Arc::clone(&shared);
            let writer = Arc::clone(&writer);
            tokio::spawn(async move {
                shared.watch_answers(limit, || writer.sink.unsent()).await;
                // Nothing more goes to a server given up on (a no-op after any other break).
                writer.close("the server stopped answering");
            })
        });
        Ok(NbdClient {
            inner: Arc::new(Inner {
                info,
                writer,
                shared,
                next_cookie: AtomicU64::new(1),
                slots: Semaphore::new(opts.max_in_flight.max(1)),
                reader,
                watchdog,
            }),
        })
    }

    /// Resolves once the connection is broken (the server closed it or went away, a read or
    /// write failed, or we disconnected), with why: a user with no request in flight learns
    /// of it too.
    pub async fn closed(&self) -> String {
        let mut rx = self.inner.shared.broken.subscribe();
        match rx.wait_for(Option::is_some).await {
            Ok(why) => why.clone().unwrap_or_default(),
            Err(_) => "connection dropped".to_owned(),
        }
    }

    /// What negotiation learnt.
    pub fn info(&self) -> &ExportInfo {
        &self.inner.info
    }

    /// Export size.
    pub fn size(&self) -> u64 {
        self.inner.info.size
    }

    async fn request(&self, kind: u16, flags: u16, offset: u64, length: u32, payload: Option<Payload>, expect: Expect) -> Result<Answer, ClientError> {
        let _slot = self.inner.slots.acquire().await.map_err(|_| ClientError::Closed("client closed".into()))?;
        if let Some(why) = self.inner.shared.broken() {
            return Err(ClientError::Closed(why));
        }
        let cookie = self.inner.next_cookie.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut pending = self.inner.shared.pending.lock().map_err(|_| ClientError::Closed("pending table poisoned".into()))?;
            if pending.is_empty() {
                // An idle client's wait for an answer starts now, not at the last reply.
                self.inner.shared.heard_now();
            }
            pending.insert(cookie, Pending { expect, error: None, tx });
        }
        // `fail_all` marks the connection broken and then drains the table. Checking again after
        // registering closes the window in which a request would miss both.
        if let Some(why) = self.inner.shared.broken() {
            if let Ok(mut p) = self.inner.shared.pending.lock() {
                p.remove(&cookie);
            }
            return Err(ClientError::Closed(why));
        }
        let header = Request { flags, kind, cookie, offset, length }.encode();
        if let Err(e) = self.inner.writer.send(Outgoing::new(header, payload)) {
            if let Ok(mut p) = self.inner.shared.pending.lock() {
                p.remove(&cookie);
            }
            return Err(e);
        }
        rx.await.map_err(|_| ClientError::Closed("connection dropped".into()))?
    }

    fn check_payload(&self, len: usize) -> Result<u32, ClientError> {
        let max = self.inner.info.block_size.maximum;
        u32::try_from(len)
            .ok()
            .filter(|&l| l <= max)
            .ok_or_else(|| ClientError::Unsupported(format!("{len} bytes exceeds the server's maximum of {max}")))
    }

    /// Reads `len` bytes at `offset`.
    pub async fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>, ClientError> {
        let length = self.check_payload(len)?;
        match self.request(cmd::READ, 0, offset, length, None, Expect::Read { buf: vec![0u8; len], offset, covered: Vec::new() }).await? {
            Answer::Data(v) => Ok(v),
            _ => Err(ClientError::Protocol("read answered without data".into())),
        }
    }

    /// Writes `data` at `offset`; `fua` makes it durable before the reply. A server without
    /// FUA gets the write and then a FLUSH (the protocol forbids the flag it did not offer);
    /// one with neither has no cache a client could flush.
    pub async fn write(&self, offset: u64, data: impl Into<Payload>, fua: bool) -> Result<(), ClientError> {
        let data = data.into();
        let length = self.check_payload(data.bytes().len())?;
        if self.inner.info.has(tflags::READ_ONLY) {
            return Err(ClientError::Unsupported("export is read-only".into()));
        }
        let native_fua = fua && self.inner.info.has(tflags::SEND_FUA);
        let flags = if native_fua { cmd_flags::FUA } else { 0 };
        self.request(cmd::WRITE, flags, offset, length, Some(data), Expect::Simple).await?;
        if fua && !native_fua {
            self.flush_if_offered().await?;
        }
        Ok(())
    }

    /// Writes `[range]` of `buf` at `offset` in as many requests as the server's maximum
    /// block size asks for, all in flight at once (`fua` on each), so that the whole takes
    /// about one request's time rather than the sum of theirs.
    pub async fn write_split(&self, offset: u64, buf: &Arc<IoBuf>, range: std::ops::Range<usize>, fua: bool) -> Result<(), ClientError> {
        let max = (self.inner.info.block_size.maximum as usize).max(1);
        if range.len() <= max {
            let payload = if range.start == 0 && range.end == buf.len() { Payload::Shared(Arc::clone(buf)) } else { Payload::Slice(Arc::clone(buf), range) };
            return self.write(offset, payload, fua).await;
        }
        let mut pieces = Pieces::default();
        let mut at = range.start;
        while at < range.end {
            let n = (range.end - at).min(max);
            let (c, payload) = (self.clone(), Payload::Slice(Arc::clone(buf), at..at + n));
            let off = offset + (at - range.start) as u64;
            pieces.start(async move { c.write(off, payload, fua).await }).await;
            at += n;
        }
        pieces.finish().await
    }

    /// Makes `[offset, offset + len)` read as zeroes. `no_hole` keeps it allocated; `fast`
    /// fails with `ENOTSUP` unless the server can zero faster than it can write.
    pub async fn write_zeroes(&self, offset: u64, len: u32, no_hole: bool, fast: bool) -> Result<(), ClientError> {
        if fast && !self.inner.info.has(tflags::SEND_FAST_ZERO) {
            return Err(ClientError::Unsupported("server does not support FAST_ZERO".into()));
        }
        let mut flags = 0;
        if no_hole {
            flags |= cmd_flags::NO_HOLE;
        }
        if fast {
            flags |= cmd_flags::FAST_ZERO;
        }
        self.write_zeroes_flags(offset, len, flags).await
    }

    /// Makes `[offset, offset + len)` read as zeroes, however long: `WRITE_ZEROES` (up to 1 GiB
    /// a request) where the server takes it, else zero buffers within its maximum block size
    /// (tapdisk's server has no `WRITE_ZEROES`); never `TRIM`, whose content afterwards is
    /// unspecified. The requests are in flight at once; `fua` makes the zeroes durable before
    /// this returns (FUA on each request, or a FLUSH after them where the server has no FUA).
    /// `no_hole` asks the server to keep the range allocated (`NO_HOLE`): zeroes it must hold
    /// itself, not leave to whatever lies beneath it now.
    pub async fn zero(&self, offset: u64, len: u64, fua: bool, no_hole: bool) -> Result<(), ClientError> {
        let has_zeroes = self.inner.info.has(tflags::SEND_WRITE_ZEROES);
        let chunk = if has_zeroes { 1 << 30 } else { u64::from(self.inner.info.block_size.maximum).min(1 << 20) };
        let zeroes = (!has_zeroes).then(|| Arc::new(IoBuf::new(len.min(chunk) as usize)));
        let native_fua = fua && self.inner.info.has(tflags::SEND_FUA);
        let mut pieces = Pieces::default();
        let mut at = 0;
        while at < len {
            let n = (len - at).min(chunk);
            let (c, off, z) = (self.clone(), offset + at, zeroes.clone());
            pieces
                .start(async move {
                    match z {
                        None => {
                            let flags = if native_fua { cmd_flags::FUA } else { 0 } | if no_hole { cmd_flags::NO_HOLE } else { 0 };
                            c.write_zeroes_flags(off, n as u32, flags).await
                        }
                        Some(z) => c.write(off, Payload::Slice(z, 0..n as usize), native_fua).await,
                    }
                })
                .await;
            at += n;
        }
        pieces.finish().await?;
        if fua && !native_fua {
            self.flush_if_offered().await?;
        }
        Ok(())
    }

    /// `WRITE_ZEROES` with the flags given (the server must take the command).
    async fn write_zeroes_flags(&self, offset: u64, len: u32, flags: u16) -> Result<(), ClientError> {
        if !self.inner.info.has(tflags::SEND_WRITE_ZEROES) {
            return Err(ClientError::Unsupported("server does not support WRITE_ZEROES".into()));
        }
        self.request(cmd::WRITE_ZEROES, flags, offset, len, None, Expect::Simple).await.map(|_| ())
    }

    /// Fails every request in flight, and every later one, with `why` at once: for a caller
    /// that gave up on the server (a mirror whose target stopped answering), so that requests
    /// queued behind the one that timed out do not each wait out a timeout of their own.
    pub fn abort(&self, why: &str) {
        self.inner.writer.close(why);
        self.inner.shared.fail_all(why);
    }

    /// Tells the server a range is unused.
    pub async fn trim(&self, offset: u64, len: u32) -> Result<(), ClientError> {
        if !self.inner.info.has(tflags::SEND_TRIM) {
            return Err(ClientError::Unsupported("server does not support TRIM".into()));
        }
        self.request(cmd::TRIM, 0, offset, len, None, Expect::Simple).await.map(|_| ())
    }

    /// Makes every replied write durable.
    pub async fn flush(&self) -> Result<(), ClientError> {
        if !self.inner.info.has(tflags::SEND_FLUSH) {
            return Err(ClientError::Unsupported("server does not support FLUSH".into()));
        }
        self.request(cmd::FLUSH, 0, 0, 0, None, Expect::Simple).await.map(|_| ())
    }

    /// As [`NbdClient::flush`] where the server offers FLUSH; nothing where it does not, as
    /// such a server has no cache to flush (or none a client could reach).
    pub async fn flush_if_offered(&self) -> Result<(), ClientError> {
        if !self.inner.info.has(tflags::SEND_FLUSH) {
            return Ok(());
        }
        self.flush().await
    }

    /// `base:allocation` for `[offset, offset + len)`: extents starting at `offset`, at least
    /// one, possibly covering less than asked (ask again from where they end).
    pub async fn block_status(&self, offset: u64, len: u32) -> Result<Vec<StatusExtent>, ClientError> {
        if self.inner.info.base_allocation.is_none() {
            return Err(ClientError::Unsupported("base:allocation was not negotiated".into()));
        }
        let answer = self.request(cmd::BLOCK_STATUS, 0, offset, len, None, Expect::Status { descriptors: Vec::new() }).await?;
        let Answer::Status(descriptors) = answer else {
            return Err(ClientError::Protocol("block status answered without descriptors".into()));
        };
        let mut out = Vec::with_capacity(descriptors.len());
        let mut at = offset;
        let end = offset + u64::from(len);
        for d in descriptors {
            if d.length == 0 || at >= end {
                break;
            }
            let length = u64::from(d.length).min(end - at);
            out.push(StatusExtent { offset: at, length, flags: d.flags });
            at += length;
        }
        if out.is_empty() {
            return Err(ClientError::Protocol("block status reply without usable extents".into()));
        }
        Ok(out)
    }

    /// The allocation map of the whole export, by repeated `block_status`.
    pub async fn allocation_map(&self) -> Result<Vec<StatusExtent>, ClientError> {
        let size = self.size();
        let mut out: Vec<StatusExtent> = Vec::new();
        let mut at = 0u64;
        while at < size {
            let len = (size - at).min(1 << 30) as u32;
            for e in self.block_status(at, len).await? {
                at = e.offset + e.length;
                match out.last_mut() {
                    Some(l) if l.flags == e.flags && l.offset + l.length == e.offset => l.length += e.length,
                    _ => out.push(e),
                }
            }
        }
        Ok(out)
    }

    /// Sends `NBD_CMD_DISC` after every request sent so far.
    pub async fn disconnect(&self) -> Result<(), ClientError> {
        // Nothing may follow NBD_CMD_DISC: later requests fail here instead of reaching the wire.
        self.inner.shared.mark_broken("disconnected by the client");
        let header = Request { flags: 0, kind: cmd::DISC, cookie: 0, offset: 0, length: 0 }.encode();
        self.inner.writer.send(Outgoing::new(header, None))
    }
}

/// Largest chunk payload other than read data we accept (a block status of 2^20 descriptors).
const MAX_META_PAYLOAD: u32 = 8 * 1024 * 1024 + 4;

async fn read_replies<R: AsyncRead + Unpin>(r: &mut R, shared: &Shared) -> Result<(), ClientError> {
    loop {
        let mut head = [0u8; proto::CHUNK_HEADER_LEN];
        match r.read_exact(&mut head[..4]).await {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        let magic = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
        let len = ReplyHeader::header_len(magic).map_err(|e| ClientError::Protocol(e.to_string()))?;
        r.read_exact(&mut head[4..len]).await?;
        let header = ReplyHeader::decode(&head[..len]).map_err(|e| ClientError::Protocol(e.to_string()))?;
        let cookie = match header {
            ReplyHeader::Simple { cookie, .. } | ReplyHeader::Chunk { cookie, .. } => cookie,
        };
        shared.heard_now();
        // Take the entry out while its payload is read, so no lock is held across an await.
        let mut p = shared
            .pending
            .lock()
            .map_err(|_| ClientError::Protocol("pending table poisoned".into()))?
            .remove(&cookie)
            .ok_or_else(|| ClientError::Protocol(format!("reply for unknown cookie {cookie}")))?;
        let done = match header {
            ReplyHeader::Simple { error, .. } => {
                if error != 0 {
                    p.error = Some(ClientError::Server { errno: Errno::from_wire(error), message: None });
                } else if let Expect::Read { buf, covered, .. } = &mut p.expect {
                    read_payload(r, buf, shared).await?;
                    covered.push((0, buf.len()));
                }
                true
            }
            ReplyHeader::Chunk { flags, kind, length, .. } => {
                read_chunk(r, &mut p, kind, length, shared).await?;
                flags & chunk::FLAG_DONE != 0
            }
        };
        if done {
            if p.error.is_none()
                && let Expect::Read { buf, covered, .. } = &mut p.expect
                && !covers_exactly(covered, buf.len())
            {
                p.error = Some(ClientError::Protocol(format!("read reply for cookie {cookie} does not cover the request exactly")));
            }
            let answer = match p.error {
                Some(e) => Err(e),
                None => Ok(match p.expect {
                    Expect::Simple => Answer::Done,
                    Expect::Read { buf, .. } => Answer::Data(buf),
                    Expect::Status { descriptors } => Answer::Status(descriptors),
                }),
            };
            let _ = p.tx.send(answer);
        } else {
            shared.pending.lock().map_err(|_| ClientError::Protocol("pending table poisoned".into()))?.insert(cookie, p);
        }
    }
}

/// Reads a reply's payload into `buf`, each piece that arrives a sign the server is answering
/// ([`ClientOptions::answer_timeout`]): a large reply over a slow link streams for longer than
/// the timeout, and is no silence.
async fn read_payload<R: AsyncRead + Unpin>(r: &mut R, buf: &mut [u8], shared: &Shared) -> io::Result<()> {
    let mut at = 0;
    while at < buf.len() {
        match r.read(&mut buf[at..]).await? {
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            n => at += n,
        }
        shared.heard_now();
    }
    Ok(())
}

async fn read_chunk<R: AsyncRead + Unpin>(r: &mut R, p: &mut Pending, kind: u16, length: u32, shared: &Shared) -> Result<(), ClientError> {
    match kind {
        chunk::OFFSET_DATA => {
            let Expect::Read { buf, offset, covered } = &mut p.expect else {
                return Err(ClientError::Protocol("data chunk for a request that is not a read".into()));
            };
            if length < 8 {
                return Err(ClientError::Protocol("data chunk shorter than its offset".into()));
            }
            let at = r.read_u64().await?;
            let n = u64::from(length - 8);
            let start = at.checked_sub(*offset).filter(|s| s + n <= buf.len() as u64);
            let Some(start) = start else {
                return Err(ClientError::Protocol(format!("data chunk {at}+{n} outside the request")));
            };
            let start = start as usize;
            read_payload(r, &mut buf[start..start + n as usize], shared).await?;
            covered.push((start, start + n as usize));
        }
        chunk::OFFSET_HOLE => {
            let Expect::Read { buf, offset, covered } = &mut p.expect else {
                return Err(ClientError::Protocol("hole chunk for a request that is not a read".into()));
            };
            if length != 12 {
                return Err(ClientError::Protocol("hole chunk of wrong length".into()));
            }
            let at = r.read_u64().await?;
            let n = u64::from(r.read_u32().await?);
            let start = at.checked_sub(*offset).filter(|s| s + n <= buf.len() as u64);
            let Some(start) = start else {
                return Err(ClientError::Protocol(format!("hole chunk {at}+{n} outside the request")));
            };
            buf[start as usize..(start + n) as usize].fill(0);
            covered.push((start as usize, (start + n) as usize));
        }
        chunk::BLOCK_STATUS => {
            if length > MAX_META_PAYLOAD {
                return Err(ClientError::Protocol("block status chunk too large".into()));
            }
            let mut payload = vec![0u8; length as usize];
            r.read_exact(&mut payload).await?;
            let (_, ds) = proto::decode_block_status(&payload).map_err(|e| ClientError::Protocol(e.to_string()))?;
            match &mut p.expect {
                Expect::Status { descriptors } => descriptors.extend(ds),
                _ => return Err(ClientError::Protocol("block status chunk for another request".into())),
            }
        }
        chunk::NONE => {
            if length != 0 {
                return Err(ClientError::Protocol("NONE chunk with a payload".into()));
            }
        }
        k if k & (1 << 15) != 0 => {
            if length > MAX_META_PAYLOAD {
                return Err(ClientError::Protocol("error chunk too large".into()));
            }
            let mut payload = vec![0u8; length as usize];
            r.read_exact(&mut payload).await?;
            let (errno, message) = proto::decode_error_payload(&payload).map_err(|e| ClientError::Protocol(e.to_string()))?;
            p.error.get_or_insert(ClientError::Server { errno: Errno::from_wire(errno), message: Some(message) });
        }
        other => return Err(ClientError::Protocol(format!("unknown chunk type {other}"))),
    }
    Ok(())
}

/// Whether the ranges tile `[0, len)` with no gap and no overlap (the protocol forbids both).
fn covers_exactly(ranges: &mut [(usize, usize)], len: usize) -> bool {
    ranges.sort_unstable();
    let mut at = 0;
    for &(start, end) in ranges.iter() {
        if start != at {
            return false;
        }
        at = end;
    }
    at == len
}

/// Largest option reply data we accept during negotiation.
const MAX_OPTION_REPLY: u32 = 1 << 20;

async fn read_option_reply<R: AsyncRead + Unpin>(r: &mut R, option: u32) -> Result<(u32, Vec<u8>), ClientError> {
    let mut h = [0u8; proto::OPTION_REPLY_HEADER_LEN];
    r.read_exact(&mut h).await?;
    let header = proto::OptionReplyHeader::decode(&h).map_err(|e| ClientError::Protocol(e.to_string()))?;
    if header.option != option {
        return Err(ClientError::Protocol(format!("reply to option {} while waiting for {option}", header.option)));
    }
    if header.length > MAX_OPTION_REPLY {
        return Err(ClientError::Protocol("option reply too large".into()));
    }
    let mut data = vec![0u8; header.length as usize];
    r.read_exact(&mut data).await?;
    Ok((header.kind, data))
}

async fn send_option<W: AsyncWrite + Unpin>(w: &mut W, option: u32, data: &[u8]) -> io::Result<()> {
    w.write_all(&proto::encode_option(option, data)).await?;
    w.flush().await
}

fn refused(option: u32, reply: u32, data: &[u8]) -> ClientError {
    ClientError::Refused { option, reply, message: String::from_utf8_lossy(data).into_owned() }
}

async fn negotiate<R, W>(r: &mut R, w: &mut W, opts: &ClientOptions) -> Result<ExportInfo, ClientError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let magic = r.read_u64().await?;
    if magic != proto::NBD_MAGIC {
        return Err(ClientError::Protocol(format!("not an NBD server (magic {magic:#x})")));
    }
    // The protocol's defaults when the server sends no BLOCK_SIZE: portable clients use 32 MiB.
    let mut block_size = BlockSize { minimum: 1, preferred: 4096, maximum: 32 << 20 };
    let second = r.read_u64().await?;
    if second == proto::CLISERV_MAGIC {
        // Old style (tapdisk's server, xapi's `/services/SM/nbd/` on an SMAPIv1 host): the
        // export is the server's one, and no option can be asked.
        let size = r.read_u64().await?;
        let flags = r.read_u32().await?;
        let mut zeroes = [0u8; 124];
        r.read_exact(&mut zeroes).await?;
        let flags = u16::try_from(flags).map_err(|_| ClientError::Protocol(format!("old-style export flags {flags:#x} beyond 16 bits")))?;
        return Ok(ExportInfo { name: opts.export.clone(), size, flags, block_size, structured: false, base_allocation: None });
    }
    if second != proto::IHAVEOPT {
        return Err(ClientError::Protocol(format!("neither a newstyle nor an old-style NBD greeting (magic {second:#x})")));
    }
    let hflags = r.read_u16().await?;
    if hflags & proto::handshake::FIXED_NEWSTYLE == 0 {
        return Err(ClientError::Protocol("server does not speak fixed newstyle".into()));
    }
    let no_zeroes = hflags & proto::handshake::NO_ZEROES != 0;
    let mut cflags = proto::client_flags::FIXED_NEWSTYLE;
    if no_zeroes {
        cflags |= proto::client_flags::NO_ZEROES;
    }
    w.write_all(&cflags.to_be_bytes()).await?;

    let mut structured = false;
    let mut base_allocation = None;
    if opts.structured {
        send_option(w, opt::STRUCTURED_REPLY, &[]).await?;
        let (kind, _) = read_option_reply(r, opt::STRUCTURED_REPLY).await?;
        structured = kind == rep::ACK;
    }
    if structured {
        let req = proto::MetaContextRequest { export: opts.export.clone(), queries: vec![proto::BASE_ALLOCATION.into()] };
        send_option(w, opt::SET_META_CONTEXT, &req.encode()).await?;
        loop {
            let (kind, data) = read_option_reply(r, opt::SET_META_CONTEXT).await?;
            match kind {
                rep::META_CONTEXT => {
                    let (id, name) = proto::decode_meta_context_reply(&data).map_err(|e| ClientError::Protocol(e.to_string()))?;
                    if name == proto::BASE_ALLOCATION {
                        base_allocation = Some(id);
                    }
                }
                rep::ACK => break,
                // No block status then; reads and writes still work.
                k if k & rep::ERR_BIT != 0 => break,
                other => return Err(ClientError::Protocol(format!("unexpected reply {other} to SET_META_CONTEXT"))),
            }
        }
    }

    let req = proto::InfoRequest { name: opts.export.clone(), requests: vec![proto::info::BLOCK_SIZE] };
    send_option(w, opt::GO, &req.encode()).await?;
    let mut size_flags = None;
    loop {
        let (kind, data) = read_option_reply(r, opt::GO).await?;
        match kind {
            rep::INFO => match InfoItem::decode(&data).map_err(|e| ClientError::Protocol(e.to_string()))? {
                InfoItem::Export { size, flags } => size_flags = Some((size, flags)),
                InfoItem::BlockSize(b) => block_size = b,
                _ => {}
            },
            rep::ACK => break,
            rep::ERR_UNSUP => {
                // An old server: fall back to NBD_OPT_EXPORT_NAME, which cannot report errors.
                send_option(w, opt::EXPORT_NAME, opts.export.as_bytes()).await?;
                let size = r.read_u64().await?;
                let flags = r.read_u16().await?;
                if !no_zeroes {
                    let mut z = [0u8; 124];
                    r.read_exact(&mut z).await?;
                }
                size_flags = Some((size, flags));
                break;
            }
            k if k & rep::ERR_BIT != 0 => return Err(refused(opt::GO, k, &data)),
            other => return Err(ClientError::Protocol(format!("unexpected reply {other} to GO"))),
        }
    }
    let (size, flags) = size_flags.ok_or_else(|| ClientError::Protocol("server sent no export size".into()))?;
    if block_size.maximum == 0 || block_size.minimum == 0 {
        return Err(ClientError::Protocol("server sent a zero block size".into()));
    }
    Ok(ExportInfo { name: opts.export.clone(), size, flags, block_size, structured, base_allocation })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_unix_and_tcp_uris() {
        let u = NbdUri::parse("nbd+unix:///disk0?socket=/run/x%20y.sock").expect("unix");
        assert_eq!(u.endpoint, Endpoint::Unix(PathBuf::from("/run/x y.sock")));
        assert_eq!(u.export, "disk0");
        let u = NbdUri::parse("nbd+unix:///?socket=/tmp/s").expect("unix default");
        assert_eq!(u.export, "");
        let u = NbdUri::parse("nbd://127.0.0.1:10900/exp").expect("tcp");
        assert_eq!(u.endpoint, Endpoint::Tcp("127.0.0.1".into(), 10900));
        assert_eq!(u.export, "exp");
        let u = NbdUri::parse("nbd://localhost").expect("tcp default port");
        assert_eq!(u.endpoint, Endpoint::Tcp("localhost".into(), 10809));
        let u = NbdUri::parse("nbd://[::1]:9000/e").expect("ipv6");
        assert_eq!(u.endpoint, Endpoint::Tcp("::1".into(), 9000));
    }

    #[test]
    fn rejects_other_uris() {
        for bad in ["http://x", "nbd+unix:///e", "nbd://:80/x", "nbd://h:notaport/x", "/tmp/file"] {
            assert!(matches!(NbdUri::parse(bad), Err(ClientError::BadUri(_))), "{bad}");
        }
        // What a URI asks beyond the endpoint is refused, not dropped or taken into the export
        // name (`nbd://h:1/foo?tls=1` asked for export "foo?tls=1").
        for (bad, says) in [
            ("nbd://127.0.0.1:10900/foo?tls=1", "\"tls\""),
            ("nbd+unix:///e?socket=/s&tls-certificates=/c", "\"tls-certificates\""),
            ("nbds://127.0.0.1:10900/foo", "TLS"),
            ("nbds+unix:///e?socket=/s", "TLS"),
        ] {
            match NbdUri::parse(bad) {
                Err(ClientError::BadUri(m)) => assert!(m.contains(says), "{bad}: {m}"),
                other => panic!("{bad}: {other:?}"),
            }
        }
    }
}
