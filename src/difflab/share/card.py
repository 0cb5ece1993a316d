"""The README.md model card of an export: what the model is, how it was trained and sampled,
and the run's recorded metrics with their provenance."""

from __future__ import annotations

from difflab.evaluation.history import metric_rows
from difflab.runs import LoadedRun

COLUMNS = (
    "label",
    "value",
    "n_generated",
    "reference",
    "sampler",
    "steps",
    "nfe",
    "guidance",
    "ema",
    "step",
    "file",
)


def _cell(v) -> str:
    if v is None:
        return "-"
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def metric_table(run_dir) -> str:
    """The run's metric rows as a Markdown table (or a line saying there are none)."""
    rows = metric_rows(run_dir)
    if not rows:
        return "No evaluation was recorded for this run (`difflab eval RUN` records one).\n"
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    for r in rows:
        lines.append("| " + " | ".join(_cell(r.get(c)) for c in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def model_card(run: LoadedRun, weights: str, conditional: bool) -> str:
    """README.md for a diffusers export of `run` (`weights`: "EMA" or "raw")."""
    cfg, s, d = run.cfg, run.cfg.sample, run.cfg.diffusion
    data = cfg.data.name + (f" ({cfg.data.root})" if cfg.data.name == "imagefolder" else "")
    names = f"; classes: {', '.join(run.class_names)}" if conditional else ""
    size, t = "x".join(map(str, run.shape)), cfg.train
    dit = cfg.model.name == "dit"
    net, sub, what = (
        ("DiTTransformer2DModel", "transformer", "DiT (a transformer on patches)")
        if dit
        else ("UNet2DModel", "unet", "DDPM U-Net")
    )
    usage = (
        "pipe = DDPMPipeline.from_pretrained(folder)  # or DDIMPipeline\n"
        "images = pipe(batch_size=4).images"
        if not conditional and not dit
        else f"{sub} = {net}.from_pretrained(folder, subfolder='{sub}')\n"
        "scheduler = DDIMScheduler.from_pretrained(folder, subfolder='scheduler')\n"
        + (
            f"# class_labels: 0..{run.num_classes - 1} (or {run.num_classes}, the null label); "
            if conditional
            else "# class_labels: always 0 (an unconditional DiT's label row is zero); "
        )
        + "loop over\n# scheduler.timesteps and call "
        + f"{sub}(x, t, class_labels=y)"
    )
    return f"""---
library_name: diffusers
tags: [difflab, diffusion, unconditional-image-generation]
---
# {run.run_dir.name} (difflab export)

A {"class-conditional " if conditional else ""}{what} trained with difflab and exported
as a diffusers `{net}` with a `DDPMScheduler` config ({weights} weights).

| | |
| --- | --- |
| data set | {data}, images {size}{names} |
| training steps | {run.step} of {t.steps} (batch {t.batch_size}, lr {t.lr}) |
| schedule | {d.schedule}, T = {d.num_steps} (betas in scheduler_config.json) |
| prediction | {d.prediction} |
| x0 clipping | {d.clip_x0 or "off"} |
| difflab sampler default | {s.sampler}, {s.steps} steps, {s.spacing}, guidance {s.guidance} |
| checkpoint | {run.checkpoint} |

difflab embeds step i (1..T) as t = i / T; diffusers calls the same network with timestep
i - 1; the export folds that one-step shift into the first time-embedding Linear, so
diffusers' schedulers see the network difflab sampled with.

```python
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, {net}
{usage}
```

## Metrics recorded by the run

{metric_table(run.run_dir)}"""
