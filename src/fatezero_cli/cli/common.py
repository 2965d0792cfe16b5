"""What the commands share: consoles, progress, loading inputs, writing outputs."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from fatezero_cli.errors import FatezeroError

stderr = Console(stderr=True, highlight=False, soft_wrap=True)


def say(message: str, quiet: bool) -> None:
    """A status line on stderr, so stdout stays for results."""
    if not quiet:
        stderr.print(message, markup=False)


def print_json(data: dict) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


@contextlib.contextmanager
def step_progress(label: str, quiet: bool) -> Iterator:
    """A rich progress bar on stderr; yields the `on_step(done, total)` callback."""
    progress = Progress(
        TextColumn("{task.description}", markup=False),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=stderr,
        disable=quiet,
        transient=False,
    )
    tasks = []

    def on_step(done: int, total: int) -> None:
        if not tasks:  # shown only once work starts: a cache hit shows no bar
            progress.start()
            tasks.append(progress.add_task(label, total=total))
        progress.update(tasks[0], completed=done, total=total)

    try:
        yield on_step
    finally:
        progress.stop()


def from_options(cls, options: dict, **overrides):
    """A dataclass of `cls`'s fields, picked by name from a command's parameters (`locals()`).

    Typer needs every option spelled out per command; this keeps the plumbing
    from each command to the shared code to one line.
    """
    return cls(**{**{f.name: options[f.name] for f in dataclasses.fields(cls)}, **overrides})


def slug(text: str, limit: int = 60) -> str:
    """A file-name-safe version of a prompt."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit].rstrip("-") or "edit"


def parse_blend(text: str | None) -> tuple[str, ...]:
    if text is None:
        return ()
    blend = tuple(word for word in text.split(" ") if word)
    if not blend:
        raise FatezeroError("--blend needs at least one word of the source prompt")
    return blend


def silence_libraries() -> None:
    """transformers and diffusers print their own warnings and bars; ours are enough."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for library in (diffusers_logging, transformers_logging):
        library.set_verbosity_error()
        library.disable_progress_bar()


def cache_root(option: Path | None) -> Path:
    from fatezero_cli.cache import default_cache_root

    return (option or default_cache_root()).expanduser()


def output_paths(
    output: Path | None, video_name: str, prompts: list[str], overwrite: bool
) -> list[Path]:
    """Where each edit goes; never an existing file unless --overwrite (then only if named)."""
    from fatezero_cli.video import output_kind, refuse_to_clobber, unique_path

    if output is not None and len(prompts) == 1:
        output_kind(output)
        refuse_to_clobber(output, overwrite)
        return [output]
    folder = output if output is not None else Path("outputs")
    if folder.exists() and not folder.is_dir():
        raise FatezeroError(f"-o {folder}: with several --edit prompts, -o names a folder")
    paths: list[Path] = []
    for index, prompt in enumerate(prompts):
        name = f"{video_name}-{slug(prompt)}"
        if any(path.stem == name for path in paths):
            name = f"{name}-{index}"
        candidate = folder / f"{name}.mp4"
        paths.append(candidate if overwrite and output is not None else unique_path(candidate))
    return paths
