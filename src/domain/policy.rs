//! The request policy: a request comes from the network, a pod spec runs code on the cluster.
//! Each rule is optional; a request outside one is refused with the rule's name.

use std::collections::BTreeMap;

use super::{placement::PvcMount, quantity};

/// The policy an admin configured.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Policy {
    /// Images must start with one of these prefixes (empty: any image).
    pub allowed_image_prefixes: Vec<String>,
    /// Largest CPU a job may ask for, in millicores.
    pub max_cpu_millis: Option<u64>,
    /// Largest memory a job may ask for, in bytes.
    pub max_memory_bytes: Option<u64>,
    /// PVCs a request may mount (empty: none beyond the worker's own).
    pub allowed_pvcs: Vec<String>,
    /// `key=value` node selectors a request may use (empty: none).
    pub allowed_node_selectors: Vec<(String, String)>,
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
            && !self.allowed_image_prefixes.iter().any(|p| asked.image.starts_with(p.as_str()))
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
        if let Some(pvc) = asked.pvcs.iter().find(|m| !self.allowed_pvcs.contains(&m.claim)) {
            return fail("policy_allowed_pvcs", format!("PVC {:?} may not be mounted by a request", pvc.claim));
        }
        for (k, v) in asked.node_selector.into_iter().flatten() {
            if !self.allowed_node_selectors.iter().any(|(ak, av)| ak == k && av == v) {
                return fail("policy_allowed_node_selectors", format!("node selector {k}={v} is not allowed"));
            }
        }
        Ok(())
    }
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
    }

    #[test]
    fn largest_of_request_and_limit() {
        assert_eq!(largest(&[Some("500m"), Some("2")], cpu), Some(2000));
        assert_eq!(largest(&[None, Some("1G")], memory), Some(1_000_000_000));
        assert_eq!(largest(&[None, None], cpu), None);
    }
}
