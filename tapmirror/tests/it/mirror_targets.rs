//! The live mirror onto targets that do what the protocol allows but our own server does not:
//! requests served in parallel and completed out of order, no FLUSH or FUA, block size
//! limits, read-only exports; and a local side that fails where the target's succeeds.

use std::path::Path;
use std::process::Command;

use crate::harness::{Proc, run, spawn_server};
use crate::mirror::{ctl, ctl_output, serve_controlled, wait_ready};

const MIB: u64 = 1 << 20;

/// An nbdkit `eval` target over `file` (a raw file of `size` bytes), serving requests in
/// parallel. `pwrite_first` runs in each write's shell before the write, with the data in
/// `$t`; `extra` adds methods (`flush=…`). Without a `flush` method nbdkit offers neither
/// FLUSH nor FUA.
fn eval_target(dir: &Path, file: &Path, size: u64, pwrite_first: &str, extra: &[&str]) -> (Proc, String) {
    let socket = dir.join("eval.sock");
    let f = file.display();
    let mut cmd = Command::new("nbdkit");
    cmd.args(["-f", "-U"]).arg(&socket).args([
        "eval".to_owned(),
        "thread_model=echo parallel".to_owned(),
        format!("get_size=echo {size}"),
        "can_write=exit 0".to_owned(),
        format!("pread=dd if='{f}' skip=$4 count=$3 iflag=skip_bytes,count_bytes status=none"),
        format!(
            "pwrite=t=$(mktemp); cat > \"$t\"; {pwrite_first}; dd if=\"$t\" of='{f}' seek=$4 oflag=seek_bytes conv=notrunc status=none; rm -f \"$t\""
        ),
    ]);
    cmd.args(extra);
    let proc = spawn_server(&mut cmd, &socket);
    (proc, format!("nbd+unix:///?socket={}", socket.display()))
}

fn zeroed_file(path: &Path, size: u64) {
    std::fs::File::create(path).and_then(|f| f.set_len(size)).expect("target file");
}

fn same_disk(a: &Path, b: &Path) {
    run(Command::new("qemu-img").args(["compare", "-q", "-f", "raw", "-F", "raw"]).arg(a).arg(b));
}

/// Two overlapping guest writes in flight at once, where the target completes the first one
/// last (it sleeps on it; serving requests in parallel, as nbdkit's file plugin does, allows
/// that). The two sides must still end alike: each mirrored write holds its range until both
/// sides have it. They ended different (the target with the first write, the image with the
/// second), with the mirror reported ready.
#[test]
fn overlapping_writes_in_flight_end_alike_on_a_target_that_reorders() {
    crate::require!("nbdkit", "qemu-io", "qemu-img");
    for mode in ["sync", "full"] {
        let (source, ctl_path) = serve_controlled(MIB);
        let dir = tempfile::tempdir().expect("tempdir");
        let target = dir.path().join("target.raw");
        zeroed_file(&target, MIB);
        let slow_ones = r#"[ "$(head -c 1 "$t" | od -An -tx1 | tr -d ' ')" = 01 ] && sleep 0.5"#;
        let (_k, uri) = eval_target(dir.path(), &target, MIB, slow_ones, &["flush=exit 0"]);
        ctl(&ctl_path, &["mirror-attach", "--mode", mode, "--target", &uri]);
        if mode == "full" {
            wait_ready(&ctl_path);
        }
        run(Command::new("qemu-io").args(["-t", "writeback", "-f", "raw", "-c", "aio_write -P 1 0 4k", "-c", "aio_write -P 2 0 4k", "-c", "aio_flush", &source.uri()]));
        ctl(&ctl_path, &["drain"]);
        let stats = ctl(&ctl_path, &["stats"]);
        assert_eq!(stats["mirror"]["state"], "ready", "{mode}: {stats}");
        same_disk(&source.image, &target);
    }
}

