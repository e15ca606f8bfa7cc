//! RabbitMQ adapter: connection and topology, confirmed publishing, consuming.

pub mod broker;
pub mod consumer;
pub mod publisher;
