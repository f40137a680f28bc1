//! `sxm demo`: the whole job on an embedded default, for a first run. Two hosts on this
//! machine (an `ext` SR on one, a `qcow2` SR on the other), a VM of two VDIs holding data, a
//! guest writing to both, a live migration of both disks with progress, the switch-over, a byte
//! for byte check of the result against what the guest wrote, a summary, and nothing left
//! behind.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use sxm_engine::http::client::{Endpoint, RpcClient};
use sxm_engine::model::{AttachInfo, Task, TaskState, VdiInfo};
use sxm_engine::rpc::Value;
use sxm_engine::rpc::marshal::Marshal;
use tapmirror::nbd::{NbdClient, NbdUri};

const MIB: u64 = 1 << 20;

/// `sxm demo`'s options.
#[derive(clap::Args)]
pub struct DemoArgs {
    /// Size of the VM's first disk (the second is half of it).
    #[arg(long, default_value = "256M", value_parser = crate::admin::parse_size)]
    size: u64,
    /// The guest's writes per second on each disk (4 KiB each), at least 1: the demo moves
    /// disks a guest is writing.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..))]
    rate: u32,
    /// Keep the demo's folder (hosts' roots, logs) instead of removing it.
    #[arg(long)]
    keep: bool,
}

/// One `sxm serve`, killed (with its datapaths) when dropped.
struct DemoHost {
    name: &'static str,
    root: PathBuf,
    child: Child,
    client: RpcClient,
    url: String,
}

impl DemoHost {
    fn start(name: &'static str, root: &Path) -> Result<DemoHost> {
        std::fs::create_dir_all(root)?;
        let log = std::fs::File::create(root.join("serve.log"))?;
        let mut child = Command::new(std::env::current_exe()?)
            .arg("serve")
            .arg("--root")
            .arg(root)
            .args(["--listen", "127.0.0.1:0"])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .context("start sxm serve")?;
        let mut line = String::new();
        let stdout = child.stdout.take().context("host stdout")?;
        std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line)?;
        let Some(tcp) = line.split_whitespace().find_map(|w| w.strip_prefix("tcp=")) else {
            // Said here: the log is in the demo's folder, which goes when the demo ends.
            let _ = child.wait();
            let log = std::fs::read_to_string(root.join("serve.log")).unwrap_or_default();
            let last: Vec<&str> = log.lines().rev().take(3).collect::<Vec<_>>().into_iter().rev().collect();
            bail!("the {name} host did not start: {}", if last.is_empty() { "it printed nothing".to_owned() } else { last.join(" / ") });
        };
        let secret = std::fs::read_to_string(root.join("secret"))?.trim().to_owned();
        let client = RpcClient::new(Endpoint::Unix(root.join("sxm.sock")));
        Ok(DemoHost { name, root: root.to_owned(), child, client, url: format!("{tcp}?session_id={secret}") })
    }

    async fn call(&self, method: &str, args: Vec<(&str, Value)>) -> Result<Value> {
        let mut m: Vec<(String, Value)> = args.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
        m.push(("dbg".into(), s("sxm demo")));
        self.client.call_json(method, Value::Struct(m)).await.with_context(|| format!("{} host", self.name))
    }

    async fn call_as<T: Marshal>(&self, method: &str, args: Vec<(&str, Value)>) -> Result<T> {
        let v = self.call(method, args).await?;
        T::from_value(&v).with_context(|| format!("{method} answered something unexpected"))
    }

    async fn sr(&self, ty: &str, name: &str) -> Result<String> {
        let sr = uuid::Uuid::new_v4().to_string();
        let dc = Value::Struct(vec![("type".into(), s(ty))]);
        self.call("SR.create", vec![("sr", s(&sr)), ("name_label", s(name)), ("device_config", dc)]).await?;
        self.call("SR.attach", vec![("sr", s(&sr))]).await?;
        Ok(sr)
    }

    /// Attaches and activates a VDI on datapath `dp`; answers its NBD URI.
    async fn attach(&self, sr: &str, vdi: &str, dp: &str) -> Result<String> {
        let info: AttachInfo = self.call_as("VDI.attach3", vec![("read_write", Value::Bool(true)), ("vdi", s(vdi)), ("sr", s(sr)), ("dp", s(dp))]).await?;
        self.call("VDI.activate3", vec![("vdi", s(vdi)), ("sr", s(sr)), ("dp", s(dp))]).await?;
        crate::admin::nbd_uri(&info)
    }
}

