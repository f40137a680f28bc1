//! Unit tests of the qcow2 driver that need no QEMU (the QEMU-judged ones live in
//! `tests/it/qcow2.rs`).

use std::sync::Mutex;

use super::*;
use crate::image::{ExtentState, ZeroAlloc};
use crate::io::EngineChoice;

const K64: u64 = 64 << 10;

fn engines() -> Vec<EngineKind> {
    let mut v = vec![EngineKind::Portable];
    if let Ok(k) = EngineChoice::Uring.resolve() {
        v.push(k);
    }
    v
}

fn pat(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| seed.wrapping_add((i % 251) as u8) | 1).collect()
}

async fn put(img: &Qcow2Image, offset: u64, data: &[u8]) {
    img.write(offset, Arc::new(IoBuf::from_vec(data.to_vec())), Durability::Cached).await.expect("write");
}

async fn get(img: &Qcow2Image, offset: u64, len: usize) -> Vec<u8> {
    let (buf, r) = img.read(offset, IoBuf::new(len)).await;
    r.expect("read");
    buf.into_vec()
}

async fn map(img: &Qcow2Image) -> Vec<(u64, u64, ExtentState)> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < img.size() {
        for e in img.allocation(pos, img.size() - pos, usize::MAX).await.expect("map") {
            out.push((e.offset, e.length, e.state));
            pos = e.offset + e.length;
        }
    }
    out
}

#[tokio::test]
async fn writes_zeroes_and_trims_read_back_and_pass_our_check() {
    for engine in engines() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("disk.qcow2");
        create(&p, 4 << 20, None).await.expect("create");
        let img = Qcow2Image::open(&p, Access::ReadWrite, engine).await.expect("open");
        assert_eq!((img.size(), img.cluster_size()), (4 << 20, K64));
        let mut model = vec![0u8; 4 << 20];
        let data = pat(100 << 10, 3);
        put(&img, 10_000, &data).await;
        model[10_000..10_000 + data.len()].copy_from_slice(&data);
        let big = pat(300 << 10, 9);
        put(&img, 1 << 20, &big).await;
        model[1 << 20..(1 << 20) + big.len()].copy_from_slice(&big);
        assert_eq!(get(&img, 0, 4 << 20).await, model, "{engine:?}: after writes");

        // Zeroes: cluster 1 whole (a zero cluster), the head of cluster 2 partially.
        img.write_zeroes(K64, K64 + 100, ZeroAlloc::MayDeallocate, ZeroSpeed::FastOnly, Durability::Stable)
            .await
            .expect("zeroes");
        model[K64 as usize..(2 * K64 + 100) as usize].fill(0);
        // Trim: clusters 17..=19 whole, ragged ends left as they are.
        img.trim(17 * K64 - 100, 3 * K64 + 200).await.expect("trim");
        model[(17 * K64) as usize..(20 * K64) as usize].fill(0);
        assert_eq!(get(&img, 0, 4 << 20).await, model, "{engine:?}: after zeroes and trim");

        let m = map(&img).await;
        assert_eq!(m[0], (0, K64, ExtentState::Data), "{engine:?} {m:?}");
        // Cluster 2 was unallocated, so zeroing its head made all of it a zero cluster.
        assert_eq!(m[1], (K64, 2 * K64, ExtentState::Zero), "{engine:?} {m:?}");
        assert!(m.contains(&(17 * K64, 3 * K64, ExtentState::Zero)), "{engine:?} {m:?}");
        assert_eq!(m.last().map(|e| e.2), Some(ExtentState::Hole));
        assert_eq!(m.iter().map(|e| e.1).sum::<u64>(), 4 << 20);
        let first = img.allocation(0, 4 << 20, 1).await.expect("first");
        assert_eq!(first.len(), 1);
        img.close().await.expect("close");

        check(&p).await.expect("our check passes");
        let i = info(&p).await.expect("info");
        // Cluster 0, and 16..=20 (the 300 KiB write) minus the trimmed 17..=19.
        assert_eq!(i.allocated_bytes, 3 * K64, "{i:?}");
        assert_eq!((i.virtual_size, i.cluster_size, i.chain.clone()), (4 << 20, K64, vec![p.clone()]));
        let ro = Qcow2Image::open(&p, Access::ReadOnly, engine).await.expect("reopen");
        assert_eq!(get(&ro, 0, 4 << 20).await, model, "{engine:?}: after reopening");
        assert!(matches!(ro.write(0, Arc::new(IoBuf::new(512)), Durability::Cached).await, Err(ImageError::ReadOnly)));
    }
}

#[tokio::test]
async fn chain_allocation_reports_data_zero_and_hole_per_layer() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (base, top) = (dir.path().join("base.qcow2"), dir.path().join("top.qcow2"));
    create(&base, 1 << 20, None).await.expect("create base");
    {
        let b = Qcow2Image::open(&base, Access::ReadWrite, EngineKind::Portable).await.expect("open base");
        put(&b, 0, &pat(K64 as usize, 1)).await;
        put(&b, 3 * K64, &pat(K64 as usize, 2)).await;
        b.write_zeroes(2 * K64, K64, ZeroAlloc::Keep, ZeroSpeed::Any, Durability::Cached).await.expect("zero");
    }
    create_overlay(&top, &base).await.expect("overlay");
    let t = Qcow2Image::open(&top, Access::ReadWrite, EngineKind::Portable).await.expect("open top");
    assert_eq!(t.chain(), vec![top.clone(), base.clone()]);
    put(&t, 4 * K64, &pat(K64 as usize, 3)).await;
    t.write_zeroes(3 * K64, K64, ZeroAlloc::MayDeallocate, ZeroSpeed::Any, Durability::Cached).await.expect("zero");
    assert_eq!(
        map(&t).await,
        vec![
            (0, K64, ExtentState::Data),
            (K64, K64, ExtentState::Hole),
            (2 * K64, 2 * K64, ExtentState::Zero),
            (4 * K64, K64, ExtentState::Data),
            (5 * K64, (1 << 20) - 5 * K64, ExtentState::Hole),
        ]
    );
    let got = get(&t, 0, 5 * K64 as usize).await;
    assert_eq!(&got[..K64 as usize], &pat(K64 as usize, 1)[..], "base data shows through");
    assert!(got[K64 as usize..4 * K64 as usize].iter().all(|&b| b == 0));
    assert_eq!(&got[4 * K64 as usize..], &pat(K64 as usize, 3)[..]);
}

