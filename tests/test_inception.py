"""metrics.inception: the pinned TF Inception-v3 against torch-fidelity itself.

The real weights (95 MB) are not needed: a randomly initialised network of the same architecture,
saved to a file with its own SHA-256, exercises the plumbing (resolution, hashing, quantisation,
batching) and must give torch-fidelity's numbers to round-off, since both run one module. Only
`test_real_weights_match_torch_fidelity` needs the real file and is skipped without it.
"""

import contextlib
import hashlib
import json
import os
import shutil
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torch_fidelity
from torch import nn
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
from torch_fidelity.metric_isc import isc_features_to_metric

from difflab.evaluation import inception
from difflab.evaluation.frechet import (
    feature_statistics,
    frechet_distance,
    kernel_inception_distance,
)
from difflab.evaluation.inception import (
    INCEPTION_FILENAME,
    INCEPTION_SHA256,
    INCEPTION_URL,
    InceptionExtractor,
    InceptionWeightsError,
    inception_score,
    resolve_inception_weights,
)
from difflab.evaluation.manifold import precision_recall
from difflab.report.grids import to_uint8

# read before the autouse fixture points torch hub at a temporary folder
REAL_CHECKPOINTS = Path(torch.hub.get_dir()) / "checkpoints"
# no file cache, no worker processes; small batches run faster on CPU (the stem's activations
# are 5.5 MB per image)
TF_KWARGS = dict(cuda=False, cache=False, verbose=False, save_cpu_ram=True, batch_size=8)


@contextlib.contextmanager
def _one_thread():
    """One intra-op thread: on the shared 2-core test machine a second one mostly waits (these
    tests ran 1.5-3x slower with two)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module", autouse=True)
def one_thread_here():
    with _one_thread():
        yield


@pytest.fixture(autouse=True)
def isolated_hub(tmp_path, monkeypatch) -> Path:
    """Each test gets an empty torch hub cache, no DIFFLAB_INCEPTION_WEIGHTS, and no network."""
    hub = tmp_path / "hub"
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    monkeypatch.delenv(inception.ENV_VAR, raising=False)

    def offline(url, dst, *args, **kwargs):  # as urllib fails without network
        raise urllib.error.URLError("no network in tests")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    return hub / "checkpoints"


class _Unloaded(FeatureExtractorInceptionV3):
    """torch-fidelity's network with the weights loading skipped, to initialise it ourselves."""

    def load_state_dict(self, *args, **kwargs):
        return None


@pytest.fixture(scope="session")
def random_weights(tmp_path_factory) -> tuple[Path, str]:
    """A seeded random Inception-v3 saved as torch-fidelity expects it: (file, SHA-256)."""
    folder = tmp_path_factory.mktemp("random-inception")
    torch.save({}, folder / "empty.pth")
    net = _Unloaded(
        "inception-v3-compat", ["2048"], feature_extractor_weights_path=folder / "empty.pth"
    )
    g = torch.Generator().manual_seed(0)
    for module in net.modules():
        if isinstance(module, nn.Conv2d):  # He init keeps the activation scale through ReLUs
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu", generator=g)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.normal_(module.bias, std=0.1, generator=g)
    # fc: weights orthogonal to the mean feature (which all images share, and which would
    # otherwise make every p(y|x) one peaked distribution, IS ~ 1) and large enough for an
    # Inception Score near 3 on 10 images; a bias unlike 0, so "logits" differ from the
    # "logits_unbiased" that IS uses
    with torch.no_grad(), _one_thread():
        (reference,) = net(_pixels(4, seed=99))
    mean = reference.mean(dim=0)  # (2048,)
    weight = torch.randn(1008, 2048, generator=g)
    weight -= (weight @ mean)[:, None] * mean / mean.square().sum()
    net.fc.weight.data = weight * 300 / 2048**0.5
    nn.init.normal_(net.fc.bias, std=1.0, generator=g)
    path = folder / "random-inception.pth"
    torch.save(net.state_dict(), path)
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def _pixels(n: int, seed: int, size: int = 32, shift: float = 0.0) -> torch.Tensor:
    """Smooth random RGB images, uint8 (n, 3, size, size): upsampled 4x4 noise, so that images
    differ in what a network sees; `shift` brightens them (a second distribution)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g) + shift
    smooth = F.interpolate(low, size=size, mode="bilinear", align_corners=False)
    return (smooth.clamp(0, 1) * 255).round().to(torch.uint8)


def _signed(pixels: torch.Tensor) -> torch.Tensor:
    return pixels.float() / 127.5 - 1


class _Pixels(torch.utils.data.Dataset):
    """uint8 (3, H, W) images, as torch-fidelity's calculate_metrics takes them."""

    def __init__(self, pixels: torch.Tensor):
        self.pixels = pixels

    def __len__(self) -> int:
        return len(self.pixels)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.pixels[i]


