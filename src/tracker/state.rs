//! What the worker knows about its Jobs, built from watch events and targeted reads, and the
//! reports it owes Galaxy. Pure: fed Job and Pod objects, it returns [`Report`]s and says
//! which Jobs' pods it wants read; tests drive it directly.
//!
//! The pod watch sees only pods that left `Pending` (a field selector on `status.phase`):
//! running, ended, deleted. A Job whose pods are not seen yet — most wait a second or two —
//! has them read once in a while (after 2 s, then doubling up to once a minute; the tracker
//! reads the pods of every Job due in one list, from the apiserver's watch cache while the
//! answer is small and no Job's pod start grace has run out), so pods that
//! cannot start (unschedulable, an image that will not pull, a container that cannot be
//! created, none at all) are still known; a failed pod the Job counts and nobody saw makes a
//! read due at once.

use std::collections::{HashMap, HashSet};

use crate::{
    domain::{
        event::JobState,
        outcome::{
            classify, needs_timer, older_than, with_create_error, JobMeta, JobView, Limits, Outcome, PodPhase, PodView,
            DELETED_UNFINISHED,
        },
    },
    k8s::{
        view::{job_meta, job_view, pod_owner, pod_view},
        watched::{WatchedJob, WatchedPod},
    },
};

/// An event the worker must publish for a Job. A `cancelled` report is cleanup only: the
/// cancel handler already published its event; the reporter deletes the stopped Job.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    /// The Job.
    pub meta: JobMeta,
    /// Its classified outcome.
    pub outcome: Outcome,
    /// Its pods, oldest first.
    pub pods: Vec<String>,
    /// When the reported state was reached, when known (RFC 3339).
    pub occurred_at: Option<String>,
    /// Whether the Job object still exists (cleanup and log tails need it).
    pub exists: bool,
    /// The Job's status as classified (to re-classify with fresher pods).
    pub view: JobView,
    /// Owed only if nothing has the Job's name now (whoever told its outcome left a record
    /// under it): the Job left the watch. The executor looks first.
    pub unless_recorded: bool,
}

struct Tracked {
    meta: JobMeta,
    view: JobView,
    /// Highest state already handed out for publishing.
    emitted: Option<JobState>,
    /// The last Job list (its round) that had it.
    listed: u32,
}

fn rank(state: Option<JobState>) -> u8 {
    match state {
        None | Some(JobState::Submitted) => 0,
        Some(JobState::Running) => 1,
        Some(_) => 2,
    }
}

/// How long a replica that does not report keeps the due reports of vanished Jobs for a
/// reporting term of its own (the reporter of the time has them too).
const DEPARTED_MEMORY: std::time::Duration = std::time::Duration::from_secs(120);

/// Jobs and pods by Job uid.
#[derive(Default)]
pub struct TrackerState {
    /// Boxed: a map's table has room for more entries than it holds, and an empty slot costs
    /// a pointer, not a whole entry.
    jobs: HashMap<String, Box<Tracked>>,
    /// Pods by Job uid. A Vec, not a map: a Job has one pod or a few, and a B-tree node
    /// would cost kilobytes per Job. Never an empty Vec: an entry goes with its last pod, or
    /// with its Job. A pod whose Job is unknown is kept (the Job watch may be behind) until the
    /// pod is deleted or a pod re-list no longer has it.
    pods: HashMap<String, Vec<PodView>>,
    jobs_synced: bool,
    pods_synced: bool,
    /// While the Job watch lists: the round its Jobs are marked with (no set of 20,000 uids
    /// is built: the marks live in the entries).
    relisting_jobs: Option<u32>,
    /// The last Job list's round.
    job_round: u32,
    /// While the pod watch lists: the pods it had of Jobs that are not known (only those can
    /// be dropped by the list), by (Job uid, pod name).
    relisting_pods: Option<HashSet<(String, String)>>,
    /// Another replica reports; this one only keeps its state current.
    paused: bool,
    /// Due reports of Jobs that are gone (terminal or `lost`): handed out on the next tick
    /// while reporting, kept (for [`DEPARTED_MEMORY`]) while paused.
    departed: Vec<(std::time::Instant, Report)>,
    /// Jobs whose report was dropped by the executor: evaluated again on the next tick.
    retry: HashSet<String>,
    /// Jobs that vanished failed before this view saw their pods end (someone deleted a Job as
    /// it failed; its pods go with it): since when they wait for their pods' last states, which
    /// the pod watch delivers after the Job's deletion ([`SETTLE`]).
    settling: HashMap<String, std::time::Instant>,
    /// Known Jobs waiting under a time limit: for their first pod, or with a pod that cannot
    /// start (unschedulable, image pull, container creation).
    timed: HashSet<String>,
    /// Jobs whose pods are not seen running yet: when to read them next.
    probes: HashMap<String, Probe>,
    /// Time limits for waiting pods.
    limits: Limits,
    /// The clock (a fixed one in tests).
    clock: Option<fn() -> jiff::Timestamp>,
}

