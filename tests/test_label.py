"""``erc label``: readers, errors file, crash-safe store and resume, flat memory (an engine
double), then the real engine: in-process against ``/predict_dialogue``, ``--url`` against a
service admitting one request at a time, SIGKILL and ``--resume``, and a local Ray actor."""

from __future__ import annotations

import asyncio
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from labeling.backends import LabelRunError, Outcome
from labeling.readers import Columns, CsvReader, chunks
from labeling.run import Options, label
from labeling.store import errors_path, parts_dir
from service.labels import LABEL_SETS
from service.schemas import Prediction
from tests.conftest import PROCESS_TEST_ENV, process_test_env

MELD = LABEL_SETS["meld"]
ERC = str(Path(sys.executable).with_name("erc"))


class Double:
    """An engine double: the label of an utterance is fixed by its text's length."""

    model, label_set = "double", "meld"
    labels = tuple(MELD)

    def __init__(self, fail_after_chunks: int | None = None) -> None:
        self.calls = 0
        self.fail_after = fail_after_chunks
        self.closed = False
        self.predictions = [
            Prediction(label=MELD[k], scores={label: float(i == k) for i, label in enumerate(MELD)})
            for k in range(len(MELD))
        ]

    async def start(self) -> None:
        pass

    async def label(self, dialogues):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise LabelRunError("the double's service went away")
        out = []
        for d in dialogues:
            if any(t.text == "too long" for t in d.turns):
                out.append(Outcome(error="prompt of 9999 tokens exceeds the model's limit of 2048 (ERC_MAX_MODEL_LEN)"))
                continue
            # One shared prediction per label: the double must cost next to nothing per utterance.
            out.append(Outcome([self.predictions[len(t.text) % len(MELD)] for t in d.turns], model=self.model))
        return out

    async def close(self) -> None:
        self.closed = True

    def stats(self):
        return {}


def _jsonl(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def _rows(path: Path) -> list[dict]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    return [json.loads(line) for line in path.read_text().splitlines()]


def _dialogue(i: int, turns: int = 3) -> dict:
    return {
        "id": f"d{i}",
        "turns": [{"speaker": "ab"[t % 2], "text": f"utterance {i}.{t}" + "!" * t} for t in range(turns)],
    }


def test_jsonl_rows_in_input_order_and_bad_records_in_the_errors_file(tmp_path):
    lines = [
        _dialogue(0),
        "{not json",
        {"id": "d2", "turns": [{"speaker": "a", "text": "  "}]},
        {"turns": [{"speaker": "a", "text": "no id"}]},
        "",
        {"id": "d5", "turns": [{"speaker": "a", "text": "too long"}]},
        {"id": "d6", "turns": [{"speaker": "a", "text": "x"}] * 1001},
        _dialogue(7, 5),
    ]
    src = _jsonl(tmp_path / "in.jsonl", lines)
    out = tmp_path / "out.jsonl"
    backend = Double()
    summary = label(Options(src, out, chunk_utterances=2, progress=False), backend, "double")
    rows = _rows(out)
    assert [(r["dialogue_id"], r["turn"]) for r in rows] == [("d0", t) for t in range(3)] + [("line-4", 0)] + [
        ("d7", t) for t in range(5)
    ]
    assert set(rows[0]) == {"dialogue_id", "turn", "speaker", "label", "scores", "label_set", "model"}
    assert rows[0]["speaker"] == "a" and rows[0]["model"] == "double" and rows[0]["label_set"] == "meld"
    assert set(rows[0]["scores"]) == set(MELD) and rows[0]["label"] == MELD[len("utterance 0.0") % 7]
    errors = _rows(errors_path(out))
    assert [e["line"] for e in errors] == [2, 3, 6, 7]
    assert "invalid JSON" in errors[0]["reason"]
    assert errors[1]["dialogue_id"] is None and "turns.0.text" in errors[1]["reason"] and "empty" in errors[1]["reason"]
    assert "ERC_MAX_MODEL_LEN" in errors[2]["reason"] and errors[2]["dialogue_id"] == "d5"
    assert "turns" in errors[3]["reason"] and "1000" in errors[3]["reason"]
    assert (summary.dialogues, summary.utterances, summary.errors) == (3, 9, 4)
    assert not parts_dir(out).exists() and backend.closed
    text = "\n".join(summary.lines())
    assert "3 dialogues, 9 utterances; 4 errors" in text and "utterances/s" in text


def test_meld_csv_reads_as_the_service_reads_it_with_its_own_column_names(data_dir):
    from service.data import load_split

    path = data_dir / "MELD" / "test_sent_emo.csv"
    records = list(CsvReader(path, Columns()).records())
    expected = load_split(data_dir, "meld", "test", "csv")
    assert all(r.error is None for r in records) and len(records) == len(expected)
    for record, dialogue in zip(records, expected):
        assert record.dialogue_id == dialogue.id
        assert [t.text for t in record.dialogue.turns] == [t.text for t in dialogue.turns]
        assert [t.speaker.strip() for t in record.dialogue.turns] == [t.speaker for t in dialogue.turns]


def test_csv_rows_out_of_order_are_sorted_and_a_non_contiguous_dialogue_is_refused(tmp_path):
    path = tmp_path / "in.csv"
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["conv", "n", "who", "said"])
        w.writerows(
            [
                ["a", 1, "x", "second"],
                ["a", 0, "y", "first"],
                ["b", 0, "x", "b0"],
                ["a", 2, "x", "late"],
                ["c", 0, "x", ""],
                [" ", 0, "x", "orphan"],
                ["d", 0, "x", "d0"],
            ]
        )
    records = list(CsvReader(path, Columns("conv", "n", "who", "said")).records())
    assert [t.text for t in records[0].dialogue.turns] == ["first", "second"] and records[0].line == 2
    assert records[1].dialogue_id == "b" and records[1].error is None
    assert "not contiguous" in records[2].error and "line 5" in records[2].error and "line 2" in records[2].error
    assert records[3].error.startswith("turns.0.text (line 6)")
    assert records[4].error == "conv: the row has no dialogue id" and records[4].line == 7
    assert records[5].dialogue_id == "d" and records[5].error is None
    assert [r.ordinal for r in records] == [0, 1, 2, 3, 4, 5]
    with pytest.raises(ValueError, match="no column 'Dialogue_ID'"):
        list(CsvReader(path, Columns()).records())


