//! Outcome classification: what a Job and its pods mean for Galaxy. Pure; fed by the watch.

use super::state::JobState;

/// What the worker knows about one container's end.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Termination {
    /// Exit code.
    pub exit_code: i32,
    /// Kubelet reason (`OOMKilled`, `Error`, `Completed`, ...).
    pub reason: Option<String>,
    /// Kubelet message.
    pub message: Option<String>,
    /// When the container ended (RFC 3339).
    pub finished_at: Option<String>,
}

/// The parts of a pod that decide the outcome.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PodView {
    /// Pod name.
    pub name: String,
    /// Pod phase.
    pub phase: PodPhase,
    /// Terminated containers.
    pub terminations: Vec<Termination>,
    /// Creation time, for ordering (RFC 3339 sorts lexically).
    pub created: String,
    /// When the pod started on its node.
    pub started_at: Option<jiff::Timestamp>,
    /// What only a pod in trouble has; boxed, since most pods have none of it (the tracker
    /// keeps a view of every pod of every Job).
    pub trouble: Option<Box<PodTrouble>>,
}

/// The parts of a pod that only a pod in trouble has.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PodTrouble {
    /// Pod-level reason (e.g. `Evicted`).
    pub reason: Option<String>,
    /// Pod-level message.
    pub message: Option<String>,
    /// A container waiting on its image: (reason, message, image); reasons in [`PULL_FAILURES`].
    pub pull_failure: Option<(String, String, String)>,
    /// A container that cannot be created or started: (reason, message); reasons in
    /// [`START_FAILURES`].
    pub start_failure: Option<(String, String)>,
    /// `PodScheduled=False/Unschedulable`: since when, and the scheduler's message.
    pub unschedulable: Option<(jiff::Timestamp, String)>,
    /// Why the pod was disrupted (`DisruptionTarget` condition or reason `Evicted`/`Preempting`).
    pub disrupted: Option<String>,
}

static NO_TROUBLE: PodTrouble = PodTrouble {
    reason: None,
    message: None,
    pull_failure: None,
    start_failure: None,
    unschedulable: None,
    disrupted: None,
};

impl PodView {
    /// Its trouble (none: every part empty).
    pub fn trouble(&self) -> &PodTrouble {
        self.trouble.as_deref().unwrap_or(&NO_TROUBLE)
    }

    /// Its trouble, to fill in.
    pub fn trouble_mut(&mut self) -> &mut PodTrouble {
        self.trouble.get_or_insert_with(Box::default)
    }
}

impl PodTrouble {
    /// Boxed when there is any, for [`PodView::trouble`].
    pub fn boxed(self) -> Option<Box<PodTrouble>> {
        (self != PodTrouble::default()).then(|| Box::new(self))
    }
}

/// A pod's phase (one byte: the tracker keeps one per pod of every Job).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PodPhase {
    /// Not running yet (also a pod without a status).
    #[default]
    Pending,
    /// Bound and started.
    Running,
    /// Every container ended with 0.
    Succeeded,
    /// A container ended otherwise, or the pod was taken away.
    Failed,
    /// The kubelet's state is unknown (or a phase this worker does not know).
    Unknown,
}

impl PodPhase {
    /// The phase Kubernetes names `phase` (`None`: a pod without a status yet, `Pending`).
    pub fn parse(phase: Option<&str>) -> Self {
        match phase {
            None | Some("Pending") => PodPhase::Pending,
            Some("Running") => PodPhase::Running,
            Some("Succeeded") => PodPhase::Succeeded,
            Some("Failed") => PodPhase::Failed,
            Some(_) => PodPhase::Unknown,
        }
    }

    /// Kubernetes' name for it.
    pub fn as_str(self) -> &'static str {
        match self {
            PodPhase::Pending => "Pending",
            PodPhase::Running => "Running",
            PodPhase::Succeeded => "Succeeded",
            PodPhase::Failed => "Failed",
            PodPhase::Unknown => "Unknown",
        }
    }
}

/// Container waiting reasons that mean its image does not come.
pub const PULL_FAILURES: &[&str] = &["ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull"];

/// Container waiting reasons that mean the container cannot be created or started (a missing
/// ConfigMap, Secret or key; a runtime refusal), whatever its image.
pub const START_FAILURES: &[&str] =
    &["CreateContainerConfigError", "CreateContainerError", "PreStartHookError", "RunContainerError"];

