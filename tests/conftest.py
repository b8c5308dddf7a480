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


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The container module last, for speed only: its bare process then reloads the compile
    cache the rest of the suite wrote, and the image build and the replicas' compile do not share
    the two cores with the live tests' deadlines. No test depends on the order (`pytest
    --random-order` shuffles it)."""
    items.sort(key=lambda item: item.path.name == "test_container.py")


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
