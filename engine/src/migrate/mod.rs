//! Storage migration (`DATA.*`): moving a VDI that a guest is writing to another host's SR,
//! in the stages prepare, pass fds, snapshot, mirror, copy and finalize, and undoing exactly
//! what each stage made when anything fails (`../shared/DESIGN.md`, "The flow of one live
//! migration"; xapi's `Storage_migrate`, G2 wire: `receive_start2` / `receive_finalize2`).
//!
//! - [`receive`]: the destination side (`DATA.MIRROR.receive_*`, and the NBD handover of
//!   `PUT /services/SM/nbd/…`).
//! - [`send`]: the source side (`DATA.MIRROR.start|stop|stat|list`, finalize on deactivate,
//!   `DATA.copy`).
//! - [`records`]: what is persisted, before each side effect, so a restarted host can finish
//!   or undo it.
//!
//! Every step the engine takes here is an ordinary storage call, made locally through the mux
//! or remotely over XML-RPC as xapi makes it; the data-path steps (serve an NBD import, attach
//! the mirror, drain, copy) are the backend's.

pub mod job;
pub mod receive;
pub mod records;
pub mod send;

use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::time::Duration;

use crate::http::client::{CallError, Endpoint, RpcClient};
use crate::model::{Call, StorageError};
use crate::rpc::marshal::Marshal;

pub use job::JOB_KIND;
pub use records::{CopyRecord, JobRecord, RecvRecord, SendRecord, Table};

/// The sm_config key that marks every VDI a migration made, with the mirror's id as value:
/// whatever carries it can be found and destroyed when the migration is undone.
pub const BASE_MIRROR: &str = "base_mirror";

/// The sm_config key by which a source tells the destination its image format (xapi's
/// `image-format`): `vhd` sources migrate the SMAPIv1 way, others (`qcow2`) the SMAPIv3 way.
pub const IMAGE_FORMAT: &str = "image-format";

/// How long finalize waits for the source datapath to drain (xapi's 150 s).
pub const DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(150);

/// The migration records of a host.
pub struct Records {
    /// Sends (source side).
    pub sends: Mutex<Table<SendRecord>>,
    /// Receives (destination side).
    pub recvs: Mutex<Table<RecvRecord>>,
    /// Copies (source side).
    pub copies: Mutex<Table<CopyRecord>>,
    /// Jobs (source side).
    pub jobs: Mutex<Table<JobRecord>>,
}

impl Records {
    /// Loads the records under `<root>/state/`.
    pub fn load(root: &std::path::Path) -> std::io::Result<Records> {
        let dir = root.join("state");
        Ok(Records {
            sends: Mutex::new(Table::load(&dir.join("send"))?),
            recvs: Mutex::new(Table::load(&dir.join("recv"))?),
            copies: Mutex::new(Table::load(&dir.join("copy"))?),
            jobs: Mutex::new(Table::load(&dir.join("job"))?),
        })
    }
}

/// Locks a table, ignoring poisoning (a record table is consistent after every statement).
pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Another host, called over XML-RPC as xapi calls hosts.
pub struct Remote {
    /// The endpoint (with the host's secret).
    pub endpoint: Endpoint,
    client: RpcClient,
    /// For the checks that the host is there while a call waits ([`Remote::watched`]).
    checks: RpcClient,
}

/// How long a call to another host waits before that host is first asked whether it is
/// there, and then between such checks.
const ALIVE_EVERY: Duration = Duration::from_secs(10);
/// How many `Redirect`s one call follows.
const MAX_REDIRECTS: usize = 3;
/// How long such a check may take before the host counts as stopped.
pub const ALIVE_WITHIN: Duration = Duration::from_secs(20);

impl Remote {
    /// The host at `url` (`http://host:port[/services/SM]?session_id=SECRET`).
    pub fn new(url: &str) -> Result<Remote, StorageError> {
        let endpoint = Endpoint::parse(url).map_err(|e| StorageError::InternalError(format!("destination URL: {e}")))?;
        // A host on this machine is named by its socket's absolute path: anything else that is
        // no http(s) URL ("not a url") was taken for a socket path relative to wherever this
        // host runs.
        if let Endpoint::Unix(path) = &endpoint
            && !path.is_absolute()
        {
            return Err(StorageError::InternalError(format!(
                "destination URL {url:?}: name another host by http://, https:// or the absolute path of its Unix socket"
            )));
        }
        Ok(Remote::on(endpoint))
    }

    fn on(endpoint: Endpoint) -> Remote {
        let client = RpcClient::new(endpoint.clone()).with_timeout(Duration::from_secs(300));
        let checks = RpcClient::new(endpoint.clone()).with_timeout(ALIVE_WITHIN);
        Remote { endpoint, client, checks }
    }

