//! Test plumbing shared by tapmirror's integration tests and the workspace's end-to-end tests:
//! running peer commands with a deadline, a child process killed on drop, deterministic data,
//! and a guest of our own that writes unaligned runs over NBD and keeps the model of what the
//! disk must hold. Not part of the data path; public so that tests in other crates of the
//! workspace use the same guest rather than a copy of it.

use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

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
    use std::io::Read;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
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
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} still running after {RUN_DEADLINE:?}: killed (a hang)");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let out = Output { status, stdout: out_reader.join().expect("stdout reader"), stderr: err_reader.join().expect("stderr reader") };
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
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
    handle: std::thread::JoinHandle<(Vec<u8>, u64)>,
}

impl Guest {
    /// Starts writing to the export at `uri` (of `size` bytes).
    pub fn start(uri: String, size: u64, seed: u64) -> Guest {
        use std::sync::atomic::{AtomicBool, Ordering};
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let flag = std::sync::Arc::clone(&stop);
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
                }
                client.flush().await.expect("guest flush");
                (model, writes)
            })
        });
        Guest { stop, handle }
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
