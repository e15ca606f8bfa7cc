"""Real processes for the end-to-end tests, the demo and the benchmark.

:class:`Worker` runs the k8s-job-worker binary against the local environment (its own
namespace and queue names); :class:`GalaxyServer` writes a Galaxy 26 configuration (sqlite,
API only, this plugin as the ``k8s`` runner beside Galaxy's local runner, the tools under
``galaxy/dev/tools``) and runs ``galaxy-web``; :class:`GalaxyAPI` drives Galaxy through its
REST API only. Everything started here is stopped by ``stop()`` (process groups, so the
children go too). Needs ``AMQP_URL``, ``KUBECONFIG`` and ``KUBECTL`` from ``scripts/testenv
env``.
"""

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Optional

import requests
import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
TOOLS = HERE / "tools"
TERMINAL_JOB_STATES = ("ok", "error", "deleted", "failed", "skipped")
ADMIN_EMAIL = "admin@example.org"


#: Galaxy's ``interactivetools_proxy_host`` in the end-to-end stack (and the worker's allowed
#: Ingress domain).
INTERACTIVE_DOMAIN = "its.test"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(condition, what: str, timeout: float, interval: float = 0.25, alive=None):
    """Polls ``condition`` until it returns a true value (returned); fails naming ``what``
    after ``timeout`` seconds, or at once when ``alive()`` says the process died."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if alive is not None and not alive():
            raise RuntimeError(f"{what}: the process exited")
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def spawn(name: str, args: list, env: dict, log_path: Path, cwd=None) -> subprocess.Popen:
    """Starts a process in its own process group, its output appended to ``log_path``, and
    records the group for scripts/lib/galaxy.sh, which stops what is left of it when a run
    is interrupted (GALAXY_HARNESS_PIDS)."""
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            args, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    directory = os.environ.get("GALAXY_HARNESS_PIDS")
    if directory:
        os.makedirs(directory, exist_ok=True)
        process.harness_pid_file = Path(directory, f"{name}.pid")
        process.harness_pid_file.write_text(str(process.pid))
    return process


def ready(url: str) -> bool:
    """Whether ``url`` answers 200 now."""
    try:
        return requests.get(url, timeout=2).status_code == 200
    except requests.RequestException:
        return False


def stop_process(process: Optional[subprocess.Popen], grace: float = 20.0) -> None:
    """SIGTERM to the process group, SIGKILL after ``grace`` seconds."""
    if process is None:
        return
    pid_file = getattr(process, "harness_pid_file", None)
    if pid_file is not None:
        pid_file.unlink(missing_ok=True)
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def kubectl(*args: str) -> str:
    """Runs the environment's kubectl; its output."""
    return subprocess.run(
        [os.environ.get("KUBECTL", "kubectl"), *args], check=True, capture_output=True, text=True
    ).stdout


def http_fetch(target: str) -> Optional[str]:
    """The body ``GET http://<target>/`` answers, or ``None`` when nothing answers."""
    try:
        with urllib.request.urlopen(f"http://{target}/", timeout=5) as response:
            return response.read().decode()
    except OSError:
        return None


def galaxy_job_number(job: dict) -> str:
    """Galaxy's (decoded) job id, from the external id ``galaxy-<instance>-<id>`` (a
    resubmission's ends in ``-a<attempt>``)."""
    return re.sub(r"-a\d+$", "", job["external_id"]).rsplit("-", 1)[-1]


def finishing_lines(galaxy: "GalaxyServer", job: dict) -> list[str]:
    """The plugin's log lines of ``galaxy`` saying it handed the job's terminal event to Galaxy."""
    pattern = re.compile(rf"\({galaxy_job_number(job)}/[^)]*\) \w+ event \(attempt \d+\): (finish|fail)")
    return [line for line in galaxy.log_text().splitlines() if pattern.search(line)]


