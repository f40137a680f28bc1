//! The source side. `DATA.MIRROR.start` answers a task at once and runs the stages inside it;
//! each stage fails with its own variant and is rolled back as xapi's table says:
//!
//! | stage | fails with | rollback |
//! | --- | --- | --- |
//! | prepare (`receive_start2` on the destination) | `Migration_preparation_failure` | the destination undoes its own prepare |
//! | pass fds (NBD to the leaf, mirror attached) | `Migration_mirror_fd_failure` | `receive_cancel` |
//! | snapshot (the frozen base) | `Migration_mirror_snapshot_failure` | stop mirroring, `receive_cancel` |
//! | copy (snapshot into the destination parent) | `Migration_mirror_copy_failure` | destroy the snapshot, `stop` |
//!
//! After the copy the task completes with `Mirror_id` and the mirror runs, watched, until the
//! source VDI is deactivated: then the datapath is drained, the mirror checked, and the
//! destination finalizes (composes) synchronously.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::backend::{MirrorHealth, MirrorMode, MirrorStatus};
use crate::model::call::args;
use crate::model::{Call, Dynamic, Mirror, MirrorReceiveResult, MirrorState, StorageError, TaskResult, VdiInfo};
use crate::mux::Mux;
use crate::rpc::marshal::Map;

use super::records::{CopyRecord, CopyStage, RemoteInfo, SendRecord, SendStage};
use super::{BASE_MIRROR, DRAIN_TIMEOUT, Remote, lock};

/// How often a running mirror's health is checked.
const WATCH_EVERY: Duration = Duration::from_secs(1);
/// How long a copy that worked waits for the destination to let go of its datapath (the
/// destination restarting, say) before the copy counts as failed.
const RELEASE_COPY_DP_FOR: Duration = Duration::from_secs(60);
/// How long a failed copy's undo is retried on a destination that cannot be reached.
const UNDO_COPY_FOR: Duration = Duration::from_secs(3600);
/// How long the switch-over keeps asking a destination that does not answer to finalize
/// (a host restart takes seconds); the guest's detach waits for it meanwhile.
const FINALIZE_RETRY_FOR: Duration = Duration::from_secs(60);
/// The same after a restart of this host, in the background (no caller waits).
const FINALIZE_RECOVER_FOR: Duration = Duration::from_secs(600);
/// What a failed finalize leaves, said with its error (`{id}`: the mirror). The caller
/// decides, as xapi's orchestrator does after a failed migration; the source VDI still holds
/// the guest's disk.
const FINALIZE_FAILED_HINT: &str = "; the mirror is marked failed and the source VDI is the guest's disk, deactivated (activate it again, sxm vdi attach, for its guest to go on here): DATA.MIRROR.stop {id} (sxm mirror stop {id}) undoes the migration on both hosts";

/// Why a mirror of `vdi` being finalized cannot be stopped: `VDI_IN_USE`, as xapi's callers
/// know a disk another operation holds (it was an `Internal_error`, which reads as a fault).
fn being_finalized(id: &str, vdi: &str) -> StorageError {
    crate::backend::errors::in_use(
        vdi,
        &format!("mirror {id} is being finalized (the source VDI was detached and the destination is taking over); it cannot be stopped now: wait for the finalize to end"),
    )
}

/// [`FINALIZE_FAILED_HINT`] for mirror `id`.
pub(super) fn finalize_failed_hint(id: &str) -> String {
    FINALIZE_FAILED_HINT.replace("{id}", id)
}
/// A VDI reset at each boot (non-persistent) does not move live: its reset point would not
/// travel with it, as xapi refuses (`VDI_ON_BOOT_MODE_INCOMPATIBLE_WITH_OPERATION`).
pub(crate) fn refuse_non_persistent(info: &VdiInfo) -> Result<(), StorageError> {
    if info.persistent {
        return Ok(());
    }
    Err(StorageError::BackendError(
        "VDI_ON_BOOT_MODE_INCOMPATIBLE_WITH_OPERATION".into(),
        vec![info.vdi.clone(), "a non-persistent VDI (reset at each boot) cannot migrate; VDI.set_persistent true first".into()],
    ))
}

/// How long `DATA.MIRROR.stop` of a mirror still starting waits for its rollback.
const STOP_WAITS_FOR: Duration = Duration::from_secs(60);

/// Why a mirror of `vdi` cannot start while the send `old` of it is there: `VDI_IN_USE`, as
/// xapi's callers know a disk another operation holds.
fn mirrored_already(old: &SendRecord, vdi: &str) -> StorageError {
    let id = &old.id;
    let in_use = |why: String| crate::backend::errors::in_use(vdi, &why);
    if old.cancelling {
        return in_use(format!(
            "VDI {vdi}'s last mirror ({id}) failed and its destination {} has not yet answered the cancel of its side; DATA.MIRROR.stop {id} gives up on it",
            Remote::new(&old.url).map(|r| r.endpoint.to_string()).unwrap_or_default()
        ));
    }
    if old.failed {
        return in_use(format!(
            "VDI {vdi}'s mirror {id} failed and is still there: DATA.MIRROR.stop {id} (sxm mirror stop) undoes it on both hosts, then start again"
        ));
    }
    in_use(format!("VDI {vdi} is already being mirrored (mirror {id})"))
}

fn dbg(id: &str) -> String {
    format!("mirror {id}")
}

/// Which stage failed, and so which error and which rollback.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Failed {
    /// The destination answered the prepare with an error: it undid its own side.
    Prepare,
    /// The prepare's answer was lost (or the host restarted during it): the destination may
    /// hold a prepared receive, so it is told to cancel.
    PrepareUnknown,
    PassFds,
    Snapshot,
    Copy,
    /// The SMAPIv3 full mirror's stage.
    Mirror,
}

fn stage_error(stage: Failed, e: &StorageError) -> StorageError {
    if let StorageError::Cancelled(_) = e {
        return e.clone();
    }
    let text = match e {
        StorageError::MigrationPreparationFailure(t)
        | StorageError::MigrationMirrorFdFailure(t)
        | StorageError::MigrationMirrorSnapshotFailure(t)
        | StorageError::MigrationMirrorCopyFailure(t)
        | StorageError::MigrationMirrorFailure(t) => t.clone(),
        other => other.to_string(),
    };
    match stage {
        Failed::Prepare | Failed::PrepareUnknown => StorageError::MigrationPreparationFailure(text),
        Failed::PassFds => StorageError::MigrationMirrorFdFailure(text),
        Failed::Snapshot => StorageError::MigrationMirrorSnapshotFailure(text),
        Failed::Copy => StorageError::MigrationMirrorCopyFailure(text),
        Failed::Mirror => StorageError::MigrationMirrorFailure(text),
    }
}

/// Why a mirror in `status` is lost while its disk is copied; `None` if it is sound.
fn lost_mirror(status: &MirrorStatus) -> Option<StorageError> {
    match status.state {
        MirrorHealth::Ready | MirrorHealth::Syncing => None,
        MirrorHealth::Failed => Some(StorageError::MigrationMirrorFailure(format!(
            "the destination stopped taking the mirror while the disk was copied{}",
            failure_text(status)
        ))),
        MirrorHealth::None => Some(StorageError::MigrationMirrorFailure(
            "the source datapath lost the mirror while the disk was copied (its process died and was restarted)".into(),
        )),
    }
}

/// `": WHY"` when the datapath said why its mirror failed (a full destination's ENOSPC, say,
/// which an operator must tell from a network cut), else nothing.
fn failure_text(status: &MirrorStatus) -> String {
    status.failure.as_deref().map(|f| format!(": {f}")).unwrap_or_default()
}

impl Mux {
    pub(super) fn me(&self) -> Result<Arc<Mux>, StorageError> {
        self.me.upgrade().ok_or_else(|| StorageError::InternalError("the host is shutting down".into()))
    }

    fn update_send(&self, id: &str, f: impl FnOnce(&mut SendRecord)) -> Result<SendRecord, StorageError> {
        let mut table = lock(&self.records.sends);
        let mut r = table.get(id).cloned().ok_or_else(|| StorageError::DoesNotExist("mirror".into(), id.into()))?;
        f(&mut r);
        table.put(r.clone())?;
        Ok(r)
    }