def test_parquet_in_and_out(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = tmp_path / "in.parquet"
    pq.write_table(pa.table({"d": [7, 7, 8], "o": [0, 1, 0], "s": ["a", "b", "a"], "t": ["hi", "hello", None]}), src)
    out = tmp_path / "out.parquet"
    summary = label(Options(src, out, columns=Columns("d", "o", "s", "t"), progress=False), Double(), "double")
    rows = _rows(out)
    assert [(r["dialogue_id"], r["turn"], r["speaker"]) for r in rows] == [("7", 0, "a"), ("7", 1, "b")]
    assert list(rows[0]["scores"]) == list(MELD)  # a struct in the label set's order
    assert _rows(errors_path(out))[0]["row"] == 3 and summary.errors == 1


def test_a_crash_loses_only_uncommitted_chunks_and_resume_labels_each_utterance_once(tmp_path):
    src = _jsonl(tmp_path / "in.jsonl", [_dialogue(i, 2) for i in range(20)] + ["{bad"])
    out = tmp_path / "out.jsonl"
    options = Options(src, out, chunk_utterances=4, inflight=2, progress=False)
    with pytest.raises(LabelRunError):
        label(options, Double(fail_after_chunks=3), "double")
    manifest = json.loads((parts_dir(out) / "manifest.json").read_text())
    assert manifest["next_ordinal"] in (4, 6) and not out.exists()
    # A part left by a crash between its rename and the manifest's is not counted twice.
    (parts_dir(out) / f"part-{manifest['next_chunk']:06d}.jsonl").write_text('{"torn": ')
    with pytest.raises(ValueError, match="pass --resume"):
        label(options, Double(), "double")
    options.resume = True
    summary = label(options, Double(), "double")
    keys = [(r["dialogue_id"], r["turn"]) for r in _rows(out)]
    assert keys == [(f"d{i}", t) for i in range(20) for t in range(2)]
    assert summary.resumed_from == manifest["next_ordinal"] and summary.errors == 1
    with pytest.raises(ValueError, match="complete"):
        label(options, Double(), "double")


def test_a_run_that_commits_nothing_leaves_nothing_to_resume(tmp_path):
    class NoEngine(Double):
        async def start(self) -> None:
            raise LabelRunError("the model could not be loaded")

    src = _jsonl(tmp_path / "in.jsonl", [_dialogue(0)])
    with pytest.raises(LabelRunError):
        label(Options(src, tmp_path / "out.jsonl", progress=False), NoEngine(), "double")
    assert not parts_dir(tmp_path / "out.jsonl").exists()
    label(Options(src, tmp_path / "out.jsonl", progress=False), Double(), "double")


def test_resume_refuses_a_changed_input(tmp_path):
    src = _jsonl(tmp_path / "in.jsonl", [_dialogue(i) for i in range(6)])
    out = tmp_path / "out.jsonl"
    with pytest.raises(LabelRunError):
        label(Options(src, out, chunk_utterances=3, progress=False), Double(fail_after_chunks=2), "double")
    _jsonl(src, [_dialogue(i) for i in range(7)])
    with pytest.raises(ValueError, match="input_size"):
        label(Options(src, out, chunk_utterances=3, progress=False, resume=True), Double(), "double")


def test_chunks_never_split_a_dialogue():
    from labeling.readers import Record
    from service.schemas import DialogueIn

    records = [
        Record(i, i + 1, str(i), DialogueIn.model_validate(_dialogue(i, n))) for i, n in enumerate([3, 1, 4, 1, 5])
    ]
    cut = list(chunks(records, max_utterances=4, max_dialogues=100))
    assert [[r.ordinal for r in c] for c in cut] == [[0, 1], [2], [3, 4]]


def _refusals() -> list:
    """What an engine raises for one prompt it will not take: the service's own type, and the
    engine module's where it has one."""
    from service import engine, exceptions

    found = [exceptions.PromptTooLong("prompt of 9999 tokens exceeds the model's limit (ERC_MAX_MODEL_LEN)")]
    if hasattr(engine, "PromptTooLong"):
        found.append(engine.PromptTooLong(9999, 2040))
    return found


@pytest.mark.parametrize("refusal", _refusals(), ids=lambda e: type(e).__module__)
def test_in_process_backend_sends_a_chunk_as_one_batch_and_isolates_a_bad_dialogue(refusal):
    """The in-process backend on the service's predictor (an engine double): limits per
    dialogue, one engine call for the chunk, and a prompt the engine refuses costs its own
    dialogue only."""
    from labeling.backends import InProcess
    from service.predictor import Predictor
    from service.schemas import DialogueIn
    from service.settings import Settings
    from service.spec import Demonstrations, ServingSpec
    from service.state import ServiceState
    from tests.doubles import FakeEngine

    class Refusing(FakeEngine):
        async def classify(self, prompts, labels, decoding=None, priority=0):
            if any("refuse me" in p for p in prompts):
                self.calls.append(list(prompts))
                raise refusal
            return await super().classify(prompts, labels, decoding, priority)

    settings = Settings(max_turns=4)
    engine = Refusing()
    backend = InProcess(settings, fresh_process=False)
    spec = ServingSpec(demonstrations=Demonstrations(k=0), model_name="fake")
    backend.state = ServiceState(predictor=Predictor(backend.settings, spec, engine, {}), engine=engine)
    backend.label_set, backend.model = "meld", "fake"
    dialogues = [DialogueIn.model_validate(_dialogue(i, n)) for i, n in enumerate([2, 5, 3])]
    outcomes = asyncio.run(backend.label(dialogues))
    assert [len(o.predictions or []) for o in outcomes] == [2, 0, 3]
    assert outcomes[1].error == "turns: 5 turns exceed the limit of 4 (ERC_MAX_TURNS)"
    assert [len(c) for c in engine.calls] == [5]  # the two valid dialogues, one batch

    dialogues[2] = DialogueIn.model_validate({"id": "x", "turns": [{"speaker": "a", "text": "refuse me"}]})
    engine.calls.clear()
    outcomes = asyncio.run(backend.label(dialogues))
    assert [len(c) for c in engine.calls] == [3, 2, 1]  # the batch, then each valid dialogue alone
    assert outcomes[0].predictions and outcomes[1].error and "ERC_MAX_MODEL_LEN" in outcomes[2].error


MEMORY_RUN = """
import asyncio, json, resource, sys
from pathlib import Path
from labeling.run import Options, label
from tests.test_label import Double
n, folder = int(sys.argv[1]), Path(sys.argv[2])
src = folder / f"in-{n}.csv"
with src.open("w") as fh:
    fh.write("Dialogue_ID,Utterance_ID,Speaker,Utterance\\n")
    for i in range(n):
        fh.write(f"{i // 20},{i % 20},S{i % 3},utterance number {i} of a synthetic corpus\\n")
summary = label(Options(src, folder / f"out-{n}.jsonl", progress=False, chunk_utterances=4096), Double(), "double")
assert summary.utterances == n, summary
print(json.dumps({"maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "s": summary.seconds}))
"""


def test_memory_stays_flat_from_ten_thousand_to_a_million_utterances(tmp_path):
    def run(n: int) -> dict:
        out = subprocess.run(
            [sys.executable, "-c", MEMORY_RUN, str(n), str(tmp_path)],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parent.parent,
        )
        return json.loads(out.stdout.strip().splitlines()[-1])

    small, large = run(10_000), run(1_000_000)
    figures = f"{small['maxrss_mb']:.1f} MB at 10,000, {large['maxrss_mb']:.1f} MB at 1,000,000 ({large['s']:.1f} s)"
    print(f"peak RSS: {figures}")
    assert large["maxrss_mb"] - small["maxrss_mb"] < 50, (small, large)
    assert sum(1 for _ in (tmp_path / "out-1000000.jsonl").open()) == 1_000_000


# --- the real engine -------------------------------------------------------------------------------
# One server for the module (ERC_MAX_INFLIGHT=1: a second request at once is a 429), a few MELD
# test dialogues, and an in-process run's rows as the reference every other mode must match.
# Every engine here runs float32, which is batch-invariant up to rounding: one dialogue per
# request and a whole chunk in one batch give the same labels and scores to 1e-4, so labels can be
# compared exactly (bfloat16, what ERC_DTYPE=auto picks on a CPU with BF16 instructions, moves
# scores with the batch's make-up). The model is the process tests' (tests/conftest.py), eager:
# these tests check the modes against each other, and an eager engine starts without compiling.
LABEL_ENV = {**PROCESS_TEST_ENV, "ERC_DTYPE": "float32", "ERC_ENFORCE_EAGER": "true"}


def _meld_sample(data_dir: Path, folder: Path, first: int, last: int) -> Path:
    from service.data import load_split

    dialogues = load_split(data_dir, "meld", "test", "csv")[first:last]
    return _jsonl(
        folder / f"meld-test-{first}-{last}.jsonl",
        [{"id": d.id, "turns": [{"speaker": t.speaker, "text": t.text} for t in d.turns]} for d in dialogues],
    )


@pytest.fixture(scope="module")
def sample(data_dir, tmp_path_factory) -> Path:
    return _meld_sample(data_dir, tmp_path_factory.mktemp("label"), 0, 8)


@pytest.fixture(scope="module")
def server(settings, tmp_path_factory):
    from bench.launcher import ServerProcess, free_port
    from tests.conftest import require

    require(settings.index_root / "meld" / "manifest.json", "run `erc index build --dataset meld`")
    process_test_env(settings)
    log = tmp_path_factory.mktemp("label-server") / "server.log"
    process = ServerProcess(free_port(), {"ERC_MAX_INFLIGHT": "1", **LABEL_ENV}, log=log)
    try:
        process.wait_ready()
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="module")
def reference_run(sample, tmp_path_factory) -> tuple[Path, dict]:
    """One in-process `erc label` run on the sample: its output file and its --stats-json."""
    folder = tmp_path_factory.mktemp("label-reference")
    out, stats = folder / "labels.jsonl", folder / "stats.json"
    _erc_label(str(sample), "-o", str(out), "--stats-json", str(stats))
    return out, json.loads(stats.read_text())


