//! The qcow2 header, read and rewritten by us (imago keeps its own parser private).
//!
//! We need it before imago opens anything: to walk and validate the backing chain, to refuse
//! images imago cannot handle with a precise reason, and to rewrite the backing reference for
//! `rebase`. Layout from QEMU `docs/interop/qcow2.txt` ("Header", "Header extensions"); all
//! fields are big-endian.
//!
//! ```text
//!   0 magic "QFI\xfb"        4 version (2, 3)       8 backing_file_offset  16 backing_file_size
//!  20 cluster_bits          24 size (virtual)      32 crypt_method        36 l1_size
//!  40 l1_table_offset       48 refcount_table_offset                      56 refcount_table_clusters
//!  60 nb_snapshots          64 snapshots_offset    -- v2 ends at 72 --
//!  72 incompatible_features 80 compatible_features 88 autoclear_features  96 refcount_order
//! 100 header_length        (104 compression_type, optional)
//!  then extensions (type u32, length u32, data padded to 8), type 0 ends them; the backing
//!  file name follows. Everything lives inside cluster 0.
//! ```

use std::fmt;

/// The magic at offset 0: "QFI\xfb".
pub const MAGIC: [u8; 4] = *b"QFI\xfb";
/// Length of the version 2 header.
pub const V2_HEADER_LEN: usize = 72;
/// Length of the version 3 header without optional fields.
pub const V3_HEADER_LEN: usize = 104;
/// Smallest and largest cluster_bits the specification allows (512 B .. 2 MiB).
pub const MIN_CLUSTER_BITS: u32 = 9;
/// See [`MIN_CLUSTER_BITS`].
pub const MAX_CLUSTER_BITS: u32 = 21;
/// QEMU refuses an active L1 table larger than 32 MiB (`QCOW_MAX_L1_SIZE`), which bounds the
/// virtual size per cluster size (128 GiB at 512 B clusters, 2 TiB at 2 KiB, 8 TiB at 4 KiB).
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// QEMU refuses a refcount table larger than 8 MiB (`QCOW_MAX_REFTABLE_SIZE`): a million refcount
/// blocks, which count 2 PiB of 64 KiB clusters. A larger one named by a crafted header, sparse in
/// its file, made every open read it whole (4 GiB of memory for a 4 MiB file).
pub const MAX_REFCOUNT_TABLE_BYTES: u64 = 8 << 20;
/// Longest backing file name QEMU accepts.
pub const MAX_BACKING_NAME: usize = 1023;

/// Header extension: backing file format name ("qcow2", "raw").
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// Header extension: persistent dirty bitmaps.
pub const EXT_BITMAPS: u32 = 0x2385_2875;
/// Header extension: full disk encryption.
pub const EXT_CRYPTO: u32 = 0x0537_be77;

/// Incompatible feature bit 0: refcounts may be stale (lazy refcounts, unclean shutdown).
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
/// Incompatible feature bit 1: QEMU found corruption and marked the image.
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
/// Incompatible feature bit 2: guest data lives in an external data file.
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
/// Incompatible feature bit 3: compression type other than deflate.
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
/// Incompatible feature bit 4: extended L2 entries (subclusters).
pub const INCOMPAT_EXTENDED_L2: u64 = 1 << 4;
/// Autoclear feature bit 0: the bitmaps extension is consistent.
pub const AUTOCLEAR_BITMAPS: u64 = 1 << 0;

/// Why a header is not usable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Problem {
    /// The bytes break the format's rules.
    Corrupt(String),
    /// Valid qcow2 that uses a feature we do not handle.
    Unsupported(String),
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::Corrupt(s) | Problem::Unsupported(s) => f.write_str(s),
        }
    }
}

fn corrupt(s: impl Into<String>) -> Problem {
    Problem::Corrupt(s.into())
}

/// One header extension, kept as raw bytes so a rewrite preserves what we do not interpret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Extension {
    /// Extension type.
    pub kind: u32,
    /// Its data, unpadded.
    pub data: Vec<u8>,
}

