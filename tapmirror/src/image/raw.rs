//! Raw images: the file's bytes are the disk's bytes.
//!
//! Allocation comes from `lseek(SEEK_DATA/SEEK_HOLE)`, trim punches holes, and zeroing uses
//! `fallocate` (punch a hole, or `FALLOC_FL_ZERO_RANGE` when the range must stay allocated),
//! falling back to writing zero buffers only when the caller accepts a slow zero.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

pub use super::Access;
use super::{Extent, ExtentState, Features, Image, ImageError, Result, ZeroAlloc, ZeroSpeed, check_range};
use crate::io::{Durability, EngineKind, Fallocate, FileIo, IoBuf};

/// Most extents one `allocation` call returns; callers continue from where it stopped.
const MAX_EXTENTS: usize = 4096;
/// Size of the zero buffer used when zeroing has to write.
const ZERO_CHUNK: usize = 1 << 20;

/// A raw image file.
pub struct RawImage {
    path: PathBuf,
    io: FileIo,
    size: u64,
    access: Access,
    /// Cleared the first time the file system refuses `FALLOC_FL_ZERO_RANGE`.
    zero_range_works: AtomicBool,
    /// Cleared the first time the file system refuses `FALLOC_FL_PUNCH_HOLE`.
    punch_works: AtomicBool,
    /// QEMU's "write not shared" lock on the file, as long as the image lives.
    _qemu_lock: super::QemuLock,
}

impl Drop for RawImage {
    /// Lets go of the writer's lock at once (see [`super::release_writer_lock`]).
    fn drop(&mut self) {
        if self.access == Access::ReadWrite {
            super::release_writer_lock(self.io.file());
        }
    }
}

impl RawImage {
    /// Opens `path` with the given access on the given I/O engine. A writable open takes the
    /// file's writer lock ([`super::lock_exclusive`]), as VHD and qcow2 images do and as QEMU
    /// locks raw images too: two writers of one disk, two datapaths or a datapath beside a VM,
    /// would overwrite each other's guest data. Refused with `ResourceBusy` while another
    /// holds it; readers are not stopped.
    pub async fn open(path: &Path, access: Access, engine: EngineKind) -> io::Result<RawImage> {
        // Before the open, which blocks for ever on a FIFO (`--format raw` skips the probe
        // that would have refused it).
        if !super::holds_an_image(path).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))? {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("{}: not a regular file or block device", path.display())));
        }
        let mut file = OpenOptions::new()
            .read(true)
            .write(access == Access::ReadWrite)
            .open(path)
            .map_err(|e| io::Error::new(e.kind(), format!("open {}: {e}", path.display())))?;
        if access == Access::ReadWrite {
            // The lock waits out a predecessor's late release for up to LOCK_GRACE: off the
            // async threads.
            let (locked, f) = tokio::task::spawn_blocking(move || (super::lock_exclusive(&file), file))
                .await
                .map_err(io::Error::other)?;
            file = f;
            match locked {
                Ok(true) => {}
                Ok(false) => {
                    return Err(io::Error::new(
                        io::ErrorKind::ResourceBusy,
                        format!("{}: in use: another writer (a datapath, or a QEMU process) has it open", path.display()),
                    ));
                }
                Err(e) => return Err(io::Error::new(e.kind(), format!("lock {}: {e}", path.display()))),
            }
        }
        // SEEK_END gives the size of block devices too, where metadata().len() is 0.
        let size = file.seek(SeekFrom::End(0))?;
        let qemu_lock = super::QemuLock::on(&file);
        let io = FileIo::new(file, engine).await?;
        tracing::debug!(path = %path.display(), size, engine = ?io.kind(), fixed = io.uses_fixed_buffers(), "raw image open");
        Ok(RawImage {
            path: path.to_owned(),
            io,
            size,
            access,
            zero_range_works: AtomicBool::new(true),
            punch_works: AtomicBool::new(true),
            _qemu_lock: qemu_lock,
        })
    }

    /// Creates a sparse raw file of `size` bytes (never over an existing one, nor through a
    /// symbolic link), and answers it open.
    pub fn create(path: &Path, size: u64) -> io::Result<File> {
        let f = File::options().write(true).create_new(true).open(path)?;
        // A size the file system refuses (past its largest file) leaves no empty file behind.
        match f.set_len(size) {
            Ok(()) => Ok(f),
            Err(e) => {
                let _ = std::fs::remove_file(path);
                Err(e)
            }
        }
    }

    /// The file this image reads.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The I/O engine in use.
    pub fn engine(&self) -> EngineKind {
        self.io.kind()
    }

    fn writable(&self) -> Result<()> {
        match self.access {
            Access::ReadOnly => Err(ImageError::ReadOnly),
            Access::ReadWrite => Ok(()),
        }
    }

    async fn fallocate(&self, mode: Fallocate, offset: u64, length: u64) -> std::result::Result<bool, ImageError> {
        let flag = match mode {
            Fallocate::PunchHole => &self.punch_works,
            Fallocate::ZeroRange => &self.zero_range_works,
        };
        if !flag.load(Ordering::Relaxed) {
            return Ok(false);
        }
        match self.io.fallocate(mode, offset, length).await {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::Unsupported => {
                flag.store(false, Ordering::Relaxed);
                tracing::debug!(?mode, "fallocate mode unsupported here; falling back");
                Ok(false)
            }
            Err(source) => Err(ImageError::Io { op: "fallocate", offset, source }),
        }
    }

    async fn write_zero_buffers(&self, offset: u64, length: u64) -> Result<()> {
        static ZEROES: OnceLock<Arc<IoBuf>> = OnceLock::new();
        let zeroes = ZEROES.get_or_init(|| Arc::new(IoBuf::from_vec(vec![0u8; ZERO_CHUNK])));
        let mut done = 0u64;
        while done < length {
            let n = (length - done).min(ZERO_CHUNK as u64) as usize;
            self.io
                .write_all_at(zeroes, 0..n, offset + done, Durability::Cached)
                .await
                .map_err(|source| ImageError::Io { op: "write zeroes", offset: offset + done, source })?;
            done += n as u64;
        }
        Ok(())
    }

    fn seek(&self, offset: u64, data: bool) -> io::Result<Option<u64>> {
        super::seek_data_or_hole(self.io.file(), offset, data)
    }
}

