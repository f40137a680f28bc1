//! VDI calls on real volume files, checked with qemu-img.

use sxm_engine::backend::{Backend, VdiChange};
use sxm_engine::model::{StorageError, VdiInfo};

use crate::harness::{TestSr, qemu_check, qemu_info, qemu_write};
use crate::require;

const MIB: i64 = 1 << 20;

fn branch_info(of: &VdiInfo, name: &str) -> VdiInfo {
    let mut i = VdiInfo::new(of.vdi.clone(), name);
    i.sm_config.insert("base_mirror".into(), "x/y".into());
    i.sm_config.insert("other".into(), "dropped".into());
    i
}

fn failure_kind(e: &StorageError) -> String {
    match e {
        StorageError::BackendError(code, p) => format!("{code}:{}", p.first().cloned().unwrap_or_default()),
        other => format!("{other:?}"),
    }
}

#[test]
fn create_scan_stat_destroy_and_qemu_agrees() {
    require!("qemu-img");
    let sr = TestSr::new();
    let a = sr.create("a", 10 * MIB + 1);
    let b = sr.create("b", 4 * MIB);
    assert_eq!(a.virtual_size, 10 * MIB + 512, "rounded up to a sector");
    assert_eq!(a.content_id, a.vdi);
    assert_eq!(sr.scan_ids(), { let mut v = vec![a.vdi.clone(), b.vdi.clone()]; v.sort(); v });
    assert_eq!(sr.files(), sr.scan_ids());
    for v in [&a, &b] {
        qemu_check(&sr.vol(&v.vdi)).expect("qemu-img check");
        let info = qemu_info(&sr.vol(&v.vdi));
        assert_eq!(info["format"], "qcow2");
        assert_eq!(info["virtual-size"].as_i64(), Some(v.virtual_size));
    }
    let st = sr.backend.vdi_stat(&sr.ctx, &b.vdi).expect("stat");
    assert_eq!(st.name_label, "b");
    assert_eq!(st.virtual_size, 4 * MIB);
    let space = sr.backend.sr_space(&sr.ctx).expect("space");
    assert!(space.total > 0 && space.free > 0 && space.free <= space.total);

    sr.backend.vdi_destroy(&sr.ctx, &a.vdi).expect("destroy");
    assert_eq!(sr.scan_ids(), vec![b.vdi.clone()]);
    assert_eq!(sr.files(), vec![b.vdi.clone()]);
    let e = sr.backend.vdi_stat(&sr.ctx, &a.vdi).expect_err("gone");
    assert_eq!(e, StorageError::VdiDoesNotExist(a.vdi.clone()));

    // SR.destroy refuses while a VDI is left, and loses nothing; then takes the empty SR.
    let refused = sr.backend.sr_destroy(&sr.ctx).expect_err("SR.destroy with a VDI left");
    assert!(matches!(&refused, StorageError::BackendError(code, _) if code == "SR_NOT_EMPTY"), "{refused:?}");
    assert_eq!(sr.files(), vec![b.vdi.clone()]);
    qemu_check(&sr.vol(&b.vdi)).expect("qemu-img check");
    sr.backend.vdi_destroy(&sr.ctx, &b.vdi).expect("destroy");
    sr.backend.sr_destroy(&sr.ctx).expect("SR.destroy");
    assert_eq!(std::fs::read_dir(&sr.ctx.dir).expect("list").count(), 0);
}

#[test]
fn records_survive_a_new_backend_instance() {
    let mut sr = TestSr::new();
    let a = sr.create("a", 2 * MIB);
    sr.backend.vdi_update(&sr.ctx, &a.vdi, &VdiChange::ContentId("cid-1".into())).expect("content id");
    sr.backend.vdi_update(&sr.ctx, &a.vdi, &VdiChange::AddSmConfig("k".into(), "v".into())).expect("sm_config");
    sr.backend.vdi_update(&sr.ctx, &a.vdi, &VdiChange::NameLabel("renamed".into())).expect("name");
    let e = sr.backend.vdi_update(&sr.ctx, &a.vdi, &VdiChange::AddSmConfig("qcow2-parent".into(), "x".into())).expect_err("own key");
    assert_eq!(failure_kind(&e), "SR_BACKEND_FAILURE:invalid");
    sr.restart();
    sr.backend.sr_attach(&sr.ctx, &[]).expect("attach");
    let st = sr.backend.vdi_stat(&sr.ctx, &a.vdi).expect("stat");
    assert_eq!((st.content_id.as_str(), st.name_label.as_str()), ("cid-1", "renamed"));
    assert_eq!(st.sm_config.get("k").map(String::as_str), Some("v"));
    sr.backend.vdi_update(&sr.ctx, &a.vdi, &VdiChange::RemoveSmConfig("k".into())).expect("remove");
    assert_eq!(sr.backend.vdi_stat(&sr.ctx, &a.vdi).expect("stat").sm_config.get("k"), None);
}

