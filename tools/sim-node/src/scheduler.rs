//! The one-node scheduler: binds pending pods that fit, marks the others Unschedulable.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use k8s_job_worker_domain::quantity;
use k8s_openapi::api::core::v1::Pod;
use kube::{
    api::{Api, Patch, PatchParams, PostParams},
    runtime::reflector::Store,
    ResourceExt,
};
use serde_json::json;

use crate::Sim;

/// CPU millicores and memory bytes requested by a pod's containers.
fn requests(pod: &Pod) -> (u64, u64) {
    let mut cpu = 0;
    let mut mem = 0;
    for c in pod.spec.iter().flat_map(|s| &s.containers) {
        let req = c.resources.as_ref().and_then(|r| r.requests.as_ref().or(r.limits.as_ref()));
        if let Some(req) = req {
            cpu += req.get("cpu").and_then(|q| quantity::cpu_millis(&q.0)).unwrap_or(0);
            mem += req.get("memory").and_then(|q| quantity::memory_bytes(&q.0)).unwrap_or(0);
        }
    }
    (cpu, mem)
}

/// Why the pod cannot go on the node, in the scheduler's words; `None` when it fits.
pub fn unfit_reason(
    pod: &Pod,
    node_labels: &BTreeMap<String, String>,
    free_cpu_millis: u64,
    free_memory: u64,
    free_pods: u64,
) -> Option<String> {
    let selector = pod.spec.as_ref().and_then(|s| s.node_selector.as_ref());
    if let Some(selector) = selector {
        if selector.iter().any(|(k, v)| node_labels.get(k) != Some(v)) {
            return Some("0/1 nodes are available: 1 node(s) didn't match node selector.".into());
        }
    }
    let (cpu, mem) = requests(pod);
    let mut short = Vec::new();
    if cpu > free_cpu_millis {
        short.push("1 Insufficient cpu");
    }
    if mem > free_memory {
        short.push("1 Insufficient memory");
    }
    if free_pods == 0 {
        short.push("1 Too many pods");
    }
    (!short.is_empty()).then(|| format!("0/1 nodes are available: {}.", short.join(", ")))
}

/// Scheduling loop: runs when the pod watch or a finished pod wakes it, and every 2 s.
pub async fn run(sim: Arc<Sim>, store: Store<Pod>) {
    let cpu_total = quantity::cpu_millis(&sim.args.cpu).unwrap_or(u64::MAX);
    let mem_total = quantity::memory_bytes(&sim.args.memory).unwrap_or(u64::MAX);
    let node_labels: BTreeMap<String, String> =
        crate::node::labels(&sim).into_iter().map(|(k, v)| (k, v.as_str().unwrap_or_default().to_string())).collect();
    loop {
        let _ = tokio::time::timeout(Duration::from_secs(2), sim.reschedule.notified()).await;
        let pods = store.state();
        let mut used = (0u64, 0u64, 0u64);
        for pod in pods.iter().filter(|p| is_active_here(p, &sim.args.node_name)) {
            let (c, m) = requests(pod);
            used = (used.0 + c, used.1 + m, used.2 + 1);
        }
        let mut pending: Vec<_> = pods.iter().filter(|p| needs_scheduling(p)).collect();
        pending.sort_by_key(|p| p.metadata.creation_timestamp.clone());
        for pod in pending {
            let reason = unfit_reason(
                pod,
                &node_labels,
                cpu_total.saturating_sub(used.0),
                mem_total.saturating_sub(used.1),
                u64::from(sim.args.max_pods).saturating_sub(used.2),
            );
            let result = match reason {
                None => {
                    let (c, m) = requests(pod);
                    used = (used.0 + c, used.1 + m, used.2 + 1);
                    bind(&sim, pod).await
                }
                Some(message) => mark_unschedulable(&sim, pod, &message).await,
            };
            if let Err(err) = result {
                tracing::debug!(pod = %pod.name_any(), %err, "scheduling step failed (will retry)");
            }
        }
    }
}

fn is_active_here(pod: &Pod, node: &str) -> bool {
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node)
        && !matches!(phase, Some("Succeeded" | "Failed"))
}

fn needs_scheduling(pod: &Pod) -> bool {
    let spec = pod.spec.as_ref();
    spec.is_some_and(|s| s.node_name.is_none())
        && pod.metadata.deletion_timestamp.is_none()
        && spec.and_then(|s| s.scheduler_name.as_deref()).unwrap_or("default-scheduler") == "default-scheduler"
}

async fn bind(sim: &Sim, pod: &Pod) -> kube::Result<()> {
    let api: Api<Pod> = Api::namespaced(sim.client.clone(), &pod.namespace().unwrap_or_default());
    let binding = json!({
        "apiVersion": "v1", "kind": "Binding",
        "metadata": {"name": pod.name_any(), "uid": pod.uid()},
        "target": {"apiVersion": "v1", "kind": "Node", "name": sim.args.node_name},
    });
    api.create_subresource::<_, serde_json::Value>("binding", &pod.name_any(), &PostParams::default(), &binding)
        .await?;
    tracing::debug!(pod = %pod.name_any(), "bound");
    Ok(())
}

async fn mark_unschedulable(sim: &Sim, pod: &Pod, message: &str) -> kube::Result<()> {
    let already = pod.status.iter().flat_map(|s| s.conditions.iter().flatten()).any(|c| {
        c.type_ == "PodScheduled"
            && c.reason.as_deref() == Some("Unschedulable")
            && c.message.as_deref() == Some(message)
    });
    if already {
        return Ok(());
    }
    let api: Api<Pod> = Api::namespaced(sim.client.clone(), &pod.namespace().unwrap_or_default());
    let patch = json!({"status": {"phase": "Pending", "conditions": [{
        "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
        "message": message, "lastTransitionTime": jiff::Timestamp::now().to_string(),
    }]}});
    api.patch_status(&pod.name_any(), &PatchParams::default(), &Patch::Merge(&patch)).await?;
    tracing::info!(pod = %pod.name_any(), %message, "unschedulable");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(value: serde_json::Value) -> Pod {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn selector_mismatch_is_unschedulable() {
        let labels = BTreeMap::from([("type".to_string(), "sim-node".to_string())]);
        let p = pod(json!({"spec": {"containers": [{"name": "c"}], "nodeSelector": {"gpu": "yes"}}}));
        assert!(unfit_reason(&p, &labels, 1000, 1 << 30, 10).unwrap().contains("node selector"));
        let ok = pod(json!({"spec": {"containers": [{"name": "c"}], "nodeSelector": {"type": "sim-node"}}}));
        assert_eq!(unfit_reason(&ok, &labels, 1000, 1 << 30, 10), None);
    }

    #[test]
    fn requests_beyond_allocatable_are_unschedulable() {
        let p = pod(
            json!({"spec": {"containers": [{"name": "c", "resources": {"requests": {"cpu": "2", "memory": "1G"}}}]}}),
        );
        let reason = unfit_reason(&p, &BTreeMap::new(), 1000, 1 << 40, 10).unwrap();
        assert!(reason.contains("Insufficient cpu"), "{reason}");
        assert_eq!(unfit_reason(&p, &BTreeMap::new(), 2000, 1 << 40, 10), None);
    }
}
