//! The HTTP server and client over real sockets: a real server with a small `Dispatch` that
//! echoes its call and counts it, called by our client, by hand-written HTTP bytes (to pin the
//! exact envelopes), and by curl when it is installed.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::json;
use sxm_engine::http::envelope::{self, INVALID_REQUEST, PARSE_ERROR};
use sxm_engine::http::{Bound, CallErrorKind, Dispatch, Endpoint, JsonVersion, RpcClient, Running, ServeError, ServerConfig, Transport, router, serve};
use sxm_engine::model::StorageError;
use sxm_engine::rpc::{Value, xmlrpc};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio_util::sync::CancellationToken;

const SECRET: &str = "host-secret-42";
/// Small, so the oversized-body test stays cheap.
const MAX_BODY: usize = 64 * 1024;

/// Echoes `{method, params}`, counts calls, fails `fail` and panics on `panic`.
#[derive(Default)]
struct Echo {
    calls: AtomicUsize,
}

impl Dispatch for Echo {
    async fn dispatch(&self, method: String, params: Vec<Value>) -> Result<Value, StorageError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        match method.as_str() {
            "fail" => Err(does_not_exist()),
            "panic" => panic!("the test dispatch panics on purpose"),
            _ => Ok(Value::Struct(vec![("method".into(), Value::String(method)), ("params".into(), Value::Array(params))])),
        }
    }
}

fn does_not_exist() -> StorageError {
    StorageError::DoesNotExist("mirror".into(), "sr/vdi".into())
}

/// A directory of its own under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!("sxm-http-{}-{}", std::process::id(), N.fetch_add(1, Ordering::SeqCst)));
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running server on 127.0.0.1:0 and a Unix socket.
struct Server {
    echo: Arc<Echo>,
    shutdown: CancellationToken,
    running: Option<Running>,
    addr: SocketAddr,
    sock: PathBuf,
    _dir: TempDir,
}

impl Server {
    async fn start() -> Server {
        Server::with_head_timeout(ServerConfig::new(SECRET).head_timeout).await
    }

    async fn with_head_timeout(head_timeout: Duration) -> Server {
        Server::with_limits(head_timeout, ServerConfig::new(SECRET).max_connections).await
    }

    async fn with_limits(head_timeout: Duration, max_connections: usize) -> Server {
        let dir = TempDir::new();
        let sock = dir.0.join("sxm.sock");
        let mut cfg = ServerConfig::new(SECRET);
        cfg.tcp = Some("127.0.0.1:0".parse().expect("addr"));
        cfg.unix = Some(sock.clone());
        cfg.max_body = MAX_BODY;
        cfg.head_timeout = head_timeout;
        cfg.max_connections = max_connections;
        let echo = Arc::new(Echo::default());
        let shutdown = CancellationToken::new();
        let running = serve(&cfg, echo.clone(), shutdown.clone()).await.expect("serve");
        let addr = running.tcp_addr().expect("tcp bound");
        assert_eq!(running.unix_path(), Some(sock.as_path()));
        Server { echo, shutdown, running: Some(running), addr, sock, _dir: dir }
    }

    fn calls(&self) -> usize {
        self.echo.calls.load(Ordering::SeqCst)
    }

    fn tcp(&self) -> Endpoint {
        Endpoint::parse(&format!("http://{}", self.addr)).expect("endpoint").with_secret(SECRET)
    }

    fn unix(&self) -> Endpoint {
        Endpoint::Unix(self.sock.clone())
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

fn args() -> Value {
    Value::Struct(vec![
        ("dbg".into(), Value::String("test ☺ <&>".into())),
        ("sr".into(), Value::String("sr-uuid".into())),
        ("similar".into(), Value::Array(vec![Value::String("a".into()), Value::String("b".into())])),
        ("sharable".into(), Value::Bool(false)),
        ("sm_config".into(), Value::Struct(vec![])),
    ])
}

fn echoed(method: &str, params: &Value) -> Value {
    Value::Struct(vec![("method".into(), Value::String(method.into())), ("params".into(), Value::Array(vec![params.clone()]))])
}

/// One HTTP exchange written by hand: (status, lower-cased headers, body).
struct Reply {
    status: u16,
    headers: HashMap<String, String>,
    body: Vec<u8>,
}

impl Reply {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("reply is not JSON ({e}): {}", self.text()))
    }

    /// The storage error in an XML-RPC `Failure`.
    fn xml_failure(&self) -> StorageError {
        let v = xmlrpc::parse_response(&self.text()).expect("an XML-RPC reply");
        let e = envelope::parse_xml_reply(v).expect("a status struct").expect_err("a failure");
        StorageError::from_value(&e).expect("a storage error")
    }
}

fn request(method: &str, target: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut out = format!("{method} {target} HTTP/1.1\r\nHost: test\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
    for (k, v) in headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    out.push_str("\r\n");
    let mut out = out.into_bytes();
    out.extend_from_slice(body);
    out
}

/// Writes `req` and reads the reply to the end, failing (not hanging) if the server never ends it.
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, req: &[u8]) -> Reply {
    let io = async {
        s.write_all(req).await.expect("write request");
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await.expect("read reply");
        raw
    };
    let raw = tokio::time::timeout(Duration::from_secs(30), io).await.expect("the server replies and closes within 30 s");
    parse_reply(&raw)
}

