//! sim-node: a node simulator that plays the kubelet (and the scheduler) without containers.
//!
//! It registers a Ready Node, binds pending pods that fit it, runs each pod's container
//! command as a local process, reports Running / Succeeded / Failed with the real exit code,
//! enforces `limits.memory` as an `OOMKilled` termination, fakes image pull failures and
//! container configuration errors for matching image names, finalises deleted pods, and serves container logs on the kubelet
//! port so `GET .../pods/NAME/log` works through the apiserver.

mod claims;
mod logs;
mod node;
mod runner;
mod scheduler;

use std::{collections::HashMap, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context as _;
use clap::Parser;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::{
    runtime::{watcher, WatchStreamExt},
    Api, Client, ResourceExt,
};
use tokio::sync::Mutex;

/// Command-line settings of the simulator.
#[derive(Parser, Debug, Clone)]
#[command(version, about = "Simulated kubelet + scheduler for the k8s-job-worker test environment")]
pub struct Args {
    /// kubeconfig of an identity allowed to manage nodes and pods.
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: PathBuf,
    /// Name of the Node to register.
    #[arg(long, default_value = "sim-node")]
    node_name: String,
    /// Extra node labels, `key=value`, repeatable.
    #[arg(long = "label", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// Allocatable CPU of the node.
    #[arg(long, default_value = "64")]
    cpu: String,
    /// Allocatable memory of the node.
    #[arg(long, default_value = "256Gi")]
    memory: String,
    /// Maximum number of pods on the node.
    #[arg(long, default_value_t = 20000)]
    max_pods: u32,
    /// Port of the kubelet API (container logs), served with TLS on 127.0.0.1.
    #[arg(long, default_value_t = 10250)]
    port: u16,
    /// TLS certificate (PEM) for the kubelet port.
    #[arg(long)]
    tls_cert: PathBuf,
    /// TLS private key (PEM) for the kubelet port.
    #[arg(long)]
    tls_key: PathBuf,
    /// Directory for container logs and default working directories.
    #[arg(long, default_value = "/tmp/sim-node")]
    work_dir: PathBuf,
    /// Images whose name contains this text fail to pull (ErrImagePull, then ImagePullBackOff).
    #[arg(long, default_value = "does-not-exist")]
    pull_fail_pattern: String,
    /// Images whose name contains this text never start: CreateContainerConfigError (as for a
    /// missing ConfigMap), until the pod is deleted.
    #[arg(long, default_value = "config-error")]
    config_error_pattern: String,
    /// Interval between memory samples of a running container, in milliseconds.
    #[arg(long, default_value_t = 50)]
    memory_sample_ms: u64,
    /// Where claims live: claim `X` is `<pvc-root>/X`, and a pod's process sees only its claim
    /// mounts of them (a mount namespace of its own; needs root). Unset: claims are not mounted.
    #[arg(long)]
    pvc_root: Option<PathBuf>,
    /// The pods' (and the node's) IP, as their status says. Processes run on the host
    /// network, so a Service's endpoints reach them at this address; the endpoints controller
    /// refuses loopback addresses, so give the host's own (testenv does).
    #[arg(long, default_value = "127.0.0.1")]
    pod_ip: String,
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("label must be key=value, got {s:?}"))
}

/// Shared state of the simulator.
pub struct Sim {
    /// Kubernetes client.
    pub client: Client,
    /// Settings.
    pub args: Args,
    /// Running (or pulling/holding) pods by uid; dropping the sender stops the pod's task.
    pub pods: Mutex<HashMap<String, tokio::sync::oneshot::Sender<()>>>,
    /// Wakes the scheduler when something changed.
    pub reschedule: tokio::sync::Notify,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,kube=warn".into()),
        )
        .init();
    let mut args = Args::parse();
    // SAFETY: geteuid has no preconditions.
    if args.pvc_root.is_some() && unsafe { libc::geteuid() } != 0 {
        tracing::warn!("--pvc-root needs root (a mount namespace per pod): claims are not mounted");
        args.pvc_root = None;
    }
    let kubeconfig = kube::config::Kubeconfig::read_from(&args.kubeconfig)
        .with_context(|| format!("reading {}", args.kubeconfig.display()))?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await?;
    let client = Client::try_from(config)?;
    std::fs::create_dir_all(args.work_dir.join("logs"))?;

    let sim = Arc::new(Sim { client, args, pods: Mutex::new(HashMap::new()), reschedule: tokio::sync::Notify::new() });
    node::register(&sim).await.context("registering the node")?;
    tokio::spawn(node::heartbeat(sim.clone()));
    tokio::spawn(logs::serve(sim.clone()));

    let pods: Api<Pod> = Api::all(sim.client.clone());
    let (store, writer) = kube::runtime::reflector::store();
    let stream =
        kube::runtime::reflector(writer, watcher(pods, watcher::Config::default())).default_backoff().applied_objects();
    tokio::spawn(scheduler::run(sim.clone(), store));
    futures::pin_mut!(stream);
    tracing::info!(node = %sim.args.node_name, "sim-node running");
    while let Some(item) = stream.next().await {
        match item {
            Ok(pod) => on_pod(&sim, pod).await,
            Err(err) => {
                tracing::warn!(%err, "pod watch error");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
    Ok(())
}

/// Reacts to one observed pod: start it, finalise its deletion, or leave it to the scheduler.
async fn on_pod(sim: &Arc<Sim>, pod: Pod) {
    let bound_here = pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(&sim.args.node_name);
    if !bound_here {
        if pod.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_none() {
            sim.reschedule.notify_one();
        }
        return;
    }
    let uid = pod.uid().unwrap_or_default();
    if pod.metadata.deletion_timestamp.is_some() {
        runner::finalise_deletion(sim, &pod, &uid).await;
        sim.reschedule.notify_one();
        return;
    }
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref()).unwrap_or("Pending");
    if matches!(phase, "Succeeded" | "Failed") {
        return;
    }
    let mut running = sim.pods.lock().await;
    if running.contains_key(&uid) {
        return;
    }
    if phase == "Running" {
        // Running before this sim-node started: its process is gone, as after a node reboot.
        drop(running);
        runner::report_lost(sim, &pod).await;
        return;
    }
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
    running.insert(uid.clone(), stop_tx);
    drop(running);
    tokio::spawn(runner::run_pod(sim.clone(), pod, stop_rx));
}
