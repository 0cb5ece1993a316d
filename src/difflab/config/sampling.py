"""The `sample` section: how a run's figures, metrics and `difflab sample` draw (a stdlib
leaf, so configs load without torch; every sampler option is a field, kept in step with the
sampler registry by a test)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SampleConfig:
    # ddpm | ddim | euler | heun | dpmpp_2m | dpmpp_3m | dpmpp_2m_sde | dpm_2s | unipc | pc
    sampler: str = "ddpm"
    steps: int = 1000
    # discrete only: linspace | leading | trailing | quadratic; any: uniform | logsnr | karras
    spacing: str = "quadratic"
    t_end: float = 0.0  # last nonzero time of logsnr / karras grids; 0 = the schedule's t_min
    eta: float = 0.0  # DDIM only
    order: int = 2  # UniPC's order (1..3)
    s_churn: float = 0.0  # euler / heun: EDM's stochastic churn (0 = deterministic ODE)
    s_tmin: float = 0.0  # churn only between these noise levels (sigma / alpha)
    s_tmax: float = 0.0  # 0 = no upper limit
    s_noise: float = 1.0
    snr: float = 0.16  # pc: Langevin corrector signal-to-noise ratio
    n_corrector: int = 1  # pc: corrector steps per predictor step
    variance: str = "small"  # DDPM only: small (beta-tilde) | large (beta)
    n: int = 20000  # samples drawn for the run's figures and evaluation
    batch_size: int = 20000
    seed: int = 1
    use_ema: bool = True
    guidance: float = 1.0  # classifier-free guidance scale (0 = unconditional, 1 = conditional)
    # guidance only at noise levels (sigma / alpha) in (guidance_tmin, guidance_tmax], conditional
    # elsewhere (Kynkäänniemi et al. 2024); guidance_tmax = 0 = no upper limit, 0 and 0 = everywhere
    guidance_tmin: float = 0.0
    guidance_tmax: float = 0.0
    # cfg (classifier-free) | apg (adaptive projected) | cfg++ (DDIM, eta 0; guidance in [0, 1])
    # | auto (autoguidance by the weak model guide_with): diffusion/guidance.py
    guidance_method: str = "cfg"
    apg_eta: float = 0.0  # APG: weight of the update's part parallel to x0_c (1 + no more = cfg)
    apg_momentum: float = -0.75  # APG: beta of the update's running sum (< 0; 0 = none)
    apg_threshold: float = 0.0  # APG: norm threshold r of the update (x0 units; 0 = none)
    guide_with: str = ""  # auto: the weak run, RUN or RUN:step-N (an earlier checkpoint)
    precision: str = "fp32"  # fp32 | bf16 | fp16: autocast for the network while sampling
    compile: bool = False  # torch.compile the network for sampling
    shift: float = 1.0  # time shift t' = s t / (1 + (s - 1) t) of the grid (SD3); 1 = none
    cm_sigmas: str = ""  # consistency: noise levels (sigma / alpha) after the first; "" = grid's


def use_ema_of(sample: SampleConfig, choice: bool | None = None) -> bool:
    """Whether a run is sampled from its EMA weights (True) or its raw, online ones (False).

    The one place that decides it: an explicit `choice` (the command line's --raw, an export's
    format) wins; otherwise the run's own `sample.use_ema`. Loading a run (`runs.load_run`)
    and the training-time grids and metric ask here, and every file and row that records
    `ema` writes what the weights sampled were.
    """
    return sample.use_ema if choice is None else choice


def guidance_record(sample: SampleConfig) -> dict:
    """The guidance method and its own settings, for result rows and samples files: {} for
    plain cfg (the default, so such rows read as before), else guidance_method plus APG's
    eta, momentum and threshold, or autoguidance's weak run."""
    if sample.guidance_method == "cfg":
        return {}
    row = {"guidance_method": sample.guidance_method}
    if sample.guidance_method == "apg":
        row.update(
            apg_eta=sample.apg_eta,
            apg_momentum=sample.apg_momentum,
            apg_threshold=sample.apg_threshold,
        )
    if sample.guidance_method == "auto":
        row["guide_with"] = sample.guide_with
    return row