fn parse_reply(raw: &[u8]) -> Reply {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or_else(|| panic!("no header end in {:?}", String::from_utf8_lossy(raw)));
    let head = std::str::from_utf8(&raw[..split]).expect("header text");
    let mut lines = head.split("\r\n");
    let status = lines.next().and_then(|l| l.split(' ').nth(1)).and_then(|s| s.parse().ok()).expect("status line");
    let headers = lines.filter_map(|l| l.split_once(':')).map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned())).collect();
    Reply { status, headers, body: raw[split + 4..].to_vec() }
}

async fn tcp_raw(addr: SocketAddr, req: &[u8]) -> Reply {
    exchange(TcpStream::connect(addr).await.expect("connect"), req).await
}

async fn unix_raw(path: &Path, req: &[u8]) -> Reply {
    exchange(UnixStream::connect(path).await.expect("connect"), req).await
}

fn xml_call(method: &str) -> Vec<u8> {
    xmlrpc::encode_call(method, &[args()]).into_bytes()
}

fn authed_sm() -> String {
    format!("/services/SM?session_id={SECRET}")
}

#[tokio::test]
async fn xml_rpc_round_trips_over_tcp_and_the_unix_socket() {
    let server = Server::start().await;
    for endpoint in [server.tcp(), server.unix()] {
        let client = RpcClient::new(endpoint.clone());
        let got = client.call_xml("VDI.attach3", args()).await.unwrap_or_else(|e| panic!("{endpoint}: {e:?}"));
        assert_eq!(got, echoed("VDI.attach3", &args()), "{endpoint}");
        let err = client.call_xml("fail", args()).await.expect_err("fail fails");
        assert_eq!(err.storage(), Some(&does_not_exist()), "{endpoint}: {err:?}");
        assert_eq!((err.method.as_str(), err.endpoint.clone()), ("fail", endpoint.to_string()));
    }
    assert_eq!(server.calls(), 4);
    server.stop().await;
}

#[tokio::test]
async fn json_rpc_round_trips_in_both_versions_over_both_transports() {
    let server = Server::start().await;
    // Integers survive JSON (XML-RPC as xapi writes it would turn them into strings).
    let params = Value::Struct(vec![("size".into(), Value::Int(21_474_836_480)), ("dbg".into(), Value::String("x".into())), ("none".into(), Value::Null)]);
    for endpoint in [server.tcp(), server.unix()] {
        for version in [JsonVersion::V1, JsonVersion::V2] {
            let client = RpcClient::new(endpoint.clone()).with_json_version(version);
            let got = client.call_json("DATA.MIRROR.stat", params.clone()).await.unwrap_or_else(|e| panic!("{endpoint} {version:?}: {e:?}"));
            assert_eq!(got, echoed("DATA.MIRROR.stat", &params), "{endpoint} {version:?}");
            let err = client.call_json("fail", params.clone()).await.expect_err("fail fails");
            assert_eq!(err.storage(), Some(&does_not_exist()), "{endpoint} {version:?}: {err:?}");
        }
    }
    assert_eq!(server.calls(), 8);
    server.stop().await;
}

#[tokio::test]
async fn json_envelopes_have_xapis_exact_shape() {
    let server = Server::start().await;
    let bearer = format!("Bearer {SECRET}");
    let auth = [("Authorization", bearer.as_str()), ("Content-Type", "application/json")];
    let post = |path: &'static str, body: serde_json::Value| request("POST", path, &auth, body.to_string().as_bytes());

    // 1.0 success: both members, error null.
    let r = tcp_raw(server.addr, &post("/jsonrpc", json!({"method":"SR.list","params":[{"dbg":"d"}],"id":7}))).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.headers.get("content-type").map(String::as_str), Some("application/json"));
    assert_eq!(r.json(), json!({"result":{"method":"SR.list","params":[{"dbg":"d"}]},"error":null,"id":7}));

    // 1.0 failure: result null, the error as the bare variant.
    let r = tcp_raw(server.addr, &post("/jsonrpc", json!({"method":"fail","params":[{}],"id":8}))).await;
    assert_eq!(r.json(), json!({"result":null,"error":["Does_not_exist",["mirror","sr/vdi"]],"id":8}));

    // 2.0 success on `/`: jsonrpc member, no error member, a string id echoed as a string.
    let r = tcp_raw(server.addr, &post("/", json!({"jsonrpc":"2.0","method":"SR.list","params":{"dbg":"d"},"id":"abc"}))).await;
    let j = r.json();
    assert_eq!(j, json!({"jsonrpc":"2.0","result":{"method":"SR.list","params":[{"dbg":"d"}]},"id":"abc"}));
    assert!(j.get("error").is_none(), "{j}");

    // 2.0 failure: xapi's error object, no result member.
    let r = tcp_raw(server.addr, &post("/jsonrpc", json!({"jsonrpc":"2.0","method":"fail","params":[{}],"id":9}))).await;
    let j = r.json();
    assert_eq!(j, json!({"jsonrpc":"2.0","error":{"code":1,"message":"Does_not_exist","data":[["mirror","sr/vdi"]]},"id":9}));
    assert!(j.get("result").is_none(), "{j}");
    assert_eq!(server.calls(), 4);
    server.stop().await;
}

