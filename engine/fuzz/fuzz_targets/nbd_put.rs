//! Arbitrary bytes as what a caller sends on a new connection to the storage server with an NBD
//! handover configured (`http/nbd.rs`): the first bytes decide between xapi's NBD `PUT`s, whose
//! head we parse ourselves, and everything else, which goes to hyper. This is read before the
//! caller is checked (on the Unix socket, where this target connects, no secret is asked), so
//! it is the server's most exposed parser.
//!
//! Each input is written to a fresh connection to a server on a Unix socket, whose write half is
//! then closed; the target reads the answer to its end. Checks:
//! - no panic (libFuzzer's hook aborts on one in any task), and every connection ends within 5 s;
//! - a request the handler is asked to prepare has a path that parses back to itself
//!   (`NbdRequest::path`), and components that are not empty, `.` or `..` and hold no `/` or
//!   control character;
//! - when the handler takes the socket over, the answer is exactly `NBD_OK` and the handler
//!   reads exactly the input's bytes after its head's blank line: nothing of the NBD stream was
//!   consumed, nothing was added;
//! - otherwise the answer, if any, is an HTTP/1.x status line.

#![no_main]

use std::fs::File;
use std::io::Read;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use sxm_engine::http::nbd::NBD_OK;
use sxm_engine::http::{Dispatch, HandoverError, NbdHandover, NbdRequest, ServerConfig, Transport, serve_with};
use sxm_engine::model::StorageError;
use sxm_engine::rpc::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio_util::sync::CancellationToken;

const LIMIT: Duration = Duration::from_secs(5);

/// Answers every RPC call with its method name.
struct Rpc;

impl Dispatch for Rpc {
    async fn dispatch(&self, method: String, _params: Vec<Value>) -> Result<Value, StorageError> {
        Ok(Value::String(method))
    }
}

/// Checks what it is asked to prepare; refuses datapaths named `refuse`, takes the rest over and
/// keeps what it reads from the socket.
#[derive(Default)]
struct Handover {
    prepared: Mutex<Vec<NbdRequest>>,
    taken: Mutex<Option<Vec<u8>>>,
}

impl NbdHandover for Handover {
    type Prepared = ();

    async fn prepare(&self, req: NbdRequest, _transport: Transport) -> Result<(), HandoverError> {
        assert_eq!(NbdRequest::parse(&req.path()).as_ref(), Some(&req), "the path does not parse back to the request");
        for part in [&req.vm, &req.sr, &req.vdi, &req.dp] {
            let bad = part.is_empty() || part == "." || part == ".." || part.chars().any(|c| c == '/' || c.is_control());
            assert!(!bad, "a component a handler may build file names from: {part:?}");
        }
        self.prepared.lock().expect("lock").push(req.clone());
        if req.dp == "refuse" {
            return Err(HandoverError::NotFound("refused by the fuzz target".into()));
        }
        Ok(())
    }

    async fn take_over(&self, _prepared: (), conn: OwnedFd) {
        let read = tokio::task::spawn_blocking(move || {
            let mut file = File::from(conn);
            let mut rest = Vec::new();
            file.read_to_end(&mut rest).map(|_| (file, rest))
        });
        let (file, rest) = read.await.expect("reader task").expect("reading the socket taken over");
        *self.taken.lock().expect("lock") = Some(rest);
        // Closed only now: the caller's end of stream tells the target the record is there.
        drop(file);
    }
}

struct Harness {
    rt: tokio::runtime::Runtime,
    handover: Arc<Handover>,
    sock: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

fn harness() -> &'static Harness {
    static H: OnceLock<Harness> = OnceLock::new();
    H.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().max_blocking_threads(2).build().expect("runtime");
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("sxm.sock");
        let mut cfg = ServerConfig::new("fuzz-secret");
        cfg.unix = Some(sock.clone());
        cfg.head_timeout = Duration::from_secs(2);
        let handover = Arc::new(Handover::default());
        let running = rt.block_on(serve_with(&cfg, Arc::new(Rpc), Arc::clone(&handover), CancellationToken::new())).expect("serve");
        // Serves for the life of the process, on the runtime each input drives.
        rt.spawn(async move { running.wait().await });
        Harness { rt, handover, sock, _dir: dir }
    })
}

fuzz_target!(|data: &[u8]| {
    let h = harness();
    h.handover.prepared.lock().expect("lock").clear();
    *h.handover.taken.lock().expect("lock") = None;
    let answer = h.rt.block_on(async {
        let conn = UnixStream::connect(&h.sock).await.expect("connect");
        let (mut r, mut w) = conn.into_split();
        let input = data.to_vec();
        // Written beside the read, so a server answering before it has read everything cannot
        // deadlock with us.
        let writer = tokio::spawn(async move {
            let _ = w.write_all(&input).await;
            let _ = w.shutdown().await;
        });
        let mut answer = Vec::new();
        match tokio::time::timeout(LIMIT, r.read_to_end(&mut answer)).await {
            Ok(_) => {}
            Err(_) => panic!("the connection did not end within {LIMIT:?}"),
        }
        let _ = writer.await;
        answer
    });
    let taken = h.handover.taken.lock().expect("lock").take();
    if std::env::var_os("SXM_FUZZ_VERBOSE").is_some() {
        let status = answer.split(|&b| b == b'\r').next().map(String::from_utf8_lossy);
        let prepared = h.handover.prepared.lock().expect("lock").clone();
        eprintln!("answer {status:?}; prepared {prepared:?}; handler read {:?} bytes", taken.as_ref().map(Vec::len));
    }
    match taken {
        Some(rest) => {
            assert_eq!(answer, NBD_OK, "the answer before a handover");
            let head_end = data.windows(4).position(|w| w == b"\r\n\r\n").expect("a head was read") + 4;
            assert!(rest == data[head_end..], "the handler got {} bytes, the input had {} after its head", rest.len(), data.len() - head_end);
        }
        None => assert!(answer.is_empty() || answer.starts_with(b"HTTP/1."), "not an HTTP answer: {:?}", String::from_utf8_lossy(&answer[..answer.len().min(64)])),
    }
});
