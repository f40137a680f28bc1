//! Fuzzes the VHD parser and validator (`tapmirror::image::vhd`): the input is a whole file.
//!
//! Each input is written to `fuzz.vhd` in a private temporary folder (on `/dev/shm` when it
//! exists), then:
//! - `check`, `info` and `VhdImage::open` (read-write, portable engine, no barriers) must agree:
//!   all succeed or all fail, and nothing panics;
//! - when they fail, the file's bytes must be exactly the input (no write touches a file that
//!   failed validation);
//! - when they succeed: reads of the first and last 64 KiB and the allocation map of the first
//!   4 MiB must work; one small unaligned write (offset and bytes from the input) must read back;
//!   and afterwards `check` must still pass (a write never breaks a sound file).
//!
//! Differencing inputs look for their parent through their own locators; only files in the
//! folder or absolute paths named by the input can be found, and those fail validation unless
//! they are VHDs, so nothing outside is ever opened for writing (parents are opened read-only).

#![no_main]

mod common;

use common::FileHarness;

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use tapmirror::image::vhd::{self, CrashSafety, VhdImage};
use tapmirror::image::{Access, Image};
use tapmirror::io::{Durability, EngineKind, IoBuf};

fn harness() -> &'static FileHarness {
    static H: OnceLock<FileHarness> = OnceLock::new();
    H.get_or_init(|| FileHarness::new("fuzz.vhd"))
}

fuzz_target!(|data: &[u8]| {
    let h = harness();
    std::fs::write(&h.path, data).expect("write input");
    let checked = vhd::check(&h.path);
    let info = vhd::info(&h.path);
    assert_eq!(checked.is_ok(), info.is_ok(), "check {checked:?} vs info {info:?}");
    h.rt.block_on(async {
        let opened =
            VhdImage::open_with(&h.path, Access::ReadWrite, EngineKind::Portable, CrashSafety::ProcessCrash).await;
        let img = match opened {
            Err(e) => {
                assert!(checked.is_err(), "check passed but open failed: {e}");
                let now = std::fs::read(&h.path).expect("read back");
                assert!(now == data, "a file that failed validation was modified");
                return;
            }
            Ok(img) => img,
        };
        if let Err(e) = &checked {
            panic!("open succeeded but check failed: {e}");
        }
        let size = img.size();
        for off in [0, size.saturating_sub(65536)] {
            let n = (size - off).min(65536) as usize;
            let (_, r) = img.read(off, IoBuf::new(n)).await;
            r.expect("read of a validated image");
        }
        img.allocation(0, size.min(4 << 20), 64).await.expect("allocation");
        if size >= 1024 {
            let seed = data.iter().take(64).fold(0u64, |a, &b| a.wrapping_mul(31).wrapping_add(u64::from(b)));
            let off = seed % (size - 1000);
            let payload: Vec<u8> = (0..1000u32).map(|i| (i as u8) ^ (seed as u8) | 1).collect();
            img.write(off, Arc::new(IoBuf::from_vec(payload.clone())), Durability::Cached).await.expect("write");
            let (b, r) = img.read(off, IoBuf::new(1000)).await;
            r.expect("read back");
            assert!(b[..] == payload[..], "written bytes do not read back");
        }
        drop(img);
        if let Err(e) = vhd::check(&h.path) {
            panic!("a write broke a sound file: {e}");
        }
    });
});
