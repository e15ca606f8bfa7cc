//! Renders a domain [`JobPlan`] as the Kubernetes Job object, and the other objects and
//! patches the worker sends. Pure: every decision was taken before; this only spells it in
//! the API's types.

use std::collections::BTreeMap;

use k8s_openapi::{
    api::{
        batch::v1::{Job, JobSpec},
        core::v1::{
            Affinity, Container, EnvVar, PersistentVolumeClaimVolumeSource, PodSecurityContext, PodSpec,
            PodTemplateSpec, ResourceRequirements, SecurityContext, Service, ServicePort, ServiceSpec, Toleration,
            Volume, VolumeMount,
        },
        networking::v1::{
            HTTPIngressPath, HTTPIngressRuleValue, Ingress, IngressBackend, IngressRule, IngressServiceBackend,
            IngressSpec, IngressTLS, ServiceBackendPort,
        },
    },
    apimachinery::pkg::{
        api::resource::Quantity,
        apis::meta::v1::{ObjectMeta, OwnerReference},
        util::intstr::IntOrString,
    },
};

use super::view::job_meta;
use crate::domain::{
    event::JobState,
    interactive::RoutePlan,
    job::{Identity, JobPlan, Map, Quantities},
    keys::{ANN_CLAIMED, ANN_REPLACED, ANN_REPORTED, ANN_RESUBMISSIONS, ANN_RESUBMIT_DUE, FINALIZER, LABEL_RECORD},
    outcome::JobView,
    placement::PvcMount,
    record::Record,
};

fn some_if<T>(keep: bool, value: T) -> Option<T> {
    keep.then_some(value)
}

fn quantities(q: &Quantities) -> Option<BTreeMap<String, Quantity>> {
    let map: BTreeMap<String, Quantity> = [("cpu", &q.cpu), ("memory", &q.memory)]
        .into_iter()
        .filter_map(|(key, value)| Some((key.to_string(), Quantity(value.clone()?))))
        .collect();
    some_if(!map.is_empty(), map)
}

/// One volume per claim (`pvc-N`), one mount per entry.
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

fn security(identity: &Identity) -> Option<PodSecurityContext> {
    some_if(
        !identity.is_empty(),
        PodSecurityContext {
            fs_group: identity.fs_group,
            supplemental_groups: some_if(
                !identity.supplemental_groups.is_empty(),
                identity.supplemental_groups.clone(),
            ),
            run_as_user: identity.run_as_user,
            run_as_group: identity.run_as_group,
            ..PodSecurityContext::default()
        },
    )
}

fn map(m: &Map) -> Option<Map> {
    some_if(!m.is_empty(), m.clone())
}

/// The Kubernetes Job of a plan, in `namespace`.
pub fn job(plan: &JobPlan, namespace: &str) -> Job {
    let c = &plan.container;
    let (volumes, volume_mounts) = volumes(&c.mounts);
    // Extended resources (GPUs) are limits alone: Kubernetes sets their requests equal.
    let mut limits = quantities(&c.limits).unwrap_or_default();
    limits.extend(c.extended.iter().map(|(name, count)| (name.clone(), Quantity(count.to_string()))));
    let resources = some_if(
        !c.requests.is_empty() || !limits.is_empty(),
        ResourceRequirements {
            requests: quantities(&c.requests),
            limits: some_if(!limits.is_empty(), limits),
            ..Default::default()
        },
    );
    let container = Container {
        name: c.name.clone(),
        image: Some(c.image.clone()),
        command: Some(c.command.clone()),
        working_dir: c.working_dir.clone(),
        env: some_if(
            !c.env.is_empty(),
            c.env
                .iter()
                .map(|(name, value)| EnvVar { name: name.clone(), value: Some(value.clone()), value_from: None })
                .collect(),
        ),
        image_pull_policy: c.pull_policy.map(|p| p.as_str().to_string()),
        resources,
        volume_mounts: some_if(!volume_mounts.is_empty(), volume_mounts),
        // Tools never need to gain privileges; nothing in a request can change this.
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            ..SecurityContext::default()
        }),
        ..Container::default()
    };
    let tolerations: Vec<Toleration> = plan
        .tolerations
        .iter()
        .map(|t| Toleration {
            key: t.key.clone(),
            operator: t.operator.clone(),
            value: t.value.clone(),
            effect: t.effect.clone(),
            toleration_seconds: t.toleration_seconds,
        })
        .collect();
    let pod = PodSpec {
        restart_policy: Some("Never".into()),
        containers: vec![container],
        volumes: some_if(!volumes.is_empty(), volumes),
        security_context: security(&plan.identity),
        node_selector: map(&plan.node_selector),
        tolerations: some_if(!tolerations.is_empty(), tolerations),
        affinity: plan.affinity.clone().and_then(|a| serde_json::from_value::<Affinity>(a).ok()),
        priority_class_name: plan.priority_class.clone(),
        // Galaxy tools have no business with the Kubernetes API.
        automount_service_account_token: Some(false),
        ..PodSpec::default()
    };
    let pod_meta = some_if(
        !plan.pod_labels.is_empty() || !plan.pod_annotations.is_empty(),
        ObjectMeta { labels: map(&plan.pod_labels), annotations: map(&plan.pod_annotations), ..ObjectMeta::default() },
    );
    Job {
        metadata: ObjectMeta {
            name: Some(plan.name.clone()),
            namespace: Some(namespace.to_string()),
            labels: Some(plan.labels.clone()),
            annotations: Some(plan.annotations.clone()),
            ..ObjectMeta::default()
        },
        spec: Some(JobSpec {
            active_deadline_seconds: plan.active_deadline_seconds,
            backoff_limit: Some(i32::try_from(plan.backoff_limit).unwrap_or(i32::MAX)),
            completions: Some(1),
            parallelism: Some(i32::try_from(plan.parallelism).unwrap_or(1)),
            ttl_seconds_after_finished: plan.ttl_seconds_after_finished,
            template: PodTemplateSpec { metadata: pod_meta, spec: Some(pod) },
            ..JobSpec::default()
        }),
        status: None,
    }
}

