//! The Kubernetes side of submitting, cancelling and finishing Jobs: create-or-adopt,
//! replace, tombstone, stop, resubmit, cleanup and log tails. Every call is one API request;
//! nothing polls but the bounded wait for a replaced Job to disappear. It takes its own
//! client and settings, and carries out what the domain decided.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use k8s_openapi::api::{
    batch::v1::Job,
    core::v1::{Event, Pod},
};
use kube::{
    api::{Api, DeleteParams, ListParams, LogParams, Patch, PatchParams, PostParams, Preconditions, PropagationPolicy},
    Client,
};
use serde_json::json;
use tokio::sync::Semaphore;

use super::{
    render,
    view::{check_owner, job_meta, pod_owner, pod_view},
    watched::{WatchedJob, WatchedPod},
};
use crate::{
    domain::{
        decision::JobAction,
        event::{self, JobState},
        job::Record,
        keys::{ANN_CANCELLED, ANN_RECORD_UNTIL, ANN_REPLACED, ANN_REPORTED, FINALIZER, LABEL_APP, LABEL_RECORD},
        outcome::PodView,
        ownership::Owner,
        ValidationError,
    },
    error::{Error, Result},
};

/// What the Jobs adapter needs to know.
#[derive(Debug, Clone)]
pub struct JobsConfig {
    /// The namespace of every Job.
    pub namespace: String,
    /// Whether an existing Job of the same request can be trusted and adopted (an instance id
    /// is configured).
    pub trust_existing: bool,
    /// How long an untrusted or outdated Job may take to disappear.
    pub deletion_timeout: Duration,
    /// Job creations in flight at once (`k8s_max_concurrent_creates`).
    pub max_concurrent_creates: usize,
}

/// The Jobs and pods of one namespace.
pub struct Jobs {
    jobs: Api<Job>,
    watched: Api<WatchedJob>,
    pods: Api<Pod>,
    watched_pods: Api<WatchedPod>,
    events: Api<Event>,
    config: JobsConfig,
    creates: Semaphore,
}

fn is_code(err: &kube::Error, code: u16) -> bool {
    matches!(err, kube::Error::Api(e) if e.code == code)
}

/// Whether a write naming a Job's uid met another Job of that name: the apiserver answers
/// 409, or (1.20, merge patches) 422 because `metadata.uid` is immutable.
fn met_another(err: &kube::Error) -> bool {
    match err {
        kube::Error::Api(e) if e.code == 409 => true,
        kube::Error::Api(e) if e.code == 422 => {
            e.details.as_ref().is_some_and(|d| d.causes.iter().any(|c| c.field == "metadata.uid"))
        }
        _ => false,
    }
}

/// A write whose "not found" or "another Job" answer means it has nothing left to do: the
/// Job is gone, or was replaced by another with its name (the uid is a precondition).
fn done_unless_other<T>(result: kube::Result<T>, verb: &'static str) -> Result<()> {
    match result {
        Ok(_) => Ok(()),
        Err(e) if is_code(&e, 404) || met_another(&e) => Ok(()),
        Err(source) => Err(Error::Kube { verb, source }),
    }
}

impl Jobs {
    /// The Jobs adapter for `config.namespace`.
    pub fn new(client: Client, config: JobsConfig) -> Self {
        let ns = &config.namespace;
        Jobs {
            jobs: Api::namespaced(client.clone(), ns),
            watched: Api::namespaced(client.clone(), ns),
            pods: Api::namespaced(client.clone(), ns),
            watched_pods: Api::namespaced(client.clone(), ns),
            events: Api::namespaced(client, ns),
            creates: Semaphore::new(config.max_concurrent_creates.max(1)),
            config,
        }
    }

    /// The namespace.
    pub fn namespace(&self) -> &str {
        &self.config.namespace
    }

    /// Jobs decoded slim (for watches and lists).
    pub fn watched_jobs(&self) -> Api<WatchedJob> {
        self.watched.clone()
    }

    /// Pods decoded slim (for watches and lists).
    pub fn watched_pods(&self) -> Api<WatchedPod> {
        self.watched_pods.clone()
    }

    /// The Jobs matching `selector`, handed to `each` a page ([`LIST_PAGE`]) at a time, so
    /// a full list never holds every Job at once.
    pub async fn each_job_page(&self, selector: &str, each: impl FnMut(Vec<WatchedJob>)) -> Result<()> {
        each_page(&self.watched, ListParams::default().labels(selector).limit(LIST_PAGE), each).await
    }

