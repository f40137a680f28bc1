//! The copy engine against real targets: our `tapmirror serve`, `qemu-nbd`, and `nbdkit` with
//! its error filter to interrupt a copy that a checkpoint then resumes.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use tapmirror::copy::{self, CopyOptions, Dest, Source};
use tapmirror::image::{Access, RawImage};
use tapmirror::io::EngineKind;
use tapmirror::nbd::{ClientOptions, NbdClient};

use crate::harness::{pattern, run, serve, spawn_server};

const MIB: u64 = 1 << 20;

/// A 64 MiB source: data, allocated zeroes and holes in 1 MiB runs, plus an unaligned data
/// island inside a zero run (zero detection must split around it).
fn make_source(path: &Path) -> Vec<u8> {
    let size = 64 * MIB;
    let mut content = vec![0u8; size as usize];
    let f = std::fs::File::create(path).expect("create source");
    f.set_len(size).expect("size");
    use std::os::unix::fs::FileExt;
    for i in 0..64u64 {
        let at = i * MIB;
        match i % 5 {
            0 | 1 => {
                let d = pattern(MIB as usize, i);
                f.write_all_at(&d, at).expect("data");
                content[at as usize..(at + MIB) as usize].copy_from_slice(&d);
            }
            2 => f.write_all_at(&vec![0u8; MIB as usize], at).expect("allocated zeroes"),
            3 => {
                let mut d = vec![0u8; MIB as usize];
                d[12345..12345 + 700].copy_from_slice(&pattern(700, i));
                f.write_all_at(&d, at).expect("island");
                content[at as usize..(at + MIB) as usize].copy_from_slice(&d);
            }
            _ => {} // hole
        }
    }
    content
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime")
}

async fn source(path: &Path) -> Arc<Source<RawImage>> {
    Arc::new(Source::Image(Arc::new(RawImage::open(path, Access::ReadOnly, EngineKind::Portable).await.expect("open source"))))
}

async fn nbd_dest(socket: &Path, connections: usize) -> (Arc<Dest<RawImage>>, usize) {
    let first = NbdClient::connect_unix(socket, ClientOptions::default()).await.expect("connect dest");
    let multi = first.info().has(tapmirror::nbd::proto::tflags::CAN_MULTI_CONN);
    let n = if multi { connections } else { 1 };
    let mut clients = vec![first];
    for _ in 1..n {
        clients.push(NbdClient::connect_unix(socket, ClientOptions::default()).await.expect("connect dest"));
    }
    (Arc::new(Dest::nbd(clients).expect("dest")), n)
}

#[test]
fn copies_into_our_server_sending_only_data() {
    let rt = runtime();
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("src.raw");
    let content = make_source(&src);
    // The target starts full of garbage: zero runs must really be zeroed.
    let target = serve(64 * MIB, &[]);
    std::fs::write(&target.image, vec![0xeeu8; 64 << 20]).expect("garbage target");
    let report = rt.block_on(async {
        let (dest, n) = nbd_dest(&target.socket, 4).await;
        assert_eq!(n, 4, "our server offers multi-conn");
        copy::copy(source(&src).await, dest, n, &CopyOptions::default(), ("src", "dst")).await.expect("copy")
    });
    assert!(target.contents() == content, "target differs from source");
    // 26 data MiB (runs 0 and 1 of every 5) plus 13 islands of 1 KiB-ish: only those travel.
    assert_eq!(report.size, 64 * MIB);
    assert!(report.data_bytes < 27 * MIB && report.data_bytes >= 26 * MIB, "data sent: {}", report.data_bytes);
    assert_eq!(report.data_bytes + report.zeroed_bytes, 64 * MIB);
}

#[test]
fn target_known_zero_gets_no_zeroing_and_stays_sparse() {
    let rt = runtime();
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("src.raw");
    let content = make_source(&src);
    let target = serve(64 * MIB, &[]);
    let report = rt.block_on(async {
        let (dest, n) = nbd_dest(&target.socket, 2).await;
        let opts = CopyOptions { target_is_zero: true, ..CopyOptions::default() };
        copy::copy(source(&src).await, dest, n, &opts, ("src", "dst")).await.expect("copy")
    });
    assert!(target.contents() == content);
    assert_eq!(report.zeroed_bytes, 0);
    assert_eq!(report.data_bytes + report.skipped_bytes, 64 * MIB);
    use std::os::unix::fs::MetadataExt;
    let allocated = std::fs::metadata(&target.image).expect("stat").blocks() * 512;
    assert!(allocated < 40 * MIB, "target allocated {allocated} bytes for 26 MiB of data");
}

#[test]
fn copies_into_qemu_nbd() {
    crate::require!("qemu-nbd");
    let rt = runtime();
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("src.raw");
    let content = make_source(&src);
    let dst = dir.path().join("dst.raw");
    std::fs::write(&dst, vec![0x11u8; 64 << 20]).expect("target");
    let socket = dir.path().join("q.sock");
    let _q = spawn_server(
        Command::new("qemu-nbd").args(["-f", "raw", "-t", "-e", "4", "--discard=unmap", "-k"]).arg(&socket).arg(&dst),
        &socket,
    );
    rt.block_on(async {
        let (dest, n) = nbd_dest(&socket, 4).await;
        copy::copy(source(&src).await, dest, n, &CopyOptions { request_size: 256 << 10, ..CopyOptions::default() }, ("s", "d"))
            .await
            .expect("copy")
    });
    assert!(std::fs::read(&dst).expect("read") == content, "qemu-nbd target differs");
}

/// A server may advertise a maximum block size below 4 KiB, or take no `WRITE_ZEROES` and a
/// small maximum: the copy keeps every request within it, reading from such a server and
/// writing into one (nbdkit's blocksize-policy filter refuses anything larger).
#[test]
fn copy_keeps_within_a_servers_small_maximum_block_size() {
    crate::require!("nbdkit");
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("src.raw");
    let content = make_source(&src);
    let nbdkit = |image: &Path, socket: &Path, filters: &[&str], maximum: &str| {
        let _ = std::fs::remove_file(socket);
        let mut cmd = Command::new("nbdkit");
        cmd.args(["-f", "-U"]).arg(socket).args(filters).args(["--filter=blocksize-policy", "file"]).arg(image);
        cmd.args(["blocksize-minimum=512", "blocksize-preferred=512", "blocksize-error-policy=error"]);
        cmd.arg(format!("blocksize-maximum={maximum}"));
        spawn_server(&mut cmd, socket)
    };
    let uri = |socket: &Path| format!("nbd+unix:///?socket={}", socket.display());
    for (filters, maximum) in [(&[][..], "2048"), (&["--filter=nozero"][..], "65536")] {
        let dst = dir.path().join("dst.raw");
        std::fs::write(&dst, vec![0x44u8; 64 << 20]).expect("target");
        let socket = dir.path().join("small.sock");
        let target = nbdkit(&dst, &socket, filters, maximum);
        crate::harness::run(Command::new(crate::harness::tapmirror()).arg("copy").arg(&src).arg(uri(&socket)));
        drop(target);
        assert!(std::fs::read(&dst).expect("read") == content, "target differs (maximum {maximum}, {filters:?})");

        // And back out of such a server into a file.
        let source = nbdkit(&dst, &socket, filters, maximum);
        let out = dir.path().join("out.raw");
        let _ = std::fs::remove_file(&out);
        crate::harness::run(Command::new(crate::harness::tapmirror()).arg("copy").arg(uri(&socket)).arg(&out));
        drop(source);
        assert!(std::fs::read(&out).expect("read") == content, "copy out differs (maximum {maximum}, {filters:?})");
    }
}

