//! What an operator sees: metrics that move when a job runs, and `check` naming each missing piece.

mod common;

use std::process::Command;

use common::*;
use k8s_job_worker::domain::event::JobState;

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
    let out = Command::new(env!("CARGO_BIN_EXE_k8s-job-worker"))
        .args(["--log-format", "text", "check"])
        .args(args)
        .envs(env.iter().copied())
        .env("RUST_LOG", "off")
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).to_string())
}

#[tokio::test]
async fn check_names_every_missing_piece() {
    let client = kube_client().await;
    let ns = unique("o-check");
    namespace(&client, &ns).await;
    let url = amqp_url();
    let (ok, out) = check(&["--k8s-namespace", &ns, "--amqp-url", &url], &[]);
    assert!(ok, "{out}");
    assert!(out.contains("all 13 permissions"), "{out}");

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
    assert!(!ok && out.contains("FAIL  configuration: k8s_galaxy_instance_id"), "{out}");
    drop_namespace(&client, &ns).await;
}

#[tokio::test]
async fn the_python_example_submits_and_receives_the_terminal_event() {
    let python = std::env::var("PYTHON_WITH_PIKA")
        .expect("PYTHON_WITH_PIKA not set: scripts/test creates a venv with pika and sets it");
    let mut h = Harness::new("o-python").await;
    h.start_worker().await;
    let out = tokio::process::Command::new(python)
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/galaxy/k8s_job_worker_client.py"))
        .args(["--job-id", "py-1", "--command", "echo from python", "--wait", "--timeout", "60"])
        .env("AMQP_URL", amqp_url())
        .env("AMQP_REQUEST_QUEUE", &h.names.request_queue)
        .env("AMQP_CONTROL_QUEUE", &h.names.control_queue)
        .env("AMQP_RESULT_EXCHANGE", &h.names.result_exchange)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let last: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(last["state"], "succeeded");
    assert_eq!(last["log_tail"], "from python\n");
    // The worker saw it as any other request.
    assert_eq!(h.until_terminal("py-1").await.last().unwrap().state, JobState::Succeeded);
    h.finish().await;
}
