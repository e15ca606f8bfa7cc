//! The tracker state, fed watch objects directly.

use serde_json::json;

use super::*;
use crate::domain::keys::{ANN_CANCELLED, ANN_FINGERPRINT, ANN_JOB_ID, ANN_REPLACED, ANN_REPORTED};
use crate::domain::outcome::Limits;

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

/// Pod `p1` of Job `u1`, Pending, with more `status`.
fn pending_pod(status: serde_json::Value) -> WatchedPod {
    let mut status = status;
    status["phase"] = json!("Pending");
    serde_json::from_value(json!({
        "metadata": {"name": "p1", "creationTimestamp": "2026-01-01T00:00:01Z",
            "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": "galaxy-main-1", "uid": "u1", "controller": true}]},
        "status": status,
    }))
    .unwrap()
}

/// A settable clock of the calling test's own: `(set, clock)`; `set(n)` makes it read `n`
/// seconds after 2026-01-01T00:00:00Z, the time the objects here are made at.
macro_rules! fixed_clock {
    () => {{
        use std::sync::atomic::{AtomicI64, Ordering};
        static NOW: AtomicI64 = AtomicI64::new(0);
        fn clock() -> jiff::Timestamp {
            jiff::Timestamp::from_second(NOW.load(Ordering::SeqCst)).unwrap()
        }
        fn set(seconds: i64) {
            NOW.store(1_767_225_600 + seconds, Ordering::SeqCst)
        }
        (set as fn(i64), clock as fn() -> jiff::Timestamp)
    }};
}

fn synced() -> TrackerState {
    listed(TrackerState::default())
}

/// A replica that is not the reporter, both watches listed.
fn paused_synced() -> TrackerState {
    listed(TrackerState::paused(Limits::default()))
}

fn listed(mut s: TrackerState) -> TrackerState {
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

    let mut s = synced();
    s.apply_job(&job("u2", json!({}), json!({})));
    s.apply_pod(&pod("p2", "u2", "Running", None));
    assert_eq!(state_of(s.delete_job(&job("u2", json!({ANN_REPLACED: "newer request"}), json!({})))), None);

    // Cancelled and gone before its cancel was reported: `cancelled` all the same.
    let mut s = synced();
    s.apply_job(&job("u3", json!({}), json!({})));
    s.apply_pod(&pod("p3", "u3", "Running", None));
    let cancelled = s.apply_job(&job("u3", json!({ANN_CANCELLED: "user"}), json!({}))).unwrap();
    assert_eq!((cancelled.outcome.state, cancelled.outcome.reason.as_str()), (JobState::Cancelled, "user"));
    assert_eq!(state_of(s.delete_job(&job("u3", json!({ANN_CANCELLED: "user"}), json!({})))), None, "once");
    let mut s = synced();
    s.apply_job(&job("u4", json!({}), json!({})));
    let gone = s.delete_job(&job("u4", json!({ANN_CANCELLED: "user"}), json!({}))).unwrap();
    assert_eq!((gone.outcome.state, gone.exists), (JobState::Cancelled, false));
    assert_eq!(
        state_of(s.delete_job(&job("u5", json!({ANN_REPORTED: "cancelled", ANN_CANCELLED: "u"}), json!({})))),
        None
    );
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

/// A Job someone else deletes while the worker's finalizer holds it.
fn held_and_deleted(job: WatchedJob) -> WatchedJob {
    let mut job = job;
    job.metadata.finalizers = Some(vec![crate::domain::keys::FINALIZER.to_string()]);
    job.metadata.deletion_timestamp =
        Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time("2026-01-01T00:00:09Z".parse().unwrap()));
    job
}

