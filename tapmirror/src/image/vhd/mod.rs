//! VHD images (Microsoft Virtual Hard Disk, as XenServer's SMAPIv1 keeps VDIs): dynamic and
//! differencing disks and their chains, in our own code.
//!
//! ```text
//!   format.rs  footer, dynamic header, locators, checksum, CHS and size rule, bitmaps
//!   meta.rs    read + validate one file (footers, header, BAT, overlaps)
//!   chain.rs   find parents (locators, UUID check, loops), flock
//!   image.rs   VhdImage: the Image trait over a chain (reads per sector, crash-safe writes)
//!   ops.rs     create, snapshot, clone, compose, resize, coalesce, check, info, diff_map
//! ```
//!
//! # Layout (spec §"Dynamic Disk Header Format"; `../shared/research/datapath.md` §5.1)
//!
//! ```text
//!   0      footer copy (512)
//!   512    dynamic header (1024)        -> table_offset, block size, parent UUID + locators
//!   1536   BAT (4 bytes per block, sector offsets, 0xFFFFFFFF = none), padded to 512
//!          parent locator data (differencing disks)
//!          blocks: [sector bitmap, 1 bit per sector, padded to 512][block_size bytes of data]
//!   end    footer (512)
//! ```
//!
//! Reads resolve every 512-byte sector through the chain: the leaf if its block is allocated
//! and the sector's bitmap bit is set, else its parent, and so on; zeroes when no layer has it.
//! Bitmaps are honoured for dynamic disks too (a clear bit reads as zero, as in blktap).
//!
//! # Write order and crash safety
//!
//! A write into sectors the leaf already holds is a plain overwrite of those sectors (a crash
//! leaves each 512-byte sector old or new, as with a raw file). A write that needs metadata goes
//! in this order, and the argument for each step is what a crash right before it leaves behind:
//!
//! **Allocating a block** (the block goes where the end footer is, at offset `P`):
//! 1. *Write a copy of the footer at `P + bitmap + block_size`* (the new end of file). Before
//!    this, nothing changed. After it, the file ends with a footer again, and `[P, new end)` is
//!    unreferenced space: a crash leaks it (reads and `check` are unaffected, and the next
//!    allocation goes after the new footer, into fresh space). This comes first because step 3
//!    overwrites the old footer: doing that first would let a crash leave a file with no end
//!    footer.
//! 2. *Write the data* (the written sectors, partial sectors completed with the content below)
//!    into the new block's data area. Nothing references it yet.
//! 3. *Write the sector bitmap* at `P` (bits of the written sectors only, so a differencing disk
//!    still shows its parent in the rest of the block). Still unreferenced.
//! 4. *Barrier* (`fdatasync`): data and bitmap are on stable storage before the BAT entry can be.
//! 5. *Write the BAT sector* holding the new entry. This single 512-byte write makes the block
//!    visible, with data and bitmap already in place: a crash before it shows the old content, a
//!    crash after it the new one. BAT sectors are rewritten from a copy of the file's table under
//!    one mutex, so allocations never drop each other's entries.
//!
//! **Setting bitmap bits in an allocated block** (sectors the leaf does not hold yet): write the
//! data (invisible while the bits are clear; partial sectors completed from below), barrier,
//! then write the bitmap sector. The bits flip from clear to set in one 512-byte write after the
//! data is there, so each sector reads old then new, never garbage.
//!
//! **Sync points** ([`CrashSafety::PowerLoss`], the default). Steps 4 and 5, and a bit-set's
//! barrier and bitmap write, do not happen per write: the new bits and BAT entries are published
//! in memory (this process reads through them at once) and the block is noted as lagging. At
//! the next sync point (a flush, a [`Durability::Stable`](crate::io::Durability) write, a
//! `pause` of the server, closing the image, and every second in `tapmirror serve`
//! ([`Image::sync_metadata`](crate::image::Image::sync_metadata))) the lagging blocks are taken,
//! one `fdatasync` covers all their data, and then their bitmaps and BAT sectors are written; a
//! flush then syncs again so they are durable too. This is how QEMU's qcow2 treats its metadata
//! caches and how a disk's volatile write cache behaves: writes since the last flush may be lost
//! by a crash (in `tapmirror serve`, about a second's worth at most), flushed ones never, and no
//! sector ever reads as anything but its old or its new content. The
//! alternative, a barrier in every write that sets bits, made a QD1 4 KiB random write into a
//! fresh differencing leaf (every SMAPIv1 VDI right after a snapshot) cost an `fdatasync`:
//! 115 µs against 20 µs here (benches/README.md, "VHD writes into fresh sectors").
//!
//! **Process crash vs power loss.** A power loss may write back dirty pages in any order; the
//! barrier keeps the BAT entry or bitmap from reaching the disk before the bytes it describes
//! (without it, sectors could read as zeroes, or a BAT entry could point at a bitmap that still
//! holds the old footer's bytes). A SIGKILL loses the metadata still lagging in memory, so the
//! writes it describes read as old; nothing else. What a power loss can still cost: the new end
//! footer (step 1) is not behind a barrier, so it may be lost while the bitmap that overwrote the
//! old one survived; the file then has no footer at its end, and opening falls back to the copy
//! at offset 0 (a warning in `check`), with the next allocation writing a footer again.
//! [`CrashSafety::ProcessCrash`] writes the metadata at once and drops the barriers, for scratch
//! targets: no completed write is lost to a SIGKILL, but a power loss may leave recent sectors
//! reading as zeroes.
//!
//! # Validation
//!
//! Opening validates every file of the chain before anything is written (`meta.rs`): checksums,
//! BAT entries inside the file and not overlapping each other or the metadata, bitmaps inside
//! the file, parents found and matching by UUID, no loops. Any failure is an error and no write
//! ever touches that file. Parents are opened read-only; the leaf, when writable, under an
//! exclusive `flock` so that two writers cannot interleave allocations.
//!
//! # Sizes
//!
//! QEMU's rule decides the virtual size: `current_size` for creators `tap\0` (XenServer),
//! `win `, `qem2`, `d2v `, `CTXS`; CHS for every other creator (`qemu`, `vpc `), unless the
//! geometry is the maximum one. We create files as blktap does (creator `tap\0`), so QEMU reads
//! exactly the size we write. The limit is 2040 GiB.

mod chain;
mod error;
pub mod format;
mod image;
mod meta;
mod ops;

pub use error::{Result, VhdError, VhdErrorKind};
pub use format::{DEFAULT_BLOCK_SIZE, DiskType, MAX_SIZE, SizeSource};
pub use image::{CrashSafety, VhdImage};
pub use ops::{
    CheckReport, LayerReport, VhdInfo, check, clone, coalesce, compose, create_differencing, create_dynamic,
    create_dynamic_reserved, diff_map, info, is_vhd, resize, snapshot, written_bytes,
};

#[cfg(test)]
mod tests;
