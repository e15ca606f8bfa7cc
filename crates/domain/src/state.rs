//! The states the worker reports a job in (its own module: outcomes, decisions and events
//! all speak of them, and none of those needs the others for it).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

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
    /// Not a verdict: the worker knows nothing of the job (the answer to a `status` request
    /// when no Job of it exists — its request may still wait in the queue, or its record
    /// expired). The caller may send its request again: requests are idempotent.
    Unknown,
}

impl JobState {
    /// Whether no further event follows this one for the same Job.
    pub fn is_terminal(self) -> bool {
        !matches!(self, JobState::Submitted | JobState::Running | JobState::Unknown)
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
            JobState::Unknown => "unknown",
        }
    }

    /// Every state.
    pub const ALL: [JobState; 13] = [
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
        JobState::Unknown,
    ];

    /// Parses [`JobState::as_str`] back.
    pub fn parse(s: &str) -> Option<JobState> {
        JobState::ALL.into_iter().find(|state| state.as_str() == s)
    }
}
