import pytest
import torch
from torch import nn

from difflab.training.ema import EMA


def _model(value: float) -> nn.Module:
    m = nn.Linear(2, 1)
    with torch.no_grad():
        m.weight.fill_(value)
        m.bias.fill_(value)
    return m


def test_decay_zero_copies_and_decay_one_freezes():
    m = _model(1.0)
    copy_ema, frozen_ema = EMA(m, 0.0, warmup=False), EMA(m, 1.0, warmup=False)
    with torch.no_grad():
        m.weight.fill_(3.0)
    copy_ema.update(m)
    frozen_ema.update(m)
    assert (copy_ema.model.weight == 3.0).all()
    assert (frozen_ema.model.weight == 1.0).all()


def test_average_matches_the_closed_form():
    # constant target c from start value a: after k updates, c + (a - c) d^k
    m = _model(0.0)
    ema = EMA(m, 0.9, warmup=False)
    with torch.no_grad():
        m.weight.fill_(1.0)
    for _ in range(10):
        ema.update(m)
    assert float(ema.model.weight[0, 0]) == pytest.approx(1 - 0.9**10, rel=1e-6)


def test_warmup_schedule_and_its_state():
    ema = EMA(_model(0.0), 0.999, warmup=True)
    decays = [ema.update(_model(1.0)) for _ in range(3)]
    assert decays == pytest.approx([1 / 10, 2 / 11, 3 / 12])
    restored = EMA(_model(0.0), 0.5)
    restored.load_state_dict(ema.state_dict())
    assert restored.current_decay() == pytest.approx(4 / 13)


def test_ema_model_is_frozen_and_bad_decay_refused():
    ema = EMA(_model(0.0), 0.99)
    assert not any(p.requires_grad for p in ema.model.parameters())
    with pytest.raises(ValueError, match="decay"):
        EMA(_model(0.0), 1.5)
