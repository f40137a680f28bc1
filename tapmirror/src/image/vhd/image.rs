//! [`VhdImage`]: a chain served through the [`Image`] trait. Reads resolve each 512-byte sector
//! through the chain; writes go to the leaf in the crash-safe order documented in `mod.rs`.
//!
//! Concurrency: every method takes `&self`. Per layer, the BAT and the sector bitmaps live in
//! one table behind a `std::sync::RwLock` that is only held to copy or replace an entry (never
//! across I/O). Writers take, per block, one of [`STRIPES`] async mutexes whenever they change
//! metadata (allocate a block, set bitmap bits, or read-modify-write a partial sector whose bit
//! is clear), so two writes into one block never lose each other's bitmap bits; writes whose
//! sectors are all present already, and all reads, take no lock. Space at the end of the file is
//! handed out under one more mutex, and BAT sectors are rewritten (and sync points run) under
//! another. With `CrashSafety::PowerLoss` the table in memory runs ahead of the file between
//! sync points (`mod.rs`, "Sync points").

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use super::chain::{self, LeafMode};
use super::error::VhdError;
use super::format::{BAT_UNUSED, SECTOR, bitmap};
use crate::image::{
    Access, Extent, ExtentState, Features, Image, ImageError, Result, ZeroAlloc, ZeroSpeed, check_range,
};
use crate::io::{Durability, EngineKind, FileIo, IoBuf};

/// Per-block metadata locks: block `b` uses stripe `b % STRIPES`.
pub const STRIPES: usize = 64;
/// Most extents one `allocation` call returns.
const MAX_EXTENTS: usize = 4096;
/// Zero buffer size for `write_zeroes`.
const ZERO_CHUNK: u64 = 1 << 20;

/// What a crash may cost, chosen when opening for writing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum CrashSafety {
    /// Metadata lags in memory until a sync point (a flush, a `Stable` write, closing,
    /// [`Image::sync_metadata`](crate::image::Image::sync_metadata)): there
    /// one `fdatasync` makes every written byte durable, then the bitmap sectors and BAT
    /// entries that describe them are written. After a power loss or a process crash every
    /// sector reads as its old or its new content, and everything written before a completed
    /// flush is there; writes since the last flush may read as old, as with any disk's
    /// volatile cache. A write into sectors not present yet costs no `fdatasync` of its own.
    #[default]
    PowerLoss,
    /// Metadata written at once, with no barrier: a process crash loses no completed write,
    /// but after a power loss sectors written since the last flush may read as zeroes (never
    /// as another sector's data or another file's). For scratch targets that a failed copy
    /// recreates anyway.
    ProcessCrash,
}

/// What a layer knows of one block's sectors.
#[derive(Clone, Debug)]
enum Bits {
    /// Bitmap not read yet.
    Unknown,
    /// Every sector present.
    Full,
    /// Some sectors present (the bitmap, `ceil(spb / 8)` bytes).
    Partial(Arc<Vec<u8>>),
}

impl Bits {
    fn from_map(map: Vec<u8>, spb: u64) -> Bits {
        if bitmap::all_set(&map, 0, spb) { Bits::Full } else { Bits::Partial(Arc::new(map)) }
    }

    fn all_set(&self, a: u64, b: u64) -> bool {
        match self {
            Bits::Full => true,
            Bits::Partial(m) => bitmap::all_set(m, a, b),
            Bits::Unknown => false,
        }
    }

    fn get(&self, i: u64) -> bool {
        self.all_set(i, i + 1)
    }

    fn map(&self, spb: u64) -> Vec<u8> {
        match self {
            Bits::Full => {
                let mut m = vec![0u8; spb.div_ceil(8) as usize];
                bitmap::set_range(&mut m, 0, spb);
                m
            }
            Bits::Partial(m) => m.as_ref().clone(),
            Bits::Unknown => vec![0u8; spb.div_ceil(8) as usize],
        }
    }
}

#[derive(Clone, Debug)]
struct Slot {
    sector: u32,
    bits: Bits,
}

/// A layer's blocks: where each lies in the file and what is known of its sectors. Five bytes
/// a block, and a bitmap kept only for blocks whose sectors are partly present: a 2040 GiB
/// layer takes 5 MB (a `Slot` a block took 25 MB, and a 30-deep chain of such disks 900 MB).
struct Table {
    sectors: Vec<u32>,
    /// Per block: [`UNREAD`], [`FULL`] or [`PARTIAL`] (its bitmap in `partial`).
    known: Vec<u8>,
    partial: std::collections::HashMap<u32, Arc<Vec<u8>>>,
}

const UNREAD: u8 = 0;
const FULL: u8 = 1;
const PARTIAL: u8 = 2;

impl Table {
    fn new(bat: &[u32]) -> Table {
        Table { sectors: bat.to_vec(), known: vec![UNREAD; bat.len()], partial: std::collections::HashMap::new() }
    }

