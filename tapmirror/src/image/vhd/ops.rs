//! Whole-file operations for the SR backend: create (dynamic, differencing), snapshot, clone,
//! compose, resize, coalesce, check, info and the difference map of two chains.
//!
//! Each operation that changes a file takes an exclusive `flock` on it first (a live
//! `VhdImage` opened for writing holds one, so these refuse to run under a writer) and
//! validates it the way opening does, so a file that fails validation is never written.
//! Metadata changes are ordered so that a process crash leaves either the old or the new state;
//! where two structures must change together (a footer and its copy) the primary one, the end
//! footer, is written first and `check` reports a copy left behind.

use std::fs::{File, OpenOptions};
use std::future::Future;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::chain::{self, LeafMode, open_chain, open_file};
use super::error::{Result, VhdError};
use super::format::{
    self, BAT_UNUSED, DiskType, FOOTER_LEN, Footer, Header, Locator, MAX_BLOCK_SIZE, MAX_SIZE, SECTOR, SizeSource,
    platform,
};
use super::image::{CrashSafety, VhdImage, push_extent};
use crate::image::{Access, Extent, ExtentState, Image};
use crate::io::{Durability, EngineKind, IoBuf};

/// Where a new disk's BAT starts: after the footer copy and the 1024-byte header.
const TABLE_OFFSET: u64 = 3 * SECTOR;
/// Bytes copied per request when coalescing.
const COPY_CHUNK: u64 = 4 << 20;

/// What a new differencing disk records about its parent.
struct ParentRef {
    uuid: [u8; 16],
    timestamp: u32,
    name: String,
    relative: String,
    absolute: String,
}

fn check_size(path: &Path, size: u64) -> Result<()> {
    if size == 0 || !size.is_multiple_of(SECTOR) {
        return Err(VhdError::invalid(path, format!("size {size} is not a positive multiple of 512")));
    }
    if size > MAX_SIZE {
        return Err(VhdError::invalid(path, format!("size {size} exceeds the VHD limit of 2040 GiB")));
    }
    Ok(())
}

fn write_at(file: &File, path: &Path, offset: u64, bytes: &[u8], what: &str) -> Result<()> {
    file.write_all_at(bytes, offset).map_err(|e| VhdError::io(path, format!("write {what} at {offset}"), e))
}

fn sync(file: &File, path: &Path) -> Result<()> {
    file.sync_data().map_err(|e| VhdError::io(path, "fdatasync", e))
}

/// Makes a name change in `path`'s folder durable.
fn sync_dir(path: &Path) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| VhdError::io(dir, "fsync folder", e))
}

/// The encoded locators for `parent`, each padded to whole sectors: (code, bytes).
fn locator_blobs(parent: &ParentRef) -> Vec<(u32, Vec<u8>)> {
    vec![
        (platform::W2RU, format::encode_windows_path(&parent.relative)),
        (platform::W2KU, format::encode_windows_path(&parent.absolute)),
    ]
}

/// Places locator data at `start`: the header entries and the bytes to write there.
fn lay_out_locators(parent: &ParentRef, start: u64) -> ([Locator; 8], Vec<u8>) {
    let mut locs = [Locator::default(); 8];
    let mut blob = Vec::new();
    for (i, (code, data)) in locator_blobs(parent).into_iter().enumerate() {
        let space = format::sector_align(data.len() as u64);
        locs[i] = Locator {
            code,
            // Bytes, not sectors: what blktap and Windows write (see `Locator::space_bytes`).
            data_space: space as u32,
            data_len: data.len() as u32,
            data_offset: start + blob.len() as u64,
        };
        let mut d = data;
        d.resize(space as usize, 0);
        blob.extend_from_slice(&d);
    }
    (locs, blob)
}

