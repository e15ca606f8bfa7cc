"""What a production Galaxy goes through (issue 24), with Galaxy's own classes: a broker that is
away, a database that is away, restarts, outcomes Galaxy did not ask for, many handlers, and
the parameters of Galaxy 26's Kubernetes runner. The broker is kombu's ``memory://`` where it
is not the point; an unreachable URL where it is away."""

import json
import os
import time

import pytest
from conftest import (
    Acks,
    deliver,
    drain,
    event,
    run_job_script,
    submit,
)
from galaxy import model
from galaxy.jobs.job_destination import JobDestination

from k8s_job_worker_galaxy import params as P
from k8s_job_worker_galaxy.amqp import (
    ConfirmingPublisher,
    EventConsumer,
    Outbox,
    RetryPolicy,
)
from k8s_job_worker_galaxy.messages import parse_event
from k8s_job_worker_galaxy.runner import (
    K8sJobWorkerJobRunner,
    REQUEST_FILE,
)

#: A broker that is away: nothing listens there.
AWAY = "amqp://guest:guest@127.0.0.1:1//"


class Clock:
    """A clock the test moves."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


# --- 1. a broker that is away ----------------------------------------------------------


def test_item1_a_request_waits_for_the_broker_and_goes_once_it_is_back(galaxy, broker, runner):
    clock = Clock()
    runner.outbox = Outbox(ConfirmingPublisher(AWAY, confirm_timeout=1), runner.retry_policy, clock=clock)
    job_wrapper = galaxy.job()
    started = time.monotonic()
    runner.queue_job(job_wrapper)
    assert time.monotonic() - started < 5, "queue_job does not wait for the broker"
    for _ in range(3):  # tried again, 1 s, 3 s, 5 s apart...
        assert runner.outbox.flush() == 1
        clock.now += 10
    assert broker.messages(broker.requests) == []
    assert galaxy.reload(job_wrapper).state == model.Job.states.QUEUED and drain(runner) == []
    runner.outbox.publisher = runner.publisher  # the broker is back
    runner.outbox.flush()
    (request,) = broker.messages(broker.requests)
    assert request["job_id"] == job_wrapper.get_id_tag()
    assert drain(runner) == [] and galaxy.reload(job_wrapper).state == model.Job.states.QUEUED


def test_item1_when_the_window_is_over_the_job_fails_through_fail_job_and_resubmission_applies(galaxy, broker, runner):
    clock = Clock()
    policy = RetryPolicy(window=60, interval_start=1, interval_step=2, interval_max=30)
    runner.outbox = Outbox(ConfirmingPublisher(AWAY, confirm_timeout=1), policy, clock=clock)
    galaxy.destinations["retry"] = galaxy.destination("retry", {})
    job_wrapper = galaxy.job(resubmit=[{"condition": "unknown_error", "environment": "retry"}])
    runner.queue_job(job_wrapper)
    runner.outbox.flush()
    clock.now += 61
    runner.outbox.flush()
    assert drain(runner) == ["fail_job"]
    job = galaxy.reload(job_wrapper)
    assert job.state == model.Job.states.RESUBMITTED, "fail_job with UNKNOWN_ERROR: the resubmit rule applied"
    # without a rule, the job fails with the reason
    runner.outbox = Outbox(ConfirmingPublisher(AWAY, confirm_timeout=1), policy, clock=clock)
    job_wrapper = galaxy.job()
    runner.queue_job(job_wrapper)
    runner.outbox.flush()
    clock.now += 61
    runner.outbox.flush()
    drain(runner)
    job = galaxy.reload(job_wrapper)
    assert job.state == model.Job.states.ERROR
    assert "Could not submit the job to k8s-job-worker" in job.info and "within 61 s" in job.info


def test_item1_the_retry_policy_follows_pulsars_parameters():
    policy = RetryPolicy(max_retries=3, interval_start=1, interval_step=2, interval_max=4, window=600)
    assert [policy.wait(n) for n in (1, 2, 3, 4)] == [1, 3, 4, 4]
    assert not policy.gives_up(2, since=0, now=100) and policy.gives_up(3, since=0, now=100)
    assert RetryPolicy(window=10).gives_up(1, since=0, now=10)
    assert RetryPolicy(enabled=False).gives_up(1, since=0, now=0), "amqp_publish_retry: false is one attempt"


# --- 2. a deploy while the worker is backlogged ---------------------------------------


def restarted(galaxy, broker, runner, job_script_ran=False):
    """A job whose request went out, then Galaxy restarted (nothing in memory), recovered."""
    job_wrapper, request = submit(galaxy, broker, runner)
    if job_script_ran:
        run_job_script(job_wrapper, request)
    runner.tracker.forget(runner.tracker.get(job_wrapper.get_id_tag()))
    job = galaxy.reload(job_wrapper)
    recovered = galaxy.rewrap(job_wrapper)
    runner.recover(job, recovered)
    runner.outbox.flush()
    (status,) = broker.messages(broker.control)
    assert status["action"] == "status" and status["handler"] == "main"
    return recovered, request


def test_item2_a_recovered_job_the_worker_has_no_job_of_sends_its_request_again(galaxy, broker, runner):
    recovered, request = restarted(galaxy, broker, runner)
    acks = deliver(runner, recovered, "unknown", reason="its request was not processed yet")
    assert acks.count == 1 and drain(runner) == []
    runner.outbox.flush()
    (again,) = broker.messages(broker.requests)
    assert again == request, "the same request: the worker deduplicates it by name and fingerprint"
    assert galaxy.reload(recovered).state == model.Job.states.QUEUED, "not failed on `unknown`"
    # a later `unknown` (another restart's question) sends it again too
    deliver(runner, recovered, "unknown")
    runner.outbox.flush()
    assert len(broker.messages(broker.requests)) == 1


def test_item2_an_unknown_job_whose_script_ran_is_finished_from_its_exit_code_file(galaxy, broker, runner):
    recovered, _ = restarted(galaxy, broker, runner, job_script_ran=True)
    deliver(runner, recovered, "unknown", reason="its record expired")
    assert drain(runner) == ["_apply_terminal"]
    assert galaxy.reload(recovered).state == model.Job.states.OK


# --- 3. acknowledgements on error paths ------------------------------------------------


class Retryable(Acks):
    """A delivery that can also be given back."""

    def __init__(self):
        super().__init__()
        self.retries = 0

    def retry(self):
        self.retries += 1


def test_item3_an_event_galaxy_could_not_record_comes_back_and_is_applied_then(galaxy, broker, runner):
    job_wrapper, request = submit(galaxy, broker, runner)
    run_job_script(job_wrapper, request)
    finish = runner.finish_job
    broken = {"times": 1}

    def flaky(job_state):
        """Galaxy's database is away the first time."""
        if broken["times"]:
            broken["times"] -= 1
            raise RuntimeError("database is away")
        finish(job_state)

    runner.finish_job = flaky
    first = Retryable()
    runner.handle_event(parse_event(event(job_wrapper.get_id_tag(), "succeeded", exit_code=0)), first)
    drain(runner)
    assert (first.count, first.retries) == (0, 1), "given back, not acknowledged"
    assert galaxy.reload(job_wrapper).state == model.Job.states.QUEUED
    again = Retryable()  # the broker delivers it again, after the backoff
    runner.handle_event(parse_event(event(job_wrapper.get_id_tag(), "succeeded", exit_code=0)), again)
    drain(runner)
    assert (again.count, again.retries) == (1, 0)
    assert galaxy.reload(job_wrapper).state == model.Job.states.OK


