//! Datapath processes that outlive their starter.
//!
//! The host daemon starts one `tapmirror serve` per activated VDI ([`ServeProcess::spawn`]). The
//! guest's disk must keep working when the daemon is restarted or killed, so the process is
//! detached from it, and a restarted daemon finds it again from its folder
//! ([`ServeProcess::adopt`]), or kills the ones nobody owns any more ([`ServeProcess::reap`]).
//!
//! # The datapath folder
//!
//! Each process owns one folder (the daemon chooses it; nothing else should live there):
//!
//! | file | what |
//! | --- | --- |
//! | [`NBD_SOCKET`] | the export, for the guest (`nbd+unix:///EXPORT?socket=…`) |
//! | [`CONTROL_SOCKET`] | the control socket (see [`crate::control`]) |
//! | [`PID_FILE`] | `{"pid": N, "start_time": T, "boot_id": "…"}`: which process serves this folder |
//! | [`LOG_FILE`] | the process's stdout and stderr (the previous run's in `serve.log.old`) |
//!
//! # Design
//!
//! **Detached.** The child gets a session of its own (`setsid`), so neither a terminal's signals
//! (SIGHUP, ^C) nor a kill of the daemon's process group reach it. Its stdin is `/dev/null` and
//! its stdout and stderr go to [`LOG_FILE`], never to a pipe to the daemon: a pipe whose reader
//! died makes the next write fail with EPIPE (or kill the writer with SIGPIPE), and a pipe
//! nobody reads fills up and blocks the writer, so either would take the guest's disk down with
//! the daemon. Its working folder is `/` (it pins no mount) and every path it gets is absolute.
//! Under systemd the daemon's unit must not kill its whole control group on stop or restart
//! (`KillMode=process`, or start the daemon's children in a scope of their own), or systemd,
//! not us, takes the datapaths down.
//!
//! **Reaped.** The daemon starts the process as its direct child (no double fork: forking again
//! inside the pre-exec hook of a multi-threaded program is unsafe, and a direct child has a pid
//! that cannot be reused until we reap it, which makes killing it exact). The handle keeps the
//! unreaped child, reaps it as soon as anything notices it has exited
//! ([`ServeProcess::is_running`], waits, kills), and hands it to a small reaper thread when the
//! handle is dropped while the process still runs. When the daemon dies, the process is
//! re-parented to init (or the nearest subreaper), which reaps it; a process the daemon adopted
//! is not its child and is never waited for. Whatever reaps or fails to reap, a zombie counts
//! as dead (`kill(pid, 0)` would say it lives), but only once all its threads are: the leader
//! of a multi-threaded process shows `Z` in `/proc/PID/stat` as soon as it has exited itself,
//! while its other threads may still be exiting with its files, and so its listening sockets,
//! open. A process is gone when `/proc/PID` is, or its state is `Z` with `num_threads` down to 1.
//!
//! **Pid reuse.** The pid file records the process's start time (field 22 of `/proc/PID/stat`,
//! clock ticks since boot) and the boot id. A pid is ours only if the process now holding it
//! started at that time, in this boot, and its `/proc/PID/cmdline` is `… serve … --socket
//! DIR/nbd.sock … --control DIR/control.sock`. Anything else (a `sleep` that got the pid, the
//! daemon itself, a process we cannot inspect) is never adopted and never signalled, and the
//! pid file naming it is stale. Pids 0 and 1 and our own are rejected outright (`kill(0, …)`
//! would signal our whole process group). An adopted process is signalled by pid right after
//! that check: the pid could only be reused in the microseconds between the two if the process
//! died and the kernel cycled through every pid in that time.
//!
//! **Pid file.** Written atomically (temporary file, fsync, rename, fsync of the folder) as soon
//! as the process exists, before it is ready, so that a daemon killed while it waits for the
//! process to come up leaves a process its successor can find and reap. Should the pid file be
//! missing or wrong anyway (the daemon died between fork and rename), the control socket names
//! its owner: `adopt` asks the kernel who listens on it (`SO_PEERCRED`), checks that process as
//! above, and writes the pid file again.
//!
//! All functions here but the `async` ones block (for up to their timeouts): call them from
//! `spawn_blocking` in async code. The `async` ones need a tokio runtime.

use std::ffi::OsString;
use std::io::{self, Read, Seek, Write};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, OpenOptionsExt};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// The export's Unix socket, in the datapath folder.
pub const NBD_SOCKET: &str = "nbd.sock";
/// The control socket, in the datapath folder.
pub const CONTROL_SOCKET: &str = "control.sock";
/// The pid file, in the datapath folder.
pub const PID_FILE: &str = "serve.pid";
/// The process's stdout and stderr, in the datapath folder.
pub const LOG_FILE: &str = "serve.log";
/// The previous run's log.
const OLD_LOG_FILE: &str = "serve.log.old";
/// Temporary pid files start so (then the writer's pid).
const PID_TMP_PREFIX: &str = "serve.pid.tmp.";

/// How long `spawn` and `adopt` wait, by default, for the control socket to answer.
pub const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a dead process may take to disappear after SIGKILL (it may be finishing I/O).
const KILL_WAIT: Duration = Duration::from_secs(5);
/// The longest one control request may take before it counts as unanswered.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(10);
/// One readiness probe's longest wait.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// How often waits look again.
const POLL: Duration = Duration::from_millis(20);
/// How much of the log an error quotes.
const LOG_TAIL_BYTES: u64 = 4096;
/// `sun_path` holds 108 bytes, the terminating NUL included.
const MAX_SOCKET_PATH: usize = 107;

