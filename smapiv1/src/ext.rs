//! [`ExtBackend`]: the engine's [`Backend`] for `ext` SRs, one VHD file per node of the SR's
//! tree (see [`crate::meta`] for the tree and [`crate::recover`] for crash recovery).
//!
//! # The order of each change (what a crash leaves)
//!
//! | call | steps | a crash between steps leaves |
//! | --- | --- | --- |
//! | create | new `<id>.vhd` (synced) → record | an orphan file: deleted at attach |
//! | destroy | record without the VDI (and without hidden parents it alone used) → delete files | orphans: deleted at attach |
//! | coalesce (after a destroy leaves a hidden parent one VDI child) | pause the child's datapath → `vhd::coalesce` (the child's sectors into the parent) → record (the child on the parent's parent, the parent gone) → rename the parent's file over the child's → unpause | before the rename: the child's file still names the parent, so attach takes the files' parent and adopts the parent as hidden again; the chain reads the same in every case |
//! | snapshot, clone | pause the datapath → `vhd::snapshot` (link the VDI's file as the base, rename a new empty leaf over the VDI's name) → unpause → new leaf on the base → record (base hidden, VDI on it, new VDI on it) | before the rename: an orphan link to the VDI's file, deleted; after it: the VDI on an unrecorded base, which attach adopts as a hidden parent, and perhaps an orphan new leaf, deleted. The VDI reads the same in every case |
//! | compose | pause the child's datapath → rewrite the child's parent locators (`vhd::compose`) → unpause → record (parent hidden, child on it, old hidden parents no one uses dropped) → delete those files | the child on its new parent with the old record: attach takes the files' parent and hides the parent VDI, as compose would have |
//! | resize | grow the file (`vhd::resize`) → record the size | the old size in the record, which is only a cache: calls answer the file's size |
//!
//! # Sizes
//!
//! A new VDI's size is rounded up to a whole 512-byte sector, the VHD's unit, and a size of 0
//! becomes 2 MiB, the smallest VHD SM's `vhdutil` makes. SM also rounds every size up to its
//! 2 MiB block; we do not, because a VDI created to receive a mirror must have exactly the
//! source's size, and a source on a `qcow2` SR need not be a multiple of 2 MiB. Resize grows
//! only.
//!
//! # Records
//!
//! A VDI's record is the `vdi_info` its creator gave (id, `uuid` and sizes chosen here), with
//! `content_id` defaulting to the VDI's id as xapi's SMAPIv1 adapter presents a VDI without
//! one. Answers add `sm_config["vhd-parent"]`, the node the VDI's file is a differencing disk
//! of, as SM reports it (xapi's SMAPIv1 `similar_content` walks it); callers cannot set it.
//! A snapshot or clone takes its name and description from the call's `vdi_info`, keeps only
//! `base_mirror` of its `sm_config` (as xapi does), and carries the VDI's `content_id`, type,
//! persistence and size over.

use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::time::Duration;

use sxm_engine::backend::{CopyControl, 
    AttachedVdi, Backend, CopyStats, MirrorMode, MirrorStatus, SrContext, SrSpace, StorageResult, VdiChange, safe_component,
};
use sxm_engine::model::{AttachInfo, Rw, StorageError, VdiInfo};
use sxm_engine::rpc::marshal::Map;
use sxm_engine::state;
use tapmirror::image::vhd;

use crate::datapath::{self, Datapaths, group};
use crate::errors;
use crate::meta::{Node, SrMeta, is_node_id, new_id, now_xapi_time, vhd_path};
use crate::recover;

/// `sm_config` key naming the node a VDI's file is a differencing disk of (answered, never
/// stored or taken from callers).
pub const VHD_PARENT_KEY: &str = "vhd-parent";
/// `sm_config` key a scan sets on a VDI whose file cannot be read, saying why.
pub const VHD_ERROR_KEY: &str = "vhd-error";
/// The one `sm_config` key a snapshot or clone takes from its caller (xapi's
/// `sm_config_keys_to_preserve_on_clone`).
const PRESERVED_ON_CLONE: &str = "base_mirror";
/// SM's smallest VHD (`vhdutil.MIN_VHD_SIZE`), the size of a VDI created with size 0.
const MIN_SIZE: u64 = 2 << 20;
/// A VHD sector.
const SECTOR: u64 = 512;

/// The `ext` SR type: VHD files in the SR's folder, served by one `tapmirror serve` per
/// attached VDI.
pub struct ExtBackend {
    datapaths: Datapaths,
}

impl ExtBackend {
    /// A backend whose datapaths run `tapmirror_exe serve`.
    pub fn new(tapmirror_exe: PathBuf) -> ExtBackend {
        ExtBackend { datapaths: Datapaths::new(tapmirror_exe, datapath::FORMAT) }
    }

    /// Full mirrors of this backend cap their background pass at `bytes_per_s` while the guest
    /// writes (`None`: tapmirror's default; 0: no cap).
    pub fn with_mirror_busy_rate(self, bytes_per_s: Option<u64>) -> ExtBackend {
        ExtBackend { datapaths: self.datapaths.with_mirror_busy_rate(bytes_per_s) }
    }
}

