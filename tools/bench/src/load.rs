//! One benchmark phase's world: a namespace, private queues, a worker process, and watches
//! that time when Jobs appear and pods end, as seen by this client.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures::{StreamExt, TryStreamExt};
use k8s_job_worker::amqp::{broker::work_queue_arguments, publisher::Pending};
use k8s_job_worker::{
    config::Settings,
    domain::{job::plan_job, request::parse_request},
    k8s::render,
};
use k8s_job_worker_testkit::{
    cluster::{create_namespace, drop_namespace_and_wait},
    worker::free_port,
    GalaxyClient, Names, WorkerProcess, WorkerSpec, SIM_NODE_ANNOTATIONS,
};
use k8s_openapi::api::{batch::v1::Job, core::v1::Pod};
use kube::{
    api::{Api, PostParams},
    runtime::{watcher, WatchStreamExt},
    Client,
};
use lapin::options::*;
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
    names: Names,
    galaxy: GalaxyClient,
    events: lapin::Consumer,
    seen: Arc<Mutex<Seen>>,
    worker: Option<WorkerProcess>,
    watches: Vec<tokio::task::JoinHandle<()>>,
    held: usize,
}

fn request(job_id: &str, command: &str, hold: bool) -> serde_json::Value {
    let mut r = json!({"schema": "k8s-job-worker/job-request/v1", "job_id": job_id, "command_line": command,
                       "image": "busybox", "max_pod_retrials": 0, "requests_cpu": 0.001});
    if hold {
        r["annotations"] = json!({format!("{SIM_NODE_ANNOTATIONS}/hold"): "true"});
    }
    r
}

