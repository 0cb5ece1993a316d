"""bench/gpu_check.sh, tested before any GPU is seen: the wheel plan names what to carry, the
stage list fits the budget, and the dry run goes end to end on the CPU."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
sys.modules["gpu_check"] = gpu_check  # dataclasses look their module up
spec.loader.exec_module(gpu_check)


def test_a_missing_package_without_a_wheel_is_named_with_the_fix(tmp_path):
    missing = gpu_check.missing_packages({"json": "json", "no_such_module_xyz": "no-such-pkg"})
    assert missing == ["no-such-pkg"]
    with pytest.raises(
        gpu_check.CheckError,
        match=r"no wheel in .* for: no-such-pkg.*pip "
        r"download no-such-pkg -d",
    ):
        gpu_check.install_plan(missing, tmp_path)
    (tmp_path / "no_such_pkg-1.0-py3-none-any.whl").write_bytes(b"")
    plan = gpu_check.install_plan(missing, tmp_path)
    assert plan[-1] == "no-such-pkg" and "--no-index" in plan and str(tmp_path) in plan
    assert gpu_check.install_plan([], tmp_path) == []


def test_the_gpu_stages_fit_the_eight_minute_budget(tmp_path):
    args = gpu_check.argparse.Namespace(dry_run=False, root="data", judge=None)
    stages = gpu_check.stages(args, tmp_path)
    names = [s.name for s in stages]
    assert names == [
        "judge",
        "cuda-tests",
        "bench-fp32",
        "bench-bf16",
        "train-mnist",
        "eval-mnist",
        "train-mnist-dit",
        "eval-mnist-dit",
        "bench-bf16-compiled",
    ]
    bench = stages[2].argv
    assert bench[bench.index("bench") + 1] == "cifar10-ddpm"
    assert bench[bench.index("--batch-size") + 1] == "128" and "cuda" in bench

    def device_of(argv):
        for a in argv:
            if a.startswith("train.device="):
                return a.split("=", 1)[1]
        return argv[argv.index("--device") + 1] if "--device" in argv else None

    on_gpu = [s.name for s in stages if device_of(s.argv) == "cuda"]
    assert on_gpu == names[2:]  # every bench, the training and its evaluation
    # each stage is capped; what does not fit in the budget is skipped, never run past it
    skipped = gpu_check.Stage("x", ["true"], 100)
    gpu_check.run_stage(skipped, 10, tmp_path, {})
    assert skipped.rc is None and "not run" in skipped.skipped


def test_no_gpu_without_dry_run_is_refused(capsys):
    if gpu_check_has_cuda():
        pytest.skip("this machine has a GPU")
    assert gpu_check.main(["--out", "unused"]) == 2
    assert "no CUDA GPU visible; use --dry-run" in capsys.readouterr().err


def gpu_check_has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.slow
def test_the_dry_run_goes_end_to_end_on_the_cpu(tmp_path, shared_data):
    out = tmp_path / "out"
    p = subprocess.run(
        [
            "bash",
            str(ROOT / "bench" / "gpu_check.sh"),
            "--dry-run",
            "--out",
            str(out),
            "--root",
            str(shared_data),
            "--budget",
            "1800",
        ],
        capture_output=True,
        text=True,
        env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"},
    )
    report = json.loads((out / "results.json").read_text())
    failed = [(s["name"], s["tail"][-400:]) for s in report["stages"] if s["rc"] != 0]
    assert p.returncode == 0 and not failed, failed
    assert report["dry_run"] and (out / "results.md").exists()
    assert report["stages"][2]["figures"]["difflab_images_per_s"] > 0
    assert any(k.startswith("accuracy") for k in report["stages"][5]["figures"])
