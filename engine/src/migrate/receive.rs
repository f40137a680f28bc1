//! The destination side: `DATA.MIRROR.receive_start` / `receive_start2` make a leaf for the
//! mirrored writes (made a differencing disk by a dummy snapshot), attach and activate it, and
//! a parent for the copy (a clone of the nearest VDI with similar content, so only differences
//! travel, or a new empty VDI); `receive_finalize2` layers the leaf onto the parent;
//! `receive_cancel` destroys all of it. Every VDI it makes carries `base_mirror = <id>` in its
//! sm_config, so an interrupted prepare can always be found and undone.

use std::os::fd::OwnedFd;
use std::time::Duration;

use crate::http::{HandoverError, NbdHandover, NbdRequest, Transport};
use crate::model::call::args;
use crate::model::{Call, Dynamic, MirrorReceiveResult, StorageError, VdiInfo, VhdMirror};
use crate::mux::Mux;
use crate::rpc::marshal::Map;

use super::records::{RecvRecord, RecvStage};
use super::{BASE_MIRROR, lock};

/// How long the undo of a receive that could not all be undone is tried again.
const RETRY_UNDO_RECEIVE_FOR: Duration = Duration::from_secs(600);

/// How long a finalize waits for the source's mirror connection to the leaf to close: it
/// closes as the source deactivates, just before the source asks for the finalize, and the
/// leaf's datapath may learn of it a moment after the call arrives (over TLS, through two
/// relays).
const MIRROR_GONE_WAIT: Duration = Duration::from_secs(10);

fn dbg(id: &str) -> String {
    format!("receive {id}")
}

impl Mux {
    /// `DATA.MIRROR.receive_start(2)`: prepares `sr` to receive VDI `info` of the source
    /// (mirror `id`). Any failure undoes what was made and answers
    /// `Migration_preparation_failure`.
    pub(crate) async fn receive_start(&self, sr: String, info: VdiInfo, id: String, similar: Vec<String>, vm: String) -> Result<MirrorReceiveResult, StorageError> {
        let _turn = self.receive_turn(&id).await;
        self.attached_entry(&sr)?;
        // Under the mirror's turn, a record here is never a prepare under way: a receive, or
        // the leftover of one whose undo is being retried.
        match lock(&self.records.recvs).get(&id) {
            Some(r) if r.stage == RecvStage::Preparing => {
                return Err(StorageError::MigrationPreparationFailure(format!(
                    "an earlier receive of mirror {id} is still being undone here (it is retried in the background); try again shortly"
                )));
            }
            Some(_) => return Err(StorageError::MigrationPreparationFailure(format!("mirror {id} is already being received"))),
            None => {}
        }
        let record = RecvRecord {
            id: id.clone(),
            sr: sr.clone(),
            remote_vdi: info.vdi.clone(),
            mirror_vm: vm.clone(),
            stage: RecvStage::Preparing,
            leaf: None,
            leaf_dp: None,
            dummy: None,
            parent: None,
            mirrored: Some(false),
        };
        // Written before anything is made: a restart finds it and undoes the prepare.
        lock(&self.records.recvs).put(record).map_err(|e| StorageError::MigrationPreparationFailure(e.to_string()))?;
        match self.prepare(&sr, &info, &id, &similar, &vm).await {
            Ok(result) => {
                tracing::info!(mirror = %id, sr = %sr, "receive prepared");
                self.tasks().changed(Dynamic::Mirror(id));
                Ok(result)
            }
            Err(e) => {
                tracing::warn!(mirror = %id, error = %e, "receive_start failed; undoing it");
                self.undo_receive_fully(&id).await;
                Err(match e {
                    StorageError::MigrationPreparationFailure(_) => e,
                    other => StorageError::MigrationPreparationFailure(other.to_string()),
                })
            }
        }
    }

    fn update_recv(&self, id: &str, f: impl FnOnce(&mut RecvRecord)) -> Result<(), StorageError> {
        let mut table = lock(&self.records.recvs);
        let mut r = table.get(id).cloned().ok_or_else(|| StorageError::DoesNotExist("mirror".into(), id.into()))?;
        f(&mut r);
        table.put(r)
    }

