"""`difflab export`, `difflab import` and `difflab report`."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from difflab.files import check_writable


def cmd_export(args: argparse.Namespace) -> int:
    check_writable(Path(args.out).parent, f"--out {args.out}")
    start = time.perf_counter()
    if args.format == "diffusers":
        from difflab.share.diffusers_io import export_diffusers

        out = export_diffusers(
            args.run, args.out, raw=args.raw, force=args.force, checkpoint=args.checkpoint
        )
    else:
        from difflab.share.half import export_ema

        out = export_ema(
            args.run, args.out, args.dtype, force=args.force, checkpoint=args.checkpoint
        )
    size = sum(p.stat().st_size for p in ([out] if out.is_file() else out.rglob("*")))
    print(
        f"difflab: exported {args.run} ({args.format}) in {time.perf_counter() - start:.1f} s "
        f"-> {out} ({size / 1e6:.2f} MB)"
    )
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from difflab.share.diffusers_io import import_diffusers

    start = time.perf_counter()
    run_dir = import_diffusers(args.folder, args.name, args.runs)
    print(f"difflab: imported {args.folder} in {time.perf_counter() - start:.1f} s -> {run_dir}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from difflab.report.html import write_report
    from difflab.runs import check_run_dir

    page = write_report(check_run_dir(args.run))
    print(page)
    if args.open:
        import webbrowser

        webbrowser.open(Path(page).resolve().as_uri())
    return 0