def process_alive(pid: int) -> bool:
    """Whether ``pid`` is a live (not zombie) process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


class Broker:
    """The environment's RabbitMQ (the one ``AMQP_URL`` names), restarted as an operator
    restarts it (``scripts/testenv restart rabbitmq``: the broker's application stopped, then
    started; durable queues and their messages stay)."""

    def __init__(self, url: Optional[str] = None):
        parsed = urllib.parse.urlparse(url or os.environ["AMQP_URL"])
        self.host, self.port = parsed.hostname or "127.0.0.1", parsed.port or 5672

    def accepts(self) -> bool:
        """Whether the broker takes connections now."""
        try:
            with socket.create_connection((self.host, self.port), timeout=1):
                return True
        except OSError:
            return False

    def restart(self, down_seconds: float) -> subprocess.Popen:
        """Stops the broker now and starts it again after ``down_seconds`` (in the background:
        ``wait()`` on the process returned); returns once it stopped."""
        process = subprocess.Popen(
            [str(ROOT / "scripts" / "testenv"), "restart", "rabbitmq", "--down-seconds", str(down_seconds)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        wait_until(lambda: not self.accepts(), "the broker to stop", 60, alive=lambda: process.poll() is None)
        return process


class Names:
    """Unique names for one run: namespace, queues, exchanges, instance id."""

    def __init__(self, prefix: str = "gxe2e"):
        token = uuid.uuid4().hex[:6]
        self.instance = f"{prefix}-{token}"  # k8s_galaxy_instance_id: <= 20 of [a-z0-9-]
        self.namespace = f"{prefix}-{token}"
        base = f"{prefix}.{token}"
        self.request_queue = f"{base}.requests"
        self.control_queue = f"{base}.control"
        self.result_exchange = f"{base}.events"
        self.dead_letter_exchange = f"{base}.dead-letter"
        self.dead_letter_queue = f"{base}.dead-letter"
        # Galaxy's data directory as a claim (sim-node finds it under SIM_NODE_PVC_ROOT), mounted
        # per job: each job's working directory and datasets as sub-paths
        self.claim = f"{prefix}-{token}-data"


class Worker:
    """The k8s-job-worker binary, run as scripts/test's integration tests run it."""

    def __init__(self, names: Names, log_dir: Path, binary: Optional[str] = None):
        self.names = names
        self.log_path = log_dir / f"worker-{names.instance}.log"
        target = os.environ.get("CARGO_TARGET_DIR", str(ROOT / "target"))
        self.binary = binary or os.environ.get("K8S_JOB_WORKER_BIN") or f"{target}/debug/k8s-job-worker"
        self.process: Optional[subprocess.Popen] = None
        self.port = 0

    def env(self) -> dict:
        """The worker's environment (its namespace, instance id and broker names), for ``run``
        and for its other subcommands."""
        return dict(
            os.environ,
            RUST_LOG="info,k8s_job_worker=debug",
            K8S_NAMESPACE=self.names.namespace,
            K8S_GALAXY_INSTANCE_ID=self.names.instance,
            AMQP_REQUEST_QUEUE=self.names.request_queue,
            AMQP_CONTROL_QUEUE=self.names.control_queue,
            AMQP_RESULT_EXCHANGE=self.names.result_exchange,
            AMQP_DEAD_LETTER_EXCHANGE=self.names.dead_letter_exchange,
            AMQP_DEAD_LETTER_QUEUE=self.names.dead_letter_queue,
            AMQP_DEAD_LETTER_INBOX=f"{self.names.dead_letter_queue}.inbox",
            HTTP_LISTEN=f"127.0.0.1:{self.port}",
            WORKER_ID=f"{self.names.instance}-worker",
            # Galaxy's per-job mounts: its job directories and datasets, never the whole claim
            POLICY_ALLOWED_PVCS=f"{self.names.claim}/jobs_directory,{self.names.claim}/objects",
            POLICY_ALLOWED_INGRESS_DOMAINS=INTERACTIVE_DOMAIN,
        )

    def cli(self, *args: str) -> str:
        """Runs one of the worker's other subcommands (``cancel``, ``release``...) with its
        environment; its output."""
        return subprocess.run([self.binary, "--log-format", "text", *args], env=self.env(), check=True,
                              capture_output=True, text=True, timeout=120).stdout

    def start(self) -> "Worker":
        """Creates the namespace (unless it exists), starts the worker, waits for /readyz."""
        if self.names.namespace not in kubectl("get", "namespaces", "-o", "name"):
            kubectl("create", "namespace", self.names.namespace)
        self.port = free_port()
        self.process = spawn(f"worker-{self.names.instance}", [self.binary, "--log-format", "json", "run"],
                             self.env(), self.log_path)
        wait_until(lambda: ready(f"http://127.0.0.1:{self.port}/readyz"), "the worker's /readyz", 60,
                   alive=lambda: self.process.poll() is None)
        return self

    def stop(self, delete_namespace: bool = True) -> None:
        """Stops the worker and (unless told otherwise) removes its namespace."""
        stop_process(self.process, grace=30)
        self.process = None
        if delete_namespace:
            # Jobs the worker still holds with its finalizer (claimed, never reported) would
            # keep the namespace Terminating: let them go as an operator uninstalling does.
            try:
                self.cli("release")
            except subprocess.CalledProcessError as e:
                print(f"k8s-job-worker release failed: {e.stderr}", file=sys.stderr)
            subprocess.run(
                [os.environ.get("KUBECTL", "kubectl"), "delete", "namespace", self.names.namespace, "--wait=false"],
                capture_output=True,
            )

    def kube_object(self, kind: str, name: str) -> Optional[dict]:
        """One object of the worker's namespace as JSON, or ``None`` when there is none."""
        try:
            return json.loads(kubectl("get", kind, name, "-n", self.names.namespace, "-o", "json"))
        except subprocess.CalledProcessError:
            return None

    def service_target(self, name: str) -> Optional[str]:
        """``ip:port`` of the Service ``name``'s first ready endpoint, or ``None``."""
        endpoints = self.kube_object("endpoints", name) or {}
        for subset in endpoints.get("subsets") or []:
            for address in subset.get("addresses") or []:
                return f"{address['ip']}:{subset['ports'][0]['port']}"
        return None

    def kube_jobs_all(self, galaxy_job_id) -> list:
        """The Kubernetes Jobs of one Galaxy job, records of finished ones included."""
        selector = f"k8s-job-worker/instance-id={self.names.instance},k8s-job-worker/galaxy-job-id={galaxy_job_id}"
        out = kubectl("get", "jobs", "-n", self.names.namespace, "-l", selector, "-o", "json")
        return json.loads(out)["items"]

    def kube_jobs(self, galaxy_job_id=None) -> list:
        """The live Kubernetes Jobs of this instance (optionally of one Galaxy job); a finished
        job's Job kept as a record of its outcome does not count."""
        selector = f"k8s-job-worker/instance-id={self.names.instance},!k8s-job-worker/record"
        if galaxy_job_id is not None:
            selector += f",k8s-job-worker/galaxy-job-id={galaxy_job_id}"
        out = kubectl("get", "jobs", "-n", self.names.namespace, "-l", selector, "-o", "json")
        return json.loads(out)["items"]


