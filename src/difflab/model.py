"""One model per run: network, schedule, denoiser, conditioner, codec and the run's kind, built
in one place (`build.build_model`) and used by training, loading a run, sampling, evaluation and
the benchmark. `Model.sample` is the one sampling path: batching, guidance, conditioning,
precision and decoding. `RunKind` is the one answer to "what is this run".
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from difflab.config import ConfigError, SampleConfig
from difflab.devices import PRECISIONS, maybe_compile, resolve_precision
from difflab.diffusion.guidance import check_apg, check_interval, check_method, guide, per_draw
from difflab.diffusion.prediction import Denoiser
from difflab.samplers import (
    Edit,
    NonFiniteError,
    Recorder,
    editing,
    generate,
    sampler_info,
    timesteps,
)


@dataclass(frozen=True)
class DataKind:
    """What the data are, decided once from the data set and carried with the run (data.json):
    the shape of one example, its classes, and so points or images (RunKind.data)."""

    shape: tuple[int, ...]
    num_classes: int = 0  # classes the model is conditioned on (0 = none)
    class_names: tuple[str, ...] = ()

    @property
    def is_image(self) -> bool:
        return len(self.shape) == 3

    def info(self) -> dict:
        """data.json's contents."""
        names = list(self.class_names)[: self.num_classes]
        return {"shape": list(self.shape), "num_classes": self.num_classes, "class_names": names}

    @classmethod
    def from_info(cls, info: dict) -> DataKind:
        classes = int(info["num_classes"])
        names = tuple(info.get("class_names") or (str(k) for k in range(classes)))
        return cls(tuple(info["shape"]), classes, names)


@dataclass(frozen=True)
class FoldedGuidance:
    """Guidance a run's loss folded into its training target (MeanFlow's omega and kappa: Geng
    et al. 2025, Sec. 4.2 and App. B.1): the net itself samples the field guided at the
    effective scale omega / (1 - kappa), for t in [t_start, t_end], in one call a step, so a
    guidance scale at sampling would guide it a second time."""

    omega: float
    kappa: float = 0.0
    t_start: float = 0.0
    t_end: float = 1.0

    @property
    def scale(self) -> float:  # the CFG scale of the field learnt
        return self.omega / (1 - self.kappa)

    def describe(self) -> str:
        """ "meanflow.omega=2, meanflow.kappa=0.5: CFG scale 4" (and the interval, if any)."""
        text = f"omega={self.omega:g}, kappa={self.kappa:g}: CFG scale {self.scale:g}"
        if (self.t_start, self.t_end) != (0.0, 1.0):
            text += f" for t in [{self.t_start:g}, {self.t_end:g}]"
        return text

    def info(self) -> dict:
        """For result rows and samples files: what the samples were guided by."""
        return dataclasses.asdict(self) | {"scale": self.scale}


FAMILIES = ("diffusion", "flow", "consistency", "meanflow", "shortcut", "autoencoder")
CONDITIONS = ("none", "classes", "text")
CODECS = ("identity", "latent")


@dataclass(frozen=True)
class RunKind:
    """What a run is, decided once by `build.run_kind` from its config and its data, and asked
    by everything else (report, evaluation, compare, export, CLI, sampler choice), which never
    re-derives it from config strings, tensor shapes or a network's name.

    family: diffusion (a noise schedule), flow (a flow path), consistency (a consistency model,
        train.loss ct / ict / ect / cd), meanflow or shortcut (one-step models on the
        rectified path whose net reads a second time, train.loss meanflow / shortcut) or
        autoencoder (the first stage of latent diffusion);
    data: the data's shape and classes (points or images);
    condition: none, classes or text;
    codec: identity (diffusion in data space) or latent (through an autoencoder run);
    folded_guidance: the guidance its loss folded into training (a MeanFlow run's omega,
        kappa), so it samples guided at one call and refuses a guidance scale; None = none.
    """

    family: str
    data: DataKind
    condition: str = "none"
    codec: str = "identity"
    folded_guidance: FoldedGuidance | None = None

    def __post_init__(self):
        for value, allowed in (
            (self.family, FAMILIES),
            (self.condition, CONDITIONS),
            (self.codec, CODECS),
        ):
            if value not in allowed:
                raise ValueError(f"{value!r} is not one of {', '.join(allowed)}")

    @property
    def consistency(self) -> bool:
        return self.family == "consistency"

    @property
    def second_time(self) -> bool:  # a one-step model whose net reads t2 (MeanFlow, shortcut)
        return self.family in ("meanflow", "shortcut")

    @property
    def autoencoder(self) -> bool:  # reconstructs its input; draws no samples
        return self.family == "autoencoder"

    @property
    def latent(self) -> bool:
        return self.codec == "latent"

    @property
    def conditional(self) -> bool:  # guidance applies
        return self.condition != "none"

    @property
    def text(self) -> bool:
        return self.condition == "text"

    @property
    def is_image(self) -> bool:  # images (C, H, W), else points
        return self.data.is_image

    @property
    def shape(self) -> tuple[int, ...]:  # one example in data space
        return self.data.shape

    @property
    def channels(self) -> int | None:  # of images; None for points
        return self.data.shape[0] if self.data.is_image else None

    @property
    def num_classes(self) -> int:  # class labels the model takes (0: none; a text run's too)
        return self.data.num_classes

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.data.class_names

    def info(self) -> dict:
        """data.json's contents (the data part: the rest is derived from the config)."""
        return self.data.info()


