//! The SR's metadata: the tree of qcow2 volumes (each volume's backing) and each visible VDI's
//! record, in one JSON file per SR, [`META_FILE`] in the SR's folder, replaced atomically
//! (the engine's `write_json`) on every change, so a snapshot (a new node, a moved VDI) or a
//! compose (a hidden VDI, a re-parented one, dropped bases) is one rename.
//!
//! ```text
//! { "version": 1,
//!   "nodes": { "<id>": { "parent": "<id>",          // absent: no backing
//!                        "vdi": { vdi_info … } } } } // absent: a hidden base
//! ```
//!
//! One node per file `<id>.qcow2`. Unlike the `ext` SR, a visible VDI may have children: a
//! snapshot is the base of the VDI it was taken of. `virtual_size` and `physical_utilisation`
//! in a record are a cache: calls answer what the qcow2 header says. Ids are checked on read
//! (hyphenated UUIDs), so a damaged record cannot name a path outside the SR. Parsed records
//! are cached per file, valid while the file's stamp (inode, size, mtime) is the same.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sxm_engine::backend::StorageResult;
use sxm_engine::model::{StorageError, VdiInfo};
use sxm_engine::rpc::Value;
use sxm_engine::rpc::marshal::Marshal;
use sxm_engine::state;

use crate::errors;

/// The SR's record, in the SR's folder (starts with `.`, which no VDI id may).
pub const META_FILE: &str = ".sxm-qcow2.json";
/// A volume file's suffix.
pub const SUFFIX: &str = ".qcow2";
const VERSION: u32 = 1;

#[derive(Clone, Copy, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime_ns: i128,
}

impl Stamp {
    fn of(m: &std::fs::Metadata) -> Stamp {
        use std::os::unix::fs::MetadataExt;
        Stamp { dev: m.dev(), ino: m.ino(), len: m.len(), mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()) }
    }
}

type Cache = std::sync::Mutex<std::collections::HashMap<PathBuf, (Stamp, SrMeta)>>;

fn cache() -> &'static Cache {
    static CACHE: std::sync::OnceLock<Cache> = std::sync::OnceLock::new();
    CACHE.get_or_init(Default::default)
}

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

/// One qcow2 volume of the SR.
#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    /// Its backing volume.
    pub parent: Option<String>,
    /// The VDI's record; `None` for a hidden base.
    pub info: Option<VdiInfo>,
}

/// The SR's volumes and its VDIs' records.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SrMeta {
    /// Every volume, by id.
    pub nodes: BTreeMap<String, Node>,
}

/// The volume file of node `id` (an id that passed [`is_node_id`]).
pub fn volume_path(dir: &Path, id: &str) -> PathBuf {
    dir.join(format!("{id}{SUFFIX}"))
}

