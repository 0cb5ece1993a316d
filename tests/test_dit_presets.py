"""The DiT presets (config/presets.py): mnist-latent-dit on the autoencoder's 8x8x4 grid, and
the DiT-S/2 recipes cifar10-dit and celeba-dit, which must build and step on any machine."""

import dataclasses

import pytest
import torch

from difflab import build
from difflab.config import apply_overrides, preset
from difflab.model import DataKind

DIT_S2_PAPER = 33.0e6  # Peebles & Xie 2023, Table 4: DiT-S/2 (1000 classes, 32x32x4 latents)


def dit_parameters(width: int, depth: int, patch_values: int, out_values: int, classes: int):
    """The parameter count of nets/dit.py's DiT, counted by hand: per block QKV (3D^2 + 3D),
    the attention's output (D^2 + D), the MLP (4D^2 + 4D, 4D^2 + D) and the six modulation
    vectors (6D^2 + 6D); then the patch embedding, the time MLP (256 -> D -> D), the label table
    (classes + 1 rows), the final layer's shift and scale, and the output Linear."""
    D = width
    block = 18 * D * D + 15 * D
    embed = patch_values * D + D + 256 * D + D + D * D + D + (classes + 1) * D * (classes > 0)
    final = 2 * D * D + 2 * D + D * out_values + out_values
    return depth * block + embed + final


def _one_step(cfg, data: DataKind, batch: int = 2) -> torch.nn.Module:
    """One AdamW step of the run's loss at the run's lr on a random batch: finite loss, every
    parameter gets a gradient, the weights move. Returns the net."""
    torch.manual_seed(0)
    model = build.build_model(cfg, data)
    loss_fn = build.build_loss(cfg, model.schedule)
    net = model.net.train()
    before = [p.detach().clone() for p in net.parameters()]
    optimizer = torch.optim.AdamW(net.parameters(), lr=cfg.train.lr)
    x0 = torch.rand(batch, *data.shape) * 2 - 1
    y = torch.arange(batch) % data.num_classes if data.num_classes else None
    loss = loss_fn(model, x0, y, noise=None, step=0)[0].mean()  # (per-example loss, t)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in net.parameters())
    optimizer.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, net.parameters(), strict=True))
    return net


@pytest.mark.parametrize(
    "name, shape, tokens", [("cifar10-dit", (3, 32, 32), 256), ("celeba-dit", (3, 64, 64), 1024)]
)
def test_dit_s2_recipes_have_dit_s2s_size_and_take_a_step(name, shape, tokens):
    cfg = preset(name)
    dit = cfg.model.dit
    assert (dit.width, dit.depth, dit.heads, dit.patch_size) == (384, 12, 6, 2)  # DiT-S/2
    assert (cfg.train.lr, cfg.train.batch_size, cfg.train.ema_decay) == (1e-4, 256, 0.9999)
    tiny = apply_overrides(cfg, ["train.batch_size=1", "train.precision=fp32"])
    net = _one_step(tiny, DataKind(shape, 0), batch=1)  # unconditional, as cifar10 and celeba64
    count = sum(p.numel() for p in net.parameters())
    # 2x2x3 pixel patches and no labels: 32,471,436 parameters, 1.6% under DiT-S/2's 33.0M
    assert count == dit_parameters(384, 12, 12, 12, 0) == 32_471_436
    assert abs(count / DIT_S2_PAPER - 1) < 0.02
    assert net.grid[0] * net.grid[1] == tokens


def test_hand_count_matches_diffusers_dit_s2():
    """The hand count is the one DiT-S/2 itself has (learned sigma: 8 output channels, 1000
    classes): 32.9M, the paper's 33.0M rounded."""
    from difflab.nets.dit import DiT

    net = DiT(4, (32, 32), width=384, depth=12, heads=6, patch_size=2, num_classes=1000)
    net.out = torch.nn.Linear(384, 2 * 2 * 8)  # learned sigma doubles the output
    count = sum(p.numel() for p in net.parameters())
    assert count == dit_parameters(384, 12, 16, 32, 1000)
    assert abs(count / DIT_S2_PAPER - 1) < 0.005


def test_mnist_latent_dit_is_mnist_latent_with_a_dit_on_the_8x8x4_grid():
    latent, cfg = preset("mnist-latent"), preset("mnist-latent-dit")
    assert cfg.model.name == "dit" and cfg.model.dit.patch_size == 2
    assert (cfg.model.codec, cfg.model.codec_cache) == (latent.model.codec, True)
    assert cfg.data == latent.data and cfg.diffusion == preset("mnist-sd3").diffusion  # a flow
    assert (cfg.train.lr, cfg.train.steps, cfg.train.time_limit_minutes) == (5e-4, 7500, 15.0)
    # mnist-ae's cap and this one's stay under the pixel mnist preset's (issue 39's budget)
    assert preset("mnist-ae").train.time_limit_minutes + cfg.train.time_limit_minutes <= 30
    # guidance only at sigma / alpha <= 2, through the flow's own noise levels
    assert (cfg.sample.guidance, cfg.sample.guidance_tmin, cfg.sample.guidance_tmax) == (2, 0, 2)
    budget = ("lr", "steps", "time_limit_minutes")  # the rest of the recipe is mnist-latent's
    same = {key: getattr(latent.train, key) for key in budget}
    assert dataclasses.replace(cfg.train, **same) == latent.train
    # the latent grid itself (what the codec gives the net): 16 tokens, one step trains
    pixels = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, codec=""))
    net = _one_step(pixels, DataKind((4, 8, 8), 10), batch=4)
    assert net.grid == (4, 4)
    assert sum(p.numel() for p in net.parameters()) == dit_parameters(128, 6, 16, 16, 10)
