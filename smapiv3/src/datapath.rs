//! NOTE: an adapted copy of `sxm-smapiv1`'s `datapath.rs` (only the served format differs).
//! Nothing in it is specific to an SR type: it is the candidate to move into a shared place
//! (`tapmirror::process`, say, as a manager of per-VDI serve processes) so both backends use one.
//!
//! Datapaths: one `tapmirror serve` per attached VDI, serving its qcow2 volume (and backing chain) over NBD on a Unix
//! socket, driven over its control socket (tapmirror's [`ServeProcess`]).
//!
//! # States
//!
//! | VDI state | process |
//! | --- | --- |
//! | detached | none; no folder |
//! | attached | runs, **paused**: clients may connect and negotiate, requests wait; the image is held read-only, unlocked |
//! | activated | runs, serving requests; the leaf is open for writing under its `flock` (unless attached read-only) |
//!
//! `attach` starts the process and pauses it, `activate` unpauses it, `deactivate` drains
//! outstanding requests (bounded by [`DRAIN_TIMEOUT`], xapi's limit) and pauses it again,
//! `detach` shuts it down and removes its folder. Snapshot, clone and compose of an activated
//! VDI run [`Datapaths::with_quiesced`]: pause (in-flight requests finish, new ones wait, the
//! leaf is let go), the change on the files, unpause (the process reopens the VDI's path, now
//! the new leaf); the guest sees a pause and no error, and no write is lost.
//!
//! # A migration's data path
//!
//! | call | control command | notes |
//! | --- | --- | --- |
//! | `serve_nbd` (destination, pass fds) | `nbd-accept` with the upgraded connection | served like the guest's connections: while the VDI is only attached, its requests wait |
//! | `mirror_attach` (source, pass fds) | `mirror-attach` with the target connection | sync: new writes only, each completing when both sides have it; a target that fails or stalls past [`MIRROR_TIMEOUT`] fails the mirror, never the guest |
//! | `mirror_status` | `stats` | `none`, `syncing`, `ready`, `failed` |
//! | `mirror_detach` | `mirror-detach` | after the writes in flight; none attached (or a failed one) is not an error |
//! | `drain` (finalize) | `drain` | no request outstanding, locally or on the mirror |
//!
//! The mirror lives in the process, not in the image: the snapshot's pause and unpause (onto
//! the new leaf, [`Datapaths::with_quiesced`]) keep it, and writes after the snapshot go to the
//! new leaf and to the target.
//!
//! # Folders
//!
//! Each datapath has a folder `<run_dir>/<8 hex>/` (the VDI id's first group, or a random one
//! if another VDI of the SR holds that), short enough for socket paths (107 bytes) under the
//! engine's short `run_dir`, holding tapmirror's files (`nbd.sock`, `control.sock`,
//! `serve.pid`, `serve.log`) and [`OWNER_FILE`], which names the VDI. The owner record is
//! written before the process starts, so every process this backend starts sits in a folder
//! that says whose it is.
//!
//! # After a restart
//!
//! The processes outlive the daemon. [`Datapaths::recover`] (at `SR.attach`, with the engine's
//! list of attached VDIs) adopts each listed VDI's running process (checked by pid, start time
//! and command line, see [`ServeProcess::adopt`]), restarts it if it is gone, unresponsive or
//! in the wrong mode, puts it in the listed state (paused or not), and kills and removes
//! every folder in `run_dir` that belongs to no listed VDI.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::json;
use sxm_engine::backend::{AttachedVdi, MirrorHealth, MirrorMode, MirrorStatus, SrContext, StorageResult};
use sxm_engine::model::{AttachInfo, Implementation, Rw};
use sxm_engine::state;
use tapmirror::process::{ProcessError, ServeProcess, ServeSpec};

use crate::errors;

