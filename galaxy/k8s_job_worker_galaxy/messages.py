"""Messages exchanged with k8s-job-worker, and what an event means for Galaxy.

Pure functions only: building job requests and control messages from plain values
(``schemas/job-request.v1.json``, ``schemas/job-cancel.v1.json``), parsing result events
(``schemas/job-event.v1.json``) and the one table that maps an event onto a Galaxy action.
Nothing here touches Galaxy's application, database or the broker.
"""

import json
import re
from dataclasses import dataclass
from enum import Enum
from typing import (
    Any,
    Optional,
    Union,
)

import yaml

from galaxy.jobs.runners.util import runner_states
from galaxy.util.bytesize import ByteSize

REQUEST_SCHEMA = "k8s-job-worker/job-request/v1"
CONTROL_SCHEMA = "k8s-job-worker/job-cancel/v1"
EVENT_SCHEMA = "k8s-job-worker/job-event/v1"

# Destination parameters of resources (same names as Galaxy's Kubernetes runner and the
# request schema): CPUs pass through as numbers or quantities, memory is read as Galaxy 26
# reads it (ByteSize).
CPU_PARAMS = ("requests_cpu", "limits_cpu")
MEMORY_PARAMS = ("requests_memory", "limits_memory")
RESOURCE_PARAMS = CPU_PARAMS + MEMORY_PARAMS
_NUMBER = re.compile(r"^\s*[0-9]+(\.[0-9]*)?\s*$")


class MessageError(ValueError):
    """A message that does not follow the worker's schema."""


# --- requests -------------------------------------------------------------------------


def resource_value(value: Any, name: str = "") -> Optional[Union[int, float, str]]:
    """A destination's resource parameter as the request schema's ``ResourceValue``.

    Numbers stay numbers (``int`` = CPUs / gigabytes, ``float`` = millicores / megabytes, as
    Galaxy's Kubernetes runner reads them); numeric strings (XML job configurations give only
    strings) become numbers; other strings are Kubernetes quantities and pass through.
    Empty values are ``None`` (unset).
    """
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    text = str(value).strip()
    if not text:
        return None
    if _NUMBER.match(text):
        return float(text) if "." in text else int(text)
    return text


def memory_value(value: Any, name: str = "") -> Optional[str]:
    """A destination's memory parameter as Galaxy 26 reads it (``ByteSize``: a bare number is
    bytes, suffixes K/M/G/T/P/E are powers of 1000 and Ki/Mi/Gi/... of 1024, either case:
    ``4g``, ``4G``, ``4Gi``), sent as a Kubernetes quantity of bytes; ``None`` when empty or 0."""
    if value is None or isinstance(value, bool) or (isinstance(value, str) and not value.strip()):
        return None
    try:
        size = ByteSize(value.strip() if isinstance(value, str) else value).value
    except (ValueError, TypeError) as e:
        raise MessageError(f"{name} must be a size like 4G, 512Mi or a number of bytes, not {value!r} ({e})")
    if size < 0:
        raise MessageError(f"{name} must not be negative, not {value!r}")
    return str(int(round(size))) if size else None


def optional_int(value: Any, name: str) -> Optional[int]:
    """An integer parameter (``None`` or empty when unset); a clear error otherwise."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise MessageError(f"{name} must be an integer, not {value!r}")


def yaml_param(value: Any, name: str, kind: type) -> Any:
    """A parameter written as YAML (or already parsed, from ``job_conf.yml``), like the
    Kubernetes runner's ``k8s_node_selector``, ``k8s_tolerations``, ``k8s_extra_job_envs``;
    ``None`` when empty."""
    if value is None or value == "":
        return None
    parsed = yaml.safe_load(value) if isinstance(value, str) else value
    if parsed is not None and not isinstance(parsed, kind):
        raise MessageError(f"{name} must be a YAML {kind.__name__}, not {value!r}")
    return parsed or None


def string_map(value: Any, name: str) -> Optional[dict[str, str]]:
    """A YAML mapping parameter with string values (``k8s_node_selector``)."""
    mapping = yaml_param(value, name, dict)
    return {str(k): str(v) for k, v in mapping.items()} if mapping else None


def env_list(value: Any, name: str) -> Optional[list[dict[str, str]]]:
    """``k8s_extra_job_envs`` (a YAML mapping ``NAME: value``) as the request's ``env`` list."""
    mapping = yaml_param(value, name, dict)
    return [{"name": str(k), "value": str(v)} for k, v in mapping.items()] if mapping else None


