//! The persisted record of every send (source), receive (destination) and copy, one JSON file
//! each under `<root>/state/{send,recv,copy,job}/`. A record is written before the side effect it
//! announces, and updated after each stage, so a restarted host knows what exists and can
//! finish or undo it (`../shared/DESIGN.md`, "State and recovery"; xapi's `Send_state`,
//! `Receive_state`, `Copy_state`).

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde::de::DeserializeOwned;

use crate::model::StorageError;
use crate::state;

/// Where a send stands. Each stage's record is written before the stage's side effects.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SendStage {
    /// Asking the destination to prepare (`receive_start2`).
    Prepare,
    /// Connecting the mirror to the destination's leaf.
    PassFds,
    /// Snapshotting the source.
    Snapshot,
    /// Copying the snapshot into the destination's parent.
    Copy,
    /// A full mirror (SMAPIv3) copying everything while it mirrors new writes, until ready.
    FullMirror,
    /// The copy is done: the mirror runs until finalize.
    Mirroring,
    /// The source VDI is deactivated and its mirror detached: the destination is told to
    /// finalize, and the record goes once it has.
    Finalizing,
}

impl SendStage {
    /// Still in the task that starts the mirror (which rolls it back on failure).
    pub fn is_starting(self) -> bool {
        !matches!(self, SendStage::Mirroring | SendStage::Finalizing)
    }
}

/// What the destination prepared.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct RemoteInfo {
    /// The destination leaf that takes mirrored writes.
    pub leaf: String,
    /// The destination datapath holding the leaf.
    pub leaf_dp: String,
    /// The destination parent that takes the copy.
    pub parent: String,
    /// The content_id the parent was cloned from, when it was.
    pub copy_diffs_from: Option<String>,
    /// The destination's dummy snapshot.
    pub dummy: String,
}

/// One VDI being sent (source side).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct SendRecord {
    /// The mirror's id, `<sr>/<vdi>`.
    pub id: String,
    /// The source SR.
    pub sr: String,
    /// The source VDI.
    pub vdi: String,
    /// The source datapath (the guest's).
    pub dp: String,
    /// The destination host's URL (with its secret).
    pub url: String,
    /// The destination SR.
    pub dest_sr: String,
    /// The destination VM slice for the mirror's datapath.
    pub mirror_vm: String,
    /// The destination VM slice for the copy's datapath.
    pub copy_vm: String,
    /// Where it stands.
    pub stage: SendStage,
    /// What the destination prepared, once it has.
    pub remote: Option<RemoteInfo>,
    /// The source snapshot being copied, once taken.
    pub snapshot: Option<String>,
    /// The destination datapath the copy writes through, while it exists.
    pub copy_dp: Option<String>,
    /// The task following the send.
    pub task: String,
    /// The mirror's target failed.
    pub failed: bool,
    /// Why, when the datapath said (the target's error, its silence, the process's death).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
    /// The SMAPIv3 procedure: one full mirror into a single destination volume (no
    /// snapshot, copy or compose).
    #[serde(default)]
    pub full_mirror: bool,
    /// Undone here, but the destination could not be told (it was unreachable): the record
    /// stays, and `receive_cancel` is retried until the destination has undone its side.
    #[serde(default)]
    pub cancelling: bool,
    /// A `stop` is taking it down: its mirror going away is that, not a failure. Never
    /// persisted: after a restart no stop is under way.
    #[serde(skip)]
    pub stopping: bool,
}

/// Where a receive stands.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RecvStage {
    /// `receive_start` is making the leaf, dummy and parent.
    Preparing,
    /// Everything is made; the source mirrors and copies into it.
    Receiving,
}

/// One VDI being received (destination side).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct RecvRecord {
    /// The mirror's id, `<source sr>/<source vdi>`.
    pub id: String,
    /// The destination SR.
    pub sr: String,
    /// The source VDI.
    pub remote_vdi: String,
    /// The VM slice the leaf's datapath was attached for.
    pub mirror_vm: String,
    /// Where it stands.
    pub stage: RecvStage,
    /// The leaf, once made.
    pub leaf: Option<String>,
    /// The leaf's datapath, once attached.
    pub leaf_dp: Option<String>,
    /// The dummy snapshot, once made.
    pub dummy: Option<String>,
    /// The parent, once made.
    pub parent: Option<String>,
    /// Whether the source's mirror connection has reached the leaf (`PUT /services/SM/nbd/…`):
    /// until it has, a finalize would make a VDI of a leaf nothing was mirrored into. `None`
    /// in records written before it was kept (taken as reached).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirrored: Option<bool>,
}

/// Where a copy stands.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum CopyStage {
    /// Making the destination VDI.
    Prepare,
    /// Copying into it.
    Copy,
    /// Failed; the destination has yet to let go of what the copy made there (it could not
    /// be reached): retried until it does.
    Undoing,
}

