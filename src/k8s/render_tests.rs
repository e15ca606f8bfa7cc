//! A request's Job, planned by the domain and rendered here, as the apiserver receives it.

use serde_json::json;

use std::collections::BTreeMap;

use super::*;
use crate::{
    config::Settings,
    domain::{
        job::{fingerprint, plan_job, walltime, JobDefaults},
        keys::{ANN_CANCELLED, ANN_FINGERPRINT, LABEL_INSTANCE, LABEL_JOB_ID},
        record::plan_tombstone,
        request::{parse_request, JobRequest},
        ValidationError,
    },
};

fn settings(args: &[&str]) -> JobDefaults {
    Settings::from_args(args).unwrap().job_defaults()
}

fn request(extra: serde_json::Value) -> JobRequest {
    let mut v = json!({"schema": "k8s-job-worker/job-request/v1", "job_id": "42", "command_line": "samtools sort x", "image": "busybox"});
    v.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    parse_request(&serde_json::to_vec(&v).unwrap(), 1 << 20).unwrap()
}

fn build(request: &JobRequest, s: &JobDefaults) -> Result<Job, ValidationError> {
    plan_job(request, s).map(|plan| job(&plan, "ns"))
}

fn pod(job: &Job) -> &PodSpec {
    job.spec.as_ref().unwrap().template.spec.as_ref().unwrap()
}

