//! The seam between the engine and an SR type. Each SR type (SMAPIv1 `ext`, SMAPIv3 `qcow2`)
//! implements [`Backend`]; the binary registers them with the [`Mux`](crate::mux::Mux) by type
//! name, and the engine never names one.
//!
//! The engine owns what is the same for every SR type: the SR registry (id, type, names,
//! device_config, the SR's folder), datapath states and their transitions, tasks and updates.
//! A backend owns what is inside its SR's folder and its datapath processes. Calls reach a
//! backend with the SR already resolved ([`SrContext`]) and, for datapath calls, only on a
//! transition of the VDI's combined state (the first datapath to attach a VDI attaches it, the
//! last to detach it detaches it), as xapi's SMAPIv1 wrapper does.
//!
//! Methods are blocking: the mux runs them on tokio's blocking pool, with the SR's lock held
//! (shared for reads, exclusive for changes), so a backend needs no locking of its own between
//! calls on one SR. A method a backend does not provide answers `Unimplemented`.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::model::{AttachInfo, StorageError, VdiInfo};
use crate::rpc::marshal::Map;

/// A storage call's outcome.
pub type StorageResult<T> = Result<T, StorageError>;

/// An SR as its backend sees it.
#[derive(Clone, Debug)]
pub struct SrContext {
    /// The SR's id (xapi's SR uuid).
    pub sr: String,
    /// The SR's folder: everything the backend stores for this SR lives here.
    pub dir: PathBuf,
    /// A short folder for this SR's sockets and process files. Unix socket paths are limited
    /// to 107 bytes, so this is kept short (`<root>/run/<n>`); the backend keeps names inside
    /// it short too.
    pub run_dir: PathBuf,
    /// The SR's device_config, as given at `SR.create` (and returned by the backend then).
    pub device_config: Map<String>,
}

/// What a backend reports of its SR's space (`SR.stat`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SrSpace {
    /// Bytes the SR can hold.
    pub total: i64,
    /// Bytes still free.
    pub free: i64,
}

/// The VDI fields a caller may change after creation.
#[derive(Clone, Debug, PartialEq)]
pub enum VdiChange {
    /// `VDI.set_content_id`.
    ContentId(String),
    /// `VDI.set_name_label`.
    NameLabel(String),
    /// `VDI.set_name_description`.
    NameDescription(String),
    /// `VDI.set_persistent`.
    Persistent(bool),
    /// `VDI.add_to_sm_config`.
    AddSmConfig(String, String),
    /// `VDI.remove_from_sm_config`.
    RemoveSmConfig(String),
    /// `SR.update_snapshot_info_dest`: mark a VDI as a snapshot of another.
    SnapshotOf {
        /// The VDI it is a snapshot of.
        of: String,
        /// When the snapshot was taken.
        time: String,
    },
}

impl VdiChange {
    /// Applies the change to a VDI's record (whatever the SR type keeps it in).
    pub fn apply(&self, info: &mut VdiInfo) {
        match self {
            VdiChange::ContentId(c) => info.content_id = c.clone(),
            VdiChange::NameLabel(n) => info.name_label = n.clone(),
            VdiChange::NameDescription(d) => info.name_description = d.clone(),
            VdiChange::Persistent(p) => info.persistent = *p,
            VdiChange::AddSmConfig(k, v) => {
                info.sm_config.insert(k.clone(), v.clone());
            }
            VdiChange::RemoveSmConfig(k) => {
                info.sm_config.shift_remove(k);
            }
            VdiChange::SnapshotOf { of, time } => {
                info.is_a_snapshot = true;
                info.snapshot_of = of.clone();
                info.snapshot_time = time.clone();
            }
        }
    }
}

/// The errors a backend answers with, in the codes xapi and its SMAPIv1 plugins use, shared by
/// every SR type (each maps its own format's failures onto these).
pub mod errors {
    use std::fmt::Display;
    use std::io;

    use crate::model::StorageError;

    /// `Backend_error ("SR_BACKEND_FAILURE", [kind; message; ""])`: xapi's generic backend
    /// failure with its three parameters (status, stdout, stderr).
    pub fn failure(kind: &str, message: impl Display) -> StorageError {
        StorageError::BackendError("SR_BACKEND_FAILURE".to_owned(), vec![kind.to_owned(), message.to_string(), String::new()])
    }

    /// `Backend_error ("SR_NOT_EMPTY", [sr; why])`: an SR is destroyed only once its VDIs are,
    /// as SM's file SRs refuse (`SRNotEmpty`, "VDIs still exist in SR").
    pub fn not_empty(sr: &str, vdi: &str) -> StorageError {
        StorageError::BackendError("SR_NOT_EMPTY".to_owned(), vec![sr.to_owned(), format!("VDIs still exist in the SR, {vdi} among them")])
    }

