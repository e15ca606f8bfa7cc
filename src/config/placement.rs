//! Placement, identity and policy settings (Galaxy's `k8s_node_selector`, `k8s_tolerations`,
//! `k8s_persistent_volume_claims`, ...) and their parsing into domain values.

use std::collections::BTreeMap;

use clap::Args;

use crate::domain::{
    placement::{parse_pairs, parse_pvc_mounts, PvcMount, Toleration},
    policy::{self, Policy},
};

/// Where and as whom job pods run, for every job (requests may add within the policy).
#[derive(Debug, Clone, Args)]
pub struct PlacementSettings {
    /// Node selector for every job pod: `key=value,key2=value2`.
    #[arg(long, env = "K8S_NODE_SELECTOR")]
    pub k8s_node_selector: Option<String>,
    /// Tolerations for every job pod, as a JSON list of pod-spec tolerations.
    #[arg(long, env = "K8S_TOLERATIONS")]
    pub k8s_tolerations: Option<String>,
    /// Affinity for every job pod, as a JSON pod-spec affinity object.
    #[arg(long, env = "K8S_AFFINITY")]
    pub k8s_affinity: Option<String>,
    /// Priority class of job pods.
    #[arg(long, env = "K8S_POD_PRIORITY_CLASS")]
    pub k8s_pod_priority_class: Option<String>,
    /// runAsUser of job pods.
    #[arg(long, env = "K8S_RUN_AS_USER_ID")]
    pub k8s_run_as_user_id: Option<i64>,
    /// runAsGroup of job pods.
    #[arg(long, env = "K8S_RUN_AS_GROUP_ID")]
    pub k8s_run_as_group_id: Option<i64>,
    /// Extra environment of every job container: `NAME=value,NAME2=value2`.
    #[arg(long, env = "K8S_EXTRA_JOB_ENVS")]
    pub k8s_extra_job_envs: Option<String>,
    /// Extra Job labels: `key=value,...`.
    #[arg(long, env = "K8S_JOB_LABELS")]
    pub k8s_job_labels: Option<String>,
    /// Extra Job annotations: `key=value,...`.
    #[arg(long, env = "K8S_JOB_ANNOTATIONS")]
    pub k8s_job_annotations: Option<String>,
    /// Extra pod labels: `key=value,...`.
    #[arg(long, env = "K8S_POD_LABELS")]
    pub k8s_pod_labels: Option<String>,
    /// Extra pod annotations: `key=value,...`.
    #[arg(long, env = "K8S_POD_ANNOTATIONS")]
    pub k8s_pod_annotations: Option<String>,
    /// PVC mounts for every job: `claim[/subpath]:/mount/path[:r],...`.
    #[arg(long, env = "K8S_PERSISTENT_VOLUME_CLAIMS")]
    pub k8s_persistent_volume_claims: Option<String>,
    /// ttlSecondsAfterFinished of Jobs (for Jobs the worker keeps, see k8s_cleanup_job).
    #[arg(long, env = "K8S_JOB_TTL_SECS_AFTER_FINISHED")]
    pub k8s_job_ttl_secs_after_finished: Option<i32>,
    /// Policy: images must start with one of these prefixes (comma-separated; unset: any).
    #[arg(long, env = "POLICY_ALLOWED_IMAGE_PREFIXES")]
    pub policy_allowed_image_prefixes: Option<String>,
    /// Policy: most CPU one job may ask for (a quantity: `8`, `500m`).
    #[arg(long, env = "POLICY_MAX_CPU")]
    pub policy_max_cpu: Option<String>,
    /// Policy: most memory one job may ask for (a quantity: `64G`).
    #[arg(long, env = "POLICY_MAX_MEMORY")]
    pub policy_max_memory: Option<String>,
    /// Policy: PVCs a request may mount (comma-separated; unset: none).
    #[arg(long, env = "POLICY_ALLOWED_PVCS")]
    pub policy_allowed_pvcs: Option<String>,
    /// Policy: node selectors a request may use, `key=value,...` (unset: none).
    #[arg(long, env = "POLICY_ALLOWED_NODE_SELECTORS")]
    pub policy_allowed_node_selectors: Option<String>,
}

