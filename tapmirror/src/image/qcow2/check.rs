//! A read-only walk of one qcow2 file's metadata: what `qemu-img check` verifies, done by us
//! because imago 0.2.6 has no checker.
//!
//! Every host cluster the image references is counted (header, L1 tables, L2 tables, data and
//! compressed clusters, refcount table and blocks, snapshot table and snapshot L1s, persistent
//! bitmaps when their autoclear bit says they are valid), then compared with the stored
//! refcounts. As in QEMU, a stored refcount below the references is a corruption (the cluster
//! could be handed out twice), one above is a leak (wasted space), and an L1/L2 entry's COPIED
//! bit must be set exactly when its cluster's refcount is 1. The first problem found is
//! returned; corruptions are looked for before leaks.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use super::header::{AUTOCLEAR_BITMAPS, EXT_BITMAPS, Header, Problem};

/// Bits 9..=55 of an L1/L2 entry: the host offset.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Bit 63: refcount is exactly 1, so the cluster may be written in place.
pub const COPIED: u64 = 1 << 63;
/// Bit 62 of an L2 entry: compressed cluster.
pub const COMPRESSED: u64 = 1 << 62;
/// Bit 0 of an L2 entry (v3): reads as zeroes.
pub const ZERO: u64 = 1;
/// L1 entry bits that must be 0.
const L1_RESERVED: u64 = 0x7f00_0000_0000_01ff;
/// Standard L2 entry bits that must be 0 (bit 0 is the zero flag from v3 on).
const L2_RESERVED: u64 = 0x3f00_0000_0000_01fe;

/// Why a check stopped.
#[derive(Debug)]
pub enum CheckError {
    /// The metadata is wrong.
    Problem(Problem),
    /// Reading the file failed.
    Io(io::Error),
}

impl From<io::Error> for CheckError {
    fn from(e: io::Error) -> Self {
        CheckError::Io(e)
    }
}

fn corrupt(s: String) -> CheckError {
    CheckError::Problem(Problem::Corrupt(s))
}

/// Reads `entries` big-endian u64 values at `offset`.
pub fn read_table(file: &File, offset: u64, entries: u64) -> io::Result<Vec<u64>> {
    let len = usize::try_from(entries * 8).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let mut raw = vec![0u8; len];
    file.read_exact_at(&mut raw, offset)?;
    Ok(raw.chunks_exact(8).map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8]))).collect())
}

/// The active L2 tables: (L1 index, L1 entry, its entries).
fn for_each_l2(
    file: &File,
    h: &Header,
    l1_offset: u64,
    l1_size: u32,
    file_len: u64,
    mut f: impl FnMut(u64, u64, &[u64]) -> Result<(), CheckError>,
) -> Result<(), CheckError> {
    let cs = h.cluster_size();
    let l1 = read_table(file, l1_offset, u64::from(l1_size))?;
    // The L1 entry that named each L2 table. Two entries of one L1 table never share an L2
    // table (QEMU shares them only between a snapshot's L1 and another's): a crafted image
    // whose 4 million L1 entries all named one table made each walk read it 4 million times,
    // and the check count its entries' references until memory ran out.
    let mut named_by: std::collections::HashMap<u64, usize> = std::collections::HashMap::new();
    for (i, &e) in l1.iter().enumerate() {
        let off = e & OFFSET_MASK;
        if e & L1_RESERVED != 0 {
            return Err(corrupt(format!("L1 entry {i} ({e:#x}) has reserved bits set")));
        }
        if off == 0 {
            continue;
        }
        if !off.is_multiple_of(cs) {
            return Err(corrupt(format!("L2 table at {off:#x} (L1 entry {i}) is not cluster aligned")));
        }
        if off + cs > file_len {
            return Err(corrupt(format!("L2 table at {off:#x} (L1 entry {i}) lies beyond the end of the file")));
        }
        if let Some(first) = named_by.insert(off, i) {
            return Err(corrupt(format!("L1 entries {first} and {i} name the same L2 table at {off:#x}")));
        }
        let l2 = read_table(file, off, h.l2_entries())?;
        f(i as u64, e, &l2)?;
    }
    Ok(())
}

