//! Backing chains, resolved from the headers before imago opens anything.
//!
//! Resolving ourselves (rather than letting imago follow the header through a permissive open
//! gate) lets us report which image names which missing file, detect loops, refuse formats we do
//! not handle, and keep the list of paths for `chain()`. imago then opens exactly these files,
//! bottom-up, behind a gate that denies every implicit open.

use std::collections::HashSet;
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::Qcow2Error;
use super::header::{self, Header, MAGIC, Problem};

/// Longest chain we follow; deeper ones are refused as a probable loop through odd paths.
pub const MAX_DEPTH: usize = 256;

/// What a layer is.
#[derive(Clone, Debug)]
pub enum LayerFormat {
    /// A qcow2 file, with its header.
    Qcow2(Box<Header>),
    /// A raw file: its bytes are the disk's bytes.
    Raw,
}

/// One file of a chain.
#[derive(Clone, Debug)]
pub struct Layer {
    /// The path, as given for the top and as resolved (relative to the referencing image's
    /// folder) for backings.
    pub path: PathBuf,
    /// The format.
    pub format: LayerFormat,
    /// Virtual size (the file size for raw).
    pub size: u64,
    /// Length of the file in bytes.
    pub file_len: u64,
}

impl Layer {
    /// The format name QEMU records for this layer ("qcow2" or "raw").
    pub fn format_name(&self) -> &'static str {
        match self.format {
            LayerFormat::Qcow2(_) => "qcow2",
            LayerFormat::Raw => "raw",
        }
    }

    /// The qcow2 header, when this layer is qcow2.
    pub fn header(&self) -> Option<&Header> {
        match &self.format {
            LayerFormat::Qcow2(h) => Some(h),
            LayerFormat::Raw => None,
        }
    }
}

pub(super) fn problem(path: &Path, p: Problem) -> Qcow2Error {
    match p {
        Problem::Corrupt(reason) => Qcow2Error::Corrupt { path: path.to_owned(), reason },
        Problem::Unsupported(what) => Qcow2Error::Unsupported { path: path.to_owned(), what },
    }
}

pub(super) fn io_error(path: &Path, op: &'static str, source: io::Error) -> Qcow2Error {
    Qcow2Error::Io { path: path.to_owned(), op, source }
}

/// Reads and validates the header of the qcow2 file at `path`.
pub fn read_header(path: &Path) -> Result<(Header, u64), Qcow2Error> {
    let file = File::open(path).map_err(|e| io_error(path, "open", e))?;
    read_header_of(&file, path)
}

/// As [`read_header`], on an open file.
pub fn read_header_of(file: &File, path: &Path) -> Result<(Header, u64), Qcow2Error> {
    let file_len = crate::image::byte_len(file).map_err(|e| io_error(path, "stat", e))?;
    let mut first = vec![0u8; file_len.min(4096) as usize];
    file.read_exact_at(&mut first, 0).map_err(|e| io_error(path, "read header", e))?;
    if let Some(want) = header::wanted_len(&first)
        && want > first.len()
    {
        let len = (want as u64).min(file_len) as usize;
        first = vec![0u8; len];
        file.read_exact_at(&mut first, 0).map_err(|e| io_error(path, "read header", e))?;
    }
    let h = Header::parse(&first).map_err(|p| problem(path, p))?;
    h.validate(file_len).map_err(|p| problem(path, p))?;
    Ok((h, file_len))
}

/// Refuses what cannot hold an image (see [`crate::image::holds_an_image`]) before it is opened.
pub fn require_image_file(path: &Path) -> Result<(), Qcow2Error> {
    match crate::image::holds_an_image(path) {
        Ok(true) => Ok(()),
        Ok(false) => Err(Qcow2Error::Unsupported { path: path.to_owned(), what: "not a regular file or block device".into() }),
        Err(e) => Err(io_error(path, "stat", e)),
    }
}

/// What a backing file with no recorded format holds, by its first bytes, as QEMU probes it:
/// "qcow2", QEMU's name of another format it would recognise, or "raw" when none. A VHD or
/// VMDK read as raw would hand its metadata to the guest as data.
fn probe_format(path: &Path) -> io::Result<&'static str> {
    let mut head = [0u8; 72];
    let mut f = File::open(path)?;
    let mut got = 0;
    while got < head.len() {
        match f.read(&mut head[got..])? {
            0 => break,
            n => got += n,
        }
    }
    let head = &head[..got];
    const OTHERS: [(usize, &[u8], &str); 6] = [
        (0, crate::image::vhd::format::FOOTER_COOKIE, "vpc"),
        (0, b"KDMV", "vmdk"),
        (0, b"# Disk DescriptorFile", "vmdk"),
        (0, b"QED\0", "qed"),
        (0, b"LUKS\xba\xbe", "luks"),
        (0x40, &[0x7f, 0x10, 0xda, 0xbe], "vdi"),
    ];
    if head.starts_with(&MAGIC) {
        return Ok("qcow2");
    }
    Ok(OTHERS.iter().find(|(at, magic, _)| head.get(*at..at + magic.len()) == Some(*magic)).map_or("raw", |&(_, _, name)| name))
}