/// A target that offers neither FLUSH nor FUA (nbdkit with no flush method) takes guest FUA
/// writes as plain writes and guest flushes as done, and a full mirror becomes ready on it.
/// The mirror failed on the first guest flush or FUA write (EINVAL from the target, which the
/// flag it never offered broke the protocol for), and a full mirror at its ready flush.
#[test]
fn a_target_without_flush_or_fua_mirrors_and_gets_ready() {
    crate::require!("nbdkit", "qemu-io", "qemu-img");
    for mode in ["sync", "full"] {
        let (source, ctl_path) = serve_controlled(4 * MIB);
        run(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0x33 0 1M", &source.uri()]));
        let dir = tempfile::tempdir().expect("tempdir");
        let target = dir.path().join("target.raw");
        if mode == "sync" {
            std::fs::write(&target, source.contents()).expect("target");
        } else {
            zeroed_file(&target, 4 * MIB);
        }
        let (_k, uri) = eval_target(dir.path(), &target, 4 * MIB, "true", &[]);
        ctl(&ctl_path, &["mirror-attach", "--mode", mode, "--target", &uri]);
        if mode == "full" {
            wait_ready(&ctl_path);
        }
        // qemu-io's default cache mode writes through: every write carries FUA, then a flush.
        run(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0x44 64k 64k", "-c", "flush", "-c", "write -P 0x45 2M 4k", &source.uri()]));
        ctl(&ctl_path, &["drain"]);
        let stats = ctl(&ctl_path, &["stats"]);
        assert_eq!(stats["mirror"]["state"], "ready", "{mode}: {stats}");
        same_disk(&source.image, &target);
    }
}

/// A target with block size limits (nbdkit's blocksize-policy filter, refusing what breaks
/// them): 4 KiB units, 64 KiB at most. Large guest writes and a full mirror's 1 MiB copies
/// are split to its maximum; a guest write, zeroing or trim that is not whole units reaches it
/// as the units around it, read back from the image. The mirror failed on the first of each.
#[test]
fn a_target_with_block_size_limits_gets_requests_within_them() {
    crate::require!("nbdkit", "qemu-io", "qemu-img");
    for mode in ["sync", "full"] {
        let (source, ctl_path) = serve_controlled(8 * MIB);
        run(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0x21 0 3M", "-c", "write -P 0x22 5000 3000", &source.uri()]));
        let dir = tempfile::tempdir().expect("tempdir");
        let target = dir.path().join("target.raw");
        if mode == "sync" {
            std::fs::write(&target, source.contents()).expect("target");
        } else {
            std::fs::write(&target, vec![0xeeu8; (8 * MIB) as usize]).expect("target");
        }
        let socket = dir.path().join("k.sock");
        let _k = spawn_server(
            Command::new("nbdkit").args(["-f", "-U"]).arg(&socket).args([
                "--filter=blocksize-policy",
                "file",
                &target.display().to_string(),
                "blocksize-minimum=4096",
                "blocksize-preferred=4096",
                "blocksize-maximum=65536",
                "blocksize-error-policy=error",
            ]),
            &socket,
        );
        ctl(&ctl_path, &["mirror-attach", "--mode", mode, "--target", &format!("nbd+unix:///?socket={}", socket.display())]);
        if mode == "full" {
            wait_ready(&ctl_path);
        }
        run(Command::new("qemu-io").args([
            "-t",
            "writeback",
            "-f",
            "raw",
            "-c",
            "write -P 0x31 1M 256k",
            "-c",
            "write -P 0x32 512 512",
            "-c",
            "write -P 0x33 12345 100",
            "-c",
            "write -z 70000 200000",
            "-c",
            "write -z 4000 100",
            "-c",
            "discard 300000 123456",
            &source.uri(),
        ]));
        ctl(&ctl_path, &["drain"]);
        let stats = ctl(&ctl_path, &["stats"]);
        assert_eq!(stats["mirror"]["state"], "ready", "{mode}: {stats}");
        ctl(&ctl_path, &["mirror-detach"]);
        same_disk(&source.image, &target);
    }
}

/// A read-only target is refused at attach: it was reported ready until the guest's first
/// write failed it, and with an idle guest a switch-over could have gone ahead into it.
#[test]
fn a_read_only_target_is_refused_at_attach() {
    crate::require!("nbdkit");
    let (_source, ctl_path) = serve_controlled(4 * MIB);
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("k.sock");
    let _k = spawn_server(Command::new("nbdkit").args(["-f", "-r", "-U"]).arg(&socket).args(["memory", "4M"]), &socket);
    for mode in ["sync", "full"] {
        let out = ctl_output(&ctl_path, &["mirror-attach", "--mode", mode, "--target", &format!("nbd+unix:///?socket={}", socket.display())]);
        let said = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && said.contains("read-only"), "{mode}: {said}");
        assert_eq!(ctl(&ctl_path, &["stats"])["mirror"]["state"], "none", "{mode}");
    }
}

/// A mirrored write that fails locally (here past the server's file size limit, `ulimit -f`)
/// while the target takes it fails the mirror: the two sides differ. It stayed ready, the
/// target holding data the image did not.
#[test]
fn a_local_write_that_fails_where_the_target_succeeds_fails_the_mirror() {
    crate::require!("qemu-io");
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("source.raw");
    zeroed_file(&image, 8 * MIB);
    let (socket, control) = (dir.path().join("nbd.sock"), dir.path().join("ctl.sock"));
    // 2 MiB of file at most (512-byte units); SIGXFSZ ignored, so writes past it get EFBIG.
    let script = format!(
        "trap '' XFSZ; ulimit -f 4096; exec '{}' serve '{}' --socket '{}' --control '{}'",
        crate::harness::tapmirror(),
        image.display(),
        socket.display(),
        control.display()
    );
    let _source = spawn_server(Command::new("sh").arg("-c").arg(&script), &socket);
    let target = crate::harness::serve(8 * MIB, &[]);
    ctl(&control, &["mirror-attach", "--target", &target.uri()]);
    let uri = format!("nbd+unix:///?socket={}", socket.display());
    run(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0x41 0 64k", &uri]));
    assert_eq!(ctl(&control, &["stats"])["mirror"]["state"], "ready");
    let out = Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0x44 4M 64k", &uri]).output().expect("qemu-io");
    assert!(!out.status.success() || String::from_utf8_lossy(&out.stdout).contains("failed"), "the local write past the limit succeeded: {out:?}");
    let stats = ctl(&control, &["stats"]);
    assert_eq!(stats["mirror"]["state"], "failed", "{stats}");
    assert!(stats["mirror"]["failure"].as_str().unwrap_or("").contains("local"), "{stats}");
}

/// A target that stops answering (SIGSTOP) while guest writes to one block queue on its range
/// lock: the first to time out fails the mirror, and every write behind it finishes locally at
/// once. Each one waited out a timeout of its own (8 writes, 16 s at 2 s). A detach then
/// returns, within the timeout, and the server takes a pause after it: the detach's flush had
/// no timeout and held every pause behind it for ever.
#[test]
fn writes_queued_behind_a_stalled_target_finish_once_it_fails_and_detach_returns() {
    crate::require!("nbdkit", "qemu-io");
    let (source, ctl_path) = serve_controlled(4 * MIB);
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("k.sock");
    let mut target = spawn_server(Command::new("nbdkit").args(["-f", "-U"]).arg(&socket).args(["memory", "4M"]), &socket);
    let uri = format!("nbd+unix:///?socket={}", socket.display());
    let stalled = |target: &Proc| {
        let pid = target.0.as_ref().expect("target").id();
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGSTOP).expect("stop the target");
    };
    ctl(&ctl_path, &["mirror-attach", "--timeout-ms", "3000", "--target", &uri]);
    stalled(&target);
    let started = std::time::Instant::now();
    let mut args = vec!["-t".to_owned(), "writeback".to_owned(), "-f".to_owned(), "raw".to_owned()];
    for i in 1..=8 {
        args.extend(["-c".to_owned(), format!("aio_write -P {i} 0 4k")]);
    }
    args.extend(["-c".to_owned(), "aio_flush".to_owned(), source.uri()]);
    run(Command::new("qemu-io").args(&args));
    let took = started.elapsed();
    // Each waiting out its own 3 s would take 24 s.
    assert!(took < std::time::Duration::from_secs(12), "8 writes behind a stalled target took {took:?}");
    let stats = ctl(&ctl_path, &["stats"]);
    assert_eq!(stats["mirror"]["state"], "failed", "{stats}");
    assert_eq!(stats["errors"], 0, "the guest saw errors: {stats}");

    // A second mirror onto the same stalled target, detached with nothing in flight.
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(target.0.as_ref().expect("target").id() as i32), nix::sys::signal::Signal::SIGCONT);
    ctl(&ctl_path, &["mirror-attach", "--timeout-ms", "2000", "--target", &uri]);
    stalled(&target);
    let detach = Command::new(crate::harness::tapmirror()).arg("ctl").arg(&ctl_path).arg("mirror-detach").spawn().expect("detach");
    let out = crate::harness::exits_within(detach, std::time::Duration::from_secs(20), "mirror-detach from a stalled target did not return");
    assert!(out.status.success(), "{out:?}");
    ctl(&ctl_path, &["pause"]);
    ctl(&ctl_path, &["unpause"]);
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(target.0.as_ref().expect("target").id() as i32), nix::sys::signal::Signal::SIGCONT);
    let _ = target.0.take().map(|mut c| {
        let _ = c.kill();
        c.wait()
    });
}

