//! Crashes in the middle of multi-step changes, simulated by doing the file steps a call does
//! (with tapmirror's own VHD operations) and stopping before the record is written; then
//! `SR.attach` must leave every VDI whole and nothing behind.

use std::fs;

use sxm_engine::backend::Backend;
use sxm_engine::model::StorageError;
use sxm_smapiv1::recover::recover;
use tapmirror::image::vhd;

use crate::harness::{TestSr, qemu_write, vhd_check};
use crate::require;

const MIB: i64 = 1 << 20;

fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

#[test]
fn temporaries_and_orphan_files_are_swept_at_attach() {
    let sr = TestSr::new();
    let v = sr.create("v", 2 * MIB);
    // A create that crashed before its record, a torn record write, a snapshot's temporary.
    let orphan = new_id();
    vhd::create_dynamic(&sr.vhd(&orphan), 2 << 20, vhd::DEFAULT_BLOCK_SIZE).expect("orphan");
    let torn = sr.ctx.dir.join("..sxm-ext.json.tmp");
    fs::write(&torn, b"{\"vers").expect("torn record");
    let tmp_leaf = sr.ctx.dir.join(format!(".{}.vhd.snapshot-tmp", v.vdi));
    fs::write(&tmp_leaf, b"partial").expect("snapshot temporary");
    // Someone else's file is not ours to delete.
    let foreign = sr.ctx.dir.join("notes.txt");
    fs::write(&foreign, b"keep").expect("foreign");

    let r = recover(&sr.ctx.sr, &sr.ctx.dir).expect("recover");
    assert_eq!(r.temporaries, 2);
    assert_eq!(r.deleted, vec![orphan.clone()]);
    assert!(!torn.exists() && !tmp_leaf.exists() && !sr.vhd(&orphan).exists());
    assert!(foreign.exists());
    assert_eq!(sr.files(), vec![v.vdi.clone()]);
    assert_eq!(sr.backend.vdi_stat(&sr.ctx, &v.vdi).expect("stat"), v);
    // A second pass finds nothing to do.
    assert_eq!(recover(&sr.ctx.sr, &sr.ctx.dir).expect("recover"), Default::default());
}

#[test]
fn a_snapshot_cut_after_the_link_leaves_the_vdi_as_it_was() {
    require!("qemu-io");
    let sr = TestSr::new();
    let v = sr.create("v", 4 * MIB);
    qemu_write(&sr.vhd(&v.vdi), 0, 0x33, 65536);
    let v = sr.backend.vdi_stat(&sr.ctx, &v.vdi).expect("stat");
    let before = sr.read_all(&v.vdi);
    // vhd::snapshot's first step: the base is a second name of the VDI's file.
    let base = new_id();
    fs::hard_link(sr.vhd(&v.vdi), sr.vhd(&base)).expect("link");
    sr.backend.sr_attach(&sr.ctx, &[]).expect("attach");
    assert_eq!(sr.files(), vec![v.vdi.clone()]);
    assert!(sr.read_all(&v.vdi) == before, "content differs");
    assert_eq!(sr.backend.vdi_stat(&sr.ctx, &v.vdi).expect("stat"), v);
}

