"""Image evaluation of a run, a folder of images or a samples .npz, with provenance.

`difflab eval` and the training loop's periodic metric both come here. The metrics are in
`protocol`, the references and the reference-feature cache in `references`; this module adds what
needs a run: drawing the samples (timed, with peak memory), finding the feature extractors (the
pinned Inception-v3, or the judge trained for the data set) and the training-time evaluator.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from difflab import devices
from difflab.config import ConfigError, RunConfig, SampleConfig, guidance_record, use_ema_of
from difflab.evaluation import protocol, references
from difflab.evaluation.classifier import JudgeExtractor
from difflab.evaluation.protocol import HIGHER_IS_BETTER, METRICS, label
from difflab.evaluation.references import EvalError
from difflab.evaluation.sharded import Sharded, blocks, sample_shared
from difflab.evaluation.toy2d import evaluate_toy
from difflab.model import Model
from difflab.runs import LoadedRun, attach_guide
from difflab.samplers import SAMPLERS, cost_is_fixed, nfe_of
from difflab.training.distributed import World

__all__ = ["TrainingEvaluator", "default_judge_path", "evaluate_images_of", "extractors_for"]
__all__ += ["format_rows", "sampling_provenance", "timed_samples"]

TOY_METRICS = ("sliced_w2",)
JUDGE_DATASETS = ("mnist", "fashion", "cifar10")  # with train and test splits at 32x32


def default_judge_path(dataset: str) -> Path:
    """Where `difflab eval train-classifier --dataset NAME` saves its judge."""
    return references.cache_dir() / "judges" / f"{dataset}.safetensors"


def extractors_for(
    metrics: list[str],
    *,
    dataset: str | None,
    judge: str | Path | None = None,
    inception_weights: str | Path | None = None,
    inception_sha256: str | None = None,
    device: str | torch.device = "cpu",
) -> dict:
    """The feature extractors `metrics` need: "inception" and/or "judge"."""
    kinds = {METRICS[m].extractor for m in metrics if m in METRICS}
    out = {}
    if "judge" in kinds:
        path = Path(judge) if judge else default_judge_path(dataset or "?")
        if not path.is_file():
            if dataset not in JUDGE_DATASETS:
                raise EvalError(
                    f"judge metrics need a classifier trained on the data set, and {dataset!r} "
                    f"has none (`difflab eval train-classifier` knows {', '.join(JUDGE_DATASETS)}"
                    "); pass --judge FILE or use Inception metrics: --metric fid,kid,pr"
                )
            raise EvalError(
                f"no judge classifier at {path}; train one with `difflab eval train-classifier "
                f"--dataset {dataset} --root DATA` (a minute or two on a CPU) or pass --judge FILE"
            )
        out["judge"] = JudgeExtractor(path, device)
    if "inception" in kinds:
        from difflab.evaluation.inception import INCEPTION_SHA256, InceptionExtractor

        sha = inception_sha256 or INCEPTION_SHA256
        out["inception"] = InceptionExtractor(inception_weights, sha256=sha, device=device)
    return out


def _peak_memory_start(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


@contextmanager
def counted_rows(model: Model) -> Iterator[list[int]]:
    """[rows]: how many inputs the model's networks (the run's, and autoguidance's weak one)
    evaluated meanwhile, counted at each real call: a doubled guidance batch of B counts 2 B."""
    rows = [0]

    def count(module, args, kwargs):
        x_t = args[0] if args else kwargs["x_t"]
        rows[0] += x_t.shape[0]

    nets = [model.net] + ([model.guide.net] if model.guide is not None else [])
    handles = [net.register_forward_pre_hook(count, with_kwargs=True) for net in nets]
    try:
        yield rows
    finally:
        for handle in handles:
            handle.remove()


def timed_samples(
    run: LoadedRun,
    scfg: SampleConfig,
    labels: torch.Tensor | None,
    progress: bool = False,
    world: World | None = None,
) -> tuple[torch.Tensor, dict]:
    """Samples of a run and what they cost: ms per sample, network calls per sample (every
    network input counted as it is evaluated: guidance's doubled batch and autoguidance's weak
    net included, so it is the sampler's NFE times what the guidance method costs per
    evaluation) and peak memory (CUDA: the most allocated during sampling; CPU: the process's
    peak resident memory so far); `world`: the processes that share the draw (each its block;
    every rank gets all samples)."""
    world = world or World()
    attach_guide(run, scfg)  # before counting: the weak net is counted too
    _peak_memory_start(run.device)
    start = time.perf_counter()
    with counted_rows(run.model) as rows:
        samples = sample_shared(run, scfg, world, labels, progress)
    seconds = time.perf_counter() - start
    drawn_here = len(samples)
    if world.size > 1:  # the rows were counted on this rank's block alone
        a, b = blocks(scfg.n, world.size, scfg.batch_size)[world.rank]
        drawn_here = b - a
    timing = {
        "ms_per_sample": 1000 * seconds / len(samples),
        "net_calls": rows[0] / max(drawn_here, 1),
        "peak_memory_mb": devices.peak_memory_mb(run.device),
        "memory_kind": "cuda max allocated" if run.device.type == "cuda" else "process peak RSS",
        "device": str(run.device),
        "processes": world.size,  # ms_per_sample is of the whole draw, over all of them
    }
    return samples, timing


def sampling_provenance(run: LoadedRun, scfg: SampleConfig, conditional: bool) -> dict:
    """How samples were drawn, for every result row (autoguidance guides unconditional runs
    too)."""
    guided = conditional or scfg.guidance_method == "auto"
    row = {
        "source": str(run.run_dir),
        "checkpoint": str(run.checkpoint),
        "step": run.step,
        "sampler": scfg.sampler,
        "steps": scfg.steps,
        "nfe": nfe_of(scfg.sampler, scfg.steps, scfg),
        "spacing": scfg.spacing,
        "guidance": scfg.guidance if guided else None,
        "ema": run.ema,
        "seed": scfg.seed,
    }
    if guided and (scfg.guidance_tmin > 0 or scfg.guidance_tmax > 0):
        row["guidance_interval"] = [scfg.guidance_tmin, scfg.guidance_tmax]
    if guided:
        row.update(guidance_record(scfg))
    if run.model.kind.folded_guidance is not None:  # guided by training, at one call a step
        row["folded_guidance"] = run.model.kind.folded_guidance.info()
    if scfg.guidance_method == "auto" and run.guide_with:  # the run's companion, when implicit
        row["guide_with"] = run.guide_with
    return row


def evaluate_images_of(
    run: LoadedRun,
    scfg: SampleConfig,
    metrics: list[str],
    reference: references.Reference,
    extractors: dict,
    progress: bool = False,
    cache: bool = True,
    world: World | None = None,
) -> list[dict]:
    """Draw scfg.n samples of an image run (class-balanced when conditional) and
    measure them; `cache`: read and write cached reference features; `world`: the processes
    sharing the draw and the feature extraction (see sharded.py)."""
    conditional, world = run.model.kind.conditional, world or World()
    dims = {kind: e.feature_dim for kind, e in extractors.items()}
    protocol.check_metrics(metrics, scfg.n, dims, conditional)  # before any sampling
    labels = run.model.conditioner.balanced(scfg.n)  # every class equally often
    classes = judged_classes(run.model, scfg.n, labels)
    samples, timing = timed_samples(run, scfg, labels, progress, world)
    if world.size > 1:
        extractors = {kind: Sharded(e, world) for kind, e in extractors.items()}
    provenance = {**sampling_provenance(run, scfg, conditional), **timing}
    if conditional:
        provenance["labels"] = "balanced"
    return protocol.evaluate_images(
        samples, classes, metrics, reference, extractors, provenance, cache=cache
    )


def judged_classes(model: Model, n: int, conditions):
    """The classes of `balanced(n)`'s conditions: the labels themselves, or for a text model
    the classes its default prompts name (None without classes)."""
    return model.conditioner.balanced_classes(n) if model.kind.text else conditions


def _drawn_with(r: dict) -> str:
    """How a row's samples were drawn, in words (what its provenance says)."""
    if not r.get("sampler"):
        return "-"
    parts = [f"{r['sampler']} {r['steps']} steps" + (f" (NFE {r['nfe']})" if "nfe" in r else "")]
    if r.get("guidance") is not None:
        parts.append(f"guidance {r['guidance']}")
    if "ema" in r:
        parts.append("EMA" if r["ema"] else "raw weights")
    if "seed" in r:
        parts.append(f"seed {r['seed']}")
    if "ms_per_sample" in r:
        parts.append(f"{r['ms_per_sample']:.1f} ms/sample")
    return ", ".join(parts)


