//! The control socket: what tap-ctl is to tapdisk, for one `tapmirror serve`.
//!
//! One JSON object per line in each direction. A request is `{"cmd": NAME, ...arguments}`; the
//! answer is `{"ok": true, ...}` or `{"ok": false, "error": MESSAGE}`. `mirror-attach` and
//! `nbd-accept` take an already connected socket as an `SCM_RIGHTS` descriptor sent with the
//! request line (the engine does the HTTP upgrade and authentication; the data path only speaks
//! NBD on it): `mirror-attach` as the NBD client of a remote target, `nbd-accept` as the NBD
//! server of a remote client (the destination of a migration, handed the socket of
//! `PUT /services/SM/nbd/...`).
//!
//! | command | arguments | does |
//! | --- | --- | --- |
//! | `stats` | | counters, outstanding requests, mirror state and bytes left |
//! | `pause` | | lets in-flight guest requests finish, holds new ones, flushes the image (its file then holds every write) and lets go of it for writing (tap-ctl pause: the backend may now snapshot or compose it); a failed flush resumes and answers the error |
//! | `unpause` | `leaf`: path (optional) | reopens the image (or the one at `leaf`) for writing and resumes |
//! | `mirror-attach` | `mode` (sync, full), `timeout_ms`, `export`, `granularity` (full: bytes a bitmap bit; default 4 KiB, coarser past 2 TiB so the bitmap stays within 64 MiB), `target_is_zero`, `rate` (full: bytes/s of the background pass, 0 for no cap), `busy_rate` (full: the same while the guest writes; default 64 MiB/s); one descriptor (full: optionally a second, for the background pass) | negotiates NBD on the descriptors and mirrors onto the target (full: and copies the disk in the background) |
//! | `mirror-rate` | `bytes_per_s` (0: no cap), `busy` (bool: set the cap that applies while the guest writes) | caps a full mirror's background pass at that many data bytes per second, from its next request |
//! | `mirror-converge` | | ends a full mirror's catch-up: guest writes to copied ranges are mirrored from now on |
//! | `mirror-detach` | | stops mirroring (after in-flight writes) |
//! | `nbd-accept` | one descriptor: a connected stream socket (TCP or Unix); `handshake`: `newstyle` (default) or `oldstyle` | serves the export on it as on any accepted connection (the server speaks first; same image, pause and drain gating, counted in `connections`, and while open in `stats`' `passed_connections`) until the peer closes it or shutdown. Fixed newstyle opens the export under any name (the caller chose it when it passed the socket; tapdisk asks for `tapdisk_client`); `oldstyle` greets as tapdisk's server does, which tapdisk's mirror client on xapi's `/services/SM/nbd/` expects |
//! | `drain` | `timeout_s` (default 30) | waits until no request is outstanding on either side |
//! | `shutdown` | | stops serving, flushes, exits |
//!
//! A bad request (malformed JSON, unknown command, missing or extra descriptor, a descriptor
//! that is not a connected stream socket, attach while attached) gets an error and changes
//! nothing.

use std::future::Future;
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::image::{Access, Image};
use crate::mirror::{Mirror, MirrorMode};
use crate::nbd::server::Handshake;
use crate::nbd::{ClientOptions, NbdClient, NbdServer};

/// Opens an image at a path with an access mode (for `pause` and `unpause`).
pub type OpenImage<I> =
    Box<dyn Fn(PathBuf, Access) -> Pin<Box<dyn Future<Output = anyhow::Result<I>> + Send>> + Send + Sync>;

