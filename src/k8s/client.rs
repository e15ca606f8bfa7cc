//! Building the Kubernetes client the way the runner chose its configuration.

use kube::{config::KubeConfigOptions, Client, Config};

use crate::config::KubeSettings;

/// In-cluster service account when `k8s_use_service_account`, else the kubeconfig at
/// `k8s_config_path`, else the usual `$KUBECONFIG` / `~/.kube/config`.
pub async fn client(settings: &KubeSettings) -> Result<Client, String> {
    let config = if settings.k8s_use_service_account {
        Config::incluster().map_err(|e| format!("in-cluster configuration: {e}"))?
    } else if let Some(path) = &settings.k8s_config_path {
        let kubeconfig = kube::config::Kubeconfig::read_from(path)
            .map_err(|e| format!("reading kubeconfig {}: {e}", path.display()))?;
        Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
            .await
            .map_err(|e| format!("kubeconfig {}: {e}", path.display()))?
    } else {
        Config::infer().await.map_err(|e| format!("no Kubernetes configuration found: {e}"))?
    };
    Client::try_from(config).map_err(|e| format!("kubernetes client: {e}"))
}
