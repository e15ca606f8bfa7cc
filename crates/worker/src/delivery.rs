//! The one shape every consumed message (request or cancel/status) is handled in: its work
//! is retried on transient failures for a while; it is acked only after the work is done; a
//! message that is wrong or cannot work out is refused — dead-lettered with the reason, with a
//! `failed` event when its job id is readable; anything else goes back to the queue.

use std::{future::Future, time::Duration};

use lapin::{
    message::Delivery,
    options::{BasicAckOptions, BasicNackOptions},
};

use crate::{
    config::{AmqpSettings, QueueType},
    context::Context,
    domain::{
        event::{JobState, Subject},
        request,
    },
    error::Error,
    observe::Observation,
    parked::header_count,
    retry::{self, Budget},
};

async fn requeue(delivery: &Delivery) {
    let _ = delivery.nack(BasicNackOptions { requeue: true, ..BasicNackOptions::default() }).await;
}

/// Handles one delivery from `queue` by running `work` until it succeeds or is refused.
/// Transient failures are retried for the retry window; while the apiserver is unreachable
/// the delivery is held (and `/readyz` says so) rather than given back, since every return
/// counts against the message's delivery limit. A message given back for the last time
/// would be parked by the broker without a word: it is refused here instead, with a reason.
pub async fn handle<F, Fut>(ctx: &Context, delivery: &Delivery, queue: &str, mut work: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), Error>>,
{
    let job_id = || request::readable_job_id(&delivery.data).unwrap_or_default();
    let retrying = |err: &Error, wait: Duration| {
        ctx.health.observe_apiserver(err);
        tracing::debug!(job_id = job_id(), error = %err, retry_in_ms = wait.as_millis() as u64, "retrying");
    };
    let window = Budget::Within(ctx.settings.amqp.retry_window());
    let mut outcome = retry::retry(&ctx.shutdown, window, |e: &Error| !e.is_refusal(), retrying, &mut work).await;
    if matches!(&outcome, Some(Err(e)) if e.is_unavailable()) {
        tracing::warn!(queue, job_id = job_id(), "the apiserver is unreachable: holding the message until it is back");
        let hold = |e: &Error| e.is_unavailable();
        outcome = retry::retry(&ctx.shutdown, Budget::UntilShutdown, hold, retrying, &mut work).await;
    }
    match outcome {
        Some(Ok(())) => {
            ctx.health.apiserver_reachable();
            let _ = delivery.ack(BasicAckOptions::default()).await;
        }
        Some(Err(err)) if err.is_refusal() => refuse(ctx, delivery, queue, err.metric_label(), &err.to_string()).await,
        Some(Err(error)) => {
            let amqp = &ctx.settings.amqp;
            let delivered = header_count(delivery.properties.headers(), "x-delivery-count").unwrap_or(0) + 1;
            if is_last_delivery(delivered, amqp) {
                let reason =
                    format!("given up after {delivered} deliveries (delivery limit {}): {error}", amqp.delivery_limit);
                return refuse(ctx, delivery, queue, "delivery_limit", &reason).await;
            }
            ctx.metrics.observe(Observation::MessageRequeued { queue, job_id: &job_id(), error: &error });
            requeue(delivery).await;
        }
        None => {
            let error = Error::ShuttingDown;
            ctx.metrics.observe(Observation::MessageRequeued { queue, job_id: &job_id(), error: &error });
            requeue(delivery).await;
        }
    }
}

/// Whether a message given back now would be parked by the broker (a quorum queue parks a
/// message returned more than `delivery_limit` times; `delivered` counts this delivery).
fn is_last_delivery(delivered: u64, amqp: &AmqpSettings) -> bool {
    amqp.queue_type == QueueType::Quorum && delivered > u64::from(amqp.delivery_limit)
}

/// Dead-letters a refused message (with a `failed` event when its job id is readable), then
/// acks it. If the dead-letter publish fails the message is requeued, never dropped.
pub async fn refuse(ctx: &Context, delivery: &Delivery, queue: &str, kind: &str, reason: &str) {
    let job_id = request::readable_job_id(&delivery.data);
    ctx.metrics.observe(Observation::MessageRefused { queue, job_id: job_id.as_deref(), kind, reason });
    if let Some(job_id) = &job_id {
        let attempt = request::readable_attempt(&delivery.data);
        let name = ctx.defaults.naming.job_name(job_id, attempt);
        let subject = Subject { job_id, attempt, job_name: &name, fingerprint: "refused" };
        let mut event = ctx.reporter.event(&subject, JobState::Failed, format!("request refused: {reason}"));
        let budget = Budget::Within(ctx.settings.amqp.retry_window());
        if !ctx.broker.publish_event_confirmed(&mut event, None, &ctx.metrics, &ctx.shutdown, budget, || true).await {
            return requeue(delivery).await;
        }
    }
    match ctx.broker.dead_letter(&delivery.data, &delivery.properties, queue, kind, reason).await {
        Ok(_) => {
            let _ = delivery.ack(BasicAckOptions::default()).await;
        }
        Err(err) => {
            tracing::warn!(queue, error = %err, "dead-lettering failed; requeueing");
            requeue(delivery).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn item2_the_last_delivery_is_refused_with_a_reason_not_given_back() {
        let quorum = crate::config::Settings::from_args(["--delivery-limit", "20"]).unwrap().amqp;
        assert!(!is_last_delivery(1, &quorum) && !is_last_delivery(20, &quorum));
        assert!(is_last_delivery(21, &quorum), "the broker would park it without a word");
        let classic = crate::config::Settings::from_args(["--queue-type", "classic"]).unwrap().amqp;
        assert!(!is_last_delivery(1000, &classic), "classic queues have no delivery limit");
    }
}
