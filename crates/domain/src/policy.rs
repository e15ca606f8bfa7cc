//! The request policy: a request comes from the network, a pod spec runs code on the cluster.
//! Each rule is optional; a request outside one is refused with the rule's name.

use std::collections::BTreeMap;

use super::{
    keys,
    placement::{PvcMount, Toleration},
    quantity,
};

/// What in [`Policy::allowed_tolerations`] admits a toleration without a key (one that
/// tolerates every taint); no taint key can be `*`.
pub const ANY_TAINT: &str = "*";

/// The policy an admin configured.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Policy {
    /// Images must be under one of these prefixes (empty: any image); see [`image_under`].
    pub allowed_image_prefixes: Vec<String>,
    /// Largest CPU a job may ask for, in millicores.
    pub max_cpu_millis: Option<u64>,
    /// Largest memory a job may ask for, in bytes.
    pub max_memory_bytes: Option<u64>,
    /// PVCs a request may mount (empty: none beyond the worker's own): `claim` (any of it) or
    /// `claim/sub/path` (only sub-paths at or under `sub/path`: per-job mounts of Galaxy's job
    /// and data directories, never the whole claim).
    pub allowed_pvcs: Vec<String>,
    /// `key=value` node selectors a request may use (empty: none).
    pub allowed_node_selectors: Vec<(String, String)>,
    /// Shells a request may name (empty: none; a request naming no shell gets `/bin/bash`).
    pub allowed_shells: Vec<String>,
    /// Taint keys a request's tolerations may name (empty: none); [`ANY_TAINT`] also admits a
    /// toleration without a key.
    pub allowed_tolerations: Vec<String>,
    /// Priority classes a request may name (empty: none).
    pub allowed_priority_classes: Vec<String>,
    /// DNS prefixes of the label and annotation keys a request may use, each matched exactly
    /// (empty: none). Reserved keys ([`keys::is_reserved`]) are refused anyway.
    pub allowed_metadata_prefixes: Vec<String>,
    /// Whether a request may use label and annotation keys without a prefix.
    pub allow_unprefixed_metadata: bool,
    /// User and group ids a request may run as (`run_as_user`, `run_as_group`, `fs_group`,
    /// `supplemental_groups`); empty: a request may not choose them (the worker's settings
    /// apply).
    pub allowed_run_as_ids: Vec<IdRange>,
    /// Whether a request may set the pod's affinity.
    pub allow_affinity: bool,
    /// Extended resources a request may ask for, each with the most one job may have
    /// (`nvidia.com/gpu=2`); empty: none.
    pub allowed_extended_resources: Vec<(String, u64)>,
    /// Domains an interactive tool's entry points may be under, each with its subdomains
    /// (empty: no interactive tools).
    pub allowed_ingress_domains: Vec<String>,
    /// Ingress classes an interactive tool may name (empty: none; an Ingress without a class
    /// gets the cluster's default).
    pub allowed_ingress_classes: Vec<String>,
    /// Prefixes of the Ingress annotation keys an interactive tool may set (empty: none).
    /// Matched as text, so `nginx.ingress.kubernetes.io/proxy-` admits the proxy settings and
    /// not `nginx.ingress.kubernetes.io/configuration-snippet`.
    pub allowed_ingress_annotations: Vec<String>,
}

/// An inclusive range of user or group ids, written `1000-65535` (or one id, `1000`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdRange {
    /// First id.
    pub first: i64,
    /// Last id.
    pub last: i64,
}

impl std::str::FromStr for IdRange {
    type Err = crate::FormatError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || crate::FormatError::new(text, "an id range like 1000-65535 (ids above 0: never root)");
        let (first, last) = text.split_once('-').unwrap_or((text, text));
        let (first, last) =
            (first.trim().parse::<i64>().map_err(|_| bad())?, last.trim().parse::<i64>().map_err(|_| bad())?);
        if first <= 0 || last < first {
            return Err(bad());
        }
        Ok(IdRange { first, last })
    }
}

