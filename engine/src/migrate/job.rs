//! A VM's disks moved as one job (`SXM.migrate.start`, `sxm migrate`): a preflight that makes
//! nothing, the disks mirrored in parallel up to a limit (the rest wait in a queue, never
//! refused), progress per disk and for the job (never going backwards), a switch-over when
//! every disk is in sync (at once, or held until `SXM.migrate.cutover`), the destination VDIs
//! attached, an optional block-by-block checksum comparison, and cancel rolling every disk back.
//!
//! Each disk is an ordinary mirror (`DATA.MIRROR.start`, see [`super::send`]) with its own
//! task, records and recovery; the job only orders them. A job has a record of its own too
//! ([`JobRecord`]): a restart of this host resumes a job it interrupted before the switch-over
//! (under the same task id), and undoes one it interrupted in the switch-over, as a failure
//! would.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::backend::Throttle;
use crate::model::call::args;
use crate::model::{Call, SrInfo, StorageError, TaskState, VdiInfo};
use crate::mux::Mux;
use crate::rpc::Value;
use crate::rpc::marshal::Marshal;

use super::records::{JobDisk, JobOutcome, JobRecord, JobStage, SendStage};
use super::{Remote, lock};

/// The largest disk a VHD holds (2040 GiB), for the preflight of an `ext` destination.
const VHD_MAX: i64 = 2040 << 30;

/// Room a destination needs beyond the data: VHD/qcow2 metadata, the migration's dummy and
/// parent headers.
const SLACK_PER_DISK: i64 = 16 << 20;

/// The `debug_info` entry that marks a job's task, for callers that must tell jobs from the
/// other tasks (the CLI's `migrate cutover|cancel|set-bwlimit`).
pub const JOB_KIND: (&str, &str) = ("kind", "migrate job");

/// How long a job's undo waits for a disk's finalize it cannot stop to end (the source asks a
/// destination that does not answer again for a minute).
const FINALIZE_WAIT: Duration = Duration::from_secs(90);

/// How long an ended job's record is kept, for its task to say how it ended after a restart
/// (as long as the task itself is kept).
const ENDED_KEPT: Duration = Duration::from_secs(3600);

/// How long a job resumed after a restart waits for a disk's mirror that the restart
/// interrupted while it started to be undone, before it starts the disk afresh.
const UNDONE_WAIT: Duration = Duration::from_secs(60);

/// One running job.
pub struct Job {
    /// The bandwidth limit its disks' copies share (only its rate is read: see `copies`).
    limit: Arc<RateLimit>,
    /// The bucket the copies made here (SMAPIv1 disks) take from: the whole limit, or, while
    /// full mirrors (SMAPIv3 disks, paced in their datapaths) copy too, their part of it.
    copies: Arc<RateLimit>,
    /// Switch over (a held job waits for it).
    cutover: Notify,
    /// Cut over already asked for (so a `cutover` before the hold starts is not lost).
    cutover_asked: std::sync::atomic::AtomicBool,
    /// The switch-over has begun: from there the disks are handed to the destination, and a
    /// cancel is refused rather than taken and ignored.
    switching: std::sync::atomic::AtomicBool,
    hold: bool,
    /// The destination host (without its secret), and the room its disks need at most on
    /// each of its SRs: what another job's preflight must not count as free.
    dest_host: String,
    need: BTreeMap<String, i64>,
    /// Its disks' mirror ids (`sr/vdi`), by which their destination VDIs are found.
    mirrors: Vec<String>,
}

impl Job {
    /// A job of `a`'s disks (`disks`, checked), going to `dest_host` (without its secret).
    fn new(a: &args::SxmMigrateStart, disks: &[Disk], dest_host: String) -> Arc<Job> {
        Arc::new(Job {
            limit: Arc::new(RateLimit::new(u64::try_from(a.bwlimit).unwrap_or(0))),
            copies: Arc::new(RateLimit::new(u64::try_from(a.bwlimit).unwrap_or(0))),
            cutover: Notify::new(),
            cutover_asked: false.into(),
            switching: false.into(),
            hold: a.hold,
            dest_host,
            need: need_by_sr(disks),
            mirrors: disks.iter().map(Disk::mirror).collect(),
        })
    }
}

/// What `disks` need at most on each destination SR: every disk's whole size (the copy and
/// the mirrored writes never exceed it), plus metadata.
fn need_by_sr(disks: &[Disk]) -> BTreeMap<String, i64> {
    let mut need = BTreeMap::new();
    for d in disks {
        *need.entry(d.dest_sr.clone()).or_insert(0) += d.size + SLACK_PER_DISK;
    }
    need
}

/// The jobs of a host.
#[derive(Default)]
pub struct Jobs {
    jobs: Mutex<BTreeMap<String, Arc<Job>>>,
    /// The pace of each mirror that belongs to a job with a bandwidth limit, by mirror id.
    throttles: Mutex<BTreeMap<String, Throttle>>,
    /// Each such mirror's job limit and how many disks share it at once (for a full mirror's
    /// first share, set as it attaches, before the job's balancing takes over).
    limits: Mutex<BTreeMap<String, (Arc<RateLimit>, u64)>>,
    /// The disks (`sr/vdi`) of every running job, queued ones too, with their job: a disk is
    /// in one job at a time.
    claimed: Mutex<BTreeMap<String, String>>,
    /// Jobs a restart interrupted in their switch-over, being undone: nothing more may be
    /// asked of them.
    undoing: Mutex<BTreeSet<String>>,
}

impl Jobs {
    /// The job `sr`'s VDI `vdi` is a disk of, if any.
    pub(crate) fn job_of(&self, sr: &str, vdi: &str) -> Option<String> {
        lock(&self.claimed).get(&format!("{sr}/{vdi}")).cloned()
    }

    /// Whether `task` is a job under way.
    pub(crate) fn is_running(&self, task: &str) -> bool {
        lock(&self.jobs).contains_key(task)
    }

    /// Why `asked` (a cancel, a new limit) may no longer be asked of job `task`, if so: it has
    /// begun its switch-over, or a restart interrupted that and it is being undone.
    pub(crate) fn past_cutover(&self, task: &str, asked: Asked) -> Option<String> {
        if let Some(why) = self.being_undone(task) {
            return Some(why);
        }
        let because = match asked {
            Asked::Cancel => "a cancel cannot undo that, and their copies are done",
            Asked::Limit => "their copies are done: a bandwidth limit would limit nothing",
        };
        lock(&self.jobs)
            .get(task)
            .filter(|j| j.switching.load(std::sync::atomic::Ordering::SeqCst))
            .map(|_| format!("job {task} is switching over: its disks are being handed to the destination ({because}); wait for it to end"))
    }

    /// Why nothing may be asked of job `task`, if a restart interrupted its switch-over and it
    /// is being undone.
    fn being_undone(&self, task: &str) -> Option<String> {
        lock(&self.undoing)
            .contains(task)
            .then(|| format!("job {task} is being undone: the source host restarted during its switch-over; wait for it to end"))
    }

    /// The pace a mirror's copy keeps, if its job has a bandwidth limit.
    pub(crate) fn throttle_for(&self, mirror: &str) -> Option<Throttle> {
        lock(&self.throttles).get(mirror).cloned()
    }

    /// A full mirror's share of its job's limit as it starts (bytes/s; `None`: no limit).
    pub(crate) fn first_share(&self, mirror: &str) -> Option<u64> {
        let (limit, parallel) = lock(&self.limits).get(mirror).cloned()?;
        let rate = limit.rate();
        (rate > 0).then(|| (rate / parallel.max(1)).max(1))
    }
}

/// What is asked of a job that [`Jobs::past_cutover`] may refuse.
#[derive(Clone, Copy)]
pub(crate) enum Asked {
    Cancel,
    Limit,
}

/// A token bucket over data bytes whose rate may change while copies use it: the bandwidth
/// limit a job's disks share. A rate of 0 means no limit.
pub struct RateLimit {
    rate: std::sync::atomic::AtomicU64,
    state: Mutex<Bucket>,
}

struct Bucket {
    /// When the bucket was last looked at.
    at: std::time::Instant,
    /// The credit (bytes) it held then.
    credit: f64,
    /// The largest request refused since one that large went: the credit is kept for it, so
    /// that smaller requests taking each byte as it comes cannot starve it.
    reserved: f64,
}

impl RateLimit {
    /// A limit of `rate` bytes per second (0: none).
    pub fn new(rate: u64) -> RateLimit {
        RateLimit { rate: rate.into(), state: Mutex::new(Bucket { at: std::time::Instant::now(), credit: 0.0, reserved: 0.0 }) }
    }

