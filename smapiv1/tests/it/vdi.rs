//! SR and VDI calls without datapaths: records, files, the VHD tree.

use sxm_engine::backend::{Backend, VdiChange};
use sxm_engine::model::{NEVER, StorageError, VdiInfo};

use crate::harness::{TestSr, qemu_info, qemu_write, vhd_check};
use crate::require;

const MIB: i64 = 1 << 20;

#[test]
fn create_scan_stat_destroy_and_records_survive_a_new_backend() {
    require!("qemu-img");
    let mut sr = TestSr::new();
    assert!(sr.scan_ids().is_empty());
    let mut info = VdiInfo::new("ignored", "disk a");
    info.virtual_size = 10 * MIB + 1;
    info.name_description = "first".into();
    info.sm_config.insert("base_mirror".into(), "sr/x".into());
    info.sm_config.insert("vhd-parent".into(), "forged".into());
    info.ty = "system".into();
    let a = sr.backend.vdi_create(&sr.ctx, &info).expect("create");
    // Rounded up to a whole sector; QEMU reads the same size from the file.
    assert_eq!(a.virtual_size, 10 * MIB + 512);
    assert_eq!(qemu_info(&sr.vhd(&a.vdi))["virtual-size"], 10 * MIB + 512);
    assert_eq!(qemu_info(&sr.vhd(&a.vdi))["format"], "vpc");
    assert_eq!(a.name_label, "disk a");
    assert_eq!(a.name_description, "first");
    assert_eq!(a.ty, "system");
    assert_eq!(a.uuid.as_deref(), Some(a.vdi.as_str()));
    assert_eq!(a.content_id, a.vdi, "content_id defaults to the VDI's id, as xapi's SMAPIv1 adapter shows it");
    assert_eq!(a.sm_config.get("base_mirror").map(String::as_str), Some("sr/x"));
    assert!(!a.sm_config.contains_key("vhd-parent"), "a caller cannot forge the parent: {:?}", a.sm_config);
    assert!(a.physical_utilisation > 0);
    let b = sr.create("disk b", 0);
    assert_eq!(b.virtual_size, 2 * MIB, "size 0 becomes SM's smallest VHD");
    assert_ne!(a.vdi, b.vdi);

    let mut both = vec![a.vdi.clone(), b.vdi.clone()];
    both.sort();
    assert_eq!(sr.scan_ids(), both);
    assert_eq!(sr.files(), both);
    assert_eq!(sr.backend.vdi_stat(&sr.ctx, &a.vdi).expect("stat"), a);
    for id in &both {
        vhd_check(&sr.vhd(id)).expect("sound VHD");
    }

    // A new backend instance (a restarted daemon) sees the same records.
    sr.restart();
    sr.backend.sr_attach(&sr.ctx, &[]).expect("attach");
    assert_eq!(sr.backend.vdi_stat(&sr.ctx, &a.vdi).expect("stat after restart"), a);
    assert_eq!(sr.scan_ids(), both);

    sr.backend.vdi_destroy(&sr.ctx, &a.vdi).expect("destroy");
    assert_eq!(sr.scan_ids(), vec![b.vdi.clone()]);
    assert_eq!(sr.files(), vec![b.vdi.clone()]);
    assert_eq!(sr.backend.vdi_stat(&sr.ctx, &a.vdi), Err(StorageError::VdiDoesNotExist(a.vdi.clone())));
    assert_eq!(sr.backend.vdi_destroy(&sr.ctx, &a.vdi), Err(StorageError::VdiDoesNotExist(a.vdi.clone())));

    let space = sr.backend.sr_space(&sr.ctx).expect("space");
    assert!(space.total > 0 && space.free > 0 && space.free <= space.total, "{space:?}");

    // SR.destroy refuses while a VDI is left, and loses nothing.
    let refused = sr.backend.sr_destroy(&sr.ctx).expect_err("SR.destroy with a VDI left");
    assert!(matches!(&refused, StorageError::BackendError(code, _) if code == "SR_NOT_EMPTY"), "{refused:?}");
    assert_eq!(sr.files(), vec![b.vdi.clone()]);
    vhd_check(&sr.vhd(&b.vdi)).expect("sound VHD");

    // With its VDIs gone, SR.destroy removes the files and the record.
    sr.backend.vdi_destroy(&sr.ctx, &b.vdi).expect("destroy");
    sr.backend.sr_destroy(&sr.ctx).expect("SR.destroy");
    assert!(sr.files().is_empty());
    assert_eq!(std::fs::read_dir(&sr.ctx.dir).expect("list").count(), 0);
}

