"""Validation losses: during training, and eval_only (a loss table without training)."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from piano_gpt_jax.config import TrainConfig
from piano_gpt_jax.evaluate import run_task_evaluation
from piano_gpt_jax.jitted_steps import compile_steps, make_eval_step
from piano_gpt_jax.run import start as start_lib
from piano_gpt_jax.sampling_settings import SamplingSettings
from piano_gpt_jax.sharding import place


def evaluate_losses(eval_fn, params, eval_batches: dict[str, list]) -> dict[str, float]:
    """Token-mean loss per split over its fixed batches."""
    out = {}
    for split, batches in eval_batches.items():
        total, count = 0.0, 0.0
        for batch in batches:
            s, n = eval_fn(params, batch)
            total, count = total + float(s), count + float(n)
        out[split] = total / count if count else float("nan")
    return out


def format_table(rows: dict[str, float], title: str) -> str:
    width = max(len(k) for k in rows) + 2
    lines = [title, "-" * (width + 10)]
    lines += [f"{k:<{width}}{v:>10.4f}" for k, v in rows.items()]
    return "\n".join(lines)


def eval_only(cfg: TrainConfig) -> dict:
    """Load init_from (ours or a .pt) or out_dir's latest checkpoint, print a loss table (and,
    with eval_metrics, the PIANO task metrics)."""
    source = cfg.out_dir if cfg.from_scratch else cfg.init_from
    record = start_lib.load_init(source)
    _, tokenizer, pipeline = start_lib.build_data(cfg, record.tokenizer_desc)
    model_config = start_lib.model_config_for(cfg, tokenizer.vocab_size,
                                              record.model_config.to_dict())
    start_lib.check_compatible(model_config, tokenizer, cfg, source)
    mesh = start_lib.run_mesh(cfg)
    params = place(jax.tree_util.tree_map(np.asarray, record.params), mesh)
    _, eval_fn = compile_steps(None, make_eval_step(model_config), mesh, use_jit=cfg.system.compile,
                               state_like={"params": params})
    losses = evaluate_losses(eval_fn, params, start_lib.eval_batches(cfg, pipeline, mesh))
    print(format_table(losses, f"validation loss of {source} (step {record.step}, "
                               f"{cfg.eval_iters} batches per split)"))
    result: dict[str, Any] = {"losses": losses}
    if cfg.eval_metrics:
        metrics = run_task_evaluation(model_config, record.params, tokenizer, pipeline,
                                      pipeline.eval_split_names, cfg.eval_examples,
                                      SamplingSettings(seed=cfg.seed))
        for split, per_task in metrics.items():
            for task, values in per_task.items():
                print(format_table(values, f"{split} / {task}"))
        result["metrics"] = metrics
    return result
