"""What half-precision state storage costs: a trained checkpoint stepped over real sequences
with the state stored (and reloaded) after every event in fp32 vs fp16.

    .venv/bin/python bench/state_precision.py runs/ml-100k-mlsa4rec-s.pt [--users 200]
"""

from __future__ import annotations

import argparse

import torch

from model.checkpoint import checkpoint_data, load_checkpoint
from model.state import state_to_bytes, states_from_bytes


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("checkpoint")
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, payload = load_checkpoint(args.checkpoint)
    data = checkpoint_data(payload)
    users = [s[:args.steps] for s in data.sequences[:args.users]]
    template = model.init_state(1)
    worst, top10_same, top1_same, total = 0.0, 0, 0, 0
    with torch.no_grad():
        for seq in users:
            kept = {"float32": model.init_state(1), "float16": model.init_state(1)}
            for item in seq.tolist():
                scores = {}
                for dtype, state in kept.items():
                    state, user_repr = model.step(state, torch.tensor([item]))
                    scores[dtype] = model.scores(user_repr)[0]
                    blob = state_to_bytes(state, 0, getattr(torch, dtype))   # store, reload
                    kept[dtype] = states_from_bytes([blob], template)
                a, b = scores["float32"][1:], scores["float16"][1:]
                worst = max(worst, (a - b).abs().max().item())
                top_a, top_b = torch.topk(a, 10).indices, torch.topk(b, 10).indices
                top10_same += int(torch.equal(top_a, top_b))
                top1_same += int(top_a[0] == top_b[0])
                total += 1
    print(f"{args.checkpoint}: {len(users)} users, {total} events; state bytes per user "
          f"fp32 {len(state_to_bytes(template, 0))}, fp16 {len(state_to_bytes(template, 0, torch.float16))}")
    print(f"max |score fp32 - score fp16| = {worst:.2e}; identical top-10 list {top10_same / total:.4f}, "
          f"same top-1 {top1_same / total:.4f}")


if __name__ == "__main__":
    main()
