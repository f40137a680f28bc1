//! Tasks (the handles of asynchronous calls: progress, cancel, result or error) and updates
//! (`UPDATES.get`: which tasks, VDIs, datapaths and mirrors changed since a token, waiting for
//! a change when there is none yet, as xapi's event loop expects).

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio_util::sync::CancellationToken;

use crate::model::{Completion, Dynamic, StorageError, Task, TaskResult, TaskState};
use crate::rpc::marshal::Map;

/// How many changes are kept for `UPDATES.get`; a caller further behind gets everything that
/// exists instead (a resync), which is always correct, only larger.
const HISTORY: usize = 10_000;
/// How long a task is kept once it ended, unless `TASK.destroy`ed first. xapi destroys the
/// tasks it makes; sxm's own CLI and jobs, and callers that never do, would otherwise keep
/// every task for the host's lifetime (4.5 KB each: 5 000 failed copies grew `TASK.list` to
/// 2.4 MB). An hour is ample for any caller polling a task it started.
const FINISHED_KEPT: Duration = Duration::from_secs(3600);

/// The longest an `UPDATES.get` waits, whatever it asks for.
pub const MAX_WAIT: Duration = Duration::from_secs(60);

struct Entry {
    task: Task,
    cancel: CancellationToken,
    started: std::time::Instant,
    /// When it completed or failed.
    ended: Option<std::time::Instant>,
}

struct Log {
    next: u64,
    changes: VecDeque<(u64, Dynamic)>,
}

/// Tasks and the change log.
pub struct Tasks {
    tasks: Mutex<BTreeMap<String, Entry>>,
    log: Mutex<Log>,
    changed: tokio::sync::watch::Sender<u64>,
    /// How long an ended task is kept for its caller to read (see [`FINISHED_KEPT`]).
    keep_finished: Duration,
}

impl Default for Tasks {
    fn default() -> Self {
        Tasks::new()
    }
}

/// Seconds since the epoch: a task's `ctime`, and the clock a job's record keeps.
pub(crate) fn now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// A task's subtasks still pending when it ends end with it, as xapi's `with_subtask` ends
/// each one.
fn end_subtasks(task: &mut Task, end: &TaskState) {
    for state in task.subtasks.values_mut() {
        if matches!(state, TaskState::Pending(_)) {
            *state = end.clone();
        }
    }
}

fn no_task(id: &str) -> StorageError {
    StorageError::DoesNotExist("task".into(), id.into())
}

impl Tasks {
    /// No tasks, an empty log.
    pub fn new() -> Tasks {
        Tasks {
            tasks: Mutex::new(BTreeMap::new()),
            log: Mutex::new(Log { next: 1, changes: VecDeque::new() }),
            changed: tokio::sync::watch::channel(0).0,
            keep_finished: FINISHED_KEPT,
        }
    }

    /// As [`Tasks::new`], keeping ended tasks for `keep` (tests).
    pub fn keeping_finished(keep: Duration) -> Tasks {
        Tasks { keep_finished: keep, ..Tasks::new() }
    }

    /// Forgets the tasks that ended longer than `keep_finished` ago (each reported changed).
    fn forget_old(&self) {
        let old: Vec<String> = {
            let mut tasks = self.lock();
            let old: Vec<String> =
                tasks.iter().filter(|(_, e)| e.ended.is_some_and(|t| t.elapsed() >= self.keep_finished)).map(|(id, _)| id.clone()).collect();
            for id in &old {
                tasks.remove(id);
            }
            old
        };
        for id in old {
            self.changed(Dynamic::Task(id));
        }
    }

    /// Records that something changed and wakes the waiting `UPDATES.get`s.
    pub fn changed(&self, what: Dynamic) {
        let seq = {
            let mut log = self.log.lock().unwrap_or_else(|p| p.into_inner());
            let seq = log.next;
            log.next += 1;
            log.changes.push_back((seq, what));
            while log.changes.len() > HISTORY {
                log.changes.pop_front();
            }
            seq
        };
        self.changed.send_replace(seq);
    }

