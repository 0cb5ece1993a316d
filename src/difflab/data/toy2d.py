"""2-D toy distributions, scaled to roughly [-1, 1]^2, drawn fresh from a seeded generator."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from difflab.errors import ConfigError


def checkerboard(n: int, generator: torch.Generator | None = None) -> Tensor:
    """x1, x2 ~ U(0, 4) kept where floor(x1) + floor(x2) is even, then (x - 2) / 2 into [-1, 1]^2.

    Drawn directly: pick one of the 8 kept unit squares uniformly, then a uniform point inside.
    """
    cells = torch.tensor(
        [(i, j) for i in range(4) for j in range(4) if (i + j) % 2 == 0], dtype=torch.float32
    )
    pick = torch.randint(len(cells), (n,), generator=generator)
    x = cells[pick] + torch.rand(n, 2, generator=generator)
    return (x - 2.0) / 2.0


def in_checkerboard(x: Tensor) -> Tensor:
    """Boolean (N,): whether each point of x (N, 2) lies inside a kept square of `checkerboard`."""
    u = x.double() * 2.0 + 2.0  # back to [0, 4]^2
    inside = ((u >= 0) & (u < 4)).all(dim=1)
    even = (u.floor().sum(dim=1) % 2) == 0
    return inside & even


def moons(n: int, generator: torch.Generator | None = None, noise: float = 0.05) -> Tensor:
    """Two interleaving half circles (as scikit-learn's make_moons), centred and scaled."""
    upper = torch.rand(n, generator=generator) < 0.5
    angle = torch.rand(n, generator=generator) * math.pi
    x = torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
    lower = torch.stack([1 - torch.cos(angle), 0.5 - torch.sin(angle)], dim=1)
    x = torch.where(upper[:, None], x, lower)
    x = x + noise * torch.randn(n, 2, generator=generator)
    return (x - torch.tensor([0.5, 0.25])) / 1.2


def swiss_roll(n: int, generator: torch.Generator | None = None, noise: float = 0.03) -> Tensor:
    """The 2-D swiss roll: r = theta, theta in [1.5 pi, 4.5 pi]."""
    theta = 1.5 * math.pi * (1 + 2 * torch.rand(n, generator=generator))
    x = torch.stack([theta * torch.cos(theta), theta * torch.sin(theta)], dim=1) / (4.5 * math.pi)
    return x + noise * torch.randn(n, 2, generator=generator)


def gaussians8(n: int, generator: torch.Generator | None = None, std: float = 0.05) -> Tensor:
    """Eight Gaussians on a circle of radius 0.8."""
    k = torch.randint(8, (n,), generator=generator).float()
    centres = 0.8 * torch.stack([torch.cos(k * math.pi / 4), torch.sin(k * math.pi / 4)], dim=1)
    return centres + std * torch.randn(n, 2, generator=generator)


def rings(n: int, generator: torch.Generator | None = None, noise: float = 0.02) -> Tensor:
    """Three concentric rings of radii 0.3, 0.6, 0.9; points in proportion to circumference."""
    radii = torch.tensor([0.3, 0.6, 0.9])
    ring = torch.multinomial(radii, n, replacement=True, generator=generator)
    angle = 2 * math.pi * torch.rand(n, generator=generator)
    r = radii[ring] + noise * torch.randn(n, generator=generator)
    return torch.stack([r * torch.cos(angle), r * torch.sin(angle)], dim=1)


TOY2D = {
    "checkerboard": checkerboard,
    "moons": moons,
    "swiss_roll": swiss_roll,
    "gaussians8": gaussians8,
    "rings": rings,
}


def sample_toy2d(name: str, n: int, generator: torch.Generator | None = None) -> Tensor:
    """n points (n, 2) float32 of the named distribution."""
    if name not in TOY2D:
        raise ConfigError(f"unknown 2-D dataset {name!r}; choose one of {', '.join(TOY2D)}")
    if n < 1:
        raise ConfigError(f"number of points must be >= 1, got {n}")
    return TOY2D[name](n, generator)