/// What the policy looks at in a request, after defaults were applied.
#[derive(Debug, Clone, Default)]
pub struct Asked<'a> {
    /// Image reference.
    pub image: &'a str,
    /// Largest of the CPU request and limit, in millicores.
    pub cpu_millis: Option<u64>,
    /// Largest of the memory request and limit, in bytes.
    pub memory_bytes: Option<u64>,
    /// PVC mounts the request asks for.
    pub pvcs: &'a [PvcMount],
    /// Node selector the request asks for.
    pub node_selector: Option<&'a BTreeMap<String, String>>,
    /// The shell the request names, if any.
    pub shell: Option<&'a str>,
    /// Tolerations the request adds.
    pub tolerations: &'a [Toleration],
    /// The priority class the request names, if any.
    pub priority_class: Option<&'a str>,
    /// Labels the request adds.
    pub labels: Option<&'a BTreeMap<String, String>>,
    /// Annotations the request adds.
    pub annotations: Option<&'a BTreeMap<String, String>>,
    /// The user id the request asks to run as.
    pub run_as_user: Option<i64>,
    /// The group id the request asks to run as.
    pub run_as_group: Option<i64>,
    /// The fsGroup the request asks for.
    pub fs_group: Option<i64>,
    /// The supplemental groups the request asks for.
    pub supplemental_groups: &'a [i64],
    /// Whether the request sets an affinity.
    pub affinity: bool,
    /// The extended resources the request asks for.
    pub extended_resources: Option<&'a BTreeMap<String, u64>>,
    /// An interactive tool's entry points and Ingress settings.
    pub interactive: Option<&'a crate::interactive::Interactive>,
}

/// A broken rule: its name (as configured) and what was asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// The setting that refuses it.
    pub rule: &'static str,
    /// What the request asked for.
    pub detail: String,
}

