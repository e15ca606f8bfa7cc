"""The event consumer thread on kombu's memory:// transport: events reach Galaxy's work
queue, and a delivery is acknowledged only once Galaxy has recorded it."""

import json
import time

from conftest import (
    drain,
    event,
    run_job_script,
)
from galaxy import model
from kombu import (
    Exchange,
    Producer,
)


def wait_for(condition, what, seconds=20.0):
    """Polls ``condition`` (a thread is at work); fails naming ``what`` after ``seconds``."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def publish_event(broker, body):
    """Publishes an event as the worker does: topic exchange, ``<instance>.<state>``."""
    exchange = Exchange(broker.exchange, type="topic", durable=True)
    Producer(broker.connection.default_channel, exchange=exchange).publish(
        json.dumps(body), routing_key=f"unit.{body['state']}", content_type="application/json", declare=[exchange]
    )


def queued_events(runner, broker):
    """Bodies of the events waiting in the runner's event queue (consumed)."""
    return broker.messages(runner.event_queue_name)


def test_the_consumer_thread_applies_events_and_acknowledges_after_galaxy(galaxy, broker, runner):
    job_wrapper = galaxy.job()
    runner.queue_job(job_wrapper)
    runner.outbox.flush()
    (request,) = broker.messages(broker.requests)
    run_job_script(job_wrapper, request)
    job_id = job_wrapper.get_id_tag()
    assert runner.event_queue_name == f"{broker.exchange}.unit.main"
    assert runner.event_consumer is None
    assert runner.event_queue_arguments() == {}

    runner._init_event_consumer()
    try:
        wait_for(runner.event_consumer.ready.is_set, "the consumer")
        publish_event(broker, event(job_id, "running"))
        wait_for(lambda: galaxy.reload(job_wrapper).state == model.Job.states.RUNNING, "the running state")
        publish_event(broker, event(job_id, "succeeded", exit_code=0))
        publish_event(broker, event(job_id, "succeeded", exit_code=0))  # a replay
        publish_event(broker, event("999999", "succeeded", exit_code=0))  # no such job
        wait_for(lambda: not runner.work_queue.empty(), "the finishing work item")
        acks = runner.event_consumer._settled
        assert galaxy.reload(job_wrapper).state == model.Job.states.RUNNING
        assert drain(runner) == ["_apply_terminal"]
        wait_for(acks.empty, "the acknowledgement to be sent")
        assert galaxy.reload(job_wrapper).state == model.Job.states.OK
    finally:
        runner.event_consumer.stop()
    assert queued_events(runner, broker) == []
    assert drain(runner) == []
