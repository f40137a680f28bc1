//! A forest of layered images as their owner records it, and a cache of parsed record files.
//!
//! An image chain (a differencing VHD on its parent, a qcow2 overlay on its backing file) is
//! one path of a tree: several images may read through the same parent. Whoever keeps many
//! such images in one folder records the tree: each image's id, its parent's id, and, for the
//! images it shows to its users, a record of its own (`info`); an image without one is a
//! hidden layer that only holds data for the images above it. [`Forest`] is that tree with
//! the walks both of sxm's storage backends need (children, ancestors, dropping hidden layers
//! nobody reads through, nearest visible relatives), generic over the record, so it knows
//! nothing of what a record says. It lives here, with the image drivers whose chains it
//! describes, because it is the same for every image format, and the backends may not share
//! code with each other.
//!
//! [`RecordCache`] keeps the last parse of each record file, valid while the file is the same
//! file: callers that replace their record by rename (a new inode) can never get a stale one.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock, PoisonError};

/// One image of a [`Forest`].
#[derive(Clone, Debug, PartialEq)]
pub struct Layer<T> {
    /// The image it reads through.
    pub parent: Option<String>,
    /// Its owner's record; `None` for a hidden layer.
    pub info: Option<T>,
}

/// Images by id, each with its parent.
#[derive(Clone, Debug, PartialEq)]
pub struct Forest<T> {
    /// Every image, by id.
    pub nodes: BTreeMap<String, Layer<T>>,
}

impl<T> Default for Forest<T> {
    fn default() -> Self {
        Forest { nodes: BTreeMap::new() }
    }
}

impl<T> Forest<T> {
    /// The images whose parent is `id`, in id order.
    pub fn children(&self, id: &str) -> Vec<&str> {
        self.nodes.iter().filter(|(_, n)| n.parent.as_deref() == Some(id)).map(|(c, _)| c.as_str()).collect()
    }

    /// `id`'s parent, its parent's parent, … (bounded by the number of images, so a loop in a
    /// damaged record cannot hang).
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

    /// Removes, starting at `id` and going up, every hidden image that no longer has a child;
    /// answers the ids removed (their files are now garbage).
    pub fn drop_unused_hidden(&mut self, id: Option<String>) -> Vec<String> {
        let mut removed = Vec::new();
        let mut cur = id;
        while let Some(p) = cur {
            let unused = self.nodes.get(&p).is_some_and(|n| n.info.is_none()) && self.children(&p).is_empty();
            if !unused {
                break;
            }
            cur = self.nodes.remove(&p).and_then(|n| n.parent);
            removed.push(p);
        }
        removed
    }

    /// The visible leaf `hidden` is left holding up alone, if `hidden` is a hidden image with
    /// exactly one child and that child is visible and has no children: the pair a coalesce
    /// folds into one image (the child's data into `hidden`'s file, which takes the child's
    /// place).
    pub fn lone_child(&self, hidden: &str) -> Option<String> {
        let child = self.only_child(hidden)?;
        (self.nodes.get(&child)?.info.is_some() && self.children(&child).is_empty()).then_some(child)
    }

    /// `hidden`'s one child, whatever it is, if `hidden` is a hidden image with exactly one
    /// child: for formats whose children name their parent by file name only (qcow2), where
    /// `hidden`'s file can take the child's place under it too.
    pub fn only_child(&self, hidden: &str) -> Option<String> {
        if self.nodes.get(hidden)?.info.is_some() {
            return None;
        }
        let [child] = self.children(hidden)[..] else { return None };
        Some(child.to_owned())
    }

    /// Every hidden image with exactly one child, in id order: the pairs a coalesce may fold.
    pub fn hidden_with_one_child(&self) -> Vec<String> {
        self.nodes.keys().filter(|id| self.only_child(id).is_some()).cloned().collect()
    }

    /// `hidden`'s one child, if `hidden` is hidden, has exactly one child, and that child is
    /// hidden too: a pair whose child's data can be folded into `hidden` and the child's own
    /// children put on `hidden` (see [`Forest::fold_into_parent`]).
    pub fn hidden_only_child(&self, hidden: &str) -> Option<String> {
        let child = self.only_child(hidden)?;
        self.nodes.get(&child)?.info.is_none().then_some(child)
    }

