"""Scale-out and recovery on the real local broker: the rebalance pause and restore time per GB.

1. Rebalance pause: worker A serves clicks of --users users at a steady --rate; worker B (same
   group, its own empty RocksDB folder) joins at --join-at s and leaves (SIGTERM) at --leave-at
   s. Each click's latency is recommendation sent - click sent (Kafka timestamps). Reported:
   steady latency away from the two rebalances, and after each one the longest latency and how
   long the clicks waited more than 1 s. Also: every click got a recommendation.
2. Restore time per GB: one worker scores one click for each of --restore-users users (fp32
   state, ~66 KB a user: 16,000 users ~ 1 GB of table), is stopped, and started again (a) on its
   RocksDB folder and (b) with the folder deleted, so that the table comes from its changelog.
   Time from process start to /health "ok" (recovery done); (b) - (a) per GB of changelog.

    .venv/bin/python bench/rebalance.py [--rate 200] [--users 6040] [--restore-users 16000]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from model.checkpoint import save_checkpoint  # noqa: E402
from model.models import build_model  # noqa: E402
from confluent_kafka import Consumer  # noqa: E402
from schemas.codec import decode_recommendation  # noqa: E402
from stream_throughput import N_ITEMS, changelog_bytes, drain, produce  # noqa: E402
from streams.shared.local_broker import free_ports  # noqa: E402
from streams.shared.topics import ensure_topics  # noqa: E402
from tests.kafka_broker import kafka_bootstrap  # noqa: E402

PARTITIONS = 4


class BenchWorker:
    """`mlsa4rec worker` in a subprocess; workers made with the same name share the group."""

    def __init__(self, bootstrap, checkpoint, name, data_dir: Path):
        (self.port,) = free_ports(1)
        self.data_dir = data_dir
        self.args = [sys.executable, "-m", "cli", "worker", "--broker", bootstrap,
                     "--checkpoint", str(checkpoint), "--app-id", f"bench-{name}",
                     "--interactions-topic", f"in-{name}", "--recommendations-topic", f"out-{name}",
                     "--dead-letter-topic", f"dlq-{name}", "--partitions", str(PARTITIONS),
                     "--batch-max", "256", "--batch-wait-ms", "10", "--data-dir", str(data_dir),
                     "--log-level", "info", "--follow-model-updates", "false",
                     "--metrics-port", str(self.port), "--report-every-s", "0"]
        self.process = None

    def start(self) -> float:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            self.args, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
            stdout=subprocess.DEVNULL, stderr=open(self.data_dir / "worker.log", "ab"))
        return time.monotonic()

    def wait_healthy(self, timeout=600.0) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health",
                                            timeout=2) as response:
                    if json.loads(response.read())["status"] == "ok":
                        return time.monotonic()
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"worker not healthy in {timeout} s; see {self.data_dir}/worker.log")

    def stop(self):
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(60)


def clicks(n, users, seed, prefix, one_per_user=False):
    rng = np.random.default_rng(seed)
    user_ids = np.arange(n) if one_per_user else rng.integers(0, users, n)
    items = rng.integers(1, N_ITEMS, n)
    return [{"event_id": f"{prefix}-{i}", "user_id": f"user-{user_ids[i]}",
             "item_id": f"item-{items[i]}", "event_type": "CLICK", "timestamp": 0,
             "properties": None} for i in range(n)]


def drain_by_event(bootstrap, topic, event_ids: set[str], timeout=300.0):
    """Read recommendations until every event id has one: (click sent s, latency ms) of the
    first recommendation of each event, and how many more came for events already seen."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": uuid.uuid4().hex,
                         "auto.offset.reset": "earliest"})
    consumer.subscribe([topic])
    first, duplicates = {}, 0
    deadline = time.monotonic() + timeout
    while len(first) < len(event_ids) and time.monotonic() < deadline:
        for msg in consumer.consume(1000, 0.5):
            if msg.error():
                continue
            rec = decode_recommendation(msg.value())
            if rec["event_id"] in first:
                duplicates += 1
                continue
            first[rec["event_id"]] = (rec["event_timestamp"] / 1000,
                                      msg.timestamp()[1] - rec["event_timestamp"])
    consumer.close()
    return first, duplicates


