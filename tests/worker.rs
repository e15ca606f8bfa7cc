//! The core path against the real broker, apiserver and sim-node: the worker binary consumes
//! requests and cancels and publishes events, which these tests collect from the result exchange.

use std::time::Duration;

use k8s_job_worker::{amqp::publisher::header_str, domain::event::JobState};
use k8s_job_worker_testkit::*;
use k8s_openapi::api::batch::v1::Job;
use kube::api::{ListParams, PostParams};
use serde_json::json;

fn states(events: &[k8s_job_worker::domain::event::JobEvent]) -> Vec<JobState> {
    events.iter().map(|e| e.state).collect()
}

fn terminal_count(events: &[k8s_job_worker::domain::event::JobEvent]) -> usize {
    events.iter().filter(|e| e.state.is_terminal()).count()
}

#[tokio::test]
async fn success_reports_submitted_running_succeeded_with_log_tail() {
    let mut h = Harness::new("w-ok").await;
    h.start_worker().await;
    h.submit(&request("1", "echo line one; echo line two; sleep 1")).await;
    let mut events = h.until_terminal("1").await;
    if events.len() == 3 && events[0].state == JobState::Running {
        // The request handler and the reporter are not ordered with each other: under load the
        // pod can be seen running before `submitted` is confirmed. Galaxy takes both orders.
        events.swap(0, 1);
    }
    assert_eq!(states(&events), vec![JobState::Submitted, JobState::Running, JobState::Succeeded]);
    let done = &events[2];
    assert_eq!(done.exit_code, Some(0));
    assert_eq!(done.log_tail.as_deref(), Some("line one\nline two\n"));
    assert_eq!(done.job_name, "galaxy-main-1");
    assert_eq!(done.instance_id.as_deref(), Some("main"));
    // Cleanup `always`: the Job goes once the terminal event is confirmed (kept as a record).
    h.cleaned_up("galaxy-main-1").await;
    h.finish().await;
}

#[tokio::test]
async fn failure_reports_exit_code_and_log_tail() {
    let mut h = Harness::new("w-fail").await;
    h.start_worker().await;
    h.submit(&request("2", "echo about to fail >&2; exit 3")).await;
    let events = h.until_terminal("2").await;
    let last = events.last().unwrap();
    assert_eq!(last.state, JobState::Failed);
    assert_eq!(last.exit_code, Some(3));
    assert!(last.reason.contains("exited with code 3"), "{}", last.reason);
    assert_eq!(last.log_tail.as_deref(), Some("about to fail\n"));
    h.finish().await;
}

/// Base64 of random bytes on one line: 4 MB that no compression shrinks.
const HUGE_LINE: &str = "head -c 3000000 /dev/urandom | base64 -w0; echo";
const HUGE_LINE_BYTES: u64 = 4_000_001;

#[tokio::test]
async fn the_log_tail_reads_at_most_log_tail_bytes_of_one_huge_line() {
    let mut h = Harness::new("w-hugeline").await;
    // The worker reaches the apiserver through a proxy that counts what it reads.
    let proxy = proxy::Proxy::start(apiserver_address()).await;
    let kubeconfig = log_dir().join(format!("{}.kubeconfig", h.id));
    kubeconfig_via(&format!("https://127.0.0.1:{}", proxy.port), &kubeconfig);
    h.extra_env = vec![("K8S_CONFIG_PATH".into(), kubeconfig.display().to_string())];
    h.extra_args = vec!["--log-tail-bytes".into(), "1000".into()];
    h.start_worker().await;
    h.submit(&request("1", HUGE_LINE)).await;
    h.submit(&request("2", &format!("{HUGE_LINE}; echo the end"))).await;
    let only = h.until_terminal("1").await.pop().unwrap();
    let then_end = h.until_terminal("2").await.pop().unwrap();
    assert_eq!((only.state, then_end.state), (JobState::Succeeded, JobState::Succeeded));
    let only = only.log_tail.unwrap_or_default();
    assert!(!only.is_empty() && only.len() <= 1000, "{} bytes", only.len());
    let tail = then_end.log_tail.unwrap_or_default();
    assert!(tail.len() <= 1000 && tail.ends_with("the end\n"), "the log's end, within the bound: {tail:?}");
    let read = proxy.bytes_from_target();
    assert!(
        read < HUGE_LINE_BYTES,
        "the worker read {read} bytes from the apiserver for two logs of {HUGE_LINE_BYTES}"
    );
    h.finish().await;
}

