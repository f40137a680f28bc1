//! Unix stream sockets for NBD connections, split so that neither end wakes for nothing.
//!
//! tokio registers a socket for readability and writability at once, edge-triggered. On a Unix
//! socket the kernel signals writability each time the peer reads what was sent, since that
//! frees send buffer (`unix_write_space` wakes whoever polls for it; TCP signals only to a writer
//! that found its buffer full). A connection's thread asleep in `epoll_wait`, waiting for the
//! peer's answer, then wakes once per request with nothing to do. Measured with `strace -c` over
//! 20 000 sync-mirrored QD1 writes into `tapmirror serve`: the target called `epoll_wait` 2.03
//! times per request with tokio's streams, 1.03 with these (benches/README.md).
//!
//! Here the read half is registered for readability only. The write half writes without
//! waiting, on a duplicate descriptor, and registers that one for writability only while a
//! write waits for room.

use std::io::{self, IoSlice, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};

/// Splits a connected Unix stream socket, its send buffer widened as for every connection of
/// ours (`widen_send_buffer`). Must be called inside a tokio runtime.
pub fn split(stream: UnixStream) -> io::Result<(ReadHalf, WriteHalf)> {
    stream.set_nonblocking(true)?;
    widen_send_buffer(&stream);
    let writer = stream.try_clone()?;
    // SAFETY: the `AsyncFd` owns the stream, so its descriptor stays open and the same for the
    // registration's whole life.
    let reader = unsafe { AsyncFd::register_with_interest(stream, Interest::READABLE) }?;
    Ok((ReadHalf(reader), WriteHalf { waiting: None, stream: writer }))
}

/// What a Unix socket's send buffer is asked to hold: two 1 MiB requests or replies and then
/// some (the kernel doubles it for its own bookkeeping, within `net.core.wmem_max`).
const UNIX_SEND_BUFFER: usize = 2 << 20;

/// Widens a Unix socket's send buffer, on both ends of our connections. At the default (208 KiB)
/// a 1 MiB message fills it five times over, and each time the writer sleeps until the reader
/// drains it and the reader sleeps until more comes. Measured with perf and /proc counters:
/// `tapmirror copy` into qemu-nbd made half the context switches on both sides, with a quarter
/// fewer kernel instructions and 40-60% less CPU; `nbdcopy` reading out of `tapmirror serve`
/// a tenth of the context switches on both sides and a third less server CPU. TCP keeps the
/// kernel's autotuning, which a fixed size would turn off. Best effort: a refusal leaves the
/// default.
fn widen_send_buffer(socket: &impl std::os::fd::AsFd) {
    if let Err(e) = nix::sys::socket::setsockopt(socket, nix::sys::socket::sockopt::SndBuf, &UNIX_SEND_BUFFER) {
        tracing::debug!(error = %e, "could not widen a Unix socket's send buffer");
    }
}

/// The read half: registered for readability only.
pub struct ReadHalf(AsyncFd<UnixStream>);

impl AsyncRead for ReadHalf {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.0.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            let room = unfilled.len();
            match guard.get_inner().read(unfilled) {
                Ok(n) => {
                    // Less than there was room for: the socket is empty now, and more data
                    // will raise a new edge. Clearing spares the next read an `EAGAIN`, as
                    // tokio's own streams do.
                    if n > 0 && n < room {
                        guard.clear_ready();
                    }
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => guard.clear_ready(),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

/// A descriptor the write half registers while it waits, owned by the write half's stream.
struct Borrowed(RawFd);

impl AsRawFd for Borrowed {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

/// The write half: its own descriptor, registered for writability only while a write waits.
pub struct WriteHalf {
    /// The registration of a write that found the socket full, until a write goes through.
    /// Declared first, so that it is dropped before the descriptor it registers.
    waiting: Option<AsyncFd<Borrowed>>,
    stream: UnixStream,
}

/// Bytes written to socket `fd` that its peer has not yet taken (`TIOCOUTQ`), if it says.
pub(crate) fn unsent(fd: RawFd) -> Option<u64> {
    let mut n: libc::c_int = 0;
    // SAFETY: TIOCOUTQ writes one int through the pointer, which points at `n` for the call.
    let r = unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut n as *mut libc::c_int) };
    if r == 0 { u64::try_from(n).ok() } else { None }
}

impl WriteHalf {
    /// Bytes written that the peer has not yet taken ([`unsent`]).
    pub fn unsent(&self) -> Option<u64> {
        unsent(self.stream.as_raw_fd())
    }

    /// Writes what the socket takes now, without waiting: `WouldBlock` when it takes nothing.
    pub fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        loop {
            match (&self.stream).write_vectored(bufs) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                r => return r,
            }
        }
    }

