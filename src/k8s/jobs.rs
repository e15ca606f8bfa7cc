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
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
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
        keys::{ANN_CANCELLED, ANN_RECORD_UNTIL, ANN_REPLACED, ANN_REPORTED, ANN_RESUBMIT_DUE, FINALIZER, LABEL_APP},
        outcome::{JobMeta, JobView, PodView},
        ownership::Owner,
        record::Record,
        ValidationError,
    },
    error::{Error, Result},
};

/// What the Jobs adapter needs to know.
#[derive(Debug, Clone)]
pub struct JobsConfig {
    /// The namespace of every Job.
    pub namespace: String,
    /// How long an outdated Job (and its pods) may take to disappear.
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
    /// Jobs and pods for watch streams alone (no read timeout: [`Jobs::with_watch_client`]).
    streams: (Api<WatchedJob>, Api<WatchedPod>),
    events: Api<Event>,
    config: JobsConfig,
    creates: Semaphore,
}

/// How a claim of an outcome on its Job went ([`Jobs::claim`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// The Job carries the claim (and the finalizer): publish.
    Claimed,
    /// The Job is gone (someone deleted it): publish what was classified, and record it.
    Gone,
    /// Something came first — a cancel, a replacement, a deletion under way: classify it
    /// again as it is now.
    Changed,
}