/// A destination whose minimum block size is 4 KiB (a 4K-sector disk behind an NBD server)
/// gets only aligned requests, from a VHD whose allocation is sector-granular.
#[test]
fn copy_keeps_to_a_destinations_minimum_block_size() {
    crate::require!("nbdkit", "qemu-io", "qemu-img");
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let (vhd, want, dst) = (d.join("a.vhd"), d.join("want.raw"), d.join("dst.raw"));
    run(Command::new(crate::harness::tapmirror()).args(["image", "create", "vhd"]).arg(&vhd).arg("8M"));
    // Written through our server, which allocates sector by sector (QEMU marks whole blocks).
    {
        let served = crate::harness::serve_file(tempfile::tempdir().expect("tempdir"), vhd.clone(), &[]);
        run(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0x11 512 512", "-c", "write -P 0x22 5120 3072", "-c", "write -P 0x33 3M 4608", &served.uri()]));
    }
    run(Command::new("qemu-img").args(["convert", "-f", "vpc", "-O", "raw"]).arg(&vhd).arg(&want));
    std::fs::write(&dst, vec![0x5au8; 8 << 20]).expect("target");
    let socket = d.join("k.sock");
    let target = spawn_server(
        Command::new("nbdkit").args(["-f", "-U"]).arg(&socket).args(["--filter=blocksize-policy", "file"]).arg(&dst).args([
            "blocksize-minimum=4096",
            "blocksize-preferred=4096",
            "blocksize-maximum=1M",
            "blocksize-error-policy=error",
        ]),
        &socket,
    );
    run(Command::new(crate::harness::tapmirror()).arg("copy").arg(&vhd).arg(format!("nbd+unix:///?socket={}", socket.display())));
    drop(target);
    assert!(std::fs::read(&dst).expect("read") == std::fs::read(&want).expect("want"), "the destination differs from the VHD's disk");
}

/// Copies `src` into `dst` through nbdkit's error filter, which starts failing every write
/// once the copy's first checkpoint is on disk (its trigger file appears then), so the copy
/// stops part-way with progress saved. The bandwidth limit keeps the copy slow enough for that.
fn copy_failing_after_first_checkpoint(rt: &tokio::runtime::Runtime, dir: &std::path::Path, src: &std::path::Path, dst: &std::path::Path, opts: &CopyOptions) -> anyhow::Result<copy::CopyReport> {
    let cp = opts.checkpoint.clone().expect("a checkpoint path");
    let socket = dir.join("k.sock");
    let trigger = dir.join("fail-now");
    let failing = spawn_server(
        Command::new("nbdkit")
            .args(["-f", "-U"])
            .arg(&socket)
            .args(["--filter=error", "file"])
            .arg(dst)
            .args(["error-pwrite-rate=100%", "error=EIO"])
            .arg(format!("error-pwrite-file={}", trigger.display())),
        &socket,
    );
    let watcher = std::thread::spawn(move || {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while !cp.exists() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        std::fs::write(&trigger, b"").expect("trigger");
    });
    let slow = CopyOptions { bwlimit: Some(16 * MIB), ..opts.clone() };
    let first = rt.block_on(async {
        let (dest, n) = nbd_dest(&socket, 1).await;
        copy::copy(source(src).await, dest, n, &slow, ("src", "dst")).await
    });
    watcher.join().expect("watcher");
    drop(failing);
    first
}

#[test]
fn interrupted_copy_resumes_from_its_checkpoint() {
    crate::require!("nbdkit");
    let rt = runtime();
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("src.raw");
    let content = make_source(&src);
    let dst = dir.path().join("dst.raw");
    std::fs::write(&dst, vec![0x22u8; 64 << 20]).expect("target");
    let cp = dir.path().join("copy.checkpoint");
    let opts = CopyOptions { checkpoint: Some(cp.clone()), checkpoint_every: 4 * MIB, requests: 2, ..CopyOptions::default() };

    let first = copy_failing_after_first_checkpoint(&rt, dir.path(), &src, &dst, &opts);
    assert!(first.is_err(), "the failing target should have stopped the copy");
    let saved = copy::Checkpoint::load(&cp).expect("load").expect("a checkpoint was written before the failure");
    assert!(saved.done > 0 && saved.done < 64 * MIB, "checkpoint at {}", saved.done);

    // Second run, healthy target: resumes at the checkpoint and finishes the job.
    let target = crate::harness::serve_file(tempfile::tempdir().expect("tempdir"), dst.clone(), &[]);
    let report = rt.block_on(async {
        let (dest, n) = nbd_dest(&target.socket, 1).await;
        copy::copy(source(&src).await, dest, n, &opts, ("src", "dst")).await.expect("resumed copy")
    });
    assert_eq!(report.resumed_bytes, saved.done);
    assert!(std::fs::read(&dst).expect("read") == content, "resumed copy differs from the source");
    // Done, the checkpoint goes: the same copy run again (its source changed since) copies
    // again rather than finding everything done.
    assert_eq!(copy::Checkpoint::load(&cp).expect("load"), None, "a finished copy left its checkpoint");
    let again = rt.block_on(async {
        let (dest, n) = nbd_dest(&target.socket, 1).await;
        copy::copy(source(&src).await, dest, n, &opts, ("src", "dst")).await.expect("copy again")
    });
    assert_eq!(again.resumed_bytes, 0);

    // A checkpoint of another copy is refused, not silently applied.
    copy::Checkpoint { version: 1, source: "src".into(), dest: "dst".into(), size: 64 * MIB, done: 4 * MIB, files_stamp: None }.store(&cp).expect("store");
    let err = rt.block_on(async {
        let (dest, n) = nbd_dest(&target.socket, 1).await;
        copy::copy(source(&src).await, dest, n, &opts, ("other-src", "dst")).await
    });
    assert!(err.expect_err("mismatched checkpoint").to_string().contains("another copy"));
}

/// A source that is one run of data (a whole raw disk) is checkpointed inside that run too,
/// not only between runs, which it has none of.
#[test]
fn a_copy_of_one_long_data_run_is_checkpointed_along_it() {
    crate::require!("nbdkit");
    let rt = runtime();
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("full.raw");
    std::fs::write(&src, pattern((64 * MIB) as usize, 7)).expect("source");
    let dst = dir.path().join("dst.raw");
    std::fs::write(&dst, vec![0u8; 64 << 20]).expect("target");
    let cp = dir.path().join("copy.checkpoint");
    let opts = CopyOptions { checkpoint: Some(cp.clone()), checkpoint_every: 4 * MIB, requests: 2, ..CopyOptions::default() };
    let first = copy_failing_after_first_checkpoint(&rt, dir.path(), &src, &dst, &opts);
    assert!(first.is_err(), "the copy ended before any checkpoint was written: {first:?}");
    let saved = copy::Checkpoint::load(&cp).expect("load").expect("a checkpoint");
    assert!(saved.done > 0 && saved.done < 64 * MIB, "checkpoint at {}", saved.done);
}

/// `tapmirror copy` as a user runs it: JSON progress lines that end in a finished line, into our
/// server and back out into a new sparse file.
#[test]
fn copy_command_reports_progress_and_round_trips() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("src.raw");
    let content = make_source(&src);
    let target = serve(64 * MIB, &[]);
    let out = crate::harness::run(
        Command::new(crate::harness::tapmirror())
            .arg("copy")
            .arg(&src)
            .arg(target.uri())
            .args(["--progress", "json", "--request-size", "256K", "--connections", "2"]),
    );
    let lines: Vec<serde_json::Value> =
        String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).expect("JSON progress line")).collect();
    let last = lines.last().expect("a progress line");
    assert_eq!(last["finished"], true);
    assert_eq!(last["done"], last["total"]);
    assert_eq!(last["total"], 64 * MIB);
    assert!(target.contents() == content);

    // `--bwlimit 0` is no cap, as a rate of 0 is everywhere else (not one byte a second).
    let back = dir.path().join("back.raw");
    crate::harness::run(Command::new(crate::harness::tapmirror()).arg("copy").arg(target.uri()).arg(&back).args(["--bwlimit", "0"]));
    assert!(std::fs::read(&back).expect("read back") == content);
    use std::os::unix::fs::MetadataExt;
    let allocated = std::fs::metadata(&back).expect("stat").blocks() * 512;
    assert!(allocated < 40 * MIB, "the new file should stay sparse: {allocated} bytes allocated");
}

/// `--format raw` and `--dest-format raw` name what probing would get wrong: a raw disk whose
/// guest wrote a qcow2 header at its start (naming a host file as its backing) is copied as
/// its own bytes, into an existing file that starts with such a header too.
#[test]
fn copy_takes_the_formats_it_is_told_rather_than_probing() {
    crate::require!("qemu-img");
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    std::fs::write(d.join("secret"), b"host file, not the guest's").expect("secret");
    let header = d.join("hdr.qcow2");
    run(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"]).arg(d.join("secret")).arg(&header).arg("4M"));
    let mut disk = std::fs::read(&header).expect("header");
    disk.resize(4 << 20, 0);
    disk[2 << 20..3 << 20].copy_from_slice(&pattern(1 << 20, 5));
    std::fs::write(d.join("disk.raw"), &disk).expect("disk");
    std::fs::write(d.join("out.raw"), &disk).expect("out");
    run(Command::new(crate::harness::tapmirror())
        .arg("copy")
        .arg(d.join("disk.raw"))
        .arg(d.join("out.raw"))
        .args(["--format", "raw", "--dest-format", "raw"]));
    assert!(std::fs::read(d.join("out.raw")).expect("out") == disk, "the copy is not the disk's own bytes");
}

/// A copy into a qcow2 file of a sparse disk whose clusters mix data and holes: the copy sends
/// a cluster's data and the zeroing of its hole as requests in flight together, which once
/// lost the data (each allocated the cluster). Judged by `qemu-img compare`.
#[test]
fn copy_into_a_qcow2_file_keeps_data_beside_zeroes_in_a_cluster() {
    crate::require!("qemu-img");
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let src = d.join("mixed.raw");
    let f = std::fs::File::create(&src).expect("source");
    f.set_len(16 * MIB).expect("size");
    for i in 0..(16 * MIB / 4096) {
        // Within every 64 KiB cluster: data, then a hole, then data again.
        if i % 16 < 4 || i % 16 >= 12 {
            std::os::unix::fs::FileExt::write_all_at(&f, &pattern(4096, i + 1), i * 4096).expect("data");
        }
    }
    drop(f);
    let dst = d.join("out.qcow2");
    run(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(&dst).arg("16M"));
    run(Command::new(crate::harness::tapmirror()).arg("copy").arg(&src).arg(&dst).args(["--dest-format", "qcow2"]));
    run(Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "qcow2"]).arg(&src).arg(&dst));
}

