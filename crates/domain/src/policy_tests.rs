//! What a request may ask for, rule by rule.

use super::*;

fn pvc(claim: &str) -> PvcMount {
    PvcMount { claim: claim.into(), sub_path: None, mount_path: "/x".into(), read_only: false }
}

#[test]
fn an_empty_policy_allows_all_but_request_pvcs_and_selectors() {
    let p = Policy::default();
    assert!(p.check(&Asked { image: "anything", cpu_millis: Some(1_000_000), ..Asked::default() }).is_ok());
    assert_eq!(p.check(&Asked { pvcs: &[pvc("data")], ..Asked::default() }).unwrap_err().rule, "policy_allowed_pvcs");
    let sel = BTreeMap::from([("gpu".to_string(), "a100".to_string())]);
    let asked = Asked { node_selector: Some(&sel), ..Asked::default() };
    assert_eq!(p.check(&asked).unwrap_err().rule, "policy_allowed_node_selectors");
}

#[test]
fn each_rule_names_itself() {
    let p = Policy {
        allowed_image_prefixes: vec!["quay.io/biocontainers/".into()],
        max_cpu_millis: Some(4000),
        max_memory_bytes: Some(8_000_000_000),
        allowed_pvcs: vec!["refdata".into()],
        allowed_node_selectors: vec![("pool".into(), "galaxy".into())],
        allowed_shells: vec!["/bin/bash".into(), "/bin/sh".into()],
        ..Policy::default()
    };
    let ok = Asked { image: "quay.io/biocontainers/samtools:1", ..Asked::default() };
    assert!(p.check(&ok).is_ok());
    let rule = |a: Asked<'_>| p.check(&a).unwrap_err().rule;
    assert_eq!(rule(Asked { image: "docker.io/evil", ..ok.clone() }), "policy_allowed_image_prefixes");
    assert_eq!(rule(Asked { cpu_millis: Some(8000), ..ok.clone() }), "policy_max_cpu");
    assert_eq!(rule(Asked { memory_bytes: Some(16_000_000_000), ..ok.clone() }), "policy_max_memory");
    assert_eq!(rule(Asked { pvcs: &[pvc("secrets")], ..ok.clone() }), "policy_allowed_pvcs");
    assert!(p.check(&Asked { pvcs: &[pvc("refdata")], ..ok.clone() }).is_ok());
    let sel = BTreeMap::from([("pool".to_string(), "other".to_string())]);
    assert_eq!(rule(Asked { node_selector: Some(&sel), ..ok.clone() }), "policy_allowed_node_selectors");
    assert!(p.check(&Asked { shell: Some("/bin/sh"), ..ok.clone() }).is_ok());
    assert_eq!(rule(Asked { shell: Some("/usr/bin/python3"), ..ok.clone() }), "policy_allowed_shells");
}

#[test]
fn issue25_a_claim_with_a_sub_path_admits_mounts_under_it_only() {
    let p = Policy { allowed_pvcs: vec!["galaxy-data/jobs".into(), "refdata".into()], ..Policy::default() };
    let mount = |claim: &str, sub: Option<&str>| PvcMount {
        claim: claim.into(),
        sub_path: sub.map(str::to_string),
        mount_path: "/x".into(),
        read_only: false,
    };
    let ok = |m: PvcMount| p.check(&Asked { pvcs: &[m], ..Asked::default() }).is_ok();
    assert!(ok(mount("galaxy-data", Some("jobs/000/12/working"))));
    assert!(ok(mount("galaxy-data", Some("jobs"))));
    assert!(!ok(mount("galaxy-data", None)), "the whole claim: every job's files");
    assert!(!ok(mount("galaxy-data", Some("jobs-other/1"))), "a sibling, not under it");
    assert!(!ok(mount("galaxy-data", Some("files/000/dataset_1.dat"))));
    assert!(ok(mount("refdata", None)) && ok(mount("refdata", Some("hg38"))));
}

#[test]
fn issue25_groups_affinity_and_extended_resources_are_the_policys_to_admit() {
    let p = Policy {
        allowed_run_as_ids: vec!["1000-2000".parse().unwrap()],
        allowed_extended_resources: vec![("nvidia.com/gpu".into(), 2)],
        ..Policy::default()
    };
    let rule = |a: Asked<'_>| p.check(&a).err().map(|v| v.rule);
    assert_eq!(rule(Asked { fs_group: Some(1500), ..Asked::default() }), None);
    assert_eq!(rule(Asked { fs_group: Some(0), ..Asked::default() }), Some("policy_allowed_run_as_ids"));
    assert_eq!(rule(Asked { supplemental_groups: &[1001, 5], ..Asked::default() }), Some("policy_allowed_run_as_ids"));
    assert_eq!(rule(Asked { affinity: true, ..Asked::default() }), Some("policy_allow_affinity"));
    let allowed = Policy { allow_affinity: true, ..p.clone() };
    assert!(allowed.check(&Asked { affinity: true, ..Asked::default() }).is_ok());
    let gpus = |n: u64, name: &str| BTreeMap::from([(name.to_string(), n)]);
    let (two, three, other) = (gpus(2, "nvidia.com/gpu"), gpus(3, "nvidia.com/gpu"), gpus(1, "amd.com/gpu"));
    assert_eq!(rule(Asked { extended_resources: Some(&two), ..Asked::default() }), None);
    assert_eq!(
        rule(Asked { extended_resources: Some(&three), ..Asked::default() }),
        Some("policy_allowed_extended_resources")
    );
    assert_eq!(
        rule(Asked { extended_resources: Some(&other), ..Asked::default() }),
        Some("policy_allowed_extended_resources")
    );
}