#[tokio::test]
async fn oom_kill_is_its_own_outcome() {
    let mut h = Harness::new("w-oom").await;
    h.start_worker().await;
    let mut req = request("3", "head -c 300M /dev/zero | tail");
    req["limits_memory"] = json!(0.1); // the runner's float form: 100M
    req["max_pod_retrials"] = json!(3);
    h.submit(&req).await;
    let events = h.until_terminal("3").await;
    let last = events.last().unwrap();
    assert_eq!(last.state, JobState::OomKilled, "{events:#?}");
    assert_eq!(last.exit_code, Some(137));
    // Retrying with the same limit is pointless: no further pod was made.
    let more = h.settle("3", Duration::from_secs(3)).await;
    assert_eq!(terminal_count(&more), 1);
    assert_eq!(last.pods.len(), 1);
    h.finish().await;
}

#[tokio::test]
async fn retrials_make_three_pods_then_fail() {
    let mut h = Harness::new("w-retry").await;
    h.start_worker().await;
    let mut req = request("4", "exit 5");
    req["max_pod_retrials"] = json!(2);
    h.submit(&req).await;
    let events = h.events_until("4", Duration::from_secs(120), |e| e.iter().any(|e| e.state.is_terminal())).await;
    let last = events.last().unwrap();
    assert_eq!(last.state, JobState::Failed);
    assert_eq!(last.pods.len(), 3, "{last:#?}");
    assert_eq!(last.exit_code, Some(5));
    h.finish().await;
}

#[tokio::test]
async fn the_same_request_twice_makes_one_job() {
    let mut h = Harness::new("w-dup").await;
    h.start_worker().await;
    let req = request("5", "sleep 3");
    h.submit(&req).await;
    h.submit(&req).await;
    let submitted = h
        .events_until("5", Duration::from_secs(30), |e| {
            e.iter().filter(|e| e.state == JobState::Submitted).count() == 2
        })
        .await;
    let subs: Vec<_> = submitted.iter().filter(|e| e.state == JobState::Submitted).collect();
    assert_eq!(subs[0].event_id, subs[1].event_id, "same job, same state, same id");
    assert_eq!(h.job_names().await, vec!["galaxy-main-5".to_string()]);
    let events = h.until_terminal("5").await;
    assert_eq!(events.last().unwrap().state, JobState::Succeeded);
    let all = h.settle("5", Duration::from_secs(3)).await;
    assert_eq!(terminal_count(&all), 1, "{all:#?}");
    assert!(all.iter().any(|e| e.reason.contains("adopted")), "{all:#?}");
    h.finish().await;
}

#[tokio::test]
async fn a_restarted_worker_adopts_its_job_and_reports_once() {
    let mut h = Harness::new("w-restart").await;
    h.start_worker().await;
    let req = request("6", "sleep 5; echo finished");
    h.submit(&req).await;
    h.events_until("6", Duration::from_secs(30), |e| e.iter().any(|e| e.state == JobState::Running)).await;
    let uid = h.jobs().get("galaxy-main-6").await.unwrap().metadata.uid;
    h.kill_worker();
    h.start_worker().await;
    // A redelivery of the same request (as after a crash before the ack) must adopt.
    h.submit(&req).await;
    let events = h.until_terminal("6").await;
    assert_eq!(events.last().unwrap().state, JobState::Succeeded);
    assert_eq!(events.last().unwrap().log_tail.as_deref(), Some("finished\n"));
    let all = h.settle("6", Duration::from_secs(3)).await;
    assert_eq!(terminal_count(&all), 1, "{all:#?}");
    let adopted = all.iter().find(|e| e.reason.contains("adopted")).expect("adopted submitted event");
    assert_eq!(adopted.state, JobState::Submitted);
    // Same Job object throughout (or already cleaned up after success).
    if let Some(job) = h.jobs().get_opt("galaxy-main-6").await.unwrap() {
        assert_eq!(job.metadata.uid, uid);
    }
    h.finish().await;
}