/// A VDI id from a caller: one that could not be ours (not a single safe path component, not a
/// UUID) names no VDI.
fn vdi_id(vdi: &str) -> StorageResult<&str> {
    match safe_component("VDI", vdi) {
        Ok(id) if is_node_id(id) => Ok(id),
        _ => Err(StorageError::VdiDoesNotExist(vdi.to_owned())),
    }
}

/// [`vdi_id`], and the VDI exists in the SR.
fn known<'a>(sr: &SrContext, vdi: &'a str) -> StorageResult<&'a str> {
    let id = vdi_id(vdi)?;
    SrMeta::load_existing(&sr.dir)?.vdi(id)?;
    Ok(id)
}

/// A requested size in bytes, as the VHD will hold it.
fn vhd_size(vdi: &str, size: i64) -> StorageResult<u64> {
    let Ok(size) = u64::try_from(size) else {
        return Err(errors::failure("invalid", format!("VDI {vdi}: size {size} is negative")));
    };
    let size = if size == 0 { MIN_SIZE } else { size.div_ceil(SECTOR).saturating_mul(SECTOR) };
    if size > vhd::MAX_SIZE {
        return Err(StorageError::BackendError("VDI_TOO_LARGE".to_owned(), vec![vdi.to_owned(), vhd::MAX_SIZE.to_string()]));
    }
    Ok(size)
}

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Takes keys callers may not set out of an `sm_config`.
fn caller_sm_config(mut sm_config: Map<String>) -> Map<String> {
    sm_config.shift_remove(VHD_PARENT_KEY);
    sm_config.shift_remove(VHD_ERROR_KEY);
    sm_config
}

/// What a call answers for visible node `id`: its record with the sizes its file has now and
/// its parent. `Err` when the file cannot be read.
fn present(sr: &SrContext, meta: &SrMeta, id: &str) -> StorageResult<VdiInfo> {
    let node = meta.nodes.get(id).ok_or_else(|| StorageError::VdiDoesNotExist(id.to_owned()))?;
    let mut info = meta.vdi(id)?.clone();
    let path = vhd_path(&sr.dir, id);
    let v = vhd::info(&path).map_err(|e| errors::vhd(id, "reading the VHD", &e))?;
    info.virtual_size = to_i64(v.virtual_size);
    info.physical_utilisation = to_i64(v.file_size);
    if let Some(p) = &node.parent {
        info.sm_config.insert(VHD_PARENT_KEY.to_owned(), p.clone());
    }
    Ok(info)
}

/// [`present`] for listings: a VDI whose file cannot be read is still listed (its recorded
/// record, with the reason in `sm_config["vhd-error"]`), so one damaged file hides nothing else.
fn present_listed(sr: &SrContext, meta: &SrMeta, id: &str) -> StorageResult<VdiInfo> {
    match present(sr, meta, id) {
        Ok(info) => Ok(info),
        Err(StorageError::BackendError(code, params)) => {
            let reason = params.get(1).cloned().unwrap_or_else(|| code.clone());
            tracing::error!(sr = %sr.sr, vdi = %id, %code, error = %reason, "a VDI's VHD file cannot be read");
            let mut info = meta.vdi(id)?.clone();
            info.sm_config.insert(VHD_ERROR_KEY.to_owned(), reason);
            Ok(info)
        }
        Err(e) => Err(e),
    }
}

/// Whether `id` is a VDI set non-persistent, whose parent holds the content it is reset to.
fn non_persistent(sr: &SrContext, id: &str) -> bool {
    SrMeta::load_existing(&sr.dir).ok().is_some_and(|m| m.vdi(id).is_ok_and(|i| !i.persistent))
}

/// Whether node `id`'s file now names `parent` as its parent (a file change happened even
/// though the call around it failed).
fn file_moved_to(sr: &SrContext, id: &str, parent: &str) -> bool {
    recover::file_parent(&sr.dir, id).is_ok_and(|p| p.as_deref() == Some(parent))
}

/// Deletes the files of nodes the record no longer names (the record is saved already).
fn delete_files(sr: &SrContext, ids: &[String]) {
    for id in ids {
        match state::remove_durably(&vhd_path(&sr.dir, id)) {
            Ok(()) => tracing::info!(sr = %sr.sr, node = %id, "deleted a VHD file"),
            // Left as an orphan: the next attach deletes it.
            Err(e) => tracing::warn!(sr = %sr.sr, node = %id, error = %e, "could not delete an unused VHD file"),
        }
    }
}

/// The most data a VDI may hold for its hidden parent to be coalesced into it after a destroy:
/// its guest waits while the data is copied (SM's live leaf-coalesce has such a bound too).
const LIVE_COALESCE_MAX: u64 = 64 << 20;
/// The most data a hidden node may hold to be coalesced into its hidden parent (no guest
/// waits for it; this SR's other calls do).
const COALESCE_MAX: u64 = 1 << 30;

/// Snapshot or clone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Branch {
    Snapshot,
    Clone,
}

impl Branch {
    fn call(self) -> &'static str {
        match self {
            Branch::Snapshot => "VDI.snapshot",
            Branch::Clone => "VDI.clone",
        }
    }
}

