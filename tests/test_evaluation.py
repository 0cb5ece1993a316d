"""Image evaluation end to end: the judge trained through the CLI on real MNIST, `difflab eval` on
runs, .npz files and folders, the reference-feature cache, training-time metrics, and bad input.

The protocol pieces with answers we can derive (labels, cache keys, reference subsets) use a fake
linear extractor; everything else runs the real judge on real MNIST from ../shared/data.
"""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from difflab.cli import main
from difflab.data.folders import to_signed
from difflab.data.images import load_image_dataset
from difflab.evaluation import protocol
from difflab.evaluation.classifier import JudgeExtractor
from difflab.evaluation.protocol import EvalError, evaluate_images, label, open_reference
from difflab.evaluation.sampled import default_judge_path

# --- the protocol with a fake extractor ----------------------------------------------------------


class LinearExtractor:
    """Features = images flattened times a fixed matrix; counts how many images it has seen."""

    name, weights_sha256 = "linear", "0" * 64

    def __init__(self, pixels: int, dim: int = 4, seed: int = 0):
        self.matrix = torch.randn(pixels, dim, generator=torch.Generator().manual_seed(seed))
        self.feature_dim, self.seen = dim, 0

    def features(self, images):
        self.seen += len(images)
        return images.flatten(1) @ self.matrix


def test_labels_carry_the_sample_count_below_fifty_thousand():
    assert label("fid", 50_000) == "fid50k" and label("fid", 60_000) == "fid60k"
    assert label("fid", 5000) == "fid5k" and label("kid_judge", 2500) == "kid_judge2.5k"
    assert label("fd_judge", 500) == "fd_judge0.5k"


def _npz(path, images, labels=None):
    arrays = {"samples": images.numpy()}
    if labels is not None:
        arrays["labels"] = labels.numpy()
    np.savez(path, **arrays)
    return path


def test_reference_features_are_cached_by_data_subset_and_extractor(tmp_path):
    g = torch.Generator().manual_seed(0)
    real = torch.rand(64, 1, 4, 4, generator=g) * 2 - 1
    ref_file = _npz(tmp_path / "real.npz", real)
    extractor = LinearExtractor(16)
    ref = open_reference(str(ref_file), (1, 4, 4), n=40)
    first = protocol.reference_features(ref, extractor)
    assert extractor.seen == 40
    again = protocol.reference_features(open_reference(str(ref_file), (1, 4, 4), n=40), extractor)
    assert extractor.seen == 40 and torch.equal(first, again)  # from the cache
    idx = torch.randperm(64, generator=torch.Generator().manual_seed(0))[:40]
    assert torch.allclose(first, extractor.features(real[idx]))  # the seeded subset
    extractor.seen = 0
    protocol.reference_features(open_reference(str(ref_file), (1, 4, 4), n=41), extractor)
    assert extractor.seen == 41  # another subset: another entry
    other = LinearExtractor(16, seed=1)
    other.weights_sha256 = "1" * 64
    protocol.reference_features(ref, other)
    assert other.seen == 40  # another extractor: another entry
    _npz(ref_file, real.flip(0))  # the file changed: its hash, so the key, changed
    extractor.seen = 0
    protocol.reference_features(open_reference(str(ref_file), (1, 4, 4), n=40), extractor)
    assert extractor.seen == 40


