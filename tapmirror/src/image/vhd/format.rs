//! The on-disk structures of a VHD file and the pure rules around them: footer, dynamic header,
//! parent locators, checksums, CHS geometry, the virtual-size rule, sector bitmaps and VHD time.
//!
//! Every field is big-endian (Microsoft "Virtual Hard Disk Image Format Specification" 1.0,
//! §"Hard Disk Footer Format" and §"Dynamic Disk Header Format"). Parsed structures keep the raw
//! bytes they came from, so rewriting a structure we did not create (a blktap or Hyper-V file)
//! keeps reserved and vendor bytes (blktap's `hidden` flag, for example) unchanged.

use std::time::{SystemTime, UNIX_EPOCH};

/// Bytes per VHD sector; every offset in the format counts these.
pub const SECTOR: u64 = 512;
/// Footer cookie ("conectix"), at offset 0 of the footer.
pub const FOOTER_COOKIE: &[u8; 8] = b"conectix";
/// Dynamic header cookie ("cxsparse").
pub const HEADER_COOKIE: &[u8; 8] = b"cxsparse";
/// blktap's batmap header cookie ("tdbatmap"), found right after the BAT of tapdisk files.
pub const BATMAP_COOKIE: &[u8; 8] = b"tdbatmap";
/// Footer size.
pub const FOOTER_LEN: usize = 512;
/// Dynamic header size.
pub const HEADER_LEN: usize = 1024;
/// A BAT entry that maps no block.
pub const BAT_UNUSED: u32 = 0xFFFF_FFFF;
/// Largest virtual size QEMU and blktap accept: 2040 GiB.
pub const MAX_SIZE: u64 = 2040 << 30;
/// Default block size (2 MiB), as XenServer, QEMU and Hyper-V use.
pub const DEFAULT_BLOCK_SIZE: u32 = 2 << 20;
/// Largest block size we accept (its bitmap is 64 KiB).
pub const MAX_BLOCK_SIZE: u32 = 256 << 20;
/// Footer `features`: bit 1 ("reserved") must always be set.
pub const FEATURES_RESERVED: u32 = 0x0000_0002;
/// Footer file-format version 1.0; also the dynamic header's version.
pub const FORMAT_VERSION: u32 = 0x0001_0000;
/// Creator application we write: blktap's "tap\0", so QEMU takes the size from `current_size`.
pub const CREATOR_APP: [u8; 4] = *b"tap\0";
/// Creator version we write: blktap's 1.1 ("big-endian bitmaps"). From 1.2 on, tapdisk requires a
/// batmap (`vhd_has_batmap`), which we do not keep.
pub const CREATOR_VERSION: u32 = 0x0001_0001;
/// Creator host OS we write (blktap writes 0).
pub const CREATOR_OS: u32 = 0;
/// Seconds from the Unix epoch to the VHD epoch, 2000-01-01T00:00:00Z.
pub const VHD_EPOCH: u64 = 946_684_800;
/// The largest CHS geometry, 65535 × 16 × 255 sectors; a disk with it takes its size from
/// `current_size` whatever its creator.
pub const MAX_CHS_SECTORS: u64 = 65535 * 16 * 255;

/// Parent locator platform codes (dynamic header, §"Parent Locator Entry").
pub mod platform {
    /// No locator.
    pub const NONE: u32 = 0;
    /// Deprecated Windows relative path (ASCII).
    pub const WI2R: u32 = 0x5769_3272;
    /// Deprecated Windows absolute path (ASCII).
    pub const WI2K: u32 = 0x5769_326B;
    /// Windows relative path, UTF-16LE.
    pub const W2RU: u32 = 0x5732_7275;
    /// Windows absolute path, UTF-16LE.
    pub const W2KU: u32 = 0x5732_6B75;
    /// Mac OS alias (deprecated).
    pub const MAC: u32 = 0x4D61_6320;
    /// Mac OS X URL (`file://...`), UTF-8.
    pub const MACX: u32 = 0x4D61_6358;
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}
fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn be64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(x)
}
fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}
fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

