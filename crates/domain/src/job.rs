//! The plan of one Kubernetes Job: what the worker adds to every job ([`JobDefaults`], built
//! once from its settings) and a validated request, turned into every decision the Job needs
//! ([`JobPlan`]) — names, labels, resources, environment, mounts, identity, placement, retrials,
//! walltime — the way Galaxy's runner built it. Rendering it as a Kubernetes object is the
//! adapter's part; nothing here knows Kubernetes types.

use std::collections::BTreeMap;

use crate::{
    interactive::{plan_routes, RoutePlan},
    keys::{
        ANN_ATTEMPT, ANN_FINGERPRINT, ANN_HANDLER, ANN_JOB_ID, ANN_ROUTES, LABEL_APP, LABEL_INSTANCE, LABEL_JOB_ID,
        MANAGED_BY,
    },
    naming::{self, Naming},
    placement::{galaxy_env, PvcMount, Toleration},
    policy::{self, Asked, Policy},
    request::JobRequest,
    resources::{Resource, ResourceValue},
    ValidationError,
};

/// Labels or annotations.
pub type Map = BTreeMap<String, String>;

/// CPU and memory quantities (requests or limits), each optional.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Quantities {
    /// CPU, a Kubernetes quantity.
    pub cpu: Option<String>,
    /// Memory, a Kubernetes quantity.
    pub memory: Option<String>,
}

impl Quantities {
    /// Whether neither is set.
    pub fn is_empty(&self) -> bool {
        self.cpu.is_none() && self.memory.is_none()
    }
}

/// The user and groups job pods run as (each only when > 0).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Identity {
    /// runAsUser.
    pub run_as_user: Option<i64>,
    /// runAsGroup.
    pub run_as_group: Option<i64>,
    /// fsGroup.
    pub fs_group: Option<i64>,
    /// supplementalGroups.
    pub supplemental_groups: Vec<i64>,
}

impl Identity {
    /// Whether nothing is set.
    pub fn is_empty(&self) -> bool {
        *self == Identity::default()
    }
}

/// Image pull policy (`k8s_pull_policy`); the runner left anything else unset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
pub enum PullPolicy {
    /// `Always`.
    Always,
    /// `IfNotPresent`.
    IfNotPresent,
    /// `Never`.
    Never,
}

impl PullPolicy {
    /// The runner's reading: one of the three names, else unset.
    pub fn parse_lenient(text: &str) -> Option<PullPolicy> {
        match text {
            "Always" => Some(PullPolicy::Always),
            "IfNotPresent" => Some(PullPolicy::IfNotPresent),
            "Never" => Some(PullPolicy::Never),
            _ => None,
        }
    }

    /// The Kubernetes spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            PullPolicy::Always => "Always",
            PullPolicy::IfNotPresent => "IfNotPresent",
            PullPolicy::Never => "Never",
        }
    }
}

/// What the worker adds to every job: its settings as typed values, built once at start.
#[derive(Debug, Clone, PartialEq)]
pub struct JobDefaults {
    /// Job names and the instance.
    pub naming: Naming,
    /// Pod retrials when the request names none (`k8s_pod_retrials` / `k8s_pod_retries`).
    pub pod_retrials: u32,
    /// Upper bound of every Job's backoffLimit (`k8s_job_spec_back_off_limit`).
    pub back_off_limit: Option<u32>,
    /// Walltime limit in seconds (`k8s_walltime_limit`; 0 or less: none).
    pub walltime_limit: i64,
    /// Default requests.
    pub requests: Quantities,
    /// Default limits.
    pub limits: Quantities,
    /// Image pull policy.
    pub pull_policy: Option<PullPolicy>,
    /// User and groups (a request may set its own user and group, never root).
    pub identity: Identity,
    /// Node selector of every pod.
    pub node_selector: Map,
    /// Tolerations of every pod.
    pub tolerations: Vec<Toleration>,
    /// Affinity of every pod (pod-spec JSON, validated when read).
    pub affinity: Option<serde_json::Value>,
    /// Priority class (a request may name its own).
    pub priority_class: Option<String>,
    /// Environment of every container (`k8s_extra_job_envs`).
    pub env: Map,
    /// Extra Job labels.
    pub job_labels: Map,
    /// Extra Job annotations.
    pub job_annotations: Map,
    /// Extra pod labels.
    pub pod_labels: Map,
    /// Extra pod annotations.
    pub pod_annotations: Map,
    /// PVC mounts of every job (the runner's single claim first).
    pub pvcs: Vec<PvcMount>,
    /// ttlSecondsAfterFinished of Jobs.
    pub ttl_seconds_after_finished: Option<i32>,
    /// How long a cancel for a request not seen yet keeps it from starting, in seconds.
    pub tombstone_seconds: i64,
    /// What requests may ask for.
    pub policy: Policy,
}