impl Drop for DemoHost {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Datapaths outlive their host by design; the demo's must not outlive the demo.
        let _ = Command::new("pkill").arg("-f").arg(format!("{}/run/", self.root.display())).status();
    }
}

fn s(x: &str) -> Value {
    Value::String(x.to_owned())
}

/// A guest writing 4 KiB blocks at random places at a steady rate, one at a time, keeping the
/// model of what the disk must hold and each write's latency.
struct Guest {
    stop: Arc<AtomicBool>,
    handle: tokio::task::JoinHandle<Result<(Vec<u8>, Vec<Duration>)>>,
}

impl Guest {
    fn start(uri: &str, image: Vec<u8>, rate: u32, seed: u64) -> Result<Guest> {
        let uri = NbdUri::parse(uri).context("guest URI")?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = tokio::spawn(async move {
            let client = NbdClient::connect(&uri).await.context("guest connect")?;
            let mut model = image;
            let blocks = model.len() as u64 / 4096;
            let mut x = seed | 1;
            let mut lat = Vec::new();
            let period = Duration::from_secs_f64(1.0 / f64::from(rate.max(1)));
            let mut next = tokio::time::Instant::now();
            while !flag.load(Ordering::Relaxed) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let at = (x % blocks) * 4096;
                let block: Vec<u8> = (0..4096u64).map(|i| (x >> (i % 56)) as u8 ^ i as u8).collect();
                let t = Instant::now();
                client.write(at, block.clone(), false).await.context("a guest write failed")?;
                lat.push(t.elapsed());
                model[at as usize..at as usize + 4096].copy_from_slice(&block);
                next += period;
                tokio::time::sleep_until(next).await;
            }
            client.flush().await.context("guest flush")?;
            Ok((model, lat))
        });
        Ok(Guest { stop, handle })
    }

    async fn stop(self) -> Result<(Vec<u8>, Vec<Duration>)> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.await.context("guest task")?
    }
}

fn percentile(lat: &mut [Duration], p: f64) -> Duration {
    lat.sort();
    lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1))).copied().unwrap_or_default()
}

/// Runs the demo.
pub async fn run(args: DemoArgs) -> Result<()> {
    ensure!(args.size >= 16 * MIB && args.size.is_multiple_of(4 * MIB), "--size must be a multiple of 4 MiB, at least 16 MiB");
    // The demo keeps what each disk must hold in memory (its guest's model), half again the
    // first disk's size.
    ensure!(args.size <= MAX_SIZE, "--size must be at most {} GiB: the demo keeps a copy of its disks in memory to check them", MAX_SIZE >> 30);
    let dir = tempfile::Builder::new().prefix("sxm-demo-").tempdir().context("a folder for the demo")?;
    // Interrupted (Ctrl-C, SIGTERM), the demo stops where it is: dropping it stops its hosts
    // and their datapaths, and the folder goes with `dir`, so nothing is left behind then
    // either.
    let outcome = tokio::select! {
        outcome = demo(&args, dir.path()) => outcome,
        signal = interrupted() => Err(anyhow::anyhow!("interrupted by {signal}: the demo's hosts and datapaths are stopped{}", if args.keep { "" } else { " and its folder removed" })),
    };
    if args.keep {
        let kept = dir.keep();
        println!("kept {}", kept.display());
    }
    outcome
}

/// The largest `--size`.
const MAX_SIZE: u64 = 4 << 30;

/// Waits for SIGINT or SIGTERM; answers its name. Without a handler (none could be set up)
/// it never returns, and the signal ends the process as before.
async fn interrupted() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    match (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) {
        (Ok(mut int), Ok(mut term)) => tokio::select! {
            _ = int.recv() => "SIGINT",
            _ = term.recv() => "SIGTERM",
        },
        _ => std::future::pending().await,
    }
}

