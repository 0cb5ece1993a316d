"""difflab: train, sample and evaluate diffusion models.

The pieces most users touch:

    from difflab import schedules, Denoiser, LossSpec, diffusion_loss, EMA
    from difflab.samplers import sample_ddpm, sample_ddim, timesteps, generate
    from difflab.config import preset
    from difflab.train import train
"""

from difflab.ema import EMA
from difflab.objectives import LossSpec, diffusion_loss
from difflab.prediction import Denoiser

__version__ = "0.1.0"
__all__ = ["EMA", "Denoiser", "LossSpec", "diffusion_loss"]