impl Default for JobDefaults {
    fn default() -> Self {
        JobDefaults {
            naming: Naming { prefix: "galaxy".into(), instance_id: None },
            pod_retrials: 3,
            back_off_limit: None,
            walltime_limit: 172_800,
            requests: Quantities::default(),
            limits: Quantities::default(),
            pull_policy: None,
            identity: Identity::default(),
            node_selector: Map::new(),
            tolerations: Vec::new(),
            affinity: None,
            priority_class: None,
            env: Map::new(),
            job_labels: Map::new(),
            job_annotations: Map::new(),
            pod_labels: Map::new(),
            pod_annotations: Map::new(),
            pvcs: Vec::new(),
            ttl_seconds_after_finished: None,
            tombstone_seconds: 86_400,
            policy: Policy {
                allowed_shells: vec!["/bin/bash".into(), "/bin/sh".into()],
                allow_unprefixed_metadata: true,
                ..Policy::default()
            },
        }
    }
}

/// The one container of a job.
#[derive(Debug, Clone, PartialEq)]
pub struct ContainerPlan {
    /// Container name (from the destination id).
    pub name: String,
    /// Image reference.
    pub image: String,
    /// `<shell> -c <command line>`.
    pub command: Vec<String>,
    /// Working directory.
    pub working_dir: Option<String>,
    /// Environment, in order (a name appears once).
    pub env: Vec<(String, String)>,
    /// Image pull policy.
    pub pull_policy: Option<PullPolicy>,
    /// Resource requests.
    pub requests: Quantities,
    /// Resource limits.
    pub limits: Quantities,
    /// PVC mounts: the worker's, then the request's.
    pub mounts: Vec<PvcMount>,
    /// Extended resources (limits, and so requests), by name.
    pub extended: BTreeMap<String, u64>,
}

/// Every decision about one Kubernetes Job, ready to be rendered.
#[derive(Debug, Clone, PartialEq)]
pub struct JobPlan {
    /// Job name.
    pub name: String,
    /// Job labels.
    pub labels: Map,
    /// Job annotations.
    pub annotations: Map,
    /// Pod labels.
    pub pod_labels: Map,
    /// Pod annotations.
    pub pod_annotations: Map,
    /// Pods at once: 1, or 0 for a tombstone that never runs one.
    pub parallelism: u32,
    /// Pod retrials (backoffLimit).
    pub backoff_limit: u32,
    /// Walltime (activeDeadlineSeconds).
    pub active_deadline_seconds: Option<i64>,
    /// ttlSecondsAfterFinished. A job's own Job never has one when it is created: Kubernetes
    /// could delete it before its outcome is reported; the worker sets it once it is.
    pub ttl_seconds_after_finished: Option<i32>,
    /// The container.
    pub container: ContainerPlan,
    /// User and groups.
    pub identity: Identity,
    /// Node selector.
    pub node_selector: Map,
    /// Tolerations.
    pub tolerations: Vec<Toleration>,
    /// Affinity (pod-spec JSON).
    pub affinity: Option<serde_json::Value>,
    /// Priority class.
    pub priority_class: Option<String>,
}

impl JobPlan {
    /// The routes of an interactive Job (its Service and Ingress), kept in its annotation.
    pub fn routes(&self) -> Option<RoutePlan> {
        self.annotations.get(ANN_ROUTES).and_then(|a| RoutePlan::from_annotation(a))
    }
}

/// Fingerprint of a request: equal requests give equal fingerprints.
pub fn fingerprint(request: &JobRequest) -> String {
    let canonical = serde_json::to_vec(request).unwrap_or_default();
    naming::short_hash(&canonical, 16)
}

