"""A million users on one worker (issue 17 §1): speed, memory, disk and restore time.

One run, on one local broker (infra/kafka/broker.sh) and one machine:

1. the 6,040-user run: a backlog of `--baseline-clicks` synthetic clicks over 6,040 users
   drained by one `python -m cli worker`; events/s from the first recommendation to the last;
2. the same for `--users` users (default 1,000,000) and `--clicks` clicks: the worker's RSS
   (/proc/PID/status VmRSS) every `--every` seconds against the users it has seen so far;
3. for each: RocksDB bytes on disk (du of the worker's data dir after it stopped) per user,
   and the changelog topic's bytes: its log segments on the broker's disk, and the sum of
   its records' keys and values read back, per user and per click;
4. the restore: the large run's worker stopped, a fresh worker with an EMPTY data dir on the
   same app id and topics, timed from its start until /health says ok (Faust restores the
   table from the changelog first), and until it answers one click sent just before it
   started (it reads no click before its table is restored); in seconds and s per GB of
   changelog. A fresh worker's time to /health with an empty changelog (steps 1 and 2) is
   the start-up part of it.

Traffic: every user clicks once in a shuffled pass, mixed at random with the rest of the
clicks, whose users are Zipf-distributed (p(rank) ~ 1 / rank^a: a few users click a lot);
items uniform over ML-1M's 3,416. Random-weight model with ML-1M's items (speed does not
depend on training), state stored in `--state-dtype`.

    .venv/bin/python bench/million_users.py [--users 1000000] [--clicks 1100000]
        [--baseline-clicks 100000] [--model mlsa4rec-s] [--state-dtype float16]
        [--state-cache-mb 512] [--every 5] [--worker-arg=--snapshot-every=16 ...]
        [--worker-ref HEAD]

A quick check first: --users 20000 --clicks 40000 --baseline-clicks 20000.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import numpy as np
from confluent_kafka import Consumer, TopicPartition

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.soak import rss_mb, scrape  # noqa: E402
from bench.stream_throughput import (  # noqa: E402
    N_ITEMS, PARTITIONS, baseline_tree, changelog_bytes, clicks, drain, print_log_tail, produce,
    run_worker, stop, write_checkpoints)
from bench.workers_on_one_machine import healthy  # noqa: E402
from streams.shared.local_broker import free_ports, local_kafka  # noqa: E402
from streams.shared.topics import ensure_topics  # noqa: E402

CHUNK = 100_000              # clicks per producer call (their dicts are built per chunk)


def synthetic_clicks(users: int, n: int, zipf_a: float, seed: int = 0):
    """(user index, item index) arrays of n clicks: each of `users` users once (a shuffled
    pass), the other n - users clicks Zipf over users, all in random order; and, per click,
    how many distinct users the clicks up to it hold."""
    if n < users:
        raise ValueError(f"{n} clicks cannot reach {users} users: every user clicks at least once")
    rng = np.random.default_rng([seed, users, n])
    weights = 1.0 / np.arange(1, users + 1) ** zipf_a
    extra = rng.choice(users, n - users, p=weights / weights.sum())
    who = rng.permutation(np.concatenate([np.arange(users), extra]))
    items = rng.integers(1, N_ITEMS, n)
    first = np.zeros(n, dtype=bool)
    first[np.unique(who, return_index=True)[1]] = True
    return who, items, np.cumsum(first)


def produce_backlog(bootstrap, topic, who, items) -> float:
    """All clicks into `topic`, CHUNK at a time; returns the seconds it took."""
    started = time.perf_counter()
    for start in range(0, len(who), CHUNK):
        part = slice(start, start + CHUNK)
        produce(bootstrap, topic, clicks([f"user-{u}" for u in who[part]],
                                         [f"item-{i}" for i in items[part]], f"c{start}"))
    return time.perf_counter() - started


class Sampler(threading.Thread):
    """The worker's RSS, clicks handled and state-cache users every `every` seconds (every
    0.5 s until /health first says ok, to time the start-up); prints a row per sample."""

    def __init__(self, pid, port, seen, every, started):
        super().__init__(daemon=True)
        self.pid, self.port, self.seen, self.every, self.started = pid, port, seen, every, started
        self.rows, self.healthy_after, self.done = [], None, threading.Event()

    def run(self):
        last = 0.0
        while not self.done.is_set():
            now = time.time() - self.started
            if self.healthy_after is None and healthy(self.port):
                self.healthy_after = now
            if now - last >= self.every:
                last = now
                self.sample(now)
            self.done.wait(0.5 if self.healthy_after is None else 0.25)

    def sample(self, now):
        try:
            metrics, rss = scrape(self.port), rss_mb(self.pid)
        except OSError:                # not up yet, or gone
            return
        handled = int(metrics.get("mlsa4rec_events_total", 0))
        seen = int(self.seen[min(handled, len(self.seen)) - 1]) if handled else 0
        self.rows.append((now, handled, seen, int(metrics.get("mlsa4rec_state_cache_users", 0)),
                          rss))
        print("| {:.0f} | {:,} | {:,} | {:,} | {:.0f} |".format(*self.rows[-1]), flush=True)


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def changelog_on_disk(kafka_logs: Path, app_id: str) -> tuple[int, int]:
    """Bytes of the changelog topic on the broker: its log segments (the records as stored,
    batch headers included), and its partition folders in all (Kafka preallocates each
    segment's two indexes at 10 MB until the segment rolls)."""
    folders = list(kafka_logs.glob(f"{app_id}-user-state-changelog-*"))
    segments = sum(f.stat().st_size for folder in folders for f in folder.glob("*.log"))
    return segments, sum(du(folder) for folder in folders)


def worker_extra(args) -> list[str]:
    return ["--state-cache-mb", str(args.state_cache_mb), *args.worker_arg]


def drain_run(bootstrap, checkpoint, label, users, n, args, tmp, kafka_logs) -> dict:
    """Produce the backlog, start a worker, drain it while sampling; then its disk figures."""
    name = uuid.uuid4().hex[:8]
    ensure_topics(bootstrap, {f"{kind}-{name}": PARTITIONS for kind in ("in", "out", "dlq")})
    who, items, seen = synthetic_clicks(users, n, args.zipf_a)
    produce_s = produce_backlog(bootstrap, f"in-{name}", who, items)
    print(f"\n{label}: {users:,} users, {n:,} clicks produced in {produce_s:.0f} s "
          f"(app bench-{name}); the worker:\n\n| elapsed s | clicks handled | users seen "
          "| users in state cache | RSS MB |\n|---|---|---|---|---|", flush=True)
    (port,) = free_ports(1)
    data_dir = tmp / f"data-{name}"
    started = time.time()
    proc = run_worker(bootstrap, checkpoint, name, args.batch_max, args.state_dtype, data_dir,
                      args.tree, metrics_port=port, extra=worker_extra(args))
    sampler = Sampler(proc.pid, port, seen, args.every, started)
    sampler.start()
    try:
        received, _ = drain(bootstrap, f"out-{name}", n, timeout=args.timeout,
                            alive=lambda: proc.poll() is None)
        if len(received) < n:
            raise RuntimeError(f"only {len(received)} of {n} recommendations in time")
        received.sort()
        rate = (len(received) - 1) / (received[-1] - received[0])
        time.sleep(args.settle_s)            # the last flush written to the table
        sampler.sample(time.time() - started)
        final = scrape(port)
    except Exception:
        print_log_tail(tmp / f"{name}.log")
        raise
    finally:
        sampler.done.set()
        sampler.join(10)
        stop(proc)
    rss = [row[4] for row in sampler.rows]
    app_id = f"bench-{name}"
    log_bytes, records = changelog_bytes(bootstrap, app_id)
    segments, folders = changelog_on_disk(kafka_logs, app_id)
    return {"label": label, "name": name, "users": users, "clicks": n, "events/s": rate,
            "healthy after s": sampler.healthy_after, "produce s": produce_s,
            "rss max MB": max(rss), "rss end MB": rss[-1],
            "rss at 10% of users MB": next((r[4] for r in sampler.rows if r[2] >= users / 10),
                                           None),
            "rocksdb bytes": du(data_dir), "changelog on disk bytes": segments,
            "changelog folders bytes": folders,
            "changelog record bytes": log_bytes, "changelog records": records,
            "snapshots": final.get("mlsa4rec_state_snapshots_total"),
            "cache misses": final.get("mlsa4rec_state_cache_misses_total"),
            "data_dir": data_dir}


def health_status(port: int) -> str:
    """/health's "status" ("ok", "starting", "stalled: ..."), or "no answer"."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as answer:
            return json.loads(answer.read())["status"]
    except urllib.error.HTTPError as error:          # 503: not ok, and why
        return json.loads(error.read())["status"]
    except OSError:
        return "no answer"


def restore(bootstrap, checkpoint, run: dict, args, tmp) -> dict:
    """A fresh worker, empty data dir, same app id and topics, and one click of the busiest
    user sent just before it starts: seconds until that click's recommendation comes (the
    worker reads no click before its table is restored) and until /health says ok."""
    folder = tmp / "restore"
    folder.mkdir()
    data_dir = folder / "data"
    (port,) = free_ports(1)
    out = f"out-{run['name']}"
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": uuid.uuid4().hex})
    consumer.assign([TopicPartition(out, p, consumer.get_watermark_offsets(
        TopicPartition(out, p), timeout=10)[1]) for p in range(PARTITIONS)])
    produce(bootstrap, f"in-{run['name']}", clicks(["user-0"], ["item-1"], "probe"))
    started = time.monotonic()
    proc = run_worker(bootstrap, checkpoint, run["name"], args.batch_max, args.state_dtype,
                      data_dir, args.tree, metrics_port=port, extra=worker_extra(args))
    answered = ok = None
    try:
        while answered is None or ok is None:
            now = time.monotonic() - started
            status = health_status(port)
            if ok is None and status == "ok":
                ok = now
            if answered is None and any(not m.error() for m in consumer.consume(100, 0.25)):
                answered = time.monotonic() - started
            if answered is not None and now - answered > 30:
                break                    # answering, but /health still not ok: say why
            if proc.poll() is not None or now > args.timeout:
                print_log_tail(folder / f"{run['name']}.log")
                raise RuntimeError(f"the restoring worker did not answer; log in {folder}")
        rss = rss_mb(proc.pid)
    finally:
        consumer.close()
        stop(proc)
    return {"first click answered s": answered, "health ok s": ok, "health status": status,
            "rss at ready MB": rss, "restored rocksdb bytes": du(data_dir)}


def print_summary(rows, restored, args) -> None:
    base = rows[0]["events/s"]
    print(f"\nmodel {args.model}, state {args.state_dtype}, --state-cache-mb "
          f"{args.state_cache_mb}, batch max {args.batch_max}, {PARTITIONS} partitions, "
          f"worker args {args.worker_arg}, Zipf a={args.zipf_a}\n")
    print("| run | users | clicks | events/s | x 6,040-user run | to /health s | RSS MB at 10% "
          "of users / max / end | RocksDB MB | RocksDB B/user | changelog MB (segments) | "
          "changelog records | changelog B/user | changelog B/click | snapshots |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        log = r["changelog on disk bytes"]
        at10 = r["rss at 10% of users MB"]
        print(f"| {r['label']} | {r['users']:,} | {r['clicks']:,} | {r['events/s']:,.0f} | "
              f"{r['events/s'] / base:.2f} | {r['healthy after s']:.1f} | "
              f"{'-' if at10 is None else f'{at10:.0f}'} / {r['rss max MB']:.0f} / "
              f"{r['rss end MB']:.0f} | {r['rocksdb bytes'] / 1e6:,.1f} | "
              f"{r['rocksdb bytes'] / r['users']:,.0f} | {log / 1e6:,.1f} | "
              f"{r['changelog records']:,} | {log / r['users']:,.0f} | {log / r['clicks']:,.0f} | "
              f"{r['snapshots'] or 0:,.0f} |")
    big = rows[-1]
    gb = big["changelog on disk bytes"] / 1e9
    print(f"\nchangelog records' keys + values read back: {big['changelog record bytes'] / 1e6:,.1f}"
          f" MB ({big['changelog record bytes'] / big['users']:,.0f} B/user) for the "
          f"{big['users']:,}-user run; its partition folders on the broker in all (with "
          f"preallocated indexes) {big['changelog folders bytes'] / 1e6:,.1f} MB")
    if restored is None:
        return
    seconds, ok = restored["first click answered s"], restored["health ok s"]
    health = f"{ok:.1f} s" if ok is not None else f"not ok 30 s later: {restored['health status']!r}"
    print(f"restore of the {big['users']:,}-user table from the changelog alone (fresh worker, "
          f"empty data dir): its first click answered after {seconds:.1f} s, /health ok after "
          f"{health} (a fresh worker with an empty changelog: /health ok after "
          f"{big['healthy after s']:.1f} s); {gb:.3f} GB of changelog: {seconds / gb:,.0f} s/GB, "
          f"{(seconds - big['healthy after s']) / gb:,.0f} s/GB beyond start-up; "
          f"RSS at ready {restored['rss at ready MB']:.0f} MB, restored RocksDB "
          f"{restored['restored rocksdb bytes'] / 1e6:,.1f} MB (the run's own: "
          f"{big['rocksdb bytes'] / 1e6:,.1f} MB)")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=1_000_000, help="users of the large run")
    parser.add_argument("--clicks", type=int, default=1_100_000, help="clicks of the large run")
    parser.add_argument("--baseline-users", type=int, default=6040)
    parser.add_argument("--baseline-clicks", type=int, default=100_000)
    parser.add_argument("--zipf-a", type=float, default=1.1,
                        help="Zipf exponent of the clicks after each user's first")
    parser.add_argument("--model", default="mlsa4rec-s")
    parser.add_argument("--state-dtype", default="float16")
    parser.add_argument("--state-cache-mb", type=int, default=512)
    parser.add_argument("--batch-max", type=int, default=256)
    parser.add_argument("--every", type=float, default=5.0, help="seconds between RSS samples")
    parser.add_argument("--settle-s", type=float, default=5.0,
                        help="wait after the last recommendation (the last flush)")
    parser.add_argument("--timeout", type=float, default=1800.0,
                        help="most seconds a drain or a restore may take")
    parser.add_argument("--worker-arg", action="append", default=[],
                        help="appended to the workers' command lines (repeatable)")
    parser.add_argument("--worker-ref", default=None,
                        help="run the workers of this git ref (a temporary worktree; e.g. HEAD, "
                             "while others edit the tree); default: this tree")
    parser.add_argument("--skip-restore", action="store_true", help="no restore at the end")
    parser.add_argument("--keep", action="store_true", help="keep the data dirs and broker data")
    return parser.parse_args()


def main():
    args = parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="mlsa4rec-million-"))
    _, checkpoints = write_checkpoints([args.model], tmp)
    checkpoint = checkpoints[args.model]
    kafka_data = tmp / "kafka"
    rows = []
    try:
        with local_kafka(kafka_data) as bootstrap, baseline_tree(args.worker_ref, tmp) as tree:
            args.tree = tree or REPO
            for label, users, n in (("6,040 users", args.baseline_users, args.baseline_clicks),
                                    (f"{args.users:,} users", args.users, args.clicks)):
                rows.append(drain_run(bootstrap, checkpoint, label, users, n, args, tmp,
                                      kafka_data / "logs"))
                print(json.dumps({k: v for k, v in rows[-1].items() if k != "data_dir"}),
                      flush=True)
            restored = None if args.skip_restore else restore(bootstrap, checkpoint, rows[-1],
                                                              args, tmp)
            print(json.dumps(restored), flush=True)
        print_summary(rows, restored, args)
    finally:
        if not args.keep:                     # GBs of RocksDB and broker logs; the logs stay
            for path in [kafka_data, tmp / "restore" / "data", *(r["data_dir"] for r in rows)]:
                shutil.rmtree(path, ignore_errors=True)
        print(f"worker logs in {tmp}", flush=True)


if __name__ == "__main__":
    main()
