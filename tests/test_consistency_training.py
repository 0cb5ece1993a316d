"""Consistency training end to end: exact resume with a target network (and across ECT stages),
teachers (ECT starts from one, CD distils one), the CLI's refusals, and tiny models trained by
CT, iCT and CD on 1-D Gaussian data approaching the closed-form consistency function."""

import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from difflab import build, cli
from difflab.config import apply_overrides, preset
from difflab.diffusion import schedules
from difflab.diffusion.consistency import gaussian_consistency, noise_range, sigma_of, t_of_sigma
from difflab.diffusion.curriculum import karras
from difflab.errors import ConfigError
from difflab.model import DataKind
from difflab.samplers import SampleNoise, sample_heun
from difflab.training.checkpoint import load_state
from difflab.training.logging import read_metrics
from difflab.training.loop import train
from difflab.training.teacher import batched_ode_step, substep_times
from gaussian import MU, GaussianDenoiser, S, pf_solution

SMALL = [
    "model.mlp.width=32",
    "model.mlp.depth=1",
    "model.mlp.dropout=0.1",  # both points of a pair must see one dropout draw
    "train.batch_size=64",
    "train.log_every=1",
    "train.checkpoint_every=2",
    "train.threads=1",
    "sample.n=200",
    "sample.batch_size=200",
]
FLAGS = ["--no-finish", "--quiet"]