/// The record naming a datapath folder's VDI.
pub const OWNER_FILE: &str = "owner.json";
/// How long `deactivate` waits for outstanding requests (xapi's pre-deactivate hook allows
/// 150 s for `reqs_outstanding` to reach 0).
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(150);
/// How long a control request other than drain may take.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `detach` waits for the process to flush and exit before killing it.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the mirror target may take to answer one request (and its NBD handshake) before
/// the mirror is failed and the guest goes on locally. tapdisk has no such bound of its own
/// (its guest requests time out after 120 s); a shorter one fails a dead target sooner
/// without holding guest writes for long.
const MIRROR_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
struct Owner {
    vdi: String,
    read_write: bool,
}

/// One VDI's running datapath.
struct Datapath {
    process: ServeProcess,
    rw: Rw,
    /// Activated (serving) rather than only attached (paused).
    active: Mutex<bool>,
}

impl Datapath {
    fn is_active(&self) -> bool {
        *self.active.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn set_active(&self, active: bool) {
        *self.active.lock().unwrap_or_else(PoisonError::into_inner) = active;
    }
}

type Key = (String, String);

/// The datapaths of every SR this backend serves.
pub struct Datapaths {
    exe: PathBuf,
    live: Mutex<HashMap<Key, Arc<Datapath>>>,
}

/// Runs an async control call to completion from blocking code: on a private current-thread
/// runtime in a scoped thread, so it works from the engine's blocking pool, from a test, and
/// even from inside a runtime.
pub(crate) fn block_on<F>(f: F) -> StorageResult<F::Output>
where
    F: std::future::Future + Send,
    F::Output: Send,
{
    std::thread::scope(|s| {
        s.spawn(|| match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(rt) => Ok(rt.block_on(f)),
            Err(e) => Err(errors::failure("datapath", format!("starting a runtime for a control call: {e}"))),
        })
        .join()
    })
    .unwrap_or_else(|p| std::panic::resume_unwind(p))
}

fn dp_error(vdi: &str, what: &str, e: &ProcessError) -> sxm_engine::model::StorageError {
    errors::failure("datapath", format!("{what} of VDI {vdi}: {}", errors::chain(e)))
}

fn key(sr: &SrContext, vdi: &str) -> Key {
    (sr.sr.clone(), vdi.to_owned())
}

fn attach_info(process: &ServeProcess, vdi: &str) -> AttachInfo {
    AttachInfo { implementations: vec![Implementation::nbd_unix(&process.nbd_socket().display().to_string(), vdi)] }
}

impl Datapaths {
    /// No datapaths yet; processes run `exe serve`.
    pub fn new(exe: PathBuf) -> Datapaths {
        Datapaths { exe, live: Mutex::new(HashMap::new()) }
    }

    fn get(&self, sr: &SrContext, vdi: &str) -> Option<Arc<Datapath>> {
        self.live.lock().unwrap_or_else(PoisonError::into_inner).get(&key(sr, vdi)).cloned()
    }

    fn attached_dp(&self, sr: &SrContext, vdi: &str) -> StorageResult<Arc<Datapath>> {
        self.get(sr, vdi).ok_or_else(|| errors::failure("datapath", format!("VDI {vdi} is not attached")))
    }

    /// The VDIs of `sr` with a datapath.
    pub fn attached(&self, sr: &SrContext) -> Vec<String> {
        let live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
        let mut v: Vec<String> = live.keys().filter(|(s, _)| *s == sr.sr).map(|(_, vdi)| vdi.clone()).collect();
        v.sort();
        v
    }

    /// Whether `vdi` has a datapath.
    pub fn is_attached(&self, sr: &SrContext, vdi: &str) -> bool {
        self.get(sr, vdi).is_some()
    }

    /// Drops what is known of `sr` (at `SR.detach`, when nothing is attached).
    pub fn forget(&self, sr: &SrContext) {
        self.live.lock().unwrap_or_else(PoisonError::into_inner).retain(|(s, _), _| *s != sr.sr);
    }

