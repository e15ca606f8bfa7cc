"""Fixtures: Galaxy's own MockApp (in-memory database, disk object store), a real tool
(the bundled ``cat1``), real ``model.Job`` rows and Galaxy's real ``JobWrapper``, and the
runner on kombu's ``memory://`` transport (no broker needed).

Galaxy's work queue is drained by the test itself (:func:`drain`) instead of worker threads,
so every step is deterministic.
"""

import json
import os
import queue
import signal
import subprocess
import tempfile
import uuid
from pathlib import Path

import galaxy.tools
import pytest
from galaxy import (
    job_metrics,
    model,
)
from galaxy.app_unittest_utils.galaxy_mock import MockApp
from galaxy.app_unittest_utils.tools_support import UsesTools
from galaxy.jobs import JobWrapper
from galaxy.jobs.job_destination import JobDestination
from galaxy.tool_util.deps import NullDependencyManager
from galaxy.tools.error_reports import ErrorReports
from galaxy.util.bunch import Bunch
from galaxy.web_stack import ApplicationStack
from kombu import (
    Connection,
    Exchange,
    Queue,
)

from k8s_job_worker_galaxy.messages import parse_event
from k8s_job_worker_galaxy.runner import K8sJobWorkerJobRunner

CAT1 = Path(galaxy.tools.__file__).parent / "bundled" / "filters" / "catWrapper.xml"
SCHEMAS = Path(__file__).resolve().parents[3] / "schemas"
#: The end-to-end tests' tools (galaxy/dev/tools).
TOOLS = Path(__file__).resolve().parents[2] / "dev" / "tools"


class GalaxyFixture(UsesTools):
    """Galaxy's MockApp with the real cat1 tool and helpers to make jobs of it."""

    def __init__(self):
        self.setup_app()

    def setup_app(self):
        """As UsesTools does, with the database in a file: the runner's consumer thread
        reads it too (an in-memory SQLite database exists once per thread)."""
        self.test_directory = tempfile.mkdtemp()
        database = os.path.join(self.test_directory, "galaxy.sqlite")
        self.app = MockApp(database_connection=f"sqlite:///{database}")
        self.app.config.new_file_path = os.path.join(self.test_directory, "new_files")
        self.app.config.drmaa_external_runjob_script = ""
        self.app.config.tool_secret = "testsecret"
        self.app.config.track_jobs_in_database = True
        self.app.config.cleanup_job = "never"
        self.app.config.retry_job_output_collection = 0
        self.app.config.environment_setup_file = None
        self.app.config.calculate_dataset_hash = "never"
        self.app.application_stack = ApplicationStack(app=self.app)
        # probed once up front, as at Galaxy's start-up (the probe rolls back its connection)
        self.app.application_stack.supports_skip_locked()
        no_plugins = os.path.join(self.test_directory, "error_reports.yml")
        with open(no_plugins, "w") as f:
            f.write("[]\n")
        self.app.error_reports = ErrorReports(conf_file=no_plugins, app=self.app)
        self.app.job_metrics = job_metrics.JobMetrics()
        self.tool = self._init_tool_for_path(CAT1)
        self.app.toolbox = Bunch(
            tool_for_job=lambda job, exact=False, check_access=False: self.tool,
            get_tool=lambda *args, **kwds: self.tool,
            dependency_manager=NullDependencyManager(),
        )
        self.destinations = {}
        self.app.job_config.get_destination = lambda id: self.destinations[id]
        self.session = self.app.model.context
        self.user = model.User(email="alice@example.org", password="secret")
        self.history = model.History(user=self.user)
        self.session.add_all([self.user, self.history])
        self.session.commit()

    def dataset(self, content: str = None) -> model.HistoryDatasetAssociation:
        """An HDA in the history, with ``content`` written to its file when given."""
        hda = model.HistoryDatasetAssociation(
            history=self.history, create_dataset=True, sa_session=self.session, extension="txt"
        )
        self.session.add(hda)
        self.session.commit()
        self.app.object_store.create(hda.dataset)
        if content is not None:
            with open(hda.get_file_name(), "w") as f:
                f.write(content)
            hda.dataset.state = model.Dataset.states.OK
            self.session.commit()
        return hda

    def job(self, destination_params=None, destination_id="k8s", handler=None, resubmit=None) -> JobWrapper:
        """A queued cat1 job on one uploaded dataset, and Galaxy's JobWrapper for it."""
        source = self.dataset("line one\nline two\n")
        output = self.dataset()
        job = model.Job()
        job.tool_id = self.tool.id
        job.tool_version = self.tool.version
        job.user = self.user
        job.history = self.history
        job.handler = handler or self.app.config.server_name
        job.object_store_id = "default"
        job.state = model.Job.states.QUEUED
        self.session.add(job)
        self.session.commit()
        params = self.tool.params_to_strings({"input1": source, "queries": []}, self.app)
        for name, value in params.items():
            job.add_parameter(name, value)
        job.add_input_dataset("input1", source)
        job.add_output_dataset("out_file1", output)
        self.session.commit()
        destination = self.destination(destination_id, destination_params, resubmit)
        self.destinations[destination_id] = destination
        job_wrapper = JobWrapper(job, self.handler_queue)
        job_wrapper.set_cached_job_destination(destination)
        job_wrapper.set_job_destination(destination)
        return job_wrapper

    @staticmethod
    def destination(id, params=None, resubmit=None) -> JobDestination:
        """A destination of the runner (``runner: k8s`` in job_conf.yml)."""
        return JobDestination(id=id, runner="k8s", params=dict(params or {}), resubmit=resubmit or [])

    @property
    def handler_queue(self):
        """What a JobWrapper needs of Galaxy's job handler queue."""
        return Bunch(app=self.app, dispatcher=Bunch(url_to_destination=None))

    def rewrap(self, job_wrapper) -> JobWrapper:
        """A new JobWrapper for the same job with its persisted destination, as Galaxy's
        handler makes at start-up (recovery) or when it queues a resubmitted job."""
        return JobWrapper(self.reload(job_wrapper), self.handler_queue, use_persisted_destination=True)

    def reload(self, job_wrapper) -> model.Job:
        """The job's row as the database has it now."""
        job = job_wrapper.get_job()
        self.session.refresh(job)
        return job


