//! Records on disk, written so that a crash at any instant leaves either the old record or the
//! new one, never a torn one: write a temporary file beside it, fsync it, rename it over the
//! record, fsync the folder (`../shared/DESIGN.md`, "State and recovery").

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
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
        // Records may hold other hosts' secrets (a migration's destination URL): the owner's only.
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| with(e, "create temporary for"))?;
        // An older temporary left by a crash keeps its mode through `create`.
        f.set_permissions(fs::Permissions::from_mode(0o600)).map_err(|e| with(e, "restrict"))?;
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

/// Renames `from` over `to` (same folder) durably.
pub fn rename_durably(from: &Path, to: &Path) -> io::Result<()> {
    fs::rename(from, to).map_err(|e| io::Error::new(e.kind(), format!("rename {} over {}: {e}", from.display(), to.display())))?;
    sync_dir(to.parent().unwrap_or(Path::new(".")))
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

/// Space kept aside in an SR's folder so that its record can still be rewritten when the file
/// system is full (a copy that ran out of space, say): without it, not even the VDI that filled
/// it could be destroyed. Starts with `.`, so no VDI id can name it.
pub const RESERVE_FILE: &str = ".sxm-reserve";
/// The reserve's size: many times the largest record.
pub const RESERVE_BYTES: u64 = 1 << 20;

/// Makes sure `dir`'s reserve exists (best effort: a full file system simply has none for now).
pub fn ensure_reserve(dir: &Path) {
    let path = dir.join(RESERVE_FILE);
    if fs::metadata(&path).is_ok_and(|m| m.len() == RESERVE_BYTES) {
        return;
    }
    let made = File::create(&path).and_then(|f| {
        // Real blocks, not a sparse file: the point is to hold the space.
        let mut f = io::BufWriter::new(f);
        let zeros = vec![0u8; 64 << 10];
        for _ in 0..(RESERVE_BYTES / zeros.len() as u64) {
            f.write_all(&zeros)?;
        }
        f.flush()?;
        f.get_ref().sync_all()
    });
    if let Err(e) = made {
        let _ = fs::remove_file(&path);
        tracing::warn!(dir = %dir.display(), error = %e, "no room for the SR's reserve");
    }
}

/// [`write_json`] into a folder with a reserve ([`ensure_reserve`]): on a full file system the
/// reserve is given back once and the record written again.
/// A reserve given back is made again by the next write that finds room for it (space freed
/// since, by a destroy or a reset), so the next full file system finds one too.
pub fn write_json_reserved<T: Serialize>(path: &Path, value: &T) -> io::Result<()> {
    let reserve = folder_of(path).join(RESERVE_FILE);
    let written = match write_json(path, value) {
        Err(e) if e.kind() == io::ErrorKind::StorageFull && fs::remove_file(&reserve).is_ok() => {
            tracing::warn!(record = %path.display(), "the file system is full: the folder's reserve was released to write the record");
            return write_json(path, value);
        }
        r => r,
    };
    if written.is_ok() && fs::metadata(&reserve).is_err() {
        ensure_reserve(folder_of(path));
    }
    written
}

/// [`write_json_reserved`] for a record that no longer names file `doomed` (a destroy). When the
/// file system is still full (the reserve spent already: a copy filled the folder after an
/// earlier write released it), `doomed` is [`bury`]'d to make room and the record written
/// again: a failed migration's undo must be able to destroy what filled the folder. Once the
/// record is written, `doomed`'s tombstone (this call's, or an earlier attempt's) has served and
/// goes; the caller deletes `doomed` itself when it was not buried.
pub fn write_json_freeing<T: Serialize>(path: &Path, value: &T, doomed: &Path) -> io::Result<()> {
    match write_json_reserved(path, value) {
        Err(e) if e.kind() == io::ErrorKind::StorageFull => {
            bury(doomed)?;
            tracing::warn!(record = %path.display(), doomed = %doomed.display(), "the file system is full: emptied the destroyed file to write the record");
            write_json(path, value)?;
        }
        r => r?,
    }
    if let Err(e) = remove_durably(&tombstone_path(doomed)) {
        // Empty already; the folder's next recovery removes it.
        tracing::warn!(tombstone = %tombstone_path(doomed).display(), error = %e, "could not remove a tombstone");
    }
    Ok(())
}

/// Suffix of a tombstone, `.<name>.destroyed`: file `<name>`, renamed there by [`bury`].
pub const TOMBSTONE_SUFFIX: &str = ".destroyed";

/// The tombstone of `file`, beside it.
pub fn tombstone_path(file: &Path) -> PathBuf {
    let mut name = std::ffi::OsString::from(".");
    name.push(file.file_name().unwrap_or_default());
    name.push(TOMBSTONE_SUFFIX);
    file.with_file_name(name)
}

/// Commits to deleting `file` without writing anything: it is renamed to its tombstone
/// (durably), then emptied, which frees its space. From the rename on, the recovery of the
/// folder it is in must finish the deletion (see [`buried`]), whatever the record still says.
pub fn bury(file: &Path) -> io::Result<()> {
    let tomb = tombstone_path(file);
    match fs::rename(file, &tomb) {
        Ok(()) => sync_dir(folder_of(file))?,
        // Buried already, by an earlier attempt whose record still did not fit: empty it again
        // (a no-op) rather than fail every retry until the next recovery.
        Err(e) if e.kind() == io::ErrorKind::NotFound && tomb.exists() => {}
        Err(e) => return Err(io::Error::new(e.kind(), format!("rename {} to its tombstone: {e}", file.display()))),
    }
    let f = OpenOptions::new().write(true).open(&tomb).map_err(|e| io::Error::new(e.kind(), format!("open {}: {e}", tomb.display())))?;
    f.set_len(0).and_then(|()| f.sync_all()).map_err(|e| io::Error::new(e.kind(), format!("empty {}: {e}", tomb.display())))
}

/// The names of the files buried ([`bury`]) in `dir` whose tombstones are still there, sorted.
pub fn buried(dir: &Path) -> io::Result<Vec<String>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir)? {
        let name = entry?.file_name();
        if let Some(n) = name.to_str().and_then(|n| n.strip_prefix('.')).and_then(|n| n.strip_suffix(TOMBSTONE_SUFFIX)) {
            out.push(n.to_owned());
        }
    }
    out.sort();
    Ok(out)
}

