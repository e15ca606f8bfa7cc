//! Kubernetes names derived from Galaxy ids: Job names, container names, label checks.

use sha2::{Digest, Sha256};

use crate::{
    keys::{LABEL_INSTANCE, LABEL_RECORD, MANAGED_BY},
    ownership::Owner,
    FormatError,
};

/// Longest Kubernetes name that is also a valid label value (Job names become `app=` labels).
pub const MAX_NAME: usize = 63;

/// Whether `s` is a DNS-1123 label: 1-63 of `[a-z0-9-]`, not starting or ending with `-`.
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_NAME
        && s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// Hex SHA-256 of `data`, shortened to `len` characters.
pub fn short_hash(data: &[u8], len: usize) -> String {
    let digest = Sha256::digest(data);
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    hex[..len.min(hex.len())].to_string()
}

/// What stands for the instance in the reporter Lease's name and the events' routing keys
/// when no instance id is configured; reserved, so no instance id can be it.
pub const NO_INSTANCE: &str = "default";

/// The runner's rule for instance ids and prefixes: `(?!-)[a-z\d-]{1,20}(?<!-)`.
fn short_dns_id(id: &str) -> Result<String, FormatError> {
    let ok = (1..=20).contains(&id.len())
        && id.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !id.starts_with('-')
        && !id.ends_with('-');
    ok.then(|| id.to_string()).ok_or_else(|| {
        FormatError::new(id, "1 to 20 lowercase letters, digits or '-', not starting or ending with '-'")
    })
}

/// Checks the runner's instance id rule, `(?!-)[a-z\d-]{1,20}(?<!-)`, and returns the id.
/// [`NO_INSTANCE`] is refused: a worker without an instance id already uses it for its
/// reporter Lease and its events' routing keys, which an instance of that name would share.
pub fn instance_id(id: &str) -> Result<String, FormatError> {
    let id = short_dns_id(id)?;
    if id == NO_INSTANCE {
        return Err(FormatError::new(id, "an instance id: `default` is reserved").because(
            "a worker without an instance id names its reporter Lease <prefix>-default-reporter \
             and routes its events as default.<state>; an instance named default would share both",
        ));
    }
    Ok(id)
}

/// Checks a Job name prefix (1-20 of `[a-z0-9]`) and returns it. No `-`: the first `-` of a
/// name ends its prefix, so no two configurations name a Job alike (`galaxy-main` without an
/// instance id and `galaxy` with instance `main` would both name job 42 `galaxy-main-42`,
/// and their reporter Leases alike).
pub fn name_prefix(prefix: &str) -> Result<String, FormatError> {
    let prefix = short_dns_id(prefix)?;
    if prefix.contains('-') {
        return Err(FormatError::new(prefix, "a prefix without '-'").because(
            "the first '-' of a Job name ends its prefix: with one inside, two configurations could \
             name different jobs alike (galaxy-main + job 42 = galaxy + instance main + job 42)",
        ));
    }
    Ok(prefix)
}

/// How the Jobs of one worker configuration are named and found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Naming {
    /// First part of every Job name (`galaxy`).
    pub prefix: String,
    /// The Galaxy instance id, when configured.
    pub instance_id: Option<String>,
}

impl Naming {
    /// The Job name of a request.
    pub fn job_name(&self, job_id: &str, attempt: Option<u32>) -> String {
        job_name(&self.prefix, self.instance_id.as_deref(), job_id, attempt)
    }

    /// The identity the Jobs of a request (or a cancel's tombstone) carry.
    pub fn owner(&self, job_id: &str, attempt: Option<u32>) -> Owner {
        Owner { instance_id: self.instance_id.clone(), job_id: job_id.to_string(), attempt }
    }

    /// The label selector of every Job and pod of this instance, records of finished Jobs
    /// left out.
    pub fn selector(&self) -> String {
        format!("{},!{LABEL_RECORD}", self.instance_selector())
    }

    /// The label selector of this instance's records of finished Jobs.
    pub fn records_selector(&self) -> String {
        format!("{},{LABEL_RECORD}", self.instance_selector())
    }

    /// The label selector of every Job and pod of this instance, records included.
    pub fn instance_selector(&self) -> String {
        let (k, v) = MANAGED_BY;
        match &self.instance_id {
            Some(id) => format!("{k}={v},{LABEL_INSTANCE}={id}"),
            None => format!("{k}={v},!{LABEL_INSTANCE}"),
        }
    }

    /// The name of the Lease whose holder reports this instance's outcomes.
    pub fn lease_name(&self) -> String {
        format!("{}-{}-reporter", self.prefix, self.routing_instance())
    }

