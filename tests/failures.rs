//! Every way a job can fail gets its own state and a reason an admin can act on; placement
//! and identity settings reach the Job; the policy refuses by rule name; hostile requests
//! never reach the cluster. Against the real apiserver, broker and sim-node.

use std::time::Duration;

use k8s_job_worker::domain::event::JobState;
use k8s_job_worker_testkit::*;
use k8s_openapi::api::{core::v1::ResourceQuota, scheduling::v1::PriorityClass};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;

async fn terminal(h: &mut Harness, job_id: &str) -> k8s_job_worker::domain::event::JobEvent {
    h.until_terminal(job_id).await.pop().unwrap()
}

/// Requests here steer sim-node with its annotations, which the policy must then allow.
fn sim_node_annotations() -> Vec<String> {
    ["--policy-allowed-metadata-prefixes", SIM_NODE_ANNOTATIONS].map(String::from).to_vec()
}

#[tokio::test]
async fn walltime_exceeded() {
    let mut h = Harness::new("f-walltime").await;
    h.extra_args = vec!["--k8s-cleanup-job".into(), "never".into()];
    h.start_worker().await;
    let mut req = request("1", "sleep 60");
    req["walltime_seconds"] = json!(2);
    h.submit(&req).await;
    let e = terminal(&mut h, "1").await;
    assert_eq!(e.state, JobState::WalltimeExceeded, "{e:#?}");
    assert!(e.reason.contains("walltime of 2 s"), "{}", e.reason);
    h.finish().await;
}

#[tokio::test]
async fn unschedulable_with_the_schedulers_message_and_the_job_deleted() {
    let mut h = Harness::new("f-unsched").await;
    h.extra_args = vec![
        "--k8s-unschedulable-walltime-limit".into(),
        "3".into(),
        "--k8s-cleanup-job".into(),
        "never".into(),
        "--policy-allowed-node-selectors".into(),
        "gpu=a100".into(),
    ];
    h.start_worker().await;
    let mut req = request("2", "true");
    req["node_selector"] = json!({"gpu": "a100"});
    h.submit(&req).await;
    let e = terminal(&mut h, "2").await;
    assert_eq!(e.state, JobState::Unschedulable, "{e:#?}");
    assert!(e.reason.contains("didn't match node selector"), "{}", e.reason);
    h.cleaned_up("galaxy-main-2").await;
    h.finish().await;
}

#[tokio::test]
async fn image_pull_failure_names_the_image_and_deletes_the_job() {
    let mut h = Harness::new("f-pull").await;
    h.extra_args =
        vec!["--k8s-image-pull-grace-seconds".into(), "3".into(), "--k8s-cleanup-job".into(), "never".into()];
    h.start_worker().await;
    let mut req = request("3", "true");
    req["image"] = json!("registry.example.org/does-not-exist:1.0");
    h.submit(&req).await;
    let e = terminal(&mut h, "3").await;
    assert_eq!(e.state, JobState::ImagePullFailed, "{e:#?}");
    assert!(e.reason.contains("registry.example.org/does-not-exist:1.0"), "{}", e.reason);
    assert!(e.reason.contains("ErrImagePull") || e.reason.contains("ImagePullBackOff"), "{}", e.reason);
    h.cleaned_up("galaxy-main-3").await;
    h.finish().await;
}

#[tokio::test]
async fn an_invalid_image_name_fails_at_once() {
    let mut h = Harness::new("f-invalid").await;
    h.start_worker().await; // default grace: 120 s, which must not apply
    let mut req = request("4", "true");
    req["image"] = json!("Registry/BadName:1");
    h.submit(&req).await;
    let e =
        h.events_until("4", Duration::from_secs(20), |e| e.iter().any(|e| e.state.is_terminal())).await.pop().unwrap();
    assert_eq!(e.state, JobState::ImagePullFailed);
    assert!(e.reason.contains("InvalidImageName"), "{}", e.reason);
    h.finish().await;
}

/// Pods may wait this long to start before the job fails (the setting's environment variable).
fn pod_start_grace_of_3_s() -> Vec<(String, String)> {
    vec![("K8S_POD_START_GRACE_SECONDS".into(), "3".into())]
}