/// The VHD checksum: the one's complement of the 32-bit sum of every byte, the 4 bytes of the
/// checksum field itself (at `field`) counted as zero.
pub fn checksum(bytes: &[u8], field: usize) -> u32 {
    let mut sum = 0u32;
    for (i, &b) in bytes.iter().enumerate() {
        if !(field..field + 4).contains(&i) {
            sum = sum.wrapping_add(u32::from(b));
        }
    }
    !sum
}

/// Rounds `n` up to a whole number of sectors.
pub fn sector_align(n: u64) -> u64 {
    n.div_ceil(SECTOR) * SECTOR
}

/// What a disk is, from the footer's `disk type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskType {
    /// Raw data followed by a footer (2).
    Fixed,
    /// Sparse, with a BAT; unallocated blocks read as zeroes (3).
    Dynamic,
    /// Sparse, with a BAT and a parent; unallocated sectors read from the parent (4).
    Differencing,
}

impl DiskType {
    /// The footer value.
    pub fn code(self) -> u32 {
        match self {
            DiskType::Fixed => 2,
            DiskType::Dynamic => 3,
            DiskType::Differencing => 4,
        }
    }

    fn from_code(code: u32) -> Option<DiskType> {
        match code {
            2 => Some(DiskType::Fixed),
            3 => Some(DiskType::Dynamic),
            4 => Some(DiskType::Differencing),
            _ => None,
        }
    }
}

/// Cylinders, heads and sectors per track, as the footer stores them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Chs {
    /// Cylinders (16 bits).
    pub cylinders: u16,
    /// Heads (8 bits).
    pub heads: u8,
    /// Sectors per track (8 bits).
    pub sectors: u8,
}

impl Chs {
    /// Sectors the geometry addresses.
    pub fn total_sectors(self) -> u64 {
        u64::from(self.cylinders) * u64::from(self.heads) * u64::from(self.sectors)
    }

    /// The geometry the VHD specification (appendix "CHS Calculation") gives for a disk of
    /// `total_sectors`; it rounds down, so it may address fewer sectors than asked for.
    pub fn from_sectors(total_sectors: u64) -> Chs {
        let secs = total_sectors.min(MAX_CHS_SECTORS);
        let (spt, heads, cth);
        if secs >= 65535 * 16 * 63 {
            spt = 255;
            heads = 16;
            cth = secs / spt;
        } else {
            let mut s = 17;
            let mut c = secs / s;
            let mut h = c.div_ceil(1024).max(4);
            if c >= h * 1024 || h > 16 {
                s = 31;
                h = 16;
                c = secs / s;
            }
            if c >= h * 1024 {
                s = 63;
                h = 16;
                c = secs / s;
            }
            spt = s;
            heads = h;
            cth = c;
        }
        Chs { cylinders: (cth / heads).min(65535) as u16, heads: heads as u8, sectors: spt as u8 }
    }

    /// The smallest spec geometry that addresses at least `total_sectors` (QEMU's `vpc_create`
    /// loop), or the maximum geometry when none does.
    pub fn covering(total_sectors: u64) -> Chs {
        let want = total_sectors.min(MAX_CHS_SECTORS);
        let mut i = 0;
        loop {
            let g = Chs::from_sectors(want + i);
            if g.total_sectors() >= want || want + i >= MAX_CHS_SECTORS {
                return g;
            }
            i += 1;
        }
    }

    /// Whether this is the largest geometry (the disk then takes its size from `current_size`).
    pub fn is_max(self) -> bool {
        self.total_sectors() == MAX_CHS_SECTORS
    }
}

/// Where the virtual size of a disk comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SizeSource {
    /// The footer's `current_size` field.
    CurrentSize,
    /// The CHS geometry.
    Chs,
}

