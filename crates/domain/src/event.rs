//! Result events published to Galaxy.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::naming::short_hash;
pub use super::state::JobState;

/// Schema identifier carried by every result event.
pub const EVENT_SCHEMA: &str = "k8s-job-worker/job-event/v1";

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
    /// The Galaxy job handler the job's request came from, when it named one: the event is
    /// routed to it (`<instance>.<handler>.<state>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handler: Option<String>,
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

/// What an event is about.
#[derive(Debug, Clone, Copy)]
pub struct Subject<'a> {
    /// Galaxy job id.
    pub job_id: &'a str,
    /// Attempt.
    pub attempt: Option<u32>,
    /// Job name.
    pub job_name: &'a str,
    /// Request fingerprint ("" when unknown, as for cancels of unseen requests).
    pub fingerprint: &'a str,
    /// The Galaxy job handler its events go to, when known.
    pub handler: Option<&'a str>,
}

/// Who publishes events: the instance they belong to and the replica that sends them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reporter {
    /// Galaxy instance id, when configured.
    pub instance_id: Option<String>,
    /// This replica's id.
    pub worker_id: String,
}

impl Reporter {
    /// A new event with the stable id for this subject and state.
    pub fn event(&self, subject: &Subject<'_>, state: JobState, reason: impl Into<String>) -> JobEvent {
        JobEvent {
            schema: EVENT_SCHEMA.to_string(),
            event_id: event_id(subject.job_name, subject.fingerprint, state),
            job_id: subject.job_id.to_string(),
            attempt: subject.attempt,
            job_name: subject.job_name.to_string(),
            instance_id: self.instance_id.clone(),
            handler: subject.handler.map(str::to_string),
            state,
            reason: reason.into(),
            exit_code: None,
            pods: Vec::new(),
            log_tail: None,
            occurred_at: None,
            published_at: String::new(),
            worker_id: self.worker_id.clone(),
        }
    }
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

/// One read of a pod log's tail. The log API cuts whole lines from the end (`tailLines`), then
/// bytes from the start of those (`limitBytes`); it has no "last N bytes". So a tail of at most
/// `max` bytes is read as the last lines that fit, asking for half as many lines while they do
/// not, and no read returns more than `max + 1` bytes, however long a line is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TailRead {
    /// Lines to ask for (`tailLines`).
    pub tail_lines: usize,
    /// Bytes to ask for (`limitBytes`): one more than the tail may have, to see a cut.
    pub limit_bytes: usize,
}

impl TailRead {
    /// The first read of a tail of at most `max` bytes (`max` > 0).
    pub fn first(max: usize) -> TailRead {
        TailRead { tail_lines: (max / 16).max(200), limit_bytes: max + 1 }
    }

    /// The read after this one returned `got` bytes, or `None` when that is the tail: the lines
    /// fit, or even the last line alone does not (the API can only return its beginning).
    pub fn next(self, got: usize) -> Option<TailRead> {
        (got >= self.limit_bytes && self.tail_lines > 1).then_some(TailRead { tail_lines: self.tail_lines / 2, ..self })
    }

    /// The text kept from the last read: at most `max` bytes (a line too long is cut at the
    /// end; bytes that are not UTF-8 are replaced).
    pub fn keep(self, got: &[u8]) -> String {
        let max = self.limit_bytes - 1;
        let mut text = String::from_utf8_lossy(&got[..got.len().min(max)]).into_owned();
        while text.len() > max {
            text.pop();
        }
        text
    }
}

/// Reads a tail of at most `max` bytes (`max` > 0) with `read`, one call of the log API
/// (`None`: the log cannot be read).
pub async fn read_tail<F, Fut>(max: usize, mut read: F) -> Option<String>
where
    F: FnMut(TailRead) -> Fut,
    Fut: std::future::Future<Output = Option<Vec<u8>>>,
{
    let mut this = TailRead::first(max);
    loop {
        let got = read(this).await?;
        match this.next(got.len()) {
            Some(fewer) => this = fewer,
            None => return Some(this.keep(&got)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The log API as the kubelet serves it: the last `tailLines` lines, then their first
    /// `limitBytes` bytes.
    fn log_api(log: &str, read: TailRead) -> Vec<u8> {
        let body = log.strip_suffix('\n').unwrap_or(log);
        let start = body.rmatch_indices('\n').nth(read.tail_lines - 1).map_or(0, |(i, _)| i + 1);
        log.as_bytes()[start..].iter().take(read.limit_bytes).copied().collect()
    }

    /// Reads the tail of `log` through [`log_api`]; returns it and the largest read.
    fn tail_of(log: &str, max: usize) -> (String, usize) {
        let largest = std::cell::Cell::new(0);
        let read = read_tail(max, |read| {
            let got = log_api(log, read);
            largest.set(largest.get().max(got.len()));
            std::future::ready(Some(got))
        });
        let mut read = std::pin::pin!(read);
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        let std::task::Poll::Ready(tail) = std::future::Future::poll(read.as_mut(), &mut cx) else {
            unreachable!("the fake log API answers at once")
        };
        (tail.unwrap(), largest.get())
    }

    #[test]
    fn the_log_tail_reads_at_most_log_tail_bytes_of_one_huge_line() {
        let huge = "x".repeat(100_000);
        let (tail, largest) = tail_of(&format!("{huge}\n"), 1000);
        assert_eq!((tail.len(), largest), (1000, 1001), "the line's beginning: all the API can give");
        let (tail, largest) = tail_of(&format!("start\n{huge}\nthe end\n"), 1000);
        assert_eq!((tail.as_str(), largest), ("the end\n", 1001), "the last lines that fit");
        let lines: String = (1..=5000).map(|i| format!("line {i}\n")).collect();
        let (tail, largest) = tail_of(&lines, 1000);
        assert!(tail.ends_with("\nline 5000\n") && tail.len() <= 1000 && tail.len() > 500, "{tail}");
        assert!(tail.starts_with("line "), "whole lines: {tail}");
        assert_eq!(largest, 1001);
        assert_eq!(tail_of("short\nlog\n", 1000).0, "short\nlog\n", "one read when it fits");
        assert_eq!(tail_of(&"é".repeat(1000), 999).0.len(), 998, "cut at a character boundary");
        let read = TailRead::first(65536);
        assert_eq!((read.tail_lines, read.limit_bytes), (4096, 65537));
        assert_eq!(read.next(65536), None);
        assert_eq!(TailRead { tail_lines: 1, ..read }.next(65537), None, "one line too long is its beginning");
    }

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
    fn a_reporter_makes_events_with_stable_ids() {
        let r = Reporter { instance_id: Some("main".into()), worker_id: "w1".into() };
        let subject =
            Subject { job_id: "1", attempt: Some(2), job_name: "galaxy-main-1-2", fingerprint: "fp", handler: None };
        let e = r.event(&subject, JobState::Running, "pod p is running");
        assert_eq!(e.event_id, event_id("galaxy-main-1-2", "fp", JobState::Running));
        assert_eq!((e.instance_id.as_deref(), e.attempt, e.worker_id.as_str()), (Some("main"), Some(2), "w1"));
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
