"""Draw reflow's (noise, ODE endpoint) pairs from a trained flow, resumably (Liu et al. 2023,
Algorithm 1, "Reflow": Z_1 = ODE[v_k](Z_0) for Z_0 ~ N(0, I)).

Pair i is (x_T of sample i, the deterministic sampler's endpoint from it): x_T is SampleNoise
stream 0 row i scaled by prior_std, exactly what `Model.sample` starts from, so a chunk depends
only on (seed, its indices) and the sampler. Chunks of `chunk` pairs are written one by one as
RUN/reflow/<key>/chunk-NNNNN.npz (atomically), after pairs.json names what draws them; a killed
drawing is resumed by running the same command, which skips finished chunks and draws the rest,
giving the same pairs as an uninterrupted one. A weights file (`pretrained:NAME`, `export --format
ema`) has no folder of its own, and a shipped one lies in the installed package: its pairs go in
a folder beside the reflow run that stands in for it (`pairs_home`).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch

from difflab.config import ConfigError, SampleConfig
from difflab.data.pairs import chunk_paths
from difflab.files import savez_atomically, write_text_atomically
from difflab.samplers import SampleNoise, sampler_info, timesteps
from difflab.samplers.progress import progress_bar


def check_flow_run(model, scfg: SampleConfig) -> None:
    """Refuse reflow on a model that is not a flow, or with a stochastic sampler."""
    if model.denoiser.kind != "velocity":
        raise ConfigError(
            f"reflow needs a flow model (diffusion.prediction=velocity on a flow path such as "
            f"diffusion.schedule=rectified); this run is prediction={model.denoiser.kind} on "
            f"the {model.schedule.name} schedule"
        )
    info = sampler_info(scfg.sampler)
    if not info.deterministic or scfg.eta > 0 or scfg.s_churn > 0:
        raise ConfigError(
            f"reflow pairs need a deterministic sampler (an ODE solver: the pair is the ODE's "
            f"endpoint); {scfg.sampler} with these options draws fresh noise every step: use "
            "--sampler euler, heun, dpmpp_2m or unipc (no --eta, no --churn)"
        )


def pairs_key(scfg: SampleConfig, n: int, chunk: int, use_ema: bool) -> dict:
    """What decides the pairs: the weights (EMA or raw: what the loaded run holds), the sampler
    and its options, grid, seed, guidance, precision and count."""
    keep = ("sampler", "steps", "spacing", "t_end", "shift", "seed", "guidance", "precision")
    key = {k: getattr(scfg, k) for k in keep}
    key.update(sampler_info(scfg.sampler).options_from(scfg), n=n, chunk=chunk, use_ema=use_ema)
    return key


def source_name(source: Path) -> str:
    """A reflow source's name: a run folder's, or a weights file's without its suffixes."""
    return source.name if source.is_dir() else source.name.split(".")[0]


def pairs_home(source: Path, out_dir: Path) -> Path:
    """The folder whose reflow/ holds a source's pairs: the source run's own folder, or for a
    weights file RUNS/<its name>-pairs beside the reflow run RUNS/NAME (`out_dir`)."""
    return source if source.is_dir() else out_dir.parent / f"{source_name(source)}-pairs"


def pairs_folder(run_dir: Path, key: dict) -> Path:
    name = f"{key['sampler']}-{key['steps']}-seed{key['seed']}-n{key['n']}"
    if key["guidance"] != 1.0:
        name += f"-w{key['guidance']:g}"
    return run_dir / "reflow" / name


@torch.no_grad()
def draw_pairs(
    run,
    scfg: SampleConfig,
    n: int,
    chunk: int = 5000,
    progress: bool = True,
    home: Path | None = None,
) -> Path:
    """Draw (or finish drawing) n pairs of a loaded flow run; returns their folder.

    Args:
        run: a loaded run (runs.load_run) of a flow model.
        scfg: the deterministic sampler, steps, grid, seed and guidance of the pairs.
        n: number of pairs; chunk: pairs per file.
        home: the folder whose reflow/ holds them (default: the run's folder; `pairs_home`).
    """
    model = run.model
    check_flow_run(model, scfg)
    if n < 1 or chunk < 1:
        raise ConfigError(f"--pairs and --chunk must be >= 1, got {n} and {chunk}")
    key = pairs_key(scfg, n, chunk, run.ema)
    folder = pairs_folder(home or run.run_dir, key)
    meta = {
        **key,
        "chunks": -(-n // chunk),
        "source": str(run.checkpoint),
        "shape": list(model.kind.shape),
        "num_classes": model.kind.num_classes,
        "class_names": list(model.kind.class_names),
    }
    meta_path = folder / "pairs.json"
    if meta_path.is_file():
        old = json.loads(meta_path.read_text())
        if old.get("source") != meta["source"]:
            raise ConfigError(
                f"{folder} holds pairs of {old.get('source')}, not of {run.checkpoint}; move it "
                "away to draw new pairs"
            )
    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomically(meta_path, json.dumps(meta, indent=2) + "\n")
    ts = timesteps(model.schedule, scfg.steps, scfg.spacing, scfg.t_end or None, scfg.shift)
    prior_std = model.schedule.prior_std(float(ts[0]))
    shape = model.codec.latent_shape(model.kind.shape)
    labels = model.conditioner.balanced(n)
    done = {p.name for p in chunk_paths(folder)}
    bar = progress_bar(
        total=meta["chunks"], desc="reflow pairs", unit="chunk", disable=not progress
    )
    for k in range(meta["chunks"]):
        path = folder / f"chunk-{k:05d}.npz"
        if path.name not in done:
            start, size = k * chunk, min(chunk, n - k * chunk)
            noise = SampleNoise(scfg.seed, start).randn((size, *shape), 0, "cpu") * prior_std
            y = labels[start : start + size] if labels is not None else None
            part = dataclasses.replace(scfg, n=size, batch_size=min(size, scfg.batch_size))
            x = model.sample(part, cond=y, start=start)
            arrays = {"noise": noise.float().numpy(), "x": x.numpy()}
            if y is not None:
                arrays["labels"] = y.numpy().astype(np.int64)
            savez_atomically(path, **arrays)
        bar.update(1)
    bar.close()
    return folder
