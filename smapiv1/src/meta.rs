//! The SR's metadata: the VHD tree and each visible VDI's record, in one JSON file per SR,
//! [`META_FILE`] in the SR's folder.
//!
//! # Why one record per SR
//!
//! Every change of the tree touches several nodes at once: a snapshot adds a hidden base and a
//! snapshot VDI and moves the VDI onto the base; a compose hides one VDI, re-parents another and
//! drops the second one's old parents; a destroy may drop a chain of hidden parents. With one
//! record per SR each of these is one atomic rename (the engine's
//! [`write_json`](sxm_engine::state::write_json)): a crash leaves the whole old tree or the
//! whole new one, and no intent log is needed to stitch
//! several records together. The price is rewriting the record on each change; an `ext` SR
//! holds hundreds of VDIs at most, a few hundred KB of JSON, against changes that each also
//! create or sync files. Reads take no lock of their own (the mux holds the SR's lock, shared
//! for reads) and see either record, since it is only ever replaced by rename.
//!
//! # What it holds
//!
//! ```text
//! { "version": 1,
//!   "nodes": { "<id>": { "parent": "<id>",          // absent: the base of a tree
//!                        "vdi": { vdi_info … } } } } // absent: a hidden parent
//! ```
//!
//! One node per VHD file `<id>.vhd` in the SR's folder. A node with a `vdi` record is a VDI
//! (its id is the VDI's id); one without is a hidden parent, which only holds data for the VDIs
//! above it. Visible VDIs are always leaves of the tree (snapshot and clone move the VDI's data
//! into a new hidden base; compose hides the VDI it composes onto), so no VDI's writes can ever
//! change what another VDI reads. The `vdi` record is xapi's `vdi_info` in its wire form (the
//! engine's `Marshal`), so every field survives, unknown ones excepted. `virtual_size` and
//! `physical_utilisation` in it are a cache: calls answer what the VHD file says.
//!
//! The tree (`parent`) is the files' tree as of the last change; where the files say otherwise
//! after a crash, the files win ([`crate::recover`]). Ids are checked when the record is read:
//! each is a hyphenated UUID, so a damaged or hostile record cannot name a path outside the SR.

use std::collections::BTreeMap;
use std::ops::{Deref, DerefMut};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sxm_engine::backend::StorageResult;
use sxm_engine::model::{StorageError, VdiInfo};
use sxm_engine::rpc::Value;
use sxm_engine::rpc::marshal::Marshal;
use sxm_engine::state;
use tapmirror::forest::{Forest, Layer, RecordCache};

use crate::errors;

/// The SR's metadata record, in the SR's folder. It starts with `.`, which no VDI id may
/// (`safe_component`), so no id can name it.
pub const META_FILE: &str = ".sxm-ext.json";
/// A VHD file's suffix.
pub const VHD_SUFFIX: &str = ".vhd";
const VERSION: u32 = 1;

/// The last parse of each SR's record.
static CACHE: RecordCache<SrMeta> = RecordCache::new();

#[derive(Serialize, Deserialize)]
struct Record {
    version: u32,
    nodes: BTreeMap<String, NodeRecord>,
}

#[derive(Serialize, Deserialize)]
struct NodeRecord {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    parent: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    vdi: Option<serde_json::Value>,
}

/// One file of the SR: its parent, and its VDI's record (`None` for a hidden one).
pub type Node = Layer<VdiInfo>;

/// The SR's tree of VHD files and its VDIs' records.
///
/// The tree and its walks are tapmirror's [`Forest`] (reached through `Deref`: `nodes`,
/// `children`, `ancestors`, `drop_unused_hidden`, `similar`, the last being
/// `VDI.similar_content`, which approximates "has similar blocks" by the distance in the tree);
/// this adds the record's file.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SrMeta {
    tree: Forest<VdiInfo>,
}

impl Deref for SrMeta {
    type Target = Forest<VdiInfo>;
    fn deref(&self) -> &Forest<VdiInfo> {
        &self.tree
    }
}

impl DerefMut for SrMeta {
    fn deref_mut(&mut self) -> &mut Forest<VdiInfo> {
        &mut self.tree
    }
}

/// The VHD file of node `id` in `dir`. Only for ids that passed [`is_node_id`] (every id in an
/// [`SrMeta`] has).
pub fn vhd_path(dir: &Path, id: &str) -> PathBuf {
    dir.join(format!("{id}{VHD_SUFFIX}"))
}

/// Whether `id` is one this backend makes: a hyphenated UUID, which can only name a file inside
/// the SR's folder.
pub fn is_node_id(id: &str) -> bool {
    id.len() == 36 && uuid::Uuid::try_parse(id).is_ok_and(|u| u.hyphenated().to_string() == id)
}

