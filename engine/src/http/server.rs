//! The RPC server: decode the envelope, check the caller, run [`Dispatch`], answer in the
//! caller's own encoding and version.
//!
//! Routes (all `POST`; another method is 405, another path 404):
//!
//! | path | encoding | reply |
//! | --- | --- | --- |
//! | `/services/SM` | XML-RPC, as xapi calls another host | always a `<methodResponse>` holding `{Status:"Success", Value}` or `{Status:"Failure", ErrorDescription}`, never a `<fault>` |
//! | `/jsonrpc`, `/` | JSON-RPC 1.0 or 2.0, batches, notifications | in the request's version (see [`super::envelope`]) |
//!
//! Every reply to a call that was read is HTTP 200, failures included, as xapi answers; only
//! what is not a call at all gets another status: 401 (no secret), 404, 405, 413 (body over
//! [`ServerConfig::max_body`]), 204 (only notifications). A body that is not a well-formed
//! request is answered with `Internal_error` and [`Dispatch`] is not called.
//!
//! Who may call. A TCP caller must present the host secret, as the query parameter
//! `session_id=<secret>` (how xapi addresses `/services/SM`) or as `Authorization: Bearer
//! <secret>`; it is compared in constant time. Without it the answer is 401 and nothing runs:
//! on `/services/SM` the body is an XML-RPC `Failure` with `["Internal_error","unauthorised: …"]`,
//! on the JSON paths a JSON-RPC 2.0 error object with the same error (the version of a request
//! that was never read is unknown), elsewhere plain text. Every path on TCP is behind the
//! check, so an unauthenticated caller reaches no route; what it can learn is only what those
//! answers show (which paths speak RPC, and on a route, that it takes `POST`). The Unix socket is guarded
//! by its file mode instead: it is created 0600 (before it listens, so there is no window) and
//! callers on it need no secret.
//!
//! Adding routes. [`router`] gives the RPC routes without a fallback, so a caller can
//! `merge` more into it before [`Bound::run`], which adds the 404 fallback and, on TCP, the
//! secret check in front of everything.
//!
//! NBD `PUT`s. xapi's `PUT /services/SM/nbd/…` and `PUT /services/SM/nbdproxy/…` answer `200`
//! and then carry NBD on the same socket, which hyper cannot give away; with an
//! [`NbdHandover`] ([`Bound::run_with`], [`serve_with`]) the server reads the first bytes of each
//! connection itself and serves those requests without hyper (see [`super::nbd`]); every other
//! request reaches the router unchanged. Without one, those paths are the router's like any
//! other (404 unless routes were merged in). With one, a connection must show its first bytes
//! (enough to tell an NBD `PUT` from anything else, at most 26) within
//! [`ServerConfig::head_timeout`], or it is closed.
//!
//! Shutdown is graceful: when the token is cancelled the listeners stop accepting, idle
//! connections close, calls in flight finish (an NBD handler's `prepare` included, not what it
//! does with a connection it has taken over), and the Unix socket file is removed.

use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use std::{fmt, io};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Query, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixSocket, UnixStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::Dispatch;
use super::envelope::{self, JsonBody, JsonCall, JsonVersion, Rejected};
use super::nbd::{self, DynHandover, IntoBlockingFd, NbdContext, NbdHandover, Prefixed, Sniffed};
use crate::model::StorageError;
use crate::rpc::{Value, xmlrpc};

/// The default largest request body: 16 MiB, far above any storage call (the largest recorded
/// xapi request is a few KiB) and small enough that a bad client cannot make us buffer much.
pub const DEFAULT_MAX_BODY: usize = 16 << 20;

/// The default [`ServerConfig::head_timeout`]: a caller sends its request line and head at
/// once, so ten seconds is only ever reached by a dead or hostile one.
pub const DEFAULT_HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// The default [`ServerConfig::max_connections`].
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;

/// The XML-RPC path, as xapi calls other hosts.
pub const XMLRPC_PATH: &str = "/services/SM";
/// The JSON-RPC path (`/` is served too).
pub const JSONRPC_PATH: &str = "/jsonrpc";