#[test]
fn the_runner_pod_spec() {
    let s = settings(&["--k8s-galaxy-instance-id", "main", "--k8s-pod-retrials", "2", "--k8s-pull-policy", "Always"]);
    let job = build(&request(json!({"working_directory": "/jobs/42", "destination_id": "k8s_dest"})), &s).unwrap();
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
fn galaxy_26_retry_names_and_the_back_off_limit() {
    let retrials = |args: &[&str], extra| build(&request(extra), &settings(args)).unwrap().spec.unwrap().backoff_limit;
    assert_eq!(retrials(&[], json!({})), Some(3), "the worker's default");
    assert_eq!(retrials(&["--k8s-pod-retries", "1"], json!({})), Some(1));
    assert_eq!(retrials(&["--k8s-pod-retrials", "2", "--k8s-pod-retries", "1"], json!({})), Some(1));
    assert_eq!(retrials(&[], json!({"max_pod_retries": 5})), Some(5));
    assert_eq!(retrials(&["--k8s-job-spec-back-off-limit", "2"], json!({"max_pod_retries": 5})), Some(2));
}

#[test]
fn the_shell_comes_from_the_request_within_the_allow_list() {
    let job = build(&request(json!({"shell": "/bin/sh"})), &settings(&[])).unwrap();
    assert_eq!(pod(&job).containers[0].command.as_deref().unwrap(), ["/bin/sh", "-c", "samtools sort x"]);
    let err = build(&request(json!({"shell": "/usr/bin/python3"})), &settings(&[])).unwrap_err();
    assert!(matches!(err, ValidationError::Policy { rule: "policy_allowed_shells", .. }), "{err}");
    let only_sh = settings(&["--policy-allowed-shells", "/bin/sh"]);
    assert!(build(&request(json!({"shell": "/bin/bash"})), &only_sh).is_err());
    assert!(build(&request(json!({})), &only_sh).is_ok(), "no shell named: the runner's /bin/bash");
}

#[test]
fn resources_come_from_the_request_or_the_defaults() {
    let s = settings(&["--k8s-default-requests-cpu", "1", "--k8s-default-limits-memory", "0.5"]);
    let job = build(&request(json!({"limits_cpu": 2.5, "requests_memory": 3, "requests_cpu": 0})), &s).unwrap();
    let res = pod(&job).containers[0].resources.clone().unwrap();
    let (req, lim) = (res.requests.unwrap(), res.limits.unwrap());
    assert_eq!(req.get("cpu"), None, "0 means unset, even over a default");
    assert_eq!(req["memory"].0, "3G");
    assert_eq!(lim["cpu"].0, "2500m");
    assert_eq!(lim["memory"].0, "500M", "default float memory");
}

#[test]
fn invalid_resource_strings_are_refused_by_name() {
    let err = build(&request(json!({"limits_memory": "lots"})), &settings(&[])).unwrap_err();
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
    let job = build(&request(json!({})), &s).unwrap();
    let pod = pod(&job);
    let sc = pod.security_context.as_ref().unwrap();
    assert_eq!(sc.fs_group, Some(1000));
    assert_eq!(sc.supplemental_groups, None, "0 is not > 0");
    assert_eq!(pod.volumes.as_ref().unwrap()[0].persistent_volume_claim.as_ref().unwrap().claim_name, "galaxy-pvc");
    assert_eq!(pod.containers[0].volume_mounts.as_ref().unwrap()[0].mount_path, "/galaxy");
    assert_eq!(pod.containers[0].image_pull_policy, None, "unknown policies are left unset");
}

#[test]
fn issue25_per_job_sub_path_mounts_gpus_and_the_requests_groups_reach_the_pod() {
    let s = settings(&[
        "--policy-allowed-pvcs",
        "galaxy-data/jobs,galaxy-data/files",
        "--policy-allowed-run-as-ids",
        "1000-2000",
        "--policy-allowed-extended-resources",
        "nvidia.com/gpu=1",
        "--policy-allow-affinity",
        "true",
    ]);
    let job = build(
        &request(json!({
            "volumes": ["galaxy-data/jobs/000/42/working:/galaxy/jobs/000/42/working",
                        "galaxy-data/files/000/dataset_1.dat:/galaxy/files/000/dataset_1.dat:r"],
            "fs_group": 1500, "supplemental_groups": [1600], "pull_policy": "Never",
            "affinity": {"nodeAffinity": {}}, "extended_resources": {"nvidia.com/gpu": 1}, "limits_memory": "1Gi"})),
        &s,
    )
    .unwrap();
    let pod = pod(&job);
    assert_eq!(pod.volumes.as_ref().unwrap().len(), 1, "one volume per claim");
    let mounts = pod.containers[0].volume_mounts.as_ref().unwrap();
    let seen: Vec<_> = mounts.iter().map(|m| (m.sub_path.as_deref(), m.mount_path.as_str(), m.read_only)).collect();
    assert_eq!(
        seen,
        [
            (Some("jobs/000/42/working"), "/galaxy/jobs/000/42/working", None),
            (Some("files/000/dataset_1.dat"), "/galaxy/files/000/dataset_1.dat", Some(true)),
        ]
    );
    let sc = pod.security_context.as_ref().unwrap();
    assert_eq!((sc.fs_group, sc.supplemental_groups.clone()), (Some(1500), Some(vec![1600])));
    assert_eq!(pod.containers[0].image_pull_policy.as_deref(), Some("Never"));
    assert!(pod.affinity.as_ref().unwrap().node_affinity.is_some());
    let limits = pod.containers[0].resources.as_ref().unwrap().limits.as_ref().unwrap();
    assert_eq!(
        (limits["nvidia.com/gpu"].0.as_str(), limits["memory"].0.as_str()),
        ("1", "1Gi"),
        "strings pass through"
    );
    // The whole claim is every job's files: refused.
    let whole = request(json!({"volumes": ["galaxy-data:/galaxy"]}));
    assert!(matches!(build(&whole, &s), Err(ValidationError::Policy { rule: "policy_allowed_pvcs", .. })));
}

#[test]
fn fingerprints_follow_the_request() {
    let a = request(json!({"limits_memory": 1}));
    assert_eq!(fingerprint(&a), fingerprint(&request(json!({"limits_memory": 1}))));
    assert_ne!(fingerprint(&a), fingerprint(&request(json!({"limits_memory": 2}))));
    let job = build(&a, &settings(&[])).unwrap();
    assert_eq!(job.metadata.annotations.as_ref().unwrap()[ANN_FINGERPRINT], fingerprint(&a));
}

#[test]
fn a_tombstone_never_runs_a_pod() {
    let t = job(&plan_tombstone(&settings(&["--k8s-galaxy-instance-id", "main"]), "42", None, None, "user"), "ns");
    assert_eq!(t.metadata.name.as_deref(), Some("galaxy-main-42"));
    assert_eq!(t.spec.as_ref().unwrap().parallelism, Some(0));
    assert_eq!(t.metadata.annotations.as_ref().unwrap()[ANN_CANCELLED], "user");
}

fn with(args: &[&str], extra: serde_json::Value) -> Job {
    build(&request(extra), &settings(args)).unwrap()
}

fn refused(args: &[&str], extra: serde_json::Value) -> String {
    match build(&request(extra), &settings(args)) {
        Err(ValidationError::Policy { rule, .. }) => rule.to_string(),
        other => panic!("expected a policy refusal, got {other:?}"),
    }
}

#[test]
fn node_selector_from_worker_and_request() {
    let job = with(
        &["--k8s-node-selector", "pool=galaxy", "--policy-allowed-node-selectors", "disk=ssd"],
        json!({"node_selector": {"disk": "ssd"}}),
    );
    let sel = pod(&job).node_selector.clone().unwrap();
    assert_eq!((sel["pool"].as_str(), sel["disk"].as_str()), ("galaxy", "ssd"));
}

#[test]
fn tolerations_from_worker_and_request() {
    let tol = r#"[{"key": "galaxy", "operator": "Exists", "effect": "NoSchedule"}]"#;
    let job = with(
        &["--k8s-tolerations", tol, "--policy-allowed-tolerations", "gpu"],
        json!({"tolerations": [{"key": "gpu", "value": "yes", "effect": "NoExecute", "tolerationSeconds": 30}]}),
    );
    let t = pod(&job).tolerations.clone().unwrap();
    assert_eq!(t.len(), 2);
    assert_eq!(t[0].operator.as_deref(), Some("Exists"));
    assert_eq!(t[1].toleration_seconds, Some(30));
}

#[test]
fn affinity_from_the_worker() {
    let aff = r#"{"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}]}}}"#;
    let job = with(&["--k8s-affinity", aff], json!({}));
    assert!(pod(&job).affinity.as_ref().unwrap().node_affinity.is_some());
}

#[test]
fn priority_class_from_worker_or_request() {
    assert_eq!(
        pod(&with(&["--k8s-pod-priority-class", "galaxy-low"], json!({}))).priority_class_name.as_deref(),
        Some("galaxy-low")
    );
    let job = with(
        &["--k8s-pod-priority-class", "galaxy-low", "--policy-allowed-priority-classes", "galaxy-high"],
        json!({"priority_class": "galaxy-high"}),
    );
    assert_eq!(pod(&job).priority_class_name.as_deref(), Some("galaxy-high"));
}

#[test]
fn run_as_user_and_group() {
    let admin = ["--k8s-run-as-user-id", "1000", "--k8s-run-as-group-id", "1000"];
    let sc = pod(&with(&admin, json!({}))).security_context.clone().unwrap();
    assert_eq!((sc.run_as_user, sc.run_as_group), (Some(1000), Some(1000)));
    // A request's own user needs the policy's leave, within its ranges.
    assert_eq!(refused(&admin, json!({"run_as_user": 2000})), "policy_allowed_run_as_ids");
    let allowed = [&admin[..], &["--policy-allowed-run-as-ids", "2000-2999"]].concat();
    let sc = pod(&with(&allowed, json!({"run_as_user": 2000}))).security_context.clone().unwrap();
    assert_eq!((sc.run_as_user, sc.run_as_group), (Some(2000), Some(1000)));
}

#[test]
fn item7_a_record_is_kept_from_when_it_is_made_not_from_when_the_job_ended() {
    use crate::domain::{event::JobState, outcome::JobView, record::Record};
    let now: jiff::Timestamp = "2026-01-02T00:00:00Z".parse().unwrap();
    let record = Record::kept(JobState::Succeeded, Some(0), "done", std::time::Duration::from_secs(86_400), now);
    assert_eq!(record.until, "2026-01-03T00:00:00Z");
    // Finished a day ago (reported only now, after an outage): its TTL counts from its end.
    let ended = JobView { finished_at: Some("2026-01-01T00:00:00Z".into()), ..JobView::default() };
    let patch = record_patch(&record, &ended, now);
    assert_eq!(patch["spec"]["ttlSecondsAfterFinished"], 2 * 86_400, "{patch}");
    // Stopped without ending (an OOM kill, its Failed condition not there yet): it ends by its
    // deadline at the latest — a day from now, counted from its start — and goes a day after
    // it ends, whenever that is (never at once: found by the chaos run).
    let started = JobView { created: Some("2026-01-01T12:00:00Z".parse().unwrap()), ..JobView::default() };
    let patch = record_patch(&record, &started, now);
    assert_eq!(
        (patch["spec"]["activeDeadlineSeconds"].as_i64(), patch["spec"]["ttlSecondsAfterFinished"].as_i64()),
        (Some(86_400 + 43_200), Some(86_400))
    );
    assert_eq!(patch["spec"]["parallelism"], 0);
}

#[test]
fn supplemental_groups() {
    let sc = pod(&with(&["--k8s-supplemental-group-id", "555"], json!({}))).security_context.clone().unwrap();
    assert_eq!(sc.supplemental_groups, Some(vec![555]));
}

#[test]
fn extra_environment_and_galaxy_variables() {
    let job = with(
        &["--k8s-extra-job-envs", "TMPDIR=/scratch,GALAXY_SLOTS=99"],
        json!({"limits_cpu": 2, "limits_memory": 4, "env": [{"name": "A", "value": "1"}]}),
    );
    let env: BTreeMap<String, String> = pod(&job).containers[0]
        .env
        .clone()
        .unwrap()
        .into_iter()
        .map(|e| (e.name, e.value.unwrap_or_default()))
        .collect();
    assert_eq!(env["TMPDIR"], "/scratch");
    assert_eq!(env["A"], "1");
    assert_eq!(env["GALAXY_SLOTS"], "2", "derived from the resources, not overridable");
    assert_eq!(env["GALAXY_MEMORY_MB"], "3814");
    assert_eq!(env["GALAXY_MEMORY_MB_PER_SLOT"], "1907");
}

#[test]
fn extra_job_and_pod_labels_and_annotations() {
    let job = with(
        &[
            "--k8s-job-labels",
            "team=bio",
            "--k8s-pod-labels",
            "tier=batch",
            "--k8s-job-annotations",
            "owner=ops",
            "--k8s-pod-annotations",
            "scrape=no",
        ],
        json!({}),
    );
    assert_eq!(refused(&[], json!({"labels": {"app": "spoofed"}})), "reserved_metadata_keys");
    let labels = job.metadata.labels.as_ref().unwrap();
    assert_eq!(labels["team"], "bio");
    assert_eq!(labels["app"], "galaxy-42", "the worker's own labels cannot be overridden");
    assert_eq!(job.metadata.annotations.as_ref().unwrap()["owner"], "ops");
    let tmpl = job.spec.as_ref().unwrap().template.metadata.as_ref().unwrap();
    assert_eq!(tmpl.labels.as_ref().unwrap()["tier"], "batch");
    assert_eq!(tmpl.annotations.as_ref().unwrap()["scrape"], "no");
}

#[test]
fn several_pvc_mounts_with_subpath_and_read_only() {
    let asked = with(
        &["--k8s-persistent-volume-claims", "galaxy-data/jobs:/galaxy/jobs", "--policy-allowed-pvcs", "scratch"],
        json!({"volumes": ["scratch/tmp:/scratch:r"]}),
    );
    assert_eq!(pod(&asked).containers[0].volume_mounts.as_ref().unwrap().len(), 2);
    assert_eq!(
        refused(
            &["--k8s-persistent-volume-claims", "galaxy-data/jobs:/galaxy/jobs"],
            json!({"volumes": ["galaxy-data/x:/x"]})
        ),
        "policy_allowed_pvcs",
        "a worker PVC is not thereby open to requests"
    );
    let job = with(
        &[
            "--k8s-persistent-volume-claims",
            "galaxy-data/jobs:/galaxy/jobs,refdata:/ref:r,galaxy-data/objects:/objects:r",
        ],
        json!({}),
    );
    let pod = pod(&job);
    let volumes = pod.volumes.clone().unwrap();
    assert_eq!(volumes.len(), 2, "one volume per claim");
    let mounts = pod.containers[0].volume_mounts.clone().unwrap();
    assert_eq!(mounts.len(), 3);
    assert_eq!(mounts[0].sub_path.as_deref(), Some("jobs"));
    assert_eq!(mounts[1].read_only, Some(true));
    assert_eq!(mounts[0].name, mounts[2].name, "same claim, same volume");
}

#[test]
fn ttl_and_walltime() {
    let job = with(
        &["--k8s-job-ttl-secs-after-finished", "600", "--k8s-walltime-limit", "3600"],
        json!({"walltime_seconds": 7200}),
    );
    let spec = job.spec.as_ref().unwrap();
    assert_eq!(spec.ttl_seconds_after_finished, None, "set once its outcome is reported");
    assert_eq!(spec.active_deadline_seconds, Some(3600), "a request cannot exceed the limit");
    assert_eq!(walltime(Some(60), 3600), Some(60));
    assert_eq!(walltime(None, 0), None);
}

#[test]
fn every_policy_rule_refuses_by_name() {
    assert_eq!(
        refused(&["--policy-allowed-image-prefixes", "quay.io/biocontainers/"], json!({})),
        "policy_allowed_image_prefixes"
    );
    assert_eq!(refused(&["--policy-max-cpu", "2"], json!({"limits_cpu": 4})), "policy_max_cpu");
    assert_eq!(refused(&["--policy-max-memory", "8G"], json!({"requests_memory": 16})), "policy_max_memory");
    assert_eq!(refused(&[], json!({"volumes": ["data:/data"]})), "policy_allowed_pvcs");
    assert_eq!(
        refused(&["--policy-allowed-node-selectors", "pool=a"], json!({"node_selector": {"pool": "b"}})),
        "policy_allowed_node_selectors"
    );
    // Within the policy, all fine.
    with(
        &["--policy-allowed-image-prefixes", "busybox", "--policy-max-cpu", "2", "--policy-max-memory", "8G"],
        json!({"limits_cpu": 2, "limits_memory": 8}),
    );
}

#[test]
fn no_privilege_escalation_whatever_the_request() {
    let job = with(&[], json!({}));
    let sc = pod(&job).containers[0].security_context.clone().unwrap();
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(sc.privileged, None);
    assert_eq!(pod(&job).host_network, None);
}

#[test]
fn issue25_an_interactive_jobs_service_and_ingress_name_and_follow_it() {
    let args = ["--policy-allowed-ingress-domains", "its.example.org", "--policy-allowed-ingress-classes", "nginx"];
    let asked = json!({"interactive": {
        "entry_points": [
            {"port": 8888, "domain": "a1-tok.ep.interactivetool.its.example.org", "path": "/"},
            {"port": 8888, "domain": "its.example.org", "path": "/interactivetool/ep/a1/tok/"}],
        "ingress_class": "nginx", "tls": true}});
    let mut job = with(&args, asked.clone());
    // The container knows its entry point; the Job keeps its routes.
    let env = pod(&job).containers[0].env.clone().unwrap();
    let var = |name: &str| env.iter().find(|e| e.name == name).and_then(|e| e.value.clone());
    assert_eq!(var("INTERACTIVETOOL_PORT").as_deref(), Some("8888"));
    assert_eq!(var("INTERACTIVETOOL_DOMAIN").as_deref(), Some("a1-tok.ep.interactivetool.its.example.org"));
    assert_eq!(var("INTERACTIVETOOL_PATH").as_deref(), Some("/"));
    job.metadata.uid = Some("uid-1".into());
    let plan = super::super::routes::routes_of(&job).expect("an interactive Job carries its routes");
    let (service, ingress) = routes(&job, &plan);
    for owners in [&service.metadata.owner_references, &ingress.metadata.owner_references] {
        let owner = &owners.as_ref().unwrap()[0];
        assert_eq!((owner.kind.as_str(), owner.name.as_str(), owner.uid.as_str()), ("Job", "galaxy-42", "uid-1"));
    }
    let spec = service.spec.unwrap();
    assert_eq!(spec.selector.unwrap(), BTreeMap::from([("controller-uid".to_string(), "uid-1".to_string())]));
    assert_eq!(spec.ports.unwrap().iter().map(|p| p.port).collect::<Vec<_>>(), [8888], "each port once");
    let spec = ingress.spec.unwrap();
    assert_eq!(spec.ingress_class_name.as_deref(), Some("nginx"));
    let rules = spec.rules.unwrap();
    assert_eq!(rules[1].host.as_deref(), Some("its.example.org"));
    let path = &rules[1].http.as_ref().unwrap().paths[0];
    assert_eq!((path.path.as_deref(), path.path_type.as_str()), (Some("/interactivetool/ep/a1/tok/"), "Prefix"));
    assert_eq!(path.backend.service.as_ref().unwrap().name, "galaxy-42");
    let tls = spec.tls.unwrap();
    assert_eq!(tls[0].secret_name.as_deref(), Some("a1-tok-ep-interactivetool-its-example-org"));
    // A plain job has none; a domain outside the policy is refused.
    assert!(super::super::routes::routes_of(&with(&args, json!({}))).is_none());
    assert_eq!(refused(&["--policy-allowed-ingress-domains", "other.org"], asked), "policy_allowed_ingress_domains");
}