#[tokio::test]
async fn pods_that_never_start_for_a_quota_fail_with_its_message_and_the_job_is_deleted() {
    let mut h = Harness::new("f-quota").await;
    let quotas: Api<ResourceQuota> = Api::namespaced(h.client.clone(), &h.namespace);
    let quota = json!({"metadata": {"name": "no-pods"}, "spec": {"hard": {"pods": "0"}}});
    quotas.create(&PostParams::default(), &serde_json::from_value(quota).unwrap()).await.unwrap();
    // The quota admission ignores a quota whose status was never computed (it admits the pod);
    // the testenv runs no quota controller, so the test sets the status that controller would.
    let status = json!({"status": {"hard": {"pods": "0"}, "used": {"pods": "0"}}});
    quotas.patch_status("no-pods", &PatchParams::default(), &Patch::Merge(&status)).await.unwrap();
    h.extra_env = pod_start_grace_of_3_s();
    h.extra_args = vec!["--k8s-cleanup-job".into(), "never".into()];
    h.start_worker().await;
    h.submit(&request("10", "true")).await;
    let e = terminal(&mut h, "10").await;
    assert_eq!(e.state, JobState::Failed, "{e:#?}");
    assert!(e.reason.contains("FailedCreate") && e.reason.contains("exceeded quota: no-pods"), "{}", e.reason);
    assert!(e.pods.is_empty(), "{e:#?}");
    h.cleaned_up("galaxy-main-10").await; // a record: it cannot start the tool once the quota allows
    h.finish().await;
}

#[tokio::test]
async fn pods_that_never_start_with_a_container_config_error_fail_with_the_reason() {
    let mut h = Harness::new("f-configerr").await;
    h.extra_env = pod_start_grace_of_3_s();
    h.extra_args = vec!["--k8s-cleanup-job".into(), "never".into()];
    h.start_worker().await;
    let mut req = request("11", "true");
    req["image"] = json!("registry.example.org/config-error:1.0"); // sim-node: CreateContainerConfigError
    h.submit(&req).await;
    let e = terminal(&mut h, "11").await;
    assert_eq!(e.state, JobState::Failed, "{e:#?}");
    assert!(e.reason.contains("CreateContainerConfigError"), "{}", e.reason);
    h.cleaned_up("galaxy-main-11").await;
    h.finish().await;
}

#[tokio::test]
async fn eviction_is_preempted_not_a_tool_failure() {
    let mut h = Harness::new("f-evict").await;
    h.extra_args = sim_node_annotations();
    h.start_worker().await;
    let mut req = request("5", "sleep 60");
    req["max_pod_retrials"] = json!(2);
    req["annotations"] = json!({"sim-node.k8s-job-worker/evict-after-seconds": "1"});
    h.submit(&req).await;
    let e = terminal(&mut h, "5").await;
    assert_eq!(e.state, JobState::Preempted, "{e:#?}");
    assert!(e.reason.contains("low on resource"), "{}", e.reason);
    h.finish().await;
}

#[tokio::test]
async fn a_lost_node_is_node_lost() {
    let mut h = Harness::new("f-nodelost").await;
    h.extra_args = sim_node_annotations();
    h.start_worker().await;
    let mut req = request("6", "sleep 60");
    req["annotations"] = json!({"sim-node.k8s-job-worker/lose-node-after-seconds": "1"});
    h.submit(&req).await;
    let e = terminal(&mut h, "6").await;
    assert_eq!(e.state, JobState::NodeLost, "{e:#?}");
    assert!(e.reason.contains("unresponsive"), "{}", e.reason);
    h.finish().await;
}

