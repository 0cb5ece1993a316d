"""Matplotlib figures without pyplot: each figure gets its own Agg canvas, so drawing a run's
figures touches no process-wide state (pyplot's backend, its list of open figures). A notebook
that imports difflab keeps its inline backend, and a figure is freed with its last reference."""

from __future__ import annotations

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def subplots(nrows: int = 1, ncols: int = 1, *, figsize=None, dpi=None, **kwargs):
    """`pyplot.subplots`' (figure, axes) without pyplot; kwargs go to `Figure.subplots`
    (squeeze, sharex, ...)."""
    fig = Figure(figsize=figsize, dpi=dpi)
    FigureCanvasAgg(fig)  # attaches itself: savefig and buffer_rgba draw through it
    return fig, fig.subplots(nrows, ncols, **kwargs)


def figure_image(fig: Figure):
    """The figure drawn into an RGB PIL image (for GIF frames and notebook display)."""
    from PIL import Image

    fig.canvas.draw()
    return Image.fromarray(np.asarray(fig.canvas.buffer_rgba())[..., :3])
