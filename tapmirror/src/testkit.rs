//! Test plumbing shared by tapmirror's integration tests, the storage backends' tests and the
//! workspace's end-to-end tests: running peer commands with a deadline, a child process killed
//! on drop, deterministic data, the `tapmirror` program for crates that only link the library
//! ([`tapmirror_exe`]), reaping the datapaths a failed test leaves ([`reap_datapaths`]), a tmpfs
//! to fill ([`Tmpfs`]), and a guest of our own that writes unaligned runs over NBD and keeps the
//! model of what the disk must hold. Not part of the data path; public so that tests in other
//! crates of the workspace use the same plumbing rather than a copy of it.
//!
//! # Finding `tapmirror`
//!
//! `env!("CARGO_BIN_EXE_tapmirror")` only exists in tapmirror's own tests, and `cargo test -p
//! <a crate that uses tapmirror>` builds tapmirror as a library only, so [`tapmirror_exe`]
//! builds the binary itself, once per test run: `cargo build -p tapmirror --bin tapmirror` into
//! the same target folder and profile as the calling test binary (found from the test binary's
//! own path, `<target>/<profile>/deps/it-…`). Cargo's own lock makes that safe next to a running
//! `cargo test --workspace` (which builds the binary too, so the call finds it fresh and returns
//! at once). `SXM_TAPMIRROR=/path/to/tapmirror` skips the build and uses that program.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The `tapmirror` program, built once per test run (see the module documentation).
pub fn tapmirror_exe() -> PathBuf {
    static EXE: OnceLock<PathBuf> = OnceLock::new();
    EXE.get_or_init(|| {
        if let Some(p) = std::env::var_os("SXM_TAPMIRROR") {
            return PathBuf::from(p);
        }
        let me = std::env::current_exe().expect("test binary path");
        // <target>/<profile>/deps/it-HASH
        let profile_dir = me.parent().and_then(Path::parent).expect("test binary in <target>/<profile>/deps");
        let target = profile_dir.parent().expect("target folder");
        let profile = profile_dir.file_name().and_then(|n| n.to_str()).expect("profile folder name");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "--quiet", "-p", "tapmirror", "--bin", "tapmirror", "--manifest-path"])
            .arg(&manifest)
            .arg("--target-dir")
            .arg(target);
        match profile {
            "debug" => {}
            "release" => {
                cmd.arg("--release");
            }
            other => {
                cmd.args(["--profile", other]);
            }
        }
        let status = cmd.status().expect("running cargo to build tapmirror");
        assert!(status.success(), "building tapmirror failed: {cmd:?}");
        let exe = profile_dir.join("tapmirror");
        assert!(exe.is_file(), "{} missing after the build", exe.display());
        exe
    })
    .clone()
}

/// A tmpfs of a given size mounted for a test, so that it can be filled (out-of-space paths);
/// unmounted when dropped, also when the test fails.
pub struct Tmpfs(PathBuf);

impl Tmpfs {
    /// Mounts a tmpfs of `size` (`6m`, say) at `at`, creating the folder; `None` where that
    /// cannot be done (not root).
    pub fn mount(at: &Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(at).ok()?;
        let opts = format!("size={size}");
        let ok = Command::new("mount").args(["-t", "tmpfs", "-o", &opts, "tmpfs"]).arg(at).status().is_ok_and(|s| s.success());
        ok.then(|| Tmpfs(at.to_owned()))
    }

