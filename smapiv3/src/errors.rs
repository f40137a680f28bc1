//! Failures as the storage interface's errors, with the codes the `ext` SR uses (see
//! `sxm-smapiv1`'s `errors.rs` for the table): `Vdi_does_not_exist`, `VDI_IN_USE`,
//! `VDI_READONLY`, `SR_BACKEND_FAILURE_44` (no space), and `SR_BACKEND_FAILURE [kind; message; ""]`
//! for the rest, `kind` one of `corrupt`, `missing_parent`, `io`, `invalid`, `unsupported`,
//! `metadata`, `datapath`, `copy`.

use std::fmt::Display;
use std::io;

use sxm_engine::backend::CopyStats;
use sxm_engine::model::StorageError;
use tapmirror::copy::CopyReport;
pub(crate) use tapmirror::datapaths::chain;
use tapmirror::datapaths::{DatapathError, DatapathErrorKind};
use tapmirror::image::qcow2::Qcow2Error;

/// `Backend_error ("SR_BACKEND_FAILURE", [kind; message; ""])`.
pub(crate) fn failure(kind: &str, message: impl Display) -> StorageError {
    StorageError::BackendError("SR_BACKEND_FAILURE".to_owned(), vec![kind.to_owned(), message.to_string(), String::new()])
}

/// `Backend_error ("VDI_IN_USE", [vdi; operation])`.
pub(crate) fn in_use(vdi: &str, operation: &str) -> StorageError {
    StorageError::BackendError("VDI_IN_USE".to_owned(), vec![vdi.to_owned(), operation.to_owned()])
}

/// SM's `SRNoSpace` (code 44), as xapi receives it.
pub(crate) fn no_space(detail: impl Display) -> StorageError {
    StorageError::BackendError(
        "SR_BACKEND_FAILURE_44".to_owned(),
        vec![String::new(), "There is insufficient space".to_owned(), detail.to_string()],
    )
}

fn is_no_space(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::ENOSPC) || e.raw_os_error() == Some(libc::EDQUOT)
}

/// An I/O failure of the SR's own files.
pub(crate) fn io(what: impl Display, e: &io::Error) -> StorageError {
    if is_no_space(e) { no_space(format!("{what}: {e}")) } else { failure("io", format!("{what}: {e}")) }
}

/// A qcow2 operation's failure on VDI `vdi` during `operation`.
pub(crate) fn qcow2(vdi: &str, operation: &str, e: &Qcow2Error) -> StorageError {
    let message = format!("{operation} of VDI {vdi}: {}", chain(e));
    match e {
        Qcow2Error::Io { source, .. } if is_no_space(source) => no_space(message),
        Qcow2Error::Corrupt { .. } => failure("corrupt", message),
        Qcow2Error::MissingBacking { .. } => failure("missing_parent", message),
        Qcow2Error::InvalidArgument { .. } => failure("invalid", message),
        Qcow2Error::Unsupported { .. } => failure("unsupported", message),
        _ => failure("io", message),
    }
}

/// A datapath's failure: `VDI_IN_USE` for an attach in the other mode, the rest as its kind
/// says (see [`tapmirror::datapaths::DatapathErrorKind`]).
pub(crate) fn datapath(e: DatapathError) -> StorageError {
    match e.kind() {
        DatapathErrorKind::Busy => in_use(e.id().unwrap_or_default(), "VDI.attach"),
        DatapathErrorKind::NoSpace => no_space(e.message("VDI")),
        DatapathErrorKind::Io => failure("io", e.message("VDI")),
        DatapathErrorKind::Failure => failure("datapath", e.message("VDI")),
    }
}

/// A migration copy's outcome ([`tapmirror::copy::into_connection`]) as the engine's: `None`
/// is a cancelled copy.
pub(crate) fn copied(vdi: &str, export: &str, outcome: Result<Option<CopyReport>, String>) -> Result<CopyStats, StorageError> {
    match outcome {
        Ok(Some(r)) => Ok(CopyStats { size: r.size, data_bytes: r.data_bytes, zero_bytes: r.zeroed_bytes }),
        Ok(None) => {
            tracing::info!(vdi, export, "copy cancelled");
            Err(StorageError::Cancelled(vdi.to_owned()))
        }
        Err(e) => {
            tracing::error!(vdi, export, error = %e, "copy failed");
            Err(failure("copy", format!("copy of VDI {vdi} into {export}: {e}")))
        }
    }
}