@pytest.fixture(scope="module")
def reference(reference_run) -> dict:
    """The in-process run's rows on the sample, by (dialogue id, turn): what every mode must match."""
    return {(r["dialogue_id"], r["turn"]): r for r in _rows(reference_run[0])}


def _erc_label(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, **LABEL_ENV}
    result = subprocess.run([ERC, "label", *args, "--no-progress"], capture_output=True, text=True, env=env)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _same_labels(rows: list[dict], reference: dict) -> None:
    assert reference
    keys = [(r["dialogue_id"], r["turn"]) for r in rows]
    assert len(keys) == len(set(keys)), "an utterance was labelled twice"
    for row in rows:
        want = reference[(row["dialogue_id"], row["turn"])]
        assert row["label"] == want["label"], (row, want)
        # float32 is batch-invariant up to rounding: one dialogue per request gives the batch's scores.
        assert row["scores"] == pytest.approx(want["scores"], abs=1e-4)


def test_in_process_label_gives_the_labels_of_predict_dialogue(server, sample, reference_run):
    """The in-process mode labels as the service does. Its speed against /predict_dialogue is a
    benchmark figure (`erc bench`'s `label_over_predict_dialogue`), not a timed test."""
    from service.client import ERCClient

    dialogues = [json.loads(line) for line in sample.read_text().splitlines()]
    utterances = sum(len(d["turns"]) for d in dialogues)
    with ERCClient(server.base) as client:
        batch = client.predict_dialogue(dialogues)
    out, summary = reference_run
    rows = _rows(out)
    assert [(r["dialogue_id"], r["turn"]) for r in rows] == [
        (d["id"], t) for d in dialogues for t in range(len(d["turns"]))
    ]
    assert [r["label"] for r in rows] == [p.label for result in batch.results for p in result.predictions]
    assert summary["utterances"] == utterances and summary["errors"] == 0 and summary["mode"] == "in-process"
    assert summary["utterances_per_s"] > 0


