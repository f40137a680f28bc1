//! Reading and validating the metadata of one VHD file: both footers, the dynamic header, the
//! BAT, the parent locator areas and blktap's batmap.
//!
//! Validation runs before anything else touches a file, and a file that fails it is never
//! written (the caller gets the error before it has a handle to write with). It checks:
//!
//! - the footer at the end and its copy at offset 0: cookie and checksum; a damaged footer is an
//!   error, a missing end footer (no cookie: the state a power loss during an allocation can
//!   leave, see the crash-safety notes in `mod.rs`) is tolerated when the copy at 0 is sound;
//! - the disk type (dynamic or differencing; fixed disks are unsupported);
//! - the header: cookie, checksum, block size (a power of two, 512 B to 256 MiB), a BAT large
//!   enough for the virtual size, a virtual size within 2040 GiB;
//! - that every structure lies inside the file, and that no two of the footer copy, header, BAT,
//!   locator areas, batmap and data blocks (bitmap + data) overlap.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::error::{Result, VhdError};
use super::format::{
    self, BAT_UNUSED, BATMAP_COOKIE, DiskType, FOOTER_LEN, Footer, HEADER_LEN, Header, MAX_BLOCK_SIZE, MAX_SIZE,
    ParseError, SECTOR, SizeSource, platform,
};

/// The batmap blktap keeps after the BAT (tapdisk files of creator version 1.1 and up).
#[derive(Clone, Debug)]
pub struct Batmap {
    /// Offset of its 512-byte header.
    pub header_offset: u64,
    /// The header's first bytes as read (cookie, offset, size, version, checksum, marker...).
    pub header: Vec<u8>,
    /// Offset of the map.
    pub map_offset: u64,
    /// Bytes of map.
    pub map_len: u64,
}

/// The validated metadata of one file.
#[derive(Clone, Debug)]
pub struct Meta {
    /// The file.
    pub path: PathBuf,
    /// Its length when read.
    pub file_len: u64,
    /// The footer in force (the one at the end; the copy at 0 when the end one is missing).
    pub footer: Footer,
    /// Whether the last 512 bytes are a sound footer.
    pub end_footer: bool,
    /// The dynamic header.
    pub header: Header,
    /// Dynamic or differencing.
    pub disk_type: DiskType,
    /// Virtual size in bytes.
    pub size: u64,
    /// Where the size came from.
    pub size_source: SizeSource,
    /// Bytes per block.
    pub block_size: u64,
    /// Bytes of bitmap in front of each block.
    pub bitmap_bytes: u64,
    /// The BAT, `max_table_entries` long.
    pub bat: Vec<u32>,
    /// Where the next block goes: the end footer's offset (or the file end when that footer is
    /// missing), rounded up to a sector. Everything from here on is free.
    pub end: u64,
    /// blktap's batmap, when present.
    pub batmap: Option<Batmap>,
    /// Sound but unusual findings (`check` reports them).
    pub warnings: Vec<String>,
}

/// Reads exactly `len` bytes at `offset`.
pub fn read_at(file: &File, path: &Path, offset: u64, len: usize, what: &str) -> Result<Vec<u8>> {
    let mut b = vec![0u8; len];
    file.read_exact_at(&mut b, offset).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            VhdError::corrupt(path, format!("truncated: {what} at {offset} ({len} bytes) runs past the end of file"))
        } else {
            VhdError::io(path, format!("read {what} at {offset}"), e)
        }
    })?;
    Ok(b)
}

/// A named byte range, for the overlap check.
struct Region {
    start: u64,
    end: u64,
    what: String,
}

