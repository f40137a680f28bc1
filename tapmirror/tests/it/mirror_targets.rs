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
