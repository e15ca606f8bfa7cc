//! Test harness: a private namespace and private queue names per test, the real worker
//! binary, and a queue bound to the result exchange that collects events.
//! Reads KUBECONFIG and AMQP_URL (from `scripts/testenv env`).
#![allow(dead_code)]

pub mod proxy;

use std::{
    collections::BTreeMap,
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use futures::StreamExt;
use k8s_job_worker::domain::event::JobEvent;
use k8s_openapi::api::{
    batch::v1::Job,
    core::v1::{Namespace, Pod, ServiceAccount},
};
use kube::{
    api::{Api, DeleteParams, ListParams, PostParams},
    Client,
};
use lapin::{
    options::*, types::FieldTable, BasicProperties, Channel, Connection, ConnectionProperties, Consumer, ExchangeKind,
};
use serde_json::json;

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Fails loudly when the environment is missing: these tests must never pass vacuously.
pub fn amqp_url() -> String {
    std::env::var("AMQP_URL")
        .expect("AMQP_URL not set: run the tests through scripts/test (or eval $(scripts/testenv env))")
}

/// A Kubernetes client from KUBECONFIG.
pub async fn kube_client() -> Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let path = std::env::var("KUBECONFIG")
        .expect("KUBECONFIG not set: run the tests through scripts/test (or eval $(scripts/testenv env))");
    let kubeconfig = kube::config::Kubeconfig::read_from(&path).expect("read kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await.expect("kubeconfig");
    Client::try_from(config).expect("client")
}

/// A unique lowercase name for this test run.
pub fn unique(prefix: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    format!("{prefix}-{}-{n}", std::process::id())
}

/// Creates a namespace and waits until its default service account exists.
pub async fn namespace(client: &Client, name: &str) {
    let api: Api<Namespace> = Api::all(client.clone());
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
    api.create(&PostParams::default(), &ns).await.expect("create namespace");
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), name);
    wait_for("default service account", Duration::from_secs(30), || async {
        sas.get_opt("default").await.ok().flatten().is_some_and(|sa| sa.secrets.is_some_and(|s| !s.is_empty()))
    })
    .await;
}

/// Deletes a namespace (and everything in it).
pub async fn drop_namespace(client: &Client, name: &str) {
    let api: Api<Namespace> = Api::all(client.clone());
    let _ = api.delete(name, &DeleteParams::default()).await;
}

/// Polls `check` every 100 ms until it is true; panics after `timeout`.
pub async fn wait_for<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Queue and exchange names private to one test.
#[derive(Clone, Debug)]
pub struct Names {
    pub request_queue: String,
    pub control_queue: String,
    pub result_exchange: String,
    pub dead_letter_exchange: String,
    pub dead_letter_queue: String,
}

impl Names {
    pub fn new(id: &str) -> Self {
        Names {
            request_queue: format!("test.{id}.requests"),
            control_queue: format!("test.{id}.control"),
            result_exchange: format!("test.{id}.events"),
            dead_letter_exchange: format!("test.{id}.dlx"),
            dead_letter_queue: format!("test.{id}.dead-letter"),
        }
    }
}

/// One test's world: namespace, queues, a worker process, an event collector.
pub struct Harness {
    pub id: String,
    pub client: Client,
    pub namespace: String,
    pub names: Names,
    pub instance_id: Option<String>,
    pub extra_args: Vec<String>,
    /// Extra environment of the worker process.
    pub extra_env: Vec<(String, String)>,
    /// Broker URL the worker uses (a proxy's, in connection-loss tests).
    pub worker_amqp_url: String,
    pub worker: Option<Child>,
    pub http_port: u16,
    pub conn: Connection,
    pub channel: Channel,
    events: Consumer,
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
        let names = Names::new(&id);
        let conn = Connection::connect(&amqp_url(), ConnectionProperties::default()).await.expect("amqp connect");
        let channel = conn.create_channel().await.expect("channel");
        channel.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
        // Declared here too, so events are collected even before the worker's first start.
        channel
            .exchange_declare(
                names.result_exchange.clone().into(),
                ExchangeKind::Topic,
                ExchangeDeclareOptions { durable: true, ..Default::default() },
                FieldTable::default(),
            )
            .await
            .unwrap();
        let q = channel
            .queue_declare(
                "".into(),
                QueueDeclareOptions { exclusive: true, ..Default::default() },
                FieldTable::default(),
            )
            .await
            .unwrap();
        channel
            .queue_bind(
                q.name().clone(),
                names.result_exchange.clone().into(),
                "#".into(),
                Default::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        let events = channel
            .basic_consume(q.name().clone(), "harness".into(), BasicConsumeOptions::default(), FieldTable::default())
            .await
            .unwrap();
        Harness {
            id,
            client,
            namespace: String::new(),
            names,
            instance_id: instance_id.map(str::to_string),
            extra_args: Vec::new(),
            extra_env: Vec::new(),
            worker_amqp_url: amqp_url(),
            worker: None,
            http_port: 0,
            conn,
            channel,
            events,
            received: Vec::new(),
        }
        .with_namespace()
    }

