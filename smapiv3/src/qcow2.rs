//! [`Qcow2Backend`]: the engine's [`Backend`] for `qcow2` SRs (see the crate documentation
//! for the model).
//!
//! # The order of each change (what a crash leaves)
//!
//! | call | steps | a crash between steps leaves |
//! | --- | --- | --- |
//! | create | new `<id>.qcow2` (synced) → record | an orphan file: deleted at attach |
//! | snapshot, clone | pause the datapath → link the VDI's file as `<base>.qcow2` → new overlay `.tmp-<id>` on it → rename it over the VDI's name → unpause → (clone: another overlay on the base) → record | before the rename: an orphan link and a temporary, deleted; after: the VDI on an unrecorded base, adopted as a hidden one and folded into the VDI (`coalesce_leftovers`). The VDI reads the same in every case |
//! | destroy | record without the VDI (and unused hidden bases) → delete files | orphans: deleted at attach |
//! | coalesce (after a destroy leaves a hidden base one VDI child) | pause the child's datapath → `qcow2::commit` (the child's clusters into the base) → record (the child on the base's parent, the base gone) → rename the base's file over the child's → unpause | before the rename: the child's file is still backed by the base, so attach takes the file's parent and adopts the base as hidden again; the chain reads the same in every case |
//! | compose | pause the child's datapath → rebase its header onto the parent → unpause → record | the child on its new parent with the old record: attach takes the file's parent |
//! | resize | grow the volume → record the size | the old size in the record, only a cache |
//!
//! Compose is a header rewrite (`qemu-img rebase -u`): the child's allocated clusters stay as
//! they are, so it layers the child's writes at cluster granularity. A guest write covering
//! part of a cluster copied the rest of that cluster from the child's old parent at the time
//! (qcow2's copy-on-write); xapi composes onto a parent holding the same data there (the
//! mirror's base), where this is exact.
//!
//! # Sizes
//!
//! A size is rounded up to a whole 512-byte sector (qcow2 sizes are sector multiples); 0
//! stays 0. Resize grows only, and refuses an attached VDI.
//!
//! # Records
//!
//! As the `ext` SR's: the creator's `vdi_info` with id, `uuid` and sizes chosen here and
//! `content_id` defaulting to the id; answers add `sm_config["qcow2-parent"]`, the volume the
//! VDI's file is backed by, which callers cannot set. A snapshot or clone keeps only
//! `base_mirror` of the caller's `sm_config` and carries content_id, type, persistence and
//! size over; a snapshot is read-only.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sxm_engine::backend::{CopyControl, 
    AttachedVdi, Backend, CopyStats, MirrorMode, MirrorStatus, SrContext, SrSpace, StorageResult, VdiChange, safe_component,
};
use sxm_engine::model::{AttachInfo, Rw, StorageError, VdiInfo};
use sxm_engine::rpc::marshal::Map;
use sxm_engine::state;
use tapmirror::image::qcow2;

use crate::datapath::{self, Datapaths, block_on, group};
use crate::errors;
use crate::meta::{Node, SrMeta, is_node_id, new_id, now_xapi_time, volume_path};
use crate::recover;

/// `sm_config` key naming the volume a VDI's file is backed by (answered, never stored).
pub const PARENT_KEY: &str = "qcow2-parent";
/// `sm_config` key a scan sets on a VDI whose volume cannot be read, saying why.
pub const ERROR_KEY: &str = "qcow2-error";
/// The one `sm_config` key a snapshot or clone takes from its caller.
const PRESERVED_ON_CLONE: &str = "base_mirror";
/// The most data a VDI may hold for its hidden base to be coalesced into it after a destroy:
/// its guest waits while the data is copied (SM's live leaf-coalesce has such a bound too).
const LIVE_COALESCE_MAX: u64 = 64 << 20;
/// The same for a child no datapath holds: only this SR's other calls wait meanwhile.
const COALESCE_MAX: u64 = 1 << 30;
const SECTOR: u64 = 512;

/// The `qcow2` SR type: qcow2 volumes in the SR's folder, served by one `tapmirror serve` per
/// attached VDI.
pub struct Qcow2Backend {
    datapaths: Datapaths,
}

