//! Opening a chain: the leaf, then each parent, found through the child's parent locators and
//! accepted only when its footer UUID is the one the child's header names.
//!
//! Candidates are tried in this order: `W2ru` locators (relative to the child's folder), `W2ku`
//! (absolute), `MacX` (`file://` URL), then the header's parent name in the child's folder. A
//! candidate that exists but carries another UUID is skipped and reported if nothing matches. A
//! file that appears twice in a chain (same device and inode) is a parent loop. Parents are
//! always opened read-only and validated like the leaf.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::error::{Result, VhdError};
use super::format::{DiskType, decode_locator, platform};
use super::meta::{Meta, read_at};

/// Longest chain we follow; XenServer keeps chains under 30.
pub const MAX_DEPTH: usize = 256;

/// How the leaf of a chain is opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeafMode {
    /// `O_RDONLY`, no lock: a reader never stops a writer.
    ReadOnly,
    /// `O_RDWR` and an exclusive `flock`: one writer at a time.
    ReadWrite,
    /// `O_RDONLY` with an exclusive `flock`: the file must not change while we look (snapshot,
    /// coalesce).
    Frozen,
}

/// One opened and validated file of a chain.
#[derive(Debug)]
pub struct Layer {
    /// Its metadata.
    pub meta: Meta,
    /// The open file.
    pub file: File,
    /// QEMU's "write not shared" lock on it, for as long as the layer is in use.
    pub qemu_lock: crate::image::QemuLock,
}

/// Opens and validates one file.
pub fn open_file(path: &Path, mode: LeafMode) -> Result<Layer> {
    match crate::image::holds_an_image(path) {
        Ok(true) => {}
        Ok(false) => return Err(VhdError::unsupported(path, "not a regular file or block device")),
        Err(e) => return Err(VhdError::io(path, "open", e)),
    }
    let file = OpenOptions::new()
        .read(true)
        .write(mode == LeafMode::ReadWrite)
        .open(path)
        .map_err(|e| VhdError::io(path, "open", e))?;
    if mode != LeafMode::ReadOnly {
        lock_exclusive(&file, path)?;
    }
    // What we write, and what we read (a served leaf's parents), must not change under us.
    let qemu_lock = crate::image::QemuLock::on(&file);
    let meta = Meta::read(&file, path)?;
    Ok(Layer { meta, file, qemu_lock })
}

/// Takes an exclusive `flock` on `file` (see [`crate::image::lock_exclusive`]), or reports the
/// file busy.
pub fn lock_exclusive(file: &File, path: &Path) -> Result<()> {
    match crate::image::lock_exclusive(file) {
        Ok(true) => Ok(()),
        Ok(false) => Err(VhdError::Busy { path: path.to_owned() }),
        Err(e) => Err(VhdError::io(path, "flock", e)),
    }
}

fn identity(file: &File, path: &Path) -> Result<(u64, u64)> {
    let m = file.metadata().map_err(|e| VhdError::io(path, "stat", e))?;
    Ok((m.dev(), m.ino()))
}

/// Opens the chain whose leaf is `path`: leaf first, base last.
pub fn open_chain(path: &Path, mode: LeafMode) -> Result<Vec<Layer>> {
    let leaf = open_file(path, mode)?;
    let mut seen = vec![identity(&leaf.file, path)?];
    let mut chain = vec![leaf];
    while let Some(child) = chain.last() {
        if child.meta.disk_type != DiskType::Differencing {
            break;
        }
        if chain.len() >= MAX_DEPTH {
            return Err(VhdError::unsupported(path, format!("chain deeper than {MAX_DEPTH}")));
        }
        let parent = find_parent(child)?;
        let id = identity(&parent.file, &parent.meta.path)?;
        if seen.contains(&id) {
            return Err(VhdError::corrupt(
                &child.meta.path,
                format!("parent loop: its parent {} is already in the chain", parent.meta.path.display()),
            ));
        }
        seen.push(id);
        chain.push(parent);
    }
    Ok(chain)
}

/// The places a differencing disk's header says its parent may be, in the order we try them.
pub fn parent_candidates(child: &Layer) -> Vec<PathBuf> {
    let dir = child.meta.path.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."));
    let mut out: Vec<PathBuf> = Vec::new();
    let mut push = |p: PathBuf| {
        if !out.contains(&p) {
            out.push(p);
        }
    };
    for code in [platform::W2RU, platform::W2KU, platform::MACX] {
        for l in child.meta.header.locators.iter().filter(|l| l.code == code) {
            let len = l.data_len.min(4096) as usize;
            if len == 0 {
                continue;
            }
            let Ok(data) = read_at(&child.file, &child.meta.path, l.data_offset, len, "parent locator") else {
                continue;
            };
            if let Some(name) = decode_locator(code, &data) {
                // Without its `.` parts: `./a.vhd` beside `./b.vhd` was named in errors as
                // `././a.vhd`.
                let p: PathBuf = Path::new(&name).components().filter(|c| !matches!(c, std::path::Component::CurDir)).collect();
                push(if p.is_absolute() { p } else { dir.join(p) });
            }
        }
    }
    let name = child.meta.header.parent_name();
    if !name.is_empty() && !name.contains('/') {
        push(dir.join(name));
    }
    out
}

/// Finds, opens (read-only) and validates the parent of `child`.
pub fn find_parent(child: &Layer) -> Result<Layer> {
    let path = &child.meta.path;
    let want = child.meta.header.parent_uuid;
    if want == [0u8; 16] {
        return Err(VhdError::unsupported(path, "differencing disk with a nil parent UUID (raw parent)"));
    }
    let want_s = uuid::Uuid::from_bytes(want);
    let candidates = parent_candidates(child);
    let mut tried = Vec::new();
    for c in &candidates {
        if !c.exists() {
            tried.push(format!("{} (not found)", c.display()));
            continue;
        }
        let parent = open_file(c, LeafMode::ReadOnly)?;
        if parent.meta.uuid() != want {
            tried.push(format!(
                "{} (UUID {}, not the parent)",
                c.display(),
                uuid::Uuid::from_bytes(parent.meta.uuid())
            ));
            continue;
        }
        return Ok(parent);
    }
    let wrong_uuid = tried.iter().any(|t| t.contains("not the parent"));
    let what = if wrong_uuid { "wrong parent UUID" } else { "missing parent" };
    let tried = if tried.is_empty() { "no parent locator or name to follow".to_string() } else { tried.join(", ") };
    Err(VhdError::missing_parent(path, format!("{what}: parent {want_s} not found; tried {tried}")))
}

/// The path of `target` relative to the folder `from_dir`, both made absolute first
/// (`./name` when they share the folder).
pub fn relative_path(from_dir: &Path, target: &Path) -> std::io::Result<String> {
    let from = from_dir.canonicalize()?;
    let to = target.canonicalize()?;
    let a: Vec<_> = from.components().collect();
    let b: Vec<_> = to.components().collect();
    let common = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    let mut parts: Vec<String> = Vec::new();
    for _ in common..a.len() {
        parts.push("..".into());
    }
    for c in &b[common..] {
        parts.push(c.as_os_str().to_string_lossy().into_owned());
    }
    let rel = parts.join("/");
    Ok(if rel.starts_with("..") { rel } else { format!("./{rel}") })
}