    /// Records that `child`'s children now read through its parent `parent`, and `child`
    /// leaves the forest.
    pub fn fold_into_parent(&mut self, parent: &str, child: &str) {
        let grandchildren: Vec<String> = self.children(child).into_iter().map(str::to_owned).collect();
        for g in grandchildren {
            if let Some(n) = self.nodes.get_mut(&g) {
                n.parent = Some(parent.to_owned());
            }
        }
        self.nodes.remove(child);
    }

    /// Records a coalesce of `hidden` and its lone child `child`: `hidden` leaves the forest,
    /// and `child` reads through what `hidden` read through.
    pub fn fold_into_child(&mut self, hidden: &str, child: &str) {
        let grandparent = self.nodes.remove(hidden).and_then(|n| n.parent);
        if let Some(n) = self.nodes.get_mut(child) {
            n.parent = grandparent;
        }
    }

    /// Every visible image reachable from `id` through the tree (hidden layers included in the
    /// walk, not in the answer), nearest first, `id` itself first. Equal distances go in id
    /// order.
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

    /// Checks that every parent is in the forest and no image is its own ancestor; `Err` says
    /// which is not.
    pub fn check(&self) -> Result<(), String> {
        for (id, n) in &self.nodes {
            if let Some(p) = &n.parent
                && !self.nodes.contains_key(p)
            {
                return Err(format!("node {id}: parent {p} is not in the record"));
            }
        }
        if let Some(id) = self.nodes.keys().find(|id| self.ancestors(id).len() >= self.nodes.len()) {
            return Err(format!("node {id} is its own ancestor"));
        }
        Ok(())
    }
}

/// Identifies one version of a file: a replaced file gets a new inode.
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


/// Calls `fold` on each hidden image with exactly one child, reading the forest again (`load`)
/// after each fold, which changes it, until every such image left has been tried once (a
/// pair the fold leaves as it is, too big or a reset point, must not loop).
pub fn fold_lone_pairs<T, F: std::ops::Deref<Target = Forest<T>>>(mut load: impl FnMut() -> Option<F>, mut fold: impl FnMut(&str)) {
    let mut tried = BTreeSet::new();
    loop {
        let Some(forest) = load() else { return };
        let Some(hidden) = forest.hidden_with_one_child().into_iter().find(|h| !tried.contains(h)) else { return };
        drop(forest);
        tried.insert(hidden.clone());
        fold(&hidden);
    }
}

/// The last parse of each record file, by path, valid while the file's stamp (device, inode,
/// size, modification time) is the same. For a `static`: [`RecordCache::new`] is `const`.
pub struct RecordCache<T> {
    map: OnceLock<Mutex<HashMap<PathBuf, (Stamp, T)>>>,
}

impl<T> Default for RecordCache<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> RecordCache<T> {
    /// Empty.
    pub const fn new() -> Self {
        RecordCache { map: OnceLock::new() }
    }
}