    fn get(&self, block: u64) -> Option<Slot> {
        let i = usize::try_from(block).ok()?;
        let sector = *self.sectors.get(i)?;
        let bits = match self.known.get(i) {
            Some(&FULL) => Bits::Full,
            Some(&PARTIAL) => self.partial.get(&(i as u32)).map_or(Bits::Unknown, |m| Bits::Partial(Arc::clone(m))),
            _ => Bits::Unknown,
        };
        Some(Slot { sector, bits })
    }

    fn set(&mut self, block: u64, slot: Slot) {
        let Ok(i) = usize::try_from(block) else { return };
        let (Some(sector), Some(known)) = (self.sectors.get_mut(i), self.known.get_mut(i)) else { return };
        *sector = slot.sector;
        // Block numbers fit in a u32: a VHD's BAT has at most u32::MAX entries.
        let key = i as u32;
        *known = match slot.bits {
            Bits::Unknown => UNREAD,
            Bits::Full => FULL,
            Bits::Partial(m) => {
                self.partial.insert(key, m);
                PARTIAL
            }
        };
        if *known != PARTIAL {
            self.partial.remove(&key);
        }
    }
}

/// One file of the chain, as the data path uses it.
pub(super) struct Live {
    pub(super) path: PathBuf,
    pub(super) io: FileIo,
    /// QEMU's "write not shared" lock on the file, as long as the layer lives.
    _qemu_lock: crate::image::QemuLock,
    pub(super) uuid: [u8; 16],
    pub(super) size: u64,
    pub(super) block_size: u64,
    spb: u64,
    bitmap_bytes: u64,
    table: RwLock<Table>,
}

impl Live {
    fn slot(&self, block: u64) -> Slot {
        let t = self.table.read().unwrap_or_else(|p| p.into_inner());
        t.get(block).unwrap_or(Slot { sector: BAT_UNUSED, bits: Bits::Unknown })
    }

    /// The block's sector presence, reading its bitmap on first use; `None` when unallocated.
    fn bits(&self, block: u64) -> std::io::Result<Option<Bits>> {
        let slot = self.slot(block);
        if slot.sector == BAT_UNUSED {
            return Ok(None);
        }
        if !matches!(slot.bits, Bits::Unknown) {
            return Ok(Some(slot.bits));
        }
        let mut map = vec![0u8; self.spb.div_ceil(8) as usize];
        std::os::unix::fs::FileExt::read_exact_at(self.io.file(), &mut map, u64::from(slot.sector) * SECTOR)?;
        let bits = Bits::from_map(map, self.spb);
        let mut t = self.table.write().unwrap_or_else(|p| p.into_inner());
        let Some(now) = t.get(block) else { return Ok(Some(bits)) };
        // Only fill an unread entry: a writer may have published newer bits meanwhile.
        if now.sector == slot.sector && matches!(now.bits, Bits::Unknown) {
            t.set(block, Slot { sector: now.sector, bits: bits.clone() });
            Ok(Some(bits))
        } else {
            Ok(Some(now.bits))
        }
    }

    /// The bitmap sector(s) of `slot` as the file holds them: its bits, padded.
    fn bitmap_bytes_of(&self, slot: &Slot) -> Vec<u8> {
        let mut map = slot.bits.map(self.spb);
        map.resize(self.bitmap_bytes as usize, 0);
        map
    }

    fn publish(&self, block: u64, slot: Slot) {
        let mut t = self.table.write().unwrap_or_else(|p| p.into_inner());
        t.set(block, slot);
    }

    /// Walks `[off, off + len)` of this layer alone: `f(off, len, Some(file offset))` for runs
    /// present here, `f(off, len, None)` for runs that are not (past the layer's size included).
    pub(super) fn runs(&self, off: u64, len: u64, f: &mut dyn FnMut(u64, u64, Option<u64>)) -> std::io::Result<()> {
        let end = off + len;
        let mut pos = off;
        if pos < end && pos >= self.size {
            f(pos, end - pos, None);
            return Ok(());
        }
        while pos < end {
            if pos >= self.size {
                f(pos, end - pos, None);
                break;
            }
            let block = pos / self.block_size;
            let bstart = block * self.block_size;
            let bend = (bstart + self.block_size).min(end).min(self.size);
            match self.bits(block)? {
                None => f(pos, bend - pos, None),
                Some(bits) => {
                    let data = u64::from(self.slot(block).sector) * SECTOR + self.bitmap_bytes;
                    let s0 = (pos - bstart) / SECTOR;
                    let s1 = (bend - bstart).div_ceil(SECTOR);
                    let runs = match &bits {
                        Bits::Full => vec![(s0, s1, true)],
                        Bits::Partial(m) => bitmap::runs(m, s0, s1),
                        Bits::Unknown => vec![(s0, s1, false)],
                    };
                    for (a, b, set) in runs {
                        let ra = (bstart + a * SECTOR).max(pos);
                        let rb = (bstart + b * SECTOR).min(bend);
                        f(ra, rb - ra, set.then(|| data + (ra - bstart)));
                    }
                }
            }
            pos = bend;
        }
        Ok(())
    }
}

