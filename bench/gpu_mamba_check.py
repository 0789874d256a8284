"""On a CUDA machine with mamba-ssm installed: our Mamba against mamba_ssm.Mamba with the same
weights (outputs equal within 1e-3) and the speed of both (forward + backward).

    python bench/gpu_mamba_check.py [--batch 256] [--length 50]
"""

from __future__ import annotations

import argparse
import time

import torch

from model.layers.mamba import Mamba, cuda_kernels_available


def timed(fn, repeats=20):
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--length", type=int, default=50)
    args = parser.parse_args()
    if not cuda_kernels_available():
        raise SystemExit("needs CUDA and the mamba-ssm package (see README, GPU install)")
    from mamba_ssm.modules.mamba_simple import Mamba as ReferenceMamba

    torch.manual_seed(0)
    ours = Mamba(64, 32, 4, 2).cuda()
    reference = ReferenceMamba(d_model=64, d_state=32, d_conv=4, expand=2).cuda()
    reference.load_state_dict(ours.state_dict())          # same names, same shapes
    x = torch.randn(args.batch, args.length, 64, device="cuda", requires_grad=True)
    with torch.no_grad():
        diff = (ours(x) - reference(x)).abs().max().item()
        ours.use_kernels = False
        diff_torch = (ours(x) - reference(x)).abs().max().item()
        ours.use_kernels = True
    print(f"max |ours(kernels) - mamba_ssm| = {diff:.2e}; ours(pure torch on GPU) = {diff_torch:.2e}")
    for label, module in (("ours, mamba_ssm kernels", ours), ("mamba_ssm.Mamba", reference)):
        seconds = timed(lambda m=module: m(x).sum().backward())
        print(f"{label:<28} {seconds * 1e3:8.2f} ms forward+backward")
    ours.use_kernels = False
    seconds = timed(lambda: ours(x).sum().backward())
    print(f"{'ours, pure torch on GPU':<28} {seconds * 1e3:8.2f} ms forward+backward")


if __name__ == "__main__":
    main()
