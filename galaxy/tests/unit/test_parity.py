"""Galaxy 26 Kubernetes runner parameters, as this plugin sends them (issue 25), with Galaxy's
own classes: a real job wrapper for cat1, Galaxy's ``get_volume_mounts_for_job`` and
``pull_policy``, and the request schema the worker checks."""

import json

import jsonschema
import pytest
from conftest import (
    deliver,
    drain,
    SCHEMAS,
    submit,
    TOOLS,
)
from galaxy.jobs.runners.util.pykube_util import (
    get_volume_mounts_for_job,
    pull_policy,
)

from k8s_job_worker_galaxy.messages import MessageError

REQUEST_SCHEMA = json.loads((SCHEMAS / "job-request.v1.json").read_text())


def test_groups_pull_policy_affinity_metadata_pvcs_and_gpus_go_with_the_request(galaxy, broker, runner):
    affinity = "nodeAffinity:\n  requiredDuringSchedulingIgnoredDuringExecution:\n    nodeSelectorTerms:\n" \
               "    - matchExpressions: [{key: gpu, operator: In, values: [a100]}]\n"
    _, request = submit(galaxy, broker, runner, destination_params={
        "k8s_fs_group_id": "$gid",
        "k8s_supplemental_group_id": "1234",
        "k8s_pull_policy": "IfNotPresent",
        "k8s_affinity": affinity,
        "k8s_job_metadata": "labels: {team: genomics}\nannotations: {example.org/cost-center: '42'}",
        "k8s_persistent_volume_claims": "refdata/hg38:/refdata:r,scratch:/scratch",
        "k8s_extended_resources": "{nvidia.com/gpu: 1}",
    })
    jsonschema.validate(request, REQUEST_SCHEMA)
    assert request["fs_group"] == galaxy.app.config.gid
    assert request["supplemental_groups"] == [1234]
    assert request["pull_policy"] == "IfNotPresent"
    assert request["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert request["labels"] == {"team": "genomics"}
    assert request["annotations"]["example.org/cost-center"] == "42"
    assert request["annotations"]["app.galaxyproject.org/tool_id"] == "cat1", "the plugin's own annotations stay"
    assert request["volumes"] == ["refdata/hg38:/refdata:r", "scratch:/scratch"]
    assert request["extended_resources"] == {"nvidia.com/gpu": 1}


@pytest.mark.parametrize("value", ["Default", "Sometimes", ""])
def test_a_pull_policy_galaxy_does_not_know_is_left_unset_as_galaxy_leaves_it(galaxy, broker, runner, value):
    _, request = submit(galaxy, broker, runner, destination_params={"k8s_pull_policy": value})
    assert "pull_policy" not in request
    assert pull_policy({"k8s_pull_policy": value}) is None, "Galaxy's own reading agrees"


def test_runner_level_values_are_every_destinations_default(galaxy, broker, runner):
    runner.runner_params["k8s_fs_group_id"] = "2000"
    runner.runner_params["k8s_job_metadata"] = {"labels": {"site": "eu"}}  # YAML in job_conf.yml: a mapping
    _, request = submit(galaxy, broker, runner)
    assert (request["fs_group"], request["labels"]) == (2000, {"site": "eu"})
    _, request = submit(galaxy, broker, runner, destination_params={"k8s_fs_group_id": "3000"})
    assert request["fs_group"] == 3000


def test_per_job_volumes_are_the_jobs_own_files_as_galaxy_mounts_them(galaxy, broker, runner):
    runner.runner_params["k8s_working_volume_claim"] = "galaxy-data/jobs:/galaxy/jobs"
    runner.runner_params["k8s_data_volume_claim"] = "galaxy-data/files:/galaxy/files:r"
    job_wrapper, request = submit(galaxy, broker, runner)
    jsonschema.validate(request, REQUEST_SCHEMA)
    galaxys = get_volume_mounts_for_job(job_wrapper, "galaxy-data/files:/galaxy/files:r", "galaxy-data/jobs:/galaxy/jobs")
    expected = [
        f"{m['name']}/{m['subPath']}:{m['mountPath']}" + (":r" if m["readOnly"] else "") for m in galaxys
    ]
    assert request["volumes"] == expected
    # every mount is a sub-path of its claim: the job's own files, never the whole claim
    assert all(v.split(":")[0].startswith(("galaxy-data/jobs/", "galaxy-data/files/")) for v in request["volumes"])
    working = [v for v in request["volumes"] if v.startswith("galaxy-data/jobs/")]
    assert len(working) == 1 and working[0].endswith(f":/galaxy/jobs{job_wrapper.working_directory}")
    inputs = [v for v in request["volumes"] if v.startswith("galaxy-data/files/")]
    assert inputs and all(v.endswith(":r") for v in inputs), "the data claim is mounted read-only, as configured"


@pytest.mark.parametrize("params, wrong", [
    ({"k8s_job_metadata": "owner: me"}, "labels and annotations only"),
    ({"k8s_extended_resources": "{nvidia.com/gpu: many}"}, "extended resources to counts"),
    ({"k8s_extended_resources": "{nvidia.com/gpu: 0}"}, "at least 1"),
    ({"k8s_affinity": "[not, a, mapping]"}, "k8s_affinity must be a YAML dict"),
])
def test_a_malformed_value_fails_the_job_with_the_parameters_name(galaxy, runner, params, wrong):
    from k8s_job_worker_galaxy.messages import build_request

    with pytest.raises(MessageError, match=wrong):
        build_request(job_id="1", command_line="true", image="busybox", params=params)


@pytest.fixture
def interactive(galaxy, runner):
    """Galaxy's own InteractiveToolManager and the end-to-end tests' interactive tool
    (``e2e_interactive``: one entry point, on the port its ``port`` parameter names, that
    requires a domain), installed in the MockApp for one test."""
    from galaxy.managers.interactivetool import InteractiveToolManager

    config = galaxy.app.config
    config.interactivetools_enable = True
    config.interactivetools_map = f"sqlite:///{galaxy.test_directory}/interactivetools_map.sqlite"
    config.interactivetoolsproxy_map = None
    config.interactivetools_proxy_host = "its.example.org:4002"
    config.interactivetools_prefix = "interactivetool"
    config.interactivetools_base_path = "/"
    saved = (galaxy.app.interactivetool_manager, galaxy.tool)
    galaxy.app.interactivetool_manager = InteractiveToolManager(galaxy.app)
    galaxy.tool = galaxy._init_tool_for_path(TOOLS / "e2e_interactive.xml")
    yield galaxy.app.interactivetool_manager
    galaxy.app.interactivetool_manager, galaxy.tool = saved


def interactive_job(galaxy, port: int):
    """A queued e2e_interactive job serving on ``port``, and Galaxy's JobWrapper for it."""
    from galaxy import model
    from galaxy.jobs import JobWrapper
    from galaxy.util.template import fill_template

    output = galaxy.dataset()
    job = model.Job()
    job.tool_id, job.tool_version = galaxy.tool.id, galaxy.tool.version
    job.user, job.history = galaxy.user, galaxy.history
    job.handler = galaxy.app.config.server_name
    job.object_store_id = "default"
    job.state = model.Job.states.QUEUED
    galaxy.session.add(job)
    galaxy.session.commit()
    for name, value in galaxy.tool.params_to_strings({"port": port}, galaxy.app).items():
        job.add_parameter(name, value)
    job.add_output_dataset("out_file1", output)
    galaxy.session.commit()
    # What Galaxy's tool evaluator does for a full app (MockApp is not one): the tool's entry
    # points, templated with the job's parameters, become the job's rows.
    entry_points = [
        {key: fill_template(value, context={"port": port}) if isinstance(value, str) else value for key, value in ep.items()}
        for ep in galaxy.tool.ports
    ]
    galaxy.app.interactivetool_manager.create_interactivetool(job, galaxy.tool, entry_points)
    destination = galaxy.destination("k8s")
    galaxy.destinations["k8s"] = destination
    job_wrapper = JobWrapper(job, galaxy.handler_queue)
    job_wrapper.set_cached_job_destination(destination)
    job_wrapper.set_job_destination(destination)
    return job_wrapper


def test_an_interactive_tools_entry_points_are_configured_and_routed_as_galaxys_runner_does(
    galaxy, broker, runner, interactive
):
    runner.runner_params.update(
        k8s_interactivetools_use_ssl=True,
        k8s_interactivetools_ingress_class="nginx",
        k8s_interactivetools_ingress_annotations="nginx.ingress.kubernetes.io/proxy-read-timeout: '3600'",
    )
    job_wrapper = interactive_job(galaxy, 8888)
    runner.queue_job(job_wrapper)
    runner.outbox.flush()
    (request,) = broker.messages(broker.requests)
    jsonschema.validate(request, REQUEST_SCHEMA)
    (entry_point,) = job_wrapper.get_job().interactivetool_entry_points
    # configured as Galaxy's runner configures it: the Ingress routes it ("manual")
    assert (entry_point.configured, entry_point.host, entry_point.port) == (True, "manual", 8888)
    subdomain = interactive.get_entry_point_subdomain(entry_point)
    assert request["interactive"] == {
        "entry_points": [{"port": 8888, "domain": f"{subdomain}.its.example.org", "path": "/"}],
        "ingress_class": "nginx",
        "tls": True,
        "annotations": {"nginx.ingress.kubernetes.io/proxy-read-timeout": "3600"},
    }
    # Galaxy's entry point target has the Ingress rule's host (no port: an Ingress host has none)
    assert subdomain.startswith(interactive.encoder.encode_id(entry_point.id))
    # the job ends: its entry point closes with it
    deliver(runner, job_wrapper, "running")
    deliver(runner, job_wrapper, "failed", exit_code=1, reason="the tool stopped")
    drain(runner)
    galaxy.session.refresh(entry_point)
    assert entry_point.deleted


def test_a_path_entry_point_is_routed_by_its_path_under_the_proxy_host(galaxy, broker, runner, interactive):
    galaxy.tool = galaxy._init_tool_for_path(TOOLS / "e2e_interactive.xml")
    galaxy.tool.ports[0]["requires_domain"] = False  # as a tool with requires_domain="False" has it
    job_wrapper = interactive_job(galaxy, 9000)
    runner.queue_job(job_wrapper)
    runner.outbox.flush()
    (request,) = broker.messages(broker.requests)
    (entry_point,) = job_wrapper.get_job().interactivetool_entry_points
    assert request["interactive"] == {
        "entry_points": [
            {"port": 9000, "domain": "its.example.org", "path": interactive.get_entry_point_path(entry_point)}
        ]
    }
    assert request["interactive"]["entry_points"][0]["path"].startswith("/interactivetool/ep/")


def test_k8s_ingress_api_version_other_than_v1_is_refused_at_load(galaxy, broker):
    from k8s_job_worker_galaxy.params import ConfigurationError
    from k8s_job_worker_galaxy.runner import K8sJobWorkerJobRunner

    with pytest.raises(ConfigurationError, match="k8s_ingress_api_version 'networking.k8s.io/v1beta1'"):
        K8sJobWorkerJobRunner(
            galaxy.app, 1, amqp_url="memory://", k8s_galaxy_instance_id="unit",
            k8s_ingress_api_version="networking.k8s.io/v1beta1",
        )


def test_an_interactive_tool_galaxy_stopped_is_finished_as_galaxys_runner_finishes_it(
    galaxy, broker, runner, interactive
):
    from galaxy import model

    job_wrapper = interactive_job(galaxy, 8890)
    runner.queue_job(job_wrapper)
    runner.outbox.flush()
    broker.messages(broker.requests)
    deliver(runner, job_wrapper, "running")
    (entry_point,) = job_wrapper.get_job().interactivetool_entry_points
    # the user stops it (its entry point's stop: Galaxy's own manager), Galaxy stops the job
    job = job_wrapper.get_job()
    interactive.remove_entry_point(entry_point)
    job.mark_stopped(track_jobs_in_database=True)
    galaxy.session.commit()
    runner.stop_job(job_wrapper)
    runner.outbox.flush()
    assert [m["action"] for m in broker.messages(broker.control)] == ["cancel"]
    acks = deliver(runner, job_wrapper, "cancelled", reason="stopped by Galaxy")
    assert drain(runner) == ["_apply_terminal"]
    assert job_wrapper.job_id in [job_id for job_id, _ in runner.metadata_calls], "finished: what it wrote is kept"
    assert acks.count == 1
    assert galaxy.reload(job_wrapper).state != model.Job.states.STOPPING


def test_a_batch_job_galaxy_stopped_is_not_failed_by_its_cancel(galaxy, broker, runner):
    """Galaxy's STOPPING state is ``stop``: a job Galaxy stops (not an interactive tool) stays
    Galaxy's to end; its ``cancelled`` is nothing more (found: it was failed as "cancelled
    outside Galaxy")."""
    from galaxy import model

    job_wrapper, _ = submit(galaxy, broker, runner)
    deliver(runner, job_wrapper, "running")
    job = job_wrapper.get_job()
    job.mark_stopped(track_jobs_in_database=True)
    galaxy.session.commit()
    acks = deliver(runner, job_wrapper, "cancelled", reason="stopped by Galaxy")
    assert drain(runner) == [] and acks.count == 1
    assert galaxy.reload(job_wrapper).state == model.Job.states.STOPPING
