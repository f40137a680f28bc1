//! The mux: every storage call comes here, is decoded into its [`Call`], and is either
//! answered by the engine (SR registry, datapaths, tasks, updates) or routed to the backend of
//! the SR it names. xapi's `storage_mux.ml` plus its SMAPIv1 wrapper's datapath bookkeeping.
//!
//! Order of effects: a change is made by the backend first and recorded second, so a crash in
//! between leaves something the records do not mention (an SR folder with no record, a
//! datapath process no record asks for), which the next start clears; never a record naming
//! something that was not made.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::backend::{AttachedVdi, Backend, SrContext, StorageResult, VdiChange};
use crate::datapaths::{Datapaths, DpRecord, superstate};
use crate::http::Dispatch;
use crate::model::call::args;
use crate::model::{
    AttachInfo, Call, Dynamic, LegacyAttachInfo, QueryResult, SrHealth, SrInfo, StorageError, VdiInfo, VdiState,
};
use crate::rpc::Value;
use crate::rpc::marshal::{Map, Marshal};
use crate::srs::{SrEntry, SrRegistry};
use crate::tasks::Tasks;

/// How often the host looks for datapaths whose process has died.
const DATAPATH_CHECK_EVERY: Duration = Duration::from_secs(2);

/// The SR type `SR.create` makes when its device_config names none.
pub const DEFAULT_SR_TYPE: &str = "ext";

/// The host's storage service.
pub struct Mux {
    /// Itself, for the tasks a call leaves running (migrations).
    pub(crate) me: std::sync::Weak<Mux>,
    /// Sends, receives and copies.
    pub(crate) records: crate::migrate::Records,
    /// Jobs moving several disks at once.
    pub(crate) jobs: crate::migrate::job::Jobs,
    root: PathBuf,
    backends: HashMap<String, Arc<dyn Backend>>,
    srs: Mutex<SrRegistry>,
    dps: Mutex<Datapaths>,
    /// One lock per VDI (by SR and VDI) for its datapath changes: see [`Mux::vdi_turn`].
    vdi_turns: Mutex<HashMap<(String, String), VdiTurn>>,
    /// One lock per received mirror: see [`Mux::receive_turn`].
    receive_turns: Mutex<HashMap<(String, String), VdiTurn>>,
    tasks: Tasks,
}

/// A VDI's lock for its datapath changes, by (SR, VDI).
type VdiTurn = Arc<tokio::sync::Mutex<()>>;

/// A turn (a VDI's, or a received mirror's), held: when the last holder or waiter lets go,
/// its lock leaves the map, which would otherwise keep one for every VDI (or made-up id) ever
/// named in a call.
pub(crate) struct HeldTurn<'a> {
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
    turns: &'a Mutex<HashMap<(String, String), VdiTurn>>,
    key: (String, String),
}

/// Waits for the (SR, VDI) turn in `turns`. A waiter dropped before its turn (its call
/// cancelled) takes its clone of the lock with it, so the holder's drop still finds the count
/// at one and removes the lock.
async fn take_turn<'a>(turns: &'a Mutex<HashMap<(String, String), VdiTurn>>, sr: &str, vdi: &str) -> HeldTurn<'a> {
    let key = (sr.to_owned(), vdi.to_owned());
    let lock = Arc::clone(turns.lock().unwrap_or_else(|p| p.into_inner()).entry(key.clone()).or_default());
    HeldTurn { guard: Some(lock.lock_owned().await), turns, key }
}

impl Drop for HeldTurn<'_> {
    fn drop(&mut self) {
        // Released first, so a waiter's clone is all that keeps the lock alive, if any.
        drop(self.guard.take());
        let mut turns = self.turns.lock().unwrap_or_else(|p| p.into_inner());
        if turns.get(&self.key).is_some_and(|lock| Arc::strong_count(lock) == 1) {
            turns.remove(&self.key);
        }
    }
}

/// Builds a [`Mux`]: the binary registers each SR type's backend, then opens the root.
#[derive(Default)]
pub struct MuxBuilder {
    backends: HashMap<String, Arc<dyn Backend>>,
}

impl MuxBuilder {
    /// Serves SRs of type `ty` with `backend`.
    pub fn backend(mut self, ty: &str, backend: Arc<dyn Backend>) -> MuxBuilder {
        self.backends.insert(ty.to_owned(), backend);
        self
    }

    /// Opens (or creates) the host's state under `root` and takes up every SR that was
    /// attached: each backend re-adopts its datapaths. An SR that fails to come back is
    /// logged and left detached in memory; its record is kept for the next try.
    pub async fn open(self, root: &Path) -> std::io::Result<Arc<Mux>> {
        std::fs::create_dir_all(root)?;
        // The guests' disks, the datapaths' sockets and the migrations' records (which hold
        // other hosts' secrets) are all under the root: no one else may even look in.
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o700))
                .map_err(|e| std::io::Error::new(e.kind(), format!("making {} the host's own (mode 0700): {e}", root.display())))?;
        }
        let (srs, dps, records) = (SrRegistry::load(root)?, Datapaths::load(root)?, crate::migrate::Records::load(root)?);
        let mux = Arc::new_cyclic(|me| Mux {
            me: me.clone(),
            records,
            jobs: Default::default(),
            root: root.to_owned(),
            backends: self.backends,
            srs: Mutex::new(srs),
            dps: Mutex::new(dps),
            vdi_turns: Mutex::new(HashMap::new()),
            receive_turns: Mutex::new(HashMap::new()),
            tasks: Tasks::new(),
        });
        let attached: Vec<SrEntry> = mux.registry().all().filter(|e| e.record.attached).cloned().collect();
        for entry in attached {
            let sr = entry.record.sr.clone();
            let datapaths = mux.attached_vdis(&sr);
            let result = mux.run(&entry, true, move |b, ctx| b.sr_attach(ctx, &datapaths)).await;
            match result {
                Ok(()) => tracing::info!(sr = %sr, "SR taken up again"),
                Err(e) => tracing::error!(sr = %sr, error = %e, "SR could not be taken up again"),
            }
        }
        // Then what migrations were doing: finish or undo each.
        mux.recover_receives().await;
        mux.recover_sends().await;
        mux.recover_jobs();
        Mux::supervise_datapaths(&mux);
        Ok(mux)
    }
}

/// A change (a read-write attach or activate, a compose) of a VDI that `DATA.copy` is reading,
/// refused: the copy would hold some of it and not the rest.
fn copy_under_way(vdi: &str, operation: &str) -> StorageError {
    crate::backend::errors::in_use(vdi, &format!("{operation}: a copy of it (DATA.copy) is under way; cancel its task or wait for it to end"))
}

/// A change of a VDI that a migration receives into (its leaf or parent), refused until the
/// receive is finalized or cancelled.
fn receive_under_way(vdi: &str, operation: &str, mirror: &str, part: &str) -> StorageError {
    crate::backend::errors::in_use(
        vdi,
        &format!("{operation}: it is the {part} of mirror {mirror}, still receiving; it is the migrated disk once the mirror is finalized (or gone once it is cancelled)"),
    )
}

