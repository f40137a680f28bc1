//! The `tapmirror` binary: argument parsing and wiring only.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use tapmirror::image::{Access, AnyImage, ExtentState, Format, Image, RawImage, qcow2, vhd};
use tapmirror::io::EngineChoice;
use tapmirror::parse_size;
use tapmirror::nbd::{ClientOptions, ExportConfig, NbdClient, NbdServer, NbdUri, proto::tflags};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(name = "tapmirror", version, about = "sxm's data path: serve, copy and mirror disk images over NBD")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve an image over NBD until SIGTERM or SIGINT, then flush and exit.
    Serve(ServeArgs),
    /// Send one command to a server's control socket and print the JSON answer.
    Ctl(CtlArgs),
    /// Copy an image (any format, a whole chain) or an NBD export into an NBD export or a file,
    /// sending only what holds data.
    Copy(CopyArgs),
    /// Print an NBD export's size, flags and allocation map as JSON.
    Info {
        /// nbd+unix:///EXPORT?socket=PATH or nbd://HOST:PORT/EXPORT
        uri: String,
    },
    /// Create, describe, map and check image files.
    #[command(subcommand)]
    Image(ImageCommand),
}

#[derive(Subcommand)]
enum ImageCommand {
    /// Create an image of SIZE, or (with --parent) an empty child of PARENT: a differencing VHD
    /// or a qcow2 overlay, which takes the parent's size.
    Create {
        /// raw, vhd or qcow2.
        #[arg(value_enum)]
        format: Format,
        /// The new file (never overwritten).
        path: PathBuf,
        /// Virtual size, e.g. 10G; optional with --parent (must then equal the parent's).
        #[arg(value_parser = parse_size, required_unless_present = "parent")]
        size: Option<u64>,
        /// Parent image for a differencing VHD or a qcow2 overlay.
        #[arg(long)]
        parent: Option<PathBuf>,
    },
    /// Print format, virtual size, chain and allocated bytes as JSON.
    Info {
        /// The image (the top of its chain).
        path: PathBuf,
        /// Its format: name it for a guest's raw disk, which could hold any header.
        #[arg(long, value_enum, default_value = "auto")]
        format: FormatArg,
    },
    /// Print the allocation map of the whole chain as JSON.
    Map {
        /// The image (the top of its chain).
        path: PathBuf,
    },
    /// Check an image and its chain: exit 0 when sound, 3 when sound but leaking clusters (as
    /// `qemu-img check`), else print the first problem and exit 1.
    Check {
        /// The image (the top of its chain).
        path: PathBuf,
    },
}

/// `--format` of `serve`: a format, or `auto` to go by the file's magic.
#[derive(Clone, Copy, ValueEnum)]
enum FormatArg {
    /// VHD and qcow2 by their magic bytes, anything else raw.
    Auto,
    /// The file's bytes are the disk's bytes.
    Raw,
    /// Dynamic or differencing VHD (the whole chain is opened; the leaf is served).
    Vhd,
    /// qcow2 (the whole backing chain is opened; the top is served).
    Qcow2,
}

impl FormatArg {
    /// The format named, or for `auto` the one `path`'s magic bytes say.
    fn resolve(self, path: &Path) -> Result<Format> {
        Ok(match self.format() {
            Some(f) => f,
            None => Format::detect(path)?,
        })
    }

    /// The format named, `None` for `auto`.
    fn format(self) -> Option<Format> {
        match self {
            FormatArg::Auto => None,
            FormatArg::Raw => Some(Format::Raw),
            FormatArg::Vhd => Some(Format::Vhd),
            FormatArg::Qcow2 => Some(Format::Qcow2),
        }
    }
}

#[derive(clap::Args)]
struct ServeArgs {
    /// The image file.
    image: PathBuf,
    /// Image format.
    #[arg(long, value_enum, default_value = "auto")]
    format: FormatArg,
    /// Listen on this Unix socket (created mode 0600; a stale socket file is replaced). Without
    /// --socket or --listen, the listening socket must come by systemd socket activation
    /// (LISTEN_FDS), as `nbdinfo [ CMD ]` and `nbdcopy [ CMD ]` pass it.
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Listen on this TCP address (port 0 picks a free port; the ready line says which).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Export name (the empty name also selects it).
    #[arg(long, default_value = "")]
    export_name: String,
    /// Refuse writes, trims and zeroes.
    #[arg(long)]
    read_only: bool,
    /// Create IMAGE as a sparse raw file of this size (e.g. 10G, 512M) when it does not exist;
    /// an existing file is served as it is.
    #[arg(long, value_parser = parse_size)]
    create: Option<u64>,
    /// Control socket (mode 0600): stats, pause, unpause, mirror-attach, nbd-accept, drain,
    /// shutdown.
    #[arg(long)]
    control: Option<PathBuf>,
    /// I/O engine (also TAPMIRROR_IO_ENGINE).
    #[arg(long, value_enum)]
    io_engine: Option<EngineChoice>,
    /// Start paused: requests are held from the first until `unpause` on the control socket,
    /// and the image is held as after `pause`, read-only and unlocked (it is opened for writing
    /// first, so an image another writer holds fails the start). A host attaching a disk that
    /// is not active yet starts it so: the disk can be snapshotted meanwhile, and a client
    /// reconnecting at once to a restarted server is not served.
    #[arg(long, requires = "control")]
    paused: bool,
}

