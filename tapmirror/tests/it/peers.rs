//! Our NBD server against real peer clients: nbdinfo, qemu-io, qemu-img, nbdcopy and fio.
//!
//! Every test checks bytes (the image file, or what a peer read back), not only exit codes.

use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::{Proc, Served, pattern, run, serve, serve_file, tapmirror};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

// ---------------------------------------------------------------------------------------------
// Local helpers
// ---------------------------------------------------------------------------------------------

/// Runs `cmd`, which must succeed, and returns its stdout as text.
fn stdout_of(cmd: &mut Command) -> String {
    String::from_utf8(run(cmd).stdout).expect("stdout is UTF-8")
}

/// Runs `cmd`, which must fail (non-zero exit), and returns its output.
fn run_fails(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    assert!(
        !out.status.success(),
        "{cmd:?} succeeded but should have failed:\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Byte comparison that reports the first difference instead of dumping megabytes.
#[track_caller]
fn assert_bytes(actual: &[u8], expected: &[u8], what: &str) {
    assert_eq!(actual.len(), expected.len(), "{what}: length differs");
    if let Some(i) = actual.iter().zip(expected).position(|(a, b)| a != b) {
        let end = (i + 16).min(actual.len());
        let last = actual.iter().zip(expected).rposition(|(a, b)| a != b).unwrap_or(i);
        panic!(
            "{what}: bytes differ from offset {i} (last difference at {last}): got {:02x?}, want {:02x?}",
            &actual[i..end],
            &expected[i..end]
        );
    }
}

/// Writes `data` at `offset` of the file at `path` (which must exist).
fn write_at(path: &Path, offset: u64, data: &[u8]) {
    let mut f = std::fs::OpenOptions::new().write(true).open(path).expect("open for writing");
    f.seek(SeekFrom::Start(offset)).expect("seek");
    f.write_all(data).expect("write");
}

/// A temporary folder holding a sparse image of `size` bytes, with `pieces` written into it.
fn image_with(size: u64, pieces: &[(u64, &[u8])]) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("disk.raw");
    std::fs::File::create(&image).and_then(|f| f.set_len(size)).expect("create image");
    for &(offset, data) in pieces {
        write_at(&image, offset, data);
    }
    (dir, image)
}

/// 16 MiB of pattern data with a zeroed 4 MiB middle (so copies meet both data and zeroes).
fn source_data(seed: u64) -> Vec<u8> {
    let mut data = pattern((16 * MIB) as usize, seed);
    data[(4 * MIB) as usize..(8 * MIB) as usize].fill(0);
    data
}

/// The export's entry in `nbdinfo --json`.
fn nbdinfo_export(uri: &str) -> Value {
    let text = stdout_of(Command::new("nbdinfo").arg("--json").arg(uri));
    let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("nbdinfo --json output: {e}\n{text}"));
    let exports = v["exports"].as_array().expect("exports array");
    assert_eq!(exports.len(), 1, "one export: {v}");
    assert_eq!(v["structured"], Value::Bool(true), "structured replies: {v}");
    exports[0].clone()
}

/// An extent map entry: offset, length, kind ("data", "zero", "hole" or "hole-data").
type Extent = (u64, u64, String);

/// Merges adjacent extents of one kind and checks they tile `[0, size)`.
fn normalise(map: Vec<Extent>, size: u64, what: &str) -> Vec<Extent> {
    let mut out: Vec<Extent> = Vec::new();
    let mut end = 0;
    for (offset, length, kind) in map {
        assert_eq!(offset, end, "{what}: extents must be contiguous");
        assert!(length > 0, "{what}: empty extent at {offset}");
        end = offset + length;
        match out.last_mut() {
            Some(last) if last.2 == kind => last.1 += length,
            _ => out.push((offset, length, kind)),
        }
    }
    assert_eq!(end, size, "{what}: extents must cover the export");
    out
}

/// The kind names `tapmirror info` uses, by `base:allocation` flags.
fn kind_of(flags: u32) -> &'static str {
    match flags & 3 {
        0 => "data",
        1 => "hole-data",
        2 => "zero",
        _ => "hole",
    }
}

/// `nbdinfo --map`: lines of `offset length type description`.
fn nbdinfo_map(uri: &str, size: u64) -> Vec<Extent> {
    let text = stdout_of(Command::new("nbdinfo").arg("--map").arg(uri));
    let map = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            assert!(cols.len() >= 4, "nbdinfo --map line {line:?}");
            let num = |s: &str| s.parse::<u64>().unwrap_or_else(|e| panic!("{s:?} in {line:?}: {e}"));
            let flags = num(cols[2]) as u32;
            let expected_description = match flags {
                0 => "data",
                2 => "zero",
                3 => "hole,zero",
                _ => "",
            };
            if !expected_description.is_empty() {
                assert_eq!(cols[3], expected_description, "description in {line:?}");
            }
            (num(cols[0]), num(cols[1]), kind_of(flags).to_string())
        })
        .collect();
    normalise(map, size, "nbdinfo --map")
}

/// `tapmirror info URI` as JSON.
fn tapmirror_info(uri: &str) -> Value {
    let text = stdout_of(Command::new(tapmirror()).arg("info").arg(uri));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("tapmirror info output: {e}\n{text}"))
}

/// The map of `tapmirror info URI`.
fn tapmirror_map(uri: &str, size: u64) -> Vec<Extent> {
    let v = tapmirror_info(uri);
    let map = v["map"]
        .as_array()
        .unwrap_or_else(|| panic!("tapmirror info has no map: {v}"))
        .iter()
        .map(|e| {
            (
                e["offset"].as_u64().expect("offset"),
                e["length"].as_u64().expect("length"),
                e["type"].as_str().expect("type").to_string(),
            )
        })
        .collect();
    normalise(map, size, "tapmirror info")
}

