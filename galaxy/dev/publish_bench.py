"""How fast the plugin's publisher hands messages to RabbitMQ: one confirmed publish at a
time (a job's request) against a pipelined batch (a recovering Galaxy's status requests), to
a durable classic and a quorum queue. Prints milliseconds per message.

    AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f python galaxy/dev/publish_bench.py [--messages N]
"""

import argparse
import os
import time
import uuid

from kombu import (
    Connection,
    Exchange,
    Queue,
)

from k8s_job_worker_galaxy.amqp import ConfirmingPublisher


def main() -> None:
    """Runs both modes against both queue types and prints the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args()
    url = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")
    body = b'{"version": 1, "job_id": "123456", "action": "status", "handler": "main"}'
    for queue_type in ("classic", "quorum"):
        name = f"publish-bench-{uuid.uuid4().hex[:6]}"
        with Connection(url) as connection:
            queue = Queue(name, Exchange(""), routing_key=name, durable=True,
                          queue_arguments={"x-queue-type": queue_type})
            queue(connection.default_channel).declare()
            publisher = ConfirmingPublisher(url)
            try:
                publisher.publish(body, name)  # connect first
                start = time.monotonic()
                for _ in range(args.messages):
                    publisher.publish(body, name)
                serial = (time.monotonic() - start) * 1000 / args.messages
                start = time.monotonic()
                for offset in range(0, args.messages, args.batch):
                    count = min(args.batch, args.messages - offset)
                    assert publisher.publish_many([(body, name, "")] * count) == [None] * count
                pipelined = (time.monotonic() - start) * 1000 / args.messages
            finally:
                publisher.close()
                queue(connection.default_channel).delete()
        print(f"{queue_type:8} {args.messages} messages: one at a time {serial:.3f} ms each, "
              f"pipelined (batches of {args.batch}) {pipelined:.3f} ms each ({serial / pipelined:.1f}x)")


if __name__ == "__main__":
    main()
