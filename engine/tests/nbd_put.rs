//! xapi's NBD `PUT`s over real sockets: a server with a test [`NbdHandover`] that, once it has
//! the socket, writes a greeting and echoes what it reads, called by `connect_nbd`, by
//! hand-written bytes (to pin the exact answers and prove nothing is read past a head), and by
//! RPC clients on the same listeners; and, when nbdkit is installed, a handler that gives the
//! socket to a real NBD server in another process.

use std::fs::File;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sxm_engine::http::nbd::NBD_OK;
use sxm_engine::http::{
    CallErrorKind, Dispatch, Endpoint, HandoverError, NbdHandover, NbdKind, NbdRequest, RpcClient, Running, ServerConfig, Transport, connect_nbd, serve_with,
};
use sxm_engine::model::StorageError;
use sxm_engine::rpc::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixStream};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

const SECRET: &str = "host-secret-42";
/// What the test handler writes first on a socket it took over, standing in for an NBD server's
/// greeting.
const GREETING: &[u8] = b"NBDMAGIC\x00\x00\x42\x02\x81\x86\x12\x53";
/// How long the test handler waits before its greeting, and the test client before it writes:
/// long enough that a read on a socket left non-blocking would fail with WouldBlock.
const PAUSE: Duration = Duration::from_millis(100);

/// Counts calls; `slow` takes half a second.
#[derive(Default)]
struct Rpc {
    calls: AtomicUsize,
}

impl Dispatch for Rpc {
    async fn dispatch(&self, method: String, _params: Vec<Value>) -> Result<Value, StorageError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if method == "slow" {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        Ok(Value::String(method))
    }
}

/// Records each request; refuses or panics by datapath name (`refuse-404`, `refuse-400`,
/// `refuse-500`, `panic`), waits for `gate` on `gate`, otherwise accepts and, with the socket,
/// pauses, writes [`GREETING`] and echoes until end of stream.
#[derive(Default)]
struct Handover {
    prepared: AtomicUsize,
    taken: AtomicUsize,
    requests: Mutex<Vec<(NbdRequest, Transport)>>,
    errors: Mutex<Vec<String>>,
    gate: Notify,
}

impl NbdHandover for Handover {
    type Prepared = String;

    async fn prepare(&self, req: NbdRequest, transport: Transport) -> Result<String, HandoverError> {
        self.prepared.fetch_add(1, Ordering::SeqCst);
        self.requests.lock().expect("lock").push((req.clone(), transport));
        match req.dp.as_str() {
            "refuse-404" => Err(HandoverError::NotFound("no datapath refuse-404 here".into())),
            "refuse-400" => Err(HandoverError::BadRequest("that VDI is read-only".into())),
            "refuse-500" => Err(HandoverError::Internal("the datapath would not start".into())),
            "panic" => panic!("the test handler panics on purpose"),
            "gate" => {
                self.gate.notified().await;
                Ok(req.dp)
            }
            _ => Ok(req.dp),
        }
    }

    async fn take_over(&self, dp: String, conn: OwnedFd) {
        self.taken.fetch_add(1, Ordering::SeqCst);
        let outcome = tokio::task::spawn_blocking(move || greet_and_echo(conn)).await.expect("echo task");
        if let Err(e) = outcome {
            self.errors.lock().expect("lock").push(format!("{dp}: {e}"));
        }
    }
}

/// Blocking I/O on the handed-over socket, as the datapath process would do it.
fn greet_and_echo(conn: OwnedFd) -> Result<(), String> {
    let mut f = File::from(conn);
    std::thread::sleep(PAUSE);
    f.write_all(GREETING).map_err(|e| format!("writing the greeting: {e}"))?;
    let mut buf = [0u8; 4096];
    loop {
        // The caller writes only after a pause, so on a non-blocking socket this read fails.
        let n = f.read(&mut buf).map_err(|e| format!("reading: {e}"))?;
        if n == 0 {
            return Ok(());
        }
        f.write_all(&buf[..n]).map_err(|e| format!("echoing: {e}"))?;
    }
}

struct Server {
    rpc: Arc<Rpc>,
    handover: Arc<Handover>,
    shutdown: CancellationToken,
    running: Option<Running>,
    addr: SocketAddr,
    sock: PathBuf,
    _dir: tempfile::TempDir,
}

impl Server {
    async fn start() -> Server {
        Server::with_head_timeout(Duration::from_secs(10)).await
    }