/// What one L2 entry points at.
enum L2Ref {
    /// Nothing in this file (unallocated, or a zero cluster without a host cluster).
    None,
    /// A standard cluster at this host offset (data, or a preallocated zero cluster).
    Cluster { offset: u64, zero: bool },
    /// Compressed data occupying host bytes `[start, end)`.
    Compressed { start: u64, end: u64 },
}

fn decode_l2(h: &Header, e: u64, guest: u64) -> Result<L2Ref, CheckError> {
    let cs = h.cluster_size();
    if e & COMPRESSED != 0 {
        if e & COPIED != 0 {
            return Err(corrupt(format!("compressed cluster at guest {guest:#x} has the COPIED bit set")));
        }
        let (start, end) = compressed_range(h.cluster_bits, e);
        return Ok(L2Ref::Compressed { start, end });
    }
    let reserved = if h.version >= 3 { L2_RESERVED } else { L2_RESERVED | ZERO };
    if e & reserved != 0 {
        return Err(corrupt(format!("L2 entry for guest {guest:#x} ({e:#x}) has reserved bits set")));
    }
    let offset = e & OFFSET_MASK;
    if offset == 0 {
        return Ok(L2Ref::None);
    }
    if !offset.is_multiple_of(cs) {
        return Err(corrupt(format!("cluster for guest {guest:#x} at host {offset:#x} is not cluster aligned")));
    }
    Ok(L2Ref::Cluster { offset, zero: e & ZERO != 0 })
}

/// The host bytes `[start, end)` that the compressed L2 entry `e` occupies (QEMU's layout: the
/// offset in the low `62 - (cluster_bits - 8)` bits, then the count of extra 512-byte sectors).
pub fn compressed_range(cluster_bits: u32, e: u64) -> (u64, u64) {
    let x = 62 - (cluster_bits - 8);
    let start = e & ((1u64 << x) - 1);
    let sectors = ((e >> x) & ((1u64 << (cluster_bits - 8)) - 1)) + 1;
    (start, (start & !511) + sectors * 512)
}

/// Guest bytes whose data this file holds itself (data and compressed clusters of the active
/// L1; zero clusters and unallocated ones count nothing).
pub fn allocated_bytes(file: &File, h: &Header, file_len: u64) -> Result<u64, CheckError> {
    let cs = h.cluster_size();
    let mut total = 0u64;
    for_each_l2(file, h, h.l1_table_offset, h.l1_size, file_len, |l1_index, _, l2| {
        for (j, &e) in l2.iter().enumerate() {
            let guest = (l1_index * h.l2_entries() + j as u64) * cs;
            if guest >= h.size {
                break;
            }
            match decode_l2(h, e, guest)? {
                L2Ref::Cluster { zero: false, .. } | L2Ref::Compressed { .. } => total += cs.min(h.size - guest),
                _ => {}
            }
        }
        Ok(())
    })?;
    Ok(total)
}

/// The checks cheap enough for every open: each active L1 entry and each refcount table entry
/// is well-formed and points at a whole cluster inside the file. (A truncated file fails here
/// instead of reading its lost tables as zeroes and being "repaired" by the next write.)
pub fn quick(file: &File, h: &Header, file_len: u64) -> Result<(), CheckError> {
    quick_tables(file, h, file_len).map(drop)
}

/// [`quick`], giving back the active L1 table and the refcount table it read.
fn quick_tables(file: &File, h: &Header, file_len: u64) -> Result<(Vec<u64>, Vec<u64>), CheckError> {
    let cs = h.cluster_size();
    let l1 = read_table(file, h.l1_table_offset, u64::from(h.l1_size))?;
    for (i, &e) in l1.iter().enumerate() {
        let off = e & OFFSET_MASK;
        if e & L1_RESERVED != 0 {
            return Err(corrupt(format!("L1 entry {i} ({e:#x}) has reserved bits set")));
        }
        if off != 0 && (!off.is_multiple_of(cs) || off + cs > file_len) {
            return Err(corrupt(format!("L2 table at {off:#x} (L1 entry {i}) is unaligned or beyond the end of the file")));
        }
    }
    let rt = read_table(file, h.refcount_table_offset, u64::from(h.refcount_table_clusters) * cs / 8)?;
    for (i, &e) in rt.iter().enumerate() {
        let off = e & !0x1ff;
        if e & 0x1ff != 0 || (off != 0 && (!off.is_multiple_of(cs) || off + cs > file_len)) {
            return Err(corrupt(format!("refcount table entry {i} ({e:#x}) is malformed or beyond the end of the file")));
        }
    }
    Ok((l1, rt))
}

