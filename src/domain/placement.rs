//! Placement and identity values as admins write them: `k=v,k2=v2` maps, Galaxy's
//! `pvc/subpath:/mount[:r]` volume strings, and the `GALAXY_*` resource variables.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

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
pub fn parse_pvc_mount(text: &str) -> Result<PvcMount, String> {
    let bad = || format!("{text:?} is not `claim[/subpath]:/mount/path[:r]`");
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

/// Parses a comma-separated list of PVC mounts (Galaxy's `k8s_persistent_volume_claims`).
pub fn parse_pvc_mounts(text: &str) -> Result<Vec<PvcMount>, String> {
    text.split(',').filter(|s| !s.trim().is_empty()).map(parse_pvc_mount).collect()
}

/// Parses `k=v,k2=v2` (labels, node selectors, environment variables).
pub fn parse_pairs(text: &str) -> Result<BTreeMap<String, String>, String> {
    text.split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|pair| {
            pair.split_once('=')
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                .filter(|(k, _)| !k.is_empty())
                .ok_or_else(|| format!("{pair:?} is not key=value"))
        })
        .collect()
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
        assert_eq!(parse_pvc_mounts("a:/a, b/x:/b:r").unwrap().len(), 2);
        for bad in ["nomount", "a:relative", "A:/x", "a/../..:/x", "a:/x:q"] {
            assert!(parse_pvc_mount(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn pairs() {
        let m = parse_pairs("disk=ssd, zone=eu").unwrap();
        assert_eq!(m["disk"], "ssd");
        assert_eq!(m["zone"], "eu");
        assert!(parse_pairs("novalue").is_err());
        assert!(parse_pairs("").unwrap().is_empty());
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
