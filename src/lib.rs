//! k8s-job-worker: runs Galaxy jobs as Kubernetes Jobs, driven by RabbitMQ.
//!
//! # Layout
//!
//! A message goes one way down: `amqp::consumer` hands a delivery to `submit` or
//! `control`, shaped by `delivery`; the domain ([`domain`], a crate of its own, no I/O)
//! parses it and plans the Job; [`k8s::render`] spells the plan as a Kubernetes object and
//! `k8s::jobs` makes the API call. Back up: the `tracker` watches Jobs and pods, its pure
//! `tracker::state` says what is due, the domain decides what follows, and the tracker
//! publishes through [`amqp::publisher`] and cleans up through `k8s::jobs`.
//!
//! - [`run`]: wires one worker from its [`config`] (parsed once, when the flags are read).
//! - `context`: what the handlers and the tracker share; no behaviour.
//! - [`amqp`]: broker session and topology, confirmed publishing (the one home), consuming.
//! - [`k8s`]: client, rendering, object views, slim watch types, the Jobs adapter.
//! - `leader`: the reporting Lease; takes its own Lease API and settings.
//! - `retry`: the one backoff loop. [`shutdown`]: the stop signal.
//! - `observe`: the one place where what happens becomes a log line and a metric.
//! - `parked`: the dead-letter inbox (every dead letter leaves it with a reason and an event).
//! - `http`: `/healthz`, `/readyz`, `/metrics`. [`schema`]: the contract's JSON Schemas.
//! - [`error`]: the worker's error type.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod amqp;
pub mod config;
pub(crate) mod context;
pub(crate) mod control;
pub(crate) mod delivery;
pub use k8s_job_worker_domain as domain;
pub mod error;
pub(crate) mod http;
pub mod k8s;
pub(crate) mod leader;
pub(crate) mod observe;
pub(crate) mod parked;
pub(crate) mod retry;
pub mod run;
pub mod schema;
pub mod shutdown;
pub(crate) mod submit;
pub(crate) mod tracker;
