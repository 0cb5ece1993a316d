"""metrics.frechet against closed forms, direct formulas and torch-fidelity / pytorch-fid;
metrics.classifier (the judge).

The judge on real MNIST (>= 99% and Frechet distance ranking corruptions) is tested through the
CLI in test_evaluation.py.
"""

import inspect
import json

import numpy as np
import pytest
import scipy.linalg
import torch
from pytorch_fid.fid_score import calculate_frechet_distance
from torch_fidelity.defaults import DEFAULTS as TORCH_FIDELITY_DEFAULTS
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_kid import kid_features_to_metric

from difflab.data.images import TensorImages
from difflab.evaluation.classifier import (
    Judge,
    JudgeFileError,
    fit_judge,
    judge_features,
    judge_predict,
    load_judge,
    save_judge,
)
from difflab.evaluation.frechet import (
    feature_statistics,
    frechet_distance,
    kernel_inception_distance,
)


def _random_spd(d: int, g: torch.Generator) -> torch.Tensor:
    a = torch.randn(d, 2 * d, generator=g, dtype=torch.float64)
    return a @ a.T / (2 * d) + 0.05 * torch.eye(d, dtype=torch.float64)


def _fd_with_sqrtm(mu1, sigma1, mu2, sigma2) -> float:
    """The textbook formula with scipy's general matrix square root (as in pytorch-fid)."""
    mu1, sigma1, mu2, sigma2 = (a.numpy() for a in (mu1, sigma1, mu2, sigma2))
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1 + sigma2 - 2 * covmean))


# --- Frechet distance --------------------------------------------------------------------------


def test_frechet_of_identical_statistics_is_zero():
    g = torch.Generator().manual_seed(0)
    mu, sigma = torch.randn(32, generator=g, dtype=torch.float64), _random_spd(32, g)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-8


def test_frechet_with_equal_covariances_is_the_squared_mean_gap():
    g = torch.Generator().manual_seed(1)
    mu1, mu2 = torch.randn(2, 16, generator=g, dtype=torch.float64)
    sigma = _random_spd(16, g)
    expected = float((mu1 - mu2).square().sum())
    assert frechet_distance(mu1, sigma, mu2, sigma) == pytest.approx(expected, rel=1e-10)


def test_frechet_in_one_dimension_by_hand():
    # W2^2(N(m1, s1^2), N(m2, s2^2)) = (m1 - m2)^2 + (s1 - s2)^2
    m1, s1, m2, s2 = 0.3, 2.0, -1.0, 0.5
    mu1, sigma1, mu2, sigma2 = (
        torch.tensor(v, dtype=torch.float64) for v in ([m1], [[s1**2]], [m2], [[s2**2]])
    )
    fd = frechet_distance(mu1, sigma1, mu2, sigma2)
    assert fd == pytest.approx((m1 - m2) ** 2 + (s1 - s2) ** 2, rel=1e-12)


def test_frechet_of_diagonal_covariances_is_a_sum_over_axes():
    a = torch.tensor([1.0, 4.0, 0.25, 9.0], dtype=torch.float64)
    b = torch.tensor([2.0, 1.0, 0.25, 16.0], dtype=torch.float64)
    mu1 = torch.tensor([0.0, 1.0, 2.0, 3.0], dtype=torch.float64)
    mu2 = torch.tensor([1.0, 1.0, 0.0, 3.0], dtype=torch.float64)
    expected = float((mu1 - mu2).square().sum() + (a.sqrt() - b.sqrt()).square().sum())
    fd = frechet_distance(mu1, torch.diag(a), mu2, torch.diag(b))
    assert fd == pytest.approx(expected, rel=1e-12)


def test_frechet_copes_with_singular_covariances():
    # a dead feature (variance 0) makes S1 singular, where sqrtm(S1 S2) needs an eps * I retry;
    # the axes are independent, so the 1-D formula holds on each: (1 - 2)^2 + (0 - 1)^2
    fd = frechet_distance(
        torch.zeros(2),
        torch.diag(torch.tensor([1.0, 0.0])),
        torch.zeros(2),
        torch.diag(torch.tensor([4.0, 1.0])),
    )
    assert fd == pytest.approx(2.0, rel=1e-12)


@pytest.mark.parametrize("d", [2, 16, 64])
def test_frechet_is_symmetric_and_agrees_with_sqrtm(d):
    g = torch.Generator().manual_seed(d)
    mu1, mu2 = torch.randn(2, d, generator=g, dtype=torch.float64)
    sigma1, sigma2 = _random_spd(d, g), _random_spd(d, g)
    fd = frechet_distance(mu1, sigma1, mu2, sigma2)
    assert fd == pytest.approx(frechet_distance(mu2, sigma2, mu1, sigma1), rel=1e-10)
    assert fd == pytest.approx(_fd_with_sqrtm(mu1, sigma1, mu2, sigma2), rel=1e-6)


