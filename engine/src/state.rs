//! Records on disk, written so that a crash at any instant leaves either the old record or the
//! new one, never a torn one: write a temporary file beside it, fsync it, rename it over the
//! record, fsync the folder (`../shared/DESIGN.md`, "State and recovery").

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Suffix of temporary files; [`remove_temporaries`] sweeps them at start.
const TMP_SUFFIX: &str = ".tmp";

fn tmp_path(path: &Path) -> io::Result<PathBuf> {
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("{} has no file name", path.display())))?;
    let mut tmp = std::ffi::OsString::from(".");
    tmp.push(name);
    tmp.push(TMP_SUFFIX);
    Ok(path.with_file_name(tmp))
}

/// Replaces `path` with `bytes` atomically and durably.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let with = |e: io::Error, what: &str| io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()));
    let tmp = tmp_path(path)?;
    let written = (|| {
        let mut f = OpenOptions::new().write(true).create(true).truncate(true).open(&tmp).map_err(|e| with(e, "create temporary for"))?;
        f.write_all(bytes).map_err(|e| with(e, "write"))?;
        f.sync_all().map_err(|e| with(e, "fsync"))?;
        drop(f);
        fs::rename(&tmp, path).map_err(|e| with(e, "rename into"))
    })();
    if let Err(e) = written {
        // Nothing refers to the temporary: do not leave it (or its space) behind.
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

/// Removes `path` durably (a missing file is fine).
pub fn remove_durably(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Ok(()) => sync_dir(path.parent().unwrap_or(Path::new("."))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io::Error::new(e.kind(), format!("remove {}: {e}", path.display()))),
    }
}

/// fsyncs a folder, so a rename or removal in it survives a crash.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| io::Error::new(e.kind(), format!("fsync folder {}: {e}", dir.display())))
}

/// Writes a record as pretty JSON, atomically.
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> io::Result<()> {
    let mut bytes = serde_json::to_vec_pretty(value).map_err(io::Error::other)?;
    bytes.push(b'\n');
    write_atomic(path, &bytes)
}

/// Reads a JSON record; `None` when the file does not exist.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> io::Result<Option<T>> {
    match fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{}: {e}", path.display()))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io::Error::new(e.kind(), format!("read {}: {e}", path.display()))),
    }
}

/// Removes temporaries a crash left behind in `dir` (not recursive).
pub fn remove_temporaries(dir: &Path) -> io::Result<usize> {
    let mut n = 0;
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') && name.ends_with(TMP_SUFFIX) {
            fs::remove_file(entry.path())?;
            n += 1;
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_replace_atomically_and_temporaries_are_swept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("rec.json");
        assert_eq!(read_json::<Vec<u32>>(&p).expect("read"), None);
        write_json(&p, &vec![1u32, 2]).expect("write");
        write_json(&p, &vec![3u32]).expect("overwrite");
        assert_eq!(read_json::<Vec<u32>>(&p).expect("read"), Some(vec![3]));
        // A crash between writing the temporary and renaming it leaves the temporary.
        fs::write(dir.path().join(".rec.json.tmp"), b"[9").expect("torn temporary");
        assert_eq!(remove_temporaries(dir.path()).expect("sweep"), 1);
        assert_eq!(read_json::<Vec<u32>>(&p).expect("read"), Some(vec![3]));
        fs::write(&p, b"{not json").expect("corrupt");
        let e = read_json::<Vec<u32>>(&p).expect_err("corrupt record");
        assert!(e.to_string().contains("rec.json"), "{e}");
        remove_durably(&p).expect("remove");
        remove_durably(&p).expect("remove twice");
    }
}
