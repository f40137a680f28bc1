//! What a copy reads from and writes to.
//!
//! A source is an image (any format, the whole chain) or an NBD export; a destination is an
//! NBD export (one or more connections) or an image file. Both are closed sets, so enums.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{Context, Result, bail};

use crate::image::{Extent, ExtentState, Image, ZeroAlloc, ZeroSpeed};
use crate::io::{Durability, IoBuf};
use crate::nbd::proto::{alloc_flags, tflags};
use crate::nbd::{NbdClient, Payload};

/// Where the data comes from.
pub enum Source<I: Image> {
    /// An open image (its allocation map says what to skip).
    Image(Arc<I>),
    /// An image of which only `ranges` (sorted, disjoint) may differ from what the destination
    /// holds already (a related chain): the rest is left alone, not zeroed.
    Diff {
        /// The image.
        image: Arc<I>,
        /// The ranges that may differ.
        ranges: Vec<Extent>,
    },
    /// An NBD export (its `base:allocation`, when offered, says what to skip).
    Nbd(NbdClient),
}

impl<I: Image> Source<I> {
    /// Virtual size in bytes.
    pub fn size(&self) -> u64 {
        match self {
            Source::Image(i) | Source::Diff { image: i, .. } => i.size(),
            Source::Nbd(c) => c.size(),
        }
    }

    /// Largest read this source takes in one request.
    pub fn max_read(&self) -> usize {
        match self {
            Source::Image(_) | Source::Diff { .. } => 32 << 20,
            Source::Nbd(c) => c.info().block_size.maximum as usize,
        }
    }

    /// How much of the disk one `allocation` call should ask about. An NBD request says at
    /// most 4 GiB less a byte; an image's map is looked up in memory, and asking it 1 GiB at a
    /// time took a 1000 TiB qcow2 volume holding 2 MiB 26 s of calls (a million of them).
    pub fn allocation_window(&self) -> u64 {
        match self {
            Source::Image(_) | Source::Diff { .. } => 1 << 40,
            Source::Nbd(_) => 1 << 30,
        }
    }

    /// Whether extents that are not data are to be left alone on the destination (it holds
    /// them already) rather than zeroed.
    pub fn skips_non_data(&self) -> bool {
        matches!(self, Source::Diff { .. })
    }

    /// Extents from `offset`, at least one, within `length`. Past its end a source is one
    /// hole: a copy pads the destination's last unit with zeroes when the source's size does
    /// not fill it (a 1000-byte raw file into a VDI of 512-byte sectors).
    pub async fn allocation(&self, offset: u64, length: u64) -> Result<Vec<Extent>> {
        let size = self.size();
        if offset >= size {
            return Ok(vec![Extent { offset, length, state: ExtentState::Hole }]);
        }
        let length = length.min(size - offset);
        match self {
            // A bounded answer: a wide window of a fragmented image could hold millions.
            Source::Image(i) => Ok(i.allocation(offset, length, 1 << 16).await?),
            Source::Diff { ranges, .. } => {
                let end = offset + length;
                let mut out = Vec::new();
                let mut at = offset;
                for r in ranges.iter().filter(|r| r.offset + r.length > offset && r.offset < end) {
                    let (s, e) = (r.offset.max(offset), (r.offset + r.length).min(end));
                    if s > at {
                        out.push(Extent { offset: at, length: s - at, state: ExtentState::Hole });
                    }
                    out.push(Extent { offset: s, length: e - s, state: ExtentState::Data });
                    at = e;
                }
                if at < end {
                    out.push(Extent { offset: at, length: end - at, state: ExtentState::Hole });
                }
                Ok(out)
            }
            Source::Nbd(c) => {
                let len = u32::try_from(length.min(1 << 30)).unwrap_or(1 << 30);
                if c.info().base_allocation.is_none() {
                    return Ok(vec![Extent { offset, length: u64::from(len), state: ExtentState::Data }]);
                }
                Ok(c.block_status(offset, len)
                    .await
                    .with_context(|| format!("block status of the source at {offset}"))?
                    .into_iter()
                    .map(|e| Extent {
                        offset: e.offset,
                        length: e.length,
                        state: if e.flags & alloc_flags::ZERO != 0 {
                            if e.flags & alloc_flags::HOLE != 0 { ExtentState::Hole } else { ExtentState::Zero }
                        } else {
                            ExtentState::Data
                        },
                    })
                    .collect())
            }
        }
    }

    /// Reads `len` bytes at `offset`; what lies past the source's end reads as zeroes (see
    /// [`Source::allocation`]). An NBD source is read in requests within its maximum block
    /// size, which may be smaller than a destination's unit.
    pub async fn read(&self, offset: u64, len: usize) -> Result<IoBuf> {
        let within = usize::try_from(self.size().saturating_sub(offset)).unwrap_or(usize::MAX).min(len);
        if within < len {
            let mut buf = IoBuf::new(len);
            if within > 0 {
                let part = Box::pin(self.read(offset, within)).await?;
                buf[..within].copy_from_slice(&part);
            }
            return Ok(buf);
        }
        match self {
            Source::Image(i) | Source::Diff { image: i, .. } => {
                let (buf, r) = i.read(offset, IoBuf::for_overwrite(len)).await;
                r.with_context(|| format!("reading source at {offset}"))?;
                Ok(buf)
            }
            Source::Nbd(c) => {
                let max = self.max_read().max(1);
                if len <= max {
                    return Ok(IoBuf::from_vec(c.read(offset, len).await.with_context(|| format!("reading source at {offset}"))?));
                }
                let mut buf = IoBuf::for_overwrite(len);
                let mut at = 0;
                while at < len {
                    let n = (len - at).min(max);
                    let off = offset + at as u64;
                    let part = c.read(off, n).await.with_context(|| format!("reading source at {off}"))?;
                    buf[at..at + n].copy_from_slice(&part);
                    at += n;
                }
                Ok(buf)
            }
        }
    }
}

