"""PIANO-task evaluation: answer task prompts with the model and score them with the PIANO metrics.

    python -m piano_gpt_jax.evaluate --checkpoint RUN_DIR_OR.pt [--dataset NAME] [--split full_val]
        [--n-examples 16] [--temperature 1.0] [--top-k K] [--top-p P] [--min-p P] [--seed 0]
        [--out-dir DIR] [--wandb]

As the reference's piano_eval: prompt = everything up to and including <GENAI>, in the prompt
layout the checkpoint's vocabulary was made for (head, or f37ac14 for reference f37ac14
checkpoints; see data.pipeline.resolve_prompt_layout); the generated
notes are cropped to start before the target's last end (the model's own <EOGENAI> also stops
it here); metrics are averaged per task and over all tasks ("all"). Unlike the reference, an
empty generation is scored rather than skipped (F1 0, distances against an all-zero histogram),
and the number of empty generations is reported; NaN correlations (a constant histogram) are left
out of that metric's mean, and `n_nan/<metric>` says how often.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from piano_gpt_jax import out_dir as out_dir_lib
from piano_gpt_jax import piano_metrics, sampling, sampling_settings
from piano_gpt_jax.checkpoints import is_model_folder, load_any_checkpoint, resolve_step_dir
from piano_gpt_jax.data.pipeline import build_tokenizer, make_pipeline
from piano_gpt_jax.data.settings import settings_for_checkpoint
from piano_gpt_jax.model import ModelConfig
from piano_gpt_jax.music import layouts
from piano_gpt_jax.music.tokenizer import ExponentialTimeTokenizer
from piano_gpt_jax.run_log import METRICS_FILE, append_jsonl

EVAL_BATCH = 16  # prompts decoded together


def generation_budget(target_lengths: Sequence[int], context_size: int) -> int:
    """New-token budget: room for the longest target plus slack, at most one context."""
    longest = max((int(n) for n in target_lengths), default=0)
    return int(min(context_size, max(64, round(1.5 * longest) + 32)))


def crop_to_target(generated, target):
    """Drop generated notes that start after the target's last end (reference: no EOS needed)."""
    if len(generated) == 0 or len(target) == 0:
        return generated
    return generated[generated["start"] < float(target["end"].max())].reset_index(drop=True)


def _mean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan


def run_task_evaluation(model_config: ModelConfig, params, tokenizer, pipeline,
                        splits: Sequence[str], n_examples: int,
                        settings: sampling.SamplingSettings | None = None) -> dict:
    """{split: {task or "all": {metric: float}}} over `n_examples` fixed prompts per split.

    Splits without task examples (next-token stage) are left out. Each entry also carries
    n_examples, n_empty_generations and n_nan/<metric> counts. `settings` decide the draws; each
    batch of prompts gets its own new-token budget and the seed plus its first example's index.
    """
    settings = settings or sampling.SamplingSettings()
    manager = piano_metrics.MetricsManager.load_default()
    tables = sampling.token_tables(tokenizer)
    results: dict[str, dict[str, dict[str, float]]] = {}
    for split in splits:
        examples = pipeline.eval_examples(split, n_examples)
        if not examples:
            continue
        per_task: dict[str, list[dict[str, float]]] = defaultdict(list)
        for lo in range(0, len(examples), EVAL_BATCH):
            batch = examples[lo:lo + EVAL_BATCH]
            batch_settings = settings.replace(
                seed=settings.seed + lo,
                max_new_tokens=generation_budget([len(e["target_ids"]) for e in batch],
                                                 model_config.context_size))
            out = sampling.sample(model_config, params, [e["prompt_ids"] for e in batch],
                                  batch_settings, tables)
            for ex, new in zip(batch, out.new_tokens, strict=True):
                # decode drops non-music tokens, so a final <EOGENAI> needs no stripping.
                target = tokenizer.decode(ex["target_ids"])
                generated = crop_to_target(tokenizer.decode(new), target)
                scores = manager.calculate_flat(target, generated)
                scores["empty_generation"] = float(len(generated) == 0)
                per_task[ex["task"]].append(scores)
        per_task["all"] = [s for rows in per_task.values() for s in rows]
        results[split] = {task: _summarise(rows, manager.log_keys())
                          for task, rows in sorted(per_task.items(), key=_all_first)}
    return results


