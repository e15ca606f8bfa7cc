//! Slim Job and Pod types for the watches and lists the tracker reads.
//!
//! Decoding a full `k8s_openapi` Pod builds every spec field and the `managedFields` JSON
//! tree, then throws them away; these types keep only what `super::view` reads (serde skips
//! the rest without allocating). The JSON is the same, so a full object decodes into them too; every field is optional (missing ⇒ default).

use std::{borrow::Cow, collections::BTreeMap};

use k8s_openapi::{
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference, Time},
    NamespaceResourceScope,
};
use serde::{de::IgnoredAny, Deserialize, Deserializer};

/// A Job as the tracker sees it.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct WatchedJob {
    /// Identity, labels, annotations and deletion mark.
    #[serde(deserialize_with = "slim_job_metadata")]
    pub metadata: ObjectMeta,
    /// The limits that shape its outcome.
    pub spec: Option<WatchedJobSpec>,
    /// Its conditions.
    pub status: Option<WatchedJobStatus>,
}

/// The parts of a Job's spec the outcome depends on.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct WatchedJobSpec {
    /// Pod retrials.
    pub backoff_limit: Option<i32>,
    /// Walltime enforced by Kubernetes.
    pub active_deadline_seconds: Option<i64>,
    /// 0 when it is stopped (it makes no pods).
    pub parallelism: Option<i32>,
}

/// The parts of a Job's status the outcome depends on.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct WatchedJobStatus {
    /// Complete / Failed conditions.
    pub conditions: Option<Vec<Condition>>,
    /// How many of its pods failed (a pod that failed before it ever ran is only seen here).
    pub failed: Option<i32>,
    /// How many of its pods are pending or running.
    pub active: Option<i32>,
    /// When it completed.
    pub completion_time: Option<Time>,
}

/// A Job or pod condition.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Condition {
    /// Condition type.
    #[serde(rename = "type")]
    pub type_: String,
    /// "True", "False" or "Unknown".
    pub status: String,
    /// Machine-readable reason.
    pub reason: Option<String>,
    /// Human-readable message.
    pub message: Option<String>,
    /// When it last changed.
    pub last_transition_time: Option<Time>,
}

/// A pod as the tracker sees it.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct WatchedPod {
    /// Name, owner and timestamps.
    #[serde(deserialize_with = "slim_pod_metadata")]
    pub metadata: ObjectMeta,
    /// Its status (the spec decides nothing the Job's annotations do not already say).
    pub status: Option<WatchedPodStatus>,
}

/// The parts of a pod's status the outcome depends on.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct WatchedPodStatus {
    /// Pending, Running, Succeeded, Failed, Unknown.
    pub phase: Option<String>,
    /// Why the pod is in this phase (Evicted, NodeLost...).
    pub reason: Option<String>,
    /// Details.
    pub message: Option<String>,
    /// When a node accepted it.
    pub start_time: Option<Time>,
    /// PodScheduled, DisruptionTarget...
    pub conditions: Option<Vec<Condition>>,
    /// One per container.
    pub container_statuses: Option<Vec<WatchedContainerStatus>>,
}

/// One container's state.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct WatchedContainerStatus {
    /// The image it runs (named in pull failures).
    pub image: String,
    /// Waiting or terminated details.
    pub state: Option<WatchedContainerState>,
}

/// Waiting or terminated (running carries nothing the tracker needs).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct WatchedContainerState {
    /// Why it waits.
    pub waiting: Option<Waiting>,
    /// How it ended.
    pub terminated: Option<Terminated>,
}

/// A waiting container.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct Waiting {
    /// ErrImagePull, ImagePullBackOff...
    pub reason: Option<String>,
    /// Details.
    pub message: Option<String>,
}

/// A terminated container.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Terminated {
    /// Exit code.
    pub exit_code: i32,
    /// OOMKilled, Error, Completed...
    pub reason: Option<String>,
    /// Details.
    pub message: Option<String>,
    /// When it ended.
    pub finished_at: Option<Time>,
}

/// The metadata fields anything here reads; `managedFields` above all is skipped. Labels
/// are read for Jobs (whose they are), skipped for pods (`L` = [`IgnoredAny`]).
#[derive(Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct SlimMeta<L> {
    labels: L,
    name: Option<String>,
    namespace: Option<String>,
    uid: Option<String>,
    /// The watcher resumes from it.
    resource_version: Option<String>,
    annotations: Option<BTreeMap<String, String>>,
    owner_references: Option<Vec<OwnerReference>>,
    creation_timestamp: Option<Time>,
    deletion_timestamp: Option<Time>,
    /// The worker's own holds a Job until its outcome is recorded.
    finalizers: Option<Vec<String>>,
}

/// Labels kept (a Job's) or skipped (a pod's).
trait SlimLabels {
    fn into_labels(self) -> Option<BTreeMap<String, String>>;
}

impl SlimLabels for Option<BTreeMap<String, String>> {
    fn into_labels(self) -> Option<BTreeMap<String, String>> {
        self
    }
}

impl SlimLabels for IgnoredAny {
    fn into_labels(self) -> Option<BTreeMap<String, String>> {
        None
    }
}

fn slim_job_metadata<'de, D: Deserializer<'de>>(d: D) -> Result<ObjectMeta, D::Error> {
    slim_metadata::<D, Option<BTreeMap<String, String>>>(d)
}

fn slim_pod_metadata<'de, D: Deserializer<'de>>(d: D) -> Result<ObjectMeta, D::Error> {
    slim_metadata::<D, IgnoredAny>(d)
}

fn slim_metadata<'de, D, L>(d: D) -> Result<ObjectMeta, D::Error>
where
    D: Deserializer<'de>,
    L: SlimLabels + Default + Deserialize<'de>,
{
    let m = SlimMeta::<L>::deserialize(d)?;
    Ok(ObjectMeta {
        labels: m.labels.into_labels(),
        name: m.name,
        namespace: m.namespace,
        uid: m.uid,
        resource_version: m.resource_version,
        annotations: m.annotations,
        owner_references: m.owner_references,
        creation_timestamp: m.creation_timestamp,
        deletion_timestamp: m.deletion_timestamp,
        finalizers: m.finalizers,
        ..ObjectMeta::default()
    })
}

/// Makes a slim type usable with `kube::Api` under the full type's API coordinates.
macro_rules! resource_as {
    ($slim:ty, $full:ty) => {
        impl kube::Resource for $slim {
            type DynamicType = ();
            type Scope = NamespaceResourceScope;
            fn kind(_: &()) -> Cow<'_, str> {
                <$full as kube::Resource>::kind(&())
            }
            fn group(_: &()) -> Cow<'_, str> {
                <$full as kube::Resource>::group(&())
            }
            fn version(_: &()) -> Cow<'_, str> {
                <$full as kube::Resource>::version(&())
            }
            fn plural(_: &()) -> Cow<'_, str> {
                <$full as kube::Resource>::plural(&())
            }
            fn meta(&self) -> &ObjectMeta {
                &self.metadata
            }
            fn meta_mut(&mut self) -> &mut ObjectMeta {
                &mut self.metadata
            }
        }
    };
}

resource_as!(WatchedJob, k8s_openapi::api::batch::v1::Job);
resource_as!(WatchedPod, k8s_openapi::api::core::v1::Pod);
