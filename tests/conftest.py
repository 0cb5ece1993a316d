import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # tests/gaussian.py helpers

torch.set_num_threads(2)

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
