//! Handling one job request: validate, create or adopt its Job, confirm `submitted`, ack.
//! A request is acked only after its Job exists and its event is confirmed; refused
//! requests are dead-lettered with the reason (and a `failed` event when the id is readable).

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use lapin::{
    message::Delivery,
    options::{BasicAckOptions, BasicNackOptions},
};

use crate::{
    context::{Context, EventSubject},
    domain::{event::JobState, request},
    error::Error,
    k8s::{jobs, spec},
    observe::{JobAction, Observation},
};

/// How long transient failures (apiserver or broker down) are retried before the
/// delivery is returned to the queue.
const TRANSIENT_RETRY: Duration = Duration::from_secs(30);

/// Handles one delivery from the request queue.
pub async fn handle_request(ctx: Arc<Context>, delivery: Delivery) {
    let received = Instant::now();
    let queue = ctx.settings.amqp.request_queue.clone();
    let mut delay = Duration::from_millis(200);
    loop {
        match accept(&ctx, &delivery.data, received).await {
            Ok(()) => {
                let _ = delivery.ack(BasicAckOptions::default()).await;
                return;
            }
            Err(Error::Invalid(err)) => {
                refuse(&ctx, &delivery, &queue, err.kind(), &err.to_string()).await;
                return;
            }
            Err(err @ Error::DeletionTimeout { .. }) => {
                refuse(&ctx, &delivery, &queue, err.metric_label(), &err.to_string()).await;
                return;
            }
            Err(err) => {
                let job_id = request::readable_job_id(&delivery.data).unwrap_or_default();
                if received.elapsed() > TRANSIENT_RETRY || ctx.shutdown.sleep_or_stop(delay).await {
                    ctx.metrics.observe(Observation::MessageRequeued { queue: &queue, job_id: &job_id, error: &err });
                    let _ = delivery.nack(BasicNackOptions { requeue: true, ..BasicNackOptions::default() }).await;
                    return;
                }
                tracing::debug!(job_id, error = %err, "retrying request");
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Validates, makes sure the Job exists, and confirms the `submitted` (or `cancelled`) event.
async fn accept(ctx: &Context, body: &[u8], received: Instant) -> Result<(), Error> {
    let request = request::parse_request(body, ctx.settings.amqp.max_message_bytes)?;
    let job = spec::build_job(&request, &ctx.settings.kube, &ctx.placement)?;
    let fingerprint = spec::fingerprint(&request);
    let name = job.metadata.name.clone().unwrap_or_default();
    let action = jobs::create_or_adopt(ctx, &job, &fingerprint).await?;
    let to_job = received.elapsed();
    let (state, fingerprint, reason) = match action {
        JobAction::AlreadyCancelled => {
            (JobState::Cancelled, "", "cancelled before the request was processed".to_string())
        }
        JobAction::Created => (JobState::Submitted, fingerprint.as_str(), format!("job {name} created")),
        JobAction::Adopted => (JobState::Submitted, fingerprint.as_str(), format!("existing job {name} adopted")),
        JobAction::Replaced => (JobState::Submitted, fingerprint.as_str(), format!("job {name} replaced")),
    };
    let subject = EventSubject { job_id: &request.job_id, attempt: request.attempt, job_name: &name, fingerprint };
    let mut event = ctx.event(&subject, state, reason);
    ctx.broker.publish_event(&event).await.map(|confirm| {
        event.published_at = jiff::Timestamp::now().to_string();
        ctx.metrics.observe(Observation::EventPublished { event: &event, confirm, since_transition: None });
    })?;
    ctx.metrics.observe(Observation::RequestAccepted { job_id: &request.job_id, job_name: &name, action, to_job });
    Ok(())
}

/// Dead-letters a refused message (with a `failed` event when its job id is readable), then
/// acks it. If the dead-letter publish fails the message is requeued, never dropped.
pub async fn refuse(ctx: &Context, delivery: &Delivery, queue: &str, kind: &str, reason: &str) {
    let job_id = request::readable_job_id(&delivery.data);
    ctx.metrics.observe(Observation::MessageRefused { queue, job_id: job_id.as_deref(), kind, reason });
    if let Some(job_id) = &job_id {
        let attempt = serde_json::from_slice::<serde_json::Value>(&delivery.data)
            .ok()
            .and_then(|v| v.get("attempt")?.as_u64())
            .and_then(|a| u32::try_from(a).ok());
        let name = spec::job_name_for(&ctx.settings.kube, job_id, attempt);
        let subject = EventSubject { job_id, attempt, job_name: &name, fingerprint: "refused" };
        let mut event = ctx.event(&subject, JobState::Failed, format!("request refused: {reason}"));
        if !ctx.publish_until_confirmed(&mut event, None).await {
            let _ = delivery.nack(BasicNackOptions { requeue: true, ..BasicNackOptions::default() }).await;
            return;
        }
    }
    match ctx.broker.dead_letter(&delivery.data, &delivery.properties, queue, kind, reason).await {
        Ok(_) => {
            let _ = delivery.ack(BasicAckOptions::default()).await;
        }
        Err(err) => {
            tracing::warn!(queue, error = %err, "dead-lettering failed; requeueing");
            let _ = delivery.nack(BasicNackOptions { requeue: true, ..BasicNackOptions::default() }).await;
        }
    }
}
