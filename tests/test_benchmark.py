"""`difflab bench`: tiny runs write complete results; FLOPs match closed forms; the diffusers
mapping has our parameter counts; bad input ends in one clear line."""

import json
import warnings

import pytest
import torch
from torch import nn

from difflab import benchmark, devices
from difflab.benchmark import BenchOptions, NoEquivalent, count_flops, resolve, unet2d_config
from difflab.cli import main
from difflab.config import ConfigError, preset

TINY = [
    "--batch-size",
    "4",
    "--steps",
    "2",
    "--warmup",
    "1",
    "--samplers",
    "ddim",
    "--nfe",
    "2",
    "--matmul-size",
    "64",
    "--threads",
    "1",
    "--precision",
    "fp32",
]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """toy2d and mnist through the command line, as a user would run them."""
    out = tmp_path_factory.mktemp("bench")
    found = {}
    for name in ("toy2d", "mnist"):
        with warnings.catch_warnings():  # a 64 x 64 matmul is below what convolutions reach
            warnings.filterwarnings("ignore", ".*above the measured matmul peak")
            assert main(["bench", name, *TINY, "--out", str(out)]) == 0
        found[name] = json.loads((out / f"bench-{name}-cpu.json").read_text())
        found[name + ".md"] = (out / f"bench-{name}-cpu.md").read_text()
    return found


def _check_training(r: dict, peak: float, batch: int = 4) -> None:
    step = r["step"]
    assert step["n"] == 2 and step["mean_s"] > 0 and step["std_s"] >= 0
    assert step["min_s"] <= step["mean_s"] <= step["max_s"]
    assert r["images_per_s"] == pytest.approx(batch / step["mean_s"])
    assert r["flops_per_step"] > 0
    assert r["flop_per_s"] == pytest.approx(r["flops_per_step"] / step["mean_s"])
    assert r["fraction_of_measured_peak"] == pytest.approx(r["flop_per_s"] / peak)
    assert r["peak_memory_mb"] >= 0 and r["peak_memory_method"]
    assert r["params"] > 0 and r["compiled"] is False


def test_tiny_runs_write_every_field(results):
    for name in ("toy2d", "mnist"):
        r = results[name]
        env = r["environment"]
        assert r["config"] == name and r["date"] and env["device"] == "cpu"
        assert env["torch"] == torch.__version__ and env["threads"] == 1 and env["device_name"]
        peak = r["peak"]["measured"]
        assert peak["flop_per_s"] > 0 and "measured matmul peak" in peak["method"]
        assert r["peak"]["spec_sheet"] is None  # no spec sheet for a CPU
        assert r["settings"]["batch_size"] == 4 and r["settings"]["precision"]["used"] == "fp32"
        _check_training(r["training"]["difflab"], peak["flop_per_s"])
        (row,) = r["sampling"]
        assert row["sampler"] == "ddim" and row["nfe_budget"] == 2
        assert row["difflab"]["nfe"] == 2 and row["difflab"]["ms_per_image"] > 0
        md = results[name + ".md"]
        assert f"## difflab bench {name} — cpu, fp32" in md and "| ddim | 2 | 2 |" in md


def test_toy2d_has_no_diffusers_side(results):
    r = results["toy2d"]
    assert r["training"]["diffusers"] == {
        "available": False,
        "reason": "difflab's mlp network has no diffusers counterpart",
    }
    assert r["sampling"][0]["diffusers"] is None and r["sampling"][0]["ratio_ms_per_image"] is None
    assert "| diffusers | n/a: difflab's mlp" in results["toy2d.md"]


def test_mnist_compares_equal_networks(results):
    r = results["mnist"]
    ours, theirs = r["training"]["difflab"], r["training"]["diffusers"]
    _check_training(theirs, r["peak"]["measured"]["flop_per_s"])
    assert ours["params"] == theirs["params"] == 1_114_209
    # the same layout does the same arithmetic: FLOPs agree to the CPU attention kernel's
    # recomputation (measure.CPU_SDPA_FLOPS), well under 1%
    assert theirs["flops_per_step"] == pytest.approx(ours["flops_per_step"], rel=0.01)
    ratio = r["training"]["ratio_images_per_s"]
    assert ratio == pytest.approx(ours["images_per_s"] / theirs["images_per_s"])
    row = r["sampling"][0]
    assert row["diffusers"]["nfe"] == 2 and row["diffusers"]["runs"] == "diffusers DDIMScheduler"
    expected = row["difflab"]["ms_per_image"] / row["diffusers"]["ms_per_image"]
    assert row["ratio_ms_per_image"] == pytest.approx(expected)
    assert r["environment"]["diffusers"]