impl<T: Clone> RecordCache<T> {

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<PathBuf, (Stamp, T)>> {
        self.map.get_or_init(Default::default).lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The record at `path`: the cached parse if the file is the one parsed, else `parse`'s
    /// answer (kept when the file could be stamped). `None` when there is no file.
    pub fn load<E>(&self, path: &Path, parse: impl FnOnce(&Path) -> Result<Option<T>, E>) -> Result<Option<T>, E> {
        let stamp = match std::fs::metadata(path) {
            Ok(m) => Some(Stamp::of(&m)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(_) => None,
        };
        if let Some(stamp) = stamp
            && let Some(record) = self.map().get(path).filter(|(s, _)| *s == stamp).map(|(_, r)| r.clone())
        {
            return Ok(Some(record));
        }
        let record = parse(path)?;
        if let (Some(stamp), Some(record)) = (stamp, &record) {
            self.map().insert(path.to_owned(), (stamp, record.clone()));
        }
        Ok(record)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(parent: Option<&str>, visible: bool) -> Layer<()> {
        Layer { parent: parent.map(str::to_owned), info: visible.then_some(()) }
    }

    #[test]
    fn walks_and_checks() {
        // base ─┬─ a ─┬─ v
        //       │     └─ s1
        //       └─ s2        (base and a hidden)
        let mut f = Forest::default();
        f.nodes.insert("base".into(), layer(None, false));
        f.nodes.insert("a".into(), layer(Some("base"), false));
        f.nodes.insert("v".into(), layer(Some("a"), true));
        f.nodes.insert("s1".into(), layer(Some("a"), true));
        f.nodes.insert("s2".into(), layer(Some("base"), true));
        assert_eq!(f.check(), Ok(()));
        assert_eq!(f.similar("v"), vec!["v", "s1", "s2"]);
        assert_eq!(f.ancestors("v"), vec!["a".to_owned(), "base".to_owned()]);
        f.nodes.remove("v");
        f.nodes.remove("s1");
        assert_eq!(f.drop_unused_hidden(Some("a".into())), vec!["a".to_owned()]);
        f.nodes.insert("x".into(), layer(Some("y"), true));
        assert!(f.check().is_err());
        f.nodes.insert("y".into(), layer(Some("x"), true));
        assert!(f.check().is_err());
    }

    #[test]
    fn a_hidden_layer_with_one_visible_leaf_folds_into_it() {
        // base ─ a ─┬─ v        (base and a hidden)
        //           └─ s
        let mut f = Forest::default();
        f.nodes.insert("base".into(), layer(None, false));
        f.nodes.insert("a".into(), layer(Some("base"), false));
        f.nodes.insert("v".into(), layer(Some("a"), true));
        f.nodes.insert("s".into(), layer(Some("a"), true));
        assert_eq!(f.lone_child("a"), None, "two children");
        f.nodes.remove("s");
        assert_eq!(f.lone_child("a"), Some("v".to_owned()));
        assert_eq!(f.lone_child("base"), None, "its one child is hidden");
        assert_eq!(f.lone_child("v"), None, "visible");
        f.fold_into_child("a", "v");
        assert_eq!(f.nodes.get("v"), Some(&layer(Some("base"), true)));
        assert!(!f.nodes.contains_key("a"));
        assert_eq!(f.check(), Ok(()));
        // A visible child that others read through is no leaf to fold into.
        f.nodes.insert("w".into(), layer(Some("v"), true));
        f.nodes.get_mut("v").expect("v").info = None;
        assert_eq!(f.lone_child("v"), Some("w".to_owned()));
        f.nodes.insert("u".into(), layer(Some("w"), true));
        assert_eq!(f.lone_child("v"), None, "w has a child");
    }

    #[test]
    fn a_hidden_layer_with_one_child_of_any_kind_is_found_and_folded() {
        // b1 ─ b2 ─┬─ v      (b1, b2 hidden)
        //          └─ s2
        let mut f = Forest::default();
        f.nodes.insert("b1".into(), layer(None, false));
        f.nodes.insert("b2".into(), layer(Some("b1"), false));
        f.nodes.insert("v".into(), layer(Some("b2"), true));
        f.nodes.insert("s2".into(), layer(Some("b2"), true));
        assert_eq!(f.only_child("b1"), Some("b2".to_owned()));
        assert_eq!(f.hidden_only_child("b1"), Some("b2".to_owned()));
        assert_eq!(f.only_child("b2"), None, "two children");
        assert_eq!(f.lone_child("b1"), None, "its child is hidden");
        f.fold_into_parent("b1", "b2");
        assert_eq!((f.nodes.get("v"), f.nodes.get("s2")), (Some(&layer(Some("b1"), true)), Some(&layer(Some("b1"), true))));
        assert!(!f.nodes.contains_key("b2"));
        assert_eq!(f.check(), Ok(()));
        // A visible only child is found by `only_child`, not by `hidden_only_child`.
        f.nodes.remove("s2");
        assert_eq!(f.only_child("b1"), Some("v".to_owned()));
        assert_eq!(f.hidden_only_child("b1"), None);
    }

    #[test]
    fn the_cache_follows_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("r");
        let cache: RecordCache<String> = RecordCache::new();
        let read = |p: &Path| -> Result<Option<String>, ()> { Ok(std::fs::read_to_string(p).ok()) };
        assert_eq!(cache.load(&path, read), Ok(None));
        std::fs::write(&path, "one").expect("write");
        assert_eq!(cache.load(&path, read), Ok(Some("one".into())));
        assert_eq!(cache.load(&path, |_| -> Result<Option<String>, ()> { panic!("not parsed again") }), Ok(Some("one".into())));
        let tmp = dir.path().join("t");
        std::fs::write(&tmp, "two!").expect("write");
        std::fs::rename(&tmp, &path).expect("rename");
        assert_eq!(cache.load(&path, read), Ok(Some("two!".into())));
    }
}