impl Image for RawImage {
    fn size(&self) -> u64 {
        self.size
    }

    fn features(&self) -> Features {
        Features {
            read_only: self.access == Access::ReadOnly,
            trim: true,
            fast_zero: true,
            // One file, one page cache: a flush on any connection covers every connection.
            multi_conn: true,
            min_block: 1,
        }
    }

    async fn read(&self, offset: u64, buf: IoBuf) -> (IoBuf, Result<()>) {
        if let Err(e) = check_range(offset, buf.len() as u64, self.size) {
            return (buf, Err(e));
        }
        let (buf, r) = self.io.read_exact_at(buf, offset).await;
        (buf, r.map_err(|source| ImageError::Io { op: "read", offset, source }))
    }

    async fn write(&self, offset: u64, buf: Arc<IoBuf>, durability: Durability) -> Result<()> {
        self.writable()?;
        check_range(offset, buf.len() as u64, self.size)?;
        let len = buf.len();
        self.io
            .write_all_at(&buf, 0..len, offset, durability)
            .await
            .map_err(|source| ImageError::Io { op: "write", offset, source })
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        length: u64,
        alloc: ZeroAlloc,
        speed: ZeroSpeed,
        durability: Durability,
    ) -> Result<()> {
        self.writable()?;
        check_range(offset, length, self.size)?;
        if length == 0 {
            return Ok(());
        }
        let mut done = alloc == ZeroAlloc::MayDeallocate && self.fallocate(Fallocate::PunchHole, offset, length).await?;
        if !done {
            done = self.fallocate(Fallocate::ZeroRange, offset, length).await?;
        }
        if !done {
            if speed == ZeroSpeed::FastOnly {
                return Err(ImageError::NotFast);
            }
            self.write_zero_buffers(offset, length).await?;
        }
        if durability == Durability::Stable {
            self.flush().await?;
        }
        Ok(())
    }