#[tokio::test]
async fn a_resubmission_with_more_memory_replaces_the_old_job() {
    let mut h = Harness::new("w-resub").await;
    h.start_worker().await;
    let mut req = request("8", "sleep 30");
    req["limits_memory"] = json!(1);
    h.submit(&req).await;
    h.events_until("8", Duration::from_secs(30), |e| e.iter().any(|e| e.state == JobState::Running)).await;
    req["limits_memory"] = json!(2);
    req["command_line"] = json!("echo bigger");
    h.submit(&req).await;
    let events = h.until_terminal("8").await;
    let last = events.last().unwrap();
    assert_eq!(last.state, JobState::Succeeded);
    assert_eq!(last.log_tail.as_deref(), Some("bigger\n"));
    let all = h.settle("8", Duration::from_secs(3)).await;
    assert_eq!(terminal_count(&all), 1, "old Job's outcome never reported: {all:#?}");
    h.finish().await;
}

#[tokio::test]
async fn malformed_messages_are_dead_lettered_with_a_reason() {
    let mut h = Harness::new("w-bad").await;
    h.extra_args = vec!["--max-message-bytes".into(), "4096".into()];
    h.start_worker().await;
    let q = h.names.request_queue.clone();
    let mut bad_value = request("bad-value", "true");
    bad_value["limits_memory"] = json!("lots");
    let mut wrong_schema = request("bad-schema", "true");
    wrong_schema["schema"] = json!("something-else/v9");
    let mut smuggled = request("bad-field", "true");
    smuggled["hostPath"] = json!("/");
    let oversize = request("bad-size", &"x".repeat(8000));
    let cases: Vec<(Vec<u8>, &str, Option<&str>)> = vec![
        (b"this is not json".to_vec(), "malformed", None),
        (br#"{"schema": "k8s-job-worker/job-request/v1"}"#.to_vec(), "malformed", None),
        (serde_json::to_vec(&wrong_schema).unwrap(), "schema", Some("bad-schema")),
        (serde_json::to_vec(&bad_value).unwrap(), "invalid", Some("bad-value")),
        (serde_json::to_vec(&smuggled).unwrap(), "malformed", Some("bad-field")),
        (serde_json::to_vec(&oversize).unwrap(), "too_large", Some("bad-size")),
    ];
    for (body, _, _) in &cases {
        h.publish_raw(&q, body).await;
    }
    let dead = h.dead_letters(cases.len()).await;
    assert_eq!(dead.len(), cases.len(), "every bad message is parked");
    for (body, kind, job_id) in &cases {
        let msg = dead.iter().find(|m| &m.delivery.data == body).expect("original body kept");
        let headers = msg.delivery.properties.headers();
        assert_eq!(header_str(headers, "x-k8s-job-worker-error").as_deref(), Some(*kind));
        assert!(header_str(headers, "x-k8s-job-worker-reason").is_some_and(|r| !r.is_empty()));
        if let Some(id) = job_id {
            let events = h.events_until(id, Duration::from_secs(20), |e| !e.is_empty()).await;
            assert_eq!(events[0].state, JobState::Failed);
            assert!(events[0].reason.starts_with("request refused"), "{}", events[0].reason);
        }
    }
    assert!(h.job_names().await.is_empty(), "no Job for a bad request");
    // Still serving.
    h.submit(&request("good", "true")).await;
    assert_eq!(h.until_terminal("good").await.last().unwrap().state, JobState::Succeeded);
    h.finish().await;
}

#[tokio::test]
async fn cancel_of_a_running_job_deletes_it_and_reports_cancelled() {
    let mut h = Harness::new("w-cancel").await;
    h.start_worker().await;
    h.submit(&request("9", "sleep 60")).await;
    h.events_until("9", Duration::from_secs(30), |e| e.iter().any(|e| e.state == JobState::Running)).await;
    h.cancel("9").await;
    let events = h.until_terminal("9").await;
    let last = events.last().unwrap();
    assert_eq!(last.state, JobState::Cancelled);
    assert_eq!(last.reason, "user cancelled");
    h.cleaned_up("galaxy-main-9").await;
    let all = h.settle("9", Duration::from_secs(2)).await;
    assert_eq!(terminal_count(&all), 1, "no `lost` after a cancel: {all:#?}");
    h.finish().await;
}

#[tokio::test]
async fn cancel_before_the_request_keeps_it_from_starting() {
    let mut h = Harness::new("w-precancel").await;
    h.start_worker().await;
    h.cancel("10").await;
    h.events_until("10", Duration::from_secs(20), |e| e.iter().any(|e| e.state == JobState::Cancelled)).await;
    h.submit(&request("10", "echo should never run")).await;
    let all = h.events_until("10", Duration::from_secs(20), |e| e.len() >= 2).await;
    assert!(all.iter().all(|e| e.state == JobState::Cancelled), "{all:#?}");
    assert_eq!(all[0].event_id, all[1].event_id, "deduplicable");
    let more = h.settle("10", Duration::from_secs(3)).await;
    assert!(more.iter().all(|e| e.state == JobState::Cancelled), "{more:#?}");
    assert!(h.pods().list(&ListParams::default()).await.unwrap().items.is_empty(), "no pod ever ran");
    h.finish().await;
}

#[tokio::test]
async fn an_adopted_job_keeps_its_labels_and_spec() {
    let mut h = Harness::new("w-spec").await;
    h.extra_args = vec!["--k8s-fs-group-id".into(), "1001".into(), "--k8s-pull-policy".into(), "IfNotPresent".into()];
    h.start_worker().await;
    let mut req = request("11", "sleep 1");
    req["requests_cpu"] = json!(0.5);
    req["limits_memory"] = json!(2);
    req["working_directory"] = json!("/tmp");
    req["destination_id"] = json!("k8s_default");
    h.submit(&req).await;
    h.events_until("11", Duration::from_secs(30), |e| !e.is_empty()).await;
    let job = h.jobs().get("galaxy-main-11").await.unwrap();
    let l = labels(&job);
    assert_eq!(l.get("app").map(String::as_str), Some("galaxy-main-11"));
    assert_eq!(l.get("app.kubernetes.io/managed-by").map(String::as_str), Some("k8s-job-worker"));
    assert_eq!(l.get("k8s-job-worker/instance-id").map(String::as_str), Some("main"));
    let pod = job.spec.unwrap().template.spec.unwrap();
    assert_eq!(pod.restart_policy.as_deref(), Some("Never"));
    assert_eq!(pod.security_context.unwrap().fs_group, Some(1001));
    let c = &pod.containers[0];
    assert_eq!(c.name, "k8s-default");
    assert_eq!(c.image.as_deref(), Some("quay.io/biocontainers/samtools:1.17"));
    assert_eq!(c.command.as_ref().unwrap()[..2], ["/bin/bash".to_string(), "-c".to_string()]);
    assert_eq!(c.working_dir.as_deref(), Some("/tmp"));
    assert_eq!(c.image_pull_policy.as_deref(), Some("IfNotPresent"));
    let res = c.resources.as_ref().unwrap();
    assert_eq!(res.requests.as_ref().unwrap()["cpu"].0, "500m");
    assert_eq!(res.limits.as_ref().unwrap()["memory"].0, "2G");
    h.finish().await;
}

/// issue 25: what Galaxy 26's runner lets a destination choose — groups, pull policy,
/// affinity, per-job sub-path volumes, GPUs — reaches the real apiserver's Job as asked, within
/// the policy; the whole claim is refused.
#[tokio::test]
async fn issue25_destination_choices_reach_the_job_within_the_policy() {
    let mut h = Harness::new("w-parity").await;
    h.extra_args = [
        "--policy-allowed-pvcs",
        "galaxy-data/jobs,galaxy-data/files",
        "--policy-allowed-run-as-ids",
        "1000-2000",
        "--policy-allow-affinity",
        "true",
        "--policy-allowed-extended-resources",
        "nvidia.com/gpu=1",
    ]
    .map(String::from)
    .to_vec();
    h.start_worker().await;
    let mut req = request("25", "sleep 1");
    req["volumes"] = json!([
        "galaxy-data/jobs/000/25/working:/galaxy/jobs/000/25/working",
        "galaxy-data/files/000/dataset_7.dat:/galaxy/files/000/dataset_7.dat:r"
    ]);
    req["fs_group"] = json!(1500);
    req["supplemental_groups"] = json!([1600]);
    req["pull_policy"] = json!("Never");
    req["affinity"] = json!({"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
        {"weight": 1, "preference": {"matchExpressions": [{"key": "gpu", "operator": "Exists"}]}}]}});
    req["extended_resources"] = json!({"nvidia.com/gpu": 1});
    h.submit(&req).await;
    h.events_until("25", Duration::from_secs(30), |e| e.iter().any(|e| e.state == JobState::Submitted)).await;
    let job = h.jobs().get("galaxy-main-25").await.unwrap();
    let pod = job.spec.unwrap().template.spec.unwrap();
    let mounts: Vec<_> = pod.containers[0]
        .volume_mounts
        .iter()
        .flatten()
        .map(|m| (m.sub_path.clone().unwrap_or_default(), m.mount_path.clone(), m.read_only.unwrap_or(false)))
        .collect();
    assert_eq!(
        mounts,
        [
            ("jobs/000/25/working".to_string(), "/galaxy/jobs/000/25/working".to_string(), false),
            ("files/000/dataset_7.dat".to_string(), "/galaxy/files/000/dataset_7.dat".to_string(), true),
        ]
    );
    let sc = pod.security_context.unwrap();
    assert_eq!((sc.fs_group, sc.supplemental_groups), (Some(1500), Some(vec![1600])));
    assert_eq!(pod.containers[0].image_pull_policy.as_deref(), Some("Never"));
    assert!(pod
        .affinity
        .unwrap()
        .node_affinity
        .unwrap()
        .preferred_during_scheduling_ignored_during_execution
        .is_some());
    let limits = pod.containers[0].resources.clone().unwrap().limits.unwrap();
    assert_eq!(limits["nvidia.com/gpu"].0, "1");
    // the whole claim (every job's files), or two GPUs: refused, with the rule named
    let mut whole = request("26", "true");
    whole["volumes"] = json!(["galaxy-data:/galaxy"]);
    h.submit(&whole).await;
    let mut two = request("27", "true");
    two["extended_resources"] = json!({"nvidia.com/gpu": 2});
    h.submit(&two).await;
    for (job_id, rule) in [("26", "policy_allowed_pvcs"), ("27", "policy_allowed_extended_resources")] {
        let events = h.events_until(job_id, Duration::from_secs(30), |e| !e.is_empty()).await;
        assert_eq!(events[0].state, JobState::Failed, "{events:#?}");
        assert!(events[0].reason.contains(rule), "{}", events[0].reason);
    }
    assert!(h.jobs().get_opt("galaxy-main-26").await.unwrap().is_none());
    h.finish().await;
}