impl ExtBackend {
    /// Snapshot and clone: the VDI's data moves into a new hidden base, the VDI becomes an
    /// empty leaf on it, and the new VDI another empty leaf on it.
    fn branch(&self, sr: &SrContext, info: &VdiInfo, kind: Branch) -> StorageResult<VdiInfo> {
        let src = vdi_id(&info.vdi)?;
        let mut meta = SrMeta::load_existing(&sr.dir)?;
        let src_info = meta.vdi(src)?.clone();
        // The VDI and the new VDI each read through one more image: the new base.
        let depth = meta.ancestors(src).len() + 1;
        if depth + 1 > errors::MAX_CHAIN {
            return Err(errors::chain_too_long(src, depth));
        }
        let (base, new) = (new_id(), new_id());
        let (src_path, base_path, new_path) = (vhd_path(&sr.dir, src), vhd_path(&sr.dir, &base), vhd_path(&sr.dir, &new));
        let swapped = self.datapaths.with_quiesced(
            group(sr),
            src,
            kind.call(),
            || vhd::snapshot(&src_path, &base_path).map_err(|e| errors::vhd(src, kind.call(), &e)),
            errors::datapath,
        );
        // Once the VDI's file is a child of the base, record that whatever happens next (the
        // datapath failing to resume, the new leaf failing), so the record does not lag the
        // files until the next attach.
        let moved = swapped.is_ok() || file_moved_to(sr, src, &base);
        if moved {
            let old_parent = meta.nodes.get(src).and_then(|n| n.parent.clone());
            meta.nodes.insert(base.clone(), Node { parent: old_parent, info: None });
            if let Some(n) = meta.nodes.get_mut(src) {
                n.parent = Some(base.clone());
            }
        }
        let made = swapped.and_then(|()| vhd::clone(&base_path, &new_path).map_err(|e| errors::vhd(src, kind.call(), &e)));
        if let Err(e) = made {
            if moved {
                meta.save(&sr.dir)?;
                tracing::warn!(sr = %sr.sr, vdi = %src, base = %base, error = %e, "moved a VDI onto a new hidden base, then failed");
            }
            return Err(e);
        }

        let mut new_info = VdiInfo::new(new.clone(), info.name_label.clone());
        new_info.uuid = Some(new.clone());
        new_info.name_description = info.name_description.clone();
        if let Some(v) = info.sm_config.get(PRESERVED_ON_CLONE) {
            new_info.sm_config.insert(PRESERVED_ON_CLONE.to_owned(), v.clone());
        }
        new_info.ty = src_info.ty.clone();
        // A new VDI starts persistent: a non-persistent one's reset point is its own parent,
        // which the new one does not have (`VDI.set_persistent false` makes it one).
        new_info.persistent = true;
        new_info.sharable = src_info.sharable;
        new_info.virtual_size = src_info.virtual_size;
        new_info.content_id = if src_info.content_id.is_empty() { new_id() } else { src_info.content_id.clone() };
        if kind == Branch::Snapshot {
            new_info.is_a_snapshot = true;
            new_info.snapshot_of = src.to_owned();
            new_info.snapshot_time = now_xapi_time();
            new_info.read_only = true;
        }
        meta.nodes.insert(new.clone(), Node { parent: Some(base.clone()), info: Some(new_info) });
        if let Err(e) = meta.save(&sr.dir) {
            let _ = state::remove_durably(&new_path);
            return Err(e);
        }
        tracing::info!(sr = %sr.sr, vdi = %src, new = %new, base = %base, call = kind.call(), "branched a VDI on a new hidden base");
        present(sr, &meta, &new)
    }
}

