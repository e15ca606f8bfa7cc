//! What a Job and its pods mean for Galaxy, fed as the watches see them.

use super::*;

fn now() -> jiff::Timestamp {
    "2026-01-01T00:10:00Z".parse().unwrap()
}

fn pod(name: &str, phase: &str, exit: Option<(i32, &str)>) -> PodView {
    PodView {
        name: name.into(),
        phase: PodPhase::parse(Some(phase)),
        terminations: exit
            .map(|(code, reason)| {
                vec![Termination { exit_code: code, reason: Some(reason.into()), ..Termination::default() }]
            })
            .unwrap_or_default(),
        created: name.into(),
        ..PodView::default()
    }
}

#[test]
fn pending_then_running_then_succeeded() {
    let job = JobView::default();
    assert_eq!(classify(&job, &[], now(), &Limits::default()).state, JobState::Submitted);
    assert_eq!(classify(&job, &[pod("a", "Pending", None)], now(), &Limits::default()).state, JobState::Submitted);
    assert_eq!(classify(&job, &[pod("a", "Running", None)], now(), &Limits::default()).state, JobState::Running);
    let done = JobView { complete: true, ..job };
    let o = classify(&done, &[pod("a", "Succeeded", Some((0, "Completed")))], now(), &Limits::default());
    assert_eq!((o.state, o.exit_code), (JobState::Succeeded, Some(0)));
}

#[test]
fn oom_wins_at_once_even_with_retrials_left() {
    let job = JobView { backoff_limit: 3, ..JobView::default() };
    let o = classify(&job, &[pod("a", "Failed", Some((137, "OOMKilled")))], now(), &Limits::default());
    assert_eq!((o.state, o.exit_code), (JobState::OomKilled, Some(137)));
}

#[test]
fn failures_within_retrials_keep_running() {
    let job = JobView { backoff_limit: 2, ..JobView::default() };
    let pods = [pod("a", "Failed", Some((3, "Error"))), pod("b", "Pending", None)];
    assert_eq!(classify(&job, &pods, now(), &Limits::default()).state, JobState::Running);
}

#[test]
fn failures_beyond_retrials_fail_with_exit_code() {
    let job = JobView { backoff_limit: 1, ..JobView::default() };
    let pods = [pod("a", "Failed", Some((3, "Error"))), pod("b", "Failed", Some((3, "Error")))];
    let o = classify(&job, &pods, now(), &Limits::default());
    assert_eq!((o.state, o.exit_code), (JobState::Failed, Some(3)));
    assert!(o.reason.contains("2 failed pod"), "{}", o.reason);
    assert!(o.reason.contains("exited with code 3"), "{}", o.reason);
}

#[test]
fn deadline_exceeded_is_walltime_exceeded() {
    let job = JobView {
        failed: Some(("DeadlineExceeded".into(), "".into())),
        active_deadline_seconds: Some(60),
        ..JobView::default()
    };
    let o = classify(&job, &[pod("a", "Failed", Some((137, "Error")))], now(), &Limits::default());
    assert_eq!(o.state, JobState::WalltimeExceeded);
    assert!(o.reason.contains("60 s"), "{}", o.reason);
}

fn at(s: &str) -> jiff::Timestamp {
    s.parse().unwrap()
}

#[test]
fn image_pull_errors_fail_after_the_grace_period_and_invalid_names_at_once() {
    let limits = Limits { image_pull_grace: std::time::Duration::from_secs(120), ..Limits::default() };
    let mut p = pod("a", "Pending", None);
    p.started_at = Some(at("2026-01-01T00:09:00Z"));
    p.trouble_mut().pull_failure =
        Some(("ImagePullBackOff".into(), "Back-off pulling".into(), "x/does-not-exist:1".into()));
    assert_eq!(classify(&JobView::default(), &[p.clone()], now(), &limits).state, JobState::Submitted);
    p.started_at = Some(at("2026-01-01T00:07:00Z"));
    let o = classify(&JobView::default(), &[p.clone()], now(), &limits);
    assert_eq!(o.state, JobState::ImagePullFailed);
    assert!(o.reason.contains("x/does-not-exist:1") && o.reason.contains("Back-off"), "{}", o.reason);
    p.started_at = Some(now());
    p.trouble_mut().pull_failure = Some(("InvalidImageName".into(), "bad".into(), "BAD".into()));
    assert_eq!(classify(&JobView::default(), &[p], now(), &limits).state, JobState::ImagePullFailed);
}

#[test]
fn unschedulable_only_with_a_limit_and_after_it() {
    let mut p = pod("a", "Pending", None);
    p.trouble_mut().unschedulable = Some((at("2026-01-01T00:09:30Z"), "0/1 nodes are available".into()));
    assert_eq!(classify(&JobView::default(), &[p.clone()], now(), &Limits::default()).state, JobState::Submitted);
    let limits = Limits { unschedulable_after: Some(std::time::Duration::from_secs(20)), ..Limits::default() };
    let o = classify(&JobView::default(), &[p.clone()], now(), &limits);
    assert_eq!(o.state, JobState::Unschedulable);
    assert!(o.reason.contains("0/1 nodes are available"), "{}", o.reason);
    let strict = Limits { unschedulable_after: Some(std::time::Duration::from_secs(60)), ..Limits::default() };
    assert_eq!(classify(&JobView::default(), &[p], now(), &strict).state, JobState::Submitted);
}

