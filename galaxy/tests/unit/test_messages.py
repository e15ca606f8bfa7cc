"""Requests, control messages and events against the worker's JSON Schemas, and the
event → Galaxy action table."""

import json

import jsonschema
import pytest
from conftest import (
    event,
    SCHEMAS,
)
from galaxy.jobs.runners.util import runner_states

from k8s_job_worker_galaxy.messages import (
    Action,
    binding_keys,
    build_control,
    build_request,
    decide,
    EVENT_ACTIONS,
    EVENT_STATES,
    memory_value,
    MessageError,
    parse_event,
    resource_value,
    routing_word,
)


def schema(name):
    """One of the worker's checked-in schemas."""
    return json.loads((SCHEMAS / f"{name}.v1.json").read_text())


def test_event_states_are_the_schemas():
    states = {variant["const"] for variant in schema("job-event")["$defs"]["JobState"]["oneOf"]}
    assert states == EVENT_STATES == set(EVENT_ACTIONS)


@pytest.mark.parametrize(
    "given, expected",
    [(2, 2), (0.5, 0.5), ("2", 2), ("0.25", 0.25), ("4Gi", "4Gi"), ("500m", "500m"), ("", None), (None, None)],
)
def test_resource_values_follow_the_runner(given, expected):
    assert resource_value(given) == expected


def test_every_destination_parameter_reaches_its_schema_field():
    request = build_request(
        job_id="42",
        attempt=2,
        shell="/bin/sh",
        command_line="/jobs/42/galaxy_42.sh; exit $(cat /jobs/42/galaxy_42.ec)",
        working_directory="/jobs/42",
        image="quay.io/biocontainers/samtools:1.17",
        destination_id="k8s_big",
        params={
            "requests_cpu": "1",
            "requests_memory": 2,
            "limits_cpu": 1.5,
            "limits_memory": "4Gi",
            "max_pod_retries": "2",
            "k8s_walltime_limit": "3600",
            "k8s_node_selector": "disktype: ssd",
            "k8s_tolerations": '[{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}]',
            "k8s_pod_priority_class": "galaxy-low",
            "k8s_run_as_user_id": "1000",
            "k8s_run_as_group_id": 1001,
            "k8s_extra_job_envs": {"FOO": "bar", "N": 3},
        },
        annotations={"app.galaxyproject.org/tool_id": "cat1"},
    )
    jsonschema.validate(request, schema("job-request"))
    assert request == {
        "schema": "k8s-job-worker/job-request/v1",
        "job_id": "42",
        "attempt": 2,
        "shell": "/bin/sh",
        "command_line": "/jobs/42/galaxy_42.sh; exit $(cat /jobs/42/galaxy_42.ec)",
        "working_directory": "/jobs/42",
        "image": "quay.io/biocontainers/samtools:1.17",
        "destination_id": "k8s_big",
        "requests_cpu": 1,
        "requests_memory": "2",
        "limits_cpu": 1.5,
        "limits_memory": "4294967296",
        "max_pod_retries": 2,
        "walltime_seconds": 3600,
        "node_selector": {"disktype": "ssd"},
        "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "priority_class": "galaxy-low",
        "run_as_user": 1000,
        "run_as_group": 1001,
        "env": [{"name": "FOO", "value": "bar"}, {"name": "N", "value": "3"}],
        "annotations": {"app.galaxyproject.org/tool_id": "cat1"},
    }


def test_the_older_retrials_name_is_accepted_and_the_newer_wins():
    base = dict(job_id="1", command_line="true", image="busybox")
    assert build_request(**base, params={"max_pod_retrials": 3})["max_pod_retries"] == 3
    assert build_request(**base, params={"max_pod_retrials": 3, "max_pod_retries": 1})["max_pod_retries"] == 1
    minimal = build_request(**base)
    jsonschema.validate(minimal, schema("job-request"))
    assert set(minimal) == {"schema", "job_id", "command_line", "image"}


@pytest.mark.parametrize(
    "params", [{"k8s_walltime_limit": "an hour"}, {"k8s_node_selector": "[a, b]"}, {"k8s_tolerations": "a: b"}]
)
def test_invalid_parameters_are_refused_with_their_name(params):
    with pytest.raises(MessageError, match=next(iter(params))):
        build_request(job_id="1", command_line="true", image="busybox", params=params)


@pytest.mark.parametrize("action", ["cancel", "status"])
def test_control_messages_follow_the_schema(action):
    message = build_control("42", action, attempt=2, reason="stopped by Galaxy")
    jsonschema.validate(message, schema("job-cancel"))
    assert message["action"] == action and message["attempt"] == 2