/// A parsed qcow2 header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Virtual disk size in bytes.
    pub size: u64,
    /// 0 = none, 1 = AES, 2 = LUKS.
    pub crypt_method: u32,
    /// Entries in the active L1 table.
    pub l1_size: u32,
    /// Host offset of the active L1 table.
    pub l1_table_offset: u64,
    /// Host offset of the refcount table.
    pub refcount_table_offset: u64,
    /// Clusters the refcount table occupies.
    pub refcount_table_clusters: u32,
    /// Internal snapshots.
    pub nb_snapshots: u32,
    /// Host offset of the snapshot table.
    pub snapshots_offset: u64,
    /// Incompatible feature bits (0 for v2).
    pub incompatible: u64,
    /// Compatible feature bits.
    pub compatible: u64,
    /// Autoclear feature bits.
    pub autoclear: u64,
    /// log2 of the refcount width in bits (4 for v2).
    pub refcount_order: u32,
    /// Bytes of the fixed header, where extensions start.
    pub header_length: u32,
    /// The raw fixed header (`header_length` bytes), kept so a rewrite preserves unknown fields.
    pub raw_fixed: Vec<u8>,
    /// Header extensions in file order, without the end marker.
    pub extensions: Vec<Extension>,
    /// The backing file name as recorded (relative names are relative to this image's folder).
    pub backing_file: Option<String>,
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(x)
}

/// How many bytes from offset 0 `Header::parse` wants: the whole first cluster, which holds
/// the header, its extensions and the backing name. Needs the first 24 bytes to tell.
pub fn wanted_len(first: &[u8]) -> Option<usize> {
    if first.len() < 24 || first[..4] != MAGIC {
        return None;
    }
    let bits = be32(first, 20);
    (MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&bits).then(|| 1usize << bits)
}

impl Header {
    /// The disk's size as served: the header's, in whole 512-byte sectors. QEMU counts a disk in
    /// sectors and drops a partial last one, and an export whose smallest request is a sector
    /// cannot end inside one (NBD clients refuse to read such a tail).
    pub fn disk_size(&self) -> u64 {
        self.size / 512 * 512
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Entries in one L2 table.
    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / 8
    }

    /// Bytes of virtual disk one L2 table maps.
    pub fn l2_span(&self) -> u64 {
        self.l2_entries() << self.cluster_bits
    }

    /// QEMU (or this driver's guard) found the image corrupt and set incompatible bit 1: it
    /// opens read-only, as in QEMU, and for writing only once `qemu-img check -r all` repaired
    /// it ([`Problem`] from [`Header::writable`]).
    pub fn is_marked_corrupt(&self) -> bool {
        self.version >= 3 && self.incompatible & INCOMPAT_CORRUPT != 0
    }

    /// Whether this image may be opened for writing: not while it is marked corrupt.
    pub fn writable(&self) -> Result<(), Problem> {
        if self.is_marked_corrupt() {
            return Err(corrupt(
                "marked corrupt (incompatible bit 1), by QEMU or by this driver; it opens read-only until \
                 `qemu-img check -r all` repairs it",
            ));
        }
        Ok(())
    }

    /// Whether the image carries persistent dirty bitmaps that QEMU considers valid.
    pub fn has_valid_bitmaps(&self) -> bool {
        self.autoclear & AUTOCLEAR_BITMAPS != 0 && self.extensions.iter().any(|e| e.kind == EXT_BITMAPS)
    }

    /// The backing format extension, if present.
    pub fn backing_format(&self) -> Option<String> {
        self.extensions
            .iter()
            .find(|e| e.kind == EXT_BACKING_FORMAT)
            .map(|e| String::from_utf8_lossy(&e.data).into_owned())
    }

