//! The worker's error type; each variant has a short label for metrics.

use crate::domain::ValidationError;

/// Everything that can go wrong while handling a message or a Job.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The message was refused; it is dead-lettered, never retried.
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    /// A Kubernetes API call failed.
    #[error("kubernetes {verb} failed: {source}")]
    Kube {
        /// What was attempted (`create`, `get`, `delete`, ...).
        verb: &'static str,
        /// The client error.
        #[source]
        source: kube::Error,
    },
    /// An untrusted or outdated Job did not disappear in time.
    #[error("job {name} was not deleted within {seconds} s (k8s_timeout_seconds_job_deletion)")]
    DeletionTimeout {
        /// Job name.
        name: String,
        /// The configured timeout.
        seconds: u64,
    },
    /// The Job kept reappearing while being replaced (another writer races with us).
    #[error("job {0} kept reappearing while being replaced")]
    JobConflict(String),
    /// An AMQP operation failed.
    #[error("amqp: {0}")]
    Amqp(#[from] lapin::Error),
    /// The broker refused (nacked) a published message.
    #[error("the broker nacked the message published to {0}")]
    Nacked(String),
    /// The broker returned a mandatory message: nothing is bound to receive it.
    #[error("message to exchange {exchange:?} with routing key {routing_key:?} was unroutable (returned)")]
    Unroutable {
        /// Exchange.
        exchange: String,
        /// Routing key.
        routing_key: String,
    },
    /// No publisher confirm arrived in time.
    #[error("no publisher confirm within {0} s")]
    ConfirmTimeout(u64),
    /// The broker connection is down.
    #[error("not connected to the broker")]
    NotConnected,
    /// Encoding a message failed.
    #[error("serialising a message: {0}")]
    Serde(#[from] serde_json::Error),
}

impl Error {
    /// Short label for the `error` metric label.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Invalid(e) => e.kind(),
            Error::Kube { .. } => "kube",
            Error::DeletionTimeout { .. } => "deletion_timeout",
            Error::JobConflict(_) => "job_conflict",
            Error::Amqp(_) => "amqp",
            Error::Nacked(_) => "nacked",
            Error::Unroutable { .. } => "unroutable",
            Error::ConfirmTimeout(_) => "confirm_timeout",
            Error::NotConnected => "not_connected",
            Error::Serde(_) => "serde",
        }
    }

    /// Wraps a Kubernetes error with the verb that failed.
    pub fn kube(verb: &'static str) -> impl FnOnce(kube::Error) -> Error {
        move |source| Error::Kube { verb, source }
    }
}

/// Result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;