/// The Job's activeDeadlineSeconds: the request's walltime, never above the worker's limit
/// (a limit of 0 or less means none).
pub fn walltime(requested: Option<u64>, limit: i64) -> Option<i64> {
    let requested = requested.filter(|s| *s > 0).map(|s| i64::try_from(s).unwrap_or(i64::MAX));
    match (requested, limit > 0) {
        (Some(r), true) => Some(r.min(limit)),
        (Some(r), false) => Some(r),
        (None, true) => Some(limit),
        (None, false) => None,
    }
}

impl JobDefaults {
    /// The Job's backoffLimit: the request's retrials, else the configured ones, never above
    /// `back_off_limit`.
    pub fn backoff_limit(&self, requested: Option<u32>) -> u32 {
        let retrials = requested.unwrap_or(self.pod_retrials);
        self.back_off_limit.map_or(retrials, |cap| retrials.min(cap))
    }

    /// The labels every Job and pod of a job carries (the worker relies on them).
    pub(crate) fn base_labels(&self, name: &str, job_id: &str) -> Map {
        let mut labels = Map::from([
            (LABEL_APP.to_string(), name.to_string()),
            (MANAGED_BY.0.to_string(), MANAGED_BY.1.to_string()),
            (LABEL_JOB_ID.to_string(), naming::label_value(job_id)),
        ]);
        if let Some(id) = &self.naming.instance_id {
            labels.insert(LABEL_INSTANCE.to_string(), id.clone());
        }
        labels
    }
}

/// One resource: the request's value, else the worker's default.
fn resource(
    asked: &Option<ResourceValue>,
    default: &Option<String>,
    kind: Resource,
    field: &'static str,
) -> Result<Option<String>, ValidationError> {
    match asked {
        Some(value) => value.quantity(kind).map_err(|why| ValidationError::invalid(field, why)),
        None => Ok(default.clone()),
    }
}

/// Later maps win: the request's, then the worker's extras, then the keys the worker relies on.
fn merge(maps: [&Map; 3]) -> Map {
    maps.into_iter().flat_map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone()))).collect()
}

/// The environment: the request's, then the operator's `k8s_extra_job_envs`, then the derived
/// `GALAXY_*` values (later entries win; each name once), so a request overrides neither.
fn environment(
    request: &JobRequest,
    defaults: &JobDefaults,
    cpu: Option<u64>,
    memory: Option<u64>,
) -> Vec<(String, String)> {
    let mut vars: Vec<(String, String)> = request.env.iter().map(|v| (v.name.clone(), v.value.clone())).collect();
    vars.extend(defaults.env.iter().map(|(k, v)| (k.clone(), v.clone())));
    vars.extend(galaxy_env(cpu, memory));
    let mut out: Vec<(String, String)> = Vec::new();
    for (name, value) in vars {
        out.retain(|(n, _)| *n != name);
        out.push((name, value));
    }
    out
}

