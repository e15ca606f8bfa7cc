//! What the worker's tests, the chaos run and the benchmark share: the Galaxy side of the
//! message contract ([`broker`]), the worker binary as a process ([`worker`]), private
//! namespaces ([`cluster`]), request fixtures, a cuttable TCP proxy ([`proxy`]), and the
//! per-test [`Harness`] built from them. Reads KUBECONFIG and AMQP_URL (`scripts/testenv env`).

pub mod broker;
pub mod cluster;
pub mod proxy;
pub mod worker;

use std::{
    collections::BTreeMap,
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

pub use broker::{amqp_url, GalaxyClient, Names};
pub use cluster::{apiserver_address, drop_namespace, eventually, kube_client, kubeconfig_via, namespace, wait_for};
use futures::StreamExt;
use k8s_job_worker::domain::event::JobEvent;
use k8s_openapi::api::{batch::v1::Job, core::v1::Pod};
use kube::{
    api::{Api, ListParams},
    Client,
};
use lapin::{options::*, Channel, Consumer};
use serde_json::json;
pub use worker::{http_get, log_dir, repo_root, worker_bin, WorkerProcess, WorkerSpec};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A unique lowercase name for this test run.
pub fn unique(prefix: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    format!("{prefix}-{}-{n}", std::process::id())
}

/// One test's world: namespace, queues, a worker process, an event collector.
pub struct Harness {
    /// The test's unique id (also its namespace).
    pub id: String,
    /// Kubernetes client.
    pub client: Client,
    /// The test's namespace.
    pub namespace: String,
    /// The test's queues and exchanges.
    pub names: Names,
    /// `K8S_GALAXY_INSTANCE_ID` of the workers.
    pub instance_id: Option<String>,
    /// More arguments of the workers' `run`.
    pub extra_args: Vec<String>,
    /// More environment of the workers.
    pub extra_env: Vec<(String, String)>,
    /// Broker URL the workers use (a proxy's, in connection-loss tests).
    pub worker_amqp_url: String,
    /// The worker, when started.
    pub worker: Option<WorkerProcess>,
    /// The test's broker connection (Galaxy's side).
    pub galaxy: GalaxyClient,
    /// Its confirm-mode channel.
    pub channel: Channel,
    events: Consumer,
    /// Every event received so far.
    pub received: Vec<JobEvent>,
}

impl Harness {
    /// A harness with instance id `main`.
    pub async fn new(test: &str) -> Self {
        Self::with_instance(test, Some("main")).await
    }

    /// A harness with the given instance id (or none).
    pub async fn with_instance(test: &str, instance_id: Option<&str>) -> Self {
        let id = unique(test);
        let client = kube_client().await;
        namespace(&client, &id).await;
        let names = Names::new(&format!("test.{id}"));
        let galaxy = GalaxyClient::connect(&amqp_url()).await.expect("amqp connect");
        // Bound here too, so events are collected even before the worker's first start.
        let events = galaxy.bind_events(&names.result_exchange, "#", None).await.expect("event queue");
        Harness {
            namespace: id.clone(),
            id,
            client,
            names,
            instance_id: instance_id.map(str::to_string),
            extra_args: Vec::new(),
            extra_env: Vec::new(),
            worker_amqp_url: amqp_url(),
            worker: None,
            channel: galaxy.channel.clone(),
            galaxy,
            events,
            received: Vec::new(),
        }
    }

    /// Jobs in the test namespace.
    pub fn jobs(&self) -> Api<Job> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    /// Pods in the test namespace.
    pub fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    /// How this test's workers are run.
    pub fn worker_spec(&self) -> WorkerSpec {
        let mut spec = WorkerSpec::new(&self.worker_amqp_url, &self.namespace, self.names.clone());
        spec.instance_id = self.instance_id.clone();
        spec.args = self.extra_args.clone();
        // Finished pods go 2 s after the report (not 60) so tests see the cleanup soon; a test
        // may set its own.
        spec.env = vec![("K8S_FINISHED_PODS_GRACE_SECONDS".into(), "2".into())];
        spec.env.extend(self.extra_env.iter().cloned());
        spec
    }

    /// Starts the worker binary and waits until `/readyz` says ready.
    pub async fn start_worker(&mut self) {
        self.worker = Some(self.worker_spec().spawn_ready(&format!("{}-worker", self.id)).await);
    }

    /// Starts another replica on the same queues and namespace.
    pub async fn second_replica(&self, name: &str) -> WorkerProcess {
        self.worker_spec().spawn_ready(&format!("{}-{name}", self.id)).await
    }

    /// Sends SIGTERM and returns how long the worker took to exit, and its exit status.
    pub fn terminate_worker(&mut self) -> (Duration, std::process::ExitStatus) {
        self.worker.take().expect("worker running").terminate()
    }

    /// `/readyz` status code.
    pub async fn readyz(&self) -> Option<u16> {
        self.worker.as_ref()?.get("/readyz").await.map(|(code, _)| code)
    }

    /// `/metrics` text.
    pub async fn metrics(&self) -> String {
        match &self.worker {
            Some(w) => w.get("/metrics").await.map(|(_, body)| body).unwrap_or_default(),
            None => String::new(),
        }
    }

    /// SIGKILLs the worker.
    pub fn kill_worker(&mut self) {
        if let Some(mut worker) = self.worker.take() {
            worker.kill();
        }
    }

    /// Publishes a raw body to a queue (with confirm); panics unless it was routed.
    pub async fn publish_raw(&self, queue: &str, body: &[u8]) {
        if let Err(err) = self.galaxy.publish(queue, body).await {
            panic!("publish to {queue} failed: {err}");
        }
    }

    /// Publishes a job request.
    pub async fn submit(&self, request: &serde_json::Value) {
        self.publish_raw(&self.names.request_queue, &serde_json::to_vec(request).unwrap()).await;
    }

    /// Publishes a cancel.
    pub async fn cancel(&self, job_id: &str) {
        let body = json!({"schema": "k8s-job-worker/job-cancel/v1", "job_id": job_id, "reason": "user cancelled"});
        self.publish_raw(&self.names.control_queue, &serde_json::to_vec(&body).unwrap()).await;
    }

    async fn receive(&mut self, within: Duration) -> bool {
        match tokio::time::timeout(within, self.events.next()).await {
            Ok(Some(Ok(delivery))) => {
                let _ = delivery.ack(BasicAckOptions::default()).await;
                let event: JobEvent = serde_json::from_slice(&delivery.data).expect("event matches the schema");
                self.received.push(event);
                true
            }
            _ => false,
        }
    }

    /// Receives events until `done` says so, or panics after `timeout`. Returns the events of `job_id`.
    pub async fn events_until(
        &mut self,
        job_id: &str,
        timeout: Duration,
        done: impl Fn(&[JobEvent]) -> bool,
    ) -> Vec<JobEvent> {
        let deadline = Instant::now() + timeout;
        loop {
            let mine: Vec<JobEvent> = self.received.iter().filter(|e| e.job_id == job_id).cloned().collect();
            if done(&mine) {
                return mine;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "timed out waiting for events of job {job_id}; got {mine:#?}");
            self.receive(left).await;
        }
    }

    /// Events of a job up to and including its first terminal one.
    pub async fn until_terminal(&mut self, job_id: &str) -> Vec<JobEvent> {
        self.events_until(job_id, Duration::from_secs(60), |e| e.iter().any(|e| e.state.is_terminal())).await
    }

    /// Waits `quiet` more and returns every event of the job received so far.
    pub async fn settle(&mut self, job_id: &str, quiet: Duration) -> Vec<JobEvent> {
        let deadline = Instant::now() + quiet;
        while self.receive(deadline.saturating_duration_since(Instant::now())).await {}
        self.received.iter().filter(|e| e.job_id == job_id).cloned().collect()
    }

    /// Messages currently in the dead-letter queue (consumed).
    pub async fn dead_letters(&self, expected: usize) -> Vec<lapin::message::BasicGetMessage> {
        let mut out = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        while out.len() < expected && Instant::now() < deadline {
            match self
                .channel
                .basic_get(self.names.dead_letter_queue.clone().into(), BasicGetOptions { no_ack: true })
                .await
            {
                Ok(Some(msg)) => out.push(msg),
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        out
    }

    /// Waits until a finished Job is cleaned up: its pods are gone, and the Job is gone or
    /// only a record of its outcome (`k8s_finished_job_record_seconds`).
    pub async fn cleaned_up(&self, name: &str) {
        let (jobs, pods) = (self.jobs(), self.pods());
        let no_pods = ListParams::default().labels(&format!("app={name}"));
        wait_for(&format!("{name} cleaned up"), Duration::from_secs(30), || async {
            let job = jobs.get_opt(name).await.unwrap();
            let record = job.as_ref().is_none_or(|j| labels(j).contains_key("k8s-job-worker/record"));
            record && pods.list(&no_pods).await.unwrap().items.is_empty()
        })
        .await;
    }

    /// A scratch file of this test's, where the tools it runs may write (sim-node runs them
    /// as local processes).
    pub fn scratch(&self, file: &str) -> std::path::PathBuf {
        let dir = log_dir().join(format!("{}-scratch", self.id));
        std::fs::create_dir_all(&dir).expect("scratch directory");
        dir.join(file)
    }

    /// Jobs in the namespace by name.
    pub async fn job_names(&self) -> Vec<String> {
        self.jobs()
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .filter_map(|j| j.metadata.name)
            .collect()
    }

    /// Stops the worker, deletes the namespace and the test's queues.
    pub async fn finish(mut self) {
        self.kill_worker();
        drop_namespace(&self.client, &self.namespace).await;
        let n = &self.names;
        for q in [&n.request_queue, &n.control_queue, &n.dead_letter_queue, &n.dead_letter_inbox] {
            let _ = self.channel.queue_delete(q.clone().into(), QueueDeleteOptions::default()).await;
        }
        for e in [&self.names.result_exchange, &self.names.dead_letter_exchange] {
            let _ = self.channel.exchange_delete(e.clone().into(), ExchangeDeleteOptions::default()).await;
        }
        let _ = self.galaxy.conn.close(200, "done".into()).await;
    }
}

/// The prefix of sim-node's pod annotations (`.../hold`, `.../evict-after-seconds`, ...):
/// requests that carry them need it in the worker's `policy_allowed_metadata_prefixes`.
pub const SIM_NODE_ANNOTATIONS: &str = "sim-node.k8s-job-worker";

/// A job request with sensible test defaults.
pub fn request(job_id: &str, command: &str) -> serde_json::Value {
    json!({
        "schema": "k8s-job-worker/job-request/v1",
        "job_id": job_id,
        "command_line": command,
        "image": {"repo": "quay.io", "owner": "biocontainers", "image": "samtools", "tag": "1.17"},
        "max_pod_retrials": 0,
    })
}

/// How many lines a file has (how often a tool that appends one line ran); 0 when missing.
pub fn lines_in(path: &std::path::Path) -> usize {
    std::fs::read_to_string(path).map(|s| s.lines().count()).unwrap_or(0)
}

/// Labels of a Job, for assertions.
pub fn labels(job: &Job) -> BTreeMap<String, String> {
    job.metadata.labels.clone().unwrap_or_default()
}