#[tokio::test]
async fn xml_replies_are_status_structs_never_faults() {
    let server = Server::start().await;
    let r = tcp_raw(server.addr, &request("POST", &authed_sm(), &[("Content-Type", "text/xml")], &xml_call("fail"))).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.headers.get("content-type").map(String::as_str), Some("text/xml"));
    assert_eq!(
        r.text(),
        "<?xml version=\"1.0\"?><methodResponse><params><param><value><struct><member><name>Status</name><value>Failure</value></member><member><name>ErrorDescription</name><value><array><data><value>Does_not_exist</value><value><array><data><value>mirror</value><value>sr/vdi</value></data></array></value></data></array></value></member></struct></value></param></params></methodResponse>"
    );
    let r = tcp_raw(server.addr, &request("POST", &authed_sm(), &[], &xmlrpc::encode_call("SR.list", &[Value::Struct(vec![("dbg".into(), Value::String("d".into()))])]).into_bytes())).await;
    assert_eq!(
        r.text(),
        "<?xml version=\"1.0\"?><methodResponse><params><param><value><struct><member><name>Status</name><value>Success</value></member><member><name>Value</name><value><struct><member><name>method</name><value>SR.list</value></member><member><name>params</name><value><array><data><value><struct><member><name>dbg</name><value>d</value></member></struct></value></data></array></value></member></struct></value></member></struct></value></param></params></methodResponse>"
    );
    server.stop().await;
}

#[tokio::test]
async fn notifications_run_unanswered_and_batches_answer_each_call() {
    let server = Server::start().await;
    let bearer = format!("Bearer {SECRET}");
    let auth = [("Authorization", bearer.as_str())];

    let r = tcp_raw(server.addr, &request("POST", "/jsonrpc", &auth, json!({"jsonrpc":"2.0","method":"SR.list","params":[{}]}).to_string().as_bytes())).await;
    assert_eq!((r.status, r.body.len()), (204, 0), "{}", r.text());
    assert_eq!(server.calls(), 1, "a notification still runs");

    let batch = json!([
        {"jsonrpc":"2.0","method":"SR.list","params":[{}],"id":1},
        {"jsonrpc":"2.0","method":"SR.scan","params":[{}]},
        {"method":"fail","params":[{}],"id":"x"},
        5
    ]);
    let r = tcp_raw(server.addr, &request("POST", "/jsonrpc", &auth, batch.to_string().as_bytes())).await;
    assert_eq!(r.status, 200);
    let replies = r.json();
    let replies = replies.as_array().expect("a batch reply is an array");
    assert_eq!(replies.len(), 3, "one reply per call, none for the notification: {replies:?}");
    assert_eq!(replies[0], json!({"jsonrpc":"2.0","result":{"method":"SR.list","params":[{}]},"id":1}));
    assert_eq!(replies[1], json!({"result":null,"error":["Does_not_exist",["mirror","sr/vdi"]],"id":"x"}));
    assert_eq!((replies[2]["id"].clone(), replies[2]["error"]["code"].clone()), (serde_json::Value::Null, json!(INVALID_REQUEST)));
    assert_eq!(server.calls(), 4, "the batch ran its three calls");
    server.stop().await;
}

#[tokio::test]
async fn tcp_callers_without_the_secret_get_401_and_nothing_runs() {
    let server = Server::start().await;
    let json_body = json!({"method":"SR.list","params":[{}],"id":1}).to_string();

    let r = tcp_raw(server.addr, &request("POST", "/services/SM", &[], &xml_call("SR.list"))).await;
    assert_eq!(r.status, 401);
    assert!(r.headers.contains_key("www-authenticate"));
    assert!(matches!(r.xml_failure(), StorageError::InternalError(m) if m.starts_with("unauthorised")));

    let r = tcp_raw(server.addr, &request("POST", "/services/SM?session_id=wrong", &[], &xml_call("SR.list"))).await;
    assert_eq!(r.status, 401);
    let r = tcp_raw(server.addr, &request("POST", "/services/SM?session_id=", &[], &xml_call("SR.list"))).await;
    assert_eq!(r.status, 401);

    let r = tcp_raw(server.addr, &request("POST", "/jsonrpc", &[], json_body.as_bytes())).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["error"]["data"][0].as_str().map(|m| m.starts_with("unauthorised")), Some(true), "{}", r.text());
    let r = tcp_raw(server.addr, &request("POST", "/jsonrpc", &[("Authorization", "Bearer wrong")], json_body.as_bytes())).await;
    assert_eq!(r.status, 401);
    let r = tcp_raw(server.addr, &request("POST", "/jsonrpc", &[("Authorization", &format!("Basic {SECRET}"))], json_body.as_bytes())).await;
    assert_eq!(r.status, 401, "only a bearer token counts");
    // A secret that only begins like ours is not ours.
    let r = tcp_raw(server.addr, &request("POST", &format!("/services/SM?session_id={}", &SECRET[..5]), &[], &xml_call("SR.list"))).await;
    assert_eq!(r.status, 401);
    // Unknown paths are behind the check too.
    let r = tcp_raw(server.addr, &request("GET", "/nothing", &[], b"")).await;
    assert_eq!(r.status, 401);

    // Our client without, or with the wrong, secret.
    let no_secret = Endpoint::parse(&format!("http://{}", server.addr)).expect("endpoint");
    for endpoint in [no_secret.clone(), no_secret.with_secret("wrong")] {
        let client = RpcClient::new(endpoint);
        let e = client.call_json("SR.list", args()).await.expect_err("refused");
        assert!(matches!(e.kind, CallErrorKind::Unauthorised), "{e:?}");
        let e = client.call_xml("SR.list", args()).await.expect_err("refused");
        assert!(matches!(e.kind, CallErrorKind::Unauthorised), "{e:?}");
    }
    assert_eq!(server.calls(), 0, "no refused call reached dispatch");
    server.stop().await;
}