/// Creator applications whose size comes from the CHS geometry: Virtual PC (`vpc `) and QEMU
/// without `force_size` (`qemu`). Every other creator (Hyper-V, QEMU's `qem2`, Disk2vhd,
/// XenServer's blktap, XenConverter, Azure, and any tool not listed) gets `current_size`, and
/// so does a disk whose geometry is the maximum one. This is QEMU's rule since 9.2
/// (`vpc_ignore_current_size` in `block/vpc.c`; before, every creator but a list of five took
/// the geometry), so QEMU and we agree on every file; tapdisk always uses `current_size`,
/// which differs only for files made by those two.
const CHS_CREATORS: [&[u8; 4]; 2] = [b"vpc ", b"qemu"];

/// The 512-byte hard disk footer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Footer {
    /// Feature bits (bit 1 always set).
    pub features: u32,
    /// File-format version.
    pub version: u32,
    /// Offset of the dynamic header (`u64::MAX` for fixed disks).
    pub data_offset: u64,
    /// Creation time, seconds since 2000-01-01 UTC.
    pub timestamp: u32,
    /// Creator application (`tap\0`, `qemu`, `win `, ...).
    pub creator_app: [u8; 4],
    /// Creator version.
    pub creator_version: u32,
    /// Creator host OS.
    pub creator_os: u32,
    /// Size at creation.
    pub original_size: u64,
    /// Current size in bytes.
    pub current_size: u64,
    /// Disk geometry.
    pub geometry: Chs,
    /// Disk type, as read (validated by [`Footer::disk_type`]).
    pub disk_type_code: u32,
    /// The disk's unique id.
    pub uuid: [u8; 16],
    /// Saved-state flag.
    pub saved_state: u8,
    raw: [u8; FOOTER_LEN],
}

/// Why a footer or header did not parse.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ParseError {
    /// The cookie is not there: this is not the structure at all.
    NoCookie,
    /// The cookie is there but the checksum is wrong.
    Checksum {
        /// Stored checksum.
        stored: u32,
        /// Computed checksum.
        computed: u32,
    },
    /// The structure is there but a field is impossible.
    Field(String),
}

impl std::fmt::Display for ParseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ParseError::NoCookie => write!(f, "cookie missing"),
            ParseError::Checksum { stored, computed } => {
                write!(f, "bad checksum (stored {stored:#010x}, computed {computed:#010x})")
            }
            ParseError::Field(s) => f.write_str(s),
        }
    }
}

impl Footer {
    /// A footer for a new sparse disk of `size` bytes with its header at `data_offset`.
    pub fn new(disk_type: DiskType, size: u64, data_offset: u64, uuid: [u8; 16]) -> Footer {
        Footer {
            features: FEATURES_RESERVED,
            version: FORMAT_VERSION,
            data_offset,
            timestamp: vhd_time_now(),
            creator_app: CREATOR_APP,
            creator_version: CREATOR_VERSION,
            creator_os: CREATOR_OS,
            original_size: size,
            current_size: size,
            geometry: Chs::from_sectors(size / SECTOR),
            disk_type_code: disk_type.code(),
            uuid,
            saved_state: 0,
            raw: [0u8; FOOTER_LEN],
        }
    }

