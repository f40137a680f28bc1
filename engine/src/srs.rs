//! The host's SRs: which exist, their type, names and device_config, whether they are
//! attached, and where their folders are. One JSON record per SR in `<root>/srs/`, written
//! atomically before the call that changed it answers; each SR's data lives in
//! `<root>/sr/<sr>/` and its sockets in `<root>/run/<n>/` (short, for Unix socket paths).

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::backend::{SrContext, safe_component};
use crate::model::StorageError;
use crate::rpc::marshal::Map;
use crate::state;

/// One SR's persisted record.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SrRecord {
    /// The SR's id.
    pub sr: String,
    /// The SR type (`ext`, `qcow2`): which backend serves it.
    pub ty: String,
    /// Name.
    pub name_label: String,
    /// Description.
    pub name_description: String,
    /// device_config, as the backend returned it from `SR.create`.
    pub device_config: Map<String>,
    /// Attached (served) on this host.
    pub attached: bool,
    /// This SR's number: names its folder under `<root>/run/`.
    pub run: u32,
}

/// A registered SR and the lock that orders calls on it.
#[derive(Clone)]
pub struct SrEntry {
    /// The record.
    pub record: SrRecord,
    /// Shared for calls that only read, exclusive for calls that change the SR or its VDIs.
    pub lock: Arc<tokio::sync::RwLock<()>>,
}

/// Every SR of the host.
pub struct SrRegistry {
    root: PathBuf,
    srs: BTreeMap<String, SrEntry>,
}

impl SrRegistry {
    /// Loads every SR record under `root`.
    pub fn load(root: &Path) -> io::Result<SrRegistry> {
        let dir = root.join("srs");
        std::fs::create_dir_all(&dir)?;
        std::fs::create_dir_all(root.join("sr"))?;
        std::fs::create_dir_all(root.join("run"))?;
        state::remove_temporaries(&dir)?;
        let mut srs = BTreeMap::new();
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            match state::read_json::<SrRecord>(&path) {
                // The id names the SR's folder under `sr/`: one that could name another place,
                // or that is not the one the record was written under, is not taken (a record
                // edited to `../../x` had this host fill, scan and destroy a folder outside it).
                Ok(Some(record))
                    if safe_component("SR", &record.sr).is_err() || path.file_stem().is_none_or(|stem| *stem != *record.sr) =>
                {
                    tracing::error!(path = %path.display(), sr = %record.sr, "SR record names an SR other than its file's; SR ignored");
                }
                Ok(Some(record)) => {
                    srs.insert(record.sr.clone(), SrEntry { record, lock: Arc::default() });
                }
                Ok(None) => {}
                // One unreadable record must not take the others down with it.
                Err(e) => tracing::error!(path = %path.display(), error = %e, "unreadable SR record; SR ignored"),
            }
        }
        Ok(SrRegistry { root: root.to_owned(), srs })
    }

    /// The SR, or `No_storage_plugin_for_sr`, as xapi's mux answers a call naming an SR no
    /// plugin has registered.
    pub fn get(&self, sr: &str) -> Result<&SrEntry, StorageError> {
        self.srs.get(sr).ok_or_else(|| StorageError::NoStoragePluginForSr(sr.into()))
    }

    /// Every SR.
    pub fn all(&self) -> impl Iterator<Item = &SrEntry> {
        self.srs.values()
    }

    /// What a backend needs to know of an SR.
    pub fn context(&self, record: &SrRecord) -> SrContext {
        SrContext {
            sr: record.sr.clone(),
            dir: self.root.join("sr").join(&record.sr),
            run_dir: self.root.join("run").join(record.run.to_string()),
            device_config: record.device_config.clone(),
        }
    }

    /// Reserves a new SR: checks its id, creates its folders. The record is written by
    /// [`SrRegistry::put`] once the backend has made the SR.
    pub fn prepare(&self, sr: &str, ty: &str, name_label: &str, name_description: &str, device_config: Map<String>) -> Result<SrRecord, StorageError> {
        safe_component("SR", sr).map_err(|_| StorageError::BackendError("SR_INVALID_ID".into(), vec![sr.into()]))?;
        if self.srs.contains_key(sr) {
            return Err(StorageError::DuplicatedKey(sr.into()));
        }
        let run = (0..).find(|n| !self.srs.values().any(|e| e.record.run == *n)).unwrap_or(0);
        let record = SrRecord {
            sr: sr.into(),
            ty: ty.into(),
            name_label: name_label.into(),
            name_description: name_description.into(),
            device_config,
            attached: false,
            run,
        };
        let ctx = self.context(&record);
        if ctx.dir.exists() {
            // Left behind by a crash during an earlier SR.create of the same id (its record
            // was never written): nothing refers to it.
            std::fs::remove_dir_all(&ctx.dir).map_err(|e| internal("remove stale SR folder", &ctx.dir, e))?;
        }
        std::fs::create_dir_all(&ctx.dir).map_err(|e| internal("create SR folder", &ctx.dir, e))?;
        std::fs::create_dir_all(&ctx.run_dir).map_err(|e| internal("create SR run folder", &ctx.run_dir, e))?;
        Ok(record)
    }

    /// Writes an SR's record (new or changed) and keeps it.
    pub fn put(&mut self, record: SrRecord) -> Result<(), StorageError> {
        let path = self.record_path(&record.sr);
        state::write_json(&path, &record).map_err(|e| internal("write SR record", &path, e))?;
        match self.srs.get_mut(&record.sr) {
            Some(entry) => entry.record = record,
            None => {
                self.srs.insert(record.sr.clone(), SrEntry { record, lock: Arc::default() });
            }
        }
        Ok(())
    }

    /// Forgets an SR: its record first (so a crash leaves at worst an orphan folder, which a
    /// later create of the same id clears), then its folders.
    pub fn remove(&mut self, sr: &str) -> Result<(), StorageError> {
        let Some(entry) = self.srs.get(sr) else { return Ok(()) };
        let ctx = self.context(&entry.record);
        let path = self.record_path(sr);
        state::remove_durably(&path).map_err(|e| internal("remove SR record", &path, e))?;
        self.srs.remove(sr);
        for dir in [&ctx.dir, &ctx.run_dir] {
            if let Err(e) = std::fs::remove_dir_all(dir)
                && e.kind() != io::ErrorKind::NotFound
            {
                tracing::warn!(dir = %dir.display(), error = %e, "could not remove an SR folder");
            }
        }
        Ok(())
    }

    fn record_path(&self, sr: &str) -> PathBuf {
        self.root.join("srs").join(format!("{sr}.json"))
    }
}

fn internal(what: &str, path: &Path, e: io::Error) -> StorageError {
    StorageError::InternalError(format!("{what} {}: {e}", path.display()))
}
