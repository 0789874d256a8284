"""Start and stop the project's own Kafka broker (infra/kafka/broker.sh: Apache Kafka from
Maven Central, KRaft, one node on 127.0.0.1) from Python, on free ports."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parents[2]
BROKER_SH = REPO / "infra" / "kafka" / "broker.sh"
KAFKA_VERSION = os.environ.get("KAFKA_VERSION", "4.1.1")


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
def local_kafka(data_dir: str | Path | None = None, log=print) -> Iterator[str]:
    """Yield "127.0.0.1:port" of a fresh broker; it is stopped (and a temporary data dir
    removed) on exit."""
    port, cport = free_ports(2)
    data = str(data_dir) if data_dir else tempfile.mkdtemp(prefix="mlsa4rec-kafka-")
    env = dict(os.environ, KAFKA_VERSION=KAFKA_VERSION, KAFKA_PORT=str(port),
               KAFKA_CONTROLLER_PORT=str(cport), KAFKA_DATA_DIR=data)
    t0 = time.monotonic()
    done = subprocess.run(["bash", str(BROKER_SH), "start"], env=env, capture_output=True,
                          text=True, timeout=300)
    if done.returncode != 0:
        subprocess.run(["bash", str(BROKER_SH), "stop"], env=env, capture_output=True, timeout=60)
        raise RuntimeError(f"broker.sh start failed:\n{done.stdout}\n{done.stderr}")
    log(f"[kafka_broker] local kafka {KAFKA_VERSION} on 127.0.0.1:{port} "
        f"ready in {time.monotonic() - t0:.1f}s (data {data})")
    try:
        yield done.stdout.strip().splitlines()[-1]
    finally:
        subprocess.run(["bash", str(BROKER_SH), "stop"], env=env, capture_output=True, timeout=60)
        if not data_dir:
            shutil.rmtree(data, ignore_errors=True)
