//! Outcome classification: what a Job and its pods mean for Galaxy. Pure; fed by the watch.

use super::event::JobState;

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
    /// Pod phase (`Pending`, `Running`, `Succeeded`, `Failed`).
    pub phase: String,
    /// Terminated containers.
    pub terminations: Vec<Termination>,
    /// Pod-level reason (e.g. `Evicted`) and message.
    pub reason: Option<String>,
    /// Pod-level message.
    pub message: Option<String>,
    /// Creation time, for ordering (RFC 3339 sorts lexically).
    pub created: String,
    /// When the pod started on its node.
    pub started_at: Option<jiff::Timestamp>,
    /// A container waiting on its image: (reason, message, image).
    pub pull_failure: Option<(String, String, String)>,
    /// `PodScheduled=False/Unschedulable`: since when, and the scheduler's message.
    pub unschedulable: Option<(jiff::Timestamp, String)>,
    /// Why the pod was disrupted (`DisruptionTarget` condition or reason `Evicted`/`Preempting`).
    pub disrupted: Option<String>,
}

/// Time limits that turn a waiting pod into a failure.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// How long a pod may stay unschedulable (`None`: forever, as Galaxy's default).
    pub unschedulable_after: Option<std::time::Duration>,
    /// How long image pull errors are tolerated (`InvalidImageName` fails at once).
    pub image_pull_grace: std::time::Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { unschedulable_after: None, image_pull_grace: std::time::Duration::from_secs(120) }
    }
}

fn older_than(since: jiff::Timestamp, now: jiff::Timestamp, limit: std::time::Duration) -> bool {
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
}