/// Where a run of the virtual disk comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Src {
    /// No layer has it: zeroes.
    Zero,
    /// Layer `idx` at file offset `at`.
    Layer { idx: usize, at: u64 },
}

#[derive(Clone, Copy, Debug)]
pub(super) struct Seg {
    pub(super) off: u64,
    pub(super) len: u64,
    pub(super) src: Src,
}

/// The order of the writes an allocation made, recorded in tests.
#[cfg(test)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Step {
    Footer(u64),
    Data(u64),
    Bitmap(u64),
    Barrier,
    Bat(u64),
}

struct Writer {
    safety: CrashSafety,
    /// Where the next block goes (the end footer's offset).
    end: tokio::sync::Mutex<u64>,
    stripes: Vec<tokio::sync::Mutex<()>>,
    /// The BAT as the file holds it. Its lock serialises every BAT write, and (`PowerLoss`)
    /// the sync points.
    bat_on_disk: tokio::sync::Mutex<Vec<u32>>,
    /// `PowerLoss`: blocks whose bitmap or BAT entry in memory is ahead of the file.
    lagging: std::sync::Mutex<std::collections::BTreeSet<u64>>,
    footer: Arc<IoBuf>,
    bat_offset: u64,
    #[cfg(test)]
    trace: std::sync::Mutex<Vec<Step>>,
}

impl Writer {
    fn lag(&self, block: u64) {
        self.lagging.lock().unwrap_or_else(|p| p.into_inner()).insert(block);
    }

    /// The BAT sector holding block `block`'s entry, built from `bat` (which starts at file
    /// offset `bat_offset`): its file offset and bytes.
    fn bat_sector(bat_offset: u64, bat: &[u32], block: u64) -> (u64, Vec<u8>) {
        let per = (SECTOR / 4) as usize;
        let first = block as usize / per * per;
        let mut sec = vec![0xFFu8; SECTOR as usize];
        for i in first..(first + per).min(bat.len()) {
            sec[(i - first) * 4..(i - first) * 4 + 4].copy_from_slice(&bat[i].to_be_bytes());
        }
        (bat_offset + (first as u64) * 4, sec)
    }

    /// Enters the taken blocks' sectors into `bat`; answers one block per BAT sector that
    /// changed, to be rewritten.
    fn enter(bat: &mut [u32], taken: &[(u64, Slot)]) -> Vec<u64> {
        let per = SECTOR / 4;
        let mut changed = std::collections::BTreeMap::new();
        for (block, slot) in taken {
            if bat[*block as usize] != slot.sector {
                bat[*block as usize] = slot.sector;
                changed.insert(block / per, *block);
            }
        }
        changed.into_values().collect()
    }

    #[cfg(test)]
    fn record(&self, s: Step) {
        self.trace.lock().unwrap_or_else(|p| p.into_inner()).push(s);
    }
    #[cfg(not(test))]
    fn record(&self, _s: ()) {}
}

#[cfg(not(test))]
macro_rules! step {
    ($w:expr, $s:expr) => {
        $w.record(())
    };
}
#[cfg(test)]
macro_rules! step {
    ($w:expr, $s:expr) => {
        $w.record($s)
    };
}

/// A VHD chain opened for the data path. The leaf is written; parents are read-only.
pub struct VhdImage {
    layers: Vec<Live>,
    size: u64,
    access: Access,
    writer: Option<Writer>,
}

fn io_err(op: &'static str, offset: u64) -> impl FnOnce(std::io::Error) -> ImageError {
    move |source| ImageError::Io { op, offset, source }
}

impl VhdImage {
    /// Opens the chain whose leaf is `path` (parents found through the leaf's locators and
    /// checked by UUID), with [`CrashSafety::PowerLoss`].
    pub async fn open(path: &Path, access: Access, engine: EngineKind) -> std::result::Result<VhdImage, VhdError> {
        VhdImage::open_with(path, access, engine, CrashSafety::PowerLoss).await
    }

    /// [`VhdImage::open`] with a chosen crash-safety level (it matters only for writing).
    pub async fn open_with(
        path: &Path,
        access: Access,
        engine: EngineKind,
        safety: CrashSafety,
    ) -> std::result::Result<VhdImage, VhdError> {
        let mode = match access {
            Access::ReadOnly => LeafMode::ReadOnly,
            Access::ReadWrite => LeafMode::ReadWrite,
        };
        let chain = chain::open_chain(path, mode)?;
        VhdImage::from_chain(chain, access, engine, safety).await
    }

