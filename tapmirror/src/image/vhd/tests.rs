//! Driver-level tests: data path against an in-memory model, write order, concurrency,
//! validation of damaged files, and the operations.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::image::Step;
use super::meta::Meta;
use super::*;
use crate::image::{Access, Extent, ExtentState, Image, ZeroAlloc, ZeroSpeed};
use crate::io::{Durability, EngineChoice, EngineKind, IoBuf};
use crate::testkit::pattern;

fn engines() -> Vec<EngineKind> {
    let mut v = vec![EngineKind::Portable];
    if let Ok(k) = EngineChoice::Uring.resolve() {
        v.push(k);
    }
    v
}

/// Compares two disk images, reporting the first difference instead of megabytes of bytes.
#[track_caller]
fn same(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!(
            "{what}: first difference at byte {i} (sector {}): got {:?}, want {:?}",
            i / 512,
            &got[i..(i + 8).min(got.len())],
            &want[i..(i + 8).min(want.len())]
        );
    }
}

async fn write(img: &VhdImage, model: &mut [u8], off: u64, data: Vec<u8>) {
    model[off as usize..off as usize + data.len()].copy_from_slice(&data);
    img.write(off, Arc::new(IoBuf::from_vec(data)), Durability::Cached).await.expect("write");
}

async fn read_all(img: &VhdImage) -> Vec<u8> {
    let (b, r) = img.read(0, IoBuf::new(img.size() as usize)).await;
    r.expect("read");
    b.into_vec()
}

async fn open_rw(p: &Path) -> VhdImage {
    VhdImage::open(p, Access::ReadWrite, EngineKind::Portable).await.expect("open rw")
}

async fn open_ro(p: &Path) -> VhdImage {
    VhdImage::open(p, Access::ReadOnly, EngineKind::Portable).await.expect("open ro")
}

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

const KIB64: u32 = 64 << 10;

#[tokio::test]
async fn dynamic_disk_reads_back_what_was_written_on_every_engine() {
    for kind in engines() {
        let d = tmp();
        let p = d.path().join("d.vhd");
        create_dynamic(&p, 1 << 20, KIB64).expect("create");
        let img = VhdImage::open(&p, Access::ReadWrite, kind).await.expect("open");
        assert_eq!(img.size(), 1 << 20);
        let mut model = vec![0u8; 1 << 20];
        same(&read_all(&img).await, &model, "content");
        // Aligned, unaligned, crossing blocks, inside an allocated block, and a re-write.
        for (i, (off, len)) in [(0u64, 4096usize), (70_000, 100), (65_000, 200_000), (1000, 3), (4096, 512), (0, 1)]
            .into_iter()
            .enumerate()
        {
            write(&img, &mut model, off, pattern(len, i as u64 + 1)).await;
        }
        same(&read_all(&img).await, &model, &format!("{kind:?}"));
        let (b, r) = img.read(65_500, IoBuf::new(1000)).await;
        r.expect("read");
        assert_eq!(&b[..], &model[65_500..66_500]);
        drop(img);
        let img = open_ro(&p).await;
        same(&read_all(&img).await, &model, &format!("{kind:?} after reopen"));
        check(&p).expect("check");
    }
}

#[tokio::test]
async fn default_block_size_disk_maps_allocation_per_sector() {
    let d = tmp();
    let p = d.path().join("d.vhd");
    create_dynamic(&p, 8 << 20, DEFAULT_BLOCK_SIZE).expect("create");
    let img = open_rw(&p).await;
    let mut model = vec![0u8; 8 << 20];
    write(&img, &mut model, (2 << 20) + 1024, pattern(1024, 5)).await;
    let map = img.allocation(0, 8 << 20, usize::MAX).await.expect("map");
    assert_eq!(
        map,
        vec![
            Extent { offset: 0, length: (2 << 20) + 1024, state: ExtentState::Hole },
            Extent { offset: (2 << 20) + 1024, length: 1024, state: ExtentState::Data },
            Extent { offset: (2 << 20) + 2048, length: (6 << 20) - 2048, state: ExtentState::Hole },
        ]
    );
    assert_eq!(img.allocation(0, 8 << 20, 1).await.expect("first").len(), 1);
    same(&read_all(&img).await, &model, "content");
}