/// What went wrong, with the folder and pid it concerns.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// A file operation in the datapath folder failed.
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why it failed.
        #[source]
        source: io::Error,
    },
    /// The program could not be started.
    #[error("starting {} for {}: {source}", exe.display(), dir.display())]
    Spawn {
        /// The program.
        exe: PathBuf,
        /// The datapath folder.
        dir: PathBuf,
        /// Why it could not start.
        #[source]
        source: io::Error,
    },
    /// A socket path does not fit in a `sockaddr_un`.
    #[error("{} is too long for a Unix socket ({MAX_SOCKET_PATH} bytes at most): choose a shorter folder", path.display())]
    SocketPathTooLong {
        /// The socket path.
        path: PathBuf,
    },
    /// The spec asks for something this module cannot manage.
    #[error("bad spec for {}: {reason}", dir.display())]
    InvalidSpec {
        /// The datapath folder.
        dir: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A live process already serves this folder.
    #[error("{} is already served by process {pid}", dir.display())]
    AlreadyRunning {
        /// The datapath folder.
        dir: PathBuf,
        /// The process serving it.
        pid: i32,
    },
    /// The process exited before its control socket answered.
    #[error("tapmirror serve for {} (pid {pid}) exited ({status}) before it was ready; its log ends:\n{log_tail}", dir.display())]
    Exited {
        /// The datapath folder.
        dir: PathBuf,
        /// The process.
        pid: i32,
        /// How it exited.
        status: ExitStatus,
        /// The end of its log.
        log_tail: String,
    },
    /// The new process did not answer in time; it has been killed.
    #[error(
        "tapmirror serve for {} (pid {pid}) did not answer on its control socket within {waited:?} and was killed ({last_error}); its log ends:\n{log_tail}",
        dir.display()
    )]
    NotReady {
        /// The datapath folder.
        dir: PathBuf,
        /// The process (now killed).
        pid: i32,
        /// How long it was given.
        waited: Duration,
        /// The last probe's failure.
        last_error: String,
        /// The end of its log.
        log_tail: String,
    },
    /// A process serves this folder but does not answer on its control socket (left running:
    /// [`ServeProcess::reap`] kills it).
    #[error("tapmirror serve for {} (pid {pid}) runs but did not answer on its control socket within {waited:?}: {last_error}", dir.display())]
    Unresponsive {
        /// The datapath folder.
        dir: PathBuf,
        /// The process.
        pid: i32,
        /// How long it was given.
        waited: Duration,
        /// The last probe's failure.
        last_error: String,
    },
    /// A control request could not be made or got no answer.
    #[error("control command {cmd:?} to tapmirror serve for {} (pid {pid}): {message}", dir.display())]
    Control {
        /// The datapath folder.
        dir: PathBuf,
        /// The process.
        pid: i32,
        /// The command.
        cmd: String,
        /// What failed.
        message: String,
    },
    /// The process answered a control request with an error.
    #[error("tapmirror serve for {} (pid {pid}) refused {cmd:?}: {message}", dir.display())]
    Refused {
        /// The datapath folder.
        dir: PathBuf,
        /// The process.
        pid: i32,
        /// The command.
        cmd: String,
        /// The process's error message.
        message: String,
    },
    /// A signal could not be sent.
    #[error("sending {signal} to pid {pid} ({}): {source}", dir.display())]
    Signal {
        /// The datapath folder.
        dir: PathBuf,
        /// The process.
        pid: i32,
        /// The signal.
        signal: Signal,
        /// Why it failed.
        #[source]
        source: nix::Error,
    },
    /// The process still runs after SIGKILL (stuck in the kernel, e.g. on a hung device); its
    /// pid file and sockets are left for a later attempt.
    #[error("pid {pid} ({}) still runs {waited:?} after SIGKILL", dir.display())]
    Unkillable {
        /// The datapath folder.
        dir: PathBuf,
        /// The process.
        pid: i32,
        /// How long it was given.
        waited: Duration,
    },
}

/// How to start one `tapmirror serve`.
#[derive(Debug, Clone)]
pub struct ServeSpec {
    /// The `tapmirror` program.
    pub exe: PathBuf,
    /// The image to serve.
    pub image: PathBuf,
    /// The datapath folder (created, mode 0700, when missing).
    pub dir: PathBuf,
    /// The export name.
    pub export_name: String,
    /// Serve read-only.
    pub read_only: bool,
    /// More `serve` arguments (e.g. `--format vhd`, `--io-engine portable`); never `--socket`,
    /// `--control` (the folder decides those, and adopt recognises the process by them) or
    /// `--listen`.
    pub extra_args: Vec<OsString>,
    /// How long the process may take to answer on its control socket.
    pub ready_timeout: Duration,
}

impl ServeSpec {
    /// Serves `image` read-write under the empty export name, from `dir`.
    pub fn new(exe: impl Into<PathBuf>, image: impl Into<PathBuf>, dir: impl Into<PathBuf>) -> Self {
        Self {
            exe: exe.into(),
            image: image.into(),
            dir: dir.into(),
            export_name: String::new(),
            read_only: false,
            extra_args: Vec::new(),
            ready_timeout: DEFAULT_READY_TIMEOUT,
        }
    }
}

/// How [`ServeProcess::shutdown`] ended the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// It exited when asked (control `shutdown`, or SIGTERM when the control socket failed).
    Exited,
    /// It was still running at the timeout and was killed.
    Killed,
    /// It had already exited.
    AlreadyGone,
}