#[test]
fn a_snapshot_cut_after_the_rename_keeps_the_new_base_as_a_hidden_parent() {
    require!("qemu-io");
    let sr = TestSr::new();
    let v = sr.create("v", 4 * MIB);
    qemu_write(&sr.vhd(&v.vdi), 512, 0x44, 65536);
    let before = sr.read_all(&v.vdi);
    let (base, snap) = (new_id(), new_id());
    vhd::snapshot(&sr.vhd(&v.vdi), &sr.vhd(&base)).expect("snapshot");
    vhd::clone(&sr.vhd(&base), &sr.vhd(&snap)).expect("the snapshot's leaf");
    // Crash: the record still says v has no parent and knows neither file.
    let r = recover(&sr.ctx.sr, &sr.ctx.dir).expect("recover");
    assert_eq!(r.adopted, vec![base.clone()]);
    assert_eq!(r.reparented, vec![v.vdi.clone()]);
    assert_eq!(r.deleted, vec![snap.clone()], "the unrecorded snapshot leaf is garbage");
    assert_eq!(sr.scan_ids(), vec![v.vdi.clone()]);
    let mut files = vec![v.vdi.clone(), base.clone()];
    files.sort();
    assert_eq!(sr.files(), files);
    let now = sr.backend.vdi_stat(&sr.ctx, &v.vdi).expect("stat");
    assert_eq!(now.sm_config.get("vhd-parent"), Some(&base));
    assert!(sr.read_all(&v.vdi) == before, "content differs");
    // And the tree is whole again: destroying v drops the adopted base too.
    sr.backend.vdi_destroy(&sr.ctx, &v.vdi).expect("destroy");
    assert!(sr.files().is_empty());
}

/// A coalesce after a destroy, cut after its record (the VDI on its grandparent, the hidden
/// base gone) but before the base's file is renamed over the VDI's: the VDI's file still names
/// the base, so attach adopts the base again and the VDI reads the same. The base stays (the
/// chain one longer than it would be); later snapshots' destroys coalesce only their own base.
#[test]
fn a_coalesce_cut_before_its_rename_keeps_the_base_and_reads_the_same() {
    require!("qemu-io");
    let sr = TestSr::new();
    let v = sr.create("v", 4 * MIB);
    qemu_write(&sr.vhd(&v.vdi), 512, 0x44, 65536);
    let s = sr.backend.vdi_snapshot(&sr.ctx, &v).expect("snapshot");
    let base = sr.backend.vdi_stat(&sr.ctx, &v.vdi).expect("stat").sm_config.get("vhd-parent").expect("a base").clone();
    let before = sr.read_all(&v.vdi);
    // The steps of the destroy of s and the coalesce, up to the record.
    let mut meta = sxm_smapiv1::meta::SrMeta::load_existing(&sr.ctx.dir).expect("record");
    meta.nodes.remove(&s.vdi);
    fs::remove_file(sr.vhd(&s.vdi)).expect("s's file");
    vhd::coalesce(&sr.vhd(&v.vdi)).expect("coalesce");
    meta.nodes.remove(&base);
    meta.nodes.get_mut(&v.vdi).expect("v").parent = None;
    meta.save(&sr.ctx.dir).expect("save");
    // Crash; attach.
    let r = recover(&sr.ctx.sr, &sr.ctx.dir).expect("recover");
    assert_eq!((r.adopted, r.reparented), (vec![base.clone()], vec![v.vdi.clone()]));
    assert!(sr.read_all(&v.vdi) == before, "content differs");
    // A new snapshot's destroy coalesces its own base, above the adopted one.
    let s2 = sr.backend.vdi_snapshot(&sr.ctx, &v).expect("snapshot");
    sr.backend.vdi_destroy(&sr.ctx, &s2.vdi).expect("destroy");
    assert!(sr.read_all(&v.vdi) == before, "content differs");
    assert_eq!(sr.files().len(), 2, "v on the adopted base: {:?}", sr.files());
    vhd_check(&sr.vhd(&v.vdi)).expect("sound chain");
}

