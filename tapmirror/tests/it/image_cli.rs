//! `tapmirror image` and `serve --format auto` across formats, judged by qemu where it reads
//! the format.

use std::process::Command;

use serde_json::Value;

use crate::harness::{exits_within, run, serve_file, tapmirror};

const MIB: u64 = 1 << 20;

fn image(args: &[&str], path: &std::path::Path) -> Value {
    let out = run(Command::new(tapmirror()).arg("image").arg(args[0]).args(&args[1..]).arg(path));
    serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
}

fn create(format: &str, path: &std::path::Path, size: &str) {
    run(Command::new(tapmirror()).args(["image", "create", format]).arg(path).arg(size));
}

#[test]
fn create_info_map_check_for_every_format() {
    let dir = tempfile::tempdir().expect("tempdir");
    for format in ["raw", "vhd", "qcow2"] {
        let path = dir.path().join(format!("d.{format}"));
        create(format, &path, "64M");
        let info = image(&["info"], &path);
        assert_eq!(info["format"], format, "{info}");
        assert_eq!(info["virtual_size"], 64 * MIB, "{info}");
        assert_eq!(info["chain"].as_array().map(|c| c.len()), Some(1), "{info}");
        let map = image(&["map"], &path);
        assert_eq!(map["map"][0]["type"], "hole", "{format}: a new image is all hole: {map}");
        run(Command::new(tapmirror()).args(["image", "check"]).arg(&path));
        // Never overwritten.
        let again = Command::new(tapmirror()).args(["image", "create", format]).arg(&path).arg("1M").output().expect("run");
        assert!(!again.status.success(), "{format}: create over an existing file must fail");
        assert_eq!(image(&["info"], &path)["virtual_size"], 64 * MIB);
    }
}

/// Each format served with `--format auto`, written by qemu-io, then read back through a fresh
/// server and mapped: data where written, the rest holes.
/// A create the file system refuses (a size past its largest file) says which file and
/// leaves none behind, so the same command with a size that fits then works.
#[test]
fn a_failed_create_leaves_no_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    for format in ["raw", "vhd", "qcow2"] {
        let path = dir.path().join(format!("big.{format}"));
        let out = Command::new(tapmirror()).args(["image", "create", format]).arg(&path).arg(i64::MAX.to_string()).output().expect("run");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(&path.display().to_string()), "{format}: {err}");
        assert!(!path.exists(), "{format}: the failed create left {}", path.display());
        create(format, &path, "1M");
    }
    // Never over a file that exists.
    let kept = dir.path().join("big.raw");
    let out = Command::new(tapmirror()).args(["image", "create", "raw"]).arg(&kept).arg("2M").output().expect("run");
    assert!(!out.status.success());
    assert_eq!(std::fs::metadata(&kept).expect("kept").len(), MIB);
}

/// While `tapmirror serve` writes an image, QEMU may read it (qemu-img info, no -U) but not
/// write it: QEMU sees our writer's lock as another QEMU's. Once the server is gone, it may.
#[test]
fn qemu_is_kept_from_writing_an_image_we_serve() {
    crate::require!("qemu-io", "qemu-img");
    let dir = tempfile::tempdir().expect("tempdir");
    for format in ["raw", "vhd", "qcow2"] {
        let path = dir.path().join(format!("served.{format}"));
        create(format, &path, "4M");
        let qemu_format = if format == "vhd" { "vpc" } else { format };
        let write = || Command::new("qemu-io").args(["-f", qemu_format, "-c", "write -P 0x5a 0 4k"]).arg(&path).output().expect("qemu-io");
        let server = serve_file(tempfile::tempdir().expect("tempdir"), path.clone(), &[]);
        let out = write();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains("lock"), "{format}: QEMU wrote an image we serve: {err}");
        run(Command::new("qemu-img").args(["info", "-f", qemu_format]).arg(&path));
        drop(server);
        // Let go with the server (a moment after it is reaped, as its rings are torn down).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !write().status.success() {
            assert!(std::time::Instant::now() < deadline, "{format}: QEMU still cannot write once the server is gone");
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
    // Nor the files a served image reads through (as QEMU keeps writers off its backing files).
    for format in ["vhd", "qcow2"] {
        let base = dir.path().join(format!("base.{format}"));
        let child = dir.path().join(format!("child.{format}"));
        create(format, &base, "4M");
        run(Command::new(tapmirror()).args(["image", "create", format]).arg(&child).arg("--parent").arg(&base));
        let qemu_format = if format == "vhd" { "vpc" } else { format };
        let server = serve_file(tempfile::tempdir().expect("tempdir"), child.clone(), &[]);
        let out = Command::new("qemu-io").args(["-f", qemu_format, "-c", "write -P 0x5a 0 4k"]).arg(&base).output().expect("qemu-io");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains("lock"), "{format}: QEMU wrote the base of an image we serve: {err}");
        drop(server);
    }
}

