//! `check`: verifies, with the worker's own settings and credentials, everything it needs —
//! and says exactly which piece is missing.

use k8s_job_worker::config::Settings;
use k8s_openapi::api::{
    authorization::v1::{ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec},
    core::v1::{Namespace, PersistentVolumeClaim},
};
use kube::api::{Api, PostParams};
use lapin::{options::QueueDeclareOptions, types::FieldTable, Connection, ConnectionProperties};

/// Every permission the worker uses: (verb, API group, resource, subresource).
pub const PERMISSIONS: &[(&str, &str, &str, &str)] = &[
    ("get", "batch", "jobs", ""),
    ("list", "batch", "jobs", ""),
    ("watch", "batch", "jobs", ""),
    ("create", "batch", "jobs", ""),
    ("patch", "batch", "jobs", ""),
    ("delete", "batch", "jobs", ""),
    ("get", "", "pods", ""),
    ("list", "", "pods", ""),
    ("watch", "", "pods", ""),
    ("delete", "", "pods", ""),
    ("get", "", "pods", "log"),
    ("list", "", "events", ""),
    ("get", "coordination.k8s.io", "leases", ""),
    ("create", "coordination.k8s.io", "leases", ""),
    ("update", "coordination.k8s.io", "leases", ""),
];

/// The permissions interactive tools need besides (their Service and Ingress), checked when
/// `policy_allowed_ingress_domains` admits any.
pub const ROUTE_PERMISSIONS: &[(&str, &str, &str, &str)] = &[
    ("get", "", "services", ""),
    ("create", "", "services", ""),
    ("delete", "", "services", ""),
    ("get", "networking.k8s.io", "ingresses", ""),
    ("create", "networking.k8s.io", "ingresses", ""),
    ("delete", "networking.k8s.io", "ingresses", ""),
];

struct Report {
    failures: usize,
}

impl Report {
    fn ok(&mut self, what: &str) {
        println!("ok    {what}");
    }
    fn fail(&mut self, what: &str) {
        self.failures += 1;
        println!("FAIL  {what}");
    }
    fn note(&mut self, what: &str) {
        println!("note  {what}");
    }
}

/// Runs every check; the error says how many failed.
pub async fn check(settings: Settings) -> anyhow::Result<()> {
    let mut r = Report { failures: 0 };
    match settings.validate() {
        Ok(()) => r.ok("configuration is valid"),
        Err(why) => r.fail(&format!("configuration: {why}")),
    }
    broker(&settings, &mut r).await;
    kubernetes(&settings, &mut r).await;
    if r.failures > 0 {
        anyhow::bail!("{} check(s) failed", r.failures);
    }
    println!("all checks passed");
    Ok(())
}

async fn broker(s: &Settings, r: &mut Report) {
    let url = &s.amqp.amqp_url;
    let redacted = match url.split_once('@') {
        Some((_, host)) => format!("amqp://***@{host}"),
        None => url.clone(),
    };
    let conn = match Connection::connect(url, ConnectionProperties::default()).await {
        Ok(conn) => {
            r.ok(&format!("broker login at {redacted}"));
            conn
        }
        Err(e) => return r.fail(&format!("broker login at {redacted}: {e}")),
    };
    for queue in [&s.amqp.request_queue, &s.amqp.control_queue, &s.amqp.dead_letter_queue] {
        // A passive declare fails (and closes the channel) when the queue is missing.
        let Ok(channel) = conn.create_channel().await else { return r.fail("broker: cannot open a channel") };
        let passive = QueueDeclareOptions { passive: true, ..QueueDeclareOptions::default() };
        match channel.queue_declare(queue.clone().into(), passive, FieldTable::default()).await {
            Ok(q) => r.ok(&format!(
                "queue {queue} exists ({} messages, {} consumers)",
                q.message_count(),
                q.consumer_count()
            )),
            Err(_) => r.note(&format!("queue {queue} does not exist yet (the worker declares it when it starts)")),
        }
    }
    let _ = conn.close(200, "check done".into()).await;
}

async fn kubernetes(s: &Settings, r: &mut Report) {
    let client = match k8s_job_worker::k8s::client::client(&s.kube).await {
        Ok(c) => c,
        Err(e) => return r.fail(&format!("kubernetes configuration: {e}")),
    };
    match client.apiserver_version().await {
        Ok(v) => r.ok(&format!("apiserver reachable (Kubernetes {}.{})", v.major, v.minor)),
        Err(e) => return r.fail(&format!("apiserver unreachable: {e}")),
    }
    let ns = &s.kube.k8s_namespace;
    match Api::<Namespace>::all(client.clone()).get_opt(ns).await {
        Ok(Some(_)) => r.ok(&format!("namespace {ns} exists")),
        Ok(None) => r.fail(&format!("namespace {ns} does not exist")),
        Err(kube::Error::Api(e)) if e.code == 403 => {
            r.note(&format!("namespace {ns}: not allowed to read namespaces; assumed to exist"))
        }
        Err(e) => r.fail(&format!("namespace {ns}: {e}")),
    }
    let mut missing = Vec::new();
    let routes = if s.kube.placement.policy_allowed_ingress_domains.0.is_empty() { &[][..] } else { ROUTE_PERMISSIONS };
    let needed = PERMISSIONS.len() + routes.len();
    for (verb, group, resource, sub) in PERMISSIONS.iter().chain(routes) {
        let review = SelfSubjectAccessReview {
            spec: SelfSubjectAccessReviewSpec {
                resource_attributes: Some(ResourceAttributes {
                    namespace: Some(ns.clone()),
                    verb: Some(verb.to_string()),
                    group: Some(group.to_string()),
                    resource: Some(resource.to_string()),
                    subresource: (!sub.is_empty()).then(|| sub.to_string()),
                    ..ResourceAttributes::default()
                }),
                ..SelfSubjectAccessReviewSpec::default()
            },
            ..SelfSubjectAccessReview::default()
        };
        let what = format!(
            "{verb} {resource}{}{}",
            if sub.is_empty() { String::new() } else { format!("/{sub}") },
            if group.is_empty() { String::new() } else { format!(".{group}") }
        );
        match Api::<SelfSubjectAccessReview>::all(client.clone()).create(&PostParams::default(), &review).await {
            Ok(res) if res.status.as_ref().is_some_and(|st| st.allowed) => {}
            Ok(_) => missing.push(what),
            Err(e) => return r.fail(&format!("permission check (SelfSubjectAccessReview) failed: {e}")),
        }
    }
    if missing.is_empty() {
        r.ok(&format!("all {needed} permissions in namespace {ns}"));
    }
    for what in missing {
        r.fail(&format!("missing permission in namespace {ns}: {what} (see deploy/role.yaml)"));
    }
    let mut claims: Vec<String> = s.job_defaults().pvcs.into_iter().map(|m| m.claim).collect();
    claims.dedup();
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), ns);
    for claim in claims {
        match pvcs.get_opt(&claim).await {
            Ok(Some(_)) => r.ok(&format!("PersistentVolumeClaim {claim} exists")),
            Ok(None) => r.fail(&format!("PersistentVolumeClaim {claim} does not exist in namespace {ns}")),
            Err(kube::Error::Api(e)) if e.code == 403 => {
                r.note(&format!("PersistentVolumeClaim {claim}: not allowed to read PVCs; not verified"))
            }
            Err(e) => r.fail(&format!("PersistentVolumeClaim {claim}: {e}")),
        }
    }
}
