//! The simulated Node object: registration and heartbeats.

use std::{sync::Arc, time::Duration};

use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;

use crate::Sim;

/// Node labels: the standard ones plus those given on the command line.
pub fn labels(sim: &Sim) -> serde_json::Map<String, serde_json::Value> {
    let mut labels = serde_json::Map::new();
    labels.insert("kubernetes.io/hostname".into(), json!(sim.args.node_name));
    labels.insert("kubernetes.io/os".into(), json!("linux"));
    labels.insert("kubernetes.io/arch".into(), json!(std::env::consts::ARCH.replace("x86_64", "amd64")));
    labels.insert("type".into(), json!("sim-node"));
    for (k, v) in &sim.args.labels {
        labels.insert(k.clone(), json!(v));
    }
    labels
}

fn status(sim: &Sim) -> serde_json::Value {
    let now = jiff::Timestamp::now().to_string();
    let resources = json!({"cpu": sim.args.cpu, "memory": sim.args.memory, "pods": sim.args.max_pods.to_string()});
    json!({
        "capacity": resources,
        "allocatable": resources,
        "conditions": [{
            "type": "Ready", "status": "True", "reason": "KubeletReady",
            "message": "sim-node is posting ready status",
            "lastHeartbeatTime": now, "lastTransitionTime": now,
        }],
        "addresses": [
            {"type": "InternalIP", "address": "127.0.0.1"},
            {"type": "Hostname", "address": sim.args.node_name},
        ],
        "daemonEndpoints": {"kubeletEndpoint": {"Port": sim.args.port}},
        "nodeInfo": {
            "machineID": "sim", "systemUUID": "sim", "bootID": "sim",
            "kernelVersion": "sim", "osImage": "sim-node", "containerRuntimeVersion": "sim://1",
            "kubeletVersion": "v1.20.2", "kubeProxyVersion": "v1.20.2",
            "operatingSystem": "linux", "architecture": "amd64",
        },
    })
}

/// Creates the Node (or relabels an existing one) and marks it Ready.
pub async fn register(sim: &Arc<Sim>) -> kube::Result<()> {
    let nodes: Api<Node> = Api::all(sim.client.clone());
    let node: Node = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": sim.args.node_name, "labels": labels(sim)},
    }))
    .map_err(kube::Error::SerdeError)?;
    match nodes.create(&PostParams::default(), &node).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {
            let patch = json!({"metadata": {"labels": labels(sim)}});
            nodes.patch(&sim.args.node_name, &PatchParams::default(), &Patch::Merge(&patch)).await?;
        }
        Err(e) => return Err(e),
    }
    nodes
        .patch_status(&sim.args.node_name, &PatchParams::default(), &Patch::Merge(&json!({"status": status(sim)})))
        .await?;
    Ok(())
}

/// Refreshes the Ready condition's heartbeat every 20 s, as a kubelet does.
pub async fn heartbeat(sim: Arc<Sim>) {
    let nodes: Api<Node> = Api::all(sim.client.clone());
    loop {
        tokio::time::sleep(Duration::from_secs(20)).await;
        let patch = json!({"status": status(&sim)});
        if let Err(err) = nodes.patch_status(&sim.args.node_name, &PatchParams::default(), &Patch::Merge(&patch)).await
        {
            tracing::warn!(%err, "node heartbeat failed");
        }
    }
}
