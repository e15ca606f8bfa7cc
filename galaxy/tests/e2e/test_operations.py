"""What a production Galaxy goes through, against a real Galaxy 26, the worker and RabbitMQ:
the broker restarted while a job runs and while one is submitted, Galaxy restarted while no
worker runs, a cancel from outside Galaxy, and two job handlers. Every assertion is on
Galaxy's own job and dataset state (its API), the tool's own traces (how many times it ran)
and the plugin's log (how many times a job was finished, and by which handler).

Runs after test_galaxy.py on the same worker and Galaxy (the session's stack).
"""

import os
import sqlite3

import pytest
from harness import (
    Broker,
    finishing_lines,
    galaxy_job_number,
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
