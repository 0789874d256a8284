"""Training speed on this machine: sequences/s (forward + backward) for each model, the CPU
selective scan against the plain per-timestep loop, and MLSA4Rec-S's LSA pooling in blocks
against the same online softmax run position by position.

    .venv/bin/python bench/train_speed.py [--batch 256] [--length 50] [--items 3417]
"""

from __future__ import annotations

import argparse
import time

import torch

import model.layers.mamba as mamba_module
from model.layers.lsa import online_softmax_update, prefix_softmax_pool
from model.layers.mamba import Mamba
from model.models import MODELS, build_model
from model.ops.selective_scan import selective_scan_cpu, selective_scan_loop


def timed(fn, repeats: int) -> float:
    fn()                                   # warm-up (allocator, first-call costs)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def model_step(name: str, batch: int, length: int, n_items: int):
    model = build_model(name, n_items, {"max_len": length}).train()
    seqs = torch.randint(1, n_items, (batch, length))
    lengths = torch.full((batch,), length)
    targets = torch.roll(seqs, -1, dims=1) if model.causal else seqs[:, -1]

    def run():
        model.zero_grad(set_to_none=True)
        model.loss(seqs, lengths, targets).backward()
    return run


def scan_step(scan, batch: int, length: int):
    layers = [Mamba(64, 32, 4, 2) for _ in range(2)]
    x = torch.randn(batch, length, 64)

    def run():
        mamba_module.selective_scan_cpu = scan
        try:
            h = x
            for layer in layers:
                h = layer(h)
            h.sum().backward()
        finally:
            mamba_module.selective_scan_cpu = selective_scan_cpu
    return run


def pool_by_position(logits, values):
    """The pooling one position at a time (what `step` does): the baseline for the blocks."""
    batch, length, n_interests = logits.shape
    running_max = logits.new_full((batch, n_interests), -torch.inf)
    norm = logits.new_zeros(batch, n_interests)
    total = values.new_zeros(batch, n_interests, values.shape[-1])
    pooled = []
    for t in range(length):
        running_max, norm, total = online_softmax_update(running_max, norm, total,
                                                         logits[:, t], values[:, t])
        pooled.append(total / norm.unsqueeze(-1))
    return torch.stack(pooled, dim=1)


def pool_step(pool, batch: int, length: int):
    logits = torch.randn(batch, length, 20, requires_grad=True)     # 20 interests, hidden 64
    values = torch.randn(batch, length, 64, requires_grad=True)
    return lambda: pool(logits, values).sum().backward()


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--length", type=int, default=50)
    parser.add_argument("--items", type=int, default=3417, help="ML-1M: 3,416 items + pad")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"batch {args.batch} x length {args.length}, {args.items} items")
    print("\n2 Mamba layers, forward + backward:")
    for label, scan in (("per-timestep loop (autograd)", selective_scan_loop),
                        ("our CPU scan", selective_scan_cpu)):
        seconds = timed(scan_step(scan, args.batch, args.length), args.repeats)
        print(f"  {label:<30} {seconds:7.3f} s/batch")
    print("\nLSA prefix pooling (one of MLSA4Rec-S's two), forward + backward:")
    for label, pool in (("position by position", pool_by_position),
                        ("in blocks (model/layers/lsa.py)", prefix_softmax_pool)):
        seconds = timed(pool_step(pool, args.batch, args.length), args.repeats)
        print(f"  {label:<31} {seconds * 1000:7.1f} ms/batch")
    print("\nmodels, loss + backward (causal: every position; mlsa4rec: last position):")
    for name in MODELS:
        seconds = timed(model_step(name, args.batch, args.length, args.items), args.repeats)
        print(f"  {name:<12} {seconds:7.3f} s/batch  {args.batch / seconds:8.1f} sequences/s")


if __name__ == "__main__":
    main()