    async fn with_head_timeout(head_timeout: Duration) -> Server {
        let dir = tempfile::tempdir().expect("temp dir");
        let sock = dir.path().join("sxm.sock");
        let mut cfg = ServerConfig::new(SECRET);
        cfg.tcp = Some("127.0.0.1:0".parse().expect("addr"));
        cfg.unix = Some(sock.clone());
        cfg.head_timeout = head_timeout;
        let (rpc, handover) = (Arc::new(Rpc::default()), Arc::new(Handover::default()));
        let shutdown = CancellationToken::new();
        let running = serve_with(&cfg, rpc.clone(), handover.clone(), shutdown.clone()).await.expect("serve");
        let addr = running.tcp_addr().expect("tcp bound");
        Server { rpc, handover, shutdown, running: Some(running), addr, sock, _dir: dir }
    }

    fn tcp(&self) -> Endpoint {
        Endpoint::parse(&format!("http://{}", self.addr)).expect("endpoint").with_secret(SECRET)
    }

    fn unix(&self) -> Endpoint {
        Endpoint::Unix(self.sock.clone())
    }

    fn endpoints(&self) -> [(Transport, Endpoint); 2] {
        [(Transport::Tcp, self.tcp()), (Transport::Unix, self.unix())]
    }

    async fn raw(&self, via: Transport) -> Box<dyn Io> {
        match via {
            Transport::Tcp => Box::new(TcpStream::connect(self.addr).await.expect("connect")),
            Transport::Unix => Box::new(UnixStream::connect(&self.sock).await.expect("connect")),
            Transport::Tls => unreachable!("this server has no TLS listener"),
        }
    }

    fn prepared(&self) -> usize {
        self.handover.prepared.load(Ordering::SeqCst)
    }

    fn taken(&self) -> usize {
        self.handover.taken.load(Ordering::SeqCst)
    }

    fn requests(&self) -> Vec<(NbdRequest, Transport)> {
        self.handover.requests.lock().expect("lock").clone()
    }

    /// No handler failed on a socket it took over (in particular, none found it non-blocking).
    fn assert_no_handler_errors(&self) {
        assert_eq!(*self.handover.errors.lock().expect("lock"), Vec::<String>::new());
    }

    async fn stop(mut self) {
        self.shutdown.cancel();
        let running = self.running.take().expect("running");
        tokio::time::timeout(Duration::from_secs(10), running.wait()).await.expect("server stops in time").expect("server stops cleanly");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

fn put(target: &str, headers: &[&str]) -> Vec<u8> {
    let mut out = format!("PUT {target} HTTP/1.1\r\nHost: test\r\n");
    for h in headers {
        out.push_str(h);
        out.push_str("\r\n");
    }
    out.push_str("\r\n");
    out.into_bytes()
}

fn authed(path: &str) -> String {
    format!("{path}?session_id={SECRET}")
}

/// An answer read to the end of the connection: status, head, body.
#[derive(Debug)]
struct Reply {
    status: u16,
    head: String,
    body: String,
}

/// Writes `req` and reads until the server closes, failing (not hanging) if it never does.
async fn exchange(mut s: Box<dyn Io>, req: &[u8]) -> Reply {
    let raw = tokio::time::timeout(Duration::from_secs(20), async {
        s.write_all(req).await.expect("write request");
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await.expect("read answer");
        raw
    })
    .await
    .expect("the server answers and closes within 20 s");
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no end of head in {text:?}"));
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("no status in {head:?}"));
    Reply { status, head: head.to_owned(), body: body.to_owned() }
}

/// Reads exactly `n` bytes, failing (not hanging) if they do not come.
async fn read_n(s: &mut Box<dyn Io>, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    tokio::time::timeout(Duration::from_secs(20), s.read_exact(&mut buf)).await.expect("bytes arrive in time").expect("read");
    buf
}

/// The client's side of a handed-over socket, blocking: the greeting, then an echo of `ping`.
/// Returns what came back.
async fn greeting_then_echo(fd: OwnedFd, ping: &'static [u8]) -> (Vec<u8>, Vec<u8>) {
    tokio::task::spawn_blocking(move || {
        let mut f = File::from(fd);
        // The handler pauses before its greeting: on a non-blocking socket this read would fail.
        let mut greeting = vec![0u8; GREETING.len()];
        f.read_exact(&mut greeting).expect("read the greeting");
        std::thread::sleep(PAUSE);
        f.write_all(ping).expect("write");
        let mut echo = vec![0u8; ping.len()];
        f.read_exact(&mut echo).expect("read the echo");
        (greeting, echo)
    })
    .await
    .expect("client task")
}

async fn eventually(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn req(kind: NbdKind, vm: &str, sr: &str, vdi: &str, dp: &str) -> NbdRequest {
    NbdRequest { kind, vm: vm.into(), sr: sr.into(), vdi: vdi.into(), dp: dp.into() }
}

#[tokio::test]
async fn the_client_gets_the_raw_blocking_socket_right_after_the_200_over_both_transports() {
    let server = Server::start().await;
    for (i, (transport, endpoint)) in server.endpoints().into_iter().enumerate() {
        let fd = connect_nbd(&endpoint, "/services/SM/nbd/vm1/sr1/vdi1/dp1").await.expect("connect_nbd");
        let (greeting, echo) = greeting_then_echo(fd, b"ping").await;
        assert_eq!((greeting.as_slice(), echo.as_slice()), (GREETING, &b"ping"[..]), "{transport}");
        assert_eq!(server.requests()[i], (req(NbdKind::Nbd, "vm1", "sr1", "vdi1", "dp1"), transport));
    }
    // The handlers' sockets were blocking too (their first read would have failed otherwise).
    eventually("both echoes end", || server.taken() == 2).await;
    server.assert_no_handler_errors();
    server.stop().await;
}

#[tokio::test]
async fn bytes_sent_right_after_the_head_reach_the_handler_untouched() {
    let server = Server::start().await;
    for via in [Transport::Tcp, Transport::Unix] {
        // As xapi's source writes it (HTTP/1.0, its user agent), with NBD bytes in the same write.
        let mut request = format!("PUT {} HTTP/1.0\r\nUser-Agent: smapiv2\r\n\r\n", authed("/services/SM/nbdproxy/import/MIR1/sr/vdi/dp")).into_bytes();
        request.extend_from_slice(b"EARLY-NBD-BYTES");
        let mut s = server.raw(via).await;
        s.write_all(&request).await.expect("write");
        let got = read_n(&mut s, NBD_OK.len() + GREETING.len() + b"EARLY-NBD-BYTES".len()).await;
        assert_eq!(got, [NBD_OK, GREETING, b"EARLY-NBD-BYTES"].concat(), "{via}: the exact 200, then the handler's bytes, then the early bytes echoed");
        s.shutdown().await.expect("shutdown");
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut rest)).await.expect("echo ends").expect("read");
        assert_eq!(rest, b"", "{via}");
    }
    assert_eq!(server.requests().iter().map(|(r, _)| r.clone()).collect::<Vec<_>>(), vec![req(NbdKind::NbdProxy { import: true }, "MIR1", "sr", "vdi", "dp"); 2]);
    eventually("both echoes end", || server.taken() == 2).await;
    server.assert_no_handler_errors();
    server.stop().await;
}

