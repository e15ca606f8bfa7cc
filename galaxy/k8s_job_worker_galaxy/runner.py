"""Galaxy job runner that runs jobs on Kubernetes through k8s-job-worker.

Load it from ``job_conf.yml``::

    runners:
      k8s:
        load: k8s_job_worker_galaxy.runner:K8sJobWorkerJobRunner
        amqp_url_env: GALAXY_AMQP_URL
        k8s_galaxy_instance_id: main

``queue_job`` prepares the job as Galaxy's own Kubernetes runner does (the job script in
the job's working directory, run as ``<shell> -c "<job file>; exit $(cat <exit code file>)"``)
and hands its request to the outbox, which publishes it (confirmed) and tries again while the
broker is away; the worker creates the Kubernetes Job and reports what happened as events,
routed to this job handler alone, which one consumer thread turns into Galaxy state changes
(see :func:`k8s_job_worker_galaxy.messages.decide`).
"""

import contextlib
import json
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
from galaxy.jobs.runners.util import runner_states
from galaxy.jobs.runners.util.pykube_util import get_volume_mounts_for_job

from . import params as P
from .amqp import (
    ConfirmingPublisher,
    Delivery,
    EventConsumer,
    Outbox,
    RetryPolicy,
)
from .messages import (
    Action,
    binding_keys,
    build_control,
    build_request,
    decide,
    encode,
    entry_point_host,
    Event,
    interactive_request,
    MessageError,
    parse_event,
    wire_attempt,
)
from .tracking import (
    galaxy_attempt,
    Held,
    Tracked,
    Tracker,
)

log = logging.getLogger(__name__)

__all__ = ("K8sJobWorkerJobRunner",)

#: Kept for callers that imported it from here.
DESTINATION_PARAMS = P.DESTINATION_PARAMS

#: Every parameter the runner takes (see :mod:`k8s_job_worker_galaxy.params`).
RUNNER_PARAM_SPECS: dict[str, dict[str, Any]] = P.runner_param_specs()

#: The request as published, kept in the job's working directory: sent again, unchanged, when
#: the worker answers a recovered job's status with `unknown`.
REQUEST_FILE = "k8s_job_worker_request.json"

#: Galaxy job states in which Galaxy itself stops the job (an interactive tool's entry point
#: stopped, an admin's stop); their values (Galaxy's STOPPING is ``stop``).
STOPPED_STATES = (model.Job.states.STOPPING.value, model.Job.states.STOPPED.value)
#: Galaxy job states in which Galaxy itself is deleting or stopping the job.
STOPPING_STATES = (model.Job.states.DELETING.value, model.Job.states.DELETED.value, "deleted_new", *STOPPED_STATES)

#: Times an event whose effect Galaxy could not record is given back before the job is failed.
MAX_EVENT_RETRIES = 5

_HOLD = "hold"

# With stream_stdout_stderr the job script copies the tool's stdout/stderr to
# outputs/tool_stdout|tool_stderr with two background `tee`s and may end before they have
# even opened those files; a container's processes are killed when its main process ends, so
# the streams could be lost (seen under load: "No such file ... outputs/tool_stderr"). The
# script waits for its background tees (they end as soon as the tool has closed its output).
WAIT_FOR_STREAMS = "\n# k8s_job_worker_galaxy: let the stream copies finish before the pod ends\nwait\n"


def runner_ids(app) -> list[str]:
    """The ids of the runners of ``job_conf.yml`` that load this plugin."""
    plugins = getattr(getattr(app, "job_config", None), "runner_plugins", None) or []
    return [p.get("id") for p in plugins if isinstance(p, dict) and str(p.get("load", "")).endswith(":K8sJobWorkerJobRunner")]


def our_destinations(app) -> list[tuple[str, dict]]:
    """``(id, params)`` of the destinations whose runner loads this plugin."""
    ids = set(runner_ids(app))
    destinations = getattr(getattr(app, "job_config", None), "destinations", None) or {}
    if not isinstance(destinations, dict):
        return []
    return [
        (d.id, dict(d.params or {}))
        for group in destinations.values()
        for d in (group if isinstance(group, list) else [])
        if getattr(d, "runner", None) in ids
    ]


