//! The client-side commands: `submit`, `cancel` and `events`.

use std::{path::PathBuf, time::Duration};

use anyhow::{bail, Context as _};
use clap::Args;
use futures::StreamExt;
use k8s_job_worker::domain::{
    event::JobEvent,
    request::{self, JobControl},
    resources::ResourceValue,
};
use k8s_job_worker::{
    amqp::publisher::{self, Outgoing},
    error::Error,
};
use lapin::{
    options::{BasicAckOptions, BasicConsumeOptions, ConfirmSelectOptions, QueueBindOptions, QueueDeclareOptions},
    types::FieldTable,
    Channel, Connection, ConnectionProperties,
};

/// Broker options shared by the client commands.
#[derive(Debug, Clone, Args)]
pub struct BrokerArgs {
    /// AMQP URL of the broker.
    #[arg(long, env = "AMQP_URL", default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    amqp_url: String,
    /// Queue the worker consumes requests from.
    #[arg(long, env = "AMQP_REQUEST_QUEUE", default_value = "galaxy.k8s.requests")]
    request_queue: String,
    /// Queue the worker consumes cancels from.
    #[arg(long, env = "AMQP_CONTROL_QUEUE", default_value = "galaxy.k8s.control")]
    control_queue: String,
    /// Exchange the worker publishes events to.
    #[arg(long, env = "AMQP_RESULT_EXCHANGE", default_value = "galaxy.k8s.events")]
    result_exchange: String,
}

/// `submit` options.
#[derive(Debug, Args)]
pub struct SubmitArgs {
    #[command(flatten)]
    broker: BrokerArgs,
    /// A request as JSON (see `schema`); the flags below are ignored when given.
    #[arg(long)]
    file: Option<PathBuf>,
    /// Galaxy job id.
    #[arg(long)]
    job_id: Option<String>,
    /// Command line run with /bin/bash -c.
    #[arg(long = "command")]
    command_line: Option<String>,
    /// Container image.
    #[arg(long, default_value = "busybox:stable")]
    image: String,
    /// Memory limit (e.g. 1 = 1G, 0.5 = 500M, or "512Mi").
    #[arg(long)]
    limits_memory: Option<String>,
    /// Pod retrials allowed.
    #[arg(long)]
    max_pod_retrials: Option<u32>,
    /// Wait for and print the job's events until a terminal one.
    #[arg(long)]
    wait: bool,
    /// Give up waiting after this many seconds.
    #[arg(long, default_value_t = 300)]
    timeout_seconds: u64,
}

/// `cancel` options.
#[derive(Debug, Args)]
pub struct CancelArgs {
    #[command(flatten)]
    broker: BrokerArgs,
    /// Galaxy job id.
    #[arg(long)]
    job_id: String,
    /// Attempt, when the request carried one.
    #[arg(long)]
    attempt: Option<u32>,
    /// Reason for the `cancelled` event.
    #[arg(long)]
    reason: Option<String>,
}

/// `events` options.
#[derive(Debug, Args)]
pub struct EventsArgs {
    #[command(flatten)]
    broker: BrokerArgs,
    /// Only events of this Galaxy instance id ("default" when the worker has none).
    #[arg(long)]
    instance: Option<String>,
    /// Only events of this job id.
    #[arg(long)]
    job_id: Option<String>,
    /// Only events in this state (submitted, running, succeeded, failed, oom_killed, cancelled, lost).
    #[arg(long)]
    state: Option<String>,
    /// Stop after this many events.
    #[arg(long)]
    count: Option<usize>,
    /// Stop after this many terminal events (succeeded, failed, oom_killed, cancelled, lost).
    #[arg(long)]
    terminal_count: Option<usize>,
    /// One readable line per event instead of JSON.
    #[arg(long)]
    pretty: bool,
}

async fn connect(url: &str) -> anyhow::Result<(Connection, Channel)> {
    let conn =
        Connection::connect(url, ConnectionProperties::default().with_connection_name("k8s-job-worker cli".into()))
            .await
            .with_context(|| format!("connecting to {url}"))?;
    let channel = conn.create_channel().await?;
    channel.confirm_select(ConfirmSelectOptions::default()).await?;
    Ok((conn, channel))
}

/// Publishes a JSON body to a queue and waits for the broker's confirm.
async fn publish(channel: &Channel, queue: &str, body: &[u8]) -> anyhow::Result<()> {
    match publisher::publish(channel, Outgoing::to_queue(queue, body), Duration::from_secs(30)).await {
        Ok(_) => Ok(()),
        Err(Error::Unroutable { .. }) => bail!("queue {queue} does not exist (is the worker running?)"),
        Err(err) => Err(err).with_context(|| format!("publishing to {queue}")),
    }
}

