//! Our NBD client against real servers: qemu-nbd, nbdkit (with fault-injecting filters) and
//! `tapmirror serve`, over Unix sockets, TCP and already connected descriptors.

use std::future::Future;
use std::net::TcpListener;
use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tapmirror::nbd::proto::{Errno, alloc_flags, tflags};
use tapmirror::nbd::{ClientError, ClientOptions, Endpoint, NbdClient, NbdUri, StatusExtent};

use crate::harness::{self, Proc, pattern, spawn_server};

const MIB: usize = 1 << 20;

/// Fails the test instead of hanging when `f` does not finish within 20 s.
async fn bounded<F: Future>(what: &str, f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(20), f).await.unwrap_or_else(|_| panic!("{what} hung for 20 s"))
}

/// A sparse file of `size` bytes in `dir`.
fn sparse_file(dir: &Path, size: u64) -> PathBuf {
    let path = dir.join("disk.raw");
    std::fs::File::create(&path).and_then(|f| f.set_len(size)).expect("create image");
    path
}

/// `qemu-nbd` serving `file` (raw, persistent, four connections, discard on) on a Unix socket.
fn qemu_nbd(dir: &Path, file: &Path) -> (Proc, PathBuf) {
    let socket = dir.join("qemu.sock");
    let proc = spawn_server(
        Command::new("qemu-nbd").args(["-f", "raw", "-t", "-e", "4", "--discard=unmap", "-k"]).arg(&socket).arg(file),
        &socket,
    );
    (proc, socket)
}

/// `nbdkit` in the foreground on a Unix socket with the given plugin, filters and parameters.
fn nbdkit(dir: &Path, args: &[&str]) -> (Proc, PathBuf) {
    let socket = dir.join("nbdkit.sock");
    let proc = spawn_server(Command::new("nbdkit").args(["-f", "--exit-with-parent", "-U"]).arg(&socket).args(args), &socket);
    (proc, socket)
}

async fn unix(socket: &Path) -> NbdClient {
    bounded("connect", NbdClient::connect_unix(socket, ClientOptions::default())).await.expect("connect")
}

async fn unix_with(socket: &Path, opts: ClientOptions) -> NbdClient {
    bounded("connect", NbdClient::connect_unix(socket, opts)).await.expect("connect")
}

/// Writes `data` at `offset` through the client and into `model`, then reads it back.
async fn write_check(c: &NbdClient, model: &mut [u8], offset: u64, data: Vec<u8>, fua: bool) {
    let at = offset as usize;
    let len = data.len();
    model[at..at + len].copy_from_slice(&data);
    bounded("write", c.write(offset, data, fua)).await.unwrap_or_else(|e| panic!("write {offset}+{len}: {e}"));
    let back = bounded("read", c.read(offset, len)).await.unwrap_or_else(|e| panic!("read {offset}+{len}: {e}"));
    assert!(back == model[at..at + len], "read-back of {offset}+{len} differs");
}

/// Reads the whole export in 4 MiB pieces and compares it with `model`.
async fn assert_reads(c: &NbdClient, model: &[u8]) {
    for at in (0..model.len()).step_by(4 * MIB) {
        let n = (model.len() - at).min(4 * MIB);
        let got = bounded("read", c.read(at as u64, n)).await.expect("read");
        assert!(got == model[at..at + n], "export bytes at {at}+{n} differ from the model");
    }
}

/// Writes of many sizes and alignments, each read back, then the whole export compared.
async fn sizes_and_alignments(c: &NbdClient, model: &mut [u8]) {
    let size = model.len() as u64;
    let cases: &[(u64, usize)] = &[
        (0, 512),
        (4096, 4096),
        (65536, 65536),
        (MIB as u64, MIB),
        (8 * MIB as u64, 4 * MIB),
        (3, 1),
        (511, 2),
        (4095, 4097),
        (12345, 54321),
        (16 * MIB as u64 + 7, MIB + 13),
        (size - 1000, 1000),
        (size - 1, 1),
    ];
    for (i, &(offset, len)) in cases.iter().enumerate() {
        write_check(c, model, offset, pattern(len, i as u64 + 1), i % 3 == 0).await;
    }
    // Reads that straddle several earlier writes and holes.
    for &(offset, len) in &[(0u64, 70_000usize), (4000, 200_000), (MIB as u64 - 1, 2 * MIB + 2), (size - 4 * MIB as u64, 4 * MIB)]
    {
        let got = bounded("read", c.read(offset, len)).await.expect("read");
        assert!(got == model[offset as usize..offset as usize + len], "read {offset}+{len} differs");
    }
}