#[test]
fn serve_auto_detects_and_serves_every_format() {
    crate::require!("qemu-io");
    for format in ["raw", "vhd", "qcow2"] {
        // The image lives apart from the server's folder, which goes when the server does.
        let keep = tempfile::tempdir().expect("tempdir");
        let path = keep.path().join(format!("d.{format}"));
        create(format, &path, "64M");
        let served = serve_file(tempfile::tempdir().expect("tempdir"), path.clone(), &["--format", "auto"]);
        run(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0x3c 8M 1M", "-c", "write -P 0x3d 100 1000", &served.uri()]));
        drop(served);
        let map = image(&["map"], &path);
        let data: u64 = map["map"].as_array().expect("map").iter().filter(|e| e["type"] == "data").map(|e| e["length"].as_u64().unwrap_or(0)).sum();
        assert!((MIB + 1000..=8 * MIB).contains(&data), "{format}: {map}");
        let dir2 = tempfile::tempdir().expect("tempdir");
        let served = serve_file(dir2, path.clone(), &[]);
        run(Command::new("qemu-io").args(["-f", "raw", "-c", "read -P 0x3c 8M 1M", "-c", "read -P 0x3d 100 1000", "-c", "read -P 0 2M 1M", &served.uri()]));
    }
}

#[test]
fn children_of_vhd_and_qcow2_read_through_to_their_parents() {
    crate::require!("qemu-io");
    for format in ["vhd", "qcow2"] {
        let dir = tempfile::tempdir().expect("tempdir");
        let base = dir.path().join(format!("base.{format}"));
        let child = dir.path().join(format!("child.{format}"));
        create(format, &base, "32M");
        {
            let d = tempfile::tempdir().expect("tempdir");
            let s = serve_file(d, base.clone(), &[]);
            run(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0x11 0 2M", &s.uri()]));
        }
        run(Command::new(tapmirror()).args(["image", "create", format]).arg(&child).arg("--parent").arg(&base));
        let info = image(&["info"], &child);
        assert_eq!(info["chain"].as_array().map(|c| c.len()), Some(2), "{info}");
        let d = tempfile::tempdir().expect("tempdir");
        let s = serve_file(d, child.clone(), &[]);
        run(Command::new("qemu-io").args(["-f", "raw", "-c", "read -P 0x11 0 2M", "-c", "write -P 0x22 512 512", "-c", "read -P 0x22 512 512", "-c", "read -P 0x11 1024 1M", &s.uri()]));
        drop(s);
        // The parent did not change.
        let d = tempfile::tempdir().expect("tempdir");
        let s = serve_file(d, base.clone(), &["--read-only"]);
        run(Command::new("qemu-io").args(["-f", "raw", "-r", "-c", "read -P 0x11 0 2M", &s.uri()]));
        // A child with a size other than its parent's is refused.
        let bad = Command::new(tapmirror()).args(["image", "create", format]).arg(dir.path().join("bad")).arg("64M").arg("--parent").arg(&base).output().expect("run");
        assert!(!bad.status.success());
    }
}

#[test]
fn check_fails_on_a_damaged_image_with_a_message() {
    for format in ["vhd", "qcow2"] {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(format!("d.{format}"));
        create(format, &path, "16M");
        let mut bytes = std::fs::read(&path).expect("read");
        // Damage the header area (VHD: the footer copy and header; qcow2: the header fields).
        for b in bytes.iter_mut().skip(64).take(64) {
            *b ^= 0xff;
        }
        std::fs::write(&path, &bytes).expect("write");
        let out = Command::new(tapmirror()).args(["image", "check"]).arg(&path).output().expect("run");
        assert!(!out.status.success(), "{format}: check passed a damaged image");
        assert!(!out.stderr.is_empty(), "{format}: no message");
        assert_eq!(std::fs::read(&path).expect("read"), bytes, "{format}: check changed the file");
        let served = Command::new(tapmirror()).args(["serve", "--socket"]).arg(dir.path().join("s")).arg(&path).output().expect("run");
        assert!(!served.status.success(), "{format}: serve opened a damaged image");
        assert_eq!(std::fs::read(&path).expect("read"), bytes, "{format}: serve changed the file");
    }
}

/// A VHD whose end footer is damaged but whose copy at offset 0 is sound passes `check` with a
/// warning that says so, and reads from the copy (as libvhd and QEMU do).
#[test]
fn check_warns_of_a_damaged_end_footer_it_reads_past() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("d.vhd");
    create("vhd", &path, "16M");
    let mut bytes = std::fs::read(&path).expect("read");
    let end = bytes.len() - 512;
    bytes[end + 40] ^= 0xff; // the checksum no longer matches
    std::fs::write(&path, &bytes).expect("write");
    let out = Command::new(tapmirror()).args(["image", "check"]).arg(&path).output().expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("warning") && err.contains("using the copy at offset 0"), "{err}");
    assert_eq!(image(&["info"], &path)["virtual_size"], 16 << 20);
}