/// A fresh node id.
pub fn new_id() -> String {
    uuid::Uuid::new_v4().hyphenated().to_string()
}

impl SrMeta {
    /// Where the record of the SR in `dir` lives.
    pub fn path(dir: &Path) -> PathBuf {
        dir.join(META_FILE)
    }

    /// Reads the SR's record; `None` when there is none.
    pub fn load(dir: &Path) -> StorageResult<Option<SrMeta>> {
        let path = Self::path(dir);
        // Reads (VDI.stat, SR.scan) far outnumber changes, and parsing the whole SR's record
        // costs more than the rest of a stat: keep the last parse of each record, valid while
        // the file is the same file. Every save replaces the file by rename (a new inode), so
        // a stale entry can never match.
        CACHE.load(&path, Self::parse)
    }

    fn parse(path: &Path) -> StorageResult<Option<SrMeta>> {
        let path = path.to_owned();
        let record: Record = match state::read_json(&path) {
            Ok(Some(r)) => r,
            Ok(None) => return Ok(None),
            Err(e) => return Err(errors::failure("metadata", format!("reading the SR's metadata: {e}"))),
        };
        let bad = |what: String| errors::failure("metadata", format!("{}: {what}", path.display()));
        if record.version != VERSION {
            return Err(bad(format!("version {} is not {VERSION}", record.version)));
        }
        let mut nodes = BTreeMap::new();
        for (id, n) in record.nodes {
            if !is_node_id(&id) {
                return Err(bad(format!("node id {id:?} is not a UUID")));
            }
            if let Some(p) = &n.parent
                && !is_node_id(p)
            {
                return Err(bad(format!("node {id}: parent {p:?} is not a UUID")));
            }
            let info = match n.vdi {
                None => None,
                Some(json) => {
                    let mut info = VdiInfo::from_value(&Value::from(&json)).map_err(|e| bad(format!("VDI {id}: {e}")))?;
                    info.vdi = id.clone();
                    Some(info)
                }
            };
            nodes.insert(id, Node { parent: n.parent, info });
        }
        let meta = SrMeta { tree: Forest { nodes } };
        meta.check().map_err(bad)?;
        Ok(Some(meta))
    }

    /// [`load`](Self::load), where a missing record is an error (the SR was never created).
    pub fn load_existing(dir: &Path) -> StorageResult<SrMeta> {
        Self::load(dir)?.ok_or_else(|| {
            errors::failure("metadata", format!("{} is missing: the SR was not created", Self::path(dir).display()))
        })
    }

    /// Replaces the SR's record, atomically and durably. A full file system must not stop a
    /// VDI from being destroyed (which is how space is freed): the SR's reserve
    /// ([`state::ensure_reserve`]) gives the record room to be rewritten once.
    pub fn save(&self, dir: &Path) -> StorageResult<()> {
        state::write_json_reserved(&Self::path(dir), &self.record()).map_err(|e| errors::io("writing the SR's metadata", &e))
    }

    /// [`save`](Self::save) for the destroy of leaf node `doomed`, which the record no longer
    /// names: with the reserve spent, the doomed file is buried to make room
    /// ([`state::write_json_freeing`]), and [`recover`](crate::recover) finishes a destroy
    /// cut after that.
    pub fn save_destroying(&self, dir: &Path, doomed: &str) -> StorageResult<()> {
        state::write_json_freeing(&Self::path(dir), &self.record(), &vhd_path(dir, doomed))
            .map_err(|e| errors::io("writing the SR's metadata", &e))
    }

    fn record(&self) -> Record {
        Record {
            version: VERSION,
            nodes: self
                .nodes
                .iter()
                .map(|(id, n)| {
                    let vdi = n.info.as_ref().map(|i| serde_json::Value::from(&i.to_value()));
                    (id.clone(), NodeRecord { parent: n.parent.clone(), vdi })
                })
                .collect(),
        }
    }

    /// The record of visible VDI `id`; `Vdi_does_not_exist` for anything else (a hidden parent
    /// included: it is not a VDI).
    pub fn vdi(&self, id: &str) -> StorageResult<&VdiInfo> {
        self.nodes.get(id).and_then(|n| n.info.as_ref()).ok_or_else(|| StorageError::VdiDoesNotExist(id.to_owned()))
    }

    /// As [`vdi`](Self::vdi), mutable.
    pub fn vdi_mut(&mut self, id: &str) -> StorageResult<&mut VdiInfo> {
        self.nodes.get_mut(id).and_then(|n| n.info.as_mut()).ok_or_else(|| StorageError::VdiDoesNotExist(id.to_owned()))
    }
}

