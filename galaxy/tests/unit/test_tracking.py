"""The runner's bookkeeping: attempts, duplicates, held events."""

from conftest import (
    Acks,
    event,
)

from k8s_job_worker_galaxy.messages import parse_event
from k8s_job_worker_galaxy.tracking import (
    galaxy_attempt,
    Tracker,
)


def test_attempts_count_resubmissions_as_galaxy_does():
    assert galaxy_attempt(["new", "queued", "running"]) == 1
    assert galaxy_attempt(["new", "queued", "running", "resubmitted", "queued", "resubmitted", "queued"]) == 3


def test_event_ids_are_applied_once():
    tracker = Tracker(seen_capacity=2)
    assert tracker.first_time("a") and tracker.first_time("b")
    assert not tracker.first_time("a")
    assert tracker.first_time("c")
    assert tracker.first_time("a")  # forgotten beyond the capacity


def test_one_terminal_event_per_registration_and_a_resubmission_is_not_forgotten():
    tracker = Tracker()
    first = tracker.register("5", 1, job_state=None)
    assert tracker.claim_terminal(first)
    assert not tracker.claim_terminal(first)
    second = tracker.register("5", 2, job_state=None)
    tracker.forget(first)
    assert tracker.get("5") is second
    tracker.forget(second)
    assert tracker.get("5") is None


def test_held_events_are_released_in_order_once_their_job_is_registered():
    tracker = Tracker()
    acks = Acks()
    tracker.hold(parse_event(event(8, "running")), acks)
    tracker.hold(parse_event(event(8, "succeeded")), acks)
    tracker.hold(parse_event(event(9, "running")), acks)
    assert tracker.take_releasable() == []
    tracker.register("8", 1, job_state=None)
    assert [held.event.state for held in tracker.take_releasable()] == ["running", "succeeded"]
    assert tracker.held_job_ids() == ["9"]
    assert [held.event.job_id for held in tracker.take_held("9")] == ["9"]
    assert acks.count == 0
