//! The chaos run's own broker client: publishes requests and cancels (retrying through broker
//! restarts), collects every event from a durable queue, and counts the outcome.

use std::{
    collections::{BTreeMap, HashMap},
    time::{Duration, Instant},
};

use futures::StreamExt;
use k8s_job_worker::domain::event::{JobEvent, JobState};
use k8s_openapi::api::batch::v1::Job;
use kube::api::{Api, ListParams};
use lapin::{
    options::*, types::FieldTable, BasicProperties, Channel, Confirmation, Connection, ConnectionProperties,
    ExchangeKind,
};
use serde_json::json;
use tokio::sync::Mutex;

use crate::Kind;

/// Queue and exchange names of one run.
#[derive(Clone)]
pub struct Names {
    pub requests: String,
    pub control: String,
    pub events: String,
    pub dlx: String,
    pub dlq: String,
    pub tally: String,
}

impl Names {
    pub fn new(run: &str) -> Self {
        Names {
            requests: format!("{run}.requests"),
            control: format!("{run}.control"),
            events: format!("{run}.events"),
            dlx: format!("{run}.dlx"),
            dlq: format!("{run}.dead-letter"),
            tally: format!("{run}.tally"),
        }
    }
}

/// Events received, and a channel to publish on.
pub struct Tally {
    url: String,
    names: Names,
    events: Mutex<Vec<(Instant, JobEvent)>>,
    channel: Mutex<Option<(Connection, Channel)>>,
}

impl Tally {
    pub async fn start(url: String, names: Names) -> anyhow::Result<std::sync::Arc<Tally>> {
        let tally =
            std::sync::Arc::new(Tally { url, names, events: Mutex::new(Vec::new()), channel: Mutex::new(None) });
        tally.channel().await?;
        let t = tally.clone();
        tokio::spawn(async move { t.collect().await });
        Ok(tally)
    }

    async fn channel(&self) -> anyhow::Result<Channel> {
        let mut guard = self.channel.lock().await;
        if let Some((conn, ch)) = guard.as_ref() {
            if conn.status().connected() && ch.status().connected() {
                return Ok(ch.clone());
            }
        }
        let conn = Connection::connect(&self.url, ConnectionProperties::default()).await?;
        let ch = conn.create_channel().await?;
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
        let durable = ExchangeDeclareOptions { durable: true, ..Default::default() };
        ch.exchange_declare(self.names.events.clone().into(), ExchangeKind::Topic, durable, FieldTable::default())
            .await?;
        let q = QueueDeclareOptions { durable: true, ..Default::default() };
        ch.queue_declare(self.names.tally.clone().into(), q, FieldTable::default()).await?;
        ch.queue_bind(
            self.names.tally.clone().into(),
            self.names.events.clone().into(),
            "#".into(),
            Default::default(),
            FieldTable::default(),
        )
        .await?;
        *guard = Some((conn, ch.clone()));
        Ok(ch)
    }