def test_events_are_parsed_and_bad_ones_refused():
    parsed = parse_event(json.dumps(event(7, "failed", exit_code=3, reason="exit 3")).encode())
    assert (parsed.job_id, parsed.state, parsed.exit_code, parsed.attempt, parsed.terminal) == ("7", "failed", 3, None, True)
    jsonschema.validate(event(7, "running"), schema("job-event"))
    for bad in (b"not json", b"[]", json.dumps({**event(7, "running"), "schema": "other"}).encode(),
                json.dumps({**event(7, "running"), "state": "exploded"}).encode(),
                json.dumps({**event(7, "running"), "event_id": ""}).encode()):
        with pytest.raises(MessageError):
            parse_event(bad)


@pytest.mark.parametrize(
    "state, exit_code, exit_code_file, action, runner_state",
    [
        ("submitted", None, False, Action.NOTHING, None),
        ("running", None, False, Action.RUNNING, None),
        ("succeeded", 0, True, Action.FINISH, None),
        ("failed", 3, True, Action.FINISH, None),
        ("failed", None, False, Action.FAIL, runner_states.UNKNOWN_ERROR),
        ("oom_killed", 137, False, Action.FAIL, runner_states.MEMORY_LIMIT_REACHED),
        ("walltime_exceeded", None, False, Action.FAIL, runner_states.WALLTIME_REACHED),
        ("unschedulable", None, False, Action.FAIL, runner_states.WALLTIME_REACHED),
        ("image_pull_failed", None, False, Action.FAIL, runner_states.UNKNOWN_ERROR),
        ("preempted", None, False, Action.FAIL, runner_states.UNKNOWN_ERROR),
        ("node_lost", None, False, Action.FAIL, runner_states.UNKNOWN_ERROR),
        ("lost", None, False, Action.FAIL, runner_states.UNKNOWN_ERROR),
        ("lost", None, True, Action.FINISH, None),
        ("cancelled", None, False, Action.FAIL, runner_states.UNKNOWN_ERROR),
        ("failed", 3, False, Action.FAIL, runner_states.UNKNOWN_ERROR),  # its script never ran
        ("unknown", None, False, Action.RESEND, None),
        ("unknown", None, True, Action.FINISH, None),
    ],
)
def test_event_to_galaxy_action(state, exit_code, exit_code_file, action, runner_state):
    decision = decide(parse_event(event(1, state, exit_code=exit_code, reason="the reason")), exit_code_file)
    assert decision.action is action
    assert decision.runner_state == runner_state
    if action is Action.FAIL:
        assert decision.message.endswith(": the reason")


def test_a_cancel_galaxy_asked_for_is_nothing_more_one_it_did_not_fails_the_job():
    cancelled = parse_event(event(1, "cancelled", reason="cancelled with k8s-job-worker cancel"))
    assert decide(cancelled, stopping=True).action is Action.NOTHING
    decision = decide(cancelled, stopping=False)
    assert (decision.action, decision.runner_state) == (Action.FAIL, runner_states.UNKNOWN_ERROR)
    assert "outside Galaxy" in decision.message and "k8s-job-worker cancel" in decision.message
    # an interactive tool Galaxy stopped is finished, as Galaxy's Kubernetes runner finishes it
    assert decide(cancelled, stopping=True, stopped_interactive=True).action is Action.FINISH


def test_a_failure_whose_job_script_never_ran_fails_with_the_workers_reason():
    failed = parse_event(event(1, "failed", exit_code=127, reason="exec: /bin/bash: not found"))
    decision = decide(failed, exit_code_file_exists=False)
    assert decision.action is Action.FAIL and "did not run" in decision.message and "not found" in decision.message
    assert decide(failed, exit_code_file_exists=True).action is Action.FINISH, "the tool's own failure: Galaxy judges it"


@pytest.mark.parametrize("given", [4, "4", "4g", "4G", "4Gi", "4gi", "1.5G", "512Mi", "129e6", "100M", 2**30])
def test_memory_means_what_galaxy_26_bytesize_says(given):
    from galaxy.util.bytesize import ByteSize

    assert memory_value(given, "limits_memory") == str(int(round(ByteSize(given).value)))


@pytest.mark.parametrize("given", ["4GB", "lots", "-1G"])
def test_memory_galaxy_26_refuses_is_refused_with_its_name(given):
    with pytest.raises(MessageError, match="limits_memory"):
        memory_value(given, "limits_memory")


def test_a_handler_is_one_routing_word_as_the_worker_writes_it():
    assert routing_word("main") == "main"
    assert routing_word("main.job-handlers.1") == "main%2Ejob-handlers%2E1"
    assert routing_word("a%2Eb") == "a%252Eb"
    assert binding_keys("main", "handler.1") == ["main.handler%2E1.*", "main.*"]
