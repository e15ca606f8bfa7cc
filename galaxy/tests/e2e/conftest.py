"""End-to-end fixtures: the real worker binary and one real Galaxy 26 server with the
plugin, against the local environment (RabbitMQ, Kubernetes 1.20, sim-node) whose
variables scripts/test exports. Unique namespace, queue and exchange names per run; logs
under target/test-logs/galaxy/."""

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "dev"))

from harness import (  # noqa: E402
    fresh_directory,
    GalaxyServer,
    log_dir,
    Names,
    Worker,
)


def pytest_configure(config):
    """The end-to-end tests need the environment: say so instead of failing obscurely."""
    missing = [name for name in ("AMQP_URL", "KUBECONFIG") if not os.environ.get(name)]
    if missing:
        raise pytest.UsageError(f"{', '.join(missing)} not set: run via scripts/test (or scripts/testenv env)")


class Stack:
    """The worker, Galaxy and an admin API client of one run."""

    def __init__(self):
        self.names = Names("gxe2e")
        self.logs = log_dir()
        self.worker = Worker(self.names, self.logs)
        self.galaxy = GalaxyServer(self.names, fresh_directory(self.names.instance), self.logs)
        self.api = None

    def start(self):
        """Starts the worker, then Galaxy; makes the API client."""
        self.worker.start()
        self.galaxy.start()
        self.api = self.galaxy.api()
        return self

    def stop(self):
        """Stops Galaxy, then the worker."""
        self.galaxy.stop()
        self.worker.stop()


@pytest.fixture(scope="session")
def stack():
    """Worker + Galaxy, stopped at the end whatever happens."""
    stack = Stack()
    try:
        yield stack.start()
    finally:
        stack.stop()


@pytest.fixture(scope="session")
def names():
    """Unique names for the broker-level tests."""
    return Names("gxamqp")