    async fn prepare(&self, sr: &str, info: &VdiInfo, id: &str, similar: &[String], vm: &str) -> Result<MirrorReceiveResult, StorageError> {
        // The source's image format picks the procedure: a VHD source snapshots, copies and
        // composes (SMAPIv1); any other runs one full mirror into one volume (SMAPIv3).
        let v1_source = match info.sm_config.get(super::IMAGE_FORMAT).map(String::as_str) {
            None | Some("vhd") => true,
            Some("qcow2" | "raw") => false,
            Some(other) => {
                return Err(crate::backend::errors::failure("invalid", format!("{} {other:?} is not an image format (vhd, qcow2 or raw)", super::IMAGE_FORMAT)));
            }
        };
        if !v1_source {
            return self.prepare_full_mirror(sr, info, id, vm).await;
        }
        let marked = |mut v: VdiInfo| {
            v.sm_config = Map::from_iter([(BASE_MIRROR.to_owned(), id.to_owned())]);
            v
        };
        // The leaf takes the mirrored writes.
        let mut leaf_info = marked(info.clone());
        leaf_info.is_a_snapshot = false;
        leaf_info.read_only = false;
        leaf_info.snapshot_of = String::new();
        let leaf: VdiInfo = self.local(Call::VdiCreate(args::VdiCreate { vdi_info: leaf_info, sr: sr.into(), dbg: dbg(id) })).await?;
        self.update_recv(id, |r| r.leaf = Some(leaf.vdi.clone()))?;
        crate::fault::point("recv.prepare").await?;
        // The dummy snapshot makes the leaf a differencing disk on an empty base, so that
        // finalize can put the copied parent under it.
        let dummy: VdiInfo = self.local(Call::VdiSnapshot(args::VdiSnapshot { vdi_info: marked(leaf.clone()), sr: sr.into(), dbg: dbg(id) })).await?;
        self.update_recv(id, |r| r.dummy = Some(dummy.vdi.clone()))?;
        let leaf_dp = uuid::Uuid::new_v4().to_string();
        self.update_recv(id, |r| r.leaf_dp = Some(leaf_dp.clone()))?;
        let _: crate::model::AttachInfo = self
            .local(Call::VdiAttach3(args::VdiAttach3 { read_write: true, vdi: leaf.vdi.clone(), vm: Some(vm.into()), sr: sr.into(), dp: leaf_dp.clone(), dbg: dbg(id) }))
            .await?;
        self.local::<()>(Call::VdiActivate3(args::VdiActivate3 { vdi: leaf.vdi.clone(), vm: Some(vm.into()), sr: sr.into(), dp: leaf_dp.clone(), dbg: dbg(id) })).await?;
        crate::fault::point("recv.attached").await?;

        // The parent: a clone of the nearest VDI holding similar content, or a new one.
        let vdis: Vec<VdiInfo> = self.local(Call::SrScan(args::SrScan { sr: sr.into(), dbg: dbg(id) })).await?;
        let nearest = similar.iter().filter(|c| !c.is_empty()).find_map(|c| {
            vdis.iter().find(|v| &v.content_id == c && v.virtual_size <= info.virtual_size && v.sm_config.get(BASE_MIRROR).is_none())
        });
        let (parent, copy_diffs_from) = match nearest {
            Some(base) => {
                let mut clone_info = marked(base.clone());
                clone_info.name_label = format!("{} (base)", info.name_label);
                let parent: VdiInfo = self.local(Call::VdiClone(args::VdiClone { vdi_info: clone_info, sr: sr.into(), dbg: dbg(id) })).await?;
                self.update_recv(id, |r| r.parent = Some(parent.vdi.clone()))?;
                if parent.virtual_size != info.virtual_size {
                    let _: i64 = self
                        .local(Call::VdiResize(args::VdiResize { new_size: info.virtual_size, vdi: parent.vdi.clone(), sr: sr.into(), dbg: dbg(id) }))
                        .await?;
                }
                (parent.vdi, Some(base.content_id.clone()))
            }
            None => {
                let mut parent_info = marked(VdiInfo::new("", format!("{} (base)", info.name_label)));
                parent_info.virtual_size = info.virtual_size;
                let parent: VdiInfo = self.local(Call::VdiCreate(args::VdiCreate { vdi_info: parent_info, sr: sr.into(), dbg: dbg(id) })).await?;
                self.update_recv(id, |r| r.parent = Some(parent.vdi.clone()))?;
                (parent.vdi, None)
            }
        };
        self.update_recv(id, |r| r.stage = RecvStage::Receiving)?;
        Ok(MirrorReceiveResult::VhdMirror(VhdMirror {
            dummy_vdi: dummy.vdi,
            copy_diffs_to: parent,
            copy_diffs_from,
            mirror_datapath: leaf_dp,
            mirror_vdi: leaf,
        }))
    }