def test_flop_count_matches_closed_forms():
    """A Linear layer is 2 B in out FLOPs forward; backward computes the gradient of the weight
    (2 B in out) and, when the input needs one, of the input (2 B in out again)."""
    B, n_in, n_out = 4, 8, 16
    layer = nn.Linear(n_in, n_out)
    x = torch.randn(B, n_in)
    forward = 2 * B * n_in * n_out
    assert count_flops(lambda: layer(x)) == forward
    assert count_flops(lambda: layer(x).sum().backward()) == 2 * forward  # weight gradient only
    x.requires_grad_(True)
    assert count_flops(lambda: layer(x).sum().backward()) == 3 * forward
    # a 3x3 convolution, padding 1: 2 B C_out H W C_in 9
    conv = nn.Conv2d(3, 5, 3, padding=1)
    assert count_flops(lambda: conv(torch.randn(2, 3, 6, 6))) == 2 * 2 * 5 * 6 * 6 * 3 * 9


def test_cifar10_mapping_has_our_parameter_count():
    diffusers = pytest.importorskip("diffusers")
    from difflab import build

    cfg = preset("cifar10")
    ours = build.build_net(cfg.model, (3, 32, 32), 0)
    theirs = diffusers.UNet2DModel(**unet2d_config(cfg.model, (3, 32, 32), 0))
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in theirs.parameters()) == 35_746_307  # DDPM's 35.7M


def test_mapping_refuses_what_diffusers_cannot_lay_out():
    cfg = preset("cifar10")
    with pytest.raises(NoEquivalent, match="mlp"):
        unet2d_config(preset("toy2d").model, (2,), 0)
    cfg.model.unet.downsample = "avgpool"
    with pytest.raises(NoEquivalent, match="downsample=avgpool"):
        unet2d_config(cfg.model, (3, 32, 32), 0)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"name": "imagenet"}, "choose one of toy2d, mnist, mnist-dit, cifar10-ddpm, celeba64"),
        ({"batch_size": -1}, "--batch-size must be an integer >= 0"),
        ({"steps": 0}, "--steps must be an integer >= 1"),
        ({"nfe": (10, 0)}, "--nfe needs model-evaluation budgets >= 1"),
        ({"samplers": ("ddim", "magic")}, "unknown sampler(s) magic"),
        ({"precision": "fp8"}, "--precision must be one of fp32, bf16"),
        ({"device": "tpu"}, "unknown device 'tpu'"),
    ],
)
def test_bad_options_raise_config_errors(changes, message):
    with pytest.raises(ConfigError) as info:
        resolve(BenchOptions(**{"name": "toy2d", **changes}))
    assert message in str(info.value) and "\n" not in str(info.value)


def test_fp32_and_bf16_side_by_side_in_one_run(tmp_path, monkeypatch):
    """--precision fp32,bf16 (auto's choice on bf16 hardware): each precision measured in full,
    its own peak in its own dtype, and the comparison built from exactly those figures."""
    monkeypatch.setattr(devices, "cpu_has_bf16", lambda: True)
    assert benchmark.precisions_of("auto", "cpu") == ("fp32", "bf16")
    tiny = [a for a in TINY if a not in ("--precision", "fp32")]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*above the measured matmul peak")
        assert main(["bench", "mnist", *tiny, "--out", str(tmp_path)]) == 0
    r = json.loads((tmp_path / "bench-mnist-cpu.json").read_text())
    assert r["precisions"] == ["fp32", "bf16"] and set(r["runs"]) == {"fp32", "bf16"}
    runs, c = r["runs"], r["comparison"]
    assert [runs[p]["peak"]["measured"]["dtype"] for p in ("fp32", "bf16")] == [
        "float32",
        "bfloat16",
    ]
    assert runs["bf16"]["settings"]["precision"]["used"] == "bf16"
    speed = {
        (lib, p): runs[p]["training"][lib]["images_per_s"]
        for lib in ("difflab", "diffusers")
        for p in ("fp32", "bf16")
    }
    assert c["images_per_s"]["difflab bf16"] == speed["difflab", "bf16"]
    assert c["ratios"]["difflab bf16 / difflab fp32"] == pytest.approx(
        speed["difflab", "bf16"] / speed["difflab", "fp32"]
    )
    assert c["ratios"]["difflab bf16 / diffusers fp32"] == pytest.approx(
        speed["difflab", "bf16"] / speed["diffusers", "fp32"]
    )
    assert c["peak_flop_per_s"]["bf16"] == runs["bf16"]["peak"]["measured"]["flop_per_s"]
    (row,) = c["sampling_ms_per_image"]
    assert row["difflab bf16"] == runs["bf16"]["sampling"][0]["difflab"]["ms_per_image"]
    md = (tmp_path / "bench-mnist-cpu.md").read_text()
    assert md.startswith("## difflab bench mnist — cpu, fp32 and bf16 side by side")
    assert "| difflab bf16 / diffusers fp32 | **" in md
    for p in ("fp32", "bf16"):
        assert f"### difflab bench mnist — cpu, {p}" in md
    monkeypatch.setattr(devices, "cpu_has_bf16", lambda: False)
    assert benchmark.precisions_of("auto", "cpu") == ("fp32",)