#[test]
fn sizes_beyond_the_vhd_limit_or_negative_are_refused() {
    let sr = TestSr::new();
    let mut info = VdiInfo::new("x", "big");
    info.virtual_size = 2041 << 30;
    let e = sr.backend.vdi_create(&sr.ctx, &info).expect_err("too large");
    assert!(matches!(&e, StorageError::BackendError(c, _) if c == "VDI_TOO_LARGE"), "{e:?}");
    info.virtual_size = -1;
    let e = sr.backend.vdi_create(&sr.ctx, &info).expect_err("negative");
    assert!(matches!(&e, StorageError::BackendError(c, p) if c == "SR_BACKEND_FAILURE" && p[0] == "invalid"), "{e:?}");
    assert!(sr.files().is_empty());
}

#[test]
fn snapshot_moves_the_data_to_a_hidden_base_and_the_snapshot_reads_it() {
    require!("qemu-io");
    let sr = TestSr::new();
    let mut info = VdiInfo::new("x", "vm disk");
    info.virtual_size = 8 * MIB;
    info.content_id = "content-1".into();
    info.persistent = false;
    let v = sr.backend.vdi_create(&sr.ctx, &info).expect("create");
    qemu_write(&sr.vhd(&v.vdi), 0, 0xaa, 1 << 20);
    let before = sr.read_all(&v.vdi);

    let mut req = v.clone();
    req.name_label = "snap".into();
    req.name_description = "a snapshot".into();
    req.sm_config.insert("base_mirror".into(), "sr/v".into());
    req.sm_config.insert("other".into(), "dropped".into());
    let s = sr.backend.vdi_snapshot(&sr.ctx, &req).expect("snapshot");
    assert_ne!(s.vdi, v.vdi);
    assert!(s.is_a_snapshot && s.read_only);
    assert_eq!(s.snapshot_of, v.vdi);
    assert_ne!(s.snapshot_time, NEVER);
    assert_eq!(s.snapshot_time.len(), "20240101T00:00:00Z".len(), "{}", s.snapshot_time);
    assert_eq!(s.content_id, "content-1");
    assert_eq!(s.name_label, "snap");
    assert_eq!(s.name_description, "a snapshot");
    assert!(s.persistent, "a snapshot starts persistent: it has no reset point of its own");
    assert_eq!(s.virtual_size, 8 * MIB);
    assert_eq!(s.sm_config.get("base_mirror").map(String::as_str), Some("sr/v"));
    assert!(!s.sm_config.contains_key("other"), "only base_mirror is kept: {:?}", s.sm_config);

    // Both are leaves of one new hidden base, which a scan does not list.
    let v2 = sr.backend.vdi_stat(&sr.ctx, &v.vdi).expect("stat");
    let base = v2.sm_config.get("vhd-parent").expect("the VDI now has a parent").clone();
    assert_eq!(s.sm_config.get("vhd-parent"), Some(&base));
    let mut visible = vec![v.vdi.clone(), s.vdi.clone()];
    visible.sort();
    assert_eq!(sr.scan_ids(), visible);
    assert_eq!(sr.files().len(), 3);
    assert_eq!(sr.backend.vdi_stat(&sr.ctx, &base), Err(StorageError::VdiDoesNotExist(base.clone())));
    assert_eq!(v2.virtual_size, v.virtual_size);
    assert!(!v2.read_only && !v2.is_a_snapshot);

    assert!(sr.read_all(&v.vdi) == before, "content differs");
    assert!(sr.read_all(&s.vdi) == before, "content differs");
    for id in [&v.vdi, &s.vdi] {
        vhd_check(&sr.vhd(id)).expect("sound chain");
    }

    // Destroying the snapshot keeps the VDI whole, and the base it alone reads through is
    // coalesced into it (SM's garbage collector's leaf-coalesce): one file again. Only once the
    // VDI is persistent: a non-persistent VDI's base is what it is reset to.
    sr.backend.vdi_update(&sr.ctx, &v.vdi, &VdiChange::Persistent(true)).expect("persistent");
    sr.write_through_datapath(&v.vdi, "write -P 0xcc 3M 1M");
    let mut after = before.clone();
    after[3 << 20..4 << 20].fill(0xcc);
    sr.backend.vdi_destroy(&sr.ctx, &s.vdi).expect("destroy snapshot");
    assert_eq!(sr.scan_ids(), vec![v.vdi.clone()]);
    assert!(sr.read_all(&v.vdi) == after, "content differs");
    assert_eq!(sr.files(), vec![v.vdi.clone()], "the base was not coalesced");
    assert!(!sr.backend.vdi_stat(&sr.ctx, &v.vdi).expect("stat").sm_config.contains_key("vhd-parent"));
    vhd_check(&sr.vhd(&v.vdi)).expect("sound VHD");
    assert_eq!(qemu_info(&sr.vhd(&v.vdi))["virtual-size"], 8 * MIB, "QEMU reads the coalesced file");

    // Destroying the VDI rather than its snapshot: the snapshot takes the base's data.
    let s = sr.backend.vdi_snapshot(&sr.ctx, &v).expect("snapshot again");
    sr.backend.vdi_destroy(&sr.ctx, &v.vdi).expect("destroy the VDI");
    assert_eq!(sr.files(), vec![s.vdi.clone()], "the base was not coalesced into the snapshot");
    assert!(sr.read_all(&s.vdi) == after, "the snapshot's content changed");
    let st = sr.backend.vdi_stat(&sr.ctx, &s.vdi).expect("stat");
    assert!(st.is_a_snapshot && st.read_only, "still a snapshot: {st:?}");
    sr.backend.vdi_destroy(&sr.ctx, &s.vdi).expect("destroy");
    assert!(sr.files().is_empty(), "{:?}", sr.files());
}

