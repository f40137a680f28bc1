//! Datapath processes that outlive their starter (`tapmirror::process`): real `tapmirror serve`
//! processes, real sockets, real peers.
//!
//! Processes spawned by the test itself are its children, which it reaps; the one started by a
//! short-lived starter process is re-parented when the starter dies, and whether its new parent
//! reaps it is not ours to know: "gone" below means no `/proc` entry or a zombie.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use tapmirror::process::{CONTROL_SOCKET, LOG_FILE, NBD_SOCKET, PID_FILE, ProcessError, ServeProcess, ServeSpec, Stopped};

use crate::harness::{Proc, run, tapmirror};
use crate::require;

const SIZE: u64 = 16 << 20;
const EXPORT: &str = "exp";

/// Environment of the starter helper: where to spawn.
const STARTER_DIR: &str = "TAPMIRROR_TEST_STARTER_DIR";
const STARTER_IMAGE: &str = "TAPMIRROR_TEST_STARTER_IMAGE";

fn raw_image(dir: &Path) -> PathBuf {
    let image = dir.join("disk.raw");
    std::fs::File::create(&image).and_then(|f| f.set_len(SIZE)).expect("create image");
    image
}

fn spec(image: &Path, dir: &Path) -> ServeSpec {
    let mut spec = ServeSpec::new(tapmirror(), image, dir);
    spec.export_name = EXPORT.to_owned();
    spec
}

fn uri(p: &ServeProcess) -> String {
    format!("nbd+unix:///{EXPORT}?socket={}", p.nbd_socket().display())
}

/// Reaps whatever still serves the folder when dropped, so that a failing test leaves no
/// process behind (they outlive their starter, after all).
struct Reap(PathBuf);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = ServeProcess::reap(&self.0);
    }
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime").block_on(f)
}

/// State, parent and start time from `/proc/PID/stat`, if the process exists.
fn stat(pid: i32) -> Option<(char, i32, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = s[s.rfind(')')? + 1..].split_whitespace().collect();
    Some((fields[0].chars().next()?, fields[1].parse().ok()?, fields[19].parse().ok()?))
}

/// No process, or a zombie.
fn gone(pid: i32) -> bool {
    stat(pid).is_none_or(|(state, _, _)| state == 'Z')
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn nbd_size(p: &ServeProcess) -> u64 {
    let out = run(Command::new("nbdinfo").arg("--size").arg(uri(p)));
    String::from_utf8_lossy(&out.stdout).trim().parse().expect("nbdinfo --size prints a number")
}

/// Writes a pattern over NBD with qemu-io, reads it back through the server (qemu-io fails on a
/// mismatch), and checks the image file holds it.
fn write_and_read_back(p: &ServeProcess, image: &Path, offset: u64, byte: u8) {
    let len = 64 << 10;
    run(Command::new("qemu-io")
        .args(["-f", "raw", "-c"])
        .arg(format!("write -P {byte:#x} {offset} {len}"))
        .arg("-c")
        .arg(format!("read -P {byte:#x} {offset} {len}"))
        .arg(uri(p)));
    let file = std::fs::read(image).expect("read image");
    let range = offset as usize..(offset + len) as usize;
    assert!(file[range].iter().all(|&b| b == byte), "the image does not hold what qemu-io wrote");
}

/// Which of the folder's managed files exist.
fn files(dir: &Path) -> Vec<&'static str> {
    [PID_FILE, NBD_SOCKET, CONTROL_SOCKET].into_iter().filter(|f| dir.join(f).exists()).collect()
}

/// Rewrites the pid file to name `pid` (with its real start time, so only the command line can
/// tell it apart).
fn point_pid_file_at(dir: &Path, pid: i32) {
    let path = dir.join(PID_FILE);
    let mut record: serde_json::Value = match std::fs::read_to_string(&path) {
        Ok(text) => serde_json::from_str(&text).expect("pid file is JSON"),
        Err(_) => serde_json::json!({}),
    };
    let (_, _, start_time) = stat(pid).expect("process exists");
    record["pid"] = pid.into();
    record["start_time"] = start_time.into();
    std::fs::write(&path, record.to_string()).expect("write pid file");
}

