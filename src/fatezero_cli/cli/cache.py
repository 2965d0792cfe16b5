"""`fatezero cache`: list, inspect, verify and remove inversion caches."""

from __future__ import annotations

import shutil
from pathlib import Path

import typer
from rich.table import Table

from fatezero_cli.cli import options as opt
from fatezero_cli.cli.common import cache_root, print_json
from fatezero_cli.errors import FatezeroError

app = typer.Typer(
    help="List, inspect, verify and remove inversion caches.",
    no_args_is_help=True,
    epilog="Example: fatezero cache list; fatezero cache verify 3f2a; fatezero cache rm 3f2a",
)


def human_bytes(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TB"


def describe(path: Path) -> dict:
    """One cache as a row: complete ones from their manifest, others marked incomplete."""
    from fatezero_cli.cache import MANIFEST, Cache, directory_bytes

    if not (path / MANIFEST).is_file():
        return {
            "key": path.name,
            "path": str(path),
            "complete": False,
            "bytes": directory_bytes(path),
        }
    try:
        cache = Cache.open(path)
    except FatezeroError as error:
        return {
            "key": path.name,
            "path": str(path),
            "complete": False,
            "error": str(error),
            "bytes": directory_bytes(path),
        }
    manifest = cache.manifest
    return {
        "key": cache.key,
        "path": str(path),
        "complete": True,
        "video": manifest["video"]["source"],
        "frames": manifest["video"]["frames"],
        "size": f"{manifest['video']['width']}x{manifest['video']['height']}",
        "steps": manifest["inputs"]["steps"],
        "source_prompt": manifest["inputs"]["source_prompt"],
        "model": manifest["model"].get("name"),
        "created": manifest["created"],
        "bytes": manifest["bytes"],
    }


@app.command("list")
def list_command(cache_dir: opt.CacheDir = None, json_: opt.Json = False) -> None:
    """List the caches under the cache directory."""
    from fatezero_cli.cache import list_cache_dirs

    root = cache_root(cache_dir)
    rows = [describe(path) for path in list_cache_dirs(root)]
    if json_:
        print_json({"root": str(root), "caches": rows})
        return
    table = Table(box=None)
    for column in ("key", "video", "frames", "steps"):
        table.add_column(column, no_wrap=True)
    table.add_column("prompt", overflow="fold")
    table.add_column("size", no_wrap=True)
    for row in rows:
        if row["complete"]:
            table.add_row(
                row["key"],
                Path(row["video"]).name,
                str(row["frames"]),
                str(row["steps"]),
                row["source_prompt"],
                human_bytes(row["bytes"]),
            )
        else:
            table.add_row(row["key"], "(incomplete)", "", "", "", human_bytes(row["bytes"]))
    typer.echo(f"{len(rows)} cache(s) in {root}")
    if rows:
        from rich.console import Console

        Console().print(table)


@app.command("info")
def info_command(key: str, cache_dir: opt.CacheDir = None, json_: opt.Json = False) -> None:
    """Show one cache's manifest summary (KEY: key, unique prefix or path)."""
    from fatezero_cli.cache import Cache, resolve_cache

    cache = Cache.open(resolve_cache(key, cache_root(cache_dir)))
    manifest = cache.manifest
    summary = {
        **describe(cache.path),
        "inputs": {k: v for k, v in manifest["inputs"].items() if k != "frames"},
        "model": manifest["model"],
        "captured_steps": len(manifest["captured_timesteps"]),
        "captured_layers": len(manifest["captured_layers"]),
        "files": len(manifest["files"]),
    }
    if json_:
        print_json(summary)
        return
    for name, value in summary.items():
        typer.echo(f"{name}: {human_bytes(value) if name == 'bytes' else value}")


@app.command("verify")
def verify_command(key: str, cache_dir: opt.CacheDir = None, json_: opt.Json = False) -> None:
    """Re-read every file of a cache and check it against its manifest checksums."""
    from fatezero_cli.cache import Cache, resolve_cache

    cache = Cache.open(resolve_cache(key, cache_root(cache_dir)))
    problems = cache.verify()
    if json_:
        print_json({"key": cache.key, "ok": not problems, "problems": problems})
    elif not problems:
        typer.echo(f"{cache.key}: ok ({len(cache.manifest['files'])} files)")
    if problems:
        raise FatezeroError(f"cache {cache.key} is damaged: " + "; ".join(problems))


@app.command("rm")
def remove_command(
    keys: list[str], cache_dir: opt.CacheDir = None, quiet: opt.Quiet = False
) -> None:
    """Remove caches (KEYS: keys, unique prefixes or paths)."""
    from fatezero_cli.cache import resolve_cache

    root = cache_root(cache_dir)
    paths = [resolve_cache(key, root) for key in keys]
    for path in paths:
        if not path.is_dir():
            raise FatezeroError(f"no cache at {path}")
    for path in paths:
        shutil.rmtree(path)
        if not quiet:
            typer.echo(f"removed {path}", err=True)