/// A destination that is a file of the source's chain (the top itself, or a backing that
/// other overlays share) is refused before anything is written, under any name for it.
#[test]
fn copy_refuses_to_write_into_the_chain_it_reads() {
    crate::require!("qemu-img", "qemu-io");
    let dir = tempfile::tempdir().expect("tempdir");
    let base = dir.path().join("base.raw");
    let base_bytes = make_source(&base);
    let overlay = dir.path().join("overlay.qcow2");
    crate::harness::run(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"]).arg(&base).arg(&overlay));
    crate::harness::run(Command::new("qemu-io").args(["-f", "qcow2", "-c", "write -P 0x6b 0 1M"]).arg(&overlay));
    let overlay_bytes = std::fs::read(&overlay).expect("read overlay");
    let link = dir.path().join("link.raw");
    std::os::unix::fs::symlink(&base, &link).expect("symlink");
    let hard = dir.path().join("hard.raw");
    std::fs::hard_link(&base, &hard).expect("hard link");

    for (src, dest) in [(&overlay, &base), (&overlay, &link), (&overlay, &hard), (&base, &base), (&overlay, &overlay)] {
        let out = Command::new(crate::harness::tapmirror()).arg("copy").arg(src).arg(dest).output().expect("run copy");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "copy {} -> {} must be refused", src.display(), dest.display());
        assert!(err.contains("a file of the source's chain"), "copy {} -> {}: {err}", src.display(), dest.display());
    }
    assert!(std::fs::read(&base).expect("read base") == base_bytes, "the backing was written");
    assert!(std::fs::read(&overlay).expect("read overlay") == overlay_bytes, "the overlay was written");

    // Into a file of its own the same copy goes through, and reads like the overlay.
    let out = dir.path().join("out.raw");
    crate::harness::run(Command::new(crate::harness::tapmirror()).arg("copy").arg(&overlay).arg(&out));
    crate::harness::run(Command::new("qemu-img").args(["compare", "-q", "-F", "raw"]).arg(&overlay).arg(&out));
}

/// `copy --base`: the destination holds BASE already; only what the child changed travels, and
/// the destination ends equal to the child, zeroes included.
#[test]
fn copy_with_base_sends_only_what_differs() {
    crate::require!("qemu-io");
    let dir = tempfile::tempdir().expect("tempdir");
    let base = dir.path().join("base.vhd");
    let child = dir.path().join("child.vhd");
    let tm = crate::harness::tapmirror();
    crate::harness::run(Command::new(tm).args(["image", "create", "vhd"]).arg(&base).arg("32M"));
    let write = |img: &Path, cmds: &[&str]| {
        let d = tempfile::tempdir().expect("tempdir");
        let s = crate::harness::serve_file(d, img.to_owned(), &[]);
        let mut c = Command::new("qemu-io");
        c.args(["-f", "raw"]);
        for cmd in cmds {
            c.args(["-c", cmd]);
        }
        crate::harness::run(c.arg(s.uri()));
    };
    write(&base, &["write -P 0x41 0 8M"]);
    // The destination holds the base's content.
    let target = serve(32 * MIB, &[]);
    crate::harness::run(Command::new(tm).arg("copy").arg(&base).arg(target.uri()));
    crate::harness::run(Command::new(tm).args(["image", "create", "vhd"]).arg(&child).arg("--parent").arg(&base));
    write(&child, &["write -P 0x42 1M 512k", "write -z 4M 1M", "write -P 0x43 20M 64k"]);

    let report = copy_with_base(&base, &child, &target.uri());
    // Only the child's blocks (2 MiB each: three touched) can have been read and sent.
    assert!(report["data_bytes"].as_u64().expect("data") <= 6 * MIB, "{report}");
    assert!(report["skipped_bytes"].as_u64().expect("skipped") >= 26 * MIB, "{report}");

    let expected = {
        let d = tempfile::tempdir().expect("tempdir");
        let s = crate::harness::serve_file(d, child.clone(), &["--read-only"]);
        let out = dir.path().join("expected.raw");
        crate::harness::run(Command::new(tm).arg("copy").arg(s.uri()).arg(&out));
        std::fs::read(&out).expect("expected")
    };
    assert!(target.contents() == expected, "destination differs from the child");
    assert_eq!(expected[4 * MIB as usize], 0, "the zeroed range");
    assert_eq!(expected[MIB as usize], 0x42);
}

/// Early writeback: a copy flushes the target in the background as data arrives (so the final
/// flush, which a durable copy waits for, has little left to write), and still ends with a
/// flush that covers every write. nbdkit's log filter records the order of requests as the
/// target saw them.
#[test]
fn copy_flushes_while_it_writes_and_once_after_the_last_write() {
    crate::require!("nbdkit");
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("src.raw");
    let content = make_source(&src);
    let flushes_and_last_write = |writeback: &str| {
        let dst = dir.path().join("dst.raw");
        std::fs::write(&dst, vec![0x33u8; 64 << 20]).expect("target");
        let (socket, log) = (dir.path().join("log.sock"), dir.path().join("requests.log"));
        let _ = std::fs::remove_file(&log);
        let _ = std::fs::remove_file(&socket);
        let target = spawn_server(
            Command::new("nbdkit")
                .args(["-f", "-U"])
                .arg(&socket)
                .args(["--filter=log", "file"])
                .arg(&dst)
                .arg(format!("logfile={}", log.display())),
            &socket,
        );
        let uri = format!("nbd+unix:///?socket={}", socket.display());
        crate::harness::run(Command::new(crate::harness::tapmirror()).arg("copy").arg(&src).arg(&uri).args([
            "--connections",
            "1",
            "--request-size",
            "1M",
            "--writeback-every",
            writeback,
        ]));
        drop(target);
        assert!(std::fs::read(&dst).expect("read") == content, "target differs (writeback {writeback})");
        // Line numbers of each flush sent and of the last write answered.
        let text = std::fs::read_to_string(&log).expect("request log");
        let lines: Vec<&str> = text.lines().collect();
        let flushes: Vec<usize> = lines.iter().enumerate().filter(|(_, l)| l.contains(" Flush ")).map(|(i, _)| i).collect();
        let last_write = lines.iter().rposition(|l| l.contains(" ...Write ")).expect("writes in the log");
        (flushes, last_write)
    };

    let (flushes, last_write) = flushes_and_last_write("4M");
    assert!(flushes.len() >= 2, "26 MiB of data with writeback every 4 MiB: flushes at {flushes:?}");
    assert!(flushes[0] < last_write, "no flush while writing: flushes at {flushes:?}, last write at {last_write}");
    assert!(flushes.last().is_some_and(|&f| f > last_write), "no flush after the last write: {flushes:?} vs {last_write}");

    let (flushes, last_write) = flushes_and_last_write("0");
    assert_eq!(flushes.len(), 1, "writeback off: one flush, at the end");
    assert!(flushes[0] > last_write);
}

/// `--writeback-every` counts data bytes written: allocated zeroes that the copy finds in what
/// it reads (a preallocated disk's) and sends as zeroing do not count, since they leave the
/// target's cache nothing to write back. 2 MiB of data ahead of 30 MiB of allocated zeroes,
/// writeback every 4 MiB: one flush, at the end (it used to flush five times).
#[test]
fn early_writeback_counts_data_not_allocated_zeroes() {
    crate::require!("nbdkit");
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("src.raw");
    let mut content = pattern(2 * MIB as usize, 7);
    content.resize(32 * MIB as usize, 0);
    std::fs::write(&src, &content).expect("source, all of it allocated");
    let dst = dir.path().join("dst.raw");
    std::fs::write(&dst, vec![0x33u8; 32 << 20]).expect("target");
    let (socket, log) = (dir.path().join("log.sock"), dir.path().join("requests.log"));
    let target = spawn_server(
        Command::new("nbdkit").args(["-f", "-U"]).arg(&socket).args(["--filter=log", "file"]).arg(&dst).arg(format!("logfile={}", log.display())),
        &socket,
    );
    let uri = format!("nbd+unix:///?socket={}", socket.display());
    crate::harness::run(Command::new(crate::harness::tapmirror()).arg("copy").arg(&src).arg(&uri).args(["--connections", "1", "--writeback-every", "4M"]));
    drop(target);
    assert!(std::fs::read(&dst).expect("read") == content, "target differs");
    let text = std::fs::read_to_string(&log).expect("request log");
    let flushes = text.lines().filter(|l| l.contains(" Flush ")).count();
    let zeroings = text.lines().filter(|l| l.contains(" Zero ")).count();
    assert!(zeroings > 0, "the allocated zeroes were not sent as zeroing:\n{text}");
    assert_eq!(flushes, 1, "2 MiB of data with writeback every 4 MiB: {flushes} flushes");
}

