//! The storage interface's records and variants (`../shared/research/xapi-sxm.md` §3), with the
//! defaults xapi's `storage_interface.ml` declares. Fields are declared in the order xapi sends
//! them, so recorded messages re-encode byte for byte.

use crate::record;
use crate::rpc::Value;
use crate::rpc::marshal::{DecodeError, Map, Marshal, payload, tagged, variant};

/// `Date.never`: xapi's "no time" timestamp.
pub const NEVER: &str = "19700101T00:00:00Z";

record! {
    /// `vdi_info`: what a VDI is. Only `vdi` and `name_label` have no default.
    pub struct VdiInfo {
        /// Backend-private key/value pairs (e.g. `base_mirror`, `vhd-parent`).
        sm_config: Map<String> [def = Map::new()],
        /// May be attached by several hosts at once.
        sharable: bool [def = false],
        /// Survives a VM reboot (non-persistent VDIs are reset).
        persistent: bool [def = true],
        /// Bytes the VDI occupies in its SR.
        physical_utilisation: i64 [def = 0],
        /// Size the guest sees, in bytes.
        virtual_size: i64 [def = 0],
        /// Changed-block tracking is on.
        cbt_enabled: bool [def = false],
        /// Read-only (snapshots are).
        read_only: bool [def = false],
        /// The VDI this is a snapshot of, or "".
        snapshot_of: String [def = String::new()],
        /// When the snapshot was taken (`YYYYMMDDTHH:MM:SSZ`).
        snapshot_time: String [def = NEVER.to_owned()],
        /// Is a snapshot.
        is_a_snapshot: bool [def = false],
        /// Pool metadata VDI marker.
        metadata_of_pool: String [def = String::new()],
        /// The VDI's type (`user`, `system`, `suspend`, …).
        ty: String [def = "user".to_owned()],
        /// Free text.
        name_description: String [def = String::new()],
        /// The VDI's name.
        name_label: String [req],
        /// Identifies the data: two VDIs with the same content_id hold the same bytes.
        content_id: String [def = String::new()],
        /// The xapi uuid, when known.
        uuid: Option<String> [opt],
        /// The VDI's id within its SR (its location).
        vdi: String [req],
    }
}

impl VdiInfo {
    /// A VDI record with every default, named `name_label`.
    pub fn new(vdi: impl Into<String>, name_label: impl Into<String>) -> VdiInfo {
        VdiInfo {
            sm_config: Map::new(),
            sharable: false,
            persistent: true,
            physical_utilisation: 0,
            virtual_size: 0,
            cbt_enabled: false,
            read_only: false,
            snapshot_of: String::new(),
            snapshot_time: NEVER.to_owned(),
            is_a_snapshot: false,
            metadata_of_pool: String::new(),
            ty: "user".to_owned(),
            name_description: String::new(),
            name_label: name_label.into(),
            content_id: String::new(),
            uuid: None,
            vdi: vdi.into(),
        }
    }
}

/// `sr_health`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SrHealth {
    /// Working.
    Healthy,
    /// Recovering (e.g. a cluster stack rejoining).
    Recovering,
    /// Not reachable from this host.
    Unreachable,
    /// Not available.
    Unavailable,
}

impl Marshal for SrHealth {
    fn to_value(&self) -> Value {
        Value::String(
            match self {
                SrHealth::Healthy => "Healthy",
                SrHealth::Recovering => "Recovering",
                SrHealth::Unreachable => "Unreachable",
                SrHealth::Unavailable => "Unavailable",
            }
            .to_owned(),
        )
    }
    fn from_value(v: &Value) -> Result<Self, DecodeError> {
        match variant(v)? {
            (t, None) if t == "healthy" => Ok(SrHealth::Healthy),
            (t, None) if t == "recovering" => Ok(SrHealth::Recovering),
            (t, None) if t == "unreachable" => Ok(SrHealth::Unreachable),
            (t, None) if t == "unavailable" => Ok(SrHealth::Unavailable),
            (t, _) => Err(DecodeError::new(format!("unknown SR health {t:?}"))),
        }
    }
}

record! {
    /// `sr_info`: `SR.stat`'s answer.
    pub struct SrInfo {
        /// Health.
        health: SrHealth [req],
        /// Shared through a cluster stack.
        clustered: bool [def = false],
        /// Free bytes.
        free_space: i64 [req],
        /// Total bytes.
        total_space: i64 [req],
        /// Free text.
        name_description: String [req],
        /// The SR's name.
        name_label: String [req],
        /// The SR's uuid, when the backend knows it.
        sr_uuid: Option<String> [opt],
        /// sxm's addition: the SR type (`ext`, `qcow2`). Callers that do not know it ignore it.
        sr_type: Option<String> [opt],
        /// sxm's addition: the SR type's SMAPI generation (1 or 3).
        smapi_version: Option<i64> [opt],
    }
}

