"""The runner with Galaxy's own classes: a real cat1 job (JobWrapper, database, job script
run as the worker's pod would run it), events applied as the consumer thread applies them."""

import json
import os

import jsonschema
import pytest
from conftest import (
    deliver,
    drain,
    run_job_script,
    submit,
    SCHEMAS,
)
from galaxy import model
from galaxy.tool_util.deps.containers import ContainerFinder
from galaxy.tool_util.deps.dependencies import AppInfo


REQUEST_SCHEMA = json.loads((SCHEMAS / "job-request.v1.json").read_text())


def test_request_for_a_real_cat1_job(galaxy, broker, runner):
    job_wrapper, request = submit(
        galaxy, broker, runner, destination_params={"limits_memory": "500M", "requests_cpu": 1, "max_pod_retries": 0}
    )
    jsonschema.validate(request, REQUEST_SCHEMA)
    job = galaxy.reload(job_wrapper)
    job_state = runner.tracker.get(str(job.id)).job_state
    assert request["job_id"] == str(job.id)
    assert "attempt" not in request, "a first attempt keeps the runner's Job name"
    assert request["shell"] == job_wrapper.shell == "/bin/bash"
    assert request["command_line"] == f"{job_state.job_file}; exit $(cat {job_state.exit_code_file})"
    assert request["working_directory"] == job_wrapper.working_directory
    assert request["image"] == "python:3.12-slim"  # no container resolved: the runner's default
    assert (request["limits_memory"], request["requests_cpu"], request["max_pod_retries"]) == ("500000000", 1, 0)
    assert request["handler"] == "main", "its events are routed to this handler"
    assert request["annotations"]["app.galaxyproject.org/tool_id"] == "cat1"
    with open(job_state.job_file) as f:
        script = f.read()
    assert "tool_script.sh" in script  # Galaxy's job script around cat1's command
    assert script.rstrip().endswith("\nwait")  # its stream copies finish before the pod ends
    assert job.job_runner_external_id == f"galaxy-unit-{job.id}", "the worker's Job name for a first attempt"


def test_destination_image_and_runner_defaults(galaxy, broker, runner):
    runner.runner_params["k8s_walltime_limit"] = "600"
    _, request = submit(galaxy, broker, runner, destination_params={"default_image": "busybox:1.36"})
    assert request["image"] == "busybox:1.36"
    assert request["walltime_seconds"] == 600


def test_the_job_is_registered_before_its_request_is_published(galaxy, broker, runner):
    seen = []
    publish_many = runner.publisher.publish_many

    def spy(messages):
        """Notes the registration at publish time, then publishes."""
        seen.extend(runner.tracker.get(json.loads(body)["job_id"]) for body, _, _ in messages)
        return publish_many(messages)

    runner.publisher.publish_many = spy
    job_wrapper, _ = submit(galaxy, broker, runner)
    assert seen[0] is not None and seen[0].attempt == 1


def test_success_finishes_once_whatever_is_replayed(galaxy, broker, runner):
    job_wrapper, request = submit(galaxy, broker, runner)
    assert run_job_script(job_wrapper, request) == 0
    acks = [deliver(runner, job_wrapper, "running")]
    assert galaxy.reload(job_wrapper).state == model.Job.states.RUNNING
    for state, event_id in [("succeeded", None), ("succeeded", None), ("succeeded", "other-id"), ("lost", None)]:
        acks.append(deliver(runner, job_wrapper, state, exit_code=0, event_id=event_id))
    # a replayed event and the reply to a status request must not finish the job twice
    assert drain(runner) == ["_apply_terminal"]
    assert [a.count for a in acks] == [1, 1, 1, 1, 1]
    job = galaxy.reload(job_wrapper)
    assert job.state == model.Job.states.OK
    with open(job.output_datasets[0].dataset.dataset.get_file_name()) as f:
        assert f.read() == "line one\nline two\n"
    assert runner.metadata_calls == [(job.id, True)]
    assert runner.tracker.get(str(job.id)) is None


def test_the_event_is_acknowledged_only_after_galaxy_recorded_it(galaxy, broker, runner):
    job_wrapper, request = submit(galaxy, broker, runner)
    run_job_script(job_wrapper, request)
    acks = deliver(runner, job_wrapper, "succeeded", exit_code=0)
    assert acks.count == 0 and galaxy.reload(job_wrapper).state == model.Job.states.QUEUED
    drain(runner)
    assert acks.count == 1 and galaxy.reload(job_wrapper).state == model.Job.states.OK