/// What the control socket acts on.
pub struct Control<I: Image> {
    /// The data server.
    pub server: Arc<NbdServer<I>>,
    /// How to open an image.
    pub open: OpenImage<I>,
    /// The path the server serves (the leaf), updated by `unpause --leaf`.
    pub path: std::sync::Mutex<PathBuf>,
    /// The access the server serves with.
    pub access: Access,
    /// The file (device, inode) served when the server was last paused: `unpause --leaf`
    /// takes only a leaf that reads through it (a snapshot's). Any image of the right size
    /// and format was taken, and the guest's disk swapped for it.
    pub paused_file: std::sync::Mutex<Option<(u64, u64)>>,
    /// Cancelled by `shutdown`.
    pub shutdown: CancellationToken,
    /// Connections taken by `nbd-accept`; the owner waits for them (they end at `shutdown`)
    /// before the final flush.
    pub accepted: tokio_util::task::TaskTracker,
    /// Held through each command that changes what the server serves or where its writes go
    /// (`pause`, `unpause`, `mirror-detach`, and `mirror-attach` once the target has greeted
    /// it), so that two control connections never interleave them: a second `pause` sent while
    /// the first waits out a guest request would otherwise take the gate after the `unpause`
    /// that followed, and hold the guest.
    pub changing: tokio::sync::Mutex<()>,
}