impl ExtBackend {
    /// After a destroy, SM's garbage collector's leaf-coalesce: a hidden node left with one
    /// child, a VDI, is folded into that VDI, so that snapshot-and-destroy cycles (a backup's)
    /// leave no chain behind them. The VDI's sectors are written into the hidden node's file
    /// (`vhd::coalesce`: the VDI reads the same at every moment), the record makes the node's
    /// parent the VDI's, and the node's file is renamed over the VDI's, all with the VDI's
    /// datapath paused (the guest waits; hence only VDIs holding up to [`LIVE_COALESCE_MAX`]).
    /// A crash before the rename leaves the VDI on its old parent, which attach adopts back
    /// from the files. Best effort: a failure is logged and leaves the chain as it was.
    fn coalesce_lone_child(&self, sr: &SrContext, hidden: &str) {
        let Some(child) = SrMeta::load_existing(&sr.dir).ok().and_then(|m| m.lone_child(hidden)) else { return };
        if non_persistent(sr, &child) {
            // Its parent is what `VDI.epoch_begin` resets it to: never folded into it.
            return;
        }
        let (hidden_path, child_path) = (vhd_path(&sr.dir, hidden), vhd_path(&sr.dir, &child));
        // What the pause costs is copying the sectors the VDI wrote, not its blocks: a guest's
        // scattered small writes (a failed migration's) allocate 2 MiB blocks for 4 KiB each,
        // and counting blocks left every such VDI a chain level deeper.
        match tapmirror::datapaths::block_on(vhd::written_bytes(&child_path)) {
            Ok(Ok(bytes)) if bytes <= LIVE_COALESCE_MAX => {}
            Ok(Ok(bytes)) => {
                tracing::info!(sr = %sr.sr, vdi = %child, hidden, bytes, "not coalescing: the VDI holds too much to pause its guest for");
                return;
            }
            Ok(Err(e)) => {
                tracing::warn!(sr = %sr.sr, vdi = %child, error = %errors::chain(&e), "not coalescing: the VDI's file cannot be read");
                return;
            }
            Err(e) => {
                tracing::warn!(sr = %sr.sr, vdi = %child, error = %e, "not coalescing: no runtime to read the VDI's file with");
                return;
            }
        }
        let coalesced = self.datapaths.with_quiesced(
            group(sr),
            &child,
            "coalesce",
            || {
                // Looked at again with the guest held and its writes in the file: the estimate
                // above read a file whose newest metadata could still be in the datapath.
                let written = tapmirror::datapaths::block_on(vhd::written_bytes(&child_path))
                    .map_err(|e| errors::io("coalesce", &e))?
                    .map_err(|e| errors::vhd(&child, "read bitmaps", &e))?;
                if written > LIVE_COALESCE_MAX {
                    return Err(errors::failure("coalesce", format!("VDI {child} holds {written} bytes of its own, too much to pause its guest for")));
                }
                vhd::coalesce(&child_path).map_err(|e| errors::vhd(&child, "coalesce", &e))?;
                let mut meta = SrMeta::load_existing(&sr.dir)?;
                meta.fold_into_child(hidden, &child);
                meta.save(&sr.dir)?;
                state::rename_durably(&hidden_path, &child_path).map_err(|e| errors::io("coalesce", &e))
            },
            errors::datapath,
        );
        match coalesced {
            Ok(()) => tracing::info!(sr = %sr.sr, vdi = %child, hidden, "coalesced a VDI with its hidden parent"),
            Err(e) => tracing::warn!(sr = %sr.sr, vdi = %child, hidden, error = %e, "coalescing a VDI with its hidden parent failed; the chain stays"),
        }
    }
}

impl ExtBackend {
    /// After a destroy, SM's garbage collector's other coalesce: a hidden node left with one
    /// child that is hidden too (the base of an older snapshot, once that snapshot is gone: a
    /// rolling series of backups) takes that child's sectors (`vhd::coalesce`), the child's
    /// children are put on it (`vhd::compose`, each VDI's datapath paused for its header
    /// write), and the child goes. Every chain reads the same at every step; a crash leaves
    /// files whose parents attach reads back into the record, and an unused hidden child that
    /// attach deletes. Best effort, up to [`COALESCE_MAX`] of data; a failure is logged.
    fn coalesce_hidden_pair(&self, sr: &SrContext, parent: &str) {
        let Ok(meta) = SrMeta::load_existing(&sr.dir) else { return };
        let Some(child) = meta.hidden_only_child(parent) else { return };
        let grandchildren: Vec<String> = meta.children(&child).into_iter().map(str::to_owned).collect();
        let (parent_path, child_path) = (vhd_path(&sr.dir, parent), vhd_path(&sr.dir, &child));
        match vhd::info(&child_path) {
            Ok(i) if i.allocated_bytes <= COALESCE_MAX => {}
            Ok(i) => {
                tracing::info!(sr = %sr.sr, parent, child = %child, bytes = i.allocated_bytes, "not coalescing a hidden pair: the child holds too much");
                return;
            }
            Err(e) => {
                tracing::warn!(sr = %sr.sr, child = %child, error = %errors::chain(&e), "not coalescing a hidden pair");
                return;
            }
        }
        if let Err(e) = vhd::coalesce(&child_path) {
            tracing::warn!(sr = %sr.sr, parent, child = %child, error = %errors::chain(&e), "coalescing a hidden pair failed; the chain stays");
            return;
        }
        let mut moved = Vec::new();
        for g in &grandchildren {
            let g_path = vhd_path(&sr.dir, g);
            let composed = self.datapaths.with_quiesced(
                group(sr),
                g,
                "coalesce",
                || vhd::compose(&g_path, &parent_path).map_err(|e| errors::vhd(g, "coalesce", &e)),
                errors::datapath,
            );
            if composed.is_ok() || file_moved_to(sr, g, parent) {
                moved.push(g.clone());
            }
            if let Err(e) = composed {
                tracing::warn!(sr = %sr.sr, parent, node = %g, error = %e, "putting a node on its coalesced grandparent failed");
            }
        }
        let Ok(mut meta) = SrMeta::load_existing(&sr.dir) else { return };
        let all = moved.len() == grandchildren.len();
        if all {
            meta.fold_into_parent(parent, &child);
        } else {
            for g in &moved {
                if let Some(n) = meta.nodes.get_mut(g) {
                    n.parent = Some(parent.to_owned());
                }
            }
        }
        if let Err(e) = meta.save(&sr.dir) {
            tracing::warn!(sr = %sr.sr, parent, error = %e, "recording a hidden pair's coalesce failed; attach reads it back from the files");
            return;
        }
        if all {
            delete_files(sr, std::slice::from_ref(&child));
            tracing::info!(sr = %sr.sr, parent, child = %child, moved = moved.len(), "coalesced a hidden pair");
        }
    }
}