    /// The SMAPIv3 prepare: one new volume, attached and active, that the source's full
    /// mirror fills.
    async fn prepare_full_mirror(&self, sr: &str, info: &VdiInfo, id: &str, vm: &str) -> Result<MirrorReceiveResult, StorageError> {
        let mut leaf_info = info.clone();
        leaf_info.sm_config = Map::from_iter([(BASE_MIRROR.to_owned(), id.to_owned())]);
        leaf_info.is_a_snapshot = false;
        leaf_info.read_only = false;
        leaf_info.snapshot_of = String::new();
        let leaf: VdiInfo = self.local(Call::VdiCreate(args::VdiCreate { vdi_info: leaf_info, sr: sr.into(), dbg: dbg(id) })).await?;
        self.update_recv(id, |r| r.leaf = Some(leaf.vdi.clone()))?;
        crate::fault::point("recv.prepare").await?;
        let leaf_dp = uuid::Uuid::new_v4().to_string();
        self.update_recv(id, |r| r.leaf_dp = Some(leaf_dp.clone()))?;
        let _: crate::model::AttachInfo = self
            .local(Call::VdiAttach3(args::VdiAttach3 { read_write: true, vdi: leaf.vdi.clone(), vm: Some(vm.into()), sr: sr.into(), dp: leaf_dp.clone(), dbg: dbg(id) }))
            .await?;
        self.local::<()>(Call::VdiActivate3(args::VdiActivate3 { vdi: leaf.vdi.clone(), vm: Some(vm.into()), sr: sr.into(), dp: leaf_dp.clone(), dbg: dbg(id) })).await?;
        crate::fault::point("recv.attached").await?;
        self.update_recv(id, |r| r.stage = RecvStage::Receiving)?;
        Ok(MirrorReceiveResult::Smapiv3Mirror(crate::model::Smapiv3Mirror { nbd_export: leaf.vdi.clone(), mirror_datapath: leaf_dp, mirror_vdi: leaf }))
    }

    /// Destroys what a receive made, each step's error logged and the rest done anyway (xapi's
    /// `receive_cancel`): the leaf's datapath, and every VDI of the SR that carries the
    /// mirror's mark (the leaf, dummy and parent, and one a crash made before it was recorded).
    /// The record goes when all of it went. Otherwise (a datapath the source opened on the
    /// parent in the meantime kept it in use) the record stays, as preparing, so that the
    /// source's next cancel or this host's restart finds it, and the undo is tried again here
    /// a few times ([`Mux::retry_undo_receive`]). True when nothing is left.
    async fn undo_receive(&self, id: &str) -> bool {
        let Some(r) = lock(&self.records.recvs).get(id).cloned() else { return true };
        let mut done = true;
        if let (Some(dp), Some(leaf)) = (&r.leaf_dp, &r.leaf)
            && let Err(e) = self
                .local::<()>(Call::DpDestroy2(args::DpDestroy2 { allow_leak: true, vm: Some(r.mirror_vm.clone()), vdi: leaf.clone(), sr: r.sr.clone(), dp: dp.clone(), dbg: dbg(id) }))
                .await
        {
            tracing::warn!(mirror = %id, error = %e, "undo: destroying the leaf's datapath failed");
            done = false;
        }
        let mut doomed: Vec<String> = [&r.dummy, &r.leaf, &r.parent].into_iter().flatten().cloned().collect();
        match self.local::<Vec<VdiInfo>>(Call::SrScan(args::SrScan { sr: r.sr.clone(), dbg: dbg(id) })).await {
            Ok(vdis) => {
                for v in vdis {
                    if v.sm_config.get(BASE_MIRROR).map(String::as_str) == Some(id) && !doomed.contains(&v.vdi) {
                        doomed.push(v.vdi);
                    }
                }
            }
            Err(e) => {
                tracing::warn!(mirror = %id, error = %e, "undo: scanning the SR failed");
                done = false;
            }
        }
        // Any datapath still holding one of them (the source's copy, cut off) lets go first.
        for vdi in &doomed {
            for d in self.datapath_records(&r.sr, vdi) {
                let call = Call::DpDestroy2(args::DpDestroy2 { allow_leak: true, vm: Some(d.vm.clone()), vdi: vdi.clone(), sr: r.sr.clone(), dp: d.dp.clone(), dbg: dbg(id) });
                if let Err(e) = self.local::<()>(call).await {
                    tracing::warn!(mirror = %id, dp = %d.dp, error = %e, "undo: destroying a datapath failed");
                }
            }
        }
        for vdi in doomed {
            match self.local::<()>(Call::VdiDestroy(args::VdiDestroy { vdi: vdi.clone(), sr: r.sr.clone(), dbg: dbg(id) })).await {
                Ok(()) | Err(StorageError::VdiDoesNotExist(_)) => {}
                Err(e) => {
                    tracing::warn!(mirror = %id, vdi = %vdi, error = %e, "undo: destroying a VDI failed");
                    done = false;
                }
            }
        }
        let kept = if done {
            lock(&self.records.recvs).remove(id)
        } else {
            self.update_recv(id, |r| r.stage = RecvStage::Preparing)
        };
        if let Err(e) = kept {
            tracing::error!(mirror = %id, error = %e, "undo: updating the receive record failed");
        }
        self.tasks().changed(Dynamic::Mirror(id.to_owned()));
        done
    }

