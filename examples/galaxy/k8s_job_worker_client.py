"""Galaxy-side client for k8s-job-worker: publish job requests and cancels, consume events.

Follows the message contract in ../../schemas/ (job-request.v1, job-cancel.v1, job-event.v1).
Uses pika (`pip install pika`). Galaxy itself uses kombu; the calls map one to one.

Command line (used by the project's tests):
    python k8s_job_worker_client.py --job-id 42 --command 'echo hi' --wait
"""

import argparse
import json
import os
import sys
import time

import pika

REQUEST_SCHEMA = "k8s-job-worker/job-request/v1"
CONTROL_SCHEMA = "k8s-job-worker/job-cancel/v1"
EVENT_SCHEMA = "k8s-job-worker/job-event/v1"
TERMINAL = {
    "succeeded", "failed", "oom_killed", "cancelled", "lost", "walltime_exceeded",
    "unschedulable", "image_pull_failed", "preempted", "node_lost",
}


class WorkerClient:
    """One connection to the broker; requests and cancels are published with confirms."""

    def __init__(self, url, request_queue="galaxy.k8s.requests", control_queue="galaxy.k8s.control",
                 result_exchange="galaxy.k8s.events"):
        self.connection = pika.BlockingConnection(pika.URLParameters(url))
        self.channel = self.connection.channel()
        self.channel.confirm_delivery()  # a publish raises unless the broker confirmed it
        self.request_queue = request_queue
        self.control_queue = control_queue
        self.result_exchange = result_exchange

    def _publish(self, queue, message):
        self.channel.basic_publish(
            exchange="", routing_key=queue, body=json.dumps(message).encode(), mandatory=True,
            properties=pika.BasicProperties(content_type="application/json", delivery_mode=2))

    def submit(self, job_id, command_line, image, **fields):
        """Publish a job request; `fields` are the other request fields (limits_memory, env, ...)."""
        request = {"schema": REQUEST_SCHEMA, "job_id": str(job_id), "command_line": command_line,
                   "image": image}
        request.update({k: v for k, v in fields.items() if v is not None})
        self._publish(self.request_queue, request)

    def cancel(self, job_id, reason=None):
        self._publish(self.control_queue, {"schema": CONTROL_SCHEMA, "job_id": str(job_id), "reason": reason})

    def status(self, job_id):
        """Ask the worker to republish a job's current state (e.g. after Galaxy restarts)."""
        self._publish(self.control_queue, {"schema": CONTROL_SCHEMA, "job_id": str(job_id), "action": "status"})

    def bind_events(self, queue="", instance="*"):
        """Declare a queue bound to the result exchange for `<instance>.<state>` events.

        Galaxy should use one durable, named queue per Galaxy instance so no event is missed
        while Galaxy restarts; the default here is a private queue for this process."""
        result = self.channel.queue_declare(queue=queue, durable=bool(queue), exclusive=not queue)
        self.channel.queue_bind(result.method.queue, self.result_exchange, routing_key=f"{instance}.*")
        return result.method.queue

    def events(self, queue, timeout=None):
        """Yield events as they arrive (acked after the caller has handled them); yields None
        after `timeout` seconds without one, so the caller can give up."""
        seen = set()
        for method, _props, body in self.channel.consume(queue, inactivity_timeout=timeout):
            if method is None:
                yield None
                continue
            event = json.loads(body)
            duplicate = event.get("event_id") in seen  # the worker may repeat an event: same id
            seen.add(event.get("event_id"))
            if not duplicate:
                yield event
            self.channel.basic_ack(method.delivery_tag)

    def close(self):
        self.connection.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--amqp-url", default=os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f"))
    parser.add_argument("--request-queue", default=os.environ.get("AMQP_REQUEST_QUEUE", "galaxy.k8s.requests"))
    parser.add_argument("--control-queue", default=os.environ.get("AMQP_CONTROL_QUEUE", "galaxy.k8s.control"))
    parser.add_argument("--result-exchange", default=os.environ.get("AMQP_RESULT_EXCHANGE", "galaxy.k8s.events"))
    parser.add_argument("--job-id", required=True)
    parser.add_argument("--command", required=True)
    parser.add_argument("--image", default="busybox:stable")
    parser.add_argument("--limits-memory", type=float)
    parser.add_argument("--wait", action="store_true", help="print events until a terminal one")
    parser.add_argument("--timeout", type=float, default=120)
    args = parser.parse_args()

    client = WorkerClient(args.amqp_url, args.request_queue, args.control_queue, args.result_exchange)
    queue = client.bind_events() if args.wait else None
    client.submit(args.job_id, args.command, args.image, limits_memory=args.limits_memory)
    print(f"submitted {args.job_id}", file=sys.stderr)
    if not args.wait:
        return 0
    deadline = time.monotonic() + args.timeout
    for event in client.events(queue, timeout=1):
        if event is not None and event["job_id"] == args.job_id:
            assert event["schema"] == EVENT_SCHEMA
            print(json.dumps(event), flush=True)
            if event["state"] in TERMINAL:
                client.close()
                return 0 if event["state"] == "succeeded" else 1
        if time.monotonic() > deadline:
            break
    print("no terminal event in time", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