fn parent_ref(child: &Path, parent: &Path, meta: &super::meta::Meta) -> Result<ParentRef> {
    let dir = match child.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let relative = chain::relative_path(&dir, parent).map_err(|e| VhdError::io(parent, "resolve path", e))?;
    let absolute = parent.canonicalize().map_err(|e| VhdError::io(parent, "resolve path", e))?;
    let mtime = std::fs::metadata(parent).map_err(|e| VhdError::io(parent, "stat", e))?.mtime();
    let name = absolute.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    Ok(ParentRef {
        uuid: meta.uuid(),
        timestamp: format::vhd_time(mtime.max(0) as u64),
        name,
        relative,
        absolute: absolute.to_string_lossy().into_owned(),
    })
}

/// Writes a new sparse disk to `path`, which must not exist.
fn create_disk(path: &Path, size: u64, block_size: u32, table_size: u64, parent: Option<&ParentRef>) -> Result<()> {
    check_size(path, size)?;
    if !block_size.is_power_of_two() || u64::from(block_size) < SECTOR || block_size > MAX_BLOCK_SIZE {
        return Err(VhdError::invalid(
            path,
            format!("block size {block_size} is not a power of two between 512 B and 256 MiB"),
        ));
    }
    let entries = table_size.max(size).div_ceil(u64::from(block_size));
    let bat_len = format::sector_align(entries * 4);
    let disk_type = if parent.is_some() { DiskType::Differencing } else { DiskType::Dynamic };
    let footer = Footer::new(disk_type, size, SECTOR, *uuid::Uuid::new_v4().as_bytes());
    let mut header = Header::new(TABLE_OFFSET, entries as u32, block_size);
    let mut blob = Vec::new();
    if let Some(p) = parent {
        header.parent_uuid = p.uuid;
        header.parent_timestamp = p.timestamp;
        header.set_parent_name(&p.name);
        let (locs, b) = lay_out_locators(p, TABLE_OFFSET + bat_len);
        header.locators = locs;
        blob = b;
    }
    let mut bytes = Vec::with_capacity((TABLE_OFFSET + bat_len) as usize + blob.len() + FOOTER_LEN);
    bytes.extend_from_slice(&footer.encode());
    bytes.extend_from_slice(&header.encode());
    bytes.resize((TABLE_OFFSET + bat_len) as usize, 0xFF);
    bytes.extend_from_slice(&blob);
    bytes.extend_from_slice(&footer.encode());
    let file = OpenOptions::new().write(true).create_new(true).open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            VhdError::invalid(path, "already exists")
        } else {
            VhdError::io(path, "create", e)
        }
    })?;
    let r = write_at(&file, path, 0, &bytes, "new disk").and_then(|()| {
        file.sync_all().map_err(|e| VhdError::io(path, "fsync", e))?;
        sync_dir(path)
    });
    if r.is_err() {
        let _ = std::fs::remove_file(path);
    }
    r
}

/// Creates a dynamic disk of `size` bytes (a multiple of 512, at most 2040 GiB) with blocks of
/// `block_size` bytes ([`DEFAULT_BLOCK_SIZE`](super::DEFAULT_BLOCK_SIZE) unless there is a reason). `path` must not exist.
pub fn create_dynamic(path: &Path, size: u64, block_size: u32) -> Result<()> {
    create_disk(path, size, block_size, size, None)
}

/// [`create_dynamic`] with a BAT large enough for `max_size`, so that growing up to it never
/// moves the BAT (blktap's `vhd-util create -S`).
pub fn create_dynamic_reserved(path: &Path, size: u64, block_size: u32, max_size: u64) -> Result<()> {
    check_size(path, max_size)?;
    create_disk(path, size, block_size, max_size, None)
}