/// A migration asking `verify_dest` of an https destination on a host that has no CA bundle
/// to verify with (`sxm serve --tls-ca`) is refused rather than run unverified. (Over http
/// there is nothing to verify, as in xapi, whose check is stunnel's.)
fn unverifiable(verify_dest: bool, url: &str) -> Option<StorageError> {
    (verify_dest && url.starts_with("https://") && !crate::http::tls::verifies()).then(|| {
        StorageError::MigrationPreparationFailure(
            "verify_dest asks that the destination's certificate be checked, and this host has no CA bundle to check it with (sxm serve --tls-ca)".into(),
        )
    })
}

/// The longest name or description an SR or VDI takes, in bytes. xapi sets none; with none, a
/// VDI named in 15 MiB made every `SR.scan` answer 31 MB, and its migration's
/// `receive_start2` was cut off by the destination's 16 MiB request limit ("broken pipe").
pub const MAX_NAME_BYTES: usize = 64 << 10;

/// Why a call that names an SR or VDI is refused, if a name or description it sets is longer
/// than [`MAX_NAME_BYTES`].
fn overlong_name(call: &Call) -> Option<StorageError> {
    use Call::*;
    let texts: [(&str, &str); 2] = match call {
        SrCreate(a) => [("name_label", &a.name_label), ("name_description", &a.name_description)],
        SrSetNameLabel(a) => [("name_label", &a.new_name_label), ("", "")],
        SrSetNameDescription(a) => [("name_description", &a.new_name_description), ("", "")],
        VdiSetNameLabel(a) => [("name_label", &a.new_name_label), ("", "")],
        VdiSetNameDescription(a) => [("name_description", &a.new_name_description), ("", "")],
        VdiCreate(args::VdiCreate { vdi_info, .. })
        | VdiSnapshot(args::VdiSnapshot { vdi_info, .. })
        | VdiClone(args::VdiClone { vdi_info, .. })
        | DataMirrorReceiveStart(args::DataMirrorReceiveStart { vdi_info, .. })
        | DataMirrorReceiveStart2(args::DataMirrorReceiveStart2 { vdi_info, .. }) => {
            [("name_label", &vdi_info.name_label), ("name_description", &vdi_info.name_description)]
        }
        _ => return None,
    };
    texts.into_iter().find(|(_, t)| t.len() > MAX_NAME_BYTES).map(|(what, t)| {
        StorageError::InternalError(format!("{what} of {} bytes is longer than the {MAX_NAME_BYTES} bytes an SR or VDI keeps", t.len()))
    })
}

impl Mux {
    /// A builder with no backends.
    pub fn builder() -> MuxBuilder {
        MuxBuilder::default()
    }

    /// The host's root folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Tasks and updates.
    pub fn tasks(&self) -> &Tasks {
        &self.tasks
    }

