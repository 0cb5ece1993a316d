"""Small file helpers shared by checkpoints, judges, caches and every output: hashing, and
writes that a crash leaves whole or absent (a temporary sibling, flushed to disk, renamed)."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from difflab.errors import ConfigError

__all__ = [
    "check_writable",
    "fsync_folder",
    "replace_atomically",
    "savez_atomically",
    "sha256_file",
    "write_text_atomically",
]


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks (weights files can be hundreds of MB)."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def replace_atomically(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call write(tmp) on a temporary name in the same folder, flush it to disk, then rename it to
    `path`: a crash leaves the old file or the new one, never half a file. The temporary file is
    removed if `write` fails."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with tmp.open("rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_entry(path.parent)  # the rename itself survives a power cut


def fsync_folder(folder: str | Path) -> None:
    """Flush every file under `folder` (and the folders' entries) to disk: call it before a
    folder built under a temporary name is renamed into place, so the rename never publishes
    files whose contents are still only in memory."""
    folder = Path(folder)
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not path.is_symlink():
            with path.open("rb") as f:
                os.fsync(f.fileno())
    for sub in [folder, *(p for p in folder.rglob("*") if p.is_dir())]:
        _fsync_entry(sub)


def _fsync_entry(folder: Path) -> None:
    """Flush a folder's entries (names, renames); a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text_atomically(path: str | Path, text: str) -> None:
    """Write a text file through replace_atomically (Ctrl-C leaves the old file or the new)."""
    replace_atomically(path, lambda tmp: tmp.write_text(text))


def savez_atomically(path: str | Path, **arrays) -> None:
    """numpy.savez through replace_atomically."""
    import numpy as np

    def write(tmp: Path) -> None:
        with tmp.open("wb") as f:  # a file object: np.savez would add ".npz" to a bare name
            np.savez(f, **arrays)

    replace_atomically(path, write)


def check_writable(folder: str | Path, what: str) -> None:
    """Refuse, before any work, a folder that outputs cannot be written in: `folder` itself, or
    for one yet to be made its nearest existing parent. Raises ConfigError naming `what` (the
    flag and value that chose it) and the fix; leaves nothing behind."""
    folder = Path(folder).absolute()
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{what}: {existing} is a file, not a folder; choose another path")
    try:
        _probe_write(existing)
    except OSError as e:
        raise ConfigError(
            f"{what}: cannot write in {existing} ({e.strerror or e}); make it writable or choose "
            "another folder"
        ) from None


def _probe_write(folder: Path) -> None:
    """Create and drop a nameless file in `folder` (the kernel's answer, not os.access's guess:
    a read-only mount, permissions, an ACL)."""
    with tempfile.TemporaryFile(dir=folder):
        pass
