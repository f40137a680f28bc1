//! The client other hosts and the CLI use to call a server: JSON-RPC (1.0 or 2.0) to
//! `/jsonrpc`, or XML-RPC to `/services/SM` as xapi calls another host, over TCP or a Unix
//! socket, with hyper's HTTP/1 connection API and no further crates; and [`connect_nbd`], the
//! `PUT` that turns a connection into an NBD connection, by hand (hyper would read past the
//! answer into the NBD stream).
//!
//! One connection per call: storage calls are few and long, and a fresh connection can never
//! be one the server has just closed.

use std::fmt;
use std::io;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::client::conn::http1::{self, SendRequest};
use hyper::http::{HeaderValue, Method, Request, StatusCode, header};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

use super::envelope::{self, JsonVersion};
use super::nbd::IntoBlockingFd;
use super::server::{JSONRPC_PATH, XMLRPC_PATH};
use crate::model::StorageError;
use crate::rpc::{Value, xmlrpc};

/// The largest reply body read (a storage reply is a few KiB; `SR.scan` of a big SR a few MiB).
const MAX_REPLY: usize = 256 << 20;
/// The largest answer head [`connect_nbd`] reads.
const MAX_NBD_REPLY_HEAD: usize = 16 << 10;
/// The most of a refused NBD `PUT`'s body read, and how long it may take to arrive.
const MAX_REFUSAL_BODY: usize = 4096;
const REFUSAL_BODY_TIMEOUT: Duration = Duration::from_secs(5);

/// Where a server listens.
#[derive(Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A Unix socket path; no secret is sent.
    Unix(PathBuf),
    /// A TCP server.
    Tcp {
        /// `host:port` (port 80 when the URL gave none).
        authority: String,
        /// A path in front of the RPC paths (for a server behind a proxy), without a trailing
        /// `/`; usually empty.
        path_prefix: String,
        /// The host secret to present.
        secret: Option<String>,
        /// Over TLS (`https://`; port 443 when the URL gave none).
        tls: bool,
    },
}

/// Why a string is not an endpoint. Never quotes the input, which may hold a secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Bad endpoint: {0}")]
pub struct EndpointError(String);

impl Endpoint {
    /// Parses `http://host[:port][/prefix][?session_id=<secret>]` or a filesystem path (also
    /// written `unix:<path>`). A path ending in `/services/SM` or `/jsonrpc` names the RPC path
    /// itself and is dropped from the prefix, so the URL xapi hands out for a host
    /// (`http://<ip>/services/SM?session_id=…`) works for both encodings.
    pub fn parse(s: &str) -> Result<Endpoint, EndpointError> {
        if let Some(rest) = s.strip_prefix("http://") {
            return parse_http(rest, false);
        }
        if let Some(rest) = s.strip_prefix("https://") {
            return parse_http(rest, true);
        }
        // `ADDR:PORT` or `NAME:PORT` alone (with the secret in a query, as in xapi's URLs) is a
        // TCP host, not a socket file named so: otherwise the secret became part of a path,
        // and so of every error that named it.
        let (before_query, query) = s.split_once('?').unwrap_or((s, ""));
        if is_host_port(before_query.split('/').next().unwrap_or_default()) {
            return parse_http(s, false);
        }
        let path = s.strip_prefix("unix:").unwrap_or(s);
        // A socket needs no secret: a `?session_id=` given out of habit is dropped, never
        // taken for part of the file's name.
        let path = match path.split_once('?') {
            Some((p, _)) if query.split('&').all(|pair| pair.starts_with("session_id=")) => p,
            _ => path,
        };
        if let Some((scheme, _)) = path.split_once("://") {
            return Err(EndpointError(format!("unsupported scheme {scheme:?}: use http://, https:// or a Unix socket path")));
        }
        if path.is_empty() {
            return Err(EndpointError("empty socket path".into()));
        }
        Ok(Endpoint::Unix(PathBuf::from(path)))
    }