def _correlated_features(n: int, d: int, shift: float, g: torch.Generator) -> torch.Tensor:
    """n samples (n, d) of a Gaussian with a random, non-diagonal covariance and mean shift."""
    mixing = torch.randn(d, d, generator=g, dtype=torch.float64) / d**0.5
    return torch.randn(n, d, generator=g, dtype=torch.float64) @ mixing + shift


# pytorch-fid passes scipy.linalg.sqrtm a `disp` argument that SciPy deprecates
@pytest.mark.filterwarnings("ignore:The `disp` argument is deprecated:DeprecationWarning")
@pytest.mark.parametrize(("n1", "n2", "d"), [(300, 300, 8), (500, 200, 32)])
def test_frechet_of_features_equals_torch_fidelity_and_pytorch_fid(n1, n2, d):
    g = torch.Generator().manual_seed(n1 + d)
    f1, f2 = _correlated_features(n1, d, 0.0, g), _correlated_features(n2, d, 0.3, g)
    fd = frechet_distance(*feature_statistics(f1), *feature_statistics(f2))

    stats1, stats2 = fid_features_to_statistics(f1), fid_features_to_statistics(f2)
    reference = fid_statistics_to_metric(stats1, stats2, verbose=False)
    assert fd == pytest.approx(reference["frechet_inception_distance"], rel=1e-6)

    x1, x2 = f1.numpy(), f2.numpy()
    moments1 = x1.mean(axis=0), np.cov(x1, rowvar=False)
    moments2 = x2.mean(axis=0), np.cov(x2, rowvar=False)
    assert fd == pytest.approx(calculate_frechet_distance(*moments1, *moments2), rel=1e-6)


def test_feature_statistics_are_the_mean_and_unbiased_covariance():
    x = torch.randn(300, 5, generator=torch.Generator().manual_seed(2))
    mu, sigma = feature_statistics(x)
    assert mu.dtype == sigma.dtype == torch.float64 and sigma.shape == (5, 5)
    assert np.allclose(mu.numpy(), x.double().numpy().mean(0), atol=1e-12)
    assert np.allclose(sigma.numpy(), np.cov(x.double().numpy(), rowvar=False), atol=1e-12)


def test_feature_statistics_refuse_too_few_samples():
    message = (
        "100 samples cannot estimate a 128 x 128 covariance; use at least 129 "
        "(preferably 1280) samples, e.g. --n 2000"
    )
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        feature_statistics(torch.randn(100, 128))
    feature_statistics(torch.randn(129, 128))  # the least that works


# --- kernel distance (KID) ---------------------------------------------------------------------


def _mmd2_by_loops(x: torch.Tensor, y: torch.Tensor) -> float:
    """Unbiased MMD^2 (Gretton et al. 2012, eq. 3) term by term, as written in the paper."""
    m, d = x.shape

    def k(a, b):
        return (float(a @ b) / d + 1) ** 3

    pairs = [(i, j) for i in range(m) for j in range(m)]
    within_x = sum(k(x[i], x[j]) for i, j in pairs if i != j) / (m * (m - 1))
    within_y = sum(k(y[i], y[j]) for i, j in pairs if i != j) / (m * (m - 1))
    across = sum(k(x[i], y[j]) for i, j in pairs) / m**2
    return within_x + within_y - 2 * across


def test_kid_matches_the_direct_formula():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(12, 3, generator=g, dtype=torch.float64)
    y = torch.randn(12, 3, generator=g, dtype=torch.float64) + 0.3
    mean, std = kernel_inception_distance(x, y, num_subsets=1, subset_size=12)
    assert mean == pytest.approx(_mmd2_by_loops(x, y), rel=1e-12) and std == 0.0


def test_kid_is_near_zero_within_and_positive_across_distributions():
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(2, 1000, 16, generator=g)
    mean, std = kernel_inception_distance(x, y, num_subsets=20, subset_size=300)
    assert abs(mean) < 3 * std
    shifted_mean, shifted_std = kernel_inception_distance(
        x, y + 0.5, num_subsets=20, subset_size=300
    )
    assert shifted_mean > 10 * shifted_std and shifted_mean > 20 * abs(mean)


def _torch_fidelity_kid(x, y, num_subsets, subset_size, **kwargs) -> tuple[float, float]:
    out = kid_features_to_metric(
        x, y, kid_subsets=num_subsets, kid_subset_size=subset_size, verbose=False, **kwargs
    )
    return out["kernel_inception_distance_mean"], out["kernel_inception_distance_std"]


