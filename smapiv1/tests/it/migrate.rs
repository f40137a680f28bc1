//! A migration's data path between two ext SRs (two backends, the source and the destination
//! "hosts"), with real datapaths and a guest writing unaligned 512-byte runs: what the engine's
//! stages do, minus the RPC and the HTTP upgrade (a socketpair stands for the upgraded
//! connection).

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sxm_engine::backend::{CopyControl, Backend, MirrorHealth, MirrorMode};
use sxm_engine::model::{AttachInfo, StorageError, VdiInfo};
use tapmirror::nbd::{NbdClient, NbdUri};
use tapmirror::testkit::{Guest, assert_matches_guest};
use tokio_util::sync::CancellationToken;

use std::process::Command;

use crate::harness::{TestSr, nbd_uri, pattern, run};
use crate::require;

const MIB: u64 = 1 << 20;

/// The control socket of the datapath serving `info`.
fn control(info: &AttachInfo) -> std::path::PathBuf {
    let uri = nbd_uri(info);
    let socket = uri.split_once("?socket=").expect("socket").1;
    std::path::Path::new(socket).parent().expect("datapath folder").join("control.sock")
}

fn stats(info: &AttachInfo) -> serde_json::Value {
    tapmirror::control::request(&control(info), &serde_json::json!({"cmd": "stats"}), None).expect("stats")
}

/// A connected pair standing for the HTTP connection once upgraded to NBD: (source end,
/// destination end).
fn pair() -> (OwnedFd, OwnedFd) {
    let (a, b) = UnixStream::pair().expect("socketpair");
    (OwnedFd::from(a), OwnedFd::from(b))
}

fn attach_active(sr: &TestSr, vdi: &str) -> AttachInfo {
    let info = sr.backend.vdi_attach(&sr.ctx, vdi, true).expect("VDI.attach");
    sr.backend.vdi_activate(&sr.ctx, vdi).expect("VDI.activate");
    info
}

fn deactivate_detach(sr: &TestSr, vdi: &str) {
    sr.backend.vdi_deactivate(&sr.ctx, vdi).expect("VDI.deactivate");
    sr.backend.vdi_detach(&sr.ctx, vdi).expect("VDI.detach");
}

fn snapshot(sr: &TestSr, vdi: &str, name: &str) -> VdiInfo {
    sr.backend.vdi_snapshot(&sr.ctx, &VdiInfo::new(vdi, name)).expect("VDI.snapshot")
}

/// Writes `(offset, bytes)` pieces through an attached VDI's export, and flushes.
fn write_through(info: &AttachInfo, pieces: &[(u64, Vec<u8>)]) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let c = NbdClient::connect(&NbdUri::parse(&nbd_uri(info)).expect("uri")).await.expect("connect");
        for (offset, data) in pieces {
            c.write(*offset, data.clone(), false).await.expect("write");
        }
        c.flush().await.expect("flush");
        let _ = c.disconnect().await;
    });
}

/// Reads a range through an attached VDI's export.
fn read_through(info: &AttachInfo, offset: u64, len: usize) -> Vec<u8> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let c = NbdClient::connect(&NbdUri::parse(&nbd_uri(info)).expect("uri")).await.expect("connect");
        let data = c.read(offset, len).await.expect("read");
        let _ = c.disconnect().await;
        data
    })
}

/// Zeroes a range through an attached VDI's export.
fn zero_through(info: &AttachInfo, offset: u64, len: u32) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let c = NbdClient::connect(&NbdUri::parse(&nbd_uri(info)).expect("uri")).await.expect("connect");
        c.write_zeroes(offset, len, false, false).await.expect("write zeroes");
        c.flush().await.expect("flush");
        let _ = c.disconnect().await;
    });
}