    /// Where a `Redirect ip` answer from this endpoint points: the same URL with `ip` (an
    /// address, or `ADDR:PORT`) for its host, keeping the port, path and secret, as xapi
    /// follows it. `None` for a Unix socket, which names no host.
    pub fn redirected(&self, ip: &str) -> Option<Endpoint> {
        let Endpoint::Tcp { authority, path_prefix, secret, tls } = self else { return None };
        let port = authority.rsplit_once(':').map(|(_, p)| p).unwrap_or("80");
        let authority = if ip.parse::<std::net::SocketAddr>().is_ok() {
            ip.to_owned()
        } else if ip.parse::<std::net::Ipv6Addr>().is_ok() {
            format!("[{ip}]:{port}")
        } else if !ip.is_empty() && ip.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-') {
            format!("{ip}:{port}")
        } else {
            return None;
        };
        Some(Endpoint::Tcp { authority, path_prefix: path_prefix.clone(), secret: secret.clone(), tls: *tls })
    }

    /// The same endpoint presenting `secret` (TCP only; a Unix socket needs none).
    pub fn with_secret(self, secret: impl Into<String>) -> Endpoint {
        match self {
            Endpoint::Tcp { authority, path_prefix, tls, .. } => Endpoint::Tcp { authority, path_prefix, secret: Some(secret.into()), tls },
            unix => unix,
        }
    }
}

/// `ADDR:PORT`, `[V6]:PORT` or `NAME:PORT`: a host, where a socket's path would hold a `/`.
fn is_host_port(s: &str) -> bool {
    if s.parse::<std::net::SocketAddr>().is_ok() {
        return true;
    }
    let Some((name, port)) = s.rsplit_once(':') else { return false };
    !name.is_empty()
        && port.parse::<u16>().is_ok()
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

fn parse_http(rest: &str, tls: bool) -> Result<Endpoint, EndpointError> {
    let (before_query, query) = match rest.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (rest, None),
    };
    let (authority, path) = match before_query.find('/') {
        Some(i) => before_query.split_at(i),
        None => (before_query, ""),
    };
    if authority.is_empty() {
        return Err(EndpointError("no host in the URL".into()));
    }
    if authority.contains('@') {
        return Err(EndpointError("user information in the URL is not supported: pass the secret as ?session_id=".into()));
    }
    // `host`, `host:port`, `[v6]`, `[v6]:port`: add the default port when there is none.
    let has_port = match authority.rfind(']') {
        Some(close) => authority[close..].contains(':'),
        None => authority.contains(':'),
    };
    let authority = if has_port { authority.to_owned() } else { format!("{authority}:{}", if tls { 443 } else { 80 }) };
    let mut prefix = path.trim_end_matches('/');
    for rpc_path in [XMLRPC_PATH, JSONRPC_PATH] {
        if let Some(p) = prefix.strip_suffix(rpc_path) {
            prefix = p;
            break;
        }
    }
    let mut secret = None;
    for pair in query.into_iter().flat_map(|q| q.split('&')).filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "session_id" => secret = Some(percent_decode(v).ok_or_else(|| EndpointError("bad percent-encoding in session_id".into()))?),
            other => return Err(EndpointError(format!("unsupported query parameter {other:?}: only session_id is understood"))),
        }
    }
    Ok(Endpoint::Tcp { authority, path_prefix: prefix.to_owned(), secret, tls })
}

fn percent_decode(s: &str) -> Option<String> {
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        match b {
            b'%' => {
                let hi = char::from(bytes.next()?).to_digit(16)?;
                let lo = char::from(bytes.next()?).to_digit(16)?;
                out.push(u8::try_from(hi * 16 + lo).ok()?);
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
    }
    String::from_utf8(out).ok()
}

/// Percent-encodes everything but unreserved characters and `:` (for a query value or a path
/// component).
pub(super) fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~:".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl FromStr for Endpoint {
    type Err = EndpointError;

    fn from_str(s: &str) -> Result<Endpoint, EndpointError> {
        Endpoint::parse(s)
    }
}

