//! The VHD driver against independent judges: `qemu-img`/`qemu-io` for dynamic disks (QEMU has
//! no differencing support), libvhdi (`pyvhdi`, Debian's python3-libvhdi) for chains, damaged
//! files that must be refused without a byte changing, and a writer killed with SIGKILL.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use tapmirror::image::vhd::{
    self, CrashSafety, DEFAULT_BLOCK_SIZE, VhdErrorKind, VhdImage, check, coalesce, create_differencing,
    create_dynamic, create_dynamic_reserved, resize, snapshot,
};
use tapmirror::image::{Access, Image};
use tapmirror::io::{Durability, EngineChoice, EngineKind, IoBuf};

use crate::harness::{pattern, run};

const KIB64: u32 = 64 << 10;

fn engine() -> EngineKind {
    EngineChoice::from_env().resolve().unwrap_or(EngineKind::Portable)
}

/// A disk image and the bytes it should read as.
struct Model {
    bytes: Vec<u8>,
}

impl Model {
    fn new(size: u64) -> Model {
        Model { bytes: vec![0u8; size as usize] }
    }

    async fn write(&mut self, img: &VhdImage, off: u64, data: Vec<u8>) {
        self.bytes[off as usize..off as usize + data.len()].copy_from_slice(&data);
        img.write(off, Arc::new(IoBuf::from_vec(data)), Durability::Cached).await.expect("write");
    }

    fn save_raw(&self, path: &Path) {
        std::fs::write(path, &self.bytes).expect("write raw");
    }
}

/// Compares two disk images, reporting the first difference instead of megabytes of bytes.
#[track_caller]
fn same(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        let n = got[i..].iter().zip(&want[i..]).take_while(|(a, b)| a != b).count();
        panic!(
            "{what}: first difference at byte {i} (sector {}, {n} bytes differ from there): got {:?}, want {:?}",
            i / 512,
            &got[i..(i + 8).min(got.len())],
            &want[i..(i + 8).min(want.len())]
        );
    }
}

async fn read_all(img: &VhdImage) -> Vec<u8> {
    let (b, r) = img.read(0, IoBuf::new(img.size() as usize)).await;
    r.expect("read");
    b.into_vec()
}

async fn open_rw(p: &Path) -> VhdImage {
    VhdImage::open(p, Access::ReadWrite, engine()).await.expect("open rw")
}

async fn open_ro(p: &Path) -> VhdImage {
    VhdImage::open(p, Access::ReadOnly, engine()).await.expect("open ro")
}

fn qemu_virtual_size(p: &Path) -> u64 {
    let out = run(Command::new("qemu-img").args(["info", "--output=json", "-f", "vpc"]).arg(p));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    v["virtual-size"].as_u64().expect("virtual-size")
}

/// `qemu-img compare` (content only: our allocation differs from the raw file's; sizes are checked apart).
fn qemu_compare(vhd: &Path, raw: &Path) {
    run(Command::new("qemu-img").args(["compare", "-f", "vpc"]).arg(vhd).args(["-F", "raw"]).arg(raw));
}

/// A varied set of writes: aligned, unaligned, single bytes, crossing blocks, re-writes.
async fn scribble(img: &VhdImage, model: &mut Model, seed: u64) {
    let size = img.size();
    let spots = [
        (0u64, 4096usize),
        (size / 3 + 1, 511),
        (size / 2 - 700, 140_000),
        ((2 << 20) - 512, 1024),
        (size - 512, 512),
        (size / 5, 1),
        (1000, 3000),
    ];
    for (i, (off, len)) in spots.into_iter().enumerate() {
        model.write(img, off, pattern(len, seed * 100 + i as u64)).await;
    }
}

