//! `deploy/`'s ServiceAccount, Role and RoleBinding, applied to the real apiserver: the worker
//! running with only that ServiceAccount's token completes a job end to end, and the token can
//! neither read Secrets nor touch another namespace.

use std::time::Duration;

use k8s_job_worker::domain::event::JobState;
use k8s_job_worker_testkit::*;
use k8s_openapi::api::{
    batch::v1::Job,
    core::v1::{Secret, ServiceAccount},
    rbac::v1::{Role, RoleBinding},
};
use kube::api::{Api, ListParams, PostParams};

fn manifest<T: serde::de::DeserializeOwned>(file: &str) -> T {
    let path = format!("{}/deploy/{file}", repo_root().display());
    serde_saphyr::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn is_forbidden<T: std::fmt::Debug>(result: kube::Result<T>) -> bool {
    matches!(result, Err(kube::Error::Api(e)) if e.code == 403)
}

#[tokio::test]
async fn the_deploy_role_is_enough_for_a_job_and_nothing_more() {
    let mut h = Harness::new("d-rbac").await;
    let ns = h.namespace.clone();
    let pp = PostParams::default();
    Api::<ServiceAccount>::namespaced(h.client.clone(), &ns)
        .create(&pp, &manifest("serviceaccount.yaml"))
        .await
        .unwrap();
    Api::<Role>::namespaced(h.client.clone(), &ns).create(&pp, &manifest("role.yaml")).await.unwrap();
    Api::<RoleBinding>::namespaced(h.client.clone(), &ns).create(&pp, &manifest("rolebinding.yaml")).await.unwrap();

    // The token the tokens controller issues for the worker's ServiceAccount.
    let sas: Api<ServiceAccount> = Api::namespaced(h.client.clone(), &ns);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let secret_name = loop {
        let sa = sas.get("k8s-job-worker").await.unwrap();
        if let Some(name) = sa.secrets.and_then(|s| s.into_iter().next()).and_then(|r| r.name) {
            break name;
        }
        assert!(std::time::Instant::now() < deadline, "no token for the service account");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let secret = Api::<Secret>::namespaced(h.client.clone(), &ns).get(&secret_name).await.unwrap();
    let token = String::from_utf8(secret.data.unwrap()["token"].0.clone()).unwrap();

    // A kubeconfig with only that token.
    let admin = kube::config::Kubeconfig::read_from(std::env::var("KUBECONFIG").unwrap()).unwrap();
    let cluster = admin.clusters[0].cluster.clone().unwrap();
    let kubeconfig = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {}\n    certificate-authority-data: {}\n\
         users:\n- name: worker\n  user:\n    token: {token}\ncontexts:\n- name: w\n  context: {{cluster: c, user: worker, namespace: {ns}}}\ncurrent-context: w\n",
        cluster.server.unwrap(),
        cluster.certificate_authority_data.unwrap()
    );
    let path = format!("{}/{ns}.kubeconfig", log_dir().display());
    std::fs::write(&path, &kubeconfig).unwrap();

    // The worker with that identity runs a job end to end (create, watch, pods/log, lease, delete).
    h.extra_env = vec![("K8S_CONFIG_PATH".into(), path.clone())];
    h.start_worker().await;
    h.submit(&request("1", "echo least privilege")).await;
    let done = h.until_terminal("1").await.pop().unwrap();
    assert_eq!(done.state, JobState::Succeeded, "{done:#?}");
    assert_eq!(done.log_tail.as_deref(), Some("least privilege\n"));
    h.cleaned_up("galaxy-main-1").await; // the record's pod deletion is allowed

    // ...and nothing more.
    let config =
        kube::Config::from_custom_kubeconfig(kube::config::Kubeconfig::read_from(&path).unwrap(), &Default::default())
            .await
            .unwrap();
    let worker = kube::Client::try_from(config).unwrap();
    assert!(Api::<Job>::namespaced(worker.clone(), &ns).list(&ListParams::default()).await.is_ok());
    assert!(is_forbidden(Api::<Secret>::namespaced(worker.clone(), &ns).list(&ListParams::default()).await), "secrets");
    assert!(
        is_forbidden(Api::<Secret>::namespaced(worker.clone(), &ns).get(&secret_name).await),
        "its own token secret"
    );
    assert!(
        is_forbidden(Api::<Job>::namespaced(worker.clone(), "default").list(&ListParams::default()).await),
        "another namespace"
    );
    let job: Job =
        serde_json::from_value(serde_json::json!({"metadata": {"name": "x"}, "spec": {"template": {"spec": {
        "restartPolicy": "Never", "containers": [{"name": "c", "image": "busybox"}]}}}}))
        .unwrap();
    assert!(is_forbidden(Api::<Job>::namespaced(worker, "default").create(&pp, &job).await), "create elsewhere");

    // `check` with that identity: everything there; then, without pods/log, it names the gap.
    let check = |path: &str, extra: &[&str]| {
        let out = std::process::Command::new(worker_bin())
            .args([
                "--log-format",
                "text",
                "check",
                "--k8s-namespace",
                &ns,
                "--k8s-config-path",
                path,
                "--amqp-url",
                &amqp_url(),
            ])
            .args(extra)
            .env("RUST_LOG", "off")
            .env("RUST_BACKTRACE", "0")
            .output()
            .unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stdout).to_string())
    };
    let (ok, out) = check(&path, &[]);
    assert!(ok && out.contains("all 15 permissions"), "{out}");
    // With interactive tools, their Services and Ingresses too (the Role has them).
    let (ok, out) = check(&path, &["--policy-allowed-ingress-domains", "its.example.org"]);
    assert!(ok && out.contains("all 21 permissions"), "{out}");
    assert!(out.contains("note  namespace"), "a namespaced Role cannot read namespaces: {out}");
    let roles: Api<Role> = Api::namespaced(h.client.clone(), &ns);
    let mut role = roles.get("k8s-job-worker").await.unwrap();
    role.rules
        .as_mut()
        .unwrap()
        .retain(|r| r.resources.as_ref().is_none_or(|res| !res.contains(&"pods/log".to_string())));
    roles.replace("k8s-job-worker", &pp, &role).await.unwrap();
    let (ok, out) = check(&path, &[]);
    assert!(!ok && out.contains("FAIL  missing permission in namespace") && out.contains("get pods/log"), "{out}");
    h.finish().await;
}