/// Issue 25, interactive tools: a request with entry points gets a ClusterIP Service over the
/// tool's port and a `networking.k8s.io/v1` Ingress with a rule per entry point (class, TLS,
/// annotations as asked), both owned by the Job; the container knows its entry point
/// (`INTERACTIVETOOL_*`); the Service's endpoints reach the tool (sim-node runs it on the host
/// network); a cancel stops the tool and removes both; a domain outside the policy is refused.
#[tokio::test]
async fn issue25_interactive_tools_get_a_service_and_ingress_that_go_with_them() {
    use k8s_openapi::api::{
        core::v1::{Endpoints, Service},
        networking::v1::Ingress,
    };
    let mut h = Harness::new("w-interactive").await;
    h.extra_args = [
        "--policy-allowed-ingress-domains",
        "its.test",
        "--policy-allowed-ingress-classes",
        "nginx",
        "--policy-allowed-ingress-annotations",
        "nginx.ingress.kubernetes.io/proxy-",
    ]
    .map(String::from)
    .to_vec();
    h.start_worker().await;
    let port = std::net::TcpListener::bind("0.0.0.0:0").unwrap().local_addr().unwrap().port();
    let marker = h.scratch("interactive-env");
    let command = format!(
        "echo \"$INTERACTIVETOOL_PORT $INTERACTIVETOOL_DOMAIN $INTERACTIVETOOL_PATH\" > {}; \
         mkdir -p /tmp/it-$$ && cd /tmp/it-$$ && echo hello from the tool > index.html && \
         exec python3 -m http.server $INTERACTIVETOOL_PORT",
        marker.display()
    );
    let mut req = request("30", &command);
    req["interactive"] = json!({
        "entry_points": [
            {"port": port, "domain": "abc123.ep.its.test", "path": "/"},
            {"port": port, "domain": "its.test", "path": "/interactivetool/ep/abc123/xyz/"}
        ],
        "ingress_class": "nginx",
        "tls": true,
        "annotations": {"nginx.ingress.kubernetes.io/proxy-body-size": "0"}
    });
    h.submit(&req).await;
    h.events_until("30", Duration::from_secs(30), |e| e.iter().any(|e| e.state == JobState::Running)).await;
    let name = "galaxy-main-30";
    let job = h.jobs().get(name).await.unwrap();
    let uid = job.metadata.uid.clone().unwrap();
    let services: kube::Api<Service> = kube::Api::namespaced(h.client.clone(), &h.namespace);
    let ingresses: kube::Api<Ingress> = kube::Api::namespaced(h.client.clone(), &h.namespace);
    let service = services.get(name).await.expect("the Service exists once the job runs");
    let owners = service.metadata.owner_references.clone().unwrap();
    assert_eq!((owners[0].kind.as_str(), owners[0].uid.as_str()), ("Job", uid.as_str()));
    let spec = service.spec.unwrap();
    assert_eq!(spec.type_.as_deref(), Some("ClusterIP"));
    assert_eq!(spec.selector.unwrap().get("controller-uid"), Some(&uid));
    let ports: Vec<i32> = spec.ports.unwrap().iter().map(|p| p.port).collect();
    assert_eq!(ports, vec![i32::from(port)], "one port, once");
    let ingress = ingresses.get(name).await.expect("the Ingress exists once the job runs");
    assert_eq!(ingress.metadata.owner_references.unwrap()[0].uid, uid);
    assert_eq!(ingress.metadata.annotations.unwrap()["nginx.ingress.kubernetes.io/proxy-body-size"], "0");
    let spec = ingress.spec.unwrap();
    assert_eq!(spec.ingress_class_name.as_deref(), Some("nginx"));
    let rules: Vec<(String, String, String, i32)> = spec
        .rules
        .unwrap()
        .iter()
        .map(|r| {
            let path = &r.http.as_ref().unwrap().paths[0];
            let backend = path.backend.service.as_ref().unwrap();
            (
                r.host.clone().unwrap(),
                path.path.clone().unwrap(),
                backend.name.clone(),
                backend.port.as_ref().unwrap().number.unwrap(),
            )
        })
        .collect();
    let p = i32::from(port);
    assert_eq!(
        rules,
        vec![
            ("abc123.ep.its.test".into(), "/".into(), name.into(), p),
            ("its.test".into(), "/interactivetool/ep/abc123/xyz/".into(), name.into(), p),
        ]
    );
    let tls: Vec<(Vec<String>, String)> =
        spec.tls.unwrap().into_iter().map(|t| (t.hosts.unwrap(), t.secret_name.unwrap())).collect();
    assert_eq!(
        tls,
        vec![
            (vec!["abc123.ep.its.test".to_string()], "abc123-ep-its-test".to_string()),
            (vec!["its.test".to_string()], "its-test".to_string())
        ]
    );
    // The container knows its entry point, and the Service's endpoints reach the tool.
    let env = eventually(Duration::from_secs(20), || async { std::fs::read_to_string(&marker).ok() }).await;
    assert_eq!(env.unwrap().trim(), format!("{port} abc123.ep.its.test /"));
    let endpoints: kube::Api<Endpoints> = kube::Api::namespaced(h.client.clone(), &h.namespace);
    let target = eventually(Duration::from_secs(30), || async {
        let e = endpoints.get_opt(name).await.ok()??;
        let subset = e.subsets?.into_iter().next()?;
        let ip = subset.addresses?.first()?.ip.clone();
        Some(format!("{ip}:{}", subset.ports?.first()?.port))
    })
    .await
    .expect("the Service has a ready endpoint");
    let url = format!("http://{target}/");
    let answer = eventually(Duration::from_secs(20), || http_get(&url)).await.expect("the tool answers");
    assert_eq!(answer, (200, "hello from the tool\n".to_string()));
    // Cancelled (Galaxy deletes the job): the tool stops, the Service and Ingress go.
    h.cancel("30").await;
    let events = h.until_terminal("30").await;
    assert_eq!(events.last().unwrap().state, JobState::Cancelled);
    let gone = eventually(Duration::from_secs(30), || async {
        let none = services.get_opt(name).await.ok()?.is_none() && ingresses.get_opt(name).await.ok()?.is_none();
        none.then_some(())
    })
    .await;
    assert!(gone.is_some(), "the Service and Ingress are removed with the job's end");
    let stopped =
        eventually(Duration::from_secs(20), || async { http_get(&target).await.is_none().then_some(()) }).await;
    assert!(stopped.is_some(), "the tool no longer answers");
    // Outside the policy: refused with the rule, nothing made.
    let mut evil = request("31", "true");
    evil["interactive"] = json!({"entry_points": [{"port": port, "domain": "its.test.evil.example", "path": "/"}]});
    h.submit(&evil).await;
    let events = h.events_until("31", Duration::from_secs(30), |e| !e.is_empty()).await;
    assert_eq!(events[0].state, JobState::Failed, "{events:#?}");
    assert!(events[0].reason.contains("policy_allowed_ingress_domains"), "{}", events[0].reason);
    assert!(h.jobs().get_opt("galaxy-main-31").await.unwrap().is_none());
    assert!(services.get_opt("galaxy-main-31").await.unwrap().is_none());
    // Owned by the Job: with no worker left to remove them, they go when the Job goes (an
    // admin's `kubectl delete job`, its TTL) — Kubernetes' garbage collector.
    let mut kept = request("32", "exec sleep 300");
    kept["interactive"] = json!({"entry_points": [{"port": port, "domain": "its.test", "path": "/"}]});
    h.submit(&kept).await;
    h.events_until("32", Duration::from_secs(30), |e| e.iter().any(|e| e.state == JobState::Submitted)).await;
    assert!(services.get_opt("galaxy-main-32").await.unwrap().is_some());
    h.kill_worker();
    // as `kubectl delete job` does (the API's own default for Jobs orphans their dependents)
    h.jobs().delete("galaxy-main-32", &kube::api::DeleteParams::background()).await.unwrap();
    let collected = eventually(Duration::from_secs(60), || async {
        let none = services.get_opt("galaxy-main-32").await.ok()?.is_none()
            && ingresses.get_opt("galaxy-main-32").await.ok()?.is_none();
        none.then_some(())
    })
    .await;
    assert!(collected.is_some(), "the Service and Ingress are collected with their Job");
    h.finish().await;
}

