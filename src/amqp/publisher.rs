//! Publishing with confirms, the one way every message leaves a process of this project: a
//! publish succeeds only when the broker acks it and did not return it. Nacks, returns
//! (nothing bound), channel errors and confirm timeouts are errors the caller retries.

use std::time::{Duration, Instant};

use lapin::{
    options::BasicPublishOptions,
    types::{AMQPValue, FieldTable},
    BasicProperties, Channel, Confirmation, PublisherConfirm,
};

use super::broker::Broker;
use crate::{
    domain::{
        event::JobEvent,
        naming::{routing_word, NO_INSTANCE},
    },
    error::{Error, Result},
    observe::{Metrics, Observation},
    retry::{self, Budget},
    shutdown::Shutdown,
};

/// Routing key of an event: `<instance id or "default">.<handler>.<state>` when its job's
/// request named a handler (one routing word: [`routing_word`]), else
/// `<instance id or "default">.<state>`.
pub fn event_routing_key(event: &JobEvent) -> String {
    let instance = event.instance_id.as_deref().unwrap_or(NO_INSTANCE);
    match &event.handler {
        Some(handler) => format!("{instance}.{}.{}", routing_word(handler), event.state.as_str()),
        None => format!("{instance}.{}", event.state.as_str()),
    }
}

/// A message to publish.
pub struct Outgoing<'a> {
    /// Exchange ("" for the default exchange, which routes to the queue named by the key).
    pub exchange: &'a str,
    /// Routing key.
    pub routing_key: &'a str,
    /// Body.
    pub body: &'a [u8],
    /// AMQP properties (delivery mode 2 is set on every publish).
    pub properties: BasicProperties,
}

impl<'a> Outgoing<'a> {
    /// A JSON message straight to a queue (through the default exchange).
    pub fn to_queue(queue: &'a str, body: &'a [u8]) -> Self {
        Outgoing {
            exchange: "",
            routing_key: queue,
            body,
            properties: BasicProperties::default().with_content_type("application/json".into()),
        }
    }
}

/// A message sent whose confirm is outstanding (to pipeline many publishes).
pub struct Pending {
    confirm: PublisherConfirm,
    exchange: String,
    routing_key: String,
}

/// Sends one message, persistent and mandatory, on a channel in confirm mode.
pub async fn send(channel: &Channel, msg: Outgoing<'_>) -> Result<Pending> {
    let confirm = channel
        .basic_publish(
            msg.exchange.into(),
            msg.routing_key.into(),
            BasicPublishOptions { mandatory: true, ..BasicPublishOptions::default() },
            msg.body,
            msg.properties.with_delivery_mode(2),
        )
        .await?;
    Ok(Pending { confirm, exchange: msg.exchange.to_string(), routing_key: msg.routing_key.to_string() })
}

impl Pending {
    /// Waits for the confirm: only an ack of a routed message is success.
    pub async fn confirmed(self) -> Result<()> {
        match self.confirm.await? {
            Confirmation::Ack(None) => Ok(()),
            Confirmation::Ack(Some(_)) => {
                Err(Error::Unroutable { exchange: self.exchange, routing_key: self.routing_key })
            }
            // The channel is in confirm mode; anything but an ack is a refusal.
            Confirmation::Nack(_) | Confirmation::NotRequested => Err(Error::Nacked(self.exchange)),
        }
    }
}

/// Sends one message and waits (at most `timeout`) for its confirm; returns the confirm latency.
pub async fn publish(channel: &Channel, msg: Outgoing<'_>, timeout: Duration) -> Result<Duration> {
    let started = Instant::now();
    let attempt = async { send(channel, msg).await?.confirmed().await };
    match tokio::time::timeout(timeout, attempt).await {
        Err(_) => Err(Error::ConfirmTimeout(timeout.as_secs())),
        Ok(result) => result.map(|()| started.elapsed()),
    }
}

