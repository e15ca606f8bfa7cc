//! Interactive tools: the entry points a request asks for (Galaxy's `<entry_points>`), checked
//! against the policy, and the plan of what routes to them — a ClusterIP Service over the
//! job's ports and an Ingress with one rule per entry point, both named after the Job and
//! owned by it, as Galaxy 26's Kubernetes runner makes them.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{naming, ValidationError};

/// Most entry points one request may carry.
pub const MAX_ENTRY_POINTS: usize = 16;

/// What an interactive tool's request asks for besides its Job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Interactive {
    /// One per entry point Galaxy configured for the job (`interactivetool_manager`).
    pub entry_points: Vec<EntryPoint>,
    /// The Ingress's `ingressClassName` (`k8s_interactivetools_ingress_class`; must be in
    /// `policy_allowed_ingress_classes`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress_class: Option<String>,
    /// Whether the Ingress terminates TLS for every entry point's domain
    /// (`k8s_interactivetools_use_ssl`).
    #[serde(default)]
    pub tls: bool,
    /// The TLS secret of every domain (`k8s_interactivetools_tls_secret`); without it each
    /// domain's secret is the domain with every character but `[a-z0-9-]` made `-`, as
    /// Galaxy's runner names it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_secret: Option<String>,
    /// Annotations of the Ingress (`k8s_interactivetools_ingress_annotations`; each key must
    /// start with one of `policy_allowed_ingress_annotations`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// One entry point: the tool's port and where the Ingress sends to it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EntryPoint {
    /// The port the tool listens on in its container.
    pub port: u16,
    /// The host name the Ingress routes (Galaxy's `interactivetools_proxy_host`, with the
    /// entry point's subdomain when it requires a domain); must end in one of
    /// `policy_allowed_ingress_domains`.
    pub domain: String,
    /// The path prefix the Ingress routes (Galaxy's entry point path; `/` for a domain entry
    /// point).
    #[serde(default = "root")]
    pub path: String,
}

fn root() -> String {
    "/".into()
}

