//! Shared test plumbing: an SR in a temporary folder, the `tapmirror` program, peer tools.
//!
//! # Finding `tapmirror`
//!
//! The backend runs `tapmirror serve` as a separate program. `env!("CARGO_BIN_EXE_tapmirror")`
//! only exists in tapmirror's own tests, and `cargo test -p sxm-smapiv3` builds tapmirror as a
//! library only, so these tests build the binary themselves, once per run: `cargo build -p
//! tapmirror --bin tapmirror` into the same target folder and profile as this test binary (found
//! from the test binary's own path, `<target>/<profile>/deps/it-…`). Cargo's own lock makes
//! that safe next to a running `cargo test --workspace` (which builds the binary too, so the
//! call finds it fresh and returns at once). `SXM_TAPMIRROR=/path/to/tapmirror` skips the
//! build and uses that program.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use sxm_engine::backend::{Backend, SrContext};
use sxm_engine::model::VdiInfo;
use sxm_engine::rpc::marshal::Map;
use sxm_smapiv3::Qcow2Backend;

/// The `tapmirror` program, built once per test run (see the module documentation).
pub fn tapmirror() -> PathBuf {
    static EXE: OnceLock<PathBuf> = OnceLock::new();
    EXE.get_or_init(|| {
        if let Some(p) = std::env::var_os("SXM_TAPMIRROR") {
            return PathBuf::from(p);
        }
        let me = std::env::current_exe().expect("test binary path");
        // <target>/<profile>/deps/it-HASH
        let profile_dir = me.parent().and_then(Path::parent).expect("test binary in <target>/<profile>/deps");
        let target = profile_dir.parent().expect("target folder");
        let profile = profile_dir.file_name().and_then(|n| n.to_str()).expect("profile folder name");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "--quiet", "-p", "tapmirror", "--bin", "tapmirror", "--manifest-path"])
            .arg(&manifest)
            .arg("--target-dir")
            .arg(target);
        match profile {
            "debug" => {}
            "release" => {
                cmd.arg("--release");
            }
            other => {
                cmd.args(["--profile", other]);
            }
        }
        let status = cmd.status().expect("running cargo to build tapmirror");
        assert!(status.success(), "building tapmirror failed: {cmd:?}");
        let exe = profile_dir.join("tapmirror");
        assert!(exe.is_file(), "{} missing after the build", exe.display());
        exe
    })
    .clone()
}

/// Whether `tool` is on PATH. Under CI a missing peer is a failure, elsewhere a skip.
pub fn require_tool(tool: &str) -> bool {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !found {
        if std::env::var_os("CI").is_some() {
            panic!("{tool} is required under CI");
        }
        eprintln!("skipping: {tool} not installed");
    }
    found
}

/// Skips the calling test unless every tool is installed.
#[macro_export]
macro_rules! require {
    ($($tool:expr),+) => {
        if !($($crate::harness::require_tool($tool))&&+) {
            return;
        }
    };
}

/// Longest a peer command may run: each finishes in seconds, so one still running has hung.
const RUN_DEADLINE: Duration = Duration::from_secs(120);

/// Runs a command; `Err` with its stderr when it fails.
pub fn try_run(cmd: &mut Command) -> Result<Output, String> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("spawn {cmd:?}: {e}"))?;
    let deadline = Instant::now() + RUN_DEADLINE;
    // Outputs here are small: waiting before reading cannot fill a pipe.
    loop {
        if child.try_wait().map_err(|e| e.to_string())?.is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("{cmd:?} ran for more than {RUN_DEADLINE:?}"));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(format!("{cmd:?} failed ({}): {}{}", out.status, String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
    }
}

/// Runs a command, failing the test when it fails.
pub fn run(cmd: &mut Command) -> Output {
    try_run(cmd).unwrap_or_else(|e| panic!("{e}"))
}

/// An SR in a temporary folder, created, with its backend.
pub struct TestSr {
    /// The SR as the backend sees it.
    pub ctx: SrContext,
    /// The backend.
    pub backend: Qcow2Backend,
    /// Holds the folder.
    pub _tmp: tempfile::TempDir,
}