def test_url_labels_every_utterance_once_through_429s(server, sample, tmp_path, reference):
    out, stats = tmp_path / "labels.parquet", tmp_path / "stats.json"
    _erc_label(str(sample), "-o", str(out), "--url", server.base, "--concurrency", "8", "--stats-json", str(stats))
    summary = json.loads(stats.read_text())
    rows = _rows(out)
    assert [(r["dialogue_id"], r["turn"]) for r in rows] == list(reference)
    _same_labels(rows, reference)
    print(f"--url --concurrency 8 against ERC_MAX_INFLIGHT=1: retries {summary['client']['retries']}")
    assert summary["client"]["retries"].get("429", 0) > 0 and summary["errors"] == 0


def test_sigkill_half_way_then_resume_labels_each_utterance_exactly_once(server, sample, tmp_path, reference):
    out = tmp_path / "labels.jsonl"
    args = [str(sample), "-o", str(out), "--url", server.base, "--concurrency", "1", "--chunk-size", "1"]
    args += ["--inflight", "1"]
    process = subprocess.Popen(
        [ERC, "label", *args, "--no-progress"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    manifest = parts_dir(out) / "manifest.json"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if manifest.is_file() and json.loads(manifest.read_text())["next_chunk"] >= 3:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = json.loads(manifest.read_text())
    assert not killed_at["complete"] and not out.exists(), killed_at
    assert 3 <= killed_at["next_ordinal"] < 8
    result = _erc_label(*args, "--resume")
    assert f"resumed after {killed_at['next_ordinal']} dialogues" in result.stdout
    rows = _rows(out)
    assert [(r["dialogue_id"], r["turn"]) for r in rows] == list(reference)
    _same_labels(rows, reference)


def test_local_ray_with_one_actor_gives_the_in_process_labels(sample, tmp_path, reference):
    pytest.importorskip("ray")
    small = _jsonl(tmp_path / "in.jsonl", sample.read_text().splitlines()[:3] + ["{bad"])
    out, stats = tmp_path / "labels.parquet", tmp_path / "stats.json"
    _erc_label(str(small), "-o", str(out), "--ray", "local", "--concurrency", "1", "--stats-json", str(stats))
    rows = _rows(out)
    ids = [json.loads(line)["id"] for line in small.read_text().splitlines()[:3]]
    assert [(r["dialogue_id"], r["turn"]) for r in rows] == [k for k in reference if k[0] in ids]
    _same_labels(rows, reference)
    assert [e["line"] for e in _rows(errors_path(out))] == [4]
    assert json.loads(stats.read_text())["mode"] == "ray"
