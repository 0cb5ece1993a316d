"""The second time input t2 (MeanFlow's t - r, a shortcut's d) through the one net contract:
nets built without it are the nets of before (same parameters, same outputs, t2 refused); nets
built with it read t2 beside t, and t2 = None as t2 = 0."""

import pytest
import torch

from difflab.nets.dit import DiT
from difflab.nets.mlp import MLP
from difflab.nets.unet import UNet


def _nets(second_time: bool):
    torch.manual_seed(0)
    mlp = MLP(dim=2, width=16, depth=2, emb_dim=16, num_classes=3, second_time=second_time)
    torch.manual_seed(0)
    unet = UNet(
        in_channels=1,
        base_channels=8,
        channel_mults=(1, 2),
        num_res_blocks=1,
        attention_levels=(),
        norm_groups=4,
        num_classes=3,
        second_time=second_time,
    )
    torch.manual_seed(0)
    dit = DiT(
        in_channels=1,
        input_size=(4, 4),
        width=16,
        depth=1,
        heads=2,
        patch_size=2,
        num_classes=3,
        second_time=second_time,
    )
    return {"mlp": (mlp, (2,)), "unet": (unet, (1, 8, 8)), "dit": (dit, (1, 4, 4))}


@pytest.mark.parametrize("name", ["mlp", "unet", "dit"])
def test_nets_without_second_time_are_unchanged(name):
    plain, shape = _nets(False)[name]
    second, _ = _nets(True)[name]
    old = plain.state_dict()
    new = second.state_dict()
    # the same parameters, drawn from the same RNG stream, plus the t2 embedding only
    assert [k for k in new if not k.startswith("time2_emb.")] == list(old)
    for key, value in old.items():
        assert torch.equal(value, new[key]), key
    assert not any(k.startswith("time2_emb") for k in old)
    x, t, y = torch.randn(3, *shape), torch.tensor([0.2, 0.5, 0.9]), torch.tensor([0, 1, 3])
    with pytest.raises(ValueError, match="second time"):
        plain(x, t, y, t2=t)
    # the second-time net at t2 differs from it at t2 = 0, and t2 = None means 0
    out0 = second(x, t, y, t2=torch.zeros(3))
    assert torch.equal(second(x, t, y), out0)
    with torch.no_grad():  # the gates of a fresh DiT are zero: open them to see t2 at all
        for p in second.parameters():
            p.add_(0.05 * torch.randn_like(p))
    assert not torch.allclose(second(x, t, y, t2=torch.full((3,), 0.5)), second(x, t, y))


def test_mlp_shared_time_path_sees_t2():
    # samplers call with one t for the batch: the embedding is shared only when t2 is too
    _, (mlp, _) = None, _nets(True)["mlp"]
    x, t = torch.randn(4, 2), torch.full((4,), 0.7)
    t2 = torch.tensor([0.0, 0.1, 0.2, 0.3])
    together = mlp(x, t, t2=t2)
    one_by_one = torch.cat([mlp(x[i : i + 1], t[i : i + 1], t2=t2[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(together, one_by_one)