def test_a_tool_exiting_non_zero_is_judged_by_galaxy(galaxy, broker, runner):
    job_wrapper, request = submit(galaxy, broker, runner)
    os.unlink(galaxy.reload(job_wrapper).input_datasets[0].dataset.dataset.get_file_name())
    exit_code = run_job_script(job_wrapper, request)
    assert exit_code != 0
    deliver(runner, job_wrapper, "failed", exit_code=exit_code, reason="exit code 1")
    drain(runner)
    job = galaxy.reload(job_wrapper)
    assert job.state == model.Job.states.ERROR
    assert "No such file or directory" in job.tool_stderr


@pytest.mark.parametrize(
    "state, words",
    [
        ("walltime_exceeded", "walltime"),
        ("unschedulable", "could not be scheduled"),
        ("image_pull_failed", "image"),
        ("preempted", "preempted"),
        ("node_lost", "node"),
        ("failed", "failed"),
    ],
)
def test_failures_outside_the_tool_fail_the_job_with_the_reason(galaxy, broker, runner, state, words):
    job_wrapper, _ = submit(galaxy, broker, runner)
    deliver(runner, job_wrapper, state, reason="the worker's reason")
    drain(runner)
    job = galaxy.reload(job_wrapper)
    assert job.state == model.Job.states.ERROR
    assert words in job.info and "the worker's reason" in job.info
    assert broker.messages(broker.control) == []  # the worker stopped the Job itself


def test_oom_is_resubmitted_to_the_bigger_destination_as_the_next_attempt(galaxy, broker, runner):
    galaxy.destinations["bigger"] = galaxy.destination("bigger", {"limits_memory": "2G"})
    job_wrapper, request = submit(
        galaxy,
        broker,
        runner,
        destination_params={"limits_memory": "0.1G"},
        resubmit=[{"condition": "memory_limit_reached", "environment": "bigger"}],
    )
    assert "attempt" not in request and request["limits_memory"] == "100000000"  # 0.1 GB, as Galaxy 26 reads it
    deliver(runner, job_wrapper, "oom_killed", exit_code=137, reason="OOMKilled")
    drain(runner)
    job = galaxy.reload(job_wrapper)
    assert job.state == model.Job.states.RESUBMITTED
    assert (job.destination_id, job.job_runner_external_id) == ("bigger", None)

    # Galaxy's handler queues the job again; the runner sends attempt 2 with more memory
    retry = galaxy.rewrap(job_wrapper)
    retry.change_state(model.Job.states.QUEUED)
    runner.queue_job(retry)
    runner.outbox.flush()
    (request,) = broker.messages(broker.requests)
    assert request["attempt"] == 2 and request["limits_memory"] == "2000000000"
    # a late copy of attempt 1's event does not touch attempt 2
    acks = deliver(runner, retry, "oom_killed", exit_code=137, event_id="late-copy", attempt=1)
    assert acks.count == 1 and drain(runner) == []
    run_job_script(retry, request)
    deliver(runner, retry, "succeeded", exit_code=0, attempt=2)
    drain(runner)
    assert galaxy.reload(retry).state == model.Job.states.OK


def test_stop_sends_a_cancel_and_cancelled_ends_tracking(galaxy, broker, runner):
    job_wrapper, _ = submit(galaxy, broker, runner)
    runner.stop_job(job_wrapper)
    runner.outbox.flush()
    (cancel,) = broker.messages(broker.control)
    assert cancel == {
        "schema": "k8s-job-worker/job-cancel/v1",
        "job_id": job_wrapper.get_id_tag(),
        "action": "cancel",
        "reason": "stopped by Galaxy",
        "handler": "main",
    }
    job_wrapper.get_job().mark_deleted(track_jobs_in_database=True)  # as Galaxy's stop queue does
    galaxy.session.commit()
    acks = deliver(runner, job_wrapper, "cancelled")
    assert acks.count == 1 and drain(runner) == []
    assert runner.tracker.get(job_wrapper.get_id_tag()) is None


def test_events_of_another_handlers_job_are_left_for_it(galaxy, broker, runner):
    job_wrapper = galaxy.job(handler="handler1")
    acks = deliver(runner, job_wrapper, "succeeded", exit_code=0)
    assert acks.count == 1
    assert runner.tracker.held_job_ids() == [] and drain(runner) == []
    assert galaxy.reload(job_wrapper).state == model.Job.states.QUEUED


