//! The worker keeps its contract against its own control queue, the broker and an admin's
//! kubectl (issue 23): each numbered finding of the reviews, against the real broker,
//! apiserver and sim-node. The pure parts are unit-tested where they live (`item1_...` in
//! the domain's `intent`, `item3_...` in `decision`, `item6_...` in `k8s::jobs`,
//! `item7_...` in `policy`, `naming` and `render`).

use std::time::Duration;

use k8s_job_worker::{
    amqp::publisher::header_str,
    domain::{event::JobState, intent::JobResubmit, outcome::JobMeta},
};
use k8s_job_worker_testkit::*;
use k8s_openapi::api::{batch::v1::Job, coordination::v1::Lease, core::v1::Namespace};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use lapin::{
    options::BasicPublishOptions,
    types::{AMQPValue, FieldArray, FieldTable},
    BasicProperties,
};
use serde_json::json;

fn resubmitting() -> Vec<String> {
    ["--k8s-preempted-resubmit-delay-seconds", "1", "--k8s-preempted-max-resubmissions", "2"].map(String::from).to_vec()
}

fn control(job_id: &str, action: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({"schema": "k8s-job-worker/job-cancel/v1", "job_id": job_id, "action": action})).unwrap()
}

/// What an intent names of a Job: its name, uid and the job's identity.
fn identity(job: &Job) -> JobMeta {
    let annotations = job.metadata.annotations.clone().unwrap_or_default();
    JobMeta {
        name: job.metadata.name.clone().unwrap(),
        uid: job.metadata.uid.clone().unwrap(),
        job_id: annotations["k8s-job-worker/galaxy-job-id"].clone(),
        fingerprint: annotations["k8s-job-worker/fingerprint"].clone(),
        ..JobMeta::default()
    }
}

async fn running(h: &mut Harness, job_id: &str) {
    h.events_until(job_id, Duration::from_secs(30), |e| e.iter().any(|e| e.state == JobState::Running)).await;
}

#[tokio::test]
async fn item1_a_forged_resubmit_creates_nothing_and_is_dead_lettered() {
    let mut h = Harness::new("c-forged").await;
    h.extra_args = resubmitting();
    h.start_worker().await;
    h.submit(&request("1", "sleep 60")).await;
    running(&mut h, "1").await;
    let job = h.jobs().get("galaxy-main-1").await.unwrap();
    let uid = job.metadata.uid.clone().unwrap();
    let privileged = json!({"metadata": {"name": "galaxy-main-2"}, "spec": {"template": {"spec": {
        "restartPolicy": "Never", "hostNetwork": true,
        "volumes": [{"name": "root", "hostPath": {"path": "/"}}],
        "containers": [{"name": "c", "image": "evil", "command": ["/bin/sh", "-c", "touch /host/owned"],
            "securityContext": {"privileged": true}, "volumeMounts": [{"name": "root", "mountPath": "/host"}]}]}}}});
    let forged = [
        // As the intents used to be: a whole Job, for a job that has none.
        json!({"schema": "k8s-job-worker/job-resubmit/v1", "job_id": "2", "job_name": "galaxy-main-2",
               "replaces_uid": "x", "job": privileged}),
        // As they are, for a job that has no Job: without the workers' seal.
        json!({"schema": "k8s-job-worker/job-resubmit/v1", "job_id": "3", "job_name": "galaxy-main-3",
               "fingerprint": "fp", "replaces_uid": "x", "resubmission": 1, "seal": "00"}),
        // For a running job, its uid read off the cluster: the reporter never marked it.
        serde_json::to_value(JobResubmit::sealed(b"guess", &identity(&job), 1)).unwrap(),
    ];
    for intent in &forged {
        h.publish_raw(&h.names.control_queue.clone(), &serde_json::to_vec(intent).unwrap()).await;
    }
    let dead = h.dead_letters(forged.len()).await;
    assert_eq!(dead.len(), forged.len(), "every forged intent is dead-lettered");
    for msg in &dead {
        let reason = header_str(msg.delivery.properties.headers(), "x-k8s-job-worker-reason").unwrap_or_default();
        assert!(!reason.is_empty(), "with a reason");
    }
    let reasons: Vec<String> =
        dead.iter().filter_map(|m| header_str(m.delivery.properties.headers(), "x-k8s-job-worker-reason")).collect();
    assert!(reasons.iter().any(|r| r.contains("unknown field `job`")), "{reasons:#?}");
    assert!(reasons.iter().any(|r| r.contains("seal")), "{reasons:#?}");
    assert!(reasons.iter().any(|r| r.contains("did not mark")), "{reasons:#?}");
    let all = h.settle("1", Duration::from_secs(2)).await;
    assert_eq!(h.job_names().await, ["galaxy-main-1"], "nothing created");
    let now = h.jobs().get("galaxy-main-1").await.unwrap();
    assert_eq!(now.metadata.uid.as_deref(), Some(uid.as_str()), "the running job is left alone");
    assert!(!all.iter().any(|e| e.state.is_terminal()), "no event for a refused intent: {all:#?}");
    for id in ["2", "3"] {
        assert!(h.received.iter().all(|e| e.job_id != id), "no event for job {id}");
    }
    h.finish().await;
}

