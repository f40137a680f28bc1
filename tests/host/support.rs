//! Running `sxm serve` hosts and talking to them the ways callers do: the `sxm` CLI (JSON-RPC
//! over the Unix socket), curl (raw JSON-RPC 1.0/2.0 and XML-RPC over TCP), and Python's
//! xmlrpc.client (an XML-RPC client that is not ours).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

pub use tapmirror::testkit::{Guest, Proc, Tmpfs, assert_matches_guest, pattern, require_tool, run};

/// Skips the calling test unless every tool is installed (a failure under CI).
#[macro_export]
macro_rules! require {
    ($($tool:expr),+) => {
        if !($($crate::support::require_tool($tool))&&+) {
            return;
        }
    };
}

pub fn sxm() -> &'static str {
    env!("CARGO_BIN_EXE_sxm")
}

/// The tapmirror binary the hosts under test use: built by the same `cargo test --workspace`
/// into the same folder as `sxm`, where `sxm serve` finds it.
pub fn tapmirror() -> PathBuf {
    let beside = Path::new(sxm()).with_file_name("tapmirror");
    assert!(beside.is_file(), "{} is not built (run the tests with `cargo test --workspace`)", beside.display());
    beside
}

/// One running `sxm serve`.
pub struct Host {
    pub root: PathBuf,
    pub socket: PathBuf,
    pub tcp: String,
    pub secret: String,
    pub proc: Proc,
}

impl Drop for Host {
    /// Datapath processes outlive their host by design; a test's must not outlive the test.
    /// A host that was killed or died on purpose (to be started again on the same root) has
    /// taken `proc`, and leaves its datapaths for its successor.
    fn drop(&mut self) {
        if self.proc.0.is_some() && !self.root.as_os_str().is_empty() {
            let _ = Command::new("pkill").arg("-KILL").arg("-f").arg(format!("{}/run/", self.root.display())).status();
        }
    }
}

impl Host {
    /// Starts a host on `root` (kept across restarts) listening on loopback TCP and a socket.
    pub fn start(root: &Path) -> Host {
        Host::start_on(root, "127.0.0.1:0")
    }

    /// Starts a host on `root` listening on `listen`.
    pub fn start_on(root: &Path, listen: &str) -> Host {
        Host::start_with(root, listen, &[])
    }

    /// Starts a host with extra environment (fault injection: `SXM_FAULTS`).
    pub fn start_env(root: &Path, env: &[(&str, &str)]) -> Host {
        Host::start_with(root, "127.0.0.1:0", env)
    }

    /// Starts a host with extra environment on `listen`.
    pub fn start_env_on(root: &Path, listen: &str, env: &[(&str, &str)]) -> Host {
        Host::start_with(root, listen, env)
    }

    fn start_with(root: &Path, listen: &str, env: &[(&str, &str)]) -> Host {
        Host::start_args(root, listen, env, &[]).0
    }

