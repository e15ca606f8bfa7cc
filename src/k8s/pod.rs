//! The pod spec of a job: container, resources, environment, volumes, placement and
//! identity, within the policy. Pure: no I/O.

use std::collections::BTreeMap;

use k8s_openapi::{
    api::core::v1::{
        Affinity, Container, EnvVar, PersistentVolumeClaimVolumeSource, PodSecurityContext, PodSpec,
        ResourceRequirements, SecurityContext, Toleration, Volume, VolumeMount,
    },
    apimachinery::pkg::api::resource::Quantity,
};

use crate::{
    config::{parse_resource, placement::Placement, KubeSettings},
    domain::{
        naming,
        placement::{galaxy_env, parse_pvc_mount, PvcMount},
        policy::{self, Asked},
        request::JobRequest,
        resources::{Resource, ResourceValue},
        ValidationError,
    },
};

fn resource(
    from_request: &Option<ResourceValue>,
    default: &Option<String>,
    kind: Resource,
    field: &'static str,
) -> Result<Option<Quantity>, ValidationError> {
    let value = match (from_request, default) {
        (Some(v), _) => v.clone(),
        (None, Some(d)) => parse_resource(d),
        (None, None) => return Ok(None),
    };
    value.quantity(kind).map(|q| q.map(Quantity)).map_err(|why| ValidationError::invalid(field, why))
}

fn quantities(entries: [(&str, Option<Quantity>); 2]) -> BTreeMap<String, Quantity> {
    entries.into_iter().filter_map(|(key, q)| Some((key.to_string(), q?))).collect()
}

/// Every PVC mount of a job: the runner's single claim, the configured list, the request's.
fn pvc_mounts(
    request: &JobRequest,
    k: &KubeSettings,
    placement: &Placement,
) -> Result<(Vec<PvcMount>, Vec<PvcMount>), ValidationError> {
    let mut worker: Vec<PvcMount> = placement.pvcs.clone();
    if let (Some(claim), Some(path)) = (&k.k8s_persistent_volume_claim_name, &k.k8s_persistent_volume_claim_mount_path)
    {
        worker.insert(0, PvcMount { claim: claim.clone(), sub_path: None, mount_path: path.clone(), read_only: false });
    }
    let asked = request
        .volumes
        .iter()
        .map(|v| parse_pvc_mount(v).map_err(|why| ValidationError::invalid("volumes", why)))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((worker, asked))
}

fn volumes(mounts: &[PvcMount]) -> (Vec<Volume>, Vec<VolumeMount>) {
    let mut claims: Vec<&str> = Vec::new();
    let mut volume_mounts = Vec::new();
    for m in mounts {
        let index = claims.iter().position(|c| *c == m.claim).unwrap_or_else(|| {
            claims.push(&m.claim);
            claims.len() - 1
        });
        volume_mounts.push(VolumeMount {
            name: format!("pvc-{index}"),
            mount_path: m.mount_path.clone(),
            sub_path: m.sub_path.clone(),
            read_only: m.read_only.then_some(true),
            ..VolumeMount::default()
        });
    }
    let volumes = claims
        .iter()
        .enumerate()
        .map(|(i, claim)| Volume {
            name: format!("pvc-{i}"),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: claim.to_string(),
                read_only: None,
            }),
            ..Volume::default()
        })
        .collect();
    (volumes, volume_mounts)
}

fn env(request: &JobRequest, placement: &Placement, cpu: Option<u64>, memory: Option<u64>) -> Vec<EnvVar> {
    // Later entries win: worker defaults, then the request, then the derived GALAXY_* values.
    let mut vars: Vec<(String, String)> = placement.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    vars.extend(request.env.iter().map(|v| (v.name.clone(), v.value.clone())));
    vars.extend(galaxy_env(cpu, memory));
    let mut out: Vec<EnvVar> = Vec::new();
    for (name, value) in vars {
        out.retain(|v| v.name != name);
        out.push(EnvVar { name, value: Some(value), value_from: None });
    }
    out
}

fn tolerations(request: &JobRequest, placement: &Placement) -> Option<Vec<Toleration>> {
    let all: Vec<Toleration> = placement
        .tolerations
        .iter()
        .chain(&request.tolerations)
        .map(|t| Toleration {
            key: t.key.clone(),
            operator: t.operator.clone(),
            value: t.value.clone(),
            effect: t.effect.clone(),
            toleration_seconds: t.toleration_seconds,
        })
        .collect();
    (!all.is_empty()).then_some(all)
}