/// What a metadata region holds: the regions of QEMU's overlap check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Metadata {
    /// The header and its extensions (cluster 0).
    Header,
    /// The active L1 table.
    L1,
    /// An active L2 table.
    L2,
    /// The refcount table.
    RefcountTable,
    /// A refcount block.
    RefcountBlock,
    /// The internal snapshots' table.
    SnapshotTable,
    /// An internal snapshot's L1 table.
    SnapshotL1,
    /// An internal snapshot's L2 table.
    SnapshotL2,
    /// The persistent bitmaps' directory.
    BitmapDirectory,
}

impl Metadata {
    /// Every kind, in `repr` order.
    pub const ALL: [Metadata; 9] = [
        Metadata::Header,
        Metadata::L1,
        Metadata::L2,
        Metadata::RefcountTable,
        Metadata::RefcountBlock,
        Metadata::SnapshotTable,
        Metadata::SnapshotL1,
        Metadata::SnapshotL2,
        Metadata::BitmapDirectory,
    ];

    /// What an error message calls it.
    pub fn name(self) -> &'static str {
        match self {
            Metadata::Header => "header",
            Metadata::L1 => "active L1 table",
            Metadata::L2 => "L2 table",
            Metadata::RefcountTable => "refcount table",
            Metadata::RefcountBlock => "refcount block",
            Metadata::SnapshotTable => "snapshot table",
            Metadata::SnapshotL1 => "snapshot L1 table",
            Metadata::SnapshotL2 => "snapshot L2 table",
            Metadata::BitmapDirectory => "bitmap directory",
        }
    }
}

/// Host bytes `[offset, offset + len)` that hold metadata, and what.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Region {
    /// First byte.
    pub offset: u64,
    /// Bytes.
    pub len: u64,
    /// What it holds.
    pub what: Metadata,
}

