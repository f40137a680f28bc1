//! A manager of datapaths: one `tapmirror serve` per image being served, each in a folder of
//! its own under a group's run folder, driven over its control socket ([`ServeProcess`]).
//!
//! This is the half of a storage backend's data path that does not depend on what the images
//! are to the caller: the `ext` (VHD) and `qcow2` backends of sxm both use it, and each keeps
//! a thin adapter that turns its records into the plain values used here (a group name and run
//! folder, an id, an image path, read-write or not) and [`DatapathError`] into its own errors.
//! It lives in tapmirror, next to [`crate::process`], because everything it does is about
//! tapmirror processes; it names no storage repository, record or remote call.
//!
//! # Words
//!
//! | word | meaning |
//! | --- | --- |
//! | group | a set of datapaths sharing one run folder, named by the caller ([`Group`]) |
//! | id | the caller's name of one datapath within its group; also its NBD export name |
//! | image | the file the datapath serves, in the manager's [`Datapaths::new`] format |
//!
//! # States
//!
//! | state | process |
//! | --- | --- |
//! | none | none; no folder |
//! | attached | runs, **paused**: clients may connect and negotiate, requests wait; the image is held read-only, unlocked |
//! | activated | runs, serving requests; the leaf is open for writing under its `flock` (unless attached read-only) |
//!
//! [`Datapaths::attach`] starts the process and pauses it, [`Datapaths::activate`] unpauses
//! it, [`Datapaths::deactivate`] drains outstanding requests (bounded by [`DRAIN_TIMEOUT`],
//! xapi's limit) and pauses it again, [`Datapaths::detach`] shuts it down and removes its
//! folder. A change of an activated image's files runs in [`Datapaths::with_quiesced`]: pause
//! (in-flight requests finish, new ones wait, the leaf is let go), the change on the files,
//! unpause (the process reopens the image's path, now perhaps a new leaf); the guest sees a
//! pause and no error, and no write is lost.
//!
//! # A migration's data path
//!
//! | call | control command | notes |
//! | --- | --- | --- |
//! | [`Datapaths::serve_nbd`] (destination) | `nbd-accept` with the passed connection | served like the guest's connections: while only attached, its requests wait |
//! | [`Datapaths::mirror_attach`] (source) | `mirror-attach` with the target connection | a target that fails or stalls past [`MIRROR_TIMEOUT`] fails the mirror, never the guest |
//! | [`Datapaths::mirror_status`] | `stats` | [`MirrorState`] and counters |
//! | [`Datapaths::mirror_detach`] | `mirror-detach` | after the writes in flight; none attached (or a failed one) is not an error |
//! | [`Datapaths::drain`] | `drain` | no request outstanding, locally or on the mirror |
//!
//! The mirror lives in the process, not in the image: a pause and unpause (onto a new leaf,
//! [`Datapaths::with_quiesced`]) keep it.
//!
//! # Folders
//!
//! Each datapath has a folder `<run_dir>/<8 hex>/` (the id's first group of hex digits, or a
//! random one if another id of the group holds that), short enough for socket paths (107
//! bytes) under a short `run_dir`, holding tapmirror's files (`nbd.sock`, `control.sock`,
//! `serve.pid`, `serve.log`) and [`OWNER_FILE`], which names the id. The owner record is
//! written before the process starts, so every process started here sits in a folder that says
//! whose it is.
//!
//! # After a restart
//!
//! The processes outlive their starter. [`Datapaths::recover`] (with the caller's list of what
//! should be attached) adopts each listed id's running process (checked by pid, start time and
//! command line, see [`ServeProcess::adopt`]), restarts it if it is gone, unresponsive or in
//! the wrong mode, puts it in the listed state (paused or not), and kills and removes every
//! folder in `run_dir` that belongs to no listed id.
//!
//! All calls block (up to their timeouts); control calls run on a private runtime
//! ([`block_on`]), so they work from blocking threads, tests, and inside a runtime.

use std::collections::HashMap;
use std::fmt::{self, Display};
use std::io::{self, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::mirror::{MirrorMode, MirrorState};
use crate::process::{ProcessError, ServeProcess, ServeSpec};

/// The record naming a datapath folder's owner.
pub const OWNER_FILE: &str = "owner.json";
/// How long `deactivate` waits for outstanding requests (xapi's pre-deactivate hook allows
/// 150 s for `reqs_outstanding` to reach 0).
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(150);
/// How long a control request other than drain may take.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(30);
/// How long after a failed restart of a dead datapath the next is tried. A killed process's
/// files can stay open (its `flock` held) while the kernel tears its io_uring down, so the
/// first restart may find the image in use: retried soon.
const RESTART_RETRY: Duration = Duration::from_secs(5);
/// How long `detach` waits for the process to flush and exit before killing it.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the mirror target may answer nothing while requests wait on it (or take over its
/// NBD handshake) before the mirror is failed and the guest goes on locally. tapdisk has no such bound of its own
/// (its guest requests time out after 120 s); a shorter one fails a dead target sooner
/// without holding guest writes for long.
pub const MIRROR_TIMEOUT: Duration = Duration::from_secs(30);

/// The owner record. Its field is called `vdi` because folders written by earlier versions
/// (whose processes outlive an upgrade) say so; to this module it is just the id.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
struct Owner {
    #[serde(rename = "vdi")]
    id: String,
    read_write: bool,
}

/// A group of datapaths: a name (keying, logs) and the folder their folders live in.
#[derive(Clone, Copy, Debug)]
pub struct Group<'a> {
    /// The group's name, unique among the groups one [`Datapaths`] serves.
    pub name: &'a str,
    /// The folder holding one folder per datapath (nothing else should live there).
    pub run_dir: &'a Path,
}

