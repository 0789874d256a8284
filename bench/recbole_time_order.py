"""Does RecBole's time order change our figures? RecBole stores timestamps as float32, so
events less than ~64 s apart (ML-1M's timestamps are ~1e9 s) tie and keep their file order;
we sort on the exact timestamps. This evaluates checkpoints on both splits.

    .venv/bin/python bench/recbole_time_order.py CHECKPOINT [CHECKPOINT ...]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from model.checkpoint import load_checkpoint
from model.data.protocol import load_interactions, prepare, rated_at_least, split_leave_one_out
from model.data.sources import Interactions
from model.training import evaluate


def both_splits(run: dict):
    """(exact, float32) SequenceData under the run's own filters."""
    inter = load_interactions(run["dataset"])
    if run.get("min_rating"):
        inter = rated_at_least(inter, run["min_rating"])
    as_float32 = np.asarray(inter.timestamps, dtype=np.float32).astype(np.float64)
    rounded = Interactions(inter.users, inter.items, as_float32, inter.ratings)
    k = run.get("k_core", 5)
    return prepare(inter, k, k), prepare(rounded, k, k)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("checkpoints", nargs="+")
    args = parser.parse_args()
    torch.set_num_threads(2)
    for path in args.checkpoints:
        model, payload = load_checkpoint(path)
        run = payload["metrics"]["train_config"]
        exact, rounded = both_splits(run)
        moved = sum(a[-1] != b[-1] for a, b in zip(exact.sequences, rounded.sequences))
        print(f"{path}: the test target moves for {moved} of {exact.n_users} users")
        for name, data in (("exact timestamps", exact), ("float32 (RecBole)", rounded)):
            _, valid, test = split_leave_one_out(data)
            v = evaluate(model, valid, run["max_len"], "cpu")
            t = evaluate(model, test, run["max_len"], "cpu")
            print(f"  {name:18} valid hr@10 {v['hr@10']:.4f} ndcg@10 {v['ndcg@10']:.4f}   "
                  f"test hr@10 {t['hr@10']:.4f} ndcg@10 {t['ndcg@10']:.4f}")


if __name__ == "__main__":
    main()
