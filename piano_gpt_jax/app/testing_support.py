"""Tiny runs for the app's tests (page tests and the browser test share them): a real checkpoint
written by `save_model_checkpoint` and a `metrics.jsonl` shaped like the trainer's."""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax
import numpy as np
import optax
import pandas as pd

from piano_gpt_jax import checkpoints, sampling
from piano_gpt_jax.data.pipeline import build_tokenizer
from piano_gpt_jax.data.settings import DataSettings
from piano_gpt_jax.model import ModelConfig, forward, init_params

RUN_CONFIG = {"data": {"context_size": 96, "notes_per_record": 24},
              "model": {"n_layer": 2, "n_head": 2, "n_embd": 32, "context_size": 96},
              "tasks": "piano_medium", "optimizer": {"max_iters": 40}}


def save_checkpoint(run_dir: Path, cfg, params, tokenizer_desc: dict, config: dict,
                    step: int) -> None:
    """Our run directory with one model checkpoint, as load_any_checkpoint reads it."""
    record = checkpoints.CheckpointRecord(cfg, params, tokenizer_desc,
                                          checkpoints.RunMeta(step=step, config=config))
    checkpoints.save_model_checkpoint(run_dir, record)


ARPEGGIO = (60, 64, 67, 64)  # C-E-G-E: few pitches, so even a minute-old model closes notes


def arpeggio_notes(n_notes: int = 240, step_s: float = 0.25):
    """A monophonic C-major arpeggio, a quarter second per note: the tiny model's training data
    and an in-distribution prompt for tests that need generated notes."""
    pitch = np.resize(np.array(ARPEGGIO), n_notes)
    start = np.arange(n_notes) * step_s
    return pd.DataFrame({"pitch": pitch, "velocity": np.full(n_notes, 80), "start": start,
                         "end": start + 0.8 * step_s})


def make_tiny_run(run_dir: Path, tasks: str = "piano_medium", steps: int = 100) -> Path:
    """A 2-layer x 32 model with the PIANO-task vocabulary of `tasks`, fitted for `steps` Adam
    steps (about 5 s) to the arpeggio so that it writes notes, saved as our run directory.

    A freshly initialised model almost never closes a note in a few dozen tokens (the vocabulary
    is mostly special tokens), so "generation produces notes" needs this little fit.
    """

    settings = DataSettings(stage="piano_task", tasks=tasks, context_size=96,
                            notes_per_record=24, batch_size=2, use_time_steps=True,
                            shard_index=0, shard_count=1)
    tok = build_tokenizer(settings)
    cfg = ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=32,
                      context_size=96, use_time_embedding=True)
    tables = sampling.token_tables(tok)
    ids = np.concatenate([tok.encode_tokens(["<PIANO_FOR_AI>", "<UNKNOWN_COMPOSER>"]),
                          tok.encode(arpeggio_notes())])
    time_steps, _ = sampling.prompt_time_steps(tables, ids)
    rng = np.random.default_rng(0)
    optimizer = optax.adam(1e-2)

    @jax.jit
    def update(params, opt_state, tokens_BxT, steps_BxT):
        def loss_fn(p):
            logits_BxTxV = forward(cfg, p, tokens_BxT[:, :-1], steps_BxT[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(
                logits_BxTxV, tokens_BxT[:, 1:]).mean()

        grads = jax.grad(loss_fn)(params)
        changes, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, changes), opt_state

    params = init_params(cfg, jax.random.PRNGKey(0))
    opt_state = optimizer.init(params)
    width = cfg.context_size + 1
    for _ in range(steps):
        first_B = rng.integers(0, len(ids) - width, size=16)
        window_BxT = first_B[:, None] + np.arange(width)[None]
        params, opt_state = update(params, opt_state, ids[window_BxT].astype(np.int32),
                                   time_steps[window_BxT].astype(np.int32))
    save_checkpoint(run_dir, cfg, jax.device_get(params), tok.to_dict(),
                    {**RUN_CONFIG, "tasks": tasks}, step=steps)
    return run_dir


def write_metrics(run_dir: Path, steps: int = 40, eval_every: int = 10,
                  decay_steps: float = 15.0, floor: float = 2.0,
                  tokens_per_s: float = 5000.0) -> Path:
    """Train events every step and eval events (full_val, bach, a NaN split) every `eval_every`,
    as train.py writes them, plus a torn last line as a killed run leaves."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    tokens_per_step = 2 * 96
    for step in range(steps + 1):
        loss = 7.5 * math.exp(-step / decay_steps) + floor
        if step and step % eval_every == 0 or step == 0:
            lines.append({"event": "eval", "step": step, "val_loss": loss + 0.1,
                          "val_loss/full_val": loss + 0.1, "val_loss/bach": loss + 0.3,
                          "val_loss/mozart": None, "lr": 1e-3,
                          "tokens": step * tokens_per_step,
                          **({"train_loss": loss} if step else {})})
        if step:
            lines.append({"event": "train", "step": step, "train_loss": loss,
                          "lr": 1e-3 * min(1.0, step / 10), "tokens": step * tokens_per_step,
                          "tokens_per_s": tokens_per_s + 10 * step, "step_time_s": 0.04,
                          "mfu": None})
    path = run_dir / "metrics.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in lines) + '{"event": "tra')
    return path


_RUNS_ROOT: Path | None = None


def shared_runs_root(tmp_path_factory) -> Path:
    """One runs folder per test session (the page tests and the browser test share it): `tiny`
    (the fitted checkpoint and a metrics log), `tiny-b` (the same model fitted for fewer steps:
    a second checkpoint to compare and judge blind) and `other` (a second, shorter log)."""
    global _RUNS_ROOT
    if _RUNS_ROOT is None or not (_RUNS_ROOT / "tiny").is_dir():
        root = tmp_path_factory.mktemp("app-runs")
        make_tiny_run(root / "tiny")
        make_tiny_run(root / "tiny-b", steps=40)
        write_metrics(root / "tiny")
        write_metrics(root / "other", steps=20, eval_every=5, decay_steps=6.0, floor=2.6,
                      tokens_per_s=4200.0)
        _RUNS_ROOT = root
    return _RUNS_ROOT


def app_script(page_module: str) -> str:
    """An AppTest script that renders one page on its own."""
    return f"from piano_gpt_jax.app import {page_module}\n{page_module}.render()\n"