    /// `Backend_error ("VDI_IN_USE", [vdi; operation])`.
    pub fn in_use(vdi: &str, operation: &str) -> StorageError {
        StorageError::BackendError("VDI_IN_USE".to_owned(), vec![vdi.to_owned(), operation.to_owned()])
    }

    /// A write (a read-write attach, a resize) of a read-only VDI, a snapshot: `VDI_READONLY`.
    pub fn read_only(vdi: &str) -> StorageError {
        StorageError::BackendError("VDI_READONLY".to_owned(), vec![vdi.to_owned()])
    }

    /// SM's `SRNoSpace` (code 44), as xapi receives it (and turns into
    /// `SR_SOURCE_SPACE_INSUFFICIENT` in a migration).
    pub fn no_space(detail: impl Display) -> StorageError {
        StorageError::BackendError(
            "SR_BACKEND_FAILURE_44".to_owned(),
            vec![String::new(), "There is insufficient space".to_owned(), detail.to_string()],
        )
    }

    /// The longest chain (the VDI and the images it reads through) a snapshot or clone may
    /// make: SM's `MAX_CHAIN_SIZE`. Every read of an image walks its chain, and tapmirror opens
    /// no chain deeper than 256.
    pub const MAX_CHAIN: usize = 30;

    /// SM's `SnapshotChainTooLong` (code 109): a snapshot or clone of `vdi`, whose chain is
    /// `depth` images long, would pass [`MAX_CHAIN`]. Refused before anything changes.
    pub fn chain_too_long(vdi: &str, depth: usize) -> StorageError {
        StorageError::BackendError(
            "SR_BACKEND_FAILURE_109".to_owned(),
            vec![
                String::new(),
                "The snapshot chain is too long".to_owned(),
                format!("VDI {vdi} reads through a chain of {depth} images; a snapshot or clone would pass the limit of {MAX_CHAIN} (destroying the VDI's latest snapshot folds that snapshot's base into the VDI)"),
            ],
        )
    }

    /// SM's `IllegalXMLChar` (code 447): text XML cannot carry (`at` names the argument) was
    /// refused before anything changed, as SM refuses such VDI names.
    pub fn illegal_xml_char(at: &str, text: &str) -> StorageError {
        StorageError::BackendError(
            "SR_BACKEND_FAILURE_447".to_owned(),
            vec![
                String::new(),
                "Illegal XML character.".to_owned(),
                format!("{at} {text:?} holds a character XML cannot carry (a control character, U+FFFE or U+FFFF); names and descriptions must be XML text"),
            ],
        )
    }

    /// Whether an I/O error is a full file system or quota (`ENOSPC`, `EDQUOT`).
    pub fn is_no_space(e: &io::Error) -> bool {
        matches!(e.kind(), io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded)
    }

    /// An I/O failure of the SR's own files (`what` says what was being done, with the path).
    pub fn io(what: impl Display, e: &io::Error) -> StorageError {
        if is_no_space(e) { no_space(format!("{what}: {e}")) } else { failure("io", format!("{what}: {e}")) }
    }
}

fn unimplemented<T>(what: &str) -> StorageResult<T> {
    Err(StorageError::Unimplemented(what.to_owned()))
}

