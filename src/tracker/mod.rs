//! Tracking: one label-selected watch on Jobs and one on their pods (no per-job polling)
//! feed [`state::TrackerState`]; the reports it returns are published by executors sharded
//! by Job name, so the events of one Job keep their order.

pub mod state;

use std::{
    hash::{Hash, Hasher},
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use futures::{Stream, StreamExt};
use kube::{
    api::ListParams,
    runtime::{watcher, WatchStreamExt},
};
use tokio::sync::mpsc;

use self::state::{Report, TrackerState};
use crate::{
    context::{Context, EventSubject},
    domain::{event::JobState, outcome::classify},
    k8s::{
        jobs, spec,
        watched::{WatchedJob, WatchedPod},
    },
    observe::Observation,
};

/// Number of publishing executors.
const SHARDS: usize = 8;

/// How long a cancelled (stopped) Job stays before the reporter deletes it: longer than a
/// watch's re-list after an apiserver restart (~8 s here), so every replica sees the cancel.
const CANCELLED_JOB_GRACE: Duration = Duration::from_secs(15);

enum Change {
    Job(Box<watcher::Event<WatchedJob>>),
    Pod(Box<watcher::Event<WatchedPod>>),
}

/// A label-selected watch on one kind, its errors logged (the watcher retries with backoff).
fn changes<K>(
    ctx: &Context,
    api: kube::Api<K>,
    wrap: fn(Box<watcher::Event<K>>) -> Change,
) -> impl Stream<Item = Change> + Send + 'static
where
    K: kube::Resource<DynamicType = ()> + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + 'static,
{
    let config = watcher::Config::default().labels(&spec::instance_selector(&ctx.settings.kube));
    let kind = K::kind(&()).to_string();
    watcher(api, config)
        .default_backoff()
        .filter_map(move |e| {
            let kind = kind.clone();
            async move { e.map_err(|err| tracing::warn!(%err, kind, "watch error")).ok() }
        })
        .map(move |e| wrap(Box::new(e)))
}

/// Runs until shutdown: watch, classify, publish.
pub async fn run(ctx: Arc<Context>) {
    let mut senders = Vec::with_capacity(SHARDS);
    let mut executors = tokio::task::JoinSet::new();
    for _ in 0..SHARDS {
        let (tx, rx) = mpsc::unbounded_channel();
        senders.push(tx);
        executors.spawn(execute(ctx.clone(), rx));
    }
    let mut state = TrackerState::paused(ctx.settings.limits());
    let mut timers = tokio::time::interval(Duration::from_secs(2));
    let mut leadership = ctx.leadership.subscribe();
    // The Lease may have been won before we subscribed: start from the current role.
    let initial = state.set_reporting(*leadership.borrow_and_update());
    debug_assert!(initial.is_empty(), "nothing is synced yet");
    let changes = futures::stream::select(
        changes(&ctx, ctx.watched_jobs.clone(), Change::Job),
        changes(&ctx, ctx.watched_pods.clone(), Change::Pod),
    );
    futures::pin_mut!(changes);
    let period = Duration::from_secs(ctx.settings.worker.reconcile_seconds.max(1));
    let mut reconcile = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    loop {
        let reports = tokio::select! {
            _ = ctx.shutdown.wait() => break,
            change = changes.next() => match change {
                Some(change) => apply(&mut state, change),
                None => break,
            },
            changed = leadership.changed() => {
                if changed.is_err() { break }
                let leader = *leadership.borrow_and_update();
                tracing::info!(reporting = leader, "reporting role changed");
                state.set_reporting(leader)
            }
            _ = reconcile.tick() => relist(&ctx, &mut state).await,
            _ = timers.tick() => {
                // Counting walks every Job: on the timer, not on every watch event.
                for (label, count) in state.counts() {
                    ctx.metrics.observe(Observation::Tracked { state: label, count });
                }
                state.tick()
            }
        };
        if state.synced() && !ctx.watch_synced.swap(true, Ordering::Relaxed) {
            tracing::info!("job and pod watches synced");
        }
        for report in reports {
            let mut hasher = std::collections::hash_map::DefaultHasher::new();
            report.meta.name.hash(&mut hasher);
            let _ = senders[(hasher.finish() as usize) % SHARDS].send(report);
        }
    }
    drop(senders);
    while executors.join_next().await.is_some() {}
}

/// The periodic full reconcile: re-applies a fresh list of Jobs and pods, catching any
/// update a watch could have missed. Deletions are left to the watches' own re-lists, which
/// see them in order.
async fn relist(ctx: &Context, state: &mut TrackerState) -> Vec<Report> {
    let params = ListParams::default().labels(&spec::instance_selector(&ctx.settings.kube));
    let (jobs, pods) = match tokio::try_join!(ctx.watched_jobs.list(&params), ctx.watched_pods.list(&params)) {
        Ok(lists) => lists,
        Err(err) => {
            let error = err.to_string();
            ctx.metrics.observe(Observation::KubeError { verb: "list", job_id: "", job_name: "", error: &error });
            return Vec::new();
        }
    };
    let mut reports: Vec<Report> = pods.items.iter().filter_map(|p| state.apply_pod(p)).collect();
    reports.extend(jobs.items.iter().filter_map(|j| state.apply_job(j)));
    reports
}

fn apply(state: &mut TrackerState, change: Change) -> Vec<Report> {
    use watcher::Event::*;
    match change {
        Change::Job(event) => match *event {
            Apply(job) | InitApply(job) => state.apply_job(&job).into_iter().collect(),
            Delete(job) => state.delete_job(&job).into_iter().collect(),
            Init => {
                state.begin_job_relist();
                Vec::new()
            }
            InitDone => state.end_job_relist(),
        },
        Change::Pod(event) => match *event {
            Apply(pod) | InitApply(pod) => state.apply_pod(&pod).into_iter().collect(),
            Delete(pod) => {
                state.delete_pod(&pod);
                Vec::new()
            }
            Init => {
                state.begin_pod_relist();
                Vec::new()
            }
            InitDone => state.end_pod_relist(),
        },
    }
}

/// Records a failed Kubernetes call about one Job: a log line and a metric.
fn kube_error(ctx: &Context, verb: &str, job_id: &str, job_name: &str, err: &impl std::fmt::Display) {
    let error = err.to_string();
    ctx.metrics.observe(Observation::KubeError { verb, job_id, job_name, error: &error });
}

/// Re-classifies a terminal report with the pods as they are now.
async fn refresh(ctx: &Context, report: &mut Report) {
    match jobs::current_pods(ctx, &report.meta.name, &report.meta.uid).await {
        Ok(mut pods) if !pods.is_empty() => {
            pods.sort_by(|a, b| a.created.cmp(&b.created));
            let outcome = classify(&report.view, &pods, jiff::Timestamp::now(), &ctx.settings.limits());
            if outcome.state.is_terminal() {
                report.outcome = outcome;
            }
            report.pods = pods.into_iter().map(|p| p.name).collect();
        }
        Ok(_) => {}
        Err(err) => {
            kube_error(ctx, "list", &report.meta.job_id, &report.meta.name, &err);
        }
    }
}

/// Publishes reports in order; for terminal ones, stops OOM-killed Jobs, attaches the log
/// tail, and cleans up only after the broker confirmed the event.
async fn execute(ctx: Arc<Context>, mut reports: mpsc::UnboundedReceiver<Report>) {
    while let Some(mut report) = reports.recv().await {
        if !ctx.leadership.is_leader() {
            continue; // the replica that takes over re-evaluates every Job
        }
        if report.outcome.state == JobState::Failed || (report.outcome.state.is_terminal() && report.pods.is_empty()) {
            refresh(&ctx, &mut report).await;
        }
        let meta = &report.meta;
        let state = report.outcome.state;
        if state == JobState::Cancelled {
            // The Job is already stopped. Deleting it at once could let a replica whose watch
            // is re-listing (after an apiserver restart) miss the cancel mark and, on taking
            // over, report `lost`: the stopped Job stays visible a while first. A reporter that
            // stops meanwhile leaves it to the next one, which re-evaluates every Job.
            let (ctx, name, uid, job_id) = (ctx.clone(), meta.name.clone(), meta.uid.clone(), meta.job_id.clone());
            tokio::spawn(async move {
                if ctx.shutdown.sleep_or_stop(CANCELLED_JOB_GRACE).await {
                    return;
                }
                if let Err(err) = jobs::delete(&ctx, &name, Some(&uid)).await {
                    kube_error(&ctx, "delete", &job_id, &name, &err);
                }
            });
            continue;
        }
        // These states end a Job that would otherwise go on: stop it making pods.
        let stop = matches!(state, JobState::OomKilled | JobState::Preempted | JobState::NodeLost);
        if stop && report.exists {
            if let Err(err) = jobs::stop(&ctx, &meta.name).await {
                kube_error(&ctx, "patch", &meta.job_id, &meta.name, &err);
            }
        }
        let subject = EventSubject {
            job_id: &meta.job_id,
            attempt: meta.attempt,
            job_name: &meta.name,
            fingerprint: &meta.fingerprint,
        };
        let kube = &ctx.settings.kube;
        let preempted = matches!(state, JobState::Preempted | JobState::NodeLost);
        if let (true, true, Some(delay)) = (preempted, report.exists, kube.k8s_preempted_resubmit_delay_seconds) {
            if meta.resubmissions < kube.k8s_preempted_max_resubmissions {
                // Not the tool's fault: run it again later instead of reporting it.
                let (ctx, name, uid, job_id) = (ctx.clone(), meta.name.clone(), meta.uid.clone(), meta.job_id.clone());
                tokio::spawn(async move {
                    if ctx.shutdown.sleep_or_stop(Duration::from_secs(delay)).await {
                        return; // the next reporter finds the stopped Job and resubmits it
                    }
                    if let Err(err) = jobs::resubmit(&ctx, &name, &uid).await {
                        kube_error(&ctx, "create", &job_id, &name, &err);
                    }
                });
                continue;
            }
        }
        let mut reason = report.outcome.reason.clone();
        if meta.resubmissions > 0 {
            reason.push_str(&format!(" (after {} resubmission(s))", meta.resubmissions));
        }
        let mut event = ctx.event(&subject, state, reason);
        event.exit_code = report.outcome.exit_code;
        event.pods = report.pods.clone();
        event.occurred_at = report.occurred_at.clone();
        if state.is_terminal() {
            if let Some(last) = report.pods.last() {
                event.log_tail = jobs::log_tail(&ctx, last, ctx.settings.worker.log_tail_bytes).await;
            }
        }
        let since = report.occurred_at.as_deref().and_then(|t| t.parse::<jiff::Timestamp>().ok());
        if !ctx.publish_until_confirmed(&mut event, since).await {
            continue; // shutting down: a restarted worker reports it again
        }
        if state.is_terminal() && report.exists {
            // A Job that cannot start is deleted whatever the cleanup policy: it would wait forever.
            let result = if matches!(state, JobState::Unschedulable | JobState::ImagePullFailed) {
                jobs::delete(&ctx, &meta.name, Some(&meta.uid)).await
            } else {
                jobs::after_terminal(&ctx, &meta.name, &meta.uid, state).await
            };
            if let Err(err) = result {
                kube_error(&ctx, "delete", &meta.job_id, &meta.name, &err);
            }
        }
    }
}
