//! Handling one job request: parse, plan (within the policy), create or adopt its Job,
//! confirm `submitted`, ack. A request is acked only after its Job exists and its event is
//! confirmed; refused requests are dead-lettered with the reason (see [`crate::delivery`]).

use std::{sync::Arc, time::Instant};

use lapin::message::Delivery;

use crate::{
    context::Context,
    delivery,
    domain::{
        decision::JobAction,
        event::{JobState, Subject},
        job,
        keys::ANN_REPLACED,
        outcome, request,
    },
    error::Error,
    k8s::{render, view},
    observe::Observation,
};

/// Handles one delivery from the request queue.
pub async fn handle_request(ctx: Arc<Context>, delivery: Delivery) {
    let received = Instant::now();
    let queue = &ctx.settings.amqp.request_queue;
    delivery::handle(&ctx, &delivery, queue, delivery::Source::Request, || accept(&ctx, &delivery.data, received))
        .await;
}

/// Plans the Job, makes sure it exists, and confirms the `submitted` (or `cancelled`) event.
async fn accept(ctx: &Context, body: &[u8], received: Instant) -> Result<(), Error> {
    let request = request::parse_request(body, ctx.settings.amqp.max_message_bytes)?;
    let plan = job::plan_job(&request, &ctx.defaults)?;
    let fingerprint = job::fingerprint(&request);
    let owner = ctx.defaults.naming.owner(&request.job_id, request.attempt);
    let action = ctx.jobs.create_or_adopt(&render::job(&plan, ctx.jobs.namespace()), &owner, &fingerprint).await?;
    let to_job = received.elapsed();
    let interactive = plan.routes().is_some();
    let name = plan.name;
    if action == JobAction::AlreadyFinished {
        return answer_from_record(ctx, &request, &name, received).await;
    }
    if action == JobAction::BeingCancelled {
        let to_job = received.elapsed();
        ctx.metrics.observe(Observation::RequestAccepted { job_id: &request.job_id, job_name: &name, action, to_job });
        return Ok(()); // its cancel is the reporter's to tell, once
    }
    if interactive && action != JobAction::AlreadyCancelled {
        route(ctx, &name).await?;
    }
    let (state, fingerprint, reason) = match action {
        JobAction::AlreadyCancelled => {
            (JobState::Cancelled, "", "cancelled before the request was processed".to_string())
        }
        JobAction::Created => (JobState::Submitted, fingerprint.as_str(), format!("job {name} created")),
        JobAction::Adopted => (JobState::Submitted, fingerprint.as_str(), format!("existing job {name} adopted")),
        JobAction::Replaced => (JobState::Submitted, fingerprint.as_str(), format!("job {name} replaced")),
        JobAction::AlreadyFinished | JobAction::BeingCancelled => unreachable!("answered above"),
    };
    let handler = request.handler.as_deref();
    let subject = Subject { job_id: &request.job_id, attempt: request.attempt, job_name: &name, fingerprint, handler };
    let mut event = ctx.reporter.event(&subject, state, reason);
    let confirm = ctx.broker.publish_event(&mut event).await?;
    ctx.metrics.observe(Observation::EventPublished { event: &event, confirm, since_transition: None });
    ctx.metrics.observe(Observation::RequestAccepted { job_id: &request.job_id, job_name: &name, action, to_job });
    Ok(())
}

/// Makes the Service and Ingress of an interactive Job (again, for one adopted after a crash).
/// When the apiserver refuses them the Job goes too (marked replaced: it never reports) and
/// the request is refused with the reason.
async fn route(ctx: &Context, name: &str) -> Result<(), Error> {
    let Some(job) = ctx.jobs.get_full(name).await? else {
        return Err(Error::JobConflict(name.to_string())); // gone meanwhile: try again
    };
    match ctx.routes.ensure(&job).await {
        Err(refused @ Error::Invalid(_)) => {
            let uid = job.metadata.uid.as_deref().unwrap_or_default();
            ctx.jobs.mark_and_delete(name, uid, ANN_REPLACED, &refused.to_string()).await?;
            Err(refused)
        }
        other => other,
    }
}

/// A request that already ran to its end: its recorded terminal event again (the same event
/// id), and nothing runs.
async fn answer_from_record(
    ctx: &Context,
    request: &request::JobRequest,
    name: &str,
    received: Instant,
) -> Result<(), Error> {
    let Some(job) = ctx.jobs.get(name).await? else {
        return Err(Error::JobConflict(name.to_string())); // the record just expired: try again
    };
    let meta = view::job_meta(&job.metadata);
    let outcome = outcome::status(&meta, &view::job_view(&job), &[], jiff::Timestamp::now(), &ctx.limits);
    let subject = Subject {
        job_id: &request.job_id,
        attempt: request.attempt,
        job_name: name,
        fingerprint: &meta.fingerprint,
        handler: request.handler.as_deref(),
    };
    let mut event = ctx.reporter.event(&subject, outcome.state, outcome.reason);
    event.exit_code = outcome.exit_code;
    let confirm = ctx.broker.publish_event(&mut event).await?;
    ctx.metrics.observe(Observation::EventPublished { event: &event, confirm, since_transition: None });
    let action = JobAction::AlreadyFinished;
    ctx.metrics.observe(Observation::RequestAccepted {
        job_id: &request.job_id,
        job_name: name,
        action,
        to_job: received.elapsed(),
    });
    Ok(())
}