impl ExtBackend {
    /// At attach: every hidden node left with one child is folded as a destroy folds it. A
    /// host killed between a destroy (or a snapshot) and its coalesce leaves such a pair, which
    /// no later destroy looks at again: each such crash cost the VDI a level of its chain for
    /// good, up to the 30 that refuse its next snapshot. A pair that stays as it is (too much
    /// data to pause a guest for, a reset point) is tried once.
    fn coalesce_leftovers(&self, sr: &SrContext) {
        tapmirror::forest::fold_lone_pairs(|| SrMeta::load_existing(&sr.dir).ok(), |hidden| {
            self.coalesce_lone_child(sr, hidden);
            self.coalesce_hidden_pair(sr, hidden);
        });
    }
}

impl Backend for ExtBackend {
    fn vdi_checksums(&self, sr: &SrContext, vdi: &str, block: u64) -> StorageResult<Vec<u32>> {
        let id = vdi_id(vdi)?;
        SrMeta::load_existing(&sr.dir)?.vdi(id)?;
        tapmirror::image::checksums(&vhd_path(&sr.dir, id), block)
            .map_err(|e| errors::failure("checksums", format!("VDI {id}: {e:#}")))
    }

    fn sr_create(&self, sr: &SrContext, name_label: &str, _physical_size: i64) -> StorageResult<Map<String>> {
        if SrMeta::load(&sr.dir)?.is_some() {
            return Err(errors::failure("invalid", format!("{} already holds an SR", sr.dir.display())));
        }
        SrMeta::default().save(&sr.dir)?;
        state::ensure_reserve(&sr.dir);
        tracing::info!(sr = %sr.sr, name_label, dir = %sr.dir.display(), "created an ext SR");
        Ok(sr.device_config.clone())
    }

    fn sr_attach(&self, sr: &SrContext, datapaths: &[AttachedVdi]) -> StorageResult<()> {
        let r = recover::recover(&sr.sr, &sr.dir)?;
        tracing::info!(sr = %sr.sr, recovery = ?r, "attached an ext SR");
        state::ensure_reserve(&sr.dir);
        let meta = SrMeta::load_existing(&sr.dir)?;
        let recovered = self.datapaths.recover(
            group(sr),
            &datapath::wanted(datapaths),
            &|vdi: &str| {
                let id = vdi_id(vdi)?;
                meta.vdi(id)?;
                Ok(vhd_path(&sr.dir, id))
            },
            &errors::datapath,
        );
        drop(meta);
        self.coalesce_leftovers(sr);
        recovered
    }

    fn sr_dead_datapaths(&self, sr: &SrContext) -> Vec<String> {
        self.datapaths.dead(group(sr))
    }

    fn vdi_restart_datapath(&self, sr: &SrContext, vdi: &str) -> StorageResult<bool> {
        let id = known(sr, vdi)?;
        self.datapaths.restart_dead(group(sr), id, &vhd_path(&sr.dir, id)).map_err(errors::datapath)
    }

    fn sr_detach(&self, sr: &SrContext) -> StorageResult<()> {
        if let Some(vdi) = self.datapaths.attached(group(sr)).first() {
            return Err(errors::in_use(vdi, "SR.detach"));
        }
        self.datapaths.forget(group(sr));
        tracing::info!(sr = %sr.sr, "detached an ext SR");
        Ok(())
    }

    fn sr_destroy(&self, sr: &SrContext) -> StorageResult<()> {
        if let Some(vdi) = self.datapaths.attached(group(sr)).first() {
            return Err(errors::in_use(vdi, "SR.destroy"));
        }
        // A VDI the SR still lists is refused, never destroyed with it; hidden snapshot bases
        // that no VDI needs go with the SR.
        if let Some(vdi) = SrMeta::load_existing(&sr.dir)?.nodes.iter().find(|(_, n)| n.info.is_some()).map(|(id, _)| id.clone()) {
            return Err(errors::not_empty(&sr.sr, &vdi));
        }
        let files = recover::vhd_files(&sr.dir)?;
        for id in &files {
            state::remove_durably(&vhd_path(&sr.dir, id)).map_err(|e| errors::io("destroying the SR", &e))?;
        }
        state::remove_durably(&SrMeta::path(&sr.dir)).map_err(|e| errors::io("destroying the SR", &e))?;
        state::remove_durably(&sr.dir.join(state::RESERVE_FILE)).map_err(|e| errors::io("destroying the SR", &e))?;
        tracing::info!(sr = %sr.sr, files = files.len(), "destroyed an ext SR");
        Ok(())
    }

    fn sr_scan(&self, sr: &SrContext) -> StorageResult<Vec<VdiInfo>> {
        let meta = SrMeta::load_existing(&sr.dir)?;
        meta.nodes.iter().filter(|(_, n)| n.info.is_some()).map(|(id, _)| present_listed(sr, &meta, id)).collect()
    }