    /// Parses the header from `buf`, which holds the file's first bytes: the whole first cluster,
    /// or the whole file when it is shorter.
    pub fn parse(buf: &[u8]) -> Result<Header, Problem> {
        if buf.len() < 4 || buf[..4] != MAGIC {
            return Err(corrupt("no qcow2 magic"));
        }
        if buf.len() < V2_HEADER_LEN {
            return Err(corrupt(format!("file of {} bytes is too short for a qcow2 header", buf.len())));
        }
        let version = be32(buf, 4);
        if version != 2 && version != 3 {
            return Err(Problem::Unsupported(format!("qcow2 version {version}")));
        }
        let cluster_bits = be32(buf, 20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(corrupt(format!("cluster_bits {cluster_bits} outside 9..=21")));
        }
        let cluster = 1usize << cluster_bits;
        let (incompatible, compatible, autoclear, refcount_order, header_length) = if version == 3 {
            if buf.len() < V3_HEADER_LEN {
                return Err(corrupt("file too short for a version 3 header"));
            }
            let hl = be32(buf, 100);
            (be64(buf, 72), be64(buf, 80), be64(buf, 88), be32(buf, 96), hl)
        } else {
            (0, 0, 0, 4, V2_HEADER_LEN as u32)
        };
        if version == 3 && (header_length as usize) < V3_HEADER_LEN {
            return Err(corrupt(format!("header_length {header_length} below {V3_HEADER_LEN}")));
        }
        if header_length as usize > cluster {
            return Err(corrupt(format!("header_length {header_length} exceeds the first cluster")));
        }
        if header_length as usize > buf.len() {
            return Err(corrupt("file ends inside the header"));
        }
        if refcount_order > 6 {
            return Err(corrupt(format!("refcount_order {refcount_order} above 6")));
        }
        let limit = cluster.min(buf.len());
        let backing_file_offset = be64(buf, 8);
        let mut extensions = Vec::new();
        // Old writers put a version 2 image's backing name straight after the header, with no
        // extension area and no end marker; QEMU reads extensions only up to the name, and so
        // does imago. Anything else must end its extensions with an end marker in the first
        // cluster, as imago (which opens the image after us) requires.
        let no_extensions = version < 3 && usize::try_from(backing_file_offset).is_ok_and(|b| b == header_length as usize);
        let mut at = header_length as usize;
        if !no_extensions {
            loop {
                if at + 8 > limit {
                    return Err(corrupt("header extensions run past the first cluster"));
                }
                let kind = be32(buf, at);
                let len = be32(buf, at + 4) as usize;
                at += 8;
                // The end marker's length is checked too, as QEMU and imago do: they refuse an image
                // whose end marker claims more than the cluster holds.
                let end = at.checked_add(len).filter(|&e| e <= limit).ok_or_else(|| corrupt("header extension runs past the first cluster"))?;
                if kind == 0 {
                    break;
                }
                extensions.push(Extension { kind, data: buf[at..end].to_vec() });
                at += len.next_multiple_of(8);
            }
        }
        let backing_file_size = be32(buf, 16) as usize;
        let backing_file = if backing_file_offset == 0 {
            None
        } else {
            if backing_file_size > MAX_BACKING_NAME {
                return Err(corrupt(format!("backing file name of {backing_file_size} bytes (max {MAX_BACKING_NAME})")));
            }
            let start = usize::try_from(backing_file_offset).ok().filter(|&s| s + backing_file_size <= limit);
            let Some(start) = start else {
                return Err(corrupt("backing file name lies outside the first cluster"));
            };
            let name = std::str::from_utf8(&buf[start..start + backing_file_size])
                .map_err(|_| corrupt("backing file name is not UTF-8"))?;
            if name.is_empty() {
                return Err(corrupt("empty backing file name"));
            }
            Some(name.to_owned())
        };
        Ok(Header {
            version,
            cluster_bits,
            size: be64(buf, 24),
            crypt_method: be32(buf, 32),
            l1_size: be32(buf, 36),
            l1_table_offset: be64(buf, 40),
            refcount_table_offset: be64(buf, 48),
            refcount_table_clusters: be32(buf, 56),
            nb_snapshots: be32(buf, 60),
            snapshots_offset: be64(buf, 64),
            incompatible,
            compatible,
            autoclear,
            refcount_order,
            header_length,
            raw_fixed: buf[..header_length as usize].to_vec(),
            extensions,
            backing_file,
        })
    }

