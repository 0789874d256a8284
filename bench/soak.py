"""Soak: one scorer worker under a steady load for --minutes; memory, lag and errors over time.

Every --every seconds: the worker's resident memory (RSS), its consumer lag and events handled
(from its /metrics), recommendations out, and error lines in its log. The load: clicks of
--users users over 3,416 items (ML-1M sized model, random weights) at --rate per second.

    .venv/bin/python bench/soak.py [--minutes 10] [--rate 1000] [--users 20000]
"""

from __future__ import annotations

import argparse
import os
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
from confluent_kafka import Producer

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from model.checkpoint import save_checkpoint  # noqa: E402
from model.models import build_model  # noqa: E402
from schemas.codec import encode_interaction  # noqa: E402
from streams.shared.clients import PRODUCER_DEFAULTS  # noqa: E402
from streams.shared.local_broker import free_ports, local_kafka  # noqa: E402
from streams.shared.topics import ensure_topics  # noqa: E402

N_ITEMS = 3417


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("mlsa4rec_") and " " in line:
            name, value = line.rsplit(" ", 1)
            base = name.split("{")[0]
            out[base] = out.get(base, 0.0) + float(value)     # summed over labels
            out[name] = float(value)
    return out


def load(bootstrap, topic, rate, users, stop, sent):
    producer = Producer({"bootstrap.servers": bootstrap, **PRODUCER_DEFAULTS})
    rng = np.random.default_rng(0)
    start, i = time.perf_counter(), 0
    while not stop.is_set():
        wait = start + i / rate - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        user = f"user-{rng.integers(users)}"
        producer.produce(topic, key=user.encode(), value=encode_interaction({
            "event_id": f"soak-{i}", "user_id": user, "item_id": f"item-{rng.integers(1, N_ITEMS)}",
            "event_type": "CLICK", "timestamp": int(time.time() * 1000), "properties": None}))
        producer.poll(0)
        i += 1
        sent[0] = i
    producer.flush(30)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--users", type=int, default=20000)
    parser.add_argument("--every", type=float, default=30.0)
    parser.add_argument("--state-dtype", default="float16")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="mlsa4rec-soak-"))
    torch.manual_seed(0)
    checkpoint = tmp / "model.pt"
    save_checkpoint(checkpoint, build_model("mlsa4rec-s", N_ITEMS),
                    ["[PAD]"] + [f"item-{i}" for i in range(1, N_ITEMS)], {}, version="soak")
    (port,) = free_ports(1)
    with local_kafka() as bootstrap:
        name = uuid.uuid4().hex[:8]
        ensure_topics(bootstrap, {f"in-{name}": 4, f"out-{name}": 4, f"dlq-{name}": 4})
        log = tmp / "worker.log"
        worker = subprocess.Popen(
            [sys.executable, "-m", "cli", "worker", "--broker", bootstrap, "--checkpoint",
             str(checkpoint), "--app-id", f"soak-{name}", "--interactions-topic", f"in-{name}",
             "--recommendations-topic", f"out-{name}", "--dead-letter-topic", f"dlq-{name}",
             "--batch-max", "256", "--batch-wait-ms", "10", "--state-dtype", args.state_dtype,
             "--data-dir", str(tmp / "data"), "--metrics-port", str(port),
             "--follow-model-updates", "false", "--log-level", "warning"],
            cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=open(log, "wb"),
            stderr=subprocess.STDOUT)
        stop, sent = threading.Event(), [0]
        time.sleep(8)                                   # worker start-up, outside the clock
        producer = threading.Thread(target=load, args=(bootstrap, f"in-{name}", args.rate,
                                                       args.users, stop, sent), daemon=True)
        # Errors of the start-up (e.g. "GroupCoordinatorNotAvailable" on a fresh broker) do
        # not count: only lines written once the load runs.
        log_start = len(log.read_text(errors="replace").splitlines())
        started = time.time()
        producer.start()
        rows = []
        print("| t s | sent | handled | lag | RSS MB | e2e mean s | error lines |\n"
              "|---|---|---|---|---|---|---|", flush=True)
        try:
            while time.time() - started < 60 * args.minutes:
                time.sleep(args.every)
                m = scrape(port)
                handled = m.get("mlsa4rec_events_total", 0)
                lag = m.get("mlsa4rec_consumer_lag", 0)
                e2e = m.get("mlsa4rec_end_to_end_seconds_sum", 0) / max(
                    m.get("mlsa4rec_end_to_end_seconds_count", 1), 1)
                errors = sum(1 for line in log.read_text(errors="replace").splitlines()[log_start:]
                             if "ERROR" in line or "Traceback" in line)
                rows.append((time.time() - started, sent[0], handled, lag, rss_mb(worker.pid),
                             e2e, errors))
                print("| {:.0f} | {} | {:.0f} | {:.0f} | {:.0f} | {:.3f} | {} |".format(*rows[-1]),
                      flush=True)
        finally:
            stop.set()
            producer.join(30)
            worker.terminate()
            worker.wait(60)
    rss = np.array([r[4] for r in rows])
    lags = np.array([r[3] for r in rows])
    half = len(rss) // 2
    print(f"\nRSS MB: first {rss[0]:.0f}, last {rss[-1]:.0f}, max {rss.max():.0f}; "
          f"second-half growth {rss[-1] - rss[half]:+.0f} MB. Lag: max {lags.max():.0f}, "
          f"last {lags[-1]:.0f}. Sent {rows[-1][1]}, handled {rows[-1][2]:.0f}, "
          f"error lines {rows[-1][6]}.")


if __name__ == "__main__":
    main()
