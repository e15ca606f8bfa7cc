"""What a production Galaxy goes through, against a real Galaxy 26, the worker and RabbitMQ:
the broker restarted while a job runs and while one is submitted, Galaxy restarted while no
worker runs, a cancel from outside Galaxy, and two job handlers. Every assertion is on
Galaxy's own job and dataset state (its API), the tool's own traces (how many times it ran)
and the plugin's log (how many times a job was finished, and by which handler).

Runs after test_galaxy.py on the same worker and Galaxy (the session's stack).
"""

import os
import sqlite3
import urllib.parse

import pytest
from harness import (
    Broker,
    finishing_lines,
    free_port,
    galaxy_job_number,
    http_fetch,
    INTERACTIVE_DOMAIN,
    process_alive,
    wait_until,
)

CONTENT = "one\ntwo\n"


@pytest.fixture(scope="module")
def history(stack):
    """A history with one uploaded dataset."""
    return stack.api.history_with("operations", CONTENT)


@pytest.fixture(scope="module")
def broker():
    """The environment's RabbitMQ."""
    return Broker()


def runs(marker) -> list[str]:
    """The lines e2e_count appended to ``<marker>.runs``: one per run of the job script."""
    path = f"{marker}.runs"
    return open(path).read().splitlines() if os.path.exists(path) else []


def start_waiting_job(stack, history_id: str, marker):
    """An e2e_wait job, running (its tool started); its job id and output dataset id."""
    job_id, (output,) = stack.api.run_tool(history_id, "e2e_wait", {"marker": str(marker)})
    stack.api.wait_job(job_id, states=("running",))
    wait_until(lambda: os.path.exists(f"{marker}.pid"), "the tool to start", 60)
    return job_id, output


def request_published(galaxy, job_id: str, api) -> bool:
    """Whether the plugin of ``galaxy`` logged that the broker took the job's request."""
    external_id = api.job(job_id).get("external_id")
    return bool(external_id) and f"/{external_id}) request accepted by the broker" in galaxy.log_text()


def test_8_a_broker_restart_while_a_job_runs_and_ends(stack, history, broker):
    history_id, _ = history
    marker = stack.galaxy.marker_dir / "ends-while-broker-away"
    job_id, output = start_waiting_job(stack, history_id, marker)
    restart = broker.restart(down_seconds=10)
    # the tool ends while the broker is away: the worker's event waits for it to come back
    (marker.parent / f"{marker.name}.release").touch()
    wait_until(lambda: os.path.exists(f"{marker}.done"), "the tool to end", 60)
    assert restart.wait(120) == 0, restart.stdout.read()
    job = stack.api.wait_job(job_id, timeout=240)
    assert job["state"] == "ok", job
    assert stack.api.content(output) == "released\n"
    assert len(finishing_lines(stack.galaxy, job)) == 1, finishing_lines(stack.galaxy, job)


def test_9_a_job_submitted_while_the_broker_is_down_runs_once_it_is_back(stack, history, broker):
    history_id, _ = history
    marker = stack.galaxy.marker_dir / "submitted-while-broker-away"
    holding = "the broker does not accept messages"
    held_before = stack.galaxy.log_text().count(holding)
    restart = broker.restart(down_seconds=15)
    job_id, (output,) = stack.api.run_tool(history_id, "e2e_count", {"marker": str(marker), "text": "late"})
    # Galaxy queued it and the plugin holds its request (the broker refuses connections)
    wait_until(lambda: stack.galaxy.log_text().count(holding) > held_before, "the plugin to hold the request", 30)
    assert stack.api.job(job_id)["state"] in ("new", "queued"), stack.api.job(job_id)
    assert restart.wait(120) == 0, restart.stdout.read()
    job = stack.api.wait_job(job_id, timeout=240)
    assert job["state"] == "ok", job
    assert stack.api.content(output) == "late\n"
    assert runs(marker) == ["run"]
    assert len(finishing_lines(stack.galaxy, job)) == 1, finishing_lines(stack.galaxy, job)