def test_item3_when_failing_the_job_fails_too_the_event_is_not_acknowledged(galaxy, broker, runner):
    job_wrapper, _ = submit(galaxy, broker, runner)
    runner.fail_job = lambda job_state: (_ for _ in ()).throw(RuntimeError("database is away"))
    job_state_wrapper = job_wrapper

    def fail_fails(*args, **kwds):
        raise RuntimeError("database is away")

    job_state_wrapper.fail = fail_fails
    delivery = Retryable()
    runner.handle_event(parse_event(event(job_wrapper.get_id_tag(), "walltime_exceeded")), delivery)
    runner._event_retries[f"{job_wrapper.get_id_tag()}-1-walltime_exceeded"] = 99  # its last try
    drain(runner)
    assert (delivery.count, delivery.retries) == (0, 1)


def test_item3_held_events_stay_held_when_their_job_cannot_be_looked_up(galaxy, broker, runner):
    job_wrapper, _ = submit(galaxy, broker, runner)
    runner.tracker.forget(runner.tracker.get(job_wrapper.get_id_tag()))
    early = deliver(runner, job_wrapper, "succeeded", exit_code=0)
    assert runner.tracker.held_job_ids() == [job_wrapper.get_id_tag()]
    runner._unregistered_disposition = lambda event: (_ for _ in ()).throw(RuntimeError("database is away"))
    runner._last_held_check = 0
    runner.runner_params["held_event_check_seconds"] = 0
    runner._check_held()
    assert runner.tracker.held_job_ids() == [job_wrapper.get_id_tag()] and early.count == 0