#[test]
fn issue25_interactive_tools_only_under_allowed_domains_classes_and_annotations() {
    use crate::interactive::{EntryPoint, Interactive};
    let p = Policy {
        allowed_ingress_domains: vec!["its.example.org".into()],
        allowed_ingress_classes: vec!["nginx".into()],
        allowed_ingress_annotations: vec!["nginx.ingress.kubernetes.io/proxy-".into()],
        ..Policy::default()
    };
    let it = |domain: &str, class: Option<&str>, annotation: Option<&str>| Interactive {
        entry_points: vec![EntryPoint { port: 8888, domain: domain.into(), path: "/".into() }],
        ingress_class: class.map(Into::into),
        tls: false,
        tls_secret: None,
        annotations: annotation.map(|k| BTreeMap::from([(k.to_string(), "1".to_string())])).unwrap_or_default(),
    };
    let rule = |i: &Interactive, p: &Policy| {
        p.check(&Asked { interactive: Some(i), ..Asked::default() }).err().map(|v| v.rule)
    };
    let proxy = Some("nginx.ingress.kubernetes.io/proxy-body-size");
    assert_eq!(rule(&it("a.its.example.org", Some("nginx"), proxy), &p), None);
    assert_eq!(rule(&it("its.example.org.evil.com", None, None), &p), Some("policy_allowed_ingress_domains"));
    assert_eq!(rule(&it("a.its.example.org", Some("public"), None), &p), Some("policy_allowed_ingress_classes"));
    let snippet = Some("nginx.ingress.kubernetes.io/configuration-snippet");
    assert_eq!(rule(&it("a.its.example.org", None, snippet), &p), Some("policy_allowed_ingress_annotations"));
    assert_eq!(rule(&it("a.its.example.org", None, None), &Policy::default()), Some("policy_allowed_ingress_domains"));
}

#[test]
fn largest_of_request_and_limit() {
    assert_eq!(largest(&[Some("500m"), Some("2")], cpu), Some(2000));
    assert_eq!(largest(&[None, Some("1G")], memory), Some(1_000_000_000));
    assert_eq!(largest(&[None, None], cpu), None);
}

#[test]
fn item8_image_prefixes_match_on_registry_and_path_boundaries() {
    let allow = |prefix: &str, image: &str| {
        let p = Policy { allowed_image_prefixes: vec![prefix.into()], ..Policy::default() };
        p.check(&Asked { image, ..Asked::default() }).is_ok()
    };
    assert!(!allow("quay.io", "quay.io.evil.example/biocontainers/samtools:1"));
    assert!(!allow("quay.io/biocontainers", "quay.io/biocontainers-evil/samtools:1"));
    assert!(!allow("quay.io/biocontainers/samtools", "quay.io/biocontainers/samtools-evil:1"));
    assert!(!allow("busy", "busybox"));
    assert!(allow("quay.io", "quay.io/biocontainers/samtools:1"));
    assert!(allow("quay.io/biocontainers", "quay.io/biocontainers/samtools:1"));
    assert!(allow("quay.io/biocontainers/", "quay.io/biocontainers/samtools:1"));
    assert!(allow("quay.io/biocontainers/samtools", "quay.io/biocontainers/samtools:1.17"));
    assert!(allow("quay.io/biocontainers/samtools", "quay.io/biocontainers/samtools@sha256:0123"));
    assert!(allow("busybox", "busybox"));
    assert!(allow("localhost:5000", "localhost:5000/tool"));
}

#[test]
fn item7_a_tag_prefix_admits_every_tag_and_a_name_never_a_registry_port() {
    let allow = |prefix: &str, image: &str| {
        let p = Policy { allowed_image_prefixes: vec![prefix.into()], ..Policy::default() };
        p.check(&Asked { image, ..Asked::default() }).is_ok()
    };
    assert!(allow("debian:", "debian:12") && allow("debian:", "debian:bookworm-slim"));
    assert!(!allow("debian:", "debian:5000/evil"), "a registry port, not a tag");
    assert!(!allow("debian:", "debianx:12"));
    assert!(allow("biocontainers", "biocontainers:1.0") && allow("biocontainers", "biocontainers/samtools:1"));
    assert!(!allow("biocontainers", "biocontainers:5000/evil"));
    assert!(allow("quay.io/biocontainers/samtools@", "quay.io/biocontainers/samtools@sha256:0123"));
}