impl Outcome {
    fn new(state: JobState, reason: impl Into<String>, exit_code: Option<i32>) -> Self {
        Outcome { state, reason: reason.into(), exit_code }
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
        .find(|p| p.phase == "Failed")
        .map(|p| (p, p.terminations.iter().find(|t| t.exit_code != 0).or(p.terminations.first())));
    let failed_pods = pods.iter().filter(|p| p.phase == "Failed").count();

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
    if let Some(outcome) = cannot_start(&pods, now, limits) {
        return outcome;
    }
    if let Some(pod) = pods.iter().rev().find(|p| p.disrupted.is_some() && p.phase == "Failed") {
        let why = pod.disrupted.clone().unwrap_or_default();
        return Outcome::new(JobState::Preempted, format!("pod {} was evicted or preempted: {why}", pod.name), None);
    }
    if let Some(pod) = pods
        .iter()
        .rev()
        .find(|p| p.phase == "Failed" && matches!(p.reason.as_deref(), Some("NodeLost" | "NodeRestarted")))
    {
        let why = pod.message.clone().unwrap_or_default();
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
    if pods.iter().any(|p| matches!(p.phase.as_str(), "Running" | "Succeeded" | "Failed")) {
        let reason = match pods.iter().find(|p| p.phase == "Running") {
            Some(p) => format!("pod {} is running", p.name),
            None => "a pod has started".to_string(),
        };
        return Outcome::new(JobState::Running, reason, None);
    }
    Outcome::new(JobState::Submitted, "waiting for a pod to start", None)
}

/// A pod that cannot start: an image that will not pull, or no node that will take it.
fn cannot_start(pods: &[&PodView], now: jiff::Timestamp, limits: &Limits) -> Option<Outcome> {
    let pod = pods.iter().rev().find(|p| p.phase == "Pending")?;
    if let Some((reason, message, image)) = &pod.pull_failure {
        let since = pod.started_at.unwrap_or(now);
        if reason == "InvalidImageName" || older_than(since, now, limits.image_pull_grace) {
            return Some(Outcome::new(
                JobState::ImagePullFailed,
                format!("image {image:?} could not be pulled ({reason}): {message}"),
                None,
            ));
        }
    }
    if let (Some((since, message)), Some(limit)) = (&pod.unschedulable, limits.unschedulable_after) {
        if older_than(*since, now, limit) {
            return Some(Outcome::new(
                JobState::Unschedulable,
                format!("pod {} could not be scheduled for {} s: {message}", pod.name, limit.as_secs()),
                None,
            ));
        }
    }
    None
}

/// Whether a pod is waiting for something a time limit applies to.
pub fn has_timer(pod: &PodView) -> bool {
    pod.phase == "Pending" && (pod.pull_failure.is_some() || pod.unschedulable.is_some())
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
                if let Some(r) = &pod.reason {
                    text.push_str(&format!("; last pod {} failed: {r}", pod.name));
                }
            }
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> jiff::Timestamp {
        "2026-01-01T00:10:00Z".parse().unwrap()
    }

    fn pod(name: &str, phase: &str, exit: Option<(i32, &str)>) -> PodView {
        PodView {
            name: name.into(),
            phase: phase.into(),
            terminations: exit
                .map(|(code, reason)| {
                    vec![Termination { exit_code: code, reason: Some(reason.into()), ..Termination::default() }]
                })
                .unwrap_or_default(),
            created: name.into(),
            ..PodView::default()
        }
    }

    #[test]
    fn pending_then_running_then_succeeded() {
        let job = JobView::default();
        assert_eq!(classify(&job, &[], now(), &Limits::default()).state, JobState::Submitted);
        assert_eq!(classify(&job, &[pod("a", "Pending", None)], now(), &Limits::default()).state, JobState::Submitted);
        assert_eq!(classify(&job, &[pod("a", "Running", None)], now(), &Limits::default()).state, JobState::Running);
        let done = JobView { complete: true, ..job };
        let o = classify(&done, &[pod("a", "Succeeded", Some((0, "Completed")))], now(), &Limits::default());
        assert_eq!((o.state, o.exit_code), (JobState::Succeeded, Some(0)));
    }

    #[test]
    fn oom_wins_at_once_even_with_retrials_left() {
        let job = JobView { backoff_limit: 3, ..JobView::default() };
        let o = classify(&job, &[pod("a", "Failed", Some((137, "OOMKilled")))], now(), &Limits::default());
        assert_eq!((o.state, o.exit_code), (JobState::OomKilled, Some(137)));
    }

    #[test]
    fn failures_within_retrials_keep_running() {
        let job = JobView { backoff_limit: 2, ..JobView::default() };
        let pods = [pod("a", "Failed", Some((3, "Error"))), pod("b", "Pending", None)];
        assert_eq!(classify(&job, &pods, now(), &Limits::default()).state, JobState::Running);
    }

    #[test]
    fn failures_beyond_retrials_fail_with_exit_code() {
        let job = JobView { backoff_limit: 1, ..JobView::default() };
        let pods = [pod("a", "Failed", Some((3, "Error"))), pod("b", "Failed", Some((3, "Error")))];
        let o = classify(&job, &pods, now(), &Limits::default());
        assert_eq!((o.state, o.exit_code), (JobState::Failed, Some(3)));
        assert!(o.reason.contains("2 failed pod"), "{}", o.reason);
        assert!(o.reason.contains("exited with code 3"), "{}", o.reason);
    }

    #[test]
    fn deadline_exceeded_is_walltime_exceeded() {
        let job = JobView {
            failed: Some(("DeadlineExceeded".into(), "".into())),
            active_deadline_seconds: Some(60),
            ..JobView::default()
        };
        let o = classify(&job, &[pod("a", "Failed", Some((137, "Error")))], now(), &Limits::default());
        assert_eq!(o.state, JobState::WalltimeExceeded);
        assert!(o.reason.contains("60 s"), "{}", o.reason);
    }

    fn at(s: &str) -> jiff::Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn image_pull_errors_fail_after_the_grace_period_and_invalid_names_at_once() {
        let limits = Limits { image_pull_grace: std::time::Duration::from_secs(120), ..Limits::default() };
        let mut p = pod("a", "Pending", None);
        p.started_at = Some(at("2026-01-01T00:09:00Z"));
        p.pull_failure = Some(("ImagePullBackOff".into(), "Back-off pulling".into(), "x/does-not-exist:1".into()));
        assert_eq!(classify(&JobView::default(), &[p.clone()], now(), &limits).state, JobState::Submitted);
        p.started_at = Some(at("2026-01-01T00:07:00Z"));
        let o = classify(&JobView::default(), &[p.clone()], now(), &limits);
        assert_eq!(o.state, JobState::ImagePullFailed);
        assert!(o.reason.contains("x/does-not-exist:1") && o.reason.contains("Back-off"), "{}", o.reason);
        p.started_at = Some(now());
        p.pull_failure = Some(("InvalidImageName".into(), "bad".into(), "BAD".into()));
        assert_eq!(classify(&JobView::default(), &[p], now(), &limits).state, JobState::ImagePullFailed);
    }

    #[test]
    fn unschedulable_only_with_a_limit_and_after_it() {
        let mut p = pod("a", "Pending", None);
        p.unschedulable = Some((at("2026-01-01T00:09:30Z"), "0/1 nodes are available".into()));
        assert_eq!(classify(&JobView::default(), &[p.clone()], now(), &Limits::default()).state, JobState::Submitted);
        let limits = Limits { unschedulable_after: Some(std::time::Duration::from_secs(20)), ..Limits::default() };
        let o = classify(&JobView::default(), &[p.clone()], now(), &limits);
        assert_eq!(o.state, JobState::Unschedulable);
        assert!(o.reason.contains("0/1 nodes are available"), "{}", o.reason);
        let strict = Limits { unschedulable_after: Some(std::time::Duration::from_secs(60)), ..Limits::default() };
        assert_eq!(classify(&JobView::default(), &[p], now(), &strict).state, JobState::Submitted);
    }

    #[test]
    fn evictions_and_lost_nodes_are_not_tool_failures() {
        let job = JobView { backoff_limit: 0, ..JobView::default() };
        let mut evicted = pod("a", "Failed", None);
        evicted.reason = Some("Evicted".into());
        evicted.disrupted = Some("The node was low on resource: memory.".into());
        assert_eq!(classify(&job, &[evicted], now(), &Limits::default()).state, JobState::Preempted);
        let mut lost = pod("b", "Failed", None);
        lost.reason = Some("NodeLost".into());
        assert_eq!(classify(&job, &[lost], now(), &Limits::default()).state, JobState::NodeLost);
    }
}
