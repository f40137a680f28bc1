//! Datapaths: real `tapmirror serve` processes on qcow2 volumes, written and read over NBD.


use sxm_engine::backend::{AttachedVdi, Backend};
use sxm_engine::model::{AttachInfo, StorageError, VdiInfo};
use tapmirror::testkit::{Guest, alive, assert_matches_guest, qemu_io};

use crate::harness::{TestSr, nbd_uri, qemu_check, xapi_nbd};
use crate::require;

const MIB: i64 = 1 << 20;

fn pid_in(info: &AttachInfo) -> i32 {
    let dir = xapi_nbd(info).0.parent().expect("folder").to_path_buf();
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("serve.pid")).expect("pid file")).expect("pid JSON");
    v["pid"].as_i64().expect("pid") as i32
}

fn in_use(e: &StorageError) -> bool {
    matches!(e, StorageError::BackendError(c, _) if c == "VDI_IN_USE")
}

#[test]
fn attach_activate_write_read_deactivate_detach() {
    require!("qemu-io", "qemu-img");
    let sr = TestSr::new();
    let v = sr.create("disk", 16 * MIB);
    let info = sr.backend.vdi_attach(&sr.ctx, &v.vdi, true).expect("attach");
    assert_eq!(xapi_nbd(&info).1, v.vdi, "the export is named after the VDI");
    sr.backend.vdi_activate(&sr.ctx, &v.vdi).expect("activate");
    let uri = nbd_uri(&info);
    qemu_io(&uri, "write -P 0x5a 1M 64k").expect("write through NBD");
    let out = qemu_io(&uri, "read -P 0x5a 1M 64k").expect("read back");
    assert!(out.contains("read 65536/65536"), "{out}");
    assert!(qemu_io(&uri, "read -P 0x5b 1M 64k").is_err(), "a wrong pattern must not verify");
    // Held by a datapath: no destroy, no resize.
    assert!(in_use(&sr.backend.vdi_destroy(&sr.ctx, &v.vdi).expect_err("destroy while attached")));
    assert!(in_use(&sr.backend.vdi_resize(&sr.ctx, &v.vdi, 32 * MIB).expect_err("resize while attached")));
    assert_eq!(sr.backend.vdi_attach_info(&sr.ctx, &v.vdi).expect("attach_info"), info);
    sr.backend.vdi_deactivate(&sr.ctx, &v.vdi).expect("deactivate");
    let pid = pid_in(&info);
    sr.backend.vdi_detach(&sr.ctx, &v.vdi).expect("detach");
    assert!(!alive(pid), "the process is gone");
    let d = sr.read_all(&v.vdi);
    assert!(d[1 << 20..(1 << 20) + 65536].iter().all(|&b| b == 0x5a), "the write is in the volume");
    qemu_check(&sr.vol(&v.vdi)).expect("qemu-img check");
}

#[test]
fn snapshot_while_a_guest_writes() {
    require!("qemu-img");
    let sr = TestSr::new();
    let size = 8 * MIB;
    let v = sr.create("disk", size);
    let info = sr.backend.vdi_attach(&sr.ctx, &v.vdi, true).expect("attach");
    sr.backend.vdi_activate(&sr.ctx, &v.vdi).expect("activate");
    let guest = Guest::start(nbd_uri(&info), size as u64, 7);
    std::thread::sleep(std::time::Duration::from_millis(300));
    let s1 = sr.backend.vdi_snapshot(&sr.ctx, &VdiInfo::new(v.vdi.clone(), "s1")).expect("snapshot 1");
    std::thread::sleep(std::time::Duration::from_millis(300));
    let s2 = sr.backend.vdi_snapshot(&sr.ctx, &VdiInfo::new(v.vdi.clone(), "s2")).expect("snapshot 2");
    std::thread::sleep(std::time::Duration::from_millis(300));
    let (model, writes) = guest.stop();
    assert!(writes > 0, "the guest wrote");
    sr.backend.vdi_deactivate(&sr.ctx, &v.vdi).expect("deactivate");
    sr.backend.vdi_detach(&sr.ctx, &v.vdi).expect("detach");
    let zeros = vec![0u8; size as usize];
    assert_matches_guest(&sr.read_all(&v.vdi), &model, &zeros, "the VDI after two live snapshots");
    // Each snapshot is a state between the guest's writes: s1 ⊆ s2 ⊆ VDI in what they hold,
    // and every sector of a snapshot holds zero or a value the guest wrote there at some time
    // (values name writes in increasing order, mod 255).
    let (d1, d2) = (sr.read_all(&s1.vdi), sr.read_all(&s2.vdi));
    for sec in 0..(size as usize / 512) {
        let (a, b) = (d1[sec * 512], d2[sec * 512]);
        assert!(d1[sec * 512..(sec + 1) * 512].iter().all(|&x| x == a), "s1 sector {sec} is one write");
        assert!(d2[sec * 512..(sec + 1) * 512].iter().all(|&x| x == b), "s2 sector {sec} is one write");
        assert!(a == 0 || b != 0, "sector {sec}: written before s1 yet empty at s2");
        assert!(b == 0 || model[sec] != 0, "sector {sec}: written before s2 but not in the model");
    }
    assert!(d1 != d2 || d2 != sr.read_all(&v.vdi), "the guest wrote between the instants");
    for id in sr.files() {
        qemu_check(&sr.vol(&id)).expect("qemu-img check");
    }
}