/// One SR type.
#[allow(unused_variables)]
pub trait Backend: Send + Sync + 'static {
    /// The SMAPI generation of the SR type, which picks how its VDIs migrate: 1 (VHD, as
    /// SMAPIv1 does it: snapshot, copy, compose) or 3 (one full mirror, as SMAPIv3 does it).
    fn smapi_version(&self) -> u32 {
        1
    }

    /// The format of its VDIs' images (`vhd`, `qcow2`): a source tells the destination, as
    /// xapi's `image-format`, so that the destination prepares for the right procedure.
    fn image_format(&self) -> &'static str {
        "vhd"
    }

    /// `SR.create`: make a new, empty SR in `sr.dir` (which exists and is empty). Answers the
    /// device_config to keep for it.
    fn sr_create(&self, sr: &SrContext, name_label: &str, physical_size: i64) -> StorageResult<Map<String>> {
        unimplemented("SR.create")
    }

    /// `SR.attach`: check the SR's storage is sound, and take up its datapaths again:
    /// `datapaths` lists each VDI the engine's records say is attached, with whether it is
    /// also active and read-write. The backend re-adopts the processes that still run for
    /// them, starts the ones that should run but do not, and reaps anything of its own that
    /// belongs to no VDI in the list (after a restart of the host).
    fn sr_attach(&self, sr: &SrContext, datapaths: &[AttachedVdi]) -> StorageResult<()> {
        Ok(())
    }

    /// The VDIs of the SR whose datapath process has died (crashed, killed), whose guests'
    /// connections broke. Cheap: the host's supervisor asks often, without the SR's lock.
    fn sr_dead_datapaths(&self, sr: &SrContext) -> Vec<String> {
        Vec::new()
    }

    /// Starts `vdi`'s datapath again if its process has died: same socket, the state it was
    /// in (attached, or active). Answers whether it did. The engine holds the SR exclusively.
    fn vdi_restart_datapath(&self, sr: &SrContext, vdi: &str) -> StorageResult<bool> {
        Ok(false)
    }

    /// `SR.detach`: stop using the SR. The engine only calls it when no VDI is attached.
    fn sr_detach(&self, sr: &SrContext) -> StorageResult<()> {
        Ok(())
    }

    /// `SR.destroy`: remove everything the SR holds. The engine removes `sr.dir` afterwards.
    fn sr_destroy(&self, sr: &SrContext) -> StorageResult<()> {
        Ok(())
    }

    /// `SR.scan`: every VDI in the SR.
    fn sr_scan(&self, sr: &SrContext) -> StorageResult<Vec<VdiInfo>> {
        unimplemented("SR.scan")
    }

    /// `SR.stat`'s space figures.
    fn sr_space(&self, sr: &SrContext) -> StorageResult<SrSpace> {
        unimplemented("SR.stat")
    }

    /// `VDI.create`: a new VDI of `info.virtual_size` bytes. The backend picks the VDI's id
    /// (`info.vdi` is ignored) and answers the stored record.
    fn vdi_create(&self, sr: &SrContext, info: &VdiInfo) -> StorageResult<VdiInfo> {
        unimplemented("VDI.create")
    }

    /// `VDI.destroy`.
    fn vdi_destroy(&self, sr: &SrContext, vdi: &str) -> StorageResult<()> {
        unimplemented("VDI.destroy")
    }

    /// `VDI.stat`.
    fn vdi_stat(&self, sr: &SrContext, vdi: &str) -> StorageResult<VdiInfo> {
        unimplemented("VDI.stat")
    }

    /// `VDI.snapshot`: a read-only copy of `info.vdi` as it is now, taking the other fields of
    /// `info` (name, sm_config, …) for the new VDI. Works while the VDI is active: the guest's
    /// writes after the instant of the snapshot land only in the VDI.
    fn vdi_snapshot(&self, sr: &SrContext, info: &VdiInfo) -> StorageResult<VdiInfo> {
        unimplemented("VDI.snapshot")
    }

    /// `VDI.clone`: a writable copy of `info.vdi`.
    fn vdi_clone(&self, sr: &SrContext, info: &VdiInfo) -> StorageResult<VdiInfo> {
        unimplemented("VDI.clone")
    }

    /// `VDI.resize`: answers the new virtual size.
    fn vdi_resize(&self, sr: &SrContext, vdi: &str, new_size: i64) -> StorageResult<i64> {
        unimplemented("VDI.resize")
    }

    /// `VDI.compose`: layer the child VDI's data onto the parent's, so that the child reads as
    /// the parent with the child's writes on top.
    fn vdi_compose(&self, sr: &SrContext, parent: &str, child: &str) -> StorageResult<()> {
        unimplemented("VDI.compose")
    }

    /// SM's `reset_leaf`, for a VDI set non-persistent: throw away what the VDI's own image
    /// holds, so that it reads as its parent again (the content it had when
    /// `VDI.set_persistent false` made that parent), at its own size. Refused while the VDI is
    /// attached, and for a VDI with no parent.
    fn vdi_reset_leaf(&self, sr: &SrContext, vdi: &str) -> StorageResult<()> {
        unimplemented("VDI.epoch_begin")
    }

    /// Changes a VDI's record (content_id, names, sm_config, …), persisted atomically.
    fn vdi_update(&self, sr: &SrContext, vdi: &str, change: &VdiChange) -> StorageResult<()> {
        unimplemented("VDI update")
    }

    /// `VDI.similar_content`: VDIs holding similar data, nearest first.
    fn vdi_similar_content(&self, sr: &SrContext, vdi: &str) -> StorageResult<Vec<VdiInfo>> {
        unimplemented("VDI.similar_content")
    }

    /// `VDI.attach*` (the VDI's first datapath): make the VDI reachable and say how.
    fn vdi_attach(&self, sr: &SrContext, vdi: &str, read_write: bool) -> StorageResult<AttachInfo> {
        unimplemented("VDI.attach")
    }

    /// `VDI.activate*`: the VDI starts taking I/O.
    fn vdi_activate(&self, sr: &SrContext, vdi: &str) -> StorageResult<()> {
        unimplemented("VDI.activate")
    }

    /// `VDI.deactivate`: wait for outstanding I/O (bounded) and stop taking I/O.
    fn vdi_deactivate(&self, sr: &SrContext, vdi: &str) -> StorageResult<()> {
        unimplemented("VDI.deactivate")
    }

    /// `VDI.detach` (the VDI's last datapath): the VDI is no longer reachable.
    fn vdi_detach(&self, sr: &SrContext, vdi: &str) -> StorageResult<()> {
        unimplemented("VDI.detach")
    }

    /// How an attached VDI is reached (`DP.attach_info`).
    fn vdi_attach_info(&self, sr: &SrContext, vdi: &str) -> StorageResult<AttachInfo> {
        unimplemented("DP.attach_info")
    }

    // The data-path side of a storage migration (`DATA.*`). The engine runs the stages and
    // their rollback; these are the steps only a backend can take, on a VDI's datapath.

    /// Destination, pass fds: serve NBD for the attached VDI on `conn`, an accepted connection
    /// whose HTTP exchange is over (the peer speaks NBD next, client side), under any export
    /// name and with the greeting of the SR type's SM counterpart (tapdisk's old style for
    /// VHD, SMAPIv3's fixed newstyle). The datapath keeps the connection until the peer closes
    /// it.
    fn vdi_serve_nbd(&self, sr: &SrContext, vdi: &str, conn: OwnedFd) -> StorageResult<()> {
        unimplemented("NBD import")
    }

    /// Source, pass fds: mirror every guest write on the active VDI's datapath into `target`,
    /// an NBD connection (server side past its HTTP exchange) to export `export`. `Sync` mirrors
    /// new writes only (a snapshot and a copy move the rest); `Full` also copies the whole disk
    /// in the background (SMAPIv3), into a target made for it that reads as zeroes (a new
    /// VDI), so holes need not travel. A guest write completes only when both sides have it.
    /// `rate` caps a full mirror's background copy from its first byte (bytes of data per
    /// second, 0: no cap; see [`Backend::vdi_mirror_rate`]).
    fn vdi_mirror_attach(&self, sr: &SrContext, vdi: &str, target: OwnedFd, export: &str, mode: MirrorMode, rate: u64) -> StorageResult<()> {
        unimplemented("mirror")
    }

    /// Source: the mirror's state on the VDI's datapath (`None` state when none is attached).
    fn vdi_mirror_status(&self, sr: &SrContext, vdi: &str) -> StorageResult<MirrorStatus> {
        unimplemented("mirror status")
    }

    /// How many NBD connections handed to the VDI's datapath ([`Backend::vdi_serve_nbd`]) it
    /// serves now: a receive's leaf is finalized only once the source's mirror connection has
    /// gone (readers on the datapath's own socket do not count).
    fn vdi_passed_connections(&self, sr: &SrContext, vdi: &str) -> StorageResult<u64> {
        unimplemented("connection count")
    }

    /// Source: caps a full mirror's background copy at `bytes_per_s` bytes of data per second
    /// (0: no cap), from its next request (a job's share of its bandwidth limit).
    fn vdi_mirror_rate(&self, sr: &SrContext, vdi: &str, bytes_per_s: u64) -> StorageResult<()> {
        unimplemented("mirror rate")
    }

    /// Source: stop mirroring (after in-flight writes); the guest goes on locally.
    fn vdi_mirror_detach(&self, sr: &SrContext, vdi: &str) -> StorageResult<()> {
        unimplemented("mirror detach")
    }

    /// Source, finalize: wait until no write is outstanding on the datapath, locally or on its
    /// mirror, for at most `timeout`.
    fn vdi_drain(&self, sr: &SrContext, vdi: &str, timeout: Duration) -> StorageResult<()> {
        unimplemented("drain")
    }

    /// Checksums (crc32, IEEE) of the VDI's content in blocks of `block` bytes (the last one
    /// shorter), read from its image. Used to compare a migrated VDI with its source.
    fn vdi_checksums(&self, sr: &SrContext, vdi: &str, block: u64) -> StorageResult<Vec<u32>> {
        unimplemented("checksums")
    }

    /// Source, copy: write the VDI's content into `dest`, an NBD connection (past its HTTP
    /// exchange) to export `export`, which reads as zeroes before the copy. Only what the VDI
    /// holds is sent: allocated data, as data or zeroes; with `base` (a VDI of this SR whose
    /// content the destination already holds), only what differs from it. Reports
    /// `(bytes done, bytes to do)` through `ctl.progress`; stops with `Cancelled` when
    /// `ctl.cancel` fires; paces its data by `ctl.throttle` when there is one. Called without the SR's lock: the engine keeps the VDI (a snapshot) from
    /// changing meanwhile.
    fn vdi_copy_into(&self, sr: &SrContext, vdi: &str, base: Option<&str>, dest: OwnedFd, export: &str, ctl: &CopyControl<'_>) -> StorageResult<CopyStats> {
        unimplemented("copy")
    }
}