    /// `DATA.MIRROR.start`: checks what can be checked at once, records the send, and runs
    /// the stages in a task. Answers the task's id.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn mirror_start(
        &self,
        sr: String,
        vdi: String,
        dp: String,
        url: String,
        dest_sr: String,
        mirror_vm: Option<String>,
        copy_vm: Option<String>,
    ) -> Result<String, StorageError> {
        let id = format!("{sr}/{vdi}");
        self.attached_entry(&sr)?;
        if let Some(old) = lock(&self.records.sends).get(&id) {
            return Err(mirrored_already(old, &vdi));
        }
        Remote::new(&url)?;
        refuse_non_persistent(&self.local::<VdiInfo>(Call::VdiStat(args::VdiStat { vdi: vdi.clone(), sr: sr.clone(), dbg: dbg(&id) })).await?)?;
        // Checked here, before the destination prepares anything: the mirror is attached to
        // the datapath that serves the guest, and a VDI with none fails at the fd stage after a
        // whole prepare and its undo on the destination.
        if !self.active_writer(&sr, &vdi) {
            return Err(StorageError::MigrationPreparationFailure(format!(
                "VDI {vdi} is not attached read-write and active on this host: a live mirror carries a running guest's writes (DATA.copy moves a VDI nobody writes)"
            )));
        }
        let full_mirror = self.backend_for_sr(&sr)?.smapi_version() >= 3;
        let (task, cancel) = self.tasks().create(&dbg(&id));
        let record = SendRecord {
            id: id.clone(),
            sr,
            vdi,
            dp,
            url,
            dest_sr,
            // Older callers name no VM slices: one per mirror, as xapi makes them.
            mirror_vm: mirror_vm.unwrap_or_else(|| format!("MIR{}", &uuid::Uuid::new_v4().simple().to_string()[..6])),
            copy_vm: copy_vm.unwrap_or_else(|| format!("CP{}", &uuid::Uuid::new_v4().simple().to_string()[..6])),
            stage: SendStage::Prepare,
            remote: None,
            snapshot: None,
            copy_dp: None,
            task: task.clone(),
            failed: false,
            failure: None,
            full_mirror,
            cancelling: false,
            stopping: false,
        };
        // Written before the destination hears of it (xapi's CA-244573); looked for again under
        // the same lock, for a start of the same VDI made meanwhile: two racing starts both
        // passed the look above, shared one record, and failed both, the destination keeping
        // the prepared receive of one for good.
        {
            let mut sends = lock(&self.records.sends);
            let refused = match sends.get(&id) {
                Some(old) => Err(mirrored_already(old, &record.vdi)),
                None => sends.put(record),
            };
            if let Err(e) = refused {
                drop(sends);
                let _ = self.tasks().destroy(&task);
                return Err(e);
            }
        }
        self.tasks().debug_info(&task, "mirror", &id);
        let me = self.me()?;
        let task_id = task.clone();
        tokio::spawn(async move {
            let outcome = me.run_send(&id, &task_id, &cancel).await;
            match outcome {
                Ok(()) => {
                    tracing::info!(mirror = %id, "mirror established: copy done, mirroring until finalize");
                    me.tasks().complete(&task_id, Some(TaskResult::MirrorId(id.clone())));
                    me.watch(id.clone());
                }
                Err(e) => {
                    tracing::warn!(mirror = %id, error = %e, "mirror failed");
                    me.tasks().fail(&task_id, &e);
                }
            }
            me.tasks().changed(Dynamic::Mirror(id));
        });
        Ok(task)
    }

    fn stage(&self, task: &str, stage: &str, progress: f64) {
        self.tasks().debug_info(task, "stage", stage);
        self.tasks().progress(task, progress);
    }

    async fn run_send(&self, id: &str, task: &str, cancel: &CancellationToken) -> Result<(), StorageError> {
        // Failed meanwhile: its VDI stopped taking I/O (see `before_deactivate`).
        let deactivated = || lock(&self.records.sends).get(id).is_some_and(|r| r.failed);
        const DEACTIVATED: &str = "the VDI was deactivated while its mirror started";
        let check = |stage| {
            if deactivated() {
                return Err((stage, StorageError::MigrationMirrorFailure(DEACTIVATED.into())));
            }
            if cancel.is_cancelled() {
                return Err((stage, StorageError::Cancelled(task.to_owned())));
            }
            Ok(())
        };
        let result: Result<(), (Failed, StorageError)> = async {
            check(Failed::Prepare)?;
            self.stage(task, "prepare", 0.02);
            self.send_prepare(id).await.map_err(|(e, answered)| (if answered { Failed::Prepare } else { Failed::PrepareUnknown }, e))?;
            // The stage first: a check that fails names it, and the task should too.
            self.stage(task, "pass fds", 0.05);
            check(Failed::PassFds)?;
            self.send_pass_fds(id).await.map_err(|e| (Failed::PassFds, e))?;
            if lock(&self.records.sends).get(id).is_some_and(|r| r.full_mirror) {
                // SMAPIv3: one stage copies everything and mirrors new writes until ready.
                self.stage(task, "mirror", 0.08);
                check(Failed::Mirror)?;
                self.send_full_mirror(id, task, cancel).await.map_err(|e| (Failed::Mirror, e))?;
                check(Failed::Mirror)?;
                self.stage(task, "mirror", 1.0);
                return Ok(());
            }
            self.stage(task, "snapshot", 0.08);
            check(Failed::Snapshot)?;
            self.send_snapshot(id).await.map_err(|e| (Failed::Snapshot, e))?;
            self.stage(task, "copy", 0.10);
            check(Failed::Copy)?;
            self.send_copy(id, task, cancel).await.map_err(|e| (Failed::Copy, e))?;
            // A cancel that came during the copy's last step still undoes it.
            check(Failed::Copy)?;
            // The mirror carried every write while the copy ran, or the copy is worth nothing:
            // a datapath that died meanwhile came back without it, and a target that went away
            // failed it. Either way the task must not say the mirror is established.
            self.mirror_sound(id).await.map_err(|e| (Failed::Copy, e))?;
            self.stage(task, "mirror", 1.0);
            Ok(())
        }
        .await;
        let Err((stage, e)) = result else { return Ok(()) };
        // A deactivation cancels the task to stop its copy: the cancel is the deactivation's.
        let e = match e {
            StorageError::Cancelled(_) if deactivated() => StorageError::MigrationMirrorFailure(DEACTIVATED.into()),
            e => e,
        };
        let e = stage_error(stage, &e);
        self.roll_back_send(id, stage).await;
        Err(e)
    }

    /// Asks the destination to prepare. An error says whether the destination answered it.
    async fn send_prepare(&self, id: &str) -> Result<(), (StorageError, bool)> {
        let here = |e: StorageError| (e, true);
        crate::fault::point("send.prepare").await.map_err(here)?;
        let r = lock(&self.records.sends).get(id).cloned().ok_or_else(|| here(StorageError::DoesNotExist("mirror".into(), id.into())))?;
        let remote = Remote::new(&r.url).map_err(here)?;
        let mut info: VdiInfo = self.local(Call::VdiStat(args::VdiStat { vdi: r.vdi.clone(), sr: r.sr.clone(), dbg: dbg(id) })).await.map_err(here)?;
        // The destination prepares for our procedure by our image format.
        let format = self.backend_for_sr(&r.sr).map_err(here)?.image_format();
        info.sm_config.insert(super::IMAGE_FORMAT.to_owned(), format.to_owned());
        let similar: Vec<VdiInfo> =
            self.local(Call::VdiSimilarContent(args::VdiSimilarContent { vdi: r.vdi.clone(), sr: r.sr.clone(), dbg: dbg(id) })).await.map_err(here)?;
        let similar: Vec<String> = similar.into_iter().map(|v| v.content_id).filter(|c| !c.is_empty()).collect();
        let result: MirrorReceiveResult = remote
            .call_answered(Call::DataMirrorReceiveStart2(args::DataMirrorReceiveStart2 {
                vm: Some(r.mirror_vm.clone()),
                similar,
                id: id.to_owned(),
                vdi_info: info,
                sr: r.dest_sr.clone(),
                dbg: dbg(id),
            }))
            .await?;
        let remote_info = match (result, r.full_mirror) {
            (MirrorReceiveResult::VhdMirror(m), false) => {
                RemoteInfo { leaf: m.mirror_vdi.vdi, leaf_dp: m.mirror_datapath, parent: m.copy_diffs_to, copy_diffs_from: m.copy_diffs_from, dummy: m.dummy_vdi }
            }
            (MirrorReceiveResult::Smapiv3Mirror(m), true) => {
                RemoteInfo { leaf: m.mirror_vdi.vdi, leaf_dp: m.mirror_datapath, parent: String::new(), copy_diffs_from: None, dummy: String::new() }
            }
            (other, _) => {
                // The destination prepared for the other procedure: undo it there.
                let _ = remote.call::<()>(Call::DataMirrorReceiveCancel(args::DataMirrorReceiveCancel { id: id.to_owned(), dbg: dbg(id) })).await;
                return Err(here(StorageError::InternalError(format!("the destination prepared for the wrong procedure: {other:?}"))));
            }
        };
        self.update_send(id, |r| {
            r.remote = Some(remote_info);
            r.stage = SendStage::PassFds;
        })
        // The destination has prepared: undoing this must tell it.
        .map_err(|e| (e, false))?;
        Ok(())
    }

    async fn send_pass_fds(&self, id: &str) -> Result<(), StorageError> {
        let r = lock(&self.records.sends).get(id).cloned().ok_or_else(|| StorageError::DoesNotExist("mirror".into(), id.into()))?;
        let remote_info = r.remote.clone().ok_or_else(|| StorageError::InternalError("no destination leaf".into()))?;
        let remote = Remote::new(&r.url)?;
        crate::fault::point("send.pass_fds").await?;
        // SMAPIv3 mirrors go through the proxy path, as xapi's do; SMAPIv1 mirrors through nbd.
        let conn = remote.connect_nbd(&r.mirror_vm, &r.dest_sr, &remote_info.leaf, &remote_info.leaf_dp, r.full_mirror).await?;
        let entry = self.attached_entry(&r.sr)?;
        let (vdi, export) = (r.vdi.clone(), remote_info.leaf.clone());
        let mode = if r.full_mirror { MirrorMode::Full } else { MirrorMode::Sync };
        // A full mirror of a job with a bandwidth limit is paced at its share from its first
        // byte: its background pass begins as it attaches.
        let share = if r.full_mirror { self.jobs.first_share(id) } else { None };
        self.run(&entry, true, move |b, ctx| b.vdi_mirror_attach(ctx, &vdi, conn, &export, mode, share.unwrap_or(0))).await?;
        self.update_send(id, |r| r.stage = if r.full_mirror { SendStage::FullMirror } else { SendStage::Snapshot })?;
        Ok(())
    }

    /// SMAPIv3: waits until the full mirror has copied everything (new writes are mirrored
    /// all along), reporting progress; a failed mirror fails the stage.
    async fn send_full_mirror(&self, id: &str, task: &str, cancel: &CancellationToken) -> Result<(), StorageError> {
        crate::fault::point("send.mirror").await?;
        let r = lock(&self.records.sends).get(id).cloned().ok_or_else(|| StorageError::DoesNotExist("mirror".into(), id.into()))?;
        let entry = self.attached_entry(&r.sr)?;
        let size = {
            let info: VdiInfo = self.local(Call::VdiStat(args::VdiStat { vdi: r.vdi.clone(), sr: r.sr.clone(), dbg: dbg(id) })).await?;
            info.virtual_size.max(1) as u64
        };
        loop {
            if cancel.is_cancelled() {
                return Err(StorageError::Cancelled(task.to_owned()));
            }
            let vdi = r.vdi.clone();
            let status = self.run(&entry, false, move |b, ctx| b.vdi_mirror_status(ctx, &vdi)).await?;
            // A failed mirror has nothing left to copy, and has not copied it: its progress stays
            // where the last healthy answer put it.
            if matches!(status.state, MirrorHealth::Syncing | MirrorHealth::Ready) {
                let done = size.saturating_sub(status.bytes_left);
                self.tasks().debug_info(task, "bytes_done", &done.to_string());
                self.tasks().debug_info(task, "bytes_total", &size.to_string());
                self.tasks().progress(task, 0.08 + 0.91 * done as f64 / size as f64);
            }
            match status.state {
                MirrorHealth::Ready => break,
                MirrorHealth::Failed => {
                    return Err(StorageError::MigrationMirrorFailure(format!("the destination stopped taking the mirror{}", failure_text(&status))));
                }
                MirrorHealth::None => return Err(StorageError::MigrationMirrorFailure("the mirror is gone from the datapath".into())),
                MirrorHealth::Syncing => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
        self.update_send(id, |r| r.stage = SendStage::Mirroring)?;
        Ok(())
    }

    /// Whether the source datapath still carries the send's mirror, healthy.
    async fn mirror_sound(&self, id: &str) -> Result<(), StorageError> {
        let status = self
            .send_mirror_status(id)
            .await
            .map_err(|e| StorageError::MigrationMirrorFailure(format!("the source datapath does not say how its mirror is: {e}")))?;
        lost_mirror(&status).map_or(Ok(()), Err)
    }

    /// Why the mirror is lost, if the source datapath says it is; `None` while it says it is
    /// sound, or says nothing (a datapath restarting answers again in a moment).
    async fn mirror_lost(&self, id: &str) -> Option<StorageError> {
        lost_mirror(&self.send_mirror_status(id).await.ok()?)
    }

    /// What the source datapath of send `id` says of its mirror.
    async fn send_mirror_status(&self, id: &str) -> Result<MirrorStatus, StorageError> {
        let r = lock(&self.records.sends).get(id).cloned().ok_or_else(|| StorageError::DoesNotExist("mirror".into(), id.into()))?;
        let entry = self.attached_entry(&r.sr)?;
        self.run(&entry, false, move |b, ctx| b.vdi_mirror_status(ctx, &r.vdi)).await
    }

    async fn send_snapshot(&self, id: &str) -> Result<(), StorageError> {
        let r = lock(&self.records.sends).get(id).cloned().ok_or_else(|| StorageError::DoesNotExist("mirror".into(), id.into()))?;
        crate::fault::point("send.snapshot").await?;
        let mut info: VdiInfo = self.local(Call::VdiStat(args::VdiStat { vdi: r.vdi.clone(), sr: r.sr.clone(), dbg: dbg(id) })).await?;
        info.sm_config = Map::from_iter([(BASE_MIRROR.to_owned(), id.to_owned())]);
        info.name_label = format!("{} (migration base)", info.name_label);
        let snap: VdiInfo = self.local(Call::VdiSnapshot(args::VdiSnapshot { vdi_info: info, sr: r.sr.clone(), dbg: dbg(id) })).await.map_err(|e| match e {
            StorageError::BackendError(code, _) if code == "SR_BACKEND_FAILURE_44" => StorageError::MigrationMirrorSnapshotFailure(format!("SR_SOURCE_SPACE_INSUFFICIENT:{}", r.sr)),
            other => other,
        })?;
        self.update_send(id, |r| {
            r.snapshot = Some(snap.vdi.clone());
            r.stage = SendStage::Copy;
        })?;
        Ok(())
    }

    async fn send_copy(&self, id: &str, task: &str, cancel: &CancellationToken) -> Result<(), StorageError> {
        let r = lock(&self.records.sends).get(id).cloned().ok_or_else(|| StorageError::DoesNotExist("mirror".into(), id.into()))?;
        let remote_info = r.remote.clone().ok_or_else(|| StorageError::InternalError("no destination parent".into()))?;
        let snapshot = r.snapshot.clone().ok_or_else(|| StorageError::InternalError("no snapshot to copy".into()))?;
        // The local VDI whose content the destination's parent was cloned from.
        let base = match &remote_info.copy_diffs_from {
            Some(content) => {
                let similar: Vec<VdiInfo> = self.local(Call::VdiSimilarContent(args::VdiSimilarContent { vdi: r.vdi.clone(), sr: r.sr.clone(), dbg: dbg(id) })).await?;
                similar.into_iter().find(|v| &v.content_id == content && v.vdi != r.vdi).map(|v| v.vdi)
            }
            None => None,
        };
        crate::fault::point("send.copy").await?;
        let copy_dp = format!("copy-{}", uuid::Uuid::new_v4());
        self.update_send(id, |r| r.copy_dp = Some(copy_dp.clone()))?;
        // A job's disks share its bandwidth limit.
        let throttle = self.jobs.throttle_for(id);
        // The mirror is watched while the copy runs: a copy whose mirror is lost (its target
        // failed, or the datapath died and came back without it) is worth nothing, and a big
        // disk's copy would otherwise run to its end before `mirror_sound` said so.
        let copy_cancel = cancel.child_token();
        let report = {
            let copy = self.copy_to_remote(&r.sr, &snapshot, base.as_deref(), &r.url, &r.dest_sr, &remote_info.parent, &copy_dp, &r.copy_vm, task, &copy_cancel, throttle);
            tokio::pin!(copy);
            let mut lost = None;
            let copied = loop {
                tokio::select! {
                    copied = &mut copy => break copied,
                    () = tokio::time::sleep(WATCH_EVERY), if lost.is_none() => {
                        if let Some(e) = self.mirror_lost(id).await {
                            tracing::warn!(mirror = %id, error = %e, "the mirror is lost; stopping its copy");
                            lost = Some(e);
                            copy_cancel.cancel();
                        }
                    }
                }
            };
            match (lost, copied) {
                // The copy may have finished in the meantime: the mirror is lost all the same.
                (Some(e), _) => return Err(e),
                (None, copied) => copied?,
            }
        };
        tracing::info!(mirror = %id, data = report.data_bytes, zeroes = report.zero_bytes, size = report.size, "copy done");
        self.tasks().debug_info(task, "copied_bytes", &report.data_bytes.to_string());
        crate::fault::point("send.copied").await?;
        // The snapshot has served: the destination parent holds it.
        self.local::<()>(Call::VdiDestroy(args::VdiDestroy { vdi: snapshot, sr: r.sr.clone(), dbg: dbg(id) })).await?;
        self.update_send(id, |r| {
            r.snapshot = None;
            r.copy_dp = None;
            r.stage = SendStage::Mirroring;
        })?;
        Ok(())
    }

    /// Attaches `dest_vdi` on the destination on `dp`, copies local `vdi` (only what differs
    /// from `base`) into it over NBD, and detaches it again (also when the copy fails).
    #[allow(clippy::too_many_arguments)]
    async fn copy_to_remote(
        &self,
        sr: &str,
        vdi: &str,
        base: Option<&str>,
        url: &str,
        dest_sr: &str,
        dest_vdi: &str,
        dp: &str,
        vm: &str,
        task: &str,
        cancel: &CancellationToken,
        throttle: Option<crate::backend::Throttle>,
    ) -> Result<crate::backend::CopyStats, StorageError> {
        let remote = Remote::new(url)?;
        let _: crate::model::AttachInfo = remote
            .call(Call::VdiAttach3(args::VdiAttach3 { read_write: true, vdi: dest_vdi.into(), vm: Some(vm.into()), sr: dest_sr.into(), dp: dp.into(), dbg: dbg(vdi) }))
            .await?;
        let copied = async {
            remote.call::<()>(Call::VdiActivate3(args::VdiActivate3 { vdi: dest_vdi.into(), vm: Some(vm.into()), sr: dest_sr.into(), dp: dp.into(), dbg: dbg(vdi) })).await?;
            let conn = remote.connect_nbd(vm, dest_sr, dest_vdi, dp, true).await?;
            let entry = self.attached_entry(sr)?;
            let tasks = self.me()?;
            let (vdi, base, export, task, cancel) = (vdi.to_owned(), base.map(str::to_owned), dest_vdi.to_owned(), task.to_owned(), cancel.clone());
            self.run_unlocked(&entry, move |b, ctx| {
                // Reported a few times a second at most: each report is a change every
                // `UPDATES.get` watcher hears of.
                let last = std::sync::Mutex::new(None::<std::time::Instant>);
                let progress = |done: u64, total: u64| {
                    let mut last = last.lock().unwrap_or_else(|p| p.into_inner());
                    if total == 0 || (done < total && last.is_some_and(|t| t.elapsed() < Duration::from_millis(250))) {
                        return;
                    }
                    *last = Some(std::time::Instant::now());
                    tasks.tasks().progress(&task, 0.10 + 0.89 * done as f64 / total as f64);
                    tasks.tasks().subtask(&task, "copy", crate::model::TaskState::Pending(done as f64 / total as f64));
                    tasks.tasks().debug_info(&task, "bytes_done", &done.to_string());
                    tasks.tasks().debug_info(&task, "bytes_total", &total.to_string());
                };
                let ctl = crate::backend::CopyControl { progress: &progress, cancel: &cancel, throttle };
                b.vdi_copy_into(ctx, &vdi, base.as_deref(), conn, &export, &ctl)
            })
            .await
        }
        .await;
        // A test stalls here to take the destination away before its datapath is let go of.
        let _ = crate::fault::point("copy.written").await;
        // The destination datapath goes, whatever happened. After a copy that worked, it must:
        // it holds the VDI the next steps compose or hand over, so a destination restarting
        // just then is waited for (a failed copy's undo lets go of it anyway).
        let deadline = std::time::Instant::now() + RELEASE_COPY_DP_FOR;
        let mut wait = Duration::from_millis(250);
        // Cancelled, the undo lets go of the datapath (and the copy) anyway: asked here too, a
        // destination that hangs held the cancel for one more wait of the call's check.
        if copied.is_err() && cancel.is_cancelled() {
            return copied;
        }
        loop {
            match remote.call::<()>(Call::DpDestroy(args::DpDestroy { allow_leak: false, dp: dp.into(), dbg: dbg(vdi) })).await {
                Ok(()) => break,
                // Cancelled while waiting: the undo lets go of the datapath (and the copy) anyway.
                Err(e) if copied.is_ok() && cancel.is_cancelled() => {
                    tracing::info!(dp = %dp, error = %e, "cancelled while the destination had yet to let go of the copy's datapath");
                    return Err(StorageError::Cancelled(task.to_owned()));
                }
                Err(e) if copied.is_err() || std::time::Instant::now() >= deadline => {
                    tracing::warn!(dp = %dp, error = %e, "destroying the copy's destination datapath failed");
                    if copied.is_ok() {
                        return Err(StorageError::InternalError(format!("the copy is done, but the destination did not let go of its datapath {dp}: {e}")));
                    }
                    break;
                }
                Err(e) => {
                    tracing::warn!(dp = %dp, error = %e, "destroying the copy's destination datapath failed; retrying");
                    tokio::select! {
                        () = tokio::time::sleep(wait) => {}
                        () = cancel.cancelled() => {}
                    }
                    wait = (wait * 2).min(Duration::from_secs(5));
                }
            }
        }
        copied
    }

    /// Undoes a failed send as its stage says, each step's error logged and ignored. When the
    /// destination cannot be told, the record stays (`cancelling`) and the destination is told
    /// later.
    async fn roll_back_send(&self, id: &str, stage: Failed) {
        let Some(r) = lock(&self.records.sends).get(id).cloned() else { return };
        let remote_done = match stage {
            // The destination undid a prepare it failed itself.
            Failed::Prepare => true,
            // It may have prepared without our hearing back: it is told to cancel.
            Failed::PrepareUnknown => self.cancel_remote(&r).await,
            Failed::PassFds | Failed::Snapshot | Failed::Copy | Failed::Mirror => self.stop_send(&r).await,
        };
        self.end_send(id, remote_done);
    }

    /// Removes a send's record, or, when the destination still has to undo its side, keeps it
    /// marked `cancelling` and retries until it has.
    fn end_send(&self, id: &str, remote_done: bool) {
        if remote_done {
            if let Err(e) = lock(&self.records.sends).remove(id) {
                tracing::error!(mirror = %id, error = %e, "removing the send record failed");
            }
            return;
        }
        tracing::warn!(mirror = %id, "the destination could not be told to undo its side; retrying");
        let _ = self.update_send(id, |r| {
            r.cancelling = true;
            r.failed = true;
        });
        self.retry_cancel(id.to_owned());
    }

    /// Retries `receive_cancel` on the destination until it answers, then forgets the send.
    /// Ends when the record is gone or is another send's (a `stop` forgot this one and a new
    /// start of the same VDI took its id): that one's destination is never told to cancel.
    fn retry_cancel(&self, id: String) {
        let Ok(me) = self.me() else { return };
        let Some(task) = lock(&self.records.sends).get(&id).map(|r| r.task.clone()) else { return };
        tokio::spawn(async move {
            let mut wait = Duration::from_millis(500);
            loop {
                tokio::time::sleep(wait).await;
                let Some(r) = lock(&me.records.sends).get(&id).filter(|r| r.task == task && r.cancelling).cloned() else { return };
                if me.cancel_remote(&r).await {
                    let mut sends = lock(&me.records.sends);
                    if sends.get(&id).is_some_and(|r| r.task == task) {
                        let _ = sends.remove(&id);
                    }
                    drop(sends);
                    tracing::info!(mirror = %id, "the destination has undone its side");
                    me.tasks().changed(Dynamic::Mirror(id));
                    return;
                }
                wait = (wait * 2).min(Duration::from_secs(30));
            }
        });
    }

    async fn detach_mirror(&self, r: &SendRecord) {
        // A VDI no datapath holds (detached while its mirror started) has no mirror to detach:
        // asking logged a warning for what is expected there.
        if self.datapath_records(&r.sr, &r.vdi).is_empty() {
            return;
        }
        if let Ok(entry) = self.attached_entry(&r.sr) {
            let vdi = r.vdi.clone();
            match self.run(&entry, true, move |b, ctx| b.vdi_mirror_detach(ctx, &vdi)).await {
                Ok(()) => {}
                Err(e) => tracing::warn!(mirror = %r.id, error = %e, "detaching the mirror failed"),
            }
        }
    }

    /// Tells the destination to undo its side. True when it has (or had nothing to undo).
    async fn cancel_remote(&self, r: &SendRecord) -> bool {
        let Ok(remote) = Remote::new(&r.url) else { return true };
        if let Some(dp) = &r.copy_dp {
            // The copy's datapath holds the parent: it goes first. A destination away (down, or
            // hung: the call waited out its check) is not asked the rest now, each call waiting
            // out its own check in turn (a cancel then took a minute and a half); the caller
            // asks again later, from here.
            if let Err((e, true)) = remote.call_away::<()>(Call::DpDestroy(args::DpDestroy { allow_leak: true, dp: dp.clone(), dbg: dbg(&r.id) })).await {
                tracing::warn!(mirror = %r.id, error = %e, "the destination is away; its side is undone once it answers");
                return false;
            }
        }
        match remote.call::<()>(Call::DataMirrorReceiveCancel(args::DataMirrorReceiveCancel { id: r.id.clone(), dbg: dbg(&r.id) })).await {
            Ok(()) | Err(StorageError::DoesNotExist(..)) => {}
            Err(e) => {
                tracing::warn!(mirror = %r.id, error = %e, "receive_cancel on the destination failed");
                return false;
            }
        }
        // The cancel destroys the leaf of a receive the destination still knows. One it no
        // longer knows, while this send still stands, was finalized by another than this
        // send: a finalize whose answer never came (the destination stopped answering, then
        // did it), or one a caller sent out of step after the mirror failed. Either left the
        // leaf there as a finished VDI lacking what the guest wrote since, which the cancel
        // (answering a receive it does not know as done) no longer knows: it goes too.
        if let Some(m) = &r.remote {
            match remote.call::<()>(Call::VdiDestroy(args::VdiDestroy { vdi: m.leaf.clone(), sr: r.dest_sr.clone(), dbg: dbg(&r.id) })).await {
                Ok(()) => tracing::warn!(mirror = %r.id, vdi = %m.leaf, "destroyed the destination VDI a finalize this send did not make (or never heard of) left"),
                Err(StorageError::VdiDoesNotExist(_)) => {}
                Err(e) => {
                    tracing::warn!(mirror = %r.id, vdi = %m.leaf, error = %e, "destroying the destination VDI a finalize this send did not make left failed");
                    return false;
                }
            }
        }
        true
    }

    /// xapi's `stop`: the mirror stops, every local VDI the send made (the snapshot) goes,
    /// and the destination cancels its receive. True when the destination has.
    async fn stop_send(&self, r: &SendRecord) -> bool {
        self.undo_send_here(r).await;
        self.cancel_remote(r).await
    }

    /// Undoes this host's side of a send: its mirror, and the migration snapshot it made.
    async fn undo_send_here(&self, r: &SendRecord) {
        self.detach_mirror(r).await;
        if let Ok(vdis) = self.local::<Vec<VdiInfo>>(Call::SrScan(args::SrScan { sr: r.sr.clone(), dbg: dbg(&r.id) })).await {
            for v in vdis.into_iter().filter(|v| v.sm_config.get(BASE_MIRROR) == Some(&r.id) && v.vdi != r.vdi) {
                if let Err(e) = self.local::<()>(Call::VdiDestroy(args::VdiDestroy { vdi: v.vdi.clone(), sr: r.sr.clone(), dbg: dbg(&r.id) })).await {
                    tracing::warn!(mirror = %r.id, vdi = %v.vdi, error = %e, "destroying the migration snapshot failed");
                }
            }
        }
    }

    /// `DATA.MIRROR.stop`.
    pub(crate) async fn mirror_stop(&self, id: &str) -> Result<(), StorageError> {
        let r = lock(&self.records.sends).get(id).cloned().ok_or_else(|| StorageError::DoesNotExist("mirror".into(), id.into()))?;
        if r.cancelling {
            // Failed, and its destination has not answered the cancel yet: one more try, then
            // the record goes whatever the answer (as xapi's stop forgets the mirror), so a
            // destination gone for good never keeps the VDI from migrating again.
            if !self.cancel_remote(&r).await {
                tracing::warn!(mirror = %id, url = %Remote::new(&r.url).map(|r| r.endpoint.to_string()).unwrap_or_default(),
                    "stop gives up on telling the destination to cancel; it may keep a leftover receive");
            }
            lock(&self.records.sends).remove(id)?;
            self.tasks().changed(Dynamic::Mirror(id.to_owned()));
            return Ok(());
        }
        if r.stage == SendStage::Finalizing && !r.failed {
            // Its source VDI is deactivated and the destination is being told to take over:
            // undoing the destination's side now would leave the switch-over with no disk.
            return Err(being_finalized(id, &r.vdi));
        }
        if r.stage.is_starting() {
            // Still in its task: cancelling the task rolls it back; the stop answers once it
            // has (as xapi's stop of a mirror still starting kills its task and waits).
            let _ = self.tasks().cancel(&r.task);
            let until = std::time::Instant::now() + STOP_WAITS_FOR;
            while lock(&self.records.sends).get(id).is_some_and(|s| s.task == r.task && !s.cancelling) {
                if std::time::Instant::now() >= until {
                    return Err(StorageError::InternalError(format!(
                        "mirror {id} is still starting (stage {:?}): its task was cancelled, and is still rolling back",
                        r.stage
                    )));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            self.tasks().changed(Dynamic::Mirror(id.to_owned()));
            tracing::info!(mirror = %id, "mirror stopped while starting");
            return Ok(());
        }
        // Said first, so that the watch does not take the mirror's going for a failure; and
        // under the lock the finalize claims the send under (`after_deactivate`), so that one
        // of the two wins: a stop that got in as the VDI was being deactivated went on to
        // destroy the destination VDI that deactivate had just finalized.
        let r = {
            let mut table = lock(&self.records.sends);
            let mut r = table.get(id).cloned().ok_or_else(|| StorageError::DoesNotExist("mirror".into(), id.into()))?;
            if r.stage == SendStage::Finalizing && !r.failed {
                return Err(being_finalized(id, &r.vdi));
            }
            r.stopping = true;
            table.put(r.clone())?;
            r
        };
        // A point for tests to race a deactivate against a stop under way.
        let _ = crate::fault::point("send.stopping").await;
        let remote_done = self.stop_send(&r).await;
        self.end_send(id, remote_done);
        self.tasks().changed(Dynamic::Mirror(id.to_owned()));
        tracing::info!(mirror = %id, "mirror stopped");
        Ok(())
    }

    /// `DATA.MIRROR.stat`.
    pub(crate) fn mirror_stat(&self, id: &str) -> Result<Mirror, StorageError> {
        let recv = lock(&self.records.recvs).get(id).cloned();
        let send = lock(&self.records.sends).get(id).cloned();
        let copy = lock(&self.records.copies).get(id).cloned();
        let mut state = Vec::new();
        if recv.is_some() {
            state.push(MirrorState::Receiving);
        }
        if send.is_some() {
            state.push(MirrorState::Sending);
        }
        if copy.is_some() {
            state.push(MirrorState::Copying);
        }
        let (source_vdi, dest_vdi) = match (&recv, &send, &copy) {
            (Some(r), _, _) => (r.remote_vdi.clone(), r.leaf.clone().unwrap_or_default()),
            (None, Some(s), _) => (s.vdi.clone(), s.remote.as_ref().map(|m| m.leaf.clone()).unwrap_or_default()),
            (None, None, Some(c)) => (c.vdi.clone(), c.dest_vdi.clone().unwrap_or_default()),
            (None, None, None) => return Err(StorageError::DoesNotExist("mirror".into(), id.into())),
        };
        Ok(Mirror { failed: send.is_some_and(|s| s.failed), state, dest_vdi, source_vdi })
    }

    /// `DATA.MIRROR.list`.
    pub(crate) fn mirror_list(&self) -> Map<Mirror> {
        let mut ids: Vec<String> = lock(&self.records.sends).all().map(|r| r.id.clone()).collect();
        ids.extend(lock(&self.records.recvs).all().map(|r| r.id.clone()));
        // A failed copy's pending undo is no copy any more.
        ids.extend(lock(&self.records.copies).all().filter(|r| r.stage != CopyStage::Undoing).map(|r| r.id.clone()));
        ids.sort();
        ids.dedup();
        ids.into_iter().filter_map(|id| self.mirror_stat(&id).ok().map(|m| (id, m))).collect()
    }

    /// Watches a running mirror: a failed target marks the send failed and tells
    /// `UPDATES.get` watchers. Ends when the send does.
    pub(crate) fn watch(&self, id: String) {
        let Ok(me) = self.me() else { return };
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(WATCH_EVERY).await;
                let Some(r) = lock(&me.records.sends).get(&id).cloned() else { return };
                if r.failed || r.stopping || r.stage != SendStage::Mirroring {
                    return;
                }
                let Ok(entry) = me.attached_entry(&r.sr) else { continue };
                let vdi = r.vdi.clone();
                match me.run(&entry, false, move |b, ctx| b.vdi_mirror_status(ctx, &vdi)).await {
                    // `None`: the datapath's process died and was restarted without it.
                    // A stop that began while the datapath was asked is the mirror's going.
                    Ok(_) if lock(&me.records.sends).get(&id).is_none_or(|r| r.stopping) => return,
                    Ok(s) if s.state == MirrorHealth::Failed || s.state == MirrorHealth::None => {
                        tracing::error!(mirror = %id, state = ?s.state, failure = ?s.failure, "the mirror's target failed, or the datapath lost it; the guest goes on locally");
                        let why = match (s.state, s.failure) {
                            (MirrorHealth::None, _) => "the datapath process died, and was started again without its mirror".to_owned(),
                            (_, Some(f)) => f,
                            (_, None) => "the datapath gave no reason".to_owned(),
                        };
                        let _ = me.update_send(&id, |r| {
                            r.failed = true;
                            r.failure = Some(why.clone());
                        });
                        // The task that started it says so too (xapi marks its task `mirror_failed`).
                        me.tasks().debug_info(&r.task, "mirror_failed", "true");
                        me.tasks().debug_info(&r.task, "mirror_failure", &why);
                        me.tasks().changed(Dynamic::Mirror(id.clone()));
                        return;
                    }
                    Ok(_) => {}
                    Err(e) => tracing::debug!(mirror = %id, error = %e, "mirror status unavailable"),
                }
            }
        });
    }

    /// Before the source VDI stops taking I/O: a VDI that carries a running mirror is drained
    /// (nothing outstanding on either side) and its mirror checked. Answers the send to
    /// finalize once the VDI is deactivated, if any; a failed mirror is left for the caller
    /// to see (`DATA.MIRROR.stat`) and to `stop`.
    pub(crate) async fn before_deactivate(&self, sr: &str, vdi: &str) -> Option<SendRecord> {
        // A mirror still starting cannot be finished once its VDI stops taking I/O (the guest
        // shut down mid-migration): it is failed, and its task rolls it back when it next looks.
        // Its task is stopped too, so that a copy under way ends now rather than send a
        // snapshot nobody will use (`run_send` says why it failed, not that it was cancelled).
        let starting: Vec<(String, String)> = lock(&self.records.sends)
            .all()
            .filter(|r| r.sr == sr && r.vdi == vdi && r.stage.is_starting() && !r.failed)
            .map(|r| (r.id.clone(), r.task.clone()))
            .collect();
        for (id, task) in starting {
            tracing::warn!(mirror = %id, "the VDI stops taking I/O while its mirror starts; the mirror fails");
            let _ = self.update_send(&id, |r| r.failed = true);
            let _ = self.tasks().cancel(&task);
            self.tasks().changed(Dynamic::Mirror(id));
        }
        let r = lock(&self.records.sends).all().find(|r| r.sr == sr && r.vdi == vdi && r.stage == SendStage::Mirroring).cloned()?;
        if r.failed {
            return None;
        }
        let entry = self.attached_entry(sr).ok()?;
        let id = r.vdi.clone();
        let drained = self.run(&entry, true, move |b, ctx| b.vdi_drain(ctx, &id, DRAIN_TIMEOUT)).await;
        let id = r.vdi.clone();
        let status = self.run(&entry, false, move |b, ctx| b.vdi_mirror_status(ctx, &id)).await;
        let healthy = drained.is_ok() && matches!(&status, Ok(s) if s.state == MirrorHealth::Ready || s.state == MirrorHealth::Syncing);
        if !healthy {
            tracing::error!(mirror = %r.id, drained = ?drained.err(), status = ?status, "mirror not sound at finalize; not finalizing");
            let _ = self.update_send(&r.id, |r| r.failed = true);
            self.tasks().changed(Dynamic::Mirror(r.id.clone()));
            return None;
        }
        Some(r)
    }

    /// After the source VDI is deactivated: the destination composes its leaf onto the copied
    /// parent, synchronously (the VDI must not be used there before), and the send ends.
    pub(crate) async fn after_deactivate(&self, r: SendRecord) -> Result<(), StorageError> {
        // Recorded first: from here the mirror is gone on purpose, and a restart finishes the
        // finalize rather than watch a mirror that no longer exists. Unless a stop got in
        // first (`mirror_stop` sets `stopping` under the same lock): the mirror is then being
        // undone, the VDI is merely deactivated, and nothing is finalized.
        {
            let mut table = lock(&self.records.sends);
            match table.get(&r.id).cloned() {
                Some(mut s) if !s.stopping => {
                    s.stage = SendStage::Finalizing;
                    table.put(s)?;
                }
                _ => {
                    tracing::warn!(mirror = %r.id, "the mirror was stopped as its VDI was deactivated; not finalized");
                    return Ok(());
                }
            }
        }
        // A point for tests to kill the host with the stage recorded and the mirror attached.
        let _ = crate::fault::point("send.finalizing").await;
        self.detach_mirror(&r).await;
        self.finalize_remote(&r, false, FINALIZE_RETRY_FOR).await
    }

    /// Tells the destination to finalize `r`'s receive; the send ends when it has. After a
    /// restart here (`again`), a receive the destination no longer knows was finalized by the
    /// call whose answer the restart lost, or cancelled there: either way nothing is left to do
    /// on this side.
    async fn finalize_remote(&self, r: &SendRecord, again: bool, retry_for: Duration) -> Result<(), StorageError> {
        let ready = async {
            crate::fault::point("send.finalize").await?;
            Remote::new(&r.url)
        };
        let remote = match ready.await {
            Ok(remote) => remote,
            Err(e) => {
                // Failed as any finalize that fails: left unmarked, it could be neither
                // stopped ("being finalized") nor left alone by a restart, which finalized it
                // then, though its VDI had been activated and written here since.
                tracing::error!(mirror = %r.id, error = %e, "the finalize could not be made");
                let _ = self.update_send(&r.id, |s| s.failed = true);
                self.tasks().changed(Dynamic::Mirror(r.id.clone()));
                return Err(StorageError::MigrationMirrorFailure(format!("finalize: {e}{}", finalize_failed_hint(&r.id))));
            }
        };
        // A destination away (restarting) is asked again until it answers, for a while: the
        // source VDI is deactivated and the destination's receive intact, so giving up would
        // fail a migration that only has its last step left.
        let give_up = tokio::time::Instant::now() + retry_for;
        let (mut asked, mut wait) = (again, Duration::from_millis(500));
        let finalized = loop {
            let call = Call::DataMirrorReceiveFinalize2(args::DataMirrorReceiveFinalize2 { id: r.id.clone(), dbg: dbg(&r.id) });
            // Asked again when the host is away (restarting: refused or reset connections),
            // not when it stopped answering: that call waited its check out already, with a
            // job's guests paused meanwhile.
            use crate::http::CallErrorKind as K;
            match remote.call_classified::<()>(call, |k| matches!(k, Some(K::Connect(_) | K::Http(_) | K::Io(_) | K::Body(_) | K::Timeout(_)))).await {
                Err((e, true)) => {
                    // The last try is made at the deadline itself.
                    let left = give_up.saturating_duration_since(tokio::time::Instant::now());
                    if left.is_zero() {
                        break Err(e);
                    }
                    let pause = wait.min(left);
                    tracing::warn!(mirror = %r.id, error = %e, retry_in = ?pause, "the destination did not answer the finalize; asking again");
                    tokio::time::sleep(pause).await;
                    wait = (wait * 2).min(Duration::from_secs(10));
                    // The call may have been done there without our hearing back. (Nothing
                    // else cancels the receive meanwhile: `mirror_stop` refuses a send that is
                    // finalizing, so a receive gone there was finalized.)
                    asked = true;
                }
                other => break other.map_err(|(e, _)| e),
            }
        };
        // Past the destination's answer nothing can fail the finalize: a fault here can only
        // stall or kill the host (whose restart then finishes it).
        let _ = crate::fault::point("send.finalized").await;
        // Asked once, a receive the destination no longer knows was finalized there by another
        // caller's call (which waited for this source's mirror connection to close, as it did
        // at the deactivate) when its leaf stands finished: the migration's last step is done.
        let done_there = matches!(finalized, Err(StorageError::DoesNotExist(..))) && (asked || finished_there(&remote, r).await);
        match &finalized {
            Ok(()) => {
                lock(&self.records.sends).remove(&r.id)?;
                tracing::info!(mirror = %r.id, "finalized: the destination VDI is the guest's disk");
            }
            Err(StorageError::DoesNotExist(..)) if done_there => {
                lock(&self.records.sends).remove(&r.id)?;
                tracing::warn!(mirror = %r.id, "the destination no longer knows the receive (finalized or cancelled there); the send ends");
                self.tasks().changed(Dynamic::Mirror(r.id.clone()));
                return Ok(());
            }
            Err(e) => {
                tracing::error!(mirror = %r.id, error = %e, "receive_finalize2 failed");
                let _ = self.update_send(&r.id, |s| s.failed = true);
            }
        }
        self.tasks().changed(Dynamic::Mirror(r.id.clone()));
        finalized.map_err(|e| StorageError::MigrationMirrorFailure(format!("finalize on the destination failed: {e}{}", finalize_failed_hint(&r.id))))
    }

    /// `DATA.copy`: copies a VDI that is not being written into a new VDI of `dest_sr` on the
    /// host at `url`, in a task whose result is the new VDI.
    pub(crate) async fn data_copy(&self, sr: String, vdi: String, url: String, dest_sr: String) -> Result<String, StorageError> {
        let id = format!("copy/{sr}/{vdi}");
        self.attached_entry(&sr)?;
        // Held until the copy is recorded: an activate for a writer checks for the record, and
        // the copy checks for active writers, each in the VDI's turn, so one of them sees the
        // other.
        let turn = self.vdi_turn(&sr, &vdi).await;
        let earlier = lock(&self.records.copies).get(&id).cloned();
        match earlier {
            // A pending undo kept under the copy's own id (its re-keying failed): it moves
            // aside, still retried, and the new copy goes ahead.
            Some(r) if r.stage == CopyStage::Undoing => {
                let moved_id = format!("undo/{}", r.task);
                {
                    let mut copies = lock(&self.records.copies);
                    let mut moved = r.clone();
                    moved.id = moved_id.clone();
                    copies.put(moved)?;
                    copies.remove(&id)?;
                }
                self.retry_undo_copy(moved_id, r.task);
            }
            Some(_) => return Err(crate::backend::errors::in_use(&vdi, "DATA.copy")),
            None => {}
        }
        if self.active_writer(&sr, &vdi) {
            return Err(StorageError::BackendError("VDI_IN_USE".into(), vec![vdi.clone(), "DATA.copy is for VDIs no guest writes; use DATA.MIRROR.start".into()]));
        }
        Remote::new(&url)?;
        let (task, cancel) = self.tasks().create(&format!("copy {id}"));
        let record = CopyRecord { id: id.clone(), sr, vdi, url, dest_sr, stage: CopyStage::Prepare, dest_vdi: None, dest_dp: None, task: task.clone(), may_have_made: false };
        lock(&self.records.copies).put(record)?;
        drop(turn);
        let me = self.me()?;
        let task_id = task.clone();
        tokio::spawn(async move {
            match me.run_copy(&id, &task_id, &cancel).await {
                Ok(info) => {
                    me.tasks().complete(&task_id, Some(TaskResult::VdiInfo(Box::new(info))));
                    let _ = lock(&me.records.copies).remove(&id);
                }
                Err(e) => {
                    me.end_copy(&id).await;
                    me.tasks().fail(&task_id, &e);
                }
            }
            me.tasks().changed(Dynamic::Mirror(id));
        });
        Ok(task)
    }

    async fn run_copy(&self, id: &str, task: &str, cancel: &CancellationToken) -> Result<VdiInfo, StorageError> {
        let r = lock(&self.records.copies).get(id).cloned().ok_or_else(|| StorageError::DoesNotExist("copy".into(), id.into()))?;
        let remote = Remote::new(&r.url)?;
        let info: VdiInfo = self.local(Call::VdiStat(args::VdiStat { vdi: r.vdi.clone(), sr: r.sr.clone(), dbg: dbg(id) })).await?;
        self.stage(task, "prepare", 0.02);
        let mut dest_info = info.clone();
        dest_info.sm_config = Map::from_iter([(BASE_MIRROR.to_owned(), r.mark())]);
        // The copy is written through a datapath: a snapshot's copy is made writable.
        dest_info.read_only = false;
        // When the destination holds a VDI with the content of one near this one (an earlier
        // snapshot copied before), the copy starts as a clone of it and only differences
        // travel: a chain of snapshots copied oldest first arrives as a chain.
        let similar: Vec<VdiInfo> = self.local(Call::VdiSimilarContent(args::VdiSimilarContent { vdi: r.vdi.clone(), sr: r.sr.clone(), dbg: dbg(id) })).await?;
        let theirs: Vec<VdiInfo> = remote.call(Call::SrScan(args::SrScan { sr: r.dest_sr.clone(), dbg: dbg(id) })).await?;
        let nearest = similar.iter().filter(|v| !v.content_id.is_empty()).find_map(|mine| {
            theirs
                .iter()
                .find(|t| t.content_id == mine.content_id && t.virtual_size <= info.virtual_size && t.sm_config.get(BASE_MIRROR).is_none())
                .map(|t| (mine.vdi.clone(), t.clone()))
        });
        {
            let mut copies = lock(&self.records.copies);
            let mut rec = r.clone();
            rec.may_have_made = true;
            copies.put(rec)?;
        }
        let (made, base): (VdiInfo, Option<String>) = match nearest {
            Some((local_base, their_base)) => {
                let mut clone_info = their_base.clone();
                clone_info.sm_config = dest_info.sm_config.clone();
                clone_info.name_label = dest_info.name_label.clone();
                let made: VdiInfo = remote.call(Call::VdiClone(args::VdiClone { vdi_info: clone_info, sr: r.dest_sr.clone(), dbg: dbg(id) })).await?;
                if made.virtual_size != info.virtual_size {
                    let _: i64 = remote
                        .call(Call::VdiResize(args::VdiResize { new_size: info.virtual_size, vdi: made.vdi.clone(), sr: r.dest_sr.clone(), dbg: dbg(id) }))
                        .await?;
                }
                (made, Some(local_base))
            }
            None => (remote.call(Call::VdiCreate(args::VdiCreate { vdi_info: dest_info, sr: r.dest_sr.clone(), dbg: dbg(id) })).await?, None),
        };
        let dp = format!("copy-{}", uuid::Uuid::new_v4());
        {
            let mut copies = lock(&self.records.copies);
            let mut rec = r.clone();
            rec.dest_vdi = Some(made.vdi.clone());
            rec.dest_dp = Some(dp.clone());
            rec.stage = CopyStage::Copy;
            rec.may_have_made = true;
            copies.put(rec)?;
        }
        if cancel.is_cancelled() {
            return Err(StorageError::Cancelled(task.to_owned()));
        }
        self.stage(task, "copy", 0.10);
        // A cancel is taken up to the last step: until the copy's mark is off the destination
        // VDI, its undo destroys that VDI, and the task ends cancelled, not completed.
        let go_on = || if cancel.is_cancelled() { Err(StorageError::Cancelled(task.to_owned())) } else { Ok(()) };
        let report = self.copy_to_remote(&r.sr, &r.vdi, base.as_deref(), &r.url, &r.dest_sr, &made.vdi, &dp, "0", task, cancel, None).await?;
        tracing::info!(copy = %id, data = report.data_bytes, base = ?base, "copy done");
        self.tasks().debug_info(task, "copied_bytes", &report.data_bytes.to_string());
        go_on()?;
        crate::fault::point("copy.copied").await?;
        go_on()?;
        remote.call::<()>(Call::VdiSetContentId(args::VdiSetContentId { content_id: info.content_id.clone(), vdi: made.vdi.clone(), sr: r.dest_sr.clone(), dbg: dbg(id) })).await?;
        go_on()?;
        remote.call::<()>(Call::VdiRemoveFromSmConfig(args::VdiRemoveFromSmConfig { key: BASE_MIRROR.into(), vdi: made.vdi.clone(), sr: r.dest_sr.clone(), dbg: dbg(id) })).await?;
        let done: VdiInfo = remote.call(Call::VdiStat(args::VdiStat { vdi: made.vdi, sr: r.dest_sr.clone(), dbg: dbg(id) })).await?;
        self.stage(task, "done", 1.0);
        Ok(done)
    }

    /// Undoes a failed copy on the destination: its datapath goes, then every VDI the copy
    /// made there. True when the destination did all of it (or had nothing left).
    async fn undo_copy(&self, id: &str) -> bool {
        let Some(r) = lock(&self.records.copies).get(id).cloned() else { return true };
        if !r.may_have_made {
            return true;
        }
        let Ok(remote) = Remote::new(&r.url) else { return true };
        let mut done = true;
        if let Some(dp) = &r.dest_dp {
            match remote.call_away::<()>(Call::DpDestroy(args::DpDestroy { allow_leak: true, dp: dp.clone(), dbg: dbg(id) })).await {
                Ok(()) => {}
                // Away (down, or hung): the rest is asked when it answers again, rather than
                // each call waiting out its own check in turn now.
                Err((e, true)) => {
                    tracing::warn!(copy = %id, dp = %dp, error = %e, "the destination is away; the copy is undone there once it answers");
                    return false;
                }
                Err((e, false)) => {
                    tracing::warn!(copy = %id, dp = %dp, error = %e, "destroying the copy's destination datapath failed");
                    done = false;
                }
            }
        }
        // The recorded VDI, and any the copy made before it could record it (all carry its mark).
        let mut doomed: Vec<String> = r.dest_vdi.iter().cloned().collect();
        let mark = r.mark();
        match remote.call::<Vec<VdiInfo>>(Call::SrScan(args::SrScan { sr: r.dest_sr.clone(), dbg: dbg(id) })).await {
            Ok(theirs) => doomed.extend(
                theirs.into_iter().filter(|v| v.sm_config.get(BASE_MIRROR) == Some(&mark) && r.dest_vdi.as_ref() != Some(&v.vdi)).map(|v| v.vdi),
            ),
            // No such SR there: a copy makes no SR, so it made nothing there either (retrying
            // this for an hour kept the record and its secret for nothing).
            Err(StorageError::NoStoragePluginForSr(_)) => {}
            Err(_) => done = false,
        }
        for vdi in doomed {
            match remote.call::<()>(Call::VdiDestroy(args::VdiDestroy { vdi: vdi.clone(), sr: r.dest_sr.clone(), dbg: dbg(id) })).await {
                Ok(()) | Err(StorageError::VdiDoesNotExist(_)) => {}
                Err(e) => {
                    tracing::warn!(copy = %id, vdi = %vdi, error = %e, "destroying the half-copied destination VDI failed");
                    done = false;
                }
            }
        }
        done
    }

    /// Ends a failed copy: undone on the destination, its record goes; if the destination
    /// could not be reached, the record stays, `Undoing` under an id of its own
    /// (`undo/<task>`, so a new copy of the VDI never takes it over), and the undo is retried
    /// until it works, for up to [`UNDO_COPY_FOR`].
    async fn end_copy(&self, id: &str) {
        if self.undo_copy(id).await {
            let _ = lock(&self.records.copies).remove(id);
            return;
        }
        let Some((id, task)) = self.set_aside_for_undo(id) else {
            return;
        };
        tracing::warn!(copy = %id, "the destination could not undo the copy's side; retrying");
        self.retry_undo_copy(id, task);
    }

    /// Moves the record of copy `id` aside for its undo: `Undoing`, under `undo/<task>`, so that
    /// it no longer keeps its VDI from writers and a new copy of the VDI never takes it over.
    /// Answers the record's new id and its task.
    fn set_aside_for_undo(&self, id: &str) -> Option<(String, String)> {
        let mut copies = lock(&self.records.copies);
        let mut r = copies.get(id).cloned()?;
        let task = r.task.clone();
        r.stage = CopyStage::Undoing;
        r.id = format!("undo/{task}");
        let undo_id = r.id.clone();
        // The pending undo is written before the copy's record goes.
        match copies.put(r) {
            Ok(()) => {
                if undo_id != id {
                    let _ = copies.remove(id);
                }
                Some((undo_id, task))
            }
            Err(e) => {
                tracing::error!(copy = %id, error = %e, "recording the pending undo failed; it is retried from the copy's record");
                Some((id.to_owned(), task))
            }
        }
    }

    /// Has the destination at `url` let go of `dest_vdi` of `dest_sr` (and of datapath
    /// `dest_dp` there) once it answers: a job's disk finalized there before its switch-over
    /// failed, which the job could not destroy at once (the destination away). Recorded as a
    /// failed copy's pending undo, so that it is retried with backoff, across a restart of this
    /// host too, as those are; it left the VDI there for good.
    pub(super) fn undo_on_destination_later(&self, from: (&str, &str), url: &str, dest_sr: &str, dest_vdi: &str, dest_dp: &str, task: String) {
        let record = CopyRecord {
            id: format!("undo/{task}"),
            sr: from.0.to_owned(),
            vdi: from.1.to_owned(),
            url: url.to_owned(),
            dest_sr: dest_sr.to_owned(),
            stage: CopyStage::Undoing,
            dest_vdi: Some(dest_vdi.to_owned()),
            dest_dp: Some(dest_dp.to_owned()),
            task: task.clone(),
            may_have_made: true,
        };
        let id = record.id.clone();
        if let Err(e) = lock(&self.records.copies).put(record) {
            tracing::error!(vdi = %dest_vdi, error = %e, "recording the destination VDI's pending undo failed; it is retried until this host stops");
        }
        self.retry_undo_copy(id, task);
    }

    /// Retries the undo of the failed copy recorded as `id` (of task `task`) with backoff,
    /// until it works or [`UNDO_COPY_FOR`] has passed; then its record goes.
    fn retry_undo_copy(&self, id: String, task: String) {
        let Ok(me) = self.me() else { return };
        tokio::spawn(async move {
            let until = std::time::Instant::now() + UNDO_COPY_FOR;
            let mut wait = Duration::from_millis(500);
            loop {
                tokio::time::sleep(wait).await;
                // Gone (or, recorded under the copy's own id, another copy's record now).
                if !lock(&me.records.copies).get(&id).is_some_and(|r| r.task == task && r.stage == CopyStage::Undoing) {
                    return;
                }
                let done = me.undo_copy(&id).await;
                if done || std::time::Instant::now() >= until {
                    let mut copies = lock(&me.records.copies);
                    if copies.get(&id).is_some_and(|r| r.task == task) {
                        let _ = copies.remove(&id);
                    }
                    drop(copies);
                    if done {
                        tracing::info!(copy = %id, "the destination has undone the copy's side");
                    } else {
                        tracing::error!(copy = %id, "gave up undoing the copy on the destination; it may keep a half-copied VDI");
                    }
                    me.tasks().changed(Dynamic::Mirror(id));
                    return;
                }
                wait = (wait * 2).min(Duration::from_secs(30));
            }
        });
    }

    /// After a restart: sends still in their task are undone as their stage says (the task
    /// died with the old process); running mirrors are watched again; copies are undone.
    pub(crate) async fn recover_sends(&self) {
        let sends: Vec<SendRecord> = lock(&self.records.sends).all().cloned().collect();
        for r in sends {
            if r.cancelling {
                self.retry_cancel(r.id.clone());
                continue;
            }
            let stage = match r.stage {
                SendStage::Mirroring => {
                    tracing::info!(mirror = %r.id, "mirror taken up again");
                    self.watch(r.id.clone());
                    continue;
                }
                SendStage::Finalizing if r.failed => continue,
                SendStage::Finalizing => {
                    // In the background: the host must listen (and supervise its datapaths)
                    // while a destination that is away is asked again.
                    tracing::warn!(mirror = %r.id, "a finalize was interrupted; telling the destination again");
                    if let Ok(me) = self.me() {
                        tokio::spawn(async move {
                            // The stage is recorded before the mirror is detached: a restart
                            // in between left it attached in its datapath (which outlived this
                            // host), and the destination refuses a finalize while the mirror's
                            // connection stays open (a job's disks failed so, 10 s late). The
                            // VDI is deactivated and drained: nothing is left to mirror.
                            if let Ok(entry) = me.attached_entry(&r.sr)
                                && !me.datapath_records(&r.sr, &r.vdi).is_empty()
                            {
                                let vdi = r.vdi.clone();
                                if let Err(e) = me.run(&entry, true, move |b, ctx| b.vdi_mirror_detach(ctx, &vdi)).await {
                                    tracing::debug!(mirror = %r.id, error = %e, "no mirror left to detach");
                                }
                            }
                            if let Err(e) = me.finalize_remote(&r, true, FINALIZE_RECOVER_FOR).await {
                                tracing::error!(mirror = %r.id, error = %e, "finalize after a restart failed");
                            }
                        });
                    }
                    continue;
                }
                SendStage::Prepare => Failed::PrepareUnknown,
                SendStage::PassFds => Failed::PassFds,
                SendStage::Snapshot => Failed::Snapshot,
                SendStage::Copy => Failed::Copy,
                SendStage::FullMirror => Failed::Mirror,
            };
            tracing::warn!(mirror = %r.id, stage = ?r.stage, "a mirror was interrupted while starting; undoing it");
            // This host's side now, before it listens; the destination's in the background, as
            // after a cancel it did not answer: one that is slow or hung must not keep this host
            // from listening (a tester's slow destination held it 14 s, and a hung one would
            // hold it for the whole call timeout). Until it answers, the mirror is listed failed.
            if stage != Failed::PrepareUnknown {
                self.undo_send_here(&r).await;
            }
            let _ = self.update_send(&r.id, |r| {
                r.cancelling = true;
                r.failed = true;
            });
            self.retry_cancel(r.id.clone());
            self.tasks().changed(Dynamic::Mirror(r.id.clone()));
        }
        // In the background too: the undo is all on the destination, which may be away or
        // hung (three calls to a destination that took connections and never answered held
        // this host's start for a minute). Until it is done, the VDI counts as being copied.
        // Set aside first: the copy reads its VDI no more, so writers may have it while the
        // destination is away (it was kept from them, and a cancel advised that no task could
        // take, until the undo had failed once: a minute against a hung destination).
        let copies: Vec<String> = lock(&self.records.copies).all().map(|r| r.id.clone()).collect();
        for id in copies {
            tracing::warn!(copy = %id, "a copy was interrupted; undoing it");
            if let (Some((id, _)), Ok(me)) = (self.set_aside_for_undo(&id), self.me()) {
                tokio::spawn(async move { me.end_copy(&id).await });
            }
        }
    }

    /// Whether a `DATA.copy` of the VDI is under way (not a failed one's pending undo): it reads
    /// the VDI's image chain, which must neither go nor change size under it.
    pub(crate) fn being_copied(&self, sr: &str, vdi: &str) -> bool {
        lock(&self.records.copies).get(&format!("copy/{sr}/{vdi}")).is_some_and(|r| r.stage != CopyStage::Undoing)
    }

    /// A VDI of `sr` that a `DATA.copy` reads, if any.
    pub(crate) fn copied_in(&self, sr: &str) -> Option<String> {
        lock(&self.records.copies).all().find(|r| r.sr == sr && r.stage != CopyStage::Undoing).map(|r| r.vdi.clone())
    }

    /// Whether a datapath holds the VDI read-write and active.
    fn active_writer(&self, sr: &str, vdi: &str) -> bool {
        self.datapath_records(sr, vdi).iter().any(|r| r.active && r.read_write)
    }
}

/// Whether `r`'s leaf stands on its destination finished: there, and no longer marked as a
/// migration's (a finalize takes the mark off; a cancel destroys the leaf).
async fn finished_there(remote: &Remote, r: &SendRecord) -> bool {
    let Some(m) = &r.remote else { return false };
    match remote.call::<VdiInfo>(Call::VdiStat(args::VdiStat { vdi: m.leaf.clone(), sr: r.dest_sr.clone(), dbg: dbg(&r.id) })).await {
        Ok(v) => !v.sm_config.contains_key(BASE_MIRROR),
        Err(_) => false,
    }
}