#[test]
fn a_snapshot_holds_the_instant_and_the_vdi_goes_on() {
    require!("qemu-img", "qemu-io");
    let sr = TestSr::new();
    let v = sr.create("v", 4 * MIB);
    qemu_write(&sr.vol(&v.vdi), 0, 0xaa, 1 << 20);
    let s = sr.backend.vdi_snapshot(&sr.ctx, &branch_info(&v, "snap")).expect("snapshot");
    qemu_write(&sr.vol(&v.vdi), 512 << 10, 0xbb, 1 << 20);

    assert!(s.is_a_snapshot && s.read_only);
    assert_eq!(s.snapshot_of, v.vdi);
    assert_eq!(s.content_id, v.content_id);
    assert_eq!(s.virtual_size, v.virtual_size);
    assert_eq!(s.sm_config.get("base_mirror").map(String::as_str), Some("x/y"));
    assert_eq!(s.sm_config.get("other"), None);
    let snap = sr.read_all(&s.vdi);
    assert!(snap[..1 << 20].iter().all(|&b| b == 0xaa), "snapshot holds A");
    assert!(snap[1 << 20..].iter().all(|&b| b == 0), "snapshot lacks B");
    let now = sr.read_all(&v.vdi);
    assert!(now[..512 << 10].iter().all(|&b| b == 0xaa));
    assert!(now[512 << 10..(3 << 19)].iter().all(|&b| b == 0xbb));
    let st = sr.backend.vdi_stat(&sr.ctx, &v.vdi).expect("stat");
    assert_eq!(st.sm_config.get("qcow2-parent"), Some(&s.vdi), "the VDI is an overlay on its snapshot");
    for id in [&v.vdi, &s.vdi] {
        qemu_check(&sr.vol(id)).expect("qemu-img check");
    }
    // Similar content: each other, nearest first.
    let sim: Vec<String> = sr.backend.vdi_similar_content(&sr.ctx, &v.vdi).expect("similar").into_iter().map(|i| i.vdi).collect();
    assert_eq!(sim, vec![v.vdi.clone(), s.vdi.clone()]);
    // A snapshot is read-only.
    let e = sr.backend.vdi_attach(&sr.ctx, &s.vdi, true).expect_err("rw attach of a snapshot");
    assert_eq!(failure_kind(&e), "VDI_READONLY:".to_owned() + &s.vdi);
    // Nor is it resized (it once answered a misleading VDI_IN_USE, for the overlay on it).
    let e = sr.backend.vdi_resize(&sr.ctx, &s.vdi, st.virtual_size * 2).expect_err("resize of a snapshot");
    assert_eq!(failure_kind(&e), "VDI_READONLY:".to_owned() + &s.vdi);

    // Destroying the snapshot, which the VDI reads through, coalesces the VDI with it: one
    // volume, no backing, the same content, sound by QEMU's check.
    sr.backend.vdi_destroy(&sr.ctx, &s.vdi).expect("destroy snapshot");
    assert_eq!(sr.scan_ids(), vec![v.vdi.clone()]);
    assert_eq!(sr.read_all(&v.vdi), now);
    assert_eq!(sr.files(), vec![v.vdi.clone()], "the snapshot's volume was not coalesced");
    assert!(!sr.backend.vdi_stat(&sr.ctx, &v.vdi).expect("stat").sm_config.contains_key("qcow2-parent"));
    assert!(qemu_info(&sr.vol(&v.vdi)).get("backing-filename").is_none(), "still backed");
    qemu_check(&sr.vol(&v.vdi)).expect("qemu-img check");
    sr.backend.vdi_destroy(&sr.ctx, &v.vdi).expect("destroy VDI");
    assert!(sr.files().is_empty(), "{:?}", sr.files());
}

