"""The `fatezero` command: one Typer app, one module per command group.

Every mistake a user can fix is a `FatezeroError`, printed here as one line
on stderr with its exit code; a traceback means a bug.
"""

from __future__ import annotations

import errno
import functools
import os
import sys

import typer

from fatezero_cli import __version__
from fatezero_cli.cli import cache, edit, invert, run, tune
from fatezero_cli.errors import FatezeroError, Interrupted

# The libraries' own warnings and progress bars would bury ours; set before they are imported.
for variable, value in {
    "TRANSFORMERS_VERBOSITY": "error",
    "DIFFUSERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
}.items():
    os.environ.setdefault(variable, value)

EXIT_FAILURE = 1

app = typer.Typer(
    name="fatezero",
    help="Edit a real video from a text prompt with Stable Diffusion, zero-shot (FateZero).\n\n"
    "Invert once (the attention of every step is cached), then edit as often as you like.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def interruptible(command):
    """Ctrl-C becomes our one-line error and exit 130, not click's "Aborted!" and 1."""

    @functools.wraps(command)
    def run_command(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except KeyboardInterrupt:
            raise Interrupted("interrupted; no partial output or cache was kept") from None

    return run_command


app.command("invert", epilog=invert.EXAMPLE)(interruptible(invert.invert_command))
app.command("edit", epilog=edit.EXAMPLE)(interruptible(edit.edit_command))
app.command("run", epilog=run.EXAMPLE)(interruptible(run.run_command))
app.command("tune", epilog=tune.EXAMPLE)(interruptible(tune.tune_command))
app.add_typer(cache.app, name="cache")


def version_callback(value: bool) -> None:
    if value:
        typer.echo(f"fatezero-cli {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: bool = typer.Option(
        False, "--version", callback=version_callback, is_eager=True, help="Print the version."
    ),
) -> None:
    """Edit a real video from a text prompt with Stable Diffusion, zero-shot (FateZero)."""


def fail(message: str, code: int) -> None:
    sys.stderr.write(f"fatezero: error: {message}\n")
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    try:
        app(args=argv, prog_name="fatezero")
    except FatezeroError as error:
        fail(str(error), error.exit_code)
    except KeyboardInterrupt:
        fail("interrupted", Interrupted.exit_code)
    except OSError as error:
        if error.errno == errno.ENOSPC:
            fail(f"disk full: {error.filename or ''} (free space and run again)", EXIT_FAILURE)
        raise