#[tokio::test]
async fn our_dynamic_disks_equal_the_expected_bytes_under_qemu_img_compare() {
    crate::require!("qemu-img");
    let dir = tempfile::tempdir().expect("tempdir");
    for (i, block) in [DEFAULT_BLOCK_SIZE, KIB64, 4096].into_iter().enumerate() {
        let size = (10 << 20) + 3 * 512;
        let p = dir.path().join(format!("ours{i}.vhd"));
        let raw = dir.path().join(format!("ours{i}.raw"));
        create_dynamic(&p, size, block).expect("create");
        let mut model = Model::new(size);
        {
            let img = open_rw(&p).await;
            scribble(&img, &mut model, i as u64).await;
            img.flush().await.expect("flush");
        }
        assert_eq!(qemu_virtual_size(&p), size, "QEMU reads current_size for creator tap");
        model.save_raw(&raw);
        qemu_compare(&p, &raw);
        // And the judge can fail: one byte off is a difference.
        model.bytes[4096] ^= 1;
        model.save_raw(&raw);
        let st = Command::new("qemu-img")
            .args(["compare", "-q", "-f", "vpc"])
            .arg(&p)
            .args(["-F", "raw"])
            .arg(&raw)
            .status();
        assert_eq!(st.expect("qemu-img").code(), Some(1), "qemu-img compare must see the flipped byte");
    }
}

/// The size of a disk whose `current_size` and CHS geometry disagree depends on its creator;
/// QEMU is the judge, for Virtual PC's and QEMU's own creators, Hyper-V's, XenServer's,
/// Azure's and one no list knows.
#[tokio::test]
async fn the_virtual_size_follows_the_creator_as_in_qemu() {
    crate::require!("qemu-img");
    use tapmirror::image::vhd::format::{Chs, FOOTER_LEN, Footer};
    let dir = tempfile::tempdir().expect("tempdir");
    for creator in [*b"vpc ", *b"qemu", *b"win ", *b"tap\0", *b"wa\0\0", *b"zzzz"] {
        let p = dir.path().join("creator.vhd");
        let _ = std::fs::remove_file(&p);
        run(Command::new("qemu-img").args(["create", "-q", "-f", "vpc", "-o", "force_size=on"]).arg(&p).arg("64M"));
        // 50 MiB by current_size, 370 × 16 × 17 sectors (about 49 MiB) by geometry; both copies
        // of the footer (a dynamic disk keeps one at 0 and one at the end).
        let f = std::fs::OpenOptions::new().read(true).write(true).open(&p).expect("open");
        let end = f.metadata().expect("stat").len() - FOOTER_LEN as u64;
        let mut b = vec![0u8; FOOTER_LEN];
        f.read_exact_at(&mut b, 0).expect("footer");
        let mut footer = Footer::parse(&b).expect("footer parses");
        footer.creator_app = creator;
        footer.current_size = 50 << 20;
        footer.geometry = Chs { cylinders: 370, heads: 16, sectors: 17 };
        for at in [0, end] {
            f.write_all_at(&footer.encode(), at).expect("write footer");
        }
        drop(f);
        let ours = vhd::info(&p).expect("info").virtual_size;
        assert_eq!(ours, qemu_virtual_size(&p), "creator {creator:?}");
        assert_eq!(open_ro(&p).await.size(), ours);
    }
}

#[tokio::test]
async fn vhds_written_by_qemu_read_back_byte_exact_and_take_our_writes() {
    crate::require!("qemu-img", "qemu-io");
    let dir = tempfile::tempdir().expect("tempdir");
    let src_raw = dir.path().join("src.raw");
    std::fs::write(&src_raw, {
        let mut v = vec![0u8; 7 << 20];
        v[(1 << 20)..(3 << 20)].copy_from_slice(&pattern(2 << 20, 7));
        v
    })
    .expect("raw");
    let cases: Vec<(&str, Vec<String>)> = vec![
        ("create", vec!["create".into(), "-f".into(), "vpc".into(), "{}".into(), "10M".into()]),
        (
            "force_size",
            vec![
                "create".into(),
                "-f".into(),
                "vpc".into(),
                "-o".into(),
                "force_size=on".into(),
                "{}".into(),
                "10M".into(),
            ],
        ),
        (
            "convert",
            vec![
                "convert".into(),
                "-f".into(),
                "raw".into(),
                "-O".into(),
                "vpc".into(),
                "-o".into(),
                "subformat=dynamic".into(),
                src_raw.display().to_string(),
                "{}".into(),
            ],
        ),
    ];
    for (name, args) in cases {
        let p = dir.path().join(format!("{name}.vhd"));
        let args: Vec<String> = args.into_iter().map(|a| if a == "{}" { p.display().to_string() } else { a }).collect();
        run(Command::new("qemu-img").args(&args));
        for cmd in
            ["write -P 0xab 0 64k", "write -P 0x11 1M 3k", "write -P 0x5a 4000000 512", "write -P 0x77 2095616 8192"]
        {
            run(Command::new("qemu-io").args(["-f", "vpc", "-c", cmd]).arg(&p));
        }
        let raw = dir.path().join(format!("{name}.raw"));
        run(Command::new("qemu-img").args(["convert", "-f", "vpc", "-O", "raw"]).arg(&p).arg(&raw));
        let expected = std::fs::read(&raw).expect("raw");
        let qsize = qemu_virtual_size(&p);
        let info = vhd::info(&p).expect("info");
        {
            let img = open_ro(&p).await;
            assert_eq!(img.size(), qsize, "{name}: size as QEMU sees it ({:?})", info.size_source);
            same(&read_all(&img).await, &expected, &format!("{name}: content"));
        }
        if name == "force_size" {
            assert_eq!(qsize, 10 << 20);
        } else if name == "create" {
            assert_ne!(qsize, 10 << 20, "qemu rounds up to a CHS size");
        }
        // Our writes into QEMU's file, judged by QEMU.
        let mut model = Model { bytes: expected };
        {
            let img = open_rw(&p).await;
            scribble(&img, &mut model, 9).await;
        }
        model.save_raw(&raw);
        qemu_compare(&p, &raw);
        check(&p).expect("check");
    }
}