    pub(super) async fn from_chain(
        chain: Vec<chain::Layer>,
        access: Access,
        engine: EngineKind,
        safety: CrashSafety,
    ) -> std::result::Result<VhdImage, VhdError> {
        let size = chain[0].meta.size;
        let writer = (access == Access::ReadWrite).then(|| {
            let m = &chain[0].meta;
            Writer {
                safety,
                end: tokio::sync::Mutex::new(m.end),
                stripes: (0..STRIPES).map(|_| tokio::sync::Mutex::new(())).collect(),
                bat_on_disk: tokio::sync::Mutex::new(m.bat.clone()),
                lagging: std::sync::Mutex::new(std::collections::BTreeSet::new()),
                footer: Arc::new(IoBuf::from_vec(m.footer.encode().to_vec())),
                bat_offset: m.header.table_offset,
                #[cfg(test)]
                trace: std::sync::Mutex::new(Vec::new()),
            }
        });
        let mut layers = Vec::with_capacity(chain.len());
        for l in chain {
            let m = l.meta;
            let io = FileIo::new(l.file, engine).await.map_err(|e| VhdError::io(&m.path, "set up I/O", e))?;
            let table = Table::new(&m.bat);
            layers.push(Live {
                path: m.path.clone(),
                io,
                _qemu_lock: l.qemu_lock,
                uuid: m.footer.uuid,
                size: m.size,
                block_size: m.block_size,
                spb: m.block_size / SECTOR,
                bitmap_bytes: m.bitmap_bytes,
                table: RwLock::new(table),
            });
        }
        tracing::debug!(path = %layers[0].path.display(), size, depth = layers.len(), "vhd image open");
        Ok(VhdImage { layers, size, access, writer })
    }

    /// The files of the chain, leaf first.
    pub fn chain(&self) -> Vec<PathBuf> {
        self.layers.iter().map(|l| l.path.clone()).collect()
    }

    pub(super) fn layers(&self) -> &[Live] {
        &self.layers
    }

    #[cfg(test)]
    pub(super) fn trace(&self) -> Vec<Step> {
        self.writer.as_ref().map(|w| w.trace.lock().unwrap_or_else(|p| p.into_inner()).clone()).unwrap_or_default()
    }

    /// Resolves `[off, off + len)` through layers `first..`: ordered segments covering it.
    pub(super) fn map(&self, first: usize, off: u64, len: u64) -> std::io::Result<Vec<Seg>> {
        let mut pending = vec![(off, len)];
        let mut out: Vec<Seg> = Vec::new();
        for (idx, layer) in self.layers.iter().enumerate().skip(first) {
            let mut next = Vec::new();
            for (o, l) in pending {
                layer.runs(o, l, &mut |o, l, at| match at {
                    Some(at) => out.push(Seg { off: o, len: l, src: Src::Layer { idx, at } }),
                    None => next.push((o, l)),
                })?;
            }
            pending = next;
            if pending.is_empty() {
                break;
            }
        }
        out.extend(pending.into_iter().map(|(o, l)| Seg { off: o, len: l, src: Src::Zero }));
        out.sort_by_key(|s| s.off);
        let mut merged: Vec<Seg> = Vec::with_capacity(out.len());
        for s in out {
            if let Some(last) = merged.last_mut()
                && last.off + last.len == s.off
            {
                match (last.src, s.src) {
                    (Src::Zero, Src::Zero) => {
                        last.len += s.len;
                        continue;
                    }
                    (Src::Layer { idx: a, at: x }, Src::Layer { idx: b, at: y }) if a == b && x + last.len == y => {
                        last.len += s.len;
                        continue;
                    }
                    _ => {}
                }
            }
            merged.push(s);
        }
        Ok(merged)
    }

    /// Fills `out` with the content of `[off, off + out.len())` as seen from layer `first` down.
    async fn read_from(&self, first: usize, off: u64, out: &mut [u8]) -> Result<()> {
        let segs = self.map(first, off, out.len() as u64).map_err(io_err("read bitmap", off))?;
        for s in segs {
            let dst = &mut out[(s.off - off) as usize..(s.off - off + s.len) as usize];
            match s.src {
                Src::Zero => dst.fill(0),
                Src::Layer { idx, at } => {
                    let (tmp, r) = self.layers[idx].io.read_exact_at(IoBuf::for_overwrite(dst.len()), at).await;
                    r.map_err(io_err("read", s.off))?;
                    dst.copy_from_slice(&tmp);
                }
            }
        }
        Ok(())
    }

    fn writer(&self) -> Result<&Writer> {
        match (&self.writer, self.access) {
            (Some(w), Access::ReadWrite) => Ok(w),
            _ => Err(ImageError::ReadOnly),
        }
    }

