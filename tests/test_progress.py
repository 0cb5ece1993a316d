"""Progress bars (samplers/progress.py): tqdm's text bars outside Jupyter, so the command line
prints what it always has; a widget in a Jupyter kernel with ipywidgets (difflab[notebook]);
text bars, and no warning, in a kernel without it."""

import sys
import types
import warnings

import pytest
import torch
from tqdm.std import tqdm as text_bar

from difflab.diffusion import schedules
from difflab.diffusion.prediction import Denoiser
from difflab.nets.mlp import MLP
from difflab.samplers import generate, sample_ddim, timesteps
from difflab.samplers.progress import bar_class

pytestmark = pytest.mark.usefixtures("one_thread")


class ZMQInteractiveShell:  # what get_ipython() returns inside a Jupyter kernel, by name
    pass


@pytest.fixture
def fresh_choice():
    """The bar kind is decided once per process: forget it before and after each test."""
    bar_class.cache_clear()
    yield
    bar_class.cache_clear()


def _in_kernel(monkeypatch):
    """get_ipython() as inside a Jupyter kernel."""
    ipython = types.ModuleType("IPython")
    ipython.get_ipython = ZMQInteractiveShell
    monkeypatch.setitem(sys.modules, "IPython", ipython)


def _sample_with_a_bar():
    torch.manual_seed(0)
    schedule = schedules.linear(1000)
    denoiser = Denoiser(MLP(dim=2, width=8, depth=1), schedule, "eps")
    ts = timesteps(schedule, 3)
    return generate(sample_ddim, denoiser, 5, (2,), ts, progress=True)


def test_outside_jupyter_the_bars_are_text(fresh_choice, capsys):
    assert bar_class() is text_bar
    _sample_with_a_bar()
    assert "sampling: 100%" in capsys.readouterr().err  # tqdm's line on stderr, as before


def test_a_kernel_without_ipywidgets_gets_text_bars_and_no_warning(
    fresh_choice, monkeypatch, capsys
):
    _in_kernel(monkeypatch)
    monkeypatch.setitem(sys.modules, "ipywidgets", None)  # `import ipywidgets` fails
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # tqdm.auto would warn "IProgress not found" here
        assert bar_class() is text_bar
        samples = _sample_with_a_bar()
    assert samples.shape == (5, 2) and "sampling: 100%" in capsys.readouterr().err


def test_a_kernel_with_ipywidgets_gets_widgets(fresh_choice, monkeypatch):
    pytest.importorskip("ipywidgets", reason="pip install difflab[notebook] for widget bars")
    from tqdm.notebook import tqdm as widget_bar

    _in_kernel(monkeypatch)  # after the imports: ipywidgets reads the real IPython
    assert bar_class() is widget_bar