#[tokio::test]
async fn diff_map_names_what_the_layers_above_a_shared_base_decide() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (base, mid, top) = (dir.path().join("base.qcow2"), dir.path().join("mid.qcow2"), dir.path().join("top.qcow2"));
    create(&base, 1 << 20, None).await.expect("create base");
    {
        let b = Qcow2Image::open(&base, Access::ReadWrite, EngineKind::Portable).await.expect("open base");
        put(&b, 0, &pat(4 * K64 as usize, 1)).await;
    }
    create_overlay(&mid, &base).await.expect("mid");
    {
        let m = Qcow2Image::open(&mid, Access::ReadWrite, EngineKind::Portable).await.expect("open mid");
        put(&m, K64, &pat(K64 as usize, 2)).await;
    }
    create_overlay(&top, &mid).await.expect("top");
    {
        let t = Qcow2Image::open(&top, Access::ReadWrite, EngineKind::Portable).await.expect("open top");
        put(&t, 5 * K64, &pat(K64 as usize, 3)).await;
        // A zero cluster over the base's data is a difference too.
        t.write_zeroes(2 * K64, K64, ZeroAlloc::Keep, ZeroSpeed::Any, Durability::Cached).await.expect("zero");
    }
    let ranges = |v: Option<Vec<crate::image::Extent>>| v.expect("comparable").iter().map(|e| (e.offset, e.offset + e.length)).collect::<Vec<_>>();
    assert_eq!(ranges(diff_map(&top, &base).await.expect("diff")), vec![(K64, 3 * K64), (5 * K64, 6 * K64)]);
    assert_eq!(ranges(diff_map(&top, &mid).await.expect("diff")), vec![(2 * K64, 3 * K64), (5 * K64, 6 * K64)]);
    assert_eq!(ranges(diff_map(&top, &top).await.expect("diff")), Vec::<(u64, u64)>::new());
    // The other way round, the base lacks layers the "destination" holds: not comparable.
    assert!(diff_map(&base, &top).await.expect("diff").is_none());
}

#[tokio::test]
async fn a_raw_backing_reports_its_holes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (base, top) = (dir.path().join("base.raw"), dir.path().join("top.qcow2"));
    {
        let f = std::fs::File::create(&base).expect("raw");
        f.set_len(1 << 20).expect("size");
        use std::os::unix::fs::FileExt;
        f.write_all_at(&pat(K64 as usize, 5), 4 * K64).expect("data");
    }
    create_overlay_with(&top, &base, OverlayKind::FillingBacking).await.expect("overlay");
    let t = Qcow2Image::open(&top, Access::ReadWrite, EngineKind::Portable).await.expect("open");
    assert_eq!(t.cluster_size(), 512);
    put(&t, 0, &pat(512, 6)).await;
    let m = map(&t).await;
    assert_eq!(m[0], (0, 512, ExtentState::Data), "{m:?}");
    assert_eq!(m[1].2, ExtentState::Hole, "{m:?}");
    assert!(m.contains(&(4 * K64, K64, ExtentState::Data)), "{m:?}");
    let i = info(&top).await.expect("info");
    assert_eq!(i.backing_format.as_deref(), Some("raw"));
    assert_eq!(i.backing_file.as_deref(), Some("base.raw"), "same folder: recorded by file name");
}

/// The case: a 512-byte write into a cluster of an overlay whose backing is still being
/// filled, then the backing changes under that cluster, then the rest of the cluster is read.
#[tokio::test]
async fn sector_writes_on_a_filling_overlay_never_freeze_stale_backing_bytes() {
    for (kind, freezes) in [(OverlayKind::FillingBacking, false), (OverlayKind::Snapshot, true)] {
        let dir = tempfile::tempdir().expect("tempdir");
        let (base, top) = (dir.path().join("base.raw"), dir.path().join("top.qcow2"));
        let (old, new, guest) = (pat(K64 as usize, 10), pat(K64 as usize, 20), pat(512, 30));
        {
            let f = std::fs::File::create(&base).expect("raw");
            f.set_len(1 << 20).expect("size");
            use std::os::unix::fs::FileExt;
            f.write_all_at(&old, K64).expect("old backing bytes");
        }
        create_overlay_with(&top, &base, kind).await.expect("overlay");
        let t = Qcow2Image::open(&top, Access::ReadWrite, EngineKind::Portable).await.expect("open");
        put(&t, K64 + 512, &guest).await;
        {
            use std::os::unix::fs::FileExt;
            let f = std::fs::OpenOptions::new().write(true).open(&base).expect("open base");
            f.write_all_at(&new, K64).expect("the copy reaches the cluster");
        }
        let got = get(&t, K64, K64 as usize).await;
        assert_eq!(&got[512..1024], &guest[..], "{kind:?}: the guest's sector");
        let rest_is = |want: &[u8]| got[..512] == want[..512] && got[1024..] == want[1024..];
        if freezes {
            // What the mechanism prevents: 64 KiB clusters copied the old bytes in.
            assert!(rest_is(&old), "{kind:?}: qcow2 copy-on-write froze the stale backing bytes");
        } else {
            assert!(rest_is(&new), "{kind:?}: the rest of the cluster must show the new backing bytes");
        }
    }
}

/// Fills the backing through its own read-write handle when asked, as a background copy would.
struct Filler {
    base: Qcow2Image,
    new: Vec<u8>,
    calls: Mutex<Vec<(u64, u64)>>,
}

struct FillerRef(Arc<Filler>);

impl BackingFill for FillerRef {
    fn ready(&self, offset: u64, length: u64) -> Pin<Box<dyn Future<Output = io::Result<()>> + Send + 'static>> {
        let f = Arc::clone(&self.0);
        Box::pin(async move {
            f.calls.lock().expect("lock").push((offset, length));
            let data = f.new[offset as usize..(offset + length) as usize].to_vec();
            f.base.write(offset, Arc::new(IoBuf::from_vec(data)), Durability::Cached).await.map_err(io::Error::other)?;
            f.base.flush().await.map_err(io::Error::other)
        })
    }
}

#[tokio::test]
async fn a_partial_write_waits_for_the_backing_cluster_when_filling() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (base, top) = (dir.path().join("base.qcow2"), dir.path().join("top.qcow2"));
    create(&base, 1 << 20, None).await.expect("base");
    create_overlay(&top, &base).await.expect("overlay with 64 KiB clusters");
    let new = pat(1 << 20, 40);
    let filler = Arc::new(Filler {
        base: Qcow2Image::open(&base, Access::ReadWrite, EngineKind::Portable).await.expect("filler"),
        new: new.clone(),
        calls: Mutex::new(Vec::new()),
    });
    let fill: Arc<dyn BackingFill> = Arc::new(FillerRef(Arc::clone(&filler)));
    let t = Qcow2Image::open_with(&top, Access::ReadWrite, EngineKind::Portable, BackingState::Filling(fill))
        .await
        .expect("open");
    // Cache the backing's (still empty) metadata in the overlay first.
    assert!(get(&t, K64, K64 as usize).await.iter().all(|&b| b == 0));
    let guest = pat(512, 50);
    put(&t, K64 + 512, &guest).await;
    put(&t, K64 + 4096, &guest).await; // same cluster, now the overlay's: no wait
    put(&t, 3 * K64, &pat(K64 as usize, 60)).await; // a whole cluster: no wait
    assert_eq!(*filler.calls.lock().expect("lock"), vec![(K64, K64)]);
    let got = get(&t, K64, K64 as usize).await;
    let mut want = new[K64 as usize..2 * K64 as usize].to_vec();
    want[512..1024].copy_from_slice(&guest);
    want[4096..4608].copy_from_slice(&guest);
    let diff = got.iter().zip(&want).position(|(a, b)| a != b);
    assert!(got == want, "the copy-on-write read the filled backing, not a cached view of it (first difference at {diff:?}: {:?})", diff.map(|i| (got[i], want[i], new[K64 as usize + i])));
    t.set_backing_state(BackingState::Complete);
    put(&t, 5 * K64 + 512, &guest).await;
    assert_eq!(filler.calls.lock().expect("lock").len(), 1, "complete: no more waiting");
}

