"""`difflab sample`, `difflab plot` and `difflab bench`."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from difflab.cli.edit import edit_meta, read_edit
from difflab.cli.processes import peers, relaunch
from difflab.cli.sample_flags import ema_choice, sample_config
from difflab.cli.text import read_prompts, sample_conditions
from difflab.config import ConfigError, guidance_record
from difflab.files import check_writable


def cmd_sample(args: argparse.Namespace) -> int:
    """Draw samples into --out (and a PNG grid for images); in N processes (torchrun or
    --nproc N) each draws its block of indices and rank 0 writes the same files one would."""
    from difflab.evaluation.sharded import sampling_world

    code = relaunch(args)
    if code is not None:
        return code
    world = sampling_world(args.device)
    with peers(world):
        _sample(args, world)
    return 0


def _sample(args: argparse.Namespace, world) -> None:
    from difflab.evaluation.sharded import agree, blocks, check_visible, rank_device, sample_shared
    from difflab.runs import attach_guide, load_run, save_samples
    from difflab.samplers.editing import check_edit
    from difflab.training.faults import out_of_memory

    def prepare():
        check_visible(args.run, world)
        if Path(args.out).suffix != ".npz":
            raise ConfigError(f"--out must end in .npz, got {args.out}")
        check_writable(Path(args.out).parent, f"--out {args.out}")
        device = rank_device(world, args.device)
        run = load_run(
            args.run, checkpoint=args.checkpoint, use_ema=ema_choice(args), device=device
        )
        if run.model.kind.autoencoder:  # no sampler, no editing: a codec of latent runs
            raise ConfigError(
                f"{args.run} is an autoencoder run (the first stage of latent diffusion): it "
                "draws no samples and inpaints nothing; sample a latent run trained on it "
                f"(--set model.codec={args.run})"
            )
        edit = read_edit(args, run.model.kind.shape)
        if edit is not None and args.n is None:  # one sample per init image
            args.n = len(edit.init)
        scfg = sample_config(run.cfg.sample, args)
        scfg, labels, prompts = sample_conditions(run, scfg, read_prompts(args), *classes)
        if args.gif and prompts is None:
            raise ConfigError(
                "--gif draws a denoising GIF per prompt of a text model; this run takes no "
                "prompts: leave out --gif (`difflab plot RUN` draws its figures and GIFs)"
            )
        blocks(scfg.n, world.size)
        attach_guide(run, scfg).model.check_sample(scfg)  # the guidance method too, up front
        if edit is not None:  # every problem of the edit before any work
            check_edit(edit, scfg.n, run.model.kind.shape)
        return run, scfg, labels, prompts, edit

    classes = (args.class_label, args.per_class)
    run, scfg, labels, prompts, edit = agree(world, prepare)
    start = time.perf_counter()
    batch, advice = f"--batch-size {scfg.batch_size}", "a smaller --batch-size (same samples)"
    with out_of_memory("sampling", batch, advice):
        samples = sample_shared(run, scfg, world, labels, progress=not args.quiet, edit=edit)
    if not world.is_main:  # rank 0 alone writes
        return
    if prompts is not None:  # the prompts, not their token conditions, go into the file
        labels = None
    meta = samples_meta(run, scfg, prompts)
    if edit is not None:
        latent = run.model.kind.codec == "latent"
        meta.update(edit_meta(edit, args.init, args.mask, latent))
        if edit.mask is not None and latent:  # the decoder redraws every pixel, the known too
            print(
                "difflab: a latent run keeps the mask in latent space (a cell is known where "
                "every pixel above it is): known pixels come back close, not exact"
            )
    path = save_samples(args.out, samples, labels, **meta)
    many = f" by {world.size} processes" if world.size > 1 else ""
    print(
        f"difflab: {len(samples)} samples ({scfg.sampler}, {scfg.steps} steps){many} in "
        f"{time.perf_counter() - start:.1f} s -> {path}"
    )
    if run.model.kind.is_image:
        from difflab.report.grids import class_grid, save_grid

        png = path.with_suffix(".png")
        if prompts is not None:
            from difflab.report.text import prompt_gifs, prompt_grid

            prompt_grid(samples.numpy(), prompts, png)
            distinct = list(dict.fromkeys(prompts))
            for gif in prompt_gifs(run, scfg, distinct, path.parent, path.stem) if args.gif else []:
                print(f"difflab: denoising GIF -> {gif}")
        elif labels is not None:
            class_grid(samples.numpy(), labels.numpy(), png, run.class_names)
        else:
            save_grid(samples[:100].numpy(), png)
        print(f"difflab: grid -> {png}")


def samples_meta(run, scfg, prompts: list[str] | None = None) -> dict:
    """What a samples .npz records beside the samples: how they were drawn (sampler, steps,
    NFE, seed, weights, checkpoint, guidance) and each sample's prompt for a text model.
    Shared by `difflab sample` and `Samples.save` of the Python API."""
    from difflab.samplers import nfe_of

    meta = dict(
        sampler=scfg.sampler,
        steps=scfg.steps,
        nfe=nfe_of(scfg.sampler, scfg.steps, scfg),
        seed=scfg.seed,
        ema=run.ema,
        checkpoint=str(run.checkpoint),
    )
    if run.model.kind.conditional or scfg.guidance_method == "auto":
        meta["guidance"] = scfg.guidance
        if scfg.guidance_tmin > 0 or scfg.guidance_tmax > 0:
            meta["guidance_interval"] = [scfg.guidance_tmin, scfg.guidance_tmax]
        meta.update(guidance_record(scfg))
        if scfg.guidance_method == "auto" and run.guide_with:  # the run's own companion
            meta["guide_with"] = run.guide_with
    if run.model.kind.folded_guidance is not None:  # guided by training, at one call a step
        meta["folded_guidance"] = run.model.kind.folded_guidance.describe()
    if prompts is not None:
        meta["prompts"] = prompts
    return meta


def cmd_plot(args: argparse.Namespace) -> int:
    from difflab.report.run import plot_run

    for path in plot_run(Path(args.run), resample=args.resample, progress=not args.quiet):
        print(path)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from difflab.benchmark import bench_main

    text, json_path, md_path = bench_main(args)
    print(text)
    print(f"difflab: wrote {json_path} and {md_path}")
    return 0