impl fmt::Display for Endpoint {
    // Without the secret: this is what errors and logs show.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Unix(p) => write!(f, "unix:{}", p.display()),
            Endpoint::Tcp { authority, path_prefix, tls, .. } => write!(f, "http{}://{authority}{path_prefix}", if *tls { "s" } else { "" }),
        }
    }
}

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Unix(p) => f.debug_tuple("Unix").field(p).finish(),
            Endpoint::Tcp { authority, path_prefix, secret, tls } => f
                .debug_struct("Tcp")
                .field("authority", authority)
                .field("path_prefix", path_prefix)
                .field("secret", &secret.as_ref().map(|_| "<redacted>"))
                .field("tls", tls)
                .finish(),
        }
    }
}

/// A failed call: where, what, and why.
#[derive(Debug, thiserror::Error)]
#[error("Calling {method} on {endpoint}")]
pub struct CallError {
    /// The endpoint called (without its secret).
    pub endpoint: String,
    /// The method called; for [`connect_nbd`], `PUT <path>`.
    pub method: String,
    /// What went wrong.
    #[source]
    pub kind: CallErrorKind,
}

impl CallError {
    /// The storage error the server answered, if that is what this is.
    pub fn storage(&self) -> Option<&StorageError> {
        match &self.kind {
            CallErrorKind::Storage(e) => Some(e),
            _ => None,
        }
    }
}