/// The next generation of a preempted Job: the same spec as a new Job of the same name (new
/// pods, a fresh retrial budget), counted in its `resubmissions` annotation.
pub fn next_generation(old: &Job) -> Job {
    let mut annotations = old.metadata.annotations.clone().unwrap_or_default();
    let count = job_meta(&old.metadata).resubmissions + 1;
    annotations.insert(ANN_RESUBMISSIONS.into(), count.to_string());
    for mark in [ANN_REPLACED, ANN_REPORTED, ANN_CLAIMED, ANN_RESUBMIT_DUE] {
        annotations.remove(mark);
    }
    let mut spec = old.spec.clone().unwrap_or_default();
    // The job controller owns these; a new Job gets its own.
    spec.selector = None;
    spec.manual_selector = None;
    spec.parallelism = Some(1);
    if let Some(labels) = spec.template.metadata.as_mut().and_then(|m| m.labels.as_mut()) {
        labels.retain(|k, _| !k.ends_with("controller-uid") && !k.ends_with("job-name"));
    }
    Job {
        metadata: ObjectMeta {
            name: old.metadata.name.clone(),
            namespace: old.metadata.namespace.clone(),
            labels: old.metadata.labels.clone(),
            annotations: Some(annotations),
            ..ObjectMeta::default()
        },
        spec: Some(spec),
        status: None,
    }
}

/// The patch that stops the Job with this uid making pods; the uid is a precondition, so a
/// stale report can never stop a replacement of the same name.
pub fn stop_patch(uid: &str) -> serde_json::Value {
    serde_json::json!({"metadata": {"uid": uid}, "spec": {"parallelism": 0}})
}

/// The strategic merge patch that claims a terminal outcome on the Job with this uid, as it
/// was at `resource_version` (the apiserver refuses it when the Job changed since: a cancel
/// mark, a status update), holding it with the worker's finalizer until the event is out.
pub fn claim_patch(uid: &str, resource_version: &str, state: JobState) -> serde_json::Value {
    serde_json::json!({"metadata": {
        "uid": uid,
        "resourceVersion": resource_version,
        "finalizers": [FINALIZER],
        "annotations": {ANN_CLAIMED: state.as_str()},
    }})
}

/// The patch that makes a finished Job a record of its outcome, kept at least
/// `record.keep_for` from `now` — not from when the Job finished: Kubernetes counts
/// `ttlSecondsAfterFinished` from the Job's end, so for a Job that ended before `now` (its
/// report came late, after an outage) the time already gone is added, or the record would
/// vanish at once. A Job that has not ended by Kubernetes' account (stopped after an OOM
/// kill, say: its `Failed` condition may come a moment later) ends at the latest by its
/// deadline, `keep_for` from now, and goes `keep_for` after it ends. (The reporter also deletes
/// records at `record.until`: the TTL is the backstop when no worker is left.)
pub fn record_patch(record: &Record<'_>, view: &JobView, now: jiff::Timestamp) -> serde_json::Value {
    let keep = i64::try_from(record.keep_for.as_secs()).unwrap_or(i64::MAX).max(1);
    let since = |t: jiff::Timestamp| now.duration_since(t).as_secs().max(0);
    let ttl = |seconds: i64| i32::try_from(seconds).unwrap_or(i32::MAX);
    let finished = view.finished_at.as_deref().and_then(|t| t.parse::<jiff::Timestamp>().ok());
    let spec = match finished {
        Some(end) => serde_json::json!({
            "parallelism": 0,
            "ttlSecondsAfterFinished": ttl(keep.saturating_add(since(end))),
        }),
        None => serde_json::json!({
            "parallelism": 0,
            "activeDeadlineSeconds": keep.saturating_add(view.created.map_or(0, since)),
            "ttlSecondsAfterFinished": ttl(keep),
        }),
    };
    serde_json::json!({
        "metadata": {"labels": {LABEL_RECORD: "true"}, "annotations": record.annotations()},
        "spec": spec,
    })
}