    /// A new pending task; the token tells its worker when `TASK.cancel` was called.
    pub fn create(&self, dbg: &str) -> (String, CancellationToken) {
        self.forget_old();
        let id = uuid::Uuid::new_v4().to_string();
        let cancel = self.insert(&id, dbg);
        (id, cancel)
    }

    /// A pending task under an id it had before this host restarted (a job's, which a
    /// restarted host finishes), so that a caller who holds only the id learns how it ended.
    /// It keeps its creation time `ctime` (seconds since the epoch), and counts its duration
    /// from `ran_for` ago.
    pub fn adopt(&self, id: &str, dbg: &str, ctime: f64, ran_for: Duration) -> CancellationToken {
        let cancel = self.insert(id, dbg);
        if let Some(e) = self.lock().get_mut(id) {
            e.task.ctime = ctime;
            e.started = std::time::Instant::now().checked_sub(ran_for).unwrap_or(e.started);
        }
        cancel
    }

    fn insert(&self, id: &str, dbg: &str) -> CancellationToken {
        let id = id.to_owned();
        let cancel = CancellationToken::new();
        let task = Task {
            backtrace: String::new(),
            debug_info: Map::new(),
            subtasks: Map::new(),
            state: TaskState::Pending(0.0),
            ctime: now(),
            dbg: dbg.to_owned(),
            id: id.clone(),
        };
        self.lock().insert(id.clone(), Entry { task, cancel: cancel.clone(), started: std::time::Instant::now(), ended: None });
        self.changed(Dynamic::Task(id));
        cancel
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Entry>> {
        self.tasks.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn update(&self, id: &str, f: impl FnOnce(&mut Entry)) {
        let found = self.lock().get_mut(id).map(f).is_some();
        if found {
            self.changed(Dynamic::Task(id.to_owned()));
        }
    }

    /// Moves a pending task's progress (0..=1) forward; a lower figure is ignored. What a job
    /// has left can grow while it runs (a full mirror's catch-up sweeps copy again what the
    /// guest rewrote), and a progress bar that moves back reads as a job going wrong.
    pub fn progress(&self, id: &str, fraction: f64) {
        self.update(id, |e| {
            if let TaskState::Pending(shown) = e.task.state {
                e.task.state = TaskState::Pending(fraction.clamp(0.0, 1.0).max(shown));
            }
        });
    }

    /// Sets a free-form fact of the task (its stage, rate, …).
    pub fn debug_info(&self, id: &str, key: &str, value: &str) {
        self.update(id, |e| {
            e.task.debug_info.insert(key.to_owned(), value.to_owned());
        });
    }

    /// Sets a subtask's state.
    pub fn subtask(&self, id: &str, name: &str, state: TaskState) {
        self.update(id, |e| {
            e.task.subtasks.insert(name.to_owned(), state);
        });
    }

    /// Ends a task with its result.
    pub fn complete(&self, id: &str, result: Option<TaskResult>) {
        self.update(id, |e| {
            let done = Completion { result: None, duration: e.started.elapsed().as_secs_f64() };
            end_subtasks(&mut e.task, &TaskState::Completed(done));
            e.task.state = TaskState::Completed(Completion { result, duration: e.started.elapsed().as_secs_f64() });
            e.ended = Some(std::time::Instant::now());
        });
    }

    /// Ends a task with an error.
    pub fn fail(&self, id: &str, error: &StorageError) {
        // A cancelled task names itself, as xapi's `raise_cancelled` does (xapi turns it into
        // TASK_CANCELLED [task]), whatever step of its work noticed the cancel.
        let error = match error {
            StorageError::Cancelled(_) => StorageError::Cancelled(id.to_owned()),
            e => e.clone(),
        };
        self.update(id, |e| {
            let failed = TaskState::Failed(error.to_value());
            // A failed task goes no further: no rate, no time left.
            for going in ["rate", "eta_s"] {
                e.task.debug_info.shift_remove(going);
            }
            end_subtasks(&mut e.task, &failed);
            e.task.state = failed;
            e.ended = Some(std::time::Instant::now());
            e.task.backtrace = error.to_string();
        });
    }

    /// `TASK.stat`.
    pub fn stat(&self, id: &str) -> Result<Task, StorageError> {
        self.forget_old();
        self.lock().get(id).map(|e| e.task.clone()).ok_or_else(|| no_task(id))
    }

    /// `TASK.list`. Ended tasks past their time are forgotten on a look as on a new task: a
    /// host left idle listed them for ever.
    pub fn list(&self) -> Vec<Task> {
        self.forget_old();
        self.lock().values().map(|e| e.task.clone()).collect()
    }

    /// `TASK.cancel`: asks the task's worker to stop; the worker ends the task `Cancelled`.
    pub fn cancel(&self, id: &str) -> Result<(), StorageError> {
        let token = self.lock().get(id).map(|e| e.cancel.clone()).ok_or_else(|| no_task(id))?;
        token.cancel();
        self.changed(Dynamic::Task(id.to_owned()));
        Ok(())
    }

    /// `TASK.destroy`: forgets a task (cancelling it first if it is still running).
    pub fn destroy(&self, id: &str) -> Result<(), StorageError> {
        let entry = self.lock().remove(id).ok_or_else(|| no_task(id))?;
        entry.cancel.cancel();
        self.changed(Dynamic::Task(id.to_owned()));
        Ok(())
    }

    /// `UPDATES.get`: what changed after token `from`, and the token to ask from next. An
    /// empty or unknown token, or one older than the log keeps, answers every task that
    /// exists, every other object the log names, and `extra` (the caller's other live
    /// objects): a resync. With nothing new, waits up to `timeout` for a change.
    pub async fn updates(&self, from: &str, timeout: Duration, extra: impl Fn() -> Vec<Dynamic>) -> (Vec<Dynamic>, String) {
        let mut rx = self.changed.subscribe();
        let deadline = tokio::time::Instant::now() + timeout.min(MAX_WAIT);
        loop {
            if let Some(answer) = self.since(from, &extra) {
                return answer;
            }
            tokio::select! {
                r = rx.changed() => if r.is_err() { break },
                _ = tokio::time::sleep_until(deadline) => break,
            }
        }
        let next = self.log.lock().unwrap_or_else(|p| p.into_inner()).next - 1;
        (Vec::new(), next.to_string())
    }

    fn since(&self, from: &str, extra: &impl Fn() -> Vec<Dynamic>) -> Option<(Vec<Dynamic>, String)> {
        let log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        let latest = log.next - 1;
        let oldest = log.changes.front().map(|(s, _)| *s).unwrap_or(log.next);
        match from.parse::<u64>() {
            Ok(token) if token <= latest && token + 1 >= oldest => {
                let mut seen = Vec::new();
                for (_, d) in log.changes.iter().filter(|(s, _)| *s > token) {
                    if !seen.contains(d) {
                        seen.push(d.clone());
                    }
                }
                (!seen.is_empty()).then(|| (seen, latest.to_string()))
            }
            _ => {
                // Every task that exists, every other object the log still names (VDIs that
                // changed; a task in the log may be gone), and the caller's live objects.
                let logged: Vec<Dynamic> = log.changes.iter().map(|(_, d)| d).filter(|d| !matches!(d, Dynamic::Task(_))).cloned().collect();
                drop(log);
                let mut all: Vec<Dynamic> = self.lock().keys().map(|id| Dynamic::Task(id.clone())).collect();
                for d in logged.into_iter().chain(extra()) {
                    if !all.contains(&d) {
                        all.push(d);
                    }
                }
                Some((all, latest.to_string()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tasks_report_progress_results_and_cancellation() {
        let t = Tasks::new();
        let (id, cancel) = t.create("dbg");
        t.progress(&id, 0.5);
        assert_eq!(t.stat(&id).expect("stat").state, TaskState::Pending(0.5));
        t.progress(&id, 0.3);
        assert_eq!(t.stat(&id).expect("stat").state, TaskState::Pending(0.5), "progress never moves back");
        t.progress(&id, 7.0);
        assert_eq!(t.stat(&id).expect("stat").state, TaskState::Pending(1.0));
        t.cancel(&id).expect("cancel");
        assert!(cancel.is_cancelled());
        t.fail(&id, &StorageError::Cancelled(id.clone()));
        assert!(matches!(t.stat(&id).expect("stat").state, TaskState::Failed(_)));
        t.destroy(&id).expect("destroy");
        assert_eq!(t.stat(&id), Err(StorageError::DoesNotExist("task".into(), id.clone())));
        assert!(t.cancel("nope").is_err());
    }

    #[tokio::test]
    async fn subtasks_end_with_their_task_and_a_cancel_names_the_task() {
        let t = Tasks::new();
        let (ok, _) = t.create("ok");
        t.subtask(&ok, "copy", TaskState::Pending(1.0));
        t.complete(&ok, None);
        assert!(matches!(t.stat(&ok).expect("stat").subtasks.get("copy"), Some(TaskState::Completed(_))));
        let (failed, _) = t.create("failed");
        t.subtask(&failed, "copy", TaskState::Pending(0.4));
        t.debug_info(&failed, "rate", "1000");
        t.debug_info(&failed, "eta_s", "14.8");
        t.debug_info(&failed, "bytes_done", "4000");
        // The copy noticed the cancel and named what it copied: the task says itself.
        t.fail(&failed, &StorageError::Cancelled("some-vdi".into()));
        let task = t.stat(&failed).expect("stat");
        let expected = TaskState::Failed(StorageError::Cancelled(failed.clone()).to_value());
        assert_eq!(task.state, expected);
        assert_eq!(task.subtasks.get("copy"), Some(&expected));
        // How far it got stays; a rate and a time left, which it no longer has, go.
        assert_eq!(task.debug_info.keys().collect::<Vec<_>>(), ["bytes_done"]);
    }

    #[tokio::test]
    async fn ended_tasks_are_forgotten_after_a_while_pending_ones_never() {
        let t = Tasks::keeping_finished(Duration::ZERO);
        let (done, _) = t.create("done");
        let (failed, _) = t.create("failed");
        let (running, _) = t.create("running");
        t.complete(&done, None);
        t.fail(&failed, &StorageError::InternalError("x".into()));
        // No new task needed: a look forgets them (an idle host listed them for ever).
        assert_eq!(t.list().len(), 1, "ended tasks listed past their time");
        assert!(t.stat(&done).is_err() && t.stat(&failed).is_err(), "ended tasks kept");
        assert!(t.stat(&running).is_ok(), "a pending task was forgotten");
        let kept = Tasks::new();
        let (a, _) = kept.create("a");
        kept.complete(&a, None);
        kept.create("b");
        assert!(kept.stat(&a).is_ok(), "forgotten within the hour");
    }

    #[tokio::test]
    async fn updates_resync_then_report_changes_and_wait_for_them() {
        let t = std::sync::Arc::new(Tasks::new());
        let (a, _) = t.create("a");
        let (all, token) = t.updates("", Duration::ZERO, || vec![Dynamic::Vdi("v".into())]).await;
        assert_eq!(all, vec![Dynamic::Task(a.clone()), Dynamic::Vdi("v".into())]);
        // Nothing new: the call waits, and a change wakes it.
        let t2 = t.clone();
        let a2 = a.clone();
        let waker = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            t2.progress(&a2, 0.25);
        });
        let (changes, next) = t.updates(&token, Duration::from_secs(10), Vec::new).await;
        waker.await.expect("waker");
        assert_eq!(changes, vec![Dynamic::Task(a.clone())]);
        assert_ne!(next, token);
        // Still nothing new after that: an empty answer once the timeout passes.
        let (none, same) = t.updates(&next, Duration::from_millis(20), Vec::new).await;
        assert!(none.is_empty());
        assert_eq!(same, next);
        // A resync names what changed besides tasks too, but not a task that is gone.
        t.changed(Dynamic::Vdi("w".into()));
        t.changed(Dynamic::Mirror("m".into()));
        t.destroy(&a).expect("destroy");
        let (all, _) = t.updates("", Duration::ZERO, Vec::new).await;
        assert_eq!(all, vec![Dynamic::Vdi("w".into()), Dynamic::Mirror("m".into())]);
    }
}
