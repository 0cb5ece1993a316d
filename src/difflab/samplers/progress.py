"""Progress bars for every long loop (sampling, training, reflow's pairs): a notebook widget
inside a Jupyter kernel where ipywidgets is installed (`pip install difflab[notebook]`), tqdm's
text bar everywhere else, so the command line prints exactly what it always has and a kernel
without ipywidgets gets text bars instead of tqdm's "IProgress not found" warning."""

from __future__ import annotations

import functools
import sys

from tqdm.std import tqdm as text_bar


def progress_bar(**kwargs):
    """A tqdm bar of the kind this process shows (`bar_class`); kwargs as for `tqdm.tqdm`
    (total, desc, unit, initial, disable)."""
    return bar_class()(**kwargs)


@functools.cache
def bar_class() -> type:
    """tqdm.notebook's widget bar in a Jupyter kernel with ipywidgets, else tqdm's text bar.
    Decided on the first bar (not at import), once per process."""
    if not _in_jupyter_kernel():
        return text_bar
    try:
        import ipywidgets  # noqa: F401  (what tqdm.notebook draws with)
    except ImportError:
        return text_bar
    from tqdm.notebook import tqdm as widget_bar

    return widget_bar


def _in_jupyter_kernel() -> bool:
    """Inside a Jupyter kernel (Jupyter, VS Code, Colab), not a terminal IPython or a script."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    return type(shell).__name__ == "ZMQInteractiveShell"