/// Time limits that turn a waiting pod into a failure.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// How long a pod may stay unschedulable (`None`: forever, as Galaxy's default).
    pub unschedulable_after: Option<std::time::Duration>,
    /// How long image pull errors are tolerated (`InvalidImageName` fails at once).
    pub image_pull_grace: std::time::Duration,
    /// How long a Job may go without a pod (its pods refused by a quota, a LimitRange or an
    /// admission plugin), or a container may fail to be created ([`START_FAILURES`]).
    pub pod_start_grace: std::time::Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            unschedulable_after: None,
            image_pull_grace: std::time::Duration::from_secs(120),
            pod_start_grace: std::time::Duration::from_secs(120),
        }
    }
}

/// Whether `limit` has passed from `since` to `now`.
pub fn older_than(since: jiff::Timestamp, now: jiff::Timestamp, limit: std::time::Duration) -> bool {
    std::time::Duration::try_from(now.duration_since(since)).is_ok_and(|d| d >= limit)
}

/// The parts of a Job that decide the outcome.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct JobView {
    /// Condition `Complete=True`.
    pub complete: bool,
    /// Condition `Failed=True`, with its reason and message.
    pub failed: Option<(String, String)>,
    /// The Job's pod retrial budget.
    pub backoff_limit: i32,
    /// When the Job finished, if it did.
    pub finished_at: Option<String>,
    /// The walltime given to the Job.
    pub active_deadline_seconds: Option<i64>,
    /// When the Job was created.
    pub created: Option<jiff::Timestamp>,
    /// Its pods that are pending or running, by the Job's own count (a pod the pod watch
    /// has not shown yet still counts here).
    pub active: i32,
    /// `parallelism: 0`: it makes no pods (stopped, or a cancel tombstone).
    pub stopped: bool,
    /// How many of its pods failed, by the Job's own count.
    pub failed_pods: i32,
}

/// What the worker remembers about one Job object: its identity and the marks it carries.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct JobMeta {
    /// Job name.
    pub name: String,
    /// Object uid (a replaced Job has the same name and a new uid).
    pub uid: String,
    /// Galaxy job id.
    pub job_id: String,
    /// Request attempt.
    pub attempt: Option<u32>,
    /// Request fingerprint (empty on a cancel tombstone).
    pub fingerprint: String,
    /// The Galaxy job handler its events are routed to, when the request named one.
    pub handler: Option<String>,
    /// Set when a cancel was received for it: why.
    pub cancelled: Option<String>,
    /// Set when it is being replaced by a newer request.
    pub replaced: bool,
    /// Terminal state already confirmed by the broker.
    pub reported: Option<JobState>,
    /// Terminal state the reporter claimed on the Job before publishing it.
    pub claimed: Option<JobState>,
    /// The object's resourceVersion as seen (writes that must not pass a change name it).
    pub resource_version: String,
    /// Whether Kubernetes is deleting it.
    pub deleting: bool,
    /// Whether it carries the worker's finalizer ([`FINALIZER`](crate::keys::FINALIZER)): from
    /// the claim of its outcome until the event is out, a deletion waits.
    pub held: bool,
    /// How often it was resubmitted after preemption.
    pub resubmissions: u32,
    /// The resubmission the reporter marked it for, when it is due for one.
    pub resubmit_due: Option<u32>,
    /// The exit code recorded with the reported state.
    pub recorded_exit_code: Option<i32>,
    /// The reason recorded with the reported state.
    pub recorded_reason: Option<String>,
    /// Whether it is an interactive Job with a Service and an Ingress (removed once its
    /// outcome is out).
    pub routed: bool,
}

/// The classified state of a Job.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// State to report.
    pub state: JobState,
    /// Human-readable reason.
    pub reason: String,
    /// Exit code, when known.
    pub exit_code: Option<i32>,
    /// The Job's pods never started and would wait forever (or start after Galaxy heard of
    /// the failure): `unschedulable`, `image_pull_failed`, and `failed` for a Job that made no
    /// pod or a container that could not be created.
    pub never_started: bool,
}

impl Outcome {
    /// An outcome in `state` for `reason`.
    pub fn new(state: JobState, reason: impl Into<String>, exit_code: Option<i32>) -> Self {
        Outcome { state, reason: reason.into(), exit_code, never_started: false }
    }

    fn never_started(self) -> Self {
        Outcome { never_started: true, ..self }
    }
}