#[tokio::test]
async fn item1_an_interrupted_resubmission_is_recorded_preempted_and_never_run_again() {
    let mut h = Harness::new("c-interrupted").await;
    h.extra_args = resubmitting();
    h.start_worker().await;
    let marker = h.scratch("4.runs");
    let req = request("4", &format!("echo ran >> {}; sleep 60", marker.display()));
    h.submit(&req).await;
    running(&mut h, "4").await;
    h.settle("4", Duration::from_secs(1)).await; // the request's ack follows its `submitted`
                                                 // The reporter marked the preempted job, published its intent, the handler retired the
                                                 // old Job... and the worker stopped before creating the new one.
    h.kill_worker();
    let leases: Api<Lease> = Api::namespaced(h.client.clone(), &h.namespace);
    let key = leases.get("galaxy-main-reporter").await.unwrap().metadata.uid.unwrap();
    let jobs = h.jobs();
    let old: Job = jobs.get("galaxy-main-4").await.unwrap();
    let intent = JobResubmit::sealed(key.as_bytes(), &identity(&old), 1);
    h.publish_raw(&h.names.control_queue, &serde_json::to_vec(&intent).unwrap()).await;
    let replaced = json!({"metadata": {"annotations": {"k8s-job-worker/replaced": "resubmitted after preemption"}}});
    jobs.patch("galaxy-main-4", &PatchParams::default(), &Patch::Merge(&replaced)).await.unwrap();
    jobs.delete("galaxy-main-4", &DeleteParams::foreground()).await.unwrap();
    wait_for("the old Job gone", Duration::from_secs(30), || async {
        jobs.get_opt("galaxy-main-4").await.unwrap().is_none()
    })
    .await;
    h.start_worker().await;
    let events = h.until_terminal("4").await;
    let last = events.last().unwrap();
    assert_eq!(last.state, JobState::Preempted, "{events:#?}");
    assert!(last.reason.contains("interrupted"), "{}", last.reason);
    let record = jobs.get("galaxy-main-4").await.expect("a record of the outcome");
    assert!(labels(&record).contains_key("k8s-job-worker/record"));
    // The same request again is answered from the record: the tool never runs again.
    h.submit(&req).await;
    let all =
        h.events_until("4", Duration::from_secs(30), |e| e.iter().filter(|e| e.state.is_terminal()).count() == 2).await;
    let terminal: Vec<_> = all.iter().filter(|e| e.state.is_terminal()).collect();
    assert_eq!(terminal[1].event_id, terminal[0].event_id, "{all:#?}");
    assert_eq!(lines_in(&marker), 1, "the tool ran once");
    h.finish().await;
}

#[tokio::test]
async fn item2_a_status_before_its_request_is_processed_is_unknown_and_the_job_then_runs() {
    let mut h = Harness::new("c-status").await;
    h.start_worker().await;
    let marker = h.scratch("5.runs");
    h.publish_raw(&h.names.control_queue.clone(), &control("5", "status")).await;
    let answer = h.events_until("5", Duration::from_secs(20), |e| !e.is_empty()).await.remove(0);
    assert_eq!(answer.state, JobState::Unknown, "{answer:#?}");
    assert!(!answer.state.is_terminal() && answer.reason.contains("not processed yet"), "{}", answer.reason);
    h.submit(&request("5", &format!("echo ran >> {}", marker.display()))).await;
    let events = h.until_terminal("5").await;
    assert_eq!(events.last().unwrap().state, JobState::Succeeded, "{events:#?}");
    assert_eq!(lines_in(&marker), 1);
    h.finish().await;
}