@pytest.mark.parametrize("text", ["fp8", "fp32,fp32", "", "bf16,fp4"])
def test_bad_precision_lists_are_refused_in_one_line(text):
    with pytest.raises(ConfigError, match="--precision takes auto or distinct names from fp32"):
        benchmark.precisions_of(text, "cpu")


def test_cli_reports_bad_input_in_one_line(capsys):
    assert main(["bench", "imagenet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("difflab: error: unknown benchmark configuration 'imagenet'")
    assert len(err.splitlines()) == 1
    assert main(["bench", "toy2d", "--nfe", "10,x"]) == 2
    assert "--nfe takes comma-separated integers" in capsys.readouterr().err


def test_cuda_without_a_gpu_is_refused():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ConfigError, match="no CUDA GPU is visible"):
        resolve(BenchOptions("toy2d", device="cuda"))


def test_fallbacks_warn_and_are_recorded(monkeypatch):
    """bf16 on a CPU without native bf16, and a failing torch.compile, both fall back to what
    works, with a warning, and the JSON says so."""

    def broken_compile(net, **_):
        def fails(*args, **kwargs):
            raise RuntimeError("no compiler here")

        return fails

    monkeypatch.setattr(devices, "cpu_has_bf16", lambda: False)
    monkeypatch.setattr(torch, "compile", broken_compile)
    opts = BenchOptions(
        "toy2d",
        device="cpu",
        precision="bf16",
        compile=True,
        batch_size=4,
        steps=2,
        warmup=1,
        samplers=("ddim",),
        nfe=(2,),
        matmul_size=64,
        threads=1,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = benchmark.run_benchmark(opts)
    said = " ".join(str(w.message) for w in caught)
    assert "no native bf16; measuring fp32 instead" in said and "no compiler here" in said
    assert r["settings"]["precision"] == {"requested": "bf16", "used": "fp32"}
    assert r["settings"]["compile"] == {"requested": True, "used": {"difflab": False}}
    assert any("bf16" in note for note in r["notes"])
    assert any("torch.compile" in note for note in r["notes"])
    assert r["peak"]["measured"]["dtype"] == "float32"


def test_mnist_dit_against_diffusers_dit_in_fp32_and_bf16(tmp_path, monkeypatch):
    """`bench mnist-dit`: difflab's DiT beside diffusers' DiTTransformer2DModel of the same size
    (equal parameter counts, FLOPs within the attention kernels' accounting), fp32 and bf16 side
    by side, each side's FLOP utilisation against its precision's measured peak."""
    pytest.importorskip("diffusers")
    from difflab.benchmark import options
    from difflab.config import apply_overrides

    small = ["model.dit.width=32", "model.dit.depth=2", "model.dit.heads=2"]  # preset's patch 4
    monkeypatch.setattr(options, "preset", lambda name: apply_overrides(preset(name), small))
    monkeypatch.setattr(devices, "cpu_has_bf16", lambda: True)
    tiny = [a for a in TINY if a not in ("--precision", "fp32")]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*above the measured matmul peak")
        assert main(["bench", "mnist-dit", *tiny, "--out", str(tmp_path)]) == 0
    r = json.loads((tmp_path / "bench-mnist-dit-cpu.json").read_text())
    assert r["precisions"] == ["fp32", "bf16"]
    for p in ("fp32", "bf16"):
        run = r["runs"][p]
        peak = run["peak"]["measured"]["flop_per_s"]
        ours, theirs = run["training"]["difflab"], run["training"]["diffusers"]
        _check_training(ours, peak)
        _check_training(theirs, peak)
        # diffusers gives each block its own copy of the time MLP (256 -> 32 -> 32) and label
        # table (11 rows); difflab's blocks share one (share/dit_keys.py)
        embedding = (256 * 32 + 32) + (32 * 32 + 32) + 11 * 32
        assert theirs["params"] == ours["params"] + (2 - 1) * embedding
        assert theirs["flops_per_step"] == pytest.approx(ours["flops_per_step"], rel=0.05)
        assert run["settings"]["channels_last"] is False  # patches, not convolutions
        row = run["sampling"][0]
        assert row["diffusers"]["nfe"] == 2 and row["difflab"]["nfe"] == 2
    md = (tmp_path / "bench-mnist-dit-cpu.md").read_text()
    assert md.startswith("## difflab bench mnist-dit — cpu, fp32 and bf16 side by side")
    assert "| difflab bf16 / diffusers fp32 | **" in md