#[test]
fn spawn_serves_over_nbd_and_shutdown_cleans_up() {
    require!("nbdinfo", "qemu-io");
    let tmp = tempfile::tempdir().expect("tempdir");
    let image = raw_image(tmp.path());
    let dir = tmp.path().join("dp"); // not there yet: spawn makes it
    let _reap = Reap(dir.clone());
    let p = ServeProcess::spawn(&spec(&image, &dir)).expect("spawn");
    let pid = p.pid();

    // Detached: a session (and so a process group) of its own.
    assert_eq!(nix::unistd::getsid(Some(Pid::from_raw(pid))).expect("getsid"), Pid::from_raw(pid), "not a session leader");
    assert_eq!(files(&dir), [PID_FILE, NBD_SOCKET, CONTROL_SOCKET]);
    let record: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join(PID_FILE)).expect("pid file")).expect("JSON");
    assert_eq!(record["pid"], pid);
    assert_eq!(record["start_time"].as_u64(), stat(pid).map(|s| s.2));

    assert_eq!(nbd_size(&p), SIZE);
    write_and_read_back(&p, &image, 1 << 20, 0x5a);
    let stats = block_on(p.stats()).expect("stats");
    assert_eq!(stats["size"], SIZE);
    assert!(stats["bytes_written"].as_u64().expect("bytes_written") >= 64 << 10, "{stats}");

    // The log took the server's output, without terminal colours.
    let log = std::fs::read_to_string(dir.join(LOG_FILE)).expect("log");
    assert!(log.contains("ready unix="), "{log}");
    assert!(!log.contains('\x1b'), "colour codes in the log: {log:?}");

    assert_eq!(block_on(p.shutdown(Duration::from_secs(10))).expect("shutdown"), Stopped::Exited);
    assert!(files(&dir).is_empty(), "left behind: {:?}", files(&dir));
    assert!(dir.join(LOG_FILE).exists(), "the log is kept");
    // Our child, reaped by shutdown: not even a zombie remains.
    assert!(stat(pid).is_none(), "pid {pid} still has a /proc entry");
    assert!(!p.is_running());
}

#[test]
fn kill_removes_process_and_files() {
    require!("nbdinfo");
    let tmp = tempfile::tempdir().expect("tempdir");
    let image = raw_image(tmp.path());
    let _reap = Reap(tmp.path().join("dp"));
    let mut s = spec(&image, &tmp.path().join("dp"));
    s.read_only = true;
    let p = ServeProcess::spawn(&s).expect("spawn");
    let pid = p.pid();
    let info = run(Command::new("nbdinfo").arg("--json").arg(uri(&p)));
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).expect("nbdinfo JSON");
    assert_eq!(info["exports"][0]["is_read_only"], true, "{info}");

    p.kill().expect("kill");
    assert!(stat(pid).is_none(), "pid {pid} still has a /proc entry");
    assert!(!p.is_running());
    assert!(files(p.dir()).is_empty(), "left behind: {:?}", files(p.dir()));
    // Killing what is gone is not an error.
    p.kill().expect("second kill");
}

/// Run by `survives_its_starter` in a process of its own: spawns a datapath, says its pid, and
/// waits to be killed.
#[test]
#[ignore = "a helper: survives_its_starter runs it in a process of its own"]
fn starter_helper() {
    let (Some(dir), Some(image)) = (std::env::var_os(STARTER_DIR), std::env::var_os(STARTER_IMAGE)) else {
        return;
    };
    let p = ServeProcess::spawn(&spec(Path::new(&image), Path::new(&dir))).expect("spawn");
    let mut out = std::io::stdout();
    writeln!(out, "SPAWNED {}", p.pid()).and_then(|()| out.flush()).expect("stdout");
    std::thread::sleep(Duration::from_secs(300));
}

