//! Fault injection for tests: named points in the migration stages that fail, stall or kill
//! the host when `SXM_FAULTS` names them, so end-to-end tests can break each stage of a real
//! migration on a real host. Unset (always, outside tests), every point is a no-op that costs
//! one environment lookup.
//!
//! `SXM_FAULTS` is a comma-separated list of `point=action`, action one of:
//! - `error`: the point fails with an `Internal_error` naming it;
//! - `delay`: the point waits 2 s (time for a test to cancel the task or kill a peer);
//! - `long`: the point waits 10 s (time enough for that on a loaded machine);
//! - `abort`: the process dies on the spot, as under SIGKILL (no destructor, no cleanup).

use std::time::Duration;

use crate::model::StorageError;

/// Variable naming the faults.
pub const ENV: &str = "SXM_FAULTS";

/// How long `delay` waits.
pub const DELAY: Duration = Duration::from_secs(2);
/// How long `long` waits.
pub const LONG_DELAY: Duration = Duration::from_secs(10);

fn action(point: &str) -> Option<String> {
    let spec = std::env::var(ENV).ok()?;
    spec.split(',').filter_map(|item| item.split_once('=')).find(|(p, _)| p.trim() == point).map(|(_, a)| a.trim().to_owned())
}

/// Passes through fault point `point`.
pub async fn point(point: &str) -> Result<(), StorageError> {
    match action(point).as_deref() {
        None => Ok(()),
        Some("error") => {
            tracing::warn!(point, "injected fault: error");
            Err(StorageError::InternalError(format!("injected fault at {point}")))
        }
        Some("delay") => {
            tracing::warn!(point, "injected fault: delay");
            tokio::time::sleep(DELAY).await;
            Ok(())
        }
        Some("long") => {
            tracing::warn!(point, "injected fault: long delay");
            tokio::time::sleep(LONG_DELAY).await;
            Ok(())
        }
        Some("abort") => {
            tracing::error!(point, "injected fault: abort");
            std::process::abort();
        }
        Some(other) => {
            tracing::error!(point, action = other, "unknown injected fault action; ignored");
            Ok(())
        }
    }
}
