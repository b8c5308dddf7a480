"""Shared fixtures. Data comes from ERC_DATA_DIR; built artefacts from index/ and weights/.

A test whose input is missing is skipped on a developer machine, but fails under CI (CI=true), so
a broken set-up can never pass as a run of skips.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from service.settings import Settings

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
#: The modules that run containers (tests/containers.py holds their daemon and image).
CONTAINER_MODULES = ("test_container.py", "test_container_run.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The container modules last, for speed only: test_container's bare process then reloads the compile
    cache the rest of the suite wrote, and the image build and the replicas' compile do not share
    the two cores with the live tests' deadlines. No test depends on the order (`pytest
    --random-order` shuffles it)."""
    items.sort(key=lambda item: item.path.name in CONTAINER_MODULES)


#: The model of the tests that check processes, not the model's numbers (drain, signals, restarts,
#: a stalled or killed engine, the labelling modes): the committed adapter on the smaller SmolLM2
#: backbone, which loads and starts faster than the served default. The served default has the
#: tests of its own numbers: test_service's live engine, the card test, the containers.
PROCESS_TEST_ENV = {"ERC_MODEL": "smollm2-erc3"}


def process_test_env(settings: Settings) -> dict[str, str]:
    """PROCESS_TEST_ENV, once its model is built (`erc weights build` builds every committed adapter)."""
    require(settings.weights_root / PROCESS_TEST_ENV["ERC_MODEL"] / "erc.json", "run `erc weights build`")
    return dict(PROCESS_TEST_ENV)


def require(path: Path, how: str) -> Path:
    if not path.exists():
        message = f"{path} is missing ({how})"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def settings() -> Settings:
    return Settings()


@pytest.fixture(scope="session")
def data_dir(settings: Settings) -> Path:
    return require(settings.data_dir, "set ERC_DATA_DIR to the data folder")


@pytest.fixture(scope="session")
def encoder():
    from service.retrieval import Encoder

    return Encoder()


@pytest.fixture(scope="session")
def meld_index(settings: Settings, encoder):
    from service.retrieval import DemonstrationIndex

    folder = require(settings.index_root / "meld", "run `erc index build --dataset meld`")
    return DemonstrationIndex(folder, encoder)


def engine_cores(pid: int | None = None) -> list:
    """The vLLM engine core processes under ``pid`` (default: this process)."""
    import psutil

    children = psutil.Process(pid).children(recursive=True)
    cores = [p for p in children if "EngineCore" in p.name() or "EngineCore" in " ".join(p.cmdline())]
    assert cores, f"no engine core process under pid {pid or os.getpid()}"
    return cores


# The Docker daemon and image, one per session for both container modules: a fixture defined
# here, where both see the same one (imported last: tests.containers uses ``require`` above).
from tests.containers import docker_env  # noqa: E402,F401
