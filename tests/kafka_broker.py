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
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator, Mapping

import pytest

REPO = Path(__file__).resolve().parents[1]
BROKER_SH = REPO / "infra" / "kafka" / "broker.sh"
KAFKA_VERSION = os.environ.get("KAFKA_VERSION", "4.1.1")


def docker_available(timeout: float = 5.0) -> bool:
    """True only if a Docker *engine* answers, not just the client binary."""
    if shutil.which("docker") is None:
        return False
    try:
        done = subprocess.run(["docker", "info"], capture_output=True, timeout=timeout)
    except (subprocess.TimeoutExpired, OSError):
        return False
    return done.returncode == 0


def free_ports(n: int) -> list[int]:
    # Hold all sockets open until every port is picked, so the n ports differ.
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


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
def _local_kafka() -> Iterator[str]:
    port, cport = free_ports(2)
    data = tempfile.mkdtemp(prefix="mlsa4rec-kafka-")
    env = dict(
        os.environ,
        KAFKA_VERSION=KAFKA_VERSION,
        KAFKA_PORT=str(port),
        KAFKA_CONTROLLER_PORT=str(cport),
        KAFKA_DATA_DIR=data,
    )
    t0 = time.monotonic()
    done = subprocess.run(
        ["bash", str(BROKER_SH), "start"], env=env, capture_output=True, text=True, timeout=300
    )
    if done.returncode != 0:
        subprocess.run(["bash", str(BROKER_SH), "stop"], env=env, capture_output=True, timeout=60)
        raise RuntimeError(f"broker.sh start failed:\n{done.stdout}\n{done.stderr}")
    # Visible with pytest -s; the start-up time is worth knowing on slow CI.
    print(f"[kafka_broker] local kafka {KAFKA_VERSION} on 127.0.0.1:{port} "
          f"ready in {time.monotonic() - t0:.1f}s (data {data})")
    try:
        yield done.stdout.strip().splitlines()[-1]
    finally:
        subprocess.run(["bash", str(BROKER_SH), "stop"], env=env, capture_output=True, timeout=60)
        shutil.rmtree(data, ignore_errors=True)


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
        with _local_kafka() as bootstrap:
            yield bootstrap


@pytest.fixture(scope="session")
def kafka_bootstrap_server() -> Iterator[str]:
    with kafka_bootstrap() as bootstrap:
        yield bootstrap


def create_topics(bootstrap: str, topics: Mapping[str, int], timeout: float = 30.0) -> None:
    """Create topics {name: partitions}, as the worker does; an existing one must match."""
    from streams.topics import ensure_topics

    ensure_topics(bootstrap, dict(topics), timeout=timeout)
