"""Benchmark: editing a trained `mnist` run (issue 42), inpainting and SDEdit translation.

On ONE trained run (--run), with its own sampler, steps and guidance, judged by difflab's MNIST
judge (bench/mnist.py's: trained into --out when absent, or --judge FILE):

- reference: the run's own unmasked class-balanced samples (n of them, n / 10 per digit): judge
  accuracy and judge Frechet distance to the test split (all 10,000 images). The FD floor of an
  unedited sample set at this n.
- replacement, repaint: n test digits (the first n of a seeded permutation of the test split)
  with their lower half unknown (rows 16..31 of the 32x32 image; 1 = keep on the upper half),
  each completed with its own class given; by replacement alone and by RePaint's resampling
  (--resample R --jump J). Judge accuracy on the given classes (target >= 0.97), the count of
  known pixels that differ from the input in any bit (target 0), and the judge FD of the completed
  digits to the test split (target: no worse than the reference's FD).
- sdedit, fresh: n test digits, each with a target class other than its own (a seeded
  derangement of the classes: target = (label + k) mod 10, k uniform in 1..9), edited at
  --strength 0.6 toward the target; and a fresh sample of the target class from the same seed
  (strength 1 of the same edit is that sample bit for bit, tests/test_editing.py). The fraction
  judged the target (target >= 0.90) and the fraction of outputs closer (L2) to their input than
  the fresh sample of the same index is (target: all of them).

Every stage writes <stage>.json (and its samples as <stage>.npz) under --out and is skipped when
its JSON is there, so an interrupted benchmark resumes; --only STAGE runs that stage alone.
summary.json (pass/fail per target) and a Markdown table come last, from the stages present.

    python bench/editing.py --run pretrained:mnist --root ../shared/data --out bench/results/editing
        [--n 1000] [--resample 4 --jump 5] [--strength 0.6] [--sampler S] [--steps N]
        [--guidance G] [--only STAGE]
        [--judge FILE]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from difflab.data.images import load_image_dataset
from difflab.evaluation.classifier import judge_features, judge_predict
from difflab.evaluation.frechet import feature_statistics, frechet_distance
from difflab.files import write_text_atomically
from difflab.runs import draw_samples, load_run, sample_labels, save_samples
from difflab.samplers import Edit

sys.path.insert(0, str(Path(__file__).parent))
from mnist import images_of, judge_for, to_judge_size

STAGES = ("judge", "reference", "replacement", "repaint", "sdedit", "fresh")
TARGETS = {  # (stage, figure): (comparison, bound); "reference" = the reference stage's FD
    ("replacement", "accuracy"): (">=", 0.97),
    ("replacement", "known_pixels_changed"): ("==", 0),
    ("replacement", "fd_to_test"): ("<=", "reference"),
    ("repaint", "accuracy"): (">=", 0.97),
    ("repaint", "known_pixels_changed"): ("==", 0),
    ("repaint", "fd_to_test"): ("<=", "reference"),
    ("sdedit", "target_accuracy"): (">=", 0.90),
    ("sdedit", "closer_than_fresh"): (">=", 1.0),
}


def test_digits(root: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 1, 32, 32) test digits in [-1, 1] and their labels (n,): the first n of a permutation
    of the test split seeded 42 (bench/mnist.py's images_of draws seed 0 for the FD side)."""
    dataset, _ = load_image_dataset("mnist", root, "test")
    idx = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(42))[:n]
    pairs = [dataset[int(i)] for i in idx]
    return torch.stack([x for x, _ in pairs]), torch.tensor([int(y) for _, y in pairs])


