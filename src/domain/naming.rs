//! Kubernetes names derived from Galaxy ids: Job names, container names, label checks.

use sha2::{Digest, Sha256};

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

/// Checks the runner's instance id rule: `(?!-)[a-z\d-]{1,20}(?<!-)`.
pub fn check_instance_id(id: &str) -> Result<(), String> {
    let ok = (1..=20).contains(&id.len())
        && id.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !id.starts_with('-')
        && !id.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "k8s_galaxy_instance_id {id:?} is invalid: use 1 to 20 lowercase letters, digits or '-', \
             not starting or ending with '-'"
        ))
    }
}

/// The Job name: `<prefix>-<instance id>-<job id>[-<attempt>]`, a DNS-1123 label of at most
/// 63 characters. Unusual or long ids are sanitised and shortened with a hash suffix, so two
/// different ids never share a name.
pub fn job_name(prefix: &str, instance_id: Option<&str>, job_id: &str, attempt: Option<u32>) -> String {
    let mut raw = String::from(prefix);
    if let Some(instance) = instance_id {
        raw.push('-');
        raw.push_str(instance);
    }
    raw.push('-');
    raw.push_str(job_id);
    if let Some(attempt) = attempt {
        raw.push('-');
        raw.push_str(&attempt.to_string());
    }
    let clean = sanitise(&raw);
    if clean == raw && raw.len() <= MAX_NAME {
        return raw;
    }
    let hash = short_hash(raw.as_bytes(), 10);
    let keep = MAX_NAME - hash.len() - 1;
    let head = clean[..clean.len().min(keep)].trim_end_matches('-');
    format!("{head}-{hash}")
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
pub fn check_label_key(key: &str) -> Result<(), String> {
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
        Err(format!("{key:?} is not a valid label or annotation key"))
    }
}

/// Checks a label key and value.
pub fn check_label(key: &str, value: &str) -> Result<(), String> {
    check_label_key(key)?;
    if label_value(value) == value {
        Ok(())
    } else {
        Err(format!("label {key:?} has an invalid value {value:?}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_names_follow_the_runner() {
        assert_eq!(job_name("galaxy", Some("main"), "42", None), "galaxy-main-42");
        assert_eq!(job_name("galaxy", Some("main"), "42", Some(2)), "galaxy-main-42-2");
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
        assert!(check_instance_id("main").is_ok());
        assert!(check_instance_id("usegalaxy-eu-1").is_ok());
        for bad in ["", "-a", "a-", "UPPER", "a_b", &"a".repeat(21)] {
            assert!(check_instance_id(bad).is_err(), "{bad:?}");
        }
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
}
