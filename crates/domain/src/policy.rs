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
#[path = "policy_tests.rs"]
mod tests;
