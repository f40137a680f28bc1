//! imago's `Storage` trait on top of our `FileIo`, so qcow2 I/O takes the io_uring path (or the
//! portable thread-pool path) like every other driver.
//!
//! imago hands a storage driver *borrowed* buffers (`IoVector<'_>`, `IoVectorMut<'_>`) inside
//! futures it may drop at any time; io_uring needs memory that outlives the kernel's use of it,
//! however the future ends. So every request is bounced through an owned `IoBuf` (a registered
//! slot up to 256 KiB): one `memcpy` per request, which is what makes the fit sound. Modifying
//! requests (writes, zeroing, discards) also run in their own task and are counted, so
//! `settle_writes` can wait for a write whose future was dropped but whose bytes the kernel may
//! still be moving — imago 0.2.6 documents that this method must be overridden by any driver
//! whose writes can outlive their futures, as io_uring writes can.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::future::Future;
use std::io::{self, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use imago::io_buffers::{IoVector, IoVectorMut};
use imago::storage::PreallocateMode;
use imago::storage::drivers::CommonStorageHelper;

use crate::io::{Durability, EngineKind, Fallocate, FileIo, IoBuf};

/// Size of the shared zero buffer used when zeroing has to write.
const ZERO_CHUNK: usize = 1 << 20;

/// Modifying requests still running, and a way to wait until there are none.
#[derive(Default)]
struct Pending {
    count: AtomicUsize,
    idle: tokio::sync::Notify,
}

/// Decrements `Pending` when the request's task ends (or is torn down with its runtime).
struct PendingGuard(Arc<Pending>);

impl Drop for PendingGuard {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// One image file (a chain layer) as an imago storage object.
pub struct IoStorage {
    io: Arc<FileIo>,
    path: PathBuf,
    /// The file length as far as our own requests know it (they only ever grow it).
    size: AtomicU64,
    helper: CommonStorageHelper,
    pending: Arc<Pending>,
    /// Cleared the first time the file system refuses `FALLOC_FL_PUNCH_HOLE`.
    punch_works: Arc<AtomicBool>,
    /// Cleared the first time the file system refuses `FALLOC_FL_ZERO_RANGE`.
    zero_range_works: Arc<AtomicBool>,
    /// Reads show the v3 header's corrupt bit (incompatible bit 1, in byte 79) cleared: set
    /// only for a layer opened read-only, see [`IoStorage::hide_corrupt_bit`].
    hide_corrupt_bit: bool,
    /// QEMU's "write not shared" lock on a read-only layer's file.
    _qemu_lock: Option<crate::image::QemuLock>,
}

impl IoStorage {
    /// Opens an existing file; `writable` opens it `O_RDWR`, else `O_RDONLY`.
    pub async fn open(path: &Path, writable: bool, engine: EngineKind) -> io::Result<IoStorage> {
        let file = OpenOptions::new().read(true).write(writable).open(path)?;
        // A backing file: what we read must not change under us. (A writable top has the
        // image's writer lock, which holds it.)
        let qemu_lock = (!writable).then(|| crate::image::QemuLock::on(&file));
        let mut storage = IoStorage::from_file(file, path, engine).await?;
        storage._qemu_lock = qemu_lock;
        Ok(storage)
    }

    /// Creates a new, empty file; fails if `path` exists.
    pub async fn create_new(path: &Path, engine: EngineKind) -> io::Result<IoStorage> {
        let file = OpenOptions::new().read(true).write(true).create_new(true).open(path)?;
        IoStorage::from_file(file, path, engine).await
    }

    /// For a read-only v3 qcow2 layer that QEMU (or our guard) marked corrupt: imago refuses
    /// every open of such a file, read-only too, where QEMU refuses only writers, so a damaged
    /// disk can still be read out. Reads of the header show the bit cleared; nothing is written.
    pub fn hide_corrupt_bit(mut self) -> IoStorage {
        self.hide_corrupt_bit = true;
        self
    }

    /// The file's I/O handle, shared.
    pub fn file_io(&self) -> Arc<FileIo> {
        Arc::clone(&self.io)
    }

    async fn from_file(mut file: File, path: &Path, engine: EngineKind) -> io::Result<IoStorage> {
        let size = file.seek(SeekFrom::End(0))?;
        Ok(IoStorage {
            io: Arc::new(FileIo::new(file, engine).await?),
            path: path.to_owned(),
            size: AtomicU64::new(size),
            helper: CommonStorageHelper::default(),
            pending: Arc::default(),
            punch_works: Arc::new(AtomicBool::new(true)),
            zero_range_works: Arc::new(AtomicBool::new(true)),
            hide_corrupt_bit: false,
            _qemu_lock: None,
        })
    }

    /// The next offset at or after `offset` that holds data (`SEEK_DATA`); `None` past the last.
    pub fn seek_data(&self, offset: u64) -> io::Result<Option<u64>> {
        crate::image::seek_data_or_hole(self.io.file(), offset, true)
    }

    /// The next offset at or after `offset` in a hole (`SEEK_HOLE`; end of file counts).
    pub fn seek_hole(&self, offset: u64) -> io::Result<Option<u64>> {
        crate::image::seek_data_or_hole(self.io.file(), offset, false)
    }

    /// Runs a modifying request in its own task, so it completes (and is counted until it does)
    /// even when the caller's future is dropped.
    async fn modify<T, F>(&self, f: F) -> io::Result<T>
    where
        T: Send + 'static,
        F: Future<Output = io::Result<T>> + Send + 'static,
    {
        self.pending.count.fetch_add(1, Ordering::AcqRel);
        let guard = PendingGuard(Arc::clone(&self.pending));
        tokio::spawn(async move {
            let _guard = guard;
            f.await
        })
        .await
        .map_err(io::Error::other)?
    }

    /// `fallocate(mode)`; `Ok(false)` when the file system does not support the mode.
    async fn falloc(&self, mode: Fallocate, offset: u64, len: u64) -> io::Result<bool> {
        let flag = match mode {
            Fallocate::PunchHole => Arc::clone(&self.punch_works),
            Fallocate::ZeroRange => Arc::clone(&self.zero_range_works),
        };
        if !flag.load(Ordering::Relaxed) {
            return Ok(false);
        }
        let io = Arc::clone(&self.io);
        self.modify(async move {
            match io.fallocate(mode, offset, len).await {
                Ok(()) => Ok(true),
                Err(e) if e.kind() == io::ErrorKind::Unsupported => {
                    flag.store(false, Ordering::Relaxed);
                    Ok(false)
                }
                Err(e) => Err(e),
            }
        })
        .await
    }

    async fn write_zero_buffers(&self, offset: u64, length: u64) -> io::Result<()> {
        static ZEROES: OnceLock<Arc<IoBuf>> = OnceLock::new();
        let zeroes = Arc::clone(ZEROES.get_or_init(|| Arc::new(IoBuf::from_vec(vec![0u8; ZERO_CHUNK]))));
        let io = Arc::clone(&self.io);
        self.modify(async move {
            let mut done = 0u64;
            while done < length {
                let n = (length - done).min(ZERO_CHUNK as u64) as usize;
                io.write_all_at(&zeroes, 0..n, offset + done, Durability::Cached).await?;
                done += n as u64;
            }
            Ok(())
        })
        .await?;
        self.size.fetch_max(offset + length, Ordering::AcqRel);
        Ok(())
    }

    /// Makes `[offset, offset + length)` read as zeroes, growing the file when the range reaches
    /// past its end. `keep_allocated` forbids punching holes.
    async fn zero(&self, offset: u64, length: u64, keep_allocated: bool) -> io::Result<()> {
        let end = offset.checked_add(length).ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        let size = self.size.load(Ordering::Acquire);
        let inside_end = end.min(size);
        if offset < inside_end {
            let len = inside_end - offset;
            let mut done = !keep_allocated && self.falloc(Fallocate::PunchHole, offset, len).await?;
            if !done {
                done = self.falloc(Fallocate::ZeroRange, offset, len).await?;
            }
            if !done {
                self.write_zero_buffers(offset, len).await?;
            }
        }
        // Past the end, write real zeroes: a write only ever grows the file, whereas
        // `set_len` could cut off a concurrent write that has just grown it further.
        let tail = offset.max(size);
        if end > tail {
            self.write_zero_buffers(tail, end - tail).await?;
        }
        Ok(())
    }
}

impl fmt::Debug for IoStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IoStorage").field("path", &self.path).field("engine", &self.io.kind()).finish()
    }
}