def format_rows(rows: list[dict]) -> str:
    """One line per metric value: label, value (+- std), extractor, reference, sampler."""
    lines = [f"{'metric':20s} {'value':>20s}  {'extractor':16s} {'reference':14s} drawn with"]
    for r in rows:
        value = f"{r['value']:.4f}" + (f" +- {r['std']:.4f}" if "std" in r else "")
        drawn = _drawn_with(r)
        lines.append(
            f"{r['label']:20s} {value:>20s}  {r['extractor']:16s} {r['reference'] or '-':14s} "
            f"{drawn}"
        )
    if rows and rows[0]["n_generated"] < protocol.FULL_N:
        n = rows[0]["n_generated"]
        full = f"{protocol.FULL_N:,}"
        lines.append(f"({n:,} samples: not comparable with published {full}-sample scores)")
    return "\n".join(lines)


class TrainingEvaluator:
    """The metric `train.eval_metric` every `train.eval_every` steps, from the weights
    sample.use_ema names (EMA by default) and fixed noise, so successive values differ only
    through the model.

    Built at the start of training so that a missing judge or reference stops the run before the
    first step, not hours later.
    """

    def __init__(self, cfg: RunConfig, model: Model):
        self.cfg, device, shape = cfg, model.device, model.kind.shape
        toy = not model.kind.is_image
        self.metric = cfg.train.eval_metric or ("sliced_w2" if toy else "fd_judge")
        self.n = cfg.train.eval_n
        self.higher_is_better = self.metric in HIGHER_IS_BETTER  # which checkpoint is best
        allowed = TOY_METRICS if toy else tuple(m for m in METRICS if m != "accuracy")
        if self.metric not in allowed:
            raise ConfigError(
                f"train.eval_metric={self.metric!r} does not apply to {cfg.data.name}; choose "
                f"one of {', '.join(allowed)}"
            )
        self.extractors, self.reference = {}, None
        if toy:
            return
        d = cfg.data
        try:
            self.extractors = extractors_for([self.metric], dataset=d.name, device=device)
            spec = cfg.train.eval_reference or f"{d.name}:test"
            if ":" not in spec and spec == d.name:
                spec = f"{d.name}:test"
            self.reference = references.open_reference(spec, tuple(shape), root=d.root)
            dims = {k: e.feature_dim for k, e in self.extractors.items()}
            protocol.check_metrics([self.metric], self.n, dims, model.kind.conditional)
        except (EvalError, FileNotFoundError) as e:
            raise ConfigError(f"train.eval_every needs its metric: {e}") from None

    @torch.no_grad()
    def __call__(self, model: Model) -> dict:
        """{"metric", "label", <metric>: value, "n", sampler settings, "seconds"} of `model`
        (the weights `config.use_ema_of` names), from the run's sampler, fixed noise and
        class-balanced conditions."""
        start = time.perf_counter()
        scfg = dataclasses.replace(self.cfg.sample, n=self.n, compile=False)
        labels = model.conditioner.balanced(self.n)
        x = model.sample(scfg, cond=labels)
        if self.reference is None:
            value = evaluate_toy(x.numpy(), self.cfg.data.name)[self.metric]
        else:
            classes = judged_classes(model, self.n, labels)
            rows = protocol.evaluate_images(
                x, classes, [self.metric], self.reference, self.extractors, {}
            )
            value = rows[0]["value"]
        row = {
            "metric": self.metric,
            "label": label(self.metric, self.n),
            self.metric: value,
            "n": self.n,
            "sampler": scfg.sampler,
            "steps": scfg.steps,
            "nfe": nfe_of(scfg.sampler, scfg.steps, scfg),
            "spacing": scfg.spacing,
            "ema": use_ema_of(self.cfg.sample),  # the weights the training loop gives (loop.py)
            "seed": scfg.seed,
            "seconds": time.perf_counter() - start,
        }
        if model.conditioner.conditional or scfg.guidance_method == "auto":
            row["guidance"] = scfg.guidance
            row.update(guidance_record(scfg))
        return row