#[tokio::test]
async fn xapis_path_forms_reach_the_handler_decoded() {
    let server = Server::start().await;
    let cases = [
        ("/services/SM/nbd/sr/vdi/dp".to_owned(), req(NbdKind::Nbd, "0", "sr", "vdi", "dp")),
        ("/services/SM/nbdproxy/CP1/sr/vdi/dp".to_owned(), req(NbdKind::NbdProxy { import: false }, "CP1", "sr", "vdi", "dp")),
        ("/services/SM/nbd/OpaqueRef%3Aab/s%20r/v+1/mirror_d".to_owned(), req(NbdKind::Nbd, "OpaqueRef:ab", "s r", "v+1", "mirror_d")),
    ];
    let built = req(NbdKind::NbdProxy { import: true }, "MIR ü", "sr", "vdi", "dp");
    for (path, want) in cases.into_iter().chain([(built.path(), built.clone())]) {
        let fd = connect_nbd(&server.tcp(), &path).await.unwrap_or_else(|e| panic!("{path}: {e:?}"));
        assert_eq!(greeting_then_echo(fd, b"x").await.1, b"x");
        assert_eq!(server.requests().last().map(|(r, _)| r), Some(&want), "{path}");
    }
    server.stop().await;
}

#[tokio::test]
async fn nbd_puts_without_the_secret_get_401_and_the_handler_is_not_called() {
    let server = Server::start().await;
    let path = "/services/SM/nbd/vm/sr/vdi/dp";
    for request in [put(path, &[]), put(&format!("{path}?session_id=wrong"), &[]), put(path, &["Authorization: Bearer wrong"]), put(&format!("{path}?session_id={SECRET}x"), &[])] {
        let r = exchange(server.raw(Transport::Tcp).await, &request).await;
        assert_eq!(r.status, 401, "{r:?}");
        assert!(r.head.to_ascii_lowercase().contains("\r\nwww-authenticate: bearer"), "{r:?}");
        assert!(r.body.contains("unauthorised"), "{r:?}");
    }
    let no_secret = Endpoint::parse(&format!("http://{}", server.addr)).expect("endpoint");
    let e = connect_nbd(&no_secret, path).await.expect_err("no secret");
    assert!(matches!(e.kind, CallErrorKind::Unauthorised), "{e:?}");
    assert_eq!(server.prepared(), 0, "the handler never ran");

    // Either credential lets a TCP caller in; the Unix socket needs none.
    let mut s = server.raw(Transport::Tcp).await;
    s.write_all(&put(path, &[&format!("Authorization: Bearer {SECRET}")])).await.expect("write");
    assert_eq!(read_n(&mut s, NBD_OK.len()).await, NBD_OK);
    let mut s = server.raw(Transport::Unix).await;
    s.write_all(&put(path, &[])).await.expect("write");
    assert_eq!(read_n(&mut s, NBD_OK.len()).await, NBD_OK);
    assert_eq!(server.prepared(), 2);
    server.stop().await;
}

