//! The `tapmirror` binary: argument parsing and wiring only.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use tapmirror::image::{Image, RawImage, raw::Access};
use tapmirror::io::EngineChoice;
use tapmirror::nbd::{ExportConfig, NbdClient, NbdServer, NbdUri, proto::tflags};
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
    /// Print an NBD export's size, flags and allocation map as JSON.
    Info {
        /// nbd+unix:///EXPORT?socket=PATH or nbd://HOST:PORT/EXPORT
        uri: String,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    /// The file's bytes are the disk's bytes.
    Raw,
}

#[derive(clap::Args)]
struct ServeArgs {
    /// The image file.
    image: PathBuf,
    /// Image format.
    #[arg(long, value_enum, default_value = "raw")]
    format: Format,
    /// Listen on this Unix socket (created mode 0600; a stale socket file is replaced).
    #[arg(long, required_unless_present = "listen")]
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
    /// I/O engine (also TAPMIRROR_IO_ENGINE).
    #[arg(long, value_enum)]
    io_engine: Option<EngineChoice>,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tapmirror: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve(args) => serve(args).await,
            Command::Info { uri } => info(&uri).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tapmirror: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(args: ServeArgs) -> Result<()> {
    let engine = args.io_engine.unwrap_or_else(EngineChoice::from_env).resolve().context("choosing the I/O engine")?;
    let access = if args.read_only { Access::ReadOnly } else { Access::ReadWrite };
    let image = match args.format {
        Format::Raw => RawImage::open(&args.image, access, engine)
            .await
            .with_context(|| format!("opening {}", args.image.display()))?,
    };
    let image = Arc::new(image);
    let export = ExportConfig {
        name: args.export_name.clone(),
        description: Some(format!("tapmirror {}", args.image.display())),
        read_only: args.read_only,
    };
    let server = NbdServer::new(Arc::clone(&image), export);
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
    tracing::info!(image = %args.image.display(), size = image.size(), engine = ?image.engine(), "serving");
    // One line on stdout tells scripts and tests where we listen.
    println!("ready {}", ready.join(" "));

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT"),
    }
    shutdown.cancel();
    while tasks.join_next().await.is_some() {}
    image.flush().await.context("final flush")?;
    if let Some(path) = &args.socket {
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

fn bind_unix(path: &Path) -> Result<tokio::net::UnixListener> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            bail!("{} exists and is not a socket", path.display());
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
