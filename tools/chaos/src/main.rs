//! chaos: runs several worker replicas against the local environment under a load of mixed
//! jobs while killing, freezing and restarting things, then counts what was lost or doubled.
//! Run through `scripts/chaos` (which brings the environment up).

mod deleter;
mod tally;

use std::{
    collections::HashMap,
    process::{Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use clap::Parser;
use k8s_job_worker_testkit::{
    cluster::{create_namespace, drop_namespace},
    Names, WorkerProcess, WorkerSpec,
};
use serde_json::json;
use tokio::sync::Mutex;

/// Settings of a chaos run.
#[derive(Parser, Debug, Clone)]
#[command(about = "Chaos run: replicas killed, frozen, broker and apiserver restarted; counts lost and duplicate jobs")]
pub struct Args {
    /// Number of job requests.
    #[arg(long, default_value_t = 60)]
    jobs: usize,
    /// Worker replicas.
    #[arg(long, default_value_t = 3)]
    replicas: usize,
    /// Seconds between SIGKILLs of a random replica.
    #[arg(long, default_value_t = 6)]
    kill_every_seconds: u64,
    /// Lease duration given to the workers.
    #[arg(long, default_value_t = 5)]
    lease_seconds: u64,
    /// Seconds a replica is frozen with SIGSTOP (longer than the lease).
    #[arg(long, default_value_t = 12)]
    stop_seconds: u64,
    /// Seconds over which requests are published.
    #[arg(long, default_value_t = 40)]
    publish_seconds: u64,
    /// Give up waiting for terminal events after this many seconds.
    #[arg(long, default_value_t = 300)]
    timeout_seconds: u64,
    /// Seconds kube-apiserver stays down when it is restarted: longer than the workers' delivery
    /// budget (delivery limit × retry window), so nothing may be parked for it.
    #[arg(long, default_value_t = 15)]
    apiserver_down_seconds: u64,
    /// The workers' retry window (AMQP_RETRY_WINDOW_SECONDS) and delivery limit: small, so the
    /// outage above is longer than a request's whole delivery budget.
    #[arg(long, default_value_t = 2)]
    retry_window_seconds: u64,
    /// See `--retry-window-seconds`.
    #[arg(long, default_value_t = 3)]
    delivery_limit: u32,
    /// One finished Job in this many is deleted at once by "someone else" (an admin, a TTL
    /// set by hand), racing the reporter and its handovers (not around the apiserver outage:
    /// what finishes and vanishes while no watch is connected cannot be known by anyone).
    #[arg(long, default_value_t = 3)]
    delete_finished_one_in: usize,
    /// One request in this many is published again after its job finished and was cleaned up:
    /// it must be answered from its record, never run again.
    #[arg(long, default_value_t = 5)]
    redeliver_one_in: usize,
    /// The environment script (for restarting kube-apiserver).
    #[arg(long, default_value = "scripts/testenv")]
    testenv: String,
    /// Skip the broker restart (e.g. when the broker is not local).
    #[arg(long)]
    no_broker_restart: bool,
    /// Repeated terminal events allowed (all must share one event id); default 1 % of the
    /// requests, rounded up.
    #[arg(long)]
    allowed_duplicates: Option<usize>,
    /// Write the figures as JSON here.
    #[arg(long)]
    json_out: Option<std::path::PathBuf>,
    /// AMQP URL.
    #[arg(long, env = "AMQP_URL")]
    amqp_url: String,
    /// The workers' RUST_LOG.
    #[arg(long, default_value = "info")]
    worker_log: String,
}

/// A tiny xorshift generator: reproducible chaos without another dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n.max(1) as u64) as usize
    }
}

/// The worker replicas, restarted under new ids after each kill.
struct Replicas {
    spec: WorkerSpec,
    running: Vec<Option<WorkerProcess>>,
    generation: usize,
}

impl Replicas {
    fn start(&mut self, i: usize) -> anyhow::Result<()> {
        self.generation += 1;
        let id = format!("chaos-r{i}-g{}", self.generation);
        self.running[i] = Some(self.spec.spawn(&id, 0)?);
        Ok(())
    }

    fn signal(&self, i: usize, sig: i32) {
        if let Some(worker) = &self.running[i] {
            worker.signal(sig);
        }
    }

    fn kill(&mut self, i: usize) {
        if let Some(mut worker) = self.running[i].take() {
            worker.kill();
        }
    }