/// Whether the apiserver answered with this status code.
pub(super) fn is_code(err: &kube::Error, code: u16) -> bool {
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

/// Whether the namespace is being deleted: nothing can be created in it any more.
fn namespace_terminating(err: &kube::Error) -> bool {
    matches!(err, kube::Error::Api(e) if e.code == 403 && e.message.contains("being terminated"))
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
            streams: (Api::namespaced(client.clone(), ns), Api::namespaced(client.clone(), ns)),
            events: Api::namespaced(client, ns),
            creates: Semaphore::new(config.max_concurrent_creates.max(1)),
            config,
        }
    }

    /// Watch streams through `client` from now on: one without the requests' read timeout
    /// ([`super::client::Clients`]); lists and gets keep the request client.
    pub fn with_watch_client(mut self, client: Client) -> Self {
        let ns = &self.config.namespace;
        self.streams = (Api::namespaced(client.clone(), ns), Api::namespaced(client, ns));
        self
    }

    /// The namespace.
    pub fn namespace(&self) -> &str {
        &self.config.namespace
    }

    /// Jobs decoded slim, for watch streams.
    pub fn watched_jobs(&self) -> Api<WatchedJob> {
        self.streams.0.clone()
    }

    /// Pods decoded slim, for watch streams.
    pub fn watched_pods(&self) -> Api<WatchedPod> {
        self.streams.1.clone()
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

    /// The whole Job of this name (to build its next generation from).
    pub async fn get_full(&self, name: &str) -> Result<Option<Job>> {
        self.jobs.get_opt(name).await.map_err(Error::kube("get"))
    }

    /// Creates the Job, or adopts the one that already has its name when that one is
    /// `owner`'s and of the same request; one of an older request (another fingerprint) is
    /// replaced. A Job of another job's (or not the worker's at all) is left alone and the
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
            // The identity check is the trust: a Job with this job's identity is the worker's
            // own, with an instance id or without one.
            check_owner(owner, &existing.metadata).map_err(ValidationError::from)?;
            let meta = job_meta(&existing.metadata);
            match existing_job(&meta, fingerprint) {
                Existing::Cancelled => return Ok(JobAction::AlreadyCancelled),
                // Delivered again after its Job was cancelled: the reporter tells the cancel.
                Existing::BeingCancelled => return Ok(JobAction::BeingCancelled),
                // Reported, claimed, or going: its outcome answers, it never runs again.
                Existing::Finished => return Ok(JobAction::AlreadyFinished),
                Existing::Same => return Ok(JobAction::Adopted),
                Existing::Outdated => {}
            }
            let why = "a newer request with different parameters replaces it";
            tracing::info!(job_id = %meta.job_id, job_name = %name, why, "replacing existing Job");
            self.mark_and_delete(&name, &meta.uid, ANN_REPLACED, why).await?;
            self.wait_gone(&name, &meta.uid).await?;
            replaced = true;
        }
        Err(Error::JobConflict(name))
    }

    /// Patches the Job with this uid (a strategic merge patch; the uid is a precondition),
    /// then lets it go if the worker's finalizer holds it.
    async fn patch_releasing(&self, name: &str, uid: &str, mut patch: serde_json::Value) -> kube::Result<Job> {
        patch["metadata"]["uid"] = uid.into();
        let job = self.jobs.patch(name, &PatchParams::default(), &Patch::Strategic(&patch)).await?;
        self.unhold(name, job).await
    }

    /// Takes the worker's finalizer off this Job if it carries it: a JSON patch that names its
    /// place in the list and tests it is there ([`render::unhold_patch`]); when the Job changed
    /// meanwhile, it is read again. Returns the Job as it is after.
    async fn unhold(&self, name: &str, mut job: Job) -> kube::Result<Job> {
        for _ in 0..5 {
            let Some(ops) = render::unhold_patch(&job) else { return Ok(job) };
            let ops: json_patch::Patch = serde_json::from_value(ops).map_err(kube::Error::SerdeError)?;
            match self.jobs.patch(name, &PatchParams::default(), &Patch::Json::<()>(ops)).await {
                Ok(released) => return Ok(released),
                Err(e) if is_code(&e, 422) => match self.jobs.get_opt(name).await? {
                    Some(now) if now.metadata.uid == job.metadata.uid => job = now,
                    _ => return Ok(job), // gone, or another Job of that name: nothing of ours to let go
                },
                Err(e) => return Err(e),
            }
        }
        Ok(job)
    }

    /// Annotates a Job (so every watcher knows why it goes away), lets it go and deletes it,
    /// its pods first: it is gone only once they are ([`Jobs::wait_gone`] waits for both), so
    /// no pod of the next Job runs beside one of the old in the same working directory.
    pub async fn mark_and_delete(&self, name: &str, uid: &str, annotation: &str, why: &str) -> Result<()> {
        let patch = json!({"metadata": {"annotations": {annotation: why}}});
        match self.patch_releasing(name, uid, patch).await {
            Ok(_) => self.delete_as(name, Some(uid), PropagationPolicy::Foreground).await,
            other => done_unless_other(other, "patch"), // gone or replaced already
        }
    }

    /// Cancels a Job without deleting it, if it is still as `resource_version` says: the
    /// annotation tells every replica why it ends, and `parallelism: 0` makes the job
    /// controller delete its pods at once; the reporter publishes `cancelled` and deletes the
    /// Job later, so no watch gap can turn a cancel into `lost`. A Job changed meanwhile (its
    /// outcome claimed, say) is [`Error::JobConflict`]: the cancel looks at it again.
    pub async fn mark_cancelled(&self, name: &str, uid: &str, resource_version: &str, reason: &str) -> Result<()> {
        let patch = json!({
            "metadata": {"uid": uid, "resourceVersion": resource_version, "annotations": {ANN_CANCELLED: reason}},
            "spec": {"parallelism": 0},
        });
        match self.jobs.patch(name, &PatchParams::default(), &Patch::Merge(&patch)).await {
            Ok(_) => Ok(()),
            Err(e) if is_code(&e, 404) => Ok(()), // gone: its own report says so
            Err(e) if met_another(&e) => Err(Error::JobConflict(name.to_string())),
            Err(source) => Err(Error::Kube { verb: "patch", source }),
        }
    }

    /// Claims a terminal outcome on the Job with this uid ([`render::claim_patch`]), unless a
    /// cancel came first: the write names the resourceVersion of a sight of the Job without a
    /// cancel mark, so a cancel that lands in between makes it fail. The job controller's
    /// status updates change that version too: then the Job is read again, and claimed if it
    /// still has no cancel mark. `stop` first stops it making pods.
    pub async fn claim(
        &self,
        name: &str,
        uid: &str,
        resource_version: &str,
        state: JobState,
        stop: bool,
    ) -> Result<Claim> {
        let mut version = resource_version.to_string();
        if stop {
            let stopped = self.jobs.patch(name, &PatchParams::default(), &Patch::Merge(&render::stop_patch(uid))).await;
            match self.sight(name, uid, stopped).await? {
                Sight::Free(seen) => version = seen,
                Sight::Gone => return Ok(Claim::Gone),
                Sight::Taken => return Ok(Claim::Changed),
            }
        }
        for _ in 0..3 {
            let patch = render::claim_patch(uid, &version, state);
            match self.jobs.patch(name, &PatchParams::default(), &Patch::Strategic(&patch)).await {
                Ok(_) => return Ok(Claim::Claimed),
                refused => match self.sight(name, uid, refused).await? {
                    Sight::Free(seen) => version = seen,
                    Sight::Gone => return Ok(Claim::Gone),
                    Sight::Taken => return Ok(Claim::Changed),
                },
            }
        }
        Ok(Claim::Changed)
    }

    /// What a write about the Job with `uid` saw of it — the Job it returned, or, when the
    /// apiserver refused it as outdated, the Job as it is now.
    async fn sight(&self, name: &str, uid: &str, written: kube::Result<Job>) -> Result<Sight> {
        let job = match written {
            Ok(job) => Some(job),
            Err(e) if is_code(&e, 404) => None,
            Err(e) if met_another(&e) || is_code(&e, 422) => {
                self.jobs.get_opt(name).await.map_err(Error::kube("get"))?
            }
            Err(source) => return Err(Error::Kube { verb: "patch", source }),
        };
        Ok(match job {
            None => Sight::Gone,
            Some(job) => unclaimed_version(&job, uid).map_or(Sight::Taken, Sight::Free),
        })
    }

    /// Deletes a Job and (in the background) its pods; a missing Job is not an error.
    pub async fn delete(&self, name: &str, uid: Option<&str>) -> Result<()> {
        self.delete_as(name, uid, PropagationPolicy::Background).await
    }

    async fn delete_as(&self, name: &str, uid: Option<&str>, propagation: PropagationPolicy) -> Result<()> {
        let dp = DeleteParams {
            propagation_policy: Some(propagation),
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

    /// Marks the preempted Job with this uid due for its `resubmission`-th resubmission, the
    /// mark an intent needs to be carried out. `false` when that Job is gone or replaced.
    pub async fn mark_resubmit_due(&self, name: &str, uid: &str, resubmission: u32) -> Result<bool> {
        let patch = json!({"metadata": {"uid": uid, "annotations": {ANN_RESUBMIT_DUE: resubmission.to_string()}}});
        match self.jobs.patch(name, &PatchParams::default(), &Patch::Merge(&patch)).await {
            Ok(_) => Ok(true),
            Err(e) if is_code(&e, 404) || met_another(&e) => Ok(false),
            Err(source) => Err(Error::Kube { verb: "patch", source }),
        }
    }

    /// Runs a preempted job again: its kept Job is marked replaced (its end is never
    /// reported) and deleted with its pods, then its next generation — the same spec, a fresh
    /// retrial budget, counted in `resubmissions` ([`render::next_generation`]) — is created.
    /// Another Job of that name made meanwhile wins. Returns the new Job when this made it.
    pub async fn resubmit(&self, kept: &Job) -> Result<Option<Job>> {
        let (name, uid) =
            (kept.metadata.name.as_deref().unwrap_or_default(), kept.metadata.uid.as_deref().unwrap_or_default());
        let next = render::next_generation(kept);
        self.mark_and_delete(name, uid, ANN_REPLACED, "resubmitted after preemption").await?;
        self.wait_gone(name, uid).await?;
        match self.jobs.create(&PostParams::default(), &next).await {
            Ok(created) => {
                let meta = job_meta(&created.metadata);
                tracing::info!(job_id = %meta.job_id, job_name = name, resubmissions = meta.resubmissions, "resubmitted after preemption");
                Ok(Some(created))
            }
            Err(e) if is_code(&e, 409) => Ok(None), // another replica carried it out, or recorded it
            Err(source) => Err(Error::Kube { verb: "create", source }),
        }
    }

    /// Creates a Job (a tombstone, a record) unless one has its name: `None` when created,
    /// else the Job that has it. In a namespace being deleted, nothing is created: `None`.
    pub async fn create_unless_taken(&self, job: &Job) -> Result<Option<WatchedJob>> {
        let name = job.metadata.name.as_deref().unwrap_or_default();
        for _ in 0..5 {
            match self.jobs.create(&PostParams::default(), job).await {
                Ok(_) => return Ok(None),
                Err(e) if is_code(&e, 409) => match self.get(name).await? {
                    Some(taken) => return Ok(Some(taken)),
                    None => continue, // the one that had the name went meanwhile: create again
                },
                Err(e) if namespace_terminating(&e) => return Ok(None),
                Err(source) => return Err(Error::Kube { verb: "create", source }),
            }
        }
        Err(Error::JobConflict(name.to_string()))
    }

    /// Stops the Job with this uid from making more pods (after an OOM kill: retrying with the
    /// same limit is pointless); a replacement of the same name is left alone.
    pub async fn stop(&self, name: &str, uid: &str) -> Result<()> {
        let patch = super::render::stop_patch(uid);
        done_unless_other(self.jobs.patch(name, &PatchParams::default(), &Patch::Merge(&patch)).await, "patch")
    }

    /// Records on a kept Job that its terminal event went out, so a restarted worker does not
    /// send it again, and lets it go; only now may Kubernetes remove it after `ttl` seconds
    /// (`k8s_job_ttl_secs_after_finished`).
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

    /// Turns a finished Job into a record of its outcome, kept `record.keep_for` from now: it
    /// leaves the tracker's watch, makes no more pods, and Kubernetes removes it when the
    /// record expires. Its pods are left to [`Jobs::delete_pods`], a grace later.
    /// Returns whether it did: `false` when no Job with this uid is there any more (or it
    /// was being deleted by someone else, and went once let go).
    pub async fn record(&self, name: &str, uid: &str, record: &Record<'_>, view: &JobView) -> Result<bool> {
        match self.patch_releasing(name, uid, render::record_patch(record, view, jiff::Timestamp::now())).await {
            Ok(job) if job.metadata.deletion_timestamp.is_some() => {
                // Let go, it goes now: a record created before that would find its name taken.
                self.wait_gone(name, uid).await?;
                Ok(false)
            }
            Ok(_) => Ok(true),
            other => done_unless_other(other, "patch").map(|()| false), // gone, or replaced
        }
    }

    /// Deletes the pods of the Job with this uid (a record's: its Job object stays; a Job
    /// deleted while running: so nothing of it runs on after its report). A newer Job's pods
    /// under the same name are left alone.
    pub async fn delete_pods(&self, name: &str, uid: &str) -> Result<()> {
        let dp = DeleteParams::background();
        for pod in self.pods_of(name).await?.iter().filter(|p| pod_owner(p).as_deref() == Some(uid)) {
            let (Some(pod_name), pod_uid) = (pod.metadata.name.as_deref(), pod.metadata.uid.clone()) else { continue };
            let dp = DeleteParams {
                preconditions: Some(Preconditions { uid: pod_uid, resource_version: None }),
                ..dp.clone()
            };
            done_unless_other(self.pods.delete(pod_name, &dp).await, "delete")?;
        }
        Ok(())
    }

    /// Creates a record Job for a job whose own Job is gone; a Job already under that name
    /// wins, and in a namespace being deleted there is nothing to record.
    pub async fn create_record(&self, record: &Job) -> Result<()> {
        self.create_unless_taken(record).await.map(drop)
    }

    /// Lets go of the Job with this uid (removes the worker's finalizer, nothing else).
    pub async fn release(&self, name: &str, uid: &str) -> Result<()> {
        done_unless_other(self.patch_releasing(name, uid, json!({})).await, "patch")
    }

    /// Lets go of every Job of `selector` the worker's finalizer holds (and that `only`
    /// admits): for uninstalling, a namespace being deleted, and Jobs of earlier versions.
    /// Returns how many it let go.
    pub async fn release_all(&self, selector: &str, only: impl Fn(&ObjectMeta) -> bool) -> Result<usize> {
        let held =
            self.jobs.list_metadata(&ListParams::default().labels(selector)).await.map_err(Error::kube("list"))?;
        let mut released = 0;
        for meta in held.items.iter().map(|j| &j.metadata) {
            let holds = meta.finalizers.as_ref().is_some_and(|f| f.iter().any(|f| f == FINALIZER));
            if let (true, Some(name), Some(uid)) = (holds && only(meta), &meta.name, &meta.uid) {
                self.release(name, uid).await?;
                released += 1;
            }
        }
        Ok(released)
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
                        self.release(name, uid).await?; // a record an earlier version kept held
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

/// What a write about a Job saw of it, for a claim.
enum Sight {
    /// The Job is there, free to claim: nothing but its status changed (no cancel mark, not
    /// replaced, not being deleted); its resourceVersion.
    Free(String),
    /// Something came first, or another Job has the name.
    Taken,
    /// It is gone.
    Gone,
}

/// The resourceVersion of this sight of the Job with `uid`, if it is free to claim.
fn unclaimed_version(job: &Job, uid: &str) -> Option<String> {
    let meta = job_meta(&job.metadata);
    let free = meta.uid == uid && meta.cancelled.is_none() && !meta.replaced && !meta.deleting;
    free.then_some(meta.resource_version)
}

/// What an existing Job of a request's name and identity is to that request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Existing {
    /// A cancel came first: a tombstone.
    Cancelled,
    /// Its Job was cancelled and the cancel is not reported yet (the reporter will).
    BeingCancelled,
    /// The same request, and its outcome is reported, claimed, or being decided (someone is
    /// deleting it): answered from it, never run again.
    Finished,
    /// The same request, still running: adopted.
    Same,
    /// An older request (another fingerprint) or one being replaced: replaced.
    Outdated,
}

fn existing_job(meta: &JobMeta, fingerprint: &str) -> Existing {
    if meta.cancelled.is_some() && meta.fingerprint.is_empty() {
        Existing::Cancelled
    } else if meta.cancelled.is_some() && meta.reported.is_none() {
        Existing::BeingCancelled
    } else if meta.cancelled.is_some() {
        Existing::Finished // its cancel is reported (a record now): answered from it
    } else if meta.fingerprint != fingerprint || meta.replaced {
        Existing::Outdated
    } else if meta.reported.is_some() || meta.claimed.is_some() || meta.deleting {
        Existing::Finished
    } else {
        Existing::Same
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn item6_an_existing_job_of_the_same_request_is_adopted_or_answered_never_run_again() {
        let meta = |fingerprint: &str| JobMeta { fingerprint: fingerprint.into(), ..JobMeta::default() };
        assert_eq!(existing_job(&meta("fp"), "fp"), Existing::Same, "adopted, with or without an instance id");
        assert_eq!(existing_job(&meta("old"), "fp"), Existing::Outdated, "a changed request runs");
        let reported = JobMeta { reported: Some(JobState::Succeeded), ..meta("old") };
        assert_eq!(existing_job(&reported, "fp"), Existing::Outdated, "a changed re-request of a finished job runs");
        let reported = JobMeta { reported: Some(JobState::Succeeded), ..meta("fp") };
        assert_eq!(existing_job(&reported, "fp"), Existing::Finished);
        let claimed = JobMeta { claimed: Some(JobState::OomKilled), ..meta("fp") };
        assert_eq!(existing_job(&claimed, "fp"), Existing::Finished);
        let going = JobMeta { deleting: true, ..meta("fp") };
        assert_eq!(existing_job(&going, "fp"), Existing::Finished, "its outcome is `lost`: not run again");
        let tombstone = JobMeta { cancelled: Some("user".into()), ..meta("") };
        assert_eq!(existing_job(&tombstone, "fp"), Existing::Cancelled);
        let cancelling = JobMeta { cancelled: Some("user".into()), ..meta("fp") };
        assert_eq!(existing_job(&cancelling, "fp"), Existing::BeingCancelled, "the reporter tells it, once");
        let told = JobMeta { reported: Some(JobState::Cancelled), ..cancelling };
        assert_eq!(existing_job(&told, "fp"), Existing::Finished, "answered from its record");
    }
}
