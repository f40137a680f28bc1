//! `Storage_interface.Errors.error`: the errors every storage call may answer with, with xapi's
//! exact tags (`../shared/research/xapi-sxm.md` §1.4). On the wire a variant without payload is
//! its tag as a string and one with a payload is `["Tag", payload]`; tags match
//! case-insensitively, and an unknown tag decodes to `Unknown_error`, as ocaml-rpc's
//! `[@@default]` does.

use crate::rpc::Value;

/// Read-only or read-write (of an attached or activated VDI).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rw {
    /// `RO`.
    Ro,
    /// `RW`.
    Rw,
}

/// Where a VDI stands on a host (`Vdi_automaton.state`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VdiState {
    /// Not attached.
    Detached,
    /// Attached.
    Attached(Rw),
    /// Attached and activated for I/O.
    Activated(Rw),
}

/// A storage error.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StorageError {
    /// A backend's error with a backtrace.
    #[error("backend error {0}: {1:?} (with backtrace)")]
    BackendErrorWithBacktrace(String, Vec<String>),
    /// The SR is not attached.
    #[error("SR {0} is not attached")]
    SrNotAttached(String),
    /// No such VDI.
    #[error("VDI {0} does not exist")]
    VdiDoesNotExist(String),
    /// A VDI state change that is not allowed.
    #[error("illegal transition from {0:?} to {1:?}")]
    IllegalTransition(VdiState, VdiState),
    /// A backend's error: a code and parameters (xapi maps it to its Server_error).
    #[error("backend error {0}: {1:?}")]
    BackendError(String, Vec<String>),
    /// A named object of a kind does not exist.
    #[error("{0} {1} does not exist")]
    DoesNotExist(String, String),
    /// The call was cancelled.
    #[error("cancelled: {0}")]
    Cancelled(String),
    /// Send the call to this host instead.
    #[error("redirect to {0:?}")]
    Redirect(Option<String>),
    /// The SR is attached.
    #[error("SR {0} is attached")]
    SrAttached(String),
    /// The SR is unhealthy.
    #[error("SR {0} is unhealthy ({1})")]
    SrUnhealthy(String, String),
    /// Not implemented by this SR type.
    #[error("unimplemented: {0}")]
    Unimplemented(String),
    /// The VDI is active on another host.
    #[error("activated on another host {0}")]
    ActivatedOnAnotherHost(String),
    /// A key already exists.
    #[error("duplicated key {0}")]
    DuplicatedKey(String),
    /// No backend serves this SR: an SR this host does not know, or of a type it lacks.
    #[error("no storage plugin serves SR {0} (an SR this host does not know, or of a type it lacks)")]
    NoStoragePluginForSr(String),
    /// Two VDIs were expected to hold the same content.
    #[error("content ids do not match: {0} and {1}")]
    ContentIdsDoNotMatch(String, String),
    /// A device_config key is missing.
    #[error("missing configuration parameter {0}")]
    MissingConfigurationParameter(String),
    /// The destination could not prepare (stage prepare).
    #[error("migration preparation failure: {0}")]
    MigrationPreparationFailure(String),
    /// The mirror socket could not be passed (stage pass fds).
    #[error("migration mirror fd failure: {0}")]
    MigrationMirrorFdFailure(String),
    /// The snapshot failed (stage snapshot).
    #[error("migration mirror snapshot failure: {0}")]
    MigrationMirrorSnapshotFailure(String),
    /// The copy failed (stage copy).
    #[error("migration mirror copy failure: {0}")]
    MigrationMirrorCopyFailure(String),
    /// The mirror failed.
    #[error("migration mirror failure: {0}")]
    MigrationMirrorFailure(String),
    /// Anything else that went wrong on the server.
    #[error("internal error: {0}")]
    InternalError(String),
    /// An error this version does not know.
    #[error("unknown error")]
    UnknownError,
}

/// Why a value is not a storage error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a storage error: {0}")]
pub struct NotAnError(pub String);