    /// The rate (bytes per second, 0: none).
    pub fn rate(&self) -> u64 {
        self.rate.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Changes the rate; copies under way follow from their next request.
    pub fn set_rate(&self, rate: u64) {
        self.rate.store(rate, std::sync::atomic::Ordering::Relaxed);
    }

    /// Takes `bytes` if the bucket holds them and answers zero; else takes nothing and
    /// answers how long until it will at the present rate (the copy asks again then, or
    /// sooner: [`Throttle`]). Nothing is booked ahead, so a rate raised or lifted applies to
    /// the next ask: booked at the old rate, a 1 MiB request at 10 KB/s waited 100 s whatever
    /// the limit became. The bucket holds at most 100 ms of credit (or the largest request
    /// waiting, if more), so bursts stay short. A request refused reserves the credit up to
    /// its size: later, smaller ones take only what lies beyond it (a disk of 1 MiB requests
    /// beside one of 4 KiB writes got nothing until the other had finished).
    pub fn grant(&self, bytes: u64) -> Duration {
        let rate = self.rate.load(std::sync::atomic::Ordering::Relaxed);
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = std::time::Instant::now();
        if rate == 0 {
            *s = Bucket { at: now, credit: 0.0, reserved: 0.0 };
            return Duration::ZERO;
        }
        let (rate, bytes) = (rate as f64, bytes as f64);
        let cap = (rate / 10.0).max(bytes).max(s.reserved);
        s.credit = (s.credit + now.duration_since(s.at).as_secs_f64() * rate).min(cap);
        s.at = now;
        // What this request may use: all of it if it is the one reserved for (or larger),
        // else what lies beyond the reservation.
        let free = if bytes >= s.reserved { s.credit } else { s.credit - s.reserved };
        if free >= bytes {
            s.credit -= bytes;
            if bytes >= s.reserved {
                s.reserved = 0.0;
            }
            return Duration::ZERO;
        }
        s.reserved = s.reserved.max(bytes);
        Duration::from_secs_f64((bytes - free).max(0.0) / rate)
    }
}

/// A disk of a job: its SR and VDI here, the guest's datapath holding it, its size, and the
/// SR it goes to on the destination.
struct Disk {
    sr: String,
    vdi: String,
    dp: String,
    size: i64,
    dest_sr: String,
}

impl Disk {
    /// Its mirror's id (`sr/vdi`), which also keys its claim, pace and share of the limit.
    fn mirror(&self) -> String {
        format!("{}/{}", self.sr, self.vdi)
    }
}

/// A disk of the job in sync: its mirror's id, its VDI and datapath here, and the VDI it
/// fills on the destination.
#[derive(Clone)]
struct JobMirror {
    id: String,
    vdi: String,
    dp: String,
    dest_sr: String,
    dest_vdi: String,
}

fn dbg(job: &str) -> String {
    format!("migrate job {job}")
}

fn preflight_error(why: impl Into<String>) -> StorageError {
    StorageError::MigrationPreparationFailure(format!("preflight: {}", why.into()))
}

impl Mux {
    /// `SXM.migrate.start`: preflight, then the job in a task whose id is answered.
    pub(crate) async fn migrate_start(&self, a: args::SxmMigrateStart) -> Result<String, StorageError> {
        self.forget_old_jobs();
        let (disks, room) = self.preflight(&a).await?;
        let remote = Remote::new(&a.url)?;
        let dest_host = remote.endpoint.to_string();
        let written = self.room_written_by_jobs(&remote, &dest_host, room.keys()).await;
        let srs: BTreeSet<&str> = disks.iter().map(|d| d.sr.as_str()).collect();
        let title = match srs.len() {
            1 => format!("migrate {} disk(s) of SR {}", disks.len(), a.sr),
            _ => format!("migrate {} disk(s) of SRs {}", disks.len(), srs.into_iter().collect::<Vec<_>>().join(", ")),
        };
        let (task, cancel) = self.tasks().create(&title);
        let job = Job::new(&a, &disks, dest_host);
        // Claimed at once, all or none, so that two jobs never share a disk: one queued in a
        // job has no mirror yet for the preflight to see, and the job it was in failed late.
        // The room is booked under the same lock: two jobs that each fit the destination SR,
        // but not together, were both accepted, and one failed late, out of space.
        {
            let mut claimed = lock(&self.jobs.claimed);
            let refused = match disks.iter().find_map(|d| claimed.get(&d.mirror()).map(|j| (&d.vdi, j))) {
                Some((disk, other)) => Some(preflight_error(format!("VDI {disk} is a disk of job {other} already"))),
                None => job.need.iter().find_map(|(sr, need)| {
                    let room = room.get(sr).copied().unwrap_or(0);
                    let booked = self.room_booked(&job.dest_host, sr, &written);
                    (room - booked < *need).then(|| {
                        preflight_error(format!(
                            "destination SR {sr} has {room} bytes free, {booked} of them booked by jobs under way; the disks going there need up to {need}"
                        ))
                    })
                }),
            };
            if let Some(e) = refused {
                drop(claimed);
                let _ = self.tasks().destroy(&task);
                return Err(e);
            }
            // Before anything is made: a restart from here on takes the job up again.
            let record = JobRecord {
                id: task.clone(),
                dbg: title,
                sr: a.sr.clone(),
                url: a.url.clone(),
                dest_sr: a.dest.clone(),
                stage: JobStage::Mirroring,
                disks: disks
                    .iter()
                    .map(|d| JobDisk { vdi: d.vdi.clone(), dp: d.dp.clone(), dest_vdi: None, sr: d.sr.clone(), dest_sr: d.dest_sr.clone() })
                    .collect(),
                parallel: a.parallel,
                bwlimit: a.bwlimit,
                hold: a.hold,
                verify: a.verify,
                progress: 0.0,
                outcome: None,
                ctime: self.tasks().stat(&task).map(|t| t.ctime).unwrap_or(0.0),
                verifying: false,
                cutover_asked: false,
                cancel_asked: false,
            };
            if let Err(e) = lock(&self.records.jobs).put(record) {
                drop(claimed);
                let _ = self.tasks().destroy(&task);
                return Err(e);
            }
            for d in &disks {
                claimed.insert(d.mirror(), task.clone());
            }
            lock(&self.jobs.jobs).insert(task.clone(), job.clone());
        }
        self.launch_job(task.clone(), cancel, a, disks, job, BTreeSet::new())?;
        Ok(task)
    }

    /// Runs a registered job (its disks claimed, its record written) in the background;
    /// `in_sync`: disks whose mirrors run already (a job resumed after a restart).
    fn launch_job(&self, task: String, cancel: CancellationToken, a: args::SxmMigrateStart, disks: Vec<Disk>, job: Arc<Job>, in_sync: BTreeSet<String>) -> Result<(), StorageError> {
        // Each disk's copy asks the job's bucket before every request.
        let copies = job.copies.clone();
        let throttle: Throttle = Arc::new(move |bytes| copies.grant(bytes));
        let sharing = (a.parallel.max(1) as u64).min(disks.len() as u64);
        let mirrors: Vec<String> = disks.iter().map(Disk::mirror).collect();
        for m in &mirrors {
            lock(&self.jobs.throttles).insert(m.clone(), throttle.clone());
            lock(&self.jobs.limits).insert(m.clone(), (job.limit.clone(), sharing));
        }
        self.tasks().debug_info(&task, JOB_KIND.0, JOB_KIND.1);
        self.tasks().debug_info(&task, "stage", "queued");
        let me = self.me.upgrade().ok_or_else(|| StorageError::InternalError("the host is shutting down".into()))?;
        let id = task.clone();
        tokio::spawn(async move {
            let outcome = me.run_job(&id, &a, disks, &job, &cancel, &in_sync).await;
            // Ended, done or undone: nothing is left for a restart to undo. (Recorded before the
            // task says so, so that a job seen completed is never undone.)
            me.record_end(&id, outcome.as_ref().err());
            match outcome {
                Ok(()) => me.tasks().complete(&id, None),
                Err(e) => {
                    tracing::warn!(job = %id, error = %e, "migration job failed");
                    me.tasks().fail(&id, &e);
                }
            }
            lock(&me.jobs.jobs).remove(&id);
            for m in &mirrors {
                lock(&me.jobs.throttles).remove(m);
                lock(&me.jobs.limits).remove(m);
                lock(&me.jobs.claimed).remove(m);
            }
        });
        Ok(())
    }

