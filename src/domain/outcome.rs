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

/// Classifies a Job and its pods. `Submitted` means nothing has run yet.
///
/// Precedence: an OOM kill anywhere wins at once (retrying with the same limit is pointless);
/// then the Job's own verdict; then failed pods beyond the retrials; then running pods.
pub fn classify(job: &JobView, pods: &[PodView]) -> Outcome {
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
        assert_eq!(classify(&job, &[]).state, JobState::Submitted);
        assert_eq!(classify(&job, &[pod("a", "Pending", None)]).state, JobState::Submitted);
        assert_eq!(classify(&job, &[pod("a", "Running", None)]).state, JobState::Running);
        let done = JobView { complete: true, ..job };
        let o = classify(&done, &[pod("a", "Succeeded", Some((0, "Completed")))]);
        assert_eq!((o.state, o.exit_code), (JobState::Succeeded, Some(0)));
    }

    #[test]
    fn oom_wins_at_once_even_with_retrials_left() {
        let job = JobView { backoff_limit: 3, ..JobView::default() };
        let o = classify(&job, &[pod("a", "Failed", Some((137, "OOMKilled")))]);
        assert_eq!((o.state, o.exit_code), (JobState::OomKilled, Some(137)));
    }

    #[test]
    fn failures_within_retrials_keep_running() {
        let job = JobView { backoff_limit: 2, ..JobView::default() };
        let pods = [pod("a", "Failed", Some((3, "Error"))), pod("b", "Pending", None)];
        assert_eq!(classify(&job, &pods).state, JobState::Running);
    }

    #[test]
    fn failures_beyond_retrials_fail_with_exit_code() {
        let job = JobView { backoff_limit: 1, ..JobView::default() };
        let pods = [pod("a", "Failed", Some((3, "Error"))), pod("b", "Failed", Some((3, "Error")))];
        let o = classify(&job, &pods);
        assert_eq!((o.state, o.exit_code), (JobState::Failed, Some(3)));
        assert!(o.reason.contains("2 failed pod"), "{}", o.reason);
        assert!(o.reason.contains("exited with code 3"), "{}", o.reason);
    }

    #[test]
    fn job_failed_condition_is_reported_with_its_reason() {
        let job = JobView { failed: Some(("DeadlineExceeded".into(), "".into())), ..JobView::default() };
        let o = classify(&job, &[pod("a", "Failed", Some((137, "Error")))]);
        assert_eq!(o.state, JobState::Failed);
        assert!(o.reason.contains("walltime"), "{}", o.reason);
    }
}