@pytest.fixture(scope="module")
def ours(random_weights):
    """Our extractor on 10 images in batches of 4 (so the last batch is short)."""
    path, sha256 = random_weights
    extractor = InceptionExtractor(path, sha256=sha256, batch_size=4)
    pixels = _pixels(10, seed=1)
    return extractor, pixels, extractor.features(_signed(pixels)), extractor.logits(_signed(pixels))


# --- features and the Inception Score against torch-fidelity ----------------------------------


def test_features_and_logits_equal_torch_fidelitys(ours, random_weights):
    extractor, pixels, features, logits = ours
    names = ["2048", "logits_unbiased", "logits"]
    theirs = FeatureExtractorInceptionV3(
        "x", names, feature_extractor_weights_path=random_weights[0]
    )
    # in our batches of 4: the fc layer's float32 sums of 2048 terms round differently with other
    # batch shapes (by up to ~2e-4 on these logits of ~30)
    with torch.no_grad():
        outputs = [theirs.eval()(batch) for batch in pixels.split(4)]
    ref_features, ref_logits, ref_biased = (
        torch.cat(column) for column in zip(*outputs, strict=True)
    )
    assert features.shape == (10, 2048) and features.dtype == torch.float32
    assert logits.shape == (10, 1008) and logits.dtype == torch.float32
    torch.testing.assert_close(features, ref_features, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits, ref_biased, atol=0.1)  # the unbiased ones, as IS uses
    assert features.std(dim=0).mean() > 0.01  # images differ: a comparison with content
    assert not features.is_inference()  # usable like any tensor, in place too
    assert extractor.name == "inception-v3-tf" and extractor.feature_dim == 2048
    assert extractor.weights_sha256 == random_weights[1] and not extractor.standard


def test_inception_score_equals_torch_fidelitys_calculate_metrics(ours, random_weights):
    _, pixels, _, logits = ours
    metrics = torch_fidelity.calculate_metrics(
        input1=_Pixels(pixels),
        isc=True,
        isc_splits=3,  # 10 images: chunks of 3, 3 and 4
        feature_extractor_weights_path=str(random_weights[0]),
        **TF_KWARGS,
    )
    mean, std = inception_score(logits, splits=3)
    assert mean > 2  # at most 4 (images per chunk): far from the trivial 1
    assert mean == pytest.approx(metrics["inception_score_mean"], rel=1e-6)
    assert std == pytest.approx(metrics["inception_score_std"], rel=1e-4, abs=1e-9)


@pytest.mark.parametrize(("n", "splits", "seed"), [(50, 10, 2020), (37, 4, 7), (5, 1, 0)])
def test_inception_score_is_isc_features_to_metric(n, splits, seed):
    logits = torch.randn(n, 1008, generator=torch.Generator().manual_seed(n)) * 4
    theirs = isc_features_to_metric(logits, splits=splits, rng_seed=seed)
    mean, std = inception_score(logits, splits=splits, seed=seed)
    assert mean == pytest.approx(theirs["inception_score_mean"], rel=1e-12)
    assert std == pytest.approx(theirs["inception_score_std"], rel=1e-9, abs=1e-12)


def test_inception_score_closed_forms():
    # one confident class per image, K classes equally often: KL = log K, so IS = K (logits this
    # far apart make p(y|x) = 0 in float64, where torch-fidelity's 0 * log 0 gives NaN)
    k = 8
    one_hot = F.one_hot(torch.arange(4 * k) % k, 1008).double() * 1000
    assert inception_score(one_hot, splits=1) == pytest.approx((k, 0.0), abs=1e-9)
    # every image alike: p(y|x) = p(y), KL = 0, IS = 1
    same = torch.randn(1, 1008).expand(20, -1)
    assert inception_score(same, splits=4) == pytest.approx((1.0, 0.0), abs=1e-12)
    with pytest.raises(ValueError, match="lower splits"):
        inception_score(torch.randn(5, 1008), splits=10)


