//! The server side of xapi's NBD-over-HTTP `PUT`s, which turn their connection into an NBD
//! connection:
//!
//! | path | xapi's handler |
//! | --- | --- |
//! | `PUT /services/SM/nbd/[<vm>/]<sr>/<vdi>/<dp>` | `nbd_handler`: `DATA.import_activate`, then the socket goes to the datapath's fd receiver by SCM_RIGHTS |
//! | `PUT /services/SM/nbdproxy/[import/]<vm>/<sr>/<vdi>/<dp>` | `import_nbd_proxy`: `DATA.get_nbd_server`, then bytes are proxied to that NBD server |
//!
//! The answer is `HTTP/1.1 200 OK` and `Transfer-encoding: nbd` ([`NBD_OK`]), and from then on
//! the same socket carries NBD. hyper gives a connection away only after a `101` or a
//! `CONNECT`, so these requests never reach it: when a handover is configured
//! ([`super::Bound::run_with`]) the server reads the first bytes of every new connection itself,
//! at most as many as it takes to tell one of the two path prefixes from anything else
//! (`sniff`). Anything else goes to hyper with those bytes replayed in front of the rest
//! (`Prefixed`), so the router sees the request untouched. An NBD `PUT` has its head read
//! here, byte by byte up to the blank line so that nothing of the NBD stream is consumed, within
//! [`super::ServerConfig::head_timeout`] of the accept and in at most [`MAX_NBD_HEAD`] bytes;
//! then the caller is checked exactly as on the RPC routes (TCP: the host secret as
//! `session_id` or Bearer; the Unix socket: none), the path is parsed ([`NbdRequest::parse`]),
//! and [`NbdHandover::prepare`] decides. Only once it has accepted is the `200` written and the
//! socket handed to [`NbdHandover::take_over`] as an [`OwnedFd`] in blocking mode.
//!
//! Refusals are plain-text answers with `Connection: close`: 400 (a malformed head, or one that
//! declares a body), 401 (no secret), 404 (another path shape, or the handler's
//! [`HandoverError::NotFound`]), 431 (a head over [`MAX_NBD_HEAD`]), 500; then the connection
//! closes and the handler is not called (or, for its own refusal, not called again).
//!
//! Only the first request of a connection can be an NBD `PUT`: one sent after an RPC call on a
//! kept-alive connection is hyper's, and gets its 404. xapi and [`super::client::connect_nbd`]
//! open a connection per `PUT`. Any `Transfer-Encoding` the request declares is ignored, as
//! xapi does (sparse_dd's HTTP library may declare one and then speak NBD unframed).

use std::future::Future;
use std::os::fd::OwnedFd;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use std::{fmt, io};

use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, Uri, header};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::client::percent_encode;
use super::server::{Transport, check_secret, unauthorised};
use crate::model::StorageError;

/// The prefix of the paths xapi's mirror sends its `PUT` to (`nbd_handler`).
pub const NBD_PATH: &str = "/services/SM/nbd/";
/// The prefix of the paths xapi's copy and SMAPIv3 mirror send their `PUT` to (`import_nbd_proxy`).
pub const NBDPROXY_PATH: &str = "/services/SM/nbdproxy/";
/// The largest request head read for an NBD `PUT`, request line included; a longer one is
/// answered 431. xapi's are a few hundred bytes.
pub const MAX_NBD_HEAD: usize = 16 << 10;
/// The answer that hands the connection over, byte for byte as xapi writes it.
pub const NBD_OK: &[u8] = b"HTTP/1.1 200 OK\r\nTransfer-encoding: nbd\r\n\r\n";

/// The most header lines read in an NBD `PUT` head.
const MAX_HEADERS: usize = 100;
/// After a refusal, how long and how much of what the caller still sends is read and dropped
/// before the connection closes.
const LINGER: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 64 << 10;

const NBD_PREFIX: &[u8] = b"PUT /services/SM/nbd/";
const NBDPROXY_PREFIX: &[u8] = b"PUT /services/SM/nbdproxy/";