/// What went wrong in a call. Only [`CallErrorKind::Storage`] means the server ran the call
/// and it failed; the others mean the call may not have reached it, or its answer was lost.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CallErrorKind {
    /// The server answered with a storage error.
    #[error("The server answered with an error")]
    Storage(#[source] StorageError),
    /// No connection.
    #[error("Cannot connect")]
    Connect(#[source] io::Error),
    /// The HTTP exchange failed.
    #[error("HTTP exchange failed")]
    Http(#[source] hyper::Error),
    /// The connection failed after it was made ([`connect_nbd`]: writing the request, reading the
    /// answer, or taking the socket out of the reactor).
    #[error("The connection failed")]
    Io(#[source] io::Error),
    /// The reply body could not be read.
    #[error("Cannot read the reply")]
    Body(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// HTTP 401: no secret, or the wrong one.
    #[error("The server refused the host secret (HTTP 401)")]
    Unauthorised,
    /// Another HTTP status than 200.
    #[error("HTTP {status}: {body}")]
    Status {
        /// The status.
        status: StatusCode,
        /// The start of the body.
        body: String,
    },
    /// The reply is not a valid reply, or the request could not be made.
    #[error("Protocol error: {0}")]
    Protocol(String),
    /// No reply in time.
    #[error("No reply within {0:?}")]
    Timeout(Duration),
    /// The TLS handshake failed (the server's certificate not trusted, no common protocol).
    #[error("TLS handshake failed")]
    Tls(#[source] io::Error),
    /// The server stopped answering while the call waited: a question asked of it meanwhile,
    /// on a connection of its own, got no answer in this time.
    #[error("The host stopped answering (a check made while the call waited got no answer within {0:?})")]
    Unresponsive(Duration),
}

/// Calls one server.
#[derive(Debug)]
pub struct RpcClient {
    endpoint: Endpoint,
    version: JsonVersion,
    timeout: Option<Duration>,
    next_id: AtomicU64,
}

/// How the host secret travels on TCP.
#[derive(Clone, Copy)]
enum Credential {
    /// `Authorization: Bearer` (JSON-RPC).
    Bearer,
    /// Already in the query as `session_id`, as xapi sends it (XML-RPC).
    InQuery,
}

impl RpcClient {
    /// A client speaking JSON-RPC 2.0 (for [`RpcClient::call_json`]), with no timeout.
    pub fn new(endpoint: Endpoint) -> RpcClient {
        RpcClient { endpoint, version: JsonVersion::V2, timeout: None, next_id: AtomicU64::new(1) }
    }

    /// Speaks JSON-RPC `version` instead.
    pub fn with_json_version(mut self, version: JsonVersion) -> RpcClient {
        self.version = version;
        self
    }

    /// Gives up on a call (connect, send and reply) after `timeout`.
    pub fn with_timeout(mut self, timeout: Duration) -> RpcClient {
        self.timeout = Some(timeout);
        self
    }

    /// The endpoint called.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// Calls `method` with one struct of named arguments over JSON-RPC.
    pub async fn call_json(&self, method: &str, params: Value) -> Result<Value, CallError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let body = envelope::json_request(self.version, id, method, &params).to_string();
        let path = format!("{}{JSONRPC_PATH}", self.prefix());
        let reply = self.post(&path, "application/json", body, Credential::Bearer).await.map_err(|k| self.error(method, k))?;
        match envelope::parse_json_reply(&reply, id) {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(self.error(method, failure(&e))),
            Err(bad) => Err(self.error(method, CallErrorKind::Protocol(bad.0))),
        }
    }

    /// Calls `method` with one struct of named arguments over XML-RPC to `/services/SM`, the
    /// secret in the query as `session_id`, as xapi does.
    pub async fn call_xml(&self, method: &str, params: Value) -> Result<Value, CallError> {
        let body = xmlrpc::encode_call(method, std::slice::from_ref(&params));
        let mut path = format!("{}{XMLRPC_PATH}", self.prefix());
        if let Endpoint::Tcp { secret: Some(s), .. } = &self.endpoint {
            path.push_str("?session_id=");
            path.push_str(&percent_encode(s));
        }
        let reply = self.post(&path, "text/xml", body, Credential::InQuery).await.map_err(|k| self.error(method, k))?;
        let parsed = std::str::from_utf8(&reply)
            .map_err(|e| format!("reply is not UTF-8: {e}"))
            .and_then(|text| xmlrpc::parse_response(text).map_err(|e| e.to_string()))
            .and_then(|v| envelope::parse_xml_reply(v).map_err(|e| e.0));
        match parsed {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(self.error(method, failure(&e))),
            Err(why) => Err(self.error(method, CallErrorKind::Protocol(why))),
        }
    }

    /// [`connect_nbd`] to this client's endpoint, giving up after the client's timeout.
    pub async fn connect_nbd(&self, path: &str) -> Result<OwnedFd, CallError> {
        let put = nbd_put(&self.endpoint, path);
        let outcome = match self.timeout {
            Some(t) => tokio::time::timeout(t, put).await.unwrap_or(Err(CallErrorKind::Timeout(t))),
            None => put.await,
        };
        outcome.map_err(|k| self.error(&nbd_what(path), k))
    }

    fn prefix(&self) -> &str {
        match &self.endpoint {
            Endpoint::Tcp { path_prefix, .. } => path_prefix,
            Endpoint::Unix(_) => "",
        }
    }

    fn error(&self, method: &str, kind: CallErrorKind) -> CallError {
        CallError { endpoint: self.endpoint.to_string(), method: method.to_owned(), kind }
    }

    /// POSTs `body` and returns the body of a 200 reply.
    async fn post(&self, path_and_query: &str, content_type: &'static str, body: String, credential: Credential) -> Result<Bytes, CallErrorKind> {
        let exchange = async {
            let mut req = Request::builder().method(Method::POST).uri(path_and_query).header(header::CONTENT_TYPE, content_type).header(header::USER_AGENT, concat!("sxm/", env!("CARGO_PKG_VERSION")));
            let mut sender = match &self.endpoint {
                Endpoint::Unix(path) => {
                    req = req.header(header::HOST, "localhost");
                    handshake(UnixStream::connect(path).await.map_err(CallErrorKind::Connect)?).await?
                }
                Endpoint::Tcp { authority, secret, tls, .. } => {
                    req = req.header(header::HOST, authority.as_str());
                    if let (Some(s), Credential::Bearer) = (secret, credential) {
                        let mut v = HeaderValue::from_str(&format!("Bearer {s}")).map_err(|_| CallErrorKind::Protocol("the secret cannot travel in an HTTP header".into()))?;
                        v.set_sensitive(true);
                        req = req.header(header::AUTHORIZATION, v);
                    }
                    let stream = TcpStream::connect(authority.as_str()).await.map_err(CallErrorKind::Connect)?;
                    // The request is written in one go; Nagle would only delay its last segment.
                    let _ = stream.set_nodelay(true);
                    if *tls {
                        handshake(tls_connect(authority, stream).await?).await?
                    } else {
                        handshake(stream).await?
                    }
                }
            };
            let req = req.body(Full::new(Bytes::from(body))).map_err(|e| CallErrorKind::Protocol(format!("cannot build the request: {e}")))?;
            let tls = matches!(&self.endpoint, Endpoint::Tcp { tls: true, .. });
            let resp = sender.send_request(req).await.map_err(|e| {
                // A TLS port answers plain HTTP with a TLS alert, which hyper reads as a bad
                // HTTP version: said so, the likely cause named.
                if e.is_parse() && !tls && matches!(&self.endpoint, Endpoint::Tcp { .. }) {
                    CallErrorKind::Protocol(format!("the answer is not HTTP ({e}): if this port serves HTTPS, name it https://"))
                } else {
                    CallErrorKind::Http(e)
                }
            })?;
            let status = resp.status();
            let bytes = Limited::new(resp.into_body(), MAX_REPLY).collect().await.map_err(CallErrorKind::Body)?.to_bytes();
            match status {
                StatusCode::OK => Ok(bytes),
                StatusCode::UNAUTHORIZED => Err(CallErrorKind::Unauthorised),
                status => {
                    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(512)]).trim_end().to_owned();
                    Err(CallErrorKind::Status { status, body: text })
                }
            }
        };
        match self.timeout {
            Some(t) => tokio::time::timeout(t, exchange).await.map_err(|_| CallErrorKind::Timeout(t))?,
            None => exchange.await,
        }
    }
}

/// A failure's value as the storage error it carries.
fn failure(v: &Value) -> CallErrorKind {
    match StorageError::from_value(v) {
        Ok(e) => CallErrorKind::Storage(e),
        Err(e) => CallErrorKind::Protocol(format!("the server failed with something that is not a storage error ({e})")),
    }
}

/// Opens an NBD connection as xapi's source does: `PUT <path>` (`/services/SM/nbd/…` or
/// `/services/SM/nbdproxy/…`, see [`super::NbdRequest::path`]; under the endpoint's path prefix,
/// with its secret as `session_id` on TCP), and once the server answers `200` with
/// `Transfer-encoding: nbd` returns the socket, in blocking mode, with nothing past the answer's
/// head read from it: the next bytes are the NBD server's. Any other answer is an error: 401 is
/// [`CallErrorKind::Unauthorised`], another status [`CallErrorKind::Status`] with the start of
/// its body, a `200` without `Transfer-encoding: nbd` [`CallErrorKind::Protocol`]. No timeout:
/// [`RpcClient::connect_nbd`] has the client's.
pub async fn connect_nbd(endpoint: &Endpoint, path: &str) -> Result<OwnedFd, CallError> {
    nbd_put(endpoint, path).await.map_err(|kind| CallError { endpoint: endpoint.to_string(), method: nbd_what(path), kind })
}

/// How an NBD `PUT` is named in errors: without a query, which could hold a secret.
fn nbd_what(path: &str) -> String {
    format!("PUT {}", path.split('?').next().unwrap_or_default())
}

async fn nbd_put(endpoint: &Endpoint, path: &str) -> Result<OwnedFd, CallErrorKind> {
    // The path goes into the request line as it is.
    if !path.starts_with('/') || path.bytes().any(|b| b <= b' ' || b >= 0x7f) {
        return Err(CallErrorKind::Protocol("an NBD path starts with / and holds no spaces, control or non-ASCII characters (percent-encode them)".into()));
    }
    match endpoint {
        Endpoint::Unix(sock) => {
            let mut s = UnixStream::connect(sock).await.map_err(CallErrorKind::Connect)?;
            nbd_exchange(&mut s, path, "localhost").await?;
            s.into_blocking_fd().map_err(CallErrorKind::Io)
        }
        Endpoint::Tcp { authority, path_prefix, secret, tls } => {
            let mut target = format!("{path_prefix}{path}");
            if let Some(secret) = secret {
                target.push(if target.contains('?') { '&' } else { '?' });
                target.push_str("session_id=");
                target.push_str(&percent_encode(secret));
            }
            let mut s = TcpStream::connect(authority.as_str()).await.map_err(CallErrorKind::Connect)?;
            // NBD requests and replies are small messages; Nagle would only delay them.
            let _ = s.set_nodelay(true);
            if *tls {
                // The datapath speaks plain NBD: it gets a socket whose other end this process
                // relays to the TLS stream (xapi hands tapdisk stunnel's socket the same way).
                let mut t = tls_connect(authority, s).await?;
                nbd_exchange(&mut t, &target, authority).await?;
                return t.into_blocking_fd().map_err(CallErrorKind::Io);
            }
            nbd_exchange(&mut s, &target, authority).await?;
            s.into_blocking_fd().map_err(CallErrorKind::Io)
        }
    }
}

/// The TLS handshake with the server at `authority`, trusting what [`super::tls`] was told to.
async fn tls_connect(authority: &str, stream: TcpStream) -> Result<tokio_rustls::client::TlsStream<TcpStream>, CallErrorKind> {
    let name = super::tls::server_name(authority).map_err(CallErrorKind::Connect)?;
    tokio_rustls::TlsConnector::from(super::tls::client()).connect(name, stream).await.map_err(|e| {
        // webpki's words for a self-signed certificate offered by a host whose CA it is.
        if e.to_string().contains("CaUsedAsEndEntity") {
            return CallErrorKind::Tls(io::Error::new(e.kind(), format!("{e} (the server presents a CA's certificate as its own, a self-signed one: give it a certificate that CA signed)")));
        }
        // A plain HTTP port answers the TLS greeting with an HTTP error, which rustls reads as
        // a record of no TLS type: the likely cause named, as the other way round.
        if e.to_string().contains("InvalidContentType") {
            return CallErrorKind::Tls(io::Error::new(e.kind(), format!("{e} (the answer is not TLS: if this port serves plain HTTP, name it http://)")));
        }
        CallErrorKind::Tls(e)
    })
}

/// Sends the `PUT` and reads the answer's head, and on a refusal the start of its body.
async fn nbd_exchange<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, target: &str, host: &str) -> Result<(), CallErrorKind> {
    // `Content-Length: 0`: the request has no body, whatever follows is NBD.
    let request = format!("PUT {target} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: sxm/{}\r\nContent-Length: 0\r\n\r\n", env!("CARGO_PKG_VERSION"));
    s.write_all(request.as_bytes()).await.map_err(CallErrorKind::Io)?;
    let head = read_reply_head(s).await?;
    let (status, headers) = parse_reply_head(&head).map_err(CallErrorKind::Protocol)?;
    let header = |name: &str| headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str());
    match status {
        StatusCode::OK if header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("nbd")) => Ok(()),
        StatusCode::OK => Err(CallErrorKind::Protocol("the server answered 200 without Transfer-encoding: nbd, so the connection is not NBD".into())),
        StatusCode::UNAUTHORIZED => Err(CallErrorKind::Unauthorised),
        status => {
            let length = header("content-length").and_then(|v| v.parse::<usize>().ok());
            Err(CallErrorKind::Status { status, body: read_refusal_body(s, length).await })
        }
    }
}

