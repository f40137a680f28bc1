//! Datapaths: real `tapmirror serve` processes, written and read by real NBD clients.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sxm_engine::backend::{AttachedVdi, Backend};
use sxm_engine::model::{AttachInfo, StorageError};
use tapmirror::image::vhd;
use tapmirror::nbd::{NbdClient, NbdUri};

use tapmirror::testkit::{alive, qemu_io, qemu_io_ro};

use crate::harness::{TestSr, nbd_uri, pattern, run, vhd_check, xapi_nbd};
use crate::require;

const MIB: i64 = 1 << 20;

/// The pid in a datapath folder's pid file.
fn pid_in(dir: &Path) -> i32 {
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("serve.pid")).expect("pid file")).expect("pid JSON");
    v["pid"].as_i64().expect("pid") as i32
}

/// Every datapath folder in the SR's run folder.
fn dp_dirs(sr: &TestSr) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(&sr.ctx.run_dir).expect("run dir").map(|e| e.expect("entry").path()).collect();
    v.sort();
    v
}

/// The datapath folder serving `info`.
fn dp_dir(info: &AttachInfo) -> PathBuf {
    xapi_nbd(info).0.parent().expect("socket in a folder").to_path_buf()
}

fn in_use(e: &StorageError) -> bool {
    matches!(e, StorageError::BackendError(c, _) if c == "VDI_IN_USE")
}

fn stats(info: &AttachInfo) -> serde_json::Value {
    let socket = dp_dir(info).join("control.sock");
    tapmirror::control::request(&socket, &serde_json::json!({"cmd": "stats"}), None).expect("stats")
}

#[test]
fn attach_activate_write_read_deactivate_detach() {
    require!("qemu-io", "nbdcopy", "qemu-img");
    let sr = TestSr::new();
    let v = sr.create("disk", 16 * MIB);
    let info = sr.backend.vdi_attach(&sr.ctx, &v.vdi, true).expect("attach");
    let (socket, export) = xapi_nbd(&info);
    assert_eq!(export, v.vdi, "the export is named after the VDI");
    assert!(socket.as_os_str().len() < 107, "{}", socket.display());
    assert!(socket.starts_with(&sr.ctx.run_dir));
    assert_eq!(sr.backend.vdi_attach_info(&sr.ctx, &v.vdi).expect("attach_info"), info);
    let dir = dp_dir(&info);
    let pid = pid_in(&dir);
    assert!(alive(pid));
    // Attached but not active: it takes no I/O yet.
    assert_eq!(stats(&info)["paused"], true);
    sr.backend.vdi_activate(&sr.ctx, &v.vdi).expect("activate");
    assert_eq!(stats(&info)["paused"], false);

    let uri = nbd_uri(&info);
    qemu_io(&uri, "write -P 0x5a 1M 64k").expect("qemu-io write");
    qemu_io(&uri, "read -P 0x5a 1M 64k").expect("qemu-io reads back what it wrote");
    // nbdcopy: a whole disk in, the whole disk out.
    let src = sr._tmp.path().join("src.raw");
    let mut data = vec![0u8; 16 << 20];
    data[3 << 20..(3 << 20) + 300_000].copy_from_slice(&pattern(300_000, 7));
    data[(16 << 20) - 4096..].copy_from_slice(&pattern(4096, 8));
    std::fs::write(&src, &data).expect("source");
    run(Command::new("nbdcopy").arg(&src).arg(&uri));
    let out = sr._tmp.path().join("out.raw");
    run(Command::new("nbdcopy").arg(&uri).arg(&out));
    assert!(std::fs::read(&out).expect("copy out") == data, "nbdcopy reads back what it wrote");

    // Busy while attached.
    assert!(in_use(&sr.backend.vdi_destroy(&sr.ctx, &v.vdi).expect_err("destroy while attached")));
    assert!(in_use(&sr.backend.vdi_resize(&sr.ctx, &v.vdi, 32 * MIB).expect_err("resize while attached")));
    assert!(in_use(&sr.backend.sr_destroy(&sr.ctx).expect_err("SR.destroy while attached")));
    let other = sr.create("other", 16 * MIB);
    assert!(in_use(&sr.backend.vdi_compose(&sr.ctx, &v.vdi, &other.vdi).expect_err("compose onto an attached parent")));

    sr.backend.vdi_deactivate(&sr.ctx, &v.vdi).expect("deactivate");
    assert_eq!(stats(&info)["paused"], true);
    assert!(alive(pid), "deactivate keeps the process");
    sr.backend.vdi_detach(&sr.ctx, &v.vdi).expect("detach");
    assert!(!alive(pid), "detach stops the process");
    assert!(!dir.exists() && !socket.exists(), "detach removes the folder and sockets");
    assert!(dp_dirs(&sr).is_empty());
    assert!(sr.backend.vdi_attach_info(&sr.ctx, &v.vdi).is_err());
    // What the clients wrote is in the file, as we read it and as QEMU's own VHD driver does
    // (the VDI is a dynamic disk, which QEMU reads; it has no `check` for VHD).
    assert!(sr.read_all(&v.vdi) == data);
    vhd_check(&sr.vhd(&v.vdi)).expect("sound VHD");
    run(Command::new("qemu-img").args(["compare", "-f", "vpc", "-F", "raw"]).arg(sr.vhd(&v.vdi)).arg(&src));
    sr.backend.vdi_destroy(&sr.ctx, &v.vdi).expect("destroy once detached");
}