#[test]
fn a_restarted_backend_re_adopts_its_datapaths() {
    require!("qemu-io", "qemu-img");
    let mut sr = TestSr::new();
    let a = sr.create("a", 4 * MIB);
    let b = sr.create("b", 4 * MIB);
    let ia = sr.backend.vdi_attach(&sr.ctx, &a.vdi, true).expect("attach a");
    sr.backend.vdi_activate(&sr.ctx, &a.vdi).expect("activate a");
    let ib = sr.backend.vdi_attach(&sr.ctx, &b.vdi, true).expect("attach b");
    qemu_io(&nbd_uri(&ia), "write -P 0x21 0 64k").expect("write a");
    let (pa, pb) = (pid_in(&ia), pid_in(&ib));

    // A new daemon: the engine's records say a is active, and b is no longer attached.
    sr.restart();
    sr.backend.sr_attach(&sr.ctx, &[AttachedVdi { vdi: a.vdi.clone(), read_write: true, active: true }]).expect("SR.attach");
    assert_eq!(pid_in(&ia), pa, "a's process was adopted, not restarted");
    assert!(alive(pa));
    assert!(!alive(pb), "b's process was reaped");
    let out = qemu_io(&nbd_uri(&ia), "read -P 0x21 0 64k").expect("read a after the restart");
    assert!(out.contains("read 65536/65536"));
    // The adopted datapath is fully managed: snapshot it live, then detach.
    let s = sr.backend.vdi_snapshot(&sr.ctx, &VdiInfo::new(a.vdi.clone(), "s")).expect("snapshot of an adopted datapath");
    qemu_io(&nbd_uri(&ia), "write -P 0x22 0 4k").expect("write after snapshot");
    sr.backend.vdi_deactivate(&sr.ctx, &a.vdi).expect("deactivate");
    sr.backend.vdi_detach(&sr.ctx, &a.vdi).expect("detach");
    assert!(!alive(pa));
    assert!(sr.read_all(&s.vdi)[..4096].iter().all(|&x| x == 0x21));
    assert!(sr.read_all(&a.vdi)[..4096].iter().all(|&x| x == 0x22));
    // A process that died meanwhile is restarted at attach.
    let ib = sr.backend.vdi_attach(&sr.ctx, &b.vdi, false).expect("attach b ro");
    let pb = pid_in(&ib);
    sr.restart();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pb), nix::sys::signal::Signal::SIGKILL).expect("kill");
    std::thread::sleep(std::time::Duration::from_millis(200));
    sr.backend.sr_attach(&sr.ctx, &[AttachedVdi { vdi: b.vdi.clone(), read_write: false, active: true }]).expect("SR.attach");
    let ib2 = sr.backend.vdi_attach_info(&sr.ctx, &b.vdi).expect("attach_info");
    assert_ne!(pid_in(&ib2), pb, "restarted");
    assert!(alive(pid_in(&ib2)));
    sr.backend.vdi_deactivate(&sr.ctx, &b.vdi).expect("deactivate");
    sr.backend.vdi_detach(&sr.ctx, &b.vdi).expect("detach");
}

/// A rolling series of backups keeping the last three snapshots, under an attached VDI being
/// written: a qcow2 snapshot is the VDI's old volume, so the series is the VDI's chain, and
/// destroying the oldest leaves it hidden under the next. It is coalesced with that next one
/// (whose name its file takes), so the chain stays as long as the series; every snapshot
/// still reads what it held, the VDI what was written, and QEMU finds every volume sound.
#[test]
fn a_rolling_series_of_snapshots_keeps_the_chain_short() {
    require!("qemu-io", "qemu-img");
    let sr = TestSr::new();
    let v = sr.create("v", 4 * MIB);
    let info = sr.backend.vdi_attach(&sr.ctx, &v.vdi, true).expect("attach");
    sr.backend.vdi_activate(&sr.ctx, &v.vdi).expect("activate");
    let uri = nbd_uri(&info);
    let mut kept: std::collections::VecDeque<(String, Vec<u8>)> = Default::default();
    for cycle in 0..8u64 {
        qemu_io(&uri, &format!("write -P {} {} 64k", cycle + 1, cycle * 65536)).expect("write");
        let mut req = VdiInfo::new(v.vdi.clone(), format!("backup {cycle}"));
        req.sm_config.clear();
        let s = sr.backend.vdi_snapshot(&sr.ctx, &req).expect("snapshot");
        kept.push_back((s.vdi.clone(), sr.read_all(&s.vdi)));
        if kept.len() > 3 {
            let (oldest, _) = kept.pop_front().expect("oldest");
            sr.backend.vdi_destroy(&sr.ctx, &oldest).expect("destroy the oldest");
        }
        assert!(sr.files().len() <= 4, "cycle {cycle}: {} volumes", sr.files().len());
    }
    for (s, held) in &kept {
        assert!(sr.read_all(s) == *held, "snapshot {s} changed");
    }
    qemu_io(&uri, "read -P 8 458752 64k").expect("the last write reads back");
    sr.backend.vdi_deactivate(&sr.ctx, &v.vdi).expect("deactivate");
    sr.backend.vdi_detach(&sr.ctx, &v.vdi).expect("detach");
    let mut want = vec![0u8; 4 << 20];
    for cycle in 0..8usize {
        want[cycle * 65536..(cycle + 1) * 65536].fill(cycle as u8 + 1);
    }
    assert!(sr.read_all(&v.vdi) == want, "the VDI lost a write");
    for id in sr.files() {
        qemu_check(&sr.vol(&id)).expect("qemu-img check");
    }
}
