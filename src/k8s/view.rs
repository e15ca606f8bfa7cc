//! Turns Kubernetes Job and Pod objects into the small domain views the tracker keeps.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::watched::{WatchedJob, WatchedPod};
use crate::domain::keys::{
    ANN_ATTEMPT, ANN_CANCELLED, ANN_CLAIMED, ANN_EXIT_CODE, ANN_FINGERPRINT, ANN_HANDLER, ANN_JOB_ID, ANN_REASON,
    ANN_REPLACED, ANN_REPORTED, ANN_RESUBMISSIONS, ANN_RESUBMIT_DUE, ANN_ROUTES, FINALIZER,
};
use crate::domain::{
    event::JobState,
    intent::Found,
    outcome::{JobMeta, JobView, PodPhase, PodTrouble, PodView, Termination, PULL_FAILURES, START_FAILURES},
    ownership::{ForeignJob, Owner},
};

fn rfc3339(t: &k8s_openapi::apimachinery::pkg::apis::meta::v1::Time) -> String {
    t.0.to_string()
}

/// Extracts the tracker's view of a Job from its metadata (of a full or a watched Job).
pub fn job_meta(metadata: &ObjectMeta) -> JobMeta {
    let empty = Default::default();
    let ann = metadata.annotations.as_ref().unwrap_or(&empty);
    JobMeta {
        name: metadata.name.clone().unwrap_or_default(),
        uid: metadata.uid.clone().unwrap_or_default(),
        job_id: ann.get(ANN_JOB_ID).cloned().unwrap_or_default(),
        attempt: ann.get(ANN_ATTEMPT).and_then(|a| a.parse().ok()),
        fingerprint: ann.get(ANN_FINGERPRINT).cloned().unwrap_or_default(),
        handler: ann.get(ANN_HANDLER).cloned(),
        cancelled: ann.get(ANN_CANCELLED).cloned(),
        replaced: ann.contains_key(ANN_REPLACED),
        reported: ann.get(ANN_REPORTED).and_then(|s| JobState::parse(s)),
        claimed: ann.get(ANN_CLAIMED).and_then(|s| JobState::parse(s)),
        resource_version: metadata.resource_version.clone().unwrap_or_default(),
        deleting: metadata.deletion_timestamp.is_some(),
        held: metadata.finalizers.as_ref().is_some_and(|f| f.iter().any(|f| f == FINALIZER)),
        resubmissions: ann.get(ANN_RESUBMISSIONS).and_then(|n| n.parse().ok()).unwrap_or(0),
        resubmit_due: ann.get(ANN_RESUBMIT_DUE).and_then(|n| n.parse().ok()),
        recorded_exit_code: ann.get(ANN_EXIT_CODE).and_then(|n| n.parse().ok()),
        recorded_reason: ann.get(ANN_REASON).cloned(),
        routed: ann.contains_key(ANN_ROUTES),
    }
}

/// Whether the Job with this metadata (of a full or a watched Job) is `owner`'s.
pub fn check_owner(owner: &Owner, metadata: &ObjectMeta) -> Result<(), ForeignJob> {
    owner.check(&job_meta(metadata), metadata.labels.as_ref().unwrap_or(&Default::default()))
}

/// What a resubmission intent finds in the Job (of a full or a watched Job) with its name.
pub fn intent_found(owner: &Owner, metadata: &ObjectMeta) -> Found {
    let meta = job_meta(metadata);
    let ended =
        meta.cancelled.is_some() || meta.replaced || meta.reported.is_some() || meta.claimed.is_some() || meta.deleting;
    Found {
        owned: check_owner(owner, metadata).is_ok(),
        due: meta.resubmit_due,
        resubmissions: meta.resubmissions,
        ended,
        uid: meta.uid,
    }
}

/// Extracts the parts of a Job's status that decide its outcome.
pub fn job_view(job: &WatchedJob) -> JobView {
    let status = job.status.as_ref();
    let condition = |kind: &str| {
        status
            .and_then(|s| s.conditions.as_ref())
            .and_then(|cs| cs.iter().find(|c| c.type_ == kind && c.status == "True"))
    };
    JobView {
        complete: condition("Complete").is_some(),
        failed: condition("Failed")
            .map(|c| (c.reason.clone().unwrap_or_default(), c.message.clone().unwrap_or_default())),
        backoff_limit: job.spec.as_ref().and_then(|s| s.backoff_limit).unwrap_or(6),
        finished_at: status
            .and_then(|s| s.completion_time.as_ref())
            .map(rfc3339)
            .or_else(|| condition("Failed").and_then(|c| c.last_transition_time.as_ref()).map(rfc3339)),
        active_deadline_seconds: job.spec.as_ref().and_then(|s| s.active_deadline_seconds),
        created: job.metadata.creation_timestamp.as_ref().map(|t| t.0),
        active: status.and_then(|s| s.active).unwrap_or(0),
        stopped: job.spec.as_ref().and_then(|s| s.parallelism) == Some(0),
        failed_pods: status.and_then(|s| s.failed).unwrap_or(0),
    }
}

