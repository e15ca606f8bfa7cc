//! Creation throughput: the worker against a plain client creating the same Jobs with the
//! same concurrency, in repeated pairs, on shared or split cores.

use std::collections::BTreeMap;

use anyhow::Context as _;
use serde_json::json;

use crate::{apiserver, cpu, load, pin, round, Args};

/// One timed run: how long N Jobs took, the CPU seconds each process used meanwhile, and
/// (for the worker) where a request's time went inside it.
struct Run {
    /// From the first create (or publish) until the last Job was seen.
    seconds: f64,
    /// From the same start until every Job's pod was seen running.
    to_running: f64,
    /// CPU seconds by process until the last Job was seen.
    cpu: BTreeMap<String, f64>,
    /// CPU seconds by process until every pod ran and the environment was idle again, less
    /// what idling would have used: what the Jobs cost, whenever it was spent.
    whole_cpu: BTreeMap<String, f64>,
    pipeline: serde_json::Value,
    /// The apiserver's requests and watch traffic over the same span as `whole_cpu`.
    apiserver: apiserver::Snapshot,
    /// Its requests until the last Job was seen.
    window: apiserver::Snapshot,
}

/// What makes a run's Jobs.
#[derive(Clone, Copy)]
enum Kind {
    /// The plain client, with this many copies of the worker's watches open.
    Plain(usize),
    /// The worker.
    Worker,
    /// The relay in this process ([`load::Env::relay_burst`]).
    Relay,
}