def _all_first(item):
    return (item[0] != "all", item[0])


def _summarise(rows: list[dict[str, float]], keys: list[str]) -> dict[str, float]:
    out = {k: _mean([r[k] for r in rows]) for k in keys}
    out["n_examples"] = float(len(rows))
    out["n_empty_generations"] = float(sum(r["empty_generation"] for r in rows))
    for k in keys:
        n_nan = sum(math.isnan(r[k]) for r in rows)
        if n_nan:
            out[f"n_nan/{k}"] = float(n_nan)
    return out


# ------------------------------------------------------------------------------------------ data
def piano_task_refusal(record) -> str | None:
    """Why `record` cannot answer PIANO-task prompts (None when it can): a model trained for
    next-token prediction never saw a task prompt or <GENAI>, so its "metrics" would be
    meaningless (and `generate --task` refuses it for the same reason)."""
    stage = (record.meta.config or {}).get("stage")
    if stage == "next_token_pretraining":
        return ("it was trained for next-token prediction (stage next_token_pretraining); "
                "PIANO-task metrics need a checkpoint trained on PIANO tasks (stage piano_task)")
    vocab = ExponentialTimeTokenizer.from_dict(record.tokenizer_desc).token_to_id
    if layouts.GENAI not in vocab:
        return ("its vocabulary has no <GENAI> token, so it was never trained on PIANO-task "
                "prompts; evaluate a piano_task checkpoint")
    return None


# ------------------------------------------------------------------------------------------- CLI
def format_tables(results: dict, max_columns: int = 6) -> str:
    """One table per split: metrics down, tasks across ("all" first), wrapped to fit a terminal."""
    lines = []
    for split, per_task in results.items():
        tasks = list(per_task)
        keys = [k for k in per_task["all"] if not k.startswith("n_nan/")]
        width = max(len(k) for k in keys) + 2
        for lo in range(0, len(tasks), max_columns):
            cols = tasks[lo:lo + max_columns]
            colw = max(12, *(len(c) + 2 for c in cols))
            lines.append(f"== {split} ==")
            lines.append(" " * width + "".join(f"{c:>{colw}}" for c in cols))
            for k in keys:
                cells = "".join(f"{per_task[c].get(k, math.nan):>{colw}.4f}" for c in cols)
                lines.append(f"{k:<{width}}{cells}")
            lines.append("")
    return "\n".join(lines)


