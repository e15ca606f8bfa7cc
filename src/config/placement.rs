//! Placement, identity and policy settings (Galaxy's `k8s_node_selector`, `k8s_tolerations`,
//! `k8s_persistent_volume_claims`, ...), each parsed into a typed value when the flag is read.

use clap::Args;

use crate::domain::{
    placement::{Counts, KeyPrefixes, List, Mounts, Pairs, Tolerations},
    policy::{IdRange, Policy},
    quantity::{parse_cpu_millis, parse_memory_bytes},
    FormatError,
};

/// Reads `k8s_affinity`: a JSON pod-spec affinity object, checked against the API's type.
fn affinity(text: &str) -> Result<serde_json::Value, FormatError> {
    let bad = |e: serde_json::Error| FormatError::new(text, "a JSON pod-spec affinity object").because(e);
    serde_json::from_str::<k8s_openapi::api::core::v1::Affinity>(text).map_err(bad)?;
    serde_json::from_str(text).map_err(bad)
}

/// Where and as whom job pods run, for every job (requests may add within the policy).
#[derive(Debug, Clone, Args)]
pub struct PlacementSettings {
    /// Node selector for every job pod: `key=value,key2=value2`.
    #[arg(long, env = "K8S_NODE_SELECTOR", default_value = "")]
    pub k8s_node_selector: Pairs,
    /// Tolerations for every job pod, as a JSON list of pod-spec tolerations.
    #[arg(long, env = "K8S_TOLERATIONS", default_value = "")]
    pub k8s_tolerations: Tolerations,
    /// Affinity for every job pod, as a JSON pod-spec affinity object.
    #[arg(long, env = "K8S_AFFINITY", value_parser = affinity)]
    pub k8s_affinity: Option<serde_json::Value>,
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
    #[arg(long, env = "K8S_EXTRA_JOB_ENVS", default_value = "")]
    pub k8s_extra_job_envs: Pairs,
    /// Extra Job labels: `key=value,...`.
    #[arg(long, env = "K8S_JOB_LABELS", default_value = "")]
    pub k8s_job_labels: Pairs,
    /// Extra Job annotations: `key=value,...`.
    #[arg(long, env = "K8S_JOB_ANNOTATIONS", default_value = "")]
    pub k8s_job_annotations: Pairs,
    /// Extra pod labels: `key=value,...`.
    #[arg(long, env = "K8S_POD_LABELS", default_value = "")]
    pub k8s_pod_labels: Pairs,
    /// Extra pod annotations: `key=value,...`.
    #[arg(long, env = "K8S_POD_ANNOTATIONS", default_value = "")]
    pub k8s_pod_annotations: Pairs,
    /// PVC mounts for every job: `claim[/subpath]:/mount/path[:r],...`.
    #[arg(long, env = "K8S_PERSISTENT_VOLUME_CLAIMS", default_value = "")]
    pub k8s_persistent_volume_claims: Mounts,
    /// ttlSecondsAfterFinished of Jobs (for Jobs the worker keeps, see k8s_cleanup_job).
    #[arg(long, env = "K8S_JOB_TTL_SECS_AFTER_FINISHED")]
    pub k8s_job_ttl_secs_after_finished: Option<i32>,
    /// Policy: images must start with one of these prefixes (comma-separated; unset: any).
    #[arg(long, env = "POLICY_ALLOWED_IMAGE_PREFIXES", default_value = "")]
    pub policy_allowed_image_prefixes: List,
    /// Policy: most CPU one job may ask for (a quantity: `8`, `500m`), in millicores once read.
    #[arg(long, env = "POLICY_MAX_CPU", value_parser = parse_cpu_millis)]
    pub policy_max_cpu: Option<u64>,
    /// Policy: most memory one job may ask for (a quantity: `64G`), in bytes once read.
    #[arg(long, env = "POLICY_MAX_MEMORY", value_parser = parse_memory_bytes)]
    pub policy_max_memory: Option<u64>,
    /// Policy: PVCs a request may mount, comma-separated: `claim` (any of it) or
    /// `claim/sub/path` (only sub-paths at or under it, e.g. the Galaxy job and dataset
    /// directories mounted per job); unset: none.
    #[arg(long, env = "POLICY_ALLOWED_PVCS", default_value = "")]
    pub policy_allowed_pvcs: List,
    /// Policy: node selectors a request may use, `key=value,...` (unset: none).
    #[arg(long, env = "POLICY_ALLOWED_NODE_SELECTORS", default_value = "")]
    pub policy_allowed_node_selectors: Pairs,
    /// Policy: shells a request may name in `shell` (comma-separated absolute paths).
    #[arg(long, env = "POLICY_ALLOWED_SHELLS", default_value = "/bin/bash,/bin/sh")]
    pub policy_allowed_shells: List,
    /// Policy: taint keys a request's tolerations may name (comma-separated; `*` also admits a
    /// toleration without a key, which tolerates every taint; unset: requests add none).
    #[arg(long, env = "POLICY_ALLOWED_TOLERATIONS", default_value = "")]
    pub policy_allowed_tolerations: List,
    /// Policy: priority classes a request may name (comma-separated; unset: none).
    #[arg(long, env = "POLICY_ALLOWED_PRIORITY_CLASSES", default_value = "")]
    pub policy_allowed_priority_classes: List,
    /// Policy: DNS prefixes of the label and annotation keys a request may use, each matched
    /// exactly (comma-separated, e.g. `example.org`; empty: unprefixed keys only). By default
    /// `app.galaxyproject.org`, where the Galaxy plugin names the tool a Job runs.
    #[arg(long, env = "POLICY_ALLOWED_METADATA_PREFIXES", default_value = "app.galaxyproject.org")]
    pub policy_allowed_metadata_prefixes: KeyPrefixes,
    /// Policy: whether a request may use label and annotation keys without a prefix.
    #[arg(long, env = "POLICY_ALLOW_UNPREFIXED_METADATA", default_value_t = true, action = clap::ArgAction::Set)]
    pub policy_allow_unprefixed_metadata: bool,
    /// Policy: user and group ids a request may run as, comma-separated ranges like
    /// `1000-65535` (unset: a request may not choose; `k8s_run_as_user_id`/`_group_id` apply).
    #[arg(long, env = "POLICY_ALLOWED_RUN_AS_IDS", value_delimiter = ',')]
    pub policy_allowed_run_as_ids: Vec<IdRange>,
    /// Policy: whether a request may set the pod's affinity (Galaxy's `k8s_affinity` on a
    /// destination).
    #[arg(long, env = "POLICY_ALLOW_AFFINITY", default_value_t = false, action = clap::ArgAction::Set)]
    pub policy_allow_affinity: bool,
    /// Policy: extended resources a request may ask for, with the most one job may have,
    /// `nvidia.com/gpu=2,...` (unset: none).
    #[arg(long, env = "POLICY_ALLOWED_EXTENDED_RESOURCES", default_value = "")]
    pub policy_allowed_extended_resources: Counts,
    /// Policy: domains an interactive tool's entry points may be under, each with its
    /// subdomains (comma-separated, e.g. Galaxy's `interactivetools_proxy_host`; unset: no
    /// interactive tools).
    #[arg(long, env = "POLICY_ALLOWED_INGRESS_DOMAINS", default_value = "")]
    pub policy_allowed_ingress_domains: List,
    /// Policy: Ingress classes an interactive tool may name (comma-separated; unset: none, the
    /// cluster's default class applies).
    #[arg(long, env = "POLICY_ALLOWED_INGRESS_CLASSES", default_value = "")]
    pub policy_allowed_ingress_classes: List,
    /// Policy: prefixes of the Ingress annotation keys an interactive tool may set, matched as
    /// text (comma-separated, e.g. `nginx.ingress.kubernetes.io/proxy-`; unset: none).
    #[arg(long, env = "POLICY_ALLOWED_INGRESS_ANNOTATIONS", default_value = "")]
    pub policy_allowed_ingress_annotations: List,
}