/// What a writable open checks on top of [`quick`]: every cluster of the metadata that imago
/// reads or rewrites (the header, the active L1 table, the refcount table and blocks, the active
/// L2 tables, the snapshot table and the snapshots' L1 and L2 tables, the bitmap directory) has
/// a stored refcount above zero. imago allocates clusters whose refcount is 0, so a metadata
/// cluster counted free would be handed out and overwritten by the next allocating write; and
/// with the refcounts of the header's range missing, imago 0.2.6's allocator recursed until the
/// image thread's stack overflowed, taking the whole process with it (found by
/// `tapmirror/fuzz`'s `qcow2_parse`). Reads only the refcount blocks that cover the metadata,
/// not the L2 tables' entries: far cheaper than the full [`check`], which stays an explicit step.
///
/// Returns those regions, in file order, for the guard that keeps guest writes off them
/// (`guard`).
pub fn for_writing(file: &File, h: &Header, file_len: u64) -> Result<Vec<Region>, CheckError> {
    let (l1, table) = quick_tables(file, h, file_len)?;
    let cs = h.cluster_size();
    let rt_entries = table.len() as u64;
    let region = |offset, len, what| Region { offset, len, what };
    let mut metadata = vec![
        region(0, cs, Metadata::Header),
        region(h.l1_table_offset, u64::from(h.l1_size) * 8, Metadata::L1),
        region(h.refcount_table_offset, rt_entries * 8, Metadata::RefcountTable),
    ];
    metadata.extend(table.iter().map(|e| e & !0x1ff).filter(|&off| off != 0).map(|off| region(off, cs, Metadata::RefcountBlock)));
    metadata.extend(l1.iter().map(|e| e & OFFSET_MASK).filter(|&off| off != 0).map(|off| region(off, cs, Metadata::L2)));
    let snapshots = snapshots(file, h, file_len)?;
    metadata.push(region(h.snapshots_offset, snapshots.table_len, Metadata::SnapshotTable));
    for &(off, size) in &snapshots.l1s {
        metadata.push(region(off, u64::from(size) * 8, Metadata::SnapshotL1));
        for (i, e) in read_table(file, off, u64::from(size))?.into_iter().enumerate() {
            let l2 = e & OFFSET_MASK;
            if l2 != 0 && (!l2.is_multiple_of(cs) || l2 + cs > file_len) {
                return Err(corrupt(format!(
                    "L2 table at {l2:#x} (entry {i} of the snapshot L1 table at {off:#x}) is unaligned or beyond the end of the file"
                )));
            }
            if l2 != 0 {
                metadata.push(region(l2, cs, Metadata::SnapshotL2));
            }
        }
    }
    if let Some(dir) = bitmap_directory(h) {
        if dir.offset.checked_add(dir.size).is_none_or(|end| end > file_len) {
            return Err(corrupt(format!("the bitmap directory at {:#x} lies beyond the end of the file", dir.offset)));
        }
        metadata.push(region(dir.offset, dir.size, Metadata::BitmapDirectory));
    }
    // In file order, so that each refcount block is read once.
    metadata.sort_unstable_by_key(|r| (r.offset, r.len));
    let mut stored = Stored { file, table, order: h.refcount_order, per_block: (cs * 8) >> h.refcount_order, cached: None, cs };
    for r in metadata.iter().filter(|r| r.len > 0) {
        for c in r.offset / cs..=(r.offset + r.len - 1) / cs {
            if stored.get(c)? == 0 {
                return Err(corrupt(format!(
                    "the {} at {:#x} lies in cluster {c}, whose refcount is 0: the next allocation would overwrite it",
                    r.what.name(),
                    r.offset
                )));
            }
        }
    }
    // Two pieces of metadata in one cluster: the updates of one overwrite the other (an L2
    // table that is the L1 table takes the entries imago writes for new guest clusters as L2
    // pointers). QEMU's overlap check fails the write that would do it; the open refuses it
    // here. Only L2 tables may be shared, between the active L1 and snapshots' L1s.
    let mut owners: Vec<(u64, Metadata, u64)> = metadata
        .iter()
        .filter(|r| r.len > 0)
        .flat_map(|r| (r.offset / cs..=(r.offset + r.len - 1) / cs).map(move |c| (c, r.what, r.offset)))
        .collect();
    owners.sort_unstable_by_key(|&(c, what, _)| (c, what as u8));
    for pair in owners.windows(2) {
        let ((c, a, at), (d, b, bt)) = (pair[0], pair[1]);
        let shared_l2 = matches!((a, b), (Metadata::L2 | Metadata::SnapshotL2, Metadata::SnapshotL2));
        if c == d && !shared_l2 {
            return Err(corrupt(format!("the {} at {at:#x} and the {} at {bt:#x} share cluster {c}", a.name(), b.name())));
        }
    }
    Ok(metadata)
}

/// Where the persistent bitmaps' directory lies, when QEMU would load it (the autoclear bit
/// says the bitmaps are consistent).
struct BitmapDirectory {
    count: u32,
    size: u64,
    offset: u64,
}

fn bitmap_directory(h: &Header) -> Option<BitmapDirectory> {
    if h.autoclear & AUTOCLEAR_BITMAPS == 0 {
        return None;
    }
    let d = &h.extensions.iter().find(|e| e.kind == EXT_BITMAPS)?.data;
    if d.len() < 24 {
        return None;
    }
    Some(BitmapDirectory {
        count: u32::from_be_bytes(d[0..4].try_into().unwrap_or([0; 4])),
        size: u64::from_be_bytes(d[8..16].try_into().unwrap_or([0; 8])),
        offset: u64::from_be_bytes(d[16..24].try_into().unwrap_or([0; 8])),
    })
}

/// The internal snapshots' L1 tables, and the length of the table that lists them.
struct Snapshots {
    l1s: Vec<(u64, u32)>,
    table_len: u64,
}