    fn sr_space(&self, sr: &SrContext) -> StorageResult<SrSpace> {
        let s = nix::sys::statvfs::statvfs(&sr.dir)
            .map_err(|e| errors::io(format!("statvfs {}", sr.dir.display()), &std::io::Error::from(e)))?;
        let unit = s.fragment_size() as u64;
        Ok(SrSpace { total: to_i64(s.blocks() as u64 * unit), free: to_i64(s.blocks_available() as u64 * unit) })
    }

    fn vdi_create(&self, sr: &SrContext, info: &VdiInfo) -> StorageResult<VdiInfo> {
        let mut meta = SrMeta::load_existing(&sr.dir)?;
        let id = new_id();
        let size = vhd_size(&id, info.virtual_size)?;
        let path = vhd_path(&sr.dir, &id);
        vhd::create_dynamic(&path, size, vhd::DEFAULT_BLOCK_SIZE).map_err(|e| errors::vhd(&id, "VDI.create", &e))?;
        let mut record = info.clone();
        record.vdi = id.clone();
        record.uuid = Some(id.clone());
        record.virtual_size = to_i64(size);
        record.cbt_enabled = false;
        // Persistent, whatever the caller says, as SM's create ignores it: a non-persistent
        // VDI needs a reset point, which only `VDI.set_persistent false` makes.
        record.persistent = true;
        record.sm_config = caller_sm_config(record.sm_config);
        if record.content_id.is_empty() {
            record.content_id = id.clone();
        }
        meta.nodes.insert(id.clone(), Node { parent: None, info: Some(record) });
        if let Err(e) = meta.save(&sr.dir) {
            let _ = state::remove_durably(&path);
            return Err(e);
        }
        tracing::info!(sr = %sr.sr, vdi = %id, size, name_label = %info.name_label, "created a VDI");
        present(sr, &meta, &id)
    }

    fn vdi_destroy(&self, sr: &SrContext, vdi: &str) -> StorageResult<()> {
        let id = vdi_id(vdi)?;
        let mut meta = SrMeta::load_existing(&sr.dir)?;
        meta.vdi(id)?;
        if self.datapaths.is_attached(group(sr), id) {
            return Err(errors::in_use(id, "VDI.destroy"));
        }
        if !meta.children(id).is_empty() {
            // Never the case while visible VDIs stay leaves, but should another node still read
            // through this file, the data stays as a hidden parent (SMAPIv1's model).
            if let Some(n) = meta.nodes.get_mut(id) {
                n.info = None;
            }
            meta.save(&sr.dir)?;
            tracing::info!(sr = %sr.sr, vdi = %id, "destroyed a VDI that others depend on: its file stays as a hidden parent");
            return Ok(());
        }
        let parent = meta.nodes.remove(id).and_then(|n| n.parent);
        let mut garbage = vec![id.to_owned()];
        garbage.extend(meta.drop_unused_hidden(parent.clone()));
        meta.save_destroying(&sr.dir, id)?;
        tracing::info!(sr = %sr.sr, vdi = %id, hidden_parents_dropped = garbage.len() - 1, "destroyed a VDI");
        delete_files(sr, &garbage);
        state::ensure_reserve(&sr.dir);
        if let Some(parent) = parent.filter(|p| meta.nodes.contains_key(p)) {
            self.coalesce_lone_child(sr, &parent);
            self.coalesce_hidden_pair(sr, &parent);
            // A hidden base now left with one hidden child, `parent` (the reset point of a VDI
            // made non-persistent again, over its last one): that pair folds too.
            if let Some(grandparent) = SrMeta::load_existing(&sr.dir).ok().and_then(|m| m.nodes.get(&parent).and_then(|n| n.parent.clone())) {
                self.coalesce_hidden_pair(sr, &grandparent);
            }
        }
        Ok(())
    }

    fn vdi_stat(&self, sr: &SrContext, vdi: &str) -> StorageResult<VdiInfo> {
        let id = vdi_id(vdi)?;
        present(sr, &SrMeta::load_existing(&sr.dir)?, id)
    }

    fn vdi_snapshot(&self, sr: &SrContext, info: &VdiInfo) -> StorageResult<VdiInfo> {
        self.branch(sr, info, Branch::Snapshot)
    }

    fn vdi_clone(&self, sr: &SrContext, info: &VdiInfo) -> StorageResult<VdiInfo> {
        self.branch(sr, info, Branch::Clone)
    }

    fn vdi_resize(&self, sr: &SrContext, vdi: &str, new_size: i64) -> StorageResult<i64> {
        let id = vdi_id(vdi)?;
        let mut meta = SrMeta::load_existing(&sr.dir)?;
        // A snapshot holds an instant; a size change is a write to it.
        if meta.vdi(id)?.read_only {
            return Err(errors::read_only(id));
        }
        if self.datapaths.is_attached(group(sr), id) {
            return Err(errors::in_use(id, "VDI.resize"));
        }
        let path = vhd_path(&sr.dir, id);
        let size = vhd_size(id, new_size)?;
        let current = vhd::info(&path).map_err(|e| errors::vhd(id, "VDI.resize", &e))?.virtual_size;
        if size < current {
            return Err(errors::failure("invalid", format!("VDI {id}: shrinking from {current} to {size} bytes is not supported")));
        }
        vhd::resize(&path, size).map_err(|e| errors::vhd(id, "VDI.resize", &e))?;
        let now = vhd::info(&path).map_err(|e| errors::vhd(id, "VDI.resize", &e))?.virtual_size;
        meta.vdi_mut(id)?.virtual_size = to_i64(now);
        meta.save(&sr.dir)?;
        tracing::info!(sr = %sr.sr, vdi = %id, from = current, to = now, "resized a VDI");
        Ok(to_i64(now))
    }

