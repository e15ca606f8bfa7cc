//! What the worker knows about its Jobs, built only from watch events, and the reports it
//! owes Galaxy. Pure: fed Job and Pod objects, it returns [`Report`]s; tests drive it directly.

use std::collections::{HashMap, HashSet};

use crate::{
    domain::{
        event::JobState,
        outcome::{classify, has_timer, JobView, Limits, Outcome, PodView},
    },
    k8s::{
        view::{job_meta, job_view, pod_owner, pod_view, JobMeta},
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
}

struct Tracked {
    meta: JobMeta,
    view: JobView,
    /// Highest state already handed out for publishing.
    emitted: Option<JobState>,
}

fn rank(state: Option<JobState>) -> u8 {
    match state {
        None | Some(JobState::Submitted) => 0,
        Some(JobState::Running) => 1,
        Some(_) => 2,
    }
}

/// How long a `lost` seen while not reporting is kept for the next reporting term.
const DEPARTED_MEMORY: std::time::Duration = std::time::Duration::from_secs(120);

/// Jobs and pods by Job uid.
#[derive(Default)]
pub struct TrackerState {
    jobs: HashMap<String, Tracked>,
    /// Pods by Job uid. A Vec, not a map: a Job has one pod or a few, and a B-tree node
    /// would cost kilobytes per Job.
    pods: HashMap<String, Vec<PodView>>,
    jobs_synced: bool,
    pods_synced: bool,
    relisting_jobs: Option<HashSet<String>>,
    relisting_pods: Option<HashSet<(String, String)>>,
    /// Another replica reports; this one only keeps its state current.
    paused: bool,
    /// `lost` reports observed while paused, handed out when reporting starts.
    departed: Vec<(std::time::Instant, Report)>,
    /// Jobs with a pod waiting under a time limit (unschedulable, image pull).
    timed: HashSet<String>,
    /// Time limits for waiting pods.
    limits: Limits,
    /// The clock (a fixed one in tests).
    clock: Option<fn() -> jiff::Timestamp>,
}

impl TrackerState {
    /// A state that keeps track but reports nothing until [`TrackerState::set_reporting`].
    pub fn paused(limits: Limits) -> Self {
        TrackerState { paused: true, limits, ..TrackerState::default() }
    }

    /// Uses these time limits and this clock (tests).
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
        Some(classify(&tracked.view, &pods, self.now(), &self.limits))
    }

    /// Re-evaluates the Jobs whose pods wait under a time limit (called every few seconds).
    pub fn tick(&mut self) -> Vec<Report> {
        let timed: Vec<String> = self.timed.iter().cloned().collect();
        timed.iter().filter_map(|uid| self.evaluate(uid, true)).collect()
    }

    /// Starts or stops reporting. Starting forgets what was emitted in memory (another
    /// replica may have reported in between) and returns everything now due, so a takeover
    /// repeats at most the events in flight at the handover (same event ids).
    pub fn set_reporting(&mut self, on: bool) -> Vec<Report> {
        let was_paused = std::mem::replace(&mut self.paused, !on);
        if !on || !was_paused {
            return Vec::new();
        }
        for tracked in self.jobs.values_mut() {
            tracked.emitted = tracked.meta.reported;
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
        if let Some(seen) = self.relisting_jobs.as_mut() {
            seen.insert(meta.uid.clone());
        }
        let uid = meta.uid.clone();
        let view = job_view(job);
        let entry = self.jobs.entry(uid.clone()).or_insert_with(|| Tracked {
            // A terminal state recorded on the object was already confirmed by the broker.
            emitted: meta.reported,
            meta: meta.clone(),
            view: view.clone(),
        });
        entry.meta = meta;
        entry.view = view;
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
                self.gone(&uid)
            }
            None => None,
        };
        self.jobs.remove(&uid);
        self.pods.remove(&uid);
        self.timed.remove(&uid);
        report
    }

    /// What a vanished Job still owes: its terminal event, or `lost`.
    fn gone(&mut self, uid: &str) -> Option<Report> {
        let tracked = self.jobs.get(uid)?;
        if tracked.meta.cancelled.is_some() || tracked.meta.replaced || rank(tracked.emitted) == 2 {
            return None;
        }
        if self.classify(uid).is_some_and(|o| o.state.is_terminal()) {
            // It finished before it went: its terminal event, not `lost` (the reporter's job).
            return self.evaluate(uid, false);
        }
        let tracked = self.jobs.get_mut(uid)?;
        tracked.emitted = Some(JobState::Lost);
        let pods = self.pods.get(uid).map(|p| p.iter().map(|v| v.name.clone()).collect()).unwrap_or_default();
        let report = Some(Report {
            meta: tracked.meta.clone(),
            outcome: Outcome {
                state: JobState::Lost,
                reason: "the Kubernetes Job was deleted before it finished, and not by a cancel".into(),
                exit_code: None,
            },
            pods,
            occurred_at: Some(jiff::Timestamp::now().to_string()),
            exists: false,
            view: tracked.view.clone(),
        });
        if self.paused {
            self.departed.retain(|(at, _)| at.elapsed() < DEPARTED_MEMORY);
            self.departed.extend(report.map(|r| (std::time::Instant::now(), r)));
            return None;
        }
        report
    }

    /// A pod was added or changed.
    pub fn apply_pod(&mut self, pod: &WatchedPod) -> Option<Report> {
        let owner = pod_owner(pod)?;
        let view = pod_view(pod);
        if let Some(seen) = self.relisting_pods.as_mut() {
            seen.insert((owner.clone(), view.name.clone()));
        }
        let pods = self.pods.entry(owner.clone()).or_default();
        match pods.iter_mut().find(|p| p.name == view.name) {
            Some(known) => *known = view,
            None => pods.push(view),
        }
        if pods.iter().any(has_timer) {
            self.timed.insert(owner.clone());
        } else {
            self.timed.remove(&owner);
        }
        self.evaluate(&owner, true)
    }

    /// A pod was deleted: forget it (its Job's outcome was already decided, or will be by the Job).
    pub fn delete_pod(&mut self, pod: &WatchedPod) {
        if let (Some(owner), Some(name)) = (pod_owner(pod), pod.metadata.name.as_ref()) {
            if let Some(pods) = self.pods.get_mut(&owner) {
                // Keep the view while its Job lives: an OOM kill must not be forgotten.
                if !self.jobs.contains_key(&owner) {
                    pods.retain(|p| &p.name != name);
                }
            }
        }
    }

    /// The Job watch starts a full list.
    pub fn begin_job_relist(&mut self) {
        self.relisting_jobs = Some(HashSet::new());
    }

    /// The Job list is complete: Jobs not in it vanished while the watch was down.
    pub fn end_job_relist(&mut self) -> Vec<Report> {
        self.jobs_synced = true;
        let seen = self.relisting_jobs.take().unwrap_or_default();
        let vanished: Vec<String> = self.jobs.keys().filter(|uid| !seen.contains(*uid)).cloned().collect();
        // A vanished Job whose name now belongs to another Job was replaced, not lost.
        let names_now: HashSet<String> =
            self.jobs.iter().filter(|(uid, _)| seen.contains(*uid)).map(|(_, t)| t.meta.name.clone()).collect();
        for uid in &vanished {
            if let Some(t) = self.jobs.get_mut(uid) {
                t.meta.replaced |= names_now.contains(&t.meta.name);
            }
        }
        let mut reports: Vec<Report> = vanished
            .iter()
            .filter_map(|uid| {
                let r = self.gone(uid);
                self.jobs.remove(uid);
                self.pods.remove(uid);
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
            for (owner, pods) in self.pods.iter_mut() {
                if !self.jobs.contains_key(owner) {
                    pods.retain(|p| seen.contains(&(owner.clone(), p.name.clone())));
                }
            }
        }
        self.evaluate_all()
    }

    fn evaluate_all(&mut self) -> Vec<Report> {
        let uids: Vec<String> = self.jobs.keys().cloned().collect();
        uids.iter().filter_map(|uid| self.evaluate(uid, true)).collect()
    }

    /// Classifies one Job; returns a report when it reached a state not yet emitted.
    fn evaluate(&mut self, uid: &str, exists: bool) -> Option<Report> {
        if !self.synced() || self.paused {
            return None;
        }
        let tracked = self.jobs.get_mut(uid)?;
        if tracked.meta.replaced || tracked.meta.fingerprint.is_empty() {
            return None; // replaced: never reported; no fingerprint: a cancel tombstone
        }
        if tracked.meta.cancelled.is_some() {
            if !exists || tracked.meta.deleting || tracked.emitted == Some(JobState::Cancelled) {
                return None;
            }
            tracked.emitted = Some(JobState::Cancelled);
            return Some(Report {
                meta: tracked.meta.clone(),
                outcome: Outcome { state: JobState::Cancelled, reason: "cancelled".into(), exit_code: None },
                pods: Vec::new(),
                occurred_at: None,
                exists,
                view: tracked.view.clone(),
            });
        }
        let outcome = self.classify(uid)?;
        let pods: Vec<PodView> = self.pods.get(uid).cloned().unwrap_or_default();
        let tracked = self.jobs.get_mut(uid)?;
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
        })
    }
}

#[cfg(test)]
#[path = "state_tests.rs"]
mod tests;
