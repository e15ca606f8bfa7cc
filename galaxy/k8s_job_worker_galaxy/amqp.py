"""The broker side of the runner, with kombu (which Galaxy already ships).

:class:`ConfirmingPublisher` publishes requests and control messages persistent, with
``mandatory`` and publisher confirms: a message the broker cannot route (the worker's queue
does not exist) or does not confirm is an exception for the caller, never a silent drop. One
call is one attempt (a batch of messages is pipelined: sent together, confirmed together);
:class:`Outbox` is the one place that retries.

:class:`Outbox` is a thread that publishes what the runner hands it and, while the broker is
away, tries again with backoff (Pulsar's ``amqp_publish_retry_*`` parameters) until the
message's retry window is over; then it says so to the message's ``failed`` callback. A job
waiting for the broker blocks no other publish and no Galaxy worker thread.

:class:`EventConsumer` is the one thread that consumes the handler's durable event queue.
Each event is handed to a callback together with a :class:`Delivery` that any thread may
``ack()`` once Galaxy has recorded the event, or ``retry()`` when it could not (the event
comes back after a backoff, so a database outage does not spin). The acknowledgement itself is
sent by the consumer thread (kombu channels are not thread-safe). After a reconnection,
acknowledgements for deliveries of the old channel are dropped: the broker redelivers them.
"""

import heapq
import itertools
import logging
import queue
import socket
import threading
import time
import uuid
from dataclasses import (
    dataclass,
    field,
)
from typing import (
    Callable,
    Optional,
)

from kombu import (
    binding,
    Connection,
    Consumer,
    Exchange,
    Producer,
    Queue,
)

log = logging.getLogger(__name__)

#: Errors after which the connection is dropped and made again.
RECOVERABLE = (OSError, ConnectionError)


class PublishError(Exception):
    """A message was not accepted by the broker."""


class Unroutable(PublishError):
    """The broker returned a ``mandatory`` message: no queue is bound for its routing key."""


def connection_errors(connection: Connection) -> tuple:
    """The exceptions that mean ``connection`` (or its channel) is broken."""
    return RECOVERABLE + tuple(connection.connection_errors) + tuple(connection.channel_errors)