#[derive(clap::Args)]
struct CopyArgs {
    /// Source: an image file, or nbd+unix:///EXPORT?socket=PATH, nbd://HOST:PORT/EXPORT.
    src: String,
    /// Destination: an NBD URI, or a file (created as a sparse raw file of the source's size
    /// when missing).
    dest: String,
    /// The source file's format. `auto` goes by its magic bytes, as `qemu-img` does: a raw
    /// disk whose guest wrote a qcow2 or VHD header at its start is then read as that format
    /// (and its backing file followed), so name the format of a guest's raw disk.
    #[arg(long, value_enum, default_value = "auto")]
    format: FormatArg,
    /// The destination file's format, when it exists already (a new one is created raw).
    #[arg(long, value_enum, default_value = "auto")]
    dest_format: FormatArg,
    /// The destination file must not exist yet: it is created (raw), and never an existing
    /// file, or one a link leads to, written instead.
    #[arg(long)]
    dest_new: bool,
    /// Refuse a source image that reads through a backing file or parent: for images from
    /// elsewhere, whose headers could name any file of this host.
    #[arg(long)]
    no_backing: bool,
    /// Read a source image file even while another process writes it (a running `serve`, a
    /// VM, qemu-nbd), as `qemu-img -U` does; without it such a source is refused. What is read
    /// may then mix old and new data: for a writer known to be idle.
    #[arg(long, short = 'U')]
    force_share: bool,
    /// Send only what differs from BASE, a chain (VHD or qcow2, as SRC) the destination
    /// already holds.
    #[arg(long)]
    base: Option<PathBuf>,
    /// The destination reads as zeroes: skip zero runs entirely. Not with --base: that
    /// destination holds the base, so a range the source zeroes over it must be written.
    #[arg(long, conflicts_with = "base")]
    target_is_zero: bool,
    /// Connections to the destination (used only if it offers multi-conn), 1 to 64.
    #[arg(long, default_value_t = 4, value_parser = connection_count)]
    connections: usize,
    /// Requests in flight per connection, 1 to 256 [default: 8 in all, at least 2 per connection]. A
    /// few large requests in flight keep a target busy; more only spill the buffers out of
    /// the CPU cache on both ends (measured in benches/copy-vs-peers.sh).
    #[arg(long, value_parser = request_count)]
    requests: Option<usize>,
    /// Largest request, in bytes (clamped to what both ends accept).
    #[arg(long, value_parser = parse_size, default_value = "1M")]
    request_size: u64,
    /// Data bytes per second at most (e.g. 100M; 0: no cap, as for `mirror-rate`).
    #[arg(long, value_parser = parse_size)]
    bwlimit: Option<u64>,
    /// Progress on stderr (human) or as JSON lines on stdout (json).
    #[arg(long, value_enum, default_value = "none")]
    progress: tapmirror::copy::ProgressMode,
    /// Persist progress here, and resume from it when it names this same copy.
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// Flush the destination in the background after every this many data bytes, so it
    /// writes back while the copy runs rather than all at the end (0: flush only at the end).
    #[arg(long, value_parser = parse_size, default_value = "64M")]
    writeback_every: u64,
    /// Fail when an NBD end (source or destination) has answered nothing for this many
    /// seconds while requests wait on it: stopped, or behind a network that drops everything.
    /// With --checkpoint, the copy resumes from there when run again (0: wait for ever).
    #[arg(long, default_value_t = tapmirror::copy::ANSWER_TIMEOUT.as_secs())]
    timeout: u64,
}

#[derive(clap::Args)]
struct CtlArgs {
    /// The server's control socket.
    socket: PathBuf,
    #[command(subcommand)]
    command: CtlCommand,
}

#[derive(Subcommand)]
enum CtlCommand {
    /// Counters, outstanding requests and mirror state.
    Stats,
    /// Finish in-flight guest requests and hold new ones.
    Pause,
    /// Resume, optionally on a new leaf (the snapshot switch).
    Unpause {
        /// The image to serve from now on (same size).
        #[arg(long)]
        leaf: Option<PathBuf>,
    },
    /// Connect to the target and hand the socket to the server, which mirrors onto it.
    MirrorAttach {
        /// The mirror target: nbd+unix:///EXPORT?socket=PATH or nbd://HOST:PORT/EXPORT
        #[arg(long)]
        target: String,
        /// sync: new writes only (the base is copied separately); full: new writes and, in the
        /// background, the whole disk (no snapshot needed).
        #[arg(long, value_enum, default_value = "sync")]
        mode: tapmirror::mirror::MirrorMode,
        /// Full mode: bytes per dirty-bitmap bit (power of two, 512 B to 64 MiB) [default:
        /// 4 KiB, or for a disk over 2 TiB the finest that keeps the bitmap within 64 MiB].
        #[arg(long, value_parser = parse_size)]
        granularity: Option<u64>,
        /// Full mode: the target reads as zeroes already, so holes are not copied.
        #[arg(long)]
        target_is_zero: bool,
        /// How long the target may answer nothing while requests wait on it (and take over its
        /// NBD handshake) before the mirror is failed: its silence, not one request's wait.
        #[arg(long, default_value_t = 30_000)]
        timeout_ms: u64,
        /// Full mode: bytes per second at most for the background copy (e.g. 64M), which
        /// leaves the guest's writes more room; none by default.
        #[arg(long, value_parser = parse_size)]
        rate: Option<u64>,
        /// Full mode: bytes per second at most for the background copy while the guest writes
        /// (0: no cap then), so the copy's CPU does not delay the guest's writes [default: 64M]
        #[arg(long, value_parser = parse_size)]
        busy_rate: Option<u64>,
    },
    /// Change a full mirror's cap on its background copy, from its next request.
    MirrorRate {
        /// Bytes per second (e.g. 64M); 0 lifts the cap.
        #[arg(value_parser = parse_size)]
        bytes_per_s: u64,
        /// Change the cap that applies while the guest writes instead.
        #[arg(long)]
        busy: bool,
    },
    /// End a full mirror's catch-up: mirror guest writes to copied ranges from now on.
    MirrorConverge,
    /// Stop mirroring.
    MirrorDetach,
    /// Wait until no request is outstanding on either side.
    Drain {
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 30.0)]
        timeout: f64,
    },
    /// Stop serving, flush and exit.
    Shutdown,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colours for a person at a terminal; none in a log file, where they are noise.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        // A log line that cannot be written (its file system full) is lost, and nothing else:
        // the default reports it with `eprintln!`, which panics, ending the request whose
        // warning it was without an answer.
        .log_internal_errors(false)
        .init();
    let cli = Cli::parse();
    if matches!(cli.command, Command::Image(_)) {
        // `tapmirror image map … | head` ends quietly when its reader goes, as `ls` does,
        // rather than panicking in `println!` on EPIPE. Only there: `serve`, `copy`, `ctl` and
        // `info` write to sockets, where a hung-up peer must be an error, not a silent death.
        // SAFETY: called before any thread starts; the default action needs no handler.
        if let Err(e) = unsafe { nix::sys::signal::signal(nix::sys::signal::Signal::SIGPIPE, nix::sys::signal::SigHandler::SigDfl) } {
            eprintln!("tapmirror: cannot restore SIGPIPE: {e}");
            return ExitCode::from(2);
        }
    }
    // Before the runtime starts any thread: socket activation edits the environment.
    let activated = activated_listeners();
    if !activated.is_empty() {
        exit_with_starter();
    }
    // Completions that do not come inline are found by the reactor (`io/uring.rs`), which a
    // busy worker polls only every `event_interval` tasks: at tokio's 61, queue-depth-1
    // clients beside deep queues lost 10-20% against the reaper thread that used to find
    // them; at 15 they gained, for a few percent off the deep queues (benches/README.md).
    let runtime = match tokio::runtime::Builder::new_multi_thread().event_interval(15).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tapmirror: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve(args) => serve(args, activated).await,
            Command::Ctl(args) => ctl(args).await,
            Command::Copy(args) => copy(args).await,
            Command::Info { uri } => info(&uri).await,
            Command::Image(cmd) => image_command(cmd).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => match e.downcast_ref::<Exit>() {
            Some(Exit(code)) => ExitCode::from(*code),
            None => {
                eprintln!("tapmirror: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

/// Writes `line` to stdout, best effort: a server whose stdout is gone (a full file system,
/// a closed pipe) goes on serving, where `println!` would panic.
fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    if let Err(e) = writeln!(out, "{line}").and_then(|()| out.flush()) {
        tracing::warn!(error = %e, line, "could not write to stdout");
    }
}

/// An outcome that is no error but has its own exit status (the command said why already).
#[derive(Debug)]
struct Exit(u8);

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit status {}", self.0)
    }
}