/// Creates an empty differencing disk at `path` on `parent` (whose chain must be sound): same
/// size and block size as the parent, the parent's UUID, modification time and name, and two
/// locators, `W2ru` relative to `path`'s folder and `W2ku` absolute.
pub fn create_differencing(path: &Path, parent: &Path) -> Result<()> {
    let chain = open_chain(parent, LeafMode::ReadOnly)?;
    // The child must open too: a chain one deeper than the deepest that opens was made, and
    // nothing could open it (or make another child on it) after.
    if chain.len() >= super::chain::MAX_DEPTH {
        return Err(VhdError::unsupported(path, format!("a child of {} would make a chain deeper than {}", parent.display(), super::chain::MAX_DEPTH)));
    }
    let meta = &chain[0].meta;
    let p = parent_ref(path, parent, meta)?;
    create_disk(path, meta.size, meta.header.block_size, meta.size, Some(&p))
}

/// SMAPIv1 snapshot: the content of `leaf` moves to `frozen` (same file, so its UUID too), which
/// becomes the read-only parent, and `leaf` becomes a new empty differencing disk on it, so the
/// VDI keeps its path.
///
/// Steps: lock `leaf` (refused while a writer has it open); hard-link it as `frozen`; create
/// the new child beside it under a temporary name; `rename` it over `leaf`; sync the folder.
/// A crash before the link changes nothing (a stale temporary file may remain and is replaced
/// next time). A crash after the link and before the rename leaves `leaf` and `frozen` as two
/// names of the same, intact disk: running `snapshot` again with the same arguments finishes the
/// job (it recognises `frozen` as the same file). After the rename the snapshot is complete. At
/// no point can a path name a partial file. `frozen` must be on `leaf`'s file system.
pub fn snapshot(leaf: &Path, frozen: &Path) -> Result<()> {
    let held = open_chain(leaf, LeafMode::Frozen)?;
    let leaf_meta = std::fs::metadata(leaf).map_err(|e| VhdError::io(leaf, "stat", e))?;
    let linked_here = match std::fs::metadata(frozen) {
        Ok(m) if m.dev() == leaf_meta.dev() && m.ino() == leaf_meta.ino() => false,
        Ok(_) => return Err(VhdError::invalid(frozen, "already exists")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::hard_link(leaf, frozen).map_err(|e| VhdError::io(frozen, "link the frozen name", e))?;
            true
        }
        Err(e) => return Err(VhdError::io(frozen, "stat", e)),
    };
    let name = leaf.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = leaf.with_file_name(format!(".{name}.snapshot-tmp"));
    let swapped = (|| {
        match std::fs::remove_file(&tmp) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(VhdError::io(&tmp, "remove stale temporary file", e)),
        }
        create_differencing(&tmp, frozen)?;
        std::fs::rename(&tmp, leaf).map_err(|e| VhdError::io(leaf, "rename the new leaf into place", e))
    })();
    if let Err(e) = swapped {
        // Not renamed: `leaf` is the disk it was. What this call made goes (a full file system
        // fails here), rather than wait as an orphan for the owner's next recovery.
        let _ = std::fs::remove_file(&tmp);
        if linked_here {
            let _ = std::fs::remove_file(frozen);
        }
        return Err(e);
    }
    sync_dir(leaf)?;
    drop(held);
    Ok(())
}

/// Creates `new_leaf`, an empty differencing disk on `parent` (a clone shares `parent`).
pub fn clone(parent: &Path, new_leaf: &Path) -> Result<()> {
    create_differencing(new_leaf, parent)
}