fn snapshots(file: &File, h: &Header, file_len: u64) -> Result<Snapshots, CheckError> {
    let cs = h.cluster_size();
    let mut l1s = Vec::new();
    let mut at = h.snapshots_offset;
    for n in 0..h.nb_snapshots {
        let mut fixed = [0u8; 40];
        file.read_exact_at(&mut fixed, at).map_err(|_| corrupt(format!("snapshot {n} lies beyond the end of the file")))?;
        let l1_off = u64::from_be_bytes(fixed[0..8].try_into().unwrap_or([0; 8]));
        let l1_size = u32::from_be_bytes(fixed[8..12].try_into().unwrap_or([0; 4]));
        let id_len = u64::from(u16::from_be_bytes([fixed[12], fixed[13]]));
        let name_len = u64::from(u16::from_be_bytes([fixed[14], fixed[15]]));
        let extra = u64::from(u32::from_be_bytes(fixed[36..40].try_into().unwrap_or([0; 4])));
        at += (40 + extra + id_len + name_len).next_multiple_of(8);
        if !l1_off.is_multiple_of(cs) || l1_off.checked_add(u64::from(l1_size) * 8).is_none_or(|end| end > file_len) {
            return Err(corrupt(format!("snapshot {n}'s L1 table at {l1_off:#x} is unaligned or beyond the end of the file")));
        }
        l1s.push((l1_off, l1_size));
    }
    Ok(Snapshots { l1s, table_len: at - h.snapshots_offset })
}

/// Counts references per host cluster.
struct Refs {
    counts: Vec<u16>,
    cs: u64,
}

impl Refs {
    fn add(&mut self, offset: u64, len: u64, what: &str) -> Result<(), CheckError> {
        if len == 0 {
            return Ok(());
        }
        let first = offset / self.cs;
        let last = (offset + len - 1) / self.cs;
        for c in first..=last {
            let slot = usize::try_from(c).ok().and_then(|c| self.counts.get_mut(c));
            let Some(slot) = slot else {
                return Err(corrupt(format!("{what} at {offset:#x} lies beyond the end of the file")));
            };
            *slot = slot.saturating_add(1);
        }
        Ok(())
    }
}

/// Stored refcounts, read block by block.
struct Stored<'a> {
    file: &'a File,
    table: Vec<u64>,
    order: u32,
    per_block: u64,
    cached: Option<(u64, Vec<u8>)>,
    cs: u64,
}

impl Stored<'_> {
    fn get(&mut self, cluster: u64) -> io::Result<u64> {
        let block = cluster / self.per_block;
        let index = cluster % self.per_block;
        let Some(&entry) = self.table.get(block as usize) else { return Ok(0) };
        let off = entry & !0x1ff;
        if off == 0 {
            return Ok(0);
        }
        if self.cached.as_ref().is_none_or(|(b, _)| *b != block) {
            let mut raw = vec![0u8; self.cs as usize];
            self.file.read_exact_at(&mut raw, off)?;
            self.cached = Some((block, raw));
        }
        let raw = self.cached.as_ref().map(|(_, r)| r.as_slice()).unwrap_or(&[]);
        Ok(refcount_in_block(raw, index, self.order))
    }
}

/// Entry `index` of a refcount block whose entries are `1 << order` bits wide.
fn refcount_in_block(raw: &[u8], index: u64, order: u32) -> u64 {
    let width = 1u64 << order;
    if width >= 8 {
        let bytes = (width / 8) as usize;
        let at = index as usize * bytes;
        raw[at..at + bytes].iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b))
    } else {
        // Sub-byte widths are packed least significant bits first (QEMU's get_refcount_ro0..2).
        let bit = index * width;
        u64::from(raw[(bit / 8) as usize] >> (bit % 8)) & ((1 << width) - 1)
    }
}

/// Where the header puts the active L1 and refcount tables now: read from the file each time,
/// for an image open for writing, where imago moves the refcount table as the file grows.
pub struct Tables {
    /// Entries in the active L1 table.
    pub l1_size: u64,
    /// Host offset of the active L1 table.
    pub l1_offset: u64,
    /// Host offset of the refcount table.
    pub refcount_table_offset: u64,
    /// Clusters the refcount table occupies.
    pub refcount_table_clusters: u64,
}

impl Tables {
    /// Reads the header's fields 36..60.
    pub fn now(file: &File) -> io::Result<Tables> {
        let mut head = [0u8; 60];
        file.read_exact_at(&mut head, 0)?;
        let be = |range: std::ops::Range<usize>| head[range].iter().fold(0u64, |acc, &b| acc << 8 | u64::from(b));
        Ok(Tables { l1_size: be(36..40), l1_offset: be(40..48), refcount_table_offset: be(48..56), refcount_table_clusters: be(56..60) })
    }

    /// Bytes of the refcount table.
    pub fn refcount_table_bytes(&self, cluster_bits: u32) -> u64 {
        self.refcount_table_clusters << cluster_bits
    }
}