#[tokio::test]
async fn item3_a_cancel_that_meets_a_claimed_outcome_changes_nothing() {
    let mut h = Harness::new("c-claimed").await;
    h.start_worker().await;
    h.submit(&request("6", "sleep 60")).await;
    running(&mut h, "6").await;
    // The reporter has claimed an outcome on the Job and is publishing it (as after an OOM
    // kill): a cancel arriving now must not add a second, contradicting outcome.
    let claim = json!({"metadata": {"annotations": {"k8s-job-worker/reporting": "oom_killed"}}});
    h.jobs().patch("galaxy-main-6", &PatchParams::default(), &Patch::Merge(&claim)).await.unwrap();
    h.cancel("6").await;
    let all = h.settle("6", Duration::from_secs(4)).await;
    assert!(!all.iter().any(|e| e.state == JobState::Cancelled), "{all:#?}");
    let job = h.jobs().get("galaxy-main-6").await.unwrap();
    assert!(!job.metadata.annotations.unwrap().contains_key("k8s-job-worker/cancelled"), "never marked cancelled");
    h.finish().await;
}

#[tokio::test]
async fn item3_a_cancel_is_published_once_even_delivered_again() {
    let mut h = Harness::new("c-cancel-once").await;
    h.start_worker().await;
    h.submit(&request("7", "sleep 60")).await;
    running(&mut h, "7").await;
    h.cancel("7").await;
    h.until_terminal("7").await;
    h.cancel("7").await; // delivered again (an ack lost after the first was handled)
    let all = h.settle("7", Duration::from_secs(4)).await;
    assert_eq!(all.iter().filter(|e| e.state == JobState::Cancelled).count(), 1, "{all:#?}");
    h.finish().await;
}

#[tokio::test]
async fn item3_a_refused_control_message_is_dead_lettered_and_publishes_nothing() {
    let mut h = Harness::new("c-refused-control").await;
    h.start_worker().await;
    h.submit(&request("8", "sleep 3")).await;
    running(&mut h, "8").await;
    let newer_action = control("8", "pause");
    let newer_schema =
        serde_json::to_vec(&json!({"schema": "k8s-job-worker/job-cancel/v2", "job_id": "8", "action": "cancel"}))
            .unwrap();
    h.publish_raw(&h.names.control_queue.clone(), &newer_action).await;
    h.publish_raw(&h.names.control_queue.clone(), &newer_schema).await;
    assert_eq!(h.dead_letters(2).await.len(), 2);
    let events = h.until_terminal("8").await;
    assert_eq!(events.last().unwrap().state, JobState::Succeeded, "the job goes on: {events:#?}");
    let all = h.settle("8", Duration::from_secs(2)).await;
    assert!(!all.iter().any(|e| e.state == JobState::Failed), "{all:#?}");
    h.finish().await;
}

/// A request the broker parked after its delivery limit (every consumer crashed on it), as
/// it arrives in the dead-letter inbox.
fn parked(h: &Harness, body: &[u8]) -> (Vec<u8>, BasicProperties) {
    let mut death = FieldTable::default();
    death.insert("reason".into(), AMQPValue::LongString("delivery_limit".into()));
    death.insert("queue".into(), AMQPValue::LongString(h.names.request_queue.as_str().into()));
    let mut headers = FieldTable::default();
    headers.insert("x-death".into(), AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::FieldTable(death)])));
    headers.insert("x-first-death-queue".into(), AMQPValue::LongString(h.names.request_queue.as_str().into()));
    (body.to_vec(), BasicProperties::default().with_headers(headers))
}

#[tokio::test]
async fn item3_a_request_given_up_owes_a_failed_event_only_when_it_has_no_job() {
    let mut h = Harness::new("c-parked").await;
    h.start_worker().await;
    let with_job = request("9", "sleep 60");
    h.submit(&with_job).await;
    running(&mut h, "9").await;
    let without_job = request("10", "true");
    for req in [&with_job, &without_job] {
        let (body, properties) = parked(&h, &serde_json::to_vec(req).unwrap());
        let inbox = h.names.dead_letter_inbox.clone();
        let confirm = h
            .channel
            .basic_publish("".into(), inbox.into(), BasicPublishOptions::default(), &body, properties)
            .await
            .unwrap();
        confirm.await.unwrap();
    }
    let dead = h.dead_letters(2).await;
    assert_eq!(dead.len(), 2, "both moved on, each with its reason");
    let failed = h.events_until("10", Duration::from_secs(20), |e| !e.is_empty()).await.remove(0);
    assert_eq!(failed.state, JobState::Failed);
    let nine = h.settle("9", Duration::from_secs(3)).await;
    assert!(!nine.iter().any(|e| e.state == JobState::Failed), "its Job runs and reports itself: {nine:#?}");
    h.finish().await;
}

fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(-1.0)
}

