"""The prepared GPU check: everything difflab wants to know from a short GPU lease, in one go.

GPU time comes in short leases (about 15 minutes in all, a few minutes a command), so this is
written, and dry-run on the CPU, before any GPU is seen. In at most `--budget` seconds (8
minutes by default) it:

1. checks the Python packages difflab needs and installs the missing ones from wheels carried
   beside the working tree (`--wheels`, default `wheels/`; no network is assumed). A missing
   package without a wheel is named with the command that fetches it.
2. runs the tests that need CUDA (`pytest -m cuda`; they skip on a machine without one).
3. `difflab bench cifar10-ddpm --device cuda --batch-size 128` in fp32, in bf16 and compiled:
   images/s of difflab and diffusers, model-FLOP utilisation against the measured matmul peak
   of each precision, sampling ms per image.
4. a short `mnist` training on the GPU, then `difflab eval` of it with the offline judge.
5. the same for the `mnist-dit` preset (the DiT backbone), judged alike.

Every stage has its own time limit; a stage that does not fit in what is left of the budget is
recorded as skipped, never silently dropped. All figures land in one folder: `results.json`
(every stage: command, exit status, seconds, its figures, the tail of its output) and
`results.md`, plus each bench's own JSON and Markdown.

    bash bench/gpu_check.sh [--out gpu-check] [--root DATA] [--wheels wheels]  # on the GPU
    bash bench/gpu_check.sh --dry-run --out /tmp/gpu-dry                          # on a CPU

`--dry-run` runs every stage on the CPU at tiny sizes, to test this script before a lease.
To prepare the wheels on a machine with a network: `pip download diffusers torch-fidelity
safetensors -d wheels` (the GPU machine is expected to have torch).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# import name -> pip package: what difflab, its bench (diffusers) and its tests import
REQUIRED = {
    "numpy": "numpy",
    "safetensors": "safetensors",
    "tqdm": "tqdm",
    "matplotlib": "matplotlib",
    "PIL": "pillow",
    "scipy": "scipy",
    "diffusers": "diffusers",
    "torch_fidelity": "torch-fidelity",
    "pytest": "pytest",
}


class CheckError(Exception):
    """A problem the person preparing the lease can fix; printed as one message, exit 2."""


@dataclass
class Stage:
    name: str
    argv: list[str]
    limit_s: int  # this stage's own time limit
    rc: int | None = None  # None: not run
    seconds: float = 0.0
    skipped: str = ""  # why it did not run
    figures: dict = field(default_factory=dict)
    tail: str = ""


def missing_packages(required: dict[str, str]) -> list[str]:
    """The pip names of the required packages that cannot be imported here."""
    return [pip for name, pip in required.items() if importlib.util.find_spec(name) is None]


def wheel_for(package: str, wheels: Path) -> Path | None:
    """A wheel for `package` in `wheels` (pip normalises - to _ in wheel names)."""
    stem = package.replace("-", "_").lower()
    if not wheels.is_dir():
        return None
    found = [w for w in wheels.glob("*.whl") if w.name.lower().split("-")[0] == stem]
    return sorted(found)[-1] if found else None


def install_plan(missing: list[str], wheels: Path) -> list[str]:
    """The pip install argv for the missing packages, or CheckError naming the ones without a
    wheel and how to carry them."""
    absent = [p for p in missing if wheel_for(p, wheels) is None]
    if absent:
        names = " ".join(absent)
        raise CheckError(
            f"no wheel in {wheels}/ for: {names}. On a machine with a network run "
            f"`pip download {names} -d {wheels}` and carry {wheels}/ with the working tree"
        )
    if not missing:
        return []
    return [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--no-index",
        "--find-links",
        str(wheels),
        *missing,
    ]


def stages(args: argparse.Namespace, out: Path) -> list[Stage]:
    """The check's commands, in order; the dry run keeps every stage at tiny sizes on the CPU."""
    py, dry = sys.executable, args.dry_run
    device = "cpu" if dry else "cuda"
    bench_size = (
        [
            "--batch-size",
            "2",
            "--steps",
            "1",
            "--warmup",
            "1",
            "--nfe",
            "2",
            "--samplers",
            "ddim",
            "--sample-batch",
            "2",
            "--matmul-size",
            "256",
        ]
        if dry
        else [
            "--batch-size",
            "128",
            "--steps",
            "20",
            "--warmup",
            "5",
            "--nfe",
            "10,50",
            "--sample-batch",
            "256",
        ]
    )
    bench_name = "mnist" if dry else "cifar10-ddpm"  # the dry run: the same code, a small net
    run_dir = out / "runs" / "gpu-mnist"
    train_size = (
        [
            "--set",
            "train.steps=4",
            "--set",
            "train.batch_size=8",
            "--set",
            "train.log_every=2",
            "--set",
            "train.checkpoint_every=4",
            "--set",
            "train.warmup_steps=1",
        ]
        if dry
        else ["--set", "train.steps=2600", "--set", "train.time_limit_minutes=2.5"]
    )
    judge = Path(args.judge) if args.judge else out / "judge-mnist.safetensors"
    result = []
    if not args.judge:
        result.append(
            Stage(
                "judge",
                [
                    py,
                    "-m",
                    "difflab",
                    "eval",
                    "train-classifier",
                    "--dataset",
                    "mnist",
                    "--root",
                    args.root,
                    "--epochs",
                    "1",
                    "--out",
                    str(judge),
                    "--quiet",
                ],
                240,
            )
        )
    result.append(
        Stage(
            "cuda-tests",
            [
                py,
                "-m",
                "pytest",
                "-q",
                "-m",
                "cuda",
                "-p",
                "no:cacheprovider",
                "tests/test_cuda.py",
            ],
            120,
        )
    )
    for label, extra in (("fp32", ["--precision", "fp32"]), ("bf16", ["--precision", "bf16"])):
        result.append(
            Stage(
                f"bench-{label}",
                [
                    py,
                    "-m",
                    "difflab",
                    "bench",
                    bench_name,
                    "--device",
                    device,
                    *bench_size,
                    *extra,
                    "--out",
                    str(out / f"bench-{label}"),
                ],
                150,
            )
        )
    result.append(
        Stage(
            "train-mnist",
            [
                py,
                "-m",
                "difflab",
                "train",
                "--preset",
                "mnist",
                "--runs",
                str(run_dir.parent),
                "--name",
                run_dir.name,
                "--quiet",
                "--no-finish",
                "--set",
                f"data.root={args.root}",
                "--set",
                f"train.device={device}",
                *train_size,
            ],
            200,
        )
    )
    n = "200" if dry else "1000"  # fd_judge needs n > 128
    result.append(
        Stage(
            "eval-mnist",
            [
                py,
                "-m",
                "difflab",
                "eval",
                str(run_dir),
                "--n",
                n,
                "--per-class",
                "--device",
                device,
                "--judge",
                str(judge),
                "--reference",
                "mnist:test",
                "--root",
                args.root,
                *(
                    ["--steps", "4", "--n-reference", "300"]
                    if dry
                    else ["--sampler", "ddpm", "--steps", "50"]
                ),
                "--json",
                "--out",
                str(out / "eval-mnist.json"),
            ],
            120,
        )
    )
    result += dit_stages(args, out, device, judge, dry)
    # last: compiling takes the longest and matters least (the dry run compiles the small MLP)
    result.append(
        Stage(
            "bench-bf16-compiled",
            [
                py,
                "-m",
                "difflab",
                "bench",
                "toy2d" if dry else bench_name,
                "--device",
                device,
                *bench_size,
                "--precision",
                "bf16",
                "--compile",
                "--out",
                str(out / "bench-bf16-compiled"),
            ],
            200,
        )
    )
    if dry:  # a CPU is slower than the GPU the limits are sized for; --budget still caps
        for stage in result:
            stage.limit_s *= 4
    return result


