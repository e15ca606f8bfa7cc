//! Domain logic with no Kubernetes or AMQP dependency and no I/O: the message contract,
//! naming, the Job plan, outcome classification and the decisions taken on an outcome.
//!
//! # Layout
//! - [`request`]: job requests and cancel/status messages, parsed and validated.
//! - [`job`]: the worker's defaults for every job, and the plan of one Job built from a request.
//! - [`record`]: tombstones and records of outcomes, the Jobs without pods that only remember.
//! - [`policy`]: what a request may ask for.
//! - [`interactive`]: interactive tools' entry points and the Service and Ingress routing to them.
//! - [`intent`]: the worker's own resubmission intents, and how one is judged.
//! - [`naming`]: Job names, label values, instance ids.
//! - [`keys`]: the labels and annotations the worker writes and reads.
//! - [`placement`], [`resources`], [`quantity`]: values as Galaxy admins write them.
//! - [`outcome`]: what a Job and its pods mean for Galaxy.
//! - [`ownership`]: whether a Job with a job's name is that job's.
//! - [`decision`]: what the worker does about an outcome (stop, resubmit, report, clean up).
//! - [`state`]: the states a job is reported in.
//! - [`event`]: the result events.

pub mod decision;
pub mod event;
pub mod intent;
pub mod interactive;
pub mod job;
pub mod keys;
pub mod naming;
pub mod outcome;
pub mod ownership;
pub mod placement;
pub mod policy;
pub mod quantity;
pub mod record;
pub mod request;
pub mod resources;
pub mod state;

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
    /// The request's Job name is taken by a Job that is not this job's.
    #[error(transparent)]
    NameTaken(#[from] ownership::ForeignJob),
    /// A field has an invalid value.
    #[error("invalid {field}: {why}")]
    Invalid {
        /// Field name.
        field: &'static str,
        /// What is wrong with it.
        why: String,
    },
}

/// A value (a setting or a field) that does not have the form it must have.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{value:?} is not {expected}{detail}")]
pub struct FormatError {
    /// The value as written.
    pub value: String,
    /// The form it must have.
    pub expected: &'static str,
    /// More about what is wrong (empty, or starting with `: `).
    pub detail: String,
}

impl FormatError {
    /// `value` is not `expected`.
    pub fn new(value: impl Into<String>, expected: &'static str) -> Self {
        FormatError { value: value.into(), expected, detail: String::new() }
    }

    /// Adds the underlying reason.
    pub fn because(mut self, why: impl std::fmt::Display) -> Self {
        self.detail = format!(": {why}");
        self
    }
}

impl ValidationError {
    /// Shorthand for [`ValidationError::Invalid`].
    pub fn invalid(field: &'static str, why: impl std::fmt::Display) -> Self {
        ValidationError::Invalid { field, why: why.to_string() }
    }

    /// Short label for metrics and headers.
    pub fn kind(&self) -> &'static str {
        match self {
            ValidationError::TooLarge { .. } => "too_large",
            ValidationError::Malformed(_) => "malformed",
            ValidationError::Schema(_) => "schema",
            ValidationError::Invalid { .. } => "invalid",
            ValidationError::Policy { .. } => "policy",
            ValidationError::NameTaken(_) => "name_taken",
        }
    }
}