def _cfg(name, *extra):
    return apply_overrides(preset(name), [*SMALL, *extra])


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A tiny toy2d diffusion run: the teacher of the ECT and CD runs here."""
    root = tmp_path_factory.mktemp("teacher")
    threads = torch.get_num_threads()
    try:
        train(_cfg("toy2d", "train.steps=4"), root / "toy", progress=False)
    finally:
        torch.set_num_threads(threads)
    return root / "toy"


def _same(a, b):
    for which in ("model", "ema"):
        wa, wb = load_file(a / f"{which}.safetensors"), load_file(b / f"{which}.safetensors")
        for k in wa:
            assert torch.equal(wa[k], wb[k]), f"{which} {k}"
    ta, tb = load_state(a)["target"], load_state(b)["target"]
    for k in ta:
        assert torch.equal(ta[k], tb[k]), f"target {k}"


@pytest.mark.parametrize(
    "name,extra",
    [
        ("toy2d-ct", ["train.loss=ct", "consistency.s0=2", "consistency.s1=150"]),  # EMA target
        ("toy2d-ct", []),  # iCT: stop-gradient target
        ("toy2d-ect", ["consistency.stage_steps=2"]),  # stages 0..2, across the resume
        (
            "toy2d-cd",
            ["consistency.target_ema=0.9", "consistency.solver=ddim", "consistency.levels=grid"],
        ),
        ("toy2d-cd", []),  # Heun sub-steps, batched over jittered levels
    ],
)
def test_resume_is_bitwise_exact_with_a_target_network(tmp_path, teacher, name, extra):
    threads = torch.get_num_threads()
    cfg = _cfg(name, "train.steps=6", f"consistency.teacher={teacher}", *extra)
    try:
        train(cfg, tmp_path / "a", progress=False)
        train(cfg, tmp_path / "b", progress=False, stop_after=3 if "ect" in name else 2)
        train(cfg, tmp_path / "b", resume=True, progress=False)
    finally:
        torch.set_num_threads(threads)
    _same(tmp_path / "a/checkpoints/step-6", tmp_path / "b/checkpoints/step-6")
    rows = read_metrics(tmp_path / "a/metrics.jsonl")
    if "ect" in name:
        assert [r["ect_stage"] for r in rows] == [0, 0, 1, 1, 2, 2]
    elif "cd" not in name:
        n = [r["consistency_N"] for r in rows]
        assert n == sorted(n) and n[-1] > n[0]


def test_ect_starts_from_the_teacher_and_cd_distils_it(tmp_path, teacher):
    threads = torch.get_num_threads()
    try:
        cfg = _cfg("toy2d-ect", "train.steps=1", f"consistency.teacher={teacher}")
        from difflab.training.parts import build_parts

        parts = build_parts(cfg)
    finally:
        torch.set_num_threads(threads)
    ema = load_file(teacher / "checkpoints/step-4/ema.safetensors")
    for k, v in parts.net.state_dict().items():
        assert torch.equal(v, ema[k]), k
    for k, v in parts.target.state_dict().items():  # the target starts there too
        assert torch.equal(v, ema[k]), k


def test_a_weights_file_teaches_as_its_run_does(tmp_path, teacher):
    """consistency.teacher=FILE (an fp16 EMA export, as pretrained:NAME is): the student starts
    from its weights upcast to float32, CD distils it, and the report draws the student beside
    it; a file that is not a difflab weights file is refused in one line."""
    from difflab.report.consistency import teacher_samples
    from difflab.runs import run_kind
    from difflab.training.parts import build_parts

    file = tmp_path / "teacher.safetensors"
    assert cli.main(["export", str(teacher), "--format", "ema", "--out", str(file)]) == 0
    threads = torch.get_num_threads()
    try:
        parts = build_parts(_cfg("toy2d-ect", "train.steps=1", f"consistency.teacher={file}"))
        cfg = _cfg("toy2d-cd", "train.steps=2", f"consistency.teacher={file}")
        train(cfg, tmp_path / "cd", progress=False)
    finally:
        torch.set_num_threads(threads)
    ema = load_file(teacher / "checkpoints/step-4/ema.safetensors")
    for k, v in parts.net.state_dict().items():
        assert torch.equal(v, ema[k].half().float()), k
    npz = teacher_samples(tmp_path / "cd", cfg, run_kind(tmp_path / "cd"), 50)
    with np.load(npz) as f:
        assert f["teacher"].shape == (50, 2) and np.isfinite(f["teacher"]).all()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not safetensors")
    with pytest.raises(ConfigError, match="is not a difflab weights file"):
        build_parts(_cfg("toy2d-ect", f"consistency.teacher={bad}"))


@pytest.mark.parametrize(
    "solver,substeps", [("heun", 1), ("heun", 3), ("dpm_2s", 1), ("dpm_2s", 2)]
)
def test_cd_teacher_step_batched_equals_one_solver_call_per_level(teacher, solver, substeps):
    # Heun or DPM-Solver++(2S) on a VP table runs as one batched step (two teacher calls a
    # sub-step); the registered sampler, called once per level pair present in the batch, is the
    # reference
    threads = torch.get_num_threads()
    try:
        from difflab.training.parts import build_parts

        sets = [
            f"consistency.teacher={teacher}",
            f"consistency.solver={solver}",
            f"consistency.solver_substeps={substeps}",
        ]
        loss = build_parts(_cfg("toy2d-cd", *sets)).loss
    finally:
        torch.set_num_threads(threads)
    assert loss.teacher_batch_step is not None
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(256, 2, generator=g) * 2 - 1
    u, eps = loss.draw(x0.shape, g)
    sigmas = karras(loss.c.num_levels, loss.sigma_min, loss.sigma_max, loss.c.rho)
    i = loss.index(u, sigmas)
    x_hi, t_hi = loss.point(x0, eps, sigmas[i + 1])
    t_lo = t_of_sigma(loss.schedule, sigmas[i]).float()
    with torch.no_grad():
        batched = loss.lower_point(x_hi, t_hi, t_lo, i, None, 0)
        loss.teacher_batch_step = None
        grouped = loss.lower_point(x_hi, t_hi, t_lo, i, None, 0)
    torch.testing.assert_close(batched, grouped, rtol=1e-5, atol=1e-5)


def test_jittered_cd_levels_are_one_grid_interval_at_a_uniform_offset(teacher):
    # consistency.levels=jitter: u = 0 gives the grid's lowest interval, u -> 1 its highest, and
    # every pair lies one grid step apart in sigma^(1/rho), at levels between the grid's
    threads = torch.get_num_threads()
    try:
        from difflab.training.parts import build_parts

        sets = [f"consistency.teacher={teacher}", "consistency.levels=jitter"]
        loss = build_parts(_cfg("toy2d-cd", *sets)).loss
    finally:
        torch.set_num_threads(threads)
    c = loss.c
    grid = karras(c.num_levels, loss.sigma_min, loss.sigma_max, c.rho)
    s_lo, s_hi = loss.jittered_pair(torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(s_lo, grid[[0, -2]])
    torch.testing.assert_close(s_hi, grid[[1, -1]])
    u = torch.rand(1000, generator=torch.Generator().manual_seed(0))
    s_lo, s_hi = loss.jittered_pair(u)
    step = (loss.sigma_max ** (1 / c.rho) - loss.sigma_min ** (1 / c.rho)) / (c.num_levels - 1)
    torch.testing.assert_close(
        s_hi ** (1 / c.rho) - s_lo ** (1 / c.rho), torch.full_like(s_hi, step)
    )
    off_grid = (s_hi[:, None] - grid[None]).abs().min(dim=1).values > 1e-6 * s_hi
    assert off_grid.float().mean() > 0.99
    # one training step runs, its teacher step batched over rows with their own levels
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(64, 2, generator=g) * 2 - 1
    model = build_parts(_cfg("toy2d-cd", *sets)).model
    value, _ = loss(model, x0, None, noise=loss.draw(x0.shape, g), step=0)
    assert value.shape == (64,) and torch.isfinite(value).all()


@pytest.mark.parametrize("levels", ["grid", "jitter"])
def test_cd_inverse_gap_weighting_is_icts_lambda_with_mean_one(teacher, levels):
    # consistency.weighting=inverse_gap: lambda = 1 / (s_hi - s_lo) divided by its mean under the
    # level draw, so over many draws the weights average 1 and their ratios are iCT's
    threads = torch.get_num_threads()
    try:
        from difflab.training.parts import build_parts

        sets = [f"consistency.teacher={teacher}", f"consistency.levels={levels}"]
        one = build_parts(_cfg("toy2d-cd", *sets, "consistency.weighting=one")).loss
        loss = build_parts(_cfg("toy2d-cd", *sets, "consistency.weighting=inverse_gap")).loss
    finally:
        torch.set_num_threads(threads)
    u = torch.rand(200_000, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    s_lo, s_hi, _ = loss.levels(u)
    w = loss.weight(s_hi, s_lo)
    assert abs(float(w.mean()) - 1.0) < 0.02
    torch.testing.assert_close(w * (s_hi - s_lo), torch.full_like(w, 1 / loss.mean_weight))
    assert torch.equal(one.weight(s_hi, s_lo), torch.ones_like(s_hi))
    # the lowest interval outweighs the highest by their gaps' ratio
    assert float(w.max() / w.min()) > 100


class _ExactTeacher(GaussianDenoiser):
    """The closed-form Gaussian denoiser with the alpha_sigma of a difflab Denoiser."""

    def alpha_sigma(self, t, like):
        t = t.double()
        return self.schedule.alpha(t)[:, None].to(like), self.schedule.sigma(t)[:, None].to(like)


def test_cd_sub_steps_converge_to_the_exact_flow_at_second_order():
    # consistency.solver_substeps: k Heun or DPM-Solver++(2S) steps between two levels; on
    # Gaussian data the flow is exact (tests/gaussian.py), and the error falls ~4x each time k
    # doubles. Heun is in its asymptotic range from k = 1 on sigma 20 -> 0.05; DPM-Solver++,
    # exact on the linear part of the flow, starts 30x closer and falls >3x a doubling from k = 4
    schedule = schedules.linear()
    teacher = _ExactTeacher(schedule, MU, S)
    t_hi, t_lo = (t_of_sigma(schedule, torch.tensor(v)).double() for v in (20.0, 0.05))
    x = torch.randn(256, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = float(schedule.alpha(t_hi)) * MU.double() + x * 3.0
    exact = pf_solution(schedule, MU, S, x, float(t_hi), float(t_lo))
    ts = t_hi.expand(256), t_lo.expand(256)
    ks = (1, 2, 4, 8, 16)
    steps = {s: [batched_ode_step(teacher, s, schedule, k) for k in ks] for s in ("heun", "dpm_2s")}
    errors = {
        s: [float((f(x, *ts, None) - exact).abs().max()) for f in fs] for s, fs in steps.items()
    }
    assert all(a > 3 * b for a, b in itertools.pairwise(errors["heun"])), errors
    assert all(a > 3 * b for a, b in itertools.pairwise(errors["dpm_2s"][2:])), errors
    assert all(d < h for d, h in zip(errors["dpm_2s"], errors["heun"], strict=True)), errors
    sub = substep_times(schedule, *ts, 4)
    levels = torch.stack([sigma_of(schedule, t) for t in sub])[:, 0]
    ratios = levels[1:] / levels[:-1]  # geometric in sigma / alpha, ends exact
    torch.testing.assert_close(ratios, ratios[:1].expand(4), rtol=1e-9, atol=0)
    assert torch.equal(sub[0], ts[0]) and torch.equal(sub[-1], ts[1])


class _ConstantTeacher(_ExactTeacher):
    """D(x, t) = mu whatever x and t: the flow's end is mu, and its path is known in closed form."""

    def __call__(self, x, t, cond=None):
        return self.mu.to(x).expand_as(x), None


