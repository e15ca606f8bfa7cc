"""The plugin's broker side against the real RabbitMQ: confirmed, mandatory publishing
refuses what cannot be routed; the consumer leaves an event queued until it is
acknowledged."""

import json
import os
import threading

import pytest
from harness import wait_until
from kombu import (
    Connection,
    Exchange,
    Producer,
    Queue,
)

from k8s_job_worker_galaxy.amqp import (
    ConfirmingPublisher,
    EventConsumer,
    Unroutable,
)


@pytest.fixture
def connection():
    """A kombu connection to the environment's RabbitMQ."""
    with Connection(os.environ["AMQP_URL"]) as connection:
        yield connection


def test_a_message_to_a_missing_queue_is_an_error(names):
    publisher = ConfirmingPublisher(os.environ["AMQP_URL"], confirm_timeout=5)
    try:
        with pytest.raises(Unroutable, match="NO_ROUTE"):
            publisher.publish(b"{}", routing_key=f"{names.request_queue}.nobody-declared-it")
    finally:
        publisher.close()


def test_a_routable_message_is_confirmed_and_persistent(names, connection):
    queue = Queue(f"{names.request_queue}.confirmed", exchange=Exchange(""), routing_key=f"{names.request_queue}.confirmed",
                  durable=True)
    queue(connection.default_channel).declare()
    publisher = ConfirmingPublisher(os.environ["AMQP_URL"], confirm_timeout=5)
    try:
        publisher.publish(b'{"n": 1}', routing_key=queue.name)
        publisher.publish(b'{"n": 2}', routing_key=queue.name)  # the same connection again
        bodies = []
        for _ in range(2):
            message = connection.default_channel.basic_get(queue.name, no_ack=True)
            assert message.properties["delivery_mode"] == 2
            bodies.append(json.loads(message.body))
        assert bodies == [{"n": 1}, {"n": 2}]
    finally:
        publisher.close()
        queue(connection.default_channel).delete()


def test_a_batch_is_pipelined_and_each_message_has_its_own_answer(names, connection):
    queue = Queue(f"{names.request_queue}.batch", exchange=Exchange(""), routing_key=f"{names.request_queue}.batch",
                  durable=True)
    queue(connection.default_channel).declare()
    publisher = ConfirmingPublisher(os.environ["AMQP_URL"], confirm_timeout=5)
    try:
        missing = f"{names.request_queue}.nobody-declared-it"
        batch = [(json.dumps({"n": n}).encode(), missing if n == 3 else queue.name, "") for n in range(200)]
        results = publisher.publish_many(batch)
        assert [n for n, error in enumerate(results) if error is not None] == [3]
        assert isinstance(results[3], Unroutable) and "NO_ROUTE" in str(results[3])
        bodies = []
        while (message := connection.default_channel.basic_get(queue.name, no_ack=True)) is not None:
            bodies.append(json.loads(message.body)["n"])
        assert bodies == [n for n in range(200) if n != 3]
        publisher.publish(b'{"n": "after"}', routing_key=queue.name)  # the channel is still good
    finally:
        publisher.close()
        queue(connection.default_channel).delete()


def test_an_event_stays_queued_until_acknowledged(names, connection):
    exchange = Exchange(names.result_exchange, type="topic", durable=True)
    queue_name = f"{names.result_exchange}.consumer-test"
    received = []
    acked = threading.Event()

    def consume(ack_it):
        """A started consumer that records events (and acknowledges them when ``ack_it``)."""
        def on_event(body, ack):
            """Records the event."""
            received.append(json.loads(body))
            if ack_it:
                ack()
                acked.set()

        consumer = EventConsumer(os.environ["AMQP_URL"], names.result_exchange, queue_name, ["inst.#"], on_event)
        consumer.start()
        wait_until(consumer.ready.is_set, "the consumer", 30)
        return consumer

    try:
        first = consume(ack_it=False)
        Producer(connection.default_channel, exchange=exchange).publish(
            json.dumps({"n": 1}), routing_key="inst.succeeded", declare=[exchange]
        )
        Producer(connection.default_channel, exchange=exchange).publish(
            json.dumps({"n": 2}), routing_key="other.succeeded"  # another instance's: not bound
        )
        wait_until(lambda: received, "the first delivery", 30)
        first.stop()  # not acknowledged: back in the queue
        second = consume(ack_it=True)
        wait_until(acked.is_set, "the redelivery", 30)
        wait_until(lambda: second._settled.empty(), "the acknowledgement to be sent", 30)
        second.stop()
        assert received == [{"n": 1}, {"n": 1}]
        message = connection.default_channel.basic_get(queue_name, no_ack=True)
        assert message is None  # acknowledged: gone
    finally:
        Queue(queue_name, exchange)(connection.default_channel).delete()
        exchange(connection.default_channel).delete()
