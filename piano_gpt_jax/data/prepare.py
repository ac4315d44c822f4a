"""Prepare the corpus of a config ahead of time (e.g. on a CPU box before a GPU job):

    python -m piano_gpt_jax.data.prepare --config configs/piano.py [--config.k=v ...]

prepares exactly the stores `python -m piano_gpt_jax.train` with the same arguments reads (every
training dataset's train split and the base dataset's validation split, for the config's stage,
with the indices of its context size or notes per record), then prints rows, pieces, notes,
tokens and bytes per split. Exit 0 when ready, 2 with one line when it cannot be done.
"""

from __future__ import annotations

import sys
import time

from piano_gpt_jax.config import ConfigError, HelpRequested, parse_config
from piano_gpt_jax.data.pipeline import build_tokenizer, make_pipeline
from piano_gpt_jax.data.preparation import PrepareError
from piano_gpt_jax.data.settings import DataSettings


def _report(pipeline) -> str:
    rows = ["split                 rows    pieces        notes       tokens        bytes  B/note"]
    for label, store in pipeline.prepared_stores():
        tokens = getattr(store, "n_tokens", 0)
        rows.append(f"{label:<18} {store.manifest['n_rows']:>7,} {store.n_pieces:>9,} "
                    f"{store.n_notes:>12,} {tokens:>12,} {store.n_bytes:>12,} "
                    f"{store.n_bytes / max(store.n_notes, 1):>7.1f}")
        rows.append(f"  {store.path}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    """Prepare what `python -m piano_gpt_jax.train` with the same arguments would read."""
    argv = list(sys.argv if argv is None else argv)
    try:
        cfg = parse_config(argv, "piano_gpt_jax.data.prepare",
                           "Prepare the corpus the trainer with these arguments reads.")
        settings = DataSettings.from_config(cfg)
        started = time.perf_counter()
        pipeline = make_pipeline(settings, build_tokenizer(settings))
    except HelpRequested as e:
        print(e)
        return 0
    except (ConfigError, PrepareError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(_report(pipeline))
    print(f"ready in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