    /// Consumes the tally queue forever, reconnecting after broker restarts.
    async fn collect(&self) {
        loop {
            let consumer = match self.channel().await {
                Ok(ch) => ch
                    .basic_consume(
                        self.names.tally.clone().into(),
                        "tally".into(),
                        BasicConsumeOptions::default(),
                        FieldTable::default(),
                    )
                    .await
                    .ok(),
                Err(_) => None,
            };
            if let Some(mut consumer) = consumer {
                while let Some(Ok(delivery)) = consumer.next().await {
                    let _ = delivery.ack(BasicAckOptions::default()).await;
                    if let Ok(event) = serde_json::from_slice::<JobEvent>(&delivery.data) {
                        self.events.lock().await.push((Instant::now(), event));
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    async fn publish(&self, queue: &str, body: &[u8]) {
        loop {
            if let Ok(ch) = self.channel().await {
                let props = BasicProperties::default().with_delivery_mode(2);
                let opts = BasicPublishOptions { mandatory: true, ..Default::default() };
                if let Ok(Ok(Confirmation::Ack(None))) = tokio::time::timeout(Duration::from_secs(10), async {
                    ch.basic_publish("".into(), queue.into(), opts, body, props).await?.await
                })
                .await
                {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    pub async fn wait_for_queues(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ch = self.channel().await?;
            let passive = QueueDeclareOptions { passive: true, ..Default::default() };
            if ch.queue_declare(self.names.requests.clone().into(), passive, FieldTable::default()).await.is_ok() {
                return Ok(());
            }
            *self.channel.lock().await = None; // a failed passive declare closes the channel
            anyhow::ensure!(Instant::now() < deadline, "the workers never declared {}", self.names.requests);
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    pub async fn publish_request(&self, request: &serde_json::Value) {
        self.publish(&self.names.requests, &serde_json::to_vec(request).unwrap_or_default()).await
    }

    pub async fn publish_cancel(&self, job_id: &str) {
        let body = json!({"schema": "k8s-job-worker/job-cancel/v1", "job_id": job_id, "reason": "chaos cancel"});
        self.publish(&self.names.control, &serde_json::to_vec(&body).unwrap_or_default()).await
    }

    /// Submits a probe job after a restart; the time until its `submitted` event is the recovery time.
    pub async fn probe(&self, job_id: &str, since: Instant) -> Duration {
        let body = json!({"schema": "k8s-job-worker/job-request/v1", "job_id": job_id, "command_line": "true", "image": "busybox"});
        self.publish(&self.names.requests, &serde_json::to_vec(&body).unwrap_or_default()).await;
        loop {
            if let Some((at, _)) = self.events.lock().await.iter().find(|(_, e)| e.job_id == job_id) {
                return at.duration_since(since);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn without_terminal<'a>(&self, ids: impl Iterator<Item = &'a String>) -> usize {
        let events = self.events.lock().await;
        ids.filter(|id| !events.iter().any(|(_, e)| &e.job_id == *id && e.state.is_terminal())).count()
    }

    async fn dead_lettered(&self) -> u32 {
        let Ok(ch) = self.channel().await else { return 0 };
        let passive = QueueDeclareOptions { passive: true, ..Default::default() };
        ch.queue_declare(self.names.dlq.clone().into(), passive, FieldTable::default())
            .await
            .map(|q| q.message_count())
            .unwrap_or(0)
    }

    pub async fn cleanup(&self) {
        if let Ok(ch) = self.channel().await {
            for q in [&self.names.requests, &self.names.control, &self.names.dlq, &self.names.tally] {
                let _ = ch.queue_delete(q.clone().into(), QueueDeleteOptions::default()).await;
            }
            for e in [&self.names.events, &self.names.dlx] {
                let _ = ch.exchange_delete(e.clone().into(), ExchangeDeleteOptions::default()).await;
            }
        }
    }
}

/// The figures of a run.
pub struct Report {
    pub figures: BTreeMap<&'static str, serde_json::Value>,
    pub lost: usize,
    pub duplicate_jobs: usize,
    pub duplicate_events: usize,
    pub duplicates_deduplicable: bool,
}

impl Report {
    pub fn passed(&self, allowed_duplicates: usize) -> bool {
        self.lost == 0
            && self.duplicate_jobs == 0
            && self.duplicates_deduplicable
            && self.duplicate_events <= allowed_duplicates
    }

    pub fn table(&self) -> String {
        self.figures.iter().map(|(k, v)| format!("{k:<44} {v}")).collect::<Vec<_>>().join("\n")
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::to_value(&self.figures).unwrap_or_default()
    }
}

pub async fn report(
    client: &kube::Client,
    namespace: &str,
    tally: &Tally,
    expected: &HashMap<String, Kind>,
    kills: usize,
    recoveries: &[(&'static str, Duration)],
) -> anyhow::Result<Report> {
    let jobs: Api<Job> = Api::namespaced(client.clone(), namespace);
    let listed = jobs.list(&ListParams::default()).await?.items;
    let events = tally.events.lock().await;
    let mut terminal: HashMap<&str, Vec<&JobEvent>> = HashMap::new();
    for (_, e) in events.iter().filter(|(_, e)| e.state.is_terminal()) {
        terminal.entry(e.job_id.as_str()).or_default().push(e);
    }
    let lost_ids: Vec<&String> = expected.keys().filter(|id| !terminal.contains_key(id.as_str())).collect();
    let lost = lost_ids.len();
    for id in &lost_ids {
        let seen: Vec<&str> = events.iter().filter(|(_, e)| &e.job_id == *id).map(|(_, e)| e.state.as_str()).collect();
        eprintln!("[chaos] lost: {id} (events seen: {seen:?})");
    }
    let doubled: Vec<&Vec<&JobEvent>> =
        expected.keys().filter_map(|id| terminal.get(id.as_str())).filter(|v| v.len() > 1).collect();
    let deduplicable = doubled.iter().all(|v| v.iter().all(|e| e.event_id == v[0].event_id));
    for v in &doubled {
        let what: Vec<String> =
            v.iter().map(|e| format!("{} by {} ({})", e.state.as_str(), e.worker_id, &e.event_id[..8])).collect();
        eprintln!("[chaos] repeated terminal event: {} {what:?}", v[0].job_id);
    }
    // A duplicate Job is a second Job for one request: a replacement reported by `submitted`.
    let duplicate_jobs =
        events.iter().filter(|(_, e)| e.state == JobState::Submitted && e.reason.contains("replaced")).count();
    let unexpected = expected
        .iter()
        .filter(|(id, kind)| {
            let want = match kind {
                Kind::Success => JobState::Succeeded,
                Kind::Failure => JobState::Failed,
                Kind::Oom => JobState::OomKilled,
                Kind::Cancel => JobState::Cancelled,
            };
            terminal.get(id.as_str()).is_some_and(|v| v.iter().all(|e| e.state != want))
        })
        .count();
    let mut figures = BTreeMap::new();
    figures.insert("requests published", json!(expected.len()));
    figures.insert(
        "jobs created (Kubernetes Jobs, excl. probes)",
        json!(listed.iter().filter(|j| !j.metadata.name.as_deref().unwrap_or("").contains("probe")).count()),
    );
    figures.insert("duplicate jobs", json!(duplicate_jobs));
    figures.insert("jobs with no terminal event (lost)", json!(lost));
    figures.insert("jobs with >1 terminal event", json!(doubled.len()));
    figures.insert("  ... all sharing one event id", json!(deduplicable));
    figures.insert("jobs with an unexpected outcome", json!(unexpected));
    figures.insert("requests dead-lettered", json!(tally.dead_lettered().await));
    figures.insert("events received", json!(events.len()));
    figures.insert("replica SIGKILLs", json!(kills));
    for (what, took) in recoveries {
        let key: &'static str = if *what == "rabbitmq" {
            "recovery after RabbitMQ restart (s)"
        } else {
            "recovery after kube-apiserver restart (s)"
        };
        figures.insert(key, json!((took.as_secs_f64() * 10.0).round() / 10.0));
    }
    Ok(Report { figures, lost, duplicate_jobs, duplicate_events: doubled.len(), duplicates_deduplicable: deduplicable })
}