/// Classifies a Job and its pods at `now`. `Submitted` means nothing has run yet.
///
/// Precedence: an OOM kill anywhere wins at once (retrying with the same limit is pointless);
/// then the walltime and the Job's own verdict; then pods that cannot start (image, placement)
/// or were taken away (eviction, node loss); then failed pods beyond the retrials; then
/// running pods.
pub fn classify(job: &JobView, pods: &[PodView], now: jiff::Timestamp, limits: &Limits) -> Outcome {
    let mut pods: Vec<&PodView> = pods.iter().collect();
    pods.sort_by(|a, b| a.created.cmp(&b.created));

    for pod in &pods {
        if let Some(t) = pod.terminations.iter().find(|t| t.reason.as_deref() == Some("OOMKilled")) {
            return Outcome::new(
                JobState::OomKilled,
                format!("pod {} was killed for exceeding its memory limit (OOMKilled)", pod.name),
                Some(t.exit_code),
            );
        }
    }
    let last_failure = pods
        .iter()
        .rev()
        .find(|p| p.phase == PodPhase::Failed)
        .map(|p| (p, p.terminations.iter().find(|t| t.exit_code != 0).or(p.terminations.first())));
    let failed_pods = pods.iter().filter(|p| p.phase == PodPhase::Failed).count();

    if job.complete {
        return Outcome::new(JobState::Succeeded, "the job completed successfully", Some(0));
    }
    if job.failed.as_ref().is_some_and(|(reason, _)| reason == "DeadlineExceeded") {
        let limit = job.active_deadline_seconds.map(|s| format!(" of {s} s")).unwrap_or_default();
        return Outcome::new(
            JobState::WalltimeExceeded,
            format!("the job ran past its walltime{limit} (DeadlineExceeded)"),
            None,
        );
    }
    if let Some(outcome) = cannot_start(job, &pods, now, limits) {
        return outcome;
    }
    if let Some(pod) = pods.iter().rev().find(|p| p.trouble().disrupted.is_some() && p.phase == PodPhase::Failed) {
        let why = pod.trouble().disrupted.clone().unwrap_or_default();
        return Outcome::new(JobState::Preempted, format!("pod {} was evicted or preempted: {why}", pod.name), None);
    }
    if let Some(pod) = pods.iter().rev().find(|p| {
        p.phase == PodPhase::Failed && matches!(p.trouble().reason.as_deref(), Some("NodeLost" | "NodeRestarted"))
    }) {
        let why = pod.trouble().message.clone().unwrap_or_default();
        return Outcome::new(JobState::NodeLost, format!("the node running pod {} was lost: {why}", pod.name), None);
    }
    if let Some((reason, message)) = &job.failed {
        let exit = last_failure.and_then(|(_, t)| t.map(|t| t.exit_code));
        return Outcome::new(JobState::Failed, failure_text(reason, message, failed_pods, last_failure), exit);
    }
    if failed_pods as i64 > i64::from(job.backoff_limit) {
        let exit = last_failure.and_then(|(_, t)| t.map(|t| t.exit_code));
        return Outcome::new(
            JobState::Failed,
            failure_text("BackoffLimitExceeded", "", failed_pods, last_failure),
            exit,
        );
    }
    if pods.iter().any(|p| matches!(p.phase, PodPhase::Running | PodPhase::Succeeded | PodPhase::Failed)) {
        let reason = match pods.iter().find(|p| p.phase == PodPhase::Running) {
            Some(p) => format!("pod {} is running", p.name),
            None => "a pod has started".to_string(),
        };
        return Outcome::new(JobState::Running, reason, None);
    }
    Outcome::new(JobState::Submitted, "waiting for a pod to start", None)
}

/// Why a Job deleted by someone else before it finished is `lost`.
pub const DELETED_UNFINISHED: &str = "the Kubernetes Job was deleted before it finished, and not by a cancel";

/// A Job's state as Galaxy should hear it: a cancel mark wins, then a terminal state already
/// reported or claimed (the Job may have lost its pods since), then what the Job and its
/// pods say now — `lost` for one someone is deleting before it finished.
pub fn status(meta: &JobMeta, job: &JobView, pods: &[PodView], now: jiff::Timestamp, limits: &Limits) -> Outcome {
    if let Some(why) = &meta.cancelled {
        return Outcome::new(JobState::Cancelled, why.clone(), None);
    }
    let outcome = classify(job, pods, now, limits);
    match meta.reported.or(meta.claimed) {
        Some(state) => {
            let same = outcome.state == state;
            let reason = meta.recorded_reason.clone().unwrap_or_else(|| {
                if same {
                    outcome.reason.clone()
                } else {
                    format!("the job ended as {}", state.as_str())
                }
            });
            let exit_code = meta.recorded_exit_code.or(if same { outcome.exit_code } else { None });
            Outcome { state, reason, exit_code, ..outcome }
        }
        None if meta.deleting && !outcome.state.is_terminal() => Outcome::new(JobState::Lost, DELETED_UNFINISHED, None),
        None => outcome,
    }
}

