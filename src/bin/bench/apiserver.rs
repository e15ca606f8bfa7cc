//! Reads `apiserver_request_total` from the apiserver's own `/metrics`.

use std::{collections::BTreeMap, path::Path, time::Duration};

use anyhow::Context as _;

/// Requests counted by the apiserver, by `VERB resource`.
pub type Counts = BTreeMap<String, f64>;

async fn scrape(dir: &Path) -> anyhow::Result<Counts> {
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
    Ok(parse(&String::from_utf8_lossy(&out.stdout)))
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
