"""The main job: `python -m piano_gpt_jax.train --config configs/piano.py[:preset] [--config.k=v]`.

Trains (or, with eval_only, evaluates) a piano GPT; see configs/piano.py for recipes, expected
results and multi-host launching. Re-running the same command with the same out_dir resumes from
the latest checkpoint and continues exactly as an uninterrupted run would: the optimizer state,
rng, loss-scale state, step counters and the data iterator position are all checkpointed.

This module is the command line only: parsing, start-up order and exit codes (0 done, 2 a
usage or checkpoint-write error, 3 non-finite losses, 130 interrupted). The run itself is
piano_gpt_jax/run/ (start → loop → saving).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import traceback

from piano_gpt_jax.config import ConfigError, HelpRequested, parse_config
from piano_gpt_jax.run.errors import (
    CheckpointWriteError,
    Interrupted,
    NonFiniteLoss,
    UsageError,
)
from piano_gpt_jax.run.loop import train
from piano_gpt_jax.run.processes import (
    check_devices,
    check_same_config,
    maybe_init_distributed,
    select_platform,
)
from piano_gpt_jax.run.validation import eval_only

__all__ = ["CheckpointWriteError", "Interrupted", "NonFiniteLoss", "UsageError", "eval_only",
           "main", "train"]

class _OrbaxErrorsReportedByUs(logging.Filter):
    """orbax logs every failed background write with tracebacks from several threads (its
    messages start with "[process=N]"); the trainer turns each checkpoint failure into one line
    of its own (run.saving.checkpoint_io)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR
                    and str(record.msg).startswith("[process="))


def _quiet_orbax_threads() -> None:
    """Exceptions ending orbax's background threads are reported by
    run.saving.checkpoint_io; other threads' exceptions still print."""
    default = threading.excepthook

    def hook(args) -> None:
        frames = traceback.extract_tb(args.exc_traceback) if args.exc_traceback else []
        if not any("/orbax/" in f.filename for f in frames):
            default(args)

    threading.excepthook = hook
    default_unraisable = sys.unraisablehook

    def unraisable(args) -> None:
        # tensorstore completing a failed orbax write onto orbax's already-closed event loop
        if not (isinstance(args.exc_value, RuntimeError)
                and "Event loop is closed" in str(args.exc_value)):
            default_unraisable(args)

    sys.unraisablehook = unraisable


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("absl", "jax._src", "orbax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
        logging.getLogger(noisy).addFilter(_OrbaxErrorsReportedByUs())
    _quiet_orbax_threads()
    argv = list(sys.argv if argv is None else argv)
    try:
        cfg = parse_config(argv)
    except HelpRequested as e:
        print(e)
        return 0
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        select_platform(cfg)
        maybe_init_distributed(cfg)
        check_devices(cfg)
        check_same_config(cfg)
        if cfg.eval_only:
            eval_only(cfg)
            return 0
        summary = train(cfg)
    except CheckpointWriteError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(2)  # skip tearing down orbax's failing background writes (tracebacks only)
    except (ConfigError, UsageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except Interrupted as e:
        print(str(e), file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("interrupted; run the same command to resume from the last checkpoint.",
              file=sys.stderr)
        return 130
    print(f"done: step {summary['step']}, val_loss first {_fmt(summary['first_val_loss'])} "
          f"-> last {_fmt(summary['last_val_loss'])} (best {summary['best_val_loss']:.4f})")
    return 0


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


if __name__ == "__main__":
    sys.exit(main())