#[test]
fn a_compose_cut_before_its_record_is_finished_at_attach() {
    require!("qemu-io");
    let sr = TestSr::new();
    let parent = sr.create("parent", 4 * MIB);
    qemu_write(&sr.vhd(&parent.vdi), 0, 0x55, 65536);
    let leaf = sr.create("leaf", 4 * MIB);
    let dummy = sr.backend.vdi_snapshot(&sr.ctx, &leaf).expect("dummy");
    vhd::compose(&sr.vhd(&leaf.vdi), &sr.vhd(&parent.vdi)).expect("compose");
    let r = recover(&sr.ctx.sr, &sr.ctx.dir).expect("recover");
    assert_eq!(r.reparented, vec![leaf.vdi.clone()]);
    assert_eq!(r.hidden, vec![parent.vdi.clone()]);
    assert_eq!(sr.backend.vdi_stat(&sr.ctx, &parent.vdi), Err(StorageError::VdiDoesNotExist(parent.vdi.clone())));
    let l = sr.backend.vdi_stat(&sr.ctx, &leaf.vdi).expect("stat");
    assert_eq!(l.sm_config.get("vhd-parent"), Some(&parent.vdi));
    let mut expect = vec![0u8; 4 << 20];
    expect[..65536].fill(0x55);
    assert!(sr.read_all(&leaf.vdi) == expect, "content differs");
    assert!(sr.backend.vdi_stat(&sr.ctx, &dummy.vdi).is_ok());
}

#[test]
fn vhd_files_without_a_record_are_refused_not_deleted() {
    let sr = TestSr::new();
    let v = sr.create("v", 2 * MIB);
    fs::remove_file(sr.ctx.dir.join(".sxm-ext.json")).expect("lose the record");
    let e = sr.backend.sr_attach(&sr.ctx, &[]).expect_err("attach without a record");
    assert!(matches!(&e, StorageError::BackendError(c, p) if c == "SR_BACKEND_FAILURE" && p[0] == "metadata"), "{e:?}");
    assert_eq!(sr.files(), vec![v.vdi.clone()]);
    let e = sr.backend.sr_scan(&sr.ctx).expect_err("scan without a record");
    assert!(matches!(&e, StorageError::BackendError(_, p) if p[0] == "metadata"), "{e:?}");
}

#[test]
fn a_corrupt_vhd_is_reported_for_its_vdi_and_loses_nothing_else() {
    require!("qemu-io");
    let sr = TestSr::new();
    let good = sr.create("good", 4 * MIB);
    qemu_write(&sr.vhd(&good.vdi), 0, 0x66, 4096);
    let good = sr.backend.vdi_stat(&sr.ctx, &good.vdi).expect("stat");
    let bad = sr.create("bad", 4 * MIB);
    let s = sr.backend.vdi_snapshot(&sr.ctx, &bad).expect("snapshot");
    let base = sr.backend.vdi_stat(&sr.ctx, &bad.vdi).expect("stat").sm_config["vhd-parent"].clone();
    let orphan = new_id();
    vhd::create_dynamic(&sr.vhd(&orphan), 2 << 20, vhd::DEFAULT_BLOCK_SIZE).expect("orphan");
    // Damage the hidden base's footer and header: both bad and its snapshot read through it.
    let mut bytes = fs::read(sr.vhd(&base)).expect("read");
    bytes[..1536].fill(0xEE);
    let n = bytes.len();
    bytes[n - 512..].fill(0xEE);
    fs::write(sr.vhd(&base), &bytes).expect("corrupt");
    let record = fs::read(sr.ctx.dir.join(".sxm-ext.json")).expect("record");

    for id in [&bad.vdi, &s.vdi] {
        let e = sr.backend.vdi_stat(&sr.ctx, id).expect_err("stat of a VDI over a corrupt file");
        match &e {
            StorageError::BackendError(c, p) => {
                assert_eq!(c, "SR_BACKEND_FAILURE");
                assert_eq!(p[0], "corrupt", "{p:?}");
                assert!(p[1].contains(id.as_str()) && p[1].contains(&base), "names the VDI and the file: {p:?}");
            }
            other => panic!("{other:?}"),
        }
    }
    let scan = sr.backend.sr_scan(&sr.ctx).expect("scan still answers");
    assert_eq!(scan.len(), 3);
    for i in &scan {
        let err = i.sm_config.get("vhd-error");
        if i.vdi == good.vdi {
            assert!(err.is_none());
        } else {
            assert!(err.is_some_and(|e| e.contains("corrupt")), "{:?}", i.sm_config);
        }
    }
    assert_eq!(sr.backend.vdi_stat(&sr.ctx, &good.vdi).expect("stat"), good);
    assert_eq!(sr.read_all(&good.vdi)[..4096], [0x66; 4096]);

    // Attach deletes nothing while a file cannot be read, not even the orphan, and keeps the
    // record as it was.
    let r = recover(&sr.ctx.sr, &sr.ctx.dir).expect("recover");
    assert!(r.deleted.is_empty() && r.unreadable.len() == 3, "{r:?}");
    assert!(sr.vhd(&orphan).exists());
    assert_eq!(fs::read(sr.ctx.dir.join(".sxm-ext.json")).expect("record"), record);
    vhd_check(&sr.vhd(&good.vdi)).expect("the good VDI is sound");
    assert!(vhd_check(&sr.vhd(&bad.vdi)).is_err());
}

