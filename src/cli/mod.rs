//! Command line: `run` (the worker), `submit`, `cancel`, `events`, `schema`, `check`,
//! `release`.

mod check;
mod tools;

use std::path::PathBuf;

use anyhow::{bail, Context as _};
use clap::{Args, Parser, Subcommand, ValueEnum};
use k8s_job_worker::{config::Settings, schema, shutdown};

/// Log output format.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    /// JSON when stderr is not a terminal (containers), readable text on a terminal.
    Auto,
    /// One JSON object per line.
    Json,
    /// Human-readable text.
    Text,
}

impl LogFormat {
    /// Whether logs are JSON.
    pub fn is_json(self) -> bool {
        use std::io::IsTerminal;
        match self {
            LogFormat::Auto => !std::io::stderr().is_terminal(),
            LogFormat::Json => true,
            LogFormat::Text => false,
        }
    }
}

/// Runs Galaxy jobs as Kubernetes Jobs, driven by RabbitMQ.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
pub struct Cli {
    /// Log format (level from RUST_LOG, default info).
    #[arg(long, global = true, env = "LOG_FORMAT", value_enum, default_value = "auto")]
    pub log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the worker: consume requests and cancels, create and track Jobs, publish events.
    Run(Box<Settings>),
    /// Publish a job request (from a JSON file or flags); optionally wait for its events.
    Submit(tools::SubmitArgs),
    /// Publish a cancel for a job.
    Cancel(tools::CancelArgs),
    /// Print result events as they arrive, optionally filtered.
    Events(tools::EventsArgs),
    /// Print the JSON Schemas of the message contract, or write them to a directory.
    Schema(SchemaArgs),
    /// Verify the broker login and queues, the apiserver, the namespace, the configured PVCs and
    /// every permission the worker needs (SelfSubjectAccessReview), naming whatever is missing.
    Check(Box<Settings>),
    /// Let go of every Job of the instance the worker's finalizer holds (before uninstalling:
    /// a Job is held only from the claim of its outcome until its event is out, but a worker
    /// stopped for good in between leaves it held, and so its namespace, if it is deleted).
    Release(Box<Settings>),
}

#[derive(Debug, Args)]
struct SchemaArgs {
    /// Write `job-request.v1.json`, `job-event.v1.json` and `job-cancel.v1.json` here.
    #[arg(long)]
    write: Option<PathBuf>,
}

/// Runs the chosen command.
pub async fn dispatch(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run(settings) => run(*settings).await,
        Command::Submit(args) => tools::submit(args).await,
        Command::Check(settings) => check::check(*settings).await,
        Command::Release(settings) => release(*settings).await,
        Command::Cancel(args) => tools::cancel(args).await,
        Command::Events(args) => tools::events(args).await,
        Command::Schema(args) => {
            for (name, value) in schema::all() {
                match &args.write {
                    Some(dir) => std::fs::write(dir.join(name), schema::render(&value))
                        .with_context(|| format!("writing {name}"))?,
                    None => print!("{}", schema::render(&value)),
                }
            }
            Ok(())
        }
    }
}

async fn run(settings: Settings) -> anyhow::Result<()> {
    if let Err(why) = settings.validate() {
        bail!("invalid configuration: {why}");
    }
    let clients = k8s_job_worker::k8s::client::clients(&settings.kube).await?;
    let listener = tokio::net::TcpListener::bind(&settings.worker.http_listen)
        .await
        .with_context(|| format!("binding the HTTP endpoint {}", settings.worker.http_listen))?;
    tracing::info!(addr = %listener.local_addr()?, "health and metrics endpoint listening");
    let stop = shutdown::Shutdown::new();
    let trigger = stop.clone();
    tokio::spawn(async move {
        shutdown::signal().await;
        trigger.trigger();
    });
    k8s_job_worker::run::run(settings, clients, listener, stop).await;
    Ok(())
}

async fn release(settings: Settings) -> anyhow::Result<()> {
    let client = k8s_job_worker::k8s::client::client(&settings.kube).await?;
    let jobs = k8s_job_worker::k8s::jobs::Jobs::new(
        client,
        k8s_job_worker::k8s::jobs::JobsConfig {
            namespace: settings.kube.k8s_namespace.clone(),
            deletion_timeout: std::time::Duration::from_secs(settings.kube.k8s_timeout_seconds_job_deletion),
            max_concurrent_creates: 1,
        },
    );
    let selector = settings.naming().instance_selector();
    let released = jobs.release_all(&selector, |_| true).await?;
    println!("released {released} Job(s) of {selector} in namespace {}", settings.kube.k8s_namespace);
    Ok(())
}