/// One `DATA.copy` (source side).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct CopyRecord {
    // While `Undoing`, its id is `undo/<task>`, so that a new copy of the same VDI (whose id
    // is `copy/<sr>/<vdi>`) never takes over a pending undo.
    /// `copy/<sr>/<vdi>`.
    pub id: String,
    /// The source SR.
    pub sr: String,
    /// The source VDI.
    pub vdi: String,
    /// The destination host's URL.
    pub url: String,
    /// The destination SR.
    pub dest_sr: String,
    /// Where it stands.
    pub stage: CopyStage,
    /// The destination VDI, once made.
    pub dest_vdi: Option<String>,
    /// The destination datapath the copy writes through, once attached.
    pub dest_dp: Option<String>,
    /// The task following the copy.
    pub task: String,
    /// Whether the destination may hold something of the copy's: set before the copy first
    /// asks it to make a VDI. A copy that failed before (the destination unreachable, or
    /// refusing the secret) has nothing there to undo; its record, which holds the secret, used
    /// to be kept and retried for an hour. Records from before the field was kept say yes.
    #[serde(default = "may_have_made")]
    pub may_have_made: bool,
}

fn may_have_made() -> bool {
    true
}

/// Where a job (`SXM.migrate.start`) stands, for a restarted host to undo what it was doing.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum JobStage {
    /// Its disks are being brought in sync, or held there: the guest runs on the source.
    Mirroring,
    /// The switch-over has begun: the source disks may be deactivated (the guest paused) and
    /// the destination copies finalized.
    Switching,
    /// Done or undone ([`JobRecord::outcome`] says which): kept for an hour, so that its task
    /// says how it ended after a restart too.
    Ended,
}

/// One disk of a job.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct JobDisk {
    /// The source VDI.
    pub vdi: String,
    /// The guest's datapath holding it here.
    pub dp: String,
    /// The destination VDI that becomes the disk, once the disk is in sync: kept here because
    /// the mirror's own record goes when the destination finalizes it.
    pub dest_vdi: Option<String>,
    /// Its SR here and its SR on the destination; empty in records written before a job's
    /// disks could lie on several SRs, which [`JobRecord::placed`] fills with the job's.
    #[serde(default)]
    pub sr: String,
    #[serde(default)]
    pub dest_sr: String,
}

/// One migration job (source side), for a restarted host to take up again. The job itself
/// (its waits, its switch-over) dies with the process; from its record the restarted host
/// resumes a job whose disks were still being brought in sync (their mirrors ran on in their
/// datapaths), or undoes one whose switch-over had begun (the guest's disks back here, the
/// copies off the destination), and answers the job's task with what happened.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct JobRecord {
    /// The job's task.
    pub id: String,
    /// The task's description.
    pub dbg: String,
    /// The job's source SR (`sr`); each disk's own is in its [`JobDisk`].
    pub sr: String,
    /// The destination host's URL (with its secret).
    pub url: String,
    /// The job's destination SR (`dest`); each disk's own is in its [`JobDisk`].
    pub dest_sr: String,
    /// Where it stands.
    pub stage: JobStage,
    /// Its disks, in the job's order.
    pub disks: Vec<JobDisk>,
    /// How many disks mirror at once.
    pub parallel: i64,
    /// The bandwidth limit its disks' copies share (bytes per second, 0: none), as last set.
    pub bwlimit: i64,
    /// Held in sync until `SXM.migrate.cutover`.
    pub hold: bool,
    /// Checksums compared before the switch-over ends.
    pub verify: bool,
    /// The job's progress as last recorded (every hundredth), which its task takes up again
    /// after a restart.
    #[serde(default)]
    pub progress: f64,
    /// How it ended, once it has.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<JobOutcome>,
    /// When its task was made (seconds since the epoch), which the task keeps after a restart.
    #[serde(default)]
    pub ctime: f64,
    /// Its switch-over had reached the verification (the stage a restart's undo names).
    #[serde(default)]
    pub verifying: bool,
    /// A held job was told to switch over (`SXM.migrate.cutover`).
    #[serde(default)]
    pub cutover_asked: bool,
    /// The job was cancelled (`TASK.cancel`): a restart during the cancel's undo finishes the
    /// undo, rather than resume the job the operator cancelled.
    #[serde(default)]
    pub cancel_asked: bool,
}

impl JobRecord {
    /// The record with each disk's SRs filled in: a disk without them (a record written
    /// before disks could lie on several SRs) is on the job's source SR, going to its
    /// destination SR.
    pub fn placed(mut self) -> JobRecord {
        for d in &mut self.disks {
            if d.sr.is_empty() {
                d.sr = self.sr.clone();
            }
            if d.dest_sr.is_empty() {
                d.dest_sr = self.dest_sr.clone();
            }
        }
        self
    }
}

/// How a job ended.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct JobOutcome {
    /// The storage error it failed with, as the interface marshals it; `None`: it completed.
    pub error: Option<serde_json::Value>,
    /// Its task's `debug_info` as it ended (the destination VDIs and their URIs, what was
    /// verified, the stage).
    pub info: BTreeMap<String, String>,
    /// Its disks' subtasks as it ended (name, state as the interface marshals it).
    #[serde(default)]
    pub subtasks: Vec<(String, serde_json::Value)>,
    /// When (seconds since the epoch).
    pub ended: u64,
}

