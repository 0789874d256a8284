"""Build mamba_ssm's selective-scan CUDA extension from its sdist for this GPU only, on a
machine that has nvcc and torch but cannot install packages (no index, no prebuilt wheel for
its torch/CUDA pair).

    python bench/gpu_build_mamba_kernels.py SDIST_DIR BUILD_DIR

SDIST_DIR is an unpacked `mamba_ssm-X.tar.gz`. Afterwards `import selective_scan_cuda` works
with BUILD_DIR on sys.path, and `mamba_ssm.ops.selective_scan_interface` with SDIST_DIR on it
(its package `__init__` is replaced by a one-liner, since the real one imports Mamba2/3 and
the language-model helpers, which need more packages than this check). causal-conv1d is not
built: both our layer and mamba_ssm's Mamba then run the convolution with nn.Conv1d.
Why a JIT build of one architecture: the full `pip install` compiles every kernel for ~10 GPU
generations, far longer than a device session.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch
from torch.utils.cpp_extension import load


def main():
    sdist, build = Path(sys.argv[1]), Path(sys.argv[2])
    build.mkdir(parents=True, exist_ok=True)
    (sdist / "mamba_ssm" / "__init__.py").write_text('"""Trimmed for the GPU check."""\n')
    major, minor = torch.cuda.get_device_capability()
    os.environ["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"
    csrc = sdist / "csrc" / "selective_scan"
    sources = [str(csrc / "selective_scan.cpp")] + sorted(str(p) for p in csrc.glob("*.cu"))
    started = time.time()
    load(name="selective_scan_cuda", sources=sources, build_directory=str(build),
         extra_include_paths=[str(csrc)], extra_cflags=["-O3", "-std=c++17"],
         extra_cuda_cflags=["-O3", "-std=c++17", "-U__CUDA_NO_HALF_OPERATORS__",
                            "-U__CUDA_NO_HALF_CONVERSIONS__", "-U__CUDA_NO_BFLOAT16_OPERATORS__",
                            "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
                            "-U__CUDA_NO_BFLOAT162_OPERATORS__",
                            "-U__CUDA_NO_BFLOAT162_CONVERSIONS__", "--expt-relaxed-constexpr",
                            "--expt-extended-lambda", "--use_fast_math"],
         verbose=False)
    print(f"built selective_scan_cuda for sm_{major}{minor} in {time.time() - started:.0f}s "
          f"into {build}")


if __name__ == "__main__":
    main()