#[test]
fn clone_is_a_writable_leaf_on_the_same_kind_of_base() {
    require!("qemu-io");
    let sr = TestSr::new();
    let v = sr.create("origin", 4 * MIB);
    qemu_write(&sr.vhd(&v.vdi), 4096, 0x5c, 8192);
    let data = sr.read_all(&v.vdi);
    let mut req = v.clone();
    req.name_label = "copy".into();
    let c = sr.backend.vdi_clone(&sr.ctx, &req).expect("clone");
    assert!(!c.read_only && !c.is_a_snapshot);
    assert_eq!(c.snapshot_of, "");
    assert_eq!(c.content_id, v.content_id);
    assert_eq!(c.name_label, "copy");
    assert!(sr.read_all(&c.vdi) == data, "content differs");
    let v2 = sr.backend.vdi_stat(&sr.ctx, &v.vdi).expect("stat");
    assert_eq!(v2.sm_config.get("vhd-parent"), c.sm_config.get("vhd-parent"));
    // A clone of the clone: another base, one level deeper.
    let cc = sr.backend.vdi_clone(&sr.ctx, &c).expect("clone of clone");
    assert!(sr.read_all(&cc.vdi) == data, "content differs");
    assert_eq!(sr.files().len(), 5, "3 leaves, 2 hidden bases");
    // Destroying the origin leaves the clones intact.
    sr.backend.vdi_destroy(&sr.ctx, &v.vdi).expect("destroy origin");
    assert!(sr.read_all(&c.vdi) == data, "content differs");
    assert!(sr.read_all(&cc.vdi) == data, "content differs");
    vhd_check(&sr.vhd(&cc.vdi)).expect("sound chain");
}

#[test]
fn resize_grows_only() {
    require!("qemu-img");
    let sr = TestSr::new();
    let v = sr.create("grow", 4 * MIB);
    assert_eq!(sr.backend.vdi_resize(&sr.ctx, &v.vdi, 64 * MIB + 100), Ok(64 * MIB + 512));
    assert_eq!(qemu_info(&sr.vhd(&v.vdi))["virtual-size"], 64 * MIB + 512);
    assert_eq!(sr.backend.vdi_stat(&sr.ctx, &v.vdi).expect("stat").virtual_size, 64 * MIB + 512);
    let e = sr.backend.vdi_resize(&sr.ctx, &v.vdi, 4 * MIB).expect_err("shrink");
    assert!(matches!(&e, StorageError::BackendError(c, p) if c == "SR_BACKEND_FAILURE" && p[1].contains("shrink")), "{e:?}");
    assert_eq!(sr.backend.vdi_stat(&sr.ctx, &v.vdi).expect("stat").virtual_size, 64 * MIB + 512);
    // A VDI on a base (after a snapshot) grows too.
    let s = sr.backend.vdi_snapshot(&sr.ctx, &v).expect("snapshot");
    assert_eq!(sr.backend.vdi_resize(&sr.ctx, &v.vdi, 128 * MIB), Ok(128 * MIB));
    assert_eq!(sr.backend.vdi_stat(&sr.ctx, &s.vdi).expect("stat").virtual_size, 64 * MIB + 512);
    vhd_check(&sr.vhd(&v.vdi)).expect("sound chain");
    assert_eq!(sr.read_all(&v.vdi).len() as i64, 128 * MIB);
}