/// The python that has pyvhdi, or `None` (skip; a failure under CI).
fn pyvhdi_python() -> Option<&'static str> {
    if !crate::harness::require_tool("python3") {
        return None;
    }
    for py in ["python3", "/usr/bin/python3"] {
        if Command::new(py).args(["-c", "import pyvhdi"]).output().is_ok_and(|o| o.status.success()) {
            return Some(py);
        }
    }
    if std::env::var_os("CI").is_some() {
        panic!("pyvhdi (python3-libvhdi) is required under CI");
    }
    eprintln!("skipping: pyvhdi (python3-libvhdi) not installed");
    None
}

/// Reads the chain `files` (base first) with libvhdi and returns the leaf's bytes. Reads stay
/// inside 64 KiB-aligned pieces: libvhdi 20210425 returns wrong data for a read that spans
/// several blocks of a differencing chain (1 MiB reads of a 64 KiB-block chain show parent data
/// where the leaf has sectors, while the same bytes read piece by piece are right).
fn pyvhdi_read(py: &str, files: &[PathBuf], out: &Path) -> Vec<u8> {
    let script = r#"
import sys, pyvhdi
out, paths = sys.argv[1], sys.argv[2:]
prev = None
files = []
for p in paths:
    f = pyvhdi.file()
    f.open(p)
    if prev is not None:
        f.set_parent(prev)
    files.append(f)
    prev = f
size = prev.get_media_size()
with open(out, "wb") as o:
    off = 0
    while off < size:
        n = min(65536 - off % 65536, size - off)
        o.write(prev.read_buffer_at_offset(n, off))
        off += n
"#;
    run(Command::new(py).arg("-c").arg(script).arg(out).args(files));
    std::fs::read(out).expect("pyvhdi output")
}