/// A base with data and a differencing child; returns (dir, base, child, model of the chain).
async fn chain_fixture(block: u32) -> (tempfile::TempDir, PathBuf, PathBuf, Vec<u8>) {
    let d = tmp();
    let base = d.path().join("base.vhd");
    let child = d.path().join("child.vhd");
    create_dynamic(&base, 1 << 20, block).expect("create");
    let mut model = vec![0u8; 1 << 20];
    {
        let img = open_rw(&base).await;
        write(&img, &mut model, 0, pattern(300_000, 1)).await;
    }
    create_differencing(&child, &base).expect("child");
    (d, base, child, model)
}

#[tokio::test]
async fn differencing_reads_fall_through_per_sector_and_partial_writes_keep_parent_bytes() {
    let (_d, base, child, mut model) = chain_fixture(KIB64).await;
    let img = open_rw(&child).await;
    assert_eq!(img.chain(), vec![child.clone(), base.clone()]);
    same(&read_all(&img).await, &model, "content");
    write(&img, &mut model, 512, pattern(512, 2)).await; // one sector inside the parent's data
    write(&img, &mut model, 1000, pattern(100, 3)).await; // inside a sector the child lacks
    write(&img, &mut model, 65_530, pattern(20, 4)).await; // partial sectors on both sides, two blocks
    write(&img, &mut model, 400_000, pattern(700, 5)).await; // over a parent hole
    same(&read_all(&img).await, &model, "content");
    let map = img.allocation(0, 1 << 20, usize::MAX).await.expect("map");
    assert!(map.iter().any(|e| e.state == ExtentState::Data && e.offset == 0 && e.length >= 300_000), "{map:?}");
    assert!(map.iter().any(|e| e.state == ExtentState::Data && e.offset <= 399_872 && e.offset + e.length >= 400_700));
    drop(img);
    same(&read_all(&open_ro(&child).await).await, &model, "content");
    // The parent was never written.
    let mut base_model = vec![0u8; 1 << 20];
    base_model[..300_000].copy_from_slice(&pattern(300_000, 1));
    same(&read_all(&open_ro(&base).await).await, &base_model, "content");
}

#[tokio::test]
async fn concurrent_writes_into_one_block_lose_no_bitmap_bits() {
    let (_d, _base, child, mut model) = chain_fixture(KIB64).await;
    let img = Arc::new(open_rw(&child).await);
    let mut tasks = Vec::new();
    // 128 single-sector writes into two blocks (one allocated by the first writers, one not).
    for i in 0..128u64 {
        let off = (i % 64) * 1024 + (i / 64) * (512 << 10);
        let data = pattern(512, 100 + i);
        model[off as usize..off as usize + 512].copy_from_slice(&data);
        let img = Arc::clone(&img);
        tasks.push(tokio::spawn(async move {
            img.write(off, Arc::new(IoBuf::from_vec(data)), Durability::Cached).await.expect("write");
        }));
    }
    for t in tasks {
        t.await.expect("join");
    }
    same(&read_all(&img).await, &model, "content");
    drop(img);
    same(&read_all(&open_ro(&child).await).await, &model, "after reopen: every bit made it to disk");
}

#[tokio::test]
async fn allocation_writes_footer_then_data_then_bitmap_then_barrier_then_bat() {
    let d = tmp();
    let p = d.path().join("d.vhd");
    create_dynamic(&p, 1 << 20, KIB64).expect("create");
    let end = std::fs::metadata(&p).expect("stat").len() - 512;
    let img = open_rw(&p).await;
    img.write(70_000, Arc::new(IoBuf::from_vec(pattern(600, 1))), Durability::Cached).await.expect("write");
    let span = 512 + (64 << 10);
    // The write: a footer past the new block, the data, the block's bitmap. Nothing points at
    // the block yet; the BAT entry waits for the sync point.
    assert_eq!(img.trace(), vec![Step::Footer(end + span), Step::Data(end + 512 + 70_000 - 65_536), Step::Bitmap(end)]);
    assert_eq!(read_meta(&p).bat[1], u32::MAX, "the BAT names the block before a barrier");
    // Setting more bits in that block: only the data; the bits wait in memory.
    img.write(65_536 + 8192, Arc::new(IoBuf::from_vec(pattern(512, 2))), Durability::Cached).await.expect("write");
    assert_eq!(img.trace()[3..], [Step::Data(end + 512 + 8192)]);
    // Overwriting present sectors touches no metadata.
    img.write(65_536 + 8192, Arc::new(IoBuf::from_vec(pattern(512, 3))), Durability::Cached).await.expect("write");
    assert_eq!(img.trace().len(), 4);
    // A flush: one barrier, then the bitmap and the BAT entry that make the data visible.
    img.flush().await.expect("flush");
    assert_eq!(img.trace()[4..], [Step::Barrier, Step::Bitmap(end), Step::Bat(1536)]);
    let meta = read_meta(&p);
    assert_eq!(meta.bat[1], (end / 512) as u32);
    assert_eq!(meta.end, end + span);
    // Nothing lags any more: a second flush writes no metadata.
    img.flush().await.expect("flush");
    assert_eq!(img.trace().len(), 7);
    drop(img);
    let back = read_all(&open_ro(&p).await).await;
    assert_eq!(&back[65_536 + 8192..65_536 + 8192 + 512], &pattern(512, 3)[..]);
    assert_eq!(&back[70_000..70_600], &pattern(600, 1)[..]);
}

