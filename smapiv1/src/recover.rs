//! Bringing an SR's folder back to a consistent state at `SR.attach`, after whatever a crash
//! left behind.
//!
//! # The rule
//!
//! The VHD files are the truth about the tree (which file is a differencing disk of which); the
//! metadata is the truth about which nodes are VDIs and what their records say. Every change
//! (see [`crate::ext`]) is ordered so that:
//!
//! 1. files are created (and synced) before the metadata names them, so a crash leaves at worst
//!    a file the metadata does not name (an *orphan*);
//! 2. the metadata stops naming a file before the file is deleted, so a crash leaves at worst
//!    an orphan again;
//! 3. a file's parent changes (snapshot's rename, compose's header write) before the metadata
//!    says so, and each such step leaves every VHD valid (tapmirror's `ops` guarantee it), so a
//!    crash leaves a file whose real parent differs from the recorded one.
//!
//! Recovery undoes exactly those three leftovers:
//!
//! - temporaries (`.*.tmp` from atomic writes, `.*.snapshot-tmp` from a snapshot's new leaf)
//!   are removed;
//! - each node's parent is read from its file; where it differs the file wins, and a parent
//!   file the metadata does not know is adopted as a hidden node (a snapshot that renamed its
//!   new leaf into place but did not record its base). A VDI whose file turns out to be the
//!   parent of another node becomes hidden: only compose does that, and hiding the parent is
//!   compose's own last step;
//! - hidden nodes nobody depends on, and orphan files, are deleted (metadata first).
//!
//! A fourth leftover comes from the one destroy that deletes data before the record stops naming
//! it (a full file system, [`SrMeta::save_destroying`]): a tombstone, `.<id>.vhd.destroyed`, where
//! node `id`'s file was. The destroy had committed by renaming the file there, so recovery
//! finishes it: the node leaves the record (its unused hidden parents with it) and the tombstone
//! goes.
//!
//! Deleting is the one dangerous step, so it is skipped entirely (and said so) when any node's
//! file cannot be read: its real parent could then be an orphan we would otherwise delete.

use std::collections::BTreeSet;
use std::fs;
use std::path::Path;

use sxm_engine::backend::StorageResult;
use sxm_engine::state;
use tapmirror::image::vhd;

use crate::errors;
use crate::meta::{Node, SrMeta, VHD_SUFFIX, is_node_id, vhd_path};

/// Suffix of the temporary new leaf tapmirror's `vhd::snapshot` creates beside the leaf.
const SNAPSHOT_TMP_SUFFIX: &str = ".snapshot-tmp";

/// What recovery did, for the log and the tests.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Temporary files removed.
    pub temporaries: usize,
    /// Nodes whose recorded parent was corrected from their file.
    pub reparented: Vec<String>,
    /// Files adopted as hidden parents.
    pub adopted: Vec<String>,
    /// VDIs hidden because their file is another node's parent.
    pub hidden: Vec<String>,
    /// Files deleted (orphans and unused hidden parents).
    pub deleted: Vec<String>,
    /// Nodes whose file could not be read (deleting was skipped).
    pub unreadable: Vec<String>,
    /// Destroys finished from their tombstone.
    pub destroyed: Vec<String>,
}

/// The node id of each `<uuid>.vhd` file in `dir`.
pub fn vhd_files(dir: &Path) -> StorageResult<BTreeSet<String>> {
    let entries = fs::read_dir(dir).map_err(|e| errors::io(format!("listing {}", dir.display()), &e))?;
    let mut out = BTreeSet::new();
    for entry in entries {
        let entry = entry.map_err(|e| errors::io(format!("listing {}", dir.display()), &e))?;
        let name = entry.file_name();
        if let Some(id) = name.to_str().and_then(|n| n.strip_suffix(VHD_SUFFIX))
            && is_node_id(id)
        {
            out.insert(id.to_owned());
        }
    }
    Ok(out)
}

/// The node that node `id`'s file names as its parent (`None` for a dynamic disk), found the
/// way every reader finds it (locators, UUID check). A parent outside the SR's folder, or not
/// named like one of our files, is an error.
pub fn file_parent(dir: &Path, id: &str) -> Result<Option<String>, String> {
    let path = vhd_path(dir, id);
    let info = vhd::info(&path).map_err(|e| errors::chain(&e))?;
    let Some(parent) = info.chain.get(1) else { return Ok(None) };
    let same_dir = match (parent.parent().map(fs::canonicalize), fs::canonicalize(dir)) {
        (Some(Ok(a)), Ok(b)) => a == b,
        _ => false,
    };
    let pid = parent.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_suffix(VHD_SUFFIX));
    match pid {
        Some(pid) if same_dir && is_node_id(pid) => Ok(Some(pid.to_owned())),
        _ => Err(format!("its parent {} is not a VHD of this SR", parent.display())),
    }
}