/// The first request that fails ends the copy: nothing more is sent. Here the destination
/// (nbdkit's error filter) fails every write with EIO, and the source is one 64 MiB run of
/// data; four requests are in flight at most. The copy used to go on sending the rest of that
/// run (64 writes) before it stopped; a connection sent to after the failure could also wait
/// out an answer timeout of its own (`--timeout 3` took 7 s into a stopped qemu-nbd).
#[test]
fn a_copy_sends_nothing_after_its_first_failed_request() {
    crate::require!("nbdkit");
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("src.raw");
    std::fs::write(&src, pattern(64 * MIB as usize, 3)).expect("source");
    let dst = dir.path().join("dst.raw");
    std::fs::write(&dst, vec![0u8; 64 << 20]).expect("target");
    let (socket, log) = (dir.path().join("err.sock"), dir.path().join("requests.log"));
    let target = spawn_server(
        Command::new("nbdkit")
            .args(["-f", "-U"])
            .arg(&socket)
            .args(["--filter=log", "--filter=error", "file"])
            .arg(&dst)
            .arg(format!("logfile={}", log.display()))
            .args(["error-pwrite=EIO", "error-pwrite-rate=1"])
            .stderr(std::process::Stdio::null()),
        &socket,
    );
    let uri = format!("nbd+unix:///?socket={}", socket.display());
    let out = Command::new(crate::harness::tapmirror())
        .arg("copy")
        .arg(&src)
        .arg(&uri)
        .args(["--connections", "1", "--request-size", "1M", "--requests", "4"])
        .output()
        .expect("run copy");
    drop(target);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a copy whose every write failed succeeded: {err}");
    let text = std::fs::read_to_string(&log).expect("request log");
    let writes = text.lines().filter(|l| l.contains(" Write ") && !l.contains("...Write")).count();
    assert!(writes > 0, "no write reached the destination:\n{text}");
    assert!(writes <= 4, "{writes} writes reached the destination, more than the 4 in flight when the first failed");
}

/// `tapmirror copy --base BASE CHILD URI`; its closing JSON report (the last JSON line of stderr).
fn copy_with_base(base: &Path, child: &Path, uri: &str) -> serde_json::Value {
    let out = crate::harness::run(Command::new(crate::harness::tapmirror()).arg("copy").arg("--base").arg(base).arg(child).arg(uri));
    serde_json::from_str(String::from_utf8_lossy(&out.stderr).lines().rfind(|l| l.starts_with('{')).expect("report")).expect("report JSON")
}

/// `copy --base` on qcow2 chains made by qemu-img: the destination holds the base; only the
/// clusters the child's own layer holds travel, and the destination ends equal to the child as
/// qemu-img itself reads it.
#[test]
fn copy_with_a_qcow2_base_sends_only_the_childs_layer() {
    crate::require!("qemu-img", "qemu-io");
    let dir = tempfile::tempdir().expect("tempdir");
    let (base, child) = (dir.path().join("base.qcow2"), dir.path().join("child.qcow2"));
    let qemu = |args: &[&str], file: &Path| crate::harness::run(Command::new(args[0]).args(&args[1..]).arg(file));
    crate::harness::run(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(&base).arg("32M"));
    qemu(&["qemu-io", "-f", "qcow2", "-c", "write -P 0x41 0 8M"], &base);
    let tm = crate::harness::tapmirror();
    let target = serve(32 * MIB, &[]);
    crate::harness::run(Command::new(tm).arg("copy").arg(&base).arg(target.uri()));
    crate::harness::run(
        Command::new("qemu-img").args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"]).arg(&base).arg(&child),
    );
    qemu(&["qemu-io", "-f", "qcow2", "-c", "write -P 0x42 1M 512k", "-c", "write -z 4M 1M", "-c", "write -P 0x43 20M 64k"], &child);

    let report = copy_with_base(&base, &child, &target.uri());
    // The child's layer holds 512 KiB + 1 MiB (zeroed) + 64 KiB: nothing else may be sent.
    assert!(report["data_bytes"].as_u64().expect("data") <= 2 * MIB, "{report}");
    assert!(report["skipped_bytes"].as_u64().expect("skipped") >= 29 * MIB, "{report}");

    let expected = dir.path().join("expected.raw");
    crate::harness::run(Command::new("qemu-img").args(["convert", "-O", "raw"]).arg(&child).arg(&expected));
    let expected = std::fs::read(&expected).expect("expected");
    assert!(target.contents() == expected, "destination differs from the child");
    assert_eq!(expected[4 * MIB as usize], 0, "the zeroed range");
    assert_eq!(expected[MIB as usize], 0x42);
    assert_eq!(expected[20 * MIB as usize], 0x43);
}

/// `--no-backing` refuses a source that reads through a backing file (here a qcow2 naming a
/// file of this host, as an image from elsewhere could), and writes nothing; without it the
/// chain is copied as qemu-img reads it.
#[test]
fn no_backing_refuses_a_source_that_names_a_backing_file() {
    crate::require!("qemu-img");
    let dir = tempfile::tempdir().expect("tempdir");
    let (secret, image) = (dir.path().join("secret.raw"), dir.path().join("image.qcow2"));
    std::fs::write(&secret, vec![0x5a; MIB as usize]).expect("secret");
    crate::harness::run(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"]).arg(&secret).arg(&image).arg("1M"));
    let tm = crate::harness::tapmirror();
    let out = dir.path().join("out.raw");
    let refused = Command::new(tm).arg("copy").arg(&image).arg(&out).arg("--no-backing").output().expect("tapmirror");
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success() && err.contains("backing") && err.contains("secret.raw"), "{err}");
    assert!(!out.exists(), "a refused copy made its destination");
    crate::harness::run(Command::new(tm).arg("copy").arg(&image).arg(&out));
    assert!(std::fs::read(&out).expect("out").iter().all(|&b| b == 0x5a), "the chain was not read through");
}

/// `--dest-new` writes only a file it creates: not one that exists, nor through a link planted
/// at the path (in a folder others may write, between a caller's check and the copy).
#[test]
fn dest_new_never_writes_an_existing_file_or_through_a_link() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("src.raw");
    let content = make_source(&src);
    let victim = dir.path().join("victim");
    std::fs::write(&victim, vec![7u8; (64 * MIB) as usize]).expect("victim");
    let link = dir.path().join("link.raw");
    std::os::unix::fs::symlink(&victim, &link).expect("symlink");
    let tm = crate::harness::tapmirror();
    for dest in [&victim, &link] {
        let out = Command::new(tm).arg("copy").arg(&src).arg(dest).arg("--dest-new").output().expect("tapmirror");
        assert!(!out.status.success(), "--dest-new wrote {}", dest.display());
        assert!(String::from_utf8_lossy(&out.stderr).contains("exists"), "{}", String::from_utf8_lossy(&out.stderr));
    }
    assert!(std::fs::read(&victim).expect("victim").iter().all(|&b| b == 7), "the existing file was written");
    let fresh = dir.path().join("fresh.raw");
    crate::harness::run(Command::new(tm).arg("copy").arg(&src).arg(&fresh).arg("--dest-new"));
    assert!(std::fs::read(&fresh).expect("fresh") == content);
}

/// nbdkit serving `file` with block size limits it enforces (`blocksize-policy`, refusing
/// what breaks them), on a Unix socket in `dir`; answers the server and its URI.
fn limited(dir: &Path, name: &str, file: &Path, minimum: u32, maximum: u32, read_only: bool) -> (crate::harness::Proc, String) {
    let socket = dir.join(format!("{name}.sock"));
    let mut cmd = Command::new("nbdkit");
    cmd.args(["-f", "-U"]).arg(&socket);
    if read_only {
        cmd.arg("-r");
    }
    cmd.args(["--filter=blocksize-policy", "file"]).arg(file).args([
        format!("blocksize-minimum={minimum}"),
        format!("blocksize-preferred={minimum}"),
        format!("blocksize-maximum={maximum}"),
        "blocksize-error-policy=error".to_owned(),
    ]);
    (spawn_server(&mut cmd, &socket), format!("nbd+unix:///?socket={}", socket.display()))
}

