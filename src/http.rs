//! `/healthz`, `/readyz` and `/metrics`.

use std::sync::{
    atomic::{AtomicBool, Ordering},
    Arc,
};

use axum::{extract::State, http::StatusCode, response::IntoResponse, routing::get, Router};

use crate::{amqp::broker::Broker, observe::Metrics, shutdown::Shutdown};

/// What readiness depends on.
pub struct Health {
    /// This replica's id (`/readyz` names it: behind a Service, or on a reused port).
    pub worker_id: String,
    /// The broker connection.
    pub broker: Arc<Broker>,
    /// Whether the Job and pod watches have listed everything once.
    pub watch_synced: AtomicBool,
    /// Whether the apiserver answered the last call (watch or request) that tells.
    pub apiserver: AtomicBool,
    /// Shutdown signal.
    pub shutdown: Shutdown,
}

impl Health {
    /// Whether the worker can do its work.
    pub fn is_ready(&self) -> bool {
        self.broker.is_connected()
            && self.watch_synced.load(Ordering::Relaxed)
            && self.apiserver.load(Ordering::Relaxed)
            && !self.shutdown.is_triggered()
    }

    /// Notes what a failed Kubernetes call says about the apiserver.
    pub fn observe_apiserver(&self, err: &crate::error::Error) {
        if err.is_unavailable() && self.apiserver.swap(false, Ordering::Relaxed) {
            tracing::warn!(error = %err, "the apiserver is unreachable");
        }
    }

    /// Notes that the apiserver answered.
    pub fn apiserver_reachable(&self) {
        if !self.apiserver.swap(true, Ordering::Relaxed) {
            tracing::info!("the apiserver is reachable again");
        }
    }
}

#[derive(Clone)]
struct Endpoints {
    health: Arc<Health>,
    metrics: Arc<Metrics>,
}

/// The health and metrics router.
pub fn router(health: Arc<Health>, metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(render_metrics))
        .with_state(Endpoints { health, metrics })
}

async fn readyz(State(e): State<Endpoints>) -> impl IntoResponse {
    let h = &e.health;
    let body = format!(
        "worker_id={}\nbroker_connected={}\nwatch_synced={}\napiserver_reachable={}\nshutting_down={}\n",
        h.worker_id,
        h.broker.is_connected(),
        h.watch_synced.load(Ordering::Relaxed),
        h.apiserver.load(Ordering::Relaxed),
        h.shutdown.is_triggered()
    );
    let code = if h.is_ready() { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (code, body)
}

async fn render_metrics(State(e): State<Endpoints>) -> impl IntoResponse {
    (
        [(axum::http::header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
        e.metrics.encode(),
    )
}

/// Serves until shutdown.
pub async fn serve(listener: tokio::net::TcpListener, health: Arc<Health>, metrics: Arc<Metrics>) {
    let stop = health.shutdown.clone();
    let app = router(health, metrics);
    if let Err(err) = axum::serve(listener, app).with_graceful_shutdown(async move { stop.wait().await }).await {
        tracing::error!(%err, "http server failed");
    }
}
