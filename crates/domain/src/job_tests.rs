//! The Job plan of a request, tombstones and records, as the domain plans them.

use super::*;
use crate::{
    keys::{ANN_CANCELLED, ANN_EXIT_CODE, ANN_REASON, ANN_REPORTED, LABEL_RECORD},
    outcome::JobMeta,
    record::{plan_record, plan_tombstone, Record},
    request::parse_request,
    state::JobState,
};
use serde_json::json;

fn request(extra: serde_json::Value) -> JobRequest {
    let mut v =
        json!({"schema": "k8s-job-worker/job-request/v1", "job_id": "42", "command_line": "true", "image": "busybox"});
    v.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    parse_request(&serde_json::to_vec(&v).unwrap(), 1 << 20).unwrap()
}

fn main() -> JobDefaults {
    JobDefaults {
        naming: Naming { prefix: "galaxy".into(), instance_id: Some("main".into()) },
        ..JobDefaults::default()
    }
}

#[test]
fn the_request_and_the_defaults_make_the_plan() {
    let defaults = JobDefaults {
        limits: Quantities { cpu: None, memory: Some("2G".into()) },
        env: Map::from([("TMPDIR".into(), "/scratch".into())]),
        ..main()
    };
    let plan = plan_job(&request(json!({"limits_cpu": 2, "attempt": 2, "shell": "/bin/sh"})), &defaults).unwrap();
    assert_eq!(plan.name, "galaxy-main-42-a2");
    assert_eq!(plan.container.command, ["/bin/sh", "-c", "true"]);
    assert_eq!(plan.container.limits, Quantities { cpu: Some("2".into()), memory: Some("2G".into()) });
    assert_eq!(plan.annotations[ANN_ATTEMPT], "2");
    assert_eq!(plan.labels[LABEL_INSTANCE], "main");
    let env: Map = plan.container.env.into_iter().collect();
    assert_eq!((env["TMPDIR"].as_str(), env["GALAXY_SLOTS"].as_str()), ("/scratch", "2"));
    assert_eq!((plan.parallelism, plan.backoff_limit), (1, 3));
}

