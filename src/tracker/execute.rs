//! Carries out the reports of one shard, in order: the domain decides what follows an
//! outcome ([`decision::plan`]); this stops, resubmits, claims, publishes and cleans up
//! accordingly, cleaning up only after the broker confirmed the event.

use std::{sync::Arc, time::Duration};

use tokio::sync::mpsc;

use super::state::Report;
use crate::{
    amqp::publisher::Outgoing,
    context::Context,
    domain::{
        decision::{self, Cleanup},
        event::Subject,
        intent::JobResubmit,
        outcome::classify,
        record::{plan_record, Record},
    },
    k8s::{jobs::Claim, render},
    observe::Observation,
    retry::{self, Budget},
};

/// Records a failed Kubernetes call about one Job: a log line and a metric.
fn kube_error(ctx: &Context, verb: &str, report: &Report, err: &impl std::fmt::Display) {
    let error = err.to_string();
    let (job_id, job_name) = (report.meta.job_id.as_str(), report.meta.name.as_str());
    ctx.metrics.observe(Observation::KubeError { verb, job_id, job_name, error: &error });
}

/// Re-classifies a terminal report with the pods as they are now.
async fn refresh(ctx: &Context, report: &mut Report) {
    match ctx.jobs.current_pods(&report.meta.name, &report.meta.uid).await {
        Ok(mut pods) if !pods.is_empty() => {
            pods.sort_by(|a, b| a.created.cmp(&b.created));
            let outcome = classify(&report.view, &pods, jiff::Timestamp::now(), &ctx.limits);
            if outcome.state.is_terminal() {
                report.outcome = outcome;
            }
            report.pods = pods.into_iter().map(|p| p.name).collect();
        }
        Ok(_) => {}
        Err(err) => kube_error(ctx, "list", report, &err),
    }
}

/// After `delay` (unless shutdown comes first), runs `work` on the Job of `report`, again
/// and again while the apiserver is away.
fn later<F, Fut>(ctx: &Arc<Context>, report: &Report, delay: Duration, verb: &'static str, work: F)
where
    F: Fn(Arc<Context>, Report) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = crate::error::Result<()>> + Send,
{
    let (ctx, report) = (ctx.clone(), report.clone());
    tokio::spawn(async move {
        // A reporter that stops meanwhile leaves it to the next one, which re-evaluates every Job.
        if ctx.shutdown.sleep_or_stop(delay).await {
            return;
        }
        let failed = |err: &crate::error::Error, _| kube_error(&ctx, verb, &report, err);
        let op = || work(ctx.clone(), report.clone());
        if let Some(Err(err)) =
            retry::retry(&ctx.shutdown, Budget::UntilShutdown, |e| !e.is_refusal(), failed, op).await
        {
            kube_error(&ctx, verb, &report, &err);
        }
    });
}

/// The record of a report's outcome, kept `record_for` from now.
fn outcome_record<'a>(ctx: &Context, report: &'a Report) -> Option<Record<'a>> {
    let reason = report.meta.cancelled.as_deref().unwrap_or(&report.outcome.reason);
    let (state, exit_code) = (report.outcome.state, report.outcome.exit_code);
    Some(Record::kept(state, exit_code, reason, ctx.rules.record_for?, jiff::Timestamp::now()))
}

/// Turns the Job of a report into a record of its outcome; when it is gone meanwhile (its
/// TTL, someone else), creates one under its name.
/// Returns whether its own Job became the record (its pods are to be deleted).
async fn record(ctx: &Context, report: &Report) -> crate::error::Result<bool> {
    match outcome_record(ctx, report) {
        Some(record) => {
            let kept = ctx.jobs.record(&report.meta.name, &report.meta.uid, &record, &report.view).await?;
            tracing::debug!(job_name = report.meta.name, kept, "record");
            if !kept {
                create_record(ctx, report).await?;
            }
            Ok(kept)
        }
        None => ctx.jobs.delete(&report.meta.name, Some(&report.meta.uid)).await.map(|()| false),
    }
}

/// Turns the Job of a report into a record, and deletes its pods a grace later.
async fn record_then_delete_pods(ctx: &Arc<Context>, report: &Report) -> crate::error::Result<()> {
    if record(ctx, report).await? {
        later(ctx, report, ctx.rules.pods_grace, "delete", |ctx, r| async move {
            ctx.jobs.delete_pods(&r.meta.name, &r.meta.uid).await
        });
    }
    Ok(())
}