/// Ends whose block sizes do not fit together, all legal: a source that reads at most 4 KiB at
/// a time into a destination that writes in 64 KiB units (the source is read in several
/// requests per unit; the copy failed on its first read), and a 1000-byte source into a
/// destination of 4 KiB units that is larger (its last unit is padded with zeroes; the copy
/// failed at its very end). A destination that ends inside its own last unit cannot take the
/// source's tail: that is said before anything is copied.
#[test]
fn copy_fits_requests_to_both_ends_block_sizes() {
    crate::require!("nbdkit");
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let (src, dst) = (d.join("src.raw"), d.join("dst.raw"));
    let content = make_source(&src);
    std::fs::write(&dst, vec![0x44u8; content.len()]).expect("target");
    let (_s, src_uri) = limited(d, "s", &src, 512, 4096, true);
    let (t, dst_uri) = limited(d, "d", &dst, 65536, 1 << 20, false);
    run(Command::new(crate::harness::tapmirror()).arg("copy").arg(&src_uri).arg(&dst_uri));
    drop(t);
    assert!(std::fs::read(&dst).expect("read") == content, "the destination differs from the source");

    let small = d.join("small.raw");
    let bytes = pattern(1000, 3);
    std::fs::write(&small, &bytes).expect("small");
    let padded = d.join("padded.raw");
    std::fs::write(&padded, vec![0x44u8; 4096]).expect("padded");
    let (t, uri) = limited(d, "p", &padded, 4096, 65536, false);
    run(Command::new(crate::harness::tapmirror()).arg("copy").arg(&small).arg(&uri));
    drop(t);
    let mut want = bytes.clone();
    want.resize(4096, 0);
    assert!(std::fs::read(&padded).expect("read") == want, "the last unit is not the source's bytes then zeroes");

    let odd = d.join("odd.raw");
    std::fs::write(&odd, vec![0x44u8; 5000]).expect("odd");
    std::fs::write(&small, pattern(5000, 4)).expect("small");
    let (_t, uri) = limited(d, "o", &odd, 4096, 65536, false);
    let out = Command::new(crate::harness::tapmirror()).arg("copy").arg(&small).arg(&uri).output().expect("copy");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("cannot be written"), "{err}");
    assert!(std::fs::read(&odd).expect("read") == vec![0x44u8; 5000], "something was written before the refusal");
}

/// A destination that offers multi-conn but takes one connection (nbdkit's limit filter) gets
/// the copy over that one; the copy failed when its second connection was refused.
#[test]
fn copy_goes_on_over_the_connections_a_destination_takes() {
    crate::require!("nbdkit");
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("src.raw");
    let content = make_source(&src);
    let dst = dir.path().join("dst.raw");
    std::fs::write(&dst, vec![0x44u8; content.len()]).expect("target");
    let socket = dir.path().join("k.sock");
    let target = spawn_server(
        Command::new("nbdkit").args(["-f", "-U"]).arg(&socket).args(["--filter=limit", "--filter=multi-conn", "file"]).arg(&dst).args(["limit=1", "multi-conn-mode=plugin"]),
        &socket,
    );
    let uri = format!("nbd+unix:///?socket={}", socket.display());
    let info = run(Command::new("nbdinfo").arg("--json").arg(&uri));
    assert!(String::from_utf8_lossy(&info.stdout).contains("\"can_multi_conn\": true"), "the target should offer multi-conn");
    run(Command::new(crate::harness::tapmirror()).arg("copy").arg(&src).arg(&uri).args(["--connections", "4"]));
    drop(target);
    assert!(std::fs::read(&dst).expect("read") == content, "the destination differs from the source");
}

/// Progress lines go on while the destination takes seconds over its final flush (nbdkit
/// serving a file whose flush sleeps 3 s): they stopped before the flush, which looked like a
/// hang, and the final line came only after it.
#[test]
fn progress_goes_on_through_a_slow_final_flush() {
    crate::require!("nbdkit");
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("src.raw");
    std::fs::write(&src, pattern(MIB as usize, 5)).expect("src");
    let dst = dir.path().join("dst.raw");
    std::fs::File::create(&dst).and_then(|f| f.set_len(MIB)).expect("dst");
    let socket = dir.path().join("k.sock");
    let f = dst.display();
    let _target = spawn_server(
        Command::new("nbdkit").args(["-f", "-U"]).arg(&socket).args([
            "eval".to_owned(),
            format!("get_size=echo {MIB}"),
            "can_write=exit 0".to_owned(),
            format!("pread=dd if='{f}' skip=$4 count=$3 iflag=skip_bytes,count_bytes status=none"),
            format!("pwrite=dd of='{f}' seek=$4 oflag=seek_bytes conv=notrunc status=none"),
            "flush=sleep 3".to_owned(),
        ]),
        &socket,
    );
    let out = run(Command::new(crate::harness::tapmirror()).arg("copy").arg(&src).arg(format!("nbd+unix:///?socket={}", socket.display())).args(["--progress", "json"]));
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).expect("JSON progress line")).collect();
    let before_the_end = lines.iter().filter(|l| l["finished"] != true).count();
    assert!(before_the_end >= 2, "{before_the_end} progress lines in a copy that took over 3 s: {lines:?}");
    assert_eq!(lines.last().expect("a final line")["finished"], true);
    assert!(std::fs::read(&dst).expect("read") == std::fs::read(&src).expect("src"));
}

/// A source whose block status fails says where, not just `server error EIO: `.
#[test]
fn a_source_block_status_error_says_where() {
    crate::require!("nbdkit");
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("k.sock");
    let _source = spawn_server(
        Command::new("nbdkit").env("TZ", "UTC").args(["-f", "-U"]).arg(&socket).args(["--filter=error", "memory", "4M", "error-extents-rate=100%", "error=EIO"]),
        &socket,
    );
    let out = Command::new(crate::harness::tapmirror()).arg("copy").arg(format!("nbd+unix:///?socket={}", socket.display())).arg(dir.path().join("out.raw")).output().expect("copy");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("block status of the source at 0") && err.contains("EIO") && !err.trim_end().ends_with(':'), "{err}");
}

/// A huge sparse qcow2 copied into an existing qcow2 file (not known to be zero) leaves the
/// copy's holes unallocated there: zeroing what reads as zeroes already is nothing to do.
/// Each hole became zero-cluster entries in new L2 tables, 128 MiB of them for this 1 TiB
/// volume holding 3 MiB (13 GB for 100 TiB).
#[test]
fn a_sparse_copy_into_an_existing_qcow2_stays_sparse() {
    crate::require!("qemu-img", "qemu-io");
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let (src, dst) = (dir.path().join("src.qcow2"), dir.path().join("dst.qcow2"));
    for p in [&src, &dst] {
        run(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(p).arg("1T"));
    }
    run(Command::new("qemu-io").args(["-f", "qcow2", "-c", "write -P 0x11 0 1M", "-c", "write -P 0x22 512G 1M", "-c", "write -P 0x33 1023G 1M"]).arg(&src));
    run(Command::new(crate::harness::tapmirror()).arg("copy").arg(&src).arg(&dst));
    let used = std::fs::metadata(&dst).expect("dst").blocks() * 512;
    assert!(used < 16 * MIB, "the destination took {used} bytes for 3 MiB of data");
    run(Command::new("qemu-img").args(["compare", "-q", "-f", "qcow2", "-F", "qcow2"]).arg(&src).arg(&dst));
}