class GalaxyServer:
    """One Galaxy 26 server (``galaxy-web``, API only, sqlite) configured for this plugin."""

    def __init__(self, names: Names, directory: Path, log_dir: Path, extra_runner_params=None,
                 server_name: str = "main", configure: bool = True):
        self.names = names
        self.server_name = server_name
        self.directory = directory
        self.log_dir = log_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.bootstrap_key = secrets.token_hex(16)
        self.process: Optional[subprocess.Popen] = None
        self.starts = 0
        self.extra_runner_params = extra_runner_params or {}
        self.marker_dir = directory / "markers"
        if configure:
            self._configure()
        else:
            self._write_galaxy_yml()

    def sibling(self, server_name: str) -> "GalaxyServer":
        """A second Galaxy server (a second job handler, ``server_name``) sharing this one's
        database, files and job configuration: a job is handled by the server that created it
        (``db-self``), and each server recovers its own jobs."""
        other = GalaxyServer(self.names, self.directory, self.log_dir, self.extra_runner_params,
                             server_name=server_name, configure=False)
        other.bootstrap_key = self.bootstrap_key
        other.id_secret = self.id_secret
        other._write_galaxy_yml()
        return other

    @property
    def galaxy_yml(self) -> Path:
        """This server's Galaxy configuration file."""
        return self.directory / ("galaxy.yml" if self.server_name == "main" else f"galaxy-{self.server_name}.yml")

    @property
    def log_path(self) -> Path:
        """Galaxy's log of the current (last) start."""
        return self.log_dir / f"galaxy-{self.names.instance}-{self._log_tag()}{self.starts}.log"

    def _log_tag(self) -> str:
        return "" if self.server_name == "main" else f"{self.server_name}-"

    def _write_galaxy_yml(self) -> None:
        import galaxy.tools

        bundled = Path(galaxy.tools.__file__).parent / "bundled"
        data = self.directory / "data"
        if not hasattr(self, "id_secret"):
            self.id_secret = secrets.token_hex(16)
        config = {
            "galaxy": {
                "server_name": self.server_name,
                "data_dir": str(data),
                "database_connection": f"sqlite:///{data}/universe.sqlite?isolation_level=IMMEDIATE",
                "job_config_file": str(self.directory / "job_conf.yml"),
                "tool_config_file": str(self.directory / "tool_conf.xml"),
                "tool_path": str(bundled),
                "enable_celery_tasks": False,
                "conda_auto_init": False,
                "conda_auto_install": False,
                "tool_dependency_dir": "none",
                "involucro_auto_init": False,
                "enable_mulled_containers": False,
                "watch_tools": "false",
                "admin_users": ADMIN_EMAIL,
                "bootstrap_admin_api_key": self.bootstrap_key,
                "id_secret": self.id_secret,
                "allow_user_creation": True,
                "require_login": False,
                "cleanup_job": "never",
                # interactive tools: entry points under this domain (the worker's policy admits
                # it), routed by the worker's Ingress; the e2e test reaches the tool through its
                # Service's endpoints
                "interactivetools_enable": True,
                "interactivetools_proxy_host": INTERACTIVE_DOMAIN,
                # entry point URLs on that domain (the Ingress's), as Galaxy's Helm chart has it
                "interactivetools_upstream_proxy": False,
                "monitor_thread_join_timeout": 5,
                "job_handler_monitor_sleep": 0.2,
                "job_runner_monitor_sleep": 0.2,
                "logging": {
                    "version": 1,
                    "disable_existing_loggers": False,
                    "root": {"level": "INFO", "handlers": ["console"]},
                    "loggers": {
                        "k8s_job_worker_galaxy": {"level": "DEBUG"},
                        "galaxy.jobs.runners": {"level": "DEBUG"},
                    },
                    "handlers": {
                        "console": {"class": "logging.StreamHandler", "formatter": "stack", "level": "DEBUG",
                                    "stream": "ext://sys.stderr"},
                    },
                    "formatters": {
                        "stack": {"format": "%(asctime)s %(levelname)-5s %(threadName)s [%(name)s] %(message)s"},
                    },
                },
            }
        }
        self.galaxy_yml.write_text(yaml.safe_dump(config))

    def _configure(self) -> None:
        import galaxy.tools

        bundled = Path(galaxy.tools.__file__).parent / "bundled"
        for path in (self.data_dir, self.marker_dir):
            path.mkdir(parents=True, exist_ok=True)
        self.claim_storage()
        self._write_galaxy_yml()
        (self.directory / "job_conf.yml").write_text(yaml.safe_dump(self.job_conf()))
        # cat1 again under another id, mapped to Galaxy's local runner (the benchmark's baseline)
        cat_local = self.directory / "cat_local.xml"
        cat_local.write_text((bundled / "filters" / "catWrapper.xml").read_text().replace('id="cat1"', 'id="cat1_local"', 1))
        tool_files = [*sorted(TOOLS.glob("*.xml")), cat_local]
        tools = "\n".join(f'    <tool file="{path}"/>' for path in tool_files)
        (self.directory / "tool_conf.xml").write_text(
            f"""<?xml version="1.0"?>
<toolbox>
  <section id="getext" name="Get Data">
    <tool file="data_source/upload.xml"/>
  </section>
  <section id="textutil" name="Text">
    <tool file="filters/catWrapper.xml"/>
{tools}
  </section>
</toolbox>
"""
        )

    @property
    def data_dir(self) -> Path:
        """Galaxy's data directory (the claim of its per-job mounts)."""
        return self.directory / "data"

    def claim_storage(self) -> bool:
        """Makes the data directory the claim sim-node mounts from (a link under
        ``SIM_NODE_PVC_ROOT``); whether sim-node isolates pods (it does as root)."""
        root = os.environ.get("SIM_NODE_PVC_ROOT")
        if not root:
            return False
        link = Path(root, self.names.claim)
        if not link.is_symlink():
            link.symlink_to(self.data_dir.resolve(), target_is_directory=True)
        return True

    def job_conf(self) -> dict:
        """Galaxy's job configuration: the plugin as runner ``k8s`` (each job mounting only its
        own working directory and datasets, as Galaxy's runner does with
        ``k8s_working_volume_claim`` / ``k8s_data_volume_claim``), the local runner for uploads
        and for the benchmark's comparison."""
        claim = f"{self.names.claim}:{self.data_dir.resolve()}"
        k8s = {
            "load": "k8s_job_worker_galaxy.runner:K8sJobWorkerJobRunner",
            "workers": 4,
            "amqp_url": os.environ["AMQP_URL"],
            "amqp_request_queue": self.names.request_queue,
            "amqp_control_queue": self.names.control_queue,
            "amqp_result_exchange": self.names.result_exchange,
            "k8s_galaxy_instance_id": self.names.instance,
            "max_pod_retries": 0,
            "k8s_working_volume_claim": claim,
            "k8s_data_volume_claim": claim,
            **self.extra_runner_params,
        }
        return {
            # a job is handled by the server that created it (the tests start a second one)
            "handling": {"assign": ["db-self"]},
            "runners": {
                "local": {"load": "galaxy.jobs.runners.local:LocalJobRunner", "workers": 4},
                "k8s": k8s,
                # the same plugin pointed at a request queue nobody declared (and an instance
                # id no worker serves): its jobs must fail visibly, not vanish
                "k8s_no_queue": {
                    **k8s,
                    "workers": 1,
                    "amqp_request_queue": f"{self.names.request_queue}.missing",
                    "k8s_galaxy_instance_id": f"{self.names.instance}-nq",
                },
            },
            "execution": {
                "default": "k8s",
                "environments": {
                    "k8s": {"runner": "k8s"},
                    "local": {"runner": "local"},
                    "k8s_small": {
                        "runner": "k8s",
                        "limits_memory": "100M",
                        "resubmit": [{"condition": "memory_limit_reached", "environment": "k8s_bigger"}],
                    },
                    "k8s_bigger": {"runner": "k8s", "limits_memory": "1G"},
                    "k8s_walltime": {"runner": "k8s", "k8s_walltime_limit": 3},
                    "k8s_no_queue": {"runner": "k8s_no_queue"},
                },
            },
            "tools": [
                {"id": "upload1", "environment": "local"},
                {"id": "__DATA_FETCH__", "environment": "local"},
                {"id": "cat1_local", "environment": "local"},
                {"id": "e2e_oom", "environment": "k8s_small"},
                {"id": "e2e_walltime", "environment": "k8s_walltime"},
                {"id": "e2e_echo", "environment": "k8s_no_queue"},
            ],
        }

    def start(self, timeout: float = 240) -> "GalaxyServer":
        """Starts galaxy-web and waits until its API answers."""
        self.starts += 1
        env = dict(os.environ, GALAXY_CONFIG_FILE=str(self.galaxy_yml))
        env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
        galaxy_web = [str(Path(sys.executable).parent / "galaxy-web"), "-c", str(self.galaxy_yml),
                      "-b", f"127.0.0.1:{self.port}"]
        self.process = spawn(f"galaxy-{self.names.instance}-{self._log_tag()}", galaxy_web, env, self.log_path,
                             cwd=self.directory)
        wait_until(lambda: ready(f"{self.url}/api/version"), f"Galaxy at {self.url} (log {self.log_path})", timeout,
                   interval=0.5, alive=lambda: self.process.poll() is None)
        return self

    def stop(self) -> None:
        """Stops Galaxy (SIGTERM to its process group)."""
        stop_process(self.process, grace=30)
        self.process = None

    def log_text(self) -> str:
        """Everything Galaxy logged, over all its starts."""
        return "".join(
            (self.log_dir / f"galaxy-{self.names.instance}-{self._log_tag()}{n}.log").read_text(errors="replace")
            for n in range(1, self.starts + 1)
        )

    def api(self) -> "GalaxyAPI":
        """An API client with a new admin user's key (created with the bootstrap key)."""
        bootstrap = GalaxyAPI(self.url, self.bootstrap_key)
        user = bootstrap.post("users", {"username": "admin", "email": ADMIN_EMAIL, "password": secrets.token_hex(8)})
        key = bootstrap.post(f"users/{user['id']}/api_key", {})
        return GalaxyAPI(self.url, key)


