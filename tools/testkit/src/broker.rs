//! The Galaxy side of the message contract, as tests, chaos and bench play it: queue names,
//! publishing requests and cancels with confirms (through the worker's own publisher, the
//! one home of publish-with-confirm), and a private queue that collects the events.

use std::time::Duration;

use k8s_job_worker::{
    amqp::publisher::{self, Outgoing, Pending},
    config::AmqpSettings,
    error::Error,
};
use lapin::{
    options::{
        BasicConsumeOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
    },
    types::FieldTable,
    Channel, Connection, ConnectionProperties, Consumer, ExchangeKind,
};

/// The broker URL of the environment; fails loudly without it.
pub fn amqp_url() -> String {
    std::env::var("AMQP_URL")
        .expect("AMQP_URL not set: run the tests through scripts/test (or eval $(scripts/testenv env))")
}

/// Queue and exchange names private to one test or run.
#[derive(Clone, Debug)]
pub struct Names {
    /// Requests.
    pub request_queue: String,
    /// Cancels and status requests.
    pub control_queue: String,
    /// Events.
    pub result_exchange: String,
    /// Refused messages.
    pub dead_letter_exchange: String,
    /// Where refused messages wait.
    pub dead_letter_queue: String,
    /// Where dead letters arrive before the worker moves them on.
    pub dead_letter_inbox: String,
}

impl Names {
    /// Names under `prefix.` (`<prefix>.requests`, ...).
    pub fn new(prefix: &str) -> Self {
        Names {
            request_queue: format!("{prefix}.requests"),
            control_queue: format!("{prefix}.control"),
            result_exchange: format!("{prefix}.events"),
            dead_letter_exchange: format!("{prefix}.dlx"),
            dead_letter_queue: format!("{prefix}.dead-letter"),
            dead_letter_inbox: format!("{prefix}.dead-letter.inbox"),
        }
    }

    /// The worker's environment variables for these names.
    pub fn env(&self) -> [(&'static str, String); 6] {
        [
            ("AMQP_REQUEST_QUEUE", self.request_queue.clone()),
            ("AMQP_CONTROL_QUEUE", self.control_queue.clone()),
            ("AMQP_RESULT_EXCHANGE", self.result_exchange.clone()),
            ("AMQP_DEAD_LETTER_EXCHANGE", self.dead_letter_exchange.clone()),
            ("AMQP_DEAD_LETTER_QUEUE", self.dead_letter_queue.clone()),
            ("AMQP_DEAD_LETTER_INBOX", self.dead_letter_inbox.clone()),
        ]
    }

    /// The worker's broker settings for these names (defaults otherwise).
    pub fn settings(&self, amqp_url: &str) -> AmqpSettings {
        let mut args = vec!["--amqp-url".to_string(), amqp_url.to_string()];
        for (flag, value) in [
            ("--request-queue", &self.request_queue),
            ("--control-queue", &self.control_queue),
            ("--result-exchange", &self.result_exchange),
            ("--dead-letter-exchange", &self.dead_letter_exchange),
            ("--dead-letter-queue", &self.dead_letter_queue),
            ("--dead-letter-inbox", &self.dead_letter_inbox),
        ] {
            args.extend([flag.to_string(), value.clone()]);
        }
        k8s_job_worker::config::Settings::from_args(args).expect("broker settings").amqp
    }
}

/// One connection and one channel in confirm mode.
pub struct GalaxyClient {
    /// The connection.
    pub conn: Connection,
    /// The confirm-mode channel.
    pub channel: Channel,
}

impl GalaxyClient {
    /// Connects to `url`.
    pub async fn connect(url: &str) -> Result<GalaxyClient, lapin::Error> {
        let conn = Connection::connect(url, ConnectionProperties::default()).await?;
        let channel = conn.create_channel().await?;
        channel.confirm_select(ConfirmSelectOptions::default()).await?;
        Ok(GalaxyClient { conn, channel })
    }

    /// Whether the connection and channel are still usable.
    pub fn is_open(&self) -> bool {
        self.conn.status().connected() && self.channel.status().connected()
    }

    /// Publishes a body to a queue and waits for the confirm (a missing queue is an error).
    pub async fn publish(&self, queue: &str, body: &[u8]) -> Result<Duration, Error> {
        publisher::publish(&self.channel, Outgoing::to_queue(queue, body), Duration::from_secs(10)).await
    }

    /// Sends a body to a queue; the confirm is awaited later (to publish many at once).
    pub async fn send(&self, queue: &str, body: &[u8]) -> Result<Pending, Error> {
        publisher::send(&self.channel, Outgoing::to_queue(queue, body)).await
    }

    /// Declares the result exchange (as the worker does) and binds a queue to it for `pattern`:
    /// a private one when `durable` is `None`, else that durable queue. Returns its consumer.
    pub async fn bind_events(
        &self,
        exchange: &str,
        pattern: &str,
        durable: Option<&str>,
    ) -> Result<Consumer, lapin::Error> {
        let ch = &self.channel;
        let options = ExchangeDeclareOptions { durable: true, ..Default::default() };
        ch.exchange_declare(exchange.into(), ExchangeKind::Topic, options, FieldTable::default()).await?;
        let queue_options = match durable {
            Some(_) => QueueDeclareOptions { durable: true, ..Default::default() },
            None => QueueDeclareOptions { exclusive: true, ..Default::default() },
        };
        let q = ch.queue_declare(durable.unwrap_or("").into(), queue_options, FieldTable::default()).await?;
        ch.queue_bind(
            q.name().clone(),
            exchange.into(),
            pattern.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
        ch.basic_consume(q.name().clone(), "events".into(), BasicConsumeOptions::default(), FieldTable::default()).await
    }
}