/// Where to listen, and what callers must present.
#[derive(Clone)]
pub struct ServerConfig {
    /// A TCP address to listen on; port 0 picks one (see [`Bound::tcp_addr`]).
    pub tcp: Option<SocketAddr>,
    /// A Unix socket path to listen on. A stale socket there is replaced; any other file is not.
    pub unix: Option<PathBuf>,
    /// The host secret TCP callers must present. Must not be empty when `tcp` is set.
    pub secret: String,
    /// The largest request body accepted, in bytes; larger ones are answered 413.
    pub max_body: usize,
    /// How long a request's head may take to arrive (with an [`NbdHandover`], counted from
    /// the accept, and for an NBD `PUT` its whole head), and how long its body may go without
    /// sending anything, before the connection is closed (a stalled body is answered 408 first).
    pub head_timeout: Duration,
    /// Connections served at once on each listener; more are closed as soon as they are
    /// accepted. Callers not yet known (no secret checked) each hold a descriptor for up to
    /// `head_timeout`: unbounded, a flood of them could take every descriptor the host has,
    /// its datapaths' included.
    pub max_connections: usize,
    /// An HTTPS listener: the address and the server's TLS configuration ([`super::tls`]).
    /// Callers there present the secret as on `tcp`.
    pub tls: Option<(SocketAddr, Arc<rustls::ServerConfig>)>,
}

impl ServerConfig {
    /// A config with no listeners yet and the default body limit.
    pub fn new(secret: impl Into<String>) -> ServerConfig {
        ServerConfig {
            tcp: None,
            unix: None,
            secret: secret.into(),
            max_body: DEFAULT_MAX_BODY,
            head_timeout: DEFAULT_HEAD_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            tls: None,
        }
    }
}

impl fmt::Debug for ServerConfig {
    // By hand, so the secret never reaches a log line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerConfig").field("tcp", &self.tcp).field("unix", &self.unix).field("secret", &"<redacted>").field("max_body", &self.max_body).field("head_timeout", &self.head_timeout).field("max_connections", &self.max_connections).finish()
    }
}

/// Why the server could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Neither a TCP address nor a Unix socket was configured.
    #[error("No listener configured: set a TCP address, a Unix socket path, or both")]
    NoListener,
    /// TCP was configured with an empty secret, which would let any caller in.
    #[error("The host secret is empty, which would let any TCP caller in")]
    EmptySecret,
    /// The TCP listener could not be bound.
    #[error("Cannot listen on {addr}")]
    Tcp {
        /// The address asked for.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The Unix socket could not be created.
    #[error("Cannot listen on the Unix socket {}", path.display())]
    Unix {
        /// The socket path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The Unix socket path holds something other than a socket, which is left alone.
    #[error("{} exists and is not a socket; refusing to replace it", path.display())]
    NotASocket {
        /// The socket path.
        path: PathBuf,
    },
    /// Another server answers on the Unix socket path.
    #[error("Another server is listening on {}", path.display())]
    SocketInUse {
        /// The socket path.
        path: PathBuf,
    },
    /// A listener failed while serving.
    #[error("Serving on {listener} failed")]
    Serve {
        /// Which listener (`tcp`, `tls` or `unix`).
        listener: Transport,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The server task panicked.
    #[error("The server task panicked")]
    Panicked,
}

/// Which listener a call came in on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// TCP: the caller presented the host secret.
    Tcp,
    /// TLS over TCP (`--listen-tls`): the caller presented the host secret.
    Tls,
    /// The Unix socket: the file mode let the caller in.
    Unix,
}

impl Transport {
    /// The listener's name in logs and errors.
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Tls => "tls",
            Transport::Unix => "unix",
        }
    }
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The listeners, bound but not yet serving, so the caller learns the TCP port before the first
/// call can arrive.
#[derive(Debug)]
pub struct Bound {
    tcp: Option<(TcpListener, SocketAddr)>,
    tls: Option<(TcpListener, SocketAddr, Arc<rustls::ServerConfig>)>,
    unix: Option<BoundUnix>,
    secret: Arc<str>,
    head_timeout: Duration,
    max_connections: usize,
}

#[derive(Debug)]
struct BoundUnix {
    listener: UnixListener,
    path: PathBuf,
    /// Device and inode of the socket file we made, so shutdown removes only our own.
    id: (u64, u64),
}

