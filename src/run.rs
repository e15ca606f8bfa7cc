//! Wires one worker: broker, Jobs adapter, Lease, tracker, consumers and the HTTP endpoint,
//! until shutdown.

use std::{
    sync::{atomic::AtomicBool, Arc},
    time::Duration,
};

use kube::Api;

use crate::{
    amqp::{
        broker::Broker,
        consumer::{consume, Subscription},
    },
    config::Settings,
    context::Context,
    control::handle_control,
    domain::{decision::Rules, event::Reporter},
    http::Health,
    k8s::{
        client::Clients,
        jobs::{Jobs, JobsConfig},
        routes::Routes,
    },
    leader::{self, Leadership, LeaseConfig},
    observe::{Metrics, Observation},
    shutdown::Shutdown,
    submit::handle_request,
};

/// How long a cancelled (stopped) Job stays before the reporter deletes it: longer than a
/// watch's re-list after an apiserver restart (~8 s here), so every replica sees the cancel.
const CANCELLED_JOB_GRACE: Duration = Duration::from_secs(15);

/// Runs the worker until `shutdown` is triggered, then stops within the grace period.
pub async fn run(settings: Settings, clients: Clients, http: tokio::net::TcpListener, shutdown: Shutdown) {
    let client = clients.requests;
    let worker_id = settings.worker_id();
    let broker = Arc::new(Broker::new(settings.amqp.clone(), format!("k8s-job-worker {worker_id}")));
    let metrics = Arc::new(Metrics::default());
    let leadership = Arc::new(Leadership::default());
    let namespace = settings.kube.k8s_namespace.clone();
    let jobs = Jobs::new(
        client.clone(),
        JobsConfig {
            namespace: namespace.clone(),
            deletion_timeout: Duration::from_secs(settings.kube.k8s_timeout_seconds_job_deletion),
            max_concurrent_creates: settings.kube.k8s_max_concurrent_creates,
        },
    )
    .with_watch_client(clients.watches);
    let health = Arc::new(Health {
        worker_id: worker_id.clone(),
        broker: broker.clone(),
        watch_synced: AtomicBool::new(false),
        apiserver: AtomicBool::new(true),
        shutdown: shutdown.clone(),
    });
    let lease = LeaseConfig {
        name: settings.naming().lease_name(),
        holder: worker_id.clone(),
        duration: Duration::from_secs(settings.worker.lease_seconds),
    };
    let grace = Duration::from_secs(settings.worker.shutdown_grace_seconds);
    let subscription = |queue: &str| Subscription {
        queue: queue.to_string(),
        prefetch: settings.amqp.prefetch,
        tag: format!("{worker_id}-{queue}"),
        grace,
        consumer_timeout: Some(settings.amqp.consumer_timeout_seconds).filter(|s| *s > 0).map(Duration::from_secs),
    };
    let (requests, controls) = (subscription(&settings.amqp.request_queue), subscription(&settings.amqp.control_queue));
    let inbox = subscription(&settings.amqp.dead_letter_inbox);
    tracing::info!(worker_id, namespace, instance_id = settings.instance_id(), "k8s-job-worker starting");
    let ctx = Arc::new(Context {
        defaults: settings.job_defaults(),
        rules: Rules {
            cleanup: settings.kube.k8s_cleanup_job,
            resubmit_preempted_after: settings.kube.k8s_preempted_resubmit_delay_seconds.map(Duration::from_secs),
            max_resubmissions: settings.kube.k8s_preempted_max_resubmissions,
            cancelled_grace: CANCELLED_JOB_GRACE,
            record_for: Some(settings.kube.k8s_finished_job_record_seconds).filter(|s| *s > 0).map(Duration::from_secs),
            pods_grace: Duration::from_secs(settings.kube.k8s_finished_pods_grace_seconds),
        },
        limits: settings.limits(),
        reporter: Reporter { instance_id: settings.instance_id().map(str::to_string), worker_id },
        routes: Routes::new(client.clone(), &namespace),
        jobs,
        broker: broker.clone(),
        metrics: metrics.clone(),
        leadership: leadership.clone(),
        health: health.clone(),
        shutdown: shutdown.clone(),
        settings,
    });

    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(crate::http::serve(http, health, metrics.clone()));
    tasks.spawn(count_reconnects(broker.clone(), metrics.clone(), shutdown.clone()));
    tasks.spawn(watch_routability(broker.clone(), metrics, shutdown.clone()));
    tasks.spawn(leader::run(Api::namespaced(client, &namespace), lease, leadership, shutdown.clone()));
    tasks.spawn(crate::tracker::run(ctx.clone()));
    let c = ctx.clone();
    tasks.spawn(consume(broker.clone(), requests, shutdown.clone(), move |d| handle_request(c.clone(), d)));
    // Cancels are few and must never wait behind submissions: their own queue and channel.
    let c = ctx.clone();
    tasks.spawn(consume(broker.clone(), controls, shutdown.clone(), move |d| handle_control(c.clone(), d)));
    let c = ctx.clone();
    tasks.spawn(consume(broker.clone(), inbox, shutdown.clone(), move |d| crate::parked::handle_parked(c.clone(), d)));

    shutdown.wait().await;
    tracing::info!("shutting down: no new messages; finishing those in flight");
    let all = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(grace + Duration::from_secs(1), all).await.is_err() {
        tracing::warn!("grace period over; exiting with work in flight (it will be redelivered)");
    }
    broker.close().await;
    tracing::info!("stopped");
}

async fn count_reconnects(broker: Arc<Broker>, metrics: Arc<Metrics>, stop: Shutdown) {
    let mut connected = broker.connected_watch();
    loop {
        tokio::select! {
            _ = stop.wait() => return,
            changed = connected.changed() => if changed.is_err() { return },
        }
        if *connected.borrow() && broker.generation() > 1 {
            metrics.observe(Observation::BrokerReconnected);
        }
    }
}

/// Says once (a log line and a gauge) when events stop reaching any queue, and when they do
/// again.
async fn watch_routability(broker: Arc<Broker>, metrics: Arc<Metrics>, stop: Shutdown) {
    let mut unroutable = broker.unroutable_watch();
    loop {
        tokio::select! {
            _ = stop.wait() => return,
            changed = unroutable.changed() => if changed.is_err() { return },
        }
        let first = unroutable.borrow_and_update().clone();
        let exchange = &broker.settings().result_exchange;
        metrics.observe(Observation::EventsUnroutable { first: first.as_deref(), exchange });
    }
}