def dit_stages(
    args: argparse.Namespace, out: Path, device: str, judge: Path, dry: bool
) -> list[Stage]:
    """The `mnist-dit` preset (issue 39): a short training on the GPU, then judged like the
    U-Net's, so the two rows of results.md compare backbones on one lease."""
    py, run_dir = sys.executable, out / "runs" / "gpu-mnist-dit"
    size = ["train.steps=3000", "train.time_limit_minutes=2.0"]
    if dry:
        size = ["train.steps=4", "train.batch_size=8", "train.checkpoint_every=4"]
    train = [py, "-m", "difflab", "train", "--preset", "mnist-dit", "--quiet", "--no-finish"]
    train += ["--runs", str(run_dir.parent), "--name", run_dir.name]
    train += ["--set", f"data.root={args.root}", f"train.device={device}", *size]
    n, extra = ("200", ["--steps", "4", "--n-reference", "300"]) if dry else ("1000", [])
    evaluate = [py, "-m", "difflab", "eval", str(run_dir), "--n", n, "--per-class", *extra]
    evaluate += ["--device", device, "--judge", str(judge), "--root", args.root]
    evaluate += ["--reference", "mnist:test", "--json", "--out", str(out / "eval-mnist-dit.json")]
    return [Stage("train-mnist-dit", train, 160), Stage("eval-mnist-dit", evaluate, 120)]


