//! Placement and identity values as admins write them: `k=v,k2=v2` maps, Galaxy's
//! `pvc/subpath:/mount[:r]` volume strings, and the `GALAXY_*` resource variables.

use std::{collections::BTreeMap, str::FromStr};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::FormatError;

/// One PVC mount, from Galaxy's `claim[/subpath]:/mount/path[:r]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PvcMount {
    /// PersistentVolumeClaim name.
    pub claim: String,
    /// Path inside the volume, if any.
    pub sub_path: Option<String>,
    /// Where it is mounted in the container.
    pub mount_path: String,
    /// Mounted read-only (`:r`).
    pub read_only: bool,
}

/// Parses `claim[/subpath]:/mount/path[:r]`.
pub fn parse_pvc_mount(text: &str) -> Result<PvcMount, FormatError> {
    let bad = || FormatError::new(text, "`claim[/subpath]:/mount/path[:r]`");
    let (source, rest) = text.trim().split_once(':').ok_or_else(bad)?;
    let (mount_path, read_only) = match rest.rsplit_once(':') {
        Some((path, "r")) => (path, true),
        Some((path, "rw")) => (path, false),
        Some(_) => return Err(bad()),
        None => (rest, false),
    };
    let (claim, sub_path) = match source.split_once('/') {
        Some((claim, sub)) => (claim, Some(sub.trim_matches('/').to_string()).filter(|s| !s.is_empty())),
        None => (source, None),
    };
    let claim_ok = !claim.is_empty()
        && claim.len() <= 253
        && claim.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.');
    if !claim_ok || !mount_path.starts_with('/') || sub_path.as_deref().is_some_and(|s| s.split('/').any(|p| p == ".."))
    {
        return Err(bad());
    }
    Ok(PvcMount { claim: claim.to_string(), sub_path, mount_path: mount_path.to_string(), read_only })
}

impl FromStr for PvcMount {
    type Err = FormatError;

    fn from_str(text: &str) -> Result<Self, FormatError> {
        parse_pvc_mount(text)
    }
}

/// Parses one `key=value` pair (labels, node selectors, environment variables); both sides
/// are trimmed and the key must not be empty.
pub fn key_value(pair: &str) -> Result<(String, String), FormatError> {
    pair.split_once('=')
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| FormatError::new(pair, "key=value"))
}

/// `k=v,k2=v2` as admins write it (labels, annotations, node selectors, environment), in
/// order; a key may repeat (an allow-list may allow several values of one key).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pairs(pub Vec<(String, String)>);

impl Pairs {
    /// As a map (a later key wins).
    pub fn to_map(&self) -> BTreeMap<String, String> {
        self.0.iter().cloned().collect()
    }
}

impl FromStr for Pairs {
    type Err = FormatError;

    fn from_str(text: &str) -> Result<Self, FormatError> {
        text.split(',').filter(|s| !s.trim().is_empty()).map(key_value).collect::<Result<_, _>>().map(Pairs)
    }
}

/// Extended resources and the most of each one job may ask for, `nvidia.com/gpu=2,...`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counts(pub Vec<(String, u64)>);

impl FromStr for Counts {
    type Err = FormatError;

    fn from_str(text: &str) -> Result<Self, FormatError> {
        let count = |(name, count): (String, String)| match count.parse::<u64>() {
            Ok(n) if n > 0 && name.contains('/') => Ok((name, n)),
            _ => Err(FormatError::new(
                format!("{name}={count}"),
                "an extended resource and a count, like nvidia.com/gpu=2",
            )),
        };
        text.split(',')
            .filter(|s| !s.trim().is_empty())
            .map(|p| key_value(p).and_then(count))
            .collect::<Result<_, _>>()
            .map(Counts)
    }
}

/// A comma-separated list, each entry trimmed, empty entries dropped.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct List(pub Vec<String>);

impl FromStr for List {
    type Err = std::convert::Infallible;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Ok(List(text.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_string).collect()))
    }
}

/// Comma-separated DNS prefixes of label and annotation keys (`policy_allowed_metadata_prefixes`),
/// each a DNS subdomain; the worker's own prefix and the Kubernetes domains are refused, as no
/// request may set their keys ([`crate::keys::is_reserved`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyPrefixes(pub Vec<String>);

impl FromStr for KeyPrefixes {
    type Err = FormatError;

    fn from_str(text: &str) -> Result<Self, FormatError> {
        let check = |prefix: &str| {
            let dns = prefix.len() <= 253 && prefix.split('.').all(crate::naming::is_dns_label);
            if !dns {
                Err(FormatError::new(prefix, "a DNS prefix of label and annotation keys, like example.org"))
            } else if crate::keys::is_reserved(&format!("{prefix}/x")) {
                Err(FormatError::new(prefix, "a prefix requests may use")
                    .because("its keys belong to the worker or to Kubernetes"))
            } else {
                Ok(prefix.to_string())
            }
        };
        text.split(',').map(str::trim).filter(|s| !s.is_empty()).map(check).collect::<Result<_, _>>().map(KeyPrefixes)
    }
}

/// Comma-separated PVC mounts (Galaxy's `k8s_persistent_volume_claims`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Mounts(pub Vec<PvcMount>);

impl FromStr for Mounts {
    type Err = FormatError;

    fn from_str(text: &str) -> Result<Self, FormatError> {
        text.split(',').filter(|s| !s.trim().is_empty()).map(parse_pvc_mount).collect::<Result<_, _>>().map(Mounts)
    }
}

/// A JSON list of pod-spec tolerations, as admins write `k8s_tolerations`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tolerations(pub Vec<Toleration>);

