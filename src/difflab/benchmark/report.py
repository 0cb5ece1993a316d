"""A benchmark result as a Markdown table, and both files written side by side."""

from __future__ import annotations

import json
from pathlib import Path

from difflab.files import write_text_atomically


def _ms(value: float) -> str:
    """Milliseconds with about three significant digits, never in exponent notation."""
    return f"{value:.0f}" if value >= 100 else f"{value:.2f}" if value >= 1 else f"{value:.3g}"


def _ratio(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"**{value:.{digits}f}**"


def _train_row(r: dict, spec: bool) -> str:
    s = r["step"]
    cells = [
        r["library"],
        f"{r['params']:,}",
        f"{r['images_per_s']:.2f}",
        f"{1e3 * s['mean_s']:.1f} ± {1e3 * s['std_s']:.1f} "
        f"({1e3 * s['min_s']:.1f}–{1e3 * s['max_s']:.1f})",
        f"{r['flops_per_step'] / 1e9:.2f}",
        f"{r['flop_per_s'] / 1e9:.1f}",
        f"{r['fraction_of_measured_peak']:.1%}",
    ]
    if spec:
        cells.append(f"{r['fraction_of_spec_sheet']:.1%}")
    cells += [f"{r['peak_memory_mb']:.0f}", "yes" if r["compiled"] else "no"]
    return "| " + " | ".join(cells) + " |"


def _training(result: dict) -> list[str]:
    t, spec = result["training"], result["peak"]["spec_sheet"]
    head = (
        [
            "library",
            "parameters",
            "images/s",
            "step ms: mean ± sd (min–max)",
            "GFLOP/step",
            "GFLOP/s",
            "of measured matmul peak",
        ]
        + (["of spec sheet"] if spec else [])
        + ["peak memory MB", "compiled"]
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines.append(_train_row(t["difflab"], bool(spec)))
    d = t["diffusers"]
    if d.get("available", True):
        lines.append(_train_row(d, bool(spec)))
        lines.append(
            f"| difflab / diffusers | | {_ratio(t['ratio_images_per_s'])} | "
            f"median paired-step ratio {t['median_step_pair_ratio']:.2f} |" + " |" * (len(head) - 4)
        )
    else:
        lines.append(f"| diffusers | n/a: {d['reason']} |" + " |" * (len(head) - 2))
    return lines


def _sampling(result: dict) -> list[str]:
    lines = [
        "| sampler | NFE budget | difflab NFE | difflab ms/image | diffusers runs | diffusers NFE "
        "| diffusers ms/image | difflab / diffusers |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in result["sampling"]:
        a, b = row["difflab"], row.get("diffusers")
        theirs = (
            f"{b['runs'].removeprefix('diffusers ')} | {b['nfe']} | {_ms(b['ms_per_image'])}"
            if b
            else "n/a | | "
        )
        lines.append(
            f"| {row['sampler']} | {row['nfe_budget']} | {a['nfe']} | {_ms(a['ms_per_image'])} | "
            f"{theirs} | {_ratio(row['ratio_ms_per_image'])} |"
        )
    return lines


def _peak_lines(result: dict) -> list[str]:
    measured, spec = result["peak"]["measured"], result["peak"]["spec_sheet"]
    line = f"- Device peak, {measured['method']}: **{measured['flop_per_s'] / 1e9:,.1f} GFLOP/s**"
    line += (
        f"; {spec['method']}: {spec['flop_per_s'] / 1e12:,.0f} TFLOP/s."
        if spec
        else "; spec sheet: n/a for this device."
    )
    return [line]


def _load(env: dict) -> str:
    """The 1-minute load average at start and end: how busy the machine was."""
    start, end = env.get("loadavg_start"), env.get("loadavg_end")
    return f"; load average {start[0]:.1f} -> {end[0]:.1f}" if start and end else ""


def markdown(result: dict) -> str:
    """The result as Markdown: a header line, the training table, the sampling table, notes;
    a several-precision result: the comparison, then each precision's own section."""
    if "runs" in result:
        from difflab.benchmark.precisions import comparison_markdown

        parts = ["\n".join(comparison_markdown(result)) + "\n"]
        parts += [markdown(run).replace("## ", "### ", 1) for run in result["runs"].values()]
        return "\n".join(parts)
    env, s = result["environment"], result["settings"]
    libs = f"torch {env['torch']}"
    libs += f", diffusers {env['diffusers']}" if "diffusers" in env else ""
    precision = s["precision"]["used"]
    if s["precision"]["requested"] != precision:
        precision += f" (asked {s['precision']['requested']})"
    t = result["training"]["difflab"]
    lines = [
        f"## difflab bench {result['config']} — {env['device']}, {precision}",
        "",
        f"{env['device_name']}, {env['threads']} thread{'s' * (env['threads'] != 1)}; {libs}; "
        f"{result['date']}. "
        f"Batch {s['batch_size']}, {s['steps']} timed steps after {s['warmup']} warm-up steps "
        f"per library, alternating (ABBA); channels_last {'on' if s['channels_last'] else 'off'}"
        f"{_load(env)}.",
        "",
        "### Training (forward + loss + backward + AdamW step + zero_grad)",
        "",
        *_training(result),
        "",
        *_peak_lines(result),
        "- FLOPs: torch.utils.flop_counter.FlopCounterMode over one forward + backward (matmuls,"
        " convolutions, attention); GFLOP/s = FLOPs per step / mean step time.",
        f"- Peak memory: {t['peak_memory_method']}, from before the network was built to the end"
        " of warm-up (weights, gradients, AdamW state, activations).",
        "- Ratio > 1: difflab trains faster.",
        "",
        f"### Sampling (batch {s['sample_batch']}, torch.inference_mode, {s['sample_rounds']} "
        f"timed call(s) each; difflab on its {s['sampling_spacing']} grid)",
        "",
        *_sampling(result),
        "",
        "- Ratio < 1: difflab samples faster (fewer ms per image).",
    ]
    lines += [f"- Note: {note}" for note in result["notes"]]
    return "\n".join(lines) + "\n"


def write_results(result: dict, out_dir: str | Path) -> tuple[Path, Path]:
    """Write bench-NAME-<device>.json and .md into out_dir; return both paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"bench-{result['config']}-{result['environment']['device']}"
    json_path, md_path = out / f"{stem}.json", out / f"{stem}.md"
    write_text_atomically(json_path, json.dumps(result, indent=2) + "\n")
    write_text_atomically(md_path, markdown(result))
    return json_path, md_path
