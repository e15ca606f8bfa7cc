"""Galaxy job runner that runs jobs on Kubernetes through k8s-job-worker.

Load it from ``job_conf.yml``::

    runners:
      k8s:
        load: k8s_job_worker_galaxy.runner:K8sJobWorkerJobRunner
        amqp_url: amqp://galaxy:secret@rabbitmq:5672/%2f
        k8s_galaxy_instance_id: main

``queue_job`` prepares the job as Galaxy's own Kubernetes runner does (the job script in
the job's working directory, run as ``<shell> -c "<job file>; exit $(cat <exit code file>)"``)
and publishes a job request; the worker creates the Kubernetes Job and reports what
happened as events, which one consumer thread per Galaxy job handler turns into Galaxy
state changes (see :data:`k8s_job_worker_galaxy.messages.EVENT_ACTIONS`).
"""

import contextlib
import logging
import os
import time
import uuid
from typing import (
    Any,
    Optional,
)

from galaxy import model
from galaxy.jobs.runners import (
    AsynchronousJobRunner,
    AsynchronousJobState,
)

from .amqp import (
    ConfirmingPublisher,
    EventConsumer,
    PublishError,
)
from .messages import (
    Action,
    build_control,
    build_request,
    decide,
    encode,
    Event,
    MessageError,
    parse_event,
    wire_attempt,
)
from .tracking import (
    Ack,
    galaxy_attempt,
    Held,
    Tracked,
    Tracker,
)

log = logging.getLogger(__name__)

__all__ = ("K8sJobWorkerJobRunner",)

#: Destination parameters sent with each request (Galaxy 26 Kubernetes runner names); each
#: may also be set on the runner as a default for every destination.
DESTINATION_PARAMS = (
    "requests_cpu",
    "requests_memory",
    "limits_cpu",
    "limits_memory",
    "max_pod_retries",
    "max_pod_retrials",
    "k8s_walltime_limit",
    "k8s_node_selector",
    "k8s_tolerations",
    "k8s_pod_priority_class",
    "k8s_run_as_user_id",
    "k8s_run_as_group_id",
    "k8s_extra_job_envs",
    "default_image",
)

RUNNER_PARAM_SPECS: dict[str, dict[str, Any]] = dict(
    amqp_url=dict(map=str, default="amqp://guest:guest@127.0.0.1:5672//"),
    amqp_request_queue=dict(map=str, default="galaxy.k8s.requests"),
    amqp_control_queue=dict(map=str, default="galaxy.k8s.control"),
    amqp_result_exchange=dict(map=str, default="galaxy.k8s.events"),
    # the handler's durable event queue; default <result exchange>.<instance id>.<server name>
    amqp_event_queue=dict(map=str, default=None),
    amqp_publish_timeout=dict(map=float, valid=lambda x: x > 0, default=10.0),
    amqp_prefetch=dict(map=int, valid=lambda x: x > 0, default=500),
    k8s_galaxy_instance_id=dict(map=str, default=None),
    # the worker's Job name prefix (K8S_JOB_NAME_PREFIX), for the external id Galaxy shows
    k8s_job_name_prefix=dict(map=str, default="galaxy"),
    # seconds after which events held for an unregistered job are checked against the database
    held_event_check_seconds=dict(map=float, default=10.0),
    **{name: dict(map=str, default=None) for name in DESTINATION_PARAMS if name != "default_image"},
    default_image=dict(map=str, default="python:3.12-slim"),
)

_HOLD = "hold"

# With stream_stdout_stderr the job script copies the tool's stdout/stderr to
# outputs/tool_stdout|tool_stderr with two background `tee`s and may end before they have
# even opened those files; a container's processes are killed when its main process ends, so
# the streams could be lost (seen under load: "No such file ... outputs/tool_stderr"). The
# script waits for its background tees (they end as soon as the tool has closed its output).
WAIT_FOR_STREAMS = "\n# k8s_job_worker_galaxy: let the stream copies finish before the pod ends\nwait\n"