    /// Checks what can be checked from the header alone against a file of `file_len` bytes:
    /// features we support, and tables that lie inside the file where they must.
    pub fn validate(&self, file_len: u64) -> Result<(), Problem> {
        let cs = self.cluster_size();
        if self.crypt_method != 0 || self.extensions.iter().any(|e| e.kind == EXT_CRYPTO) {
            return Err(Problem::Unsupported("encrypted image".into()));
        }
        let inc = self.incompatible;
        // Refused for reading too: imago, which reads the image after us, refuses it.
        if inc & INCOMPAT_DIRTY != 0 {
            return Err(Problem::Unsupported(
                "dirty: lazy refcounts were not written back (incompatible bit 0); run `qemu-img check -r all` first".into(),
            ));
        }
        if inc & INCOMPAT_DATA_FILE != 0 {
            return Err(Problem::Unsupported("external data file (incompatible bit 2)".into()));
        }
        if inc & INCOMPAT_COMPRESSION != 0 {
            return Err(Problem::Unsupported("compression type other than deflate (incompatible bit 3)".into()));
        }
        if inc & INCOMPAT_EXTENDED_L2 != 0 {
            return Err(Problem::Unsupported("extended L2 entries / subclusters (incompatible bit 4)".into()));
        }
        // Only deflate, which needs no feature bit; anything else must set bit 3 (refused
        // above), and an image that names another without it is damaged, as QEMU says.
        if let Some(&kind) = self.raw_fixed.get(104).filter(|_| self.header_length > 104)
            && kind != 0
        {
            return Err(corrupt(format!("compression type {kind} without its incompatible feature bit (3)")));
        }
        // The corrupt bit is known: it only keeps writers out (`Header::writable`).
        let unknown = inc & !INCOMPAT_CORRUPT;
        if unknown != 0 {
            return Err(Problem::Unsupported(format!("unknown incompatible feature bits {unknown:#x}")));
        }
        let needed_l1 = self.size.div_ceil(self.l2_span());
        if u64::from(self.l1_size) < needed_l1 {
            return Err(corrupt(format!("L1 table of {} entries cannot map {} bytes", self.l1_size, self.size)));
        }
        if u64::from(self.l1_size) * 8 > MAX_L1_BYTES {
            return Err(corrupt(format!("active L1 table of {} entries is larger than 32 MiB", self.l1_size)));
        }
        let within = |what: &str, offset: u64, len: u64| -> Result<(), Problem> {
            if !offset.is_multiple_of(cs) {
                return Err(corrupt(format!("{what} at {offset:#x} is not cluster aligned")));
            }
            match offset.checked_add(len) {
                Some(end) if end <= file_len => Ok(()),
                _ => Err(corrupt(format!(
                    "{what} at {offset:#x}+{len} lies beyond the end of the file ({file_len} bytes; truncated?)"
                ))),
            }
        };
        if self.l1_size > 0 {
            within("L1 table", self.l1_table_offset, u64::from(self.l1_size) * 8)?;
        }
        if self.refcount_table_clusters == 0 || self.refcount_table_offset == 0 {
            return Err(corrupt("no refcount table"));
        }
        if u64::from(self.refcount_table_clusters) * cs > MAX_REFCOUNT_TABLE_BYTES {
            return Err(corrupt(format!("refcount table of {} clusters is larger than 8 MiB", self.refcount_table_clusters)));
        }
        within("refcount table", self.refcount_table_offset, u64::from(self.refcount_table_clusters) * cs)?;
        if self.nb_snapshots > 0 {
            within("snapshot table", self.snapshots_offset, 1)?;
        }
        Ok(())
    }