fn s(v: &str) -> Value {
    Value::String(v.to_owned())
}

fn strings(l: &[String]) -> Value {
    Value::Array(l.iter().map(|x| s(x)).collect())
}

fn tagged(tag: &str, payload: Value) -> Value {
    Value::Array(vec![s(tag), payload])
}

impl Rw {
    fn to_value(self) -> Value {
        s(match self {
            Rw::Ro => "RO",
            Rw::Rw => "RW",
        })
    }

    fn from_value(v: &Value) -> Result<Rw, NotAnError> {
        match v.as_str().map(str::to_ascii_uppercase).as_deref() {
            Some("RO") => Ok(Rw::Ro),
            Some("RW") => Ok(Rw::Rw),
            _ => Err(NotAnError(format!("rw {v:?}"))),
        }
    }
}

impl VdiState {
    pub(crate) fn to_value(self) -> Value {
        match self {
            VdiState::Detached => s("Detached"),
            VdiState::Attached(rw) => tagged("Attached", rw.to_value()),
            VdiState::Activated(rw) => tagged("Activated", rw.to_value()),
        }
    }

    pub(crate) fn from_value(v: &Value) -> Result<VdiState, NotAnError> {
        let (tag, payload) = split(v)?;
        match (tag.as_str(), payload) {
            ("detached", None) => Ok(VdiState::Detached),
            ("attached", Some(p)) => Ok(VdiState::Attached(Rw::from_value(p)?)),
            ("activated", Some(p)) => Ok(VdiState::Activated(Rw::from_value(p)?)),
            _ => Err(NotAnError(format!("vdi state {v:?}"))),
        }
    }
}

/// A variant's lowercased tag and payload.
fn split(v: &Value) -> Result<(String, Option<&Value>), NotAnError> {
    match v {
        Value::String(t) => Ok((t.to_ascii_lowercase(), None)),
        Value::Array(a) => match a.as_slice() {
            [Value::String(t)] => Ok((t.to_ascii_lowercase(), None)),
            [Value::String(t), p] => Ok((t.to_ascii_lowercase(), Some(p))),
            _ => Err(NotAnError(format!("variant {v:?}"))),
        },
        _ => Err(NotAnError(format!("variant {v:?}"))),
    }
}

fn string(v: Option<&Value>) -> Result<String, NotAnError> {
    v.and_then(Value::as_str).map(str::to_owned).ok_or_else(|| NotAnError(format!("expected a string, got {v:?}")))
}

fn pair(v: Option<&Value>) -> Result<(&Value, &Value), NotAnError> {
    match v {
        Some(Value::Array(a)) if a.len() == 2 => Ok((&a[0], &a[1])),
        _ => Err(NotAnError(format!("expected a pair, got {v:?}"))),
    }
}

fn string_list(v: &Value) -> Result<Vec<String>, NotAnError> {
    match v {
        Value::Array(a) => a.iter().map(|x| string(Some(x))).collect(),
        _ => Err(NotAnError(format!("expected a list of strings, got {v:?}"))),
    }
}

impl StorageError {
    /// The same error with `what` said before its message, for a migration failure (whose
    /// message is free text); any other error as it is (its parameters are xapi's codes).
    pub fn about(self, what: &str) -> StorageError {
        use StorageError::*;
        match self {
            MigrationPreparationFailure(m) => MigrationPreparationFailure(format!("{what}: {m}")),
            MigrationMirrorFdFailure(m) => MigrationMirrorFdFailure(format!("{what}: {m}")),
            MigrationMirrorSnapshotFailure(m) => MigrationMirrorSnapshotFailure(format!("{what}: {m}")),
            MigrationMirrorCopyFailure(m) => MigrationMirrorCopyFailure(format!("{what}: {m}")),
            MigrationMirrorFailure(m) => MigrationMirrorFailure(format!("{what}: {m}")),
            other => other,
        }
    }