/// One way to reach an attached VDI (`implementation`).
#[derive(Clone, Debug, PartialEq)]
pub enum Implementation {
    /// A Xen PV disk backend.
    XenDisk {
        /// The backend type (`vbd3`, …).
        backend_type: String,
        /// Backend extras.
        extra: Map<String>,
        /// Backend parameters.
        params: String,
    },
    /// A block device path.
    BlockDevice {
        /// The device.
        path: String,
    },
    /// A file.
    File {
        /// The file.
        path: String,
    },
    /// An NBD export: `nbd:unix:<socket>:exportname=<name>`.
    Nbd {
        /// The export's URI in xapi's form.
        uri: String,
    },
}

/// `nbd:unix:<socket>:exportname=<name>` (xapi's, and QEMU's legacy form) as
/// `nbd+unix:///<name>?socket=<socket>`, which nbdinfo, nbdcopy and libnbd take.
pub fn standard_nbd_uri(uri: &str) -> Option<String> {
    let (socket, export) = uri.strip_prefix("nbd:unix:")?.rsplit_once(":exportname=")?;
    Some(format!("nbd+unix:///{export}?socket={socket}"))
}

record! {
    /// Payload of `XenDisk`.
    pub struct XenDiskArgs {
        backend_type: String [req],
        extra: Map<String> [def = Map::new()],
        params: String [req],
    }
}

record! {
    /// Payload of `BlockDevice` and `File`.
    pub struct PathArgs {
        path: String [req],
    }
}

record! {
    /// Payload of `Nbd`.
    pub struct UriArgs {
        uri: String [req],
    }
}

impl Marshal for Implementation {
    fn to_value(&self) -> Value {
        match self {
            Implementation::XenDisk { backend_type, extra, params } => tagged(
                "XenDisk",
                XenDiskArgs { backend_type: backend_type.clone(), extra: extra.clone(), params: params.clone() }.to_value(),
            ),
            Implementation::BlockDevice { path } => tagged("BlockDevice", PathArgs { path: path.clone() }.to_value()),
            Implementation::File { path } => tagged("File", PathArgs { path: path.clone() }.to_value()),
            Implementation::Nbd { uri } => tagged("Nbd", UriArgs { uri: uri.clone() }.to_value()),
        }
    }
    fn from_value(v: &Value) -> Result<Self, DecodeError> {
        let (tag, p) = variant(v)?;
        Ok(match tag.as_str() {
            "xendisk" => {
                let a = XenDiskArgs::from_value(payload("XenDisk", p)?)?;
                Implementation::XenDisk { backend_type: a.backend_type, extra: a.extra, params: a.params }
            }
            "blockdevice" => Implementation::BlockDevice { path: PathArgs::from_value(payload("BlockDevice", p)?)?.path },
            "file" => Implementation::File { path: PathArgs::from_value(payload("File", p)?)?.path },
            "nbd" => Implementation::Nbd { uri: UriArgs::from_value(payload("Nbd", p)?)?.uri },
            other => return Err(DecodeError::new(format!("unknown implementation {other:?}"))),
        })
    }
}

impl Implementation {
    /// The NBD implementation for an export on a Unix socket, in xapi's URI form.
    pub fn nbd_unix(socket: &str, export: &str) -> Implementation {
        Implementation::Nbd { uri: format!("nbd:unix:{socket}:exportname={export}") }
    }
}

record! {
    /// `backend`: how an attached VDI can be reached (`VDI.attach2`/`attach3`, `DP.attach_info`).
    pub struct AttachInfo {
        /// Every way, best first.
        implementations: Vec<Implementation> [req],
    }
}

record! {
    /// `attach_info`: the deprecated `VDI.attach`'s answer, a single path for the VM's disk.
    /// Old xapis still call it during a migration and ignore the answer; it must decode.
    pub struct LegacyAttachInfo {
        // In xapi's order on the wire.
        /// Keys for the VM's xenstore.
        xenstore_data: Map<String> [req],
        /// Why not O_DIRECT, when not.
        o_direct_reason: String [req],
        /// Whether the VM's backend opens it with O_DIRECT.
        o_direct: bool [req],
        /// The disk's path (here the NBD URI of the datapath).
        params: String [req],
    }
}

