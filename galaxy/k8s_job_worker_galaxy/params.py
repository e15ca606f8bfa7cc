"""The runner's parameters: its own (the broker, the retry window) and every parameter of
Galaxy 26's Kubernetes runner, each either honoured or refused when Galaxy loads the runner,
with a message that says where it goes instead. Pure: nothing here touches Galaxy's
application or the broker.

Galaxy gives ``valid=`` the value as written (a string from an XML job configuration, a
number or a boolean from YAML), so every check here reads strings too.
"""

import os
import re
from typing import (
    Any,
    Callable,
    Optional,
)

#: Galaxy's rule for instance ids (``pykube_util``): 1-20 of ``[a-z0-9-]``, not starting or
#: ending with ``-``.
INSTANCE_ID = re.compile(r"^(?!-)[a-z\d-]{1,20}(?<!-)$")


class ConfigurationError(Exception):
    """A runner or destination parameter this runner refuses (Galaxy does not start)."""


def to_bool(value: Any) -> bool:
    """``true``/``false``/``yes``/``no``/``1``/``0`` as written in XML or YAML."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "yes", "on", "1"):
        return True
    if text in ("false", "no", "off", "0", ""):
        return False
    raise ValueError(f"{value!r} is not true or false")


def optional(kind: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """``kind`` of the value, ``None`` for an empty one or ``None``/``"None"``."""

    def read(value):
        if value is None or (isinstance(value, str) and value.strip() in ("", "None")):
            return None
        return kind(value)

    return read


def number_at_least(minimum: float, kind=float) -> Callable[[Any], bool]:
    """A ``valid=`` check that reads strings: empty, or a ``kind`` ≥ ``minimum``."""

    def check(value) -> bool:
        if value is None or (isinstance(value, str) and value.strip() in ("", "None")):
            return True
        try:
            return kind(value) >= minimum
        except (TypeError, ValueError):
            return False

    return check


def one_of(*choices: str) -> Callable[[Any], bool]:
    """A ``valid=`` check: one of ``choices`` (as written)."""
    return lambda value: str(value) in choices


#: The runner's own parameters (the broker, its queues, the retry window, trust).
OWN_PARAMS: dict[str, dict[str, Any]] = dict(
    amqp_url=dict(map=optional(str), default=None),
    # the broker URL from an environment variable or a file, so the password is not in
    # job_conf.yml (Galaxy logs runner parameters at DEBUG)
    amqp_url_env=dict(map=optional(str), default=None),
    amqp_url_file=dict(map=optional(str), default=None),
    amqp_request_queue=dict(map=str, default="galaxy.k8s.requests"),
    amqp_control_queue=dict(map=str, default="galaxy.k8s.control"),
    amqp_result_exchange=dict(map=str, default="galaxy.k8s.events"),
    # the handler's durable event queue; default <result exchange>.<instance id>.<server name>
    amqp_event_queue=dict(map=optional(str), default=None),
    amqp_event_queue_type=dict(map=str, valid=one_of("classic", "quorum"), default="classic"),
    # seconds an event queue no handler consumes lives on (x-expires); empty: forever
    amqp_event_queue_expires=dict(map=optional(int), valid=number_at_least(1, int), default=None),
    amqp_publish_timeout=dict(map=float, valid=number_at_least(0.001), default=10.0),
    amqp_prefetch=dict(map=int, valid=number_at_least(1, int), default=500),
    # Pulsar's names: while the broker is away, a request (cancel, status) is tried again after
    # interval_start s, interval_step s more each time, at most interval_max s, until
    # max_retries tries (empty: no count) or the window (s) is over; then the job fails
    # (UNKNOWN_ERROR, so resubmission rules apply)
    amqp_publish_retry=dict(map=to_bool, default=True),
    amqp_publish_retry_max_retries=dict(map=optional(int), valid=number_at_least(0, int), default=None),
    amqp_publish_retry_interval_start=dict(map=float, valid=number_at_least(0), default=1.0),
    amqp_publish_retry_interval_step=dict(map=float, valid=number_at_least(0), default=2.0),
    amqp_publish_retry_interval_max=dict(map=float, valid=number_at_least(0), default=30.0),
    amqp_publish_retry_window=dict(map=float, valid=number_at_least(0), default=600.0),
    # the worker's Job name prefix (K8S_JOB_NAME_PREFIX), for the external id Galaxy shows
    k8s_job_name_prefix=dict(map=str, default="galaxy"),
    # seconds after which events held for an unregistered job are checked against the database
    held_event_check_seconds=dict(map=float, valid=number_at_least(0), default=10.0),
    default_image=dict(map=str, default="python:3.12-slim"),
)

#: Galaxy 26 Kubernetes runner parameters this runner honours (sent with each request; each
#: may also be set on a destination, which wins).
HONOURED: dict[str, str] = {
    "k8s_galaxy_instance_id": "required: the worker's K8S_GALAXY_INSTANCE_ID; its events are checked against it",
    "k8s_walltime_limit": "the request's walltime_seconds (the worker's K8S_WALLTIME_LIMIT caps it)",
    "k8s_pod_retries": "the request's max_pod_retries when the destination sets none",
    "k8s_node_selector": "the request's node_selector (YAML mapping; the worker's POLICY_ALLOWED_NODE_SELECTORS)",
    "k8s_tolerations": "the request's tolerations (YAML list; the worker's POLICY_ALLOWED_TOLERATIONS)",
    "k8s_pod_priority_class": "the request's priority_class (the worker's POLICY_ALLOWED_PRIORITY_CLASSES)",
    "k8s_extra_job_envs": "the request's env (YAML mapping NAME: value)",
    "k8s_run_as_user_id": "the request's run_as_user (a number, or $uid: Galaxy's; the worker's POLICY_ALLOWED_RUN_AS_IDS)",
    "k8s_run_as_group_id": "the request's run_as_group (a number, or $gid: Galaxy's; the worker's POLICY_ALLOWED_RUN_AS_IDS)",
    "k8s_fs_group_id": "the request's fs_group (a number, or $gid; the worker's POLICY_ALLOWED_RUN_AS_IDS)",
    "k8s_supplemental_group_id": "the request's supplemental_groups (a number, or $gid; the worker's POLICY_ALLOWED_RUN_AS_IDS)",
    "k8s_pull_policy": "the request's pull_policy (Always, IfNotPresent or Never; anything else leaves it unset, as Galaxy does)",
    "k8s_affinity": "the request's affinity (YAML, as the pod spec writes it; the worker's POLICY_ALLOW_AFFINITY)",
    "k8s_job_metadata": "the request's labels and annotations (YAML {labels, annotations}; the worker's POLICY_ALLOWED_METADATA_PREFIXES)",
    "k8s_persistent_volume_claims": "the request's volumes, every job's (claim[/subpath]:/mount/path[:r], comma-separated; the worker's POLICY_ALLOWED_PVCS)",
    "k8s_working_volume_claim": "per job: the job's working directory as a sub-path of the claim (Galaxy's get_volume_mounts_for_job), in the request's volumes (the worker's POLICY_ALLOWED_PVCS: claim/sub/path)",
    "k8s_interactivetools_use_ssl": "the request's interactive.tls: the worker's Ingress terminates TLS for each entry point's domain",
    "k8s_interactivetools_ingress_annotations": "the request's interactive.annotations (YAML mapping; the worker's POLICY_ALLOWED_INGRESS_ANNOTATIONS)",
    "k8s_interactivetools_ingress_class": "the request's interactive.ingress_class (the worker's POLICY_ALLOWED_INGRESS_CLASSES)",
    "k8s_interactivetools_tls_secret": "the request's interactive.tls_secret (else each domain's secret is named after it, as Galaxy does)",
    "k8s_ingress_api_version": "networking.k8s.io/v1 only (the worker makes v1 Ingresses; anything else is refused at load)",
    "k8s_data_volume_claim": "per job: the job's inputs and its outputs' directories as sub-paths of the claim (Galaxy's get_volume_mounts_for_job), in the request's volumes (the worker's POLICY_ALLOWED_PVCS: claim/sub/path)",
}

#: Galaxy 26 Kubernetes runner parameters that belong to the worker (or that this runner does
#: not offer): refused when Galaxy loads the runner, with where they go instead.
REFUSED: dict[str, str] = {
    "k8s_config_path": "the worker reaches Kubernetes, not Galaxy: set K8S_CONFIG_PATH on the worker",
    "k8s_use_service_account": "the worker reaches Kubernetes, not Galaxy: set K8S_USE_SERVICE_ACCOUNT on the worker",
    "k8s_namespace": "the worker's namespace: set K8S_NAMESPACE on the worker (a worker serves one namespace: run one per namespace, each with its own request queue)",
    "k8s_timeout_seconds_job_deletion": "set K8S_TIMEOUT_SECONDS_JOB_DELETION on the worker",
    "k8s_job_api_version": "the worker makes batch/v1 Jobs",
    "k8s_job_ttl_secs_after_finished": "set K8S_JOB_TTL_SECS_AFTER_FINISHED on the worker",
    "k8s_cleanup_job": "set K8S_CLEANUP_JOB on the worker",
    "k8s_job_spec_back_off_limit": "set K8S_JOB_SPEC_BACK_OFF_LIMIT on the worker",
    "k8s_unschedulable_walltime_limit": "set K8S_UNSCHEDULABLE_WALLTIME_LIMIT on the worker",
}

#: Destination parameters sent with each request (Galaxy 26 Kubernetes runner names, and this
#: plugin's ``k8s_extended_resources``); each may also be set on the runner as a default for
#: every destination.
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
    "k8s_fs_group_id",
    "k8s_supplemental_group_id",
    "k8s_pull_policy",
    "k8s_affinity",
    "k8s_job_metadata",
    "k8s_persistent_volume_claims",
    "k8s_extended_resources",
    "k8s_extra_job_envs",
    "default_image",
)

#: Parameters written as YAML (a mapping or a list), in job_conf.yml or as a string.
YAML_PARAMS = (
    "k8s_node_selector",
    "k8s_tolerations",
    "k8s_affinity",
    "k8s_job_metadata",
    "k8s_extra_job_envs",
    "k8s_extended_resources",
)

#: The runner parameters of interactive tools (runner level only, as in Galaxy's runner).
INTERACTIVE_PARAMS: dict[str, dict[str, Any]] = dict(
    k8s_interactivetools_use_ssl=dict(map=to_bool, default=False),
    k8s_interactivetools_ingress_annotations=dict(map=lambda value: value, default=None),
    k8s_interactivetools_ingress_class=dict(map=optional(str), default=None),
    k8s_interactivetools_tls_secret=dict(map=optional(str), default=None),
    k8s_ingress_api_version=dict(map=str, default="networking.k8s.io/v1"),
)

#: The only Ingress API version the worker makes.
INGRESS_API_VERSION = "networking.k8s.io/v1"


def ingress_api_version(value: str) -> str:
    """``k8s_ingress_api_version``, which must be ``networking.k8s.io/v1``."""
    if value != INGRESS_API_VERSION:
        raise ConfigurationError(
            f"k8s_ingress_api_version {value!r}: the worker makes {INGRESS_API_VERSION} Ingresses "
            "(Kubernetes 1.19 and later); remove the parameter or set it to that"
        )
    return value


#: Per-job volume claims: runner parameters, as in Galaxy's runner (the mounts are computed
#: for each job from its files).
VOLUME_CLAIM_PARAMS = ("k8s_working_volume_claim", "k8s_data_volume_claim")

#: Parameters a destination of this runner may not set, refused when Galaxy loads the runner
#: with where they go (Galaxy's own runner would drop them there in silence): the refused ones.
DESTINATION_REFUSED: dict[str, str] = REFUSED


#: What each Galaxy 26 Kubernetes runner parameter does in Galaxy's own runner (the parity
#: table's middle column).
GALAXY_26: dict[str, str] = {
    "k8s_config_path": "kubeconfig Galaxy reaches the cluster with",
    "k8s_use_service_account": "reach the cluster with Galaxy's in-cluster service account",
    "k8s_persistent_volume_claims": "claims mounted in every job pod (`claim[/subpath]:/mount[:r]`, comma-separated)",
    "k8s_working_volume_claim": "claim of the job directories: each pod mounts its own working directory as a sub-path",
    "k8s_data_volume_claim": "claim of the datasets: each pod mounts its inputs and its outputs' directories as sub-paths",
    "k8s_namespace": "namespace of the Jobs",
    "k8s_pod_priority_class": "priorityClassName of the pods",
    "k8s_affinity": "affinity of the pods (YAML; a destination may set it)",
    "k8s_node_selector": "nodeSelector of the pods (YAML; a destination may set it)",
    "k8s_extra_job_envs": "environment of the container (YAML; a destination may set it)",
    "k8s_tolerations": "tolerations of the pods (YAML)",
    "k8s_galaxy_instance_id": "instance id in Job names and labels; Jobs of it are trusted after a restart",
    "k8s_timeout_seconds_job_deletion": "how long a Job's deletion is waited for",
    "k8s_job_api_version": "API version of the Jobs",
    "k8s_job_ttl_secs_after_finished": "ttlSecondsAfterFinished of the Jobs",
    "k8s_job_metadata": "labels and annotations of the pods (YAML)",
    "k8s_supplemental_group_id": "supplementalGroups of the pods (a number or `$gid`; a destination may set it)",
    "k8s_pull_policy": "imagePullPolicy (`Always`, `IfNotPresent`, `Never`; else unset)",
    "k8s_run_as_user_id": "runAsUser (a number or `$uid`; a destination may set it)",
    "k8s_run_as_group_id": "runAsGroup (a number or `$gid`; a destination may set it)",
    "k8s_fs_group_id": "fsGroup (a number or `$gid`; a destination may set it)",
    "k8s_cleanup_job": "which finished Jobs are deleted (`always`, `onsuccess`, `never`)",
    "k8s_pod_retries": "pod retrials before the job fails (at most the back-off limit)",
    "k8s_job_spec_back_off_limit": "backoffLimit of the Jobs",
    "k8s_walltime_limit": "activeDeadlineSeconds of the Jobs",
    "k8s_unschedulable_walltime_limit": "how long a pod may stay unschedulable before the job fails",
    "k8s_interactivetools_use_ssl": "interactive tools' Ingress with TLS",
    "k8s_interactivetools_ingress_annotations": "annotations of interactive tools' Ingress",
    "k8s_interactivetools_ingress_class": "ingressClassName of interactive tools' Ingress",
    "k8s_interactivetools_tls_secret": "TLS secret of interactive tools' Ingress",
    "k8s_ingress_api_version": "API version of interactive tools' Ingress",
}


def parity_table() -> str:
    """The parity table of docs/galaxy.md: every Galaxy 26 Kubernetes runner parameter, what it
    does there, and what this plugin does with it (``python -m k8s_job_worker_galaxy.params``
    prints it; a unit test checks the docs carry it as printed)."""
    rows = ["| parameter | Galaxy 26's runner | this plugin and the worker |", "|---|---|---|"]
    for name in sorted(GALAXY_26):
        ours = f"honoured: {HONOURED[name]}" if name in HONOURED else f"refused at load: {REFUSED[name]}"
        rows.append(f"| `{name}` | {GALAXY_26[name]} | {ours} |")
    return "\n".join(rows) + "\n"


def runner_param_specs() -> dict[str, dict[str, Any]]:
    """Every parameter the runner takes: its own, the destination defaults, and every
    Galaxy 26 Kubernetes runner parameter (refused ones too: so they are refused with a
    message, not with Galaxy's "invalid job runner parameter")."""
    specs = dict(OWN_PARAMS)
    for name in DESTINATION_PARAMS:
        # YAML-valued ones keep what job_conf.yml parsed (XML gives strings, read as YAML)
        keep = name in YAML_PARAMS
        specs.setdefault(name, dict(map=(lambda value: value) if keep else optional(str), default=None))
    specs["k8s_galaxy_instance_id"] = dict(map=optional(str), default=None)
    specs["k8s_pod_retries"] = dict(map=optional(int), valid=number_at_least(0, int), default=None)
    for name in VOLUME_CLAIM_PARAMS:
        specs[name] = dict(map=optional(str), default=None)
    specs.update(INTERACTIVE_PARAMS)
    for name in REFUSED:
        specs.setdefault(name, dict(default=None))
    return specs


def refused_runner_params(explicitly_set) -> list[str]:
    """The messages for refused parameters set on the runner (empty: none)."""
    return [f"{name}: {REFUSED[name]}" for name in sorted(explicitly_set) if name in REFUSED]


def refused_destination_params(destinations) -> list[str]:
    """The messages for refused parameters set on ``destinations`` (``(id, params)`` pairs)."""
    return [
        f"destination {destination_id!r} sets {name}: {DESTINATION_REFUSED[name]}"
        for destination_id, params in destinations
        for name in sorted(params)
        if name in DESTINATION_REFUSED
    ]


def instance_id(value: Optional[str]) -> str:
    """The required ``k8s_galaxy_instance_id``, checked as Galaxy checks it."""
    if not value:
        raise ConfigurationError(
            "k8s_galaxy_instance_id is required: it must equal the worker's K8S_GALAXY_INSTANCE_ID (the "
            "events of this Galaxy are routed and checked by it; two Galaxies on one broker must differ)"
        )
    if not INSTANCE_ID.match(value):
        raise ConfigurationError(
            f"k8s_galaxy_instance_id {value!r} must be 1 to 20 of a-z, 0-9 and '-', not starting or ending with '-'"
        )
    return value


def amqp_url(url: Optional[str], from_env: Optional[str], from_file: Optional[str], environ=os.environ) -> str:
    """The broker URL: ``amqp_url``, or the environment variable ``amqp_url_env`` names, or
    the first line of the file ``amqp_url_file`` names — exactly one of them."""
    given = [name for name, value in (("amqp_url", url), ("amqp_url_env", from_env), ("amqp_url_file", from_file)) if value]
    if len(given) != 1:
        raise ConfigurationError(f"set exactly one of amqp_url, amqp_url_env, amqp_url_file (got: {', '.join(given) or 'none'})")
    if url:
        return url
    if from_env:
        value = environ.get(from_env)
        if not value:
            raise ConfigurationError(f"amqp_url_env: the environment variable {from_env} is not set")
        return value
    try:
        with open(from_file) as f:
            value = f.readline().strip()
    except OSError as e:
        raise ConfigurationError(f"amqp_url_file: cannot read {from_file}: {e}")
    if not value:
        raise ConfigurationError(f"amqp_url_file: {from_file} is empty")
    return value


if __name__ == "__main__":
    print(parity_table(), end="")