/// The refcount that the file stores now for host cluster `cluster`, found through the refcount
/// table that the header names now (imago moves the table as the file grows).
pub fn stored_refcount(file: &File, cluster_bits: u32, refcount_order: u32, cluster: u64) -> io::Result<u64> {
    let now = Tables::now(file)?;
    let (table_offset, table_entries) = (now.refcount_table_offset, now.refcount_table_bytes(cluster_bits) >> 3);
    let cs = 1u64 << cluster_bits;
    let per_block = (cs * 8) >> refcount_order;
    let block = cluster / per_block;
    if block >= table_entries {
        return Ok(0);
    }
    let mut entry = [0u8; 8];
    // A header gone bad since the open must give an error here, not an overflow.
    file.read_exact_at(&mut entry, table_offset.saturating_add(block * 8))?;
    let block_offset = u64::from_be_bytes(entry) & !0x1ff;
    if block_offset == 0 {
        return Ok(0);
    }
    let mut raw = vec![0u8; cs as usize];
    file.read_exact_at(&mut raw, block_offset)?;
    Ok(refcount_in_block(&raw, cluster % per_block, refcount_order))
}

/// Checks the metadata of the qcow2 file `file` (of `file_len` bytes) whose header is `h`.
/// Corruption is an error; leaked clusters (counted as used, referenced by nothing: wasted space
/// that a crash during allocation can leave, as in QEMU) are counted and returned.
pub fn check(file: &File, h: &Header, file_len: u64) -> Result<u64, CheckError> {
    let cs = h.cluster_size();
    let Counted { counts, table, active_l1, active_l2 } = count_references(file, h, file_len)?;
    let mut stored = Stored { file, table, order: h.refcount_order, per_block: (cs * 8) >> h.refcount_order, cached: None, cs };
    for (c, &want) in counts.iter().enumerate() {
        let have = stored.get(c as u64)?;
        if have < u64::from(want) {
            return Err(corrupt(format!(
                "cluster {c} (host {:#x}) has refcount {have} but is referenced {want} times",
                c as u64 * cs
            )));
        }
    }
    for (i, off, copied) in active_l1 {
        let rc = stored.get(off / cs)?;
        if (rc == 1) != copied {
            return Err(corrupt(format!("L1 entry {i}: COPIED is {copied} but the L2 table's refcount is {rc}")));
        }
    }
    for (guest, off, copied) in active_l2 {
        let rc = stored.get(off / cs)?;
        if (rc == 1) != copied {
            return Err(corrupt(format!("L2 entry for guest {guest:#x}: COPIED is {copied} but the refcount is {rc}")));
        }
    }
    let mut leaked = 0;
    for (c, &want) in counts.iter().enumerate() {
        let have = stored.get(c as u64)?;
        if have > u64::from(want) {
            tracing::debug!(cluster = c, host = c as u64 * cs, have, want, "leaked cluster");
            leaked += 1;
        }
    }
    // Counts can agree while two pieces of metadata share a cluster (the L1 table named as an
    // L2 table, with a refcount of 2): what a writable open refuses, check refuses too.
    for_writing(file, h, file_len)?;
    Ok(leaked)
}

/// What [`count_references`] finds: references per host cluster, the refcount table, and the
/// active L1 entries (index, L2 offset, COPIED) and L2 entries (guest offset, host offset,
/// COPIED).
struct Counted {
    counts: Vec<u16>,
    table: Vec<u64>,
    active_l1: Vec<(u64, u64, bool)>,
    active_l2: Vec<(u64, u64, bool)>,
}