    /// Undoes a receive, and when some of it could not be undone yet, tries again in the
    /// background (taking the mirror's turn each time) until it is, for up to
    /// [`RETRY_UNDO_RECEIVE_FOR`]; a restart undoes whatever is left then.
    async fn undo_receive_fully(&self, id: &str) {
        if !self.undo_receive(id).await
            && let Some(kept) = lock(&self.records.recvs).get(id).cloned()
        {
            self.retry_undo_receive(kept);
        }
    }

    /// Retries the undo of `kept`, for as long as the record is still that one: a cancel
    /// since may have finished it, and a new receive of the same mirror is not its to undo.
    fn retry_undo_receive(&self, kept: RecvRecord) {
        let Ok(me) = self.me() else { return };
        tokio::spawn(async move {
            let id = kept.id.clone();
            let until = tokio::time::Instant::now() + RETRY_UNDO_RECEIVE_FOR;
            let mut wait = Duration::from_millis(500);
            while tokio::time::Instant::now() < until {
                tokio::time::sleep(wait).await;
                let _turn = me.receive_turn(&id).await;
                if lock(&me.records.recvs).get(&id) != Some(&kept) {
                    tracing::info!(mirror = %id, "the receive whose undo was retried is gone; nothing more to do");
                    return;
                }
                if me.undo_receive(&id).await {
                    tracing::info!(mirror = %id, "what was left of the receive is undone");
                    return;
                }
                wait = (wait * 2).min(Duration::from_secs(30));
            }
            tracing::error!(mirror = %id, "gave up undoing the receive for now; a restart of this host tries again");
        });
    }

    /// `DATA.MIRROR.receive_cancel`.
    pub(crate) async fn receive_cancel(&self, id: &str) -> Result<(), StorageError> {
        crate::fault::point("recv.cancel").await?;
        let _turn = self.receive_turn(id).await;
        if lock(&self.records.recvs).get(id).is_none() {
            // Nothing to undo (never prepared, cancelled or finalized already): done, as in
            // xapi, so a source retrying a cancel whose answer it lost gets its answer.
            tracing::info!(mirror = %id, "receive_cancel of no receive; nothing to undo");
            return Ok(());
        }
        self.undo_receive_fully(id).await;
        tracing::info!(mirror = %id, "receive cancelled");
        Ok(())
    }