/// item7: a Job that has the name a request would get but is not that job's Job (another
/// application's, or another Galaxy job's) is never adopted, replaced, cancelled or reported:
/// the request is refused (dead-lettered, `failed`), a cancel is answered `cancelled` without
/// touching it, and a status request finds no Job of this job (`unknown`).
#[tokio::test]
async fn item7_a_job_name_taken_by_another_jobs_job_is_left_alone() {
    let mut h = Harness::new("w-foreign").await;
    h.start_worker().await;
    let job = |name: &str, labels: serde_json::Value, annotations: serde_json::Value| -> Job {
        serde_json::from_value(json!({
            "metadata": {"name": name, "labels": labels, "annotations": annotations},
            "spec": {"parallelism": 0, "template": {"spec": {"restartPolicy": "Never",
                "containers": [{"name": "c", "image": "busybox", "command": ["true"]}]}}}
        }))
        .unwrap()
    };
    let ours = json!({"app.kubernetes.io/managed-by": "k8s-job-worker", "k8s-job-worker/instance-id": "main",
        "app": "galaxy-main-71"});
    let foreign = [
        ("70", job("galaxy-main-70", json!({"team": "other"}), json!({}))),
        ("71", job("galaxy-main-71", ours, json!({"k8s-job-worker/galaxy-job-id": "other"}))),
    ];
    let mut before = Vec::new();
    for (_, j) in &foreign {
        before.push(h.jobs().create(&PostParams::default(), j).await.unwrap());
    }
    for (id, _) in &foreign {
        h.submit(&request(id, "true")).await;
    }
    for (id, _) in &foreign {
        let e = h.events_until(id, Duration::from_secs(20), |e| !e.is_empty()).await.remove(0);
        assert_eq!(e.state, JobState::Failed, "{id}: {e:#?}");
        assert!(e.reason.starts_with("request refused") && e.reason.contains("not this job's"), "{id}: {}", e.reason);
    }
    let dead = h.dead_letters(foreign.len()).await;
    assert_eq!(dead.len(), foreign.len(), "both requests are dead-lettered");
    for msg in &dead {
        let kind = header_str(msg.delivery.properties.headers(), "x-k8s-job-worker-error");
        assert_eq!(kind.as_deref(), Some("name_taken"));
    }
    let control = h.names.control_queue.clone();
    for (id, _) in &foreign {
        h.cancel(id).await;
        let status = json!({"schema": "k8s-job-worker/job-cancel/v1", "job_id": id, "action": "status"});
        h.publish_raw(&control, &serde_json::to_vec(&status).unwrap()).await;
    }
    for (id, _) in &foreign {
        let has = |e: &[k8s_job_worker::domain::event::JobEvent], s| e.iter().any(|e| e.state == s);
        let events = h
            .events_until(id, Duration::from_secs(20), |e| has(e, JobState::Cancelled) && has(e, JobState::Unknown))
            .await;
        let unknown = events.iter().find(|e| e.state == JobState::Unknown).unwrap();
        assert!(unknown.reason.contains("not this job's"), "{id}: {}", unknown.reason);
    }
    for old in &before {
        let now = h.jobs().get(old.metadata.name.as_deref().unwrap()).await.unwrap();
        assert_eq!(now.metadata.uid, old.metadata.uid, "never replaced");
        assert_eq!(now.metadata.labels, old.metadata.labels);
        assert_eq!(now.metadata.annotations, old.metadata.annotations, "never marked");
        assert_eq!(now.metadata.deletion_timestamp, None, "never deleted");
        assert_eq!(now.spec.unwrap().parallelism, Some(0));
    }
    h.finish().await;
}