/// Counts the references to each host cluster of the qcow2 file `file`, as `qemu-img check`
/// does: everything the header, the active and the snapshots' L1 tables, the refcount table
/// and the bitmap directory reach.
fn count_references(file: &File, h: &Header, file_len: u64) -> Result<Counted, CheckError> {
    let cs = h.cluster_size();
    let mut refs = Refs { counts: vec![0; usize::try_from(file_len.div_ceil(cs)).unwrap_or(usize::MAX)], cs };
    refs.add(0, cs, "header")?;

    // Active L1 and everything it reaches.
    refs.add(h.l1_table_offset, u64::from(h.l1_size) * 8, "L1 table")?;
    let mut active_l1 = Vec::new();
    let mut active_l2 = Vec::new();
    let mut count_l2 = |refs: &mut Refs, l1_index: u64, l2_off: u64, l2: &[u64], keep: bool| -> Result<(), CheckError> {
        refs.add(l2_off, cs, "L2 table")?;
        for (j, &e) in l2.iter().enumerate() {
            let guest = (l1_index * h.l2_entries() + j as u64) * cs;
            match decode_l2(h, e, guest)? {
                L2Ref::None => {}
                L2Ref::Cluster { offset, zero } => {
                    // A data cluster lies in the file whole: QEMU and this crate grow a file
                    // by whole clusters, so one cut short is a truncated file, whose lost
                    // bytes would read as zeroes.
                    let end = if zero { offset.saturating_add(1) } else { offset.saturating_add(cs) };
                    if end > file_len {
                        return Err(corrupt(format!(
                            "cluster for guest {guest:#x} at host {offset:#x} lies beyond the end of the file ({file_len} bytes; truncated?)"
                        )));
                    }
                    refs.add(offset, cs, "data cluster")?;
                    if keep {
                        active_l2.push((guest, offset, e & COPIED != 0));
                    }
                }
                L2Ref::Compressed { start, end } => refs.add(start, end - start, "compressed cluster")?,
            }
        }
        Ok(())
    };
    for_each_l2(file, h, h.l1_table_offset, h.l1_size, file_len, |i, e, l2| {
        active_l1.push((i, e & OFFSET_MASK, e & COPIED != 0));
        count_l2(&mut refs, i, e & OFFSET_MASK, l2, true)
    })?;

    // Refcount table and blocks.
    let rt_entries = u64::from(h.refcount_table_clusters) * cs / 8;
    refs.add(h.refcount_table_offset, rt_entries * 8, "refcount table")?;
    let table = read_table(file, h.refcount_table_offset, rt_entries)?;
    for (i, &e) in table.iter().enumerate() {
        let off = e & !0x1ff;
        if e & 0x1ff != 0 {
            return Err(corrupt(format!("refcount table entry {i} ({e:#x}) has reserved bits set")));
        }
        if off == 0 {
            continue;
        }
        if !off.is_multiple_of(cs) || off + cs > file_len {
            return Err(corrupt(format!("refcount block {i} at {off:#x} is unaligned or beyond the end of the file")));
        }
        refs.add(off, cs, "refcount block")?;
    }

    // Internal snapshots: their table, L1 tables and everything those reach.
    let snapshots = snapshots(file, h, file_len)?;
    for &(l1_off, l1_size) in &snapshots.l1s {
        refs.add(l1_off, u64::from(l1_size) * 8, "snapshot L1 table")?;
        for_each_l2(file, h, l1_off, l1_size, file_len, |i, e, l2| count_l2(&mut refs, i, e & OFFSET_MASK, l2, false))?;
    }
    refs.add(h.snapshots_offset, snapshots.table_len, "snapshot table")?;

    // Persistent bitmaps, counted only when QEMU would load them.
    if let Some(BitmapDirectory { count: nb, size: dir_size, offset: dir_off }) = bitmap_directory(h) {
        refs.add(dir_off, dir_size, "bitmap directory")?;
        let mut dir = vec![0u8; usize::try_from(dir_size).map_err(|_| corrupt("bitmap directory too large".into()))?];
        file.read_exact_at(&mut dir, dir_off)
            .map_err(|_| corrupt("bitmap directory lies beyond the end of the file".into()))?;
        let mut at = 0usize;
        for n in 0..nb {
            let entry = dir.get(at..at + 24).ok_or_else(|| corrupt(format!("bitmap {n} lies outside the directory")))?;
            let table_off = u64::from_be_bytes(entry[0..8].try_into().unwrap_or([0; 8]));
            let table_size = u64::from(u32::from_be_bytes(entry[8..12].try_into().unwrap_or([0; 4])));
            let name_len = usize::from(u16::from_be_bytes([entry[18], entry[19]]));
            let extra = u32::from_be_bytes(entry[20..24].try_into().unwrap_or([0; 4])) as usize;
            at += (24 + extra + name_len).next_multiple_of(8);
            refs.add(table_off, table_size * 8, "bitmap table")?;
            for e in read_table(file, table_off, table_size)? {
                let off = e & OFFSET_MASK;
                if off != 0 {
                    refs.add(off, cs, "bitmap data cluster")?;
                }
            }
        }
    }

    Ok(Counted { counts: refs.counts, table, active_l1, active_l2 })
}