def _figures(stage: Stage, out: Path) -> dict:
    """The headline numbers a stage wrote (bench JSON, eval JSON), for results.md."""
    if stage.name.startswith("bench-"):
        files = sorted((out / stage.name).glob("*.json"))
        if not files:
            return {}
        r = json.loads(files[-1].read_text())
        t = r.get("training", {})
        figures = {"precision": r["settings"].get("precision", {}).get("used")}
        for side in ("difflab", "diffusers"):
            row = t.get(side, {})
            if row.get("images_per_s"):
                figures[f"{side}_images_per_s"] = row["images_per_s"]
                figures[f"{side}_mfu"] = row.get("fraction_of_measured_peak")
        figures["difflab_over_diffusers"] = t.get("ratio_images_per_s")
        figures["matmul_peak_tflops"] = r["peak"]["measured"]["flop_per_s"] / 1e12
        return figures
    if stage.name.startswith("eval-") and (out / f"{stage.name}.json").exists():
        rows = json.loads((out / f"{stage.name}.json").read_text())["rows"]
        figures = {r["label"]: r["value"] for r in rows}
        return figures | {"ms_per_sample": rows[0]["ms_per_sample"]} if rows else figures
    return {}


def run_stage(stage: Stage, left_s: float, out: Path, env: dict) -> None:
    """Run one stage within min(its limit, what is left); record what happened."""
    limit = min(stage.limit_s, int(left_s))
    if limit < 20:
        stage.skipped = f"not run: {left_s:.0f} s of the budget left"
        return
    t0 = time.perf_counter()
    try:
        p = subprocess.run(
            stage.argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=limit
        )
        stage.rc, text = p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        stage.rc = 124
        text = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        text += f"\n[stopped at its {limit} s limit]"
    stage.seconds = time.perf_counter() - t0
    stage.tail = text[-3000:]
    stage.figures = _figures(stage, out)


def markdown(report: dict) -> str:
    lines = [
        f"# difflab GPU check — {report['date']}",
        "",
        f"Device: {report['device']}; torch {report['torch']}; dry run: {report['dry_run']}; "
        f"{report['seconds']:.0f} s of a {report['budget_s']} s budget.",
        "",
        "| stage | status | seconds | figures |",
        "| --- | --- | --- | --- |",
    ]
    for s in report["stages"]:
        status = s["skipped"] or ("ok" if s["rc"] == 0 else f"exit {s['rc']}")
        figures = ", ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
            for k, v in s["figures"].items()
            if not isinstance(v, (dict, list))
        )
        lines.append(f"| {s['name']} | {status} | {s['seconds']:.0f} | {figures} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="every stage on the CPU, tiny sizes")
    ap.add_argument("--out", default="gpu-check", help="folder for every result")
    ap.add_argument("--root", default="../shared/data", help="folder holding MNIST/raw/")
    ap.add_argument("--wheels", default="wheels", help="folder of wheels for missing packages")
    ap.add_argument("--judge", help="an MNIST judge file (default: train one, 1 epoch)")
    ap.add_argument("--budget", type=int, default=480, help="seconds for the whole check")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    try:
        import torch
    except ImportError:
        print("gpu_check: error: torch is not installed; install it first", file=sys.stderr)
        return 2
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: error: no CUDA GPU visible; use --dry-run on a CPU", file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    try:
        plan = install_plan(missing_packages(REQUIRED), (ROOT / args.wheels).resolve())
    except CheckError as e:
        print(f"gpu_check: error: {e}", file=sys.stderr)
        return 2
    path = os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path}
    todo = ([Stage("install", plan, 120)] if plan else []) + stages(args, out)
    for stage in todo:
        run_stage(stage, args.budget - (time.perf_counter() - t0), out, env)
        status = stage.skipped or f"exit {stage.rc} in {stage.seconds:.0f} s"
        print(f"[gpu_check] {stage.name}: {status}", flush=True)
    report = {
        "benchmark": "gpu_check",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "dry_run": args.dry_run,
        "budget_s": args.budget,
        "seconds": time.perf_counter() - t0,
        "stages": [asdict(s) for s in todo],
    }
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "results.md").write_text(markdown(report))
    print(markdown(report))
    return 0 if all(s.rc == 0 for s in todo) else 1


if __name__ == "__main__":
    sys.exit(main())