#[test]
fn clone_of_a_writable_vdi_and_of_a_snapshot() {
    require!("qemu-img", "qemu-io");
    let sr = TestSr::new();
    let v = sr.create("v", 2 * MIB);
    qemu_write(&sr.vol(&v.vdi), 0, 0x11, 65536);
    let c = sr.backend.vdi_clone(&sr.ctx, &branch_info(&v, "clone")).expect("clone");
    assert!(!c.read_only && !c.is_a_snapshot);
    qemu_write(&sr.vol(&v.vdi), 0, 0x22, 512);
    qemu_write(&sr.vol(&c.vdi), 512, 0x33, 512);
    let (vd, cd) = (sr.read_all(&v.vdi), sr.read_all(&c.vdi));
    assert!(vd[..512].iter().all(|&b| b == 0x22) && vd[512..65536].iter().all(|&b| b == 0x11));
    assert!(cd[..512].iter().all(|&b| b == 0x11) && cd[512..1024].iter().all(|&b| b == 0x33) && cd[1024..65536].iter().all(|&b| b == 0x11));
    // One hidden base under both.
    assert_eq!(sr.files().len(), 3);
    assert_eq!(sr.scan_ids().len(), 2);

    let s = sr.backend.vdi_snapshot(&sr.ctx, &branch_info(&v, "s")).expect("snapshot");
    let before = sr.files().len();
    let c2 = sr.backend.vdi_clone(&sr.ctx, &branch_info(&s, "c2")).expect("clone of a snapshot");
    assert_eq!(sr.files().len(), before + 1, "a clone of a read-only VDI is one overlay on it");
    assert_eq!(sr.read_all(&c2.vdi), vd);
    for id in sr.files() {
        qemu_check(&sr.vol(&id)).expect("qemu-img check");
    }
    for id in [&v.vdi, &c.vdi, &s.vdi, &c2.vdi] {
        sr.backend.vdi_destroy(&sr.ctx, id).expect("destroy");
    }
    assert!(sr.files().is_empty(), "{:?}", sr.files());
}

#[test]
fn resize_grows_only() {
    require!("qemu-img");
    let sr = TestSr::new();
    let v = sr.create("v", 2 * MIB);
    assert_eq!(sr.backend.vdi_resize(&sr.ctx, &v.vdi, 8 * MIB).expect("grow"), 8 * MIB);
    assert_eq!(qemu_info(&sr.vol(&v.vdi))["virtual-size"].as_i64(), Some(8 * MIB));
    assert_eq!(sr.backend.vdi_stat(&sr.ctx, &v.vdi).expect("stat").virtual_size, 8 * MIB);
    let e = sr.backend.vdi_resize(&sr.ctx, &v.vdi, MIB).expect_err("shrink");
    assert_eq!(failure_kind(&e), "SR_BACKEND_FAILURE:invalid");
    qemu_check(&sr.vol(&v.vdi)).expect("qemu-img check");
}

/// Beyond what a qcow2 volume of 64 KiB clusters maps (2 PiB), create and resize are
/// `VDI_TOO_LARGE` with the limit, as on an ext SR; they were an image error to parse
/// (`SR_BACKEND_FAILURE invalid ... exceeds ...`).
#[test]
fn sizes_beyond_the_qcow2_limit_are_too_large() {
    let sr = TestSr::new();
    let most = tapmirror::image::qcow2::max_default_size();
    let mut big = VdiInfo::new("x", "big");
    big.virtual_size = i64::try_from(most).expect("fits") + 512;
    let e = sr.backend.vdi_create(&sr.ctx, &big).expect_err("too large");
    assert!(matches!(&e, StorageError::BackendError(c, p) if c == "VDI_TOO_LARGE" && p.get(1) == Some(&most.to_string())), "{e:?}");
    let v = sr.create("v", MIB);
    let e = sr.backend.vdi_resize(&sr.ctx, &v.vdi, big.virtual_size).expect_err("too large");
    assert!(matches!(&e, StorageError::BackendError(c, _) if c == "VDI_TOO_LARGE"), "{e:?}");
    assert_eq!(sr.backend.vdi_stat(&sr.ctx, &v.vdi).expect("stat").virtual_size, MIB, "a refused resize changed the size");
}