    /// Parses and checks (cookie, checksum) a footer.
    pub fn parse(b: &[u8]) -> Result<Footer, ParseError> {
        if b.len() < FOOTER_LEN || &b[..8] != FOOTER_COOKIE {
            return Err(ParseError::NoCookie);
        }
        let stored = be32(b, 64);
        let computed = checksum(&b[..FOOTER_LEN], 64);
        if stored != computed {
            return Err(ParseError::Checksum { stored, computed });
        }
        let mut raw = [0u8; FOOTER_LEN];
        raw.copy_from_slice(&b[..FOOTER_LEN]);
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&b[68..84]);
        Ok(Footer {
            features: be32(b, 8),
            version: be32(b, 12),
            data_offset: be64(b, 16),
            timestamp: be32(b, 24),
            creator_app: [b[28], b[29], b[30], b[31]],
            creator_version: be32(b, 32),
            creator_os: be32(b, 36),
            original_size: be64(b, 40),
            current_size: be64(b, 48),
            geometry: Chs { cylinders: be16(b, 56), heads: b[58], sectors: b[59] },
            disk_type_code: be32(b, 60),
            uuid,
            saved_state: b[84],
            raw,
        })
    }

    /// The footer's bytes, checksum included. Bytes we do not model keep the values they had.
    pub fn encode(&self) -> [u8; FOOTER_LEN] {
        let mut b = self.raw;
        b[..8].copy_from_slice(FOOTER_COOKIE);
        put32(&mut b, 8, self.features);
        put32(&mut b, 12, self.version);
        put64(&mut b, 16, self.data_offset);
        put32(&mut b, 24, self.timestamp);
        b[28..32].copy_from_slice(&self.creator_app);
        put32(&mut b, 32, self.creator_version);
        put32(&mut b, 36, self.creator_os);
        put64(&mut b, 40, self.original_size);
        put64(&mut b, 48, self.current_size);
        b[56..58].copy_from_slice(&self.geometry.cylinders.to_be_bytes());
        b[58] = self.geometry.heads;
        b[59] = self.geometry.sectors;
        put32(&mut b, 60, self.disk_type_code);
        b[68..84].copy_from_slice(&self.uuid);
        b[84] = self.saved_state;
        let sum = checksum(&b, 64);
        put32(&mut b, 64, sum);
        b
    }

    /// The disk type, when the code is a known one.
    pub fn disk_type(&self) -> Option<DiskType> {
        DiskType::from_code(self.disk_type_code)
    }

    /// The creator application as text (NULs and trailing spaces dropped).
    pub fn creator(&self) -> String {
        String::from_utf8_lossy(&self.creator_app).trim_end_matches(['\0', ' ']).to_string()
    }

    /// The virtual size by QEMU's rule (the footer's current size for the creators that QEMU
    /// trusts with it, else the CHS geometry), rounded down to whole sectors as QEMU does, and
    /// where it came from.
    pub fn virtual_size(&self) -> (u64, SizeSource) {
        let by_chs = CHS_CREATORS.iter().any(|c| **c == self.creator_app);
        if !by_chs || self.geometry.is_max() {
            (self.current_size / SECTOR * SECTOR, SizeSource::CurrentSize)
        } else {
            (self.geometry.total_sectors() * SECTOR, SizeSource::Chs)
        }
    }

    /// Sets a new size: `current_size`, and a geometry that keeps the size rule giving at least
    /// `size` (for CHS-rule creators, the smallest covering geometry, as `qemu-img create` does).
    pub fn set_size(&mut self, size: u64) {
        self.current_size = size;
        self.geometry = Chs::from_sectors(size / SECTOR);
        if self.virtual_size().1 == SizeSource::Chs {
            self.geometry = Chs::covering(size / SECTOR);
        }
    }
}

/// One of the eight parent locator entries of a dynamic header.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Locator {
    /// Platform code (see [`platform`]).
    pub code: u32,
    /// Space reserved for the locator data: sectors per the specification, bytes as blktap and
    /// Windows write it (see [`Locator::space_bytes`]).
    pub data_space: u32,
    /// Bytes of locator data.
    pub data_len: u32,
    /// File offset of the data.
    pub data_offset: u64,
}

impl Locator {
    /// Reserved bytes, read the way blktap does (`vhd_parent_locator_size`): values under 512
    /// are sectors, multiples of 512 are bytes, anything else is invalid (`None`).
    pub fn space_bytes(&self) -> Option<u64> {
        let s = u64::from(self.data_space);
        if s < SECTOR {
            Some(s * SECTOR)
        } else if s % SECTOR == 0 {
            Some(s)
        } else {
            None
        }
    }
}

