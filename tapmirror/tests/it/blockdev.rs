//! Images on block devices (an LVM volume, an iSCSI LUN), here loop devices: a raw disk, a
//! qcow2 volume written straight onto the device, and a qcow2 overlay whose backing is a raw
//! device. A block device reports length 0 to `stat` and refuses `SEEK_DATA`, so each must be
//! sized by its end and read as all data, as QEMU does. Judged by qemu-img, qemu-io, nbdinfo
//! and nbdcopy.
//!
//! Needs root and loop devices; skipped with a message where `losetup` cannot attach one (an
//! unprivileged container), under CI too, since whether a CI machine has them is not the
//! project's to choose.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use crate::harness::{pattern, run, serve_file, tapmirror};

const MIB: u64 = 1 << 20;

/// A file attached as a loop device, detached on drop.
struct LoopDevice(PathBuf);

impl LoopDevice {
    /// Attaches `file`, or `None` (with a message) where this machine cannot.
    fn attach(file: &Path) -> Option<LoopDevice> {
        let out = Command::new("losetup").args(["--find", "--show"]).arg(file).output();
        match out {
            Ok(o) if o.status.success() => {
                Some(LoopDevice(PathBuf::from(String::from_utf8_lossy(&o.stdout).trim().to_owned())))
            }
            Ok(o) => {
                eprintln!("skipping: losetup cannot attach a loop device here: {}", String::from_utf8_lossy(&o.stderr).trim());
                None
            }
            Err(e) => {
                eprintln!("skipping: losetup: {e}");
                None
            }
        }
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("--detach").arg(&self.0).status();
    }
}

/// `nbdinfo --map --json` as `(offset, length, type)`.
fn nbdinfo_map(uri: &str) -> Vec<(u64, u64, u64)> {
    let out = run(Command::new("nbdinfo").args(["--map", "--json"]).arg(uri));
    let v: Value = serde_json::from_slice(&out.stdout).expect("nbdinfo --map --json");
    let num = |e: &Value, k: &str| e[k].as_u64().unwrap_or_else(|| panic!("{k} in {e}"));
    v.as_array()
        .expect("an array of extents")
        .iter()
        .map(|e| (num(e, "offset"), num(e, "length"), num(e, "type")))
        .collect()
}

/// The export's bytes, read by nbdcopy.
fn nbd_bytes(dir: &Path, uri: &str) -> Vec<u8> {
    let out = dir.join("nbdcopy.out");
    let _ = std::fs::remove_file(&out);
    run(Command::new("nbdcopy").arg(uri).arg(&out));
    std::fs::read(&out).expect("read nbdcopy's output")
}

fn image_info(path: &Path) -> Value {
    let out = run(Command::new(tapmirror()).args(["image", "info"]).arg(path));
    serde_json::from_slice(&out.stdout).expect("image info json")
}

/// All three cases in one test: loop devices are a machine-wide resource, and attaching them
/// from parallel tests would race for the same free device.
#[test]
fn images_on_block_devices_size_map_read_write_and_copy_like_files() {
    crate::require!("losetup", "qemu-img", "qemu-io", "nbdinfo", "nbdcopy");
    let dir = tempfile::tempdir().expect("tempdir");

    // 1. A raw disk on a device: 16 MiB, data in its second MiB, the rest never written.
    let raw_file = dir.path().join("raw.backing");
    let mut want = vec![0u8; 16 * MIB as usize];
    want[MIB as usize..2 * MIB as usize].copy_from_slice(&pattern(MIB as usize, 41));
    std::fs::write(&raw_file, &want).expect("write the raw file");
    let Some(raw_dev) = LoopDevice::attach(&raw_file) else { return };

    let served = serve_file(tempfile::tempdir().expect("tempdir"), raw_dev.0.clone(), &[]);
    // Before: block status failed with EIO (SEEK_DATA is EINVAL on a device).
    assert_eq!(nbdinfo_map(&served.uri()), vec![(0, 16 * MIB, 0)], "a device maps as one data extent");
    assert!(nbd_bytes(dir.path(), &served.uri()) == want, "the served device reads as its bytes");
    drop(served);

    let copied = dir.path().join("copied.raw");
    let out = run(Command::new(tapmirror()).arg("copy").arg(&raw_dev.0).arg(&copied));
    assert!(std::fs::read(&copied).expect("read the copy") == want, "tapmirror copy of a device");
    // The copy still finds the zero blocks in what it reads as data.
    let stderr = String::from_utf8_lossy(&out.stderr);
    let last = stderr.lines().rfind(|l| l.starts_with('{')).unwrap_or_else(|| panic!("no copy report in {stderr}"));
    let report: Value = serde_json::from_str(last).expect("copy report");
    assert_eq!(report["data_bytes"].as_u64(), Some(MIB), "{report}");

    // 2. A qcow2 overlay file whose backing is that raw device.
    let overlay = dir.path().join("over.qcow2");
    run(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"]).arg(&raw_dev.0).arg(&overlay));
    let info = image_info(&overlay);
    assert_eq!(info["virtual_size"].as_u64(), Some(16 * MIB), "{info}");
    let served = serve_file(tempfile::tempdir().expect("tempdir"), overlay.clone(), &[]);
    // Before: the backing counted 0 bytes long and read as zeroes, when it did not fail.
    assert!(nbd_bytes(dir.path(), &served.uri()) == want, "the overlay reads its device backing");
    drop(served);

    // 3. A qcow2 volume made straight on a 64 MiB device, its data written by QEMU and by us.
    let vol_file = dir.path().join("vol.backing");
    std::fs::File::create(&vol_file).and_then(|f| f.set_len(64 * MIB)).expect("create the volume's file");
    let Some(vol_dev) = LoopDevice::attach(&vol_file) else { return };
    run(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(&vol_dev.0).arg("32M"));
    run(Command::new("qemu-io").args(["-f", "qcow2", "-c", "write -P 0x5a 1M 1M"]).arg(&vol_dev.0));

    // Before: "no qcow2 magic", from a header read of 0 bytes.
    let info = image_info(&vol_dev.0);
    assert_eq!(info["virtual_size"].as_u64(), Some(32 * MIB), "{info}");
    assert_eq!(info["allocated_bytes"].as_u64(), Some(MIB), "{info}");
    assert_eq!(info["disk_bytes"].as_u64(), Some(64 * MIB), "a device takes its whole length: {info}");

    let served = serve_file(tempfile::tempdir().expect("tempdir"), vol_dev.0.clone(), &[]);
    let uri = served.uri();
    let map = nbdinfo_map(&uri);
    assert!(map.contains(&(MIB, MIB, 0)), "the written MiB maps as data: {map:?}");
    assert!(map.iter().all(|e| e.2 == 0 || e.2 & 1 == 1), "the rest as holes: {map:?}");
    // New clusters: the allocator grows the image inside the device.
    run(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0x77 8M 3M", "-c", "write -P 0x11 100k 5k"]).arg(&uri));
    drop(served);

    run(Command::new("qemu-img").arg("check").arg(&vol_dev.0));
    run(Command::new("qemu-io").args(["-r", "-f", "qcow2"])
        .args(["-c", "read -P 0x5a 1M 1M", "-c", "read -P 0x77 8M 3M", "-c", "read -P 0x11 100k 5k", "-c", "read -P 0 0 100k"])
        .arg(&vol_dev.0));
}