#[test]
fn compose_layers_the_child_onto_the_parent() {
    require!("qemu-img", "qemu-io");
    let sr = TestSr::new();
    let base = sr.create("base", 2 * MIB);
    qemu_write(&sr.vol(&base.vdi), 0, 0x44, 1 << 20);
    let other = sr.create("other", 2 * MIB);
    qemu_write(&sr.vol(&other.vdi), 0, 0x55, 2 << 20);
    // A child: an overlay VDI on `other` (a clone of a snapshot of it) holding one write.
    let s = sr.backend.vdi_snapshot(&sr.ctx, &branch_info(&other, "s")).expect("snapshot");
    let child = sr.backend.vdi_clone(&sr.ctx, &branch_info(&s, "child")).expect("clone");
    // A whole cluster (64 KiB): a partial one would copy the old parent's bytes into the child
    // (qcow2's copy-on-write), which a header-only rebase keeps.
    qemu_write(&sr.vol(&child.vdi), 65536, 0x66, 65536);

    sr.backend.vdi_compose(&sr.ctx, &base.vdi, &child.vdi).expect("compose");
    let d = sr.read_all(&child.vdi);
    assert!(d[..65536].iter().all(|&b| b == 0x44));
    assert!(d[65536..131072].iter().all(|&b| b == 0x66), "the child's write on top");
    assert!(d[131072..1 << 20].iter().all(|&b| b == 0x44));
    assert!(d[1 << 20..].iter().all(|&b| b == 0), "the parent's content, not the old parent's");
    assert!(!sr.scan_ids().contains(&base.vdi), "the parent is hidden");
    assert_eq!(sr.backend.vdi_stat(&sr.ctx, &child.vdi).expect("stat").sm_config.get("qcow2-parent"), Some(&base.vdi));
    qemu_check(&sr.vol(&child.vdi)).expect("qemu-img check");
    let e = sr.backend.vdi_compose(&sr.ctx, &child.vdi, &child.vdi).expect_err("onto itself");
    assert_eq!(failure_kind(&e), "SR_BACKEND_FAILURE:invalid");
    // Nothing is composed under a snapshot: its volume is what its VDI reads through, and the
    // VDI's content would change under a content_id that says it did not.
    let p = sr.create("p", 2 * MIB);
    let under = sr.read_all(&other.vdi);
    let e = sr.backend.vdi_compose(&sr.ctx, &p.vdi, &s.vdi).expect_err("under a snapshot others read through");
    assert_eq!(failure_kind(&e), "SR_BACKEND_FAILURE:invalid");
    assert!(sr.read_all(&other.vdi) == under, "the VDI over the snapshot changed");
    assert!(sr.scan_ids().contains(&p.vdi), "a refused compose hid the parent");
}

#[test]
fn bad_ids_are_refused() {
    let sr = TestSr::new();
    let v = sr.create("v", MIB);
    std::fs::write(sr.ctx.dir.parent().expect("tmp").join("x.qcow2"), b"not mine").expect("bait");
    for bad in ["../x", "..", "", "/etc/passwd", ".sxm-qcow2", "../sr/.sxm-qcow2.json", "not-a-uuid"] {
        assert_eq!(sr.backend.vdi_stat(&sr.ctx, bad).expect_err(bad), StorageError::VdiDoesNotExist(bad.to_owned()));
        assert_eq!(sr.backend.vdi_destroy(&sr.ctx, bad).expect_err(bad), StorageError::VdiDoesNotExist(bad.to_owned()));
        assert!(sr.backend.vdi_attach(&sr.ctx, bad, true).is_err());
        assert!(sr.backend.vdi_compose(&sr.ctx, &v.vdi, bad).is_err());
        let mut i = VdiInfo::new(bad, "x");
        i.virtual_size = MIB;
        assert!(sr.backend.vdi_snapshot(&sr.ctx, &i).is_err());
    }
    assert!(sr.ctx.dir.parent().expect("tmp").join("x.qcow2").exists());
    assert_eq!(sr.scan_ids(), vec![v.vdi.clone()]);
    let mut neg = VdiInfo::new("x", "neg");
    neg.virtual_size = -1;
    assert!(sr.backend.vdi_create(&sr.ctx, &neg).is_err());
}

