//! The one shape every consumed message (request, cancel/status, intent) is handled in: its
//! work is retried on transient failures for a while; it is acked only after the work is
//! done; a message that is wrong or cannot work out is refused — dead-lettered with the
//! reason, with a `failed` event for a request whose job id is readable and which has no Job;
//! anything else goes back to the queue.
//!
//! Going back is said two ways, so a quorum queue's delivery limit means the same on
//! RabbitMQ 3.x and 4.x: `basic.reject` when the message's work failed (it counts towards the
//! limit everywhere), `basic.nack` when this replica cannot take it now (shutting down; on 4.x
//! it does not count).

use std::{future::Future, time::Duration};

use lapin::{
    message::Delivery,
    options::{BasicAckOptions, BasicNackOptions, BasicRejectOptions},
};

use crate::{
    config::{AmqpSettings, QueueType},
    context::Context,
    domain::{
        event::{JobState, Subject},
        request,
    },
    error::Error,
    k8s::view,
    observe::Observation,
    parked::header_count,
    retry::{self, Budget},
};

/// What kind of message a delivery is: only a request owes Galaxy a `failed` event when it
/// is refused (a refused cancel, status or intent is about a job that goes on).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// A job request.
    Request,
    /// A cancel or status message, or a worker's intent.
    Control,
}

/// Why a delivery goes back to its queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GiveBack {
    /// Its work failed (counts towards the delivery limit).
    Failed,
    /// This replica cannot take it now (shutting down): another one may.
    NotNow,
}

/// Returns a delivery to its queue, as `why` says.
pub async fn give_back(delivery: &Delivery, why: GiveBack) {
    let _ = match why {
        GiveBack::Failed => delivery.reject(BasicRejectOptions { requeue: true }).await,
        GiveBack::NotNow => delivery.nack(BasicNackOptions { requeue: true, ..BasicNackOptions::default() }).await,
    };
}

/// Handles one delivery from `queue` by running `work` until it succeeds or is refused.
/// Transient failures are retried for the retry window. Two kinds of trouble that are not the
/// message's fault hold the delivery instead of giving it back (each return counts against
/// its delivery limit): an unreachable apiserver (`/readyz` says so), and events nothing is
/// bound to receive (retried slowly; a consumer holding all its deliveries takes no more, so
/// nothing spins). A message given back for the last time would be parked by the broker
/// without a word: it is refused here instead, with a reason.
pub async fn handle<F, Fut>(ctx: &Context, delivery: &Delivery, queue: &str, source: Source, mut work: F)
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
    if matches!(&outcome, Some(Err(Error::Unroutable { .. }))) {
        // Logged once and counted by the broker's routability watch, not per delivery.
        let hold = |e: &Error| matches!(e, Error::Unroutable { .. });
        outcome = retry::retry(&ctx.shutdown, Budget::Slowly, hold, |_, _| {}, &mut work).await;
    }
    match outcome {
        Some(Ok(())) => {
            ctx.health.apiserver_reachable();
            let _ = delivery.ack(BasicAckOptions::default()).await;
        }
        Some(Err(err)) if err.is_refusal() => {
            refuse(ctx, delivery, queue, source, err.metric_label(), &err.to_string(), Owed::Failed).await
        }
        Some(Err(error)) => {
            let amqp = &ctx.settings.amqp;
            let delivered = header_count(delivery.properties.headers(), "x-delivery-count").unwrap_or(0) + 1;
            if is_last_delivery(delivered, amqp) {
                let reason =
                    format!("given up after {delivered} deliveries (delivery limit {}): {error}", amqp.delivery_limit);
                return refuse(ctx, delivery, queue, source, "delivery_limit", &reason, Owed::UnlessItsJobExists).await;
            }
            ctx.metrics.observe(Observation::MessageRequeued { queue, job_id: &job_id(), error: &error });
            give_back(delivery, GiveBack::Failed).await;
        }
        None => {
            let error = Error::ShuttingDown;
            ctx.metrics.observe(Observation::MessageRequeued { queue, job_id: &job_id(), error: &error });
            give_back(delivery, GiveBack::NotNow).await;
        }
    }
}