/// A datapath whose process died (killed, crashed) still deactivates and detaches: there is
/// nothing left to drain, and the VHD holds what a crash leaves, which is sound.
#[test]
fn a_datapath_whose_process_died_still_deactivates_and_detaches() {
    require!("qemu-io");
    let sr = TestSr::new();
    let v = sr.create("disk", 16 * MIB);
    let info = sr.backend.vdi_attach(&sr.ctx, &v.vdi, true).expect("attach");
    sr.backend.vdi_activate(&sr.ctx, &v.vdi).expect("activate");
    qemu_io(&nbd_uri(&info), "write -P 0x3d 2M 64k").expect("qemu-io write");
    let dir = dp_dir(&info);
    let pid = pid_in(&dir);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL).expect("kill");
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive(pid) {
        assert!(Instant::now() < deadline, "the datapath did not die");
        std::thread::sleep(Duration::from_millis(20));
    }
    sr.backend.vdi_deactivate(&sr.ctx, &v.vdi).expect("deactivate a dead datapath");
    sr.backend.vdi_detach(&sr.ctx, &v.vdi).expect("detach a dead datapath");
    assert!(!dir.exists(), "detach removes the folder");
    vhd_check(&sr.vhd(&v.vdi)).expect("sound VHD");
    assert!(sr.read_all(&v.vdi)[2 << 20..(2 << 20) + 65536].iter().all(|&b| b == 0x3d), "the flushed write is in the file");
}

#[test]
fn read_only_vdis_attach_read_only() {
    require!("qemu-io");
    let sr = TestSr::new();
    let v = sr.create("disk", 4 * MIB);
    let s = sr.backend.vdi_snapshot(&sr.ctx, &v).expect("snapshot");
    let e = sr.backend.vdi_attach(&sr.ctx, &s.vdi, true).expect_err("read-write attach of a snapshot");
    assert!(matches!(&e, StorageError::BackendError(c, p) if c == "VDI_READONLY" && p.as_slice() == std::slice::from_ref(&s.vdi)), "{e:?}");
    assert!(dp_dirs(&sr).is_empty(), "a refused attach starts nothing");
    // Nor is a snapshot resized: its size is part of the instant it holds.
    let e = sr.backend.vdi_resize(&sr.ctx, &s.vdi, 8 * MIB).expect_err("resize of a snapshot");
    assert!(matches!(&e, StorageError::BackendError(c, _) if c == "VDI_READONLY"), "{e:?}");
    assert_eq!(sr.backend.vdi_stat(&sr.ctx, &s.vdi).expect("stat").virtual_size, 4 * MIB);
    let info = sr.backend.vdi_attach(&sr.ctx, &s.vdi, false).expect("read-only attach");
    sr.backend.vdi_activate(&sr.ctx, &s.vdi).expect("activate");
    let uri = nbd_uri(&info);
    qemu_io_ro(&uri, "read -P 0 0 64k").expect("reads");
    assert!(qemu_io(&uri, "write -P 1 0 64k").is_err(), "a read-only export refuses writes");
    // A second attach in the same mode answers the same; in another mode it is refused.
    assert_eq!(sr.backend.vdi_attach(&sr.ctx, &s.vdi, false).expect("again"), info);
    sr.backend.vdi_deactivate(&sr.ctx, &s.vdi).expect("deactivate");
    sr.backend.vdi_detach(&sr.ctx, &s.vdi).expect("detach");
    assert_eq!(sr.read_all(&s.vdi), vec![0u8; 4 << 20]);
}

/// One guest write: which block, which round, when it started and completed.
#[derive(Clone, Copy, Debug)]
struct Write {
    block: u64,
    round: u64,
    start: Instant,
    end: Instant,
}

const BLOCK: usize = 64 << 10;
const BLOCKS: u64 = 48;
const WRITERS: u64 = 4;