    /// Waits until the socket has room, registered for just that wait. For a caller that
    /// writes with [`WriteHalf::try_write_vectored`]; not while an `AsyncWrite` write waits.
    pub async fn writable(&self) -> io::Result<()> {
        drop(self.register_writable()?.writable().await?);
        Ok(())
    }

    /// Registers the write half's descriptor for writability.
    fn register_writable(&self) -> io::Result<AsyncFd<Borrowed>> {
        // SAFETY: the registration never outlives `self.stream`, which owns the descriptor: it
        // lives in `waiting` (dropped first) or for one `writable` call that borrows `self`.
        Ok(unsafe { AsyncFd::register_with_interest(Borrowed(self.stream.as_raw_fd()), Interest::WRITABLE) }?)
    }

    fn poll_write_with(&mut self, cx: &mut Context<'_>, bufs: &[IoSlice<'_>]) -> Poll<io::Result<usize>> {
        loop {
            let Some(waiting) = &self.waiting else {
                match self.try_write_vectored(bufs) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        // Registering reports the socket's readiness as it is now, so room that
                        // came since the write above is not missed.
                        self.waiting = Some(self.register_writable()?);
                        continue;
                    }
                    r => return Poll::Ready(r),
                }
            };
            let mut guard = ready!(waiting.poll_write_ready(cx))?;
            if let Ok(r) = guard.try_io(|_| self.try_write_vectored(bufs)) {
                drop(guard);
                self.waiting = None;
                return Poll::Ready(r);
            }
        }
    }
}

impl AsyncWrite for WriteHalf {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.get_mut().poll_write_with(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[IoSlice<'_>]) -> Poll<io::Result<usize>> {
        self.get_mut().poll_write_with(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.stream.shutdown(std::net::Shutdown::Write))
    }
}

impl Drop for WriteHalf {
    /// As tokio's write half does: the peer reads end-of-stream once the writer is gone, though
    /// the read half (another descriptor) may still be open.
    fn drop(&mut self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Write);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// The event masks that this process's epoll instances hold for `sock`, from
    /// `/proc/self/fdinfo` (lines `tfd: FD events: MASK data: .. pos:.. ino:INODE ..`, in hex).
    /// Matched on the inode too: an entry another test left for a descriptor number now reused
    /// names another socket.
    fn epoll_masks(sock: &impl std::os::fd::AsFd) -> Vec<u32> {
        let fd = sock.as_fd().as_raw_fd();
        let ino = format!("ino:{:x}", nix::sys::stat::fstat(sock.as_fd()).expect("fstat").st_ino);
        let mut masks = Vec::new();
        for entry in std::fs::read_dir("/proc/self/fd").expect("/proc/self/fd").flatten() {
            let is_epoll = std::fs::read_link(entry.path()).is_ok_and(|l| l.to_string_lossy().contains("eventpoll"));
            let info = entry.file_name().to_str().and_then(|n| std::fs::read_to_string(format!("/proc/self/fdinfo/{n}")).ok());
            let Some(info) = info.filter(|_| is_epoll) else { continue };
            for line in info.lines() {
                let words: Vec<&str> = line.split_whitespace().collect();
                if let ["tfd:", tfd, "events:", mask, ..] = words[..]
                    && tfd.parse() == Ok(fd)
                    && words.contains(&ino.as_str())
                {
                    masks.push(u32::from_str_radix(mask, 16).expect("hex mask"));
                }
            }
        }
        masks
    }