/// The pid file's content.
#[derive(Debug, Serialize, Deserialize)]
struct PidRecord {
    pid: i32,
    /// Field 22 of `/proc/PID/stat`.
    start_time: u64,
    /// `/proc/sys/kernel/random/boot_id`, when readable.
    #[serde(default)]
    boot_id: Option<String>,
}

/// The files of one datapath folder.
#[derive(Debug, Clone)]
struct Paths {
    dir: PathBuf,
    nbd: PathBuf,
    control: PathBuf,
    pid: PathBuf,
    log: PathBuf,
}

impl Paths {
    /// The folder's files, by its canonical path when it exists (so that a folder reached by
    /// another path, through a symbolic link or `..`, still matches the command line of the
    /// process serving it), else its absolute path.
    fn new(dir: &Path) -> Result<Self, ProcessError> {
        let dir = absolute(dir)?;
        let dir = std::fs::canonicalize(&dir).unwrap_or(dir);
        Ok(Self {
            nbd: dir.join(NBD_SOCKET),
            control: dir.join(CONTROL_SOCKET),
            pid: dir.join(PID_FILE),
            log: dir.join(LOG_FILE),
            dir,
        })
    }
}

/// Who reaps the process.
#[derive(Debug)]
enum Reaper {
    /// Our child, not reaped yet (so its pid cannot have been reused).
    Child(Child),
    /// Our child, reaped.
    Exited(ExitStatus),
    /// Not our child (adopted): init reaps it; we can only look at `/proc`.
    Foreign,
}

/// One running `tapmirror serve` and its folder.
///
/// Dropping the handle leaves the process running (that is the point); [`ServeProcess::shutdown`]
/// and [`ServeProcess::kill`] stop it.
#[derive(Debug)]
pub struct ServeProcess {
    pid: i32,
    start_time: u64,
    paths: Paths,
    reaper: Mutex<Reaper>,
}

impl ServeProcess {
    /// Starts `tapmirror serve` for `spec`, detached from us, and waits (up to
    /// `spec.ready_timeout`) until its control socket answers `stats`. A process that exits or
    /// does not answer in time is killed, its files removed, and the error quotes its log.
    /// Refuses a folder a live process already serves.
    pub fn spawn(spec: &ServeSpec) -> Result<Self, ProcessError> {
        let paths = Paths::new(&spec.dir)?;
        let image = absolute(&spec.image)?;
        // A bare name is looked up in PATH; a relative path must survive the change of folder.
        let exe = if spec.exe.components().count() > 1 { absolute(&spec.exe)? } else { spec.exe.clone() };
        if let Some(arg) = spec.extra_args.iter().find(|a| {
            let a = a.as_bytes();
            [b"--socket".as_slice(), b"--control", b"--listen"].iter().any(|f| a.starts_with(f))
        }) {
            return Err(ProcessError::InvalidSpec { dir: paths.dir, reason: format!("{} is not an extra argument: the folder decides where to listen", arg.to_string_lossy()) });
        }
        check_socket_paths(&paths)?;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&paths.dir)
            .map_err(|source| ProcessError::Io { what: "creating", path: paths.dir.clone(), source })?;
        // Now that it exists, by its canonical path.
        let paths = Paths::new(&paths.dir)?;
        check_socket_paths(&paths)?;
        if let Some((pid, _)) = locate(&paths)? {
            return Err(ProcessError::AlreadyRunning { dir: paths.dir, pid });
        }
        clear_stale(&paths);

        // Keep the previous run's log for a post-mortem, start this one empty.
        if let Err(source) = std::fs::rename(&paths.log, paths.dir.join(OLD_LOG_FILE))
            && source.kind() != io::ErrorKind::NotFound
        {
            return Err(ProcessError::Io { what: "rotating", path: paths.log.clone(), source });
        }
        let log = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(&paths.log)
            .map_err(|source| ProcessError::Io { what: "opening", path: paths.log.clone(), source })?;
        let log_err = log.try_clone().map_err(|source| ProcessError::Io { what: "duplicating", path: paths.log.clone(), source })?;

