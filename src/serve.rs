//! `sxm serve`: one host. Opens the host's root folder, registers each SR type's backend with
//! the mux, and serves the storage interface on TCP and on a Unix socket until SIGINT or
//! SIGTERM. Datapath processes are not stopped on exit: they keep serving their guests, and the
//! next `sxm serve` on the same root takes them up again.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use sxm_engine::http::server::{ServerConfig, serve_with};
use sxm_engine::migrate::receive::Handover;
use sxm_engine::mux::Mux;
use tokio_util::sync::CancellationToken;

/// `sxm serve`'s options.
#[derive(clap::Args)]
pub struct ServeArgs {
    /// The host's folder: SR records and folders, datapath state, the host secret.
    #[arg(long)]
    root: PathBuf,
    /// TCP address for other hosts and remote callers (they must present the host secret).
    #[arg(long, value_name = "ADDR:PORT", value_parser = parse_listen)]
    listen: Option<std::net::SocketAddr>,
    /// HTTPS address for other hosts and remote callers (with the secret, as on --listen):
    /// xapi calls hosts over https by default. Needs --tls-cert and --tls-key.
    #[arg(long, value_name = "ADDR:PORT", value_parser = parse_listen, requires_all = ["tls_cert", "tls_key"])]
    listen_tls: Option<std::net::SocketAddr>,
    /// The certificate chain --listen-tls presents (PEM).
    #[arg(long, value_name = "PEM", requires = "listen_tls")]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM, not encrypted).
    #[arg(long, value_name = "PEM", requires = "listen_tls")]
    tls_key: Option<PathBuf>,
    /// CA certificates (PEM) that destinations called over https must chain to, their
    /// certificate naming the host the URL names. Without it, any certificate is taken: the
    /// link is encrypted, the destination not authenticated (xapi's verify_dest=false), and a
    /// migration asking verify_dest=true is refused.
    #[arg(long, env = "SXM_TLS_CA", value_name = "PEM")]
    tls_ca: Option<PathBuf>,
    /// Unix socket for local callers (mode 0600; no secret needed). Default: ROOT/sxm.sock.
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// The `tapmirror` binary that serves datapaths. Default: beside `sxm`, then $PATH.
    #[arg(long, env = "SXM_TAPMIRROR", value_name = "PATH")]
    tapmirror: Option<PathBuf>,
    /// Bytes per second at most for a full mirror's background copy while its guest writes
    /// (e.g. 256M; 0: no cap). A full mirror of a busy guest's disk is ready sooner the higher
    /// it is, and the guest's writes wait less for the CPU the lower it is. [default: 64M]
    #[arg(long, value_parser = crate::admin::parse_size, value_name = "BYTES_PER_S")]
    mirror_busy_rate: Option<u64>,
}

/// `ADDR:PORT`, or `NAME:PORT` resolved to its first address (`localhost:8001`).
fn parse_listen(s: &str) -> Result<std::net::SocketAddr, String> {
    use std::net::ToSocketAddrs;
    if let Ok(a) = s.parse() {
        return Ok(a);
    }
    match s.to_socket_addrs() {
        Ok(mut addrs) => addrs.next().ok_or_else(|| format!("{s} resolves to no address")),
        Err(e) => Err(format!("{s}: not ADDR:PORT or NAME:PORT ({e})")),
    }
}

