//! The Jobs that only remember: a tombstone that keeps a cancelled-but-unseen request from
//! starting, and the record of a finished request's outcome (what stops it running again and
//! answers its status), both planned as Jobs without pods.

use std::collections::BTreeMap;

use crate::{
    job::{ContainerPlan, Identity, JobDefaults, JobPlan, Map, Quantities},
    keys::{
        ANN_ATTEMPT, ANN_CANCELLED, ANN_EXIT_CODE, ANN_FINGERPRINT, ANN_HANDLER, ANN_JOB_ID, ANN_REASON,
        ANN_RECORD_UNTIL, ANN_REPORTED, LABEL_RECORD,
    },
    outcome::JobMeta,
    state::JobState,
};

/// A Job that keeps a cancelled-but-unseen request from starting: same name, no pods
/// (`parallelism: 0`), gone after `tombstone_seconds` via its deadline and TTL.
pub fn plan_tombstone(
    defaults: &JobDefaults,
    job_id: &str,
    attempt: Option<u32>,
    handler: Option<&str>,
    reason: &str,
) -> JobPlan {
    let name = defaults.naming.job_name(job_id, attempt);
    let mut annotations =
        Map::from([(ANN_JOB_ID.to_string(), job_id.to_string()), (ANN_CANCELLED.to_string(), reason.to_string())]);
    if let Some(attempt) = attempt {
        annotations.insert(ANN_ATTEMPT.into(), attempt.to_string());
    }
    if let Some(handler) = handler {
        annotations.insert(ANN_HANDLER.into(), handler.to_string());
    }
    JobPlan {
        labels: defaults.base_labels(&name, job_id),
        annotations,
        pod_labels: Map::new(),
        pod_annotations: Map::new(),
        parallelism: 0,
        backoff_limit: 0,
        active_deadline_seconds: Some(defaults.tombstone_seconds.max(1)),
        ttl_seconds_after_finished: Some(0),
        container: ContainerPlan {
            name: "cancelled".into(),
            image: "cancelled".into(),
            command: vec!["/bin/true".into()],
            working_dir: None,
            env: Vec::new(),
            pull_policy: None,
            requests: Quantities::default(),
            limits: Quantities::default(),
            mounts: Vec::new(),
            extended: BTreeMap::new(),
        },
        identity: Identity::default(),
        node_selector: Map::new(),
        tolerations: Vec::new(),
        affinity: None,
        priority_class: None,
        name,
    }
}

/// What a record of a finished job holds: how it ended, and until when it is kept.
#[derive(Debug, Clone, PartialEq)]
pub struct Record<'a> {
    /// The reported state.
    pub state: JobState,
    /// The reported exit code.
    pub exit_code: Option<i32>,
    /// The reported reason.
    pub reason: &'a str,
    /// How long it is kept.
    pub keep_for: std::time::Duration,
    /// When it may be removed (RFC 3339).
    pub until: String,
}

impl<'a> Record<'a> {
    /// A record of `state` kept `keep_for` from `now`.
    pub fn kept(
        state: JobState,
        exit_code: Option<i32>,
        reason: &'a str,
        keep_for: std::time::Duration,
        now: jiff::Timestamp,
    ) -> Record<'a> {
        let until = jiff::SignedDuration::try_from(keep_for).ok().and_then(|d| now.checked_add(d).ok());
        Record { state, exit_code, reason, keep_for, until: until.unwrap_or(jiff::Timestamp::MAX).to_string() }
    }

    /// The annotations that carry it (on the Job itself, or on a record Job).
    pub fn annotations(&self) -> Map {
        let mut reason = self.reason.to_string();
        if reason.len() > MAX_RECORDED_REASON {
            let mut end = MAX_RECORDED_REASON;
            while !reason.is_char_boundary(end) {
                end -= 1;
            }
            reason.truncate(end);
        }
        let mut out = Map::from([
            (ANN_REPORTED.to_string(), self.state.as_str().to_string()),
            (ANN_REASON.to_string(), reason),
            (ANN_RECORD_UNTIL.to_string(), self.until.clone()),
        ]);
        if let Some(code) = self.exit_code {
            out.insert(ANN_EXIT_CODE.to_string(), code.to_string());
        }
        out
    }
}

/// Longest reason kept in a record.
const MAX_RECORDED_REASON: usize = 2048;

/// A record Job for a job whose own Job is gone: same name, no pods, the outcome in its
/// annotations, out of the tracker's watch, removed by Kubernetes when it expires.
pub fn plan_record(defaults: &JobDefaults, meta: &JobMeta, record: &Record<'_>) -> JobPlan {
    let mut plan = plan_tombstone(defaults, &meta.job_id, meta.attempt, meta.handler.as_deref(), "");
    plan.annotations.remove(ANN_CANCELLED);
    plan.annotations.insert(ANN_FINGERPRINT.to_string(), meta.fingerprint.clone());
    plan.annotations.extend(record.annotations());
    plan.labels.insert(LABEL_RECORD.to_string(), "true".to_string());
    plan.active_deadline_seconds = Some(i64::try_from(record.keep_for.as_secs()).unwrap_or(i64::MAX).max(1));
    plan.container.name = "record".into();
    plan.container.image = "record".into();
    plan
}
