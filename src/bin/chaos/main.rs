//! chaos: runs several worker replicas against the local environment under a load of mixed
//! jobs while killing, freezing and restarting things, then counts what was lost or doubled.
//! Run through `scripts/chaos` (which brings the environment up).

mod tally;

use std::{
    collections::HashMap,
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use clap::Parser;
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use kube::api::{Api, PostParams};
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

/// The worker replicas.
struct Replicas {
    bin: std::path::PathBuf,
    env: Vec<(String, String)>,
    children: Vec<Option<Child>>,
    generation: usize,
    log_dir: std::path::PathBuf,
}

impl Replicas {
    fn start(&mut self, i: usize) -> anyhow::Result<()> {
        self.generation += 1;
        let id = format!("chaos-r{i}-g{}", self.generation);
        let log = std::fs::File::create(self.log_dir.join(format!("{id}.log")))?;
        let child = Command::new(&self.bin)
            .args(["--log-format", "json", "run"])
            .envs(self.env.iter().cloned())
            .env("WORKER_ID", &id)
            .env("HTTP_LISTEN", "127.0.0.1:0")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        self.children[i] = Some(child);
        Ok(())
    }

    fn signal(&mut self, i: usize, sig: i32) {
        if let Some(child) = &self.children[i] {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(child.id() as i32, sig) };
        }
    }

    fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.children[i].take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn stop_all(&mut self) {
        for i in 0..self.children.len() {
            self.signal(i, libc::SIGCONT);
            self.signal(i, libc::SIGTERM);
        }
        for child in self.children.iter_mut().flatten() {
            let _ = child.wait();
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

fn request(job_id: &str, kind: Kind, n: usize) -> serde_json::Value {
    let (command, limit) = match kind {
        Kind::Success => (format!("sleep {}; echo ok", 1 + n % 3), None),
        Kind::Failure => ("echo failing >&2; exit 3".into(), None),
        Kind::Oom => ("head -c 400M /dev/zero | tail".into(), Some(json!(0.1))),
        Kind::Cancel => ("sleep 60".into(), None),
    };
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
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces.create(&PostParams::default(), &serde_json::from_value(json!({"metadata": {"name": run}}))?).await?;
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), &run);
    while sas.get_opt("default").await?.and_then(|sa| sa.secrets).is_none_or(|s| s.is_empty()) {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let names = tally::Names::new(&run);
    let tally = Arc::new(tally::Tally::start(args.amqp_url.clone(), names.clone()).await?);
    let bin = std::env::current_exe()?.with_file_name("k8s-job-worker");
    let log_dir = std::env::temp_dir().join(&run);
    std::fs::create_dir_all(&log_dir)?;
    let env: Vec<(String, String)> = [
        ("AMQP_URL", args.amqp_url.clone()),
        ("K8S_NAMESPACE", run.clone()),
        ("K8S_GALAXY_INSTANCE_ID", "chaos".into()),
        ("K8S_CLEANUP_JOB", "never".into()),
        ("LEASE_SECONDS", args.lease_seconds.to_string()),
        ("SHUTDOWN_GRACE_SECONDS", "5".into()),
        ("AMQP_PREFETCH", "8".into()),
        ("AMQP_REQUEST_QUEUE", names.requests.clone()),
        ("AMQP_CONTROL_QUEUE", names.control.clone()),
        ("AMQP_RESULT_EXCHANGE", names.events.clone()),
        ("AMQP_DEAD_LETTER_EXCHANGE", names.dlx.clone()),
        ("AMQP_DEAD_LETTER_QUEUE", names.dlq.clone()),
        ("RUST_LOG", "info".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let mut replicas = Replicas {
        bin,
        env,
        children: (0..args.replicas).map(|_| None).collect(),
        generation: 0,
        log_dir: log_dir.clone(),
    };
    for i in 0..args.replicas {
        replicas.start(i)?;
    }
    tally.wait_for_queues().await?;
    let replicas = Arc::new(Mutex::new(replicas));
    let started = Instant::now();
    let mut rng = Rng(started.elapsed().as_nanos() as u64 | 0x9E37_79B9_7F4A_7C15);

    // The load, with cancels a few seconds after their request.
    let kinds = [Kind::Success, Kind::Success, Kind::Success, Kind::Failure, Kind::Oom, Kind::Success, Kind::Cancel];
    let mut expected: HashMap<String, Kind> = HashMap::new();
    let load = {
        let tally = tally.clone();
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
                tally.publish_request(&request(&job_id, kind, n)).await;
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
            run_cmd("rabbitmqctl", &["stop_app"])?;
            run_cmd("rabbitmqctl", &["start_app"])?;
            recoveries.push(("rabbitmq", tally.probe("probe-broker", at).await));
        }
        if !api_done && t > publish * 3 / 5 {
            api_done = true;
            eprintln!("[chaos] restarting kube-apiserver");
            let at = Instant::now();
            run_cmd(&args.testenv, &["restart", "kube-apiserver"])?;
            recoveries.push(("kube-apiserver", tally.probe("probe-apiserver", at).await));
        }
    }
    load.await?;
    eprintln!("[chaos] load published; waiting for terminal events");
    let deadline = Instant::now() + Duration::from_secs(args.timeout_seconds);
    while Instant::now() < deadline && tally.without_terminal(expected.keys()).await > 0 {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await; // late duplicates, if any
    replicas.lock().await.stop_all();

    let report = tally::report(&client, &run, &tally, &expected, kills, &recoveries).await?;
    println!("{}", report.table());
    if let Some(path) = &args.json_out {
        std::fs::write(path, serde_json::to_string_pretty(&report.json())?)?;
    }
    tally.cleanup().await;
    let _ = namespaces.delete(&run, &Default::default()).await;
    eprintln!("[chaos] worker logs: {}", log_dir.display());
    let allowed = args.allowed_duplicates.unwrap_or(args.jobs.div_ceil(100));
    if report.passed(allowed) {
        println!("chaos: PASS");
        Ok(())
    } else {
        anyhow::bail!("chaos: FAIL")
    }
}

fn run_cmd(cmd: &str, args: &[&str]) -> anyhow::Result<()> {
    let status =
        Command::new(cmd).args(args).stdout(Stdio::null()).status().with_context(|| format!("running {cmd}"))?;
    anyhow::ensure!(status.success(), "{cmd} {args:?} failed: {status}");
    Ok(())
}