/// Whether a message given back now would be parked by the broker (a quorum queue parks a
/// message returned more than `delivery_limit` times; `delivered` counts this delivery).
fn is_last_delivery(delivered: u64, amqp: &AmqpSettings) -> bool {
    amqp.queue_type == QueueType::Quorum && delivered > u64::from(amqp.delivery_limit)
}

/// When a refused request owes Galaxy a `failed` event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owed {
    /// Always: it was refused before any Job of it was made.
    Failed,
    /// Only when no Job of the request exists: one that does reports its own outcome.
    UnlessItsJobExists,
}

/// Whether a refused message owes a `failed` event: a request whose job id is readable, and
/// (when `owed` says so) of which no Job exists. `None` when that could not be found out.
pub async fn owes_failed_event(ctx: &Context, body: &[u8], source: Source, owed: Owed) -> Option<Option<String>> {
    let Some(job_id) = request::readable_job_id(body).filter(|_| source == Source::Request) else {
        return Some(None);
    };
    if owed == Owed::UnlessItsJobExists {
        let attempt = request::readable_attempt(body);
        let name = ctx.defaults.naming.job_name(&job_id, attempt);
        let owner = ctx.defaults.naming.owner(&job_id, attempt);
        match ctx.jobs.get(&name).await {
            Ok(Some(job)) if view::check_owner(&owner, &job.metadata).is_ok() => return Some(None),
            Ok(_) => {}
            Err(err) => {
                tracing::warn!(job_id, error = %err, "cannot tell whether the job of a refused request exists");
                return None;
            }
        }
    }
    Some(Some(job_id))
}

/// Publishes the `failed` event of a refused request (confirmed, retried for the retry
/// window); whether the broker confirmed it.
pub async fn publish_refused(ctx: &Context, body: &[u8], job_id: &str, reason: &str) -> bool {
    let attempt = request::readable_attempt(body);
    let handler = request::readable_handler(body);
    let name = ctx.defaults.naming.job_name(job_id, attempt);
    let subject = Subject { job_id, attempt, job_name: &name, fingerprint: "refused", handler: handler.as_deref() };
    let mut event = ctx.reporter.event(&subject, JobState::Failed, format!("request refused: {reason}"));
    let budget = Budget::Within(ctx.settings.amqp.retry_window());
    ctx.broker.publish_event_confirmed(&mut event, None, &ctx.metrics, &ctx.shutdown, budget, || true).await
}

/// Dead-letters a refused message (with a `failed` event when it owes one: see
/// [`owes_failed_event`]), then acks it. If the dead-letter publish fails the message is
/// given back, never dropped.
pub async fn refuse(
    ctx: &Context,
    delivery: &Delivery,
    queue: &str,
    source: Source,
    kind: &str,
    reason: &str,
    owed: Owed,
) {
    let readable = request::readable_job_id(&delivery.data);
    ctx.metrics.observe(Observation::MessageRefused { queue, job_id: readable.as_deref(), kind, reason });
    let Some(failed_for) = owes_failed_event(ctx, &delivery.data, source, owed).await else {
        return give_back(delivery, GiveBack::NotNow).await;
    };
    if let Some(job_id) = &failed_for {
        if !publish_refused(ctx, &delivery.data, job_id, reason).await {
            return give_back(delivery, GiveBack::NotNow).await;
        }
    }
    match ctx.broker.dead_letter(&delivery.data, &delivery.properties, queue, kind, reason).await {
        Ok(_) => {
            let _ = delivery.ack(BasicAckOptions::default()).await;
        }
        Err(err) => {
            tracing::warn!(queue, error = %err, "dead-lettering failed; giving the message back");
            give_back(delivery, GiveBack::NotNow).await;
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