impl fmt::Display for IoStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.path.display())
    }
}

impl imago::Storage for IoStorage {
    fn size(&self) -> io::Result<u64> {
        Ok(self.size.load(Ordering::Acquire))
    }

    fn resolve_relative_path<P: AsRef<Path>>(&self, relative: P) -> io::Result<PathBuf> {
        let relative = relative.as_ref();
        if relative.is_absolute() {
            return Ok(relative.to_owned());
        }
        let dir = self.path.parent().ok_or_else(|| io::Error::other("image path has no parent folder"))?;
        Ok(dir.join(relative))
    }

    fn get_filename(&self) -> Option<PathBuf> {
        Some(self.path.clone())
    }

    async unsafe fn pure_readv(&self, mut bufv: IoVectorMut<'_>, offset: u64) -> io::Result<()> {
        let total = bufv.len();
        // Past the end of the file reads as zeroes (the trait's contract, and what QEMU does).
        // Another writer may have grown a backing file since we looked: ask again first.
        let mut size = self.size.load(Ordering::Acquire);
        if offset.saturating_add(total) > size {
            self.size.fetch_max(crate::image::byte_len(self.io.file())?, Ordering::AcqRel);
            size = self.size.load(Ordering::Acquire);
        }
        let mut readable = total.min(size.saturating_sub(offset));
        if readable == 0 {
            bufv.fill(0);
            return Ok(());
        }
        let (mut buf, mut r) = self.io.read_exact_at(IoBuf::for_overwrite(readable as usize), offset).await;
        if r.as_ref().is_err_and(|e| e.kind() == io::ErrorKind::UnexpectedEof) {
            // Truncated behind our back: read what is there.
            let real = crate::image::byte_len(self.io.file())?;
            readable = total.min(real.saturating_sub(offset));
            (buf, r) = self.io.read_exact_at(IoBuf::for_overwrite(readable as usize), offset).await;
        }
        r?;
        const CORRUPT_BYTE: u64 = 79;
        if self.hide_corrupt_bit && (offset..offset + readable).contains(&CORRUPT_BYTE) {
            buf[(CORRUPT_BYTE - offset) as usize] &= !(super::header::INCOMPAT_CORRUPT as u8);
        }
        let (mut head, mut tail) = bufv.split_at(readable);
        head.copy_from_slice(&buf);
        tail.fill(0);
        Ok(())
    }

