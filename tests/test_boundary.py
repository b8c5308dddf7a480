"""Serving apart from tooling: the serving runtime (HTTP, predictor, engine, retrieval,
calibration applied) imports nothing from training/, bench/ or the weight-building module, not
even lazily; the CLI imports those only inside its commands; one function names the served model."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: Tooling: training and weight building (GGUF conversion, merge, int8: training/weights.py),
#: benchmarks, batch labelling.
TOOLING = ("training", "bench", "labeling")
PACKAGES = ("service", *TOOLING)


def _runtime_roots() -> tuple[str, ...]:
    """What `erc serve` starts from, and vLLM's plugins (pyproject's vllm.general_plugins, run
    in every engine process); the runtime is every project module these reach."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    plugins = project["entry-points"]["vllm.general_plugins"].values()
    return ("service.server", "service.api", *sorted({value.split(":")[0] for value in plugins}))


RUNTIME_ROOTS = _runtime_roots()


def module_file(name: str) -> Path | None:
    """The source file of project module ``name``, or None when it is not one (an attribute)."""
    path = ROOT.joinpath(*name.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_names(name: str, top_level_only: bool = False) -> set[str]:
    """Every module name module ``name`` imports, anywhere in its body (function-level and
    TYPE_CHECKING imports included) unless ``top_level_only``; ``from a import b`` yields both
    ``a`` and ``a.b``."""
    path = module_file(name)
    assert path is not None, name
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def runtime_modules() -> dict[str, list[str]]:
    """Every project module the runtime roots reach, each with the import chain that reaches it."""
    chains: dict[str, list[str]] = {root: [root] for root in RUNTIME_ROOTS}
    pending = list(RUNTIME_ROOTS)
    while pending:
        name = pending.pop()
        for imported in sorted(imported_names(name)):
            if imported.split(".")[0] in PACKAGES and imported not in chains and module_file(imported):
                chains[imported] = [*chains[name], imported]
                pending.append(imported)
    return chains


def test_the_runtime_imports_no_tooling_even_lazily():
    chains = runtime_modules()
    # The closure is real: it reaches the modules a request passes through.
    assert {"service.predictor", "service.engine", "service.retrieval", "service.calibration"} <= set(chains)
    assert "service.served_model" in chains
    tooling = {name: " -> ".join(chain) for name, chain in chains.items() if name.split(".")[0] in TOOLING}
    assert tooling == {}, f"the serving runtime imports tooling: {tooling}"
    assert "service.cli" not in chains, " -> ".join(chains["service.cli"])


def test_the_cli_imports_tooling_only_inside_its_commands():
    top = imported_names("service.cli", top_level_only=True)
    assert {name for name in top if name.split(".")[0] in TOOLING} == set()
    # ... and it does import them, inside the commands: this check is not vacuous.
    assert {"training.weights", "training.evaluate", "bench.run"} <= imported_names("service.cli")


def test_a_fresh_server_process_loads_no_tooling_module():
    """The same boundary as the serving process sees it: importing the runtime and building the
    app (with its real routes, middleware and error handlers) loads no tooling module, nor the
    packages only weight building needs."""
    code = (
        "import json, sys\n"
        "import service.server, service.api, service.predictor, service.served_model, service.engine\n"
        "import service.retrieval, service.calibration\n"
        "service.api.create_app()\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    loaded = json.loads(out.stdout.splitlines()[-1])
    forbidden = [m for m in loaded if m.split(".")[0] in (*TOOLING, "peft", "gguf")]
    assert forbidden == []
    assert "service.served_model" in loaded and "service.predictor" in loaded


def test_the_predictor_is_free_of_the_http_protocol():
    """vLLM entrypoints' split: the protocol (service/schemas.py) apart from the serving logic."""
    names = imported_names("service.predictor") | imported_names("service.exceptions")
    assert not {n for n in names if n.split(".")[0] in ("fastapi", "starlette")}
    assert not {n for n in imported_names("service.predictor") if n.startswith("service.schemas")}


# --- one way to name the served model ------------------------------------------------------------


def _weights(
    root: Path, *names: str, default: str | None = None, int8: tuple[str, ...] = (), unbuilt: tuple[str, ...] = ()
) -> Path:
    """Committed adapters ``names``, each merged (built) but those in ``unbuilt``, and the base built."""
    from service.spec import Demonstrations, LabelSetSpec, ServingSpec

    for name in names:
        folder = root / "adapters" / name
        folder.mkdir(parents=True)
        (folder / "adapter_config.json").write_text("{}")
        ServingSpec(label_sets={"meld": LabelSetSpec(demonstrations=Demonstrations(k=0))}, model_name=name).save(folder)
    for name in ("base", *names):
        if name not in unbuilt:
            (root / name).mkdir(parents=True)
            ServingSpec(model_name=name).save(root / name)
    for name in int8:
        (root / f"{name}-int8").mkdir(parents=True)
        ServingSpec(model_name=f"{name}-int8", quantization="int8").save(root / f"{name}-int8")
    if default:
        (root / "adapters" / "DEFAULT").write_text(default + "\n")
    return root


def test_erc_model_and_precision_name_the_served_folder(tmp_path):
    from service.served_model import served_model_dir
    from service.settings import Settings

    root = _weights(tmp_path / "weights", "alpha", "beta", default="beta", int8=("beta",))
    assert served_model_dir(Settings(weights_root=root)) == root / "beta"
    assert served_model_dir(Settings(weights_root=root, precision="int8")) == root / "beta-int8"
    assert served_model_dir(Settings(weights_root=root, model="alpha")) == root / "alpha"
    assert served_model_dir(Settings(weights_root=root, model="base")) == root / "base"
    # ERC_MODEL_DIR, and a command's --model before it, are served as they are.
    explicit = tmp_path / "elsewhere"
    assert served_model_dir(Settings(weights_root=root, model_dir=explicit, precision="int8")) == explicit
    assert served_model_dir(Settings(weights_root=root, model_dir=explicit), tmp_path / "cli") == tmp_path / "cli"


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"model": "gamma"}, "ERC_MODEL='gamma' is not a committed adapter under .* \\(committed: alpha, beta, delta"),
        ({"model": "alpha", "precision": "int8"}, "alpha-int8 is not built; build it with `erc weights build --int8`"),
        ({"model": "base", "precision": "int8"}, "the embedded base model has no int8 build"),
        # Committed but not merged here, as in an image built for another model.
        ({"model": "delta"}, "ERC_MODEL='delta': .*delta is not built; build it with `erc weights build`"),
    ],
)
def test_a_misnamed_model_is_refused_naming_the_setting(tmp_path, settings, message):
    from service.served_model import WeightsError, served_model_dir
    from service.settings import Settings

    root = _weights(tmp_path / "weights", "alpha", "beta", "delta", int8=("beta",), unbuilt=("delta",))
    with pytest.raises(WeightsError, match=message):
        served_model_dir(Settings(weights_root=root, **settings))


def test_the_settings_refuse_a_precision_or_model_name_they_cannot_mean():
    from pydantic import ValidationError

    from service.settings import Settings

    with pytest.raises(ValidationError, match="precision"):
        Settings(precision="int4")
    with pytest.raises(ValidationError, match="model"):
        Settings(model="../elsewhere")


def test_every_command_that_runs_the_served_model_asks_the_one_function():
    """serve, evaluate, calibrate and bench (and bench/floor.py) name the served model through
    service.served_model.served_model_dir; nobody else works out a default folder."""
    for path in [*(ROOT / "service").rglob("*.py"), *(ROOT / "bench").glob("*.py"), *(ROOT / "training").glob("*.py")]:
        text = path.read_text(encoding="utf-8")
        assert "settings.model_dir or" not in text, path
    cli = ast.parse((ROOT / "service" / "cli.py").read_text(encoding="utf-8"))
    commands = {f.name: ast.unparse(f) for f in cli.body if isinstance(f, ast.FunctionDef)}
    for command in ("serve", "evaluate", "calibrate", "bench"):
        assert "served_model_dir(" in commands[command] or "_served(" in commands[command], command