impl From<&AttachInfo> for LegacyAttachInfo {
    /// As xapi's SMAPIv1 wrapper answers `VDI.attach`: the first implementation's path,
    /// O_DIRECT on, no xenstore keys.
    fn from(info: &AttachInfo) -> LegacyAttachInfo {
        let params = match info.implementations.first() {
            Some(Implementation::XenDisk { params, .. }) => format!("/dev/{params}"),
            Some(Implementation::BlockDevice { path } | Implementation::File { path }) => path.clone(),
            Some(Implementation::Nbd { uri }) => uri.clone(),
            None => String::new(),
        };
        LegacyAttachInfo { params, o_direct: true, o_direct_reason: String::new(), xenstore_data: Map::new() }
    }
}

record! {
    /// `DP.stat_vdi`'s answer: each datapath's state and their combination.
    pub struct DpStatVdi {
        /// State per datapath.
        dps: Map<crate::model::VdiState> [req],
        /// The combined state.
        superstate: crate::model::VdiState [req],
    }
}

/// A mirror's role on this host (`Mirror.state`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MirrorState {
    /// Destination side.
    Receiving,
    /// Source side, mirroring.
    Sending,
    /// Source side, copying.
    Copying,
}

impl Marshal for MirrorState {
    fn to_value(&self) -> Value {
        Value::String(format!("{self:?}"))
    }
    fn from_value(v: &Value) -> Result<Self, DecodeError> {
        match variant(v)?.0.as_str() {
            "receiving" => Ok(MirrorState::Receiving),
            "sending" => Ok(MirrorState::Sending),
            "copying" => Ok(MirrorState::Copying),
            other => Err(DecodeError::new(format!("unknown mirror state {other:?}"))),
        }
    }
}

record! {
    /// `Mirror.t`: `DATA.MIRROR.stat`'s answer.
    pub struct Mirror {
        /// The mirror's target failed (source side).
        failed: bool [req],
        /// This host's roles in the mirror.
        state: Vec<MirrorState> [req],
        /// The destination VDI.
        dest_vdi: String [req],
        /// The source VDI.
        source_vdi: String [req],
    }
}

record! {
    /// `Vhd_mirror`'s payload: what the destination prepared for a SMAPIv1 source.
    pub struct VhdMirror {
        /// The leaf snapshot that makes the leaf a differencing disk.
        dummy_vdi: String [req],
        /// The parent that receives the copied base.
        copy_diffs_to: String [req],
        /// The content_id of the similar VDI the parent was cloned from.
        copy_diffs_from: Option<String> [opt],
        /// The datapath holding the leaf active.
        mirror_datapath: String [req],
        /// The leaf that receives mirrored writes.
        mirror_vdi: VdiInfo [req],
    }
}

record! {
    /// `SMAPIv3_mirror`'s payload.
    pub struct Smapiv3Mirror {
        /// The NBD export receiving the mirror.
        nbd_export: String [req],
        /// The datapath holding the volume active.
        mirror_datapath: String [req],
        /// The volume receiving the mirror.
        mirror_vdi: VdiInfo [req],
    }
}

/// `mirror_receive_result`.
#[derive(Clone, Debug, PartialEq)]
pub enum MirrorReceiveResult {
    /// For a SMAPIv1 source.
    VhdMirror(VhdMirror),
    /// For a SMAPIv3 source.
    Smapiv3Mirror(Smapiv3Mirror),
}

impl Marshal for MirrorReceiveResult {
    fn to_value(&self) -> Value {
        match self {
            MirrorReceiveResult::VhdMirror(m) => tagged("Vhd_mirror", m.to_value()),
            MirrorReceiveResult::Smapiv3Mirror(m) => tagged("SMAPIv3_mirror", m.to_value()),
        }
    }
    fn from_value(v: &Value) -> Result<Self, DecodeError> {
        let (tag, p) = variant(v)?;
        match tag.as_str() {
            "vhd_mirror" => Ok(MirrorReceiveResult::VhdMirror(VhdMirror::from_value(payload("Vhd_mirror", p)?)?)),
            "smapiv3_mirror" => Ok(MirrorReceiveResult::Smapiv3Mirror(Smapiv3Mirror::from_value(payload("SMAPIv3_mirror", p)?)?)),
            other => Err(DecodeError::new(format!("unknown mirror receive result {other:?}"))),
        }
    }
}

/// What a completed task produced (`async_result_t`).
#[derive(Clone, Debug, PartialEq)]
pub enum TaskResult {
    /// A VDI (`DATA.copy`).
    VdiInfo(Box<VdiInfo>),
    /// A mirror (`DATA.MIRROR.start`).
    MirrorId(String),
}

