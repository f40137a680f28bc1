//! Every storage-interface call this host serves, typed. A call arrives as a method name and
//! one struct of named arguments (`../shared/research/xapi-sxm.md` §1.2); [`Call::decode`]
//! turns it into a [`Call`], and [`Call::params`] is the reverse (what a client sends). Arguments
//! are declared in the order xapi's client sends them (reverse declaration order, `dbg` last),
//! so a decoded call re-encodes to the bytes it came from.
//!
//! A method of the interface that this host does not serve (CBT, `SR.probe`, `VDI.introduce`,
//! …) is answered `Unimplemented`, as xapi's mux answers for what a backend lacks.

use crate::model::types::VdiInfo;
use crate::model::StorageError;
use crate::record;
use crate::rpc::marshal::{Map, Marshal};
use crate::rpc::Value;

macro_rules! calls {
    ($(
        $(#[$meta:meta])*
        $variant:ident = $wire:literal {
            $( $(#[$fmeta:meta])* $field:ident : $ty:ty [ $kind:ident $(= $def:expr)? ] ),* $(,)?
        }
    ),* $(,)?) => {
        /// Each call's named arguments.
        pub mod args {
            #[allow(unused_imports)]
            use super::*;
            $(
                record! {
                    $(#[$meta])*
                    pub struct $variant {
                        $( $(#[$fmeta])* $field: $ty [$kind $(= $def)?], )*
                        /// The caller's log string (and trace context).
                        dbg: String [def = String::new()],
                    }
                }
            )*
        }

        /// A decoded call.
        #[derive(Clone, Debug, PartialEq)]
        pub enum Call {
            $( $(#[$meta])* $variant(args::$variant), )*
        }

        impl Call {
            /// Every method this host serves, by wire name.
            pub const METHODS: &'static [&'static str] = &[$($wire),*];

            /// The call's wire name.
            pub fn method(&self) -> &'static str {
                match self {
                    $( Call::$variant(_) => $wire, )*
                }
            }

            /// The caller's `dbg` string.
            pub fn dbg(&self) -> &str {
                match self {
                    $( Call::$variant(a) => &a.dbg, )*
                }
            }

            /// The call's parameters as sent: one struct of named arguments.
            pub fn params(&self) -> Vec<Value> {
                match self {
                    $( Call::$variant(a) => vec![a.to_value()], )*
                }
            }

            fn decode_args(method: &str, args: &Value) -> Option<Result<Call, crate::rpc::marshal::DecodeError>> {
                Some(match method {
                    $( $wire => args::$variant::from_value(args).map(Call::$variant), )*
                    _ => return None,
                })
            }
        }
    };
}

calls! {
    /// `SR.create`: make a new SR; `device_config["type"]` picks its type.
    SrCreate = "SR.create" {
        physical_size: i64 [def = 0],
        device_config: Map<String> [def = Map::new()],
        name_description: String [def = String::new()],
        name_label: String [def = String::new()],
        sr: String [req],
    },
    /// `SR.attach`.
    SrAttach = "SR.attach" { device_config: Map<String> [def = Map::new()], sr: String [req] },
    /// `SR.detach`.
    SrDetach = "SR.detach" { sr: String [req] },
    /// `SR.destroy`: remove an SR and everything in it.
    SrDestroy = "SR.destroy" { sr: String [req] },
    /// `SR.scan`: the SR's VDIs.
    SrScan = "SR.scan" { sr: String [req] },
    /// `SR.scan2`: the SR's VDIs and its `sr_info`.
    SrScan2 = "SR.scan2" { sr: String [req] },
    /// `SR.list`: attached SRs.
    SrList = "SR.list" {},
    /// `SR.stat`.
    SrStat = "SR.stat" { sr: String [req] },
    /// `SR.set_name_label`.
    SrSetNameLabel = "SR.set_name_label" { new_name_label: String [req], sr: String [req] },
    /// `SR.set_name_description`.
    SrSetNameDescription = "SR.set_name_description" { new_name_description: String [req], sr: String [req] },
    /// `SR.update_snapshot_info_dest`.
    SrUpdateSnapshotInfoDest = "SR.update_snapshot_info_dest" {
        snapshot_pairs: Map<VdiInfo> [req],
        src_vdi: VdiInfo [req],
        vdi: String [req],
        sr: String [req],
    },
    /// `SR.update_snapshot_info_src`: tell the host at `url` which of its VDIs in `dest` are
    /// copies of this SR's snapshots of `vdi` (`snapshot_pairs`: local snapshot → its copy
    /// there), whose mirror is `dest_vdi`; that host marks them snapshots of `dest_vdi`.
    SrUpdateSnapshotInfoSrc = "SR.update_snapshot_info_src" {
        verify_dest: bool [def = false],
        snapshot_pairs: Map<String> [req],
        dest_vdi: String [req],
        dest: String [req],
        url: String [req],
        vdi: String [req],
        sr: String [req],
    },
    /// `VDI.create`.
    VdiCreate = "VDI.create" { vdi_info: VdiInfo [req], sr: String [req] },
    /// `VDI.destroy`.
    VdiDestroy = "VDI.destroy" { vdi: String [req], sr: String [req] },
    /// `VDI.snapshot`: a read-only copy of `vdi_info.vdi` now.
    VdiSnapshot = "VDI.snapshot" { vdi_info: VdiInfo [req], sr: String [req] },
    /// `VDI.clone`: a writable copy of `vdi_info.vdi`.
    VdiClone = "VDI.clone" { vdi_info: VdiInfo [req], sr: String [req] },
    /// `VDI.resize`.
    VdiResize = "VDI.resize" { new_size: i64 [req], vdi: String [req], sr: String [req] },
    /// `VDI.compose`: layer child `vdi2` onto parent `vdi1`.
    VdiCompose = "VDI.compose" { vdi2: String [req], vdi1: String [req], sr: String [req] },
    /// `VDI.set_content_id`.
    VdiSetContentId = "VDI.set_content_id" { content_id: String [req], vdi: String [req], sr: String [req] },
    /// `VDI.set_name_label`.
    VdiSetNameLabel = "VDI.set_name_label" { new_name_label: String [req], vdi: String [req], sr: String [req] },
    /// `VDI.set_name_description`.
    VdiSetNameDescription = "VDI.set_name_description" { new_name_description: String [req], vdi: String [req], sr: String [req] },
    /// `VDI.set_persistent`.
    VdiSetPersistent = "VDI.set_persistent" { persistent: bool [req], vdi: String [req], sr: String [req] },
    /// `VDI.similar_content`: VDIs with similar content, nearest first.
    VdiSimilarContent = "VDI.similar_content" { vdi: String [req], sr: String [req] },
    /// `VDI.add_to_sm_config`.
    VdiAddToSmConfig = "VDI.add_to_sm_config" { value: String [req], key: String [req], vdi: String [req], sr: String [req] },
    /// `VDI.remove_from_sm_config`.
    VdiRemoveFromSmConfig = "VDI.remove_from_sm_config" { key: String [req], vdi: String [req], sr: String [req] },
    /// `VDI.stat`.
    VdiStat = "VDI.stat" { vdi: String [req], sr: String [req] },
    /// `VDI.get_by_name`.
    VdiGetByName = "VDI.get_by_name" { name: String [req], sr: String [req] },
    /// `VDI.attach` (the oldest form; no VM).
    VdiAttach = "VDI.attach" { read_write: bool [req], vdi: String [req], sr: String [req], dp: String [req] },
    /// `VDI.attach2`.
    VdiAttach2 = "VDI.attach2" { read_write: bool [req], vdi: String [req], vm: Option<String> [opt], sr: String [req], dp: String [req] },
    /// `VDI.attach3`.
    VdiAttach3 = "VDI.attach3" { read_write: bool [req], vdi: String [req], vm: Option<String> [opt], sr: String [req], dp: String [req] },
    /// `VDI.activate`.
    VdiActivate = "VDI.activate" { vdi: String [req], sr: String [req], dp: String [req] },
    /// `VDI.activate3`.
    VdiActivate3 = "VDI.activate3" { vdi: String [req], vm: Option<String> [opt], sr: String [req], dp: String [req] },
    /// `VDI.activate_readonly`: [`Call::VdiActivate3`] for a datapath attached read-only.
    VdiActivateReadonly = "VDI.activate_readonly" { vdi: String [req], vm: Option<String> [opt], sr: String [req], dp: String [req] },
    /// `VDI.epoch_begin`: a VM is about to use the VDI (before its attach). A VDI set
    /// non-persistent (`VDI.set_persistent false`) is reset here to what it held then.
    VdiEpochBegin = "VDI.epoch_begin" { persistent: bool [def = true], vdi: String [req], vm: Option<String> [opt], sr: String [req] },
    /// `VDI.epoch_end`: the VM is done with the VDI.
    VdiEpochEnd = "VDI.epoch_end" { vdi: String [req], vm: Option<String> [opt], sr: String [req] },
    /// `VDI.deactivate`.
    VdiDeactivate = "VDI.deactivate" { vdi: String [req], vm: Option<String> [opt], sr: String [req], dp: String [req] },
    /// `VDI.detach`.
    VdiDetach = "VDI.detach" { vdi: String [req], vm: Option<String> [opt], sr: String [req], dp: String [req] },
    /// `DP.create`: a datapath id (nothing is made until a VDI is attached on it).
    DpCreate = "DP.create" { id: String [req] },
    /// `DP.destroy`: deactivate and detach everything on the datapath.
    DpDestroy = "DP.destroy" { allow_leak: bool [def = false], dp: String [req] },
    /// `DP.destroy2`.
    DpDestroy2 = "DP.destroy2" {
        allow_leak: bool [def = false],
        vm: Option<String> [opt],
        vdi: String [req],
        sr: String [req],
        dp: String [req],
    },
    /// `DP.attach_info`.
    DpAttachInfo = "DP.attach_info" { dp: String [req], vdi: String [req], sr: String [req] },
    /// `DP.stat_vdi`.
    DpStatVdi = "DP.stat_vdi" { unit: () [def = ()], vdi: String [req], sr: String [req] },
    /// `TASK.stat`.
    TaskStat = "TASK.stat" { task: String [req] },
    /// `TASK.list`.
    TaskList = "TASK.list" {},
    /// `TASK.cancel`.
    TaskCancel = "TASK.cancel" { task: String [req] },
    /// `TASK.destroy`.
    TaskDestroy = "TASK.destroy" { task: String [req] },
    /// `UPDATES.get`: what changed since `from`, waiting up to `timeout` seconds.
    UpdatesGet = "UPDATES.get" { timeout: Option<i64> [opt], from: String [req] },
    /// `Query.query`.
    Query = "Query.query" {},
    /// `Query.diagnostics`: the host's SRs, datapaths, tasks and migrations, as text.
    QueryDiagnostics = "Query.diagnostics" {},
    /// `DATA.copy`: copy a VDI that is not live to `dest` on the host at `url`.
    DataCopy = "DATA.copy" {
        verify_dest: bool [def = false],
        dest: String [req],
        url: String [req],
        /// Callers up to v24.37 send `dp`, later ones `vm`.
        vm: Option<String> [opt],
        dp: Option<String> [opt],
        vdi: String [req],
        sr: String [req],
    },
    /// `DATA.MIRROR.start`: move a live VDI to `dest` on the host at `url`.
    DataMirrorStart = "DATA.MIRROR.start" {
        verify_dest: bool [def = false],
        dest: String [req],
        url: String [req],
        /// G2 callers name the VM slices; older ones do not (the host then uses "0").
        copy_vm: Option<String> [opt],
        mirror_vm: Option<String> [opt],
        dp: String [req],
        vdi: String [req],
        sr: String [req],
    },
    /// `DATA.MIRROR.stop`.
    DataMirrorStop = "DATA.MIRROR.stop" { id: String [req] },
    /// `DATA.MIRROR.stat`.
    DataMirrorStat = "DATA.MIRROR.stat" { id: String [req] },
    /// `DATA.MIRROR.list`.
    DataMirrorList = "DATA.MIRROR.list" {},
    /// `DATA.MIRROR.receive_start` (G1 sources).
    DataMirrorReceiveStart = "DATA.MIRROR.receive_start" {
        similar: Vec<String> [def = Vec::new()],
        id: String [req],
        vdi_info: VdiInfo [req],
        sr: String [req],
    },
    /// `DATA.MIRROR.receive_start2` (G2 sources).
    DataMirrorReceiveStart2 = "DATA.MIRROR.receive_start2" {
        vm: Option<String> [opt],
        similar: Vec<String> [def = Vec::new()],
        id: String [req],
        vdi_info: VdiInfo [req],
        sr: String [req],
    },
    /// `DATA.MIRROR.receive_finalize`.
    DataMirrorReceiveFinalize = "DATA.MIRROR.receive_finalize" { id: String [req] },
    /// `DATA.MIRROR.receive_finalize2`.
    DataMirrorReceiveFinalize2 = "DATA.MIRROR.receive_finalize2" { id: String [req] },
    /// `DATA.MIRROR.receive_cancel`.
    DataMirrorReceiveCancel = "DATA.MIRROR.receive_cancel" { id: String [req] },
    /// sxm's own: move several VDIs of one VM as one job (`sxm migrate`); answers the job's
    /// task. Preflight errors come back at once and nothing is made.
    SxmMigrateStart = "SXM.migrate.start" {
        /// The destination SR of each disk not going to `dest` (VDI → SR, as xapi's
        /// `VM.migrate_send` takes it).
        vdi_map: Map<String> [def = Map::new()],
        /// The SR of each disk not on `sr` (VDI → SR): a VM's disks may lie on several.
        vdi_srs: Map<String> [def = Map::new()],
        /// Bytes per second the disks' copies share at most; 0 for no limit.
        bwlimit: i64 [def = 0],
        verify: bool [def = false],
        hold: bool [def = false],
        parallel: i64 [def = 2],
        dest: String [req],
        url: String [req],
        vdis: Vec<String> [req],
        sr: String [req],
    },
    /// sxm's own: switch a held job over (its disks are in sync).
    SxmMigrateCutover = "SXM.migrate.cutover" { job: String [req] },
    /// sxm's own: change a running job's bandwidth limit (bytes per second, 0 for none).
    SxmMigrateSetBwlimit = "SXM.migrate.set_bwlimit" { bwlimit: i64 [req], job: String [req] },
    /// sxm's own: checksums (crc32) of a VDI's blocks of `block` bytes, to compare copies.
    SxmVdiChecksums = "SXM.VDI.checksums" { block: i64 [def = 1 << 20], vdi: String [req], sr: String [req] },
}

/// Methods of the interface that this host knows but does not serve: answered `Unimplemented`.
pub const UNSERVED: &[&str] = &[
    "DATA.copy_into",
    "DATA.mirror",
    "DATA.stat",
    "DATA.import_activate",
    "DATA.get_nbd_server",
    "DATA.MIRROR.send_start",
    "DATA.MIRROR.receive_start3",
    "DATA.MIRROR.receive_finalize3",
    "DATA.MIRROR.receive_cancel2",
    "DATA.MIRROR.pre_deactivate_hook",
    "DATA.MIRROR.has_mirror_failed",
    "DATA.MIRROR.import_activate",
    "DATA.MIRROR.get_nbd_server",
    "DP.diagnostics",
    "Policy.get_backend_vm",
    "SR.probe",
    "SR.reset",
    "VDI.data_destroy",
    "VDI.disable_cbt",
    "VDI.enable_cbt",
    "VDI.get_url",
    "VDI.introduce",
    "VDI.list_changed_blocks",
    "get_by_name",
];

impl Call {
    /// Decodes a call from its method and parameters. A method not served here is
    /// `Unimplemented`; arguments that are missing or of the wrong type are an `Internal_error`
    /// naming the method and the argument, as xapi answers a call it cannot unmarshal.
    pub fn decode(method: &str, params: &[Value]) -> Result<Call, StorageError> {
        let empty = Value::Struct(Vec::new());
        let args = match params {
            [] => &empty,
            [one] => one,
            _ => {
                return Err(StorageError::InternalError(format!(
                    "{method}: expected one struct of named arguments, got {} parameters",
                    params.len()
                )));
            }
        };
        match Call::decode_args(method, args) {
            Some(Ok(call)) => Ok(call),
            Some(Err(e)) => Err(StorageError::InternalError(format!("{method}: bad arguments: {e}"))),
            None => Err(StorageError::Unimplemented(method.to_owned())),
        }
    }

    /// The SR the call names, for routing to its backend.
    pub fn sr(&self) -> Option<&str> {
        use Call::*;
        Some(match self {
            SrCreate(a) => &a.sr,
            SrAttach(a) => &a.sr,
            SrDetach(a) => &a.sr,
            SrDestroy(a) => &a.sr,
            SrScan(a) => &a.sr,
            SrScan2(a) => &a.sr,
            SrStat(a) => &a.sr,
            SrSetNameLabel(a) => &a.sr,
            SrSetNameDescription(a) => &a.sr,
            SrUpdateSnapshotInfoDest(a) => &a.sr,
            SrUpdateSnapshotInfoSrc(a) => &a.sr,
            VdiCreate(a) => &a.sr,
            VdiDestroy(a) => &a.sr,
            VdiSnapshot(a) => &a.sr,
            VdiClone(a) => &a.sr,
            VdiResize(a) => &a.sr,
            VdiCompose(a) => &a.sr,
            VdiSetContentId(a) => &a.sr,
            VdiSetNameLabel(a) => &a.sr,
            VdiSetNameDescription(a) => &a.sr,
            VdiSetPersistent(a) => &a.sr,
            VdiSimilarContent(a) => &a.sr,
            VdiAddToSmConfig(a) => &a.sr,
            VdiRemoveFromSmConfig(a) => &a.sr,
            VdiStat(a) => &a.sr,
            VdiGetByName(a) => &a.sr,
            VdiAttach(a) => &a.sr,
            VdiAttach2(a) => &a.sr,
            VdiAttach3(a) => &a.sr,
            VdiActivate(a) => &a.sr,
            VdiActivate3(a) => &a.sr,
            VdiActivateReadonly(a) => &a.sr,
            VdiEpochBegin(a) => &a.sr,
            VdiEpochEnd(a) => &a.sr,
            VdiDeactivate(a) => &a.sr,
            VdiDetach(a) => &a.sr,
            DpDestroy2(a) => &a.sr,
            DpAttachInfo(a) => &a.sr,
            DpStatVdi(a) => &a.sr,
            DataCopy(a) => &a.sr,
            DataMirrorStart(a) => &a.sr,
            DataMirrorReceiveStart(a) => &a.sr,
            DataMirrorReceiveStart2(a) => &a.sr,
            SrList(_) | DpCreate(_) | DpDestroy(_) | TaskStat(_) | TaskList(_) | TaskCancel(_) | TaskDestroy(_)
            | UpdatesGet(_) | Query(_) | QueryDiagnostics(_) | DataMirrorStop(_) | DataMirrorStat(_) | DataMirrorList(_)
            | DataMirrorReceiveFinalize(_) | DataMirrorReceiveFinalize2(_) | DataMirrorReceiveCancel(_) | SxmMigrateCutover(_) | SxmMigrateSetBwlimit(_) => {
                return None;
            }
            SxmMigrateStart(a) => &a.sr,
            SxmVdiChecksums(a) => &a.sr,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(x: &str) -> Value {
        Value::String(x.to_owned())
    }

    #[test]
    fn decodes_named_arguments_with_defaults_and_untyped_integers() {
        let params = vec![Value::Struct(vec![("new_size".into(), s("4096")), ("vdi".into(), s("v")), ("sr".into(), s("r"))])];
        let call = Call::decode("VDI.resize", &params).expect("decodes");
        let Call::VdiResize(a) = &call else { panic!("{call:?}") };
        assert_eq!((a.new_size, a.vdi.as_str(), a.sr.as_str(), a.dbg.as_str()), (4096, "v", "r", ""));
        assert_eq!(call.sr(), Some("r"));
        assert_eq!(call.method(), "VDI.resize");
    }

    #[test]
    fn bad_calls_get_the_right_variant() {
        assert_eq!(Call::decode("VDI.frobnicate", &[]), Err(StorageError::Unimplemented("VDI.frobnicate".into())));
        assert_eq!(Call::decode("VDI.enable_cbt", &[]), Err(StorageError::Unimplemented("VDI.enable_cbt".into())));
        let missing = Call::decode("VDI.stat", &[Value::Struct(vec![("sr".into(), s("r"))])]);
        assert_eq!(missing, Err(StorageError::InternalError("VDI.stat: bad arguments: missing vdi".into())));
        let wrong = Call::decode("VDI.resize", &[Value::Struct(vec![("new_size".into(), s("big")), ("vdi".into(), s("v")), ("sr".into(), s("r"))])]);
        assert!(matches!(wrong, Err(StorageError::InternalError(m)) if m.contains("new_size")));
        let not_struct = Call::decode("SR.list", &[s("x")]);
        assert!(matches!(not_struct, Err(StorageError::InternalError(_))), "{not_struct:?}");
    }

    #[test]
    fn no_method_is_both_served_and_unserved() {
        for m in UNSERVED {
            assert!(!Call::METHODS.contains(m), "{m}");
        }
    }
}
