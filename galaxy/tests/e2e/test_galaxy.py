"""A real Galaxy 26 server runs tools through the plugin, the worker and Kubernetes; every
assertion is on Galaxy's own job and dataset state through its API.

The jobs of cases 1–6 are submitted together (one Galaxy, jobs in parallel); case 7
restarts Galaxy and runs last.
"""

import os
import re

import pytest
from harness import (
    finishing_lines,
    galaxy_job_number,
    process_alive,
    wait_until,
)

CONTENT = "chr1\t100\t200\nchr2\t300\t400\n"


@pytest.fixture(scope="module")
def history(stack):
    """A history with one uploaded dataset."""
    return stack.api.history_with("e2e", CONTENT)


@pytest.fixture(scope="module")
def submitted(stack, history):
    """Cases 1–6 submitted at once: {case: (job id, output dataset ids)}."""
    history_id, dataset_id = history
    marker = stack.galaxy.marker_dir / "deleted-while-running"
    return {
        "cat1": stack.api.run_tool(history_id, "cat1", {"input1": {"src": "hda", "id": dataset_id}}),
        "oom": stack.api.run_tool(history_id, "e2e_oom", {}),
        "walltime": stack.api.run_tool(history_id, "e2e_walltime", {}),
        "fail": stack.api.run_tool(history_id, "e2e_fail", {}),
        "delete": stack.api.run_tool(history_id, "e2e_wait", {"marker": str(marker)}),  # never released
        "delete_marker": marker,
        "no_queue": stack.api.run_tool(history_id, "e2e_echo", {"text": "lost?"}),
    }


def test_1_cat1_on_an_uploaded_dataset(stack, submitted):
    job_id, (output,) = submitted["cat1"]
    job = stack.api.wait_job(job_id)
    assert job["state"] == "ok", job
    assert stack.api.wait_dataset(output)["state"] == "ok"
    assert stack.api.content(output) == CONTENT
    assert job["external_id"].startswith(f"galaxy-{stack.names.instance}-")


def test_2_oom_is_resubmitted_to_the_bigger_destination(stack, submitted):
    job_id, (output,) = submitted["oom"]
    job = stack.api.wait_job(job_id, timeout=240)
    assert job["state"] == "ok", job
    assert stack.api.content(output) == "done with 300 MB\n"
    assert job["external_id"].endswith("-a2")  # the second attempt ran it
    # the first attempt was OOM killed on the 100 MB destination, then resubmitted
    log = stack.galaxy.log_text()
    assert re.search(rf"\({galaxy_job_number(job)}/galaxy-\S+-{galaxy_job_number(job)}\) oom_killed event \(attempt 1\): fail", log)
    assert "resubmitted to 'k8s_bigger'" in log or "Job will be resubmitted to 'k8s_bigger'" in log


def test_3_walltime_fails_the_job_with_the_reason(stack, submitted):
    job_id, (output,) = submitted["walltime"]
    job = stack.api.wait_job(job_id)
    assert job["state"] == "error", job
    dataset = stack.api.wait_dataset(output)
    assert dataset["state"] == "error"
    assert "walltime" in dataset["misc_info"], dataset["misc_info"]


def test_4_a_tool_exiting_non_zero_fails_with_its_stderr(stack, submitted):
    job_id, (output,) = submitted["fail"]
    job = stack.api.wait_job(job_id)
    assert job["state"] == "error", job
    assert job["exit_code"] == 3
    assert "input file is empty: nothing to align" in job["tool_stderr"]
    assert stack.api.wait_dataset(output)["state"] == "error"


def test_5_deleting_a_running_job_kills_its_process(stack, submitted):
    job_id, _ = submitted["delete"]
    pid_file = f"{submitted['delete_marker']}.pid"
    stack.api.wait_job(job_id, states=("running",))
    pid = int(wait_until(lambda: os.path.exists(pid_file) and open(pid_file).read().strip(), "the tool's pid", 60))
    assert process_alive(pid)
    stack.api.delete(f"jobs/{job_id}")
    job = stack.api.wait_job(job_id, states=("deleted",), timeout=120)
    assert job["state"] == "deleted"
    wait_until(lambda: not process_alive(pid), f"the tool process {pid} to be killed", 60)
    wait_until(lambda: not stack.worker.kube_jobs(galaxy_job_number(job)), "the Kubernetes Job to go", 60)


def test_6_a_request_the_broker_cannot_route_fails_the_job_visibly(stack, submitted):
    job_id, (output,) = submitted["no_queue"]
    job = stack.api.wait_job(job_id)
    assert job["state"] == "error", job
    info = stack.api.wait_dataset(output)["misc_info"]
    assert "Could not submit the job to k8s-job-worker" in info and "NO_ROUTE" in info, info


def test_7_restarts_recover_running_jobs_and_finish_jobs_done_meanwhile(stack, history):
    history_id, _ = history
    through, meanwhile = stack.galaxy.marker_dir / "runs-through-restart", stack.galaxy.marker_dir / "done-while-down"
    jobs = {}
    for marker in (through, meanwhile):
        job_id, (output,) = stack.api.run_tool(history_id, "e2e_wait", {"marker": str(marker)})
        jobs[marker] = (job_id, output, stack.api.wait_job(job_id, states=("running",)))
        wait_until(lambda: os.path.exists(f"{marker}.pid"), "the tool to start", 60)

    stack.galaxy.stop()
    # one job finishes while Galaxy is down: the worker reports it and deletes its Kubernetes Job
    (meanwhile.parent / f"{meanwhile.name}.release").touch()
    wait_until(lambda: os.path.exists(f"{meanwhile}.done"), "the tool to end", 60)
    wait_until(lambda: not stack.worker.kube_jobs(galaxy_job_number(jobs[meanwhile][2])), "its Job's cleanup", 120)
    assert stack.worker.kube_jobs(galaxy_job_number(jobs[through][2])), "the other job still runs"

    stack.galaxy.start()
    (through.parent / f"{through.name}.release").touch()  # the other one ends after the restart
    for job_id, output, _ in jobs.values():
        job = stack.api.wait_job(job_id, timeout=240)
        assert job["state"] == "ok", job
        assert stack.api.content(output) == "released\n"
        assert len(finishing_lines(stack.galaxy, job)) == 1, finishing_lines(stack.galaxy, job)