/// `--repeat` pairs of runs, a plain client and the worker, each creating `--burst` Jobs with
/// the same concurrency; with `--relay`, triples with a relay's run ([`load::Env::relay_burst`]).
/// With `split`, the control plane runs on core 0 and everything on the client side (this
/// process, the worker, the broker) on core 1, in every run alike: the apiserver gets the same
/// CPU whoever calls it.
pub async fn creation(client: &kube::Client, args: &Args, split: bool) -> anyhow::Result<serde_json::Value> {
    let mut pinned = pin::Pinned::default();
    if split {
        for name in cpu::CONTROL_PLANE {
            if let Some(pid) = cpu::env_pid(&args.testenv_dir, name) {
                pinned.pin(pid, 0).with_context(|| format!("pinning {name}"))?;
            }
        }
        pinned.pin(std::process::id(), 1).context("pinning the benchmark")?;
    }
    // A broker owned by another user may refuse; the figures say whether it was pinned.
    let broker_pinned = split && cpu::broker_pid().is_some_and(|pid| pinned.pin(pid, 1).is_ok());
    let cores = if split { "split" } else { "shared" };
    let mut kinds = vec![Kind::Plain(0), Kind::Worker];
    if args.relay {
        kinds.push(Kind::Relay);
    }
    let mut totals: Vec<Totals> = kinds.iter().map(|_| Totals::default()).collect();
    let (mut runs, mut ratios) = (Vec::new(), Vec::new());
    for pair in 1..=args.repeat.max(1) {
        let done = runs_of(pair, &kinds, client, args, &mut pinned, split).await?;
        let rates: Vec<f64> = done.iter().map(|run| args.burst as f64 / run.seconds).collect();
        let relay = rates.get(2).map(|r| format!(", relay {r:.0}/s")).unwrap_or_default();
        eprintln!(
            "[bench] creation ({cores} cores, run {pair}): raw {:.0}/s, worker {:.0}/s{relay}",
            rates[0], rates[1]
        );
        ratios.push(rates[1] / rates[0]);
        let (raw, worker) = (&done[0], &done[1]);
        let mut figures = json!({"raw_jobs_per_s": round(rates[0]), "worker_jobs_per_s": round(rates[1]),
                                 "ratio": round(rates[1] / rates[0]), "worker_pipeline": worker.pipeline,
                                 "raw_to_running_s": round(raw.to_running), "worker_to_running_s": round(worker.to_running)});
        if let Some(relay) = done.get(2) {
            figures["relay_jobs_per_s"] = json!(round(rates[2]));
            figures["relay_to_running_s"] = json!(round(relay.to_running));
        }
        runs.push(figures);
        for (total, run) in totals.iter_mut().zip(&done) {
            total.add(run);
        }
    }
    // CPU milliseconds per Job, by process, over all runs.
    let jobs = (args.burst * args.repeat.max(1)) as f64;
    let per_job = |sum: &BTreeMap<String, f64>| -> BTreeMap<String, f64> {
        sum.iter().map(|(name, s)| (name.clone(), round(s * 1000.0 / jobs))).collect()
    };
    // Per Job, what the worker run asked of the apiserver beyond the plain client's run.
    let beyond =
        |with: &apiserver::Counts, without: &apiserver::Counts, scale: f64| per_job_beyond(with, without, scale / jobs);
    let apiserver_ratio = |raw: &BTreeMap<String, f64>, other: &BTreeMap<String, f64>| {
        round(apiserver_seconds(other) / apiserver_seconds(raw).max(1e-9))
    };
    ratios.sort_by(f64::total_cmp);
    let (raw, worker) = (&totals[0], &totals[1]);
    let mut figures = json!({"jobs": args.burst, "concurrency": args.concurrency, "cores": cores, "broker_pinned": broker_pinned,
              "ratio_worker_to_raw_median": round(ratios[ratios.len() / 2]),
              // All runs' Jobs over all runs' time, raw against worker.
              "ratio_pooled": round(raw.seconds / worker.seconds),
              // The same, until every Job's pod runs: the work a burst really asks of the
              // control plane, the same in both runs.
              "ratio_pooled_to_running": round(raw.to_running / worker.to_running),
              "ratio_min": round(ratios[0]), "ratio_max": round(ratios[ratios.len() - 1]), "runs": runs,
              "apiserver_cpu_worker_to_raw": apiserver_ratio(&raw.cpu, &worker.cpu),
              "apiserver_cpu_worker_to_raw_whole": apiserver_ratio(&raw.whole, &worker.whole),
              "cpu_ms_per_job_raw_run": per_job(&raw.cpu), "cpu_ms_per_job_worker_run": per_job(&worker.cpu),
              "cpu_ms_per_job_raw_run_whole": per_job(&raw.whole), "cpu_ms_per_job_worker_run_whole": per_job(&worker.whole),
              // What the apiserver sent on the worker's own watches: all watch traffic of the
              // worker run beyond the raw run's (the controllers, sim-node and this benchmark
              // watch in both), per Job, by kind.
              "worker_watch_per_job": beyond(&worker.api.watch, &raw.api.watch, 1.0),
              // Requests the worker run made beyond the raw run's, per Job, and the
              // milliseconds the apiserver spent serving them.
              "worker_requests_per_job": beyond(&worker.api.requests, &raw.api.requests, 1.0),
              "worker_request_ms_per_job": beyond(&worker.api.seconds, &raw.api.seconds, 1000.0),
              // Until the last Job was seen: pods the job controller made meanwhile show here.
              "worker_requests_per_job_until_jobs_seen": beyond(&worker.window.requests, &raw.window.requests, 1.0)});
    if let Some(relay) = totals.get(2) {
        // The relay keeps the message contract and does nothing else: relay / raw is the most
        // any worker that keeps it could reach here, worker / relay what the rest costs.
        figures["ratio_pooled_relay_to_raw"] = json!(round(raw.seconds / relay.seconds));
        figures["ratio_pooled_worker_to_relay"] = json!(round(relay.seconds / worker.seconds));
        figures["ratio_pooled_to_running_relay_to_raw"] = json!(round(raw.to_running / relay.to_running));
        figures["apiserver_cpu_relay_to_raw_whole"] = json!(apiserver_ratio(&raw.whole, &relay.whole));
        figures["cpu_ms_per_job_relay_run"] = json!(per_job(&relay.cpu));
        figures["cpu_ms_per_job_relay_run_whole"] = json!(per_job(&relay.whole));
    }
    Ok(figures)
}