#[tokio::test]
async fn other_path_shapes_get_404_and_the_handler_is_not_called() {
    let server = Server::start().await;
    for path in [
        "/services/SM/nbd/vdi/dp",
        "/services/SM/nbd/a/vm/sr/vdi/dp",
        "/services/SM/nbd/sr/vdi/dp/",
        "/services/SM/nbd/sr//dp",
        "/services/SM/nbd/../vdi/dp",
        "/services/SM/nbd/sr/%2e%2e/dp",
        "/services/SM/nbd/sr/./dp",
        "/services/SM/nbd/sr/a%2Fb/dp",
        "/services/SM/nbd/sr/%zz/dp",
        "/services/SM/nbdproxy/sr/vdi/dp",
        "/services/SM/nbdproxy/import/sr/vdi/dp",
        "/services/SM/nbdproxy/import/vm/sr/vdi/dp/x",
    ] {
        let r = exchange(server.raw(Transport::Tcp).await, &put(&authed(path), &[])).await;
        assert_eq!(r.status, 404, "{path}: {r:?}");
        assert!(r.body.contains("no such path") && !r.body.contains(SECRET), "{path}: {r:?}");
    }
    let e = connect_nbd(&server.unix(), "/services/SM/nbd/../vdi/dp").await.expect_err("bad path");
    assert!(matches!(&e.kind, CallErrorKind::Status { status, body } if status.as_u16() == 404 && body.contains("no such path")), "{e:?}");
    assert_eq!(server.prepared(), 0, "the handler never ran");
    server.stop().await;
}

#[tokio::test]
async fn a_refusing_or_panicking_handler_answers_its_status_and_body_and_closes() {
    let server = Server::start().await;
    for (dp, status, text) in [
        ("refuse-404", 404, "no datapath refuse-404 here"),
        ("refuse-400", 400, "that VDI is read-only"),
        ("refuse-500", 500, "the datapath would not start"),
        ("panic", 500, "the NBD handler panicked"),
    ] {
        let path = format!("/services/SM/nbd/vm/sr/vdi/{dp}");
        let r = exchange(server.raw(Transport::Unix).await, &put(&path, &[])).await;
        assert_eq!((r.status, r.body.as_str()), (status, format!("{text}\n").as_str()), "{r:?}");
        assert!(r.head.contains("Connection: close") && !r.head.contains("nbd"), "{r:?}");
        let e = connect_nbd(&server.tcp(), &path).await.expect_err("refused");
        assert!(matches!(&e.kind, CallErrorKind::Status { status: s, body } if s.as_u16() == status && body == text), "{e:?}");
    }
    assert_eq!(server.prepared(), 8);
    assert_eq!(server.taken(), 0, "nothing was taken over");
    server.stop().await;
}

#[tokio::test]
async fn rpc_calls_work_before_during_and_after_handovers_on_the_same_listeners() {
    let server = Server::start().await;
    for (transport, endpoint) in server.endpoints() {
        let client = RpcClient::new(endpoint.clone());
        assert_eq!(client.call_json("SR.list", Value::Struct(vec![])).await.expect("before"), Value::String("SR.list".into()), "{transport}");
        let fd = connect_nbd(&endpoint, "/services/SM/nbd/vm/sr/vdi/dp").await.expect("connect_nbd");
        // While the handed-over connection is open and echoing.
        assert_eq!(client.call_xml("SR.scan", Value::Struct(vec![])).await.expect("during"), Value::String("SR.scan".into()), "{transport}");
        assert_eq!(greeting_then_echo(fd, b"ping").await.1, b"ping");
        assert_eq!(client.call_json("VDI.stat", Value::Struct(vec![])).await.expect("after"), Value::String("VDI.stat".into()), "{transport}");
    }
    assert_eq!(server.rpc.calls.load(Ordering::SeqCst), 6);
    server.stop().await;
}