/// Which of xapi's two NBD `PUT`s a request is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NbdKind {
    /// `PUT /services/SM/nbd/[<vm>/]<sr>/<vdi>/<dp>`: the mirror's. xapi activates the import
    /// (`DATA.import_activate`) and passes the socket to the datapath's fd receiver.
    Nbd,
    /// `PUT /services/SM/nbdproxy/[import/]<vm>/<sr>/<vdi>/<dp>`: the copy's (sparse_dd) and the
    /// SMAPIv3 mirror's. xapi proxies the socket to the datapath's NBD server
    /// (`DATA.get_nbd_server`).
    NbdProxy {
        /// The path has `import/` (xapi ≥ 25.20; 25.3–25.19 sent the same request without it).
        import: bool,
    },
}

/// An NBD `PUT`'s target, from its path: the datapath `dp` holding `vdi` of `sr` for `vm`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NbdRequest {
    /// Which path it came in on.
    pub kind: NbdKind,
    /// The VM the datapath is for: `"0"` when the path has none (only `nbd/` may leave it out).
    pub vm: String,
    /// The SR.
    pub sr: String,
    /// The VDI.
    pub vdi: String,
    /// The datapath.
    pub dp: String,
}

impl NbdRequest {
    /// Parses a request path (without its query): exactly `/services/SM/nbd/[<vm>/]<sr>/<vdi>/<dp>`
    /// or `/services/SM/nbdproxy/[import/]<vm>/<sr>/<vdi>/<dp>`, each component percent-decoded.
    /// `None` for any other shape, and for a component that is empty, `.` or `..`, or decodes to
    /// something holding `/`, a control character or invalid UTF-8: the handler may well build
    /// file names from them. `nbdproxy/import/<a>/<b>/<c>` is refused rather than read as the
    /// older form with a VM called `import`.
    pub fn parse(path: &str) -> Option<NbdRequest> {
        let (rest, proxy) = match path.strip_prefix(NBD_PATH) {
            Some(rest) => (rest, false),
            None => (path.strip_prefix(NBDPROXY_PATH)?, true),
        };
        let parts = rest.split('/').map(decode_segment).collect::<Option<Vec<String>>>()?;
        let (kind, vm, sr, vdi, dp) = match (proxy, parts.as_slice()) {
            (false, [sr, vdi, dp]) => (NbdKind::Nbd, "0", sr, vdi, dp),
            (false, [vm, sr, vdi, dp]) => (NbdKind::Nbd, vm.as_str(), sr, vdi, dp),
            (true, [vm, sr, vdi, dp]) if vm != "import" => (NbdKind::NbdProxy { import: false }, vm.as_str(), sr, vdi, dp),
            (true, [import, vm, sr, vdi, dp]) if import == "import" => (NbdKind::NbdProxy { import: true }, vm.as_str(), sr, vdi, dp),
            _ => return None,
        };
        Some(NbdRequest { kind, vm: vm.to_owned(), sr: sr.clone(), vdi: vdi.clone(), dp: dp.clone() })
    }

    /// The path this request is sent to, components percent-encoded; [`NbdRequest::parse`] reads
    /// it back. A `Nbd` request always names its VM.
    pub fn path(&self) -> String {
        let (prefix, import) = match self.kind {
            NbdKind::Nbd => (NBD_PATH, ""),
            NbdKind::NbdProxy { import } => (NBDPROXY_PATH, if import { "import/" } else { "" }),
        };
        let [vm, sr, vdi, dp] = [&self.vm, &self.sr, &self.vdi, &self.dp].map(|s| percent_encode(s));
        format!("{prefix}{import}{vm}/{sr}/{vdi}/{dp}")
    }
}