@dataclass
class Model:
    """A run's model: `denoiser` drives `net` on `schedule`; `conditioner` makes its conditions,
    `codec` maps data to the space it diffuses in and back; `kind` says what the run is."""

    net: nn.Module
    schedule: object
    denoiser: Denoiser
    conditioner: object
    codec: object
    kind: RunKind
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    memory_format: torch.memory_format = torch.contiguous_format  # of the net and its inputs
    compiled: nn.Module | None = None  # torch.compile'd net for sampling, made on first use
    guide: Model | None = None  # autoguidance's weak model (runs.attach_guide), else None

    def with_net(self, net: nn.Module) -> Model:
        """The same model around another network (the EMA copy, a DDP wrapper)."""
        return dataclasses.replace(
            self, net=net, denoiser=self.denoiser.with_net(net), compiled=None
        )

    def sample(
        self,
        scfg: SampleConfig,
        *,
        cond=None,
        start: int = 0,
        progress: bool = False,
        recorder: Recorder | None = None,
        edit: Edit | None = None,
    ) -> Tensor:
        """(scfg.n, *data shape) samples (CPU, float32) with scfg's sampler, grid, seed,
        batch size, guidance, precision (the network under autocast; the sampler's arithmetic
        stays float32) and compile, decoded into data space. Every caller (`difflab sample`,
        training-time grids and metrics, evaluation, reflow, straightness) gets all of them.

        Args:
            cond: the conditions of the n samples (a conditioner's `request` or `balanced`);
                None for a conditional model draws them uniformly (seeded by scfg.seed).
            start: global index of the first sample (one process's share of a larger draw:
                with `cond` the share's conditions, samples start.. of one call from 0).
            recorder: receives every step of the first batch (trajectories).
            edit: start from given data at a level (SDEdit) and keep a masked region
                (inpainting), with any sampler (samplers/editing.py); its rows are the n
                samples' (like cond).
        """
        self.check_sample(scfg)
        info = sampler_info(scfg.sampler)
        ts = timesteps(self.schedule, scfg.steps, scfg.spacing, scfg.t_end or None, scfg.shift)
        autocast = resolve_precision(scfg.precision, self.device, "sample.precision")
        sampler, rows, shape = info.fn, None, self.codec.latent_shape(self.kind.shape)
        if edit is not None:
            sampler, ts, rows = editing.prepare(
                edit, info, self.schedule, self.codec, self.kind.shape, ts, scfg.n, self.device
            )
        denoiser = self.denoiser
        if scfg.compile:
            denoiser = denoiser.with_net(self._compiled())
        if self.kind.conditional and cond is None:
            cond = self.conditioner.request(scfg.n, seed=scfg.seed)
        if self.kind.conditional or scfg.guidance_method == "auto":
            denoiser = self._guided(denoiser, scfg)
        z = generate(
            per_draw(sampler, denoiser),
            denoiser,
            scfg.n,
            shape,
            ts,
            seed=scfg.seed,
            start=start,
            batch_size=scfg.batch_size,
            labels=cond,
            device=self.device,
            callback=recorder,
            progress=progress,
            autocast=autocast,
            rows=rows,
            **info.options_from(scfg),
        )
        return self.codec.decode(z)

    def check_sample(self, scfg: SampleConfig, *, dry_run: bool = False) -> None:
        """Every problem of `scfg` for this model in one ConfigError, before any work.

        Args:
            dry_run: also draw one example on the real grid with a network that predicts
                zeros, so that every check a sampler makes of its own options and grid (eta,
                order, variance, churn levels, corrector steps, consistency levels) runs too:
                the sampler stays the one authority on what it accepts, and a new sampler
                needs no validator of its own. It costs one network-free pass (milliseconds);
                the trainer asks for it so that a typo in `sample.*` fails before step 1.
        """
        problems = []

        def attempt(check, *args):
            try:
                return check(*args)
            except ConfigError as e:  # anything else is a bug and keeps its traceback
                problems.append(str(e))

        info = attempt(sampler_info, scfg.sampler)
        ts = attempt(
            timesteps, self.schedule, scfg.steps, scfg.spacing, scfg.t_end or None, scfg.shift
        )
        if scfg.n < 1:
            problems.append(f"sample.n (--n) must be >= 1, got {scfg.n}")
        if scfg.batch_size < 1:
            problems.append(f"sample.batch_size must be >= 1, got {scfg.batch_size}")
        if scfg.precision not in PRECISIONS:
            problems.append(
                f"sample.precision must be one of {', '.join(PRECISIONS)}, got {scfg.precision!r}"
            )
        if scfg.guidance_method == "cfg":  # the other methods check their scale themselves
            attempt(self.conditioner.check_guidance, scfg.guidance)
        attempt(check_interval, scfg.guidance_tmin, scfg.guidance_tmax)
        problems += self._guidance_problems(scfg)
        if dry_run and not problems:
            attempt(self._dry_run, info, ts, scfg)
        if problems:
            raise ConfigError("; ".join(problems))

    def _guided(self, denoiser: Denoiser, scfg: SampleConfig) -> Denoiser:
        """`denoiser` under scfg's guidance method, scale and interval."""
        return guide(
            denoiser,
            scfg.guidance_method,
            scfg.guidance,
            self.conditioner,
            scfg.guidance_tmin,
            scfg.guidance_tmax,
            weak=self.guide.denoiser if self.guide is not None else None,
            apg_eta=scfg.apg_eta,
            apg_momentum=scfg.apg_momentum,
            apg_threshold=scfg.apg_threshold,
        )

    def _guidance_problems(self, scfg: SampleConfig) -> list[str]:
        """What is wrong with scfg's guidance method for this model and scfg's sampler."""
        method, problems = scfg.guidance_method, []
        folded = self.kind.folded_guidance
        if folded is not None and scfg.guidance != 1:
            problems.append(
                f"--guidance {scfg.guidance:g} (sample.guidance) on a run whose guidance is "
                f"folded into its training ({folded.describe()}): it samples guided in one "
                "network call a step; leave --guidance out or pass --guidance 1"
            )
        if scfg.guide_with and method != "auto":
            problems.append(
                "--guide-with (sample.guide_with) is autoguidance's weak model: add "
                "--guidance-method auto, or leave --guide-with out"
            )
        if method in ("apg", "cfg++") and not self.conditioner.conditional:
            problems.append(
                f"guidance_method={method} needs a conditional model; this one was trained "
                "without conditions (guidance_method=auto guides any run with a weak one)"
            )
        if method == "auto" and self.guide is None and scfg.guide_with:
            problems.append(
                f"sample.guide_with={scfg.guide_with} is loaded by `difflab sample` and `difflab "
                "eval`; training-time samples cannot use guidance_method=auto (use cfg or apg)"
            )
            return problems
        try:
            check_method(
                method,
                scfg.guidance,
                sampler=scfg.sampler,
                eta=scfg.eta,
                has_weak=self.guide is not None,
            )
            if method == "apg":
                check_apg(scfg.apg_eta, scfg.apg_momentum, scfg.apg_threshold)
        except ConfigError as e:
            problems.append(str(e))
        return problems

    def _dry_run(self, info, ts: Tensor, scfg: SampleConfig) -> None:
        """One example through `info`'s sampler on `ts`, driven by a zero network."""
        zeros = self.denoiser.with_net(lambda x_t, t, cond=None, **_: torch.zeros_like(x_t))
        shape = self.codec.latent_shape(self.kind.shape)
        # a zero network may leave the data range: that is not a config problem
        with contextlib.suppress(NonFiniteError):
            generate(
                info.fn,
                zeros,
                1,
                shape,
                ts,
                seed=0,
                device=self.device,
                **info.options_from(scfg),
            )

    def _compiled(self) -> nn.Module:
        if self.compiled is None:
            self.compiled = maybe_compile(self.net, True, "sample.compile")
        return self.compiled