#[tokio::test]
async fn either_credential_is_accepted_on_tcp() {
    let server = Server::start().await;
    let r = tcp_raw(server.addr, &request("POST", &authed_sm(), &[], &xml_call("SR.list"))).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let bearer = format!("Bearer {SECRET}");
    let r = tcp_raw(server.addr, &request("POST", "/services/SM", &[("Authorization", &bearer)], &xml_call("SR.list"))).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = tcp_raw(server.addr, &request("POST", &format!("/jsonrpc?session_id={SECRET}"), &[], json!({"method":"SR.list","params":[{}],"id":1}).to_string().as_bytes())).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(server.calls(), 3);
    server.stop().await;
}

#[tokio::test]
async fn the_unix_socket_needs_no_secret_and_is_private() {
    let server = Server::start().await;
    let mode = std::fs::metadata(&server.sock).expect("socket").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "socket mode {mode:o}");
    let r = unix_raw(&server.sock, &request("POST", "/services/SM", &[], &xml_call("SR.list"))).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = unix_raw(&server.sock, &request("POST", "/jsonrpc", &[], json!({"method":"SR.list","params":[{}],"id":1}).to_string().as_bytes())).await;
    assert_eq!(r.json()["error"], serde_json::Value::Null);
    assert_eq!(server.calls(), 2);
    server.stop().await;
}