/// Copies `vdi` of `src` into the destination VDI `into` of `dst` (attached and activated for
/// the copy, detached after), as the engine's copy stage does. Answers the stats and the
/// progress reports.
fn copy(src: &TestSr, vdi: &str, base: Option<&str>, dst: &TestSr, into: &str) -> (sxm_engine::backend::CopyStats, Vec<(u64, u64)>) {
    attach_active(dst, into);
    let (ours, theirs) = pair();
    dst.backend.vdi_serve_nbd(&dst.ctx, into, theirs).expect("serve the copy's connection");
    let reports = Mutex::new(Vec::new());
    let progress = |done: u64, total: u64| reports.lock().expect("reports").push((done, total));
    let stats = src
        .backend
        .vdi_copy_into(&src.ctx, vdi, base, ours, into, &CopyControl { progress: &progress, cancel: &CancellationToken::new(), throttle: None })
        .expect("copy");
    deactivate_detach(dst, into);
    (stats, reports.into_inner().expect("reports"))
}

/// The whole SMAPIv1 migration minus the RPC: the destination prepares a leaf (with its dummy
/// snapshot) and a parent; the source mirrors the live VDI into the leaf, snapshots it while
/// the guest writes, copies the snapshot into the parent; the guest stops, the source drains,
/// and the destination composes the leaf onto the parent. The destination VDI then reads
/// exactly what the guest wrote, over what the disk held before. A last write not aligned to
/// sectors (qemu-io's, which completes the sectors from the source's own bytes, as the export's
/// 512-byte minimum block size asks) reaches the destination whole.
#[test]
fn live_migration_ends_with_the_guests_disk() {
    require!("qemu-io");
    const SIZE: u64 = 64 * MIB;
    let src = TestSr::new();
    let dst = TestSr::new();

    // The source VDI, with data, attached and active.
    let v = src.create("disk", SIZE as i64).vdi;
    let v_info = attach_active(&src, &v);
    write_through(&v_info, &[(0, pattern(8 * MIB as usize, 1)), (40 * MIB, pattern(3 * MIB as usize, 2))]);
    let before = src.read_all(&v);

    // Prepare on the destination: a leaf for the mirrored writes, its dummy snapshot (so the
    // leaf is a differencing disk), and a parent for the copy.
    let leaf = dst.create("leaf", SIZE as i64).vdi;
    let dummy = snapshot(&dst, &leaf, "dummy").vdi;
    let parent = dst.create("parent", SIZE as i64).vdi;
    let leaf_info = attach_active(&dst, &leaf);

    let guest = Guest::start(nbd_uri(&v_info), SIZE, 7);
    std::thread::sleep(Duration::from_millis(100));

    // Pass fds: the destination serves the leaf on its end, the source mirrors onto the other.
    let (ours, theirs) = pair();
    dst.backend.vdi_serve_nbd(&dst.ctx, &leaf, theirs).expect("serve the mirror's connection");
    src.backend.vdi_mirror_attach(&src.ctx, &v, ours, &leaf, MirrorMode::Sync, 0).expect("mirror attach");
    assert_eq!(src.backend.vdi_mirror_status(&src.ctx, &v).expect("status").state, MirrorHealth::Ready);
    std::thread::sleep(Duration::from_millis(100));

    // Snapshot under the mirror: the datapath pauses, switches to the new leaf, and keeps
    // mirroring.
    let snap = snapshot(&src, &v, "migration base").vdi;
    let status = src.backend.vdi_mirror_status(&src.ctx, &v).expect("status");
    assert_eq!(status.state, MirrorHealth::Ready, "the mirror survives the snapshot");
    let mirrored_at_snapshot = status.bytes_mirrored;
    assert!(mirrored_at_snapshot > 0, "{status:?}");

    // Copy the snapshot into the destination's parent while the guest keeps writing.
    let (copied, reports) = copy(&src, &snap, None, &dst, &parent);
    assert_eq!(copied.size, SIZE);
    assert!(copied.data_bytes >= 11 * MIB, "the data before the guest started travels: {copied:?}");
    assert!(copied.data_bytes < SIZE, "holes do not travel: {copied:?}");
    assert_eq!(reports.last(), Some(&(SIZE, SIZE)), "progress ends at the size");
    assert!(reports.windows(2).all(|w| w[0].0 <= w[1].0 && w[0].1 == SIZE), "progress only grows: {reports:?}");
    std::thread::sleep(Duration::from_millis(100));

    let (mut model, writes) = guest.stop();
    assert!(writes > 50, "the guest wrote only {writes} times");

    // An unaligned write under the mirror: bytes 1000..4000, inside sectors 1 to 7.
    let mut head = read_through(&v_info, 0, 4096);
    run(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0x5e 1000 3000", &nbd_uri(&v_info)]));
    head[1000..4000].fill(0x5e);
    let mut before = before;
    before[..4096].copy_from_slice(&head);
    model[..8].fill(0);

    src.backend.vdi_drain(&src.ctx, &v, Duration::from_secs(10)).expect("drain");
    let status = src.backend.vdi_mirror_status(&src.ctx, &v).expect("status");
    assert_eq!(status.state, MirrorHealth::Ready, "{status:?}");
    assert!(status.bytes_mirrored > mirrored_at_snapshot, "writes after the snapshot were mirrored: {status:?}");
    assert_eq!(stats(&v_info)["errors"], 0, "the guest saw errors");

    // Finalize: the source stops mirroring and lets go; the destination composes.
    src.backend.vdi_mirror_detach(&src.ctx, &v).expect("mirror detach");
    assert_eq!(src.backend.vdi_mirror_status(&src.ctx, &v).expect("status").state, MirrorHealth::None);
    deactivate_detach(&src, &v);
    drop(leaf_info);
    deactivate_detach(&dst, &leaf);
    dst.backend.vdi_compose(&dst.ctx, &parent, &leaf).expect("VDI.compose");
    dst.backend.vdi_destroy(&dst.ctx, &dummy).expect("destroy the dummy");

    let source = src.read_all(&v);
    assert_matches_guest(&source, &model, &before, "source");
    let dest = dst.read_all(&leaf);
    assert_matches_guest(&dest, &model, &before, "destination");
    assert!(dest == source, "the destination differs from the source");
}

/// With a base the destination already holds, only what differs travels: the data written
/// after the base was taken, and zeroes where the VDI is zero but the base is not. The
/// destination then equals the VDI byte for byte.
#[test]
fn copy_with_a_base_sends_only_what_differs() {
    const SIZE: u64 = 16 * MIB;
    let src = TestSr::new();
    let dst = TestSr::new();
    let a = src.create("disk", SIZE as i64).vdi;
    let a_info = attach_active(&src, &a);
    write_through(&a_info, &[(0, pattern(4 * MIB as usize, 3)), (8 * MIB, pattern(MIB as usize, 4))]);
    let base = snapshot(&src, &a, "base").vdi;
    // What differs: new data in a hole, three sectors inside old data, and zeroes over old
    // data (which a copy that skipped zero runs would leave as the base had them).
    write_through(&a_info, &[(12 * MIB, pattern(512 << 10, 5)), (MIB, pattern(1536, 6))]);
    zero_through(&a_info, 2 * MIB, 64 << 10);
    let snap = snapshot(&src, &a, "now").vdi;
    deactivate_detach(&src, &a);

    // The destination holds the base (as a clone of a similar VDI would), then takes the
    // difference.
    let p = dst.create("parent", SIZE as i64).vdi;
    let (full, _) = copy(&src, &base, None, &dst, &p);
    assert_eq!((full.data_bytes, full.zero_bytes), (5 * MIB, 0), "the full copy: {full:?}");
    assert!(dst.read_all(&p) == src.read_all(&base), "the destination holds the base");
    let (diff, reports) = copy(&src, &snap, Some(&base), &dst, &p);
    assert_eq!(diff.data_bytes, (512 << 10) + 1536, "only the new data travels: {diff:?}");
    assert_eq!(diff.zero_bytes, 64 << 10, "zeroes over the base's data are written: {diff:?}");
    assert_eq!(reports.last(), Some(&(SIZE, SIZE)));
    let want = src.read_all(&snap);
    assert!(want[2 * MIB as usize..][..64 << 10].iter().all(|&b| b == 0), "the test's zeroes are in the snapshot");
    assert!(dst.read_all(&p) == want, "the destination differs from the VDI after the copy of the difference");
}

/// The mirror's target goes away mid-run (its datapath detached, which closes the connection):
/// the guest carries on without an error, and the mirror's status says Failed.
#[test]
fn a_mirror_target_that_goes_away_fails_the_mirror_not_the_guest() {
    const SIZE: u64 = 16 * MIB;
    let src = TestSr::new();
    let dst = TestSr::new();
    let v = src.create("disk", SIZE as i64).vdi;
    let v_info = attach_active(&src, &v);
    let leaf = dst.create("leaf", SIZE as i64).vdi;
    attach_active(&dst, &leaf);
    let guest = Guest::start(nbd_uri(&v_info), SIZE, 9);
    let (ours, theirs) = pair();
    dst.backend.vdi_serve_nbd(&dst.ctx, &leaf, theirs).expect("serve");
    src.backend.vdi_mirror_attach(&src.ctx, &v, ours, &leaf, MirrorMode::Sync, 0).expect("mirror attach");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(src.backend.vdi_mirror_status(&src.ctx, &v).expect("status").state, MirrorHealth::Ready);

    deactivate_detach(&dst, &leaf);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let status = src.backend.vdi_mirror_status(&src.ctx, &v).expect("status");
        if status.state == MirrorHealth::Failed {
            break;
        }
        assert_eq!(status.state, MirrorHealth::Ready, "{status:?}");
        assert!(Instant::now() < deadline, "the mirror never noticed its target went away");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(100));
    // The guest panics on a failed write: stopping it cleanly says it saw none.
    let (model, writes) = guest.stop();
    assert!(writes > 10, "the guest wrote only {writes} times");
    let s = stats(&v_info);
    assert_eq!(s["errors"], 0, "the guest saw errors: {s}");
    assert!(s["mirror"]["failure"].as_str().is_some_and(|f| !f.is_empty()), "{s}");
    src.backend.vdi_drain(&src.ctx, &v, Duration::from_secs(10)).expect("drain");
    // Detaching a failed mirror is not an error (there is nothing left to stop).
    src.backend.vdi_mirror_detach(&src.ctx, &v).expect("mirror detach after a failure");
    deactivate_detach(&src, &v);
    assert_matches_guest(&src.read_all(&v), &model, &vec![0u8; SIZE as usize], "source");
}