/// A backing fill that holds every wait until it is given a permit.
struct Gate(Arc<tokio::sync::Semaphore>);

impl BackingFill for Gate {
    fn ready(&self, _offset: u64, _length: u64) -> Pin<Box<dyn Future<Output = io::Result<()>> + Send + 'static>> {
        let permits = Arc::clone(&self.0);
        Box::pin(async move { permits.acquire().await.map(|p| p.forget()).map_err(io::Error::other) })
    }
}

/// A zeroing of part of a cluster still falling through to a backing being filled waits for
/// the fill, which may take long; writes straight into clusters the overlay holds go on
/// meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zeroing_waiting_for_the_backing_holds_up_no_direct_write() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (base, top) = (dir.path().join("base.qcow2"), dir.path().join("top.qcow2"));
    create(&base, 1 << 20, None).await.expect("base");
    create_overlay(&top, &base).await.expect("overlay with 64 KiB clusters");
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let fill: Arc<dyn BackingFill> = Arc::new(Gate(Arc::clone(&gate)));
    let t = Qcow2Image::open_with(&top, Access::ReadWrite, EngineKind::Portable, BackingState::Filling(fill)).await.expect("open");
    put(&t, 3 * K64, &pat(K64 as usize, 1)).await;
    put(&t, 3 * K64 + 512, &pat(512, 2)).await;
    assert_eq!(t.direct_writes(), 1);

    let zeroing = t.write_zeroes(K64 + 512, 512, ZeroAlloc::MayDeallocate, ZeroSpeed::Any, Durability::Cached);
    let beside = async {
        let data = Arc::new(IoBuf::from_vec(pat(512, 3)));
        let r = tokio::time::timeout(std::time::Duration::from_secs(5), t.write(3 * K64 + 1024, data, Durability::Cached)).await;
        gate.add_permits(1);
        r
    };
    let (zeroed, written) = tokio::join!(zeroing, beside);
    zeroed.expect("zeroes");
    written.expect("a direct write waited for the zeroing's backing fill").expect("write");
    assert_eq!(t.direct_writes(), 2);
    let mut want = pat(K64 as usize, 1);
    want[512..1024].copy_from_slice(&pat(512, 2));
    want[1024..1536].copy_from_slice(&pat(512, 3));
    assert_eq!(get(&t, 3 * K64, K64 as usize).await, want);
    assert!(get(&t, K64, K64 as usize).await.iter().all(|&b| b == 0));
}

#[tokio::test]
async fn broken_chains_and_files_give_named_errors_and_stay_untouched() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let e = Qcow2Image::open(&d.join("absent.qcow2"), Access::ReadOnly, EngineKind::Portable).await.err();
    assert!(matches!(e, Some(Qcow2Error::Io { .. })), "{e:?}");
    std::fs::write(d.join("raw"), vec![0u8; 4096]).expect("raw");
    let e = Qcow2Image::open(&d.join("raw"), Access::ReadOnly, EngineKind::Portable).await.err();
    assert!(matches!(e, Some(Qcow2Error::InvalidArgument { .. })), "{e:?}");

    create(&d.join("base.qcow2"), 1 << 20, None).await.expect("base");
    create_overlay(&d.join("top.qcow2"), &d.join("base.qcow2")).await.expect("top");
    std::fs::rename(d.join("base.qcow2"), d.join("moved.qcow2")).expect("move");
    let before = std::fs::read(d.join("top.qcow2")).expect("read");
    let e = Qcow2Image::open(&d.join("top.qcow2"), Access::ReadWrite, EngineKind::Portable).await.err();
    match e {
        Some(Qcow2Error::MissingBacking { path, backing }) => {
            assert_eq!(path, d.join("top.qcow2"));
            assert_eq!(backing, d.join("base.qcow2"));
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(check(&d.join("top.qcow2")).await, Err(Qcow2Error::MissingBacking { .. })));
    assert_eq!(std::fs::read(d.join("top.qcow2")).expect("read"), before);

    // A FIFO where the backing should be: refused at once rather than blocking the open.
    let made = std::process::Command::new("mkfifo").arg(d.join("base.qcow2")).status().expect("mkfifo");
    assert!(made.success());
    // Each open on a thread and runtime of its own, so that an open that blocks fails the test
    // instead of holding up this runtime's shutdown.
    let open_apart = |path: PathBuf, access: Access| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            let _ = tx.send(rt.block_on(Qcow2Image::open(&path, access, EngineKind::Portable)).err());
        });
        rx.recv_timeout(std::time::Duration::from_secs(10)).expect("open returns")
    };
    let e = open_apart(d.join("top.qcow2"), Access::ReadOnly);
    assert!(matches!(e, Some(Qcow2Error::Unsupported { ref what, .. }) if what.contains("not a regular file")), "{e:?}");
    // And a FIFO as the image itself, opened for writing (whose writer lock is taken first).
    let e = open_apart(d.join("base.qcow2"), Access::ReadWrite);
    assert!(matches!(e, Some(Qcow2Error::Unsupported { ref what, .. }) if what.contains("not a regular file")), "{e:?}");
    std::fs::remove_file(d.join("base.qcow2")).expect("remove fifo");

    // A loop: moved -> top -> moved, written behind rebase's back.
    rebase(&d.join("top.qcow2"), &d.join("moved.qcow2")).await.expect("rebase");
    let e = rebase(&d.join("moved.qcow2"), &d.join("top.qcow2")).await.err();
    assert!(matches!(e, Some(Qcow2Error::InvalidArgument { ref reason, .. }) if reason.contains("loop")), "{e:?}");
    let (h, _) = chain::read_header(&d.join("moved.qcow2")).expect("header");
    let bytes = h.with_backing(Some(("top.qcow2", "qcow2"))).expect("bytes");
    {
        use std::os::unix::fs::FileExt;
        std::fs::OpenOptions::new().write(true).open(d.join("moved.qcow2")).expect("open").write_all_at(&bytes, 0).expect("w");
    }
    let e = Qcow2Image::open(&d.join("top.qcow2"), Access::ReadOnly, EngineKind::Portable).await.err();
    assert!(matches!(e, Some(Qcow2Error::Corrupt { ref reason, .. }) if reason.contains("loops")), "{e:?}");

    // Truncated: the L1 table is gone.
    create(&d.join("t.qcow2"), 1 << 20, None).await.expect("t");
    {
        let t = Qcow2Image::open(&d.join("t.qcow2"), Access::ReadWrite, EngineKind::Portable).await.expect("open");
        put(&t, 0, &pat(4096, 1)).await;
    }
    let (h, _) = chain::read_header(&d.join("t.qcow2")).expect("header");
    std::fs::OpenOptions::new().write(true).open(d.join("t.qcow2")).expect("o").set_len(h.l1_table_offset).expect("cut");
    let before = std::fs::read(d.join("t.qcow2")).expect("read");
    let e = Qcow2Image::open(&d.join("t.qcow2"), Access::ReadWrite, EngineKind::Portable).await.err();
    assert!(matches!(e, Some(Qcow2Error::Corrupt { ref reason, .. }) if reason.contains("L1")), "{e:?}");
    assert_eq!(std::fs::read(d.join("t.qcow2")).expect("read"), before);
}

