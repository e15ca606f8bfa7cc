//! JSON Schemas of the message contract, generated from the Rust types.

use crate::domain::{
    event::JobEvent,
    request::{JobControl, JobRequest},
};

/// File name and schema of every message type, as checked in under `schemas/`.
pub fn all() -> Vec<(&'static str, serde_json::Value)> {
    vec![
        ("job-request.v1.json", serde_json::to_value(schemars::schema_for!(JobRequest)).unwrap_or_default()),
        ("job-event.v1.json", serde_json::to_value(schemars::schema_for!(JobEvent)).unwrap_or_default()),
        ("job-cancel.v1.json", serde_json::to_value(schemars::schema_for!(JobControl)).unwrap_or_default()),
    ]
}

/// The schema text as written to disk (pretty JSON with a final newline).
pub fn render(schema: &serde_json::Value) -> String {
    let mut text = serde_json::to_string_pretty(schema).unwrap_or_default();
    text.push('\n');
    text
}