/// A guest write larger than the target's maximum block reaches it as many requests at once,
/// within one timeout: 256 requests of 4 KiB into a target taking 40 ms over each, which one
/// after another (10 s) failed the mirror at its 5 s timeout.
#[test]
fn a_split_write_goes_to_the_target_at_once_within_one_timeout() {
    crate::require!("nbdkit", "qemu-io", "qemu-img");
    let (source, ctl_path) = serve_controlled(4 * MIB);
    let dir = tempfile::tempdir().expect("tempdir");
    let target = dir.path().join("target.raw");
    zeroed_file(&target, 4 * MIB);
    let socket = dir.path().join("k.sock");
    let _k = spawn_server(
        Command::new("nbdkit").args(["-f", "-U"]).arg(&socket).args([
            "--filter=blocksize-policy",
            "--filter=delay",
            "file",
            &target.display().to_string(),
            "blocksize-minimum=512",
            "blocksize-preferred=4096",
            "blocksize-maximum=4096",
            "blocksize-error-policy=error",
            "delay-write=40ms",
        ]),
        &socket,
    );
    ctl(&ctl_path, &["mirror-attach", "--timeout-ms", "5000", "--target", &format!("nbd+unix:///?socket={}", socket.display())]);
    run(Command::new("qemu-io").args(["-t", "writeback", "-f", "raw", "-c", "write -P 7 1M 1M", &source.uri()]));
    ctl(&ctl_path, &["drain"]);
    let stats = ctl(&ctl_path, &["stats"]);
    assert_eq!(stats["mirror"]["state"], "ready", "{stats}");
    ctl(&ctl_path, &["mirror-detach"]);
    same_disk(&source.image, &target);
}