impl std::error::Error for Exit {}

/// `image check`'s status for a sound image with leaked clusters, `qemu-img check`'s.
const LEAKS_EXIT: u8 = 3;


/// A count of at least one (`--connections`, `--requests`).
/// Most connections a copy opens: more than any server's worker pool takes to good use, and
/// each is a descriptor and two tasks on both ends (100 000 asked for opened 1 900 before the
/// server stopped answering).
const MAX_CONNECTIONS: usize = 64;

/// Most requests a copy keeps in flight per connection: each holds a buffer of up to the
/// request size (1 MiB by default), so the cap bounds its memory to 256 MiB a connection.
const MAX_REQUESTS: usize = 256;

fn connection_count(s: &str) -> std::result::Result<usize, String> {
    count_within(s, MAX_CONNECTIONS)
}

fn request_count(s: &str) -> std::result::Result<usize, String> {
    count_within(s, MAX_REQUESTS)
}

fn count_within(s: &str, max: usize) -> std::result::Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(n) if (1..=max).contains(&n) => Ok(n),
        Ok(_) => Err(format!("must be from 1 to {max}")),
        Err(_) => Err(format!("not a count: {s:?}")),
    }
}

/// Listening sockets passed by systemd-style socket activation (`LISTEN_PID`, `LISTEN_FDS`,
/// first descriptor 3), taken once and removed from the environment so children don't inherit
/// them.
fn activated_listeners() -> Vec<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    let pid_ok = std::env::var("LISTEN_PID").ok().and_then(|p| p.parse::<u32>().ok()) == Some(std::process::id());
    let count = std::env::var("LISTEN_FDS").ok().and_then(|n| n.parse::<i32>().ok()).unwrap_or(0);
    if !pid_ok || count <= 0 {
        return Vec::new();
    }
    // SAFETY: called before any thread is started by us; these variables are ours to consume.
    unsafe {
        std::env::remove_var("LISTEN_PID");
        std::env::remove_var("LISTEN_FDS");
        std::env::remove_var("LISTEN_FDNAMES");
    }
    (3..3 + count.min(64))
        // SAFETY: fcntl on a plain integer descriptor touches no memory; it fails for fds that
        // are not open, which are skipped.
        .filter(|&fd| unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } == 0)
        // SAFETY: the activation protocol hands these descriptors to this process; each is taken
        // exactly once (the variables are removed above).
        .map(|fd| unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
        .collect()
}

/// Makes the process's parent going away a SIGTERM for it (a clean shutdown: in-flight requests
/// finish, the image is flushed). Socket activation's starter is the client (`nbdcopy [ CMD ]`,
/// `nbdinfo [ CMD ]`), which stops the server it started when it closes its handle, but not
/// when it exits on an error: the server then served nobody for ever, holding the image's lock.
/// Under systemd the parent is init, which does not go away.
fn exit_with_starter() {
    // SAFETY: prctl with PR_SET_PDEATHSIG and a signal number takes no pointers.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong) } != 0 {
        tracing::warn!(error = %std::io::Error::last_os_error(), "cannot ask to exit with the process that started us");
    }
}