/// One datapath that should exist, for [`Datapaths::recover`].
#[derive(Clone, Copy, Debug)]
pub struct Wanted<'a> {
    /// Its id.
    pub id: &'a str,
    /// Serving read-write.
    pub read_write: bool,
    /// Activated (serving) rather than only attached (paused).
    pub active: bool,
}

/// How an attached datapath is reached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// The NBD Unix socket.
    pub socket: PathBuf,
    /// The export name (the id).
    pub export: String,
}

/// A mirror's state, from the datapath's `stats`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MirrorReport {
    /// The state.
    pub state: MirrorState,
    /// Bytes a full mirror has still to copy.
    pub bytes_left: u64,
    /// Bytes of guest writes mirrored so far (0 once failed: tapmirror detached it).
    pub bytes_mirrored: u64,
    /// Why the last mirror failed (the target's error, its silence), if one did.
    pub failure: Option<String>,
}

/// What a [`DatapathError`] is, for a caller mapping it onto its own errors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DatapathErrorKind {
    /// The id is attached in the other mode.
    Busy,
    /// A file operation ran out of space (`ENOSPC`, `EDQUOT`).
    NoSpace,
    /// Any other file operation of the manager's own (folders, owner records).
    Io,
    /// The id has no datapath, or its process failed or answered wrongly.
    Failure,
}

/// What went wrong, with the id it concerns.
#[derive(Debug)]
pub enum DatapathError {
    /// No datapath for `id`.
    NotAttached {
        /// The id.
        id: String,
    },
    /// `id` is attached in the other mode.
    OtherMode {
        /// The id.
        id: String,
    },
    /// A control call or process operation on `id`'s datapath failed.
    Process {
        /// The id.
        id: String,
        /// What was being done.
        what: String,
        /// Why it failed.
        source: Box<ProcessError>,
    },
    /// A file operation of the manager's own failed.
    Io {
        /// What was being done, with the path.
        what: String,
        /// Why it failed.
        source: io::Error,
    },
    /// `id`'s datapath answered something unexpected.
    Unexpected {
        /// The id.
        id: String,
        /// What.
        what: String,
    },
    /// Every candidate folder name in `run_dir` is taken.
    NoFolder {
        /// The group's run folder.
        run_dir: PathBuf,
    },
    /// No runtime could be built for a control call.
    Runtime {
        /// Why.
        source: io::Error,
    },
}

fn is_no_space(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::ENOSPC) || e.raw_os_error() == Some(libc::EDQUOT)
}

impl DatapathError {
    /// What it is.
    pub fn kind(&self) -> DatapathErrorKind {
        match self {
            DatapathError::OtherMode { .. } => DatapathErrorKind::Busy,
            DatapathError::Io { source, .. } if is_no_space(source) => DatapathErrorKind::NoSpace,
            DatapathError::Io { .. } => DatapathErrorKind::Io,
            _ => DatapathErrorKind::Failure,
        }
    }

    /// The id it concerns, when it concerns one.
    pub fn id(&self) -> Option<&str> {
        match self {
            DatapathError::NotAttached { id }
            | DatapathError::OtherMode { id }
            | DatapathError::Process { id, .. }
            | DatapathError::Unexpected { id, .. } => Some(id),
            _ => None,
        }
    }

    /// The message, calling ids `noun` (`"VDI"` gives "draining of VDI …: …").
    pub fn message(&self, noun: &str) -> String {
        match self {
            DatapathError::NotAttached { id } => format!("{noun} {id} is not attached"),
            DatapathError::OtherMode { id } => format!("{noun} {id} is attached in the other mode"),
            DatapathError::Process { id, what, source } => format!("{what} of {noun} {id}: {}", crate::error_chain(source.as_ref())),
            DatapathError::Io { what, source } => format!("{what}: {source}"),
            DatapathError::Unexpected { id, what } => format!("{noun} {id}: {what}"),
            DatapathError::NoFolder { run_dir } => format!("no free datapath folder in {}", run_dir.display()),
            DatapathError::Runtime { source } => format!("starting a runtime for a control call: {source}"),
        }
    }
}

impl Display for DatapathError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message("datapath"))
    }
}

impl std::error::Error for DatapathError {}


/// Runs a future to completion from blocking code: on a private current-thread runtime in a
/// scoped thread, so it works from a blocking pool, from a test, and even from inside a
/// runtime. `Err` only when the runtime cannot be built.
pub fn block_on<F>(f: F) -> io::Result<F::Output>
where
    F: std::future::Future + Send,
    F::Output: Send,
{
    std::thread::scope(|s| s.spawn(|| tokio::runtime::Builder::new_current_thread().enable_all().build().map(|rt| rt.block_on(f))).join())
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
}

type Result<T, E = DatapathError> = std::result::Result<T, E>;

fn run<F>(f: F) -> Result<F::Output>
where
    F: std::future::Future + Send,
    F::Output: Send,
{
    block_on(f).map_err(|source| DatapathError::Runtime { source })
}

fn process_error(id: &str, what: &str, source: ProcessError) -> DatapathError {
    DatapathError::Process { id: id.to_owned(), what: what.to_owned(), source: Box::new(source) }
}

fn io_error(what: impl Display, source: io::Error) -> DatapathError {
    DatapathError::Io { what: what.to_string(), source }
}