    /// Writes `buf[range]` at byte `in_off` of leaf block `block`.
    async fn write_piece(
        &self,
        w: &Writer,
        block: u64,
        in_off: u64,
        buf: &Arc<IoBuf>,
        range: std::ops::Range<usize>,
    ) -> Result<()> {
        let leaf = &self.layers[0];
        let vbase = block * leaf.block_size;
        let len = range.len() as u64;
        let (s0, s1) = (in_off / SECTOR, (in_off + len).div_ceil(SECTOR));
        // Fast path: every sector already present, so the bytes go straight to their place.
        if let Some(bits) = leaf.bits(block).map_err(io_err("read bitmap", vbase))?
            && bits.all_set(s0, s1)
        {
            let at = u64::from(leaf.slot(block).sector) * SECTOR + leaf.bitmap_bytes + in_off;
            return leaf
                .io
                .write_all_at(buf, range, at, Durability::Cached)
                .await
                .map_err(io_err("write", vbase + in_off));
        }
        let _stripe = w.stripes[(block % STRIPES as u64) as usize].lock().await;
        let Some(bits) = leaf.bits(block).map_err(io_err("read bitmap", vbase))? else {
            return self.allocate(w, block, in_off, buf, range).await;
        };
        let sector = leaf.slot(block).sector;
        let data = u64::from(sector) * SECTOR + leaf.bitmap_bytes;
        if bits.all_set(s0, s1) {
            return leaf
                .io
                .write_all_at(buf, range, data + in_off, Durability::Cached)
                .await
                .map_err(io_err("write", vbase + in_off));
        }
        // Data first (invisible while its bits are clear), completing partial sectors whose
        // bit is clear with the content below, so the whole sector is right once the bit is set.
        for (at, b, r) in self.data_writes(block, in_off, buf, range, |i| bits.get(i)).await? {
            leaf.io.write_all_at(&b, r, data + at, Durability::Cached).await.map_err(io_err("write", vbase + at))?;
        }
        step!(w, Step::Data(data + in_off));
        let mut map = bits.map(leaf.spb);
        bitmap::set_range(&mut map, s0, s1);
        if w.safety == CrashSafety::PowerLoss {
            // The bitmap reaches the file at the next sync point, after the data.
            leaf.publish(block, Slot { sector, bits: Bits::from_map(map, leaf.spb) });
            w.lag(block);
            return Ok(());
        }
        // Then the bitmap sectors that change.
        let first = (s0 / 8) / SECTOR * SECTOR;
        let last = ((s1 - 1) / 8) / SECTOR * SECTOR + SECTOR;
        let mut out = vec![0u8; (last - first) as usize];
        let avail = (map.len() as u64).min(last) - first;
        out[..avail as usize].copy_from_slice(&map[first as usize..(first + avail) as usize]);
        let at = u64::from(sector) * SECTOR + first;
        let ob = Arc::new(IoBuf::from_vec(out));
        let n = ob.len();
        leaf.io.write_all_at(&ob, 0..n, at, Durability::Cached).await.map_err(io_err("write bitmap", vbase))?;
        step!(w, Step::Bitmap(at));
        leaf.publish(block, Slot { sector, bits: Bits::from_map(map, leaf.spb) });
        Ok(())
    }

    /// The data writes for `buf[range]` at byte `in_off` of leaf block `block`, as
    /// `(offset in the block's data area, buffer, range)`. A partial sector that `present` says
    /// the leaf lacks is completed with what the chain reads there now and written whole (the
    /// caller holds the block's stripe, and every writer of an absent sector takes it, so that
    /// sector cannot change meanwhile); sectors the leaf has only get the bytes written, so a
    /// concurrent write to other bytes of the same sector is never undone.
    async fn data_writes(
        &self,
        block: u64,
        in_off: u64,
        buf: &Arc<IoBuf>,
        range: std::ops::Range<usize>,
        present: impl Fn(u64) -> bool,
    ) -> Result<Vec<(u64, Arc<IoBuf>, std::ops::Range<usize>)>> {
        let vbase = block * self.layers[0].block_size;
        let end = in_off + range.len() as u64;
        let (s0, s1) = (in_off / SECTOR, end.div_ceil(SECTOR));
        let head = !in_off.is_multiple_of(SECTOR) && !present(s0);
        let tail = !end.is_multiple_of(SECTOR) && !present(s1 - 1);
        let mut out = Vec::new();
        let whole = async |s: u64| -> Result<(u64, Arc<IoBuf>, std::ops::Range<usize>)> {
            let mut sec = vec![0u8; SECTOR as usize];
            self.read_from(0, vbase + s * SECTOR, &mut sec).await?;
            let (a, b) = ((s * SECTOR).max(in_off), ((s + 1) * SECTOR).min(end));
            let from = range.start + (a - in_off) as usize;
            sec[(a - s * SECTOR) as usize..(b - s * SECTOR) as usize]
                .copy_from_slice(&buf[from..from + (b - a) as usize]);
            Ok((s * SECTOR, Arc::new(IoBuf::from_vec(sec)), 0..SECTOR as usize))
        };
        let (mut a, mut b) = (in_off, end);
        if head || (tail && s1 - 1 == s0) {
            out.push(whole(s0).await?);
            a = ((s0 + 1) * SECTOR).min(end);
        }
        if tail && s1 - 1 > s0 {
            out.push(whole(s1 - 1).await?);
            b = (s1 - 1) * SECTOR;
        }
        if a < b {
            let from = range.start + (a - in_off) as usize;
            out.push((a, Arc::clone(buf), from..from + (b - a) as usize));
        }
        Ok(out)
    }

