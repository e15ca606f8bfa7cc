//! Reads the apiserver's own `/metrics`: `apiserver_request_total` (requests by verb and
//! resource) and `apiserver_watch_events_total` / `_sizes_sum` (what it sent on watches).

use std::{collections::BTreeMap, path::Path, time::Duration};

use anyhow::Context as _;

/// Requests counted by the apiserver, by `VERB resource`.
pub type Counts = BTreeMap<String, f64>;

async fn scrape(dir: &Path) -> anyhow::Result<Counts> {
    Ok(by_verb_resource(&metrics_text(dir).await?, "apiserver_request_total{"))
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

/// The apiserver's own counters at one moment: requests and the seconds spent serving them
/// (by `VERB resource`, watch streams left out), and what it sent on watches of Jobs and pods
/// (`Job events`, `Job bytes`, `Pod events`, `Pod bytes`; all watchers).
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Requests.
    pub requests: Counts,
    /// Seconds spent serving them (wall time: a share of the apiserver's CPU, not all of it).
    pub seconds: Counts,
    /// Watch events and bytes by kind.
    pub watch: Counts,
}

impl Snapshot {
    /// Reads the counters now.
    pub async fn now(dir: &Path) -> anyhow::Result<Snapshot> {
        let text = metrics_text(dir).await?;
        let mut watch = Counts::new();
        for (metric, what) in
            [("apiserver_watch_events_total{", "events"), ("apiserver_watch_events_sizes_sum{", "bytes")]
        {
            for kind in ["Job", "Pod"] {
                let sum = text
                    .lines()
                    .filter(|l| l.starts_with(metric) && l.contains(&format!("kind=\"{kind}\"")))
                    .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
                    .sum();
                watch.insert(format!("{kind} {what}"), sum);
            }
        }
        Ok(Snapshot {
            requests: by_verb_resource(&text, "apiserver_request_total{"),
            seconds: by_verb_resource(&text, "apiserver_request_duration_seconds_sum{"),
            watch,
        })
    }

    /// What happened since `before`.
    pub fn since(self, before: &Snapshot) -> Snapshot {
        Snapshot {
            requests: difference(&self.requests, &before.requests),
            seconds: difference(&self.seconds, &before.seconds),
            watch: difference(&self.watch, &before.watch),
        }
    }

    /// Adds another run's counts.
    pub fn add(&mut self, other: &Snapshot) {
        for (sum, more) in [
            (&mut self.requests, &other.requests),
            (&mut self.seconds, &other.seconds),
            (&mut self.watch, &other.watch),
        ] {
            for (k, v) in more {
                *sum.entry(k.clone()).or_default() += v;
            }
        }
    }
}

/// Sums one of the apiserver's request counters by verb and resource, watch streams left out.
fn by_verb_resource(text: &str, metric: &str) -> Counts {
    let mut counts = Counts::new();
    for line in text.lines().filter(|l| l.starts_with(metric)) {
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