/// Re-parents `leaf` onto `new_parent`: records the new parent's UUID, time, name and locators.
/// Refused unless `new_parent`'s chain is sound, does not contain `leaf`, and is no larger than
/// `leaf`. A dynamic `leaf` becomes differencing: its sectors never written then read from the
/// parent (right for disks whose bitmaps say which sectors were written, as ours and blktap's
/// do; QEMU marks whole blocks written).
///
/// Order: new locator data goes to fresh space at the end (footer moved past it first), then a
/// barrier, then the header in one write; a crash before it leaves the old parent in force.
pub fn compose(leaf: &Path, new_parent: &Path) -> Result<()> {
    let l = open_file(leaf, LeafMode::ReadWrite)?;
    let pchain = open_chain(new_parent, LeafMode::ReadOnly)?;
    let id = |m: &std::fs::Metadata| (m.dev(), m.ino());
    let me = id(&l.file.metadata().map_err(|e| VhdError::io(leaf, "stat", e))?);
    for p in &pchain {
        let m = p.file.metadata().map_err(|e| VhdError::io(&p.meta.path, "stat", e))?;
        if id(&m) == me {
            return Err(VhdError::invalid(leaf, format!("{} is in its own new parent chain", leaf.display())));
        }
    }
    let pm = &pchain[0].meta;
    if pm.size > l.meta.size {
        return Err(VhdError::invalid(
            leaf,
            format!(
                "new parent {} ({} bytes) is larger than the disk ({} bytes)",
                new_parent.display(),
                pm.size,
                l.meta.size
            ),
        ));
    }
    let p = parent_ref(leaf, new_parent, pm)?;
    let start = l.meta.end;
    let (locs, blob) = lay_out_locators(&p, start);
    let new_end = start + blob.len() as u64;
    let mut footer = l.meta.footer.clone();
    write_at(&l.file, leaf, new_end, &footer.encode(), "footer")?;
    write_at(&l.file, leaf, start, &blob, "parent locators")?;
    sync(&l.file, leaf)?;
    let mut header = l.meta.header.clone();
    header.parent_uuid = p.uuid;
    header.parent_timestamp = p.timestamp;
    header.set_parent_name(&p.name);
    header.locators = locs;
    write_at(&l.file, leaf, l.meta.footer.data_offset, &header.encode(), "header")?;
    sync(&l.file, leaf)?;
    if l.meta.disk_type != DiskType::Differencing {
        footer.disk_type_code = DiskType::Differencing.code();
        write_at(&l.file, leaf, new_end, &footer.encode(), "footer")?;
        sync(&l.file, leaf)?;
        write_at(&l.file, leaf, 0, &footer.encode(), "footer copy")?;
        sync(&l.file, leaf)?;
    }
    Ok(())
}

/// Grows `path` to `new_size` (shrinking is refused). When the BAT is too small it moves to the
/// end of the file, followed by a fresh (all "not known full") batmap when the file had one;
/// the footer is moved past it first and the header switches to it in one write. The size
/// changes last: end footer, then its copy at offset 0. Files whose size comes from CHS get the
/// smallest geometry covering `new_size`, as `qemu-img create` does.
pub fn resize(path: &Path, new_size: u64) -> Result<()> {
    let mut chain = open_chain(path, LeafMode::ReadWrite)?;
    let l = chain.swap_remove(0);
    check_size(path, new_size)?;
    if new_size < l.meta.size {
        return Err(VhdError::invalid(
            path,
            format!("shrinking from {} to {new_size} bytes is not supported", l.meta.size),
        ));
    }
    let mut footer = l.meta.footer.clone();
    footer.set_size(new_size);
    let (vsize, _) = footer.virtual_size();
    if vsize == l.meta.size && footer.current_size == l.meta.footer.current_size {
        return Ok(());
    }
    let bs = l.meta.block_size;
    let need = vsize.div_ceil(bs);
    let mut end = l.meta.end;
    if need > u64::from(l.meta.header.max_table_entries) {
        let start = end;
        let bat_len = format::sector_align(need * 4);
        let mut blob = vec![0xFFu8; bat_len as usize];
        for (i, e) in l.meta.bat.iter().enumerate() {
            blob[i * 4..i * 4 + 4].copy_from_slice(&e.to_be_bytes());
        }
        if let Some(bm) = &l.meta.batmap {
            // blktap looks for its batmap right after the BAT; give it an empty one there.
            let map_len = format::sector_align(need.div_ceil(8));
            let mut h = bm.header.clone();
            h.resize(SECTOR as usize, 0);
            let map_offset = start + bat_len + SECTOR;
            h[8..16].copy_from_slice(&map_offset.to_be_bytes());
            h[16..20].copy_from_slice(&((map_len / SECTOR) as u32).to_be_bytes());
            h[24..28].copy_from_slice(&(!0u32).to_be_bytes()); // checksum of an all-zero map
            blob.extend_from_slice(&h);
            blob.resize(blob.len() + map_len as usize, 0);
        }
        end = start + blob.len() as u64;
        write_at(&l.file, path, end, &l.meta.footer.encode(), "footer")?;
        write_at(&l.file, path, start, &blob, "BAT")?;
        sync(&l.file, path)?;
        let mut header = l.meta.header.clone();
        header.table_offset = start;
        header.max_table_entries = need as u32;
        write_at(&l.file, path, l.meta.footer.data_offset, &header.encode(), "header")?;
        sync(&l.file, path)?;
    }
    write_at(&l.file, path, end, &footer.encode(), "footer")?;
    sync(&l.file, path)?;
    write_at(&l.file, path, 0, &footer.encode(), "footer copy")?;
    sync(&l.file, path)?;
    Ok(())
}

