"""Writes that a crash cannot leave half done: every file that matters goes to a temporary name
in its own folder, is flushed to disk, then renamed. A write that fails midway (a full disk, an
exception, Ctrl-C) leaves the previous file byte for byte and no temporary file behind."""

import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageSequence

from difflab import files
from difflab.benchmark import report as bench_report
from difflab.config import RunConfig, apply_overrides, preset
from difflab.report.gifs import denoising_gif, reverse_gif
from difflab.share.folders import publish_folder


def _fail_midway(monkeypatch, owner, name: str):
    """Make owner.name write its file, cut it to half its bytes and raise ENOSPC, as a disk
    that fills up during the write would; returns the paths it was asked to write."""
    real, seen = getattr(owner, name), []

    def half_then_fail(self_or_path, *args, **kwargs):
        real(self_or_path, *args, **kwargs)
        path = Path(args[0] if isinstance(self_or_path, Image.Image) else self_or_path)
        seen.append(path)
        data = path.read_bytes()
        assert len(data) > 1, "nothing written: the test would not test a partial file"
        path.write_bytes(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(owner, name, half_then_fail)
    return seen


def _folder_holds(folder: Path, *names: str) -> None:
    assert sorted(p.name for p in folder.iterdir()) == sorted(names)


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "a.bin"
    path.write_bytes(b"old contents")

    def write(tmp: Path) -> None:
        tmp.write_bytes(b"new con")  # some bytes, then the failure
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        files.replace_atomically(path, write)
    assert path.read_bytes() == b"old contents"
    _folder_holds(tmp_path, "a.bin")
    files.replace_atomically(path, lambda tmp: tmp.write_bytes(b"new contents"))
    assert path.read_bytes() == b"new contents"
    _folder_holds(tmp_path, "a.bin")


def test_the_file_is_flushed_before_it_is_renamed_into_place(tmp_path, monkeypatch):
    """fsync of the temporary, then the rename, then the folder's entry: in that order."""
    events, real_fsync, real_replace = [], os.fsync, os.replace
    monkeypatch.setattr(
        files.os, "fsync", lambda fd: events.append(("fsync", fd)) or real_fsync(fd)
    )
    monkeypatch.setattr(
        files.os,
        "replace",
        lambda a, b: events.append(("replace", Path(b).name)) or real_replace(a, b),
    )
    files.write_text_atomically(tmp_path / "x.json", "{}\n")
    assert [e[0] for e in events] == ["fsync", "replace", "fsync"]
    assert events[1] == ("replace", "x.json")


def test_the_run_config_is_never_half_written(tmp_path, monkeypatch):
    path = tmp_path / "config.json"
    old = preset("toy2d")
    old.save(path)
    before = path.read_bytes()
    _fail_midway(monkeypatch, Path, "write_text")
    with pytest.raises(OSError, match="No space left"):
        apply_overrides(old, ["train.steps=7"]).save(path)
    assert path.read_bytes() == before and RunConfig.load(path) == old
    _folder_holds(tmp_path, "config.json")
    monkeypatch.undo()
    apply_overrides(old, ["train.steps=7"]).save(path)
    assert RunConfig.load(path).train.steps == 7
    _folder_holds(tmp_path, "config.json")


def _gif_frames(path: Path) -> list[bytes]:
    with Image.open(path) as gif:
        return [frame.convert("RGB").tobytes() for frame in ImageSequence.Iterator(gif)]


@pytest.mark.parametrize("kind", ["denoising", "reverse"])
def test_a_gif_is_never_half_written(tmp_path, monkeypatch, kind):
    """`difflab sample --gif` and the report's GIFs write through these two functions."""
    rng = np.random.default_rng(0)
    ts = np.linspace(1, 0.1, 4)

    def write(scale: float) -> Path:
        if kind == "denoising":
            xs = np.clip(rng.standard_normal((5, 2, 1, 8, 8)) * scale, -1, 1).astype(np.float32)
            return denoising_gif(ts, xs, xs[1:], tmp_path / "d.gif")
        xs = (rng.standard_normal((5, 50, 2)) * scale).astype(np.float32)
        return reverse_gif(ts, xs, tmp_path / "d.gif")

    path = write(1.0)
    old = _gif_frames(path)
    seen = _fail_midway(monkeypatch, Image.Image, "save")
    with pytest.raises(OSError, match="No space left"):
        write(0.5)
    assert seen and all(p != path for p in seen)  # PIL wrote a temporary, never the GIF
    assert _gif_frames(path) == old
    _folder_holds(tmp_path, "d.gif")
    monkeypatch.undo()
    assert _gif_frames(write(0.5)) != old
    _folder_holds(tmp_path, "d.gif")


def test_benchmark_results_are_never_half_written(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_report, "markdown", lambda result: f"| ms | {result['ms']} |\n")
    result = {"config": "toy2d", "environment": {"device": "cpu"}, "ms": 1.5}
    json_path, md_path = bench_report.write_results(result, tmp_path)
    old = json_path.read_bytes(), md_path.read_bytes()
    _fail_midway(monkeypatch, Path, "write_text")
    with pytest.raises(OSError, match="No space left"):
        bench_report.write_results({**result, "ms": 2.5}, tmp_path)
    assert (json_path.read_bytes(), md_path.read_bytes()) == old
    assert json.loads(json_path.read_text())["ms"] == 1.5
    _folder_holds(tmp_path, json_path.name, md_path.name)


def test_a_published_folder_is_whole_flushed_or_absent(tmp_path, monkeypatch):
    out = tmp_path / "out"

    def write(tmp: Path) -> None:
        (tmp / "sub").mkdir()
        (tmp / "a.txt").write_text("a")
        (tmp / "sub" / "b.txt").write_text("b")

    flushed, real_fsync = set(), os.fsync
    monkeypatch.setattr(
        files.os,
        "fsync",
        lambda fd: flushed.add(Path(os.readlink(f"/proc/self/fd/{fd}")).name) or real_fsync(fd),
    )
    publish_folder(out, False, write)
    assert {"a.txt", "b.txt"} <= flushed  # every file reached the disk before the rename
    _folder_holds(tmp_path, "out")

    def broken(tmp: Path) -> None:
        (tmp / "a.txt").write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError):
        publish_folder(out, True, broken)
    assert (out / "a.txt").read_text() == "a" and (out / "sub" / "b.txt").read_text() == "b"
    _folder_holds(tmp_path, "out")