/// A file cut short inside its last data cluster is truncated, and `check` says so: its
/// lost bytes would read as zeroes (a 512-byte cut used to pass, and an import then carried
/// zeroes in their place). A 4 KiB write into a fresh cluster grows the file by the whole
/// cluster, as QEMU's do, so an intact image passes.
#[tokio::test]
async fn check_refuses_a_file_cut_inside_its_last_data_cluster() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("cut.qcow2");
    create(&p, 1 << 20, None).await.expect("create");
    {
        let t = Qcow2Image::open(&p, Access::ReadWrite, EngineKind::Portable).await.expect("open");
        put(&t, 3 * K64, &pat(4096, 5)).await;
    }
    check(&p).await.expect("an intact image passes");
    let len = std::fs::metadata(&p).expect("stat").len();
    std::fs::OpenOptions::new().write(true).open(&p).expect("open").set_len(len - 512).expect("cut");
    let e = check(&p).await.err();
    assert!(matches!(e, Some(Qcow2Error::Corrupt { ref reason, .. }) if reason.contains("beyond the end of the file")), "{e:?}");
}

#[tokio::test]
async fn check_finds_leaks_and_refcounts_that_are_too_small() {
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("c.qcow2");
    create(&p, 1 << 20, None).await.expect("create");
    {
        let t = Qcow2Image::open(&p, Access::ReadWrite, EngineKind::Portable).await.expect("open");
        put(&t, 0, &pat(K64 as usize, 1)).await;
    }
    assert_eq!(check(&p).await.expect("clean").leaked_clusters, 0);
    let (h, len) = chain::read_header(&p).expect("header");
    let f = std::fs::OpenOptions::new().read(true).write(true).open(&p).expect("open");
    let mut rt = [0u8; 8];
    f.read_exact_at(&mut rt, h.refcount_table_offset).expect("rt");
    let block = u64::from_be_bytes(rt);
    // One more cluster in the file, counted as used: a leak.
    let extra = len / K64;
    f.set_len(len + K64).expect("grow");
    f.write_all_at(&1u16.to_be_bytes(), block + extra * 2).expect("refcount 1");
    assert_eq!(check(&p).await.expect("a leak is not corruption").leaked_clusters, 1);
    // The header cluster counted as free: a corruption.
    f.write_all_at(&0u16.to_be_bytes(), block).expect("refcount 0");
    let e = check(&p).await.err();
    assert!(matches!(e, Some(Qcow2Error::Corrupt { ref reason, .. }) if reason.contains("referenced 1")), "{e:?}");
}

#[tokio::test]
async fn a_writable_open_refuses_metadata_counted_free_and_leaves_the_file_untouched() {
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("m.qcow2");
    create(&p, 1 << 20, Some(512)).await.expect("create");
    {
        let t = Qcow2Image::open(&p, Access::ReadWrite, EngineKind::Portable).await.expect("open");
        put(&t, 0, &pat(4096, 3)).await;
        t.close().await.expect("close");
    }
    let (h, _) = chain::read_header(&p).expect("header");
    let f = std::fs::OpenOptions::new().read(true).write(true).open(&p).expect("open");
    let entry = |at: u64| be64_at(&f, at);
    let block = entry(h.refcount_table_offset);
    let l2 = entry(h.l1_table_offset) & 0x00ff_ffff_ffff_fe00;
    assert!(block != 0 && l2 != 0, "the image has a refcount block and an L2 table");

    // The L2 table's cluster counted free, as a crash before imago wrote its refcount leaves
    // it: counted in again by the open, as `qemu-img check -r all` would.
    let l2_refcount = block + (l2 / 512) * 2;
    let refcount = |f: &std::fs::File| {
        let mut b = [0u8; 2];
        f.read_exact_at(&mut b, l2_refcount).expect("refcount");
        u16::from_be_bytes(b)
    };
    f.write_all_at(&0u16.to_be_bytes(), l2_refcount).expect("refcount 0");
    Qcow2Image::open(&p, Access::ReadWrite, EngineKind::Portable).await.expect("repaired").close().await.expect("close");
    assert_eq!(refcount(&f), 1, "the L2 table is counted again");
    // The same, but with a second L1 entry naming that table: not a crash's doing, nothing is
    // repaired, and the next allocation could hand the table out as data.
    let l1_1 = h.l1_table_offset + 8;
    let old_l1_1 = entry(l1_1);
    f.write_all_at(&entry(h.l1_table_offset).to_be_bytes(), l1_1).expect("second L1 entry");
    f.write_all_at(&0u16.to_be_bytes(), l2_refcount).expect("refcount 0");
    let before = std::fs::read(&p).expect("read");
    let e = Qcow2Image::open(&p, Access::ReadWrite, EngineKind::Portable).await.err();
    assert!(matches!(e, Some(Qcow2Error::Corrupt { ref reason, .. }) if reason.contains("L2 table") && reason.contains("refcount is 0")), "{e:?}");
    assert_eq!(std::fs::read(&p).expect("read"), before);
    f.write_all_at(&1u16.to_be_bytes(), l2_refcount).expect("refcount back");
    f.write_all_at(&old_l1_1.to_be_bytes(), l1_1).expect("L1 entry back");

    // No refcount block for the first clusters at all (the fuzzer's find: imago's allocator
    // then recursed until the image thread's stack overflowed, killing the process).
    f.write_all_at(&0u64.to_be_bytes(), h.refcount_table_offset).expect("drop the block");
    let before = std::fs::read(&p).expect("read");
    let e = Qcow2Image::open(&p, Access::ReadWrite, EngineKind::Portable).await.err();
    assert!(matches!(e, Some(Qcow2Error::Corrupt { ref reason, .. }) if reason.contains("header") && reason.contains("refcount is 0")), "{e:?}");
    assert_eq!(std::fs::read(&p).expect("read"), before);
    assert!(matches!(resize(&p, 2 << 20).await, Err(Qcow2Error::Corrupt { .. })), "resize writes too");
    assert_eq!(std::fs::read(&p).expect("read"), before);
    // Reading allocates nothing, so a read-only open still serves the data.
    let r = Qcow2Image::open(&p, Access::ReadOnly, EngineKind::Portable).await.expect("read-only open");
    assert_eq!(get(&r, 0, 4096).await, pat(4096, 3));
}