# --- FID, KID and precision/recall against torch-fidelity on an early layer ------------------


def test_fid_kid_and_precision_recall_of_layer_64_equal_torch_fidelitys(random_weights):
    # layer "64" is cheap (the network's stem) and its 64-D covariance needs only ~100 images
    path, sha256 = random_weights
    extractor = InceptionExtractor(path, sha256=sha256, layer="64", batch_size=8)
    assert extractor.name == "inception-v3-tf@64" and extractor.feature_dim == 64
    pixels1, pixels2 = _pixels(80, seed=2), _pixels(80, seed=3, shift=0.2)
    f1, f2 = extractor.features(_signed(pixels1)), extractor.features(_signed(pixels2))
    metrics = torch_fidelity.calculate_metrics(
        input1=_Pixels(pixels1),  # torch-fidelity's convention: input1 generated, input2 real
        input2=_Pixels(pixels2),
        fid=True,
        kid=True,
        prc=True,
        # subsets of all 80 samples: every subset is the whole set, so the subset draws (numpy's
        # there, torch's here) cannot make the two differ
        kid_subsets=2,
        kid_subset_size=80,
        feature_extractor="inception-v3-compat",  # else precision/recall would use VGG-16
        feature_extractor_weights_path=str(path),
        **{f"feature_layer_{metric}": "64" for metric in ("fid", "kid", "prc")},
        **TF_KWARGS,
    )
    fid = frechet_distance(*feature_statistics(f1), *feature_statistics(f2))
    assert fid > 1  # two distributions apart: 4.67 when written
    # theirs: float32 means, eigenvalues of S1 S2 by numpy; 2e-7 apart when written
    assert fid == pytest.approx(metrics["frechet_inception_distance"], rel=1e-6)
    kid, _ = kernel_inception_distance(f1, f2, num_subsets=2, subset_size=80)
    # theirs sums the cubic kernel in float32, ours in float64: 8e-7 apart when written
    assert kid == pytest.approx(metrics["kernel_inception_distance_mean"], rel=1e-5)
    precision, recall = precision_recall(f1, f2)
    # the same counts out of 80 (theirs are float32 means: 0.08749999851 for 7/80)
    assert precision == pytest.approx(metrics["precision"], abs=1e-6)
    assert recall == pytest.approx(metrics["recall"], abs=1e-6)
    assert 0 < precision < 1 or 0 < recall < 1  # not a trivial comparison


# --- preprocessing and input checks ------------------------------------------------------------


def test_grey_equals_the_image_repeated_to_three_channels(random_weights):
    path, sha256 = random_weights
    extractor = InceptionExtractor(path, sha256=sha256, layer="64")
    grey = _signed(_pixels(3, seed=4)[:, :1])  # (3, 1, 32, 32)
    assert torch.equal(extractor.features(grey), extractor.features(grey.expand(-1, 3, -1, -1)))


def test_quantisation_is_the_one_images_are_saved_with():
    # ties (x + 1) * 127.5 = k + 1/2 included (132 exact ones in float32): both round half up
    x = torch.cat([torch.linspace(-1, 1, 2001), torch.arange(256) / 127.5 - 1 + 1 / 255])
    x = torch.cat([x, torch.tensor([-1.00005, 1.00005])]).reshape(1, 1, -1, 1)
    ours = inception._to_uint8(x)  # (1, 3, H, 1)
    saved = torch.from_numpy(to_uint8(x.numpy())).permute(0, 3, 1, 2)  # (1, 1, H, 1)
    assert torch.equal(ours, saved.expand(-1, 3, -1, -1))
    half_to_even = ((x + 1) * 127.5).round().to(torch.uint8)  # torch.round: would not match
    assert not torch.equal(ours[:, :1], half_to_even)
    pixels = _pixels(2, seed=5)
    assert torch.equal(inception._to_uint8(_signed(pixels)), pixels)  # exact round trip


