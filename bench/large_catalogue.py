"""The model's step + exact top 10 at 3,416 / 100,000 / 1,000,000 items: users/s and the
memory the ranking holds, full score matrix against block by block (model/ranking.py).

    .venv/bin/python bench/large_catalogue.py [--items 3416 100000 1000000] [--batch 256]
        [--block 65536] [--model mlsa4rec-s] [--seconds 5]

One torch thread, like a worker (`--threads 1`), random weights (speed does not depend on
training). "full" builds the (batch x items) scores as the worker does below
--exact-rank-items; it is skipped where that matrix would exceed `--max-full-gb`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from model.models import build_model  # noqa: E402
from streams.worker.scoring import Event, Scorer  # noqa: E402


def rate(scorer: Scorer, batch: int, n_items: int, seconds: float) -> float:
    """Users/s of scorer.process on batches of `batch` new users, one click each."""
    g = torch.Generator().manual_seed(0)
    done, started, round_ = 0, time.perf_counter(), 0
    while time.perf_counter() - started < seconds or done == 0:
        items = torch.randint(1, n_items, (batch,), generator=g).tolist()
        events = [Event(f"u{round_}-{u}", scorer.item_ids[i], f"e{round_}-{u}", 0, 0, -1)
                  for u, i in enumerate(items)]
        scorer.process(events, {})
        done += batch
        round_ += 1
    return done / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, nargs="+", default=[3416, 100_000, 1_000_000],
                        help="catalogue sizes (default 3416 100000 1000000)")
    parser.add_argument("--batch", type=int, default=256, help="users per batch (default 256)")
    parser.add_argument("--block", type=int, default=65_536,
                        help="items per block of the blocked ranking (default 65536)")
    parser.add_argument("--model", default="mlsa4rec-s", help="model (default mlsa4rec-s)")
    parser.add_argument("--seconds", type=float, default=5.0,
                        help="measuring time per row (default 5)")
    parser.add_argument("--max-full-gb", type=float, default=2.0,
                        help="skip the full matrix above this size (default 2)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| items | ranking | users/s | ranking memory MB |")
    print("|---|---|---|---|")
    for n_items in args.items:
        torch.manual_seed(0)
        model = build_model(args.model, n_items).eval()
        item_ids = ["[PAD]"] + [f"item-{i}" for i in range(1, n_items)]
        full_bytes = args.batch * n_items * 4
        for label, block in (("full matrix", n_items), ("blocked", args.block)):
            if label == "blocked" and n_items <= block:
                continue                    # one block: the same as the full matrix
            if label == "full matrix" and full_bytes > args.max_full_gb * 2 ** 30:
                print(f"| {n_items:,} | {label} | skipped ({full_bytes / 2 ** 30:.1f} GB) | - |")
                continue
            scorer = Scorer(model, item_ids, "bench", trace_step=True,
                            exact_rank_items=block if label == "blocked" else n_items)
            memory = args.batch * min(block, n_items) * 4 / 2 ** 20
            print(f"| {n_items:,} | {label} | {rate(scorer, args.batch, n_items, args.seconds):,.0f}"
                  f" | {memory:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