#[tokio::test]
async fn slow_loris_connections_are_dropped_after_the_head_timeout_without_blocking_others() {
    // Long enough that a loaded machine serves the other callers well within it: the check
    // is that the stalled connections do not hold them up until they time out.
    let timeout = Duration::from_secs(5);
    let server = Server::with_head_timeout(timeout).await;
    let start = Instant::now();
    // An NBD head that never ends, a request line that never decides, a connection that sends
    // nothing, and a head trickled a byte at a time forever.
    let mut stalled_head = server.raw(Transport::Tcp).await;
    stalled_head.write_all(format!("PUT {} HTTP/1.1\r\nHost: x\r\n", authed("/services/SM/nbd/sr/vdi/dp")).as_bytes()).await.expect("write");
    let mut stalled_line = server.raw(Transport::Tcp).await;
    stalled_line.write_all(b"PUT /servi").await.expect("write");
    // An RPC call's head, half sent: hyper's, not the NBD sniffer's, to time out.
    let mut stalled_rpc = server.raw(Transport::Tcp).await;
    stalled_rpc.write_all(b"POST /jsonrpc HTTP/1.1\r\nHost: x\r\nContent-Type: app").await.expect("write");
    let silent = server.raw(Transport::Unix).await;
    let trickle = server.raw(Transport::Unix).await;
    let (mut trickle_read, mut trickle_write) = tokio::io::split(trickle);
    let trickler = tokio::spawn(async move {
        if let Err(e) = trickle_write.write_all(b"PUT /services/SM/nbd/sr/vdi/dp HTTP/1.1\r\n").await {
            return e;
        }
        loop {
            if let Err(e) = trickle_write.write_all(b"X").await {
                return e;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });

    // Meanwhile, other callers are served.
    let client = RpcClient::new(server.tcp());
    client.call_json("SR.list", Value::Struct(vec![])).await.expect("an RPC call");
    let fd = connect_nbd(&server.unix(), "/services/SM/nbd/sr/vdi/dp").await.expect("a handover");
    assert_eq!(greeting_then_echo(fd, b"ok").await.1, b"ok");
    assert!(start.elapsed() < timeout, "served within the timeout: {:?}", start.elapsed());

    // Then each stalled connection is closed, none before the timeout and none long after.
    async fn closed(mut s: impl AsyncRead + Unpin) -> Vec<u8> {
        let mut got = Vec::new();
        // A reset is as closed as an end of stream.
        let _ = tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut got)).await.expect("closed within 20 s");
        got
    }
    assert_eq!(closed(stalled_head).await, b"", "dropped without an answer");
    assert_eq!(closed(stalled_line).await, b"");
    closed(stalled_rpc).await;
    // A caller without the secret is answered and then closed, keep-alive or not.
    let mut refused = server.raw(Transport::Tcp).await;
    refused.write_all(b"POST /jsonrpc HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}").await.expect("write");
    let answer = closed(refused).await;
    assert!(answer.starts_with(b"HTTP/1.1 401"), "{}", String::from_utf8_lossy(&answer));
    assert_eq!(closed(silent).await, b"");
    assert_eq!(closed(&mut trickle_read).await, b"");
    assert!(start.elapsed() >= timeout, "not before the timeout: {:?}", start.elapsed());
    // Its writes fail once it is dropped.
    tokio::time::timeout(Duration::from_secs(20), trickler).await.expect("the trickler stops").expect("task");
    assert_eq!(server.prepared(), 1, "only the real handover reached the handler");
    server.stop().await;
}

#[tokio::test]
async fn other_methods_and_near_miss_paths_fall_through_to_the_router() {
    let server = Server::start().await;
    let path = "/services/SM/nbd/sr/vdi/dp";
    let with = |method: &str, target: &str| format!("{method} {target} HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Length: 0\r\n\r\n").into_bytes();
    for (via, method, target, status) in [
        (Transport::Tcp, "GET", authed(path), 404),
        (Transport::Tcp, "POST", authed(path), 404),
        (Transport::Tcp, "GET", path.to_owned(), 401),
        (Transport::Unix, "GET", path.to_owned(), 404),
        (Transport::Unix, "PUT", "/services/SM/nbd".to_owned(), 404),
        (Transport::Unix, "PUT", "/services/SM/nbdproxyx/vm/sr/vdi/dp".to_owned(), 404),
        (Transport::Unix, "PUT", "/services/SM".to_owned(), 405),
        (Transport::Unix, "put", path.to_owned(), 404),
    ] {
        let r = exchange(server.raw(via).await, &with(method, &target)).await;
        assert_eq!(r.status, status, "{via} {method} {target}: {r:?}");
        if status == 404 {
            assert!(r.body.contains("the RPC paths are"), "the router's 404: {r:?}");
        }
    }
    assert_eq!(server.prepared(), 0);
    server.stop().await;
}