/// A test that fails leaves its datapaths running (they outlive their starter by design):
/// kill whatever serves the SR's run folder before the folder goes.
impl Drop for TestSr {
    fn drop(&mut self) {
        if let Ok(entries) = std::fs::read_dir(&self.ctx.run_dir) {
            for entry in entries.flatten() {
                if let Ok(Some(pid)) = tapmirror::process::ServeProcess::reap(&entry.path()) {
                    eprintln!("reaped a datapath left running: pid {pid} in {}", entry.path().display());
                }
            }
        }
    }
}

impl TestSr {
    /// A new, created and attached SR.
    pub fn new() -> TestSr {
        // Under /tmp, so socket paths stay short.
        let tmp = tempfile::Builder::new().prefix("sxm-v3-").tempdir_in("/tmp").expect("tempdir");
        let dir = tmp.path().join("sr");
        let run_dir = tmp.path().join("run");
        std::fs::create_dir(&dir).expect("SR folder");
        std::fs::create_dir(&run_dir).expect("run folder");
        let mut device_config = Map::new();
        device_config.insert("path".to_owned(), dir.display().to_string());
        let ctx = SrContext { sr: uuid::Uuid::new_v4().to_string(), dir, run_dir, device_config };
        let backend = Qcow2Backend::new(tapmirror());
        let dc = backend.sr_create(&ctx, "test SR", 0).expect("SR.create");
        assert_eq!(dc, ctx.device_config);
        backend.sr_attach(&ctx, &[]).expect("SR.attach");
        TestSr { ctx, backend, _tmp: tmp }
    }

    /// A fresh backend instance on the same SR (as after a restart of the daemon); the old
    /// one is dropped.
    pub fn restart(&mut self) {
        self.backend = Qcow2Backend::new(tapmirror());
    }

    /// Creates a VDI of `size` bytes.
    pub fn create(&self, name: &str, size: i64) -> VdiInfo {
        let mut info = VdiInfo::new("ignored", name);
        info.virtual_size = size;
        self.backend.vdi_create(&self.ctx, &info).expect("VDI.create")
    }

    /// The qcow2 volume of node `id`.
    pub fn vol(&self, id: &str) -> PathBuf {
        self.ctx.dir.join(format!("{id}.qcow2"))
    }

    /// The ids of every volume in the SR's folder, sorted.
    pub fn files(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(&self.ctx.dir)
            .expect("list SR")
            .filter_map(|e| e.ok()?.file_name().to_str()?.strip_suffix(".qcow2").map(str::to_owned))
            .collect();
        v.sort();
        v
    }

    /// VDI ids a scan lists, sorted.
    pub fn scan_ids(&self) -> Vec<String> {
        let mut v: Vec<String> = self.backend.sr_scan(&self.ctx).expect("SR.scan").into_iter().map(|i| i.vdi).collect();
        v.sort();
        v
    }

    /// The whole content of VDI `id`'s chain, read by `qemu-img convert` into a raw file.
    pub fn read_all(&self, id: &str) -> Vec<u8> {
        let out = self._tmp.path().join(format!("read-{id}.raw"));
        let _ = std::fs::remove_file(&out);
        run(Command::new("qemu-img").args(["convert", "-f", "qcow2", "-O", "raw"]).arg(self.vol(id)).arg(&out));
        let bytes = std::fs::read(&out).expect("read the copy");
        std::fs::remove_file(&out).expect("remove the copy");
        bytes
    }
}

/// Writes `len` bytes of `data_pattern` at `offset` of a qcow2 volume with qemu-io.
pub fn qemu_write(path: &Path, offset: u64, data_pattern: u8, len: u64) {
    run(Command::new("qemu-io").args(["-f", "qcow2", "-c"]).arg(format!("write -P {data_pattern} {offset} {len}")).arg(path));
}

/// `qemu-img info`'s JSON for a file.
pub fn qemu_info(path: &Path) -> serde_json::Value {
    let out = run(Command::new("qemu-img").args(["info", "--output=json"]).arg(path));
    serde_json::from_slice(&out.stdout).expect("qemu-img info JSON")
}

/// `qemu-img check` of a volume: `Err` with its output when unsound (leaks included).
pub fn qemu_check(path: &Path) -> Result<(), String> {
    try_run(Command::new("qemu-img").args(["check", "-f", "qcow2"]).arg(path)).map(|_| ())
}
