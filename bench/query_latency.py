"""Requests/s and latency of GET /users/{id}/recommendations on one worker, alone and while it
scores clicks at half its capacity; and what the requests cost the clicks.

    .venv/bin/python bench/query_latency.py [--model mlsa4rec-s] [--clients 4]
        [--query-seconds 8] [--max-queries 50000] [--latency-seconds 8]

One broker (tests/kafka_broker.py), one worker (`python -m cli worker`, loopback only), a
random-weight model with ML-1M's sizes (3,416 items; speed does not depend on training):
1. a backlog of clicks from 6,040 users (so every user asked for has a state), drained: the
   worker's capacity in clicks/s;
2. requests alone: `--clients` threads, each with one keep-alive connection, asking for random
   known users as fast as answers come, for `--query-seconds` (or `--max-queries`);
3. clicks alone at half the capacity: their latency (click sent -> recommendation sent);
4. both at once: the clicks' latency and the requests' rate and latency.
Every figure compares only within one run.
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.stream_throughput import (  # noqa: E402
    PARTITIONS, backlog_phase, clicks, latency_phase, produce, run_worker, stop,
    write_checkpoints)
from bench.throughput_parts import N_USERS, Traffic  # noqa: E402
from streams.shared.local_broker import free_ports  # noqa: E402
from streams.shared.topics import ensure_topics  # noqa: E402
from tests.kafka_broker import kafka_bootstrap  # noqa: E402


class Askers:
    """`clients` threads asking the worker for random users' top 10 until stopped."""

    def __init__(self, port: int, users: list[str], clients: int, max_queries: int):
        self.port, self.users, self.max_queries = port, users, max_queries
        self.latencies: list[float] = []
        self.errors: dict[int, int] = {}
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._ask, args=(seed,), daemon=True)
                        for seed in range(clients)]

    def _ask(self, seed: int) -> None:
        rng = random.Random(seed)
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        while not self.stopping.is_set():
            user = rng.choice(self.users)
            started = time.perf_counter()
            connection.request("GET", f"/users/{user}/recommendations?k=10")
            response = connection.getresponse()
            body = response.read()
            elapsed = time.perf_counter() - started
            with self.lock:
                if response.status == 200:
                    self.latencies.append(elapsed)
                    if len(self.latencies) == 1 and not json.loads(body)["known_user"]:
                        raise RuntimeError(f"{user} is not known to the worker")
                else:
                    self.errors[response.status] = self.errors.get(response.status, 0) + 1
                if len(self.latencies) >= self.max_queries:
                    self.stopping.set()
        connection.close()

    def run_for(self, seconds: float) -> dict:
        self.start()
        self.stopping.wait(seconds)
        return self.stop()

    def start(self) -> None:
        self.started = time.perf_counter()
        for thread in self.threads:
            thread.start()

    def stop(self) -> dict:
        self.stopping.set()
        for thread in self.threads:
            thread.join(60)
        seconds = time.perf_counter() - self.started
        ms = np.array(self.latencies) * 1000
        return {"requests": len(ms), "requests/s": len(ms) / seconds,
                "p50 ms": float(np.percentile(ms, 50)), "p99 ms": float(np.percentile(ms, 99)),
                "errors": self.errors}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mlsa4rec-s", help="model to serve (default mlsa4rec-s)")
    parser.add_argument("--events", type=int, default=20000,
                        help="backlog clicks that give every user a state (default 20000)")
    parser.add_argument("--clients", type=int, default=4,
                        help="concurrent keep-alive clients (default 4)")
    parser.add_argument("--query-seconds", type=float, default=8.0,
                        help="how long each requests phase asks (default 8)")
    parser.add_argument("--max-queries", type=int, default=50000,
                        help="a requests phase stops after this many answers (default 50000)")
    parser.add_argument("--latency-seconds", type=float, default=8.0,
                        help="seconds of clicks at half capacity per clicks phase (default 8)")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="mlsa4rec-query-bench-"))
    _, checkpoints = write_checkpoints([args.model], tmp)
    traffic = Traffic("uniform")
    # Every user in the backlog at least once: then each user asked for has a state.
    users = [f"user-{u}" for u in range(N_USERS)]
    results = {}
    with kafka_bootstrap() as bootstrap:
        name = "q"
        (port,) = free_ports(1)
        (tmp / "worker").mkdir()
        ensure_topics(bootstrap, {f"{kind}-{name}": PARTITIONS for kind in ("in", "out", "dlq")})
        worker = run_worker(bootstrap, checkpoints[args.model], name, 256, "float32",
                            tmp / "worker", metrics_port=port,
                            extra=["--advertised-host", "127.0.0.1"])
        try:
            alive = lambda: worker.poll() is None    # noqa: E731
            started = time.time()
            seed_users = users + traffic.pairs(0, args.events - len(users))[0]
            seed_items = traffic.pairs(10**7, args.events)[1]
            produce(bootstrap, f"in-{name}", clicks(seed_users, seed_items, "seed"))
            results["backlog"] = backlog_phase(bootstrap, name, args.events, started, alive)
            capacity = results["backlog"]["events/s"]
            print(json.dumps(results), flush=True)

            results["requests alone"] = Askers(port, users, args.clients,
                                               args.max_queries).run_for(args.query_seconds)
            print(json.dumps(results["requests alone"]), flush=True)

            rate = capacity / 2
            n = int(rate * args.latency_seconds)
            results["clicks alone"] = latency_phase(bootstrap, name, traffic, args.events, n,
                                                    rate, alive)
            print(json.dumps(results["clicks alone"]), flush=True)

            askers = Askers(port, users, args.clients, args.max_queries)
            askers.start()
            both = latency_phase(bootstrap, name, traffic, args.events + n, n, rate, alive,
                                 prefix="steady-with-requests")
            results["clicks with requests"] = both
            results["requests with clicks"] = askers.stop()
            print(json.dumps(both), json.dumps(results["requests with clicks"]), flush=True)
        finally:
            stop(worker)
    print_table(args, results)


def print_table(args, results) -> None:
    backlog = results["backlog"]["events/s"]
    print(f"\nmodel {args.model}, {args.clients} clients, worker capacity {backlog:,.0f} "
          f"clicks/s (backlog), clicks offered at {backlog / 2:,.0f}/s\n")
    print("| phase | requests/s | request p50 / p99 ms | clicks p50 / p99 ms | errors |")
    print("|---|---|---|---|---|")
    alone, together = results["requests alone"], results["requests with clicks"]
    clicks_alone, clicks_both = results["clicks alone"], results["clicks with requests"]
    print(f"| requests alone | {alone['requests/s']:,.0f} | {alone['p50 ms']:.1f} / "
          f"{alone['p99 ms']:.1f} | - | {alone['errors'] or '-'} |")
    print(f"| clicks alone | - | - | {clicks_alone['p50 ms']:.0f} / {clicks_alone['p99 ms']:.0f}"
          f" | - |")
    print(f"| both | {together['requests/s']:,.0f} | {together['p50 ms']:.1f} / "
          f"{together['p99 ms']:.1f} | {clicks_both['p50 ms']:.0f} / {clicks_both['p99 ms']:.0f}"
          f" | {together['errors'] or '-'} |")


if __name__ == "__main__":
    main()