@pytest.mark.parametrize(
    ("images", "hint"),
    [
        (torch.zeros(2, 3, 8, 8, dtype=torch.uint8), "x / 127.5 - 1"),
        (torch.rand(2, 3, 8, 8) * 2, "min/max"),  # [0, 2]: not in [-1, 1]
        (torch.full((1, 3, 8, 8), float("nan")), "nan"),
        (torch.zeros(3, 8, 8), "images\\[:, None\\]"),  # no batch axis
        (torch.zeros(2, 4, 8, 8), "C = 1 or 3"),
        (torch.zeros(0, 3, 8, 8), "N >= 1"),
    ],
    ids=["uint8", "range", "nan", "3d", "channels", "empty"],
)
def test_bad_images_are_refused_with_the_fix(ours, images, hint):
    extractor = ours[0]
    with pytest.raises(ValueError, match=hint) as info:
        extractor.features(images)
    assert str(tuple(images.shape)) in str(info.value)  # says what it got


def test_bad_settings_are_refused(random_weights):
    with pytest.raises(ValueError, match="layer must be one of"):
        InceptionExtractor(random_weights[0], sha256=random_weights[1], layer="1000")


def test_standard_means_the_pinned_weights_at_pool3(random_weights, monkeypatch):
    # no real weights here: pretend resolution found them (the network is never built)
    monkeypatch.setattr(inception, "resolve_inception_weights", lambda *a, **k: random_weights[0])
    assert InceptionExtractor().standard
    assert not InceptionExtractor(layer="768").standard
    assert not InceptionExtractor(sha256=random_weights[1]).standard


# --- finding and verifying the weights ---------------------------------------------------------


def test_explicit_path_and_environment_variable(random_weights, tmp_path, monkeypatch):
    path, sha256 = random_weights
    assert resolve_inception_weights(path, sha256=sha256) == path.absolute()
    monkeypatch.setenv(inception.ENV_VAR, str(path))
    assert resolve_inception_weights(sha256=sha256) == path.absolute()
    monkeypatch.setenv(inception.ENV_VAR, str(tmp_path / "nowhere.pth"))
    assert resolve_inception_weights(path, sha256=sha256) == path.absolute()  # argument first
    with pytest.raises(InceptionWeightsError, match=inception.ENV_VAR) as info:
        resolve_inception_weights(sha256=sha256)
    assert "nowhere.pth" in str(info.value) and INCEPTION_URL in str(info.value)


@pytest.mark.parametrize("name", [INCEPTION_FILENAME, "pt_inception-2015-12-05-6726825d.pth"])
def test_hub_cache_under_either_name(random_weights, isolated_hub, name):
    isolated_hub.mkdir(parents=True)
    shutil.copy(random_weights[0], isolated_hub / name)
    assert resolve_inception_weights(sha256=random_weights[1]) == isolated_hub / name


def test_verified_files_are_not_hashed_again(random_weights, tmp_path, monkeypatch):
    path = tmp_path / "weights.pth"
    shutil.copy(random_weights[0], path)
    calls = []
    hash_file = inception.sha256_file
    monkeypatch.setattr(inception, "sha256_file", lambda p: calls.append(p) or hash_file(p))
    for _ in range(3):
        resolve_inception_weights(path, sha256=random_weights[1])
    assert len(calls) == 1
    # a changed file is hashed again. It is known by size and mtime, and a write within one
    # clock tick of the copy can keep the mtime, so move that on as a later edit would
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(data)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**6))
    with pytest.raises(InceptionWeightsError):
        resolve_inception_weights(path, sha256=random_weights[1])
    assert len(calls) == 2


def test_offline_error_says_where_to_put_the_file(isolated_hub):
    for download in (True, False):
        with pytest.raises(InceptionWeightsError) as info:
            resolve_inception_weights(download=download)
        message = str(info.value)
        for needed in [INCEPTION_FILENAME, str(isolated_hub), INCEPTION_SHA256, INCEPTION_URL]:
            assert needed in message
        assert "--inception-weights PATH" in message and f"{inception.ENV_VAR}=PATH" in message
    assert not isolated_hub.exists() or not any(isolated_hub.iterdir())  # nothing half-written


def test_wrong_file_is_refused_and_not_cached(random_weights, isolated_hub):
    with pytest.raises(InceptionWeightsError) as info:
        resolve_inception_weights(random_weights[0])  # a valid network, not the pinned one
    message = str(info.value)
    assert str(random_weights[0]) in message and random_weights[1] in message
    assert INCEPTION_SHA256 in message
    assert not (isolated_hub / INCEPTION_FILENAME).exists()
    isolated_hub.mkdir(parents=True)
    (isolated_hub / INCEPTION_FILENAME).write_bytes(b"truncated")
    with pytest.raises(InceptionWeightsError, match="delete it"):
        resolve_inception_weights()


