//! RabbitMQ adapter: connection and topology, confirmed publishing, consuming.

pub mod broker;
pub(crate) mod consumer;
pub mod publisher;
