"""Export a piano-gpt-jax checkpoint as a .pt file in the piano-gpt (PyTorch) layout.

    python -m converters.jax_to_torch CKPT_DIR OUT.pt

CKPT_DIR is a run directory (its latest checkpoint), its checkpoints/ directory, or a step
directory. The result is what piano-gpt's trainer writes, optimizer state included, so piano-gpt's
own resume, evaluation, tuning and dashboard code accept it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from piano_gpt_jax.checkpoints import CheckpointError, load_model_checkpoint
from piano_gpt_jax.checkpoints.torch_format import save_torch_checkpoint


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m converters.jax_to_torch",
        description="Export a piano-gpt-jax orbax checkpoint to a piano-gpt PyTorch .pt file.")
    parser.add_argument("input", type=Path, help="run, checkpoints/, best/ or step directory")
    parser.add_argument("output", type=Path, help="the .pt file to write")
    parser.add_argument("--weights-only", action="store_true",
                        help="leave out the optimizer state (a step directory without one, "
                             "e.g. a converted .pt, is exported weights-only anyway)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace OUTPUT if it exists (it is otherwise left untouched)")
    args = parser.parse_args(argv)
    try:
        if args.output.exists() and not args.overwrite:
            raise CheckpointError(f"{args.output} already exists; pass --overwrite or choose "
                                  "another name.")
        if args.output.is_dir():
            raise CheckpointError(f"{args.output} is a directory; name a .pt file.")
        record = load_model_checkpoint(args.input, with_optimizer=not args.weights_only,
                                   optimizer_required=False)
        save_torch_checkpoint(args.output, record)
    except CheckpointError as e:
        raise SystemExit(f"error: {e}") from None
    what = "with its optimizer state" if record.optimizer is not None else "weights only"
    print(f"wrote {args.output} (step {record.step}, {what})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