    /// Allocates leaf block `block` and writes into it. The caller holds the block's stripe.
    async fn allocate(
        &self,
        w: &Writer,
        block: u64,
        in_off: u64,
        buf: &Arc<IoBuf>,
        range: std::ops::Range<usize>,
    ) -> Result<()> {
        let leaf = &self.layers[0];
        let vbase = block * leaf.block_size;
        let len = range.len() as u64;
        let (s0, s1) = (in_off / SECTOR, (in_off + len).div_ceil(SECTOR));
        // Only the written sectors become present: the rest of a new block is fresh file space
        // (zeroes), which is the old content of a dynamic disk but not of a differencing one,
        // and a dynamic disk may later be composed onto a parent (then its clear bits must mean
        // "not written"). Partial sectors are completed with the content below.
        let writes = self.data_writes(block, in_off, buf, range, |_| false).await?;
        let mut map = vec![0u8; leaf.spb.div_ceil(8) as usize];
        bitmap::set_range(&mut map, s0, s1);
        let span = leaf.bitmap_bytes + leaf.block_size;

        // 1. Reserve space where the end footer is, and first write the footer past it: the old
        //    footer is about to be overwritten by the bitmap, and the file must always end with one.
        let start = {
            let mut end = w.end.lock().await;
            let start = *end;
            if start / SECTOR >= u64::from(BAT_UNUSED) {
                return Err(ImageError::Io {
                    op: "allocate",
                    offset: vbase,
                    source: std::io::Error::from_raw_os_error(libc::EFBIG),
                });
            }
            leaf.io
                .write_all_at(&w.footer, 0..w.footer.len(), start + span, Durability::Cached)
                .await
                .map_err(io_err("write footer", vbase))?;
            step!(w, Step::Footer(start + span));
            *end = start + span;
            start
        };
        let data = start + leaf.bitmap_bytes;
        // 2. The data (nothing points at this space yet).
        for (at, b, r) in writes {
            leaf.io.write_all_at(&b, r, data + at, Durability::Cached).await.map_err(io_err("write", vbase + at))?;
        }
        step!(w, Step::Data(data + in_off));
        // 3. The bitmap, over where the old footer was.
        let mut bm = map.clone();
        bm.resize(leaf.bitmap_bytes as usize, 0);
        let bm = Arc::new(IoBuf::from_vec(bm));
        leaf.io
            .write_all_at(&bm, 0..bm.len(), start, Durability::Cached)
            .await
            .map_err(io_err("write bitmap", vbase))?;
        step!(w, Step::Bitmap(start));
        let slot = Slot { sector: (start / SECTOR) as u32, bits: Bits::from_map(map, leaf.spb) };
        if w.safety == CrashSafety::PowerLoss {
            // 4 and 5 (barrier, BAT entry) at the next sync point.
            leaf.publish(block, slot);
            w.lag(block);
            return Ok(());
        }
        // 5. The BAT entry, as a rewrite of its whole sector (serialised, so entries of
        //    neighbouring blocks are never lost), then publication.
        let mut bat = w.bat_on_disk.lock().await;
        let old = std::mem::replace(&mut bat[block as usize], slot.sector);
        if let Err(e) = self.write_bat_sector(w, &bat, block).await {
            // Not in the file: later rewrites of this BAT sector must not name it either.
            bat[block as usize] = old;
            return Err(e);
        }
        leaf.publish(block, slot);
        Ok(())
    }

    /// Rewrites the BAT sector holding block `block`'s entry from `bat`, the caller's locked
    /// copy of what the file must hold.
    async fn write_bat_sector(&self, w: &Writer, bat: &[u32], block: u64) -> Result<()> {
        let leaf = &self.layers[0];
        let (at, sec) = Writer::bat_sector(w.bat_offset, bat, block);
        let sec = Arc::new(IoBuf::from_vec(sec));
        leaf.io.write_all_at(&sec, 0..sec.len(), at, Durability::Cached).await.map_err(io_err("write BAT", block * leaf.block_size))?;
        step!(w, Step::Bat(at));
        Ok(())
    }

