//! The live mirror and the control socket, driven as the engine will: `tapmirror ctl`
//! commands, a target socket passed by descriptor, a live guest writing throughout.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

use crate::harness::{Served, run, serve_file, spawn_server, tapmirror};

const MIB: u64 = 1 << 20;

/// A server with a control socket on a fresh zeroed image of `size` bytes.
pub(crate) fn serve_controlled(size: u64) -> (Served, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("source.raw");
    std::fs::File::create(&image).and_then(|f| f.set_len(size)).expect("image");
    let ctl = dir.path().join("ctl.sock");
    let ctl_arg = ctl.display().to_string();
    (serve_file(dir, image, &["--control", &ctl_arg]), ctl)
}

/// [`serve_controlled`] with the server's log kept in a file, whose path comes third.
fn serve_controlled_logged(size: u64) -> (Served, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let (image, ctl, log) = (dir.path().join("source.raw"), dir.path().join("ctl.sock"), dir.path().join("source.log"));
    std::fs::File::create(&image).and_then(|f| f.set_len(size)).expect("image");
    let log_file = std::fs::File::create(&log).expect("source log");
    let ctl_arg = ctl.display().to_string();
    (crate::harness::serve_file_logging_to(dir, image, &["--control", &ctl_arg], log_file.into()), ctl, log)
}

pub(crate) fn ctl_output(ctl: &Path, args: &[&str]) -> Output {
    Command::new(tapmirror()).arg("ctl").arg(ctl).args(args).output().expect("run tapmirror ctl")
}

