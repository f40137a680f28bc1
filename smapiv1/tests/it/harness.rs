//! Shared test plumbing: an SR in a temporary folder and its checks with peer tools. The
//! generic part (finding or building the `tapmirror` program, running peers with a deadline,
//! test data, reaping left-over datapaths) is tapmirror's `testkit`, re-exported here.

use std::path::{Path, PathBuf};
use std::process::Command;

use sxm_engine::backend::{Backend, SrContext};
use sxm_engine::model::{AttachInfo, Implementation, VdiInfo};
use sxm_engine::rpc::marshal::Map;
use sxm_smapiv1::ExtBackend;

pub use tapmirror::testkit::tapmirror_exe as tapmirror;
pub use tapmirror::testkit::{Tmpfs, pattern, run, try_run};

/// An SR in a temporary folder, created, with its backend.
pub struct TestSr {
    /// The SR as the backend sees it.
    pub ctx: SrContext,
    /// The backend.
    pub backend: ExtBackend,
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
        let tmp = tempfile::Builder::new().prefix("sxm-v1-").tempdir_in("/tmp").expect("tempdir");
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
        let sr = TestSr { ctx, backend: ExtBackend::new(tapmirror()), _tmpfs: tmpfs, _tmp: tmp };
        let dc = sr.backend.sr_create(&sr.ctx, "test SR", 0).expect("SR.create");
        assert_eq!(dc, sr.ctx.device_config);
        sr.backend.sr_attach(&sr.ctx, &[]).expect("SR.attach");
        Some(sr)
    }

    /// A fresh backend instance on the same SR (as after a restart of the daemon); the old
    /// one is dropped.
    pub fn restart(&mut self) {
        self.backend = ExtBackend::new(tapmirror());
    }

    /// Creates a VDI of `size` bytes.
    pub fn create(&self, name: &str, size: i64) -> VdiInfo {
        let mut info = VdiInfo::new("ignored", name);
        info.virtual_size = size;
        self.backend.vdi_create(&self.ctx, &info).expect("VDI.create")
    }

    /// The VHD file of node `id`.
    pub fn vhd(&self, id: &str) -> PathBuf {
        self.ctx.dir.join(format!("{id}.vhd"))
    }

    /// The ids of every VHD file in the SR's folder, sorted.
    pub fn files(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(&self.ctx.dir)
            .expect("list SR")
            .filter_map(|e| e.ok()?.file_name().to_str()?.strip_suffix(".vhd").map(str::to_owned))
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

    /// Runs qemu-io command `cmd` (a write) on VDI `id` through a datapath, attached and
    /// detached around it: QEMU's vpc driver knows no parent locators, so a differencing VHD
    /// is written through our data path rather than as a file.
    pub fn write_through_datapath(&self, id: &str, cmd: &str) {
        let uri = nbd_uri(&self.backend.vdi_attach(&self.ctx, id, true).expect("attach"));
        self.backend.vdi_activate(&self.ctx, id).expect("activate");
        tapmirror::testkit::qemu_io(&uri, cmd).expect("write through the datapath");
        self.backend.vdi_deactivate(&self.ctx, id).expect("deactivate");
        self.backend.vdi_detach(&self.ctx, id).expect("detach");
    }

    /// The whole content of VDI `id`'s chain, read by `tapmirror copy` into a raw file.
    pub fn read_all(&self, id: &str) -> Vec<u8> {
        let out = self._tmp.path().join(format!("read-{id}.raw"));
        let _ = std::fs::remove_file(&out);
        // The file itself, also while a datapath writes it: tests read it at moments of
        // their choosing, when no write is in flight.
        run(Command::new(tapmirror()).args(["copy", "--force-share"]).arg(self.vhd(id)).arg(&out));
        let bytes = std::fs::read(&out).expect("read the copy");
        std::fs::remove_file(&out).expect("remove the copy");
        bytes
    }
}

/// Writes `data` at `offset` of a dynamic VHD file with qemu-io (QEMU's own VHD driver).
pub fn qemu_write(path: &Path, offset: u64, data_pattern: u8, len: u64) {
    run(Command::new("qemu-io").args(["-f", "vpc", "-c"]).arg(format!("write -P {data_pattern} {offset} {len}")).arg(path));
}

/// `qemu-img info`'s JSON for a file.
pub fn qemu_info(path: &Path) -> serde_json::Value {
    let out = run(Command::new("qemu-img").args(["info", "--output=json"]).arg(path));
    serde_json::from_slice(&out.stdout).expect("qemu-img info JSON")
}

/// `tapmirror image check` of a chain: `Err` with its message when unsound.
pub fn vhd_check(path: &Path) -> Result<(), String> {
    try_run(Command::new(tapmirror()).args(["image", "check"]).arg(path)).map(|_| ())
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