def samples_from_file(source: Path, image_shape: tuple[int, int, int]) -> tuple:
    """(images (N, C, H, W) in [-1, 1], labels (N,) or None, how they were drawn) from a samples
    .npz (as `difflab sample` writes, with its metadata) or a folder of images of `image_shape`."""
    if source.suffix == ".npz":
        with np.load(source, allow_pickle=False) as f:
            images = torch.from_numpy(f["samples"]).float()
            labels = torch.from_numpy(f["labels"]).long() if "labels" in f.files else None
            meta = {k: f[k].item() for k in SAMPLE_META if k in f.files and f[k].ndim == 0}
        if labels is not None and labels.shape != (len(images),):
            raise ConfigError(
                f"{source}: 'labels' has shape {tuple(labels.shape)} for {len(images)} samples; "
                "it needs one class per sample (N,): rewrite the file or drop its 'labels'"
            )
        known = "sampler" in meta and "steps" in meta and meta["sampler"] in SAMPLERS
        if "nfe" not in meta and known and cost_is_fixed(meta["sampler"]):
            # a file from before `nfe` was written: only a fixed cost follows from the steps
            meta["nfe"] = nfe_of(meta["sampler"], int(meta["steps"]))
        return images, labels, meta
    from difflab.data.folders import image_folder

    c, h, _ = image_shape
    folder = image_folder(source, h, c)
    return references.dataset_images(folder, torch.arange(len(folder))), None, {}


SAMPLE_META = (
    "sampler",
    "steps",
    "nfe",
    "seed",
    "ema",
    "guidance",
    "checkpoint",
    "step",
    "guidance_method",
    "apg_eta",
    "apg_momentum",
    "apg_threshold",
    "guide_with",
    "folded_guidance",
)
