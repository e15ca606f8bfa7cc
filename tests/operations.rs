//! What an operator sees: metrics that move when a job runs, and `check` naming each missing piece.

use std::process::Command;

use k8s_job_worker::domain::event::JobState;
use k8s_job_worker_testkit::*;

fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))?
        .split_whitespace()
        .last()?
        .parse()
        .ok()
}

#[tokio::test]
async fn metrics_move_when_a_job_runs() {
    let mut h = Harness::new("o-metrics").await;
    h.start_worker().await;
    let before = h.metrics().await;
    for family in [
        "k8s_job_worker_requests",
        "k8s_job_worker_jobs",
        "k8s_job_worker_events_published",
        "k8s_job_worker_publish_confirm_seconds",
        "k8s_job_worker_request_to_job_seconds",
        "k8s_job_worker_terminal_to_event_seconds",
        "k8s_job_worker_jobs_tracked",
        "k8s_job_worker_broker_reconnects",
        "k8s_job_worker_kube_api_errors",
        "k8s_job_worker_publish_failures",
    ] {
        assert!(before.contains(&format!("# TYPE {family} ")), "{family} missing from /metrics:\n{before}");
    }
    assert_eq!(metric(&before, r#"k8s_job_worker_requests_total{outcome="accepted"}"#), Some(0.0));
    assert_eq!(metric(&before, r#"k8s_job_worker_kube_api_errors_total{verb="create"}"#), Some(0.0));
    h.submit(&request("1", "echo metered")).await;
    assert_eq!(h.until_terminal("1").await.last().unwrap().state, JobState::Succeeded);
    h.submit(&serde_json::json!({"schema": "nope", "job_id": "2"})).await;
    h.events_until("2", std::time::Duration::from_secs(20), |e| !e.is_empty()).await;
    let after = h.metrics().await;
    assert_eq!(metric(&after, r#"k8s_job_worker_requests_total{outcome="accepted"}"#), Some(1.0));
    assert_eq!(metric(&after, r#"k8s_job_worker_requests_total{outcome="malformed"}"#), Some(1.0), "{after}");
    assert_eq!(metric(&after, r#"k8s_job_worker_jobs_total{action="created"}"#), Some(1.0));
    assert_eq!(metric(&after, r#"k8s_job_worker_events_published_total{state="succeeded"}"#), Some(1.0));
    assert!(metric(&after, "k8s_job_worker_publish_confirm_seconds_count").unwrap_or(0.0) >= 3.0);
    assert_eq!(metric(&after, "k8s_job_worker_request_to_job_seconds_count"), Some(1.0));
    assert_eq!(metric(&after, "k8s_job_worker_terminal_to_event_seconds_count"), Some(1.0));
    h.finish().await;
}

fn check(args: &[&str], env: &[(&str, &str)]) -> (bool, String) {
    let out = Command::new(worker_bin())
        .args(["--log-format", "text", "check"])
        .args(args)
        .envs(env.iter().copied())
        .env("RUST_LOG", "off")
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

#[tokio::test]
async fn check_names_every_missing_piece() {
    let client = kube_client().await;
    let ns = unique("o-check");
    namespace(&client, &ns).await;
    let url = amqp_url();
    let (ok, out) = check(&["--k8s-namespace", &ns, "--amqp-url", &url], &[]);
    assert!(ok, "{out}");
    assert!(out.contains("all 15 permissions"), "{out}");

    let bad_url = url.replacen("guest:guest", "guest:wrong", 1);
    let (ok, out) = check(&["--k8s-namespace", &ns, "--amqp-url", &bad_url], &[]);
    assert!(!ok && out.contains("FAIL  broker login") && out.contains("ACCESS_REFUSED"), "{out}");

    let (ok, out) = check(&["--k8s-namespace", "no-such-namespace", "--amqp-url", &url], &[]);
    assert!(!ok && out.contains("FAIL  namespace no-such-namespace does not exist"), "{out}");

    let (ok, out) = check(
        &["--k8s-namespace", &ns, "--amqp-url", &url, "--k8s-persistent-volume-claims", "galaxy-data/jobs:/jobs"],
        &[],
    );
    assert!(!ok && out.contains("FAIL  PersistentVolumeClaim galaxy-data does not exist"), "{out}");

    let (ok, out) =
        check(&["--k8s-namespace", &ns, "--amqp-url", &url, "--k8s-config-path", "/nonexistent/kubeconfig"], &[]);
    assert!(!ok && out.contains("FAIL  kubernetes configuration") && out.contains("/nonexistent/kubeconfig"), "{out}");

    let (ok, out) = check(&["--k8s-namespace", &ns, "--amqp-url", &url, "--k8s-galaxy-instance-id", "Bad_Id"], &[]);
    // A setting is read once, when its flag is: a bad one stops `check` (and `run`) at once, named.
    assert!(!ok && out.contains("invalid value 'Bad_Id' for '--k8s-galaxy-instance-id"), "{out}");
    drop_namespace(&client, &ns).await;
}
