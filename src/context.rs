//! What the message handlers and the tracker share: the adapters and settings, wired once at
//! start by [`crate::run`]. No behaviour lives here; tests can build one with their own parts.

use std::sync::Arc;

use crate::{
    amqp::broker::Broker,
    config::Settings,
    domain::{decision::Rules, event::Reporter, job::JobDefaults, outcome::Limits},
    http::Health,
    k8s::{jobs::Jobs, routes::Routes},
    leader::Leadership,
    observe::Metrics,
    shutdown::Shutdown,
};

/// The parts of one worker process.
pub struct Context {
    /// Settings, as read at start.
    pub settings: Settings,
    /// What the worker adds to every job, and the request policy.
    pub defaults: JobDefaults,
    /// What follows an outcome (cleanup, resubmission).
    pub rules: Rules,
    /// Time limits for pods that cannot start.
    pub limits: Limits,
    /// The Jobs and pods of the namespace.
    pub jobs: Jobs,
    /// The Services and Ingresses of interactive Jobs.
    pub routes: Routes,
    /// The broker.
    pub broker: Arc<Broker>,
    /// The instance and replica events are published as.
    pub reporter: Reporter,
    /// Logs and metrics.
    pub metrics: Arc<Metrics>,
    /// Whether this replica reports outcomes now.
    pub leadership: Arc<Leadership>,
    /// What `/readyz` reports.
    pub health: Arc<Health>,
    /// Shutdown signal.
    pub shutdown: Shutdown,
}
