//! The admin CLI: SRs, VDIs, datapaths and tasks of one host, over JSON-RPC. Human tables by
//! default, JSON (the interface's own values) with `--json` for scripts.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use comfy_table::{Table, presets::UTF8_BORDERS_ONLY};
use sxm_engine::http::client::{CallErrorKind, Endpoint, RpcClient};
use sxm_engine::model::{AttachInfo, DpStatVdi, Implementation, Rw, StorageError, Task, TaskState, VdiInfo, VdiState, standard_nbd_uri};
use sxm_engine::rpc::Value;
use sxm_engine::rpc::marshal::Marshal;

/// Which host to talk to, and how to print.
#[derive(clap::Args, Clone)]
pub struct HostArgs {
    /// The host: `http://ADDR:PORT` or `https://ADDR:PORT` (with the host secret from
    /// --secret-file, $SXM_SECRET or `?session_id=`) or the path of its Unix socket.
    #[arg(long, env = "SXM_HOST", global = true, default_value = "/var/lib/sxm/sxm.sock")]
    host: String,
    /// A file holding the host secret (a host keeps it in ROOT/secret).
    #[arg(long, env = "SXM_SECRET_FILE", global = true)]
    secret_file: Option<PathBuf>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
}

/// `sxm sr …`.
#[derive(clap::Subcommand)]
pub enum SrCommand {
    /// Create an SR (and attach it).
    Create {
        /// SR type.
        #[arg(long = "type", default_value = "ext", value_parser = ["ext", "qcow2"])]
        ty: String,
        /// Name.
        #[arg(long)]
        name: String,
        /// Description.
        #[arg(long, default_value = "")]
        description: String,
    },
    /// List attached SRs.
    List,
    /// Destroy an SR that holds no VDIs (its folder and record go).
    Destroy {
        /// The SR: its id, or its name.
        #[arg(long)]
        sr: String,
    },
}

/// How long the CLI waits for a destination host to name its SRs.
const DEST_LOOKUP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// `sxm vdi …`.
#[derive(clap::Subcommand)]
pub enum VdiCommand {
    /// Create an empty VDI.
    Create {
        /// The SR: its id, or its name.
        #[arg(long)]
        sr: String,
        /// Size: bytes, or with a suffix K, M, G, T (powers of 1024).
        #[arg(long, value_parser = parse_size)]
        size: u64,
        /// Name.
        #[arg(long)]
        name: String,
    },
    /// List an SR's VDIs.
    List {
        /// The SR: its id, or its name.
        #[arg(long)]
        sr: String,
    },
    /// Create a VDI holding an image file's content (raw, VHD or qcow2).
    Import {
        /// The SR: its id, or its name.
        #[arg(long)]
        sr: String,
        /// Name (default: the file's name).
        #[arg(long)]
        name: Option<String>,
        /// The image file's format. `auto` goes by its magic bytes, so a guest's raw disk
        /// whose first bytes the guest made a qcow2 or VHD header would be read as that image:
        /// name `raw` for such disks.
        #[arg(long, value_enum, default_value = "auto")]
        format: ImportFormat,
        /// The image file (raw, VHD or qcow2; one with a backing file or parent is refused:
        /// flatten it first).
        file: PathBuf,
    },
    /// Write a VDI's content to a raw file.
    Export {
        /// The SR: its id, or its name.
        #[arg(long)]
        sr: String,
        /// The VDI: its id, or its name in the SR.
        #[arg(long)]
        vdi: String,
        /// The file to write (created; must not exist).
        file: PathBuf,
    },
    /// Snapshot a VDI (works while it is attached and written to).
    Snapshot {
        /// The SR: its id, or its name.
        #[arg(long)]
        sr: String,
        /// The VDI: its id, or its name in the SR.
        #[arg(long)]
        vdi: String,
        /// The snapshot's name (default: the VDI's name).
        #[arg(long)]
        name: Option<String>,
    },
    /// Attach and activate a VDI; prints its NBD URI.
    Attach {
        /// The SR: its id, or its name.
        #[arg(long)]
        sr: String,
        /// The VDI: its id, or its name in the SR.
        #[arg(long)]
        vdi: String,
        /// Read-only.
        #[arg(long)]
        read_only: bool,
    },
    /// Deactivate and detach a VDI attached with `vdi attach`.
    Detach {
        /// The SR: its id, or its name.
        #[arg(long)]
        sr: String,
        /// The VDI: its id, or its name in the SR.
        #[arg(long)]
        vdi: String,
    },
    /// Destroy a VDI.
    Destroy {
        /// The SR: its id, or its name.
        #[arg(long)]
        sr: String,
        /// The VDI: its id, or its name in the SR.
        #[arg(long)]
        vdi: String,
    },
}

/// `sxm task …`.
#[derive(clap::Subcommand)]
pub enum TaskCommand {
    /// List tasks.
    List,
    /// One task: state, progress, stage, result or error.
    Stat {
        /// The task.
        task: String,
    },
    /// Cancel a task (a migration rolls back).
    Cancel {
        /// The task.
        task: String,
    },
    /// Forget an ended task (ended ones are kept an hour otherwise; a migration job's across
    /// restarts of the host too).
    Destroy {
        /// The task.
        task: String,
    },
}

/// Where a VDI goes: another host and one of its SRs.
#[derive(clap::Args)]
pub struct DestArgs {
    /// The source SR: its id, or its name.
    #[arg(long)]
    sr: String,
    /// The VDI: its id, or its name in the SR.
    #[arg(long)]
    vdi: String,
    /// The destination host: `http(s)://ADDR:PORT[?session_id=SECRET]`, or its socket's path.
    #[arg(long)]
    dest: String,
    /// A file holding the destination host's secret (its ROOT/secret), unless the URL has it.
    #[arg(long)]
    dest_secret_file: Option<PathBuf>,
    /// The destination SR: its id, or its name on the destination host.
    #[arg(long)]
    dest_sr: String,
    /// Wait for the task, showing its stage, progress, rate and ETA.
    #[arg(long)]
    wait: bool,
}

/// `sxm migrate …`: a VM's disks moved live as one job.
#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct MigrateCmd {
    #[command(subcommand)]
    action: Option<MigrateAction>,
    #[command(flatten)]
    start: Option<MigrateStart>,
}

/// What to do with a running job.
#[derive(clap::Subcommand)]
pub enum MigrateAction {
    /// Switch a job started with `--hold` over: now if its disks are in sync, else as soon as
    /// they are (it says which).
    Cutover {
        /// The job (its task id).
        job: String,
    },
    /// Cancel a job: every disk goes back, on both hosts (refused once its switch-over has
    /// begun).
    Cancel {
        /// The job (its task id).
        job: String,
    },
    /// Change a running job's bandwidth limit (bytes per second; K, M, G suffixes; 0: none).
    SetBwlimit {
        /// The job (its task id).
        job: String,
        /// The new limit.
        #[arg(value_parser = parse_size)]
        rate: u64,
    },
}

/// `sxm migrate --sr SR [--sr SR …] --vdi V [--vdi V …] --dest URL --dest-sr SR [--map V=SR …] …`.
#[derive(clap::Args)]
pub struct MigrateStart {
    /// The source SR: its id, or its name. Repeat it for a VM whose disks lie on several SRs:
    /// each --vdi is then looked up in all of them.
    #[arg(long = "sr", required = true)]
    srs: Vec<String>,
    /// A VDI of the VM, by id or name (repeat for each disk); each must be active on its guest's datapath.
    #[arg(long = "vdi", required = true)]
    vdis: Vec<String>,
    /// The destination host: `http(s)://ADDR:PORT[?session_id=SECRET]`, or its socket's path.
    #[arg(long)]
    dest: String,
    /// A file holding the destination host's secret, unless the URL has it.
    #[arg(long)]
    dest_secret_file: Option<PathBuf>,
    /// The destination SR: its id, or its name on the destination host. Every disk not sent
    /// elsewhere with --map goes there (it may be left out when every disk is mapped).
    #[arg(long)]
    dest_sr: Option<String>,
    /// Send one disk to another destination SR: VDI=SR, the VDI as given to --vdi, the SR by
    /// id or by name on the destination host. Repeat for each such disk.
    #[arg(long = "map", value_name = "VDI=SR")]
    maps: Vec<String>,
    /// How many disks copy at once; the others wait their turn.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..))]
    parallel: u32,
    /// Bytes per second the disks' copies share at most (K, M, G suffixes; powers of 1024);
    /// change it while the job runs with `sxm migrate set-bwlimit JOB RATE`.
    #[arg(long, value_parser = parse_size)]
    bwlimit: Option<u64>,
    /// Keep the disks mirrored and in sync after the copy, until `sxm migrate cutover JOB`.
    #[arg(long)]
    hold: bool,
    /// Compare a crc32 per 1 MiB block of each destination VDI with its source before the job
    /// reports success.
    #[arg(long)]
    verify: bool,
    /// Follow the job to its end (or, with --hold, until cut over), with progress per disk.
    #[arg(long)]
    wait: bool,
}

/// `sxm mirror …`: live migration of a VDI a guest is writing.
#[derive(clap::Subcommand)]
pub enum MirrorCommand {
    /// Start mirroring a VDI attached here to an SR of another host (DATA.MIRROR.start).
    Start(DestArgs),
    /// List mirrors (sent, received, copies) on this host.
    List,
    /// One mirror.
    Stat {
        /// The mirror's id, `<sr>/<vdi>`.
        id: String,
    },
    /// Stop a mirror and undo it on both hosts (on its source host; with --receive, the
    /// receive on this, its destination host).
    Stop {
        /// The mirror's id, `<sr>/<vdi>`.
        id: String,
        /// Cancel this host's receive of the mirror and destroy what it made here, for a
        /// receive whose source no longer knows it (a source still mirroring sees it fail).
        #[arg(long)]
        receive: bool,
    },
}