    /// A folder in `run_dir` for `vdi`'s datapath: the VDI id's first group unless another
    /// VDI's folder has that name (then a random one).
    fn folder_for(&self, sr: &SrContext, vdi: &str) -> StorageResult<PathBuf> {
        let first: String = vdi.chars().take_while(char::is_ascii_hexdigit).take(8).collect();
        let random = (0..16).map(|_| uuid::Uuid::new_v4().simple().to_string()[..8].to_owned());
        for name in std::iter::once(first).filter(|n| n.len() == 8).chain(random) {
            let dir = sr.run_dir.join(&name);
            if !dir.exists() || read_owner(&dir).is_some_and(|o| o.vdi == vdi) {
                return Ok(dir);
            }
        }
        Err(errors::failure("datapath", format!("no free datapath folder in {}", sr.run_dir.display())))
    }

    /// Starts (paused) a process for `vdi` serving `image`, in folder `dir`.
    fn start(&self, sr: &SrContext, vdi: &str, image: &Path, rw: Rw, dir: &Path) -> StorageResult<Datapath> {
        std::fs::create_dir_all(dir).map_err(|e| errors::io(format!("creating {}", dir.display()), &e))?;
        state::write_json(&dir.join(OWNER_FILE), &Owner { vdi: vdi.to_owned(), read_write: rw == Rw::Rw })
            .map_err(|e| errors::io("recording a datapath's VDI", &e))?;
        let mut spec = ServeSpec::new(&self.exe, image, dir);
        spec.export_name = vdi.to_owned();
        spec.read_only = rw == Rw::Ro;
        spec.extra_args = vec!["--format".into(), "qcow2".into()];
        let process = match ServeProcess::spawn(&spec) {
            Ok(p) => p,
            Err(e) => {
                let _ = std::fs::remove_dir_all(dir);
                return Err(dp_error(vdi, "starting the datapath", &e));
            }
        };
        let dp = Datapath { process, rw, active: Mutex::new(true) };
        if let Err(e) = self.pause(vdi, &dp) {
            stop(vdi, &dp.process);
            let _ = std::fs::remove_dir_all(dir);
            return Err(e);
        }
        tracing::info!(sr = %sr.sr, vdi, pid = dp.process.pid(), ?rw, dir = %dir.display(), "datapath started (attached, paused)");
        Ok(dp)
    }

    fn command(&self, vdi: &str, dp: &Datapath, cmd: &str) -> StorageResult<serde_json::Value> {
        block_on(dp.process.command(json!({"cmd": cmd}), Vec::new(), CONTROL_TIMEOUT))?.map_err(|e| dp_error(vdi, cmd, &e))
    }

    /// Sends `cmd`, for which a refusal saying `already` means the process is in the state
    /// wanted already (pause of a paused server, unpause of a running one).
    fn to_state(&self, vdi: &str, dp: &Datapath, cmd: &str, already: &str) -> StorageResult<()> {
        // A pause waits for the requests in flight, and a mirrored write is in flight until
        // its target answers or [`MIRROR_TIMEOUT`] fails the mirror: wait longer than that, or
        // a pause given up on here would still complete in the process and leave the guest
        // frozen behind a failed snapshot.
        let timeout = if cmd == "pause" { MIRROR_TIMEOUT + CONTROL_TIMEOUT } else { CONTROL_TIMEOUT };
        match block_on(dp.process.command(json!({"cmd": cmd}), Vec::new(), timeout))? {
            Ok(_) => Ok(()),
            Err(ProcessError::Refused { message, .. }) if message == already => Ok(()),
            Err(e) => Err(dp_error(vdi, cmd, &e)),
        }
    }

    fn pause(&self, vdi: &str, dp: &Datapath) -> StorageResult<()> {
        self.to_state(vdi, dp, "pause", "already paused")?;
        dp.set_active(false);
        Ok(())
    }

    fn unpause(&self, vdi: &str, dp: &Datapath) -> StorageResult<()> {
        self.to_state(vdi, dp, "unpause", "not paused")?;
        dp.set_active(true);
        Ok(())
    }