    fn vdi_compose(&self, sr: &SrContext, parent: &str, child: &str) -> StorageResult<()> {
        let (parent, child) = (vdi_id(parent)?, vdi_id(child)?);
        let mut meta = SrMeta::load_existing(&sr.dir)?;
        meta.vdi(parent)?;
        meta.vdi(child)?;
        if parent == child {
            return Err(errors::failure("invalid", format!("VDI {child} cannot be composed onto itself")));
        }
        // The child's content changes under the parent's data: a snapshot (read-only), or a
        // VDI others read through (their content would change with it, under content_ids that
        // say it did not, and a later copy would take a stale copy of them as theirs).
        if !meta.children(child).is_empty() || meta.vdi(child)?.read_only {
            return Err(errors::failure("invalid", format!("VDI {child} is read-only or others read through it: nothing is composed under it")));
        }
        // The parent's file becomes a hidden, read-only layer under the child: nothing may be
        // writing it or reading it as a VDI.
        if self.datapaths.is_attached(group(sr), parent) {
            return Err(errors::in_use(parent, "VDI.compose"));
        }
        let (parent_path, child_path) = (vhd_path(&sr.dir, parent), vhd_path(&sr.dir, child));
        let composed = self.datapaths.with_quiesced(
            group(sr),
            child,
            "VDI.compose",
            || vhd::compose(&child_path, &parent_path).map_err(|e| errors::vhd(child, "VDI.compose", &e)),
            errors::datapath,
        );
        // A failure after the child's header changed (its datapath not resuming) still
        // records the compose: the files say it happened.
        if composed.is_err() && !file_moved_to(sr, child, parent) {
            return composed;
        }
        let old_parent = meta.nodes.get_mut(child).and_then(|n| n.parent.replace(parent.to_owned()));
        if let Some(n) = meta.nodes.get_mut(parent) {
            n.info = None;
        }
        let garbage = meta.drop_unused_hidden(old_parent);
        meta.save(&sr.dir)?;
        tracing::info!(sr = %sr.sr, parent, child, dropped = ?garbage, "composed a VDI onto another, which is now its hidden parent");
        delete_files(sr, &garbage);
        composed
    }

    fn vdi_reset_leaf(&self, sr: &SrContext, vdi: &str) -> StorageResult<()> {
        const CALL: &str = "VDI.epoch_begin";
        let id = vdi_id(vdi)?;
        let mut meta = SrMeta::load_existing(&sr.dir)?;
        meta.vdi(id)?;
        if self.datapaths.is_attached(group(sr), id) {
            return Err(errors::in_use(id, CALL));
        }
        // Images read through it (a snapshot's VDI): its content is theirs too.
        if !meta.children(id).is_empty() || meta.vdi(id)?.read_only {
            return Err(errors::failure("invalid", format!("VDI {id} is read-only or others read through it: it is never reset")));
        }
        let Some(parent) = meta.nodes.get(id).and_then(|n| n.parent.clone()) else {
            return Err(errors::failure("invalid", format!("VDI {id} has no parent to reset to (VDI.set_persistent false makes one)")));
        };
        // A fresh empty leaf on the parent, at the VDI's size, renamed over the VDI's file. A
        // crash before the rename leaves it an orphan, which the next attach deletes.
        let (path, fresh) = (vhd_path(&sr.dir, id), vhd_path(&sr.dir, &new_id()));
        let size = vhd::info(&path).map_err(|e| errors::vhd(id, CALL, &e))?.virtual_size;
        let made = vhd::clone(&vhd_path(&sr.dir, &parent), &fresh)
            .and_then(|()| if vhd::info(&fresh)?.virtual_size < size { vhd::resize(&fresh, size) } else { Ok(()) })
            .map_err(|e| errors::vhd(id, CALL, &e))
            .and_then(|()| state::rename_durably(&fresh, &path).map_err(|e| errors::io(CALL, &e)));
        if let Err(e) = made {
            let _ = std::fs::remove_file(&fresh);
            return Err(e);
        }
        // It holds other content now than its content_id said.
        meta.vdi_mut(id)?.content_id = new_id();
        meta.save(&sr.dir)?;
        tracing::info!(sr = %sr.sr, vdi = %id, parent = %parent, "reset a VDI to its parent");
        Ok(())
    }

    fn vdi_update(&self, sr: &SrContext, vdi: &str, change: &VdiChange) -> StorageResult<()> {
        let id = vdi_id(vdi)?;
        let mut meta = SrMeta::load_existing(&sr.dir)?;
        if let VdiChange::SnapshotOf { of, .. } = change {
            meta.vdi(vdi_id(of)?)?;
        }
        if let VdiChange::AddSmConfig(k, _) = change
            && (k == VHD_PARENT_KEY || k == VHD_ERROR_KEY)
        {
            return Err(errors::failure("invalid", format!("sm_config key {k:?} is the backend's own")));
        }
        change.apply(meta.vdi_mut(id)?);
        meta.save(&sr.dir)?;
        tracing::info!(sr = %sr.sr, vdi = %id, ?change, "updated a VDI's record");
        Ok(())
    }