def optional_str(value: Any, name: str) -> Optional[str]:
    """A string parameter; ``None`` when empty."""
    return str(value) if value not in (None, "") else None


def group_list(value: Any, name: str) -> Optional[list[int]]:
    """``k8s_supplemental_group_id`` (one id, as Galaxy's runner takes it) as the request's
    ``supplemental_groups``."""
    group = optional_int(value, name)
    return [group] if group else None


def pull_policy(value: Any, name: str) -> Optional[str]:
    """``k8s_pull_policy`` as Galaxy 26 reads it: ``Always``, ``IfNotPresent`` or ``Never``;
    anything else (its default ``Default``) leaves the policy unset."""
    return value if value in ("Always", "IfNotPresent", "Never") else None


def extended_resources(value: Any, name: str) -> Optional[dict[str, int]]:
    """``k8s_extended_resources`` (this plugin's: no Galaxy runner has one), a YAML mapping of
    extended resources to counts, ``{nvidia.com/gpu: 1}``."""
    mapping = yaml_param(value, name, dict)
    if not mapping:
        return None
    try:
        counts = {str(k): int(v) for k, v in mapping.items()}
    except (TypeError, ValueError):
        raise MessageError(f"{name} must map extended resources to counts, like {{nvidia.com/gpu: 1}}, not {value!r}")
    if any(count < 1 for count in counts.values()):
        raise MessageError(f"{name}: every count must be at least 1, not {value!r}")
    return counts


def pvc_list(value: Any, name: str) -> Optional[list[str]]:
    """``k8s_persistent_volume_claims`` (``claim[/subpath]:/mount/path[:r]``, comma-separated)
    as the request's ``volumes``."""
    if value is None:
        return None
    entries = value if isinstance(value, list) else str(value).split(",")
    return [str(e).strip() for e in entries if str(e).strip()] or None


#: Destination parameter → (request field, conversion); ``max_pod_retrials`` is the older
#: name of ``max_pod_retries`` (the newer wins). Every field is in job-request.v1.json.
PARAM_FIELDS: tuple[tuple[str, str, Any], ...] = (
    *((name, name, resource_value) for name in CPU_PARAMS),
    *((name, name, memory_value) for name in MEMORY_PARAMS),
    ("max_pod_retrials", "max_pod_retries", optional_int),
    ("max_pod_retries", "max_pod_retries", optional_int),
    ("k8s_walltime_limit", "walltime_seconds", optional_int),
    ("k8s_node_selector", "node_selector", string_map),
    ("k8s_tolerations", "tolerations", lambda value, name: yaml_param(value, name, list)),
    ("k8s_pod_priority_class", "priority_class", optional_str),
    ("k8s_run_as_user_id", "run_as_user", optional_int),
    ("k8s_run_as_group_id", "run_as_group", optional_int),
    ("k8s_extra_job_envs", "env", env_list),
    ("k8s_fs_group_id", "fs_group", optional_int),
    ("k8s_supplemental_group_id", "supplemental_groups", group_list),
    ("k8s_pull_policy", "pull_policy", pull_policy),
    ("k8s_affinity", "affinity", lambda value, name: yaml_param(value, name, dict)),
    ("k8s_extended_resources", "extended_resources", extended_resources),
    ("k8s_persistent_volume_claims", "volumes", pvc_list),
)


