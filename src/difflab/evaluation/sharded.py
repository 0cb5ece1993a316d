"""`difflab sample` and `difflab eval` in many processes (torchrun, or --nproc N).

A sample depends only on (seed, index), so rank r of N draws the contiguous block of indices
`blocks(n, N, batch)[r]` with `Model.sample(start=...)`, and the blocks are gathered in rank
order: the samples one process draws, bit for bit on the CPU. Blocks are made of whole batches
when there are at least N of them, so every batch a process runs is a batch one process runs.
Feature extraction (judge, Inception) is split the same way by `Sharded`, for the samples and
for the reference, whose features are so computed once in all (1/N per rank) and written to the
cache by rank 0 alone; whether the cache is used is decided for all ranks together. Set-up
errors are agreed on (`agree`), so one rank says what is wrong and the others stop quietly;
rank 0 alone writes, after every rank has finished.
"""

from __future__ import annotations

import dataclasses
import itertools
import socket
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

from difflab import runs
from difflab.config import ConfigError, SampleConfig
from difflab.runs import LoadedRun
from difflab.training.distributed import World, env_world, fault_hook, join, uses_cuda

__all__ = ["PeerRefused", "Sharded", "agree", "blocks", "check_visible", "gather"]
__all__ += ["rank_device", "sample_shared", "sampling_world"]


class PeerRefused(ConfigError):
    """Another rank refused the input and said why; this one stops quietly with exit 2."""

    quiet = True


def blocks(n: int, size: int, batch_size: int = 1) -> list[tuple[int, int]]:
    """[start, stop) of each rank's contiguous share of n items, in rank order: whole batches of
    `batch_size` when there are at least `size` of them, else near-equal shares."""
    if n < size:
        raise ConfigError(
            f"{size} processes for {n} samples: each process needs at least one; "
            f"use --nproc {n} or fewer, or --n {size} or more"
        )
    unit = batch_size if -(-n // batch_size) >= size else 1
    units = -(-n // unit)
    edges = [min(n, unit * (units * r // size)) for r in range(size + 1)]
    return list(itertools.pairwise(edges))


def gather(part: Tensor, world: World, bounds: list[tuple[int, int]]) -> Tensor:
    """Every rank's `part` (its block of `bounds`, (stop - start, ...)) joined in rank order, on
    every rank (CPU); a single process returns `part`."""
    if world.size == 1:
        return part
    longest = max(b - a for a, b in bounds)
    padded = part.new_zeros((longest, *part.shape[1:]))  # all_gather needs equal shapes
    padded[: len(part)] = part
    padded = padded.to(world.device)
    parts = [torch.empty_like(padded) for _ in range(world.size)]
    dist.all_gather(parts, padded)
    return torch.cat([p[: b - a].cpu() for p, (a, b) in zip(parts, bounds, strict=True)])


def sampling_world(device: str) -> World:
    """The process group of a sample / eval command torchrun started (World() alone)."""
    return join(env_world(), device)


def rank_device(world: World, device: str) -> str:
    """The device this rank samples on: cuda:LOCAL_RANK when many processes use CUDA."""
    if world.size > 1 and uses_cuda(device):
        if device.startswith("cuda:"):
            raise ConfigError(f"--device {device} with many processes: use --device cuda or auto")
        return f"cuda:{world.local_rank}"
    return device


def agree(world: World, fn: Callable):
    """fn() on every rank; if it refuses bad input anywhere, the lowest such rank raises its
    error (one message) and the others PeerRefused (silent), so all stop with exit 2."""
    if world.size == 1:
        return fn()
    try:
        result, error = fn(), None
    except (ConfigError, ValueError, FileNotFoundError) as e:
        result, error = None, e
    failed = [False] * world.size
    dist.all_gather_object(failed, error is not None)
    if any(failed):
        first = failed.index(True)
        if world.rank == first:
            raise error
        raise PeerRefused(f"process rank {first} refused the input")
    return result


def check_visible(path: str | Path, world: World) -> None:
    """Refuse a run directory or file that this rank cannot see while another can, saying what
    to mount (every rank calls it: it is a collective). Seen by none: the caller's own message."""
    seen = [True] * world.size
    if world.size > 1:
        dist.all_gather_object(seen, Path(path).exists())
    if any(seen) and not seen[world.rank]:
        raise ConfigError(
            f"process rank {world.rank} on {socket.gethostname()} cannot see {path}: every node "
            "must see the run directory at the same path (mount the shared file system there), "
            "or run on the node that holds it"
        )


def sample_shared(
    run: LoadedRun,
    scfg: SampleConfig,
    world: World,
    labels: Tensor | None = None,
    progress: bool = False,
    edit=None,
) -> Tensor:
    """The scfg.n samples of `run` (conditions `labels`, drawn as one process would when None;
    an `Edit` of them), this rank drawing its block: on every rank, bit-identical to one
    process's draw."""
    if world.size == 1:
        return runs.draw_samples(run, scfg, labels=labels, progress=progress, edit=edit)
    if labels is None and run.model.kind.conditional:  # as Model.sample draws them
        labels = run.model.conditioner.request(scfg.n, seed=scfg.seed)
    bounds = blocks(scfg.n, world.size, scfg.batch_size)
    a, b = bounds[world.rank]
    share = dataclasses.replace(scfg, n=b - a)
    cond = labels[a:b] if labels is not None else None
    part = runs.draw_samples(
        run,
        share,
        labels=cond,
        start=a,
        progress=progress and world.is_main,
        edit=edit.rows(a, b) if edit is not None else None,
    )
    fault_hook(world, 0, "SAMPLE")
    return gather(part, world, bounds)


class Sharded:
    """A feature extractor whose features, logits and predictions are computed in blocks, one
    per rank (aligned to its batch size), and gathered: the values one process computes."""

    def __init__(self, extractor, world: World):
        self.inner, self.world = extractor, world
        self.writes_cache = world.is_main

    def __getattr__(self, name: str):  # name, weights_sha256, feature_dim, standard, ...
        return getattr(self.inner, name)

    def _split(self, fn: Callable, images: Tensor) -> Tensor:
        bounds = blocks(len(images), self.world.size, getattr(self.inner, "batch_size", 1))
        a, b = bounds[self.world.rank]
        return gather(fn(images[a:b]), self.world, bounds)

    def features(self, images: Tensor) -> Tensor:
        return self._split(self.inner.features, images)

    def logits(self, images: Tensor) -> Tensor:
        return self._split(self.inner.logits, images)

    def predict(self, images: Tensor) -> Tensor:
        return self._split(self.inner.predict, images)

    def all_ranks(self, flag: bool) -> bool:
        """True on every rank if `flag` is true on every rank (e.g. a cache hit)."""
        return not self.world.any(not flag)
