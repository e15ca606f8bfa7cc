//! Runs a bound pod's container as a local process group and reports its status like a kubelet.

use std::{process::Stdio, sync::Arc, time::Duration};

use k8s_job_worker_domain::quantity;
use k8s_openapi::api::core::v1::{Container, Pod};
use kube::{
    api::{Api, DeleteParams, Patch, PatchParams},
    ResourceExt,
};
use serde_json::{json, Value};
use tokio::sync::oneshot;

use crate::{logs::log_path, Sim};

/// Annotation that keeps a pod Running without starting a process (for benchmarks).
pub const HOLD_ANNOTATION: &str = "sim-node.k8s-job-worker/hold";
/// Annotation: evict the pod (reason `Evicted`) this many seconds after it starts.
pub const EVICT_ANNOTATION: &str = "sim-node.k8s-job-worker/evict-after-seconds";
/// Annotation: lose the pod's node (reason `NodeLost`) this many seconds after it starts.
pub const LOSE_NODE_ANNOTATION: &str = "sim-node.k8s-job-worker/lose-node-after-seconds";

/// Whether an image reference cannot be parsed (uppercase repository), as the kubelet says.
fn invalid_image(image: &str) -> bool {
    let repo = image.rsplit_once('@').map_or(image, |(r, _)| r);
    let repo = match repo.rsplit_once(':') {
        Some((r, tag)) if !tag.contains('/') => r,
        _ => repo,
    };
    repo.chars().any(|c| c.is_ascii_uppercase())
}