@pytest.mark.parametrize(
    ("n1", "n2", "d", "subset_size", "seed"),
    [(200, 200, 8, 50, 2020), (150, 310, 32, 100, 7), (64, 90, 4, 64, 0)],
)
def test_kid_equals_torch_fidelity_on_the_same_features(n1, n2, d, subset_size, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n1, d, generator=g, dtype=torch.float64)
    y = torch.randn(n2, d, generator=g, dtype=torch.float64) * 1.1 + 0.1
    ours = kernel_inception_distance(x, y, num_subsets=10, subset_size=subset_size, seed=seed)
    reference = _torch_fidelity_kid(x, y, 10, subset_size, rng_seed=seed)
    assert ours == pytest.approx(reference, rel=1e-9)
    # float32 features: we compute in float64, so we equal torch-fidelity on them upcast
    x32, y32 = x.float(), y.float()
    ours = kernel_inception_distance(x32, y32, num_subsets=10, subset_size=subset_size, seed=seed)
    reference = _torch_fidelity_kid(x32.double(), y32.double(), 10, subset_size, rng_seed=seed)
    assert ours == pytest.approx(reference, rel=1e-9)


def test_kid_defaults_are_torch_fidelitys():
    defaults = inspect.signature(kernel_inception_distance).parameters
    assert defaults["num_subsets"].default == TORCH_FIDELITY_DEFAULTS["kid_subsets"]
    assert defaults["subset_size"].default == TORCH_FIDELITY_DEFAULTS["kid_subset_size"]
    assert defaults["seed"].default == TORCH_FIDELITY_DEFAULTS["rng_seed"]


def test_kid_caps_the_subset_size_where_torch_fidelity_refuses():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(40, 4, generator=g, dtype=torch.float64)
    y = torch.randn(90, 4, generator=g, dtype=torch.float64)
    with pytest.raises(ValueError, match="KID subset size 1000"):
        _torch_fidelity_kid(x, y, 5, 1000)
    ours = kernel_inception_distance(x, y, num_subsets=5, subset_size=1000)
    assert ours == pytest.approx(_torch_fidelity_kid(x, y, 5, 40), rel=1e-9)


# --- the judge ---------------------------------------------------------------------------------


def _images(n: int, channels: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, channels, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_judge_shapes():
    torch.manual_seed(0)
    model = Judge(in_channels=3, num_classes=5).eval()
    x = _images(4, channels=3)
    assert model(x).shape == (4, 5)
    assert model.features(x).shape == (4, 128)
    assert judge_features(model, x, batch_size=3).shape == (4, 128)
    assert judge_predict(model, x).shape == (4,) and judge_predict(model, x).dtype == torch.long


def test_judge_outputs_do_not_depend_on_batch_size_or_mode():
    torch.manual_seed(0)
    model = Judge()  # left in train mode: judge_features must use eval mode and restore it
    x = _images(10)
    a, b = judge_features(model, x, batch_size=3), judge_features(model, x, batch_size=10)
    assert torch.allclose(a, b, atol=1e-5) and model.training


@pytest.mark.parametrize(
    "images", [_images(4) * 127.5 + 127.5, _images(4)[:, :, 2:30, 2:30], _images(4, channels=3)]
)
def test_judge_rejects_other_ranges_and_shapes(images):
    with pytest.raises(
        ValueError, match=r"images must be in \[-1, 1\] with shape \(N, C, 32, 32\)"
    ):
        judge_predict(Judge(), images)


def test_saved_judge_reloads_and_a_tampered_one_is_refused(tmp_path):
    torch.manual_seed(0)
    model, path = Judge().eval(), tmp_path / "judge.safetensors"
    save_judge(model, path, {"dataset": "mnist"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["judge.json", "judge.safetensors"]
    meta = json.loads((tmp_path / "judge.json").read_text())
    assert meta["dataset"] == "mnist" and meta["arch"] == model.arch and len(meta["sha256"]) == 64
    x = _images(6)
    assert torch.equal(judge_features(load_judge(path), x), judge_features(model, x))
    data = bytearray(path.read_bytes())
    data[-1] ^= 1  # one bit of the last weight
    path.write_bytes(bytes(data))
    with pytest.raises(JudgeFileError, match="do not match their recorded SHA-256; retrain with"):
        load_judge(path)


def _bars(n: int, seed: int) -> TensorImages:
    """A two-class toy set: a horizontal (label 0) or vertical (label 1) bar at a random place."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=g)
    where = torch.randint(4, 28, (n,), generator=g)
    images = torch.zeros(n, 1, 32, 32, dtype=torch.uint8)
    for i in range(n):
        bar = (slice(None), slice(where[i], where[i] + 2), slice(4, 28))
        images[i][bar if labels[i] == 0 else (bar[0], bar[2], bar[1])] = 255
    return TensorImages(images, labels)


def test_fit_judge_learns_a_toy_task_and_is_seeded():
    train, test = _bars(256, seed=0), _bars(64, seed=1)
    model, accuracy = fit_judge(train, test, epochs=2, batch_size=32, seed=0)
    again, _ = fit_judge(train, test, epochs=2, batch_size=32, seed=0)
    assert accuracy >= 0.95
    assert all(
        torch.equal(p, q)
        for p, q in zip(model.state_dict().values(), again.state_dict().values(), strict=True)
    )