/// Found by the `qcow2_parse` fuzz target: a file cut short inside its last data cluster (QEMU
/// reads the missing part as zeroes, and so does imago through our storage layer) failed the
/// second read of that cluster, the first one served straight from the file.
#[tokio::test]
async fn a_cluster_cut_short_by_the_end_of_the_file_reads_as_zeroes_past_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (p, t) = fresh(&dir, 1 << 20, EngineKind::Portable).await;
    put(&t, 0, &pat(K64 as usize, 7)).await;
    t.close().await.expect("close");
    let len = std::fs::metadata(&p).expect("stat").len();
    std::fs::OpenOptions::new().write(true).open(&p).expect("open").set_len(len - K64 / 2).expect("cut");
    let mut want = pat(K64 as usize / 2, 7);
    want.resize(K64 as usize, 0);
    for engine in engines() {
        let img = Qcow2Image::open(&p, Access::ReadWrite, engine).await.expect("open");
        assert_eq!(get(&img, 0, K64 as usize).await, want, "{engine:?}: through the image thread");
        assert_eq!(get(&img, 0, K64 as usize).await, want, "{engine:?}: again, once the cluster is known");
        assert_eq!(get(&img, 4096, 4096).await, want[4096..8192], "{engine:?}: inside the part the file holds");
        assert!(img.direct_reads() >= 1, "{engine:?}: the part the file holds is still read straight from it");
    }
}

#[tokio::test]
async fn rebase_and_resize_keep_content() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let (base, copy, top) = (d.join("base.qcow2"), d.join("copy.qcow2"), d.join("top.qcow2"));
    create(&base, 2 << 20, None).await.expect("base");
    {
        let b = Qcow2Image::open(&base, Access::ReadWrite, EngineKind::Portable).await.expect("open");
        put(&b, 0, &pat(2 << 20, 7)).await;
    }
    std::fs::copy(&base, &copy).expect("copy");
    create_overlay(&top, &base).await.expect("overlay");
    {
        let t = Qcow2Image::open(&top, Access::ReadWrite, EngineKind::Portable).await.expect("open");
        put(&t, 4096, &pat(8192, 8)).await;
    }
    let mut model = pat(2 << 20, 7);
    model[4096..4096 + 8192].copy_from_slice(&pat(8192, 8));

    rebase(&top, &copy).await.expect("rebase");
    assert_eq!(info(&top).await.expect("info").chain, vec![top.clone(), copy.clone()]);
    {
        let t = Qcow2Image::open(&top, Access::ReadOnly, EngineKind::Portable).await.expect("open");
        assert!(get(&t, 0, 2 << 20).await == model, "content after rebase");
    }
    create(&d.join("big.qcow2"), 4 << 20, None).await.expect("big");
    let e = rebase(&top, &d.join("big.qcow2")).await.err();
    assert!(matches!(e, Some(Qcow2Error::InvalidArgument { .. })), "{e:?}");

    // Shrink below the backing, grow past it: the backing must not reappear.
    resize(&top, 1 << 20).await.expect("shrink");
    resize(&top, 3 << 20).await.expect("grow");
    model.truncate(1 << 20);
    model.resize(3 << 20, 0);
    let t = Qcow2Image::open(&top, Access::ReadOnly, EngineKind::Portable).await.expect("open");
    assert_eq!(t.size(), 3 << 20);
    assert!(get(&t, 0, 3 << 20).await == model, "content after shrink and grow");
    drop(t);
    check(&top).await.expect("clean after resize");
    let e = resize(&top, 1000).await.err();
    assert!(matches!(e, Some(Qcow2Error::InvalidArgument { .. })), "{e:?}");
}

/// Two writers on one image would each allocate clusters the other thinks free: a second
/// writable open, a resize or a rebase is refused while one writer has the image, readers are
/// not, and the image is free again once the writer closes.
#[tokio::test]
async fn a_second_writer_is_refused_until_the_first_closes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (p, img) = fresh(&dir, 1 << 20, EngineKind::Portable).await;
    let base = dir.path().join("base.qcow2");
    create(&base, 1 << 20, None).await.expect("base");
    put(&img, 0, &pat(4096, 3)).await;
    let busy = |e: Option<Qcow2Error>, what: &str| assert!(matches!(e, Some(Qcow2Error::Busy { .. })), "{what}: {e:?}");
    busy(Qcow2Image::open(&p, Access::ReadWrite, EngineKind::Portable).await.err(), "second writable open");
    busy(resize(&p, 2 << 20).await.err(), "resize");
    busy(rebase(&p, &base).await.err(), "rebase");
    img.flush().await.expect("flush"); // what a reader sees of a live image is what was flushed
    let reader = Qcow2Image::open(&p, Access::ReadOnly, EngineKind::Portable).await.expect("a reader opens");
    assert!(get(&reader, 0, 4096).await == pat(4096, 3));
    drop(reader);
    img.close().await.expect("close");
    resize(&p, 2 << 20).await.expect("resize once the writer has closed");
    let again = Qcow2Image::open(&p, Access::ReadWrite, EngineKind::Portable).await.expect("writable again");
    assert_eq!(again.size(), 2 << 20);
}

/// A fresh qcow2 image of `size` bytes (64 KiB clusters) in `dir`, open for writing.
async fn fresh(dir: &tempfile::TempDir, size: u64, engine: EngineKind) -> (PathBuf, Qcow2Image) {
    let p = dir.path().join("disk.qcow2");
    create(&p, size, None).await.expect("create");
    let img = Qcow2Image::open(&p, Access::ReadWrite, engine).await.expect("open");
    (p, img)
}

/// Closes `img` and checks the metadata of its file at `p` as `qemu-img check` would.
async fn close_and_check(img: Qcow2Image, p: &Path) {
    img.close().await.expect("close");
    let f = std::fs::File::open(p).expect("file");
    let (h, len) = chain::read_header(p).expect("header");
    check::check(&f, &h, len).expect("consistent metadata");
}