    #[tokio::test]
    async fn the_read_half_waits_for_reads_only_and_an_idle_write_half_not_at_all() {
        let (a, _b) = UnixStream::pair().expect("socketpair");
        let (r, w) = split(a).expect("split");
        // (One epoll instance may show under two descriptors: mio keeps a duplicate.)
        let masks = epoll_masks(r.0.get_ref());
        assert!(!masks.is_empty(), "the read half is not registered");
        assert!(masks.iter().all(|m| m & libc::EPOLLIN as u32 != 0), "{masks:x?}");
        assert!(masks.iter().all(|m| m & libc::EPOLLOUT as u32 == 0), "a peer's read would wake us for nothing: {masks:x?}");
        assert!(epoll_masks(&w.stream).is_empty(), "the idle write half is registered");
        // tokio's own stream waits for both, which is what this module is for.
        let (c, _d) = UnixStream::pair().expect("socketpair");
        c.set_nonblocking(true).expect("nonblocking");
        let c = tokio::net::UnixStream::from_std(c).expect("tokio stream");
        let theirs = epoll_masks(&c);
        assert!(!theirs.is_empty() && theirs.iter().all(|m| m & libc::EPOLLOUT as u32 != 0), "{theirs:x?}");
    }

    #[tokio::test]
    async fn halves_carry_data_both_ways_and_the_end_of_stream() {
        let (a, b) = UnixStream::pair().expect("socketpair");
        let (mut ar, mut aw) = split(a).expect("split a");
        let (mut br, bw) = split(b).expect("split b");
        aw.write_all(b"ping").await.expect("write");
        let mut got = [0u8; 4];
        br.read_exact(&mut got).await.expect("read");
        assert_eq!(&got, b"ping");
        assert_eq!(bw.try_write_vectored(&[IoSlice::new(b"po"), IoSlice::new(b"ng")]).expect("try_write"), 4);
        ar.read_exact(&mut got).await.expect("read back");
        assert_eq!(&got, b"pong");
        drop(bw);
        let mut rest = Vec::new();
        assert_eq!(ar.read_to_end(&mut rest).await.expect("end of stream"), 0, "the write half's drop ends the stream");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_write_larger_than_the_socket_holds_waits_for_room_and_arrives_whole() {
        let (a, b) = UnixStream::pair().expect("socketpair");
        let (_ar, mut aw) = split(a).expect("split a");
        let (mut br, bw) = split(b).expect("split b");
        // Far beyond the send buffer: the writer must wait for the reader, many times over.
        let data: Vec<u8> = (0..16u32 << 20).map(|i| (i % 251) as u8).collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            aw.write_all(&sent).await.expect("write all");
            aw.shutdown().await.expect("shutdown");
            aw
        });
        let mut got = Vec::new();
        br.read_to_end(&mut got).await.expect("read all");
        let aw = writer.await.expect("writer");
        assert!(got == data, "{} bytes arrived of {}", got.len(), data.len());
        assert!(epoll_masks(&aw.stream).is_empty(), "the write half stays registered once written");
        // The try-write path waits with its own short registration: fill the socket, then
        // wait for room that a reader makes.
        let (c, d) = UnixStream::pair().expect("socketpair");
        let (_cr, cw) = split(c).expect("split c");
        let (mut dr, _dw) = split(d).expect("split d");
        let chunk = vec![7u8; 64 << 10];
        let mut filled = 0usize;
        while let Ok(n) = cw.try_write_vectored(&[IoSlice::new(&chunk)]) {
            filled += n;
        }
        let reader = tokio::spawn(async move {
            let mut buf = vec![0u8; filled];
            dr.read_exact(&mut buf).await.expect("drain");
            buf.iter().all(|&x| x == 7)
        });
        cw.writable().await.expect("room comes");
        assert!(cw.try_write_vectored(&[IoSlice::new(b"x")]).expect("room") == 1);
        assert!(reader.await.expect("reader"), "drained bytes are the ones written");
        drop(bw);
    }

    #[test]
    fn unix_sockets_get_a_wider_send_buffer() {
        use nix::sys::socket::{getsockopt, sockopt::SndBuf};
        let (a, _b) = std::os::unix::net::UnixStream::pair().expect("socketpair");
        let before = getsockopt(&a, SndBuf).expect("SO_SNDBUF");
        widen_send_buffer(&a);
        let after = getsockopt(&a, SndBuf).expect("SO_SNDBUF");
        // Within net.core.wmem_max, which may be below what was asked.
        assert!(after > before, "send buffer {before} -> {after}");
    }
}