    fn registry(&self) -> std::sync::MutexGuard<'_, SrRegistry> {
        self.srs.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn datapaths(&self) -> std::sync::MutexGuard<'_, Datapaths> {
        self.dps.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits for `vdi`'s turn to change its datapaths. Attach, activate, deactivate and detach
    /// each decide from the records (attached already? the last one active? the last one out?)
    /// and then act on the backend and record: two of them on one VDI interleaved (two VMs
    /// sharing a read-only disk, starting and stopping at once) could stop the process another
    /// had just found running, or pause one another had just unpaused. They take turns.
    pub(crate) async fn vdi_turn(&self, sr: &str, vdi: &str) -> HeldTurn<'_> {
        take_turn(&self.vdi_turns, sr, vdi).await
    }

    /// Waits for mirror `id`'s turn on the receiving side. `receive_start` (its prepare, and
    /// the undo of a failed one), `receive_cancel` and `receive_finalize` of one mirror take
    /// turns: a source restarted mid-prepare cancels at once, while the prepare its dead self
    /// asked for still runs here, and a cancel that ran in the middle of that prepare undid
    /// what it had made so far and left what it made after for good.
    pub(crate) async fn receive_turn(&self, id: &str) -> HeldTurn<'_> {
        take_turn(&self.receive_turns, "receive", id).await
    }

    fn attached_vdis(&self, sr: &str) -> Vec<AttachedVdi> {
        let dps = self.datapaths();
        let mut out: Vec<AttachedVdi> = Vec::new();
        for r in dps.of_sr(sr) {
            match out.iter_mut().find(|a| a.vdi == r.vdi) {
                Some(a) => {
                    a.read_write |= r.read_write;
                    a.active |= r.active;
                }
                None => out.push(AttachedVdi { vdi: r.vdi.clone(), read_write: r.read_write, active: r.active }),
            }
        }
        out
    }

    /// The backend serving an SR.
    pub(crate) fn backend_for_sr(&self, sr: &str) -> StorageResult<Arc<dyn Backend>> {
        let entry = self.entry(sr)?;
        self.backend_of(&entry.record.ty, sr)
    }

    fn backend_of(&self, ty: &str, sr: &str) -> StorageResult<Arc<dyn Backend>> {
        self.backends.get(ty).cloned().ok_or_else(|| StorageError::NoStoragePluginForSr(sr.to_owned()))
    }

    /// Runs a call through the mux from inside the engine (a migration's steps are ordinary
    /// storage calls) and decodes its answer.
    pub(crate) fn local<T: Marshal + Send + 'static>(&self, call: Call) -> crate::migrate::Boxed<'_, StorageResult<T>> {
        Box::pin(async move {
            let method = call.method();
            let v = self.call(call).await?;
            T::from_value(&v).map_err(|e| StorageError::InternalError(format!("{method} answered something unexpected: {e}")))
        })
    }

    /// One datapath's record of a VDI.
    pub(crate) fn datapath_record(&self, dp: &str, sr: &str, vdi: &str) -> Option<DpRecord> {
        self.datapaths().get(dp, sr, vdi).cloned()
    }

    /// Every datapath record of a VDI.
    pub(crate) fn datapath_records(&self, sr: &str, vdi: &str) -> Vec<DpRecord> {
        self.datapaths().of_vdi(sr, vdi).cloned().collect()
    }

    pub(crate) fn entry(&self, sr: &str) -> StorageResult<SrEntry> {
        self.registry().get(sr).cloned()
    }

    pub(crate) fn attached_entry(&self, sr: &str) -> StorageResult<SrEntry> {
        let entry = self.entry(sr)?;
        if !entry.record.attached {
            return Err(StorageError::SrNotAttached(sr.to_owned()));
        }
        Ok(entry)
    }

    /// Watches every attached SR's datapaths, for the host's lifetime: one whose process died
    /// (crashed, killed) is started again in the state it was in, on the same socket, so its
    /// guest reconnects rather than keeping a dead disk until a detach. The look is cheap and
    /// lock-free; the restart holds the SR exclusively, so no attach, detach or mirror call on
    /// it runs meanwhile.
    fn supervise_datapaths(mux: &Arc<Mux>) {
        let me = Arc::downgrade(mux);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(DATAPATH_CHECK_EVERY).await;
                let Some(mux) = me.upgrade() else { return };
                let attached: Vec<SrEntry> = mux.registry().all().filter(|e| e.record.attached).cloned().collect();
                for entry in attached {
                    let Ok(backend) = mux.backend_of(&entry.record.ty, &entry.record.sr) else { continue };
                    let ctx = mux.registry().context(&entry.record);
                    for vdi in backend.sr_dead_datapaths(&ctx) {
                        let id = vdi.clone();
                        match mux.run(&entry, true, move |b, ctx| b.vdi_restart_datapath(ctx, &id)).await {
                            Ok(true) => {
                                tracing::warn!(sr = %entry.record.sr, vdi = %vdi, "restarted a datapath whose process had died");
                                mux.tasks.changed(Dynamic::Vdi(vdi));
                            }
                            // Detached, or restarted, while the lock was awaited.
                            Ok(false) => {}
                            Err(e) => tracing::error!(sr = %entry.record.sr, vdi = %vdi, error = %e, "could not restart a dead datapath"),
                        }
                    }
                }
            }
        });
    }

    /// Runs a long backend call (a copy) on the blocking pool without the SR's lock: the
    /// caller keeps what it works on from changing.
    pub(crate) async fn run_unlocked<T: Send + 'static>(
        &self,
        entry: &SrEntry,
        f: impl FnOnce(&dyn Backend, &SrContext) -> StorageResult<T> + Send + 'static,
    ) -> StorageResult<T> {
        let backend = self.backend_of(&entry.record.ty, &entry.record.sr)?;
        let ctx = self.registry().context(&entry.record);
        tokio::task::spawn_blocking(move || f(backend.as_ref(), &ctx))
            .await
            .map_err(|e| StorageError::InternalError(format!("backend call on SR {} did not finish: {e}", entry.record.sr)))?
    }

    /// Runs a backend call on the blocking pool with the SR's lock held.
    pub(crate) async fn run<T: Send + 'static>(
        &self,
        entry: &SrEntry,
        exclusive: bool,
        f: impl FnOnce(&dyn Backend, &SrContext) -> StorageResult<T> + Send + 'static,
    ) -> StorageResult<T> {
        let backend = self.backend_of(&entry.record.ty, &entry.record.sr)?;
        let ctx = self.registry().context(&entry.record);
        // Held across the blocking call: an owned guard moves with it.
        let guard = if exclusive {
            Guard::Write(entry.lock.clone().write_owned().await)
        } else {
            Guard::Read(entry.lock.clone().read_owned().await)
        };
        let job = tokio::task::spawn_blocking(move || {
            let _guard = guard;
            f(backend.as_ref(), &ctx)
        });
        job.await.map_err(|e| StorageError::InternalError(format!("backend call on SR {} did not finish: {e}", entry.record.sr)))?
    }

    /// Runs one decoded call.
    pub async fn call(&self, call: Call) -> StorageResult<Value> {
        use Call::*;
        if let Some(e) = overlong_name(&call) {
            return Err(e);
        }
        match call {
            SrCreate(a) => self.sr_create(a).await.map(|m| m.to_value()),
            SrAttach(a) => self.sr_attach(&a.sr).await.map(|()| Value::Null),
            SrDetach(a) => self.sr_detach(&a.sr).await.map(|()| Value::Null),
            SrDestroy(a) => self.sr_destroy(&a.sr).await.map(|()| Value::Null),
            SrScan(a) => self.sr_scan(&a.sr).await.map(|v| v.to_value()),
            SrScan2(a) => {
                let vdis = self.sr_scan(&a.sr).await?;
                let info = self.sr_stat(&a.sr).await?;
                Ok((vdis, info).to_value())
            }
            SrList(_) => Ok(self.registry().all().filter(|e| e.record.attached).map(|e| e.record.sr.clone()).collect::<Vec<_>>().to_value()),
            SrStat(a) => self.sr_stat(&a.sr).await.map(|i| i.to_value()),
            SrSetNameLabel(a) => self.sr_rename(&a.sr, Some(a.new_name_label), None).map(|()| Value::Null),
            SrSetNameDescription(a) => self.sr_rename(&a.sr, None, Some(a.new_name_description)).map(|()| Value::Null),
            SrUpdateSnapshotInfoDest(a) => self.update_snapshot_info_dest(a).await.map(|()| Value::Null),
            SrUpdateSnapshotInfoSrc(a) => self.update_snapshot_info_src(a).await.map(|()| Value::Null),
            VdiCreate(a) => {
                let entry = self.attached_entry(&a.sr)?;
                let info = self.run(&entry, true, move |b, ctx| b.vdi_create(ctx, &a.vdi_info)).await?;
                self.tasks.changed(Dynamic::Vdi(info.vdi.clone()));
                Ok(info.to_value())
            }
            VdiDestroy(a) => {
                if self.datapaths().of_vdi(&a.sr, &a.vdi).next().is_some() || self.being_copied(&a.sr, &a.vdi) {
                    return Err(crate::backend::errors::in_use(&a.vdi, "VDI.destroy"));
                }
                let entry = self.attached_entry(&a.sr)?;
                let vdi = a.vdi.clone();
                self.run(&entry, true, move |b, ctx| b.vdi_destroy(ctx, &vdi)).await?;
                self.tasks.changed(Dynamic::Vdi(a.vdi));
                Ok(Value::Null)
            }
            VdiStat(a) => {
                let entry = self.attached_entry(&a.sr)?;
                self.run(&entry, false, move |b, ctx| b.vdi_stat(ctx, &a.vdi)).await.map(|i| i.to_value())
            }
            VdiSnapshot(a) if let Some((mirror, part)) = self.receiving_into(&a.sr, &a.vdi_info.vdi) => {
                Err(receive_under_way(&a.vdi_info.vdi, "VDI.snapshot", &mirror, part))
            }
            VdiClone(a) if let Some((mirror, part)) = self.receiving_into(&a.sr, &a.vdi_info.vdi) => {
                Err(receive_under_way(&a.vdi_info.vdi, "VDI.clone", &mirror, part))
            }
            VdiSnapshot(a) => self.vdi_copy(a.sr, a.vdi_info, true).await.map(|i| i.to_value()),
            VdiClone(a) => self.vdi_copy(a.sr, a.vdi_info, false).await.map(|i| i.to_value()),
            VdiResize(a) => {
                if a.new_size < 0 {
                    return Err(StorageError::BackendError("INVALID_SIZE".into(), vec![a.new_size.to_string()]));
                }
                if self.being_copied(&a.sr, &a.vdi) {
                    return Err(crate::backend::errors::in_use(&a.vdi, "VDI.resize"));
                }
                let entry = self.attached_entry(&a.sr)?;
                let vdi = a.vdi.clone();
                let size = self.run(&entry, true, move |b, ctx| b.vdi_resize(ctx, &vdi, a.new_size)).await?;
                self.tasks.changed(Dynamic::Vdi(a.vdi));
                Ok(size.to_value())
            }
            VdiCompose(a) => {
                let entry = self.attached_entry(&a.sr)?;
                for vdi in [&a.vdi1, &a.vdi2] {
                    if self.being_copied(&a.sr, vdi) {
                        return Err(copy_under_way(vdi, "VDI.compose"));
                    }
                }
                let child = a.vdi2.clone();
                self.run(&entry, true, move |b, ctx| b.vdi_compose(ctx, &a.vdi1, &a.vdi2)).await?;
                // The child now reads its parent's data under its own: it no longer holds what
                // its content_id names, and a copy must not take an earlier copy of it as one
                // of what it holds now (a copy after a compose sent nothing and kept the old
                // content). A migration's finalize composes too: its VDI's id is fresh anyway,
                // from the read-write attach of its leaf.
                let (id, fresh) = (child.clone(), uuid::Uuid::new_v4().to_string());
                self.run(&entry, true, move |b, ctx| b.vdi_update(ctx, &id, &VdiChange::ContentId(fresh))).await?;
                self.tasks.changed(Dynamic::Vdi(child));
                Ok(Value::Null)
            }
            VdiSetContentId(a) => self.vdi_update(a.sr, a.vdi, VdiChange::ContentId(a.content_id)).await,
            VdiSetNameLabel(a) => self.vdi_update(a.sr, a.vdi, VdiChange::NameLabel(a.new_name_label)).await,
            VdiSetNameDescription(a) => self.vdi_update(a.sr, a.vdi, VdiChange::NameDescription(a.new_name_description)).await,
            VdiSetPersistent(a) => self.set_persistent(a.sr, a.vdi, a.persistent).await.map(|()| Value::Null),
            VdiEpochBegin(a) => self.epoch_begin(a.sr, a.vdi, a.persistent).await.map(|()| Value::Null),
            VdiEpochEnd(a) => {
                let entry = self.attached_entry(&a.sr)?;
                self.run(&entry, false, move |b, ctx| b.vdi_stat(ctx, &a.vdi)).await.map(|_| Value::Null)
            }
            VdiAddToSmConfig(a) => self.vdi_update(a.sr, a.vdi, VdiChange::AddSmConfig(a.key, a.value)).await,
            VdiRemoveFromSmConfig(a) => self.vdi_update(a.sr, a.vdi, VdiChange::RemoveSmConfig(a.key)).await,
            VdiSimilarContent(a) => {
                let entry = self.attached_entry(&a.sr)?;
                self.run(&entry, false, move |b, ctx| b.vdi_similar_content(ctx, &a.vdi)).await.map(|v| v.to_value())
            }
            VdiGetByName(a) => {
                let vdis = self.sr_scan(&a.sr).await?;
                // By location (here the VDI's id) only, as SMAPIv1's `find_content` does: a
                // name_label need not be unique.
                vdis.into_iter().find(|v| v.vdi == a.name).map(|v| v.to_value()).ok_or(StorageError::VdiDoesNotExist(a.name))
            }
            VdiAttach(a) => self.attach(a.dp, a.sr, a.vdi, a.read_write, None).await.map(|i| LegacyAttachInfo::from(&i).to_value()),
            VdiAttach2(a) => self.attach(a.dp, a.sr, a.vdi, a.read_write, a.vm).await.map(|i| i.to_value()),
            VdiAttach3(a) => self.attach(a.dp, a.sr, a.vdi, a.read_write, a.vm).await.map(|i| i.to_value()),
            VdiActivate(a) => self.activate(a.dp, a.sr, a.vdi).await.map(|()| Value::Null),
            VdiActivate3(a) => self.activate(a.dp, a.sr, a.vdi).await.map(|()| Value::Null),
            VdiActivateReadonly(a) => self.activate(a.dp, a.sr, a.vdi).await.map(|()| Value::Null),
            VdiDeactivate(a) => self.deactivate(a.dp, a.sr, a.vdi).await.map(|()| Value::Null),
            VdiDetach(a) => self.detach(a.dp, a.sr, a.vdi).await.map(|()| Value::Null),
            DpCreate(a) => Ok(Value::String(a.id)),
            DpDestroy(a) => self.dp_destroy(&a.dp, a.allow_leak).await.map(|()| Value::Null),
            // The datapath goes whatever it holds, as in xapi (sr and vdi are only a hint).
            DpDestroy2(a) => self.dp_destroy(&a.dp, a.allow_leak).await.map(|()| Value::Null),
            DpAttachInfo(a) => self.dp_attach_info(a).await.map(|i| i.to_value()),
            DpStatVdi(a) => {
                self.entry(&a.sr)?;
                let dps = self.datapaths();
                let records: Vec<DpRecord> = dps.of_vdi(&a.sr, &a.vdi).cloned().collect();
                let stat = crate::model::DpStatVdi {
                    dps: records.iter().map(|r| (r.dp.clone(), r.state())).collect(),
                    superstate: superstate(&records),
                };
                Ok(stat.to_value())
            }
            TaskStat(a) => self.tasks.stat(&a.task).map(|t| t.to_value()),
            TaskList(_) => Ok(self.tasks.list().to_value()),
            TaskCancel(a) if let Some(why) = self.jobs.past_cutover(&a.task, crate::migrate::job::Asked::Cancel) => Err(StorageError::InternalError(why)),
            TaskCancel(a) => {
                // Recorded before the job is told, so that a restart in its undo does not
                // take the cancelled job up again; unrecorded, the cancel still goes ahead.
                if self.jobs.is_running(&a.task)
                    && let Err(e) = self.record_job_cancel(&a.task)
                {
                    tracing::error!(job = %a.task, error = %e, "recording the job's cancel failed; a restart in its undo would resume it");
                }
                self.tasks.cancel(&a.task)?;
                // Its stage says so at once: a job's undo takes a while, and its last stage
                // read as if the cancel had not been taken.
                if self.jobs.is_running(&a.task) {
                    self.tasks.debug_info(&a.task, "stage", "cancelling");
                }
                Ok(Value::Null)
            }
            TaskDestroy(a) => {
                self.tasks.destroy(&a.task)?;
                self.forget_ended_job(&a.task);
                Ok(Value::Null)
            }
            UpdatesGet(a) => {
                // No timeout waits for a change, as xapi's does, up to the longest wait a call
                // may take here.
                let timeout = a.timeout.map_or(crate::tasks::MAX_WAIT, |t| Duration::from_secs(t.max(0) as u64));
                let (changes, next) = self
                    .tasks
                    .updates(&a.from, timeout, || {
                        let mut all: Vec<Dynamic> = Vec::new();
                        {
                            let dps = self.datapaths();
                            for sr in self.registry().all().filter(|e| e.record.attached) {
                                for r in dps.of_sr(&sr.record.sr) {
                                    let d = Dynamic::Dp(r.dp.clone());
                                    if !all.contains(&d) {
                                        all.push(d);
                                    }
                                }
                            }
                        }
                        // Mirrors too: a watcher that resynchronises must not miss a failed one.
                        all.extend(self.mirror_list().into_keys().map(Dynamic::Mirror));
                        all
                    })
                    .await;
                Ok((changes, next).to_value())
            }
            Query(_) => Ok(self.query().to_value()),
            QueryDiagnostics(_) => Ok(Value::String(self.diagnostics())),
            DataCopy(a) if let Some(e) = unverifiable(a.verify_dest, &a.url) => Err(e),
            DataCopy(a) => self.data_copy(a.sr, a.vdi, a.url, a.dest).await.map(Value::String),
            DataMirrorStart(a) if let Some(e) = unverifiable(a.verify_dest, &a.url) => Err(e),
            // A disk of a job is mirrored by its job only (it may still wait in its queue).
            DataMirrorStart(a) if let Some(job) = self.jobs.job_of(&a.sr, &a.vdi) => {
                Err(crate::backend::errors::in_use(&a.vdi, &format!("a disk of migration job {job}, which mirrors it")))
            }
            DataMirrorStart(a) => self.mirror_start(a.sr, a.vdi, a.dp, a.url, a.dest, a.mirror_vm, a.copy_vm).await.map(Value::String),
            // A job's disk is stopped by its job, whose cancel undoes every disk: stopped alone,
            // the job failed later, saying the disk had left it by a finalize.
            DataMirrorStop(a) if let Some((vdi, job)) = a.id.split_once('/').and_then(|(sr, vdi)| Some((vdi.to_owned(), self.jobs.job_of(sr, vdi)?))) => Err(crate::backend::errors::in_use(
                &vdi,
                &format!("mirror {} is a disk of migration job {job}: cancel the job, which undoes every disk of it (sxm migrate cancel {job})", a.id),
            )),
            DataMirrorStop(a) => self.mirror_stop(&a.id).await.map(|()| Value::Null),
            DataMirrorStat(a) => self.mirror_stat(&a.id).map(|m| m.to_value()),
            DataMirrorList(_) => Ok(self.mirror_list().to_value()),
            DataMirrorReceiveStart(a) => self.receive_start(a.sr, a.vdi_info, a.id, a.similar, "0".into()).await.map(|r| r.to_value()),
            DataMirrorReceiveStart2(a) => {
                self.receive_start(a.sr, a.vdi_info, a.id, a.similar, a.vm.unwrap_or_else(|| "0".into())).await.map(|r| r.to_value())
            }
            DataMirrorReceiveFinalize(a) => self.receive_finalize(&a.id, false).await.map(|()| Value::Null),
            DataMirrorReceiveFinalize2(a) => self.receive_finalize(&a.id, true).await.map(|()| Value::Null),
            DataMirrorReceiveCancel(a) => self.receive_cancel(&a.id).await.map(|()| Value::Null),
            SxmMigrateStart(a) => self.migrate_start(a).await.map(Value::String),
            SxmMigrateCutover(a) => self.migrate_cutover(&a.job).map(|()| Value::Null),
            SxmMigrateSetBwlimit(a) => self.migrate_set_bwlimit(&a.job, a.bwlimit).map(|()| Value::Null),
            SxmVdiChecksums(a) => self.vdi_checksums(&a.sr, &a.vdi, a.block).await,
        }
    }

    fn query(&self) -> QueryResult {
        let mut types: Vec<String> = self.backends.keys().cloned().collect();
        types.sort();
        QueryResult {
            required_cluster_stack: Vec::new(),
            configuration: Map::from_iter([("root".to_owned(), self.root.display().to_string())]),
            // What the storage interface answers; `SR.probe` answers Unimplemented, so no
            // SR_PROBE. VDI_MIRROR_IN: this host receives mirrors (xapi checks a destination
            // for it); VDI_RESET_ON_BOOT/2: `VDI.set_persistent false` and `VDI.epoch_begin`.
            features: [
                "VDI_CREATE",
                "VDI_DELETE",
                "VDI_ATTACH",
                "VDI_DETACH",
                "VDI_ACTIVATE",
                "VDI_DEACTIVATE",
                "VDI_SNAPSHOT",
                "VDI_CLONE",
                "VDI_RESIZE",
                "VDI_MIRROR",
                "VDI_MIRROR_IN",
                "VDI_RESET_ON_BOOT/2",
            ]
                .iter()
                .map(|s| (*s).to_owned())
                .chain(types.iter().map(|t| format!("SR_TYPE/{t}")))
                .collect(),
            required_api_version: "2.0".to_owned(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            copyright: "the sxm developers".to_owned(),
            vendor: "sxm".to_owned(),
            description: "sxm: live storage motion".to_owned(),
            name: "sxm".to_owned(),
            driver: "sxm".to_owned(),
        }
    }

    async fn sr_create(&self, a: args::SrCreate) -> StorageResult<Map<String>> {
        let ty = a.device_config.get("type").cloned().unwrap_or_else(|| DEFAULT_SR_TYPE.to_owned());
        if self.registry().get(&a.sr).is_ok_and(|e| e.record.attached) {
            return Err(StorageError::SrAttached(a.sr));
        }
        let backend = self.backend_of(&ty, &a.sr)?;
        let mut record = self.registry().prepare(&a.sr, &ty, &a.name_label, &a.name_description, a.device_config.clone())?;
        let ctx = self.registry().context(&record);
        let (name, size) = (a.name_label.clone(), a.physical_size);
        let made = tokio::task::spawn_blocking(move || backend.sr_create(&ctx, &name, size))
            .await
            .map_err(|e| StorageError::InternalError(format!("SR.create did not finish: {e}")))?;
        let device_config = match made {
            Ok(dc) => dc,
            Err(e) => {
                // Nothing refers to the folders yet: take them away again.
                let ctx = self.registry().context(&record);
                let _ = std::fs::remove_dir_all(&ctx.dir);
                let _ = std::fs::remove_dir_all(&ctx.run_dir);
                return Err(e);
            }
        };
        record.device_config = device_config.clone();
        self.registry().put(record)?;
        tracing::info!(sr = %a.sr, ty = %ty, "SR created");
        Ok(device_config)
    }

    async fn sr_attach(&self, sr: &str) -> StorageResult<()> {
        let entry = self.entry(sr)?;
        let datapaths = self.attached_vdis(sr);
        self.run(&entry, true, move |b, ctx| b.sr_attach(ctx, &datapaths)).await?;
        let mut record = entry.record;
        if !record.attached {
            record.attached = true;
            self.registry().put(record)?;
        }
        Ok(())
    }

    async fn sr_detach(&self, sr: &str) -> StorageResult<()> {
        // Not attached: Sr_not_attached, as xapi's SMAPIv1 wrapper answers.
        let entry = self.attached_entry(sr)?;
        if let Some(r) = self.datapaths().of_sr(sr).next() {
            return Err(StorageError::BackendError("SR_IN_USE".into(), vec![sr.into(), format!("VDI {} is attached on datapath {}", r.vdi, r.dp)]));
        }
        if let Some(vdi) = self.copied_in(sr) {
            return Err(StorageError::BackendError("SR_IN_USE".into(), vec![sr.into(), format!("VDI {vdi} is being copied (DATA.copy)")]));
        }
        self.run(&entry, true, |b, ctx| b.sr_detach(ctx)).await?;
        let mut record = entry.record;
        record.attached = false;
        self.registry().put(record)
    }

    async fn sr_destroy(&self, sr: &str) -> StorageResult<()> {
        let entry = self.entry(sr)?;
        if let Some(r) = self.datapaths().of_sr(sr).next() {
            return Err(StorageError::BackendError("SR_IN_USE".into(), vec![sr.into(), format!("VDI {} is attached on datapath {}", r.vdi, r.dp)]));
        }
        self.run(&entry, true, |b, ctx| b.sr_destroy(ctx)).await?;
        self.registry().remove(sr)?;
        tracing::info!(sr = %sr, "SR destroyed");
        Ok(())
    }

    async fn sr_scan(&self, sr: &str) -> StorageResult<Vec<VdiInfo>> {
        let entry = self.attached_entry(sr)?;
        self.run(&entry, false, |b, ctx| b.sr_scan(ctx)).await
    }

    async fn sr_stat(&self, sr: &str) -> StorageResult<SrInfo> {
        let entry = self.attached_entry(sr)?;
        let space = self.run(&entry, false, |b, ctx| b.sr_space(ctx)).await?;
        Ok(SrInfo {
            health: SrHealth::Healthy,
            clustered: false,
            free_space: space.free,
            total_space: space.total,
            name_description: entry.record.name_description.clone(),
            name_label: entry.record.name_label.clone(),
            sr_uuid: Some(entry.record.sr.clone()),
            sr_type: Some(entry.record.ty.clone()),
            smapi_version: Some(i64::from(self.backend_of(&entry.record.ty, sr)?.smapi_version())),
        })
    }

    fn sr_rename(&self, sr: &str, label: Option<String>, description: Option<String>) -> StorageResult<()> {
        let mut registry = self.registry();
        let mut record = registry.get(sr)?.record.clone();
        if let Some(l) = label {
            record.name_label = l;
        }
        if let Some(d) = description {
            record.name_description = d;
        }
        registry.put(record)
    }

    async fn vdi_copy(&self, sr: String, info: VdiInfo, snapshot: bool) -> StorageResult<VdiInfo> {
        let entry = self.attached_entry(&sr)?;
        let src = info.vdi.clone();
        let made = self
            .run(&entry, true, move |b, ctx| if snapshot { b.vdi_snapshot(ctx, &info) } else { b.vdi_clone(ctx, &info) })
            .await?;
        if self.datapaths().of_vdi(&sr, &src).any(|r| r.read_write) {
            // The new VDI holds the content the source had; the source, written on, will not
            // hold it for long: it takes a fresh content_id, or a copy elsewhere could take it
            // for the snapshot's twin.
            let fresh = uuid::Uuid::new_v4().to_string();
            self.run(&entry, true, move |b, ctx| b.vdi_update(ctx, &src, &VdiChange::ContentId(fresh))).await?;
        }
        self.tasks.changed(Dynamic::Vdi(made.vdi.clone()));
        Ok(made)
    }

    async fn vdi_update(&self, sr: String, vdi: String, change: VdiChange) -> StorageResult<Value> {
        let entry = self.attached_entry(&sr)?;
        let id = vdi.clone();
        self.run(&entry, true, move |b, ctx| b.vdi_update(ctx, &id, &change)).await?;
        self.tasks.changed(Dynamic::Vdi(vdi));
        Ok(Value::Null)
    }

    async fn update_snapshot_info_dest(&self, a: args::SrUpdateSnapshotInfoDest) -> StorageResult<()> {
        let entry = self.attached_entry(&a.sr)?;
        let (vdi, pairs) = (a.vdi.clone(), a.snapshot_pairs.clone());
        self.run(&entry, true, move |b, ctx| {
            // Check every pair before changing any, so a mismatch changes nothing.
            for (local, src) in &pairs {
                let mine = b.vdi_stat(ctx, local)?;
                if mine.content_id != src.content_id {
                    // Naming the two VDIs, as xapi's `assert_content_ids_match` does.
                    return Err(StorageError::ContentIdsDoNotMatch(mine.vdi, src.vdi.clone()));
                }
            }
            for (local, src) in &pairs {
                b.vdi_update(ctx, local, &VdiChange::SnapshotOf { of: vdi.clone(), time: src.snapshot_time.clone() })?;
            }
            Ok(())
        })
        .await?;
        for local in a.snapshot_pairs.keys() {
            self.tasks.changed(Dynamic::Vdi(local.clone()));
        }
        Ok(())
    }

    /// `SR.update_snapshot_info_src`, as xapi's `Storage_migrate` does it: each local snapshot's
    /// record goes to the host at `url`, which checks that its copy holds the same content
    /// and marks the copy a snapshot of `dest_vdi`.
    async fn update_snapshot_info_src(&self, a: args::SrUpdateSnapshotInfoSrc) -> StorageResult<()> {
        let vdis = self.sr_scan(&a.sr).await?;
        let find = |id: &str| vdis.iter().find(|v| v.vdi == id).cloned().ok_or_else(|| StorageError::VdiDoesNotExist(id.to_owned()));
        let src_vdi = find(&a.vdi)?;
        let mut snapshot_pairs = Map::new();
        for (local, remote) in &a.snapshot_pairs {
            snapshot_pairs.insert(remote.clone(), find(local)?);
        }
        let remote = crate::migrate::Remote::new(&a.url)?;
        let call = args::SrUpdateSnapshotInfoDest { sr: a.dest, vdi: a.dest_vdi, src_vdi, snapshot_pairs, dbg: a.dbg };
        remote.call::<()>(Call::SrUpdateSnapshotInfoDest(call)).await
    }

    /// `VDI.set_persistent`. Made non-persistent, the VDI's current content becomes the
    /// content it is reset to at each `VDI.epoch_begin`: as xapi's SMAPIv1 layer does, a clone
    /// moves it into a hidden parent and is destroyed again, leaving the VDI an empty leaf on
    /// it (the VDI, marked non-persistent before the clone goes, is never coalesced back into
    /// it).
    async fn set_persistent(&self, sr: String, vdi: String, persistent: bool) -> StorageResult<()> {
        let entry = self.attached_entry(&sr)?;
        let id = vdi.clone();
        self.run(&entry, true, move |b, ctx| {
            let before = b.vdi_stat(ctx, &id)?;
            if persistent {
                return b.vdi_update(ctx, &id, &VdiChange::Persistent(true));
            }
            if before.read_only {
                return Err(crate::backend::errors::read_only(&id));
            }
            // The reset point first, the flag second: a crash between them leaves the VDI as
            // it was (and a visible clone named as the reset point), never a VDI marked
            // non-persistent over a parent that does not hold its content.
            let point = b.vdi_clone(ctx, &VdiInfo::new(id.clone(), format!("reset point of {id}")))?;
            if let Err(e) = b.vdi_update(ctx, &id, &VdiChange::Persistent(false)) {
                let _ = b.vdi_destroy(ctx, &point.vdi);
                return Err(e);
            }
            b.vdi_destroy(ctx, &point.vdi)
        })
        .await?;
        self.tasks.changed(Dynamic::Vdi(vdi));
        Ok(())
    }

    /// `VDI.epoch_begin`: a non-persistent VDI is reset to its content when it was made so
    /// (SM's `reset_leaf`); a persistent one is left as it is. Both the VDI's record and the
    /// caller (`persistent`, xapi's on-boot mode) must say non-persistent: a caller that never
    /// heard `set_persistent false` succeed still says persistent. A read-only VDI (a snapshot)
    /// is never reset. The VM has not attached the VDI yet: a VDI something holds is refused,
    /// never reset under it.
    async fn epoch_begin(&self, sr: String, vdi: String, persistent: bool) -> StorageResult<()> {
        let entry = self.attached_entry(&sr)?;
        let _turn = self.vdi_turn(&sr, &vdi).await;
        let id = vdi.clone();
        let info = self.run(&entry, false, move |b, ctx| b.vdi_stat(ctx, &id)).await?;
        if info.persistent || persistent || info.read_only {
            if !info.persistent && persistent {
                tracing::warn!(sr = %sr, vdi = %vdi, "epoch_begin: the VDI is non-persistent but the caller says persistent; not reset");
            }
            return Ok(());
        }
        if let Some(r) = self.datapaths().of_vdi(&sr, &vdi).next() {
            return Err(crate::backend::errors::in_use(&vdi, &format!("VDI.epoch_begin: attached on datapath {}", r.dp)));
        }
        let id = vdi.clone();
        self.run(&entry, true, move |b, ctx| b.vdi_reset_leaf(ctx, &id)).await?;
        tracing::info!(sr = %sr, vdi = %vdi, "reset a non-persistent VDI at the start of its epoch");
        self.tasks.changed(Dynamic::Vdi(vdi));
        Ok(())
    }

    /// `Query.diagnostics`: the host's SRs, datapaths, tasks and migrations, as text.
    fn diagnostics(&self) -> String {
        let mut out = String::new();
        // The registry's lock goes before the datapaths' is taken: `UPDATES.get` takes them
        // in the other order.
        let srs: Vec<String> = self.registry().all().map(|e| e.record.sr.clone()).collect();
        for e in self.registry().all() {
            let r = &e.record;
            out.push_str(&format!("SR {} type {} {} {:?}\n", r.sr, r.ty, if r.attached { "attached" } else { "detached" }, r.name_label));
        }
        for sr in &srs {
            for r in self.datapaths().of_sr(sr) {
                out.push_str(&format!("DP {}: SR {} VDI {} {:?} (VM {})\n", r.dp, r.sr, r.vdi, r.state(), r.vm));
            }
        }
        for t in self.tasks.list() {
            out.push_str(&format!("Task {} {:?} ({})\n", t.id, t.state, t.dbg));
        }
        for (id, m) in self.mirror_list() {
            out.push_str(&format!("Mirror {id}: {:?} source {} destination {} failed {}\n", m.state, m.source_vdi, m.dest_vdi, m.failed));
        }
        out
    }

    async fn attach(&self, dp: String, sr: String, vdi: String, read_write: bool, vm: Option<String>) -> StorageResult<AttachInfo> {
        let _turn = self.vdi_turn(&sr, &vdi).await;
        let entry = self.attached_entry(&sr)?;
        if read_write && self.being_copied(&sr, &vdi) {
            return Err(copy_under_way(&vdi, "VDI.attach read-write"));
        }
        let (before, mine) = {
            let dps = self.datapaths();
            (superstate(dps.of_vdi(&sr, &vdi)), dps.get(&dp, &sr, &vdi).cloned())
        };
        // A receive's leaf has its own datapath, made before the receive is under way (asked
        // again, it is no new writer); its parent is written by the source's copy, through a
        // datapath of the source's making.
        if read_write
            && mine.is_none()
            && let Some((mirror, "leaf")) = self.receiving_into(&sr, &vdi)
        {
            return Err(receive_under_way(&vdi, "VDI.attach read-write", &mirror, "leaf"));
        }
        if let Some(r) = &mine {
            // Attaching again on the same datapath answers the same thing; asking for less
            // (read-only on a read-write datapath) keeps what it has, as xapi's automaton does.
            if !r.read_write && read_write {
                return Err(StorageError::IllegalTransition(r.state(), VdiState::Attached(if read_write { crate::model::Rw::Rw } else { crate::model::Rw::Ro })));
            }
        }
        let id = vdi.clone();
        let info = match before {
            VdiState::Detached => {
                let info = self.run(&entry, true, move |b, ctx| b.vdi_attach(ctx, &id, read_write)).await?;
                if read_write {
                    // Its data may change from now on: it no longer holds what its content_id
                    // names, and a migration must not take it as a copy of a similar VDI.
                    let (id, fresh) = (vdi.clone(), uuid::Uuid::new_v4().to_string());
                    self.run(&entry, true, move |b, ctx| b.vdi_update(ctx, &id, &VdiChange::ContentId(fresh))).await?;
                }
                info
            }
            // Already attached for another datapath: a writer joining readers is refused,
            // since the process serves the mode it was started in.
            VdiState::Attached(rw) | VdiState::Activated(rw) => {
                if read_write && rw == crate::model::Rw::Ro {
                    return Err(StorageError::IllegalTransition(before, VdiState::Attached(crate::model::Rw::Rw)));
                }
                self.run(&entry, false, move |b, ctx| b.vdi_attach_info(ctx, &id)).await?
            }
        };
        if mine.is_none() {
            let record = DpRecord { dp: dp.clone(), sr, vdi, read_write, active: false, vm: vm.unwrap_or_else(|| "0".into()) };
            self.datapaths().put(record)?;
        }
        self.tasks.changed(Dynamic::Dp(dp));
        Ok(info)
    }

    fn dp_record(&self, dp: &str, sr: &str, vdi: &str, wanted: VdiState) -> StorageResult<DpRecord> {
        self.datapaths().get(dp, sr, vdi).cloned().ok_or(StorageError::IllegalTransition(VdiState::Detached, wanted))
    }

    pub(crate) async fn activate(&self, dp: String, sr: String, vdi: String) -> StorageResult<()> {
        let _turn = self.vdi_turn(&sr, &vdi).await;
        let entry = self.attached_entry(&sr)?;
        let mut record = self.dp_record(&dp, &sr, &vdi, VdiState::Activated(crate::model::Rw::Rw))?;
        if record.active {
            return Ok(());
        }
        if record.read_write && self.being_copied(&sr, &vdi) {
            return Err(copy_under_way(&vdi, "VDI.activate"));
        }
        let already = matches!(superstate(self.datapaths().of_vdi(&sr, &vdi)), VdiState::Activated(_));
        if !already {
            let id = vdi.clone();
            self.run(&entry, true, move |b, ctx| b.vdi_activate(ctx, &id)).await?;
        }
        record.active = true;
        self.datapaths().put(record)?;
        self.tasks.changed(Dynamic::Dp(dp));
        Ok(())
    }

    pub(crate) async fn deactivate(&self, dp: String, sr: String, vdi: String) -> StorageResult<()> {
        let _turn = self.vdi_turn(&sr, &vdi).await;
        let entry = self.attached_entry(&sr)?;
        // A datapath that does not hold the VDI has nothing to deactivate: a no-op, as in
        // xapi's automaton (Detached + Deactivate = Detached), so cleanups can be repeated.
        let Some(mut record) = self.datapaths().get(&dp, &sr, &vdi).cloned() else { return Ok(()) };
        if !record.active {
            return Ok(());
        }
        let others_active = self.datapaths().of_vdi(&sr, &vdi).any(|r| r.dp != dp && r.active);
        let mut finalize = None;
        if !others_active {
            // The VDI stops taking I/O here: a mirror on it ends, drained and finalized.
            finalize = self.before_deactivate(&sr, &vdi).await;
            let id = vdi.clone();
            self.run(&entry, true, move |b, ctx| b.vdi_deactivate(ctx, &id)).await?;
        }
        record.active = false;
        self.datapaths().put(record)?;
        self.tasks.changed(Dynamic::Dp(dp));
        if let Some(send) = finalize {
            self.after_deactivate(send).await?;
        }
        Ok(())
    }

    async fn detach(&self, dp: String, sr: String, vdi: String) -> StorageResult<()> {
        let _turn = self.vdi_turn(&sr, &vdi).await;
        let entry = self.attached_entry(&sr)?;
        let Some(record) = self.datapaths().get(&dp, &sr, &vdi).cloned() else {
            // Detaching what is not attached is a no-op, as in xapi.
            return Ok(());
        };
        if record.active {
            return Err(StorageError::IllegalTransition(record.state(), VdiState::Detached));
        }
        let others = self.datapaths().of_vdi(&sr, &vdi).any(|r| r.dp != dp);
        if !others {
            let id = vdi.clone();
            self.run(&entry, true, move |b, ctx| b.vdi_detach(ctx, &id)).await?;
        }
        self.datapaths().remove(&dp, &sr, &vdi)?;
        self.tasks.changed(Dynamic::Dp(dp));
        Ok(())
    }

    async fn dp_destroy(&self, dp: &str, allow_leak: bool) -> StorageResult<()> {
        let records: Vec<DpRecord> = self.datapaths().of_dp(dp).cloned().collect();
        for r in records {
            // Deactivate and detach each take the VDI's turn, so an activate of the same
            // datapath can come in between: the detach then finds it active, and it is
            // deactivated again (a leak was recorded as let go of, its process left serving).
            for attempt in 1..=3 {
                let Some(r) = self.datapaths().get(&r.dp, &r.sr, &r.vdi).cloned() else { break };
                if r.active
                    && let Err(e) = self.deactivate(r.dp.clone(), r.sr.clone(), r.vdi.clone()).await
                {
                    if !allow_leak {
                        return Err(e);
                    }
                    // The caller accepts a leak (the datapath's process may be dead): go on to
                    // detach, which lets go of whatever is left.
                    tracing::warn!(dp = %r.dp, vdi = %r.vdi, error = %e, "deactivate failed; detaching anyway");
                    let mut inactive = r.clone();
                    inactive.active = false;
                    self.datapaths().put(inactive)?;
                }
                match self.detach(r.dp.clone(), r.sr.clone(), r.vdi.clone()).await {
                    Ok(()) => break,
                    Err(StorageError::IllegalTransition(VdiState::Activated(_), VdiState::Detached)) if attempt < 3 => {
                        tracing::info!(dp = %r.dp, vdi = %r.vdi, "activated while being destroyed; deactivating again");
                    }
                    Err(e) => {
                        if !allow_leak {
                            return Err(e);
                        }
                        // Forget the datapath even though the backend could not let go of the VDI.
                        tracing::warn!(dp = %r.dp, vdi = %r.vdi, error = %e, "datapath destroyed with a leak");
                        self.datapaths().remove(&r.dp, &r.sr, &r.vdi)?;
                        break;
                    }
                }
            }
        }
        Ok(())
    }

    async fn dp_attach_info(&self, a: args::DpAttachInfo) -> StorageResult<AttachInfo> {
        let entry = self.attached_entry(&a.sr)?;
        if self.datapaths().get(&a.dp, &a.sr, &a.vdi).is_none() {
            return Err(StorageError::DoesNotExist("datapath".into(), a.dp));
        }
        self.run(&entry, false, move |b, ctx| b.vdi_attach_info(ctx, &a.vdi)).await
    }
}