/// Where the data goes.
pub enum Dest<J: Image> {
    /// One or more connections to one NBD export (several only when it offers multi-conn).
    Nbd {
        /// The connections, used round-robin.
        clients: Vec<NbdClient>,
        /// Next connection to use.
        next: AtomicUsize,
    },
    /// An image file.
    Image(Arc<J>),
}

impl<J: Image> Dest<J> {
    /// A destination over `clients`, which must all reach the same export.
    pub fn nbd(clients: Vec<NbdClient>) -> Result<Dest<J>> {
        let Some(first) = clients.first() else { bail!("no destination connection") };
        if first.info().has(tflags::READ_ONLY) {
            bail!("the destination export is read-only");
        }
        Ok(Dest::Nbd { clients, next: AtomicUsize::new(0) })
    }

    fn client(&self) -> Option<&NbdClient> {
        match self {
            Dest::Nbd { clients, next } => clients.get(next.fetch_add(1, Ordering::Relaxed) % clients.len()),
            Dest::Image(_) => None,
        }
    }

    /// Virtual size in bytes.
    pub fn size(&self) -> u64 {
        match self {
            Dest::Nbd { clients, .. } => clients.first().map(|c| c.size()).unwrap_or(0),
            Dest::Image(i) => i.size(),
        }
    }

    /// Largest write this destination takes in one request.
    pub fn max_write(&self) -> usize {
        match self {
            Dest::Nbd { clients, .. } => clients.first().map(|c| c.info().block_size.maximum as usize).unwrap_or(1 << 20),
            Dest::Image(_) => 32 << 20,
        }
    }

    /// The unit every write and zeroing must be aligned to (a power of two): the export's
    /// minimum block size, or the image's.
    pub fn min_write(&self) -> u64 {
        let unit = match self {
            Dest::Nbd { clients, .. } => clients.first().map_or(1, |c| c.info().block_size.minimum),
            Dest::Image(i) => i.features().min_block,
        };
        u64::from(unit.max(1))
    }

    /// Whether zeroing is possible without writing zero buffers over the wire.
    pub fn can_zero(&self) -> bool {
        match self {
            Dest::Nbd { clients, .. } => clients.first().is_some_and(|c| c.info().has(tflags::SEND_WRITE_ZEROES)),
            Dest::Image(_) => true,
        }
    }

    /// Reads `len` bytes at `offset` back (to check what a checkpoint says is there).
    pub async fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>> {
        match self {
            Dest::Nbd { .. } => {
                let c = self.client().context("no destination connection")?;
                c.read(offset, len).await.with_context(|| format!("reading destination at {offset}"))
            }
            Dest::Image(i) => {
                let (buf, r) = i.read(offset, IoBuf::for_overwrite(len)).await;
                r.with_context(|| format!("reading destination at {offset}"))?;
                Ok(buf.to_vec())
            }
        }
    }

    /// Writes `buf[range]` at `offset`.
    pub async fn write(&self, offset: u64, buf: &Arc<IoBuf>, range: std::ops::Range<usize>) -> Result<()> {
        match self {
            Dest::Nbd { .. } => {
                let c = self.client().context("no destination connection")?;
                let payload = if range.start == 0 && range.end == buf.len() {
                    Payload::Shared(Arc::clone(buf))
                } else {
                    Payload::Slice(Arc::clone(buf), range)
                };
                c.write(offset, payload, false).await.with_context(|| format!("writing destination at {offset}"))
            }
            Dest::Image(i) => {
                let data = if range.start == 0 && range.end == buf.len() {
                    Arc::clone(buf)
                } else {
                    let mut part = IoBuf::for_overwrite(range.len());
                    part.copy_from_slice(&buf[range]);
                    Arc::new(part)
                };
                i.write(offset, data, Durability::Cached).await.with_context(|| format!("writing destination at {offset}"))
            }
        }
    }

    /// Makes `[offset, offset + len)` read as zeroes (deallocating where the target can).
    pub async fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        match self {
            Dest::Nbd { .. } => {
                let c = self.client().context("no destination connection")?;
                c.zero(offset, len, false, false).await.with_context(|| format!("zeroing destination at {offset}"))
            }
            Dest::Image(i) => i
                .write_zeroes(offset, len, ZeroAlloc::MayDeallocate, ZeroSpeed::Any, Durability::Cached)
                .await
                .with_context(|| format!("zeroing destination at {offset}")),
        }
    }

    /// Makes every completed write durable (one flush covers all connections of a multi-conn
    /// export; every connection is flushed otherwise).
    pub async fn flush(&self) -> Result<()> {
        match self {
            Dest::Nbd { clients, .. } => {
                let multi = clients.first().is_some_and(|c| c.info().has(tflags::CAN_MULTI_CONN));
                let n = if multi { 1 } else { clients.len() };
                for c in clients.iter().take(n) {
                    if c.info().has(tflags::SEND_FLUSH) {
                        c.flush().await.context("flushing destination")?;
                    }
                }
                Ok(())
            }
            Dest::Image(i) => i.flush().await.context("flushing destination"),
        }
    }
}
