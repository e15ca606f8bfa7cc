//! The broker connection: one session (connection + confirm-mode publish channel) at a time,
//! re-established with backoff after any failure, with the topology redeclared each time.
//!
//! Reconnection is done here rather than by lapin's auto-recovery so that every consumer
//! starts from a fresh channel with known delivery tags, and a delivery from a dead channel
//! is simply redelivered by the broker (our handling is idempotent).

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use lapin::{
    options::{ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions},
    types::{AMQPValue, FieldTable},
    Channel, Connection, ConnectionProperties, ExchangeKind,
};
use tokio::sync::{watch, Mutex};

use crate::{
    config::{AmqpSettings, QueueType},
    error::{Error, Result},
    retry::{self, Budget},
    shutdown::Shutdown,
};

/// One live connection and its publish channel.
pub struct Session {
    /// The connection; consumers open their own channels on it.
    pub connection: Connection,
    /// Channel in confirm mode, shared by all publishers.
    pub publish: Channel,
    /// Increases with every reconnection.
    pub generation: u64,
}

impl Session {
    /// Whether the connection and publish channel are still usable.
    pub fn is_open(&self) -> bool {
        self.connection.status().connected() && self.publish.status().connected()
    }
}

/// Owns the current [`Session`] and reconnects when it breaks.
pub struct Broker {
    settings: AmqpSettings,
    connection_name: String,
    current: Mutex<Option<Arc<Session>>>,
    generation: AtomicU64,
    connected: watch::Sender<bool>,
    unroutable: watch::Sender<Option<String>>,
}

impl Broker {
    /// A broker handle; nothing connects until [`Broker::session`] is called.
    pub fn new(settings: AmqpSettings, connection_name: String) -> Self {
        Broker {
            settings,
            connection_name,
            current: Mutex::new(None),
            generation: AtomicU64::new(0),
            connected: watch::Sender::new(false),
            unroutable: watch::Sender::new(None),
        }
    }

    /// The broker settings.
    pub fn settings(&self) -> &AmqpSettings {
        &self.settings
    }

    /// Whether a session is currently open (for `/readyz`).
    pub fn is_connected(&self) -> bool {
        *self.connected.borrow()
    }

    /// Watches the connected flag.
    pub fn connected_watch(&self) -> watch::Receiver<bool> {
        self.connected.subscribe()
    }

    /// Watches whether events reach a queue: the job id of the first event that came back
    /// unroutable, until one is confirmed again (`None`).
    pub fn unroutable_watch(&self) -> watch::Receiver<Option<String>> {
        self.unroutable.subscribe()
    }

    /// Whether the last event came back unroutable (nothing bound to the result exchange).
    pub fn is_unroutable(&self) -> bool {
        self.unroutable.borrow().is_some()
    }

    /// Notes whether an event (of `job_id`) was routed.
    pub(crate) fn event_routed(&self, job_id: &str, routed: bool) {
        self.unroutable.send_if_modified(|now| match (now.is_some(), routed) {
            (true, true) => {
                *now = None;
                true
            }
            (false, false) => {
                *now = Some(job_id.to_string());
                true
            }
            _ => false,
        });
    }