/// A copy whose destination stops answering (its datapath attached but not activated, so
/// requests wait) returns Cancelled promptly when cancelled; the destination can be detached
/// at once afterwards. A copy cancelled before it starts sends nothing.
#[test]
fn a_cancelled_copy_returns_promptly() {
    const SIZE: u64 = 16 * MIB;
    let src = TestSr::new();
    let dst = TestSr::new();
    let v = src.create("disk", SIZE as i64).vdi;
    let v_info = attach_active(&src, &v);
    write_through(&v_info, &[(0, pattern(8 * MIB as usize, 11))]);
    deactivate_detach(&src, &v);
    let p = dst.create("parent", SIZE as i64).vdi;
    let p_info = dst.backend.vdi_attach(&dst.ctx, &p, true).expect("attach, not activated");

    let cancel = CancellationToken::new();
    let (ours, theirs) = pair();
    dst.backend.vdi_serve_nbd(&dst.ctx, &p, theirs).expect("serve");
    let canceller = {
        let cancel = cancel.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(500));
            cancel.cancel();
            Instant::now()
        })
    };
    let reports = Mutex::new(Vec::new());
    let progress = |done: u64, total: u64| reports.lock().expect("reports").push((done, total));
    let r = src.backend.vdi_copy_into(&src.ctx, &v, None, ours, &p, &CopyControl { progress: &progress, cancel: &cancel, throttle: None });
    let returned = Instant::now();
    let cancelled_at = canceller.join().expect("canceller");
    assert!(matches!(r, Err(StorageError::Cancelled(_))), "{r:?}");
    assert!(returned.duration_since(cancelled_at) < Duration::from_secs(2), "took {:?} to return", returned.duration_since(cancelled_at));
    let reports = reports.into_inner().expect("reports");
    assert!(reports.iter().all(|&(done, total)| total == SIZE && done < SIZE), "the copy cannot have finished: {reports:?}");
    assert_eq!(stats(&p_info)["bytes_written"], 0, "the paused destination took no write");
    let started = Instant::now();
    dst.backend.vdi_detach(&dst.ctx, &p).expect("detach the destination");
    assert!(started.elapsed() < Duration::from_secs(10), "detaching the destination took {:?}", started.elapsed());
    assert!(dst.read_all(&p).iter().all(|&b| b == 0), "a cancelled copy left data");

    // Cancelled before it starts: nothing is read or sent, the connection is let go.
    let (ours, theirs) = pair();
    let r = src.backend.vdi_copy_into(&src.ctx, &v, None, ours, &p, &CopyControl { progress: &|_, _| {}, cancel: &cancel, throttle: None });
    assert!(matches!(r, Err(StorageError::Cancelled(_))), "{r:?}");
    drop(theirs);
}