    /// Starts a host with more `sxm serve` arguments; answers it and the rest of the line it
    /// printed once listening (`tls=` and the like).
    pub fn start_args(root: &Path, listen: &str, env: &[(&str, &str)], args: &[&std::ffi::OsStr]) -> (Host, String) {
        let socket = root.join("sxm.sock");
        let mut child = Command::new(sxm())
            .args(["serve", "--root"])
            .arg(root)
            .args(args)
            .args(["--listen", listen, "--socket"])
            .arg(&socket)
            .arg("--tapmirror")
            .arg(tapmirror())
            // Quiet unless asked (`SXM_TEST_LOG=info`): many hosts share one test run's output.
            .env("RUST_LOG", std::env::var("SXM_TEST_LOG").unwrap_or_else(|_| "warn".into()))
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn sxm serve");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(line)) = lines.next() {
                let _ = tx.send(line);
            }
            // Keep draining so the host never blocks on a full pipe.
            for _ in lines {}
        });
        let line = rx.recv_timeout(Duration::from_secs(30)).expect("sxm serve did not say where it listens within 30 s");
        let tcp = line.split_whitespace().find_map(|w| w.strip_prefix("tcp=")).expect("tcp= in the listening line").to_owned();
        let secret = std::fs::read_to_string(root.join("secret")).expect("host secret").trim().to_owned();
        (Host { root: root.to_owned(), socket, tcp, secret, proc: Proc(Some(child)) }, line)
    }

    /// Waits for the host to exit on its own (an injected abort); fails after 30 s.
    pub fn wait_exit(mut self) {
        let mut c = self.proc.0.take().expect("running");
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while c.try_wait().expect("wait").is_none() {
            assert!(std::time::Instant::now() < deadline, "the host did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the host with SIGKILL (datapath processes are not its children's group and live on).
    pub fn kill(mut self) {
        if let Some(mut c) = self.proc.0.take() {
            c.kill().expect("kill sxm serve");
            c.wait().expect("reap sxm serve");
        }
    }

    /// Runs the CLI against this host; fails the test if it fails.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = run(Command::new(sxm()).arg("--host").arg(&self.socket).args(args).env("SXM_TAPMIRROR", tapmirror()));
        String::from_utf8(out.stdout).expect("utf-8").trim().to_owned()
    }

    /// Runs the CLI and returns its whole output, success or not.
    pub fn cli_raw(&self, args: &[&str]) -> Output {
        Command::new(sxm()).arg("--host").arg(&self.socket).args(args).env("SXM_TAPMIRROR", tapmirror()).output().expect("run sxm")
    }

    /// The CLI with `--json`, parsed.
    pub fn cli_json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let text = self.cli(&all);
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("sxm {args:?} printed no JSON ({e}): {text}"))
    }

    /// POSTs `body` to `path` over TCP with curl; answers (HTTP status, body).
    pub fn post_tcp(&self, path: &str, body: &str, content_type: &str) -> (u16, String) {
        curl(&["-H", &format!("Content-Type: {content_type}"), "--data-binary", body, &format!("{}{path}", self.tcp)])
    }

    /// POSTs a JSON-RPC body over the Unix socket with curl.
    pub fn post_unix(&self, path: &str, body: &str) -> (u16, String) {
        curl(&["--unix-socket", self.socket.to_str().expect("utf-8 path"), "-H", "Content-Type: application/json", "--data-binary", body, &format!("http://localhost{path}")])
    }

    /// One JSON-RPC 2.0 call over the Unix socket; the reply object.
    pub fn jsonrpc(&self, method: &str, params: serde_json::Value) -> serde_json::Value {
        let body = serde_json::json!({"jsonrpc": "2.0", "method": method, "params": [params], "id": 1}).to_string();
        let (status, reply) = self.post_unix("/jsonrpc", &body);
        assert_eq!(status, 200, "{method}: {reply}");
        serde_json::from_str(&reply).unwrap_or_else(|e| panic!("{method}: not JSON ({e}): {reply}"))
    }

    /// A successful JSON-RPC 2.0 call's result.
    pub fn call(&self, method: &str, params: serde_json::Value) -> serde_json::Value {
        let reply = self.jsonrpc(method, params);
        assert!(reply.get("error").is_none(), "{method} failed: {reply}");
        reply["result"].clone()
    }

    /// Runs a Python xmlrpc.client script against the host's `/services/SM` (as `proxy`).
    pub fn python_xmlrpc(&self, script: &str) -> String {
        let url = format!("{}/services/SM?session_id={}", self.tcp, self.secret);
        let program = format!("import xmlrpc.client, json, sys\nproxy = xmlrpc.client.ServerProxy({url:?}, allow_none=True)\n{script}\n");
        let out = run(Command::new("/usr/bin/python3").arg("-c").arg(program));
        String::from_utf8(out.stdout).expect("utf-8").trim().to_owned()
    }

    /// Every file under the root (path and size), sockets and all: to show a call changed nothing.
    pub fn files(&self) -> Vec<(String, u64)> {
        let mut out = Vec::new();
        let mut stack = vec![self.root.clone()];
        // A file the host takes away while this walks (a temporary pid file renamed, a
        // folder removed) was there or not: gone by the time it is looked at, it is not.
        let gone = |e: &std::io::Error| e.kind() == std::io::ErrorKind::NotFound;
        while let Some(dir) = stack.pop() {
            let entries = match std::fs::read_dir(&dir) {
                Err(e) if gone(&e) => continue,
                other => other.expect("read dir"),
            };
            for e in entries {
                let e = e.expect("entry");
                let meta = match e.metadata() {
                    Err(e) if gone(&e) => continue,
                    other => other.expect("metadata"),
                };
                if meta.is_dir() {
                    stack.push(e.path());
                } else {
                    let name = e.path().strip_prefix(&self.root).expect("under root").display().to_string();
                    // Logs grow on their own; everything else must stay put.
                    if !name.ends_with(".log") {
                        out.push((name, meta.len()));
                    }
                }
            }
        }
        out.sort();
        out
    }
}

fn curl(args: &[&str]) -> (u16, String) {
    let out = Command::new("curl").args(["-sS", "--max-time", "60", "-w", "\n%{http_code}"]).args(args).output().expect("run curl");
    assert!(out.status.success(), "curl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).expect("utf-8");
    let (body, code) = text.rsplit_once('\n').expect("status line");
    (code.trim().parse().expect("status"), body.to_owned())
}

/// Waits for `f` to hold, up to `secs`.
pub fn eventually(secs: u64, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(std::time::Instant::now() < deadline, "{what}: not within {secs} s");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Reads a whole export over NBD with nbdcopy.
pub fn read_export(uri: &str, dir: &Path) -> Vec<u8> {
    let out = dir.join(format!("export-{}.raw", std::process::id()));
    let _ = std::fs::remove_file(&out);
    run(Command::new("nbdcopy").arg("--").arg(uri).arg(&out));
    let data = std::fs::read(&out).expect("read export");
    std::fs::remove_file(&out).expect("remove export copy");
    data
}