#[tokio::test]
async fn bad_requests_are_refused_clearly_change_nothing_and_the_server_answers_next() {
    let server = Server::start().await;
    let bearer = format!("Bearer {SECRET}");
    let auth = [("Authorization", bearer.as_str())];

    // Malformed XML: a Failure with Internal_error naming the byte.
    let r = tcp_raw(server.addr, &request("POST", &authed_sm(), &[], b"<methodCall><methodName>SR.list</methodName><params><param>")).await;
    assert_eq!(r.status, 200);
    assert!(matches!(r.xml_failure(), StorageError::InternalError(m) if m.contains("malformed XML-RPC") && m.contains("byte")), "{}", r.text());
    // Not UTF-8.
    let r = tcp_raw(server.addr, &request("POST", &authed_sm(), &[], b"<methodCall>\xff\xfe</methodCall>")).await;
    assert!(matches!(r.xml_failure(), StorageError::InternalError(m) if m.contains("UTF-8")), "{}", r.text());

    // Malformed JSON: a 2.0 parse error still carrying the Internal_error.
    let r = tcp_raw(server.addr, &request("POST", "/jsonrpc", &auth, b"{\"method\": ")).await;
    assert_eq!(r.status, 200);
    let j = r.json();
    assert_eq!((j["error"]["code"].clone(), j["error"]["message"].clone(), j["id"].clone()), (json!(PARSE_ERROR), json!("Internal_error"), serde_json::Value::Null), "{j}");
    assert!(j["error"]["data"][0].as_str().is_some_and(|m| m.contains("not JSON")), "{j}");
    // JSON that is not a request object.
    for body in ["42", "\"SR.list\"", "null"] {
        let r = tcp_raw(server.addr, &request("POST", "/jsonrpc", &auth, body.as_bytes())).await;
        let j = r.json();
        assert_eq!(j["error"]["code"], json!(INVALID_REQUEST), "{body}: {j}");
        assert!(j["error"]["data"][0].as_str().is_some_and(|m| m.contains("expected an object")), "{body}: {j}");
    }
    // A 1.0 request without a method is answered in 1.0, with its id.
    let r = tcp_raw(server.addr, &request("POST", "/jsonrpc", &auth, br#"{"params":[{}],"id":3}"#)).await;
    assert_eq!(r.json(), json!({"result":null,"error":["Internal_error","malformed JSON-RPC request: no \"method\""],"id":3}));

    // Oversized, declared: refused before the body is read.
    let r = tcp_raw(server.addr, format!("POST /jsonrpc HTTP/1.1\r\nHost: t\r\nAuthorization: {bearer}\r\nContent-Length: {}\r\n\r\n", MAX_BODY + 1).as_bytes()).await;
    assert_eq!(r.status, 413);
    assert!(r.text().contains(&format!("limit is {MAX_BODY} bytes")), "{}", r.text());
    // Oversized, chunked: refused once the limit is crossed.
    let mut chunked = format!("POST /services/SM?session_id={SECRET} HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n").into_bytes();
    let chunk = vec![b'x'; 16 * 1024];
    for _ in 0..(MAX_BODY / chunk.len() + 1) {
        chunked.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        chunked.extend_from_slice(&chunk);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let r = tcp_raw(server.addr, &chunked).await;
    assert_eq!(r.status, 413, "{}", r.text());

    // Wrong path, wrong method.
    let r = tcp_raw(server.addr, &request("POST", &format!("/services/XX?session_id={SECRET}"), &[], &xml_call("SR.list"))).await;
    assert_eq!(r.status, 404);
    assert!(r.text().contains("/services/XX") && !r.text().contains(SECRET), "{}", r.text());
    let r = tcp_raw(server.addr, &request("GET", &authed_sm(), &[], b"")).await;
    assert_eq!(r.status, 405);
    assert_eq!(r.headers.get("allow").map(String::as_str), Some("POST"));
    assert!(r.text().contains("GET is not allowed"), "{}", r.text());
    let r = tcp_raw(server.addr, &request("PUT", "/jsonrpc", &auth, b"{}")).await;
    assert_eq!(r.status, 405);

    assert_eq!(server.calls(), 0, "no bad request reached dispatch");
    let got = RpcClient::new(server.tcp()).call_json("SR.list", args()).await.expect("the next call works");
    assert_eq!(got, echoed("SR.list", &args()));
    assert_eq!(server.calls(), 1);
    server.stop().await;
}

#[tokio::test]
async fn a_panicking_call_is_an_internal_error_and_the_server_lives_on() {
    let server = Server::start().await;
    let client = RpcClient::new(server.tcp());
    let e = client.call_xml("panic", args()).await.expect_err("panics");
    assert!(matches!(e.storage(), Some(StorageError::InternalError(m)) if m.contains("panicked") && m.contains("on purpose")), "{e:?}");
    assert_eq!(client.call_json("SR.list", args()).await.expect("alive"), echoed("SR.list", &args()));
    server.stop().await;
}

#[tokio::test]
async fn client_transport_failures_say_where_and_what() {
    // A port nobody listens on: bind one, learn its number, close it.
    let addr = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr");
    let e = RpcClient::new(Endpoint::parse(&format!("http://{addr}")).expect("endpoint")).call_json("SR.list", args()).await.expect_err("nobody there");
    assert!(matches!(e.kind, CallErrorKind::Connect(_)), "{e:?}");
    assert_eq!(e.to_string(), format!("Calling SR.list on http://{addr}"));

    // A peer that accepts and never answers.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = silent.local_addr().expect("addr");
    let holder = tokio::spawn(async move {
        let (conn, _) = silent.accept().await.expect("accept");
        tokio::time::sleep(Duration::from_secs(30)).await;
        drop(conn);
    });
    let client = RpcClient::new(Endpoint::parse(&format!("http://{addr}")).expect("endpoint")).with_timeout(Duration::from_millis(200));
    let e = client.call_xml("SR.list", args()).await.expect_err("times out");
    assert!(matches!(e.kind, CallErrorKind::Timeout(_)), "{e:?}");
    holder.abort();

    // A Unix socket path with nothing there.
    let dir = TempDir::new();
    let e = RpcClient::new(Endpoint::Unix(dir.0.join("none.sock"))).call_json("SR.list", args()).await.expect_err("no socket");
    assert!(matches!(e.kind, CallErrorKind::Connect(_)), "{e:?}");
}

#[tokio::test]
async fn socket_housekeeping_replaces_only_stale_sockets_and_cleans_up() {
    let dir = TempDir::new();
    let path = dir.0.join("s.sock");
    let unix_only = |p: &Path| {
        let mut cfg = ServerConfig::new("");
        cfg.unix = Some(p.to_path_buf());
        cfg
    };

    // A regular file is left alone.
    std::fs::write(&path, b"precious").expect("write");
    assert!(matches!(Bound::bind(&unix_only(&path)).await, Err(ServeError::NotASocket { .. })));
    assert_eq!(std::fs::read(&path).expect("still there"), b"precious");
    std::fs::remove_file(&path).expect("remove");

    // A stale socket (its listener gone) is replaced.
    drop(std::os::unix::net::UnixListener::bind(&path).expect("stale socket"));
    assert!(path.exists());
    let token = CancellationToken::new();
    let running = serve(&unix_only(&path), Arc::new(Echo::default()), token.clone()).await.expect("replaces a stale socket");
    assert_eq!(std::fs::metadata(&path).expect("socket").permissions().mode() & 0o777, 0o600);

    // A live one is not.
    assert!(matches!(Bound::bind(&unix_only(&path)).await, Err(ServeError::SocketInUse { .. })));
    let r = unix_raw(&path, &request("POST", "/jsonrpc", &[], br#"{"method":"x","params":[],"id":1}"#)).await;
    assert_eq!(r.status, 200, "the first server still answers");

    token.cancel();
    tokio::time::timeout(Duration::from_secs(10), running.wait()).await.expect("stops in time").expect("stops cleanly");
    assert!(!path.exists(), "the socket file is removed at shutdown");

    // Configurations that cannot be served safely.
    let mut cfg = ServerConfig::new("");
    cfg.tcp = Some("127.0.0.1:0".parse().expect("addr"));
    assert!(matches!(Bound::bind(&cfg).await, Err(ServeError::EmptySecret)));
    assert!(matches!(Bound::bind(&ServerConfig::new(SECRET)).await, Err(ServeError::NoListener)));
}

#[tokio::test]
async fn routes_merged_into_the_router_sit_behind_the_secret() {
    // Merge into `router`, then `Bound::run`. Without an NBD handover the NBD paths are the
    // router's like any other, so a merged route answers them (tests/nbd_put.rs has the handover).
    let mut cfg = ServerConfig::new(SECRET);
    cfg.tcp = Some("127.0.0.1:0".parse().expect("addr"));
    let bound = Bound::bind(&cfg).await.expect("bind");
    let addr = bound.tcp_addr().expect("tcp");
    let extra = axum::Router::new().route("/services/SM/nbd/{export}", axum::routing::put(|| async { "merged" }));
    let token = CancellationToken::new();
    let task = tokio::spawn(bound.run(router(Arc::new(Echo::default()), cfg.max_body).merge(extra), token.clone()));

    let r = tcp_raw(addr, &request("PUT", "/services/SM/nbd/vdi1", &[], b"")).await;
    assert_eq!(r.status, 401);
    let r = tcp_raw(addr, &request("PUT", &format!("/services/SM/nbd/vdi1?session_id={SECRET}"), &[], b"")).await;
    assert_eq!((r.status, r.text()), (200, "merged".to_owned()));
    let r = tcp_raw(addr, &request("POST", &authed_sm(), &[], &xml_call("SR.list"))).await;
    assert_eq!(r.status, 200, "the RPC routes are still there");

    token.cancel();
    tokio::time::timeout(Duration::from_secs(10), task).await.expect("stops in time").expect("no panic").expect("stops cleanly");
}

#[tokio::test]
async fn curl_posts_an_xml_rpc_call() {
    let curl = Path::new("/usr/bin/curl");
    if !curl.exists() {
        eprintln!("skipping: /usr/bin/curl not found");
        return;
    }
    let server = Server::start().await;
    let url = format!("http://{}/services/SM?session_id={SECRET}", server.addr);
    let bare = format!("http://{}/services/SM", server.addr);
    let sock = server.sock.clone();
    let body = xml_call("SR.list");
    let (tcp, unix, refused) = tokio::task::spawn_blocking(move || {
        let run = |extra: &[&str], url: &str| {
            let mut child = std::process::Command::new("/usr/bin/curl")
                .args(["--silent", "--show-error", "--max-time", "20", "--write-out", "\n%{http_code}", "-H", "Content-Type: text/xml", "--data-binary", "@-"])
                .args(extra)
                .arg(url)
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .expect("run curl");
            std::io::Write::write_all(&mut child.stdin.take().expect("stdin"), &body).expect("write body");
            let out = child.wait_with_output().expect("curl output");
            assert!(out.status.success(), "curl failed: {out:?}");
            String::from_utf8(out.stdout).expect("utf-8")
        };
        let sock = sock.to_str().expect("socket path").to_owned();
        (run(&[], &url), run(&["--unix-socket", &sock], "http://localhost/services/SM"), run(&[], &bare))
    })
    .await
    .expect("curl task");

    for out in [&tcp, &unix] {
        let (body, code) = out.rsplit_once('\n').expect("status line");
        assert_eq!(code, "200", "{out}");
        let reply = envelope::parse_xml_reply(xmlrpc::parse_response(body).expect("XML reply")).expect("status struct").expect("success");
        assert_eq!(reply, echoed("SR.list", &args()));
    }
    assert!(refused.ends_with("\n401"), "{refused}");
    assert_eq!(server.calls(), 2);
    server.stop().await;
}

/// A caller that sends its head and part of its body, then nothing, is answered 408 and its
/// connection closed once the body has been quiet for the head timeout: it used to hold the
/// connection (and a descriptor) until the caller went away. Nothing runs; a caller that
/// trickles its body slowly but steadily is served.
#[tokio::test]
async fn a_body_that_stalls_is_answered_408_and_its_connection_closed() {
    let stall = Duration::from_millis(1500);
    let server = Server::with_head_timeout(stall).await;
    let body = xml_call("SR.list");
    let mut whole = request("POST", &authed_sm(), &[("Content-Type", "text/xml")], &body);
    let head_len = whole.len() - body.len();
    let start = std::time::Instant::now();
    for half in [false, true] {
        let mut s = TcpStream::connect(server.addr).await.expect("connect");
        s.write_all(&whole[..head_len + if half { body.len() / 2 } else { 0 }]).await.expect("write");
        let mut raw = Vec::new();
        tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut raw)).await.expect("the server closes the connection").expect("read");
        let reply = parse_reply(&raw);
        assert_eq!(reply.status, 408, "{}", String::from_utf8_lossy(&reply.body));
        assert!(String::from_utf8_lossy(&reply.body).contains("stalled"), "{}", String::from_utf8_lossy(&reply.body));
    }
    assert!(start.elapsed() >= stall, "answered before the body had stalled");
    assert_eq!(server.calls(), 0, "a call ran from half a body");

    // Slow but steady: a byte every 100 ms is never a stall.
    let mut s = TcpStream::connect(server.addr).await.expect("connect");
    let (head, rest) = whole.split_at_mut(head_len);
    s.write_all(head).await.expect("head");
    for chunk in rest.chunks(rest.len().div_ceil(20)) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        s.write_all(chunk).await.expect("body");
    }
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut raw)).await.expect("reply").expect("read");
    assert_eq!(parse_reply(&raw).status, 200);
    assert_eq!(server.calls(), 1);
    server.stop().await;
}

