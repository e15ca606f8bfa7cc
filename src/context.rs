//! Everything a handler needs, in one struct that tests can build with their own parts.

use std::sync::{
    atomic::{AtomicBool, Ordering},
    Arc,
};

use k8s_openapi::api::{batch::v1::Job, core::v1::Pod};
use kube::{Api, Client};

use crate::k8s::watched::{WatchedJob, WatchedPod};

use crate::{
    amqp::broker::Broker,
    config::{placement::Placement, Settings},
    domain::event::{event_id, JobEvent, JobState, EVENT_SCHEMA},
    leader::Leadership,
    observe::Metrics,
    shutdown::Shutdown,
};

/// Shared state of one worker process.
pub struct Context {
    /// Kubernetes client.
    pub client: Client,
    /// Jobs in the configured namespace.
    pub jobs: Api<Job>,
    /// Pods in the configured namespace (for their logs).
    pub pods: Api<Pod>,
    /// Jobs decoded slim, for reading their state.
    pub watched_jobs: Api<WatchedJob>,
    /// Pods decoded slim, for reading their state.
    pub watched_pods: Api<WatchedPod>,
    /// Broker connection.
    pub broker: Arc<Broker>,
    /// Settings.
    pub settings: Settings,
    /// Metrics and logs.
    pub metrics: Arc<Metrics>,
    /// This replica's id.
    pub worker_id: String,
    /// Shutdown signal.
    pub shutdown: Shutdown,
    /// Whether the Job and pod watches have completed their first list.
    pub watch_synced: AtomicBool,
    /// Whether this replica is the one reporting Job outcomes.
    pub leadership: Leadership,
    /// Placement defaults and the request policy, parsed once.
    pub placement: Placement,
    /// Bounds the Job creations in flight (`k8s_max_concurrent_creates`).
    pub creates: tokio::sync::Semaphore,
}

/// What an event is about.
pub struct EventSubject<'a> {
    /// Galaxy job id.
    pub job_id: &'a str,
    /// Attempt.
    pub attempt: Option<u32>,
    /// Job name.
    pub job_name: &'a str,
    /// Request fingerprint ("" when unknown, as for cancels of unseen requests).
    pub fingerprint: &'a str,
}

impl Context {
    /// A context for this client, broker and settings.
    pub fn new(client: Client, broker: Arc<Broker>, settings: Settings, shutdown: Shutdown) -> Self {
        let ns = settings.kube.k8s_namespace.clone();
        let settings_placement = settings.kube.placement.parse().unwrap_or_default();
        let creates = tokio::sync::Semaphore::new(settings.kube.k8s_max_concurrent_creates.max(1));
        Context {
            jobs: Api::namespaced(client.clone(), &ns),
            pods: Api::namespaced(client.clone(), &ns),
            watched_jobs: Api::namespaced(client.clone(), &ns),
            watched_pods: Api::namespaced(client.clone(), &ns),
            client,
            broker,
            worker_id: settings.worker_id(),
            settings,
            metrics: Arc::new(Metrics::default()),
            shutdown,
            watch_synced: AtomicBool::new(false),
            leadership: Leadership::default(),
            // Validated at start-up (Settings::validate); a parse error cannot happen here.
            placement: settings_placement,
            creates,
        }
    }

    /// Whether the worker can do its work (`/readyz`).
    pub fn is_ready(&self) -> bool {
        self.broker.is_connected() && self.watch_synced.load(Ordering::Relaxed) && !self.shutdown.is_triggered()
    }

    /// A new event with the stable id for this subject and state.
    pub fn event(&self, subject: &EventSubject<'_>, state: JobState, reason: impl Into<String>) -> JobEvent {
        JobEvent {
            schema: EVENT_SCHEMA.to_string(),
            event_id: event_id(subject.job_name, subject.fingerprint, state),
            job_id: subject.job_id.to_string(),
            attempt: subject.attempt,
            job_name: subject.job_name.to_string(),
            instance_id: self.settings.instance_id().map(str::to_string),
            state,
            reason: reason.into(),
            exit_code: None,
            pods: Vec::new(),
            log_tail: None,
            occurred_at: None,
            published_at: jiff::Timestamp::now().to_string(),
            worker_id: self.worker_id.clone(),
        }
    }

    /// Publishes an event, retrying with capped backoff until the broker confirms it or
    /// shutdown starts. Returns whether it was confirmed.
    pub async fn publish_until_confirmed(&self, event: &mut JobEvent, since: Option<jiff::Timestamp>) -> bool {
        let mut delay = std::time::Duration::from_millis(100);
        loop {
            event.published_at = jiff::Timestamp::now().to_string();
            match self.broker.publish_event(event).await {
                Ok(confirm) => {
                    let since_transition = since.and_then(|t| {
                        let d = jiff::Timestamp::now().duration_since(t);
                        std::time::Duration::try_from(d).ok()
                    });
                    self.metrics.observe(crate::observe::Observation::EventPublished {
                        event,
                        confirm,
                        since_transition,
                    });
                    return true;
                }
                Err(error) => {
                    self.metrics.observe(crate::observe::Observation::PublishFailed { event, error: &error });
                    if self.shutdown.sleep_or_stop(delay).await {
                        return false;
                    }
                    delay = (delay * 2).min(std::time::Duration::from_secs(5));
                }
            }
        }
    }
}
