//! The checked-in JSON Schemas match the Rust types, and accept what the worker accepts.

use k8s_job_worker::{domain::request, schema};
use serde_json::json;

#[test]
fn checked_in_schemas_are_current() {
    for (name, value) in schema::all() {
        let path = format!("{}/schemas/{name}", k8s_job_worker_testkit::repo_root().display());
        let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
        assert_eq!(
            on_disk,
            schema::render(&value),
            "{path} is stale: regenerate with `cargo run -- schema --write schemas`"
        );
    }
}

fn validator(name: &str) -> jsonschema::Validator {
    let (_, schema) = schema::all().into_iter().find(|(n, _)| *n == name).unwrap();
    jsonschema::validator_for(&schema).expect("valid JSON Schema")
}

#[test]
fn the_request_schema_agrees_with_the_parser() {
    let v = validator("job-request.v1.json");
    let good = json!({
        "schema": request::REQUEST_SCHEMA, "job_id": "42", "command_line": "echo hi",
        "image": {"owner": "galaxy", "image": "tool", "tag": "1"},
        "limits_memory": 0.5, "requests_cpu": 2, "limits_cpu": "500m",
        "env": [{"name": "A", "value": "b"}], "labels": {"team": "x"}
    });
    assert!(v.is_valid(&good));
    assert!(request::parse_request(&serde_json::to_vec(&good).unwrap(), 1 << 20).is_ok());
    for bad in [
        json!({"schema": request::REQUEST_SCHEMA, "job_id": "1", "image": "x"}),
        json!({"schema": request::REQUEST_SCHEMA, "job_id": "1", "command_line": "x", "image": "x", "privileged": true}),
        json!({"schema": request::REQUEST_SCHEMA, "job_id": "1", "command_line": "x", "image": {"tag": "1"}}),
    ] {
        assert!(!v.is_valid(&bad), "schema accepts {bad}");
        assert!(request::parse_request(&serde_json::to_vec(&bad).unwrap(), 1 << 20).is_err(), "parser accepts {bad}");
    }
}

#[test]
fn cancel_and_event_schemas_validate_real_messages() {
    let cancel = json!({"schema": request::CONTROL_SCHEMA, "job_id": "7", "reason": "user"});
    assert!(validator("job-cancel.v1.json").is_valid(&cancel));
    assert!(request::parse_control(&serde_json::to_vec(&cancel).unwrap(), 1024).is_ok());
    let event = json!({
        "schema": "k8s-job-worker/job-event/v1", "event_id": "abc", "job_id": "7", "job_name": "galaxy-main-7",
        "state": "oom_killed", "reason": "r", "exit_code": 137, "pods": ["p"], "published_at": "2026-01-01T00:00:00Z",
        "worker_id": "w"
    });
    assert!(validator("job-event.v1.json").is_valid(&event));
    let mut wrong = event.clone();
    wrong["state"] = json!("exploded");
    assert!(!validator("job-event.v1.json").is_valid(&wrong));
}