/// The 1024-byte dynamic disk header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// Next structure (unused, `u64::MAX`).
    pub data_offset: u64,
    /// File offset of the BAT.
    pub table_offset: u64,
    /// Header version.
    pub version: u32,
    /// BAT entries (blocks the table can map).
    pub max_table_entries: u32,
    /// Bytes of data per block (a power of two).
    pub block_size: u32,
    /// The parent's footer UUID (differencing disks).
    pub parent_uuid: [u8; 16],
    /// The parent's modification time, VHD epoch.
    pub parent_timestamp: u32,
    /// The parent's file name, UTF-16BE, NUL padded.
    pub parent_name: [u8; 512],
    /// Parent locators.
    pub locators: [Locator; 8],
    raw: [u8; HEADER_LEN],
}

impl Header {
    /// A header for a new disk.
    pub fn new(table_offset: u64, max_table_entries: u32, block_size: u32) -> Header {
        Header {
            data_offset: u64::MAX,
            table_offset,
            version: FORMAT_VERSION,
            max_table_entries,
            block_size,
            parent_uuid: [0u8; 16],
            parent_timestamp: 0,
            parent_name: [0u8; 512],
            locators: [Locator::default(); 8],
            raw: [0u8; HEADER_LEN],
        }
    }

    /// Parses and checks (cookie, checksum) a header.
    pub fn parse(b: &[u8]) -> Result<Header, ParseError> {
        if b.len() < HEADER_LEN || &b[..8] != HEADER_COOKIE {
            return Err(ParseError::NoCookie);
        }
        let stored = be32(b, 36);
        let computed = checksum(&b[..HEADER_LEN], 36);
        if stored != computed {
            return Err(ParseError::Checksum { stored, computed });
        }
        let mut raw = [0u8; HEADER_LEN];
        raw.copy_from_slice(&b[..HEADER_LEN]);
        let mut parent_uuid = [0u8; 16];
        parent_uuid.copy_from_slice(&b[40..56]);
        let mut parent_name = [0u8; 512];
        parent_name.copy_from_slice(&b[64..576]);
        let mut locators = [Locator::default(); 8];
        for (i, l) in locators.iter_mut().enumerate() {
            let at = 576 + 24 * i;
            *l = Locator {
                code: be32(b, at),
                data_space: be32(b, at + 4),
                data_len: be32(b, at + 8),
                data_offset: be64(b, at + 16),
            };
        }
        Ok(Header {
            data_offset: be64(b, 8),
            table_offset: be64(b, 16),
            version: be32(b, 24),
            max_table_entries: be32(b, 28),
            block_size: be32(b, 32),
            parent_uuid,
            parent_timestamp: be32(b, 56),
            parent_name,
            locators,
            raw,
        })
    }

    /// The header's bytes, checksum included.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = self.raw;
        b[..8].copy_from_slice(HEADER_COOKIE);
        put64(&mut b, 8, self.data_offset);
        put64(&mut b, 16, self.table_offset);
        put32(&mut b, 24, self.version);
        put32(&mut b, 28, self.max_table_entries);
        put32(&mut b, 32, self.block_size);
        b[40..56].copy_from_slice(&self.parent_uuid);
        put32(&mut b, 56, self.parent_timestamp);
        b[64..576].copy_from_slice(&self.parent_name);
        for (i, l) in self.locators.iter().enumerate() {
            let at = 576 + 24 * i;
            put32(&mut b, at, l.code);
            put32(&mut b, at + 4, l.data_space);
            put32(&mut b, at + 8, l.data_len);
            put32(&mut b, at + 12, 0);
            put64(&mut b, at + 16, l.data_offset);
        }
        let sum = checksum(&b, 36);
        put32(&mut b, 36, sum);
        b
    }

    /// The parent name as text.
    pub fn parent_name(&self) -> String {
        let units: Vec<u16> = self.parent_name.chunks_exact(2).map(|c| u16::from_be_bytes([c[0], c[1]])).collect();
        let end = units.iter().position(|&u| u == 0).unwrap_or(units.len());
        String::from_utf16_lossy(&units[..end])
    }

    /// Sets the parent name (UTF-16BE, truncated to 256 code units).
    pub fn set_parent_name(&mut self, name: &str) {
        self.parent_name = [0u8; 512];
        for (i, u) in name.encode_utf16().take(256).enumerate() {
            self.parent_name[2 * i..2 * i + 2].copy_from_slice(&u.to_be_bytes());
        }
    }
}