/// A FIFO named as the image is refused at once by `serve` and `copy`, with the format probed or
/// given, rather than blocking their open for ever.
#[test]
fn a_fifo_as_the_image_is_refused_not_waited_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fifo = dir.path().join("disk.img");
    assert!(Command::new("mkfifo").arg(&fifo).status().expect("mkfifo").success());
    let socket = dir.path().join("nbd.sock");
    let out = dir.path().join("out.raw");
    let runs: [Vec<&std::ffi::OsStr>; 3] = [
        vec!["serve".as_ref(), fifo.as_ref(), "--socket".as_ref(), socket.as_ref()],
        vec!["serve".as_ref(), "--format".as_ref(), "qcow2".as_ref(), fifo.as_ref(), "--socket".as_ref(), socket.as_ref()],
        vec!["copy".as_ref(), fifo.as_ref(), out.as_ref()],
    ];
    for args in runs {
        let child = Command::new(tapmirror())
            .args(&args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn tapmirror");
        let done = exits_within(child, std::time::Duration::from_secs(10), &format!("{args:?} blocked on the FIFO"));
        let said = String::from_utf8_lossy(&done.stderr);
        assert!(!done.status.success() && said.contains("not a regular file"), "{args:?}: {said}");
    }
}

/// `tapmirror image map IMAGE | head` ends quietly when its reader has gone, as `ls` does: no
/// panic on the broken pipe. (The map of a new image is short enough to fit a pipe's buffer,
/// so the reader is gone before the write.)
#[test]
fn image_map_whose_reader_has_gone_ends_quietly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("d.qcow2");
    create("qcow2", &path, "64M");
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    let out = Command::new(tapmirror()).args(["image", "map"]).arg(&path).stdout(writer).output().expect("run tapmirror");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked") && !err.contains("Broken pipe"), "{err}");
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(out.status.signal(), Some(13), "ends by SIGPIPE, as a pipeline expects: {:?}", out.status);
}