/// Runs `f` to completion on a private current-thread runtime in a scoped thread, so the
/// synchronous operations can use the async data path from any context (inside a runtime too).
fn block_on<F>(f: F) -> Result<F::Output>
where
    F: Future + Send,
    F::Output: Send,
{
    std::thread::scope(|s| {
        s.spawn(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| VhdError::io(Path::new("."), "start a runtime", e))?;
            Ok(rt.block_on(f))
        })
        .join()
        .unwrap_or_else(|_| Err(VhdError::io(Path::new("."), "worker thread", std::io::Error::other("panicked"))))
    })
}

/// Folds the sectors `leaf` holds into its parent, which is grown first if smaller. The chain
/// read through `leaf` is unchanged by this at every moment (the leaf still covers what it
/// holds), so a crash leaves a consistent state and running it again finishes the job. The
/// parent is written through the data path with its crash-safe allocation order. The caller
/// must make sure no other disk depends on the parent (other children would see the change).
pub fn coalesce(leaf: &Path) -> Result<()> {
    let chain = open_chain(leaf, LeafMode::Frozen)?;
    if chain.len() < 2 {
        return Err(VhdError::invalid(leaf, "not a differencing disk: nothing to coalesce into"));
    }
    let parent = chain[1].meta.path.clone();
    if chain[1].meta.size < chain[0].meta.size {
        resize(&parent, chain[0].meta.size)?;
    }
    block_on(async move {
        let child = VhdImage::from_chain(chain, Access::ReadOnly, EngineKind::Portable, CrashSafety::PowerLoss).await?;
        let target = VhdImage::open(&parent, Access::ReadWrite, EngineKind::Portable).await?;
        let top = &child.layers()[0];
        let mut runs = Vec::new();
        top.runs(0, top.size, &mut |off, len, at| {
            if let Some(at) = at {
                runs.push((off, len, at));
            }
        })
        .map_err(|e| VhdError::io(leaf, "read bitmaps", e))?;
        for (off, len, at) in runs {
            let mut done = 0;
            while done < len {
                let n = (len - done).min(COPY_CHUNK);
                let (buf, r) = top.io.read_exact_at(IoBuf::for_overwrite(n as usize), at + done).await;
                r.map_err(|e| VhdError::io(leaf, format!("read at {}", at + done), e))?;
                target
                    .write(off + done, Arc::new(buf), Durability::Cached)
                    .await
                    .map_err(|e| VhdError::io(&parent, format!("write at {}", off + done), std::io::Error::other(e)))?;
                done += n;
            }
        }
        target.flush().await.map_err(|e| VhdError::io(&parent, "flush", std::io::Error::other(e)))?;
        Ok(())
    })?
}

