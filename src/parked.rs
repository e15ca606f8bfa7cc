//! The dead-letter inbox: everything dead-lettered arrives here first — messages the worker
//! refused (with their reason, their `failed` event already published) and messages the
//! broker parked itself after their delivery limit (the worker crashed on them every time).
//! Each is moved to the dead-letter queue carrying a reason; a parked one gets its reason
//! from the broker's `x-death` record, and a `failed` event when its job id is readable.

use std::sync::Arc;

use lapin::{
    message::Delivery,
    options::BasicAckOptions,
    types::{AMQPValue, FieldTable},
};

use crate::{
    amqp::publisher::{header_str, Outgoing},
    context::Context,
    delivery::{give_back, owes_failed_event, publish_refused, GiveBack, Owed, Source},
    domain::request,
    observe::Observation,
};

/// The reason header of a message the worker refused.
pub const REASON_HEADER: &str = "x-k8s-job-worker-reason";

/// Why the broker parked a message, from its `x-death` record: the reason and the queue it left.
fn broker_reason(headers: &Option<FieldTable>, delivery_limit: u32) -> String {
    let death = headers.as_ref().and_then(|h| match h.inner().get("x-death") {
        Some(AMQPValue::FieldArray(deaths)) => deaths.as_slice().first().cloned(),
        _ => None,
    });
    let Some(AMQPValue::FieldTable(death)) = death else {
        return "parked by the broker (no x-death record)".into();
    };
    let text = |key: &str| match death.inner().get(key) {
        Some(AMQPValue::LongString(s)) => s.to_string(),
        Some(AMQPValue::ShortString(s)) => s.as_str().to_string(),
        _ => "?".into(),
    };
    let reason = text("reason");
    let why = match reason.as_str() {
        "delivery_limit" => format!("delivered more than {delivery_limit} times without being handled"),
        _ => "it could not be handled".into(),
    };
    format!("parked by the broker ({reason}) in queue {}: {why}", text("queue"))
}

/// A numeric header.
pub fn header_count(headers: &Option<FieldTable>, key: &str) -> Option<u64> {
    match headers.as_ref()?.inner().get(key)? {
        AMQPValue::LongLongInt(n) => u64::try_from(*n).ok(),
        AMQPValue::LongInt(n) => u64::try_from(*n).ok(),
        AMQPValue::LongUInt(n) => Some(u64::from(*n)),
        AMQPValue::ShortInt(n) => u64::try_from(*n).ok(),
        _ => None,
    }
}

/// Handles one message of the inbox.
pub async fn handle_parked(ctx: Arc<Context>, delivery: Delivery) {
    let amqp = &ctx.settings.amqp;
    let headers = delivery.properties.headers().clone();
    let mut moved = delivery.properties.clone();
    if header_str(&headers, REASON_HEADER).is_none() {
        let reason = broker_reason(&headers, amqp.delivery_limit);
        let queue = header_str(&headers, "x-first-death-queue").unwrap_or_default();
        let job_id = request::readable_job_id(&delivery.data);
        ctx.metrics.observe(Observation::MessageRefused {
            queue: &queue,
            job_id: job_id.as_deref(),
            kind: "delivery_limit",
            reason: &reason,
        });
        // Only a request owes a `failed` event, and only when no Job of it exists.
        let source = if queue == amqp.request_queue { Source::Request } else { Source::Control };
        let Some(failed_for) = owes_failed_event(&ctx, &delivery.data, source, Owed::UnlessItsJobExists).await else {
            return give_back(&delivery, GiveBack::NotNow).await;
        };
        if let Some(job_id) = &failed_for {
            if !publish_refused(&ctx, &delivery.data, job_id, &reason).await {
                return give_back(&delivery, GiveBack::NotNow).await;
            }
        }
        let mut table = headers.unwrap_or_default();
        table.insert(REASON_HEADER.into(), AMQPValue::LongString(reason.as_str().into()));
        table.insert("x-k8s-job-worker-error".into(), AMQPValue::LongString("delivery_limit".into()));
        table.insert("x-k8s-job-worker-source-queue".into(), AMQPValue::LongString(queue.as_str().into()));
        moved = moved.with_headers(table);
    }
    let msg = Outgoing { exchange: "", routing_key: &amqp.dead_letter_queue, body: &delivery.data, properties: moved };
    match ctx.broker.publish(msg).await {
        Ok(_) => {
            let _ = delivery.ack(BasicAckOptions::default()).await;
        }
        Err(err) => {
            tracing::warn!(error = %err, "moving a dead letter failed; it stays in the inbox");
            give_back(&delivery, GiveBack::NotNow).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn item2_a_parked_message_gets_the_brokers_reason() {
        let mut death = FieldTable::default();
        death.insert("reason".into(), AMQPValue::LongString("delivery_limit".into()));
        death.insert("queue".into(), AMQPValue::LongString("galaxy.k8s.requests".into()));
        let mut headers = FieldTable::default();
        headers.insert("x-death".into(), AMQPValue::FieldArray(vec![AMQPValue::FieldTable(death)].into()));
        let reason = broker_reason(&Some(headers), 20);
        assert_eq!(
            reason,
            "parked by the broker (delivery_limit) in queue galaxy.k8s.requests: delivered more than 20 times without being handled"
        );
        assert!(broker_reason(&None, 20).contains("no x-death"));
    }
}
