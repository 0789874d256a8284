"""The model thread's batch with the step in blocks of users (--step-rows) against the whole
batch in one call, interleaved in one process, without Kafka.

Each arm is a worker's scoring agent (the traced step, the state cache, flushes into a dict
table) fed the same clicks in the same batches; only `ScoringAgent.score` is timed, the
model thread's whole part of a batch. Rounds alternate the arms so that a change in the
machine's load falls on both.

    .venv/bin/python bench/step_rows.py [--model mamba4rec] [--rows 0 64] [--batch 256]
        [--users uniform|zipf|ml-1m] [--rounds 6] [--batches-per-round 20]

Random weights with ML-1M's 3,416 items, 6,040 users; one torch thread. Ratios compare
within one run only.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.throughput_parts import N_ITEMS, TRAFFIC, Traffic  # noqa: E402
from model.models import build_model  # noqa: E402
from schemas.codec import encode_interaction  # noqa: E402
from streams.shared.config import StreamConfig  # noqa: E402
from streams.worker.agents import ScoringAgent  # noqa: E402
from streams.worker.queries import partition_of  # noqa: E402
from streams.worker.scoring import Scorer  # noqa: E402

PARTITIONS = 4


class DictTable:
    """The agent's table interface over one dict per partition."""

    def __init__(self):
        self.data = {p: {} for p in range(PARTITIONS)}

    def read_many(self, partition, keys):
        return [self.data[partition].get(k) for k in keys]


def message_events(traffic: Traffic, start: int, n: int, offsets: list[int]) -> list:
    """Clicks as Faust hands them to the agent (value bytes, message key / partition / offset)."""
    users, items = traffic.pairs(start, n)
    out = []
    for i, (user, item) in enumerate(zip(users, items)):
        value = encode_interaction({"event_id": f"e{start + i}", "user_id": user,
                                    "item_id": item, "event_type": "CLICK",
                                    "timestamp": start + i, "properties": None})
        partition = partition_of(user, PARTITIONS)
        out.append(SimpleNamespace(value=value, message=SimpleNamespace(
            key=user.encode(), partition=partition, offset=offsets[partition])))
        offsets[partition] += 1
    return out


class Arm:
    """One scoring agent, its table, its partitions' offsets and its timings."""

    def __init__(self, model, item_ids, rows: int, batch: int):
        scorer = Scorer(model, item_ids, "bench", trace_step=True, step_rows=rows)
        self.table = DictTable()
        cfg = StreamConfig(batch_max=batch, partitions=PARTITIONS, flush_every_s=3600)
        self.agent = ScoringAgent(cfg, scorer, None, None, self.table)
        self.rows, self.number, self.seconds, self.events = rows, 0, 0.0, 0
        self.offsets = [0] * PARTITIONS

    def score(self, batch: list, flush: bool) -> None:
        started = time.perf_counter()
        scored = self.agent.score(batch, self.number, flush=flush)
        self.seconds += time.perf_counter() - started
        self.events += len(batch)
        self.number += 1
        if scored.flush is not None:            # written at once: the table is not timed
            for partition, key, value in scored.flush.writes:
                self.table.data[partition][key] = value     # None (a delete) reads as absent
            self.agent.cache.flush_written(scored.flush.number)

    def take_rate(self) -> float:
        rate = self.events / self.seconds
        self.seconds, self.events = 0.0, 0
        return rate


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mamba4rec")
    parser.add_argument("--rows", type=int, nargs="+", default=[0, 64],
                        help="--step-rows of each arm, the first the baseline (0: the whole "
                             "batch in one call)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--users", choices=TRAFFIC, default="uniform")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--batches-per-round", type=int, default=20)
    parser.add_argument("--flush-every", type=int, default=2,
                        help="a flush every this many batches (512 users changed, the worker's "
                             "--flush-max-users, at batch 256)")
    args = parser.parse_args()
    if len(set(args.rows)) != len(args.rows):
        parser.error(f"--rows {args.rows}: each arm needs its own value")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_model(args.model, N_ITEMS).eval()
    item_ids = ["[PAD]"] + [f"item-{i}" for i in range(1, N_ITEMS)]
    arms = [Arm(model, item_ids, rows, args.batch) for rows in args.rows]
    traffic = Traffic(args.users)
    start, number = 0, 0

    def batch_for(arm):
        return message_events(traffic, start, args.batch, arm.offsets)

    # Warm-up: every arm's cache holds most users before the timed rounds.
    for _ in range(6040 // args.batch + 1):
        for arm in arms:
            arm.score(batch_for(arm), flush=number % args.flush_every == 0)
        start, number = start + args.batch, number + 1
    for arm in arms:
        arm.take_rate()
    rates = {arm.rows: [] for arm in arms}
    for round_ in range(args.rounds):
        first = start
        for arm in (arms if round_ % 2 == 0 else arms[::-1]):
            start, number = first, 0
            for _ in range(args.batches_per_round):
                arm.score(batch_for(arm), flush=(number + 1) % args.flush_every == 0)
                start, number = start + args.batch, number + 1
            rates[arm.rows].append(arm.take_rate())
        print(" | ".join(f"step-rows {rows}: {r[-1]:,.0f} clicks/s" for rows, r in rates.items()),
              flush=True)
    base = rates[args.rows[0]]
    print(f"\n| {args.model}, batch {args.batch}, {traffic.describe()} | clicks/s, median of "
          f"{args.rounds} rounds | x step-rows {args.rows[0]}, median (range) |")
    print("|---|---|---|")
    for rows, r in rates.items():
        ratios = sorted(x / b for x, b in zip(r, base))
        print(f"| step-rows {rows} | {sorted(r)[len(r) // 2]:,.0f} | "
              f"{ratios[len(ratios) // 2]:.2f} ({ratios[0]:.2f}-{ratios[-1]:.2f}) |")


if __name__ == "__main__":
    main()