/// A write into a cluster the top file holds goes straight into the file once the image thread
/// has served one write there, and reads back, after a reopen too, with the metadata intact.
#[tokio::test]
async fn writes_into_held_clusters_go_straight_to_the_file() {
    for engine in engines() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (p, img) = fresh(&dir, 4 << 20, engine).await;
        let mut model = vec![0u8; 4 << 20];
        let write = async |model: &mut Vec<u8>, offset: u64, data: Vec<u8>| {
            put(&img, offset, &data).await;
            model[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
        };
        // The first write allocates cluster 3; the next ones into it need no metadata.
        write(&mut model, 3 * K64 + 512, pat(4096, 1)).await;
        assert_eq!(img.direct_writes(), 0, "{engine:?}: an allocating write went direct");
        write(&mut model, 3 * K64 + 8192, pat(4096, 2)).await;
        write(&mut model, 3 * K64 + 777, pat(1000, 3)).await;
        assert_eq!(img.direct_writes(), 2, "{engine:?}");
        // Across clusters 3 and 4: direct only once 4 is held and known too.
        write(&mut model, 4 * K64 - 2048, pat(4096, 4)).await;
        assert_eq!(img.direct_writes(), 2, "{engine:?}: cluster 4 was not held");
        write(&mut model, 4 * K64 - 1024, pat(4096, 5)).await;
        assert_eq!(img.direct_writes(), 3, "{engine:?}");
        // Larger than a write done on the calling thread: clusters 5 and 6 first, then all.
        write(&mut model, 5 * K64, pat(2 * K64 as usize, 6)).await;
        write(&mut model, 3 * K64 + 100, pat(3 * K64 as usize + 300, 7)).await;
        assert_eq!(img.direct_writes(), 4, "{engine:?}");
        // A Stable write takes the image thread's way, which syncs.
        img.write(3 * K64, Arc::new(IoBuf::from_vec(pat(512, 8))), Durability::Stable).await.expect("stable write");
        model[3 * K64 as usize..3 * K64 as usize + 512].copy_from_slice(&pat(512, 8));
        assert_eq!(img.direct_writes(), 4, "{engine:?}: a Stable write went direct");
        assert_eq!(get(&img, 0, 4 << 20).await, model, "{engine:?}: open");
        // Reads of known clusters, within one run of the file, go straight to it too; a read
        // the image thread served teaches it the clusters it read.
        let reads = img.direct_reads();
        assert_eq!(get(&img, 3 * K64 + 700, 5000).await, model[3 * K64 as usize + 700..][..5000], "{engine:?}");
        assert_eq!(img.direct_reads(), reads + 1, "{engine:?}");
        close_and_check(img, &p).await;

        let img = Qcow2Image::open(&p, Access::ReadWrite, engine).await.expect("reopen");
        for _ in 0..2 {
            assert_eq!(get(&img, 5 * K64 + 512, 512).await, model[5 * K64 as usize + 512..][..512], "{engine:?}");
        }
        assert_eq!(img.direct_reads(), 1, "{engine:?}: the second read of a cluster the first taught");
        assert_eq!(get(&img, 0, 4 << 20).await, model, "{engine:?}: reopened");
    }
}

/// Zeroing makes a held cluster a zero cluster and a trim frees it for reuse: a write after
/// either must take the image thread's way again, or it would land where the metadata no longer
/// looks (or in the cluster now reused for other data).
#[tokio::test]
async fn zeroing_and_trims_send_writes_to_the_image_thread_again() {
    for engine in engines() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (p, img) = fresh(&dir, 4 << 20, engine).await;
        let mut model = vec![0u8; 4 << 20];
        for c in [1u64, 2] {
            for seed in [1u8, 2] {
                put(&img, c * K64, &pat(K64 as usize, seed)).await;
            }
            model[(c * K64) as usize..((c + 1) * K64) as usize].copy_from_slice(&pat(K64 as usize, 2));
        }
        assert_eq!(img.direct_writes(), 2, "{engine:?}");

        img.write_zeroes(K64, K64, ZeroAlloc::MayDeallocate, ZeroSpeed::FastOnly, Durability::Cached).await.expect("zeroes");
        model[K64 as usize..2 * K64 as usize].fill(0);
        put(&img, K64 + 4096, &pat(4096, 3)).await;
        model[(K64 + 4096) as usize..(K64 + 8192) as usize].copy_from_slice(&pat(4096, 3));
        assert_eq!(img.direct_writes(), 2, "{engine:?}: a write into a zeroed cluster went direct");
        assert_eq!(get(&img, K64, K64 as usize).await, model[K64 as usize..2 * K64 as usize], "{engine:?}: zeroed cluster");

        // Trim cluster 2, then allocate cluster 9, which may take its host cluster.
        img.trim(2 * K64, K64).await.expect("trim");
        model[2 * K64 as usize..3 * K64 as usize].fill(0);
        put(&img, 9 * K64, &pat(K64 as usize, 4)).await;
        model[9 * K64 as usize..10 * K64 as usize].copy_from_slice(&pat(K64 as usize, 4));
        put(&img, 2 * K64 + 512, &pat(512, 5)).await;
        model[(2 * K64 + 512) as usize..(2 * K64 + 1024) as usize].copy_from_slice(&pat(512, 5));
        assert_eq!(img.direct_writes(), 2, "{engine:?}: a write into a trimmed cluster went direct");
        assert_eq!(get(&img, 0, 4 << 20).await, model, "{engine:?}");
        close_and_check(img, &p).await;
    }
}

/// A write served by the image thread learns its cluster's mapping after it wrote; a zeroing
/// or trim of that cluster in flight at the same time may change the mapping after the lookup.
/// Whatever order the two took, a write after both must read back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mapping_learnt_beside_a_zeroing_or_trim_is_not_kept() {
    for engine in engines() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (p, img) = fresh(&dir, 16 << 20, engine).await;
        for round in 0..200u64 {
            let c = round % 64;
            let (at, len) = (c * K64 + 4096, 4096usize);
            // Not held, so the write below takes the image thread's way and learns.
            img.trim(c * K64, K64).await.expect("trim");
            let first = pat(len, 1);
            let racing = put(&img, at, &first);
            let remap = async {
                if round % 2 == 0 {
                    img.write_zeroes(c * K64, K64, ZeroAlloc::MayDeallocate, ZeroSpeed::FastOnly, Durability::Cached).await
                } else {
                    img.trim(c * K64, K64).await
                }
            };
            // Either one starts first: the write before the zeroing or trim began, or after.
            let r = if round % 4 < 2 { tokio::join!(racing, remap).1 } else { tokio::join!(remap, racing).0 };
            r.expect("zeroing or trim");
            let after = pat(len, 2);
            put(&img, at, &after).await;
            assert_eq!(get(&img, at, len).await, after, "{engine:?}: round {round}: the write after the race was lost");
        }
        close_and_check(img, &p).await;
    }
}