/// The map we expect: `data` over `ranges` (sorted, disjoint), `hole` elsewhere.
fn expected_map(size: u64, ranges: &[(u64, u64)]) -> Vec<Extent> {
    let mut map = Vec::new();
    let mut at = 0;
    for &(offset, length) in ranges {
        if offset > at {
            map.push((at, offset - at, "hole".to_string()));
        }
        map.push((offset, length, "data".to_string()));
        at = offset + length;
    }
    if at < size {
        map.push((at, size - at, "hole".to_string()));
    }
    normalise(map, size, "expected map")
}

/// Compares extent maps, showing the first difference rather than thousands of entries.
#[track_caller]
fn assert_map(actual: &[Extent], want: &[Extent], what: &str) {
    if actual == want {
        return;
    }
    if actual.len() + want.len() <= 40 {
        panic!("{what}:\n  got  {actual:?}\n  want {want:?}");
    }
    let i = actual.iter().zip(want).position(|(a, b)| a != b).unwrap_or(actual.len().min(want.len()));
    panic!(
        "{what}: {} extents, want {}; first difference at entry {i}: got {:?}, want {:?}",
        actual.len(),
        want.len(),
        actual.get(i),
        want.get(i)
    );
}

/// A `qemu-io` command on the export with one `-c` per command.
fn qemu_io(uri: &str, cmds: &[String]) -> Command {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw", uri]);
    for cmd in cmds {
        c.arg("-c").arg(cmd);
    }
    c
}

