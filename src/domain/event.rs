//! Result events published to Galaxy.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::naming::short_hash;

/// Schema identifier carried by every result event.
pub const EVENT_SCHEMA: &str = "k8s-job-worker/job-event/v1";

/// The state a result event reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// The Job exists (created or adopted); the request was accepted.
    Submitted,
    /// A pod of the Job is running.
    Running,
    /// The Job completed successfully.
    Succeeded,
    /// The job failed: tool error, retrials exhausted, refused or invalid request.
    Failed,
    /// A container was killed for exceeding its memory limit; resubmit with more memory.
    OomKilled,
    /// The job was cancelled on request.
    Cancelled,
    /// The Job disappeared without being cancelled or finished.
    Lost,
    /// The job ran past its walltime (`activeDeadlineSeconds`).
    WalltimeExceeded,
    /// No node could take the pod for longer than `k8s_unschedulable_walltime_limit`.
    Unschedulable,
    /// The image could not be pulled (after the grace period; invalid names at once).
    ImagePullFailed,
    /// The pod was evicted or preempted: not the tool's fault; resubmitting is reasonable.
    Preempted,
    /// The node running the pod was lost.
    NodeLost,
}

impl JobState {
    /// Whether no further event follows this one for the same Job.
    pub fn is_terminal(self) -> bool {
        !matches!(self, JobState::Submitted | JobState::Running)
    }

    /// The snake_case name used in routing keys and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Submitted => "submitted",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::OomKilled => "oom_killed",
            JobState::Cancelled => "cancelled",
            JobState::Lost => "lost",
            JobState::WalltimeExceeded => "walltime_exceeded",
            JobState::Unschedulable => "unschedulable",
            JobState::ImagePullFailed => "image_pull_failed",
            JobState::Preempted => "preempted",
            JobState::NodeLost => "node_lost",
        }
    }

    /// Every state.
    pub const ALL: [JobState; 12] = [
        JobState::Submitted,
        JobState::Running,
        JobState::Succeeded,
        JobState::Failed,
        JobState::OomKilled,
        JobState::Cancelled,
        JobState::Lost,
        JobState::WalltimeExceeded,
        JobState::Unschedulable,
        JobState::ImagePullFailed,
        JobState::Preempted,
        JobState::NodeLost,
    ];

    /// Parses [`JobState::as_str`] back.
    pub fn parse(s: &str) -> Option<JobState> {
        JobState::ALL.into_iter().find(|state| state.as_str() == s)
    }
}

/// One result event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct JobEvent {
    /// Always `k8s-job-worker/job-event/v1`.
    pub schema: String,
    /// Stable id: the same Job generation in the same state always has the same id.
    pub event_id: String,
    /// Galaxy's job id.
    pub job_id: String,
    /// Resubmission attempt, when the request carried one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    /// Kubernetes Job name.
    pub job_name: String,
    /// Galaxy instance id of the worker, when configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_id: Option<String>,
    /// What happened.
    pub state: JobState,
    /// Why, in words an admin can act on.
    pub reason: String,
    /// Exit code of the container, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// Pods of the Job.
    #[serde(default)]
    pub pods: Vec<String>,
    /// The end of the last pod's log, for terminal states.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_tail: Option<String>,
    /// When the state was reached (RFC 3339), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub occurred_at: Option<String>,
    /// When the event was published (RFC 3339).
    pub published_at: String,
    /// Id of the worker replica that published it.
    pub worker_id: String,
}

/// The event id: a hash of the Job name, the request fingerprint and the state. A cancel is
/// about the job, whichever generation of its Job (or none yet) the cancel met: its id leaves
/// the fingerprint out, so every `cancelled` for one job shares one id.
pub fn event_id(job_name: &str, fingerprint: &str, state: JobState) -> String {
    let fingerprint = if state == JobState::Cancelled { "" } else { fingerprint };
    short_hash(format!("{job_name}\n{fingerprint}\n{}", state.as_str()).as_bytes(), 32)
}

/// Keeps the last `max` bytes of a log, cut at a character boundary.
pub fn log_tail(log: &str, max: usize) -> String {
    if log.len() <= max {
        return log.to_string();
    }
    let mut start = log.len() - max;
    while !log.is_char_boundary(start) {
        start += 1;
    }
    log[start..].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_ids_are_stable_and_distinct() {
        let a = event_id("galaxy-main-1", "fp", JobState::Succeeded);
        assert_eq!(a, event_id("galaxy-main-1", "fp", JobState::Succeeded));
        assert_ne!(a, event_id("galaxy-main-1", "fp", JobState::Failed));
        assert_ne!(a, event_id("galaxy-main-1", "fp2", JobState::Succeeded));
        assert_eq!(a.len(), 32);
        assert_eq!(
            event_id("galaxy-main-1", "fp", JobState::Cancelled),
            event_id("galaxy-main-1", "", JobState::Cancelled),
            "a cancel before or after the Job existed is the same event"
        );
    }

    #[test]
    fn states_round_trip() {
        for s in [
            "submitted",
            "running",
            "succeeded",
            "failed",
            "oom_killed",
            "cancelled",
            "lost",
            "walltime_exceeded",
            "unschedulable",
            "image_pull_failed",
            "preempted",
            "node_lost",
        ] {
            assert_eq!(JobState::parse(s).map(JobState::as_str), Some(s));
        }
        assert!(JobState::Lost.is_terminal() && !JobState::Running.is_terminal());
    }

    #[test]
    fn tails_respect_char_boundaries() {
        assert_eq!(log_tail("hello", 10), "hello");
        assert_eq!(log_tail("hello", 3), "llo");
        assert_eq!(log_tail("héllo", 4), "llo");
    }
}
