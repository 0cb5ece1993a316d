"""Benchmark: every few-step method difflab has, in one table (issue 40).

Rows, each a preset trained by the public commands (`difflab train`, `difflab reflow`):
- the plain runs, as references and teachers: `toy2d` (DDPM, swept with DDIM) and `toy2d-flow`
  (rectified flow, DPM-Solver++ (2M)); on MNIST `mnist` and `mnist-flow`;
- 2-rectified flow (`difflab reflow` of the flow run, sampled by Euler: `ddim`);
- consistency distillation (CD) and easy consistency tuning (ECT), both of the DDPM teacher;
- improved consistency training (iCT from scratch: `toy2d-ct`, `mnist-ct`);
- MeanFlow and shortcut models, from scratch.

Columns: training minutes (the sum of the run's logged step times in metrics.jsonl, plus the
reflow pairs' drawing), the teacher and its minutes, quality at 1, 2 and 4 network calls (and
the references' own budgets: DDIM-50, DPM-Solver++ 10) and milliseconds per sample at each.
Checkerboard quality: in-square and sliced W2 of 20,000 samples against the data. MNIST: judge
accuracy and judge Frechet distance to the test split of 1,000 class-balanced samples, each run
with its own guidance (MeanFlow's is folded into training; `--guidance ROW=SCALE` measures a
run trained before its preset's scale changed at the new one).

Stages resume: a run whose training finished is kept (DIR/<row>/done.json), a killed one
continues with `difflab train --resume`; `--reuse ROW=RUN` takes a run trained elsewhere (its
minutes come from its metrics.jsonl) or a shipped `pretrained:NAME` (minutes from its record).
The measurements of every row are taken again, together, by each invocation, so the table
compares runs measured on one machine in one run.

    python bench/few_step.py --data checkerboard --work DIR [--only meanflow,shortcut]
    python bench/few_step.py --data mnist --root ../shared/data --work DIR [--judge FILE]
        [--reuse mnist-flow=runs/mnist-flow mnist=pretrained:mnist]
        [--override meanflow:train.steps=1000] [--guidance shortcut=2.5]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from difflab import pretrained
from difflab.benchmark.measure import environment
from difflab.errors import ConfigError
from difflab.files import write_text_atomically


@dataclass(frozen=True)
class Row:
    key: str  # folder under --work and the --only / --reuse / --override name
    name: str  # the table's name
    preset: str
    sampler: str  # the sampler of its NFE sweep
    teacher: str = ""  # the key of the row it distils or reflows ("" = from scratch)
    reflow: bool = False  # trained by `difflab reflow` of the teacher
    own_nfe: int = 0  # a reference's own budget, measured beside 1, 2 and 4


CHECKERBOARD = (
    Row("toy2d", "DDPM (toy2d), DDIM", "toy2d", "ddim", own_nfe=50),
    Row("toy2d-flow", "rectified flow (toy2d-flow)", "toy2d-flow", "dpmpp_2m", own_nfe=10),
    Row("reflow", "2-rectified flow", "toy2d-flow", "ddim", teacher="toy2d-flow", reflow=True),
    Row("cd", "consistency distillation", "toy2d-cd", "consistency", teacher="toy2d"),
    Row("ect", "easy consistency tuning", "toy2d-ect", "consistency", teacher="toy2d"),
    Row("ict", "improved consistency training", "toy2d-ct", "consistency"),
    Row("meanflow", "MeanFlow", "toy2d-meanflow", "meanflow"),
    Row("shortcut", "shortcut model", "toy2d-shortcut", "shortcut"),
)
MNIST = (
    Row("mnist", "DDPM (mnist), DDIM", "mnist", "ddim", own_nfe=20),
    Row("mnist-flow", "rectified flow (mnist-flow)", "mnist-flow", "dpmpp_2m", own_nfe=10),
    Row("reflow", "2-rectified flow", "mnist-flow", "ddim", teacher="mnist-flow", reflow=True),
    Row("cd", "consistency distillation", "mnist-cd", "consistency", teacher="mnist"),
    Row("ect", "easy consistency tuning", "mnist-ect", "consistency", teacher="mnist"),
    Row("ict", "improved consistency training", "mnist-ct", "consistency"),
    Row("meanflow", "MeanFlow", "mnist-meanflow", "meanflow"),
    Row("shortcut", "shortcut model", "mnist-shortcut", "shortcut"),
)
QUALITY = {"checkerboard": ("in_square", "sliced_w2"), "mnist": ("accuracy", "fd_judge")}


def difflab(*args: str, log: Path) -> float:
    """Run `difflab ARGS` with its output in `log`; its wall seconds (a failure stops here)."""
    t0 = time.perf_counter()
    with open(log, "a") as out:
        done = subprocess.run([sys.executable, "-m", "difflab", *args], stdout=out, stderr=out)
    if done.returncode:
        sys.exit(f"difflab {' '.join(args)} failed (exit {done.returncode}); see {log}")
    return time.perf_counter() - t0


def logged_minutes(run: Path) -> tuple[float, int]:
    """(training minutes, steps) of a run: the sum of its logged step times (metrics.jsonl's
    s_per_step over each logging interval), the optimizer's time without set-up and writing."""
    seconds, last, interval, step = 0.0, 0, 0, 0
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "s_per_step" not in record:
            continue
        step = record["step"]
        # a resumed run logs again from its checkpoint: that time was spent too, one interval
        gap = step - last if step > last else interval or step
        interval = interval or gap
        seconds += record["s_per_step"] * gap
        last = step
    return seconds / 60, last