    /// The first part of every event's routing key: the instance id, or [`NO_INSTANCE`].
    pub fn routing_instance(&self) -> &str {
        self.instance_id.as_deref().unwrap_or(NO_INSTANCE)
    }
}

/// A name as one word of an AMQP topic routing key: `%`, `.`, `*` and `#` written `%25`,
/// `%2E`, `%2A`, `%23`, so a handler named `main.1` is one word and matches no pattern meant
/// for another (`<instance>.<handler>.*`). The Galaxy plugin writes it the same way.
pub fn routing_word(name: &str) -> String {
    let mut word = String::with_capacity(name.len());
    for c in name.chars() {
        match c {
            '%' => word.push_str("%25"),
            '.' => word.push_str("%2E"),
            '*' => word.push_str("%2A"),
            '#' => word.push_str("%23"),
            c => word.push(c),
        }
    }
    word
}

/// The Job name of a request: a DNS-1123 label of at most 63 characters, different for
/// every different (instance id or none, job id, attempt or none) under one prefix.
///
/// It has one of three forms, told apart by its last `-`-separated segment:
/// - **plain**, `<prefix>[-<instance>]-<job id>`, for a job id of decimal digits (Galaxy's)
///   without an attempt: the runner's name, so Jobs made before an upgrade are still adopted.
///   Last segment: digits.
/// - **attempt**, `<prefix>[-<instance>]-<job id>-a<attempt>`, for a decimal job id with an
///   attempt. Last segment: `a` and digits.
/// - **hashed**, `<readable head>-z<hash>`, for every other id, and for a plain or attempt
///   name longer than 63 characters. Last segment: `z` and 16 hex digits of SHA-256 over the
///   JSON array `[prefix, instance or null, job id, attempt or null]`; the head (the
///   sanitised ids, shortened) is only for people.
///
/// Why two different triples never share a name: digits, `a`+digits and `z`+hex never equal
/// each other, so the last segment says which form a name has. A plain or attempt name reads
/// back to one triple: its job id and attempt are the last one or two segments (they hold no
/// `-`), and what is left after the fixed prefix is either nothing (no instance id) or
/// `-<instance>`. Hashed names differ whenever the serialised triples do, which they do for any
/// two different triples (JSON strings are quoted and escaped, `null` is not a string), short
/// of a 64-bit SHA-256 collision.
pub fn job_name(prefix: &str, instance_id: Option<&str>, job_id: &str, attempt: Option<u32>) -> String {
    let mut readable = String::from(prefix);
    if let Some(instance) = instance_id {
        readable.push('-');
        readable.push_str(instance);
    }
    readable.push('-');
    readable.push_str(job_id);
    if let Some(attempt) = attempt {
        readable.push_str(&format!("-a{attempt}"));
    }
    let decimal = !job_id.is_empty() && job_id.bytes().all(|b| b.is_ascii_digit());
    if decimal && readable.len() <= MAX_NAME {
        return readable;
    }
    let triple = serde_json::json!([prefix, instance_id, job_id, attempt]).to_string();
    let hash = short_hash(triple.as_bytes(), 16);
    let clean = sanitise(&readable);
    let keep = MAX_NAME - hash.len() - 2;
    let head = clean[..clean.len().min(keep)].trim_end_matches('-');
    format!("{head}-z{hash}")
}

/// Lowercase, with every character outside `[a-z0-9-]` replaced by `-`, trimmed of edge dashes.
fn sanitise(raw: &str) -> String {
    let s: String = raw
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_lowercase() || c.is_ascii_digit() {
                c
            } else {
                '-'
            }
        })
        .collect();
    s.trim_matches('-').to_string()
}

