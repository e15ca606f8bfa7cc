//! The runner's resource value transforms (`requests_cpu`, `limits_memory`, ...).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use std::str::FromStr;

use super::quantity;
use crate::FormatError;

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
    pub fn quantity(&self, resource: Resource) -> Result<Option<String>, FormatError> {
        match self {
            ResourceValue::Integer(0) => Ok(None),
            ResourceValue::Integer(n) => Ok(Some(match resource {
                Resource::Cpu => n.to_string(),
                Resource::Memory => format!("{n}G"),
            })),
            ResourceValue::Float(x) if *x == 0.0 => Ok(None),
            ResourceValue::Float(x) if !x.is_finite() || *x < 0.0 => {
                Err(FormatError::new(x.to_string(), "a positive number"))
            }
            ResourceValue::Float(x) => {
                let thousandths = (x * 1000.0).round() as u64;
                if thousandths == 0 {
                    return Err(FormatError::new(x.to_string(), "at least the smallest unit (0.001)"));
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
                    Err(FormatError::new(s.as_str(), "a Kubernetes quantity"))
                }
            }
        }
    }
}

impl FromStr for ResourceValue {
    type Err = std::convert::Infallible;

    /// A value written in a flag: `2` (integer), `0.5` (float) or anything else (a quantity).
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Ok(if let Ok(n) = text.parse::<u64>() {
            ResourceValue::Integer(n)
        } else if let Ok(x) = text.parse::<f64>() {
            ResourceValue::Float(x)
        } else {
            ResourceValue::Text(text.to_string())
        })
    }
}

/// A resource amount for every job as admins write it (`2`, `0.5`, `750Mi`), already turned
/// into a Kubernetes quantity by the runner's transform; `None` when it means unset (`0`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Amount(pub Option<String>);

impl Amount {
    /// Parses a CPU amount.
    pub fn cpu(text: &str) -> Result<Amount, FormatError> {
        Self::parse(text, Resource::Cpu)
    }

    /// Parses a memory amount.
    pub fn memory(text: &str) -> Result<Amount, FormatError> {
        Self::parse(text, Resource::Memory)
    }

    fn parse(text: &str, resource: Resource) -> Result<Amount, FormatError> {
        let Ok(value) = text.parse::<ResourceValue>();
        value.quantity(resource).map(Amount)
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
    fn amounts_in_flags() {
        assert_eq!(Amount::cpu("0.5").unwrap().0.as_deref(), Some("500m"));
        assert_eq!(Amount::memory("2").unwrap().0.as_deref(), Some("2G"));
        assert_eq!(Amount::memory("750Mi").unwrap().0.as_deref(), Some("750Mi"));
        assert_eq!(Amount::cpu("0").unwrap(), Amount(None));
        assert!(Amount::cpu("1Gi").is_err());
    }

    #[test]
    fn bad_values_are_errors() {
        assert!(ResourceValue::Text("lots".into()).quantity(Resource::Cpu).is_err());
        assert!(ResourceValue::Float(-1.0).quantity(Resource::Cpu).is_err());
        assert!(ResourceValue::Float(0.0001).quantity(Resource::Cpu).is_err());
    }
}