/// A guest zeroing with FUA is durable on the target before the guest hears back, as a write
/// with FUA is: the target saw the zeroing without FUA.
#[test]
fn zeroes_with_fua_are_durable_on_the_target() {
    crate::require!("nbdkit", "qemu-io");
    let (source, ctl_path) = serve_controlled(4 * MIB);
    let (_k, _dir, uri, log) = crate::mirror::logged_target(4 * MIB);
    ctl(&ctl_path, &["mirror-attach", "--target", &uri]);
    run(Command::new("qemu-io").args(["-t", "writeback", "-f", "raw", "-c", "write -z -f 8k 4k", &source.uri()]));
    ctl(&ctl_path, &["drain"]);
    let text = std::fs::read_to_string(&log).expect("target log");
    // A request's first line ends "...", its answer's begins "...Zero".
    let zero = text.lines().position(|l| l.contains(" Zero id=")).expect("the zeroing reached the target");
    // The target offers FUA, so the zeroing carries it (qemu-io's flush at its exit follows
    // in any case, and would hide a missing one).
    assert!(text.lines().nth(zero).is_some_and(|l| l.contains("fua=1")), "a FUA zeroing reached the target without FUA:\n{text}");
}

/// A target that writes in 64 KiB units: a full mirror's default granularity is its unit
/// (4 KiB, refused, was the default); an image that is no whole number of its units is
/// refused at attach, as its last bytes could never be mirrored.
#[test]
fn a_full_mirror_fits_its_granularity_to_the_target_and_refuses_a_size_it_cannot_hold() {
    crate::require!("nbdkit");
    let dir = tempfile::tempdir().expect("tempdir");
    let target = dir.path().join("target.raw");
    let limited = |size: u64| {
        zeroed_file(&target, size);
        let socket = dir.path().join(format!("k{size}.sock"));
        let k = spawn_server(
            Command::new("nbdkit").args(["-f", "-U"]).arg(&socket).args([
                "--filter=blocksize-policy",
                "file",
                &target.display().to_string(),
                "blocksize-minimum=65536",
                "blocksize-preferred=65536",
                "blocksize-maximum=1048576",
                "blocksize-error-policy=error",
            ]),
            &socket,
        );
        (k, format!("nbd+unix:///?socket={}", socket.display()))
    };
    let (source, ctl_path) = serve_controlled(4 * MIB);
    let (k, uri) = limited(4 * MIB);
    ctl(&ctl_path, &["mirror-attach", "--mode", "full", "--target", &uri]);
    let stats = wait_ready(&ctl_path);
    assert_eq!(stats["mirror"]["progress"]["granularity"], 65536, "{stats}");
    ctl(&ctl_path, &["mirror-detach"]);
    drop(k);
    drop(source);

    let odd = 4 * MIB + 4096;
    let (_source, ctl_path) = serve_controlled(odd);
    let (_k, uri) = limited(odd);
    let out = ctl_output(&ctl_path, &["mirror-attach", "--target", &uri]);
    let said = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && said.contains("no whole number"), "{said}");
}