class ConfirmingPublisher:
    """Publishes JSON messages with ``mandatory`` and publisher confirms (thread-safe).

    Messages handed over together are pipelined: all are sent, then their confirms are awaited
    together (a recovering Galaxy's thousands of status requests take one round trip, not one
    each).
    """

    def __init__(self, url: str, confirm_timeout: float = 10.0):
        self.url = url
        self.confirm_timeout = confirm_timeout
        self._lock = threading.Lock()
        self._connection: Optional[Connection] = None
        self._producer: Optional[Producer] = None
        self._confirms = False
        self._tags = itertools.count(1)
        self._unsettled: dict[int, str] = {}  # delivery tag -> message id, until (n)acked
        self._nacked: set[str] = set()
        self._returned: dict[str, str] = {}  # message id -> why the broker returned it

    def _on_return(self, exc, exchange, routing_key, message) -> None:
        message_id = (getattr(message, "properties", None) or {}).get("message_id")
        self._returned[message_id] = f"{exc} (exchange {exchange!r}, routing key {routing_key!r})"

    def _on_ack(self, delivery_tag: int, multiple: bool) -> None:
        self._settle(delivery_tag, multiple, nacked=False)

    def _on_nack(self, delivery_tag: int, multiple: bool) -> None:
        self._settle(delivery_tag, multiple, nacked=True)

    def _settle(self, delivery_tag: int, multiple: bool, nacked: bool) -> None:
        tags = [t for t in self._unsettled if t <= delivery_tag] if multiple else [delivery_tag]
        for tag in tags:
            message_id = self._unsettled.pop(tag, None)
            if nacked and message_id is not None:
                self._nacked.add(message_id)

    def _ensure_producer(self) -> Producer:
        if self._producer is None:
            connection = Connection(self.url, connect_timeout=self.confirm_timeout)
            connection.ensure_connection(max_retries=1)
            channel = connection.channel()
            self._tags, self._unsettled = itertools.count(1), {}
            events = getattr(channel, "events", None)
            # py-amqp; kombu's memory:// (unit tests) neither confirms nor returns
            self._confirms = events is not None and hasattr(channel, "confirm_select")
            if self._confirms:
                channel.confirm_select()
                events["basic_return"].add(self._on_return)
                events["basic_ack"].add(self._on_ack)
                events["basic_nack"].add(self._on_nack)
            self._connection = connection
            self._producer = Producer(channel)
        return self._producer

    def _reset(self) -> None:
        connection, self._connection, self._producer = self._connection, None, None
        if connection is not None:
            try:
                connection.release()
            except Exception:
                log.debug("closing a broken publisher connection", exc_info=True)

    def _await_confirms(self, message_ids: set[str]) -> None:
        deadline = time.monotonic() + self.confirm_timeout
        while self._confirms and message_ids & set(self._unsettled.values()):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no confirm within {self.confirm_timeout:g} s")
            try:
                self._connection.drain_events(timeout=remaining)
            except socket.timeout:
                pass

    def publish(self, body: bytes, routing_key: str, exchange: str = "") -> None:
        """Publishes ``body`` and returns when the broker confirmed it.

        Raises :class:`Unroutable` when the broker returns the message, and
        :class:`PublishError` when it was not confirmed (the connection is made again on the
        next call).
        """
        (error,) = self.publish_many([(body, routing_key, exchange)])
        if error is not None:
            raise error

    def publish_many(self, messages: list[tuple[bytes, str, str]]) -> list[Optional[PublishError]]:
        """Publishes ``(body, routing key, exchange)`` messages, pipelined; for each, ``None``
        when the broker confirmed it, else the :class:`PublishError` (:class:`Unroutable`
        when it returned it)."""
        with self._lock:
            ids = [uuid.uuid4().hex for _ in messages]
            failure = None
            try:
                producer = self._ensure_producer()
                for message_id, (body, routing_key, exchange) in zip(ids, messages):
                    if self._confirms:
                        self._unsettled[next(self._tags)] = message_id
                    producer.publish(
                        body,
                        exchange=exchange,
                        routing_key=routing_key,
                        mandatory=True,
                        delivery_mode=2,
                        content_type="application/json",
                        content_encoding="utf-8",
                        serializer=None,
                        message_id=message_id,
                    )
                self._await_confirms(set(ids))
            except Exception as e:
                failure = e
                self._reset()
            results: list[Optional[PublishError]] = []
            for message_id, (_, routing_key, _) in zip(ids, messages):
                if message_id in self._returned:
                    results.append(Unroutable(f"the broker returned the message: {self._returned.pop(message_id)}"))
                elif failure is not None:
                    results.append(PublishError(f"could not publish to {routing_key!r}: {failure}"))
                elif message_id in self._nacked:
                    self._nacked.discard(message_id)
                    results.append(PublishError(f"the broker refused (nacked) the message to {routing_key!r}"))
                else:
                    results.append(None)
            if failure is not None:
                self._unsettled.clear()
                self._nacked.clear()
            return results

    def close(self) -> None:
        """Closes the connection."""
        with self._lock:
            self._reset()


@dataclass(frozen=True)
class RetryPolicy:
    """How the outbox tries again while the broker is away (Pulsar's
    ``amqp_publish_retry*`` parameters): waits ``interval_start`` s, then ``interval_step`` s
    more each time, at most ``interval_max`` s; gives up after ``max_retries`` tries again
    (``None``: no count) or once ``window`` s passed since the message was handed over.
    ``enabled=False``: one attempt."""

    enabled: bool = True
    max_retries: Optional[int] = None
    interval_start: float = 1.0
    interval_step: float = 2.0
    interval_max: float = 30.0
    window: float = 600.0

    def wait(self, retries: int) -> float:
        """The wait before try again number ``retries`` (1 for the first)."""
        return min(self.interval_start + self.interval_step * (retries - 1), self.interval_max)

    def gives_up(self, retries: int, since: float, now: float) -> bool:
        """Whether a message tried ``retries`` times again since ``since`` is given up now."""
        if not self.enabled:
            return True
        if self.max_retries is not None and retries >= self.max_retries:
            return True
        return now - since >= self.window


@dataclass(order=True)
class _Pending:
    due: float
    seq: int
    body: bytes = field(compare=False)
    routing_key: str = field(compare=False)
    what: str = field(compare=False)
    since: float = field(compare=False)
    on_published: Callable[[], None] = field(compare=False)
    on_failed: Callable[[str], None] = field(compare=False)
    retries: int = field(default=0, compare=False)
    last_error: str = field(default="", compare=False)