/// An image whose guest cluster 0 the L2 table maps onto the active L1 table (the damage
/// `qemu-img check` reports as "refcount=1 reference=2"), with data of its own in cluster 2.
/// `copied` sets the entry's COPIED bit, `zero` its zero flag (a zero cluster keeping the
/// L1 table's cluster as its host cluster), `l1_refcount` the L1 cluster's stored refcount.
/// Returns the image, its header and the L1 table's cluster as it was.
async fn mapped_onto_l1(dir: &tempfile::TempDir, copied: bool, zero: bool, l1_refcount: u16) -> (PathBuf, Header, Vec<u8>) {
    use std::os::unix::fs::FileExt;
    let p = dir.path().join("onto-l1.qcow2");
    create(&p, 1 << 20, None).await.expect("create");
    {
        let t = Qcow2Image::open(&p, Access::ReadWrite, EngineKind::Portable).await.expect("open");
        put(&t, 0, &pat(K64 as usize, 1)).await;
        put(&t, 2 * K64, &pat(K64 as usize, 2)).await;
        t.close().await.expect("close");
    }
    let (h, _) = chain::read_header(&p).expect("header");
    let f = std::fs::OpenOptions::new().read(true).write(true).open(&p).expect("open");
    let entry = |at: u64| be64_at(&f, at);
    let l2 = entry(h.l1_table_offset) & 0x00ff_ffff_ffff_fe00;
    let onto = h.l1_table_offset | if copied { 1 << 63 } else { 0 } | u64::from(zero);
    f.write_all_at(&onto.to_be_bytes(), l2).expect("map cluster 0 onto the L1 table");
    let block = entry(h.refcount_table_offset) & !0x1ff;
    f.write_all_at(&l1_refcount.to_be_bytes(), block + (h.l1_table_offset / K64) * 2).expect("L1 refcount");
    let mut l1 = vec![0u8; K64 as usize];
    f.read_exact_at(&mut l1, h.l1_table_offset).expect("L1 cluster");
    (p, h, l1)
}

/// The big-endian u64 at `at` in `f`: a table entry.
fn be64_at(f: &std::fs::File, at: u64) -> u64 {
    use std::os::unix::fs::FileExt;
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, at).expect("read entry");
    u64::from_be_bytes(b)
}

fn l1_cluster(p: &Path, h: &Header) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let mut l1 = vec![0u8; K64 as usize];
    std::fs::File::open(p).expect("open").read_exact_at(&mut l1, h.l1_table_offset).expect("L1 cluster");
    l1
}

fn error_text(e: &ImageError) -> String {
    match e {
        ImageError::Io { source, .. } => format!("{e}: {source}"),
        other => other.to_string(),
    }
}

/// QEMU's overlap check: a write, zeroing or trim that the damaged mapping would turn into a
/// write over (or a free of) the L1 table is refused; the image is marked corrupt on disk and
/// takes no write after that, straight-to-the-file ones included; the L1 table is untouched and
/// reads go on.
#[tokio::test]
async fn a_write_aimed_at_the_metadata_is_refused_and_marks_the_image_corrupt() {
    for engine in engines() {
        let cases = [("write", true, false), ("write zeroes", true, false), ("trim", true, false), ("write", false, false), ("write", true, true)];
        for (op, copied, zero) in cases {
            let dir = tempfile::tempdir().expect("tempdir");
            let (p, h, l1) = mapped_onto_l1(&dir, copied, zero, 1).await;
            let op = if zero { "write into a zero cluster" } else { op };
            let img = Qcow2Image::open(&p, Access::ReadWrite, engine).await.expect("the damage passes the open's checks");
            // Cluster 2 is held: after one write there, writes to it go straight to the file.
            put(&img, 2 * K64, &pat(4096, 5)).await;
            put(&img, 2 * K64 + 8192, &pat(4096, 6)).await;
            assert_eq!(img.direct_writes(), 1, "{engine:?} {op}");
            // A read of cluster 0 reads the L1 table, as QEMU's does (or zeroes, from a zero
            // cluster); it teaches nothing.
            let reads = if zero { vec![0; 4096] } else { l1[..4096].to_vec() };
            assert_eq!(get(&img, 0, 4096).await, reads, "{engine:?} {op}");
            let r = match op {
                "write" | "write into a zero cluster" => img.write(0, Arc::new(IoBuf::from_vec(pat(4096, 7))), Durability::Cached).await,
                "write zeroes" => img.write_zeroes(0, K64, ZeroAlloc::MayDeallocate, ZeroSpeed::Any, Durability::Cached).await,
                _ => img.trim(0, K64).await,
            };
            let e = r.expect_err("a write onto the L1 table must be refused");
            assert!(error_text(&e).contains("active L1 table"), "{engine:?} {op}: {e:?}");
            assert_eq!(l1_cluster(&p, &h), l1, "{engine:?} {op}: the L1 table changed");
            // No write after that, not even into the held cluster, which the file takes direct.
            let e = img.write(2 * K64, Arc::new(IoBuf::from_vec(pat(512, 8))), Durability::Cached).await.expect_err("refused");
            assert!(error_text(&e).contains("corrupt"), "{engine:?} {op}: {e:?}");
            assert!(img.trim(2 * K64, K64).await.is_err(), "{engine:?} {op}");
            assert_eq!(img.direct_writes(), 1, "{engine:?} {op}");
            let mut want = pat(K64 as usize, 2);
            want[..4096].copy_from_slice(&pat(4096, 5));
            want[8192..12288].copy_from_slice(&pat(4096, 6));
            assert_eq!(get(&img, 2 * K64, K64 as usize).await, want, "{engine:?} {op}: reads go on");
            img.close().await.expect("close");
            let incompatible = u64::from_be_bytes(std::fs::read(&p).expect("read")[72..80].try_into().expect("8 bytes"));
            assert_eq!(incompatible, header::INCOMPAT_CORRUPT, "{engine:?} {op}: the corrupt bit, and only it");
            assert_eq!(l1_cluster(&p, &h), l1, "{engine:?} {op}: the L1 table changed at close");
            let e = Qcow2Image::open(&p, Access::ReadWrite, engine).await.err();
            assert!(matches!(e, Some(Qcow2Error::Corrupt { ref reason, .. }) if reason.contains("marked corrupt")), "{e:?}");
            assert!(matches!(check(&p).await, Err(Qcow2Error::Corrupt { .. })), "{engine:?} {op}: check");
            // As in QEMU, it still opens read-only, so the disk can be read out.
            assert!(info(&p).await.expect("info").corrupt, "{engine:?} {op}");
            let ro = Qcow2Image::open(&p, Access::ReadOnly, engine).await.expect("a read-only open of a marked image");
            assert_eq!(get(&ro, 2 * K64, K64 as usize).await, want, "{engine:?} {op}: read-only");
            drop(ro);
            assert_eq!(u64::from_be_bytes(std::fs::read(&p).expect("read")[72..80].try_into().expect("8")), header::INCOMPAT_CORRUPT);
        }
    }
}

