//! Job spec building, without I/O.

use clap::Parser;
use serde_json::json;

use super::*;
use crate::{config::Settings, domain::request::parse_request};

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    settings: Settings,
}

fn settings(args: &[&str]) -> KubeSettings {
    let mut argv = vec!["test"];
    argv.extend_from_slice(args);
    Cli::parse_from(argv).settings.kube
}

fn request(extra: serde_json::Value) -> JobRequest {
    let mut v = json!({"schema": "k8s-job-worker/job-request/v1", "job_id": "42", "command_line": "samtools sort x", "image": "busybox"});
    v.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    parse_request(&serde_json::to_vec(&v).unwrap(), 1 << 20).unwrap()
}

fn pod(job: &Job) -> &PodSpec {
    job.spec.as_ref().unwrap().template.spec.as_ref().unwrap()
}

#[test]
fn the_runner_pod_spec() {
    let s = settings(&["--k8s-galaxy-instance-id", "main", "--k8s-pod-retrials", "2", "--k8s-pull-policy", "Always"]);
    let job = build_job(&request(json!({"working_directory": "/jobs/42", "destination_id": "k8s_dest"})), &s).unwrap();
    assert_eq!(job.metadata.name.as_deref(), Some("galaxy-main-42"));
    assert_eq!(job.spec.as_ref().unwrap().backoff_limit, Some(2));
    let pod = pod(&job);
    assert_eq!(pod.restart_policy.as_deref(), Some("Never"));
    let c = &pod.containers[0];
    assert_eq!(c.name, "k8s-dest");
    assert_eq!(c.command.as_deref().unwrap(), ["/bin/bash", "-c", "samtools sort x"]);
    assert_eq!(c.working_dir.as_deref(), Some("/jobs/42"));
    assert_eq!(c.image_pull_policy.as_deref(), Some("Always"));
    assert!(c.resources.is_none());
    assert!(pod.security_context.is_none());
    let labels = job.metadata.labels.as_ref().unwrap();
    assert_eq!(labels["app"], "galaxy-main-42");
    assert_eq!(labels[LABEL_INSTANCE], "main");
    assert_eq!(labels[LABEL_JOB_ID], "42");
    assert_eq!(job.spec.as_ref().unwrap().template.metadata.as_ref().unwrap().labels.as_ref(), Some(labels));
}

#[test]
fn resources_come_from_the_request_or_the_defaults() {
    let s = settings(&["--k8s-default-requests-cpu", "1", "--k8s-default-limits-memory", "0.5"]);
    let job = build_job(&request(json!({"limits_cpu": 2.5, "requests_memory": 3, "requests_cpu": 0})), &s).unwrap();
    let res = pod(&job).containers[0].resources.clone().unwrap();
    let (req, lim) = (res.requests.unwrap(), res.limits.unwrap());
    assert_eq!(req.get("cpu"), None, "0 means unset, even over a default");
    assert_eq!(req["memory"].0, "3G");
    assert_eq!(lim["cpu"].0, "2500m");
    assert_eq!(lim["memory"].0, "500M", "default float memory");
}

#[test]
fn invalid_resource_strings_are_refused_by_name() {
    let err = build_job(&request(json!({"limits_memory": "lots"})), &settings(&[])).unwrap_err();
    assert!(err.to_string().contains("limits_memory"), "{err}");
}

#[test]
fn groups_pvc_and_pull_policy() {
    let s = settings(&[
        "--k8s-fs-group-id",
        "1000",
        "--k8s-supplemental-group-id",
        "0",
        "--k8s-persistent-volume-claim-name",
        "galaxy-pvc",
        "--k8s-persistent-volume-claim-mount-path",
        "/galaxy",
        "--k8s-pull-policy",
        "Sometimes",
    ]);
    let job = build_job(&request(json!({})), &s).unwrap();
    let pod = pod(&job);
    let sc = pod.security_context.as_ref().unwrap();
    assert_eq!(sc.fs_group, Some(1000));
    assert_eq!(sc.supplemental_groups, None, "0 is not > 0");
    assert_eq!(pod.volumes.as_ref().unwrap()[0].persistent_volume_claim.as_ref().unwrap().claim_name, "galaxy-pvc");
    assert_eq!(pod.containers[0].volume_mounts.as_ref().unwrap()[0].mount_path, "/galaxy");
    assert_eq!(pod.containers[0].image_pull_policy, None, "unknown policies are left unset");
}

#[test]
fn fingerprints_follow_the_request() {
    let a = request(json!({"limits_memory": 1}));
    assert_eq!(fingerprint(&a), fingerprint(&request(json!({"limits_memory": 1}))));
    assert_ne!(fingerprint(&a), fingerprint(&request(json!({"limits_memory": 2}))));
    let job = build_job(&a, &settings(&[])).unwrap();
    assert_eq!(job.metadata.annotations.as_ref().unwrap()[ANN_FINGERPRINT], fingerprint(&a));
}

#[test]
fn selectors_separate_instances() {
    assert_eq!(
        instance_selector(&settings(&["--k8s-galaxy-instance-id", "eu"])),
        "app.kubernetes.io/managed-by=k8s-job-worker,k8s-job-worker/instance-id=eu"
    );
    assert!(instance_selector(&settings(&[])).ends_with(",!k8s-job-worker/instance-id"));
}

#[test]
fn a_tombstone_never_runs_a_pod() {
    let t = cancel_tombstone(&settings(&["--k8s-galaxy-instance-id", "main"]), "42", None, "user");
    assert_eq!(t.metadata.name.as_deref(), Some("galaxy-main-42"));
    assert_eq!(t.spec.as_ref().unwrap().parallelism, Some(0));
    assert_eq!(t.metadata.annotations.as_ref().unwrap()[ANN_CANCELLED], "user");
}