async fn demo(args: &DemoArgs, dir: &Path) -> Result<()> {
    println!("sxm demo: two hosts on this machine, a VM of two disks, moved live while its guest writes\n");
    let a = DemoHost::start("source", &dir.join("host-a"))?;
    let b = DemoHost::start("destination", &dir.join("host-b"))?;
    let sr_a = a.sr("ext", "local VHD").await?;
    let sr_b = b.sr("qcow2", "remote qcow2").await?;
    println!("host A: {}  SR {sr_a} (ext, SMAPIv1)", a.url.split('?').next().unwrap_or_default());
    println!("host B: {}  SR {sr_b} (qcow2, SMAPIv3)", b.url.split('?').next().unwrap_or_default());

    // The VM: two disks, each half data and half never written.
    let sizes = [args.size, args.size / 2];
    let mut disks = Vec::new();
    for (i, size) in sizes.iter().enumerate() {
        let mut info = VdiInfo::new("", format!("vm-disk{i}"));
        info.virtual_size = *size as i64;
        let vdi: VdiInfo = a.call_as("VDI.create", vec![("vdi_info", info.to_value()), ("sr", s(&sr_a))]).await?;
        let dp = format!("vm/{i}");
        let uri = a.attach(&sr_a, &vdi.vdi, &dp).await?;
        let mut image = vec![0u8; *size as usize];
        let client = NbdClient::connect(&NbdUri::parse(&uri)?).await?;
        let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ i as u64;
        for chunk in (0..*size / 2).step_by(MIB as usize) {
            let data: Vec<u8> = (0..MIB)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    (x >> 24) as u8
                })
                .collect();
            image[chunk as usize..(chunk + MIB) as usize].copy_from_slice(&data);
            client.write(chunk, data, false).await?;
        }
        client.flush().await?;
        println!("VM disk {i}: VDI {} ({} MiB, {} MiB of data)", vdi.vdi, size / MIB, size / 2 / MIB);
        disks.push((vdi.vdi, uri, image));
    }

    // The guest writes to both disks from here to the switch-over.
    let mut guests = Vec::new();
    for (i, (_, uri, image)) in disks.iter().enumerate() {
        guests.push(Guest::start(uri, image.clone(), args.rate, 7 + i as u64)?);
    }
    println!("guest: writing 4 KiB blocks at random places, {} per second on each disk\n", args.rate);
    tokio::time::sleep(Duration::from_millis(500)).await;

    // The VM moves as one job: both disks at once, held in sync until the switch-over, and
    // checked block by block (crc32) before the job succeeds.
    let started = Instant::now();
    let vdis = Value::Array(disks.iter().map(|(v, _, _)| s(v)).collect());
    let job: String = a
        .call_as(
            "SXM.migrate.start",
            vec![("sr", s(&sr_a)), ("vdis", vdis), ("url", s(&b.url)), ("dest", s(&sr_b)), ("parallel", Value::Int(2)), ("hold", Value::Bool(true)), ("verify", Value::Bool(true))],
        )
        .await?;
    println!("job {job}: sxm migrate of both disks, held in sync until the switch-over, verified");
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let mut last_line = Instant::now();
    loop {
        let t: Task = a.call_as("TASK.stat", vec![("task", s(&job))]).await?;
        let stage = t.debug_info.get("stage").cloned().unwrap_or_default();
        if let TaskState::Failed(e) = &t.state {
            bail!("the job failed: {e:?}");
        }
        let disks_line: Vec<String> = t
            .subtasks
            .iter()
            .map(|(name, st)| match st {
                TaskState::Pending(p) => format!("{}: {:>5.1}%", name.split(' ').next().unwrap_or(name), p * 100.0),
                _ => format!("{}: -", name.split(' ').next().unwrap_or(name)),
            })
            .collect();
        let progress = if let TaskState::Pending(p) = t.state { p } else { 1.0 };
        let line = format!("job {:>5.1}%  {stage:<9} {}", progress * 100.0, disks_line.join("   "));
        // One line redrawn in a terminal; a line a second into a log.
        if tty {
            eprint!("\r{line}    ");
        } else if last_line.elapsed() >= Duration::from_secs(1) {
            eprintln!("{line}");
            last_line = Instant::now();
        }
        if stage == "holding" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    if tty {
        eprintln!();
    }
    let in_sync = started.elapsed();
    println!("both disks in sync after {:.2} s; the guest keeps writing, every write now reaches both hosts", in_sync.as_secs_f64());
    tokio::time::sleep(Duration::from_secs(1)).await;

    // Switch-over: the guest stops (the VM pauses); the job drains each source datapath, the
    // destination composes or takes its volume, the checksums are compared, and the
    // destination VDIs are attached for the VM to resume there.
    let mut models = Vec::new();
    let mut latencies = Vec::new();
    for g in guests {
        let (model, lat) = g.stop().await?;
        models.push(model);
        latencies.extend(lat);
    }
    let cut = Instant::now();
    a.call("SXM.migrate.cutover", vec![("job", s(&job))]).await?;
    let done = loop {
        let t: Task = a.call_as("TASK.stat", vec![("task", s(&job))]).await?;
        match &t.state {
            TaskState::Pending(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            TaskState::Completed(_) => break t,
            TaskState::Failed(e) => bail!("the switch-over failed: {e:?}"),
        }
    };
    let cutover = cut.elapsed();
    println!("switch-over (drain, finalize on host B, crc32 of every 1 MiB block compared): {:.2} s", cutover.as_secs_f64());
    let dest_vdis: Vec<String> =
        (0..disks.len()).map(|i| done.debug_info.get(&format!("disk{i} dest_vdi")).cloned().unwrap_or_default()).collect();

    // Verify again, ourselves: each destination VDI, read on host B through the datapath the
    // job attached it on, against what the guest wrote.
    for (i, (dest, model)) in dest_vdis.iter().zip(&models).enumerate() {
        let dp = format!("vm/{i}");
        let info: AttachInfo = b.call_as("DP.attach_info", vec![("dp", s(&dp)), ("sr", s(&sr_b)), ("vdi", s(dest))]).await?;
        let uri = crate::admin::nbd_uri(&info)?;
        let client = NbdClient::connect(&NbdUri::parse(&uri)?).await?;
        for off in (0..model.len()).step_by(4 * MIB as usize) {
            let got = client.read(off as u64, 4 * MIB as usize).await?;
            ensure!(got[..] == model[off..off + 4 * MIB as usize], "disk {i}: the destination differs from what the guest wrote at byte {off}");
        }
        b.call("DP.destroy", vec![("dp", s(&dp)), ("allow_leak", Value::Bool(false))]).await?;
    }
    let writes = latencies.len();
    let (p50, p99) = (percentile(&mut latencies, 0.50), percentile(&mut latencies, 0.99));
    println!("verified: both destination VDIs hold exactly what the guest wrote, byte for byte\n");
    println!("summary");
    let data = sizes.iter().sum::<u64>() / 2;
    println!(
        "  {} disks, {} MiB of data in {} MiB of disk, in sync after {:.2} s ({:.0} MiB/s of disk brought in sync)",
        disks.len(),
        data / MIB,
        sizes.iter().sum::<u64>() / MIB,
        in_sync.as_secs_f64(),
        sizes.iter().sum::<u64>() as f64 / MIB as f64 / in_sync.as_secs_f64().max(0.001)
    );
    println!("  guest: {writes} writes during the migration, latency p50 {} µs, p99 {} µs", p50.as_micros(), p99.as_micros());
    println!("  total: {:.2} s from start to switch-over done", (in_sync + Duration::from_secs(1) + cutover).as_secs_f64());

    // Nothing left behind: the source datapaths (paused since the switch-over), the VDIs, then
    // the hosts (and the folder, unless --keep).
    for i in 0..disks.len() {
        a.call("DP.destroy", vec![("dp", s(&format!("vm/{i}"))), ("allow_leak", Value::Bool(false))]).await?;
    }
    for (vdi, _, _) in &disks {
        a.call("VDI.destroy", vec![("vdi", s(vdi)), ("sr", s(&sr_a))]).await?;
    }
    for vdi in &dest_vdis {
        b.call("VDI.destroy", vec![("vdi", s(vdi)), ("sr", s(&sr_b))]).await?;
    }
    println!("\ncleaned up: VDIs destroyed, hosts stopped");
    Ok(())
}