#[test]
fn attach_recovers_temporaries_orphans_and_an_unrecorded_snapshot() {
    require!("qemu-img", "qemu-io");
    let sr = TestSr::new();
    let v = sr.create("v", MIB);
    qemu_write(&sr.vol(&v.vdi), 0, 0x77, 4096);
    let meta_before = std::fs::read(sr.ctx.dir.join(".sxm-qcow2.json")).expect("record");
    // A snapshot whose record never got saved (a crash after the rename).
    let s = sr.backend.vdi_snapshot(&sr.ctx, &branch_info(&v, "s")).expect("snapshot");
    std::fs::write(sr.ctx.dir.join(".sxm-qcow2.json"), &meta_before).expect("old record");
    // A temporary and an orphan.
    std::fs::write(sr.ctx.dir.join(".tmp-crashed"), b"x").expect("tmp");
    let orphan = "00000000-0000-4000-8000-000000000001";
    std::fs::copy(sr.vol(&v.vdi), sr.vol(orphan)).expect("orphan");
    sr.backend.sr_attach(&sr.ctx, &[]).expect("attach");
    assert!(!sr.ctx.dir.join(".tmp-crashed").exists());
    assert!(!sr.vol(orphan).exists());
    // The base the VDI read through is adopted as hidden, then folded into the VDI, its one
    // child (a crash must not cost the VDI a chain level for good).
    assert!(!sr.vol(&s.vdi).exists(), "the adopted base stayed under its one child");
    assert_eq!(sr.scan_ids(), vec![v.vdi.clone()]);
    assert_eq!(sr.backend.vdi_stat(&sr.ctx, &v.vdi).expect("stat").sm_config.get("qcow2-parent"), None);
    assert!(sr.read_all(&v.vdi)[..4096].iter().all(|&b| b == 0x77));
    sr.backend.vdi_destroy(&sr.ctx, &v.vdi).expect("destroy");
    assert!(sr.files().is_empty(), "the VDI's file goes with it");
}

/// A copy that fills the SR leaves no room for the record: the destroy that undoes it must still
/// go through, first on the reserve, then (the reserve spent) by burying the volume it destroys.
#[test]
fn a_full_sr_still_destroys_the_vdis_that_filled_it() {
    require!("qemu-io");
    let Some(sr) = TestSr::on_tmpfs("4m") else {
        eprintln!("skipping: cannot mount a tmpfs here (needs root)");
        return;
    };
    let reserve = sr.ctx.dir.join(sxm_engine::state::RESERVE_FILE);
    assert_eq!(std::fs::metadata(&reserve).map(|m| m.len()).ok(), Some(1 << 20), "no reserve");
    let keep = sr.create("keep", MIB);
    let fill = |v: &VdiInfo| {
        let filled = crate::harness::try_run(
            std::process::Command::new("qemu-io").args(["-f", "qcow2", "-c", "write -P 7 0 8M"]).arg(sr.vol(&v.vdi)),
        );
        assert!(filled.is_err(), "8 MiB fit in a 4 MiB file system?");
        assert!(tapmirror::testkit::no_room_in(&sr.ctx.dir), "the SR is not full");
    };
    let list = || -> Vec<String> {
        let mut v: Vec<String> =
            std::fs::read_dir(&sr.ctx.dir).expect("list").filter_map(|e| Some(e.ok()?.file_name().to_string_lossy().into_owned())).collect();
        v.sort();
        v
    };
    // The reserve is there: the record is written on it.
    let v = sr.create("filler", 16 * MIB);
    fill(&v);
    sr.backend.vdi_destroy(&sr.ctx, &v.vdi).expect("VDI.destroy on a full SR");
    assert_eq!(sr.files(), vec![keep.vdi.clone()]);
    assert!(reserve.exists(), "the reserve is not remade once there is room");
    // The reserve spent (a copy ate it after an earlier write released it): the volume is buried.
    let v = sr.create("filler 2", 16 * MIB);
    std::fs::remove_file(&reserve).expect("spend the reserve");
    fill(&v);
    sr.backend.vdi_destroy(&sr.ctx, &v.vdi).expect("VDI.destroy on a full SR without its reserve");
    assert_eq!(sr.files(), vec![keep.vdi.clone()]);
    assert_eq!(sr.scan_ids(), vec![keep.vdi.clone()]);
    assert!(!list().iter().any(|n| n.ends_with(sxm_engine::state::TOMBSTONE_SUFFIX)), "a tombstone was left: {:?}", list());
    assert_eq!(std::fs::metadata(&reserve).map(|m| m.len()).ok(), Some(1 << 20), "the reserve is not remade");
    let mut sr = sr;
    sr.restart();
    assert_eq!(sr.backend.vdi_stat(&sr.ctx, &keep.vdi).expect("stat").vdi, keep.vdi);
}

