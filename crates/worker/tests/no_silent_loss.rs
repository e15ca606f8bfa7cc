//! The paths where a job could vanish, run twice or hang (the "no silent loss" review), each
//! against the real broker, apiserver and sim-node. The pure parts of the same findings are
//! unit-tested where they live (`item1_...`, `item2_...`, `item4_...` in the worker crate,
//! `item5_...`, `item6_...` in the domain crate).

use std::{path::PathBuf, time::Duration};

use k8s_job_worker::{
    domain::{
        event::JobState,
        request::{JobResubmit, RESUBMIT_SCHEMA},
    },
    k8s::render,
};
use k8s_job_worker_testkit::*;
use k8s_openapi::api::batch::v1::Job;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;

/// A scratch directory for files the tools write (sim-node runs them as local processes).
fn scratch(h: &Harness) -> PathBuf {
    let dir = log_dir().join(format!("{}-scratch", h.id));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn runs(path: &std::path::Path) -> usize {
    std::fs::read_to_string(path).map(|s| s.lines().count()).unwrap_or(0)
}

#[tokio::test]
async fn item5_a_finished_request_delivered_again_is_answered_from_its_record_and_never_runs_again() {
    let mut h = Harness::new("n-rerun").await;
    h.start_worker().await;
    let marker = scratch(&h).join("5.runs");
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
    assert_eq!(runs(&marker), 1, "the tool ran once");
    assert_eq!(h.job_names().await, ["galaxy-main-5"]);
    h.finish().await;
}

#[tokio::test]
async fn item3_a_resubmission_interrupted_after_the_old_job_went_is_carried_out() {
    let mut h = Harness::new("n-resubmit").await;
    h.start_worker().await;
    let marker = scratch(&h).join("3.runs");
    h.submit(&request("3", &format!("sleep 2; echo ran >> {}", marker.display()))).await;
    let both = |e: &[k8s_job_worker::domain::event::JobEvent]| {
        e.iter().any(|e| e.state == JobState::Running) && e.iter().any(|e| e.state == JobState::Submitted)
    };
    h.events_until("3", Duration::from_secs(30), both).await;
    h.settle("3", Duration::from_secs(1)).await; // the request's ack follows its `submitted`
                                                 // The reporter decided to resubmit the preempted job and published its intent, retired
                                                 // the old Job... and crashed before creating the new one.
    h.kill_worker();
    let jobs = h.jobs();
    let old: Job = jobs.get("galaxy-main-3").await.unwrap();
    let uid = old.metadata.uid.clone().unwrap();
    let intent = JobResubmit {
        schema: RESUBMIT_SCHEMA.into(),
        job_id: "3".into(),
        attempt: None,
        job_name: "galaxy-main-3".into(),
        replaces_uid: uid.clone(),
        job: serde_json::to_value(render::next_generation(&old)).unwrap(),
    };
    h.publish_raw(&h.names.control_queue, &serde_json::to_vec(&intent).unwrap()).await;
    let replaced = json!({"metadata": {"annotations": {"k8s-job-worker/replaced": "resubmitted after preemption"}}});
    let replaced = render::releasing(&uid, replaced); // as the worker marks it: let go too
    jobs.patch("galaxy-main-3", &PatchParams::default(), &Patch::Strategic(&replaced)).await.unwrap();
    jobs.delete("galaxy-main-3", &DeleteParams::background()).await.unwrap();
    wait_for("the old Job gone", Duration::from_secs(30), || async {
        jobs.get_opt("galaxy-main-3").await.unwrap().is_none_or(|j| j.metadata.uid.as_deref() != Some(&uid))
    })
    .await;
    // A worker starts again: the intent is still there, and carried out.
    h.start_worker().await;
    let events = h.until_terminal("3").await;
    assert_eq!(events.last().unwrap().state, JobState::Succeeded, "{events:#?}");
    assert!(!events.iter().any(|e| e.state == JobState::Lost));
    let job = jobs.get("galaxy-main-3").await.unwrap();
    assert_eq!(job.metadata.annotations.unwrap()["k8s-job-worker/resubmissions"], "1");
    h.finish().await;
}

#[tokio::test]
async fn item4_a_finished_job_deleted_while_no_worker_reports_is_held_then_reported_once_and_recorded() {
    let mut h = Harness::new("n-held").await;
    h.start_worker().await;
    let marker = scratch(&h).join("4.runs");
    let req = request("4", &format!("sleep 5; echo ran >> {}", marker.display()));
    h.submit(&req).await;
    h.events_until("4", Duration::from_secs(30), |e| e.iter().any(|e| e.state == JobState::Running)).await;
    h.settle("4", Duration::from_secs(1)).await; // the request's ack follows its `submitted`
    h.kill_worker();
    let jobs = h.jobs();
    wait_for("the Job succeeded", Duration::from_secs(30), || async {
        jobs.get("galaxy-main-4").await.unwrap().status.and_then(|s| s.succeeded) == Some(1)
    })
    .await;
    // Someone else deletes the finished Job (a TTL controller, an admin) while no worker runs.
    jobs.delete("galaxy-main-4", &DeleteParams::background()).await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let held = jobs.get("galaxy-main-4").await.expect("the worker's finalizer holds the unreported Job");
    assert!(held.metadata.deletion_timestamp.is_some());
    // The request is delivered again (its ack lost after the confirm) and a worker starts.
    h.submit(&req).await;
    h.start_worker().await;
    h.until_terminal("4").await;
    let events = h.settle("4", Duration::from_secs(3)).await;
    let terminal: Vec<_> = events.iter().filter(|e| e.state.is_terminal()).collect();
    assert!(
        terminal.iter().all(|e| e.state == JobState::Succeeded && e.event_id == terminal[0].event_id),
        "{events:#?}"
    );
    // Delivered while the held Job is still there, the request adopts it (`submitted` again,
    // the same event); delivered after, its record answers it. Never a second Job.
    let submitted: Vec<_> = events.iter().filter(|e| e.state == JobState::Submitted).collect();
    assert!(submitted.iter().all(|e| e.event_id == submitted[0].event_id), "never submitted anew: {events:#?}");
    h.cleaned_up("galaxy-main-4").await;
    let record = jobs.get("galaxy-main-4").await.expect("a record of the outcome");
    assert!(labels(&record).contains_key("k8s-job-worker/record"), "{record:#?}");
    // The deleted Job itself is the record, kept by the finalizer: its name is never free.
    assert_eq!(record.metadata.uid, held.metadata.uid);
    assert_eq!(runs(&marker), 1, "the tool ran once");
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