impl HostArgs {
    /// Whether output is JSON (`--json`).
    pub fn json(&self) -> bool {
        self.json
    }
}

/// An error as one JSON object: `{"error": TEXT}`, with `"storage_error": [TAG, PARAMS…]` when
/// the host answered with one (xapi's marshalling, as `TASK.stat` shows a task's failure).
pub fn error_json(e: &anyhow::Error) -> String {
    let mut j = serde_json::json!({ "error": format!("{e:#}") });
    if let Some(se) = storage_error(e) {
        j["storage_error"] = serde_json::Value::from(&se.to_value());
    }
    j.to_string()
}

/// The storage error the host answered with, if that is what `e` is.
/// Whether an SR holds the VDI a name or id names: its id, or why not.
enum Found {
    Here(String),
    Not(anyhow::Error),
}

fn storage_error(e: &anyhow::Error) -> Option<&StorageError> {
    e.chain().find_map(|c| c.downcast_ref::<StorageError>().or_else(|| c.downcast_ref::<sxm_engine::http::client::CallError>().and_then(|c| c.storage())))
}

/// A connected CLI.
pub struct Admin {
    client: RpcClient,
    json: bool,
    /// The option that named this host (`--host`, or `--dest` for a migration's destination),
    /// for the hint when it cannot be reached.
    named_by: &'static str,
}

/// How long `sxm migrate --wait` waits for a host that stopped answering (it may be restarting).
const HOST_AWAY_WAIT: std::time::Duration = std::time::Duration::from_secs(120);

/// Whether a call failed because the host was not there to answer (no connection, or one that
/// broke): a host restarting, rather than one that answered.
fn host_away(e: &anyhow::Error) -> bool {
    e.chain()
        .filter_map(|c| c.downcast_ref::<sxm_engine::http::client::CallError>())
        .any(|c| matches!(c.kind, CallErrorKind::Connect(_) | CallErrorKind::Http(_) | CallErrorKind::Io(_) | CallErrorKind::Body(_)))
}

fn named(args: &[(&str, Value)]) -> Value {
    let mut members: Vec<(String, Value)> = args.iter().map(|(k, v)| ((*k).to_owned(), v.clone())).collect();
    members.push(("dbg".to_owned(), Value::String("sxm-cli".to_owned())));
    Value::Struct(members)
}

fn s(x: &str) -> Value {
    Value::String(x.to_owned())
}

pub use tapmirror::parse_size;

/// How the CLI's datapath ids begin.
const CLI_DP_PREFIX: &str = "sxm-cli/";

/// The datapath id the CLI uses for a VDI it attaches, so `detach` finds it again.
fn cli_dp(vdi: &str) -> String {
    format!("{CLI_DP_PREFIX}{vdi}")
}

/// The datapath id `vdi export` reads through: its own, so that letting go of it never
/// detaches a VDI the user attached.
fn export_dp(vdi: &str) -> String {
    format!("{EXPORT_DP_PREFIX}{vdi}")
}

const EXPORT_DP_PREFIX: &str = "sxm-cli-export/";

/// xapi's `nbd:unix:<socket>:exportname=<name>` as a standard NBD URI.
pub fn nbd_uri(info: &AttachInfo) -> Result<String> {
    for i in &info.implementations {
        if let Implementation::Nbd { uri } = i {
            return standard_nbd_uri(uri).with_context(|| format!("unexpected NBD URI {uri}"));
        }
    }
    bail!("the host offers no NBD implementation for this VDI")
}

impl Admin {
    /// Connects (lazily: each call opens its connection).
    pub fn new(host: &HostArgs) -> Result<Admin> {
        let mut endpoint = Endpoint::parse(&host.host).with_context(|| "--host / $SXM_HOST")?;
        if let Endpoint::Tcp { secret: None, .. } = &endpoint {
            let secret = match (&host.secret_file, std::env::var("SXM_SECRET")) {
                (Some(f), _) => std::fs::read_to_string(f).with_context(|| format!("read {}", f.display()))?.trim().to_owned(),
                (None, Ok(s)) => s,
                (None, Err(_)) => bail!("a TCP host needs its secret: --secret-file ROOT/secret or $SXM_SECRET"),
            };
            endpoint = endpoint.with_secret(secret);
        }
        Ok(Admin { client: RpcClient::new(endpoint), json: host.json, named_by: "--host" })
    }

    async fn call(&self, method: &str, args: &[(&str, Value)]) -> Result<Value> {
        match self.client.call_json(method, named(args)).await {
            Ok(v) => Ok(v),
            // No host there: say where the CLI looked and how to point it elsewhere.
            Err(e) if matches!(e.kind, CallErrorKind::Connect(_)) => Err(anyhow::Error::new(e).context(match self.named_by {
                "--host" => "cannot reach the host: start one (sxm serve --root ROOT), or point --host or $SXM_HOST at it (a socket path, or http(s)://ADDR:PORT)",
                _ => "cannot reach the destination host: is it running, and does --dest name it (http(s)://ADDR:PORT, or its socket path on this machine)?",
            })),
            Err(e) => {
                let hint = match &e.kind {
                    CallErrorKind::Storage(StorageError::BackendError(code, params)) => explain(code, params),
                    _ => None,
                };
                match hint {
                    Some(h) => Err(anyhow::Error::new(e).context(h)),
                    None => Err(e.into()),
                }
            }
        }
    }

    async fn call_as<T: Marshal>(&self, method: &str, args: &[(&str, Value)]) -> Result<T> {
        let v = self.call(method, args).await?;
        T::from_value(&v).with_context(|| format!("{method} answered something unexpected"))
    }

    fn print_json(&self, v: &Value) -> Result<()> {
        let j: serde_json::Value = v.into();
        println!("{}", serde_json::to_string_pretty(&j)?);
        Ok(())
    }

    /// `sxm sr …`.
    pub async fn sr(&self, cmd: SrCommand) -> Result<()> {
        match cmd {
            SrCommand::Create { ty, name, description } => {
                // SRs are named to the CLI by name as well as by id, which a second SR of the
                // same name would make ambiguous for every command after (and there was no CLI
                // command to remove it).
                let srs: Vec<String> = self.call_as("SR.list", &[]).await?;
                if let Some(id) = self.srs_named(&srs, &name).await?.first() {
                    bail!("SR {id} is named {name:?} already: give this one another name");
                }
                let sr = uuid::Uuid::new_v4().to_string();
                let dc = Value::Struct(vec![("type".into(), s(&ty))]);
                self.call(
                    "SR.create",
                    &[("physical_size", Value::Int(0)), ("device_config", dc), ("name_description", s(&description)), ("name_label", s(&name)), ("sr", s(&sr))],
                )
                .await?;
                self.call("SR.attach", &[("device_config", Value::Struct(vec![])), ("sr", s(&sr))]).await?;
                if self.json {
                    self.print_json(&s(&sr))
                } else {
                    println!("{sr}");
                    Ok(())
                }
            }
            SrCommand::List => {
                let srs: Vec<String> = self.call_as("SR.list", &[]).await?;
                let mut rows = Vec::new();
                for sr in &srs {
                    // One SR that cannot be stat'ed (its folder removed by hand) is listed with
                    // its error rather than hiding all the others.
                    let stat = match self.call("SR.stat", &[("sr", s(sr))]).await {
                        Ok(stat) => stat,
                        Err(e) => Value::Struct(vec![("error".into(), s(&format!("{e:#}")))]),
                    };
                    rows.push((sr.clone(), stat));
                }
                if self.json {
                    return self.print_json(&Value::Struct(rows));
                }
                let mut t = table(["SR", "NAME", "TYPE", "SMAPI", "SIZE", "FREE"]);
                for (sr, stat) in rows {
                    if let Some(e) = stat.get("error").and_then(Value::as_str) {
                        add_row(&mut t, vec![sr, format!("(unavailable: {e})"), String::new(), String::new(), String::new(), String::new()]);
                        continue;
                    }
                    let get = |k: &str| stat.get(k).and_then(Value::as_i64).unwrap_or(0);
                    let text = |k: &str| stat.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
                    let smapi = stat.get("smapi_version").and_then(Value::as_i64).map(|v| format!("v{v}")).unwrap_or_default();
                    add_row(&mut t, vec![sr, text("name_label"), text("sr_type"), smapi, human(get("total_space")), human(get("free_space"))]);
                }
                println!("{t}");
                Ok(())
            }
            SrCommand::Destroy { sr } => {
                let sr = self.sr_id(&sr).await?;
                self.call("SR.destroy", &[("sr", s(&sr))]).await?;
                Ok(())
            }
        }
    }

    /// The id of the SR `sr` names: an attached SR's id, or the name of exactly one. What
    /// names none goes to the host as it is (a detached SR's id, say), to answer for; so does
    /// anything shaped like an id, which is never taken for a name.
    async fn sr_id(&self, sr: &str) -> Result<String> {
        if sr.trim().is_empty() {
            bail!("--sr is empty (an unset variable?)");
        }
        let srs: Vec<String> = self.call_as("SR.list", &[]).await?;
        // An id, or what looks like one, is only ever an id: never another's name.
        if srs.iter().any(|id| id == sr) || uuid::Uuid::parse_str(sr).is_ok() {
            return Ok(sr.to_owned());
        }
        match self.srs_named(&srs, sr).await?.as_slice() {
            [one] => Ok(one.clone()),
            [] => Ok(sr.to_owned()),
            many => bail!("{} SRs are named {sr:?}: give the id of one ({})", many.len(), many.join(", ")),
        }
    }