/// Plans the Job of a parsed request, refusing what the policy does not allow.
pub fn plan_job(request: &JobRequest, defaults: &JobDefaults) -> Result<JobPlan, ValidationError> {
    let requests = Quantities {
        cpu: resource(&request.requests_cpu, &defaults.requests.cpu, Resource::Cpu, "requests_cpu")?,
        memory: resource(&request.requests_memory, &defaults.requests.memory, Resource::Memory, "requests_memory")?,
    };
    let limits = Quantities {
        cpu: resource(&request.limits_cpu, &defaults.limits.cpu, Resource::Cpu, "limits_cpu")?,
        memory: resource(&request.limits_memory, &defaults.limits.memory, Resource::Memory, "limits_memory")?,
    };
    let asked_mounts = request
        .volumes
        .iter()
        .map(|v| v.parse::<PvcMount>().map_err(|why| ValidationError::invalid("volumes", why)))
        .collect::<Result<Vec<_>, _>>()?;
    let image = request.image.reference();
    defaults
        .policy
        .check(&Asked {
            image: &image,
            cpu_millis: policy::largest(&[requests.cpu.as_deref(), limits.cpu.as_deref()], policy::cpu),
            memory_bytes: policy::largest(&[requests.memory.as_deref(), limits.memory.as_deref()], policy::memory),
            pvcs: &asked_mounts,
            node_selector: Some(&request.node_selector),
            shell: request.shell.as_deref(),
            tolerations: &request.tolerations,
            priority_class: request.priority_class.as_deref(),
            labels: Some(&request.labels),
            annotations: Some(&request.annotations),
            run_as_user: request.run_as_user,
            run_as_group: request.run_as_group,
            fs_group: request.fs_group,
            supplemental_groups: &request.supplemental_groups,
            affinity: request.affinity.is_some(),
            extended_resources: Some(&request.extended_resources),
            interactive: request.interactive.as_ref(),
        })
        .map_err(|v| ValidationError::Policy { rule: v.rule, detail: v.detail })?;

    let name = defaults.naming.job_name(&request.job_id, request.attempt);
    let base = defaults.base_labels(&name, &request.job_id);
    let mut ours = Map::from([
        (ANN_JOB_ID.to_string(), request.job_id.clone()),
        (ANN_FINGERPRINT.to_string(), fingerprint(request)),
    ]);
    if let Some(attempt) = request.attempt {
        ours.insert(ANN_ATTEMPT.into(), attempt.to_string());
    }
    if let Some(handler) = &request.handler {
        ours.insert(ANN_HANDLER.into(), handler.clone());
    }
    let slots_from = limits.cpu.as_deref().or(requests.cpu.as_deref()).and_then(policy::cpu);
    let memory_from = limits.memory.as_deref().or(requests.memory.as_deref()).and_then(policy::memory);
    let positive = |id: Option<i64>| id.filter(|id| *id > 0);
    let identity = Identity {
        run_as_user: positive(request.run_as_user.or(defaults.identity.run_as_user)),
        run_as_group: positive(request.run_as_group.or(defaults.identity.run_as_group)),
        fs_group: positive(request.fs_group.or(defaults.identity.fs_group)),
        supplemental_groups: if request.supplemental_groups.is_empty() {
            &defaults.identity.supplemental_groups
        } else {
            &request.supplemental_groups
        }
        .iter()
        .copied()
        .filter(|g| *g > 0)
        .collect(),
    };
    let mut node_selector = defaults.node_selector.clone();
    node_selector.extend(request.node_selector.clone());
    let routes = request.interactive.as_ref().map(plan_routes);
    let mut env = environment(request, defaults, slots_from, memory_from);
    let mut annotations = merge([&request.annotations, &defaults.job_annotations, &ours]);
    if let Some(routes) = &routes {
        for (name, value) in routes.env() {
            env.retain(|(n, _)| *n != name);
            env.push((name, value));
        }
        annotations.insert(ANN_ROUTES.into(), routes.to_annotation());
    }
    Ok(JobPlan {
        labels: merge([&request.labels, &defaults.job_labels, &base]),
        annotations,
        pod_labels: merge([&request.labels, &defaults.pod_labels, &base]),
        pod_annotations: merge([&request.annotations, &defaults.pod_annotations, &ours]),
        parallelism: 1,
        backoff_limit: defaults.backoff_limit(request.pod_retrials()),
        active_deadline_seconds: walltime(request.walltime_seconds, defaults.walltime_limit),
        ttl_seconds_after_finished: None,
        container: ContainerPlan {
            name: naming::container_name(request.destination_id.as_deref()),
            image,
            command: vec![request.shell().to_string(), "-c".into(), request.command_line.clone()],
            working_dir: request.working_directory.clone(),
            env,
            pull_policy: request.pull_policy.or(defaults.pull_policy),
            requests,
            limits,
            mounts: defaults.pvcs.iter().cloned().chain(asked_mounts).collect(),
            extended: request.extended_resources.clone(),
        },
        identity,
        node_selector,
        tolerations: defaults.tolerations.iter().chain(&request.tolerations).cloned().collect(),
        affinity: request.affinity.clone().or_else(|| defaults.affinity.clone()),
        priority_class: request.priority_class.clone().or_else(|| defaults.priority_class.clone()),
        name,
    })
}

#[cfg(test)]
#[path = "job_tests.rs"]
mod tests;