/// Answers how long a request of that many data bytes must wait (zero: go at once): a pace
/// several copies share, under one bandwidth limit that may change while they run.
pub type Throttle = std::sync::Arc<dyn Fn(u64) -> Duration + Send + Sync>;

/// How a copy is followed and steered.
pub struct CopyControl<'a> {
    /// Called with `(bytes done, bytes to do)`.
    pub progress: &'a (dyn Fn(u64, u64) + Sync),
    /// Fires to stop the copy (it then answers `Cancelled`).
    pub cancel: &'a CancellationToken,
    /// The pace, when the copy shares a bandwidth limit.
    pub throttle: Option<Throttle>,
}

/// How a datapath mirrors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MirrorMode {
    /// New writes only.
    Sync,
    /// New writes, and a background copy of everything.
    Full,
}

/// A mirror's state on a datapath.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MirrorHealth {
    /// No mirror attached.
    None,
    /// Mirroring; a full mirror still has data to copy.
    Syncing,
    /// Mirroring, and the target holds everything (a sync mirror is ready at once).
    Ready,
    /// The target failed: the mirror stopped, the guest went on locally.
    Failed,
}

/// [`Backend::vdi_mirror_status`]'s answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MirrorStatus {
    /// The state.
    pub state: MirrorHealth,
    /// Bytes a full mirror has still to copy.
    pub bytes_left: u64,
    /// Bytes of guest writes mirrored so far.
    pub bytes_mirrored: u64,
    /// Why the mirror failed (the target's error, its silence), when the datapath says.
    pub failure: Option<String>,
}

