//! Publishing with confirms: a publish succeeds only when the broker acks it and did not
//! return it. Nacks, returns and confirm timeouts are errors the caller retries.

use std::time::{Duration, Instant};

use lapin::{
    options::BasicPublishOptions,
    types::{AMQPValue, FieldTable},
    BasicProperties, Confirmation,
};

use super::broker::Broker;
use crate::{
    domain::event::JobEvent,
    error::{Error, Result},
};

/// Routing key of an event: `<instance id or "default">.<state>`.
pub fn event_routing_key(event: &JobEvent) -> String {
    format!("{}.{}", event.instance_id.as_deref().unwrap_or("default"), event.state.as_str())
}

/// A message to publish.
pub struct Outgoing<'a> {
    /// Exchange.
    pub exchange: &'a str,
    /// Routing key.
    pub routing_key: &'a str,
    /// Body.
    pub body: &'a [u8],
    /// AMQP properties.
    pub properties: BasicProperties,
}

impl Broker {
    /// Publishes one message (persistent, mandatory) and waits for its confirm.
    /// Returns the confirm latency.
    pub async fn publish(&self, msg: Outgoing<'_>) -> Result<Duration> {
        let session = self.session().await?;
        let timeout = Duration::from_secs(self.settings().publish_timeout_seconds.max(1));
        let started = Instant::now();
        let attempt = async {
            let confirm = session
                .publish
                .basic_publish(
                    msg.exchange.into(),
                    msg.routing_key.into(),
                    BasicPublishOptions { mandatory: true, ..BasicPublishOptions::default() },
                    msg.body,
                    msg.properties.with_delivery_mode(2),
                )
                .await?;
            confirm.await
        };
        let outcome = tokio::time::timeout(timeout, attempt).await;
        let confirmation = match outcome {
            Err(_) => {
                // A confirm that never comes usually means a dead connection: start over.
                self.invalidate(session.generation).await;
                return Err(Error::ConfirmTimeout(timeout.as_secs()));
            }
            Ok(Err(err)) => {
                self.invalidate(session.generation).await;
                return Err(err.into());
            }
            Ok(Ok(c)) => c,
        };
        match confirmation {
            Confirmation::Ack(None) => Ok(started.elapsed()),
            Confirmation::Ack(Some(_)) => {
                Err(Error::Unroutable { exchange: msg.exchange.to_string(), routing_key: msg.routing_key.to_string() })
            }
            Confirmation::Nack(_) => Err(Error::Nacked(msg.exchange.to_string())),
            // The publish channel is always in confirm mode; anything else is a bug upstream.
            Confirmation::NotRequested => Err(Error::Nacked(msg.exchange.to_string())),
        }
    }

    /// Publishes a result event to the result exchange.
    pub async fn publish_event(&self, event: &JobEvent) -> Result<Duration> {
        let body = serde_json::to_vec(event)?;
        let routing_key = event_routing_key(event);
        let properties = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_message_id(event.event_id.clone().into())
            .with_type("k8s-job-worker.job-event.v1".into())
            .with_timestamp(jiff::Timestamp::now().as_second().max(0) as u64);
        self.publish(Outgoing {
            exchange: &self.settings().result_exchange,
            routing_key: &routing_key,
            body: &body,
            properties,
        })
        .await
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