/// The uid of the Job that owns a pod.
pub fn pod_owner(pod: &WatchedPod) -> Option<String> {
    pod.metadata
        .owner_references
        .as_ref()?
        .iter()
        .find(|o| o.kind == "Job" && o.controller == Some(true))
        .map(|o| o.uid.clone())
}

/// Extracts the parts of a pod that decide its Job's outcome.
pub fn pod_view(pod: &WatchedPod) -> PodView {
    let status = pod.status.as_ref();
    let terminations = status
        .and_then(|s| s.container_statuses.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|cs| cs.state.as_ref()?.terminated.as_ref())
        .map(|t| Termination {
            exit_code: t.exit_code,
            reason: t.reason.clone(),
            message: t.message.clone(),
            finished_at: t.finished_at.as_ref().map(rfc3339),
        })
        .collect();
    let conditions = status.and_then(|s| s.conditions.as_ref());
    let condition = |kind: &str| conditions.and_then(|cs| cs.iter().find(|c| c.type_ == kind));
    let unschedulable = condition("PodScheduled")
        .filter(|c| c.status == "False" && c.reason.as_deref() == Some("Unschedulable"))
        .map(|c| {
            let since = c.last_transition_time.as_ref().map(|t| t.0).unwrap_or_else(jiff::Timestamp::now);
            (since, c.message.clone().unwrap_or_default())
        });
    // A waiting container whose reason is one of `reasons`: (reason, message, image).
    let waiting = |reasons: &[&str]| {
        status.and_then(|s| s.container_statuses.as_ref()).into_iter().flatten().find_map(|cs| {
            let waiting = cs.state.as_ref()?.waiting.as_ref()?;
            let reason = waiting.reason.clone()?;
            reasons
                .contains(&reason.as_str())
                .then(|| (reason, waiting.message.clone().unwrap_or_default(), cs.image.clone()))
        })
    };
    let pull_failure = waiting(PULL_FAILURES);
    let start_failure = waiting(START_FAILURES).map(|(reason, message, _)| (reason, message));
    let pod_reason = status.and_then(|s| s.reason.clone());
    let disrupted = condition("DisruptionTarget")
        .filter(|c| c.status == "True")
        .map(|c| c.message.clone().or(c.reason.clone()).unwrap_or_default())
        .or_else(|| {
            matches!(pod_reason.as_deref(), Some("Evicted" | "Preempting")).then(|| {
                status.and_then(|s| s.message.clone()).unwrap_or_else(|| pod_reason.clone().unwrap_or_default())
            })
        });
    let trouble = PodTrouble {
        pull_failure,
        start_failure,
        unschedulable,
        disrupted,
        reason: pod_reason,
        message: status.and_then(|s| s.message.clone()),
    };
    PodView {
        started_at: status.and_then(|s| s.start_time.as_ref()).map(|t| t.0),
        name: pod.metadata.name.clone().unwrap_or_default(),
        phase: PodPhase::parse(status.and_then(|s| s.phase.as_deref())),
        terminations,
        created: pod.metadata.creation_timestamp.as_ref().map(rfc3339).unwrap_or_default(),
        trouble: trouble.boxed(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn views_from_objects() {
        let job: WatchedJob = serde_json::from_value(json!({
            "metadata": {"name": "galaxy-main-1", "uid": "u1",
                "annotations": {ANN_JOB_ID: "1", ANN_FINGERPRINT: "fp", ANN_REPORTED: "succeeded"}},
            "spec": {"backoffLimit": 2, "template": {}},
            "status": {"conditions": [{"type": "Complete", "status": "True"}]}
        }))
        .unwrap();
        let meta = job_meta(&job.metadata);
        assert_eq!((meta.job_id.as_str(), meta.reported), ("1", Some(JobState::Succeeded)));
        let view = job_view(&job);
        assert!(view.complete && view.failed.is_none() && view.backoff_limit == 2);

        let pod: WatchedPod = serde_json::from_value(json!({
            "metadata": {"name": "p", "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job",
                "name": "galaxy-main-1", "uid": "u1", "controller": true}]},
            "status": {"phase": "Failed", "containerStatuses": [{"name": "c", "image": "i", "imageID": "",
                "ready": false, "restartCount": 0,
                "state": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}}]}
        }))
        .unwrap();
        assert_eq!(pod_owner(&pod).as_deref(), Some("u1"));
        let view = pod_view(&pod);
        assert_eq!(view.terminations[0].reason.as_deref(), Some("OOMKilled"));
    }

    #[test]
    fn item7_a_watched_job_keeps_the_labels_its_owner_is_checked_on() {
        use crate::domain::naming::Naming;
        let job: WatchedJob = serde_json::from_value(json!({
            "metadata": {"name": "galaxy-main-1", "uid": "u1",
                "labels": {"app.kubernetes.io/managed-by": "k8s-job-worker", "k8s-job-worker/instance-id": "main"},
                "annotations": {ANN_JOB_ID: "1"}}}))
        .unwrap();
        let naming = Naming { prefix: "galaxy".into(), instance_id: Some("main".into()) };
        assert_eq!(check_owner(&naming.owner("1", None), &job.metadata), Ok(()));
        assert!(check_owner(&naming.owner("2", None), &job.metadata).is_err());
        let pod: WatchedPod =
            serde_json::from_value(json!({"metadata": {"name": "p", "labels": {"app": "x"}}})).unwrap();
        assert_eq!(pod.metadata.labels, None, "a pod's labels are not kept");
    }

    #[test]
    fn pods_that_never_start_are_read_from_the_job_and_the_container_state() {
        let job: WatchedJob = serde_json::from_value(json!({
            "metadata": {"name": "galaxy-main-1", "uid": "u1", "creationTimestamp": "2026-01-01T00:00:01Z"},
            "spec": {"parallelism": 0, "template": {}}}))
        .unwrap();
        let view = job_view(&job);
        assert_eq!((view.created, view.stopped), (Some("2026-01-01T00:00:01Z".parse().unwrap()), true));
        let pod: WatchedPod = serde_json::from_value(json!({"metadata": {"name": "p"},
            "status": {"phase": "Pending", "containerStatuses": [{"name": "c", "image": "i", "imageID": "",
                "ready": false, "restartCount": 0, "state": {"waiting": {"reason": "CreateContainerConfigError",
                    "message": "secret \"s\" not found"}}}]}}))
        .unwrap();
        let view = pod_view(&pod);
        assert_eq!(
            view.trouble().start_failure,
            Some(("CreateContainerConfigError".into(), "secret \"s\" not found".into()))
        );
        assert_eq!(view.trouble().pull_failure, None);
    }

    /// What the apiserver sends is a full object: the slim types must read the same values
    /// from it as the full `k8s_openapi` types would, whatever else it carries.
    #[test]
    fn slim_types_read_full_objects() {
        use k8s_openapi::api::{batch::v1::Job, core::v1::Pod};
        let managed = json!([{"manager": "kube-controller-manager", "operation": "Update", "apiVersion": "v1",
            "fieldsType": "FieldsV1", "fieldsV1": {"f:status": {"f:phase": {}, "f:conditions": {".": {}}}}}]);
        let full_job = json!({"apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": "galaxy-main-7", "uid": "u7", "resourceVersion": "42", "managedFields": managed,
                "deletionTimestamp": "2026-01-01T00:00:09Z", "labels": {"app": "galaxy-main-7"},
                "annotations": {ANN_JOB_ID: "7", ANN_FINGERPRINT: "fp", ANN_RESUBMISSIONS: "2"}},
            "spec": {"backoffLimit": 3, "activeDeadlineSeconds": 60, "parallelism": 1,
                "template": {"spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "busybox"}]}}},
            "status": {"active": 1, "startTime": "2026-01-01T00:00:01Z",
                "conditions": [{"type": "Failed", "status": "True", "reason": "DeadlineExceeded",
                    "message": "too long", "lastTransitionTime": "2026-01-01T00:01:01Z"}]}});
        let (slim, full): (WatchedJob, Job) =
            (serde_json::from_value(full_job.clone()).unwrap(), serde_json::from_value(full_job).unwrap());
        assert_eq!(job_meta(&slim.metadata), job_meta(&full.metadata));
        assert_eq!(slim.metadata.resource_version.as_deref(), Some("42"), "the watcher resumes from it");
        let view = job_view(&slim);
        assert_eq!(view.failed, Some(("DeadlineExceeded".into(), "too long".into())));
        assert_eq!((view.backoff_limit, view.active_deadline_seconds), (3, Some(60)));
        assert_eq!(view.finished_at.as_deref(), Some("2026-01-01T00:01:01Z"));

        let full_pod = json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "galaxy-main-7-x", "uid": "p7", "resourceVersion": "43", "managedFields": managed,
                "creationTimestamp": "2026-01-01T00:00:02Z",
                "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": "galaxy-main-7",
                    "uid": "u7", "controller": true}]},
            "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "busybox"}]},
            "status": {"phase": "Pending", "startTime": "2026-01-01T00:00:03Z",
                "conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                    "message": "0/1 nodes", "lastTransitionTime": "2026-01-01T00:00:04Z"}],
                "containerStatuses": [{"name": "c", "image": "busybox:nope", "imageID": "", "ready": false,
                    "restartCount": 0, "state": {"waiting": {"reason": "ErrImagePull", "message": "not found"}},
                    "lastState": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}}]}});
        let slim: WatchedPod = serde_json::from_value(full_pod.clone()).unwrap();
        let full: Pod = serde_json::from_value(full_pod).unwrap();
        assert_eq!(pod_owner(&slim).as_deref(), Some("u7"));
        assert_eq!(full.metadata.owner_references, slim.metadata.owner_references);
        let view = pod_view(&slim);
        assert_eq!(
            view.trouble().pull_failure,
            Some(("ErrImagePull".into(), "not found".into(), "busybox:nope".into()))
        );
        assert_eq!(view.trouble().unschedulable.clone().map(|(_, m)| m).as_deref(), Some("0/1 nodes"));
        assert_eq!((view.phase, view.created.as_str()), (PodPhase::Pending, "2026-01-01T00:00:02Z"));
        assert!(view.terminations.is_empty(), "a previous run's state is not this one's");
    }
}
