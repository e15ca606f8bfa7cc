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

/// In-cluster service account when `k8s_use_service_account`, else the kubeconfig at
/// `k8s_config_path`, else the usual `$KUBECONFIG` / `~/.kube/config`.
pub async fn client(settings: &KubeSettings) -> Result<Client, ClientError> {
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
    Client::try_from(config).map_err(failed("kubernetes client"))
}
