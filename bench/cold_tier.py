"""The cold tier's accuracy cost and the bytes it saves (streams/worker/cold_tier.py).

Accuracy, offline and exact: the model steps over each user's clicks of the ML-1M replay in
time order (model/prequential.py's next_item_ranks; the stream is proven equal to it), judged
prequentially (the top 10 after click t against click t+1). With the tier on, a user whose
click comes more than T after its previous one (event time) is cold at that click: its state
restarts from a prefill of its last 50 items, then steps on; the stream rebuilds exactly that
(Scorer.load). Offline every such gap restarts; the stream's sweep reaches an idle user some
time after it went idle, so its cost is at most this.

Bytes: users cold at the end of the log (idle longer than T at its last event) times the
bytes a snapshot takes; the judgments whose hit the tier changed, both ways, with the
sign test's z of the difference (|z| < 2: not told apart from chance); and RocksDB bytes per user measured on a real worker table (Faust's
store, this project's write path) before and after a sweep made every user cold.

    .venv/bin/python bench/cold_tier.py --checkpoint /tmp/ann/ml-1m-mlsa4rec-s.pt
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.checkpoint import load_checkpoint  # noqa: E402
from model.prequential import metrics_at, next_item_ranks  # noqa: E402
from streams.replay.log_replay import log_events  # noqa: E402

DAY = 86_400.0


def restarts(timestamps: np.ndarray, idle_s: float) -> np.ndarray:
    """Indices of the clicks a user makes cold (more than idle_s after its previous one)."""
    return np.flatnonzero(np.diff(timestamps) > idle_s) + 1


def ranks_with_cold_tier(model, sequences, stamps, idle_s: float, history_len: int,
                         plain: list[np.ndarray]) -> np.ndarray:
    """Every judgment's rank with the tier on. A stretch of clicks from a cold restart at t up
    to the next restart is the model's forward over items[t - history_len:] (prefill of the
    last items, then steps); ranks before the first restart are the tier-off ranks."""
    out = [r.copy() for r in plain]
    pieces, where = [], []
    for u, (items, ts) in enumerate(zip(sequences, stamps)):
        cuts = list(restarts(ts, idle_s)) + [len(items)]    # the stretch before: as plain
        for start, end in zip(cuts[:-1], cuts[1:]):
            first = max(0, start - history_len)
            # judged: items start+1 .. end (the one at `end` by the state after end-1)
            pieces.append(items[first:min(end + 1, len(items))])
            where.append((u, first, start))
    for (u, first, start), ranks in zip(where, next_item_ranks(model, pieces)):
        # ranks[j] judges items[first + j + 1]; keep those after the restart click
        keep = ranks[start - first:]
        out[u][start:start + len(keep)] = keep
    return np.concatenate(out)


def top10(ranks: np.ndarray) -> dict:
    ranks = ranks.copy()
    ranks[ranks > 10] = 0                      # the stream answers with a top 10
    return metrics_at(ranks, (10,))


def top10_hits(ranks: np.ndarray) -> np.ndarray:
    return (ranks >= 1) & (ranks <= 10)


def snapshot_bytes(model) -> int:
    from streams.worker.scoring import Scorer
    scorer = Scorer(model, ["[PAD]"] + [f"i{i}" for i in range(1, 4)], "v")
    return sum(v[0].numel() for v in scorer.template.values()) * 4


def accuracy(args) -> None:
    model, payload = load_checkpoint(args.checkpoint)
    torch.set_num_threads(args.threads)
    index = {raw: i for i, raw in enumerate(payload["item_ids"])}
    events = log_events(args.dataset)
    users: dict[str, list[int]] = {}
    times: dict[str, list[float]] = {}
    for user, item, ts in zip(events.users, events.items, events.timestamps):
        users.setdefault(str(user), []).append(index.get(str(item), -1))
        times.setdefault(str(user), []).append(float(ts))
    names = sorted(users)
    if args.users:                      # evenly spaced: a sample across the whole id range
        names = [names[i] for i in np.linspace(0, len(names) - 1, args.users).astype(int)]
    sequences = [np.array(users[u]) for u in names]
    stamps = [np.array(times[u]) for u in names]
    end = float(events.timestamps[-1])
    state = snapshot_bytes(model)
    started = time.perf_counter()
    plain = next_item_ranks(model, sequences)
    base = top10(np.concatenate(plain))
    print(f"{args.dataset} replay order: {len(names)} users, {sum(len(s) for s in sequences)} "
          f"clicks, {sum(len(r) for r in plain)} judged; state {state} bytes (fp32); "
          f"checkpoint {args.checkpoint} (version {payload.get('version')})")
    print(f"{'idle T':>10} {'HR@10':>8} {'NDCG@10':>8} {'dHR@10':>9} {'dNDCG@10':>9} "
          f"{'restarts':>9} {'cold at end':>12} {'GB saved':>9} {'hits +/-':>13} {'z':>6}")
    print(f"{'off':>10} {base['hr@10']:8.4f} {base['ndcg@10']:8.4f} {'':>9} {'':>9} "
          f"{0:9d} {0:12d} {0:9.3f}")
    hit_off = top10_hits(np.concatenate(plain))
    for days in args.days:
        idle = days * DAY
        ranks_on = ranks_with_cold_tier(model, sequences, stamps, idle, args.history_len, plain)
        on, hit_on = top10(ranks_on), top10_hits(ranks_on)
        # Judgments whose top-10 hit the tier changed, both ways: a sign test of the HR@10 change
        gained, lost = int((hit_on & ~hit_off).sum()), int((hit_off & ~hit_on).sum())
        z = (gained - lost) / max(1.0, np.sqrt(gained + lost))
        n_restarts = sum(len(restarts(ts, idle)) for ts in stamps)
        cold_end = sum(end - ts[-1] > idle for ts in stamps)
        print(f"{days:8g} d {on['hr@10']:8.4f} {on['ndcg@10']:8.4f} "
              f"{on['hr@10'] - base['hr@10']:+9.4f} {on['ndcg@10'] - base['ndcg@10']:+9.4f} "
              f"{n_restarts:9d} {cold_end:12d} {cold_end * state / 1e9:9.3f} "
              f"{f'+{gained}/-{lost}':>13} {z:+6.1f}", flush=True)
    print(f"({time.perf_counter() - started:.0f} s)", flush=True)


class _AckAll:
    """A changelog producer that acknowledges everything (the bench measures RocksDB only)."""

    async def send_to_partitions(self, topic, writes):
        offsets = {}
        for n, (partition, _, _) in enumerate(writes):
            offsets[partition] = n
        return offsets


def table_bytes(args) -> None:
    """RocksDB bytes per user on a real worker table: N users with a record and a snapshot
    as the worker's flushes write them, then after a sweep made them all cold (compacted)."""
    import faust

    from streams.worker.cold_tier import ColdSweep
    from streams.worker.scoring import Event, UserRecord, snapshot_key, snapshot_to_bytes
    from streams.worker.state_cache import StateCache
    from streams.worker.tables import StateTable, user_state_table

    model, payload = load_checkpoint(args.checkpoint)
    titles = payload["item_ids"][1:]
    rng = np.random.default_rng(0)
    state = rng.standard_normal(snapshot_bytes(model) // 4).astype(np.float32).tobytes()
    with tempfile.TemporaryDirectory() as tmp:
        app = faust.App("cold-tier-bench", store="rocksdb://", datadir=tmp)
        table = StateTable(user_state_table(app, partitions=1), _AckAll())
        table.table.changelog_topic.get_topic_name = lambda: "changelog"
        db = table.store._db_for_partition(0)
        writes = []
        for u in range(args.table_users):
            history = [titles[i] for i in rng.integers(0, len(titles), 50)]
            record = UserRecord(model_version=payload.get("version", ""), last_offset=u * 100,
                                last_event_id=f"{u}-{99}", offsets_of="Gk3_zQpWTm2lYh1aMxPu1A",
                                history=history, events_applied=100, snapshot_at=96,
                                last_version=payload.get("version", ""),
                                last_event_time=1_000_000 + u)
            key = f"{6040 + u}".encode()
            writes.append((0, key, record.to_bytes()))
            writes.append((0, snapshot_key(key), snapshot_to_bytes(96, record.model_version,
                                                                    state)))
        asyncio.run(table.write(writes))

        def on_disk() -> int:
            db.flush()
            db.compact_range(None, None)
            return sum(f.stat().st_size for f in Path(table.store.partition_path(0)).glob("*.sst"))

        hot = on_disk()
        sweep = ColdSweep(1.0, 50, keys_per_flush=512)
        sweep.saw([Event("x", "y", "z", 10 ** 12, 0)])
        cache = StateCache(None, torch.float32, 2)
        started, n_writes, passes = time.perf_counter(), 0, 0
        scan_seconds = 0.0
        while True:
            scan_started = time.perf_counter()
            sweep.scan(table)
            scan_seconds += time.perf_counter() - scan_started
            out = sweep.sweep(table, cache)
            asyncio.run(table.write(out))
            n_writes += len(out)
            passes += 1
            if 0 not in sweep.cursor:
                break
        seconds = time.perf_counter() - started
        cold = on_disk()
        n = args.table_users
        print(f"RocksDB (one partition, compacted): {n} users with a record and a snapshot "
              f"{hot / n:,.0f} bytes/user; after the sweep made them cold {cold / n:,.0f} "
              f"bytes/user (target <= 4,096); the sweep: {sweep.made_cold} users made cold in "
              f"{passes} scans of {sweep.keys_per_flush} keys: {scan_seconds / passes * 1000:.1f} ms "
              f"per scan (its thread), {(seconds - scan_seconds) / passes * 1000:.1f} ms per "
              f"flush for the checks and the writes")
        db.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default="/tmp/ann/ml-1m-mlsa4rec-s.pt")
    parser.add_argument("--dataset", default="ml-1m")
    parser.add_argument("--days", type=float, nargs="+", default=[1, 7, 30])
    parser.add_argument("--history-len", type=int, default=50)
    parser.add_argument("--users", type=int, default=0, help="N users evenly spaced by id (0 = all)")
    parser.add_argument("--table-users", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-accuracy", action="store_true")
    args = parser.parse_args()
    if not args.skip_accuracy:
        accuracy(args)
    if args.table_users:
        table_bytes(args)


if __name__ == "__main__":
    main()
