//! Disk images behind one trait: what the NBD server, the copy and the mirror need of a disk.
//!
//! The trait is defined here by its consumers (the server and, later, copy and mirror) and
//! implemented per format (raw, VHD, qcow2); `AnyImage` picks one by name or magic. Operations
//! take owned buffers (see `io::IoBuf`) so a driver can hand them to io_uring without copying.
//!
//! ```text
//!            Image (size, features, read, write, write_zeroes, trim, flush, allocation)
//!              ▲
//!     ┌────────┼──────────┐
//!   RawImage   VhdImage   Qcow2Image      AnyImage: one of them, chosen at run time
//! ```

mod any;
pub mod qcow2;
pub mod raw;
pub mod vhd;

use std::future::Future;
use std::io;
use std::path::Path;
use std::sync::Arc;

use crate::io::{Durability, IoBuf};

pub use any::{AnyImage, Format, checksums};
pub use raw::RawImage;

/// Whether an image is opened for writing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Reads only; files are opened `O_RDONLY`.
    ReadOnly,
    /// Reads and writes (of the leaf, for chains).
    ReadWrite,
}

/// What an image can do; the server derives its transmission flags from this.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Features {
    /// Writes, zeroes and trims are refused.
    pub read_only: bool,
    /// `trim` can deallocate.
    pub trim: bool,
    /// `write_zeroes` with `ZeroAlloc::Keep` and `ZeroSpeed::FastOnly` can succeed (zeroing is
    /// cheaper than writing zeroes).
    pub fast_zero: bool,
    /// Every handle to the image sees the same data and one flush covers all of them, so several
    /// NBD connections may share it (`NBD_FLAG_CAN_MULTI_CONN`).
    pub multi_conn: bool,
    /// The smallest unit (a power of two) in which a write lands as it is: the NBD server
    /// advertises it as its minimum block size and refuses requests not aligned to it. 1 where
    /// any byte range is written as given (raw; qcow2, which orders a partial cluster write
    /// after the fill of its backing). 512 for VHD, whose unit is the sector:
    /// a write of part of a sector would be completed with the bytes the chain below holds at
    /// that instant and frozen into the leaf, which is wrong when the layer below is still
    /// being filled (a migration's leaf, composed later onto the copied parent).
    pub min_block: u32,
}

/// Whether zeroing may deallocate the range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ZeroAlloc {
    /// The range may become a hole (NBD's default).
    MayDeallocate,
    /// The range must stay allocated (`NBD_CMD_FLAG_NO_HOLE`).
    Keep,
}

/// Whether a slow zeroing (writing zero buffers) is acceptable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ZeroSpeed {
    /// Any way that leaves zeroes.
    Any,
    /// Fail with `ImageError::NotFast` rather than write zero buffers (`NBD_CMD_FLAG_FAST_ZERO`).
    FastOnly,
}

/// What a range of an image holds, as far as the format knows without reading data.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ExtentState {
    /// Allocated; may hold anything.
    Data,
    /// Allocated and known to read as zeroes.
    Zero,
    /// Not allocated anywhere in the image (for a chain: in any layer); reads as zeroes.
    Hole,
}

/// A run of one state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Extent {
    /// First byte.
    pub offset: u64,
    /// Length in bytes (never 0).
    pub length: u64,
    /// What the run holds.
    pub state: ExtentState,
}

