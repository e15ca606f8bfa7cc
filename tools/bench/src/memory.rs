//! The worker's memory: resident set at each tracked size, the per-Job slope between sizes,
//! the peak of a fresh replica's initial list, and what a re-list after an apiserver restart
//! leaves behind.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use k8s_job_worker_testkit::{
    worker::{free_port, proc_status_kib},
    WorkerProcess,
};
use serde_json::json;

use crate::{apiserver, load::Env, round, Args};

/// Resets a process's peak resident set (`VmHWM`) to its current one (Linux ≥ 4.0).
fn reset_peak(pid: u32) {
    let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
}

/// The worker's resident set once it settled: read after 15 s without new work (the last
/// of several readings one second apart).
pub async fn settled_rss(env: &Env) -> u64 {
    tokio::time::sleep(Duration::from_secs(5)).await;
    let mut rss = env.worker_rss_kib();
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        rss = env.worker_rss_kib();
    }
    rss
}

/// A fresh replica started beside the running one: its peak resident set until its watches
/// have listed every Job and pod (it is ready then), and its resident set once settled.
pub struct InitialList {
    peak_kib: u64,
    settled_kib: u64,
    seconds_to_sync: f64,
}

/// Starts a second replica of the same instance, measures its initial list, stops it.
pub async fn fresh_replica(env: &Env, args: &Args) -> anyhow::Result<InitialList> {
    let spec = env.worker_spec(args)?;
    let mut fresh: WorkerProcess = spec.spawn("bench-fresh-replica", free_port())?;
    let started = Instant::now();
    let ready = fresh.wait_ready(Duration::from_secs(600)).await;
    let seconds_to_sync = started.elapsed().as_secs_f64();
    let pid = fresh.pid().context("fresh replica exited")?;
    let peak_at_sync = proc_status_kib(pid, "VmHWM");
    anyhow::ensure!(ready, "the fresh replica did not become ready");
    tokio::time::sleep(Duration::from_secs(15)).await;
    let settled_kib = proc_status_kib(pid, "VmRSS");
    let peak_kib = proc_status_kib(pid, "VmHWM").max(peak_at_sync);
    let _ = fresh.terminate();
    Ok(InitialList { peak_kib, settled_kib, seconds_to_sync })
}

/// The worker before and after the apiserver restarts: its watches cannot resume from a
/// resourceVersion the new apiserver's cache does not hold, so they list again.
pub struct Relist {
    before_kib: u64,
    peak_kib: u64,
    after_kib: u64,
    /// Namespaced LIST requests of Jobs and pods the new apiserver served (the worker's: this
    /// client's own watches are stopped first).
    lists: f64,
}

/// Restarts the apiserver (`scripts/testenv restart kube-apiserver`) under the running
/// worker and measures its memory around the re-list.
pub async fn after_apiserver_restart(env: &mut Env, args: &Args) -> anyhow::Result<Relist> {
    env.stop_watching();
    let before_kib = settled_rss(env).await;
    let pid = env.worker_pid().context("worker not running")?;
    reset_peak(pid);
    let status = tokio::process::Command::new("scripts/testenv")
        .args(["restart", "kube-apiserver"])
        .status()
        .await
        .context("scripts/testenv restart kube-apiserver (run the benchmark from the repository's root)")?;
    anyhow::ensure!(status.success(), "restarting the apiserver failed");
    // Ready again once its watches listed everything.
    let worker = env.worker().context("worker not running")?;
    let deadline = Instant::now() + Duration::from_secs(300);
    tokio::time::sleep(Duration::from_secs(2)).await;
    while worker.get("/readyz").await.is_none_or(|(code, _)| code != 200) {
        anyhow::ensure!(Instant::now() < deadline, "the worker did not become ready after the apiserver restart");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let after_kib = settled_rss(env).await;
    let peak_kib = proc_status_kib(pid, "VmHWM");
    let lists = apiserver::namespaced_lists(&args.testenv_dir).await?;
    Ok(Relist { before_kib, peak_kib, after_kib, lists })
}

/// The memory section of the report.
pub fn report(idle_kib: u64, at: &[(usize, u64)], initial: InitialList, relist: Relist) -> serde_json::Value {
    let mib = |kib: u64| round(kib as f64 / 1024.0);
    let per_size: serde_json::Map<String, serde_json::Value> =
        at.iter().map(|(n, kib)| (n.to_string(), json!({"rss_mib": mib(*kib)}))).collect();
    let (first, last) = (at.first().copied().unwrap_or_default(), at.last().copied().unwrap_or_default());
    // Between two sizes when there are two; from idle when there is one.
    let (from_jobs, from_kib) = if at.len() > 1 { first } else { (0, idle_kib) };
    let slope = (last.1 as f64 - from_kib as f64) / (last.0 - from_jobs).max(1) as f64;
    json!({
        "rss_idle_mib": mib(idle_kib),
        "rss_by_tracked_jobs": per_size,
        "slope_kib_per_job": round(slope),
        "slope_between": format!("{from_jobs}..{}", last.0),
        "projected_rss_10k_mib": round((last.1 as f64 + slope * (10_000.0 - last.0 as f64)) / 1024.0),
        "projected_rss_50k_mib": round((last.1 as f64 + slope * (50_000.0 - last.0 as f64)) / 1024.0),
        "fresh_replica_initial_list": {
            "tracked_jobs": last.0,
            "peak_rss_mib": mib(initial.peak_kib),
            "settled_rss_mib": mib(initial.settled_kib),
            "seconds_to_ready": round(initial.seconds_to_sync),
        },
        "relist_after_apiserver_restart": {
            "rss_before_mib": mib(relist.before_kib),
            "peak_rss_mib": mib(relist.peak_kib),
            "rss_after_mib": mib(relist.after_kib),
            "after_over_before": round(relist.after_kib as f64 / relist.before_kib.max(1) as f64),
            "namespaced_list_requests": relist.lists,
        },
    })
}
