//! Keeps guest data off the top file's metadata: QEMU's overlap check, for images that are
//! already corrupt in the way `qemu-img check` reports as "refcount=1 reference=2".
//!
//! An L2 entry of a damaged image can point a guest cluster at a host cluster that holds
//! metadata: the L1 table, a refcount block, an L2 table. imago trusts the entry, so a guest
//! write there overwrites that metadata in place (with the entry's COPIED bit), or copies the
//! cluster away and frees it (without), after which the allocator hands the metadata's cluster
//! out again. Either way one write turns a repairable image into a lost one: tried on an image
//! whose first data cluster pointed at its L1 table, one 4 KiB write over NBD replaced every
//! L1 entry with guest bytes. QEMU refuses such a write (`qcow2_pre_write_overlap_check`),
//! marks the image corrupt and fails the request; so does this driver.
//!
//! [`Guard`] holds the host clusters of the metadata the file has when it is opened for
//! writing, the regions of QEMU's overlap check: header, active L1 table, active L2 tables,
//! refcount table and blocks, snapshot table, the snapshots' L1 and L2 tables, the bitmap
//! directory (`check::for_writing` finds them). Before the image thread lets imago write, zero
//! or trim a range, it looks up where the top file maps that range. A mapping into one of
//! those clusters is refused when it has the COPIED bit, and also without it unless the stored
//! refcount counts the metadata's own reference besides the guest's, which is the state
//! `qemu-img check -r all` leaves: there imago's copy-on-write moves the guest's data away and
//! the metadata keeps its cluster. Metadata that imago creates later comes from clusters whose
//! refcount was 0, which a data cluster of a consistent image never has; the guard does not
//! follow it. For zero clusters, which may keep a host cluster, and compressed clusters, whose
//! host offsets imago's mapping interface does not give, the guard reads the L2 entries from
//! the file.
//!
//! The refcount table moves while an image is open, when the file outgrows it (and the L1
//! table would, were an open image resized). imago then frees the old clusters, which may
//! rightly become data. So a hit on the L1 or refcount table is checked against the header
//! before it counts, and the guard follows the table to where the header now puts it.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use super::check::{COMPRESSED, COPIED, Metadata, OFFSET_MASK, Region, Tables, ZERO, compressed_range, read_table, stored_refcount};
use super::header::{Header, INCOMPAT_CORRUPT};

/// Low bits of an entry of [`Guard::clusters`]: the `Metadata` kind.
const KIND_BITS: u32 = 4;

fn kind_of(entry: u64) -> Metadata {
    Metadata::ALL.get((entry & ((1 << KIND_BITS) - 1)) as usize).copied().unwrap_or(Metadata::Header)
}

/// A guest range found mapped onto metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Overlap {
    /// The metadata cluster's host offset.
    pub host: u64,
    /// What it holds.
    pub what: &'static str,
}

/// The top file's metadata clusters (see the module docs).
pub(super) struct Guard {
    /// The top file, read-write: for the header's current table offsets and the corrupt bit.
    file: File,
    cluster_bits: u32,
    version: u32,
    refcount_order: u32,
    /// `cluster << KIND_BITS | kind`, sorted, one per cluster: 8 bytes per metadata cluster,
    /// since an image of 512-byte clusters can have millions of L2 tables and refcount blocks.
    clusters: Vec<u64>,
}

impl Guard {
    pub(super) fn new(file: File, h: &Header, regions: &[Region]) -> Guard {
        let cluster_bits = h.cluster_bits;
        let mut clusters = Vec::with_capacity(regions.len());
        for r in regions.iter().filter(|r| r.len > 0) {
            let kind = r.what as u64;
            for c in r.offset >> cluster_bits..=(r.offset + r.len - 1) >> cluster_bits {
                clusters.push(c << KIND_BITS | kind);
            }
        }
        clusters.sort_unstable();
        // One entry per cluster: what a cluster holds first in `Metadata` order names it.
        clusters.dedup_by_key(|e| *e >> KIND_BITS);
        Guard { file, cluster_bits, version: h.version, refcount_order: h.refcount_order, clusters }
    }

    /// The first metadata cluster in host bytes `[host, host + len)`, if any.
    pub(super) fn overlap(&mut self, host: u64, len: u64) -> io::Result<Option<Overlap>> {
        if len == 0 {
            return Ok(None);
        }
        let (first, last) = (host >> self.cluster_bits, (host + len - 1) >> self.cluster_bits);
        let mut followed = false;
        loop {
            let at = self.clusters.partition_point(|&e| e >> KIND_BITS < first);
            let Some(&entry) = self.clusters.get(at).filter(|&&e| e >> KIND_BITS <= last) else {
                return Ok(None);
            };
            let kind = kind_of(entry);
            if matches!(kind, Metadata::L1 | Metadata::RefcountTable) && !followed {
                followed = true;
                if self.follow_moved_tables()? {
                    // The tables moved (and the guard with them): look again.
                    continue;
                }
            }
            return Ok(Some(Overlap { host: (entry >> KIND_BITS) << self.cluster_bits, what: kind.name() }));
        }
    }