/// Binds a private queue to the result exchange for the given routing pattern.
async fn event_stream(channel: &Channel, exchange: &str, pattern: &str) -> anyhow::Result<lapin::Consumer> {
    let queue = channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() },
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_bind(
            queue.name().clone(),
            exchange.into(),
            pattern.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .with_context(|| format!("binding to exchange {exchange} (is the worker running?)"))?;
    Ok(channel
        .basic_consume(queue.name().clone(), "cli".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await?)
}

/// Publishes a request; with `--wait`, prints its events until a terminal one.
pub async fn submit(args: SubmitArgs) -> anyhow::Result<()> {
    let body = match &args.file {
        Some(path) => std::fs::read(path).with_context(|| format!("reading {}", path.display()))?,
        None => {
            let (Some(job_id), Some(command_line)) = (args.job_id.clone(), args.command_line.clone()) else {
                bail!("give --file, or --job-id and --command");
            };
            let mut request = serde_json::json!({
                "schema": request::REQUEST_SCHEMA, "job_id": job_id, "command_line": command_line, "image": args.image,
            });
            if let Some(memory) = args.limits_memory.as_deref() {
                request["limits_memory"] = serde_json::to_value(memory.parse::<ResourceValue>()?)?;
            }
            if let Some(retrials) = args.max_pod_retrials {
                request["max_pod_retrials"] = retrials.into();
            }
            serde_json::to_vec(&request)?
        }
    };
    let job_id = request::readable_job_id(&body);
    let (_conn, channel) = connect(&args.broker.amqp_url).await?;
    let mut stream = match (args.wait, &job_id) {
        (true, Some(_)) => Some(event_stream(&channel, &args.broker.result_exchange, "#").await?),
        _ => None,
    };
    publish(&channel, &args.broker.request_queue, &body).await?;
    eprintln!("submitted job {}", job_id.as_deref().unwrap_or("(unreadable id)"));
    let Some(stream) = stream.as_mut() else { return Ok(()) };
    let wait = async {
        while let Some(delivery) = stream.next().await {
            let delivery = delivery?;
            let _ = delivery.ack(BasicAckOptions::default()).await;
            let Ok(event) = serde_json::from_slice::<JobEvent>(&delivery.data) else { continue };
            if Some(&event.job_id) != job_id.as_ref() {
                continue;
            }
            println!("{}", serde_json::to_string(&event)?);
            if event.state.is_terminal() {
                return Ok(());
            }
        }
        bail!("event stream closed")
    };
    tokio::time::timeout(Duration::from_secs(args.timeout_seconds), wait)
        .await
        .map_err(|_| anyhow::anyhow!("no terminal event within {} s", args.timeout_seconds))?
}

/// Publishes a cancel.
pub async fn cancel(args: CancelArgs) -> anyhow::Result<()> {
    let control = JobControl {
        schema: request::CONTROL_SCHEMA.into(),
        job_id: args.job_id,
        attempt: args.attempt,
        action: request::ControlAction::Cancel,
        reason: args.reason,
        handler: None,
    };
    let (_conn, channel) = connect(&args.broker.amqp_url).await?;
    publish(&channel, &args.broker.control_queue, &serde_json::to_vec(&control)?).await?;
    eprintln!("cancel published for job {}", control.job_id);
    Ok(())
}

/// Prints events (one JSON object per line) as they arrive.
pub async fn events(args: EventsArgs) -> anyhow::Result<()> {
    let pattern = format!("{}.{}", args.instance.as_deref().unwrap_or("*"), args.state.as_deref().unwrap_or("*"));
    let (_conn, channel) = connect(&args.broker.amqp_url).await?;
    let mut stream = event_stream(&channel, &args.broker.result_exchange, &pattern).await?;
    let (mut seen, mut terminal) = (0, 0);
    while let Some(delivery) = stream.next().await {
        let delivery = delivery?;
        let _ = delivery.ack(BasicAckOptions::default()).await;
        let event = serde_json::from_slice::<JobEvent>(&delivery.data).ok();
        if let Some(job_id) = &args.job_id {
            if event.as_ref().is_none_or(|e| &e.job_id != job_id) {
                continue;
            }
        }
        match (&event, args.pretty) {
            (Some(e), true) => println!("{}", pretty(e)),
            _ => println!("{}", String::from_utf8_lossy(&delivery.data)),
        }
        seen += 1;
        terminal += usize::from(event.as_ref().is_some_and(|e| e.state.is_terminal()));
        if args.count.is_some_and(|c| seen >= c) || args.terminal_count.is_some_and(|c| terminal >= c) {
            break;
        }
    }
    Ok(())
}

/// One readable line for an event, with its log tail indented below for terminal states.
fn pretty(e: &JobEvent) -> String {
    let mut line = format!("{:<11} job {:<8} {:<24} {}", e.state.as_str(), e.job_id, e.job_name, e.reason);
    if let Some(code) = e.exit_code {
        line.push_str(&format!(" [exit {code}]"));
    }
    if let Some(tail) = e.log_tail.as_deref().filter(|t| !t.is_empty()) {
        for l in tail.lines().rev().take(5).collect::<Vec<_>>().into_iter().rev() {
            line.push_str(&format!("\n            | {l}"));
        }
    }
    line
}