/// Whether `id` is one this backend makes: a hyphenated lower-case UUID.
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
        let stamp = match std::fs::metadata(&path) {
            Ok(m) => Some(Stamp::of(&m)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(_) => None,
        };
        if let Some(stamp) = stamp
            && let Some(meta) = cache().lock().unwrap_or_else(|p| p.into_inner()).get(&path).filter(|(s, _)| *s == stamp).map(|(_, m)| m.clone())
        {
            return Ok(Some(meta));
        }
        let meta = Self::parse(&path)?;
        if let (Some(stamp), Some(meta)) = (stamp, &meta) {
            cache().lock().unwrap_or_else(|p| p.into_inner()).insert(path.clone(), (stamp, meta.clone()));
        }
        Ok(meta)
    }

    fn parse(path: &Path) -> StorageResult<Option<SrMeta>> {
        let record: Record = match state::read_json(path) {
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
            if !is_node_id(&id) || n.parent.as_deref().is_some_and(|p| !is_node_id(p)) {
                return Err(bad(format!("node {id:?} or its parent is not a UUID")));
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
        let meta = SrMeta { nodes };
        for (id, n) in &meta.nodes {
            if let Some(p) = &n.parent
                && !meta.nodes.contains_key(p)
            {
                return Err(bad(format!("node {id}: parent {p} is not in the record")));
            }
        }
        if let Some(id) = meta.nodes.keys().find(|id| meta.ancestors(id).len() >= meta.nodes.len()) {
            return Err(bad(format!("node {id} is its own ancestor")));
        }
        Ok(Some(meta))
    }

    /// [`load`](Self::load), where a missing record is an error (the SR was never created).
    pub fn load_existing(dir: &Path) -> StorageResult<SrMeta> {
        Self::load(dir)?.ok_or_else(|| errors::failure("metadata", format!("{} is missing: the SR was not created", Self::path(dir).display())))
    }

    /// Replaces the SR's record, atomically and durably.
    pub fn save(&self, dir: &Path) -> StorageResult<()> {
        let record = Record {
            version: VERSION,
            nodes: self
                .nodes
                .iter()
                .map(|(id, n)| {
                    let vdi = n.info.as_ref().map(|i| serde_json::Value::from(&i.to_value()));
                    (id.clone(), NodeRecord { parent: n.parent.clone(), vdi })
                })
                .collect(),
        };
        state::write_json(&Self::path(dir), &record).map_err(|e| errors::io("writing the SR's metadata", &e))
    }

    /// The record of visible VDI `id`; `Vdi_does_not_exist` for anything else.
    pub fn vdi(&self, id: &str) -> StorageResult<&VdiInfo> {
        self.nodes.get(id).and_then(|n| n.info.as_ref()).ok_or_else(|| StorageError::VdiDoesNotExist(id.to_owned()))
    }

    /// As [`vdi`](Self::vdi), mutable.
    pub fn vdi_mut(&mut self, id: &str) -> StorageResult<&mut VdiInfo> {
        self.nodes.get_mut(id).and_then(|n| n.info.as_mut()).ok_or_else(|| StorageError::VdiDoesNotExist(id.to_owned()))
    }

    /// The nodes whose parent is `id`, in id order.
    pub fn children(&self, id: &str) -> Vec<&str> {
        self.nodes.iter().filter(|(_, n)| n.parent.as_deref() == Some(id)).map(|(c, _)| c.as_str()).collect()
    }

    /// `id`'s parent, its parent's parent, … (bounded, so a loop cannot hang).
    pub fn ancestors(&self, id: &str) -> Vec<String> {
        let mut out = Vec::new();
        let mut cur = self.nodes.get(id).and_then(|n| n.parent.clone());
        while let Some(p) = cur {
            if out.len() > self.nodes.len() {
                break;
            }
            cur = self.nodes.get(&p).and_then(|n| n.parent.clone());
            out.push(p);
        }
        out
    }

    /// Removes, from `id` up, every hidden node without children; answers the ids removed.
    pub fn drop_unused_hidden(&mut self, id: Option<String>) -> Vec<String> {
        let mut removed = Vec::new();
        let mut cur = id;
        while let Some(p) = cur {
            if !(self.nodes.get(&p).is_some_and(|n| n.info.is_none()) && self.children(&p).is_empty()) {
                break;
            }
            cur = self.nodes.remove(&p).and_then(|n| n.parent);
            removed.push(p);
        }
        removed
    }

    /// Every visible VDI reachable from `id` through the tree, nearest first, `id` first
    /// (equal distances in id order): `VDI.similar_content`.
    pub fn similar(&self, id: &str) -> Vec<String> {
        let mut seen = BTreeSet::from([id.to_owned()]);
        let mut level = vec![id.to_owned()];
        let mut out = Vec::new();
        while !level.is_empty() {
            level.sort();
            out.extend(level.iter().filter(|n| self.nodes.get(n.as_str()).is_some_and(|n| n.info.is_some())).cloned());
            let mut next = Vec::new();
            for cur in &level {
                let parent = self.nodes.get(cur).and_then(|n| n.parent.clone());
                for n in self.children(cur).into_iter().map(str::to_owned).chain(parent) {
                    if seen.insert(n.clone()) {
                        next.push(n);
                    }
                }
            }
            level = next;
        }
        out
    }
}

/// Now, as xapi writes VDI times (`YYYYMMDDTHH:MM:SSZ`, UTC).
pub fn now_xapi_time() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's days-to-civil.
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
