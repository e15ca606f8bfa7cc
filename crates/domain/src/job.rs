//! The plan of one Kubernetes Job: what the worker adds to every job ([`JobDefaults`], built
//! once from its settings) and a validated request, turned into every decision the Job needs
//! ([`JobPlan`]) — names, labels, resources, environment, mounts, identity, placement, retrials,
//! walltime — the way Galaxy's runner built it. Rendering it as a Kubernetes object is the
//! adapter's part; nothing here knows Kubernetes types.

use std::collections::BTreeMap;

use crate::{
    interactive::{plan_routes, RoutePlan},
    keys::{
        ANN_ATTEMPT, ANN_CANCELLED, ANN_EXIT_CODE, ANN_FINGERPRINT, ANN_HANDLER, ANN_JOB_ID, ANN_REASON,
        ANN_RECORD_UNTIL, ANN_REPORTED, ANN_ROUTES, LABEL_APP, LABEL_INSTANCE, LABEL_JOB_ID, LABEL_RECORD, MANAGED_BY,
    },
    naming::{self, Naming},
    outcome::JobMeta,
    placement::{galaxy_env, PvcMount, Toleration},
    policy::{self, Asked, Policy},
    request::JobRequest,
    resources::{Resource, ResourceValue},
    state::JobState,
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
    fn base_labels(&self, name: &str, job_id: &str) -> Map {
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

/// A Job that keeps a cancelled-but-unseen request from starting: same name, no pods
/// (`parallelism: 0`), gone after `tombstone_seconds` via its deadline and TTL.
pub fn plan_tombstone(
    defaults: &JobDefaults,
    job_id: &str,
    attempt: Option<u32>,
    handler: Option<&str>,
    reason: &str,
) -> JobPlan {
    let name = defaults.naming.job_name(job_id, attempt);
    let mut annotations =
        Map::from([(ANN_JOB_ID.to_string(), job_id.to_string()), (ANN_CANCELLED.to_string(), reason.to_string())]);
    if let Some(attempt) = attempt {
        annotations.insert(ANN_ATTEMPT.into(), attempt.to_string());
    }
    if let Some(handler) = handler {
        annotations.insert(ANN_HANDLER.into(), handler.to_string());
    }
    JobPlan {
        labels: defaults.base_labels(&name, job_id),
        annotations,
        pod_labels: Map::new(),
        pod_annotations: Map::new(),
        parallelism: 0,
        backoff_limit: 0,
        active_deadline_seconds: Some(defaults.tombstone_seconds.max(1)),
        ttl_seconds_after_finished: Some(0),
        container: ContainerPlan {
            name: "cancelled".into(),
            image: "cancelled".into(),
            command: vec!["/bin/true".into()],
            working_dir: None,
            env: Vec::new(),
            pull_policy: None,
            requests: Quantities::default(),
            limits: Quantities::default(),
            mounts: Vec::new(),
            extended: BTreeMap::new(),
        },
        identity: Identity::default(),
        node_selector: Map::new(),
        tolerations: Vec::new(),
        affinity: None,
        priority_class: None,
        name,
    }
}

/// What a record of a finished job holds: how it ended, and until when it is kept.
#[derive(Debug, Clone, PartialEq)]
pub struct Record<'a> {
    /// The reported state.
    pub state: JobState,
    /// The reported exit code.
    pub exit_code: Option<i32>,
    /// The reported reason.
    pub reason: &'a str,
    /// How long it is kept.
    pub keep_for: std::time::Duration,
    /// When it may be removed (RFC 3339).
    pub until: String,
}

impl<'a> Record<'a> {
    /// A record of `state` kept `keep_for` from `now`.
    pub fn kept(
        state: JobState,
        exit_code: Option<i32>,
        reason: &'a str,
        keep_for: std::time::Duration,
        now: jiff::Timestamp,
    ) -> Record<'a> {
        let until = jiff::SignedDuration::try_from(keep_for).ok().and_then(|d| now.checked_add(d).ok());
        Record { state, exit_code, reason, keep_for, until: until.unwrap_or(jiff::Timestamp::MAX).to_string() }
    }

    /// The annotations that carry it (on the Job itself, or on a record Job).
    pub fn annotations(&self) -> Map {
        let mut reason = self.reason.to_string();
        if reason.len() > MAX_RECORDED_REASON {
            let mut end = MAX_RECORDED_REASON;
            while !reason.is_char_boundary(end) {
                end -= 1;
            }
            reason.truncate(end);
        }
        let mut out = Map::from([
            (ANN_REPORTED.to_string(), self.state.as_str().to_string()),
            (ANN_REASON.to_string(), reason),
            (ANN_RECORD_UNTIL.to_string(), self.until.clone()),
        ]);
        if let Some(code) = self.exit_code {
            out.insert(ANN_EXIT_CODE.to_string(), code.to_string());
        }
        out
    }
}

/// Longest reason kept in a record.
const MAX_RECORDED_REASON: usize = 2048;