#[test]
fn survives_its_starter() {
    require!("nbdinfo", "qemu-io");
    let tmp = tempfile::tempdir().expect("tempdir");
    let image = raw_image(tmp.path());
    let dir = tmp.path().join("dp");
    let _reap = Reap(dir.clone());
    let starter_err = tmp.path().join("starter.err");
    // The starter is this test binary again, running `starter_helper` in a process group of its
    // own, with its stdout a pipe to us: a real parent that spawns through the real API, and
    // then dies of SIGKILL sent to its whole group, as a service manager's stop would.
    let mut starter = Command::new(std::env::current_exe().expect("test binary"))
        .args(["process::starter_helper", "--exact", "--ignored", "--nocapture", "--test-threads=1"])
        .env(STARTER_DIR, &dir)
        .env(STARTER_IMAGE, &image)
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&starter_err).expect("stderr file"))
        .spawn()
        .expect("spawn the starter");
    let starter_pid = Pid::from_raw(starter.id() as i32);
    let stdout = starter.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            if tx.send(line.ok()).is_err() {
                return;
            }
        }
        let _ = tx.send(None); // end of file
    });
    let starter_log = || std::fs::read_to_string(&starter_err).unwrap_or_default();
    let pid: i32 = loop {
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(Some(line)) => {
                // The harness's "test … ... " has no newline before it.
                if let Some((_, pid)) = line.split_once("SPAWNED ") {
                    break pid.trim().parse().expect("pid");
                }
            }
            Ok(None) | Err(_) => {
                let _ = killpg(starter_pid, Signal::SIGKILL);
                let _ = starter.wait();
                panic!("the starter did not spawn a datapath; its stderr:\n{}", starter_log());
            }
        }
    };
    let datapath = Pid::from_raw(pid);
    assert_eq!(stat(pid).map(|s| s.1), Some(starter_pid.as_raw()), "the starter's child");
    assert_ne!(nix::unistd::getpgid(Some(datapath)).expect("pgid"), starter_pid, "in the starter's process group");

    killpg(starter_pid, Signal::SIGKILL).expect("kill the starter's group");
    starter.wait().expect("reap the starter");
    // The starter's stdout reaches end of file: the datapath holds no end of its pipe.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(None) => break,
            Ok(Some(_)) => {}
            Err(_) => panic!("the starter's stdout is still open after it died: the datapath inherited it"),
        }
    }

    // Still serving, re-parented to whoever reaps orphans here.
    assert!(!gone(pid), "the datapath died with its starter; its log:\n{}", std::fs::read_to_string(dir.join(LOG_FILE)).unwrap_or_default());
    assert_ne!(stat(pid).map(|s| s.1), Some(starter_pid.as_raw()));
    let p = ServeProcess::adopt(&dir).expect("adopt").expect("a live datapath to adopt");
    assert_eq!(p.pid(), pid);
    assert_eq!(nbd_size(&p), SIZE);
    write_and_read_back(&p, &image, 0, 0xc3);
    assert_eq!(block_on(p.stats()).expect("stats")["size"], SIZE);

    // Not our child: shutdown waits through /proc, and the folder ends up clean.
    assert_eq!(block_on(p.shutdown(Duration::from_secs(10))).expect("shutdown"), Stopped::Exited);
    assert!(gone(pid), "pid {pid} still runs after shutdown");
    assert!(files(&dir).is_empty(), "left behind: {:?}", files(&dir));
    assert!(ServeProcess::adopt(&dir).expect("adopt again").is_none());
}

#[test]
fn killed_datapath_is_not_adopted_and_its_files_go() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let image = raw_image(tmp.path());
    let dir = tmp.path().join("dp");
    let _reap = Reap(dir.clone());
    let p = ServeProcess::spawn(&spec(&image, &dir)).expect("spawn");
    let pid = p.pid();
    kill(Pid::from_raw(pid), Signal::SIGKILL).expect("SIGKILL");
    // Nobody reaps it yet (the handle holds it): a zombie, which kill(pid, 0) calls alive.
    wait_until("it is a zombie", || stat(pid).is_some_and(|s| s.0 == 'Z'));
    assert!(kill(Pid::from_raw(pid), None).is_ok(), "kill(pid, 0) should still succeed on a zombie");
    assert_eq!(files(&dir), [PID_FILE, NBD_SOCKET, CONTROL_SOCKET], "SIGKILL leaves the files");

    assert!(ServeProcess::adopt(&dir).expect("adopt").is_none(), "adopted a zombie");
    assert!(files(&dir).is_empty(), "stale files left: {:?}", files(&dir));
    assert!(!p.is_running());
    assert!(stat(pid).is_none(), "is_running should have reaped it");
}