def test_dpm_2s_step_is_exact_for_a_constant_denoiser():
    # with D = mu the flow is x~(s) = mu + (s / s_hi)(x~ - mu) in x~ = x / alpha; DPM-Solver++
    # integrates the linear part exactly and its D_2 blends two equal D's into mu, so one step
    # lands on it to float64 rounding, through the midpoint's own alpha and time
    schedule = schedules.linear()
    teacher = _ConstantTeacher(schedule, MU, S)
    t_hi, t_lo = (t_of_sigma(schedule, torch.tensor(v)).double() for v in (20.0, 0.05))
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    s_hi, s_lo = (float(sigma_of(schedule, t.reshape(1))[0]) for t in (t_hi, t_lo))
    a_hi, a_lo = (float(schedule.alpha(t)) for t in (t_hi, t_lo))
    mu = MU.double()
    exact = a_lo * (mu + (s_lo / s_hi) * (x / a_hi - mu))
    got = batched_ode_step(teacher, "dpm_2s", schedule)(x, t_hi.expand(64), t_lo.expand(64), None)
    torch.testing.assert_close(got, exact, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="no batched step for solver 'ddpm'"):
        batched_ode_step(teacher, "ddpm", schedule)


def _main(argv, capsys):
    code = cli.main(argv)
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    "sets,message",
    [
        (["train.loss=ict", "consistency.s0=20", "consistency.s1=10"], "curriculum must increase"),
        (["consistency.teacher=/nonexistent/run"], "is not a difflab run directory"),
        (["consistency.teacher=", "train.loss=ect"], "starts from a trained diffusion run"),
        (["diffusion.schedule=cosine", "diffusion.num_steps=0"], "does not match: diffusion"),
        (["model.mlp.width=48"], "model.* (the student starts from"),
        (["train.loss=ect", "consistency.ect_q=1"], "ECT's curriculum must increase"),
        (["consistency.levels=random"], "unknown consistency.levels 'random'"),
        (["consistency.levels=jitter", "consistency.solver=ddim"], "needs a batched teacher"),
        (["consistency.weighting=snr"], "unknown consistency.weighting 'snr'"),
    ],
)
def test_bad_consistency_input_exits_2_and_writes_nothing(tmp_path, teacher, capsys, sets, message):
    base = ["train.loss=cd", f"consistency.teacher={teacher}", *SMALL, "train.steps=2"]
    argv = ["train", "--preset", "toy2d-cd", "--runs", str(tmp_path), "--name", "x", *FLAGS]
    code, err = _main([*argv, "--set", *base, *sets], capsys)
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "x").exists()