def reused_row(key: str, source: str, runs: dict[str, Path]) -> dict:
    """A run trained elsewhere: a run folder (its minutes from metrics.jsonl) or a shipped
    `pretrained:NAME` (its fp16 EMA file; minutes and steps from the file's record)."""
    if source.startswith(pretrained.PREFIX):
        try:
            runs[key] = pretrained.resolve(source)
        except ConfigError as e:
            sys.exit(f"--reuse {key}={source}: {e}")
        info = pretrained.record(runs[key])
        minutes, steps = info.get("train_minutes"), info.get("train_steps", 0)
        if minutes is None:
            sys.exit(f"--reuse {key}={source}: its record has no training minutes")
    else:
        runs[key] = Path(source).resolve()
        minutes, steps = logged_minutes(runs[key])
    return {"run": str(runs[key]), "train_min": minutes, "steps": steps, "reused": True}


def train_row(row: Row, args, runs: dict[str, Path]) -> dict:
    """Train (or resume, or reuse) one row's run; {"run", "train_min", "steps", ...}."""
    work = args.work
    done = work / row.key / "done.json"
    if row.key in args.reuse:
        return reused_row(row.key, args.reuse[row.key], runs)
    runs[row.key] = work / row.key
    if done.is_file():
        return json.loads(done.read_text())
    log = work / f"{row.key}.log"
    sets = [*args.common_sets, *args.overrides.get(row.key, [])]
    pairs_min = 0.0
    if row.reflow:
        teacher = str(runs[row.teacher])
        reflow = [teacher, "--pairs", str(args.reflow_pairs), "--name", row.key]
        reflow += ["--runs", str(work), "--quiet", "--no-finish"]
        pairs_min = difflab("reflow", *reflow, "--pairs-only", log=log) / 60
        difflab("reflow", *reflow, *(["--set", *sets] if sets else []), log=log)
    elif (work / row.key / "config.json").is_file():  # killed while training: go on
        difflab("train", "--resume", str(work / row.key), "--quiet", "--no-finish", log=log)
    else:
        if row.teacher:
            sets = [f"consistency.teacher={runs[row.teacher]}", *sets]
        cmd = ["--preset", row.preset, "--runs", str(work), "--name", row.key]
        cmd += ["--quiet", "--no-finish", *(["--set", *sets] if sets else [])]
        difflab("train", *cmd, log=log)
    minutes, steps = logged_minutes(work / row.key)
    info = {"run": str(work / row.key), "train_min": minutes + pairs_min, "steps": steps}
    info.update({"pairs_min": pairs_min, "sets": sets})
    write_text_atomically(done, json.dumps(info, indent=2) + "\n")
    return info


def measure_row(row: Row, run: Path, args) -> list[dict]:
    """`difflab eval RUN --compare` at 1, 2, 4 (and the row's own) network calls."""
    nfes = [1, 2, 4] + ([row.own_nfe] if row.own_nfe else [])
    out = args.work / f"{row.key}.compare.json"
    cmd = [str(run), "--compare", "--samplers", row.sampler, "--nfe", ",".join(map(str, nfes))]
    cmd += ["--n", str(args.n), "--quiet", "--out", str(out)]
    cmd += ["--guidances", args.guidance[row.key]] if row.key in args.guidance else []
    if args.data == "mnist":
        cmd += ["--metric", "accuracy,fd_judge", "--reference", "mnist:test", "--root", args.root]
        cmd += ["--judge", args.judge] if args.judge else []
    difflab("eval", *cmd, log=args.work / f"{row.key}.log")
    return json.loads(out.read_text())["rows"]