/// Why an image operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The range does not lie inside the image.
    #[error("range {offset}+{length} outside image of {size} bytes")]
    OutOfRange {
        /// First byte asked for.
        offset: u64,
        /// Bytes asked for.
        length: u64,
        /// Image size.
        size: u64,
    },
    /// The image is read-only.
    #[error("image is read-only")]
    ReadOnly,
    /// Fast zeroing was asked for and is not possible here.
    #[error("zeroing would not be faster than writing")]
    NotFast,
    /// The operating system refused the I/O.
    #[error("{op} at offset {offset}")]
    Io {
        /// Operation that failed.
        op: &'static str,
        /// Where.
        offset: u64,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

impl ImageError {
    /// The OS error number underneath, if any (to map `ENOSPC` and friends onto the wire).
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            ImageError::Io { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}

/// Result of image operations.
pub type Result<T> = std::result::Result<T, ImageError>;

/// A disk image as the data path sees it. Implementations are shared between connections and
/// tasks (`Send + Sync`) and must give every caller the same view of the data.
pub trait Image: Send + Sync + 'static {
    /// Virtual size in bytes.
    fn size(&self) -> u64;

    /// Capabilities.
    fn features(&self) -> Features;

    /// Fills `buf` with the bytes at `[offset, offset + buf.len())`. The buffer comes back in
    /// every case, so the caller can reuse or release it.
    fn read(&self, offset: u64, buf: IoBuf) -> impl Future<Output = (IoBuf, Result<()>)> + Send;

    /// Writes all of `buf` at `offset`.
    fn write(&self, offset: u64, buf: Arc<IoBuf>, durability: Durability) -> impl Future<Output = Result<()>> + Send;

    /// Makes `[offset, offset + length)` read as zeroes.
    fn write_zeroes(
        &self,
        offset: u64,
        length: u64,
        alloc: ZeroAlloc,
        speed: ZeroSpeed,
        durability: Durability,
    ) -> impl Future<Output = Result<()>> + Send;

    /// Hints that `[offset, offset + length)` is unused; contents afterwards are unspecified.
    fn trim(&self, offset: u64, length: u64) -> impl Future<Output = Result<()>> + Send;

    /// Makes every completed write durable.
    fn flush(&self) -> impl Future<Output = Result<()>> + Send;

    /// Writes out the metadata a format keeps ahead of its file between flushes (VHD's bitmaps
    /// and BAT entries: `vhd/mod.rs`, "Sync points"), in the same crash-safe order, without a
    /// flush's final sync. `tapmirror serve` calls it every [`METADATA_SYNC_EVERY`], so a crash
    /// loses at most about that much of the writes not flushed yet, and a flush (at a
    /// migration's switch-over, with the guest paused) has little left to write. Nothing to do
    /// for the other formats.
    fn sync_metadata(&self) -> impl Future<Output = Result<()>> + Send {
        std::future::ready(Ok(()))
    }

    /// The files the image reads, its own first, then its backing chain's; empty where it
    /// cannot tell (a raw image, which has no chain to say where it came from).
    fn files(&self) -> Vec<std::path::PathBuf> {
        Vec::new()
    }

    /// The allocation of `[offset, offset + length)`: at most `limit` (at least 1) consecutive
    /// extents that start at `offset` and cover at least one byte, never past
    /// `offset + length`. May stop early (callers ask again from where it ended); a caller that
    /// wants only the first extent passes 1, so the cost stays proportional to what is used.
    fn allocation(&self, offset: u64, length: u64, limit: usize) -> impl Future<Output = Result<Vec<Extent>>> + Send;
}

/// How often `tapmirror serve` writes out lagging metadata ([`Image::sync_metadata`]).
pub const METADATA_SYNC_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Whether `path` is something an image can live in: a regular file or a block device. A FIFO
/// named as a backing or parent would block its open for ever, and a character device
/// (`/dev/zero`, a terminal) is no disk. Asked before a chain's files are opened.
pub fn holds_an_image(path: &Path) -> io::Result<bool> {
    use std::os::unix::fs::FileTypeExt;
    let kind = std::fs::metadata(path)?.file_type();
    Ok(kind.is_file() || kind.is_block_device())
}

/// The length of `file` in bytes. `metadata().len()` is 0 for a block device (an LVM volume,
/// say), whose length is where its end lies.
pub fn byte_len(file: &std::fs::File) -> io::Result<u64> {
    use std::io::Seek;
    use std::os::unix::fs::FileTypeExt;
    let meta = file.metadata()?;
    if meta.file_type().is_block_device() {
        // Only the shared file position moves; every read and write here is positioned.
        let mut f = file;
        return f.seek(io::SeekFrom::End(0));
    }
    Ok(meta.len())
}

/// `lseek(file, offset, SEEK_DATA)` (`data` true) or `SEEK_HOLE`: the next offset at or after
/// `offset` that holds data, or that lies in a hole (the end of the file counts as one). `None`
/// when there is none (ENXIO: past the last data, or at or past the end).
///
/// Block devices refuse both (EINVAL): there, every byte is data, as QEMU also reports them.
pub fn seek_data_or_hole(file: &std::fs::File, offset: u64, data: bool) -> io::Result<Option<u64>> {
    use std::os::fd::AsRawFd;
    let off = i64::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let whence = if data { libc::SEEK_DATA } else { libc::SEEK_HOLE };
    // SAFETY: lseek on a descriptor that `file` keeps open; no memory is involved.
    let r = unsafe { libc::lseek(file.as_raw_fd(), off, whence) };
    if r >= 0 {
        return Ok(Some(r as u64));
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::ENXIO) => Ok(None),
        Some(libc::EINVAL) if is_block_device(file) => Ok(if data { Some(offset) } else { None }),
        _ => Err(e),
    }
}