#[tokio::test]
async fn placement_and_identity_reach_the_job_and_the_apiserver_accepts_them() {
    let mut h = Harness::new("f-place").await;
    let classes: Api<PriorityClass> = Api::all(h.client.clone());
    let class = format!("{}-high", h.id);
    classes
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": class}, "value": 1000})).unwrap(),
        )
        .await
        .unwrap();
    h.extra_args = [
        "--k8s-node-selector", "type=sim-node",
        "--k8s-tolerations", r#"[{"key": "galaxy", "operator": "Exists", "effect": "NoSchedule"}]"#,
        "--k8s-affinity", r#"{"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 1, "preference": {"matchExpressions": [{"key": "type", "operator": "In", "values": ["sim-node"]}]}}]}}"#,
        "--k8s-pod-priority-class", &class,
        "--k8s-run-as-user-id", "1000", "--k8s-run-as-group-id", "1001",
        "--k8s-fs-group-id", "1002", "--k8s-supplemental-group-id", "1003",
        "--k8s-extra-job-envs", "TMPDIR=/tmp",
        "--k8s-job-labels", "team=bio", "--k8s-pod-annotations", "note=hi",
        "--k8s-persistent-volume-claims", "galaxy-data/jobs:/galaxy/jobs,refdata:/ref:r",
        "--k8s-job-ttl-secs-after-finished", "600",
        "--k8s-cleanup-job", "never",
    ]
    .map(String::from)
    .to_vec();
    h.start_worker().await;
    let mut req = request("7", "echo $GALAXY_SLOTS $GALAXY_MEMORY_MB $TMPDIR");
    req["limits_cpu"] = json!(2);
    req["limits_memory"] = json!(1);
    h.submit(&req).await;
    h.events_until("7", Duration::from_secs(20), |e| !e.is_empty()).await;
    let job = h.jobs().get("galaxy-main-7").await.unwrap();
    assert_eq!(labels(&job)["team"], "bio");
    let spec = job.spec.unwrap();
    // Kubernetes must not delete it before its outcome is reported: the TTL comes after.
    assert_eq!(spec.ttl_seconds_after_finished, None);
    let tmpl = spec.template;
    assert_eq!(tmpl.metadata.unwrap().annotations.unwrap()["note"], "hi");
    let pod = tmpl.spec.unwrap();
    assert_eq!(pod.node_selector.unwrap()["type"], "sim-node");
    assert_eq!(pod.tolerations.unwrap()[0].key.as_deref(), Some("galaxy"));
    assert!(pod.affinity.unwrap().node_affinity.is_some());
    assert_eq!(pod.priority_class_name.as_deref(), Some(class.as_str()));
    let sc = pod.security_context.unwrap();
    assert_eq!((sc.run_as_user, sc.run_as_group, sc.fs_group), (Some(1000), Some(1001), Some(1002)));
    assert_eq!(sc.supplemental_groups, Some(vec![1003]));
    assert_eq!(pod.volumes.unwrap().len(), 2);
    let mounts = pod.containers[0].volume_mounts.clone().unwrap();
    assert_eq!((mounts[0].sub_path.as_deref(), mounts[1].read_only), (Some("jobs"), Some(true)));
    // The pod really runs (the scheduler honours the selector) and sees the Galaxy variables.
    let e = terminal(&mut h, "7").await;
    assert_eq!(e.state, JobState::Succeeded, "{e:#?}");
    assert_eq!(e.log_tail.as_deref(), Some("2 953 /tmp\n"));
    let jobs = h.jobs();
    wait_for("the TTL once reported", Duration::from_secs(20), || async {
        jobs.get("galaxy-main-7").await.unwrap().spec.unwrap().ttl_seconds_after_finished == Some(600)
    })
    .await;
    let _ = classes.delete(&class, &Default::default()).await;
    h.finish().await;
}

#[tokio::test]
async fn the_policy_refuses_by_rule_name() {
    let mut h = Harness::new("f-policy").await;
    h.extra_args = [
        "--policy-allowed-image-prefixes",
        "quay.io/biocontainers/",
        "--policy-max-cpu",
        "4",
        "--policy-max-memory",
        "8G",
        "--policy-allowed-pvcs",
        "refdata",
        "--policy-allowed-node-selectors",
        "pool=galaxy",
    ]
    .map(String::from)
    .to_vec();
    h.start_worker().await;
    let cases = [
        ("p-image", json!({"image": "docker.io/library/busybox"}), "policy_allowed_image_prefixes"),
        ("p-cpu", json!({"limits_cpu": 16}), "policy_max_cpu"),
        ("p-mem", json!({"requests_memory": 64}), "policy_max_memory"),
        ("p-pvc", json!({"volumes": ["secrets:/secrets"]}), "policy_allowed_pvcs"),
        ("p-node", json!({"node_selector": {"pool": "gpu"}}), "policy_allowed_node_selectors"),
        ("p-toleration", json!({"tolerations": [{"operator": "Exists"}]}), "policy_allowed_tolerations"),
        ("p-priority", json!({"priority_class": "system-node-critical"}), "policy_allowed_priority_classes"),
        ("p-sidecar", json!({"annotations": {"sidecar.istio.io/inject": "false"}}), "policy_allowed_metadata_prefixes"),
        ("p-reserved", json!({"labels": {"k8s-job-worker/instance-id": "other"}}), "reserved_metadata_keys"),
    ];
    for (id, extra, _) in &cases {
        let mut req = request(id, "true");
        req.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        h.submit(&req).await;
    }
    for (id, _, rule) in &cases {
        let e = h.events_until(id, Duration::from_secs(20), |e| !e.is_empty()).await.remove(0);
        assert_eq!(e.state, JobState::Failed);
        assert!(e.reason.contains(rule), "{id}: {}", e.reason);
    }
    assert!(h.job_names().await.is_empty(), "nothing refused reaches the cluster");
    h.finish().await;
}