#[tokio::test]
async fn item4_unroutable_events_hold_requests_instead_of_requeueing_them_in_a_loop() {
    let mut h = Harness::new("c-unroutable").await;
    // The worker publishes to an exchange nothing is bound to yet.
    let exchange = format!("{}.unbound", h.names.result_exchange);
    h.extra_env.push(("AMQP_RESULT_EXCHANGE".into(), exchange.clone()));
    h.extra_args.extend(["--retry-window-seconds", "2"].map(String::from));
    h.start_worker().await;
    for i in 0..3 {
        h.submit(&request(&format!("u{i}"), "true")).await;
    }
    tokio::time::sleep(Duration::from_secs(15)).await;
    let text = h.metrics().await;
    assert_eq!(metric(&text, "k8s_job_worker_events_unroutable "), 1.0, "{text}");
    assert_eq!(metric(&text, "k8s_job_worker_requests_total{outcome=\"requeued\"}"), 0.0, "no requeue loop: {text}");
    let tries = metric(&text, "k8s_job_worker_publish_failures_total{error=\"unroutable\"}");
    assert!(tries > 0.0 && tries < 100.0, "tries slow down, not thousands: {tries}");
    // Galaxy's queue is bound: the held requests go through.
    let galaxy = GalaxyClient::connect(&amqp_url()).await.unwrap();
    let mut events = galaxy.bind_events(&exchange, "#", None).await.unwrap();
    let mut seen = std::collections::HashSet::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while seen.len() < 3 && std::time::Instant::now() < deadline {
        use futures::StreamExt;
        if let Ok(Some(Ok(d))) = tokio::time::timeout(Duration::from_secs(5), events.next()).await {
            let e: k8s_job_worker::domain::event::JobEvent = serde_json::from_slice(&d.data).unwrap();
            if e.state == JobState::Succeeded {
                seen.insert(e.job_id);
            }
            let _ = d.ack(Default::default()).await;
        }
    }
    assert_eq!(seen.len(), 3, "every held request ran and was reported");
    assert_eq!(metric(&h.metrics().await, "k8s_job_worker_events_unroutable "), 0.0);
    let _ = h.channel.exchange_delete(exchange.into(), Default::default()).await;
    h.finish().await;
}

#[tokio::test]
async fn item5_a_namespace_with_running_finished_and_cancelled_jobs_is_deleted_within_60_s() {
    let mut h = Harness::new("c-namespace").await;
    h.start_worker().await;
    h.submit(&request("11", "true")).await;
    h.submit(&request("12", "sleep 300")).await;
    h.submit(&request("13", "sleep 300")).await;
    h.cancel("14").await; // a tombstone
    h.until_terminal("11").await;
    running(&mut h, "12").await;
    running(&mut h, "13").await;
    h.cancel("13").await;
    h.until_terminal("13").await;
    let namespaces: Api<Namespace> = Api::all(h.client.clone());
    let started = std::time::Instant::now();
    namespaces.delete(&h.namespace, &DeleteParams::default()).await.unwrap();
    wait_for("the namespace gone", Duration::from_secs(60), || async {
        namespaces.get_opt(&h.namespace).await.unwrap().is_none()
    })
    .await;
    eprintln!("namespace deleted in {:?}", started.elapsed());
    h.finish().await;
}

