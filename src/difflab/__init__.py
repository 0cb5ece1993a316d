"""difflab: train, sample and evaluate diffusion models.

The pieces most users touch:

    from difflab import schedules, Denoiser, LossSpec, diffusion_loss, EMA
    from difflab.samplers import sample_ddpm, sample_ddim, timesteps, generate
    from difflab.config import preset
    from difflab.training.loop import train
    from difflab.runs import load_run            # run.model.sample(sample_config)
"""

from difflab.diffusion import schedules
from difflab.diffusion.objectives import LossSpec, diffusion_loss
from difflab.diffusion.prediction import Denoiser
from difflab.training.ema import EMA

__version__ = "0.1.0"
__all__ = ["EMA", "Denoiser", "LossSpec", "diffusion_loss", "schedules"]
