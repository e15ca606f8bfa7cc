"""The broker side of the runner, with kombu (which Galaxy already ships).

:class:`ConfirmingPublisher` publishes requests and control messages persistent, with
``mandatory`` and publisher confirms: a message the broker cannot route (the worker's queue
does not exist) or does not confirm is an exception for the caller, never a silent drop.

:class:`EventConsumer` is the one thread that consumes the handler's durable event queue.
Each event is handed to a callback together with an ``ack`` function that any thread may
call once Galaxy has recorded the event; the acknowledgement itself is sent by the consumer
thread (kombu channels are not thread-safe). After a reconnection, acknowledgements for
deliveries of the old channel are dropped: the broker redelivers those messages.
"""

import logging
import queue
import socket
import threading
import time
from typing import (
    Callable,
    Optional,
)

from kombu import (
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
    """Publishes JSON messages with ``mandatory`` and publisher confirms (thread-safe)."""

    def __init__(self, url: str, confirm_timeout: float = 10.0, retries: int = 3):
        self.url = url
        self.confirm_timeout = confirm_timeout
        self.retries = retries
        self._lock = threading.Lock()
        self._connection: Optional[Connection] = None
        self._producer: Optional[Producer] = None
        self._returned: list[str] = []

    def _on_return(self, exc, exchange, routing_key, message) -> None:
        self._returned.append(f"{exc} (exchange {exchange!r}, routing key {routing_key!r})")

    def _ensure_producer(self) -> Producer:
        if self._producer is None:
            connection = Connection(
                self.url, transport_options={"confirm_publish": True}, connect_timeout=self.confirm_timeout
            )
            connection.ensure_connection(max_retries=1)
            channel = connection.channel()
            events = getattr(channel, "events", None)  # py-amqp; kombu's memory:// cannot return
            if events is not None:
                events["basic_return"].add(self._on_return)
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

    def publish(self, body: bytes, routing_key: str, exchange: str = "", message_id: Optional[str] = None) -> None:
        """Publishes ``body`` and returns once the broker confirmed it.

        Raises :class:`Unroutable` at once when the broker returns the message, and
        :class:`PublishError` when it cannot be published after ``retries`` attempts
        (the connection is made again between attempts).
        """
        with self._lock:
            last_error: Optional[BaseException] = None
            for attempt in range(self.retries):
                if attempt:
                    time.sleep(min(0.2 * 2**attempt, 2.0))
                try:
                    producer = self._ensure_producer()
                    self._returned.clear()
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
                        timeout=self.confirm_timeout,
                    )
                except Exception as e:
                    if self._returned:
                        break  # the return, not the connection, is what went wrong
                    last_error = e
                    log.warning("publishing to %r failed (attempt %d): %s", routing_key, attempt + 1, e)
                    self._reset()
                    continue
                if not self._returned:
                    return
                break
            if self._returned:
                raise Unroutable(f"the broker returned the message: {'; '.join(self._returned)}")
            raise PublishError(f"could not publish to {routing_key!r}: {last_error}")

    def close(self) -> None:
        """Closes the connection."""
        with self._lock:
            self._reset()


class EventConsumer(threading.Thread):
    """Consumes one durable queue bound to a topic exchange, on its own thread.

    ``on_event(body, ack)`` is called on this thread for each delivery; ``on_idle()`` is
    called at least every ``idle_seconds``. Both run one at a time, so they may share state
    without locks.
    """

    def __init__(
        self,
        url: str,
        exchange: str,
        queue_name: str,
        binding_key: str,
        on_event: Callable[[bytes, Callable[[], None]], None],
        on_idle: Callable[[], None] = lambda: None,
        prefetch: int = 500,
        idle_seconds: float = 0.5,
    ):
        super().__init__(name=f"k8s-job-worker-events-{queue_name}", daemon=True)
        self.url = url
        self.exchange = Exchange(exchange, type="topic", durable=True)
        self.queue = Queue(queue_name, self.exchange, routing_key=binding_key, durable=True, auto_delete=False)
        self.on_event = on_event
        self.on_idle = on_idle
        self.prefetch = prefetch
        self.idle_seconds = idle_seconds
        self.ready = threading.Event()
        self._stopping = threading.Event()
        self._acks: "queue.Queue[tuple[int, object]]" = queue.Queue()
        self._generation = 0

    def stop(self, timeout: float = 10.0) -> None:
        """Stops consuming (unacknowledged deliveries return to the queue) and waits."""
        self._stopping.set()
        if self.is_alive():
            self.join(timeout)

    def _ack_function(self, message) -> Callable[[], None]:
        generation = self._generation
        done = threading.Event()

        def ack() -> None:
            """Queues the acknowledgement for the consumer thread (once)."""
            if not done.is_set():
                done.set()
                self._acks.put((generation, message))

        return ack

    def _send_acks(self) -> None:
        while True:
            try:
                generation, message = self._acks.get_nowait()
            except queue.Empty:
                return
            if generation == self._generation:
                message.ack()

    def _on_message(self, message) -> None:
        try:
            self.on_event(message.body, self._ack_function(message))
        except Exception:
            log.exception("handling an event failed; it stays unacknowledged until reconnection")

    def run(self) -> None:
        """Consumes until :meth:`stop`, reconnecting with backoff."""
        backoff = 0.1
        while not self._stopping.is_set():
            try:
                with Connection(self.url, heartbeat=30) as connection:
                    connection.ensure_connection(max_retries=1)
                    channel = connection.channel()
                    self._generation += 1
                    with Consumer(channel, queues=[self.queue], on_message=self._on_message, no_ack=False) as c:
                        c.qos(prefetch_count=self.prefetch)
                        log.info("consuming events from %s (binding %s)", self.queue.name, self.queue.routing_key)
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
            self._send_acks()
            try:
                connection.drain_events(timeout=0.1)
            except socket.timeout:
                connection.heartbeat_check()
            self._send_acks()
            now = time.monotonic()
            if now - last_idle >= self.idle_seconds:
                last_idle = now
                try:
                    self.on_idle()
                except Exception:
                    log.exception("event consumer idle task failed")