    /// Re-reads where the header puts the L1 and refcount tables; if either is not where the
    /// guard has it, moves it there and returns true.
    fn follow_moved_tables(&mut self) -> io::Result<bool> {
        let tables = Tables::now(&self.file)?;
        let file_len = crate::image::byte_len(&self.file)?;
        let now = [
            (Metadata::L1, tables.l1_offset, tables.l1_size * 8),
            (Metadata::RefcountTable, tables.refcount_table_offset, tables.refcount_table_bytes(self.cluster_bits)),
        ];
        let mut moved = false;
        for (kind, offset, len) in now {
            if len == 0 || offset.checked_add(len).is_none_or(|end| end > file_len) {
                // Not a table imago wrote (it writes the header only after the table): keep
                // the guard as it is.
                continue;
            }
            let want: Vec<u64> = (offset >> self.cluster_bits..=(offset + len - 1) >> self.cluster_bits).collect();
            let have: Vec<u64> =
                self.clusters.iter().filter(|&&e| kind_of(e) == kind).map(|&e| e >> KIND_BITS).collect();
            if want != have {
                self.clusters.retain(|&e| kind_of(e) != kind);
                self.clusters.extend(want.iter().map(|&c| c << KIND_BITS | kind as u64));
                self.clusters.sort_unstable();
                self.clusters.dedup_by_key(|e| *e >> KIND_BITS);
                moved = true;
            }
        }
        Ok(moved)
    }

    /// Where the L2 entries in the file put the zero clusters that keep a host cluster and the
    /// compressed clusters among guest bytes `[guest, guest + len)`, which imago's mappings do
    /// not say: (guest offset, host offset, host bytes, COPIED). imago writes into the host
    /// cluster a COPIED zero cluster keeps, and lets go of what the others occupy when it
    /// copies them away. imago may hold newer entries in its cache, but it changes a cluster's
    /// host only to one its allocator hands out, never to metadata the guard knows, so the
    /// file's entry is the one that can be wrong.
    pub(super) fn hosts_the_mapping_hides(&self, guest: u64, len: u64) -> io::Result<Vec<(u64, u64, u64, bool)>> {
        let Tables { l1_size, l1_offset, .. } = Tables::now(&self.file)?;
        let per_table = 1u64 << (self.cluster_bits - 3);
        let mut hidden = Vec::new();
        let (mut c, last) = (guest >> self.cluster_bits, (guest + len.max(1) - 1) >> self.cluster_bits);
        while c <= last {
            let (l1_index, first) = (c / per_table, c % per_table);
            let n = (per_table - first).min(last - c + 1);
            if l1_index < l1_size {
                let l1_entry = read_table(&self.file, l1_offset.saturating_add(l1_index * 8), 1)?;
                let l2 = l1_entry.first().map_or(0, |e| e & OFFSET_MASK);
                if l2 != 0 {
                    for (i, e) in read_table(&self.file, l2 + first * 8, n)?.into_iter().enumerate() {
                        let at = (c + i as u64) << self.cluster_bits;
                        if e & COMPRESSED != 0 {
                            let (start, end) = compressed_range(self.cluster_bits, e);
                            hidden.push((at, start, end.saturating_sub(start), false));
                        } else if e & ZERO != 0 && e & OFFSET_MASK != 0 {
                            hidden.push((at, e & OFFSET_MASK, 1 << self.cluster_bits, e & COPIED != 0));
                        }
                    }
                }
            }
            c += n;
        }
        Ok(hidden)
    }

    /// Whether the metadata cluster at `host` keeps a reference of its own once a guest cluster
    /// mapped onto it (without the COPIED bit) lets go of its reference, as a copy-on-write or a
    /// trim does: the stored refcount counts both. That is the state `qemu-img check -r all`
    /// leaves such an image in, where imago's copy-on-write is safe.
    pub(super) fn keeps_its_reference(&self, host: u64) -> io::Result<bool> {
        Ok(stored_refcount(&self.file, self.cluster_bits, self.refcount_order, host >> self.cluster_bits)? >= 2)
    }

    /// Sets the header's corrupt bit, as QEMU does, so that nothing opens the image for writing
    /// again before `qemu-img check -r all` has repaired it. Version 2 has no such bit.
    pub(super) fn mark_corrupt(&self) -> io::Result<()> {
        if self.version < 3 {
            return Ok(());
        }
        let mut raw = [0u8; 8];
        self.file.read_exact_at(&mut raw, 72)?;
        let incompatible = u64::from_be_bytes(raw) | INCOMPAT_CORRUPT;
        self.file.write_all_at(&incompatible.to_be_bytes(), 72)?;
        self.file.sync_data()
    }
}
