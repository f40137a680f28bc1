//! The `sxm` binary: argument parsing and wiring only.
//!
//! Today it only identifies itself; `sxm serve`, the admin CLI, `sxm migrate` and `sxm demo`
//! arrive with the engine issues. The data path is the `tapmirror` binary.

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "sxm",
    version,
    about = "Live storage motion: moves the disks of running VMs between storage repositories",
    long_about = "Live storage motion: moves the disks of running VMs between storage repositories.\n\n\
                  The host daemon, admin CLI and demo are not built yet; the data path is `tapmirror` \
                  (try `tapmirror serve --help`)."
)]
struct Cli {}

fn main() {
    let _ = Cli::parse();
    // Keep the crates linked so the dependency direction (binary -> engine, backends) is real.
    let _ = (std::any::type_name::<Cli>(), env!("CARGO_PKG_VERSION"));
    println!("sxm {}: the data path is `tapmirror`; the host daemon arrives with the engine issues", env!("CARGO_PKG_VERSION"));
}