@pytest.fixture(scope="session")
def galaxy():
    """Galaxy's MockApp with cat1 (one database for the session: each test makes its own
    jobs)."""
    fixture = GalaxyFixture()
    yield fixture
    fixture.tear_down_app()


class MemoryBroker:
    """Queues on kombu's in-process ``memory://`` transport, read by the tests."""

    def __init__(self):
        self.prefix = f"t{uuid.uuid4().hex[:8]}"
        self.connection = Connection("memory://")
        self.requests = f"{self.prefix}.requests"
        self.control = f"{self.prefix}.control"
        self.exchange = f"{self.prefix}.events"
        for name in (self.requests, self.control):
            Queue(name, Exchange(""), routing_key=name)(self.connection.default_channel).declare()

    def messages(self, queue_name):
        """The JSON bodies waiting in ``queue_name`` (consumed)."""
        bodies = []
        channel = self.connection.default_channel
        while (message := channel.basic_get(queue_name, no_ack=True)) is not None:
            bodies.append(json.loads(message.body))
        return bodies


@pytest.fixture
def broker():
    """A memory:// broker with the worker's request and control queues declared."""
    return MemoryBroker()


@pytest.fixture
def runner(galaxy, broker):
    """The runner (not started: no consumer thread) with a work queue the test drains."""
    runner = K8sJobWorkerJobRunner(
        galaxy.app,
        1,
        amqp_url="memory://",
        amqp_request_queue=broker.requests,
        amqp_control_queue=broker.control,
        amqp_result_exchange=broker.exchange,
        k8s_galaxy_instance_id="unit",
    )
    runner.work_queue = queue.Queue()
    # Setting metadata runs Galaxy's set_metadata script against a full configuration (the
    # end-to-end tests do); here the call is recorded.
    runner.metadata_calls = []
    runner._handle_metadata_externally = lambda job_wrapper, resolve_requirements=False: runner.metadata_calls.append(
        (job_wrapper.job_id, resolve_requirements)
    )
    yield runner
    runner.publisher.close()


def drain(runner) -> list[str]:
    """Runs Galaxy's queued work items (as the worker threads would); their names."""
    names = []
    while True:
        try:
            method, arg = runner.work_queue.get_nowait()
        except queue.Empty:
            return names
        names.append(method.__name__)
        method(arg)


class Acks:
    """Records acknowledgements of events."""

    def __init__(self):
        self.count = 0

    def __call__(self):
        self.count += 1


def event(job_id, state, event_id=None, attempt=None, exit_code=None, reason="") -> dict:
    """A result event as the worker publishes it (schemas/job-event.v1.json): a first
    attempt's carries no ``attempt``."""
    body = {
        "schema": "k8s-job-worker/job-event/v1",
        "event_id": event_id or f"{job_id}-{attempt or 1}-{state}",
        "job_id": str(job_id),
        "job_name": f"galaxy-unit-{job_id}" + (f"-a{attempt}" if attempt else ""),
        "instance_id": "unit",
        "state": state,
        "reason": reason,
        "exit_code": exit_code,
        "pods": [],
        "log_tail": None,
        "published_at": "2026-01-01T00:00:00Z",
        "worker_id": "unit-test",
    }
    if attempt is not None:
        body["attempt"] = attempt
    return body


def submit(galaxy, broker, runner, **job_kwds):
    """A cat1 job queued through the runner; its job wrapper and the published request."""
    job_wrapper = galaxy.job(**job_kwds)
    runner.queue_job(job_wrapper)
    runner.outbox.flush()
    (request,) = broker.messages(broker.requests)
    return job_wrapper, request


def deliver(runner, job_wrapper, state, **kwds):
    """One event for the job, handled as the consumer thread does; its acknowledgements."""
    acks = Acks()
    runner.handle_event(parse_event(event(job_wrapper.get_id_tag(), state, **kwds)), acks)
    return acks


def run_job_script(job_wrapper, request) -> int:
    """Runs the request's command as the worker's pod would (``<shell> -c``, in the working
    directory): the job script writes outputs, tool streams and the exit code file. As in a
    container (and sim-node), whatever is left of the process group when the main process
    ends is killed at once."""
    process = subprocess.Popen(
        [request["shell"], "-c", request["command_line"]],
        cwd=request["working_directory"],
        env=dict(os.environ),
        start_new_session=True,
    )
    returncode = process.wait()
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return returncode