#[test]
fn item7_run_as_ids_and_unprefixed_keys_are_the_policys_to_allow() {
    let rule = |p: &Policy, a: Asked<'_>| p.check(&a).err().map(|v| v.rule);
    let closed = Policy::default();
    assert_eq!(rule(&closed, Asked { run_as_user: Some(1000), ..Asked::default() }), Some("policy_allowed_run_as_ids"));
    assert_eq!(
        rule(&closed, Asked { run_as_group: Some(1000), ..Asked::default() }),
        Some("policy_allowed_run_as_ids")
    );
    let open = Policy { allowed_run_as_ids: vec!["1000-2000".parse().unwrap()], ..Policy::default() };
    assert_eq!(rule(&open, Asked { run_as_user: Some(1500), run_as_group: Some(1000), ..Asked::default() }), None);
    assert_eq!(rule(&open, Asked { run_as_user: Some(2001), ..Asked::default() }), Some("policy_allowed_run_as_ids"));
    assert!("0-100".parse::<IdRange>().is_err() && "5-1".parse::<IdRange>().is_err(), "never root, never empty");
    assert_eq!("1000".parse::<IdRange>().unwrap(), IdRange { first: 1000, last: 1000 });

    let plain = BTreeMap::from([("team".to_string(), "bio".to_string())]);
    let unprefixed = Asked { labels: Some(&plain), ..Asked::default() };
    assert_eq!(rule(&closed, unprefixed.clone()), Some("policy_allow_unprefixed_metadata"));
    let free = Policy { allow_unprefixed_metadata: true, ..Policy::default() };
    assert_eq!(rule(&free, unprefixed), None);
}

#[test]
fn item8_allow_lists_for_tolerations_priority_classes_and_key_prefixes() {
    let p = Policy {
        allow_unprefixed_metadata: true,
        allowed_tolerations: vec!["gpu".into()],
        allowed_priority_classes: vec!["galaxy-high".into()],
        allowed_metadata_prefixes: vec!["example.org".into(), "k8s-job-worker".into(), "kubernetes.io".into()],
        ..Policy::default()
    };
    let toleration = |key: Option<&str>| Toleration {
        key: key.map(str::to_string),
        operator: Some("Exists".into()),
        value: None,
        effect: None,
        toleration_seconds: None,
    };
    let rule = |a: Asked<'_>| p.check(&a).err().map(|v| v.rule);
    assert_eq!(rule(Asked { tolerations: &[toleration(Some("gpu"))], ..Asked::default() }), None);
    let other = [toleration(Some("dedicated"))];
    assert_eq!(rule(Asked { tolerations: &other, ..Asked::default() }), Some("policy_allowed_tolerations"));
    let everything = [toleration(None)];
    assert_eq!(rule(Asked { tolerations: &everything, ..Asked::default() }), Some("policy_allowed_tolerations"));
    let star = Policy { allowed_tolerations: vec![ANY_TAINT.into()], ..Policy::default() };
    assert!(star.check(&Asked { tolerations: &everything, ..Asked::default() }).is_ok(), "explicitly allowed");
    assert_eq!(rule(Asked { priority_class: Some("galaxy-high"), ..Asked::default() }), None);
    assert_eq!(
        rule(Asked { priority_class: Some("other"), ..Asked::default() }),
        Some("policy_allowed_priority_classes")
    );

    let map = |k: &str| BTreeMap::from([(k.to_string(), "x".to_string())]);
    let (team, sidecar, sub) = (map("example.org/team"), map("sidecar.istio.io/inject"), map("x.example.org/team"));
    assert_eq!(rule(Asked { labels: Some(&team), annotations: Some(&map("plain")), ..Asked::default() }), None);
    assert_eq!(
        rule(Asked { annotations: Some(&sidecar), ..Asked::default() }),
        Some("policy_allowed_metadata_prefixes")
    );
    assert_eq!(
        rule(Asked { labels: Some(&sub), ..Asked::default() }),
        Some("policy_allowed_metadata_prefixes"),
        "a prefix is matched exactly, not its subdomains"
    );
    for reserved in ["k8s-job-worker/cancelled", "kubernetes.io/x", "app"] {
        let m = map(reserved);
        assert_eq!(
            rule(Asked { annotations: Some(&m), ..Asked::default() }),
            Some("reserved_metadata_keys"),
            "{reserved}: refused whatever is allowed"
        );
    }
}