/// The data-path calls on a VDI that is not attached, or that does not exist, are clear
/// errors; a bad descriptor for the NBD import is refused and the datapath goes on.
#[test]
fn migration_calls_refuse_bad_input() {
    let sr = TestSr::new();
    let v = sr.create("disk", (4 * MIB) as i64).vdi;
    let not_attached = |e: StorageError| matches!(&e, StorageError::BackendError(c, p) if c == "SR_BACKEND_FAILURE" && p[1].contains("not attached"));
    let (ours, theirs) = pair();
    assert!(not_attached(sr.backend.vdi_serve_nbd(&sr.ctx, &v, theirs).expect_err("serve on a detached VDI")));
    assert!(not_attached(sr.backend.vdi_mirror_attach(&sr.ctx, &v, ours, &v, MirrorMode::Sync, 0).expect_err("mirror a detached VDI")));
    assert!(not_attached(sr.backend.vdi_mirror_status(&sr.ctx, &v).expect_err("status of a detached VDI")));
    assert!(not_attached(sr.backend.vdi_drain(&sr.ctx, &v, Duration::from_secs(1)).expect_err("drain a detached VDI")));
    let missing = "00000000-0000-4000-8000-000000000000";
    let (_, theirs) = pair();
    assert_eq!(sr.backend.vdi_serve_nbd(&sr.ctx, missing, theirs), Err(StorageError::VdiDoesNotExist(missing.into())));
    let (ours, _) = pair();
    let r = sr.backend.vdi_copy_into(&sr.ctx, &v, Some(missing), ours, "x", &CopyControl { progress: &|_, _| {}, cancel: &CancellationToken::new(), throttle: None });
    assert_eq!(r, Err(StorageError::VdiDoesNotExist(missing.into())));

    // A file is no connection: refused by the datapath, which keeps serving.
    let info = attach_active(&sr, &v);
    let file = OwnedFd::from(tempfile::tempfile().expect("tempfile"));
    let e = sr.backend.vdi_serve_nbd(&sr.ctx, &v, file).expect_err("a file is not a connection");
    assert!(matches!(&e, StorageError::BackendError(_, p) if p[1].contains("not a socket")), "{e:?}");
    assert_eq!(stats(&info)["connections"], 0);
    // No mirror to detach is not an error; a status says None.
    sr.backend.vdi_mirror_detach(&sr.ctx, &v).expect("detach without a mirror");
    assert_eq!(sr.backend.vdi_mirror_status(&sr.ctx, &v).expect("status").state, MirrorHealth::None);
    write_through(&info, &[(0, pattern(4096, 1))]);
    deactivate_detach(&sr, &v);
}