    /// Which of `srs` (this host's) are named `name`. An SR that cannot say its name (its
    /// folder gone) is not the one named: it must not keep every other SR from being found.
    async fn srs_named(&self, srs: &[String], name: &str) -> Result<Vec<String>> {
        let mut named = Vec::new();
        for id in srs {
            let Ok(stat) = self.call("SR.stat", &[("sr", s(id))]).await else { continue };
            if stat.get("name_label").and_then(Value::as_str) == Some(name) {
                named.push(id.clone());
            }
        }
        Ok(named)
    }

    /// The id of the destination host's SR `sr` names (its id, or the name of exactly one SR
    /// there, asked of that host at `url`). Names were passed on as they were, and the
    /// migration's task failed in its prepare stage, saying no plugin served such an SR.
    async fn dest_sr_id(&self, url: &str, sr: &str) -> Result<String> {
        // An id goes as it is (the destination answers for it when it prepares, as it does to
        // an orchestrator); only a name needs asking about.
        if uuid::Uuid::parse_str(sr).is_ok() {
            return Ok(sr.to_owned());
        }
        let host = url.split('?').next().unwrap_or(url);
        let remote = Admin { client: RpcClient::new(Endpoint::parse(url).context("--dest")?), json: self.json, named_by: "--dest" };
        let lookup = async {
            let srs: Vec<String> = remote.call_as("SR.list", &[]).await.with_context(|| format!("listing the SRs of {host}"))?;
            if srs.iter().any(|id| id == sr) {
                return Ok(sr.to_owned());
            }
            match remote.srs_named(&srs, sr).await?.as_slice() {
                [one] => Ok(one.clone()),
                [] => bail!("the destination host {host} has no SR {sr:?} (by id or by name; `sxm --host {host} sr list` shows its SRs)"),
                many => bail!("{} SRs of the destination host {host} are named {sr:?}: give the id of one ({})", many.len(), many.join(", ")),
            }
        };
        // A destination that takes the connection and never answers must not hold the CLI.
        tokio::time::timeout(DEST_LOOKUP_TIMEOUT, lookup)
            .await
            .unwrap_or_else(|_| bail!("the destination host {host} did not answer within {DEST_LOOKUP_TIMEOUT:?} (looking up SR {sr:?}; check --dest)"))
    }

    /// The ids of the SR and VDI `sr` and `vdi` name (each an id, or the name of exactly one
    /// SR, or of one VDI of that SR).
    async fn sr_vdi_ids(&self, sr: &str, vdi: &str) -> Result<(String, String)> {
        let sr = self.sr_id(sr).await?;
        match self.vdi_in(&sr, vdi, false).await? {
            Found::Here(id) => Ok((sr, id)),
            Found::Not(e) => Err(e),
        }
    }

    /// The id of the VDI `vdi` names in SR `sr` (an id given), or why it is not there. Any
    /// other failure (several VDIs of that name, say) is an error. Not `strict`, a failure to
    /// look is left for the call made with the VDI to say; `strict`, it is an error here (among
    /// several SRs, an SR that could not be looked at must not count as holding the VDI).
    async fn vdi_in(&self, sr: &str, vdi: &str, strict: bool) -> Result<Found> {
        if vdi.trim().is_empty() {
            bail!("--vdi is empty (an unset variable?)");
        }
        if uuid::Uuid::parse_str(vdi).is_ok() {
            // Checked here, so that the error names the SR ("VDI … does not exist" alone did
            // not), and so that no command takes a VDI that is not there for one with nothing
            // to do (`vdi detach` said "not attached"). Any other failure is the call's to say.
            return match self.call("VDI.stat", &[("vdi", s(vdi)), ("sr", s(sr))]).await {
                Err(e) if matches!(storage_error(&e), Some(StorageError::VdiDoesNotExist(_))) => {
                    Ok(Found::Not(e.context(format!("SR {sr} has no VDI {vdi} (`sxm vdi list --sr {sr}` shows them)"))))
                }
                Err(e) if strict => Err(e.context(format!("SR {sr}"))),
                _ => Ok(Found::Here(vdi.to_owned())),
            };
        }
        let vdis: Vec<VdiInfo> = match self.call_as("SR.scan", &[("sr", s(sr))]).await {
            Ok(v) => v,
            Err(e) if strict => return Err(e.context(format!("SR {sr}"))),
            // The host says what is wrong with the SR when the call itself is made.
            Err(_) => return Ok(Found::Here(vdi.to_owned())),
        };
        if vdis.iter().any(|v| v.vdi == vdi) {
            return Ok(Found::Here(vdi.to_owned()));
        }
        let named: Vec<&VdiInfo> = vdis.iter().filter(|v| v.name_label == vdi).collect();
        // A snapshot takes its VDI's name (as in xapi), which must not make the VDI itself
        // unreachable by that name: among several, the one VDI that is no snapshot is meant.
        let live: Vec<&VdiInfo> = named.iter().copied().filter(|v| !v.is_a_snapshot).collect();
        match (named.as_slice(), live.as_slice()) {
            ([one], _) | (_, [one]) => Ok(Found::Here(one.vdi.clone())),
            ([], _) => Ok(Found::Not(anyhow::anyhow!("SR {sr} has no VDI {vdi:?} (by id or by name; `sxm vdi list --sr {sr}` shows them)"))),
            (many, _) => bail!(
                "{} VDIs of SR {sr} are named {vdi:?}: give the id of one ({})",
                many.len(),
                many.iter().map(|v| v.vdi.as_str()).collect::<Vec<_>>().join(", ")
            ),
        }
    }

    /// The SR among `srs` (ids) that holds the VDI `vdi` names, and its id: in exactly one.
    async fn vdi_among(&self, srs: &[String], vdi: &str) -> Result<(String, String)> {
        let mut found = Vec::new();
        let mut not = None;
        for sr in srs {
            match self.vdi_in(sr, vdi, srs.len() > 1).await? {
                Found::Here(id) => found.push((sr.clone(), id)),
                Found::Not(e) => not = Some(e),
            }
        }
        match (found.as_slice(), not) {
            ([one], _) => Ok(one.clone()),
            ([], Some(e)) if srs.len() == 1 => Err(e),
            ([], _) => bail!("none of the SRs given with --sr ({}) has a VDI {vdi:?} (by id or by name)", srs.join(", ")),
            (many, _) => bail!(
                "VDIs named {vdi:?} are in {} of the SRs given ({}): give the id of one",
                many.len(),
                many.iter().map(|(sr, id)| format!("{id} in {sr}")).collect::<Vec<_>>().join(", ")
            ),
        }
    }

    /// Refuses, saying so, a job that has ended: the host forgets an ended job's controls and
    /// answered "does not exist" for a job `task stat` still showed.
    async fn still_running(&self, job: &str, then: &str) -> Result<()> {
        let t = self.job_task(job).await?;
        refuse_non_job(&t)?;
        match t.state {
            TaskState::Pending(_) => Ok(()),
            TaskState::Completed(_) => bail!("job {job} has completed already: {then}"),
            TaskState::Failed(_) => bail!("job {job} has failed already: {then}"),
        }
    }

    /// A job's task. One this host does not know is no job of its, or one that ended over an
    /// hour ago or was forgotten (`task destroy`): a job is recorded, and told after restarts.
    async fn job_task(&self, job: &str) -> Result<Task> {
        match self.call_as::<Task>("TASK.stat", &[("task", s(job))]).await {
            Err(e) if matches!(storage_error(&e), Some(StorageError::DoesNotExist(..))) => Err(e.context(format!(
                "job {job} is not known to this host: a job is known to its source host (--host), while it runs and for an hour after it ends (unless `sxm task destroy` forgot it)"
            ))),
            other => other,
        }
    }

    /// Says what an action on a job did: `said` on stderr, or with `--json` the job's task as
    /// it is now (as `sxm task stat` prints it), for a script to read.
    async fn job_now(&self, job: &str, said: &str) -> Result<()> {
        if self.json {
            let t: Task = self.call_as("TASK.stat", &[("task", s(job))]).await?;
            return self.print_json(&t.to_value());
        }
        eprintln!("job {job}: {said}");
        Ok(())
    }

    /// Cancels a task (a job is one), or says it has ended already: a cancel then undoes
    /// nothing, which an admin must not take for a rollback.
    async fn cancel(&self, task: &str, what: &str) -> Result<()> {
        let t: Task = self.call_as("TASK.stat", &[("task", s(task))]).await?;
        match t.state {
            TaskState::Pending(_) => {
                self.call("TASK.cancel", &[("task", s(task))]).await?;
                Ok(())
            }
            TaskState::Completed(_) => bail!("{what} {task} has completed already: nothing to cancel, nothing was undone"),
            TaskState::Failed(_) => bail!("{what} {task} has failed already: nothing to cancel"),
        }
    }