def test_item3_the_consumer_gives_an_event_back_after_a_backoff_when_its_handling_raises(broker):
    handled = []

    def on_event(body, delivery):
        handled.append(body)
        if len(handled) == 1:
            raise RuntimeError("database is away")
        delivery.ack()

    clock = Clock()
    consumer = EventConsumer("memory://", broker.exchange, f"{broker.prefix}.q", [f"{broker.prefix}.#"], on_event,
                             clock=clock)
    consumer.start()
    try:
        deadline = time.monotonic() + 10
        while not consumer.ready.is_set() and time.monotonic() < deadline:
            time.sleep(0.02)
        from kombu import Exchange, Producer

        exchange = Exchange(broker.exchange, type="topic", durable=True)
        Producer(broker.connection.default_channel, exchange=exchange).publish(
            b"{}", routing_key=f"{broker.prefix}.x", declare=[exchange]
        )
        while len(handled) < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.5)
        assert len(handled) == 1, "not back before its backoff"
        clock.now += consumer.backoff() + 0.1
        while len(handled) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(handled) == 2, "back after its backoff, and handled"
    finally:
        consumer.stop()


# --- 4. outcomes Galaxy did not ask for ------------------------------------------------


def test_item4_a_cancel_galaxy_did_not_ask_for_fails_the_job_with_the_reason(galaxy, broker, runner):
    job_wrapper, _ = submit(galaxy, broker, runner)
    deliver(runner, job_wrapper, "running")
    deliver(runner, job_wrapper, "cancelled", reason="cancelled with k8s-job-worker cancel")
    drain(runner)
    job = galaxy.reload(job_wrapper)
    assert job.state == model.Job.states.ERROR
    assert "cancelled outside Galaxy" in job.info and "k8s-job-worker cancel" in job.info


def test_item4_a_deleted_jobs_cancel_ends_it_and_its_files_go_as_galaxy_says(galaxy, broker, runner):
    job_wrapper, _ = submit(galaxy, broker, runner)
    working_directory = job_wrapper.working_directory
    assert os.path.exists(os.path.join(working_directory, REQUEST_FILE))
    runner.stop_job(job_wrapper)
    job_wrapper.get_job().mark_deleted(track_jobs_in_database=True)
    galaxy.session.commit()
    galaxy.app.config.cleanup_job = "always"
    try:
        acks = deliver(runner, job_wrapper, "cancelled", reason="stopped by Galaxy")
    finally:
        galaxy.app.config.cleanup_job = "never"
    assert acks.count == 1 and drain(runner) == []
    assert runner.tracker.get(job_wrapper.get_id_tag()) is None
    assert not os.path.exists(working_directory), "cleaned up as Galaxy's own runner does"


def test_item4_a_failure_whose_job_script_never_ran_fails_with_the_reason_and_log(galaxy, broker, runner):
    job_wrapper, _ = submit(galaxy, broker, runner)
    body = event(job_wrapper.get_id_tag(), "failed", exit_code=127, reason="container exited with code 127")
    body["log_tail"] = "/bin/bash: no such file or directory\n"
    acks = Acks()
    runner.handle_event(parse_event(body), acks)
    drain(runner)
    job = galaxy.reload(job_wrapper)
    assert job.state == model.Job.states.ERROR and "did not run" in job.info and "code 127" in job.info
    assert "no such file or directory" in job.tool_stdout


