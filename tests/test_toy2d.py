import math

import pytest
import torch

from difflab.data.toy2d import TOY2D, checkerboard, in_checkerboard, sample_toy2d
from difflab.evaluation.toy2d import in_square_fraction, sliced_wasserstein2


def test_checkerboard_follows_its_definition():
    x = checkerboard(50000, torch.Generator().manual_seed(0))
    assert in_square_fraction(x) == 1.0
    u = x * 2 + 2  # back to [0, 4]^2: every kept square equally full
    cells = (u.floor()[:, 0] * 4 + u.floor()[:, 1]).long().bincount(minlength=16).float() / len(x)
    kept = [i * 4 + j for i in range(4) for j in range(4) if (i + j) % 2 == 0]
    assert torch.allclose(cells[kept], torch.full((8,), 1 / 8), atol=0.01)


def test_in_checkerboard_on_known_points():
    pts = torch.tensor([[-0.75, -0.75], [-0.25, -0.75], [0.25, 0.25], [1.2, 0.0], [0.75, -0.75]])
    assert in_checkerboard(pts).tolist() == [True, False, True, False, False]


@pytest.mark.parametrize("name", TOY2D)
def test_datasets_are_seeded_and_scaled(name):
    a = sample_toy2d(name, 1000, torch.Generator().manual_seed(3))
    b = sample_toy2d(name, 1000, torch.Generator().manual_seed(3))
    assert a.shape == (1000, 2) and a.dtype == torch.float32 and torch.equal(a, b)
    assert a.abs().max() < 1.5


def test_sliced_w2_of_a_shift_is_closed_form():
    # SW2(x, x + c)^2 = E_theta (theta . c)^2 = |c|^2 / D for theta uniform on the sphere
    x = torch.randn(4000, 2, generator=torch.Generator().manual_seed(0))
    c = torch.tensor([0.3, 0.4])
    assert sliced_wasserstein2(x, x + c, num_projections=4000) == pytest.approx(
        0.5 / math.sqrt(2), rel=0.03
    )
    assert sliced_wasserstein2(x, x) == 0.0


def test_bad_dataset_name():
    with pytest.raises(ValueError, match="checkerboard"):
        sample_toy2d("spiral", 10)
