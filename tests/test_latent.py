"""Latent diffusion (issue 14): the autoencoder, its loss, the latent scale, the codec and its
refusals, and the first-stage metrics."""

import dataclasses
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from difflab import build
from difflab.cli import main
from difflab.cli.pretrained import train_minutes
from difflab.codecs import Identity
from difflab.codecs.cache import MomentStream, _encode_all
from difflab.codecs.latent import CodecError, LatentCodec, measure_scale, read_meta, save_codec
from difflab.config import AutoencoderConfig, ConfigError, apply_overrides, preset
from difflab.data.readers import TensorImages
from difflab.diffusion.autoencoder_loss import kl_diagonal
from difflab.evaluation.reconstruction import psnr, ssim
from difflab.files import sha256_file
from difflab.model import DataKind
from difflab.nets.autoencoder import AutoencoderKL
from difflab.runs import load_run
from difflab.training.loop import train

TINY = AutoencoderConfig(base_channels=8, channel_mults=(1, 2, 2), latent_channels=4, norm_groups=4)
KIND = DataKind((1, 32, 32), 10, tuple("0123456789"))


def _tiny_ae(seed: int = 0, **kw) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(1, **{**dataclasses.asdict(TINY), **kw})


@pytest.mark.parametrize("mults,f", [((1, 2), 2), ((1, 2, 2), 4), ((1, 1, 2, 2), 8)])
@pytest.mark.parametrize("c", [1, 4])
def test_encode_decode_shapes_for_every_f_and_c(mults, f, c):
    ae = _tiny_ae(channel_mults=mults, latent_channels=c)
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    mean, logvar = ae.moments(x)
    assert ae.factor == f and mean.shape == logvar.shape == (2, c, 32 // f, 32 // f)
    assert ae.latent_shape((1, 32, 32)) == (c, 32 // f, 32 // f)
    assert ae.decode(mean).shape == x.shape
    with pytest.raises(ValueError, match="not divisible"):
        ae.latent_shape((1, 36, 36)) if f == 8 else ae.latent_shape((1, 33, 33))


def test_kl_equals_the_closed_form_of_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mean, logvar = torch.randn(5, 4, 3, 3, generator=g), torch.randn(5, 4, 3, 3, generator=g)
    posterior = torch.distributions.Normal(mean, torch.exp(0.5 * logvar))
    prior = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean))
    expected = torch.distributions.kl_divergence(posterior, prior).flatten(1).sum(1)
    torch.testing.assert_close(kl_diagonal(mean, logvar), expected, rtol=1e-5, atol=1e-5)
    assert torch.all(kl_diagonal(torch.zeros(2, 3), torch.zeros(2, 3)) == 0)  # prior itself


def test_psnr_and_ssim_closed_forms():
    x = torch.full((2, 1, 16, 16), 0.2)
    y = torch.full((2, 1, 16, 16), -0.3)  # constant images: no variance, SSIM = luminance term
    c1 = (0.01 * 2.0) ** 2
    expected = (2 * 0.2 * -0.3 + c1) / (0.2**2 + 0.3**2 + c1)
    torch.testing.assert_close(ssim(x, y), torch.full((2,), expected), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(psnr(x, y), torch.full((2,), 10 * torch.log10(torch.tensor(16.0))))
    z = torch.rand(3, 1, 20, 20) * 2 - 1
    torch.testing.assert_close(ssim(z, z), torch.ones(3))


def _codec_for(ae: AutoencoderKL, images: torch.Tensor, tmp_path, mode: str = "sample"):
    stats = measure_scale(ae, images.split(16), torch.Generator().manual_seed(3))
    info = {"autoencoder": dataclasses.asdict(TINY), "image_shape": [1, 32, 32], "data": "mnist"}
    sha = save_codec(tmp_path / "codec.safetensors", ae, {**info, **stats})
    meta = read_meta(tmp_path / "codec.safetensors")
    return LatentCodec(ae, meta, mode, sha, tmp_path / "codec.safetensors")


def test_the_scale_gives_unit_variance_latents_on_the_data_it_was_measured_on(tmp_path):
    images = torch.rand(64, 1, 32, 32) * 2 - 1
    codec = _codec_for(_tiny_ae(), images, tmp_path)
    generator = torch.Generator().manual_seed(3)  # the draws of measure_scale, in its order
    z = torch.cat(
        [
            codec.encode(x, torch.randn((16, *codec.shape), generator=generator))
            for x in images.split(16)
        ]
    )
    assert abs(float(z.mean())) < 1e-5 and abs(float(z.std(unbiased=False)) - 1) < 1e-5
    assert codec.scale != pytest.approx(1.0, abs=1e-3)  # the untrained encoder is not unit
    x_hat = codec.decode(codec.encode(images[:4]))  # decode undoes the shift and scale
    torch.testing.assert_close(x_hat, codec.ae.decode(codec.ae.moments(images[:4])[0]).clamp(-1, 1))


def test_a_tiny_autoencoder_overfits_a_batch_to_high_psnr(one_thread):
    torch.manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 16), torch.linspace(-1, 1, 16), indexing="ij")
    images = torch.stack([torch.tanh(3 * (r - (xx**2 + yy**2).sqrt())) for r in (0.3, 0.5, 0.7)])
    images = images[:, None]  # rings: (3, 1, 16, 16) in [-1, 1]
    ae = _tiny_ae(channel_mults=(1, 2), mid_attention=False)
    opt = torch.optim.Adam(ae.parameters(), 3e-3)
    with torch.no_grad():
        before = float(psnr(images, ae(images)[0]).min())
    for _ in range(150):  # 35.7 dB at 150 steps when written; an untrained one is near 0 dB
        x_hat, mean, logvar = ae(images)
        loss = (x_hat - images).abs().mean() + 1e-6 * kl_diagonal(mean, logvar).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        assert before < 10.0 and float(psnr(images, ae(images)[0]).min()) > 28.0