/// One file as `check` saw it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct LayerReport {
    /// The file.
    pub path: PathBuf,
    /// Footer UUID.
    pub uuid: String,
    /// Dynamic or differencing.
    pub disk_type: DiskType,
    /// Virtual size.
    pub virtual_size: u64,
    /// Block size.
    pub block_size: u64,
    /// Allocated blocks.
    pub allocated_blocks: u64,
    /// Whether the file ends with its footer (else the copy at offset 0 is in force).
    pub end_footer: bool,
    /// Sound but unusual findings.
    pub warnings: Vec<String>,
}

/// What `check` found in a sound chain.
#[derive(Clone, Debug, serde::Serialize)]
pub struct CheckReport {
    /// The chain, leaf first.
    pub chain: Vec<PathBuf>,
    /// Each file, leaf first.
    pub layers: Vec<LayerReport>,
}

impl CheckReport {
    /// Every warning, prefixed with its file.
    pub fn warnings(&self) -> Vec<String> {
        self.layers.iter().flat_map(|l| l.warnings.iter().map(move |w| format!("{}: {w}", l.path.display()))).collect()
    }
}

/// Checks the whole chain of `path`: every file's footers, header, BAT (entries inside the file,
/// no overlaps), locators, and each parent's identity. `Err` is the first problem found.
pub fn check(path: &Path) -> Result<CheckReport> {
    let chain = open_chain(path, LeafMode::ReadOnly)?;
    let mut layers = Vec::new();
    for l in &chain {
        let m = &l.meta;
        // Every sector bitmap must be readable (they are read lazily when serving).
        let mut bm = vec![0u8; m.bitmap_bytes as usize];
        for (i, &e) in m.bat.iter().enumerate() {
            if e != BAT_UNUSED {
                l.file
                    .read_exact_at(&mut bm, u64::from(e) * SECTOR)
                    .map_err(|err| VhdError::io(&m.path, format!("read the sector bitmap of block {i}"), err))?;
            }
        }
        layers.push(LayerReport {
            path: m.path.clone(),
            uuid: uuid::Uuid::from_bytes(m.uuid()).to_string(),
            disk_type: m.disk_type,
            virtual_size: m.size,
            block_size: m.block_size,
            allocated_blocks: m.allocated_blocks(),
            end_footer: m.end_footer,
            warnings: m.warnings.clone(),
        });
    }
    Ok(CheckReport { chain: chain.iter().map(|l| l.meta.path.clone()).collect(), layers })
}

/// What `info` tells about a disk.
#[derive(Clone, Debug, serde::Serialize)]
pub struct VhdInfo {
    /// Virtual size in bytes.
    pub virtual_size: u64,
    /// Where the size came from (QEMU's creator rule).
    pub size_source: SizeSource,
    /// Block size in bytes.
    pub block_size: u64,
    /// Dynamic or differencing.
    pub disk_type: DiskType,
    /// Footer UUID.
    pub uuid: String,
    /// The parent's UUID (differencing disks).
    pub parent_uuid: Option<String>,
    /// The chain, leaf first.
    pub chain: Vec<PathBuf>,
    /// Bytes in the leaf's allocated blocks (allocated blocks × block size).
    pub allocated_bytes: u64,
    /// Bytes the leaf file occupies.
    pub file_size: u64,
    /// Creator application (`tap`, `qemu`, `win`...).
    pub creator: String,
}

/// Describes `path` and its chain (which must be sound).
pub fn info(path: &Path) -> Result<VhdInfo> {
    let chain = open_chain(path, LeafMode::ReadOnly)?;
    let m = &chain[0].meta;
    Ok(VhdInfo {
        virtual_size: m.size,
        size_source: m.size_source,
        block_size: m.block_size,
        disk_type: m.disk_type,
        uuid: uuid::Uuid::from_bytes(m.uuid()).to_string(),
        parent_uuid: (m.disk_type == DiskType::Differencing)
            .then(|| uuid::Uuid::from_bytes(m.header.parent_uuid).to_string()),
        chain: chain.iter().map(|l| l.meta.path.clone()).collect(),
        allocated_bytes: m.allocated_blocks() * m.block_size,
        file_size: m.file_len,
        creator: m.footer.creator(),
    })
}