    /// Records that job `task` was cancelled, before its task is told: a restart in the
    /// cancel's undo then finishes the undo (the job used to resume, and switch over).
    pub(crate) fn record_job_cancel(&self, task: &str) -> Result<(), StorageError> {
        if !lock(&self.records.jobs).get(task).is_some_and(|r| r.stage == JobStage::Mirroring) {
            return Ok(());
        }
        self.update_job_record(task, |r| r.cancel_asked = true)
    }

    /// `SXM.migrate.cutover`.
    pub(crate) fn migrate_cutover(&self, job: &str) -> Result<(), StorageError> {
        if let Some(why) = self.jobs.being_undone(job) {
            return Err(StorageError::InternalError(why));
        }
        let j = lock(&self.jobs.jobs).get(job).cloned().ok_or_else(|| StorageError::DoesNotExist("job".into(), job.into()))?;
        if !j.hold {
            return Err(StorageError::InternalError(format!("job {job} does not hold: it switches over by itself")));
        }
        // Recorded first: a restart before the switch-over begins resumes the job held, and
        // the operator's word must not be lost with the process (it had to be given again).
        self.update_job_record(job, |r| r.cutover_asked = true)?;
        j.cutover_asked.store(true, std::sync::atomic::Ordering::SeqCst);
        j.cutover.notify_one();
        Ok(())
    }

    /// `SXM.migrate.set_bwlimit`: the job's disks share the new limit from their next request.
    pub(crate) fn migrate_set_bwlimit(&self, job: &str, bwlimit: i64) -> Result<(), StorageError> {
        if let Some(why) = self.jobs.past_cutover(job, Asked::Limit) {
            // Its copies are done (or undone): a limit would limit nothing.
            return Err(StorageError::InternalError(why));
        }
        let j = lock(&self.jobs.jobs).get(job).cloned().ok_or_else(|| StorageError::DoesNotExist("job".into(), job.into()))?;
        let Ok(rate) = u64::try_from(bwlimit) else {
            return Err(StorageError::InternalError(format!("bwlimit {bwlimit} is negative (0 is no limit)")));
        };
        j.limit.set_rate(rate);
        // The copies' part, until the balancing of a job with full mirrors shares it out.
        j.copies.set_rate(rate);
        // Kept for a resume after a restart; the limit holds here meanwhile whatever comes.
        if let Err(e) = self.update_job_record(job, |r| r.bwlimit = bwlimit) {
            tracing::warn!(job, error = %e, "recording the new bandwidth limit failed; a restart would take up the old one");
        }
        tracing::info!(job, bwlimit, "bandwidth limit changed");
        Ok(())
    }

    /// The room on `dest` that jobs under way may still write: each job's need, less what its
    /// destination VDIs hold already (`written`, by job), which the destination's free space
    /// counts already. Not less the job's progress: a job holding in sync (progress 0.9) has
    /// written only its disks' data, and its guests may still fill them whole.
    fn room_booked(&self, dest_host: &str, sr: &str, written: &BTreeMap<(String, String), i64>) -> i64 {
        lock(&self.jobs.jobs)
            .iter()
            .filter(|(_, j)| j.dest_host == dest_host)
            .filter_map(|(id, j)| Some((j.need.get(sr)? - written.get(&(id.clone(), sr.to_owned())).copied().unwrap_or(0)).max(0)))
            .sum()
    }

    /// What the destination VDIs of each job under way to `dest_host` occupy now on each of
    /// `srs` there (by job and SR, from the destination's `SR.scan`): the mirrored leaf, the
    /// copy's parent and the dummy of each disk whose receive began. A job missing here (its
    /// disks not started yet, or the scan failed) is booked its whole need.
    async fn room_written_by_jobs(&self, remote: &Remote, dest_host: &str, srs: impl Iterator<Item = &String>) -> BTreeMap<(String, String), i64> {
        let jobs: Vec<(String, Vec<String>)> =
            lock(&self.jobs.jobs).iter().filter(|(_, j)| j.dest_host == dest_host).map(|(id, j)| (id.clone(), j.mirrors.clone())).collect();
        let vdis_of = |mirrors: &[String]| -> Vec<String> {
            let sends = lock(&self.records.sends);
            mirrors
                .iter()
                .filter_map(|m| sends.get(m).and_then(|r| r.remote.clone()))
                .flat_map(|r| [r.leaf, r.parent, r.dummy])
                .filter(|v| !v.is_empty())
                .collect()
        };
        let jobs: Vec<(String, Vec<String>)> = jobs.into_iter().map(|(id, mirrors)| (id, vdis_of(&mirrors))).filter(|(_, v)| !v.is_empty()).collect();
        let mut written = BTreeMap::new();
        if jobs.is_empty() {
            return written;
        }
        for sr in srs {
            let scan: Vec<VdiInfo> = match remote.call(Call::SrScan(args::SrScan { sr: sr.clone(), dbg: dbg("preflight") })).await {
                Ok(v) => v,
                Err(e) => {
                    tracing::warn!(%sr, error = %e, "preflight: cannot see what jobs under way wrote on the destination; booking their whole need");
                    continue;
                }
            };
            let used: BTreeMap<&str, i64> = scan.iter().map(|v| (v.vdi.as_str(), v.physical_utilisation.max(0))).collect();
            for (id, vdis) in &jobs {
                written.insert((id.clone(), sr.clone()), vdis.iter().filter_map(|v| used.get(v.as_str())).sum());
            }
        }
        written
    }

    /// Checks everything that can be checked before anything is made; answers the disks and
    /// the free space of each destination SR they go to.
    async fn preflight(&self, a: &args::SxmMigrateStart) -> Result<(Vec<Disk>, BTreeMap<String, i64>), StorageError> {
        if a.vdis.is_empty() {
            return Err(preflight_error("no VDI to move"));
        }
        if a.parallel < 1 {
            return Err(preflight_error(format!("parallel {} moves no disk; it must be at least 1", a.parallel)));
        }
        if a.bwlimit < 0 {
            return Err(preflight_error(format!("bwlimit {} is negative (0 is no limit)", a.bwlimit)));
        }
        // Each map names disks of the job, so that a misspelt VDI is not silently left to go
        // where the job's defaults take it.
        for (what, map) in [("vdi_srs", &a.vdi_srs), ("vdi_map", &a.vdi_map)] {
            if let Some((vdi, _)) = map.iter().find(|(v, _)| !a.vdis.contains(v)) {
                return Err(preflight_error(format!("{what} names VDI {vdi}, which is not one of the job's disks")));
            }
        }
        let mut disks = Vec::new();
        for vdi in &a.vdis {
            if disks.iter().any(|d: &Disk| &d.vdi == vdi) {
                return Err(preflight_error(format!("VDI {vdi} is named twice")));
            }
            let sr = a.vdi_srs.get(vdi).unwrap_or(&a.sr).clone();
            self.attached_entry(&sr).map_err(|e| preflight_error(e.to_string()))?;
            let info: VdiInfo = self
                .local(Call::VdiStat(args::VdiStat { vdi: vdi.clone(), sr: sr.clone(), dbg: dbg("preflight") }))
                .await
                .map_err(|e| preflight_error(e.to_string()))?;
            super::send::refuse_non_persistent(&info).map_err(|e| preflight_error(e.to_string()))?;
            let dp = self
                .datapath_records(&sr, vdi)
                .into_iter()
                .find(|r| r.active && r.read_write)
                .ok_or_else(|| preflight_error(format!("VDI {vdi} is not active read-write on any datapath here: only a running guest's disk moves live")))?
                .dp;
            if lock(&self.records.sends).get(&format!("{sr}/{vdi}")).is_some() {
                return Err(preflight_error(format!("VDI {vdi} is already being mirrored")));
            }
            let dest_sr = a.vdi_map.get(vdi).unwrap_or(&a.dest).clone();
            disks.push(Disk { sr, vdi: vdi.clone(), dp, size: info.virtual_size.max(0), dest_sr });
        }
        let remote = Remote::new(&a.url).map_err(|e| preflight_error(e.to_string()))?;
        let mut free = BTreeMap::new();
        for (dest_sr, need) in need_by_sr(&disks) {
            let sr: SrInfo = remote
                .call(Call::SrStat(args::SrStat { sr: dest_sr.clone(), dbg: dbg("preflight") }))
                .await
                .map_err(|e| preflight_error(format!("destination SR {dest_sr}: {e}")))?;
            if sr.sr_type.as_deref() == Some("ext")
                && let Some(d) = disks.iter().find(|d| d.dest_sr == dest_sr && d.size > VHD_MAX)
            {
                return Err(preflight_error(format!("VDI {} ({} bytes) is larger than a VHD on destination SR {dest_sr} can be", d.vdi, d.size)));
            }
            if sr.free_space < need {
                return Err(preflight_error(format!("destination SR {dest_sr} has {} bytes free, the disks going there need up to {need}", sr.free_space)));
            }
            free.insert(dest_sr, sr.free_space);
        }
        Ok((disks, free))
    }