/// Encodes a locator path the way blktap does (`vhd_w2u_encode_location`): UTF-16LE, `/`
/// turned into `\`, and relative paths starting with `.\`.
pub fn encode_windows_path(path: &str) -> Vec<u8> {
    let mut s = if path.starts_with('/') {
        path.to_string()
    } else {
        format!(".\\{}", path.strip_prefix("./").unwrap_or(path))
    };
    s = s.replace('/', "\\");
    s.encode_utf16().flat_map(|u| u.to_le_bytes()).collect()
}

/// Decodes locator data into a Unix path (absolute, or relative to the child's folder), or
/// `None` for codes we cannot follow or bytes that do not decode.
pub fn decode_locator(code: u32, data: &[u8]) -> Option<String> {
    let s = match code {
        platform::W2RU | platform::W2KU => {
            if !data.len().is_multiple_of(2) {
                return None;
            }
            let units: Vec<u16> = data.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect();
            let s = String::from_utf16(&units).ok()?;
            let s = s.trim_end_matches('\0').replace('\\', "/");
            match s.get(..2) {
                Some("C:") | Some("c:") => s[2..].to_string(),
                _ => s,
            }
        }
        platform::MACX => {
            let s = std::str::from_utf8(data).ok()?.trim_end_matches('\0');
            s.strip_prefix("file://")?.to_string()
        }
        _ => return None,
    };
    (!s.is_empty() && !s.contains('\0')).then_some(s)
}

/// Seconds since the VHD epoch, now (0 if the clock is before 2000).
pub fn vhd_time_now() -> u32 {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    vhd_time(now)
}

/// Converts Unix seconds to VHD time (saturating).
pub fn vhd_time(unix_secs: u64) -> u32 {
    unix_secs.saturating_sub(VHD_EPOCH).min(u64::from(u32::MAX)) as u32
}

/// Bytes of sector bitmap in front of each block: one bit per sector, padded to a sector.
pub fn bitmap_bytes(block_size: u64) -> u64 {
    sector_align((block_size / SECTOR).div_ceil(8))
}

/// Sector bitmaps: bit `i` (most significant bit first in each byte, as blktap's `test_bit` and
/// QEMU read them) says whether sector `i` of the block is present in this file.
pub mod bitmap {
    /// Whether bit `i` is set.
    pub fn get(map: &[u8], i: u64) -> bool {
        map.get((i / 8) as usize).is_some_and(|b| b & (0x80 >> (i % 8)) != 0)
    }

    /// Sets bits `[start, end)`.
    pub fn set_range(map: &mut [u8], start: u64, end: u64) {
        for i in start..end {
            if let Some(b) = map.get_mut((i / 8) as usize) {
                *b |= 0x80 >> (i % 8);
            }
        }
    }

    /// Whether every bit of `[start, end)` is set.
    pub fn all_set(map: &[u8], start: u64, end: u64) -> bool {
        (start..end).all(|i| get(map, i))
    }