impl Meta {
    /// Reads and validates the metadata of `file`.
    pub fn read(file: &File, path: &Path) -> Result<Meta> {
        let file_len = crate::image::byte_len(file).map_err(|e| VhdError::io(path, "stat", e))?;
        let corrupt = |reason: String| VhdError::corrupt(path, reason);
        if file_len < 3 * SECTOR {
            return Err(corrupt(format!("truncated: {file_len} bytes is too short for a footer and a header")));
        }

        // Footers: the one at the end is primary (spec, blktap); the copy at 0 must be sound.
        let copy = Footer::parse(&read_at(file, path, 0, FOOTER_LEN, "footer copy")?);
        let end_bytes = read_at(file, path, file_len - FOOTER_LEN as u64, FOOTER_LEN, "footer")?;
        let mut warnings = Vec::new();
        let (footer, end_footer) = match (Footer::parse(&end_bytes), copy) {
            (Ok(end), Ok(copy)) => {
                if end != copy {
                    warnings.push(
                        "the footer copy at offset 0 differs from the footer at the end; using the end one".into(),
                    );
                }
                (end, true)
            }
            (Ok(end), Err(ParseError::NoCookie)) => {
                return Err(corrupt(match end.disk_type() {
                    Some(DiskType::Fixed) => "no footer copy at offset 0: a fixed VHD (those are not supported)".into(),
                    // Not a fixed disk: a dynamic one whose first sector is damaged.
                    _ => format!("no footer copy at offset 0, though the footer at the end says a disk of type {} (dynamic or differencing): its start is damaged", end.disk_type_code),
                }));
            }
            // No VHD cookie at either end: wholly damaged, or some other kind of file.
            (Err(ParseError::NoCookie), Err(ParseError::NoCookie)) => {
                return Err(corrupt("no \"conectix\" footer at its start or its end: not a VHD (another format?)".into()));
            }
            (_, Err(e)) => return Err(corrupt(format!("footer copy at offset 0: {e}"))),
            (Err(ParseError::NoCookie), Ok(copy)) => {
                warnings.push(
                    "no footer at the end of the file (an interrupted allocation?); using the copy at offset 0".into(),
                );
                (copy, false)
            }
            // A damaged end footer beside a sound copy: the copy, as libvhd's backup footer.
            (Err(e), Ok(copy)) => {
                warnings.push(format!("the footer at the end of the file is unreadable ({e}); using the copy at offset 0"));
                (copy, false)
            }
        };
        let disk_type = match footer.disk_type() {
            Some(DiskType::Fixed) => return Err(VhdError::unsupported(path, "fixed disks are not supported")),
            Some(t) => t,
            None => return Err(corrupt(format!("unknown disk type {}", footer.disk_type_code))),
        };
        // With the end footer in place, data ends where it starts; without it, at the file end.
        let data_end = if end_footer { file_len - FOOTER_LEN as u64 } else { file_len };

        // Header.
        let hoff = footer.data_offset;
        if hoff < SECTOR {
            return Err(corrupt(format!("dynamic header offset {hoff} overlaps the footer copy (the first 512 bytes)")));
        }
        if hoff.checked_add(HEADER_LEN as u64).is_none_or(|e| e > data_end) {
            return Err(corrupt(format!("dynamic header offset {hoff} lies outside the file ({file_len} bytes)")));
        }
        let header = Header::parse(&read_at(file, path, hoff, HEADER_LEN, "dynamic header")?)
            .map_err(|e| corrupt(format!("dynamic header at {hoff}: {e}")))?;
        let bs = header.block_size;
        if !bs.is_power_of_two() || u64::from(bs) < SECTOR || bs > MAX_BLOCK_SIZE {
            return Err(corrupt(format!("block size {bs} is not a power of two between 512 B and 256 MiB")));
        }
        let block_size = u64::from(bs);
        let bitmap_bytes = format::bitmap_bytes(block_size);
        let (size, size_source) = footer.virtual_size();
        if size > MAX_SIZE {
            return Err(corrupt(format!("virtual size {size} exceeds the 2040 GiB limit")));
        }
        let entries = u64::from(header.max_table_entries);
        if entries * block_size < size {
            return Err(corrupt(format!(
                "BAT too small: {entries} entries of {block_size} bytes cannot map {size} bytes"
            )));
        }
        // A BAT may be made for a disk larger than this one (blktap's `vhd-util create -S`
        // leaves room to grow), never past the largest VHD: a crafted header naming 2^29
        // entries, sparse in a 1 MB file, made every open read 2 GiB of table.
        if entries > size.div_ceil(block_size).max(MAX_SIZE.div_ceil(block_size)) {
            return Err(corrupt(format!(
                "BAT of {entries} entries of {block_size} bytes maps more than the largest VHD (2040 GiB)"
            )));
        }
        let toff = header.table_offset;
        let bat_len = format::sector_align(entries * 4);
        if toff < SECTOR {
            return Err(corrupt(format!("BAT at {toff} overlaps the footer copy (the first 512 bytes)")));
        }
        if toff.checked_add(bat_len).is_none_or(|e| e > data_end) {
            return Err(corrupt(format!("BAT at {toff} ({bat_len} bytes) lies outside the file ({file_len} bytes)")));
        }
        let raw = read_at(file, path, toff, bat_len as usize, "BAT")?;
        let bat: Vec<u32> =
            raw.chunks_exact(4).take(entries as usize).map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]])).collect();

        let mut regions = vec![
            Region { start: 0, end: SECTOR, what: "the footer copy".into() },
            Region { start: hoff, end: hoff + HEADER_LEN as u64, what: "the dynamic header".into() },
            Region { start: toff, end: toff + bat_len, what: "the BAT".into() },
        ];
        if disk_type == DiskType::Differencing {
            for (i, l) in header.locators.iter().enumerate() {
                if !matches!(l.code, platform::W2RU | platform::W2KU | platform::MACX) {
                    continue;
                }
                let Some(space) = l.space_bytes() else {
                    return Err(corrupt(format!("parent locator {i}: invalid data space {}", l.data_space)));
                };
                let space = space.max(u64::from(l.data_len));
                if space == 0 {
                    continue;
                }
                if l.data_offset < SECTOR || l.data_offset.checked_add(space).is_none_or(|e| e > data_end) {
                    return Err(corrupt(format!(
                        "parent locator {i} data at {} ({space} bytes) lies outside the file",
                        l.data_offset
                    )));
                }
                regions.push(Region {
                    start: l.data_offset,
                    end: l.data_offset + space,
                    what: format!("parent locator {i}"),
                });
            }
        }
        let batmap = read_batmap(file, &footer, toff + bat_len, data_end);
        if let Some(b) = &batmap {
            regions.push(Region {
                start: b.header_offset,
                end: b.header_offset + SECTOR,
                what: "the batmap header".into(),
            });
            regions.push(Region { start: b.map_offset, end: b.map_offset + b.map_len, what: "the batmap".into() });
        }
        // New blocks start on a sector (BAT entries count sectors), even in a file whose length
        // is not a multiple of 512.
        let mut end = format::sector_align(data_end);
        for r in &regions {
            end = end.max(r.end);
        }
        for (i, &e) in bat.iter().enumerate() {
            if e == BAT_UNUSED {
                continue;
            }
            let start = u64::from(e) * SECTOR;
            if start + bitmap_bytes > data_end {
                return Err(corrupt(format!(
                    "block {i}: its sector bitmap at {start} lies beyond the end of the data ({data_end})"
                )));
            }
            if start + bitmap_bytes + block_size > data_end {
                return Err(corrupt(format!(
                    "block {i}: BAT entry points past the end of file (block ends at {}, data ends at {data_end})",
                    start + bitmap_bytes + block_size
                )));
            }
            regions.push(Region { start, end: start + bitmap_bytes + block_size, what: format!("block {i}") });
        }
        regions.sort_by_key(|r| (r.start, r.end));
        for w in regions.windows(2) {
            if w[1].start < w[0].end {
                return Err(corrupt(format!(
                    "{} ({}..{}) overlaps {} ({}..{})",
                    w[1].what, w[1].start, w[1].end, w[0].what, w[0].start, w[0].end
                )));
            }
        }
        Ok(Meta {
            path: path.to_owned(),
            file_len,
            footer,
            end_footer,
            header,
            disk_type,
            size,
            size_source,
            block_size,
            bitmap_bytes,
            bat,
            end,
            batmap,
            warnings,
        })
    }

    /// Allocated blocks.
    pub fn allocated_blocks(&self) -> u64 {
        self.bat.iter().filter(|&&e| e != BAT_UNUSED).count() as u64
    }

    /// The footer's UUID.
    pub fn uuid(&self) -> [u8; 16] {
        self.footer.uuid
    }
}

/// blktap's batmap, when its header is where blktap puts it and its cookie is there. Its
/// contents are not needed to read or write (it only says which blocks are full); it is found so
/// that its area counts as metadata and so that a BAT move can carry it along.
fn read_batmap(file: &File, footer: &Footer, at: u64, data_end: u64) -> Option<Batmap> {
    if &footer.creator_app[..3] != b"tap" || at + SECTOR > data_end {
        return None;
    }
    let mut h = vec![0u8; SECTOR as usize];
    file.read_exact_at(&mut h, at).ok()?;
    if &h[..8] != BATMAP_COOKIE {
        return None;
    }
    let map_offset = u64::from_be_bytes(h[8..16].try_into().ok()?);
    let map_len = u64::from(u32::from_be_bytes(h[16..20].try_into().ok()?)) * SECTOR;
    if map_offset < SECTOR || map_offset.checked_add(map_len).is_none_or(|e| e > data_end) {
        return None;
    }
    Some(Batmap { header_offset: at, header: h, map_offset, map_len })
}
