"""Streaming benchmark on the real local broker: one scorer worker per configuration.

One run measures, on one broker and one machine:

- the raw loop: confluent-kafka consume, decode, encode a 10-item recommendation, produce; no
  model (the ceiling for any worker);
- the model alone, in this process, for each model and batch size: users/s of one batched
  `step` + scores + top-10 on one torch thread (as bench/step_speed.py), on `--device`, in
  one call and, on CPU with `--worker-arg=--step-rows=N`, in blocks of N users as those
  workers step; "x model" divides by the faster of the two;
- for each model, state dtype and batch size, a `python -m cli worker` subprocess: backlog
  throughput (a backlog of `--events` clicks drained; events/s from the first recommendation
  to the last, so start-up is not counted), its ratio to the raw loop and to the model alone,
  the batch sizes it ran (its `mlsa4rec_batch_size` histogram, scraped from `--metrics-port`
  after the drain), changelog bytes per click, start-up time, and produce-to-recommendation
  latency p50/p99 at half of the throughput it just showed (or at `--rate` if given);
- with `--baseline-ref REF`, the same for the worker of an older commit (a temporary
  `git worktree`), right after each configuration's row: old and new code on the same broker.

Output: one JSON line per result as it finishes, then markdown tables. The figures depend on
the machine and on what else runs on it (the broker shares its cores), so compare them only
within one run.

    .venv/bin/python bench/stream_throughput.py [--events 20000] [--batches 1 64 256]
        [--models mlsa4rec-s mlsa4rec] [--state-dtypes float32 float16]
        [--users uniform|zipf|ml-1m] [--zipf-a 1.1] [--device cpu|cuda]
        [--rate R] [--latency-seconds 10] [--skip-raw]
        [--worker-arg=--batch-wait-ms=5 ...] [--baseline-ref HEAD~1]

The model has ML-1M's item count (3,416 + pad) with random weights: speed does not depend on
training. Users: 6,040; clicks per `--users` (bench/throughput_parts.py: uniform, Zipf over
users, or the ML-1M log in time order).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import shutil
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

from bench.throughput_parts import (  # noqa: E402
    N_ITEMS, N_USERS, TRAFFIC, Traffic, histogram_quantile, histogram_since, model_only_rate,
    scrape_histogram)
from model.checkpoint import save_checkpoint  # noqa: E402
from model.models import build_model  # noqa: E402
from schemas.codec import decode_interaction, decode_recommendation, encode_interaction, encode_recommendation  # noqa: E402
from streams.shared.clients import PRODUCER_DEFAULTS  # noqa: E402
from streams.shared.config import StreamConfig  # noqa: E402
from streams.shared.local_broker import free_ports  # noqa: E402
from streams.shared.topics import ensure_topics  # noqa: E402
from tests.kafka_broker import kafka_bootstrap  # noqa: E402

PARTITIONS = 4
# bench/rebalance.py and bench/model_updates.py import N_ITEMS, produce, drain and
# changelog_bytes from here: keep their signatures.


def clicks(users: list[str], items: list[str], prefix: str) -> list[dict]:
    return [{"event_id": f"{prefix}-{i}", "user_id": user, "item_id": item,
             "event_type": "CLICK", "timestamp": 0, "properties": None}
            for i, (user, item) in enumerate(zip(users, items))]


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


def run_worker(bootstrap, checkpoint, name, batch, state_dtype, data_dir, tree=REPO,
               device="cpu", metrics_port=0, extra=()):
    """Start `python -m cli worker` from source tree `tree` (this one or a baseline worktree);
    its stderr goes to <data_dir's parent>/<name>.log."""
    env = dict(os.environ, PYTHONPATH=str(tree))
    args = [sys.executable, "-m", "cli", "worker", "--broker", bootstrap, "--checkpoint", str(checkpoint),
            "--app-id", f"bench-{name}", "--interactions-topic", f"in-{name}",
            "--recommendations-topic", f"out-{name}", "--dead-letter-topic", f"dlq-{name}",
            "--partitions", str(PARTITIONS), "--batch-max", str(batch), "--batch-wait-ms", "10",
            "--state-dtype", state_dtype, "--data-dir", str(data_dir), "--log-level", "warning",
            "--follow-model-updates", "false", "--metrics-port", str(metrics_port),
            "--device", device]
    # Last, so that a --worker-arg can also override one of the options above (argparse keeps
    # the last value).
    args += list(extra)
    with open(Path(data_dir).parent / f"{name}.log", "wb") as log:
        return subprocess.Popen(args, cwd=tree, env=env, stdout=subprocess.DEVNULL, stderr=log)


