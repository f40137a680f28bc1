//! Fuzzes the qcow2 driver's parsers and checks (`tapmirror::image::qcow2`: the header, the
//! backing chain, the open-time checks and the full metadata check) and imago behind them: the
//! input is a whole file.
//!
//! Each input is written to `fuzz.qcow2` in a private temporary folder (on `/dev/shm` when it
//! exists), beside two backing files the seeds name: `base.raw` and `base.qcow2`. Then:
//! - `info`, `check` and `Qcow2Image::open` (read-write; the portable engine, or io_uring with
//!   `TAPMIRROR_IO_ENGINE=uring`) must not panic, and an image that `check` passes must open;
//! - when the open fails, the file's bytes must be exactly the input (nothing writes to a file
//!   that failed validation);
//! - when it succeeds: reads of the first and last 64 KiB, the allocation map of the first
//!   4 MiB and one small unaligned write (offset and bytes from the input) must not panic, and
//!   must succeed if `check` passed (but for compressed data that does not decompress: `check`
//!   reads metadata only) and the write must read back; and after `close`, a file that `check`
//!   passed must still pass it (a write never breaks a sound file).
//!
//! Backing names are followed as the driver follows them: relative to the folder, or absolute.
//! Backings are only ever opened read-only.

#![no_main]

mod common;

use common::FileHarness;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use tapmirror::image::qcow2::{self, Qcow2Image};
use tapmirror::image::{Access, Image};
use tapmirror::io::{Durability, EngineKind, IoBuf};

/// Every step must end within this; an input that makes one hang is a finding.
const STALL_LIMIT: Duration = Duration::from_secs(5);

fn harness() -> &'static FileHarness {
    static H: OnceLock<FileHarness> = OnceLock::new();
    H.get_or_init(|| {
        let h = FileHarness::new("fuzz.qcow2");
        // The backings the seeds name: 1 MiB each, a byte pattern in the raw one, so a read that
        // falls through to the wrong place shows.
        let pattern: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
        std::fs::write(h.dir.path().join("base.raw"), &pattern).expect("base.raw");
        h.rt.block_on(qcow2::create(&h.dir.path().join("base.qcow2"), 1 << 20, Some(512))).expect("base.qcow2");
        h
    })
}

/// An error that a sound image may still give: `check`, like `qemu-img check`, walks the
/// metadata and never decompresses a compressed cluster, so corrupt compressed data shows only
/// when it is read (or copied-on-write).
fn data_error(e: &tapmirror::image::ImageError) -> bool {
    e.to_string().contains("decompress") || format!("{e:?}").contains("decompress")
}

/// The portable engine, or io_uring with `TAPMIRROR_IO_ENGINE=uring` (as `tapmirror serve`
/// reads it).
fn engine() -> EngineKind {
    static ENGINE: OnceLock<EngineKind> = OnceLock::new();
    *ENGINE.get_or_init(|| match tapmirror::io::EngineChoice::from_env() {
        tapmirror::io::EngineChoice::Uring => EngineKind::Uring,
        _ => EngineKind::Portable,
    })
}

async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    match tokio::time::timeout(STALL_LIMIT, f).await {
        Ok(v) => v,
        Err(_) => panic!("{what} did not end within {STALL_LIMIT:?}"),
    }
}

fuzz_target!(|data: &[u8]| {
    let h = harness();
    std::fs::write(&h.path, data).expect("write input");
    // A stack overflow kills the process before libFuzzer can save the input; this keeps it.
    if let Some(p) = std::env::var_os("TAPMIRROR_FUZZ_SAVE") {
        std::fs::write(p, data).expect("save the input");
    }
    h.rt.block_on(async {
        let _ = within("info", qcow2::info(&h.path)).await;
        let checked = within("check", qcow2::check(&h.path)).await;
        let sound = checked.is_ok();
        let opened = within("open", Qcow2Image::open(&h.path, Access::ReadWrite, engine())).await;
        if std::env::var_os("TAPMIRROR_FUZZ_VERBOSE").is_some() {
            let open = opened.as_ref().map(|i| i.size()).map_err(ToString::to_string);
            eprintln!("check: {checked:?}; open: {open:?}");
        }
        let img = match opened {
            Err(e) => {
                assert!(!sound, "check passed but open failed: {e}");
                let now = std::fs::read(&h.path).expect("read back");
                assert!(now == data, "a file that failed to open was modified");
                return;
            }
            Ok(img) => img,
        };
        let size = img.size();
        for off in [0, size.saturating_sub(65536)] {
            let n = (size - off).min(65536) as usize;
            let (_, r) = within("read", img.read(off, IoBuf::new(n))).await;
            if sound && let Err(e) = r {
                assert!(data_error(&e), "read of a sound image: {e:?}");
            }
        }
        let map = within("allocation", img.allocation(0, size.min(4 << 20), 64)).await;
        if sound {
            map.expect("allocation map of a sound image");
        }
        if size >= 1024 {
            let seed = data.iter().take(64).fold(0u64, |a, &b| a.wrapping_mul(31).wrapping_add(u64::from(b)));
            let off = seed % (size - 1000);
            let payload: Vec<u8> = (0..1000u32).map(|i| (i as u8) ^ (seed as u8) | 1).collect();
            let w = within("write", img.write(off, Arc::new(IoBuf::from_vec(payload.clone())), Durability::Cached)).await;
            let (b, r) = within("read back", img.read(off, IoBuf::new(1000))).await;
            // Only on a sound image: where two guest clusters share a host cluster, or one lies
            // past the end where the allocator hands out new ones, a write shows up elsewhere
            // too, in QEMU as here (its overlap checks guard metadata, not data). The open's
            // checks cannot see that without reading every L2 table, which `check` does.
            match (w, r) {
                (Ok(()), Ok(())) if sound => assert!(b[..] == payload[..], "written bytes do not read back"),
                (Ok(()), Err(e)) if sound => panic!("a write succeeded but reading it back failed: {e}"),
                (Err(e), _) if sound => assert!(data_error(&e), "write to a sound image: {e:?}"),
                _ => {}
            }
        }
        let closed = within("close", img.close()).await;
        if sound {
            closed.expect("close of a sound image");
            if let Err(e) = within("check after", qcow2::check(&h.path)).await {
                panic!("a write broke a sound file: {e}");
            }
        }
    });
});