    /// The receive, made and under way, whose leaf (which takes the mirrored writes) or parent
    /// (which takes the copy) `vdi` of `sr` is, with which of the two it is. Until its finalize
    /// neither is the disk yet: the leaf lacks the copy and the parent the guest's writes, and
    /// a snapshot, a clone or another read-write attach of either would split them apart (a
    /// snapshot of the leaf lost every mirrored write at the finalize).
    pub(crate) fn receiving_into(&self, sr: &str, vdi: &str) -> Option<(String, &'static str)> {
        lock(&self.records.recvs).all().filter(|r| r.sr == sr && r.stage == RecvStage::Receiving).find_map(|r| {
            if r.leaf.as_deref() == Some(vdi) {
                Some((r.id.clone(), "leaf"))
            } else if r.parent.as_deref() == Some(vdi) {
                Some((r.id.clone(), "parent"))
            } else {
                None
            }
        })
    }

    /// `DATA.MIRROR.receive_finalize2` (with `compose`) and `receive_finalize` (G1 sources
    /// compose themselves): the leaf leaves its datapath and, composed onto the copied parent,
    /// becomes the migrated VDI.
    pub(crate) async fn receive_finalize(&self, id: &str, compose: bool) -> Result<(), StorageError> {
        let _turn = self.receive_turn(id).await;
        crate::fault::point("recv.finalize").await?;
        let r = lock(&self.records.recvs).get(id).cloned().ok_or_else(|| StorageError::DoesNotExist("mirror".into(), id.into()))?;
        let (Some(leaf), Some(dp)) = (r.leaf.clone(), r.leaf_dp.clone()) else {
            return Err(StorageError::InternalError(format!("mirror {id} was never fully prepared")));
        };
        // Refused before anything is undone: a refused finalize must leave the receive as it was
        // (one sent while the source still prepared took the leaf's datapath away, then was
        // refused at the compose, and the source's mirror failed).
        if r.mirrored == Some(false) {
            return Err(crate::backend::errors::in_use(
                &leaf,
                "its receive cannot be finalized before the source's mirror has connected to it: the source finalizes once its VDI is deactivated",
            ));
        }
        if compose
            && let Some(parent) = &r.parent
            && self.being_copied(&r.sr, parent)
        {
            return Err(crate::backend::errors::in_use(parent, "its receive cannot be finalized while the source's copy still fills it"));
        }
        self.wait_for_the_mirror_to_end(&r.sr, &leaf).await?;
        self.local::<()>(Call::DpDestroy2(args::DpDestroy2 { allow_leak: false, vm: Some(r.mirror_vm.clone()), vdi: leaf.clone(), sr: r.sr.clone(), dp, dbg: dbg(id) }))
            .await?;
        // A full mirror's volume is the VDI already; a SMAPIv1 leaf goes onto its parent.
        if compose && let Some(parent) = r.parent.clone() {
            self.local::<()>(Call::VdiCompose(args::VdiCompose { vdi2: leaf.clone(), vdi1: parent, sr: r.sr.clone(), dbg: dbg(id) })).await?;
            if let Some(dummy) = &r.dummy
                && let Err(e) = self.local::<()>(Call::VdiDestroy(args::VdiDestroy { vdi: dummy.clone(), sr: r.sr.clone(), dbg: dbg(id) })).await
            {
                tracing::warn!(mirror = %id, error = %e, "finalize: destroying the dummy failed");
            }
        }
        if compose {
            self.local::<()>(Call::VdiRemoveFromSmConfig(args::VdiRemoveFromSmConfig { key: BASE_MIRROR.into(), vdi: leaf.clone(), sr: r.sr.clone(), dbg: dbg(id) }))
                .await?;
        }
        lock(&self.records.recvs).remove(id)?;
        self.tasks().changed(Dynamic::Mirror(id.to_owned()));
        tracing::info!(mirror = %id, vdi = %leaf, "receive finalized");
        Ok(())
    }

