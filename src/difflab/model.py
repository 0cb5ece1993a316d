"""One model per run: network, schedule, denoiser, conditioner, codec and the run's kind, built
in one place (`build.build_model`) and used by training, loading a run, sampling, evaluation and
the benchmark. `Model.sample` is the one sampling path: batching, guidance, conditioning,
precision and decoding. `RunKind` is the one answer to "what is this run".
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from difflab.config import ConfigError, SampleConfig
from difflab.devices import maybe_compile
from difflab.diffusion.guidance import check_interval, guided
from difflab.diffusion.prediction import Denoiser
from difflab.samplers import Recorder, generate, sampler_info, timesteps


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


FAMILIES = ("diffusion", "flow", "consistency", "autoencoder")  # meanflow, shortcut: later
CONDITIONS = ("none", "classes", "text")
CODECS = ("identity", "latent")


@dataclass(frozen=True)
class RunKind:
    """What a run is, decided once by `build.run_kind` from its config and its data, and asked
    by everything else (report, evaluation, compare, export, CLI, sampler choice), which never
    re-derives it from config strings, tensor shapes or a network's name.

    family: diffusion (a noise schedule), flow (a flow path), consistency (a consistency model,
        train.loss ct / ict / ect / cd) or autoencoder (the first stage of latent diffusion);
    data: the data's shape and classes (points or images);
    condition: none, classes or text;
    codec: identity (diffusion in data space) or latent (through an autoencoder run).
    """

    family: str
    data: DataKind
    condition: str = "none"
    codec: str = "identity"

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
        autocast: torch.dtype | None = None,
    ) -> Tensor:
        """(scfg.n, *data shape) samples (CPU, float32) with scfg's sampler, grid, seed,
        batch size and guidance, decoded into data space.

        Args:
            cond: the conditions of the n samples (a conditioner's `request` or `balanced`);
                None for a conditional model draws them uniformly (seeded by scfg.seed).
            start: global index of the first sample (one process's share of a larger draw:
                with `cond` the share's conditions, samples start.. of one call from 0).
            recorder: receives every step of the first batch (trajectories).
            autocast: the network's precision (None: full).
        """
        try:
            info = sampler_info(scfg.sampler)
            ts = timesteps(self.schedule, scfg.steps, scfg.spacing, scfg.t_end or None, scfg.shift)
            if scfg.n < 1:
                raise ConfigError(f"--n must be >= 1, got {scfg.n}")
            self.conditioner.check_guidance(scfg.guidance)
            check_interval(scfg.guidance_tmin, scfg.guidance_tmax)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        denoiser = self.denoiser
        if scfg.compile:
            denoiser = denoiser.with_net(self._compiled())
        if self.kind.conditional:
            if cond is None:
                cond = self.conditioner.request(scfg.n, seed=scfg.seed)
            denoiser = guided(
                denoiser, scfg.guidance, self.conditioner, scfg.guidance_tmin, scfg.guidance_tmax
            )
        z = generate(
            info.fn,
            denoiser,
            scfg.n,
            self.codec.latent_shape(self.kind.shape),
            ts,
            seed=scfg.seed,
            start=start,
            batch_size=scfg.batch_size,
            labels=cond,
            device=self.device,
            callback=recorder,
            progress=progress,
            autocast=autocast,
            **info.options_from(scfg),
        )
        return self.codec.decode(z)

    def _compiled(self) -> nn.Module:
        if self.compiled is None:
            self.compiled = maybe_compile(self.net, True, "sample.compile")
        return self.compiled