/// A host's busy rate for full mirrors (`sxm serve --mirror-busy-rate`) reaches the VDI's
/// datapath: its mirror keeps to it while the guest writes, as `stats` on the datapath's own
/// control socket says; by default the datapath keeps tapmirror's own.
#[test]
fn a_full_mirror_keeps_to_the_hosts_busy_rate() {
    const SIZE: u64 = 32 * MIB;
    for (busy, want) in [(Some(MIB), MIB), (None, tapmirror::mirror::DEFAULT_BUSY_RATE)] {
        let mut src = TestSr::new();
        src.backend = sxm_smapiv1::ExtBackend::new(crate::harness::tapmirror()).with_mirror_busy_rate(busy);
        let dst = TestSr::new();
        let v = src.create("disk", SIZE as i64).vdi;
        let v_info = attach_active(&src, &v);
        write_through(&v_info, &[(0, pattern(8 * MIB as usize, 31))]);
        let d = dst.create("copy", SIZE as i64).vdi;
        attach_active(&dst, &d);
        let guest = Guest::start(nbd_uri(&v_info), SIZE, 37);
        guest.wait_for_more_writes(50);
        let (ours, theirs) = pair();
        dst.backend.vdi_serve_nbd(&dst.ctx, &d, theirs).expect("serve");
        src.backend.vdi_mirror_attach(&src.ctx, &v, ours, &d, MirrorMode::Full, 0).expect("full mirror");
        let control = find_file(src._tmp.path(), "control.sock").expect("the datapath's control socket");
        let stats = tapmirror::control::request(&control, &serde_json::json!({"cmd": "stats"}), None).expect("stats");
        assert_eq!(stats["mirror"]["progress"]["busy_rate"], want, "{stats}");
        guest.stop();
        src.backend.vdi_mirror_detach(&src.ctx, &v).expect("detach");
        deactivate_detach(&src, &v);
        deactivate_detach(&dst, &d);
    }
}