/// Closing is a sync point too: what an image wrote and never flushed is in the file once it
/// is dropped, in the same order.
#[tokio::test]
async fn closing_writes_the_metadata_that_lags() {
    let d = tmp();
    let p = d.path().join("d.vhd");
    create_dynamic(&p, 4 << 20, KIB64).expect("create");
    let img = open_rw(&p).await;
    let mut model = vec![0u8; 4 << 20];
    for (i, off) in [1000u64, 70_000, 3_000_000, 1_500].into_iter().enumerate() {
        let data = pattern(700, i as u64 + 1);
        model[off as usize..off as usize + 700].copy_from_slice(&data);
        img.write(off, Arc::new(IoBuf::from_vec(data)), Durability::Cached).await.expect("write");
    }
    assert!(read_meta(&p).bat.iter().all(|&e| e == u32::MAX), "metadata reached the file before a sync point");
    drop(img);
    assert!(read_all(&open_ro(&p).await).await == model, "the closed image lost writes");
    check(&p).expect("check");
}

#[tokio::test]
async fn process_crash_mode_skips_barriers() {
    let d = tmp();
    let p = d.path().join("d.vhd");
    create_dynamic(&p, 1 << 20, KIB64).expect("create");
    let img = VhdImage::open_with(&p, Access::ReadWrite, EngineKind::Portable, CrashSafety::ProcessCrash)
        .await
        .expect("open");
    img.write(0, Arc::new(IoBuf::from_vec(pattern(4096, 1))), Durability::Cached).await.expect("write");
    let t = img.trace();
    assert_eq!(t.len(), 4, "{t:?}");
    assert!(!t.contains(&Step::Barrier));
}

#[tokio::test]
async fn zeroes_and_read_only_behave() {
    let (_d, _base, child, mut model) = chain_fixture(KIB64).await;
    let img = open_rw(&child).await;
    // Zeroing over parent data must hide it; over holes everywhere it allocates nothing.
    img.write_zeroes(1024, 4096, ZeroAlloc::MayDeallocate, ZeroSpeed::Any, Durability::Cached).await.expect("zero");
    model[1024..1024 + 4096].fill(0);
    img.write_zeroes(600_000, 65_536, ZeroAlloc::MayDeallocate, ZeroSpeed::Any, Durability::Stable)
        .await
        .expect("zero");
    assert!(matches!(
        img.write_zeroes(0, 512, ZeroAlloc::Keep, ZeroSpeed::FastOnly, Durability::Cached).await,
        Err(crate::image::ImageError::NotFast)
    ));
    same(&read_all(&img).await, &model, "content");
    let map = img.allocation(589_824, 131_072, usize::MAX).await.expect("map");
    assert!(map.iter().all(|e| e.state == ExtentState::Hole), "{map:?}");
    drop(img);
    let ro = open_ro(&child).await;
    assert!(ro.features().read_only);
    assert!(matches!(
        ro.write(0, Arc::new(IoBuf::new(512)), Durability::Cached).await,
        Err(crate::image::ImageError::ReadOnly)
    ));
    assert!(matches!(ro.read(1 << 20, IoBuf::new(1)).await.1, Err(crate::image::ImageError::OutOfRange { .. })));
}

#[tokio::test]
async fn a_second_writer_is_refused() {
    let d = tmp();
    let p = d.path().join("d.vhd");
    create_dynamic(&p, 1 << 20, KIB64).expect("create");
    let _w = open_rw(&p).await;
    let e = VhdImage::open(&p, Access::ReadWrite, EngineKind::Portable).await.err().expect("refused");
    assert_eq!(e.kind(), VhdErrorKind::Busy);
    open_ro(&p).await; // readers are not stopped
    assert_eq!(resize(&p, 2 << 20).expect_err("busy").kind(), VhdErrorKind::Busy);
}

