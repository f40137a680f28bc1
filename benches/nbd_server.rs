//! The NBD server's request path, measured end to end over a real Unix socket: our client sends
//! requests, our server parses them, does the image I/O (a raw file, on each I/O engine) and
//! replies. Run with `cargo bench -p tapmirror --bench nbd_server`.
//!
//! Each engine (io_uring, portable) is measured in the same run, so the figures compare.

use std::sync::Arc;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use tapmirror::image::RawImage;
use tapmirror::image::raw::Access;
use tapmirror::io::{EngineChoice, EngineKind};
use tapmirror::nbd::{ClientOptions, ExportConfig, NbdClient, NbdServer};
use tokio::runtime::Runtime;
use tokio_util::sync::CancellationToken;

const IMAGE_SIZE: u64 = 256 << 20;

struct Fixture {
    client: NbdClient,
    _stop: tokio_util::sync::DropGuard,
    _dir: tempfile::TempDir,
}

fn fixture(rt: &Runtime, engine: EngineKind) -> Fixture {
    rt.block_on(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("disk.raw");
        // A written (not sparse) image, so reads take the data path rather than hole chunks.
        std::fs::write(&path, vec![0x5au8; IMAGE_SIZE as usize]).expect("write image");
        let image = Arc::new(RawImage::open(&path, Access::ReadWrite, engine).await.expect("open"));
        let server = NbdServer::new(image, ExportConfig { name: String::new(), description: None, read_only: false });
        let sock = dir.path().join("nbd.sock");
        let listener = tokio::net::UnixListener::bind(&sock).expect("bind");
        let stop = CancellationToken::new();
        tokio::spawn(server.serve_unix(listener, stop.clone()));
        let client = NbdClient::connect_unix(&sock, ClientOptions::default()).await.expect("connect");
        Fixture { client, _stop: stop.drop_guard(), _dir: dir }
    })
}

fn engines() -> Vec<(&'static str, EngineKind)> {
    let mut v = vec![("portable", EngineKind::Portable)];
    if EngineChoice::Uring.resolve().is_ok() {
        v.insert(0, ("uring", EngineKind::Uring));
    }
    v
}

fn request_path(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let mut g = c.benchmark_group("nbd_server");
    for (name, engine) in engines() {
        let f = fixture(&rt, engine);
        let block = vec![0xa5u8; 4096];

        g.throughput(Throughput::Bytes(4096));
        g.bench_function(BenchmarkId::new("write_4k_qd1", name), |b| {
            let mut off = 0u64;
            b.to_async(&rt).iter(|| {
                off = (off + 4096 * 97) % IMAGE_SIZE;
                let (c, data, at) = (f.client.clone(), block.clone(), off);
                async move { c.write(at, data, false).await.expect("write") }
            })
        });
        g.bench_function(BenchmarkId::new("read_4k_qd1", name), |b| {
            let mut off = 0u64;
            b.to_async(&rt).iter(|| {
                off = (off + 4096 * 97) % IMAGE_SIZE;
                let (c, at) = (f.client.clone(), off);
                async move { c.read(at, 4096).await.expect("read") }
            })
        });

        // Sixteen 64 KiB reads in flight: the pipelined path (concurrent handlers, batched replies).
        g.throughput(Throughput::Bytes(16 * 65536));
        g.bench_function(BenchmarkId::new("read_64k_x16", name), |b| {
            let mut base = 0u64;
            b.to_async(&rt).iter(|| {
                base = (base + 16 * 65536) % IMAGE_SIZE;
                let (c, at) = (f.client.clone(), base);
                async move {
                    let mut set = tokio::task::JoinSet::new();
                    for i in 0..16u64 {
                        let c = c.clone();
                        set.spawn(async move { c.read(at + i * 65536, 65536).await.expect("read").len() });
                    }
                    let mut total = 0;
                    while let Some(n) = set.join_next().await {
                        total += n.expect("join");
                    }
                    assert_eq!(total, 16 * 65536);
                }
            })
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30).measurement_time(std::time::Duration::from_secs(3));
    targets = request_path
}
criterion_main!(benches);
