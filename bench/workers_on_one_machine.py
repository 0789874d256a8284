"""Workers sharing `interactions`' partitions on one machine: one against two (or more), in one
run; what the extra worker buys, and what limits it.

    .venv/bin/python bench/workers_on_one_machine.py [--workers 1 2] [--events 30000]
        [--model mlsa4rec-s] [--partitions 4]

For each worker count: fresh topics, the workers started in one consumer group (same app id,
each its own RocksDB folder and metrics port) and waited for until each says /health ok (so
the partitions are shared out before the clicks come), then a backlog of uniform clicks over
6,040 users produced and drained: events/s from the first to the last recommendation. The
broker, the workers and this load generator share the machine's cores.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.stream_throughput import (  # noqa: E402
    clicks, drain, produce, run_worker, stop, write_checkpoints)
from bench.throughput_parts import Traffic  # noqa: E402
from streams.shared.local_broker import free_ports  # noqa: E402
from streams.shared.topics import ensure_topics  # noqa: E402
from tests.kafka_broker import kafka_bootstrap  # noqa: E402


def healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as answer:
            return json.loads(answer.read())["status"] == "ok"
    except OSError:
        return False


def measure(bootstrap, checkpoint, workers: int, events: int, partitions: int, tmp: Path
            ) -> dict:
    name = uuid.uuid4().hex[:8]
    ensure_topics(bootstrap, {f"{kind}-{name}": partitions for kind in ("in", "out", "dlq")})
    ports = free_ports(workers)
    procs = []
    for i, port in enumerate(ports):
        folder = tmp / f"{name}-w{i}"
        folder.mkdir()
        procs.append(run_worker(bootstrap, checkpoint, name, 256, "float32", folder / "data",
                                metrics_port=port,
                                extra=["--partitions", str(partitions),
                                       "--advertised-host", "127.0.0.1"]))
    try:
        deadline = time.monotonic() + 180
        while not all(healthy(port) for port in ports):
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                raise RuntimeError(f"workers not healthy; logs in {tmp}")
            time.sleep(0.5)
        traffic = Traffic("uniform")
        produce(bootstrap, f"in-{name}", clicks(*traffic.pairs(0, events), "backlog"))
        received, _ = drain(bootstrap, f"out-{name}", events,
                            alive=lambda: all(p.poll() is None for p in procs))
        received.sort()
        rate = (len(received) - 1) / (received[-1] - received[0])
        load = os.getloadavg()[0]
    finally:
        for proc in procs:
            stop(proc)
    return {"workers": workers, "partitions": partitions, "events/s": rate,
            "load average (1 min)": load}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2],
                        help="worker counts to compare (default 1 2)")
    parser.add_argument("--events", type=int, default=30000, help="backlog clicks (default 30000)")
    parser.add_argument("--model", default="mlsa4rec-s", help="model (default mlsa4rec-s)")
    parser.add_argument("--partitions", type=int, default=4,
                        help="partitions of interactions (default 4)")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="mlsa4rec-workers-"))
    _, checkpoints = write_checkpoints([args.model], tmp)
    rows = []
    with kafka_bootstrap() as bootstrap:
        for workers in args.workers:
            rows.append(measure(bootstrap, checkpoints[args.model], workers, args.events,
                                args.partitions, tmp))
            print(json.dumps(rows[-1]), flush=True)
    base = rows[0]["events/s"]
    print(f"\nmodel {args.model}, {args.events} backlog clicks, {os.cpu_count()} cores\n")
    print("| workers | partitions | events/s | x first row | load average |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['workers']} | {row['partitions']} | {row['events/s']:,.0f} | "
              f"{row['events/s'] / base:.2f} | {row['load average (1 min)']:.1f} |")


if __name__ == "__main__":
    main()