/// Runs `nbdcopy` with `args`; returns its stderr (with `--verbose`, its plan).
fn nbdcopy(args: &[&str]) -> String {
    let out = run(Command::new("nbdcopy").args(args));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Polls until `cond` holds, failing after `secs` seconds.
fn wait_until(secs: u64, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// SIGTERM must end the server with status 0 and remove its socket.
fn assert_clean_exit(served: &mut Served) {
    let status = served.proc.terminate();
    assert!(status.success(), "tapmirror serve exited with {status} after SIGTERM");
    assert!(!served.socket.exists(), "socket {} left behind", served.socket.display());
}

// ---------------------------------------------------------------------------------------------
// 1. nbdinfo --json: what we advertise
// ---------------------------------------------------------------------------------------------

#[test]
fn nbdinfo_json_reports_size_flags_and_block_sizes() {
    crate::require!("nbdinfo");
    let served = serve(16 * MIB, &[]);
    let e = nbdinfo_export(&served.uri());
    assert_eq!(e["export-size"].as_u64(), Some(16 * MIB), "{e}");
    assert_eq!(e["export-name"].as_str(), Some(""), "{e}");
    for flag in ["can_flush", "can_fua", "can_trim", "can_zero", "can_fast_zero", "can_multi_conn", "can_df"] {
        assert_eq!(e[flag], Value::Bool(true), "{flag} in {e}");
    }
    assert_eq!(e["is_read_only"], Value::Bool(false), "{e}");
    let contexts: Vec<&str> =
        e["contexts"].as_array().expect("contexts").iter().map(|c| c.as_str().expect("context name")).collect();
    assert!(contexts.contains(&"base:allocation"), "contexts {contexts:?}");
    assert_eq!(e["block_size_minimum"].as_u64(), Some(1), "{e}");
    assert_eq!(e["block_size_preferred"].as_u64(), Some(4096), "{e}");
    assert_eq!(e["block_size_maximum"].as_u64(), Some(33_554_432), "{e}");
    let description = e["description"].as_str().expect("description");
    assert!(description.starts_with("tapmirror "), "description {description:?}");
}

#[test]
fn read_only_export_is_advertised_and_enforced() {
    crate::require!("nbdinfo", "qemu-io", "nbdcopy");
    let content = pattern((16 * MIB) as usize, 11);
    let (dir, image) = image_with(16 * MIB, &[(0, &content)]);
    let served = serve_file(dir, image, &["--read-only"]);
    let uri = served.uri();

    let e = nbdinfo_export(&uri);
    assert_eq!(e["is_read_only"], Value::Bool(true), "{e}");
    for flag in ["can_trim", "can_zero", "can_fast_zero"] {
        assert_eq!(e[flag], Value::Bool(false), "{flag} in {e}");
    }
    // Reading and flushing stay allowed.
    assert_eq!(e["can_flush"], Value::Bool(true), "{e}");

    // qemu refuses to open a read-only export read-write; nbdcopy refuses it as a destination.
    run_fails(&mut qemu_io(&uri, &["write -P 0x77 0 4096".into()]));
    let src = served.dir.path().join("src.raw");
    std::fs::write(&src, vec![0x77u8; MIB as usize]).expect("write source");
    run_fails(Command::new("nbdcopy").arg(&src).arg(&uri));
    assert_bytes(&served.contents(), &content, "read-only image after refused writes");

    // Reads work and return the file.
    run(Command::new("qemu-io").args(["-r", "-f", "raw", &uri, "-c", &format!("read -P {} 0 1", content[0])]));
    let dst = served.dir.path().join("dst.raw");
    nbdcopy(&[&uri, dst.to_str().expect("path")]);
    assert_bytes(&std::fs::read(&dst).expect("read copy"), &content, "nbdcopy out of a read-only export");
}

// ---------------------------------------------------------------------------------------------
// 2. Allocation map: nbdinfo --map, qemu-img map and tapmirror info agree with the file
// ---------------------------------------------------------------------------------------------

#[test]
fn allocation_map_matches_written_ranges() {
    crate::require!("nbdinfo");
    let size = 16 * MIB;
    // 64 KiB-aligned so the map is exact on any filesystem's block size.
    let ranges = [(0, 64 * KIB), (MIB, 192 * KIB), (8 * MIB - 64 * KIB, 128 * KIB), (size - 128 * KIB, 128 * KIB)];
    let datas: Vec<Vec<u8>> =
        ranges.iter().enumerate().map(|(i, &(_, len))| pattern(len as usize, 100 + i as u64)).collect();
    let pieces: Vec<(u64, &[u8])> = ranges.iter().zip(&datas).map(|(&(off, _), d)| (off, d.as_slice())).collect();
    let (dir, image) = image_with(size, &pieces);
    let served = serve_file(dir, image, &[]);
    let uri = served.uri();

    let want = expected_map(size, &ranges);
    assert_map(&nbdinfo_map(&uri, size), &want, "nbdinfo --map");
    assert_map(&tapmirror_map(&uri, size), &want, "tapmirror info map");

    // qemu-img map reads the same block status through qemu's NBD driver.
    if crate::harness::require_tool("qemu-img") {
        let text = stdout_of(Command::new("qemu-img").args(["map", "-f", "raw", "--output=json", &uri]));
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("qemu-img map: {e}\n{text}"));
        let map = v
            .as_array()
            .expect("qemu-img map array")
            .iter()
            .map(|e| {
                let data = e["data"].as_bool().expect("data");
                let zero = e["zero"].as_bool().expect("zero");
                assert!(data != zero, "qemu-img map entry neither data nor zero (or both): {e}");
                let kind = if data { "data" } else { "hole" };
                (e["start"].as_u64().expect("start"), e["length"].as_u64().expect("length"), kind.to_string())
            })
            .collect();
        assert_map(&normalise(map, size, "qemu-img map"), &want, "qemu-img map");
    }
}

#[test]
fn fragmented_allocation_map_is_complete() {
    crate::require!("nbdinfo", "nbdcopy");
    // Every other 4 KiB block is data: 8192 extents, more than one BLOCK_STATUS reply carries
    // (the raw image stops at 4096), so clients must ask again from where a reply ended.
    let size = 32 * MIB;
    let block = 4 * KIB;
    let ranges: Vec<(u64, u64)> = (0..size / block).step_by(2).map(|i| (i * block, block)).collect();
    let (dir, image) = image_with(size, &[]);
    let mut want_bytes = vec![0u8; size as usize];
    {
        let mut f = std::fs::OpenOptions::new().write(true).open(&image).expect("open image");
        for (n, &(offset, length)) in ranges.iter().enumerate() {
            let byte = (n % 255 + 1) as u8;
            let chunk = &mut want_bytes[offset as usize..(offset + length) as usize];
            chunk.fill(byte);
            f.seek(SeekFrom::Start(offset)).expect("seek");
            f.write_all(chunk).expect("write");
        }
    }
    use std::os::unix::fs::MetadataExt;
    let exact = std::fs::metadata(&image).expect("stat image").blksize() == block;
    let served = serve_file(dir, image, &[]);
    let uri = served.uri();

    if exact {
        let want = expected_map(size, &ranges);
        assert_eq!(want.len(), 8192);
        assert_map(&nbdinfo_map(&uri, size), &want, "nbdinfo --map of a fragmented image");
        assert_map(&tapmirror_map(&uri, size), &want, "tapmirror info of a fragmented image");
    } else {
        eprintln!("file system blocks are not 4 KiB: not checking the exact map");
    }
    // Reads that mix data and hole chunks in one structured reply.
    let dst = served.dir.path().join("dst.raw");
    nbdcopy(&[&uri, dst.to_str().expect("path")]);
    assert_bytes(&std::fs::read(&dst).expect("read copy"), &want_bytes, "nbdcopy out of a fragmented image");
}

// ---------------------------------------------------------------------------------------------
// 3. qemu-io: aligned and unaligned writes, zeroes, unmap, FUA
// ---------------------------------------------------------------------------------------------

#[test]
fn qemu_io_writes_reads_and_zeroes() {
    crate::require!("qemu-io");
    let size = 16 * MIB;
    let served = serve(size, &[]);
    let uri = served.uri();
    let random = pattern(70_000, 3);
    let random_file = served.dir.path().join("random.bin");
    std::fs::write(&random_file, &random).expect("write pattern file");

    let mut want = vec![0u8; size as usize];
    let mut fill = |offset: u64, len: u64, byte: u8| want[offset as usize..(offset + len) as usize].fill(byte);
    let writes: Vec<String> = vec![
        "write -P 0x11 0 512".into(),
        "write -P 0x22 512 4096".into(),
        "write -P 0x33 100 1000".into(),
        "write -P 0x44 1048577 12345".into(),
        format!("write -s {} 2097155 70000", random_file.display()),
        "write -z 4100 3000".into(),
        "write -z -u 1048576 8192".into(),
        "write -f -P 0x55 3145728 65536".into(),
        "write -z -u 3149824 4096".into(),
        "write -P 0x66 16773120 4096".into(),
        // An unmap of a fully aligned 1 MiB inside data.
        "write -P 0x77 5242880 2097152".into(),
        "write -z -u 6291456 1048576".into(),
    ];
    fill(0, 512, 0x11);
    fill(512, 4096, 0x22);
    fill(100, 1000, 0x33);
    fill(1_048_577, 12_345, 0x44);
    fill(4100, 3000, 0);
    fill(1_048_576, 8192, 0);
    fill(3_145_728, 65_536, 0x55);
    fill(3_149_824, 4096, 0);
    fill(16_773_120, 4096, 0x66);
    fill(5_242_880, 2_097_152, 0x77);
    fill(6_291_456, 1_048_576, 0);
    want[2_097_155..2_097_155 + 70_000].copy_from_slice(&random);

    let reads: Vec<String> = [
        "read -P 0x11 0 100",
        "read -P 0x33 100 1000",
        "read -P 0x22 1100 3000",
        "read -P 0 4100 1052668",
        "read -P 0x44 1056768 4154",
        "read -P 0 1060922 1036233",
        "read -P 0 2167155 978573",
        "read -P 0x55 3145728 4096",
        "read -P 0 3149824 4096",
        "read -P 0x55 3153920 57344",
        "read -P 0 3211264 2031616",
        "read -P 0x77 5242880 1048576",
        "read -P 0 6291456 10481664",
        "read -P 0x66 16773120 4096",
    ]
    .map(String::from)
    .to_vec();
    // Self-check of the hand-written reads against the model.
    for r in &reads {
        let f: Vec<&str> = r.split_whitespace().collect();
        let byte = u8::from_str_radix(f[2].trim_start_matches("0x"), if f[2].starts_with("0x") { 16 } else { 10 })
            .expect("pattern byte");
        let (off, len): (usize, usize) = (f[3].parse().expect("offset"), f[4].parse().expect("length"));
        assert!(want[off..off + len].iter().all(|&b| b == byte), "test model disagrees with {r:?}");
    }

    run(&mut qemu_io(&uri, &writes));
    run(&mut qemu_io(&uri, &reads));
    // qemu-io's pattern check really checks: a wrong pattern fails.
    run_fails(&mut qemu_io(&uri, &["read -P 0x99 100 1000".into()]));
    assert_bytes(&served.contents(), &want, "image after qemu-io writes");
}

// ---------------------------------------------------------------------------------------------
// 4. qemu-img convert into and out of the export
// ---------------------------------------------------------------------------------------------

#[test]
fn qemu_img_convert_into_and_out_of_export() {
    crate::require!("qemu-img");
    let served = serve(16 * MIB, &[]);
    let uri = served.uri();
    let data = source_data(21);
    let src = served.dir.path().join("src.raw");
    let dst = served.dir.path().join("dst.raw");
    std::fs::write(&src, &data).expect("write source");

    // -W -m 16: up to 16 requests in flight on the connection, completing out of order.
    run(Command::new("qemu-img")
        .args(["convert", "-n", "-W", "-m", "16", "-f", "raw", "-O", "raw"])
        .arg(&src)
        .arg(&uri));
    assert_bytes(&served.contents(), &data, "image after qemu-img convert into the export");
    // qemu-img compare reads through the export (with block status) and agrees...
    run(Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw", &uri]).arg(&src));
    // ...and notices one changed byte in the zeroed middle.
    let mut changed = data.clone();
    changed[(6 * MIB) as usize + 12_345] = 1;
    std::fs::write(&src, &changed).expect("rewrite source");
    let out = run_fails(Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw", &uri]).arg(&src));
    assert_eq!(out.status.code(), Some(1), "qemu-img compare exit status 1 means 'images differ'");
    // The zeroed middle was not written as data: the export stays sparse there.
    let map = tapmirror_map(&uri, 16 * MIB);
    let (lo, hi) = (4 * MIB, 8 * MIB);
    for (offset, length, kind) in &map {
        if *offset < hi && offset + length > lo {
            assert_ne!(kind, "data", "zeroes of the source became data in the export: {map:?}");
        }
    }

    run(Command::new("qemu-img").args(["convert", "-f", "raw", "-O", "raw", &uri]).arg(&dst));
    assert_bytes(&std::fs::read(&dst).expect("read copy"), &data, "qemu-img convert out of the export");
}

// ---------------------------------------------------------------------------------------------
// 5. nbdcopy: both directions, multi-conn, TCP
// ---------------------------------------------------------------------------------------------

fn nbdcopy_round_trip(served: &Served, uri: &str, seed: u64, extra: &[&str]) -> String {
    let data = source_data(seed);
    let src = served.dir.path().join(format!("src{seed}.raw"));
    let dst = served.dir.path().join(format!("dst{seed}.raw"));
    std::fs::write(&src, &data).expect("write source");
    let src = src.to_str().expect("path");
    let dst = dst.to_str().expect("path");

    let mut args: Vec<&str> = extra.to_vec();
    args.extend([src, uri]);
    let log_in = nbdcopy(&args);
    assert_bytes(&served.contents(), &data, &format!("image after nbdcopy {extra:?} into {uri}"));

    let mut args: Vec<&str> = extra.to_vec();
    args.extend([uri, dst]);
    let log_out = nbdcopy(&args);
    assert_bytes(&std::fs::read(dst).expect("read copy"), &data, &format!("nbdcopy {extra:?} out of {uri}"));
    log_in + &log_out
}

#[test]
fn nbdcopy_into_and_out_of_export() {
    crate::require!("nbdcopy");
    let mut served = serve(16 * MIB, &[]);
    let uri = served.uri();
    nbdcopy_round_trip(&served, &uri, 31, &[]);
    // Again over different data, with a flush at the end and a single synchronous connection.
    nbdcopy_round_trip(&served, &uri, 32, &["--flush", "--synchronous"]);
    assert_clean_exit(&mut served);
}

#[test]
fn nbdcopy_multi_conn() {
    crate::require!("nbdcopy");
    let served = serve(16 * MIB, &[]);
    let uri = served.uri();
    // nbdcopy caps connections at threads (which default to the CPU count): ask for both.
    let log = nbdcopy_round_trip(&served, &uri, 41, &["--verbose", "--connections=4", "--threads=4", "--requests=16"]);
    // nbdcopy drops to one connection unless the server offers multi-conn.
    let plans: Vec<&str> = log.lines().filter(|l| l.starts_with("nbdcopy: connections=")).collect();
    assert_eq!(plans.len(), 2, "nbdcopy --verbose plan lines: {plans:?}");
    for p in plans {
        assert!(p.starts_with("nbdcopy: connections=4 "), "nbdcopy did not use 4 connections: {p:?}");
    }
}

#[test]
fn nbdcopy_over_tcp() {
    crate::require!("nbdcopy", "nbdinfo");
    let mut served = serve(16 * MIB, &["--listen", "127.0.0.1:0"]);
    let tcp = served.tcp_uri();
    assert_eq!(nbdinfo_export(&tcp)["export-size"].as_u64(), Some(16 * MIB));
    nbdcopy_round_trip(&served, &tcp, 51, &[]);
    nbdcopy_round_trip(&served, &tcp, 52, &["--connections=2", "--threads=2"]);
    // The Unix socket serves the same image at the same time.
    let dst = served.dir.path().join("unix.raw");
    nbdcopy(&[&served.uri(), dst.to_str().expect("path")]);
    assert_bytes(&std::fs::read(&dst).expect("read copy"), &source_data(52), "nbdcopy over the Unix socket");
    assert_clean_exit(&mut served);
}

// ---------------------------------------------------------------------------------------------
// 6. fio with verification, on both I/O engines
// ---------------------------------------------------------------------------------------------

/// fio's JSON report of one job, read from `--output` (fio also prints to stdout).
fn fio_job(cmd: &mut Command, report: &Path) -> Value {
    cmd.arg("--output-format=json").arg(format!("--output={}", report.display()));
    run(cmd);
    let text = std::fs::read_to_string(report).expect("read fio report");
    let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("fio report: {e}\n{text}"));
    v["jobs"][0].clone()
}

fn fio_randwrite_verify(engine: &str) {
    let size = 16 * MIB;
    let mut served = serve(size, &["--io-engine", engine]);
    let dir = served.dir.path().to_path_buf();
    let job = ["--name=peers", "--rw=randwrite", "--bs=4k", "--size=16M", "--verify=crc32c"];

    // fio leaves verify state files in its working folder: keep them in the temporary one.
    let j = fio_job(
        Command::new("fio")
            .current_dir(&dir)
            .args(job)
            .args(["--ioengine=nbd", "--iodepth=16", "--do_verify=1"])
            .arg(format!("--uri={}", served.uri())),
        &dir.join("nbd.json"),
    );
    assert_eq!(j["error"].as_i64(), Some(0), "fio error: {j}");
    assert_eq!(j["write"]["io_bytes"].as_u64(), Some(size), "fio wrote the whole export: {}", j["write"]);
    // The verify phase read every block back through the server.
    assert_eq!(j["read"]["io_bytes"].as_u64(), Some(size), "fio verified the whole export: {}", j["read"]);
    assert_clean_exit(&mut served);

    // The file itself holds what fio wrote: verify it without the server.
    let j = fio_job(
        Command::new("fio")
            .current_dir(&dir)
            .args(job)
            .args(["--ioengine=psync", "--verify_only"])
            .arg(format!("--filename={}", served.image.display())),
        &dir.join("file.json"),
    );
    assert_eq!(j["error"].as_i64(), Some(0), "fio verify of the image file: {j}");
    assert_eq!(j["read"]["io_bytes"].as_u64(), Some(size), "fio verified the whole file: {}", j["read"]);
}

#[test]
fn fio_verify_uring_engine() {
    crate::require!("fio");
    fio_randwrite_verify("uring");
}

#[test]
fn fio_verify_portable_engine() {
    crate::require!("fio");
    fio_randwrite_verify("portable");
}

// ---------------------------------------------------------------------------------------------
// 7. Several peers at once
// ---------------------------------------------------------------------------------------------

#[test]
fn concurrent_writers_on_disjoint_ranges() {
    crate::require!("qemu-io", "nbdcopy");
    let size = 16 * MIB;
    let served = serve(size, &[]);
    let uri = served.uri();
    // Odd-sized chunks, dealt round-robin to three writers so their requests interleave.
    const CHUNK: u64 = 49_999;
    const WRITERS: u64 = 3;
    let chunks = size / CHUNK;
    let mut want = vec![0u8; size as usize];
    let mut commands: Vec<Vec<String>> = vec![Vec::new(); WRITERS as usize];
    for i in 0..chunks {
        let byte = (i % 251 + 1) as u8;
        let offset = i * CHUNK;
        want[offset as usize..(offset + CHUNK) as usize].fill(byte);
        commands[(i % WRITERS) as usize].push(format!("aio_write -q -P {byte} {offset} {CHUNK}"));
    }
    let mut procs: Vec<Proc> = commands
        .iter()
        .map(|cmds| {
            let mut all = cmds.clone();
            all.push("aio_flush".into());
            let child =
                qemu_io(&uri, &all).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn qemu-io");
            Proc(Some(child))
        })
        .collect();
    for p in &mut procs {
        let out = p.0.take().expect("child").wait_with_output().expect("wait qemu-io");
        assert!(
            out.status.success(),
            "qemu-io writer failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_bytes(&served.contents(), &want, "image after concurrent qemu-io writers");

    // Read back concurrently through the server over several connections.
    let readers: Vec<(PathBuf, Proc)> = (0..2)
        .map(|n| {
            let dst = served.dir.path().join(format!("read{n}.raw"));
            let child = Command::new("nbdcopy")
                .args(["--connections=2", "--threads=2", &uri])
                .arg(&dst)
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn nbdcopy");
            (dst, Proc(Some(child)))
        })
        .collect();
    for (dst, mut p) in readers {
        let out = p.0.take().expect("child").wait_with_output().expect("wait nbdcopy");
        assert!(out.status.success(), "nbdcopy reader failed: {}", String::from_utf8_lossy(&out.stderr));
        assert_bytes(&std::fs::read(&dst).expect("read copy"), &want, "concurrent nbdcopy reader");
    }
}

// ---------------------------------------------------------------------------------------------
// 8. SIGTERM
// ---------------------------------------------------------------------------------------------

#[test]
fn sigterm_after_writes_exits_zero_and_removes_socket() {
    crate::require!("qemu-io");
    let mut served = serve(16 * MIB, &[]);
    run(&mut qemu_io(&served.uri(), &["write -P 0xa5 65536 131072".into()]));
    assert!(served.socket.exists(), "socket exists while serving");
    assert_clean_exit(&mut served);
    let mut want = vec![0u8; (16 * MIB) as usize];
    want[65_536..65_536 + 131_072].fill(0xa5);
    assert_bytes(&served.contents(), &want, "image after SIGTERM");
}

#[test]
fn sigterm_with_an_idle_client_connected_exits_promptly() {
    crate::require!("qemu-io");
    let mut served = serve(16 * MIB, &[]);
    // A client that writes, then keeps its connection open for a long while.
    let client = qemu_io(&served.uri(), &["write -P 0x5a 0 65536".into(), "sleep 20000".into()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn qemu-io");
    let _client = Proc(Some(client));
    let image = served.image.clone();
    wait_until(10, "qemu-io's write to reach the image", || {
        std::fs::read(&image).map(|d| d[..65_536].iter().all(|&b| b == 0x5a)).unwrap_or(false)
    });
    let started = Instant::now();
    assert_clean_exit(&mut served);
    assert!(started.elapsed() < Duration::from_secs(5), "SIGTERM took {:?} with a client connected", started.elapsed());
    let data = served.contents();
    assert!(data[..65_536].iter().all(|&b| b == 0x5a), "write kept after SIGTERM");
}

#[test]
fn sigterm_during_heavy_io_exits_promptly() {
    crate::require!("fio");
    let mut served = serve(64 * MIB, &[]);
    let dir = served.dir.path().to_path_buf();
    // Reads and 64 KiB writes, 32 in flight, until the server goes away.
    let fio = Command::new("fio")
        .current_dir(&dir)
        .args(["--name=busy", "--ioengine=nbd", "--rw=randrw", "--bs=64k", "--size=64M", "--iodepth=32"])
        .args(["--time_based", "--runtime=30"])
        .arg(format!("--uri={}", served.uri()))
        .arg(format!("--output={}", dir.join("busy.json").display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn fio");
    let mut fio = Proc(Some(fio));
    std::thread::sleep(Duration::from_millis(1000));
    let fio_running = fio.0.as_mut().expect("fio").try_wait().expect("try_wait").is_none();
    assert!(fio_running, "fio should still be running its 30 s workload");
    let started = Instant::now();
    assert_clean_exit(&mut served);
    assert!(started.elapsed() < Duration::from_secs(5), "SIGTERM under load took {:?}", started.elapsed());
    // fio loses its server and gives up well before its 30 s.
    let mut child = fio.0.take().expect("fio");
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().expect("try_wait").is_none() {
        assert!(Instant::now() < deadline, "fio kept running after the server exited");
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------------------------
// Limits: maximum-size requests, trims and zeroes in the map
// ---------------------------------------------------------------------------------------------

#[test]
fn maximum_size_requests_at_odd_offsets() {
    crate::require!("qemu-io", "nbdcopy");
    let size = 64 * MIB;
    let served = serve(size, &[]);
    let uri = served.uri();
    // qemu splits at block_size_maximum (32 MiB): these are requests of exactly MAX_PAYLOAD.
    run(&mut qemu_io(
        &uri,
        &[
            "write -P 0x12 1 33554432".into(),
            "write -P 0x13 33554433 33554431".into(),
            "read -P 0x12 1 33554432".into(),
            "read -P 0x13 33554433 33554431".into(),
            "read -P 0 0 1".into(),
        ],
    ));
    let mut want = vec![0x12u8; size as usize];
    want[0] = 0;
    want[33_554_433..].fill(0x13);
    assert_bytes(&served.contents(), &want, "image after 32 MiB writes");

    // nbdcopy with its largest request size, both ways.
    let data = pattern(size as usize, 61);
    let src = served.dir.path().join("src.raw");
    let dst = served.dir.path().join("dst.raw");
    std::fs::write(&src, &data).expect("write source");
    nbdcopy(&["--request-size=33554432", src.to_str().expect("path"), &uri]);
    assert_bytes(&served.contents(), &data, "image after nbdcopy --request-size=32M");
    nbdcopy(&["--request-size=33554432", &uri, dst.to_str().expect("path")]);
    assert_bytes(&std::fs::read(&dst).expect("read copy"), &data, "nbdcopy --request-size=32M out of the export");
}

#[test]
fn trims_and_unmapping_zeroes_leave_holes() {
    crate::require!("qemu-io", "nbdinfo");
    let size = 16 * MIB;
    let served = serve(size, &[]);
    let uri = served.uri();
    run(&mut qemu_io(
        &uri,
        &[
            "write -P 0x41 8M 4M".into(),
            // NBD_CMD_TRIM
            "discard 9M 1M".into(),
            // NBD_CMD_WRITE_ZEROES without NO_HOLE, then with FAST_ZERO too
            "write -z -u 10M 512k".into(),
            "write -z -n -u 10752k 512k".into(),
            "flush".into(),
            "read -P 0x41 8M 1M".into(),
            "read -P 0 9M 2M".into(),
            "read -P 0x41 11M 1M".into(),
        ],
    ));
    let want_map = expected_map(size, &[(8 * MIB, MIB), (11 * MIB, MIB)]);
    assert_map(&nbdinfo_map(&uri, size), &want_map, "nbdinfo --map after trim and zeroes");
    let mut want = vec![0u8; size as usize];
    want[(8 * MIB) as usize..(9 * MIB) as usize].fill(0x41);
    want[(11 * MIB) as usize..(12 * MIB) as usize].fill(0x41);
    assert_bytes(&served.contents(), &want, "image after trim and zeroes");
}

// ---------------------------------------------------------------------------------------------
// 9. Export names
// ---------------------------------------------------------------------------------------------

#[test]
fn export_name_selects_and_unknown_names_fail() {
    crate::require!("nbdinfo", "qemu-io");
    let mut served = serve(16 * MIB, &["--export-name", "disk0"]);
    let sock = served.socket.display().to_string();
    let named = format!("nbd+unix:///disk0?socket={sock}");
    let wrong = format!("nbd+unix:///nope?socket={sock}");

    let e = nbdinfo_export(&named);
    assert_eq!(e["export-name"].as_str(), Some("disk0"), "{e}");
    assert_eq!(e["export-size"].as_u64(), Some(16 * MIB), "{e}");

    let list = stdout_of(Command::new("nbdinfo").args(["--list", &served.uri()]));
    assert!(list.contains("export=\"disk0\""), "nbdinfo --list: {list}");

    let out = run_fails(Command::new("nbdinfo").arg(&wrong));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("nope"), "nbdinfo error names the export: {err}");
    run_fails(&mut qemu_io(&wrong, &["read 0 512".into()]));

    // The server still serves, by name and by the empty name.
    run(&mut qemu_io(&named, &["write -P 0x3c 4096 4096".into()]));
    run(&mut qemu_io(&served.uri(), &["read -P 0x3c 4096 4096".into()]));
    assert_eq!(nbdinfo_export(&named)["export-name"].as_str(), Some("disk0"));
    let mut want = vec![0u8; (16 * MIB) as usize];
    want[4096..8192].fill(0x3c);
    assert_bytes(&served.contents(), &want, "image after writes by export name");
    assert_clean_exit(&mut served);
}

// ---------------------------------------------------------------------------------------------
// Regressions: bugs these tests found, fixed
// ---------------------------------------------------------------------------------------------

/// Runs `cmd`, killing it after `secs` seconds: its output, or `None` on timeout.
fn run_with_deadline(cmd: &mut Command, secs: u64) -> Option<Output> {
    let child =
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let mut proc = Proc(Some(child));
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if proc.0.as_mut().expect("child").try_wait().expect("try_wait").is_some() {
            return Some(proc.0.take().expect("child").wait_with_output().expect("collect output"));
        }
        if Instant::now() > deadline {
            return None; // dropping `proc` kills it
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// qemu's NBD driver asks for block status one extent at a time (`NBD_CMD_FLAG_REQ_ONE`), from
/// the current offset to the end of the disk. The server once computed up to 4096 extents (two
/// `lseek`s each) per such request and dropped all but the first: quadratic in the number of
/// extents (~10 million `lseek`s and 15-70 s for this 8192-extent image; qemu-nbd: 0.2 s). Now
/// it computes one. The deadline only guards against a hang; the check is the copy's bytes.
#[test]
fn qemu_img_convert_of_a_fragmented_image_copies_every_extent() {
    crate::require!("qemu-img");
    let size = 32 * MIB;
    let block = 4 * KIB;
    let (dir, image) = image_with(size, &[]);
    for i in (0..size / block).step_by(2) {
        write_at(&image, i * block, &[0xee; 4096]);
    }
    let served = serve_file(dir, image.clone(), &[]);
    let dst = served.dir.path().join("dst.raw");
    let out = run_with_deadline(
        Command::new("qemu-img").args(["convert", "-f", "raw", "-O", "raw", &served.uri()]).arg(&dst),
        120,
    )
    .expect("qemu-img convert of 32 MiB (8192 extents) hung");
    assert!(out.status.success(), "qemu-img convert: {}", String::from_utf8_lossy(&out.stderr));
    assert_bytes(&std::fs::read(&dst).expect("read copy"), &std::fs::read(&image).expect("read image"), "copy");
}

/// A raw client: negotiates with `NBD_OPT_GO` and returns the stream in transmission.
fn raw_client_in_transmission(socket: &Path) -> std::os::unix::net::UnixStream {
    use std::io::Read;
    let mut s = std::os::unix::net::UnixStream::connect(socket).expect("connect");
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).expect("greeting");
    s.write_all(&3u32.to_be_bytes()).expect("client flags"); // FIXED_NEWSTYLE | NO_ZEROES
    let mut go = b"IHAVEOPT".to_vec();
    go.extend_from_slice(&7u32.to_be_bytes()); // NBD_OPT_GO
    go.extend_from_slice(&6u32.to_be_bytes());
    go.extend_from_slice(&[0; 6]); // empty name, no info requests
    s.write_all(&go).expect("NBD_OPT_GO");
    loop {
        let mut h = [0u8; 20];
        s.read_exact(&mut h).expect("option reply");
        let kind = u32::from_be_bytes(h[12..16].try_into().expect("4 bytes"));
        let len = u32::from_be_bytes(h[16..20].try_into().expect("4 bytes"));
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data).expect("option reply data");
        if kind == 1 {
            return s; // NBD_REP_ACK
        }
        assert!(kind < 1 << 31, "NBD_OPT_GO refused: {kind:#x}");
    }
}

/// A client that stops halfway through a write's payload once held shutdown forever: the reader
/// awaited the payload without watching the shutdown token.
#[test]
fn sigterm_with_a_client_stalled_mid_write_exits_promptly() {
    let mut served = serve(16 * MIB, &[]);
    let mut s = raw_client_in_transmission(&served.socket);
    let mut req = Vec::new();
    req.extend_from_slice(&0x2560_9513u32.to_be_bytes());
    req.extend_from_slice(&0u16.to_be_bytes()); // flags
    req.extend_from_slice(&1u16.to_be_bytes()); // NBD_CMD_WRITE
    req.extend_from_slice(&1u64.to_be_bytes()); // cookie
    req.extend_from_slice(&0u64.to_be_bytes()); // offset
    req.extend_from_slice(&(MIB as u32).to_be_bytes());
    req.extend_from_slice(&[0x5a; 1000]); // 1000 of the 1 MiB promised
    s.write_all(&req).expect("send partial write");
    std::thread::sleep(Duration::from_millis(200));
    assert_clean_exit(&mut served); // fails if there is no exit within 10 s
    drop(s);
}

/// A client that connects and says nothing once held shutdown until the 30 s negotiation timeout.
#[test]
fn sigterm_with_a_client_silent_in_negotiation_exits_promptly() {
    let mut served = serve(16 * MIB, &[]);
    let s = std::os::unix::net::UnixStream::connect(&served.socket).expect("connect");
    std::thread::sleep(Duration::from_millis(200));
    assert_clean_exit(&mut served); // fails if there is no exit within 10 s
    drop(s);
}

// ---------------------------------------------------------------------------------------------
// 9. Connections passed by descriptor (`nbd-accept`), and the block sizes of VHD exports
// ---------------------------------------------------------------------------------------------

/// A destination host accepts the migration's HTTP connection and hands the socket to its
/// datapath: here a plain TCP listener of the test accepts qemu-io's connection and passes it
/// with `nbd-accept`. qemu-io, a real NBD client, then writes and reads through it.
#[test]
fn qemu_io_over_a_tcp_connection_passed_by_nbd_accept() {
    crate::require!("qemu-io");
    let ctl_dir = tempfile::tempdir().expect("tempdir");
    let ctl = ctl_dir.path().join("ctl.sock");
    let served = serve(16 * MIB, &["--control", ctl.to_str().expect("utf-8")]);
    let stats = || tapmirror::control::request(&ctl, &serde_json::json!({"cmd": "stats"}), None).expect("stats");
    let connections = stats()["connections"].as_u64().expect("connections");

    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("address").port();
    let uri = format!("nbd://127.0.0.1:{port}/");
    let mut writer = qemu_io(&uri, &["write -P 0x3c 1000 70000".into(), "read -P 0x3c 1000 70000".into(), "read -P 0 0 1000".into()]);
    let child = writer.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn qemu-io");
    let mut writer = Proc(Some(child));
    let (conn, _) = listener.accept().expect("accept qemu-io");
    let fd = std::os::fd::OwnedFd::from(conn);
    let answer = tapmirror::control::request(&ctl, &serde_json::json!({"cmd": "nbd-accept"}), Some(&fd)).expect("nbd-accept");
    assert_eq!(answer["ok"], true, "{answer}");
    assert_eq!(answer["socket"], "tcp", "{answer}");
    drop(fd);
    let deadline = Instant::now() + Duration::from_secs(60);
    let out = loop {
        if writer.0.as_mut().expect("child").try_wait().expect("try_wait").is_some() {
            break writer.0.take().expect("child").wait_with_output().expect("output");
        }
        assert!(Instant::now() < deadline, "qemu-io hung on the passed connection");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(out.status.success(), "qemu-io failed: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let mut want = vec![0u8; 16 * MIB as usize];
    want[1000..71_000].fill(0x3c);
    assert_bytes(&served.contents(), &want, "image after qemu-io over the passed connection");
    assert_eq!(stats()["connections"].as_u64(), Some(connections + 1), "the passed connection is counted");
}

/// A VHD export advertises 512-byte blocks; qemu-io honours that by completing a partial
/// sector itself (reading the export's own bytes), and a client that does not gets `EINVAL`
/// with nothing written.
#[test]
fn vhd_exports_take_whole_sectors_only() {
    crate::require!("qemu-io", "nbdinfo");
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("disk.vhd");
    run(Command::new(tapmirror()).args(["image", "create", "vhd"]).arg(&image).arg((16 * MIB).to_string()));
    let served = serve_file(dir, image, &[]);
    let uri = served.uri();
    let e = nbdinfo_export(&uri);
    assert_eq!(e["block_size_minimum"].as_u64(), Some(512), "{e}");
    assert_eq!(e["block_size_preferred"].as_u64(), Some(4096), "{e}");

    run(&mut qemu_io(&uri, &["write -P 0x21 0 4096".into(), "write -P 0x42 1000 3000".into()]));
    run(&mut qemu_io(&uri, &["read -P 0x21 0 1000".into(), "read -P 0x42 1000 3000".into(), "read -P 0x21 4000 96".into()]));

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let c = tapmirror::nbd::NbdClient::connect(&tapmirror::nbd::NbdUri::parse(&uri).expect("uri")).await.expect("connect");
        assert_eq!(c.info().block_size.minimum, 512);
        for (offset, len) in [(1000u64, 3000usize), (512, 100), (100, 512)] {
            let e = c.write(offset, vec![0x99u8; len], false).await.expect_err("an unaligned write must fail");
            assert_eq!(e.errno(), Some(tapmirror::nbd::proto::Errno::Inval), "write {offset}+{len}: {e}");
        }
        let e = c.write_zeroes(100, 512, false, false).await.expect_err("unaligned zeroes must fail");
        assert_eq!(e.errno(), Some(tapmirror::nbd::proto::Errno::Inval), "{e}");
        // The connection goes on, and nothing was written.
        c.write(4096, vec![0x77u8; 512], false).await.expect("an aligned write");
        let back = c.read(0, 8192).await.expect("read");
        let mut want = vec![0x21u8; 4096];
        want[1000..4000].fill(0x42);
        want.extend(std::iter::repeat_n(0x77u8, 512));
        want.extend(std::iter::repeat_n(0u8, 8192 - 4608));
        assert_bytes(&back, &want, "VHD export after refused writes");
    });
}
