//! Consumes one queue across reconnections, handling each delivery in its own task.
//! At most `prefetch` deliveries are in flight; on shutdown the consumer is cancelled,
//! in-flight handlers get the grace period, and whatever is unacked returns to the queue.

use std::{future::Future, sync::Arc, time::Duration};

use futures::StreamExt;
use lapin::{
    message::Delivery,
    options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions},
    types::FieldTable,
};
use tokio::task::JoinSet;

use crate::context::Context;

/// Runs until shutdown: consume `queue`, call `handle` for every delivery.
pub async fn consume<F, Fut>(ctx: Arc<Context>, queue: String, prefetch: u16, handle: F)
where
    F: Fn(Arc<Context>, Delivery) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut in_flight = JoinSet::new();
    let mut first = true;
    loop {
        let Some(session) = ctx.broker.session_with_retry(&ctx.shutdown).await else { break };
        if !first && session.generation > 1 {
            tracing::info!(queue, generation = session.generation, "consuming again after reconnect");
        }
        first = false;
        let setup = async {
            let channel = session.connection.create_channel().await?;
            channel.basic_qos(prefetch, BasicQosOptions::default()).await?;
            let tag = format!("{}-{}", ctx.worker_id, queue);
            let consumer = channel
                .basic_consume(
                    queue.clone().into(),
                    tag.clone().into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            Ok::<_, lapin::Error>((channel, consumer, tag))
        };
        let (channel, mut consumer, tag) = match setup.await {
            Ok(parts) => parts,
            Err(err) => {
                tracing::warn!(queue, error = %err, "cannot consume; reconnecting");
                ctx.broker.invalidate(session.generation).await;
                if ctx.shutdown.sleep_or_stop(Duration::from_millis(500)).await {
                    break;
                }
                continue;
            }
        };
        tracing::info!(queue, prefetch, "consuming");
        loop {
            tokio::select! {
                _ = ctx.shutdown.wait() => {
                    let _ = channel.basic_cancel(tag.clone().into(), BasicCancelOptions::default()).await;
                    drain(&mut in_flight, &ctx, &queue).await;
                    let _ = channel.close(200, "shutdown".into()).await;
                    return;
                }
                Some(_) = in_flight.join_next(), if !in_flight.is_empty() => {}
                next = consumer.next() => match next {
                    Some(Ok(delivery)) => {
                        in_flight.spawn(handle(ctx.clone(), delivery));
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
        ctx.broker.invalidate(session.generation).await;
    }
    drain(&mut in_flight, &ctx, &queue).await;
}

/// Gives in-flight handlers the shutdown grace period, then abandons them (their
/// deliveries are requeued by the broker when the channel closes).
async fn drain(in_flight: &mut JoinSet<()>, ctx: &Context, queue: &str) {
    let grace = Duration::from_secs(ctx.settings.worker.shutdown_grace_seconds);
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