async fn chain_read_by_libvhdi(depth: usize, block: u32) {
    let Some(py) = pyvhdi_python() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let size = 6 << 20;
    let leaf = dir.path().join("vdi.vhd");
    create_dynamic(&leaf, size, block).expect("create");
    let mut model = Model::new(size);
    let mut frozen: Vec<(PathBuf, Vec<u8>)> = Vec::new();
    for level in 0..=depth {
        {
            let img = open_rw(&leaf).await;
            // Writes at every level: a big one, unaligned ones, single 512-byte sectors. Each
            // ends on a 4 KiB boundary or in the last sector of its 4 KiB: libvhdi 20210425
            // misreads a bitmap byte in which a clear bit follows a set one
            // (`libvhdi_block_descriptor_read_sector_bitmap_data` shifts without masking, so it
            // takes every sector after a set bit of the same byte as present), so those bytes
            // are avoided here; our own reads of such bitmaps are checked in the unit tests.
            let l = level as u64;
            let to_4k = |a: u64, n: u64| (a + n).div_ceil(4096) * 4096 - a;
            let a = (l * 331_777) % (size - 200_000);
            model.write(&img, a, pattern(to_4k(a, 150_000) as usize, l)).await;
            let a = (l * 97_003 + 13) % (size - 10_000);
            model.write(&img, a, pattern(to_4k(a, 700) as usize, l + 50)).await;
            model.write(&img, (((l * 7 + 3) % 1_500) * 8 + 7) * 512, pattern(512, l + 90)).await;
            model.write(&img, (((l * 13 + 5) % 1_500) * 8 + 6) * 512 + 256, pattern(512, l + 130)).await;
        }
        if level < depth {
            let f = dir.path().join(format!("snap{level}.vhd"));
            snapshot(&leaf, &f).expect("snapshot");
            frozen.push((f, model.bytes.clone()));
        }
    }
    let mut files: Vec<PathBuf> = frozen.iter().map(|(p, _)| p.clone()).collect();
    files.push(leaf.clone());
    assert_eq!(vhd::info(&leaf).expect("info").chain.len(), depth + 1);
    let got = pyvhdi_read(py, &files, &dir.path().join("out.raw"));
    same(&got, &model.bytes, &format!("libvhdi reading the depth-{depth} chain"));
    same(&read_all(&open_ro(&leaf).await).await, &model.bytes, "our reading of the chain");
    // A frozen snapshot in the middle still reads as it was when taken.
    let (mid, mid_bytes) = &frozen[frozen.len() / 2];
    let got = pyvhdi_read(py, &files[..=frozen.len() / 2], &dir.path().join("mid.raw"));
    same(&got, mid_bytes, &format!("libvhdi reading snapshot {}", mid.display()));
    check(&leaf).expect("check");
}

#[tokio::test]
async fn libvhdi_reads_a_chain_of_depth_1() {
    chain_read_by_libvhdi(1, DEFAULT_BLOCK_SIZE).await;
}

#[tokio::test]
async fn libvhdi_reads_a_chain_of_depth_4() {
    chain_read_by_libvhdi(4, KIB64).await;
}

#[tokio::test]
async fn libvhdi_reads_a_chain_of_depth_16() {
    chain_read_by_libvhdi(16, KIB64).await;
}

