//! bench: how fast the worker turns messages into Jobs and outcomes into events, what it
//! costs the apiserver to track running Jobs, and how much memory it needs. Prints a table
//! and writes the same figures as JSON. Run through `scripts/bench`.

mod apiserver;
mod cpu;
mod creation;
mod load;
mod memory;
mod pin;

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use clap::Parser;
use serde_json::json;

/// Benchmark sizes (every one is a flag).
#[derive(Parser, Debug, Clone)]
#[command(about = "Throughput, latency, tracking cost and memory of k8s-job-worker on the local environment")]
pub struct Args {
    /// Requests published at once for the creation-throughput test (0: no such test).
    #[arg(long, default_value_t = 1000)]
    burst: usize,
    /// Requests sent one at a time for the latency test (0: no such test).
    #[arg(long, default_value_t = 200)]
    sequential: usize,
    /// Jobs held running for the tracking-cost and memory test: one size, or several
    /// (`5000,20000`): the worker's memory is read at each, the per-Job slope between the
    /// smallest and the largest, and at the largest a fresh replica's initial list and a
    /// re-list after an apiserver restart are measured (0: no such test).
    #[arg(long, value_delimiter = ',', default_value = "5000")]
    tracked: Vec<usize>,
    /// Length of the quiet period in which apiserver requests are counted, in seconds.
    #[arg(long, default_value_t = 60)]
    quiet_seconds: u64,
    /// Concurrent creates (the worker's prefetch, and the raw client's concurrency).
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// How the creation runs share the CPUs: `shared` (every process on every core), `split`
    /// (control plane on core 0; this client, the worker and the broker on core 1), `both`, or
    /// `none`.
    #[arg(long, value_enum, default_value = "both")]
    cores: Cores,
    /// Raw / worker run pairs per CPU arrangement (the ratio reported is their median).
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Copies of the worker's watches opened on a plain client's run to measure what
    /// watching alone costs the apiserver (section 7, `--repeat` pairs on shared cores; 0: no
    /// such test).
    #[arg(long, default_value_t = 0)]
    watch_copies: usize,
    /// Adds a third run to every creation pair: a relay in this process that keeps the
    /// message contract through the worker's own adapters (consume, create, confirmed
    /// `submitted` event, ack) and does nothing else — the most any worker that keeps the
    /// contract could reach on these cores.
    #[arg(long)]
    relay: bool,
    /// The worker binary to measure (default: the one built beside this benchmark), e.g. an
    /// earlier build for an A/B comparison on the same machine.
    #[arg(long)]
    worker_bin: Option<std::path::PathBuf>,
    /// Write the figures as JSON here.
    #[arg(long, default_value = "target/bench.json")]
    json_out: std::path::PathBuf,
    /// AMQP URL.
    #[arg(long, env = "AMQP_URL")]
    amqp_url: String,
    /// Directory with the environment's PKI and admin token (for the apiserver's /metrics).
    #[arg(long, env = "TESTENV_DIR")]
    testenv_dir: std::path::PathBuf,
}

/// CPU arrangements for the creation runs.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq)]
pub enum Cores {
    /// Every process may run on every core.
    Shared,
    /// The control plane on core 0, the client side on core 1.
    Split,
    /// Both, one after the other.
    Both,
    /// No creation pairs (e.g. to measure only what watching costs, `--watch-copies`).
    None,
}

/// p50 / p99 / max of a sample, in milliseconds.
pub fn percentiles(mut samples: Vec<Duration>) -> serde_json::Value {
    if samples.is_empty() {
        return json!(null);
    }
    samples.sort();
    let at = |q: f64| samples[((samples.len() as f64 * q).ceil() as usize).saturating_sub(1).min(samples.len() - 1)];
    let ms = |d: Duration| (d.as_secs_f64() * 10_000.0).round() / 10.0;
    json!({"p50_ms": ms(at(0.50)), "p99_ms": ms(at(0.99)), "max_ms": ms(at(1.0)), "n": samples.len()})
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    tracing_subscriber::fmt().with_env_filter("warn").init();
    let args = Args::parse();
    // On Ctrl-C or SIGTERM the benchmark future is dropped, and with it the CPU pinning of
    // the control plane and the broker: the machine is left as it was found.
    tokio::select! {
        result = run(args) => result,
        _ = k8s_job_worker::shutdown::signal() => anyhow::bail!("interrupted"),
    }
}