/// Removes what a crash left behind in the SR's folder and makes the metadata agree with the
/// files (see the module documentation). A folder with VHD files and no metadata is refused,
/// never cleaned: the metadata is what says those files are ours.
pub fn recover(sr: &str, dir: &Path) -> StorageResult<Recovery> {
    let mut r = Recovery { temporaries: sweep_temporaries(dir)?, ..Recovery::default() };
    let files = vhd_files(dir)?;
    let Some(mut meta) = SrMeta::load(dir)? else {
        if files.is_empty() {
            SrMeta::default().save(dir)?;
            tracing::warn!(sr, dir = %dir.display(), "SR had no metadata and no VHD files: started an empty record");
            return Ok(r);
        }
        return Err(errors::failure(
            "metadata",
            format!("{} is missing but the SR holds {} VHD files: refusing to guess which are VDIs", SrMeta::path(dir).display(), files.len()),
        ));
    };
    let before = meta.clone();
    let tombstones = tombstones(dir)?;
    for id in &tombstones {
        if meta.nodes.remove(id).is_some() {
            tracing::warn!(sr, node = %id, "finishing a destroy that emptied its file before its record was written");
            r.destroyed.push(id.clone());
        }
    }

    // The files' tree, adopting parents the metadata does not know.
    let mut work: Vec<String> = meta.nodes.keys().cloned().collect();
    let mut done = BTreeSet::new();
    while let Some(id) = work.pop() {
        if !done.insert(id.clone()) {
            continue;
        }
        if !files.contains(&id) {
            tracing::error!(sr, node = %id, visible = meta.vdi(&id).is_ok(), "the VHD file of a node is missing");
            r.unreadable.push(id);
            continue;
        }
        let actual = match file_parent(dir, &id) {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(sr, node = %id, error = %e, "cannot read a node's VHD file; keeping its recorded parent");
                r.unreadable.push(id);
                continue;
            }
        };
        let Some(node) = meta.nodes.get_mut(&id) else { continue };
        if node.parent != actual {
            tracing::warn!(sr, node = %id, recorded = ?node.parent, file = ?actual, "the file's parent wins over the recorded one");
            node.parent = actual.clone();
            r.reparented.push(id.clone());
        }
        if let Some(p) = actual
            && !meta.nodes.contains_key(&p)
        {
            tracing::warn!(sr, node = %p, child = %id, "adopting an unrecorded parent file as a hidden node");
            meta.nodes.insert(p.clone(), Node { parent: None, info: None });
            r.adopted.push(p.clone());
            work.push(p);
        }
    }

    // Visible VDIs are leaves: one with children is a compose that did not record its end.
    let parents: BTreeSet<String> = meta.nodes.values().filter_map(|n| n.parent.clone()).collect();
    for p in &parents {
        if let Some(node) = meta.nodes.get_mut(p)
            && node.info.take().is_some()
        {
            tracing::warn!(sr, vdi = %p, "a VDI is the parent of another node (an unfinished compose): hiding it");
            r.hidden.push(p.clone());
        }
    }

    // What nobody needs any more.
    let mut garbage = Vec::new();
    if r.unreadable.is_empty() {
        loop {
            let unused: Vec<String> = meta
                .nodes
                .iter()
                .filter(|(id, n)| n.info.is_none() && meta.children(id).is_empty())
                .map(|(id, _)| id.clone())
                .collect();
            if unused.is_empty() {
                break;
            }
            for id in unused {
                meta.nodes.remove(&id);
                garbage.push(id);
            }
        }
        let orphans: Vec<String> = files.iter().filter(|f| !meta.nodes.contains_key(*f) && !garbage.contains(f)).cloned().collect();
        garbage.extend(orphans);
    } else {
        tracing::warn!(sr, unreadable = ?r.unreadable, "not deleting orphan files or unused hidden parents while some files cannot be read");
    }

    if meta != before {
        meta.save(dir)?;
    }
    for id in garbage {
        let path = vhd_path(dir, &id);
        if files.contains(&id) {
            state::remove_durably(&path).map_err(|e| errors::io("removing an unused VHD", &e))?;
            tracing::info!(sr, node = %id, "removed an unused VHD file");
            r.deleted.push(id);
        }
    }
    for id in tombstones {
        state::remove_durably(&state::tombstone_path(&vhd_path(dir, &id))).map_err(|e| errors::io("removing a destroyed node's tombstone", &e))?;
    }
    Ok(r)
}

/// The nodes whose files were buried (`state::bury`) and whose tombstones are still there.
fn tombstones(dir: &Path) -> StorageResult<Vec<String>> {
    let names = state::buried(dir).map_err(|e| errors::io(format!("listing {}", dir.display()), &e))?;
    Ok(names.iter().filter_map(|n| n.strip_suffix(VHD_SUFFIX)).filter(|id| is_node_id(id)).map(str::to_owned).collect())
}

/// Removes the temporaries of atomic writes and of interrupted snapshots.
fn sweep_temporaries(dir: &Path) -> StorageResult<usize> {
    let mut n = state::remove_temporaries(dir).map_err(|e| errors::io(format!("sweeping temporaries in {}", dir.display()), &e))?;
    let entries = fs::read_dir(dir).map_err(|e| errors::io(format!("listing {}", dir.display()), &e))?;
    for entry in entries {
        let entry = entry.map_err(|e| errors::io(format!("listing {}", dir.display()), &e))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') && name.ends_with(SNAPSHOT_TMP_SUFFIX) {
            state::remove_durably(&entry.path()).map_err(|e| errors::io("removing a snapshot's temporary leaf", &e))?;
            n += 1;
        }
    }
    Ok(n)
}