impl Bound {
    /// Binds the configured listeners.
    pub async fn bind(cfg: &ServerConfig) -> Result<Bound, ServeError> {
        if cfg.tcp.is_none() && cfg.unix.is_none() && cfg.tls.is_none() {
            return Err(ServeError::NoListener);
        }
        if (cfg.tcp.is_some() || cfg.tls.is_some()) && cfg.secret.is_empty() {
            return Err(ServeError::EmptySecret);
        }
        let unix = match &cfg.unix {
            Some(path) => Some(bind_unix(path).await?),
            None => None,
        };
        let tcp = match cfg.tcp {
            Some(addr) => {
                let l = TcpListener::bind(addr).await.map_err(|source| ServeError::Tcp { addr, source })?;
                let local = l.local_addr().map_err(|source| ServeError::Tcp { addr, source })?;
                Some((l, local))
            }
            None => None,
        };
        let tls = match &cfg.tls {
            Some((addr, config)) => {
                let addr = *addr;
                let l = TcpListener::bind(addr).await.map_err(|source| ServeError::Tcp { addr, source })?;
                let local = l.local_addr().map_err(|source| ServeError::Tcp { addr, source })?;
                Some((l, local, config.clone()))
            }
            None => None,
        };
        Ok(Bound { tcp, tls, unix, secret: cfg.secret.as_str().into(), head_timeout: cfg.head_timeout, max_connections: cfg.max_connections.max(1) })
    }

    /// The TCP address actually bound (with the port chosen when 0 was asked for).
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp.as_ref().map(|(_, a)| *a)
    }

    /// The HTTPS address actually bound.
    pub fn tls_addr(&self) -> Option<SocketAddr> {
        self.tls.as_ref().map(|(_, a, _)| *a)
    }

    /// The Unix socket path.
    pub fn unix_path(&self) -> Option<&Path> {
        self.unix.as_ref().map(|u| u.path.as_path())
    }

    /// Serves `app` (normally [`router`], perhaps with more routes merged in) on every listener
    /// until `shutdown` is cancelled, then removes the Unix socket file. Adds the 404 fallback,
    /// and on TCP the secret check in front of every route.
    pub async fn run(self, app: Router, shutdown: CancellationToken) -> Result<(), ServeError> {
        self.serve(app, None, shutdown).await
    }

    /// As [`Bound::run`], and serves xapi's NBD `PUT`s with `handover` (see [`super::nbd`]):
    /// on TCP behind the same secret check as the routes.
    pub async fn run_with<H: NbdHandover>(self, app: Router, handover: Arc<H>, shutdown: CancellationToken) -> Result<(), ServeError> {
        self.serve(app, Some(handover as Arc<dyn DynHandover>), shutdown).await
    }

    async fn serve(self, app: Router, handover: Option<Arc<dyn DynHandover>>, shutdown: CancellationToken) -> Result<(), ServeError> {
        let head_timeout = self.head_timeout;
        let app = app.fallback(not_found).layer(axum::Extension(BodyStall(head_timeout)));
        let nbd_ctx = |transport, secret| handover.clone().map(|handover| NbdContext { handover, transport, secret, head_timeout });
        // TCP callers, over TLS or not, present the secret.
        let secured = app.clone().layer(middleware::from_fn_with_state(self.secret.clone(), require_secret));
        let tcp = self.tcp.map(|(listener, _)| {
            let app = secured.clone().layer(axum::Extension(Transport::Tcp));
            serve_listener(listener, app, head_timeout, self.max_connections, nbd_ctx(Transport::Tcp, Some(self.secret.clone())), shutdown.clone())
        });
        let tls = self.tls.map(|(listener, _, config)| {
            let listener = TlsListener::new(listener, tokio_rustls::TlsAcceptor::from(config), head_timeout, self.max_connections, shutdown.clone());
            let app = secured.layer(axum::Extension(Transport::Tls));
            serve_listener(listener, app, head_timeout, self.max_connections, nbd_ctx(Transport::Tls, Some(self.secret.clone())), shutdown.clone())
        });
        let (unix, unix_file) = match self.unix {
            Some(u) => {
                let app = app.layer(axum::Extension(Transport::Unix));
                (Some(serve_listener(u.listener, app, head_timeout, self.max_connections, nbd_ctx(Transport::Unix, None), shutdown.clone())), Some((u.path, u.id)))
            }
            None => (None, None),
        };
        tokio::join!(
            async move {
                if let Some(s) = tcp {
                    s.await;
                }
            },
            async move {
                if let Some(s) = tls {
                    s.await;
                }
            },
            async move {
                if let Some(s) = unix {
                    s.await;
                }
            }
        );
        if let Some((path, id)) = unix_file {
            remove_own_socket(&path, id);
        }
        Ok(())
    }
}

/// A listener the server accepts on.
trait Accept: Send + 'static {
    type Io: AsyncRead + AsyncWrite + IntoBlockingFd + Unpin + Send + 'static;

    fn accept_io(&mut self) -> impl Future<Output = io::Result<Self::Io>> + Send;
}

impl Accept for TcpListener {
    type Io = TcpStream;

