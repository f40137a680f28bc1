//! Any supported image, chosen by name or by its magic bytes.
//!
//! The set of formats is closed (raw, VHD, qcow2), so it is an enum that forwards each `Image`
//! call to its driver: one monomorphic server serves every format.

use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::qcow2::{self, Qcow2Image};
use super::vhd::{self, VhdImage};
use super::{Access, Extent, Features, Image, RawImage, Result, ZeroAlloc, ZeroSpeed};
use crate::io::{Durability, EngineKind, IoBuf};

/// An image format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// The file's bytes are the disk's bytes.
    Raw,
    /// Microsoft VHD, dynamic or differencing (SMAPIv1's VDIs).
    Vhd,
    /// qcow2 (SMAPIv3's volumes).
    Qcow2,
}

impl Format {
    /// The format of the file at `path`, from its first bytes: VHD and qcow2 by their magic,
    /// anything else raw. A fixed VHD (footer only at the end) is refused: serving it as raw
    /// would expose its footer as disk data.
    pub fn detect(path: &Path) -> io::Result<Format> {
        // Before the open, which blocks for ever on a FIFO.
        if !super::holds_an_image(path).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))? {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{}: not a regular file or block device", path.display()),
            ));
        }
        let mut f = std::fs::File::open(path).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        let mut head = [0u8; 512];
        let mut n = 0;
        while n < head.len() {
            match f.read(&mut head[n..])? {
                0 => break,
                k => n += k,
            }
        }
        let head = &head[..n];
        if vhd::is_vhd(head) {
            return Ok(Format::Vhd);
        }
        if qcow2::is_qcow2(head) {
            return Ok(Format::Qcow2);
        }
        let len = super::byte_len(&f)?;
        if len >= 512 {
            use std::os::unix::fs::FileExt;
            let mut tail = [0u8; 64];
            f.read_exact_at(&mut tail, len - 512)?;
            // A VHD footer at the end and none at the start: a fixed disk, or (its disk type,
            // at 60, says) a dynamic one whose first sector is damaged, which the VHD reader
            // says so of.
            if &tail[..8] == b"conectix" && matches!(u32::from_be_bytes([tail[60], tail[61], tail[62], tail[63]]), 3 | 4) {
                return Ok(Format::Vhd);
            }
            if &tail[..8] == b"conectix" {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!("{} is a fixed VHD; only dynamic and differencing VHDs are supported", path.display()),
                ));
            }
        }
        Ok(Format::Raw)
    }
}

/// An open image of any format.
pub enum AnyImage {
    /// A raw file.
    Raw(RawImage),
    /// A VHD chain.
    Vhd(VhdImage),
    /// A qcow2 chain.
    Qcow2(Qcow2Image),
}

impl AnyImage {
    /// Opens `path` as `format` (detected when `None`), with its whole chain.
    pub async fn open(path: &Path, format: Option<Format>, access: Access, engine: EngineKind) -> anyhow::Result<AnyImage> {
        let format = match format {
            Some(f) => f,
            None => Format::detect(path)?,
        };
        Ok(match format {
            Format::Raw => AnyImage::Raw(RawImage::open(path, access, engine).await?),
            Format::Vhd => AnyImage::Vhd(VhdImage::open(path, access, engine).await?),
            Format::Qcow2 => AnyImage::Qcow2(Qcow2Image::open(path, access, engine).await?),
        })
    }

    /// The format.
    pub fn format(&self) -> Format {
        match self {
            AnyImage::Raw(_) => Format::Raw,
            AnyImage::Vhd(_) => Format::Vhd,
            AnyImage::Qcow2(_) => Format::Qcow2,
        }
    }

    /// The files of the chain, the served (top) image first.
    pub fn chain(&self) -> Vec<PathBuf> {
        match self {
            AnyImage::Raw(i) => vec![i.path().to_owned()],
            AnyImage::Vhd(i) => i.chain(),
            AnyImage::Qcow2(i) => i.chain(),
        }
    }
}

macro_rules! forward {
    ($self:ident, $i:ident => $e:expr) => {
        match $self {
            AnyImage::Raw($i) => $e,
            AnyImage::Vhd($i) => $e,
            AnyImage::Qcow2($i) => $e,
        }
    };
}

impl Image for AnyImage {
    fn size(&self) -> u64 {
        forward!(self, i => i.size())
    }

    fn files(&self) -> Vec<PathBuf> {
        match self {
            // A raw image has no chain to tell where it came from: a copy is its snapshot.
            AnyImage::Raw(_) => Vec::new(),
            _ => self.chain(),
        }
    }

    fn features(&self) -> Features {
        forward!(self, i => i.features())
    }

    async fn read(&self, offset: u64, buf: IoBuf) -> (IoBuf, Result<()>) {
        forward!(self, i => i.read(offset, buf).await)
    }

    async fn write(&self, offset: u64, buf: Arc<IoBuf>, durability: Durability) -> Result<()> {
        forward!(self, i => i.write(offset, buf, durability).await)
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        length: u64,
        alloc: ZeroAlloc,
        speed: ZeroSpeed,
        durability: Durability,
    ) -> Result<()> {
        forward!(self, i => i.write_zeroes(offset, length, alloc, speed, durability).await)
    }

    async fn trim(&self, offset: u64, length: u64) -> Result<()> {
        forward!(self, i => i.trim(offset, length).await)
    }

    async fn flush(&self) -> Result<()> {
        forward!(self, i => i.flush().await)
    }

    async fn sync_metadata(&self) -> Result<()> {
        forward!(self, i => i.sync_metadata().await)
    }

    async fn allocation(&self, offset: u64, length: u64, limit: usize) -> Result<Vec<Extent>> {
        forward!(self, i => i.allocation(offset, length, limit).await)
    }
}

/// Checksums (crc32, IEEE) of an image's guest-visible content, whole chain, in blocks of
/// `block` bytes (the last one shorter): a cheap way to compare two copies of a disk. Opens the
/// image read-only. Blocking: it runs its own small runtime on a thread of its own, so it can
/// be called from any thread, an async runtime's blocking pool included.
pub fn checksums(path: &Path, block: u64) -> anyhow::Result<Vec<u32>> {
    anyhow::ensure!(block > 0 && block <= 64 << 20, "checksum block {block} must be between 1 byte and 64 MiB");
    std::thread::scope(|s| {
        s.spawn(|| {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(async {
                let image = AnyImage::open(path, None, Access::ReadOnly, EngineKind::Portable).await?;
                let size = image.size();
                let mut sums = Vec::with_capacity(size.div_ceil(block) as usize);
                let mut at = 0;
                while at < size {
                    let len = block.min(size - at) as usize;
                    let (buf, r) = image.read(at, IoBuf::for_overwrite(len)).await;
                    r.map_err(|e| anyhow::anyhow!("reading {} at {at}: {e}", path.display()))?;
                    sums.push(crc32fast::hash(&buf.into_vec()[..len]));
                    at += len as u64;
                }
                Ok(sums)
            })
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}
