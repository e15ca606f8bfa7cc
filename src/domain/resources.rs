//! The runner's resource value transforms (`requests_cpu`, `limits_memory`, ...).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::quantity;

/// A resource value as Galaxy admins write it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum ResourceValue {
    /// Whole CPUs, or gigabytes of memory.
    Integer(u64),
    /// Fractional CPUs (→ millicores) or gigabytes (→ megabytes).
    Float(f64),
    /// A Kubernetes quantity, passed through unchanged.
    Text(String),
}

/// Which resource a value is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resource {
    /// CPU.
    Cpu,
    /// Memory.
    Memory,
}

impl ResourceValue {
    /// The Kubernetes quantity, or `None` when the value means "unset" (0 or empty).
    /// Integer n: `n` CPUs / `nG`; float x: `(1000·x)m` / `(1000·x)M`; a string passes through.
    pub fn quantity(&self, resource: Resource) -> Result<Option<String>, String> {
        match self {
            ResourceValue::Integer(0) => Ok(None),
            ResourceValue::Integer(n) => Ok(Some(match resource {
                Resource::Cpu => n.to_string(),
                Resource::Memory => format!("{n}G"),
            })),
            ResourceValue::Float(x) if *x == 0.0 => Ok(None),
            ResourceValue::Float(x) if !x.is_finite() || *x < 0.0 => Err(format!("{x} is not a positive number")),
            ResourceValue::Float(x) => {
                let thousandths = (x * 1000.0).round() as u64;
                if thousandths == 0 {
                    return Err(format!("{x} is below the smallest unit (0.001)"));
                }
                Ok(Some(match resource {
                    Resource::Cpu => format!("{thousandths}m"),
                    Resource::Memory => format!("{thousandths}M"),
                }))
            }
            ResourceValue::Text(s) if s.trim().is_empty() || s.trim() == "0" => Ok(None),
            ResourceValue::Text(s) => {
                let valid = match resource {
                    Resource::Cpu => quantity::cpu_millis(s).is_some(),
                    Resource::Memory => quantity::memory_bytes(s).is_some(),
                };
                if valid {
                    Ok(Some(s.trim().to_string()))
                } else {
                    Err(format!("{s:?} is not a Kubernetes quantity"))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(v: ResourceValue, r: Resource) -> Option<String> {
        v.quantity(r).unwrap()
    }

    #[test]
    fn runner_transforms() {
        assert_eq!(q(ResourceValue::Integer(2), Resource::Cpu).as_deref(), Some("2"));
        assert_eq!(q(ResourceValue::Integer(4), Resource::Memory).as_deref(), Some("4G"));
        assert_eq!(q(ResourceValue::Float(0.5), Resource::Cpu).as_deref(), Some("500m"));
        assert_eq!(q(ResourceValue::Float(1.5), Resource::Memory).as_deref(), Some("1500M"));
        assert_eq!(q(ResourceValue::Text("750Mi".into()), Resource::Memory).as_deref(), Some("750Mi"));
        assert_eq!(q(ResourceValue::Integer(0), Resource::Cpu), None);
        assert_eq!(q(ResourceValue::Float(0.0), Resource::Memory), None);
    }

    #[test]
    fn json_numbers_keep_their_kind() {
        let int: ResourceValue = serde_json::from_str("1").unwrap();
        let float: ResourceValue = serde_json::from_str("1.0").unwrap();
        assert_eq!(q(int, Resource::Memory).as_deref(), Some("1G"));
        assert_eq!(q(float, Resource::Memory).as_deref(), Some("1000M"));
    }

    #[test]
    fn bad_values_are_errors() {
        assert!(ResourceValue::Text("lots".into()).quantity(Resource::Cpu).is_err());
        assert!(ResourceValue::Float(-1.0).quantity(Resource::Cpu).is_err());
        assert!(ResourceValue::Float(0.0001).quantity(Resource::Cpu).is_err());
    }
}