    async fn accept_io(&mut self) -> io::Result<TcpStream> {
        let (s, _) = self.accept().await?;
        // Replies are written in one go; Nagle would only delay a small last segment.
        let _ = s.set_nodelay(true);
        Ok(s)
    }
}

impl Accept for UnixListener {
    type Io = UnixStream;

    async fn accept_io(&mut self) -> io::Result<UnixStream> {
        Ok(self.accept().await?.0)
    }
}

/// The HTTPS listener: accepts TCP connections and runs their TLS handshakes in tasks of their
/// own (each within the head timeout, a bounded number at once), so that a slow or silent
/// handshake never holds up the next accept; [`Accept::accept_io`] takes the connections whose
/// handshake is done.
struct TlsListener {
    done: tokio::sync::mpsc::Receiver<tokio_rustls::server::TlsStream<TcpStream>>,
}

impl TlsListener {
    fn new(listener: TcpListener, acceptor: tokio_rustls::TlsAcceptor, head_timeout: Duration, max_connections: usize, shutdown: CancellationToken) -> TlsListener {
        let (tx, done) = tokio::sync::mpsc::channel(16);
        let handshakes = Arc::new(tokio::sync::Semaphore::new(max_connections));
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    () = shutdown.cancelled() => return,
                    accepted = listener.accept() => accepted,
                };
                let s = match accepted {
                    Ok((s, _)) => s,
                    Err(e) => {
                        tracing::warn!(error = %e, "accepting an HTTPS connection failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let Ok(slot) = Arc::clone(&handshakes).try_acquire_owned() else { continue };
                let _ = s.set_nodelay(true);
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(head_timeout, acceptor.accept(s)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send(tls).await;
                        }
                        Ok(Err(e)) => tracing::debug!(error = %e, "a TLS handshake failed"),
                        Err(_) => tracing::debug!("a TLS handshake took too long"),
                    }
                    drop(slot);
                });
            }
        });
        TlsListener { done }
    }
}

impl Accept for TlsListener {
    type Io = tokio_rustls::server::TlsStream<TcpStream>;

    async fn accept_io(&mut self) -> io::Result<Self::Io> {
        match self.done.recv().await {
            Some(tls) => Ok(tls),
            // The accepting task ends only at shutdown, which the serving loop sees itself.
            None => std::future::pending().await,
        }
    }
}

/// Accepts and serves connections until `shutdown`, then waits for the connections to finish
/// (see [`serve_http`] and [`nbd::serve`] for what each waits for).
async fn serve_listener<L: Accept>(
    mut listener: L,
    app: Router,
    head_timeout: Duration,
    max_connections: usize,
    nbd: Option<NbdContext>,
    shutdown: CancellationToken,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(max_connections));
    let mut full = false;
    let connections = TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept_io() => accepted,
        };
        match accepted {
            Ok(io) => match Arc::clone(&slots).try_acquire_owned() {
                Ok(slot) => {
                    full = false;
                    let served = serve_connection(io, app.clone(), head_timeout, nbd.clone(), shutdown.clone());
                    connections.spawn(async move {
                        served.await;
                        drop(slot);
                    });
                }
                // Closed at once: the callers already served keep their descriptors.
                Err(_) => {
                    if !full {
                        tracing::warn!(max_connections, "as many connections as allowed are open; closing new ones until some end");
                        full = true;
                    }
                    drop(io);
                }
            },
            // The caller gave up before we accepted: nothing to serve, nothing wrong here.
            Err(e) if matches!(e.kind(), io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionRefused) => {}
            Err(e) => {
                // Most likely out of file descriptors: pause instead of spinning, as hyper and
                // axum do, until connections close.
                tracing::error!(error = %e, "accepting a connection failed; retrying in 1 s");
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    }
    drop(listener);
    connections.close();
    connections.wait().await;
}

/// Serves one connection: straight to hyper, or with a handover first looks whether it starts
/// with an NBD `PUT`.
async fn serve_connection<S>(mut io: S, app: Router, head_timeout: Duration, nbd: Option<NbdContext>, shutdown: CancellationToken)
where
    S: AsyncRead + AsyncWrite + IntoBlockingFd + Unpin + Send + 'static,
{
    let Some(nbd) = nbd else {
        return serve_http(io, app, head_timeout, &shutdown).await;
    };
    let deadline = tokio::time::Instant::now() + nbd.head_timeout;
    let mut seen = Vec::new();
    let sniffed = tokio::select! {
        // Nothing read yet that could be a request in flight: close like any idle connection.
        () = shutdown.cancelled() => return,
        sniffed = tokio::time::timeout_at(deadline, nbd::sniff(&mut io, &mut seen)) => sniffed,
    };
    match sniffed {
        Ok(Ok(Sniffed::Other)) => serve_http(Prefixed::new(seen, io), app, head_timeout, &shutdown).await,
        Ok(Ok(Sniffed::Nbd)) => nbd::serve(io, seen, &nbd, deadline, &shutdown).await,
        Ok(Err(e)) => tracing::debug!(transport = %nbd.transport, error = %e, "a connection failed before its request line"),
        Err(_) => tracing::info!(transport = %nbd.transport, timeout = ?nbd.head_timeout, "closed a connection that sent no request line in time"),
    }
}

