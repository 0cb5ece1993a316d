"""Post-hoc EMA: the power-function EMA of any sigma_rel, synthesised from stored snapshots.

Karras et al. 2024 (EDM2), Sec. 3.2 and Appendix C.3. Each snapshot i of phema.py is the
average of the training weights under the profile p_i(tau) = p(tau; t_i, gamma_i) (Eq. 121). A
sum of snapshots with coefficients x_i is the average under sum_i x_i p_i, so the profile of a
wanted (t, gamma) is matched in least squares over tau:

    min_x || sum_i x_i p_i - p_target ||^2  =>  A x = b,  A_ij = <p_i, p_j>,  b_i = <p_i, p_target>

with the inner products in closed form (Eq. 151, Algorithm 3): for t_a <= t_b

    <p_a, p_b> = (gamma_a + 1)(gamma_b + 1) / ((gamma_a + gamma_b + 1) t_b) (t_a / t_b)^gamma_b.

The coefficients are then scaled to sum to 1 (as EDM2's solve_posthoc_coefficients does), so a
weight that never moved keeps its value.

What the snapshots can reconstruct: any target whose profile the fit matches to within
MAX_FIT_ERROR in relative L2 norm, sqrt(||sum x_i p_i - p_target||^2 / ||p_target||^2), computed
from the same inner products. Too narrow a target (smaller sigma_rel than the narrowest stored
profile, between snapshots) or one wider than the stored profiles span is refused with the
range that fits. Also refused: sigma_rel outside (0, 1/sqrt(12)) (phema.SIGMA_REL_MAX).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from difflab.errors import ConfigError
from difflab.training.phema import SNAPSHOT_FOLDER, check_sigma_rel, gamma_of

MAX_FIT_ERROR = 0.05  # relative L2 error of the matched profile (see the module docstring)


def profile_inner(t_a, gamma_a, t_b, gamma_b) -> np.ndarray:
    """<p(.; t_a, gamma_a), p(.; t_b, gamma_b)> over tau in [0, inf) (EDM2 Eq. 151), elementwise
    over broadcast arrays; float64."""
    t_a, gamma_a, t_b, gamma_b = (np.asarray(v, np.float64) for v in (t_a, gamma_a, t_b, gamma_b))
    exponent = np.where(t_a < t_b, gamma_b, -gamma_a)  # (t_short / t_long)^(gamma of t_long)
    numerator = (gamma_a + 1) * (gamma_b + 1) * (t_a / t_b) ** exponent
    return numerator / ((gamma_a + gamma_b + 1) * np.maximum(t_a, t_b))


def solve_coefficients(
    in_t: np.ndarray, in_gamma: np.ndarray, out_t: float, out_gamma: float
) -> tuple[np.ndarray, float]:
    """The least-squares coefficients (K,) of K stored profiles for one target profile, summing
    to 1, and the relative L2 error of the profile they make (Algorithm 3)."""
    in_t, in_gamma = np.asarray(in_t, np.float64), np.asarray(in_gamma, np.float64)
    gram = profile_inner(in_t[:, None], in_gamma[:, None], in_t[None, :], in_gamma[None, :])
    b = profile_inner(in_t, in_gamma, out_t, out_gamma)  # (K,)
    x = np.linalg.solve(gram, b)
    x = x / x.sum()
    target = float(profile_inner(out_t, out_gamma, out_t, out_gamma))
    squared = target - 2 * x @ b + x @ gram @ x  # ||sum x_i p_i - p_target||^2
    return x, float(np.sqrt(max(squared, 0.0) / target))


@dataclass(frozen=True)
class Snapshot:
    path: Path
    step: int
    sigma_rels: tuple[float, ...]


def list_snapshots(run_dir: Path) -> list[Snapshot]:
    """RUN/phema/step-N.safetensors, oldest first; a ConfigError naming train.phema_sigma_rels
    when there are none."""
    folder = Path(run_dir) / SNAPSHOT_FOLDER
    found = []
    for path in sorted(folder.glob("step-*.safetensors")) if folder.is_dir() else []:
        with safe_open(path, "pt") as f:
            meta = json.loads((f.metadata() or {})["phema"])
        found.append(Snapshot(path, int(meta["step"]), tuple(meta["sigma_rels"])))
    if not found:
        raise ConfigError(
            f"{run_dir} has no post-hoc EMA snapshots ({folder} is empty or missing): train with "
            "--set train.phema_sigma_rels=0.05,0.10 train.phema_every=N to store them"
        )
    return sorted(found, key=lambda s: s.step)


def basis(snapshots: list[Snapshot]) -> tuple[np.ndarray, np.ndarray]:
    """(t, gamma) of every stored profile, snapshot-major, as (K,) arrays."""
    t = [s.step for s in snapshots for _ in s.sigma_rels]
    gamma = [gamma_of(r) for s in snapshots for r in s.sigma_rels]
    return np.asarray(t, np.float64), np.asarray(gamma, np.float64)


def reconstructible(snapshots: list[Snapshot], grid: np.ndarray | None = None) -> tuple:
    """(lowest, highest) sigma_rel of `grid` that the snapshots match within MAX_FIT_ERROR at
    the last snapshot's step, or None."""
    t, gamma = basis(snapshots)
    grid = np.linspace(0.005, 0.285, 57) if grid is None else grid
    good = [
        s for s in grid if solve_coefficients(t, gamma, t.max(), gamma_of(s))[1] <= MAX_FIT_ERROR
    ]
    return (min(good), max(good)) if good else None


def coefficients_for(snapshots: list[Snapshot], sigma_rel: float) -> np.ndarray:
    """The coefficient (K,) of each stored profile for sigma_rel at the last snapshot's step;
    refuses a sigma_rel the snapshots cannot reconstruct (module docstring)."""
    check_sigma_rel(sigma_rel, "--sigma-rel")
    t, gamma = basis(snapshots)
    x, error = solve_coefficients(t, gamma, t.max(), gamma_of(sigma_rel))
    if error > MAX_FIT_ERROR:
        span = reconstructible(snapshots)
        fits = f"they reconstruct {span[0]:.3f} to {span[1]:.3f}" if span else "none fits"
        stored = ", ".join(f"{r:g}" for r in snapshots[-1].sigma_rels)
        raise ConfigError(
            f"--sigma-rel {sigma_rel:g} cannot be reconstructed from {len(snapshots)} snapshots "
            f"of sigma_rel {stored}: its profile is matched only to {error:.0%} "
            f"(limit {MAX_FIT_ERROR:.0%}); {fits}"
        )
    return x


@torch.no_grad()
def synthesise(snapshots: list[Snapshot], sigma_rel: float) -> dict[str, torch.Tensor]:
    """The weights of the power-function EMA of `sigma_rel` at the last snapshot's step: the
    coefficient-weighted sum of every stored profile, in float64, cast back to each tensor's
    dtype (integer buffers are the last snapshot's)."""
    x = coefficients_for(snapshots, sigma_rel)
    total: dict[str, torch.Tensor] = {}
    k = 0
    for snap in snapshots:
        tensors = load_file(snap.path)
        for i in range(len(snap.sigma_rels)):
            prefix = f"{i}."
            for key, value in tensors.items():
                if not key.startswith(prefix):
                    continue
                name = key[len(prefix) :]
                if value.is_floating_point():
                    total[name] = total.get(name, 0) + float(x[k]) * value.double()
                else:
                    total[name] = value
            k += 1
    dtypes = {key.split(".", 1)[1]: v.dtype for key, v in load_file(snapshots[-1].path).items()}
    return {name: v.to(dtypes[name]) for name, v in total.items()}