#[test]
fn issue25_a_request_may_set_groups_pull_policy_affinity_and_gpus_as_galaxys_destinations_do() {
    let defaults = JobDefaults {
        identity: Identity { fs_group: Some(1001), supplemental_groups: vec![2001], ..Identity::default() },
        pull_policy: Some(PullPolicy::IfNotPresent),
        policy: Policy {
            allowed_run_as_ids: vec!["1000-5000".parse().unwrap()],
            allow_affinity: true,
            allowed_extended_resources: vec![("nvidia.com/gpu".into(), 1)],
            ..Policy::default()
        },
        ..main()
    };
    let plain = plan_job(&request(json!({})), &defaults).unwrap();
    assert_eq!((plain.identity.fs_group, plain.identity.supplemental_groups.as_slice()), (Some(1001), &[2001][..]));
    assert_eq!(plain.container.pull_policy, Some(PullPolicy::IfNotPresent));
    let affinity = json!({"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "gpu", "operator": "In", "values": ["a100"]}]}]}}});
    let asked = request(json!({"fs_group": 3000, "supplemental_groups": [3001, 3002], "pull_policy": "Always",
        "affinity": affinity, "extended_resources": {"nvidia.com/gpu": 1}}));
    let plan = plan_job(&asked, &defaults).unwrap();
    assert_eq!((plan.identity.fs_group, plan.identity.supplemental_groups.as_slice()), (Some(3000), &[3001, 3002][..]));
    assert_eq!(plan.container.pull_policy, Some(PullPolicy::Always));
    assert_eq!(plan.affinity, Some(affinity));
    assert_eq!(plan.container.extended, BTreeMap::from([("nvidia.com/gpu".to_string(), 1)]));
    let two = request(json!({"extended_resources": {"nvidia.com/gpu": 2}}));
    assert!(matches!(
        plan_job(&two, &defaults),
        Err(ValidationError::Policy { rule: "policy_allowed_extended_resources", .. })
    ));
}

#[test]
fn the_policy_is_checked_on_the_effective_values() {
    let defaults = JobDefaults {
        limits: Quantities { cpu: Some("8".into()), memory: None },
        policy: Policy { max_cpu_millis: Some(4000), ..Policy::default() },
        ..main()
    };
    let err = plan_job(&request(json!({})), &defaults).unwrap_err();
    assert!(matches!(err, ValidationError::Policy { rule: "policy_max_cpu", .. }), "{err}");
    assert!(plan_job(&request(json!({"limits_cpu": 1})), &defaults).is_ok());
}

#[test]
fn item5_a_record_names_the_outcome_and_never_runs_a_pod() {
    let meta = JobMeta { job_id: "42".into(), attempt: Some(2), fingerprint: "fp".into(), ..JobMeta::default() };
    let long = "x".repeat(10_000);
    let record = Record {
        state: JobState::Failed,
        exit_code: Some(3),
        reason: &long,
        keep_for: std::time::Duration::from_secs(86_400),
        until: "2026-01-02T00:00:00Z".into(),
    };
    let plan = plan_record(&main(), &meta, &record);
    assert_eq!((plan.name.as_str(), plan.parallelism), ("galaxy-main-42-a2", 0));
    assert_eq!(plan.labels[LABEL_RECORD], "true");
    assert_eq!((plan.annotations[ANN_REPORTED].as_str(), plan.annotations[ANN_EXIT_CODE].as_str()), ("failed", "3"));
    assert_eq!(plan.annotations[ANN_FINGERPRINT], "fp", "a repeated request is recognised");
    assert!(plan.annotations[ANN_REASON].len() <= 2048 && !plan.annotations.contains_key(ANN_CANCELLED));
    assert_eq!(plan.active_deadline_seconds, Some(86_400));
}

#[test]
fn a_tombstone_never_runs_a_pod() {
    let t = plan_tombstone(&main(), "42", None, None, "user");
    assert_eq!((t.name.as_str(), t.parallelism), ("galaxy-main-42", 0));
    assert_eq!(t.annotations[ANN_CANCELLED], "user");
    assert!(!t.annotations.contains_key(ANN_FINGERPRINT), "a tombstone is never reported");
}

fn refusal(extra: serde_json::Value, defaults: &JobDefaults) -> &'static str {
    match plan_job(&request(extra.clone()), defaults) {
        Err(ValidationError::Policy { rule, .. }) => rule,
        other => panic!("{extra}: expected a policy refusal, got {other:?}"),
    }
}

#[test]
fn item8_a_request_cannot_set_the_keys_the_worker_or_kubernetes_own() {
    for key in [
        "k8s-job-worker/cancelled",
        "k8s-job-worker/replaced",
        "k8s-job-worker/reported",
        "k8s-job-worker/instance-id",
        "k8s-job-worker/fingerprint",
        "app",
        "app.kubernetes.io/managed-by",
        "job-name",
        "controller-uid",
        "batch.kubernetes.io/job-name",
        "kubernetes.io/hostname",
        "node.kubernetes.io/instance-type",
        "k8s.io/x",
        "x.k8s.io/y",
    ] {
        for field in ["labels", "annotations"] {
            refusal(json!({ field: { key: "x" } }), &main());
        }
    }
    assert!(plan_job(&request(json!({"labels": {"team": "bio"}, "annotations": {"note": "hi"}})), &main()).is_ok());
}

#[test]
fn item8_isolation_weakening_annotations_are_refused() {
    for key in [
        "sidecar.istio.io/inject",
        "linkerd.io/inject",
        "container.apparmor.security.beta.kubernetes.io/job-container",
        "seccomp.security.alpha.kubernetes.io/pod",
    ] {
        refusal(json!({"annotations": { key: "unconfined" }}), &main());
    }
}

#[test]
fn item8_tolerations_and_priority_classes_need_an_allow_list() {
    let tolerations = json!({"tolerations": [{"key": "gpu", "operator": "Exists"}]});
    assert_eq!(refusal(tolerations, &main()), "policy_allowed_tolerations");
    assert_eq!(refusal(json!({"tolerations": [{"operator": "Exists"}]}), &main()), "policy_allowed_tolerations");
    assert_eq!(refusal(json!({"priority_class": "system-node-critical"}), &main()), "policy_allowed_priority_classes");
}

#[test]
fn item8_request_env_overrides_neither_the_operators_nor_the_derived_variables() {
    let defaults = JobDefaults { env: Map::from([("TMPDIR".into(), "/scratch".into())]), ..main() };
    let asked = json!({"limits_cpu": 2, "env": [
        {"name": "TMPDIR", "value": "/tmp/evil"}, {"name": "GALAXY_SLOTS", "value": "64"}, {"name": "A", "value": "1"}]});
    let env: Map = plan_job(&request(asked), &defaults).unwrap().container.env.into_iter().collect();
    assert_eq!(env["TMPDIR"], "/scratch", "the operator's k8s_extra_job_envs win over the request");
    assert_eq!(env["GALAXY_SLOTS"], "2", "derived from the resources");
    assert_eq!(env["A"], "1", "the request's own variables are kept");
}