/// An NBD end that stops answering (here nbdkit's delay filter holds every write, then every
/// read, for 100 s) fails the copy once it has been silent for `--timeout`, saying so, rather
/// than hanging until TCP or the user gives up.
#[test]
fn copy_gives_up_on_an_end_that_answers_nothing() {
    crate::require!("nbdkit");
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("src.raw");
    make_source(&src);
    let dst = dir.path().join("dst.raw");
    std::fs::write(&dst, vec![0x22u8; 64 << 20]).expect("target");
    let stalled = |file: &Path, socket: &Path, delay: &str| {
        let mut cmd = Command::new("nbdkit");
        cmd.args(["-f", "-U"]).arg(socket).args(["--filter=delay", "file"]).arg(file).arg(delay).stderr(std::process::Stdio::null());
        spawn_server(&mut cmd, socket)
    };
    let copy_cmd = |from: String, to: String| {
        let child = Command::new(crate::harness::tapmirror())
            .args(["copy", &from, &to, "--timeout", "2"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn copy");
        crate::harness::exits_within(child, std::time::Duration::from_secs(60), "the copy hung on a silent end")
    };
    let uri = |socket: &Path| format!("nbd+unix:///?socket={}", socket.display());

    let into = dir.path().join("into.sock");
    let _target = stalled(&dst, &into, "delay-write=100");
    let out = copy_cmd(src.display().to_string(), uri(&into));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a copy into a silent destination succeeded: {err}");
    assert!(err.contains("answered nothing for"), "the error does not say the destination went silent: {err}");

    let from = dir.path().join("from.sock");
    let _source = stalled(&src, &from, "delay-read=100");
    let out = copy_cmd(uri(&from), dir.path().join("out.raw").display().to_string());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a copy from a silent source succeeded: {err}");
    assert!(err.contains("answered nothing for"), "the error does not say the source went silent: {err}");
}

/// A checkpoint made before the source changed is refused: resuming from it would leave the
/// destination with the old content below its mark, and the copy used to say it succeeded.
#[test]
fn a_checkpoint_from_before_the_source_changed_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("src.raw");
    let dst = dir.path().join("dst.raw");
    std::fs::write(&src, pattern((8 * MIB) as usize, 31)).expect("source");
    std::fs::write(&dst, vec![0u8; (8 * MIB) as usize]).expect("destination");
    let cp = dir.path().join("copy.checkpoint");
    let (src_name, dst_name) = (src.display().to_string(), dst.display().to_string());
    let stamp = || copy::files_stamp(std::slice::from_ref(&src), Some(&std::fs::metadata(&dst).expect("destination"))).expect("stamp");
    let checkpoint = copy::Checkpoint { version: 1, source: src_name.clone(), dest: dst_name.clone(), size: 8 * MIB, done: 4 * MIB, files_stamp: Some(stamp()) };
    checkpoint.store(&cp).expect("store");
    let copy_cmd = || Command::new(crate::harness::tapmirror()).args(["copy", "--checkpoint"]).arg(&cp).args([&src_name, &dst_name]).output().expect("run copy");

    // The source changes after the checkpoint was made.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&src).expect("open source");
        f.write_all_at(&[0xee; 512], 0).expect("change the source");
    }
    let out = copy_cmd();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "resumed from a stale checkpoint: {err}");
    assert!(err.contains("changed since"), "{err}");
    assert!(std::fs::read(&dst).expect("read").iter().all(|&b| b == 0), "the refused copy wrote to the destination");

    // Unchanged since, and the destination holding what the checkpoint says (the source's
    // first 4 MiB), the same checkpoint is taken, and the copy resumes from it.
    {
        use std::os::unix::fs::FileExt;
        let first = std::fs::read(&src).expect("source")[..(4 * MIB) as usize].to_vec();
        std::fs::OpenOptions::new().write(true).open(&dst).expect("open the destination").write_all_at(&first, 0).expect("the copied part");
    }
    let checkpoint = copy::Checkpoint { files_stamp: Some(stamp()), ..checkpoint };
    checkpoint.store(&cp).expect("store");
    // Named another way than when the checkpoint was made (relative paths), the same files
    // are the same copy: it used to be refused as "for another copy".
    let out = Command::new(crate::harness::tapmirror())
        .current_dir(dir.path())
        .args(["copy", "--checkpoint"])
        .arg(&cp)
        .args(["src.raw", "./dst.raw"])
        .output()
        .expect("run copy");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(out.stderr.rsplit(|&b| b == b'\n').find(|l| !l.is_empty()).expect("report")).expect("report JSON");
    assert_eq!(report["resumed_bytes"], 4 * MIB, "{report}");

    // A destination put back under its name (a new, empty file) is another file: what the
    // checkpoint says is there is not, and it is refused.
    let checkpoint = copy::Checkpoint { files_stamp: Some(stamp()), ..checkpoint };
    checkpoint.store(&cp).expect("store");
    std::fs::remove_file(&dst).expect("remove the destination");
    std::fs::write(&dst, vec![0u8; (8 * MIB) as usize]).expect("a new destination");
    let out = copy_cmd();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("changed since"), "resumed into another file: {err}");

    // The same file made again in place (zeroed, as `qemu-img create` or `dd` over it leave
    // it): its stamp is the same, but what the checkpoint says it holds is gone. Refused.
    let checkpoint = copy::Checkpoint { files_stamp: Some(stamp()), ..checkpoint };
    checkpoint.store(&cp).expect("store");
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&dst).expect("open the destination");
        f.write_all_at(&vec![0u8; (8 * MIB) as usize], 0).expect("zero it in place");
    }
    let out = copy_cmd();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("it does not"), "resumed into a destination zeroed in place: {err}");
}

/// A source written and its modification time set back (`touch -r`) is still a changed
/// source (the resume took it for the same, and left the destination differing), and a
/// checkpoint that could never be used is refused before any data is sent or any file made.
#[test]
fn a_checkpoint_sees_a_restored_mtime_and_one_that_cannot_serve_is_refused_before_any_data() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("src.raw");
    let dst = dir.path().join("dst.raw");
    std::fs::write(&src, pattern((8 * MIB) as usize, 33)).expect("source");
    std::fs::write(&dst, vec![0u8; (8 * MIB) as usize]).expect("destination");
    let cp = dir.path().join("copy.checkpoint");
    let stamp = copy::files_stamp(std::slice::from_ref(&src), Some(&std::fs::metadata(&dst).expect("destination"))).expect("stamp");
    let checkpoint = copy::Checkpoint { version: 1, source: src.display().to_string(), dest: dst.display().to_string(), size: 8 * MIB, done: 4 * MIB, files_stamp: Some(stamp) };
    checkpoint.store(&cp).expect("store");
    {
        use std::os::unix::fs::FileExt;
        let modified = std::fs::metadata(&src).and_then(|m| m.modified()).expect("mtime");
        let f = std::fs::OpenOptions::new().write(true).open(&src).expect("open source");
        f.write_all_at(&[0xee; 512], 4096).expect("change the source");
        f.set_modified(modified).expect("set the mtime back");
    }
    let copy = |args: &[&std::ffi::OsStr]| Command::new(crate::harness::tapmirror()).arg("copy").args(args).output().expect("run copy");
    let out = copy(&["--checkpoint".as_ref(), cp.as_os_str(), src.as_os_str(), dst.as_os_str()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("changed since"), "resumed from a source changed behind its mtime: {err}");

    let new = dir.path().join("new.raw");
    let missing = dir.path().join("no-such-folder").join("ck");
    for (args, says) in [
        (vec!["--checkpoint".as_ref(), missing.as_os_str(), src.as_os_str(), new.as_os_str()], "cannot write beside it"),
        (vec!["--checkpoint".as_ref(), new.as_os_str(), src.as_os_str(), new.as_os_str()], "names the destination itself"),
        (vec!["--checkpoint".as_ref(), src.as_os_str(), src.as_os_str(), new.as_os_str()], "names a file of the source"),
        (vec!["--dest-new".as_ref(), "--checkpoint".as_ref(), cp.as_os_str(), src.as_os_str(), new.as_os_str()], "resume without --dest-new"),
    ] {
        let out = copy(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(says), "{args:?}: {err}");
        assert!(!new.exists(), "{args:?}: the refused copy made its destination");
    }
}

/// `--target-is-zero` with `--base` is refused: a destination holding the base does not read
/// as zeroes, and the copy skipped the ranges the source had zeroed over the base, leaving the
/// base's data there (exit 0).
#[test]
fn target_is_zero_with_a_base_is_refused() {
    crate::require!("qemu-img", "qemu-io");
    let dir = tempfile::tempdir().expect("tempdir");
    let (base, child, dst) = (dir.path().join("b.qcow2"), dir.path().join("c.qcow2"), dir.path().join("d.raw"));
    run(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(&base).arg("1M"));
    run(Command::new("qemu-io").args(["-f", "qcow2", "-c", "write -P 0xdd 0 1M"]).arg(&base));
    run(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"]).arg(&base).arg(&child));
    run(Command::new("qemu-io").args(["-f", "qcow2", "-c", "write -z 0 512k"]).arg(&child));
    // The destination holds the base.
    std::fs::write(&dst, vec![0xddu8; MIB as usize]).expect("destination");
    let out = Command::new(crate::harness::tapmirror()).arg("copy").arg("--base").arg(&base).arg("--target-is-zero").arg(&child).arg(&dst).output().expect("run copy");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the copy ran, leaving the base's data where the source has zeroes: {err}");
    assert!(err.contains("--target-is-zero") && err.contains("--base"), "{err}");
    assert!(std::fs::read(&dst).expect("read").iter().all(|&b| b == 0xdd), "the refused copy wrote to the destination");
}

/// A copy with a checkpoint stopped while its destination answers nothing cannot record where
/// it got to (nothing it sent is known flushed); ended by a second signal, it says so and says
/// where a resume starts, where it used to say only "stopped by SIGTERM".
#[test]
fn a_copy_stopped_while_its_destination_stalls_says_its_checkpoint_was_not_written() {
    crate::require!("nbdkit");
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("src.raw");
    std::fs::write(&src, pattern((8 * MIB) as usize, 36)).expect("source");
    let socket = dir.path().join("stalled.sock");
    let mut cmd = Command::new("nbdkit");
    cmd.args(["-f", "-U"]).arg(&socket).args(["--filter=delay", "memory", "8M", "delay-write=60"]).stderr(std::process::Stdio::null());
    let _stalled = spawn_server(&mut cmd, &socket);
    let cp = dir.path().join("copy.checkpoint");
    let child = Command::new(crate::harness::tapmirror())
        .args(["copy", "--checkpoint"])
        .arg(&cp)
        .arg(&src)
        .arg(format!("nbd+unix:///?socket={}", socket.display()))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn copy");
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    // Its first writes are out, and wait on the stalled destination.
    std::thread::sleep(std::time::Duration::from_secs(1));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("signal");
    std::thread::sleep(std::time::Duration::from_millis(500));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("second signal");
    let out = crate::harness::exits_within(child, std::time::Duration::from_secs(10), "the copy did not end on a second SIGTERM");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a stopped copy said it succeeded: {err}");
    assert!(err.contains("before it recorded where it got to") && err.contains("a resume starts from the beginning"), "{err}");
    assert!(copy::Checkpoint::load(&cp).expect("load").is_none(), "a checkpoint was written though nothing was flushed");
}

/// A copy with a checkpoint stopped by SIGTERM records where it got to before it ends, so
/// that the resume sends none of it again (it kept only the last periodic checkpoint, up to
/// 5 s behind, and none at all when stopped in its first 5 s).
#[test]
fn a_copy_stopped_by_a_signal_checkpoints_where_it_got_to() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("src.raw");
    let dst = dir.path().join("dst.raw");
    let data = pattern((32 * MIB) as usize, 35);
    std::fs::write(&src, &data).expect("source");
    let cp = dir.path().join("copy.checkpoint");
    let child = Command::new(crate::harness::tapmirror())
        .args(["copy", "--bwlimit", "8M", "--checkpoint"])
        .arg(&cp)
        .arg(&src)
        .arg(&dst)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn copy");
    // About 2 s in: before the first periodic checkpoint (5 s).
    std::thread::sleep(std::time::Duration::from_secs(2));
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGTERM).expect("signal");
    let out = crate::harness::exits_within(child, std::time::Duration::from_secs(30), "the copy did not stop on SIGTERM");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("stopped by SIGTERM"), "{err}");
    let checkpoint = copy::Checkpoint::load(&cp).expect("load").expect("a checkpoint written as the copy stopped");
    assert!(checkpoint.done > 0 && checkpoint.done < 32 * MIB, "{checkpoint:?}");
    let out = Command::new(crate::harness::tapmirror()).args(["copy", "--checkpoint"]).arg(&cp).arg(&src).arg(&dst).output().expect("resume");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(out.stderr.rsplit(|&b| b == b'\n').find(|l| !l.is_empty()).expect("report")).expect("report JSON");
    assert_eq!(report["resumed_bytes"], checkpoint.done, "{report}");
    assert!(std::fs::read(&dst).expect("destination") == data, "the resumed copy differs from its source");
}

