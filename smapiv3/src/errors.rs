//! Failures as the storage interface's errors, with the codes the `ext` SR uses (see
//! `sxm-smapiv1`'s `errors.rs` for the table): `Vdi_does_not_exist`, `VDI_IN_USE`,
//! `VDI_READONLY`, `SR_BACKEND_FAILURE_44` (no space), and `SR_BACKEND_FAILURE [kind; message; ""]`
//! for the rest, `kind` one of `corrupt`, `missing_parent`, `io`, `invalid`, `unsupported`,
//! `metadata`, `datapath`, `copy`.


pub(crate) use sxm_engine::backend::errors::{MAX_CHAIN, chain_too_long, failure, in_use, io, is_no_space, no_space, not_empty, read_only};
use sxm_engine::backend::CopyStats;
use sxm_engine::model::StorageError;
use tapmirror::copy::CopyReport;
pub(crate) use tapmirror::error_chain as chain;
use tapmirror::datapaths::{DatapathError, DatapathErrorKind};
use tapmirror::image::qcow2::Qcow2Error;

/// A qcow2 operation's failure on VDI `vdi` during `operation`.
pub(crate) fn qcow2(vdi: &str, operation: &str, e: &Qcow2Error) -> StorageError {
    let message = format!("{operation} of VDI {vdi}: {}", chain(e));
    match e {
        Qcow2Error::Busy { .. } => in_use(vdi, operation),
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