impl Qcow2Backend {
    /// A backend whose datapaths run `tapmirror_exe serve`.
    pub fn new(tapmirror_exe: PathBuf) -> Qcow2Backend {
        Qcow2Backend { datapaths: Datapaths::new(tapmirror_exe, datapath::FORMAT) }
    }

    /// Full mirrors of this backend cap their background pass at `bytes_per_s` while the guest
    /// writes (`None`: tapmirror's default; 0: no cap).
    pub fn with_mirror_busy_rate(self, bytes_per_s: Option<u64>) -> Qcow2Backend {
        Qcow2Backend { datapaths: self.datapaths.with_mirror_busy_rate(bytes_per_s) }
    }
}

/// A VDI id from a caller: one that could not be ours names no VDI.
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

fn volume_size(vdi: &str, size: i64) -> StorageResult<u64> {
    let Ok(size) = u64::try_from(size) else {
        return Err(errors::failure("invalid", format!("VDI {vdi}: size {size} is negative")));
    };
    let size = size.div_ceil(SECTOR).saturating_mul(SECTOR);
    let most = qcow2::max_default_size();
    if size > most {
        // As the ext SR says it: the caller learns the limit, not a parse of an image error.
        return Err(StorageError::BackendError("VDI_TOO_LARGE".to_owned(), vec![vdi.to_owned(), most.to_string()]));
    }
    Ok(size)
}

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn caller_sm_config(mut sm_config: Map<String>) -> Map<String> {
    sm_config.shift_remove(PARENT_KEY);
    sm_config.shift_remove(ERROR_KEY);
    sm_config
}

fn q<T>(vdi: &str, op: &str, r: StorageResult<Result<T, qcow2::Qcow2Error>>) -> StorageResult<T> {
    r?.map_err(|e| errors::qcow2(vdi, op, &e))
}

/// What a call answers for visible node `id`: its record with its volume's sizes and parent.
fn present(sr: &SrContext, meta: &SrMeta, id: &str) -> StorageResult<VdiInfo> {
    let node = meta.nodes.get(id).ok_or_else(|| StorageError::VdiDoesNotExist(id.to_owned()))?;
    let mut info = meta.vdi(id)?.clone();
    let v = q(id, "reading the volume", block_on(qcow2::info(&volume_path(&sr.dir, id))))?;
    info.virtual_size = to_i64(v.virtual_size);
    info.physical_utilisation = to_i64(v.disk_bytes);
    if let Some(p) = &node.parent {
        info.sm_config.insert(PARENT_KEY.to_owned(), p.clone());
    }
    Ok(info)
}

/// [`present`] for listings: an unreadable volume is listed with the reason in
/// `sm_config["qcow2-error"]`.
fn present_listed(sr: &SrContext, meta: &SrMeta, id: &str) -> StorageResult<VdiInfo> {
    match present(sr, meta, id) {
        Err(StorageError::BackendError(code, params)) => {
            let reason = params.get(1).cloned().unwrap_or(code);
            tracing::error!(sr = %sr.sr, vdi = %id, error = %reason, "a VDI's volume cannot be read");
            let mut info = meta.vdi(id)?.clone();
            info.sm_config.insert(ERROR_KEY.to_owned(), reason);
            Ok(info)
        }
        r => r,
    }
}

fn delete_files(sr: &SrContext, ids: &[String]) {
    for id in ids {
        match state::remove_durably(&volume_path(&sr.dir, id)) {
            Ok(()) => tracing::info!(sr = %sr.sr, node = %id, "deleted a volume"),
            Err(e) => tracing::warn!(sr = %sr.sr, node = %id, error = %e, "could not delete an unused volume (an orphan for the next attach)"),
        }
    }
}

fn fsync_dir(dir: &Path) -> StorageResult<()> {
    std::fs::File::open(dir).and_then(|f| f.sync_all()).map_err(|e| errors::io(format!("syncing {}", dir.display()), &e))
}

