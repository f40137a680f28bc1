//! What the targets share: the runtime that drives tapmirror's async code, and for the targets
//! whose input is a whole image file, the folder and path it is written to.

/// A current-thread runtime with at most 2 blocking threads: the portable I/O engine runs file
/// I/O on the blocking pool, kept small on shared CPUs.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().max_blocking_threads(2).build().expect("tokio runtime")
}

/// A runtime and a private folder (on `/dev/shm` when it exists) with one file in it that each
/// input is written to.
#[allow(dead_code)] // nbd_server's input is a byte stream, not a file
pub struct FileHarness {
    pub rt: tokio::runtime::Runtime,
    pub dir: tempfile::TempDir,
    pub path: std::path::PathBuf,
}

#[allow(dead_code)]
impl FileHarness {
    pub fn new(file_name: &str) -> FileHarness {
        let dir = if std::path::Path::new("/dev/shm").is_dir() { tempfile::tempdir_in("/dev/shm") } else { tempfile::tempdir() }
            .expect("tempdir");
        let path = dir.path().join(file_name);
        FileHarness { rt: runtime(), dir, path }
    }
}