/// Why a container of this image never runs here, as a kubelet would say it.
#[derive(Debug, PartialEq)]
enum Stuck {
    /// The pull fails: ErrImagePull, then ImagePullBackOff.
    Pull,
    /// A fixed waiting reason and message.
    Waiting(&'static str, String),
}

/// Whether (and how) a container of `image` stays waiting, by the simulator's image patterns.
fn stuck(image: &str, pull_fail_pattern: &str, config_error_pattern: &str) -> Option<Stuck> {
    let matches = |pattern: &str| !pattern.is_empty() && image.contains(pattern);
    if invalid_image(image) {
        let message = format!("Failed to apply default image tag \"{image}\": couldn't parse image reference \"{image}\": invalid reference format: repository name must be lowercase");
        Some(Stuck::Waiting("InvalidImageName", message))
    } else if matches(pull_fail_pattern) {
        Some(Stuck::Pull)
    } else if matches(config_error_pattern) {
        Some(Stuck::Waiting("CreateContainerConfigError", "configmap \"galaxy-job-config\" not found".into()))
    } else {
        None
    }
}

/// A disruption planned by annotation: after how long, the pod reason, and its message.
fn planned_disruption(pod: &Pod) -> Option<(Duration, &'static str, String)> {
    let after = |key: &str| pod.annotations().get(key).and_then(|v| v.parse::<u64>().ok()).map(Duration::from_secs);
    if let Some(d) = after(EVICT_ANNOTATION) {
        return Some((d, "Evicted", "The node was low on resource: memory. Container main was using 2Gi.".into()));
    }
    after(LOSE_NODE_ANNOTATION)
        .map(|d| (d, "NodeLost", format!("Node sim-node which was running pod {} is unresponsive", pod.name_any())))
}

fn now() -> String {
    jiff::Timestamp::now().to_string()
}

fn pods_api(sim: &Sim, pod: &Pod) -> Api<Pod> {
    Api::namespaced(sim.client.clone(), &pod.namespace().unwrap_or_default())
}

/// Updates the pod's status, retrying (as a kubelet does) until it lands or the pod is gone.
async fn patch_status(sim: &Sim, pod: &Pod, status: Value) {
    let patch = json!({ "status": status });
    let mut delay = Duration::from_millis(100);
    for _ in 0..120 {
        match pods_api(sim, pod).patch_status(&pod.name_any(), &PatchParams::default(), &Patch::Merge(&patch)).await {
            Ok(_) => return,
            Err(kube::Error::Api(e)) if e.code == 404 => return,
            Err(err) => tracing::warn!(pod = %pod.name_any(), %err, "status update failed; retrying"),
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(2));
    }
}

fn container_status(c: &Container, pod: &Pod, state: Value, ready: bool) -> Value {
    json!({
        "name": c.name, "image": c.image.clone().unwrap_or_default(), "imageID": "",
        "containerID": format!("sim://{}", pod.uid().unwrap_or_default()),
        "ready": ready, "started": ready, "restartCount": 0, "state": state,
    })
}

fn conditions(ready: bool, reason: Option<&str>) -> Value {
    let t = now();
    let r = if ready { "True" } else { "False" };
    json!([
        {"type": "PodScheduled", "status": "True", "lastTransitionTime": t},
        {"type": "Initialized", "status": "True", "lastTransitionTime": t},
        {"type": "ContainersReady", "status": r, "reason": reason, "lastTransitionTime": t},
        {"type": "Ready", "status": r, "reason": reason, "lastTransitionTime": t},
    ])
}

/// Drives one pod from bound to terminated; `stop` fires (or is dropped) when it is deleted.
pub async fn run_pod(sim: Arc<Sim>, pod: Pod, mut stop: oneshot::Receiver<()>) {
    let Some(container) = pod.spec.as_ref().and_then(|s| s.containers.first()).cloned() else {
        return;
    };
    let image = container.image.clone().unwrap_or_default();
    let started = now();
    match stuck(&image, &sim.args.pull_fail_pattern, &sim.args.config_error_pattern) {
        Some(Stuck::Pull) => return keep_waiting(&sim, &pod, &container, &image, stop, None).await,
        Some(Stuck::Waiting(reason, message)) => {
            return keep_waiting(&sim, &pod, &container, &image, stop, Some((reason, message))).await
        }
        None => {}
    }
    let running = |ready| {
        json!({
            "phase": "Running", "hostIP": sim.args.pod_ip, "podIP": sim.args.pod_ip, "startTime": started,
            "conditions": conditions(ready, None),
            "containerStatuses": [container_status(&container, &pod, json!({"running": {"startedAt": started}}), ready)],
        })
    };
    if pod.annotations().get(HOLD_ANNOTATION).map(String::as_str) == Some("true") {
        patch_status(&sim, &pod, running(true)).await;
        let _ = (&mut stop).await;
        return;
    }
    let termination = match spawn(&sim, &pod, &container) {
        Err(err) => Termination { exit_code: 128, reason: "StartError", message: Some(err), pod_reason: None },
        Ok(child) => {
            patch_status(&sim, &pod, running(true)).await;
            let limit = container
                .resources
                .as_ref()
                .and_then(|r| r.limits.as_ref())
                .and_then(|l| l.get("memory"))
                .and_then(|q| quantity::memory_bytes(&q.0));
            let disruption = planned_disruption(&pod);
            match supervise(child, limit, Duration::from_millis(sim.args.memory_sample_ms), disruption, &mut stop).await
            {
                Some(t) => t,
                None => return, // deleted while running: the pod object is going away
            }
        }
    };
    let _ = std::fs::remove_dir_all(staging_dir(&sim, &pod)); // empty files and directories
    let phase = if termination.exit_code == 0 { "Succeeded" } else { "Failed" };
    let state = json!({"terminated": {
        "exitCode": termination.exit_code, "reason": termination.reason, "message": termination.message,
        "startedAt": started, "finishedAt": now(),
        "containerID": format!("sim://{}", pod.uid().unwrap_or_default()),
    }});
    let (pod_reason, pod_message) = termination.pod_reason.clone().map_or((None, None), |(r, m)| (Some(r), Some(m)));
    patch_status(
        &sim,
        &pod,
        json!({
            "phase": phase, "hostIP": sim.args.pod_ip, "podIP": sim.args.pod_ip, "startTime": started,
            "reason": pod_reason, "message": pod_message,
            "conditions": conditions(false, Some("PodCompleted")),
            "containerStatuses": [container_status(&container, &pod, state, false)],
        }),
    )
    .await;
    tracing::info!(pod = %pod.name_any(), exit_code = termination.exit_code, reason = termination.reason, "terminated");
    // The pod stays in `sim.pods` until it is deleted, so late watch events cannot restart it.
    sim.reschedule.notify_one();
}

/// How a container ended.
struct Termination {
    exit_code: i32,
    reason: &'static str,
    message: Option<String>,
    /// Pod-level reason and message (eviction, node loss).
    pod_reason: Option<(&'static str, String)>,
}

fn spawn(sim: &Sim, pod: &Pod, c: &Container) -> Result<tokio::process::Child, String> {
    let mut argv: Vec<String> = c.command.clone().unwrap_or_default();
    argv.extend(c.args.clone().unwrap_or_default());
    let Some((program, rest)) = argv.split_first() else {
        return Err("sim-node runs only containers with a command (it has no images)".into());
    };
    let path = log_path(sim, &pod.namespace().unwrap_or_default(), &pod.name_any(), &c.name);
    let dir = path.parent().ok_or("log path has no parent")?;
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let log = std::fs::File::create(&path).map_err(|e| e.to_string())?;
    let log2 = log.try_clone().map_err(|e| e.to_string())?;
    let workdir = c
        .working_dir
        .as_deref()
        .map(std::path::PathBuf::from)
        .filter(|d| d.is_dir())
        .unwrap_or_else(|| dir.to_path_buf());
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(rest)
        .current_dir(workdir)
        .env_clear()
        .env("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        .env("HOSTNAME", pod.name_any())
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(log2))
        .process_group(0)
        .kill_on_drop(true);
    for var in c.env.iter().flatten() {
        cmd.env(&var.name, var.value.clone().unwrap_or_default());
    }
    if let Some(root) = &sim.args.pvc_root {
        let plan = crate::claims::plan(root, pod, c)?;
        if !plan.binds.is_empty() {
            let staging = staging_dir(sim, pod);
            let cwd = c.working_dir.as_deref().map(std::path::Path::new);
            crate::claims::isolate(&mut cmd, &plan, &staging, cwd).map_err(|e| format!("mounting claims: {e}"))?;
        }
    }
    cmd.spawn().map_err(|e| format!("starting {program}: {e}"))
}

/// Where a pod's claim mounts stop first (see [`crate::claims::isolate`]).
fn staging_dir(sim: &Sim, pod: &Pod) -> std::path::PathBuf {
    sim.args.work_dir.join("mounts").join(pod.uid().unwrap_or_default())
}

/// Waits for the process; kills its group when it exceeds `limit` (OOMKilled) or on `stop`.
/// Returns `None` when stopped by deletion.
async fn supervise(
    mut child: tokio::process::Child,
    limit: Option<u64>,
    sample: Duration,
    disruption: Option<(Duration, &'static str, String)>,
    stop: &mut oneshot::Receiver<()>,
) -> Option<Termination> {
    let pgid = child.id().map(|p| p as i32).unwrap_or(0);
    let mut ticker = tokio::time::interval(sample);
    let disrupt_at =
        tokio::time::Instant::now() + disruption.as_ref().map_or(Duration::from_secs(86400 * 365), |d| d.0);
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(disrupt_at), if disruption.is_some() => {
                kill_group(pgid);
                let _ = child.wait().await;
                let (_, reason, message) = disruption?;
                return Some(Termination { exit_code: 137, reason: "Error", message: None, pod_reason: Some((reason, message)) });
            }
            status = child.wait() => {
                kill_group(pgid);
                let status = status.ok()?;
                use std::os::unix::process::ExitStatusExt;
                let code = status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(9));
                let reason = if code == 0 { "Completed" } else { "Error" };
                return Some(Termination { exit_code: code, reason, message: None, pod_reason: None });
            }
            _ = &mut *stop => {
                kill_group(pgid);
                let _ = child.wait().await;
                return None;
            }
            _ = ticker.tick(), if limit.is_some() => {
                let rss = group_rss(pgid);
                if limit.is_some_and(|l| rss > l) {
                    kill_group(pgid);
                    let _ = child.wait().await;
                    return Some(Termination {
                        exit_code: 137,
                        reason: "OOMKilled",
                        message: Some(format!("memory {rss} bytes exceeded limit {} bytes", limit.unwrap_or(0))),
                        pod_reason: None,
                    });
                }
            }
        }
    }
}