/// Cut after the burial, the destroy has committed: attach finishes it and keeps what the
/// other VDIs read.
#[test]
fn a_destroy_cut_after_burying_its_volume_is_finished_at_attach() {
    require!("qemu-img", "qemu-io");
    let sr = TestSr::new();
    let v = sr.create("v", MIB);
    qemu_write(&sr.vol(&v.vdi), 0, 0x66, 4096);
    let s = sr.backend.vdi_snapshot(&sr.ctx, &branch_info(&v, "s")).expect("snapshot");
    let snap = sr.read_all(&s.vdi);
    sxm_engine::state::bury(&sr.vol(&v.vdi)).expect("bury");
    sr.backend.sr_attach(&sr.ctx, &[]).expect("attach");
    assert_eq!(sr.scan_ids(), vec![s.vdi.clone()]);
    assert_eq!(sr.files(), vec![s.vdi.clone()]);
    assert!(sr.read_all(&s.vdi) == snap, "the snapshot's content changed");
    assert!(!sr.ctx.dir.join(format!(".{}.qcow2{}", v.vdi, sxm_engine::state::TOMBSTONE_SUFFIX)).exists(), "the tombstone is left");
    assert_eq!(sxm_smapiv3::recover::recover(&sr.ctx.sr, &sr.ctx.dir).expect("recover"), Default::default());
}

/// A record write cut before its rename leaves the engine's temporary beside the record; attach
/// sweeps it even when recovery has nothing else to do (a save would replace it by chance).
#[test]
fn attach_sweeps_a_torn_record_write() {
    let sr = TestSr::new();
    let v = sr.create("v", MIB);
    let record = std::fs::read(sr.ctx.dir.join(".sxm-qcow2.json")).expect("record");
    let torn = sr.ctx.dir.join("..sxm-qcow2.json.tmp");
    std::fs::write(&torn, b"{\"vers").expect("torn record");
    let r = sxm_smapiv3::recover::recover(&sr.ctx.sr, &sr.ctx.dir).expect("recover");
    assert_eq!(r.temporaries, 1);
    assert!(!torn.exists(), "the torn record's temporary stays");
    assert_eq!(std::fs::read(sr.ctx.dir.join(".sxm-qcow2.json")).expect("record"), record, "the record changed");
    assert_eq!(sr.scan_ids(), vec![v.vdi]);
}

/// As on `ext`: the snapshot that would pass SM's 30-image chain is refused with
/// `SnapshotChainTooLong` and changes nothing (the 256th once made the VDI unopenable), and
/// destroying the latest snapshot, which coalesces it into the VDI, makes room again.
#[test]
fn a_snapshot_that_would_make_the_chain_too_long_is_refused_and_changes_nothing() {
    require!("qemu-img", "qemu-io");
    let sr = TestSr::new();
    let v = sr.create("v", 2 * MIB);
    qemu_write(&sr.vol(&v.vdi), 0, 0x61, 65536);
    let mut last = None;
    for i in 0..29 {
        last = Some(sr.backend.vdi_snapshot(&sr.ctx, &branch_info(&v, &format!("s{i}"))).expect("snapshot"));
    }
    let files = sr.files();
    let e = sr.backend.vdi_snapshot(&sr.ctx, &branch_info(&v, "one too many")).expect_err("the 30th snapshot");
    assert_eq!(failure_kind(&e), "SR_BACKEND_FAILURE_109:");
    assert_eq!(sr.files(), files, "a refused snapshot changed the files");
    assert!(sr.read_all(&v.vdi)[..65536].iter().all(|&b| b == 0x61));
    sr.backend.vdi_destroy(&sr.ctx, &last.expect("a snapshot").vdi).expect("destroy the latest snapshot");
    sr.backend.vdi_snapshot(&sr.ctx, &branch_info(&v, "again")).expect("room for one again");
    qemu_check(&sr.vol(&v.vdi)).expect("qemu-img check");
}