        let mut cmd = Command::new(&exe);
        cmd.arg("serve")
            .arg(&image)
            .arg("--socket")
            .arg(&paths.nbd)
            .arg("--control")
            .arg(&paths.control)
            .arg("--export-name")
            .arg(&spec.export_name);
        if spec.read_only {
            cmd.arg("--read-only");
        }
        cmd.args(&spec.extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err))
            .current_dir("/")
            // Socket activation meant for the daemon is not the child's.
            .env_remove("LISTEN_PID")
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_FDNAMES")
            // The log is a file: no terminal colour codes in it.
            .env("NO_COLOR", "1");
        // SAFETY: the hook runs in the forked child before exec, where only async-signal-safe
        // calls are allowed; setsid is one system call, allocates nothing and takes no lock.
        // It cannot fail here (a fresh child is never a process group leader), but if it did,
        // the error aborts the spawn rather than leave a child tied to our session.
        unsafe {
            cmd.pre_exec(|| nix::unistd::setsid().map(drop).map_err(io::Error::from));
        }
        let child = cmd.spawn().map_err(|source| ProcessError::Spawn { exe: exe.clone(), dir: paths.dir.clone(), source })?;
        let Ok(pid) = i32::try_from(child.id()) else {
            // Pids fit in an i32 on Linux; should one not, nobody could ever signal it.
            reap_in_background(child);
            return Err(ProcessError::Spawn { exe, dir: paths.dir, source: io::Error::other("pid out of range") });
        };
        // The child is not reaped, so its /proc entry exists (if only as a zombie).
        let start_time = match proc_stat(pid).and_then(|s| s.ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))) {
            Ok(stat) => stat.start_time,
            Err(source) => {
                let mut child = child;
                let _ = child.kill();
                let _ = child.wait();
                return Err(ProcessError::Io { what: "reading", path: PathBuf::from(format!("/proc/{pid}/stat")), source });
            }
        };
        let process = Self { pid, start_time, paths, reaper: Mutex::new(Reaper::Child(child)) };
        tracing::info!(pid, dir = %process.paths.dir.display(), image = %image.display(), "started tapmirror serve");
        // The pid file first, readiness after: see the module's notes.
        if let Err(e) = write_pid_file(&process.paths, pid, start_time) {
            let _ = process.kill();
            return Err(e);
        }

        let started = Instant::now();
        let deadline = started + spec.ready_timeout;
        let mut last_error = String::from("the control socket is not there yet");
        loop {
            if let Some(status) = process.exit_status() {
                process.cleanup();
                let log_tail = log_tail(&process.paths.log);
                tracing::warn!(pid, dir = %process.paths.dir.display(), %status, "tapmirror serve exited before it was ready");
                return Err(ProcessError::Exited { dir: process.paths.dir.clone(), pid, status, log_tail });
            }
            let now = Instant::now();
            if process.paths.control.exists() {
                match process.probe(deadline.saturating_duration_since(now).min(PROBE_TIMEOUT)) {
                    Ok(()) => {
                        tracing::info!(pid, dir = %process.paths.dir.display(), ready_ms = started.elapsed().as_millis() as u64, "tapmirror serve is ready");
                        return Ok(process);
                    }
                    Err(e) => last_error = e,
                }
            }
            if Instant::now() >= deadline {
                let killed = process.kill();
                let log_tail = log_tail(&process.paths.log);
                tracing::warn!(pid, dir = %process.paths.dir.display(), %last_error, "tapmirror serve did not get ready; killed");
                killed?;
                return Err(ProcessError::NotReady { dir: process.paths.dir.clone(), pid, waited: spec.ready_timeout, last_error, log_tail });
            }
            std::thread::sleep(POLL);
        }
    }

    /// Finds the process serving `dir` again, as a restarted daemon does: the one its pid file
    /// names, if that is alive and really `tapmirror serve` for this folder, else the one
    /// listening on its control socket. `None` when nothing serves it; its stale pid file and
    /// sockets are then removed (its log is kept). Waits up to [`DEFAULT_READY_TIMEOUT`] for
    /// the control socket to answer (the process may be starting); a live process that does not
    /// answer is an [`ProcessError::Unresponsive`] error and is left alone.
    pub fn adopt(dir: &Path) -> Result<Option<Self>, ProcessError> {
        Self::adopt_within(dir, DEFAULT_READY_TIMEOUT)
    }

    /// As [`ServeProcess::adopt`], waiting up to `timeout` for an answer.
    pub fn adopt_within(dir: &Path, timeout: Duration) -> Result<Option<Self>, ProcessError> {
        let paths = Paths::new(dir)?;
        let Some((pid, start_time)) = locate(&paths)? else {
            clear_stale(&paths);
            tracing::info!(dir = %paths.dir.display(), "no tapmirror serve to adopt");
            return Ok(None);
        };
        let process = Self { pid, start_time, paths, reaper: Mutex::new(Reaper::Foreign) };
        // It may have been found by its control socket: make the pid file name it.
        let recorded = read_pid_file(&process.paths).ok().flatten();
        if !recorded.is_some_and(|r| r.pid == pid && r.start_time == start_time) {
            write_pid_file(&process.paths, pid, start_time)?;
        }
        let deadline = Instant::now() + timeout;
        let mut last_error = String::from("the control socket is not there yet");
        loop {
            if !process.is_running() {
                clear_stale(&process.paths);
                tracing::info!(pid, dir = %process.paths.dir.display(), "tapmirror serve exited while being adopted");
                return Ok(None);
            }
            let now = Instant::now();
            if process.paths.control.exists() {
                match process.probe(deadline.saturating_duration_since(now).min(PROBE_TIMEOUT)) {
                    Ok(()) => {
                        tracing::info!(pid, dir = %process.paths.dir.display(), "adopted tapmirror serve");
                        return Ok(Some(process));
                    }
                    Err(e) => last_error = e,
                }
            }
            if Instant::now() >= deadline {
                tracing::warn!(pid, dir = %process.paths.dir.display(), %last_error, "tapmirror serve does not answer");
                return Err(ProcessError::Unresponsive { dir: process.paths.dir.clone(), pid, waited: timeout, last_error });
            }
            std::thread::sleep(POLL);
        }
    }

    /// Kills whatever `tapmirror serve` serves `dir` (found as `adopt` finds it, answering or
    /// not), waits until it is gone, and removes its pid file and sockets. Returns the pid it
    /// killed, `None` when there was none. Never signals a process that is not that server.
    pub fn reap(dir: &Path) -> Result<Option<i32>, ProcessError> {
        let paths = Paths::new(dir)?;
        let Some((pid, start_time)) = locate(&paths)? else {
            clear_stale(&paths);
            return Ok(None);
        };
        let process = Self { pid, start_time, paths, reaper: Mutex::new(Reaper::Foreign) };
        process.kill()?;
        Ok(Some(pid))
    }

    /// The process id.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// The datapath folder (absolute).
    pub fn dir(&self) -> &Path {
        &self.paths.dir
    }

    /// The export's Unix socket.
    pub fn nbd_socket(&self) -> &Path {
        &self.paths.nbd
    }

    /// The control socket.
    pub fn control_socket(&self) -> &Path {
        &self.paths.control
    }

    /// The log file.
    pub fn log_file(&self) -> &Path {
        &self.paths.log
    }

    /// Whether the process still runs or is still exiting (a zombie whose threads are all gone
    /// does not). Reaps our own child once it has exited.
    pub fn is_running(&self) -> bool {
        let mut reaper = self.reaper.lock().unwrap_or_else(PoisonError::into_inner);
        match &mut *reaper {
            Reaper::Child(child) => match child.try_wait() {
                Ok(None) => true,
                Ok(Some(status)) => {
                    tracing::info!(pid = self.pid, dir = %self.paths.dir.display(), %status, "tapmirror serve exited");
                    *reaper = Reaper::Exited(status);
                    false
                }
                // ECHILD: someone else reaped it (SIGCHLD ignored, or a waitpid(-1)).
                Err(_) => {
                    *reaper = Reaper::Foreign;
                    exists(self.pid, self.start_time)
                }
            },
            Reaper::Exited(_) => false,
            // Identified when adopted; the pid and start time still name it.
            Reaper::Foreign => exists(self.pid, self.start_time),
        }
    }

    /// The last lines of the process's log.
    pub fn log_tail(&self) -> String {
        log_tail(&self.paths.log)
    }

    /// Sends one control request (with descriptors, for `mirror-attach`) and returns the
    /// answer when it says `"ok": true`; `timeout` bounds sending it and waiting for the answer.
    pub async fn command(&self, request: Value, fds: Vec<OwnedFd>, timeout: Duration) -> Result<Value, ProcessError> {
        let cmd = request.get("cmd").and_then(Value::as_str).unwrap_or("").to_owned();
        let socket = self.paths.control.clone();
        let control_error = |message: String| ProcessError::Control { dir: self.paths.dir.clone(), pid: self.pid, cmd: cmd.clone(), message };
        let answer = tokio::task::spawn_blocking(move || {
            crate::control::request_timeout(&socket, &request, fds.iter().collect(), Some(timeout))
        })
        .await
        .map_err(|e| control_error(format!("the control client task failed: {e}")))?
        .map_err(|e| control_error(format!("{e:#}")))?;
        if answer.get("ok").and_then(Value::as_bool) == Some(true) {
            Ok(answer)
        } else {
            let message = answer.get("error").and_then(Value::as_str).unwrap_or("no error message").to_owned();
            Err(ProcessError::Refused { dir: self.paths.dir.clone(), pid: self.pid, cmd, message })
        }
    }

    /// The control socket's `stats`: counters, outstanding requests, mirror state.
    pub async fn stats(&self) -> Result<Value, ProcessError> {
        self.command(json!({"cmd": "stats"}), Vec::new(), CONTROL_TIMEOUT).await
    }

    /// Waits (up to `timeout`) until no request is outstanding on either side.
    pub async fn drain(&self, timeout: Duration) -> Result<Value, ProcessError> {
        // The server gives up after `timeout`; the client waits a little longer for it to say so.
        self.command(json!({"cmd": "drain", "timeout_s": timeout.as_secs_f64()}), Vec::new(), timeout + CONTROL_TIMEOUT).await
    }

    /// Stops the process: asks it on the control socket to flush and exit (SIGTERM, which does
    /// the same, if the socket fails), waits up to `timeout`, then kills it. Once it is gone,
    /// removes its pid file and sockets.
    pub async fn shutdown(&self, timeout: Duration) -> Result<Stopped, ProcessError> {
        let deadline = Instant::now() + timeout;
        if !self.is_running() {
            self.cleanup();
            return Ok(Stopped::AlreadyGone);
        }
        tracing::info!(pid = self.pid, dir = %self.paths.dir.display(), "shutting down tapmirror serve");
        if let Err(e) = self.command(json!({"cmd": "shutdown"}), Vec::new(), timeout.min(CONTROL_TIMEOUT)).await {
            tracing::warn!(pid = self.pid, error = %e, "control shutdown failed; sending SIGTERM");
            self.signal(Signal::SIGTERM)?;
        }
        let stopped = if self.wait_gone(deadline).await {
            Stopped::Exited
        } else {
            tracing::warn!(pid = self.pid, dir = %self.paths.dir.display(), ?timeout, "tapmirror serve did not exit in time; killing it");
            self.signal(Signal::SIGKILL)?;
            if !self.wait_gone(Instant::now() + KILL_WAIT).await {
                return Err(ProcessError::Unkillable { dir: self.paths.dir.clone(), pid: self.pid, waited: KILL_WAIT });
            }
            Stopped::Killed
        };
        self.cleanup();
        tracing::info!(pid = self.pid, dir = %self.paths.dir.display(), ?stopped, "tapmirror serve stopped");
        Ok(stopped)
    }

    /// Kills the process (SIGKILL: no flush, as a crash would), waits until it is gone, and
    /// removes its pid file and sockets.
    pub fn kill(&self) -> Result<(), ProcessError> {
        let sent = self.signal(Signal::SIGKILL)?;
        // Signalled or not, it may still be exiting: the sockets close when it is done.
        let deadline = Instant::now() + KILL_WAIT;
        while self.is_running() {
            if Instant::now() >= deadline {
                return Err(ProcessError::Unkillable { dir: self.paths.dir.clone(), pid: self.pid, waited: KILL_WAIT });
            }
            std::thread::sleep(POLL);
        }
        if sent {
            tracing::info!(pid = self.pid, dir = %self.paths.dir.display(), "killed tapmirror serve");
        }
        self.cleanup();
        Ok(())
    }

    /// Sends `signal` if the process is still ours and alive; says whether it was sent.
    fn signal(&self, signal: Signal) -> Result<bool, ProcessError> {
        let mut reaper = self.reaper.lock().unwrap_or_else(PoisonError::into_inner);
        let alive = match &mut *reaper {
            // Unreaped, the pid is still this process's (a zombie at worst, which ignores it).
            // The lock is held until the signal is sent, so no one reaps it in between.
            Reaper::Child(child) => match child.try_wait() {
                Ok(None) => true,
                Ok(Some(status)) => {
                    *reaper = Reaper::Exited(status);
                    false
                }
                Err(_) => {
                    *reaper = Reaper::Foreign;
                    self.identify() == Identity::Ours
                }
            },
            Reaper::Exited(_) => false,
            Reaper::Foreign => self.identify() == Identity::Ours,
        };
        if !alive {
            return Ok(false);
        }
        match nix::sys::signal::kill(Pid::from_raw(self.pid), signal) {
            Ok(()) => Ok(true),
            Err(nix::errno::Errno::ESRCH) => Ok(false),
            Err(source) => Err(ProcessError::Signal { dir: self.paths.dir.clone(), pid: self.pid, signal, source }),
        }
    }

    async fn wait_gone(&self, deadline: Instant) -> bool {
        loop {
            if !self.is_running() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Our child's exit status, once it has exited (reaping it).
    fn exit_status(&self) -> Option<ExitStatus> {
        if self.is_running() {
            return None;
        }
        match &*self.reaper.lock().unwrap_or_else(PoisonError::into_inner) {
            Reaper::Exited(status) => Some(*status),
            _ => None,
        }
    }

    fn identify(&self) -> Identity {
        identify(self.pid, Some(self.start_time), &self.paths)
    }

    /// One `stats` round trip, blocking.
    fn probe(&self, timeout: Duration) -> Result<(), String> {
        match crate::control::request_timeout(&self.paths.control, &json!({"cmd": "stats"}), Vec::new(), Some(timeout)) {
            Ok(answer) if answer.get("ok").and_then(Value::as_bool) == Some(true) => Ok(()),
            Ok(answer) => Err(format!("stats answered {answer}")),
            Err(e) => Err(format!("{e:#}")),
        }
    }

    /// Removes the pid file and sockets of a process that is gone.
    fn cleanup(&self) {
        clear_stale(&self.paths);
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        let reaper = std::mem::replace(self.reaper.get_mut().unwrap_or_else(PoisonError::into_inner), Reaper::Foreign);
        // Still running: someone must wait for it when it exits. (Already exited: try_wait has
        // just reaped it.)
        if let Reaper::Child(mut child) = reaper
            && let Ok(None) = child.try_wait()
        {
            reap_in_background(child);
        }
    }
}

/// Waits for a child nobody holds any more, so that it does not stay a zombie when it exits.
fn reap_in_background(mut child: Child) {
    let pid = child.id();
    let spawned = std::thread::Builder::new().name(format!("reap-{pid}")).stack_size(64 << 10).spawn(move || {
        if let Ok(status) = child.wait() {
            tracing::info!(pid, %status, "tapmirror serve exited (no handle held it)");
        }
    });
    if let Err(e) = spawned {
        tracing::warn!(pid, error = %e, "no reaper thread: the process stays a zombie after it exits, until we exit");
    }
}

/// What holds a pid now.
#[derive(Debug, PartialEq, Eq)]
enum Identity {
    /// The `tapmirror serve` of this folder (started at the expected time, when one is given).
    Ours,
    /// No such process, or a zombie whose threads have all exited.
    Gone,
    /// The process (started at the expected time) is exiting: its memory is gone (so is its
    /// command line), or its leader shows as a zombie while other threads still exit. Its files,
    /// its listening sockets among them, may still be open.
    Exiting,
    /// Another process (pid reused), or one we may not inspect or must never signal.
    NotOurs,
}

fn identify(pid: i32, start_time: Option<u64>, paths: &Paths) -> Identity {
    // kill(0) and kill(-N) signal process groups, kill(1) init, and we are not our own server.
    if pid <= 1 || i64::from(pid) == i64::from(std::process::id()) {
        return Identity::NotOurs;
    }
    let stat = match proc_stat(pid) {
        Ok(Some(stat)) => stat,
        Ok(None) => return Identity::Gone,
        Err(_) => return Identity::NotOurs,
    };
    if start_time.is_some_and(|t| t != stat.start_time) {
        // Our process is gone; another got its pid.
        return Identity::Gone;
    }
    if stat.is_dead() {
        return Identity::Gone;
    }
    match std::fs::read(format!("/proc/{pid}/cmdline")) {
        Ok(cmdline) if serves(&cmdline, paths) => Identity::Ours,
        // An exiting process has no memory left to read its command line from. With the start
        // time we were told, it is still the process that was recorded, so it is ours, exiting;
        // without one, nothing says whose it was.
        Ok(cmdline) if cmdline.is_empty() || stat.state == 'Z' => {
            if start_time.is_some() { Identity::Exiting } else { Identity::Gone }
        }
        Ok(_) => Identity::NotOurs,
        Err(e) if e.kind() == io::ErrorKind::NotFound => Identity::Gone,
        Err(_) => Identity::NotOurs,
    }
}

/// Whether the process that started at `start_time` with this pid still exists, running or
/// exiting (the pid and start time name one process within a boot).
fn exists(pid: i32, start_time: u64) -> bool {
    if pid <= 1 || i64::from(pid) == i64::from(std::process::id()) {
        return false;
    }
    match proc_stat(pid) {
        Ok(Some(stat)) => stat.start_time == start_time && !stat.is_dead(),
        Ok(None) => false,
        // Unreadable: do not call gone what we cannot see.
        Err(_) => true,
    }
}

/// Whether a `/proc/PID/cmdline` is `tapmirror serve` on this folder's sockets.
fn serves(cmdline: &[u8], paths: &Paths) -> bool {
    let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
    let has = |flag: &str, value: &Path| args.windows(2).any(|w| w[0] == flag.as_bytes() && w[1] == value.as_os_str().as_bytes());
    args.get(1) == Some(&b"serve".as_slice()) && has("--socket", &paths.nbd) && has("--control", &paths.control)
}

/// The parts of `/proc/PID/stat` we use.
#[derive(Debug, PartialEq, Eq)]
struct ProcStat {
    state: char,
    /// Threads not yet released (a zombie leader counts itself).
    num_threads: u64,
    start_time: u64,
}

impl ProcStat {
    /// Dead for good: a zombie (or dead) leader with no other thread left. The leader of a
    /// multi-threaded process shows `Z` as soon as it has exited itself, while its other
    /// threads may still be exiting with the process's files open.
    fn is_dead(&self) -> bool {
        match self.state {
            'X' | 'x' => true,
            'Z' => self.num_threads <= 1,
            _ => false,
        }
    }
}

/// `/proc/PID/stat`, or `None` when no such process exists.
fn proc_stat(pid: i32) -> io::Result<Option<ProcStat>> {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => parse_stat(&s).map(Some).ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("unexpected /proc/{pid}/stat: {s:?}"))),
        // ESRCH: it exited between open and read.
        Err(e) if e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ESRCH) => Ok(None),
        Err(e) => Err(e),
    }
}

