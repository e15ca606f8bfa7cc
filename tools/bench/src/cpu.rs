//! CPU accounting of the environment's processes (from `/proc`), and waiting for them to idle.

use std::time::{Duration, Instant};

use serde_json::json;

/// CPU seconds (user + system) a process has used so far.
pub fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0.0 };
    let Some((_, rest)) = stat.rsplit_once(')') else { return 0.0 };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the command: [0] state ... [11] utime, [12] stime (clock ticks).
    let ticks: f64 = [11, 12].iter().filter_map(|i| fields.get(*i)?.parse::<f64>().ok()).sum();
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    ticks / hz
}

/// The pid of an environment process from its pid file.
pub fn env_pid(dir: &std::path::Path, name: &str) -> Option<u32> {
    std::fs::read_to_string(dir.join(format!("{name}.pid"))).ok()?.trim().parse().ok()
}

/// Waits (at most a minute) until the control plane and the broker have finished the previous
/// phase's work: less than 8 % of a core each second, twice in a row. A measurement started
/// while the garbage collector or etcd still digest the last namespace would be charged for it.
/// Returns what each process used per second over those two calm seconds: its idle rate.
pub async fn quiesce(dir: &std::path::Path) -> Idle {
    let mut calm = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while calm.len() < 2 && Instant::now() < deadline {
        let before = CpuSample::take(dir, &[]);
        tokio::time::sleep(Duration::from_secs(1)).await;
        let used = before.since(dir, &[]);
        if used["total"].as_f64().unwrap_or(0.0) < 0.08 {
            calm.push(used);
        } else {
            calm.clear();
        }
    }
    let mut idle = Idle::default();
    for second in &calm {
        for (name, used) in second.as_object().into_iter().flatten().filter(|(n, _)| *n != "total") {
            *idle.0.entry(name.clone()).or_default() += used.as_f64().unwrap_or(0.0) / calm.len().max(1) as f64;
        }
    }
    idle
}

/// CPU seconds per second each process of the environment uses when nothing happens.
#[derive(Debug, Clone, Default)]
pub struct Idle(std::collections::BTreeMap<String, f64>);

impl Idle {
    /// `used` (CPU seconds by process over `seconds`) less what idling would have used.
    pub fn subtract(&self, used: &serde_json::Value, seconds: f64) -> serde_json::Value {
        let mut out = serde_json::Map::new();
        let mut total = 0.0;
        for (name, value) in used.as_object().into_iter().flatten().filter(|(n, _)| *n != "total") {
            let busy = (value.as_f64().unwrap_or(0.0) - self.0.get(name).copied().unwrap_or(0.0) * seconds).max(0.0);
            total += busy;
            out.insert(name.clone(), json!((busy * 1000.0).round() / 1000.0));
        }
        out.insert("total".into(), json!((total * 1000.0).round() / 1000.0));
        serde_json::Value::Object(out)
    }
}

/// The broker's Erlang VM, when it runs on this machine.
pub fn broker_pid() -> Option<u32> {
    let out = std::process::Command::new("pgrep").args(["-o", "beam.smp"]).output().ok()?;
    String::from_utf8_lossy(&out.stdout).trim().parse().ok()
}

/// The environment's control-plane processes (their pid files are in the environment's directory).
pub const CONTROL_PLANE: [&str; 4] = ["kube-apiserver", "etcd", "kube-controller-manager", "sim-node"];

/// CPU seconds of every process of the environment (and some of ours) at one moment.
pub struct CpuSample(Vec<(String, f64)>);

impl CpuSample {
    fn read(dir: &std::path::Path, ours: &[(&str, u32)]) -> Vec<(String, f64)> {
        let mut procs: Vec<(String, u32)> =
            CONTROL_PLANE.iter().filter_map(|n| Some((n.to_string(), env_pid(dir, n)?))).collect();
        procs.extend(broker_pid().map(|pid| ("rabbitmq".to_string(), pid)));
        procs.extend(ours.iter().map(|(n, p)| (n.to_string(), *p)));
        procs.into_iter().map(|(n, p)| (n, cpu_seconds(p))).collect()
    }

    /// Takes a sample.
    pub fn take(dir: &std::path::Path, ours: &[(&str, u32)]) -> Self {
        CpuSample(Self::read(dir, ours))
    }

    /// CPU seconds used by each process since this sample.
    pub fn since(&self, dir: &std::path::Path, ours: &[(&str, u32)]) -> serde_json::Value {
        let now = Self::read(dir, ours);
        let mut out = serde_json::Map::new();
        let mut total = 0.0;
        for (name, after) in now {
            let before = self.0.iter().find(|(n, _)| *n == name).map_or(0.0, |(_, v)| *v);
            total += after - before;
            out.insert(name, json!(((after - before) * 100.0).round() / 100.0));
        }
        out.insert("total".into(), json!((total * 100.0).round() / 100.0));
        serde_json::Value::Object(out)
    }
}