async fn serve(args: ServeArgs, activated: Vec<std::os::fd::OwnedFd>) -> Result<()> {
    if let Some(size) = args.create
        && !args.image.exists()
    {
        RawImage::create(&args.image, size).with_context(|| format!("creating {}", args.image.display()))?;
        tracing::info!(image = %args.image.display(), size, "created sparse raw image");
    }
    if args.socket.is_none() && args.listen.is_none() && activated.is_empty() {
        bail!("nothing to listen on: give --socket or --listen (or start under socket activation)");
    }
    let engine = args.io_engine.unwrap_or_else(EngineChoice::from_env).resolve().context("choosing the I/O engine")?;
    let access = if args.read_only { Access::ReadOnly } else { Access::ReadWrite };
    let format = args.format.format();
    let image = AnyImage::open(&args.image, format, access, engine)
        .await
        .with_context(|| format!("opening {}", args.image.display()))?;
    let (format, size, chain) = (image.format(), image.size(), image.chain().len());
    let export = ExportConfig {
        name: args.export_name.clone(),
        description: Some(format!("tapmirror {}", args.image.display())),
        read_only: args.read_only,
    };
    // The server holds the only reference: pause must be able to close the image for writing
    // (so the backend can snapshot it), and unpause --leaf to replace it.
    let server = NbdServer::new(Arc::new(image), export);
    // The served format, never probed again: a raw disk whose guest wrote a qcow2 header must
    // not come back from a pause as a qcow2.
    let open: tapmirror::control::OpenImage<AnyImage> =
        Box::new(move |path: PathBuf, access| Box::pin(async move { open_leaf(&path, format, access, engine).await }));
    if args.paused {
        // Before any listener: no request can come in ahead of it.
        server.pause().await;
        // Attached but not yet active (xapi attaches a VM's disks before it starts the VM):
        // held as after a `pause`, read-only and unlocked, so the disk can be snapshotted,
        // cloned or coalesced meanwhile. Opened for writing first all the same, so that an
        // image another writer holds fails the start rather than the activate.
        if access == Access::ReadWrite {
            tapmirror::control::let_go_for_writing(&server, &open, args.image.clone())
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))
                .with_context(|| format!("holding {} read-only while paused", args.image.display()))?;
        }
    }
    let shutdown = CancellationToken::new();
    let mut tasks = tokio::task::JoinSet::new();
    let mut ready = Vec::new();

    if let Some(path) = &args.socket {
        let listener = bind_unix(path)?;
        ready.push(format!("unix={}", path.display()));
        tasks.spawn(Arc::clone(&server).serve_unix(listener, shutdown.clone()));
    }
    if let Some(addr) = args.listen {
        let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding {addr}"))?;
        let bound = listener.local_addr()?;
        ready.push(format!("tcp={bound}"));
        tasks.spawn(Arc::clone(&server).serve_tcp(listener, shutdown.clone()));
    }
    for fd in activated {
        let std_listener = std::os::unix::net::UnixListener::from(fd);
        let is_unix = std_listener.local_addr().is_ok();
        if is_unix {
            std_listener.set_nonblocking(true)?;
            let listener = tokio::net::UnixListener::from_std(std_listener).context("activated Unix socket")?;
            ready.push("activated=unix".to_owned());
            tasks.spawn(Arc::clone(&server).serve_unix(listener, shutdown.clone()));
        } else {
            let tcp = std::net::TcpListener::from(std::os::fd::OwnedFd::from(std_listener));
            tcp.set_nonblocking(true)?;
            let listener = tokio::net::TcpListener::from_std(tcp).context("activated TCP socket")?;
            ready.push(format!("activated=tcp:{}", listener.local_addr()?));
            tasks.spawn(Arc::clone(&server).serve_tcp(listener, shutdown.clone()));
        }
    }
    // The control socket listens before the ready line, so whoever waits for that line can
    // use it at once. Connections passed by descriptor (`nbd-accept`) are served until
    // shutdown, like accepted ones, and waited for before the final flush.
    let accepted = tokio_util::task::TaskTracker::new();
    if let Some(path) = &args.control {
        let listener = bind_unix(path)?;
        let control = Arc::new(tapmirror::control::Control {
            server: Arc::clone(&server),
            open,
            path: std::sync::Mutex::new(args.image.clone()),
            access,
            paused_file: std::sync::Mutex::new(None),
            shutdown: shutdown.clone(),
            accepted: accepted.clone(),
            changing: tokio::sync::Mutex::new(()),
        });
        tokio::spawn(tapmirror::control::serve(listener, control));
    }
    // Metadata a format keeps ahead of its file (VHD) goes out every so often, so neither a
    // crash nor the next flush finds much of it.
    {
        let (server, shutdown) = (Arc::clone(&server), shutdown.clone());
        tokio::spawn(async move {
            let mut every = tokio::time::interval(tapmirror::image::METADATA_SYNC_EVERY);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = every.tick() => {}
                }
                if let Err(e) = server.image().sync_metadata().await {
                    tracing::warn!(error = %e, "writing out the image's metadata failed; the next flush tries again");
                }
            }
        });
    }
    tracing::info!(image = %args.image.display(), ?format, size, chain, ?engine, "serving");
    if args.socket.is_some() || args.listen.is_some() {
        // One line on stdout tells scripts and tests where we listen. Under socket activation
        // stdout belongs to whoever started us, so the line goes to the log only.
        say(&format!("ready {}", ready.join(" ")));
    }
    tracing::debug!(listeners = %ready.join(" "), "ready");

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT"),
        _ = shutdown.cancelled() => tracing::info!("shutdown by control socket"),
    }
    shutdown.cancel();
    while tasks.join_next().await.is_some() {}
    accepted.close();
    accepted.wait().await;
    server.image().flush().await.context("final flush")?;
    for path in [&args.socket, &args.control].into_iter().flatten() {
        let _ = std::fs::remove_file(path);
    }
    let s = server.stats();
    tracing::info!(
        connections = s.connections.load(std::sync::atomic::Ordering::Relaxed),
        requests = s.requests.load(std::sync::atomic::Ordering::Relaxed),
        errors = s.errors.load(std::sync::atomic::Ordering::Relaxed),
        "stopped"
    );
    Ok(())
}

/// Whether `s` names an NBD export rather than a file: any `nbd` scheme, so that one not
/// supported (`nbds://`) is refused as such, not taken for a file path and created.
fn is_uri(s: &str) -> bool {
    s.split_once("://").is_some_and(|(scheme, _)| scheme == "nbd" || scheme == "nbds" || scheme.starts_with("nbd+") || scheme.starts_with("nbds+"))
}

/// Refuses a destination that is one of the source's files: its top, or a backing or parent
/// that other images may share. Writing into the chain being read corrupts it, and with it
/// every image above that layer. Compared by identity (device and inode, or the device a
/// block device node stands for), so other names, links and symlinks for the file count too.
fn refuse_a_file_of_the_source(dest: &Path, chain: &[std::path::PathBuf]) -> Result<()> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let identity = |m: &std::fs::Metadata| {
        if m.file_type().is_block_device() { (0, 0, m.rdev()) } else { (m.dev(), m.ino(), 0) }
    };
    let Ok(dest_meta) = std::fs::metadata(dest) else { return Ok(()) }; // a new file
    let dest_id = identity(&dest_meta);
    for layer in chain {
        let meta = std::fs::metadata(layer).with_context(|| format!("stat {}", layer.display()))?;
        if identity(&meta) == dest_id {
            bail!(
                "the destination {} is {}, a file of the source's chain: copying into it would overwrite what is being read",
                dest.display(),
                layer.display()
            );
        }
    }
    Ok(())
}

/// Refuses a source image whose top file another process has open for writing: a running
/// `tapmirror serve` (its `flock`), or QEMU (its write lock byte: a VM, qemu-nbd, qemu-io).
/// Read under a writer, a qcow2's or VHD's metadata is whatever the writer last wrote back,
/// and the copy mixed old and new data (a served qcow2 copied as all zeroes), reporting
/// success; `qemu-img convert` refuses such a file too. Answers the file with a shared `flock`
/// held, so that no `tapmirror serve` starts writing it while the copy reads it.
fn refuse_a_source_being_written(top: &Path) -> Result<std::fs::File> {
    let file = std::fs::File::open(top).with_context(|| format!("opening {}", top.display()))?;
    if !tapmirror::image::lock_shared(&file).with_context(|| format!("locking {}", top.display()))? {
        bail!(
            "{} is open for writing by another process (a running `tapmirror serve`, a VM, qemu-nbd): a copy of it would mix old and new data; copy it through that process's NBD export instead, or stop it first",
            top.display()
        );
    }
    Ok(file)
}