/// Now, as xapi writes VDI times (`YYYYMMDDTHH:MM:SSZ`, UTC).
pub fn now_xapi_time() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    xapi_time(secs)
}

/// `secs` since the epoch as `YYYYMMDDTHH:MM:SSZ`.
fn xapi_time(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's days-to-civil, for the proleptic Gregorian calendar.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}{month:02}{day:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(parent: Option<&str>, visible: bool, id: &str) -> Node {
        Node { parent: parent.map(str::to_owned), info: visible.then(|| VdiInfo::new(id, id)) }
    }

    #[test]
    fn times_are_xapi_dates() {
        assert_eq!(xapi_time(0), sxm_engine::model::NEVER);
        assert_eq!(xapi_time(951_782_400 + 86_399), "20000229T23:59:59Z");
        assert_eq!(xapi_time(1_700_000_000), "20231114T22:13:20Z");
    }

    #[test]
    fn node_ids_are_uuids_only() {
        assert!(is_node_id(&new_id()));
        for bad in ["", "..", "../3f1c0e9a-7a51-4b43-9a57-1d7a1a6c2b1", "3F1C0E9A-7A51-4B43-9A57-1D7A1A6C2B11", "3f1c0e9a7a514b439a571d7a1a6c2b11"] {
            assert!(!is_node_id(bad), "{bad}");
        }
    }

    #[test]
    fn similar_walks_through_hidden_parents_nearest_first() {
        // base ─┬─ a ─┬─ v
        //       │     └─ s1
        //       └─ s2
        // (base and a hidden)
        let ids = ["00000000-0000-4000-8000-000000000001", "00000000-0000-4000-8000-000000000002"];
        let (base, a) = (ids[0], ids[1]);
        let (v, s1, s2) =
            ("00000000-0000-4000-8000-00000000000a", "00000000-0000-4000-8000-00000000000b", "00000000-0000-4000-8000-00000000000c");
        let mut m = SrMeta::default();
        m.nodes.insert(base.into(), node(None, false, base));
        m.nodes.insert(a.into(), node(Some(base), false, a));
        m.nodes.insert(v.into(), node(Some(a), true, v));
        m.nodes.insert(s1.into(), node(Some(a), true, s1));
        m.nodes.insert(s2.into(), node(Some(base), true, s2));
        assert_eq!(m.similar(v), vec![v, s1, s2]);
        assert_eq!(m.similar(s2), vec![s2, v, s1]);
        assert_eq!(m.ancestors(v), vec![a.to_owned(), base.to_owned()]);
        // Destroying v and s1 leaves a without children: a goes, base stays for s2.
        m.nodes.remove(v);
        m.nodes.remove(s1);
        assert_eq!(m.drop_unused_hidden(Some(a.into())), vec![a.to_owned()]);
        assert!(m.nodes.contains_key(base));
        m.nodes.remove(s2);
        assert_eq!(m.drop_unused_hidden(Some(base.into())), vec![base.to_owned()]);
        assert!(m.nodes.is_empty());
    }

    #[test]
    fn records_round_trip_and_bad_ones_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(SrMeta::load(dir.path()).expect("load"), None);
        let mut m = SrMeta::default();
        let (p, c) = (new_id(), new_id());
        m.nodes.insert(p.clone(), node(None, false, &p));
        let mut info = VdiInfo::new(c.clone(), "disk");
        info.sm_config.insert("base_mirror".into(), "sr/vdi".into());
        info.virtual_size = 1 << 20;
        m.nodes.insert(c.clone(), Node { parent: Some(p.clone()), info: Some(info) });
        m.save(dir.path()).expect("save");
        assert_eq!(SrMeta::load(dir.path()).expect("load"), Some(m));
        for bad in [
            r#"{"version": 1, "nodes": {"../etc": {}}}"#.to_owned(),
            format!(r#"{{"version": 1, "nodes": {{"{c}": {{"parent": "{p}"}}}}}}"#),
            format!(r#"{{"version": 1, "nodes": {{"{c}": {{"parent": "{c}"}}}}}}"#),
            r#"{"version": 2, "nodes": {}}"#.to_owned(),
            "{".to_owned(),
        ] {
            std::fs::write(SrMeta::path(dir.path()), &bad).expect("write");
            let e = SrMeta::load(dir.path()).expect_err(&bad);
            assert!(matches!(&e, StorageError::BackendError(code, p) if code == "SR_BACKEND_FAILURE" && p[0] == "metadata"), "{e:?}");
        }
    }
}