/// 64 tasks writing disjoint unaligned ranges at once on one connection, then 64 reading back.
async fn many_in_flight(c: &NbdClient, model: &mut [u8], base: u64) {
    let mut tasks = Vec::new();
    let mut expect = Vec::new();
    for i in 0..64u64 {
        let offset = base + i * 256 * 1024 + i;
        let data = pattern(96 * 1024 + i as usize * 13, 1000 + i);
        model[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
        expect.push((offset, data.len()));
        let c = c.clone();
        tasks.push(tokio::spawn(async move { c.write(offset, data, false).await }));
    }
    for t in tasks {
        bounded("concurrent write", t).await.expect("join").expect("concurrent write");
    }
    let model = Arc::new(model.to_vec());
    let mut tasks = Vec::new();
    for (offset, len) in expect {
        let c = c.clone();
        let model = Arc::clone(&model);
        tasks.push(tokio::spawn(async move {
            let got = c.read(offset, len).await.expect("concurrent read");
            assert!(got == model[offset as usize..offset as usize + len], "concurrent read {offset}+{len} differs");
        }));
    }
    for t in tasks {
        bounded("concurrent read", t).await.expect("concurrent read task");
    }
}

/// Checks extents tile `[0, size)` exactly.
fn assert_tiles(map: &[StatusExtent], size: u64) {
    let mut at = 0;
    for e in map {
        assert_eq!(e.offset, at, "allocation map has a gap or overlap: {map:?}");
        assert!(e.length > 0);
        at += e.length;
    }
    assert_eq!(at, size, "allocation map does not cover the export");
}

/// The flags of the extent holding byte `at`.
fn flags_at(map: &[StatusExtent], at: u64) -> u32 {
    map.iter()
        .find(|e| e.offset <= at && at < e.offset + e.length)
        .map(|e| e.flags)
        .unwrap_or_else(|| panic!("no extent holds {at}"))
}

fn blocks(path: &Path) -> u64 {
    std::fs::metadata(path).expect("stat").blocks()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_nbd_reads_and_writes_of_many_sizes() {
    crate::require!("qemu-nbd");
    let dir = tempfile::tempdir().expect("tempdir");
    let file = sparse_file(dir.path(), 64 << 20);
    let (_q, socket) = qemu_nbd(dir.path(), &file);
    let c = unix(&socket).await;
    assert_eq!(c.size(), 64 << 20);
    assert!(c.info().structured);
    let mut model = vec![0u8; 64 << 20];
    sizes_and_alignments(&c, &mut model).await;
    bounded("flush", c.flush()).await.expect("flush");
    assert!(std::fs::read(&file).expect("read file") == model, "file differs from what was written");

    // Simple replies only (no structured replies negotiated) read the same bytes.
    let plain = unix_with(&socket, ClientOptions { structured: false, ..ClientOptions::default() }).await;
    assert!(!plain.info().structured);
    assert!(matches!(plain.block_status(0, 4096).await, Err(ClientError::Unsupported(_))));
    assert_reads(&plain, &model).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_nbd_many_requests_in_flight() {
    crate::require!("qemu-nbd");
    let dir = tempfile::tempdir().expect("tempdir");
    let file = sparse_file(dir.path(), 32 << 20);
    let (_q, socket) = qemu_nbd(dir.path(), &file);
    let c = unix(&socket).await;
    let mut model = vec![0u8; 32 << 20];
    many_in_flight(&c, &mut model, 4096).await;
    bounded("flush", c.flush()).await.expect("flush");
    assert!(std::fs::read(&file).expect("read file") == model, "file differs after concurrent writes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_nbd_zeroes_trim_and_allocation() {
    crate::require!("qemu-nbd");
    let dir = tempfile::tempdir().expect("tempdir");
    let size = 16u64 << 20;
    let file = sparse_file(dir.path(), size);
    let (_q, socket) = qemu_nbd(dir.path(), &file);
    let c = unix(&socket).await;
    assert!(c.info().base_allocation.is_some(), "qemu-nbd offers base:allocation");
    let mut model = vec![0u8; size as usize];

    // A fresh sparse file: one hole, reading as zeroes.
    let map = bounded("map", c.allocation_map()).await.expect("allocation map");
    assert_tiles(&map, size);
    assert!(map.iter().all(|e| e.flags == alloc_flags::HOLE | alloc_flags::ZERO), "sparse file not reported as a hole: {map:?}");

    write_check(&c, &mut model, 0, pattern(4 * MIB, 7), true).await;
    let map = bounded("map", c.allocation_map()).await.expect("allocation map");
    assert_tiles(&map, size);
    for at in [0, MIB as u64, 4 * MIB as u64 - 1] {
        assert_eq!(flags_at(&map, at) & alloc_flags::HOLE, 0, "written byte {at} reported as a hole: {map:?}");
    }
    for at in [4 * MIB as u64, 10 * MIB as u64, size - 1] {
        assert_eq!(flags_at(&map, at), alloc_flags::HOLE | alloc_flags::ZERO, "unwritten byte {at}: {map:?}");
    }

    // WRITE_ZEROES with NO_HOLE: zero bytes, nothing deallocated.
    let before = blocks(&file);
    bounded("zero", c.write_zeroes(0, MIB as u32, true, false)).await.expect("write_zeroes no_hole");
    model[..MIB].fill(0);
    assert!(blocks(&file) >= before, "NO_HOLE zeroing deallocated ({before} -> {} blocks)", blocks(&file));
    // Without NO_HOLE (and --discard=unmap): zero bytes, and the range may be (and with qemu on
    // a raw file is) punched.
    let before = blocks(&file);
    bounded("zero", c.write_zeroes(MIB as u64, MIB as u32, false, false)).await.expect("write_zeroes");
    model[MIB..2 * MIB].fill(0);
    assert!(blocks(&file) + 2048 <= before, "zeroing without NO_HOLE kept the blocks ({before} -> {})", blocks(&file));
    // TRIM: deallocated; qemu's raw driver punches a hole, which reads back as zeroes.
    let before = blocks(&file);
    bounded("trim", c.trim(2 * MIB as u64, MIB as u32)).await.expect("trim");
    model[2 * MIB..3 * MIB].fill(0);
    assert!(blocks(&file) + 2048 <= before, "trim kept the blocks ({before} -> {})", blocks(&file));
    bounded("flush", c.flush()).await.expect("flush");

    let status = bounded("status", c.block_status(MIB as u64, 2 * MIB as u32)).await.expect("block status");
    assert_eq!(status[0].offset, MIB as u64);
    assert!(status.iter().all(|e| e.flags & alloc_flags::ZERO != 0), "zeroed/trimmed range not reported zero: {status:?}");
    let status = bounded("status", c.block_status(3 * MIB as u64, MIB as u32)).await.expect("block status");
    assert_eq!(status[0].flags, 0, "data range not reported as data: {status:?}");
    assert_reads(&c, &model).await;
    assert!(std::fs::read(&file).expect("read file") == model);

    // Errors from the server map to errno and leave the connection usable.
    let e = bounded("read", c.read(size - 512, 1024)).await.expect_err("read past the end");
    assert_eq!(e.errno(), Some(Errno::Inval), "{e}");
    let e = bounded("write", c.write(size, vec![1u8; 512], false)).await.expect_err("write past the end");
    assert!(matches!(e.errno(), Some(Errno::NoSpc | Errno::Inval)), "{e}");
    assert_eq!(bounded("read", c.read(3 * MIB as u64, 4096)).await.expect("read after errors"), &model[3 * MIB..3 * MIB + 4096]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdkit_memory_every_operation() {
    crate::require!("nbdkit");
    let dir = tempfile::tempdir().expect("tempdir");
    let (_k, socket) = nbdkit(dir.path(), &["memory", "64M"]);
    let c = unix(&socket).await;
    let info = c.info().clone();
    assert_eq!(info.size, 64 << 20);
    assert!(info.structured, "nbdkit negotiates structured replies");
    assert!(info.base_allocation.is_some(), "nbdkit offers base:allocation");
    for (flag, name) in [
        (tflags::HAS_FLAGS, "HAS_FLAGS"),
        (tflags::SEND_FLUSH, "SEND_FLUSH"),
        (tflags::SEND_FUA, "SEND_FUA"),
        (tflags::SEND_TRIM, "SEND_TRIM"),
        (tflags::SEND_WRITE_ZEROES, "SEND_WRITE_ZEROES"),
        (tflags::SEND_FAST_ZERO, "SEND_FAST_ZERO"),
        (tflags::SEND_DF, "SEND_DF"),
        (tflags::CAN_MULTI_CONN, "CAN_MULTI_CONN"),
    ] {
        assert!(info.has(flag), "nbdkit memory should advertise {name}: {:#x}", info.flags);
    }
    assert!(!info.has(tflags::READ_ONLY));

    let mut model = vec![0u8; 64 << 20];
    sizes_and_alignments(&c, &mut model).await;
    many_in_flight(&c, &mut model, 40 << 20).await;

    // Zeroing in all three flavours, and trim (the memory plugin reads trimmed bytes as zero).
    bounded("zero", c.write_zeroes(0, 65536, false, false)).await.expect("write_zeroes");
    model[..65536].fill(0);
    bounded("zero", c.write_zeroes(65536, 65536, true, false)).await.expect("write_zeroes no_hole");
    model[65536..131072].fill(0);
    bounded("zero", c.write_zeroes(MIB as u64, MIB as u32, false, true)).await.expect("fast zero on memory");
    model[MIB..2 * MIB].fill(0);
    bounded("trim", c.trim(8 * MIB as u64, 4 * MIB as u32)).await.expect("trim");
    model[8 * MIB..12 * MIB].fill(0);
    bounded("flush", c.flush()).await.expect("flush");
    assert_reads(&c, &model).await;

    // Allocation: the trimmed and never-written ranges are holes, written ranges are data.
    let map = bounded("map", c.allocation_map()).await.expect("allocation map");
    assert_tiles(&map, 64 << 20);
    assert_eq!(flags_at(&map, 9 * MIB as u64), alloc_flags::HOLE | alloc_flags::ZERO, "{map:?}");
    assert_eq!(flags_at(&map, 30 * MIB as u64), alloc_flags::HOLE | alloc_flags::ZERO, "{map:?}");
    assert_eq!(flags_at(&map, 16 * MIB as u64 + 100) & alloc_flags::HOLE, 0, "{map:?}");
    assert_eq!(flags_at(&map, 40 * MIB as u64 + 100) & alloc_flags::HOLE, 0, "{map:?}");

    // A second connection sees the first one's writes (multi-conn), then both disconnect.
    let d = unix(&socket).await;
    assert_eq!(bounded("read", d.read(12345, 54321)).await.expect("read"), &model[12345..12345 + 54321]);
    d.disconnect().await.expect("disconnect");
    c.disconnect().await.expect("disconnect");
    // After NBD_CMD_DISC nothing more can be sent: an error, never a hang.
    assert!(bounded("read after disconnect", c.read(0, 512)).await.is_err());
}

/// A VHD export zeroes fast where nothing needs writing (a range of a fresh disk, as qemu-img
/// convert asks before it copies), and refuses FAST_ZERO where it would write zero sectors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vhd_export_zeroes_fast_only_where_nothing_is_written() {
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("fresh.vhd");
    harness::run(Command::new(harness::tapmirror()).args(["image", "create", "vhd"]).arg(&image).arg("64M"));
    let served = harness::serve_file(tempfile::tempdir().expect("tempdir"), image.clone(), &[]);
    let c = unix(&served.socket).await;
    assert!(c.info().has(tflags::SEND_FAST_ZERO));
    let before = std::fs::metadata(&image).expect("stat").len();
    bounded("fast zero of a fresh disk", c.write_zeroes(0, 64 << 20, false, true)).await.expect("fast zero of what reads as zeroes");
    assert_eq!(std::fs::metadata(&image).expect("stat").len(), before, "a fast zero wrote something");
    c.write(1 << 20, vec![0xaa; 8192], false).await.expect("write");
    let e = bounded("fast zero over data", c.write_zeroes(0, 2 << 20, false, true)).await.expect_err("fast zero over data");
    assert_eq!(e.errno(), Some(Errno::NotSup), "{e}");
    assert_eq!(c.read(1 << 20, 8192).await.expect("read"), vec![0xaa; 8192], "a refused fast zero changed data");
    bounded("zero", c.write_zeroes(0, 2 << 20, false, false)).await.expect("plain zero");
    assert_eq!(c.read(1 << 20, 8192).await.expect("read"), vec![0; 8192]);
    c.disconnect().await.expect("disconnect");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdkit_refused_fast_zero_is_enotsup() {
    crate::require!("nbdkit");
    let dir = tempfile::tempdir().expect("tempdir");
    let (_k, socket) = nbdkit(dir.path(), &["--filter=nozero", "memory", "16M", "zeromode=plugin", "fastzeromode=slow"]);
    let c = unix(&socket).await;
    assert!(c.info().has(tflags::SEND_FAST_ZERO));
    c.write(0, vec![0xaa; 8192], false).await.expect("write");
    let e = bounded("fast zero", c.write_zeroes(0, 8192, false, true)).await.expect_err("fast zero must be refused");
    assert_eq!(e.errno(), Some(Errno::NotSup), "{e}");
    // Refused means untouched; a slow zero then works on the same connection.
    assert_eq!(c.read(0, 8192).await.expect("read"), vec![0xaa; 8192]);
    bounded("zero", c.write_zeroes(0, 8192, false, false)).await.expect("plain zero");
    assert_eq!(c.read(0, 8192).await.expect("read"), vec![0; 8192]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdkit_failing_writes_are_eio_and_reads_still_work() {
    crate::require!("nbdkit");
    let dir = tempfile::tempdir().expect("tempdir");
    let (_k, socket) = nbdkit(
        dir.path(),
        &[
            "--filter=error",
            "memory",
            "16M",
            "error-pwrite=EIO",
            "error-pwrite-rate=100%",
            "error-zero=ENOSPC",
            "error-zero-rate=100%",
        ],
    );
    for structured in [true, false] {
        let c = unix_with(&socket, ClientOptions { structured, ..ClientOptions::default() }).await;
        assert_eq!(c.info().structured, structured);
        for len in [512, 65536, 4 * MIB] {
            match bounded("write", c.write(4096, pattern(len, 1), false)).await {
                Err(ClientError::Server { errno: Errno::Io, .. }) => {}
                other => panic!("write of {len} with error-pwrite=EIO: {other:?}"),
            }
        }
        match bounded("zero", c.write_zeroes(0, 4096, false, false)).await {
            Err(ClientError::Server { errno: Errno::NoSpc, .. }) => {}
            other => panic!("write_zeroes with error-zero=ENOSPC: {other:?}"),
        }
        // Many failing writes in flight do not wedge the connection.
        let tasks: Vec<_> = (0..32u64)
            .map(|i| {
                let c = c.clone();
                tokio::spawn(async move { c.write(i * 65536, vec![1u8; 65536], false).await })
            })
            .collect();
        for t in tasks {
            let r = bounded("failing write", t).await.expect("join");
            assert_eq!(r.expect_err("write must fail").errno(), Some(Errno::Io));
        }
        // Reads, trims and flushes are unaffected; nothing was written.
        assert_eq!(bounded("read", c.read(0, MIB)).await.expect("read still works"), vec![0u8; MIB]);
        bounded("trim", c.trim(0, 65536)).await.expect("trim still works");
        bounded("flush", c.flush()).await.expect("flush still works");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdkit_failing_reads_are_eio_and_writes_still_work() {
    crate::require!("nbdkit");
    let dir = tempfile::tempdir().expect("tempdir");
    let (_k, socket) = nbdkit(dir.path(), &["--filter=error", "memory", "16M", "error-pread=EIO", "error-pread-rate=100%"]);
    for structured in [true, false] {
        let c = unix_with(&socket, ClientOptions { structured, ..ClientOptions::default() }).await;
        for len in [1, 512, 300_000, 4 * MIB] {
            match bounded("read", c.read(0, len)).await {
                Err(ClientError::Server { errno: Errno::Io, message }) => {
                    // A structured error chunk may carry a message; a simple reply cannot.
                    if !structured {
                        assert_eq!(message, None);
                    }
                }
                other => panic!("read of {len} with error-pread=EIO: {:?}", other.map(|v| v.len())),
            }
        }
        bounded("write", c.write(0, vec![7u8; 65536], true)).await.expect("write still works");
        bounded("zero", c.write_zeroes(65536, 65536, false, false)).await.expect("zero still works");
        bounded("flush", c.flush()).await.expect("flush still works");
        if structured {
            let s = bounded("status", c.block_status(0, 4096)).await.expect("block status still works");
            assert_eq!(s[0].flags & alloc_flags::HOLE, 0);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_killed_mid_request_fails_pending_and_later_requests() {
    crate::require!("nbdkit");
    let dir = tempfile::tempdir().expect("tempdir");
    // Every read takes 10 s: the requests below are still pending when the server dies.
    let (mut k, socket) = nbdkit(dir.path(), &["--filter=delay", "memory", "16M", "delay-read=10"]);
    let c = unix(&socket).await;
    let pending: Vec<_> = (0..8u64)
        .map(|i| {
            let c = c.clone();
            tokio::spawn(async move { c.read(i * 4096, 4096).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    k.0.as_mut().expect("nbdkit running").kill().expect("kill nbdkit");
    for t in pending {
        let r = tokio::time::timeout(Duration::from_secs(5), t)
            .await
            .expect("a request pending when the server died hung")
            .expect("join");
        match r {
            Err(ClientError::Closed(_) | ClientError::Io(_)) => {}
            other => panic!("pending read after the server died: {:?}", other.map(|v| v.len())),
        }
    }
    assert!(started.elapsed() < Duration::from_secs(5));
    // Later requests fail at once.
    for _ in 0..3 {
        let r = tokio::time::timeout(Duration::from_secs(5), c.write(0, vec![1u8; 512], false))
            .await
            .expect("a request after the server died hung");
        assert!(matches!(r, Err(ClientError::Closed(_) | ClientError::Io(_))), "{r:?}");
    }
    assert!(tokio::time::timeout(Duration::from_secs(5), c.flush()).await.expect("flush hung").is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn from_fd_over_a_connected_unix_socket() {
    crate::require!("nbdkit");
    let dir = tempfile::tempdir().expect("tempdir");
    let (_k, socket) = nbdkit(dir.path(), &["memory", "16M"]);
    let stream = std::os::unix::net::UnixStream::connect(&socket).expect("connect");
    let fd: OwnedFd = stream.into();
    let c = bounded("from_fd", NbdClient::from_fd(fd, ClientOptions::default())).await.expect("from_fd");
    assert_eq!(c.size(), 16 << 20);
    assert!(c.info().structured);
    let mut model = vec![0u8; 16 << 20];
    write_check(&c, &mut model, 1000, pattern(70_000, 3), false).await;
    // The bytes are in the server, not in some local state: a second connection reads them.
    let d = unix(&socket).await;
    assert_eq!(d.read(1000, 70_000).await.expect("read"), &model[1000..71_000]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn from_fd_over_a_connected_tcp_socket() {
    let s = harness::serve(8 << 20, &["--listen", "127.0.0.1:0"]);
    let addr = s.tcp.expect("tcp address");
    let stream = std::net::TcpStream::connect(addr).expect("connect");
    let fd: OwnedFd = stream.into();
    let c = bounded("from_fd", NbdClient::from_fd(fd, ClientOptions::default())).await.expect("from_fd");
    let mut model = vec![0u8; 8 << 20];
    write_check(&c, &mut model, 4095, pattern(3 * MIB, 4), true).await;
    bounded("flush", c.flush()).await.expect("flush");
    assert!(s.contents() == model);

    // A descriptor that is not a socket is refused, not misused.
    let file: OwnedFd = std::fs::File::open(&s.image).expect("open").into();
    assert!(bounded("from_fd on a file", NbdClient::from_fd(file, ClientOptions::default())).await.is_err());
}

/// A TCP port that was free a moment ago.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_nbd_over_tcp() {
    crate::require!("qemu-nbd");
    let dir = tempfile::tempdir().expect("tempdir");
    let file = sparse_file(dir.path(), 32 << 20);
    let port = free_port();
    let child = Command::new("qemu-nbd")
        .args(["-f", "raw", "-t", "-e", "2", "-b", "127.0.0.1", "-p", &port.to_string()])
        .arg(&file)
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("spawn qemu-nbd");
    let _q = Proc(Some(child));
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "qemu-nbd did not listen on port {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let uri = NbdUri::parse(&format!("nbd://127.0.0.1:{port}/")).expect("uri");
    let c = bounded("connect", NbdClient::connect(&uri)).await.expect("connect over TCP");
    let mut model = vec![0u8; 32 << 20];
    write_check(&c, &mut model, 777, pattern(MIB + 1, 8), false).await;
    many_in_flight(&c, &mut model, 4 * MIB as u64).await;
    bounded("flush", c.flush()).await.expect("flush");
    assert!(std::fs::read(&file).expect("read file") == model);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_server_over_tcp_and_unix() {
    let s = harness::serve(48 << 20, &["--listen", "127.0.0.1:0"]);
    let tcp = bounded("connect", NbdClient::connect(&NbdUri::parse(&s.tcp_uri()).expect("uri"))).await.expect("connect tcp");
    let unix = bounded("connect", NbdClient::connect(&NbdUri::parse(&s.uri()).expect("uri"))).await.expect("connect unix");
    assert!(tcp.info().structured && tcp.info().base_allocation.is_some());
    assert_eq!(tcp.info().block_size.maximum, 32 << 20);
    let mut model = vec![0u8; 48 << 20];
    sizes_and_alignments(&tcp, &mut model).await;
    many_in_flight(&unix, &mut model, 20 << 20).await;
    bounded("flush", tcp.flush()).await.expect("flush");
    assert_reads(&unix, &model).await;
    assert!(s.contents() == model);

    // Zeroing and trimming through our server.
    bounded("zero", unix.write_zeroes(0, 65536, true, false)).await.expect("zero no_hole");
    bounded("zero", unix.write_zeroes(65536, 65536, false, true)).await.expect("fast zero");
    model[..131072].fill(0);
    bounded("trim", unix.trim(MIB as u64, MIB as u32)).await.expect("trim");
    model[MIB..2 * MIB].fill(0);
    assert_reads(&tcp, &model).await;

    // An unknown export name is refused during negotiation.
    let e = bounded(
        "connect",
        NbdClient::connect_with(
            &Endpoint::Unix(s.socket.clone()),
            ClientOptions { export: "nope".into(), ..ClientOptions::default() },
        ),
    )
    .await
    .err()
    .expect("unknown export must be refused");
    assert!(matches!(e, ClientError::Refused { .. }), "{e}");
    // Payloads over the server's maximum are refused before they reach the wire.
    assert!(matches!(tcp.read(0, (32 << 20) + 1).await, Err(ClientError::Unsupported(_))));
    assert!(matches!(tcp.write(0, vec![0u8; (32 << 20) + 1], false).await, Err(ClientError::Unsupported(_))));
    assert_eq!(tcp.read(0, 4096).await.expect("read"), &model[..4096]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_server_reads_with_holes_are_byte_exact() {
    let size = 16usize << 20;
    let s = harness::serve(size as u64, &[]);
    let c = unix(&s.socket).await;
    let plain = unix_with(&s.socket, ClientOptions { structured: false, ..ClientOptions::default() }).await;
    let mut model = vec![0u8; size];
    // Islands of data in a sparse image; unaligned edges so hole and data chunks meet mid-block.
    for (i, (at, len)) in
        [(0usize, 4096usize), (100_000, 5), (MIB + 3, 200_000), (5 * MIB - 1, 2), (9 * MIB, 3 * MIB + 7), (size - 4096, 4096)]
            .into_iter()
            .enumerate()
    {
        write_check(&c, &mut model, at as u64, pattern(len, 50 + i as u64), false).await;
    }
    // Reads of at least 64 KiB (split into data and hole chunks) at many alignments.
    let reads = [
        (0u64, size.min(32 << 20)),
        (1, 65536),
        (65536, 65536),
        (90_000, 100_000),
        (MIB as u64 - 10, 4 * MIB),
        (4 * MIB as u64, 8 * MIB),
        (size as u64 - MIB as u64, MIB),
    ];
    for &(at, len) in &reads {
        for client in [&c, &plain] {
            let got = bounded("read", client.read(at, len)).await.expect("read");
            assert!(
                got == model[at as usize..at as usize + len],
                "read {at}+{len} differs (structured={})",
                client.info().structured
            );
        }
    }
    // Trim punches holes in the middle of data; reads across them stay exact.
    bounded("trim", c.trim(9 * MIB as u64 + 4096, 8192)).await.expect("trim");
    model[9 * MIB + 4096..9 * MIB + 12288].fill(0);
    let got = bounded("read", c.read(9 * MIB as u64, 2 * MIB)).await.expect("read");
    assert!(got == model[9 * MIB..11 * MIB], "read across a trimmed hole differs");
    let map = bounded("map", c.allocation_map()).await.expect("map");
    assert_tiles(&map, size as u64);
    assert_eq!(flags_at(&map, 2 * MIB as u64) & alloc_flags::HOLE, alloc_flags::HOLE, "{map:?}");
    assert_eq!(flags_at(&map, 9 * MIB as u64) & alloc_flags::HOLE, 0, "{map:?}");
    assert!(s.contents() == model);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_length_reads_against_peers_do_not_hang() {
    crate::require!("qemu-nbd", "nbdkit");
    let dir = tempfile::tempdir().expect("tempdir");
    let file = sparse_file(dir.path(), 1 << 20);
    let (_q, qsock) = qemu_nbd(dir.path(), &file);
    let (_k, ksock) = nbdkit(dir.path(), &["memory", "1M"]);
    for socket in [&qsock, &ksock] {
        for structured in [true, false] {
            let c = unix_with(socket, ClientOptions { structured, ..ClientOptions::default() }).await;
            match bounded("zero-length read", c.read(4096, 0)).await {
                Ok(v) => assert!(v.is_empty()),
                Err(e) => assert!(e.errno().is_some(), "{e}"),
            }
            assert_eq!(bounded("read", c.read(0, 512)).await.expect("read after empty read"), vec![0u8; 512]);
        }
    }
}

/// A minimal fake server on `socket`: negotiates one 1 MiB export (structured replies
/// accepted, no meta context) and answers each request with `answer`.
fn fake_server(
    socket: &Path,
    answer: fn(&mut std::os::unix::net::UnixStream, tapmirror::nbd::proto::Request),
) -> std::thread::JoinHandle<()> {
    use std::io::{Read, Write};
    use tapmirror::nbd::proto::{self, Request, opt, rep};
    let listener = std::os::unix::net::UnixListener::bind(socket).expect("bind fake server");
    std::thread::spawn(move || {
        let Ok((mut s, _)) = listener.accept() else { return };
        let mut greeting = proto::NBD_MAGIC.to_be_bytes().to_vec();
        greeting.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
        greeting.extend_from_slice(&3u16.to_be_bytes());
        s.write_all(&greeting).expect("greeting");
        let mut flags = [0u8; 4];
        s.read_exact(&mut flags).expect("client flags");
        loop {
            let mut h = [0u8; proto::OPTION_HEADER_LEN];
            s.read_exact(&mut h).expect("option");
            let h = proto::OptionHeader::decode(&h).expect("option header");
            let mut data = vec![0u8; h.length as usize];
            s.read_exact(&mut data).expect("option data");
            if h.option == opt::GO {
                let info = proto::encode_info_export(1 << 20, tflags::HAS_FLAGS | tflags::SEND_FLUSH);
                s.write_all(&proto::encode_option_reply(h.option, rep::INFO, &info)).expect("info");
                s.write_all(&proto::encode_option_reply(h.option, rep::ACK, &[])).expect("ack");
                break;
            }
            s.write_all(&proto::encode_option_reply(h.option, rep::ACK, &[])).expect("ack");
        }
        loop {
            let mut h = [0u8; proto::REQUEST_LEN];
            if s.read_exact(&mut h).is_err() {
                return;
            }
            let req = Request::decode(&h).expect("request");
            if req.kind == proto::cmd::DISC {
                return;
            }
            answer(&mut s, req);
        }
    })
}

/// Regression: a structured READ reply that ends (DONE) without covering the range was once
/// accepted, and the uncovered bytes came back as zeroes. proto.md: "When no error is detected,
/// the server MUST send enough data chunks to cover the entire region". For a migration engine,
/// zeroes for data a buggy peer forgot to send would be silent corruption, so it is an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_rejects_a_read_reply_that_leaves_bytes_uncovered() {
    use std::io::Write;
    use tapmirror::nbd::proto::{self, chunk};
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("fake.sock");
    let server = fake_server(&socket, |s, req| {
        // Half the data, then a DONE chunk: the second half is never described.
        let half = (req.length / 2) as usize;
        let mut m = proto::encode_chunk_header(0, chunk::OFFSET_DATA, req.cookie, half as u32 + 8).to_vec();
        m.extend_from_slice(&req.offset.to_be_bytes());
        m.extend(std::iter::repeat_n(0xabu8, half));
        m.extend_from_slice(&proto::encode_chunk_header(chunk::FLAG_DONE, chunk::NONE, req.cookie, 0));
        s.write_all(&m).expect("reply");
    });
    let c = unix(&socket).await;
    assert!(c.info().structured);
    let r = bounded("read", c.read(0, 8192)).await;
    assert!(r.is_err(), "an incomplete READ reply was accepted: {:?}", r.map(|v| (v[0], v[8191])));
    let _ = c.disconnect().await;
    drop(c);
    let _ = server.join();
}

/// The answer timeout counts silence while requests wait, not idleness: a client left alone
/// for twice the limit still works; a server slower than the limit per request, but answering
/// one request after another inside it, keeps the connection; one that holds a request past it
/// fails every request, saying why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answer_timeout_counts_silence_not_idleness() {
    crate::require!("nbdkit");
    let dir = tempfile::tempdir().expect("tempdir");
    let file = sparse_file(dir.path(), 16 * MIB as u64);
    let limit = Duration::from_millis(1000);
    let opts = ClientOptions { answer_timeout: Some(limit), ..ClientOptions::default() };

    // Each write held 0.3 s, eight in flight, served by one thread one after another: 2.4 s
    // in all, far past the limit, but the server is never silent for 1 s.
    let (_slow, slow_socket) = nbdkit(dir.path(), &["--filter=delay", "--threads=1", "file", &file.display().to_string(), "delay-write=300ms"]);
    let c = unix_with(&slow_socket, opts.clone()).await;
    tokio::time::sleep(limit * 2).await;
    let writes: Vec<_> = (0..8u64)
        .map(|i| {
            let c = c.clone();
            tokio::spawn(async move { c.write(i * 4096, vec![7u8; 4096], false).await })
        })
        .collect();
    for w in writes {
        bounded("slow write", w).await.expect("join").expect("a slow server that keeps answering must keep the connection");
    }

    // A write held 10 s: silence past the limit.
    let dir2 = tempfile::tempdir().expect("tempdir");
    let file2 = sparse_file(dir2.path(), 16 * MIB as u64);
    let (_stalled, stalled_socket) = nbdkit(dir2.path(), &["--filter=delay", "file", &file2.display().to_string(), "delay-write=10"]);
    let c = unix_with(&stalled_socket, opts).await;
    let started = Instant::now();
    let err = bounded("stalled write", c.write(0, vec![7u8; 4096], false)).await.expect_err("a silent server's write must fail");
    assert!(err.to_string().contains("answered nothing for"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(9), "the write waited for the server rather than the limit");
    let later = bounded("write after the timeout", c.write(0, vec![7u8; 4096], false)).await.expect_err("the connection is given up on");
    assert!(later.to_string().contains("answered nothing for"), "{later}");
}

/// A TCP proxy in front of the Unix socket `upstream` that passes one direction at once and
/// the other 4 KiB every 20 ms (about 200 kB/s): the replies if `slow_replies`, else the
/// requests. TCP, as a slow link is: its send buffer frees as the far end reads.
fn slow_proxy(upstream: &Path, slow_replies: bool) -> Endpoint {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("address").port();
    let upstream = upstream.to_owned();
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        let Ok((client, _)) = listener.accept() else { return };
        let Ok(server) = std::os::unix::net::UnixStream::connect(&upstream) else { return };
        let (mut client_in, mut client_out) = (client.try_clone().expect("clone"), client);
        let (mut server_in, mut server_out) = (server.try_clone().expect("clone"), server);
        let trickle = |from: &mut dyn Read, to: &mut dyn Write| {
            let mut buf = [0u8; 4096];
            while let Ok(n) = from.read(&mut buf) {
                if n == 0 || to.write_all(&buf[..n]).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        };
        if slow_replies {
            std::thread::spawn(move || std::io::copy(&mut client_in, &mut server_out));
            trickle(&mut server_in, &mut client_out);
        } else {
            std::thread::spawn(move || std::io::copy(&mut server_in, &mut client_out));
            trickle(&mut client_in, &mut server_out);
        }
    });
    Endpoint::Tcp("127.0.0.1".into(), port)
}

/// A reply whose payload streams in slowly (here 1 MiB at about 200 kB/s, five seconds) is
/// the server answering, not silence: the answer timeout (1 s) must not give up on the read
/// waiting behind it. Nor is a write whose payload goes out that slowly: the server is taking
/// it. The client used to count only reply headers, and failed both over a slow link.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slowly_streaming_payload_is_no_silence() {
    let served = harness::serve(4 * MIB as u64, &[]);
    let content = pattern(4 * MIB, 41);
    std::fs::write(&served.image, &content).expect("image content");
    // Simple replies: the whole 1 MiB after one header (structured ones may come in chunks).
    let opts = ClientOptions { answer_timeout: Some(Duration::from_secs(1)), structured: false, ..ClientOptions::default() };

    let connect = |slow_replies| {
        let opts = opts.clone();
        let endpoint = slow_proxy(&served.socket, slow_replies);
        async move { bounded("connect", NbdClient::connect_with(&endpoint, opts)).await.expect("connect") }
    };
    let c = connect(true).await;
    // Two in flight: the second waits while the first one's payload streams.
    let (first, second) = tokio::time::timeout(Duration::from_secs(60), async { tokio::join!(c.read(0, MIB), c.read(MIB as u64, MIB)) }).await.expect("the reads hung");
    assert!(first.expect("a slowly streaming read must succeed") == content[..MIB], "the first read returned other data");
    assert!(second.expect("the read behind it too") == content[MIB..2 * MIB], "the second read returned other data");

    let c = connect(false).await;
    let data = pattern(2 * MIB, 42);
    let (first, second) = tokio::time::timeout(Duration::from_secs(60), async {
        tokio::join!(c.write(2 * MIB as u64, data[..MIB].to_vec(), false), c.write(3 * MIB as u64, data[MIB..].to_vec(), false))
    })
    .await
    .expect("the writes hung");
    first.expect("a slowly sent write must succeed");
    second.expect("the write behind it too");
    assert!(served.contents()[2 * MIB..] == data[..], "the writes did not land");
}