#[test]
fn compose_layers_the_child_on_the_parent_and_hides_the_parent() {
    require!("qemu-io");
    let sr = TestSr::new();
    // The destination's shape during a migration: a leaf with a dummy snapshot, and a parent.
    let parent = sr.create("parent", 4 * MIB);
    qemu_write(&sr.vhd(&parent.vdi), 0, 0x11, 2 * MIB as u64);
    let leaf = sr.create("leaf", 4 * MIB);
    qemu_write(&sr.vhd(&leaf.vdi), MIB as u64, 0x22, 4096);
    let dummy = sr.backend.vdi_snapshot(&sr.ctx, &leaf).expect("dummy snapshot");
    let leaf_base = sr.backend.vdi_stat(&sr.ctx, &leaf.vdi).expect("stat").sm_config["vhd-parent"].clone();

    // What the leaf held moved to its base with the dummy snapshot, so its own file is empty:
    // composed, it reads as the parent exactly (the datapath tests write into a composed leaf).
    sr.backend.vdi_compose(&sr.ctx, &parent.vdi, &leaf.vdi).expect("compose");
    let mut expect = vec![0u8; 4 * MIB as usize];
    expect[..2 * MIB as usize].fill(0x11);
    assert!(sr.read_all(&leaf.vdi) == expect, "content differs");
    let l = sr.backend.vdi_stat(&sr.ctx, &leaf.vdi).expect("stat leaf");
    assert_eq!(l.sm_config.get("vhd-parent"), Some(&parent.vdi));
    // The parent is no longer a VDI: a hidden layer under the leaf.
    assert_eq!(sr.backend.vdi_stat(&sr.ctx, &parent.vdi), Err(StorageError::VdiDoesNotExist(parent.vdi.clone())));
    let mut visible = vec![leaf.vdi.clone(), dummy.vdi.clone()];
    visible.sort();
    assert_eq!(sr.scan_ids(), visible);
    // The old base still serves the dummy; dropping the dummy drops it.
    assert!(sr.files().contains(&leaf_base));
    sr.backend.vdi_destroy(&sr.ctx, &dummy.vdi).expect("destroy dummy");
    assert!(!sr.files().contains(&leaf_base), "the leaf's old base is garbage once the dummy goes");
    let mut left = vec![leaf.vdi.clone(), parent.vdi.clone()];
    left.sort();
    assert_eq!(sr.files(), left);
    assert!(sr.read_all(&leaf.vdi) == expect, "content differs");
    vhd_check(&sr.vhd(&leaf.vdi)).expect("sound chain");

    let e = sr.backend.vdi_compose(&sr.ctx, &leaf.vdi, &leaf.vdi).expect_err("onto itself");
    assert!(matches!(&e, StorageError::BackendError(c, _) if c == "SR_BACKEND_FAILURE"), "{e:?}");
    // A larger parent is refused and changes nothing.
    let big = sr.create("big", 8 * MIB);
    let e = sr.backend.vdi_compose(&sr.ctx, &big.vdi, &leaf.vdi).expect_err("larger parent");
    assert!(matches!(&e, StorageError::BackendError(c, p) if c == "SR_BACKEND_FAILURE" && p[0] == "invalid"), "{e:?}");
    assert!(sr.backend.vdi_stat(&sr.ctx, &big.vdi).is_ok());
    assert!(sr.read_all(&leaf.vdi) == expect, "content differs");
    // Nothing is composed under a snapshot (read-only): its content would change.
    let snap = sr.backend.vdi_snapshot(&sr.ctx, &leaf).expect("snapshot");
    let p = sr.create("p", 4 * MIB);
    qemu_write(&sr.vhd(&p.vdi), 0, 0x33, 4096);
    let e = sr.backend.vdi_compose(&sr.ctx, &p.vdi, &snap.vdi).expect_err("under a snapshot");
    assert!(matches!(&e, StorageError::BackendError(c, p) if c == "SR_BACKEND_FAILURE" && p[0] == "invalid"), "{e:?}");
    assert!(sr.read_all(&snap.vdi) == expect, "the snapshot changed");
}