/// A destination zeroed in place is caught even when the source reads as zeroes at every
/// place the resume compares first: a fully allocated disk whose 64 KiB blocks each hold data
/// only in their second half. Such a resume used to succeed and leave the destination's first
/// half zeroes where the source had data.
#[test]
fn a_resume_into_a_destination_zeroed_in_place_is_refused_though_the_source_starts_its_blocks_with_zeroes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("src.raw");
    let dst = dir.path().join("dst.raw");
    let mut content = vec![0u8; (8 * MIB) as usize];
    for (i, block) in content.chunks_mut(64 << 10).enumerate() {
        block[32 << 10..].copy_from_slice(&pattern(32 << 10, 40 + i as u64));
    }
    std::fs::write(&src, &content).expect("source");
    std::fs::write(&dst, vec![0u8; (8 * MIB) as usize]).expect("destination, zeroed in place");
    let cp = dir.path().join("copy.checkpoint");
    let (src_name, dst_name) = (src.display().to_string(), dst.display().to_string());
    let stamp = copy::files_stamp(std::slice::from_ref(&src), Some(&std::fs::metadata(&dst).expect("destination"))).expect("stamp");
    copy::Checkpoint { version: 1, source: src_name.clone(), dest: dst_name.clone(), size: 8 * MIB, done: 4 * MIB, files_stamp: Some(stamp) }
        .store(&cp)
        .expect("store");
    let out = Command::new(crate::harness::tapmirror()).args(["copy", "--checkpoint"]).arg(&cp).args([&src_name, &dst_name]).output().expect("run copy");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("it does not"), "resumed into a destination zeroed in place: {err}");
    assert!(std::fs::read(&dst).expect("read").iter().all(|&b| b == 0), "the refused copy wrote to the destination");
}

/// A copy that fails into a file it made takes the file away again: left, it had the source's
/// size and passed for a whole copy. With a checkpoint the file stays, for the resume; and a
/// checkpoint whose destination file is gone is refused, not resumed into a new empty file.
#[test]
fn a_failed_copy_leaves_no_file_it_made() {
    crate::require!("nbdkit");
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("failing.sock");
    // One thread per connection: nbdkit 1.32 aborts (`raw_send_socket: Assertion sock >= 0`)
    // when a client hangs up on a connection whose other threads still have replies to send,
    // which a copy that fails does, and then refused the test's next copy (1 run in ~40).
    let mut cmd = Command::new("nbdkit");
    cmd.args(["-f", "-t", "1", "-U"]).arg(&socket).args(["--filter=error", "pattern", "16M", "error-pread=EIO", "error-pread-rate=100%"]).stderr(std::process::Stdio::null());
    let _failing = spawn_server(&mut cmd, &socket);
    let uri = format!("nbd+unix:///?socket={}", socket.display());
    let out_file = dir.path().join("out.raw");
    let copy_into = |extra: &[&str]| Command::new(crate::harness::tapmirror()).arg("copy").arg(&uri).arg(&out_file).args(extra).output().expect("run copy");

    let out = copy_into(&[]);
    assert!(!out.status.success(), "a copy from a failing source succeeded");
    assert!(!out_file.exists(), "the failed copy left the file it made");

    let cp = dir.path().join("copy.checkpoint");
    let out = copy_into(&["--checkpoint", cp.to_str().expect("path")]);
    assert!(!out.status.success());
    assert!(out_file.exists(), "with a checkpoint, the file stays for the resume: {}", String::from_utf8_lossy(&out.stderr));

    std::fs::remove_file(&out_file).expect("remove");
    copy::Checkpoint { version: 1, source: uri.clone(), dest: out_file.display().to_string(), size: 4 * MIB, done: MIB, files_stamp: None }
        .store(&cp)
        .expect("a checkpoint");
    let out = copy_into(&["--checkpoint", cp.to_str().expect("path")]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("no longer exists"), "{err}");
    assert!(!out_file.exists(), "the refused copy made a file");
    // A file that is no checkpoint says so, rather than name a destination it does not.
    std::fs::write(&cp, b"{}").expect("no checkpoint");
    let out = copy_into(&["--checkpoint", cp.to_str().expect("path")]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("corrupt checkpoint"), "{err}");
    assert!(!out_file.exists(), "the refused copy made a file");

    // Stopped by SIGTERM, or SIGHUP (its session gone), mid-copy (a source that takes 10 s a
    // read), the same.
    let slow_socket = dir.path().join("slow.sock");
    let mut cmd = Command::new("nbdkit");
    cmd.args(["-f", "-U"]).arg(&slow_socket).args(["--filter=delay", "pattern", "16M", "delay-read=10"]).stderr(std::process::Stdio::null());
    let _slow = spawn_server(&mut cmd, &slow_socket);
    for signal in [nix::sys::signal::Signal::SIGTERM, nix::sys::signal::Signal::SIGHUP] {
        let mut child = Command::new(crate::harness::tapmirror())
            .arg("copy")
            .arg(format!("nbd+unix:///?socket={}", slow_socket.display()))
            .arg(&out_file)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn copy");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while !out_file.exists() {
            if child.try_wait().expect("try_wait").is_some() {
                let out = child.wait_with_output().expect("output");
                panic!("the copy ended before it made its file: {}", String::from_utf8_lossy(&out.stderr));
            }
            assert!(std::time::Instant::now() < deadline, "the copy never made its file");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), signal).expect("signal");
        let out = crate::harness::exits_within(child, std::time::Duration::from_secs(20), "the copy did not stop on its signal");
        assert!(!out.status.success(), "a stopped copy said it succeeded");
        assert!(!out_file.exists(), "the copy stopped by {signal} left the file it made");
    }

    // A block-device source is refused a checkpoint before any destination file is made
    // (where loop devices can be set up here).
    let backing = dir.path().join("backing.raw");
    std::fs::write(&backing, vec![7u8; MIB as usize]).expect("backing file");
    let Ok(setup) = Command::new("losetup").args(["-f", "--show"]).arg(&backing).output() else { return };
    let device = String::from_utf8_lossy(&setup.stdout).trim().to_owned();
    if !setup.status.success() || device.is_empty() {
        return;
    }
    let out = Command::new(crate::harness::tapmirror()).args(["copy", "--format", "raw", &device]).arg(&out_file).arg("--checkpoint").arg(&cp).output().expect("run copy");
    let _ = Command::new("losetup").args(["-d", &device]).status();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("block device"), "{err}");
    assert!(!out_file.exists(), "the refused copy left a destination file");
}