    async fn trim(&self, offset: u64, length: u64) -> Result<()> {
        self.writable()?;
        check_range(offset, length, self.size)?;
        if length > 0 {
            // A trim is only a hint: when holes cannot be punched, doing nothing is correct.
            self.fallocate(Fallocate::PunchHole, offset, length).await?;
        }
        Ok(())
    }

    async fn flush(&self) -> Result<()> {
        self.io.sync_data().await.map_err(|source| ImageError::Io { op: "flush", offset: 0, source })
    }

    async fn allocation(&self, offset: u64, length: u64, limit: usize) -> Result<Vec<Extent>> {
        let limit = limit.clamp(1, MAX_EXTENTS);
        check_range(offset, length, self.size)?;
        let end = offset + length;
        let mut out = Vec::new();
        let mut pos = offset;
        let io_err = |source| ImageError::Io { op: "seek", offset, source };
        // An extent is only final once the next one has started, so stop one past the limit.
        while pos < end && out.len() <= limit {
            let data = self.seek(pos, true).map_err(io_err)?.unwrap_or(end).min(end);
            if data > pos {
                push_extent(&mut out, pos, data - pos, ExtentState::Hole);
                pos = data;
                continue;
            }
            let hole = self.seek(pos, false).map_err(io_err)?.unwrap_or(end).min(end);
            // A hole at `pos` right after SEEK_DATA said data is at `pos` means the file changed
            // between the calls; report the byte as data (always a safe answer) and go on.
            let hole = hole.max(pos + 1);
            push_extent(&mut out, pos, hole - pos, ExtentState::Data);
            pos = hole;
        }
        out.truncate(limit);
        Ok(out)
    }
}

