"""Streaming benchmark on the real local broker: one scorer worker, CPU (or GPU if present).

For each model batch size: sustained events/s (a backlog of clicks drained by one worker) and
produce-to-recommendation latency percentiles at a steady offered rate, next to a raw
confluent-kafka consume-decode-encode-produce loop on the same broker (the ceiling). Also the
stored state's bytes per user and the changelog bytes per second.

    .venv/bin/python bench/stream_throughput.py [--events 20000] [--batches 1 64 256]
        [--model mlsa4rec-s] [--state-dtype float32] [--rate 500]

The model has ML-1M's item count (3,416 + pad) with random weights: speed does not depend on
training. Users: 6,040, clicks drawn uniformly.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import torch
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from model.checkpoint import save_checkpoint  # noqa: E402
from model.models import build_model  # noqa: E402
from schemas.codec import decode_interaction, decode_recommendation, encode_interaction, encode_recommendation  # noqa: E402
from streams.shared.clients import PRODUCER_DEFAULTS  # noqa: E402
from streams.shared.topics import ensure_topics  # noqa: E402
from tests.kafka_broker import kafka_bootstrap  # noqa: E402

N_ITEMS, N_USERS, PARTITIONS = 3417, 6040, 4


def clicks(n: int, seed: int, prefix: str):
    rng = np.random.default_rng(seed)
    users, items = rng.integers(0, N_USERS, n), rng.integers(1, N_ITEMS, n)
    for i in range(n):
        yield {"event_id": f"{prefix}-{i}", "user_id": f"user-{users[i]}", "item_id": f"item-{items[i]}",
               "event_type": "CLICK", "timestamp": 0, "properties": None}


def produce(bootstrap, topic, events, rate=0.0, warmup_topic=None):
    """Send events (timestamp = send time, ms); rate = events/s, 0 = as fast as possible.

    A real client is long-lived: with `warmup_topic` the producer first connects and gets its
    idempotence id (~0.5 s) with one message there, so that start-up is not counted as the
    first events' latency."""
    producer = Producer({"bootstrap.servers": bootstrap, **PRODUCER_DEFAULTS})
    if warmup_topic:
        producer.produce(warmup_topic, value=b"warm-up")
        producer.flush(30)
    start = time.perf_counter()
    for i, click in enumerate(events):
        if rate:
            wait = start + i / rate - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
        click["timestamp"] = int(time.time() * 1000)
        producer.produce(topic, key=click["user_id"].encode(), value=encode_interaction(click))
        producer.poll(0)
    producer.flush(60)


def drain(bootstrap, topic, count, timeout=600.0, alive=None):
    """Consume `count` recommendations; returns (their append times s, latencies ms).

    Times are the recommendation records' Kafka timestamps (set when the worker sends them), so
    latency = recommendation sent - click sent, whenever this consumer happens to read it.
    alive() -> False (the worker has exited) stops the wait with an error."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": uuid.uuid4().hex,
                         "auto.offset.reset": "earliest"})
    consumer.subscribe([topic])
    received, latencies = [], []
    deadline = time.monotonic() + timeout
    while len(received) < count and time.monotonic() < deadline:
        if alive is not None and not alive():
            consumer.close()
            raise RuntimeError(f"the worker exited after {len(received)} of {count} "
                               "recommendations; see its log")
        for msg in consumer.consume(1000, 0.5):
            if msg.error():
                continue
            sent_ms = msg.timestamp()[1]
            rec = decode_recommendation(msg.value())
            received.append(sent_ms / 1000)
            latencies.append(sent_ms - rec["event_timestamp"])
    consumer.close()
    return np.array(received), np.array(latencies)


def changelog_bytes(bootstrap, app_id):
    """Bytes (keys + values) and records written to the state changelog so far."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    topic = f"{app_id}-user-state-changelog"
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": uuid.uuid4().hex,
                         "auto.offset.reset": "earliest"})
    md = admin.list_topics(topic, timeout=10).topics.get(topic)
    if md is None:
        return 0, 0
    total, records = 0, 0
    consumer.assign([TopicPartition(topic, p, 0) for p in md.partitions])
    idle = 0
    while idle < 4:
        msgs = consumer.consume(1000, 0.5)
        if not msgs:
            idle += 1
            continue
        for m in msgs:
            if not m.error():
                total += len(m.value() or b"") + len(m.key() or b"")
                records += 1
    consumer.close()
    return total, records


def run_worker(bootstrap, checkpoint, name, batch, state_dtype, data_dir):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    args = [sys.executable, "-m", "cli", "worker", "--broker", bootstrap, "--checkpoint", str(checkpoint),
            "--app-id", f"bench-{name}", "--interactions-topic", f"in-{name}",
            "--recommendations-topic", f"out-{name}", "--dead-letter-topic", f"dlq-{name}",
            "--partitions", str(PARTITIONS), "--batch-max", str(batch), "--batch-wait-ms", "10",
            "--state-dtype", state_dtype, "--data-dir", str(data_dir), "--log-level", "warning",
            "--follow-model-updates", "false", "--metrics-port", "0"]
    return subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=open(Path(data_dir).parent / f"{name}.log", "wb"))