/// Percent-decodes one path component (`+` is a plus here, not a space), refusing what must
/// not reach a handler.
fn decode_segment(s: &str) -> Option<String> {
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        if b == b'%' {
            let hi = char::from(bytes.next()?).to_digit(16)?;
            let lo = char::from(bytes.next()?).to_digit(16)?;
            out.push(u8::try_from(hi * 16 + lo).ok()?);
        } else {
            out.push(b);
        }
    }
    let s = String::from_utf8(out).ok()?;
    let bad = s.is_empty() || s == "." || s == ".." || s.chars().any(|c| c == '/' || c.is_control());
    (!bad).then_some(s)
}

/// Why a handler refuses an NBD `PUT`. The caller gets the status and the message as a plain
/// text body, and the connection closes.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HandoverError {
    /// 404: no such SR, VDI or datapath here.
    #[error("{0}")]
    NotFound(String),
    /// 400: the request names something that cannot be served this way.
    #[error("{0}")]
    BadRequest(String),
    /// 500: the NBD server end could not be set up.
    #[error("{0}")]
    Internal(String),
}

impl HandoverError {
    /// The HTTP status the caller gets.
    pub fn status(&self) -> StatusCode {
        match self {
            HandoverError::NotFound(_) => StatusCode::NOT_FOUND,
            HandoverError::BadRequest(_) => StatusCode::BAD_REQUEST,
            HandoverError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl From<StorageError> for HandoverError {
    /// A storage error from setting up the datapath: 404 for what does not exist or is not
    /// attached, 500 for the rest.
    fn from(e: StorageError) -> HandoverError {
        match e {
            StorageError::SrNotAttached(_)
            | StorageError::VdiDoesNotExist(_)
            | StorageError::DoesNotExist(..)
            | StorageError::NoStoragePluginForSr(_) => HandoverError::NotFound(e.to_string()),
            e => HandoverError::Internal(e.to_string()),
        }
    }
}

/// What the server runs for an NBD `PUT`, in two steps so that nothing is answered before the
/// NBD server end exists: [`NbdHandover::prepare`] sets it up (or refuses), the server writes
/// the `200`, then [`NbdHandover::take_over`] gets the socket.
pub trait NbdHandover: Send + Sync + 'static {
    /// What `prepare` passes to `take_over`: whatever it set up for this connection (the fd
    /// receiver's socket path, a connection to the NBD server…).
    type Prepared: Send + 'static;

    /// Sets up the NBD server end for `req`, which came in on `transport` from a caller already
    /// checked, before anything is answered. On `Err` the caller gets its status and message and
    /// the connection closes. Runs in its own task, so a caller hanging up does not interrupt it
    /// and a panic becomes a 500; graceful shutdown waits for it.
    fn prepare(&self, req: NbdRequest, transport: Transport) -> impl Future<Output = Result<Self::Prepared, HandoverError>> + Send;

    /// Takes the connection over once the `200` has been written: `conn` is the socket, in
    /// blocking mode (it is meant for another process, which shares that flag), with nothing of
    /// the NBD stream read from it, and the server keeps no copy. Runs in its own task, which
    /// graceful shutdown does not wait for: a handler that keeps the connection (a proxy) watches
    /// its own shutdown signal. If the `200` cannot be written (the caller hung up), `prepared`
    /// is dropped and this is not called.
    fn take_over(&self, prepared: Self::Prepared, conn: OwnedFd) -> impl Future<Output = ()> + Send;
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;
type TakeOver = Box<dyn FnOnce(OwnedFd) -> BoxFuture<()> + Send>;

/// [`NbdHandover`] with its types erased, so the listeners need no type parameter for it.
pub(super) trait DynHandover: Send + Sync + 'static {
    fn prepare_dyn(self: Arc<Self>, req: NbdRequest, transport: Transport) -> BoxFuture<Result<TakeOver, HandoverError>>;
}

impl<H: NbdHandover> DynHandover for H {
    fn prepare_dyn(self: Arc<Self>, req: NbdRequest, transport: Transport) -> BoxFuture<Result<TakeOver, HandoverError>> {
        Box::pin(async move {
            let prepared = self.prepare(req, transport).await?;
            let take: TakeOver = Box::new(move |conn| Box::pin(async move { self.take_over(prepared, conn).await }));
            Ok(take)
        })
    }
}

/// What a listener needs to serve NBD `PUT`s.
#[derive(Clone)]
pub(super) struct NbdContext {
    pub handover: Arc<dyn DynHandover>,
    pub transport: Transport,
    /// The host secret callers must present; `None` on the Unix socket.
    pub secret: Option<Arc<str>>,
    /// How long after the accept the whole head must have arrived.
    pub head_timeout: Duration,
}

/// A stream the server can give away as a file descriptor.
pub(super) trait IntoBlockingFd: Sized {
    /// The socket, out of the reactor and in blocking mode.
    fn into_blocking_fd(self) -> io::Result<OwnedFd>;
}

impl IntoBlockingFd for TcpStream {
    fn into_blocking_fd(self) -> io::Result<OwnedFd> {
        // `into_std` deregisters the socket from the reactor, so tokio keeps no interest in an
        // fd that is about to belong to someone else; it leaves O_NONBLOCK set, which lives in
        // the open file description the receiving process shares.
        let s = self.into_std()?;
        s.set_nonblocking(false)?;
        Ok(s.into())
    }
}

impl IntoBlockingFd for tokio_rustls::server::TlsStream<TcpStream> {
    fn into_blocking_fd(self) -> io::Result<OwnedFd> {
        super::tls::relay(self)
    }
}

impl IntoBlockingFd for tokio_rustls::client::TlsStream<TcpStream> {
    fn into_blocking_fd(self) -> io::Result<OwnedFd> {
        super::tls::relay(self)
    }
}

impl IntoBlockingFd for UnixStream {
    fn into_blocking_fd(self) -> io::Result<OwnedFd> {
        let s = self.into_std()?;
        s.set_nonblocking(false)?;
        Ok(s.into())
    }
}

/// What the first bytes of a connection are.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Sniffed {
    /// The start of an NBD `PUT`: `seen` is exactly one of the two prefixes.
    Nbd,
    /// Anything else, or end of stream: `seen` goes to hyper in front of the rest.
    Other,
}

/// Reads the first bytes of a connection into `seen` until they are one of the NBD `PUT`
/// prefixes or cannot become one. Each read asks for no more than the shortest prefix still
/// possible needs, so on [`Sniffed::Nbd`] not a byte past the prefix has been taken.
pub(super) async fn sniff<S: AsyncRead + Unpin>(s: &mut S, seen: &mut Vec<u8>) -> io::Result<Sniffed> {
    let mut chunk = [0u8; NBDPROXY_PREFIX.len()];
    loop {
        if seen == NBD_PREFIX || seen == NBDPROXY_PREFIX {
            return Ok(Sniffed::Nbd);
        }
        let Some(want) = [NBD_PREFIX, NBDPROXY_PREFIX].iter().filter(|p| p.starts_with(seen)).map(|p| p.len()).min() else {
            return Ok(Sniffed::Other);
        };
        let n = s.read(&mut chunk[..want - seen.len()]).await?;
        if n == 0 {
            return Ok(Sniffed::Other);
        }
        seen.extend_from_slice(&chunk[..n]);
    }
}

/// A stream with bytes already read from it put back in front.
pub(super) struct Prefixed<S> {
    prefix: Vec<u8>,
    pos: usize,
    inner: S,
}

impl<S> Prefixed<S> {
    pub(super) fn new(prefix: Vec<u8>, inner: S) -> Prefixed<S> {
        Prefixed { prefix, pos: 0, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.pos < this.prefix.len() {
            let n = (this.prefix.len() - this.pos).min(buf.remaining());
            buf.put_slice(&this.prefix[this.pos..this.pos + n]);
            this.pos += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Why a head could not be read.
#[derive(Debug)]
enum HeadError {
    TooLarge,
    Closed,
    Io(io::Error),
}

impl fmt::Display for HeadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HeadError::TooLarge => write!(f, "the head is over {MAX_NBD_HEAD} bytes"),
            HeadError::Closed => f.write_str("the caller closed the connection in the head"),
            HeadError::Io(e) => write!(f, "reading the head failed: {e}"),
        }
    }
}

/// Reads the rest of a request head after `head`, through its blank line and not a byte more.
async fn read_head<S: AsyncRead + Unpin>(s: &mut S, mut head: Vec<u8>) -> Result<Vec<u8>, HeadError> {
    // One byte per read: what follows the head is the NBD conversation, which belongs to the
    // process the socket goes to, and a socket cannot be un-read. (Peeking could read in larger
    // steps, but tokio's Unix stream cannot peek, and a head is read once per migration.)
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() >= MAX_NBD_HEAD {
            return Err(HeadError::TooLarge);
        }
        match s.read(&mut byte).await {
            Ok(0) => return Err(HeadError::Closed),
            Ok(_) => head.push(byte[0]),
            Err(e) => return Err(HeadError::Io(e)),
        }
    }
    Ok(head)
}

/// A parsed request head.
#[derive(Debug)]
struct Head {
    target: String,
    headers: HeaderMap,
}

/// Parses a request head ending in its blank line: `<method> <target> HTTP/1.x`, then
/// `name: value` lines. Strict: no folded lines, no bare LF, at most [`MAX_HEADERS`] lines.
fn parse_head(raw: &[u8]) -> Result<Head, String> {
    let raw = raw.strip_suffix(b"\r\n\r\n").ok_or("the head does not end in a blank line")?;
    let text = std::str::from_utf8(raw).map_err(|_| "the head is not UTF-8")?;
    let mut lines = text.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    let [_method, target, version] = <[&str; 3]>::try_from(request_line.split(' ').collect::<Vec<_>>()).map_err(|_| "the request line is not `<method> <target> <version>`")?;
    if version != "HTTP/1.1" && version != "HTTP/1.0" {
        return Err(format!("unsupported HTTP version {version:?}"));
    }
    if !target.starts_with('/') {
        return Err("the request target is not a path".into());
    }
    let mut headers = HeaderMap::new();
    for line in lines {
        if headers.len() >= MAX_HEADERS {
            return Err(format!("more than {MAX_HEADERS} header lines"));
        }
        let (name, value) = line.split_once(':').ok_or("a header line has no colon")?;
        // A name with surrounding whitespace (including a folded continuation line) is refused,
        // as RFC 9112 asks, rather than guessed at.
        let name = HeaderName::from_bytes(name.as_bytes()).map_err(|_| "a header name is not a token")?;
        let value = HeaderValue::from_bytes(value.trim_matches([' ', '\t']).as_bytes()).map_err(|_| "a header value holds control characters")?;
        headers.append(name, value);
    }
    Ok(Head { target: target.to_owned(), headers })
}

/// The bytes of a refusal: status, a plain-text body, and the connection closes after it.
fn refusal(status: StatusCode, text: &str, extra: &[(&str, &str)]) -> Vec<u8> {
    let body = format!("{text}\n");
    let mut out = format!("HTTP/1.1 {} {}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n", status.as_u16(), status.canonical_reason().unwrap_or(""), body.len());
    for (k, v) in extra {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    out.push_str("\r\n");
    out.push_str(&body);
    out.into_bytes()
}

/// Serves one connection that starts with an NBD `PUT` prefix (`seen`): reads the rest of the
/// head by `deadline`, checks it and the caller, asks the handler, and answers: a refusal, or
/// the `200` and the socket to [`NbdHandover::take_over`]. Returns once the connection is
/// answered; `shutdown` abandons only a head still being read.
pub(super) async fn serve<S>(mut stream: S, seen: Vec<u8>, ctx: &NbdContext, deadline: Instant, shutdown: &CancellationToken)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + IntoBlockingFd,
{
    let transport = ctx.transport;
    let head = tokio::select! {
        () = shutdown.cancelled() => return,
        head = tokio::time::timeout_at(deadline, read_head(&mut stream, seen)) => head,
    };
    let head = match head {
        Ok(Ok(head)) => head,
        Ok(Err(HeadError::TooLarge)) => {
            tracing::info!(%transport, "refused an NBD PUT with an oversized head");
            return answer(&mut stream, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, &HeadError::TooLarge.to_string(), &[], ctx.head_timeout).await;
        }
        Ok(Err(e)) => {
            tracing::debug!(%transport, error = %e, "dropped an NBD PUT");
            return;
        }
        Err(_) => {
            tracing::info!(%transport, timeout = ?ctx.head_timeout, "dropped an NBD PUT whose head did not arrive in time");
            return;
        }
    };
    let head = match parse_head(&head) {
        Ok(h) => h,
        Err(why) => {
            tracing::info!(%transport, error = %why, "refused a malformed NBD PUT");
            return answer(&mut stream, StatusCode::BAD_REQUEST, &format!("malformed request: {why}"), &[], ctx.head_timeout).await;
        }
    };
    let Ok(uri) = Uri::try_from(head.target.as_str()) else {
        return answer(&mut stream, StatusCode::BAD_REQUEST, "malformed request: the request target is not a URI", &[], ctx.head_timeout).await;
    };
    if let Some(secret) = &ctx.secret {
        let presented = check_secret(secret, &head.headers, &uri);
        if !presented.ok {
            tracing::info!(path = uri.path(), presented = presented.any, "refused an unauthenticated NBD PUT");
            let extra = [("WWW-Authenticate", "Bearer realm=\"sxm\"")];
            return answer(&mut stream, StatusCode::UNAUTHORIZED, &unauthorised().to_string(), &extra, ctx.head_timeout).await;
        }
    }
    // A body would be read as NBD by the receiving end; an empty one (`Content-Length: 0`) is fine.
    if head.headers.get_all(header::CONTENT_LENGTH).iter().any(|v| v.as_bytes() != b"0") {
        return answer(&mut stream, StatusCode::BAD_REQUEST, "an NBD PUT has no body: what follows the head is NBD", &[], ctx.head_timeout).await;
    }
    let Some(req) = NbdRequest::parse(uri.path()) else {
        // The path only: the query may hold the secret.
        tracing::info!(%transport, path = uri.path(), "refused an NBD PUT to an unknown path");
        let text = format!("no such path {}: the NBD paths are {NBD_PATH}[<vm>/]<sr>/<vdi>/<dp> and {NBDPROXY_PATH}[import/]<vm>/<sr>/<vdi>/<dp>", uri.path());
        return answer(&mut stream, StatusCode::NOT_FOUND, &text, &[], ctx.head_timeout).await;
    };
    let what = format!("{:?} vm={} sr={} vdi={} dp={}", req.kind, req.vm, req.sr, req.vdi, req.dp);
    // In its own task, as RPC calls run: a caller hanging up does not cancel it halfway through
    // setting up a datapath, and a panic becomes a 500 instead of a dropped connection.
    let prepared = match tokio::spawn(ctx.handover.clone().prepare_dyn(req, transport)).await {
        Ok(outcome) => outcome,
        Err(e) if e.is_panic() => Err(HandoverError::Internal("the NBD handler panicked".into())),
        Err(_) => Err(HandoverError::Internal("the NBD handler was cancelled: the server is shutting down".into())),
    };
    let take_over = match prepared {
        Ok(t) => t,
        Err(e) => {
            tracing::info!(%transport, request = %what, status = e.status().as_u16(), error = %e, "refused an NBD PUT");
            return answer(&mut stream, e.status(), &e.to_string(), &[], ctx.head_timeout).await;
        }
    };
    let written = tokio::time::timeout(ctx.head_timeout, stream.write_all(NBD_OK)).await;
    if !matches!(written, Ok(Ok(()))) {
        tracing::info!(%transport, request = %what, "could not write the 200 of an NBD PUT: the caller is gone");
        return;
    }
    match stream.into_blocking_fd() {
        Ok(fd) => {
            tracing::info!(%transport, request = %what, "handed an NBD PUT's connection over");
            tokio::spawn(take_over(fd));
        }
        Err(e) => tracing::warn!(%transport, request = %what, error = %e, "could not take an NBD connection out of the reactor"),
    }
}

/// Writes a refusal and closes the write side, giving up after `timeout` on a caller that does
/// not read; then lingers (see [`LINGER`]).
async fn answer<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S, status: StatusCode, text: &str, extra: &[(&str, &str)], timeout: Duration) {
    let bytes = refusal(status, text, extra);
    let written = tokio::time::timeout(timeout, async {
        stream.write_all(&bytes).await?;
        stream.shutdown().await
    })
    .await;
    if !matches!(written, Ok(Ok(()))) {
        return;
    }
    // Closing a socket with unread input resets the connection, and a reset can destroy the
    // answer before the caller reads it: the rest of an oversized head, a body sent anyway. So
    // read and drop what still comes until the caller closes, within bounds.
    let mut sink = [0u8; 4096];
    let mut left = LINGER_BYTES;
    let _ = tokio::time::timeout(LINGER, async {
        while left > 0 {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(kind: NbdKind, vm: &str, sr: &str, vdi: &str, dp: &str) -> NbdRequest {
        NbdRequest { kind, vm: vm.into(), sr: sr.into(), vdi: vdi.into(), dp: dp.into() }
    }

    #[test]
    fn xapis_path_shapes_parse() {
        assert_eq!(NbdRequest::parse("/services/SM/nbd/s/v/d"), Some(req(NbdKind::Nbd, "0", "s", "v", "d")));
        assert_eq!(NbdRequest::parse("/services/SM/nbd/m/s/v/d"), Some(req(NbdKind::Nbd, "m", "s", "v", "d")));
        assert_eq!(NbdRequest::parse("/services/SM/nbdproxy/import/m/s/v/d"), Some(req(NbdKind::NbdProxy { import: true }, "m", "s", "v", "d")));
        assert_eq!(NbdRequest::parse("/services/SM/nbdproxy/m/s/v/d"), Some(req(NbdKind::NbdProxy { import: false }, "m", "s", "v", "d")));
        assert_eq!(NbdRequest::parse("/services/SM/nbd/OpaqueRef%3Aab/s%20r/v+1/d"), Some(req(NbdKind::Nbd, "OpaqueRef:ab", "s r", "v+1", "d")));
    }

    #[test]
    fn other_shapes_and_unsafe_components_do_not_parse() {
        for bad in [
            "/services/SM/nbd/v/d",
            "/services/SM/nbd/a/m/s/v/d",
            "/services/SM/nbd/s/v/d/",
            "/services/SM/nbd//v/d",
            "/services/SM/nbd/../v/d",
            "/services/SM/nbd/s/./d",
            "/services/SM/nbd/s/%2e%2E/d",
            "/services/SM/nbd/s/a%2Fb/d",
            "/services/SM/nbd/s/a%00/d",
            "/services/SM/nbd/s/%zz/d",
            "/services/SM/nbd/s/%ff/d",
            "/services/SM/nbd/s/v%/d",
            "/services/SM/nbdproxy/s/v/d",
            "/services/SM/nbdproxy/import/s/v/d",
            "/services/SM/nbdproxy/export/m/s/v/d",
            "/services/SM/nbdproxy/import/m/s/v/d/x",
            "/services/SM/nbd",
            "/services/SM/nbdx/s/v/d",
        ] {
            assert_eq!(NbdRequest::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn paths_round_trip() {
        for r in [req(NbdKind::Nbd, "0", "s", "v", "d"), req(NbdKind::NbdProxy { import: true }, "MIR x", "s r", "ü%", "d:1"), req(NbdKind::NbdProxy { import: false }, "m", "s", "v", "d")] {
            assert_eq!(NbdRequest::parse(&r.path()), Some(r.clone()), "{}", r.path());
        }
    }

    async fn sniffed(input: &[u8]) -> (Sniffed, Vec<u8>, Vec<u8>) {
        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(input).await.expect("write");
        drop(a);
        let mut seen = Vec::new();
        let s = sniff(&mut b, &mut seen).await.expect("sniff");
        let mut rest = Vec::new();
        b.read_to_end(&mut rest).await.expect("rest");
        (s, seen, rest)
    }

    #[tokio::test]
    async fn sniffing_takes_exactly_the_prefix_or_hands_back_what_it_read() {
        let (s, seen, rest) = sniffed(b"PUT /services/SM/nbd/s/v/d HTTP/1.1\r\n\r\n").await;
        assert_eq!((s, seen.as_slice(), rest.as_slice()), (Sniffed::Nbd, NBD_PREFIX, &b"s/v/d HTTP/1.1\r\n\r\n"[..]));
        let (s, seen, _) = sniffed(b"PUT /services/SM/nbdproxy/import/m/s/v/d HTTP/1.1\r\n\r\n").await;
        assert_eq!((s, seen.as_slice()), (Sniffed::Nbd, NBDPROXY_PREFIX));
        for other in [&b"POST /services/SM HTTP/1.1\r\n\r\n"[..], b"PUT /services/SM/nbdx/", b"GET /services/SM/nbd/s/v/d", b"PUT /services/SM/nb", b""] {
            let (s, seen, rest) = sniffed(other).await;
            assert_eq!(s, Sniffed::Other, "{other:?}");
            assert_eq!([seen, rest].concat(), other, "nothing lost");
        }
    }

    #[tokio::test]
    async fn a_prefixed_stream_replays_its_prefix_first() {
        let (mut a, b) = tokio::io::duplex(64);
        a.write_all(b" world").await.expect("write");
        drop(a);
        let mut p = Prefixed::new(b"hello".to_vec(), b);
        let mut out = String::new();
        p.read_to_string(&mut out).await.expect("read");
        assert_eq!(out, "hello world");
    }

    #[tokio::test]
    async fn the_head_is_read_through_its_blank_line_and_no_further() {
        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(b"x HTTP/1.1\r\nHost: h\r\n\r\nNBD").await.expect("write");
        drop(a);
        let head = read_head(&mut b, b"PUT /".to_vec()).await.expect("head");
        assert_eq!(head, b"PUT /x HTTP/1.1\r\nHost: h\r\n\r\n");
        let mut rest = Vec::new();
        b.read_to_end(&mut rest).await.expect("rest");
        assert_eq!(rest, b"NBD");
    }

    #[test]
    fn heads_parse_strictly() {
        let h = parse_head(b"PUT /p?session_id=x HTTP/1.0\r\nUser-Agent: smapiv2\r\nX:  a b \r\n\r\n").expect("parse");
        assert_eq!(h.target, "/p?session_id=x");
        assert_eq!(h.headers.get("x").map(HeaderValue::as_bytes), Some(&b"a b"[..]));
        for bad in [
            &b"PUT /p HTTP/1.1\r\n"[..],
            b"PUT /p HTTP/2\r\n\r\n",
            b"PUT  /p HTTP/1.1\r\n\r\n",
            b"PUT /p\r\n\r\n",
            b"PUT http://h/p HTTP/1.1\r\n\r\n",
            b"PUT /p HTTP/1.1\r\nNoColon\r\n\r\n",
            b"PUT /p HTTP/1.1\r\nA: b\r\n folded\r\n\r\n",
            b"PUT /p HTTP/1.1\r\nBad Name: b\r\n\r\n",
            b"PUT /p HTTP/1.1\r\nA: b\x01\r\n\r\n",
        ] {
            assert!(parse_head(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn storage_errors_map_to_statuses() {
        assert_eq!(HandoverError::from(StorageError::VdiDoesNotExist("v".into())).status(), StatusCode::NOT_FOUND);
        assert_eq!(HandoverError::from(StorageError::InternalError("x".into())).status(), StatusCode::INTERNAL_SERVER_ERROR);
    }
}