/// All the measurements, in order.
async fn run(args: Args) -> anyhow::Result<()> {
    let client = kube::Client::try_default().await.context("KUBECONFIG")?;
    let mut figures: BTreeMap<&str, serde_json::Value> = BTreeMap::new();
    figures.insert("machine", json!({"cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)}));

    // 1. Creation throughput: the worker vs a plain client, same concurrency.
    if args.burst > 0 && matches!(args.cores, Cores::Shared | Cores::Both) {
        figures.insert("1_creation_shared_cores", creation::creation(&client, &args, false).await?);
    }
    if args.burst > 0
        && matches!(args.cores, Cores::Split | Cores::Both)
        && figures["machine"]["cpus"].as_u64().unwrap_or(0) >= 2
    {
        figures.insert("1_creation_split_cores", creation::creation(&client, &args, true).await?);
    }

    // 7. What the worker's watches alone cost the apiserver.
    if args.burst > 0 && args.watch_copies > 0 {
        figures.insert("7_watch_cost", creation::watch_cost(&client, &args).await?);
    }

    // 2. Latency at low load.
    if args.sequential > 0 {
        let mut env = load::Env::new(&client, &args, "bench-latency").await?;
        env.start_worker(&args).await?;
        let (to_job, to_event) = env.sequential(args.sequential).await?;
        env.finish().await;
        figures.insert("2_publish_to_job_exists", percentiles(to_job));
        figures.insert("2_pod_terminal_to_event", percentiles(to_event));
    }

    // 3 + 4. Tracking cost and memory with M held jobs (at each size).
    let mut sizes = args.tracked.clone();
    sizes.sort_unstable();
    sizes.dedup();
    let largest = sizes.last().copied().unwrap_or(0);
    if largest == 0 {
        return report(&args, &figures);
    }
    let mut env = load::Env::new(&client, &args, "bench-track").await?;
    env.start_worker(&args).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss_idle = env.worker_rss_kib();
    let mut rss_at = Vec::new();
    let started = Instant::now();
    for &size in &sizes {
        env.hold(size).await?;
        eprintln!("[bench] {size} jobs running after {:.0} s", started.elapsed().as_secs_f64());
        rss_at.push((size, memory::settled_rss(&env).await));
    }
    figures.insert("5_watch_decode", env.decode_cost().await?);
    figures.insert(
        "6_sweep_cost",
        json!({"running_jobs": largest, "per_list": env.sweep_cost(&args.testenv_dir, 20).await?}),
    );
    eprintln!("[bench] quiet period");
    let quiet = Duration::from_secs(args.quiet_seconds);
    let with_worker = apiserver::requests_during(&args.testenv_dir, quiet).await?;
    let initial_list = memory::fresh_replica(&env, &args).await?;
    let relist = memory::after_apiserver_restart(&mut env, &args).await?;
    env.stop_worker();
    let memory = memory::report(rss_idle, &rss_at, initial_list, relist);
    eprintln!("[bench] memory: {memory}");
    let without_worker = apiserver::requests_during(&args.testenv_dir, quiet).await?;
    // Only what the worker touches counts: Jobs, pods (and their logs) and its Lease; the
    // rest is the apiserver's and the controllers' own background traffic.
    let worker_requests: apiserver::Counts = apiserver::difference(&with_worker, &without_worker)
        .into_iter()
        .filter(|(k, _)| ["jobs", "pods", "leases"].contains(&k.split(' ').nth(1).unwrap_or("")))
        .collect();
    let total: f64 = worker_requests.values().sum();
    figures.insert(
        "3_tracking_cost",
        json!({"running_jobs": largest, "quiet_seconds": args.quiet_seconds,
               "worker_requests_per_s": round(total / quiet.as_secs_f64()),
               "by_verb_resource_per_s": worker_requests.iter().map(|(k, v)| (k.clone(), round(v / quiet.as_secs_f64()))).collect::<BTreeMap<_, _>>(),
               "all_clients_with_worker_per_s": round(with_worker.values().sum::<f64>() / quiet.as_secs_f64()),
               "all_clients_without_worker_per_s": round(without_worker.values().sum::<f64>() / quiet.as_secs_f64())}),
    );
    figures.insert("4_memory", memory);
    report(&args, &figures)?;
    // Last: deleting thousands of held Jobs takes minutes, and the figures are out.
    env.finish().await;
    Ok(())
}

/// Prints the figures as a table and writes them as JSON.
fn report(args: &Args, figures: &BTreeMap<&str, serde_json::Value>) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(figures)?;
    if let Some(dir) = args.json_out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.json_out, &text)?;
    println!("{}", table(figures));
    println!("(JSON: {})", args.json_out.display());
    Ok(())
}

/// Rounds to two decimals for the report.
pub fn round(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn table(figures: &BTreeMap<&str, serde_json::Value>) -> String {
    let mut out = String::new();
    for (section, value) in figures {
        match value.as_object() {
            Some(map) => {
                for (k, v) in map {
                    out.push_str(&format!("{section:<28} {k:<36} {v}\n"));
                }
            }
            None => out.push_str(&format!("{section:<28} {value}\n")),
        }
    }
    out
}