impl FromStr for Tolerations {
    type Err = FormatError;

    fn from_str(text: &str) -> Result<Self, FormatError> {
        if text.trim().is_empty() {
            return Ok(Tolerations::default());
        }
        serde_json::from_str(text)
            .map(Tolerations)
            .map_err(|e| FormatError::new(text, "a JSON list of tolerations").because(e))
    }
}

/// A toleration, as in a pod spec.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Toleration {
    /// Taint key (empty with `Exists` tolerates everything).
    #[serde(default)]
    pub key: Option<String>,
    /// `Equal` (default) or `Exists`.
    #[serde(default)]
    pub operator: Option<String>,
    /// Taint value.
    #[serde(default)]
    pub value: Option<String>,
    /// `NoSchedule`, `PreferNoSchedule` or `NoExecute`.
    #[serde(default)]
    pub effect: Option<String>,
    /// For `NoExecute`: how long the pod stays bound after the taint appears.
    #[serde(default)]
    pub toleration_seconds: Option<i64>,
}

/// `GALAXY_SLOTS`, `GALAXY_MEMORY_MB` and `GALAXY_MEMORY_MB_PER_SLOT`, as Galaxy derives them:
/// slots from the CPU limit (else request), rounded up, at least 1; memory from the memory
/// limit (else request) in MiB.
pub fn galaxy_env(cpu_millis: Option<u64>, memory_bytes: Option<u64>) -> Vec<(String, String)> {
    let slots = cpu_millis.map(|m| m.div_ceil(1000)).unwrap_or(1).max(1);
    let mut env = vec![("GALAXY_SLOTS".to_string(), slots.to_string())];
    if let Some(bytes) = memory_bytes {
        let mb = bytes / (1024 * 1024);
        env.push(("GALAXY_MEMORY_MB".into(), mb.to_string()));
        env.push(("GALAXY_MEMORY_MB_PER_SLOT".into(), (mb / slots).to_string()));
    }
    env
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn galaxy_pvc_strings() {
        assert_eq!(
            parse_pvc_mount("galaxy-data/jobs:/galaxy/jobs:r").unwrap(),
            PvcMount {
                claim: "galaxy-data".into(),
                sub_path: Some("jobs".into()),
                mount_path: "/galaxy/jobs".into(),
                read_only: true
            }
        );
        assert_eq!(parse_pvc_mount("refdata:/ref").unwrap().sub_path, None);
        assert!(!parse_pvc_mount("refdata:/ref").unwrap().read_only);
        assert_eq!("b/x:/b:r".parse::<PvcMount>().unwrap().claim, "b");
        assert_eq!("a:/a, b/x:/b:r,".parse::<Mounts>().unwrap().0.len(), 2);
        for bad in ["nomount", "a:relative", "A:/x", "a/../..:/x", "a:/x:q"] {
            assert!(parse_pvc_mount(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn pairs_and_lists() {
        let m = "disk=ssd, zone=eu,".parse::<Pairs>().unwrap().to_map();
        assert_eq!(m["disk"], "ssd");
        assert_eq!(m["zone"], "eu");
        assert!("novalue".parse::<Pairs>().is_err());
        assert!("".parse::<Pairs>().unwrap().0.is_empty());
        assert_eq!("pool=a,pool=b".parse::<Pairs>().unwrap().0.len(), 2, "an allow-list keeps both");
        assert_eq!(" a, ,b ".parse::<List>().unwrap().0, ["a", "b"]);
        assert_eq!(key_value(" a = b ").unwrap(), ("a".to_string(), "b".to_string()));
        assert!(key_value("=b").is_err());
    }

    #[test]
    fn item8_key_prefixes_are_dns_prefixes_requests_may_use() {
        let p: KeyPrefixes = " sidecar.istio.io, sim-node.k8s-job-worker ,".parse().unwrap();
        assert_eq!(p.0, ["sidecar.istio.io", "sim-node.k8s-job-worker"]);
        for bad in ["example.org/", "Example.org", "-x.org", "a..b"] {
            assert!(bad.parse::<KeyPrefixes>().is_err(), "{bad}");
        }
        for reserved in
            ["k8s-job-worker", "kubernetes.io", "container.apparmor.security.beta.kubernetes.io", "x.k8s.io"]
        {
            let err = reserved.parse::<KeyPrefixes>().unwrap_err().to_string();
            assert!(err.contains("belong to the worker or to Kubernetes"), "{reserved}: {err}");
        }
    }

    #[test]
    fn tolerations_as_json() {
        let t: Tolerations = r#"[{"key": "gpu", "operator": "Exists"}]"#.parse().unwrap();
        assert_eq!(t.0[0].key.as_deref(), Some("gpu"));
        assert!("".parse::<Tolerations>().unwrap().0.is_empty());
        let err = r#"[{"nope": 1}]"#.parse::<Tolerations>().unwrap_err();
        assert!(err.to_string().contains("a JSON list of tolerations"), "{err}");
    }

    #[test]
    fn galaxy_resource_variables() {
        let env = galaxy_env(Some(2500), Some(4 * 1024 * 1024 * 1024));
        assert_eq!(
            env,
            vec![
                ("GALAXY_SLOTS".to_string(), "3".to_string()),
                ("GALAXY_MEMORY_MB".to_string(), "4096".to_string()),
                ("GALAXY_MEMORY_MB_PER_SLOT".to_string(), "1365".to_string()),
            ]
        );
        assert_eq!(galaxy_env(None, None), vec![("GALAXY_SLOTS".to_string(), "1".to_string())]);
    }
}