#[test]
fn similar_content_is_the_tree_distance_nearest_first() {
    let sr = TestSr::new();
    let v = sr.create("v", 2 * MIB);
    let other = sr.create("unrelated", 2 * MIB);
    let s1 = sr.backend.vdi_snapshot(&sr.ctx, &v).expect("s1");
    let s2 = sr.backend.vdi_snapshot(&sr.ctx, &v).expect("s2");
    // base1 ─┬─ base2 ─┬─ v
    //        │         └─ s2
    //        └─ s1
    let ids = |l: Vec<VdiInfo>| l.into_iter().map(|i| i.vdi).collect::<Vec<_>>();
    assert_eq!(ids(sr.backend.vdi_similar_content(&sr.ctx, &v.vdi).expect("similar")), vec![v.vdi.clone(), s2.vdi.clone(), s1.vdi.clone()]);
    assert_eq!(ids(sr.backend.vdi_similar_content(&sr.ctx, &s1.vdi).expect("similar")), {
        // s1 → base1 → base2 → {v, s2}: the same distance, in id order.
        let mut far = vec![v.vdi.clone(), s2.vdi.clone()];
        far.sort();
        let mut l = vec![s1.vdi.clone()];
        l.extend(far);
        l
    });
    assert_eq!(ids(sr.backend.vdi_similar_content(&sr.ctx, &other.vdi).expect("similar")), vec![other.vdi.clone()]);
    // CBT metadata VDIs hold no data and are left out.
    let mut cbt = VdiInfo::new("x", "cbt");
    cbt.virtual_size = 2 * MIB;
    cbt.ty = "cbt_metadata".into();
    let cbt = sr.backend.vdi_create(&sr.ctx, &cbt).expect("create");
    let c = sr.backend.vdi_clone(&sr.ctx, &cbt).expect("clone");
    assert_eq!(ids(sr.backend.vdi_similar_content(&sr.ctx, &c.vdi).expect("similar")), Vec::<String>::new());
}

#[test]
fn every_update_is_persisted() {
    let mut sr = TestSr::new();
    let v = sr.create("v", 2 * MIB);
    let w = sr.create("w", 2 * MIB);
    let changes = [
        VdiChange::ContentId("c-42".into()),
        VdiChange::NameLabel("renamed".into()),
        VdiChange::NameDescription("described".into()),
        VdiChange::Persistent(false),
        VdiChange::AddSmConfig("base_mirror".into(), "sr/vdi".into()),
        VdiChange::AddSmConfig("keep".into(), "1".into()),
        VdiChange::RemoveSmConfig("base_mirror".into()),
        VdiChange::SnapshotOf { of: w.vdi.clone(), time: "20240102T03:04:05Z".into() },
    ];
    for c in &changes {
        sr.backend.vdi_update(&sr.ctx, &v.vdi, c).unwrap_or_else(|e| panic!("{c:?}: {e}"));
    }
    sr.restart();
    let got = sr.backend.vdi_stat(&sr.ctx, &v.vdi).expect("stat");
    assert_eq!(got.content_id, "c-42");
    assert_eq!(got.name_label, "renamed");
    assert_eq!(got.name_description, "described");
    assert!(!got.persistent);
    assert_eq!(got.sm_config.get("keep").map(String::as_str), Some("1"));
    assert!(!got.sm_config.contains_key("base_mirror"));
    assert!(got.is_a_snapshot);
    assert_eq!(got.snapshot_of, w.vdi);
    assert_eq!(got.snapshot_time, "20240102T03:04:05Z");
    // Only the VDI named changed.
    assert_eq!(sr.backend.vdi_stat(&sr.ctx, &w.vdi).expect("stat"), w);

    let bad = [
        VdiChange::AddSmConfig("vhd-parent".into(), "x".into()),
        VdiChange::SnapshotOf { of: uuid::Uuid::new_v4().to_string(), time: NEVER.into() },
        VdiChange::SnapshotOf { of: "../x".into(), time: NEVER.into() },
    ];
    for c in &bad {
        assert!(sr.backend.vdi_update(&sr.ctx, &v.vdi, c).is_err(), "{c:?}");
    }
    assert_eq!(sr.backend.vdi_stat(&sr.ctx, &v.vdi).expect("stat"), got, "refused updates change nothing");
}

