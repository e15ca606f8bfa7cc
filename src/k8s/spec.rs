//! Builds the Kubernetes Job for a request, the way Galaxy's runner built it. Pure: no I/O.

use std::collections::BTreeMap;

use k8s_openapi::{
    api::{
        batch::v1::{Job, JobSpec},
        core::v1::{Container, PodSpec, PodTemplateSpec},
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};

use super::pod::pod_spec;
use crate::{
    config::{placement::Placement, KubeSettings},
    domain::{naming, request::JobRequest, ValidationError},
};

/// Label every Job and pod of this worker carries.
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "k8s-job-worker");
/// Label with the Galaxy instance id.
pub const LABEL_INSTANCE: &str = "k8s-job-worker/instance-id";
/// Label with the Galaxy job id (made label-safe).
pub const LABEL_JOB_ID: &str = "k8s-job-worker/galaxy-job-id";
/// Annotation with the exact Galaxy job id.
pub const ANN_JOB_ID: &str = "k8s-job-worker/galaxy-job-id";
/// Annotation with the request's attempt number.
pub const ANN_ATTEMPT: &str = "k8s-job-worker/attempt";
/// Annotation with the request fingerprint; a different fingerprint means a different request.
pub const ANN_FINGERPRINT: &str = "k8s-job-worker/fingerprint";
/// Annotation set when a cancel was received; the Job's outcome is then `cancelled`.
pub const ANN_CANCELLED: &str = "k8s-job-worker/cancelled";
/// Annotation set before an outdated or untrusted Job is deleted to be replaced.
pub const ANN_REPLACED: &str = "k8s-job-worker/replaced";
/// Annotation counting the resubmissions after preemption.
pub const ANN_RESUBMISSIONS: &str = "k8s-job-worker/resubmissions";
/// Annotation recording the terminal state whose event the broker confirmed.
pub const ANN_REPORTED: &str = "k8s-job-worker/reported";

/// Fingerprint of a request: equal requests give equal fingerprints.
pub fn fingerprint(request: &JobRequest) -> String {
    let canonical = serde_json::to_vec(request).unwrap_or_default();
    naming::short_hash(&canonical, 16)
}

/// The Job name for a request under these settings.
pub fn job_name_for(settings: &KubeSettings, job_id: &str, attempt: Option<u32>) -> String {
    naming::job_name(&settings.k8s_job_name_prefix, settings.k8s_galaxy_instance_id.as_deref(), job_id, attempt)
}

/// Labels that select every Job of this worker's instance.
pub fn instance_selector(settings: &KubeSettings) -> String {
    let (k, v) = MANAGED_BY;
    match &settings.k8s_galaxy_instance_id {
        Some(id) => format!("{k}={v},{LABEL_INSTANCE}={id}"),
        None => format!("{k}={v},!{LABEL_INSTANCE}"),
    }
}

fn base_labels(settings: &KubeSettings, name: &str, job_id: &str) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::from([
        ("app".to_string(), name.to_string()),
        (MANAGED_BY.0.to_string(), MANAGED_BY.1.to_string()),
        (LABEL_JOB_ID.to_string(), naming::label_value(job_id)),
    ]);
    if let Some(id) = &settings.k8s_galaxy_instance_id {
        labels.insert(LABEL_INSTANCE.to_string(), id.clone());
    }
    labels
}

/// The Job's activeDeadlineSeconds: the request's walltime, never above the worker's limit
/// (a limit of 0 or less means none).
pub fn walltime(requested: Option<u64>, limit: i64) -> Option<i64> {
    let requested = requested.filter(|s| *s > 0).map(|s| i64::try_from(s).unwrap_or(i64::MAX));
    match (requested, limit > 0) {
        (Some(r), true) => Some(r.min(limit)),
        (Some(r), false) => Some(r),
        (None, true) => Some(limit),
        (None, false) => None,
    }
}

