//! Tracking: one label-selected watch on Jobs and one on their pods (no per-job polling)
//! feed [`state::TrackerState`]; the reports it returns are carried out by executors sharded
//! by Job name ([`execute`]), so the events of one Job keep their order.

mod execute;
pub mod state;

use std::{
    collections::{HashMap, HashSet},
    hash::{Hash, Hasher},
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use futures::{Stream, StreamExt};
use kube::runtime::{watcher, WatchStreamExt};
use tokio::sync::mpsc;

use self::state::{DueRead, Report, TrackerState};
use crate::{
    context::Context,
    error::Error,
    http::Health,
    k8s::{
        jobs::{Read, STARTED_PODS, WAITING_OR_FAILED_PODS},
        view::pod_owner,
        watched::{WatchedJob, WatchedPod},
    },
    observe::Observation,
};

/// Number of publishing executors.
const SHARDS: usize = 8;

/// Ticks (2 s each) between attempts at what is due while events are unroutable.
const UNROUTABLE_TICKS: u32 = 15;

enum Change {
    Job(Box<watcher::Event<WatchedJob>>),
    Pod(Box<watcher::Event<WatchedPod>>),
}

/// A label- (and field-) selected watch on one kind, its errors logged (the watcher retries
/// with backoff); what it hears of the apiserver goes to `/readyz`.
fn changes<K>(
    config: watcher::Config,
    api: kube::Api<K>,
    health: Arc<Health>,
    wrap: fn(Box<watcher::Event<K>>) -> Change,
) -> impl Stream<Item = Change> + Send + 'static
where
    K: kube::Resource<DynamicType = ()> + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + 'static,
{
    let kind = K::kind(&()).to_string();
    watcher(api, config)
        // Back soon after an outage (at most 5 s between attempts): a Job created and finished
        // meanwhile is only seen once the watch lists again.
        .backoff(watcher::ExponentialBackoff::from(
            backon::ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(500))
                .with_max_delay(Duration::from_secs(5))
                .with_jitter()
                .without_max_times(),
        ))
        .filter_map(move |e| {
            let (kind, health) = (kind.clone(), health.clone());
            async move {
                match e {
                    Ok(event) => {
                        health.apiserver_reachable();
                        Some(event)
                    }
                    Err(err) => {
                        tracing::warn!(%err, kind, "watch error");
                        if let watcher::Error::InitialListFailed(source)
                        | watcher::Error::WatchStartFailed(source)
                        | watcher::Error::WatchFailed(source) = err
                        {
                            health.observe_apiserver(&Error::Kube { verb: "watch", source });
                        }
                        None
                    }
                }
            }
        })
        .map(move |e| wrap(Box::new(e)))
}

/// Runs until shutdown: watch, classify, publish.
pub async fn run(ctx: Arc<Context>) {
    let mut senders = Vec::with_capacity(SHARDS);
    let mut executors = tokio::task::JoinSet::new();
    let (dropped_tx, mut dropped) = mpsc::unbounded_channel();
    for _ in 0..SHARDS {
        let (tx, rx) = mpsc::unbounded_channel();
        senders.push(tx);
        executors.spawn(execute::run(ctx.clone(), rx, dropped_tx.clone()));
    }
    drop(dropped_tx);
    let mut state = TrackerState::paused(ctx.limits.clone());
    let mut timers = tokio::time::interval(Duration::from_secs(2));
    let mut ticks: u32 = 0;
    let mut leadership = ctx.leadership.subscribe();
    // The Lease may have been won before we subscribed: start from the current role.
    let initial = state.set_reporting(*leadership.borrow_and_update());
    let mut last_term = ctx.leadership.term();
    debug_assert!(initial.is_empty(), "nothing is synced yet");
    let selector = ctx.defaults.naming.selector();
    let jobs = watcher::Config::default().labels(&selector);
    let pods = watcher::Config::default().labels(&selector).fields(STARTED_PODS);
    let changes = futures::stream::select(
        changes(jobs, ctx.jobs.watched_jobs(), ctx.health.clone(), Change::Job),
        changes(pods, ctx.jobs.watched_pods(), ctx.health.clone(), Change::Pod),
    );
    // Reads of waiting Jobs' pods: one sweep at a time, beside the loop, its result fed back.
    let (read_tx, mut reads) = mpsc::channel::<Result<Sweep, Error>>(1);
    let (mut sweeping, mut next_sweep) = (false, tokio::time::Instant::now());
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
                let term = ctx.leadership.term();
                let continued = leader && term.is_some() && term == last_term;
                if leader {
                    last_term = term;
                }
                tracing::info!(reporting = leader, continued, "reporting role changed");
                if continued { state.continue_reporting() } else { state.set_reporting(leader) }
            }
            Some(report) = dropped.recv() => {
                state.dropped(report);
                Vec::new()
            }
            Some(sweep) = reads.recv() => {
                sweeping = false;
                match sweep {
                    Ok(sweep) => {
                        // A sweep lists every waiting pod of the instance: at most a tenth of
                        // the time goes to sweeping, however many pods there are.
                        next_sweep = tokio::time::Instant::now() + sweep.took * 9;
                        sweep
                            .pods
                            .iter()
                            .filter_map(|(uid, (pods, refused))| state.pods_read(uid, pods, refused.as_deref(), sweep.at))
                            .collect()
                    }
                    Err(err) => {
                        kube_failed(&ctx, "list", &err);
                        Vec::new()
                    }
                }
            }
            _ = reconcile.tick() => relist(&ctx, &mut state).await,
            _ = timers.tick() => {
                // A namespace being deleted has no reporter any more (its Lease cannot be made
                // again): every replica lets go of what the finalizer holds there, or the
                // namespace would wait for the workers to stop (found in a chaos run).
                if ctx.leadership.namespace_terminating() {
                    let_go_of_deleting(&ctx, &state).await;
                }
                // Counting walks every Job: on the timer, not on every watch event.
                for (label, count) in state.counts() {
                    ctx.metrics.observe(Observation::Tracked { state: label, count });
                }
                if !sweeping && tokio::time::Instant::now() >= next_sweep {
                    let due = state.pods_to_read();
                    if !due.is_empty() {
                        sweeping = true;
                        let read = if state.read_from_cache(&due) { Read::Cached } else { Read::Latest };
                        let (ctx, tx) = (ctx.clone(), read_tx.clone());
                        tokio::spawn(async move {
                            let _ = tx.send(sweep(&ctx, due, read).await).await;
                        });
                    }
                }
                // While events reach no queue, what is due is tried every 30 s, not every 2 s.
                ticks = ticks.wrapping_add(1);
                if ctx.broker.is_unroutable() && ticks % UNROUTABLE_TICKS != 0 {
                    Vec::new()
                } else {
                    state.tick()
                }
            }
        };
        if state.synced() && !ctx.health.watch_synced.swap(true, Ordering::Relaxed) {
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
    // Jobs being deleted while the worker's finalizer holds them (a namespace going away, the
    // worker in it): a replica that stops lets them go, or nothing would.
    let_go_of_deleting(&ctx, &state).await;
}

