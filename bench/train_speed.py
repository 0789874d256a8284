"""Training speed on this machine: sequences/s (forward + backward) for each model, and the
CPU selective scan against the plain per-timestep loop.

    .venv/bin/python bench/train_speed.py [--batch 256] [--length 50] [--items 3417]
"""

from __future__ import annotations

import argparse
import time

import torch

import model.layers.mamba as mamba_module
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
    print("\nmodels, loss + backward (causal: every position; mlsa4rec: last position):")
    for name in MODELS:
        seconds = timed(model_step(name, args.batch, args.length, args.items), args.repeats)
        print(f"  {name:<12} {seconds:7.3f} s/batch  {args.batch / seconds:8.1f} sequences/s")


if __name__ == "__main__":
    main()