    /// The error as xapi encodes it.
    pub fn to_value(&self) -> Value {
        use StorageError::*;
        match self {
            BackendErrorWithBacktrace(c, p) => tagged("Backend_error_with_backtrace", Value::Array(vec![s(c), strings(p)])),
            SrNotAttached(x) => tagged("Sr_not_attached", s(x)),
            VdiDoesNotExist(x) => tagged("Vdi_does_not_exist", s(x)),
            IllegalTransition(a, b) => tagged("Illegal_transition", Value::Array(vec![a.to_value(), b.to_value()])),
            BackendError(c, p) => tagged("Backend_error", Value::Array(vec![s(c), strings(p)])),
            DoesNotExist(a, b) => tagged("Does_not_exist", Value::Array(vec![s(a), s(b)])),
            Cancelled(x) => tagged("Cancelled", s(x)),
            Redirect(ip) => tagged("Redirect", Value::Array(ip.iter().map(|x| s(x)).collect())),
            SrAttached(x) => tagged("Sr_attached", s(x)),
            SrUnhealthy(sr, h) => tagged("Sr_unhealthy", Value::Array(vec![s(sr), s(h)])),
            Unimplemented(x) => tagged("Unimplemented", s(x)),
            ActivatedOnAnotherHost(x) => tagged("Activated_on_another_host", s(x)),
            DuplicatedKey(x) => tagged("Duplicated_key", s(x)),
            NoStoragePluginForSr(x) => tagged("No_storage_plugin_for_sr", s(x)),
            ContentIdsDoNotMatch(a, b) => tagged("Content_ids_do_not_match", Value::Array(vec![s(a), s(b)])),
            MissingConfigurationParameter(x) => tagged("Missing_configuration_parameter", s(x)),
            MigrationPreparationFailure(x) => tagged("Migration_preparation_failure", s(x)),
            MigrationMirrorFdFailure(x) => tagged("Migration_mirror_fd_failure", s(x)),
            MigrationMirrorSnapshotFailure(x) => tagged("Migration_mirror_snapshot_failure", s(x)),
            MigrationMirrorCopyFailure(x) => tagged("Migration_mirror_copy_failure", s(x)),
            MigrationMirrorFailure(x) => tagged("Migration_mirror_failure", s(x)),
            InternalError(x) => tagged("Internal_error", s(x)),
            UnknownError => s("Unknown_error"),
        }
    }

    /// Decodes an error; an unknown tag is `UnknownError`, a known tag with a payload of the
    /// wrong shape an error.
    pub fn from_value(v: &Value) -> Result<StorageError, NotAnError> {
        use StorageError::*;
        let (tag, p) = split(v)?;
        let one = || string(p);
        let two = || -> Result<(String, String), NotAnError> {
            let (a, b) = pair(p)?;
            Ok((string(Some(a))?, string(Some(b))?))
        };
        let code_params = || -> Result<(String, Vec<String>), NotAnError> {
            let (a, b) = pair(p)?;
            Ok((string(Some(a))?, string_list(b)?))
        };
        Ok(match tag.as_str() {
            "backend_error_with_backtrace" => {
                let (c, l) = code_params()?;
                BackendErrorWithBacktrace(c, l)
            }
            "sr_not_attached" => SrNotAttached(one()?),
            "vdi_does_not_exist" => VdiDoesNotExist(one()?),
            "illegal_transition" => {
                let (a, b) = pair(p)?;
                IllegalTransition(VdiState::from_value(a)?, VdiState::from_value(b)?)
            }
            "backend_error" => {
                let (c, l) = code_params()?;
                BackendError(c, l)
            }
            "does_not_exist" => {
                let (a, b) = two()?;
                DoesNotExist(a, b)
            }
            "cancelled" => Cancelled(one()?),
            "redirect" => match p {
                Some(Value::Array(a)) if a.is_empty() => Redirect(None),
                Some(Value::Array(a)) if a.len() == 1 => Redirect(Some(string(a.first())?)),
                _ => return Err(NotAnError(format!("redirect {p:?}"))),
            },
            "sr_attached" => SrAttached(one()?),
            "sr_unhealthy" => {
                let (sr, h) = pair(p)?;
                let (h, _) = split(h)?;
                SrUnhealthy(string(Some(sr))?, h)
            }
            "unimplemented" => Unimplemented(one()?),
            "activated_on_another_host" => ActivatedOnAnotherHost(one()?),
            "duplicated_key" => DuplicatedKey(one()?),
            "no_storage_plugin_for_sr" => NoStoragePluginForSr(one()?),
            "content_ids_do_not_match" => {
                let (a, b) = two()?;
                ContentIdsDoNotMatch(a, b)
            }
            "missing_configuration_parameter" => MissingConfigurationParameter(one()?),
            "migration_preparation_failure" => MigrationPreparationFailure(one()?),
            "migration_mirror_fd_failure" => MigrationMirrorFdFailure(one()?),
            "migration_mirror_snapshot_failure" => MigrationMirrorSnapshotFailure(one()?),
            "migration_mirror_copy_failure" => MigrationMirrorCopyFailure(one()?),
            "migration_mirror_failure" => MigrationMirrorFailure(one()?),
            "internal_error" => InternalError(one()?),
            _ => UnknownError,
        })
    }
}