def test_a_corrupt_teacher_is_refused(tmp_path, teacher, capsys):
    bad = tmp_path / "bad"
    subprocess.run(["cp", "-r", str(teacher), str(bad)], check=True)
    for ckpt in (bad / "checkpoints").iterdir():
        (ckpt / "ema.safetensors").write_bytes(b"garbage")
    argv = ["train", "--preset", "toy2d-ect", "--runs", str(tmp_path), "--name", "x", *FLAGS]
    code, err = _main([*argv, "--set", *SMALL, f"consistency.teacher={bad}"], capsys)
    assert code == 2 and "cannot be read" in err and not (tmp_path / "x").exists()


def test_sampling_refusals_and_two_step_samples(tmp_path, teacher, capsys):
    out = tmp_path / "s.npz"
    code, err = _main(
        ["sample", str(teacher), "--sampler", "consistency", "--out", str(out)], capsys
    )
    assert code == 2 and "needs a consistency model" in err and not out.exists()
    argv = ["train", "--preset", "toy2d-ct", "--runs", str(tmp_path), "--name", "ct", *FLAGS]
    assert cli.main([*argv, "--set", *SMALL, "train.steps=2"]) == 0
    run = str(tmp_path / "ct")
    code, err = _main(
        ["sample", run, "--steps", "3", "--cm-sigmas", "1.0", "--out", str(out)], capsys
    )
    assert code == 2 and "--steps 3 needs 2 noise levels" in err and not out.exists()
    code, err = _main(
        ["sample", run, "--steps", "2", "--cm-sigmas", "1,2", "--out", str(out)], capsys
    )
    assert code == 2 and "decreasing" in err
    assert cli.main(["sample", run, "--steps", "2", "--n", "50", "--out", str(out)]) == 0
    assert np.load(out)["samples"].shape == (50, 2)
    capsys.readouterr()
    assert cli.main(["eval", run, "--compare", "--nfe", "1,2", "--json"]) == 0
    printed = capsys.readouterr().out
    rows = json.loads(printed[printed.index("{\n") :])["rows"]
    assert [(r["sampler"], r["nfe"]) for r in rows] == [("consistency", 1), ("consistency", 2)]


