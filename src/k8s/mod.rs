//! Kubernetes adapter: Job spec building (pure), object views (pure), API calls.

pub mod client;
pub mod jobs;
pub mod pod;
pub mod spec;
pub mod view;
pub mod watched;