    fn vdi_similar_content(&self, sr: &SrContext, vdi: &str) -> StorageResult<Vec<VdiInfo>> {
        let id = vdi_id(vdi)?;
        let meta = SrMeta::load_existing(&sr.dir)?;
        meta.vdi(id)?;
        let mut out = Vec::new();
        for other in meta.similar(id) {
            let info = present_listed(sr, &meta, &other)?;
            // xapi drops CBT metadata VDIs, which hold no data.
            if info.ty != "cbt_metadata" {
                out.push(info);
            }
        }
        Ok(out)
    }

    fn vdi_attach(&self, sr: &SrContext, vdi: &str, read_write: bool) -> StorageResult<AttachInfo> {
        let id = vdi_id(vdi)?;
        let meta = SrMeta::load_existing(&sr.dir)?;
        let info = meta.vdi(id)?;
        let rw = if read_write { Rw::Rw } else { Rw::Ro };
        if rw == Rw::Rw && info.read_only {
            return Err(errors::read_only(id));
        }
        self.datapaths.attach(group(sr), id, &vhd_path(&sr.dir, id), rw == Rw::Rw).map(datapath::attach_info).map_err(errors::datapath)
    }

    fn vdi_activate(&self, sr: &SrContext, vdi: &str) -> StorageResult<()> {
        self.datapaths.activate(group(sr), known(sr, vdi)?).map_err(errors::datapath)
    }

    fn vdi_deactivate(&self, sr: &SrContext, vdi: &str) -> StorageResult<()> {
        self.datapaths.deactivate(group(sr), known(sr, vdi)?).map_err(errors::datapath)
    }

    fn vdi_detach(&self, sr: &SrContext, vdi: &str) -> StorageResult<()> {
        self.datapaths.detach(group(sr), known(sr, vdi)?).map_err(errors::datapath)
    }

    fn vdi_attach_info(&self, sr: &SrContext, vdi: &str) -> StorageResult<AttachInfo> {
        self.datapaths.endpoint(group(sr), known(sr, vdi)?).map(datapath::attach_info).map_err(errors::datapath)
    }

    fn vdi_serve_nbd(&self, sr: &SrContext, vdi: &str, conn: OwnedFd) -> StorageResult<()> {
        // Old style, as tapdisk's server on an SMAPIv1 host greets: the only greeting every
        // tapdisk's mirror client (some know no other) and every other client understand.
        self.datapaths.serve_nbd(group(sr), known(sr, vdi)?, conn, true).map_err(errors::datapath)
    }

    /// Sync is SMAPIv1's way (tapdisk's secondary: new writes only; the snapshot and the copy
    /// move the rest). Full works too, tapmirror copying the chain in the background, should a
    /// caller want a VHD source moved without a snapshot.
    fn vdi_mirror_attach(&self, sr: &SrContext, vdi: &str, target: OwnedFd, export: &str, mode: MirrorMode, rate: u64) -> StorageResult<()> {
        self.datapaths.mirror_attach(group(sr), known(sr, vdi)?, target, export, datapath::mode(mode), rate).map_err(errors::datapath)
    }

    fn vdi_mirror_status(&self, sr: &SrContext, vdi: &str) -> StorageResult<MirrorStatus> {
        self.datapaths.mirror_status(group(sr), known(sr, vdi)?).map(datapath::mirror_status).map_err(errors::datapath)
    }

    fn vdi_passed_connections(&self, sr: &SrContext, vdi: &str) -> StorageResult<u64> {
        self.datapaths.passed_connections(group(sr), known(sr, vdi)?).map_err(errors::datapath)
    }

    fn vdi_mirror_detach(&self, sr: &SrContext, vdi: &str) -> StorageResult<()> {
        self.datapaths.mirror_detach(group(sr), known(sr, vdi)?).map_err(errors::datapath)
    }

    fn vdi_mirror_rate(&self, sr: &SrContext, vdi: &str, bytes_per_s: u64) -> StorageResult<()> {
        self.datapaths.mirror_rate(group(sr), known(sr, vdi)?, bytes_per_s).map_err(errors::datapath)
    }

    fn vdi_drain(&self, sr: &SrContext, vdi: &str, timeout: Duration) -> StorageResult<()> {
        self.datapaths.drain(group(sr), known(sr, vdi)?, timeout).map_err(errors::datapath)
    }

    fn vdi_copy_into(&self, sr: &SrContext, vdi: &str, base: Option<&str>, dest: OwnedFd, export: &str, ctl: &CopyControl<'_>) -> StorageResult<CopyStats> {
        let id = known(sr, vdi)?;
        let base = base.map(|b| known(sr, b)).transpose()?;
        let base_path = base.map(|b| vhd_path(&sr.dir, b));
        crate::copy::copy_into(id, &vhd_path(&sr.dir, id), base_path.as_deref(), dest, export, ctl)
    }
}