/// Whether `dp`'s process has exited, or does within `limit`.
fn gone_within(dp: &Datapath, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while dp.process.is_running() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    !dp.process.is_running()
}

/// One running datapath.
struct Datapath {
    process: ServeProcess,
    read_write: bool,
    /// Activated (serving) rather than only attached (paused).
    active: Mutex<bool>,
    /// Paused for a change of its files (`with_quiesced`), though active: a process that dies
    /// meanwhile is restarted paused, and taken up active once the change is done (it stayed
    /// paused for good, its guest frozen, when the pause was taken for the state to restore).
    quiesced: Mutex<bool>,
    /// After a failed restart of its dead process, when to try again.
    retry_restart_at: Mutex<Option<Instant>>,
}

impl Datapath {
    fn is_active(&self) -> bool {
        *self.active.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn set_active(&self, active: bool) {
        *self.active.lock().unwrap_or_else(PoisonError::into_inner) = active;
    }

    fn is_quiesced(&self) -> bool {
        *self.quiesced.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn set_quiesced(&self, quiesced: bool) {
        *self.quiesced.lock().unwrap_or_else(PoisonError::into_inner) = quiesced;
    }

    fn new(process: ServeProcess, read_write: bool, active: bool) -> Datapath {
        Datapath { process, read_write, active: Mutex::new(active), quiesced: Mutex::new(false), retry_restart_at: Mutex::new(None) }
    }

    /// Its process has died and a restart may be tried now.
    fn is_dead(&self, now: Instant) -> bool {
        !self.process.is_running() && self.retry_restart_at.lock().unwrap_or_else(PoisonError::into_inner).is_none_or(|at| now >= at)
    }

    fn endpoint(&self, id: &str) -> Endpoint {
        Endpoint { socket: self.process.nbd_socket().to_path_buf(), export: id.to_owned() }
    }
}

type Key = (String, String);

fn key(g: Group<'_>, id: &str) -> Key {
    (g.name.to_owned(), id.to_owned())
}

/// The datapaths of every group one caller serves, all serving one image format.
pub struct Datapaths {
    exe: PathBuf,
    format: String,
    live: Mutex<HashMap<Key, Arc<Datapath>>>,
    /// A full mirror's cap on its background pass while the guest writes; `None`: tapmirror's
    /// default.
    mirror_busy_rate: Option<u64>,
}

impl Datapaths {
    /// No datapaths yet; processes run `exe serve --format FORMAT`.
    pub fn new(exe: PathBuf, format: &str) -> Datapaths {
        Datapaths { exe, format: format.to_owned(), live: Mutex::new(HashMap::new()), mirror_busy_rate: None }
    }

    /// Full mirrors cap their background pass at `bytes_per_s` while the guest writes (0: no
    /// cap), rather than at tapmirror's default (`mirror::DEFAULT_BUSY_RATE`): a host's choice
    /// between a quicker migration and a guest less disturbed by it.
    pub fn with_mirror_busy_rate(mut self, bytes_per_s: Option<u64>) -> Datapaths {
        self.mirror_busy_rate = bytes_per_s;
        self
    }

    fn get(&self, g: Group<'_>, id: &str) -> Option<Arc<Datapath>> {
        self.live.lock().unwrap_or_else(PoisonError::into_inner).get(&key(g, id)).cloned()
    }

    fn attached_dp(&self, g: Group<'_>, id: &str) -> Result<Arc<Datapath>> {
        self.get(g, id).ok_or_else(|| DatapathError::NotAttached { id: id.to_owned() })
    }

    /// The ids of `g` with a datapath, sorted.
    pub fn attached(&self, g: Group<'_>) -> Vec<String> {
        let live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
        let mut v: Vec<String> = live.keys().filter(|(s, _)| s == g.name).map(|(_, id)| id.clone()).collect();
        v.sort();
        v
    }

    /// Whether `id` has a datapath.
    pub fn is_attached(&self, g: Group<'_>, id: &str) -> bool {
        self.get(g, id).is_some()
    }

    /// Drops what is known of `g` (when nothing of it is attached).
    pub fn forget(&self, g: Group<'_>) {
        self.live.lock().unwrap_or_else(PoisonError::into_inner).retain(|(s, _), _| s != g.name);
    }

    /// A folder in `run_dir` for `id`'s datapath: the id's first group unless another id's
    /// folder has that name (then a random one).
    fn folder_for(&self, g: Group<'_>, id: &str) -> Result<PathBuf> {
        let first: String = id.chars().take_while(char::is_ascii_hexdigit).take(8).collect();
        let random = (0..16).map(|_| uuid::Uuid::new_v4().simple().to_string()[..8].to_owned());
        for name in std::iter::once(first).filter(|n| n.len() == 8).chain(random) {
            let dir = g.run_dir.join(&name);
            if !dir.exists() || read_owner(&dir).is_some_and(|o| o.id == id) {
                return Ok(dir);
            }
        }
        Err(DatapathError::NoFolder { run_dir: g.run_dir.to_path_buf() })
    }

    /// Starts (paused) a process for `id` serving `image`, in folder `dir`.
    fn start(&self, g: Group<'_>, id: &str, image: &Path, read_write: bool, dir: &Path) -> Result<Datapath> {
        std::fs::create_dir_all(dir).map_err(|e| io_error(format!("creating {}", dir.display()), e))?;
        write_owner(dir, &Owner { id: id.to_owned(), read_write }).map_err(|e| io_error("recording a datapath's owner", e))?;
        let mut spec = ServeSpec::new(&self.exe, image, dir);
        spec.export_name = id.to_owned();
        spec.read_only = !read_write;
        // Paused from its first request: a restarted datapath's clients reconnect to the same
        // socket at once, and an attached disk that is not active must not take their I/O
        // (it used to start serving and be paused only once it answered, 60-140 ms later).
        spec.extra_args = vec!["--format".into(), self.format.clone().into(), "--paused".into()];
        let process = match ServeProcess::spawn(&spec) {
            Ok(p) => p,
            Err(e) => {
                let _ = std::fs::remove_dir_all(dir);
                return Err(process_error(id, "starting the datapath", e));
            }
        };
        let dp = Datapath::new(process, read_write, false);
        tracing::info!(group = g.name, id, pid = dp.process.pid(), read_write, dir = %dir.display(), "datapath started (attached, paused)");
        Ok(dp)
    }

    fn command(&self, id: &str, dp: &Datapath, cmd: &str) -> Result<serde_json::Value> {
        run(dp.process.command(json!({"cmd": cmd}), Vec::new(), CONTROL_TIMEOUT))?.map_err(|e| process_error(id, cmd, e))
    }

    /// Sends `cmd`, for which a refusal saying `already` means the process is in the state
    /// wanted already (pause of a paused server, unpause of a running one).
    fn to_state(&self, id: &str, dp: &Datapath, cmd: &str, already: &str) -> Result<()> {
        // A pause waits for the requests in flight, and a mirrored write is in flight until
        // its target answers or [`MIRROR_TIMEOUT`] fails the mirror: wait longer than that, or
        // a pause given up on here would still complete in the process and leave the guest
        // frozen behind a failed change.
        let timeout = if cmd == "pause" { MIRROR_TIMEOUT + CONTROL_TIMEOUT } else { CONTROL_TIMEOUT };
        match run(dp.process.command(json!({"cmd": cmd}), Vec::new(), timeout))? {
            Ok(_) => Ok(()),
            Err(ProcessError::Refused { message, .. }) if message == already => Ok(()),
            Err(e) => Err(process_error(id, cmd, e)),
        }
    }

    fn pause(&self, id: &str, dp: &Datapath) -> Result<()> {
        self.to_state(id, dp, "pause", "already paused")?;
        dp.set_active(false);
        Ok(())
    }

    fn unpause(&self, id: &str, dp: &Datapath) -> Result<()> {
        self.to_state(id, dp, "unpause", "not paused")?;
        dp.set_active(true);
        Ok(())
    }

    /// Starts `id`'s datapath serving `image`, paused, and says how to reach it. A repeated
    /// call in the same mode is answered; one in the other mode is refused
    /// ([`DatapathError::OtherMode`]).
    pub fn attach(&self, g: Group<'_>, id: &str, image: &Path, read_write: bool) -> Result<Endpoint> {
        if let Some(dp) = self.get(g, id) {
            if dp.read_write == read_write {
                return Ok(dp.endpoint(id));
            }
            return Err(DatapathError::OtherMode { id: id.to_owned() });
        }
        let dir = self.folder_for(g, id)?;
        // A folder left by a process nobody recovered (a group started without its list).
        if dir.exists()
            && let Err(e) = ServeProcess::reap(&dir)
        {
            return Err(process_error(id, "clearing an old datapath folder", e));
        }
        let dp = self.start(g, id, image, read_write, &dir)?;
        let endpoint = dp.endpoint(id);
        self.live.lock().unwrap_or_else(PoisonError::into_inner).insert(key(g, id), Arc::new(dp));
        Ok(endpoint)
    }

    /// The datapath takes I/O.
    pub fn activate(&self, g: Group<'_>, id: &str) -> Result<()> {
        let dp = self.attached_dp(g, id)?;
        if let Err(e) = self.unpause(id, &dp) {
            // Dead (killed, crashed), or dying: recorded active, so that its restart takes
            // I/O (a failed switch-over's undo could not give the guest its disk back here,
            // and the restart then served it paused, or not as recorded).
            if !gone_within(&dp, Duration::from_secs(2)) {
                return Err(e);
            }
            dp.set_active(true);
            tracing::warn!(group = g.name, id, pid = dp.process.pid(), "datapath process is gone; recorded active, its restart takes I/O");
            return Ok(());
        }
        tracing::info!(group = g.name, id, pid = dp.process.pid(), "datapath activated");
        Ok(())
    }

    /// Waits (up to [`DRAIN_TIMEOUT`]) for outstanding requests, then stops taking I/O.
    /// Requests still outstanding at the timeout fail the call and leave the datapath active.
    pub fn deactivate(&self, g: Group<'_>, id: &str) -> Result<()> {
        let dp = self.attached_dp(g, id)?;
        if let Err(e) = run(dp.process.drain(DRAIN_TIMEOUT))? {
            // It died (killed, crashed), or is dying: no request is outstanding in a process
            // that is gone, and its image holds what a crash leaves, which every format here
            // survives. Refusing would leave the VDI impossible to detach until the host
            // restarts.
            if !gone_within(&dp, Duration::from_secs(2)) {
                return Err(process_error(id, "draining", e));
            }
            // Recorded inactive, so that its restart serves it paused: it came back taking
            // the guest's writes though the VDI was deactivated (and, after a restart of the
            // host, which goes by its record, paused with the guest's I/O hung).
            dp.set_active(false);
            tracing::warn!(group = g.name, id, pid = dp.process.pid(), "datapath process is gone; deactivated with nothing to drain");
            return Ok(());
        }
        self.pause(id, &dp)?;
        tracing::info!(group = g.name, id, pid = dp.process.pid(), "datapath deactivated (drained, paused)");
        Ok(())
    }

    /// Shuts the process down (it flushes), killing it if it does not exit in time, and
    /// removes its folder.
    pub fn detach(&self, g: Group<'_>, id: &str) -> Result<()> {
        let dp = self.attached_dp(g, id)?;
        let stopped = run(dp.process.shutdown(SHUTDOWN_TIMEOUT))?.map_err(|e| process_error(id, "stopping the datapath", e))?;
        let dir = dp.process.dir().to_path_buf();
        self.live.lock().unwrap_or_else(PoisonError::into_inner).remove(&key(g, id));
        // Gone already when a restart of the dead process failed.
        match std::fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(io_error(format!("removing {}", dir.display()), e)),
            _ => {}
        }
        tracing::info!(group = g.name, id, pid = dp.process.pid(), ?stopped, "datapath detached");
        Ok(())
    }

    /// How the attached `id` is reached.
    pub fn endpoint(&self, g: Group<'_>, id: &str) -> Result<Endpoint> {
        Ok(self.attached_dp(g, id)?.endpoint(id))
    }

    /// Runs `f` (a change of `id`'s files) with `id`'s datapath quiesced, when it is active:
    /// paused before (in-flight requests finish, new ones wait, the leaf is let go), unpaused
    /// after whatever `f` answered (the process reopens the image's path). An attached but
    /// inactive datapath is paused already. `lift` turns this module's errors into `f`'s.
    pub fn with_quiesced<T, E: Display>(
        &self,
        g: Group<'_>,
        id: &str,
        op: &str,
        f: impl FnOnce() -> Result<T, E>,
        lift: impl Fn(DatapathError) -> E,
    ) -> Result<T, E> {
        let Some(dp) = self.get(g, id).filter(|dp| dp.is_active()) else { return f() };
        dp.set_quiesced(true);
        if let Err(e) = self.to_state(id, &dp, "pause", "already paused") {
            dp.set_quiesced(false);
            return Err(lift(e));
        }
        tracing::info!(group = g.name, id, op, "datapath paused for a change of its files");
        let r = f();
        let resumed = self.resume_after_change(g, id, dp).map_err(&lift);
        match (&r, resumed) {
            (_, Ok(())) => tracing::info!(group = g.name, id, op, ok = r.is_ok(), "datapath resumed"),
            (Ok(_), Err(e)) => {
                tracing::error!(group = g.name, id, op, error = %e, "datapath could not resume after the change");
                return Err(e);
            }
            (Err(_), Err(e)) => tracing::error!(group = g.name, id, op, error = %e, "datapath could not resume after a failed change"),
        }
        r
    }

    /// Ends `with_quiesced`'s pause of `dp`: unpauses the datapath now serving `id` (one
    /// restarted during the change, paused, included). One that died and is not restarted yet
    /// is left to its restart, which takes it up active now that the change is done: the
    /// host's restart waits for the SR's lock, held by the change, so waiting for it here held
    /// the guest 5 s for nothing.
    fn resume_after_change(&self, g: Group<'_>, id: &str, dp: Arc<Datapath>) -> Result<()> {
        let current = self.get(g, id).unwrap_or(dp);
        current.set_quiesced(false);
        match self.to_state(id, &current, "unpause", "not paused") {
            Err(_) if !current.process.is_running() => {
                tracing::warn!(group = g.name, id, "datapath died during a change of its files; its restart resumes it");
                Ok(())
            }
            other => other,
        }
    }

    /// Sends `request` with `fds` to `id`'s datapath, which must exist.
    fn command_with(
        &self,
        g: Group<'_>,
        id: &str,
        request: serde_json::Value,
        fds: Vec<OwnedFd>,
        timeout: Duration,
    ) -> Result<Result<serde_json::Value, ProcessError>> {
        let dp = self.attached_dp(g, id)?;
        run(dp.process.command(request, fds, timeout))
    }

    /// Destination of a migration: the datapath serves NBD on `conn` (`nbd-accept`) until the
    /// peer closes it, under any export name, greeting it old-style when `oldstyle` (as
    /// tapdisk's server does) and fixed-newstyle otherwise. Requests wait while the datapath
    /// is attached but not active, as the guest's do.
    pub fn serve_nbd(&self, g: Group<'_>, id: &str, conn: OwnedFd, oldstyle: bool) -> Result<()> {
        let handshake = if oldstyle { "oldstyle" } else { "newstyle" };
        let answer = self
            .command_with(g, id, json!({"cmd": "nbd-accept", "handshake": handshake}), vec![conn], CONTROL_TIMEOUT)?
            .map_err(|e| process_error(id, "serving an NBD connection", e))?;
        tracing::info!(group = g.name, id, socket = %answer["socket"], "datapath serves a passed NBD connection");
        Ok(())
    }

    /// Source of a migration: the datapath mirrors guest writes onto `target`, an NBD
    /// connection to `export` (`mirror-attach`). A full mirror also copies the whole image in
    /// the background. Its target is a volume made for it (the destination's
    /// `DATA.MIRROR.receive_start2` creates one, as xapi's does, and a new VDI reads as
    /// zeroes), so the image's holes are not sent: zeroing them took a 2 TiB disk holding
    /// 3 MiB three minutes, and a qcow2 destination 259 MiB of zero-cluster metadata.
    /// `rate` caps a full mirror's background pass from its first byte (0: no cap).
    pub fn mirror_attach(&self, g: Group<'_>, id: &str, target: OwnedFd, export: &str, mode: MirrorMode, rate: u64) -> Result<()> {
        let mode = match mode {
            MirrorMode::Sync => "sync",
            MirrorMode::Full => "full",
        };
        let mut request = json!({"cmd": "mirror-attach", "mode": mode, "export": export,
                                 "timeout_ms": MIRROR_TIMEOUT.as_millis() as u64, "target_is_zero": true, "rate": rate});
        if let Some(busy) = self.mirror_busy_rate {
            request["busy_rate"] = json!(busy);
        }
        // The handshake may take the mirror timeout; the answer comes after it.
        let answer = self
            .command_with(g, id, request, vec![target], MIRROR_TIMEOUT + CONTROL_TIMEOUT)?
            .map_err(|e| process_error(id, "attaching the mirror", e))?;
        tracing::info!(group = g.name, id, mode, export, state = %answer["state"], "mirror attached");
        Ok(())
    }

    /// The mirror's state, from the datapath's `stats`.
    pub fn mirror_status(&self, g: Group<'_>, id: &str) -> Result<MirrorReport> {
        let stats =
            self.command_with(g, id, json!({"cmd": "stats"}), Vec::new(), CONTROL_TIMEOUT)?.map_err(|e| process_error(id, "stats", e))?;
        mirror_report(&stats["mirror"])
            .ok_or_else(|| DatapathError::Unexpected { id: id.to_owned(), what: format!("stats without a mirror state: {stats}") })
    }

    /// How many NBD connections passed to the datapath (`serve_nbd`) it serves now: a
    /// migration's mirror, not the readers on its socket.
    pub fn passed_connections(&self, g: Group<'_>, id: &str) -> Result<u64> {
        let stats =
            self.command_with(g, id, json!({"cmd": "stats"}), Vec::new(), CONTROL_TIMEOUT)?.map_err(|e| process_error(id, "stats", e))?;
        stats["passed_connections"]
            .as_u64()
            .ok_or_else(|| DatapathError::Unexpected { id: id.to_owned(), what: format!("stats without passed_connections: {stats}") })
    }

    /// Caps a full mirror's background pass at `bytes_per_s` data bytes per second (0: none).
    pub fn mirror_rate(&self, g: Group<'_>, id: &str, bytes_per_s: u64) -> Result<()> {
        self.command_with(g, id, json!({"cmd": "mirror-rate", "bytes_per_s": bytes_per_s}), Vec::new(), CONTROL_TIMEOUT)?
            .map_err(|e| process_error(id, "pacing the mirror", e))?;
        Ok(())
    }

    /// Stops mirroring after the writes in flight. Without a mirror attached (none ever, or a
    /// failed one, which tapmirror has detached already) there is nothing to stop.
    pub fn mirror_detach(&self, g: Group<'_>, id: &str) -> Result<()> {
        match self.command_with(g, id, json!({"cmd": "mirror-detach"}), Vec::new(), MIRROR_TIMEOUT + CONTROL_TIMEOUT)? {
            Ok(answer) => {
                tracing::info!(group = g.name, id, counters = %answer["counters"], "mirror detached");
                Ok(())
            }
            Err(ProcessError::Refused { message, .. }) if message.starts_with("no mirror attached") => {
                tracing::info!(group = g.name, id, "no mirror to detach");
                Ok(())
            }
            Err(e) => Err(process_error(id, "detaching the mirror", e)),
        }
    }

    /// Waits (up to `timeout`) until no request is outstanding on the datapath, locally or on
    /// its mirror (a mirrored write is outstanding until both sides have it).
    pub fn drain(&self, g: Group<'_>, id: &str, timeout: Duration) -> Result<()> {
        let dp = self.attached_dp(g, id)?;
        let answer = run(dp.process.drain(timeout))?.map_err(|e| process_error(id, "draining", e))?;
        tracing::info!(group = g.name, id, mirror = %answer["mirror"], "datapath drained");
        Ok(())
    }

    /// The ids of `g` whose process has died (crashed, killed) and may be restarted now:
    /// their clients' connections broke, and nothing serves their socket. Cheap (it looks at
    /// `/proc`), for a supervisor's frequent look.
    pub fn dead(&self, g: Group<'_>) -> Vec<String> {
        let now = Instant::now();
        let live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
        let mut v: Vec<String> = live.iter().filter(|((s, _), dp)| s == g.name && dp.is_dead(now)).map(|((_, id), _)| id.clone()).collect();
        v.sort();
        v
    }

    /// Starts `id`'s datapath again, serving `image` from the same folder and socket in the
    /// state it was in (paused, or taking I/O), if its process has died; its clients reconnect
    /// as to a restarted tapdisk. Answers whether it restarted one. The mirror the process
    /// carried, if any, is gone with it: a migration sees its mirror `none` and fails. The
    /// caller holds off every other call on `id` meanwhile. After a failure the old record
    /// stays (dead; detach still works) and [`Datapaths::dead`] leaves it out for
    /// [`RESTART_RETRY`].
    pub fn restart_dead(&self, g: Group<'_>, id: &str, image: &Path) -> Result<bool> {
        // Detached meanwhile: nothing to restart.
        let Some(old) = self.get(g, id) else { return Ok(false) };
        if old.process.is_running() {
            return Ok(false);
        }
        let (active, quiesced, dir) = (old.is_active(), old.is_quiesced(), old.process.dir().to_path_buf());
        tracing::error!(group = g.name, id, pid = old.process.pid(), active, quiesced, log = %old.process.log_tail(), "datapath process died; restarting it");
        let restarted = self.start(g, id, image, old.read_write, &dir).and_then(|dp| {
            if active && quiesced {
                // Its files are being changed: it stays paused until the change is done.
                dp.set_active(true);
                dp.set_quiesced(true);
            } else if active && let Err(e) = self.unpause(id, &dp) {
                stop(id, &dp.process);
                return Err(e);
            }
            Ok(dp)
        });
        match restarted {
            Ok(dp) => {
                tracing::info!(group = g.name, id, pid = dp.process.pid(), active, "datapath restarted");
                self.live.lock().unwrap_or_else(PoisonError::into_inner).insert(key(g, id), Arc::new(dp));
                Ok(true)
            }
            Err(e) => {
                *old.retry_restart_at.lock().unwrap_or_else(PoisonError::into_inner) = Some(Instant::now() + RESTART_RETRY);
                Err(e)
            }
        }
    }

    /// After a restart: takes up the datapaths of `wanted`, and reaps everything else in
    /// `run_dir` (see the module documentation). `image_of` says where an id's image is (asked
    /// only for a datapath that must be started again); `lift` turns this module's errors into
    /// its. Every datapath is tried; the first failure is answered.
    pub fn recover<E: Display>(
        &self,
        g: Group<'_>,
        wanted: &[Wanted<'_>],
        image_of: &dyn Fn(&str) -> Result<PathBuf, E>,
        lift: &dyn Fn(DatapathError) -> E,
    ) -> Result<(), E> {
        std::fs::create_dir_all(g.run_dir).map_err(|e| lift(io_error(format!("creating {}", g.run_dir.display()), e)))?;
        // Folders by owner.
        let mut folders: Vec<(PathBuf, Option<Owner>)> = Vec::new();
        let entries = std::fs::read_dir(g.run_dir).map_err(|e| lift(io_error(format!("listing {}", g.run_dir.display()), e)))?;
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                let owner = read_owner(&path);
                folders.push((path, owner));
            } else {
                tracing::warn!(group = g.name, path = %path.display(), "removing a stray file from the run folder");
                let _ = std::fs::remove_file(&path);
            }
        }
        // Datapaths this instance already runs for ids no longer wanted.
        let stale: Vec<(Key, Arc<Datapath>)> = {
            let mut live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
            let keys: Vec<Key> = live.keys().filter(|(s, v)| s == g.name && !wanted.iter().any(|w| w.id == v)).cloned().collect();
            keys.into_iter().filter_map(|k| live.remove(&k).map(|dp| (k, dp))).collect()
        };
        for ((_, id), dp) in stale {
            stop(&id, &dp.process);
        }

        let mut first_error = None;
        let mut claimed = Vec::new();
        for w in wanted {
            let dir = folders.iter().find(|(_, o)| o.as_ref().is_some_and(|o| o.id == w.id)).map(|(d, _)| d.clone());
            match self.recover_one(g, w, dir.as_deref(), image_of, lift) {
                Ok(dir) => claimed.push(dir),
                Err(e) => {
                    tracing::error!(group = g.name, id = w.id, error = %e, "could not take up a datapath");
                    first_error.get_or_insert(e);
                }
            }
        }
        for (dir, owner) in folders {
            if claimed.iter().any(|c| same_dir(c, &dir)) {
                continue;
            }
            match ServeProcess::reap(&dir) {
                Ok(pid) => tracing::info!(group = g.name, dir = %dir.display(), ?pid, owner = ?owner.map(|o| o.id), "reaped a datapath nobody wants"),
                Err(e) => {
                    tracing::error!(group = g.name, dir = %dir.display(), error = %e, "could not reap a datapath");
                    continue;
                }
            }
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                tracing::warn!(group = g.name, dir = %dir.display(), error = %e, "could not remove a datapath folder");
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Takes up one wanted datapath; answers its folder.
    fn recover_one<E>(
        &self,
        g: Group<'_>,
        w: &Wanted<'_>,
        dir: Option<&Path>,
        image_of: &dyn Fn(&str) -> Result<PathBuf, E>,
        lift: &dyn Fn(DatapathError) -> E,
    ) -> Result<PathBuf, E> {
        let id = w.id;
        if let Some(dp) = self.get(g, id)
            && dp.read_write == w.read_write
            && dp.process.is_running()
        {
            self.set_state(id, &dp, w.active).map_err(lift)?;
            return Ok(dp.process.dir().to_path_buf());
        }
        let image = image_of(id)?;
        let recorded_mode = dir.and_then(read_owner).map(|o| o.read_write);
        let adopted = match dir {
            Some(d) if recorded_mode == Some(w.read_write) => match ServeProcess::adopt(d) {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(group = g.name, id, error = %e, "an unanswering datapath: restarting it");
                    ServeProcess::reap(d).map_err(|e| lift(process_error(id, "reaping the old datapath", e)))?;
                    None
                }
            },
            Some(d) => {
                tracing::warn!(group = g.name, id, "a datapath in the wrong mode: restarting it");
                ServeProcess::reap(d).map_err(|e| lift(process_error(id, "reaping the old datapath", e)))?;
                None
            }
            None => None,
        };
        let dp = match adopted {
            Some(process) => {
                tracing::info!(group = g.name, id, pid = process.pid(), "re-adopted a running datapath");
                // What state it is in is asked below; `active` is a guess until then.
                Datapath::new(process, w.read_write, true)
            }
            None => {
                let dir = match dir {
                    Some(d) => d.to_path_buf(),
                    None => self.folder_for(g, id).map_err(lift)?,
                };
                tracing::info!(group = g.name, id, "restarting a datapath that was not running");
                self.start(g, id, &image, w.read_write, &dir).map_err(lift)?
            }
        };
        let paused = self
            .command(id, &dp, "stats")
            .map_err(lift)?
            .get("paused")
            .and_then(serde_json::Value::as_bool)
            .ok_or_else(|| lift(DatapathError::Unexpected { id: id.to_owned(), what: "stats without \"paused\"".to_owned() }))?;
        dp.set_active(!paused);
        self.set_state(id, &dp, w.active).map_err(lift)?;
        let dir = dp.process.dir().to_path_buf();
        self.live.lock().unwrap_or_else(PoisonError::into_inner).insert(key(g, id), Arc::new(dp));
        Ok(dir)
    }

    fn set_state(&self, id: &str, dp: &Datapath, active: bool) -> Result<()> {
        match (dp.is_active(), active) {
            (false, true) => self.unpause(id, dp),
            (true, false) => self.pause(id, dp),
            _ => Ok(()),
        }
    }
}

/// The `mirror` object of tapmirror's `stats` as a [`MirrorReport`]. A failed mirror is
/// detached by tapmirror, so its counters are gone: `bytes_mirrored` is then 0.
fn mirror_report(m: &serde_json::Value) -> Option<MirrorReport> {
    let state = match m["state"].as_str()? {
        "none" => MirrorState::None,
        "syncing" => MirrorState::Syncing,
        "ready" => MirrorState::Ready,
        "failed" => MirrorState::Failed,
        _ => return None,
    };
    Some(MirrorReport {
        state,
        bytes_left: m["bytes_left"].as_u64().unwrap_or(0),
        bytes_mirrored: m["counters"]["bytes"].as_u64().unwrap_or(0),
        failure: m["failure"].as_str().map(str::to_owned),
    })
}

fn read_owner(dir: &Path) -> Option<Owner> {
    let bytes = std::fs::read(dir.join(OWNER_FILE)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Writes the owner record atomically and durably (temporary, fsync, rename, fsync of the
/// folder), as pretty JSON.
fn write_owner(dir: &Path, owner: &Owner) -> io::Result<()> {
    let path = dir.join(OWNER_FILE);
    let tmp = dir.join(format!(".{OWNER_FILE}.tmp"));
    let mut bytes = serde_json::to_vec_pretty(owner).map_err(io::Error::other)?;
    bytes.push(b'\n');
    let with = |e: io::Error, what: &str| io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()));
    let written = (|| {
        let mut f = std::fs::File::create(&tmp).map_err(|e| with(e, "create temporary for"))?;
        f.write_all(&bytes).map_err(|e| with(e, "write"))?;
        f.sync_all().map_err(|e| with(e, "fsync"))?;
        drop(f);
        std::fs::rename(&tmp, &path).map_err(|e| with(e, "rename into"))
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(|e| io::Error::new(e.kind(), format!("fsync folder {}: {e}", dir.display())))
}

fn same_dir(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(x), Ok(y)) => x == y,
        _ => a == b,
    }
}

/// Stops a process on a failure path, logging what it cannot do.
fn stop(id: &str, process: &ServeProcess) {
    match block_on(process.shutdown(SHUTDOWN_TIMEOUT)) {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => tracing::error!(id, pid = process.pid(), error = %e, "could not stop a datapath"),
        Err(e) => tracing::error!(id, pid = process.pid(), error = %e, "could not stop a datapath"),
    }
    let _ = std::fs::remove_dir_all(process.dir());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_records_keep_their_field_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_owner(dir.path(), &Owner { id: "abc".into(), read_write: true }).expect("write");
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.path().join(OWNER_FILE)).expect("read")).expect("json");
        assert_eq!(v, json!({"vdi": "abc", "read_write": true}));
        assert_eq!(read_owner(dir.path()), Some(Owner { id: "abc".into(), read_write: true }));
    }

    #[test]
    fn mirror_reports_and_messages() {
        let r = mirror_report(&json!({"state": "syncing", "bytes_left": 7, "counters": {"bytes": 9}})).expect("report");
        assert_eq!(r, MirrorReport { state: MirrorState::Syncing, bytes_left: 7, bytes_mirrored: 9, failure: None });
        let r = mirror_report(&json!({"state": "failed", "failure": "writing target: ENOSPC"})).expect("report");
        assert_eq!(r.failure.as_deref(), Some("writing target: ENOSPC"));
        assert_eq!(mirror_report(&json!({"state": "odd"})), None);
        let e = DatapathError::NotAttached { id: "v".into() };
        assert_eq!(e.message("VDI"), "VDI v is not attached");
        assert_eq!(e.kind(), DatapathErrorKind::Failure);
        let e = DatapathError::Unexpected { id: "v".into(), what: "stats without \"paused\"".into() };
        assert_eq!(e.message("VDI"), "VDI v: stats without \"paused\"");
        assert_eq!(DatapathError::Io { what: "x".into(), source: io::Error::from_raw_os_error(libc::ENOSPC) }.kind(), DatapathErrorKind::NoSpace);
    }
}