/// A record Job for a job whose own Job is gone: same name, no pods, the outcome in its
/// annotations, out of the tracker's watch, removed by Kubernetes when it expires.
pub fn plan_record(defaults: &JobDefaults, meta: &JobMeta, record: &Record<'_>) -> JobPlan {
    let mut plan = plan_tombstone(defaults, &meta.job_id, meta.attempt, meta.handler.as_deref(), "");
    plan.annotations.remove(ANN_CANCELLED);
    plan.annotations.insert(ANN_FINGERPRINT.to_string(), meta.fingerprint.clone());
    plan.annotations.extend(record.annotations());
    plan.labels.insert(LABEL_RECORD.to_string(), "true".to_string());
    plan.active_deadline_seconds = Some(i64::try_from(record.keep_for.as_secs()).unwrap_or(i64::MAX).max(1));
    plan.container.name = "record".into();
    plan.container.image = "record".into();
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::parse_request;
    use serde_json::json;

    fn request(extra: serde_json::Value) -> JobRequest {
        let mut v = json!({"schema": "k8s-job-worker/job-request/v1", "job_id": "42", "command_line": "true", "image": "busybox"});
        v.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        parse_request(&serde_json::to_vec(&v).unwrap(), 1 << 20).unwrap()
    }

    fn main() -> JobDefaults {
        JobDefaults {
            naming: Naming { prefix: "galaxy".into(), instance_id: Some("main".into()) },
            ..JobDefaults::default()
        }
    }

    #[test]
    fn the_request_and_the_defaults_make_the_plan() {
        let defaults = JobDefaults {
            limits: Quantities { cpu: None, memory: Some("2G".into()) },
            env: Map::from([("TMPDIR".into(), "/scratch".into())]),
            ..main()
        };
        let plan = plan_job(&request(json!({"limits_cpu": 2, "attempt": 2, "shell": "/bin/sh"})), &defaults).unwrap();
        assert_eq!(plan.name, "galaxy-main-42-a2");
        assert_eq!(plan.container.command, ["/bin/sh", "-c", "true"]);
        assert_eq!(plan.container.limits, Quantities { cpu: Some("2".into()), memory: Some("2G".into()) });
        assert_eq!(plan.annotations[ANN_ATTEMPT], "2");
        assert_eq!(plan.labels[LABEL_INSTANCE], "main");
        let env: Map = plan.container.env.into_iter().collect();
        assert_eq!((env["TMPDIR"].as_str(), env["GALAXY_SLOTS"].as_str()), ("/scratch", "2"));
        assert_eq!((plan.parallelism, plan.backoff_limit), (1, 3));
    }

    #[test]
    fn issue25_a_request_may_set_groups_pull_policy_affinity_and_gpus_as_galaxys_destinations_do() {
        let defaults = JobDefaults {
            identity: Identity { fs_group: Some(1001), supplemental_groups: vec![2001], ..Identity::default() },
            pull_policy: Some(PullPolicy::IfNotPresent),
            policy: Policy {
                allowed_run_as_ids: vec!["1000-5000".parse().unwrap()],
                allow_affinity: true,
                allowed_extended_resources: vec![("nvidia.com/gpu".into(), 1)],
                ..Policy::default()
            },
            ..main()
        };
        let plain = plan_job(&request(json!({})), &defaults).unwrap();
        assert_eq!((plain.identity.fs_group, plain.identity.supplemental_groups.as_slice()), (Some(1001), &[2001][..]));
        assert_eq!(plain.container.pull_policy, Some(PullPolicy::IfNotPresent));
        let affinity = json!({"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": "gpu", "operator": "In", "values": ["a100"]}]}]}}});
        let asked = request(json!({"fs_group": 3000, "supplemental_groups": [3001, 3002], "pull_policy": "Always",
            "affinity": affinity, "extended_resources": {"nvidia.com/gpu": 1}}));
        let plan = plan_job(&asked, &defaults).unwrap();
        assert_eq!(
            (plan.identity.fs_group, plan.identity.supplemental_groups.as_slice()),
            (Some(3000), &[3001, 3002][..])
        );
        assert_eq!(plan.container.pull_policy, Some(PullPolicy::Always));
        assert_eq!(plan.affinity, Some(affinity));
        assert_eq!(plan.container.extended, BTreeMap::from([("nvidia.com/gpu".to_string(), 1)]));
        let two = request(json!({"extended_resources": {"nvidia.com/gpu": 2}}));
        assert!(matches!(
            plan_job(&two, &defaults),
            Err(ValidationError::Policy { rule: "policy_allowed_extended_resources", .. })
        ));
    }

    #[test]
    fn the_policy_is_checked_on_the_effective_values() {
        let defaults = JobDefaults {
            limits: Quantities { cpu: Some("8".into()), memory: None },
            policy: Policy { max_cpu_millis: Some(4000), ..Policy::default() },
            ..main()
        };
        let err = plan_job(&request(json!({})), &defaults).unwrap_err();
        assert!(matches!(err, ValidationError::Policy { rule: "policy_max_cpu", .. }), "{err}");
        assert!(plan_job(&request(json!({"limits_cpu": 1})), &defaults).is_ok());
    }

    #[test]
    fn item5_a_record_names_the_outcome_and_never_runs_a_pod() {
        let meta = JobMeta { job_id: "42".into(), attempt: Some(2), fingerprint: "fp".into(), ..JobMeta::default() };
        let long = "x".repeat(10_000);
        let record = Record {
            state: JobState::Failed,
            exit_code: Some(3),
            reason: &long,
            keep_for: std::time::Duration::from_secs(86_400),
            until: "2026-01-02T00:00:00Z".into(),
        };
        let plan = plan_record(&main(), &meta, &record);
        assert_eq!((plan.name.as_str(), plan.parallelism), ("galaxy-main-42-a2", 0));
        assert_eq!(plan.labels[LABEL_RECORD], "true");
        assert_eq!(
            (plan.annotations[ANN_REPORTED].as_str(), plan.annotations[ANN_EXIT_CODE].as_str()),
            ("failed", "3")
        );
        assert_eq!(plan.annotations[ANN_FINGERPRINT], "fp", "a repeated request is recognised");
        assert!(plan.annotations[ANN_REASON].len() <= 2048 && !plan.annotations.contains_key(ANN_CANCELLED));
        assert_eq!(plan.active_deadline_seconds, Some(86_400));
    }

    #[test]
    fn a_tombstone_never_runs_a_pod() {
        let t = plan_tombstone(&main(), "42", None, None, "user");
        assert_eq!((t.name.as_str(), t.parallelism), ("galaxy-main-42", 0));
        assert_eq!(t.annotations[ANN_CANCELLED], "user");
        assert!(!t.annotations.contains_key(ANN_FINGERPRINT), "a tombstone is never reported");
    }

    fn refusal(extra: serde_json::Value, defaults: &JobDefaults) -> &'static str {
        match plan_job(&request(extra.clone()), defaults) {
            Err(ValidationError::Policy { rule, .. }) => rule,
            other => panic!("{extra}: expected a policy refusal, got {other:?}"),
        }
    }

    #[test]
    fn item8_a_request_cannot_set_the_keys_the_worker_or_kubernetes_own() {
        for key in [
            "k8s-job-worker/cancelled",
            "k8s-job-worker/replaced",
            "k8s-job-worker/reported",
            "k8s-job-worker/instance-id",
            "k8s-job-worker/fingerprint",
            "app",
            "app.kubernetes.io/managed-by",
            "job-name",
            "controller-uid",
            "batch.kubernetes.io/job-name",
            "kubernetes.io/hostname",
            "node.kubernetes.io/instance-type",
            "k8s.io/x",
            "x.k8s.io/y",
        ] {
            for field in ["labels", "annotations"] {
                refusal(json!({ field: { key: "x" } }), &main());
            }
        }
        assert!(plan_job(&request(json!({"labels": {"team": "bio"}, "annotations": {"note": "hi"}})), &main()).is_ok());
    }

    #[test]
    fn item8_isolation_weakening_annotations_are_refused() {
        for key in [
            "sidecar.istio.io/inject",
            "linkerd.io/inject",
            "container.apparmor.security.beta.kubernetes.io/job-container",
            "seccomp.security.alpha.kubernetes.io/pod",
        ] {
            refusal(json!({"annotations": { key: "unconfined" }}), &main());
        }
    }

    #[test]
    fn item8_tolerations_and_priority_classes_need_an_allow_list() {
        let tolerations = json!({"tolerations": [{"key": "gpu", "operator": "Exists"}]});
        assert_eq!(refusal(tolerations, &main()), "policy_allowed_tolerations");
        assert_eq!(refusal(json!({"tolerations": [{"operator": "Exists"}]}), &main()), "policy_allowed_tolerations");
        assert_eq!(
            refusal(json!({"priority_class": "system-node-critical"}), &main()),
            "policy_allowed_priority_classes"
        );
    }

    #[test]
    fn item8_request_env_overrides_neither_the_operators_nor_the_derived_variables() {
        let defaults = JobDefaults { env: Map::from([("TMPDIR".into(), "/scratch".into())]), ..main() };
        let asked = json!({"limits_cpu": 2, "env": [
            {"name": "TMPDIR", "value": "/tmp/evil"}, {"name": "GALAXY_SLOTS", "value": "64"}, {"name": "A", "value": "1"}]});
        let env: Map = plan_job(&request(asked), &defaults).unwrap().container.env.into_iter().collect();
        assert_eq!(env["TMPDIR"], "/scratch", "the operator's k8s_extra_job_envs win over the request");
        assert_eq!(env["GALAXY_SLOTS"], "2", "derived from the resources");
        assert_eq!(env["A"], "1", "the request's own variables are kept");
    }
}
