"""The docs as a front door, not a journal: README's size and settings table, settings that say
what they do, no dated or measured figures in the code's comments (figures live in docs/, with
their machine, date and commit), and no broken relative links."""

from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

import pytest

from service.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
README_LIMIT = 12_000

DATE = re.compile(r"\b20\d\d-\d\d-\d\d\b")
#: Phrases of a measurement: a figure with a unit of time or speed, a speed-up, "measured on/here".
MEASURED = re.compile(
    r"\b\d+(?:\.\d+)?(?:-\d+(?:\.\d+)?)? ?(?:ms|utt/s|utterances/s|[GT]FLOP/s|GB/s|tokens/s)\b"
    r"|\b\d+(?:\.\d+)?(?:-\d+(?:\.\d+)?)?x (?:faster|slower|the)\b"
    r"|\b[Mm]easured (?:on|here|at)\b|\bmeasured:"
    r"|~\d+(?:\.\d+)?(?:x| ?s\b)"
    r"|\b\d+(?:\.\d+)? s (?:here|against|instead)\b"
)


def _env_names() -> list[str]:
    prefix = Settings.model_config["env_prefix"]
    return [f"{prefix}{name}".upper() for name in Settings.model_fields]


def _comments_and_docstrings(path: Path) -> list[tuple[int, str]]:
    source = path.read_text(encoding="utf-8")
    found = [
        (tok.start[0], tok.string)
        for tok in tokenize.generate_tokens(io.StringIO(source).readline)
        if tok.type == tokenize.COMMENT
    ]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=False)
            if doc is not None:
                found.append((node.body[0].lineno, doc))
    return found


def _offences(text: str) -> list[str]:
    return [m.group(0) for pattern in (DATE, MEASURED) for m in pattern.finditer(text)]


def test_readme_is_a_front_door():
    size = len(README.read_text(encoding="utf-8"))
    assert size <= README_LIMIT, f"README.md is {size} characters, over {README_LIMIT}: move detail to docs/"


def test_readme_settings_table_lists_every_setting():
    rows = re.findall(r"^\| *`(ERC_[A-Z0-9_]+)`", README.read_text(encoding="utf-8"), flags=re.M)
    missing = sorted(set(_env_names()) - set(rows))
    assert not missing, f"not in README's settings table: {missing}"


def test_every_setting_has_a_description():
    bare = [name for name, field in Settings.model_fields.items() if not (field.description or "").strip()]
    assert not bare, f"settings without a description: {bare}"


def test_setting_descriptions_carry_no_dates_or_measurements():
    found = {
        name: hits for name, field in Settings.model_fields.items() if (hits := _offences(field.description or ""))
    }
    assert not found, f"dates or measured figures belong in docs/ (with machine, date, commit): {found}"


@pytest.mark.parametrize("path", sorted((ROOT / "service").rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_code_comments_carry_no_dates_or_measurements(path: Path):
    found = [(line, hits) for line, text in _comments_and_docstrings(path) if (hits := _offences(text))]
    assert not found, f"dates or measured figures belong in docs/ (keep the reason here): {found}"


@pytest.mark.parametrize("doc", [README, *sorted((ROOT / "docs").glob("*.md"))], ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc: Path):
    text = re.sub(r"```.*?```", "", doc.read_text(encoding="utf-8"), flags=re.S)
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue
        if not (doc.parent / target.split("#", 1)[0]).exists():
            broken.append(target)
    assert not broken, f"{doc.name}: links to missing files: {broken}"
