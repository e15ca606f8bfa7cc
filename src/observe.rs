//! The one place where what happens inside the worker becomes a log line and a metric.

use std::time::Duration;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

use crate::domain::{decision::JobAction, event::JobEvent};

/// Something worth a log line and a metric.
pub enum Observation<'a> {
    /// A request led to a Job (and its `submitted` event was confirmed).
    RequestAccepted {
        /// Galaxy job id.
        job_id: &'a str,
        /// Job name.
        job_name: &'a str,
        /// What happened to the Job.
        action: JobAction,
        /// Delivery received → Job exists.
        to_job: Duration,
    },
    /// A message was refused and dead-lettered.
    MessageRefused {
        /// Queue it came from.
        queue: &'a str,
        /// Job id, when readable.
        job_id: Option<&'a str>,
        /// Error label.
        kind: &'a str,
        /// Reason text.
        reason: &'a str,
    },
    /// A message could not be handled now and goes back to the queue.
    MessageRequeued {
        /// Queue.
        queue: &'a str,
        /// Job id.
        job_id: &'a str,
        /// Error.
        error: &'a crate::error::Error,
    },
    /// An event was confirmed by the broker.
    EventPublished {
        /// The event.
        event: &'a JobEvent,
        /// Publish → confirm.
        confirm: Duration,
        /// Terminal transition → confirm, when known.
        since_transition: Option<Duration>,
    },
    /// Publishing an event failed (it will be retried).
    PublishFailed {
        /// The event.
        event: &'a JobEvent,
        /// Why.
        error: &'a crate::error::Error,
    },
    /// A Kubernetes API call failed.
    KubeError {
        /// Verb.
        verb: &'a str,
        /// Galaxy job id ("" when the call is not about one job).
        job_id: &'a str,
        /// Job name.
        job_name: &'a str,
        /// Error text.
        error: &'a str,
    },
    /// A new broker session was opened after the first.
    BrokerReconnected,
    /// Events became unroutable (nothing bound to the result exchange), or routable again.
    EventsUnroutable {
        /// The job of the first event that came back (`None`: routed again).
        first: Option<&'a str>,
        /// The result exchange.
        exchange: &'a str,
    },
    /// Number of tracked Jobs by state (refreshed every 2 s).
    Tracked {
        /// State label.
        state: &'static str,
        /// Count.
        count: i64,
    },
}

macro_rules! label_set {
    ($name:ident, $field:ident) => {
        #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
        struct $name {
            $field: String,
        }
        impl From<&str> for $name {
            fn from(value: &str) -> Self {
                $name { $field: value.to_string() }
            }
        }
    };
}
label_set!(Outcome, outcome);
label_set!(Action, action);
label_set!(State, state);
label_set!(ErrorKind, error);
label_set!(Verb, verb);

/// The worker's Prometheus metrics.
pub struct Metrics {
    /// Registry served on `/metrics`.
    pub registry: Registry,
    requests: Family<Outcome, Counter>,
    jobs: Family<Action, Counter>,
    events: Family<State, Counter>,
    publish_failures: Family<ErrorKind, Counter>,
    kube_errors: Family<Verb, Counter>,
    reconnects: Counter,
    confirm_latency: Histogram,
    request_to_job: Histogram,
    terminal_to_event: Histogram,
    tracked: Family<State, Gauge>,
    unroutable: Gauge,
}

