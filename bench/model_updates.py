"""Online fine-tuning benchmark on the real local broker, ML-100k-sized model (1,349 items).

1. Freshness: a scorer worker and a trainer (`mlsa4rec trainer`, a round every
   --round-every-s) run while clicks arrive at --rate for --seconds. For each click: the time
   from its send to the announcement of the first version that trained on it (announcements
   carry `trained_through`, the newest event a round trained on).
2. Scorer throughput during swaps: one worker drains a backlog of --events clicks (a) with no
   announcement, and with a fine-tuned child version announced every --swap-every-s and the
   states (b) rebuilt from the users' histories after every version, (c) kept while they were
   started by one of the last 5 ancestors (the worker's default), (d) never rebuilt.

    .venv/bin/python bench/model_updates.py [--seconds 120] [--rate 100] [--events 20000]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.stream_throughput import drain  # noqa: E402
from model.checkpoint import save_checkpoint  # noqa: E402
from model.models import build_model  # noqa: E402
from confluent_kafka import Producer  # noqa: E402
from schemas.codec import encode_interaction  # noqa: E402
from streams.shared.clients import PRODUCER_DEFAULTS, produce_clicks  # noqa: E402
from streams.shared.model_store import ModelStore  # noqa: E402
from streams.shared.model_updates import announce, ensure_model_updates_topic, read_announcements  # noqa: E402
from streams.shared.topics import ensure_topics  # noqa: E402
from tests.kafka_broker import kafka_bootstrap  # noqa: E402

N_ITEMS, N_USERS, PARTITIONS = 1350, 943, 4
ITEM_IDS = ["[PAD]"] + [f"item-{i}" for i in range(1, N_ITEMS)]


def clicks(n: int, seed: int, prefix: str):
    """Users uniform; items Zipf-like (a few popular ones), as in MovieLens."""
    rng = np.random.default_rng(seed)
    users = rng.integers(0, N_USERS, n)
    items = np.minimum(rng.zipf(1.3, n), N_ITEMS - 1)
    return [{"event_id": f"{prefix}-{i}", "user_id": f"user-{users[i]}",
             "item_id": f"item-{items[i]}", "event_type": "CLICK", "timestamp": 0,
             "properties": None} for i in range(n)]


def start(args: list[str], log: Path):
    env = dict(os.environ, PYTHONPATH=str(REPO), MLSA4REC_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "cli", *args], cwd=REPO, env=env,
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT)


def worker_args(bootstrap, checkpoint, name, store, data_dir, extra=()):
    return ["worker", "--broker", bootstrap, "--checkpoint", str(checkpoint),
            "--app-id", f"bench-{name}", "--interactions-topic", f"in-{name}",
            "--recommendations-topic", f"out-{name}", "--dead-letter-topic", f"dlq-{name}",
            "--model-updates-topic", f"updates-{name}", "--model-store", str(store),
            "--partitions", str(PARTITIONS), "--batch-max", "64", "--batch-wait-ms", "10",
            "--state-dtype", "float16", "--data-dir", str(data_dir), "--log-level", "warning",
            *extra]


def topics(bootstrap, name):
    ensure_topics(bootstrap, {f"in-{name}": PARTITIONS, f"out-{name}": PARTITIONS,
                              f"dlq-{name}": PARTITIONS})
    ensure_model_updates_topic(bootstrap, f"updates-{name}")


def produce_steadily(bootstrap, topic, events, rate):
    """Send at `rate` events/s, each stamped with its send time (ms); returns the stamps."""
    producer = Producer({"bootstrap.servers": bootstrap, **PRODUCER_DEFAULTS})
    stamps, begin = [], time.perf_counter()
    for i, click in enumerate(events):
        wait = begin + i / rate - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        click["timestamp"] = int(time.time() * 1000)
        stamps.append(click["timestamp"])
        producer.produce(topic, key=click["user_id"].encode(), value=encode_interaction(click))
        producer.poll(0)
    producer.flush(30)
    return np.array(stamps)


def freshness(bootstrap, tmp, checkpoint, args):
    name = uuid.uuid4().hex[:8]
    topics(bootstrap, name)
    store = tmp / f"store-{name}"
    worker = start(worker_args(bootstrap, checkpoint, name, store, tmp / f"w-{name}"),
                   tmp / f"worker-{name}.log")
    trainer = start(["trainer", "--broker", bootstrap, "--interactions-topic", f"in-{name}",
                     "--partitions", str(PARTITIONS), "--model-updates-topic", f"updates-{name}",
                     "--group-id", f"trainer-{name}", "--checkpoint", str(checkpoint),
                     "--model-store", str(store), "--buffer-dir", str(tmp / f"buf-{name}"),
                     "--round-every-events", str(10 ** 9),
                     "--round-every-s", str(args.round_every_s), "--holdout-events", "200",
                     "--min-holdout", "50"], tmp / f"trainer-{name}.log")
    try:
        events = clicks(int(args.seconds * args.rate), 1, "fresh")
        stamps = produce_steadily(bootstrap, f"in-{name}", events, args.rate)
        time.sleep(2 * args.round_every_s + 10)        # the last rounds
        announced = [a for a in read_announcements(bootstrap, f"updates-{name}")
                     if a.get("trained_through")]
    finally:
        trainer.terminate()
        worker.terminate()
        trainer.wait(30)
        worker.wait(30)
    ages = []
    for ts in stamps:
        covering = [a["created_at"] for a in announced if a["trained_through"] >= ts]
        if covering:
            ages.append(min(covering) - ts)
    covered = len(ages) / len(stamps)
    ages = np.array(ages) / 1000
    gaps = np.diff([a["created_at"] for a in announced]) / 1000
    return {"events": len(stamps), "versions": len(announced), "covered": covered,
            "freshness p50 s": float(np.percentile(ages, 50)) if len(ages) else None,
            "freshness p90 s": float(np.percentile(ages, 90)) if len(ages) else None,
            "freshness max s": float(ages.max()) if len(ages) else None,
            "s between versions": float(gaps.mean()) if len(gaps) else None}


def drain_rate(bootstrap, tmp, checkpoint, args, swap_every_s: float, extra: list[str]):
    name = uuid.uuid4().hex[:8]
    topics(bootstrap, name)
    store = ModelStore(tmp / f"store-{name}")
    backlog = clicks(args.events, 2, "backlog")
    produce_clicks(bootstrap, f"in-{name}", backlog)
    worker = start(worker_args(bootstrap, checkpoint, name, store.root, tmp / f"w-{name}", extra),
                   tmp / f"worker-{name}.log")
    stop, swaps = threading.Event(), []

    def announce_versions():
        torch.manual_seed(1)
        model = build_model("mlsa4rec-s", N_ITEMS)
        parent = "start"                                   # the worker's first version
        while not stop.wait(swap_every_s):
            with torch.no_grad():                          # a "fine-tuned" version
                model.item_embedding.weight.add_(0.001 * torch.randn_like(model.item_embedding.weight))
            announcement = store.publish(model, ITEM_IDS, {}, parent)
            announce(bootstrap, f"updates-{name}", announcement)
            parent = announcement["version"]
            swaps.append(parent)

    swapper = threading.Thread(target=announce_versions, daemon=True)
    if swap_every_s:
        swapper.start()
    try:
        received, _ = drain(bootstrap, f"out-{name}", len(backlog))
    finally:
        stop.set()
        worker.terminate()
        worker.wait(30)
    received = np.sort(received)
    return {"events/s": (len(received) - 1) / (received[-1] - received[0]),
            "versions announced": len(swaps)}


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=120.0, help="0: no freshness run")
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--round-every-s", type=float, default=10.0)
    parser.add_argument("--events", type=int, default=20000)
    parser.add_argument("--swap-every-s", type=float, default=2.0)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="mlsa4rec-bench-updates-"))
    torch.manual_seed(0)
    checkpoint = tmp / "start.pt"
    save_checkpoint(checkpoint, build_model("mlsa4rec-s", N_ITEMS), ITEM_IDS, {}, version="start")
    with kafka_bootstrap() as bootstrap:
        print(f"broker {bootstrap}; model mlsa4rec-s, {N_ITEMS - 1} items, {N_USERS} users",
              flush=True)
        fresh = freshness(bootstrap, tmp, checkpoint, args) if args.seconds else None
        print("freshness:", json.dumps(fresh), flush=True)
        every = f"a version every {args.swap_every_s:g} s"
        runs = [("no swaps", 0, []),
                (f"{every}, states rebuilt after every version", args.swap_every_s,
                 ["--keep-states-for-versions", "0"]),
                (f"{every}, states kept for 5 generations (default)", args.swap_every_s, []),
                (f"{every}, states never rebuilt", args.swap_every_s,
                 ["--rebuild-states", "false"])]
        rows = [(label, drain_rate(bootstrap, tmp, checkpoint, args, every_s, extra))
                for label, every_s, extra in runs]
    if fresh:
        print(f"\nfreshness ({fresh['events']} clicks at {args.rate:g}/s, a round every "
              f"{args.round_every_s:g} s): p50 {fresh['freshness p50 s']:.1f} s, "
              f"p90 {fresh['freshness p90 s']:.1f} s, max {fresh['freshness max s']:.1f} s; "
              f"{fresh['versions']} versions, {fresh['covered']:.0%} of clicks covered")
    print("\n| scorer drain of a backlog | events/s | versions announced |\n|---|---|---|")
    for label, row in rows:
        print(f"| {label} | {row['events/s']:.0f} | {row['versions announced']} |")


if __name__ == "__main__":
    main()
