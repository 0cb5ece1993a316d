"""Outputs written whole or not at all: a folder built under a temporary name, flushed to disk
(`files.fsync_folder`), then renamed into place. A single file goes through
`files.replace_atomically`, after `check_target`."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

from difflab.config import ConfigError
from difflab.files import fsync_folder


def check_target(out: Path, force: bool) -> None:
    """Refuse an output that exists and is not empty unless `force`."""
    if out.is_file() and not force:
        raise ConfigError(f"{out} exists; pass --force to replace it")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ConfigError(f"{out} exists and is not empty; pass --force to replace it")


def publish_folder(out: Path, force: bool, write: Callable[[Path], None]) -> Path:
    """Call write(tmp) on a fresh temporary folder beside `out`, then rename it to `out`
    (replacing an existing `out` only with `force`). A failure leaves `out` as it was."""
    out = Path(out)
    check_target(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".tmp-{out.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write(tmp)
        fsync_folder(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.is_dir():
        old = out.parent / f".old-{out.name}-{os.getpid()}"
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        if out.exists():
            out.unlink()
        tmp.rename(out)
    return out