    /// `sxm vdi …`.
    pub async fn vdi(&self, cmd: VdiCommand) -> Result<()> {
        use VdiCommand::*;
        // SRs and VDIs may be named by id or by name.
        let cmd = match cmd {
            Create { sr, size, name } => Create { sr: self.sr_id(&sr).await?, size, name },
            List { sr } => List { sr: self.sr_id(&sr).await? },
            Import { sr, name, format, file } => Import { sr: self.sr_id(&sr).await?, name, format, file },
            Export { sr, vdi, file } => {
                let (sr, vdi) = self.sr_vdi_ids(&sr, &vdi).await?;
                Export { sr, vdi, file }
            }
            Snapshot { sr, vdi, name } => {
                let (sr, vdi) = self.sr_vdi_ids(&sr, &vdi).await?;
                Snapshot { sr, vdi, name }
            }
            Attach { sr, vdi, read_only } => {
                let (sr, vdi) = self.sr_vdi_ids(&sr, &vdi).await?;
                Attach { sr, vdi, read_only }
            }
            Detach { sr, vdi } => {
                let (sr, vdi) = self.sr_vdi_ids(&sr, &vdi).await?;
                Detach { sr, vdi }
            }
            Destroy { sr, vdi } => {
                let (sr, vdi) = self.sr_vdi_ids(&sr, &vdi).await?;
                Destroy { sr, vdi }
            }
        };
        match cmd {
            VdiCommand::Create { sr, size, name } => {
                let info = self.create(&sr, size, &name).await?;
                self.show_vdi(&info)
            }
            VdiCommand::List { sr } => {
                let vdis: Vec<VdiInfo> = self.call_as("SR.scan", &[("sr", s(&sr))]).await?;
                if self.json {
                    return self.print_json(&vdis.to_value());
                }
                let mut t = table(["VDI", "NAME", "SIZE", "USED", "SNAPSHOT OF", "READ-ONLY"]);
                for v in vdis {
                    add_row(&mut t, vec![
                        v.vdi,
                        v.name_label,
                        human(v.virtual_size),
                        human(v.physical_utilisation),
                        v.snapshot_of,
                        if v.read_only { "yes".into() } else { "no".into() },
                    ]);
                }
                println!("{t}");
                Ok(())
            }
            VdiCommand::Snapshot { sr, vdi, name } => {
                let mut info: VdiInfo = self.call_as("VDI.stat", &[("vdi", s(&vdi)), ("sr", s(&sr))]).await?;
                if let Some(n) = name {
                    info.name_label = n;
                }
                let snap: VdiInfo = self.call_as("VDI.snapshot", &[("vdi_info", info.to_value()), ("sr", s(&sr))]).await?;
                self.show_vdi(&snap)
            }
            VdiCommand::Attach { sr, vdi, read_only } => {
                let uri = self.attach(&sr, &vdi, !read_only).await?;
                if self.json {
                    return self.print_json(&s(&uri));
                }
                println!("{uri}");
                Ok(())
            }
            VdiCommand::Detach { sr, vdi } => {
                // Every CLI datapath holding the VDI: its own, and one named as another VDI's (a
                // migration attaches the destination VDI on one named as the source's). Letting
                // go of its own alone left a migrated VDI attached after `vdi attach` of it,
                // with no word, and a mirror of it was never finalized.
                let stat: DpStatVdi = self.call_as("DP.stat_vdi", &[("vdi", s(&vdi)), ("sr", s(&sr))]).await?;
                // An export's own too: one whose CLI was killed left it, and nothing else
                // lets go of it.
                let ours: Vec<String> = stat.dps.keys().filter(|dp| dp.starts_with(CLI_DP_PREFIX) || dp.starts_with(EXPORT_DP_PREFIX)).cloned().collect();
                if ours.is_empty() {
                    if stat.dps.is_empty() {
                        eprintln!("VDI {vdi} is not attached");
                        return Ok(());
                    }
                    bail!(
                        "VDI {vdi} is attached by others, not by the CLI (datapaths {}): detach it where it was attached (DP.destroy)",
                        stat.dps.keys().cloned().collect::<Vec<_>>().join(", ")
                    );
                }
                for dp in ours {
                    self.release_on(&dp, &sr, &vdi).await?;
                }
                // A mirror whose finalize failed stays, failed, for the caller to undo: a
                // detach repeated after that failure succeeds, and must not read as a finalize.
                let id = format!("{sr}/{vdi}");
                if let Ok(m) = self.call("DATA.MIRROR.stat", &[("id", s(&id))]).await
                    && m.get("failed").and_then(Value::as_bool) == Some(true)
                {
                    // A job's disk is the job's to undo (and a stop of it is refused).
                    let job = self.call_as::<Vec<Task>>("TASK.list", &[]).await.ok().and_then(|tasks| {
                        tasks
                            .into_iter()
                            .find(|t| matches!(t.state, TaskState::Pending(_)) && refuse_non_job(t).is_ok() && t.subtasks.keys().any(|k| k.ends_with(&format!(" {vdi}"))))
                            .map(|t| t.id)
                    });
                    match job {
                        Some(job) => eprintln!("VDI {vdi} left migration job {job} before its switch-over: its mirror {id} was not finalized, the VDI here is the guest's disk, and the job fails and undoes the migration on both hosts"),
                        None => eprintln!("VDI {vdi}'s mirror {id} failed and was not finalized: the VDI here is the guest's disk; `sxm mirror stop {id}` undoes the migration on both hosts"),
                    }
                }
                Ok(())
            }
            VdiCommand::Destroy { sr, vdi } => {
                self.call("VDI.destroy", &[("vdi", s(&vdi)), ("sr", s(&sr))]).await?;
                Ok(())
            }
            VdiCommand::Import { sr, name, format, file } => self.import(&sr, name, format, &file).await,
            VdiCommand::Export { sr, vdi, file } => self.export(&sr, &vdi, &file).await,
        }
    }

    /// `sxm task …`.
    pub async fn task(&self, cmd: TaskCommand) -> Result<()> {
        match cmd {
            TaskCommand::List => {
                let tasks: Vec<Task> = self.call_as("TASK.list", &[]).await?;
                if self.json {
                    return self.print_json(&tasks.to_value());
                }
                let mut t = table(["TASK", "STATE", "PROGRESS", "DBG"]);
                for task in tasks {
                    let (state, progress) = match &task.state {
                        TaskState::Pending(p) => ("pending", format!("{:.0}%", p * 100.0)),
                        TaskState::Completed(_) => ("completed", "100%".to_owned()),
                        TaskState::Failed(_) => ("failed", "-".to_owned()),
                    };
                    add_row(&mut t, vec![task.id, state.to_owned(), progress, task.dbg]);
                }
                println!("{t}");
                Ok(())
            }
            TaskCommand::Stat { task } => {
                let v = self.call("TASK.stat", &[("task", s(&task))]).await?;
                if self.json {
                    return self.print_json(&v);
                }
                let t = Task::from_value(&v).context("TASK.stat answered something unexpected")?;
                let state = match &t.state {
                    TaskState::Pending(p) => format!("pending, {:.1}%", p * 100.0),
                    TaskState::Completed(c) => match &c.result {
                        Some(sxm_engine::model::TaskResult::MirrorId(id)) => format!("completed in {:.1}s: mirror {id}", c.duration),
                        Some(sxm_engine::model::TaskResult::VdiInfo(v)) => format!("completed in {:.1}s: VDI {}", c.duration, v.vdi),
                        None => format!("completed in {:.1}s", c.duration),
                    },
                    TaskState::Failed(e) => format!("failed: {}", failure(e)),
                };
                let mut rows = vec![("task".to_owned(), t.id.clone()), ("state".to_owned(), state), ("dbg".to_owned(), t.dbg.clone())];
                rows.extend(t.debug_info.iter().map(|(k, v)| (k.clone(), standard_nbd_uri(v).unwrap_or_else(|| v.clone()))));
                rows.extend(t.subtasks.iter().map(|(name, st)| {
                    let st = match st {
                        TaskState::Pending(p) => format!("pending, {:.1}%", p * 100.0),
                        TaskState::Completed(_) => "completed".to_owned(),
                        TaskState::Failed(e) => format!("failed: {}", failure(e)),
                    };
                    (format!("subtask {name}"), st)
                }));
                let width = rows.iter().map(|(k, _)| k.chars().count()).max().unwrap_or(0);
                for (k, v) in rows {
                    println!("{:width$}  {}", printable(&k), printable(&v));
                }
                Ok(())
            }
            TaskCommand::Cancel { task } => self.cancel(&task, "task").await,
            TaskCommand::Destroy { task } => {
                // TASK.destroy of a running task cancels it too: a job's undo would then run
                // with no task left to tell how it ended. Only ended tasks are the CLI's to forget.
                let t: Task = self.call_as("TASK.stat", &[("task", s(&task))]).await?;
                if matches!(t.state, TaskState::Pending(_)) {
                    bail!("task {task} is still running: cancel it (sxm task cancel {task}) and destroy it once it has ended");
                }
                self.call("TASK.destroy", &[("task", s(&task))]).await?;
                if self.json {
                    return self.print_json(&Value::Null);
                }
                println!("task {task}: forgotten");
                Ok(())
            }
        }
    }