def run_dir_of(path: Path) -> Path:
    """The run directory a checkpoint path belongs to (a .pt's own directory, a model folder's
    parent: RUN/final/ is the run's export)."""
    if path.is_file() or is_model_folder(path):
        return path.parent

    return resolve_step_dir(path).parent.parent


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m piano_gpt_jax.evaluate",
                                 description="PIANO-task metrics of a checkpoint.")
    ap.add_argument("--checkpoint", required=True, help="run directory, step directory or .pt")
    ap.add_argument("--dataset", help="dataset to evaluate on (default: the run's own)")
    ap.add_argument("--split", action="append",
                    help="eval split (repeat or comma-separate; default: all of the run's)")
    ap.add_argument("--n-examples", type=int, default=16, help="task prompts per split")
    # every sampling flag but --max-new-tokens: each prompt's budget follows its target
    sampling_settings.add_arguments(ap, leave_out=("max_new_tokens",))
    ap.add_argument("--out-dir", help="where metrics.jsonl is appended (default: the run dir, "
                                      "or the current directory for a .pt)")
    ap.add_argument("--wandb", action="store_true", help="also log to Weights & Biases")
    ap.add_argument("--wandb-project", default="piano-gpt-jax")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    if args.n_examples < 1:
        raise SystemExit("error: --n-examples must be at least 1")
    try:  # the sampler's own checks (finite, temperature >= 0, ...), before any work
        sampler_settings = sampling_settings.from_arguments(args)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None

    path = Path(args.checkpoint)
    try:
        record = load_any_checkpoint(path)
    except (ValueError, FileNotFoundError, OSError, KeyError) as e:
        raise SystemExit(f"error: cannot load checkpoint {path}: {e}") from None
    out_dir = Path(args.out_dir) if args.out_dir else run_dir_of(path)
    try:  # before the slow work: an output that cannot be written costs nothing
        out_dir_lib.check_writable(out_dir, "--out-dir")
    except out_dir_lib.OutDirError as e:
        raise SystemExit(f"error: {e}") from None
    if record.tokenizer_desc is None:
        raise SystemExit(f"error: {path} has no tokenizer_desc; PIANO prompts need the run's "
                         "tokenizer. Re-export the checkpoint with its tokenizer.")
    refusal = piano_task_refusal(record)
    if refusal:
        raise SystemExit(f"error: {path}: {refusal}")
    try:
        settings = settings_for_checkpoint(record, args.dataset, stage="piano_task")
        tokenizer = build_tokenizer(settings, record.tokenizer_desc)
        if tokenizer.vocab_size != record.model_config.vocab_size:
            raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens but the model "
                             f"{record.model_config.vocab_size}")
        pipeline = make_pipeline(settings, tokenizer)
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise SystemExit(f"error: cannot build the evaluation data: {e}") from None
    splits = [s.strip() for arg in (args.split or []) for s in arg.split(",") if s.strip()]
    splits = splits or pipeline.eval_split_names
    unknown = [s for s in splits if s not in pipeline.eval_split_names]
    if unknown:
        raise SystemExit(f"error: unknown split(s) {unknown}; this dataset has "
                         f"{pipeline.eval_split_names}")

    t0 = time.perf_counter()
    results = run_task_evaluation(record.model_config, record.params, tokenizer, pipeline, splits,
                                  args.n_examples, sampler_settings)
    seconds = time.perf_counter() - t0
    print(f"PIANO-task metrics of {path} (step {record.step}), {args.n_examples} prompts per "
          "split, "
          f"{pipeline.prompt_layout} prompt layout, temperature {args.temperature}, "
          f"{seconds:.1f} s")
    print(format_tables(results))

    records = [{"event": "task_eval", "checkpoint": str(path), "step": record.step, "split": split,
                "task": task, "temperature": args.temperature, **values}
               for split, per_task in results.items() for task, values in per_task.items()]
    try:
        append_jsonl(out_dir / METRICS_FILE, records)
    except OSError as e:
        raise SystemExit(f"error: cannot append the results to {out_dir / 'metrics.jsonl'} "
                         f"({out_dir_lib.os_error_reason(e)}); the table above is all that was "
                         "kept. Free some space or pass --out-dir.") from None
    print(f"appended {len(records)} rows to {out_dir / 'metrics.jsonl'}")
    if args.wandb:
        _log_wandb(args, record, results)
    return 0


def _log_wandb(args, record, results: dict) -> None:
    try:
        import wandb
    except ImportError:
        raise SystemExit("error: --wandb needs the wandb package (pip install wandb)") from None
    run = wandb.init(project=args.wandb_project, job_type="piano-eval",
                     mode=os.environ.get("WANDB_MODE", "online"),
                     config={"checkpoint": str(args.checkpoint), "step": record.step})
    logged = {}
    for split, per_task in results.items():
        for task, values in per_task.items():
            prefix = f"metrics/{split}_" if task == "all" else f"metrics/{split}/{task}/"
            logged.update({prefix + k: v for k, v in values.items()})
    run.log({"iter": record.step, **logged})
    run.finish()


if __name__ == "__main__":
    sys.exit(main())