    /// The first cluster rewritten to reference `backing` (name and format), every other field
    /// and extension kept: what `qemu-img rebase -u` writes. The result is zero-padded to the old
    /// header's end, so stale name bytes cannot survive.
    pub fn with_backing(&self, backing: Option<(&str, &str)>) -> Result<Vec<u8>, Problem> {
        let mut exts: Vec<Extension> = self.extensions.iter().filter(|e| e.kind != EXT_BACKING_FORMAT).cloned().collect();
        if let Some((_, format)) = backing {
            // Keep it where QEMU puts it: first.
            exts.insert(0, Extension { kind: EXT_BACKING_FORMAT, data: format.as_bytes().to_vec() });
        }
        // Version 2 headers carry extensions the same way (from byte 72); QEMU writes the backing
        // format there too, so one layout serves both versions.
        let mut out = self.raw_fixed.clone();
        for e in &exts {
            out.extend_from_slice(&e.kind.to_be_bytes());
            out.extend_from_slice(&(e.data.len() as u32).to_be_bytes());
            out.extend_from_slice(&e.data);
            out.resize(out.len().next_multiple_of(8), 0);
        }
        out.extend_from_slice(&[0u8; 8]);
        let (off, len) = match backing {
            Some((name, _)) => {
                if name.is_empty() || name.len() > MAX_BACKING_NAME {
                    return Err(Problem::Unsupported(format!("backing file name of {} bytes", name.len())));
                }
                let off = out.len() as u64;
                out.extend_from_slice(name.as_bytes());
                (off, name.len() as u32)
            }
            None => (0, 0),
        };
        if out.len() as u64 > self.cluster_size() {
            return Err(Problem::Unsupported(format!(
                "header with this backing name needs {} bytes, more than the {}-byte first cluster",
                out.len(),
                self.cluster_size()
            )));
        }
        out[8..16].copy_from_slice(&off.to_be_bytes());
        out[16..20].copy_from_slice(&len.to_be_bytes());
        let old_end = self.old_end();
        if out.len() < old_end {
            out.resize(old_end, 0);
        }
        Ok(out)
    }

    /// End of the bytes the current header, extensions and backing name occupy.
    fn old_end(&self) -> usize {
        let mut end = self.header_length as usize;
        for e in &self.extensions {
            end += 8 + e.data.len().next_multiple_of(8);
        }
        end += 8;
        if let Some(name) = &self.backing_file {
            // The name need not follow the extensions; cover wherever it is.
            let off = be64(&self.raw_fixed, 8) as usize;
            end = end.max(off + name.len());
        }
        end
    }
}

/// Largest virtual size QEMU accepts for a cluster size (the L1 table stays within 32 MiB).
pub fn max_size(cluster_bits: u32) -> u64 {
    let l2_span = 1u64 << (2 * cluster_bits - 3);
    (MAX_L1_BYTES / 8).saturating_mul(l2_span)
}

