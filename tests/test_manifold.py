"""metrics.manifold (improved precision and recall) against torch-fidelity and closed forms."""

import pytest
import torch
from torch_fidelity.metric_prc import prc_features_to_metric

from difflab.evaluation.manifold import precision_recall


def _gaussian(n: int, d: int, g: torch.Generator, scale: float = 1.0, shift: float = 0.0):
    return torch.randn(n, d, generator=g, dtype=torch.float64) * scale + shift


def _torch_fidelity(generated, real, k: int) -> tuple[float, float]:
    out = prc_features_to_metric(generated, real, prc_neighborhood=k, verbose=False)
    return out["precision"], out["recall"]


# --- torch-fidelity -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n_gen", "n_real", "d", "k", "batch_size"),
    [
        (200, 300, 32, 3, 10000),  # one block; cdist's matrix-product path (> 25 rows)
        (257, 129, 64, 3, 50),  # sizes not divisible by the block
        (60, 50, 8, 1, 7),  # small blocks, k = 1
        (101, 90, 30, 5, 2),  # blocks smaller than k + 1
        (20, 24, 16, 3, 10000),  # <= 25 rows: cdist's direct path
    ],
)
def test_equals_torch_fidelity_on_random_features(n_gen, n_real, d, k, batch_size):
    g = torch.Generator().manual_seed(n_gen + n_real)
    generated, real = _gaussian(n_gen, d, g, shift=0.3), _gaussian(n_real, d, g)
    precision, recall = precision_recall(generated, real, k=k, batch_size=batch_size)
    assert 0 < precision < 1 and 0 < recall < 1  # a case where every comparison counts
    # torch-fidelity takes the share in float32
    assert (precision, recall) == pytest.approx(_torch_fidelity(generated, real, k), rel=1e-6)


def test_float32_features_equal_torch_fidelity_on_them_upcast():
    g = torch.Generator().manual_seed(1)
    generated, real = _gaussian(150, 40, g, 1.2).float(), _gaussian(120, 40, g).float()
    expected = _torch_fidelity(generated.double(), real.double(), 3)
    assert precision_recall(generated, real, batch_size=64) == pytest.approx(expected, rel=1e-6)


def test_no_distance_block_exceeds_batch_size_squared(monkeypatch):
    shapes, cdist = [], torch.cdist

    def recording_cdist(a, b, *args, **kwargs):
        shapes.append((len(a), len(b)))
        return cdist(a, b, *args, **kwargs)

    monkeypatch.setattr(torch, "cdist", recording_cdist)
    g = torch.Generator().manual_seed(2)
    precision_recall(_gaussian(70, 8, g), _gaussian(45, 8, g), batch_size=16)
    assert max(max(shape) for shape in shapes) == 16
    # four passes (two radii, two coverages), each over ceil(N/16) x ceil(M/16) blocks
    assert len(shapes) == 5 * 5 + 3 * 3 + 5 * 3 + 3 * 5


# --- closed forms -------------------------------------------------------------------------------


def test_identical_sets_give_one_and_one():
    x = _gaussian(80, 32, torch.Generator().manual_seed(3))
    assert precision_recall(x, x.clone()) == (1.0, 1.0)


def test_far_apart_clusters_give_zero_and_zero():
    # radii are about the cluster width (0.01 * sqrt(2 D)), the gap is 100 * sqrt(D)
    g = torch.Generator().manual_seed(4)
    generated, real = _gaussian(60, 16, g, 0.01), _gaussian(40, 16, g, 0.01, 100.0)
    assert precision_recall(generated, real) == (0.0, 0.0)


def test_covering_one_of_two_equal_real_clusters_gives_precision_one_recall_half():
    g = torch.Generator().manual_seed(5)
    cluster_a, cluster_b = _gaussian(50, 8, g), _gaussian(50, 8, g, shift=100.0)
    real = torch.cat([cluster_a, cluster_b])
    # generated = cluster A's points: each sits on a real point (distance 0), and no generated
    # ball (radius ~ the cluster width) reaches cluster B
    assert precision_recall(cluster_a, real) == (1.0, 0.5)
    # a fresh draw from A: B's points are never covered and B's balls stay in B, so against A u B
    # recall halves and precision is unchanged
    generated = _gaussian(200, 8, g)
    precision_a, recall_a = precision_recall(generated, cluster_a)
    assert 0.5 < recall_a < 1
    assert precision_recall(generated, real) == (precision_a, recall_a / 2)


def test_duplicates_are_neighbours_at_distance_zero():
    # each real point 4 times: with k = 3 its 3rd other neighbour is a copy, so every real ball
    # has radius 0 and holds exactly the copies; 40 features and 80 rows take cdist's
    # matrix-product path, whose round-off would otherwise decide the `<=`
    g = torch.Generator().manual_seed(6)
    distinct = _gaussian(20, 40, g, 10.0)
    real = distinct.repeat(4, 1)  # (80, 40)
    assert precision_recall(distinct, real) == (1.0, 1.0)
    # moved by 1e-4 |x|: outside every radius-0 ball, still inside the generated balls
    nudged = distinct + 1e-4 * 10.0 * torch.randn(distinct.shape, generator=g, dtype=torch.float64)
    assert precision_recall(nudged, real) == (0.0, 1.0)
    # mode collapse: one real point generated 50 times covers only its 4 copies out of 80
    assert precision_recall(real[7].repeat(50, 1), real) == (1.0, 4 / 80)


# --- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("generated", "real", "kwargs", "message"),
    [
        (torch.randn(10), torch.randn(10, 4), {}, r"generated features must be \(N, D\)"),
        (torch.randn(10, 4), torch.randn(10, 2, 2), {}, r"real features must be \(N, D\)"),
        (torch.randn(10, 4), torch.randn(10, 5), {}, "must have one D, got 4 and 5"),
        (torch.randn(3, 4), torch.randn(10, 4), {}, "needs more than k samples per set"),
        (torch.randn(10, 4), torch.randn(5, 4), {"k": 5}, "got 5 real; pass at least 6"),
        (torch.randn(10, 4), torch.randn(10, 4), {"k": 0}, "need k >= 1"),
        (torch.randn(10, 4), torch.randn(10, 4), {"batch_size": 0}, "batch_size >= 1"),
        (torch.full((10, 4), torch.nan), torch.randn(10, 4), {}, "contain NaN or infinity"),
    ],
)
def test_bad_input_is_refused_with_a_reason(generated, real, kwargs, message):
    with pytest.raises(ValueError, match=message):
        precision_recall(generated, real, **kwargs)