/// Creates a record for the vanished Job of a report.
async fn create_record(ctx: &Context, report: &Report) -> crate::error::Result<()> {
    let Some(record) = outcome_record(ctx, report) else { return Ok(()) };
    let plan = plan_record(&ctx.defaults, &report.meta, &record);
    let taken = ctx.jobs.create_unless_taken(&render::job(&plan, ctx.jobs.namespace())).await?;
    tracing::debug!(job_name = report.meta.name, taken = ?taken.map(|j| j.metadata.uid), "record created");
    Ok(())
}

/// Marks the preempted Job due for its next resubmission and publishes the sealed intent to
/// carry it out; the control handler rebuilds the new Job from the marked one. Until the
/// broker confirms the intent, the stopped Job itself says what is owed (a reporter that
/// takes over plans its resubmission again).
async fn intend_resubmission(ctx: &Context, report: &Report) -> crate::error::Result<()> {
    let meta = &report.meta;
    let resubmission = meta.resubmissions + 1;
    if !ctx.jobs.mark_resubmit_due(&meta.name, &meta.uid, resubmission).await? {
        return Ok(()); // gone or replaced meanwhile
    }
    let Some(key) = ctx.leadership.sealing_key() else { return Err(crate::error::Error::NoSealingKey) };
    let intent = JobResubmit::sealed(&key, meta, resubmission);
    let body = serde_json::to_vec(&intent)?;
    let queue = &ctx.settings.amqp.control_queue;
    let failed = |err: &crate::error::Error, _| tracing::warn!(job_name = %meta.name, error = %err, "publishing a resubmission failed");
    let publish = || ctx.broker.publish(Outgoing::to_queue(queue, &body));
    match retry::retry(&ctx.shutdown, Budget::UntilShutdown, |_| ctx.leadership.is_leader(), failed, publish).await {
        Some(result) => result.map(drop),
        None => Ok(()),
    }
}

/// Whether a report owed only "unless recorded" is owed after all: nothing has the Job's name
/// any more. (Its own Job there is that Job become a record; another is a record made of its
/// outcome, a replacement, or a Job of the same request that reports for itself, with the
/// same event ids.)
async fn still_owed(ctx: &Context, report: &Report) -> bool {
    match ctx.jobs.get(&report.meta.name).await {
        Ok(found) => found.is_none(),
        Err(err) => {
            kube_error(ctx, "get", report, &err);
            true // when in doubt, report (the same event id)
        }
    }
}

