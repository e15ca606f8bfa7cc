//! The Kubernetes side of a test: a client from KUBECONFIG, private namespaces, waiting.

use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_job_worker::domain::keys::FINALIZER;
use k8s_openapi::api::{
    batch::v1::Job,
    core::v1::{Namespace, ServiceAccount},
};
use kube::{
    api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams},
    Client,
};
use serde_json::json;

/// A Kubernetes client from KUBECONFIG; fails loudly without it (tests must never pass vacuously).
pub async fn kube_client() -> Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let config = kube::Config::from_custom_kubeconfig(kubeconfig(), &Default::default()).await.expect("kubeconfig");
    Client::try_from(config).expect("client")
}

/// host:port of the apiserver KUBECONFIG names.
pub fn apiserver_address() -> String {
    let kubeconfig = kubeconfig();
    let server = kubeconfig.clusters.iter().find_map(|c| c.cluster.as_ref()?.server.clone()).expect("a server");
    server.trim_start_matches("https://").trim_end_matches('/').to_string()
}

fn kubeconfig() -> kube::config::Kubeconfig {
    let path = std::env::var("KUBECONFIG")
        .expect("KUBECONFIG not set: run the tests through scripts/test (or eval $(scripts/testenv env))");
    kube::config::Kubeconfig::read_from(&path).expect("read kubeconfig")
}

/// Writes to `path` the kubeconfig of KUBECONFIG with its apiserver at `server` instead (e.g. a
/// [`crate::proxy::Proxy`] on 127.0.0.1, which the apiserver's certificate names too).
pub fn kubeconfig_via(server: &str, path: &std::path::Path) {
    let mut kubeconfig = kubeconfig();
    for cluster in kubeconfig.clusters.iter_mut().filter_map(|c| c.cluster.as_mut()) {
        cluster.server = Some(server.to_string());
    }
    // JSON is YAML: every kubeconfig reader takes it.
    std::fs::write(path, serde_json::to_vec(&kubeconfig).expect("kubeconfig as JSON")).expect("write kubeconfig");
}

/// Creates a namespace and waits until its default service account (and its token) exists.
pub async fn namespace(client: &Client, name: &str) {
    create_namespace(client, name).await.expect("create namespace");
}

/// Creates a namespace and waits until its default service account (and its token) exists.
pub async fn create_namespace(client: &Client, name: &str) -> kube::Result<()> {
    let api: Api<Namespace> = Api::all(client.clone());
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": name}})).expect("namespace object");
    api.create(&PostParams::default(), &ns).await?;
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), name);
    let deadline = Instant::now() + Duration::from_secs(60);
    while sas.get_opt("default").await?.and_then(|sa| sa.secrets).is_none_or(|s| s.is_empty()) {
        assert!(Instant::now() < deadline, "namespace {name}: no default service account token after 60 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// Deletes a namespace (and everything in it), letting go of the Jobs the worker still holds
/// with its finalizer (no worker reports them any more; they would keep the namespace
/// Terminating).
pub async fn drop_namespace(client: &Client, name: &str) {
    let api: Api<Namespace> = Api::all(client.clone());
    let _ = api.delete(name, &DeleteParams::default()).await;
    release_jobs(client, name).await;
}

/// Removes the worker's finalizer from every Job in `namespace` that still carries it.
pub async fn release_jobs(client: &Client, namespace: &str) {
    let jobs: Api<Job> = Api::namespaced(client.clone(), namespace);
    let Ok(list) = jobs.list(&ListParams::default()).await else { return };
    let held = list
        .items
        .into_iter()
        .filter(|job| job.metadata.finalizers.as_ref().is_some_and(|f| f.iter().any(|f| f == FINALIZER)));
    futures::stream::iter(held.filter_map(|job| job.metadata.name))
        .for_each_concurrent(16, |name| {
            let jobs = jobs.clone();
            async move {
                let patch = json!({"metadata": {"$deleteFromPrimitiveList/finalizers": [FINALIZER]}});
                let _ = jobs.patch(&name, &PatchParams::default(), &Patch::Strategic(patch)).await;
            }
        })
        .await;
}

/// Deletes a namespace and waits until it is gone (so its cleanup does not load the
/// apiserver during what comes next).
pub async fn drop_namespace_and_wait(client: &Client, name: &str, timeout: Duration) {
    drop_namespace(client, name).await;
    let api: Api<Namespace> = Api::all(client.clone());
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline && api.get_opt(name).await.ok().flatten().is_some() {
        tokio::time::sleep(Duration::from_secs(1)).await;
        release_jobs(client, name).await;
    }
}

/// Polls `read` every 200 ms until it gives `Some` (returned), for at most `within`.
pub async fn eventually<T, F, Fut>(within: Duration, mut read: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(value) = read().await {
            return Some(value);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Polls `check` every 100 ms until it is true; panics after `timeout`.
pub async fn wait_for<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