    async unsafe fn pure_writev(&self, bufv: IoVector<'_>, offset: u64) -> io::Result<()> {
        let len = bufv.len();
        if len == 0 {
            return Ok(());
        }
        let end = offset.checked_add(len).ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        let mut buf = IoBuf::for_overwrite(len as usize);
        bufv.copy_into_slice(&mut buf);
        let buf = Arc::new(buf);
        let io = Arc::clone(&self.io);
        self.modify(async move { io.write_all_at(&buf, 0..len as usize, offset, Durability::Cached).await })
            .await?;
        self.size.fetch_max(end, Ordering::AcqRel);
        Ok(())
    }

    async unsafe fn pure_write_zeroes(&self, offset: u64, length: u64) -> io::Result<()> {
        self.zero(offset, length, false).await
    }

    async unsafe fn pure_write_allocated_zeroes(&self, offset: u64, length: u64) -> io::Result<()> {
        self.zero(offset, length, true).await
    }

    async unsafe fn pure_discard(&self, offset: u64, length: u64) -> io::Result<()> {
        let size = self.size.load(Ordering::Acquire);
        let end = offset.saturating_add(length).min(size);
        if offset < end {
            // A discard is a hint: when holes cannot be punched, doing nothing is correct.
            self.falloc(Fallocate::PunchHole, offset, end - offset).await?;
        }
        Ok(())
    }