/// Whether `name` is a DNS subdomain name (RFC 1123, lower case, ≤ 253).
fn dns_subdomain(name: &str) -> bool {
    name.len() <= 253
        && !name.is_empty()
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// Checks the shape of what a request asks for (the policy comes later).
pub fn validate(interactive: &Interactive) -> Result<(), ValidationError> {
    let invalid = |why: String| Err(ValidationError::invalid("interactive", why));
    if interactive.entry_points.is_empty() || interactive.entry_points.len() > MAX_ENTRY_POINTS {
        return invalid(format!("1 to {MAX_ENTRY_POINTS} entry points, not {}", interactive.entry_points.len()));
    }
    for ep in &interactive.entry_points {
        if ep.port == 0 {
            return invalid("an entry point's port is 1-65535".into());
        }
        if !dns_subdomain(&ep.domain) {
            return invalid(format!("domain {:?} is not a lower-case DNS name", ep.domain));
        }
        let bad = |c: char| c.is_whitespace() || c.is_control() || c == '?' || c == '#';
        if !ep.path.starts_with('/') || ep.path.chars().any(bad) || ep.path.split('/').any(|p| p == "..") {
            return invalid(format!("path {:?} is not an absolute URL path without a query", ep.path));
        }
    }
    for name in interactive.ingress_class.iter().chain(&interactive.tls_secret) {
        if !dns_subdomain(name) {
            return invalid(format!("{name:?} is not an object name"));
        }
    }
    for key in interactive.annotations.keys() {
        naming::check_label_key(key).map_err(|why| ValidationError::invalid("interactive", why))?;
    }
    Ok(())
}

/// Whether `domain` is `suffix` or under it (`a.its.example.org` under `its.example.org`).
pub fn domain_under(domain: &str, suffix: &str) -> bool {
    let suffix = suffix.trim_start_matches('.');
    domain == suffix || domain.strip_suffix(suffix).is_some_and(|rest| rest.ends_with('.'))
}

/// The routes of one interactive Job: a Service over its ports and an Ingress with a rule per
/// entry point. Kept on the Job as an annotation, so a resubmitted Job gets them again and the
/// reporter knows to remove them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoutePlan {
    /// The ports the Service exposes (each entry point's, once, in order).
    pub ports: Vec<u16>,
    /// The Ingress's rules: host, path prefix, Service port.
    pub entry_points: Vec<EntryPoint>,
    /// `ingressClassName`, when asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress_class: Option<String>,
    /// TLS: each host with its secret.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tls: Vec<(String, String)>,
    /// The Ingress's annotations.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// The secret Galaxy's runner names for a domain when none is set.
pub fn tls_secret_for(domain: &str) -> String {
    domain.chars().map(|c| if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' { c } else { '-' }).collect()
}

/// Plans the routes of a validated, admitted request.
pub fn plan_routes(interactive: &Interactive) -> RoutePlan {
    let mut ports: Vec<u16> = Vec::new();
    for ep in &interactive.entry_points {
        if !ports.contains(&ep.port) {
            ports.push(ep.port);
        }
    }
    let mut domains: Vec<&str> = interactive.entry_points.iter().map(|ep| ep.domain.as_str()).collect();
    domains.sort_unstable();
    domains.dedup();
    let tls = if interactive.tls {
        let secret = |d: &str| interactive.tls_secret.clone().unwrap_or_else(|| tls_secret_for(d));
        domains.iter().map(|d| (d.to_string(), secret(d))).collect()
    } else {
        Vec::new()
    };
    RoutePlan {
        ports,
        entry_points: interactive.entry_points.clone(),
        ingress_class: interactive.ingress_class.clone(),
        tls,
        annotations: interactive.annotations.clone(),
    }
}

impl RoutePlan {
    /// The container's `INTERACTIVETOOL_PORT`, `_DOMAIN` and `_PATH`, of its first entry
    /// point (Galaxy's runner writes them once per entry point, so the last one wins there;
    /// a tool has one entry point in practice).
    pub fn env(&self) -> Vec<(String, String)> {
        let Some(ep) = self.entry_points.first() else { return Vec::new() };
        vec![
            ("INTERACTIVETOOL_PORT".into(), ep.port.to_string()),
            ("INTERACTIVETOOL_DOMAIN".into(), ep.domain.clone()),
            ("INTERACTIVETOOL_PATH".into(), ep.path.clone()),
        ]
    }

    /// The annotation value that keeps it on the Job.
    pub fn to_annotation(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Reads it back from the Job's annotation (`None` when absent or not one).
    pub fn from_annotation(value: &str) -> Option<RoutePlan> {
        serde_json::from_str(value).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn asked(domain: &str, path: &str) -> Interactive {
        Interactive {
            entry_points: vec![EntryPoint { port: 8888, domain: domain.into(), path: path.into() }],
            ingress_class: None,
            tls: false,
            tls_secret: None,
            annotations: BTreeMap::new(),
        }
    }

    #[test]
    fn entry_points_are_dns_names_and_absolute_paths() {
        assert!(validate(&asked("abc.its.example.org", "/interactivetool/ep/x/y/")).is_ok());
        for (domain, path) in [
            ("ABC.example.org", "/"),
            ("-a.example.org", "/"),
            ("a..example.org", "/"),
            ("a.example.org", "relative"),
            ("a.example.org", "/x?token=1"),
            ("a.example.org", "/a/../b"),
            ("a.example.org", "/a b"),
        ] {
            assert!(validate(&asked(domain, path)).is_err(), "{domain} {path}");
        }
        let mut none = asked("a.example.org", "/");
        none.entry_points.clear();
        assert!(validate(&none).is_err());
        let mut port0 = asked("a.example.org", "/");
        port0.entry_points[0].port = 0;
        assert!(validate(&port0).is_err());
    }

    #[test]
    fn domains_are_under_a_suffix_by_whole_labels() {
        assert!(domain_under("x.its.example.org", "its.example.org"));
        assert!(domain_under("its.example.org", ".its.example.org"));
        assert!(!domain_under("evil-its.example.org", "its.example.org"));
        assert!(!domain_under("its.example.org.evil.com", "its.example.org"));
    }

    #[test]
    fn routes_follow_galaxys_runner() {
        let mut i = asked("a.its.example.org", "/");
        i.entry_points.push(EntryPoint { port: 8888, domain: "its.example.org".into(), path: "/ep/2/".into() });
        i.entry_points.push(EntryPoint { port: 9000, domain: "a.its.example.org".into(), path: "/api".into() });
        i.tls = true;
        let plan = plan_routes(&i);
        assert_eq!(plan.ports, vec![8888, 9000]);
        assert_eq!(
            plan.tls,
            vec![
                ("a.its.example.org".into(), "a-its-example-org".into()),
                ("its.example.org".into(), "its-example-org".into())
            ]
        );
        i.tls_secret = Some("wildcard".into());
        assert!(plan_routes(&i).tls.iter().all(|(_, s)| s == "wildcard"));
        assert_eq!(plan.env()[0], ("INTERACTIVETOOL_PORT".into(), "8888".into()));
        assert_eq!(RoutePlan::from_annotation(&plan.to_annotation()), Some(plan));
    }
}