    /// `sxm mirror …`.
    pub async fn mirror(&self, cmd: MirrorCommand) -> Result<()> {
        match cmd {
            MirrorCommand::Start(mut d) => {
                (d.sr, d.vdi) = self.sr_vdi_ids(&d.sr, &d.vdi).await?;
                let url = dest_url(&d)?;
                d.dest_sr = self.dest_sr_id(&url, &d.dest_sr).await?;
                let stat = self.call("DP.stat_vdi", &[("vdi", s(&d.vdi)), ("sr", s(&d.sr))]).await?;
                let dp = match &stat.get("dps") {
                    Some(Value::Struct(dps)) => dps.iter().find(|(_, st)| matches!(st, Value::Array(a) if a.first().and_then(Value::as_str) == Some("Activated"))).map(|(dp, _)| dp.clone()),
                    _ => None,
                };
                let dp = dp.with_context(|| format!("VDI {} is not active on any datapath here: a live mirror needs a guest's datapath (for a VDI nobody writes, use `sxm copy`)", d.vdi))?;
                let args = [("verify_dest", Value::Bool(false)), ("dest", s(&d.dest_sr)), ("url", s(&url)), ("dp", s(&dp)), ("vdi", s(&d.vdi)), ("sr", s(&d.sr))];
                let task: String = self.call_as("DATA.MIRROR.start", &args).await?;
                self.follow(&task, d.wait).await
            }
            MirrorCommand::List => {
                let v = self.call("DATA.MIRROR.list", &[]).await?;
                if self.json {
                    return self.print_json(&v);
                }
                let mut t = mirror_table();
                if let Value::Struct(m) = v {
                    for (id, mirror) in m {
                        add_mirror_row(&mut t, id, &mirror);
                    }
                }
                println!("{t}");
                Ok(())
            }
            MirrorCommand::Stat { id } => {
                let v = self.call("DATA.MIRROR.stat", &[("id", s(&id))]).await?;
                if self.json {
                    return self.print_json(&v);
                }
                let mut t = mirror_table();
                add_mirror_row(&mut t, id, &v);
                println!("{t}");
                Ok(())
            }
            MirrorCommand::Stop { id, receive } => {
                let receiving = match self.call_as::<sxm_engine::model::Mirror>("DATA.MIRROR.stat", &[("id", s(&id))]).await {
                    Ok(m) => m.state == [sxm_engine::model::MirrorState::Receiving],
                    // Unknown here: the stop below says so in the host's words.
                    Err(e) if matches!(storage_error(&e), Some(StorageError::DoesNotExist(..))) => false,
                    Err(e) => return Err(e.context(format!("looking up mirror {id}"))),
                };
                if receive {
                    if !receiving {
                        bail!("this host receives no mirror {id}");
                    }
                    self.call("DATA.MIRROR.receive_cancel", &[("id", s(&id))]).await?;
                    return Ok(());
                }
                if receiving {
                    bail!(
                        "mirror {id} is received here: stop it on its source host, which undoes it on both; if the source no longer knows it, `sxm mirror stop --receive {id}` undoes it here"
                    );
                }
                self.call("DATA.MIRROR.stop", &[("id", s(&id))]).await?;
                Ok(())
            }
        }
    }

    /// `sxm migrate …`.
    pub async fn migrate(&self, cmd: MigrateCmd) -> Result<()> {
        match (cmd.action, cmd.start) {
            (Some(MigrateAction::Cutover { job }), _) => {
                self.still_running(&job, "nothing to switch over").await?;
                self.call("SXM.migrate.cutover", &[("job", s(&job))]).await?;
                // Asked before the disks are in sync, the cutover is kept for when they are:
                // said, so that no one takes the job's silence for a switch-over under way.
                let t: Task = self.call_as("TASK.stat", &[("task", s(&job))]).await?;
                if self.json {
                    return self.print_json(&t.to_value());
                }
                match t.debug_info.get("stage").map(String::as_str) {
                    Some("holding" | "cutover" | "verify" | "done") => eprintln!("job {job}: switching over"),
                    _ => eprintln!("job {job}: not every disk is in sync yet; it switches over as soon as they are"),
                }
                Ok(())
            }
            (Some(MigrateAction::Cancel { job }), _) => {
                // A mirror's or a copy's task is cancelled with `sxm task cancel`; here it was
                // cancelled too, and then called a job.
                refuse_non_job(&self.job_task(&job).await?)?;
                self.cancel(&job, "job").await?;
                // Said, as the cutover is: the undo goes on after the answer.
                self.job_now(&job, "cancelled; its disks are being undone on both hosts (`sxm task list` shows it end)").await
            }
            (Some(MigrateAction::SetBwlimit { job, rate }), _) => {
                self.still_running(&job, "nothing to limit").await?;
                let rate = i64::try_from(rate).context("rate too large")?;
                self.call("SXM.migrate.set_bwlimit", &[("bwlimit", Value::Int(rate)), ("job", s(&job))]).await?;
                let said = match rate {
                    0 => "no bandwidth limit from now on".to_owned(),
                    r => format!("its copies share at most {}/s from now on", human_exact(r)),
                };
                self.job_now(&job, &said).await
            }
            (None, Some(m)) => {
                let mut srs = Vec::with_capacity(m.srs.len());
                for sr in &m.srs {
                    let id = self.sr_id(sr).await?;
                    if !srs.contains(&id) {
                        srs.push(id);
                    }
                }
                // Each disk's SR and VDI ids, and the name it was given by (for --map).
                let mut disks: Vec<(String, String, &str)> = Vec::with_capacity(m.vdis.len());
                for v in &m.vdis {
                    let (sr, id) = self.vdi_among(&srs, v).await?;
                    disks.push((sr, id, v.as_str()));
                }
                let mut maps: Vec<(String, &str)> = Vec::with_capacity(m.maps.len());
                for entry in &m.maps {
                    // At the '=' whose left names a disk: a VDI's name and an SR's may hold one.
                    let splits: Vec<(&str, &str)> = entry.match_indices('=').map(|(i, _)| (&entry[..i], &entry[i + 1..])).filter(|(v, s)| !v.is_empty() && !s.is_empty()).collect();
                    let Some(&(last_vdi, _)) = splits.last() else {
                        bail!("--map {entry:?}: give VDI=SR, the VDI as given to --vdi and its destination SR");
                    };
                    let named = |vdi: &str| disks.iter().find(|(_, id, given)| *given == vdi || id == vdi);
                    let (id, sr) = match splits.iter().filter_map(|&(v, sr)| named(v).map(|d| (&d.1, sr))).collect::<Vec<_>>().as_slice() {
                        [one] => *one,
                        [] => bail!("--map {entry:?}: {last_vdi:?} is not one of the disks given with --vdi"),
                        _ => bail!("--map {entry:?} can be read more than one way (a VDI and an SR named with '='): give the VDI's id"),
                    };
                    if maps.iter().any(|(m, _)| m == id) {
                        bail!("--map {entry:?}: VDI {id} is mapped twice");
                    }
                    maps.push((id.clone(), sr));
                }
                let unmapped = disks.iter().filter(|(_, id, _)| !maps.iter().any(|(m, _)| m == id)).count();
                let dest_sr = match (&m.dest_sr, unmapped) {
                    (Some(sr), _) => sr.clone(),
                    (None, 0) => String::new(),
                    (None, n) => bail!("--dest-sr is missing: {n} disk(s) have no --map to say where they go"),
                };
                let d = DestArgs { sr: srs[0].clone(), vdi: String::new(), dest: m.dest.clone(), dest_secret_file: m.dest_secret_file.clone(), dest_sr: dest_sr.clone(), wait: m.wait };
                let url = dest_url(&d)?;
                // Looked up once each, however many disks go there.
                let mut dest_ids: BTreeMap<&str, String> = BTreeMap::new();
                for sr in maps.iter().map(|(_, sr)| *sr).chain((!dest_sr.is_empty()).then_some(dest_sr.as_str())) {
                    if !dest_ids.contains_key(sr) {
                        dest_ids.insert(sr, self.dest_sr_id(&url, sr).await?);
                    }
                }
                let id_of = |sr: &str| dest_ids.get(sr).cloned().unwrap_or_else(|| sr.to_owned());
                // The job's destination: --dest-sr, or with every disk mapped, the first's.
                let dest = if dest_sr.is_empty() { maps.first().map(|(_, sr)| id_of(sr)).unwrap_or_default() } else { id_of(&dest_sr) };
                let vdis = Value::Array(disks.iter().map(|(_, id, _)| s(id)).collect());
                let vdi_srs = Value::Struct(disks.iter().filter(|(sr, _, _)| *sr != srs[0]).map(|(sr, id, _)| (id.clone(), s(sr))).collect());
                let vdi_map = Value::Struct(maps.iter().map(|(id, sr)| (id.clone(), s(&id_of(sr)))).collect());
                let args = [
                    ("vdi_map", vdi_map),
                    ("vdi_srs", vdi_srs),
                    ("bwlimit", Value::Int(i64::try_from(m.bwlimit.unwrap_or(0)).context("--bwlimit too large")?)),
                    ("verify", Value::Bool(m.verify)),
                    ("hold", Value::Bool(m.hold)),
                    ("parallel", Value::Int(i64::from(m.parallel))),
                    ("dest", s(&dest)),
                    ("url", s(&url)),
                    ("vdis", vdis),
                    ("sr", s(&srs[0])),
                ];
                let job: String = self.call_as("SXM.migrate.start", &args).await?;
                if !m.wait {
                    if self.json {
                        return self.print_json(&s(&job));
                    }
                    println!("{job}");
                    return Ok(());
                }
                self.follow_job(&job).await
            }
            (None, None) => bail!("sxm migrate: give --sr, --vdi, --dest and --dest-sr, or `cutover JOB` / `cancel JOB`"),
        }
    }