/// When a waiting Job's pods are read.
#[derive(Debug, Clone)]
struct Probe {
    /// The next read.
    next: jiff::Timestamp,
    /// The wait after it.
    every: std::time::Duration,
    /// When the last read was made, if one was.
    read_at: Option<jiff::Timestamp>,
    /// The job controller's latest refusal to make the Job's pod (`FailedCreate`), as read.
    refused: Option<String>,
}

/// A Job whose pods are due to be read.
#[derive(Debug, Clone, PartialEq)]
pub struct DueRead {
    /// Its uid.
    pub uid: String,
    /// Its name.
    pub name: String,
    /// It has waited past the pod start grace: if it has no pod, the read also asks whether
    /// the job controller was refused one.
    pub past_grace: bool,
}

/// The most pods a sweep may expect and still read the apiserver's watch cache, which answers
/// in one response (about 4.5 kB a pod): beyond, it lists page by page.
pub const CACHED_READ_MAX: usize = 1000;

/// How long a Job that vanished failed waits for its pods' last states before it is
/// reported as it is (found in a chaos run: an OOM kill told as a plain failure, its pod's
/// OOMKilled state still on the way when the Job's deletion came).
pub const SETTLE: std::time::Duration = std::time::Duration::from_secs(5);

/// The first read of a waiting Job's pods, after its creation.
const FIRST_READ: std::time::Duration = std::time::Duration::from_secs(2);
/// The longest wait between reads.
const LONGEST_READ_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

impl TrackerState {
    /// A state that keeps track but reports nothing until [`TrackerState::set_reporting`].
    pub fn paused(limits: Limits) -> Self {
        TrackerState { paused: true, limits, ..TrackerState::default() }
    }

    /// Uses these time limits and this clock (tests).
    #[cfg(test)]
    pub fn with_limits(mut self, limits: Limits, clock: fn() -> jiff::Timestamp) -> Self {
        self.limits = limits;
        self.clock = Some(clock);
        self
    }

    fn now(&self) -> jiff::Timestamp {
        self.clock.map_or_else(jiff::Timestamp::now, |c| c())
    }

    fn classify(&self, uid: &str) -> Option<Outcome> {
        let tracked = self.jobs.get(uid)?;
        let pods: Vec<PodView> = self.pods.get(uid).cloned().unwrap_or_default();
        let outcome = classify(&tracked.view, &pods, self.now(), &self.limits);
        // "No pod was made" only once a read after the grace found none: the pod watch does
        // not see pods that wait.
        let confirmed = self
            .probes
            .get(uid)
            .and_then(|p| p.read_at)
            .zip(tracked.view.created)
            .is_some_and(|(read, created)| older_than(created, read, self.limits.pod_start_grace));
        // And only when the job controller said it was refused: a Job it has not reached yet
        // (its queue is long after a burst) is waiting, not failing.
        if outcome.never_started && pods.is_empty() {
            return Some(match self.probes.get(uid).and_then(|p| p.refused.as_deref()) {
                Some(refused) if confirmed => with_create_error(outcome, Some(refused)),
                _ => Outcome::new(JobState::Submitted, "waiting for a pod to start", None),
            });
        }
        Some(outcome)
    }

    /// Whether a Job still waits for a pod to run: it has made no pod seen running or ended,
    /// and nothing ended it.
    fn waits(&self, uid: &str) -> bool {
        let Some(tracked) = self.jobs.get(uid) else { return false };
        let (meta, view) = (&tracked.meta, &tracked.view);
        let started = self.pods.get(uid).is_some_and(|pods| pods.iter().any(|p| p.phase != PodPhase::Pending));
        let ended = view.complete || view.failed.is_some() || view.stopped || meta.cancelled.is_some() || meta.replaced;
        !started && !ended && !meta.fingerprint.is_empty()
    }