/// SIGTERM, SIGINT and SIGHUP (a terminal or ssh session gone), caught from the moment this
/// is made: made before a copy makes its file, so that no stop can end the process with the
/// file left behind.
struct StopSignals(Option<[tokio::signal::unix::Signal; 3]>);

impl StopSignals {
    fn new() -> StopSignals {
        use tokio::signal::unix::{SignalKind, signal};
        match (signal(SignalKind::terminate()), signal(SignalKind::interrupt()), signal(SignalKind::hangup())) {
            (Ok(term), Ok(int), Ok(hup)) => StopSignals(Some([term, int, hup])),
            _ => StopSignals(None),
        }
    }

    /// Resolves when one arrives, with its name; never, if they could not be caught.
    async fn recv(&mut self) -> &'static str {
        match &mut self.0 {
            Some([term, int, hup]) => tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
                _ = hup.recv() => "SIGHUP",
            },
            None => std::future::pending().await,
        }
    }
}

/// How long a further connection to a destination that answered the first may take to greet
/// us: a server that offers multi-conn but serves a few clients at a time (`qemu-nbd -e 2`)
/// accepts more and never speaks to them.
const MORE_CONNECTIONS_WITHIN: Duration = Duration::from_secs(5);

/// Connects and negotiates with an NBD end, within `within` (a server that accepts and never
/// speaks held the copy for ever, past --timeout and SIGTERM alike).
async fn connect_nbd(uri: &NbdUri, opts: &ClientOptions, within: Option<Duration>) -> Result<NbdClient> {
    let connect = NbdClient::connect_with(&uri.endpoint, opts.clone());
    match within {
        Some(limit) => match tokio::time::timeout(limit, connect).await {
            Ok(r) => Ok(r?),
            Err(_) => bail!("no NBD greeting and negotiation within {} s (--timeout)", limit.as_secs_f64()),
        },
        None => Ok(connect.await?),
    }
}

/// Opens `count` connections to `uri` (one unless it offers multi-conn).
async fn connect_dest(uri: &NbdUri, count: usize, opts: &ClientOptions) -> Result<Vec<NbdClient>> {
    let first = connect_nbd(uri, opts, opts.answer_timeout).await.context("connecting to the destination")?;
    let n = if first.info().flags & tflags::CAN_MULTI_CONN != 0 { count.max(1) } else { 1 };
    let mut clients = vec![first];
    let within = opts.answer_timeout.map_or(MORE_CONNECTIONS_WITHIN, |t| t.min(MORE_CONNECTIONS_WITHIN));
    for _ in 1..n {
        match connect_nbd(uri, opts, Some(within)).await {
            Ok(c) => clients.push(c),
            // A server that offers multi-conn may still take fewer connections (a limit in
            // front of it): the copy goes on over those it has.
            Err(e) => {
                tracing::warn!(got = clients.len(), wanted = n, error = %format!("{e:#}"), "the destination took fewer connections than asked; copying over those");
                break;
            }
        }
    }
    Ok(clients)
}

/// Runs a step of the copy's setup (connecting, opening) until a stop signal: the copy proper
/// watches for them itself.
/// How long a copy with a checkpoint, stopped by a signal, may take to record where it got to.
const STOP_GRACE: Duration = Duration::from_secs(20);

async fn or_stopped<T>(stops: &mut StopSignals, what: &str, step: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    tokio::select! {
        r = step => r,
        signal = stops.recv() => bail!("stopped by {signal} while {what}"),
    }
}

