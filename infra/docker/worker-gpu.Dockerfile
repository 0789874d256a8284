# GPU scorer worker: CUDA base, torch 2.8 (cu12.8), mamba-ssm with its kernels.
FROM nvidia/cuda:12.8.1-cudnn-devel-ubuntu22.04
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1
RUN apt-get update && apt-get install -y --no-install-recommends python3.11 python3.11-venv python3.11-dev git \
    && rm -rf /var/lib/apt/lists/* && python3.11 -m venv /venv
ENV PATH=/venv/bin:$PATH
WORKDIR /app
COPY pyproject.toml README.md cli.py ./
COPY model model
COPY streams streams
COPY schemas schemas
RUN pip install . packaging ninja \
    && MAMBA_SKIP_CUDA_BUILD=TRUE CAUSAL_CONV1D_SKIP_CUDA_BUILD=TRUE \
       pip install --no-build-isolation "mamba-ssm>=2.2.5,<2.3" "causal-conv1d>=1.5,<1.6"
ENTRYPOINT ["mlsa4rec"]
CMD ["worker", "--device", "cuda"]
