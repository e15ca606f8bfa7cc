//! "Someone else" deleting finished Jobs as soon as they finish (an admin, a TTL set by hand):
//! it races the reporter and its handovers, so every replica must keep what a vanished Job
//! still owes.

use std::{
    collections::HashSet,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
};

use futures::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use kube::{
    api::{Api, DeleteParams, Preconditions},
    runtime::{watcher, WatchStreamExt},
};

/// Deletes finished Jobs of one namespace while not paused.
#[derive(Default)]
pub struct Deleter {
    paused: AtomicBool,
    deleted: AtomicUsize,
}

impl Deleter {
    /// Stops (or resumes) deleting.
    pub fn pause(&self, paused: bool) {
        self.paused.store(paused, Ordering::SeqCst);
    }

    /// How many finished Jobs it deleted.
    pub fn count(&self) -> usize {
        self.deleted.load(Ordering::SeqCst)
    }

    /// Watches the namespace's Jobs and deletes one finished Job in `one_in` (by the chaos
    /// index in its job id), records of outcomes excepted.
    pub async fn run(self: Arc<Self>, client: kube::Client, namespace: String, one_in: usize) {
        let jobs: Api<Job> = Api::namespaced(client, &namespace);
        let stream = watcher(jobs.clone(), watcher::Config::default().labels("!k8s-job-worker/record"))
            .default_backoff()
            .applied_objects();
        futures::pin_mut!(stream);
        let mut done = HashSet::new();
        while let Some(event) = stream.next().await {
            let Ok(job) = event else { continue };
            let finished = job.status.as_ref().and_then(|s| s.conditions.as_ref()).is_some_and(|cs| {
                cs.iter().any(|c| matches!(c.type_.as_str(), "Complete" | "Failed") && c.status == "True")
            });
            let job_id = job.metadata.annotations.as_ref().and_then(|a| a.get("k8s-job-worker/galaxy-job-id").cloned());
            let (Some(name), Some(job_id)) = (job.metadata.name.clone(), job_id) else { continue };
            let index = crate::chaos_index(&job_id);
            if !finished
                || self.paused.load(Ordering::SeqCst)
                || index % one_in.max(1) != 1
                || !done.insert(name.clone())
            {
                continue;
            }
            // Exactly the finished Job it saw: once the reporter turned it into a record of its
            // outcome (which this deleter leaves alone), the resourceVersion no longer matches.
            let seen = Preconditions { resource_version: job.metadata.resource_version.clone(), uid: None };
            let delete = DeleteParams { preconditions: Some(seen), ..DeleteParams::background() };
            if jobs.delete(&name, &delete).await.is_ok() {
                self.deleted.fetch_add(1, Ordering::SeqCst);
            }
        }
    }
}