    /// Keeps the read schedule of one Job current: a waiting Job has one; a pod failed that
    /// was never seen (the Job counts more failed pods than are known) makes the read due now.
    fn reschedule(&mut self, uid: &str) {
        if !self.waits(uid) {
            self.probes.remove(uid);
            return;
        }
        let now = self.now();
        let tracked = &self.jobs[uid];
        let known_failed =
            self.pods.get(uid).map_or(0, |pods| pods.iter().filter(|p| p.phase == PodPhase::Failed).count());
        let unseen_failure = usize::try_from(tracked.view.failed_pods).unwrap_or(0) > known_failed;
        let first = tracked.view.created.and_then(|c| c.checked_add(FIRST_READ).ok()).unwrap_or(now);
        let probe = self.probes.entry(uid.to_string()).or_insert(Probe {
            next: first,
            every: FIRST_READ,
            read_at: None,
            refused: None,
        });
        if unseen_failure {
            probe.next = probe.next.min(now);
        }
    }

    /// The Jobs whose pods are due to be read now; their next read is scheduled. Only the
    /// reporting replica reads.
    pub fn pods_to_read(&mut self) -> Vec<DueRead> {
        if self.paused || !self.synced() {
            return Vec::new();
        }
        let now = self.now();
        let grace = self.limits.pod_start_grace;
        let mut due = Vec::new();
        for (uid, probe) in self.probes.iter_mut().filter(|(_, p)| p.next <= now) {
            probe.next = now.checked_add(probe.every).unwrap_or(now);
            probe.every = (probe.every * 2).min(LONGEST_READ_WAIT);
            if let Some(tracked) = self.jobs.get(uid) {
                let past_grace = tracked.view.created.is_some_and(|created| older_than(created, now, grace));
                due.push(DueRead { uid: uid.clone(), name: tracked.meta.name.clone(), past_grace });
            }
        }
        due
    }

    /// Whether a sweep for `due` may read the apiserver's watch cache rather than list
    /// consistently from etcd. The cache is milliseconds behind, and serving from it spares the
    /// apiserver reading and decoding every pod of the namespace (20,000 running ones to find
    /// the few that wait); but it does not page, and it may miss a pod made a moment ago. So:
    /// only when the answer is small (the waiting Jobs and the failed pods known, at most
    /// [`CACHED_READ_MAX`]) and no Job due is past its pod start grace (a pod missing from
    /// the read could fail it).
    pub fn read_from_cache(&self, due: &[DueRead]) -> bool {
        if due.iter().any(|d| d.past_grace) || self.probes.len() > CACHED_READ_MAX {
            return false;
        }
        let failed = self.pods.values().flatten().filter(|p| p.phase == PodPhase::Failed).count();
        self.probes.len() + failed <= CACHED_READ_MAX
    }

    /// The pods of a Job that have not started or failed, as read at `at` (every such pod it
    /// had then): waiting pods the read no longer has are gone (or started: the watch says);
    /// what is due is reported. A read older than the watch's news does not undo it: a pod
    /// the watch saw start is not set back to waiting.
    /// `refused` is the job controller's latest `FailedCreate` message for the Job, when the
    /// read asked (the Job was [`DueRead::past_grace`] and no pod was found).
    pub fn pods_read(
        &mut self,
        uid: &str,
        pods: &[WatchedPod],
        refused: Option<&str>,
        at: jiff::Timestamp,
    ) -> Option<Report> {
        let names: HashSet<&str> = pods.iter().filter_map(|p| p.metadata.name.as_deref()).collect();
        if let Some(known) = self.pods.get_mut(uid) {
            known.retain(|p| p.phase != PodPhase::Pending || names.contains(p.name.as_str()));
        }
        for pod in pods.iter().filter(|p| pod_owner(p).as_deref() == Some(uid)) {
            let waiting = pod.status.as_ref().and_then(|s| s.phase.as_deref()).is_none_or(|p| p == "Pending");
            let name = pod.metadata.name.as_deref();
            let seen_started = self.pods.get(uid).is_some_and(|known| {
                known.iter().any(|p| Some(p.name.as_str()) == name && p.phase != PodPhase::Pending)
            });
            if waiting && seen_started {
                continue;
            }
            self.store_pod(pod);
        }
        if let Some(probe) = self.probes.get_mut(uid) {
            probe.read_at = Some(at);
            probe.refused = refused.map(str::to_string);
        }
        self.retime(uid);
        self.reschedule(uid);
        self.evaluate(uid, true)
    }