fn read_meta(p: &Path) -> Meta {
    Meta::read(&std::fs::File::open(p).expect("open"), p).expect("meta")
}

fn patch(p: &Path, off: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(p).expect("open");
    f.write_all_at(bytes, off).expect("patch");
}

/// Sets BAT entry `i` of `p` to `v`.
fn set_bat(p: &Path, i: u64, v: u32) {
    let m = read_meta(p);
    patch(p, m.header.table_offset + 4 * i, &v.to_be_bytes());
}

fn meta_err(p: &Path) -> String {
    let e = Meta::read(&std::fs::File::open(p).expect("open"), p).expect_err("must be refused");
    assert_eq!(e.kind(), VhdErrorKind::Corrupt, "{e}");
    e.to_string()
}

#[tokio::test]
async fn bat_validation_refuses_overlaps_and_entries_past_the_end() {
    let d = tmp();
    let p = d.path().join("d.vhd");
    create_dynamic(&p, 1 << 20, KIB64).expect("create");
    {
        let img = open_rw(&p).await;
        img.write(0, Arc::new(IoBuf::new(65_536 * 2)), Durability::Cached).await.expect("write");
    }
    let m = read_meta(&p);
    let good = std::fs::read(&p).expect("read");
    let reset = || std::fs::write(&p, &good).expect("reset");
    set_bat(&p, 1, m.bat[0]);
    assert!(meta_err(&p).contains("overlaps block 0"), "{}", meta_err(&p));
    reset();
    set_bat(&p, 1, m.bat[0] + 1);
    assert!(meta_err(&p).contains("overlaps"));
    reset();
    set_bat(&p, 2, 3); // inside the BAT
    assert!(meta_err(&p).contains("overlaps the BAT"), "{}", meta_err(&p));
    reset();
    set_bat(&p, 2, 1); // the header
    assert!(meta_err(&p).contains("overlaps the dynamic header"), "{}", meta_err(&p));
    reset();
    set_bat(&p, 2, (m.end / 512) as u32 - 1);
    assert!(meta_err(&p).contains("past the end of file"), "{}", meta_err(&p));
    reset();
    set_bat(&p, 2, (m.end / 512) as u32 + 1);
    assert!(meta_err(&p).contains("sector bitmap"), "{}", meta_err(&p));
    reset();
    // Truncating into the last block: the end footer is gone and the block runs past the end.
    std::fs::OpenOptions::new().write(true).open(&p).expect("open").set_len(m.end - 4096).expect("truncate");
    assert!(meta_err(&p).contains("past the end of file"), "{}", meta_err(&p));
    reset();
    std::fs::OpenOptions::new().write(true).open(&p).expect("open").set_len(1000).expect("truncate");
    assert!(meta_err(&p).contains("truncated"), "{}", meta_err(&p));
    reset();
    read_meta(&p);
}

#[tokio::test]
async fn checksums_and_fields_are_validated() {
    let d = tmp();
    let p = d.path().join("d.vhd");
    create_dynamic(&p, 1 << 20, KIB64).expect("create");
    let good = std::fs::read(&p).expect("read");
    let len = good.len() as u64;
    let reset = || std::fs::write(&p, &good).expect("reset");
    // A damaged end footer beside a sound copy: the copy, with a warning (libvhd's backup
    // footer; QEMU reads the copy anyway).
    patch(&p, len - 512 + 40, &[1]); // end footer, original size
    let m = read_meta(&p);
    assert!(!m.end_footer && m.warnings.len() == 1 && m.warnings[0].contains("bad checksum"), "{:?}", m.warnings);
    reset();
    patch(&p, 40, &[1]); // footer copy
    assert!(meta_err(&p).contains("footer copy at offset 0: bad checksum"));
    reset();
    patch(&p, 512 + 100, &[1]); // header
    assert!(meta_err(&p).contains("dynamic header at 512: bad checksum"));
    reset();
    // Missing end footer (the cookie is gone): tolerated, with a warning, from the copy.
    patch(&p, len - 512, b"xxxxxxxx");
    let m = read_meta(&p);
    assert!(!m.end_footer && m.warnings.len() == 1, "{:?}", m.warnings);
    let report = check(&p).expect("check");
    assert_eq!(report.warnings().len(), 1);
    // ... and an allocation writes a footer at the end again.
    {
        let img = open_rw(&p).await;
        img.write(0, Arc::new(IoBuf::from_vec(pattern(512, 1))), Durability::Cached).await.expect("write");
    }
    assert!(read_meta(&p).end_footer);
    assert!(check(&p).expect("check").warnings().is_empty());
}