#[tokio::test]
async fn deploy_applies_with_kubectl_apply_k() {
    use k8s_openapi::api::{apps::v1::Deployment, core::v1::ConfigMap};
    let kubectl = std::env::var("KUBECTL").expect("KUBECTL not set: scripts/testenv env prints it");
    let client = kube_client().await;
    let ns = unique("d-apply");
    namespace(&client, &ns).await;
    let apply =
        |args: &[&str]| std::process::Command::new(&kubectl).args(["apply", "-n", &ns]).args(args).output().unwrap();
    let out = apply(&["-k", &format!("{}/deploy", repo_root().display())]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Kubernetes 1.20 does not serve policy/v1 (the base targets >= 1.21): that object, and only
    // that one, is refused here; everything else is applied.
    let errors: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(
        errors.iter().all(|l| l.contains("PodDisruptionBudget") && l.contains("policy/v1")),
        "unexpected kubectl errors: {stderr}"
    );
    let out = apply(&["-f", concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/pdb-v1beta1.yaml")]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    assert!(Api::<ServiceAccount>::namespaced(client.clone(), &ns).get_opt("k8s-job-worker").await.unwrap().is_some());
    assert!(Api::<Role>::namespaced(client.clone(), &ns).get_opt("k8s-job-worker").await.unwrap().is_some());
    assert!(Api::<RoleBinding>::namespaced(client.clone(), &ns).get_opt("k8s-job-worker").await.unwrap().is_some());
    let maps = Api::<ConfigMap>::namespaced(client.clone(), &ns).list(&ListParams::default()).await.unwrap();
    let config =
        maps.items.iter().find(|m| m.metadata.name.as_deref().unwrap_or("").starts_with("k8s-job-worker-")).unwrap();
    assert_eq!(config.data.as_ref().unwrap()["K8S_USE_SERVICE_ACCOUNT"], "true");
    let d = Api::<Deployment>::namespaced(client.clone(), &ns).get("k8s-job-worker").await.unwrap();
    let spec = d.spec.unwrap();
    assert_eq!(spec.replicas, Some(2));
    let pod = spec.template.spec.unwrap();
    assert_eq!(pod.service_account_name.as_deref(), Some("k8s-job-worker"));
    assert_eq!(pod.termination_grace_period_seconds, Some(30));
    let c = &pod.containers[0];
    assert_eq!(c.liveness_probe.as_ref().unwrap().http_get.as_ref().unwrap().path.as_deref(), Some("/healthz"));
    assert_eq!(c.readiness_probe.as_ref().unwrap().http_get.as_ref().unwrap().path.as_deref(), Some("/readyz"));
    let sc = c.security_context.as_ref().unwrap();
    assert_eq!((sc.read_only_root_filesystem, sc.allow_privilege_escalation), (Some(true), Some(false)));
    assert_eq!(pod.security_context.unwrap().run_as_non_root, Some(true));
    // The generated names were rewritten into the references.
    let env = c.env.as_ref().unwrap();
    let secret_ref = env
        .iter()
        .find(|e| e.name == "AMQP_URL")
        .unwrap()
        .value_from
        .as_ref()
        .unwrap()
        .secret_key_ref
        .as_ref()
        .unwrap();
    assert!(Api::<Secret>::namespaced(client.clone(), &ns).get_opt(&secret_ref.name).await.unwrap().is_some());
    drop_namespace(&client, &ns).await;
}