fn kill_group(pgid: i32) {
    if pgid > 0 {
        // SAFETY: kill(2) with a negative pid signals a process group; no memory is touched.
        unsafe {
            libc::kill(-pgid, libc::SIGKILL);
        }
    }
}

/// Resident memory of every process in the group, in bytes.
fn group_rss(pgid: i32) -> u64 {
    let Ok(entries) = std::fs::read_dir("/proc") else { return 0 };
    let page = 4096u64;
    let mut total = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        // Fields after the command name (which may contain spaces) start after the last ')'.
        let Some(after) = stat.rsplit_once(')').map(|(_, rest)| rest) else { continue };
        let fields: Vec<&str> = after.split_whitespace().collect();
        // fields[0] = state, [2] = pgrp, [21] = rss (pages)
        if fields.get(2).and_then(|g| g.parse::<i32>().ok()) == Some(pgid) {
            total += fields.get(21).and_then(|r| r.parse::<u64>().ok()).unwrap_or(0) * page;
        }
    }
    total
}

/// Reports ErrImagePull, then ImagePullBackOff (or a fixed reason such as InvalidImageName or
/// CreateContainerConfigError), until the pod is deleted.
async fn keep_waiting(
    sim: &Sim,
    pod: &Pod,
    c: &Container,
    image: &str,
    mut stop: oneshot::Receiver<()>,
    fixed: Option<(&str, String)>,
) {
    let started = now(); // set once, as a kubelet does: it times the pull failure
    let waiting = |reason: &str, message: String| {
        json!({
            "phase": "Pending", "hostIP": sim.args.pod_ip, "startTime": started,
            "conditions": conditions(false, Some("ContainersNotReady")),
            "containerStatuses": [container_status(c, pod, json!({"waiting": {"reason": reason, "message": message}}), false)],
        })
    };
    if let Some((reason, message)) = fixed {
        patch_status(sim, pod, waiting(reason, message)).await;
        let _ = stop.await;
        return;
    }
    let pull_error =
        format!("rpc error: code = NotFound desc = failed to pull and unpack image \"{image}\": not found");
    patch_status(sim, pod, waiting("ErrImagePull", pull_error.clone())).await;
    let mut backoff = false;
    loop {
        tokio::select! {
            _ = &mut stop => return,
            _ = tokio::time::sleep(Duration::from_secs(5)) => {
                backoff = !backoff;
                let update = if backoff {
                    waiting("ImagePullBackOff", format!("Back-off pulling image \"{image}\""))
                } else {
                    waiting("ErrImagePull", pull_error.clone())
                };
                patch_status(sim, pod, update).await;
            }
        }
    }
}