/// Pods that cannot start: none made at all (refused at creation), an image that will not
/// pull, a container that cannot be created, or no node that will take the pod.
fn cannot_start(job: &JobView, pods: &[&PodView], now: jiff::Timestamp, limits: &Limits) -> Option<Outcome> {
    if pods.is_empty() {
        let grace = limits.pod_start_grace;
        return (waits_for_a_pod(job, &[]) && older_than(job.created?, now, grace)).then(|| {
            Outcome::new(JobState::Failed, format!("no pod was created for the Job in {} s", grace.as_secs()), None)
                .never_started()
        });
    }
    let pod = pods.iter().rev().find(|p| p.phase == PodPhase::Pending)?;
    let since = pod.started_at.unwrap_or(now);
    if let Some((reason, message, image)) = &pod.trouble().pull_failure {
        if reason == "InvalidImageName" || older_than(since, now, limits.image_pull_grace) {
            return Some(
                Outcome::new(
                    JobState::ImagePullFailed,
                    format!("image {image:?} could not be pulled ({reason}): {message}"),
                    None,
                )
                .never_started(),
            );
        }
    }
    if let Some((reason, message)) = &pod.trouble().start_failure {
        if older_than(since, now, limits.pod_start_grace) {
            let text = format!("pod {} could not start its container ({reason}): {message}", pod.name);
            return Some(Outcome::new(JobState::Failed, text, None).never_started());
        }
    }
    if let (Some((since, message)), Some(limit)) = (&pod.trouble().unschedulable, limits.unschedulable_after) {
        if older_than(*since, now, limit) {
            return Some(
                Outcome::new(
                    JobState::Unschedulable,
                    format!("pod {} could not be scheduled for {} s: {message}", pod.name, limit.as_secs()),
                    None,
                )
                .never_started(),
            );
        }
    }
    None
}

/// Whether a Job is still to make its first pod (the job controller may be refused): none
/// is known, and the Job counts none.
fn waits_for_a_pod(job: &JobView, pods: &[PodView]) -> bool {
    pods.is_empty() && job.active == 0 && job.failed_pods == 0 && !job.complete && job.failed.is_none() && !job.stopped
}

/// Whether a pod is waiting for something a time limit applies to.
pub fn has_timer(pod: &PodView) -> bool {
    pod.phase == PodPhase::Pending
        && (pod.trouble().pull_failure.is_some()
            || pod.trouble().start_failure.is_some()
            || pod.trouble().unschedulable.is_some())
}

/// Whether a Job is waiting for something a time limit applies to: its first pod, or a pod
/// that [`has_timer`].
pub fn needs_timer(job: &JobView, pods: &[PodView]) -> bool {
    (job.created.is_some() && waits_for_a_pod(job, pods)) || pods.iter().any(has_timer)
}

/// A Job that made no pod, with what the job controller said when the pod was refused (its
/// latest `FailedCreate` event: a quota, a LimitRange, an admission plugin), when there is one.
pub fn with_create_error(outcome: Outcome, message: Option<&str>) -> Outcome {
    match message {
        Some(message) => Outcome { reason: format!("{} (FailedCreate): {message}", outcome.reason), ..outcome },
        None => outcome,
    }
}

fn failure_text(
    reason: &str,
    message: &str,
    failed_pods: usize,
    last: Option<(&&PodView, Option<&Termination>)>,
) -> String {
    let mut text = match reason {
        "BackoffLimitExceeded" => format!("the job failed after {failed_pods} failed pod(s) (retrials exhausted)"),
        "DeadlineExceeded" => "the job exceeded its walltime (activeDeadlineSeconds)".to_string(),
        other if message.is_empty() => format!("the job failed: {other}"),
        other => format!("the job failed: {other}: {message}"),
    };
    if let Some((pod, term)) = last {
        match term {
            Some(t) => text.push_str(&format!(
                "; last pod {} exited with code {}{}",
                pod.name,
                t.exit_code,
                t.reason.as_deref().map(|r| format!(" ({r})")).unwrap_or_default()
            )),
            None => {
                if let Some(r) = &pod.trouble().reason {
                    text.push_str(&format!("; last pod {} failed: {r}", pod.name));
                }
            }
        }
    }
    text
}

#[cfg(test)]
#[path = "outcome_tests.rs"]
mod tests;
