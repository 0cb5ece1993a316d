"""The sampler registry: what each sampler declares is what the config, CLI and NFE use."""

import dataclasses

import pytest

from difflab import cli
from difflab.config import SampleConfig
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
        for nfe in (1, 5, 10, 19, 20):
            steps = steps_for_nfe(name, nfe)
            assert nfe_of(name, steps) <= max(nfe, nfe_of(name, 1))
            assert nfe_of(name, steps + 1) > nfe


def test_compare_sweeps_the_deterministic_solvers():
    assert set(deterministic_samplers()) == {
        "ddim", "euler", "heun", "dpm_2s", "dpmpp_2m", "dpmpp_3m", "unipc"
    }  # fmt: skip


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