fn buckets() -> impl Iterator<Item = f64> {
    [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0].into_iter()
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("k8s_job_worker");
        let m = Metrics {
            requests: Family::default(),
            jobs: Family::default(),
            events: Family::default(),
            publish_failures: Family::default(),
            kube_errors: Family::default(),
            reconnects: Counter::default(),
            confirm_latency: Histogram::new(buckets()),
            request_to_job: Histogram::new(buckets()),
            terminal_to_event: Histogram::new(buckets()),
            tracked: Family::default(),
            unroutable: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register("requests", "Messages consumed, by outcome", m.requests.clone());
        registry.register(
            "jobs",
            "Jobs by action: created, adopted, replaced, already_cancelled, being_cancelled, already_finished",
            m.jobs.clone(),
        );
        registry.register("events_published", "Result events confirmed by the broker, by state", m.events.clone());
        registry.register("publish_failures", "Failed publish attempts, by error", m.publish_failures.clone());
        registry.register("kube_api_errors", "Kubernetes API errors, by verb", m.kube_errors.clone());
        registry.register("broker_reconnects", "Broker sessions opened after the first", m.reconnects.clone());
        registry.register("publish_confirm_seconds", "Publish to confirm latency", m.confirm_latency.clone());
        registry.register("request_to_job_seconds", "Delivery to Job-exists latency", m.request_to_job.clone());
        registry.register(
            "terminal_to_event_seconds",
            "Terminal transition to confirmed terminal event",
            m.terminal_to_event.clone(),
        );
        registry.register("jobs_tracked", "Jobs tracked, by state", m.tracked.clone());
        registry.register(
            "events_unroutable",
            "1 while events cannot be routed (nothing bound to the result exchange): requests are held",
            m.unroutable.clone(),
        );
        // Every series exists from the start at 0, so rates and alerts work before the first event.
        for outcome in [
            "accepted",
            "malformed",
            "schema",
            "invalid",
            "too_large",
            "policy",
            "name_taken",
            "delivery_limit",
            "deletion_timeout",
            "kube",
            "requeued",
        ] {
            let _ = m.requests.get_or_create(&outcome.into());
        }
        for action in ["created", "adopted", "replaced", "already_cancelled", "being_cancelled", "already_finished"] {
            let _ = m.jobs.get_or_create(&action.into());
        }
        for state in crate::domain::event::JobState::ALL {
            let _ = m.events.get_or_create(&state.as_str().into());
        }
        for error in ["nacked", "unroutable", "confirm_timeout", "amqp", "not_connected"] {
            let _ = m.publish_failures.get_or_create(&error.into());
        }
        for verb in ["create", "get", "patch", "delete", "list"] {
            let _ = m.kube_errors.get_or_create(&verb.into());
        }
        for state in ["submitted", "running", "finished"] {
            let _ = m.tracked.get_or_create(&state.into());
        }
        Metrics { registry, ..m }
    }
}

impl Metrics {
    /// Logs and counts one observation.
    pub fn observe(&self, o: Observation<'_>) {
        match o {
            Observation::RequestAccepted { job_id, job_name, action, to_job } => {
                tracing::info!(
                    job_id,
                    job_name,
                    action = action.as_str(),
                    ms = to_job.as_millis() as u64,
                    "request accepted"
                );
                self.requests.get_or_create(&"accepted".into()).inc();
                self.jobs.get_or_create(&action.as_str().into()).inc();
                self.request_to_job.observe(to_job.as_secs_f64());
            }
            Observation::MessageRefused { queue, job_id, kind, reason } => {
                tracing::warn!(queue, job_id, kind, reason, "message refused and dead-lettered");
                self.requests.get_or_create(&kind.into()).inc();
            }
            Observation::MessageRequeued { queue, job_id, error } => {
                tracing::warn!(queue, job_id, error = %error, "message requeued");
                self.requests.get_or_create(&"requeued".into()).inc();
            }
            Observation::EventPublished { event, confirm, since_transition } => {
                tracing::info!(
                    job_id = event.job_id,
                    job_name = event.job_name,
                    state = event.state.as_str(),
                    event_id = event.event_id,
                    reason = event.reason,
                    "event published"
                );
                self.events.get_or_create(&event.state.as_str().into()).inc();
                self.confirm_latency.observe(confirm.as_secs_f64());
                if let Some(lag) = since_transition {
                    self.terminal_to_event.observe(lag.as_secs_f64());
                }
            }
            Observation::PublishFailed { event, error } => {
                // Unroutable events are said once, by `EventsUnroutable`; each try is counted.
                if matches!(error, crate::error::Error::Unroutable { .. }) {
                    tracing::debug!(
                        job_id = event.job_id,
                        state = event.state.as_str(),
                        "event unroutable; will retry"
                    );
                } else {
                    tracing::warn!(job_id = event.job_id, job_name = event.job_name, state = event.state.as_str(), error = %error, "publish failed; will retry");
                }
                self.publish_failures.get_or_create(&error.metric_label().into()).inc();
            }
            Observation::KubeError { verb, job_id, job_name, error } => {
                tracing::warn!(verb, job_id, job_name, error, "kubernetes API error");
                self.kube_errors.get_or_create(&verb.into()).inc();
            }
            Observation::BrokerReconnected => {
                tracing::info!("broker session re-established");
                self.reconnects.inc();
            }
            Observation::EventsUnroutable { first: Some(job_id), exchange } => {
                tracing::warn!(
                    exchange,
                    job_id,
                    "events cannot be routed: no queue is bound to the result exchange (is Galaxy's event \
                     queue declared?); requests are held, and retried slowly, until one is"
                );
                self.unroutable.set(1);
            }
            Observation::EventsUnroutable { first: None, exchange } => {
                tracing::info!(exchange, "events are routed again");
                self.unroutable.set(0);
            }
            Observation::Tracked { state, count } => {
                self.tracked.get_or_create(&state.into()).set(count);
            }
        }
    }

    /// The metrics in Prometheus text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
