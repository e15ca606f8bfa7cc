//! Handling cancel and status messages. A cancel stops the Job (its pods are deleted at once,
//! the Job itself later by the reporting replica) and reports `cancelled`; a cancel for a
//! request not seen yet leaves a tombstone Job (no pods) so the request, when it comes, is
//! reported cancelled instead of started. A status request republishes the job's state. A
//! resubmission intent (published by the reporter for a preempted job) is carried out here.

use std::sync::Arc;

use lapin::message::Delivery;

use crate::{
    context::Context,
    delivery,
    domain::{
        event::{JobEvent, JobState, Subject},
        job::plan_tombstone,
        outcome,
        request::{self, ControlAction, ControlMessage, JobControl, JobResubmit},
        ValidationError,
    },
    error::Error,
    k8s::{render, view},
    observe::Observation,
};

/// Handles one delivery from the control queue.
pub async fn handle_control(ctx: Arc<Context>, delivery: Delivery) {
    let queue = &ctx.settings.amqp.control_queue;
    delivery::handle(&ctx, &delivery, queue, || handle(&ctx, &delivery.data)).await;
}

async fn handle(ctx: &Context, body: &[u8]) -> Result<(), Error> {
    match request::parse_control_message(body, ctx.settings.amqp.max_message_bytes)? {
        ControlMessage::Control(control) if control.action == ControlAction::Cancel => cancel(ctx, control).await,
        ControlMessage::Control(control) => status(ctx, control).await,
        ControlMessage::Resubmit(intent) => resubmit(ctx, intent).await,
    }
}

/// Carries out a worker's resubmission intent (idempotent: it is acked only once the new Job
/// exists, so a crash anywhere before leaves the intent in the queue).
async fn resubmit(ctx: &Context, intent: JobResubmit) -> Result<(), Error> {
    let job: k8s_openapi::api::batch::v1::Job = serde_json::from_value(intent.job)
        .map_err(|e| ValidationError::invalid("job", format!("the resubmitted Job does not decode: {e}")))?;
    ctx.jobs.resubmit(&intent.job_name, &intent.replaces_uid, &job).await
}

/// One attempt: a failure goes back to the delivery's own retry.
async fn publish(ctx: &Context, mut event: JobEvent) -> Result<(), Error> {
    let confirm = ctx.broker.publish_event(&mut event).await?;
    ctx.metrics.observe(Observation::EventPublished { event: &event, confirm, since_transition: None });
    Ok(())
}

/// Republishes a job's current state; its event id is the one that state had, so a
/// consumer that already saw it can drop it. A Job of that name that is not this job's is
/// none of its business: the job is reported `lost`.
async fn status(ctx: &Context, control: JobControl) -> Result<(), Error> {
    let name = ctx.defaults.naming.job_name(&control.job_id, control.attempt);
    let owner = ctx.defaults.naming.owner(&control.job_id, control.attempt);
    let lost = |reason: String| (outcome::Outcome::new(JobState::Lost, reason, None), String::new());
    let (outcome, fingerprint) = match ctx.jobs.get(&name).await? {
        None => lost(format!("no Kubernetes Job named {name} exists (finished and cleaned up, or never created)")),
        Some(job) => match view::check_owner(&owner, &job.metadata) {
            Err(foreign) => lost(format!("no Kubernetes Job of this job exists ({foreign})")),
            Ok(()) => {
                let meta = view::job_meta(&job.metadata);
                let pods = ctx.jobs.current_pods(&name, &meta.uid).await?;
                let now = jiff::Timestamp::now();
                (outcome::status(&meta, &view::job_view(&job), &pods, now, &ctx.limits), meta.fingerprint)
            }
        },
    };
    let subject =
        Subject { job_id: &control.job_id, attempt: control.attempt, job_name: &name, fingerprint: &fingerprint };
    let mut event = ctx.reporter.event(&subject, outcome.state, format!("status: {}", outcome.reason));
    event.exit_code = outcome.exit_code;
    publish(ctx, event).await
}

/// Stops the job's Job (or leaves a tombstone for a request not seen yet) and reports
/// `cancelled`. A Job of that name that is not this job's is left alone; the job is still
/// reported `cancelled` (its request, if it comes, is refused: the name is taken).
async fn cancel(ctx: &Context, control: JobControl) -> Result<(), Error> {
    let reason = control.reason.clone().unwrap_or_else(|| "cancelled on request".into());
    let name = ctx.defaults.naming.job_name(&control.job_id, control.attempt);
    let owner = ctx.defaults.naming.owner(&control.job_id, control.attempt);
    let existing = match ctx.jobs.get(&name).await? {
        Some(job) => Some(job),
        None => {
            let plan = plan_tombstone(&ctx.defaults, &control.job_id, control.attempt, &reason);
            ctx.jobs.create_tombstone(&render::job(&plan, ctx.jobs.namespace())).await?
        }
    };
    let existing = existing.filter(|job| match view::check_owner(&owner, &job.metadata) {
        Ok(()) => true,
        Err(foreign) => {
            tracing::warn!(job_id = control.job_id, %foreign, "cancel leaves a Job that is not this job's alone");
            false
        }
    });
    let mut fingerprint = String::new();
    if let Some(job) = existing {
        let meta = view::job_meta(&job.metadata);
        let now = jiff::Timestamp::now();
        let finished = outcome::status(&meta, &view::job_view(&job), &[], now, &ctx.limits).state.is_terminal();
        if finished && meta.cancelled.is_none() {
            tracing::info!(job_id = control.job_id, job_name = name, "cancel ignored: the job already finished");
            return Ok(());
        }
        if meta.cancelled.is_none() {
            ctx.jobs.mark_cancelled(&name, &meta.uid, &reason).await?;
        }
        fingerprint = meta.fingerprint;
    }
    let subject =
        Subject { job_id: &control.job_id, attempt: control.attempt, job_name: &name, fingerprint: &fingerprint };
    publish(ctx, ctx.reporter.event(&subject, JobState::Cancelled, reason)).await
}