/// Issue 24 item 5: a request that names its Galaxy job handler has its events routed to that
/// handler alone (`<instance>.<handler>.<state>`, the handler one routing word), and so does
/// the answer to a status request that names it; a request without one keeps `<instance>.<state>`.
#[tokio::test]
async fn events_go_to_the_handler_that_sent_the_request() {
    use futures::StreamExt;
    let mut h = Harness::new("w-handler").await;
    h.start_worker().await;
    let galaxy = GalaxyClient::connect(&amqp_url()).await.unwrap();
    let exchange = h.names.result_exchange.clone();
    let mut mine = galaxy.bind_events(&exchange, "main.handler%2E1.*", None).await.unwrap();
    let other = GalaxyClient::connect(&amqp_url()).await.unwrap();
    let mut theirs = other.bind_events(&exchange, "main.handler%2E2.*", None).await.unwrap();
    let mut req = request("30", "true");
    req["handler"] = json!("handler.1");
    h.submit(&req).await;
    let status =
        json!({"schema": "k8s-job-worker/job-cancel/v1", "job_id": "31", "action": "status", "handler": "handler.1"});
    h.publish_raw(&h.names.control_queue.clone(), &serde_json::to_vec(&status).unwrap()).await;
    let mut states = Vec::new();
    while !(states.contains(&JobState::Succeeded) && states.contains(&JobState::Unknown)) {
        let delivery = tokio::time::timeout(Duration::from_secs(30), mine.next()).await.unwrap().unwrap().unwrap();
        let event: k8s_job_worker::domain::event::JobEvent = serde_json::from_slice(&delivery.data).unwrap();
        assert_eq!(event.handler.as_deref(), Some("handler.1"));
        assert!(delivery.routing_key.as_str().starts_with("main.handler%2E1."), "{}", delivery.routing_key);
        states.push(event.state);
    }
    assert!(tokio::time::timeout(Duration::from_secs(2), theirs.next()).await.is_err(), "nothing for handler.2");
    h.submit(&request("32", "true")).await;
    let plain = h.until_terminal("32").await; // no handler: <instance>.<state>, as before
    assert!(plain.iter().all(|e| e.handler.is_none()), "{plain:#?}");
    h.finish().await;
}