/// Repairs what a crash can leave in an image imago 0.2.6 was writing, before a writable open
/// checks it ([`for_writing`]), and answers the host offsets it repaired (none, nearly always).
///
/// imago allocates a new L2 table (or refcount block, or a grown L1 or refcount table) in its
/// refcount cache, then writes the table and the entry (or header) pointing at it straight to
/// the file; the refcount block that counts it follows only when the cache is written back. QEMU writes the refcount first ("the ref count
/// of the L2 table may have changed", `l2_allocate`), so that a crash can only leak the cluster.
/// Killed in between, the file has a table its refcounts call free: [`for_writing`] refuses it
/// (the next allocation would overwrite the table), and the disk would not open again.
///
/// Each such cluster is counted in here, as `qemu-img check -r all` does, but only when nothing
/// else is wrong with it: it is referenced exactly once in the whole image (by that L1 entry or
/// the header) and its refcount block exists. Anything else is left for the open to refuse.
pub fn repair_uncounted_tables(file: &File, h: &Header, file_len: u64) -> Result<Vec<u64>, CheckError> {
    let cs = h.cluster_size();
    let (l1, table) = quick_tables(file, h, file_len)?;
    let per_block = (cs * 8) >> h.refcount_order;
    let mut stored = Stored { file, table: table.clone(), order: h.refcount_order, per_block, cached: None, cs };
    let clusters_of = |offset: u64, len: u64| (offset / cs..(offset + len).div_ceil(cs)).filter(move |_| len > 0);
    let l1_clusters = clusters_of(h.l1_table_offset, u64::from(h.l1_size) * 8);
    let table_clusters = clusters_of(h.refcount_table_offset, table.len() as u64 * 8);
    let blocks = table.iter().map(|e| e & !0x1ff).filter(|&off| off != 0).map(|off| off / cs);
    let l2_clusters = l1.iter().map(|e| e & OFFSET_MASK).filter(|&off| off != 0).map(|off| off / cs);
    let mut uncounted = Vec::new();
    for c in l1_clusters.chain(table_clusters).chain(blocks).chain(l2_clusters) {
        if stored.get(c)? == 0 && !uncounted.contains(&c) {
            uncounted.push(c);
        }
    }
    if uncounted.is_empty() {
        return Ok(uncounted);
    }
    // The whole count, to be sure nothing else claims those clusters.
    let counted = count_references(file, h, file_len)?;
    let mut blocks = Vec::with_capacity(uncounted.len());
    for &c in &uncounted {
        let refs = usize::try_from(c).ok().and_then(|i| counted.counts.get(i)).copied().unwrap_or(0);
        let block = table.get(usize::try_from(c / per_block).unwrap_or(usize::MAX)).map_or(0, |e| e & !0x1ff);
        if refs != 1 || block == 0 {
            return Ok(Vec::new());
        }
        blocks.push(block);
    }
    for (&c, &block) in uncounted.iter().zip(&blocks) {
        set_refcount_in_block(file, block, c % per_block, h.refcount_order, 1)?;
    }
    file.sync_data()?;
    Ok(uncounted.into_iter().map(|c| c * cs).collect())
}

/// Stores `value` as entry `index` of the refcount block at `block` (entries `1 << order` bits
/// wide; sub-byte ones packed least significant bits first, as QEMU does).
fn set_refcount_in_block(file: &File, block: u64, index: u64, order: u32, value: u64) -> io::Result<()> {
    let width = 1u64 << order;
    if width >= 8 {
        let bytes = (width / 8) as usize;
        let be = value.to_be_bytes();
        let mut entry = vec![0u8; bytes];
        let n = bytes.min(8);
        entry[bytes - n..].copy_from_slice(&be[8 - n..]);
        file.write_all_at(&entry, block + index * bytes as u64)
    } else {
        let bit = index * width;
        let at = block + bit / 8;
        let mut byte = [0u8; 1];
        file.read_exact_at(&mut byte, at)?;
        let mask = ((1u8 << width) - 1) << (bit % 8);
        byte[0] = (byte[0] & !mask) | ((value as u8) << (bit % 8) & mask);
        file.write_all_at(&byte, at)
    }
}