def table(result: dict) -> str:
    """The markdown table of a result: one line per row."""
    q1, q2 = QUALITY[result["data"]]
    head = ["method", "teacher (min)", "train min"]
    head += [f"{n} calls: {q1} / {q2}" for n in ("1", "2", "4")]
    head += ["own budget", "ms/sample at 1, 2, 4"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["rows"]:
        by_nfe = {m["nfe"]: m for m in r["measured"]}
        cells = [r["name"], f"{r['teacher']} ({r['teacher_min']:.1f})" if r["teacher"] else "none"]
        cells.append(f"{r['train_min']:.1f}")
        for n in (1, 2, 4):
            m = by_nfe.get(n)
            cells.append(f"{m[q1]:.4g} / {m[q2]:.4g}" if m else "-")
        own = by_nfe.get(r["own_nfe"]) if r["own_nfe"] else None
        cells.append(f"{r['own_nfe']}: {own[q1]:.4g} / {own[q2]:.4g}" if own else "-")
        cells.append(", ".join(f"{by_nfe[n]['ms_per_sample']:.3g}" for n in (1, 2, 4)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_pairs(items: list[str], sep: str, flag: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for item in items:
        key, _, value = item.partition(sep)
        if not value:
            sys.exit(f"{flag} {item!r}: write ROW{sep}VALUE")
        out.setdefault(key, []).append(value)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", choices=("checkerboard", "mnist"), default="checkerboard")
    ap.add_argument("--work", required=True, help="the runs and measurements (resumable)")
    ap.add_argument("--only", help="comma-separated row keys (teachers are trained as needed)")
    ap.add_argument("--reuse", nargs="*", default=[], help="ROW=RUN: a run trained elsewhere")
    ap.add_argument("--override", nargs="*", default=[], help="ROW:KEY=VALUE for that row")
    ap.add_argument(
        "--guidance", nargs="*", default=[], help="ROW=SCALE: measure that row at this scale"
    )
    ap.add_argument("--root", default="../shared/data", help="MNIST's data folder")
    ap.add_argument("--judge", help="the MNIST judge (default: the one eval trains or caches)")
    ap.add_argument("--n", type=int, help="samples per measurement (20,000 / 1,000)")
    ap.add_argument("--reflow-pairs", type=int, help="pairs for reflow (50,000 / 10,000)")
    ap.add_argument("--out", help="the JSON (default: WORK/few_step.json)")
    args = ap.parse_args()
    mnist = args.data == "mnist"
    args.work = Path(args.work).resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    args.n = args.n or (1000 if mnist else 20000)
    args.reflow_pairs = args.reflow_pairs or (10000 if mnist else 50000)
    args.reuse = {k: v[-1] for k, v in parse_pairs(args.reuse, "=", "--reuse").items()}
    args.overrides = parse_pairs(args.override, ":", "--override")
    args.guidance = {k: v[-1] for k, v in parse_pairs(args.guidance, "=", "--guidance").items()}
    args.common_sets = [f"data.root={Path(args.root).resolve()}"] if mnist else []
    rows = MNIST if mnist else CHECKERBOARD
    keys = {r.key: r for r in rows}
    wanted = args.only.split(",") if args.only else list(keys)
    unknown = [k for k in wanted if k not in keys]
    if unknown:
        sys.exit(f"--only {','.join(unknown)}: rows are {', '.join(keys)}")
    chosen = [r for r in rows if r.key in wanted or any(keys[w].teacher == r.key for w in wanted)]
    runs: dict[str, Path] = {}
    trained = {row.key: train_row(row, args, runs) for row in chosen}
    result = {"data": args.data, "environment": environment(torch.device("cpu")), "rows": []}
    for row in chosen:
        info = trained[row.key]
        teacher_min = trained[row.teacher]["train_min"] if row.teacher else 0.0
        measured = measure_row(row, runs[row.key], args)
        record = {"key": row.key, "name": row.name, "preset": row.preset, **info}
        record.update(teacher=row.teacher, teacher_min=teacher_min, own_nfe=row.own_nfe)
        record["measured"] = measured
        result["rows"].append(record)
        print(row.key, json.dumps({m["nfe"]: m[QUALITY[args.data][0]] for m in measured}))
    out = Path(args.out) if args.out else args.work / "few_step.json"
    write_text_atomically(out, json.dumps(result, indent=2) + "\n")
    text = table(result)
    write_text_atomically(out.with_suffix(".md"), text + "\n")
    print(text)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
