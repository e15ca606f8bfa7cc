//! The tracker state, fed watch objects directly.

use serde_json::json;

use super::*;
use crate::domain::outcome::Limits;
use crate::k8s::spec::{ANN_CANCELLED, ANN_FINGERPRINT, ANN_JOB_ID, ANN_REPLACED, ANN_REPORTED};

fn job(uid: &str, annotations: serde_json::Value, status: serde_json::Value) -> WatchedJob {
    let mut ann = json!({ANN_JOB_ID: "1", ANN_FINGERPRINT: "fp"});
    ann.as_object_mut().unwrap().extend(annotations.as_object().unwrap().clone());
    serde_json::from_value(json!({
        "metadata": {"name": "galaxy-main-1", "uid": uid, "annotations": ann},
        "spec": {"backoffLimit": 1, "template": {}},
        "status": status,
    }))
    .unwrap()
}

fn pod(name: &str, owner: &str, phase: &str, terminated: Option<(i32, &str)>) -> WatchedPod {
    let statuses = match terminated {
        Some((code, reason)) => json!([{"name": "c", "image": "i", "imageID": "", "ready": false, "restartCount": 0,
            "state": {"terminated": {"exitCode": code, "reason": reason, "finishedAt": "2026-01-01T00:00:05Z"}}}]),
        None => json!([]),
    };
    serde_json::from_value(json!({
        "metadata": {"name": name, "creationTimestamp": format!("2026-01-01T00:00:0{}Z", name.len() % 10),
            "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": "galaxy-main-1", "uid": owner, "controller": true}]},
        "status": {"phase": phase, "containerStatuses": statuses},
    }))
    .unwrap()
}

fn synced() -> TrackerState {
    let mut s = TrackerState::default();
    s.begin_job_relist();
    assert!(s.end_job_relist().is_empty());
    s.begin_pod_relist();
    assert!(s.end_pod_relist().is_empty());
    s
}

fn state_of(r: Option<Report>) -> Option<JobState> {
    r.map(|r| r.outcome.state)
}

#[test]
fn running_once_then_succeeded_once() {
    let mut s = synced();
    assert_eq!(state_of(s.apply_job(&job("u1", json!({}), json!({})))), None);
    assert_eq!(state_of(s.apply_pod(&pod("p1", "u1", "Running", None))), Some(JobState::Running));
    assert_eq!(state_of(s.apply_pod(&pod("p1", "u1", "Running", None))), None, "running is reported once");
    assert_eq!(state_of(s.apply_pod(&pod("p1", "u1", "Succeeded", Some((0, "Completed"))))), None);
    let done = s.apply_job(&job("u1", json!({}), json!({"conditions": [{"type": "Complete", "status": "True"}]})));
    let done = done.unwrap();
    assert_eq!(done.outcome.state, JobState::Succeeded);
    assert_eq!(done.pods, vec!["p1"]);
    assert_eq!(done.occurred_at.as_deref(), Some("2026-01-01T00:00:05Z"));
    assert_eq!(
        state_of(s.apply_job(&job("u1", json!({}), json!({"conditions": [{"type": "Complete", "status": "True"}]})))),
        None
    );
    assert_eq!(state_of(s.delete_job(&job("u1", json!({}), json!({})))), None, "our own cleanup is not `lost`");
}

#[test]
fn oom_is_reported_before_the_job_controller_reacts() {
    let mut s = synced();
    s.apply_job(&job("u1", json!({}), json!({})));
    let r = s.apply_pod(&pod("p1", "u1", "Failed", Some((137, "OOMKilled")))).unwrap();
    assert_eq!((r.outcome.state, r.outcome.exit_code), (JobState::OomKilled, Some(137)));
}