/// One kind of record, in its folder.
pub struct Table<T> {
    dir: PathBuf,
    records: BTreeMap<String, T>,
}

/// A record's file name: a hash of its id (ids hold `/`), the id itself is inside.
fn file_name(id: &str) -> String {
    // FNV-1a, 64 bits: stable across versions, unlike std's hasher.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in id.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}.json")
}

/// A record that knows its id.
pub trait Keyed {
    /// The record's id.
    fn key(&self) -> &str;
}

impl Keyed for SendRecord {
    fn key(&self) -> &str {
        &self.id
    }
}
impl Keyed for RecvRecord {
    fn key(&self) -> &str {
        &self.id
    }
}
impl Keyed for CopyRecord {
    fn key(&self) -> &str {
        &self.id
    }
}
impl Keyed for JobRecord {
    fn key(&self) -> &str {
        &self.id
    }
}

impl CopyRecord {
    /// The mark (`sm_config["base_mirror"]`) on every VDI this copy makes at the destination:
    /// its own, not the VDI's, so the undo of one copy never touches another copy's VDIs.
    pub fn mark(&self) -> String {
        format!("copy/{}/{}/{}", self.sr, self.vdi, self.task)
    }
}

impl<T: Keyed + Serialize + DeserializeOwned + Clone> Table<T> {
    /// Loads every record in `dir` (created if missing). An unreadable record is logged and
    /// left in place for a person to look at; it is not acted on.
    pub fn load(dir: &Path) -> io::Result<Table<T>> {
        std::fs::create_dir_all(dir)?;
        state::remove_temporaries(dir)?;
        let mut records = BTreeMap::new();
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            match state::read_json::<T>(&path) {
                Ok(Some(r)) => {
                    records.insert(r.key().to_owned(), r);
                }
                Ok(None) => {}
                Err(e) => tracing::error!(path = %path.display(), error = %e, "unreadable migration record; ignored"),
            }
        }
        Ok(Table { dir: dir.to_owned(), records })
    }

    /// One record.
    pub fn get(&self, id: &str) -> Option<&T> {
        self.records.get(id)
    }

    /// Every record.
    pub fn all(&self) -> impl Iterator<Item = &T> {
        self.records.values()
    }

    /// Writes a record (new or changed), durably, then keeps it.
    pub fn put(&mut self, record: T) -> Result<(), StorageError> {
        let path = self.dir.join(file_name(record.key()));
        state::write_json(&path, &record).map_err(|e| StorageError::InternalError(format!("write migration record {}: {e}", record.key())))?;
        self.records.insert(record.key().to_owned(), record);
        Ok(())
    }

    /// Removes a record durably.
    pub fn remove(&mut self, id: &str) -> Result<(), StorageError> {
        let path = self.dir.join(file_name(id));
        state::remove_durably(&path).map_err(|e| StorageError::InternalError(format!("remove migration record {id}: {e}")))?;
        self.records.remove(id);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_survive_a_reload_and_file_names_are_stable() {
        assert_eq!(file_name("sr/vdi"), file_name("sr/vdi"));
        assert_ne!(file_name("sr/vdi"), file_name("sr/vdj"));
        let dir = tempfile::tempdir().expect("tempdir");
        let mut t: Table<RecvRecord> = Table::load(dir.path()).expect("load");
        let r = RecvRecord {
            id: "a/b".into(),
            sr: "d".into(),
            remote_vdi: "b".into(),
            mirror_vm: "0".into(),
            stage: RecvStage::Preparing,
            leaf: Some("l".into()),
            leaf_dp: None,
            dummy: None,
            parent: None,
            mirrored: Some(false),
        };
        t.put(r.clone()).expect("put");
        let t2: Table<RecvRecord> = Table::load(dir.path()).expect("reload");
        assert_eq!(t2.get("a/b"), Some(&r));
        let mut t2 = t2;
        t2.remove("a/b").expect("remove");
        assert!(Table::<RecvRecord>::load(dir.path()).expect("reload").get("a/b").is_none());
    }

    /// A job recorded before its disks could lie on several SRs loads, each disk on the job's
    /// SRs; a disk that names its own keeps them.
    #[test]
    fn a_job_record_without_disk_srs_places_its_disks_on_the_jobs() {
        let old = r#"{"id":"j","dbg":"d","sr":"s1","url":"u","dest_sr":"d1","stage":"mirroring",
            "disks":[{"vdi":"a","dp":"p","dest_vdi":null},{"vdi":"b","dp":"q","dest_vdi":"x","sr":"s2","dest_sr":"d2"}],
            "parallel":2,"bwlimit":0,"hold":false,"verify":false}"#;
        let r: JobRecord = serde_json::from_str(old).expect("an old record loads");
        let placed: Vec<(String, String)> = r.placed().disks.into_iter().map(|d| (d.sr, d.dest_sr)).collect();
        assert_eq!(placed, [("s1".to_owned(), "d1".to_owned()), ("s2".to_owned(), "d2".to_owned())]);
    }
}