fn folder_of(path: &Path) -> &Path {
    path.parent().unwrap_or(Path::new("."))
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
    fn a_reserve_given_back_is_made_again_by_the_next_write_with_room() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("r.json");
        // As after a full file system took the reserve.
        assert!(!dir.path().join(RESERVE_FILE).exists());
        write_json_reserved(&path, &vec![1u32, 2, 3]).expect("write");
        let reserve = std::fs::metadata(dir.path().join(RESERVE_FILE)).expect("the reserve is back");
        assert_eq!(reserve.len(), RESERVE_BYTES);
    }

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

    #[test]
    fn a_buried_file_is_emptied_and_listed_until_its_tombstone_goes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("a.vhd");
        fs::write(&f, vec![7u8; 1 << 16]).expect("file");
        fs::write(dir.path().join(".b.vhd.tmp"), b"").expect("not a tombstone");
        assert_eq!(buried(dir.path()).expect("list"), Vec::<String>::new());
        bury(&f).expect("bury");
        assert!(!f.exists());
        let tomb = tombstone_path(&f);
        assert_eq!(tomb, dir.path().join(".a.vhd.destroyed"));
        assert_eq!(fs::metadata(&tomb).expect("tombstone").len(), 0);
        assert_eq!(buried(dir.path()).expect("list"), vec!["a.vhd".to_owned()]);
        bury(&f).expect("burying again, as a retried destroy does");
        assert_eq!(buried(dir.path()).expect("list"), vec!["a.vhd".to_owned()]);
        remove_durably(&tomb).expect("remove");
        assert_eq!(buried(dir.path()).expect("list"), Vec::<String>::new());
        assert!(bury(&f).is_err(), "a file that is not there, nor its tombstone, buried");
    }
}
