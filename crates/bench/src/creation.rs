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
    cpu: serde_json::Value,
    /// CPU seconds by process until every pod ran and the environment was idle again, less
    /// what idling would have used: what the Jobs cost, whenever it was spent.
    whole_cpu: serde_json::Value,
    pipeline: serde_json::Value,
    /// The apiserver's requests and watch traffic over the same span as `whole_cpu`.
    apiserver: apiserver::Snapshot,
    /// Its requests until the last Job was seen.
    window: apiserver::Snapshot,
}

/// `--repeat` pairs of runs, a plain client and the worker, each creating `--burst` Jobs with
/// the same concurrency. With `split`, the control plane runs on core 0 and everything on
/// the client side (this process, the worker, the broker) on core 1, in both runs alike: the
/// apiserver gets the same CPU whoever calls it.
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
    let (mut runs, mut ratios, mut seconds, mut to_running) = (Vec::new(), Vec::new(), (0.0, 0.0), (0.0, 0.0));
    let (mut raw_cpu, mut worker_cpu) = (BTreeMap::new(), BTreeMap::new());
    let (mut raw_whole, mut worker_whole) = (BTreeMap::new(), BTreeMap::new());
    let (mut raw_api, mut worker_api) = (apiserver::Snapshot::default(), apiserver::Snapshot::default());
    let (mut raw_window, mut worker_window) = (apiserver::Snapshot::default(), apiserver::Snapshot::default());
    for pair in 1..=args.repeat.max(1) {
        // Alternate which run goes first, so a drift over the pairs weighs on both alike.
        let (raw, worker) = if pair % 2 == 1 {
            let raw = raw_run(client, args, 0).await?;
            (raw, worker_run(client, args, &mut pinned, split).await?)
        } else {
            let worker = worker_run(client, args, &mut pinned, split).await?;
            (raw_run(client, args, 0).await?, worker)
        };
        let (raw_rate, worker_rate) = (args.burst as f64 / raw.seconds, args.burst as f64 / worker.seconds);
        eprintln!("[bench] creation ({cores} cores, run {pair}): raw {raw_rate:.0}/s, worker {worker_rate:.0}/s");
        ratios.push(worker_rate / raw_rate);
        seconds = (seconds.0 + raw.seconds, seconds.1 + worker.seconds);
        to_running = (to_running.0 + raw.to_running, to_running.1 + worker.to_running);
        runs.push(json!({"raw_jobs_per_s": round(raw_rate), "worker_jobs_per_s": round(worker_rate),
                         "ratio": round(worker_rate / raw_rate), "worker_pipeline": worker.pipeline,
                         "raw_to_running_s": round(raw.to_running), "worker_to_running_s": round(worker.to_running)}));
        add_cpu(&mut raw_cpu, &raw.cpu);
        add_cpu(&mut worker_cpu, &worker.cpu);
        add_cpu(&mut raw_whole, &raw.whole_cpu);
        add_cpu(&mut worker_whole, &worker.whole_cpu);
        raw_api.add(&raw.apiserver);
        worker_api.add(&worker.apiserver);
        raw_window.add(&raw.window);
        worker_window.add(&worker.window);
    }
    // CPU milliseconds per Job, by process, over all runs.
    let jobs = (args.burst * args.repeat.max(1)) as f64;
    let per_job = |sum: BTreeMap<String, f64>| -> BTreeMap<String, f64> {
        sum.into_iter().map(|(name, s)| (name, round(s * 1000.0 / jobs))).collect()
    };
    // Per Job, what the worker run asked of the apiserver beyond the plain client's run.
    let beyond = |with: &apiserver::Counts, without: &apiserver::Counts, scale: f64| -> BTreeMap<String, f64> {
        let keys: std::collections::BTreeSet<&String> = with.keys().chain(without.keys()).collect();
        keys.into_iter()
            .map(|k| {
                let d = with.get(k).copied().unwrap_or(0.0) - without.get(k).copied().unwrap_or(0.0);
                (k.clone(), (d * scale / jobs * 1000.0).round() / 1000.0)
            })
            .filter(|(_, v)| v.abs() >= 0.001)
            .collect()
    };
    let apiserver_ratio = |raw: &BTreeMap<String, f64>, worker: &BTreeMap<String, f64>| {
        let (r, w) =
            (raw.get("kube-apiserver").copied().unwrap_or(0.0), worker.get("kube-apiserver").copied().unwrap_or(0.0));
        round(w / r.max(1e-9))
    };
    ratios.sort_by(f64::total_cmp);
    Ok(json!({"jobs": args.burst, "concurrency": args.concurrency, "cores": cores, "broker_pinned": broker_pinned,
              "ratio_worker_to_raw_median": round(ratios[ratios.len() / 2]),
              // All runs' Jobs over all runs' time, raw against worker.
              "ratio_pooled": round(seconds.0 / seconds.1),
              // The same, until every Job's pod runs: the work a burst really asks of the
              // control plane, the same in both runs.
              "ratio_pooled_to_running": round(to_running.0 / to_running.1),
              "ratio_min": round(ratios[0]), "ratio_max": round(ratios[ratios.len() - 1]), "runs": runs,
              "apiserver_cpu_worker_to_raw": apiserver_ratio(&raw_cpu, &worker_cpu),
              "apiserver_cpu_worker_to_raw_whole": apiserver_ratio(&raw_whole, &worker_whole),
              "cpu_ms_per_job_raw_run": per_job(raw_cpu), "cpu_ms_per_job_worker_run": per_job(worker_cpu),
              "cpu_ms_per_job_raw_run_whole": per_job(raw_whole), "cpu_ms_per_job_worker_run_whole": per_job(worker_whole),
              // What the apiserver sent on the worker's own watches: all watch traffic of the
              // worker run beyond the raw run's (the controllers, sim-node and this benchmark
              // watch in both), per Job, by kind.
              "worker_watch_per_job": beyond(&worker_api.watch, &raw_api.watch, 1.0),
              // Requests the worker run made beyond the raw run's, per Job, and the
              // milliseconds the apiserver spent serving them.
              "worker_requests_per_job": beyond(&worker_api.requests, &raw_api.requests, 1.0),
              "worker_request_ms_per_job": beyond(&worker_api.seconds, &raw_api.seconds, 1000.0),
              // Until the last Job was seen: pods the job controller made meanwhile show here.
              "worker_requests_per_job_until_jobs_seen": beyond(&worker_window.requests, &raw_window.requests, 1.0)}))
}

