"""difflab train | sample | eval | plot | report | export | import | bench | reflow | ema |
pretrained.

Every user error (a ConfigError) ends in one line `difflab: error: <problem and fix>` and exit
code 2; any other exception is a bug in difflab and keeps its traceback.
"""

from __future__ import annotations

import os
import sys
import warnings

from difflab.cli.ema import cmd_ema
from difflab.cli.evaluate import cmd_eval, cmd_train_classifier
from difflab.cli.parsers import classifier_parser, parser
from difflab.cli.pretrained import cmd_pretrained
from difflab.cli.reflow import cmd_reflow
from difflab.cli.sample import cmd_bench, cmd_plot, cmd_sample
from difflab.cli.sample_flags import sample_changes, sample_config
from difflab.cli.share import cmd_export, cmd_import, cmd_report
from difflab.cli.train import cmd_train
from difflab.config import ConfigError
from difflab.devices import keep_freed_memory
from difflab.samplers import NonFiniteError

__all__ = ["classifier_parser", "main", "parser", "sample_changes", "sample_config"]

# a path the user named that is missing, a folder, not a folder, or not theirs to read or write;
# with the fix each message ends in
USER_FILE_ERRORS = {
    FileNotFoundError: "check the path",
    IsADirectoryError: "name a file, not a folder",
    NotADirectoryError: "a part of the path is a file, not a folder",
    PermissionError: "check its permissions or choose another path",
}

COMMANDS = {
    "train": cmd_train,
    "sample": cmd_sample,
    "eval": cmd_eval,
    "plot": cmd_plot,
    "train-classifier": cmd_train_classifier,
    "bench": cmd_bench,
    "report": cmd_report,
    "export": cmd_export,
    "import": cmd_import,
    "reflow": cmd_reflow,
    "ema": cmd_ema,
    "pretrained": cmd_pretrained,
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:2] == ["eval", "train-classifier"]:
        args = classifier_parser().parse_args(argv[2:])
        args.command = "train-classifier"
    else:
        args = parser().parse_args(argv)
    args.argv = argv  # --nproc relaunches the command as given
    warnings.formatwarning = lambda msg, *a, **k: f"difflab: warning: {msg}\n"
    keep_freed_memory()  # sampling and eval reuse freed memory too (devices.py says why)
    try:
        return COMMANDS[args.command](args)
    except ConfigError as e:  # bad input a user can fix: the message names it and the fix
        if os.environ.get("DIFFLAB_TRACEBACK"):
            raise
        if getattr(e, "quiet", False):  # another process refused the input and said why
            return 2
        if not getattr(e, "everywhere", False) or os.environ.get("RANK", "0") == "0":
            print(f"difflab: error: {e}", file=sys.stderr)  # once, for a fault every rank saw
        return 2
    except OSError as e:
        user_file = e.filename is not None and isinstance(e, tuple(USER_FILE_ERRORS))
        if not user_file or os.environ.get("DIFFLAB_TRACEBACK"):
            raise
        print(f"difflab: error: {describe_file_error(e)}", file=sys.stderr)
        return 2
    except NonFiniteError as e:
        print(f"difflab: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # outputs are written atomically: nothing is left half-written
        print("\ndifflab: interrupted", file=sys.stderr)
        return 130


def describe_file_error(e: OSError) -> str:
    """One line for a file error that reached the CLI: the path, what is wrong, the fix."""
    fix = next(fix for kind, fix in USER_FILE_ERRORS.items() if isinstance(e, kind))
    return f"{e.filename}: {e.strerror}; {fix}"


if __name__ == "__main__":
    sys.exit(main())