    /// The pods matching `selector` and `fields`, handed to `each` a page at a time.
    pub async fn each_pod_page(
        &self,
        selector: &str,
        fields: &str,
        read: Read,
        each: impl FnMut(Vec<WatchedPod>),
    ) -> Result<()> {
        let params = ListParams::default().labels(selector).fields(fields);
        let params = match read {
            Read::Latest => params.limit(LIST_PAGE),
            // No page size: kube leaves `resourceVersion=0` out beside one (the list would go to etcd).
            Read::Cached => ListParams { resource_version: Some("0".into()), ..params },
        };
        each_page(&self.watched_pods, params, each).await
    }

    /// Every pod of the Job named `name`, listed now, as the tracker reads them.
    pub async fn pods_of(&self, name: &str) -> Result<Vec<WatchedPod>> {
        let params = ListParams::default().labels(&format!("{LABEL_APP}={name}"));
        Ok(self.watched_pods.list(&params).await.map_err(Error::kube("list"))?.items)
    }

    /// The Job of this name, as the tracker reads it.
    pub async fn get(&self, name: &str) -> Result<Option<WatchedJob>> {
        self.watched.get_opt(name).await.map_err(Error::kube("get"))
    }

    /// Creates the Job, or adopts / replaces the one that already has its name when that one
    /// is `owner`'s; a Job of another job's (or not the worker's at all) is left alone and the
    /// request refused ([`ValidationError::NameTaken`]).
    pub async fn create_or_adopt(&self, job: &Job, owner: &Owner, fingerprint: &str) -> Result<JobAction> {
        // Holding a permit for the whole exchange bounds the apiserver load, not the deliveries.
        let _permit = self.creates.acquire().await.map_err(|_| Error::ShuttingDown)?;
        let name = job.metadata.name.clone().unwrap_or_default();
        let mut replaced = false;
        for _ in 0..3 {
            match self.jobs.create(&PostParams::default(), job).await {
                Ok(_) => return Ok(if replaced { JobAction::Replaced } else { JobAction::Created }),
                Err(err) if is_code(&err, 409) => {}
                Err(kube::Error::Api(e)) if e.code == 422 || e.code == 400 => {
                    return Err(ValidationError::invalid(
                        "job",
                        format!("the apiserver refused the Job: {}", e.message),
                    )
                    .into())
                }
                Err(source) => return Err(Error::Kube { verb: "create", source }),
            }
            let Some(existing) = self.get(&name).await? else {
                continue; // vanished between create and get: create again
            };
            check_owner(owner, &existing.metadata).map_err(ValidationError::from)?;
            let meta = job_meta(&existing.metadata);
            if meta.cancelled.is_some() {
                return Ok(JobAction::AlreadyCancelled);
            }
            let trusted = self.config.trust_existing;
            if trusted && meta.fingerprint == fingerprint && meta.reported.is_some() {
                return Ok(JobAction::AlreadyFinished); // answered from its record, never run again
            }
            // One that someone else is deleting is adopted too while the worker's finalizer holds
            // it: its outcome is reported before it goes (creating it again would run it twice).
            if trusted && meta.fingerprint == fingerprint && !meta.replaced && (!meta.deleting || meta.held) {
                return Ok(JobAction::Adopted);
            }
            let why = if !trusted {
                "no k8s_galaxy_instance_id configured: an existing Job cannot be trusted"
            } else if meta.fingerprint != fingerprint {
                "a newer request with different parameters replaces it"
            } else {
                "it was already being deleted"
            };
            tracing::info!(job_id = %meta.job_id, job_name = %name, why, "replacing existing Job");
            if !meta.deleting || meta.held {
                self.mark_and_delete(&name, &meta.uid, ANN_REPLACED, why).await?;
            }
            self.wait_gone(&name, &meta.uid).await?;
            replaced = true;
        }
        Err(Error::JobConflict(name))
    }

    /// Patches the Job with this uid and lets it go ([`render::releasing`]).
    async fn patch_releasing(&self, name: &str, uid: &str, patch: serde_json::Value) -> kube::Result<Job> {
        let patch = render::releasing(uid, patch);
        self.jobs.patch(name, &PatchParams::default(), &Patch::Strategic(&patch)).await
    }

    /// Annotates a Job (so every watcher knows why it goes away), lets it go and deletes it
    /// with its pods.
    pub async fn mark_and_delete(&self, name: &str, uid: &str, annotation: &str, why: &str) -> Result<()> {
        let patch = json!({"metadata": {"annotations": {annotation: why}}});
        match self.patch_releasing(name, uid, patch).await {
            Ok(_) => self.delete(name, Some(uid)).await,
            other => done_unless_other(other, "patch"), // gone or replaced already
        }
    }

