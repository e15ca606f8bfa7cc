//! The chaos run's own broker client: publishes requests and cancels (retrying through broker
//! restarts), collects every event from a durable queue, and counts the outcome.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::{Duration, Instant},
};

use futures::StreamExt;
use k8s_job_worker::domain::event::{JobEvent, JobState};
use k8s_job_worker_testkit::{GalaxyClient, Names};
use k8s_openapi::api::batch::v1::Job;
use kube::api::{Api, ListParams};
use lapin::{options::*, types::FieldTable};
use serde_json::json;
use tokio::sync::Mutex;

use crate::Kind;

/// Events received, and a client to publish with.
pub struct Tally {
    url: String,
    names: Names,
    /// The durable queue bound to the result exchange that collects every event.
    tally_queue: String,
    events: Mutex<Vec<(Instant, JobEvent)>>,
    client: Mutex<Option<Arc<GalaxyClient>>>,
}

impl Tally {
    pub async fn start(url: String, names: Names, tally_queue: String) -> anyhow::Result<Arc<Tally>> {
        let tally =
            Arc::new(Tally { url, names, tally_queue, events: Mutex::new(Vec::new()), client: Mutex::new(None) });
        tally.client().await?;
        let t = tally.clone();
        tokio::spawn(async move { t.collect().await });
        Ok(tally)
    }

    /// The client, connecting again after a broker restart.
    async fn client(&self) -> anyhow::Result<Arc<GalaxyClient>> {
        let mut guard = self.client.lock().await;
        if let Some(client) = guard.as_ref().filter(|c| c.is_open()) {
            return Ok(client.clone());
        }
        let client = Arc::new(GalaxyClient::connect(&self.url).await?);
        *guard = Some(client.clone());
        Ok(client)
    }