fn parse_stat(s: &str) -> Option<ProcStat> {
    // The command name (field 2) is in parentheses and may itself hold spaces and parentheses:
    // the fields proper start after the last ')'.
    let fields: Vec<&str> = s[s.rfind(')')? + 1..].split_ascii_whitespace().collect();
    // fields[0] is field 3 of proc(5): the state; num_threads is field 20, starttime field 22.
    let state = fields.first()?.chars().next()?;
    let num_threads = fields.get(17)?.parse().ok()?;
    let start_time = fields.get(19)?.parse().ok()?;
    Some(ProcStat { state, num_threads, start_time })
}

fn boot_id() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok().map(|s| s.trim().to_owned())
}

/// The live server of this folder, with its start time: the one the pid file names, else the
/// one listening on the control socket.
fn locate(paths: &Paths) -> Result<Option<(i32, u64)>, ProcessError> {
    match read_pid_file(paths) {
        Ok(Some(record)) => {
            let this_boot = boot_id();
            if record.boot_id.is_some() && this_boot.is_some() && record.boot_id != this_boot {
                tracing::info!(dir = %paths.dir.display(), pid = record.pid, "pid file is from an earlier boot");
            } else {
                let mut identity = identify(record.pid, Some(record.start_time), paths);
                // Dying: let it finish, so that the caller finds its sockets closed.
                let deadline = Instant::now() + KILL_WAIT;
                while identity == Identity::Exiting && Instant::now() < deadline {
                    std::thread::sleep(POLL);
                    identity = identify(record.pid, Some(record.start_time), paths);
                }
                match identity {
                    Identity::Ours => return Ok(Some((record.pid, record.start_time))),
                    other => tracing::info!(dir = %paths.dir.display(), pid = record.pid, identity = ?other, "pid file is stale"),
                }
            }
        }
        Ok(None) => {}
        Err(ProcessError::Io { source, path, .. }) if source.kind() == io::ErrorKind::InvalidData => {
            tracing::warn!(path = %path.display(), error = %source, "ignoring a corrupt pid file");
        }
        Err(e) => return Err(e),
    }
    // No live process by the pid file: does one listen on the control socket?
    let Some(pid) = control_peer(&paths.control) else { return Ok(None) };
    match proc_stat(pid) {
        Ok(Some(stat)) if identify(pid, Some(stat.start_time), paths) == Identity::Ours => {
            tracing::info!(dir = %paths.dir.display(), pid, "found tapmirror serve by its control socket");
            Ok(Some((pid, stat.start_time)))
        }
        _ => Ok(None),
    }
}