/// The first file named `name` under `dir`.
fn find_file(dir: &std::path::Path, name: &str) -> Option<std::path::PathBuf> {
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        if path.file_name().is_some_and(|n| n == name) {
            return Some(path);
        }
        if path.is_dir()
            && let Some(found) = find_file(&path, name)
        {
            return Some(found);
        }
    }
    None
}

/// A full mirror (no snapshot, no copy: tapmirror copies the chain in the background while
/// guest writes are mirrored) of a VDI with data into a plain destination VDI: Syncing until
/// Ready with nothing left, never Failed, and the destination then equals the source.
#[test]
fn a_full_mirror_of_a_vhd_chain_ends_identical() {
    const SIZE: u64 = 32 * MIB;
    let src = TestSr::new();
    let dst = TestSr::new();
    let v = src.create("disk", SIZE as i64).vdi;
    let v_info = attach_active(&src, &v);
    write_through(&v_info, &[(0, pattern(6 * MIB as usize, 21))]);
    // A chain, not one file: the data sits in a hidden parent under the leaf.
    let old = snapshot(&src, &v, "old").vdi;
    write_through(&v_info, &[(20 * MIB, pattern(2 * MIB as usize, 22))]);
    let before = src.read_all(&v);
    let d = dst.create("copy", SIZE as i64).vdi;
    attach_active(&dst, &d);
    let guest = Guest::start(nbd_uri(&v_info), SIZE, 13);
    let (ours, theirs) = pair();
    dst.backend.vdi_serve_nbd(&dst.ctx, &d, theirs).expect("serve");
    src.backend.vdi_mirror_attach(&src.ctx, &v, ours, &d, MirrorMode::Full, 0).expect("full mirror");
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut saw = Vec::new();
    loop {
        let status = src.backend.vdi_mirror_status(&src.ctx, &v).expect("status");
        saw.push(status.state);
        match status.state {
            MirrorHealth::Ready => {
                assert_eq!(status.bytes_left, 0, "{status:?}");
                break;
            }
            MirrorHealth::Syncing => {}
            other => panic!("the full mirror went {other:?}"),
        }
        assert!(Instant::now() < deadline, "the full mirror never became ready");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(100));
    let (model, writes) = guest.stop();
    assert!(writes > 10, "the guest wrote only {writes} times");
    src.backend.vdi_drain(&src.ctx, &v, Duration::from_secs(10)).expect("drain");
    assert_eq!(src.backend.vdi_mirror_status(&src.ctx, &v).expect("status").state, MirrorHealth::Ready);
    src.backend.vdi_mirror_detach(&src.ctx, &v).expect("detach");
    deactivate_detach(&src, &v);
    deactivate_detach(&dst, &d);
    let source = src.read_all(&v);
    assert_matches_guest(&source, &model, &before, "source");
    assert!(dst.read_all(&d) == source, "the destination differs from the source (states seen: {saw:?})");
    src.backend.vdi_destroy(&src.ctx, &old).expect("destroy the old snapshot");
}