    async fn follow_job(&self, job: &str) -> Result<()> {
        // First, so that `migrate cutover`, `cancel` and `set-bwlimit` can be given it.
        eprintln!("job {job}");
        let mut told_hold = false;
        let mut told_disks = std::collections::BTreeSet::new();
        let mut drawn = false;
        let mut away_since = None;
        loop {
            let t = self.job_stat(job, &mut away_since).await?;
            let stage = t.debug_info.get("stage").cloned().unwrap_or_default();
            // The progress line names disks by their index, to stay one line; which VDI each
            // is gets said once, as it first shows.
            for name in t.subtasks.keys() {
                if let Some((disk, vdi)) = name.split_once(' ')
                    && told_disks.insert(name.clone())
                {
                    // Below a progress line already drawn, not over it.
                    let after = if drawn { "\n" } else { "" };
                    drawn = false;
                    eprintln!("{after}{} is VDI {}", printable(disk), printable(vdi));
                }
            }
            let disks: Vec<String> = t
                .subtasks
                .iter()
                .map(|(name, st)| match st {
                    TaskState::Pending(p) => format!("{}: {:.0}%", name.split(' ').next().unwrap_or(name), p * 100.0),
                    TaskState::Completed(_) => format!("{}: done", name.split(' ').next().unwrap_or(name)),
                    TaskState::Failed(_) => format!("{}: failed", name.split(' ').next().unwrap_or(name)),
                })
                .collect();
            match &t.state {
                TaskState::Pending(p) => {
                    eprint!("\rjob {:>5.1}%  {stage:<9} {}        ", p * 100.0, disks.join("  "));
                    drawn = true;
                    if stage == "holding" && !told_hold {
                        eprintln!("\nevery disk is in sync and mirrored; switch over with: sxm migrate cutover {job}");
                        told_hold = true;
                        drawn = false;
                    }
                }
                TaskState::Completed(c) => {
                    eprintln!("\rjob done in {:.1}s{:60}", c.duration, "");
                    if self.json {
                        return self.print_json(&t.to_value());
                    }
                    for (k, v) in t.debug_info.iter().filter(|(k, _)| k.contains("dest_") || k.contains("verified")) {
                        let v = standard_nbd_uri(v).unwrap_or_else(|| v.clone());
                        println!("{}: {}", printable(k), printable(&v));
                    }
                    return Ok(());
                }
                TaskState::Failed(e) => {
                    eprintln!();
                    let what = if stage.is_empty() { format!("job {job} failed") } else { format!("job {job} failed in stage {stage:?}") };
                    // The storage error stays in the chain, for `--json`'s `storage_error`.
                    return Err(match StorageError::from_value(e) {
                        Ok(se) => anyhow::Error::new(se).context(what),
                        Err(_) => anyhow::anyhow!("{what}: {e:?}"),
                    });
                }
            }
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        }
    }