/// Without the COPIED bit imago copies the cluster away and lets go of its reference. Once the
/// stored refcount counts the metadata's own reference too (what `qemu-img check -r all` leaves),
/// that is safe, and the write goes through: into a new cluster, the L1 table untouched.
#[tokio::test]
async fn a_copy_on_write_away_from_the_metadata_goes_through_once_the_refcount_counts_both() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (p, h, l1) = mapped_onto_l1(&dir, false, false, 2).await;
    let img = Qcow2Image::open(&p, Access::ReadWrite, EngineKind::Portable).await.expect("open");
    put(&img, 512, &pat(4096, 9)).await;
    let mut want = l1.clone();
    want[512..512 + 4096].copy_from_slice(&pat(4096, 9));
    assert_eq!(get(&img, 0, K64 as usize).await, want, "the copy holds the old bytes and the write");
    img.close().await.expect("close");
    assert_eq!(l1_cluster(&p, &h), l1);
    let f = std::fs::File::open(&p).expect("file");
    let (h, len) = chain::read_header(&p).expect("header");
    assert_eq!(h.incompatible & header::INCOMPAT_CORRUPT, 0);
    // The data cluster the damage orphaned is a leak; nothing is corrupt any more.
    assert!(check::check(&f, &h, len).is_ok_and(|leaks| leaks == 1), "{:?}", check::check(&f, &h, len).err());
}

/// The guard follows the refcount table when imago moves it: a 512-byte-cluster image written
/// far beyond what its first table covers, whose data then lands in the cluster the first table
/// left, takes every write there and stays consistent.
#[tokio::test]
async fn writes_into_clusters_a_moved_refcount_table_left_are_not_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("small.qcow2");
    create(&p, 64 << 20, Some(512)).await.expect("create");
    let (first, _) = chain::read_header(&p).expect("header");
    let img = Qcow2Image::open(&p, Access::ReadWrite, EngineKind::Portable).await.expect("open");
    let mut model = vec![0u8; 64 << 20];
    // The second pass writes over the clusters the first allocated, one of which is where the
    // first refcount table was until imago moved it and freed its cluster.
    for pass in 0..2u8 {
        for i in 0..(24u64 << 20) / 65536 {
            let data = pat(65536, (i as u8).wrapping_add(pass));
            put(&img, i * 65536, &data).await;
            model[(i * 65536) as usize..][..65536].copy_from_slice(&data);
        }
    }
    assert_eq!(get(&img, 0, 64 << 20).await, model);
    close_and_check(img, &p).await;
    let (h, _) = chain::read_header(&p).expect("header");
    assert_ne!(h.refcount_table_offset, first.refcount_table_offset, "the refcount table never moved");
}

/// A crafted image whose L1 entries all name one L2 table: every walk (`image info`'s
/// allocation count, `image check`) used to read that table once per entry and count its
/// references again each time, until memory ran out on a 2 PiB image. Two entries of one L1
/// table naming one L2 table is refused as corruption, by both.
#[tokio::test]
async fn l1_entries_naming_one_l2_table_are_refused_by_check_and_info() {
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("shared-l2.qcow2");
    // 2 GiB of 64 KiB clusters: four L1 entries of 512 MiB each.
    create(&p, 2 << 30, None).await.expect("create");
    {
        let t = Qcow2Image::open(&p, Access::ReadWrite, EngineKind::Portable).await.expect("open");
        put(&t, 0, &pat(4096, 1)).await;
        t.close().await.expect("close");
    }
    info(&p).await.expect("a sound image");
    let (h, _) = chain::read_header(&p).expect("header");
    let f = std::fs::OpenOptions::new().read(true).write(true).open(&p).expect("open");
    let first = be64_at(&f, h.l1_table_offset);
    for i in 1..4u64 {
        f.write_all_at(&first.to_be_bytes(), h.l1_table_offset + i * 8).expect("L1 entry");
    }
    for (what, e) in [("info", info(&p).await.err()), ("check", check(&p).await.err())] {
        let e = e.unwrap_or_else(|| panic!("{what} took an L2 table named four times"));
        assert!(e.to_string().contains("L1 entries 0 and 1 name the same L2 table"), "{what}: {e}");
    }
}

/// An overlay on a backing chain as deep as opens (256) was made, and then nothing opened it,
/// nor could make another overlay on it: the create refuses it instead, naming the limit.
#[tokio::test]
async fn an_overlay_that_would_make_the_chain_too_deep_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut backing = dir.path().join("0.qcow2");
    create(&backing, 1 << 20, None).await.expect("create");
    for i in 1..chain::MAX_DEPTH {
        let overlay = dir.path().join(format!("{i}.qcow2"));
        create_overlay(&overlay, &backing).await.unwrap_or_else(|e| panic!("overlay {i}: {e}"));
        backing = overlay;
    }
    // The deepest chain that opens: 256 files.
    info(&backing).await.expect("256 files open");
    let too_deep = dir.path().join("too-deep.qcow2");
    let e = create_overlay(&too_deep, &backing).await.expect_err("a 257th file");
    assert!(e.to_string().contains("deeper than 256"), "{e}");
    assert!(!too_deep.exists());
}

/// A process killed after its first write into a new region, before any flush (a datapath's
/// crash), leaves the file as a copy taken then: imago wrote the new L2 table and its L1 entry,
/// not the refcount that counts it. Opened for writing, it used to be refused for good ("the
/// next allocation would overwrite it"); now the table is counted in, the image checks clean
/// (at most leaked clusters), and what was flushed before is there.
#[tokio::test]
async fn an_image_copied_before_its_first_flush_after_new_tables_opens_and_checks_clean() {
    for (engine, cluster) in engines().into_iter().flat_map(|e| [(e, None), (e, Some(512))]) {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("disk.qcow2");
        create(&p, 64 << 20, cluster).await.expect("create");
        let img = Qcow2Image::open(&p, Access::ReadWrite, engine).await.expect("open");
        let flushed = pat(4096, 5);
        put(&img, 0, &flushed).await;
        img.flush().await.expect("flush");
        // New L2 tables (and, with 512-byte clusters, new refcount blocks), never flushed.
        for i in 1..40u64 {
            put(&img, i * (1 << 20) + 512, &pat(512, i as u8)).await;
        }
        let crashed = dir.path().join("crashed.qcow2");
        std::fs::copy(&p, &crashed).expect("copy the file as a kill would leave it");
        img.close().await.expect("close");
        let again = Qcow2Image::open(&crashed, Access::ReadWrite, engine).await.expect("the crashed image opens for writing");
        assert_eq!(get(&again, 0, 4096).await, flushed, "{cluster:?}: the flushed write");
        put(&again, 50 << 20, &pat(4096, 9)).await;
        again.close().await.expect("close");
        let report = check(&crashed).await.expect("the repaired image checks clean");
        assert!(report.leaked_clusters < 1000, "{cluster:?}: {report:?}");
    }
}