/// A dynamic VHD whose first sector is damaged was called "a fixed VHD" by the format
/// detection (the footer at its end was taken for a fixed disk's); it is a VHD, and the VHD
/// reader says what is wrong with it.
#[test]
fn a_dynamic_vhd_with_its_start_damaged_is_not_called_fixed() {
    let d = tmp();
    let p = d.path().join("d.vhd");
    create_dynamic(&p, 1 << 20, KIB64).expect("create");
    patch(&p, 0, b"xxxxxxxx");
    assert!(matches!(crate::image::Format::detect(&p), Ok(crate::image::Format::Vhd)));
    let e = meta_err(&p);
    assert!(e.contains("no footer copy at offset 0") && e.contains("its start is damaged") && !e.contains("fixed"), "{e}");
}

/// A BAT named larger than the largest VHD could need is refused before it is read: a
/// crafted header of 2^29 entries, sparse in a 1 MB file, made every open read 2 GiB.
#[test]
fn a_bat_larger_than_the_largest_vhd_needs_is_refused_unread() {
    let d = tmp();
    let p = d.path().join("d.vhd");
    create_dynamic(&p, 1 << 20, KIB64).expect("create");
    let m = read_meta(&p);
    let most = MAX_SIZE.div_ceil(KIB64 as u64) as u32;
    for (entries, refused) in [(most + 1, true), (1 << 29, true), (most, false)] {
        let mut h = m.header.clone();
        h.max_table_entries = entries;
        patch(&p, 512, &h.encode());
        let e = meta_err(&p);
        // One as large as the largest VHD needs passes this check, and fails the next: its
        // table does not lie in the file.
        assert_eq!(e.contains("maps more than the largest VHD"), refused, "{entries}: {e}");
        assert!(refused || e.contains("lies outside the file"), "{entries}: {e}");
    }
}

#[tokio::test]
async fn qemu_style_chs_sizes_are_honoured() {
    let d = tmp();
    let p = d.path().join("d.vhd");
    create_dynamic(&p, 10 << 20, KIB64).expect("create");
    // Rewrite both footers as QEMU would: creator "qemu", a covering geometry.
    let mut m = read_meta(&p);
    m.footer.creator_app = *b"qemu";
    m.footer.geometry = format::Chs::covering((10 << 20) / 512);
    let bytes = m.footer.encode();
    // The BAT must cover the CHS size; it has 160 entries of 64 KiB = 10 MiB, less than the
    // geometry's size, so the file is refused until the BAT is grown.
    patch(&p, 0, &bytes);
    patch(&p, m.file_len - 512, &bytes);
    assert!(meta_err(&p).contains("BAT too small"));
    m.header.max_table_entries = 200;
    let mut h = m.header.clone();
    h.table_offset = 1536;
    // 200 entries still fit the BAT's single... 160*4=640 -> 1024 bytes of BAT: room for 256.
    patch(&p, 512, &h.encode());
    let m2 = read_meta(&p);
    assert_eq!(m2.size_source, SizeSource::Chs);
    assert_eq!(m2.size, format::Chs::covering((10 << 20) / 512).total_sectors() * 512);
    assert_eq!(open_ro(&p).await.size(), m2.size);
}