/// A destroy on a full SR buries the VDI's file (renamed to its tombstone, emptied) before the
/// record stops naming it. Cut there, the destroy has committed: attach finishes it, drops the
/// hidden parents only it needed, and keeps what the other VDIs read.
#[test]
fn a_destroy_cut_after_burying_its_file_is_finished_at_attach() {
    require!("qemu-io");
    let sr = TestSr::new();
    let v = sr.create("v", 4 * MIB);
    qemu_write(&sr.vhd(&v.vdi), 0, 0x55, 65536);
    let s = sr.backend.vdi_snapshot(&sr.ctx, &v).expect("snapshot");
    let snap_data = sr.read_all(&s.vdi);
    // A VDI alone on a hidden base: its snapshot destroyed once it held more than a destroy
    // coalesces (else the base would be folded into it).
    let lone = sr.create("lone", 72 * MIB);
    let lone_base = sr.backend.vdi_snapshot(&sr.ctx, &lone).expect("snapshot of lone");
    sr.write_through_datapath(&lone.vdi, "write -P 0x77 0 65M");
    sr.backend.vdi_destroy(&sr.ctx, &lone_base.vdi).expect("destroy lone's snapshot");
    vhd_check(&sr.vhd(&lone.vdi)).expect("lone is sound, on its base");
    let hidden: Vec<String> = sr.files().into_iter().filter(|f| ![&v.vdi, &s.vdi, &lone.vdi].contains(&f)).collect();
    assert_eq!(hidden.len(), 2, "one hidden base each for v and lone: {hidden:?}");
    // Crash: v's and lone's files are buried, the record still names both.
    for id in [&v.vdi, &lone.vdi] {
        sxm_engine::state::bury(&sr.vhd(id)).expect("bury");
    }
    // And a tombstone whose destroy had written its record (cut before the tombstone went).
    let done = new_id();
    fs::write(sr.ctx.dir.join(format!(".{done}.vhd{}", sxm_engine::state::TOMBSTONE_SUFFIX)), b"").expect("stale tombstone");

    let r = recover(&sr.ctx.sr, &sr.ctx.dir).expect("recover");
    let mut destroyed = vec![v.vdi.clone(), lone.vdi.clone()];
    destroyed.sort();
    assert_eq!(r.destroyed, destroyed);
    assert!(r.unreadable.is_empty(), "{:?}", r.unreadable);
    assert_eq!(r.deleted.len(), 1, "lone's hidden base goes, v's stays under the snapshot: {:?}", r.deleted);
    assert_eq!(sr.scan_ids(), vec![s.vdi.clone()]);
    assert_eq!(sr.files().len(), 2, "the snapshot and its base");
    assert!(sr.read_all(&s.vdi) == snap_data, "the snapshot's content changed");
    let left: Vec<String> = fs::read_dir(&sr.ctx.dir).expect("list").filter_map(|e| Some(e.ok()?.file_name().to_string_lossy().into_owned())).collect();
    assert!(!left.iter().any(|n| n.ends_with(sxm_engine::state::TOMBSTONE_SUFFIX)), "tombstones left: {left:?}");
    assert_eq!(recover(&sr.ctx.sr, &sr.ctx.dir).expect("recover"), Default::default());
}
