"""Checkpoints that survive crashes: written to a temporary folder, then renamed into place.

Layout of `checkpoints/step-<N>/`:
    model.safetensors   the trained weights (loading runs no code)
    ema.safetensors     the EMA weights
    state.pt            optimizer, EMA counter, RNG and data-stream states, step (tensors and
                        plain values only, so it loads with weights_only=True)
    config.json         the resolved run config
    data.json           what the network was trained on: example shape, classes (sampling
                        needs no dataset)
    manifest.json       SHA-256 of every other file, written last: a checkpoint without a
                        valid manifest, or whose files do not match it, is not used
A rename is atomic on POSIX file systems, so `step-<N>` either exists whole or not at all.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from difflab import pretrained
from difflab.config import ConfigError, RunConfig
from difflab.files import fsync_folder, sha256_file
from difflab.model import DataKind
from difflab.training.faults import tensor_bytes, write_failure

FILES = ("model.safetensors", "ema.safetensors", "state.pt", "config.json", "data.json")
# RUN/guide: autoguidance's companion net (train.guide_model) as a run directory of its own
COMPANION_FOLDER = "guide"


class CheckpointError(ConfigError):
    """No usable checkpoint: missing, corrupt or from another configuration."""


def _weights(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}


def save_checkpoint(
    ckpt_dir: Path,
    step: int,
    model: nn.Module,
    ema_model: nn.Module,
    state: dict,
    config: dict,
    data_info: dict,
    keep: int,
) -> Path:
    """Write checkpoints/step-<step> atomically and prune all but the newest `keep`. A failed
    write (disk full, read-only) removes its temporary folder and raises one line (TrainingFault)
    naming the path and about how many bytes it needed; the previous checkpoints stay whole."""
    final = ckpt_dir / f"step-{step}"
    tmp = ckpt_dir / f".tmp-step-{step}-{os.getpid()}"
    try:
        _write(ckpt_dir, tmp, step, model, ema_model, state, config, data_info)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_failure(final, e, tensor_bytes(model, ema_model, state)) from None
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    for old in list_checkpoints(ckpt_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _write(ckpt_dir, tmp, step, model, ema_model, state, config, data_info) -> None:
    """Every file of a checkpoint into the folder `tmp`, flushed to disk."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file(_weights(model), tmp / "model.safetensors")
    save_file(_weights(ema_model), tmp / "ema.safetensors")
    torch.save(state, tmp / "state.pt")
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (tmp / "data.json").write_text(json.dumps(data_info, indent=2) + "\n")
    manifest = {name: sha256_file(tmp / name) for name in FILES}
    (tmp / "manifest.json").write_text(json.dumps({"step": step, "sha256": manifest}, indent=2))
    fsync_folder(tmp)  # flush file contents before the rename publishes them


def publish_best(ckpt_dir: Path, source: Path, info: dict) -> Path:
    """Make checkpoints/best a copy of `source` (hard links: no extra disk) plus best.json.

    The copy is built under a temporary name and renamed into place; the previous best is moved
    aside first and deleted only after the new one is in place, so a crash leaves either the old
    or the new best whole (a leftover `.old-best-*` folder is the old one).
    """
    pid = os.getpid()
    tmp, old, best = ckpt_dir / f".tmp-best-{pid}", ckpt_dir / f".old-best-{pid}", ckpt_dir / "best"
    try:
        for leftover in (tmp, old):
            if leftover.exists():
                shutil.rmtree(leftover)
        shutil.copytree(source, tmp, copy_function=os.link)
        (tmp / "best.json").write_text(json.dumps(info, indent=2) + "\n")
        fsync_folder(tmp)
    except OSError as e:  # nothing was moved yet: the previous best is whole
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_failure(best, e, 4096, "publish") from None
    if best.exists():
        best.rename(old)
    tmp.rename(best)
    shutil.rmtree(old, ignore_errors=True)
    return best


def remove_leftovers(ckpt_dir: Path) -> list[str]:
    """Tidy what a process killed while writing left behind; returns the names it handled.

    `.tmp-*` folders are unpublished checkpoints (never read) and are deleted. A `.old-best-*`
    folder is the previous best, moved aside just before the new one was renamed in: it becomes
    `best` again if that rename never happened, else it is deleted. Call it only when no other
    process writes to `ckpt_dir`.
    """
    if not ckpt_dir.is_dir():
        return []
    handled = []
    for p in sorted(ckpt_dir.iterdir()):
        if p.name.startswith(".old-best-") and not (ckpt_dir / "best").exists():
            p.rename(ckpt_dir / "best")
        elif p.name.startswith((".tmp-", ".old-best-")):
            shutil.rmtree(p, ignore_errors=True)
        else:
            continue
        handled.append(p.name)
    return handled


def checkpoint_step(path: Path) -> int:
    """The training step a checkpoint folder holds (step-N or best)."""
    if path.name.startswith("step-") and path.name[5:].isdigit():
        return int(path.name[5:])
    return int(json.loads((path / "manifest.json").read_text())["step"])


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """step-N folders, oldest first (temporary folders are ignored)."""
    if not ckpt_dir.is_dir():
        return []
    found = []
    for p in ckpt_dir.iterdir():
        if p.is_dir() and p.name.startswith("step-") and p.name[5:].isdigit():
            found.append((int(p.name[5:]), p))
    return [p for _, p in sorted(found)]