class GalaxyAPI:
    """A small client of Galaxy's REST API."""

    def __init__(self, url: str, key: str):
        self.url = url
        self.session = requests.Session()
        self.session.headers["x-api-key"] = key

    def at(self, url: str) -> "GalaxyAPI":
        """The same user's client of another server sharing the database (a sibling)."""
        return GalaxyAPI(url, self.session.headers["x-api-key"])

    def _check(self, response):
        if response.status_code >= 400:
            raise RuntimeError(f"{response.request.method} {response.url}: {response.status_code} {response.text}")
        return response.json() if response.content else None

    def get(self, path: str, **params):
        """GET /api/<path>."""
        return self._check(self.session.get(f"{self.url}/api/{path}", params=params, timeout=60))

    def post(self, path: str, payload: dict):
        """POST /api/<path> with a JSON body."""
        return self._check(self.session.post(f"{self.url}/api/{path}", json=payload, timeout=60))

    def delete(self, path: str):
        """DELETE /api/<path>."""
        return self._check(self.session.delete(f"{self.url}/api/{path}", timeout=60))

    def history(self, name: str) -> str:
        """A new history; its id."""
        return self.post("histories", {"name": name})["id"]

    def upload(self, history_id: str, content: str, ext: str = "txt") -> str:
        """Uploads pasted ``content`` (Galaxy's fetch API); the new dataset's id."""
        response = self.post(
            "tools/fetch",
            {
                "history_id": history_id,
                "targets": [{"destination": {"type": "hdas"},
                             "elements": [{"src": "pasted", "paste_content": content, "ext": ext}]}],
            },
        )
        return response["outputs"][0]["id"]

    def run_tool(self, history_id: str, tool_id: str, inputs: dict) -> tuple[str, list[str]]:
        """Runs a tool; its job id and output dataset ids."""
        response = self.post("tools", {"history_id": history_id, "tool_id": tool_id, "inputs": inputs})
        return response["jobs"][0]["id"], [output["id"] for output in response["outputs"]]

    def job(self, job_id: str) -> dict:
        """The job, with Galaxy's full details."""
        return self.get(f"jobs/{job_id}", full="true")

    def wait_job(self, job_id: str, timeout: float = 180, states=TERMINAL_JOB_STATES) -> dict:
        """Waits until the job is in one of ``states``; the job."""
        return wait_until(lambda: (j := self.job(job_id))["state"] in states and j, f"job {job_id} in {states}",
                          timeout, interval=0.2)

    def wait_dataset(self, dataset_id: str, timeout: float = 180) -> dict:
        """Waits until the dataset is ok or in error; the dataset."""
        return wait_until(
            lambda: (d := self.get(f"datasets/{dataset_id}"))["state"] in ("ok", "error", "failed_metadata") and d,
            f"dataset {dataset_id}", timeout, interval=0.2)

    def history_with(self, name: str, content: str) -> tuple[str, str]:
        """A new history with one uploaded dataset of ``content`` (uploads run on Galaxy's
        local runner), once it is ok; the history's and the dataset's ids."""
        history_id = self.history(name)
        dataset_id = self.upload(history_id, content)
        dataset = self.wait_dataset(dataset_id)
        assert dataset["state"] == "ok", dataset
        return history_id, dataset_id

    def content(self, dataset_id: str) -> str:
        """The dataset's content."""
        response = self.session.get(f"{self.url}/api/datasets/{dataset_id}/display", params={"preview": "false"},
                                    timeout=60)
        response.raise_for_status()
        return response.text


def log_dir() -> Path:
    """target/test-logs/galaxy (created)."""
    directory = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target")) / "test-logs" / "galaxy"
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def fresh_directory(name: str) -> Path:
    """An empty directory for one Galaxy server's configuration and data."""
    directory = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target")) / "galaxy-runs" / name
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    return directory
