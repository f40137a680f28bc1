//! Datapaths: which VDI each datapath has attached or activated, read-only or read-write
//! (xapi's `Vdi_automaton`). A VDI's combined state over its datapaths (the "superstate") is
//! what its backend sees: the first datapath to attach a VDI attaches it, the last to leave
//! detaches it. The table is one JSON file, `<root>/state/datapaths.json`, rewritten atomically
//! after each transition, so a restarted host knows what should be attached.

use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::model::{Rw, StorageError, VdiState};
use crate::state;

/// One datapath's hold on one VDI.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct DpRecord {
    /// The datapath.
    pub dp: String,
    /// The VDI's SR.
    pub sr: String,
    /// The VDI.
    pub vdi: String,
    /// Attached read-write.
    pub read_write: bool,
    /// Activated.
    pub active: bool,
    /// The VM (domain slice) it was attached for.
    #[serde(default)]
    pub vm: String,
}

impl DpRecord {
    /// The record's state as the interface names it.
    pub fn state(&self) -> VdiState {
        let rw = if self.read_write { Rw::Rw } else { Rw::Ro };
        if self.active { VdiState::Activated(rw) } else { VdiState::Attached(rw) }
    }
}

/// The combination of several datapaths' states: the strongest of each.
pub fn superstate<'a>(states: impl IntoIterator<Item = &'a DpRecord>) -> VdiState {
    let (mut any, mut rw, mut active) = (false, false, false);
    for r in states {
        any = true;
        rw |= r.read_write;
        active |= r.active;
    }
    let mode = if rw { Rw::Rw } else { Rw::Ro };
    match (any, active) {
        (false, _) => VdiState::Detached,
        (true, false) => VdiState::Attached(mode),
        (true, true) => VdiState::Activated(mode),
    }
}

/// Every datapath record of the host.
pub struct Datapaths {
    path: PathBuf,
    records: Vec<DpRecord>,
}

impl Datapaths {
    /// Loads the table.
    pub fn load(root: &Path) -> io::Result<Datapaths> {
        let dir = root.join("state");
        std::fs::create_dir_all(&dir)?;
        state::remove_temporaries(&dir)?;
        state::ensure_reserve(&dir);
        let path = dir.join("datapaths.json");
        let records = match state::read_json(&path)? {
            Some(r) => r,
            None => {
                // Written at once, so the table is a file from the host's first start on.
                state::write_json(&path, &Vec::<DpRecord>::new())?;
                Vec::new()
            }
        };
        Ok(Datapaths { path, records })
    }

    /// The records of one VDI.
    pub fn of_vdi<'a>(&'a self, sr: &'a str, vdi: &'a str) -> impl Iterator<Item = &'a DpRecord> + 'a {
        self.records.iter().filter(move |r| r.sr == sr && r.vdi == vdi)
    }

    /// The records of one SR.
    pub fn of_sr<'a>(&'a self, sr: &'a str) -> impl Iterator<Item = &'a DpRecord> + 'a {
        self.records.iter().filter(move |r| r.sr == sr)
    }

    /// The records of one datapath.
    pub fn of_dp<'a>(&'a self, dp: &'a str) -> impl Iterator<Item = &'a DpRecord> + 'a {
        self.records.iter().filter(move |r| r.dp == dp)
    }

    /// One datapath's record for one VDI.
    pub fn get(&self, dp: &str, sr: &str, vdi: &str) -> Option<&DpRecord> {
        self.records.iter().find(|r| r.dp == dp && r.sr == sr && r.vdi == vdi)
    }

    /// Inserts or replaces a record, persisting the table.
    pub fn put(&mut self, record: DpRecord) -> Result<(), StorageError> {
        let mut next = self.records.clone();
        match next.iter_mut().find(|r| r.dp == record.dp && r.sr == record.sr && r.vdi == record.vdi) {
            Some(r) => *r = record,
            None => next.push(record),
        }
        self.commit(next)
    }

    /// Removes a record, persisting the table.
    pub fn remove(&mut self, dp: &str, sr: &str, vdi: &str) -> Result<(), StorageError> {
        let next = self.records.iter().filter(|r| !(r.dp == dp && r.sr == sr && r.vdi == vdi)).cloned().collect();
        self.commit(next)
    }

    fn commit(&mut self, next: Vec<DpRecord>) -> Result<(), StorageError> {
        // Written before the in-memory table changes: a failed write leaves both as they were.
        // With the state folder's reserve: on a full file system a detach must still be
        // recorded, or no disk could be let go until someone frees space by hand.
        state::write_json_reserved(&self.path, &next).map_err(|e| StorageError::InternalError(format!("write datapath table: {e}")))?;
        self.records = next;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(dp: &str, rw: bool, active: bool) -> DpRecord {
        DpRecord { dp: dp.into(), sr: "sr".into(), vdi: "v".into(), read_write: rw, active, vm: "0".into() }
    }

    #[test]
    fn superstate_is_the_strongest_of_each() {
        assert_eq!(superstate(&[]), VdiState::Detached);
        assert_eq!(superstate(&[rec("a", false, false)]), VdiState::Attached(Rw::Ro));
        assert_eq!(superstate(&[rec("a", false, true), rec("b", true, false)]), VdiState::Activated(Rw::Rw));
    }

    #[test]
    fn the_table_survives_a_reload() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut t = Datapaths::load(dir.path()).expect("load");
        t.put(rec("a", true, false)).expect("put");
        t.put(rec("a", true, true)).expect("replace");
        t.put(rec("b", false, false)).expect("put");
        t.remove("b", "sr", "v").expect("remove");
        let t = Datapaths::load(dir.path()).expect("reload");
        assert_eq!(t.of_vdi("sr", "v").cloned().collect::<Vec<_>>(), vec![rec("a", true, true)]);
    }
}