def job_metadata(value: Any, name: str = "k8s_job_metadata") -> tuple[dict[str, str], dict[str, str]]:
    """``k8s_job_metadata`` (YAML ``{labels: {...}, annotations: {...}}``, as Galaxy's runner
    puts it on the pod): its labels and annotations."""
    metadata = yaml_param(value, name, dict) or {}
    unknown = set(metadata) - {"labels", "annotations"}
    if unknown:
        raise MessageError(f"{name} has labels and annotations only, not {sorted(unknown)}")
    labels, annotations = metadata.get("labels") or {}, metadata.get("annotations") or {}
    if not isinstance(labels, dict) or not isinstance(annotations, dict):
        raise MessageError(f"{name}: labels and annotations are mappings, not {value!r}")
    return {str(k): str(v) for k, v in labels.items()}, {str(k): str(v) for k, v in annotations.items()}


def build_request(
    *,
    job_id: str,
    command_line: str,
    image: str,
    shell: Optional[str] = None,
    attempt: Optional[int] = None,
    working_directory: Optional[str] = None,
    destination_id: Optional[str] = None,
    params: Optional[dict[str, Any]] = None,
    annotations: Optional[dict[str, str]] = None,
    handler: Optional[str] = None,
    volumes: Optional[list[str]] = None,
    interactive: Optional[dict[str, Any]] = None,
) -> dict[str, Any]:
    """A job request (``schemas/job-request.v1.json``) from the job's values and its
    destination parameters (Galaxy 26 Kubernetes runner names, see the README)."""
    params = params or {}
    request: dict[str, Any] = {
        "schema": REQUEST_SCHEMA,
        "job_id": job_id,
        "command_line": command_line,
        "image": image,
    }
    if shell:
        request["shell"] = shell
    if attempt is not None:
        request["attempt"] = attempt
    if working_directory:
        request["working_directory"] = working_directory
    if destination_id:
        request["destination_id"] = str(destination_id)
    for param, field, convert in PARAM_FIELDS:
        value = convert(params.get(param), param)
        if value is not None:
            request[field] = value
    if volumes:
        request["volumes"] = [*request.get("volumes", []), *(v for v in volumes if v not in request.get("volumes", []))]
    labels, extra = job_metadata(params.get("k8s_job_metadata"))
    if labels:
        request["labels"] = labels
    if annotations or extra:
        request["annotations"] = {**extra, **(annotations or {})}
    if handler:
        request["handler"] = handler
    if interactive:
        request["interactive"] = interactive
    return request


def entry_point_host(proxy_host: str) -> str:
    """The host name of ``interactivetools_proxy_host`` (an Ingress rule's host has no port:
    ``localhost:4002`` routes ``localhost``)."""
    host = str(proxy_host or "").strip()
    if host.startswith("[") or host.count(":") != 1:
        return host
    return host.split(":", 1)[0]


def interactive_request(entry_points: list[dict[str, Any]], params: dict[str, Any]) -> Optional[dict[str, Any]]:
    """The request's ``interactive`` part of an interactive tool: its configured entry points
    (``port``, ``domain``, ``path``, as Galaxy's runner routes them) and the Ingress settings
    of the runner parameters (``k8s_interactivetools_*``); ``None`` for a job without entry
    points."""
    if not entry_points:
        return None
    part: dict[str, Any] = {"entry_points": entry_points}
    if params.get("k8s_interactivetools_ingress_class"):
        part["ingress_class"] = str(params["k8s_interactivetools_ingress_class"])
    if params.get("k8s_interactivetools_use_ssl"):
        part["tls"] = True
        if params.get("k8s_interactivetools_tls_secret"):
            part["tls_secret"] = str(params["k8s_interactivetools_tls_secret"])
    annotations = string_map(params.get("k8s_interactivetools_ingress_annotations"), "k8s_interactivetools_ingress_annotations")
    if annotations:
        part["annotations"] = annotations
    return part


def wire_attempt(attempt: int) -> Optional[int]:
    """The ``attempt`` a request, cancel or status message carries: none for a job's first
    attempt (its Kubernetes Job then keeps the runner's name ``<prefix>-<instance id>-<job
    id>``), the number for a resubmission (``...-a<attempt>``). An event without one is of
    attempt 1."""
    return attempt if attempt > 1 else None