    /// `VDI.attach`: starts `vdi`'s datapath, paused, and says how to reach it.
    pub fn attach(&self, sr: &SrContext, vdi: &str, image: &Path, rw: Rw) -> StorageResult<AttachInfo> {
        if let Some(dp) = self.get(sr, vdi) {
            // The engine attaches a VDI once; a repeated call in the same mode is answered, a
            // call in another mode is refused.
            if dp.rw == rw {
                return Ok(attach_info(&dp.process, vdi));
            }
            return Err(errors::in_use(vdi, "VDI.attach"));
        }
        let dir = self.folder_for(sr, vdi)?;
        // A folder left by a process nobody recovered (an SR attached without its list).
        if dir.exists()
            && let Err(e) = ServeProcess::reap(&dir)
        {
            return Err(dp_error(vdi, "clearing an old datapath folder", &e));
        }
        let dp = self.start(sr, vdi, image, rw, &dir)?;
        let info = attach_info(&dp.process, vdi);
        self.live.lock().unwrap_or_else(PoisonError::into_inner).insert(key(sr, vdi), Arc::new(dp));
        Ok(info)
    }

    /// `VDI.activate`: the datapath takes I/O.
    pub fn activate(&self, sr: &SrContext, vdi: &str) -> StorageResult<()> {
        let dp = self.attached_dp(sr, vdi)?;
        self.unpause(vdi, &dp)?;
        tracing::info!(sr = %sr.sr, vdi, pid = dp.process.pid(), "datapath activated");
        Ok(())
    }

    /// `VDI.deactivate`: waits (up to [`DRAIN_TIMEOUT`]) for outstanding requests, then stops
    /// taking I/O. Requests still outstanding at the timeout fail the call and leave the VDI
    /// active.
    pub fn deactivate(&self, sr: &SrContext, vdi: &str) -> StorageResult<()> {
        let dp = self.attached_dp(sr, vdi)?;
        block_on(dp.process.drain(DRAIN_TIMEOUT))?.map_err(|e| dp_error(vdi, "draining", &e))?;
        self.pause(vdi, &dp)?;
        tracing::info!(sr = %sr.sr, vdi, pid = dp.process.pid(), "datapath deactivated (drained, paused)");
        Ok(())
    }

    /// `VDI.detach`: shuts the process down (it flushes), killing it if it does not exit in
    /// time, and removes its folder.
    pub fn detach(&self, sr: &SrContext, vdi: &str) -> StorageResult<()> {
        let dp = self.attached_dp(sr, vdi)?;
        let stopped = block_on(dp.process.shutdown(SHUTDOWN_TIMEOUT))?.map_err(|e| dp_error(vdi, "stopping the datapath", &e))?;
        let dir = dp.process.dir().to_path_buf();
        self.live.lock().unwrap_or_else(PoisonError::into_inner).remove(&key(sr, vdi));
        std::fs::remove_dir_all(&dir).map_err(|e| errors::io(format!("removing {}", dir.display()), &e))?;
        tracing::info!(sr = %sr.sr, vdi, pid = dp.process.pid(), ?stopped, "datapath detached");
        Ok(())
    }

    /// How the attached `vdi` is reached.
    pub fn attach_info(&self, sr: &SrContext, vdi: &str) -> StorageResult<AttachInfo> {
        Ok(attach_info(&self.attached_dp(sr, vdi)?.process, vdi))
    }

    /// Runs `f` (a change of `vdi`'s files) with `vdi`'s datapath quiesced, when it is active:
    /// paused before (in-flight requests finish, new ones wait, the leaf is let go), unpaused
    /// after whatever `f` answered (the process reopens the VDI's path). An attached but
    /// inactive datapath is paused already.
    pub fn with_quiesced<T>(&self, sr: &SrContext, vdi: &str, op: &str, f: impl FnOnce() -> StorageResult<T>) -> StorageResult<T> {
        let Some(dp) = self.get(sr, vdi).filter(|dp| dp.is_active()) else { return f() };
        self.pause(vdi, &dp)?;
        tracing::info!(sr = %sr.sr, vdi, op, "datapath paused for a change of its files");
        let r = f();
        let resumed = self.unpause(vdi, &dp);
        match (&r, resumed) {
            (_, Ok(())) => tracing::info!(sr = %sr.sr, vdi, op, ok = r.is_ok(), "datapath resumed"),
            (Ok(_), Err(e)) => {
                tracing::error!(sr = %sr.sr, vdi, op, error = %e, "datapath could not resume after the change");
                return Err(e);
            }
            (Err(_), Err(e)) => tracing::error!(sr = %sr.sr, vdi, op, error = %e, "datapath could not resume after a failed change"),
        }
        r
    }