def verify_checkpoint(path: Path) -> str | None:
    """None if the checkpoint is whole and matches its manifest, else what is wrong."""
    try:
        manifest = json.loads((path / "manifest.json").read_text())["sha256"]
    except (OSError, ValueError, KeyError):
        return "manifest.json is missing or unreadable"
    for name in FILES:
        if not (path / name).exists():
            return f"{name} is missing"
        if sha256_file(path / name) != manifest.get(name):
            return f"{name} does not match its recorded SHA-256 (truncated or corrupt)"
    return None


def latest_good_checkpoint(ckpt_dir: Path) -> Path:
    """The newest checkpoint that verifies; warns about each broken one it skips."""
    candidates = list_checkpoints(ckpt_dir)
    if not candidates:
        raise CheckpointError(
            f"no checkpoint found in {ckpt_dir}; train first with `difflab train` (a run "
            f"stopped before its first checkpoint continues with --resume {ckpt_dir.parent})"
        )
    for path in reversed(candidates):
        problem = verify_checkpoint(path)
        if problem is None:
            return path
        warnings.warn(
            f"skipping checkpoint {path}: {problem}; falling back to an earlier one", stacklevel=2
        )
    raise CheckpointError(
        f"every checkpoint in {ckpt_dir} is corrupt; the run cannot be resumed from one "
        f"(remove {ckpt_dir} and --resume {ckpt_dir.parent} trains it again from step 0)"
    )


# a key only one network family's state dict holds -> (its name, its model.name)
FAMILY_KEYS = {
    "patch_embed.weight": ("DiT", "dit"),  # the MMDiT too (model.dit.text=joint)
    "conv_in.weight": ("U-Net", "unet"),
    "inp.weight": ("MLP", "mlp"),
}


def _family(keys) -> tuple[str, str] | None:
    return next((family for key, family in FAMILY_KEYS.items() if key in keys), None)


def check_network_family(state: dict, module: nn.Module, where: Path) -> None:
    """CheckpointError, one line, when the weights at `where` are another network family's
    than `module` (a DiT's weights under a U-Net config, say), before torch lists every key."""
    theirs, ours = _family(state), _family(module.state_dict())
    if theirs and ours and theirs != ours:
        raise CheckpointError(
            f"the weights in {where} are a {theirs[0]}'s (model.name={theirs[1]}) but the config "
            f"builds a {ours[0]} (model.name={ours[1]}); set model.name={theirs[1]} (and its "
            f"model.{theirs[1]}.* settings) as the run that wrote them had, or use a {ours[0]}'s "
            "checkpoint"
        )


def load_weights(path: Path, module: nn.Module, which: str = "model") -> None:
    state = load_file(path / f"{which}.safetensors")
    check_network_family(state, module, path)
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(
            f"the weights in {path} do not fit the model built from the config ({e}); "
            "was the config changed since this checkpoint was written?"
        ) from None


def load_state(path: Path) -> dict:
    return torch.load(path / "state.pt", map_location="cpu", weights_only=True)


def load_config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


def load_data_info(path: Path) -> dict:
    """{"shape": [...], "num_classes": n, "class_names": [...]} of a checkpoint."""
    return json.loads((path / "data.json").read_text())


# Metadata keys of a weights file (`difflab export --format ema`): the run's config, data.json
# and step as JSON strings; the tensors are the EMA weights in half precision.
WEIGHTS_META = ("difflab_config", "difflab_data", "difflab_step")


def resolve_source(source: str | Path) -> Path:
    """Where a run is read from: a run directory or weights file as given, or the file shipped
    in the package that `pretrained:NAME` names (one line listing those shipped otherwise).
    Every command and the Python API read runs through here."""
    return pretrained.resolve(source) if pretrained.is_pretrained(source) else Path(source)


def is_weights_file(path: str | Path) -> bool:
    path = resolve_source(path)
    return path.suffix == ".safetensors" and path.is_file()


def weights_file_meta(path: Path) -> tuple[RunConfig, DataKind, int]:
    """The config, data kind and step a weights file carries in its metadata."""
    try:
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
        config, data, step = (json.loads(meta[k]) for k in WEIGHTS_META)
    except (OSError, ValueError, KeyError, SafetensorError) as e:
        raise ConfigError(
            f"{path} is not a difflab weights file ({type(e).__name__}: {e}); make one with "
            "`difflab export RUN --format ema --dtype fp16 --out FILE.safetensors`"
        ) from None
    return RunConfig.from_dict(config), DataKind.from_info(data), int(step)


def load_weights_file_into(path: Path, net: nn.Module) -> None:
    """A weights file's half-precision EMA weights, upcast to float32, into `net`; one line
    when they are another network's or do not fit its config."""
    state = {k: v.float() for k, v in load_file(path).items()}  # safetensors: no code runs
    check_network_family(state, net, path)
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        raise ConfigError(f"the weights in {path} do not fit its config: {e}"[:300]) from None
