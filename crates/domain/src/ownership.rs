//! Whose a Job is. Job names are unique per (instance, job id, attempt), yet a name can be
//! taken by a Job the worker did not make for that job: another application's, one made by
//! hand, one named by an older version. The worker adopts, replaces, cancels or reports a Job
//! only when it carries the identity of the job at hand.

use std::collections::BTreeMap;

use crate::{
    keys::{LABEL_INSTANCE, MANAGED_BY},
    outcome::JobMeta,
};

/// The identity every Job (and tombstone) of one job carries: the worker's `managed-by`
/// label, the instance label (none without an instance id), and the Galaxy job id and
/// attempt annotations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    /// The worker's instance id, when configured.
    pub instance_id: Option<String>,
    /// Galaxy job id.
    pub job_id: String,
    /// Request attempt.
    pub attempt: Option<u32>,
}

/// A Job with the name of a job that is not that job's, and what gives it away.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("job name {name} is taken by a Job that is not this job's: {mismatch}")]
pub struct ForeignJob {
    /// The Job name.
    pub name: String,
    /// The first part of the identity that differs.
    pub mismatch: Mismatch,
}

/// The part of a Job's identity that is not the job's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Mismatch {
    /// The worker's `managed-by` label is missing or has another value.
    #[error("it has no label {}={}", MANAGED_BY.0, MANAGED_BY.1)]
    NotManaged,
    /// The instance label names another instance, or is missing, or is there when the worker
    /// has no instance id.
    #[error("it belongs to {}", .0.as_deref().map_or("a worker without an instance id".to_string(), |i| format!("instance {i:?}")))]
    Instance(Option<String>),
    /// The job id annotation names another Galaxy job (or is missing: empty).
    #[error("it is Galaxy job {0:?}'s")]
    JobId(String),
    /// The attempt annotation names another attempt (or is missing).
    #[error("it is {}", .0.map_or("a Job without an attempt".to_string(), |a| format!("attempt {a}")))]
    Attempt(Option<u32>),
}

impl Owner {
    /// Whether the Job described by `meta` (its annotations) and `labels` is this job's.
    pub fn check(&self, meta: &JobMeta, labels: &BTreeMap<String, String>) -> Result<(), ForeignJob> {
        let (key, value) = MANAGED_BY;
        let instance = labels.get(LABEL_INSTANCE);
        let mismatch = if labels.get(key).map(String::as_str) != Some(value) {
            Mismatch::NotManaged
        } else if instance != self.instance_id.as_ref() {
            Mismatch::Instance(instance.cloned())
        } else if meta.job_id != self.job_id {
            Mismatch::JobId(meta.job_id.clone())
        } else if meta.attempt != self.attempt {
            Mismatch::Attempt(meta.attempt)
        } else {
            return Ok(());
        };
        Err(ForeignJob { name: meta.name.clone(), mismatch })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{job::JobDefaults, keys::LABEL_APP, naming::Naming, record::plan_tombstone};

    fn main() -> Naming {
        Naming { prefix: "galaxy".into(), instance_id: Some("main".into()) }
    }

    fn labels(instance: Option<&str>) -> BTreeMap<String, String> {
        let mut l = BTreeMap::from([
            (MANAGED_BY.0.to_string(), MANAGED_BY.1.to_string()),
            (LABEL_APP.to_string(), "galaxy-main-42".to_string()),
        ]);
        if let Some(i) = instance {
            l.insert(LABEL_INSTANCE.into(), i.into());
        }
        l
    }

    fn meta(job_id: &str, attempt: Option<u32>) -> JobMeta {
        JobMeta { name: "galaxy-main-42".into(), job_id: job_id.into(), attempt, ..JobMeta::default() }
    }

    #[test]
    fn item7_only_a_job_with_this_jobs_identity_is_its_own() {
        let owner = main().owner("42", None);
        assert_eq!(owner.check(&meta("42", None), &labels(Some("main"))), Ok(()));
        let why = |meta: JobMeta, labels: BTreeMap<String, String>| owner.check(&meta, &labels).unwrap_err().mismatch;
        let mut unmanaged = labels(Some("main"));
        unmanaged.remove(MANAGED_BY.0);
        assert_eq!(why(meta("42", None), unmanaged), Mismatch::NotManaged);
        let mut someone_else = labels(Some("main"));
        someone_else.insert(MANAGED_BY.0.into(), "helm".into());
        assert_eq!(why(meta("42", None), someone_else), Mismatch::NotManaged);
        assert_eq!(why(meta("42", None), labels(Some("eu"))), Mismatch::Instance(Some("eu".into())));
        assert_eq!(why(meta("42", None), labels(None)), Mismatch::Instance(None));
        assert_eq!(why(meta("42-1", None), labels(Some("main"))), Mismatch::JobId("42-1".into()));
        assert_eq!(why(meta("", None), labels(Some("main"))), Mismatch::JobId(String::new()), "no job id annotation");
        assert_eq!(why(meta("42", Some(1)), labels(Some("main"))), Mismatch::Attempt(Some(1)));
        let text = |m: Mismatch| ForeignJob { name: "galaxy-main-42".into(), mismatch: m }.to_string();
        assert_eq!(
            text(Mismatch::JobId("7".into())),
            "job name galaxy-main-42 is taken by a Job that is not this job's: it is Galaxy job \"7\"'s"
        );
        assert!(text(Mismatch::NotManaged).ends_with("it has no label app.kubernetes.io/managed-by=k8s-job-worker"));
        assert!(text(Mismatch::Instance(None)).ends_with("it belongs to a worker without an instance id"));
        assert!(text(Mismatch::Instance(Some("eu".into()))).ends_with("it belongs to instance \"eu\""));
        assert!(text(Mismatch::Attempt(None)).ends_with("it is a Job without an attempt"));
        assert!(text(Mismatch::Attempt(Some(2))).ends_with("it is attempt 2"));
    }

    #[test]
    fn item7_without_an_instance_id_a_job_of_an_instance_is_foreign() {
        let none = Naming { prefix: "galaxy".into(), instance_id: None };
        let owner = none.owner("42", Some(2));
        assert_eq!(owner.check(&meta("42", Some(2)), &labels(None)), Ok(()));
        assert!(owner.check(&meta("42", Some(2)), &labels(Some("main"))).is_err());
        assert!(owner.check(&meta("42", None), &labels(None)).is_err());
    }

    #[test]
    fn item7_a_tombstone_carries_the_identity_of_its_job() {
        let defaults = JobDefaults { naming: main(), ..JobDefaults::default() };
        let t = plan_tombstone(&defaults, "42", Some(3), None, "user");
        let meta = JobMeta {
            name: t.name.clone(),
            job_id: t.annotations[crate::keys::ANN_JOB_ID].clone(),
            attempt: t.annotations[crate::keys::ANN_ATTEMPT].parse().ok(),
            ..JobMeta::default()
        };
        assert_eq!(main().owner("42", Some(3)).check(&meta, &t.labels), Ok(()));
        assert!(main().owner("42", None).check(&meta, &t.labels).is_err());
    }
}