fn patch(p: &Path, off: u64, bytes: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(p).expect("open");
    f.write_all_at(bytes, off).expect("patch");
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

/// Table offset (from the header at 512) and BAT entries of a file we created.
fn bat_of(p: &Path) -> (u64, Vec<u32>) {
    let b = std::fs::read(p).expect("read");
    let toff = u64::from_be_bytes(b[528..536].try_into().expect("8 bytes"));
    let n = be32(&b, 512 + 28) as usize;
    (toff, (0..n).map(|i| be32(&b, toff as usize + 4 * i)).collect())
}

/// Recomputes a checksum field after a patch, so that only the intended fault remains.
fn fix_checksum(p: &Path, at: u64, len: usize, field: usize) {
    let mut b = vec![0u8; len];
    std::fs::File::open(p).expect("open").read_exact_at(&mut b, at).expect("read");
    let mut sum = 0u32;
    for (i, x) in b.iter().enumerate() {
        if !(field..field + 4).contains(&i) {
            sum = sum.wrapping_add(u32::from(*x));
        }
    }
    patch(p, at + field as u64, &(!sum).to_be_bytes());
}

/// Every corrupt case: the error kind and a piece of its message. The files must be unchanged
/// by every attempt to open, check or operate on them.
#[tokio::test]
async fn corrupt_inputs_get_a_clear_error_and_are_never_written() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let make = |name: &str| -> PathBuf {
        let p = d.join(name);
        create_dynamic(&p, 2 << 20, KIB64).expect("create");
        p
    };
    let base_fresh = make("template.vhd");
    {
        let img = open_rw(&base_fresh).await;
        img.write(0, Arc::new(IoBuf::from_vec(pattern(200_000, 1))), Durability::Cached).await.expect("write");
    }
    let template = std::fs::read(&base_fresh).expect("read");
    let (toff, bat) = bat_of(&base_fresh);
    let len = template.len() as u64;
    let end = len - 512;
    type Mutate = Box<dyn Fn(&Path)>;
    let cases: Vec<(&str, VhdErrorKind, &str, Mutate)> = vec![
        (
            "footer copy checksum",
            VhdErrorKind::Corrupt,
            "footer copy at offset 0: bad checksum",
            Box::new(|p| patch(p, 48, &[9])),
        ),
        (
            "header checksum",
            VhdErrorKind::Corrupt,
            "dynamic header at 512: bad checksum",
            Box::new(|p| patch(p, 512 + 200, &[9])),
        ),
        (
            "BAT entry past the end of file",
            VhdErrorKind::Corrupt,
            "past the end of file",
            Box::new(move |p| patch(p, toff + 8, &((end / 512) as u32 - 1).to_be_bytes())),
        ),
        (
            "BAT entries overlapping",
            VhdErrorKind::Corrupt,
            "overlaps block 0",
            Box::new(move |p| patch(p, toff + 4, &bat[0].to_be_bytes())),
        ),
        (
            "BAT entry over the metadata",
            VhdErrorKind::Corrupt,
            "overlaps the BAT",
            Box::new(move |p| patch(p, toff + 12, &((toff / 512) as u32).to_be_bytes())),
        ),
        (
            "block bitmap beyond the file",
            VhdErrorKind::Corrupt,
            "sector bitmap",
            Box::new(move |p| patch(p, toff + 12, &((end / 512) as u32 + 8).to_be_bytes())),
        ),
        (
            "truncated into a block",
            VhdErrorKind::Corrupt,
            "past the end of file",
            Box::new(move |p| {
                std::fs::OpenOptions::new().write(true).open(p).expect("open").set_len(end - 1000).expect("truncate")
            }),
        ),
        (
            "truncated into the header",
            VhdErrorKind::Corrupt,
            "truncated",
            Box::new(|p| {
                std::fs::OpenOptions::new().write(true).open(p).expect("open").set_len(1200).expect("truncate")
            }),
        ),
        (
            "BAT too small for the size",
            VhdErrorKind::Corrupt,
            "BAT too small",
            Box::new(|p| {
                patch(p, 512 + 28, &1u32.to_be_bytes());
                fix_checksum(p, 512, 1024, 36);
            }),
        ),
        (
            "block size not a power of two",
            VhdErrorKind::Corrupt,
            "block size",
            Box::new(|p| {
                patch(p, 512 + 32, &3000u32.to_be_bytes());
                fix_checksum(p, 512, 1024, 36);
            }),
        ),
    ];
    for (what, kind, msg, mutate) in cases {
        let p = d.join("victim.vhd");
        std::fs::write(&p, &template).expect("reset");
        mutate(&p);
        let before = std::fs::read(&p).expect("read");
        let e = VhdImage::open(&p, Access::ReadWrite, engine()).await.err().unwrap_or_else(|| panic!("{what}: opened"));
        assert_eq!(e.kind(), kind, "{what}: {e}");
        assert!(e.to_string().contains(msg) && e.to_string().contains("victim.vhd"), "{what}: unclear error: {e}");
        let e = check(&p).expect_err(what);
        assert!(e.to_string().contains(msg), "{what}: check says {e}");
        assert!(
            vhd::info(&p).is_err() && resize(&p, 4 << 20).is_err() && snapshot(&p, &d.join("snap.vhd")).is_err(),
            "{what}"
        );
        assert!(create_differencing(&d.join("kid.vhd"), &p).is_err(), "{what}");
        assert!(!d.join("snap.vhd").exists() && !d.join("kid.vhd").exists(), "{what}");
        assert!(std::fs::read(&p).expect("read") == before, "{what}: the file changed");
    }

    // Chains: missing parent, wrong parent UUID, parent loop.
    let base = d.join("a.vhd");
    std::fs::write(&base, &template).expect("copy");
    let b = d.join("b.vhd");
    let c = d.join("c.vhd");
    let x = d.join("x.vhd");
    create_differencing(&b, &base).expect("b");
    create_differencing(&c, &b).expect("c");
    create_differencing(&x, &c).expect("x");
    let snapshot_bytes = |ps: &[&PathBuf]| ps.iter().map(|p| std::fs::read(p).expect("read")).collect::<Vec<_>>();
    let expect_refused = |p: &Path, kind: VhdErrorKind, msg: &str, watch: &[&PathBuf]| {
        let before = snapshot_bytes(watch);
        let rt = tokio::runtime::Handle::current();
        let opened = std::thread::scope(|s| {
            s.spawn(|| rt.block_on(VhdImage::open(p, Access::ReadWrite, engine())).err()).join()
        });
        let e = opened.expect("thread").expect("must be refused");
        assert_eq!(e.kind(), kind, "{e}");
        assert!(e.to_string().contains(msg), "unclear error: {e}");
        assert!(check(p).is_err() && coalesce(p).is_err() && resize(p, 4 << 20).is_err());
        assert!(snapshot_bytes(watch) == before, "a refused chain was written");
    };
    // Missing parent: b's parent moves away.
    let moved = d.join("moved.vhd");
    std::fs::rename(&base, &moved).expect("move");
    expect_refused(&c, VhdErrorKind::MissingParent, "missing parent", &[&b, &c]);
    // Wrong parent UUID: another disk under the parent's name.
    create_dynamic(&base, 2 << 20, KIB64).expect("impostor");
    expect_refused(&c, VhdErrorKind::MissingParent, "wrong parent UUID", &[&b, &c]);
    std::fs::remove_file(&base).expect("rm");
    std::fs::rename(&moved, &base).expect("restore");
    check(&c).expect("sound again");
    // Parent loop: b's header and locators replaced by x's (same layout), so b -> c -> b.
    let xb = std::fs::read(&x).expect("read");
    patch(&b, 512, &xb[512..1536]);
    for i in 0..8 {
        let at = 512 + 576 + 24 * i;
        let (space, off) =
            (be32(&xb, at + 4) as usize, u64::from_be_bytes(xb[at + 16..at + 24].try_into().expect("8")));
        if be32(&xb, at) != 0 {
            patch(&b, off, &xb[off as usize..off as usize + space]);
        }
    }
    expect_refused(&b, VhdErrorKind::Corrupt, "parent loop", &[&b, &c]);
}