/// What the worker's watches alone cost the apiserver, apart from everything else the worker
/// does (its creates, the broker, its CPU on shared cores): `--repeat` pairs of plain-client
/// runs on shared cores, alternating, one as in the creation test and one with
/// `--watch-copies` copies of the worker's two watches open from before the first create to
/// the end of the Jobs' whole start. The difference, divided by the copies, is what one
/// worker's watches cost the apiserver per Job; the copies make it large enough to measure.
pub async fn watch_cost(client: &kube::Client, args: &Args) -> anyhow::Result<serde_json::Value> {
    let copies = args.watch_copies;
    let (mut plain, mut watched) = (Sums::default(), Sums::default());
    // Each pair's apiserver CPU per Job over the whole start, plain and watched.
    let mut pairs = Vec::new();
    for pair in 1..=args.repeat.max(1) {
        let (p, w) = if pair % 2 == 1 {
            let p = raw_run(client, args, 0).await?;
            (p, raw_run(client, args, copies).await?)
        } else {
            let w = raw_run(client, args, copies).await?;
            (raw_run(client, args, 0).await?, w)
        };
        let per_job = |run: &Run| apiserver_seconds(&run.whole_cpu) * 1000.0 / args.burst as f64;
        let (p_ms, w_ms) = (per_job(&p), per_job(&w));
        eprintln!(
            "[bench] watch cost (pair {pair}): apiserver {p_ms:.2} ms per Job plain, {w_ms:.2} with {copies} copies of the worker's watches"
        );
        pairs.push((p_ms, w_ms));
        plain.add(&p);
        watched.add(&w);
    }
    let jobs = (args.burst * args.repeat.max(1)) as f64;
    let ms = |seconds: f64| seconds * 1000.0 / jobs;
    let per_copy = |with: f64, without: f64| round((ms(with) - ms(without)) / copies as f64);
    let (whole, window) = ((plain.whole_apiserver, watched.whole_apiserver), (plain.apiserver, watched.apiserver));
    let watch_per_copy: BTreeMap<String, f64> = watched
        .api
        .watch
        .iter()
        .map(|(k, v)| (k.clone(), round((v - plain.api.watch.get(k).copied().unwrap_or(0.0)) / jobs / copies as f64)))
        .filter(|(_, v)| v.abs() >= 0.01)
        .collect();
    // The standard error of one copy's cost, from the spread of the pairs' differences.
    let n = pairs.len() as f64;
    let diffs: Vec<f64> = pairs.iter().map(|(p, w)| (w - p) / copies as f64).collect();
    let mean = diffs.iter().sum::<f64>() / n;
    let variance = diffs.iter().map(|d| (d - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
    Ok(json!({"jobs": args.burst, "pairs": args.repeat.max(1), "copies": copies, "cores": "shared",
              // The apiserver's CPU per Job over the Jobs' whole start (idle subtracted).
              "apiserver_ms_per_job_whole_plain": round(ms(whole.0)),
              "apiserver_ms_per_job_whole_watched": round(ms(whole.1)),
              "apiserver_ms_per_job_whole_one_copy": per_copy(whole.1, whole.0),
              "apiserver_ms_per_job_whole_one_copy_standard_error": round((variance / n).sqrt()),
              "apiserver_ms_per_job_whole_by_pair": pairs.iter().map(|(p, w)| json!({"plain": round(*p), "watched": round(*w)})).collect::<Vec<_>>(),
              // The same until the last Job was seen.
              "apiserver_ms_per_job_until_jobs_seen_plain": round(ms(window.0)),
              "apiserver_ms_per_job_until_jobs_seen_watched": round(ms(window.1)),
              "apiserver_ms_per_job_until_jobs_seen_one_copy": per_copy(window.1, window.0),
              "watch_per_job_one_copy": watch_per_copy,
              // Plain runs' time over watched runs' time, to the last Job seen.
              "rate_watched_to_plain_pooled": round(plain.seconds / watched.seconds)}))
}

/// Running sums over the plain-client runs of one kind.
#[derive(Default)]
struct Sums {
    seconds: f64,
    apiserver: f64,
    whole_apiserver: f64,
    api: apiserver::Snapshot,
}

impl Sums {
    fn add(&mut self, run: &Run) {
        self.seconds += run.seconds;
        self.apiserver += apiserver_seconds(&run.cpu);
        self.whole_apiserver += apiserver_seconds(&run.whole_cpu);
        self.api.add(&run.apiserver);
    }
}

/// The apiserver's CPU seconds in one run's figures.
fn apiserver_seconds(cpu: &serde_json::Value) -> f64 {
    cpu.get("kube-apiserver").and_then(serde_json::Value::as_f64).unwrap_or(0.0)
}

/// Adds one run's CPU seconds by process to a running sum.
fn add_cpu(sum: &mut BTreeMap<String, f64>, cpu: &serde_json::Value) {
    for (name, seconds) in cpu.as_object().into_iter().flatten() {
        *sum.entry(name.clone()).or_default() += seconds.as_f64().unwrap_or(0.0);
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
        let cpu = self.cpu.since(dir, self.procs);
        let window = apiserver::Snapshot::now(dir).await?.since(&self.apiserver);
        let running = env.wait_running(args.burst, std::time::Duration::from_secs(600)).await?;
        let to_running = running.duration_since(self.started).as_secs_f64();
        cpu::quiesce(dir).await;
        let whole_seconds = self.started.elapsed().as_secs_f64();
        let whole_cpu = self.idle.subtract(&self.cpu.since(dir, self.procs), whole_seconds);
        let apiserver = apiserver::Snapshot::now(dir).await?.since(&self.apiserver);
        Ok(Run { seconds, to_running, cpu, whole_cpu, pipeline, apiserver, window })
    }
}