    /// Re-evaluates the Jobs whose pods wait under a time limit, and hands out again what
    /// the executor dropped (called every few seconds).
    pub fn tick(&mut self) -> Vec<Report> {
        if self.paused {
            return Vec::new();
        }
        let mut due: Vec<String> = self.timed.iter().cloned().collect();
        due.extend(self.retry.drain());
        let mut reports: Vec<Report> = std::mem::take(&mut self.departed).into_iter().map(|(_, r)| r).collect();
        reports.extend(due.iter().filter_map(|uid| self.evaluate(uid, true)));
        let overdue: Vec<String> =
            self.settling.iter().filter(|(_, since)| since.elapsed() >= SETTLE).map(|(uid, _)| uid.clone()).collect();
        reports.extend(overdue.iter().filter_map(|uid| self.settle(uid)));
        reports
    }

    /// A report the executor could not carry out (this replica was not the reporter at that
    /// moment, or the broker did not confirm in time): it is due again on a later tick, so no
    /// role change or outage can drop an event for good.
    pub fn dropped(&mut self, report: Report) {
        match self.jobs.get_mut(&report.meta.uid) {
            // Nothing later was handed out meanwhile: forget this one was.
            Some(tracked) if tracked.emitted == Some(report.outcome.state) => {
                tracked.emitted = tracked.meta.reported;
                self.retry.insert(report.meta.uid.clone());
            }
            Some(_) => {}
            // The Job went meanwhile, and its delete found the report handed out: only the
            // report itself remembers what is owed — unless the Job became a record (the
            // executor looks).
            None => {
                let report = Report { exists: false, unless_recorded: true, ..report };
                self.departed.push((std::time::Instant::now(), report));
            }
        }
    }

    /// Starts or stops reporting. Starting forgets what was emitted in memory (another
    /// replica may have reported in between) and returns everything now due, so a takeover
    /// repeats at most the events in flight at the handover (same event ids).
    pub fn set_reporting(&mut self, on: bool) -> Vec<Report> {
        if on && self.paused {
            for tracked in self.jobs.values_mut() {
                tracked.emitted = tracked.meta.reported;
            }
        }
        self.resume(on)
    }

    /// Reports again in the term this replica had (its Lease renewed late, nobody took it in
    /// between): nobody else reported meanwhile, so what it emitted stays emitted (found in a
    /// chaos run: a reporter whose records waited out an apiserver outage told them again).
    pub fn continue_reporting(&mut self) -> Vec<Report> {
        self.resume(true)
    }

    fn resume(&mut self, on: bool) -> Vec<Report> {
        let was_paused = std::mem::replace(&mut self.paused, !on);
        if !on || !was_paused {
            return Vec::new();
        }
        let mut reports: Vec<Report> = std::mem::take(&mut self.departed)
            .into_iter()
            .filter(|(at, _)| at.elapsed() < DEPARTED_MEMORY)
            .map(|(_, r)| r)
            .collect();
        reports.extend(self.evaluate_all());
        reports
    }

    /// Whether both watches have listed everything once; nothing is reported before.
    pub fn synced(&self) -> bool {
        self.jobs_synced && self.pods_synced
    }

    /// Number of Job uids the state keeps pods for (each entry holds at least one pod).
    #[cfg(test)]
    pub fn pod_entries(&self) -> usize {
        self.pods.len()
    }

