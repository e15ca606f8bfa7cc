//! Kubernetes resource quantities ("500m", "2", "1G", "512Mi") turned into plain numbers.

/// Parses a memory quantity into bytes; `None` when it is not a valid quantity.
pub fn memory_bytes(quantity: &str) -> Option<u64> {
    let (number, suffix) = split(quantity)?;
    let factor: f64 = match suffix {
        "" => 1.0,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "Ki" => 1024.0,
        "Mi" => 1024.0 * 1024.0,
        "Gi" => 1024.0 * 1024.0 * 1024.0,
        "Ti" => 1024.0_f64.powi(4),
        "Pi" => 1024.0_f64.powi(5),
        _ => return None,
    };
    Some((number * factor).ceil() as u64)
}

/// Parses a CPU quantity into millicores; `None` when it is not a valid quantity.
pub fn cpu_millis(quantity: &str) -> Option<u64> {
    let (number, suffix) = split(quantity)?;
    let millis = match suffix {
        "" => number * 1000.0,
        "m" => number,
        _ => return None,
    };
    Some(millis.ceil() as u64)
}

/// A CPU quantity in millicores, or why it is not one (for settings).
pub fn parse_cpu_millis(quantity: &str) -> Result<u64, crate::FormatError> {
    cpu_millis(quantity).ok_or_else(|| crate::FormatError::new(quantity, "a CPU quantity (`8`, `500m`)"))
}

/// A memory quantity in bytes, or why it is not one (for settings).
pub fn parse_memory_bytes(quantity: &str) -> Result<u64, crate::FormatError> {
    memory_bytes(quantity).ok_or_else(|| crate::FormatError::new(quantity, "a memory quantity (`64G`, `512Mi`)"))
}

fn split(quantity: &str) -> Option<(f64, &str)> {
    let quantity = quantity.trim();
    let end = quantity.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(quantity.len());
    let (number, suffix) = quantity.split_at(end);
    let number: f64 = number.parse().ok()?;
    (number.is_finite() && number >= 0.0).then_some((number, suffix))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_suffixes() {
        assert_eq!(memory_bytes("1G"), Some(1_000_000_000));
        assert_eq!(memory_bytes("500M"), Some(500_000_000));
        assert_eq!(memory_bytes("1.5G"), Some(1_500_000_000));
        assert_eq!(memory_bytes("64Mi"), Some(64 * 1024 * 1024));
        assert_eq!(memory_bytes("2048"), Some(2048));
        assert_eq!(memory_bytes("1Zi"), None);
        assert_eq!(memory_bytes("abc"), None);
        assert_eq!(memory_bytes(""), None);
    }

    #[test]
    fn cpu_suffixes() {
        assert_eq!(cpu_millis("2"), Some(2000));
        assert_eq!(cpu_millis("500m"), Some(500));
        assert_eq!(cpu_millis("0.25"), Some(250));
        assert_eq!(cpu_millis("1Gi"), None);
    }
}