/// Serves HTTP/1 on `io` with `app` until the caller closes, or `shutdown` and the request in
/// flight (if any) is answered.
async fn serve_http<S>(io: S, app: Router, head_timeout: Duration, shutdown: &CancellationToken)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // Upgrades stay enabled, as `axum::serve` has them, for routes merged into the router. A
    // request head must arrive within `head_timeout`: without a timer hyper waits for ever, and
    // callers that send half a head and stall (before any secret is checked) would hold
    // descriptors until the host has none left.
    let conn = http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(head_timeout)
        .serve_connection(TokioIo::new(io), TowerToHyperService::new(app))
        .with_upgrades();
    let mut conn = std::pin::pin!(conn);
    let mut draining = false;
    loop {
        tokio::select! {
            served = conn.as_mut() => {
                if let Err(e) = served {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                return;
            }
            () = shutdown.cancelled(), if !draining => {
                draining = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}

/// Binds and starts serving [`router`] in a task: the short way when no routes are added.
pub async fn serve<D: Dispatch>(cfg: &ServerConfig, dispatch: Arc<D>, shutdown: CancellationToken) -> Result<Running, ServeError> {
    let bound = Bound::bind(cfg).await?;
    let (tcp_addr, tls_addr) = (bound.tcp_addr(), bound.tls_addr());
    let unix_path = bound.unix_path().map(Path::to_path_buf);
    let task = tokio::spawn(bound.run(router(dispatch, cfg.max_body), shutdown));
    Ok(Running { tcp_addr, tls_addr, unix_path, task })
}

/// As [`serve`], and serves xapi's NBD `PUT`s with `handover` (see [`Bound::run_with`]).
pub async fn serve_with<D: Dispatch, H: NbdHandover>(cfg: &ServerConfig, dispatch: Arc<D>, handover: Arc<H>, shutdown: CancellationToken) -> Result<Running, ServeError> {
    let bound = Bound::bind(cfg).await?;
    let (tcp_addr, tls_addr) = (bound.tcp_addr(), bound.tls_addr());
    let unix_path = bound.unix_path().map(Path::to_path_buf);
    let task = tokio::spawn(bound.run_with(router(dispatch, cfg.max_body), handover, shutdown));
    Ok(Running { tcp_addr, tls_addr, unix_path, task })
}

/// A server serving in its own task.
#[derive(Debug)]
pub struct Running {
    tcp_addr: Option<SocketAddr>,
    tls_addr: Option<SocketAddr>,
    unix_path: Option<PathBuf>,
    task: JoinHandle<Result<(), ServeError>>,
}

impl Running {
    /// The TCP address bound.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp_addr
    }

    /// The HTTPS address bound.
    pub fn tls_addr(&self) -> Option<SocketAddr> {
        self.tls_addr
    }

    /// The Unix socket path.
    pub fn unix_path(&self) -> Option<&Path> {
        self.unix_path.as_deref()
    }

    /// Waits for the server to stop (after its shutdown token is cancelled).
    pub async fn wait(self) -> Result<(), ServeError> {
        self.task.await.map_err(|_| ServeError::Panicked)?
    }
}

/// Creates the Unix socket with mode 0600 before it listens, replacing a stale socket file.
async fn bind_unix(path: &Path) -> Result<BoundUnix, ServeError> {
    let unix_err = |source| ServeError::Unix { path: path.to_path_buf(), source };
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            // A socket file outlives its server after a crash. Replace it only if nobody answers,
            // so a second instance cannot take a running server's socket away.
            if tokio::net::UnixStream::connect(path).await.is_ok() {
                return Err(ServeError::SocketInUse { path: path.to_path_buf() });
            }
            std::fs::remove_file(path).map_err(unix_err)?;
        }
        Ok(_) => return Err(ServeError::NotASocket { path: path.to_path_buf() }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(unix_err(e)),
    }
    let sock = UnixSocket::new_stream().map_err(unix_err)?;
    sock.bind(path).map_err(unix_err)?;
    // Between bind and listen a connect is refused, so tightening the mode here leaves no
    // moment in which another user could connect.
    let made = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).and_then(|()| std::fs::symlink_metadata(path)).and_then(|m| Ok((m, sock.listen(1024)?)));
    match made {
        Ok((meta, listener)) => Ok(BoundUnix { listener, path: path.to_path_buf(), id: (meta.dev(), meta.ino()) }),
        Err(e) => {
            let _ = std::fs::remove_file(path);
            Err(unix_err(e))
        }
    }
}