/// Freezes `src`'s volume as `base`: hard-links the file under `base`'s name, puts a new empty
/// overlay on it and renames that over `src`'s name. `src`'s datapath must be paused.
fn freeze(sr: &SrContext, src: &str, base: &str, op: &str, kind: qcow2::OverlayKind) -> StorageResult<()> {
    let (src_path, base_path) = (volume_path(&sr.dir, src), volume_path(&sr.dir, base));
    let tmp = sr.dir.join(format!(".tmp-{}", new_id()));
    std::fs::hard_link(&src_path, &base_path).map_err(|e| errors::io(format!("{op}: linking {}", base_path.display()), &e))?;
    let made = q(src, op, block_on(qcow2::create_overlay_with(&tmp, &base_path, kind)));
    let renamed = made.and_then(|()| {
        std::fs::rename(&tmp, &src_path).map_err(|e| errors::io(format!("{op}: renaming the overlay over {}", src_path.display()), &e))
    });
    if let Err(e) = renamed {
        let _ = std::fs::remove_file(&tmp);
        let _ = std::fs::remove_file(&base_path);
        return Err(e);
    }
    fsync_dir(&sr.dir)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Branch {
    Snapshot,
    Clone,
}

impl Qcow2Backend {
    fn branch(&self, sr: &SrContext, info: &VdiInfo, kind: Branch) -> StorageResult<VdiInfo> {
        let call = if kind == Branch::Snapshot { "VDI.snapshot" } else { "VDI.clone" };
        let src = vdi_id(&info.vdi)?;
        let mut meta = SrMeta::load_existing(&sr.dir)?;
        let src_info = meta.vdi(src)?.clone();
        // The deepest chain this makes is one image longer than the VDI's.
        let depth = meta.ancestors(src).len() + 1;
        if depth + 1 > errors::MAX_CHAIN {
            return Err(errors::chain_too_long(src, depth));
        }
        let new = new_id();

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

        let old_parent = meta.nodes.get(src).and_then(|n| n.parent.clone());
        match kind {
            // The snapshot is the VDI's current volume; the VDI goes on as an overlay on it.
            Branch::Snapshot => {
                // A migration's leaf (marked `base_mirror`) will be composed onto a parent
                // that is being copied meanwhile: its overlay gets sector-sized clusters, so a
                // mirrored write never freezes bytes of the empty base into the leaf.
                let kind = if src_info.sm_config.contains_key(PRESERVED_ON_CLONE) {
                    qcow2::OverlayKind::FillingBacking
                } else {
                    qcow2::OverlayKind::Snapshot
                };
                self.datapaths.with_quiesced(group(sr), src, call, || freeze(sr, src, &new, call, kind), errors::datapath)?;
                new_info.is_a_snapshot = true;
                new_info.snapshot_of = src.to_owned();
                new_info.snapshot_time = now_xapi_time();
                new_info.read_only = true;
                meta.nodes.insert(new.clone(), Node { parent: old_parent, info: Some(new_info) });
                if let Some(n) = meta.nodes.get_mut(src) {
                    n.parent = Some(new.clone());
                }
            }
            // A read-only VDI never changes: the clone is an overlay on it.
            Branch::Clone if src_info.read_only => {
                let path = volume_path(&sr.dir, &new);
                q(src, call, block_on(qcow2::create_overlay(&path, &volume_path(&sr.dir, src))))?;
                meta.nodes.insert(new.clone(), Node { parent: Some(src.to_owned()), info: Some(new_info) });
            }
            // A writable one is frozen as a hidden base first, the VDI and the clone on it.
            Branch::Clone => {
                let base = new_id();
                self.datapaths.with_quiesced(group(sr), src, call, || freeze(sr, src, &base, call, qcow2::OverlayKind::Snapshot), errors::datapath)?;
                meta.nodes.insert(base.clone(), Node { parent: old_parent, info: None });
                if let Some(n) = meta.nodes.get_mut(src) {
                    n.parent = Some(base.clone());
                }
                let made = q(src, call, block_on(qcow2::create_overlay(&volume_path(&sr.dir, &new), &volume_path(&sr.dir, &base))));
                if let Err(e) = made {
                    // The VDI did move onto the base: record that.
                    meta.save(&sr.dir)?;
                    return Err(e);
                }
                meta.nodes.insert(new.clone(), Node { parent: Some(base), info: Some(new_info) });
            }
        }
        meta.save(&sr.dir)?;
        tracing::info!(sr = %sr.sr, vdi = %src, new = %new, call, "branched a VDI");
        present(sr, &meta, &new)
    }
}

impl Qcow2Backend {
    /// After a destroy: a hidden volume left with one child, a VDI, is folded into it, so that
    /// snapshot-and-destroy cycles (a backup's) leave no chain. The VDI's clusters are written
    /// into the hidden volume (`qcow2::commit`: the VDI reads the same at every moment), the
    /// record puts the VDI on the hidden volume's parent, and the hidden volume's file is
    /// renamed over the VDI's, all with the VDI's datapath paused (the guest waits; hence only
    /// VDIs holding up to [`LIVE_COALESCE_MAX`]). A crash before the rename leaves the VDI's
    /// file backed by the hidden volume, which attach adopts back. Best effort: a failure is
    /// logged and leaves the chain as it was.
    fn coalesce_lone_child(&self, sr: &SrContext, hidden: &str) {
        // Any one child: a qcow2 names its backing by file name only, so the hidden volume's
        // file can take the place of a child others read through too (a rolling series of
        // snapshots whose oldest is destroyed).
        let Some(meta) = SrMeta::load_existing(&sr.dir).ok() else { return };
        let Some(child) = meta.only_child(hidden) else { return };
        if meta.nodes.get(&child).and_then(|n| n.info.as_ref()).is_some_and(|i| !i.persistent) {
            // A VDI set non-persistent: `hidden` is what `VDI.epoch_begin` resets it to.
            return;
        }
        let (hidden_path, child_path) = (volume_path(&sr.dir, hidden), volume_path(&sr.dir, &child));
        // A guest waits only when the child takes I/O; otherwise only this SR's other calls do.
        let most = if self.datapaths.is_attached(group(sr), &child) { LIVE_COALESCE_MAX } else { COALESCE_MAX };
        match block_on(qcow2::info(&child_path)) {
            Ok(Ok(i)) if i.allocated_bytes <= most => {}
            Ok(Ok(i)) => {
                tracing::info!(sr = %sr.sr, vdi = %child, hidden, bytes = i.allocated_bytes, "not coalescing: the VDI holds too much to pause its guest for");
                return;
            }
            Ok(Err(e)) => {
                tracing::warn!(sr = %sr.sr, vdi = %child, error = %errors::chain(&e), "not coalescing: the VDI's volume cannot be read");
                return;
            }
            Err(e) => {
                tracing::warn!(sr = %sr.sr, vdi = %child, error = %e, "not coalescing");
                return;
            }
        }
        let coalesced = self.datapaths.with_quiesced(
            group(sr),
            &child,
            "coalesce",
            || {
                q(&child, "coalesce", block_on(qcow2::commit(&child_path)))?;
                let mut meta = SrMeta::load_existing(&sr.dir)?;
                meta.fold_into_child(hidden, &child);
                meta.save(&sr.dir)?;
                state::rename_durably(&hidden_path, &child_path).map_err(|e| errors::io("coalesce", &e))
            },
            errors::datapath,
        );
        match coalesced {
            Ok(()) => tracing::info!(sr = %sr.sr, vdi = %child, hidden, "coalesced a VDI with its hidden base"),
            Err(e) => tracing::warn!(sr = %sr.sr, vdi = %child, hidden, error = %e, "coalescing a VDI with its hidden base failed; the chain stays"),
        }
    }

    /// At attach: every hidden volume left with one child is folded as a destroy folds it. A
    /// host killed between a destroy (or a snapshot) and its coalesce leaves such a pair, which
    /// no later destroy looks at again: each such crash cost the VDI a level of its chain for
    /// good, up to the 30 that refuse its next snapshot. A pair that stays as it is (too much
    /// data to pause a guest for, a reset point) is tried once.
    fn coalesce_leftovers(&self, sr: &SrContext) {
        tapmirror::forest::fold_lone_pairs(|| SrMeta::load_existing(&sr.dir).ok(), |hidden| self.coalesce_lone_child(sr, hidden));
    }
}

impl Backend for Qcow2Backend {
    fn vdi_checksums(&self, sr: &SrContext, vdi: &str, block: u64) -> StorageResult<Vec<u32>> {
        let id = vdi_id(vdi)?;
        SrMeta::load_existing(&sr.dir)?.vdi(id)?;
        tapmirror::image::checksums(&volume_path(&sr.dir, id), block)
            .map_err(|e| errors::failure("checksums", format!("VDI {id}: {e:#}")))
    }

    fn smapi_version(&self) -> u32 {
        3
    }

    fn image_format(&self) -> &'static str {
        "qcow2"
    }

    fn sr_create(&self, sr: &SrContext, name_label: &str, _physical_size: i64) -> StorageResult<Map<String>> {
        if SrMeta::load(&sr.dir)?.is_some() {
            return Err(errors::failure("invalid", format!("{} already holds an SR", sr.dir.display())));
        }
        SrMeta::default().save(&sr.dir)?;
        state::ensure_reserve(&sr.dir);
        tracing::info!(sr = %sr.sr, name_label, dir = %sr.dir.display(), "created a qcow2 SR");
        Ok(sr.device_config.clone())
    }

    fn sr_attach(&self, sr: &SrContext, datapaths: &[AttachedVdi]) -> StorageResult<()> {
        let r = recover::recover(&sr.sr, &sr.dir)?;
        tracing::info!(sr = %sr.sr, recovery = ?r, "attached a qcow2 SR");
        state::ensure_reserve(&sr.dir);
        let meta = SrMeta::load_existing(&sr.dir)?;
        let recovered = self.datapaths.recover(
            group(sr),
            &datapath::wanted(datapaths),
            &|vdi: &str| {
                let id = vdi_id(vdi)?;
                meta.vdi(id)?;
                Ok(volume_path(&sr.dir, id))
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
        self.datapaths.restart_dead(group(sr), id, &volume_path(&sr.dir, id)).map_err(errors::datapath)
    }

    fn sr_detach(&self, sr: &SrContext) -> StorageResult<()> {
        if let Some(vdi) = self.datapaths.attached(group(sr)).first() {
            return Err(errors::in_use(vdi, "SR.detach"));
        }
        self.datapaths.forget(group(sr));
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
        for id in recover::volume_files(&sr.dir)? {
            state::remove_durably(&volume_path(&sr.dir, &id)).map_err(|e| errors::io("destroying the SR", &e))?;
        }
        state::remove_durably(&SrMeta::path(&sr.dir)).map_err(|e| errors::io("destroying the SR", &e))?;
        state::remove_durably(&sr.dir.join(state::RESERVE_FILE)).map_err(|e| errors::io("destroying the SR", &e))
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
        let size = volume_size(&id, info.virtual_size)?;
        let path = volume_path(&sr.dir, &id);
        q(&id, "VDI.create", block_on(qcow2::create(&path, size, None)))?;
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
        tracing::info!(sr = %sr.sr, vdi = %id, size, "created a VDI");
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
            // Others read through it (a snapshot under its VDI): its volume stays, hidden.
            if let Some(n) = meta.nodes.get_mut(id) {
                n.info = None;
            }
            meta.save(&sr.dir)?;
            tracing::info!(sr = %sr.sr, vdi = %id, "destroyed a VDI others read through: its volume stays as a hidden base");
            self.coalesce_lone_child(sr, id);
            return Ok(());
        }
        let parent = meta.nodes.remove(id).and_then(|n| n.parent);
        let mut garbage = vec![id.to_owned()];
        garbage.extend(meta.drop_unused_hidden(parent.clone()));
        meta.save_destroying(&sr.dir, id)?;
        tracing::info!(sr = %sr.sr, vdi = %id, dropped = garbage.len() - 1, "destroyed a VDI");
        delete_files(sr, &garbage);
        state::ensure_reserve(&sr.dir);
        if let Some(parent) = parent.filter(|p| meta.nodes.contains_key(p)) {
            self.coalesce_lone_child(sr, &parent);
            // A hidden volume now left with one child, `parent` (the reset point of a VDI made
            // non-persistent again, over its last one): that pair folds too.
            if let Some(grandparent) = SrMeta::load_existing(&sr.dir).ok().and_then(|m| m.nodes.get(&parent).and_then(|n| n.parent.clone())) {
                self.coalesce_lone_child(sr, &grandparent);
            }
        }
        Ok(())
    }

    fn vdi_stat(&self, sr: &SrContext, vdi: &str) -> StorageResult<VdiInfo> {
        present(sr, &SrMeta::load_existing(&sr.dir)?, vdi_id(vdi)?)
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
        if !meta.children(id).is_empty() {
            return Err(errors::in_use(id, "VDI.resize"));
        }
        let path = volume_path(&sr.dir, id);
        let size = volume_size(id, new_size)?;
        let current = q(id, "VDI.resize", block_on(qcow2::info(&path)))?.virtual_size;
        if size < current {
            return Err(errors::failure("invalid", format!("VDI {id}: shrinking from {current} to {size} bytes is not supported")));
        }
        if size > current {
            q(id, "VDI.resize", block_on(qcow2::resize(&path, size)))?;
        }
        let now = q(id, "VDI.resize", block_on(qcow2::info(&path)))?.virtual_size;
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
        if parent == child || meta.ancestors(parent).iter().any(|a| a == child) {
            return Err(errors::failure("invalid", format!("VDI {child} cannot be composed onto {parent}, which reads through it")));
        }
        // The child's content changes under the parent's data: a snapshot (read-only), or a
        // VDI others read through (their content would change with it, under content_ids that
        // say it did not, and a later copy would take a stale copy of them as theirs).
        if !meta.children(child).is_empty() || meta.vdi(child)?.read_only {
            return Err(errors::failure("invalid", format!("VDI {child} is read-only or others read through it: nothing is composed under it")));
        }
        if self.datapaths.is_attached(group(sr), parent) {
            return Err(errors::in_use(parent, "VDI.compose"));
        }
        let (parent_path, child_path) = (volume_path(&sr.dir, parent), volume_path(&sr.dir, child));
        let composed = self.datapaths.with_quiesced(
            group(sr),
            child,
            "VDI.compose",
            || q(child, "VDI.compose", block_on(qcow2::rebase(&child_path, &parent_path))),
            errors::datapath,
        );
        if composed.is_err() && !recover::file_parent(&sr.dir, child).is_ok_and(|p| p.as_deref() == Some(parent)) {
            return composed;
        }
        let old_parent = meta.nodes.get_mut(child).and_then(|n| n.parent.replace(parent.to_owned()));
        if let Some(n) = meta.nodes.get_mut(parent) {
            n.info = None;
        }
        let garbage = meta.drop_unused_hidden(old_parent);
        meta.save(&sr.dir)?;
        tracing::info!(sr = %sr.sr, parent, child, dropped = ?garbage, "composed a VDI onto another, now its hidden base");
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
        // A fresh overlay on the parent, at the VDI's size, renamed over the VDI's volume (a
        // temporary until then, which attach deletes after a crash).
        let (path, fresh) = (volume_path(&sr.dir, id), sr.dir.join(format!(".tmp-{}", new_id())));
        let size = q(id, CALL, block_on(qcow2::info(&path)))?.virtual_size;
        let made = q(id, CALL, block_on(qcow2::create_overlay(&fresh, &volume_path(&sr.dir, &parent))))
            .and_then(|()| {
                let have = q(id, CALL, block_on(qcow2::info(&fresh)))?.virtual_size;
                if have < size { q(id, CALL, block_on(qcow2::resize(&fresh, size))) } else { Ok(()) }
            })
            .and_then(|()| state::rename_durably(&fresh, &path).map_err(|e| errors::io(CALL, &e)));
        if let Err(e) = made {
            let _ = std::fs::remove_file(&fresh);
            return Err(e);
        }
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
            && (k == PARENT_KEY || k == ERROR_KEY)
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
        self.datapaths.attach(group(sr), id, &volume_path(&sr.dir, id), rw == Rw::Rw).map(datapath::attach_info).map_err(errors::datapath)
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
        // Fixed newstyle, as SMAPIv3's `Datapath.import_activate` servers greet.
        self.datapaths.serve_nbd(group(sr), known(sr, vdi)?, conn, false).map_err(errors::datapath)
    }

    /// Full is SMAPIv3's way (one mirror: dirty tracking, a background copy of the chain, and
    /// synchronous guest writes); Sync works too.
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
        let base_path = base.map(|b| volume_path(&sr.dir, b));
        crate::copy::copy_into(id, &volume_path(&sr.dir, id), base_path.as_deref(), dest, export, ctl)
    }
}