    /// Cancels a Job without deleting it: the annotation tells every replica why it ends, and
    /// `parallelism: 0` makes the job controller delete its pods at once. The reporting
    /// replica deletes the Job itself later, so no watch gap can turn a cancel into `lost`.
    /// The cancel's own event was published: the Job is let go at once.
    pub async fn mark_cancelled(&self, name: &str, uid: &str, reason: &str) -> Result<()> {
        let patch = json!({"metadata": {"annotations": {ANN_CANCELLED: reason}}, "spec": {"parallelism": 0}});
        done_unless_other(self.patch_releasing(name, uid, patch).await, "patch")
    }

    /// Deletes a Job and (in the background) its pods; a missing Job is not an error.
    pub async fn delete(&self, name: &str, uid: Option<&str>) -> Result<()> {
        let dp = DeleteParams {
            propagation_policy: Some(PropagationPolicy::Background),
            preconditions: uid.map(|uid| Preconditions { uid: Some(uid.to_string()), resource_version: None }),
            ..DeleteParams::default()
        };
        done_unless_other(self.jobs.delete(name, &dp).await, "delete")
    }

    /// Waits until the Job with this uid is gone (`k8s_timeout_seconds_job_deletion`).
    async fn wait_gone(&self, name: &str, uid: &str) -> Result<()> {
        let deadline = Instant::now() + self.config.deletion_timeout;
        loop {
            match self.jobs.get_opt(name).await.map_err(Error::kube("get"))? {
                None => return Ok(()),
                Some(job) if job.metadata.uid.as_deref() != Some(uid) => return Ok(()),
                Some(_) if Instant::now() >= deadline => {
                    return Err(Error::DeletionTimeout {
                        name: name.to_string(),
                        seconds: self.config.deletion_timeout.as_secs(),
                    })
                }
                Some(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }

    /// The next generation of a preempted Job: the same spec as a new Job of the same name
    /// (new pods, a fresh retrial budget), counted in its `resubmissions` annotation. `None`
    /// when the Job with this uid is gone.
    pub async fn next_generation(&self, name: &str, uid: &str) -> Result<Option<Job>> {
        let Some(old) = self.jobs.get_opt(name).await.map_err(Error::kube("get"))? else { return Ok(None) };
        if old.metadata.uid.as_deref() != Some(uid) {
            return Ok(None); // already replaced
        }
        Ok(Some(super::render::next_generation(&old)))
    }

    /// Carries out a resubmission intent, whatever part of it was done before a crash: the
    /// Job `old_uid` is marked replaced (its end is never reported) and deleted, then `new` is
    /// created. A Job of that name with another uid means it was done already (or a cancel
    /// came first): nothing to do.
    pub async fn resubmit(&self, name: &str, old_uid: &str, new: &Job) -> Result<()> {
        if let Some(current) = self.get(name).await? {
            if current.metadata.uid.as_deref() != Some(old_uid) {
                return Ok(());
            }
            self.mark_and_delete(name, old_uid, ANN_REPLACED, "resubmitted after preemption").await?;
            self.wait_gone(name, old_uid).await?;
        }
        match self.jobs.create(&PostParams::default(), new).await {
            Ok(created) => {
                let meta = job_meta(&created.metadata);
                tracing::info!(job_id = %meta.job_id, job_name = name, resubmissions = meta.resubmissions, "resubmitted after preemption");
                Ok(())
            }
            Err(e) if is_code(&e, 409) => Ok(()), // another replica carried it out
            Err(source) => Err(Error::Kube { verb: "create", source }),
        }
    }

    /// Creates the tombstone that keeps a not-yet-seen request from starting, or returns the
    /// existing Job of that name when there is one.
    pub async fn create_tombstone(&self, tombstone: &Job) -> Result<Option<WatchedJob>> {
        match self.jobs.create(&PostParams::default(), tombstone).await {
            Ok(_) => Ok(None),
            Err(e) if is_code(&e, 409) => self.get(tombstone.metadata.name.as_deref().unwrap_or_default()).await,
            Err(source) => Err(Error::Kube { verb: "create", source }),
        }
    }

    /// Stops the Job with this uid from making more pods (after an OOM kill: retrying with the
    /// same limit is pointless); a replacement of the same name is left alone.
    pub async fn stop(&self, name: &str, uid: &str) -> Result<()> {
        let patch = super::render::stop_patch(uid);
        done_unless_other(self.jobs.patch(name, &PatchParams::default(), &Patch::Merge(&patch)).await, "patch")
    }

    /// Records on a kept Job that its terminal event went out, so a restarted worker does not
    /// send it again, and lets it go; only now may Kubernetes remove it after `ttl` seconds
    /// (`k8s_job_ttl_secs_after_finished`). A Job someone else deletes goes at once.
    pub async fn mark_reported(&self, name: &str, uid: &str, state: JobState, ttl: Option<i32>) -> Result<()> {
        let mut patch = json!({"metadata": {"annotations": {ANN_REPORTED: state.as_str()}}});
        if let Some(ttl) = ttl {
            patch["spec"] = json!({"ttlSecondsAfterFinished": ttl});
        }
        done_unless_other(self.patch_releasing(name, uid, patch).await, "patch")
    }

    /// Marks a Job reported, then deletes it and its pods (every replica's last sight of it
    /// says its event went out).
    pub async fn retire(&self, name: &str, uid: &str, state: JobState) -> Result<()> {
        self.mark_reported(name, uid, state, None).await?;
        self.delete(name, Some(uid)).await
    }

    /// Turns a finished Job into a record of its outcome: it leaves the tracker's watch, makes
    /// no more pods, and Kubernetes removes it when the record expires (its TTL, or its
    /// deadline then its TTL when it never finished by Kubernetes' account). Its pods are
    /// left to [`Jobs::delete_pods`], a grace later.
    /// Returns whether it did: `false` when no Job with this uid is there any more (or it
    /// was being deleted by someone else, and went once let go).
    pub async fn record(&self, name: &str, uid: &str, record: &Record<'_>) -> Result<bool> {
        match self.patch_releasing(name, uid, record_patch(record)).await {
            Ok(job) if job.metadata.deletion_timestamp.is_some() => {
                // Let go, it goes now: a record created before that would find its name taken.
                self.wait_gone(name, uid).await?;
                Ok(false)
            }
            Ok(_) => Ok(true),
            other => done_unless_other(other, "patch").map(|()| false), // gone, or replaced
        }
    }

    /// Turns a Job someone else is deleting into a record of its outcome that the worker's
    /// finalizer keeps until the record expires ([`Jobs::expire_records`] lets it go): its
    /// name is never free, so a request delivered again meanwhile is answered, never rerun.
    pub async fn record_held(&self, name: &str, uid: &str, record: &Record<'_>) -> Result<()> {
        let mut patch = record_patch(record);
        patch["metadata"]["uid"] = uid.into();
        done_unless_other(self.jobs.patch(name, &PatchParams::default(), &Patch::Merge(&patch)).await, "patch")
    }

    /// Deletes the pods of the Job `name` (a record's: its Job object stays).
    pub async fn delete_pods(&self, name: &str) -> Result<()> {
        let pods = ListParams::default().labels(&format!("{LABEL_APP}={name}"));
        let dp = DeleteParams { propagation_policy: Some(PropagationPolicy::Background), ..DeleteParams::default() };
        self.pods.delete_collection(&dp, &pods).await.map(|_| ()).map_err(Error::kube("delete"))
    }

    /// Creates a record Job for a job whose own Job is gone; a Job already under that name wins.
    pub async fn create_record(&self, record: &Job) -> Result<()> {
        done_unless_other(self.jobs.create(&PostParams::default(), record).await, "create")
    }

    /// Deletes the records (of `selector`) that expired before `now`; a backstop for
    /// clusters whose TTL controller does not remove them. Returns how many went.
    pub async fn expire_records(&self, selector: &str, now: jiff::Timestamp) -> Result<usize> {
        let params = ListParams::default().labels(selector);
        let records = self.jobs.list_metadata(&params).await.map_err(Error::kube("list"))?;
        let mut expired = 0;
        for meta in records.items.iter().map(|r| &r.metadata) {
            let until =
                meta.annotations.as_ref().and_then(|a| a.get(ANN_RECORD_UNTIL)?.parse::<jiff::Timestamp>().ok());
            if let (Some(name), Some(until)) = (&meta.name, until) {
                if until < now {
                    let held = meta.finalizers.as_ref().is_some_and(|f| f.iter().any(|f| f == FINALIZER));
                    if let (true, Some(uid)) = (held, meta.uid.as_deref()) {
                        // A record kept by the finalizer (its Job was deleted by someone else).
                        done_unless_other(self.patch_releasing(name, uid, json!({})).await, "patch")?;
                    }
                    self.delete(name, meta.uid.as_deref()).await?;
                    expired += 1;
                }
            }
        }
        Ok(expired)
    }

    /// The pods of a Job, listed now: the Job watch can run ahead of the pod watch, and a
    /// failure must not be reported without its pods' reasons (an OOM kill among them).
    pub async fn current_pods(&self, name: &str, uid: &str) -> Result<Vec<PodView>> {
        Ok(self.pods_of(name).await?.iter().filter(|p| pod_owner(p).as_deref() == Some(uid)).map(pod_view).collect())
    }

    /// The job controller's refusals to make a Job's pod (a quota, a LimitRange, an
    /// admission plugin) in the namespace: the latest `FailedCreate` message by Job uid. Read
    /// when a Job's wait for its first pod ran out; the worker watches no Events.
    pub async fn refusals(&self) -> Result<HashMap<String, String>> {
        let mut latest: HashMap<String, Event> = HashMap::new();
        let params = ListParams::default().fields("involvedObject.kind=Job,reason=FailedCreate").limit(LIST_PAGE);
        each_page(&self.events, params, |page| {
            for event in page {
                let Some(uid) = event.involved_object.uid.clone() else { continue };
                let newer = |known: &Event| {
                    (&event.last_timestamp, &event.event_time) > (&known.last_timestamp, &known.event_time)
                };
                if latest.get(&uid).is_none_or(newer) {
                    latest.insert(uid, event);
                }
            }
        })
        .await?;
        Ok(latest.into_iter().filter_map(|(uid, e)| Some((uid, e.message?))).collect())
    }

    /// The tail of a pod's log, at most `max_bytes` ([`event::read_tail`]: no read returns
    /// more, however long its lines), or `None` when it cannot be read.
    pub async fn log_tail(&self, pod: &str, max_bytes: usize) -> Option<String> {
        if max_bytes == 0 {
            return None;
        }
        event::read_tail(max_bytes, |read| self.read_log(pod, read)).await
    }

    /// One bounded read of a pod's log: `limitBytes` asks the server, and no more is read
    /// whatever it sends.
    async fn read_log(&self, pod: &str, read: event::TailRead) -> Option<Vec<u8>> {
        use futures::AsyncReadExt;
        let params = LogParams {
            tail_lines: Some(read.tail_lines as i64),
            limit_bytes: Some(read.limit_bytes as i64),
            ..LogParams::default()
        };
        let mut got = Vec::new();
        let result = match self.pods.log_stream(pod, &params).await {
            Ok(stream) => stream.take(read.limit_bytes as u64).read_to_end(&mut got).await.map_err(|e| e.to_string()),
            Err(err) => Err(err.to_string()),
        };
        match result {
            Ok(_) => Some(got),
            Err(err) => {
                tracing::debug!(pod, %err, "pod log not readable");
                None
            }
        }
    }
}

/// Pods are watched once they left `Pending`: running, ended, deleted. A pod's first events
/// (created, bound, waiting for its image) are not sent to the worker at all; a Job whose
/// pods wait is read now and then instead (see the tracker's state).
pub const STARTED_PODS: &str = "status.phase!=Pending";

/// Pods neither running nor succeeded: waiting, or failed.
pub const WAITING_OR_FAILED_PODS: &str = "status.phase!=Running,status.phase!=Succeeded";

/// Where a list is served from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Read {
    /// The newest state, from etcd (the apiserver reads and decodes every object of the
    /// namespace to filter them), page by page.
    Latest,
    /// The apiserver's watch cache (`resourceVersion=0`, no page size): milliseconds behind,
    /// filtered in memory, in one response.
    Cached,
}

/// Objects a list page holds at most.
pub const LIST_PAGE: u32 = 500;

/// Lists in the pages `params` ask for, following the continue tokens, handing each page to
/// `each` (the pages are one consistent snapshot).
async fn each_page<K>(api: &Api<K>, mut params: ListParams, mut each: impl FnMut(Vec<K>)) -> Result<()>
where
    K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    loop {
        let list = api.list(&params).await.map_err(Error::kube("list"))?;
        each(list.items);
        match list.metadata.continue_.filter(|t| !t.is_empty()) {
            Some(token) => params = params.continue_token(&token),
            None => return Ok(()),
        }
    }
}

/// The patch that makes a finished Job a record of its outcome.
fn record_patch(record: &Record<'_>) -> serde_json::Value {
    let keep = record.keep_for.as_secs().max(1);
    json!({
        "metadata": {"labels": {LABEL_RECORD: "true"}, "annotations": record.annotations()},
        "spec": {"parallelism": 0, "activeDeadlineSeconds": keep, "ttlSecondsAfterFinished": i32::try_from(keep).unwrap_or(i32::MAX)},
    })
}