#[tokio::test]
async fn snapshot_keeps_the_path_and_the_content() {
    let d = tmp();
    let leaf = d.path().join("vdi.vhd");
    let frozen = d.path().join("snap1.vhd");
    create_dynamic(&leaf, 1 << 20, KIB64).expect("create");
    let mut model = vec![0u8; 1 << 20];
    {
        let img = open_rw(&leaf).await;
        write(&img, &mut model, 0, pattern(100_000, 1)).await;
    }
    let uuid_before = info(&leaf).expect("info").uuid;
    snapshot(&leaf, &frozen).expect("snapshot");
    let i = info(&leaf).expect("info");
    assert_eq!(i.disk_type, DiskType::Differencing);
    assert_eq!(i.parent_uuid.as_deref(), Some(uuid_before.as_str()));
    assert_eq!(i.chain, vec![leaf.clone(), frozen.clone()]);
    assert_eq!(i.allocated_bytes, 0);
    assert_eq!(info(&frozen).expect("info").uuid, uuid_before);
    let snap_model = model.clone();
    {
        let img = open_rw(&leaf).await;
        same(&read_all(&img).await, &model, "content");
        write(&img, &mut model, 50_000, pattern(5000, 2)).await;
    }
    same(&read_all(&open_ro(&frozen).await).await, &snap_model, "the snapshot is frozen");
    same(&read_all(&open_ro(&leaf).await).await, &model, "content");
    // An existing, different `frozen` is refused without touching anything.
    assert_eq!(snapshot(&leaf, &frozen).expect_err("exists").kind(), VhdErrorKind::InvalidArgument);
    // Resuming after a crash between the link and the rename finishes the job.
    let frozen2 = d.path().join("snap2.vhd");
    std::fs::hard_link(&leaf, &frozen2).expect("link");
    snapshot(&leaf, &frozen2).expect("resume");
    assert_eq!(info(&leaf).expect("info").chain, vec![leaf.clone(), frozen2.clone(), frozen.clone()]);
    same(&read_all(&open_ro(&leaf).await).await, &model, "content");
    // A snapshot that fails after its link (here its temporary cannot be cleared; a full file
    // system fails the same way) removes the link it made: no second name of the disk is left.
    let tmp = d.path().join(".vdi.vhd.snapshot-tmp");
    std::fs::create_dir(&tmp).expect("a folder in the temporary's place");
    let frozen3 = d.path().join("snap3.vhd");
    assert!(snapshot(&leaf, &frozen3).is_err());
    assert!(!frozen3.exists(), "the failed snapshot left its link");
    assert_eq!(info(&leaf).expect("info").chain, vec![leaf.clone(), frozen2.clone(), frozen.clone()]);
    same(&read_all(&open_ro(&leaf).await).await, &model, "content");
}

#[tokio::test]
async fn clone_compose_and_diff_map() {
    let (d, base, child, mut model) = chain_fixture(KIB64).await;
    let twin = d.path().join("twin.vhd");
    clone(&base, &twin).expect("clone");
    let base_model = model.clone();
    {
        let img = open_rw(&child).await;
        write(&img, &mut model, 700_000, pattern(1024, 9)).await;
    }
    same(&read_all(&open_ro(&twin).await).await, &base_model, "content");
    // The child differs from its twin exactly where the child wrote.
    let diff = diff_map(&child, &twin).await.expect("diff");
    assert_eq!(diff, vec![Extent { offset: 700_000 & !511, length: 1536, state: ExtentState::Data }]);
    assert_eq!(diff_map(&child, &child).await.expect("diff"), vec![]);
    // From the base alone, a copy of the child must send the base's data too.
    let full = diff_map(&child, &base).await.expect("diff");
    assert_eq!(full, diff);
    // Compose the child onto a copy of the base with another UUID: content unchanged.
    let other = d.path().join("other.vhd");
    create_dynamic(&other, 1 << 20, KIB64).expect("create");
    {
        let img = open_rw(&other).await;
        img.write(0, Arc::new(IoBuf::from_vec(base_model.clone())), Durability::Cached).await.expect("copy");
    }
    compose(&child, &other).expect("compose");
    assert_eq!(info(&child).expect("info").chain, vec![child.clone(), other.clone()]);
    same(&read_all(&open_ro(&child).await).await, &model, "content");
    check(&child).expect("check");
    // Loops and larger parents are refused, and leave the file as it was.
    let before = std::fs::read(&other).expect("read");
    assert_eq!(compose(&other, &child).expect_err("loop").kind(), VhdErrorKind::InvalidArgument);
    let big = d.path().join("big.vhd");
    create_dynamic(&big, 2 << 20, KIB64).expect("create");
    assert_eq!(compose(&child, &big).expect_err("size").kind(), VhdErrorKind::InvalidArgument);
    assert_eq!(std::fs::read(&other).expect("read"), before);
    let _ = base;
}