/// The pod spec for a request, after checking the policy.
pub fn pod_spec(request: &JobRequest, k: &KubeSettings, placement: &Placement) -> Result<PodSpec, ValidationError> {
    let requests = quantities([
        ("cpu", resource(&request.requests_cpu, &k.k8s_default_requests_cpu, Resource::Cpu, "requests_cpu")?),
        (
            "memory",
            resource(&request.requests_memory, &k.k8s_default_requests_memory, Resource::Memory, "requests_memory")?,
        ),
    ]);
    let limits = quantities([
        ("cpu", resource(&request.limits_cpu, &k.k8s_default_limits_cpu, Resource::Cpu, "limits_cpu")?),
        ("memory", resource(&request.limits_memory, &k.k8s_default_limits_memory, Resource::Memory, "limits_memory")?),
    ]);
    let get = |m: &BTreeMap<String, Quantity>, key: &str| m.get(key).map(|q| q.0.clone());
    let (cpu_req, cpu_lim) = (get(&requests, "cpu"), get(&limits, "cpu"));
    let (mem_req, mem_lim) = (get(&requests, "memory"), get(&limits, "memory"));
    let (worker_mounts, asked_mounts) = pvc_mounts(request, k, placement)?;
    let image = request.image.reference();
    placement
        .policy
        .check(&Asked {
            image: &image,
            cpu_millis: policy::largest(&[cpu_req.as_deref(), cpu_lim.as_deref()], policy::cpu),
            memory_bytes: policy::largest(&[mem_req.as_deref(), mem_lim.as_deref()], policy::memory),
            pvcs: &asked_mounts,
            node_selector: Some(&request.node_selector),
        })
        .map_err(|v| ValidationError::Policy { rule: v.rule, detail: v.detail })?;

    let mounts: Vec<PvcMount> = worker_mounts.into_iter().chain(asked_mounts).collect();
    let (volumes, volume_mounts) = volumes(&mounts);
    let slots_from = cpu_lim.or(cpu_req).and_then(|q| policy::cpu(&q));
    let memory_from = mem_lim.or(mem_req).and_then(|q| policy::memory(&q));
    let positive = |g: Option<i64>| g.filter(|g| *g > 0);
    let run_as_user = positive(request.run_as_user.or(placement_user(k)));
    let run_as_group = positive(request.run_as_group.or(k.placement.k8s_run_as_group_id));
    let security = PodSecurityContext {
        fs_group: positive(k.k8s_fs_group_id),
        supplemental_groups: positive(k.k8s_supplemental_group_id).map(|g| vec![g]),
        run_as_user,
        run_as_group,
        ..PodSecurityContext::default()
    };
    let has_security = security != PodSecurityContext::default();
    let mut node_selector = placement.node_selector.clone();
    node_selector.extend(request.node_selector.clone());
    let container = Container {
        name: naming::container_name(request.destination_id.as_deref()),
        image: Some(image),
        command: Some(vec!["/bin/bash".into(), "-c".into(), request.command_line.clone()]),
        working_dir: request.working_directory.clone(),
        env: Some(env(request, placement, slots_from, memory_from)),
        image_pull_policy: k
            .k8s_pull_policy
            .as_deref()
            .filter(|p| matches!(*p, "Always" | "IfNotPresent" | "Never"))
            .map(str::to_string),
        resources: (!requests.is_empty() || !limits.is_empty()).then(|| ResourceRequirements {
            requests: (!requests.is_empty()).then_some(requests),
            limits: (!limits.is_empty()).then_some(limits),
            ..ResourceRequirements::default()
        }),
        volume_mounts: (!volume_mounts.is_empty()).then_some(volume_mounts),
        // Tools never need to gain privileges; nothing in a request can change this.
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            ..SecurityContext::default()
        }),
        ..Container::default()
    };
    Ok(PodSpec {
        restart_policy: Some("Never".into()),
        containers: vec![container],
        volumes: (!volumes.is_empty()).then_some(volumes),
        security_context: has_security.then_some(security),
        node_selector: (!node_selector.is_empty()).then_some(node_selector),
        tolerations: tolerations(request, placement),
        affinity: placement.affinity.clone().and_then(|a| serde_json::from_value::<Affinity>(a).ok()),
        priority_class_name: request.priority_class.clone().or_else(|| k.placement.k8s_pod_priority_class.clone()),
        // Galaxy tools have no business with the Kubernetes API.
        automount_service_account_token: Some(false),
        ..PodSpec::default()
    })
}

fn placement_user(k: &KubeSettings) -> Option<i64> {
    k.placement.k8s_run_as_user_id
}
