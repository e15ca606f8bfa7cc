//! The Kubernetes side of submitting and cancelling: create-or-adopt, replace, tombstone,
//! stop, cleanup and log tails. Every call is one API request; nothing polls but the
//! bounded wait for a replaced Job to disappear.

use std::time::{Duration, Instant};

use k8s_openapi::api::{batch::v1::Job, core::v1::Pod};
use kube::api::{
    Api, DeleteParams, ListParams, LogParams, Patch, PatchParams, PostParams, Preconditions, PropagationPolicy,
};
use serde_json::json;

use super::{
    spec::{ANN_CANCELLED, ANN_REPLACED, ANN_REPORTED, ANN_RESUBMISSIONS},
    view::{job_meta, pod_owner, pod_view},
    watched::WatchedJob,
};
use crate::{
    context::Context,
    domain::{event::JobState, outcome::PodView, ValidationError},
    error::{Error, Result},
    observe::JobAction,
};

fn is_code(err: &kube::Error, code: u16) -> bool {
    matches!(err, kube::Error::Api(e) if e.code == code)
}

/// Creates the Job, or adopts / replaces the one that already has its name.
pub async fn create_or_adopt(ctx: &Context, job: &Job, fingerprint: &str) -> Result<JobAction> {
    // Holding a permit for the whole exchange bounds the apiserver load, not the deliveries.
    let _permit = ctx.creates.acquire().await.map_err(|_| Error::NotConnected)?;
    let name = job.metadata.name.clone().unwrap_or_default();
    let mut replaced = false;
    for _ in 0..3 {
        match ctx.jobs.create(&PostParams::default(), job).await {
            Ok(_) => return Ok(if replaced { JobAction::Replaced } else { JobAction::Created }),
            Err(err) if is_code(&err, 409) => {}
            Err(kube::Error::Api(e)) if e.code == 422 || e.code == 400 => {
                return Err(
                    ValidationError::invalid("job", format!("the apiserver refused the Job: {}", e.message)).into()
                )
            }
            Err(err) => return Err(Error::Kube { verb: "create", source: err }),
        }
        let Some(existing) = ctx.watched_jobs.get_opt(&name).await.map_err(Error::kube("get"))? else {
            continue; // vanished between create and get: create again
        };
        let meta = job_meta(&existing.metadata);
        if meta.cancelled.is_some() {
            return Ok(JobAction::AlreadyCancelled);
        }
        let trusted = ctx.settings.instance_id().is_some();
        if trusted && meta.fingerprint == fingerprint && !meta.replaced && !meta.deleting {
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
        if !meta.deleting {
            mark_and_delete(ctx, &name, &meta.uid, ANN_REPLACED, why).await?;
        }
        wait_gone(ctx, &name, &meta.uid).await?;
        replaced = true;
    }
    Err(Error::JobConflict(name))
}

/// Annotates a Job (so every watcher knows why it goes away) and deletes it with its pods.
pub async fn mark_and_delete(ctx: &Context, name: &str, uid: &str, annotation: &str, why: &str) -> Result<()> {
    let patch = json!({"metadata": {"uid": uid, "annotations": {annotation: why}}});
    match ctx.jobs.patch(name, &PatchParams::default(), &Patch::Merge(&patch)).await {
        Ok(_) => {}
        Err(e) if is_code(&e, 404) || is_code(&e, 409) => return Ok(()), // gone or replaced already
        Err(e) => return Err(Error::Kube { verb: "patch", source: e }),
    }
    delete(ctx, name, Some(uid)).await
}

/// Cancels a Job without deleting it: the annotation tells every replica why it ends, and
/// `parallelism: 0` makes the job controller delete its pods at once. The reporting replica
/// deletes the Job itself once it has seen the annotation, so no watch gap can turn a
/// cancel into `lost`.
pub async fn mark_cancelled(ctx: &Context, name: &str, uid: &str, reason: &str) -> Result<()> {
    let patch = json!({"metadata": {"uid": uid, "annotations": {ANN_CANCELLED: reason}}, "spec": {"parallelism": 0}});
    match ctx.jobs.patch(name, &PatchParams::default(), &Patch::Merge(&patch)).await {
        Ok(_) => Ok(()),
        Err(e) if is_code(&e, 404) || is_code(&e, 409) => Ok(()),
        Err(e) => Err(Error::Kube { verb: "patch", source: e }),
    }
}

/// Deletes a Job and (in the background) its pods; a missing Job is not an error.
pub async fn delete(ctx: &Context, name: &str, uid: Option<&str>) -> Result<()> {
    let dp = DeleteParams {
        propagation_policy: Some(PropagationPolicy::Background),
        preconditions: uid.map(|uid| Preconditions { uid: Some(uid.to_string()), resource_version: None }),
        ..DeleteParams::default()
    };
    match ctx.jobs.delete(name, &dp).await {
        Ok(_) => Ok(()),
        Err(e) if is_code(&e, 404) || is_code(&e, 409) => Ok(()),
        Err(e) => Err(Error::Kube { verb: "delete", source: e }),
    }
}

/// Waits until the Job with this uid is gone (`k8s_timeout_seconds_job_deletion`).
async fn wait_gone(ctx: &Context, name: &str, uid: &str) -> Result<()> {
    let seconds = ctx.settings.kube.k8s_timeout_seconds_job_deletion;
    let deadline = Instant::now() + Duration::from_secs(seconds);
    loop {
        match ctx.jobs.get_opt(name).await.map_err(Error::kube("get"))? {
            None => return Ok(()),
            Some(job) if job.metadata.uid.as_deref() != Some(uid) => return Ok(()),
            Some(_) if Instant::now() >= deadline => {
                return Err(Error::DeletionTimeout { name: name.to_string(), seconds })
            }
            Some(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// Runs a preempted Job again: the same spec as a new Job of the same name (new pods, a fresh
/// retrial budget), counted in its `resubmissions` annotation. The old one is marked
/// replaced first, so its end is never reported.
pub async fn resubmit(ctx: &Context, name: &str, uid: &str) -> Result<()> {
    let Some(old) = ctx.jobs.get_opt(name).await.map_err(Error::kube("get"))? else { return Ok(()) };
    if old.metadata.uid.as_deref() != Some(uid) {
        return Ok(()); // already replaced
    }
    let mut annotations = old.metadata.annotations.clone().unwrap_or_default();
    let count = job_meta(&old.metadata).resubmissions + 1;
    annotations.insert(ANN_RESUBMISSIONS.into(), count.to_string());
    annotations.remove(ANN_REPLACED);
    annotations.remove(ANN_REPORTED);
    let mut spec = old.spec.clone().unwrap_or_default();
    // The job controller owns these; a new Job gets its own.
    spec.selector = None;
    spec.manual_selector = None;
    spec.parallelism = Some(1);
    if let Some(labels) = spec.template.metadata.as_mut().and_then(|m| m.labels.as_mut()) {
        labels.retain(|k, _| !k.ends_with("controller-uid") && !k.ends_with("job-name"));
    }
    let new = Job {
        metadata: kube::api::ObjectMeta {
            name: Some(name.to_string()),
            namespace: old.metadata.namespace.clone(),
            labels: old.metadata.labels.clone(),
            annotations: Some(annotations),
            ..Default::default()
        },
        spec: Some(spec),
        status: None,
    };
    mark_and_delete(ctx, name, uid, ANN_REPLACED, "resubmitted after preemption").await?;
    wait_gone(ctx, name, uid).await?;
    ctx.jobs.create(&PostParams::default(), &new).await.map_err(Error::kube("create"))?;
    tracing::info!(job_id = %job_meta(&new.metadata).job_id, job_name = name, resubmissions = count, "resubmitted after preemption");
    Ok(())
}

/// Creates the tombstone that keeps a not-yet-seen request from starting, or returns the
/// existing Job of that name when there is one.
pub async fn create_tombstone(ctx: &Context, tombstone: &Job) -> Result<Option<WatchedJob>> {
    match ctx.jobs.create(&PostParams::default(), tombstone).await {
        Ok(_) => Ok(None),
        Err(e) if is_code(&e, 409) => {
            let name = tombstone.metadata.name.clone().unwrap_or_default();
            ctx.watched_jobs.get_opt(&name).await.map_err(Error::kube("get"))
        }
        Err(e) => Err(Error::Kube { verb: "create", source: e }),
    }
}

/// Stops a Job from making more pods (after an OOM kill: retrying with the same limit is pointless).
pub async fn stop(ctx: &Context, name: &str) -> Result<()> {
    let patch = json!({"spec": {"parallelism": 0}});
    match ctx.jobs.patch(name, &PatchParams::default(), &Patch::Merge(&patch)).await {
        Ok(_) => Ok(()),
        Err(e) if is_code(&e, 404) => Ok(()),
        Err(e) => Err(Error::Kube { verb: "patch", source: e }),
    }
}

/// After a confirmed terminal event: delete the Job per `k8s_cleanup_job`, or record that
/// the event went out so a restarted worker does not send it again.
pub async fn after_terminal(ctx: &Context, name: &str, uid: &str, state: JobState) -> Result<()> {
    use crate::config::CleanupPolicy::*;
    let delete_it = match ctx.settings.kube.k8s_cleanup_job {
        Always => true,
        Onsuccess => state == JobState::Succeeded,
        Never => false,
    };
    if delete_it {
        return delete(ctx, name, Some(uid)).await;
    }
    let patch = json!({"metadata": {"uid": uid, "annotations": {ANN_REPORTED: state.as_str()}}});
    match ctx.jobs.patch(name, &PatchParams::default(), &Patch::Merge(&patch)).await {
        Ok(_) => Ok(()),
        Err(e) if is_code(&e, 404) || is_code(&e, 409) => Ok(()),
        Err(e) => Err(Error::Kube { verb: "patch", source: e }),
    }
}

/// The pods of a Job, listed now: the Job watch can run ahead of the pod watch, and a
/// failure must not be reported without its pods' reasons (an OOM kill among them).
pub async fn current_pods(ctx: &Context, name: &str, uid: &str) -> Result<Vec<PodView>> {
    let params = ListParams::default().labels(&format!("app={name}"));
    let pods = ctx.watched_pods.list(&params).await.map_err(Error::kube("list"))?;
    Ok(pods.items.iter().filter(|p| pod_owner(p).as_deref() == Some(uid)).map(pod_view).collect())
}

/// The last `max_bytes` of a pod's log, or `None` when it cannot be read.
pub async fn log_tail(ctx: &Context, pod: &str, max_bytes: usize) -> Option<String> {
    if max_bytes == 0 {
        return None;
    }
    let pods: &Api<Pod> = &ctx.pods;
    let params = LogParams { tail_lines: Some((max_bytes / 16).max(200) as i64), ..LogParams::default() };
    match pods.logs(pod, &params).await {
        Ok(log) => Some(crate::domain::event::log_tail(&log, max_bytes)),
        Err(err) => {
            tracing::debug!(pod, %err, "pod log not readable");
            None
        }
    }
}