def _gaussian_fit(loss_name, steps, *extra):
    """A 1-D model trained by `loss_name` on N(0.5, 0.3^2) data; returns (error, baseline):
    the mean |f - f*| over points of the marginals, and the same for f = x~ (no model)."""
    mu, std = 0.5, 0.3
    small = ["model.mlp.width=64", "model.mlp.depth=2", "model.mlp.fourier_frequencies=0"]
    cfg = apply_overrides(
        preset("toy2d-ct"),
        [
            f"train.loss={loss_name}",
            *small,
            "diffusion.sigma_data=0.5",
            f"train.steps={steps}",
            "consistency.s0=10",
            "consistency.s1=160",
            "diffusion.sigma_max=10",
            *extra,
        ],
    )
    torch.manual_seed(0)
    model = build.build_model(cfg, DataKind((1,)))
    loss = build.build_loss(cfg, model.schedule)
    if loss_name == "cd":
        exact = _ExactGaussian(model.schedule, mu, std)
        loss.teacher_step = lambda x, t, t_next, cond, seed: sample_heun(
            exact, x, torch.tensor([t, t_next], dtype=torch.float64), generator=SampleNoise(seed)
        )
        if loss.c.levels == "jitter":  # every row at its own levels: the batched step
            gaussian = _ExactTeacher(model.schedule, torch.tensor(mu), torch.tensor(std))
            loss.teacher_batch_step = batched_ode_step(gaussian, "heun", model.schedule)
    target = build.build_model(cfg, DataKind((1,))).net.requires_grad_(False)
    target.load_state_dict(model.net.state_dict())
    opt = torch.optim.Adam(model.net.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(1)
    for step in range(steps):
        x0 = mu + std * torch.randn(256, 1, generator=g)
        loss_value, _ = loss(
            model, x0, None, noise=loss.draw(x0.shape, g), step=step, target=target
        )
        opt.zero_grad()
        loss_value.mean().backward()
        opt.step()
        decay = loss.target_decay(step + 1)
        with torch.no_grad():
            for p_t, p in zip(target.parameters(), model.net.parameters(), strict=True):
                p_t.lerp_(p, 1 - decay)
    s = torch.tensor([0.2, 0.5, 1.0, 2.0, 5.0])
    t = s.repeat_interleave(200).float()
    x = mu + torch.sqrt(std**2 + s.repeat_interleave(200) ** 2)[:, None] * torch.randn(1000, 1)
    with torch.no_grad():
        f, _ = model.denoiser(x, t)
    want = gaussian_consistency(x.double(), t.double(), model.schedule, mu, std).float()
    return (f - want).abs().mean().item(), (x - want).abs().mean().item()


class _ExactGaussian:
    def __init__(self, schedule, mu, std):
        self.schedule, self.mu, self.std = schedule, mu, std

    def __call__(self, x_t, t, y=None):
        s = sigma_of(self.schedule, torch.as_tensor(t).double()).reshape(-1, 1).to(x_t)
        x0 = self.mu + self.std**2 / (self.std**2 + s**2) * (x_t - self.mu)
        return x0, (x_t - x0) / s


@pytest.mark.slow
@pytest.mark.parametrize(
    "loss_name,share,levels,weighting",
    [
        ("ct", 0.25, "grid", "one"),
        ("ict", 0.1, "grid", "one"),
        ("cd", 0.1, "grid", "one"),
        ("cd", 0.1, "jitter", "one"),
        ("cd", 0.1, "jitter", "inverse_gap"),
    ],
)
def test_tiny_models_approach_the_closed_form_consistency_function(
    loss_name, share, levels, weighting
):
    # measured (200 steps, 1 thread): |f - f*| / |x~ - f*| = 0.16 (CT), 0.04 (iCT), 0.035 (CD)
    sets = (
        "consistency.target_ema=0.9",
        f"consistency.levels={levels}",
        f"consistency.weighting={weighting}",
    )
    error, baseline = _gaussian_fit(loss_name, 200, *sets)
    assert error < share * baseline, (error, baseline)


@pytest.mark.slow
def test_two_gloo_processes_resume_bitwise(tmp_path, teacher):
    """A 2-process CT run (EMA target) killed after step 3 and resumed equals a straight one."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    sets = ["--set", *SMALL, "train.steps=4", "train.loss=ct", "consistency.s0=2"]
    base = [sys.executable, "-m", "difflab", "train", "--preset", "toy2d-ct", "--nproc", "2"]

    def run(name, *more, extra_env=None):
        argv = [*base, "--runs", str(tmp_path), "--name", name, *FLAGS, *sets, *more]
        return subprocess.run(
            argv, env={**env, **(extra_env or {})}, capture_output=True, text=True, timeout=300
        )

    assert run("straight").returncode == 0
    fault = {"DIFFLAB_FAULT_RANK": "1", "DIFFLAB_FAULT_STEP": "3"}
    assert run("killed", extra_env=fault).returncode == 1
    resume = [sys.executable, "-m", "difflab", "train", "--resume", str(tmp_path / "killed")]
    result = subprocess.run(
        [*resume, "--nproc", "2", *FLAGS], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    _same(tmp_path / "straight/checkpoints/step-4", tmp_path / "killed/checkpoints/step-4")
    assert noise_range(build.build_schedule(preset("toy2d-ct").diffusion))[1] == pytest.approx(80)