#[test]
fn item7_a_claimed_job_that_leaves_the_watch_is_owed_its_outcome_unless_it_became_a_record() {
    // Another replica claimed its outcome and (most likely) turned it into a record: this
    // replica's watch says "deleted" with the Job as it was before, claimed and unmarked.
    // Whether it became a record the watch cannot tell; on a takeover it is owed "unless
    // recorded", and the executor looks before repeating it.
    let mut s = paused_synced();
    let complete = json!({"conditions": [{"type": "Complete", "status": "True"}]});
    let mut claimed = job("u1", json!({crate::domain::keys::ANN_CLAIMED: "succeeded"}), complete);
    claimed.metadata.finalizers = Some(vec![crate::domain::keys::FINALIZER.to_string()]);
    s.apply_job(&claimed);
    assert_eq!(state_of(s.delete_job(&claimed)), None, "not the reporter");
    let owed = s.set_reporting(true);
    assert_eq!(owed.len(), 1);
    assert_eq!((owed[0].outcome.state, owed[0].unless_recorded), (JobState::Succeeded, true));
    // So is an unclaimed one that someone deleted: the reporter then told its outcome and
    // created a record under its name (a chaos run found the takeover repeating it).
    let mut s = paused_synced();
    let plain = job("u2", json!({}), json!({"conditions": [{"type": "Complete", "status": "True"}]}));
    s.apply_job(&plain);
    s.delete_job(&plain);
    let owed = s.set_reporting(true);
    assert_eq!((owed.len(), owed[0].unless_recorded), (1, true));
}

