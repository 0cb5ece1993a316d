import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))  # tests/gaussian.py helpers

# Under pytest-xdist (pyproject's `-n 2`) each of the two workers has one core: two intra-op
# threads each would oversubscribe the 2-core machine (`one_thread` below says how
# much that costs); `-p no:xdist` runs one process with both threads.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
# Optional parts whose tests must run, not skip: .ci/run installs them and names them here
REQUIRED = set(os.environ.get("DIFFLAB_TESTS_REQUIRE", "").split())


def needs(part: str, available: bool, install: str) -> pytest.MarkDecorator:
    """Skip a test whose optional part (an extra, a browser) is missing, saying how to install
    it; where DIFFLAB_TESTS_REQUIRE names the part (CI installs it), the test runs and fails, so
    CI can never skip the default presets' or the report's paths unnoticed."""
    missing = not available and part not in REQUIRED
    return pytest.mark.skipif(missing, reason=f"{part} is not installed: {install}")


@pytest.fixture(scope="session", autouse=True)
def difflab_cache(tmp_path_factory) -> Path:
    """Caches (reference features, judges) go to a fresh folder, never the user's ~/.cache."""
    folder = tmp_path_factory.mktemp("difflab-cache")
    os.environ["DIFFLAB_CACHE"] = str(folder)
    return folder


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent (CI always has it)")
    return SHARED_DATA


@pytest.fixture
def one_thread():
    """One intra-op thread: for tests of many small element-wise steps, where a second thread
    only adds waiting (on a busy 2-core machine it made sampler tests 5-15x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# A toy run small enough that starting processes is most of its cost (the multi-process tests of
# test_distributed.py, test_scale.py and test_faults.py). A constant lr, so a run of 2 steps
# extended to 4 on resume equals one of 4 (cosine decay depends on train.steps).
SMALL_TOY = [
    "model.mlp.width=32",
    "model.mlp.depth=1",
    "train.batch_size=64",
    "train.log_every=1",
    "train.checkpoint_every=2",
    "train.threads=1",
    "train.lr_schedule=constant",
]


# 2 processes sum the gradients in another order than 1 (measured: 7e-9 apart)
SUM_ORDER = 1e-6


def run_difflab(*argv, env=None, cwd=None, module="difflab", timeout=300):
    """`python -m <module> argv` in a fresh process with one thread, as a user would start it;
    gloo's processes meet on the loopback interface (all of them run on this machine)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", **(env or {})}
    command = [sys.executable, "-m", module, *argv]
    return subprocess.run(
        command, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def train_here(cfg, run_dir: Path, **kwargs) -> Path:
    """train() in this process without progress bars, restoring torch's thread count afterwards
    (train.threads=1 sets it for the whole process)."""
    from difflab.training.loop import train

    threads = torch.get_num_threads()
    try:
        return train(cfg, run_dir, progress=False, **kwargs)
    finally:
        torch.set_num_threads(threads)


def assert_same_weights(a: Path, b: Path, atol: float = 0.0):
    """The model and EMA weights of checkpoints a and b: bit for bit, or within atol."""
    for which in ("model", "ema"):
        wa, wb = load_file(a / f"{which}.safetensors"), load_file(b / f"{which}.safetensors")
        assert wa.keys() == wb.keys(), which
        for k in wa:
            if atol == 0.0:
                assert torch.equal(wa[k], wb[k]), f"{which} {k}"
            else:
                torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=atol, msg=f"{which} {k}")


def stripes_folder(root: Path) -> Path:
    """An image folder of two classes: 'h' horizontal stripes, 'v' vertical stripes; 6 grey
    images each, 20x20, of stripe widths 2, 3 and 4."""
    import numpy as np
    from PIL import Image

    for name, axis in (("h", 0), ("v", 1)):
        (root / name).mkdir()
        for k in range(6):
            stripes = ((np.arange(20) // (2 + k % 3)) % 2 * 255).astype(np.uint8)
            img = np.repeat(stripes[:, None] if axis == 0 else stripes[None, :], 20, axis=1 - axis)
            Image.fromarray(img).save(root / name / f"{k}.png")
    return root
