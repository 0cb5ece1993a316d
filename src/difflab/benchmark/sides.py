"""One library under test ("side"): its network, its real training step, and its sampling call.

difflab's step is the trainer's: the preset's model from `build.build_model`, the loss object
`build.build_loss` names (t and eps drawn from a CPU generator, as `train` does),
`devices.adamw` (the trainer's AdamW, fused where torch has a kernel) with the preset's settings,
backward, step, zero_grad(set_to_none=True); diffusers' side gets the same optimizer. Gradient
clipping and EMA, which `train` adds, are left out on both sides, so the two steps do the same
work. Data are synthetic (uniform in [-1, 1]): speed does not depend on the pixels.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from difflab import build, devices
from difflab.benchmark.options import Setup
from difflab.model import DataKind
from difflab.samplers import SAMPLERS, steps_for_nfe


@dataclass
class Side:
    """A library under test.

    `loss(net)` is one batch's scalar training loss through `net` (the eager module when FLOPs
    are counted, the compiled one when timed); `sample(sampler, nfe)` draws one batch of
    setup.sample_batch images and returns the model evaluations it made; `samplers` maps the
    sampler names it can run to what runs them.
    """

    name: str
    label: str
    net: nn.Module
    loss: Callable[[Callable], Tensor]
    optimizer: torch.optim.Optimizer
    sample: Callable[[str, int], int]
    samplers: dict[str, str]
    run_net: Callable = None  # the network as called: net, or torch.compile(net)
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.run_net = self.run_net or self.net

    @property
    def params(self) -> int:
        return sum(p.numel() for p in self.net.parameters())

    def step(self) -> None:
        """One training step: forward, loss, backward, optimizer step, zero_grad."""
        self.loss(self.run_net).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


class Counted:
    """A network that counts its calls (one call = one model evaluation of a batch)."""

    def __init__(self, net: Callable):
        self.net, self.calls = net, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.net(*args, **kwargs)


def synthetic_batch(setup: Setup, batch: int, seed: int) -> tuple[Tensor, Tensor | None]:
    """x0 (B, *shape) uniform in [-1, 1] on the device, and labels (B,) for conditional nets
    (including the null label num_classes, as label dropout feeds it)."""
    gen = torch.Generator().manual_seed(seed)
    x0 = (torch.rand((batch, *setup.shape), generator=gen) * 2 - 1).to(setup.device)
    if setup.channels_last:
        x0 = x0.contiguous(memory_format=torch.channels_last)
    y = None
    if setup.classes:
        y = torch.randint(0, setup.classes + 1, (batch,), generator=gen).to(setup.device)
    return x0, y


def sample_labels(setup: Setup) -> Tensor | None:
    """Class labels cycling 0..classes-1 for conditional sampling (no guidance: one network
    evaluation per step, as the diffusers side makes)."""
    if not setup.classes:
        return None
    return torch.arange(setup.sample_batch) % setup.classes


def difflab_side(setup: Setup) -> Side:
    """difflab's network for the configuration, trained and sampled as difflab does."""
    cfg, device = setup.cfg, setup.device
    torch.manual_seed(setup.opts.seed)  # weight init
    kind = DataKind(tuple(setup.shape), setup.classes)
    model = build.build_model(cfg, kind, device)
    net = model.net
    if setup.channels_last:
        net = net.to(memory_format=torch.channels_last)
    loss_fn = build.build_loss(cfg, model.schedule)
    optimizer = devices.adamw(net, cfg.train.lr, cfg.train.betas, cfg.train.weight_decay)
    loss_generator = torch.Generator().manual_seed(setup.opts.seed + 1)  # t and eps, as train
    x0, y = synthetic_batch(setup, setup.batch_size, setup.opts.seed + 2)
    side: Side

    def loss(run: Callable) -> Tensor:
        noise = loss_fn.draw(tuple(x0.shape), loss_generator)
        with setup.autocast():
            per_example, _ = loss_fn(model.with_net(run), x0, y, noise=noise, step=0)
        return per_example.mean()

    def sample(sampler: str, nfe: int) -> int:
        counted = Counted(side.run_net)
        steps, n = steps_for_nfe(sampler, nfe, cfg.sample), setup.sample_batch
        # guidance 1 on class-balanced labels: one network evaluation per step, as diffusers'
        scfg = dataclasses.replace(
            cfg.sample,
            sampler=sampler,
            steps=steps,
            n=n,
            batch_size=n,
            seed=setup.opts.seed,
            guidance=1.0,
            compile=False,
            precision=setup.precision,
        )
        runner = model.with_net(counted)
        runner.sample(scfg, cond=runner.conditioner.balanced(n))
        return counted.calls

    names = {name: f"difflab sample_{name}, {cfg.sample.spacing} grid" for name in SAMPLERS}
    side = Side("difflab", "difflab", net, loss, optimizer, sample, names)
    side.info["objective"] = (
        f"losses.DiffusionLoss: {cfg.diffusion.prediction} prediction, "
        f"{cfg.diffusion.schedule} schedule, t {cfg.diffusion.t_sampling}"
    )
    return side