    /// The sync point of `PowerLoss`: makes the file catch up with the metadata in memory.
    /// What lags is taken first, then one `fdatasync` makes durable every byte the taken
    /// bitmaps and BAT entries describe (each was published after its data was written), and
    /// only then are they written. Bits published meanwhile wait for the next sync point.
    async fn catch_up(&self, w: &Writer) -> Result<()> {
        let leaf = &self.layers[0];
        let mut bat = w.bat_on_disk.lock().await;
        let blocks = std::mem::take(&mut *w.lagging.lock().unwrap_or_else(|p| p.into_inner()));
        if blocks.is_empty() {
            return Ok(());
        }
        let taken: Vec<(u64, Slot)> = blocks.iter().map(|&b| (b, leaf.slot(b))).collect();
        let undo = |blocks: &std::collections::BTreeSet<u64>| w.lagging.lock().unwrap_or_else(|p| p.into_inner()).extend(blocks);
        if let Err(e) = leaf.io.sync_data().await {
            undo(&blocks);
            return Err(io_err("fdatasync", 0)(e));
        }
        step!(w, Step::Barrier);
        // What the file's table held for these blocks, to put back if a write fails (the
        // blocks then lag again, and their entries must still count as not written).
        let before: Vec<(u64, u32)> = taken.iter().map(|(b, _)| (*b, bat[*b as usize])).collect();
        let written = async {
            for (block, slot) in &taken {
                let map = Arc::new(IoBuf::from_vec(leaf.bitmap_bytes_of(slot)));
                let at = u64::from(slot.sector) * SECTOR;
                leaf.io
                    .write_all_at(&map, 0..map.len(), at, Durability::Cached)
                    .await
                    .map_err(io_err("write bitmap", block * leaf.block_size))?;
                step!(w, Step::Bitmap(at));
            }
            for block in Writer::enter(&mut bat, &taken) {
                self.write_bat_sector(w, &bat, block).await?;
            }
            Ok(())
        };
        let r = written.await;
        if r.is_err() {
            for (b, e) in before {
                bat[b as usize] = e;
            }
            undo(&blocks);
        }
        r
    }

    /// Writes through the public path, block by block.
    async fn write_all(&self, offset: u64, buf: &Arc<IoBuf>) -> Result<()> {
        let w = self.writer()?;
        let bs = self.layers[0].block_size;
        let mut pos = 0usize;
        while pos < buf.len() {
            let off = offset + pos as u64;
            let block = off / bs;
            let in_off = off % bs;
            let n = ((bs - in_off) as usize).min(buf.len() - pos);
            self.write_piece(w, block, in_off, buf, pos..pos + n).await?;
            pos += n;
        }
        Ok(())
    }
}

impl Image for VhdImage {
    fn size(&self) -> u64 {
        self.size
    }

    fn features(&self) -> Features {
        Features {
            read_only: self.access == Access::ReadOnly,
            // Blocks are never freed, so there is nothing a trim could do.
            trim: false,
            // Fast when nothing needs writing: a range no layer holds (see `write_zeroes`).
            fast_zero: true,
            // One object per chain, one descriptor per file: a flush covers every connection.
            multi_conn: true,
            // Sector-granular: see `Features::min_block`.
            min_block: 512,
        }
    }

    async fn read(&self, offset: u64, mut buf: IoBuf) -> (IoBuf, Result<()>) {
        if let Err(e) = check_range(offset, buf.len() as u64, self.size) {
            return (buf, Err(e));
        }
        let segs = match self.map(0, offset, buf.len() as u64) {
            Ok(s) => s,
            Err(e) => return (buf, Err(io_err("read bitmap", offset)(e))),
        };
        // One segment from one file (the common case) reads straight into the caller's buffer.
        if let [s] = segs.as_slice() {
            return match s.src {
                Src::Zero => {
                    buf.fill(0);
                    (buf, Ok(()))
                }
                Src::Layer { idx, at } => {
                    let (buf, r) = self.layers[idx].io.read_exact_at(buf, at).await;
                    (buf, r.map_err(io_err("read", offset)))
                }
            };
        }
        let r = self.read_from(0, offset, &mut buf).await;
        (buf, r)
    }