    /// Number of sessions opened so far (the first connection counts as one).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Relaxed)
    }

    /// The open session, connecting (once) when there is none. Callers retry with backoff.
    pub async fn session(&self) -> Result<Arc<Session>> {
        let mut current = self.current.lock().await;
        if let Some(session) = current.as_ref().filter(|s| s.is_open()) {
            return Ok(session.clone());
        }
        if current.take().is_some() {
            self.connected.send_replace(false);
        }
        let session = Arc::new(self.connect().await?);
        *current = Some(session.clone());
        self.connected.send_replace(true);
        Ok(session)
    }

    /// Waits (retrying with backoff) until a session is open; `None` when shutdown started.
    pub async fn session_with_retry(&self, stop: &Shutdown) -> Option<Arc<Session>> {
        let failed = |err: &Error, wait: Duration| {
            tracing::warn!(error = %err, retry_in_ms = wait.as_millis() as u64, "broker connection failed");
        };
        retry::retry(stop, Budget::UntilShutdown, |_| true, failed, || self.session()).await?.ok()
    }

    /// Marks a session broken so the next call reconnects.
    pub async fn invalidate(&self, generation: u64) {
        let mut current = self.current.lock().await;
        if current.as_ref().is_some_and(|s| s.generation == generation) {
            if let Some(old) = current.take() {
                let _ = tokio::time::timeout(Duration::from_secs(2), old.connection.close(320, "reconnecting".into()))
                    .await;
            }
            self.connected.send_replace(false);
        }
    }

    /// Closes the session cleanly (shutdown).
    pub async fn close(&self) {
        if let Some(session) = self.current.lock().await.take() {
            let _ =
                tokio::time::timeout(Duration::from_secs(5), session.connection.close(200, "shutdown".into())).await;
        }
        self.connected.send_replace(false);
    }

    async fn connect(&self) -> Result<Session> {
        let props = ConnectionProperties::default().with_connection_name(self.connection_name.clone().into());
        let connect = Connection::connect(&self.settings.amqp_url, props);
        let connection =
            tokio::time::timeout(Duration::from_secs(15), connect).await.map_err(|_| Error::NotConnected)??;
        let setup = connection.create_channel().await?;
        declare_topology(&setup, &self.settings).await?;
        let _ = setup.close(200, "topology declared".into()).await;
        let publish = connection.create_channel().await?;
        publish.confirm_select(ConfirmSelectOptions::default()).await?;
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        tracing::info!(generation, "connected to the broker");
        Ok(Session { connection, publish, generation })
    }
}

/// Arguments of the request and control queues.
pub fn work_queue_arguments(settings: &AmqpSettings) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-dead-letter-exchange".into(), AMQPValue::LongString(settings.dead_letter_exchange.clone().into()));
    if settings.queue_type == QueueType::Quorum {
        args.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
        args.insert("x-delivery-limit".into(), AMQPValue::LongLongInt(i64::from(settings.delivery_limit)));
    }
    args
}

/// Declares the exchanges and queues (idempotent).
pub async fn declare_topology(channel: &Channel, s: &AmqpSettings) -> Result<()> {
    let durable = ExchangeDeclareOptions { durable: true, ..ExchangeDeclareOptions::default() };
    channel
        .exchange_declare(s.result_exchange.clone().into(), ExchangeKind::Topic, durable, FieldTable::default())
        .await?;
    channel
        .exchange_declare(s.dead_letter_exchange.clone().into(), ExchangeKind::Fanout, durable, FieldTable::default())
        .await?;
    let queue = QueueDeclareOptions { durable: true, ..QueueDeclareOptions::default() };
    let mut dlq_args = FieldTable::default();
    if s.queue_type == QueueType::Quorum {
        dlq_args.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
    }
    channel.queue_declare(s.dead_letter_queue.clone().into(), queue, dlq_args.clone()).await?;
    // Everything dead-lettered goes through the inbox, where the worker gives it a reason;
    // only then does it reach the dead-letter queue (bound directly in earlier versions).
    channel.queue_declare(s.dead_letter_inbox.clone().into(), queue, dlq_args).await?;
    let (dlx, none) = (s.dead_letter_exchange.clone(), FieldTable::default());
    channel
        .queue_bind(
            s.dead_letter_inbox.clone().into(),
            dlx.clone().into(),
            "".into(),
            QueueBindOptions::default(),
            none.clone(),
        )
        .await?;
    channel.queue_unbind(s.dead_letter_queue.clone().into(), dlx.into(), "".into(), none).await?;
    for name in [&s.request_queue, &s.control_queue] {
        channel.queue_declare(name.clone().into(), queue, work_queue_arguments(s)).await?;
    }
    Ok(())
}
