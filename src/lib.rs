//! k8s-job-worker: runs Galaxy jobs as Kubernetes Jobs, driven by RabbitMQ.

pub mod amqp;
pub mod config;
pub mod context;
pub mod control;
pub mod domain;
pub mod error;
pub mod http;
pub mod k8s;
pub mod leader;
pub mod observe;
pub mod run;
pub mod schema;
pub mod shutdown;
pub mod submit;
pub mod tracker;
