"""The sampler registry: what each sampler declares is what the config, CLI and NFE use."""

import dataclasses

import pytest
import torch

from difflab import build, cli
from difflab.config import SampleConfig, apply_overrides, preset
from difflab.model import DataKind
from difflab.samplers import SAMPLERS, deterministic_samplers, nfe_of, sampler_info, steps_for_nfe
from difflab.samplers.registry import Option, register


def test_every_declared_option_is_a_sample_config_field_of_its_type():
    fields = {f.name: f for f in dataclasses.fields(SampleConfig)}
    for info in SAMPLERS.values():
        for o in info.options:
            assert o.field in fields, f"{info.name}: {o.field} is not a SampleConfig field"
            assert isinstance(getattr(SampleConfig(), o.field), o.type), (info.name, o.field)


def test_costs_and_budgets_invert():
    assert nfe_of("heun", 10) == 19 and nfe_of("dpm_2s", 10) == 19 and nfe_of("ddim", 10) == 10
    for name in SAMPLERS:
        for scfg in (SampleConfig(n_corrector=0), SampleConfig(n_corrector=2)):
            for nfe in (1, 5, 10, 19, 20):
                steps = steps_for_nfe(name, nfe, scfg)
                assert nfe_of(name, steps, scfg) <= max(nfe, nfe_of(name, 1, scfg))
                assert nfe_of(name, steps + 1, scfg) > nfe


class CountedNet(torch.nn.Module):
    """A network that counts its calls: one call = one model evaluation of a batch."""

    def __init__(self, net):
        super().__init__()
        self.net, self.calls = net, 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.net(*args, **kwargs)


def _toy_model(preset_name: str):
    cfg = apply_overrides(preset(preset_name), ["model.mlp.width=16", "model.mlp.depth=1"])
    return build.build_model(cfg, DataKind((2,)), torch.device("cpu"))


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_nfe_is_the_number_of_network_calls(name):
    """Count the network's calls while sampling one batch: the NFE the registry reports (and
    every row writes) must be that count, for every sampler, step count and option that
    changes it (pc: n_corrector)."""
    own = {"consistency": "toy2d-ct", "meanflow": "toy2d-meanflow", "shortcut": "toy2d-shortcut"}
    model = _toy_model(own.get(name, "toy2d"))
    options = [{"n_corrector": m} for m in (0, 1, 3)] if name == "pc" else [{}]
    for steps in (1, 4, 8) if name == "shortcut" else (1, 4, 7):  # a shortcut: powers of two
        for option in options:
            scfg = SampleConfig(
                sampler=name, steps=steps, spacing="uniform", n=3, batch_size=3, **option
            )
            counted = CountedNet(model.net)
            model.with_net(counted).sample(scfg)
            assert counted.calls == nfe_of(name, steps, scfg), (name, steps, option)
            if name == "pc":
                assert counted.calls == (option["n_corrector"] + 1) * steps


def test_an_option_dependent_cost_needs_the_options():
    with pytest.raises(ValueError, match="depend on its options"):
        nfe_of("pc", 10)
    scfg = SampleConfig(sampler="pc", n_corrector=2)
    assert steps_for_nfe("pc", 10, scfg) == 3 and nfe_of("pc", 3, scfg) == 9


def test_compare_sweeps_the_deterministic_solvers():
    assert set(deterministic_samplers()) == {
        "ddim",
        "euler",
        "heun",
        "dpm_2s",
        "dpmpp_2m",
        "dpmpp_3m",
        "unipc",
    }


def test_flags_come_from_the_registry():
    args = cli.parser().parse_args(
        ["sample", "r", "--out", "x.npz", "--eta", "0.5", "--churn", "1"]
    )
    assert cli.sample_changes(args) == {"eta": 0.5, "s_churn": 1.0}


def test_unknown_and_doubly_registered_samplers_are_refused():
    with pytest.raises(ValueError, match="unknown sampler 'nope'; choose one of ddpm, ddim"):
        sampler_info("nope")
    with pytest.raises(ValueError, match="registered twice"):
        register("ddim", options=(Option("eta", float, "x"),))(lambda *a, **k: None)