impl Broker {
    /// Publishes one message on the session's confirm channel; a timeout or channel error
    /// closes the session so the next call reconnects.
    pub async fn publish(&self, msg: Outgoing<'_>) -> Result<Duration> {
        let session = self.session().await?;
        let timeout = Duration::from_secs(self.settings().publish_timeout_seconds.max(1));
        let result = publish(&session.publish, msg, timeout).await;
        if matches!(result, Err(Error::ConfirmTimeout(_) | Error::Amqp(_))) {
            // A confirm that never comes usually means a dead connection: start over.
            self.invalidate(session.generation).await;
        }
        result
    }

    /// Publishes a result event to the result exchange, stamped with the moment it is sent
    /// (`published_at`, and the message's timestamp).
    pub async fn publish_event(&self, event: &mut JobEvent) -> Result<Duration> {
        let now = jiff::Timestamp::now();
        event.published_at = now.to_string();
        let body = serde_json::to_vec(event)?;
        let routing_key = event_routing_key(event);
        let properties = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_message_id(event.event_id.clone().into())
            .with_type("k8s-job-worker.job-event.v1".into())
            .with_timestamp(now.as_second().max(0) as u64);
        let result = self
            .publish(Outgoing {
                exchange: &self.settings().result_exchange,
                routing_key: &routing_key,
                body: &body,
                properties,
            })
            .await;
        match &result {
            Ok(_) => self.event_routed(&event.job_id, true),
            Err(Error::Unroutable { .. }) => self.event_routed(&event.job_id, false),
            Err(_) => {}
        }
        result
    }

    /// Publishes an event, retrying while `budget` lasts, `keep_trying` says so and shutdown
    /// has not started; every attempt is observed. `since`: when the reported state was
    /// reached. Returns whether the broker confirmed it.
    pub async fn publish_event_confirmed(
        &self,
        event: &mut JobEvent,
        since: Option<jiff::Timestamp>,
        metrics: &Metrics,
        stop: &Shutdown,
        budget: Budget,
        keep_trying: impl Fn() -> bool,
    ) -> bool {
        let attempt = || {
            let mut event = event.clone();
            async move { self.publish_event(&mut event).await.map(|confirm| (confirm, event)) }
        };
        let unpublished: &JobEvent = event;
        let failed =
            |error: &Error, _: Duration| metrics.observe(Observation::PublishFailed { event: unpublished, error });
        match retry::retry(stop, budget, |_| keep_trying(), failed, attempt).await {
            Some(Ok((confirm, published))) => {
                *event = published;
                let since_transition =
                    since.and_then(|t| Duration::try_from(jiff::Timestamp::now().duration_since(t)).ok());
                metrics.observe(Observation::EventPublished { event, confirm, since_transition });
                true
            }
            _ => false,
        }
    }

    /// Parks a refused message in the dead-letter exchange with the reason in headers.
    pub async fn dead_letter(
        &self,
        body: &[u8],
        original: &BasicProperties,
        source_queue: &str,
        kind: &str,
        reason: &str,
    ) -> Result<Duration> {
        let mut headers = original.headers().clone().unwrap_or_default();
        headers.insert("x-k8s-job-worker-reason".into(), AMQPValue::LongString(reason.into()));
        headers.insert("x-k8s-job-worker-error".into(), AMQPValue::LongString(kind.into()));
        headers.insert("x-k8s-job-worker-source-queue".into(), AMQPValue::LongString(source_queue.into()));
        let mut properties = original.clone().with_headers(headers);
        if properties.content_type().is_none() {
            properties = properties.with_content_type("application/octet-stream".into());
        }
        self.publish(Outgoing {
            exchange: &self.settings().dead_letter_exchange,
            routing_key: source_queue,
            body,
            properties,
        })
        .await
    }
}

/// Reads a string header (used by tests and the `events` command).
pub fn header_str(headers: &Option<FieldTable>, key: &str) -> Option<String> {
    match headers.as_ref()?.inner().get(key)? {
        AMQPValue::LongString(s) => Some(s.to_string()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
        _ => None,
    }
}
