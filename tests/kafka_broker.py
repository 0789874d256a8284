"""A real Kafka broker for tests, with or without Docker.

If a Docker engine answers, run the apache/kafka image through testcontainers;
otherwise start the jar-based broker of infra/kafka/broker.sh on free ports with
a throw-away data dir. Set KAFKA_BOOTSTRAP_SERVERS to use a broker you already run.

conftest.py: ``from tests.kafka_broker import kafka_bootstrap_server  # noqa``
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from typing import Iterator, Mapping

import pytest

from streams.shared.local_broker import KAFKA_VERSION, free_ports, local_kafka


def docker_available(timeout: float = 5.0) -> bool:
    """True only if a Docker *engine* answers, not just the client binary."""
    if shutil.which("docker") is None:
        return False
    try:
        done = subprocess.run(["docker", "info"], capture_output=True, timeout=timeout)
    except (subprocess.TimeoutExpired, OSError):
        return False
    return done.returncode == 0


@contextlib.contextmanager
def _docker_kafka() -> Iterator[str]:
    # testcontainers' KafkaContainer drives the Confluent image's scripts, so it
    # cannot run apache/kafka; a generic container with a fixed host port lets us
    # advertise the right address before start.
    from testcontainers.core.container import DockerContainer
    from testcontainers.core.waiting_utils import wait_for_logs

    (port,) = free_ports(1)
    env = {
        "KAFKA_NODE_ID": "1",
        "KAFKA_PROCESS_ROLES": "broker,controller",
        "KAFKA_LISTENERS": "PLAINTEXT://0.0.0.0:9092,CONTROLLER://localhost:9093",
        "KAFKA_ADVERTISED_LISTENERS": f"PLAINTEXT://127.0.0.1:{port}",
        "KAFKA_LISTENER_SECURITY_PROTOCOL_MAP": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "KAFKA_CONTROLLER_LISTENER_NAMES": "CONTROLLER",
        "KAFKA_CONTROLLER_QUORUM_VOTERS": "1@localhost:9093",
        "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR": "1",
        "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR": "1",
        "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR": "1",
        "KAFKA_SHARE_COORDINATOR_STATE_TOPIC_REPLICATION_FACTOR": "1",
        "KAFKA_SHARE_COORDINATOR_STATE_TOPIC_MIN_ISR": "1",
        "KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS": "0",
        "KAFKA_AUTO_CREATE_TOPICS_ENABLE": "true",
    }
    container = DockerContainer(f"apache/kafka:{KAFKA_VERSION}").with_bind_ports(9092, port)
    for key, value in env.items():
        container = container.with_env(key, value)
    with container:
        wait_for_logs(container, "Kafka Server started", timeout=90)
        yield f"127.0.0.1:{port}"


@contextlib.contextmanager
def kafka_bootstrap() -> Iterator[str]:
    """Yield a bootstrap address ("host:port") of a running broker."""
    external = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if external:
        yield external
    elif docker_available():
        with _docker_kafka() as bootstrap:
            yield bootstrap
    else:
        with local_kafka() as bootstrap:
            yield bootstrap


@pytest.fixture(scope="session")
def kafka_bootstrap_server() -> Iterator[str]:
    with kafka_bootstrap() as bootstrap:
        yield bootstrap


def create_topics(bootstrap: str, topics: Mapping[str, int], timeout: float = 30.0) -> None:
    """Create topics {name: partitions}, as the worker does; an existing one must match."""
    from streams.shared.topics import ensure_topics

    ensure_topics(bootstrap, dict(topics), timeout=timeout)
