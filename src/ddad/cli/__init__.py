"""The ``ddad`` command: synth, combine, train, adapt, test, predict, report, export, sweep, presets, import, demo.

``parser`` holds the arguments, ``settings`` turns them into a run's settings, ``commands`` runs them.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Sequence

from ..config import ConfigError
from ..data.io import DatasetError
from .commands import (cmd_adapt, cmd_combine, cmd_demo, cmd_export, cmd_import, cmd_predict, cmd_presets, cmd_report,
                       cmd_serve, cmd_sweep, cmd_synth, cmd_test, cmd_train, cmd_tune, format_metrics)
from .parser import build_parser
from .settings import train_settings

COMMANDS = {"synth": cmd_synth, "combine": cmd_combine, "train": cmd_train, "adapt": cmd_adapt, "sweep": cmd_sweep,
            "presets": cmd_presets, "export": cmd_export, "report": cmd_report, "import": cmd_import, "test": cmd_test, "predict": cmd_predict, "demo": cmd_demo, "serve": cmd_serve,
            "tune": cmd_tune}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # under torchrun, rank 0 prints what the command did; the other ranks' output would repeat it with their
    # own shard's numbers (errors and warnings on stderr still show)
    quiet_rank = int(os.environ.get("RANK", "0") or 0) != 0
    try:
        with open(os.devnull, "w") if quiet_rank else contextlib.nullcontext() as sink, \
                contextlib.redirect_stdout(sink) if quiet_rank else contextlib.nullcontext():
            return COMMANDS[args.command](args)
    except (ConfigError, DatasetError, FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"ddad {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ddad {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())


__all__ = ["build_parser", "format_metrics", "main", "train_settings"]
