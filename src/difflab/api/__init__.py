"""The Python API: the command line's runs, samples and training as objects for a notebook.

    import difflab
    run = difflab.train("toy2d", name="cb", train__steps=2000)   # as `difflab train`
    run = difflab.load("runs/cb")             # a run directory, an fp16 .safetensors file
    run = difflab.load("pretrained:mnist")    # or a run shipped in the package
    samples = run.sample(16, steps=20)        # the run's own sample.* settings, overridden
    samples.grid(); samples.save("s.png")     # Jupyter shows `samples` as its grid
    run.gif("reverse.gif")                    # the sampler's states as an animation
    straighter = difflab.reflow(flow_run, pairs=20000)   # as `difflab reflow`

A thin face over the code the CLI runs (`runs.load_run`, `Model.sample`, the CLI's sample
requests and training session), so both give the same numbers for the same settings.
"""

from difflab.api.reflow import reflow
from difflab.api.run import Run, load
from difflab.api.samples import Samples, Trajectory
from difflab.api.train import train

__all__ = ["Run", "Samples", "Trajectory", "load", "reflow", "train"]
