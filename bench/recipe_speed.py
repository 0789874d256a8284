"""Training targets/s of Mamba4Rec on ML-1M under the paper recipe's batches (windows of 200,
at most 2,048 targets a step), windows side by side against windows ending 50 apart, one
thread: what `--window-stride 50` costs, and an epoch's expected minutes.

    .venv/bin/python bench/recipe_speed.py [--steps 12] [--model mamba4rec]
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.data.protocol import prepare_for_run, split_leave_one_out  # noqa: E402
from model.models import build_model  # noqa: E402
from model.training import TrainConfig, causal_windows, target_batches  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12, help="optimiser steps timed per case")
    parser.add_argument("--model", default="mamba4rec")
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = prepare_for_run(asdict(TrainConfig(dataset="ml-1m")))
    train_seqs, _, _ = split_leave_one_out(data)
    torch.manual_seed(0)
    model = build_model(args.model, data.n_items, {"max_len": 200})
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for stride in (0, 50):
        inputs, targets = map(torch.from_numpy, causal_windows(train_seqs, 200, stride))
        counts = (targets > 0).sum(1).numpy()
        batches = target_batches(np.random.default_rng(0).permutation(len(inputs)), counts, 2048)
        total = int(counts.sum())
        started, timed = time.time(), 0
        for idx in batches[:args.steps]:
            idx = torch.from_numpy(idx)
            loss = model.loss(inputs[idx], (inputs[idx] > 0).sum(1), targets[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            timed += int(counts[idx.numpy()].sum())
        rate = timed / (time.time() - started)
        print(f"stride {stride}: {len(inputs)} windows, {len(batches)} steps an epoch, "
              f"{total / len(batches):.0f} targets a step; {rate:.0f} targets/s, "
              f"epoch ~{total / rate / 60:.1f} min of training")
    return 0


if __name__ == "__main__":
    sys.exit(main())