/// What the worker's watches alone cost the apiserver, apart from everything else the worker
/// does (its creates, the broker, its CPU on shared cores): `--repeat` pairs of plain-client
/// runs on shared cores, alternating, one as in the creation test and one with
/// `--watch-copies` copies of the worker's two watches open from before the first create to
/// the end of the Jobs' whole start. The difference, divided by the copies, is what one
/// worker's watches cost the apiserver per Job; the copies make it large enough to measure.
pub async fn watch_cost(client: &kube::Client, args: &Args) -> anyhow::Result<serde_json::Value> {
    let copies = args.watch_copies;
    let (mut plain, mut watched) = (Totals::default(), Totals::default());
    // Each pair's apiserver CPU per Job over the whole start, plain and watched.
    let mut pairs = Vec::new();
    let mut unpinned = pin::Pinned::default();
    for pair in 1..=args.repeat.max(1) {
        let kinds = [Kind::Plain(0), Kind::Plain(copies)];
        let done = runs_of(pair, &kinds, client, args, &mut unpinned, false).await?;
        let per_job = |run: &Run| apiserver_seconds(&run.whole_cpu) * 1000.0 / args.burst as f64;
        let (p_ms, w_ms) = (per_job(&done[0]), per_job(&done[1]));
        eprintln!(
            "[bench] watch cost (pair {pair}): apiserver {p_ms:.2} ms per Job plain, {w_ms:.2} with {copies} copies of the worker's watches"
        );
        pairs.push((p_ms, w_ms));
        plain.add(&done[0]);
        watched.add(&done[1]);
    }
    let jobs = (args.burst * args.repeat.max(1)) as f64;
    let ms = |cpu: &BTreeMap<String, f64>| apiserver_seconds(cpu) * 1000.0 / jobs;
    let per_copy = |with: f64, without: f64| round((with - without) / copies as f64);
    let (whole, window) = ((ms(&plain.whole), ms(&watched.whole)), (ms(&plain.cpu), ms(&watched.cpu)));
    let watch_per_copy = per_job_beyond(&watched.api.watch, &plain.api.watch, 1.0 / jobs / copies as f64);
    // The standard error of one copy's cost, from the spread of the pairs' differences.
    let n = pairs.len() as f64;
    let diffs: Vec<f64> = pairs.iter().map(|(p, w)| (w - p) / copies as f64).collect();
    let mean = diffs.iter().sum::<f64>() / n;
    let variance = diffs.iter().map(|d| (d - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
    Ok(json!({"jobs": args.burst, "pairs": args.repeat.max(1), "copies": copies, "cores": "shared",
              // The apiserver's CPU per Job over the Jobs' whole start (idle subtracted).
              "apiserver_ms_per_job_whole_plain": round(whole.0),
              "apiserver_ms_per_job_whole_watched": round(whole.1),
              "apiserver_ms_per_job_whole_one_copy": per_copy(whole.1, whole.0),
              "apiserver_ms_per_job_whole_one_copy_standard_error": round((variance / n).sqrt()),
              "apiserver_ms_per_job_whole_by_pair": pairs.iter().map(|(p, w)| json!({"plain": round(*p), "watched": round(*w)})).collect::<Vec<_>>(),
              // The same until the last Job was seen.
              "apiserver_ms_per_job_until_jobs_seen_plain": round(window.0),
              "apiserver_ms_per_job_until_jobs_seen_watched": round(window.1),
              "apiserver_ms_per_job_until_jobs_seen_one_copy": per_copy(window.1, window.0),
              "watch_per_job_one_copy": watch_per_copy,
              // Plain runs' time over watched runs' time, to the last Job seen.
              "rate_watched_to_plain_pooled": round(plain.seconds / watched.seconds)}))
}

/// Running sums over the runs of one kind.
#[derive(Default)]
struct Totals {
    /// Seconds until the last Job was seen.
    seconds: f64,
    /// Seconds until the last pod was seen running.
    to_running: f64,
    /// CPU seconds by process until the last Job was seen.
    cpu: BTreeMap<String, f64>,
    /// CPU seconds by process over the Jobs' whole start.
    whole: BTreeMap<String, f64>,
    /// The apiserver's counters over the whole start.
    api: apiserver::Snapshot,
    /// The same until the last Job was seen.
    window: apiserver::Snapshot,
}

impl Totals {
    fn add(&mut self, run: &Run) {
        self.seconds += run.seconds;
        self.to_running += run.to_running;
        add_cpu(&mut self.cpu, &run.cpu);
        add_cpu(&mut self.whole, &run.whole_cpu);
        self.api.add(&run.apiserver);
        self.window.add(&run.window);
    }
}

/// The order in which pair number `pair` (from 1) makes its `n` runs: rotated by one per pair,
/// so that a drift over the pairs weighs on every kind alike.
fn rotation(pair: usize, n: usize) -> impl Iterator<Item = usize> {
    let first = pair.saturating_sub(1) % n.max(1);
    (0..n).map(move |i| (first + i) % n)
}

/// One pair's (or triple's) runs, made in [`rotation`] order, returned in `kinds`' order.
async fn runs_of(
    pair: usize,
    kinds: &[Kind],
    client: &kube::Client,
    args: &Args,
    pinned: &mut pin::Pinned,
    split: bool,
) -> anyhow::Result<Vec<Run>> {
    let mut done: Vec<Option<Run>> = kinds.iter().map(|_| None).collect();
    for i in rotation(pair, kinds.len()) {
        done[i] = Some(match kinds[i] {
            Kind::Plain(watch_copies) => raw_run(client, args, watch_copies).await?,
            Kind::Worker => worker_run(client, args, pinned, split).await?,
            Kind::Relay => relay_run(client, args).await?,
        });
    }
    Ok(done.into_iter().flatten().collect())
}

/// `(with − without) × scale` for every key of either, to three decimals, leaving out what
/// rounds to nothing: e.g. per Job, what one run asked of the apiserver beyond another.
fn per_job_beyond(with: &apiserver::Counts, without: &apiserver::Counts, scale: f64) -> BTreeMap<String, f64> {
    let keys: std::collections::BTreeSet<&String> = with.keys().chain(without.keys()).collect();
    keys.into_iter()
        .map(|k| {
            let d = with.get(k).copied().unwrap_or(0.0) - without.get(k).copied().unwrap_or(0.0);
            (k.clone(), (d * scale * 1000.0).round() / 1000.0)
        })
        .filter(|(_, v)| v.abs() >= 0.001)
        .collect()
}

/// The apiserver's CPU seconds in CPU seconds by process.
fn apiserver_seconds(cpu: &BTreeMap<String, f64>) -> f64 {
    cpu.get("kube-apiserver").copied().unwrap_or(0.0)
}

/// CPU seconds by process, as [`cpu`] reports them, as a map.
fn cpu_map(cpu: &serde_json::Value) -> BTreeMap<String, f64> {
    cpu.as_object().into_iter().flatten().map(|(name, s)| (name.clone(), s.as_f64().unwrap_or(0.0))).collect()
}

/// Adds one run's CPU seconds by process to a running sum.
fn add_cpu(sum: &mut BTreeMap<String, f64>, cpu: &BTreeMap<String, f64>) {
    for (name, seconds) in cpu {
        *sum.entry(name.clone()).or_default() += seconds;
    }
}

/// The plain client's run, in its own namespace, with `watch_copies` copies of the
/// worker's watches open on it.
async fn raw_run(client: &kube::Client, args: &Args, watch_copies: usize) -> anyhow::Result<Run> {
    let mut env = load::Env::new(client, args, "bench-raw").await?;
    env.watch_like_the_worker(watch_copies)?;
    let procs = [("client", std::process::id())];
    let meter = Meter::start(args, &procs).await?;
    let seconds = env.raw_creates(args.burst, args.concurrency).await?.as_secs_f64();
    let run = meter.finish(&env, args, seconds, serde_json::Value::Null).await?;
    env.finish().await;
    Ok(run)
}

/// The relay's run (in this process), in its own namespace with its own queues.
async fn relay_run(client: &kube::Client, args: &Args) -> anyhow::Result<Run> {
    let mut env = load::Env::new(client, args, "bench-relay").await?;
    let procs = [("client", std::process::id())];
    let meter = Meter::start(args, &procs).await?;
    let seconds = env.relay_burst(args).await?.as_secs_f64();
    let run = meter.finish(&env, args, seconds, serde_json::Value::Null).await?;
    env.finish().await;
    Ok(run)
}

/// The worker's run, in its own namespace with its own queues.
async fn worker_run(client: &kube::Client, args: &Args, pinned: &mut pin::Pinned, split: bool) -> anyhow::Result<Run> {
    let mut env = load::Env::new(client, args, "bench-burst").await?;
    env.start_worker(args).await?;
    let worker_pid = env.worker_pid().unwrap_or(0);
    if split {
        pinned.pin(worker_pid, 1).context("pinning the worker")?;
    }
    let procs = [("client", std::process::id()), ("worker", worker_pid)];
    let meter = Meter::start(args, &procs).await?;
    let seconds = env.burst(args.burst).await?.as_secs_f64();
    // Where a request's time goes inside the worker (means from its own histograms).
    let pipeline = json!({
        "mean_delivery_to_job_ms": env.worker_metric_mean_ms("k8s_job_worker_request_to_job_seconds").await.map(round),
        "mean_publish_confirm_ms": env.worker_metric_mean_ms("k8s_job_worker_publish_confirm_seconds").await.map(round),
    });
    let run = meter.finish(&env, args, seconds, pipeline).await?;
    env.finish().await;
    Ok(run)
}

/// Measures one run from an idle environment: the CPU each process used until the last Job
/// was seen, and over the Jobs' whole start (until every pod runs and the environment is idle
/// again, less what idling would have used), and the apiserver's counters over the latter.
struct Meter<'a> {
    procs: &'a [(&'a str, u32)],
    idle: cpu::Idle,
    apiserver: apiserver::Snapshot,
    cpu: cpu::CpuSample,
    started: std::time::Instant,
}

