//! The paths where a job could vanish, run twice or hang (the "no silent loss" review), each
//! against the real broker, apiserver and sim-node. The pure parts of the same findings are
//! unit-tested where they live (`item1_...`, `item2_...`, `item4_...` in the worker crate,
//! `item5_...`, `item6_...` in the domain crate).

use std::time::Duration;

use k8s_job_worker::{domain::event::JobState, k8s::render};
use k8s_job_worker_testkit::*;
use k8s_openapi::api::batch::v1::Job;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;

#[tokio::test]
async fn item5_a_finished_request_delivered_again_is_answered_from_its_record_and_never_runs_again() {
    let mut h = Harness::new("n-rerun").await;
    h.start_worker().await;
    let marker = h.scratch("5.runs");
    let req = request("5", &format!("echo ran >> {}", marker.display()));
    h.submit(&req).await;
    let first = h.until_terminal("5").await.pop().unwrap();
    assert_eq!(first.state, JobState::Succeeded);
    h.cleaned_up("galaxy-main-5").await; // cleanup `always`: the pods go, a record stays

    // The same request again (an ack lost after its confirm, a republish by Galaxy...).
    h.submit(&req).await;
    let all =
        h.events_until("5", Duration::from_secs(30), |e| e.iter().filter(|e| e.state.is_terminal()).count() == 2).await;
    let again = all.iter().filter(|e| e.state.is_terminal()).nth(1).unwrap();
    assert_eq!((again.state, &again.event_id), (JobState::Succeeded, &first.event_id), "the recorded outcome, same id");
    // A status request answers the recorded state, not `lost`.
    let status = json!({"schema": "k8s-job-worker/job-cancel/v1", "job_id": "5", "action": "status"});
    h.publish_raw(&h.names.control_queue, &serde_json::to_vec(&status).unwrap()).await;
    let all = h.events_until("5", Duration::from_secs(30), |e| e.iter().any(|e| e.reason.starts_with("status:"))).await;
    let answer = all.iter().find(|e| e.reason.starts_with("status:")).unwrap();
    assert_eq!((answer.state, &answer.event_id, answer.exit_code), (JobState::Succeeded, &first.event_id, Some(0)));
    let all = h.settle("5", Duration::from_secs(3)).await;
    assert!(all.iter().filter(|e| e.state == JobState::Submitted).count() == 1, "never submitted again: {all:#?}");
    assert_eq!(lines_in(&marker), 1, "the tool ran once");
    assert_eq!(h.job_names().await, ["galaxy-main-5"]);
    h.finish().await;
}

#[tokio::test]
async fn a_running_job_someone_else_deletes_is_reported_lost_and_let_go() {
    let mut h = Harness::new("n-deleted").await;
    h.start_worker().await;
    h.submit(&request("7", "sleep 60")).await;
    h.events_until("7", Duration::from_secs(30), |e| e.iter().any(|e| e.state == JobState::Running)).await;
    h.jobs().delete("galaxy-main-7", &DeleteParams::background()).await.unwrap();
    let last = h.until_terminal("7").await.pop().unwrap();
    assert_eq!(last.state, JobState::Lost, "{last:#?}");
    assert!(!last.reason.is_empty());
    let jobs = h.jobs();
    wait_for("the deleted Job let go", Duration::from_secs(30), || async {
        jobs.get_opt("galaxy-main-7").await.unwrap().is_none_or(|j| labels(&j).contains_key("k8s-job-worker/record"))
    })
    .await;
    h.cleaned_up("galaxy-main-7").await;
    h.finish().await;
}

#[tokio::test]
async fn item6_a_cancel_with_a_huge_reason_still_stops_the_job() {
    let mut h = Harness::new("n-reason").await;
    h.start_worker().await;
    h.submit(&request("6", "sleep 60")).await;
    h.events_until("6", Duration::from_secs(30), |e| e.iter().any(|e| e.state == JobState::Running)).await;
    // 300 KB: as an annotation the apiserver refuses it (422) — it used to be retried forever.
    let reason = "x".repeat(300 * 1024);
    let cancel = json!({"schema": "k8s-job-worker/job-cancel/v1", "job_id": "6", "reason": reason});
    h.publish_raw(&h.names.control_queue, &serde_json::to_vec(&cancel).unwrap()).await;
    let last = h.until_terminal("6").await.pop().unwrap();
    assert_eq!(last.state, JobState::Cancelled);
    assert!(last.reason.len() <= 1024 && last.reason.ends_with('…'), "{}", last.reason.len());
    h.cleaned_up("galaxy-main-6").await;
    h.finish().await;
}

#[tokio::test]
async fn a_stale_stop_never_stops_a_replacement() {
    let h = Harness::new("n-stale-stop").await;
    let jobs = h.jobs();
    let job = |cmd: &str| -> Job {
        serde_json::from_value(json!({"metadata": {"name": "x"}, "spec": {"parallelism": 1, "backoffLimit": 0,
            "template": {"spec": {"restartPolicy": "Never",
                "containers": [{"name": "c", "image": "busybox", "command": ["/bin/sh", "-c", cmd]}]}}}}))
        .unwrap()
    };
    let old = jobs.create(&PostParams::default(), &job("sleep 30")).await.unwrap();
    jobs.delete("x", &DeleteParams::foreground()).await.unwrap();
    wait_for("the old Job gone", Duration::from_secs(30), || async { jobs.get_opt("x").await.unwrap().is_none() })
        .await;
    jobs.create(&PostParams::default(), &job("sleep 30")).await.unwrap();
    // A report about the old Job arrives late: its stop patch names the old uid, which the
    // apiserver refuses to change (409 on newer versions, 422 "field is immutable" on 1.20).
    let stale = render::stop_patch(old.metadata.uid.as_deref().unwrap());
    let refused = jobs.patch("x", &PatchParams::default(), &Patch::Merge(&stale)).await;
    assert!(matches!(refused, Err(kube::Error::Api(ref e)) if e.code == 409 || e.code == 422), "{refused:?}");
    assert_eq!(jobs.get("x").await.unwrap().spec.unwrap().parallelism, Some(1), "the replacement runs on");
    h.finish().await;
}
