"""A text model of captioned MNIST / Fashion-MNIST, judged: samples from prompts that name a
class, the judge's accuracy against that class, seen and held-out templates reported apart,
and the judge-feature Frechet distance of the same samples to real images.

Held-out templates were never trained on (data/captions.py), so their accuracy measures
whether the model understood the sentence rather than memorised it.
"""

from __future__ import annotations

import dataclasses
import time

import torch
from torch import Tensor

from difflab.config import ConfigError, SampleConfig
from difflab.data.captions import prompts_for, templates
from difflab.evaluation.classifier import judge_features, judge_predict
from difflab.evaluation.frechet import feature_statistics, frechet_distance
from difflab.runs import LoadedRun, draw_samples


def prompt_set(dataset: str, which: str, per_class: int, num_classes: int = 10):
    """(prompts, classes (N,)): per_class prompts of every class, class k's block cycling
    through the `which` ("seen" / "held_out") templates."""
    found = templates(dataset, which)
    classes = torch.arange(num_classes).repeat_interleave(per_class)  # (N,)
    prompts = [
        prompts_for(dataset, [int(k)], which, template=i % per_class % len(found))[0]
        for i, k in enumerate(classes.tolist())
    ]
    return prompts, classes


def judged_prompts(
    run: LoadedRun,
    scfg: SampleConfig,
    judge,
    which: str,
    per_class: int,
    real_stats: tuple[Tensor, Tensor] | None = None,
    progress: bool = False,
) -> dict:
    """Samples of a text run from `which` templates, per_class of each class, judged.

    Returns:
        {"templates", "n", "accuracy", "fd_judge" (when real_stats: (mu, sigma) of real judge
        features), "sampler", "steps", "guidance", "sample_s"} and the samples under "images".
    """
    c = run.model.conditioner
    if not getattr(c, "dataset", ""):
        raise ConfigError(
            f"{run.run_dir} is not a text model of captioned mnist or fashion; prompts naming "
            "classes need one (e.g. --preset mnist-text)"
        )
    prompts, classes = prompt_set(c.dataset, which, per_class, len(c.class_names))
    scfg = dataclasses.replace(scfg, n=len(prompts))
    start = time.perf_counter()
    images = draw_samples(run, scfg, labels=c.prompts(prompts), progress=progress)
    seconds = time.perf_counter() - start
    row = {
        "templates": which,
        "n": len(prompts),
        "accuracy": float((judge_predict(judge, images) == classes).float().mean()),
        "sampler": scfg.sampler,
        "steps": scfg.steps,
        "guidance": scfg.guidance,
        "sample_s": seconds,
    }
    features = judge_features(judge, images)
    if real_stats is not None and len(images) > features.shape[1]:  # a covariance needs n > dim
        row["fd_judge"] = frechet_distance(*feature_statistics(features), *real_stats)
    return {**row, "images": images, "classes": classes}
