//! Shared test plumbing: temporary images, a served export, peer processes.

pub use tapmirror::testkit::{Guest, Proc, assert_matches_guest, pattern, require_tool, run};

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A temporary folder with a raw image served by `tapmirror serve`.
pub struct Served {
    /// The server process.
    pub proc: Proc,
    /// The folder holding the image and socket.
    pub dir: tempfile::TempDir,
    /// The image file.
    pub image: PathBuf,
    /// The Unix socket.
    pub socket: PathBuf,
    /// The TCP address, when asked for.
    pub tcp: Option<SocketAddr>,
}

impl Served {
    /// The export's `nbd+unix` URI.
    pub fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.socket.display())
    }

    /// The export's `nbd://` URI, when serving TCP.
    pub fn tcp_uri(&self) -> String {
        format!("nbd://{}/", self.tcp.expect("served without --listen"))
    }

    /// The image's bytes, read from the file.
    pub fn contents(&self) -> Vec<u8> {
        std::fs::read(&self.image).expect("read image")
    }
}

/// Path of the tapmirror binary under test.
pub fn tapmirror() -> &'static str {
    env!("CARGO_BIN_EXE_tapmirror")
}

/// Serves a fresh sparse raw image of `size` bytes with extra `serve` arguments.
pub fn serve(size: u64, extra: &[&str]) -> Served {
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("disk.raw");
    std::fs::File::create(&image).and_then(|f| f.set_len(size)).expect("create image");
    serve_file(dir, image, extra)
}

/// Serves an existing image file that lives in `dir`.
pub fn serve_file(dir: tempfile::TempDir, image: PathBuf, extra: &[&str]) -> Served {
    serve_file_logging_to(dir, image, extra, Stdio::inherit())
}

/// [`serve_file`] with the server's log (its stderr) sent to `log`.
pub fn serve_file_logging_to(dir: tempfile::TempDir, image: PathBuf, extra: &[&str], log: Stdio) -> Served {
    serve_file_with(dir, image, extra, log, &[])
}

/// [`serve_file_logging_to`] with environment variables `envs` set for the server.
pub fn serve_file_with(dir: tempfile::TempDir, image: PathBuf, extra: &[&str], log: Stdio, envs: &[(&str, &str)]) -> Served {
    let socket = dir.path().join("nbd.sock");
    let mut child = Command::new(tapmirror())
        .envs(envs.iter().copied())
        .arg("serve")
        .arg(&image)
        .arg("--socket")
        .arg(&socket)
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .expect("spawn tapmirror serve");
    let stdout = child.stdout.take().expect("stdout");
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).expect("read ready line");
    assert!(line.starts_with("ready"), "tapmirror serve did not get ready: {line:?}");
    let tcp = line.split_whitespace().find_map(|w| w.strip_prefix("tcp=")).map(|a| a.parse().expect("tcp address"));
    Served { proc: Proc(Some(child)), dir, image, socket, tcp }
}

/// Starts `cmd` as a peer server listening on the Unix socket `socket` and waits until it accepts.
pub fn spawn_server(cmd: &mut Command, socket: &Path) -> Proc {
    let child = cmd.stdout(Stdio::null()).spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let proc = Proc(Some(child));
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::os::unix::net::UnixStream::connect(socket).is_err() {
        assert!(Instant::now() < deadline, "{cmd:?} did not listen on {}", socket.display());
        std::thread::sleep(Duration::from_millis(20));
    }
    proc
}



/// Waits for `child` to exit within `limit` and returns its output; kills it and fails the test
/// with `what` if it is still running then (it blocked, or it served when it should not have).
pub fn exits_within(mut child: std::process::Child, limit: Duration, what: &str) -> std::process::Output {
    let deadline = Instant::now() + limit;
    while child.try_wait().expect("try_wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("wait")
}