/// The parsed placement defaults.
#[derive(Debug, Clone, Default)]
pub struct Placement {
    /// Node selector.
    pub node_selector: BTreeMap<String, String>,
    /// Tolerations.
    pub tolerations: Vec<Toleration>,
    /// Affinity (pod-spec JSON).
    pub affinity: Option<serde_json::Value>,
    /// Extra environment.
    pub env: BTreeMap<String, String>,
    /// Extra Job labels and annotations, pod labels and annotations.
    pub job_labels: BTreeMap<String, String>,
    /// Extra Job annotations.
    pub job_annotations: BTreeMap<String, String>,
    /// Extra pod labels.
    pub pod_labels: BTreeMap<String, String>,
    /// Extra pod annotations.
    pub pod_annotations: BTreeMap<String, String>,
    /// PVC mounts.
    pub pvcs: Vec<PvcMount>,
    /// The request policy.
    pub policy: Policy,
}

fn pairs(name: &str, value: &Option<String>) -> Result<BTreeMap<String, String>, String> {
    value.as_deref().map(parse_pairs).transpose().map(Option::unwrap_or_default).map_err(|e| format!("{name}: {e}"))
}

fn list(value: &Option<String>) -> Vec<String> {
    value.as_deref().unwrap_or("").split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_string).collect()
}

impl PlacementSettings {
    /// Parses every setting; the error names the setting.
    pub fn parse(&self) -> Result<Placement, String> {
        let tolerations = match &self.k8s_tolerations {
            Some(text) => serde_json::from_str(text).map_err(|e| format!("k8s_tolerations: {e}"))?,
            None => Vec::new(),
        };
        let affinity = match &self.k8s_affinity {
            Some(text) => Some(
                serde_json::from_str::<k8s_openapi::api::core::v1::Affinity>(text)
                    .map_err(|e| format!("k8s_affinity: {e}"))
                    .map(|_| serde_json::from_str(text).unwrap_or_default())?,
            ),
            None => None,
        };
        let pvcs = self
            .k8s_persistent_volume_claims
            .as_deref()
            .map(parse_pvc_mounts)
            .transpose()
            .map_err(|e| format!("k8s_persistent_volume_claims: {e}"))?
            .unwrap_or_default();
        let quantity = |name: &str, value: &Option<String>, parse: fn(&str) -> Option<u64>| {
            value.as_deref().map(|q| parse(q).ok_or_else(|| format!("{name}: {q:?} is not a quantity"))).transpose()
        };
        let policy = Policy {
            allowed_image_prefixes: list(&self.policy_allowed_image_prefixes),
            max_cpu_millis: quantity("policy_max_cpu", &self.policy_max_cpu, policy::cpu)?,
            max_memory_bytes: quantity("policy_max_memory", &self.policy_max_memory, policy::memory)?,
            allowed_pvcs: list(&self.policy_allowed_pvcs),
            allowed_node_selectors: list(&self.policy_allowed_node_selectors)
                .iter()
                .map(|pair| {
                    pair.split_once('=')
                        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                        .ok_or_else(|| format!("policy_allowed_node_selectors: {pair:?} is not key=value"))
                })
                .collect::<Result<_, _>>()?,
        };
        Ok(Placement {
            node_selector: pairs("k8s_node_selector", &self.k8s_node_selector)?,
            tolerations,
            affinity,
            env: pairs("k8s_extra_job_envs", &self.k8s_extra_job_envs)?,
            job_labels: pairs("k8s_job_labels", &self.k8s_job_labels)?,
            job_annotations: pairs("k8s_job_annotations", &self.k8s_job_annotations)?,
            pod_labels: pairs("k8s_pod_labels", &self.k8s_pod_labels)?,
            pod_annotations: pairs("k8s_pod_annotations", &self.k8s_pod_annotations)?,
            pvcs,
            policy,
        })
    }
}