/// Builds the Job for a validated request, refusing what the policy does not allow.
pub fn build_job(request: &JobRequest, settings: &KubeSettings, placement: &Placement) -> Result<Job, ValidationError> {
    let name = job_name_for(settings, &request.job_id, request.attempt);
    let base = base_labels(settings, &name, &request.job_id);
    let mut ours = BTreeMap::from([
        (ANN_JOB_ID.to_string(), request.job_id.clone()),
        (ANN_FINGERPRINT.to_string(), fingerprint(request)),
    ]);
    if let Some(attempt) = request.attempt {
        ours.insert(ANN_ATTEMPT.into(), attempt.to_string());
    }
    // Later maps win: request, then worker extras, then the labels the worker relies on.
    let merge = |maps: [&BTreeMap<String, String>; 3]| -> BTreeMap<String, String> {
        maps.into_iter().flat_map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone()))).collect()
    };
    let job_labels = merge([&request.labels, &placement.job_labels, &base]);
    let pod_labels = merge([&request.labels, &placement.pod_labels, &base]);
    let job_annotations = merge([&request.annotations, &placement.job_annotations, &ours]);
    let pod_annotations = merge([&request.annotations, &placement.pod_annotations, &ours]);
    let pod = pod_spec(request, settings, placement)?;
    let retrials = request.max_pod_retrials.unwrap_or(settings.k8s_pod_retrials);
    Ok(Job {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: Some(settings.k8s_namespace.clone()),
            labels: Some(job_labels),
            annotations: Some(job_annotations),
            ..ObjectMeta::default()
        },
        spec: Some(JobSpec {
            active_deadline_seconds: walltime(request.walltime_seconds, settings.k8s_walltime_limit),
            backoff_limit: Some(i32::try_from(retrials).unwrap_or(i32::MAX)),
            completions: Some(1),
            parallelism: Some(1),
            ttl_seconds_after_finished: settings.placement.k8s_job_ttl_secs_after_finished,
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    annotations: Some(pod_annotations),
                    ..ObjectMeta::default()
                }),
                spec: Some(pod),
            },
            ..JobSpec::default()
        }),
        status: None,
    })
}

/// A Job that keeps a cancelled-but-unseen request from starting: same name, no pods
/// (`parallelism: 0`), gone after `k8s_cancel_tombstone_seconds` via its deadline and TTL.
pub fn cancel_tombstone(settings: &KubeSettings, job_id: &str, attempt: Option<u32>, reason: &str) -> Job {
    let name = job_name_for(settings, job_id, attempt);
    let labels = base_labels(settings, &name, job_id);
    let mut annotations =
        BTreeMap::from([(ANN_JOB_ID.to_string(), job_id.to_string()), (ANN_CANCELLED.to_string(), reason.to_string())]);
    if let Some(attempt) = attempt {
        annotations.insert(ANN_ATTEMPT.into(), attempt.to_string());
    }
    Job {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: Some(settings.k8s_namespace.clone()),
            labels: Some(labels),
            annotations: Some(annotations),
            ..ObjectMeta::default()
        },
        spec: Some(JobSpec {
            parallelism: Some(0),
            backoff_limit: Some(0),
            active_deadline_seconds: Some(settings.k8s_cancel_tombstone_seconds.max(1)),
            ttl_seconds_after_finished: Some(0),
            template: PodTemplateSpec {
                metadata: None,
                spec: Some(PodSpec {
                    restart_policy: Some("Never".into()),
                    containers: vec![Container {
                        name: "cancelled".into(),
                        image: Some("cancelled".into()),
                        command: Some(vec!["/bin/true".into()]),
                        ..Container::default()
                    }],
                    automount_service_account_token: Some(false),
                    ..PodSpec::default()
                }),
            },
            ..JobSpec::default()
        }),
        status: None,
    }
}

#[cfg(test)]
#[path = "spec_tests.rs"]
mod tests;
