//! Datapaths: one `tapmirror serve` per attached VDI, serving its qcow2 volume (and backing
//! chain) over NBD on a Unix socket. The process manager itself (states, folders, quiesce, the migration's data path,
//! recovery after a restart) is tapmirror's [`tapmirror::datapaths`], shared with the `ext`
//! SR: it knows images and ids, not SRs and VDIs. This module is the adapter: an SR is a
//! [`Group`] (named by the SR's id, its folders under the SR's `run_dir`), a VDI's id is the
//! datapath's id and export name, and the engine's types go in and out here (its errors in
//! [`crate::errors::datapath`]). It stays in each backend because it names the engine's types,
//! which tapmirror may not, and one backend may not use another.

use sxm_engine::backend::{AttachedVdi, MirrorHealth, MirrorMode, MirrorStatus, SrContext, StorageResult};
use sxm_engine::model::{AttachInfo, Implementation};
use tapmirror::datapaths::{Endpoint, Group, MirrorReport, Wanted};
use tapmirror::mirror::{MirrorMode as Mode, MirrorState};

pub use tapmirror::datapaths::{DRAIN_TIMEOUT, Datapaths, OWNER_FILE};

/// The image format this backend's datapaths serve.
pub(crate) const FORMAT: &str = "qcow2";

/// The SR's datapaths.
pub(crate) fn group(sr: &SrContext) -> Group<'_> {
    Group { name: &sr.sr, run_dir: &sr.run_dir }
}

/// The engine's list of attached VDIs, as the datapaths wanted.
pub(crate) fn wanted(list: &[AttachedVdi]) -> Vec<Wanted<'_>> {
    list.iter().map(|a| Wanted { id: &a.vdi, read_write: a.read_write, active: a.active }).collect()
}

pub(crate) fn attach_info(e: Endpoint) -> AttachInfo {
    AttachInfo { implementations: vec![Implementation::nbd_unix(&e.socket.display().to_string(), &e.export)] }
}

pub(crate) fn mode(m: MirrorMode) -> Mode {
    match m {
        MirrorMode::Sync => Mode::Sync,
        MirrorMode::Full => Mode::Full,
    }
}

pub(crate) fn mirror_status(r: MirrorReport) -> MirrorStatus {
    let state = match r.state {
        MirrorState::None => MirrorHealth::None,
        MirrorState::Syncing => MirrorHealth::Syncing,
        MirrorState::Ready => MirrorHealth::Ready,
        MirrorState::Failed => MirrorHealth::Failed,
    };
    MirrorStatus { state, bytes_left: r.bytes_left, bytes_mirrored: r.bytes_mirrored, failure: r.failure }
}

/// [`tapmirror::datapaths::block_on`], its one failure (no runtime) as this backend's.
pub(crate) fn block_on<F>(f: F) -> StorageResult<F::Output>
where
    F: std::future::Future + Send,
    F::Output: Send,
{
    tapmirror::datapaths::block_on(f).map_err(|e| crate::errors::failure("datapath", format!("starting a runtime for a control call: {e}")))
}