/// Publishes reports in order and carries out what follows each. A report it cannot carry
/// out (this replica is not the reporter at that moment, the Job changed under its claim, or
/// the broker does not confirm within the retry window) goes back to the tracker through
/// `dropped`, to be due again.
pub(super) async fn run(
    ctx: Arc<Context>,
    mut reports: mpsc::UnboundedReceiver<Report>,
    dropped: mpsc::UnboundedSender<Report>,
) {
    while let Some(mut report) = reports.recv().await {
        if !ctx.leadership.is_leader() {
            let _ = dropped.send(report);
            continue;
        }
        if report.unless_recorded && !still_owed(&ctx, &report).await {
            continue;
        }
        if decision::wants_fresh_pods(report.outcome.state, report.pods.len()) {
            refresh(&ctx, &mut report).await;
        }
        let presence = decision::Presence::of(report.exists, &report.meta);
        let mut plan = decision::plan(&report.outcome, presence, report.meta.resubmissions, &ctx.rules);
        if let Some(delay) = plan.resubmit_after {
            if plan.stop {
                if let Err(err) = ctx.jobs.stop(&report.meta.name, &report.meta.uid).await {
                    kube_error(&ctx, "patch", &report, &err);
                }
            }
            // Not the tool's fault: it runs again later instead of being reported.
            later(&ctx, &report, delay, "create", |ctx, r| async move { intend_resubmission(&ctx, &r).await });
            continue;
        }
        if plan.claim {
            let (meta, state) = (&report.meta, report.outcome.state);
            match ctx.jobs.claim(&meta.name, &meta.uid, &meta.resource_version, state, plan.stop).await {
                Ok(Claim::Claimed) => {}
                // Someone deleted it meanwhile: its outcome is told all the same, and recorded.
                Ok(Claim::Gone) => {
                    let gone = decision::Presence::Gone;
                    plan = decision::plan(&report.outcome, gone, meta.resubmissions, &ctx.rules);
                    report.exists = false;
                }
                // A cancel (or a replacement) came first: the tracker classifies it again.
                Ok(Claim::Changed) => {
                    let _ = dropped.send(report);
                    continue;
                }
                Err(err) => {
                    kube_error(&ctx, "patch", &report, &err);
                    let _ = dropped.send(report);
                    continue;
                }
            }
        } else if plan.stop {
            if let Err(err) = ctx.jobs.stop(&report.meta.name, &report.meta.uid).await {
                kube_error(&ctx, "patch", &report, &err);
            }
        }
        let (meta, state) = (&report.meta, report.outcome.state);
        if !report.exists && state == crate::domain::event::JobState::Lost {
            // Deleted while it ran: its pods go before `lost` is told, not some time after.
            if let Err(err) = ctx.jobs.delete_pods(&meta.name, &meta.uid).await {
                kube_error(&ctx, "delete", &report, &err);
            }
        }
        if plan.publish {
            let subject = Subject {
                job_id: &meta.job_id,
                attempt: meta.attempt,
                job_name: &meta.name,
                fingerprint: &meta.fingerprint,
                handler: meta.handler.as_deref(),
            };
            let mut event =
                ctx.reporter.event(&subject, state, decision::reason(&report.outcome.reason, meta.resubmissions));
            event.exit_code = report.outcome.exit_code;
            event.pods = report.pods.clone();
            event.occurred_at = report.occurred_at.clone();
            if let (true, Some(last)) = (state.is_terminal(), report.pods.last()) {
                event.log_tail = ctx.jobs.log_tail(last, ctx.settings.worker.log_tail_bytes).await;
            }
            let since = report.occurred_at.as_deref().and_then(|t| t.parse::<jiff::Timestamp>().ok());
            // A reporter that loses its Lease stops publishing what it had started.
            let budget = Budget::Within(ctx.settings.amqp.retry_window());
            let reporter = || ctx.leadership.is_leader();
            if !ctx
                .broker
                .publish_event_confirmed(&mut event, since, &ctx.metrics, &ctx.shutdown, budget, reporter)
                .await
            {
                if !ctx.shutdown.is_triggered() {
                    let _ = dropped.send(report); // not given up: due again later
                }
                continue; // shutting down: a restarted worker reports it again
            }
        }
        if state.is_terminal() && meta.routed {
            // An interactive tool's entry points close with it (its Job may stay a while).
            if let Err(err) = ctx.routes.remove(&meta.name, &meta.uid).await {
                kube_error(&ctx, "delete", &report, &err);
                later(&ctx, &report, Duration::ZERO, "delete", |ctx, r| async move {
                    ctx.routes.remove(&r.meta.name, &r.meta.uid).await
                });
            }
        }
        match plan.cleanup {
            Cleanup::Keep => {}
            now => {
                if let Err(err) = clean_up(&ctx, &report, now).await {
                    kube_error(&ctx, "cleanup", &report, &err);
                    if !err.is_refusal() {
                        // Until it is done the Job says nothing of its report, and every
                        // reporter that took over would publish it again.
                        later(&ctx, &report, Duration::ZERO, "cleanup", move |ctx, r| async move {
                            clean_up(&ctx, &r, now).await
                        });
                    }
                }
            }
        }
    }
}

/// Carries out a cleanup: what follows at once, and schedules what follows later.
async fn clean_up(ctx: &Arc<Context>, report: &Report, cleanup: Cleanup) -> crate::error::Result<()> {
    let (meta, state) = (&report.meta, report.outcome.state);
    tracing::debug!(job_id = meta.job_id, job_name = meta.name, ?cleanup, exists = report.exists, "cleanup");
    let delete_later =
        |delay| {
            later(ctx, report, delay, "delete", |ctx, r| async move {
                ctx.jobs.delete(&r.meta.name, Some(&r.meta.uid)).await
            })
        };
    match cleanup {
        Cleanup::Delete => ctx.jobs.retire(&meta.name, &meta.uid, state).await,
        Cleanup::MarkThenDeleteAfter(delay) => {
            let ttl = i32::try_from(delay.as_secs()).unwrap_or(i32::MAX);
            ctx.jobs.mark_reported(&meta.name, &meta.uid, state, Some(ttl)).await?;
            delete_later(delay);
            Ok(())
        }
        Cleanup::MarkThenRecordAfter(delay) => {
            ctx.jobs.mark_reported(&meta.name, &meta.uid, state, None).await?;
            later(ctx, report, delay, "patch", |ctx, r| async move { record_then_delete_pods(&ctx, &r).await });
            Ok(())
        }
        Cleanup::MarkReported => {
            ctx.jobs.mark_reported(&meta.name, &meta.uid, state, ctx.defaults.ttl_seconds_after_finished).await
        }
        Cleanup::Record => record_then_delete_pods(ctx, report).await,
        Cleanup::CreateRecord => create_record(ctx, report).await,
        Cleanup::Release => ctx.jobs.mark_reported(&meta.name, &meta.uid, state, None).await,
        Cleanup::Keep => Ok(()),
    }
}