#[test]
fn a_held_job_someone_deletes_is_reported_while_it_still_exists() {
    // Running: `lost` at once (the pods would otherwise run on), with the Job still there to
    // be let go and recorded.
    let mut s = synced();
    s.apply_job(&job("u1", json!({}), json!({})));
    assert_eq!(state_of(s.apply_pod(&pod("p1", "u1", "Running", None))), Some(JobState::Running));
    let lost = s.apply_job(&held_and_deleted(job("u1", json!({}), json!({})))).unwrap();
    assert_eq!((lost.outcome.state, lost.exists), (JobState::Lost, true));
    assert_eq!(
        crate::domain::decision::Presence::of(lost.exists, &lost.meta),
        crate::domain::decision::Presence::Deleting
    );
    assert_eq!(state_of(s.delete_job(&job("u1", json!({ANN_REPORTED: "lost"}), json!({})))), None, "once");

    // Finished and already reported: nothing more when the deletion shows, nor when it goes.
    let mut s = synced();
    let complete = json!({"conditions": [{"type": "Complete", "status": "True"}]});
    s.apply_job(&job("u2", json!({}), json!({})));
    s.apply_pod(&pod("p2", "u2", "Succeeded", Some((0, "Completed"))));
    assert_eq!(state_of(s.apply_job(&job("u2", json!({}), complete.clone()))), Some(JobState::Succeeded));
    assert_eq!(state_of(s.apply_job(&held_and_deleted(job("u2", json!({}), complete.clone())))), None);

    // Finished, deleted before this replica reported it: its own outcome, not `lost`.
    let mut s = synced();
    s.apply_job(&job("u3", json!({}), json!({})));
    s.apply_pod(&pod("p3", "u3", "Succeeded", Some((0, "Completed"))));
    let late = s.apply_job(&held_and_deleted(job("u3", json!({}), complete))).unwrap();
    assert_eq!((late.outcome.state, late.exists), (JobState::Succeeded, true));
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
    let mut s = paused_synced();
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
    // A Job the reporter reported and cleaned up (it marks it reported first) is owed nothing.
    s.apply_job(&job("u3", json!({}), json!({})));
    let complete = json!({"conditions": [{"type": "Complete", "status": "True"}]});
    assert_eq!(state_of(s.delete_job(&job("u3", json!({ANN_REPORTED: "succeeded"}), complete))), None);

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

#[test]
fn a_pod_waiting_past_its_limit_is_reported_on_the_timer() {
    let (set_clock, clock) = fixed_clock!();
    set_clock(2 + 10); // the pod is unschedulable from 00:00:02
    let limits = Limits { unschedulable_after: Some(std::time::Duration::from_secs(30)), ..Limits::default() };
    let waiting = pending_pod(json!({"conditions": [{"type": "PodScheduled", "status": "False",
        "reason": "Unschedulable", "message": "0/1 nodes", "lastTransitionTime": "2026-01-01T00:00:02Z"}]}));
    let mut s = synced().with_limits(limits, clock);
    s.apply_job(&job("u1", json!({}), json!({})));
    assert_eq!(state_of(s.apply_pod(&waiting)), None, "within its limit");
    assert!(s.tick().is_empty());
    set_clock(2 + 31);
    let due = s.tick();
    assert_eq!(due.iter().map(|r| r.outcome.state).collect::<Vec<_>>(), [JobState::Unschedulable], "no event needed");
    assert!(due[0].outcome.reason.contains("0/1 nodes"), "{}", due[0].outcome.reason);
    assert!(s.tick().is_empty(), "reported once");
}

#[test]
fn item4_a_finished_job_deleted_while_no_replica_reports_is_reported_by_the_next_reporter() {
    let mut s = paused_synced();
    s.apply_job(&job("u1", json!({}), json!({})));
    s.apply_pod(&pod("p1", "u1", "Failed", Some((3, "Error"))));
    // It fails and Kubernetes' TTL controller deletes it before any replica reported it.
    let failed = json!({"conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]});
    assert_eq!(state_of(s.delete_job(&job("u1", json!({}), failed))), None, "not the reporter");
    let reports = s.set_reporting(true);
    assert_eq!(reports.iter().map(|r| r.outcome.state).collect::<Vec<_>>(), [JobState::Failed]);
    assert_eq!((reports[0].outcome.exit_code, reports[0].exists), (Some(3), false));
}

#[test]
fn item1_a_dropped_report_is_due_again_whatever_the_reporting_role_did_meanwhile() {
    let mut s = synced();
    s.apply_job(&job("u1", json!({}), json!({})));
    s.apply_pod(&pod("p1", "u1", "Running", None));
    let complete = json!({"conditions": [{"type": "Complete", "status": "True"}]});
    let done = s.apply_job(&job("u1", json!({}), complete.clone())).unwrap();
    // The term lapsed while the executor held it, and the next renewal came before the
    // tracker noticed: the role watch merged false and true, the tracker never paused.
    s.dropped(done);
    // It is due again on the timer, without any watch event; and again if dropped again.
    let again = s.tick();
    assert_eq!(again.iter().map(|r| r.outcome.state).collect::<Vec<_>>(), [JobState::Succeeded]);
    s.dropped(again.into_iter().next().unwrap());
    assert_eq!(state_of(s.apply_job(&job("u1", json!({}), complete))), Some(JobState::Succeeded), "or on an event");
    assert!(s.tick().is_empty(), "handed out once");
    // A vanished Job's dropped report is kept by the report itself.
    s.apply_job(&job("u2", json!({}), json!({})));
    s.apply_pod(&pod("p2", "u2", "Running", None));
    let lost = s.delete_job(&job("u2", json!({}), json!({}))).unwrap();
    s.dropped(lost);
    assert_eq!(s.tick().iter().map(|r| r.outcome.state).collect::<Vec<_>>(), [JobState::Lost]);
}

fn deleting(mut pod: WatchedPod) -> WatchedPod {
    pod.metadata.deletion_timestamp =
        Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time("2026-01-01T00:00:09Z".parse().unwrap()));
    pod
}

#[test]
fn tracker_entries_for_pods_seen_after_their_jobs_deletion_are_removed_with_the_pods() {
    let mut s = synced();
    s.apply_job(&job("u1", json!({}), json!({"conditions": [{"type": "Complete", "status": "True"}]})));
    s.apply_pod(&pod("p1", "u1", "Succeeded", Some((0, "Completed"))));
    s.delete_job(&job("u1", json!({}), json!({"conditions": [{"type": "Complete", "status": "True"}]})));
    assert_eq!(s.pod_entries(), 0, "the Job took its pods with it");
    // The pod watch runs behind the Job watch: the garbage collector's last update, then the delete.
    let late = deleting(pod("p1", "u1", "Succeeded", Some((0, "Completed"))));
    assert_eq!(state_of(s.apply_pod(&late)), None);
    s.delete_pod(&late);
    assert_eq!(s.pod_entries(), 0, "no entry outlives its last pod");
}

#[test]
fn tracker_entries_for_pods_seen_after_their_jobs_deletion_do_not_survive_a_relist() {
    let mut s = synced();
    // A pod of a Job this replica never saw (deleted during a watch gap); its delete is missed too.
    s.apply_pod(&pod("p1", "gone", "Failed", Some((1, "Error"))));
    s.apply_pod(&pod("p22", "gone", "Failed", Some((1, "Error"))));
    s.apply_pod(&pod("p3", "alive", "Running", None));
    assert_eq!(s.pod_entries(), 2);
    s.begin_pod_relist();
    s.apply_pod(&pod("p3", "alive", "Running", None));
    s.end_pod_relist();
    assert_eq!(s.pod_entries(), 1, "only the pod that still exists is kept");
    // Nor does the Job watch's re-list drop the pod that still exists: its Job may come next.
    s.begin_job_relist();
    s.end_job_relist();
    assert_eq!(s.pod_entries(), 1);
}

#[test]
fn tracker_entries_keep_a_pod_that_arrives_before_its_job() {
    let mut s = synced();
    assert_eq!(state_of(s.apply_pod(&pod("p1", "u1", "Failed", Some((137, "OOMKilled"))))), None, "no Job yet");
    s.begin_job_relist();
    s.end_job_relist();
    s.begin_pod_relist();
    s.apply_pod(&pod("p1", "u1", "Failed", Some((137, "OOMKilled"))));
    s.end_pod_relist();
    assert_eq!(s.pod_entries(), 1);
    let r = s.apply_job(&job("u1", json!({}), json!({}))).unwrap();
    assert_eq!((r.outcome.state, r.pods), (JobState::OomKilled, vec!["p1".to_string()]));
}

/// A Job created at 00:00:00 in a state whose clock reads `clock`.
fn waiting_since_midnight(clock: fn() -> jiff::Timestamp, parallelism: i32) -> (TrackerState, WatchedJob) {
    let job: WatchedJob = serde_json::from_value(json!({
        "metadata": {"name": "galaxy-main-1", "uid": "u1", "creationTimestamp": "2026-01-01T00:00:00Z",
            "annotations": {ANN_JOB_ID: "1", ANN_FINGERPRINT: "fp"}},
        "spec": {"backoffLimit": 0, "parallelism": parallelism, "template": {}},
        "status": {},
    }))
    .unwrap();
    (synced().with_limits(Limits::default(), clock), job)
}

#[test]
fn pods_that_never_start_a_job_without_pods_fails_after_the_grace() {
    let (set_clock, clock) = fixed_clock!();
    set_clock(60);
    let (mut s, job) = waiting_since_midnight(clock, 1);
    assert_eq!(state_of(s.apply_job(&job)), None, "the job controller may still make its pod");
    assert!(s.tick().is_empty());
    set_clock(121);
    // The pod watch does not see waiting pods: only a read after the grace that finds none
    // says no pod was made.
    assert!(s.tick().is_empty(), "not read yet: a pod may wait unseen");
    let read = DueRead { uid: "u1".into(), name: "galaxy-main-1".into(), past_grace: true };
    assert_eq!(s.pods_to_read(), [read]);
    // No pod, and the job controller refused none: its queue is only long (a burst).
    assert_eq!(s.pods_read("u1", &[], None, clock()), None, "not refused: waiting");
    assert!(s.tick().is_empty());
    set_clock(125);
    assert_eq!(s.pods_to_read().len(), 1, "read again");
    let refused = "Error creating: pods \"x\" is forbidden: exceeded quota: q";
    let due: Vec<Report> = s.pods_read("u1", &[], Some(refused), clock()).into_iter().collect();
    assert_eq!(due.iter().map(|r| r.outcome.state).collect::<Vec<_>>(), [JobState::Failed]);
    assert!(
        due[0].outcome.reason.contains("no pod") && due[0].outcome.reason.contains(refused),
        "{}",
        due[0].outcome.reason
    );
    assert!(due[0].pods.is_empty());
    assert!(s.tick().is_empty(), "reported once");

    // A stopped Job (parallelism 0) has no pods by design.
    let (mut s, stopped) = waiting_since_midnight(clock, 0);
    assert_eq!(state_of(s.apply_job(&stopped)), None);
    assert!(s.tick().is_empty());
    // A pod that came in time ends the wait.
    let (mut s, job) = waiting_since_midnight(clock, 1);
    s.apply_job(&job);
    s.apply_pod(&pod("p1", "u1", "Pending", None));
    assert!(s.tick().is_empty());
}

#[test]
fn pods_that_never_start_a_container_config_error_fails_after_the_grace() {
    let (set_clock, clock) = fixed_clock!();
    set_clock(100);
    let (mut s, job) = waiting_since_midnight(clock, 1);
    let stuck = pending_pod(json!({"startTime": "2026-01-01T00:00:02Z",
        "containerStatuses": [{"name": "c", "image": "i", "imageID": "", "ready": false, "restartCount": 0,
            "state": {"waiting": {"reason": "CreateContainerConfigError",
                "message": "configmap \"galaxy-tools\" not found"}}}]}));
    s.apply_job(&job);
    assert_eq!(state_of(s.apply_pod(&stuck)), None, "within the grace: a missing ConfigMap may still come");
    assert!(s.tick().is_empty());
    set_clock(123);
    let due = s.tick();
    assert_eq!(due.iter().map(|r| r.outcome.state).collect::<Vec<_>>(), [JobState::Failed]);
    let reason = &due[0].outcome.reason;
    assert!(reason.contains("CreateContainerConfigError") && reason.contains("galaxy-tools"), "{reason}");
}

#[test]
fn waiting_jobs_have_their_pods_read_now_and_then_and_only_while_they_wait() {
    let (set_clock, clock) = fixed_clock!();
    set_clock(1);
    let (mut s, job) = waiting_since_midnight(clock, 1);
    s.apply_job(&job);
    assert!(s.pods_to_read().is_empty(), "the first read 2 s after creation");
    let reads_at = |s: &mut TrackerState, set_clock: fn(i64), seconds: std::ops::Range<i64>| {
        seconds
            .filter(|t| {
                set_clock(*t);
                !s.pods_to_read().is_empty()
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(reads_at(&mut s, set_clock, 2..200), [2, 4, 8, 16, 32, 64, 124, 184], "doubling, then once a minute");
    // A pending pod read is known (the watch only sees running ones); a running one ends the reads.
    let pending = pod("p1", "u1", "Pending", None);
    assert_eq!(state_of(s.pods_read("u1", &[pending], None, clock())), None);
    assert_eq!(s.pod_entries(), 1);
    assert_eq!(state_of(s.apply_pod(&pod("p1", "u1", "Running", None))), Some(JobState::Running));
    assert!(reads_at(&mut s, set_clock, 200..400).is_empty(), "it runs: the watch tells the rest");
}

#[test]
fn a_read_older_than_the_watch_does_not_set_a_started_pod_back_to_waiting() {
    let (set_clock, clock) = fixed_clock!();
    set_clock(1);
    let (mut s, job) = waiting_since_midnight(clock, 1);
    s.apply_job(&job);
    set_clock(3);
    assert_eq!(s.pods_to_read().len(), 1);
    // The read lists the pod waiting; the watch hears it start before the read's answer is in.
    assert_eq!(state_of(s.apply_pod(&pod("p1", "u1", "Running", None))), Some(JobState::Running));
    assert_eq!(state_of(s.pods_read("u1", &[pod("p1", "u1", "Pending", None)], None, clock())), None);
    set_clock(400);
    assert!(s.pods_to_read().is_empty(), "it runs: no reads, and its pod is not waiting again");
    // A read that no longer has a waiting pod forgets it; a started one stays.
    assert_eq!(s.pods_read("u1", &[], None, clock()), None);
    assert_eq!(s.pod_entries(), 1);
}

#[test]
fn a_deleted_pod_leaves_its_last_state_to_its_job() {
    let mut s = synced();
    s.apply_job(&job("u1", json!({}), json!({})));
    assert_eq!(state_of(s.apply_pod(&pod("p1", "u1", "Running", None))), Some(JobState::Running));
    // Deleted at once (its Job's cleanup raced its last update): the delete carries its end.
    let oom = s.pod_left(&pod("p1", "u1", "Failed", Some((137, "OOMKilled")))).unwrap();
    assert_eq!((oom.outcome.state, oom.outcome.exit_code), (JobState::OomKilled, Some(137)));
    assert_eq!(s.pod_left(&pod("p9", "u9", "Failed", Some((1, "Error")))), None, "an unknown Job's pod is forgotten");
    assert_eq!(s.pod_entries(), 1);
}

#[test]
fn a_pod_that_failed_before_it_ever_ran_makes_a_read_due_at_once() {
    let (set_clock, clock) = fixed_clock!();
    set_clock(1);
    let (mut s, job) = waiting_since_midnight(clock, 1);
    s.apply_job(&job);
    set_clock(3);
    assert_eq!(s.pods_to_read().len(), 1);
    assert!(s.pods_to_read().is_empty(), "next at 4 s");
    let mut failed = job.clone();
    failed.status = Some(serde_json::from_value(json!({"failed": 1})).unwrap());
    s.apply_job(&failed);
    assert_eq!(s.pods_to_read().len(), 1, "the Job counts a failed pod nobody saw");
}

#[test]
fn a_sweep_reads_the_watch_cache_only_while_the_answer_is_small_and_no_job_is_past_its_grace() {
    let (set_clock, clock) = fixed_clock!();
    set_clock(3);
    let (mut s, job) = waiting_since_midnight(clock, 1);
    s.apply_job(&job);
    let due = s.pods_to_read();
    assert_eq!(due.len(), 1);
    assert!(s.read_from_cache(&due), "one young waiting Job: the cache answers");
    // Past the pod start grace a missing pod fails the Job: only the newest state may say so.
    set_clock(130);
    let due = s.pods_to_read();
    assert!(due[0].past_grace);
    assert!(!s.read_from_cache(&due));
    // The answer holds every waiting pod and every failed one: too many, and it is paged.
    set_clock(3);
    let (mut s, _) = waiting_since_midnight(clock, 1);
    let young = |uid: String| {
        let mut j = job.clone();
        j.metadata.uid = Some(uid);
        j
    };
    for i in 0..CACHED_READ_MAX - 1 {
        s.apply_job(&young(format!("w{i}")));
    }
    let due = s.pods_to_read();
    assert_eq!(due.len(), CACHED_READ_MAX - 1);
    assert!(s.read_from_cache(&due));
    s.apply_job(&young("f1".into()));
    s.apply_pod(&pod("p1", "f1", "Failed", Some((1, "Error"))));
    s.apply_job(&young("f2".into()));
    s.apply_pod(&pod("p2", "f2", "Failed", Some((1, "Error"))));
    assert!(!s.read_from_cache(&due), "{} waiting Jobs and 2 failed pods", CACHED_READ_MAX - 1);
}

#[test]
fn a_reporter_back_in_its_own_term_does_not_repeat_what_it_told() {
    // It told the outcome, its record waited out an apiserver outage, its Lease expired by its
    // own clock and then renewed with nobody in between: nothing to tell again.
    let mut s = synced();
    let complete = json!({"conditions": [{"type": "Complete", "status": "True"}]});
    assert_eq!(state_of(s.apply_job(&job("u1", json!({}), complete.clone()))), Some(JobState::Succeeded));
    assert!(s.set_reporting(false).is_empty());
    assert!(s.continue_reporting().is_empty(), "the same term: already told");
    // A new term (another replica may have held the Lease meanwhile) tells it again.
    assert!(s.set_reporting(false).is_empty());
    assert_eq!(s.set_reporting(true).iter().map(|r| r.outcome.state).collect::<Vec<_>>(), [JobState::Succeeded]);
}

#[test]
fn a_job_deleted_as_it_fails_waits_for_its_pods_last_states() {
    // Someone deleted the Job the moment it failed; its pod's OOMKilled state comes through the
    // pod watch after the Job's deletion (its pods go with it): an OOM kill, not a failure.
    let mut s = synced();
    s.apply_job(&job("u1", json!({}), json!({})));
    assert_eq!(state_of(s.apply_pod(&pod("p1", "u1", "Running", None))), Some(JobState::Running));
    let failed = json!({"conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]});
    assert_eq!(state_of(s.delete_job(&job("u1", json!({}), failed.clone()))), None, "its pod has not ended yet");
    assert!(s.tick().is_empty(), "still waiting");
    let report = s.pod_left(&pod("p1", "u1", "Failed", Some((137, "OOMKilled")))).unwrap();
    assert_eq!((report.outcome.state, report.exists), (JobState::OomKilled, false));
    assert_eq!(s.pod_entries(), 0, "forgotten once settled");
    // Its pods seen ended: told at once.
    let mut s = synced();
    s.apply_job(&job("u2", json!({}), json!({})));
    s.apply_pod(&pod("p2", "u2", "Failed", Some((3, "Error"))));
    assert_eq!(state_of(s.delete_job(&job("u2", json!({}), failed))), Some(JobState::Failed));
}