    fn with_namespace(mut self) -> Self {
        self.namespace = self.id.clone();
        self
    }

    /// Jobs in the test namespace.
    pub fn jobs(&self) -> Api<Job> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    /// Pods in the test namespace.
    pub fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    /// The worker command for this test's namespace and queues.
    fn worker_command(&self, worker_id: &str, port: u16) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_k8s-job-worker"));
        cmd.args(["--log-format", "json", "run"])
            .env("RUST_LOG", "info,k8s_job_worker=debug")
            .env("AMQP_URL", &self.worker_amqp_url)
            .env("K8S_NAMESPACE", &self.namespace)
            .env("AMQP_REQUEST_QUEUE", &self.names.request_queue)
            .env("AMQP_CONTROL_QUEUE", &self.names.control_queue)
            .env("AMQP_RESULT_EXCHANGE", &self.names.result_exchange)
            .env("AMQP_DEAD_LETTER_EXCHANGE", &self.names.dead_letter_exchange)
            .env("AMQP_DEAD_LETTER_QUEUE", &self.names.dead_letter_queue)
            .env("HTTP_LISTEN", format!("127.0.0.1:{port}"))
            .env("WORKER_ID", worker_id)
            .env_remove("K8S_GALAXY_INSTANCE_ID")
            .args(&self.extra_args)
            .envs(self.extra_env.iter().cloned())
            .stdout(Stdio::null())
            // Appended: a start retried on another port keeps the failed attempt's log.
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(format!("{}/{worker_id}.worker.log", log_dir()))
                    .unwrap(),
            );
        if let Some(instance) = &self.instance_id {
            cmd.env("K8S_GALAXY_INSTANCE_ID", instance);
        }
        cmd
    }

    /// Starts the worker binary and waits until `/readyz` says ready.
    pub async fn start_worker(&mut self) {
        let (child, port) = self.spawn_ready(&format!("{}-worker", self.id)).await;
        self.http_port = port;
        self.worker = Some(child);
    }

    /// Starts another replica on the same queues and namespace.
    pub async fn second_replica(&self, name: &str) -> Replica {
        let (child, port) = self.spawn_ready(&format!("{}-{name}", self.id)).await;
        Replica { child: Some(child), port }
    }

    /// Spawns a worker on a free port and waits until that worker is ready. Tests run in
    /// parallel: a port can be taken between choosing and binding it, so a worker that exits
    /// is started again on another port, and readiness counts only with this worker's id.
    async fn spawn_ready(&self, worker_id: &str) -> (Child, u16) {
        for _ in 0..5 {
            let port = free_port();
            let mut child = self.worker_command(worker_id, port).spawn().expect("start worker");
            if wait_ready(port, worker_id, &mut child).await {
                return (child, port);
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("worker {worker_id} exited at start five times (see its log in {})", log_dir());
    }

    /// Sends SIGTERM and returns how long the worker took to exit, and its exit status.
    pub fn terminate_worker(&mut self) -> (Duration, std::process::ExitStatus) {
        let mut child = self.worker.take().expect("worker running");
        let started = Instant::now();
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let status = child.wait().unwrap();
        (started.elapsed(), status)
    }

    /// `/readyz` status code.
    pub async fn readyz(&self) -> Option<u16> {
        http_get(&format!("http://127.0.0.1:{}/readyz", self.http_port)).await.map(|(code, _)| code)
    }

    /// `/metrics` text.
    pub async fn metrics(&self) -> String {
        http_get(&format!("http://127.0.0.1:{}/metrics", self.http_port))
            .await
            .map(|(_, body)| body)
            .unwrap_or_default()
    }

    /// SIGKILLs the worker.
    pub fn kill_worker(&mut self) {
        if let Some(mut child) = self.worker.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Publishes a raw body to the request queue (with confirm).
    pub async fn publish_raw(&self, queue: &str, body: &[u8]) {
        let confirm = self
            .channel
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions { mandatory: true, ..Default::default() },
                body,
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(matches!(confirm, lapin::Confirmation::Ack(None)), "publish to {queue} not routed: {confirm:?}");
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
            if let Ok(Some(Ok(delivery))) = tokio::time::timeout(left, self.events.next()).await {
                let _ = delivery.ack(BasicAckOptions::default()).await;
                let event: JobEvent = serde_json::from_slice(&delivery.data).expect("event matches the schema");
                self.received.push(event);
            }
        }
    }

    /// Events of a job up to and including its first terminal one.
    pub async fn until_terminal(&mut self, job_id: &str) -> Vec<JobEvent> {
        self.events_until(job_id, Duration::from_secs(60), |e| e.iter().any(|e| e.state.is_terminal())).await
    }

    /// Waits `quiet` more and returns every event of the job received so far.
    pub async fn settle(&mut self, job_id: &str, quiet: Duration) -> Vec<JobEvent> {
        let deadline = Instant::now() + quiet;
        while let Ok(Some(Ok(delivery))) =
            tokio::time::timeout(deadline.saturating_duration_since(Instant::now()), self.events.next()).await
        {
            let _ = delivery.ack(BasicAckOptions::default()).await;
            self.received.push(serde_json::from_slice(&delivery.data).unwrap());
        }
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
        for q in [&self.names.request_queue, &self.names.control_queue, &self.names.dead_letter_queue] {
            let _ = self.channel.queue_delete(q.clone().into(), QueueDeleteOptions::default()).await;
        }
        for e in [&self.names.result_exchange, &self.names.dead_letter_exchange] {
            let _ = self.channel.exchange_delete(e.clone().into(), ExchangeDeleteOptions::default()).await;
        }
        let _ = self.conn.close(200, "done".into()).await;
    }
}

/// An extra worker process.
pub struct Replica {
    pub child: Option<Child>,
    pub port: u16,
}

impl Replica {
    /// SIGKILLs it.
    pub fn kill_worker(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill_worker();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Whether `child` became ready on `port` (false as soon as it exits); panics after 30 s.
async fn wait_ready(port: u16, worker_id: &str, child: &mut Child) -> bool {
    let url = format!("http://127.0.0.1:{port}/readyz");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if child.try_wait().ok().flatten().is_some() {
            return false;
        }
        let ours = format!("worker_id={worker_id}\n");
        if http_get(&url).await.is_some_and(|(code, body)| code == 200 && body.contains(&ours)) {
            return true;
        }
        assert!(Instant::now() < deadline, "timed out after 30 s waiting for worker {worker_id} to be ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.kill_worker();
    }
}

/// Where worker logs of the tests go (kept for debugging failures).
pub fn log_dir() -> String {
    let dir = std::env::var("TEST_LOG_DIR").unwrap_or_else(|_| format!("{}/test-logs", env!("CARGO_TARGET_TMPDIR")));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Minimal HTTP GET on 127.0.0.1 (status code and body).
pub async fn http_get(url: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://")?;
    let (host, path) = rest.split_once('/').map(|(h, p)| (h, format!("/{p}")))?;
    let mut stream = tokio::net::TcpStream::connect(host).await.ok()?;
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut buf = Vec::new();
    stream.read_to_end(&mut buf).await.ok()?;
    let text = String::from_utf8_lossy(&buf).to_string();
    let code = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Some((code, body))
}

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

/// Labels of a map, for assertions.
pub fn labels(job: &Job) -> BTreeMap<String, String> {
    job.metadata.labels.clone().unwrap_or_default()
}