async fn copy(args: CopyArgs) -> Result<()> {
    use tapmirror::copy::{CopyOptions, Dest, Source};
    let mut stops = StopSignals::new();
    let engine = EngineChoice::from_env().resolve()?;
    let answer_timeout = Some(Duration::from_secs(args.timeout)).filter(|t| !t.is_zero());
    let nbd_options = |uri: &NbdUri| ClientOptions { export: uri.export.clone(), answer_timeout, ..ClientOptions::default() };
    let source: Source<CopyImage> = match &args.base {
        _ if is_uri(&args.src) && args.base.is_some() => bail!("--base needs an image source, not an NBD export"),
        _ if is_uri(&args.src) => {
            let uri = NbdUri::parse(&args.src)?;
            let opts = nbd_options(&uri);
            let connect = connect_nbd(&uri, &opts, answer_timeout);
            Source::Nbd(or_stopped(&mut stops, "connecting to the source", connect).await.context("connecting to the source")?)
        }
        None => Source::Image(Arc::new(open_copy_image(Path::new(&args.src), args.format.format(), Access::ReadOnly, engine).await?)),
        Some(base) => {
            let src = Path::new(&args.src);
            let compared = || format!("comparing {} with {}", src.display(), base.display());
            let src_format = args.format.resolve(src)?;
            let ranges = match (src_format, Format::detect(base).with_context(|| format!("--base {}", base.display()))?) {
                (Format::Vhd, Format::Vhd) => Some(vhd::diff_map(src, base).await.with_context(compared)?),
                (Format::Qcow2, Format::Qcow2) => qcow2::diff_map(src, base).await.with_context(compared)?,
                _ => bail!("--base works on VHD or qcow2 chains of one format (a source and a base that share ancestors)"),
            };
            let image = Arc::new(open_copy_image(src, Some(src_format), Access::ReadOnly, engine).await?);
            match ranges {
                Some(ranges) => Source::Diff { image, ranges },
                None => {
                    // The base has layers the source lacks: what they changed is unknown here.
                    tracing::warn!(base = %base.display(), "the base holds layers the source does not; copying the whole source");
                    Source::Image(image)
                }
            }
        }
    };
    // Every file of the chain, as `qemu-img convert` asks a shared lock of each: a backing
    // written by another process changes under the copy as much as the top does.
    let _reading = match &source {
        _ if args.force_share => Vec::new(),
        Source::Image(image) | Source::Diff { image, .. } => image.chain().iter().map(|f| refuse_a_source_being_written(f)).collect::<Result<Vec<_>>>()?,
        Source::Nbd(_) => Vec::new(),
    };
    if args.no_backing
        && let Source::Image(image) | Source::Diff { image, .. } = &source
        && let [_, backing, ..] = image.chain().as_slice()
    {
        bail!(
            "{} reads through a backing file or parent ({}), which --no-backing refuses: an image from elsewhere may name any file here; flatten it first (qemu-img convert)",
            args.src,
            backing.display()
        );
    }
    let size = source.size();
    // A source a checkpoint cannot stamp (a block device) is refused before any destination
    // file is made: refused after, it left one of the source's size, looking whole.
    let source_chain = match &source {
        Source::Image(image) | Source::Diff { image, .. } => image.chain(),
        Source::Nbd(_) => Vec::new(),
    };
    if let Some(cp) = &args.checkpoint {
        tapmirror::copy::files_stamp(&source_chain, None)?;
        // Before any data is sent: a checkpoint that cannot be written failed the copy at its
        // first one, seconds in, leaving a destination file with nothing to resume it.
        tapmirror::copy::Checkpoint::check_writable(cp)?;
        if !is_uri(&args.dest) && std::path::absolute(cp).ok() == std::path::absolute(&args.dest).ok() {
            bail!("--checkpoint {} names the destination itself: give the checkpoint a file of its own", cp.display());
        }
        if source_chain.iter().any(|f| std::fs::canonicalize(f).ok() == std::fs::canonicalize(cp).ok()) {
            bail!("--checkpoint {} names a file of the source: give the checkpoint a file of its own", cp.display());
        }
        if args.dest_new && cp.exists() {
            bail!("checkpoint {} is there to resume a copy into an existing destination, and --dest-new makes a new one: resume without --dest-new", cp.display());
        }
        if matches!(source, Source::Nbd(_)) && cp.exists() {
            tracing::warn!(
                source = %args.src,
                "resuming from an NBD export, which a checkpoint cannot stamp: if what it serves changed since, the destination will not equal it"
            );
        }
    }
    // The file this copy made, if it made one: a failed copy takes it away again.
    let mut made: Option<std::fs::Metadata> = None;
    let (dest, connections): (Dest<CopyImage>, usize) = if is_uri(&args.dest) {
        let uri = NbdUri::parse(&args.dest)?;
        let clients = or_stopped(&mut stops, "connecting to the destination", connect_dest(&uri, args.connections, &nbd_options(&uri))).await?;
        let n = clients.len();
        (Dest::nbd(clients)?, n)
    } else {
        let path = Path::new(&args.dest);
        if let Source::Image(image) | Source::Diff { image, .. } = &source {
            refuse_a_file_of_the_source(path, &image.chain())?;
        }
        if !path.exists()
            && let Some(cp) = &args.checkpoint
            && cp.exists()
        {
            // One that is not a checkpoint at all says so first: it names no destination.
            tapmirror::copy::Checkpoint::load(cp)?;
            bail!(
                "checkpoint {} is for {}, which no longer exists: what it says is there is not; remove the checkpoint to copy from the start",
                cp.display(),
                path.display()
            );
        }
        let created = if args.dest_new || !path.exists() {
            // A link to a missing file is never followed to make it (a link planted in a folder
            // others may write would aim the copy at a file of their choosing): said so, not
            // as the bare "File exists" that creating through it answers.
            if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink()) && !path.exists() {
                bail!("{} is a symbolic link to a file that does not exist: the copy makes no file through a link; name the file itself", path.display());
            }
            Some(RawImage::create(path, size).with_context(|| format!("creating {}", path.display()))?)
        } else {
            None
        };
        let image = match &created {
            // Through the new file's own descriptor, never its name again: in a folder others
            // may write, the name could be a link to some other file by now.
            Some(file) => {
                made = file.metadata().ok();
                let ours = PathBuf::from(format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(file)));
                open_copy_image(&ours, Some(Format::Raw), Access::ReadWrite, engine).await.with_context(|| format!("opening {}", path.display()))?
            }
            None => open_copy_image(path, args.dest_format.format(), Access::ReadWrite, engine).await?,
        };
        (Dest::Image(Arc::new(image)), 1)
    };
    // A checkpoint names the copy's files as they are: resuming from one made before the
    // source changed, or into another destination file of the same name, would leave the
    // destination without what it says is there. (An NBD end has no such stamp: what its
    // server serves is its own to keep.)
    let files_stamp = match &args.checkpoint {
        None => None,
        Some(_) => {
            let dest_file = if is_uri(&args.dest) { None } else { made.clone().or_else(|| std::fs::metadata(&args.dest).ok()) };
            Some(tapmirror::copy::files_stamp(&source_chain, dest_file.as_ref())?)
        }
    };
    let opts = CopyOptions {
        requests: args.requests.unwrap_or((8 / connections.max(1)).max(2)),
        request_size: usize::try_from(args.request_size).unwrap_or(usize::MAX),
        target_is_zero: args.target_is_zero,
        bwlimit: args.bwlimit,
        checkpoint: args.checkpoint.clone(),
        files_stamp,
        writeback_every: args.writeback_every,
        progress: args.progress,
        ..CopyOptions::default()
    };
    // A copy stopped by a signal (`StopSignals`) ends as one that failed, so that it too takes
    // away the file it made (killed, it left one of the source's size, looking whole).
    let names = (copy_end_name(&args.src), copy_end_name(&args.dest));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let opts = CopyOptions { stop: Some(Arc::clone(&stop)), ..opts };
    let copying = tapmirror::copy::copy(Arc::new(source), Arc::new(dest), connections, &opts, (&names.0, &names.1));
    tokio::pin!(copying);
    let copied = tokio::select! {
        copied = &mut copying => copied,
        signal = stops.recv() => {
            // With a checkpoint, the copy stops sending and records where it got to, so that
            // the resume sends nothing twice (a copy dropped at once resent up to 5 s of data);
            // a second signal, or STOP_GRACE, ends it at once.
            let stopped = || Err(anyhow::anyhow!("stopped by {signal}"));
            if let Some(cp) = &args.checkpoint {
                stop.store(true, std::sync::atomic::Ordering::SeqCst);
                // Cut short before the checkpoint was written: say which point a resume
                // starts from, rather than let the user think it is where the copy got to.
                let cut_short = |why: &str| {
                    let kept = match tapmirror::copy::Checkpoint::load(cp) {
                        Ok(Some(c)) => format!("the checkpoint keeps its last mark, {} bytes, from which a resume starts", c.done),
                        Ok(None) => "no checkpoint was written: a resume starts from the beginning".to_owned(),
                        Err(e) => format!("the checkpoint cannot be read ({e:#})"),
                    };
                    Err(anyhow::anyhow!("stopped by {signal}, {why} before it recorded where it got to; {kept}"))
                };
                tokio::select! {
                    // Done meanwhile (the signal came as it ended): it is done.
                    copied = &mut copying => copied.or_else(|e| match e.downcast_ref::<tapmirror::copy::Stopped>() {
                        Some(s) => Err(anyhow::anyhow!("stopped by {signal}; the checkpoint records {} bytes copied, from which a resume starts", s.done)),
                        None => stopped(),
                    }),
                    _ = stops.recv() => cut_short("then by a second signal"),
                    _ = tokio::time::sleep(STOP_GRACE) => cut_short(&format!("and its in-flight requests and flush took over {} s", STOP_GRACE.as_secs())),
                }
            } else {
                stopped()
            }
        }
    };
    if let (Err(_), Some(ours), None) = (&copied, &made, &args.checkpoint) {
        let path = Path::new(&args.dest);
        // A file of the source's size, partly written, would pass for a whole copy. Only ours
        // goes: the name must still be the file this copy made (not something put there since).
        // With a checkpoint it stays, for the resume.
        use std::os::unix::fs::MetadataExt;
        if std::fs::symlink_metadata(path).is_ok_and(|m| m.dev() == ours.dev() && m.ino() == ours.ino())
            && let Err(e) = std::fs::remove_file(path)
        {
            tracing::warn!(path = %path.display(), error = %e, "could not remove the failed copy's file");
        }
    }
    let report = copied?;
    tracing::info!(?report, "copy done");
    if args.progress != tapmirror::copy::ProgressMode::Json {
        let _ = writeln!(std::io::stderr(), "{}", serde_json::to_string(&report)?);
    }
    Ok(())
}

