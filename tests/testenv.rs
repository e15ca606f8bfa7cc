//! The local environment itself: real apiserver + controller-manager + sim-node, and the broker.

use std::time::Duration;

use futures::StreamExt;
use k8s_job_worker_testkit::*;
use k8s_openapi::api::{batch::v1::Job, core::v1::Pod};
use kube::api::{Api, ListParams, LogParams, PostParams};
use lapin::{options::*, types::FieldTable};
use serde_json::json;

async fn run_job(ns: &str, name: &str, spec: serde_json::Value) -> (Api<Job>, Api<Pod>) {
    let client = kube_client().await;
    let jobs: Api<Job> = Api::namespaced(client.clone(), ns);
    let job: Job = serde_json::from_value(json!({"metadata": {"name": name}, "spec": spec})).unwrap();
    jobs.create(&PostParams::default(), &job).await.unwrap();
    (jobs, Api::namespaced(client, ns))
}

fn container(command: &str, extra: serde_json::Value) -> serde_json::Value {
    let mut c = json!({"name": "main", "image": "busybox", "command": ["/bin/bash", "-c", command]});
    if let (Some(c), Some(extra)) = (c.as_object_mut(), extra.as_object()) {
        c.extend(extra.clone());
    }
    c
}

fn job_spec(backoff: i32, pod_extra: serde_json::Value, c: serde_json::Value) -> serde_json::Value {
    let mut pod = json!({"restartPolicy": "Never", "containers": [c]});
    if let (Some(p), Some(extra)) = (pod.as_object_mut(), pod_extra.as_object()) {
        p.extend(extra.clone());
    }
    json!({"backoffLimit": backoff, "template": {"spec": pod}})
}

async fn pods_of(pods: &Api<Pod>, job: &str) -> Vec<Pod> {
    pods.list(&ListParams::default().labels(&format!("job-name={job}"))).await.unwrap().items
}

fn terminated(pod: &Pod) -> Option<(i32, String)> {
    let t = pod.status.as_ref()?.container_statuses.as_ref()?.first()?.state.as_ref()?.terminated.as_ref()?;
    Some((t.exit_code, t.reason.clone().unwrap_or_default()))
}

#[tokio::test]
async fn succeeding_job_completes_and_its_logs_are_readable() {
    let client = kube_client().await;
    let ns = unique("env-ok");
    namespace(&client, &ns).await;
    let (jobs, pods) =
        run_job(&ns, "ok", job_spec(0, json!({}), container("echo hello from sim-node; exit 0", json!({})))).await;
    wait_for("job succeeded", Duration::from_secs(30), || async {
        jobs.get("ok").await.unwrap().status.and_then(|s| s.succeeded) == Some(1)
    })
    .await;
    let pod = pods_of(&pods, "ok").await.remove(0);
    assert_eq!(pod.status.as_ref().unwrap().phase.as_deref(), Some("Succeeded"));
    let log = pods.logs(&pod.metadata.name.unwrap(), &LogParams::default()).await.unwrap();
    assert_eq!(log, "hello from sim-node\n");
    drop_namespace(&client, &ns).await;
}

#[tokio::test]
async fn exit_code_is_reported_and_retrials_make_new_pods() {
    let client = kube_client().await;
    let ns = unique("env-exit");
    namespace(&client, &ns).await;
    let (jobs, pods) = run_job(&ns, "three", job_spec(2, json!({}), container("exit 3", json!({})))).await;
    wait_for("job failed", Duration::from_secs(90), || async {
        let job = jobs.get("three").await.unwrap();
        job.status
            .and_then(|s| s.conditions)
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Failed" && c.status == "True"))
    })
    .await;
    let all = pods_of(&pods, "three").await;
    assert_eq!(all.len(), 3, "backoffLimit 2 means 3 pods");
    for pod in &all {
        assert_eq!(pod.status.as_ref().unwrap().phase.as_deref(), Some("Failed"));
        assert_eq!(terminated(pod), Some((3, "Error".into())));
    }
    drop_namespace(&client, &ns).await;
}

#[tokio::test]
async fn memory_limit_is_enforced_as_oomkilled() {
    let client = kube_client().await;
    let ns = unique("env-oom");
    namespace(&client, &ns).await;
    let hog = "head -c 300M /dev/zero | tail";
    let c = container(hog, json!({"resources": {"limits": {"memory": "100M"}}}));
    let (_jobs, pods) = run_job(&ns, "oom", job_spec(0, json!({}), c)).await;
    wait_for("pod OOMKilled", Duration::from_secs(30), || async {
        pods_of(&pods, "oom").await.first().and_then(terminated) == Some((137, "OOMKilled".into()))
    })
    .await;
    drop_namespace(&client, &ns).await;
}

#[tokio::test]
async fn unsatisfiable_node_selector_is_unschedulable() {
    let client = kube_client().await;
    let ns = unique("env-unsched");
    namespace(&client, &ns).await;
    let spec = job_spec(0, json!({"nodeSelector": {"gpu": "a100"}}), container("true", json!({})));
    let (_jobs, pods) = run_job(&ns, "nowhere", spec).await;
    wait_for("PodScheduled=False/Unschedulable", Duration::from_secs(30), || async {
        pods_of(&pods, "nowhere").await.first().is_some_and(|p| {
            p.status.as_ref().and_then(|s| s.conditions.as_ref()).is_some_and(|cs| {
                cs.iter().any(|c| {
                    c.type_ == "PodScheduled" && c.status == "False" && c.reason.as_deref() == Some("Unschedulable")
                })
            })
        })
    })
    .await;
    let pod = pods_of(&pods, "nowhere").await.remove(0);
    assert_eq!(pod.spec.unwrap().node_name, None);
    drop_namespace(&client, &ns).await;
}

#[tokio::test]
async fn missing_image_gives_errimagepull() {
    let client = kube_client().await;
    let ns = unique("env-pull");
    namespace(&client, &ns).await;
    let c = json!({"name": "main", "image": "example.org/does-not-exist:1", "command": ["true"]});
    let (_jobs, pods) = run_job(&ns, "pull", job_spec(0, json!({}), c)).await;
    wait_for("ErrImagePull", Duration::from_secs(30), || async {
        pods_of(&pods, "pull").await.first().is_some_and(|p| {
            let waiting =
                p.status.as_ref().and_then(|s| s.container_statuses.as_ref()).and_then(|cs| cs.first().cloned());
            waiting.and_then(|c| c.state?.waiting?.reason).as_deref() == Some("ErrImagePull")
        })
    })
    .await;
    drop_namespace(&client, &ns).await;
}

#[tokio::test]
async fn rabbitmq_round_trip_with_confirm_and_ack() {
    let galaxy = GalaxyClient::connect(&amqp_url()).await.unwrap();
    let channel = &galaxy.channel;
    let queue = unique("env.roundtrip");
    channel
        .queue_declare(
            queue.clone().into(),
            QueueDeclareOptions { auto_delete: true, ..Default::default() },
            FieldTable::default(),
        )
        .await
        .unwrap();
    galaxy.publish(&queue, b"ping").await.expect("confirmed");
    assert!(galaxy.publish(&format!("{queue}-missing"), b"ping").await.is_err(), "unroutable is an error");
    let mut consumer = channel
        .basic_consume(queue.clone().into(), "t".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await
        .unwrap();
    let delivery = tokio::time::timeout(Duration::from_secs(10), consumer.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(delivery.data, b"ping");
    assert!(delivery.ack(BasicAckOptions::default()).await.unwrap());
    galaxy.conn.close(200, "bye".into()).await.unwrap();
}