def rebalance_pause(bootstrap, checkpoint, tmp, args):
    name = uuid.uuid4().hex[:8]
    ensure_topics(bootstrap, {**{f"{t}-{name}": PARTITIONS for t in ("in", "out", "dlq")},
                              f"warmup-{name}": 1})
    first = BenchWorker(bootstrap, checkpoint, name, tmp / f"a-{name}")
    second = BenchWorker(bootstrap, checkpoint, name, tmp / f"b-{name}")
    first.start()
    first.wait_healthy()
    events = clicks(int(args.rate * args.seconds), args.users, 3, "steady")
    # warmup topic: the load's producer connects before the clock starts for the first click
    load = threading.Thread(target=produce, args=(bootstrap, f"in-{name}", events, args.rate,
                                                  f"warmup-{name}"))
    started = time.time()
    load.start()
    time.sleep(args.join_at)
    joined = time.time()
    second.start()
    time.sleep(args.leave_at - args.join_at)
    left = time.time()
    second.stop()
    load.join()
    got, duplicates = drain_by_event(bootstrap, f"out-{name}", {e["event_id"] for e in events})
    first.stop()
    sent, latencies = (np.array(column, dtype=float) for column in zip(*got.values()))
    steady = latencies[(sent < joined) | ((sent > joined + 20) & (sent < left))
                       | (sent > left + 20)]
    out = {"clicks": len(events), "clicks with a recommendation": len(got),
           "duplicate recommendations": duplicates,
           "steady p50 ms": float(np.percentile(steady, 50)),
           "steady p99 ms": float(np.percentile(steady, 99))}
    print("click sent at (s from load start): p50 / max latency ms")
    for start in range(0, int(args.seconds), 5):
        bucket = latencies[(sent >= started + start) & (sent < started + start + 5)]
        if len(bucket):
            print(f"  {start:3d}-{start + 5:<3d} {np.percentile(bucket, 50):7.0f} {bucket.max():7.0f}")
    for label, at in (("join", joined), ("leave", left)):
        window = (sent >= at) & (sent < at + 20)
        slow = sent[window & (latencies > 1000)]
        out[f"{label}: max latency s"] = float(latencies[window].max() / 1000)
        out[f"{label}: clicks over 1 s"] = int(len(slow))
        out[f"{label}: slow span s"] = float(slow.max() - slow.min()) if len(slow) else 0.0
    return out


def restore_time(bootstrap, checkpoint, tmp, args):
    name = uuid.uuid4().hex[:8]
    ensure_topics(bootstrap, {f"{t}-{name}": PARTITIONS for t in ("in", "out", "dlq")})
    worker = BenchWorker(bootstrap, checkpoint, name, tmp / f"r-{name}")
    produce(bootstrap, f"in-{name}", clicks(args.restore_users, 0, 4, "fill", one_per_user=True))
    worker.start()
    drain(bootstrap, f"out-{name}", args.restore_users, timeout=900)
    worker.stop()
    table_bytes, records = changelog_bytes(bootstrap, f"bench-{name}")
    started = worker.start()
    kept = worker.wait_healthy() - started
    worker.stop()
    shutil.rmtree(worker.data_dir)
    started = worker.start()
    restored = worker.wait_healthy() - started
    worker.stop()
    gb = table_bytes / 1e9
    return {"users": args.restore_users, "changelog records": records, "table GB": gb,
            "start with RocksDB kept s": kept, "start restoring from changelog s": restored,
            "restore s per GB": (restored - kept) / gb}


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--users", type=int, default=6040)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--join-at", type=float, default=15.0)
    parser.add_argument("--leave-at", type=float, default=38.0)
    parser.add_argument("--restore-users", type=int, default=16000, help="0: skip part 2")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="mlsa4rec-bench-rebalance-"))
    torch.manual_seed(0)
    checkpoint = tmp / "model.pt"
    save_checkpoint(checkpoint, build_model("mlsa4rec-s", N_ITEMS),
                    ["[PAD]"] + [f"item-{i}" for i in range(1, N_ITEMS)], {}, version="bench")
    try:
        with kafka_bootstrap() as bootstrap:
            print(json.dumps(rebalance_pause(bootstrap, checkpoint, tmp, args)), flush=True)
            if args.restore_users:
                print(json.dumps(restore_time(bootstrap, checkpoint, tmp, args)), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
