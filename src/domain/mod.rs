//! Domain logic with no Kubernetes or AMQP dependency: requests, events, naming, outcomes.

pub mod event;
pub mod naming;
pub mod outcome;
pub mod placement;
pub mod policy;
pub mod quantity;
pub mod request;
pub mod resources;

/// Why a message was refused. Each variant's text goes into the dead-letter header and the
/// `failed` event.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ValidationError {
    /// The body is larger than the configured maximum.
    #[error("message of {size} bytes exceeds the maximum of {max} bytes")]
    TooLarge {
        /// Body size.
        size: usize,
        /// Configured maximum.
        max: usize,
    },
    /// Not JSON, or JSON of the wrong shape.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// Wrong or missing schema identifier.
    #[error("unsupported schema: {0}")]
    Schema(String),
    /// The request is outside the configured policy.
    #[error("refused by {rule}: {detail}")]
    Policy {
        /// The policy setting.
        rule: &'static str,
        /// What was asked.
        detail: String,
    },
    /// A field has an invalid value.
    #[error("invalid {field}: {why}")]
    Invalid {
        /// Field name.
        field: &'static str,
        /// What is wrong with it.
        why: String,
    },
}

impl ValidationError {
    /// Shorthand for [`ValidationError::Invalid`].
    pub fn invalid(field: &'static str, why: impl Into<String>) -> Self {
        ValidationError::Invalid { field, why: why.into() }
    }

    /// Short label for metrics and headers.
    pub fn kind(&self) -> &'static str {
        match self {
            ValidationError::TooLarge { .. } => "too_large",
            ValidationError::Malformed(_) => "malformed",
            ValidationError::Schema(_) => "schema",
            ValidationError::Invalid { .. } => "invalid",
            ValidationError::Policy { .. } => "policy",
        }
    }
}
