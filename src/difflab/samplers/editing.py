"""Editing: image-to-image (SDEdit, Meng et al. 2022) and inpainting (replacement; RePaint,
Lugmayr et al. 2022) around any registered sampler, without touching the sampler.

`Edit` is what a user asks for; `Model.sample(edit=)` turns it into the sampler's space
(`prepare`) and `generate` runs `sample_edited`, a function of the samplers' own signature that
wraps the chosen sampler.

| code        | paper symbol                                                          |
|-------------|-----------------------------------------------------------------------|
| init        | x^(g), the guide (SDEdit); x_0^known, the image to complete (RePaint) |
| strength    | t_0 of SDEdit, as a fraction of the schedule's t_max                  |
| mask        | m (1 = known, kept)                                                   |
| eps         | the sample's own start noise (stream 0 of its SampleNoise)            |
| known_at(t) | x_t^known = alpha(t) x_0 + sigma(t) eps                               |
| resample    | U, RePaint's resamplings: every jump segment is sampled U times       |
| jump        | j, RePaint's jump length in grid steps                                |

The start level (SDEdit). Strength s in (0, 1] names the time t_s = s t_max, rounded to the
nearest step i / T of a discrete table. The sampler's own grid (its --steps, --spacing, ...)
keeps its times below t_s and t_s goes in front: ts' = [t_s, ts[ts < t_s]] (a grid time within
1e-9 of t_s is t_s itself), so a consistency run takes one step from the level. The start is
x_{t_s} = alpha(t_s) x + sigma(t_s) eps. Two ends are exact: s = 1 keeps the grid and x_T
unchanged (the init is forgotten, as it nearly is at t_max), so it is the fresh sample of the
same seed bit for bit; a level rounded to t = 0 (s < 1 / (2T) on a table) takes no step and
returns the init itself, and on a continuous schedule x0_hat(x_{t_s}) -> x as s -> 0.

Replacement (inpainting). After every step the known region of the new state is overwritten with
known_at(t_next), written into the StepState's x_next in place: that is the tensor every sampler
carries on from, so each sampler gets it without a line of its own. The known region follows
alpha(t) x + sigma(t) eps with one eps, the path DDIM takes when it predicts x exactly; at
t_next = 0 it is the init itself, so known values come back bit for bit. (UniPC's corrector
redoes the previous step after the callback: its corrected state's known region is a UniC step
from the replaced one; the model still sees replaced states, and the last step is replaced.)

RePaint. Counting grid positions p = 0..N of ts' from the top, every J-step segment ending at
a jump point p = N - 1, N - 1 - J, ... (p >= J; never from clean data) is sampled U times:
after each of the first U - 1 arrivals at p the state goes back up to ts'[p - J] by the forward
process, x_u = (alpha_u / alpha_t) x_t + sqrt(sigma_u^2 - (alpha_u / alpha_t)^2 sigma_t^2) z,
and the sampler runs the segment again, with replacement. U = 1 is replacement alone. Each pass
draws from its own noise (`SampleNoise.fork`), so a sample still depends only on (seed, index).
A sampler whose call always ends at clean data (the consistency sampler) cannot sample a grid in
pieces and is refused; it renoises by itself (use more --steps). MeanFlow jumps between any two
times; a shortcut model steps on its lattice of d = 1 / 2^k (few_step.py), so its edits need a
strength that is a multiple of 1 / steps.

Latent runs edit in the codec's latent space: the init is encoded (the posterior mean) and a
latent cell is known only where every pixel above it is. The decoder then redraws the known
pixels, which come back close to the init but not exactly (`difflab sample` says so and
records mask_space = latent).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from difflab.diffusion.schedules import DiscreteSchedule
from difflab.errors import ConfigError
from difflab.samplers.common import StepState, schedule_at
from difflab.samplers.noise import SampleNoise, as_noise

ON_GRID = 1e-9  # a grid time this close to t_s is t_s


@dataclass(frozen=True)
class Edit:
    """An edit of the samples Model.sample draws (rows are those of its n samples, like cond).

    Args:
        init: (n or 1, *data shape) the images (in [-1, 1]) or points to start from / complete.
        strength: s in (0, 1]: how far toward noise the init goes (1 = a fresh start).
        mask: (n or 1, *data shape), or (n or 1, 1, H, W) for images: 1 = keep; None = no mask.
        resample: RePaint's U >= 1 (1 = plain replacement); needs a mask when above 1.
        jump: RePaint's jump length J >= 1, in grid steps.
    """

    init: Tensor
    strength: float = 1.0
    mask: Tensor | None = None
    resample: int = 1
    jump: int = 1

    def rows(self, a: int, b: int) -> Edit:
        """The edit of samples a..b - 1 (one process's share); rows of 1 broadcast."""

        def part(x):
            return x if x is None or len(x) == 1 else x[a:b]

        return dataclasses.replace(self, init=part(self.init), mask=part(self.mask))


def check_edit(edit: Edit, n: int, data_shape: tuple[int, ...]) -> None:
    """Every problem of `edit` for n samples of `data_shape`, in one ConfigError."""
    problems = []
    if not (isinstance(edit.strength, (int, float)) and 0 < edit.strength <= 1):
        problems.append(f"--strength must lie in (0, 1] (1 = a fresh sample), got {edit.strength}")
    if len(edit.init) not in (1, n) or tuple(edit.init.shape[1:]) != tuple(data_shape):
        problems.append(
            f"--init gives {tuple(edit.init.shape)}; the run needs (1 or {n}, "
            f"{', '.join(map(str, data_shape))}): use --resize for images of another size or "
            "channel count"
        )
    if edit.mask is not None:
        shape, image = tuple(edit.mask.shape[1:]), len(data_shape) == 3
        fits = shape == tuple(data_shape) or (image and shape == (1, *data_shape[1:]))
        if len(edit.mask) not in (1, n) or not fits:
            problems.append(
                f"--mask gives {tuple(edit.mask.shape)}, the images are {tuple(data_shape)}: a "
                f"mask needs the init's size ({n} or 1 of them, 1 = keep)"
            )
    if not (isinstance(edit.resample, int) and edit.resample >= 1):
        problems.append(
            f"--resample must be an integer >= 1 (1 = no resampling), got {edit.resample}"
        )
    if not (isinstance(edit.jump, int) and edit.jump >= 1):
        problems.append(f"--jump must be an integer >= 1 (grid steps), got {edit.jump}")
    if edit.resample > 1 and edit.mask is None:
        problems.append("--resample is RePaint's inpainting: give a --mask (1 = keep)")
    if problems:
        raise ConfigError("; ".join(problems))


def start_level(schedule, strength: float) -> float:
    """t_s = strength * t_max, on a discrete table its nearest step i / T (module docstring)."""
    t = strength * schedule.t_max
    if isinstance(schedule, DiscreteSchedule):
        t = round(t * schedule.num_steps) / schedule.num_steps
    return t


def start_grid(schedule, ts: Tensor, strength: float) -> Tensor:
    """The grid an edit of `strength` samples: ts itself at 1, else [t_s, ts[ts < t_s]]."""
    if strength >= 1:
        return ts
    t_s = start_level(schedule, strength)
    if t_s <= 0:
        return ts[-1:]  # no step: the init itself
    below = ts[ts < t_s - ON_GRID]
    return torch.cat([torch.tensor([t_s], dtype=ts.dtype), below])


def prepare(edit: Edit, sampler_info, schedule, codec, data_shape, ts: Tensor, n: int, device):
    """(sampler, ts, rows) for `generate`: the wrapped sampler, the edit's grid and the
    per-sample tensors in the model's space (codec-encoded, mask on the latent grid)."""
    check_edit(edit, n, data_shape)
    if edit.resample > 1 and not sampler_info.partial_grids:
        raise ConfigError(
            f"RePaint's --resample needs a sampler that stops at a grid's last time; "
            f"{sampler_info.name} always ends at clean data: use --resample 1 (replacement) or "
            "another sampler"
        )
    init = codec.encode(edit.init.to(device).float())
    rows = {"init": init.expand(n, *init.shape[1:])}
    if edit.mask is not None:
        mask = latent_mask(edit.mask.to(device) > 0.5, tuple(init.shape[1:]))
        rows["mask"] = mask.expand(n, *mask.shape[1:])
    sampler = functools.partial(
        sample_edited,
        sampler_info.fn,
        from_prior=edit.strength >= 1,
        resample=edit.resample,
        jump=edit.jump,
    )
    return sampler, start_grid(schedule, ts, edit.strength), rows


def latent_mask(mask: Tensor, shape: tuple[int, ...]) -> Tensor:
    """A boolean mask (B, ...) on the grid of one model-space example `shape`: a cell is known
    where every data element above it is (min-pooling over whole blocks)."""
    if tuple(mask.shape[1:]) == shape or mask.dim() == 2:
        return mask
    if mask.shape[1] != 1:  # a pixel is known in latent space only in all its channels
        mask = mask.all(dim=1, keepdim=True)
    (H, W), (h, w) = mask.shape[2:], shape[1:]
    if H % h or W % w:
        raise ConfigError(f"a {H}x{W} mask does not tile the {h}x{w} latent grid")
    blocks = mask.reshape(mask.shape[0], 1, h, H // h, w, W // w)
    return blocks.all(dim=5).all(dim=3)


def repaint_plan(num_steps: int, resample: int, jump: int) -> list[tuple[int, int]]:
    """RePaint's passes over grid positions 0..num_steps: (a, b) samples ts[a] -> ts[b] down,
    and a pass with b < a (written (p, p - J)) goes back up by the forward process."""
    points = sorted(p for p in range(num_steps - 1, jump - 1, -jump)) if resample > 1 else []
    plan, pos = [], 0
    for p in points:
        plan.append((pos, p))
        plan += [(p, p - jump), (p - jump, p)] * (resample - 1)
        pos = p
    plan.append((pos, num_steps))
    return [(a, b) for a, b in plan if a != b]


def forward_jump(schedule, x: Tensor, t: float, u: float, z: Tensor) -> Tensor:
    """x_u ~ q(x_u | x_t) for u > t: the forward process from t up to u."""
    alpha_t, sigma_t = float(schedule.alpha(t)), float(schedule.sigma(t))
    alpha_u, sigma_u = float(schedule.alpha(u)), float(schedule.sigma(u))
    ratio = alpha_u / alpha_t
    return ratio * x + max(sigma_u**2 - (ratio * sigma_t) ** 2, 0.0) ** 0.5 * z


def sample_edited(
    sampler,
    denoiser,
    x_T: Tensor,
    ts: Tensor,
    *,
    y: Tensor | None = None,
    generator: SampleNoise | int | None = None,
    callback=None,
    init: Tensor,
    mask: Tensor | None = None,
    from_prior: bool = True,
    resample: int = 1,
    jump: int = 1,
    **options,
) -> Tensor:
    """`sampler` from the init (B, ...) at ts[0] (or from x_T when `from_prior`), the known
    region (mask True) replaced after every step, with RePaint's passes; see the module notes.

    Returns:
        (B, ...) the edited samples at ts[-1].
    """
    noise = as_noise(generator)
    eps = noise.randn(x_T.shape, 0, x_T.device, x_T.dtype)  # the start noise x_T is made of

    def known_at(t: float) -> Tensor:
        if t == 0:
            return init
        alpha, sigma = schedule_at(denoiser, t)
        return alpha * init + sigma * eps

    def keep(x: Tensor, t: float) -> Tensor:
        return x if mask is None else torch.where(mask, known_at(t), x)

    if len(ts) == 1:
        return keep(known_at(float(ts[0])), float(ts[0]))
    x = keep(x_T if from_prior else known_at(float(ts[0])), float(ts[0]))
    steps_done = 0

    def replace(state: StepState) -> None:
        if mask is not None:
            state.x_next.copy_(keep(state.x_next, state.t_next))
        if callback is not None:
            callback(dataclasses.replace(state, i=state.i + steps_done))

    for k, (a, b) in enumerate(repaint_plan(len(ts) - 1, resample, jump)):
        pass_noise = noise.fork(k) if k else noise
        if b < a:  # back up by the forward process, with this pass's stream 0
            z = pass_noise.randn(x.shape, 0, x.device, x.dtype)
            x = keep(
                forward_jump(denoiser.schedule, x, float(ts[a]), float(ts[b]), z), float(ts[b])
            )
            continue
        part = ts[a : b + 1]
        x = sampler(denoiser, x, part, y=y, generator=pass_noise, callback=replace, **options)
        steps_done += b - a
    return x