def test_a_corrupted_cache_entry_is_recomputed(tmp_path):
    real = torch.rand(30, 1, 4, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1
    ref_file = str(_npz(tmp_path / "real.npz", real))
    ref = open_reference(ref_file, (1, 4, 4))
    extractor = LinearExtractor(16)
    good = protocol.reference_features(ref, extractor)
    entries = sorted(protocol.cache_dir().glob("reference/*.npz"))
    newest = max(entries, key=lambda p: p.stat().st_mtime_ns)
    np.savez(newest.open("wb"), features=np.zeros((30, 4), dtype=np.float32))
    extractor.seen = 0
    assert torch.equal(protocol.reference_features(ref, extractor), good)
    assert extractor.seen == 0  # within one process, features are computed once per reference
    again = open_reference(ref_file, (1, 4, 4))  # as a later process opens it
    assert torch.equal(protocol.reference_features(again, extractor), good)
    assert extractor.seen == 30  # the hash in the sidecar no longer matched


def test_evaluate_images_rows_carry_provenance_and_refuse_too_few_samples(tmp_path):
    g = torch.Generator().manual_seed(0)
    real = torch.rand(200, 1, 4, 4, generator=g) * 2 - 1
    ref = open_reference(str(_npz(tmp_path / "r.npz", real)), (1, 4, 4))
    fake = (torch.rand(100, 1, 4, 4, generator=g) * 2 - 1) * 0.5
    extractors = {"judge": LinearExtractor(16)}
    rows = evaluate_images(fake, None, ["fd_judge", "pr_judge"], ref, extractors, {"seed": 7})
    assert [r["metric"] for r in rows] == ["fd_judge", "precision_judge", "recall_judge"]
    for r in rows:
        assert r["n_generated"] == 100 and r["n_reference"] == 200 and r["seed"] == 7
        assert r["extractor"] == "linear" and r["extractor_sha256"] == "0" * 64
        assert r["label"].endswith("0.1k") and r["reference"] == str(tmp_path / "r.npz")
    with pytest.raises(
        EvalError, match=r"at least 5 samples for 4-dim features, got 4; use --n 40"
    ):
        evaluate_images(fake[:4], None, ["fd_judge"], ref, extractors, {})
    with pytest.raises(EvalError, match="needs class labels"):
        evaluate_images(fake, None, ["accuracy"], ref, extractors, {})
    with pytest.raises(EvalError, match="unknown metric"):
        evaluate_images(fake, None, ["fdd"], ref, extractors, {})


def test_references_refuse_other_shapes_and_unknown_specs(tmp_path):
    ref_file = _npz(tmp_path / "r.npz", torch.zeros(5, 3, 8, 8))
    with pytest.raises(EvalError, match=r"holds images \(3, 8, 8\) but the samples are"):
        open_reference(str(ref_file), (1, 8, 8))
    with pytest.raises(EvalError, match="not a data set split"):
        open_reference("imagenet:val", (3, 8, 8))
    with pytest.raises(EvalError, match="does not exist"):
        open_reference(str(tmp_path / "missing.npz"), (3, 8, 8))


# --- the real judge on real MNIST ---------------------------------------------------------------


@pytest.fixture(scope="module")
def judge(tmp_path_factory):
    """A one-epoch judge, trained through `difflab eval train-classifier` into the default cache
    path: 0.990 on MNIST's test split in a third of the default's time (the default three epochs
    are tested, slow, in test_the_default_judge_reaches_99_percent)."""
    from conftest import SHARED_DATA

    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent (CI always has it)")
    argv = ["eval", "train-classifier", "--dataset", "mnist", "--root", str(SHARED_DATA)]
    assert main([*argv, "--epochs", "1", "--quiet"]) == 0
    path = default_judge_path("mnist")
    return JudgeExtractor(path), SHARED_DATA


@pytest.mark.slow
def test_the_default_judge_reaches_99_percent(tmp_path):
    from conftest import SHARED_DATA

    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent (CI always has it)")
    out = tmp_path / "judge.safetensors"
    argv = ["eval", "train-classifier", "--dataset", "mnist", "--root", str(SHARED_DATA)]
    assert main([*argv, "--out", str(out), "--quiet"]) == 0
    assert JudgeExtractor(out).test_accuracy >= 0.99


def _blur(x, sigma):
    """Gaussian blur of x (N, 1, H, W), separable, radius 3 sigma; borders repeat."""
    radius = math.ceil(3 * sigma)
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    kernel = torch.exp(-(t**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    x = F.pad(x, (radius,) * 4, mode="replicate")
    return F.conv2d(F.conv2d(x, kernel.view(1, 1, 1, -1)), kernel.view(1, 1, -1, 1))


@pytest.fixture(scope="module")
def halves(judge):
    test, _ = load_image_dataset("mnist", judge[1], "test")
    x = to_signed(test.images)  # (10000, 1, 32, 32)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    return x[perm[:5000]], x[perm[5000:]], test.labels[perm[5000:]]


def test_judge_reaches_98_5_percent_and_its_fd_ranks_corruption_severity(judge, halves, tmp_path):
    extractor, _ = judge
    assert extractor.test_accuracy >= 0.985  # one epoch (0.990 measured)
    half_a, half_b, labels_b = halves
    ref = open_reference(str(_npz(tmp_path / "a.npz", half_a)), (1, 32, 32))

    def fd(images):
        rows = evaluate_images(images, None, ["fd_judge"], ref, {"judge": extractor}, {})
        return rows[0]["value"]

    g = torch.Generator().manual_seed(1)
    baseline = fd(half_b)
    blurred = [fd(_blur(half_b, s)) for s in (0.5, 1.0, 2.0)]
    noised = [
        fd((half_b + s * torch.randn(half_b.shape, generator=g)).clamp(-1, 1))
        for s in (0.1, 0.2, 0.4)
    ]
    print(f"FD halves {baseline:.3g}; blur {blurred}; noise {noised}")
    # two halves of one split are close; every corruption is further, and more of it, further
    assert baseline < blurred[0] < blurred[1] < blurred[2]
    assert baseline < noised[0] < noised[1] < noised[2]
    assert 5 * baseline < min(blurred[1], noised[1])
    rows = evaluate_images(half_b, labels_b, ["accuracy"], ref, {"judge": extractor}, {})
    assert abs(rows[0]["value"] - extractor.test_accuracy) < 0.01  # real digits: test accuracy


def test_eval_of_npz_and_folder_sources_through_the_cli(judge, halves, tmp_path, capsys):
    _, data = judge
    _, half_b, labels_b = halves
    fake = _npz(tmp_path / "b.npz", half_b[:1000], labels_b[:1000])
    argv = ["eval", str(fake), "--reference", "mnist:test", "--root", str(data), "--json"]
    assert main([*argv, "--n-reference", "2000"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    by = {r["metric"]: r for r in rows}
    assert set(by) == {"fd_judge", "kid_judge", "precision_judge", "recall_judge", "accuracy"}
    assert by["fd_judge"]["label"] == "fd_judge1k" and by["fd_judge"]["n_reference"] == 2000
    assert by["fd_judge"]["reference"] == "mnist:test" and by["accuracy"]["value"] > 0.98
    assert by["precision_judge"]["value"] > 0.8 and by["recall_judge"]["value"] > 0.8
    # the same images as PNG files in a folder give the same numbers (8-bit round trip aside)
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, img in enumerate(((half_b[:1000, 0] + 1) * 127.5).round().byte().numpy()):
        Image.fromarray(img).save(folder / f"{i:04d}.png")
    argv = ["eval", str(folder), "--reference", "mnist:test", "--root", str(data), "--json"]
    assert main([*argv, "--n-reference", "2000", "--metric", "fd_judge"]) == 0
    (row,) = json.loads(capsys.readouterr().out)["rows"]
    assert row["value"] == pytest.approx(by["fd_judge"]["value"], rel=1e-3)


@pytest.mark.parametrize(
    ("make", "extra", "message"),
    [
        (lambda x: x * 127.5 + 127.5, [], "must be in [-1, 1]"),  # 0..255 pixels
        (lambda x: x[:50], [], "at least 129 samples for 128-dim features"),
        (lambda x: x, ["--root", "{tmp}/nowhere"], "not found"),
        (lambda x: x, ["--judge", "{tmp}/tampered.safetensors"], "do not match their recorded"),
        (lambda x: x, ["--reference", "cifar10:test"], "holds images (3, 32, 32)"),
    ],
)
def test_eval_bad_input_is_one_clear_line(judge, halves, tmp_path, capsys, make, extra, message):
    _, data = judge
    before = sorted(protocol.cache_dir().rglob("*"))
    fake = _npz(tmp_path / "bad.npz", make(halves[1][:300]))
    argv = ["eval", str(fake), "--reference", "mnist:test", "--root", str(data)]
    extra = [e.replace("{tmp}", str(tmp_path)) for e in extra]
    source = default_judge_path("mnist")
    weights = bytearray(source.read_bytes())
    weights[-1] ^= 1  # one flipped bit in the last weight
    (tmp_path / "tampered.safetensors").write_bytes(bytes(weights))
    (tmp_path / "tampered.json").write_text(source.with_suffix(".json").read_text())
    assert main([*argv, "--n-reference", "500", "--metric", "fd_judge", *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("difflab: error:") and message in err, err
    assert sorted(protocol.cache_dir().rglob("*")) == before  # nothing cached


# --- runs: eval, compare, training-time metric ---------------------------------------------------

TINY_MNIST = [
    "model.unet.base_channels=16",
    "model.unet.channel_mults=1,2",
    "model.unet.num_res_blocks=1",
    "model.unet.attention_levels=1",
    "model.unet.norm_groups=8",
    "train.batch_size=8",
    "train.steps=4",
    "train.warmup_steps=1",
    "train.log_every=2",
    "train.checkpoint_every=2",
    "train.eval_every=2",
    "train.eval_n=130",
    "train.best_metric=eval",
    "sample.sampler=ddim",
    "sample.steps=2",
    "sample.n=130",
    "sample.batch_size=130",
]


@pytest.fixture(scope="module")
def mnist_run(judge, tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    sets = [f"data.root={judge[1]}", "data.class_conditional=true", *TINY_MNIST]
    argv = ["train", "--preset", "mnist", "--runs", str(runs), "--name", "m", "--quiet"]
    assert main([*argv, "--no-finish", *[x for s in sets for x in ("--set", s)]]) == 0
    return runs / "m"


def test_training_logs_the_metric_keeps_the_best_and_plots_its_history(mnist_run):
    rows = [json.loads(line) for line in (mnist_run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "metric" in r.get("eval", {})]
    assert [r["step"] for r in evals] == [2, 4]
    assert all(r["eval"]["label"] == "fd_judge0.13k" and r["eval"]["n"] == 130 for r in evals)
    best = json.loads((mnist_run / "checkpoints" / "best" / "best.json").read_text())
    values = {r["step"]: r["eval"]["fd_judge"] for r in evals}
    assert best["metric"] == "fd_judge" and best["value"] == min(values.values())
    assert best["step"] == min(values, key=values.get)
    assert main(["plot", str(mnist_run), "--quiet"]) == 0
    assert (mnist_run / "plots" / "eval_history.png").stat().st_size > 1000


def test_eval_of_a_run_records_how_samples_were_drawn(mnist_run, capsys):
    argv = ["eval", str(mnist_run), "--n", "130", "--steps", "2", "--guidance", "1.5", "--json"]
    assert main([*argv, "--reference", "mnist:test", "--n-reference", "500", "--quiet"]) == 0
    captured = capsys.readouterr()
    rows = json.loads(captured.out)["rows"]
    (written,) = (mnist_run / "evals").glob("eval-*.json")  # written without --out as well
    assert json.loads(written.read_text())["rows"] == rows and str(written) in captured.err
    for r in rows:
        assert (r["sampler"], r["steps"], r["nfe"], r["guidance"]) == ("ddim", 2, 2, 1.5)
        assert r["ema"] is True and r["seed"] == 1 and r["step"] == 4
        assert r["ms_per_sample"] > 0 and r["peak_memory_mb"] > 0
    assert {r["metric"] for r in rows} >= {"fd_judge", "accuracy"}


def test_eval_compare_sweeps_an_image_run(mnist_run, capsys, tmp_path):
    out = tmp_path / "c.json"
    argv = ["eval", str(mnist_run), "--compare", "--samplers", "ddim", "--nfe", "1,2"]
    argv += ["--guidances", "1,2", "--metric", "fd_judge", "--n", "130", "--out", str(out)]
    assert main([*argv, "--reference", "mnist:test", "--n-reference", "500", "--quiet"]) == 0
    result = json.loads(out.read_text())
    got = {(r["nfe"], r["guidance"]) for r in result["rows"]}
    assert got == {(1, 1.0), (1, 2.0), (2, 1.0), (2, 2.0)}
    assert all(r["fd_judge"] > 0 and r["ms_per_sample"] > 0 for r in result["rows"])
    assert (mnist_run / "plots" / "compare.png").is_file()
    assert "fd_judge0.13k" in capsys.readouterr().out


def test_training_with_a_metric_and_no_judge_stops_before_the_first_step(judge, tmp_path, capsys):
    sets = [f"data.root={judge[1]}", *TINY_MNIST]
    argv = ["train", "--preset", "mnist", "--runs", str(tmp_path), "--name", "x", "--quiet"]
    judge_file = default_judge_path("fashion")
    assert not judge_file.exists()
    sets[1:1] = ["data.name=fashion"]
    assert main([*argv, *[x for s in sets for x in ("--set", s)]]) == 2
    assert "train.eval_every needs its metric" in capsys.readouterr().err


def test_eval_of_a_sampled_npz_keeps_how_it_was_drawn(mnist_run, judge, tmp_path, capsys):
    out = tmp_path / "s.npz"
    argv = ["sample", str(mnist_run), "--out", str(out), "--n", "130", "--steps", "2"]
    assert main([*argv, "--guidance", "2", "--quiet"]) == 0
    capsys.readouterr()
    argv = ["eval", str(out), "--dataset", "mnist", "--reference", "mnist:test", "--json"]
    argv += ["--root", str(judge[1]), "--n-reference", "500"]
    assert main([*argv, "--metric", "fd_judge,accuracy"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    for r in rows:
        assert (r["sampler"], r["steps"], r["nfe"], r["guidance"], r["ema"]) == (
            "ddim",
            2,
            2,
            2.0,
            True,
        )
        assert r["source"] == str(out) and r["seed"] == 1