    /// Consumes the tally queue forever, reconnecting after broker restarts.
    async fn collect(&self) {
        loop {
            let consumer = match self.client().await {
                Ok(c) => c.bind_events(&self.names.result_exchange, "#", Some(&self.tally_queue)).await.ok(),
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

    /// Publishes until the broker confirms it, through broker restarts.
    async fn publish(&self, queue: &str, body: &[u8]) {
        loop {
            if let Ok(client) = self.client().await {
                if client.publish(queue, body).await.is_ok() {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    pub async fn wait_for_queues(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let client = self.client().await?;
            let passive = QueueDeclareOptions { passive: true, ..Default::default() };
            let queue = self.names.request_queue.clone().into();
            if client.channel.queue_declare(queue, passive, FieldTable::default()).await.is_ok() {
                return Ok(());
            }
            *self.client.lock().await = None; // a failed passive declare closes the channel
            anyhow::ensure!(Instant::now() < deadline, "the workers never declared {}", self.names.request_queue);
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    pub async fn publish_request(&self, request: &serde_json::Value) {
        self.publish(&self.names.request_queue, &serde_json::to_vec(request).unwrap_or_default()).await
    }

    /// Asks for a job's state (as Galaxy does for every job it recovers at start-up).
    pub async fn publish_status(&self, job_id: &str) {
        let body = json!({"schema": "k8s-job-worker/job-cancel/v1", "job_id": job_id, "action": "status"});
        self.publish(&self.names.control_queue, &serde_json::to_vec(&body).unwrap_or_default()).await
    }

    /// Publishes a raw message to the control queue (a forged intent).
    pub async fn publish_control(&self, body: &serde_json::Value) {
        self.publish(&self.names.control_queue, &serde_json::to_vec(body).unwrap_or_default()).await
    }

    pub async fn publish_cancel(&self, job_id: &str) {
        let body = json!({"schema": "k8s-job-worker/job-cancel/v1", "job_id": job_id, "reason": "chaos cancel"});
        self.publish(&self.names.control_queue, &serde_json::to_vec(&body).unwrap_or_default()).await
    }

    /// Submits a probe job after a restart; the time until its `submitted` event is the recovery time.
    pub async fn probe(&self, job_id: &str, since: Instant) -> Duration {
        let body = json!({"schema": "k8s-job-worker/job-request/v1", "job_id": job_id, "command_line": "true", "image": "busybox"});
        self.publish(&self.names.request_queue, &serde_json::to_vec(&body).unwrap_or_default()).await;
        loop {
            if let Some((at, _)) = self.events.lock().await.iter().find(|(_, e)| e.job_id == job_id) {
                return at.duration_since(since);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// How many of `ids` got a terminal event after `since`.
    pub async fn answered_again<'a>(&self, ids: impl Iterator<Item = &'a String>, since: Instant) -> usize {
        let events = self.events.lock().await;
        ids.filter(|id| events.iter().any(|(at, e)| *at > since && &e.job_id == *id && e.state.is_terminal())).count()
    }

    pub async fn without_terminal<'a>(&self, ids: impl Iterator<Item = &'a String>) -> usize {
        let events = self.events.lock().await;
        ids.filter(|id| !events.iter().any(|(_, e)| &e.job_id == *id && e.state.is_terminal())).count()
    }

    /// The dead letters, by the queue they came from.
    async fn dead_lettered(&self) -> HashMap<String, u32> {
        let mut by_queue = HashMap::new();
        let Ok(client) = self.client().await else { return by_queue };
        let queue = &self.names.dead_letter_queue;
        while let Ok(Some(msg)) = client.channel.basic_get(queue.clone().into(), BasicGetOptions { no_ack: true }).await
        {
            let source = k8s_job_worker::amqp::publisher::header_str(
                msg.delivery.properties.headers(),
                "x-k8s-job-worker-source-queue",
            );
            *by_queue.entry(source.unwrap_or_default()).or_default() += 1;
        }
        by_queue
    }

    pub async fn cleanup(&self) {
        if let Ok(client) = self.client().await {
            let n = &self.names;
            for q in [&n.request_queue, &n.control_queue, &n.dead_letter_queue, &n.dead_letter_inbox, &self.tally_queue]
            {
                let _ = client.channel.queue_delete(q.clone().into(), QueueDeleteOptions::default()).await;
            }
            for e in [&n.result_exchange, &n.dead_letter_exchange] {
                let _ = client.channel.exchange_delete(e.clone().into(), ExchangeDeleteOptions::default()).await;
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
    pub run_twice: usize,
    pub dead_lettered: u32,
    pub redelivered_not_answered_from_record: usize,
    /// Status answers `lost` (a verdict) for jobs whose request was still waiting.
    pub lost_answers: usize,
    /// Forged intents that were not dead-lettered, or left a Job or an event.
    pub forgeries_not_refused: usize,
}

/// What happened during a run besides the events.
pub struct Outcome<'a> {
    /// Replica SIGKILLs.
    pub kills: usize,
    /// Recovery times after restarts.
    pub recoveries: &'a [(&'static str, Duration)],
    /// Where every tool run left a line.
    pub runs: &'a std::path::Path,
    /// Requests published again after their job was cleaned up.
    pub redelivered: &'a [String],
    /// When they were.
    pub before_redelivery: Instant,
    /// Finished Jobs deleted by "someone else" as soon as they finished.
    pub deleted_by_others: usize,
    /// Job ids of the forged intents published on the control queue.
    pub forged: &'a [String],
}

impl Report {
    pub fn passed(&self, allowed_duplicates: usize) -> bool {
        self.lost == 0
            && self.duplicate_jobs == 0
            && self.duplicates_deduplicable
            && self.duplicate_events <= allowed_duplicates
            && self.run_twice == 0
            && self.dead_lettered == 0
            && self.redelivered_not_answered_from_record == 0
            && self.lost_answers == 0
            && self.forgeries_not_refused == 0
    }

    pub fn table(&self) -> String {
        self.figures.iter().map(|(k, v)| format!("{k:<44} {v}")).collect::<Vec<_>>().join("\n")
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::to_value(&self.figures).unwrap_or_default()
    }
}

/// The worker's answer to a request that meets the tombstone of a cancel that came first.
const CANCELLED_FIRST: &str = "cancelled before the request was processed";

pub async fn report(
    client: &kube::Client,
    namespace: &str,
    tally: &Tally,
    expected: &HashMap<String, Kind>,
    outcome: &Outcome<'_>,
) -> anyhow::Result<Report> {
    let jobs: Api<Job> = Api::namespaced(client.clone(), namespace);
    let listed = jobs.list(&ListParams::default()).await?.items;
    let all_events = tally.events.lock().await;
    // The chaos itself, before any request was published again.
    let events: Vec<&(Instant, JobEvent)> =
        all_events.iter().filter(|(at, _)| *at <= outcome.before_redelivery).collect();
    let mut terminal: HashMap<&str, Vec<&JobEvent>> = HashMap::new();
    for (_, e) in events.iter().filter(|(_, e)| e.state.is_terminal()) {
        terminal.entry(e.job_id.as_str()).or_default().push(e);
    }
    // Published again after cleanup: the answer must be the recorded outcome, same event id.
    let not_from_record: Vec<&String> = outcome
        .redelivered
        .iter()
        .filter(|id| {
            let first = terminal.get(id.as_str()).and_then(|v| v.first());
            let again = all_events
                .iter()
                .find(|(at, e)| *at > outcome.before_redelivery && &e.job_id == *id && e.state.is_terminal());
            !matches!((first, again), (Some(f), Some((_, a))) if f.event_id == a.event_id)
        })
        .collect();
    for id in &not_from_record {
        eprintln!("[chaos] published again, not answered from its record: {id}");
    }
    let run_twice: Vec<String> = std::fs::read_dir(outcome.runs)?
        .filter_map(|entry| entry.ok())
        .filter(|entry| std::fs::read_to_string(entry.path()).is_ok_and(|runs| runs.lines().count() > 1))
        .map(|entry| entry.file_name().to_string_lossy().to_string())
        .collect();
    for id in &run_twice {
        eprintln!("[chaos] ran twice: {id}");
    }
    let lost_ids: Vec<&String> = expected.keys().filter(|id| !terminal.contains_key(id.as_str())).collect();
    let lost = lost_ids.len();
    for id in &lost_ids {
        let seen: Vec<&str> = events.iter().filter(|(_, e)| &e.job_id == *id).map(|(_, e)| e.state.as_str()).collect();
        eprintln!("[chaos] lost: {id} (events seen: {seen:?})");
    }
    // A repeat is a terminal event told again unasked. Answers are not repeats (same event id):
    // to a status question (the "Galaxy" of the status storm), and to a request that meets the
    // tombstone of a cancel that came first (the cancel told it too).
    let answer = |e: &JobEvent| e.reason.starts_with("status:") || e.reason == CANCELLED_FIRST;
    let unasked: HashMap<&str, Vec<&JobEvent>> =
        terminal.iter().map(|(id, v)| (*id, v.iter().copied().filter(|e| !answer(e)).collect())).collect();
    let doubled: Vec<&Vec<&JobEvent>> =
        expected.keys().filter_map(|id| unasked.get(id.as_str())).filter(|v| v.len() > 1).collect();
    let deduplicable = expected
        .keys()
        .filter_map(|id| terminal.get(id.as_str()))
        .all(|v| v.iter().all(|e| e.event_id == v[0].event_id));
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
    figures.insert("jobs with >1 terminal event (unasked)", json!(doubled.len()));
    figures.insert("  ... all terminal events of a job share one event id", json!(deduplicable));
    figures.insert("jobs with an unexpected outcome", json!(unexpected));
    let dead_letters = tally.dead_lettered().await;
    let dead_lettered = dead_letters.get(&tally.names.request_queue).copied().unwrap_or(0);
    figures.insert("requests dead-lettered", json!(dead_lettered));
    // A status storm while the requests waited: `unknown`, never a verdict.
    let status: Vec<&JobEvent> = events.iter().map(|(_, e)| e).filter(|e| e.reason.starts_with("status:")).collect();
    let lost_answers = status.iter().filter(|e| e.state == JobState::Lost).count();
    figures.insert("status answers", json!(status.len()));
    figures.insert(
        "  ... unknown (the request still waiting)",
        json!(status.iter().filter(|e| e.state == JobState::Unknown).count()),
    );
    figures.insert("  ... lost (must be 0)", json!(lost_answers));
    // Forged intents on the control queue: dead-lettered, nothing created, no event.
    let forged_left = outcome
        .forged
        .iter()
        .filter(|id| {
            all_events.iter().any(|(_, e)| &e.job_id == *id)
                || listed.iter().any(|j| j.metadata.name.as_deref().is_some_and(|n| n.contains(id.as_str())))
        })
        .count();
    let forged_dead = dead_letters.get(&tally.names.control_queue).copied().unwrap_or(0) as usize;
    let forgeries_not_refused = forged_left + outcome.forged.len().saturating_sub(forged_dead);
    figures.insert(
        "forged intents dead-lettered, nothing created",
        json!(format!("{forged_dead} of {}", outcome.forged.len())),
    );
    figures.insert("jobs whose tool ran twice", json!(run_twice.len()));
    figures.insert("finished Jobs deleted at once by someone else", json!(outcome.deleted_by_others));
    figures.insert("requests published again after cleanup", json!(outcome.redelivered.len()));
    figures.insert(
        "  ... answered from their record (same event id)",
        json!(outcome.redelivered.len() - not_from_record.len()),
    );
    figures.insert("events received", json!(all_events.len()));
    figures.insert("replica SIGKILLs", json!(outcome.kills));
    for (what, took) in outcome.recoveries {
        let key: &'static str = if *what == "rabbitmq" {
            "recovery after RabbitMQ restart (s)"
        } else {
            "recovery after kube-apiserver came back (s)"
        };
        figures.insert(key, json!((took.as_secs_f64() * 10.0).round() / 10.0));
    }
    Ok(Report {
        figures,
        lost,
        duplicate_jobs,
        duplicate_events: doubled.len(),
        duplicates_deduplicable: deduplicable,
        run_twice: run_twice.len(),
        dead_lettered,
        redelivered_not_answered_from_record: not_from_record.len(),
        lost_answers,
        forgeries_not_refused,
    })
}
