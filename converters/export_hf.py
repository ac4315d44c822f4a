"""Export a model as a folder anyone can load without unpickling: safetensors weights under
piano-gpt's state-dict names, config.json, tokenizer.json and a model card (README.md).

    python -m converters.export_hf RUN_OR_PT OUT_DIR [--step N] [--push REPO_ID]

RUN_OR_PT is a run directory of ours (its newest checkpoint, or `--step N`), a step directory,
or any `.pt` we read (piano-gpt's included). The folder is what `huggingface_hub`'s
`upload_folder` takes; `--push` uploads it when huggingface_hub is installed and the hub can be
reached (otherwise one line says why, and the folder stays). Every tool of ours reads the folder
back as it reads a `.pt` (`init_from`, `generate`, `evaluate`, the app,
`converters.torch_generate`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from huggingface_hub import HfApi

from piano_gpt_jax import model_card
from piano_gpt_jax.checkpoints import (
    CHECKPOINTS_SUBDIR,
    CheckpointError,
    load_any_checkpoint,
    save_model_folder,
)
from piano_gpt_jax.run_log import METRICS_FILE


def source_and_run_dir(source: Path, step: int | None) -> tuple[Path, Path | None]:
    """(what to load, the run directory whose metrics.jsonl feeds the card, or None)."""
    if step is not None:
        if source.is_file():
            raise CheckpointError(f"--step picks a checkpoint of a run directory; {source} is a "
                                  "file.")
        step_dir = source / CHECKPOINTS_SUBDIR / str(step)
        if not step_dir.is_dir():
            raise CheckpointError(f"{source} has no checkpoint {step} (expected {step_dir}).")
        return step_dir, source
    if source.is_file():
        return source, source.parent if (source.parent / METRICS_FILE).is_file() else None
    if source.name.isdigit() and source.parent.name == CHECKPOINTS_SUBDIR:
        return source, source.parent.parent
    return source, source if (source / METRICS_FILE).is_file() else None


def push(folder: Path, repo_id: str) -> str:
    """Upload `folder` to the hub; returns its URL (RuntimeError with the reason otherwise)."""
    try:
        api = HfApi()
        api.create_repo(repo_id, exist_ok=True)
        return str(api.upload_folder(folder_path=str(folder), repo_id=repo_id))
    except Exception as e:  # noqa: BLE001 — network, auth and hub errors alike
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RuntimeError(f"{type(e).__name__}: {reason[:200]}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m converters.export_hf",
        description="Write a model folder (model.safetensors, config.json, tokenizer.json, "
                    "README.md) from a run directory or a .pt.")
    parser.add_argument("source", type=Path, help="run directory, step directory or .pt file")
    parser.add_argument("output", type=Path, help="the folder to write (must not exist)")
    parser.add_argument("--step", type=int, default=None,
                        help="export this checkpoint of the run (default: the newest)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace OUTPUT if it is a model folder written earlier")
    parser.add_argument("--push", metavar="REPO_ID", default=None,
                        help="also upload the folder to this Hugging Face hub repository")
    args = parser.parse_args(argv)
    try:
        what, run_dir = source_and_run_dir(args.source, args.step)
        record = load_any_checkpoint(what)
        card = model_card.write_card(record, run_dir, args.output.name)
        save_model_folder(record, args.output, card, overwrite=args.overwrite)
    except (CheckpointError, OSError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    print(f"wrote {args.output} (step {record.step}: model.safetensors, config.json, "
          "tokenizer.json, README.md)", file=sys.stderr)
    if args.push:
        try:
            url = push(args.output, args.push)
        except RuntimeError as e:
            raise SystemExit(f"error: could not upload to {args.push} ({e}); the folder is "
                             f"kept at {args.output}") from None
        print(f"uploaded to {url}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