    /// A job's task, riding out a restart of the host: a restarted host takes the job up
    /// again under its id (to undo it) and tells in its task how it ended, which the CLI
    /// following it used to miss (it ended on "connection refused").
    async fn job_stat(&self, job: &str, away_since: &mut Option<std::time::Instant>) -> Result<Task> {
        loop {
            match self.call_as::<Task>("TASK.stat", &[("task", s(job))]).await {
                Ok(t) => {
                    *away_since = None;
                    return Ok(t);
                }
                Err(e) if host_away(&e) => {
                    let since = *away_since.get_or_insert_with(|| {
                        eprintln!("\nthe host does not answer (restarting?); waiting for it, {} s at most", HOST_AWAY_WAIT.as_secs());
                        std::time::Instant::now()
                    });
                    if since.elapsed() >= HOST_AWAY_WAIT {
                        return Err(e.context(format!("following job {job}: the host did not answer for {} s", HOST_AWAY_WAIT.as_secs())));
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// `sxm copy`: copy a VDI nobody writes to an SR of another host (DATA.copy).
    pub async fn copy(&self, mut d: DestArgs) -> Result<()> {
        (d.sr, d.vdi) = self.sr_vdi_ids(&d.sr, &d.vdi).await?;
        let url = dest_url(&d)?;
        d.dest_sr = self.dest_sr_id(&url, &d.dest_sr).await?;
        let args = [("verify_dest", Value::Bool(false)), ("dest", s(&d.dest_sr)), ("url", s(&url)), ("vm", s("0")), ("vdi", s(&d.vdi)), ("sr", s(&d.sr))];
        let task: String = self.call_as("DATA.copy", &args).await?;
        self.follow(&task, d.wait).await
    }

    /// Prints the task id, or follows the task to its end with a progress line on stderr.
    async fn follow(&self, task: &str, wait: bool) -> Result<()> {
        if !wait {
            if self.json {
                return self.print_json(&s(task));
            }
            println!("{task}");
            return Ok(());
        }
        // First, as a job's is: a CLI stopped while it follows leaves the task running, which
        // `sxm task cancel TASK` stops.
        eprintln!("task {task}");
        let started = std::time::Instant::now();
        loop {
            let t: Task = self.call_as("TASK.stat", &[("task", s(task))]).await?;
            let stage = t.debug_info.get("stage").cloned().unwrap_or_else(|| "starting".to_owned());
            match &t.state {
                TaskState::Pending(p) => {
                    let done: u64 = t.debug_info.get("bytes_done").and_then(|x| x.parse().ok()).unwrap_or(0);
                    let total: u64 = t.debug_info.get("bytes_total").and_then(|x| x.parse().ok()).unwrap_or(0);
                    let secs = started.elapsed().as_secs_f64().max(0.001);
                    let rate = done as f64 / secs;
                    let eta = if rate > 0.0 && total > done { format!("{:.0}s", (total - done) as f64 / rate) } else { "-".into() };
                    eprint!("\r{stage:<9} {:>5.1}%  {}/s  ETA {eta}      ", p * 100.0, human(rate as i64));
                }
                TaskState::Completed(c) => {
                    eprintln!("\rdone in {:.1}s{:40}", c.duration, "");
                    let result = c.result.as_ref().map(Marshal::to_value).unwrap_or(Value::Null);
                    return if self.json {
                        self.print_json(&result)
                    } else {
                        match &c.result {
                            Some(sxm_engine::model::TaskResult::MirrorId(id)) => println!("{id}"),
                            Some(sxm_engine::model::TaskResult::VdiInfo(v)) => println!("{}", v.vdi),
                            None => {}
                        }
                        Ok(())
                    };
                }
                TaskState::Failed(e) => {
                    // Over the last progress line, which may name a stage the task has left.
                    eprintln!("\r{stage:<9} failed{:40}", "");
                    let what = if stage.is_empty() { format!("task {task} failed") } else { format!("task {task} failed in stage {stage:?}") };
                    // The storage error stays in the chain, for `--json`'s `storage_error`.
                    return Err(match StorageError::from_value(e) {
                        Ok(se) => anyhow::Error::new(se).context(what),
                        Err(_) => anyhow::anyhow!("{what}: {e:?}"),
                    });
                }
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    }

    async fn create(&self, sr: &str, size: u64, name: &str) -> Result<VdiInfo> {
        let mut info = VdiInfo::new("", name);
        info.virtual_size = i64::try_from(size).context("size too large")?;
        self.call_as("VDI.create", &[("vdi_info", info.to_value()), ("sr", s(sr))]).await
    }

    async fn attach(&self, sr: &str, vdi: &str, read_write: bool) -> Result<String> {
        self.attach_on(&cli_dp(vdi), sr, vdi, read_write).await
    }

    /// Attaches and activates `vdi` on datapath `dp`; answers its NBD URI. A mode the VDI is
    /// not attached in already (read-write asked of a read-only disk, or the reverse on the
    /// CLI's own datapath) is refused with what to do instead.
    async fn attach_on(&self, dp: &str, sr: &str, vdi: &str, read_write: bool) -> Result<String> {
        let stat: DpStatVdi = self.call_as("DP.stat_vdi", &[("vdi", s(vdi)), ("sr", s(sr))]).await?;
        let mode = |st: &VdiState| match st {
            VdiState::Attached(rw) | VdiState::Activated(rw) => Some(*rw == Rw::Rw),
            VdiState::Detached => None,
        };
        if let Some(mine) = stat.dps.get(dp).and_then(mode)
            && mine != read_write
        {
            bail!(
                "VDI {vdi} is attached {} already: detach it first (sxm vdi detach --sr {sr} --vdi {vdi})",
                if mine { "read-write" } else { "read-only" }
            );
        }
        if read_write && mode(&stat.superstate) == Some(false) {
            bail!("VDI {vdi} is attached read-only elsewhere ({}): it cannot be attached read-write too", stat.dps.keys().cloned().collect::<Vec<_>>().join(", "));
        }
        let args = [("read_write", Value::Bool(read_write)), ("vdi", s(vdi)), ("vm", s("0")), ("sr", s(sr)), ("dp", s(dp))];
        let ours = !stat.dps.contains_key(dp);
        let info: AttachInfo = self.call_as("VDI.attach3", &args).await?;
        if let Err(e) = self.call("VDI.activate3", &[("vdi", s(vdi)), ("vm", s("0")), ("sr", s(sr)), ("dp", s(dp))]).await {
            // A refused activate (a copy reading the VDI) leaves no datapath this call made.
            if ours && let Err(undo) = self.release_on(dp, sr, vdi).await {
                eprintln!("datapath {dp} that the failed attach made is still there ({undo:#}): `sxm vdi detach --sr {sr} --vdi {vdi}` lets go of it");
            }
            return Err(e);
        }
        nbd_uri(&info)
    }

    /// `call()`, made again while the host does not answer (restarting), for up to
    /// [`HOST_AWAY_WAIT`]; `what` says what waits, once.
    async fn while_host_away<T, F, Fut>(&self, what: &str, mut call: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let since = std::time::Instant::now();
        let mut told = false;
        loop {
            match call().await {
                Err(e) if host_away(&e) && since.elapsed() < HOST_AWAY_WAIT => {
                    if !told {
                        eprintln!("the host does not answer (restarting?); {what} waits for it, {} s at most", HOST_AWAY_WAIT.as_secs());
                        told = true;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                }
                other => return other,
            }
        }
    }

    async fn release(&self, sr: &str, vdi: &str) -> Result<()> {
        self.release_on(&cli_dp(vdi), sr, vdi).await
    }

    async fn release_on(&self, dp: &str, sr: &str, vdi: &str) -> Result<()> {
        self.call("DP.destroy2", &[("allow_leak", Value::Bool(false)), ("vdi", s(vdi)), ("sr", s(sr)), ("dp", s(dp))]).await?;
        Ok(())
    }

    async fn import(&self, sr: &str, name: Option<String>, format: ImportFormat, file: &Path) -> Result<()> {
        // Caught from here: an import stopped on the way undoes itself like one that failed.
        let mut stops = StopSignals::catch()?;
        let format = format.tapmirror_name();
        let (size, found) = image_size(file, format)?;
        // A disk of no bytes is none: the SR types disagreed on what to make of it (an `ext`
        // SR made a 2 MiB VDI, a `qcow2` one an empty one).
        if size == 0 {
            bail!("{} holds a disk of 0 bytes: there is nothing to import", file.display());
        }
        // An image from elsewhere is checked whole first: a truncated or damaged one would
        // otherwise be copied with what it lost read as zeroes, as qemu-img convert does.
        if found != "raw" {
            check_image(file)?;
        }
        let name = name.unwrap_or_else(|| file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "import".into()));
        let info = self.create(sr, size, &name).await?;
        let outcome = async {
            let uri = self.attach(sr, &info.vdi, true).await?;
            // A new VDI reads as zeroes: nothing needs writing where the image has no data. An
            // image from elsewhere could name any file of this host as its backing file or
            // parent, and the VDI would then read that file's data: such chains are refused.
            tapmirror_copy(&[file.as_os_str(), uri.as_ref(), "--format".as_ref(), format.as_ref(), "--target-is-zero".as_ref(), "--no-backing".as_ref()], &mut stops).await
        }
        .await;
        // A host restarting meanwhile is waited for: given up on at once, the import left its
        // VDI behind, empty or whole, and often still attached (a tester restarted the host
        // under 16 imports; all 16 left one).
        let vdi = info.vdi.clone();
        let released = self.while_host_away("detaching the imported VDI", || self.release(sr, &vdi)).await;
        if let Err(e) = outcome {
            // Take the half-made VDI away again; the import failed as a whole.
            let destroyed = self.while_host_away("destroying the half-made VDI", || async { self.call("VDI.destroy", &[("vdi", s(&vdi)), ("sr", s(sr))]).await.map(|_| ()) }).await;
            let e = e.context(format!("import {} into SR {sr}", file.display()));
            return Err(match destroyed {
                Ok(()) => e,
                Err(why) => e.context(format!("the half-made VDI {vdi} is left ({why:#}): `sxm vdi detach --sr {sr} --vdi {vdi}`, then `sxm vdi destroy`, take it away")),
            });
        }
        released.with_context(|| format!("VDI {vdi} is imported whole, but still attached: `sxm vdi detach --sr {sr} --vdi {vdi}` lets it go"))?;
        let info: VdiInfo = self.call_as("VDI.stat", &[("vdi", s(&info.vdi)), ("sr", s(sr))]).await?;
        self.show_vdi(&info)
    }

    async fn export(&self, sr: &str, vdi: &str, file: &Path) -> Result<()> {
        if file.exists() {
            bail!("{} exists; export writes a new file", file.display());
        }
        // A disk something writes would be copied as no instant ever held it.
        let stat: DpStatVdi = self.call_as("DP.stat_vdi", &[("vdi", s(vdi)), ("sr", s(sr))]).await?;
        if let VdiState::Attached(Rw::Rw) | VdiState::Activated(Rw::Rw) = stat.superstate {
            bail!(
                "VDI {vdi} is attached read-write ({}): export a snapshot of it (sxm vdi snapshot --sr {sr} --vdi {vdi}), or detach it first",
                stat.dps.keys().cloned().collect::<Vec<_>>().join(", ")
            );
        }
        let mut stops = StopSignals::catch()?;
        let dp = export_dp(vdi);
        let uri = self.attach_on(&dp, sr, vdi, false).await?;
        // A new file, or nothing: a file (or a link) that appeared at the path since the check
        // above is never written, so a folder others may write cannot turn an export into an
        // overwrite of some file of theirs choosing.
        let outcome = tapmirror_copy(&[uri.as_ref(), file.as_os_str(), "--dest-new".as_ref()], &mut stops).await;
        let released = self.release_on(&dp, sr, vdi).await;
        outcome.with_context(|| format!("export VDI {vdi} to {}", file.display()))?;
        released
    }

    fn show_vdi(&self, info: &VdiInfo) -> Result<()> {
        if self.json {
            return self.print_json(&info.to_value());
        }
        println!("{}", info.vdi);
        Ok(())
    }
}

/// The destination URL the source host will call, with the destination's secret in it.
/// The table `mirror list` and `mirror stat` print.
fn mirror_table() -> Table {
    table(["MIRROR", "ROLE", "SOURCE VDI", "DESTINATION VDI", "FAILED"])
}

/// One mirror (`Mirror.t`) as a row of [`mirror_table`].
fn add_mirror_row(t: &mut Table, id: String, mirror: &Value) {
    let roles = match mirror.get("state") {
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(","),
        _ => String::new(),
    };
    let get = |k: &str| mirror.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
    let failed = mirror.get("failed").and_then(Value::as_bool).unwrap_or(false);
    add_row(t, vec![id, roles, get("source_vdi"), get("dest_vdi"), if failed { "yes".into() } else { "no".into() }]);
}

/// What an admin should read in xapi's error codes that say little by themselves.
fn explain(code: &str, params: &[String]) -> Option<String> {
    let first = params.first().map(String::as_str).unwrap_or("");
    Some(match code {
        "VDI_IN_USE" => format!("VDI {first} is in use (attached, being migrated or being copied): detach it first (or let the copy end), or work on a snapshot of it"),
        "VDI_READONLY" => format!("VDI {first} is read-only (a snapshot): attach it with --read-only, or clone it to write"),
        "VDI_TOO_LARGE" => {
            // Exact bytes too: the VHD limit, 2040 GiB, reads "2.0 TiB" rounded.
            let most = params.get(1).and_then(|m| m.parse::<i64>().ok()).map(|m| format!("{} ({m} bytes)", human_exact(m))).unwrap_or_default();
            format!("too large: this SR type's VDIs hold at most {most}")
        }
        "SR_BACKEND_FAILURE_44" => "the SR is out of space".to_owned(),
        "SR_IN_USE" => format!("SR {first} is in use ({}): detach its VDIs first", params.get(1).map(String::as_str).unwrap_or("")),
        "SR_NOT_EMPTY" => format!("SR {first} still holds VDIs: destroy them first"),
        _ => return None,
    })
}

/// A failed task's error, as a sentence.
fn failure(e: &Value) -> String {
    StorageError::from_value(e).map(|e| e.to_string()).unwrap_or_else(|_| format!("{e:?}"))
}

/// Refuses a task that is not a migrate job (`sxm migrate` marks its tasks so).
fn refuse_non_job(t: &Task) -> Result<()> {
    if t.debug_info.get(sxm_engine::migrate::JOB_KIND.0).map(String::as_str) != Some(sxm_engine::migrate::JOB_KIND.1) {
        bail!("task {} is not a migrate job (`sxm task list` shows the tasks; `sxm task cancel` cancels any)", t.id);
    }
    Ok(())
}

fn dest_url(d: &DestArgs) -> Result<String> {
    // A host on this machine reached by its socket needs no secret (the socket is 0600). Its
    // path goes absolute: the host that calls it has a working directory of its own, and
    // takes no relative one.
    if let Ok(Endpoint::Unix(path)) = Endpoint::parse(&d.dest) {
        let path = std::path::absolute(&path).with_context(|| format!("--dest {}", path.display()))?;
        return Ok(path.display().to_string());
    }
    if d.dest.contains("session_id=") {
        return Ok(d.dest.clone());
    }
    let Some(f) = &d.dest_secret_file else {
        bail!("the destination host needs its secret: --dest-secret-file DEST_ROOT/secret, or ?session_id= in --dest");
    };
    let secret = std::fs::read_to_string(f).with_context(|| format!("read {}", f.display()))?;
    let sep = if d.dest.contains('?') { '&' } else { '?' };
    Ok(format!("{}{sep}session_id={}", d.dest, secret.trim()))
}

/// The guest-visible size of an image file (raw, VHD or qcow2), from `tapmirror image info`.
/// What `sxm vdi import` reads its file as.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum ImportFormat {
    /// VHD and qcow2 by their magic bytes, anything else raw.
    Auto,
    /// The file's bytes are the disk's bytes.
    Raw,
    /// A dynamic VHD.
    Vhd,
    /// A qcow2 image.
    Qcow2,
}

impl ImportFormat {
    /// The name `tapmirror`'s `--format` takes.
    fn tapmirror_name(self) -> &'static str {
        match self {
            ImportFormat::Auto => "auto",
            ImportFormat::Raw => "raw",
            ImportFormat::Vhd => "vhd",
            ImportFormat::Qcow2 => "qcow2",
        }
    }
}

/// `file`'s virtual size, and its format as `tapmirror image info` found it (`format` may be
/// `auto`).
fn image_size(file: &Path, format: &str) -> Result<(u64, String)> {
    let tapmirror = crate::serve::find_tapmirror(std::env::var_os("SXM_TAPMIRROR").map(PathBuf::from))?;
    let out = Command::new(&tapmirror).arg("image").arg("info").arg("--format").arg(format).arg(file).output().with_context(|| format!("run {}", tapmirror.display()))?;
    if !out.status.success() {
        // Its error names the file already (`tapmirror: PATH: why`).
        bail!("{}", tapmirror_error(&out.stderr, "image info", out.status));
    }
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).context("tapmirror image info --json")?;
    let size = j.get("virtual_size").or_else(|| j.get("size")).and_then(serde_json::Value::as_u64).with_context(|| format!("no size in {j}"))?;
    Ok((size, j["format"].as_str().unwrap_or("raw").to_owned()))
}

/// What a failed tapmirror command (`tapmirror WHAT`) said: the last line of its stderr
/// (`tapmirror: …`), what came before being its log; or, when it said nothing (a signal
/// stopped it: a Ctrl-C reaches the whole process group), how it ended.
fn tapmirror_error(stderr: &[u8], what: &str, status: std::process::ExitStatus) -> String {
    let said = String::from_utf8_lossy(stderr);
    match said.lines().rev().find(|l| !l.trim().is_empty()) {
        Some(line) => line.trim_start_matches("tapmirror: ").to_owned(),
        None => match std::os::unix::process::ExitStatusExt::signal(&status) {
            Some(sig) => format!("`tapmirror {what}` was stopped by signal {sig} ({})", nix::sys::signal::Signal::try_from(sig).map(|s| s.as_str()).unwrap_or("?")),
            None => format!("`tapmirror {what}` failed ({status}) and said nothing"),
        },
    }
}

/// `tapmirror image check` of a VHD or qcow2 file: damage is an error; leaked clusters (wasted
/// space only, its exit status 3) are not.
fn check_image(file: &Path) -> Result<()> {
    let tapmirror = crate::serve::find_tapmirror(std::env::var_os("SXM_TAPMIRROR").map(PathBuf::from))?;
    let out = Command::new(&tapmirror).arg("image").arg("check").arg(file).output().with_context(|| format!("run {}", tapmirror.display()))?;
    if out.status.success() || out.status.code() == Some(3) {
        return Ok(());
    }
    if out.stderr.iter().all(u8::is_ascii_whitespace) {
        // Not a verdict on the file: the check did not end by itself.
        bail!("{} was not imported: {}", file.display(), tapmirror_error(&out.stderr, "image check", out.status));
    }
    let why = tapmirror_error(&out.stderr, "image check", out.status);
    bail!("{} is damaged, and is not imported: {why}", file.display())
}

/// SIGINT, SIGTERM and SIGHUP (a terminal or ssh session gone), caught from the moment this
/// is made: a command that made something on a host (an import's VDI, an export's datapath)
/// undoes it when stopped, rather than dying with it left there.
struct StopSignals {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl StopSignals {
    fn catch() -> Result<StopSignals> {
        use tokio::signal::unix::{SignalKind, signal};
        let catch = |kind: SignalKind| signal(kind).context("catching stop signals");
        Ok(StopSignals { int: catch(SignalKind::interrupt())?, term: catch(SignalKind::terminate())?, hup: catch(SignalKind::hangup())? })
    }

    /// The next stop signal's name (at once for one that came already).
    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.int.recv() => "SIGINT",
            _ = self.term.recv() => "SIGTERM",
            _ = self.hup.recv() => "SIGHUP",
        }
    }
}

/// Runs `tapmirror copy`; its log and report are shown only when it fails, as the error. A stop
/// signal stops it (it takes away a file it made) and fails the copy, and the copy ends with
/// this process however that ends (SIGKILL too), rather than go on writing under init.
async fn tapmirror_copy(args: &[&std::ffi::OsStr], stops: &mut StopSignals) -> Result<()> {
    use tokio::io::AsyncReadExt;
    let tapmirror = crate::serve::find_tapmirror(std::env::var_os("SXM_TAPMIRROR").map(PathBuf::from))?;
    let mut cmd = tokio::process::Command::new(&tapmirror);
    cmd.arg("copy").args(args).stdin(std::process::Stdio::null()).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::piped()).kill_on_drop(true);
    // SAFETY: runs in the child between fork and exec; prctl takes no pointers and is
    // async-signal-safe.
    unsafe {
        cmd.pre_exec(|| nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM).map_err(std::io::Error::from));
    }
    let mut child = cmd.spawn().with_context(|| format!("run {}", tapmirror.display()))?;
    let mut stderr = child.stderr.take().context("the copy's stderr")?;
    let log = tokio::spawn(async move {
        let mut text = Vec::new();
        let _ = stderr.read_to_end(&mut text).await;
        text
    });
    let (status, stopped) = tokio::select! {
        status = child.wait() => (status.context("waiting for the copy")?, None),
        signal = stops.recv() => {
            // The copy's own stop: it ends its requests and removes a file it made.
            if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGTERM);
            }
            (child.wait().await.context("waiting for the stopped copy")?, Some(signal))
        }
    };
    let text = log.await.unwrap_or_default();
    // A signal that came as the copy ended found it done: it succeeded, and its file (an
    // export's) is whole and kept. Failing it then left that file with the stop reported.
    if let Some(signal) = stopped
        && !status.success()
    {
        bail!("stopped by {signal}");
    }
    if !status.success() {
        let why = tapmirror_error(&text, "copy", status);
        bail!("copying failed ({status}): {why}");
    }
    Ok(())
}