fn push_extent(out: &mut Vec<Extent>, offset: u64, length: u64, state: ExtentState) {
    if let Some(last) = out.last_mut()
        && last.state == state
        && last.offset + last.length == offset
    {
        last.length += length;
        return;
    }
    out.push(Extent { offset, length, state });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::EngineChoice;

    fn engines() -> Vec<EngineKind> {
        let mut v = vec![EngineKind::Portable];
        if let Ok(k) = EngineChoice::Uring.resolve() {
            v.push(k);
        }
        v
    }

    /// A FIFO or a character device named as a raw image is refused, never opened: the open
    /// of a FIFO would wait for a writer for ever.
    #[tokio::test]
    async fn what_cannot_hold_a_disk_is_refused_before_it_is_opened() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).expect("mkfifo");
        for path in [fifo.as_path(), Path::new("/dev/null")] {
            let (tx, rx) = std::sync::mpsc::channel();
            let p = path.to_owned();
            // On a thread of its own: a blocked open must fail the test, not hang it.
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
                let _ = tx.send(rt.block_on(RawImage::open(&p, Access::ReadOnly, EngineKind::Portable)).map(drop));
            });
            let got = rx.recv_timeout(std::time::Duration::from_secs(10)).expect("the open returned");
            let e = got.expect_err("refused");
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{}: {e}", path.display());
        }
    }

    async fn image(size: u64, kind: EngineKind) -> (tempfile::TempDir, RawImage) {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("disk.raw");
        RawImage::create(&p, size).expect("create");
        let img = RawImage::open(&p, Access::ReadWrite, kind).await.expect("open");
        (dir, img)
    }

    fn pattern(len: usize, seed: u8) -> Arc<IoBuf> {
        let mut b = IoBuf::new(len);
        for (i, x) in b.iter_mut().enumerate() {
            *x = seed.wrapping_add((i % 253) as u8) | 1;
        }
        Arc::new(b)
    }

    #[tokio::test]
    async fn allocation_follows_writes_and_trims() {
        for kind in engines() {
            let (_d, img) = image(8 << 20, kind).await;
            let all = img.allocation(0, img.size(), usize::MAX).await.expect("map");
            assert_eq!(all, vec![Extent { offset: 0, length: 8 << 20, state: ExtentState::Hole }]);
            img.write(1 << 20, pattern(1 << 20, 7), Durability::Cached).await.expect("write");
            let map = img.allocation(0, img.size(), usize::MAX).await.expect("map");
            assert!(map.iter().any(|e| e.state == ExtentState::Data && e.offset <= 1 << 20 && e.offset + e.length >= 2 << 20), "{map:?}");
            assert_eq!(map.iter().map(|e| e.length).sum::<u64>(), 8 << 20);
            let first = img.allocation(0, img.size(), 1).await.expect("first extent");
            assert_eq!(first, vec![Extent { offset: 0, length: 1 << 20, state: ExtentState::Hole }], "{kind:?}");
            img.trim(1 << 20, 1 << 20).await.expect("trim");
            let map = img.allocation(0, img.size(), usize::MAX).await.expect("map");
            assert!(map.iter().all(|e| e.state == ExtentState::Hole), "{kind:?} {map:?}");
        }
    }

    #[tokio::test]
    async fn zeroes_read_back_as_zero_in_every_mode() {
        for kind in engines() {
            let (_d, img) = image(4 << 20, kind).await;
            for (alloc, speed) in [
                (ZeroAlloc::MayDeallocate, ZeroSpeed::Any),
                (ZeroAlloc::Keep, ZeroSpeed::Any),
                (ZeroAlloc::Keep, ZeroSpeed::FastOnly),
            ] {
                img.write(0, pattern(1 << 20, 3), Durability::Cached).await.expect("write");
                match img.write_zeroes(4096, 65536 + 512, alloc, speed, Durability::Stable).await {
                    Ok(()) => {}
                    Err(ImageError::NotFast) => continue,
                    Err(e) => panic!("{e}"),
                }
                let (b, r) = img.read(0, IoBuf::new(1 << 20)).await;
                r.expect("read");
                assert!(b[..4096].iter().all(|&x| x != 0));
                assert!(b[4096..4096 + 65536 + 512].iter().all(|&x| x == 0), "{kind:?} {alloc:?}");
                assert!(b[4096 + 65536 + 512..].iter().all(|&x| x != 0));
            }
        }
    }

    #[tokio::test]
    async fn out_of_range_and_read_only_are_refused_without_touching_the_file() {
        let (dir, img) = image(1 << 20, EngineKind::Portable).await;
        let e = img.write(1 << 20, pattern(512, 1), Durability::Cached).await.expect_err("past end");
        assert!(matches!(e, ImageError::OutOfRange { .. }));
        let e = img.write_zeroes(u64::MAX - 10, 100, ZeroAlloc::Keep, ZeroSpeed::Any, Durability::Cached).await;
        assert!(matches!(e, Err(ImageError::OutOfRange { .. })));
        drop(img);
        let p = dir.path().join("disk.raw");
        let ro = RawImage::open(&p, Access::ReadOnly, EngineKind::Portable).await.expect("open ro");
        assert!(matches!(ro.write(0, pattern(512, 1), Durability::Cached).await, Err(ImageError::ReadOnly)));
        assert!(matches!(ro.trim(0, 512).await, Err(ImageError::ReadOnly)));
        assert_eq!(std::fs::metadata(&p).expect("stat").len(), 1 << 20);
        assert!(ro.allocation(0, 1 << 20, usize::MAX).await.expect("map").iter().all(|e| e.state == ExtentState::Hole));
    }

    #[tokio::test]
    async fn a_second_writer_is_refused_until_the_first_closes() {
        for kind in engines() {
            let (dir, first) = image(1 << 20, kind).await;
            let p = dir.path().join("disk.raw");
            first.write(0, pattern(4096, 5), Durability::Cached).await.expect("write");
            let e = RawImage::open(&p, Access::ReadWrite, kind).await.err().expect("a second writer");
            assert_eq!(e.kind(), io::ErrorKind::ResourceBusy, "{kind:?}: {e}");
            assert!(e.to_string().contains("in use"), "{kind:?}: {e}");
            let reader = RawImage::open(&p, Access::ReadOnly, kind).await.expect("a reader beside the writer");
            let (b, r) = reader.read(0, IoBuf::new(4096)).await;
            r.expect("read");
            assert_eq!(b[..], pattern(4096, 5)[..], "{kind:?}");
            drop(first);
            RawImage::open(&p, Access::ReadWrite, kind).await.expect("a writer once the first has closed");
        }
    }
}