impl crate::rpc::marshal::Marshal for VdiState {
    fn to_value(&self) -> Value {
        VdiState::to_value(*self)
    }
    fn from_value(v: &Value) -> Result<Self, crate::rpc::marshal::DecodeError> {
        VdiState::from_value(v).map_err(|e| crate::rpc::marshal::DecodeError::new(e.0))
    }
}

impl crate::rpc::marshal::Marshal for StorageError {
    fn to_value(&self) -> Value {
        StorageError::to_value(self)
    }
    fn from_value(v: &Value) -> Result<Self, crate::rpc::marshal::DecodeError> {
        StorageError::from_value(v).map_err(|e| crate::rpc::marshal::DecodeError::new(e.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_are_exact_on_the_wire_and_case_insensitive_when_read() {
        let e = StorageError::MigrationMirrorCopyFailure("boom".into());
        assert_eq!(e.to_value(), Value::Array(vec![s("Migration_mirror_copy_failure"), s("boom")]));
        let shouted = Value::Array(vec![s("MIGRATION_MIRROR_COPY_FAILURE"), s("boom")]);
        assert_eq!(StorageError::from_value(&shouted), Ok(e));
    }

    #[test]
    fn unknown_tags_are_unknown_error_and_bad_payloads_are_refused() {
        assert_eq!(StorageError::from_value(&Value::Array(vec![s("Brand_new"), s("x")])), Ok(StorageError::UnknownError));
        assert!(StorageError::from_value(&Value::Array(vec![s("Does_not_exist"), s("only one")])).is_err());
        assert!(StorageError::from_value(&Value::Int(3)).is_err());
    }

    #[test]
    fn every_variant_round_trips() {
        use StorageError::*;
        let all = vec![
            BackendErrorWithBacktrace("c".into(), vec!["a".into()]),
            SrNotAttached("sr".into()),
            IllegalTransition(VdiState::Detached, VdiState::Activated(Rw::Rw)),
            Redirect(None),
            Redirect(Some("10.0.0.1".into())),
            SrUnhealthy("sr".into(), "unreachable".into()),
            ContentIdsDoNotMatch("a".into(), "b".into()),
            MigrationPreparationFailure("p".into()),
            MigrationMirrorFdFailure("f".into()),
            MigrationMirrorSnapshotFailure("s".into()),
            MigrationMirrorFailure("m".into()),
            UnknownError,
        ];
        for e in all {
            assert_eq!(StorageError::from_value(&e.to_value()).as_ref(), Ok(&e), "{e:?}");
        }
    }
}
