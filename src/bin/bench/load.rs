//! One benchmark phase's world: a namespace, private queues, a worker process, and watches
//! that time when Jobs appear and pods end, as seen by this client.

use std::{
    collections::HashMap,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use clap::Parser;
use futures::{StreamExt, TryStreamExt};
use k8s_job_worker::{config::Settings, domain::request::parse_request, k8s::spec::build_job};
use k8s_openapi::api::{
    batch::v1::Job,
    core::v1::{Namespace, Pod, ServiceAccount},
};
use kube::{
    api::{Api, PostParams},
    runtime::{watcher, WatchStreamExt},
    Client,
};
use lapin::{options::*, types::FieldTable, BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use serde_json::json;

use crate::Args;

#[derive(Default)]
struct Seen {
    jobs: HashMap<String, Instant>,
    running: HashMap<String, Instant>,
    terminal: HashMap<String, Instant>,
}

/// A namespace with its own queues and (optionally) a worker.
pub struct Env {
    client: Client,
    ns: String,
    conn: Connection,
    channel: Channel,
    events: lapin::Consumer,
    seen: Arc<Mutex<Seen>>,
    worker: Option<Child>,
    queue: String,
    watches: Vec<tokio::task::JoinHandle<()>>,
    http_port: u16,
}

fn request(job_id: &str, command: &str, hold: bool) -> serde_json::Value {
    let mut r = json!({"schema": "k8s-job-worker/job-request/v1", "job_id": job_id, "command_line": command,
                       "image": "busybox", "max_pod_retrials": 0, "requests_cpu": 0.001});
    if hold {
        r["annotations"] = json!({"sim-node.k8s-job-worker/hold": "true"});
    }
    r
}

impl Env {
    pub async fn new(client: &Client, args: &Args, name: &str) -> anyhow::Result<Env> {
        let ns = format!("{name}-{}", jiff::Timestamp::now().as_second());
        let namespaces: Api<Namespace> = Api::all(client.clone());
        namespaces.create(&PostParams::default(), &serde_json::from_value(json!({"metadata": {"name": ns}}))?).await?;
        let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), &ns);
        while sas.get_opt("default").await?.and_then(|sa| sa.secrets).is_none_or(|s| s.is_empty()) {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let conn = Connection::connect(&args.amqp_url, ConnectionProperties::default()).await?;
        let channel = conn.create_channel().await?;
        channel.confirm_select(ConfirmSelectOptions::default()).await?;
        let exchange = format!("{ns}.events");
        let durable = ExchangeDeclareOptions { durable: true, ..Default::default() };
        channel.exchange_declare(exchange.clone().into(), ExchangeKind::Topic, durable, FieldTable::default()).await?;
        let q = channel
            .queue_declare(
                "".into(),
                QueueDeclareOptions { exclusive: true, ..Default::default() },
                FieldTable::default(),
            )
            .await?;
        channel
            .queue_bind(q.name().clone(), exchange.into(), "#".into(), Default::default(), FieldTable::default())
            .await?;
        let events = channel
            .basic_consume(q.name().clone(), "bench".into(), BasicConsumeOptions::default(), FieldTable::default())
            .await?;
        let queue = format!("{ns}.requests");
        // Declared as the worker declares it, so requests can be published before it starts.
        let mut qargs = FieldTable::default();
        qargs.insert("x-dead-letter-exchange".into(), lapin::types::AMQPValue::LongString(format!("{ns}.dlx").into()));
        qargs.insert("x-queue-type".into(), lapin::types::AMQPValue::LongString("quorum".into()));
        qargs.insert("x-delivery-limit".into(), lapin::types::AMQPValue::LongLongInt(20));
        channel
            .queue_declare(queue.clone().into(), QueueDeclareOptions { durable: true, ..Default::default() }, qargs)
            .await?;

        let seen = Arc::new(Mutex::new(Seen::default()));
        let (jobs, pods): (Api<Job>, Api<Pod>) =
            (Api::namespaced(client.clone(), &ns), Api::namespaced(client.clone(), &ns));
        let s = seen.clone();
        let job_watch = tokio::spawn(async move {
            let stream = watcher(jobs, watcher::Config::default()).default_backoff().applied_objects();
            futures::pin_mut!(stream);
            while let Ok(Some(job)) = stream.try_next().await {
                let name = job.metadata.name.unwrap_or_default();
                s.lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .jobs
                    .entry(name)
                    .or_insert_with(Instant::now);
            }
        });
        let s = seen.clone();
        let pod_watch = tokio::spawn(async move {
            let stream = watcher(pods, watcher::Config::default()).default_backoff().applied_objects();
            futures::pin_mut!(stream);
            while let Ok(Some(pod)) = stream.try_next().await {
                let job = pod.metadata.labels.as_ref().and_then(|l| l.get("app").cloned()).unwrap_or_default();
                let phase = pod.status.and_then(|s| s.phase).unwrap_or_default();
                let mut seen = s.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                match phase.as_str() {
                    "Running" => {
                        seen.running.entry(job).or_insert_with(Instant::now);
                    }
                    "Succeeded" | "Failed" => {
                        seen.terminal.entry(job).or_insert_with(Instant::now);
                    }
                    _ => {}
                }
            }
        });
        Ok(Env {
            client: client.clone(),
            ns,
            conn,
            channel,
            events,
            seen,
            worker: None,
            queue,
            watches: vec![job_watch, pod_watch],
            http_port: 0,
        })
    }

    pub async fn start_worker(&mut self, args: &Args) -> anyhow::Result<()> {
        let bin = std::env::current_exe()?.with_file_name("k8s-job-worker");
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let log = std::fs::File::create(std::env::temp_dir().join(format!("{}.worker.log", self.ns)))?;
        let child = Command::new(bin)
            .args(["--log-format", "json", "run"])
            .env("AMQP_URL", &args.amqp_url)
            .env("K8S_NAMESPACE", &self.ns)
            .env("K8S_GALAXY_INSTANCE_ID", "bench")
            .env("AMQP_REQUEST_QUEUE", &self.queue)
            .env("AMQP_CONTROL_QUEUE", format!("{}.control", self.ns))
            .env("AMQP_RESULT_EXCHANGE", format!("{}.events", self.ns))
            .env("AMQP_DEAD_LETTER_EXCHANGE", format!("{}.dlx", self.ns))
            .env("AMQP_DEAD_LETTER_QUEUE", format!("{}.dead-letter", self.ns))
            .env("AMQP_PREFETCH", (2 * args.concurrency).to_string())
            .env("K8S_MAX_CONCURRENT_CREATES", args.concurrency.to_string())
            .env("HTTP_LISTEN", format!("127.0.0.1:{port}"))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        self.worker = Some(child);
        self.http_port = port;
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            let ok = tokio::process::Command::new("curl")
                .args(["-fsS", &format!("http://127.0.0.1:{port}/readyz")])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .await
                .is_ok_and(|s| s.success());
            if ok {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        anyhow::bail!("worker not ready")
    }

    async fn publish(&self, body: &serde_json::Value) -> anyhow::Result<lapin::PublisherConfirm> {
        Ok(self
            .channel
            .basic_publish(
                "".into(),
                self.queue.clone().into(),
                BasicPublishOptions::default(),
                &serde_json::to_vec(body)?,
                BasicProperties::default().with_delivery_mode(2),
            )
            .await?)
    }

    async fn wait_jobs(&self, n: usize, timeout: Duration) -> anyhow::Result<Instant> {
        let deadline = Instant::now() + timeout;
        loop {
            {
                let seen = self.seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                if seen.jobs.len() >= n {
                    return Ok(seen.jobs.values().copied().max().unwrap_or_else(Instant::now));
                }
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "only {} of {n} Jobs after {timeout:?}",
                self.seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner).jobs.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A plain client creating `n` equivalent Jobs with `concurrency` creates in flight.
    pub async fn raw_creates(&mut self, n: usize, concurrency: usize) -> anyhow::Result<Duration> {
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            settings: Settings,
        }
        let settings =
            Cli::parse_from(["raw", "--k8s-namespace", &self.ns, "--k8s-galaxy-instance-id", "bench"]).settings;
        let jobs: Api<Job> = Api::namespaced(self.client.clone(), &self.ns);
        let specs: Vec<Job> = (0..n)
            .map(|i| {
                let body = serde_json::to_vec(&request(&format!("raw{i}"), "sleep infinity", true)).unwrap_or_default();
                parse_request(&body, 1 << 20)
                    .ok()
                    .and_then(|r| build_job(&r, &settings.kube, &settings.kube.placement.parse().ok()?).ok())
            })
            .collect::<Option<_>>()
            .ok_or_else(|| anyhow::anyhow!("request did not build"))?;
        let started = Instant::now();
        futures::stream::iter(specs)
            .map(|job| {
                let jobs = jobs.clone();
                async move { jobs.create(&PostParams::default(), &job).await }
            })
            .buffer_unordered(concurrency)
            .try_collect::<Vec<_>>()
            .await?;
        let last = self.wait_jobs(n, Duration::from_secs(600)).await?;
        Ok(last.duration_since(started))
    }

    /// Publishes `n` requests at once; time until all `n` Jobs exist.
    pub async fn burst(&mut self, n: usize) -> anyhow::Result<Duration> {
        let started = Instant::now();
        let mut confirms = Vec::with_capacity(n);
        for i in 0..n {
            confirms.push(self.publish(&request(&format!("b{i}"), "sleep infinity", true)).await?);
        }
        for c in confirms {
            c.await?;
        }
        eprintln!("[bench] {n} requests published and confirmed in {:.2} s", started.elapsed().as_secs_f64());
        let last = self.wait_jobs(n, Duration::from_secs(600)).await?;
        Ok(last.duration_since(started))
    }

    /// One request at a time: publish → Job seen, and pod terminal seen → terminal event received.
    pub async fn sequential(&mut self, n: usize) -> anyhow::Result<(Vec<Duration>, Vec<Duration>)> {
        let (mut to_job, mut to_event) = (Vec::new(), Vec::new());
        for i in 0..n {
            let job_id = format!("s{i}");
            let name = format!("galaxy-bench-{job_id}");
            let sent = Instant::now();
            self.publish(&request(&job_id, "true", false)).await?.await?;
            loop {
                let delivery = tokio::time::timeout(Duration::from_secs(30), self.events.next())
                    .await?
                    .ok_or_else(|| anyhow::anyhow!("event stream ended"))??;
                let received = Instant::now();
                delivery.ack(BasicAckOptions::default()).await?;
                let event: serde_json::Value = serde_json::from_slice(&delivery.data)?;
                if event["job_id"] != json!(job_id) || !matches!(event["state"].as_str(), Some("succeeded" | "failed"))
                {
                    continue;
                }
                let seen = self.seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                if let Some(created) = seen.jobs.get(&name) {
                    to_job.push(created.duration_since(sent));
                }
                if let Some(ended) = seen.terminal.get(&name) {
                    to_event.push(received.saturating_duration_since(*ended));
                }
                break;
            }
        }
        Ok((to_job, to_event))
    }

    /// Publishes `m` held requests and waits until all their pods run.
    pub async fn hold(&mut self, m: usize) -> anyhow::Result<()> {
        let mut confirms = Vec::with_capacity(m);
        for i in 0..m {
            confirms.push(self.publish(&request(&format!("h{i}"), "sleep infinity", true)).await?);
        }
        for c in confirms {
            c.await?;
        }
        let deadline = Instant::now() + Duration::from_secs(1200);
        while self.seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner).running.len() < m {
            anyhow::ensure!(Instant::now() < deadline, "pods did not all start");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        Ok(())
    }

    /// CPU time to decode one of this namespace's pods, as the apiserver sends it, into the full
    /// `k8s_openapi` Pod and into the tracker's slim type, in microseconds.
    pub async fn decode_cost(&self) -> anyhow::Result<serde_json::Value> {
        use k8s_job_worker::k8s::watched::WatchedPod;
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.ns);
        let Some(name) = pods.list_metadata(&Default::default()).await?.items.pop().and_then(|p| p.metadata.name)
        else {
            return Ok(json!(null));
        };
        let request =
            kube::core::Request::new(format!("/api/v1/namespaces/{}/pods", self.ns)).get(&name, &Default::default())?;
        let body = self.client.request_text(request).await?.into_bytes();
        const ROUNDS: u32 = 20_000;
        fn time<T: serde::de::DeserializeOwned>(body: &[u8]) -> f64 {
            let started = Instant::now();
            for _ in 0..ROUNDS {
                std::hint::black_box(serde_json::from_slice::<T>(body).ok());
            }
            started.elapsed().as_secs_f64() * 1e6 / f64::from(ROUNDS)
        }
        let (full, slim) = (time::<Pod>(&body), time::<WatchedPod>(&body));
        let r = |x: f64| (x * 10.0).round() / 10.0;
        Ok(json!({"pod_json_bytes": body.len(), "full_pod_us": r(full), "slim_pod_us": r(slim)}))
    }

    /// The worker's resident memory in KiB.
    pub fn worker_rss_kib(&self) -> u64 {
        let Some(child) = &self.worker else { return 0 };
        std::fs::read_to_string(format!("/proc/{}/status", child.id()))
            .ok()
            .and_then(|s| {
                s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            })
            .unwrap_or(0)
    }

    /// Mean of a histogram in the worker's `/metrics`, in milliseconds.
    pub async fn worker_metric_mean_ms(&self, name: &str) -> Option<f64> {
        let out = tokio::process::Command::new("curl")
            .args(["-fsS", &format!("http://127.0.0.1:{}/metrics", self.http_port)])
            .output()
            .await
            .ok()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let value = |suffix: &str| {
            text.lines()
                .find(|l| l.starts_with(&format!("{name}_{suffix} ")))?
                .split_whitespace()
                .nth(1)?
                .parse::<f64>()
                .ok()
        };
        Some(value("sum")? / value("count")?.max(1.0) * 1000.0)
    }

    /// The worker's pid, when running.
    pub fn worker_pid(&self) -> Option<u32> {
        self.worker.as_ref().map(Child::id)
    }

    pub fn stop_worker(&mut self) {
        if let Some(mut child) = self.worker.take() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let _ = child.wait();
        }
    }

    /// Stops the worker, deletes the queues and the namespace, and waits until it is gone
    /// (so its cleanup does not load the apiserver during the next measurement).
    pub async fn finish(mut self) {
        self.stop_worker();
        for w in &self.watches {
            w.abort();
        }
        for q in [self.queue.clone(), format!("{}.control", self.ns), format!("{}.dead-letter", self.ns)] {
            let _ = self.channel.queue_delete(q.into(), QueueDeleteOptions::default()).await;
        }
        let _ = self.conn.close(200, "done".into()).await;
        let namespaces: Api<Namespace> = Api::all(self.client.clone());
        let _ = namespaces.delete(&self.ns, &Default::default()).await;
        let deadline = Instant::now() + Duration::from_secs(600);
        while Instant::now() < deadline && namespaces.get_opt(&self.ns).await.ok().flatten().is_some() {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}