#[tokio::test]
async fn malformed_oversized_and_body_carrying_heads_are_refused() {
    let server = Server::start().await;
    let path = "/services/SM/nbd/sr/vdi/dp";
    let huge = format!("X-Pad: {}", "a".repeat(17 << 10));
    for (request, status) in [
        (put(path, &[&huge]), 431),
        (format!("PUT {path} HTTP/2.0\r\n\r\n").into_bytes(), 400),
        (format!("PUT {path}  HTTP/1.1\r\n\r\n").into_bytes(), 400),
        (put(path, &["Folded: a", " b"]), 400),
        (put(path, &["Content-Length: 5"]), 400),
    ] {
        let r = exchange(server.raw(Transport::Unix).await, &request).await;
        assert_eq!(r.status, status, "{:?}: {r:?}", String::from_utf8_lossy(&request[..request.len().min(80)]));
    }
    assert_eq!(server.prepared(), 0);
    // An explicit empty body is fine, and a Transfer-Encoding is ignored as xapi does.
    for headers in [&["Content-Length: 0"][..], &["Transfer-Encoding: chunked", "Cookie: chunked=true"]] {
        let mut s = server.raw(Transport::Unix).await;
        s.write_all(&put(path, headers)).await.expect("write");
        assert_eq!(read_n(&mut s, NBD_OK.len()).await, NBD_OK, "{headers:?}");
    }
    server.stop().await;
}

#[tokio::test]
async fn shutdown_waits_for_prepare_and_calls_in_flight_but_not_for_taken_over_or_idle_connections() {
    let mut server = Server::start().await;
    // A connection already taken over (its handler echoing), and an idle one.
    let taken_fd = connect_nbd(&server.unix(), "/services/SM/nbd/sr/vdi/dp").await.expect("connect_nbd");
    eventually("the handover", || server.taken() == 1).await;
    let mut idle = server.raw(Transport::Tcp).await;
    // A handover whose handler is still preparing, and an RPC call still running.
    let mut gated = server.raw(Transport::Unix).await;
    gated.write_all(&put("/services/SM/nbd/sr/vdi/gate", &[])).await.expect("write");
    let slow_client = RpcClient::new(server.tcp());
    let slow = tokio::spawn(async move { slow_client.call_json("slow", Value::Struct(vec![])).await });
    eventually("the handler preparing", || server.prepared() == 2).await;
    eventually("the slow call running", || server.rpc.calls.load(Ordering::SeqCst) == 1).await;

    server.shutdown.cancel();
    let mut stopped = tokio::spawn(server.running.take().expect("running").wait());
    // The listener goes: new connections are refused.
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(server.addr).await.is_ok() {
        assert!(Instant::now() < deadline, "the TCP listener still accepts");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The idle connection is closed without an answer; the call in flight is answered.
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), idle.read_to_end(&mut got)).await.expect("the idle connection closes").expect("read");
    assert_eq!(got, b"");
    assert_eq!(slow.await.expect("task").expect("the call in flight is answered"), Value::String("slow".into()));
    // The server waits for the handler's prepare, which then gets its 200 and the socket.
    assert!(tokio::time::timeout(Duration::from_millis(300), &mut stopped).await.is_err(), "the server waits for the handler's prepare");
    server.handover.gate.notify_one();
    assert_eq!(read_n(&mut gated, NBD_OK.len() + GREETING.len()).await, [NBD_OK, GREETING].concat());
    // It stops although the taken-over connections are still open, which still work.
    tokio::time::timeout(Duration::from_secs(10), stopped).await.expect("the server stops in time").expect("task").expect("stops cleanly");
    assert!(!server.sock.exists(), "the socket file is removed");
    assert_eq!(greeting_then_echo(taken_fd, b"still there").await, (GREETING.to_vec(), b"still there".to_vec()));
}