/// `bytes` in the largest unit that holds it whole (a limit of 2040 GiB rounded to "2.0 TiB"
/// read as if 2 TiB fitted).
fn human_exact(bytes: i64) -> String {
    for (shift, unit) in [(40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")] {
        if bytes > 0 && bytes % (1i64 << shift) == 0 {
            return format!("{} {unit}", bytes >> shift);
        }
    }
    human(bytes)
}

/// Adds a row whose cells may hold what a caller named (a VDI's name): control characters are
/// shown escaped, never sent to the terminal as they are.
fn add_row(t: &mut Table, cells: Vec<String>) {
    t.add_row(cells.iter().map(|c| printable(c)).collect::<Vec<String>>());
}

/// `text` with its control characters escaped (`\u{1b}`, `\n`).
fn printable(text: &str) -> String {
    if !text.chars().any(char::is_control) {
        return text.to_owned();
    }
    text.chars().map(|c| if c.is_control() { c.escape_default().to_string() } else { c.to_string() }).collect()
}

fn table<const N: usize>(header: [&str; N]) -> Table {
    let mut t = Table::new();
    t.load_style(UTF8_BORDERS_ONLY).set_header(header.to_vec());
    t
}

fn human(bytes: i64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 { format!("{bytes} B") } else { format!("{v:.1} {}", UNITS[u]) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_in_names_are_shown_escaped() {
        assert_eq!(printable("disk 1"), "disk 1");
        assert_eq!(printable("a\u{1b}[2Jb\n\u{7}"), "a\\u{1b}[2Jb\\n\\u{7}");
        assert_eq!(printable("été"), "été");
        let mut t = table(["NAME"]);
        add_row(&mut t, vec!["x\u{1b}]0;owned\u{7}".into()]);
        assert!(!t.to_string().contains('\u{1b}'), "{t}");
    }

    /// A tapmirror child stopped by a signal says nothing: an import stopped in its check
    /// said "is damaged, and is not imported: " and no more.
    #[test]
    fn a_tapmirror_child_that_said_nothing_is_told_by_how_it_ended() {
        use std::os::unix::process::ExitStatusExt;
        let killed = std::process::ExitStatus::from_raw(15);
        assert_eq!(tapmirror_error(b"", "image check", killed), "`tapmirror image check` was stopped by signal 15 (SIGTERM)");
        let failed = std::process::ExitStatus::from_raw(2 << 8);
        assert!(tapmirror_error(b"\n", "copy", failed).contains("failed (exit status: 2) and said nothing"));
        assert_eq!(tapmirror_error(b"log line\ntapmirror: f.vhd: bad\n", "copy", failed), "f.vhd: bad");
    }

    /// The VHD limit is 2040 GiB, which rounded to "2.0 TiB" read as if 2 TiB fitted: it is
    /// told in the unit that holds it whole, and in bytes.
    #[test]
    fn a_size_limit_is_told_exactly_and_in_bytes_too() {
        let said = explain("VDI_TOO_LARGE", &["v".into(), (2040i64 << 30).to_string()]).expect("explained");
        assert!(said.contains("2040 GiB") && said.contains(&(2040i64 << 30).to_string()), "{said}");
        assert_eq!(human_exact(2 << 40), "2 TiB");
        assert_eq!(human_exact(1536), "1.5 KiB");
    }

    #[test]
    fn xapi_nbd_uris_become_standard_ones() {
        let info = AttachInfo { implementations: vec![Implementation::nbd_unix("/run/sxm/1/nbd.sock", "v1")] };
        assert_eq!(nbd_uri(&info).expect("uri"), "nbd+unix:///v1?socket=/run/sxm/1/nbd.sock");
        assert!(nbd_uri(&AttachInfo { implementations: vec![] }).is_err());
        // What a finished job reports as each disk's destination is printed so too.
        assert_eq!(standard_nbd_uri("nbd:unix:/h2/run/0/v/nbd.sock:exportname=v").as_deref(), Some("nbd+unix:///v?socket=/h2/run/0/v/nbd.sock"));
        assert_eq!(standard_nbd_uri("8 blocks"), None);
    }
}