def raw_loop(bootstrap, src, dst, count, timeout=300.0):
    """The ceiling: consume, decode, encode a 10-item recommendation, produce; no model."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": uuid.uuid4().hex,
                         "auto.offset.reset": "earliest", "enable.auto.commit": True})
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    consumer.subscribe([src])
    done, deadline = 0, time.monotonic() + timeout
    while done < count and time.monotonic() < deadline:
        for msg in consumer.consume(500, 0.2):
            if msg.error():
                continue
            event = decode_interaction(msg.value())
            rec = {"user_id": event["user_id"], "event_id": event["event_id"],
                   "event_timestamp": event["timestamp"],
                   "items": [{"item_id": f"item-{i}", "score": 0.0, "rank": i + 1} for i in range(10)],
                   "model_version": "raw", "produced_at": int(time.time() * 1000)}
            producer.produce(dst, key=msg.key(), value=encode_recommendation(rec))
            producer.poll(0)
            done += 1
    producer.flush(30)
    consumer.close()


def measure(bootstrap, label, start_consumer, events, rate, worker: bool):
    """Backlog throughput, then latency at `rate`. start_consumer(name) -> process or thread."""
    name = uuid.uuid4().hex[:8]
    ensure_topics(bootstrap, {f"in-{name}": PARTITIONS, f"out-{name}": PARTITIONS,
                              f"dlq-{name}": PARTITIONS, f"warmup-{name}": 1})
    produce(bootstrap, f"in-{name}", list(clicks(events, 1, "backlog")))
    started = time.time()
    proc = start_consumer(name)
    alive = (lambda: proc.poll() is None) if hasattr(proc, "poll") else None
    received, _ = drain(bootstrap, f"out-{name}", events, alive=alive)
    # Throughput from the first to the last recommendation: excludes process start-up.
    received = np.sort(received)
    throughput = (len(received) - 1) / (received[-1] - received[0]) if len(received) > 1 else 0.0
    n_latency = max(200, int(rate * 10))
    produce(bootstrap, f"in-{name}", list(clicks(n_latency, 2, "steady")), rate=rate,
            warmup_topic=f"warmup-{name}")
    times, latencies = drain(bootstrap, f"out-{name}", events + n_latency, alive=alive)
    steady = latencies[np.argsort(times)][-n_latency:]
    result = {"label": label, "events/s": throughput, "p50 ms": float(np.percentile(steady, 50)),
              "p99 ms": float(np.percentile(steady, 99)), "startup s": received[0] - started}
    if hasattr(proc, "terminate"):
        proc.terminate()
        proc.wait(30)
    if worker:
        total, records = changelog_bytes(bootstrap, f"bench-{name}")
        result["changelog MB"] = total / 1e6
        result["bytes/record"] = total / max(records, 1)
        result["changelog MB/s at backlog rate"] = throughput * total / max(records, 1) / 1e6
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=20000)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64, 256])
    parser.add_argument("--models", nargs="+", default=["mlsa4rec-s", "mlsa4rec"])
    parser.add_argument("--state-dtypes", nargs="+", default=["float32", "float16"])
    parser.add_argument("--rate", type=float, default=200.0, help="offered rate for latency")
    parser.add_argument("--skip-raw", action="store_true")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="mlsa4rec-bench-"))
    results = []
    with kafka_bootstrap() as bootstrap:
        print(f"broker {bootstrap}, {torch.get_num_threads()} torch threads, {args.events} events, "
              f"{N_USERS} users, {N_ITEMS - 1} items, {PARTITIONS} partitions", flush=True)
        if not args.skip_raw:
            import threading

            def start_raw(name):
                t = threading.Thread(target=raw_loop, args=(bootstrap, f"in-{name}", f"out-{name}",
                                                            10 ** 9, 120.0), daemon=True)
                t.start()
                return t
            results.append(measure(bootstrap, "raw confluent-kafka loop (ceiling)", start_raw,
                                   args.events, args.rate, worker=False))
            print(results[-1], flush=True)
        for model_name in args.models:
            torch.manual_seed(0)
            model = build_model(model_name, N_ITEMS)
            checkpoint = tmp / f"{model_name}.pt"
            save_checkpoint(checkpoint, model, ["[PAD]"] + [f"item-{i}" for i in range(1, N_ITEMS)],
                            {}, version="bench")
            dtypes = args.state_dtypes if model.steppable else ["float32"]
            for dtype in dtypes:
                for batch in args.batches:
                    label = f"{model_name} batch {batch} state {dtype}"

                    def start_worker(name, batch=batch, dtype=dtype, checkpoint=checkpoint):
                        return run_worker(bootstrap, checkpoint, name, batch, dtype,
                                          tmp / f"data-{name}")
                    results.append(measure(bootstrap, label, start_worker, args.events, args.rate,
                                           worker=True))
                    print(results[-1], flush=True)
    print("\n| run | events/s | p50 ms | p99 ms | changelog bytes/record | changelog MB/s |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['label']} | {r['events/s']:.0f} | {r['p50 ms']:.1f} | {r['p99 ms']:.1f} | "
              f"{r.get('bytes/record', 0):.0f} | {r.get('changelog MB/s at backlog rate', 0):.2f} |")


if __name__ == "__main__":
    main()