/// Reads an answer's head through its blank line and not a byte more.
async fn read_reply_head<S: AsyncRead + Unpin>(s: &mut S) -> Result<Vec<u8>, CallErrorKind> {
    // One byte per read: after a 200 the next bytes are the NBD server's greeting, which belong
    // to whoever gets the socket, and a socket cannot be un-read.
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() >= MAX_NBD_REPLY_HEAD {
            return Err(CallErrorKind::Protocol(format!("the answer's head is over {MAX_NBD_REPLY_HEAD} bytes")));
        }
        match s.read(&mut byte).await.map_err(CallErrorKind::Io)? {
            0 => return Err(CallErrorKind::Protocol("the server closed the connection before the end of its answer's head".into())),
            _ => head.push(byte[0]),
        }
    }
    Ok(head)
}

/// The status and headers of an answer head: `HTTP/1.x <code> <reason>`, then `name: value`.
fn parse_reply_head(head: &[u8]) -> Result<(StatusCode, Vec<(String, String)>), String> {
    let text = String::from_utf8_lossy(head);
    let mut lines = text.trim_end_matches("\r\n").split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let code = status_line
        .strip_prefix("HTTP/1.1 ")
        .or_else(|| status_line.strip_prefix("HTTP/1.0 "))
        .and_then(|rest| rest.get(..3))
        .and_then(|code| StatusCode::from_bytes(code.as_bytes()).ok())
        .ok_or_else(|| format!("not an HTTP/1 status line: {:?}", status_line.chars().take(80).collect::<String>()))?;
    let headers = lines.filter_map(|l| l.split_once(':')).map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned())).collect();
    Ok((code, headers))
}