def build_control(
    job_id: str,
    action: str,
    attempt: Optional[int] = None,
    reason: Optional[str] = None,
    handler: Optional[str] = None,
) -> dict:
    """A control message (``schemas/job-cancel.v1.json``): ``cancel`` or ``status``; the
    answer goes to ``handler``."""
    if action not in ("cancel", "status"):
        raise MessageError(f"unknown control action {action!r}")
    message: dict[str, Any] = {"schema": CONTROL_SCHEMA, "job_id": job_id, "action": action}
    if attempt is not None:
        message["attempt"] = attempt
    if reason:
        message["reason"] = reason
    if handler:
        message["handler"] = handler
    return message


def routing_word(name: str) -> str:
    """A name as one word of a topic routing key, as the worker writes it: ``%``, ``.``, ``*``
    and ``#`` as ``%25``, ``%2E``, ``%2A``, ``%23``."""
    return name.replace("%", "%25").replace(".", "%2E").replace("*", "%2A").replace("#", "%23")


def binding_keys(instance_id: str, handler: str) -> list[str]:
    """What a handler's event queue is bound to: its own jobs' events
    (``<instance>.<handler>.<state>``) and those that name no handler (``<instance>.<state>``:
    requests of an earlier plugin version)."""
    return [f"{instance_id}.{routing_word(handler)}.*", f"{instance_id}.*"]


def encode(message: dict) -> bytes:
    """A message as the UTF-8 JSON body the worker reads."""
    return json.dumps(message, separators=(",", ":")).encode("utf-8")


# --- events ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Event:
    """One result event from the worker (the fields the runner uses)."""

    event_id: str
    job_id: str
    state: str
    reason: str
    attempt: Optional[int] = None
    exit_code: Optional[int] = None
    job_name: str = ""
    log_tail: Optional[str] = None
    instance_id: Optional[str] = None
    handler: Optional[str] = None

    @property
    def terminal(self) -> bool:
        """Whether the worker reports nothing more for this Job generation after it."""
        return self.state in TERMINAL_STATES


def parse_event(body: Union[bytes, str, dict]) -> Event:
    """Reads a result event; :class:`MessageError` when it is not one."""
    if isinstance(body, (bytes, bytearray)):
        body = body.decode("utf-8")
    try:
        data = json.loads(body) if isinstance(body, str) else body
    except ValueError as e:
        raise MessageError(f"event is not JSON: {e}")
    if not isinstance(data, dict):
        raise MessageError("event is not a JSON object")
    if data.get("schema") != EVENT_SCHEMA:
        raise MessageError(f"not a {EVENT_SCHEMA} message: schema {data.get('schema')!r}")
    for name in ("event_id", "job_id", "state"):
        if not isinstance(data.get(name), str) or not data[name]:
            raise MessageError(f"event without {name}")
    if data["state"] not in EVENT_STATES:
        raise MessageError(f"unknown event state {data['state']!r}")
    attempt = data.get("attempt")
    exit_code = data.get("exit_code")
    if attempt is not None and not isinstance(attempt, int):
        raise MessageError(f"attempt {attempt!r} is not an integer")
    if exit_code is not None and not isinstance(exit_code, int):
        raise MessageError(f"exit_code {exit_code!r} is not an integer")
    return Event(
        event_id=data["event_id"],
        job_id=data["job_id"],
        state=data["state"],
        reason=str(data.get("reason") or ""),
        attempt=attempt,
        exit_code=exit_code,
        job_name=str(data.get("job_name") or ""),
        log_tail=data.get("log_tail"),
        instance_id=data.get("instance_id"),
        handler=data.get("handler"),
    )


# --- event -> Galaxy action -------------------------------------------------------------


class Action(Enum):
    """What the runner does with an event."""

    NOTHING = "nothing"  # acknowledged, no change (submitted, a cancel Galaxy asked for)
    RUNNING = "running"  # the job's state becomes RUNNING
    FINISH = "finish"  # finish_job: Galaxy reads the exit code, outputs and stdio rules
    FAIL = "fail"  # fail_job with a runner state (resubmission rules apply)
    RESEND = "resend"  # the worker has no Job of it: the request is sent again (idempotent)


@dataclass(frozen=True)
class Decision:
    """An action, and for FAIL the Galaxy runner state and the message for the job's info."""

    action: Action
    runner_state: Optional[str] = None
    message: Optional[str] = None