    /// Sends `request` with `fds` to `vdi`'s datapath, which must exist.
    fn command_with(&self, sr: &SrContext, vdi: &str, request: serde_json::Value, fds: Vec<OwnedFd>, timeout: Duration) -> StorageResult<Result<serde_json::Value, ProcessError>> {
        let dp = self.attached_dp(sr, vdi)?;
        block_on(dp.process.command(request, fds, timeout))
    }

    /// Destination, pass fds: the datapath serves NBD on `conn` (`nbd-accept`) until the peer
    /// closes it. Requests wait while the VDI is attached but not active, as the guest's do.
    pub fn serve_nbd(&self, sr: &SrContext, vdi: &str, conn: OwnedFd) -> StorageResult<()> {
        let answer = self
            .command_with(sr, vdi, json!({"cmd": "nbd-accept"}), vec![conn], CONTROL_TIMEOUT)?
            .map_err(|e| dp_error(vdi, "serving an NBD connection", &e))?;
        tracing::info!(sr = %sr.sr, vdi, socket = %answer["socket"], "datapath serves a passed NBD connection");
        Ok(())
    }

    /// Source, pass fds: the datapath mirrors guest writes onto `target` (`mirror-attach`).
    pub fn mirror_attach(&self, sr: &SrContext, vdi: &str, target: OwnedFd, export: &str, mode: MirrorMode) -> StorageResult<()> {
        let mode = match mode {
            MirrorMode::Sync => "sync",
            // The whole disk in the background too; holes are zeroed on the target, which may
            // hold anything.
            MirrorMode::Full => "full",
        };
        let request = json!({"cmd": "mirror-attach", "mode": mode, "export": export,
                             "timeout_ms": MIRROR_TIMEOUT.as_millis() as u64, "target_is_zero": false});
        // The handshake may take the mirror timeout; the answer comes after it.
        let answer = self
            .command_with(sr, vdi, request, vec![target], MIRROR_TIMEOUT + CONTROL_TIMEOUT)?
            .map_err(|e| dp_error(vdi, "attaching the mirror", &e))?;
        tracing::info!(sr = %sr.sr, vdi, mode, export, state = %answer["state"], "mirror attached");
        Ok(())
    }

    /// Source: the mirror's state, from the datapath's `stats`.
    pub fn mirror_status(&self, sr: &SrContext, vdi: &str) -> StorageResult<MirrorStatus> {
        let stats = self
            .command_with(sr, vdi, json!({"cmd": "stats"}), Vec::new(), CONTROL_TIMEOUT)?
            .map_err(|e| dp_error(vdi, "stats", &e))?;
        mirror_status(&stats["mirror"]).ok_or_else(|| errors::failure("datapath", format!("VDI {vdi}: stats without a mirror state: {stats}")))
    }

    /// Source: stops mirroring after the writes in flight. Without a mirror attached (none ever,
    /// or a failed one, which tapmirror has detached already) there is nothing to stop.
    pub fn mirror_detach(&self, sr: &SrContext, vdi: &str) -> StorageResult<()> {
        match self.command_with(sr, vdi, json!({"cmd": "mirror-detach"}), Vec::new(), MIRROR_TIMEOUT + CONTROL_TIMEOUT)? {
            Ok(answer) => {
                tracing::info!(sr = %sr.sr, vdi, counters = %answer["counters"], "mirror detached");
                Ok(())
            }
            Err(ProcessError::Refused { message, .. }) if message == "no mirror attached" => {
                tracing::info!(sr = %sr.sr, vdi, "no mirror to detach");
                Ok(())
            }
            Err(e) => Err(dp_error(vdi, "detaching the mirror", &e)),
        }
    }

