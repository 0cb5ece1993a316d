"""`run_benchmark`: one run measures the device's peak, then training, then sampling, with the two
libraries taking turns so that load changes on a shared machine hit both alike.

Stages:
1. Resolve the options (device, precision, batch sizes); time the first matmul-peak trials.
2. Build each side and warm it up (allocator, AdamW state, kernel choice, compilation),
   measuring its peak memory from before its network existed to the end of warm-up.
3. Count one training step's FLOPs (forward + backward) on the eager network.
4. Time training steps one at a time, alternating sides in ABBA order; a matmul-peak trial
   after each pair (the peak is the best trial).
5. Sampling: per (NFE budget, sampler), timed calls alternating sides, under inference_mode.
"""

from __future__ import annotations

import datetime
import os
import statistics
from collections.abc import Callable

import torch

from difflab.benchmark.diffusers_side import diffusers_side
from difflab.benchmark.measure import (
    MatmulPeak,
    count_flops,
    environment,
    peak_memory_growth,
    spec_sheet_peak,
    spread,
    synchronize,
    timed,
)
from difflab.benchmark.options import BenchOptions, Setup, resolve
from difflab.benchmark.sides import Side, difflab_side
from difflab.devices import keep_freed_memory
from difflab.samplers import steps_for_nfe
from difflab.share.mapping import NoEquivalent


def _first_line(e: Exception) -> str:
    lines = [line for line in str(e).splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:200]


def _uncompile(side: Side, setup: Setup, why: str) -> None:
    setup.warn(f"torch.compile: {side.name} {why}; measuring it uncompiled (eager)")
    side.run_net = side.net
    side.info["compiled"] = False


def _eager_on_failure(side: Side, setup: Setup, fn: Callable[[], object]) -> None:
    """Run fn; if the compiled network fails in it (torch.compile compiles on first use), warn,
    fall back to the eager network and run fn again."""
    try:
        fn()
    except Exception as e:
        if side.run_net is side.net:
            raise
        _uncompile(side, setup, f"failed ({_first_line(e)})")
        side.optimizer.zero_grad(set_to_none=True)
        fn()


def _warm_up(side: Side, setup: Setup) -> None:
    """Untimed training steps (at least one when compiling: that is when it compiles)."""
    side.net.train()
    steps = max(setup.opts.warmup, 1 if setup.opts.compile else 0)

    def run() -> None:
        for _ in range(steps):
            side.step()

    _eager_on_failure(side, setup, run)
    synchronize(setup.device)


def _built(builder: Callable[[], Side], setup: Setup) -> Side:
    """Build and warm up one side, measuring its peak memory."""

    def make() -> Side:
        side = builder()
        side.info["compiled"] = False
        if setup.opts.compile:
            try:
                side.run_net, side.info["compiled"] = torch.compile(side.net), True
            except Exception as e:
                _uncompile(side, setup, f"failed ({_first_line(e)})")
        _warm_up(side, setup)
        return side

    side, mb, method = peak_memory_growth(make, setup.device)
    side.info.update(peak_memory_mb=mb, peak_memory_method=method)
    return side


def _sides(setup: Setup) -> tuple[list[Side], str | None]:
    """difflab's side and, where there is one, diffusers'; else the reason there is none."""
    sides = [_built(lambda: difflab_side(setup), setup)]
    reason = None
    if not setup.opts.diffusers:
        reason = "--no-diffusers"
    else:
        try:
            import diffusers
        except ImportError:
            reason = "diffusers is not installed: pip install -e '.[bench]'"
            setup.warn(reason)
        else:
            try:
                sides.append(_built(lambda: diffusers_side(setup, diffusers), setup))
            except NoEquivalent as e:
                reason = str(e)
    compiled = [s.info["compiled"] for s in sides]
    if setup.opts.compile and any(compiled) and not all(compiled):  # compare like with like
        for side in sides:
            if side.info["compiled"]:
                _uncompile(side, setup, "runs eager too, since the other side could not compile")
                _warm_up(side, setup)
    return sides, reason


def _step_flops(side: Side) -> int:
    flops = count_flops(lambda: side.loss(side.net).backward())
    side.optimizer.zero_grad(set_to_none=True)
    return flops


def _training(sides: list[Side], setup: Setup, peak: MatmulPeak) -> dict:
    """Stages 3 and 4: FLOPs per step, then timed steps alternating sides (ABBA), with a matmul
    peak trial after each pair (the best trial is the peak)."""
    flops = {side.name: _step_flops(side) for side in sides}
    seconds: dict[str, list[float]] = {side.name: [] for side in sides}
    for i in range(setup.opts.steps):
        for side in sides if i % 2 == 0 else sides[::-1]:
            seconds[side.name].append(timed(side.step, setup.device))
        peak.trial()
    out = {}
    for side in sides:
        stats = spread(seconds[side.name])
        out[side.name] = {
            "library": side.label,
            "params": side.params,
            "images_per_s": setup.batch_size / stats["mean_s"],
            "step": stats,
            "flops_per_step": flops[side.name],
            "flop_per_s": flops[side.name] / stats["mean_s"],
            **side.info,
        }
    if len(sides) == 2:
        a, b = (seconds[s.name] for s in sides)
        ours, theirs = out["difflab"]["images_per_s"], out["diffusers"]["images_per_s"]
        out["ratio_images_per_s"] = ours / theirs
        # each pair of steps ran back to back, so its ratio sees nearly the same load
        out["median_step_pair_ratio"] = statistics.median(y / x for x, y in zip(a, b, strict=True))
    return out