/// The smallest cluster_bits whose maximum virtual size covers `size`.
pub fn smallest_cluster_bits(size: u64) -> Option<u32> {
    (MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).find(|&b| max_size(b) >= size)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A v3 header as QEMU lays it out: 104-byte fixed part, a backing format extension, the
    /// end marker, then the backing name.
    fn sample(cluster_bits: u32, backing: Option<(&str, &str)>) -> Vec<u8> {
        let mut b = vec![0u8; 1 << cluster_bits];
        b[..4].copy_from_slice(&MAGIC);
        b[4..8].copy_from_slice(&3u32.to_be_bytes());
        b[20..24].copy_from_slice(&cluster_bits.to_be_bytes());
        b[24..32].copy_from_slice(&(1u64 << 20).to_be_bytes()); // size 1 MiB
        b[36..40].copy_from_slice(&1u32.to_be_bytes()); // l1_size
        b[40..48].copy_from_slice(&(3u64 << cluster_bits).to_be_bytes()); // l1 offset
        b[48..56].copy_from_slice(&(1u64 << cluster_bits).to_be_bytes()); // refcount table
        b[56..60].copy_from_slice(&1u32.to_be_bytes());
        b[96..100].copy_from_slice(&4u32.to_be_bytes()); // refcount_order
        b[100..104].copy_from_slice(&104u32.to_be_bytes());
        let mut at = 104;
        if let Some((name, fmt)) = backing {
            b[at..at + 4].copy_from_slice(&EXT_BACKING_FORMAT.to_be_bytes());
            b[at + 4..at + 8].copy_from_slice(&(fmt.len() as u32).to_be_bytes());
            b[at + 8..at + 8 + fmt.len()].copy_from_slice(fmt.as_bytes());
            at += 8 + fmt.len().next_multiple_of(8);
            at += 8; // end marker (zeroes)
            b[8..16].copy_from_slice(&(at as u64).to_be_bytes());
            b[16..20].copy_from_slice(&(name.len() as u32).to_be_bytes());
            b[at..at + name.len()].copy_from_slice(name.as_bytes());
        }
        b
    }

    #[test]
    fn parses_backing_name_and_format() {
        let h = Header::parse(&sample(16, Some(("base.qcow2", "qcow2")))).expect("parse");
        assert_eq!(h.version, 3);
        assert_eq!(h.cluster_size(), 65536);
        assert_eq!(h.backing_file.as_deref(), Some("base.qcow2"));
        assert_eq!(h.backing_format().as_deref(), Some("qcow2"));
        h.validate(4 << 16).expect("valid");
    }

    #[test]
    fn rewriting_the_backing_keeps_other_extensions_and_clears_the_old_name() {
        let mut raw = sample(16, Some(("a-rather-long-backing-name.qcow2", "qcow2")));
        let h0 = Header::parse(&raw).expect("parse");
        // Add a foreign extension after the backing format to see it survive.
        let mut h = h0.clone();
        h.extensions.push(Extension { kind: 0x1234_5678, data: vec![1, 2, 3] });
        let bytes = h.with_backing(Some(("b.raw", "raw"))).expect("rewrite");
        raw[..bytes.len()].copy_from_slice(&bytes);
        let h2 = Header::parse(&raw).expect("reparse");
        assert_eq!(h2.backing_file.as_deref(), Some("b.raw"));
        assert_eq!(h2.backing_format().as_deref(), Some("raw"));
        assert!(h2.extensions.iter().any(|e| e.kind == 0x1234_5678 && e.data == [1, 2, 3]));
        assert!(!raw.windows(10).any(|w| w == b"a-rather-l"), "old name bytes must be gone");
        let none = h2.with_backing(None).expect("drop backing");
        raw[..none.len()].copy_from_slice(&none);
        let h3 = Header::parse(&raw).expect("reparse");
        assert_eq!(h3.backing_file, None);
        assert_eq!(h3.backing_format(), None);
    }

    #[test]
    fn names_that_do_not_fit_the_first_cluster_are_refused() {
        let h = Header::parse(&sample(9, None)).expect("parse");
        let long = "x".repeat(500);
        assert!(matches!(h.with_backing(Some((&long, "qcow2"))), Err(Problem::Unsupported(_))));
        assert!(h.with_backing(Some(("short", "qcow2"))).is_ok());
    }

    /// A compression type other than deflate without incompatible bit 3 is a damaged header,
    /// as QEMU says: it used to open, pass `image check`, and fail at its first compressed
    /// cluster.
    #[test]
    fn a_compression_type_without_its_feature_bit_is_refused() {
        let mut b = sample(16, None);
        b[100..104].copy_from_slice(&112u32.to_be_bytes());
        Header::parse(&b).expect("parse").validate(4 << 16).expect("deflate (0) needs no bit");
        b[104] = 1; // zstd
        let h = Header::parse(&b).expect("parse");
        assert!(matches!(h.validate(4 << 16), Err(Problem::Corrupt(m)) if m.contains("compression type 1")));
    }

    #[test]
    fn validation_names_the_broken_part() {
        let mut b = sample(16, None);
        b[20..24].copy_from_slice(&30u32.to_be_bytes());
        assert!(matches!(Header::parse(&b), Err(Problem::Corrupt(m)) if m.contains("cluster_bits")));
        let h = Header::parse(&sample(16, None)).expect("parse");
        assert!(matches!(h.validate(3 << 16), Err(Problem::Corrupt(m)) if m.contains("L1 table")), "L1 past EOF");
        let mut d = h.clone();
        d.incompatible = INCOMPAT_DIRTY;
        assert!(matches!(d.validate(4 << 16), Err(Problem::Unsupported(m)) if m.contains("dirty")));
        d.incompatible = INCOMPAT_EXTENDED_L2;
        assert!(matches!(d.validate(4 << 16), Err(Problem::Unsupported(m)) if m.contains("subclusters")));
        assert!(matches!(Header::parse(&b"QFI\xfb\0\0\0\x03"[..]), Err(Problem::Corrupt(m)) if m.contains("too short")));
        // A refcount table over 8 MiB (128 clusters of 64 KiB), sparse in a file long enough
        // to hold it, is refused before anything reads it; 8 MiB passes.
        let mut r = h.clone();
        r.refcount_table_clusters = 129;
        assert!(matches!(r.validate(1 << 30), Err(Problem::Corrupt(m)) if m.contains("refcount table of 129 clusters")));
        r.refcount_table_clusters = 128;
        r.validate(1 << 30).expect("an 8 MiB refcount table");
    }

    /// Old writers put a version 2 image's backing name straight after the 72-byte header,
    /// with no extensions and no end marker; QEMU reads extensions only up to the name.
    #[test]
    fn a_version_2_backing_name_right_after_the_header_is_read() {
        let mut b = sample(16, None);
        b[4..8].copy_from_slice(&2u32.to_be_bytes());
        b[72..].fill(0);
        b[72..80].copy_from_slice(b"base.raw");
        b[8..16].copy_from_slice(&72u64.to_be_bytes());
        b[16..20].copy_from_slice(&8u32.to_be_bytes());
        let h = Header::parse(&b).expect("parse");
        assert_eq!(h.backing_file.as_deref(), Some("base.raw"));
        assert!(h.extensions.is_empty());
        // Rewritten, it gets an extension area of its own and still names its backing.
        let bytes = h.with_backing(Some(("base.raw", "raw"))).expect("rewrite");
        b[..bytes.len()].copy_from_slice(&bytes);
        let h2 = Header::parse(&b).expect("reparse");
        assert_eq!((h2.backing_file.as_deref(), h2.backing_format().as_deref()), (Some("base.raw"), Some("raw")));
        // A version 3 image must end its extensions with an end marker, as imago requires.
        // (In a 512-byte cluster: the end marker at 120 becomes an extension running on.)
        let mut c = sample(9, Some(("base.qcow2", "qcow2")));
        c[120..124].copy_from_slice(&0xfau32.to_be_bytes());
        c[124..128].copy_from_slice(&1000u32.to_be_bytes());
        assert!(matches!(Header::parse(&c), Err(Problem::Corrupt(m)) if m.contains("past the first cluster")));
    }

    #[test]
    fn an_end_marker_that_claims_more_than_the_cluster_is_refused() {
        let mut b = sample(9, None);
        assert!(Header::parse(&b).is_ok());
        // The end marker at 104: type 0, and a length past the 512-byte cluster (a fuzzer's
        // find, which QEMU and imago refuse as well).
        b[108..112].copy_from_slice(&1000u32.to_be_bytes());
        assert!(matches!(Header::parse(&b), Err(Problem::Corrupt(m)) if m.contains("past the first cluster")));
        b[108..112].copy_from_slice(&400u32.to_be_bytes());
        assert!(Header::parse(&b).is_ok(), "an end marker's length within the cluster is accepted, as QEMU does");
    }

    #[test]
    fn size_limits_follow_qemu() {
        assert_eq!(max_size(9), 128 << 30);
        assert_eq!(max_size(11), 2 << 40);
        assert_eq!(smallest_cluster_bits(128 << 30), Some(9));
        assert_eq!(smallest_cluster_bits((128 << 30) + 512), Some(10));
        assert_eq!(smallest_cluster_bits(3 << 40), Some(12));
    }
}