#[test]
fn unrelated_process_is_neither_adopted_nor_killed() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let image = raw_image(tmp.path());
    let dir = tmp.path().join("dp");
    let _reap = Reap(dir.clone());
    // A real pid file and stale sockets, from a datapath that died.
    let p = ServeProcess::spawn(&spec(&image, &dir)).expect("spawn");
    kill(Pid::from_raw(p.pid()), Signal::SIGKILL).expect("SIGKILL");
    wait_until("it has exited", || !p.is_running());
    let mut sleeper = Proc(Some(Command::new("sleep").arg("120").spawn().expect("sleep")));
    let sleeper_pid = sleeper.0.as_ref().expect("sleep").id() as i32;
    let mut sleeping = || sleeper.0.as_mut().expect("sleep").try_wait().expect("try_wait").is_none();

    // The pid file names a live `sleep`, with its true start time: only its command line says
    // it is not the datapath.
    point_pid_file_at(&dir, sleeper_pid);
    assert!(ServeProcess::adopt_within(&dir, Duration::from_secs(1)).expect("adopt").is_none(), "adopted a sleep");
    assert!(sleeping(), "the sleep was killed");
    assert!(files(&dir).is_empty(), "stale files left: {:?}", files(&dir));

    // reap must not kill it either.
    point_pid_file_at(&dir, sleeper_pid);
    assert_eq!(ServeProcess::reap(&dir).expect("reap"), None);
    assert!(sleeping(), "reap killed the sleep");

    // Nor us (had it tried, this test would not finish).
    let me = std::process::id() as i32;
    point_pid_file_at(&dir, me);
    assert!(ServeProcess::adopt_within(&dir, Duration::from_secs(1)).expect("adopt").is_none(), "adopted the test itself");
    point_pid_file_at(&dir, me);
    assert_eq!(ServeProcess::reap(&dir).expect("reap"), None);
    assert!(!dir.join(PID_FILE).exists());

    // Nor anything by a pid file that names a group (kill(0) or kill(-1) would be a disaster).
    for pid in [0, -1] {
        std::fs::write(dir.join(PID_FILE), format!(r#"{{"pid": {pid}, "start_time": 0}}"#)).expect("write");
        assert_eq!(ServeProcess::reap(&dir).expect("reap"), None);
    }
    // A corrupt pid file is stale, not an error.
    std::fs::write(dir.join(PID_FILE), "not json").expect("write");
    assert!(ServeProcess::adopt_within(&dir, Duration::from_secs(1)).expect("adopt").is_none());
    assert!(!dir.join(PID_FILE).exists());

    assert!(sleeping(), "the sleep was killed");
}

#[test]
fn lost_pid_file_is_found_by_the_control_socket() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let image = raw_image(tmp.path());
    let dir = tmp.path().join("dp");
    let _reap = Reap(dir.clone());
    let p = ServeProcess::spawn(&spec(&image, &dir)).expect("spawn");
    std::fs::remove_file(dir.join(PID_FILE)).expect("remove pid file");

    let adopted = ServeProcess::adopt(&dir).expect("adopt").expect("found by SO_PEERCRED");
    assert_eq!(adopted.pid(), p.pid());
    let record: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join(PID_FILE)).expect("pid file rewritten")).expect("JSON");
    assert_eq!(record["pid"], p.pid());

    // Killed through the adopted handle, which is not its parent: it waits until the process is a
    // zombie (the first handle still holds it), then cleans up.
    adopted.kill().expect("kill");
    assert!(gone(p.pid()));
    assert!(files(&dir).is_empty(), "left behind: {:?}", files(&dir));
    assert!(!p.is_running());
}

#[test]
fn spawn_refuses_a_folder_already_served() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let image = raw_image(tmp.path());
    let dir = tmp.path().join("dp");
    let _reap = Reap(dir.clone());
    let p = ServeProcess::spawn(&spec(&image, &dir)).expect("spawn");
    match ServeProcess::spawn(&spec(&image, &dir)) {
        Err(ProcessError::AlreadyRunning { pid, .. }) => assert_eq!(pid, p.pid()),
        other => panic!("expected AlreadyRunning, got {other:?}"),
    }
    assert_eq!(block_on(p.stats()).expect("the first still serves")["size"], SIZE);
    p.kill().expect("kill");
}

#[test]
fn unresponsive_datapath_is_reported_then_reaped() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let image = raw_image(tmp.path());
    let dir = tmp.path().join("dp");
    let _reap = Reap(dir.clone());
    let p = ServeProcess::spawn(&spec(&image, &dir)).expect("spawn");
    let pid = p.pid();
    kill(Pid::from_raw(pid), Signal::SIGSTOP).expect("SIGSTOP");
    wait_until("it is stopped", || stat(pid).is_some_and(|s| s.0 == 'T'));

    match ServeProcess::adopt_within(&dir, Duration::from_millis(500)) {
        Err(ProcessError::Unresponsive { pid: found, .. }) => assert_eq!(found, pid),
        other => panic!("expected Unresponsive, got {other:?}"),
    }
    assert!(!gone(pid), "adopt must leave an unresponsive process alone");
    assert!(dir.join(PID_FILE).exists());

    assert_eq!(ServeProcess::reap(&dir).expect("reap"), Some(pid));
    assert!(gone(pid));
    assert!(files(&dir).is_empty(), "left behind: {:?}", files(&dir));
    assert!(!p.is_running());
}