def test_events_of_a_finished_job_are_dropped(galaxy, broker, runner):
    job_wrapper = galaxy.job()
    job_wrapper.change_state(model.Job.states.OK)
    acks = deliver(runner, job_wrapper, "succeeded", exit_code=0)
    assert acks.count == 1 and runner.tracker.held_job_ids() == []


def ran_then_galaxy_restarted(galaxy, broker, runner, job_script_ran=True):
    """A job that was running (its job script run when ``job_script_ran``), then Galaxy
    restarted: nothing in the runner's memory, the job RUNNING in the database."""
    job_wrapper, request = submit(galaxy, broker, runner)
    deliver(runner, job_wrapper, "running")
    if job_script_ran:
        assert run_job_script(job_wrapper, request) == 0
    runner.tracker.forget(runner.tracker.get(job_wrapper.get_id_tag()))
    assert galaxy.reload(job_wrapper).state == model.Job.states.RUNNING
    return job_wrapper


def test_an_event_before_recovery_is_held_then_applied_once(galaxy, broker, runner):
    job_wrapper = ran_then_galaxy_restarted(galaxy, broker, runner)
    early = deliver(runner, job_wrapper, "succeeded", exit_code=0)
    assert early.count == 0 and runner.tracker.held_job_ids() == [job_wrapper.get_id_tag()]
    runner._on_idle()
    assert early.count == 0  # still held: not registered yet

    job = galaxy.reload(job_wrapper)
    recovered = galaxy.rewrap(job_wrapper)
    runner.recover(job, recovered)
    runner.outbox.flush()
    (status,) = broker.messages(broker.control)
    assert (status["action"], status["job_id"], status.get("attempt")) == ("status", str(job.id), None)
    runner._on_idle()
    reply = deliver(runner, recovered, "succeeded", exit_code=0)  # the status reply, same event id
    assert drain(runner) == ["_apply_terminal"]
    assert early.count == 1 and reply.count == 1
    assert galaxy.reload(job_wrapper).state == model.Job.states.OK


def test_held_events_are_applied_before_a_later_event_of_their_job(galaxy, broker, runner):
    job_wrapper = ran_then_galaxy_restarted(galaxy, broker, runner)
    early = deliver(runner, job_wrapper, "succeeded", exit_code=0)
    runner.recover(galaxy.reload(job_wrapper), galaxy.rewrap(job_wrapper))
    # the worker cleaned the Job up already: the status reply is `lost`, and it comes before
    # the consumer's idle round released the held event
    reply = deliver(runner, job_wrapper, "lost", reason="no Job")
    ((_, job_state),) = list(runner.work_queue.queue)
    assert job_state.k8s_event.state == "succeeded"
    drain(runner)
    assert (early.count, reply.count) == (1, 1)
    assert galaxy.reload(job_wrapper).state == model.Job.states.OK


@pytest.mark.parametrize("job_script_ran", [True, False])
def test_a_recovered_job_the_worker_answers_lost_for(galaxy, broker, runner, job_script_ran):
    job_wrapper = ran_then_galaxy_restarted(galaxy, broker, runner, job_script_ran)
    job = galaxy.reload(job_wrapper)
    recovered = galaxy.rewrap(job_wrapper)
    runner.recover(job, recovered)
    deliver(runner, recovered, "lost", reason="no Job galaxy-unit-1-1")
    drain(runner)
    job = galaxy.reload(job_wrapper)
    if job_script_ran:
        assert job.state == model.Job.states.OK  # finished from its exit code file
    else:
        assert job.state == model.Job.states.ERROR and "lost" in job.info


def test_the_image_comes_from_galaxys_container_resolution(galaxy, broker, runner):
    """docker_enabled + docker_default_container_id, resolved by Galaxy's ContainerFinder."""
    app_info = AppInfo(
        default_file_path=galaxy.app.config.file_path,
        enable_mulled_containers=False,
        involucro_auto_init=False,
        container_image_cache_path=galaxy.test_directory,
    )
    finder, galaxy.app.container_finder = galaxy.app.container_finder, ContainerFinder(app_info)
    try:
        _, request = submit(
            galaxy,
            broker,
            runner,
            destination_params={"docker_enabled": True, "docker_default_container_id": "busybox:1.36"},
        )
    finally:
        galaxy.app.container_finder = finder
    assert request["image"] == "busybox:1.36"