/// Operations keep content, judged by QEMU where it can read the result.
#[tokio::test]
async fn resize_and_coalesce_keep_content_under_qemu_img_compare() {
    crate::require!("qemu-img");
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    for (name, reserve) in [("moved", None), ("reserved", Some(64u64 << 20))] {
        let p = d.join(format!("{name}.vhd"));
        match reserve {
            None => create_dynamic(&p, 3 << 20, KIB64).expect("create"),
            Some(r) => create_dynamic_reserved(&p, 3 << 20, KIB64, r).expect("create"),
        }
        let mut model = Model::new(3 << 20);
        {
            let img = open_rw(&p).await;
            scribble(&img, &mut model, 3).await;
        }
        resize(&p, 9 << 20).expect("resize");
        model.bytes.resize(9 << 20, 0);
        {
            let img = open_rw(&p).await;
            scribble(&img, &mut model, 4).await;
        }
        let raw = d.join(format!("{name}.raw"));
        model.save_raw(&raw);
        assert_eq!(qemu_virtual_size(&p), 9 << 20);
        qemu_compare(&p, &raw);
        check(&p).expect("check");
    }
    // Coalesce a 3-deep chain step by step into the base, which QEMU can then read.
    let base = d.join("base.vhd");
    create_dynamic(&base, 5 << 20, DEFAULT_BLOCK_SIZE).expect("create");
    let mut model = Model::new(5 << 20);
    {
        let img = open_rw(&base).await;
        scribble(&img, &mut model, 5).await;
    }
    let mid = d.join("mid.vhd");
    let top = d.join("top.vhd");
    create_differencing(&mid, &base).expect("mid");
    {
        let img = open_rw(&mid).await;
        scribble(&img, &mut model, 6).await;
    }
    create_differencing(&top, &mid).expect("top");
    {
        let img = open_rw(&top).await;
        scribble(&img, &mut model, 7).await;
        model.write(&img, 4 << 20, pattern(1 << 20, 8)).await;
    }
    coalesce(&top).expect("coalesce top");
    coalesce(&mid).expect("coalesce mid");
    let raw = d.join("chain.raw");
    model.save_raw(&raw);
    qemu_compare(&base, &raw);
    same(&read_all(&open_ro(&top).await).await, &model.bytes, "the leaf reads the same throughout");
}

// --- Crash test -------------------------------------------------------------------------------

const CRASH_ENV: &str = "TAPMIRROR_VHD_CRASH_WRITER";
const CRASH_SIZE: u64 = 32 << 20;
const CRASH_SLOT: u64 = 8 << 10;
const CRASH_WRITES: u64 = CRASH_SIZE / CRASH_SLOT;
const CRASH_INFLIGHT: usize = 4;