/// Bytes of the sectors `path`'s own bitmaps mark as written: what [`coalesce`] copies into
/// its parent. Far less than its allocated blocks when its writes were small and scattered
/// (each 4 KiB write into a new 2 MiB block allocates the whole block). Read without a lock,
/// as [`info`] is: of a file in use, an estimate.
pub async fn written_bytes(path: &Path) -> Result<u64> {
    let image = VhdImage::open(path, Access::ReadOnly, EngineKind::Portable).await?;
    let Some(top) = image.layers().first() else { return Ok(0) };
    let mut total = 0;
    top.runs(0, image.size(), &mut |_, len, at| {
        if at.is_some() {
            total += len;
        }
    })
    .map_err(|e| VhdError::io(path, "read bitmaps", e))?;
    Ok(total)
}

/// The ranges of chain `a` that may differ from chain `b`, for a copy whose destination already
/// holds `b`: the union of what the layers of either chain that the other lacks (by footer
/// UUID) hold, within `a`'s size; plus, when `a` is larger than `b`, whatever `a` holds past
/// `b`'s end. Only those ranges are returned, sorted and merged, all with state `Data`.
pub async fn diff_map(a: &Path, b: &Path) -> Result<Vec<Extent>> {
    let ia = VhdImage::open(a, Access::ReadOnly, EngineKind::Portable).await?;
    let ib = VhdImage::open(b, Access::ReadOnly, EngineKind::Portable).await?;
    let ua: Vec<[u8; 16]> = ia.layers().iter().map(|l| l.uuid).collect();
    let ub: Vec<[u8; 16]> = ib.layers().iter().map(|l| l.uuid).collect();
    let size = ia.size();
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    let only_a = ia.layers().iter().filter(|l| !ub.contains(&l.uuid)).map(|l| (l, a));
    let only_b = ib.layers().iter().filter(|l| !ua.contains(&l.uuid)).map(|l| (l, b));
    for (layer, from) in only_a.chain(only_b) {
        layer
            .runs(0, size, &mut |off, len, at| {
                if at.is_some() {
                    ranges.push((off, off + len));
                }
            })
            .map_err(|e| VhdError::io(from, "read bitmaps", e))?;
    }
    if ib.size() < size {
        let tail = ia
            .allocation(ib.size(), size - ib.size(), usize::MAX)
            .await
            .map_err(|e| VhdError::io(a, "map", std::io::Error::other(e)))?;
        ranges.extend(tail.iter().filter(|e| e.state != ExtentState::Hole).map(|e| (e.offset, e.offset + e.length)));
    }
    ranges.sort_unstable();
    let mut out = Vec::new();
    let mut cur: Option<(u64, u64)> = None;
    for (s, e) in ranges {
        match &mut cur {
            Some((_, ce)) if s <= *ce => *ce = (*ce).max(e),
            _ => {
                if let Some((cs, ce)) = cur {
                    push_extent(&mut out, cs, ce - cs, ExtentState::Data);
                }
                cur = Some((s, e));
            }
        }
    }
    if let Some((cs, ce)) = cur {
        push_extent(&mut out, cs, ce - cs, ExtentState::Data);
    }
    Ok(out)
}

/// Whether `head` (the first bytes of a file) starts with a VHD footer copy, as dynamic and
/// differencing disks do (fixed disks only have their footer at the end).
pub fn is_vhd(head: &[u8]) -> bool {
    head.len() >= 8 && &head[..8] == format::FOOTER_COOKIE
}
