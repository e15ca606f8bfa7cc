//! Consumes one queue across reconnections, handling each delivery in its own task.
//! At most `prefetch` deliveries are in flight; on shutdown the consumer is cancelled,
//! in-flight handlers get the grace period, and whatever is unacked returns to the queue.
//! When the channel dies, its handlers are stopped: the broker redelivers their messages.

use std::{future::Future, sync::Arc, time::Duration};

use futures::StreamExt;
use lapin::{
    message::Delivery,
    options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions},
    types::FieldTable,
};
use tokio::task::JoinSet;

use super::broker::Broker;
use crate::shutdown::Shutdown;

/// What to consume, and how.
pub struct Subscription {
    /// The queue.
    pub queue: String,
    /// Deliveries in flight at most.
    pub prefetch: u16,
    /// Consumer tag (names the replica in the broker's management UI).
    pub tag: String,
    /// How long in-flight handlers may finish after shutdown starts.
    pub grace: Duration,
    /// How long the broker may let a delivery stay unacknowledged (`x-consumer-timeout`;
    /// `None`: the broker's own setting).
    pub consumer_timeout: Option<Duration>,
}

/// The consumer's arguments: its delivery acknowledgement timeout, when one is set (RabbitMQ
/// 3.12 and later honour it; earlier ones ignore consumer arguments they do not know).
fn consume_arguments(timeout: Option<Duration>) -> FieldTable {
    let mut args = FieldTable::default();
    if let Some(timeout) = timeout {
        let ms = i64::try_from(timeout.as_millis()).unwrap_or(i64::MAX);
        args.insert("x-consumer-timeout".into(), lapin::types::AMQPValue::LongLongInt(ms));
    }
    args
}

/// Runs until shutdown: consume the queue, call `handle` for every delivery.
pub async fn consume<F, Fut>(broker: Arc<Broker>, sub: Subscription, stop: Shutdown, handle: F)
where
    F: Fn(Delivery) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let Subscription { queue, prefetch, tag, grace, consumer_timeout } = sub;
    let mut in_flight = JoinSet::new();
    let mut first = true;
    loop {
        let Some(session) = broker.session_with_retry(&stop).await else { break };
        if !first && session.generation > 1 {
            tracing::info!(queue, generation = session.generation, "consuming again after reconnect");
        }
        first = false;
        let setup = async {
            let channel = session.connection.create_channel().await?;
            channel.basic_qos(prefetch, BasicQosOptions::default()).await?;
            let consumer = channel
                .basic_consume(
                    queue.clone().into(),
                    tag.clone().into(),
                    BasicConsumeOptions::default(),
                    consume_arguments(consumer_timeout),
                )
                .await?;
            Ok::<_, lapin::Error>((channel, consumer))
        };
        let (channel, mut consumer) = match setup.await {
            Ok(parts) => parts,
            Err(err) => {
                tracing::warn!(queue, error = %err, "cannot consume; reconnecting");
                broker.invalidate(session.generation).await;
                if stop.sleep_or_stop(Duration::from_millis(500)).await {
                    break;
                }
                continue;
            }
        };
        tracing::info!(queue, prefetch, "consuming");
        loop {
            tokio::select! {
                _ = stop.wait() => {
                    let _ = channel.basic_cancel(tag.clone().into(), BasicCancelOptions::default()).await;
                    drain(&mut in_flight, grace, &queue).await;
                    let _ = channel.close(200, "shutdown".into()).await;
                    return;
                }
                Some(_) = in_flight.join_next(), if !in_flight.is_empty() => {}
                next = consumer.next() => match next {
                    Some(Ok(delivery)) => {
                        in_flight.spawn(handle(delivery));
                    }
                    Some(Err(err)) => {
                        tracing::warn!(queue, error = %err, "consumer failed; reconnecting");
                        break;
                    }
                    None => {
                        tracing::warn!(queue, "consumer stream ended; reconnecting");
                        break;
                    }
                }
            }
        }
        // The channel is dead: the broker gives its unacked deliveries to another consumer (or
        // to this one, once back). Their handlers stop here, so no delivery is worked on twice
        // at once — a channel closed for holding a delivery past the broker's consumer_timeout
        // (an apiserver outage) would otherwise leave its handler going on beside the next.
        if !in_flight.is_empty() {
            tracing::warn!(queue, aborted = in_flight.len(), "channel lost: stopping the handlers of its deliveries");
            in_flight.abort_all();
            while in_flight.join_next().await.is_some() {}
        }
        broker.invalidate(session.generation).await;
    }
    drain(&mut in_flight, grace, &queue).await;
}

/// Gives in-flight handlers the shutdown grace period, then abandons them (their
/// deliveries are requeued by the broker when the channel closes).
async fn drain(in_flight: &mut JoinSet<()>, grace: Duration, queue: &str) {
    let pending = in_flight.len();
    if pending == 0 {
        return;
    }
    tracing::info!(queue, pending, "waiting for in-flight messages");
    let all = async { while in_flight.join_next().await.is_some() {} };
    if tokio::time::timeout(grace, all).await.is_err() {
        tracing::warn!(queue, remaining = in_flight.len(), "grace period over; unacked messages return to the queue");
        in_flight.abort_all();
    }
}
