//! k8s-job-worker: runs Galaxy jobs as Kubernetes Jobs, driven by RabbitMQ.

pub mod domain;
