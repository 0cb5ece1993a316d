"""The sampler registry: a sampler file registers its function with `@register(...)`, declaring
its options, its cost in model evaluations (fixed, or a function of its options) and whether it
is deterministic. The command-line flags, `build.build_sampler`, NFE accounting and the default
`eval --compare` list all read it.

Adding a sampler: write `samplers/<name>.py` (copy `ddim.py`), decorate the function with
`@register("<name>", ...)`, and import the file in `samplers/__init__.py`. An option is a
`SampleConfig` field (so `--set sample.<field>=...` and config.json carry it); a test keeps every
declared option a field with a matching type.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from difflab.errors import ConfigError

# n steps ending at t = 0 take a n - b model calls: (a, b), or a function of the sampler's
# options that gives (a, b) (pc: n_corrector + 1 calls a step)
Cost = tuple[int, int] | Callable[[dict], tuple[int, int]]


@dataclass(frozen=True)
class Option:
    """A sampler option: the SampleConfig field it is kept in, its command-line flag (None:
    `--set sample.<field>` only), and its help text."""

    field: str
    type: type
    help: str
    flag: str | None = None


@dataclass(frozen=True)
class SamplerInfo:
    """What a registered sampler is: `fn(denoiser, x_T, ts, *, y, generator, callback,
    **options)`, its options, its cost (n steps ending at t = 0 take a n - b model calls; a
    function of the options where they change it), and whether the same x_T always gives the
    same sample (an ODE solver) or not (an SDE), and whether a call on a grid ending above
    t = 0 stops at its last time (RePaint samples a grid in pieces; the consistency sampler
    always ends at clean data)."""

    name: str
    fn: Callable
    options: tuple[Option, ...]
    cost: Cost
    deterministic: bool
    partial_grids: bool = True
    family: str = ""  # a sampler for one run family only (meanflow, shortcut); "" = any

    def cost_of(self, sample_cfg=None) -> tuple[int, int]:
        """(a, b) with the options of `sample_cfg` (a SampleConfig); a cost that depends on
        the options needs them (ValueError without)."""
        if not callable(self.cost):
            return self.cost
        if sample_cfg is None:
            raise ValueError(f"{self.name}'s model evaluations depend on its options: pass them")
        options = self.options_from(sample_cfg)
        a, b = self.cost(options)
        if a < 1:
            raise ValueError(f"{self.name} with {options} makes no model calls; check its options")
        return a, b

    def nfe(self, steps: int, sample_cfg=None) -> int:
        """Model evaluations of `steps` steps on a grid ending at t = 0 (with the options of
        `sample_cfg`, where they change it)."""
        a, b = self.cost_of(sample_cfg)
        return a * steps - b

    def steps_for(self, nfe: int, sample_cfg=None) -> int:
        """The most steps whose model evaluations fit in `nfe` (at least 1)."""
        a, b = self.cost_of(sample_cfg)
        return max(1, (nfe + b) // a)

    def options_from(self, sample_cfg) -> dict:
        """The keyword options of `fn` from a SampleConfig."""
        options = {o.field: getattr(sample_cfg, o.field) for o in self.options}
        if options.get("s_tmax") == 0:  # JSON has no infinity: 0 means "no upper limit"
            options["s_tmax"] = math.inf
        return options


SAMPLERS: dict[str, SamplerInfo] = {}  # in registration order


def register(
    name: str,
    *,
    options: tuple[Option, ...] = (),
    cost: Cost = (1, 0),
    deterministic: bool = True,
    partial_grids: bool = True,
    family: str = "",
) -> Callable[[Callable], Callable]:
    """Decorator: list `fn` under `name` (see SamplerInfo)."""

    def add(fn: Callable) -> Callable:
        if name in SAMPLERS:
            raise ValueError(f"sampler {name!r} is registered twice")
        SAMPLERS[name] = SamplerInfo(
            name, fn, tuple(options), cost, deterministic, partial_grids, family
        )
        return fn

    return add


def sampler_info(name: str) -> SamplerInfo:
    """The registered sampler `name`; ValueError naming the choices otherwise."""
    if name not in SAMPLERS:
        raise ConfigError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


def nfe_of(sampler: str, steps: int, sample_cfg=None) -> int:
    """Model evaluations `steps` steps of `sampler` (by name) cost, grid ending at t = 0, with
    the options of `sample_cfg` (a SampleConfig; needed where they change the cost)."""
    return sampler_info(sampler).nfe(steps, sample_cfg)


def steps_for_nfe(sampler: str, nfe: int, sample_cfg=None) -> int:
    """The most steps of `sampler` (by name) whose model evaluations fit in `nfe`, with the
    options of `sample_cfg` (needed where they change the cost)."""
    return sampler_info(sampler).steps_for(nfe, sample_cfg)


def cost_is_fixed(sampler: str) -> bool:
    """Whether `sampler`'s model evaluations follow from its steps alone (not its options)."""
    return not callable(sampler_info(sampler).cost)


def deterministic_samplers() -> tuple[str, ...]:
    """The ODE solvers: what `eval --compare` sweeps by default (SDEs need many more steps; a
    family's own sampler, MeanFlow's or a shortcut model's, fits its family only)."""
    return tuple(name for name, info in SAMPLERS.items() if info.deterministic and not info.family)