/// The JSON patch that takes the worker's finalizer (and no one else's) off this Job, or
/// `None` when it carries none. It names the finalizer's place and tests that it, and the
/// Job's uid, are still what was read; a strategic merge patch's
/// `$deleteFromPrimitiveList/finalizers` would be simpler, but on a Job without finalizers
/// Kubernetes 1.20 adds what it was asked to delete.
pub fn unhold_patch(job: &Job) -> Option<serde_json::Value> {
    let at = job.metadata.finalizers.as_ref()?.iter().position(|f| f == FINALIZER)?;
    let path = format!("/metadata/finalizers/{at}");
    Some(serde_json::json!([
        {"op": "test", "path": "/metadata/uid", "value": job.metadata.uid},
        {"op": "test", "path": path, "value": FINALIZER},
        {"op": "remove", "path": path},
    ]))
}

/// The owner reference an object of a Job carries: it goes when the Job goes.
fn owned_by(job: &Job) -> OwnerReference {
    OwnerReference {
        api_version: "batch/v1".into(),
        kind: "Job".into(),
        name: job.metadata.name.clone().unwrap_or_default(),
        uid: job.metadata.uid.clone().unwrap_or_default(),
        controller: Some(false),
        block_owner_deletion: None,
    }
}

/// The ClusterIP Service and the `networking.k8s.io/v1` Ingress of an interactive Job, named
/// after it and owned by it, as Galaxy's runner makes them: the Service selects the Job's
/// pods by its uid (the job controller's `controller-uid` label) and exposes each entry
/// point's port; the Ingress routes each entry point's host and path (`Prefix`) to it.
pub fn routes(job: &Job, routes: &RoutePlan) -> (Service, Ingress) {
    let name = job.metadata.name.clone().unwrap_or_default();
    let meta = |annotations: Option<Map>| ObjectMeta {
        name: Some(name.clone()),
        namespace: job.metadata.namespace.clone(),
        labels: job.metadata.labels.clone(),
        annotations,
        owner_references: Some(vec![owned_by(job)]),
        ..ObjectMeta::default()
    };
    let uid = job.metadata.uid.clone().unwrap_or_default();
    let service = Service {
        metadata: meta(None),
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".into()),
            selector: Some(BTreeMap::from([("controller-uid".to_string(), uid)])),
            ports: Some(
                routes
                    .ports
                    .iter()
                    .map(|port| ServicePort {
                        name: Some(format!("port-{port}")),
                        port: i32::from(*port),
                        target_port: Some(IntOrString::Int(i32::from(*port))),
                        protocol: Some("TCP".into()),
                        ..ServicePort::default()
                    })
                    .collect(),
            ),
            ..ServiceSpec::default()
        }),
        status: None,
    };
    let rules = routes
        .entry_points
        .iter()
        .map(|ep| IngressRule {
            host: Some(ep.domain.clone()),
            http: Some(HTTPIngressRuleValue {
                paths: vec![HTTPIngressPath {
                    path: Some(ep.path.clone()),
                    path_type: "Prefix".into(),
                    backend: IngressBackend {
                        service: Some(IngressServiceBackend {
                            name: name.clone(),
                            port: Some(ServiceBackendPort { number: Some(i32::from(ep.port)), name: None }),
                        }),
                        resource: None,
                    },
                }],
            }),
        })
        .collect();
    let tls = routes
        .tls
        .iter()
        .map(|(host, secret)| IngressTLS { hosts: Some(vec![host.clone()]), secret_name: Some(secret.clone()) })
        .collect::<Vec<_>>();
    let ingress = Ingress {
        metadata: meta(map(&routes.annotations)),
        spec: Some(IngressSpec {
            ingress_class_name: routes.ingress_class.clone(),
            rules: Some(rules),
            tls: some_if(!tls.is_empty(), tls),
            default_backend: None,
        }),
        status: None,
    };
    (service, ingress)
}

#[cfg(test)]
#[path = "render_tests.rs"]
mod tests;