fn remove_own_socket(path: &Path, id: (u64, u64)) {
    match std::fs::symlink_metadata(path) {
        Ok(m) if (m.dev(), m.ino()) == id => {
            if let Err(e) = std::fs::remove_file(path) {
                tracing::warn!(path = %path.display(), error = %e, "could not remove the Unix socket");
            }
        }
        // Gone already, or replaced by someone else's: not ours to remove.
        _ => {}
    }
}

/// The RPC routes, calling `dispatch`, with request bodies limited to `max_body` bytes. Merge
/// more routes into it before [`Bound::run`] (which adds the fallback and the TCP secret check).
pub fn router<D: Dispatch>(dispatch: Arc<D>, max_body: usize) -> Router {
    let rpc = Arc::new(Rpc { dispatch, max_body });
    Router::new()
        .route(XMLRPC_PATH, post(xml_rpc::<D>).fallback(method_not_allowed))
        .route(JSONRPC_PATH, post(json_rpc::<D>).fallback(method_not_allowed))
        .route("/", post(json_rpc::<D>).fallback(method_not_allowed))
        .with_state(rpc)
}

struct Rpc<D> {
    dispatch: Arc<D>,
    max_body: usize,
}

impl<D: Dispatch> Rpc<D> {
    /// Runs one call and logs it.
    async fn call(&self, transport: Option<Transport>, encoding: &'static str, method: String, params: Vec<Value>) -> Result<Value, StorageError> {
        let start = Instant::now();
        let dispatch = self.dispatch.clone();
        let name = method.clone();
        // In its own task for two reasons: a panic becomes an `Internal_error` reply (as xapi
        // turns any exception into one) instead of a dropped connection, and a caller that
        // hangs up does not cancel a storage operation halfway through one of its awaits.
        let outcome = match tokio::spawn(async move { dispatch.dispatch(name, params).await }).await {
            Ok(outcome) => outcome,
            Err(e) if e.is_panic() => {
                let payload = e.into_panic();
                let what = payload.downcast_ref::<&str>().map(|s| (*s).to_owned()).or_else(|| payload.downcast_ref::<String>().cloned()).unwrap_or_else(|| "(no message)".to_owned());
                Err(StorageError::InternalError(format!("{method} panicked: {what}")))
            }
            Err(_) => Err(StorageError::InternalError(format!("{method} was cancelled: the server is shutting down"))),
        };
        let elapsed_us = u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX);
        let transport = transport.map_or("other", Transport::as_str);
        match &outcome {
            Ok(_) => tracing::info!(%method, transport, encoding, elapsed_us, outcome = "success", "rpc call"),
            // Clipped: an error quotes the caller's arguments, and one 5 MiB id put 10 MB into
            // the log.
            Err(e) => tracing::info!(%method, transport, encoding, elapsed_us, outcome = "failure", error = %clipped(&e.to_string(), 2048), "rpc call"),
        }
        outcome
    }

    async fn answer_json(&self, transport: Option<Transport>, call: Result<JsonCall, Rejected>) -> Option<serde_json::Value> {
        match call {
            Err(rejected) => {
                tracing::info!(transport = ?transport, code = rejected.code, error = %rejected.message, "rejected JSON-RPC request");
                Some(rejected.reply())
            }
            Ok(JsonCall { version, id, method, params }) => {
                let encoding = match version {
                    JsonVersion::V1 => "jsonrpc-1.0",
                    JsonVersion::V2 => "jsonrpc-2.0",
                };
                let outcome = self.call(transport, encoding, method, params).await;
                // A notification runs but is not answered.
                id.map(|id| envelope::json_reply(version, id, outcome.as_ref()))
            }
        }
    }
}

