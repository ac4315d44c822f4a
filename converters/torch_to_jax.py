"""Convert a piano-gpt PyTorch checkpoint (.pt) into an orbax checkpoint our trainer can start from.

    python -m converters.torch_to_jax IN.pt OUT_DIR

Writes OUT_DIR/checkpoints/<step>/{params,meta}. The .pt is read without executing its pickle.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from piano_gpt_jax.checkpoints import CheckpointError, save_model_checkpoint
from piano_gpt_jax.checkpoints.torch_format import load_torch_checkpoint


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m converters.torch_to_jax",
        description="Convert a piano-gpt PyTorch .pt checkpoint to a piano-gpt-jax orbax "
                    "checkpoint directory (OUT_DIR/checkpoints/<step>/).")
    parser.add_argument("input", type=Path, help="the .pt file (reference trainer or exported)")
    parser.add_argument("output", type=Path, help="a new output directory (must not already "
                                                   "hold checkpoints)")
    parser.add_argument("--step", type=int, default=None,
                        help="step number to store under (default: the checkpoint's iteration)")
    args = parser.parse_args(argv)
    try:
        if args.output.exists() and not args.output.is_dir():
            raise CheckpointError(f"{args.output} is a file; name a new output directory.")
        record = load_torch_checkpoint(args.input)
        if args.step is not None:
            record.meta.step = args.step
        out = save_model_checkpoint(args.output, record)
    except CheckpointError as e:
        raise SystemExit(f"error: {e}") from None
    cfg = record.model_config
    print(f"wrote {out}: n_layer={cfg.n_layer} n_head={cfg.n_head} n_embd={cfg.n_embd} "
          f"vocab_size={cfg.vocab_size} context_size={cfg.context_size} bias={cfg.bias} "
          f"time_embedding={cfg.use_time_embedding}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