/// A copy that fills the SR after an earlier save released the reserve leaves no room for the
/// record: the destroy that undoes it must still go through, or the space is never freed.
#[test]
fn a_full_sr_whose_reserve_is_spent_still_destroys_the_vdi_that_filled_it() {
    require!("qemu-io");
    let Some(sr) = TestSr::on_tmpfs("4m") else {
        eprintln!("skipping: cannot mount a tmpfs here (needs root)");
        return;
    };
    let keep = sr.create("keep", 2 * MIB);
    let v = sr.create("filler", 16 * MIB);
    let reserve = sr.ctx.dir.join(sxm_engine::state::RESERVE_FILE);
    std::fs::remove_file(&reserve).expect("spend the reserve");
    let filled = crate::harness::try_run(
        std::process::Command::new("qemu-io").args(["-f", "vpc", "-c", "write -P 7 0 8M"]).arg(sr.vhd(&v.vdi)),
    );
    assert!(filled.is_err(), "8 MiB fit in a 4 MiB file system?");
    assert!(tapmirror::testkit::no_room_in(&sr.ctx.dir), "the SR is not full");

    sr.backend.vdi_destroy(&sr.ctx, &v.vdi).expect("VDI.destroy on a full SR");
    assert_eq!(sr.files(), vec![keep.vdi.clone()]);
    assert_eq!(sr.scan_ids(), vec![keep.vdi.clone()]);
    let left: Vec<String> =
        std::fs::read_dir(&sr.ctx.dir).expect("list").filter_map(|e| Some(e.ok()?.file_name().to_string_lossy().into_owned())).collect();
    assert!(!left.iter().any(|n| n.ends_with(sxm_engine::state::TOMBSTONE_SUFFIX)), "a tombstone was left: {left:?}");
    assert_eq!(std::fs::metadata(&reserve).map(|m| m.len()).ok(), Some(1 << 20), "the reserve is not remade");
    // The record was written whole: a new backend reads the same SR.
    let mut sr = sr;
    sr.restart();
    assert_eq!(sr.backend.vdi_stat(&sr.ctx, &keep.vdi).expect("stat"), keep);
}

/// Snapshots kept one after another lengthen the VDI's chain by one each; the one that would
/// pass SM's 30 images is refused with SM's `SnapshotChainTooLong` before anything changes (the
/// 256th once left the VDI unopenable, its datapath paused), and destroying the latest
/// snapshot, which coalesces its base into the VDI, makes room again.
#[test]
fn a_snapshot_that_would_make_the_chain_too_long_is_refused_and_changes_nothing() {
    require!("qemu-io");
    let sr = TestSr::new();
    let v = sr.create("v", 4 * MIB);
    sr.write_through_datapath(&v.vdi, "write -P 0x61 0 64k");
    let mut last = None;
    for _ in 0..29 {
        last = Some(sr.backend.vdi_snapshot(&sr.ctx, &v).expect("snapshot"));
    }
    let files = sr.files();
    let before = sr.read_all(&v.vdi);
    let e = sr.backend.vdi_snapshot(&sr.ctx, &v).expect_err("the 30th snapshot");
    assert!(matches!(&e, StorageError::BackendError(c, p) if c == "SR_BACKEND_FAILURE_109" && p[1] == "The snapshot chain is too long"), "{e:?}");
    let e = sr.backend.vdi_clone(&sr.ctx, &v).expect_err("a clone too");
    assert!(matches!(&e, StorageError::BackendError(c, _) if c == "SR_BACKEND_FAILURE_109"), "{e:?}");
    assert_eq!(sr.files(), files, "a refused snapshot changed the files");
    assert!(sr.read_all(&v.vdi) == before);
    sr.backend.vdi_destroy(&sr.ctx, &last.expect("a snapshot").vdi).expect("destroy the latest snapshot");
    sr.backend.vdi_snapshot(&sr.ctx, &v).expect("room for one again");
    vhd_check(&sr.vhd(&v.vdi)).expect("sound chain");
}