async fn xml_rpc<D: Dispatch>(State(rpc): State<Arc<Rpc<D>>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let transport = parts.extensions.get::<Transport>().copied();
    let body = match read_body(&parts, body, rpc.max_body).await {
        Ok(b) => b,
        Err(resp) => return resp,
    };
    let call = std::str::from_utf8(&body).map_err(|e| format!("malformed XML-RPC request: not UTF-8: {e}")).and_then(|text| xmlrpc::parse_call(text).map_err(|e| e.to_string()));
    let outcome = match call {
        Ok(call) => rpc.call(transport, "xmlrpc", call.method, call.params).await,
        Err(msg) => {
            tracing::info!(transport = ?transport, error = %msg, "rejected XML-RPC request");
            Err(StorageError::InternalError(msg))
        }
    };
    xml_response(StatusCode::OK, outcome.as_ref())
}

async fn json_rpc<D: Dispatch>(State(rpc): State<Arc<Rpc<D>>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let transport = parts.extensions.get::<Transport>().copied();
    let body = match read_body(&parts, body, rpc.max_body).await {
        Ok(b) => b,
        Err(resp) => return resp,
    };
    let reply = match envelope::parse_json_body(&body) {
        JsonBody::Single(call) => rpc.answer_json(transport, call).await,
        JsonBody::Batch(calls) => {
            // One after another: batch members may depend on each other's effects, and the
            // storage calls are not ours to run concurrently behind the caller's back.
            let mut replies = Vec::new();
            for call in calls {
                replies.extend(rpc.answer_json(transport, call).await);
            }
            (!replies.is_empty()).then_some(serde_json::Value::Array(replies))
        }
    };
    match reply {
        Some(reply) => json_response(StatusCode::OK, &reply),
        // Only notifications: JSON-RPC 2.0 answers nothing, which over HTTP is 204.
        None => StatusCode::NO_CONTENT.into_response(),
    }
}

/// How long a request body may go without sending anything ([`ServerConfig::head_timeout`]),
/// as the server tells the routes.
#[derive(Clone, Copy)]
struct BodyStall(Duration);

/// The body, or the response refusing it.
async fn read_body(parts: &Parts, body: Body, max: usize) -> Result<Bytes, Response> {
    // Refuse a declared oversized body before reading any of it.
    let declared = parts.headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        return Err(too_large(max));
    }
    // A caller that sends its head and then goes quiet mid-body (hung, or a host that died
    // mid-call) would otherwise hold the connection and its descriptor for ever: hyper times
    // only the head.
    let stall = parts.extensions.get::<BodyStall>().map_or(DEFAULT_HEAD_TIMEOUT, |s| s.0);
    let mut body = Limited::new(body, max);
    let mut data = Vec::with_capacity(declared.map_or(0, |n| n as usize));
    loop {
        match tokio::time::timeout(stall, body.frame()).await {
            Err(_) => {
                tracing::info!(after = ?stall, read = data.len(), "dropped a request whose body stalled");
                return Err(stalled(stall));
            }
            Ok(None) => return Ok(Bytes::from(data)),
            Ok(Some(Ok(frame))) => {
                if let Some(chunk) = frame.data_ref() {
                    data.extend_from_slice(chunk);
                }
            }
            Ok(Some(Err(e))) if e.downcast_ref::<LengthLimitError>().is_some() => return Err(too_large(max)),
            Ok(Some(Err(e))) => return Err(plain(StatusCode::BAD_REQUEST, format!("could not read the request body: {e}"))),
        }
    }
}

fn stalled(after: Duration) -> Response {
    let mut resp = plain(StatusCode::REQUEST_TIMEOUT, format!("the request body stalled: nothing arrived for {} s", after.as_secs_f64()));
    // The rest of the body is not read, so the connection cannot carry another request.
    resp.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    resp
}

fn too_large(max: usize) -> Response {
    let mut resp = plain(StatusCode::PAYLOAD_TOO_LARGE, format!("request body too large: the limit is {max} bytes"));
    // The rest of the body is not read, so the connection cannot carry another request.
    resp.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    resp
}

fn plain(status: StatusCode, text: String) -> Response {
    (status, [(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text + "\n").into_response()
}

fn xml_response(status: StatusCode, outcome: Result<&Value, &StorageError>) -> Response {
    (status, [(header::CONTENT_TYPE, "text/xml")], xmlrpc::encode_response(&envelope::xml_reply(outcome))).into_response()
}

fn json_response(status: StatusCode, reply: &serde_json::Value) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], reply.to_string()).into_response()
}

async fn not_found(uri: Uri) -> Response {
    // The path only: the query may hold a secret.
    plain(StatusCode::NOT_FOUND, format!("no such path {}: the RPC paths are {XMLRPC_PATH} (XML-RPC) and {JSONRPC_PATH} or / (JSON-RPC)", uri.path()))
}

