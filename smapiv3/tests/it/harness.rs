//! Shared test plumbing: an SR in a temporary folder and its checks with peer tools. The
//! generic part (finding or building the `tapmirror` program, running peers with a deadline,
//! test data, reaping left-over datapaths) is tapmirror's `testkit`, re-exported here.

use std::path::{Path, PathBuf};
use std::process::Command;

use sxm_engine::backend::{Backend, SrContext};
use sxm_engine::model::{AttachInfo, Implementation, VdiInfo};
use sxm_engine::rpc::marshal::Map;
use sxm_smapiv3::Qcow2Backend;

pub use tapmirror::testkit::tapmirror_exe as tapmirror;
pub use tapmirror::testkit::{Tmpfs, run, try_run};

/// An SR in a temporary folder, created, with its backend.
pub struct TestSr {
    /// The SR as the backend sees it.
    pub ctx: SrContext,
    /// The backend.
    pub backend: Qcow2Backend,
    /// The SR folder's own file system, if the test asked for one. Before `_tmp`: fields
    /// drop in order, and it must be unmounted before the folder is removed.
    _tmpfs: Option<Tmpfs>,
    /// Holds the folder.
    pub _tmp: tempfile::TempDir,
}

/// A test that fails leaves its datapaths running (they outlive their starter by design):
/// kill whatever serves the SR's run folder before the folder goes.
impl Drop for TestSr {
    fn drop(&mut self) {
        tapmirror::testkit::reap_datapaths(&self.ctx.run_dir);
    }
}

impl TestSr {
    /// A new, created and attached SR.
    pub fn new() -> TestSr {
        Self::in_folder(None).expect("an SR in a plain folder")
    }

    /// A new SR on a tmpfs of `size` (`4m`, say), so that it can be filled; `None` where no
    /// tmpfs can be mounted (not root).
    pub fn on_tmpfs(size: &str) -> Option<TestSr> {
        Self::in_folder(Some(size))
    }

    fn in_folder(tmpfs: Option<&str>) -> Option<TestSr> {
        // Under /tmp, so socket paths stay short.
        let tmp = tempfile::Builder::new().prefix("sxm-v3-").tempdir_in("/tmp").expect("tempdir");
        let dir = tmp.path().join("sr");
        let run_dir = tmp.path().join("run");
        std::fs::create_dir(&dir).expect("SR folder");
        std::fs::create_dir(&run_dir).expect("run folder");
        let tmpfs = match tmpfs {
            Some(size) => Some(Tmpfs::mount(&dir, size)?),
            None => None,
        };
        let mut device_config = Map::new();
        device_config.insert("path".to_owned(), dir.display().to_string());
        let ctx = SrContext { sr: uuid::Uuid::new_v4().to_string(), dir, run_dir, device_config };
        // Built before the calls, so that a failing one still unmounts the tmpfs.
        let sr = TestSr { ctx, backend: Qcow2Backend::new(tapmirror()), _tmpfs: tmpfs, _tmp: tmp };
        let dc = sr.backend.sr_create(&sr.ctx, "test SR", 0).expect("SR.create");
        assert_eq!(dc, sr.ctx.device_config);
        sr.backend.sr_attach(&sr.ctx, &[]).expect("SR.attach");
        Some(sr)
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

/// The one NBD address of an attached VDI (xapi's `nbd:unix:<socket>:exportname=<name>`) as
/// (socket, export).
pub fn xapi_nbd(info: &AttachInfo) -> (PathBuf, String) {
    let [Implementation::Nbd { uri }] = info.implementations.as_slice() else { panic!("one Nbd implementation: {info:?}") };
    tapmirror::testkit::split_nbd_unix(uri)
}

/// The same export as a standard NBD URI, which qemu-io, nbdcopy and our client take.
pub fn nbd_uri(info: &AttachInfo) -> String {
    let (socket, export) = xapi_nbd(info);
    tapmirror::testkit::nbd_unix_uri(&socket, &export)
}
