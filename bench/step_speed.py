"""Stepping speed: users advanced per second by `step` (and step + scoring all items) at
batch 1, 64 and 1024, for the steppable models, on this machine.

    .venv/bin/python bench/step_speed.py [--items 3417]
"""

from __future__ import annotations

import argparse
import time

import torch

from model.models import MODELS, build_model
from model.state import state_size


def users_per_second(model, batch: int, n_items: int, score: bool, seconds: float = 2.0) -> float:
    state = model.init_state(batch)
    items = torch.randint(1, n_items, (batch,))
    with torch.no_grad():
        model.step(state, items)                          # warm-up
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            state, user_repr = model.step(state, items)
            if score:
                torch.topk(model.scores(user_repr), 10, dim=1)
            done += batch
    return done / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--items", type=int, default=3417, help="ML-1M: 3,416 items + pad")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64, 1024])
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.items} items")
    for name, (model_cls, _) in MODELS.items():
        if not model_cls.steppable:
            continue
        model = build_model(name, args.items).eval()
        print(f"\n{name}: state {state_size(model.init_state(1))} floats per user")
        for batch in args.batches:
            step_only = users_per_second(model, batch, args.items, score=False)
            with_top10 = users_per_second(model, batch, args.items, score=True)
            print(f"  batch {batch:>5}: step {step_only:10.0f} users/s   "
                  f"step + top-10 over all items {with_top10:10.0f} users/s")


if __name__ == "__main__":
    main()