async fn method_not_allowed(method: Method, uri: Uri) -> Response {
    let mut resp = plain(StatusCode::METHOD_NOT_ALLOWED, format!("{method} is not allowed on {}: calls are POSTed", uri.path()));
    resp.headers_mut().insert(header::ALLOW, HeaderValue::from_static("POST"));
    resp
}

/// What a request presented of the host secret.
pub(super) struct Presented {
    /// It presented the secret.
    pub ok: bool,
    /// It presented something (right or wrong).
    pub any: bool,
}

/// Whether a request presents the host secret, as `session_id` in the query or as
/// `Authorization: Bearer`.
pub(super) fn check_secret(secret: &str, headers: &HeaderMap, uri: &Uri) -> Presented {
    let bearer = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer ")).map(str::trim);
    let session = Query::<Vec<(String, String)>>::try_from_uri(uri).ok().and_then(|Query(q)| q.into_iter().find(|(k, _)| k == "session_id").map(|(_, v)| v));
    // Both are compared, whichever is present, so the time taken does not tell which was wrong.
    let bearer_ok = bearer.is_some_and(|b| secret_eq(b.as_bytes(), secret.as_bytes()));
    let session_ok = session.as_deref().is_some_and(|s| secret_eq(s.as_bytes(), secret.as_bytes()));
    Presented { ok: bearer_ok | session_ok, any: bearer.is_some() || session.is_some() }
}

/// The error an unauthenticated caller gets.
pub(super) fn unauthorised() -> StorageError {
    StorageError::InternalError("unauthorised: present the host secret as the session_id query parameter or as Authorization: Bearer".into())
}

/// Lets a TCP request through only with the host secret.
async fn require_secret(State(secret): State<Arc<str>>, req: Request, next: Next) -> Response {
    let presented = check_secret(&secret, req.headers(), req.uri());
    if presented.ok {
        return next.run(req).await;
    }
    let path = req.uri().path();
    tracing::info!(path, presented = presented.any, "refused an unauthenticated TCP request");
    let err = unauthorised();
    let mut resp = if path == XMLRPC_PATH {
        xml_response(StatusCode::UNAUTHORIZED, Err(&err))
    } else if path == JSONRPC_PATH || path == "/" {
        json_response(StatusCode::UNAUTHORIZED, &envelope::json_reply(JsonVersion::V2, serde_json::Value::Null, Err(&err)))
    } else {
        plain(StatusCode::UNAUTHORIZED, err.to_string())
    };
    resp.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"sxm\""));
    // A caller without the secret gets no idle connection to keep.
    resp.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    resp
}

/// Compares a presented secret with ours in time that depends only on the presented length,
/// so timing reveals neither our secret's bytes nor its length.
fn secret_eq(presented: &[u8], ours: &[u8]) -> bool {
    if ours.is_empty() {
        return false;
    }
    let mut diff = u8::from(presented.len() != ours.len());
    for (i, p) in presented.iter().enumerate() {
        diff |= p ^ ours[i % ours.len()];
    }
    std::hint::black_box(diff) == 0
}

/// `text`, cut to at most `max` bytes (at a character boundary), saying how much was cut.
fn clipped(text: &str, max: usize) -> std::borrow::Cow<'_, str> {
    if text.len() <= max {
        return text.into();
    }
    let cut = (0..=max).rev().find(|&i| text.is_char_boundary(i)).unwrap_or(0);
    format!("{}… ({} bytes more)", &text[..cut], text.len() - cut).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_texts_are_clipped_at_a_character_boundary() {
        assert_eq!(clipped("short", 10), "short");
        assert_eq!(clipped("ééé", 3), "é… (4 bytes more)");
    }

    #[test]
    fn secrets_compare_equal_only_when_identical() {
        assert!(secret_eq(b"s3cret", b"s3cret"));
        assert!(!secret_eq(b"s3cre", b"s3cret"));
        assert!(!secret_eq(b"s3cretX", b"s3cret"));
        assert!(!secret_eq(b"s3cres3cret", b"s3cret"), "a repetition of the secret is not the secret");
        assert!(!secret_eq(b"", b"s3cret"));
        assert!(!secret_eq(b"", b""), "an empty secret admits nobody");
    }

    #[test]
    fn the_config_debug_hides_the_secret() {
        let text = format!("{:?}", ServerConfig::new("hunter2"));
        assert!(!text.contains("hunter2"), "{text}");
    }
}