#[test]
fn bad_image_fails_with_the_log_tail_and_leaves_nothing() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("dp");
    let _reap = Reap(dir.clone());
    let missing = tmp.path().join("missing.raw");
    let err = ServeProcess::spawn(&spec(&missing, &dir)).expect_err("serving a missing image");
    let ProcessError::Exited { pid, ref log_tail, .. } = err else { panic!("expected Exited, got {err:?}") };
    assert!(log_tail.contains("missing.raw"), "the log tail should say what failed: {log_tail:?}");
    assert!(err.to_string().contains("missing.raw"), "{err}");
    assert!(stat(pid).is_none(), "pid {pid} left behind");
    assert!(files(&dir).is_empty(), "left behind: {:?}", files(&dir));
}

#[test]
fn silent_program_is_killed_at_the_ready_timeout() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let image = raw_image(tmp.path());
    let dir = tmp.path().join("dp");
    let _reap = Reap(dir.clone());
    let script = tmp.path().join("silent");
    std::fs::write(&script, "#!/bin/sh\necho 'never listening' >&2\nexec sleep 600\n").expect("script");
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
    let mut s = spec(&image, &dir);
    s.exe = script;
    s.ready_timeout = Duration::from_millis(500);
    let err = ServeProcess::spawn(&s).expect_err("a program that never answers");
    let ProcessError::NotReady { pid, ref log_tail, .. } = err else { panic!("expected NotReady, got {err:?}") };
    assert!(log_tail.contains("never listening"), "{log_tail:?}");
    assert!(stat(pid).is_none(), "pid {pid} left behind");
    assert!(files(&dir).is_empty(), "left behind: {:?}", files(&dir));
}

#[test]
fn socket_paths_too_long_are_refused_before_starting() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let image = raw_image(tmp.path());
    let dir = tmp.path().join("d".repeat(120));
    match ServeProcess::spawn(&spec(&image, &dir)) {
        Err(ProcessError::SocketPathTooLong { path }) => assert!(path.starts_with(&dir)),
        other => panic!("expected SocketPathTooLong, got {other:?}"),
    }
    assert!(!dir.exists(), "nothing should have been made");
}

#[test]
fn folder_reached_by_a_symlink_is_adopted_and_extra_args_pass() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let image = raw_image(tmp.path());
    let dir = tmp.path().join("dp");
    let _reap = Reap(dir.clone());
    let mut s = spec(&image, &dir);
    s.extra_args = vec!["--format".into(), "raw".into()];
    let p = ServeProcess::spawn(&s).expect("spawn");
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", p.pid())).expect("cmdline");
    assert!(cmdline.windows(12).any(|w| w == b"--format\0raw"), "{:?}", String::from_utf8_lossy(&cmdline));

    let link = tmp.path().join("link");
    std::os::unix::fs::symlink(&dir, &link).expect("symlink");
    let adopted = ServeProcess::adopt(&link).expect("adopt").expect("the same process, by another path");
    assert_eq!(adopted.pid(), p.pid());
    assert_eq!(adopted.dir(), p.dir());
    p.kill().expect("kill");
}

#[test]
fn listening_options_are_not_extra_args() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let image = raw_image(tmp.path());
    let dir = tmp.path().join("dp");
    for arg in ["--socket=/tmp/x.sock", "--control", "--listen=127.0.0.1:0"] {
        let mut s = spec(&image, &dir);
        s.extra_args = vec![arg.into(), "/tmp/x.sock".into()];
        match ServeProcess::spawn(&s) {
            Err(ProcessError::InvalidSpec { .. }) => {}
            other => panic!("{arg}: expected InvalidSpec, got {other:?}"),
        }
    }
    assert!(!dir.exists(), "nothing should have been made");
}

/// Socket activation, as `nbdinfo [ CMD ]` and `nbdcopy [ CMD ]` start a server: it serves the
/// socket it is given, and it goes when the process that started it goes, however that one
/// ends. Started by a client that then exited on an error (no SIGTERM), it used to serve nobody
/// for ever, holding the image's locks.
#[test]
fn a_socket_activated_server_serves_and_goes_with_its_starter() {
    require!("nbdinfo", "python3");
    let dir = tempfile::tempdir().expect("tempdir");
    let image = raw_image(dir.path());
    let tm = tapmirror();
    let out = run(Command::new("nbdinfo").args(["--size", "--", "["]).arg(tm).arg("serve").arg(&image).arg("]"));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), SIZE.to_string(), "nbdinfo [ tapmirror serve ]");

    // A starter that binds the socket, hands it over as systemd does, sees the server answer,
    // and dies without a word.
    let starter = r#"
