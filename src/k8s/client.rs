//! Building the Kubernetes client the way the runner chose its configuration.

use kube::{config::KubeConfigOptions, Client, Config};

use crate::config::KubeSettings;

/// Why no Kubernetes client could be built: what was tried, and the cause.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {source}")]
pub struct ClientError {
    /// The configuration that was tried.
    pub what: String,
    /// The cause.
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

fn failed<E: std::error::Error + Send + Sync + 'static>(what: impl Into<String>) -> impl FnOnce(E) -> ClientError {
    let what = what.into();
    move |e| ClientError { what, source: Box::new(e) }
}

/// How long a request (not a watch) may wait for the apiserver's answer. Without one, a
/// request sent on a connection that died with an apiserver restart waits until TCP gives up
/// (seen in a chaos run: reports of one replica stalled for minutes).
pub const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// How long a watch stream may stay silent: longer than the 290 s after which the apiserver
/// ends a watch kube's watcher opened, so only a dead connection (or a list that hangs) meets it.
pub const WATCH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(350);

/// The worker's two clients: one for requests, whose answers must come within
/// [`REQUEST_TIMEOUT`], and one for watches, which wait for news up to [`WATCH_TIMEOUT`].
#[derive(Clone)]
pub struct Clients {
    /// For requests.
    pub requests: Client,
    /// For watches.
    pub watches: Client,
}

/// In-cluster service account when `k8s_use_service_account`, else the kubeconfig at
/// `k8s_config_path`, else the usual `$KUBECONFIG` / `~/.kube/config`.
pub async fn clients(settings: &KubeSettings) -> Result<Clients, ClientError> {
    let mut watches = config(settings).await?;
    watches.reset_reader_on_write = true;
    let mut requests = watches.clone();
    requests.read_timeout = Some(REQUEST_TIMEOUT);
    watches.read_timeout = Some(WATCH_TIMEOUT);
    Ok(Clients {
        requests: Client::try_from(requests).map_err(failed("kubernetes client"))?,
        watches: Client::try_from(watches).map_err(failed("kubernetes client"))?,
    })
}

/// The client for requests alone (tools that do not watch).
pub async fn client(settings: &KubeSettings) -> Result<Client, ClientError> {
    Ok(clients(settings).await?.requests)
}

async fn config(settings: &KubeSettings) -> Result<Config, ClientError> {
    let config = if settings.k8s_use_service_account {
        Config::incluster().map_err(failed("in-cluster configuration"))?
    } else if let Some(path) = &settings.k8s_config_path {
        let kubeconfig = kube::config::Kubeconfig::read_from(path)
            .map_err(failed(format!("reading kubeconfig {}", path.display())))?;
        Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
            .await
            .map_err(failed(format!("kubeconfig {}", path.display())))?
    } else {
        Config::infer().await.map_err(failed("no Kubernetes configuration found"))?
    };
    Ok(config)
}