def derangement(labels: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A target class other than each label: (label + k) mod 10, k uniform in 1..9 (seeded)."""
    k = torch.randint(1, 10, labels.shape, generator=torch.Generator().manual_seed(seed))
    return (labels + k) % 10


def lower_half_unknown(shape: tuple[int, ...]) -> torch.Tensor:
    """(1, 1, H, W) mask, 1 = keep: the upper half of the image."""
    mask = torch.zeros(1, 1, *shape[1:], dtype=torch.bool)
    mask[..., : shape[1] // 2, :] = True
    return mask


class Bench:
    """The run, the judge and the test statistics, loaded once; one method per stage."""

    def __init__(self, args):
        self.args, self.out = args, Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self._run = self._judge = self._test_stats = None

    @property
    def run(self):
        if self._run is None:
            self._run = load_run(self.args.run)
        return self._run

    @property
    def judge_file(self) -> Path:
        return Path(self.args.judge) if self.args.judge else self.out / "judge-mnist.safetensors"

    @property
    def judge(self):
        if self._judge is None:  # trained into judge_file when absent (bench/mnist.py)
            self._judge = judge_for(self.args.root, self.judge_file)
        return self._judge

    def scfg(self, n: int):
        """The run's own sampling settings (sampler, steps, guidance, seed) for n samples;
        --sampler, --steps and --guidance replace them in every stage."""
        changes = {k: getattr(self.args, k) for k in ("sampler", "steps", "guidance")}
        changes = {k: v for k, v in changes.items() if v is not None}
        scfg = dataclasses.replace(self.run.cfg.sample, n=n, **changes)
        self.run.model.check_sample(scfg)
        return scfg

    def judged(self, samples: torch.Tensor, labels: torch.Tensor) -> dict:
        """Judge accuracy on `labels` and judge FD to the test split (all 10,000 images)."""
        if self._test_stats is None:
            self._test_stats = feature_statistics(
                judge_features(self.judge, images_of(self.args.root, "test"))
            )
        images = to_judge_size(samples)
        accuracy = float((judge_predict(self.judge, images) == labels).float().mean())
        features = judge_features(self.judge, images)
        if len(features) <= features.shape[1]:  # a --n this small estimates no covariance
            return {"accuracy": accuracy, "fd_to_test": None}
        fd = frechet_distance(*feature_statistics(features), *self._test_stats)
        return {"accuracy": accuracy, "fd_to_test": fd}

    def draw(self, name: str, labels: torch.Tensor, edit: Edit | None = None) -> tuple:
        """(samples, seconds) of n = len(labels) samples, saved as <name>.npz."""
        start = time.perf_counter()
        samples = draw_samples(self.run, self.scfg(len(labels)), labels=labels, edit=edit)
        seconds = time.perf_counter() - start
        save_samples(self.out / f"{name}.npz", samples, labels)
        return samples, seconds

    def setting(self) -> dict:
        s = self.scfg(self.args.n)
        keys = ("sampler", "steps", "spacing", "guidance", "n")
        return {k: getattr(s, k) for k in keys}

    # ---- stages ---------------------------------------------------------------------------

    def stage_judge(self) -> dict:
        _ = self.judge
        return {"judge": str(self.judge_file), "run": str(self.args.run), "step": self.run.step}

    def stage_reference(self) -> dict:
        labels = sample_labels(self.run, self.args.n, per_class=True)
        samples, seconds = self.draw("reference", labels)
        return {**self.setting(), **self.judged(samples, labels), "seconds": seconds}

    def inpaint(self, name: str, resample: int, jump: int) -> dict:
        init, labels = test_digits(self.args.root, self.args.n)
        mask = lower_half_unknown(tuple(init.shape[1:]))
        edit = Edit(init, mask=mask, resample=resample, jump=jump)
        samples, seconds = self.draw(name, labels, edit)
        known = mask.expand_as(init)
        changed = int((samples[known].view(torch.int32) != init[known].view(torch.int32)).sum())
        return {
            **self.setting(),
            "resample": resample,
            "jump": jump,
            **self.judged(samples, labels),
            "known_pixels_changed": changed,
            "known_pixels": int(known.sum()),
            "seconds": seconds,
        }

    def stage_replacement(self) -> dict:
        return self.inpaint("replacement", 1, 1)

    def stage_repaint(self) -> dict:
        return self.inpaint("repaint", self.args.resample, self.args.jump)

    def stage_sdedit(self) -> dict:
        init, labels = test_digits(self.args.root, self.args.n)
        targets = derangement(labels)
        samples, seconds = self.draw("sdedit", targets, Edit(init, strength=self.args.strength))
        judged = self.judged(samples, targets)
        return {
            **self.setting(),
            "strength": self.args.strength,
            "target_accuracy": judged["accuracy"],
            "fd_to_test": judged["fd_to_test"],
            "seconds": seconds,
        }

    def stage_fresh(self) -> dict:
        _, labels = test_digits(self.args.root, self.args.n)
        targets = derangement(labels)
        samples, seconds = self.draw("fresh", targets)
        return {**self.setting(), **self.judged(samples, targets), "seconds": seconds}

    # ---- what the stages add up to --------------------------------------------------------

    def closeness(self) -> dict | None:
        """How close (L2) the SDEdit outputs stay to their inputs: the fraction closer than the
        fresh sample of the same index (target class, seed) is, and both mean distances."""
        paths = [self.out / f"{name}.npz" for name in ("sdedit", "fresh")]
        if not all(p.exists() for p in paths):
            return None
        import numpy as np

        init, _ = test_digits(self.args.root, self.args.n)
        edited, fresh = (torch.from_numpy(np.load(p)["samples"]) for p in paths)
        if len(edited) != len(init) or len(fresh) != len(init):
            return None

        def dist(x):
            return (x - init).flatten(1).norm(dim=1)

        return {
            "closer_than_fresh": float((dist(edited) < dist(fresh)).float().mean()),
            "l2_to_input": float(dist(edited).mean()),
            "fresh_l2_to_input": float(dist(fresh).mean()),
        }


def run_stages(bench: Bench, only: str | None) -> dict:
    results = {}
    for stage in STAGES:
        path = bench.out / f"{stage}.json"
        if path.exists():
            results[stage] = json.loads(path.read_text())
            asked = {"n": bench.args.n, "resample": bench.args.resample, "jump": bench.args.jump}
            asked["strength"] = bench.args.strength
            for key in ("sampler", "steps", "guidance"):
                if getattr(bench.args, key) is not None:
                    asked[key] = getattr(bench.args, key)
            if stage == "replacement":  # replacement is RePaint's R = J = 1 whatever is asked
                del asked["resample"], asked["jump"]
            kept = {k: v for k, v in results[stage].items() if k in asked and asked[k] != v}
            if kept:
                print(f"editing bench: kept {path} (made with {kept}; delete it to redo)")
            continue
        if only is not None and stage != only:
            continue
        print(f"editing bench: stage {stage} ...", flush=True)
        results[stage] = getattr(bench, f"stage_{stage}")()
        write_text_atomically(path, json.dumps(results[stage], indent=2) + "\n")
    if "sdedit" in results:
        closeness = bench.closeness()
        if closeness is not None:
            results["sdedit"].update(closeness)
    return results


def verdicts(results: dict) -> dict:
    """{"stage.figure": {"value", "target", "pass"}} for every target whose stage ran."""
    out = {}
    for (stage, figure), (op, bound) in TARGETS.items():
        value = results.get(stage, {}).get(figure)
        if bound == "reference":
            bound = results.get("reference", {}).get("fd_to_test")
        if value is None or bound is None:
            shown = "the reference's FD" if bound is None else bound
            out[f"{stage}.{figure}"] = {"value": value, "target": f"{op} {shown}", "pass": None}
            continue
        ok = {">=": value >= bound, "<=": value <= bound, "==": value == bound}[op]
        out[f"{stage}.{figure}"] = {"value": value, "target": f"{op} {bound:.4g}", "pass": ok}
    return out


def table(results: dict, checks: dict) -> str:
    rows = ["| stage | figure | value | target | pass |", "|---|---|---|---|---|"]
    for key, c in checks.items():
        stage, figure = key.split(".")
        value = "not run" if stage not in results else "n too small"
        value = value if c["value"] is None else f"{c['value']:.4g}"
        mark = {True: "yes", False: "NO", None: "-"}[c["pass"]]
        rows.append(f"| {stage} | {figure} | {value} | {c['target']} | {mark} |")
    for stage in ("reference", "fresh"):
        if stage in results:
            r = results[stage]
            rows.append(f"| {stage} | accuracy | {r['accuracy']:.4g} | (information) | - |")
            fd = "n too small" if r["fd_to_test"] is None else f"{r['fd_to_test']:.4g}"
            rows.append(f"| {stage} | fd_to_test | {fd} | (information) | - |")
    sdedit = results.get("sdedit", {})
    for figure in ("l2_to_input", "fresh_l2_to_input"):
        if figure in sdedit:
            rows.append(f"| sdedit | {figure} (mean) | {sdedit[figure]:.4g} | (information) | - |")
    secs = ", ".join(
        f"{s} {results[s]['seconds']:.0f} s" for s in STAGES if "seconds" in results.get(s, {})
    )
    return "\n".join(rows) + (f"\n\nSampling time: {secs}." if secs else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="a trained mnist run directory")
    ap.add_argument("--root", default="../shared/data", help="folder holding MNIST/raw/")
    ap.add_argument("--out", default="bench/results/editing", help="stage JSONs and samples")
    ap.add_argument("--n", type=int, default=1000, help="digits per benchmark (a multiple of 10)")
    ap.add_argument("--resample", type=int, default=4, help="RePaint's R")
    ap.add_argument("--jump", type=int, default=5, help="RePaint's J, in grid steps")
    ap.add_argument("--strength", type=float, default=0.6, help="SDEdit's strength")
    ap.add_argument("--sampler", help="sampler of every stage (default: the run's own)")
    ap.add_argument("--steps", type=int, help="sampling steps (default: the run's own)")
    ap.add_argument("--guidance", type=float, help="guidance scale (default: the run's own)")
    ap.add_argument("--only", choices=STAGES, help="run this stage alone (others kept)")
    ap.add_argument("--judge", help="the MNIST judge file (default: trained into --out)")
    args = ap.parse_args()
    if args.n < 10 or args.n % 10:
        ap.error(f"--n must be a positive multiple of 10 (class-balanced), got {args.n}")
    bench = Bench(args)
    results = run_stages(bench, args.only)
    checks = verdicts(results)
    summary = {
        "benchmark": "editing",
        "run": str(args.run),
        "results": results,
        "targets": checks,
        "all_pass": all(c["pass"] for c in checks.values()),
    }
    write_text_atomically(bench.out / "summary.json", json.dumps(summary, indent=2) + "\n")
    print(table(results, checks))
    print(f"wrote {bench.out / 'summary.json'}")


if __name__ == "__main__":
    main()
