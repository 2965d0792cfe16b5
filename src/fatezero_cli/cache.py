"""The inversion cache: a content-addressed directory of safetensors files (DESIGN 4).

Layout of one cache::

    <root>/<key>/
        source.safetensors        frames (uint8), z0, source prompt embedding
        steps/t0001.safetensors   latent after the step at UNet timestep 1,
                                  and, for captured steps, every captured layer's input
        ...
        manifest.json             written last: without it the cache does not exist

Each file is written under a temporary name and renamed into place, and its
size and sha256 go into the manifest, so a reader can tell a complete cache
from an interrupted one and a damaged file from a good one.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import platformdirs
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from fatezero_cli import __version__
from fatezero_cli.errors import FatezeroError
from fatezero_cli.files import sha256_file, write_bytes_atomically

CACHE_FORMAT = 1
MANIFEST = "manifest.json"
KEY_LENGTH = 24


def default_cache_root() -> Path:
    """`$FATEZERO_CACHE`, else the platform's user cache directory."""
    env = os.environ.get("FATEZERO_CACHE")
    return Path(env) if env else Path(platformdirs.user_cache_dir("fatezero")) / "inversions"


def content_key(inputs: dict) -> str:
    """The cache key: a hash of every input that changes what inversion computes."""
    canonical = json.dumps({"format": CACHE_FORMAT, **inputs}, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:KEY_LENGTH]


def tensor_digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.contiguous().cpu().numpy().tobytes()).hexdigest()


def step_file(timestep: int) -> str:
    return f"steps/t{timestep:04d}.safetensors"


@contextlib.contextmanager
def cache_lock(root: Path, key: str) -> Iterator[None]:
    """One writer per key; a second `invert` of the same inputs waits, then finds a hit."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{key}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class CacheWriter:
    """Writes one cache step by step; only `finish` makes it visible as complete."""

    def __init__(self, root: Path, key: str) -> None:
        self.key = key
        self.path = root / key
        self.files: dict[str, dict] = {}
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fatezero-writer")
        self.pending: Future | None = None

    def start_clean(self) -> None:
        """An interrupted earlier run leaves files without a manifest: start over."""
        if self.path.exists():
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True)

    def write(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        data = save_safetensors({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
        write_bytes_atomically(self.path / name, data)
        self.files[name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}

    def write_behind(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        """Write on a thread while the next step computes; at most one file is in flight,
        so memory stays bounded whatever the number of steps."""
        self.flush()
        self.pending = self.pool.submit(self.write, name, tensors)

    def flush(self) -> None:
        """Wait for the file in flight; its error, if any, surfaces here."""
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.result()

    def finish(self, manifest: dict) -> dict:
        self.flush()
        self.pool.shutdown()
        manifest = {
            "format": CACHE_FORMAT,
            "tool": f"fatezero-cli {__version__}",
            "key": self.key,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **manifest,
            "files": self.files,
            "bytes": sum(entry["bytes"] for entry in self.files.values()),
        }
        write_bytes_atomically(self.path / MANIFEST, json.dumps(manifest, indent=1).encode())
        return manifest

    def abandon(self) -> None:
        if self.pending is not None:
            self.pending.cancel()
        self.pool.shutdown(wait=True)
        shutil.rmtree(self.path, ignore_errors=True)


@dataclass
class Cache:
    """A complete cache, opened read-only; many edits may read it at once."""

    path: Path
    manifest: dict

    @property
    def key(self) -> str:
        return self.manifest["key"]

    @property
    def timesteps(self) -> list[int]:
        """UNet timesteps of the inversion steps, ascending."""
        return self.manifest["timesteps"]

    @property
    def captured_timesteps(self) -> set[int]:
        return set(self.manifest["captured_timesteps"])

    @property
    def captured_layers(self) -> set[str]:
        return set(self.manifest["captured_layers"])

    @classmethod
    def open(cls, path: Path) -> Cache:
        manifest_path = path / MANIFEST
        if not path.is_dir():
            raise FatezeroError(f"no cache at {path}")
        if not manifest_path.is_file():
            raise FatezeroError(
                f"cache {path} is incomplete (no {MANIFEST}: an interrupted invert?); "
                "run invert again"
            )
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, ValueError) as error:
            raise FatezeroError(f"cache {path} has an unreadable {MANIFEST}: {error}") from None
        if manifest.get("format") != CACHE_FORMAT:
            raise FatezeroError(
                f"cache {path} has format {manifest.get('format')}, this tool reads "
                f"format {CACHE_FORMAT}; run invert again"
            )
        cache = cls(path, manifest)
        cache.check_files_present()
        return cache

    def check_files_present(self) -> None:
        """Cheap check at open: every listed file exists with its recorded size."""
        for name, entry in self.manifest["files"].items():
            file = self.path / name
            if not file.is_file():
                raise FatezeroError(f"cache {self.path} is damaged: {name} is missing")
            if file.stat().st_size != entry["bytes"]:
                raise FatezeroError(f"cache {self.path} is damaged: {name} has the wrong size")

    def load(self, name: str) -> dict[str, torch.Tensor]:
        """Read one file, checking its sha256 on the bytes already in memory."""
        entry = self.manifest["files"].get(name)
        if entry is None:
            raise FatezeroError(f"cache {self.path} has no {name}")
        try:
            data = (self.path / name).read_bytes()
        except OSError as error:
            raise FatezeroError(f"cache {self.path}: cannot read {name}: {error}") from None
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise FatezeroError(f"cache {self.path} is damaged: {name} fails its checksum")
        return load_safetensors(data)

    def verify(self) -> list[str]:
        """Every problem found by re-reading every file; empty when the cache is sound."""
        problems = []
        for name, entry in self.manifest["files"].items():
            file = self.path / name
            if not file.is_file():
                problems.append(f"{name}: missing")
                continue
            if sha256_file(file) != entry["sha256"]:
                problems.append(f"{name}: checksum mismatch")
        return problems

    def source(self) -> dict[str, torch.Tensor]:
        return self.load("source.safetensors")

    def step(self, timestep: int) -> dict[str, torch.Tensor]:
        return self.load(step_file(timestep))


class StepPrefetcher:
    """Loads the next step's file on a thread while the current step computes."""

    def __init__(self, cache: Cache, timesteps: list[int]) -> None:
        self.cache = cache
        self.order = list(timesteps)
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fatezero-prefetch")
        self.pending: dict[int, Future] = {}

    def get(self, timestep: int) -> dict[str, torch.Tensor]:
        future = self.pending.pop(timestep, None)
        data = future.result() if future else self.cache.step(timestep)
        if timestep not in self.order:
            return data
        index = self.order.index(timestep)
        if index + 1 < len(self.order):
            upcoming = self.order[index + 1]
            self.pending[upcoming] = self.pool.submit(self.cache.step, upcoming)
        return data

    def close(self) -> None:
        for future in self.pending.values():
            future.cancel()
        self.pool.shutdown(wait=True)


def resolve_cache(reference: str, root: Path) -> Path:
    """A cache directory path, a full key, or a unique key prefix (like git)."""
    as_path = Path(reference).expanduser()
    if (as_path.is_dir() and (as_path / MANIFEST).exists()) or os.sep in reference:
        return as_path
    if (root / reference).is_dir():
        return root / reference
    matches = [p for p in list_cache_dirs(root) if p.name.startswith(reference)]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise FatezeroError(f"no cache {reference!r} under {root} (see `fatezero cache list`)")
    raise FatezeroError(f"cache key prefix {reference!r} is ambiguous under {root}")


def list_cache_dirs(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