/// Runs a control command that must succeed; returns its JSON answer.
pub(crate) fn ctl(ctl: &Path, args: &[&str]) -> Value {
    let out = ctl_output(ctl, args);
    assert!(out.status.success(), "ctl {args:?}: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("ctl answer is JSON")
}

/// A guest that writes with fio (crc32c verified) and with unaligned qemu-io writes, zeroes
/// and discards.
fn guest_writes(uri: &str) {
    crate::require!("fio", "qemu-io");
    // fio leaves a verify-state file in its working folder: keep it out of the tree.
    let scratch = tempfile::tempdir().expect("tempdir");
    let out = run(Command::new("fio").current_dir(scratch.path()).args([
        "--name=guest",
        "--ioengine=nbd",
        &format!("--uri={uri}"),
        "--rw=randwrite",
        "--bs=4k",
        "--size=32M",
        "--io_size=16M",
        "--iodepth=16",
        "--verify=crc32c",
        "--do_verify=1",
        "--output-format=json",
        "--output=/dev/stdout",
    ]));
    let text = String::from_utf8_lossy(&out.stdout);
    let json: Value = serde_json::from_str(&text[text.find('{').expect("fio json")..]).expect("fio json");
    assert_eq!(json["jobs"][0]["error"], 0, "fio saw an error");
    run(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0x5c 1000 3000", "-c", "write -z 5M 70000", "-c", "discard 9M 1M", "-c", "write -P 0x17 40M 1234567", uri]));
}

#[test]
fn sync_mirror_onto_our_server_ends_byte_identical() {
    let (source, ctl_path) = serve_controlled(64 * MIB);
    // The target holds what the source held when mirroring started (both start zeroed here;
    // with data, a copy brings the base across).
    let target = crate::harness::serve(64 * MIB, &[]);
    assert_eq!(ctl(&ctl_path, &["stats"])["mirror"]["state"], "none");
    let attached = ctl(&ctl_path, &["mirror-attach", "--target", &target.uri()]);
    assert_eq!(attached["state"], "ready");
    guest_writes(&source.uri());
    assert_eq!(ctl(&ctl_path, &["drain", "--timeout", "10"])["mirror"], "ready");
    let stats = ctl(&ctl_path, &["stats"]);
    assert_eq!(stats["mirror"]["state"], "ready");
    assert!(stats["mirror"]["counters"]["writes"].as_u64().unwrap_or(0) >= 4096, "{stats}");
    assert_eq!(stats["outstanding"], 0);
    assert!(stats["write_rate"].as_f64().unwrap_or(0.0) > 0.0, "{stats}");
    assert!(stats["bytes_written"].as_u64().unwrap_or(0) >= 16 << 20, "{stats}");
    assert!(source.contents() == target.contents(), "target differs from the source after drain");
}

/// A qcow2 source: most of the guest's writes land in clusters an earlier write allocated,
/// which go straight into the file rather than through the image thread (`qcow2::direct`),
/// between zeroes and discards that change what clusters map to. fio reads back what it wrote
/// through the source, the target ends equal to it, and QEMU finds its metadata intact.
#[test]
fn sync_mirror_of_a_qcow2_source_ends_byte_identical() {
    crate::require!("qemu-img");
    let dir = tempfile::tempdir().expect("tempdir");
    let (image, ctl_path) = (dir.path().join("source.qcow2"), dir.path().join("ctl.sock"));
    run(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(&image).arg((64 * MIB).to_string()));
    let ctl_arg = ctl_path.display().to_string();
    let mut source = serve_file(dir, image.clone(), &["--format", "qcow2", "--control", &ctl_arg]);
    let target = crate::harness::serve(64 * MIB, &[]);
    ctl(&ctl_path, &["mirror-attach", "--target", &target.uri()]);
    guest_writes(&source.uri());
    // Rewrite what the guest wrote, through clusters that are held by now.
    guest_writes(&source.uri());
    assert_eq!(ctl(&ctl_path, &["drain", "--timeout", "10"])["mirror"], "ready");
    // Closed, so that its metadata is on disk for QEMU.
    ctl(&ctl_path, &["shutdown"]);
    let status = source.proc.0.take().expect("child").wait().expect("wait");
    assert!(status.success(), "{status}");
    run(Command::new("qemu-img").args(["check", "-q", "-f", "qcow2"]).arg(&image));
    run(Command::new("qemu-img").args(["compare", "-f", "qcow2", "-F", "raw"]).arg(&image).arg(&target.image));
}

#[test]
fn sync_mirror_onto_qemu_nbd_ends_byte_identical() {
    crate::require!("qemu-nbd", "qemu-img");
    let (source, ctl_path) = serve_controlled(64 * MIB);
    let dir = tempfile::tempdir().expect("tempdir");
    let target_file = dir.path().join("target.raw");
    std::fs::File::create(&target_file).and_then(|f| f.set_len(64 * MIB)).expect("target");
    let socket = dir.path().join("q.sock");
    let _q = spawn_server(Command::new("qemu-nbd").args(["-f", "raw", "-t", "--discard=unmap", "-k"]).arg(&socket).arg(&target_file), &socket);
    ctl(&ctl_path, &["mirror-attach", "--target", &format!("nbd+unix:///?socket={}", socket.display())]);
    guest_writes(&source.uri());
    ctl(&ctl_path, &["drain"]);
    ctl(&ctl_path, &["mirror-detach"]);
    run(Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw"]).arg(&source.image).arg(&target_file));
}

/// A full mirror onto a target that serves one connection at a time (qemu-nbd's default
/// `--shared=1`): the second connection, for the background pass, is never greeted, so the
/// pass shares the first, and the mirror ends byte-identical.
#[test]
fn full_mirror_onto_a_one_connection_target_shares_the_connection() {
    crate::require!("qemu-nbd", "qemu-img", "qemu-io");
    let (source, ctl_path) = serve_controlled(16 * MIB);
    run(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0x2e 1M 3M", &source.uri()]));
    let dir = tempfile::tempdir().expect("tempdir");
    let target_file = dir.path().join("target.raw");
    std::fs::File::create(&target_file).and_then(|f| f.set_len(16 * MIB)).expect("target");
    let socket = dir.path().join("q.sock");
    let _q = spawn_server(Command::new("qemu-nbd").args(["-f", "raw", "-t", "-k"]).arg(&socket).arg(&target_file), &socket);
    let started = std::time::Instant::now();
    ctl(&ctl_path, &["mirror-attach", "--mode", "full", "--target", &format!("nbd+unix:///?socket={}", socket.display())]);
    assert!(started.elapsed() < std::time::Duration::from_secs(20), "attach waited {:?}", started.elapsed());
    wait_ready(&ctl_path);
    run(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0x2f 8M 64k", &source.uri()]));
    ctl(&ctl_path, &["drain"]);
    ctl(&ctl_path, &["mirror-detach"]);
    run(Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw"]).arg(&source.image).arg(&target_file));
}

/// A target without `WRITE_ZEROES` (tapdisk's server; here nbdkit's nozero filter) gets zero
/// buffers for guest zeroes and trims, and for a full mirror's holes, not a failed mirror.
#[test]
fn a_target_without_write_zeroes_gets_zero_buffers() {
    crate::require!("nbdkit", "qemu-io", "qemu-img");
    for mode in ["sync", "full"] {
        let (source, ctl_path) = serve_controlled(16 * MIB);
        run(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0x71 0 4M", &source.uri()]));
        let dir = tempfile::tempdir().expect("tempdir");
        let target_file = dir.path().join("target.raw");
        // The target starts as the source does in sync mode (a copy brings the base across),
        // and full of garbage in full mode, so its zeroes must really be written.
        let start = if mode == "sync" { source.contents() } else { vec![0xeeu8; 16 << 20] };
        std::fs::write(&target_file, start).expect("target");
        let socket = dir.path().join("k.sock");
        let _k = spawn_server(Command::new("nbdkit").args(["-f", "-U"]).arg(&socket).args(["--filter=nozero", "file"]).arg(&target_file), &socket);
        ctl(&ctl_path, &["mirror-attach", "--mode", mode, "--target", &format!("nbd+unix:///?socket={}", socket.display())]);
        if mode == "full" {
            wait_ready(&ctl_path);
        }
        run(Command::new("qemu-io").args(["-f", "raw", "-c", "write -z 1M 512k", "-c", "discard 3M 64k", "-c", "write -P 0x72 5M 4k", &source.uri()]));
        ctl(&ctl_path, &["drain"]);
        let stats = ctl(&ctl_path, &["stats"]);
        assert_eq!(stats["mirror"]["state"], "ready", "{mode}: {stats}");
        ctl(&ctl_path, &["mirror-detach"]);
        run(Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw"]).arg(&source.image).arg(&target_file));
    }
}

/// nbdkit in front of the target: every write fails. The guest never sees it; the mirror is
/// failed and detached, and the server stays healthy.
#[test]
fn target_errors_fail_the_mirror_not_the_guest() {
    crate::require!("nbdkit");
    let (source, ctl_path) = serve_controlled(64 * MIB);
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("k.sock");
    let _k = spawn_server(
        Command::new("nbdkit").env("TZ", "UTC").args(["-f", "-U"]).arg(&socket).args(["--filter=error", "memory", "64M", "error-pwrite-rate=100%", "error=EIO"]),
        &socket,
    );
    ctl(&ctl_path, &["mirror-attach", "--target", &format!("nbd+unix:///?socket={}", socket.display())]);
    guest_writes(&source.uri());
    let stats = ctl(&ctl_path, &["stats"]);
    assert_eq!(stats["mirror"]["state"], "failed", "{stats}");
    assert!(stats["mirror"]["failure"].as_str().unwrap_or("").contains("write"), "{stats}");
    assert_eq!(stats["errors"], 0, "the guest saw errors: {stats}");
    // A detach after the failure says what became of the mirror, not just "none".
    let detach = ctl_output(&ctl_path, &["mirror-detach"]);
    assert!(!detach.status.success());
    let said = String::from_utf8_lossy(&detach.stdout) + String::from_utf8_lossy(&detach.stderr);
    assert!(said.contains("no mirror attached") && said.contains("failed") && said.contains("write"), "{said}");
    // Healthy afterwards: more guest I/O works, and a new mirror can be attached.
    run(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0x42 0 64k", "-c", "read -P 0x42 0 64k", &source.uri()]));
    let target = crate::harness::serve(64 * MIB, &[]);
    assert_eq!(ctl(&ctl_path, &["mirror-attach", "--target", &target.uri()])["state"], "ready");
}

/// A target that stops answering (nbdkit's delay filter, 5 s per write) fails the mirror after
/// its timeout; a target killed mid-run fails it at once. The guest carries on in both cases.
#[test]
fn stalled_or_killed_targets_fail_the_mirror_not_the_guest() {
    crate::require!("nbdkit", "qemu-io");
    let (source, ctl_path) = serve_controlled(64 * MIB);
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("slow.sock");
    let slow = spawn_server(
        Command::new("nbdkit").args(["-f", "-U"]).arg(&socket).args(["--filter=delay", "memory", "64M", "delay-write=5"]),
        &socket,
    );
    ctl(&ctl_path, &["mirror-attach", "--timeout-ms", "300", "--target", &format!("nbd+unix:///?socket={}", socket.display())]);
    run(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0x61 0 4k", "-c", "read -P 0x61 0 4k", &source.uri()]));
    let stats = ctl(&ctl_path, &["stats"]);
    assert_eq!(stats["mirror"]["state"], "failed", "{stats}");
    assert!(stats["mirror"]["failure"].as_str().unwrap_or("").contains("answered nothing for"), "{stats}");
    drop(slow);

    let target = crate::harness::serve(64 * MIB, &[]);
    ctl(&ctl_path, &["mirror-attach", "--target", &target.uri()]);
    let mut target = target;
    let _ = target.proc.0.take().map(|mut c| {
        let _ = c.kill();
        c.wait()
    });
    guest_writes(&source.uri());
    let stats = ctl(&ctl_path, &["stats"]);
    assert_eq!(stats["mirror"]["state"], "failed", "{stats}");
    assert_eq!(stats["errors"], 0, "{stats}");
}

/// Its own export over TCP as the target is refused as over its Unix socket: accepted, each
/// guest write waited on itself for the whole timeout (30 s). Another server over TCP is taken.
#[test]
fn its_own_export_over_tcp_is_no_mirror_target() {
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("source.raw");
    std::fs::File::create(&image).and_then(|f| f.set_len(16 * MIB)).expect("image");
    let ctl_path = dir.path().join("ctl.sock");
    let ctl_arg = ctl_path.display().to_string();
    let source = serve_file(dir, image, &["--listen", "127.0.0.1:0", "--control", &ctl_arg]);
    let own = ctl_output(&ctl_path, &["mirror-attach", "--target", &source.tcp_uri()]);
    let said = String::from_utf8_lossy(&own.stdout);
    assert!(!own.status.success() && said.contains("this server's own export"), "{said}");
    assert_eq!(ctl(&ctl_path, &["stats"])["mirror"]["state"], "none");
    let target = crate::harness::serve(16 * MIB, &["--listen", "127.0.0.1:0"]);
    assert_eq!(ctl(&ctl_path, &["mirror-attach", "--target", &target.tcp_uri()])["state"], "ready");
}

/// A full mirror over a slow link whose target answers steadily is no stalled target, however
/// long its queued requests wait: nbdkit's rate filter lets 2 MB/s through, so the pass's four
/// 1 MiB requests in flight take 2 s to all come back, longer than the mirror's 1.5 s timeout,
/// while a reply comes every half second. Each request used to be timed from when it was
/// queued, and the mirror failed ("no answer within 1.5s") on a target that never went silent.
#[test]
fn a_slow_target_that_keeps_answering_does_not_fail_a_full_mirror() {
    crate::require!("nbdkit");
    let (source, ctl_path) = serve_controlled(12 * MIB);
    std::fs::write(&source.image, crate::harness::pattern(12 * MIB as usize, 7)).expect("source data");
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("slow-link.sock");
    let _k = spawn_server(Command::new("nbdkit").args(["-f", "-U"]).arg(&socket).args(["--filter=rate", "memory", "12M", "rate=16M"]), &socket);
    ctl(&ctl_path, &["mirror-attach", "--mode", "full", "--timeout-ms", "1500", "--target", &format!("nbd+unix:///?socket={}", socket.display())]);
    let stats = wait_ready(&ctl_path);
    assert_eq!(stats["errors"], 0, "{stats}");
}

/// A guest writing into the source's holes while a full mirror's hole walk runs (a target that
/// reads as zeroes): every write reaches the target. The walk could erase the mark of a write
/// that filled a hole between its look and its clear, and the target then kept zeroes there
/// (a test's guest hit that window about 1 run in 20). Here the server pauses in that window
/// (a test-only setting, 500 ms) on one hole of 16 MiB, and a guest writes 64 blocks of it
/// once each meanwhile.
#[test]
fn guest_writes_into_a_hole_during_the_hole_walk_reach_the_target() {
    use std::os::unix::fs::FileExt;
    const SIZE: u64 = 16 * MIB;
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("source.raw");
    let file = std::fs::File::create(&image).expect("image");
    file.set_len(SIZE).expect("size");
    file.write_all_at(&[0x11; 4096], 0).expect("data");
    drop(file);
    let ctl_path = dir.path().join("ctl.sock");
    let ctl_arg = ctl_path.display().to_string();
    let envs = [("TAPMIRROR_TEST_HOLE_WALK_PAUSE_MS", "500")];
    let source = crate::harness::serve_file_with(dir, image, &["--control", &ctl_arg], std::process::Stdio::inherit(), &envs);
    let target = crate::harness::serve(SIZE, &[]);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let guest = rt.block_on(tapmirror::nbd::NbdClient::connect(&tapmirror::nbd::NbdUri::parse(&source.uri()).expect("uri"))).expect("guest");
    ctl(&ctl_path, &["mirror-attach", "--mode", "full", "--target-is-zero", "--target", &target.uri()]);
    rt.block_on(async {
        for i in 0..64u64 {
            let at = (1 + i * 61) * 4096;
            guest.write(at, vec![(i + 1) as u8; 4096], false).await.expect("guest write");
            tokio::time::sleep(std::time::Duration::from_millis(3)).await;
        }
        guest.flush().await.expect("flush");
    });
    wait_ready(&ctl_path);
    assert_eq!(ctl(&ctl_path, &["drain"])["mirror"], "ready");
    let (src, dst) = (source.contents(), target.contents());
    if let Some(at) = (0..src.len()).step_by(512).find(|&at| src[at..at + 512] != dst[at..at + 512]) {
        panic!("the target differs from the source at byte {at}: {:?} against {:?}", &src[at..at + 4], &dst[at..at + 4]);
    }
}

/// Idle control clients beyond the limit are told so and closed: each connection holds a thread
/// of the blocking pool, and about 512 idle ones used to leave every later command (`pause`,
/// `drain`, `shutdown`) unanswered until they went. Once they go, commands are answered again.
#[test]
fn idle_control_clients_beyond_the_limit_are_refused_not_left_to_stall_commands() {
    use std::io::{BufRead, BufReader, Write};
    let (_source, ctl_path) = serve_controlled(16 * MIB);
    let idle: Vec<_> = (0..520).map(|_| std::os::unix::net::UnixStream::connect(&ctl_path).expect("connect control")).collect();
    let mut s = std::os::unix::net::UnixStream::connect(&ctl_path).expect("connect control");
    s.set_read_timeout(Some(std::time::Duration::from_secs(20))).expect("timeout");
    // Written whether or not the server reads it: a refused connection may be closed first.
    let _ = s.write_all(b"{\"cmd\":\"stats\"}\n");
    let mut answer = String::new();
    BufReader::new(&s).read_line(&mut answer).expect("an answer, not a stall");
    let a: Value = serde_json::from_str(&answer).expect("answer is JSON");
    assert_eq!(a["ok"], false, "{a}");
    assert!(a["error"].as_str().unwrap_or("").contains("too many control connections"), "{a}");
    drop(idle);
    let mut stats = Value::Null;
    for _ in 0..100 {
        let out = ctl_output(&ctl_path, &["stats"]);
        if out.status.success() {
            stats = serde_json::from_slice(&out.stdout).expect("ctl answer is JSON");
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(stats.get("mirror").is_some(), "no stats once the idle clients went: {stats}");
}

#[test]
fn bad_control_input_gets_an_error_and_changes_nothing() {
    use std::io::{BufRead, BufReader, Write};
    let (source, ctl_path) = serve_controlled(16 * MIB);
    let before = ctl(&ctl_path, &["stats"]);
    // A control socket nobody serves: said so, not only the OS error.
    let gone = ctl_output(&ctl_path.with_file_name("gone.ctl"), &["stats"]);
    assert!(!gone.status.success() && String::from_utf8_lossy(&gone.stderr).contains("is not running"), "{gone:?}");
    let raw = |line: &str| -> Value {
        let mut s = std::os::unix::net::UnixStream::connect(&ctl_path).expect("connect control");
        s.write_all(line.as_bytes()).expect("send");
        let mut answer = String::new();
        BufReader::new(&s).read_line(&mut answer).expect("answer");
        serde_json::from_str(&answer).expect("answer is JSON")
    };
    for (line, why) in [
        ("{not json\n", "malformed JSON"),
        ("{\"cmd\":\"explode\"}\n", "unknown command"),
        ("{\"nocmd\":1}\n", "missing \"cmd\""),
        ("{\"cmd\":\"mirror-attach\"}\n", "descriptors, got 0"),
        ("{\"cmd\":\"mirror-attach\",\"mode\":\"sideways\"}\n", "\"mode\""),
        ("{\"cmd\":\"unpause\"}\n", "not paused"),
        ("{\"cmd\":\"mirror-detach\"}\n", "no mirror"),
        ("{\"cmd\":\"mirror-rate\",\"bytes_per_s\":1000}\n", "no mirror"),
        ("{\"cmd\":\"mirror-rate\",\"bytes_per_s\":1000,\"busy\":\"yes\"}\n", "\"busy\""),
        ("{\"cmd\":\"mirror-converge\"}\n", "no mirror"),
        ("{\"cmd\":\"drain\",\"timeout_s\":\"soon\"}\n", "timeout_s"),
        ("{\"cmd\":\"drain\",\"timeout_s\":-1}\n", "timeout_s"),
    ] {
        let a = raw(line);
        assert_eq!(a["ok"], false, "{line}: {a}");
        assert!(a["error"].as_str().unwrap_or("").contains(why), "{line}: {a}");
    }
    // A descriptor that is not an NBD server: refused, nothing attached, and the error says
    // what the descriptor is (a pipe once got "NBD connection" and no more).
    let junk = tempfile::tempfile().expect("tempfile");
    let fd = std::os::fd::OwnedFd::from(junk);
    let a = tapmirror::control::request(&ctl_path, &serde_json::json!({"cmd": "mirror-attach"}), Some(&fd)).expect("request");
    assert_eq!(a["ok"], false, "{a}");
    assert!(a["error"].as_str().unwrap_or("").contains("not a socket"), "{a}");
    let (pipe, _writer) = nix::unistd::pipe().expect("pipe");
    let a = tapmirror::control::request(&ctl_path, &serde_json::json!({"cmd": "mirror-attach"}), Some(&pipe)).expect("request");
    assert!(a["error"].as_str().unwrap_or("").contains("not a socket"), "{a}");
    // A socket whose peer is no NBD server: the cause, not just "NBD connection".
    let (peer, theirs) = std::os::unix::net::UnixStream::pair().expect("socketpair");
    std::io::Write::write_all(&mut &peer, b"HTTP/1.1 400 Bad Request\r\n\r\n").expect("junk greeting");
    let a = tapmirror::control::request(&ctl_path, &serde_json::json!({"cmd": "mirror-attach"}), Some(&std::os::fd::OwnedFd::from(theirs))).expect("request");
    assert!(a["error"].as_str().unwrap_or("").contains("not an NBD server"), "{a}");
    // A descriptor with a command that takes none.
    let a = tapmirror::control::request(&ctl_path, &serde_json::json!({"cmd": "stats"}), Some(&fd)).expect("request");
    assert_eq!(a["ok"], false, "{a}");
    // A cap on a sync mirror, which has no background copy to pace: refused before attaching.
    let target = crate::harness::serve(16 * MIB, &[]);
    // A busy rate that is not a number: refused, nothing attached.
    let conn = std::os::fd::OwnedFd::from(std::os::unix::net::UnixStream::connect(&target.socket).expect("connect target"));
    let a = tapmirror::control::request(&ctl_path, &serde_json::json!({"cmd": "mirror-attach", "mode": "full", "busy_rate": "fast"}), Some(&conn))
        .expect("request");
    assert_eq!(a["ok"], false, "{a}");
    assert!(a["error"].as_str().unwrap_or("").contains("busy_rate"), "{a}");
    assert_eq!(ctl(&ctl_path, &["stats"])["mirror"]["state"], "none");
    let capped = ctl_output(&ctl_path, &["mirror-attach", "--rate", "1M", "--target", &target.uri()]);
    assert!(!capped.status.success());
    assert!(String::from_utf8_lossy(&capped.stderr).contains("full mirror"), "{capped:?}");
    assert_eq!(ctl(&ctl_path, &["stats"])["mirror"]["state"], "none");
    // A bitmap's granularity on a sync mirror, which has none; a timeout of 0, which was taken
    // as 1 ms and failed the mirror at the guest's first write: refused, nothing attached.
    for (args, why) in [(&["--granularity", "4096"][..], "a sync mirror has none"), (&["--timeout-ms", "0"][..], "at least 1")] {
        let out = ctl_output(&ctl_path, &[&["mirror-attach", "--target", &target.uri()][..], args].concat());
        let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(!out.status.success() && said.contains(why), "{args:?}: {said}");
        assert_eq!(ctl(&ctl_path, &["stats"])["mirror"]["state"], "none", "{args:?}");
    }
    // Its own export as the target: each mirrored write waited on itself until the mirror
    // timed out. Refused, nothing attached.
    let own = ctl_output(&ctl_path, &["mirror-attach", "--target", &source.uri()]);
    let said = String::from_utf8_lossy(&own.stdout);
    assert!(!own.status.success() && said.contains("this server's own export"), "{said}");
    assert_eq!(ctl(&ctl_path, &["stats"])["mirror"]["state"], "none");
    // Attach twice: the second is refused and the first keeps working.
    ctl(&ctl_path, &["mirror-attach", "--target", &target.uri()]);
    let paced = ctl_output(&ctl_path, &["mirror-rate", "1M"]);
    assert!(!paced.status.success(), "mirror-rate on a sync mirror must be refused");
    let converged = ctl_output(&ctl_path, &["mirror-converge"]);
    assert!(!converged.status.success(), "mirror-converge on a sync mirror must be refused");
    let second = ctl_output(&ctl_path, &["mirror-attach", "--target", &target.uri()]);
    assert!(!second.status.success());
    assert!(String::from_utf8_lossy(&second.stdout).contains("already attached"));
    let after = ctl(&ctl_path, &["stats"]);
    assert_eq!(after["mirror"]["state"], "ready");
    assert_eq!(after["requests"], before["requests"]);
    assert_eq!(after["paused"], false);
    drop(source);
}

/// pause holds guest requests; unpause --leaf switches the image under a paused server (the
/// snapshot switch), and reads then come from the new leaf.
#[test]
fn pause_holds_requests_and_unpause_switches_the_leaf() {
    crate::require!("qemu-io");
    let (source, ctl_path) = serve_controlled(16 * MIB);
    run(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0x0a 0 1M", &source.uri()]));
    ctl(&ctl_path, &["pause"]);
    assert_eq!(ctl(&ctl_path, &["stats"])["paused"], true);
    // A write sent while paused is held: it has not reached the file when we look.
    let mut held = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x0b 0 1M", &source.uri()])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("spawn held writer");
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(std::fs::read(&source.image).expect("read")[0], 0x0a, "a write went through a paused server");
    // The new leaf: a copy of the image as it stands, which then takes the held write.
    let leaf = source.dir.path().join("leaf.raw");
    std::fs::copy(&source.image, &leaf).expect("copy leaf");
    ctl(&ctl_path, &["unpause", "--leaf", leaf.to_str().expect("utf-8 path")]);
    assert!(held.wait().expect("held writer").success());
    assert_eq!(std::fs::read(&leaf).expect("read leaf")[0], 0x0b, "the held write went to the new leaf");
    assert_eq!(std::fs::read(&source.image).expect("read old")[0], 0x0a, "the old leaf was left alone");
    // A leaf of another size is refused and the server stays paused-free and serving.
    ctl(&ctl_path, &["pause"]);
    let other = source.dir.path().join("other.raw");
    std::fs::File::create(&other).and_then(|f| f.set_len(8 * MIB)).expect("other");
    let refused = ctl_output(&ctl_path, &["unpause", "--leaf", other.to_str().expect("utf-8")]);
    assert!(!refused.status.success());
    ctl(&ctl_path, &["unpause"]);
    run(Command::new("qemu-io").args(["-f", "raw", "-c", "read -P 0x0b 0 1M", &source.uri()]));
}

/// `unpause --leaf` takes a leaf that reads through the image served when paused (a
/// snapshot's overlay on it), and refuses an unrelated image of the same size and format: it
/// was taken, and the guest's disk silently became that image.
#[test]
fn unpause_takes_only_a_leaf_on_the_image_it_replaces() {
    crate::require!("qemu-img", "qemu-io");
    let dir = tempfile::tempdir().expect("tempdir");
    let (image, ctl_path) = (dir.path().join("disk.qcow2"), dir.path().join("ctl.sock"));
    run(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(&image).arg("16M"));
    let ctl_arg = ctl_path.display().to_string();
    let source = serve_file(tempfile::tempdir().expect("tempdir"), image.clone(), &["--format", "qcow2", "--control", &ctl_arg]);
    run(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0x61 0 64k", &source.uri()]));
    ctl(&ctl_path, &["pause"]);
    let unrelated = dir.path().join("unrelated.qcow2");
    run(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(&unrelated).arg("16M"));
    let refused = ctl_output(&ctl_path, &["unpause", "--leaf", unrelated.to_str().expect("utf-8")]);
    let said = String::from_utf8_lossy(&refused.stdout);
    assert!(!refused.status.success() && said.contains("does not read through the image served when paused"), "{said}");
    assert_eq!(ctl(&ctl_path, &["stats"])["paused"], true, "a refused unpause changes nothing");
    // An overlay on it, as a snapshot makes, is taken, and reads what the guest wrote.
    let overlay = dir.path().join("overlay.qcow2");
    run(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"]).arg(&image).arg(&overlay));
    ctl(&ctl_path, &["unpause", "--leaf", overlay.to_str().expect("utf-8")]);
    run(Command::new("qemu-io").args(["-f", "raw", "-r", "-c", "read -P 0x61 0 64k", &source.uri()]));
}

/// `serve --paused` holds requests from the first: the server says it is paused as soon as it
/// is ready, a write sent then reaches the file only after `unpause`. A host restarting an
/// attached disk that is not active starts it so; it used to serve until paused after start.
/// Meanwhile it holds the image as a `pause` does, without its lock (a backend snapshots an
/// attached disk that is not active), and takes the lock again at `unpause`.
#[test]
fn a_server_started_paused_holds_requests_until_unpause() {
    crate::require!("qemu-io");
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("source.raw");
    std::fs::File::create(&image).and_then(|f| f.set_len(4 * MIB)).expect("image");
    let ctl_path = dir.path().join("ctl.sock");
    let ctl_arg = ctl_path.display().to_string();
    let source = serve_file(dir, image, &["--control", &ctl_arg, "--paused"]);
    assert_eq!(ctl(&ctl_path, &["stats"])["paused"], true);
    let lock_is_free = || {
        use std::os::fd::AsRawFd;
        let f = std::fs::File::open(&source.image).expect("open");
        // SAFETY: flock on a descriptor `f` keeps open; the lock goes with it.
        unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
    };
    assert!(lock_is_free(), "a server started paused holds the image's lock");
    let mut held = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x0c 0 64k", &source.uri()])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("spawn held writer");
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(std::fs::read(&source.image).expect("read")[0], 0, "a write went through a server started paused");
    ctl(&ctl_path, &["unpause"]);
    assert!(held.wait().expect("held writer").success());
    assert_eq!(std::fs::read(&source.image).expect("read")[0], 0x0c);
    assert!(!lock_is_free(), "unpause opens the image for writing under its lock");
}

/// Two `pause` commands on two control connections while a guest write is in flight (held by a
/// slow mirror target): one pauses, the other answers "already paused" rather than waiting for
/// the gate and taking it after the `unpause` that follows, which would hold the guest for ever.
#[test]
fn two_pauses_at_once_pause_once_and_unpause_resumes() {
    crate::require!("nbdkit", "qemu-io");
    let (source, ctl_path) = serve_controlled(16 * MIB);
    let slow = tempfile::tempdir().expect("tempdir");
    let (target_image, target_socket) = (slow.path().join("target.raw"), slow.path().join("slow.sock"));
    std::fs::File::create(&target_image).and_then(|f| f.set_len(16 * MIB)).expect("target");
    let _target = spawn_server(
        Command::new("nbdkit")
            .args(["-f", "-U"])
            .arg(&target_socket)
            .args(["--filter=delay", "file"])
            .arg(&target_image)
            .arg("delay-write=1500ms"),
        &target_socket,
    );
    let target_uri = format!("nbd+unix:///?socket={}", target_socket.display());
    ctl(&ctl_path, &["mirror-attach", "--target", &target_uri]);
    let mut guest = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x3c 0 4k", &source.uri()])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("spawn guest");
    std::thread::sleep(std::time::Duration::from_millis(300));
    let pause = || {
        Command::new(tapmirror()).arg("ctl").arg(&ctl_path).arg("pause").stdout(std::process::Stdio::piped()).spawn().expect("spawn pause")
    };
    let mut pauses = [pause(), pause()];
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while pauses.iter_mut().any(|p| p.try_wait().expect("wait pause").is_none()) {
        assert!(std::time::Instant::now() < deadline, "a pause still waits after the other answered");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let answers: Vec<String> = pauses
        .into_iter()
        .map(|p| String::from_utf8_lossy(&p.wait_with_output().expect("pause output").stdout).into_owned())
        .collect();
    assert_eq!(answers.iter().filter(|a| a.contains("\"ok\":true")).count(), 1, "{answers:?}");
    assert_eq!(answers.iter().filter(|a| a.contains("already paused")).count(), 1, "{answers:?}");
    // The guest's write is in; its closing flush waits for the unpause.
    ctl(&ctl_path, &["unpause"]);
    assert!(guest.wait().expect("guest").success());
    assert_eq!(ctl(&ctl_path, &["stats"])["paused"], false);
    run(Command::new("qemu-io").args(["-f", "raw", "-c", "read -P 0x3c 0 4k", &source.uri()]));
}

/// A raw disk whose guest wrote a qcow2 header at its start (with a backing file naming a host
/// file) stays raw across a pause: the server never probes the format again. And a pause that
/// cannot open its read-only stand-in (the file renamed away meanwhile) keeps the writable
/// image, which the unpause then resumes on instead of colliding with its own lock.
#[test]
fn pause_and_unpause_keep_the_served_format_and_survive_a_failed_stand_in() {
    crate::require!("qemu-img", "nbdcopy", "qemu-io");
    let dir = tempfile::tempdir().expect("tempdir");
    let (image, ctl_path, header) = (dir.path().join("disk.raw"), dir.path().join("ctl.sock"), dir.path().join("hdr.qcow2"));
    std::fs::write(dir.path().join("secret"), b"host file, not the guest's").expect("secret");
    run(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"]).arg(dir.path().join("secret")).arg(&header).arg("16M"));
    std::fs::File::create(&image).and_then(|f| f.set_len(16 * MIB)).expect("image");
    let ctl_arg = ctl_path.display().to_string();
    let source = serve_file(dir, image.clone(), &["--format", "raw", "--control", &ctl_arg]);
    run(Command::new("nbdcopy").arg(&header).arg(source.uri()));
    let written = std::fs::read(&header).expect("header");
    // Resumed on the leaf named again, so that the image is opened anew.
    ctl(&ctl_path, &["pause"]);
    ctl(&ctl_path, &["unpause", "--leaf", image.to_str().expect("utf-8 path")]);
    let stats = ctl(&ctl_path, &["stats"]);
    assert_eq!(stats["paused"], false, "{stats}");
    let back = run(Command::new("qemu-io").args(["-r", "-f", "raw", "-c", "read -v 0 16", &source.uri()]));
    assert!(String::from_utf8_lossy(&back.stdout).contains("51 46 49 fb"), "the guest no longer reads its own bytes");
    assert!(source.contents()[..written.len()] == written[..]);

    // The stand-in cannot open: the pause keeps the writable image, the unpause resumes on it.
    let moved = image.with_extension("moved");
    std::fs::rename(&image, &moved).expect("rename");
    ctl(&ctl_path, &["pause"]);
    ctl(&ctl_path, &["unpause"]);
    assert_eq!(ctl(&ctl_path, &["stats"])["paused"], false);
    run(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0x6e 1M 4k", &source.uri()]));
    let mut b = vec![0u8; 4096];
    use std::os::unix::fs::FileExt;
    std::fs::File::open(&moved).expect("open").read_exact_at(&mut b, MIB).expect("read");
    assert!(b.iter().all(|&x| x == 0x6e), "the write after the unpause did not reach the image");
}

/// A target that goes away while the guest is idle fails the mirror at once, not at the
/// guest's next write: nothing reports a dead target as in step.
#[test]
fn a_target_that_dies_while_the_guest_is_idle_fails_the_mirror_at_once() {
    for mode in ["sync", "full"] {
        let (_source, ctl_path) = serve_controlled(16 * MIB);
        let target = crate::harness::serve(16 * MIB, &[]);
        ctl(&ctl_path, &["mirror-attach", "--target", &target.uri(), "--mode", mode]);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while ctl(&ctl_path, &["stats"])["mirror"]["state"] != "ready" {
            assert!(std::time::Instant::now() < deadline, "{mode}: never ready");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let requests = ctl(&ctl_path, &["stats"])["requests"].clone();
        drop(target);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let stats = ctl(&ctl_path, &["stats"]);
            if stats["mirror"]["state"] == "failed" {
                assert_eq!(stats["requests"], requests, "{mode}: a guest request came in meanwhile");
                break;
            }
            assert!(std::time::Instant::now() < deadline, "{mode}: a dead target still reported: {stats}");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
}

/// Polls `stats` until the mirror is ready (or failed); the deadline only guards against a hang.
pub(crate) fn wait_ready(ctl_path: &Path) -> Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let stats = ctl(ctl_path, &["stats"]);
        match stats["mirror"]["state"].as_str() {
            Some("ready") => return stats,
            Some("syncing") => {}
            other => panic!("full mirror ended in {other:?}: {stats}"),
        }
        assert!(std::time::Instant::now() < deadline, "full mirror never became ready: {stats}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Lets a guest that wrote through a ready mirror write a little more (mirrored), stops it,
/// drains, and checks the target sector by sector against the guest's model over `before`, and
/// byte for byte against the source.
fn stop_guest_and_compare(guest: crate::harness::Guest, ctl_path: &Path, source: &Served, target: &Served, before: &[u8]) {
    guest.wait_for_more_writes(100);
    let (model, _) = guest.stop();
    assert_eq!(ctl(ctl_path, &["drain"])["mirror"], "ready");
    crate::harness::assert_matches_guest(&target.contents(), &model, before, "target");
    assert!(source.contents() == target.contents(), "target differs from the source");
}

/// Attaches a full mirror onto the zeroed `target` with `cap` (`--rate` or `--busy-rate`) at
/// 1 MiB/s, with `--target-is-zero` if `zeroed` (else the pass starts copying at once, without
/// a hole walk first), and a second later answers its stats, the seconds since the attach
/// began, and the bytes of data the pass has sent (what the cap counts).
fn attach_and_wait_a_second(ctl_path: &Path, target: &Served, cap: &str, zeroed: bool) -> (Value, f64, u64) {
    let started = std::time::Instant::now();
    let zeroed = if zeroed { &["--target-is-zero"][..] } else { &[] };
    ctl(ctl_path, &[&["mirror-attach", "--mode", "full", cap, "1M"][..], zeroed, &["--target", &target.uri()]].concat());
    std::thread::sleep(std::time::Duration::from_secs(1));
    let stats = ctl(ctl_path, &["stats"]);
    let elapsed = started.elapsed().as_secs_f64();
    let sent = stats["mirror"]["progress"]["bytes_sent"].as_u64().expect("bytes_sent");
    (stats, elapsed, sent)
}

/// Fills every other MiB of the first half of `image` with data.
fn half_full(image: &Path) -> u64 {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(image).expect("open");
    let mut written = 0;
    for i in (0..32u64).step_by(2) {
        f.write_all_at(&crate::harness::pattern(MIB as usize, i), i * MIB).expect("write");
        written += MIB;
    }
    written
}

/// The SMAPIv3 way: no snapshot; the mirror copies the whole disk in the background while a
/// guest keeps writing, converges, and ends byte-identical, sending little more than the data
/// plus what the guest wrote.
#[test]
fn full_mirror_converges_under_guest_writes_and_ends_identical() {
    let (source, ctl_path) = serve_controlled(64 * MIB);
    let allocated = half_full(&source.image);
    let target = crate::harness::serve(64 * MIB, &[]);
    let attached = ctl(&ctl_path, &["mirror-attach", "--mode", "full", "--target-is-zero", "--target", &target.uri()]);
    assert_eq!(attached["state"], "syncing");
    // The guest writes while the background copy runs.
    guest_writes(&source.uri());
    let stats = wait_ready(&ctl_path);
    ctl(&ctl_path, &["drain"]);
    assert!(source.contents() == target.contents(), "target differs from the source");
    let progress = &stats["mirror"]["progress"];
    let sent = progress["bytes_sent"].as_u64().expect("bytes_sent");
    let mirrored = stats["mirror"]["counters"]["bytes"].as_u64().expect("guest bytes mirrored");
    // What the guest wrote: fio's 16 MiB, then qemu-io's write, zeroing, discard and write.
    let guest = (16 << 20) + 3000 + 70_000 + (1 << 20) + 1_234_567;
    assert_eq!(progress["bytes_left"], 0, "{stats}");
    assert_eq!(progress["phase"], "converge", "{stats}");
    assert!(sent + mirrored <= (allocated + guest) * 12 / 10, "sent {sent} + mirrored {mirrored} for {allocated} allocated: {stats}");
}

/// `ctl mirror-attach --rate` caps the background copy from its first byte: after a second,
/// no more than a second's worth (plus one request and the bucket's burst) has been copied of
/// 16 MiB of data that an uncapped pass copies at once. A ceiling only, so a slow machine
/// cannot fail it. The pass is then in its first sweep (catch-up), so a guest write far ahead
/// of it, and the guest's flush, stay local: the target does not see them yet. `mirror-converge`
/// ends the catch-up: a write to a copied range then reaches the target at once. Then the cap
/// is lifted (`mirror-rate`) and the mirror still converges, with every write on the target.
#[test]
fn full_mirror_rate_caps_the_background_copy_from_the_start() {
    let (source, ctl_path) = serve_controlled(64 * MIB);
    let allocated = half_full(&source.image);
    let target = crate::harness::serve(64 * MIB, &[]);
    let (stats, elapsed, done) = attach_and_wait_a_second(&ctl_path, &target, "--rate", true);
    let ceiling = (elapsed * MIB as f64) as u64 + MIB / 10 + MIB;
    assert_eq!(stats["mirror"]["state"], "syncing", "{stats}");
    assert!(done <= ceiling, "{done} bytes copied in {elapsed:.2} s under a 1 MiB/s cap: {stats}");
    assert!(done < allocated, "{stats}");
    assert_eq!(stats["mirror"]["progress"]["phase"], "catch-up", "{stats}");
    assert_eq!(stats["mirror"]["progress"]["guest_busy"], false, "no guest has written yet: {stats}");

    // qemu-io writes and then flushes on exit.
    run(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0x5a 60M 64k", &source.uri()]));
    let stats = ctl(&ctl_path, &["stats"]);
    assert_eq!(stats["mirror"]["progress"]["phase"], "catch-up", "{stats}");
    assert_eq!(stats["mirror"]["progress"]["deferred_writes"], 1, "{stats}");
    assert_eq!(stats["mirror"]["counters"]["writes"], 0, "{stats}");
    assert_eq!(stats["mirror"]["counters"]["flushes"], 0, "{stats}");
    assert!(target.contents()[60 << 20..][..64 << 10].iter().all(|&b| b == 0), "a write in catch-up reached the target");

    // Catch-up ended on request: a write to a copied range (a hole, clean on a zeroed target)
    // now reaches the target at once, while the deferred one still waits for the pass.
    let converged = ctl(&ctl_path, &["mirror-converge"]);
    assert_eq!(converged["progress"]["phase"], "converge", "{converged}");
    assert_eq!(converged["progress"]["converge_cause"], "requested", "{converged}");
    run(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0x6b 40M 64k", &source.uri()]));
    let stats = ctl(&ctl_path, &["stats"]);
    assert_eq!(stats["mirror"]["counters"]["writes"], 1, "{stats}");
    assert_eq!(stats["mirror"]["state"], "syncing", "{stats}");
    assert!(target.contents()[40 << 20..][..64 << 10].iter().all(|&b| b == 0x6b), "a write after mirror-converge missed the target");
    assert!(target.contents()[60 << 20..][..64 << 10].iter().all(|&b| b == 0), "the pass is still capped");

    ctl(&ctl_path, &["mirror-rate", "0"]);
    wait_ready(&ctl_path);
    assert!(source.contents() == target.contents(), "target differs from the source");
    assert!(target.contents()[60 << 20..][..64 << 10].iter().all(|&b| b == 0x5a));
}

/// Only data counts against a cap. Without `--target-is-zero` the pass copies holes too, as
/// zeroes, and it does not know a run's holes until it copies the run; holes must not take the
/// cap's time. With the data in the last MiB of 64, after a second under a 1 MiB/s cap the pass
/// has long been through the 63 MiB of holes before it, while it has sent no more data than the
/// cap allows. Charged for holes it would have done about a MiB.
#[test]
fn full_mirror_cap_counts_data_not_holes() {
    let (source, ctl_path) = serve_controlled(64 * MIB);
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&source.image).expect("open");
        f.write_all_at(&crate::harness::pattern(MIB as usize, 9), 63 * MIB).expect("write");
    }
    let target = crate::harness::serve(64 * MIB, &[]);
    // Not "after one second": how far the pass gets in a second depends on the machine. Charged
    // for holes it would need 32 s for 32 MiB at 1 MiB/s; uncharged, it gets there in well under
    // half that, however loaded the machine, and the data it sent meanwhile keeps to the cap.
    let started = std::time::Instant::now();
    ctl(&ctl_path, &["mirror-attach", "--mode", "full", "--rate", "1M", "--target", &target.uri()]);
    let (stats, elapsed) = loop {
        let stats = ctl(&ctl_path, &["stats"]);
        let elapsed = started.elapsed().as_secs_f64();
        if stats["mirror"]["progress"]["bytes_done"].as_u64().expect("bytes_done") >= 32 * MIB {
            break (stats, elapsed);
        }
        assert!(elapsed < 16.0, "not 32 MiB done in {elapsed:.2} s, most of them holes: {stats}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let sent = stats["mirror"]["progress"]["bytes_sent"].as_u64().expect("bytes_sent");
    assert!(sent <= (elapsed * MIB as f64) as u64 + MIB / 10 + MIB, "{sent} bytes of data in {elapsed:.2} s under a 1 MiB/s cap: {stats}");
    wait_ready(&ctl_path);
    assert!(source.contents() == target.contents(), "target differs from the source");
}

/// A guest that dirties the disk faster than the pass copies it: the pass is held (a cap of
/// one byte per second) three quarters of the way through its first sweep while the guest
/// writes all over the disk, so the sweep ends with more than half still dirty. The mirror then
/// converges by mirroring the guest's writes to copied ranges, while the guest keeps writing,
/// and the target holds every write the guest made, sector by sector.
#[test]
fn full_mirror_converges_under_a_guest_that_outpaces_the_pass() {
    const SIZE: u64 = 4 * MIB;
    let (source, ctl_path) = serve_controlled(SIZE);
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&source.image).expect("open");
        f.write_all_at(&crate::harness::pattern(SIZE as usize, 4), 0).expect("write");
    }
    let before = source.contents();
    let target = crate::harness::serve(SIZE, &[]);
    let guest = crate::harness::Guest::start(source.uri(), SIZE, 17);
    guest.wait_for_more_writes(100);
    ctl(&ctl_path, &["mirror-attach", "--mode", "full", "--rate", "1M", "--target", &target.uri()]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let stats = ctl(&ctl_path, &["stats"]);
        if stats["mirror"]["progress"]["bytes_done"].as_u64().unwrap_or(0) >= 3 * MIB {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the pass never got 3 MiB along: {stats}");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    ctl(&ctl_path, &["mirror-rate", "1"]);
    let held = ctl(&ctl_path, &["stats"]);
    assert_eq!(held["mirror"]["progress"]["phase"], "catch-up", "{held}");
    // About 3000 of these land behind the pass, on 768 granules.
    guest.wait_for_more_writes(4000);
    ctl(&ctl_path, &["mirror-rate", "0"]);
    let stats = wait_ready(&ctl_path);
    guest.wait_for_more_writes(100);
    let (model, _) = guest.stop();
    assert_eq!(ctl(&ctl_path, &["drain"])["mirror"], "ready");
    assert_eq!(stats["mirror"]["progress"]["converge_cause"], "guest-outpaced", "{stats}");
    let after = ctl(&ctl_path, &["stats"]);
    assert!(after["mirror"]["counters"]["writes"].as_u64().unwrap_or(0) >= 100, "writes after ready are mirrored: {after}");
    assert!(after["mirror"]["progress"]["deferred_writes"].as_u64().unwrap_or(0) >= 4000, "{after}");
    crate::harness::assert_matches_guest(&target.contents(), &model, &before, "target");
    assert!(source.contents() == target.contents(), "target differs from the source");
}

/// While the guest writes, the pass keeps to the busy rate (`--busy-rate`): with the guest
/// writing all along, a second in, no more than a second's worth of a 1 MiB/s busy cap (plus
/// the bucket's burst and one request) of 16 MiB of data has been copied. That holds from the
/// first request: the pass starts paced rather than waiting to see a guest write, which let
/// four requests out at once. `mirror-rate --busy
/// 0` lifts it while the guest keeps writing, and the mirror converges with every write on the
/// target, sector by sector.
#[test]
fn full_mirror_keeps_to_the_busy_rate_while_the_guest_writes() {
    let (source, ctl_path) = serve_controlled(64 * MIB);
    let allocated = half_full(&source.image);
    let before = source.contents();
    let target = crate::harness::serve(64 * MIB, &[]);
    let guest = crate::harness::Guest::start(source.uri(), 64 * MIB, 23);
    guest.wait_for_more_writes(100);
    let (stats, elapsed, done) = attach_and_wait_a_second(&ctl_path, &target, "--busy-rate", false);
    let ceiling = (elapsed * MIB as f64) as u64 + MIB / 10 + MIB;
    assert!(ceiling < allocated);
    assert_eq!(stats["mirror"]["state"], "syncing", "{stats}");
    assert_eq!(stats["mirror"]["progress"]["busy_rate"], MIB, "{stats}");
    assert_eq!(stats["mirror"]["progress"]["guest_busy"], true, "{stats}");
    assert!(done <= ceiling, "{done} bytes copied in {elapsed:.2} s under a 1 MiB/s busy cap: {stats}");

    let lifted = ctl(&ctl_path, &["mirror-rate", "--busy", "0"]);
    assert_eq!(lifted["busy"], true, "{lifted}");
    assert_eq!(ctl(&ctl_path, &["stats"])["mirror"]["progress"]["busy_rate"], 0);
    wait_ready(&ctl_path);
    stop_guest_and_compare(guest, &ctl_path, &source, &target, &before);
}

/// Onto a zeroed target the pass first clears the image's holes from the bitmap, while the
/// server runs: a guest write that fills a hole while that walk is under way must still reach
/// the target. 4096 small data extents keep the walk going for a while under a guest writing
/// all over the disk, mostly into holes. (A walk that clears what it saw without locking and
/// looking again failed this in one run of three.)
#[test]
fn full_mirror_skips_holes_without_losing_guest_writes_into_them() {
    const SIZE: u64 = 256 * MIB;
    let (source, ctl_path) = serve_controlled(SIZE);
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&source.image).expect("open");
        for i in 0..SIZE / (64 << 10) {
            f.write_all_at(&crate::harness::pattern(4096, i), i * (64 << 10)).expect("write");
        }
    }
    let before = source.contents();
    let target = crate::harness::serve(SIZE, &[]);
    let guest = crate::harness::Guest::start(source.uri(), SIZE, 29);
    guest.wait_for_more_writes(100);
    ctl(&ctl_path, &["mirror-attach", "--mode", "full", "--target-is-zero", "--busy-rate", "0", "--target", &target.uri()]);
    wait_ready(&ctl_path);
    stop_guest_and_compare(guest, &ctl_path, &source, &target, &before);
}

/// Fills the first `mib` MiB of `image` with data.
fn fill_mib(image: &Path, mib: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(image).expect("open");
    for i in 0..mib {
        f.write_all_at(&crate::harness::pattern(MIB as usize, i), i * MIB).expect("write");
    }
}

/// An nbdkit memory export of `size` bytes behind its log filter: the server, the directory
/// its socket and log are in, its URI, and the log (one line as each request begins, another
/// as it ends).
pub(crate) fn logged_target(size: u64) -> (crate::harness::Proc, tempfile::TempDir, String, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let (socket, log) = (dir.path().join("k.sock"), dir.path().join("k.log"));
    let k = spawn_server(
        Command::new("nbdkit").args(["-f", "-U"]).arg(&socket).args(["--filter=log", "memory", &size.to_string()]).arg(format!("logfile={}", log.display())),
        &socket,
    );
    let uri = format!("nbd+unix:///?socket={}", socket.display());
    (k, dir, uri, log)
}

/// The pass flushes the target as it goes, one flush per 64 MiB it sent, so the target's page
/// cache never holds the whole disk for the ready flush to write back at once, and once more
/// before the converge phase. nbdkit's log filter in front of the target shows the order: a
/// flush before the pass's last write.
#[test]
fn full_mirror_flushes_the_target_while_it_copies() {
    crate::require!("nbdkit", "qemu-img");
    let (source, ctl_path, source_log) = serve_controlled_logged(256 * MIB);
    fill_mib(&source.image, 160);
    let (_k, _dir, uri, log) = logged_target(256 * MIB);
    ctl(&ctl_path, &["mirror-attach", "--mode", "full", "--target-is-zero", "--target", &uri]);
    wait_ready(&ctl_path);
    run(Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw"]).arg(&source.image).arg(&uri));

    let requests = target_requests(&log);
    let first_flush = requests.iter().position(|r| r.kind == "Flush").expect("the target was flushed");
    let last_write = requests.iter().rposition(|r| r.kind == "Write").expect("the pass wrote");
    let writes_after = requests[first_flush..].iter().filter(|r| r.kind == "Write").count();
    assert!(first_flush < last_write, "the first flush came after the last write: {} requests", requests.len());
    // 160 one-MiB writes; the first flush comes after 64 of them (give or take those in flight).
    assert!((80..=100).contains(&writes_after), "{writes_after} writes after the first flush");
    assert_flushed_before_converging(&requests, &requests[last_write].conn, &source_log);
}

/// While the guest writes, the pass flushes the target every 8 MiB it sends rather than every
/// 64, and once more just before the converge phase: the guest's writes stall around each
/// flush, the longer the more the target writes back, and from the converge phase on they wait
/// on the target too. nbdkit's log filter in front of the target shows both. The pass's
/// connection is the one that writes first (guest writes reach the target only from the
/// converge phase on, over the other).
#[test]
fn full_mirror_flushes_often_while_the_guest_writes_and_before_it_converges() {
    crate::require!("nbdkit", "qemu-img");
    let (source, ctl_path, source_log) = serve_controlled_logged(64 * MIB);
    fill_mib(&source.image, 48);
    let (_k, _dir, uri, log) = logged_target(64 * MIB);
    let guest = crate::harness::Guest::start(source.uri(), 64 * MIB, 31);
    guest.wait_for_more_writes(100);
    ctl(&ctl_path, &["mirror-attach", "--mode", "full", "--target-is-zero", "--target", &uri]);
    wait_ready(&ctl_path);
    guest.wait_for_more_writes(100);
    guest.stop();
    assert_eq!(ctl(&ctl_path, &["drain"])["mirror"], "ready");
    run(Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw"]).arg(&source.image).arg(&uri));

    let requests = target_requests(&log);
    let pass = &requests.iter().find(|r| r.kind == "Write").expect("the pass wrote").conn;
    let first_guest = requests.iter().position(|r| &r.conn != pass && r.kind == "Write").expect("guest writes reached the target once converging");
    let before: Vec<_> = requests[..first_guest].iter().filter(|r| &r.conn == pass).collect();
    let sent: u64 = before.iter().filter(|r| r.kind == "Write").map(|r| r.bytes).sum();
    let flushes = before.iter().filter(|r| r.kind == "Flush").count() as u64;
    // One per 8 MiB (the 64 MiB rate would make at most one here); half of that at least, since
    // one flush is in flight at a time and a slow machine may leave the guest idle for a moment.
    assert!(flushes * 2 + 1 >= sent / (8 * MIB), "{flushes} flushes for {sent} bytes sent while the guest wrote");
    assert_flushed_before_converging(&requests, pass, &source_log);
}

/// A request as nbdkit's log filter saw it begin.
#[derive(Debug)]
struct TargetRequest {
    when: Stamp,
    conn: String,
    /// `Write`, `Zero` or `Flush`.
    kind: &'static str,
    bytes: u64,
}

/// The requests in `log` (nbdkit's log filter's), in the order they began. nbdkit writes local
/// time, which [`logged_target`] runs in UTC.
fn target_requests(log: &Path) -> Vec<TargetRequest> {
    let log = std::fs::read_to_string(log).expect("nbdkit log");
    log.lines()
        .filter_map(|l| {
            let when = stamp(l.get(..26)?)?;
            let conn = l.split_whitespace().find_map(|w| w.strip_prefix("connection="))?.to_owned();
            let kind = ["Write", "Zero", "Flush"].into_iter().find(|k| l.contains(&format!(" {k} id=")))?;
            let bytes = l.split_whitespace().find_map(|w| w.strip_prefix("count=0x")).map_or(0, |c| u64::from_str_radix(c, 16).unwrap_or(0));
            Some(TargetRequest { when, conn, kind, bytes })
        })
        .collect()
}

/// The pass waits for its copies, flushes, and only then converges, so that the guest's
/// mirrored writes do not wait behind the write-back of what it sent: the last request the pass
/// (connection `pass`) began before the converge phase is that flush. The source logs the
/// phase's start after the flush's reply, so by then the target had logged the flush.
fn assert_flushed_before_converging(requests: &[TargetRequest], pass: &str, source_log: &Path) {
    let source_log = std::fs::read_to_string(source_log).expect("source log");
    let line = source_log.lines().find(|l| l.contains("full mirror converging")).expect("the source logged the converge phase");
    let converged = line.get(..26).map(|t| t.replacen('T', " ", 1)).and_then(|t| stamp(&t)).unwrap_or_else(|| panic!("no time in {line:?}"));
    let last = requests.iter().rfind(|r| r.conn == pass && r.when < converged).expect("the pass sent before converging");
    assert_eq!(last.kind, "Flush", "the pass's last request before the converge phase ({line}) was {last:?}");
}

/// Date and microsecond of the day of a log line's `YYYY-MM-DD HH:MM:SS.ffffff` prefix.
type Stamp = (String, u64);

fn stamp(text: &str) -> Option<Stamp> {
    let (date, time) = text.split_once(' ')?;
    let (hms, frac) = time.split_once('.')?;
    let mut parts = hms.split(':').map(|p| p.parse::<u64>().ok());
    let (h, m, s) = (parts.next()??, parts.next()??, parts.next()??);
    let micros: u64 = frac.get(..6)?.parse().ok()?;
    Some((date.to_owned(), ((h * 60 + m) * 60 + s) * 1_000_000 + micros))
}

/// Onto a target full of garbage, holes must be zeroed too.
#[test]
fn full_mirror_zeroes_what_the_target_must_not_keep() {
    let (source, ctl_path) = serve_controlled(16 * MIB);
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&source.image).expect("open");
        f.write_all_at(&crate::harness::pattern(3 * MIB as usize, 9), 5 * MIB).expect("write");
    }
    let target = crate::harness::serve(16 * MIB, &[]);
    std::fs::write(&target.image, vec![0xeeu8; 16 << 20]).expect("garbage");
    ctl(&ctl_path, &["mirror-attach", "--mode", "full", "--granularity", "65536", "--target", &target.uri()]);
    let stats = wait_ready(&ctl_path);
    assert_eq!(stats["mirror"]["progress"]["granularity"], 65536);
    assert!(source.contents() == target.contents(), "garbage survived on the target");
}

/// `nbd-accept` serves a socket passed by descriptor like an accepted connection: our client on
/// the other end of a socketpair writes and reads, the connection is counted, `pause` holds its
/// requests, and `shutdown` ends it.
#[test]
fn nbd_accept_serves_a_passed_socket_like_an_accepted_one() {
    use std::os::fd::OwnedFd;
    let (mut source, ctl_path) = serve_controlled(16 * MIB);
    let connections = ctl(&ctl_path, &["stats"])["connections"].as_u64().expect("connections");
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().expect("socketpair");
    let theirs = OwnedFd::from(theirs);
    let a = tapmirror::control::request(&ctl_path, &serde_json::json!({"cmd": "nbd-accept"}), Some(&theirs)).expect("request");
    assert_eq!(a["ok"], true, "{a}");
    assert_eq!(a["socket"], "unix", "{a}");
    drop(theirs);

    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("runtime");
    let client = rt
        .block_on(tapmirror::nbd::NbdClient::from_fd(OwnedFd::from(ours), tapmirror::nbd::ClientOptions::default()))
        .expect("NBD on the passed socket");
    assert_eq!(client.size(), 16 * MIB);
    let data = crate::harness::pattern(64 << 10, 5);
    rt.block_on(client.write(3 * MIB, data.clone(), false)).expect("write");
    assert_eq!(rt.block_on(client.read(3 * MIB, data.len())).expect("read"), data);
    rt.block_on(client.flush()).expect("flush");
    assert!(source.contents()[3 * MIB as usize..][..data.len()] == data[..], "the write reached the image");
    let stats = ctl(&ctl_path, &["stats"]);
    assert_eq!(stats["connections"].as_u64(), Some(connections + 1), "{stats}");

    // Paused: a request on the passed connection waits like any other.
    ctl(&ctl_path, &["pause"]);
    let held = rt.spawn({
        let c = client.clone();
        async move { c.write(0, vec![0x5au8; 4096], false).await }
    });
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(!held.is_finished(), "a write went through a paused server");
    assert_eq!(source.contents()[0], 0, "a write reached the image while paused");
    ctl(&ctl_path, &["unpause"]);
    rt.block_on(held).expect("join").expect("the held write completes after unpause");
    assert_eq!(source.contents()[0], 0x5a);

    // Shutdown ends the connection, and the server exits cleanly.
    ctl(&ctl_path, &["shutdown"]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let status = loop {
        if let Some(s) = source.proc.0.as_mut().expect("child").try_wait().expect("try_wait") {
            source.proc.0 = None;
            break s;
        }
        assert!(std::time::Instant::now() < deadline, "the server did not exit after shutdown with a passed connection open");
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert!(status.success(), "{status}");
    assert!(rt.block_on(client.read(0, 512)).is_err(), "the passed connection outlived the server");
}

/// `nbd-accept` greets a passed connection as xapi's sources expect: old style when asked (what
/// tapdisk's server speaks on an SMAPIv1 host; QEMU's client, ours and tapdisk's take it), and
/// in fixed newstyle under any export name (tapdisk's client asks for `tapdisk_client` and a
/// NUL byte with NBD_OPT_EXPORT_NAME).
#[test]
fn nbd_accept_greets_old_style_or_takes_any_export_name() {
    use std::io::{Read, Write};
    use std::os::fd::OwnedFd;
    crate::require!("qemu-io");
    let (source, ctl_path) = serve_controlled(16 * MIB);
    let pass = |fd: OwnedFd, handshake: &str| {
        let a = tapmirror::control::request(&ctl_path, &serde_json::json!({"cmd": "nbd-accept", "handshake": handshake}), Some(&fd)).expect("request");
        assert_eq!(a["ok"], true, "{a}");
    };

    // Old style, QEMU's client: qemu-io connects to a socket of ours, whose connection we pass.
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("old.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).expect("listen");
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    let qemu = std::thread::spawn(move || {
        Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0x6b 4096 65536", "-c", "read -P 0x6b 4096 65536", &uri]).output().expect("qemu-io")
    });
    let (conn, _) = listener.accept().expect("accept");
    pass(OwnedFd::from(conn), "oldstyle");
    let out = qemu.join().expect("join");
    assert!(out.status.success() && !String::from_utf8_lossy(&out.stdout).contains("fail"), "qemu-io over old style: {out:?}");
    assert!(source.contents()[4096..4096 + 65536].iter().all(|&b| b == 0x6b), "qemu-io's write did not reach the image");

    // Old style, our own client (the mirror's, on xapi's `/services/SM/nbd/`).
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().expect("socketpair");
    pass(OwnedFd::from(theirs), "oldstyle");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let client = rt.block_on(tapmirror::nbd::NbdClient::from_fd(OwnedFd::from(ours), tapmirror::nbd::ClientOptions::default())).expect("old-style handshake");
    assert_eq!(client.size(), 16 * MIB);
    assert!(client.info().has(tapmirror::nbd::proto::tflags::SEND_WRITE_ZEROES), "{:?}", client.info());
    rt.block_on(client.write_zeroes(4096, 4096, false, false)).expect("write zeroes");
    assert_eq!(rt.block_on(client.read(0, 12288)).expect("read"), [vec![0u8; 8192], vec![0x6b; 4096]].concat());

    // Fixed newstyle, tapdisk's client byte for byte: flags, EXPORT_NAME "tapdisk_client\0".
    let (mut ours, theirs) = std::os::unix::net::UnixStream::pair().expect("socketpair");
    pass(OwnedFd::from(theirs), "newstyle");
    let mut greeting = [0u8; 18];
    ours.read_exact(&mut greeting).expect("greeting");
    assert_eq!(&greeting[..16], b"NBDMAGICIHAVEOPT");
    let mut hello = 3u32.to_be_bytes().to_vec(); // FIXED_NEWSTYLE | NO_ZEROES
    hello.extend_from_slice(b"IHAVEOPT");
    hello.extend_from_slice(&1u32.to_be_bytes()); // NBD_OPT_EXPORT_NAME
    hello.extend_from_slice(&15u32.to_be_bytes());
    hello.extend_from_slice(b"tapdisk_client\0");
    ours.write_all(&hello).expect("options");
    let mut export = [0u8; 10];
    ours.read_exact(&mut export).expect("the export, not a closed connection");
    assert_eq!(u64::from_be_bytes(export[..8].try_into().expect("8 bytes")), 16 * MIB);
    // A write (NBD_CMD_WRITE of 512 bytes at 0) and its simple reply.
    let mut req = 0x2560_9513u32.to_be_bytes().to_vec();
    req.extend_from_slice(&0u16.to_be_bytes());
    req.extend_from_slice(&1u16.to_be_bytes());
    req.extend_from_slice(&7u64.to_be_bytes());
    req.extend_from_slice(&0u64.to_be_bytes());
    req.extend_from_slice(&512u32.to_be_bytes());
    req.extend_from_slice(&[0x2du8; 512]);
    ours.write_all(&req).expect("write request");
    let mut reply = [0u8; 16];
    ours.read_exact(&mut reply).expect("reply");
    assert_eq!((&reply[..4], &reply[4..8], &reply[8..]), (&0x6744_6698u32.to_be_bytes()[..], &[0u8; 4][..], &7u64.to_be_bytes()[..]));
    assert!(source.contents()[..512].iter().all(|&b| b == 0x2d), "tapdisk's write did not reach the image");
}

/// `nbd-accept` with no descriptor, two, or one that is not a connected stream socket: an error,
/// no connection served, and a refused socket is closed at once (its peer sees EOF).
#[test]
fn nbd_accept_refuses_what_is_not_one_connected_stream_socket() {
    use std::io::Read;
    use std::os::fd::OwnedFd;
    let (source, ctl_path) = serve_controlled(16 * MIB);
    let before = ctl(&ctl_path, &["stats"]);
    // A control socket nobody serves: said so, not only the OS error.
    let gone = ctl_output(&ctl_path.with_file_name("gone.ctl"), &["stats"]);
    assert!(!gone.status.success() && String::from_utf8_lossy(&gone.stderr).contains("is not running"), "{gone:?}");
    let accept = |fds: Vec<&OwnedFd>| -> Value {
        tapmirror::control::request_with(&ctl_path, &serde_json::json!({"cmd": "nbd-accept"}), fds).expect("request")
    };
    let refused = |a: &Value, why: &str| {
        assert_eq!(a["ok"], false, "{a}");
        assert!(a["error"].as_str().unwrap_or("").contains(why), "wanted {why:?}: {a}");
    };
    refused(&accept(vec![]), "one descriptor, got 0");
    let (ours1, theirs1) = std::os::unix::net::UnixStream::pair().expect("socketpair");
    let (ours2, theirs2) = std::os::unix::net::UnixStream::pair().expect("socketpair");
    let (theirs1, theirs2) = (OwnedFd::from(theirs1), OwnedFd::from(theirs2));
    refused(&accept(vec![&theirs1, &theirs2]), "one descriptor, got 2");
    let file = OwnedFd::from(tempfile::tempfile().expect("tempfile"));
    refused(&accept(vec![&file]), "not a socket");
    let dir = tempfile::tempdir().expect("tempdir");
    let listening = OwnedFd::from(std::os::unix::net::UnixListener::bind(dir.path().join("l.sock")).expect("listen"));
    refused(&accept(vec![&listening]), "listening");
    let udp = OwnedFd::from(std::net::UdpSocket::bind("127.0.0.1:0").expect("udp"));
    refused(&accept(vec![&udp]), "not a stream");
    // More descriptors than fit a small control buffer: refused with an answer, and none of
    // them kept open in the server.
    let pid = source.proc.0.as_ref().expect("child").id();
    let open_fds = || std::fs::read_dir(format!("/proc/{pid}/fd")).expect("fds").count();
    let fds_before = open_fds();
    let many: Vec<OwnedFd> = (0..10).map(|_| OwnedFd::from(tempfile::tempfile().expect("tempfile"))).collect();
    for _ in 0..5 {
        refused(&accept(many.iter().collect()), "one descriptor, got 10");
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while open_fds() > fds_before {
        assert!(std::time::Instant::now() < deadline, "refused descriptors leaked: {} open, {fds_before} before", open_fds());
        std::thread::sleep(std::time::Duration::from_millis(20));
    }

    // The refused socketpair ends were let go: their peers see EOF, not a server greeting.
    drop((theirs1, theirs2));
    for mut ours in [ours1, ours2] {
        ours.set_read_timeout(Some(std::time::Duration::from_secs(5))).expect("timeout");
        let mut b = [0u8; 8];
        assert_eq!(ours.read(&mut b).expect("EOF, not a timeout"), 0, "a refused socket was served");
    }
    let after = ctl(&ctl_path, &["stats"]);
    assert_eq!(after["connections"], before["connections"], "{after}");
    assert_eq!(after["requests"], before["requests"], "{after}");
    // Still serving.
    run(Command::new(tapmirror()).arg("info").arg(source.uri()));
}

/// The snapshot switch as the engine drives it: the mirror is attached to a running server
/// first, then the server is paused and resumed on a new leaf. The mirror stays attached across
/// it, and writes after the switch reach the new leaf and the target.
#[test]
fn a_mirror_attached_before_a_leaf_switch_stays_attached() {
    crate::require!("qemu-io");
    let (source, ctl_path) = serve_controlled(16 * MIB);
    let target = crate::harness::serve(16 * MIB, &[]);
    assert_eq!(ctl(&ctl_path, &["mirror-attach", "--target", &target.uri()])["state"], "ready");
    run(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0x31 0 64k", &source.uri()]));
    ctl(&ctl_path, &["pause"]);
    let leaf = source.dir.path().join("leaf.raw");
    std::fs::File::create(&leaf).and_then(|f| f.set_len(16 * MIB)).expect("leaf");
    ctl(&ctl_path, &["unpause", "--leaf", leaf.to_str().expect("utf-8")]);
    assert_eq!(ctl(&ctl_path, &["stats"])["mirror"]["state"], "ready");
    run(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0x32 1M 64k", &source.uri()]));
    assert_eq!(ctl(&ctl_path, &["drain"])["mirror"], "ready");
    let stats = ctl(&ctl_path, &["stats"]);
    assert_eq!(stats["mirror"]["counters"]["writes"], 2, "{stats}");
    let t = target.contents();
    assert!(t[..64 << 10].iter().all(|&b| b == 0x31), "the write before the switch is on the target");
    assert!(t[1 << 20..(1 << 20) + (64 << 10)].iter().all(|&b| b == 0x32), "the write after the switch is on the target");
    let l = std::fs::read(&leaf).expect("leaf");
    assert!(l[1 << 20..(1 << 20) + (64 << 10)].iter().all(|&b| b == 0x32), "the write after the switch is on the new leaf");
    assert!(l[..64 << 10].iter().all(|&b| b == 0), "the new leaf took only the later write");

    // Detached while a guest keeps writing: in-flight writes finish on both sides first, so the
    // mirror ends detached, not failed, and the guest sees no error.
    let guest = crate::harness::Guest::start(source.uri(), 16 * MIB, 3);
    std::thread::sleep(std::time::Duration::from_millis(200));
    let detached = ctl(&ctl_path, &["mirror-detach"]);
    assert!(detached["counters"]["writes"].as_u64().unwrap_or(0) > 2, "{detached}");
    std::thread::sleep(std::time::Duration::from_millis(100));
    let (_, writes) = guest.stop();
    assert!(writes > 0);
    let stats = ctl(&ctl_path, &["stats"]);
    assert_eq!(stats["mirror"]["state"], "none", "{stats}");
    assert_eq!(stats["errors"], 0, "{stats}");
}

/// Shutting down a paused server whose client has a request held: the held request (never
/// started) is dropped and the server exits at once, rather than waiting for an unpause that
/// will not come.
#[test]
fn shutdown_of_a_paused_server_drops_held_requests() {
    let (mut source, ctl_path) = serve_controlled(16 * MIB);
    ctl(&ctl_path, &["pause"]);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let client = rt
        .block_on(tapmirror::nbd::NbdClient::connect(&tapmirror::nbd::NbdUri::parse(&source.uri()).expect("uri")))
        .expect("connect");
    let held = rt.spawn({
        let c = client.clone();
        async move { c.write(0, vec![0x6du8; 4096], false).await }
    });
    // Let the request reach the server and wait at its gate.
    rt.block_on(async { tokio::time::sleep(std::time::Duration::from_millis(300)).await });
    let started = std::time::Instant::now();
    ctl(&ctl_path, &["shutdown"]);
    let status = loop {
        if let Some(s) = source.proc.0.as_mut().expect("child").try_wait().expect("try_wait") {
            source.proc.0 = None;
            break s;
        }
        assert!(started.elapsed() < std::time::Duration::from_secs(10), "a paused server with a held request did not shut down");
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert!(status.success(), "{status}");
    assert!(rt.block_on(held).expect("join").is_err(), "the held write was answered");
    assert_eq!(source.contents()[0], 0, "the held write reached the image");
}

/// A guest that writes one block over and over (a log or a superblock), four writes at a time,
/// must not keep the mirror from converging: a write to a range that is dirty already stays
/// local without marking it again, so once the pass has copied the block, the guest's next
/// write is mirrored. The target then equals the source. (It guards convergence under a hot
/// block; the race the no-remark rule removes did not come up here under the old rule either.)
#[test]
fn full_mirror_converges_under_a_guest_hammering_one_block() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    const SIZE: u64 = 4 * MIB;
    const HOT: u64 = MIB + 8192;
    let (source, ctl_path) = serve_controlled(SIZE);
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&source.image).expect("open");
        f.write_all_at(&crate::harness::pattern(SIZE as usize, 6), 0).expect("write");
    }
    let target = crate::harness::serve(SIZE, &[]);
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU64::new(0));
    let guest = {
        let (stop, written, uri) = (Arc::clone(&stop), Arc::clone(&written), source.uri());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            rt.block_on(async move {
                let uri = tapmirror::nbd::NbdUri::parse(&uri).expect("uri");
                let client = tapmirror::nbd::NbdClient::connect(&uri).await.expect("connect");
                // Four writes in flight at once, each ending before the next is sent in its
                // lane, so that some write to the block is nearly always outstanding.
                let lane = |lane: u64| {
                    let (client, stop, written) = (client.clone(), Arc::clone(&stop), Arc::clone(&written));
                    async move {
                        while !stop.load(Ordering::Relaxed) {
                            let n = written.fetch_add(1, Ordering::Relaxed) + 1;
                            client.write(HOT + lane * 512, vec![(n % 251 + 1) as u8; 512], false).await.expect("guest write");
                        }
                    }
                };
                tokio::join!(lane(0), lane(1), lane(2), lane(3));
            })
        })
    };
    while written.load(Ordering::Relaxed) < 100 {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    ctl(&ctl_path, &["mirror-attach", "--mode", "full", "--target", &target.uri()]);
    let stats = wait_ready(&ctl_path);
    let at_ready = written.load(Ordering::Relaxed);
    while written.load(Ordering::Relaxed) < at_ready + 100 {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    stop.store(true, Ordering::Relaxed);
    guest.join().expect("guest");
    assert_eq!(ctl(&ctl_path, &["drain"])["mirror"], "ready");
    assert!(source.contents() == target.contents(), "target differs from the source: {stats}");
}

/// A full mirror of a 1000 TiB qcow2 volume (sxm takes qcow2 VDIs up to 2 PiB): the bitmap's
/// default granularity grows with the disk to keep it within 64 MiB (2 MiB a bit here), and
/// the mirror gets ready; a granularity too fine for the disk is refused. At 4 KiB always,
/// the bitmap's 32 GB allocation aborted the process serving the guest.
#[test]
fn a_full_mirror_of_a_1000_tib_disk_keeps_its_bitmap_small() {
    crate::require!("nbdkit", "qemu-io");
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("big.qcow2");
    run(Command::new(tapmirror()).args(["image", "create", "qcow2"]).arg(&image).arg("1000T"));
    let ctl_path = dir.path().join("ctl.sock");
    let ctl_arg = ctl_path.display().to_string();
    let source = serve_file(dir, image, &["--control", &ctl_arg]);
    let far = 500u64 << 40;
    run(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0x11 0 1M", "-c", &format!("write -P 0x22 {far} 1M"), &source.uri()]));
    let tdir = tempfile::tempdir().expect("tempdir");
    let socket = tdir.path().join("k.sock");
    let _k = spawn_server(Command::new("nbdkit").args(["-f", "-U"]).arg(&socket).args(["memory", "1000T"]), &socket);
    let target = format!("nbd+unix:///?socket={}", socket.display());

    let out = ctl_output(&ctl_path, &["mirror-attach", "--mode", "full", "--granularity", "512", "--target", &target]);
    let said = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && said.contains("coarser granularity"), "{said}");
    ctl(&ctl_path, &["mirror-attach", "--mode", "full", "--target-is-zero", "--target", &target]);
    let stats = wait_ready(&ctl_path);
    assert_eq!(stats["mirror"]["progress"]["granularity"], 2 << 20, "{stats}");
    run(Command::new("qemu-io").args(["-f", "raw", "-c", "read -P 0x11 0 1M", "-c", &format!("read -P 0x22 {far} 1M"), "-c", "read -P 0 1M 1M", &target]));
}

/// In a full mirror's catch-up a guest write stays local: it must not wait for a copy of its
/// range that the target holds up. It used to queue on the copy's range lock, and behind a
/// stopped target the guest's writes stalled for the whole mirror timeout (a tester's fio at
/// queue depth 16 wrote nothing for 8 s). Here the target takes 30 s over each write and the
/// timeout is a minute: the guest's write into the range being copied completes while the
/// copy still waits, and the mirror is still syncing, unfailed.
#[test]
fn a_guest_write_in_catch_up_does_not_wait_for_a_copy_the_target_holds_up() {
    crate::require!("nbdkit", "qemu-io");
    let (source, ctl_path) = serve_controlled(16 * MIB);
    {
        // Data in the first MiB only: the pass's one copy is of the range the guest writes.
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&source.image).expect("open");
        f.write_all_at(&crate::harness::pattern(MIB as usize, 3), 0).expect("write");
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let (socket, log) = (dir.path().join("slow.sock"), dir.path().join("target.log"));
    let _slow = spawn_server(
        Command::new("nbdkit")
            .args(["-f", "-U"])
            .arg(&socket)
            .args(["--filter=log", "--filter=delay", "memory", "16M", "delay-write=30"])
            .arg(format!("logfile={}", log.display())),
        &socket,
    );
    let target = format!("nbd+unix:///?socket={}", socket.display());
    ctl(&ctl_path, &["mirror-attach", "--mode", "full", "--timeout-ms", "60000", "--target", &target]);
    // The copy's write has reached the target, which sits on it: its range is held.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !std::fs::read_to_string(&log).unwrap_or_default().contains("Write") {
        assert!(std::time::Instant::now() < deadline, "the pass never wrote to the target");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // The guest's write into that range, given 20 s (the target's delay is 30 s, the timeout 60).
    let out = Command::new("timeout")
        .args(["20", "qemu-io", "-f", "raw", "-c", "write -P 0x7e 4096 4096", "-c", "read -P 0x7e 4096 4096", &source.uri()])
        .output()
        .expect("qemu-io");
    assert!(out.status.success(), "the guest's write waited on the target: {}", String::from_utf8_lossy(&out.stderr));
    let stats = ctl(&ctl_path, &["stats"]);
    assert_eq!(stats["mirror"]["state"], "syncing", "{stats}");
    assert_eq!(stats["mirror"]["progress"]["phase"], "catch-up", "{stats}");
    ctl(&ctl_path, &["mirror-detach"]);
}
