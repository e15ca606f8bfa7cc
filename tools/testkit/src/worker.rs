//! The real worker binary as a child process: its environment for one test or run, a start
//! that survives port races, readiness, signals, and where its log goes.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use crate::broker::Names;

/// The repository's root (where `deploy/`, `schemas/` and `scripts/` are).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().expect("repository root")
}

/// The cargo profile directory this program runs from (`target/debug`): test executables
/// live in its `deps/`, the tools directly in it.
pub fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current executable");
    let dir = exe.parent().expect("executable directory");
    if dir.ends_with("deps") {
        dir.parent().expect("profile directory").to_path_buf()
    } else {
        dir.to_path_buf()
    }
}

/// The cargo target directory (`target`).
pub fn target_dir() -> PathBuf {
    let profile = profile_dir();
    profile.parent().map(Path::to_path_buf).unwrap_or(profile)
}

/// The worker binary: `$K8S_JOB_WORKER_BIN`, else the one cargo built beside this program
/// (integration tests of the worker package build it first; the tools are built with it).
pub fn worker_bin() -> PathBuf {
    std::env::var_os("K8S_JOB_WORKER_BIN").map(Into::into).unwrap_or_else(|| profile_dir().join("k8s-job-worker"))
}

/// Where worker logs of the tests go (kept for debugging failures): `$TEST_LOG_DIR`, else
/// `target/test-logs`.
pub fn log_dir() -> PathBuf {
    let dir = std::env::var_os("TEST_LOG_DIR").map(PathBuf::from).unwrap_or_else(|| target_dir().join("test-logs"));
    std::fs::create_dir_all(&dir).expect("log directory");
    dir
}

/// A free TCP port on 127.0.0.1 (another process may take it before it is bound).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("address").port()
}

/// How to run a worker for one test or run.
#[derive(Clone, Debug)]
pub struct WorkerSpec {
    /// The binary.
    pub bin: PathBuf,
    /// Broker URL (a proxy's, in connection-loss tests).
    pub amqp_url: String,
    /// Namespace of the Jobs.
    pub namespace: String,
    /// Queues and exchanges.
    pub names: Names,
    /// `K8S_GALAXY_INSTANCE_ID`, or none (removed from the environment).
    pub instance_id: Option<String>,
    /// More environment variables (they win over the above).
    pub env: Vec<(String, String)>,
    /// More arguments of `run`.
    pub args: Vec<String>,
    /// Where `<worker id>.worker.log` goes.
    pub log_dir: PathBuf,
    /// `RUST_LOG`.
    pub rust_log: String,
}

impl WorkerSpec {
    /// A worker on these queues and namespace, logging at debug level into [`log_dir`].
    pub fn new(amqp_url: &str, namespace: &str, names: Names) -> Self {
        WorkerSpec {
            bin: worker_bin(),
            amqp_url: amqp_url.to_string(),
            namespace: namespace.to_string(),
            names,
            instance_id: None,
            env: Vec::new(),
            args: Vec::new(),
            log_dir: log_dir(),
            rust_log: "info,k8s_job_worker=debug".into(),
        }
    }

    /// The command for one replica (`port` 0: let it choose).
    pub fn command(&self, worker_id: &str, port: u16) -> Command {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true) // a start retried on another port keeps the failed attempt's log
            .open(self.log_dir.join(format!("{worker_id}.worker.log")))
            .expect("worker log");
        let mut cmd = Command::new(&self.bin);
        cmd.args(["--log-format", "json", "run"])
            .env("RUST_LOG", &self.rust_log)
            .env("AMQP_URL", &self.amqp_url)
            .env("K8S_NAMESPACE", &self.namespace)
            .envs(self.names.env())
            .env("HTTP_LISTEN", format!("127.0.0.1:{port}"))
            .env("WORKER_ID", worker_id)
            .env_remove("K8S_GALAXY_INSTANCE_ID")
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(log);
        if let Some(instance) = &self.instance_id {
            cmd.env("K8S_GALAXY_INSTANCE_ID", instance);
        }
        cmd.envs(self.env.iter().cloned());
        cmd
    }

    /// Starts one replica without waiting for it.
    pub fn spawn(&self, worker_id: &str, port: u16) -> std::io::Result<WorkerProcess> {
        let child = self.command(worker_id, port).spawn()?;
        Ok(WorkerProcess { child: Some(child), port, worker_id: worker_id.to_string() })
    }

    /// Starts one replica on a free port and waits until it is ready. Tests run in parallel:
    /// a port can be taken between choosing and binding it, so a worker that exits is
    /// started again on another port, and readiness counts only with this worker's id.
    pub async fn spawn_ready(&self, worker_id: &str) -> WorkerProcess {
        for _ in 0..5 {
            let mut worker = self.spawn(worker_id, free_port()).expect("start worker");
            if worker.wait_ready(Duration::from_secs(30)).await {
                return worker;
            }
            worker.kill();
        }
        panic!("worker {worker_id} exited at start five times (see its log in {})", self.log_dir.display());
    }
}

/// A running worker process; killed when dropped.
pub struct WorkerProcess {
    child: Option<Child>,
    /// Its HTTP port.
    pub port: u16,
    /// Its replica id.
    pub worker_id: String,
}

impl WorkerProcess {
    /// Its process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Sends a signal (SIGSTOP, SIGCONT, SIGTERM...).
    pub fn signal(&self, signal: i32) {
        if let Some(pid) = self.pid() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(pid as i32, signal) };
        }
    }

    /// SIGKILLs it and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends SIGTERM and returns how long it took to exit, and its exit status.
    pub fn terminate(&mut self) -> (Duration, ExitStatus) {
        let started = Instant::now();
        self.signal(libc::SIGTERM);
        let status = self.child.take().expect("worker running").wait().expect("wait for the worker");
        (started.elapsed(), status)
    }

    /// Waits until `/readyz` answers 200 for this replica; false as soon as it exits, or
    /// after `timeout`.
    pub async fn wait_ready(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let ours = format!("worker_id={}\n", self.worker_id);
        loop {
            let exited = self.child.as_mut().is_none_or(|c| c.try_wait().ok().flatten().is_some());
            if exited || Instant::now() >= deadline {
                return false;
            }
            if self.get("/readyz").await.is_some_and(|(code, body)| code == 200 && body.contains(&ours)) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// GET on its HTTP endpoint: status code and body.
    pub async fn get(&self, path: &str) -> Option<(u16, String)> {
        http_get(&format!("http://127.0.0.1:{}{path}", self.port)).await
    }

    /// Its resident memory in KiB (0 when not running).
    pub fn rss_kib(&self) -> u64 {
        self.pid().map_or(0, |pid| proc_status_kib(pid, "VmRSS"))
    }
}

/// A field of `/proc/<pid>/status` in KiB (`VmRSS`, `VmHWM`); 0 when it cannot be read.
pub fn proc_status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.strip_prefix(field).is_some_and(|rest| rest.starts_with(':')))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Minimal HTTP GET on 127.0.0.1 (status code and body).
pub async fn http_get(url: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://")?;
    let (host, path) = rest.split_once('/').map(|(h, p)| (h, format!("/{p}")))?;
    let mut stream = tokio::net::TcpStream::connect(host).await.ok()?;
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut buf = Vec::new();
    stream.read_to_end(&mut buf).await.ok()?;
    let text = String::from_utf8_lossy(&buf).to_string();
    let code = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Some((code, body))
}