    /// Gives the file system a new size.
    pub fn resize(&self, size: &str) {
        run(Command::new("mount").args(["-o", &format!("remount,size={size}")]).arg(&self.0));
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Whether the file system holding `dir` is full: a small write into it finds no room.
pub fn no_room_in(dir: &Path) -> bool {
    let probe = dir.join(".no-room-probe");
    let r = std::fs::write(&probe, vec![1u8; 8192]);
    let _ = std::fs::remove_file(&probe);
    r.is_err_and(|e| e.kind() == std::io::ErrorKind::StorageFull)
}

/// Kills whatever `tapmirror serve` serves a folder of `run_dir` (see
/// [`crate::process::ServeProcess::reap`]), saying so: a test that fails leaves its datapaths
/// running (they outlive their starter by design), and they must go before their folder does.
pub fn reap_datapaths(run_dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(run_dir) {
        for entry in entries.flatten() {
            if let Ok(Some(pid)) = crate::process::ServeProcess::reap(&entry.path()) {
                eprintln!("reaped a datapath left running: pid {pid} in {}", entry.path().display());
            }
        }
    }
}

/// Whether `tool` is on PATH. Under CI a missing peer is a failure, elsewhere a skip.
pub fn require_tool(tool: &str) -> bool {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !found {
        if std::env::var_os("CI").is_some() {
            panic!("{tool} is required under CI (.ci/run installs it)");
        }
        eprintln!("skipping: {tool} not installed");
    }
    found
}

/// Skips the calling test unless every tool is installed ([`require_tool`] each).
#[macro_export]
macro_rules! require {
    ($($tool:expr),+) => {
        if !($($crate::testkit::require_tool($tool))&&+) {
            return;
        }
    };
}

/// Deterministic, non-repeating-looking test data.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Longest a peer command may run before the test fails: every command here finishes in
/// seconds, so a command still running after this has hung, and the test must say so rather
/// than hang the whole run.
const RUN_DEADLINE: Duration = Duration::from_secs(300);

/// Runs a command to completion and returns its output, failing the test with its stderr when
/// it exits non-zero or runs past `RUN_DEADLINE` (then it is killed).
pub fn run(cmd: &mut Command) -> Output {
    try_run(cmd).unwrap_or_else(|e| panic!("{e}"))
}

/// Runs a command to completion and returns its output; `Err` with its stdout and stderr
/// when it exits non-zero, cannot start, or runs past `RUN_DEADLINE` (then it is killed).
pub fn try_run(cmd: &mut Command) -> Result<Output, String> {
    use std::io::Read;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("spawn {cmd:?}: {e}"))?;
    // Read both pipes while waiting, so a chatty command never blocks on a full pipe.
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = r.read_to_end(&mut v);
            v
        })
    };
    let out_reader = drain(Box::new(child.stdout.take().expect("stdout")));
    let err_reader = drain(Box::new(child.stderr.take().expect("stderr")));
    let deadline = Instant::now() + RUN_DEADLINE;
    let status = loop {
        if let Some(status) = child.try_wait().map_err(|e| format!("wait for {cmd:?}: {e}"))? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("{cmd:?} still running after {RUN_DEADLINE:?}: killed (a hang)"));
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let out = Output { status, stdout: out_reader.join().expect("stdout reader"), stderr: err_reader.join().expect("stderr reader") };
    if out.status.success() {
        Ok(out)
    } else {
        Err(format!(
            "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// A child process killed (SIGKILL) when dropped, unless it was already reaped.
pub struct Proc(pub Option<Child>);

impl Proc {
    /// Sends SIGTERM and waits up to 10 s for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.0.take().expect("process already reaped");
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("process did not exit within 10 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A guest of our own: writes runs of 1 to 8 sectors at any 512-byte offset (so most writes are
/// not 4 KiB aligned), each filled with a value that names the write, one at a time over NBD,
/// until stopped; it keeps the model of what every sector must hold.
pub struct Guest {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    written: std::sync::Arc<std::sync::atomic::AtomicU64>,
    handle: std::thread::JoinHandle<(Vec<u8>, u64)>,
}

impl Guest {
    /// Starts writing to the export at `uri` (of `size` bytes).
    pub fn start(uri: String, size: u64, seed: u64) -> Guest {
        use std::sync::atomic::{AtomicBool, Ordering};
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let flag = std::sync::Arc::clone(&stop);
        let written = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counter = std::sync::Arc::clone(&written);
        let handle = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("guest runtime");
            rt.block_on(async move {
                let uri = crate::nbd::NbdUri::parse(&uri).expect("guest uri");
                let client = crate::nbd::NbdClient::connect(&uri).await.expect("guest connect");
                let sectors = size / 512;
                let mut model = vec![0u8; sectors as usize];
                let mut x = seed | 1;
                let mut writes = 0u64;
                while !flag.load(Ordering::Relaxed) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let n = 1 + x % 8;
                    let start = (x >> 8) % (sectors - n);
                    // 1..=255, never 0: 0 means "never written by the guest".
                    let value = (writes % 255 + 1) as u8;
                    client.write(start * 512, vec![value; (n * 512) as usize], false).await.expect("guest write failed");
                    model[start as usize..(start + n) as usize].fill(value);
                    writes += 1;
                    counter.store(writes, Ordering::Relaxed);
                }
                client.flush().await.expect("guest flush");
                (model, writes)
            })
        });
        Guest { stop, written, handle }
    }

    /// Waits until the guest has made `n` more writes than it has now, so that a test knows
    /// writes landed in the phase it is in, however slow the machine (up to two minutes).
    pub fn wait_for_more_writes(&self, n: u64) {
        use std::sync::atomic::Ordering;
        let target = self.written.load(Ordering::Relaxed) + n;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        while self.written.load(Ordering::Relaxed) < target {
            assert!(std::time::Instant::now() < deadline, "the guest stalled at {} writes", self.written.load(Ordering::Relaxed));
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    /// Stops after the write in progress; returns the model (one byte per sector, 0 where the
    /// guest never wrote) and how many writes it made.
    pub fn stop(self) -> (Vec<u8>, u64) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.handle.join().expect("guest thread")
    }
}

/// Checks `disk` against a guest's model: every sector the guest wrote holds its last value,
/// every other sector equals `before`.
pub fn assert_matches_guest(disk: &[u8], model: &[u8], before: &[u8], what: &str) {
    assert_eq!(disk.len(), before.len(), "{what}: size");
    for (s, &v) in model.iter().enumerate() {
        let sector = &disk[s * 512..(s + 1) * 512];
        if v == 0 {
            assert!(sector == &before[s * 512..(s + 1) * 512], "{what}: sector {s} changed though the guest never wrote it");
        } else {
            assert!(sector.iter().all(|&b| b == v), "{what}: sector {s} does not hold the guest's last write ({v})");
        }
    }
}

/// `nbd:unix:<socket>:exportname=<name>` (QEMU's legacy form of an NBD address on a Unix
/// socket, the form storage stacks hand out) as (socket, export).
pub fn split_nbd_unix(uri: &str) -> (PathBuf, String) {
    let rest = uri.strip_prefix("nbd:unix:").unwrap_or_else(|| panic!("nbd:unix:…: {uri}"));
    let (socket, export) = rest.rsplit_once(":exportname=").unwrap_or_else(|| panic!("an export name: {uri}"));
    (PathBuf::from(socket), export.to_owned())
}

/// The standard NBD URI of `export` on `socket`, which qemu-io, nbdcopy and our client take.
pub fn nbd_unix_uri(socket: &Path, export: &str) -> String {
    format!("nbd+unix:///{export}?socket={}", socket.display())
}

/// `qemu-io -f raw -c CMD URI`; its stdout.
pub fn qemu_io(uri: &str, cmd: &str) -> Result<String, String> {
    try_run(Command::new("qemu-io").args(["-f", "raw", "-c", cmd, uri])).map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
}

/// [`qemu_io`] on a read-only export (qemu-io opens read-write unless told).
pub fn qemu_io_ro(uri: &str, cmd: &str) -> Result<String, String> {
    try_run(Command::new("qemu-io").args(["-r", "-f", "raw", "-c", cmd, uri])).map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
}

/// Whether `pid` is a live process (a zombie is not).
pub fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(')').and_then(|(_, rest)| rest.trim_start().chars().next()))
        .is_some_and(|st| st != 'Z' && st != 'X')
}