def test_10_galaxy_restarted_while_no_worker_runs(stack, history):
    history_id, _ = history
    stack.worker.stop(delete_namespace=False)
    try:
        markers = [stack.galaxy.marker_dir / f"while-no-worker-{n}" for n in range(3)]
        jobs = [stack.api.run_tool(history_id, "e2e_count", {"marker": str(m), "text": f"job {n}"})
                for n, m in enumerate(markers)]
        for job_id, _ in jobs:
            wait_until(lambda: request_published(stack.galaxy, job_id, stack.api), "the request to be published", 60)
        # a deploy: Galaxy restarts and recovers its queued jobs (it asks their status; nobody
        # answers until a worker starts, and the requests still wait in their queue)
        stack.galaxy.stop()
        stack.galaxy.start()
    finally:
        stack.worker.start()
    for n, ((job_id, (output,)), marker) in enumerate(zip(jobs, markers)):
        job = stack.api.wait_job(job_id, timeout=240)
        assert job["state"] == "ok", job
        assert stack.api.content(output) == f"job {n}\n"
        assert runs(marker) == ["run"], f"the tool ran {len(runs(marker))} times"
        assert len(finishing_lines(stack.galaxy, job)) == 1, finishing_lines(stack.galaxy, job)


def test_11_a_cancel_from_outside_galaxy_fails_the_job_with_the_reason(stack, history):
    history_id, _ = history
    marker = stack.galaxy.marker_dir / "cancelled-outside"
    job_id, output = start_waiting_job(stack, history_id, marker)
    pid = int(open(f"{marker}.pid").read().strip())
    number = galaxy_job_number(stack.api.job(job_id))
    stack.worker.cli("cancel", "--job-id", number, "--reason", "the node is drained for maintenance")
    job = stack.api.wait_job(job_id, timeout=120)
    assert job["state"] == "error", job
    info = stack.api.wait_dataset(output)["misc_info"]
    assert "cancelled outside Galaxy" in info and "the node is drained for maintenance" in info, info
    wait_until(lambda: not process_alive(pid), f"the tool process {pid} to be killed", 60)
    wait_until(lambda: not stack.worker.kube_jobs(number), "the Kubernetes Job to go", 60)


def handler_of(galaxy, job_id: str) -> str:
    """The job's handler, as Galaxy's database has it."""
    with sqlite3.connect(galaxy.directory / "data" / "universe.sqlite") as db:
        return db.execute("SELECT handler FROM job WHERE id = ?", (int(job_id),)).fetchone()[0]


def test_12_two_handlers_each_finish_their_own_jobs_once(stack, history):
    history_id, dataset_id = history
    second = stack.galaxy.sibling("handler_b").start()
    try:
        api_b = stack.api.at(second.url)
        servers = {stack.galaxy.server_name: (stack.galaxy, stack.api), second.server_name: (second, api_b)}
        submitted = [
            (name, *api.run_tool(history_id, "cat1", {"input1": {"src": "hda", "id": dataset_id}}))
            for name, (_, api) in servers.items()
            for _ in range(3)
        ]
        for name, job_id, (output,) in submitted:
            galaxy, api = servers[name]
            job = api.wait_job(job_id, timeout=240)
            assert job["state"] == "ok", job
            assert api.content(output) == CONTENT
            number = galaxy_job_number(job)
            assert handler_of(galaxy, number) == name
            (other,) = [g for n, (g, _) in servers.items() if n != name]
            assert len(finishing_lines(galaxy, job)) == 1, finishing_lines(galaxy, job)
            assert finishing_lines(other, job) == []
            # its events never reached the other handler's queue
            received = [line for line in other.log_text().splitlines() if f"({number}) " in line and "event received" in line]
            assert received == []
    finally:
        second.stop()


