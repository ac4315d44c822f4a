"""Export a piano-gpt-jax checkpoint as a .pt file in the piano-gpt (PyTorch) layout.

    python -m converters.jax_to_torch CKPT_DIR OUT.pt

CKPT_DIR is a run directory (latest of checkpoints/, else best/), one of those, or a step directory.
The result loads with the reference code: GPT(checkpoint["model_cfg"], vocab_size, pad_token_id).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from piano_gpt_jax.checkpoints import CheckpointError, load_model_checkpoint


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m converters.jax_to_torch",
        description="Export a piano-gpt-jax orbax checkpoint to a piano-gpt PyTorch .pt file.")
    parser.add_argument("input", type=Path, help="run, checkpoints/, best/ or step directory")
    parser.add_argument("output", type=Path, help="the .pt file to write")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace OUTPUT if it exists (it is otherwise left untouched)")
    args = parser.parse_args(argv)
    from converters import save_torch_checkpoint

    try:
        if args.output.exists() and not args.overwrite:
            raise CheckpointError(f"{args.output} already exists; pass --overwrite or choose "
                                  "another name.")
        if args.output.is_dir():
            raise CheckpointError(f"{args.output} is a directory; name a .pt file.")
        ck = load_model_checkpoint(args.input)
        metadata = dict(ck.metadata)
        metadata.setdefault("iteration", ck.step)
        save_torch_checkpoint(args.output, ck.model_config, ck.params, ck.tokenizer_desc,
                              metadata)
    except CheckpointError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"wrote {args.output} (step {ck.step})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