    async fn write(&self, offset: u64, buf: Arc<IoBuf>, durability: Durability) -> Result<()> {
        self.writer()?;
        check_range(offset, buf.len() as u64, self.size)?;
        self.write_all(offset, &buf).await?;
        if durability == Durability::Stable {
            self.flush().await?;
        }
        Ok(())
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        length: u64,
        alloc: ZeroAlloc,
        speed: ZeroSpeed,
        durability: Durability,
    ) -> Result<()> {
        self.writer()?;
        check_range(offset, length, self.size)?;
        let end = offset + length;
        // A range no layer holds already reads as zeroes: nothing to write there, unless the
        // caller wants it allocated.
        let needs_writing = |pos: u64, n: u64| -> Result<bool> {
            Ok(alloc == ZeroAlloc::Keep || !self.map(0, pos, n).map_err(io_err("read bitmap", pos))?.iter().all(|s| s.src == Src::Zero))
        };
        let chunks = || {
            std::iter::successors(Some(offset), move |&pos| Some(pos + (end - pos).min(ZERO_CHUNK - pos % ZERO_CHUNK)))
                .take_while(move |&pos| pos < end)
                .map(move |pos| (pos, (end - pos).min(ZERO_CHUNK - pos % ZERO_CHUNK)))
        };
        if speed == ZeroSpeed::FastOnly {
            // Fast only when nothing needs writing (a fresh disk's range, as qemu-img convert
            // asks before it copies): checked whole before anything changes.
            for (pos, n) in chunks() {
                if needs_writing(pos, n)? {
                    return Err(ImageError::NotFast);
                }
            }
            return Ok(());
        }
        for (pos, n) in chunks() {
            if needs_writing(pos, n)? {
                self.write_all(pos, &Arc::new(IoBuf::new(n as usize))).await?;
            }
        }
        if durability == Durability::Stable {
            self.flush().await?;
        }
        Ok(())
    }

    async fn trim(&self, offset: u64, length: u64) -> Result<()> {
        self.writer()?;
        check_range(offset, length, self.size)
    }

    async fn flush(&self) -> Result<()> {
        let Some(w) = &self.writer else { return Ok(()) };
        self.catch_up(w).await?;
        self.layers[0].io.sync_data().await.map_err(io_err("flush", 0))
    }

    async fn sync_metadata(&self) -> Result<()> {
        match &self.writer {
            Some(w) if w.safety == CrashSafety::PowerLoss => self.catch_up(w).await,
            _ => Ok(()),
        }
    }

    async fn allocation(&self, offset: u64, length: u64, limit: usize) -> Result<Vec<Extent>> {
        let limit = limit.clamp(1, MAX_EXTENTS);
        check_range(offset, length, self.size)?;
        let end = offset + length;
        let bs = self.layers[0].block_size;
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = offset;
        while pos < end && out.len() <= limit {
            let n = (end - pos).min(bs - pos % bs);
            for s in self.map(0, pos, n).map_err(io_err("read bitmap", pos))? {
                let state = if s.src == Src::Zero { ExtentState::Hole } else { ExtentState::Data };
                push_extent(&mut out, s.off, s.len, state);
            }
            pos += n;
        }
        out.truncate(limit);
        Ok(out)
    }
}

impl Drop for VhdImage {
    fn drop(&mut self) {
        // Closing is a sync point: metadata still lagging in memory reaches the file (after
        // the data, as at any other). Blocking, as a close is; a failure can only be logged,
        // and leaves those writes reading as old, as a crash would.
        if let Some(w) = &mut self.writer {
            let leaf = &self.layers[0];
            let blocks = std::mem::take(w.lagging.get_mut().unwrap_or_else(|p| p.into_inner()));
            if !blocks.is_empty() {
                use std::os::unix::fs::FileExt;
                let taken: Vec<(u64, Slot)> = blocks.iter().map(|&b| (b, leaf.slot(b))).collect();
                let file = leaf.io.file();
                let synced = file.sync_data().and_then(|()| {
                    for (_, slot) in &taken {
                        file.write_all_at(&leaf.bitmap_bytes_of(slot), u64::from(slot.sector) * SECTOR)?;
                    }
                    let bat_offset = w.bat_offset;
                    let bat = w.bat_on_disk.get_mut();
                    for block in Writer::enter(bat, &taken) {
                        let (at, sec) = Writer::bat_sector(bat_offset, bat, block);
                        file.write_all_at(&sec, at)?;
                    }
                    Ok(())
                });
                if let Err(e) = synced {
                    tracing::error!(path = %leaf.path.display(), error = %e, blocks = taken.len(), "closing a VHD: its last metadata could not be written; those writes read as old");
                }
            }
        }
        // Release the writer's lock now: the I/O engine may keep the descriptor open a little
        // longer (io_uring unregisters files asynchronously), and the next writer or a
        // whole-file operation must not find the file busy because of that.
        if self.access == Access::ReadWrite {
            crate::image::release_writer_lock(self.layers[0].io.file());
        }
    }
}

/// Appends a run, merging it into the last one when they touch and agree.
pub(super) fn push_extent(out: &mut Vec<Extent>, offset: u64, length: u64, state: ExtentState) {
    if length == 0 {
        return;
    }
    if let Some(last) = out.last_mut()
        && last.state == state
        && last.offset + last.length == offset
    {
        last.length += length;
        return;
    }
    out.push(Extent { offset, length, state });
}