    /// Waits (up to `timeout`) until no request is outstanding on the datapath, locally or on
    /// its mirror (a mirrored write is outstanding until both sides have it).
    pub fn drain(&self, sr: &SrContext, vdi: &str, timeout: Duration) -> StorageResult<()> {
        let dp = self.attached_dp(sr, vdi)?;
        let answer = block_on(dp.process.drain(timeout))?.map_err(|e| dp_error(vdi, "draining", &e))?;
        tracing::info!(sr = %sr.sr, vdi, mirror = %answer["mirror"], "datapath drained");
        Ok(())
    }

    /// `SR.attach` after a restart: takes up the datapaths of `list`, and reaps everything else
    /// in `run_dir` (see the module documentation). `image_of` says where a VDI's volume is.
    /// Every datapath is tried; the first failure is answered.
    pub fn recover(
        &self,
        sr: &SrContext,
        list: &[AttachedVdi],
        image_of: &dyn Fn(&str) -> StorageResult<PathBuf>,
    ) -> StorageResult<()> {
        std::fs::create_dir_all(&sr.run_dir).map_err(|e| errors::io(format!("creating {}", sr.run_dir.display()), &e))?;
        // Folders by owner.
        let mut folders: Vec<(PathBuf, Option<Owner>)> = Vec::new();
        let entries = std::fs::read_dir(&sr.run_dir).map_err(|e| errors::io(format!("listing {}", sr.run_dir.display()), &e))?;
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                let owner = read_owner(&path);
                folders.push((path, owner));
            } else {
                tracing::warn!(sr = %sr.sr, path = %path.display(), "removing a stray file from the run folder");
                let _ = std::fs::remove_file(&path);
            }
        }
        // Datapaths this instance already runs for VDIs no longer listed.
        let stale: Vec<(Key, Arc<Datapath>)> = {
            let mut live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
            let keys: Vec<Key> =
                live.keys().filter(|(s, v)| *s == sr.sr && !list.iter().any(|a| a.vdi == *v)).cloned().collect();
            keys.into_iter().filter_map(|k| live.remove(&k).map(|dp| (k, dp))).collect()
        };
        for ((_, vdi), dp) in stale {
            stop(&vdi, &dp.process);
        }

        let mut first_error = None;
        let mut claimed = Vec::new();
        for a in list {
            let dir = folders.iter().find(|(_, o)| o.as_ref().is_some_and(|o| o.vdi == a.vdi)).map(|(d, _)| d.clone());
            match self.recover_one(sr, a, dir.as_deref(), image_of) {
                Ok(dir) => claimed.push(dir),
                Err(e) => {
                    tracing::error!(sr = %sr.sr, vdi = %a.vdi, error = %e, "could not take up a datapath");
                    first_error.get_or_insert(e);
                }
            }
        }
        for (dir, owner) in folders {
            if claimed.iter().any(|c| same_dir(c, &dir)) {
                continue;
            }
            match ServeProcess::reap(&dir) {
                Ok(pid) => tracing::info!(sr = %sr.sr, dir = %dir.display(), ?pid, owner = ?owner.map(|o| o.vdi), "reaped a datapath no VDI is attached to"),
                Err(e) => {
                    tracing::error!(sr = %sr.sr, dir = %dir.display(), error = %e, "could not reap a datapath");
                    continue;
                }
            }
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                tracing::warn!(sr = %sr.sr, dir = %dir.display(), error = %e, "could not remove a datapath folder");
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Takes up one listed datapath; answers its folder.
    fn recover_one(
        &self,
        sr: &SrContext,
        a: &AttachedVdi,
        dir: Option<&Path>,
        image_of: &dyn Fn(&str) -> StorageResult<PathBuf>,
    ) -> StorageResult<PathBuf> {
        let rw = if a.read_write { Rw::Rw } else { Rw::Ro };
        if let Some(dp) = self.get(sr, &a.vdi)
            && dp.rw == rw
            && dp.process.is_running()
        {
            self.set_state(&a.vdi, &dp, a.active)?;
            return Ok(dp.process.dir().to_path_buf());
        }
        let image = image_of(&a.vdi)?;
        let recorded_mode = dir.and_then(read_owner).map(|o| o.read_write);
        let adopted = match dir {
            Some(d) if recorded_mode == Some(a.read_write) => match ServeProcess::adopt(d) {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(sr = %sr.sr, vdi = %a.vdi, error = %e, "an unanswering datapath: restarting it");
                    ServeProcess::reap(d).map_err(|e| dp_error(&a.vdi, "reaping the old datapath", &e))?;
                    None
                }
            },
            Some(d) => {
                tracing::warn!(sr = %sr.sr, vdi = %a.vdi, "a datapath in the wrong mode: restarting it");
                ServeProcess::reap(d).map_err(|e| dp_error(&a.vdi, "reaping the old datapath", &e))?;
                None
            }
            None => None,
        };
        let dp = match adopted {
            Some(process) => {
                tracing::info!(sr = %sr.sr, vdi = %a.vdi, pid = process.pid(), "re-adopted a running datapath");
                // What state it is in is asked below; `active` is a guess until then.
                Datapath { process, rw, active: Mutex::new(true) }
            }
            None => {
                let dir = match dir {
                    Some(d) => d.to_path_buf(),
                    None => self.folder_for(sr, &a.vdi)?,
                };
                tracing::info!(sr = %sr.sr, vdi = %a.vdi, "restarting a datapath that was not running");
                self.start(sr, &a.vdi, &image, rw, &dir)?
            }
        };
        let paused = self
            .command(&a.vdi, &dp, "stats")?
            .get("paused")
            .and_then(serde_json::Value::as_bool)
            .ok_or_else(|| errors::failure("datapath", format!("VDI {}: stats without \"paused\"", a.vdi)))?;
        dp.set_active(!paused);
        self.set_state(&a.vdi, &dp, a.active)?;
        let dir = dp.process.dir().to_path_buf();
        self.live.lock().unwrap_or_else(PoisonError::into_inner).insert(key(sr, &a.vdi), Arc::new(dp));
        Ok(dir)
    }

    fn set_state(&self, vdi: &str, dp: &Datapath, active: bool) -> StorageResult<()> {
        match (dp.is_active(), active) {
            (false, true) => self.unpause(vdi, dp),
            (true, false) => self.pause(vdi, dp),
            _ => Ok(()),
        }
    }
}