/// Connection and request counts are bounded (each connection is a descriptor and tasks on
/// both ends, each request a buffer): out of range they are refused before anything is opened
/// or made. 100 000 connections used to be tried, and opened 1 900.
#[test]
fn copy_counts_out_of_range_are_refused_before_anything_is_made() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("src.raw");
    std::fs::write(&src, vec![1u8; 4096]).expect("source");
    let dst = dir.path().join("dst.raw");
    for (flag, value, range) in [("--connections", "65", "1 to 64"), ("--connections", "0", "1 to 64"), ("--requests", "257", "1 to 256"), ("--requests", "x", "not a count")] {
        let out = Command::new(crate::harness::tapmirror()).arg("copy").arg(&src).arg(&dst).args([flag, value]).output().expect("run copy");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flag} {value}: {err}");
        assert!(err.contains(flag) && err.contains(range), "{flag} {value}: {err}");
        assert!(!dst.exists(), "{flag} {value} made the destination");
    }
    run(Command::new(crate::harness::tapmirror()).arg("copy").arg(&src).arg(&dst).args(["--connections", "64", "--requests", "256"]));
    assert_eq!(std::fs::read(&dst).expect("copied"), vec![1u8; 4096]);
}

/// A destination that is a link to a missing file is refused, saying so: creating through it
/// answered a bare "File exists".
#[test]
fn a_copy_into_a_link_to_a_missing_file_says_so() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("src.raw");
    std::fs::write(&src, vec![1u8; 4096]).expect("source");
    let link = dir.path().join("link.raw");
    std::os::unix::fs::symlink(dir.path().join("missing.raw"), &link).expect("link");
    let out = Command::new(crate::harness::tapmirror()).arg("copy").arg(&src).arg(&link).output().expect("run copy");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("symbolic link to a file that does not exist"), "{err}");
    assert!(!dir.path().join("missing.raw").exists(), "the copy made the file the link names");
}

/// A copy stopped by a signal ends its progress first: the human line is ended before the
/// error is printed (it used to run on into "…ETA ?   tapmirror: stopped by SIGTERM"), and
/// the JSON lines end with an unfinished report.
#[test]
fn a_stopped_copy_ends_its_progress_before_saying_why() {
    crate::require!("nbdkit");
    let dir = tempfile::tempdir().expect("tempdir");
    let slow_socket = dir.path().join("slow.sock");
    let mut cmd = Command::new("nbdkit");
    cmd.args(["-f", "-U"]).arg(&slow_socket).args(["--filter=delay", "pattern", "16M", "delay-read=10"]).stderr(std::process::Stdio::null());
    let _slow = spawn_server(&mut cmd, &slow_socket);
    for mode in ["human", "json"] {
        let out_file = dir.path().join(format!("out-{mode}.raw"));
        let mut child = Command::new(crate::harness::tapmirror())
            .arg("copy")
            .arg(format!("nbd+unix:///?socket={}", slow_socket.display()))
            .arg(&out_file)
            .args(["--progress", mode])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn copy");
        // The reports are read as they come, and the stop sent once one is out (a loaded
        // machine can take seconds to get the copy under way).
        let collect = |pipe: Box<dyn std::io::Read + Send>| {
            let seen = Arc::new(std::sync::Mutex::new(Vec::<u8>::new()));
            let into = Arc::clone(&seen);
            let reader = std::thread::spawn(move || {
                let mut pipe = pipe;
                let mut buf = [0u8; 4096];
                while let Ok(n) = std::io::Read::read(&mut pipe, &mut buf) {
                    if n == 0 {
                        break;
                    }
                    into.lock().expect("lock").extend_from_slice(&buf[..n]);
                }
            });
            (seen, reader)
        };
        let (stdout, out_reader) = collect(Box::new(child.stdout.take().expect("stdout")));
        let (stderr, err_reader) = collect(Box::new(child.stderr.take().expect("stderr")));
        let reported = if mode == "human" { &stderr } else { &stdout };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while !reported.lock().expect("lock").iter().any(|&b| b == b'%' || b == b'}') {
            assert!(std::time::Instant::now() < deadline, "{mode}: no progress report within 60 s");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGTERM).expect("signal");
        let out = crate::harness::exits_within(child, std::time::Duration::from_secs(20), "the copy did not stop on SIGTERM");
        out_reader.join().expect("stdout reader");
        err_reader.join().expect("stderr reader");
        let (stdout, stderr) = (String::from_utf8_lossy(&stdout.lock().expect("lock")).into_owned(), String::from_utf8_lossy(&stderr.lock().expect("lock")).into_owned());
        assert!(!out.status.success(), "a stopped copy said it succeeded");
        if mode == "human" {
            assert!(stderr.contains("(0.0%)"), "no progress line: {stderr:?}");
            assert!(stderr.lines().any(|l| l == "tapmirror: stopped by SIGTERM"), "the error is not on a line of its own: {stderr:?}");
        } else {
            let last: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap_or("")).expect("a JSON progress line last");
            assert_eq!(last["finished"], false, "{stdout}");
            assert!(stdout.lines().count() >= 2, "no progress line before the last: {stdout}");
        }
    }
}

/// A destination that accepts the connection and never greets it (a server busy with as many
/// clients as it takes, a wrong port) fails the copy within `--timeout`, and a stop signal
/// ends it before that: both used to wait for ever, SIGTERM caught and never acted on.
#[test]
fn a_destination_that_never_greets_fails_the_copy_or_lets_it_stop() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("src.raw");
    std::fs::write(&src, pattern((4 * MIB) as usize, 61)).expect("source");
    let socket = dir.path().join("silent.sock");
    // Connections wait in its backlog, accepted by the kernel, never answered.
    let _silent = std::os::unix::net::UnixListener::bind(&socket).expect("listen");
    let uri = format!("nbd+unix:///?socket={}", socket.display());
    let copy = |timeout: &str| {
        Command::new(crate::harness::tapmirror())
            .args(["copy", "--timeout", timeout])
            .arg(&src)
            .arg(&uri)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn copy")
    };
    let out = crate::harness::exits_within(copy("1"), std::time::Duration::from_secs(60), "the copy waited for a greeting past --timeout");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("no NBD greeting"), "{err}");

    let waiting = copy("0");
    std::thread::sleep(std::time::Duration::from_millis(300));
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(waiting.id() as i32), nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    let out = crate::harness::exits_within(waiting, std::time::Duration::from_secs(60), "SIGTERM did not stop a copy waiting for a greeting");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("stopped by SIGTERM"), "{err}");
}

/// A destination that offers multi-conn but serves two clients at a time (`qemu-nbd -e 2`)
/// never greets a third connection: the copy goes on over the two it has (it hung).
#[test]
fn a_copy_goes_on_over_the_connections_a_destination_greets() {
    crate::require!("qemu-nbd");
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("src.raw");
    let content = pattern((4 * MIB) as usize, 62);
    std::fs::write(&src, &content).expect("source");
    let dst = dir.path().join("dst.raw");
    std::fs::File::create(&dst).and_then(|f| f.set_len(4 * MIB)).expect("destination");
    let socket = dir.path().join("two.sock");
    let _server = spawn_server(Command::new("qemu-nbd").args(["-t", "-e", "2", "-f", "raw", "-k"]).arg(&socket).arg(&dst), &socket);
    let child = Command::new(crate::harness::tapmirror())
        .args(["copy", "--connections", "4"])
        .arg(&src)
        .arg(format!("nbd+unix:///?socket={}", socket.display()))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn copy");
    let out = crate::harness::exits_within(child, std::time::Duration::from_secs(120), "the copy waited for a third connection's greeting");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("took fewer connections"), "{err}");
    assert!(std::fs::read(&dst).expect("read") == content, "the copy differs from its source");
}

/// A source another process has open for writing is refused, as `qemu-img convert` refuses
/// it: a qcow2 that `tapmirror serve` writes (its metadata held in the server's memory) was
/// copied as all zeroes, and the copy reported success. QEMU's writers (qemu-nbd) alike.
#[test]
fn a_source_another_process_writes_is_refused() {
    crate::require!("qemu-img", "qemu-nbd", "qemu-io");
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("served.qcow2");
    run(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(&image).arg("4M"));
    let copy = |src: &Path| {
        Command::new(crate::harness::tapmirror()).arg("copy").arg(src).arg(dir.path().join("out.raw")).arg("--dest-new").output().expect("run copy")
    };
    {
        let served = crate::harness::serve_file(tempfile::tempdir().expect("tempdir"), image.clone(), &[]);
        run(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0x5c 0 1M", &served.uri()]));
        let out = copy(&image);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains("open for writing by another process"), "{err}");
        assert!(!dir.path().join("out.raw").exists(), "the refused copy made its destination");
    }
    let raw = dir.path().join("qemu.raw");
    std::fs::write(&raw, pattern(MIB as usize, 63)).expect("raw");
    let socket = dir.path().join("q.sock");
    let server = spawn_server(Command::new("qemu-nbd").args(["-t", "-f", "raw", "-k"]).arg(&socket).arg(&raw), &socket);
    let out = copy(&raw);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("open for writing by another process"), "qemu-nbd's file: {err}");
    // Its writer's file as the backing of the source: refused too (it was copied).
    let overlay = dir.path().join("over.qcow2");
    run(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"]).arg(&raw).arg(&overlay));
    let out = copy(&overlay);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("qemu.raw is open for writing by another process"), "qemu-nbd's file as a backing: {err}");
    drop(server);
    // With no writer left, the same copy goes through.
    let out = copy(&image);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}