fn is_block_device(file: &std::fs::File) -> bool {
    use std::os::unix::fs::FileTypeExt;
    file.metadata().is_ok_and(|m| m.file_type().is_block_device())
}

/// How long a held lock is retried before the file counts as busy. A process that held the
/// lock and died releases it only when its last reference to the file goes, and a file
/// registered with io_uring is released by the kernel's asynchronous ring teardown, a little
/// after the process has been reaped: a datapath restarted right after a crash must not fail
/// on its own predecessor's lock.
pub const LOCK_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// Takes an exclusive `flock` on `file`, held until the file is closed, so that no two writers
/// (two datapaths, a datapath and a resize) open one image, and checks that no QEMU process
/// writes it ([`qemu_writes`]). (QEMU does not see the `flock`: image opens keep QEMU writers
/// out with [`QemuLock`].) Retries for [`LOCK_GRACE`]; `Ok(false)` when the file is still
/// another's then.
pub fn lock_exclusive(file: &std::fs::File) -> io::Result<bool> {
    take_flock(file, libc::LOCK_EX)
}

/// Takes a shared `flock` on `file`, held until the file is closed, for a reader that must not
/// read the image while anyone writes it (`copy` of an image file): no writer of ours can
/// open it meanwhile, and [`qemu_writes`] says no QEMU process writes it. Retries for
/// [`LOCK_GRACE`], as [`lock_exclusive`] does; `Ok(false)` when a writer still holds it then.
pub fn lock_shared(file: &std::fs::File) -> io::Result<bool> {
    take_flock(file, libc::LOCK_SH)
}