/// Write `k`: a disjoint, often unaligned range inside its own slot, and its bytes.
fn crash_write(k: u64) -> (u64, Vec<u8>) {
    let slot = (k * 37) % CRASH_WRITES; // 37 is odd, the slot count a power of two: a permutation
    let start = slot * CRASH_SLOT + (k % 5) * 100;
    let len = 300 + (k * 2_311) % (CRASH_SLOT - 800);
    (start, pattern(len as usize, 10_000 + k))
}

/// Not a test on its own: the writer process of `a_writer_killed_at_random_moments_...`, which
/// spawns this test binary with `TAPMIRROR_VHD_CRASH_WRITER=<image>:<log>:<first write>`.
#[test]
fn crash_writer_child() {
    let Ok(spec) = std::env::var(CRASH_ENV) else { return };
    let mut parts = spec.split(':');
    let (Some(image), Some(log), Some(first)) = (parts.next(), parts.next(), parts.next()) else {
        panic!("bad {CRASH_ENV}: {spec}");
    };
    let first: u64 = first.parse().expect("first write");
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    rt.block_on(async {
        // The killed predecessor's lock goes with its io_uring, which the kernel tears down a
        // little after the process is reaped: more than the open's own 2 s grace on a loaded
        // host (a CI run once). That wait is not what this test is about.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        let img = loop {
            match VhdImage::open_with(Path::new(image), Access::ReadWrite, engine(), CrashSafety::PowerLoss).await {
                Err(e) if e.kind() == VhdErrorKind::Busy && std::time::Instant::now() < deadline => {
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
                r => break Arc::new(r.expect("open")),
            }
        };
        let log = Arc::new(std::fs::OpenOptions::new().append(true).open(log).expect("log"));
        // A flush covers this process's writes only: those of a killed one may be lost.
        std::io::Write::write_all(&mut &*log, format!("b {first}\n").as_bytes()).expect("log");
        let mut k = first;
        while k < CRASH_WRITES {
            let mut tasks = Vec::new();
            for k in k..(k + CRASH_INFLIGHT as u64).min(CRASH_WRITES) {
                let (img, log) = (Arc::clone(&img), Arc::clone(&log));
                tasks.push(tokio::spawn(async move {
                    let (off, data) = crash_write(k);
                    std::io::Write::write_all(&mut &*log, format!("s {k}\n").as_bytes()).expect("log");
                    img.write(off, Arc::new(IoBuf::from_vec(data)), Durability::Cached).await.expect("write");
                    std::io::Write::write_all(&mut &*log, format!("d {k}\n").as_bytes()).expect("log");
                }));
            }
            for t in tasks {
                t.await.expect("join");
            }
            k += CRASH_INFLIGHT as u64;
            // Every write before k is now durable: the guest's contract is flush.
            img.flush().await.expect("flush");
            std::io::Write::write_all(&mut &*log, format!("f {k}\n").as_bytes()).expect("log");
        }
    });
}