#[test]
fn pods_that_never_start_a_job_without_pods_fails_after_the_grace() {
    let limits = Limits { pod_start_grace: std::time::Duration::from_secs(120), ..Limits::default() };
    let job = JobView { created: Some(at("2026-01-01T00:08:30Z")), ..JobView::default() };
    assert_eq!(classify(&job, &[], now(), &limits).state, JobState::Submitted, "90 s: within the grace");
    let late = JobView { created: Some(at("2026-01-01T00:07:59Z")), ..job.clone() };
    let o = classify(&late, &[], now(), &limits);
    assert_eq!((o.state, o.never_started), (JobState::Failed, true));
    assert_eq!(o.reason, "no pod was created for the Job in 120 s");
    let refused = "Error creating: pods \"x\" is forbidden: exceeded quota: q";
    let o = with_create_error(o, Some(refused));
    assert_eq!(o.reason, format!("no pod was created for the Job in 120 s (FailedCreate): {refused}"));
    assert!(needs_timer(&late, &[]));
    for (what, not_waiting) in [
        ("stopped", JobView { stopped: true, ..late.clone() }),
        ("complete", JobView { complete: true, ..late.clone() }),
        ("no creation time", JobView { created: None, ..late.clone() }),
        ("a pod the Job counts, not seen yet", JobView { active: 1, ..late.clone() }),
        ("a failed pod the Job counts, not seen yet", JobView { failed_pods: 1, ..late.clone() }),
    ] {
        assert_ne!(classify(&not_waiting, &[], now(), &limits).state, JobState::Failed, "{what}");
        assert!(!needs_timer(&not_waiting, &[]), "{what}");
    }
    let failed = JobView { failed: Some(("BackoffLimitExceeded".into(), "".into())), ..late.clone() };
    assert!(classify(&failed, &[], now(), &limits).reason.contains("retrials exhausted"), "the Job's own verdict");
    let pending = [pod("a", "Pending", None)];
    assert_eq!(classify(&late, &pending, now(), &limits).state, JobState::Submitted, "a pod came");
    assert!(!needs_timer(&late, &pending), "a pending pod that waits for nothing");
}

#[test]
fn pods_that_never_start_a_container_that_cannot_be_created_fails_after_the_grace() {
    let limits = Limits { pod_start_grace: std::time::Duration::from_secs(120), ..Limits::default() };
    let mut p = pod("a", "Pending", None);
    p.started_at = Some(at("2026-01-01T00:09:00Z"));
    p.trouble_mut().start_failure = Some(("CreateContainerConfigError".into(), "configmap \"tools\" not found".into()));
    assert!(has_timer(&p));
    assert_eq!(classify(&JobView::default(), &[p.clone()], now(), &limits).state, JobState::Submitted);
    p.started_at = Some(at("2026-01-01T00:08:00Z"));
    let o = classify(&JobView::default(), &[p], now(), &limits);
    assert_eq!((o.state, o.never_started), (JobState::Failed, true));
    assert_eq!(
        o.reason,
        "pod a could not start its container (CreateContainerConfigError): configmap \"tools\" not found"
    );
    assert!(START_FAILURES.contains(&"CreateContainerError"));
}

#[test]
fn status_prefers_the_cancel_mark_then_what_was_reported() {
    let done = JobView { complete: true, ..JobView::default() };
    let meta = JobMeta { cancelled: Some("user".into()), ..JobMeta::default() };
    let o = status(&meta, &done, &[], now(), &Limits::default());
    assert_eq!((o.state, o.reason.as_str()), (JobState::Cancelled, "user"));
    let meta = JobMeta { reported: Some(JobState::OomKilled), ..JobMeta::default() };
    assert_eq!(status(&meta, &JobView::default(), &[], now(), &Limits::default()).state, JobState::OomKilled);
    let record = JobMeta {
        reported: Some(JobState::Failed),
        recorded_exit_code: Some(3),
        recorded_reason: Some("exited with code 3".into()),
        ..JobMeta::default()
    };
    let o = status(&record, &JobView::default(), &[], now(), &Limits::default());
    assert_eq!((o.state, o.exit_code, o.reason.as_str()), (JobState::Failed, Some(3), "exited with code 3"));
    assert_eq!(status(&JobMeta::default(), &done, &[], now(), &Limits::default()).state, JobState::Succeeded);
}

#[test]
fn evictions_and_lost_nodes_are_not_tool_failures() {
    let job = JobView { backoff_limit: 0, ..JobView::default() };
    let mut evicted = pod("a", "Failed", None);
    evicted.trouble_mut().reason = Some("Evicted".into());
    evicted.trouble_mut().disrupted = Some("The node was low on resource: memory.".into());
    assert_eq!(classify(&job, &[evicted], now(), &Limits::default()).state, JobState::Preempted);
    let mut lost = pod("b", "Failed", None);
    lost.trouble_mut().reason = Some("NodeLost".into());
    assert_eq!(classify(&job, &[lost], now(), &Limits::default()).state, JobState::NodeLost);
}
