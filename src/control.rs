//! Handling cancel/control messages. A cancel stops the Job (its pods are deleted at once,
//! the Job itself by the reporting replica) and reports `cancelled`; a cancel for a request not seen yet leaves a tombstone Job (no pods) so the
//! request, when it comes, is reported cancelled instead of started.

use std::{sync::Arc, time::Duration};

use lapin::{
    message::Delivery,
    options::{BasicAckOptions, BasicNackOptions},
};

use crate::{
    context::{Context, EventSubject},
    domain::{
        event::JobState,
        outcome,
        request::{self, ControlAction, JobControl},
    },
    error::Error,
    k8s::{jobs, spec, view},
    submit::refuse,
};

/// Handles one delivery from the control queue.
pub async fn handle_control(ctx: Arc<Context>, delivery: Delivery) {
    let queue = ctx.settings.amqp.control_queue.clone();
    let mut delay = Duration::from_millis(200);
    loop {
        match handle(&ctx, &delivery.data).await {
            Ok(()) => {
                let _ = delivery.ack(BasicAckOptions::default()).await;
                return;
            }
            Err(Error::Invalid(err)) => return refuse(&ctx, &delivery, &queue, err.kind(), &err.to_string()).await,
            Err(err) => {
                tracing::warn!(error = %err, "cancel failed; retrying");
                if ctx.shutdown.sleep_or_stop(delay).await {
                    let _ = delivery.nack(BasicNackOptions { requeue: true, ..BasicNackOptions::default() }).await;
                    return;
                }
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

async fn handle(ctx: &Context, body: &[u8]) -> Result<(), Error> {
    let control = request::parse_control(body, ctx.settings.amqp.max_message_bytes)?;
    match control.action {
        ControlAction::Cancel => cancel(ctx, control).await,
        ControlAction::Status => status(ctx, control).await,
    }
}

/// Republishes a job's current state; its event id is the one that state had, so a
/// consumer that already saw it can drop it.
async fn status(ctx: &Context, control: JobControl) -> Result<(), Error> {
    let name = spec::job_name_for(&ctx.settings.kube, &control.job_id, control.attempt);
    let (state, fingerprint, reason, exit_code) =
        match ctx.watched_jobs.get_opt(&name).await.map_err(Error::kube("get"))? {
            None => (
                JobState::Lost,
                String::new(),
                format!("no Kubernetes Job named {name} exists (finished and cleaned up, or never created)"),
                None,
            ),
            Some(job) => {
                let meta = view::job_meta(&job.metadata);
                let uid = meta.uid.clone();
                let pods = jobs::current_pods(ctx, &name, &uid).await?;
                let outcome =
                    outcome::classify(&view::job_view(&job), &pods, jiff::Timestamp::now(), &ctx.settings.limits());
                match (&meta.cancelled, meta.reported) {
                    (Some(why), _) => (JobState::Cancelled, meta.fingerprint, why.clone(), None),
                    (None, Some(reported)) => (reported, meta.fingerprint, outcome.reason, outcome.exit_code),
                    (None, None) => (outcome.state, meta.fingerprint, outcome.reason, outcome.exit_code),
                }
            }
        };
    let subject =
        EventSubject { job_id: &control.job_id, attempt: control.attempt, job_name: &name, fingerprint: &fingerprint };
    let mut event = ctx.event(&subject, state, format!("status: {reason}"));
    event.exit_code = exit_code;
    if ctx.publish_until_confirmed(&mut event, None).await {
        Ok(())
    } else {
        Err(Error::NotConnected)
    }
}

async fn cancel(ctx: &Context, control: JobControl) -> Result<(), Error> {
    let reason = control.reason.clone().unwrap_or_else(|| "cancelled on request".into());
    let name = spec::job_name_for(&ctx.settings.kube, &control.job_id, control.attempt);
    let existing = match ctx.watched_jobs.get_opt(&name).await.map_err(Error::kube("get"))? {
        Some(job) => Some(job),
        None => {
            let tombstone = spec::cancel_tombstone(&ctx.settings.kube, &control.job_id, control.attempt, &reason);
            jobs::create_tombstone(ctx, &tombstone).await?
        }
    };
    let mut fingerprint = String::new();
    if let Some(job) = existing {
        let meta = view::job_meta(&job.metadata);
        let finished = outcome::classify(&view::job_view(&job), &[], jiff::Timestamp::now(), &ctx.settings.limits())
            .state
            .is_terminal()
            || meta.reported.is_some();
        if finished && meta.cancelled.is_none() {
            tracing::info!(job_id = control.job_id, job_name = name, "cancel ignored: the job already finished");
            return Ok(());
        }
        if meta.cancelled.is_none() {
            jobs::mark_cancelled(ctx, &name, &meta.uid, &reason).await?;
        }
        fingerprint = meta.fingerprint;
    }
    let subject =
        EventSubject { job_id: &control.job_id, attempt: control.attempt, job_name: &name, fingerprint: &fingerprint };
    let mut event = ctx.event(&subject, JobState::Cancelled, reason);
    if ctx.publish_until_confirmed(&mut event, None).await {
        Ok(())
    } else {
        Err(Error::NotConnected)
    }
}