/// The pid of the process listening on a Unix socket, if any does.
fn control_peer(socket: &Path) -> Option<i32> {
    let stream = UnixStream::connect(socket).ok()?;
    let creds = nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::PeerCredentials).ok()?;
    Some(creds.pid())
}

fn read_pid_file(paths: &Paths) -> Result<Option<PidRecord>, ProcessError> {
    let text = match std::fs::read_to_string(&paths.pid) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(ProcessError::Io { what: "reading", path: paths.pid.clone(), source }),
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| ProcessError::Io { what: "parsing", path: paths.pid.clone(), source: io::Error::new(io::ErrorKind::InvalidData, e) })
}

/// Writes the pid file so that a crash leaves the old one or the new one, never a torn one.
fn write_pid_file(paths: &Paths, pid: i32, start_time: u64) -> Result<(), ProcessError> {
    let record = PidRecord { pid, start_time, boot_id: boot_id() };
    let tmp = paths.dir.join(format!("{PID_TMP_PREFIX}{}", std::process::id()));
    fn io_error<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> ProcessError + 'a {
        move |source| ProcessError::Io { what, path: path.to_owned(), source }
    }
    let text = serde_json::to_string(&record).map_err(|e| ProcessError::Io { what: "encoding", path: paths.pid.clone(), source: io::Error::other(e) })?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io_error("creating", &tmp))?;
    file.write_all(format!("{text}\n").as_bytes()).map_err(io_error("writing", &tmp))?;
    file.sync_all().map_err(io_error("syncing", &tmp))?;
    drop(file);
    std::fs::rename(&tmp, &paths.pid).map_err(io_error("renaming into place", &paths.pid))?;
    std::fs::File::open(&paths.dir).and_then(|d| d.sync_all()).map_err(io_error("syncing", &paths.dir))?;
    Ok(())
}