    /// Number of tracked Jobs by highest emitted state (for the metrics gauge).
    pub fn counts(&self) -> [(&'static str, i64); 3] {
        let mut counts = [("submitted", 0), ("running", 0), ("finished", 0)];
        for t in self.jobs.values() {
            counts[rank(t.emitted) as usize].1 += 1;
        }
        counts
    }

    /// A Job was added or changed.
    pub fn apply_job(&mut self, job: &WatchedJob) -> Option<Report> {
        let meta = job_meta(&job.metadata);
        let uid = meta.uid.clone();
        let view = job_view(job);
        let round = self.relisting_jobs;
        match self.jobs.get_mut(&uid) {
            Some(entry) => {
                entry.meta = meta;
                entry.view = view;
                entry.listed = round.unwrap_or(entry.listed);
            }
            // A terminal state recorded on the object was already confirmed by the broker.
            None => {
                let listed = round.unwrap_or_default();
                self.jobs.insert(uid.clone(), Box::new(Tracked { emitted: meta.reported, meta, view, listed }));
            }
        }
        self.retime(&uid);
        self.reschedule(&uid);
        self.evaluate(&uid, true)
    }

    /// A Job was deleted (its last state is given).
    pub fn delete_job(&mut self, job: &WatchedJob) -> Option<Report> {
        let uid = job.metadata.uid.clone().unwrap_or_default();
        let report = match self.jobs.get_mut(&uid) {
            Some(tracked) => {
                // The last state decides (annotations say whether a cancel or replace did it).
                tracked.meta = job_meta(&job.metadata);
                tracked.view = job_view(job);
                if self.awaits_pods(&uid) {
                    self.timed.remove(&uid);
                    self.retry.remove(&uid);
                    self.settling.insert(uid, std::time::Instant::now());
                    return None;
                }
                self.gone(&uid)
            }
            None => None,
        };
        self.forget(&uid);
        report
    }

    /// Whether a vanished Job failed while a pod of it has not been seen to end: its pods' last
    /// states are yet to come (an OOM kill, an exit code), and decide its outcome.
    fn awaits_pods(&self, uid: &str) -> bool {
        let Some(tracked) = self.jobs.get(uid) else { return false };
        let meta = &tracked.meta;
        let owed = !meta.replaced && meta.reported.is_none() && meta.cancelled.is_none() && rank(tracked.emitted) < 2;
        let pods = self.pods.get(uid).map_or(&[][..], Vec::as_slice);
        let unended =
            pods.is_empty() || pods.iter().any(|p| !matches!(p.phase, PodPhase::Succeeded | PodPhase::Failed));
        owed && unended && self.classify(uid).is_some_and(|o| o.state == JobState::Failed)
    }

    /// A vanished Job's wait for its pods is over: what it owes now.
    fn settle(&mut self, uid: &str) -> Option<Report> {
        self.settling.remove(uid)?;
        let report = self.gone(uid);
        self.forget(uid);
        report
    }

    /// Forgets a Job that is gone, with its pods.
    fn forget(&mut self, uid: &str) {
        self.settling.remove(uid);
        self.jobs.remove(uid);
        self.pods.remove(uid);
        self.timed.remove(uid);
        self.probes.remove(uid);
    }

    /// What a vanished Job still owes: its terminal event, or `lost`. A replica that does
    /// not report keeps it for its own reporting term: the Job is gone, nothing else will.
    fn gone(&mut self, uid: &str) -> Option<Report> {
        let report = self.owed_by_vanished(uid);
        if self.paused {
            self.departed.retain(|(at, _)| at.elapsed() < DEPARTED_MEMORY);
            self.departed.extend(report.map(|r| (std::time::Instant::now(), r)));
            return None;
        }
        report
    }

    fn owed_by_vanished(&mut self, uid: &str) -> Option<Report> {
        let tracked = self.jobs.get(uid)?;
        let meta = &tracked.meta;
        if meta.replaced || meta.reported.is_some() || rank(tracked.emitted) == 2 {
            return None;
        }
        if meta.cancelled.is_some() {
            return self.due(uid, false); // cancelled, and gone before its event went out
        }
        // Whoever reported it left a record under its name: a claimed outcome became one (the
        // apiserver's delete event for an object that stops matching the selector carries its
        // previous state, without the record's marks), and a Job deleted before its claim got
        // one created by the reporter that told its outcome (found in a chaos run: a takeover
        // repeated the outcomes of Jobs someone deleted at once). The executor looks first.
        let unless_recorded = true;
        let mut report = if self.classify(uid).is_some_and(|o| o.state.is_terminal()) {
            // It finished before it went: its terminal event, not `lost`.
            self.due(uid, false)?
        } else {
            let tracked = self.jobs.get_mut(uid)?;
            tracked.emitted = Some(JobState::Lost);
            let pods = self.pods.get(uid).map(|p| p.iter().map(|v| v.name.clone()).collect()).unwrap_or_default();
            Report {
                meta: tracked.meta.clone(),
                outcome: Outcome::new(JobState::Lost, DELETED_UNFINISHED, None),
                pods,
                occurred_at: Some(jiff::Timestamp::now().to_string()),
                exists: false,
                view: tracked.view.clone(),
                unless_recorded: false,
            }
        };
        report.unless_recorded = unless_recorded;
        Some(report)
    }

    /// Jobs that are being deleted while the worker's finalizer holds them (a namespace being
    /// deleted, say): a replica that stops lets them go.
    pub fn held_and_deleting(&self) -> Vec<(String, String)> {
        self.jobs
            .values()
            .filter(|t| t.meta.held && t.meta.deleting)
            .map(|t| (t.meta.name.clone(), t.meta.uid.clone()))
            .collect()
    }

    /// A pod was added or changed.
    pub fn apply_pod(&mut self, pod: &WatchedPod) -> Option<Report> {
        let owner = self.store_pod(pod)?;
        if self.settling.contains_key(&owner) {
            return if self.awaits_pods(&owner) { None } else { self.settle(&owner) };
        }
        if let Some(seen) = self.relisting_pods.as_mut().filter(|_| !self.jobs.contains_key(&owner)) {
            seen.insert((owner.clone(), pod.metadata.name.clone().unwrap_or_default()));
        }
        self.retime(&owner);
        self.reschedule(&owner);
        self.evaluate(&owner, true)
    }

    /// Keeps a pod's view under its Job; returns the Job's uid.
    fn store_pod(&mut self, pod: &WatchedPod) -> Option<String> {
        let owner = pod_owner(pod)?;
        let view = pod_view(pod);
        let pods = self.pods.entry(owner.clone()).or_default();
        match pods.iter_mut().find(|p| p.name == view.name) {
            Some(known) => *known = view,
            None => {
                // Exactly one more: a Job has one pod or a few, and a Vec grows by four.
                pods.reserve_exact(1);
                pods.push(view);
            }
        }
        Some(owner)
    }

    /// A pod was deleted: its last state is its Job's to know while the Job lives (an OOM kill,
    /// an exit code); a pod of an unknown Job is forgotten.
    pub fn pod_left(&mut self, pod: &WatchedPod) -> Option<Report> {
        let owner = pod_owner(pod)?;
        if self.jobs.contains_key(&owner) {
            return self.apply_pod(pod);
        }
        self.delete_pod(pod);
        None
    }

    /// Whether a known Job waits under a time limit, from it and its pods as they are now.
    fn retime(&mut self, uid: &str) {
        let pods = self.pods.get(uid).map_or(&[][..], Vec::as_slice);
        let waiting = self.jobs.get(uid).is_some_and(|t| needs_timer(&t.view, pods));
        if waiting {
            self.timed.insert(uid.to_string());
        } else {
            self.timed.remove(uid);
        }
    }

    /// A pod was deleted: forget it, unless its Job lives (its view decides the Job's outcome:
    /// an OOM kill must not be forgotten); the Job's entry goes with its last pod.
    pub fn delete_pod(&mut self, pod: &WatchedPod) {
        let (Some(owner), Some(name)) = (pod_owner(pod), pod.metadata.name.as_ref()) else { return };
        if self.jobs.contains_key(&owner) {
            return;
        }
        if let Some(pods) = self.pods.get_mut(&owner) {
            pods.retain(|p| &p.name != name);
            if pods.is_empty() {
                self.pods.remove(&owner);
            }
        }
    }

    /// The Job watch starts a full list.
    pub fn begin_job_relist(&mut self) {
        self.job_round = self.job_round.wrapping_add(1);
        self.relisting_jobs = Some(self.job_round);
    }

    /// The Job list is complete: Jobs not in it vanished while the watch was down.
    pub fn end_job_relist(&mut self) -> Vec<Report> {
        self.jobs_synced = true;
        let round = self.relisting_jobs.take().unwrap_or(self.job_round);
        let vanished: Vec<String> =
            self.jobs.iter().filter(|(_, t)| t.listed != round).map(|(uid, _)| uid.clone()).collect();
        // A vanished Job whose name now belongs to another Job was replaced, not lost.
        let names: HashSet<String> =
            vanished.iter().filter_map(|uid| Some(self.jobs.get(uid)?.meta.name.clone())).collect();
        let taken: HashSet<String> = self
            .jobs
            .values()
            .filter(|t| t.listed == round && names.contains(&t.meta.name))
            .map(|t| t.meta.name.clone())
            .collect();
        for uid in &vanished {
            if let Some(t) = self.jobs.get_mut(uid) {
                t.meta.replaced |= taken.contains(&t.meta.name);
            }
        }
        let mut reports: Vec<Report> = vanished
            .iter()
            .filter_map(|uid| {
                let r = self.gone(uid);
                self.forget(uid);
                r
            })
            .collect();
        reports.extend(self.evaluate_all());
        reports
    }

    /// The pod watch starts a full list.
    pub fn begin_pod_relist(&mut self) {
        self.relisting_pods = Some(HashSet::new());
    }

    /// The pod list is complete.
    pub fn end_pod_relist(&mut self) -> Vec<Report> {
        self.pods_synced = true;
        if let Some(seen) = self.relisting_pods.take() {
            // Pods of unknown Jobs that the list no longer has are gone (their deletes were
            // missed); a known Job keeps its views until it goes itself.
            let jobs = &self.jobs;
            self.pods.retain(|owner, pods| {
                if !jobs.contains_key(owner) {
                    pods.retain(|p| seen.contains(&(owner.clone(), p.name.clone())));
                }
                !pods.is_empty()
            });
        }
        self.evaluate_all()
    }

    fn evaluate_all(&mut self) -> Vec<Report> {
        let uids: Vec<String> = self.jobs.keys().cloned().collect();
        uids.iter().filter_map(|uid| self.evaluate(uid, true)).collect()
    }

    /// Classifies one Job; returns a report when it reached a state not yet emitted and this
    /// replica reports.
    fn evaluate(&mut self, uid: &str, exists: bool) -> Option<Report> {
        if self.paused || self.settling.contains_key(uid) {
            return None;
        }
        self.due(uid, exists)
    }

    /// The report a Job owes now, if any, whoever reports.
    fn due(&mut self, uid: &str, exists: bool) -> Option<Report> {
        if !self.synced() {
            return None;
        }
        let tracked = self.jobs.get_mut(uid)?;
        if tracked.meta.replaced || tracked.meta.fingerprint.is_empty() {
            return None; // replaced: never reported; no fingerprint: a cancel tombstone
        }
        if let Some(why) = &tracked.meta.cancelled {
            // The cancel handler marked it; its event is published here, once.
            if tracked.meta.reported.is_some() || rank(tracked.emitted) == 2 {
                return None;
            }
            tracked.emitted = Some(JobState::Cancelled);
            return Some(Report {
                meta: tracked.meta.clone(),
                outcome: Outcome::new(JobState::Cancelled, why.clone(), None),
                pods: Vec::new(),
                occurred_at: None,
                exists,
                view: tracked.view.clone(),
                unless_recorded: false,
            });
        }
        let mut outcome = self.classify(uid)?;
        let pods: Vec<PodView> = self.pods.get(uid).cloned().unwrap_or_default();
        let tracked = self.jobs.get_mut(uid)?;
        if tracked.meta.deleting && !outcome.state.is_terminal() {
            // Someone else deletes it (its pods first) before it finished.
            outcome = Outcome::new(JobState::Lost, DELETED_UNFINISHED, None);
        }
        if outcome.state == JobState::Submitted || rank(Some(outcome.state)) <= rank(tracked.emitted) {
            return None;
        }
        tracked.emitted = Some(outcome.state);
        let mut sorted = pods;
        sorted.sort_by(|a, b| a.created.cmp(&b.created));
        let occurred_at = if outcome.state.is_terminal() {
            sorted
                .iter()
                .rev()
                .flat_map(|p| p.terminations.iter())
                .filter_map(|t| t.finished_at.clone())
                .max()
                .or_else(|| tracked.view.finished_at.clone())
        } else {
            None
        };
        Some(Report {
            meta: tracked.meta.clone(),
            outcome,
            pods: sorted.into_iter().map(|p| p.name).collect(),
            occurred_at,
            exists,
            view: tracked.view.clone(),
            unless_recorded: false,
        })
    }
}

#[cfg(test)]
#[path = "state_tests.rs"]
mod tests;