def raw_loop(bootstrap, src, dst, count, timeout=300.0):
    """The ceiling: consume, decode, encode a 10-item recommendation, produce; no model."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": uuid.uuid4().hex,
                         "auto.offset.reset": "earliest", "enable.auto.commit": True})
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    consumer.subscribe([src])
    done, deadline = 0, time.monotonic() + timeout
    while done < count and time.monotonic() < deadline:
        # A short wait: consume() holds a batch until 500 messages or the timeout, so a 0.2 s
        # timeout put ~200 ms into every latency the raw loop showed below its capacity.
        for msg in consumer.consume(500, 0.005):
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


class RawLoopProcess:
    """The raw loop in its own process, like a worker, so that it does not share the GIL with
    this process's producer and consumers; with a Popen's poll / terminate / wait / kill, so
    that one measure() serves both. Spawned, not forked: this process already runs
    librdkafka's and torch's threads."""

    def __init__(self, bootstrap, name):
        self.process = multiprocessing.get_context("spawn").Process(
            target=raw_loop, daemon=True, kwargs=dict(
                bootstrap=bootstrap, src=f"in-{name}", dst=f"out-{name}", count=10 ** 12,
                timeout=3600.0))
        self.process.start()

    def poll(self):
        return None if self.process.is_alive() else self.process.exitcode

    def terminate(self):
        self.process.terminate()

    def kill(self):
        self.process.kill()

    def wait(self, timeout):
        self.process.join(timeout)
        if self.process.is_alive():
            raise subprocess.TimeoutExpired("raw loop", timeout)


class Config:
    """What one row runs: a raw loop, or a worker of this tree or of the baseline tree."""

    def __init__(self, label, model=None, batch=None, state_dtype=None, checkpoint=None,
                 tree=None, baseline=None):
        self.label, self.model, self.batch, self.state_dtype = label, model, batch, state_dtype
        self.checkpoint, self.tree, self.baseline = checkpoint, tree, baseline

    @property
    def is_worker(self):
        return self.tree is not None


def measure(bootstrap, config: Config, traffic: Traffic, args, tmp: Path) -> dict:
    """Backlog throughput (and the worker's batch sizes), then latency at half of that
    throughput (or at --rate), then the worker's changelog."""
    name = uuid.uuid4().hex[:8]
    ensure_topics(bootstrap, {f"in-{name}": PARTITIONS, f"out-{name}": PARTITIONS,
                              f"dlq-{name}": PARTITIONS, f"warmup-{name}": 1})
    result = {"label": config.label, "model": config.model, "batch": config.batch,
              "state_dtype": config.state_dtype, "baseline": config.baseline,
              "users": traffic.describe(), "device": args.device,
              "worker_args": args.worker_arg if config.is_worker else []}
    produce(bootstrap, f"in-{name}", clicks(*traffic.pairs(0, args.events), "backlog"))
    port = free_ports(1)[0] if config.is_worker else None
    data_dir = tmp / f"data-{name}"
    started = time.time()
    if config.is_worker:
        proc = run_worker(bootstrap, config.checkpoint, name, config.batch, config.state_dtype,
                          data_dir, config.tree, args.device, port, args.worker_arg)
    else:
        proc = RawLoopProcess(bootstrap, name)
    try:
        alive = lambda: proc.poll() is None  # noqa: E731
        result.update(backlog_phase(bootstrap, name, args.events, started, alive))
        before = None
        if config.is_worker:
            before = batch_histogram(port, args.events)
            result.update(batch_columns(before))
        rate = args.rate or max(1.0, 0.5 * result["events/s"])
        n_latency = max(200, int(rate * args.latency_seconds))
        result.update(latency_phase(bootstrap, name, traffic, args.events, n_latency, rate, alive))
        if before is not None:
            # Batches while clicks arrive at half capacity: JSON only, next to the backlog's.
            after = batch_histogram(port, args.events + n_latency)
            steady = histogram_since(after, before) if after else None
            result["steady batch mean"] = (steady["sum"] / steady["count"]
                                           if steady and steady["count"] else None)
    except RuntimeError as exc:
        if not config.is_worker:
            raise
        print_log_tail(tmp / f"{name}.log")
        raise RuntimeError(f"{exc} ({tmp / name}.log)") from exc
    finally:
        stop(proc)
    if config.is_worker:
        result.update(changelog_columns(bootstrap, name, args.events + n_latency,
                                        result["events/s"]))
        shutil.rmtree(data_dir, ignore_errors=True)       # RocksDB files; the log stays
    return result


def stop(proc) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:       # a worker stuck in shutdown
        proc.kill()
        proc.wait(30)


def backlog_phase(bootstrap, name, events, started, alive) -> dict:
    received, _ = drain(bootstrap, f"out-{name}", events, alive=alive)
    if len(received) < events:
        raise RuntimeError(f"only {len(received)} of {events} recommendations in time")
    # Throughput from the first to the last recommendation: excludes process start-up.
    received = np.sort(received)
    throughput = (len(received) - 1) / (received[-1] - received[0]) if len(received) > 1 else 0.0
    return {"events/s": throughput, "startup s": received[0] - started}


def latency_phase(bootstrap, name, traffic, start, n, rate, alive, prefix="steady") -> dict:
    """Clicks at a steady `rate` (the slice of the traffic after the backlog); the latency
    percentiles of their recommendations. `prefix`: of their event ids, unique per phase (a
    user's click with its last click's id is a duplicate: not scored again)."""
    produce(bootstrap, f"in-{name}", clicks(*traffic.pairs(start, n), prefix), rate=rate,
            warmup_topic=f"warmup-{name}")
    times, latencies = drain(bootstrap, f"out-{name}", start + n, alive=alive)
    if len(times) < start + n:
        raise RuntimeError(f"only {len(times) - start} of {n} steady recommendations in time")
    steady = latencies[np.argsort(times)][-n:]
    return {"offered/s": rate, "p50 ms": float(np.percentile(steady, 50)),
            "p99 ms": float(np.percentile(steady, 99))}


def batch_histogram(port, events, timeout=10.0):
    """The worker's batch-size histogram once it accounts for `events` clicks: a batch is
    observed after its recommendations are acknowledged and its records written, a moment
    after this benchmark has read them. None if the worker does not expose it."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            histogram = scrape_histogram(port)
        except OSError:
            histogram = None          # metrics server not (yet) up, or gone
        if histogram is None or histogram["sum"] >= events or time.monotonic() > deadline:
            return histogram
        time.sleep(0.2)


def batch_columns(histogram) -> dict:
    if not histogram or not histogram["count"]:
        return {"batch mean": None, "batch p50": None, "batch p99": None, "batches": 0}
    # p50 / p99 are bucket upper bounds (bucket resolution), the mean is exact (sum / count).
    return {"batch mean": histogram["sum"] / histogram["count"],
            "batch p50": histogram_quantile(histogram, 0.50),
            "batch p99": histogram_quantile(histogram, 0.99),
            "batches": int(histogram["count"]),
            "batch buckets": {format(le, "g"): n for le, n in histogram["buckets"]}}


def changelog_columns(bootstrap, name, scored, throughput) -> dict:
    total, records = changelog_bytes(bootstrap, f"bench-{name}")
    per_record = total / max(records, 1)
    return {"changelog bytes/click": total / max(scored, 1), "changelog MB": total / 1e6,
            "bytes/record": per_record,
            "changelog MB/s at backlog rate": throughput * total / max(scored, 1) / 1e6}


@contextlib.contextmanager
def baseline_tree(ref, tmp: Path):
    """A detached `git worktree` of this repository at `ref`, removed on exit; None without a
    ref."""
    if not ref:
        yield None
        return
    tree = tmp / "baseline-tree"
    done = subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), ref],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"git worktree add {ref} failed: {done.stderr.strip()}")
    try:
        check_imports_from(tree)
        yield tree
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)],
                       capture_output=True, text=True)


def check_imports_from(tree: Path) -> None:
    """The venv holds this repository as an editable install; make sure a process started in
    `tree` with PYTHONPATH=tree imports the old code, not this tree's."""
    probe = "import cli, streams; print(cli.__file__); print(streams.__file__)"
    done = subprocess.run([sys.executable, "-c", probe], cwd=tree, capture_output=True,
                          text=True, env=dict(os.environ, PYTHONPATH=str(tree)), check=True)
    for path in done.stdout.split():
        if not Path(path).resolve().is_relative_to(tree.resolve()):
            raise RuntimeError(f"the baseline tree imports {path}, not its own code")


def step_rows_of(worker_args: list[str]) -> int:
    """The workers' --step-rows: the last --worker-arg=--step-rows=N, else the default."""
    rows = StreamConfig().step_rows
    for arg in worker_args:
        if arg.startswith("--step-rows="):
            rows = int(arg.split("=", 1)[1])
    return rows


def model_rates(models, batches, device, rows: int) -> dict:
    """{(model, batch): (users/s in one call, users/s in blocks of `rows` users (the workers'
    --step-rows) or None)} of the model alone, same weights as the workers' checkpoint. The
    faster of the two is the worker's ceiling ("x model")."""
    rows = rows if device == "cpu" else 0
    rates = {}
    for name, model in models.items():
        for batch in batches:
            whole = model_only_rate(model, batch, device)
            blocks = (model_only_rate(model, batch, device, step_rows=rows)
                      if model.steppable and 0 < rows < batch else None)
            rates[name, batch] = whole, blocks
            print(json.dumps({"label": f"{name} batch {batch} model only", "model": name,
                              "batch": batch, "device": device, "users/s": whole,
                              f"users/s in blocks of {rows}": blocks}), flush=True)
    return rates


def write_checkpoints(model_names, tmp: Path) -> tuple[dict, dict]:
    """One random-weight model per name (seed 0) and its checkpoint, which both trees load."""
    models, checkpoints = {}, {}
    for name in model_names:
        torch.manual_seed(0)
        models[name] = build_model(name, N_ITEMS).eval()
        checkpoints[name] = tmp / f"{name}.pt"
        save_checkpoint(checkpoints[name], models[name],
                        ["[PAD]"] + [f"item-{i}" for i in range(1, N_ITEMS)], {}, version="bench")
    return models, checkpoints


def worker_configs(args, models, checkpoints, baseline):
    """Each model x state dtype x batch, each followed by its baseline row when there is one,
    so old and new run close together in time."""
    for name in args.models:
        dtypes = args.state_dtypes if models[name].steppable else ["float32"]
        for dtype in dtypes:
            for batch in args.batches:
                label = f"{name} batch {batch} state {dtype}"
                yield Config(label, name, batch, dtype, checkpoints[name], REPO)
                if baseline:
                    yield Config(f"{label} (baseline {args.baseline_ref})", name, batch, dtype,
                                 checkpoints[name], baseline, args.baseline_ref)


def print_log_tail(log: Path, lines=15):
    if log.exists():
        print(f"--- last lines of {log}", file=sys.stderr)
        print("\n".join(log.read_text(errors="replace").splitlines()[-lines:]),
              file=sys.stderr, flush=True)


def fmt(value, spec):
    return "-" if value is None else format(value, spec)


def print_tables(results, rates, device, rows):
    print("\n| model alone (step + top-10, 1 torch thread) | batch | device | users/s, one call "
          f"| users/s, blocks of {rows} (the workers' --step-rows) |")
    print("|---|---|---|---|---|")
    for (name, batch), (whole, blocks) in rates.items():
        print(f"| {name} | {batch} | {device} | {whole:.0f} | {fmt(blocks, '.0f')} |")
    raw = next((r["events/s"] for r in results if r["model"] is None and "events/s" in r), None)
    print("\n| run | events/s | x raw | x model | batch mean | batch p50 | batch p99 "
          "| changelog B/click | offered/s | p50 ms | p99 ms | startup s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['label']} | failed: {r['error'].replace('|', '/')} |" + " |" * 10)
            continue
        model_rate = max((x for x in rates.get((r["model"], r["batch"]), ()) if x), default=None)
        print(f"| {r['label']} | {r['events/s']:.0f} "
              f"| {fmt(r['events/s'] / raw if raw else None, '.2f')} "
              f"| {fmt(r['events/s'] / model_rate if model_rate else None, '.2f')} "
              f"| {fmt(r.get('batch mean'), '.1f')} | {fmt(r.get('batch p50'), '.0f')} "
              f"| {fmt(r.get('batch p99'), '.0f')} | {fmt(r.get('changelog bytes/click'), '.0f')} "
              f"| {r['offered/s']:.0f} | {r['p50 ms']:.1f} | {r['p99 ms']:.1f} "
              f"| {r['startup s']:.1f} |")
    print("\nbatch p50 / p99: upper bound of the histogram bucket where the count crosses "
          "(bucket resolution); mean = sum / count. Figures compare only within this run.")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=20000, help="backlog clicks per run")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64, 256])
    parser.add_argument("--models", nargs="+", default=["mlsa4rec-s", "mlsa4rec"])
    parser.add_argument("--state-dtypes", nargs="+", default=["float32", "float16"])
    parser.add_argument("--users", choices=TRAFFIC, default="uniform",
                        help="who clicks: uniform over 6,040 users, Zipf, or the ML-1M log")
    parser.add_argument("--zipf-a", type=float, default=1.1, help="Zipf exponent (--users zipf)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="the workers' --device, and where the model alone runs")
    parser.add_argument("--rate", type=float, default=None,
                        help="fixed offered rate (clicks/s) for the latency phase of every row; "
                             "default: half of the row's own backlog events/s")
    parser.add_argument("--latency-seconds", type=float, default=10.0,
                        help="length of the latency phase at the offered rate")
    parser.add_argument("--worker-arg", action="append", default=[],
                        help="appended to every worker's command line (repeatable), e.g. "
                             "--worker-arg=--pipeline-depth=3")
    parser.add_argument("--baseline-ref", default=None,
                        help="also run the worker of this git ref (a temporary worktree)")
    parser.add_argument("--skip-raw", action="store_true")
    return parser.parse_args()


def main():
    args = parse_args()
    torch.set_num_threads(1)              # the model alone, like a worker's default --threads 1
    tmp = Path(tempfile.mkdtemp(prefix="mlsa4rec-bench-"))
    traffic = Traffic(args.users, args.zipf_a)
    models, checkpoints = write_checkpoints(args.models, tmp)
    step_rows = step_rows_of(args.worker_arg)
    rates = model_rates(models, args.batches, args.device, step_rows)
    results = []
    with kafka_bootstrap() as bootstrap, baseline_tree(args.baseline_ref, tmp) as baseline:
        print(f"broker {bootstrap}, users {traffic.describe()}, {args.events} backlog events, "
              f"{N_USERS} users, {N_ITEMS - 1} items, {PARTITIONS} partitions, device "
              f"{args.device}, worker args {args.worker_arg}, logs in {tmp}", flush=True)
        configs = list(worker_configs(args, models, checkpoints, baseline))
        if not args.skip_raw:
            configs.insert(0, Config("raw confluent-kafka loop (ceiling)"))
        for config in configs:
            try:
                results.append(measure(bootstrap, config, traffic, args, tmp))
            except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
                # One failed row (e.g. a baseline without an option) should not lose the rest.
                results.append({"label": config.label, "model": config.model,
                                "batch": config.batch, "error": " ".join(str(exc).split())})
            print(json.dumps(results[-1]), flush=True)
    print_tables(results, rates, args.device, step_rows)


if __name__ == "__main__":
    main()