# --- 5. many handlers ------------------------------------------------------------------


def test_item5_a_handlers_queue_gets_its_own_jobs_events(galaxy, broker, runner):
    assert runner.handler == "main"
    assert runner.event_queue_name == f"{broker.exchange}.unit.main"
    _, request = submit(galaxy, broker, runner)
    assert request["handler"] == "main"
    runner.runner_params["amqp_event_queue_type"] = "quorum"
    runner.runner_params["amqp_event_queue_expires"] = 604800
    assert runner.event_queue_arguments() == {"x-queue-type": "quorum", "x-expires": 604800000}


# --- 6. Galaxy's parameter semantics ---------------------------------------------------


def make_runner(galaxy, **kwargs):
    base = dict(amqp_url="memory://", k8s_galaxy_instance_id="unit")
    return K8sJobWorkerJobRunner(galaxy.app, 1, **{**base, **kwargs})


def test_item6_every_galaxy_26_kubernetes_runner_parameter_is_taken_or_refused_by_name(galaxy):
    # honoured ones load, as written in XML (strings) or YAML
    make_runner(galaxy, k8s_pod_retries="2", k8s_walltime_limit="3600", k8s_node_selector="pool: galaxy")
    for name, where in P.REFUSED.items():
        with pytest.raises(P.ConfigurationError, match=name) as refused:
            make_runner(galaxy, **{name: "x"})
        assert where in str(refused.value)


def galaxy_kubernetes_runner_params() -> tuple[set[str], set[str]]:
    """The parameters Galaxy 26's own Kubernetes runner reads, from its source: the keys of
    its ``runner_param_specs``, and the destination parameters it reads (``params[...]``,
    ``... in params``, ``__get_overridable_params(..., name)``)."""
    import ast

    import galaxy.jobs.runners.kubernetes as kubernetes

    tree = ast.parse(open(kubernetes.__file__).read())
    runner, destination = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "runner_param_specs" for t in node.targets):
            runner.update(k.arg for k in node.value.keywords)
        is_params = lambda n: isinstance(n, ast.Attribute) and n.attr == "params"  # noqa: E731
        if isinstance(node, ast.Subscript) and is_params(node.value) and isinstance(node.slice, ast.Constant):
            destination.add(node.slice.value)
        if isinstance(node, ast.Compare) and any(is_params(c) for c in node.comparators) and isinstance(node.left, ast.Constant):
            destination.add(node.left.value)
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "").endswith("get_overridable_params"):
            destination.update(a.value for a in node.args if isinstance(a, ast.Constant))
    return runner, destination


def test_item6_the_parameter_tables_cover_galaxys_own_runner_and_the_docs_name_them_all():
    runner, destination = galaxy_kubernetes_runner_params()
    assert len(runner) >= 30 and {"requests_memory", "k8s_affinity", "max_pod_retries"} <= destination
    specs = P.runner_param_specs()
    # every runner parameter Galaxy 26 takes is one this plugin takes or refuses by name
    assert runner - set(P.HONOURED) - set(P.REFUSED) == set()
    assert runner <= set(specs)
    # every destination parameter Galaxy 26 reads is sent with the request or refused at load
    assert destination - set(P.DESTINATION_PARAMS) - set(P.DESTINATION_REFUSED) == set()
    assert runner == set(P.GALAXY_26), "the parity table has exactly Galaxy 26's runner parameters"
    docs = open(os.path.join(os.path.dirname(__file__), "..", "..", "..", "docs", "galaxy.md")).read()
    assert P.parity_table() in docs, "docs/galaxy.md: paste `python -m k8s_job_worker_galaxy.params` again"
    undocumented = [
        name for name in [*specs, *destination]
        if f"`{name}`" not in docs and not (name.startswith("k8s_interactivetools_") and "`k8s_interactivetools_*`" in docs)
    ]
    assert undocumented == []


