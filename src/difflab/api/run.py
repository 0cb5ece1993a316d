"""`difflab.load` and `Run`: a trained run (a run directory, an fp16 EMA weights file or
pretrained:NAME) that samples from its own `sample.*` settings, as `difflab sample RUN` does."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from difflab.api.samples import Samples, Trajectory
from difflab.cli.edit import edit_meta, make_edit
from difflab.cli.sample import samples_meta
from difflab.cli.text import sample_conditions
from difflab.config import ConfigError, RunConfig, SampleConfig
from difflab.model import Model
from difflab.report.images import state_lams
from difflab.report.latent import decoded_states
from difflab.runs import LoadedRun, attach_guide, draw_samples, load_run
from difflab.samplers import Recorder
from difflab.samplers.editing import check_edit

SAMPLE_FIELDS = {f.name for f in dataclasses.fields(SampleConfig)}


def load(
    path: str | Path, *, checkpoint: int | str | None = None, raw: bool = False, device="auto"
) -> Run:
    """A trained run, as `difflab sample` opens it: a run directory (its newest good
    checkpoint, or `checkpoint`: a step or "best"), an fp16 EMA weights file
    (`difflab export RUN --format ema`), or a run shipped in the package, "pretrained:NAME"
    (`difflab pretrained list`). raw: the raw weights instead of the EMA copy."""
    return Run(load_run(path, checkpoint=checkpoint, use_ema=False if raw else None, device=device))


class Run:
    """A trained run: `cfg` (RunConfig), `model` (Model), `step`, `path`, and sampling.

    `sample` and `trajectory` start from the run's own `sample.*` settings (config.json) and
    change only what is passed, as `difflab sample RUN --flag ...` does.
    """

    def __init__(self, loaded: LoadedRun):
        self.loaded = loaded

    @property
    def path(self) -> Path:  # the run directory or weights file
        return self.loaded.run_dir

    @property
    def cfg(self) -> RunConfig:
        return self.loaded.cfg

    @property
    def model(self) -> Model:
        return self.loaded.model

    @property
    def step(self) -> int:  # the training step of the weights
        return self.loaded.step

    @property
    def shape(self) -> tuple[int, ...]:  # one example: (2,) or (C, H, W)
        return self.loaded.shape

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.loaded.class_names

    @property
    def name(self) -> str:
        return self.path.stem if self.path.is_file() else self.path.name

    def __repr__(self) -> str:
        cfg, conditioner = self.cfg, self.model.conditioner
        if hasattr(conditioner, "prompts"):
            classes = "text prompts"
        elif conditioner.conditional:
            classes = f"{self.loaded.num_classes} classes"
        else:
            classes = "unconditional"
        data = f"{cfg.data.name} {'x'.join(map(str, self.shape))}"
        return (
            f"Run({self.name!r}: {cfg.preset}, {cfg.model.name} on {cfg.diffusion.schedule}, "
            f"{data}, {classes}, step {self.step})"
        )

    def sample_config(self, n: int = 16, **changes) -> SampleConfig:
        """The run's sample config with `changes` (SampleConfig fields; None = the run's)."""
        changes = {k: v for k, v in changes.items() if v is not None}
        unknown = sorted(set(changes) - SAMPLE_FIELDS)
        if unknown:
            raise ConfigError(
                f"unknown sampling option(s) {', '.join(unknown)}; the options are the fields "
                f"of SampleConfig: {', '.join(sorted(SAMPLE_FIELDS))}"
            )
        if n < 1:
            raise ConfigError(f"n must be >= 1, got {n}")
        if changes.get("use_ema", self.loaded.ema) != self.loaded.ema:
            held, other = ("EMA", "raw") if self.loaded.ema else ("raw", "EMA")
            raise ConfigError(
                f"use_ema={changes['use_ema']}: this Run holds the {held} weights, chosen when "
                f"it was loaded; difflab.load(path, raw={self.loaded.ema}) gives the {other} "
                "ones"
            )
        return dataclasses.replace(self.cfg.sample, n=n, **changes)

    def _request(self, n, label, prompt, per_class, changes):
        """(scfg, conditions, prompts) of a call, checked as `difflab sample` checks them."""
        scfg = self.sample_config(n, **changes)
        prompts = [prompt] if isinstance(prompt, str) else prompt
        scfg, cond, prompts = sample_conditions(self.loaded, scfg, prompts, label, per_class)
        attach_guide(self.loaded, scfg).model.check_sample(scfg)
        return scfg, cond, prompts

    def sample(
        self,
        n: int | None = None,
        *,
        label: int | None = None,
        prompt: str | list[str] | None = None,
        per_class: bool = False,
        sampler: str | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        seed: int | None = None,
        init=None,
        strength: float | None = None,
        mask=None,
        resample: int | None = None,
        jump: int | None = None,
        resize: bool = False,
        progress: bool = True,
        **options,
    ) -> Samples:
        """n samples, as `difflab sample RUN --n n [--class label | --prompt ...] [--init ...]`
        draws them: the same numbers for the same settings, edits (SDEdit, inpainting) too.

        Args:
            n: samples (per prompt for a text run).
            label: one class of a class run (--class); per_class: n / classes of each.
            prompt: a sentence, or a list of them, for a text run (--prompt).
            sampler, steps, guidance, seed: override the run's sample.* settings.
            options: any other SampleConfig field (spacing, eta, batch_size, precision, ...).
            init: edit these instead (--init): a folder, an image or an .npz, or an array /
                `Samples` (N, *shape) in [-1, 1]; n defaults to N (16 without init).
            strength: SDEdit's level in (0, 1] (--strength; 1 = a fresh sample).
            mask: what to keep (--mask): a file or an array, 1 = keep; inpainting.
            resample, jump: RePaint's U and J (--resample, --jump); resize: --resize.
        Returns:
            Samples: `.tensor` (n, *shape) in [-1, 1], `.labels`, `.images`, `.grid()`.
        """
        edit = None
        if init is not None:  # the CLI's own reading of --init / --mask (samplers/editing.py)
            edit = make_edit(self.shape, init, strength, mask, resample, jump, resize)
        elif any(x is not None for x in (strength, mask, resample, jump)) or resize:
            raise ConfigError("strength, mask, resample, jump and resize edit an init: give init=")
        n = n if n is not None else len(edit.init) if edit is not None else 16
        changes = dict(sampler=sampler, steps=steps, guidance=guidance, seed=seed, **options)
        scfg, cond, prompts = self._request(n, label, prompt, per_class, changes)
        meta = samples_meta(self.loaded, scfg, prompts)
        if edit is not None:
            check_edit(edit, scfg.n, self.shape)
            meta.update(edit_meta(edit, init, mask, self.model.kind.codec == "latent"))
        samples = draw_samples(self.loaded, scfg, labels=cond, progress=progress, edit=edit)
        labels = cond if cond is not None and cond.dim() == 1 else None
        return Samples(samples, labels, prompts, meta, self.class_names)

    def trajectory(
        self,
        n: int = 8,
        *,
        label: int | None = None,
        prompt: str | list[str] | None = None,
        per_class: bool = False,
        **changes,
    ) -> Trajectory:
        """Every state of the sampler for n samples (the first n of `sample` with the same
        arguments: noise is keyed by sample index); sampler, steps, seed, ... as in `sample`."""
        scfg, cond, _ = self._request(n, label, prompt, per_class, changes)
        scfg = dataclasses.replace(scfg, batch_size=max(scfg.batch_size, scfg.n))  # one batch
        recorder = Recorder()
        draw_samples(self.loaded, scfg, labels=cond, progress=False, recorder=recorder)
        states = {
            "xs": recorder.trajectory().numpy(),
            "x0_hats": torch.stack(recorder.x0_hats).numpy(),
        }
        if self.cfg.model.codec:  # a latent run: its states decoded into images
            states = decoded_states(self.model.codec, states)
        ts = torch.tensor(recorder.ts).numpy()
        labels = cond.numpy() if cond is not None and cond.dim() == 1 else None
        return Trajectory(
            ts,
            states["xs"],
            states["x0_hats"],
            state_lams(self.cfg, ts),
            scfg.sampler,
            labels,
            self.class_names,
        )

    def gif(self, path: str | Path, n: int = 8, *, max_frames: int = 50, **kwargs) -> Path:
        """`trajectory(n, **kwargs)` as an animated GIF at `path` (report's GIFs)."""
        return self.trajectory(n, **kwargs).gif(path, max_frames)
