"""On a CUDA machine with mamba_ssm's selective-scan kernel: our Mamba against
mamba_ssm.Mamba with the same weights (outputs, gradients and `step` equal within 1e-3) and the
speed of both; then training speed of the models with and without the kernel.

    python bench/gpu_mamba_check.py [--shapes 256x50,2048x50]

(see bench/gpu_build_mamba_kernels.py for a build without pip; bench/gpu_session.sh runs both).
"""

from __future__ import annotations

import argparse
import time

import torch

from model.layers.mamba import Mamba, cuda_kernels_available
from model.models import build_model


def timed(fn, repeats=20):
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


def compare_layers(batch: int, length: int):
    from mamba_ssm.modules.mamba_simple import Mamba as ReferenceMamba

    torch.manual_seed(0)
    ours = Mamba(64, 32, 4, 2).cuda()
    reference = ReferenceMamba(d_model=64, d_state=32, d_conv=4, expand=2).cuda()
    reference.load_state_dict(ours.state_dict())          # same names, same shapes
    x = torch.randn(batch, length, 64, device="cuda")
    print(f"-- batch {batch} x length {length}, d_model 64, d_state 32, fp32")

    outputs, grads = {}, {}
    for label, module, kernels in (("ours (kernel)", ours, True), ("ours (pure torch)", ours, False),
                                   ("mamba_ssm", reference, None)):
        if kernels is not None:
            module.use_kernels = kernels
        xi = x.clone().requires_grad_(True)
        module.zero_grad()
        out = module(xi)
        out.square().mean().backward()
        outputs[label] = out.detach()
        grads[label] = [xi.grad] + [p.grad.clone() for p in module.parameters()]
    for label in ("ours (kernel)", "ours (pure torch)"):
        grad_diff = max(max_diff(a, b) for a, b in zip(grads[label], grads["mamba_ssm"]))
        print(f"max |{label} - mamba_ssm|: output {max_diff(outputs[label], outputs['mamba_ssm']):.2e}"
              f", gradients (input and every parameter) {grad_diff:.2e}")

    # step: 20 tokens from empty caches, against mamba_ssm's own step
    ours_cache = ours.allocate_inference_cache(batch)
    ref_cache = [torch.zeros_like(c) for c in ours_cache]
    worst = 0.0
    with torch.no_grad():
        for t in range(min(length, 20)):
            token = x[:, t:t + 1]
            a = ours.step(token, *ours_cache)[0]
            b = reference.step(token, *ref_cache)[0]
            worst = max(worst, max_diff(a, b))
    print(f"max |ours.step - mamba_ssm.step| over 20 tokens: {worst:.2e}")

    xg = x.clone().requires_grad_(True)
    for label, module, kernels in (("ours, mamba_ssm kernel", ours, True),
                                   ("mamba_ssm.Mamba", reference, None),
                                   ("ours, pure torch on GPU", ours, False)):
        if kernels is not None:
            module.use_kernels = kernels
        seconds = timed(lambda m=module: m(xg).sum().backward())
        with torch.no_grad():
            forward = timed(lambda m=module: m(x))
        print(f"{label:<26} {seconds * 1e3:8.2f} ms forward+backward  "
              f"{forward * 1e3:8.2f} ms forward")
    ours.use_kernels = True


def model_training_speed(batch: int, length: int, n_items: int = 3417):
    """Training sequences/s (loss at every position for causal models), kernel vs pure torch."""
    print(f"-- training step, batch {batch} x length {length}, {n_items - 1} items")
    for name in ("mlsa4rec-s", "mlsa4rec", "mamba4rec", "sasrec"):
        torch.manual_seed(0)
        model = build_model(name, n_items).cuda().train()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        items = torch.randint(1, n_items, (batch, length + 1), device="cuda")
        lengths = torch.full((batch,), length, device="cuda")
        targets = items[:, 1:] if model.causal else items[:, -1]

        def train_step():
            loss = model.loss(items[:, :-1], lengths, targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        layers = [m for m in model.modules() if isinstance(m, Mamba)]
        rows = [("kernel", True), ("pure torch", False)] if layers else [("", None)]
        for label, kernels in rows:
            for layer in layers:
                layer.use_kernels = kernels
            seconds = timed(train_step, repeats=10)
            print(f"{name:<11} {label:<11} {seconds * 1e3:8.1f} ms/step  "
                  f"{batch / seconds:10,.0f} sequences/s")


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shapes", default="256x50,2048x50")
    args = parser.parse_args()
    if not cuda_kernels_available():
        raise SystemExit("needs CUDA and mamba_ssm's selective_scan_cuda "
                         "(README, GPU install; or bench/gpu_build_mamba_kernels.py)")
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")
    shapes = [tuple(int(v) for v in shape.split("x")) for shape in args.shapes.split(",")]
    for batch, length in shapes:
        compare_layers(batch, length)
    for batch, length in shapes:
        model_training_speed(batch, length)


if __name__ == "__main__":
    main()