/// The host secret TCP callers must present: read from `ROOT/secret`, created (mode 0600) on
/// first start.
pub fn host_secret(root: &Path) -> Result<String> {
    let path = root.join("secret");
    match std::fs::read_to_string(&path) {
        Ok(s) if !s.trim().is_empty() => return Ok(s.trim().to_owned()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("read {}", path.display())),
    }
    let secret = format!("{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple());
    let tmp = root.join(".secret.tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("create {}", tmp.display()))?;
    f.write_all(secret.as_bytes()).and_then(|()| f.sync_all()).with_context(|| format!("write {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("rename into {}", path.display()))?;
    Ok(secret)
}

/// Takes `ROOT/lock` for this process's life: one host per root. A second `sxm serve` on the
/// same root would take up the first one's datapaths, overwrite its records, and at its next
/// start reap a guest's datapath as nobody's. A predecessor still exiting (an overlapping
/// restart) is waited for a moment; the lock goes with the process however it ends, and the
/// datapaths, which outlive the host, never hold it (the descriptor is close-on-exec).
fn lock_root(root: &Path) -> Result<std::fs::File> {
    let path = root.join("lock");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("open {}", path.display()))?;
    let locked = tapmirror::image::lock_exclusive(&file).with_context(|| format!("lock {}", path.display()))?;
    anyhow::ensure!(locked, "another sxm serve runs on {} (it holds {})", root.display(), path.display());
    Ok(file)
}

/// Where the `tapmirror` binary is: given, beside this executable, or on $PATH.
pub fn find_tapmirror(given: Option<PathBuf>) -> Result<PathBuf> {
    if let Some(p) = given {
        anyhow::ensure!(p.is_file(), "tapmirror binary {} does not exist", p.display());
        return Ok(p);
    }
    let exe = std::env::current_exe().context("where is sxm")?;
    if let Some(beside) = exe.parent().map(|d| d.join("tapmirror"))
        && beside.is_file()
    {
        return Ok(beside);
    }
    std::env::var_os("PATH")
        .and_then(|paths| std::env::split_paths(&paths).map(|d| d.join("tapmirror")).find(|p| p.is_file()))
        .context("no tapmirror binary beside sxm or on $PATH (build it with `cargo build`, or pass --tapmirror)")
}

/// Runs the host until a signal.
pub async fn run(args: ServeArgs) -> Result<()> {
    std::fs::create_dir_all(&args.root).with_context(|| format!("create {}", args.root.display()))?;
    let root = args.root.canonicalize().with_context(|| format!("resolve {}", args.root.display()))?;
    let _one_host = lock_root(&root)?;
    let tapmirror = find_tapmirror(args.tapmirror)?;
    let secret = host_secret(&root)?;
    // Before the state is opened: opening it takes up migrations a crash interrupted, whose
    // calls to https destinations must verify them as `--tls-ca` says (the first call fixes
    // whom the process trusts).
    sxm_engine::http::tls::set_trust(args.tls_ca.as_deref()).context("--tls-ca")?;
    let tls = match (args.listen_tls, &args.tls_cert, &args.tls_key) {
        (Some(addr), Some(cert), Some(key)) => Some((addr, sxm_engine::http::tls::server_config(cert, key).context("--tls-cert, --tls-key")?)),
        _ => None,
    };

    let mux = Mux::builder()
        .backend("ext", Arc::new(sxm_smapiv1::ExtBackend::new(tapmirror.clone()).with_mirror_busy_rate(args.mirror_busy_rate)))
        .backend("qcow2", Arc::new(sxm_smapiv3::Qcow2Backend::new(tapmirror.clone()).with_mirror_busy_rate(args.mirror_busy_rate)))
        .open(&root)
        .await
        .with_context(|| format!("open host state in {}", root.display()))?;

    let mut cfg = ServerConfig::new(secret);
    cfg.tcp = args.listen;
    cfg.tls = tls;
    cfg.unix = Some(args.socket.unwrap_or_else(|| root.join("sxm.sock")));
    let shutdown = CancellationToken::new();
    let handover = Arc::new(Handover(mux.clone()));
    let running = serve_with(&cfg, mux, handover, shutdown.clone()).await.context("start the RPC server")?;
    // One line on stdout saying where the host listens: scripts and tests wait for it.
    let tcp = running.tcp_addr().map(|a| format!("http://{a}")).unwrap_or_else(|| "-".into());
    let tls = running.tls_addr().map(|a| format!("https://{a}")).unwrap_or_else(|| "-".into());
    let unix = running.unix_path().map(|p| p.display().to_string()).unwrap_or_else(|| "-".into());
    // Best effort: a host whose stdout is gone (a full file system) goes on, where `println!`
    // would panic.
    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        if let Err(e) = writeln!(out, "sxm serve: listening tcp={tcp} unix={unix} root={} tls={tls}", root.display()).and_then(|()| out.flush()) {
            tracing::warn!(error = %e, "could not write the listening line to stdout");
        }
    }
    tracing::info!(%tcp, %tls, %unix, root = %root.display(), tapmirror = %tapmirror.display(), "host up");

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).context("SIGTERM handler")?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("stopping; datapaths keep running");
    shutdown.cancel();
    running.wait().await.context("RPC server")?;
    Ok(())
}