#[tokio::test]
async fn connect_nbd_leaves_the_greeting_in_the_socket_and_checks_the_answer() {
    /// A one-connection server that checks the request and writes `answer` in one write.
    async fn fake(answer: &'static [u8]) -> (SocketAddr, tokio::task::JoinHandle<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let task = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.expect("accept");
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                assert_eq!(s.read(&mut byte).await.expect("read"), 1, "the request head ends");
                head.push(byte[0]);
            }
            s.write_all(answer).await.expect("write");
            // Keep the connection open until the client is done with it.
            let mut rest = Vec::new();
            let _ = s.read_to_end(&mut rest).await;
            String::from_utf8(head).expect("utf8")
        });
        (addr, task)
    }

    // A 200 with the greeting in the same segment; the header matched case-insensitively.
    let (addr, task) = fake(b"HTTP/1.1 200 OK\r\ntransfer-encoding: NBD\r\n\r\nNBDMAGIC-and-more").await;
    let endpoint = Endpoint::parse(&format!("http://{addr}/prefix?session_id=s%20x")).expect("endpoint");
    let fd = connect_nbd(&endpoint, "/services/SM/nbd/a/b/c").await.expect("connect_nbd");
    let got = tokio::task::spawn_blocking(move || {
        let mut f = File::from(fd);
        let mut got = vec![0u8; 17];
        f.read_exact(&mut got).expect("read");
        got
    })
    .await
    .expect("task");
    assert_eq!(got, b"NBDMAGIC-and-more", "nothing after the head was consumed");
    let head = task.await.expect("fake server");
    assert!(head.starts_with("PUT /prefix/services/SM/nbd/a/b/c?session_id=s%20x HTTP/1.1\r\n"), "{head}");
    assert!(head.contains("\r\nContent-Length: 0\r\n") && head.contains(&format!("\r\nHost: {addr}\r\n")), "{head}");

    // A 200 that does not hand the connection over to NBD.
    let (addr, _task) = fake(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n").await;
    let e = connect_nbd(&Endpoint::parse(&format!("http://{addr}")).expect("endpoint"), "/services/SM/nbd/a/b/c").await.expect_err("not nbd");
    assert!(matches!(e.kind, CallErrorKind::Protocol(ref m) if m.contains("Transfer-encoding")), "{e:?}");
    assert_eq!(e.method, "PUT /services/SM/nbd/a/b/c");

    // A refusal without a length, ended by closing: its body is in the error.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.expect("accept");
        let mut buf = [0u8; 1024];
        let _ = s.read(&mut buf).await;
        s.write_all(b"HTTP/1.0 503 Service Unavailable\r\n\r\nbusy, try later").await.expect("write");
    });
    let e = connect_nbd(&Endpoint::parse(&format!("http://{addr}")).expect("endpoint"), "/services/SM/nbd/a/b/c").await.expect_err("refused");
    assert!(matches!(&e.kind, CallErrorKind::Status { status, body } if status.as_u16() == 503 && body == "busy, try later"), "{e:?}");

    // A server that never answers: the client's timeout.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let _keep = tokio::spawn(async move {
        let (s, _) = listener.accept().await.expect("accept");
        tokio::time::sleep(Duration::from_secs(30)).await;
        drop(s);
    });
    let client = RpcClient::new(Endpoint::parse(&format!("http://{addr}")).expect("endpoint")).with_timeout(Duration::from_millis(200));
    let e = client.connect_nbd("/services/SM/nbd/a/b/c").await.expect_err("timeout");
    assert!(matches!(e.kind, CallErrorKind::Timeout(_)), "{e:?}");

    // A path that cannot go into a request line is refused before connecting.
    let e = connect_nbd(&Endpoint::Unix(Path::new("/nonexistent").into()), "/services/SM/nbd/a b/c/d").await.expect_err("bad path");
    assert!(matches!(e.kind, CallErrorKind::Protocol(_)), "{e:?}");
}

#[tokio::test]
async fn trickled_and_pipelined_requests_are_served_either_way() {
    let server = Server::start().await;
    async fn trickle(s: &mut Box<dyn Io>, bytes: &[u8]) {
        for b in bytes {
            s.write_all(std::slice::from_ref(b)).await.expect("write");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    // A near miss that diverges only at its 26th byte: the router gets all of it back.
    let mut s = server.raw(Transport::Unix).await;
    trickle(&mut s, b"PUT /services/SM/nbdproxyz/vm/sr/vdi/dp HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Length: 0\r\n\r\n").await;
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut raw)).await.expect("answered").expect("read");
    let text = String::from_utf8_lossy(&raw);
    assert!(text.starts_with("HTTP/1.1 404") && text.contains("no such path /services/SM/nbdproxyz/vm/sr/vdi/dp:"), "{text}");

    // An NBD PUT a byte at a time.
    let mut s = server.raw(Transport::Tcp).await;
    trickle(&mut s, &put(&authed("/services/SM/nbd/sr/vdi/dp"), &[])).await;
    assert_eq!(read_n(&mut s, NBD_OK.len() + GREETING.len()).await, [NBD_OK, GREETING].concat());
    assert_eq!(server.prepared(), 1);

    // Two JSON-RPC calls in one write on a kept-alive connection.
    let call = |id: u32, last: bool| {
        let body = format!(r#"{{"jsonrpc":"2.0","method":"SR.list","params":[{{}}],"id":{id}}}"#);
        let close = if last { "Connection: close\r\n" } else { "" };
        format!("POST /jsonrpc HTTP/1.1\r\nHost: t\r\n{close}Content-Length: {}\r\n\r\n{body}", body.len())
    };
    let mut s = server.raw(Transport::Unix).await;
    s.write_all(format!("{}{}", call(1, false), call(2, true)).as_bytes()).await.expect("write");
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut raw)).await.expect("answered").expect("read");
    let text = String::from_utf8_lossy(&raw);
    assert_eq!(text.matches("HTTP/1.1 200 OK").count(), 2, "{text}");
    assert!(text.contains(r#""id":1"#) && text.contains(r#""id":2"#), "{text}");
    assert_eq!(server.rpc.calls.load(Ordering::SeqCst), 2);
    server.stop().await;
}

/// Hands each socket to a real NBD server in another process: `nbdkit -s memory 1M`, which
/// serves one client on its stdin and stdout. Records how each nbdkit ended.
#[derive(Default)]
struct Nbdkit {
    exits: Mutex<Vec<String>>,
}

impl NbdHandover for Nbdkit {
    type Prepared = ();

    async fn prepare(&self, _req: NbdRequest, _transport: Transport) -> Result<(), HandoverError> {
        Ok(())
    }

    async fn take_over(&self, (): (), conn: OwnedFd) {
        let run = move || -> std::io::Result<std::process::ExitStatus> {
            let out = conn.try_clone()?;
            std::process::Command::new("/usr/bin/nbdkit").args(["-s", "--exit-with-parent", "memory", "1M"]).stdin(conn).stdout(out).spawn()?.wait()
        };
        let status = tokio::task::spawn_blocking(run).await.expect("task");
        let ended = match status {
            Ok(s) if s.success() => "exit 0".to_owned(),
            other => format!("{other:?}"),
        };
        self.exits.lock().expect("lock").push(ended);
    }
}

#[tokio::test]
async fn an_nbd_server_in_another_process_serves_the_handed_over_socket() {
    if !Path::new("/usr/bin/nbdkit").exists() {
        eprintln!("skipping: /usr/bin/nbdkit not found");
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let mut cfg = ServerConfig::new(SECRET);
    cfg.tcp = Some("127.0.0.1:0".parse().expect("addr"));
    cfg.unix = Some(dir.path().join("sxm.sock"));
    let shutdown = CancellationToken::new();
    let nbdkit = Arc::new(Nbdkit::default());
    let running = serve_with(&cfg, Arc::new(Rpc::default()), nbdkit.clone(), shutdown.clone()).await.expect("serve");
    let tcp = Endpoint::parse(&format!("http://{}", running.tcp_addr().expect("tcp"))).expect("endpoint").with_secret(SECRET);
    for endpoint in [tcp, Endpoint::Unix(dir.path().join("sxm.sock"))] {
        let fd = connect_nbd(&endpoint, "/services/SM/nbdproxy/import/vm/sr/vdi/dp").await.expect("connect_nbd");
        tokio::task::spawn_blocking(move || nbd_write_then_read(File::from(fd))).await.expect("NBD client");
    }
    eventually("both nbdkits to exit", || nbdkit.exits.lock().expect("lock").len() == 2).await;
    assert_eq!(*nbdkit.exits.lock().expect("lock"), vec!["exit 0"; 2]);
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), running.wait()).await.expect("stops in time").expect("stops cleanly");
}