    async fn run_job(
        &self,
        id: &str,
        a: &args::SxmMigrateStart,
        disks: Vec<Disk>,
        job: &Job,
        cancel: &CancellationToken,
        in_sync: &BTreeSet<String>,
    ) -> Result<(), StorageError> {
        let slots = Arc::new(Semaphore::new(usize::try_from(a.parallel.max(1)).unwrap_or(1)));
        let sizes: Vec<i64> = disks.iter().map(|d| d.size).collect();
        let total: f64 = sizes.iter().map(|s| *s as f64).sum::<f64>().max(1.0);
        let progress = Mutex::new(vec![0.0f64; disks.len()]);
        // A job resumed after a restart goes on from the figure its task was taken up with.
        let floor = match self.tasks().stat(id).map(|t| t.state) {
            Ok(TaskState::Pending(p)) => p.min(0.9),
            _ => 0.0,
        };
        let reported = Mutex::new(floor);
        let persisted = Mutex::new(0.0f64);
        let started = std::time::Instant::now();
        let report = |i: usize, p: f64| {
            let mut v = progress.lock().unwrap_or_else(|e| e.into_inner());
            v[i] = v[i].max(p);
            let weighted: f64 = v.iter().zip(&sizes).map(|(p, s)| p * *s as f64).sum::<f64>() / total;
            let mut r = reported.lock().unwrap_or_else(|e| e.into_inner());
            // The job's figure never goes backwards; 0.9 is reached when every disk is in sync.
            *r = r.max(weighted * 0.9);
            // Shown once recorded, every hundredth, so that a restart, which takes up the
            // recorded figure, never shows less than was shown.
            let mut kept = persisted.lock().unwrap_or_else(|e| e.into_inner());
            if *r >= *kept + 0.01 || (*r >= 0.9 && *kept < 0.9) {
                *kept = *r;
                self.show_progress(id, *r);
            }
            // Bytes of the disks brought in sync, done and left, the rate and what is left in
            // time: as the figure says, so that they never go back either, and the rate of
            // what this run did.
            let done = (*r / 0.9).min(1.0) * total;
            let rate = (done - floor / 0.9 * total).max(0.0) / started.elapsed().as_secs_f64().max(0.001);
            self.tasks().debug_info(id, "bytes_done", &format!("{done:.0}"));
            self.tasks().debug_info(id, "bytes_left", &format!("{:.0}", total - done));
            self.tasks().debug_info(id, "rate", &format!("{rate:.0}"));
            if rate > 0.0 {
                self.tasks().debug_info(id, "eta_s", &format!("{:.1}", (total - done) / rate));
            }
        };
        self.tasks().debug_info(id, "stage", "mirroring");
        // The job's cancel, and the first disk's failure: either stops every disk at once (a
        // queued one never starts), rather than the rest copying on to their ends for nothing.
        let abort = cancel.child_token();
        // The disks in sync so far: one whose mirror fails (or that leaves) while the others
        // still copy fails the job at once, as a disk that fails in its copy does (a disk's
        // mirror failed by a restart of this host was noticed only once every disk was in
        // sync, up to the whole copy of the others later).
        let synced: Mutex<Vec<JobMirror>> = Mutex::new(Vec::new());
        // Each disk: wait for a slot, start its mirror, follow its task until in sync.
        let runs = disks.iter().enumerate().map(|(i, d)| {
            let slots = slots.clone();
            let (report, abort, synced) = (&report, &abort, &synced);
            async move {
                let name = format!("disk{i} {}", d.vdi);
                self.tasks().subtask(id, &name, TaskState::Pending(0.0));
                let outcome = async {
                    let mirror = d.mirror();
                    // Resumed after a restart: its mirror ran on in its datapath, in sync.
                    if in_sync.contains(&d.vdi) && let Some(dest_vdi) = lock(&self.records.sends).get(&mirror).and_then(|r| r.remote.as_ref().map(|x| x.leaf.clone())) {
                        self.tasks().subtask(id, &name, TaskState::Pending(1.0));
                        report(i, 1.0);
                        // Recorded already, unless the restart came as it got in sync.
                        self.record_dest_vdi(id, &d.vdi, &dest_vdi)?;
                        return Ok(JobMirror { id: mirror, vdi: d.vdi.clone(), dp: d.dp.clone(), dest_sr: d.dest_sr.clone(), dest_vdi });
                    }
                    let _slot = tokio::select! {
                        s = slots.acquire() => s.map_err(|_| StorageError::Cancelled(id.into()))?,
                        _ = abort.cancelled() => return Err(StorageError::Cancelled(id.into())),
                    };
                    // A mirror a restart interrupted while it started is being undone (the
                    // destination told in the background): the disk starts afresh once it is.
                    let until = tokio::time::Instant::now() + UNDONE_WAIT;
                    while lock(&self.records.sends).get(&mirror).is_some_and(|r| r.cancelling) {
                        if tokio::time::Instant::now() >= until {
                            return Err(StorageError::MigrationMirrorFailure(format!(
                                "disk {}: its mirror, interrupted by a restart of this host, is still being undone on the destination",
                                d.vdi
                            )));
                        }
                        tokio::select! {
                            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                            _ = abort.cancelled() => return Err(StorageError::Cancelled(id.into())),
                        }
                    }
                    let task = self.mirror_start(d.sr.clone(), d.vdi.clone(), d.dp.clone(), a.url.clone(), d.dest_sr.clone(), None, None).await?;
                    self.tasks().debug_info(id, &format!("{name} task"), &task);
                    loop {
                        if abort.is_cancelled() {
                            let _ = self.tasks().cancel(&task);
                        }
                        let t = self.tasks().stat(&task)?;
                        match &t.state {
                            TaskState::Pending(p) => {
                                self.tasks().subtask(id, &name, TaskState::Pending(*p));
                                report(i, *p);
                            }
                            TaskState::Completed(_) => {
                                self.tasks().subtask(id, &name, TaskState::Pending(1.0));
                                report(i, 1.0);
                                // Known now, while the mirror's record holds it: a disk that
                                // leaves the job later takes its record with it.
                                let dest_vdi = lock(&self.records.sends).get(&mirror).and_then(|r| r.remote.as_ref().map(|x| x.leaf.clone())).unwrap_or_default();
                                self.record_dest_vdi(id, &d.vdi, &dest_vdi)?;
                                return Ok(JobMirror { id: mirror, vdi: d.vdi.clone(), dp: d.dp.clone(), dest_sr: d.dest_sr.clone(), dest_vdi });
                            }
                            TaskState::Failed(e) => {
                                self.tasks().subtask(id, &name, TaskState::Failed(e.clone()));
                                // Which disk, and where it went: with several destination SRs,
                                // "ENOSPC" alone left the user to work out which one filled.
                                let e = StorageError::from_value(e).unwrap_or_else(|_| StorageError::InternalError(format!("{name} failed")));
                                return Err(e.about(&format!("disk{i} (VDI {} of SR {} to SR {})", d.vdi, d.sr, d.dest_sr)));
                            }
                        }
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
                .await;
                match &outcome {
                    Ok(m) => lock(synced).push(m.clone()),
                    Err(_) => abort.cancel(),
                }
                outcome
            }
        });
        let failed_in_sync: Mutex<Option<StorageError>> = Mutex::new(None);
        let runs = async {
            let all = futures_join_all(runs);
            tokio::pin!(all);
            loop {
                tokio::select! {
                    o = &mut all => break o,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {
                        let gone = self.disk_gone(&lock(&synced));
                        if let Some(e) = gone.filter(|_| !abort.is_cancelled()) {
                            *lock(&failed_in_sync) = Some(e);
                            abort.cancel();
                        }
                    }
                }
            }
        };
        // Full mirrors (SMAPIv3 disks) copy inside their datapath processes: the job's limit is
        // shared out among those copying, again as they start and finish, and the copies made
        // here (SMAPIv1 disks) get the share of those of them copying, out of one bucket (they
        // took the whole limit beside the full mirrors' shares: twice the limit in all).
        let mut full = false;
        for d in &disks {
            full |= self.backend_for_sr(&d.sr)?.smapi_version() >= 3;
        }
        let balancing = async {
            let mut shares: BTreeMap<String, u64> = BTreeMap::new();
            loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let (copying, here): (Vec<&Disk>, usize) = {
                    let sends = lock(&self.records.sends);
                    let stage = |d: &Disk| sends.get(&d.mirror()).map(|r| r.stage);
                    let full: Vec<&Disk> = disks.iter().filter(|d| stage(d) == Some(super::records::SendStage::FullMirror)).collect();
                    (full, disks.iter().filter(|d| stage(d) == Some(super::records::SendStage::Copy)).count())
                };
                let limit = job.limit.rate();
                let sharing = (copying.len() + here).max(1) as u64;
                // In u128: a limit near u64's end times the disks would wrap.
                let copies_share = (u128::from(limit) * here as u128 / u128::from(sharing)) as u64;
                job.copies.set_rate(if limit == 0 || copying.is_empty() { limit } else { copies_share.max(1) });
                for d in &copying {
                    let share = if limit == 0 { 0 } else { (limit / sharing).max(1) };
                    if shares.get(&d.mirror()) != Some(&share) {
                        let (entry, v) = (self.attached_entry(&d.sr)?, d.vdi.clone());
                        match self.run(&entry, false, move |b, ctx| b.vdi_mirror_rate(ctx, &v, share)).await {
                            Ok(()) => {
                                shares.insert(d.mirror(), share);
                            }
                            // Not attached yet, or gone already: the next round sees.
                            Err(e) => tracing::debug!(job = id, vdi = %d.vdi, error = %e, "could not pace a full mirror yet"),
                        }
                    }
                }
            }
            #[allow(unreachable_code)]
            Ok::<(), StorageError>(())
        };
        let outcomes = if full {
            tokio::select! {
                o = runs => o,
                r = balancing => {
                    // Only an SR that disappeared ends the balancing: the job cannot go on.
                    r?;
                    return Err(StorageError::InternalError("pacing the job's mirrors stopped".into()));
                }
            }
        } else {
            runs.await
        };
        let mirrors: Vec<JobMirror> = outcomes.iter().filter_map(|o| o.as_ref().ok().cloned()).collect();
        // The error that stopped the job: a disk's own, not the cancel it brought on the others.
        let first = lock(&failed_in_sync).take().or_else(|| outcomes.iter().filter_map(|o| o.as_ref().err()).find(|e| !matches!(e, StorageError::Cancelled(_))).cloned());
        if let Some(e) = first.or_else(|| outcomes.into_iter().find_map(Result::err)) {
            // One disk failed (or the job was cancelled): every disk goes back.
            self.undo_job(id, a, &mirrors).await;
            return Err(e);
        }

        let dest_vdis: Vec<String> = mirrors.iter().map(|m| m.dest_vdi.clone()).collect();
        for (i, v) in dest_vdis.iter().enumerate() {
            self.tasks().debug_info(id, &format!("disk{i} dest_vdi"), v);
        }

        if job.hold {
            self.tasks().debug_info(id, "stage", "holding");
            tracing::info!(job = %id, "every disk in sync; holding until cutover");
            while !job.cutover_asked.load(std::sync::atomic::Ordering::SeqCst) {
                tokio::select! {
                    _ = job.cutover.notified() => {}
                    _ = cancel.cancelled() => {
                        self.undo_job(id, a, &mirrors).await;
                        return Err(StorageError::Cancelled(id.into()));
                    }
                    // A mirror that fails, or a disk that leaves, while held fails the job.
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {
                        if let Some(e) = self.disk_gone(&mirrors) {
                            self.undo_job(id, a, &mirrors).await;
                            return Err(e);
                        }
                    }
                }
            }
            // A point for tests to restart the host between a cutover and its switch-over.
            let _ = crate::fault::point("job.cutover").await;
        }
        // The same just before the switch-over, for a job that did not hold.
        if let Some(e) = self.disk_gone(&mirrors) {
            self.undo_job(id, a, &mirrors).await;
            return Err(e);
        }
        // Recorded before the switch-over: a restart from there gives the guest its disks
        // back here.
        if let Err(e) = self.update_job_record(id, |r| r.stage = JobStage::Switching) {
            self.undo_job(id, a, &mirrors).await;
            return Err(e);
        }
        let mirrors: Vec<String> = mirrors.into_iter().map(|m| m.id).collect();

        // Switch-over: every guest datapath pauses and drains, then each destination
        // finalizes; the destination VDIs are attached for the guest to resume there. Any
        // failure on the way undoes every disk on both hosts and resumes the guest here.
        // From here a cancel is refused (`Jobs::past_cutover`): the switch-over either ends
        // with the disks on the destination or undoes itself on its own failure.
        job.switching.store(true, std::sync::atomic::Ordering::SeqCst);
        self.tasks().debug_info(id, "stage", "cutover");
        if let Err(e) = self.switch_over(id, a, &disks, &mirrors, &dest_vdis).await {
            let failed_in = self.tasks().stat(id).ok().and_then(|t| t.debug_info.get("stage").cloned()).unwrap_or_else(|| "cutover".into());
            self.tasks().debug_info(id, "stage", "undoing");
            // A point for tests to take the destination away before its copies are destroyed.
            let _ = crate::fault::point("job.undo").await;
            let left = self.undo_cutover(id, a, &disks, &mirrors, &dest_vdis).await;
            // Undone: the job reads the stage it failed in, as a job failing elsewhere does.
            self.tasks().debug_info(id, "stage", &failed_in);
            let e = match e {
                StorageError::MigrationMirrorFailure(m) => m,
                other => format!("switch-over: {other}"),
            };
            return Err(StorageError::MigrationMirrorFailure(if left.is_empty() {
                format!("{e}; undone: the guest's disks are active on the source again")
            } else {
                format!("{e}; undone, but not all of it: {}", left.join("; "))
            }));
        }
        self.show_progress(id, 0.95);

        self.tasks().debug_info(id, "stage", "done");
        self.tasks().progress(id, 1.0);
        Ok(())
    }

    /// The switch-over proper (see `run_job`): deactivate every source disk (each mirror drains and
    /// the destination finalizes it), verify if asked, attach the destination VDIs.
    async fn switch_over(&self, id: &str, a: &args::SxmMigrateStart, disks: &[Disk], mirrors: &[String], dest_vdis: &[String]) -> Result<(), StorageError> {
        let cut = disks.iter().map(|d| self.deactivate(d.dp.clone(), d.sr.clone(), d.vdi.clone()));
        let cut: Vec<Result<(), StorageError>> = futures_join_all(cut).await;
        if let Some(e) = cut.into_iter().find_map(Result::err) {
            // A failed finalize's hint (stop the mirror to undo it) is the job's to follow, and
            // it does: not said to the caller.
            let mut said = e.to_string();
            for m in mirrors {
                said = said.replace(&super::send::finalize_failed_hint(m), "");
            }
            return Err(StorageError::MigrationMirrorFailure(format!("switch-over: {said}")));
        }
        // A deactivate succeeds without a finalize when the disk's mirror is found unsound as
        // it drains (its target stopped answering as the guest paused): its send stays, failed,
        // and its destination VDI never took the mirrored writes. Attached for the guest, it
        // read what the copy sent and nothing after.
        if let Some(m) = mirrors.iter().find(|m| lock(&self.records.sends).get(m.as_str()).is_some()) {
            return Err(StorageError::MigrationMirrorFailure(format!("switch-over: mirror {m} failed as its disk drained, and was not finalized")));
        }
        let remote = Remote::new(&a.url)?;
        // Verified before the destination VDIs are attached (and could be written).
        if a.verify {
            self.tasks().debug_info(id, "stage", "verify");
            // For a restart's undo to say where the job was.
            if let Err(e) = self.update_job_record(id, |r| r.verifying = true) {
                tracing::warn!(job = id, error = %e, "recording the job's verify stage failed");
            }
            crate::fault::point("job.verify").await?;
            for (i, (d, dest_vdi)) in disks.iter().zip(dest_vdis).enumerate() {
                let entry = self.attached_entry(&d.sr)?;
                let vdi = d.vdi.clone();
                let mine = self.run(&entry, false, move |b, ctx| b.vdi_checksums(ctx, &vdi, 1 << 20)).await?;
                let theirs: Vec<i64> = remote
                    .call(Call::SxmVdiChecksums(args::SxmVdiChecksums { block: 1 << 20, vdi: dest_vdi.clone(), sr: d.dest_sr.clone(), dbg: dbg(id) }))
                    .await?;
                let theirs: Vec<u32> = theirs.into_iter().map(|c| c as u32).collect();
                if let Some(block) = mine.iter().zip(&theirs).position(|(x, y)| x != y).or((mine.len() != theirs.len()).then_some(mine.len().min(theirs.len()))) {
                    return Err(StorageError::MigrationMirrorFailure(format!(
                        "verify: disk {i} (VDI {} -> {dest_vdi}) differs in its 1 MiB block {block}",
                        d.vdi
                    )));
                }
                self.tasks().debug_info(id, &format!("disk{i} verified"), &format!("{} blocks", mine.len()));
            }
        }
        for (i, (d, dest_vdi)) in disks.iter().zip(dest_vdis).enumerate() {
            // On the destination, the guest's disk is attached on a datapath of the same name
            // (on this same host, one of its own: see `dest_dp`).
            let dp = self.dest_dp(&d.dp, &d.dest_sr, dest_vdi);
            if dp != d.dp {
                self.tasks().debug_info(id, &format!("disk{i} dest_dp"), &dp);
            }
            let attach = Call::VdiAttach3(args::VdiAttach3 { read_write: true, vdi: dest_vdi.clone(), vm: None, sr: d.dest_sr.clone(), dp: dp.clone(), dbg: dbg(id) });
            let info: crate::model::AttachInfo = remote.call(attach).await?;
            remote.call::<()>(Call::VdiActivate3(args::VdiActivate3 { vdi: dest_vdi.clone(), vm: None, sr: d.dest_sr.clone(), dp, dbg: dbg(id) })).await?;
            if let Some(crate::model::Implementation::Nbd { uri }) = info.implementations.first() {
                // In the form the NBD tools take, as the CLI prints every URI.
                let uri = crate::model::standard_nbd_uri(uri).unwrap_or_else(|| uri.clone());
                self.tasks().debug_info(id, &format!("disk{i} dest_uri"), &uri);
            }
        }
        Ok(())
    }

    /// Undoes a failed switch-over and answers what it could not undo. Every source disk is
    /// activated again, so the guest resumes where it ran; then, disk by disk, a mirror not
    /// yet finalized is stopped (the destination drops what it received), and a disk the
    /// destination finalized already loses its copy there (the source stays the guest's disk).
    async fn undo_cutover(&self, id: &str, a: &args::SxmMigrateStart, disks: &[Disk], mirrors: &[String], dest_vdis: &[String]) -> Vec<String> {
        let mut left = Vec::new();
        // The guest first: it waits, paused, for this, and nothing below needs it to: a disk
        // not finalized has its mirror detached already, and one finalized there loses that
        // copy, which the source's new writes make stale anyway. (Done last, a destination
        // that had stopped answering held the guest for every call made of it below.)
        for d in disks {
            if let Err(e) = self.activate(d.dp.clone(), d.sr.clone(), d.vdi.clone()).await {
                left.push(format!("activating VDI {} on datapath {} again: {e}", d.vdi, d.dp));
            }
        }
        let remote = Remote::new(&a.url).ok();
        for ((d, m), dest_vdi) in disks.iter().zip(mirrors).zip(dest_vdis) {
            if lock(&self.records.sends).get(m.as_str()).is_some() {
                if let Err(e) = self.mirror_stop(m).await {
                    left.push(format!("stopping mirror {m}: {e}"));
                }
                continue;
            }
            let Some(remote) = &remote else {
                left.push(format!("VDI {dest_vdi} on the destination"));
                continue;
            };
            left.extend(self.drop_finalized_copy(remote, id, (&d.sr, &d.vdi, &d.dp), (&a.url, &d.dest_sr), dest_vdi).await);
        }
        tracing::warn!(job = %id, left = left.len(), "switch-over failed; undone");
        left
    }

    /// Takes a disk's copy that the destination finalized off it (the job may have attached
    /// it there for the guest already); a destination that cannot do it now is asked again
    /// until it answers (it restarted, say: the VDI was left there for good). Answers what is
    /// left meanwhile.
    async fn drop_finalized_copy(&self, remote: &Remote, job: &str, (sr, vdi, dp): (&str, &str, &str), (url, dest_sr): (&str, &str), dest_vdi: &str) -> Option<String> {
        let dp = &self.dest_dp(dp, dest_sr, dest_vdi);
        match drop_dest_copy(remote, job, dest_sr, dp, dest_vdi).await {
            Ok(()) | Err(StorageError::VdiDoesNotExist(_)) => None,
            Err(e) => {
                self.undo_on_destination_later((sr, vdi), url, dest_sr, dest_vdi, dp, format!("{job}/{vdi}"));
                Some(format!("destroying VDI {dest_vdi} on the destination: {e} (asked again until it answers)"))
            }
        }
    }

    /// The datapath a disk's destination VDI is attached on: named as the source's (`dp`),
    /// unless the destination SR is this host's. A datapath goes whole (`DP.destroy`), and the
    /// guest's detach of its source disks then took the destination's with it, and an undo's
    /// detach of a destination copy the guest's source disk.
    fn dest_dp(&self, dp: &str, dest_sr: &str, dest_vdi: &str) -> String {
        if self.entry(dest_sr).is_ok() { format!("{dp}/{dest_vdi}") } else { dp.to_owned() }
    }

    /// Records job `id`'s progress, then shows it: its task never shows more than a restart
    /// takes up again.
    fn show_progress(&self, id: &str, figure: f64) {
        if let Err(e) = self.update_job_record(id, |rec| rec.progress = rec.progress.max(figure)) {
            tracing::warn!(job = id, error = %e, "recording the job's progress failed");
        }
        self.tasks().progress(id, figure);
    }

    /// Records the destination VDI of a job's disk in sync: once finalized there, nothing else
    /// names it after a restart.
    fn record_dest_vdi(&self, job: &str, vdi: &str, dest_vdi: &str) -> Result<(), StorageError> {
        self.update_job_record(job, |r| {
            if let Some(disk) = r.disks.iter_mut().find(|x| x.vdi == vdi) {
                disk.dest_vdi = Some(dest_vdi.to_owned());
            }
        })
    }

    fn update_job_record(&self, id: &str, f: impl FnOnce(&mut JobRecord)) -> Result<(), StorageError> {
        let mut table = lock(&self.records.jobs);
        let mut r = table.get(id).cloned().ok_or_else(|| StorageError::InternalError(format!("job {id} has no record")))?;
        f(&mut r);
        table.put(r)
    }

    /// After a restart: each job the old process ran is taken up again under its task's id.
    /// One whose disks were still being brought in sync (or held there) resumes: their
    /// mirrors ran on in their datapaths, and a disk whose mirror was still starting starts
    /// afresh once the restart's undo of it is done. One whose switch-over had begun is undone,
    /// as a failed switch-over is (the waits and calls it was in died with the old process),
    /// and its task fails saying so. In the background: both are mostly the destination's
    /// doing, and it may be away.
    pub(crate) fn recover_jobs(&self) {
        let Ok(me) = self.me() else { return };
        self.forget_old_jobs();
        let records: Vec<JobRecord> = lock(&self.records.jobs).all().cloned().collect();
        for r in records {
            let r = r.placed();
            if r.stage == JobStage::Ended {
                self.restore_ended_job(&r);
                continue;
            }
            let cancel = self.tasks().adopt(&r.id, &r.dbg, r.ctime, Duration::from_secs_f64((crate::tasks::now() - r.ctime).max(0.0)));
            // Where it had got to: its figure never goes backwards, a restart included.
            self.tasks().progress(&r.id, r.progress);
            self.tasks().debug_info(&r.id, JOB_KIND.0, JOB_KIND.1);
            {
                // Its disks stay the job's: no other job or mirror takes them meanwhile.
                let mut claimed = lock(&self.jobs.claimed);
                for d in &r.disks {
                    claimed.insert(format!("{}/{}", d.sr, d.vdi), r.id.clone());
                }
            }
            let me = me.clone();
            if r.stage == JobStage::Mirroring && r.cancel_asked {
                tracing::warn!(job = %r.id, "a cancelled migration job's undo was interrupted by a restart; finishing it");
                lock(&self.jobs.undoing).insert(r.id.clone());
                tokio::spawn(async move { me.end_recovered_job(&r, "during the undo of the job's cancel").await });
            } else if r.stage == JobStage::Mirroring {
                tracing::warn!(job = %r.id, "a migration job was interrupted by a restart; resuming it");
                self.tasks().debug_info(&r.id, "resumed", "after a restart of the source host");
                tokio::spawn(async move {
                    if let Err(e) = me.resume_job(&r, cancel).await {
                        tracing::warn!(job = %r.id, error = %e, "the interrupted job cannot resume; undoing it");
                        me.end_recovered_job(&r, &format!("during the job, which could not resume ({e})")).await;
                    }
                });
            } else {
                tracing::warn!(job = %r.id, "a migration job was interrupted in its switch-over by a restart; undoing it");
                lock(&self.jobs.undoing).insert(r.id.clone());
                tokio::spawn(async move { me.end_recovered_job(&r, "while the job was switching over").await });
            }
        }
    }

    /// Resumes a job the restart interrupted while its disks were brought in sync.
    async fn resume_job(&self, r: &JobRecord, cancel: CancellationToken) -> Result<(), StorageError> {
        let a = args::SxmMigrateStart {
            bwlimit: r.bwlimit,
            verify: r.verify,
            hold: r.hold,
            parallel: r.parallel,
            dest: r.dest_sr.clone(),
            url: r.url.clone(),
            vdis: r.disks.iter().map(|d| d.vdi.clone()).collect(),
            sr: r.sr.clone(),
            vdi_srs: r.disks.iter().map(|d| (d.vdi.clone(), d.sr.clone())).collect(),
            vdi_map: r.disks.iter().map(|d| (d.vdi.clone(), d.dest_sr.clone())).collect(),
            dbg: r.dbg.clone(),
        };
        let mut disks = Vec::new();
        for d in &r.disks {
            let info: VdiInfo = self.local(Call::VdiStat(args::VdiStat { vdi: d.vdi.clone(), sr: d.sr.clone(), dbg: dbg(&r.id) })).await?;
            disks.push(Disk { sr: d.sr.clone(), vdi: d.vdi.clone(), dp: d.dp.clone(), size: info.virtual_size.max(0), dest_sr: d.dest_sr.clone() });
        }
        let remote = Remote::new(&r.url)?;
        let job = Job::new(&a, &disks, remote.endpoint.to_string());
        // A cutover asked before the restart stands.
        job.cutover_asked.store(r.cutover_asked, std::sync::atomic::Ordering::SeqCst);
        let in_sync: BTreeSet<String> = {
            let sends = lock(&self.records.sends);
            r.disks.iter().filter(|d| sends.get(&format!("{}/{}", d.sr, d.vdi)).is_some_and(|s| s.stage == SendStage::Mirroring)).map(|d| d.vdi.clone()).collect()
        };
        tracing::info!(job = %r.id, in_sync = in_sync.len(), disks = r.disks.len(), "job resumed");
        lock(&self.jobs.jobs).insert(r.id.clone(), job.clone());
        self.launch_job(r.id.clone(), cancel, a, disks, job, in_sync).inspect_err(|_| {
            lock(&self.jobs.jobs).remove(&r.id);
        })
    }

    /// Undoes a job the restart interrupted (`when`: what it was doing), then ends its record,
    /// its claims and its task, which fails saying what was undone.
    async fn end_recovered_job(&self, r: &JobRecord, when: &str) {
        lock(&self.jobs.undoing).insert(r.id.clone());
        self.tasks().debug_info(&r.id, "stage", "undoing");
        // A point for tests to ask things of the job while it is being undone.
        let _ = crate::fault::point("job.undo").await;
        let left = self.undo_after_restart(r).await;
        let said = if left.is_empty() {
            format!("the source host restarted {when}; undone: the guest's disks are active on the source")
        } else {
            format!("the source host restarted {when}; undone, but not all of it: {}", left.join("; "))
        };
        tracing::warn!(job = %r.id, left = left.len(), "the interrupted job is undone");
        // The stage it was interrupted in, as a failed job's reads the stage it failed in.
        let stage = match r.stage {
            JobStage::Switching if r.verifying => "verify",
            JobStage::Switching => "cutover",
            _ => "mirroring",
        };
        self.tasks().debug_info(&r.id, "stage", stage);
        // Cancelled, it ends as a cancelled job does, whatever the restart.
        let e = if r.cancel_asked && r.stage == JobStage::Mirroring {
            self.tasks().debug_info(&r.id, "stage", "cancelling");
            self.tasks().debug_info(&r.id, "cancel", &said);
            StorageError::Cancelled(r.id.clone())
        } else {
            StorageError::MigrationMirrorFailure(said)
        };
        self.record_end(&r.id, Some(&e));
        for d in &r.disks {
            lock(&self.jobs.claimed).remove(&format!("{}/{}", d.sr, d.vdi));
        }
        lock(&self.jobs.undoing).remove(&r.id);
        self.tasks().fail(&r.id, &e);
    }

    /// Records that job `id` ended (failed with `error`, or completed), with what its task
    /// says now, for a restart within the hour to tell it again.
    fn record_end(&self, id: &str, error: Option<&StorageError>) {
        let task = self.tasks().stat(id).ok();
        let info = task.as_ref().map(|t| t.debug_info.iter().map(|(k, v)| (k.clone(), v.clone())).collect()).unwrap_or_default();
        let subtasks = task.map(|t| t.subtasks.iter().map(|(k, v)| (k.clone(), serde_json::Value::from(&v.to_value()))).collect()).unwrap_or_default();
        let ended = crate::tasks::now() as u64;
        let outcome = JobOutcome { error: error.map(|e| serde_json::Value::from(&e.to_value())), info, subtasks, ended };
        if let Err(e) = self.update_job_record(id, |r| {
            r.stage = JobStage::Ended;
            r.outcome = Some(outcome);
        }) {
            tracing::error!(job = %id, error = %e, "recording the job's end failed; a restart would take it up again");
        }
    }

    /// Forgets the record of an ended job (its task destroyed, or ended over an hour ago).
    pub(crate) fn forget_ended_job(&self, id: &str) {
        let mut jobs = lock(&self.records.jobs);
        if jobs.get(id).is_some_and(|r| r.stage == JobStage::Ended)
            && let Err(e) = jobs.remove(id)
        {
            tracing::warn!(job = %id, error = %e, "removing an ended job's record failed");
        }
    }

    /// Forgets the records of jobs that ended over an hour ago (as their tasks are).
    fn forget_old_jobs(&self) {
        let now = crate::tasks::now() as u64;
        let old: Vec<String> = lock(&self.records.jobs)
            .all()
            .filter(|r| r.outcome.as_ref().is_some_and(|o| now.saturating_sub(o.ended) >= ENDED_KEPT.as_secs()))
            .map(|r| r.id.clone())
            .collect();
        for id in old {
            self.forget_ended_job(&id);
        }
    }

    /// An ended job's task, told again after a restart.
    fn restore_ended_job(&self, r: &JobRecord) {
        let Some(o) = &r.outcome else { return };
        let ran_for = Duration::from_secs_f64((o.ended as f64 - r.ctime).max(0.0));
        self.tasks().adopt(&r.id, &r.dbg, r.ctime, ran_for);
        self.tasks().progress(&r.id, r.progress);
        for (k, v) in &o.info {
            self.tasks().debug_info(&r.id, k, v);
        }
        for (name, state) in &o.subtasks {
            match TaskState::from_value(&Value::from(state)) {
                Ok(state) => self.tasks().subtask(&r.id, name, state),
                Err(e) => tracing::warn!(job = %r.id, subtask = %name, error = %e, "an ended job's subtask was recorded unreadable; left out"),
            }
        }
        match &o.error {
            None => self.tasks().complete(&r.id, None),
            Some(e) => {
                let e = StorageError::from_value(&Value::from(e)).unwrap_or_else(|_| StorageError::InternalError(e.to_string()));
                self.tasks().fail(&r.id, &e);
            }
        }
    }

    /// Undoes a job a restart interrupted; answers what it could not undo. As a failed
    /// switch-over's undo ([`Mux::undo_cutover`]): the guest's disks first (a switch-over may
    /// have deactivated them), then each disk's mirror is stopped, or, finalized already, its
    /// copy is taken off the destination. A finalize the restart interrupted is being finished
    /// by the send's own recovery: it is waited for, then its copy goes too.
    async fn undo_after_restart(&self, r: &JobRecord) -> Vec<String> {
        let mut left = Vec::new();
        // While the disks were being brought in sync the guest ran here: a disk deactivated
        // then was deactivated by someone else, on purpose.
        if r.stage == JobStage::Switching {
            for d in &r.disks {
                if let Err(e) = self.activate(d.dp.clone(), d.sr.clone(), d.vdi.clone()).await {
                    left.push(format!("activating VDI {} on datapath {} again: {e}", d.vdi, d.dp));
                }
            }
        }
        let remote = Remote::new(&r.url).ok();
        for d in &r.disks {
            let m = JobMirror {
                id: format!("{}/{}", d.sr, d.vdi),
                vdi: d.vdi.clone(),
                dp: d.dp.clone(),
                dest_sr: d.dest_sr.clone(),
                dest_vdi: d.dest_vdi.clone().unwrap_or_default(),
            };
            // A mirror that was still starting is undone by the send's recovery, which asks
            // the destination until it answers: waited for a while, so that the job says it
            // is undone once it is (it said so half a second early, and a new job of the disk
            // was refused meanwhile as already mirrored).
            if lock(&self.records.sends).get(&m.id).is_some_and(|s| s.cancelling) {
                let until = tokio::time::Instant::now() + UNDONE_WAIT;
                while lock(&self.records.sends).get(&m.id).is_some_and(|s| s.cancelling) && tokio::time::Instant::now() < until {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                if lock(&self.records.sends).get(&m.id).is_some() {
                    left.push(format!("mirror {}: the destination's side, undone once it answers", m.id));
                }
                continue;
            }
            if self.stop_job_mirror(&r.id, &m).await || m.dest_vdi.is_empty() {
                // Stopped here, but the destination could not be told yet: its side is undone
                // when it answers (the send's record stays until then).
                if lock(&self.records.sends).get(&m.id).is_some_and(|s| s.cancelling) {
                    left.push(format!("mirror {}: the destination's side, undone once it answers", m.id));
                }
                continue;
            }
            match &remote {
                Some(remote) => left.extend(self.drop_finalized_copy(remote, &r.id, (&d.sr, &d.vdi, &d.dp), (&r.url, &d.dest_sr), &m.dest_vdi).await),
                None => left.push(format!("VDI {} on the destination", m.dest_vdi)),
            }
        }
        left
    }

    /// Why the job cannot switch over, if a disk in sync is no longer: its mirror failed, or
    /// the disk left the job (detached on its own, its mirror finalized or being finalized).
    fn disk_gone(&self, mirrors: &[JobMirror]) -> Option<StorageError> {
        let sends = lock(&self.records.sends);
        mirrors.iter().find_map(|m| match sends.get(&m.id) {
            Some(r) if r.failed => Some(StorageError::MigrationMirrorFailure(match &r.failure {
                Some(why) => format!("mirror {} failed before the switch-over: {why}", m.id),
                None => format!("mirror {} failed before the switch-over", m.id),
            })),
            Some(r) if r.stage == super::records::SendStage::Mirroring => None,
            _ => Some(StorageError::MigrationMirrorFailure(format!(
                "VDI {} left the job before the switch-over (detached on its own: its mirror was finalized by itself)",
                m.vdi
            ))),
        })
    }

    /// Undoes every disk of a job: mirrors in sync are stopped; those still starting are
    /// cancelled by their tasks (which roll them back); a disk that left the job, its mirror
    /// finalized on its own, loses the copy the job made of it on the destination (its source
    /// VDI stays, as for every disk of an undone job).
    async fn undo_job(&self, id: &str, a: &args::SxmMigrateStart, mirrors: &[JobMirror]) {
        // A point for tests to kill the host in a cancel's undo.
        let _ = crate::fault::point("job.undoing").await;
        for m in mirrors {
            if self.stop_job_mirror(id, m).await {
                continue;
            }
            if m.dest_vdi.is_empty() {
                continue;
            }
            let Ok(remote) = Remote::new(&a.url) else { continue };
            // A finalize may still be under way there: it is waited for (the destroy refuses a
            // VDI in use, and is asked again) for a while.
            let mut tries = 0;
            loop {
                match drop_dest_copy(&remote, id, &m.dest_sr, &self.dest_dp(&m.dp, &m.dest_sr, &m.dest_vdi), &m.dest_vdi).await {
                    Ok(()) => break,
                    Err(e) if tries >= 20 => {
                        tracing::warn!(job = %id, vdi = %m.dest_vdi, error = %e, "destroying the destination copy of a disk that left the job failed");
                        break;
                    }
                    Err(_) => {
                        tries += 1;
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
            }
        }
    }

    /// Stops a job's mirror. True when that undid it (or nothing more can be done); false when
    /// the mirror is gone without a stop, finalized, so that its destination copy is the
    /// undo's to destroy. A mirror whose VDI was detached as the job was cancelled is being
    /// finalized and cannot be stopped: its finalize is waited for (the source asks the
    /// destination again for up to a minute), and its copy left behind then went unnoticed.
    async fn stop_job_mirror(&self, job: &str, m: &JobMirror) -> bool {
        let deadline = tokio::time::Instant::now() + FINALIZE_WAIT;
        loop {
            let Some(r) = lock(&self.records.sends).get(&m.id).cloned() else { return false };
            match self.mirror_stop(&m.id).await {
                Ok(()) => return true,
                Err(_) if r.stage == SendStage::Finalizing && !r.failed && tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => {
                    tracing::warn!(job = %job, mirror = %m.id, error = %e, "stopping a mirror of the job failed");
                    return true;
                }
            }
        }
    }

    /// `SXM.VDI.checksums`.
    pub(crate) async fn vdi_checksums(&self, sr: &str, vdi: &str, block: i64) -> Result<Value, StorageError> {
        if !(4096..=(64 << 20)).contains(&block) {
            return Err(StorageError::InternalError(format!("block {block} must be between 4 KiB and 64 MiB")));
        }
        let entry = self.attached_entry(sr)?;
        let vdi = vdi.to_owned();
        let sums = self.run(&entry, false, move |b, ctx| b.vdi_checksums(ctx, &vdi, block as u64)).await?;
        Ok(Value::Array(sums.into_iter().map(|c| Value::Int(i64::from(c))).collect()))
    }
}

/// Detaches a destination copy from the guest's datapath name there (where the job may have
/// attached it) and destroys it.
async fn drop_dest_copy(remote: &Remote, job: &str, dest_sr: &str, dp: &str, dest_vdi: &str) -> Result<(), StorageError> {
    let detach = Call::DpDestroy2(args::DpDestroy2 { allow_leak: false, vm: None, vdi: dest_vdi.into(), sr: dest_sr.into(), dp: dp.into(), dbg: dbg(job) });
    let _ = remote.call::<()>(detach).await;
    remote.call::<()>(Call::VdiDestroy(args::VdiDestroy { vdi: dest_vdi.into(), sr: dest_sr.into(), dbg: dbg(job) })).await
}

/// Runs futures concurrently on this task and collects their outputs in order (a small
/// `join_all`, to avoid a dependency for it).
async fn futures_join_all<F: std::future::Future>(futs: impl IntoIterator<Item = F>) -> Vec<F::Output> {
    let mut futs: Vec<std::pin::Pin<Box<F>>> = futs.into_iter().map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = futs.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (i, f) in futs.iter_mut().enumerate() {
            if out[i].is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => out[i] = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending { std::task::Poll::Pending } else { std::task::Poll::Ready(()) }
    })
    .await;
    // Ready only once every slot is filled.
    out.into_iter().flatten().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rate_limit_paces_bytes_and_follows_a_new_rate() {
        let l = RateLimit::new(1_000_000);
        // An empty bucket: 1 MB must wait about a second at 1 MB/s, and nothing is taken.
        let w = l.grant(1_000_000);
        assert!(w >= Duration::from_millis(900) && w <= Duration::from_millis(1001), "{w:?}");
        // Raised to 10 MB/s: asked again, the same request waits a tenth of that at most.
        l.set_rate(10_000_000);
        let w = l.grant(1_000_000);
        assert!(w <= Duration::from_millis(101), "{w:?}");
        // Lowered to 1 kB/s: nothing booked at the old rate is owed, the wait is at the new one.
        l.set_rate(1_000);
        let w = l.grant(1_000_000);
        assert!(w >= Duration::from_secs(900), "{w:?}");
        // Lifted: goes at once, whatever was waiting.
        l.set_rate(0);
        assert_eq!(l.grant(u64::MAX / 2), Duration::ZERO);
        // Credit that is there is taken, and then gone.
        let l = RateLimit::new(1_000_000_000);
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(l.grant(1_000_000), Duration::ZERO);
        assert!(l.grant(1_000_000_000) > Duration::ZERO);
    }

    /// A large request refused keeps the credit for itself: small ones asking as each byte
    /// comes in cannot take it first, for ever.
    #[test]
    fn small_requests_do_not_starve_a_large_one() {
        let l = RateLimit::new(1_000_000);
        assert!(l.grant(500_000) > Duration::ZERO, "an empty bucket");
        let deadline = std::time::Instant::now() + Duration::from_secs(3);
        loop {
            // A small request before every look of the large one, as a disk of 4 KiB writes does.
            let _ = l.grant(4096);
            if l.grant(500_000).is_zero() {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "the large request never got its turn");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}
