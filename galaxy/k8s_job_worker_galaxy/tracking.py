"""What the runner knows about its jobs, shared by Galaxy's threads and the event consumer.

:class:`Tracker` holds the jobs this handler submitted or recovered (one entry per Galaxy
job, for its current attempt), the event ids already applied (events are delivered at least
once: a replay after a worker handover or the reply to a ``status`` request repeats them)
and the events that arrived for a job of this handler before the job was registered
(e.g. at start-up, before ``recover()`` ran). Thread-safe; no Galaxy or broker objects.
"""

import threading
import time
from collections import OrderedDict
from dataclasses import (
    dataclass,
    field,
)
from typing import (
    Any,
    Callable,
    Iterable,
    Optional,
)

from .messages import Event

#: Acknowledges an event once Galaxy recorded it (a :class:`~k8s_job_worker_galaxy.amqp.Delivery`,
#: which can also give it back with ``retry()``).
Ack = Callable[[], None]


def galaxy_attempt(state_history: Iterable[str]) -> int:
    """The attempt Galaxy is on: 1 + the ``resubmitted`` entries of the job's state history
    (as Galaxy's resubmission handler counts attempts)."""
    return 1 + sum(1 for state in state_history if state == "resubmitted")


@dataclass(eq=False)
class Tracked:
    """One job of this handler, for one attempt."""

    job_id: str
    attempt: int
    job_state: Any  # the runner's AsynchronousJobState
    running: bool = False
    finishing: bool = False  # a terminal event was handed to Galaxy
    registered_at: float = field(default_factory=time.monotonic)


@dataclass(eq=False)
class Held:
    """An event for a job of this handler that is not registered (yet)."""

    event: Event
    ack: Ack
    since: float = field(default_factory=time.monotonic)


class Tracker:
    """Registered jobs, applied event ids and held events (thread-safe)."""

    def __init__(self, seen_capacity: int = 100_000):
        self._lock = threading.Lock()
        self._jobs: dict[str, Tracked] = {}
        self._held: dict[str, list[Held]] = {}
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._seen_capacity = seen_capacity

    def register(self, job_id: str, attempt: int, job_state: Any, running: bool = False) -> Tracked:
        """Registers (or replaces) the job's entry; events held for it become releasable."""
        tracked = Tracked(job_id=job_id, attempt=attempt, job_state=job_state, running=running)
        with self._lock:
            self._jobs[job_id] = tracked
        return tracked

    def get(self, job_id: str) -> Optional[Tracked]:
        """The job's entry, if registered."""
        with self._lock:
            return self._jobs.get(job_id)

    def forget(self, tracked: Tracked) -> None:
        """Removes the entry, unless a newer one (a resubmission) replaced it already."""
        with self._lock:
            if self._jobs.get(tracked.job_id) is tracked:
                del self._jobs[tracked.job_id]

    def claim_terminal(self, tracked: Tracked) -> bool:
        """Marks the entry as finishing; False when a terminal event was already claimed."""
        with self._lock:
            if tracked.finishing:
                return False
            tracked.finishing = True
            return True

    def unclaim_terminal(self, tracked: Tracked) -> None:
        """Undoes :meth:`claim_terminal`: the event could not be applied and comes again."""
        with self._lock:
            tracked.finishing = False

    def forget_event(self, event_id: str) -> None:
        """Forgets that ``event_id`` was seen (it comes again, and must be applied then)."""
        with self._lock:
            self._seen.pop(event_id, None)

    def first_time(self, event_id: str) -> bool:
        """Remembers ``event_id``; False when it was seen before (a duplicate)."""
        with self._lock:
            if event_id in self._seen:
                return False
            self._seen[event_id] = None
            while len(self._seen) > self._seen_capacity:
                self._seen.popitem(last=False)
            return True

    def hold(self, event: Event, ack: Ack) -> None:
        """Keeps an event (unacknowledged) until its job is registered or known to be gone."""
        with self._lock:
            self._held.setdefault(event.job_id, []).append(Held(event, ack))

    def held_job_ids(self) -> list[str]:
        """Jobs with held events."""
        with self._lock:
            return list(self._held)

    def take_held(self, job_id: str) -> list[Held]:
        """Removes and returns the events held for ``job_id``."""
        with self._lock:
            return self._held.pop(job_id, [])

    def take_releasable(self) -> list[Held]:
        """Removes and returns the held events whose job is registered now, in arrival order."""
        with self._lock:
            ready = [job_id for job_id in self._held if job_id in self._jobs]
            return [held for job_id in ready for held in self._held.pop(job_id)]

    def tracked_jobs(self) -> list[Tracked]:
        """All registered entries."""
        with self._lock:
            return list(self._jobs.values())