impl PlacementSettings {
    /// The request policy these settings describe.
    pub fn policy(&self) -> Policy {
        Policy {
            allowed_image_prefixes: self.policy_allowed_image_prefixes.0.clone(),
            max_cpu_millis: self.policy_max_cpu,
            max_memory_bytes: self.policy_max_memory,
            allowed_pvcs: self.policy_allowed_pvcs.0.clone(),
            allowed_node_selectors: self.policy_allowed_node_selectors.0.clone(),
            allowed_shells: self.policy_allowed_shells.0.clone(),
            allowed_tolerations: self.policy_allowed_tolerations.0.clone(),
            allowed_priority_classes: self.policy_allowed_priority_classes.0.clone(),
            allowed_metadata_prefixes: self.policy_allowed_metadata_prefixes.0.clone(),
            allow_unprefixed_metadata: self.policy_allow_unprefixed_metadata,
            allowed_run_as_ids: self.policy_allowed_run_as_ids.clone(),
            allow_affinity: self.policy_allow_affinity,
            allowed_extended_resources: self.policy_allowed_extended_resources.0.clone(),
            allowed_ingress_domains: self.policy_allowed_ingress_domains.0.clone(),
            allowed_ingress_classes: self.policy_allowed_ingress_classes.0.clone(),
            allowed_ingress_annotations: self.policy_allowed_ingress_annotations.0.clone(),
        }
    }
}