/// Kills a deleted pod's process and removes the pod object, as a kubelet confirms deletion.
pub async fn finalise_deletion(sim: &Sim, pod: &Pod, uid: &str) {
    if let Some(stop) = sim.pods.lock().await.remove(uid) {
        let _ = stop.send(());
    }
    let dp = DeleteParams { grace_period_seconds: Some(0), ..DeleteParams::default() };
    match pods_api(sim, pod).delete(&pod.name_any(), &dp).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 404 => {}
        Err(err) => tracing::warn!(pod = %pod.name_any(), %err, "final delete failed"),
    }
    let log = log_path(sim, &pod.namespace().unwrap_or_default(), &pod.name_any(), "");
    if let Some(dir) = log.parent() {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// Marks a pod that was Running before this sim-node started as Failed: its process is gone.
pub async fn report_lost(sim: &Sim, pod: &Pod) {
    patch_status(
        sim,
        pod,
        json!({
            "phase": "Failed", "reason": "NodeRestarted",
            "message": "sim-node restarted and the pod's process was lost",
        }),
    )
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_that_never_start() {
        let stuck = |image| stuck(image, "does-not-exist", "config-error");
        assert_eq!(stuck("quay.io/biocontainers/samtools:1.17"), None);
        assert_eq!(stuck("registry.example.org/does-not-exist:1.0"), Some(Stuck::Pull));
        match stuck("registry.example.org/config-error:1.0") {
            Some(Stuck::Waiting(reason, message)) => {
                assert_eq!(reason, "CreateContainerConfigError");
                assert!(message.contains("not found"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(stuck("Registry/BadName:1"), Some(Stuck::Waiting("InvalidImageName", _))));
        assert_eq!(super::stuck("x/config-error:1", "does-not-exist", ""), None, "an empty pattern matches nothing");
    }
}
