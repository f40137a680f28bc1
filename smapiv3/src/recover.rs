//! `SR.attach`'s recovery: what a crash between a change's steps leaves, made whole.
//!
//! - temporaries (`.tmp-*`, new overlays not yet renamed into place, and a torn record write's
//!   `.<name>.tmp`) are deleted;
//! - the files' backing links win over the record's: a VDI whose header names a backing the
//!   record does not (a snapshot or clone that renamed its overlay into place, then crashed
//!   before the record was saved; a compose that rewrote the header) gets that parent, and a
//!   volume only a header names is adopted as a hidden base;
//! - volume files neither the record nor any header names are orphans, deleted;
//! - a tombstone (`.<id>.qcow2.destroyed`) is a destroy that emptied its volume to make room
//!   on a full file system before its record was written ([`SrMeta::save_destroying`]): it had
//!   committed, so the node leaves the record, and the tombstone goes.

use std::path::Path;

use sxm_engine::backend::StorageResult;
use sxm_engine::state;
use tapmirror::image::qcow2;

use crate::datapath::block_on;
use crate::errors;
use crate::meta::{Node, SUFFIX, SrMeta, is_node_id, volume_path};

/// What recovery did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Temporaries deleted.
    pub temporaries: usize,
    /// Nodes whose parent was taken from their file.
    pub reparented: Vec<String>,
    /// Volumes adopted as hidden bases.
    pub adopted: Vec<String>,
    /// Orphan volumes deleted.
    pub orphans: Vec<String>,
    /// Destroys finished from their tombstone.
    pub destroyed: Vec<String>,
}

/// The volume ids present in `dir`, sorted.
pub fn volume_files(dir: &Path) -> StorageResult<Vec<String>> {
    let entries = std::fs::read_dir(dir).map_err(|e| errors::io(format!("listing {}", dir.display()), &e))?;
    let mut v: Vec<String> = entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.strip_suffix(SUFFIX).filter(|id| is_node_id(id)).map(str::to_owned))
        .collect();
    v.sort();
    Ok(v)
}

/// The node id volume `id`'s header names as its backing (`None`: no backing).
pub fn file_parent(dir: &Path, id: &str) -> StorageResult<Option<String>> {
    let info = block_on(qcow2::info(&volume_path(dir, id)))?.map_err(|e| errors::qcow2(id, "reading the header", &e))?;
    Ok(info.backing_file.and_then(|b| b.strip_suffix(SUFFIX).filter(|p| is_node_id(p)).map(str::to_owned)))
}

/// Recovers the SR in `dir` (see the module documentation).
pub fn recover(sr: &str, dir: &Path) -> StorageResult<Recovery> {
    // A record write cut before its rename leaves its temporary (the engine's atomic write).
    let torn = state::remove_temporaries(dir).map_err(|e| errors::io(format!("sweeping temporaries in {}", dir.display()), &e))?;
    let mut r = Recovery { temporaries: torn, ..Recovery::default() };
    let mut meta = SrMeta::load_existing(dir)?;
    let entries = std::fs::read_dir(dir).map_err(|e| errors::io(format!("listing {}", dir.display()), &e))?;
    for e in entries.flatten() {
        if e.file_name().to_str().is_some_and(|n| n.starts_with(".tmp-")) {
            state::remove_durably(&e.path()).map_err(|err| errors::io(format!("removing {}", e.path().display()), &err))?;
            r.temporaries += 1;
        }
    }
    let files = volume_files(dir)?;
    let mut changed = false;
    // A destroy that buried its volume on a full file system had committed: finish it.
    let buried = tombstones(dir)?;
    for id in &buried {
        if meta.nodes.remove(id).is_some() {
            tracing::warn!(sr, node = %id, "finishing a destroy that emptied its volume before its record was written");
            r.destroyed.push(id.clone());
            changed = true;
        }
    }
    let mut todo: Vec<String> = meta.nodes.keys().cloned().collect();
    while let Some(id) = todo.pop() {
        if !files.contains(&id) {
            tracing::error!(sr, node = %id, "a recorded volume's file is missing");
            continue;
        }
        let parent = match file_parent(dir, &id) {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(sr, node = %id, error = %e, "cannot read a volume's header");
                continue;
            }
        };
        if let Some(p) = &parent
            && !meta.nodes.contains_key(p)
            && files.contains(p)
        {
            meta.nodes.insert(p.clone(), Node { parent: None, info: None });
            r.adopted.push(p.clone());
            todo.push(p.clone());
        }
        let known = parent.as_ref().is_none_or(|p| meta.nodes.contains_key(p));
        if let Some(n) = meta.nodes.get_mut(&id)
            && n.parent != parent
            && known
        {
            n.parent = parent;
            r.reparented.push(id.clone());
            changed = true;
        }
    }
    // A compose or snapshot may have left hidden bases nothing reads through any more.
    let hidden: Vec<String> = meta.nodes.iter().filter(|(_, n)| n.info.is_none()).map(|(id, _)| id.clone()).collect();
    let mut garbage = Vec::new();
    for id in hidden {
        garbage.extend(meta.drop_unused_hidden(Some(id)));
    }
    if changed || !r.adopted.is_empty() || !garbage.is_empty() {
        meta.save(dir)?;
    }
    for id in files.iter().filter(|f| !meta.nodes.contains_key(f.as_str())) {
        state::remove_durably(&volume_path(dir, id)).map_err(|e| errors::io(format!("removing orphan volume {id}"), &e))?;
        r.orphans.push(id.clone());
    }
    for id in buried {
        state::remove_durably(&state::tombstone_path(&volume_path(dir, &id))).map_err(|e| errors::io("removing a destroyed volume's tombstone", &e))?;
    }
    Ok(r)
}

/// The nodes whose volumes were buried (`state::bury`) and whose tombstones are still there.
fn tombstones(dir: &Path) -> StorageResult<Vec<String>> {
    let names = state::buried(dir).map_err(|e| errors::io(format!("listing {}", dir.display()), &e))?;
    Ok(names.iter().filter_map(|n| n.strip_suffix(SUFFIX)).filter(|id| is_node_id(id)).map(str::to_owned).collect())
}