def test_download_is_verified_before_it_gets_the_final_name(
    random_weights, isolated_hub, monkeypatch
):
    def fake_download(url, dst, *args, **kwargs):
        assert url == INCEPTION_URL and Path(dst).parent == isolated_hub
        shutil.copy(random_weights[0], dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    with pytest.raises(InceptionWeightsError, match="not saved"):
        resolve_inception_weights()  # the bytes are not the pinned network's
    assert list(isolated_hub.iterdir()) == []  # neither the final name nor a temporary file
    path = resolve_inception_weights(sha256=random_weights[1])
    assert path == isolated_hub / INCEPTION_FILENAME and list(isolated_hub.iterdir()) == [path]

    def no_download(*args, **kwargs):
        raise AssertionError("the cached file should have been used")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    assert resolve_inception_weights(sha256=random_weights[1]) == path


def test_real_weights_match_torch_fidelity():
    found = [
        REAL_CHECKPOINTS / name for name in (INCEPTION_FILENAME, inception._PYTORCH_FID_FILENAME)
    ]
    found = [path for path in found if path.is_file()]
    if not found:
        pytest.skip(f"the real Inception-v3 weights are not in {REAL_CHECKPOINTS} (offline)")
    extractor = InceptionExtractor(found[0], download=False)
    assert extractor.standard
    pixels = _pixels(4, seed=6)
    theirs = FeatureExtractorInceptionV3(
        "x", ["2048"], feature_extractor_weights_path=str(found[0])
    )
    with torch.no_grad():
        (reference,) = theirs.eval()(pixels)
    torch.testing.assert_close(extractor.features(_signed(pixels)), reference, rtol=1e-5, atol=1e-5)
    logits = extractor.logits(_signed(pixels)).numpy()
    assert np.isfinite(logits).all()


# --- through `difflab eval` ----------------------------------------------------------------------


def _npz_of(path: Path, pixels: torch.Tensor) -> Path:
    np.savez(path, samples=_signed(pixels).numpy())
    return path


def test_eval_cli_uses_the_given_weights_and_records_them(random_weights, tmp_path, capsys):
    from difflab.cli import main

    weights, sha = random_weights
    fake = _npz_of(tmp_path / "fake.npz", _pixels(12, seed=1))
    real = _npz_of(tmp_path / "real.npz", _pixels(12, seed=2, shift=0.2))
    argv = ["eval", str(fake), "--reference", str(real), "--metric", "kid,is,pr", "--json"]
    argv += ["--inception-weights", str(weights), "--inception-sha256", sha]
    assert main(argv) == 0
    rows = {r["metric"]: r for r in json.loads(capsys.readouterr().out)["rows"]}
    assert set(rows) == {"kid", "is", "precision", "recall"}
    for r in rows.values():
        assert r["extractor"] == "inception-v3-tf" and r["extractor_sha256"] == sha
        assert r["extractor_standard"] is False and r["n_generated"] == 12
        assert r["label"] == r["metric"] + "0.012k"
    ours = InceptionExtractor(weights, sha256=sha)
    f_fake = ours.features(_signed(_pixels(12, seed=1)))
    f_real = ours.features(_signed(_pixels(12, seed=2, shift=0.2)))
    assert rows["kid"]["value"] == pytest.approx(kernel_inception_distance(f_fake, f_real)[0])
    assert rows["is"]["value"] == pytest.approx(
        inception_score(ours.logits(_signed(_pixels(12, seed=1))))[0]
    )


def test_eval_cli_fid_needs_enough_samples_and_the_weights(random_weights, tmp_path, capsys):
    from difflab.cli import main

    weights, sha = random_weights
    fake = _npz_of(tmp_path / "fake.npz", _pixels(8, seed=1))
    argv = ["eval", str(fake), "--reference", str(fake), "--metric", "fid"]
    assert main([*argv, "--inception-weights", str(weights), "--inception-sha256", sha]) == 2
    err = capsys.readouterr().err
    assert "at least 2049 samples for 2048-dim features, got 8; use --n 20480" in err
    assert main(argv) == 2  # no weights anywhere, no network
    err = capsys.readouterr().err
    assert (
        err.startswith("difflab: error:") and INCEPTION_FILENAME in err and INCEPTION_SHA256 in err
    )