/// Removes the pid file, temporary pid files, and the sockets nobody listens on. Keeps the log.
fn clear_stale(paths: &Paths) {
    remove_if_present(&paths.pid);
    if let Ok(entries) = std::fs::read_dir(&paths.dir) {
        for entry in entries.flatten() {
            if entry.file_name().as_bytes().starts_with(PID_TMP_PREFIX.as_bytes()) {
                remove_if_present(&entry.path());
            }
        }
    }
    for socket in [&paths.nbd, &paths.control] {
        match std::fs::symlink_metadata(socket) {
            Err(_) => {}
            Ok(meta) if !meta.file_type().is_socket() => {
                tracing::warn!(path = %socket.display(), "not a socket; left alone");
            }
            // Something still listens: it is not ours to remove.
            Ok(_) if UnixStream::connect(socket).is_ok() => {
                tracing::warn!(path = %socket.display(), "a socket in use; left alone");
            }
            Ok(_) => remove_if_present(socket),
        }
    }
}

fn remove_if_present(path: &Path) {
    match std::fs::remove_file(path) {
        Ok(()) => tracing::debug!(path = %path.display(), "removed"),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(path = %path.display(), error = %e, "could not remove"),
    }
}

/// The last lines of a log (at most `LOG_TAIL_BYTES`).
fn log_tail(path: &Path) -> String {
    let read = || -> io::Result<String> {
        let mut file = std::fs::File::open(path)?;
        let len = file.metadata()?.len();
        let from = len.saturating_sub(LOG_TAIL_BYTES);
        file.seek(io::SeekFrom::Start(from))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        let text = String::from_utf8_lossy(&bytes);
        // Started in the middle of a line: drop its end.
        let text = if from > 0 { text.split_once('\n').map_or(&*text, |(_, rest)| rest) } else { &text };
        Ok(text.trim_end().to_owned())
    };
    read().unwrap_or_else(|e| format!("(no log: {e})"))
}