impl<'a> Meter<'a> {
    async fn start(args: &Args, procs: &'a [(&'a str, u32)]) -> anyhow::Result<Meter<'a>> {
        let idle = cpu::quiesce(&args.testenv_dir).await;
        let apiserver = apiserver::Snapshot::now(&args.testenv_dir).await?;
        let cpu = cpu::CpuSample::take(&args.testenv_dir, procs);
        Ok(Meter { procs, idle, apiserver, cpu, started: std::time::Instant::now() })
    }

    /// Called once the last Job was seen (`seconds` after the start).
    async fn finish(
        self,
        env: &load::Env,
        args: &Args,
        seconds: f64,
        pipeline: serde_json::Value,
    ) -> anyhow::Result<Run> {
        let dir = &args.testenv_dir;
        let cpu = cpu_map(&self.cpu.since(dir, self.procs));
        let window = apiserver::Snapshot::now(dir).await?.since(&self.apiserver);
        let running = env.wait_running(args.burst, std::time::Duration::from_secs(600)).await?;
        let to_running = running.duration_since(self.started).as_secs_f64();
        cpu::quiesce(dir).await;
        let whole_seconds = self.started.elapsed().as_secs_f64();
        let whole_cpu = cpu_map(&self.idle.subtract(&self.cpu.since(dir, self.procs), whole_seconds));
        let apiserver = apiserver::Snapshot::now(dir).await?.since(&self.apiserver);
        Ok(Run { seconds, to_running, cpu, whole_cpu, pipeline, apiserver, window })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn beyond_is_the_scaled_difference_over_both_maps_keys() {
        let with: apiserver::Counts = [("Job".to_string(), 3000.0), ("Pod".to_string(), 1000.0)].into();
        let without: apiserver::Counts = [("Job".to_string(), 1000.0), ("Lease".to_string(), 2.0)].into();
        let per_job = per_job_beyond(&with, &without, 1.0 / 1000.0);
        assert_eq!(per_job, [("Job".to_string(), 2.0), ("Pod".to_string(), 1.0), ("Lease".to_string(), -0.002)].into());
        assert!(per_job_beyond(&with, &with, 1.0).is_empty(), "nothing beyond itself");
    }

    #[test]
    fn every_kind_goes_first_in_turn() {
        let orders: Vec<Vec<usize>> = (1..=4).map(|pair| rotation(pair, 3).collect()).collect();
        assert_eq!(orders, [[0, 1, 2], [1, 2, 0], [2, 0, 1], [0, 1, 2]]);
        let pairs: Vec<Vec<usize>> = (1..=2).map(|pair| rotation(pair, 2).collect()).collect();
        assert_eq!(pairs, [[0, 1], [1, 0]], "pairs alternate");
    }

    #[test]
    fn the_apiserver_entry_is_read_from_a_runs_cpu() {
        let cpu = json!({"kube-apiserver": 1.5, "etcd": 0.25});
        assert_eq!(apiserver_seconds(&cpu_map(&cpu)), 1.5);
        assert_eq!(apiserver_seconds(&cpu_map(&json!(null))), 0.0);
    }
}