#[tokio::test]
async fn hostile_requests_never_reach_the_cluster() {
    let mut h = Harness::new("f-hostile").await;
    h.start_worker().await;
    let attempts = [
        ("h1", json!({"hostPath": "/"})),
        ("h2", json!({"hostNetwork": true})),
        ("h3", json!({"privileged": true})),
        ("h4", json!({"securityContext": {"privileged": true, "capabilities": {"add": ["SYS_ADMIN"]}}})),
        ("h5", json!({"pod_spec": {"hostPID": true}})),
        ("h6", json!({"volumes": [{"hostPath": {"path": "/etc"}}]})),
        ("h7", json!({"volumes": ["/etc:/host-etc"]})),
        ("h8", json!({"run_as_user": 0})),
        ("h9", json!({"tolerations": [{"key": "x", "hostNetwork": true}]})),
    ];
    for (id, extra) in &attempts {
        let mut req = request(id, "cat /etc/shadow");
        req.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        h.submit(&req).await;
    }
    for (id, _) in &attempts {
        let e = h.events_until(id, Duration::from_secs(20), |e| !e.is_empty()).await.remove(0);
        assert_eq!(e.state, JobState::Failed, "{id}: {e:#?}");
    }
    assert_eq!(h.dead_letters(attempts.len()).await.len(), attempts.len());
    // A legitimate job next to them: nothing forbidden in anything created.
    h.submit(&request("ok", "true")).await;
    terminal(&mut h, "ok").await;
    let ok = k8s_job_worker::domain::naming::job_name("galaxy", Some("main"), "ok", None);
    assert!(h.job_names().await.iter().all(|n| *n == ok));
    let pods = h.pods().list(&ListParams::default()).await.unwrap();
    let text = serde_json::to_string(&pods).unwrap();
    for forbidden in ["hostPath", "hostNetwork\":true", "privileged\":true", "capabilities", "hostPID"] {
        assert!(!text.contains(forbidden), "{forbidden} found in {text}");
    }
    h.finish().await;
}

#[tokio::test]
async fn a_status_request_republishes_the_current_state() {
    let mut h = Harness::new("f-status").await;
    h.start_worker().await;
    h.submit(&request("8", "sleep 30")).await;
    let first = h.events_until("8", Duration::from_secs(30), |e| e.iter().any(|e| e.state == JobState::Running)).await;
    let running = first.iter().find(|e| e.state == JobState::Running).unwrap().clone();
    let ask = |id: &str| {
        serde_json::to_vec(&json!({"schema": "k8s-job-worker/job-cancel/v1", "job_id": id, "action": "status"}))
            .unwrap()
    };
    h.publish_raw(&h.names.control_queue.clone(), &ask("8")).await;
    let again = h
        .events_until("8", Duration::from_secs(20), |e| e.iter().filter(|e| e.state == JobState::Running).count() == 2)
        .await;
    let repeat = again.iter().filter(|e| e.state == JobState::Running).nth(1).unwrap();
    assert_eq!(repeat.event_id, running.event_id, "same state, same id");
    assert!(repeat.reason.starts_with("status:"), "{}", repeat.reason);
    h.publish_raw(&h.names.control_queue.clone(), &ask("unknown")).await;
    let unknown = h.events_until("unknown", Duration::from_secs(20), |e| !e.is_empty()).await.remove(0);
    assert_eq!(unknown.state, JobState::Unknown, "no verdict: its request may still wait in the queue");
    assert!(unknown.reason.contains("no Kubernetes Job"), "{}", unknown.reason);
    h.finish().await;
}

#[tokio::test]
async fn a_preempted_job_is_resubmitted_without_using_its_retrials() {
    let mut h = Harness::new("f-resubmit").await;
    h.extra_args = [
        "--k8s-preempted-resubmit-delay-seconds",
        "1",
        "--k8s-preempted-max-resubmissions",
        "2",
        "--k8s-cleanup-job",
        "never",
    ]
    .map(String::from)
    .to_vec();
    h.extra_args.extend(sim_node_annotations());
    h.start_worker().await;
    let mut req = request("9", "sleep 60");
    req["max_pod_retrials"] = json!(0); // resubmissions must not need retrials
    req["annotations"] = json!({"sim-node.k8s-job-worker/evict-after-seconds": "1"});
    h.submit(&req).await;
    let events = h.events_until("9", Duration::from_secs(60), |e| e.iter().any(|e| e.state.is_terminal())).await;
    let last = events.last().unwrap();
    // Evicted every time here: after two resubmissions it is reported, once.
    assert_eq!(last.state, JobState::Preempted, "{events:#?}");
    assert!(last.reason.contains("after 2 resubmission(s)"), "{}", last.reason);
    let all = h.settle("9", Duration::from_secs(2)).await;
    assert_eq!(all.iter().filter(|e| e.state.is_terminal()).count(), 1, "{all:#?}");
    let job = h.jobs().get("galaxy-main-9").await.unwrap();
    assert_eq!(job.metadata.annotations.unwrap()["k8s-job-worker/resubmissions"], "2");
    h.finish().await;
}