#[test]
fn nothing_is_reported_before_both_watches_listed() {
    let mut s = TrackerState::default();
    s.begin_job_relist();
    assert_eq!(
        state_of(s.apply_job(&job(
            "u1",
            json!({}),
            json!({"conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]})
        ))),
        None
    );
    assert!(s.end_job_relist().is_empty(), "pods not listed yet: an OOM kill could be missed");
    s.begin_pod_relist();
    s.apply_pod(&pod("p1", "u1", "Failed", Some((137, "OOMKilled"))));
    let reports = s.end_pod_relist();
    assert_eq!(reports.len(), 1);
    assert_eq!(reports[0].outcome.state, JobState::OomKilled);
}

#[test]
fn a_job_deleted_while_running_is_lost_unless_cancelled_or_replaced() {
    let mut s = synced();
    s.apply_job(&job("u1", json!({}), json!({})));
    s.apply_pod(&pod("p1", "u1", "Running", None));
    let lost = s.delete_job(&job("u1", json!({}), json!({}))).unwrap();
    assert_eq!(lost.outcome.state, JobState::Lost);
    assert!(!lost.exists);

    for ann in [json!({ANN_CANCELLED: "user"}), json!({ANN_REPLACED: "newer request"})] {
        let mut s = synced();
        s.apply_job(&job("u2", json!({}), json!({})));
        s.apply_pod(&pod("p2", "u2", "Running", None));
        assert_eq!(state_of(s.delete_job(&job("u2", ann, json!({})))), None);
    }
}

#[test]
fn a_finished_job_deleted_by_someone_else_still_gets_its_terminal_event() {
    let mut s = synced();
    let complete = json!({"conditions": [{"type": "Complete", "status": "True"}]});
    assert_eq!(state_of(s.delete_job(&job("u1", json!({}), complete.clone()))), None, "unknown uid: nothing to say");
    let mut s = TrackerState::default();
    s.begin_job_relist();
    s.apply_job(&job("u1", json!({}), json!({})));
    s.end_job_relist();
    s.begin_pod_relist();
    s.end_pod_relist();
    assert_eq!(state_of(s.delete_job(&job("u1", json!({}), complete))), Some(JobState::Succeeded));
}

#[test]
fn already_reported_jobs_are_not_reported_again_after_a_restart() {
    let mut s = TrackerState::default();
    s.begin_job_relist();
    s.apply_job(&job(
        "u1",
        json!({ANN_REPORTED: "failed"}),
        json!({"conditions": [{"type": "Failed", "status": "True"}]}),
    ));
    s.apply_job(
        &serde_json::from_value(json!({"metadata": {"name": "galaxy-main-2", "uid": "u2",
        "annotations": {ANN_JOB_ID: "2", ANN_FINGERPRINT: "fp"}},
        "spec": {"template": {}}, "status": {"conditions": [{"type": "Complete", "status": "True"}]}}))
        .unwrap(),
    );
    s.end_job_relist();
    s.begin_pod_relist();
    let reports = s.end_pod_relist();
    assert_eq!(reports.len(), 1, "only the unreported one");
    assert_eq!(reports[0].meta.job_id, "2");
}

#[test]
fn jobs_that_vanished_during_a_watch_outage_are_lost() {
    let mut s = synced();
    s.apply_job(&job("u1", json!({}), json!({})));
    s.apply_pod(&pod("p1", "u1", "Running", None));
    s.begin_job_relist();
    let reports = s.end_job_relist();
    assert_eq!(reports.iter().map(|r| r.outcome.state).collect::<Vec<_>>(), vec![JobState::Lost]);
}

#[test]
fn tombstones_are_never_reported() {
    let mut s = synced();
    let tombstone: WatchedJob = serde_json::from_value(json!({"metadata": {"name": "galaxy-main-3", "uid": "t",
        "annotations": {ANN_JOB_ID: "3", ANN_CANCELLED: "user"}}, "spec": {"parallelism": 0, "template": {}},
        "status": {"conditions": [{"type": "Failed", "status": "True", "reason": "DeadlineExceeded"}]}}))
    .unwrap();
    assert_eq!(state_of(s.apply_job(&tombstone)), None);
    assert_eq!(state_of(s.delete_job(&tombstone)), None);
}

#[test]
fn a_paused_replica_tracks_silently_and_reports_on_takeover() {
    let mut s = TrackerState::paused(Limits::default());
    s.begin_job_relist();
    s.end_job_relist();
    s.begin_pod_relist();
    s.end_pod_relist();
    s.apply_job(&job("u1", json!({}), json!({})));
    assert_eq!(state_of(s.apply_pod(&pod("p1", "u1", "Running", None))), None, "not the reporter");
    // A Job that vanished mid-run while another replica was reporting.
    s.apply_job(
        &serde_json::from_value(json!({"metadata": {"name": "galaxy-main-2", "uid": "u2",
        "annotations": {ANN_JOB_ID: "2", ANN_FINGERPRINT: "fp"}}, "spec": {"template": {}}}))
        .unwrap(),
    );
    s.apply_pod(&pod("p2", "u2", "Running", None));
    assert_eq!(state_of(s.delete_job(&job("u2", json!({}), json!({})))), None);
    // A finished-and-cleaned Job is not `lost`.
    s.apply_job(&job("u3", json!({}), json!({})));
    assert_eq!(
        state_of(s.delete_job(&job("u3", json!({}), json!({"conditions": [{"type": "Complete", "status": "True"}]})))),
        None
    );

    let mut reports: Vec<_> = s.set_reporting(true).into_iter().map(|r| (r.meta.uid, r.outcome.state)).collect();
    reports.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(reports, vec![("u1".to_string(), JobState::Running), ("u2".to_string(), JobState::Lost)]);
    assert!(s.set_reporting(true).is_empty(), "already reporting: nothing repeated");
}

#[test]
fn a_job_replaced_during_a_watch_outage_is_not_lost() {
    let mut s = synced();
    s.apply_job(&job("old", json!({}), json!({})));
    s.apply_pod(&pod("p1", "old", "Running", None));
    s.begin_job_relist();
    s.apply_job(&job("new", json!({ANN_FINGERPRINT: "fp2"}), json!({})));
    let reports = s.end_job_relist();
    assert!(reports.iter().all(|r| r.outcome.state != JobState::Lost), "{reports:?}");
}

#[test]
fn a_cancelled_job_is_handed_to_cleanup_once_and_never_reported_lost() {
    let mut s = synced();
    s.apply_job(&job("u1", json!({}), json!({})));
    s.apply_pod(&pod("p1", "u1", "Running", None));
    let cleanup = s.apply_job(&job("u1", json!({ANN_CANCELLED: "user"}), json!({}))).unwrap();
    assert_eq!((cleanup.outcome.state, cleanup.exists), (JobState::Cancelled, true));
    assert_eq!(state_of(s.apply_job(&job("u1", json!({ANN_CANCELLED: "user"}), json!({})))), None);
    assert_eq!(state_of(s.delete_job(&job("u1", json!({ANN_CANCELLED: "user"}), json!({})))), None);
}