/// Connections beyond `max_connections` are closed as soon as they are accepted, so callers
/// that never send a request (no secret checked yet) cannot hold every descriptor of the host
/// for a head timeout at a time; once some end, calls are served again.
#[tokio::test]
async fn connections_beyond_the_limit_are_closed_at_once_and_the_server_recovers() {
    const LIMIT: usize = 8;
    let server = Server::with_limits(Duration::from_secs(30), LIMIT).await;
    let mut idle = Vec::new();
    for _ in 0..LIMIT {
        idle.push(TcpStream::connect(server.addr).await.expect("connect"));
    }
    // Give the server the time to take them all in.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut extra = TcpStream::connect(server.addr).await.expect("connect");
    let mut buf = [0u8; 16];
    let closed = tokio::time::timeout(Duration::from_secs(5), extra.read(&mut buf)).await;
    assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "a connection over the limit was kept: {closed:?}");
    drop(idle);
    let mut served = false;
    for _ in 0..50 {
        let reply = tokio::time::timeout(Duration::from_secs(5), async {
            let mut s = TcpStream::connect(server.addr).await.ok()?;
            s.write_all(&request("POST", &authed_sm(), &[("Content-Type", "text/xml")], &xml_call("SR.list"))).await.ok()?;
            let mut raw = Vec::new();
            s.read_to_end(&mut raw).await.ok()?;
            (!raw.is_empty()).then(|| parse_reply(&raw).status)
        })
        .await;
        if let Ok(Some(200)) = reply {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(served, "no call was served once the idle connections had gone");
    server.stop().await;
}

/// Answers every call with xapi's `Redirect` to `0` (a pool member sending its caller to the
/// SR master).
struct Redirector(String);

impl Dispatch for Redirector {
    async fn dispatch(&self, _method: String, _params: Vec<Value>) -> Result<Value, StorageError> {
        Err(StorageError::Redirect(Some(self.0.clone())))
    }
}

/// A host-to-host call answered `Redirect ip` is made again at `ip` (same port, path and
/// secret), as xapi's `redirectable_rpc` does; a redirect that never ends is given up on.
#[tokio::test]
async fn a_host_to_host_call_follows_a_redirect() {
    use sxm_engine::migrate::Remote;
    use sxm_engine::model::call::{Call, args};
    // The host redirected to: an echo on 127.0.0.2, on the port the first host has on 127.0.0.1.
    let mut cfg = ServerConfig::new(SECRET);
    cfg.tcp = Some("127.0.0.2:0".parse().expect("addr"));
    let echo = Arc::new(Echo::default());
    let shutdown = CancellationToken::new();
    let target = serve(&cfg, echo.clone(), shutdown.clone()).await.expect("serve the target");
    let port = target.tcp_addr().expect("bound").port();
    let mut cfg = ServerConfig::new(SECRET);
    cfg.tcp = Some(format!("127.0.0.1:{port}").parse().expect("addr"));
    let _member = serve(&cfg, Arc::new(Redirector("127.0.0.2".into())), shutdown.clone()).await.expect("serve the member");
    let remote = Remote::new(&format!("http://127.0.0.1:{port}/services/SM?session_id={SECRET}")).expect("url");
    let answer: Value = remote.call(Call::Query(args::Query { dbg: "t".into() })).await.expect("answered at the host redirected to");
    assert_eq!(answer.get("method").and_then(Value::as_str), Some("Query.query"), "{answer:?}");
    assert_eq!(echo.calls.load(Ordering::SeqCst), 1);
    // A host that redirects to itself: given up after a few hops, the redirect the answer.
    let mut cfg = ServerConfig::new(SECRET);
    cfg.tcp = Some("127.0.0.1:0".parse().expect("addr"));
    let looping = serve(&cfg, Arc::new(Redirector("127.0.0.1".into())), shutdown.clone()).await.expect("serve");
    let remote = Remote::new(&format!("http://{}?session_id={SECRET}", looping.tcp_addr().expect("bound"))).expect("url");
    let e = remote.call::<Value>(Call::Query(args::Query { dbg: "t".into() })).await.expect_err("a loop");
    assert_eq!(e, StorageError::Redirect(Some("127.0.0.1".into())));
    shutdown.cancel();
}

/// A self-signed certificate and key for 127.0.0.1 in `dir`, made with openssl; None (the test
/// skips) where openssl is missing outside CI.
fn self_signed(dir: &Path) -> Option<(PathBuf, PathBuf)> {
    let (cert, key) = (dir.join("host.pem"), dir.join("host.key"));
    let made = std::process::Command::new("openssl")
        .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output();
    match made {
        Ok(o) if o.status.success() => Some((cert, key)),
        _ if std::env::var_os("CI").is_none() => {
            eprintln!("skipping: openssl not installed");
            None
        }
        other => panic!("openssl is required under CI: {other:?}"),
    }
}

/// Each listener tells the routes (and the call log) which one a request came in on: a
/// caller over TLS is `tls`, not `tcp`.
#[tokio::test]
async fn each_listener_names_its_transport() {
    let dir = TempDir::new();
    let Some((cert, key)) = self_signed(&dir.0) else { return };
    let curl = Path::new("/usr/bin/curl");
    if !curl.exists() {
        assert!(std::env::var_os("CI").is_none(), "curl is required under CI");
        eprintln!("skipping: /usr/bin/curl not found");
        return;
    }
    let socket = dir.0.join("sxm.sock");
    let mut cfg = ServerConfig::new(SECRET);
    cfg.unix = Some(socket.clone());
    cfg.tcp = Some("127.0.0.1:0".parse().expect("addr"));
    cfg.tls = Some(("127.0.0.1:0".parse().expect("addr"), sxm_engine::http::tls::server_config(&cert, &key).expect("tls config")));
    let bound = Bound::bind(&cfg).await.expect("bind");
    let (tcp, tls) = (bound.tcp_addr().expect("tcp"), bound.tls_addr().expect("tls"));
    let which = axum::Router::new().route("/which", axum::routing::get(|axum::Extension(t): axum::Extension<Transport>| async move { t.to_string() }));
    let token = CancellationToken::new();
    let task = tokio::spawn(bound.run(router(Arc::new(Echo::default()), cfg.max_body).merge(which), token.clone()));

    let r = tcp_raw(tcp, &request("GET", &format!("/which?session_id={SECRET}"), &[], b"")).await;
    assert_eq!((r.status, r.text()), (200, "tcp".to_owned()));
    let r = unix_raw(&socket, &request("GET", "/which", &[], b"")).await;
    assert_eq!((r.status, r.text()), (200, "unix".to_owned()));
    let url = format!("https://{tls}/which?session_id={SECRET}");
    let out = tokio::task::spawn_blocking(move || std::process::Command::new("/usr/bin/curl").args(["-sS", "--insecure", "--max-time", "10", &url]).output())
        .await
        .expect("no panic")
        .expect("run curl");
    assert!(out.status.success(), "curl: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "tls");

    token.cancel();
    tokio::time::timeout(Duration::from_secs(10), task).await.expect("stops in time").expect("no panic").expect("stops cleanly");
}

/// The HTTPS listener: a caller over TLS is served while many others sit in unfinished
/// handshakes (each runs in a task of its own, so none holds up the accept) and another speaks
/// plain HTTP to it (closed, nothing run).
#[tokio::test]
async fn https_serves_callers_past_stalled_handshakes_and_plain_http() {
    let dir = TempDir::new();
    let Some((cert, key)) = self_signed(&dir.0) else { return };
    let mut cfg = ServerConfig::new(SECRET);
    // Long enough that a handshake held in the accept loop would show.
    cfg.head_timeout = Duration::from_secs(60);
    let tls = sxm_engine::http::tls::server_config(&cert, &key).expect("tls config");
    cfg.tls = Some(("127.0.0.1:0".parse().expect("addr"), tls));
    let echo = Arc::new(Echo::default());
    let shutdown = CancellationToken::new();
    let running = serve(&cfg, echo.clone(), shutdown.clone()).await.expect("serve");
    let addr = running.tls_addr().expect("tls bound");
    let mut stalled = Vec::new();
    for _ in 0..50 {
        stalled.push(TcpStream::connect(addr).await.expect("connect"));
    }
    let mut plain = TcpStream::connect(addr).await.expect("connect");
    plain.write_all(&xml_call("fail")).await.expect("write");
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), plain.read_to_end(&mut answer)).await.expect("plain HTTP is closed, not served");
    assert!(!String::from_utf8_lossy(&answer).contains("200 OK"), "plain HTTP was served on the TLS port");
    // Any certificate is taken by this process's client (no CA bundle set): encrypted only.
    let client = RpcClient::new(Endpoint::parse(&format!("https://{addr}")).expect("url").with_secret(SECRET));
    let v = tokio::time::timeout(Duration::from_secs(10), client.call_xml("ping", args())).await.expect("answered past the stalled handshakes").expect("call");
    assert_eq!(v.get("method").and_then(Value::as_str), Some("ping"));
    assert_eq!(echo.calls.load(Ordering::SeqCst), 1, "only the TLS caller's call ran");
    drop(stalled);
    shutdown.cancel();
}