def _ae_config(shared_data, *extra):
    return apply_overrides(
        preset("mnist-ae"),
        [
            f"data.root={shared_data}",
            "model.autoencoder.base_channels=8",
            "model.autoencoder.channel_mults=1,2",
            "model.autoencoder.norm_groups=4",
            "model.autoencoder.mid_attention=false",
            "train.batch_size=4",
            "train.steps=6",
            "train.log_every=1",
            "train.checkpoint_every=3",
            "train.autoencoder.discriminator=true",
            "train.autoencoder.disc_start=3",
            "train.autoencoder.disc_width=8",
            "train.autoencoder.disc_layers=1",
            "train.time_limit_minutes=0",
            *extra,
        ],
    )


def test_the_discriminator_starts_where_configured_and_resumes_exactly(tmp_path, shared_data):
    cfg = _ae_config(shared_data)
    train(cfg, tmp_path / "straight", progress=False)
    state = lambda run, step: torch.load(  # noqa: E731
        tmp_path / run / f"checkpoints/step-{step}/state.pt", weights_only=True
    )
    assert state("straight", 3)["loss"]["optimizer"]["state"] == {}  # steps 0..2: no D update
    d_steps = state("straight", 6)["loss"]["optimizer"]["state"][0]["step"]
    assert float(d_steps) == 3  # steps 3, 4, 5
    train(cfg, tmp_path / "resumed", progress=False, stop_after=3)
    train(cfg, tmp_path / "resumed", resume=True, progress=False)
    for which in ("model", "ema"):
        a = load_file(tmp_path / f"straight/checkpoints/step-6/{which}.safetensors")
        b = load_file(tmp_path / f"resumed/checkpoints/step-6/{which}.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a)
    d_a, d_b = state("straight", 6)["loss"], state("resumed", 6)["loss"]
    assert all(
        torch.equal(d_a["discriminator"][k], d_b["discriminator"][k]) for k in d_a["discriminator"]
    )


def test_identity_codec_draws_nothing_and_passes_data_through():
    x = torch.randn(3, 1, 4, 4)
    codec = Identity()
    assert codec.draw(3, torch.Generator()) == () and codec.encode(x) is x
    assert codec.decode(x) is x and codec.latent_shape((1, 4, 4)) == (1, 4, 4)


def test_cached_moments_encode_as_the_images_do(tmp_path):
    images = torch.randint(0, 256, (20, 1, 32, 32), dtype=torch.uint8)
    codec = _codec_for(_tiny_ae(), images.float() / 127.5 - 1, tmp_path, mode="mean")
    stream = MomentStream(_encode_all(codec, TensorImages(images, None)), None, 0, 0)
    moments, _ = stream.next_batch(5)
    index = stream.order[:5]
    expected = codec.encode(images[index].float() / 127.5 - 1)
    torch.testing.assert_close(codec.encode(moments), expected, rtol=1e-5, atol=1e-5)
    assert codec.latent_shape(tuple(moments.shape[1:])) == codec.shape == (4, 8, 8)


def _latent_cfg(source, *extra):
    return apply_overrides(preset("mnist-latent"), [f"model.codec={source}", *extra])


def test_a_latent_run_refuses_bad_codecs(tmp_path):
    ae_run = tmp_path / "ae"
    ae_run.mkdir()
    _codec_for(_tiny_ae(), torch.rand(16, 1, 32, 32) * 2 - 1, ae_run)
    ok = build.pin_codec(_latent_cfg(ae_run))
    assert len(ok.model.codec_sha256) == 64
    model = build.build_model(ok, KIND)
    assert model.codec.latent_shape(KIND.shape) == (4, 8, 8)
    with pytest.raises(CodecError, match="does not exist"):
        build.build_model(_latent_cfg(tmp_path / "missing"), KIND)
    with pytest.raises(CodecError, match="trained on images of shape"):
        build.build_model(ok, DataKind((3, 32, 32), 10))
    with pytest.raises(CodecError, match="cannot halve"):
        build.build_model(_latent_cfg(ae_run, "model.unet.channel_mults=1,2,2,2,2"), KIND)
    unet_run = tmp_path / "pixel"
    unet_run.mkdir()
    preset("mnist").save(unet_run / "config.json")
    with pytest.raises(CodecError, match="not an autoencoder run"):
        build.build_model(_latent_cfg(unet_run), KIND)
    save_codec(
        ae_run / "codec.safetensors", _tiny_ae(seed=1), read_meta(ae_run / "codec.safetensors")
    )
    with pytest.raises(CodecError, match="changed since this run pinned it"):
        build.build_model(ok, KIND)
    (ae_run / "codec.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CodecError, match="unreadable"):
        build.build_model(_latent_cfg(ae_run), KIND)
    assert issubclass(CodecError, ConfigError)


def test_cli_refuses_a_missing_codec_with_exit_2_and_writes_nothing(tmp_path, capsys):
    code = main(
        [
            "train",
            "--preset",
            "mnist-latent",
            "--runs",
            str(tmp_path),
            "--name",
            "x",
            "--set",
            f"model.codec={tmp_path / 'nope'}",
            "--quiet",
        ]
    )
    assert code == 2 and "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "x" / "config.json").exists()


def test_a_latent_run_trains_samples_and_refuses_a_changed_autoencoder(
    tmp_path, shared_data, capsys
):
    ae_run = tmp_path / "ae"
    ae_run.mkdir()
    _codec_for(_tiny_ae(), torch.rand(16, 1, 32, 32) * 2 - 1, ae_run)
    cfg = _latent_cfg(
        ae_run,
        f"data.root={shared_data}",
        "model.codec_cache=false",
        "model.codec_encode=sample",
        "model.unet.base_channels=8",
        "model.unet.num_res_blocks=1",
        "train.batch_size=4",
        "train.steps=2",
        "train.checkpoint_every=2",
        "train.time_limit_minutes=0",
    )
    train(cfg, tmp_path / "latent", progress=False)
    saved = json.loads((tmp_path / "latent" / "config.json").read_text())
    assert saved["model"]["codec_sha256"] == sha256_file(ae_run / "codec.safetensors")
    run = load_run(tmp_path / "latent")
    scfg = dataclasses.replace(run.cfg.sample, n=3, steps=3, batch_size=3)
    images = run.model.sample(scfg, cond=torch.tensor([0, 1, 2]))
    assert images.shape == (3, 1, 32, 32) and images.abs().max() <= 1.0
    # inpainting masks in latent space, and says so (in the output and the file)
    keep = torch.zeros(1, 1, 32, 32)
    keep[..., :16, :] = 1
    np.savez(tmp_path / "init.npz", samples=images.numpy())
    np.savez(tmp_path / "keep.npz", samples=keep.numpy())
    out = tmp_path / "inpainted.npz"
    argv = ["sample", str(tmp_path / "latent"), "--init", str(tmp_path / "init.npz"), "--quiet"]
    argv += ["--mask", str(tmp_path / "keep.npz"), "--steps", "3", "--out", str(out)]
    assert main(argv) == 0
    assert "keeps the mask in latent space" in capsys.readouterr().out
    with np.load(out) as f:
        assert str(f["mask_space"]) == "latent" and f["samples"].shape == (3, 1, 32, 32)
    _every_guidance_method_samples_the_latent_run(tmp_path / "latent", tmp_path)
    shutil.copy(ae_run / "codec.safetensors", tmp_path / "kept.safetensors")
    save_codec(
        ae_run / "codec.safetensors", _tiny_ae(seed=5), read_meta(tmp_path / "kept.safetensors")
    )
    with pytest.raises(CodecError, match="changed"):
        load_run(tmp_path / "latent")


def test_bad_autoencoder_loss_settings_are_refused_in_one_message():
    cfg = apply_overrides(
        preset("mnist-ae"), ["train.autoencoder.pixel=l3", "train.autoencoder.kl_weight=-1"]
    )
    with pytest.raises(ConfigError, match=r"pixel must be l1 or l2.*kl_weight must be >= 0"):
        build.build_loss(cfg, None)
    with pytest.raises(ConfigError, match=r"cannot train model\.name=unet"):
        build.build_loss(apply_overrides(preset("mnist"), ["train.loss=autoencoder"]), None)
    with pytest.raises(ConfigError, match="draws no samples"):
        build.build_loss(apply_overrides(preset("mnist-ae"), ["train.sample_every=10"]), None)


def test_the_benchmark_reads_either_pixel_json(monkeypatch):
    # bench/latent.py --pixel-json takes bench/mnist.py's JSON or bench/mnist_time.py's
    bench = Path(__file__).resolve().parents[1] / "bench"
    monkeypatch.syspath_prepend(str(bench))
    spec = importlib.util.spec_from_file_location("bench_latent", bench / "latent.py")
    module = importlib.util.module_from_spec(spec)
    had_mnist = "mnist" in sys.modules
    spec.loader.exec_module(module)  # imports bench/mnist.py as `mnist`
    if not had_mnist:
        sys.modules.pop("mnist", None)
    assert module.recorded_train_s({"train_s": 12.5}) == 12.5
    assert (
        module.recorded_train_s({"old": {"train_wall_s": 9.0}, "new": {"train_wall_s": 4.0}}) == 4.0
    )
    assert module.recorded_train_s({"old": {"train_wall_s": 9.0}}) == 9.0
    with pytest.raises(SystemExit, match="train_wall_s"):
        module.recorded_train_s({"new": {}})


def test_a_runs_training_time_sums_its_logged_step_times(tmp_path):
    # bench/latent.py without --pixel-json takes the pixel run's wall time from here: the logged
    # intervals' s_per_step x steps; rows re-logged after a resume count once, rows without
    # s_per_step (evals) not at all
    rows = [
        {"step": 10, "s_per_step": 0.5},
        {"eval": {"n": 100}},
        {"step": 20, "s_per_step": 1.0},
        {"step": 20, "s_per_step": 7.0},
        {"step": 25, "s_per_step": 2.0},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert 60 * train_minutes(tmp_path) == pytest.approx(10 * 0.5 + 10 * 1.0 + 5 * 2.0)


def _every_guidance_method_samples_the_latent_run(run_dir, tmp_path):
    """APG, CFG++ and autoguidance wrap the latent denoiser; the codec decodes their result.
    Autoguidance by the run itself is the conditional model (closed form: D_w + w (D - D_w) = D)."""

    def draw(name, *flags):
        out = tmp_path / f"{name}.npz"
        argv = ["sample", str(run_dir), "--n", "3", "--class", "4", "--steps", "3", "--seed", "5"]
        assert main([*argv, "--sampler", "ddim", "--quiet", "--out", str(out), *flags]) == 0
        with np.load(out) as f:
            assert f["samples"].shape == (3, 1, 32, 32) and np.isfinite(f["samples"]).all()
            return f["samples"]

    conditional = draw("conditional", "--guidance", "1")
    draw("apg", "--guidance-method", "apg", "--guidance", "2")
    draw("cfgpp", "--guidance-method", "cfg++", "--guidance", "0.5")
    itself = draw(
        "auto", "--guidance-method", "auto", "--guidance", "2", "--guide-with", str(run_dir)
    )
    np.testing.assert_allclose(itself, conditional, atol=1e-5)