class K8sJobWorkerJobRunner(AsynchronousJobRunner[AsynchronousJobState]):
    """Runs Galaxy jobs as Kubernetes Jobs through k8s-job-worker (RabbitMQ)."""

    runner_name = "K8sJobWorkerRunner"
    start_methods = ["_init_worker_threads", "_init_event_consumer"]

    def __init__(self, app, nworkers: int, **kwargs) -> None:
        kwargs.setdefault("runner_param_specs", {}).update(RUNNER_PARAM_SPECS)
        super().__init__(app, nworkers, **kwargs)
        self._init_noop_monitor()
        self.instance_id = self.runner_params["k8s_galaxy_instance_id"] or None
        self.tracker = Tracker()
        self.publisher = ConfirmingPublisher(
            self.runner_params["amqp_url"], confirm_timeout=self.runner_params["amqp_publish_timeout"]
        )
        self.event_consumer: Optional[EventConsumer] = None
        self._status_retries: dict[str, Tracked] = {}
        self._last_held_check = 0.0

    # --- names ------------------------------------------------------------------------

    @property
    def event_queue_name(self) -> str:
        """The durable queue of this job handler's events."""
        return self.runner_params["amqp_event_queue"] or (
            f"{self.runner_params['amqp_result_exchange']}.{self.instance_id or 'default'}.{self.app.config.server_name}"
        )

    @property
    def binding_key(self) -> str:
        """The routing pattern of this Galaxy instance's events (``<instance id>.#``)."""
        return f"{self.instance_id or 'default'}.#"

    def external_id(self, job_id: str, attempt: int) -> str:
        """The worker's Job name for the job (Galaxy's decimal job ids):
        ``<prefix>-<instance id>-<job id>``, with ``-a<attempt>`` for a resubmission."""
        parts = [self.runner_params["k8s_job_name_prefix"], self.instance_id, job_id]
        if wire_attempt(attempt) is not None:
            parts.append(f"a{attempt}")
        return "-".join(part for part in parts if part)

    # --- start / stop -----------------------------------------------------------------

    def _init_event_consumer(self) -> None:
        self.event_consumer = EventConsumer(
            self.runner_params["amqp_url"],
            exchange=self.runner_params["amqp_result_exchange"],
            queue_name=self.event_queue_name,
            binding_key=self.binding_key,
            on_event=self._on_event_body,
            on_idle=self._on_idle,
            prefetch=self.runner_params["amqp_prefetch"],
        )
        self.event_consumer.start()

    def shutdown(self) -> None:
        """Stops the event consumer, then Galaxy's worker threads."""
        if self.event_consumer is not None:
            self.event_consumer.stop()
        super().shutdown()
        self.publisher.close()

    # --- requests ---------------------------------------------------------------------

    def destination_params(self, job_wrapper) -> dict[str, Any]:
        """Runner-level defaults overridden by the job destination's parameters."""
        params = {name: self.runner_params[name] for name in DESTINATION_PARAMS if self.runner_params[name]}
        params.update({k: v for k, v in job_wrapper.job_destination.params.items() if k in DESTINATION_PARAMS})
        for name in ("k8s_run_as_user_id", "k8s_run_as_group_id"):
            if params.get(name) == "$uid":
                params[name] = os.getuid()
            elif params.get(name) == "$gid":
                params[name] = self.app.config.gid
        return params

    def job_request(self, job_wrapper, job_state: AsynchronousJobState, attempt: int) -> dict[str, Any]:
        """The request for a prepared job (its job script written to ``job_state.job_file``)."""
        params = self.destination_params(job_wrapper)
        container = self._find_container(job_wrapper)
        image = container.container_id if container else params.get("default_image")
        if not image:
            raise MessageError("no container image: enable docker_enabled or set default_image")
        tool = job_wrapper.tool
        return build_request(
            job_id=job_wrapper.get_id_tag(),
            attempt=wire_attempt(attempt),
            shell=job_wrapper.shell,
            command_line=f"{job_state.job_file}; exit $(cat {job_state.exit_code_file})",
            working_directory=job_wrapper.working_directory,
            image=image,
            destination_id=job_wrapper.job_destination.id,
            params=params,
            annotations={
                "app.galaxyproject.org/tool_id": str(tool.id),
                "app.galaxyproject.org/tool_version": str(tool.version),
                "app.galaxyproject.org/handler": str(self.app.config.server_name),
            },
        )

    def queue_job(self, job_wrapper) -> None:
        """Prepares the job, registers it, then publishes its request (confirmed)."""
        job_id = job_wrapper.get_id_tag()
        job_state = AsynchronousJobState(
            job_wrapper=job_wrapper, job_destination=job_wrapper.job_destination, files_dir=job_wrapper.working_directory
        )
        job_state.init_job_stream_files()
        if not self.prepare_job(
            job_wrapper, include_metadata=False, modify_command_for_container=False, stream_stdout_stderr=True
        ):
            return
        script = self.get_job_file(
            job_wrapper, exit_code_path=job_state.exit_code_file, shell=job_wrapper.shell, galaxy_virtual_env=None
        ) + WAIT_FOR_STREAMS
        try:
            self.write_executable_script(job_state.job_file, script, job_io=job_wrapper.job_io)
        except Exception:
            log.exception("(%s) failure writing the job script", job_id)
            job_wrapper.fail("Failure preparing Galaxy job script", exception=True)
            return
        attempt = galaxy_attempt(h.state for h in job_wrapper.get_job().state_history)
        try:
            request = self.job_request(job_wrapper, job_state, attempt)
        except MessageError as e:
            job_wrapper.fail(f"Invalid Kubernetes job parameters: {e}")
            return
        job_state.job_id = self.external_id(job_id, attempt)
        # registered before publishing: the worker's first event may come before we return
        job_wrapper.set_external_id(job_state.job_id)
        tracked = self.tracker.register(job_id, attempt, job_state)
        started = time.monotonic()
        try:
            self.publisher.publish(encode(request), routing_key=self.runner_params["amqp_request_queue"])
        except PublishError as e:
            self.tracker.forget(tracked)
            log.error("(%s) job request not accepted by the broker: %s", job_id, e)
            job_wrapper.fail(f"Could not submit the job to k8s-job-worker: {e}")
            return
        log.debug(
            "(%s/%s) submitted to k8s-job-worker (attempt %d), confirmed in %.1f ms",
            job_id,
            job_state.job_id,
            attempt,
            (time.monotonic() - started) * 1000,
        )

    def stop_job(self, job_wrapper) -> None:
        """Asks the worker to cancel the job's Kubernetes Job (its pods are killed)."""
        job = job_wrapper.get_job()
        job_id = job.get_id_tag()
        tracked = self.tracker.get(job_id)
        attempt = tracked.attempt if tracked else galaxy_attempt(h.state for h in job.state_history)
        try:
            self.publisher.publish(
                encode(build_control(job_id, "cancel", attempt=wire_attempt(attempt), reason="stopped by Galaxy")),
                routing_key=self.runner_params["amqp_control_queue"],
            )
            log.debug("(%s/%s) cancel sent to k8s-job-worker", job_id, job.job_runner_external_id)
        except PublishError:
            log.exception("(%s) could not send the cancel to k8s-job-worker", job_id)

    def recover(self, job, job_wrapper) -> None:
        """Registers a job found queued/running at start-up and asks the worker for its state."""
        external_id = job.get_job_runner_external_id()
        if external_id is None:
            self.put(job_wrapper)
            return
        job_id = job.get_id_tag()
        job_state = AsynchronousJobState(
            job_wrapper=job_wrapper,
            job_destination=job_wrapper.job_destination,
            files_dir=job_wrapper.working_directory,
            job_id=external_id,
        )
        running = job.state in (model.Job.states.RUNNING, model.Job.states.STOPPED)
        job_state.old_state = model.Job.states.RUNNING if running else model.Job.states.QUEUED
        job_state.running = running
        attempt = galaxy_attempt(h.state for h in job.state_history)
        tracked = self.tracker.register(job_id, attempt, job_state, running=running)
        log.debug("(%s/%s) recovered in state %s, asking the worker for its state", job_id, external_id, job.state)
        self._request_status(tracked)

    def _request_status(self, tracked: Tracked) -> None:
        try:
            self.publisher.publish(
                encode(build_control(tracked.job_id, "status", attempt=wire_attempt(tracked.attempt))),
                routing_key=self.runner_params["amqp_control_queue"],
            )
            self._status_retries.pop(tracked.job_id, None)
        except PublishError as e:
            log.warning("(%s) status request not sent (%s); retrying", tracked.job_id, e)
            self._status_retries[tracked.job_id] = tracked

    # --- events (consumer thread) -----------------------------------------------------

    @contextlib.contextmanager
    def _database_scope(self):
        """A database session of its own for the consumer thread, as Galaxy's monitors use."""
        scoped_id = str(uuid.uuid4())
        token = self.app.model.set_request_id(scoped_id)
        try:
            yield self.sa_session
        finally:
            self.app.model.unset_request_id(scoped_id)
            token.var.reset(token)  # the thread's previous session scope again

    def _on_event_body(self, body: bytes, ack: Ack) -> None:
        try:
            event = parse_event(body)
        except MessageError as e:
            log.error("dropping a message that is not a k8s-job-worker event: %s", e)
            ack()
            return
        self.handle_event(event, ack)

    def handle_event(self, event: Event, ack: Ack) -> None:
        """Applies one event (consumer thread); ``ack`` once Galaxy has recorded it."""
        log.debug("(%s) %s event received (attempt %d, id %s)", event.job_id, event.state, event.attempt or 1, event.event_id)
        tracked = self.tracker.get(event.job_id)
        if tracked is None:
            disposition = self._unregistered_disposition(event)
            if disposition == _HOLD:
                log.debug("(%s) %s event held until the job is registered", event.job_id, event.state)
                self.tracker.hold(event, ack)
            else:
                log.debug("(%s) %s event ignored: %s", event.job_id, event.state, disposition)
                ack()
            return
        for held in self.tracker.take_held(event.job_id):  # they came first: apply them first
            self._apply_event(tracked, held.event, held.ack)
        self._apply_event(tracked, event, ack)

    def _apply_event(self, tracked: Tracked, event: Event, ack: Ack) -> None:
        if (event.attempt or 1) != tracked.attempt:
            log.debug("(%s) %s event of attempt %s ignored (on %d)", event.job_id, event.state, event.attempt, tracked.attempt)
            ack()
            return
        if not self.tracker.first_time(event.event_id):
            ack()
            return
        decision = decide(event, os.path.exists(tracked.job_state.exit_code_file))
        if decision.action is Action.NOTHING:
            if event.state == "cancelled":
                self.tracker.forget(tracked)
            ack()
        elif decision.action is Action.RUNNING:
            if not tracked.running and not tracked.finishing:
                self._mark_running(tracked)
            ack()
        elif not self.tracker.claim_terminal(tracked):
            log.debug("(%s) %s event ignored: the job is finishing already", event.job_id, event.state)
            ack()
        else:
            job_state = tracked.job_state
            job_state.k8s_event, job_state.k8s_decision, job_state.k8s_ack = event, decision, ack
            job_state.k8s_tracked = tracked
            self.work_queue.put((self._apply_terminal, job_state))

    def _mark_running(self, tracked: Tracked) -> None:
        with self._database_scope():
            tracked.job_state.job_wrapper.change_state(model.Job.states.RUNNING)
        tracked.running = True
        tracked.job_state.running = True

    def _unregistered_disposition(self, event: Event) -> str:
        """Whether an event for a job that is not registered is held, or why it is dropped."""
        try:
            galaxy_job_id = int(event.job_id)
        except ValueError:
            return "not a Galaxy job id"
        with self._database_scope() as session:
            job = session.get(model.Job, galaxy_job_id)
            if job is None:
                return "no such job"
            if job.handler != self.app.config.server_name:
                return f"the job belongs to handler {job.handler!r}"
            if job.state in model.Job.terminal_states:
                return f"the job is {job.state} already"
            if (event.attempt or 1) < galaxy_attempt(h.state for h in job.state_history):
                return "an earlier attempt"
            return _HOLD

    def _on_idle(self) -> None:
        for held in self.tracker.take_releasable():
            self.handle_event(held.event, held.ack)
        for tracked in list(self._status_retries.values()):
            self._request_status(tracked)
        self._check_held()

    def _check_held(self) -> None:
        """Drops held events whose job finished or moved elsewhere meanwhile."""
        now = time.monotonic()
        if now - self._last_held_check < self.runner_params["held_event_check_seconds"]:
            return
        self._last_held_check = now
        for job_id in self.tracker.held_job_ids():
            held: list[Held] = self.tracker.take_held(job_id)
            keep = []
            for item in held:
                if self.tracker.get(job_id) is not None or self._unregistered_disposition(item.event) == _HOLD:
                    keep.append(item)
                else:
                    item.ack()
            for item in keep:
                self.tracker.hold(item.event, item.ack)

    # --- terminal events (Galaxy's worker threads) -------------------------------------

    def _apply_terminal(self, job_state: AsynchronousJobState) -> None:
        """Finishes or fails the job for its terminal event, then acknowledges the event."""
        event: Event = job_state.k8s_event
        decision = job_state.k8s_decision
        try:
            state = job_state.job_wrapper.get_state()
            if state in model.Job.terminal_states or state == model.Job.states.DELETING:
                log.debug("(%s) %s event: the job is %s already", event.job_id, event.state, state)
                return
            log.info(
                "(%s/%s) %s event (attempt %d): %s",
                event.job_id,
                job_state.job_id,
                event.state,
                event.attempt or 1,
                decision.action.value,
            )
            if decision.action is Action.FINISH:
                job_state.running = False
                self.finish_job(job_state)
            else:
                job_state.runner_state = decision.runner_state
                job_state.fail_message = decision.message
                job_state.stop_job = False  # the worker has stopped the Kubernetes Job already
                self.fail_job(job_state)
        except Exception:
            log.exception("(%s) applying the %s event failed", event.job_id, event.state)
            job_state.job_wrapper.fail(f"Unable to finish job after its {event.state} event", exception=True)
        finally:
            self.tracker.forget(job_state.k8s_tracked)
            job_state.k8s_ack()

    def finish_job(self, job_state: AsynchronousJobState) -> None:
        """Sets metadata (the job script did not), then Galaxy's own finishing."""
        self._handle_metadata_externally(job_state.job_wrapper, resolve_requirements=True)
        super().finish_job(job_state)

    def fail_job(self, job_state, exception: bool = False, message: str = "Job failed", full_status=None) -> None:
        """Fails the job with the tool's stdout/stderr when its files exist (resubmission
        rules apply to the runner state, e.g. ``memory_limit_reached``)."""
        job_state.job_wrapper.reclaim_ownership()
        full_status = full_status or self._tool_streams(job_state)
        super().fail_job(job_state, exception=exception, message=message, full_status=full_status)

    def _tool_streams(self, job_state) -> dict[str, str]:
        working_directory = job_state.job_wrapper.working_directory
        outputs = os.path.join(working_directory, "outputs")
        directory = outputs if os.path.isdir(outputs) else working_directory
        streams = {}
        for name in ("stdout", "stderr"):
            path = os.path.join(directory, f"tool_{name}")
            if os.path.exists(path):
                with open(path, "rb") as f:
                    streams[name] = self._job_io_for_db(f)
        event = getattr(job_state, "k8s_event", None)
        if "stdout" not in streams and event is not None and event.log_tail:
            streams["stdout"] = event.log_tail
        return streams