fn take_flock(file: &std::fs::File, kind: libc::c_int) -> io::Result<bool> {
    use std::os::fd::AsRawFd;
    let deadline = std::time::Instant::now() + LOCK_GRACE;
    loop {
        // SAFETY: flock on a descriptor `file` keeps open; no memory is passed.
        let rc = unsafe { libc::flock(file.as_raw_fd(), kind | libc::LOCK_NB) };
        if rc == 0 && !qemu_writes(file)? {
            return Ok(true);
        }
        if rc != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(e);
            }
        }
        if std::time::Instant::now() >= deadline {
            return Ok(false);
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Byte of QEMU's lock protocol held by a process that lets nobody else write the image
/// (200 plus the bit of the "write" permission).
const QEMU_UNSHARE_WRITE_BYTE: libc::off_t = 201;

/// QEMU's "write not shared" lock on an image file (a shared OFD lock on byte 201, 200 plus the
/// bit of its "write" permission), held for as long as the value lives. QEMU's file driver
/// reads it as another QEMU's: a QEMU process (qemu-io, qemu-img convert -n, a VM) asking to
/// write the file is refused ("Failed to get "write" lock"). Readers are not kept out (byte
/// 101, "writes", stays free: `qemu-img info` works without `-U`). Held by writers and by
/// read-only opens (the files a served image reads through, as QEMU holds it on backing
/// files); our own writers never test it, so sxm's coalesce still writes a hidden parent a
/// paused datapath reads.
///
/// It lives on a descriptor of its own, never handed to io_uring: a file registered with a ring
/// is let go of only when the kernel has torn the ring down, a moment after the process is
/// gone, and QEMU must be able to write the file as soon as we are. Best effort: a file system
/// without OFD locks has no QEMU locking either.
#[derive(Debug)]
pub struct QemuLock(#[allow(dead_code)] Option<std::fs::File>);

impl QemuLock {
    /// Takes the lock on the file `file` is open on.
    pub fn on(file: &std::fs::File) -> QemuLock {
        use std::os::fd::AsRawFd;
        // A new open file description of the same file (not a `dup`, which would share the
        // description, and the ring's reference to it).
        let own = match std::fs::File::open(format!("/proc/self/fd/{}", file.as_raw_fd())) {
            Ok(f) => f,
            Err(e) => {
                tracing::debug!(error = %e, "no descriptor of its own for QEMU's lock byte");
                return QemuLock(None);
            }
        };
        // SAFETY: an all-zero `flock` is a valid value of this plain C struct.
        let mut lock: libc::flock = unsafe { std::mem::zeroed() };
        lock.l_type = libc::F_RDLCK as libc::c_short;
        lock.l_whence = libc::SEEK_SET as libc::c_short;
        lock.l_start = QEMU_UNSHARE_WRITE_BYTE;
        lock.l_len = 1;
        // SAFETY: F_OFD_SETLK reads `lock`, which lives across the call; the descriptor is open.
        if unsafe { libc::fcntl(own.as_raw_fd(), libc::F_OFD_SETLK, &lock) } < 0 {
            tracing::debug!(error = %io::Error::last_os_error(), "could not take QEMU's unshare-write lock byte");
            return QemuLock(None);
        }
        QemuLock(Some(own))
    }
}

/// Lets go of a writer's `flock` on `file` at once. Closing the file would too, but a file
/// registered with io_uring is released only when the kernel has torn its ring down, a little
/// after: the next writer must not find the file busy then.
pub fn release_writer_lock(file: &std::fs::File) {
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a descriptor `file` keeps open; no memory is passed.
    unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_UN) };
}

/// Whether a QEMU process (a VM, qemu-img, qemu-io, qemu-nbd) has `file` open for writing.
/// QEMU's file driver holds a shared OFD lock on byte 101 (100 plus the bit of its "write"
/// permission) for as long as it may write.
pub fn qemu_writes(file: &std::fs::File) -> io::Result<bool> {
    use std::os::fd::AsRawFd;
    const QEMU_WRITE_PERM_BYTE: libc::off_t = 101;
    // SAFETY: an all-zero `flock` is a valid value of this plain C struct.
    let mut probe: libc::flock = unsafe { std::mem::zeroed() };
    probe.l_type = libc::F_WRLCK as libc::c_short;
    probe.l_whence = libc::SEEK_SET as libc::c_short;
    probe.l_start = QEMU_WRITE_PERM_BYTE;
    probe.l_len = 1;
    // SAFETY: F_OFD_GETLK fills `probe`, which lives across the call; the descriptor is open.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut probe) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            // A file system without OFD locks cannot tell, and QEMU cannot lock there either:
            // as QEMU does, go on without.
            Some(libc::ENOLCK | libc::EINVAL | libc::EOPNOTSUPP) => {
                tracing::debug!(error = %e, "cannot test QEMU's write lock here");
                Ok(false)
            }
            _ => Err(e),
        };
    }
    Ok(probe.l_type != libc::F_UNLCK as libc::c_short)
}

/// Checks that `[offset, offset + length)` lies inside `size`.
pub fn check_range(offset: u64, length: u64, size: u64) -> Result<()> {
    match offset.checked_add(length) {
        Some(end) if end <= size => Ok(()),
        _ => Err(ImageError::OutOfRange { offset, length, size }),
    }
}