    /// A finalize waits (up to [`MIRROR_GONE_WAIT`]) for the source's mirror connection to the
    /// leaf (handed to its datapath by `PUT /services/SM/nbd/…`) to close, as it does once the
    /// source's VDI is deactivated, and is refused while it stays open: finalized under a
    /// source still mirroring, the leaf lost every write made after, and was left behind as a
    /// VDI when the source then undid its mirror. Readers of the leaf (a read-only attach)
    /// connect to the datapath's own socket and do not count. A datapath that cannot be asked
    /// (gone) has no connection to wait for.
    async fn wait_for_the_mirror_to_end(&self, sr: &str, leaf: &str) -> Result<(), StorageError> {
        let Ok(entry) = self.attached_entry(sr) else { return Ok(()) };
        let deadline = tokio::time::Instant::now() + MIRROR_GONE_WAIT;
        loop {
            let vdi = leaf.to_owned();
            let open = match self.run(&entry, false, move |b, ctx| b.vdi_passed_connections(ctx, &vdi)).await {
                Ok(n) => n,
                Err(e) => {
                    tracing::debug!(vdi = %leaf, error = %e, "finalize: the leaf's connections could not be counted");
                    0
                }
            };
            if open == 0 {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(crate::backend::errors::in_use(
                    leaf,
                    &format!(
                        "its receive cannot be finalized while the source still mirrors into it ({open} mirror connections open after {} s): the source finalizes once its VDI is deactivated",
                        MIRROR_GONE_WAIT.as_secs()
                    ),
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `PUT /services/SM/nbd/<vm>/<sr>/<vdi>/<dp>`, before the `200`: the datapath must hold
    /// the VDI, active.
    fn nbd_check(&self, req: &NbdRequest) -> Result<(), StorageError> {
        self.attached_entry(&req.sr)?;
        match self.datapath_record(&req.dp, &req.sr, &req.vdi) {
            Some(r) if r.active => Ok(()),
            Some(_) => Err(StorageError::InternalError(format!("VDI {} is attached on datapath {} but not active", req.vdi, req.dp))),
            None => Err(StorageError::DoesNotExist("datapath".into(), format!("{} (for VDI {})", req.dp, req.vdi))),
        }
    }

    /// After the `200`: the connection goes to the VDI's datapath process.
    async fn nbd_take_over(&self, req: NbdRequest, conn: OwnedFd) {
        let Ok(entry) = self.attached_entry(&req.sr) else { return };
        let vdi = req.vdi.clone();
        if let Err(e) = self.run(&entry, false, move |b, ctx| b.vdi_serve_nbd(ctx, &vdi, conn)).await {
            // The caller learns it from the NBD handshake that never comes.
            tracing::error!(sr = %req.sr, vdi = %req.vdi, dp = %req.dp, error = %e, "handing an NBD connection to the datapath failed");
            return;
        }
        // The source's mirror reaches a receive's leaf: from here on it may be finalized, once
        // that connection closes. Recorded only now that the datapath counts it: recorded as
        // it was handed over, a finalize in between found no connection open, took it for one
        // that had ended, and finalized under a live mirror (a tester's find).
        if let Some((id, "leaf")) = self.receiving_into(&req.sr, &req.vdi) {
            let mut recvs = lock(&self.records.recvs);
            if let Some(mut r) = recvs.get(&id).cloned().filter(|r| r.mirrored == Some(false)) {
                r.mirrored = Some(true);
                if let Err(e) = recvs.put(r) {
                    tracing::warn!(mirror = %id, error = %e, "recording that the mirror reached the leaf failed");
                }
            }
        }
    }

    /// After a restart: a receive still preparing is undone; one receiving is kept (its leaf's
    /// datapath runs on, re-adopted with its SR).
    pub(crate) async fn recover_receives(&self) {
        let preparing: Vec<String> = lock(&self.records.recvs).all().filter(|r| r.stage == RecvStage::Preparing).map(|r| r.id.clone()).collect();
        for id in preparing {
            let _turn = self.receive_turn(&id).await;
            tracing::warn!(mirror = %id, "a receive was interrupted while preparing; undoing it");
            self.undo_receive_fully(&id).await;
        }
    }
}

/// `sxm serve` answers NBD `PUT`s through the mux: the datapath that holds the VDI takes the
/// connection.
pub struct Handover(pub std::sync::Arc<Mux>);

impl NbdHandover for Handover {
    type Prepared = NbdRequest;

    async fn prepare(&self, req: NbdRequest, _transport: Transport) -> Result<NbdRequest, HandoverError> {
        crate::fault::point("recv.pass_fds").await?;
        self.0.nbd_check(&req)?;
        Ok(req)
    }

    async fn take_over(&self, req: NbdRequest, conn: OwnedFd) {
        self.0.nbd_take_over(req, conn).await;
    }
}