impl Policy {
    /// Checks a request against every configured rule.
    pub fn check(&self, asked: &Asked<'_>) -> Result<(), Violation> {
        let fail = |rule, detail: String| Err(Violation { rule, detail });
        if !self.allowed_image_prefixes.is_empty()
            && !self.allowed_image_prefixes.iter().any(|p| image_under(asked.image, p))
        {
            return fail(
                "policy_allowed_image_prefixes",
                format!("image {:?} is not under an allowed prefix", asked.image),
            );
        }
        if let (Some(max), Some(cpu)) = (self.max_cpu_millis, asked.cpu_millis) {
            if cpu > max {
                return fail("policy_max_cpu", format!("{cpu}m CPU asked, at most {max}m allowed"));
            }
        }
        if let (Some(max), Some(mem)) = (self.max_memory_bytes, asked.memory_bytes) {
            if mem > max {
                return fail("policy_max_memory", format!("{mem} bytes of memory asked, at most {max} allowed"));
            }
        }
        if let Some(pvc) = asked.pvcs.iter().find(|m| !self.allowed_pvcs.iter().any(|a| pvc_admits(a, m))) {
            let what = match &pvc.sub_path {
                Some(sub) => format!("PVC {:?} at sub-path {sub:?} may not be mounted by a request", pvc.claim),
                None => format!("PVC {:?} may not be mounted by a request", pvc.claim),
            };
            return fail("policy_allowed_pvcs", what);
        }
        for (k, v) in asked.node_selector.into_iter().flatten() {
            if !self.allowed_node_selectors.iter().any(|(ak, av)| ak == k && av == v) {
                return fail("policy_allowed_node_selectors", format!("node selector {k}={v} is not allowed"));
            }
        }
        if let Some(shell) = asked.shell.filter(|s| !self.allowed_shells.iter().any(|a| a == s)) {
            return fail("policy_allowed_shells", format!("shell {shell:?} is not allowed"));
        }
        for toleration in asked.tolerations {
            match toleration.key.as_deref().filter(|k| !k.is_empty()) {
                Some(key) if !self.allowed_tolerations.iter().any(|a| a == key) => {
                    return fail("policy_allowed_tolerations", format!("a toleration of taint {key:?} is not allowed"));
                }
                None if !self.allowed_tolerations.iter().any(|a| a == ANY_TAINT) => {
                    return fail(
                        "policy_allowed_tolerations",
                        "a toleration without a key (it tolerates every taint) is not allowed".into(),
                    );
                }
                _ => {}
            }
        }
        if let Some(class) = asked.priority_class.filter(|c| !self.allowed_priority_classes.iter().any(|a| a == c)) {
            return fail("policy_allowed_priority_classes", format!("priority class {class:?} is not allowed"));
        }
        for (what, map) in [("label", asked.labels), ("annotation", asked.annotations)] {
            for key in map.into_iter().flat_map(BTreeMap::keys) {
                if keys::is_reserved(key) {
                    return fail("reserved_metadata_keys", format!("{what} {key:?} is the worker's or Kubernetes'"));
                }
                match keys::key_prefix(key) {
                    Some(prefix) if !self.allowed_metadata_prefixes.iter().any(|a| a == prefix) => {
                        return fail(
                            "policy_allowed_metadata_prefixes",
                            format!("{what} {key:?}: prefix {prefix:?} is not allowed"),
                        );
                    }
                    None if !self.allow_unprefixed_metadata => {
                        return fail(
                            "policy_allow_unprefixed_metadata",
                            format!("{what} {key:?}: keys without a prefix are not allowed"),
                        );
                    }
                    _ => {}
                }
            }
        }
        let groups = asked.supplemental_groups.iter().map(|g| ("supplemental group", Some(*g)));
        let ids = [("user", asked.run_as_user), ("group", asked.run_as_group), ("fsGroup", asked.fs_group)];
        for (what, id) in ids.into_iter().chain(groups) {
            if let Some(id) = id.filter(|id| !self.allowed_run_as_ids.iter().any(|r| (r.first..=r.last).contains(id))) {
                return fail("policy_allowed_run_as_ids", format!("running as {what} id {id} is not allowed"));
            }
        }
        if asked.affinity && !self.allow_affinity {
            return fail("policy_allow_affinity", "a request may not set the pod's affinity".into());
        }
        for (name, count) in asked.extended_resources.into_iter().flatten() {
            match self.allowed_extended_resources.iter().find(|(allowed, _)| allowed == name) {
                None => return fail("policy_allowed_extended_resources", format!("{name} may not be asked for")),
                Some((_, most)) if count > most => {
                    return fail("policy_allowed_extended_resources", format!("{count} {name} asked, at most {most}"));
                }
                Some(_) => {}
            }
        }
        if let Some(interactive) = asked.interactive {
            self.check_interactive(interactive)?;
        }
        Ok(())
    }

    /// Checks an interactive tool's domains, Ingress class and annotations.
    fn check_interactive(&self, asked: &crate::interactive::Interactive) -> Result<(), Violation> {
        let fail = |rule, detail: String| Err(Violation { rule, detail });
        for ep in &asked.entry_points {
            if !self.allowed_ingress_domains.iter().any(|d| crate::interactive::domain_under(&ep.domain, d)) {
                return fail(
                    "policy_allowed_ingress_domains",
                    format!("entry point domain {:?} is not under an allowed domain", ep.domain),
                );
            }
        }
        if let Some(class) = asked.ingress_class.as_ref().filter(|c| !self.allowed_ingress_classes.contains(c)) {
            return fail("policy_allowed_ingress_classes", format!("ingress class {class:?} is not allowed"));
        }
        if let Some(key) = asked
            .annotations
            .keys()
            .find(|k| !self.allowed_ingress_annotations.iter().any(|p| k.starts_with(p.as_str())))
        {
            return fail("policy_allowed_ingress_annotations", format!("Ingress annotation {key:?} is not allowed"));
        }
        Ok(())
    }
}