#[tokio::test]
async fn resize_grows_in_place_and_by_moving_the_bat() {
    let d = tmp();
    for (name, reserve) in [("moved.vhd", None), ("reserved.vhd", Some(4u64 << 20))] {
        let p = d.path().join(name);
        match reserve {
            None => create_dynamic(&p, 1 << 20, KIB64).expect("create"),
            Some(r) => create_dynamic_reserved(&p, 1 << 20, KIB64, r).expect("create"),
        }
        let mut model = vec![0u8; 4 << 20];
        {
            let img = open_rw(&p).await;
            write(&img, &mut model, 60_000, pattern(300_000, 1)).await;
        }
        let table_before = read_meta(&p).header.table_offset;
        resize(&p, 4 << 20).expect("resize");
        let m = read_meta(&p);
        assert_eq!(m.size, 4 << 20);
        assert_eq!(m.table_offset_moved(table_before), reserve.is_none(), "{name}");
        let img = open_rw(&p).await;
        assert_eq!(img.size(), 4 << 20);
        write(&img, &mut model, (4 << 20) - 70_000, pattern(70_000, 2)).await;
        same(&read_all(&img).await, &model, name);
        drop(img);
        same(&read_all(&open_ro(&p).await).await, &model, name);
        assert!(check(&p).expect("check").warnings().is_empty());
        assert_eq!(resize(&p, 1 << 20).expect_err("shrink").kind(), VhdErrorKind::InvalidArgument);
        assert_eq!(resize(&p, MAX_SIZE + 512).expect_err("limit").kind(), VhdErrorKind::InvalidArgument);
    }
}

impl Meta {
    fn table_offset_moved(&self, before: u64) -> bool {
        self.header.table_offset != before
    }
}

#[tokio::test]
async fn coalesce_folds_the_leaf_into_its_parent() {
    let (_d, base, child, mut model) = chain_fixture(KIB64).await;
    {
        let img = open_rw(&child).await;
        write(&img, &mut model, 100, pattern(10, 1)).await;
        write(&img, &mut model, 500_000, pattern(200_000, 2)).await;
    }
    coalesce(&child).expect("coalesce");
    same(&read_all(&open_ro(&base).await).await, &model, "the parent now holds everything");
    same(&read_all(&open_ro(&child).await).await, &model, "and the leaf still reads the same");
    check(&base).expect("check");
    assert_eq!(coalesce(&base).expect_err("no parent").kind(), VhdErrorKind::InvalidArgument);
}

#[tokio::test]
async fn missing_and_wrong_parents_and_loops_are_reported() {
    let (d, base, child, _model) = chain_fixture(KIB64).await;
    let saved = d.path().join("saved.vhd");
    std::fs::rename(&base, &saved).expect("move");
    let e = check(&child).expect_err("missing");
    assert_eq!(e.kind(), VhdErrorKind::MissingParent);
    assert!(e.to_string().contains("missing parent"), "{e}");
    create_dynamic(&base, 1 << 20, KIB64).expect("impostor");
    let e = check(&child).expect_err("wrong");
    assert_eq!(e.kind(), VhdErrorKind::MissingParent);
    assert!(e.to_string().contains("wrong parent UUID"), "{e}");
    // A FIFO where the parent should be: refused at once rather than blocking the open for
    // ever (on a thread, so that a hang fails the test instead of stalling it).
    std::fs::remove_file(&base).expect("remove impostor");
    let made = std::process::Command::new("mkfifo").arg(&base).status().expect("mkfifo");
    assert!(made.success());
    let (tx, rx) = std::sync::mpsc::channel();
    let c = child.clone();
    std::thread::spawn(move || tx.send(check(&c).map(|_| ())));
    let e = rx.recv_timeout(std::time::Duration::from_secs(10)).expect("check returns").expect_err("fifo");
    assert_eq!(e.kind(), VhdErrorKind::Unsupported, "{e}");
    assert!(e.to_string().contains("not a regular file"), "{e}");
    std::fs::remove_file(&base).expect("remove fifo");
    std::fs::rename(&saved, &base).expect("restore");
    check(&child).expect("check");
    // A loop: a differencing disk whose locators and parent UUID name itself.
    let selfish = d.path().join("selfish.vhd");
    create_differencing(&selfish, &base).expect("create");
    let m = read_meta(&selfish);
    let mut h = m.header.clone();
    h.parent_uuid = m.footer.uuid;
    h.locators = [format::Locator::default(); 8];
    h.set_parent_name("selfish.vhd");
    patch(&selfish, 512, &h.encode());
    let e = check(&selfish).expect_err("loop");
    assert_eq!(e.kind(), VhdErrorKind::Corrupt);
    assert!(e.to_string().contains("parent loop"), "{e}");
}