    fn stop_all(&mut self) {
        for worker in self.running.iter_mut().flatten() {
            worker.signal(libc::SIGCONT);
            let _ = worker.terminate();
        }
    }
}

/// What a request is expected to end as.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Kind {
    Success,
    Failure,
    Oom,
    Cancel,
}

/// A request whose tool notes every run in `<runs>/<job id>` (sim-node runs it locally).
fn request(job_id: &str, kind: Kind, n: usize, runs: &std::path::Path) -> serde_json::Value {
    let (tool, limit) = match kind {
        Kind::Success => (format!("sleep {}; echo ok", 1 + n % 3), None),
        Kind::Failure => ("echo failing >&2; exit 3".into(), None),
        Kind::Oom => ("head -c 400M /dev/zero | tail".into(), Some(json!(0.1))),
        Kind::Cancel => ("sleep 60".into(), None),
    };
    let command = format!("echo run >> {}; {tool}", runs.join(job_id).display());
    json!({"schema": "k8s-job-worker/job-request/v1", "job_id": job_id, "command_line": command,
           "image": "busybox", "max_pod_retrials": 0, "limits_memory": limit})
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    tracing_subscriber::fmt().with_env_filter("warn,lapin=off").init();
    let args = Args::parse();
    let run = format!("chaos-{}", jiff::Timestamp::now().as_second());
    let client = kube::Client::try_default().await.context("KUBECONFIG")?;
    create_namespace(&client, &run).await?;

    let names = Names::new(&run);
    let tally = tally::Tally::start(args.amqp_url.clone(), names.clone(), format!("{run}.tally")).await?;
    let log_dir = std::env::temp_dir().join(&run);
    std::fs::create_dir_all(&log_dir)?;
    let runs = log_dir.join("runs");
    std::fs::create_dir_all(&runs)?;
    let mut spec = WorkerSpec::new(&args.amqp_url, &run, names);
    spec.bin = std::env::current_exe()?.with_file_name("k8s-job-worker");
    spec.instance_id = Some("chaos".into());
    spec.log_dir = log_dir.clone();
    spec.rust_log = args.worker_log.clone();
    spec.env = [
        ("K8S_JOB_TTL_SECS_AFTER_FINISHED", "1".to_string()),
        ("AMQP_RETRY_WINDOW_SECONDS", args.retry_window_seconds.to_string()),
        ("AMQP_DELIVERY_LIMIT", args.delivery_limit.to_string()),
        ("LEASE_SECONDS", args.lease_seconds.to_string()),
        ("SHUTDOWN_GRACE_SECONDS", "5".into()),
        ("AMQP_PREFETCH", "8".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let mut replicas = Replicas { spec, running: (0..args.replicas).map(|_| None).collect(), generation: 0 };
    for i in 0..args.replicas {
        replicas.start(i)?;
    }
    tally.wait_for_queues().await?;
    // Forged intents on the control queue (anyone with Galaxy's broker credentials can write
    // there): one carrying a privileged Job, one without the workers' seal. Nothing may come of
    // them but a dead letter.
    let forged = vec!["forged-1".to_string(), "forged-2".to_string()];
    let privileged = json!({"metadata": {"name": "galaxy-chaos-forged-1"}, "spec": {"template": {"spec": {
        "restartPolicy": "Never", "volumes": [{"name": "root", "hostPath": {"path": "/"}}],
        "containers": [{"name": "c", "image": "busybox", "command": ["/bin/sh", "-c", "echo owned"],
            "securityContext": {"privileged": true}, "volumeMounts": [{"name": "root", "mountPath": "/host"}]}]}}}});
    tally
        .publish_control(&json!({"schema": "k8s-job-worker/job-resubmit/v1", "job_id": "forged-1",
        "job_name": "galaxy-chaos-forged-1", "replaces_uid": "x", "job": privileged}))
        .await;
    tally
        .publish_control(&json!({"schema": "k8s-job-worker/job-resubmit/v1", "job_id": "forged-2",
        "job_name": "galaxy-chaos-forged-2", "fingerprint": "f", "replaces_uid": "x", "resubmission": 1, "seal": "00"}))
        .await;
    let replicas = Arc::new(Mutex::new(replicas));
    let deleter = Arc::new(deleter::Deleter::default());
    tokio::spawn(deleter.clone().run(client.clone(), run.clone(), args.delete_finished_one_in));
    let started = Instant::now();
    let mut rng = Rng(started.elapsed().as_nanos() as u64 | 0x9E37_79B9_7F4A_7C15);

    // The load, with cancels a few seconds after their request.
    let kinds = [Kind::Success, Kind::Success, Kind::Success, Kind::Failure, Kind::Oom, Kind::Success, Kind::Cancel];
    let mut expected: HashMap<String, Kind> = HashMap::new();
    let load = {
        let (tally, runs) = (tally.clone(), runs.clone());
        let plan: Vec<(String, Kind)> = (0..args.jobs)
            .map(|n| {
                let kind = kinds[n % kinds.len()];
                (format!("c{n}-{}", format!("{kind:?}").to_lowercase()), kind)
            })
            .collect();
        expected.extend(plan.iter().cloned());
        let gap = Duration::from_secs(args.publish_seconds) / args.jobs.max(1) as u32;
        tokio::spawn(async move {
            for (n, (job_id, kind)) in plan.into_iter().enumerate() {
                // A status storm: each job is asked for before its request is handled (a Galaxy
                // restarted while the workers have a backlog): `unknown`, never `lost`.
                tally.publish_status(&job_id).await;
                tally.publish_request(&request(&job_id, kind, n, &runs)).await;
                if kind == Kind::Cancel {
                    let tally = tally.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_secs(4)).await;
                        tally.publish_cancel(&job_id).await;
                    });
                }
                tokio::time::sleep(gap).await;
            }
        })
    };

    // The chaos.
    let publish = Duration::from_secs(args.publish_seconds);
    let mut recoveries = Vec::new();
    let mut next_kill = Instant::now() + Duration::from_secs(args.kill_every_seconds);
    let (mut frozen, mut broker_done, mut api_done) = (false, args.no_broker_restart, false);
    let mut kills = 0;
    while started.elapsed() < publish + Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let t = started.elapsed();
        if Instant::now() >= next_kill {
            let i = rng.next(args.replicas);
            let mut r = replicas.lock().await;
            r.kill(i);
            r.start(i)?;
            kills += 1;
            next_kill = Instant::now() + Duration::from_secs(args.kill_every_seconds);
        }
        if !frozen && t > publish / 5 {
            frozen = true;
            let i = rng.next(args.replicas);
            replicas.lock().await.signal(i, libc::SIGSTOP);
            let (replicas, secs) = (replicas.clone(), args.stop_seconds);
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(secs)).await;
                replicas.lock().await.signal(i, libc::SIGCONT);
            });
            eprintln!("[chaos] replica {i} frozen for {secs} s");
        }
        if !broker_done && t > publish * 2 / 5 {
            broker_done = true;
            eprintln!("[chaos] restarting RabbitMQ");
            let at = Instant::now();
            run_cmd(&args.testenv, &["restart", "rabbitmq"])?;
            recoveries.push(("rabbitmq", tally.probe("probe-broker", at).await));
        }
        if !api_done && t > publish * 3 / 5 {
            api_done = true;
            let down = args.apiserver_down_seconds.to_string();
            eprintln!("[chaos] stopping kube-apiserver for {down} s");
            deleter.pause(true);
            run_cmd(&args.testenv, &["restart", "kube-apiserver", "--down-seconds", &down])?;
            let at = Instant::now(); // back: how long until the workers serve again
            recoveries.push(("kube-apiserver", tally.probe("probe-apiserver", at).await));
            let deleter = deleter.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(15)).await; // every watch is back
                deleter.pause(false);
            });
        }
    }
    load.await?;
    eprintln!("[chaos] load published; waiting for terminal events");
    let deadline = Instant::now() + Duration::from_secs(args.timeout_seconds);
    while Instant::now() < deadline && tally.without_terminal(expected.keys()).await > 0 {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await; // late duplicates, if any
    let before_redelivery = Instant::now();

    // Requests published again once their job finished and was cleaned up (an ack lost after
    // its confirm, a republish by Galaxy): answered from their records, never run again.
    let again: Vec<(String, Kind)> = expected
        .iter()
        .filter(|(id, _)| chaos_index(id) % args.redeliver_one_in.max(1) == 0)
        .map(|(id, k)| (id.clone(), *k))
        .collect();
    eprintln!("[chaos] publishing {} finished requests again", again.len());
    for (id, kind) in &again {
        tally.publish_request(&request(id, *kind, chaos_index(id), &runs)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(args.timeout_seconds);
    while Instant::now() < deadline
        && tally.answered_again(again.iter().map(|(id, _)| id), before_redelivery).await < again.len()
    {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;

    let redelivered: Vec<String> = again.into_iter().map(|(id, _)| id).collect();
    let outcome = tally::Outcome {
        kills,
        recoveries: &recoveries,
        runs: &runs,
        redelivered: &redelivered,
        before_redelivery,
        deleted_by_others: deleter.count(),
        forged: &forged,
    };
    let report = tally::report(&client, &run, &tally, &expected, &outcome).await?;
    // Last, the namespace is deleted while the workers run: nothing of theirs may hold it. How
    // long the namespace itself takes is Kubernetes' (its controller backs off exponentially
    // while the garbage collector empties a namespace of ~1,200 Jobs and records).
    let deletion = delete_namespace(&client, &run, NAMESPACE_LIMIT).await;
    replicas.lock().await.stop_all();
    println!("{}", report.table());
    match deletion.gone {
        Some(took) => println!("{:<44} {:.1}", "namespace deleted at the end, in (s)", took.as_secs_f64()),
        None => println!("{:<44} not within {} s", "namespace deleted at the end, in (s)", NAMESPACE_LIMIT.as_secs()),
    }
    println!("{:<44} {:.1}", "  ... last seen held by the finalizer at (s)", deletion.held_until.as_secs_f64());
    let namespace_gone = deletion.gone.is_some() && deletion.held_until <= HELD_LIMIT;
    if let Some(path) = &args.json_out {
        std::fs::write(path, serde_json::to_string_pretty(&report.json())?)?;
    }
    tally.cleanup().await;
    drop_namespace(&client, &run).await;
    eprintln!("[chaos] worker logs: {}", log_dir.display());
    let allowed = args.allowed_duplicates.unwrap_or(args.jobs.div_ceil(100));
    if report.passed(allowed) && namespace_gone {
        println!("chaos: PASS");
        Ok(())
    } else {
        anyhow::bail!("chaos: FAIL")
    }
}

/// How long the namespace may take to go at the end.
const NAMESPACE_LIMIT: Duration = Duration::from_secs(180);
/// How long after the namespace's deletion began a Job may still carry the workers' finalizer.
const HELD_LIMIT: Duration = Duration::from_secs(10);

/// How a namespace deletion went.
struct Deletion {
    /// How long until the namespace was gone, if it went within the limit.
    gone: Option<Duration>,
    /// When a Job of it was last seen carrying the workers' finalizer (zero: never).
    held_until: Duration,
}

/// Deletes the namespace (nothing released by hand) and waits until it is gone, noting when a
/// Job was last seen held by the workers' finalizer.
async fn delete_namespace(client: &kube::Client, name: &str, limit: Duration) -> Deletion {
    use k8s_openapi::api::{batch::v1::Job, core::v1::Namespace};
    let namespaces: kube::Api<Namespace> = kube::Api::all(client.clone());
    let jobs: kube::Api<Job> = kube::Api::namespaced(client.clone(), name);
    let started = Instant::now();
    let mut deletion = Deletion { gone: None, held_until: Duration::ZERO };
    if namespaces.delete(name, &Default::default()).await.is_err() {
        return deletion;
    }
    while started.elapsed() < limit {
        match namespaces.get_opt(name).await {
            Ok(None) => {
                deletion.gone = Some(started.elapsed());
                return deletion;
            }
            Ok(Some(_)) => {}
            Err(_) => return deletion,
        }
        if let Ok(list) = jobs.list_metadata(&Default::default()).await {
            let held = list.items.iter().any(|j| {
                j.metadata.finalizers.as_ref().is_some_and(|f| f.iter().any(|f| f.starts_with("k8s-job-worker/")))
            });
            if held {
                deletion.held_until = started.elapsed();
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    deletion
}

/// The number in a chaos job id (`c12-success` → 12).
fn chaos_index(job_id: &str) -> usize {
    job_id.trim_start_matches('c').split('-').next().and_then(|n| n.parse().ok()).unwrap_or(0)
}

fn run_cmd(cmd: &str, args: &[&str]) -> anyhow::Result<()> {
    let status =
        Command::new(cmd).args(args).stdout(Stdio::null()).status().with_context(|| format!("running {cmd}"))?;
    anyhow::ensure!(status.success(), "{cmd} {args:?} failed: {status}");
    Ok(())
}
