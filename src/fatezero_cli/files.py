"""Writing files so that a reader never sees half of one, and hashing them.

Videos, cache shards, manifests and the model-hash memo are all written the
same way: to a temporary name beside the target, then renamed over it.
"""

from __future__ import annotations

import functools
import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

HASH_CHUNK_BYTES = 16 * 1024 * 1024


@functools.cache
def _umask() -> int:
    """Read once: setting and restoring it on every write would race with writer threads."""
    umask = os.umask(0)
    os.umask(umask)
    return umask


def replace_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write(temp)` on a temporary file beside `path`, then rename it over `path`.

    The temporary name keeps `path`'s suffix (encoders choose the container by it),
    and the file gets the ordinary permissions a new file would have, not a
    temporary file's private ones.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, name = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}"
    )
    os.close(descriptor)
    temporary = Path(name)
    try:
        write(temporary)
        temporary.chmod(0o666 & ~_umask())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_bytes_atomically(path: Path, data: bytes) -> None:
    """`data` at `path`, on disk (fsync) before the rename makes it visible."""

    def write(temporary: Path) -> None:
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())

    replace_atomically(path, write)


def private_dir_as_ordinary(path: Path) -> None:
    """A `tempfile.mkdtemp` folder that is about to become a user's output folder."""
    path.chmod(0o777 & ~_umask())


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()