/// The `mirror` object of tapmirror's `stats` as a [`MirrorStatus`]. A failed mirror is
/// detached by tapmirror, so its counters are gone: `bytes_mirrored` is then 0.
fn mirror_status(m: &serde_json::Value) -> Option<MirrorStatus> {
    let state = match m["state"].as_str()? {
        "none" => MirrorHealth::None,
        "syncing" => MirrorHealth::Syncing,
        "ready" => MirrorHealth::Ready,
        "failed" => MirrorHealth::Failed,
        _ => return None,
    };
    Some(MirrorStatus {
        state,
        bytes_left: m["bytes_left"].as_u64().unwrap_or(0),
        bytes_mirrored: m["counters"]["bytes"].as_u64().unwrap_or(0),
    })
}

fn read_owner(dir: &Path) -> Option<Owner> {
    state::read_json::<Owner>(&dir.join(OWNER_FILE)).ok().flatten()
}

fn same_dir(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(x), Ok(y)) => x == y,
        _ => a == b,
    }
}

/// Stops a process on a failure path, logging what it cannot do.
fn stop(vdi: &str, process: &ServeProcess) {
    match block_on(process.shutdown(SHUTDOWN_TIMEOUT)) {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => tracing::error!(vdi, pid = process.pid(), error = %e, "could not stop a datapath"),
        Err(e) => tracing::error!(vdi, pid = process.pid(), error = %e, "could not stop a datapath"),
    }
    let _ = std::fs::remove_dir_all(process.dir());
}
