"""``erc label``'s body (``service/cli.py`` registers the command and imports this lazily)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from labeling.backends import LabelRunError
from labeling.readers import Columns, InputError
from labeling.run import Options, Summary, label, write_stats
from labeling.store import parts_dir


def main(
    input: Path,
    output: Path,
    *,
    url: str | None,
    ray: str | None,
    concurrency: int | None,
    label_set: str | None,
    input_format: str | None,
    columns: Columns,
    chunk_size: int,
    inflight: int,
    resume: bool,
    overwrite: bool,
    progress: bool,
    stats_json: Path | None,
    actor_cpus: float,
    actor_gpus: float = 0.0,
) -> None:
    if url and ray:
        raise _fail("--url and --ray are two ways to run: pass one")
    if not input.is_file():
        raise _fail(f"{input} is not a file")
    options = Options(
        input=input,
        output=output,
        input_format=input_format,
        columns=columns,
        chunk_utterances=chunk_size,
        inflight=inflight,
        resume=resume,
        overwrite=overwrite,
        progress=progress,
    )
    try:
        if ray:
            from labeling.ray_job import label_with_ray

            if resume:
                raise InputError("--resume is for the in-process and --url runs; a Ray run retries failed tasks itself")
            summary = label_with_ray(options, ray, label_set, concurrency or 1, actor_cpus, actor_gpus)
        elif url:
            from labeling.run import remote_backend

            summary = label(options, remote_backend(url, label_set, concurrency or 8), "url")
        else:
            from labeling.run import in_process_backend

            summary = label(options, in_process_backend(label_set), "in-process")
    except InputError as exc:
        raise _fail(str(exc)) from None
    except LabelRunError as exc:
        raise _fail(f"{exc}{_resumable(output)}") from None
    except KeyboardInterrupt:
        typer.echo(f"interrupted{_resumable(output)}", err=True)
        raise typer.Exit(130) from None
    _report(summary, stats_json)


def _resumable(output: Path) -> str:
    """What a stopped run leaves: committed chunks to resume from, or nothing."""
    manifest = parts_dir(output) / "manifest.json"
    if manifest.is_file() and json.loads(manifest.read_text()).get("next_chunk", 0) > 0:
        return "; the chunks committed so far are kept: rerun with --resume to continue"
    return ""


def _report(summary: Summary, stats_json: Path | None) -> None:
    for line in summary.lines():
        typer.echo(line)
    if stats_json is not None:
        write_stats(summary, stats_json)


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(1)