def _fractions(training: dict, peaks: dict, setup: Setup) -> None:
    """Achieved FLOP/s as a share of the measured peak (and of the spec sheet, if listed)."""
    for row in training.values():
        if not isinstance(row, dict) or "flop_per_s" not in row:
            continue
        row["fraction_of_measured_peak"] = row["flop_per_s"] / peaks["measured"]["flop_per_s"]
        spec = peaks["spec_sheet"]
        row["fraction_of_spec_sheet"] = row["flop_per_s"] / spec["flop_per_s"] if spec else None
        if row["fraction_of_measured_peak"] > 1 and setup.device.type == "cpu":
            setup.warn(
                f"{row['library']} ran above the measured matmul peak: the matmul is too small "
                "(--matmul-size) or the machine was busier during every peak trial than during "
                "training; the shares of the peak are not reliable"
            )


def _sampling_row(
    name: str, nfe: int, sides: list[Side], seconds: dict, calls: dict, setup: Setup
) -> dict:
    row = {"sampler": name, "nfe_budget": nfe, "steps": steps_for_nfe(name, nfe, setup.cfg.sample)}
    for side in sides:
        if side.name not in seconds:  # diffusers has no scheduler for this sampler
            row[side.name] = None
            continue
        stats = spread(seconds[side.name])
        row[side.name] = {
            "ms_per_image": 1e3 * stats["mean_s"] / setup.sample_batch,
            "nfe": calls[side.name],
            "runs": side.samplers[name],
            "call": stats,
            "compiled": side.info["compiled"],
        }
    row.setdefault("diffusers", None)  # no diffusers side at all
    a, b = row["difflab"], row["diffusers"]
    row["ratio_ms_per_image"] = a["ms_per_image"] / b["ms_per_image"] if b else None
    return row


def _sampling(sides: list[Side], setup: Setup) -> list[dict]:
    """Stage 5: ms per image for each sampler and NFE budget, sides alternating."""
    o, turn, rows = setup.opts, 0, []
    for side in sides:
        side.net.eval()
    with torch.inference_mode(), setup.autocast():
        for name in o.samplers:  # untimed: eval-mode kernels, recompiling, scheduler setup
            for side in sides:
                if name in side.samplers:
                    once = lambda side=side, name=name: side.sample(name, 1)  # noqa: E731
                    _eager_on_failure(side, setup, once)
        for nfe in o.nfe:
            for name in o.samplers:
                able = [side for side in sides if name in side.samplers]
                seconds: dict[str, list[float]] = {side.name: [] for side in able}
                calls: dict[str, int] = {}
                for _ in range(o.sample_rounds):
                    for side in able if turn % 2 == 0 else able[::-1]:

                        def run(side=side, name=name, nfe=nfe, calls=calls) -> None:
                            calls[side.name] = side.sample(name, nfe)

                        seconds[side.name].append(timed(run, setup.device))
                    turn += 1
                rows.append(_sampling_row(name, nfe, sides, seconds, calls, setup))
    return rows


def _settings(setup: Setup, sides: list[Side]) -> dict:
    o = setup.opts
    return {
        "batch_size": setup.batch_size,
        "steps": o.steps,
        "warmup": o.warmup,
        "precision": {"requested": o.precision, "used": setup.precision},
        "compile": {
            "requested": o.compile,
            "used": {side.name: side.info["compiled"] for side in sides},
        },
        "channels_last": setup.channels_last,
        "samplers": list(o.samplers),
        "nfe": list(o.nfe),
        "sample_batch": setup.sample_batch,
        "sample_rounds": o.sample_rounds,
        "sampling_spacing": setup.cfg.sample.spacing,
        "seed": o.seed,
        "shape": list(setup.shape),
        "classes": setup.classes,
    }


def run_benchmark(opts: BenchOptions) -> dict:
    """Measure difflab (and diffusers, where it has an equivalent) on one configuration.

    Args:
        opts: what to measure; bad values raise ConfigError with a one-line message.
    Returns:
        a JSON-ready dict: environment, settings, device peaks, training (per library:
        images/s, step-time spread, FLOPs, FLOP/s, fraction of peak, peak memory) and
        sampling rows (ms per image per sampler and NFE budget), with difflab/diffusers ratios.
    """
    threads = torch.get_num_threads()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    try:
        setup = resolve(opts)
        env = environment(setup.device)
        env["allocator"] = f"glibc keep_freed_memory: {keep_freed_memory()}"
        dtype = setup.dtype or torch.float32
        peak = MatmulPeak(setup.device, dtype, setup.matmul_size)
        for _ in range(3):
            peak.trial()
        sides, reason = _sides(setup)
        training = _training(sides, setup, peak)
        peaks = {"measured": peak.result(), "spec_sheet": spec_sheet_peak(setup.device, dtype)}
        _fractions(training, peaks, setup)
        if len(sides) == 1:
            training["diffusers"] = {"available": False, "reason": reason}
        sampling = _sampling(sides, setup)
    finally:
        torch.set_num_threads(threads)
    if len(sides) == 2:
        env["diffusers"] = sides[1].label.split()[-1]
    env["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "benchmark": "difflab bench",
        "config": opts.name,
        "preset": setup.cfg.preset,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "environment": env,
        "settings": _settings(setup, sides),
        "peak": peaks,
        "training": training,
        "sampling": sampling,
        "notes": setup.notes,
    }