enum Guard {
    Read(#[allow(dead_code)] tokio::sync::OwnedRwLockReadGuard<()>),
    Write(#[allow(dead_code)] tokio::sync::OwnedRwLockWriteGuard<()>),
}

impl Dispatch for Mux {
    async fn dispatch(&self, method: String, params: Vec<Value>) -> Result<Value, StorageError> {
        // Text XML cannot carry, once stored (a VDI's name), would make every XML-RPC answer
        // showing it unreadable, `SR.scan` among them: refused as SM refuses such names. The
        // log string is the caller's own and is never stored.
        if let Some((at, text)) = params.iter().find_map(|p| p.find_non_xml_text(&["dbg"])) {
            return Err(crate::backend::errors::illegal_xml_char(&format!("{method}: {at}"), &text));
        }
        let call = Call::decode(&method, &params)?;
        let started = std::time::Instant::now();
        let result = self.call(call).await;
        match &result {
            Ok(_) => tracing::debug!(method = %method, ms = started.elapsed().as_millis() as u64, "call done"),
            Err(e) => tracing::info!(method = %method, ms = started.elapsed().as_millis() as u64, error = %e, "call failed"),
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A VDI's lock leaves the map when its last holder or waiter lets go: it once stayed for
    /// every VDI ever named, made-up ids of any length included, for the life of the host.
    #[tokio::test]
    async fn a_vdi_turn_is_forgotten_once_nobody_holds_or_awaits_it() {
        let turns = Mutex::new(HashMap::new());
        let count = || turns.lock().map(|t| t.len()).unwrap_or(usize::MAX);
        drop(take_turn(&turns, "sr", "a").await);
        assert_eq!(count(), 0, "a turn taken and let go stays");

        // Held, with a waiter: the waiter gets it next, and only its drop forgets it.
        let held = take_turn(&turns, "sr", "b").await;
        let mut waiter = Box::pin(take_turn(&turns, "sr", "b"));
        assert!(futures_poll_once(waiter.as_mut()).is_none(), "two holders of one turn");
        drop(held);
        assert_eq!(count(), 1, "the turn went while a waiter still wanted it");
        let second = waiter.await;
        assert_eq!(count(), 1);
        drop(second);
        assert_eq!(count(), 0);

        // A waiter cancelled before its turn does not keep it either.
        let held = take_turn(&turns, "sr", "c").await;
        let mut cancelled = Box::pin(take_turn(&turns, "sr", "c"));
        assert!(futures_poll_once(cancelled.as_mut()).is_none());
        drop(cancelled);
        drop(held);
        assert_eq!(count(), 0, "a cancelled waiter kept the turn in the map");
    }

    /// Polls `f` once with a waker that does nothing.
    fn futures_poll_once<F: std::future::Future>(f: std::pin::Pin<&mut F>) -> Option<F::Output> {
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        match f.poll(&mut cx) {
            std::task::Poll::Ready(v) => Some(v),
            std::task::Poll::Pending => None,
        }
    }
}
