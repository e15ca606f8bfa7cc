//! Wires one worker: broker, tracker, consumers and the HTTP endpoint, until shutdown.

use std::{sync::Arc, time::Duration};

use crate::{
    amqp::{broker::Broker, consumer::consume},
    config::Settings,
    context::Context,
    control::handle_control,
    observe::Observation,
    shutdown::Shutdown,
    submit::handle_request,
};

/// Runs the worker until `shutdown` is triggered, then stops within the grace period.
pub async fn run(settings: Settings, client: kube::Client, http: tokio::net::TcpListener, shutdown: Shutdown) {
    let worker_id = settings.worker_id();
    let broker = Arc::new(Broker::new(settings.amqp.clone(), format!("k8s-job-worker {worker_id}")));
    let ctx = Arc::new(Context::new(client, broker.clone(), settings, shutdown.clone()));
    tracing::info!(
        worker_id = ctx.worker_id,
        namespace = ctx.settings.kube.k8s_namespace,
        instance_id = ctx.settings.instance_id(),
        "k8s-job-worker starting"
    );

    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(crate::http::serve(ctx.clone(), http));
    tasks.spawn(count_reconnects(ctx.clone()));
    tasks.spawn(crate::leader::run(ctx.clone()));
    tasks.spawn(crate::tracker::run(ctx.clone()));
    let prefetch = ctx.settings.amqp.prefetch;
    tasks.spawn(consume(ctx.clone(), ctx.settings.amqp.request_queue.clone(), prefetch, handle_request));
    // Cancels are few and must never wait behind submissions: their own queue and channel.
    tasks.spawn(consume(ctx.clone(), ctx.settings.amqp.control_queue.clone(), prefetch, handle_control));

    shutdown.wait().await;
    tracing::info!("shutting down: no new messages; finishing those in flight");
    let grace = Duration::from_secs(ctx.settings.worker.shutdown_grace_seconds + 1);
    let all = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(grace, all).await.is_err() {
        tracing::warn!("grace period over; exiting with work in flight (it will be redelivered)");
    }
    broker.close().await;
    tracing::info!("stopped");
}

async fn count_reconnects(ctx: Arc<Context>) {
    let mut connected = ctx.broker.connected_watch();
    loop {
        tokio::select! {
            _ = ctx.shutdown.wait() => return,
            changed = connected.changed() => if changed.is_err() { return },
        }
        if *connected.borrow() && ctx.broker.generation() > 1 {
            ctx.metrics.observe(Observation::BrokerReconnected);
        }
    }
}
