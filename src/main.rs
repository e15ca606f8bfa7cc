//! The `k8s-job-worker` binary: wires telemetry, settings and the worker or a CLI command.

use clap::Parser;

mod cli;

/// Without `RUST_LOG`: info, the clients' warnings — but not lapin's for each message the
/// broker returns (its whole body, as bytes): the worker says that once itself.
const DEFAULT_LOG_FILTER: &str = "info,kube=warn,lapin=warn,lapin::returned_messages=error";

fn init_tracing(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| DEFAULT_LOG_FILTER.into());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if json {
        builder.json().flatten_event(true).init();
    } else {
        builder.init();
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = cli::Cli::parse();
    init_tracing(cli.log_format.is_json());
    cli::dispatch(cli).await
}