/// Lets go of the Jobs being deleted that the worker's finalizer holds.
async fn let_go_of_deleting(ctx: &Context, state: &TrackerState) {
    for (name, uid) in state.held_and_deleting() {
        let release = tokio::time::timeout(Duration::from_secs(2), ctx.jobs.release(&name, &uid));
        if !matches!(release.await, Ok(Ok(()))) {
            tracing::warn!(job_name = name, "could not let go of a Job being deleted");
        }
    }
}

/// What one sweep read: the waiting or failed pods of each Job it was for (none: it has
/// none), and for those without pods past the grace, the job controller's refusal if any.
struct Sweep {
    pods: HashMap<String, (Vec<WatchedPod>, Option<String>)>,
    /// When the list began.
    at: jiff::Timestamp,
    /// How long it took.
    took: Duration,
}

/// Reads the pods of the Jobs `due` in one list of the instance's waiting or failed pods (not
/// a list per Job: each would make the apiserver filter every pod of the namespace), served
/// as `read` says, keeping only theirs; when a Job past the grace has none, one list of the
/// namespace's `FailedCreate` events says which were refused.
async fn sweep(ctx: &Context, due: Vec<DueRead>, read: Read) -> Result<Sweep, Error> {
    let (at, started) = (jiff::Timestamp::now(), tokio::time::Instant::now());
    let past_grace: HashSet<String> = due.iter().filter(|d| d.past_grace).map(|d| d.uid.clone()).collect();
    let mut pods: HashMap<String, (Vec<WatchedPod>, Option<String>)> =
        due.into_iter().map(|d| (d.uid, (Vec::new(), None))).collect();
    let selector = ctx.defaults.naming.selector();
    ctx.jobs
        .each_pod_page(&selector, WAITING_OR_FAILED_PODS, read, |page| {
            for pod in page {
                if let Some((of_job, _)) = pod_owner(&pod).and_then(|uid| pods.get_mut(&uid)) {
                    of_job.push(pod);
                }
            }
        })
        .await?;
    if past_grace.iter().any(|uid| pods.get(uid).is_some_and(|(p, _)| p.is_empty())) {
        for (uid, message) in ctx.jobs.refusals().await? {
            if let Some((of_job, refused)) = pods.get_mut(&uid) {
                if of_job.is_empty() && past_grace.contains(&uid) {
                    *refused = Some(message);
                }
            }
        }
    }
    Ok(Sweep { pods, at, took: started.elapsed() })
}

/// The periodic full reconcile: re-applies a fresh list of Jobs and pods, catching any
/// update a watch could have missed. Deletions are left to the watches' own re-lists, which
/// see them in order.
async fn relist(ctx: &Context, state: &mut TrackerState) -> Vec<Report> {
    if ctx.leadership.is_leader() {
        // The reporter also removes expired records the cluster's TTL controller left.
        match ctx.jobs.expire_records(&ctx.defaults.naming.records_selector(), jiff::Timestamp::now()).await {
            Ok(0) => {}
            Ok(expired) => tracing::info!(expired, "expired records of finished jobs removed"),
            Err(err) => kube_failed(ctx, "delete", &err),
        }
    }
    // Page by page: at no time are more than one page of objects held besides the state.
    let selector = ctx.defaults.naming.selector();
    let mut reports = Vec::new();
    let listed = async {
        let apply_pods = |pods: Vec<WatchedPod>| reports.extend(pods.iter().filter_map(|p| state.apply_pod(p)));
        ctx.jobs.each_pod_page(&selector, STARTED_PODS, Read::Latest, apply_pods).await?;
        let apply_jobs = |jobs: Vec<WatchedJob>| reports.extend(jobs.iter().filter_map(|j| state.apply_job(j)));
        ctx.jobs.each_job_page(&selector, apply_jobs).await
    };
    if let Err(err) = listed.await {
        kube_failed(ctx, "list", &err); // what was applied stands; the next period tries again
    }
    reports
}

/// A call of the tracker's about no one Job failed (it is tried again later).
fn kube_failed(ctx: &Context, verb: &str, err: &Error) {
    let error = err.to_string();
    ctx.metrics.observe(Observation::KubeError { verb, job_id: "", job_name: "", error: &error });
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
            Delete(pod) => state.pod_left(&pod).into_iter().collect(),
            Init => {
                state.begin_pod_relist();
                Vec::new()
            }
            InitDone => state.end_pod_relist(),
        },
    }
}