    /// Maximal runs `(start, end, set)` covering `[start, end)`.
    pub fn runs(map: &[u8], start: u64, end: u64) -> Vec<(u64, u64, bool)> {
        let mut out: Vec<(u64, u64, bool)> = Vec::new();
        let mut i = start;
        while i < end {
            let v = get(map, i);
            let mut j = i + 1;
            // Skip whole bytes of the same value quickly.
            while j < end {
                if j.is_multiple_of(8) && j + 8 <= end {
                    let byte = map.get((j / 8) as usize).copied().unwrap_or(0);
                    if (v && byte == 0xFF) || (!v && byte == 0) {
                        j += 8;
                        continue;
                    }
                }
                if get(map, j) != v {
                    break;
                }
                j += 1;
            }
            out.push((i, j, v));
            i = j;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_is_the_complement_of_the_byte_sum_without_its_field() {
        let mut b = vec![0u8; 16];
        b[0] = 1;
        b[1] = 2;
        b[4..8].copy_from_slice(&[0xAA; 4]); // the field, ignored
        assert_eq!(checksum(&b, 4), !3u32);
        assert_eq!(checksum(&[0xFF; 8], 4), !(4 * 0xFF));
    }

    #[test]
    fn footer_round_trips_and_detects_a_flipped_bit() {
        let f = Footer::new(DiskType::Dynamic, 10 << 20, 512, [7u8; 16]);
        let bytes = f.encode();
        let g = Footer::parse(&bytes).expect("parse");
        assert_eq!(g.encode(), bytes);
        assert_eq!(g.current_size, 10 << 20);
        assert_eq!(g.disk_type(), Some(DiskType::Dynamic));
        assert_eq!(g.creator(), "tap");
        let mut bad = bytes;
        bad[100] ^= 1;
        assert!(matches!(Footer::parse(&bad), Err(ParseError::Checksum { .. })));
        bad[0] = b'x';
        assert_eq!(Footer::parse(&bad), Err(ParseError::NoCookie));
    }

    #[test]
    fn footer_keeps_bytes_it_does_not_model() {
        let f = Footer::new(DiskType::Dynamic, 1 << 20, 512, [1u8; 16]);
        let mut bytes = f.encode();
        bytes[85] = 1; // blktap's hidden flag
        let sum = checksum(&bytes, 64);
        bytes[64..68].copy_from_slice(&sum.to_be_bytes());
        let mut g = Footer::parse(&bytes).expect("parse");
        g.set_size(2 << 20);
        let out = g.encode();
        assert_eq!(out[85], 1);
        assert!(Footer::parse(&out).is_ok());
    }

    #[test]
    fn header_round_trips_with_locators_and_parent_name() {
        let mut h = Header::new(1536, 5, DEFAULT_BLOCK_SIZE);
        h.parent_uuid = [9u8; 16];
        h.set_parent_name("base.vhd");
        h.locators[0] = Locator { code: platform::W2RU, data_space: 512, data_len: 24, data_offset: 2048 };
        let bytes = h.encode();
        let g = Header::parse(&bytes).expect("parse");
        assert_eq!(g, Header::parse(&g.encode()).expect("reparse"));
        assert_eq!(g.parent_name(), "base.vhd");
        assert_eq!(g.locators[0].space_bytes(), Some(512));
        assert_eq!(g.max_table_entries, 5);
        let mut bad = bytes;
        bad[1000] ^= 0x10;
        assert!(matches!(Header::parse(&bad), Err(ParseError::Checksum { .. })));
    }

    #[test]
    fn locator_space_follows_blktaps_rule() {
        let l = |s| Locator { data_space: s, ..Locator::default() };
        assert_eq!(l(1).space_bytes(), Some(512));
        assert_eq!(l(512).space_bytes(), Some(512));
        assert_eq!(l(1024).space_bytes(), Some(1024));
        assert_eq!(l(1000).space_bytes(), None);
    }

    #[test]
    fn chs_matches_the_specification_examples() {
        // 10 MiB: 20480 sectors -> 17 spt, 4 heads, 301 cylinders (20468 sectors, rounds down).
        let g = Chs::from_sectors(20480);
        assert_eq!((g.cylinders, g.heads, g.sectors), (301, 4, 17));
        // 127 GiB and up clamp to the maximum geometry.
        assert!(Chs::from_sectors(300 << 21).is_max());
        let c = Chs::covering(20480);
        assert!(c.total_sectors() >= 20480, "{c:?}");
        assert!(Chs::from_sectors(c.total_sectors() - 1).total_sectors() < 20480);
    }

    #[test]
    fn virtual_size_follows_the_creator_rule() {
        let mut f = Footer::new(DiskType::Dynamic, 10 << 20, 512, [0u8; 16]);
        assert_eq!(f.virtual_size(), (10 << 20, SizeSource::CurrentSize));
        f.creator_app = *b"qemu";
        f.geometry = Chs::covering((10 << 20) / SECTOR);
        let (size, src) = f.virtual_size();
        assert_eq!(src, SizeSource::Chs);
        assert_eq!(size, f.geometry.total_sectors() * SECTOR);
        assert_ne!(size, 10 << 20);
        f.geometry = Chs { cylinders: 65535, heads: 16, sectors: 255 };
        assert_eq!(f.virtual_size(), (10 << 20, SizeSource::CurrentSize));
        f.creator_app = *b"vpc ";
        f.set_size(20 << 20);
        assert!(f.virtual_size().0 >= 20 << 20);
        // Any other creator, Azure's and unknown ones too, gets current_size (QEMU 9.2 on).
        for creator in [*b"wa\0\0", *b"xxxx", *b"win ", *b"tap\0"] {
            f.creator_app = creator;
            f.current_size = 50 << 20;
            f.geometry = Chs { cylinders: 370, heads: 16, sectors: 17 };
            assert_eq!(f.virtual_size(), (50 << 20, SizeSource::CurrentSize), "{creator:?}");
        }
    }

    #[test]
    fn locators_encode_like_blktap_and_decode_back() {
        let rel = encode_windows_path("./dir/base.vhd");
        let text: Vec<u16> = rel.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect();
        assert_eq!(String::from_utf16(&text).expect("utf16"), ".\\dir\\base.vhd");
        assert_eq!(decode_locator(platform::W2RU, &rel).as_deref(), Some("./dir/base.vhd"));
        let abs = encode_windows_path("/srv/sr/base.vhd");
        assert_eq!(decode_locator(platform::W2KU, &abs).as_deref(), Some("/srv/sr/base.vhd"));
        assert_eq!(decode_locator(platform::MACX, b"file://./base.vhd").as_deref(), Some("./base.vhd"));
        assert_eq!(decode_locator(platform::MACX, b"http://x"), None);
        assert_eq!(decode_locator(platform::W2RU, &[0x41]), None);
        assert_eq!(decode_locator(platform::MAC, b"x"), None);
    }

    #[test]
    fn bitmaps_are_msb_first_and_runs_cover_the_range() {
        let mut m = vec![0u8; 4];
        bitmap::set_range(&mut m, 1, 3);
        assert_eq!(m[0], 0b0110_0000);
        bitmap::set_range(&mut m, 8, 24);
        assert!(bitmap::all_set(&m, 8, 24));
        assert!(!bitmap::all_set(&m, 0, 3));
        assert_eq!(
            bitmap::runs(&m, 0, 32),
            vec![(0, 1, false), (1, 3, true), (3, 8, false), (8, 24, true), (24, 32, false)]
        );
        assert_eq!(bitmap::runs(&m, 2, 10), vec![(2, 3, true), (3, 8, false), (8, 10, true)]);
        assert_eq!(bitmap_bytes(2 << 20), 512);
        assert_eq!(bitmap_bytes(4096), 512);
        assert_eq!(bitmap_bytes(16 << 20), 4096);
    }

    #[test]
    fn vhd_time_counts_from_2000() {
        assert_eq!(vhd_time(VHD_EPOCH + 5), 5);
        assert_eq!(vhd_time(0), 0);
    }
}