impl Env {
    pub async fn new(client: &Client, args: &Args, name: &str) -> anyhow::Result<Env> {
        let ns = format!("{name}-{}", jiff::Timestamp::now().as_second());
        create_namespace(client, &ns).await?;
        let names = Names::new(&ns);
        let galaxy = GalaxyClient::connect(&args.amqp_url).await?;
        let events = galaxy.bind_events(&names.result_exchange, "#", None).await?;
        // Declared as the worker declares it, so requests can be published before it starts.
        let work_queue = work_queue_arguments(&names.settings(&args.amqp_url));
        let durable = QueueDeclareOptions { durable: true, ..Default::default() };
        galaxy.channel.queue_declare(names.request_queue.clone().into(), durable, work_queue).await?;

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
            names,
            galaxy,
            events,
            seen,
            worker: None,
            watches: vec![job_watch, pod_watch],
            held: 0,
        })
    }

    pub async fn start_worker(&mut self, args: &Args) -> anyhow::Result<()> {
        let mut worker = self.worker_spec(args)?.spawn(&format!("{}-worker", self.ns), free_port())?;
        let ready = worker.wait_ready(Duration::from_secs(30)).await;
        self.worker = Some(worker);
        anyhow::ensure!(ready, "worker not ready");
        Ok(())
    }

    /// How this namespace's worker replicas are started.
    pub fn worker_spec(&self, args: &Args) -> anyhow::Result<WorkerSpec> {
        let mut spec = WorkerSpec::new(&args.amqp_url, &self.ns, self.names.clone());
        spec.bin = match &args.worker_bin {
            Some(bin) => bin.clone(),
            None => std::env::current_exe()?.with_file_name("k8s-job-worker"),
        };
        spec.instance_id = Some("bench".into());
        spec.log_dir = std::env::temp_dir();
        spec.rust_log = "warn".into();
        spec.env = vec![
            ("AMQP_PREFETCH".into(), (2 * args.concurrency).to_string()),
            ("K8S_MAX_CONCURRENT_CREATES".into(), args.concurrency.to_string()),
            // Held requests carry sim-node's annotation, which requests may only use when allowed.
            ("POLICY_ALLOWED_METADATA_PREFIXES".into(), SIM_NODE_ANNOTATIONS.into()),
        ];
        Ok(spec)
    }

    /// The running worker replica.
    pub fn worker(&self) -> Option<&WorkerProcess> {
        self.worker.as_ref()
    }

    /// Stops this client's own watches (their re-lists would be counted with the worker's).
    pub fn stop_watching(&mut self) {
        for w in self.watches.drain(..) {
            w.abort();
        }
    }

    async fn publish(&self, body: &serde_json::Value) -> anyhow::Result<Pending> {
        Ok(self.galaxy.send(&self.names.request_queue, &serde_json::to_vec(body)?).await?)
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
        let defaults = job_defaults()?;
        let jobs: Api<Job> = Api::namespaced(self.client.clone(), &self.ns);
        let specs: Vec<Job> = (0..n)
            .map(|i| {
                let body = serde_json::to_vec(&request(&format!("raw{i}"), "sleep infinity", true)).unwrap_or_default();
                parse_request(&body, 1 << 20)
                    .ok()
                    .and_then(|r| plan_job(&r, &defaults).ok())
                    .map(|plan| render::job(&plan, &self.ns))
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
            c.confirmed().await?;
        }
        eprintln!("[bench] {n} requests published and confirmed in {:.2} s", started.elapsed().as_secs_f64());
        let last = self.wait_jobs(n, Duration::from_secs(600)).await?;
        Ok(last.duration_since(started))
    }

    /// The same burst, with the Jobs made by a relay in this process instead of the worker:
    /// the least any worker that keeps the message contract has to do. Through the worker's
    /// own adapters (its consumer with the worker's prefetch, its create with `concurrency`
    /// creates in flight, its confirmed publish) each request is parsed and planned, its Job
    /// created, its `submitted` event confirmed, and only then acked — and nothing else: no
    /// tracking, no watches, no `running` events, no retries, metrics or health.
    pub async fn relay_burst(&mut self, args: &Args) -> anyhow::Result<Duration> {
        use k8s_job_worker::{
            amqp::{
                broker::Broker,
                consumer::{consume, Subscription},
            },
            domain::{
                event::{JobState, Reporter, Subject},
                job::fingerprint,
            },
            k8s::jobs::{Jobs, JobsConfig},
            shutdown::Shutdown,
        };
        let settings = self.names.settings(&args.amqp_url);
        let broker = Arc::new(Broker::new(settings.clone(), "bench relay".into()));
        let config = JobsConfig {
            namespace: self.ns.clone(),
            deletion_timeout: Duration::from_secs(60),
            max_concurrent_creates: args.concurrency,
        };
        let jobs = Arc::new(Jobs::new(self.client.clone(), config));
        let defaults = Arc::new(job_defaults()?);
        let reporter = Arc::new(Reporter { instance_id: Some("bench".into()), worker_id: "relay".into() });
        let (stop, publisher) = (Shutdown::new(), broker.clone());
        let relay = move |delivery: lapin::message::Delivery| {
            let (broker, jobs, defaults, reporter) =
                (publisher.clone(), jobs.clone(), defaults.clone(), reporter.clone());
            async move {
                let relayed = async {
                    let request = parse_request(&delivery.data, 1 << 20)?;
                    let plan = plan_job(&request, &defaults)?;
                    let fingerprint = fingerprint(&request);
                    let owner = defaults.naming.owner(&request.job_id, request.attempt);
                    jobs.create_or_adopt(&render::job(&plan, jobs.namespace()), &owner, &fingerprint).await?;
                    let subject = Subject {
                        job_id: &request.job_id,
                        attempt: request.attempt,
                        job_name: &plan.name,
                        fingerprint: &fingerprint,
                        handler: request.handler.as_deref(),
                    };
                    let mut event = reporter.event(&subject, JobState::Submitted, format!("job {} created", plan.name));
                    broker.publish_event(&mut event).await?;
                    Ok::<_, anyhow::Error>(())
                };
                match relayed.await {
                    Ok(()) => {
                        let _ = delivery.ack(BasicAckOptions::default()).await;
                    }
                    Err(err) => {
                        eprintln!("[bench] relay: {err:#}; requeued");
                        let _ = delivery.nack(BasicNackOptions { requeue: true, ..Default::default() }).await;
                    }
                }
            }
        };
        let subscription = Subscription {
            queue: settings.request_queue.clone(),
            prefetch: u16::try_from(2 * args.concurrency).unwrap_or(u16::MAX),
            tag: "relay".into(),
            grace: Duration::from_secs(10),
            consumer_timeout: None,
        };
        let consuming = tokio::spawn(consume(broker.clone(), subscription, stop.clone(), relay));
        let took = self.burst(args.burst).await;
        stop.trigger();
        let _ = consuming.await;
        broker.close().await;
        took
    }

    /// One request at a time: publish → Job seen, and pod terminal seen → terminal event received.
    pub async fn sequential(&mut self, n: usize) -> anyhow::Result<(Vec<Duration>, Vec<Duration>)> {
        let (mut to_job, mut to_event) = (Vec::new(), Vec::new());
        for i in 0..n {
            let job_id = format!("s{i}");
            let name = k8s_job_worker::domain::naming::job_name("galaxy", Some("bench"), &job_id, None);
            let sent = Instant::now();
            self.publish(&request(&job_id, "true", false)).await?.confirmed().await?;
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

    /// Publishes held requests until `m` are held (counting those held before) and waits until
    /// all their pods run.
    pub async fn hold(&mut self, m: usize) -> anyhow::Result<()> {
        let mut confirms = Vec::with_capacity(m);
        for i in self.held..m {
            confirms.push(self.publish(&request(&format!("h{i}"), "sleep infinity", true)).await?);
        }
        for c in confirms {
            c.confirmed().await?;
        }
        self.held = self.held.max(m);
        self.wait_running(m, Duration::from_secs(1200)).await.map(|_| ())
    }

    /// Waits until the pods of `n` Jobs of this namespace were seen running; when the last one was.
    pub async fn wait_running(&self, n: usize, timeout: Duration) -> anyhow::Result<Instant> {
        let deadline = Instant::now() + timeout;
        loop {
            {
                let seen = self.seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                if seen.running.len() >= n {
                    return Ok(seen.running.values().copied().max().unwrap_or_else(Instant::now));
                }
            }
            anyhow::ensure!(Instant::now() < deadline, "pods did not all start");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
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
        self.worker.as_ref().map_or(0, WorkerProcess::rss_kib)
    }

    /// Mean of a histogram in the worker's `/metrics`, in milliseconds.
    pub async fn worker_metric_mean_ms(&self, name: &str) -> Option<f64> {
        let (_, text) = self.worker.as_ref()?.get("/metrics").await?;
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
        self.worker.as_ref().and_then(WorkerProcess::pid)
    }

    pub fn stop_worker(&mut self) {
        if let Some(mut worker) = self.worker.take() {
            let _ = worker.terminate();
        }
    }

    /// Stops the worker, deletes the queues and the namespace, and waits until it is gone
    /// (so its cleanup does not load the apiserver during the next measurement).
    pub async fn finish(mut self) {
        self.stop_worker();
        for w in &self.watches {
            w.abort();
        }
        let n = &self.names;
        for q in [&n.request_queue, &n.control_queue, &n.dead_letter_queue, &n.dead_letter_inbox] {
            let _ = self.galaxy.channel.queue_delete(q.clone().into(), QueueDeleteOptions::default()).await;
        }
        let _ = self.galaxy.conn.close(200, "done".into()).await;
        drop_namespace_and_wait(&self.client, &self.ns, Duration::from_secs(600)).await;
    }
}

/// The Job defaults the benchmark's worker runs with (its instance id, sim-node's annotations
/// allowed), for the runs that make the worker's Jobs without it.
fn job_defaults() -> anyhow::Result<k8s_job_worker::domain::job::JobDefaults> {
    let args = ["--k8s-galaxy-instance-id", "bench", "--policy-allowed-metadata-prefixes", SIM_NODE_ANNOTATIONS];
    Ok(Settings::from_args(args)?.job_defaults())
}

impl Env {
    /// The worker's own Kubernetes adapter on this namespace, and the label selector of the
    /// bench instance's Jobs (the raw run's Jobs carry the same labels).
    fn workers_adapter(&self) -> anyhow::Result<(k8s_job_worker::k8s::jobs::Jobs, String)> {
        use k8s_job_worker::k8s::jobs::{Jobs, JobsConfig};
        let jobs = Jobs::new(
            self.client.clone(),
            JobsConfig {
                namespace: self.ns.clone(),
                deletion_timeout: Duration::from_secs(60),
                max_concurrent_creates: 1,
            },
        );
        let selector = Settings::from_args(["--k8s-galaxy-instance-id", "bench"])?.job_defaults().naming.selector();
        Ok((jobs, selector))
    }

    /// Opens `copies` copies of the worker's two watches on this namespace (its Job watch and
    /// its started-pod watch: the same selectors, through its own adapter, decoded slim as it
    /// decodes them), which run until [`Env::finish`]: what watching alone costs the apiserver.
    pub fn watch_like_the_worker(&mut self, copies: usize) -> anyhow::Result<()> {
        use k8s_job_worker::k8s::jobs::STARTED_PODS;
        let (jobs, selector) = self.workers_adapter()?;
        for _ in 0..copies {
            let config = watcher::Config::default().labels(&selector);
            let job_watch = watcher(jobs.watched_jobs(), config.clone()).default_backoff();
            self.watches.push(tokio::spawn(job_watch.for_each(|_| async {})));
            let pod_watch = watcher(jobs.watched_pods(), config.fields(STARTED_PODS)).default_backoff();
            self.watches.push(tokio::spawn(pod_watch.for_each(|_| async {})));
        }
        Ok(())
    }
}

impl Env {
    /// What one of the worker's sweeps for waiting pods costs the control plane with this
    /// namespace's Jobs held: the same list the worker makes (its label and field selectors,
    /// through its own adapter), `rounds` times, consistently from etcd in pages and from the
    /// apiserver's watch cache; CPU milliseconds of the apiserver and etcd and wall
    /// milliseconds per list.
    pub async fn sweep_cost(&self, dir: &std::path::Path, rounds: u32) -> anyhow::Result<serde_json::Value> {
        use k8s_job_worker::k8s::jobs::{Read, WAITING_OR_FAILED_PODS};
        let (jobs, selector) = self.workers_adapter()?;
        let mut out = serde_json::Map::new();
        for (name, read) in [("latest_paged", Read::Latest), ("watch_cache", Read::Cached)] {
            crate::cpu::quiesce(dir).await;
            let procs: Vec<(&str, u32)> =
                ["kube-apiserver", "etcd"].iter().filter_map(|n| Some((*n, crate::cpu::env_pid(dir, n)?))).collect();
            let cpu = || -> Vec<f64> { procs.iter().map(|(_, pid)| crate::cpu::cpu_seconds(*pid)).collect() };
            // What they use meanwhile without the lists (with thousands of Jobs the
            // controllers may still be busy): subtracted.
            const BASELINE: Duration = Duration::from_secs(5);
            let idle = cpu();
            tokio::time::sleep(BASELINE).await;
            let idle: Vec<f64> =
                cpu().iter().zip(idle).map(|(after, before)| (after - before) / BASELINE.as_secs_f64()).collect();
            let before = cpu();
            let (started, mut items) = (Instant::now(), 0);
            for _ in 0..rounds {
                jobs.each_pod_page(&selector, WAITING_OR_FAILED_PODS, read, |page| items += page.len()).await?;
            }
            let wall = started.elapsed().as_secs_f64();
            let mut figures = serde_json::Map::new();
            for (((proc, _), before), (after, idle)) in procs.iter().zip(before).zip(cpu().into_iter().zip(idle)) {
                let ms = ((after - before - idle * wall) * 1000.0 / f64::from(rounds)).max(0.0);
                figures.insert(format!("{proc}_cpu_ms"), json!(crate::round(ms)));
                figures.insert(
                    format!("{proc}_background_cpu_ms"),
                    json!(crate::round(idle * wall * 1000.0 / f64::from(rounds))),
                );
            }
            figures.insert("wall_ms".into(), json!(crate::round(wall * 1000.0 / f64::from(rounds))));
            figures.insert("pods_returned".into(), json!(items / rounds as usize));
            out.insert(name.into(), serde_json::Value::Object(figures));
        }
        Ok(serde_json::Value::Object(out))
    }
}