fn check_socket_paths(paths: &Paths) -> Result<(), ProcessError> {
    for socket in [&paths.nbd, &paths.control] {
        if socket.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(ProcessError::SocketPathTooLong { path: socket.clone() });
        }
    }
    Ok(())
}

fn absolute(path: &Path) -> Result<PathBuf, ProcessError> {
    std::path::absolute(path).map_err(|source| ProcessError::Io { what: "resolving", path: path.to_owned(), source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_with_an_awkward_command_name() {
        let line = "4242 (a) b (c) Z 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 3 0 987654 123 456 0";
        assert_eq!(parse_stat(line), Some(ProcStat { state: 'Z', num_threads: 3, start_time: 987654 }));
        assert_eq!(parse_stat("4242 (x) S 1 2"), None);
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn own_stat_parses() {
        let pid = i32::try_from(std::process::id()).expect("pid");
        let stat = proc_stat(pid).expect("read").expect("we exist");
        assert!(matches!(stat.state, 'R' | 'S'), "{stat:?}");
        assert!(stat.start_time > 0);
    }

    #[test]
    fn cmdline_must_name_this_folder() {
        let paths = Paths::new(Path::new("/run/dp/1")).expect("paths");
        let ours = b"/usr/bin/tapmirror\0serve\0/img\0--socket\0/run/dp/1/nbd.sock\0--control\0/run/dp/1/control.sock\0--export-name\0\0";
        assert!(serves(ours, &paths));
        let other = Paths::new(Path::new("/run/dp/2")).expect("paths");
        assert!(!serves(ours, &other));
        assert!(!serves(b"sleep\x0060\0", &paths));
        // The socket paths as an image name, not as the options' values.
        assert!(!serves(b"tapmirror\0copy\0--socket\0/run/dp/1/nbd.sock\0--control\0/run/dp/1/control.sock\0", &paths));
    }

    #[test]
    fn handles_and_their_futures_cross_threads() {
        fn send_sync<T: Send + Sync>(_: &T) {}
        fn send<T: Send>(_: &T) {}
        let p = ServeProcess {
            pid: 0,
            start_time: 0,
            paths: Paths::new(Path::new("/nonexistent")).expect("paths"),
            reaper: Mutex::new(Reaper::Foreign),
        };
        send_sync(&p);
        // Never polled: only their types matter.
        send(&p.stats());
        send(&p.drain(Duration::ZERO));
        send(&p.shutdown(Duration::ZERO));
        send(&p.command(Value::Null, Vec::new(), Duration::ZERO));
    }

    #[test]
    fn never_ours_init_group_or_self() {
        let paths = Paths::new(Path::new("/nonexistent")).expect("paths");
        for pid in [-1, 0, 1, i32::try_from(std::process::id()).expect("pid")] {
            assert_eq!(identify(pid, None, &paths), Identity::NotOurs, "pid {pid}");
        }
    }
}
