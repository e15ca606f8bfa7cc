//! `/healthz`, `/readyz` and `/metrics`.

use std::sync::Arc;

use axum::{extract::State, http::StatusCode, response::IntoResponse, routing::get, Router};

use crate::context::Context;

/// The health and metrics router.
pub fn router(ctx: Arc<Context>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(ctx)
}

async fn readyz(State(ctx): State<Arc<Context>>) -> impl IntoResponse {
    let broker = ctx.broker.is_connected();
    let watch = ctx.watch_synced.load(std::sync::atomic::Ordering::Relaxed);
    // The replica's id says which one answered (behind a Service, or on a reused port).
    let body = format!(
        "worker_id={}\nbroker_connected={broker}\nwatch_synced={watch}\nshutting_down={}\n",
        ctx.worker_id,
        ctx.shutdown.is_triggered()
    );
    let code = if ctx.is_ready() { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (code, body)
}

async fn metrics(State(ctx): State<Arc<Context>>) -> impl IntoResponse {
    (
        [(axum::http::header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
        ctx.metrics.encode(),
    )
}

/// Serves until shutdown.
pub async fn serve(ctx: Arc<Context>, listener: tokio::net::TcpListener) {
    let stop = ctx.shutdown.clone();
    let app = router(ctx);
    if let Err(err) = axum::serve(listener, app).with_graceful_shutdown(async move { stop.wait().await }).await {
        tracing::error!(%err, "http server failed");
    }
}