def test_item6_xml_values_are_strings_and_still_checked(galaxy):
    runner = make_runner(galaxy, amqp_prefetch="20", amqp_publish_timeout="2.5", amqp_publish_retry="false")
    assert (runner.runner_params["amqp_prefetch"], runner.retry_policy.enabled) == (20, False)
    with pytest.raises(Exception, match="amqp_prefetch"):
        make_runner(galaxy, amqp_prefetch="0")


def test_item6_a_destination_setting_a_refused_parameter_is_refused_when_galaxy_loads(galaxy):
    job_config = galaxy.app.job_config
    saved = (getattr(job_config, "runner_plugins", None), dict(job_config.destinations))
    job_config.runner_plugins = [{"id": "k8s", "load": "k8s_job_worker_galaxy.runner:K8sJobWorkerJobRunner"}]
    job_config.destinations["elsewhere"] = [JobDestination(id="elsewhere", runner="k8s", params={"k8s_namespace": "other"})]
    try:
        with pytest.raises(P.ConfigurationError, match="destination 'elsewhere' sets k8s_namespace: the worker's namespace"):
            make_runner(galaxy)
    finally:
        job_config.runner_plugins = saved[0]
        job_config.destinations.clear()
        job_config.destinations.update(saved[1])


def test_item6_runner_level_pod_retries_apply_when_the_destination_sets_none(galaxy, broker, runner):
    runner.runner_params["k8s_pod_retries"] = 2
    _, request = submit(galaxy, broker, runner)
    assert request["max_pod_retries"] == 2
    _, request = submit(galaxy, broker, runner, destination_params={"max_pod_retries": 0})
    assert request["max_pod_retries"] == 0


# --- 7. trust --------------------------------------------------------------------------


def test_item7_the_instance_id_is_required_and_checked_as_galaxy_checks_it(galaxy):
    with pytest.raises(P.ConfigurationError, match="k8s_galaxy_instance_id is required"):
        K8sJobWorkerJobRunner(galaxy.app, 1, amqp_url="memory://")
    with pytest.raises(P.ConfigurationError, match="1 to 20"):
        make_runner(galaxy, k8s_galaxy_instance_id="Not-Valid_")


def test_item7_events_of_another_instance_or_job_name_are_dropped(galaxy, broker, runner):
    job_wrapper, request = submit(galaxy, broker, runner)
    run_job_script(job_wrapper, request)
    for forged in (
        {**event(job_wrapper.get_id_tag(), "succeeded", exit_code=0), "instance_id": "other"},
        {**event(job_wrapper.get_id_tag(), "succeeded", exit_code=0), "job_name": "galaxy-unit-999"},
    ):
        acks = Acks()
        runner._on_event_body(json.dumps(forged).encode(), acks)
        assert acks.count == 1 and drain(runner) == []
    assert galaxy.reload(job_wrapper).state == model.Job.states.QUEUED


def test_item7_the_broker_url_can_come_from_the_environment_or_a_file(tmp_path):
    assert P.amqp_url(None, "GALAXY_AMQP", None, environ={"GALAXY_AMQP": "amqp://u:p@h//"}) == "amqp://u:p@h//"
    secret = tmp_path / "url"
    secret.write_text("amqp://u:p@h//\n")
    assert P.amqp_url(None, None, str(secret)) == "amqp://u:p@h//"
    with pytest.raises(P.ConfigurationError, match="exactly one"):
        P.amqp_url("amqp://x//", "GALAXY_AMQP", None)
    with pytest.raises(P.ConfigurationError, match="not set"):
        P.amqp_url(None, "NOT_SET_ANYWHERE", None, environ={})


def test_item8_stop_job_tries_its_cancel_again_while_the_broker_is_away(galaxy, broker, runner):
    clock = Clock()
    job_wrapper, _ = submit(galaxy, broker, runner)
    runner.outbox = Outbox(ConfirmingPublisher(AWAY, confirm_timeout=1), runner.retry_policy, clock=clock)
    runner.stop_job(job_wrapper)
    runner.outbox.flush()
    assert broker.messages(broker.control) == [] and runner.outbox.pending() == 1
    runner.outbox.publisher = runner.publisher
    clock.now += 10
    runner.outbox.flush()
    (cancel,) = broker.messages(broker.control)
    assert cancel["action"] == "cancel"