/// `kubectl delete job NAME` (it waits until the Job is gone), and how long it took.
fn kubectl_delete(namespace: &str, name: &str) -> Duration {
    let kubectl = std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".into());
    let started = std::time::Instant::now();
    let out = std::process::Command::new(kubectl)
        .args(["delete", "job", name, "-n", namespace, "--timeout=60s"])
        .output()
        .expect("kubectl runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    started.elapsed()
}

#[tokio::test]
async fn item5_kubectl_delete_of_a_running_or_reported_job_returns_within_seconds() {
    let mut h = Harness::new("c-kubectl").await;
    h.extra_args.extend(["--k8s-cleanup-job", "never"].map(String::from));
    h.start_worker().await;
    h.submit(&request("15", "true")).await;
    h.submit(&request("16", "sleep 300")).await;
    h.until_terminal("15").await;
    running(&mut h, "16").await;
    let jobs = h.jobs();
    wait_for("the outcome marked", Duration::from_secs(20), || async {
        let job = jobs.get("galaxy-main-15").await.unwrap();
        job.metadata.annotations.unwrap_or_default().contains_key("k8s-job-worker/reported")
    })
    .await;
    let reported = kubectl_delete(&h.namespace, "galaxy-main-15");
    let running = kubectl_delete(&h.namespace, "galaxy-main-16");
    assert!(reported < Duration::from_secs(10), "a reported Job: {reported:?}");
    assert!(running < Duration::from_secs(10), "a running Job: {running:?}");
    let last = h.until_terminal("16").await.pop().unwrap();
    assert_eq!(last.state, JobState::Lost);
    h.finish().await;
}

#[tokio::test]
async fn item6_without_an_instance_id_a_redelivered_request_adopts_its_job_and_runs_once() {
    let mut h = Harness::with_instance("c-noinst", None).await;
    h.start_worker().await;
    let marker = h.scratch("17.runs");
    let req = request("17", &format!("echo ran >> {}; sleep 3", marker.display()));
    h.submit(&req).await;
    running(&mut h, "17").await;
    let uid = h.jobs().get("galaxy-17").await.unwrap().metadata.uid;
    h.submit(&req).await; // delivered again
    let events = h.until_terminal("17").await;
    assert_eq!(events.last().unwrap().state, JobState::Succeeded);
    let all = h.settle("17", Duration::from_secs(3)).await;
    assert!(all.iter().any(|e| e.reason.contains("adopted")), "{all:#?}");
    assert!(!all.iter().any(|e| e.reason.contains("replaced")), "{all:#?}");
    if let Some(job) = h.jobs().get_opt("galaxy-17").await.unwrap() {
        assert_eq!(job.metadata.uid, uid, "the same Job throughout");
    }
    assert_eq!(lines_in(&marker), 1, "the tool ran once");
    h.finish().await;
}

#[tokio::test]
async fn item6_a_replacement_starts_only_once_the_old_pods_are_gone() {
    let mut h = Harness::new("c-replace").await;
    h.start_worker().await;
    let mut req = request("18", "sleep 60");
    req["limits_memory"] = json!(1);
    h.submit(&req).await;
    running(&mut h, "18").await;
    req["limits_memory"] = json!(2);
    req["command_line"] = json!("echo bigger");
    h.submit(&req).await;
    // Until the new Job's outcome, never a pod of each Job at once.
    let pods = h.pods();
    let app = ListParams::default().labels("app=galaxy-main-18");
    let watch = async {
        loop {
            let owners: std::collections::HashSet<String> = pods
                .list(&app)
                .await
                .unwrap()
                .items
                .iter()
                .filter_map(|p| p.metadata.owner_references.as_ref()?.first().map(|o| o.uid.clone()))
                .collect();
            assert!(owners.len() <= 1, "pods of two Jobs at once: {owners:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let events = tokio::select! {
        events = h.until_terminal("18") => events,
        () = watch => unreachable!(),
    };
    assert_eq!(events.last().unwrap().log_tail.as_deref(), Some("bigger\n"));
    h.finish().await;
}

#[tokio::test]
async fn item6_a_changed_request_of_a_finished_job_runs() {
    let mut h = Harness::new("c-rerequest").await;
    h.start_worker().await;
    let mut req = request("19", "echo first");
    h.submit(&req).await;
    assert_eq!(h.until_terminal("19").await.last().unwrap().log_tail.as_deref(), Some("first\n"));
    h.cleaned_up("galaxy-main-19").await; // a record now
    req["command_line"] = json!("echo second"); // e.g. more memory after an OOM, same job id
    req["limits_memory"] = json!(2);
    h.submit(&req).await;
    let all = h
        .events_until("19", Duration::from_secs(40), |e| {
            e.iter().filter(|e| e.state == JobState::Succeeded).count() == 2
        })
        .await;
    let second = all.iter().rfind(|e| e.state == JobState::Succeeded).unwrap();
    assert_eq!(second.log_tail.as_deref(), Some("second\n"), "{all:#?}");
    h.finish().await;
}

#[tokio::test]
async fn item6_a_running_job_someone_deletes_has_no_pod_left_when_lost_is_told() {
    let mut h = Harness::new("c-deleted").await;
    h.extra_env.push(("K8S_FINISHED_PODS_GRACE_SECONDS".into(), "60".into()));
    h.start_worker().await;
    h.submit(&request("20", "sleep 300")).await;
    running(&mut h, "20").await;
    let uid = h.jobs().get("galaxy-main-20").await.unwrap().metadata.uid.unwrap();
    h.jobs().delete("galaxy-main-20", &DeleteParams::background()).await.unwrap();
    let last = h.until_terminal("20").await.pop().unwrap();
    assert_eq!(last.state, JobState::Lost);
    let left: Vec<_> = h
        .pods()
        .list(&ListParams::default().labels("app=galaxy-main-20"))
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|p| {
            p.metadata.deletion_timestamp.is_none()
                && p.metadata.owner_references.iter().flatten().any(|o| o.uid == uid)
        })
        .collect();
    assert!(left.is_empty(), "its pods were stopped before `lost`: {left:#?}");
    h.finish().await;
}