/// Whether the policy entry `allowed` (`claim` or `claim/sub/path`) admits `mount`: the same
/// claim, and for an entry with a sub-path, a sub-path at or under it (compared by path
/// components; `..` never gets this far, [`crate::placement::parse_pvc_mount`] refuses it).
pub fn pvc_admits(allowed: &str, mount: &PvcMount) -> bool {
    let (claim, under) = match allowed.split_once('/') {
        Some((claim, under)) => (claim, Some(under.trim_matches('/'))),
        None => (allowed, None),
    };
    if claim != mount.claim {
        return false;
    }
    match (under, mount.sub_path.as_deref()) {
        (None, _) | (Some(""), _) => true,
        (Some(_), None) => false,
        (Some(under), Some(sub)) => sub == under || sub.strip_prefix(under).is_some_and(|rest| rest.starts_with('/')),
    }
}

/// Whether `image` is under the allowed `prefix`, matched on registry and path boundaries: it
/// is the prefix, or continues it with `/` or `@`, or with `:` and a tag (never a registry
/// port: a `/` after it), or the prefix ends with `/`, `:` or `@` (every path, tag or digest
/// below it; after `:` or `@` only a tag or digest). So `quay.io` admits
/// `quay.io/biocontainers/samtools:1` but not `quay.io.evil.example/x`;
/// `quay.io/biocontainers/samtools` admits its tags and digests but not `...samtools-evil`;
/// `debian:` admits every tag of `debian`; `biocontainers` does not admit
/// `biocontainers:5000/evil` (a registry of that name).
pub fn image_under(image: &str, prefix: &str) -> bool {
    let Some(rest) = image.strip_prefix(prefix) else { return false };
    if rest.is_empty() || prefix.ends_with('/') || rest.starts_with(['/', '@']) {
        return true;
    }
    let tag = if prefix.ends_with([':', '@']) { Some(rest) } else { rest.strip_prefix(':') };
    tag.is_some_and(|tag| !tag.contains('/'))
}

/// The larger of two optional quantities, as millicores or bytes.
pub fn largest(values: &[Option<&str>], parse: fn(&str) -> Option<u64>) -> Option<u64> {
    values.iter().flatten().filter_map(|q| parse(q)).max()
}

/// Millicores of a CPU quantity (re-exported for callers building [`Asked`]).
pub fn cpu(q: &str) -> Option<u64> {
    quantity::cpu_millis(q)
}

/// Bytes of a memory quantity.
pub fn memory(q: &str) -> Option<u64> {
    quantity::memory_bytes(q)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pvc(claim: &str) -> PvcMount {
        PvcMount { claim: claim.into(), sub_path: None, mount_path: "/x".into(), read_only: false }
    }

    #[test]
    fn an_empty_policy_allows_all_but_request_pvcs_and_selectors() {
        let p = Policy::default();
        assert!(p.check(&Asked { image: "anything", cpu_millis: Some(1_000_000), ..Asked::default() }).is_ok());
        assert_eq!(
            p.check(&Asked { pvcs: &[pvc("data")], ..Asked::default() }).unwrap_err().rule,
            "policy_allowed_pvcs"
        );
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
        assert_eq!(
            rule(Asked { supplemental_groups: &[1001, 5], ..Asked::default() }),
            Some("policy_allowed_run_as_ids")
        );
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
        assert_eq!(
            rule(&it("a.its.example.org", None, None), &Policy::default()),
            Some("policy_allowed_ingress_domains")
        );
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
        assert_eq!(
            rule(&closed, Asked { run_as_user: Some(1000), ..Asked::default() }),
            Some("policy_allowed_run_as_ids")
        );
        assert_eq!(
            rule(&closed, Asked { run_as_group: Some(1000), ..Asked::default() }),
            Some("policy_allowed_run_as_ids")
        );
        let open = Policy { allowed_run_as_ids: vec!["1000-2000".parse().unwrap()], ..Policy::default() };
        assert_eq!(rule(&open, Asked { run_as_user: Some(1500), run_as_group: Some(1000), ..Asked::default() }), None);
        assert_eq!(
            rule(&open, Asked { run_as_user: Some(2001), ..Asked::default() }),
            Some("policy_allowed_run_as_ids")
        );
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
}
