//! Handling cancel and status messages, and the worker's own resubmission intents. A cancel
//! marks the Job (its pods are deleted at once; the reporter publishes `cancelled` and
//! deletes the Job later); a cancel for a request not seen yet leaves a tombstone Job (no
//! pods) so the request, when it comes, is reported cancelled instead of started. A status
//! request republishes the job's state, or `unknown` when there is no Job of it. A
//! resubmission intent is judged by the domain ([`intent::judge`]) and carried out from the
//! Job it replaces, never from anything the message says.

use std::sync::Arc;

use lapin::message::Delivery;

use crate::{
    context::Context,
    delivery::{self, Source},
    domain::{
        event::{JobEvent, JobState, Subject},
        intent::{self, JobResubmit, Verdict},
        outcome::{self, JobMeta},
        record::{plan_record, plan_tombstone, Record},
        request::{self, ControlAction, ControlMessage, JobControl},
        ValidationError,
    },
    error::Error,
    k8s::{render, view},
    observe::Observation,
};

/// Handles one delivery from the control queue.
pub async fn handle_control(ctx: Arc<Context>, delivery: Delivery) {
    let queue = &ctx.settings.amqp.control_queue;
    delivery::handle(&ctx, &delivery, queue, Source::Control, || handle(&ctx, &delivery.data)).await;
}

async fn handle(ctx: &Context, body: &[u8]) -> Result<(), Error> {
    match request::parse_control_message(body, ctx.settings.amqp.max_message_bytes)? {
        ControlMessage::Control(control) if control.action == ControlAction::Cancel => cancel(ctx, control).await,
        ControlMessage::Control(control) => status(ctx, control).await,
        ControlMessage::Resubmit(intent) => resubmit(ctx, intent).await,
    }
}

/// Carries out a resubmission intent, whatever part of it was done before a crash: the Job
/// it replaces is checked (this job's, marked by the reporter for this resubmission), then
/// retired and its next generation created from it; the intent is acked only once that
/// exists. When the Job it replaces went and no next one was made (a worker stopped in
/// between), the job's outcome is `preempted`, recorded — if the intent carries the workers'
/// seal. Anything else is refused, and nothing is created.
async fn resubmit(ctx: &Context, intent: JobResubmit) -> Result<(), Error> {
    let naming = &ctx.defaults.naming;
    let expected = naming.job_name(&intent.job_id, intent.attempt);
    let kept = match intent.job_name == expected {
        true => ctx.jobs.get_full(&expected).await?,
        false => None,
    };
    let owner = naming.owner(&intent.job_id, intent.attempt);
    let found = kept.as_ref().map(|job| view::intent_found(&owner, &job.metadata));
    let sealed = match ctx.leadership.sealing_key() {
        Some(key) => intent.is_sealed_by(&key),
        None if found.is_none() => return Err(Error::NoSealingKey),
        None => false,
    };
    let allowed = ctx.rules.resubmit_preempted_after.map(|_| ctx.rules.max_resubmissions);
    match (intent::judge(&intent, &expected, found.as_ref(), allowed, sealed), kept) {
        // An interactive Job's Service and Ingress went with the Job they named: made again
        // for the new one (and for one made before a crash cut this short).
        (Verdict::Resubmit, Some(kept)) => match ctx.jobs.resubmit(&kept).await? {
            Some(next) => ctx.routes.ensure(&next).await,
            None => Ok(()),
        },
        (Verdict::Done, Some(next)) if found.as_ref().is_some_and(|f| !f.ended && f.uid != intent.replaces_uid) => {
            ctx.routes.ensure(&next).await
        }
        (Verdict::Done, _) => Ok(()),
        (Verdict::Interrupted, _) => interrupted(ctx, &intent).await,
        (Verdict::Refuse(why), _) => Err(ValidationError::invalid("intent", why).into()),
        (Verdict::Resubmit, None) => Err(ValidationError::invalid("intent", "no Job to resubmit").into()),
    }
}

/// The Job a sealed intent replaces is gone and its next generation was never made: the job
/// was preempted, and that is its outcome — recorded under its name (which settles a race
/// with a late creation of the next generation: whichever comes first has the name), then
/// published.
async fn interrupted(ctx: &Context, intent: &JobResubmit) -> Result<(), Error> {
    let reason = format!(
        "the job was preempted, and its resubmission {} was interrupted before its new Job was made \
         (a worker stopped between retiring the old Job and creating the new one)",
        intent.resubmission
    );
    let meta = JobMeta {
        name: intent.job_name.clone(),
        job_id: intent.job_id.clone(),
        attempt: intent.attempt,
        fingerprint: intent.fingerprint.clone(),
        handler: intent.handler.clone(),
        resubmissions: intent.resubmission - 1,
        ..JobMeta::default()
    };
    if let Some(keep_for) = ctx.rules.record_for {
        let record = Record::kept(JobState::Preempted, None, &reason, keep_for, jiff::Timestamp::now());
        let plan = plan_record(&ctx.defaults, &meta, &record);
        if let Some(taken) = ctx.jobs.create_unless_taken(&render::job(&plan, ctx.jobs.namespace())).await? {
            let taken = view::job_meta(&taken.metadata);
            let ours = taken.reported == Some(JobState::Preempted) && taken.fingerprint == intent.fingerprint;
            if !ours {
                return Ok(()); // the next generation was made after all
            }
            // Our record from an earlier try that stopped before its event: publish it again.
        }
    }
    let subject = Subject {
        job_id: &intent.job_id,
        attempt: intent.attempt,
        job_name: &intent.job_name,
        fingerprint: &intent.fingerprint,
        handler: intent.handler.as_deref(),
    };
    publish(ctx, ctx.reporter.event(&subject, JobState::Preempted, reason)).await
}

