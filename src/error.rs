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
    /// The worker is shutting down: the work is left for a replica (or this one, restarted).
    #[error("shutting down")]
    ShuttingDown,
    /// This replica has not read the reporting Lease yet, whose uid seals the intents.
    #[error("the reporting Lease (whose uid seals intents) was not read yet")]
    NoSealingKey,
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
            Error::ShuttingDown => "shutting_down",
            Error::NoSealingKey => "no_sealing_key",
            Error::Serde(_) => "serde",
        }
    }

    /// Whether the message this error came from must be refused (dead-lettered with the
    /// reason), never retried: it is wrong, or it cannot work out.
    pub fn is_refusal(&self) -> bool {
        match self {
            Error::Invalid(_) | Error::DeletionTimeout { .. } => true,
            // The apiserver refused what the message asked for as it is: asking again cannot help.
            Error::Kube { source: kube::Error::Api(status), .. } => matches!(status.code, 400 | 413 | 422),
            _ => false,
        }
    }

    /// Whether the apiserver could not be reached or could not serve (not the message's
    /// fault: it is held until the apiserver is back).
    pub fn is_unavailable(&self) -> bool {
        match self {
            Error::Kube { source, .. } => match source {
                kube::Error::Api(status) => status.code == 429 || status.code >= 500,
                kube::Error::HyperError(_) | kube::Error::Service(_) | kube::Error::HttpError(_) => true,
                _ => false,
            },
            _ => false,
        }
    }

    /// Wraps a Kubernetes error with the verb that failed.
    pub fn kube(verb: &'static str) -> impl FnOnce(kube::Error) -> Error {
        move |source| Error::Kube { verb, source }
    }
}

/// Result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    fn api(code: u16) -> Error {
        let status = kube::core::Status { code, message: "m".into(), ..kube::core::Status::default() };
        Error::Kube { verb: "patch", source: kube::Error::Api(Box::new(status)) }
    }

    #[test]
    fn item6_what_the_apiserver_refuses_is_refused_not_retried() {
        assert!(api(422).is_refusal() && api(400).is_refusal() && api(413).is_refusal());
        assert!(!api(404).is_refusal() && !api(409).is_refusal() && !api(500).is_refusal());
    }

    #[test]
    fn item2_an_unreachable_apiserver_is_not_the_messages_fault() {
        assert!(api(503).is_unavailable() && api(429).is_unavailable());
        assert!(!api(422).is_unavailable() && !Error::NotConnected.is_unavailable());
    }
}