/// Block `b`'s content in round `r`: the block and round numbers, then a pattern of both.
fn block_data(b: u64, r: u64) -> Vec<u8> {
    let mut d = pattern(BLOCK, b * 1_000_003 + r);
    d[..8].copy_from_slice(&b.to_le_bytes());
    d[8..16].copy_from_slice(&r.to_le_bytes());
    d
}

fn round_of(data: &[u8], b: u64) -> u64 {
    let block = &data[(b as usize) * BLOCK..(b as usize + 1) * BLOCK];
    let r = u64::from_le_bytes(block[8..16].try_into().expect("8 bytes"));
    if block.iter().all(|&x| x == 0) {
        return 0;
    }
    assert_eq!(u64::from_le_bytes(block[..8].try_into().expect("8 bytes")), b, "block {b} holds another block's data");
    assert!(block == block_data(b, r).as_slice(), "block {b} round {r} is torn");
    r
}

#[test]
fn snapshot_while_a_guest_writes_loses_nothing_and_freezes_the_instant() {
    let sr = TestSr::new();
    let v = sr.create("busy disk", 4 * MIB);
    let info = sr.backend.vdi_attach(&sr.ctx, &v.vdi, true).expect("attach");
    sr.backend.vdi_activate(&sr.ctx, &v.vdi).expect("activate");
    let pid = pid_in(&dp_dir(&info));
    let uri = NbdUri::parse(&nbd_uri(&info)).expect("uri");

    // The guest: WRITERS tasks, each rewriting its own blocks round after round, one write at a
    // time, over one NBD connection; a pinned region past them: A before, B after the snapshot.
    let stop = Arc::new(AtomicBool::new(false));
    let rounds = Arc::new(AtomicU64::new(0));
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let client = rt.block_on(NbdClient::connect(&uri)).expect("connect");
    let pinned = BLOCKS * BLOCK as u64;
    rt.block_on(client.write(pinned, vec![0xA1u8; BLOCK], false)).expect("write A");
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let (client, stop, rounds) = (client.clone(), Arc::clone(&stop), Arc::clone(&rounds));
        tasks.push(rt.spawn(async move {
            let mut log = Vec::new();
            let mut round = 0;
            while !stop.load(Ordering::Relaxed) {
                round += 1;
                for block in (w..BLOCKS).step_by(WRITERS as usize) {
                    let start = Instant::now();
                    client.write(block * BLOCK as u64, block_data(block, round), false).await.map_err(|e| format!("block {block} round {round}: {e}"))?;
                    log.push(Write { block, round, start, end: Instant::now() });
                }
                if w == 0 {
                    rounds.store(round, Ordering::Relaxed);
                }
            }
            Ok::<_, String>(log)
        }));
    }
    let wait_rounds = |n: u64| {
        let deadline = Instant::now() + Duration::from_secs(60);
        while rounds.load(Ordering::Relaxed) < n {
            assert!(Instant::now() < deadline, "the writers stalled");
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    wait_rounds(3);
    let t0 = Instant::now();
    let mut req = v.clone();
    req.name_label = "under load".into();
    let s = sr.backend.vdi_snapshot(&sr.ctx, &req).expect("snapshot while writing");
    let t1 = Instant::now();
    let after = rounds.load(Ordering::Relaxed);
    rt.block_on(client.write(pinned, vec![0xB2u8; BLOCK], false)).expect("write B");
    wait_rounds(after + 3);
    stop.store(true, Ordering::Relaxed);
    let mut log = Vec::new();
    for t in tasks {
        log.extend(rt.block_on(t).expect("writer task").expect("the guest saw no error"));
    }
    rt.block_on(client.flush()).expect("flush");
    // The live datapath serves the leaf: read it back through it before stopping anything.
    let live = rt.block_on(client.read(0, (BLOCKS as usize + 1) * BLOCK)).expect("read the leaf");
    rt.block_on(client.disconnect()).expect("disconnect");
    assert_eq!(pid_in(&dp_dir(&info)), pid, "the same process served throughout");

    let last = |b: u64| log.iter().filter(|w| w.block == b).map(|w| w.round).max().expect("written");
    let snap = sr.read_all(&s.vdi);
    let mut moved = 0;
    for b in 0..BLOCKS {
        // No write lost: the leaf holds each block's last round, live and on disk.
        assert_eq!(round_of(&live, b), last(b), "block {b} in the live leaf");
        // The snapshot holds the round current at its instant: a round written before t1,
        // whose successor did not complete before t0.
        let r = round_of(&snap, b);
        let w = log.iter().find(|w| w.block == b && w.round == r).unwrap_or_else(|| panic!("block {b}: round {r} never written"));
        assert!(w.start < t1, "block {b}: the snapshot holds round {r}, written after the snapshot returned");
        if let Some(next) = log.iter().find(|w| w.block == b && w.round == r + 1) {
            assert!(next.end > t0, "block {b}: the snapshot misses round {}, completed before the snapshot began", r + 1);
        }
        if r < last(b) {
            moved += 1;
        }
    }
    assert!(moved > 0, "the guest kept writing after the snapshot");
    let pinned = pinned as usize..pinned as usize + BLOCK;
    assert!(snap[pinned.clone()].iter().all(|&b| b == 0xA1), "the snapshot holds A");
    assert!(live[pinned].iter().all(|&b| b == 0xB2), "the leaf holds B");

    sr.backend.vdi_deactivate(&sr.ctx, &v.vdi).expect("deactivate");
    sr.backend.vdi_detach(&sr.ctx, &v.vdi).expect("detach");
    let disk = sr.read_all(&v.vdi);
    assert!(disk[..live.len()] == live[..], "the leaf on disk is what the guest read");
    for id in [&v.vdi, &s.vdi] {
        vhd_check(&sr.vhd(id)).expect("sound chain");
    }
    eprintln!("snapshot under load: {} writes, snapshot call {:?}", log.len(), t1 - t0);
}

/// A VDI whose writes since its snapshot were small and scattered (a guest's during a failed
/// migration) is coalesced with its base when the snapshot goes: what the pause copies is the
/// sectors written (here 48 × 4 KiB), not the 2 MiB blocks they allocated (96 MiB, past the
/// live-coalesce bound). Counting blocks left each such VDI one chain level deeper.
#[test]
fn a_vdi_of_scattered_small_writes_is_coalesced_with_its_base() {
    let sr = TestSr::new();
    let v = sr.create("scattered", 128 * MIB);
    let info = sr.backend.vdi_attach(&sr.ctx, &v.vdi, true).expect("attach");
    sr.backend.vdi_activate(&sr.ctx, &v.vdi).expect("activate");
    let uri = NbdUri::parse(&nbd_uri(&info)).expect("uri");
    let s = sr.backend.vdi_snapshot(&sr.ctx, &v).expect("snapshot");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let client = rt.block_on(NbdClient::connect(&uri)).expect("connect");
    for block in 0..48u64 {
        rt.block_on(client.write(block * (2 << 20) + 8192, vec![block as u8 + 1; 4096], false)).expect("write");
    }
    rt.block_on(client.flush()).expect("flush");
    let allocated = vhd::info(&sr.vhd(&v.vdi)).expect("info").allocated_bytes;
    assert!(allocated > 64 << 20, "the writes allocate {allocated} bytes of blocks: past the bound, or the test shows nothing");
    sr.backend.vdi_destroy(&sr.ctx, &s.vdi).expect("destroy the snapshot");
    assert_eq!(sr.files(), vec![v.vdi.clone()], "the chain was not coalesced");
    for block in 0..48u64 {
        let got = rt.block_on(client.read(block * (2 << 20) + 8192, 4096)).expect("read");
        assert!(got.iter().all(|&b| b == block as u8 + 1), "block {block} lost its write");
    }
}

/// Backups' snapshot-and-destroy cycles under a writing guest: each destroy coalesces the
/// VDI with the hidden base it leaves (SM's leaf-coalesce), so the chain never grows, and no
/// write is lost or torn across the pauses.
#[test]
fn destroying_snapshots_under_a_writing_guest_coalesces_the_chain_and_loses_nothing() {
    let sr = TestSr::new();
    let v = sr.create("busy disk", 4 * MIB);
    let info = sr.backend.vdi_attach(&sr.ctx, &v.vdi, true).expect("attach");
    sr.backend.vdi_activate(&sr.ctx, &v.vdi).expect("activate");
    let uri = NbdUri::parse(&nbd_uri(&info)).expect("uri");
    let stop = Arc::new(AtomicBool::new(false));
    let rounds = Arc::new(AtomicU64::new(0));
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let client = rt.block_on(NbdClient::connect(&uri)).expect("connect");
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let (client, stop, rounds) = (client.clone(), Arc::clone(&stop), Arc::clone(&rounds));
        tasks.push(rt.spawn(async move {
            let mut last = vec![0u64; BLOCKS as usize];
            let mut round = 0;
            while !stop.load(Ordering::Relaxed) {
                round += 1;
                for block in (w..BLOCKS).step_by(WRITERS as usize) {
                    client.write(block * BLOCK as u64, block_data(block, round), false).await.map_err(|e| format!("block {block} round {round}: {e}"))?;
                    last[block as usize] = round;
                }
                if w == 0 {
                    rounds.store(round, Ordering::Relaxed);
                }
            }
            Ok::<_, String>(last)
        }));
    }
    let wait_rounds = |n: u64| {
        let deadline = Instant::now() + Duration::from_secs(60);
        while rounds.load(Ordering::Relaxed) < n {
            assert!(Instant::now() < deadline, "the writers stalled");
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    for cycle in 0..8 {
        wait_rounds(rounds.load(Ordering::Relaxed) + 2);
        let mut req = v.clone();
        req.name_label = format!("backup {cycle}");
        let s = sr.backend.vdi_snapshot(&sr.ctx, &req).expect("snapshot");
        assert_eq!(sr.files().len(), 3, "cycle {cycle}: the VDI, its snapshot and their base");
        wait_rounds(rounds.load(Ordering::Relaxed) + 1);
        sr.backend.vdi_destroy(&sr.ctx, &s.vdi).expect("destroy the snapshot");
        assert_eq!(sr.files(), vec![v.vdi.clone()], "cycle {cycle}: the chain was not coalesced");
        let stat = sr.backend.vdi_stat(&sr.ctx, &v.vdi).expect("stat");
        assert!(!stat.sm_config.contains_key("vhd-parent"), "cycle {cycle}: {:?}", stat.sm_config);
    }
    wait_rounds(rounds.load(Ordering::Relaxed) + 2);
    stop.store(true, Ordering::Relaxed);
    let mut last = vec![0u64; BLOCKS as usize];
    for t in tasks {
        for (b, r) in rt.block_on(t).expect("writer task").expect("the guest saw no error").into_iter().enumerate() {
            last[b] = last[b].max(r);
        }
    }
    rt.block_on(client.flush()).expect("flush");
    let live = rt.block_on(client.read(0, BLOCKS as usize * BLOCK)).expect("read the leaf");
    rt.block_on(client.disconnect()).expect("disconnect");
    for b in 0..BLOCKS {
        assert_eq!(round_of(&live, b), last[b as usize], "block {b}: a write was lost");
    }
    sr.backend.vdi_deactivate(&sr.ctx, &v.vdi).expect("deactivate");
    sr.backend.vdi_detach(&sr.ctx, &v.vdi).expect("detach");
    vhd_check(&sr.vhd(&v.vdi)).expect("sound VHD");
    assert!(sr.read_all(&v.vdi)[..live.len()] == live[..], "the file holds what the guest read");
    // The record agrees with the files after a restart's recovery.
    let r = sxm_smapiv1::recover::recover(&sr.ctx.sr, &sr.ctx.dir).expect("recover");
    assert_eq!(r, sxm_smapiv1::recover::Recovery::default(), "recovery found something to mend");
}

#[test]
fn compose_onto_a_copied_parent_while_the_leaf_is_active() {
    require!("qemu-io");
    let sr = TestSr::new();
    // The destination of a migration: parent receives the copy, leaf the mirrored writes.
    let parent = sr.create("parent", 8 * MIB);
    let pi = sr.backend.vdi_attach(&sr.ctx, &parent.vdi, true).expect("attach parent");
    sr.backend.vdi_activate(&sr.ctx, &parent.vdi).expect("activate parent");
    qemu_io(&nbd_uri(&pi), "write -P 0x11 0 8M").expect("the copy");
    sr.backend.vdi_deactivate(&sr.ctx, &parent.vdi).expect("deactivate parent");
    sr.backend.vdi_detach(&sr.ctx, &parent.vdi).expect("detach parent");

    let leaf = sr.create("leaf", 8 * MIB);
    let dummy = sr.backend.vdi_snapshot(&sr.ctx, &leaf).expect("dummy");
    let li = sr.backend.vdi_attach(&sr.ctx, &leaf.vdi, true).expect("attach leaf");
    sr.backend.vdi_activate(&sr.ctx, &leaf.vdi).expect("activate leaf");
    let uri = nbd_uri(&li);
    qemu_io(&uri, "write -P 0x22 1M 4k").expect("a mirrored write");
    // Sector-aligned, not block-aligned. (A write of part of a sector would have the rest of
    // its sector completed from what the leaf read through before compose, its empty base.)
    qemu_io(&uri, "write -P 0x23 4608 1536").expect("a small mirrored write");
    sr.backend.vdi_compose(&sr.ctx, &parent.vdi, &leaf.vdi).expect("compose while active");
    // The leaf now reads as the parent with its own writes on top, and keeps taking writes.
    qemu_io(&uri, "read -P 0x22 1M 4k").expect("the leaf's write");
    qemu_io(&uri, "read -P 0x23 4608 1536").expect("the leaf's small write");
    qemu_io(&uri, "read -P 0x11 0 4608").expect("the parent around it");
    qemu_io(&uri, "read -P 0x11 6144 1042432").expect("the parent around it");
    qemu_io(&uri, "read -P 0x11 2M 6M").expect("the parent elsewhere");
    qemu_io(&uri, "write -P 0x33 7M 512").expect("writes after compose");
    sr.backend.vdi_deactivate(&sr.ctx, &leaf.vdi).expect("deactivate");
    sr.backend.vdi_detach(&sr.ctx, &leaf.vdi).expect("detach");
    sr.backend.vdi_destroy(&sr.ctx, &dummy.vdi).expect("destroy the dummy");
    let mut expect = vec![0x11u8; 8 << 20];
    expect[1 << 20..(1 << 20) + 4096].fill(0x22);
    expect[4608..6144].fill(0x23);
    expect[7 << 20..(7 << 20) + 512].fill(0x33);
    assert!(sr.read_all(&leaf.vdi) == expect);
    assert_eq!(sr.scan_ids(), vec![leaf.vdi.clone()]);
    let mut files = vec![leaf.vdi.clone(), parent.vdi.clone()];
    files.sort();
    assert_eq!(sr.files(), files, "the leaf's old base went with the dummy");
    vhd_check(&sr.vhd(&leaf.vdi)).expect("sound chain");
}

#[test]
fn clone_of_an_active_vdi_and_snapshot_of_an_attached_one() {
    require!("qemu-io");
    let sr = TestSr::new();
    let v = sr.create("v", 4 * MIB);
    let info = sr.backend.vdi_attach(&sr.ctx, &v.vdi, true).expect("attach");
    sr.backend.vdi_activate(&sr.ctx, &v.vdi).expect("activate");
    let uri = nbd_uri(&info);
    qemu_io(&uri, "write -P 0x44 0 64k").expect("write");
    let c = sr.backend.vdi_clone(&sr.ctx, &v).expect("clone while active");
    qemu_io(&uri, "write -P 0x45 0 4k").expect("write after clone");
    sr.backend.vdi_deactivate(&sr.ctx, &v.vdi).expect("deactivate");
    // Attached, paused: a snapshot needs no pause of its own, and activate opens the new leaf.
    let s = sr.backend.vdi_snapshot(&sr.ctx, &v).expect("snapshot while attached");
    sr.backend.vdi_activate(&sr.ctx, &v.vdi).expect("activate again");
    qemu_io(&uri, "write -P 0x46 4k 4k").expect("write after the second snapshot");
    qemu_io(&uri, "read -P 0x45 0 4k").expect("read");
    sr.backend.vdi_deactivate(&sr.ctx, &v.vdi).expect("deactivate");
    sr.backend.vdi_detach(&sr.ctx, &v.vdi).expect("detach");
    let mut at_clone = vec![0u8; 4 << 20];
    at_clone[..64 << 10].fill(0x44);
    assert!(sr.read_all(&c.vdi) == at_clone);
    let mut at_snap = at_clone.clone();
    at_snap[..4096].fill(0x45);
    assert!(sr.read_all(&s.vdi) == at_snap);
    let mut now = at_snap.clone();
    now[4096..8192].fill(0x46);
    assert!(sr.read_all(&v.vdi) == now);
}

/// A VDI attached read-write and not yet activated (xapi attaches a VM's disks before it
/// starts the VM) holds no lock on its file: it can be snapshotted, cloned and, once a
/// snapshot goes, coalesced at once, and activate then serves the new leaf.
#[test]
fn snapshot_clone_and_coalesce_of_a_vdi_attached_but_never_activated() {
    require!("qemu-io");
    let sr = TestSr::new();
    let v = sr.create("v", 4 * MIB);
    let w = sr.backend.vdi_attach(&sr.ctx, &v.vdi, true).expect("attach writer");
    sr.backend.vdi_activate(&sr.ctx, &v.vdi).expect("activate writer");
    qemu_io(&nbd_uri(&w), "write -P 0x31 0 64k").expect("write");
    sr.backend.vdi_deactivate(&sr.ctx, &v.vdi).expect("deactivate");
    sr.backend.vdi_detach(&sr.ctx, &v.vdi).expect("detach");

    let info = sr.backend.vdi_attach(&sr.ctx, &v.vdi, true).expect("attach, not activated");
    let started = Instant::now();
    let s = sr.backend.vdi_snapshot(&sr.ctx, &v).expect("snapshot of an attached, never activated VDI");
    let c = sr.backend.vdi_clone(&sr.ctx, &v).expect("clone of it");
    // The hidden base under `s` and `v` has `v` for its lone VDI child once `s` (and the clone's
    // base under the clone and `v`) goes: the coalesce runs with the datapath still inactive.
    sr.backend.vdi_destroy(&sr.ctx, &c.vdi).expect("destroy the clone");
    sr.backend.vdi_destroy(&sr.ctx, &s.vdi).expect("destroy the snapshot");
    let chain = vhd::info(&sr.vhd(&v.vdi)).expect("info").chain;
    assert_eq!(chain.len(), 1, "the snapshot's and the clone's bases were folded back into the VDI: {chain:?}");
    assert!(started.elapsed() < Duration::from_secs(30), "no call waited out a lock");

    sr.backend.vdi_activate(&sr.ctx, &v.vdi).expect("activate on the new leaf");
    let uri = nbd_uri(&info);
    qemu_io(&uri, "read -P 0x31 0 64k").expect("the data written before");
    qemu_io(&uri, "write -P 0x32 64k 4k").expect("write after activate");
    sr.backend.vdi_deactivate(&sr.ctx, &v.vdi).expect("deactivate");
    sr.backend.vdi_detach(&sr.ctx, &v.vdi).expect("detach");
    let mut now = vec![0u8; 4 << 20];
    now[..64 << 10].fill(0x31);
    now[64 << 10..(64 << 10) + 4096].fill(0x32);
    assert!(sr.read_all(&v.vdi) == now);
    vhd_check(&sr.vhd(&v.vdi)).expect("sound chain");
}

#[test]
fn a_restarted_daemon_readopts_running_datapaths_and_reaps_the_rest() {
    require!("qemu-io");
    let mut sr = TestSr::new();
    let v = sr.create("active", 4 * MIB);
    let w = sr.create("attached", 4 * MIB);
    let vi = sr.backend.vdi_attach(&sr.ctx, &v.vdi, true).expect("attach v");
    sr.backend.vdi_activate(&sr.ctx, &v.vdi).expect("activate v");
    let wi = sr.backend.vdi_attach(&sr.ctx, &w.vdi, false).expect("attach w");
    qemu_io(&nbd_uri(&vi), "write -P 0x77 0 64k").expect("write");
    let (vpid, wpid) = (pid_in(&dp_dir(&vi)), pid_in(&dp_dir(&wi)));
    // A folder of an earlier life that no VDI owns any more, and a stray file.
    let leftover = sr.ctx.run_dir.join("deadbeef");
    std::fs::create_dir(&leftover).expect("leftover folder");
    std::fs::write(leftover.join("serve.pid"), br#"{"pid": 1, "start_time": 1}"#).expect("a pid file naming init");
    std::fs::write(sr.ctx.run_dir.join("stray"), b"x").expect("stray file");

    // The daemon restarts: its backend goes, the processes stay.
    sr.restart();
    assert!(alive(vpid) && alive(wpid));
    let list = [
        AttachedVdi { vdi: v.vdi.clone(), read_write: true, active: true },
        AttachedVdi { vdi: w.vdi.clone(), read_write: false, active: false },
    ];
    sr.backend.sr_attach(&sr.ctx, &list).expect("attach with the datapaths");
    assert_eq!(pid_in(&dp_dir(&vi)), vpid, "re-adopted, not restarted");
    assert_eq!(pid_in(&dp_dir(&wi)), wpid, "re-adopted, not restarted");
    assert!(alive(1), "a pid file naming another process is never acted on");
    assert_eq!(dp_dirs(&sr).len(), 2, "the leftover folder and the stray file are gone");
    assert_eq!(sr.backend.vdi_attach_info(&sr.ctx, &v.vdi).expect("attach_info"), vi);
    assert_eq!(sr.backend.vdi_attach_info(&sr.ctx, &w.vdi).expect("attach_info"), wi);
    qemu_io(&nbd_uri(&vi), "read -P 0x77 0 64k").expect("still serving what was written");
    qemu_io(&nbd_uri(&vi), "write -P 0x78 64k 64k").expect("and still taking writes");
    assert_eq!(stats(&wi)["paused"], true, "the attached-only datapath stays paused");
    assert!(in_use(&sr.backend.vdi_destroy(&sr.ctx, &v.vdi).expect_err("a re-adopted VDI is in use")));

    // One died meanwhile: the next attach starts it again.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(wpid), nix::sys::signal::Signal::SIGKILL).expect("kill");
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive(wpid) {
        assert!(Instant::now() < deadline, "SIGKILL did not take");
        std::thread::sleep(Duration::from_millis(10));
    }
    sr.restart();
    sr.backend.sr_attach(&sr.ctx, &list).expect("attach again");
    let wpid2 = pid_in(&dp_dir(&wi));
    assert_ne!(wpid2, wpid);
    assert!(alive(wpid2));
    assert_eq!(pid_in(&dp_dir(&vi)), vpid);
    assert_eq!(stats(&wi)["paused"], true);
    qemu_io(&nbd_uri(&vi), "read -P 0x78 64k 64k").expect("still serving");

    // Nothing attached any more in the engine's records: everything is reaped.
    sr.restart();
    sr.backend.sr_attach(&sr.ctx, &[]).expect("attach with no datapaths");
    assert!(!alive(vpid) && !alive(wpid2));
    assert!(dp_dirs(&sr).is_empty());
    let mut expect = vec![0u8; 4 << 20];
    expect[..64 << 10].fill(0x77);
    expect[64 << 10..128 << 10].fill(0x78);
    assert!(sr.read_all(&v.vdi) == expect, "the data outlives its datapath");
    sr.backend.vdi_destroy(&sr.ctx, &v.vdi).expect("destroy once reaped");
}

#[test]
fn a_dead_datapath_refuses_snapshots_and_still_detaches() {
    let sr = TestSr::new();
    let v = sr.create("v", 4 * MIB);
    let info = sr.backend.vdi_attach(&sr.ctx, &v.vdi, true).expect("attach");
    sr.backend.vdi_activate(&sr.ctx, &v.vdi).expect("activate");
    let pid = pid_in(&dp_dir(&info));
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL).expect("kill");
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive(pid) {
        assert!(Instant::now() < deadline, "SIGKILL did not take");
        std::thread::sleep(Duration::from_millis(10));
    }
    let files = sr.files();
    let e = sr.backend.vdi_snapshot(&sr.ctx, &v).expect_err("snapshot with a dead datapath");
    assert!(matches!(&e, StorageError::BackendError(c, p) if c == "SR_BACKEND_FAILURE" && p[0] == "datapath" && p[1].contains(&v.vdi)), "{e:?}");
    assert_eq!(sr.files(), files, "nothing changed");
    assert_eq!(sr.scan_ids(), vec![v.vdi.clone()]);
    sr.backend.vdi_detach(&sr.ctx, &v.vdi).expect("detach a dead datapath");
    assert!(dp_dirs(&sr).is_empty());
    sr.backend.vdi_destroy(&sr.ctx, &v.vdi).expect("destroy");
}

/// A rolling series of backups, keeping the last three snapshots: each cycle takes a snapshot
/// and destroys the oldest, under an attached VDI being written. Each destroy leaves the oldest
/// base with one hidden child, which is coalesced into it (SM's GC), so the VDI's chain stays
/// as long as the series, never growing towards the chain limit; every snapshot still reads
/// what it held, and the VDI what was written.
#[test]
fn a_rolling_series_of_snapshots_keeps_the_chain_short() {
    require!("qemu-io");
    let sr = TestSr::new();
    let v = sr.create("v", 4 * MIB);
    let info = sr.backend.vdi_attach(&sr.ctx, &v.vdi, true).expect("attach");
    sr.backend.vdi_activate(&sr.ctx, &v.vdi).expect("activate");
    let uri = nbd_uri(&info);
    let mut kept: std::collections::VecDeque<(String, Vec<u8>)> = Default::default();
    let depth = |sr: &TestSr| tapmirror::image::vhd::info(&sr.vhd(&v.vdi)).expect("info").chain.len();
    for cycle in 0..8u64 {
        qemu_io(&uri, &format!("write -P {} {} 64k", cycle + 1, cycle * 65536)).expect("write");
        let s = sr.backend.vdi_snapshot(&sr.ctx, &v).expect("snapshot");
        let held = sr.read_all(&s.vdi);
        kept.push_back((s.vdi, held));
        if kept.len() > 3 {
            let (oldest, _) = kept.pop_front().expect("oldest");
            sr.backend.vdi_destroy(&sr.ctx, &oldest).expect("destroy the oldest");
        }
        assert!(depth(&sr) <= 5, "cycle {cycle}: the VDI's chain is {} long", depth(&sr));
    }
    for (s, held) in &kept {
        assert!(sr.read_all(s) == *held, "snapshot {s} changed");
        vhd_check(&sr.vhd(s)).expect("sound chain");
    }
    qemu_io(&uri, "read -P 8 458752 64k").expect("the last write reads back");
    sr.backend.vdi_deactivate(&sr.ctx, &v.vdi).expect("deactivate");
    sr.backend.vdi_detach(&sr.ctx, &v.vdi).expect("detach");
    let mut want = vec![0u8; 4 << 20];
    for cycle in 0..8usize {
        want[cycle * 65536..(cycle + 1) * 65536].fill(cycle as u8 + 1);
    }
    assert!(sr.read_all(&v.vdi) == want, "the VDI lost a write");
    assert_eq!(sxm_smapiv1::recover::recover(&sr.ctx.sr, &sr.ctx.dir).expect("recover"), Default::default());
}