    /// Runs `call` to this host, asking the host a trivial question (`Query.query`, on a
    /// connection of its own) whenever the call has waited [`ALIVE_EVERY`] more; a check
    /// unanswered within [`ALIVE_WITHIN`] fails the call. A host that is slow at a long call
    /// (a finalize composing gigabytes) answers its checks and is waited for; one that has
    /// stopped (hung, or behind a network that drops everything and closes nothing) is given
    /// up on, where TCP takes a quarter of an hour to notice, and a paused guest, a detach or a
    /// rollback waited as long.
    async fn watched<T>(&self, method: &str, call: impl Future<Output = Result<T, CallError>>) -> Result<T, CallError> {
        tokio::pin!(call);
        let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + ALIVE_EVERY, ALIVE_EVERY);
        loop {
            tokio::select! {
                outcome = &mut call => return outcome,
                _ = ticks.tick() => {
                    let check = self.checks.call_xml("Query.query", crate::rpc::Value::Struct(vec![("dbg".into(), crate::rpc::Value::String("sxm-alive".into()))]));
                    tokio::select! {
                        outcome = &mut call => return outcome,
                        answer = check => {
                            // Any answer, an error included, is the host at work.
                            use crate::http::CallErrorKind as K;
                            if let Err(e) = answer && !matches!(e.kind, K::Storage(_) | K::Unauthorised | K::Status { .. } | K::Protocol(_)) {
                                tracing::warn!(host = %self.endpoint, method, check = %e, "the host stopped answering while a call waited; giving up on the call");
                                return Err(CallError { endpoint: self.endpoint.to_string(), method: method.to_owned(), kind: K::Unresponsive(ALIVE_WITHIN) });
                            }
                        }
                    }
                }
            }
        }
    }

    /// Makes a call and decodes its answer.
    pub async fn call<T: Marshal>(&self, call: Call) -> Result<T, StorageError> {
        self.call_answered(call).await.map_err(|(e, _)| e)
    }

    /// [`Remote::call`], also saying whether the outcome of a failure is known: the host
    /// answered (it refused or failed the call), or the call never reached it (no connection
    /// could be made), rather than a lost exchange (it may have done the call without our
    /// hearing back).
    pub async fn call_answered<T: Marshal>(&self, call: Call) -> Result<T, (StorageError, bool)> {
        use crate::http::CallErrorKind as K;
        self.call_classified(call, |k| matches!(k, Some(K::Storage(_) | K::Unauthorised | K::Status { .. } | K::Connect(_) | K::Tls(_)) | None)).await
    }

    /// [`Remote::call`], also saying whether a failure is the host's being away: no connection
    /// could be made, or the exchange broke or timed out before an answer. Such a call is worth
    /// making again once the host is back (if it is one that may be made twice).
    pub async fn call_away<T: Marshal>(&self, call: Call) -> Result<T, (StorageError, bool)> {
        use crate::http::CallErrorKind as K;
        self.call_classified(call, |k| matches!(k, Some(K::Connect(_) | K::Http(_) | K::Io(_) | K::Body(_) | K::Timeout(_) | K::Unresponsive(_)))).await
    }

    /// Makes a call; a failure comes with what `class` says of its kind (`None`: the answer
    /// came but did not decode).
    async fn call_classified<T: Marshal>(&self, call: Call, class: impl Fn(Option<&crate::http::CallErrorKind>) -> bool) -> Result<T, (StorageError, bool)> {
        use crate::http::CallErrorKind as K;
        let method = call.method();
        let params = call.params().into_iter().next().unwrap_or(crate::rpc::Value::Null);
        // A host that is not the one to answer (in xapi, a pool member for its SR's master)
        // fails the call with `Redirect ip`, and the caller makes the same call there
        // (`Storage_utils.redirectable_rpc`), a few hops at most.
        let mut redirected: Option<Remote> = None;
        let mut hops = 0;
        let v = loop {
            let to = redirected.as_ref().unwrap_or(self);
            match to.watched(method, to.client.call_xml(method, params.clone())).await {
                Err(e) if hops < MAX_REDIRECTS && let K::Storage(StorageError::Redirect(Some(ip))) = &e.kind && let Some(there) = to.endpoint.redirected(ip) => {
                    tracing::info!(from = %to.endpoint, to = %there, method, "redirected");
                    hops += 1;
                    redirected = Some(Remote::on(there));
                }
                other => break other,
            }
        };
        let v = v.map_err(|e| {
            let error = match &e.kind {
                K::Storage(s) => s.clone(),
                _ => StorageError::InternalError(format!("{e}: {}", error_chain(&e))),
            };
            (error, class(Some(&e.kind)))
        })?;
        T::from_value(&v).map_err(|e| (StorageError::InternalError(format!("{method} on the destination answered something unexpected: {e}")), class(None)))
    }

    /// Opens an NBD connection to a datapath of the remote host through
    /// `PUT /services/SM/nbd/<vm>/<sr>/<vdi>/<dp>` (the mirror's way) or, for a copy,
    /// `PUT /services/SM/nbdproxy/import/<vm>/<sr>/<vdi>/<dp>` (as xapi's copy does).
    pub async fn connect_nbd(&self, vm: &str, sr: &str, vdi: &str, dp: &str, copy: bool) -> Result<std::os::fd::OwnedFd, StorageError> {
        let route = if copy { "nbdproxy/import" } else { "nbd" };
        let path = format!("/services/SM/{route}/{}/{}/{}/{}", enc(vm), enc(sr), enc(vdi), enc(dp));
        self.watched(&format!("PUT /services/SM/{route}/…"), crate::http::client::connect_nbd(&self.endpoint, &path))
            .await
            .map_err(|e| StorageError::InternalError(format!("{e}: {}", error_chain(&e))))
    }
}

/// Percent-encodes one path component.
fn enc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// An error's causes, joined.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut parts = Vec::new();
    let mut cur = e.source();
    while let Some(c) = cur {
        parts.push(c.to_string());
        cur = c.source();
    }
    parts.join(": ")
}

/// A boxed future: the mux calls itself from inside migration steps, and a recursive async
/// call needs its future's type erased.
pub type Boxed<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;