/// How a checkpoint names an end of a copy: a file by its canonical path, so that the same
/// copy named another way (a relative path, a link) is still the same copy, and an NBD URI as
/// given.
fn copy_end_name(end: &str) -> String {
    if is_uri(end) {
        return end.to_owned();
    }
    std::fs::canonicalize(end).map_or_else(|_| end.to_owned(), |p| p.display().to_string())
}

/// The image type copies read and write.
type CopyImage = AnyImage;

async fn open_copy_image(path: &Path, format: Option<Format>, access: Access, engine: tapmirror::io::EngineKind) -> Result<CopyImage> {
    AnyImage::open(path, format, access, engine).await.with_context(|| format!("opening {}", path.display()))
}

async fn open_leaf(path: &Path, format: Format, access: Access, engine: tapmirror::io::EngineKind) -> Result<AnyImage> {
    AnyImage::open(path, Some(format), access, engine).await
}

async fn ctl(args: CtlArgs) -> Result<()> {
    use serde_json::json;
    let mut fds: Vec<std::os::fd::OwnedFd> = Vec::new();
    let request = match args.command {
        CtlCommand::Stats => json!({"cmd": "stats"}),
        CtlCommand::Pause => json!({"cmd": "pause"}),
        CtlCommand::Unpause { leaf: None } => json!({"cmd": "unpause"}),
        CtlCommand::Unpause { leaf: Some(l) } => json!({"cmd": "unpause", "leaf": l}),
        CtlCommand::MirrorAttach { target, mode, timeout_ms, granularity, target_is_zero, rate, busy_rate } => {
            // Connect as the engine will (it does HTTP first), and pass the connected socket;
            // a full mirror gets a second one for its background pass.
            if (rate.is_some() || busy_rate.is_some()) && mode != tapmirror::mirror::MirrorMode::Full {
                bail!("--rate and --busy-rate pace a full mirror's background copy; a sync mirror has none");
            }
            if granularity.is_some() && mode != tapmirror::mirror::MirrorMode::Full {
                bail!("--granularity is a full mirror's dirty bitmap's; a sync mirror has none");
            }
            let uri = NbdUri::parse(&target)?;
            let connect = || -> Result<std::os::fd::OwnedFd> {
                Ok(match &uri.endpoint {
                    tapmirror::nbd::Endpoint::Unix(p) => std::os::fd::OwnedFd::from(
                        std::os::unix::net::UnixStream::connect(p).with_context(|| format!("connecting {}", p.display()))?,
                    ),
                    tapmirror::nbd::Endpoint::Tcp(h, port) => {
                        let s = std::net::TcpStream::connect((h.as_str(), *port)).with_context(|| format!("connecting {h}:{port}"))?;
                        s.set_nodelay(true)?;
                        std::os::fd::OwnedFd::from(s)
                    }
                })
            };
            fds.push(connect()?);
            if mode == tapmirror::mirror::MirrorMode::Full {
                fds.push(connect()?);
            }
            let mut request = json!({"cmd": "mirror-attach", "mode": mode, "timeout_ms": timeout_ms, "export": uri.export,
                   "granularity": granularity, "target_is_zero": target_is_zero, "rate": rate.unwrap_or(0)});
            if let Some(b) = busy_rate {
                request["busy_rate"] = json!(b);
            }
            request
        }
        CtlCommand::MirrorRate { bytes_per_s, busy } => json!({"cmd": "mirror-rate", "bytes_per_s": bytes_per_s, "busy": busy}),
        CtlCommand::MirrorConverge => json!({"cmd": "mirror-converge"}),
        CtlCommand::MirrorDetach => json!({"cmd": "mirror-detach"}),
        CtlCommand::Drain { timeout } => json!({"cmd": "drain", "timeout_s": timeout}),
        CtlCommand::Shutdown => json!({"cmd": "shutdown"}),
    };
    let socket = args.socket.clone();
    let answer = tokio::task::spawn_blocking(move || tapmirror::control::request_with(&socket, &request, fds.iter().collect())).await??;
    println!("{answer}");
    if answer.get("ok").and_then(serde_json::Value::as_bool) != Some(true) {
        bail!("{}", answer.get("error").and_then(serde_json::Value::as_str).unwrap_or("command failed"));
    }
    Ok(())
}