/// One attempt: a failure goes back to the delivery's own retry.
async fn publish(ctx: &Context, mut event: JobEvent) -> Result<(), Error> {
    let confirm = ctx.broker.publish_event(&mut event).await?;
    ctx.metrics.observe(Observation::EventPublished { event: &event, confirm, since_transition: None });
    Ok(())
}

/// Republishes a job's current state; its event id is the one that state had, so a
/// consumer that already saw it can drop it. When no Job of the job exists — its request may
/// still wait in the queue — the answer is `unknown`, not a verdict: the caller may send
/// its (idempotent) request again.
async fn status(ctx: &Context, control: JobControl) -> Result<(), Error> {
    let name = ctx.defaults.naming.job_name(&control.job_id, control.attempt);
    let owner = ctx.defaults.naming.owner(&control.job_id, control.attempt);
    let unknown = |reason: String| (outcome::Outcome::new(JobState::Unknown, reason, None), String::new());
    let (outcome, fingerprint) = match ctx.jobs.get(&name).await? {
        None => unknown(format!(
            "no Kubernetes Job named {name} exists: its request was not processed yet (it may still wait in \
             the queue), or the job finished and its record expired"
        )),
        Some(job) => match view::check_owner(&owner, &job.metadata) {
            Err(foreign) => unknown(format!("no Kubernetes Job of this job exists ({foreign})")),
            Ok(()) => {
                let meta = view::job_meta(&job.metadata);
                let pods = ctx.jobs.current_pods(&name, &meta.uid).await?;
                let now = jiff::Timestamp::now();
                (outcome::status(&meta, &view::job_view(&job), &pods, now, &ctx.limits), meta.fingerprint)
            }
        },
    };
    let subject = Subject {
        job_id: &control.job_id,
        attempt: control.attempt,
        job_name: &name,
        fingerprint: &fingerprint,
        handler: control.handler.as_deref(),
    };
    let mut event = ctx.reporter.event(&subject, outcome.state, format!("status: {}", outcome.reason));
    event.exit_code = outcome.exit_code;
    publish(ctx, event).await
}

/// Marks the job's Job cancelled — conditional on it being as read, so a cancel never passes
/// an outcome the reporter claimed — and leaves the `cancelled` event to the reporter, which
/// publishes it once. A request not seen yet gets a tombstone, and the cancel's event here.
/// A Job of that name that is not this job's is left alone; the job is still reported
/// `cancelled` (its request, if it comes, is refused: the name is taken).
async fn cancel(ctx: &Context, control: JobControl) -> Result<(), Error> {
    let reason = control.reason.clone().unwrap_or_else(|| "cancelled on request".into());
    let name = ctx.defaults.naming.job_name(&control.job_id, control.attempt);
    let owner = ctx.defaults.naming.owner(&control.job_id, control.attempt);
    let handler = control.handler.as_deref();
    let subject =
        Subject { job_id: &control.job_id, attempt: control.attempt, job_name: &name, fingerprint: "", handler };
    let existing = match ctx.jobs.get(&name).await? {
        Some(job) => job,
        None => {
            let plan =
                plan_tombstone(&ctx.defaults, &control.job_id, control.attempt, control.handler.as_deref(), &reason);
            match ctx.jobs.create_unless_taken(&render::job(&plan, ctx.jobs.namespace())).await? {
                None => return publish(ctx, ctx.reporter.event(&subject, JobState::Cancelled, reason)).await,
                Some(job) => job, // its request came meanwhile
            }
        }
    };
    if let Err(foreign) = view::check_owner(&owner, &existing.metadata) {
        tracing::warn!(job_id = control.job_id, %foreign, "cancel leaves a Job that is not this job's alone");
        return publish(ctx, ctx.reporter.event(&subject, JobState::Cancelled, reason)).await;
    }
    let meta = view::job_meta(&existing.metadata);
    if meta.fingerprint.is_empty() {
        // Our tombstone (this cancel delivered again): its event once more, the same id.
        return publish(ctx, ctx.reporter.event(&subject, JobState::Cancelled, reason)).await;
    }
    if meta.cancelled.is_some() {
        return Ok(()); // marked already: the reporter publishes its event
    }
    let now = jiff::Timestamp::now();
    let ended = outcome::status(&meta, &view::job_view(&existing), &[], now, &ctx.limits).state.is_terminal();
    if ended || meta.deleting {
        tracing::info!(job_id = control.job_id, job_name = name, "cancel ignored: the job already ended");
        return Ok(());
    }
    ctx.jobs.mark_cancelled(&name, &meta.uid, &meta.resource_version, &reason).await
}
