//! Reads the apiserver's own `/metrics`: `apiserver_request_total` (requests by verb and
//! resource) and `apiserver_watch_events_total` / `_sizes_sum` (what it sent on watches).

use std::{collections::BTreeMap, path::Path, time::Duration};

use anyhow::Context as _;

/// Requests counted by the apiserver, by `VERB resource`.
pub type Counts = BTreeMap<String, f64>;

async fn scrape(dir: &Path) -> anyhow::Result<Counts> {
    Ok(parse(&metrics_text(dir).await?))
}

async fn metrics_text(dir: &Path) -> anyhow::Result<String> {
    let token = std::fs::read_to_string(dir.join("pki/admin.token"))?;
    let kubeconfig = kube::config::Kubeconfig::read_from(dir.join("kubeconfig"))?;
    let server = kubeconfig.clusters.first().and_then(|c| c.cluster.as_ref()?.server.clone()).context("server")?;
    let out = tokio::process::Command::new("curl")
        .args(["-fsS", "--cacert"])
        .arg(dir.join("pki/ca.crt"))
        .args(["-H", &format!("Authorization: Bearer {}", token.trim()), &format!("{server}/metrics")])
        .output()
        .await?;
    anyhow::ensure!(out.status.success(), "scraping apiserver metrics failed");
    Ok(String::from_utf8_lossy(&out.stdout).to_string())
}

/// Watch events the apiserver sent so far, and their bytes, for Jobs and Pods (all watchers).
#[derive(Debug, Clone, Copy, Default)]
pub struct WatchTraffic {
    /// Events.
    pub events: f64,
    /// Bytes.
    pub bytes: f64,
}

impl WatchTraffic {
    /// Reads the counters now.
    pub async fn now(dir: &Path) -> anyhow::Result<WatchTraffic> {
        let text = metrics_text(dir).await?;
        let sum = |metric: &str| -> f64 {
            text.lines()
                .filter(|l| l.starts_with(metric) && (l.contains("kind=\"Pod\"") || l.contains("kind=\"Job\"")))
                .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
                .sum()
        };
        Ok(WatchTraffic {
            events: sum("apiserver_watch_events_total{"),
            bytes: sum("apiserver_watch_events_sizes_sum{"),
        })
    }

    /// What was sent since `before`.
    pub fn since(self, before: WatchTraffic) -> WatchTraffic {
        WatchTraffic { events: self.events - before.events, bytes: self.bytes - before.bytes }
    }
}

/// Sums `apiserver_request_total` by verb and resource (watch streams are not requests/s).
pub fn parse(text: &str) -> Counts {
    let mut counts = Counts::new();
    for line in text.lines().filter(|l| l.starts_with("apiserver_request_total{")) {
        let Some((labels, value)) = line.rsplit_once(' ') else { continue };
        let label = |name: &str| {
            labels.split(&format!("{name}=\"")).nth(1).and_then(|rest| rest.split('"').next()).unwrap_or("").to_string()
        };
        let verb = label("verb");
        if verb == "WATCH" {
            continue;
        }
        let key = format!("{verb} {}", label("resource"));
        *counts.entry(key).or_default() += value.parse::<f64>().unwrap_or(0.0);
    }
    counts
}

/// Namespace-scoped LIST requests of Jobs and pods since the apiserver started.
pub async fn namespaced_lists(dir: &Path) -> anyhow::Result<f64> {
    let text = metrics_text(dir).await?;
    Ok(text
        .lines()
        .filter(|l| l.starts_with("apiserver_request_total{") && l.contains("verb=\"LIST\""))
        .filter(|l| {
            l.contains("scope=\"namespace\"") && (l.contains("resource=\"jobs\"") || l.contains("resource=\"pods\""))
        })
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum())
}

/// Requests made during `period`.
pub async fn requests_during(dir: &Path, period: Duration) -> anyhow::Result<Counts> {
    let before = scrape(dir).await?;
    tokio::time::sleep(period).await;
    let after = scrape(dir).await?;
    Ok(after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0.0)))
        .filter(|(_, v)| *v > 0.0)
        .collect())
}

/// Requests in `with` beyond those in `without` (the worker's share).
pub fn difference(with: &Counts, without: &Counts) -> Counts {
    with.iter()
        .map(|(k, v)| (k.clone(), (v - without.get(k).copied().unwrap_or(0.0)).max(0.0)))
        .filter(|(_, v)| *v > 0.0)
        .collect()
}