/// A minimal fixed-newstyle NBD client (the NBD protocol document's wire format): negotiate
/// with `NBD_OPT_EXPORT_NAME`, write a block, read it back, disconnect.
fn nbd_write_then_read(mut f: File) {
    let mut greeting = [0u8; 18];
    f.read_exact(&mut greeting).expect("greeting");
    assert_eq!(&greeting[..16], b"NBDMAGICIHAVEOPT", "a fixed-newstyle greeting right after the 200");
    let no_zeroes = u16::from_be_bytes([greeting[16], greeting[17]]) & 2 != 0;
    let client_flags: u32 = if no_zeroes { 3 } else { 1 };
    f.write_all(&client_flags.to_be_bytes()).expect("flags");
    f.write_all(&[&b"IHAVEOPT"[..], &1u32.to_be_bytes(), &0u32.to_be_bytes()].concat()).expect("NBD_OPT_EXPORT_NAME");
    let mut export = vec![0u8; if no_zeroes { 10 } else { 134 }];
    f.read_exact(&mut export).expect("export");
    assert_eq!(u64::from_be_bytes(export[..8].try_into().expect("8 bytes")), 1 << 20, "the export's size");

    let request = |ty: u16, handle: u64, len: u32| [&0x2560_9513u32.to_be_bytes()[..], &0u16.to_be_bytes(), &ty.to_be_bytes(), &handle.to_be_bytes(), &4096u64.to_be_bytes(), &len.to_be_bytes()].concat();
    let reply = |f: &mut File, handle: u64| {
        let mut r = [0u8; 16];
        f.read_exact(&mut r).expect("reply");
        assert_eq!(r, *[&0x6744_6698u32.to_be_bytes()[..], &0u32.to_be_bytes(), &handle.to_be_bytes()].concat().as_slice(), "a simple reply without error");
    };
    let block: Vec<u8> = (0..512u32).map(|i| (i % 251) as u8).collect();
    f.write_all(&[request(1, 7, 512), block.clone()].concat()).expect("NBD_CMD_WRITE");
    reply(&mut f, 7);
    f.write_all(&request(0, 8, 512)).expect("NBD_CMD_READ");
    reply(&mut f, 8);
    let mut back = vec![0u8; 512];
    f.read_exact(&mut back).expect("read data");
    assert_eq!(back, block);
    f.write_all(&request(2, 9, 0)).expect("NBD_CMD_DISC");
}
