//! The `sxm` binary: argument parsing and wiring only. `sxm serve` runs one host; the other
//! commands are the admin CLI, which talks JSON-RPC to a host.

mod admin;
mod demo;
mod serve;

use std::io::Write;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "sxm", version, about = "Live storage motion: moves the disks of running VMs between storage repositories")]
struct Cli {
    #[command(flatten)]
    host: admin::HostArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show it all on this machine: two hosts, a VM of two disks moved live while its guest
    /// writes, verified byte for byte, then cleaned up.
    Demo(demo::DemoArgs),
    /// Run a host: serve the storage interface (xapi's SMAPIv2) over HTTP on TCP and a Unix socket.
    Serve(serve::ServeArgs),
    /// Storage repositories.
    #[command(subcommand)]
    Sr(admin::SrCommand),
    /// Virtual disks.
    #[command(subcommand)]
    Vdi(admin::VdiCommand),
    /// Tasks.
    #[command(subcommand)]
    Task(admin::TaskCommand),
    /// Live migration of VDIs that guests are writing.
    #[command(subcommand)]
    Mirror(admin::MirrorCommand),
    /// Copy a VDI nobody writes to another host's SR.
    Copy(admin::DestArgs),
    /// Move a VM's disks live as one job (or `migrate cutover JOB`, `migrate cancel JOB`).
    Migrate(admin::MigrateCmd),
}

fn main() -> std::process::ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // A usage error under --json is one JSON object too (help and version print as asked).
        Err(e) if std::env::args().any(|a| a == "--json") && e.use_stderr() => {
            eprintln!("{}", serde_json::json!({ "error": e.to_string().trim_end() }));
            return std::process::ExitCode::from(2);
        }
        Err(e) => e.exit(),
    };
    let json = cli.host.json() && !matches!(cli.command, Command::Serve(_) | Command::Demo(_));
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) if json => {
            // For scripts: one JSON object on stderr, with the host's storage error as xapi
            // marshals it (its tag and parameters) when that is what failed.
            eprintln!("{}", admin::error_json(&e));
            std::process::ExitCode::FAILURE
        }
        Err(e) => {
            // The whole chain on one line: what was being done, and why it failed.
            eprintln!("sxm: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// SIGPIPE in an admin command: the process ends by it, as a pipeline expects, when it was
/// its output (stdout or stderr, whose reader has gone) that broke; a write to a host's socket
/// that broke returns EPIPE instead, and the call fails saying so.
extern "C" fn on_sigpipe(_: libc::c_int) {
    let mut fds = [libc::pollfd { fd: 1, events: 0, revents: 0 }, libc::pollfd { fd: 2, events: 0, revents: 0 }];
    // SAFETY: poll, signal and raise are async-signal-safe; `fds` outlives the call. Raised
    // from inside the handler, SIGPIPE waits until the handler returns, and then ends the
    // process with the default action.
    unsafe {
        if libc::poll(fds.as_mut_ptr(), 2, 0) > 0 && fds.iter().any(|p| p.revents & (libc::POLLERR | libc::POLLHUP) != 0) {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
            libc::raise(libc::SIGPIPE);
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        // Colours for a person at a terminal; none in a log file, where they are noise.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        // A log line that cannot be written (a full file system) is lost, and nothing else:
        // the default reports it with `eprintln!`, which panics.
        .log_internal_errors(false)
        .init();
    if !matches!(cli.command, Command::Serve(_) | Command::Demo(_)) {
        // An admin command whose output is piped into `head` or `true` ends quietly when the
        // reader goes, as `ls` does, rather than panicking in `println!` on EPIPE; but a host
        // that hangs up on it (an https:// URL naming a plain port) is an error to report,
        // not a silent death. (The daemon keeps Rust's ignored SIGPIPE: a caller that hangs
        // up must not kill the host.)
        // SAFETY: called before any thread starts; the handler only makes async-signal-safe
        // calls.
        unsafe { nix::sys::signal::signal(nix::sys::signal::Signal::SIGPIPE, nix::sys::signal::SigHandler::Handler(on_sigpipe)) }?;
        // Output that cannot be written (a full disk) is an error said, as any other, not a
        // panic: `println!` panics on it, and the message it panics with is taken up here.
        let default_hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let payload = info.payload();
            let message = payload.downcast_ref::<String>().map(String::as_str).or_else(|| payload.downcast_ref::<&str>().copied()).unwrap_or_default();
            if let Some(why) = message.strip_prefix("failed printing to stdout: ") {
                let _ = writeln!(std::io::stderr(), "sxm: writing the output: {why}");
                std::process::exit(1);
            }
            default_hook(info);
        }));
    }
    if !matches!(cli.command, Command::Serve(_)) {
        // The CLI calls hosts over https (`--host`, `--dest`) trusting the CAs in
        // $SXM_TLS_CA, or any certificate without it (`sxm serve` takes --tls-ca).
        // Set empty, it is unset (as a shell's `SXM_TLS_CA= sxm …` means).
        let ca = std::env::var_os("SXM_TLS_CA").filter(|v| !v.is_empty()).map(std::path::PathBuf::from);
        sxm_engine::http::tls::set_trust(ca.as_deref()).map_err(|e| anyhow::anyhow!("SXM_TLS_CA: {e:#}"))?;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        match cli.command {
            Command::Serve(args) => serve::run(args).await,
            Command::Demo(args) => demo::run(args).await,
            Command::Sr(cmd) => admin::Admin::new(&cli.host)?.sr(cmd).await,
            Command::Vdi(cmd) => admin::Admin::new(&cli.host)?.vdi(cmd).await,
            Command::Task(cmd) => admin::Admin::new(&cli.host)?.task(cmd).await,
            Command::Mirror(cmd) => admin::Admin::new(&cli.host)?.mirror(cmd).await,
            Command::Copy(args) => admin::Admin::new(&cli.host)?.copy(args).await,
            Command::Migrate(cmd) => admin::Admin::new(&cli.host)?.migrate(cmd).await,
        }
    })
}