# One row per worker state: (action, runner state, message prefix for the job's info).
EVENT_ACTIONS: dict[str, tuple[Action, Optional[str], Optional[str]]] = {
    "submitted": (Action.NOTHING, None, None),
    "running": (Action.RUNNING, None, None),
    "succeeded": (Action.FINISH, None, None),
    "failed": (Action.FAIL, runner_states.UNKNOWN_ERROR, "Kubernetes job failed"),
    "oom_killed": (
        Action.FAIL,
        runner_states.MEMORY_LIMIT_REACHED,
        "Tool exceeded its memory limit (OOM killed)",
    ),
    "walltime_exceeded": (Action.FAIL, runner_states.WALLTIME_REACHED, "Job exceeded its walltime"),
    "unschedulable": (
        Action.FAIL,
        runner_states.WALLTIME_REACHED,
        "Job could not be scheduled within its time limit",
    ),
    "image_pull_failed": (Action.FAIL, runner_states.UNKNOWN_ERROR, "Container image could not be pulled"),
    "preempted": (Action.FAIL, runner_states.UNKNOWN_ERROR, "Job was preempted"),
    "node_lost": (Action.FAIL, runner_states.UNKNOWN_ERROR, "The node running the job was lost"),
    "lost": (Action.FAIL, runner_states.UNKNOWN_ERROR, "Kubernetes job was lost"),
    # a cancel Galaxy did not ask for (the worker's `cancel` command, a tombstone)
    "cancelled": (Action.FAIL, runner_states.UNKNOWN_ERROR, "The job was cancelled outside Galaxy"),
    # no Job of the job exists (the answer to a status request): not a verdict
    "unknown": (Action.RESEND, None, None),
}


#: Every state the worker reports (``JobState`` in ``schemas/job-event.v1.json``).
EVENT_STATES = frozenset(EVENT_ACTIONS)
#: States after which the worker reports nothing more for that Job generation.
TERMINAL_STATES = EVENT_STATES - {"submitted", "running", "unknown"}


def decide(
    event: Event, exit_code_file_exists: bool = False, stopping: bool = False, stopped_interactive: bool = False
) -> Decision:
    """The Galaxy action for an event.

    ``exit_code_file_exists``: the job script ran to its end (it wrote the exit code file).
    ``stopping``: Galaxy itself is deleting or stopping the job.
    ``stopped_interactive``: Galaxy stopped it (not deleted) and it is an interactive tool.

    - ``failed`` with an exit code is the tool's own failure when the job script ran: Galaxy
      finishes the job and judges the exit code and stdio rules itself. Without the exit code
      file the script never ran (no shell in the image, a start error): the job fails with
      the worker's reason.
    - ``lost`` (the Job is gone) and ``unknown`` (the worker has no Job of it) finish the job
      when its script ran to its end; otherwise ``lost`` fails it, and ``unknown`` sends the
      request again (its request may still wait in the queue; requests are idempotent).
    - ``cancelled`` is nothing more when Galaxy asked for it — but an interactive tool Galaxy
      stopped (its entry point's stop) is finished, as Galaxy's Kubernetes runner finishes it,
      so what it wrote is kept; otherwise someone cancelled the job outside Galaxy, and it
      fails with the reason.
    """
    if event.state in ("failed", "lost", "unknown") and exit_code_file_exists and (
        event.state != "failed" or event.exit_code is not None
    ):
        return Decision(Action.FINISH)
    if event.state == "cancelled" and stopping:
        return Decision(Action.FINISH if stopped_interactive else Action.NOTHING)
    if event.state == "failed" and event.exit_code is not None:
        prefix = f"The job script did not run (exit code {event.exit_code}, no exit code file)"
        return Decision(Action.FAIL, runner_states.UNKNOWN_ERROR, f"{prefix}: {event.reason}" if event.reason else prefix)
    action, runner_state, prefix = EVENT_ACTIONS[event.state]
    if action is not Action.FAIL:
        return Decision(action)
    message = f"{prefix}: {event.reason}" if event.reason else prefix
    return Decision(action, runner_state, message)
