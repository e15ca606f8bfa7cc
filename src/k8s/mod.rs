//! Kubernetes adapter: rendering planned Jobs (pure), object views (pure), API calls.

pub mod client;
pub mod jobs;
pub mod render;
pub mod routes;
pub(crate) mod view;
pub mod watched;
