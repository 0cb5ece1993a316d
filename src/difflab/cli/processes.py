"""`difflab sample` and `difflab eval` in many processes: --nproc N relaunches the command
through training/distributed.py's launcher; under torchrun each process joins the group, and a
rank that loses a peer leaves with one line (the launcher names the rank that failed)."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import contextmanager

from difflab.config import ConfigError


def relaunch(args: argparse.Namespace) -> int | None:
    """The exit code of this command run again in --nproc N processes, or None to run it here
    (no --nproc, --nproc 1, or already one of torchrun's processes)."""
    from difflab.training.distributed import env_world, launch

    if args.nproc is None:
        return None
    if env_world().size > 1:
        raise ConfigError("--nproc starts its own processes; leave it out under torchrun")
    if args.nproc < 1:
        raise ConfigError(f"--nproc must be >= 1, got {args.nproc}")
    if args.nproc == 1:
        return None
    return launch(without_nproc(args.argv), args.nproc)


def without_nproc(argv: list[str]) -> list[str]:
    """argv less its --nproc N (or --nproc=N)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def everywhere(message: str) -> ConfigError:
    """A refusal every rank reaches alike: printed by rank 0 alone."""
    error = ConfigError(message)
    error.everywhere = True
    return error


@contextmanager
def peers(world) -> Iterator[None]:
    """Leave with one line (exit 3) when a collective fails because another rank died."""
    from difflab.training.distributed import leave_after_lost_peer, lost_peer, shutdown

    try:
        yield
    except RuntimeError as e:
        if world.size == 1 or not lost_peer(e):
            shutdown(world)
            raise
        leave_after_lost_peer(world)
    except BaseException:  # bad input (agreed by every rank): tear the group down first, or
        shutdown(world)  # gloo's threads abort the interpreter's exit (SIGABRT)
        raise
    world.barrier()  # rank 0 has written: nobody leaves a peer mid-collective
    shutdown(world)