/// A file's (device, inode), by which it is known whatever it is named.
fn file_identity(path: &std::path::Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// As tap-ctl pause does, lets go of a paused server's image for writing, so that the backend
/// can snapshot or compose its files: the image is flushed (a VHD's metadata may lag in memory
/// until then, and the file must hold every write first), then a read-only instance of the
/// image at `path`, which takes no lock, is served in its place. No request runs until
/// `unpause` reopens it for writing. Fails only when the flush fails; an image that cannot be
/// put read-only in its place stays open for writing (logged), which `unpause` copes with.
pub async fn let_go_for_writing<I: Image>(server: &NbdServer<I>, open: &OpenImage<I>, path: PathBuf) -> Result<(), String> {
    if let Err(e) = server.image().flush().await {
        return Err(format!("flushing the image before the pause: {e}"));
    }
    match open(path.clone(), Access::ReadOnly).await {
        Ok(ro) => {
            if let Err(e) = server.replace_image(Arc::new(ro)) {
                tracing::warn!(error = %e, "kept the image open for writing while paused");
            }
        }
        Err(e) => tracing::warn!(error = %format!("{e:#}"), path = %path.display(), "kept the image open while paused"),
    }
    Ok(())
}

/// Longest request line accepted.
const MAX_LINE: usize = 64 * 1024;

/// Most control connections served at once. Each holds a thread of the blocking pool (512
/// threads, which the portable I/O engine shares): idle clients beyond this are told so and
/// closed, rather than stalling every later command (`pause`, `drain`, `shutdown`) unanswered.
pub const MAX_CONNECTIONS: usize = 64;

/// Serves the control socket until `shutdown`.
pub async fn serve<I: Image>(listener: tokio::net::UnixListener, control: Arc<Control<I>>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        tokio::select! {
            _ = control.shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
                        tracing::warn!(max = MAX_CONNECTIONS, "control connection refused: as many as allowed are open");
                        let refusal = json!({"ok": false, "error": format!("too many control connections (at most {MAX_CONNECTIONS} at once)")});
                        let _ = stream.try_write(format!("{refusal}\n").as_bytes());
                        continue;
                    };
                    let control = Arc::clone(&control);
                    let handle = tokio::runtime::Handle::current();
                    let Ok(std) = stream.into_std() else { continue };
                    // Control traffic is rare: a blocking thread per connection keeps recvmsg
                    // (for descriptors) simple; async work runs on the runtime via the handle.
                    tokio::task::spawn_blocking(move || {
                        if std.set_nonblocking(false).is_ok() {
                            connection(std, &control, &handle);
                        }
                        drop(slot);
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "control accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

fn connection<I: Image>(stream: UnixStream, control: &Control<I>, rt: &tokio::runtime::Handle) {
    let mut pending: Vec<u8> = Vec::new();
    let mut fds: Vec<OwnedFd> = Vec::new();
    loop {
        let Some(line_end) = pending.iter().position(|&b| b == b'\n') else {
            if pending.len() > MAX_LINE {
                let _ = send(&stream, &json!({"ok": false, "error": "request line too long"}));
                return;
            }
            match receive(&stream, &mut pending, &mut fds) {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        };
        let line: Vec<u8> = pending.drain(..=line_end).collect();
        let taken = std::mem::take(&mut fds);
        let answer = match serde_json::from_slice::<Value>(&line) {
            Ok(request) => rt.block_on(execute(control, &request, taken)),
            Err(e) => json!({"ok": false, "error": format!("malformed JSON: {e}")}),
        };
        if send(&stream, &answer).is_err() {
            return;
        }
    }
}

async fn attach<I: Image>(server: &Arc<NbdServer<I>>, mirror: Arc<Mirror>, request: &Value) -> Value {
    let (mode, granularity) = (mirror.mode(), mirror.granularity());
    // Holes need no copy onto a target that reads as zero. The pass skips them first, with the
    // server running: the walk grows with the image's extents (11 000 holes: under a second).
    let target_is_zero = request.get("target_is_zero").and_then(Value::as_bool).unwrap_or(false);
    if let Err(e) = server.mirror().attach(Arc::clone(&mirror)) {
        return err(e);
    }
    server.mirror().watch_target(&mirror);
    if mode == MirrorMode::Full {
        // Paced from its first byte when asked to be (a job's share of its bandwidth limit).
        if let Some(rate) = request.get("rate").and_then(Value::as_u64) {
            mirror.set_rate(rate);
        }
        if let Some(rate) = request.get("busy_rate").and_then(Value::as_u64) {
            mirror.set_busy_rate(rate);
        }
        let source = Arc::clone(server);
        let pass = crate::mirror::run_full_copy(Arc::clone(server.mirror()), mirror, target_is_zero, move || source.image());
        match crate::mirror::pass_runtime() {
            Some(rt) => drop(rt.spawn(pass)),
            None => drop(tokio::spawn(pass)),
        }
    }
    tracing::info!(?mode, granularity, "mirror attached");
    json!({"ok": true, "state": server.mirror().state()})
}

/// `nbd-accept`: checks that `fd` is a connected stream socket and serves the export on it in
/// a task of `control.accepted`, until the peer closes it or shutdown. Answers the socket's
/// kind.
fn accept<I: Image>(control: &Control<I>, fd: OwnedFd, how: Handshake) -> Result<&'static str, String> {
    use nix::sys::socket::AddressFamily;
    let family = connected_stream(&fd)?;
    let server = Arc::clone(&control.server);
    let stop = control.shutdown.child_token();
    let io = |e: std::io::Error| e.to_string();
    match family {
        Some(AddressFamily::Unix) => {
            let (r, w) = crate::nbd::unix::split(UnixStream::from(fd)).map_err(io)?;
            control.accepted.spawn(serve_accepted(server, r, w, stop, how));
            Ok("unix")
        }
        Some(AddressFamily::Inet | AddressFamily::Inet6) => {
            let std = std::net::TcpStream::from(fd);
            std.set_nonblocking(true).map_err(io)?;
            std.set_nodelay(true).map_err(io)?;
            let (r, w) = tokio::net::TcpStream::from_std(std).map_err(io)?.into_split();
            control.accepted.spawn(serve_accepted(server, r, w, stop, how));
            Ok("tcp")
        }
        other => Err(format!("a socket of family {other:?}, not TCP or Unix")),
    }
}

/// Checks that `fd` is a connected stream socket (what NBD runs over); answers its family.
fn connected_stream(fd: &OwnedFd) -> Result<Option<nix::sys::socket::AddressFamily>, String> {
    use nix::sys::socket::{SockType, SockaddrLike, SockaddrStorage, getpeername, getsockname, getsockopt, sockopt};
    let ty = getsockopt(fd, sockopt::SockType).map_err(|e| format!("the descriptor is not a socket ({e})"))?;
    if ty != SockType::Stream {
        return Err(format!("a {ty:?} socket, not a stream"));
    }
    if getsockopt(fd, sockopt::AcceptConn).unwrap_or(false) {
        return Err("a listening socket, not a connection".into());
    }
    getpeername::<SockaddrStorage>(fd.as_raw_fd()).map_err(|e| format!("the socket is not connected ({e})"))?;
    Ok(getsockname::<SockaddrStorage>(fd.as_raw_fd()).map_err(|e| format!("the socket has no address ({e})"))?.family())
}

/// A TCP connection's two ends, (its own address, its peer's); `None` for any other socket.
fn tcp_ends(fd: &OwnedFd) -> Option<(std::net::SocketAddr, std::net::SocketAddr)> {
    // A duplicate, to ask std (closing it leaves the connection open through `fd`); a Unix
    // socket has no IP address, so this is `None` there.
    let stream = std::net::TcpStream::from(fd.try_clone().ok()?);
    Some((stream.local_addr().ok()?, stream.peer_addr().ok()?))
}

/// Whether the Unix connection `fd` leads to this process (its peer is a socket this process
/// accepted). TCP is told apart once connected (`NbdServer::is_own_tcp`): false there.
fn served_here(fd: &OwnedFd) -> bool {
    use nix::sys::socket::{getsockopt, sockopt};
    getsockopt(fd, sockopt::PeerCredentials).is_ok_and(|c| u32::try_from(c.pid()).is_ok_and(|pid| pid == std::process::id()))
}

async fn serve_accepted<I, R, W>(server: Arc<NbdServer<I>>, r: R, w: W, stop: CancellationToken, how: Handshake)
where
    I: Image,
    R: tokio::io::AsyncRead + Unpin + Send + 'static,
    W: tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    match server.serve_with(r, w, stop, how).await {
        Ok(()) => tracing::info!("a connection passed by descriptor closed"),
        Err(e) => tracing::warn!(error = %e, "a connection passed by descriptor ended with an error"),
    }
}

fn receive(stream: &UnixStream, into: &mut Vec<u8>, fds: &mut Vec<OwnedFd>) -> std::io::Result<usize> {
    let mut buf = [0u8; 4096];
    // Room for as many descriptors as one message can carry (Linux's SCM_MAX_FD, 253, over all
    // its SCM_RIGHTS headers together): with less, a sender of more would truncate the control
    // data, `cmsgs` would refuse to list it, and the descriptors the kernel installed would
    // leak. All of them are taken here and closed when the command refuses them.
    let mut space = nix::cmsg_space!([RawFd; 253]);
    let (n, received) = {
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = recvmsg::<()>(stream.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)
            .map_err(std::io::Error::from)?;
        let mut received = Vec::new();
        for c in msg.cmsgs().map_err(std::io::Error::from)? {
            if let ControlMessageOwned::ScmRights(list) = c {
                received.extend(list);
            }
        }
        (msg.bytes, received)
    };
    for fd in received {
        // SAFETY: the kernel just installed this descriptor in our table for us alone.
        fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
    }
    into.extend_from_slice(&buf[..n]);
    Ok(n)
}

fn send(stream: &UnixStream, v: &Value) -> std::io::Result<()> {
    use std::io::Write;
    let mut line = v.to_string();
    line.push('\n');
    (&*stream).write_all(line.as_bytes())
}

fn err(msg: impl Into<String>) -> Value {
    json!({"ok": false, "error": msg.into()})
}

async fn execute<I: Image>(control: &Control<I>, request: &Value, mut fds: Vec<OwnedFd>) -> Value {
    let server = &control.server;
    let Some(cmd) = request.get("cmd").and_then(Value::as_str) else {
        return err("missing \"cmd\"");
    };
    if cmd != "mirror-attach" && cmd != "nbd-accept" && !fds.is_empty() {
        return err(format!("{cmd} takes no descriptor"));
    }
    let _changing = match cmd {
        // mirror-attach takes it after its handshake (below): a target slow to greet must not
        // hold up a pause.
        "pause" | "unpause" | "mirror-detach" => Some(control.changing.lock().await),
        _ => None,
    };
    match cmd {
        "stats" => {
            let s = server.stats();
            let slot = server.mirror();
            let mirror = slot.get();
            let counters = mirror.as_ref().map(|m| m.counters());
            use std::sync::atomic::Ordering::Relaxed;
            json!({
                "ok": true,
                "size": server.image().size(),
                "paused": server.is_paused(),
                "outstanding": server.outstanding(),
                "connections": s.connections.load(Relaxed),
                "open_connections": s.open_connections.load(Relaxed),
                // Of those, the ones passed by `nbd-accept` (a migration's mirror, handed over
                // as xapi hands tapdisk its connection), not readers on the server's socket.
                "passed_connections": control.accepted.len(),
                "requests": s.requests.load(Relaxed),
                "errors": s.errors.load(Relaxed),
                "bytes_read": s.bytes_read.load(Relaxed),
                "bytes_written": s.bytes_written.load(Relaxed),
                "uptime_s": s.started.elapsed().as_secs_f64(),
                // Averages since start, bytes per second.
                "read_rate": s.bytes_read.load(Relaxed) as f64 / s.started.elapsed().as_secs_f64().max(1e-3),
                "write_rate": s.bytes_written.load(Relaxed) as f64 / s.started.elapsed().as_secs_f64().max(1e-3),
                "mirror": {
                    "state": slot.state(),
                    "mode": mirror.as_ref().map(|m| m.mode()),
                    // A sync mirror carries new writes only; there is nothing for it to catch up.
                    "bytes_left": mirror.as_ref().and_then(|m| m.progress()).map(|p| p.bytes_left).unwrap_or(0),
                    "progress": mirror.as_ref().and_then(|m| m.progress()),
                    "counters": counters,
                    "failure": slot.failure(),
                },
            })
        }
        "pause" => {
            if server.is_paused() {
                return err("already paused");
            }
            server.pause().await;
            let path = control.path.lock().map(|p| p.clone()).unwrap_or_default();
            if let Ok(mut f) = control.paused_file.lock() {
                *f = file_identity(&path);
            }
            if let Err(e) = let_go_for_writing(server, &control.open, path).await {
                server.unpause();
                return err(e);
            }
            json!({"ok": true})
        }
        "unpause" => {
            if !server.is_paused() {
                return err("not paused");
            }
            let leaf = match request.get("leaf") {
                None => None,
                Some(v) => match v.as_str() {
                    Some(p) => Some(PathBuf::from(p)),
                    None => return err("\"leaf\" must be a path"),
                },
            };
            // A pause that could not put a read-only stand-in in place kept the writable image:
            // resuming on that same leaf needs no reopen (which its own lock would refuse).
            if leaf.is_none() && control.access == Access::ReadWrite && !server.image().features().read_only {
                server.unpause();
                return json!({"ok": true});
            }
            let path = match &leaf {
                Some(p) => p.clone(),
                None => control.path.lock().map(|p| p.clone()).unwrap_or_default(),
            };
            let image = match (control.open)(path.clone(), control.access).await {
                Ok(i) => i,
                Err(e) => return err(format!("opening {}: {e:#}", path.display())),
            };
            // A new leaf is a snapshot's: it reads through the image it replaces.
            let served = control.paused_file.lock().ok().and_then(|f| *f);
            let files = image.files();
            if leaf.is_some()
                && let Some(served) = served
                && !files.is_empty()
                && !files.iter().any(|f| file_identity(f) == Some(served))
            {
                let chain: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
                return err(format!(
                    "{} does not read through the image served when paused (its chain: {}): a new leaf must be a snapshot's, on the image it replaces",
                    path.display(),
                    chain.join(" -> ")
                ));
            }
            if let Err(e) = server.replace_image(Arc::new(image)) {
                return err(e);
            }
            if leaf.is_some() {
                tracing::info!(leaf = %path.display(), "switched to a new leaf");
                if let Ok(mut p) = control.path.lock() {
                    *p = path;
                }
            }
            server.unpause();
            json!({"ok": true})
        }
        "mirror-attach" => {
            let mode = match request.get("mode").map(|m| serde_json::from_value::<MirrorMode>(m.clone())) {
                None => MirrorMode::Sync,
                Some(Ok(m)) => m,
                Some(Err(_)) => return err("\"mode\" must be \"sync\" or \"full\""),
            };
            // One descriptor, or (full mode) two: the second carries the background pass.
            let allowed = if mode == MirrorMode::Full { 1..=2 } else { 1..=1 };
            if !allowed.contains(&fds.len()) {
                return err(format!("mirror-attach in {mode:?} mode needs {allowed:?} descriptors, got {}", fds.len()));
            }
            if server.mirror().get().is_some() {
                return err("a mirror is already attached");
            }
            // A mirror always times out: a target that stops answering must not hold the guest
            // for ever (0 was taken as 1 ms, and failed the mirror at the first write).
            let timeout = match request.get("timeout_ms") {
                None => Duration::from_millis(30_000),
                Some(v) => match v.as_u64() {
                    Some(ms) if ms > 0 => Duration::from_millis(ms),
                    _ => return err("\"timeout_ms\" must be a whole number of milliseconds, at least 1: a mirror always times out, so that a target that stops answering never holds the guest"),
                },
            };
            if let Some(e) = fds.iter().find_map(|fd| connected_stream(fd).err()) {
                return err(format!("mirror-attach: the target descriptor is no NBD connection: {e}"));
            }
            // A connection to this very server (its own socket named as the target) would have
            // each mirrored write wait on itself until the mirror timed out.
            if fds.iter().any(served_here) {
                return err("mirror-attach: the target is this server's own export");
            }
            let fd = fds.remove(0);
            let ends = tcp_ends(&fd);
            let export = request.get("export").and_then(Value::as_str).unwrap_or("").to_owned();
            // A peer that never answers the handshake must not hold this connection forever.
            // Once connected, the client's answer watch is the mirror's timeout: a target that
            // answers nothing for it while requests wait fails the mirror (a timer per request
            // failed a slow link whose queue waited longer, though replies kept coming).
            let connect = |fd, within| {
                tokio::time::timeout(within, NbdClient::from_fd(fd, ClientOptions { export: export.clone(), answer_timeout: Some(timeout), ..ClientOptions::default() }))
            };
            let client = match connect(fd, timeout).await {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => return err(format!("NBD on the mirror socket: {}", crate::error_chain(&e))),
                Err(_) => return err(format!("NBD on the mirror socket: no handshake within {timeout:?}")),
            };
            // Over TCP the same, told once the handshake shows this server accepted it (a
            // loop over TCP held every guest write for the whole timeout).
            if let Some((local, peer)) = ends
                && server.is_own_tcp(local, peer)
            {
                return err("mirror-attach: the target is this server's own export");
            }
            // The background pass's own connection runs on the pass's runtime, with the pass.
            // The second connection gets less time: a target that answers the first at once
            // and not the second within seconds serves one connection at a time.
            let second_timeout = timeout.min(Duration::from_secs(5));
            let connect_for_pass = |fd| async {
                match crate::mirror::pass_runtime() {
                    Some(rt) => rt.spawn(connect(fd, second_timeout)).await.unwrap_or_else(|e| Ok(Err(crate::nbd::ClientError::Closed(format!("connecting: {e}"))))),
                    None => connect(fd, second_timeout).await,
                }
            };
            let copier = match fds.pop() {
                None => None,
                Some(fd) => match connect_for_pass(fd).await {
                    Ok(Ok(c)) if c.size() == client.size() => Some(c),
                    Ok(Ok(_)) => return err("the two mirror sockets reach exports of different sizes"),
                    Ok(Err(e)) => return err(format!("NBD on the second mirror socket: {}", crate::error_chain(&e))),
                    // A target that serves one connection at a time (qemu-nbd's default) never
                    // greets the second: the pass shares the first, as with one descriptor.
                    Err(_) => {
                        tracing::warn!(?second_timeout, "no NBD greeting on the second mirror socket; the background pass shares the first connection");
                        None
                    }
                },
            };
            let size = server.image().size();
            if client.size() != size {
                return err(format!("mirror target is {} bytes, the image {size}", client.size()));
            }
            // Read-only, it would be reported in step until the guest's first write.
            if client.info().has(crate::nbd::proto::tflags::READ_ONLY) {
                return err("the mirror target is read-only");
            }
            for key in ["rate", "busy_rate"] {
                if request.get(key).is_some_and(|v| v.as_u64().is_none()) {
                    return err(format!("\"{key}\" must be a non-negative integer (bytes per second; 0: no cap)"));
                }
            }
            // The target writes in whole units: its size must be some (an export that ends
            // inside one could never take the disk's last bytes), and so must the background
            // pass's granules, which it copies as they are.
            let unit = u64::from(client.info().block_size.minimum.max(1));
            if !size.is_multiple_of(unit) {
                return err(format!("the image's {size} bytes are no whole number of the target's {unit}-byte blocks: its last bytes could not be mirrored"));
            }
            let granularity = request.get("granularity").and_then(Value::as_u64).unwrap_or(crate::mirror::dirty::default_granularity(size).max(unit));
            if !granularity.is_power_of_two() || !(512..=64 << 20).contains(&granularity) {
                return err("\"granularity\" must be a power of two from 512 to 64 MiB");
            }
            if mode == MirrorMode::Full && !granularity.is_multiple_of(unit) {
                return err(format!("\"granularity\" {granularity} is not whole blocks of the target, which writes in units of {unit} bytes"));
            }
            // Built before the guest is held: a full mirror's bitmap starts all dirty, 64 MiB for
            // a 2 TiB disk.
            let mut mirror = match Mirror::with_granularity(client, mode, timeout, granularity) {
                Ok(m) => m,
                Err(e) => return err(e),
            };
            if let Some(c) = copier {
                mirror = mirror.with_copier(c);
            }
            // Quiesce while attaching: a guest write already in flight started without the mirror
            // and reaches only the local side. Requests wait for the moment it takes.
            let _changing = control.changing.lock().await;
            let quiesced = !server.is_paused();
            if quiesced {
                server.pause().await;
            }
            let attached = attach(server, mirror, request).await;
            if quiesced {
                server.unpause();
            }
            attached
        }
        "mirror-rate" => {
            let Some(rate) = request.get("bytes_per_s").and_then(Value::as_u64) else {
                return err("\"bytes_per_s\" must be a non-negative integer (0: no cap)");
            };
            let busy = match request.get("busy") {
                None => false,
                Some(v) => match v.as_bool() {
                    Some(b) => b,
                    None => return err("\"busy\" must be true or false"),
                },
            };
            let set = |m: &Mirror| if busy { m.set_busy_rate(rate) } else { m.set_rate(rate) };
            match server.mirror().get() {
                Some(m) if set(&m) => json!({"ok": true, "bytes_per_s": rate, "busy": busy}),
                Some(_) => err("the mirror attached is not a full mirror: it has no background pass to pace"),
                None => err("no mirror attached"),
            }
        }
        "mirror-converge" => match server.mirror().get() {
            Some(m) if m.converge_now().await => json!({"ok": true, "progress": m.progress()}),
            Some(_) => err("the mirror attached is not a full mirror: it mirrors every write already"),
            None => err("no mirror attached"),
        },
        "mirror-detach" => {
            if server.mirror().get().is_none() {
                // A failed mirror detached itself: say so, and why, rather than just "none".
                return match server.mirror().failure() {
                    Some(why) => err(format!("no mirror attached (the last one failed and was detached: {why})")),
                    None => err("no mirror attached"),
                };
            }
            // Quiesce, as attach does: guest writes in flight finish on both sides first, so
            // none is left half-mirrored and the disconnect below fails nothing.
            let quiesced = !server.is_paused();
            if quiesced {
                server.pause().await;
            }
            let detached = server.mirror().detach();
            if quiesced {
                server.unpause();
            }
            match detached {
                Some(m) => {
                    // Flush what reached the target, within the mirror's timeout: a target that
                    // stopped answering held this (and every pause behind it) for ever.
                    match tokio::time::timeout(m.timeout(), m.client().flush_if_offered()).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => tracing::warn!(error = %crate::error_chain(&e), "the detached mirror's target did not flush"),
                        Err(_) => tracing::warn!(timeout = ?m.timeout(), "the detached mirror's target did not flush in time"),
                    }
                    let _ = tokio::time::timeout(m.timeout(), m.client().disconnect()).await;
                    json!({"ok": true, "counters": m.counters()})
                }
                None => err("no mirror attached"),
            }
        }
        "nbd-accept" => {
            if fds.len() != 1 {
                return err(format!("nbd-accept needs one descriptor, got {}", fds.len()));
            }
            let oldstyle = match request.get("handshake") {
                None => false,
                Some(v) if v == "newstyle" => false,
                Some(v) if v == "oldstyle" => true,
                Some(v) => return err(format!("nbd-accept: handshake {v} is neither \"newstyle\" nor \"oldstyle\"")),
            };
            match accept(control, fds.remove(0), Handshake { oldstyle, any_export: true }) {
                Ok(kind) => {
                    tracing::info!(socket = kind, "serving a connection passed by descriptor");
                    json!({"ok": true, "socket": kind})
                }
                Err(e) => err(format!("nbd-accept: {e}")),
            }
        }
        "drain" => {
            let secs = match request.get("timeout_s") {
                None => 30.0,
                Some(v) => match v.as_f64() {
                    Some(s) if (0.0..=3600.0).contains(&s) => s,
                    _ => return err(format!("timeout_s {v} is not a number of seconds from 0 to 3600")),
                },
            };
            if server.drain(Duration::from_secs_f64(secs)).await {
                json!({"ok": true, "mirror": server.mirror().state()})
            } else {
                err(format!("{} requests still outstanding after {secs} s", server.outstanding()))
            }
        }
        "shutdown" => {
            control.shutdown.cancel();
            json!({"ok": true})
        }
        other => err(format!("unknown command {other:?}")),
    }
}

/// Client side: sends one request (with an optional descriptor) and returns the answer.
pub fn request(socket: &std::path::Path, request: &Value, fd: Option<&OwnedFd>) -> anyhow::Result<Value> {
    request_with(socket, request, fd.into_iter().collect())
}

/// As `request`, with any number of descriptors.
pub fn request_with(socket: &std::path::Path, request: &Value, fds: Vec<&OwnedFd>) -> anyhow::Result<Value> {
    request_timeout(socket, request, fds, None)
}

/// As `request_with`, failing when sending the request or reading the answer stalls for longer
/// than `timeout` (each). A stopped or wedged server still accepts connections (the kernel
/// queues them on its listening socket) but never answers: a caller that must not hang (a
/// liveness probe, a daemon talking to many servers) gives a timeout.
pub fn request_timeout(
    socket: &std::path::Path,
    request: &Value,
    fds: Vec<&OwnedFd>,
    timeout: Option<Duration>,
) -> anyhow::Result<Value> {
    use std::io::BufRead;
    let stream = UnixStream::connect(socket).map_err(|e| match e.kind() {
        // Nothing listens there: the process serving it is gone.
        std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound => {
            anyhow::anyhow!("connecting {}: {e}: the process that serves this control socket is not running (a datapath that died is restarted by its host)", socket.display())
        }
        _ => anyhow::anyhow!("connecting {}: {e}", socket.display()),
    })?;
    // A zero timeout means "none" to the socket options; the smallest real one stands in for it.
    let timeout = timeout.map(|t| t.max(Duration::from_millis(1)));
    stream.set_write_timeout(timeout)?;
    stream.set_read_timeout(timeout)?;
    let mut line = request.to_string();
    line.push('\n');
    let fds: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let cmsgs: Vec<ControlMessage<'_>> = if fds.is_empty() { Vec::new() } else { vec![ControlMessage::ScmRights(&fds)] };
    let sent = sendmsg::<()>(stream.as_raw_fd(), &[IoSlice::new(line.as_bytes())], &cmsgs, MsgFlags::empty(), None)?;
    if sent < line.len() {
        use std::io::Write;
        (&stream).write_all(&line.as_bytes()[sent..])?;
    }
    let mut answer = String::new();
    std::io::BufReader::new(&stream).read_line(&mut answer).map_err(|e| match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
            anyhow::anyhow!("no answer on {} within {:?}", socket.display(), timeout.unwrap_or_default())
        }
        std::io::ErrorKind::InvalidData => not_control(socket, &e),
        _ => anyhow::Error::from(e),
    })?;
    if answer.is_empty() {
        anyhow::bail!("control socket closed without an answer");
    }
    serde_json::from_str(&answer).map_err(|e| not_control(socket, &e))
}

/// What a socket that is not a control socket (an NBD socket, which greets in binary) gets.
fn not_control(socket: &std::path::Path, e: &dyn std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("{} did not answer as a control socket does ({e}): give the path passed to serve --control, not its NBD socket", socket.display())
}