/// The start of a refusal's body, for the error: at most [`MAX_REFUSAL_BODY`] bytes, read for
/// at most [`REFUSAL_BODY_TIMEOUT`] (a server that keeps the connection open after an answer
/// without a length would otherwise hold the caller here).
async fn read_refusal_body<S: AsyncRead + Unpin>(s: &mut S, length: Option<usize>) -> String {
    let limit = length.unwrap_or(MAX_REFUSAL_BODY).min(MAX_REFUSAL_BODY);
    let mut body = Vec::new();
    let _ = tokio::time::timeout(REFUSAL_BODY_TIMEOUT, (&mut *s).take(limit as u64).read_to_end(&mut body)).await;
    String::from_utf8_lossy(&body[..body.len().min(512)]).trim_end().to_owned()
}

async fn handshake<S>(stream: S) -> Result<SendRequest<Full<Bytes>>, CallErrorKind>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = http1::handshake(TokioIo::new(stream)).await.map_err(CallErrorKind::Http)?;
    // The connection runs beside the request; it ends when the sender is dropped after the reply.
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "client connection ended with an error");
        }
    });
    Ok(sender)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(authority: &str, prefix: &str, secret: Option<&str>) -> Endpoint {
        Endpoint::Tcp { authority: authority.into(), path_prefix: prefix.into(), secret: secret.map(Into::into), tls: false }
    }

    #[test]
    fn xapis_host_url_parses_with_its_session_id() {
        assert_eq!(Endpoint::parse("http://10.0.0.7/services/SM?session_id=OpaqueRef:ab%2Fc"), Ok(tcp("10.0.0.7:80", "", Some("OpaqueRef:ab/c"))));
    }

    #[test]
    fn ports_prefixes_and_ipv6_hosts_parse() {
        assert_eq!(Endpoint::parse("http://h:8080"), Ok(tcp("h:8080", "", None)));
        assert_eq!(Endpoint::parse("127.0.0.1:8301"), Ok(tcp("127.0.0.1:8301", "", None)), "an address alone is TCP");
        assert_eq!(Endpoint::parse("/run/sxm:1.sock"), Ok(Endpoint::Unix("/run/sxm:1.sock".into())));
        assert_eq!(Endpoint::parse("http://h:8080/"), Ok(tcp("h:8080", "", None)));
        assert_eq!(Endpoint::parse("http://h/proxy/sxm/jsonrpc"), Ok(tcp("h:80", "/proxy/sxm", None)));
        assert_eq!(Endpoint::parse("http://[::1]:9/"), Ok(tcp("[::1]:9", "", None)));
        assert_eq!(Endpoint::parse("http://[::1]"), Ok(tcp("[::1]:80", "", None)));
    }

    #[test]
    fn https_urls_are_tls_on_port_443_by_default() {
        let e = Endpoint::parse("https://10.0.0.7/services/SM?session_id=s").expect("https");
        assert_eq!(e, Endpoint::Tcp { authority: "10.0.0.7:443".into(), path_prefix: String::new(), secret: Some("s".into()), tls: true });
        assert_eq!(e.to_string(), "https://10.0.0.7:443");
        let Some(Endpoint::Tcp { tls: true, authority, .. }) = e.redirected("10.0.0.8") else { panic!("a redirect keeps TLS") };
        assert_eq!(authority, "10.0.0.8:443");
    }

    #[test]
    fn paths_are_unix_sockets() {
        assert_eq!(Endpoint::parse("/run/sxm.sock"), Ok(Endpoint::Unix("/run/sxm.sock".into())));
        assert_eq!(Endpoint::parse("unix:rel.sock"), Ok(Endpoint::Unix("rel.sock".into())));
    }

    #[test]
    fn a_host_without_scheme_keeps_its_secret_out_of_the_path() {
        // Once parsed as a socket path, the secret was in every error that named the endpoint.
        assert_eq!(Endpoint::parse("127.0.0.1:8302?session_id=topsecret"), Ok(tcp("127.0.0.1:8302", "", Some("topsecret"))));
        assert_eq!(Endpoint::parse("localhost:8302"), Ok(tcp("localhost:8302", "", None)));
        assert_eq!(Endpoint::parse("127.0.0.1:8302/?session_id=s"), Ok(tcp("127.0.0.1:8302", "", Some("s"))), "a path after the port");
        assert_eq!(Endpoint::parse("10.0.0.1:80/services/SM"), Ok(tcp("10.0.0.1:80", "", None)));
        assert_eq!(Endpoint::parse("[::1]:9?session_id=s"), Ok(tcp("[::1]:9", "", Some("s"))));
        let socket = Endpoint::parse("/run/sxm.sock?session_id=topsecret").expect("a socket path");
        assert_eq!(socket, Endpoint::Unix("/run/sxm.sock".into()), "a socket needs no secret");
        assert!(!socket.to_string().contains("topsecret"));
        assert_eq!(Endpoint::parse("/run/odd?name"), Ok(Endpoint::Unix("/run/odd?name".into())), "a ? in a file name stays");
    }

    #[test]
    fn unsupported_forms_are_refused_without_echoing_secrets() {
        for bad in ["ftp://h/", "http://", "http:///x", "", "http://u:p@h/", "http://h/?token=x", "http://h/?session_id=%zz"] {
            assert!(Endpoint::parse(bad).is_err(), "{bad:?} parsed");
        }
        let e = Endpoint::parse("http://h/?session_id=topsecret&x=1").expect_err("unknown parameter");
        assert!(!e.to_string().contains("topsecret"), "{e}");
    }

    #[test]
    fn a_redirect_keeps_the_port_path_and_secret() {
        let e = tcp("10.0.0.1:8001", "/p", Some("s"));
        assert_eq!(e.redirected("10.0.0.2"), Some(tcp("10.0.0.2:8001", "/p", Some("s"))));
        assert_eq!(e.redirected("10.0.0.3:9"), Some(tcp("10.0.0.3:9", "/p", Some("s"))));
        assert_eq!(e.redirected("fe80::1"), Some(tcp("[fe80::1]:8001", "/p", Some("s"))));
        assert_eq!(e.redirected("a/b"), None, "not a host");
        assert_eq!(Endpoint::Unix("/s".into()).redirected("10.0.0.2"), None);
    }

    #[test]
    fn display_and_debug_hide_the_secret() {
        let e = tcp("h:1", "/p", Some("topsecret"));
        assert_eq!(e.to_string(), "http://h:1/p");
        assert!(!format!("{e:?}").contains("topsecret"));
    }

    #[test]
    fn secrets_survive_percent_encoding() {
        let s = "a b&c=d/é%";
        assert_eq!(percent_decode(&percent_encode(s)).as_deref(), Some(s));
    }
}