    async fn flush(&self) -> io::Result<()> {
        // No buffers of our own: completed writes are in the page cache already.
        Ok(())
    }

    async fn sync(&self) -> io::Result<()> {
        self.io.sync_data().await
    }

    async fn settle_writes(&self) -> io::Result<()> {
        loop {
            let idle = self.pending.idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            if self.pending.count.load(Ordering::Acquire) == 0 {
                return Ok(());
            }
            idle.await;
        }
    }

    async unsafe fn invalidate_cache(&self) -> io::Result<()> {
        // No data cache; only the length may have changed under another writer.
        self.size.fetch_max(crate::image::byte_len(self.io.file())?, Ordering::AcqRel);
        Ok(())
    }

    fn get_storage_helper(&self) -> &CommonStorageHelper {
        &self.helper
    }

    async fn resize(&self, new_size: u64, prealloc_mode: PreallocateMode) -> io::Result<()> {
        match prealloc_mode {
            // Growing with set_len reads as zeroes; shrinking ignores the mode. Only create and
            // resize call this, never concurrently with writes.
            PreallocateMode::None | PreallocateMode::Zero => {
                self.settle_writes().await?;
                self.io.file().set_len(new_size)?;
                self.size.store(new_size, Ordering::Release);
                Ok(())
            }
            _ => Err(io::ErrorKind::Unsupported.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use imago::{Storage, StorageExt};

    #[tokio::test]
    async fn reads_past_the_end_are_zero_and_writes_grow_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("f");
        std::fs::write(&p, [7u8; 1000]).expect("write");
        let s = IoStorage::open(&p, true, EngineKind::Portable).await.expect("open");
        let mut buf = vec![1u8; 100];
        s.read(&mut buf[..], 950).await.expect("read");
        assert!(buf[..50].iter().all(|&b| b == 7) && buf[50..].iter().all(|&b| b == 0), "{buf:?}");
        s.write(&[9u8; 10][..], 2000).await.expect("write");
        assert_eq!(s.size().expect("size"), 2010);
        assert_eq!(std::fs::metadata(&p).expect("stat").len(), 2010);
        s.write_zeroes(2005, 100).await.expect("zeroes past eof");
        let data = std::fs::read(&p).expect("read back");
        assert_eq!(data.len(), 2105);
        assert_eq!(&data[2000..2005], &[9u8; 5]);
        assert!(data[2005..].iter().all(|&b| b == 0));
        s.settle_writes().await.expect("settle");
    }

    #[tokio::test]
    async fn a_dropped_write_is_still_awaited_by_settle_writes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("f");
        let s = IoStorage::create_new(&p, EngineKind::Portable).await.expect("create");
        let data = vec![5u8; 1 << 20];
        {
            let fut = s.write(&data[..], 0);
            tokio::pin!(fut);
            // Poll once so the write is submitted, then drop it.
            let _ = futures_poll_once(fut.as_mut()).await;
        }
        s.settle_writes().await.expect("settle");
        assert_eq!(s.pending.count.load(Ordering::Acquire), 0);
        let on_disk = std::fs::read(&p).expect("read back");
        assert!(on_disk.len() == 1 << 20 && on_disk.iter().all(|&b| b == 5), "the dropped write completed");
    }

    async fn futures_poll_once<F: Future + Unpin>(f: F) -> Option<F::Output> {
        let mut f = f;
        std::future::poll_fn(|cx| match std::pin::Pin::new(&mut f).poll(cx) {
            std::task::Poll::Ready(v) => std::task::Poll::Ready(Some(v)),
            std::task::Poll::Pending => std::task::Poll::Ready(None),
        })
        .await
    }
}