fn bind_unix(path: &Path) -> Result<tokio::net::UnixListener> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            bail!("{} exists and is not a socket", path.display());
        }
        // Replace only a stale socket: if something answers, another server owns it.
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!("{} is in use by a running server", path.display());
        }
        std::fs::remove_file(path).with_context(|| format!("removing stale socket {}", path.display()))?;
    }
    let listener = tokio::net::UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

async fn info(uri: &str) -> Result<()> {
    let uri = NbdUri::parse(uri)?;
    let client = NbdClient::connect(&uri).await?;
    let i = client.info().clone();
    let map = if i.base_allocation.is_some() { Some(client.allocation_map().await?) } else { None };
    let _ = client.disconnect().await;
    let flag = |f| i.flags & f != 0;
    let out = serde_json::json!({
        "export": i.name,
        "size": i.size,
        "structured_replies": i.structured,
        "flags": {
            "read_only": flag(tflags::READ_ONLY),
            "flush": flag(tflags::SEND_FLUSH),
            "fua": flag(tflags::SEND_FUA),
            "trim": flag(tflags::SEND_TRIM),
            "write_zeroes": flag(tflags::SEND_WRITE_ZEROES),
            "fast_zero": flag(tflags::SEND_FAST_ZERO),
            "df": flag(tflags::SEND_DF),
            "multi_conn": flag(tflags::CAN_MULTI_CONN),
        },
        "block_size": {
            "minimum": i.block_size.minimum,
            "preferred": i.block_size.preferred,
            "maximum": i.block_size.maximum,
        },
        "map": map.map(|m| m.iter().map(|e| serde_json::json!({
            "offset": e.offset,
            "length": e.length,
            "type": match e.flags & 3 { 3 => "hole", 2 => "zero", 0 => "data", _ => "hole-data" },
        })).collect::<Vec<_>>()),
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

/// Makes a new image of `format` at `path` (which does not exist yet).
async fn create_image(path: &std::path::Path, format: Format, size: Option<u64>, parent: Option<PathBuf>) -> Result<()> {
    match (format, parent) {
        (Format::Raw, Some(_)) => bail!("raw images have no parent"),
        (Format::Raw, None) => drop(RawImage::create(path, size.unwrap_or(0))?),
        (Format::Vhd, None) => vhd::create_dynamic(path, size.unwrap_or(0), vhd::DEFAULT_BLOCK_SIZE)?,
        (Format::Qcow2, None) => qcow2::create(path, size.unwrap_or(0), None).await?,
        (f, Some(parent)) => {
            let parent_size = AnyImage::open(&parent, None, Access::ReadOnly, EngineChoice::Portable.resolve()?)
                .await
                .with_context(|| format!("opening parent {}", parent.display()))?
                .size();
            if let Some(size) = size
                && size != parent_size
            {
                bail!("a child takes its parent's size ({parent_size} bytes), not {size}");
            }
            match f {
                Format::Vhd => vhd::create_differencing(path, &parent)?,
                _ => qcow2::create_overlay(path, &parent).await?,
            }
        }
    }
    Ok(())
}

async fn image_command(cmd: ImageCommand) -> Result<()> {
    match cmd {
        ImageCommand::Create { format, path, size, parent } => {
            if path.exists() {
                bail!("{} exists; image create never overwrites", path.display());
            }
            let made = create_image(&path, format, size, parent).await;
            if let Err(e) = &made
                && !e.chain().any(|c| c.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::AlreadyExists))
            {
                // Whatever the failed create left (an empty or part-written file) goes.
                let _ = std::fs::remove_file(&path);
            }
            made.with_context(|| format!("creating {}", path.display()))
        }
        ImageCommand::Info { path, format } => {
            let format = format.resolve(&path)?;
            let info = match format {
                Format::Raw => {
                    use std::os::unix::fs::MetadataExt;
                    let meta = std::fs::metadata(&path)?;
                    serde_json::json!({
                        "virtual_size": meta.len(),
                        "chain": [path],
                        "allocated_bytes": meta.blocks() * 512,
                    })
                }
                Format::Vhd => serde_json::to_value(vhd::info(&path)?)?,
                Format::Qcow2 => serde_json::to_value(qcow2::info(&path).await?)?,
            };
            let mut out = serde_json::json!({ "format": format });
            if let (Some(o), serde_json::Value::Object(i)) = (out.as_object_mut(), info) {
                o.extend(i);
            }
            println!("{}", serde_json::to_string_pretty(&out)?);
            Ok(())
        }
        ImageCommand::Map { path } => {
            let image = AnyImage::open(&path, None, Access::ReadOnly, EngineChoice::Portable.resolve()?).await?;
            let size = image.size();
            let mut map: Vec<serde_json::Value> = Vec::new();
            let mut at = 0;
            while at < size {
                let extents = image.allocation(at, size - at, usize::MAX).await?;
                let Some(last) = extents.last() else { bail!("no allocation reported at offset {at}") };
                at = last.offset + last.length;
                for e in extents {
                    let kind = match e.state {
                        ExtentState::Data => "data",
                        ExtentState::Zero => "zero",
                        ExtentState::Hole => "hole",
                    };
                    map.push(serde_json::json!({ "offset": e.offset, "length": e.length, "type": kind }));
                }
            }
            let out = serde_json::json!({ "format": image.format(), "size": size, "chain": image.chain(), "map": map });
            println!("{}", serde_json::to_string_pretty(&out)?);
            Ok(())
        }
        ImageCommand::Check { path } => {
            match Format::detect(&path)? {
                Format::Raw => {
                    std::fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
                }
                Format::Vhd => {
                    // Sound but worth knowing (a missing or unreadable end footer): said, not
                    // failed, as the qcow2 leaks below are.
                    for warning in vhd::check(&path)?.warnings() {
                        eprintln!("warning: {warning}");
                    }
                }
                Format::Qcow2 => {
                    let report = qcow2::check(&path).await?;
                    if report.leaked_clusters > 0 {
                        println!(
                            "{}: ok, but {} leaked clusters (wasted space, not damage; `qemu-img check -r leaks` reclaims them)",
                            path.display(),
                            report.leaked_clusters
                        );
                        return Err(Exit(LEAKS_EXIT).into());
                    }
                }
            }
            println!("{}: ok", path.display());
            Ok(())
        }
    }
}