class Outbox(threading.Thread):
    """Publishes what it is handed, in order of due time, retrying while the broker is away.

    ``put(body, routing_key, what, on_published, on_failed)`` returns at once; the callbacks
    run on the outbox thread. The messages due together are published together, pipelined. A message the broker returns (no queue for its routing key) is
    not retried: that is a configuration, not an outage. The broker being away is said once in
    the log, and once when it is back.
    """

    #: At most this many messages are published (pipelined) in one attempt.
    BATCH = 256

    def __init__(self, publisher: ConfirmingPublisher, policy: RetryPolicy, clock=time.monotonic):
        super().__init__(name="k8s-job-worker-outbox", daemon=True)
        self.publisher = publisher
        self.policy = policy
        self.clock = clock
        self._heap: list[_Pending] = []
        self._cv = threading.Condition()
        self._seq = itertools.count()
        self._stopping = False
        self._away_since: Optional[float] = None

    def put(
        self,
        body: bytes,
        routing_key: str,
        what: str,
        on_published: Callable[[], None] = lambda: None,
        on_failed: Callable[[str], None] = lambda reason: None,
    ) -> None:
        """Hands a message over (it is published as soon as possible)."""
        now = self.clock()
        item = _Pending(now, next(self._seq), body, routing_key, what, now, on_published, on_failed)
        with self._cv:
            heapq.heappush(self._heap, item)
            self._cv.notify()

    def pending(self) -> int:
        """Messages not published yet."""
        with self._cv:
            return len(self._heap)

    def flush(self) -> int:
        """Attempts every message once, now, on the calling thread (the outbox of a runner
        whose threads are not started: tests); how many there were."""
        with self._cv:
            items = sorted(self._heap)
            self._heap.clear()
        if items:
            self.attempt(items)
        return len(items)

    def stop(self, timeout: float = 5.0) -> None:
        """Stops the thread (what is not published yet is left: recovery asks again)."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self.is_alive():
            self.join(timeout)

    def run(self) -> None:
        """Publishes due messages until :meth:`stop`."""
        while True:
            with self._cv:
                while not self._stopping and (not self._heap or self._heap[0].due > self.clock()):
                    self._cv.wait(None if not self._heap else max(0.0, self._heap[0].due - self.clock()))
                if self._stopping:
                    return
                now = self.clock()
                items = []
                while self._heap and self._heap[0].due <= now and len(items) < self.BATCH:
                    items.append(heapq.heappop(self._heap))
            self.attempt(items)

    def attempt(self, items: list[_Pending]) -> None:
        """One attempt at each of ``items``, pipelined (the outbox thread's step; tests call it
        directly)."""
        results = self.publisher.publish_many([(item.body, item.routing_key, "") for item in items])
        for item, error in zip(items, results):
            if error is None:
                self._back()
                self._call(item.on_published)
            elif isinstance(error, Unroutable):
                self._back()
                self._call(item.on_failed, str(error))
            else:
                self._retry_later(item, error)

    def _retry_later(self, item: _Pending, error: PublishError) -> None:
        self._away(str(error))
        item.retries += 1
        item.last_error = str(error)
        now = self.clock()
        if self.policy.gives_up(item.retries, item.since, now):
            waited = now - item.since
            self._call(item.on_failed, f"not accepted by the broker within {waited:.0f} s: {item.last_error}")
            return
        item.due = now + self.policy.wait(item.retries)
        with self._cv:
            heapq.heappush(self._heap, item)

    def _away(self, error: str) -> None:
        if self._away_since is None:
            self._away_since = self.clock()
            log.warning("the broker does not accept messages (%s); holding them and trying again", error)

    def _back(self) -> None:
        if self._away_since is not None:
            log.info("the broker accepts messages again after %.1f s", self.clock() - self._away_since)
            self._away_since = None

    @staticmethod
    def _call(callback, *args) -> None:
        try:
            callback(*args)
        except Exception:
            log.exception("an outbox callback failed")


class Delivery:
    """One event delivery: ``ack()`` once Galaxy recorded it, ``retry()`` when it could not
    (it comes back after a backoff). Either may be called from any thread, once."""

    def __init__(self, consumer: "EventConsumer", message, generation: int):
        self._consumer = consumer
        self._message = message
        self._generation = generation
        self._done = threading.Event()

    def ack(self) -> None:
        """Acknowledges the event (sent by the consumer thread)."""
        if not self._done.is_set():
            self._done.set()
            self._consumer._settle(self._generation, self._message, requeue=False)

    def retry(self) -> None:
        """Gives the event back to the queue after a backoff (sent by the consumer thread)."""
        if not self._done.is_set():
            self._done.set()
            self._consumer._settle(self._generation, self._message, requeue=True)

    __call__ = ack


class EventConsumer(threading.Thread):
    """Consumes one durable queue bound to a topic exchange, on its own thread.

    ``on_event(body, delivery)`` is called on this thread for each delivery; an exception it
    raises gives the event back (after a backoff). ``on_idle()`` is called at least every
    ``idle_seconds``. Both run one at a time, so they may share state without locks.
    """

    def __init__(
        self,
        url: str,
        exchange: str,
        queue_name: str,
        binding_keys: list[str],
        on_event: Callable[[bytes, Delivery], None],
        on_idle: Callable[[], None] = lambda: None,
        prefetch: int = 500,
        idle_seconds: float = 0.5,
        queue_arguments: Optional[dict] = None,
        unbind_keys: Optional[list[str]] = None,
        clock=time.monotonic,
    ):
        super().__init__(name=f"k8s-job-worker-events-{queue_name}", daemon=True)
        self.url = url
        self.exchange = Exchange(exchange, type="topic", durable=True)
        self.queue_name = queue_name
        self.binding_keys = binding_keys
        self.queue_arguments = queue_arguments or {}
        self.unbind_keys = unbind_keys or []
        self.on_event = on_event
        self.on_idle = on_idle
        self.prefetch = prefetch
        self.idle_seconds = idle_seconds
        self.clock = clock
        self.ready = threading.Event()
        self._stopping = threading.Event()
        self._settled: "queue.Queue[tuple[int, object, bool]]" = queue.Queue()
        self._later: list[tuple[float, int, int, object]] = []  # (due, seq, generation, message)
        self._seq = itertools.count()
        self._generation = 0
        self._failures = 0  # consecutive retries: the backoff grows with them

    def declare(self, channel) -> Queue:
        """The handler's queue, bound for each routing pattern and to nothing of
        ``unbind_keys`` (bindings of earlier versions), idempotent."""
        bindings = [binding(self.exchange, routing_key=key) for key in self.binding_keys]
        q = Queue(self.queue_name, bindings=bindings, durable=True, auto_delete=False,
                  queue_arguments=self.queue_arguments)
        bound = q(channel)
        bound.declare()
        for key in self.unbind_keys:
            bound.unbind_from(self.exchange, routing_key=key)
        return q

    def stop(self, timeout: float = 10.0) -> None:
        """Stops consuming (unacknowledged deliveries return to the queue) and waits."""
        self._stopping.set()
        if self.is_alive():
            self.join(timeout)

    def _settle(self, generation: int, message, requeue: bool) -> None:
        self._settled.put((generation, message, requeue))

    def backoff(self) -> float:
        """The wait before a given-back event returns: 1 s doubling to 30 s while events keep
        failing (reset by one that goes through)."""
        return min(2.0 ** max(self._failures - 1, 0), 30.0)

    def _send_settlements(self) -> None:
        while True:
            try:
                generation, message, requeue = self._settled.get_nowait()
            except queue.Empty:
                break
            if generation != self._generation:
                continue  # a delivery of a dead channel: the broker gives it again
            if requeue:
                self._failures += 1
                heapq.heappush(self._later, (self.clock() + self.backoff(), next(self._seq), generation, message))
            else:
                self._failures = 0
                message.ack()
        now = self.clock()
        while self._later and self._later[0][0] <= now:
            _, _, generation, message = heapq.heappop(self._later)
            if generation == self._generation:
                message.requeue()

    def _on_message(self, message) -> None:
        delivery = Delivery(self, message, self._generation)
        try:
            self.on_event(message.body, delivery)
        except Exception:
            log.exception("handling an event failed; it comes back after a backoff")
            delivery.retry()

    def run(self) -> None:
        """Consumes until :meth:`stop`, reconnecting with backoff."""
        backoff = 0.1
        while not self._stopping.is_set():
            try:
                with Connection(self.url, heartbeat=30) as connection:
                    connection.ensure_connection(max_retries=1)
                    channel = connection.channel()
                    self._generation += 1
                    self._later.clear()  # their messages come back with the old channel
                    queue_ = self.declare(channel)
                    with Consumer(channel, queues=[queue_], on_message=self._on_message, no_ack=False) as c:
                        c.qos(prefetch_count=self.prefetch)
                        log.info("consuming events from %s (bindings %s)", self.queue_name, self.binding_keys)
                        self.ready.set()
                        backoff = 0.1
                        self._consume(connection)
            except Exception as e:
                self.ready.clear()
                if self._stopping.is_set():
                    break
                log.warning("event consumer lost the broker (%s); reconnecting in %.1f s", e, backoff)
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, 5.0)
        self.ready.clear()

    def _consume(self, connection: Connection) -> None:
        last_idle = 0.0
        while not self._stopping.is_set():
            self._send_settlements()
            try:
                connection.drain_events(timeout=0.1)
            except socket.timeout:
                connection.heartbeat_check()
            self._send_settlements()
            now = self.clock()
            if now - last_idle >= self.idle_seconds:
                last_idle = now
                try:
                    self.on_idle()
                except Exception:
                    log.exception("event consumer idle task failed")
