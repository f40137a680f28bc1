//! How this backend's failures reach the caller: as the storage interface's variants, with the
//! codes xapi and its SMAPIv1 plugins use, so an orchestrator written for xapi recognises them.
//!
//! | condition | error |
//! | --- | --- |
//! | an id that names no VDI of the SR (bad characters, unknown, a hidden parent) | `Vdi_does_not_exist id` |
//! | destroy, resize or compose of a VDI a datapath holds; a VHD another writer locks | `Backend_error ("VDI_IN_USE", [vdi; operation])` |
//! | a read-write attach or a resize of a read-only VDI (a snapshot) | `Backend_error ("VDI_READONLY", [vdi])` |
//! | a size beyond the VHD limit | `Backend_error ("VDI_TOO_LARGE", [vdi; limit])` |
//! | destroy of an SR that still lists a VDI | `Backend_error ("SR_NOT_EMPTY", [sr; why])`, SM's `SRNotEmpty` |
//! | a snapshot or clone whose chain would pass 30 images | `Backend_error ("SR_BACKEND_FAILURE_109", ["", "The snapshot chain is too long", detail])`, SM's `SnapshotChainTooLong` |
//! | no space left (`ENOSPC`) | `Backend_error ("SR_BACKEND_FAILURE_44", ["", "There is insufficient space", detail])`, SM's `SRNoSpace`, which xapi's migration turns into `SR_SOURCE_SPACE_INSUFFICIENT` |
//! | anything else (corrupt VHD, missing file, refused shrink, a datapath that fails) | `Backend_error ("SR_BACKEND_FAILURE", [kind; message; ""])`, xapi's generic backend failure with its three parameters (status, stdout, stderr) |
//!
//! Messages name the SR's VDI and file; the `kind` parameter is a short stable word
//! (`corrupt`, `missing_parent`, `io`, `invalid`, `unsupported`, `metadata`, `datapath`) to
//! match on.


pub(crate) use sxm_engine::backend::errors::{MAX_CHAIN, chain_too_long, failure, in_use, io, is_no_space, no_space, not_empty, read_only};
use sxm_engine::backend::CopyStats;
use sxm_engine::model::StorageError;
use tapmirror::copy::CopyReport;
pub(crate) use tapmirror::error_chain as chain;
use tapmirror::datapaths::{DatapathError, DatapathErrorKind};
use tapmirror::image::vhd::{VhdError, VhdErrorKind};

/// A VHD operation's failure on VDI `vdi` during `operation`.
pub(crate) fn vhd(vdi: &str, operation: &str, e: &VhdError) -> StorageError {
    let message = format!("{operation} of VDI {vdi}: {}", chain(e));
    match (e.kind(), e) {
        (VhdErrorKind::Busy, _) => in_use(vdi, operation),
        (_, VhdError::Io { source, .. }) if is_no_space(source) => no_space(message),
        (VhdErrorKind::Corrupt, _) => failure("corrupt", message),
        (VhdErrorKind::MissingParent, _) => failure("missing_parent", message),
        (VhdErrorKind::InvalidArgument, _) => failure("invalid", message),
        (VhdErrorKind::Unsupported, _) => failure("unsupported", message),
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