import os, socket, sys
tm, image, path = sys.argv[1:4]
s = socket.socket(socket.AF_UNIX)
s.bind(path)
s.listen()
pid = os.fork()
if pid == 0:
    if s.fileno() != 3:
        os.dup2(s.fileno(), 3)
    os.set_inheritable(3, True)
    os.environ["LISTEN_PID"] = str(os.getpid())
    os.environ["LISTEN_FDS"] = "1"
    os.execv(tm, [tm, "serve", image])
c = socket.socket(socket.AF_UNIX)
c.connect(path)
assert c.recv(8) == b"NBDMAGIC"
print(pid, flush=True)
os._exit(1)
"#;
    let sock = dir.path().join("activated.sock");
    // Its output is read up to the pid's line only: the server inherits the pipe.
    let mut child = Command::new("python3").arg("-c").arg(starter).arg(tm).arg(&image).arg(&sock).stdout(Stdio::piped()).spawn().expect("python3");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line).expect("starter's output");
    let status = child.wait().expect("starter");
    let pid: i32 = line.trim().parse().unwrap_or_else(|_| panic!("starter ({status}) printed {line:?}"));
    // Killed whatever happens below, so a failure leaves no server behind.
    struct KillOnDrop(i32);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = kill(Pid::from_raw(self.0), Signal::SIGKILL);
        }
    }
    let _server = KillOnDrop(pid);
    wait_until("the server went with its starter", || gone(pid));
}

/// A datapath that dies while it is paused for a change of its files (a snapshot) is taken up
/// active again once the change is done, whether its host restarts it during the change or
/// after: its guest's writes complete. It used to be restarted paused, for good (a tester's
/// guest froze for 14 minutes, until a detach and attach).
#[test]
fn a_datapath_that_dies_during_a_change_of_its_files_comes_back_active() {
    require!("qemu-io");
    use tapmirror::datapaths::{Datapaths, Group};
    for restart_during_the_change in [true, false] {
        let dir = tempfile::tempdir().expect("tempdir");
        let image = raw_image(dir.path());
        let run_dir = dir.path().join("run");
        std::fs::create_dir_all(&run_dir).expect("run dir");
        let dps = Datapaths::new(PathBuf::from(tapmirror()), "raw");
        let g = Group { name: "t", run_dir: &run_dir };
        let endpoint = dps.attach(g, "v", &image, true).expect("attach");
        dps.activate(g, "v").expect("activate");
        let pid_file = std::fs::read_dir(&run_dir).expect("run dir").flatten().next().expect("the datapath's folder").path().join(PID_FILE);
        let pid: serde_json::Value = serde_json::from_slice(&std::fs::read(&pid_file).expect("pid file")).expect("pid json");
        let pid = Pid::from_raw(pid["pid"].as_i64().expect("pid") as i32);
        std::thread::scope(|s| {
            let changed = dps.with_quiesced(
                g,
                "v",
                "test",
                || {
                    kill(pid, Signal::SIGKILL).expect("kill the datapath");
                    let deadline = Instant::now() + Duration::from_secs(10);
                    while !dps.dead(g).contains(&"v".to_owned()) {
                        assert!(Instant::now() < deadline, "the datapath did not die");
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    if restart_during_the_change {
                        assert!(dps.restart_dead(g, "v", &image).expect("restart"), "restarted");
                    } else {
                        // The host's watch restarts it as the change ends.
                        s.spawn(|| {
                            std::thread::sleep(Duration::from_millis(300));
                            dps.restart_dead(g, "v", &image).expect("restart");
                        });
                    }
                    Ok::<(), String>(())
                },
                |e| e.to_string(),
            );
            assert_eq!(changed, Ok(()), "restart during the change: {restart_during_the_change}");
        });
        let uri = format!("nbd+unix:///v?socket={}", endpoint.socket.display());
        let out = Command::new("timeout").args(["10", "qemu-io", "-f", "raw", "-c", "write -P 0x33 0 4k", &uri]).output().expect("qemu-io");
        assert!(out.status.success(), "restart during the change: {restart_during_the_change}: the guest's write did not complete: {}", String::from_utf8_lossy(&out.stderr));
        dps.detach(g, "v").expect("detach");
    }
}