def test_13_a_job_sees_its_own_files_not_another_jobs_working_directory(stack, history):
    """Per-job volumes (``k8s_working_volume_claim`` / ``k8s_data_volume_claim``): every job of
    this stack mounts only its working directory and its datasets from Galaxy's data claim.
    A job pointed at another job's script cannot read it; the file is there for Galaxy."""
    if not os.environ.get("SIM_NODE_PVC_ROOT"):
        pytest.skip("sim-node mounts claims only as root (SIM_NODE_PVC_ROOT unset): nothing isolates pods here")
    history_id, dataset_id = history
    # another job's working directory: a cat1 run's, with its job script
    other_id, (other_output,) = stack.api.run_tool(history_id, "cat1", {"input1": {"src": "hda", "id": dataset_id}})
    other = stack.api.wait_job(other_id)
    assert other["state"] == "ok", other  # it read its input and wrote its output through its own mounts
    number = galaxy_job_number(other)
    (script,) = stack.galaxy.data_dir.glob(f"jobs_directory/*/{number}/galaxy_{number}.sh")
    assert script.exists()
    job_id, (output,) = stack.api.run_tool(history_id, "e2e_peek", {"path": str(script)})
    job = stack.api.wait_job(job_id)
    assert job["state"] == "error", job
    assert "No such file or directory" in job["tool_stderr"], job["tool_stderr"]
    # the worker mounted sub-paths of the claim, never the claim itself
    (kube_job,) = [j for j in stack.worker.kube_jobs_all(galaxy_job_number(job))]
    mounts = kube_job["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
    assert mounts and all(m.get("subPath", "").startswith(("jobs_directory/", "objects/")) for m in mounts), mounts


def test_14_an_interactive_tool_is_reachable_at_its_entry_point_until_it_is_stopped(stack, history):
    """Issue 25, interactive tools: Galaxy configures the job's entry point (as its own
    Kubernetes runner does), the worker makes a Service and an Ingress routing the entry
    point's domain to the tool, and the tool answers through the Service; stopping the tool
    from Galaxy (its entry point's stop) stops the process, removes both and finishes the job
    (as Galaxy's runner finishes a stopped interactive tool)."""
    history_id, _ = history
    port = free_port()
    job_id, _ = stack.api.run_tool(history_id, "e2e_interactive", {"port": port})
    stack.api.wait_job(job_id, states=("running",))
    (entry_point,) = wait_until(
        lambda: [ep for ep in stack.api.get("entry_points", job_id=job_id) if ep.get("target")],
        "Galaxy to configure the entry point",
        60,
    )
    assert entry_point["active"], entry_point
    host = urllib.parse.urlsplit(entry_point["target"]).hostname
    assert host.endswith(f".{INTERACTIVE_DOMAIN}"), entry_point
    # the worker's Service and Ingress, owned by the job's Kubernetes Job
    (kube_job,) = stack.worker.kube_jobs(galaxy_job_number(stack.api.job(job_id)))
    name, worker = kube_job["metadata"]["name"], stack.worker
    service, ingress = worker.kube_object("service", name), worker.kube_object("ingress", name)
    for made in (service, ingress):
        assert made and made["metadata"]["ownerReferences"][0]["uid"] == kube_job["metadata"]["uid"], made
    assert [p["port"] for p in service["spec"]["ports"]] == [port]
    (rule,) = ingress["spec"]["rules"]
    assert rule["host"] == host, (rule, entry_point)
    assert rule["http"]["paths"][0]["backend"]["service"] == {"name": name, "port": {"number": port}}
    # the tool answers through the Service, and knows its domain
    target = wait_until(lambda: worker.service_target(name), "the Service's ready endpoint", 60)
    page = wait_until(lambda: http_fetch(target), "the tool to answer", 60)
    assert page.strip() == f"hello from {host}", page
    # stopped from Galaxy (the entry point's stop): the job ends, the tool stops, routes go
    stack.api.delete(f"entry_points/{entry_point['id']}")
    wait_until(lambda: http_fetch(target) is None, "the tool to stop", 60)
    wait_until(
        lambda: worker.kube_object("service", name) is None and worker.kube_object("ingress", name) is None,
        "the Service and Ingress to go",
        60,
    )
    # finished as Galaxy's runner finishes a stopped interactive tool: what it wrote is kept
    job = stack.api.wait_job(job_id)
    assert job["state"] == "ok", job
    assert not [ep for ep in stack.api.get("entry_points", job_id=job_id) if ep.get("active")]