/// The container name, from the destination id as the runner cleaned it
/// (`[^-a-z0-9]` → `-`, wrapped in `x…x` when it starts or ends with `-`); `job-container`
/// without a destination id.
pub fn container_name(destination_id: Option<&str>) -> String {
    let Some(raw) = destination_id.filter(|d| !d.is_empty()) else {
        return "job-container".into();
    };
    let cleaned: String =
        raw.chars().map(|c| if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' { c } else { '-' }).collect();
    let cleaned = if cleaned.starts_with('-') || cleaned.ends_with('-') { format!("x{cleaned}x") } else { cleaned };
    if cleaned.len() <= MAX_NAME {
        cleaned
    } else {
        format!("{}-{}", &cleaned[..MAX_NAME - 11], short_hash(raw.as_bytes(), 10))
    }
}

/// A label value derived from free text (a Galaxy job id), valid and unique.
pub fn label_value(text: &str) -> String {
    let valid = text.len() <= MAX_NAME
        && text.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && text.starts_with(|c: char| c.is_ascii_alphanumeric())
        && text.ends_with(|c: char| c.is_ascii_alphanumeric());
    if valid || text.is_empty() {
        return text.to_string();
    }
    let clean: String = text
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') { c } else { '-' })
        .take(MAX_NAME - 11)
        .collect();
    let clean = clean.trim_matches(|c: char| !c.is_ascii_alphanumeric());
    format!("{clean}-{}", short_hash(text.as_bytes(), 10)).trim_start_matches('-').to_string()
}

/// Checks a label key: optional DNS prefix + `/` + a name of at most 63 characters.
pub fn check_label_key(key: &str) -> Result<(), FormatError> {
    let (prefix, name) = key.rsplit_once('/').unwrap_or(("", key));
    let name_ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric());
    let prefix_ok = prefix.len() <= 253
        && prefix.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '.'));
    if name_ok && prefix_ok && !(key.contains('/') && prefix.is_empty()) {
        Ok(())
    } else {
        Err(FormatError::new(key, "a valid label or annotation key"))
    }
}