#[test]
fn create_refuses_bad_arguments() {
    let d = tmp();
    let p = d.path().join("d.vhd");
    for (size, bs) in [(0, KIB64), (1000, KIB64), (MAX_SIZE + 512, KIB64), (1 << 20, 1000), (1 << 20, 256)] {
        assert_eq!(create_dynamic(&p, size, bs).expect_err("bad").kind(), VhdErrorKind::InvalidArgument);
        assert!(!p.exists());
    }
    create_dynamic(&p, MAX_SIZE, DEFAULT_BLOCK_SIZE).expect("the limit itself is fine");
    assert_eq!(info(&p).expect("info").virtual_size, MAX_SIZE);
    assert_eq!(create_dynamic(&p, 1 << 20, KIB64).expect_err("exists").kind(), VhdErrorKind::InvalidArgument);
    assert!(is_vhd(&std::fs::read(&p).expect("read")[..8]));
    assert!(!is_vhd(b"QFI\xfb\0\0\0\x03"));
}

/// Found by the `vhd_parse` fuzz target: a file whose length is not a multiple of 512 (its end
/// footer unaligned) got its next block at an unaligned offset, which the BAT cannot express.
#[tokio::test]
async fn a_file_of_unaligned_length_still_gets_aligned_blocks() {
    let d = tmp();
    let p = d.path().join("d.vhd");
    create_dynamic(&p, 1 << 20, KIB64).expect("create");
    let mut bytes = std::fs::read(&p).expect("read");
    let at = bytes.len() - 512;
    bytes.insert(at, 0x5A); // one stray byte before the end footer
    std::fs::write(&p, &bytes).expect("write");
    let mut model = vec![0u8; 1 << 20];
    {
        let img = open_rw(&p).await;
        write(&img, &mut model, 70_000, pattern(3000, 1)).await;
        same(&read_all(&img).await, &model, "before reopening");
    }
    same(&read_all(&open_ro(&p).await).await, &model, "after reopening");
    let m = read_meta(&p);
    assert!(m.end.is_multiple_of(512) && m.end_footer);
    check(&p).expect("check");
}

/// A file with no VHD footer at either end is reported as not a VHD, not as a damaged copy.
#[test]
fn a_file_without_any_footer_is_said_not_to_be_a_vhd() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("plain.raw");
    std::fs::write(&p, vec![0u8; 1 << 20]).expect("write");
    let e = info(&p).expect_err("not a VHD");
    assert!(e.to_string().contains("not a VHD"), "{e}");
}

/// A child on a chain as deep as opens (256) was made, and then nothing opened it, nor could
/// make another child of it: the create refuses it instead, naming the limit.
#[tokio::test]
async fn a_child_that_would_make_the_chain_too_deep_is_refused() {
    let d = tmp();
    let mut parent = d.path().join("0.vhd");
    create_dynamic(&parent, 1 << 20, KIB64).expect("create");
    for i in 1..super::chain::MAX_DEPTH {
        let child = d.path().join(format!("{i}.vhd"));
        create_differencing(&child, &parent).unwrap_or_else(|e| panic!("child {i}: {e}"));
        parent = child;
    }
    // The deepest chain that opens: 256 files.
    assert_eq!(open_ro(&parent).await.size(), 1 << 20);
    let e = create_differencing(&d.path().join("too-deep.vhd"), &parent).expect_err("a 257th file");
    assert!(e.to_string().contains("deeper than 256"), "{e}");
    assert!(!d.path().join("too-deep.vhd").exists());
}

/// A parent's candidates carry no `.` parts: the `./base.vhd` locator beside the child was
/// named in errors as `DIR/./base.vhd` (`././base.vhd` for a child named `./child.vhd`).
#[tokio::test]
async fn parent_candidates_have_no_dot_parts() {
    let (_d, base, child, _model) = chain_fixture(2 << 20).await;
    let layer = super::chain::open_file(&child, super::chain::LeafMode::ReadOnly).expect("open");
    let candidates = super::chain::parent_candidates(&layer);
    // As displayed: `Path`'s own comparison and components skip such parts.
    let shown: Vec<String> = candidates.iter().map(|c| c.display().to_string()).collect();
    assert!(shown.iter().all(|c| !c.contains("/./")), "{shown:?}");
    assert_eq!(shown.first(), Some(&base.display().to_string()), "{shown:?}");
}