/// What a copy moved.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CopyStats {
    /// The VDI's size.
    pub size: u64,
    /// Bytes sent as data.
    pub data_bytes: u64,
    /// Bytes written as zeroes.
    pub zero_bytes: u64,
}

/// A VDI the engine's records say is attached (for [`Backend::sr_attach`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttachedVdi {
    /// The VDI.
    pub vdi: String,
    /// Attached read-write.
    pub read_write: bool,
    /// Also activated.
    pub active: bool,
}

/// Checks that an id a caller gave (an SR or VDI id) can name a single path component inside
/// its folder: not empty, not `.` or `..`, no `/`, no NUL, no leading `.` (the backends keep
/// their own files there), at most 128 bytes. Answers the id back.
pub fn safe_component<'a>(kind: &str, id: &'a str) -> Result<&'a str, StorageError> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && !id.starts_with('.')
        && !id.contains('/')
        && !id.contains('\0')
        && !id.contains('\\');
    if ok {
        Ok(id)
    } else {
        Err(StorageError::DoesNotExist(kind.to_owned(), id.to_owned()))
    }
}

/// `dir/id`, for an id that passed [`safe_component`]; an id that did not is `DoesNotExist`.
pub fn inside(dir: &Path, kind: &str, id: &str) -> Result<PathBuf, StorageError> {
    Ok(dir.join(safe_component(kind, id)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_that_would_leave_their_folder_are_refused() {
        for bad in ["", ".", "..", "../x", "a/b", "/etc/passwd", ".hidden", "a\0b", "a\\b", &"x".repeat(129)] {
            assert!(safe_component("VDI", bad).is_err(), "{bad:?}");
        }
        for good in ["3f1c0e9a-7a51-4b43-9a57-1d7a1a6c2b11", "disk0.vhd", "a..b"] {
            assert_eq!(safe_component("VDI", good), Ok(good));
        }
        assert_eq!(inside(Path::new("/sr"), "VDI", "v1"), Ok(PathBuf::from("/sr/v1")));
        assert_eq!(inside(Path::new("/sr"), "VDI", "../v1"), Err(StorageError::DoesNotExist("VDI".into(), "../v1".into())));
    }
}