/// Checks a label key and value.
pub fn check_label(key: &str, value: &str) -> Result<(), FormatError> {
    check_label_key(key)?;
    if label_value(value) == value {
        Ok(())
    } else {
        Err(FormatError::new(value, "a valid label value"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_names_follow_the_runner() {
        assert_eq!(job_name("galaxy", Some("main"), "42", None), "galaxy-main-42");
        assert_eq!(job_name("galaxy", Some("main"), "42", Some(2)), "galaxy-main-42-a2");
        assert_eq!(job_name("galaxy", None, "42", None), "galaxy-42");
    }

    #[test]
    fn long_or_odd_ids_are_shortened_not_rejected() {
        let long = "9".repeat(200);
        let a = job_name("galaxy", Some("main"), &long, None);
        assert!(is_dns_label(&a), "{a}");
        let odd = job_name("galaxy", Some("main"), "Job_ID.With/Odd:Chars", None);
        assert!(is_dns_label(&odd), "{odd}");
        // Two ids that sanitise alike still get different names.
        assert_ne!(job_name("g", None, "a_b", None), job_name("g", None, "a.b", None));
        assert_ne!(a, job_name("galaxy", Some("main"), &"9".repeat(201), None));
    }

    #[test]
    fn instance_id_rule() {
        assert!(instance_id("main").is_ok());
        assert!(instance_id("usegalaxy-eu-1").is_ok());
        for bad in ["", "-a", "a-", "UPPER", "a_b", &"a".repeat(21)] {
            assert!(instance_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn selectors_and_leases_separate_instances() {
        let eu = Naming { prefix: "galaxy".into(), instance_id: Some("eu".into()) };
        assert_eq!(
            eu.selector(),
            "app.kubernetes.io/managed-by=k8s-job-worker,k8s-job-worker/instance-id=eu,!k8s-job-worker/record"
        );
        assert!(eu.records_selector().ends_with("instance-id=eu,k8s-job-worker/record"));
        assert_eq!(eu.lease_name(), "galaxy-eu-reporter");
        let none = Naming { prefix: "galaxy".into(), instance_id: None };
        assert!(none.selector().ends_with(",!k8s-job-worker/instance-id,!k8s-job-worker/record"));
        assert_eq!(none.job_name("42", Some(2)), "galaxy-42-a2");
    }

    #[test]
    fn container_names() {
        assert_eq!(container_name(Some("k8s_default")), "k8s-default");
        assert_eq!(container_name(Some("_x")), "x-xx");
        assert_eq!(container_name(None), "job-container");
        assert!(container_name(Some(&"a".repeat(100))).len() <= 63);
    }

    #[test]
    fn label_values() {
        assert_eq!(label_value("42"), "42");
        let v = label_value("weird id/with spaces");
        assert!(check_label("k", &v).is_ok(), "{v}");
        assert!(check_label_key("example.org/team").is_ok());
        assert!(check_label_key("/x").is_err());
        assert!(check_label("k", "bad value").is_err());
    }

    #[test]
    fn item7_the_reviewed_collisions_get_distinct_names() {
        let n = |instance: Option<&str>, job_id: &str, attempt| job_name("galaxy", instance, job_id, attempt);
        assert_ne!(n(Some("main"), "42", Some(1)), n(Some("main"), "42-1", None), "attempt vs dashed id");
        assert_ne!(n(Some("main"), "2-7", None), n(Some("main-2"), "7", None), "instance vs job id");
        assert_ne!(n(None, "main-42", None), n(Some("main"), "42", None), "no instance vs an instance");
        let hashed = n(Some("main"), "Foo", None);
        let tail = hashed.strip_prefix("galaxy-main-").unwrap();
        assert_ne!(hashed, n(Some("main"), tail, None), "a hashed name vs the id that spells it");
    }

    #[test]
    fn item7_a_prefix_with_a_dash_is_refused_so_prefixes_and_instances_never_mix() {
        // Both would name job 42 `galaxy-main-42`, and both Leases `galaxy-main-default-reporter`...
        let a = Naming { prefix: "galaxy-main".into(), instance_id: None };
        let b = Naming { prefix: "galaxy".into(), instance_id: Some("main".into()) };
        assert_eq!(a.job_name("42", None), b.job_name("42", None), "the collision the review found");
        let err = name_prefix("galaxy-main").unwrap_err().to_string();
        assert!(err.contains("without '-'"), "{err}");
        assert!(name_prefix("galaxy").is_ok() && name_prefix("g2").is_ok());
    }

    #[test]
    fn a_handler_is_one_routing_word_however_it_is_named() {
        assert_eq!(routing_word("main"), "main");
        assert_eq!(routing_word("main.job-handlers.1"), "main%2Ejob-handlers%2E1");
        assert_eq!(routing_word("a%2Eb"), "a%252Eb", "never the same as a.b");
        assert_eq!(routing_word("*#"), "%2A%23", "no wildcard");
    }

    #[test]
    fn item7_default_is_not_an_instance_id() {
        let err = instance_id("default").unwrap_err().to_string();
        assert!(err.contains("reserved"), "{err}");
        assert!(name_prefix("default").is_ok(), "only the instance id is reserved");
    }

    mod item7_injective {
        use super::*;
        use proptest::prelude::*;

        const PREFIX: &str = "galaxy";

        /// (instance id, job id, attempt).
        type Triple = (Option<String>, String, Option<u32>);

        fn name(t: &Triple) -> String {
            job_name(PREFIX, t.0.as_deref(), &t.1, t.2)
        }

        /// Ids from small alphabets, so that dashes, digits and letters meet often.
        fn triple() -> impl Strategy<Value = Triple> {
            (
                prop::option::of("[a-z0-9]{1,3}(-[a-z0-9]{1,3}){0,2}"),
                prop_oneof![
                    3 => "[0-9]{1,4}",
                    3 => "[0-9]{1,3}(-a?[0-9]{1,2}){0,2}",
                    2 => "[0-9a-zA-Z_-]{1,8}",
                    1 => "[0-9]{60,70}",
                    1 => ".{1,12}",
                ],
                prop::option::of(0u32..4),
            )
        }

        /// Every triple another reading of `name` could come from: each split of it into an
        /// instance and a job id, each with its last segment read as an attempt or not.
        fn readings(name: &str) -> Vec<Triple> {
            let rest = name.strip_prefix(&format!("{PREFIX}-")).unwrap_or(name);
            let mut instances: Vec<(Option<String>, &str)> = vec![(None, rest)];
            for (i, _) in rest.match_indices('-') {
                if instance_id(&rest[..i]).is_ok() {
                    instances.push((Some(rest[..i].to_string()), &rest[i + 1..]));
                }
            }
            let mut out = Vec::new();
            for (instance, job) in instances {
                out.push((instance.clone(), job.to_string(), None));
                if let Some((head, last)) = job.rsplit_once('-') {
                    let last = last.strip_prefix('a').unwrap_or(last);
                    if let Ok(attempt) = last.parse() {
                        out.push((instance.clone(), head.to_string(), Some(attempt)));
                    }
                }
            }
            out
        }

        proptest! {
            #[test]
            fn different_triples_never_share_a_name(a in triple(), b in triple()) {
                let (na, nb) = (name(&a), name(&b));
                prop_assert!(is_dns_label(&na), "{:?}", na);
                prop_assert!(a == b || na != nb, "{:?} and {:?} are both {:?}", a, b, na);
            }

            #[test]
            fn no_other_reading_of_a_name_gives_it(a in triple()) {
                let na = name(&a);
                for b in readings(&na).into_iter().filter(|b| *b != a) {
                    prop_assert_ne!(&name(&b), &na, "{:?} and {:?}", a, b);
                }
            }
        }
    }
}