#[test]
fn a_writer_killed_at_random_moments_leaves_a_sound_image_with_old_or_new_sectors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = dir.path().join("base.vhd");
    let leaf = dir.path().join("leaf.vhd");
    let log = dir.path().join("writes.log");
    // The writers' stderr, so that a failure shows why.
    let child_log = dir.path().join("writer.stderr");
    // The old content: a base with data in some places; the writer writes into a child.
    create_dynamic(&base, CRASH_SIZE, KIB64).expect("create");
    let mut old = vec![0u8; CRASH_SIZE as usize];
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let img = open_rw(&base).await;
        for i in 0..8u64 {
            let off = i * (4 << 20) + 4096;
            let data = pattern(300_000, i);
            old[off as usize..off as usize + data.len()].copy_from_slice(&data);
            img.write(off, Arc::new(IoBuf::from_vec(data)), Durability::Cached).await.expect("write");
        }
    });
    create_differencing(&leaf, &base).expect("child");
    std::fs::write(&log, "").expect("log");
    let seed =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1)
            | 1;
    eprintln!("crash test seed {seed}");
    let mut rng = seed;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut first = 0u64;
    let mut kills = 0;
    for round in 0..8 {
        let last_round = round == 7;
        // /proc/self/exe: still this binary even if cargo replaced the file meanwhile.
        let mut child = Command::new("/proc/self/exe")
            .args(["vhd::crash_writer_child", "--exact", "--nocapture", "--test-threads=1"])
            .env(CRASH_ENV, format!("{}:{}:{first}", leaf.display(), log.display()))
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&child_log).expect("writer's log"))
            .spawn()
            .expect("spawn writer");
        if last_round {
            let status = child.wait().expect("wait");
            let said = std::fs::read_to_string(&child_log).unwrap_or_default();
            assert!(status.success(), "the final writer must finish (seed {seed}); it said:\n{said}");
        } else {
            std::thread::sleep(std::time::Duration::from_millis(5 + next() % 150));
            let _ = child.kill(); // SIGKILL
            let status = child.wait().expect("wait");
            kills += usize::from(status.code().is_none());
        }
        // Which writes started and which completed, from the writer's log.
        let text = std::fs::read_to_string(&log).expect("log");
        let mut started = std::collections::BTreeSet::new();
        let mut done = std::collections::BTreeSet::new();
        // Writes a completed flush covered: from its process's first write up to the flush.
        let mut flushed = std::collections::BTreeSet::new();
        let mut begun = 0u64;
        for line in text.lines() {
            match line.split_once(' ') {
                Some(("s", k)) => {
                    started.insert(k.parse::<u64>().expect("k"));
                }
                Some(("d", k)) => {
                    done.insert(k.parse::<u64>().expect("k"));
                }
                Some(("b", k)) => begun = k.parse::<u64>().expect("k"),
                Some(("f", k)) => flushed.extend(begun..k.parse::<u64>().expect("k")),
                _ => {}
            };
        }
        eprintln!("round {round}: {} writes started, {} completed, {} flushed", started.len(), done.len(), flushed.len());
        let report = check(&leaf).unwrap_or_else(|e| panic!("round {round} (seed {seed}): check failed: {e}"));
        assert!(report.warnings().is_empty(), "round {round}: {:?}", report.warnings());
        let got = rt.block_on(async { read_all(&open_ro(&leaf).await).await });
        for k in 0..CRASH_WRITES {
            let (off, data) = crash_write(k);
            let end = off + data.len() as u64;
            let s0 = off / 512 * 512;
            let s1 = end.div_ceil(512) * 512;
            for s in (s0..s1).step_by(512) {
                let r = s as usize..s as usize + 512;
                let (g, o) = (&got[r.clone()], &old[r]);
                // The sector as the write leaves it: old bytes around the written ones.
                let mut n = o.to_vec();
                let (a, b) = (s.max(off), (s + 512).min(end));
                n[(a - s) as usize..(b - s) as usize].copy_from_slice(&data[(a - off) as usize..(b - off) as usize]);
                let n = &n[..];
                if done.contains(&k) && flushed.contains(&k) {
                    assert!(g == n, "round {round} (seed {seed}): write {k} completed and flushed but the sector at byte {s} is not new");
                } else if started.contains(&k) {
                    assert!(
                        g == o || g == n,
                        "round {round} (seed {seed}): the sector at byte {s} of write {k} is torn or garbage"
                    );
                } else {
                    assert!(g == o, "round {round} (seed {seed}): the sector at byte {s} of unstarted write {k} changed");
                }
            }
        }
        // Bytes outside every write keep the old content.
        let mut covered = vec![false; CRASH_SIZE as usize / 512];
        for k in 0..CRASH_WRITES {
            let (off, data) = crash_write(k);
            for s in off / 512..(off + data.len() as u64).div_ceil(512) {
                covered[s as usize] = true;
            }
        }
        for (s, c) in covered.iter().enumerate() {
            if !c {
                assert!(
                    got[s * 512..s * 512 + 512] == old[s * 512..s * 512 + 512],
                    "round {round}: untouched sector {s} changed"
                );
            }
        }
        if last_round {
            assert!((first..CRASH_WRITES).all(|k| done.contains(&k)), "the final writer left writes undone");
        }
        // The next writer carries on after the last started write (in-flight ones stay as they are).
        first = started.iter().next_back().map_or(0, |k| k + 1).max(first);
    }
    assert!(kills > 0, "no writer was killed mid-run; the test proved nothing");
}

#[test]
fn is_vhd_recognises_our_files_and_not_others() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("d.vhd");
    create_dynamic(&p, 1 << 20, KIB64).expect("create");
    let head = std::fs::read(&p).expect("read");
    assert!(vhd::is_vhd(&head[..512]));
    assert!(!vhd::is_vhd(&pattern(512, 1)));
    assert!(!vhd::is_vhd(b"conecti"));
}
