//! A live migration's data path, end to end on real processes, with our own guest writing
//! unaligned 512-byte runs the whole time: what the engine will drive through `tapmirror ctl`,
//! `tapmirror copy` and the image operations. Afterwards the destination must equal both the
//! source and the guest's own record of what it wrote.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::harness::{Guest, assert_matches_guest, run, serve_file, tapmirror};

const SIZE: u64 = 64 << 20;

fn create(format: &str, path: &Path, parent: Option<&Path>) {
    let mut c = Command::new(tapmirror());
    c.args(["image", "create", format]).arg(path);
    match parent {
        Some(p) => c.arg("--parent").arg(p),
        None => c.arg(SIZE.to_string()),
    };
    run(&mut c);
}

fn ctl(ctl: &Path, args: &[&str]) -> serde_json::Value {
    let out = run(Command::new(tapmirror()).arg("ctl").arg(ctl).args(args));
    serde_json::from_slice(&out.stdout).expect("ctl answer")
}

/// The bytes of an image (its whole chain), read through a fresh read-only server.
fn contents(image: &Path) -> Vec<u8> {
    let d = tempfile::tempdir().expect("tempdir");
    let s = serve_file(d, image.to_owned(), &["--read-only"]);
    let out = s.dir.path().join("contents.raw");
    run(Command::new(tapmirror()).arg("copy").arg(s.uri()).arg(&out));
    std::fs::read(&out).expect("read contents")
}

/// Writes some data into an image before the guest starts.
fn fill(image: &Path) {
    let d = tempfile::tempdir().expect("tempdir");
    let s = serve_file(d, image.to_owned(), &[]);
    run(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0x5a 0 8M", "-c", "write -P 0x6b 40M 3M", &s.uri()]));
}

fn control_path(dir: &tempfile::TempDir) -> (PathBuf, String) {
    let p = dir.path().join("ctl.sock");
    let s = p.display().to_string();
    (p, s)
}

/// SMAPIv1: snapshot the VDI under a paused datapath, mirror new writes into the destination
/// leaf, copy the frozen snapshot into the destination's parent while the guest keeps writing,
/// drain. The destination chain then equals the source chain and the guest's record.
#[test]
fn v1_snapshot_mirror_copy_ends_with_the_guests_disk() {
    crate::require!("qemu-io");
    let src_dir = tempfile::tempdir().expect("tempdir");
    let dst_dir = tempfile::tempdir().expect("tempdir");
    let vdi = src_dir.path().join("vdi.vhd");
    let frozen = src_dir.path().join("snapshot.vhd");
    create("vhd", &vdi, None);
    fill(&vdi);
    let before = contents(&vdi);

    // The guest's datapath, and the destination: a parent for the copy, a leaf on it for the
    // mirrored writes (xapi's receive_start makes the same pair).
    let (ctl_path, ctl_arg) = control_path(&src_dir);
    let mut src = serve_file(tempfile::tempdir().expect("tempdir"), vdi.clone(), &["--control", &ctl_arg]);
    let guest = Guest::start(src.uri(), SIZE, 11);
    let dst_parent = dst_dir.path().join("parent.vhd");
    let dst_leaf = dst_dir.path().join("leaf.vhd");
    create("vhd", &dst_parent, None);
    create("vhd", &dst_leaf, Some(&dst_parent));
    let mut dst = serve_file(tempfile::tempdir().expect("tempdir"), dst_leaf.clone(), &[]);
    std::thread::sleep(Duration::from_millis(100));

    // The snapshot switch: pause (the datapath lets go of the file), snapshot, attach the
    // mirror, resume on the new leaf. From here every guest write reaches both sides.
    ctl(&ctl_path, &["pause"]);
    tapmirror::image::vhd::snapshot(&vdi, &frozen).expect("snapshot");
    ctl(&ctl_path, &["mirror-attach", "--target", &dst.uri()]);
    ctl(&ctl_path, &["unpause", "--leaf", vdi.to_str().expect("utf-8")]);

    // The copy of the frozen base into the destination parent, with the guest still writing.
    run(Command::new(tapmirror()).arg("copy").arg(&frozen).arg(&dst_parent));
    guest.wait_for_more_writes(51);

    let (model, writes) = guest.stop();
    assert!(writes > 50, "the guest wrote only {writes} times");
    assert_eq!(ctl(&ctl_path, &["drain"])["mirror"], "ready");
    assert!(src.proc.terminate().success());
    assert!(dst.proc.terminate().success());

    let source = contents(&vdi);
    assert_matches_guest(&source, &model, &before, "source");
    assert!(contents(&dst_leaf) == source, "the destination chain differs from the guest's disk");
}

/// SMAPIv3: a full mirror of a live qcow2 volume into the destination volume, no snapshot.
#[test]
fn v3_full_mirror_ends_with_the_guests_disk() {
    crate::require!("qemu-io");
    let src_dir = tempfile::tempdir().expect("tempdir");
    let dst_dir = tempfile::tempdir().expect("tempdir");
    let vol = src_dir.path().join("vol.qcow2");
    create("qcow2", &vol, None);
    fill(&vol);
    let before = contents(&vol);

    let (ctl_path, ctl_arg) = control_path(&src_dir);
    let mut src = serve_file(tempfile::tempdir().expect("tempdir"), vol.clone(), &["--control", &ctl_arg]);
    let guest = Guest::start(src.uri(), SIZE, 23);
    let dst_vol = dst_dir.path().join("vol.qcow2");
    create("qcow2", &dst_vol, None);
    let mut dst = serve_file(tempfile::tempdir().expect("tempdir"), dst_vol.clone(), &[]);
    std::thread::sleep(Duration::from_millis(50));

    assert_eq!(ctl(&ctl_path, &["mirror-attach", "--mode", "full", "--target-is-zero", "--target", &dst.uri()])["state"], "syncing");
    let deadline = Instant::now() + Duration::from_secs(60);
    while ctl(&ctl_path, &["stats"])["mirror"]["state"] != "ready" {
        assert!(Instant::now() < deadline, "the full mirror never became ready");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Still in step with the guest writing after ready.
    guest.wait_for_more_writes(51);
    let (model, writes) = guest.stop();
    assert!(writes > 50, "the guest wrote only {writes} times");
    assert_eq!(ctl(&ctl_path, &["drain"])["mirror"], "ready");
    assert!(src.proc.terminate().success());
    assert!(dst.proc.terminate().success());

    let source = contents(&vol);
    assert_matches_guest(&source, &model, &before, "source");
    let dest = contents(&dst_vol);
    if dest != source {
        let diff: Vec<usize> = (0..source.len() / 512).filter(|&s| source[s * 512..(s + 1) * 512] != dest[s * 512..(s + 1) * 512]).collect();
        let first = diff[0];
        panic!(
            "the destination volume differs from the guest's disk in {} sectors, first {first} (byte {}): src {:?} dst {:?} model {} before {}; last {}",
            diff.len(), first * 512, &source[first * 512..first * 512 + 4], &dest[first * 512..first * 512 + 4], model[first], before[first * 512], diff[diff.len() - 1]
        );
    }
}