impl Marshal for TaskResult {
    fn to_value(&self) -> Value {
        match self {
            TaskResult::VdiInfo(v) => tagged("Vdi_info", v.to_value()),
            TaskResult::MirrorId(id) => tagged("Mirror_id", Value::String(id.clone())),
        }
    }
    fn from_value(v: &Value) -> Result<Self, DecodeError> {
        let (tag, p) = variant(v)?;
        match tag.as_str() {
            "vdi_info" => Ok(TaskResult::VdiInfo(Box::new(VdiInfo::from_value(payload("Vdi_info", p)?)?))),
            "mirror_id" => Ok(TaskResult::MirrorId(String::from_value(payload("Mirror_id", p)?)?)),
            other => Err(DecodeError::new(format!("unknown task result {other:?}"))),
        }
    }
}

record! {
    /// `Completed`'s payload.
    pub struct Completion {
        /// What the task produced, if anything.
        result: Option<TaskResult> [opt],
        /// Seconds it took.
        duration: f64 [req],
    }
}

/// A task's state.
#[derive(Clone, Debug, PartialEq)]
pub enum TaskState {
    /// Running, with progress in 0..=1.
    Pending(f64),
    /// Done.
    Completed(Completion),
    /// Failed with this marshalled storage error (`Null` when none was recorded).
    Failed(Value),
}

impl Marshal for TaskState {
    fn to_value(&self) -> Value {
        match self {
            TaskState::Pending(p) => tagged("Pending", Value::Float(*p)),
            TaskState::Completed(c) => tagged("Completed", c.to_value()),
            // xapi's own encoder writes a `Failed` that carries nothing as its bare tag.
            TaskState::Failed(Value::Null) => Value::String("Failed".to_owned()),
            TaskState::Failed(e) => tagged("Failed", e.clone()),
        }
    }
    fn from_value(v: &Value) -> Result<Self, DecodeError> {
        let (tag, p) = variant(v)?;
        match tag.as_str() {
            "pending" => Ok(TaskState::Pending(f64::from_value(payload("Pending", p)?)?)),
            "completed" => Ok(TaskState::Completed(Completion::from_value(payload("Completed", p)?)?)),
            "failed" => Ok(TaskState::Failed(p.cloned().unwrap_or(Value::Null))),
            other => Err(DecodeError::new(format!("unknown task state {other:?}"))),
        }
    }
}

record! {
    /// `Task.t`: `TASK.stat`'s answer.
    pub struct Task {
        /// Where it failed, when it did.
        backtrace: String [def = String::new()],
        /// Free-form facts (the current stage, rates).
        debug_info: Map<String> [def = Map::new()],
        /// Named parts and their states.
        subtasks: Map<TaskState> [def = Map::new()],
        /// The state.
        state: TaskState [req],
        /// Creation time, seconds since the epoch.
        ctime: f64 [req],
        /// The `dbg` of the call that made it.
        dbg: String [req],
        /// The task's id.
        id: String [req],
    }
}

/// Something that changed, as `UPDATES.get` reports it (`Dynamic.id`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Dynamic {
    /// A task.
    Task(String),
    /// A VDI.
    Vdi(String),
    /// A datapath.
    Dp(String),
    /// A mirror.
    Mirror(String),
}

impl Marshal for Dynamic {
    fn to_value(&self) -> Value {
        let (tag, id) = match self {
            Dynamic::Task(x) => ("Task", x),
            Dynamic::Vdi(x) => ("Vdi", x),
            Dynamic::Dp(x) => ("Dp", x),
            Dynamic::Mirror(x) => ("Mirror", x),
        };
        tagged(tag, Value::String(id.clone()))
    }
    fn from_value(v: &Value) -> Result<Self, DecodeError> {
        let (tag, p) = variant(v)?;
        let id = String::from_value(payload(&tag, p)?)?;
        match tag.as_str() {
            "task" => Ok(Dynamic::Task(id)),
            "vdi" => Ok(Dynamic::Vdi(id)),
            "dp" => Ok(Dynamic::Dp(id)),
            "mirror" => Ok(Dynamic::Mirror(id)),
            other => Err(DecodeError::new(format!("unknown update {other:?}"))),
        }
    }
}

record! {
    /// `Query.query`'s answer: what the storage service is.
    pub struct QueryResult {
        required_cluster_stack: Vec<String> [def = Vec::new()],
        configuration: Map<String> [req],
        features: Vec<String> [req],
        required_api_version: String [req],
        version: String [req],
        copyright: String [req],
        vendor: String [req],
        description: String [req],
        name: String [req],
        driver: String [req],
    }
}