class K8sJobWorkerJobRunner(AsynchronousJobRunner[AsynchronousJobState]):
    """Runs Galaxy jobs as Kubernetes Jobs through k8s-job-worker (RabbitMQ)."""

    runner_name = "K8sJobWorkerRunner"
    start_methods = ["_init_worker_threads", "_init_outbox", "_init_event_consumer"]

    def __init__(self, app, nworkers: int, **kwargs) -> None:
        kwargs.setdefault("runner_param_specs", {}).update(RUNNER_PARAM_SPECS)
        super().__init__(app, nworkers, **kwargs)
        refused = P.refused_runner_params(self.runner_params.keys()) + P.refused_destination_params(
            our_destinations(app)
        )
        if refused:
            raise P.ConfigurationError("k8s-job-worker runner: " + "; ".join(refused))
        self._init_noop_monitor()
        rp = self.runner_params
        self.instance_id = P.instance_id(rp["k8s_galaxy_instance_id"])
        P.ingress_api_version(rp["k8s_ingress_api_version"])
        self.amqp_url = P.amqp_url(rp["amqp_url"], rp["amqp_url_env"], rp["amqp_url_file"])
        self.handler = str(app.config.server_name)
        self.tracker = Tracker()
        self.publisher = ConfirmingPublisher(self.amqp_url, confirm_timeout=rp["amqp_publish_timeout"])
        self.retry_policy = RetryPolicy(
            enabled=rp["amqp_publish_retry"],
            max_retries=rp["amqp_publish_retry_max_retries"],
            interval_start=rp["amqp_publish_retry_interval_start"],
            interval_step=rp["amqp_publish_retry_interval_step"],
            interval_max=rp["amqp_publish_retry_interval_max"],
            window=rp["amqp_publish_retry_window"],
        )
        self.outbox = Outbox(self.publisher, self.retry_policy)
        self.event_consumer: Optional[EventConsumer] = None
        self._last_held_check = 0.0
        self._event_retries: dict[str, int] = {}

    # --- names ------------------------------------------------------------------------

    @property
    def event_queue_name(self) -> str:
        """The durable queue of this job handler's events."""
        return self.runner_params["amqp_event_queue"] or (
            f"{self.runner_params['amqp_result_exchange']}.{self.instance_id}.{self.handler}"
        )

    def event_queue_arguments(self) -> dict:
        """The event queue's arguments: its type, and how long it lives unused."""
        arguments: dict = {}
        if self.runner_params["amqp_event_queue_type"] == "quorum":
            arguments["x-queue-type"] = "quorum"
        if self.runner_params["amqp_event_queue_expires"]:
            arguments["x-expires"] = int(self.runner_params["amqp_event_queue_expires"]) * 1000
        return arguments

    def external_id(self, job_id: str, attempt: int) -> str:
        """The worker's Job name for the job (Galaxy's decimal job ids):
        ``<prefix>-<instance id>-<job id>``, with ``-a<attempt>`` for a resubmission."""
        parts = [self.runner_params["k8s_job_name_prefix"], self.instance_id, job_id]
        if wire_attempt(attempt) is not None:
            parts.append(f"a{attempt}")
        return "-".join(part for part in parts if part)

    # --- start / stop -----------------------------------------------------------------

    def _init_outbox(self) -> None:
        self.outbox.start()

    def _init_event_consumer(self) -> None:
        self.event_consumer = EventConsumer(
            self.amqp_url,
            exchange=self.runner_params["amqp_result_exchange"],
            queue_name=self.event_queue_name,
            binding_keys=binding_keys(self.instance_id, self.handler),
            on_event=self._on_event_body,
            on_idle=self._on_idle,
            prefetch=self.runner_params["amqp_prefetch"],
            queue_arguments=self.event_queue_arguments(),
            unbind_keys=[f"{self.instance_id}.#"],  # earlier versions bound every event of the instance
        )
        self.event_consumer.start()

    def shutdown(self) -> None:
        """Stops the event consumer and the outbox, then Galaxy's worker threads."""
        if self.event_consumer is not None:
            self.event_consumer.stop()
        self.outbox.stop()
        super().shutdown()
        self.publisher.close()

    # --- requests ---------------------------------------------------------------------

    def destination_params(self, job_wrapper) -> dict[str, Any]:
        """Runner-level defaults overridden by the job destination's parameters."""
        params = {name: self.runner_params[name] for name in DESTINATION_PARAMS if self.runner_params[name]}
        if self.runner_params["k8s_pod_retries"] is not None:
            params.setdefault("max_pod_retries", self.runner_params["k8s_pod_retries"])
        params.update({k: v for k, v in job_wrapper.job_destination.params.items() if k in DESTINATION_PARAMS})
        for name in ("k8s_run_as_user_id", "k8s_run_as_group_id", "k8s_fs_group_id", "k8s_supplemental_group_id"):
            if params.get(name) == "$uid":
                params[name] = os.getuid()
            elif params.get(name) == "$gid":
                params[name] = self.app.config.gid
        return params

    def job_volumes(self, job_wrapper) -> list[str]:
        """The per-job mounts of ``k8s_working_volume_claim`` and ``k8s_data_volume_claim`` as
        Galaxy 26's runner makes them (its own ``get_volume_mounts_for_job``: the job's working
        directory, its inputs, its outputs' directories, each a sub-path of its claim), in the
        request's ``claim/sub/path:/mount/path[:r]`` form."""
        data, working = self.runner_params["k8s_data_volume_claim"], self.runner_params["k8s_working_volume_claim"]
        if not data and not working:
            return []
        mounts = get_volume_mounts_for_job(job_wrapper, data, working)
        return [
            f"{m['name']}/{m['subPath']}:{m['mountPath']}{':r' if m['readOnly'] else ''}" if m["subPath"]
            else f"{m['name']}:{m['mountPath']}{':r' if m['readOnly'] else ''}"
            for m in mounts
        ]

    def configure_entry_points(self, job_wrapper) -> list[dict[str, Any]]:
        """An interactive tool's entry points, configured as Galaxy's runner configures them
        (``interactivetool_manager``: each port's host is ``manual``, the Ingress routes it),
        then where each is routed: its port, its domain (``interactivetools_proxy_host``, with
        its subdomain when it requires a domain) and its path. Empty for other tools."""
        job = job_wrapper.get_job()
        # as Galaxy's runner tells an interactive job: guest ports, or entry points of the job
        guest_ports = job_wrapper.guest_ports or [ep.tool_port for ep in job.interactivetool_entry_points]
        if not guest_ports:
            return []
        manager = self.app.interactivetool_manager
        ports = {str(port): dict(host="manual", port=port, protocol="https") for port in guest_ports}
        manager.configure_entry_points(job, ports)
        proxy_host = entry_point_host(self.app.config.interactivetools_proxy_host)
        routed = []
        for entry_point in (ep for ep in job.interactivetool_entry_points if ep.configured and not ep.deleted):
            path = manager.get_entry_point_path(entry_point).split("?")[0]
            domain = proxy_host
            if entry_point.requires_domain:
                domain = f"{manager.get_entry_point_subdomain(entry_point)}.{proxy_host}"
                path = "/"
            routed.append({"port": int(entry_point.tool_port), "domain": domain, "path": path})
        return routed

    def remove_entry_points(self, job_wrapper) -> None:
        """An interactive tool's entry points close with its job (Galaxy's runner removes them
        with its Service and Ingress, which the worker removes)."""
        try:
            entry_points = job_wrapper.get_job().interactivetool_entry_points
            if entry_points:
                self.app.interactivetool_manager.remove_entry_points(entry_points)
        except Exception:
            log.exception("(%s) removing the job's entry points failed", job_wrapper.get_id_tag())

    def job_request(
        self, job_wrapper, job_state: AsynchronousJobState, attempt: int, entry_points: Optional[list] = None
    ) -> dict[str, Any]:
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
                "app.galaxyproject.org/handler": self.handler,
            },
            handler=self.handler,
            volumes=self.job_volumes(job_wrapper),
            interactive=interactive_request(entry_points or [], self.runner_params),
        )

    def queue_job(self, job_wrapper) -> None:
        """Prepares the job, registers it, then hands its request to the outbox."""
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
            request = self.job_request(job_wrapper, job_state, attempt, self.configure_entry_points(job_wrapper))
        except MessageError as e:
            job_wrapper.fail(f"Invalid Kubernetes job parameters: {e}")
            return
        body = encode(request)
        with open(os.path.join(job_wrapper.working_directory, REQUEST_FILE), "wb") as f:
            f.write(body)
        job_state.job_id = self.external_id(job_id, attempt)
        # registered before publishing: the worker's first event may come before we return
        job_wrapper.set_external_id(job_state.job_id)
        tracked = self.tracker.register(job_id, attempt, job_state)
        self._send_request(tracked, body)

    def _send_request(self, tracked: Tracked, body: bytes) -> None:
        """Hands a job's request to the outbox; a request the broker cannot take within the
        retry window fails the job (UNKNOWN_ERROR: resubmission rules apply)."""
        started = time.monotonic()

        def published() -> None:
            log.debug(
                "(%s/%s) request accepted by the broker (attempt %d) after %.1f ms",
                tracked.job_id,
                tracked.job_state.job_id,
                tracked.attempt,
                (time.monotonic() - started) * 1000,
            )

        def failed(reason: str) -> None:
            log.error("(%s) job request not accepted by the broker: %s", tracked.job_id, reason)
            if not self.tracker.claim_terminal(tracked):
                return  # an event finished it meanwhile
            self.tracker.forget(tracked)
            job_state = tracked.job_state
            job_state.runner_state = runner_states.UNKNOWN_ERROR
            job_state.fail_message = f"Could not submit the job to k8s-job-worker: {reason}"
            job_state.stop_job = False
            self.mark_as_failed(job_state)

        self.outbox.put(body, self.runner_params["amqp_request_queue"], f"request of job {tracked.job_id}", published, failed)

    def _control(self, job_id: str, action: str, attempt: int, reason: Optional[str] = None) -> bytes:
        return encode(build_control(job_id, action, attempt=wire_attempt(attempt), reason=reason, handler=self.handler))

    def stop_job(self, job_wrapper) -> None:
        """Asks the worker to cancel the job's Kubernetes Job (its pods are killed); the
        cancel is tried again while the broker is away, like a request."""
        job = job_wrapper.get_job()
        job_id = job.get_id_tag()
        tracked = self.tracker.get(job_id)
        attempt = tracked.attempt if tracked else galaxy_attempt(h.state for h in job.state_history)
        self.outbox.put(
            self._control(job_id, "cancel", attempt, reason="stopped by Galaxy"),
            self.runner_params["amqp_control_queue"],
            f"cancel of job {job_id}",
            lambda: log.debug("(%s/%s) cancel sent to k8s-job-worker", job_id, job.job_runner_external_id),
            lambda why: log.error("(%s) the cancel did not reach k8s-job-worker (%s): its pods run on", job_id, why),
        )

    def recover(self, job, job_wrapper) -> None:
        """Registers a job found queued/running at start-up and asks the worker for its state
        (in the background: a start with thousands of jobs does not wait for the broker)."""
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
        self.outbox.put(
            self._control(job_id, "status", attempt),
            self.runner_params["amqp_control_queue"],
            f"status of job {job_id}",
            on_failed=lambda why: self._status_not_sent(tracked, why),
        )

    def _status_not_sent(self, tracked: Tracked, reason: str) -> None:
        """A recovered job whose status request the broker never took: it still has its own
        events coming (if any); the request is re-sent, which the worker answers in any case."""
        log.warning("(%s) status request not accepted (%s); sending the request again", tracked.job_id, reason)
        self._resend(tracked)

    def _resend(self, tracked: Tracked) -> None:
        """Sends a job's request again, unchanged (the worker adopts or answers from what
        exists under its name; only a request it never saw starts a Job)."""
        path = os.path.join(tracked.job_state.job_wrapper.working_directory, REQUEST_FILE)
        try:
            with open(path, "rb") as f:
                body = f.read()
        except OSError:
            try:
                body = encode(self.job_request(tracked.job_state.job_wrapper, tracked.job_state, tracked.attempt))
            except Exception as e:
                log.exception("(%s) the request cannot be rebuilt", tracked.job_id)
                self._fail_tracked(tracked, runner_states.UNKNOWN_ERROR, f"Its request could not be sent again: {e}")
                return
        self._send_request(tracked, body)

    def _fail_tracked(self, tracked: Tracked, runner_state: str, message: str) -> None:
        if not self.tracker.claim_terminal(tracked):
            return
        self.tracker.forget(tracked)
        job_state = tracked.job_state
        job_state.runner_state, job_state.fail_message, job_state.stop_job = runner_state, message, False
        self.mark_as_failed(job_state)

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

    def _on_event_body(self, body: bytes, delivery: Delivery) -> None:
        try:
            event = parse_event(body)
        except MessageError as e:
            log.error("dropping a message that is not a k8s-job-worker event: %s", e)
            delivery()
            return
        if not self._trusted(event):
            delivery()
            return
        self.handle_event(event, delivery)

    def _trusted(self, event: Event) -> bool:
        """Whether an event is this Galaxy's: its instance id, and the Job name the worker
        gives its job (a second Galaxy on the same broker, or a forged event, is dropped)."""
        if event.instance_id != self.instance_id:
            log.warning("(%s) dropping an event of instance %r (this is %r)", event.job_id, event.instance_id, self.instance_id)
            return False
        if event.job_id.isdigit() and event.job_name and event.job_name != self.external_id(event.job_id, event.attempt or 1):
            log.warning("(%s) dropping an event naming Job %r, not this job's", event.job_id, event.job_name)
            return False
        return True

    def handle_event(self, event: Event, ack) -> None:
        """Applies one event (consumer thread); ``ack`` once Galaxy has recorded it (a
        :class:`Delivery`, or any callable that acknowledges)."""
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

    def _apply_event(self, tracked: Tracked, event: Event, ack) -> None:
        if (event.attempt or 1) != tracked.attempt:
            log.debug("(%s) %s event of attempt %s ignored (on %d)", event.job_id, event.state, event.attempt, tracked.attempt)
            ack()
            return
        if not self.tracker.first_time(event.event_id) and event.state != "unknown":
            ack()
            return
        galaxy_state, interactive = self._galaxy_state(tracked) if event.state == "cancelled" else (None, False)
        stopping = galaxy_state in STOPPING_STATES
        stopped_interactive = galaxy_state in STOPPED_STATES and interactive
        decision = decide(event, os.path.exists(tracked.job_state.exit_code_file), stopping, stopped_interactive)
        if decision.action is Action.NOTHING:
            if event.state == "cancelled":
                self._cancelled(tracked)
            ack()
        elif decision.action is Action.RUNNING:
            if not tracked.running and not tracked.finishing:
                self._mark_running(tracked)
            ack()
        elif decision.action is Action.RESEND:
            log.info("(%s) the worker has no Job of it (%s): sending its request again", event.job_id, event.reason)
            self._resend(tracked)
            ack()
        elif not self.tracker.claim_terminal(tracked):
            log.debug("(%s) %s event ignored: the job is finishing already", event.job_id, event.state)
            ack()
        else:
            job_state = tracked.job_state
            job_state.k8s_event, job_state.k8s_decision, job_state.k8s_ack = event, decision, ack
            job_state.k8s_tracked = tracked
            self.work_queue.put((self._apply_terminal, job_state))

    def _galaxy_state(self, tracked: Tracked) -> tuple[Optional[str], bool]:
        """The job's state as the database has it now (Galaxy may be deleting or stopping it),
        and whether it is an interactive tool's (it has entry points)."""
        with self._database_scope() as session:
            job = session.get(model.Job, int(tracked.job_id)) if tracked.job_id.isdigit() else None
            if job is None:
                return None, False
            # an enum member when this session set it, its value when read from the database
            return str(getattr(job.state, "value", job.state)), bool(job.interactivetool_entry_points)

    def _cancelled(self, tracked: Tracked) -> None:
        """A cancel Galaxy asked for came back: the job is done with; its working directory
        goes as Galaxy's own runner lets it go (``cleanup_job``)."""
        self.tracker.forget(tracked)
        job_wrapper = tracked.job_state.job_wrapper
        self.remove_entry_points(job_wrapper)
        if job_wrapper.cleanup_job in ("always", "onsuccess"):
            try:
                job_wrapper.cleanup()
            except Exception:
                log.exception("(%s) cleaning up the deleted job's files failed", tracked.job_id)

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
            if job.handler != self.handler:
                return f"the job belongs to handler {job.handler!r}"
            if job.state in model.Job.terminal_states:
                return f"the job is {job.state} already"
            if (event.attempt or 1) < galaxy_attempt(h.state for h in job.state_history):
                return "an earlier attempt"
            return _HOLD

    def _on_idle(self) -> None:
        for held in self.tracker.take_releasable():
            self.handle_event(held.event, held.ack)
        self._check_held()

    def _check_held(self) -> None:
        """Drops held events whose job finished or moved elsewhere meanwhile; an event whose
        job cannot be looked up now (the database is away) stays held."""
        now = time.monotonic()
        if now - self._last_held_check < self.runner_params["held_event_check_seconds"]:
            return
        self._last_held_check = now
        for job_id in self.tracker.held_job_ids():
            held: list[Held] = self.tracker.take_held(job_id)
            keep = []
            for item in held:
                try:
                    hold = self.tracker.get(job_id) is not None or self._unregistered_disposition(item.event) == _HOLD
                except Exception:
                    log.warning("(%s) cannot look up the job of a held event now; it stays held", job_id, exc_info=True)
                    hold = True
                if hold:
                    keep.append(item)
                else:
                    item.ack()
            for item in keep:
                self.tracker.hold(item.event, item.ack)

    # --- terminal events (Galaxy's worker threads) -------------------------------------

    def _apply_terminal(self, job_state: AsynchronousJobState) -> None:
        """Finishes or fails the job for its terminal event, then acknowledges the event. When
        Galaxy cannot record it (its database is away), the event is given back and comes
        again after a backoff; after a few times the job is failed instead."""
        event: Event = job_state.k8s_event
        decision = job_state.k8s_decision
        ack = job_state.k8s_ack
        tracked: Tracked = job_state.k8s_tracked
        try:
            state = job_state.job_wrapper.get_state()
            if state in model.Job.terminal_states or state == model.Job.states.DELETING:
                log.debug("(%s) %s event: the job is %s already", event.job_id, event.state, state)
            else:
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
            tries = self._event_retries.get(event.event_id, 0) + 1
            if tries < MAX_EVENT_RETRIES and hasattr(ack, "retry"):
                self._event_retries[event.event_id] = tries
                log.exception("(%s) applying the %s event failed (try %d); it comes back", event.job_id, event.state, tries)
                self.tracker.unclaim_terminal(tracked)
                self.tracker.forget_event(event.event_id)
                ack.retry()
                return
            log.exception("(%s) applying the %s event failed; failing the job", event.job_id, event.state)
            try:
                job_state.job_wrapper.fail(f"Unable to finish job after its {event.state} event", exception=True)
            except Exception:
                log.exception("(%s) failing the job failed too; the event comes back", event.job_id)
                self.tracker.unclaim_terminal(tracked)
                self.tracker.forget_event(event.event_id)
                getattr(ack, "retry", lambda: None)()
                return
        self._event_retries.pop(event.event_id, None)
        self.remove_entry_points(job_state.job_wrapper)
        self.tracker.forget(tracked)
        ack()

    def finish_job(self, job_state: AsynchronousJobState) -> None:
        """Sets metadata (the job script did not), then Galaxy's own finishing."""
        self._handle_metadata_externally(job_state.job_wrapper, resolve_requirements=True)
        super().finish_job(job_state)

    def fail_job(self, job_state, exception: bool = False, message: str = "Job failed", full_status=None) -> None:
        """Fails the job with the tool's stdout/stderr when its files exist, else the event's
        log tail (resubmission rules apply to the runner state, e.g.
        ``memory_limit_reached``)."""
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
