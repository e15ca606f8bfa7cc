//! Creation throughput: the worker against a plain client creating the same Jobs with the
//! same concurrency, in repeated pairs, on shared or split cores.

use std::collections::BTreeMap;

use anyhow::Context as _;
use serde_json::json;

use crate::{apiserver, cpu, load, pin, round, Args};

/// One timed run: how long N Jobs took, the CPU seconds each process used meanwhile, and
/// (for the worker) where a request's time went inside it.
struct Run {
    seconds: f64,
    cpu: serde_json::Value,
    pipeline: serde_json::Value,
    /// Jobs and pods the apiserver sent on all watches during the run.
    watch: apiserver::WatchTraffic,
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
    let (mut runs, mut ratios, mut seconds) = (Vec::new(), Vec::new(), (0.0, 0.0));
    let (mut raw_cpu, mut worker_cpu) = (BTreeMap::new(), BTreeMap::new());
    let (mut raw_watch, mut worker_watch) = (apiserver::WatchTraffic::default(), apiserver::WatchTraffic::default());
    for pair in 1..=args.repeat.max(1) {
        // Alternate which run goes first, so a drift over the pairs weighs on both alike.
        let (raw, worker) = if pair % 2 == 1 {
            let raw = raw_run(client, args).await?;
            (raw, worker_run(client, args, &mut pinned, split).await?)
        } else {
            let worker = worker_run(client, args, &mut pinned, split).await?;
            (raw_run(client, args).await?, worker)
        };
        let (raw_rate, worker_rate) = (args.burst as f64 / raw.seconds, args.burst as f64 / worker.seconds);
        eprintln!("[bench] creation ({cores} cores, run {pair}): raw {raw_rate:.0}/s, worker {worker_rate:.0}/s");
        ratios.push(worker_rate / raw_rate);
        seconds = (seconds.0 + raw.seconds, seconds.1 + worker.seconds);
        runs.push(json!({"raw_jobs_per_s": round(raw_rate), "worker_jobs_per_s": round(worker_rate),
                         "ratio": round(worker_rate / raw_rate), "worker_pipeline": worker.pipeline}));
        add_cpu(&mut raw_cpu, &raw.cpu);
        add_cpu(&mut worker_cpu, &worker.cpu);
        (raw_watch.events, raw_watch.bytes) = (raw_watch.events + raw.watch.events, raw_watch.bytes + raw.watch.bytes);
        (worker_watch.events, worker_watch.bytes) =
            (worker_watch.events + worker.watch.events, worker_watch.bytes + worker.watch.bytes);
    }
    // CPU milliseconds per Job, by process, over all runs.
    let jobs = (args.burst * args.repeat.max(1)) as f64;
    let per_job = |sum: BTreeMap<String, f64>| -> BTreeMap<String, f64> {
        sum.into_iter().map(|(name, s)| (name, round(s * 1000.0 / jobs))).collect()
    };
    ratios.sort_by(f64::total_cmp);
    Ok(json!({"jobs": args.burst, "concurrency": args.concurrency, "cores": cores, "broker_pinned": broker_pinned,
              "ratio_worker_to_raw_median": round(ratios[ratios.len() / 2]),
              // All runs' Jobs over all runs' time, raw against worker.
              "ratio_pooled": round(seconds.0 / seconds.1),
              "ratio_min": round(ratios[0]), "ratio_max": round(ratios[ratios.len() - 1]), "runs": runs,
              "cpu_ms_per_job_raw_run": per_job(raw_cpu), "cpu_ms_per_job_worker_run": per_job(worker_cpu),
              // What the apiserver sent on the worker's own watches: all watch traffic of the
              // worker run beyond the raw run's (the controllers and sim-node watch in both).
              "worker_watch_events_per_job": round((worker_watch.events - raw_watch.events) / jobs),
              "worker_watch_bytes_per_job": round((worker_watch.bytes - raw_watch.bytes) / jobs)}))
}

/// Adds one run's CPU seconds by process to a running sum.
fn add_cpu(sum: &mut BTreeMap<String, f64>, cpu: &serde_json::Value) {
    for (name, seconds) in cpu.as_object().into_iter().flatten() {
        *sum.entry(name.clone()).or_default() += seconds.as_f64().unwrap_or(0.0);
    }
}

/// The plain client's run, in its own namespace.
async fn raw_run(client: &kube::Client, args: &Args) -> anyhow::Result<Run> {
    let me = std::process::id();
    let mut env = load::Env::new(client, args, "bench-raw").await?;
    cpu::quiesce(&args.testenv_dir).await;
    let watch = apiserver::WatchTraffic::now(&args.testenv_dir).await?;
    let before = cpu::CpuSample::take(&args.testenv_dir, &[("client", me)]);
    let seconds = env.raw_creates(args.burst, args.concurrency).await?.as_secs_f64();
    let cpu = before.since(&args.testenv_dir, &[("client", me)]);
    let watch = apiserver::WatchTraffic::now(&args.testenv_dir).await?.since(watch);
    env.finish().await;
    Ok(Run { seconds, cpu, pipeline: serde_json::Value::Null, watch })
}

/// The worker's run, in its own namespace with its own queues.
async fn worker_run(client: &kube::Client, args: &Args, pinned: &mut pin::Pinned, split: bool) -> anyhow::Result<Run> {
    let me = std::process::id();
    let mut env = load::Env::new(client, args, "bench-burst").await?;
    env.start_worker(args).await?;
    let worker_pid = env.worker_pid().unwrap_or(0);
    if split {
        pinned.pin(worker_pid, 1).context("pinning the worker")?;
    }
    let procs = [("client", me), ("worker", worker_pid)];
    cpu::quiesce(&args.testenv_dir).await;
    let watch = apiserver::WatchTraffic::now(&args.testenv_dir).await?;
    let before = cpu::CpuSample::take(&args.testenv_dir, &procs);
    let seconds = env.burst(args.burst).await?.as_secs_f64();
    let cpu = before.since(&args.testenv_dir, &procs);
    let watch = apiserver::WatchTraffic::now(&args.testenv_dir).await?.since(watch);
    // Where a request's time goes inside the worker (means from its own histograms).
    let pipeline = json!({
        "mean_delivery_to_job_ms": env.worker_metric_mean_ms("k8s_job_worker_request_to_job_seconds").await.map(round),
        "mean_publish_confirm_ms": env.worker_metric_mean_ms("k8s_job_worker_publish_confirm_seconds").await.map(round),
    });
    env.finish().await;
    Ok(Run { seconds, cpu, pipeline, watch })
}
