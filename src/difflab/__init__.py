"""difflab: train, sample and evaluate diffusion models.

A notebook starts here (the Python API, `difflab.api`; loaded on first use):

    run = difflab.train("toy2d", name="cb", train__steps=2000)   # or difflab.load("runs/cb")
    run.sample(16, steps=20)                   # Samples: .tensor, .images, .grid(), .save()

The pieces underneath:

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
API = ("Run", "Samples", "Trajectory", "load", "reflow", "train")
__all__ = ["EMA", "Denoiser", "LossSpec", "diffusion_loss", "schedules", *API]


def __getattr__(name: str):
    """difflab.load, difflab.train, ...: the API (and the report and CLI code it stands on)
    is imported when first used, so `import difflab` stays light."""
    if name in API:
        from difflab import api

        return getattr(api, name)
    raise AttributeError(f"module 'difflab' has no attribute {name!r}")