/// Opens one layer of known (or probed) format.
fn layer(path: &Path, format: Option<&str>) -> Result<Layer, Qcow2Error> {
    require_image_file(path)?;
    let qcow2 = match format {
        Some("qcow2") => true,
        Some("raw") | Some("file") => false,
        Some(other) => {
            return Err(Qcow2Error::Unsupported { path: path.to_owned(), what: format!("backing format {other:?}") });
        }
        // No recorded format: probe, as QEMU and imago do. (Safe here because we only ever
        // open backings read-only and a guest never writes the backing of its own overlay.)
        None => match probe_format(path).map_err(|e| io_error(path, "read", e))? {
            "qcow2" => true,
            "raw" => false,
            other => {
                return Err(Qcow2Error::Unsupported { path: path.to_owned(), what: format!("backing format {other:?} (probed)") });
            }
        },
    };
    if qcow2 {
        let (h, file_len) = read_header(path)?;
        Ok(Layer { path: path.to_owned(), size: h.disk_size(), file_len, format: LayerFormat::Qcow2(Box::new(h)) })
    } else {
        let file = File::open(path).map_err(|e| io_error(path, "open", e))?;
        let file_len = crate::image::byte_len(&file).map_err(|e| io_error(path, "stat", e))?;
        Ok(Layer { path: path.to_owned(), size: file_len, file_len, format: LayerFormat::Raw })
    }
}

/// Where a backing name recorded in `image` points.
pub fn resolve_backing(image: &Path, name: &str) -> PathBuf {
    let name = Path::new(name);
    if name.is_absolute() {
        return name.to_owned();
    }
    image.parent().map(|d| d.join(name)).unwrap_or_else(|| name.to_owned())
}

/// The chain below and including `path`, top first. `top_format` is `None` to probe the top.
pub fn resolve(path: &Path, top_format: Option<&str>) -> Result<Vec<Layer>, Qcow2Error> {
    let mut chain = vec![layer(path, top_format)?];
    let mut seen = HashSet::new();
    seen.insert(std::fs::canonicalize(path).map_err(|e| io_error(path, "resolve path", e))?);
    loop {
        let last = chain.last().map(|l| (l.path.clone(), l.header().map(|h| (h.backing_file.clone(), h.backing_format()))));
        let Some((image, Some((Some(name), format)))) = last else { break };
        let backing = resolve_backing(&image, &name);
        let canonical = match std::fs::canonicalize(&backing) {
            Ok(c) => c,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(Qcow2Error::MissingBacking { path: image, backing });
            }
            Err(e) => return Err(io_error(&backing, "resolve path", e)),
        };
        if !seen.insert(canonical) {
            return Err(Qcow2Error::Corrupt {
                path: image,
                reason: format!("backing chain loops back to {}", backing.display()),
            });
        }
        if chain.len() >= MAX_DEPTH {
            return Err(Qcow2Error::Unsupported { path: path.to_owned(), what: format!("backing chain deeper than {MAX_DEPTH}") });
        }
        chain.push(layer(&backing, format.as_deref())?);
    }
    Ok(chain)
}

/// How `overlay` should name `backing` in its header: the bare file name when both live in the
/// same folder (the chain then survives moving the folder, as SR folders are), else the
/// absolute path.
pub fn backing_reference(overlay: &Path, backing: &Path) -> Result<String, Qcow2Error> {
    let canonical = std::fs::canonicalize(backing).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => Qcow2Error::MissingBacking { path: overlay.to_owned(), backing: backing.to_owned() },
        _ => io_error(backing, "resolve path", e),
    })?;
    let overlay_dir = match overlay.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    let overlay_dir = std::fs::canonicalize(&overlay_dir).map_err(|e| io_error(&overlay_dir, "resolve path", e))?;
    let name = if canonical.parent() == Some(overlay_dir.as_path()) {
        canonical.file_name().map(PathBuf::from).unwrap_or_else(|| canonical.clone())
    } else {
        canonical
    };
    name.to_str().map(str::to_owned).ok_or_else(|| Qcow2Error::InvalidArgument {
        path: backing.to_owned(),
        reason: "backing path is not UTF-8".into(),
    })
}
