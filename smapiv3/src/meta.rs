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

/// The SR's record, in the SR's folder (starts with `.`, which no VDI id may).
pub const META_FILE: &str = ".sxm-qcow2.json";
/// A volume file's suffix.
pub const SUFFIX: &str = ".qcow2";
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

/// The SR's volumes and its VDIs' records.
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
        CACHE.load(&path, Self::parse)
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
        let meta = SrMeta { tree: Forest { nodes } };
        meta.check().map_err(bad)?;
        Ok(Some(meta))
    }

    /// [`load`](Self::load), where a missing record is an error (the SR was never created).
    pub fn load_existing(dir: &Path) -> StorageResult<SrMeta> {
        Self::load(dir)?.ok_or_else(|| errors::failure("metadata", format!("{} is missing: the SR was not created", Self::path(dir).display())))
    }

    /// Replaces the SR's record, atomically and durably. A full file system must not stop a
    /// VDI from being destroyed (which is how space is freed): the SR's reserve
    /// ([`state::ensure_reserve`]) gives the record room to be rewritten once.
    pub fn save(&self, dir: &Path) -> StorageResult<()> {
        state::write_json_reserved(&Self::path(dir), &self.record()).map_err(|e| errors::io("writing the SR's metadata", &e))
    }

    /// [`save`](Self::save) for the destroy of leaf node `doomed`, which the record no longer
    /// names: with the reserve spent, the doomed volume is buried to make room
    /// ([`state::write_json_freeing`]), and [`recover`](crate::recover) finishes a destroy
    /// cut after that.
    pub fn save_destroying(&self, dir: &Path, doomed: &str) -> StorageResult<()> {
        state::write_json_freeing(&Self::path(dir), &self.record(), &volume_path(dir, doomed))
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

    /// The record of visible VDI `id`; `Vdi_does_not_exist` for anything else.
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
