r"""Training recipes for `python -m piano_gpt_jax.train`.

Run (from the repository root):

  # CPU recipe: PIANO tasks on the built-in offline dataset (4 layers x 128, context 256,
  # batch 16, 600 steps). About 3-5 min on 2 CPU cores (per machine and date:
  # benchmarks/README.md), plus a one-time ~30 s build of the built-in dataset on a fresh
  # machine; full_val loss 7.74 (untrained) -> 2.59 (step 200) -> 2.31 (step 400) -> 2.18
  # (step 600).
  python -m piano_gpt_jax.train --config configs/piano.py:tiny

  # The full GPU recipe: gpt2 (12 x 768: 86.7M parameters at the piano vocabulary), context
  # 2048, bf16, epr-labs/maestro-sustain-v2, PIANO tasks. On one H100: 31.7 ms/step for 8 x 2048
  # tokens, 39% MFU (benchmarks/train_step.py --gpu).
  python -m piano_gpt_jax.train --config configs/piano.py

  # Reference model sizes: gpt2_small, gpt2_minimal, gpt2_10M, gpt2, gpt2_100M, gpt2_200M,
  # gpt2_medium.
  python -m piano_gpt_jax.train --config configs/piano.py:gpt2_10M

  # Any key can be overridden; unknown keys are rejected with the closest valid name.
  python -m piano_gpt_jax.train --config configs/piano.py:tiny --config.optimizer.max_iters=50 \
      --config.out_dir=runs/quick

  # Evaluate a checkpoint (ours or a PyTorch .pt) and print a loss table.
  python -m piano_gpt_jax.train --config configs/piano.py:tiny --config.eval_only=True \
      --config.init_from=runs/tiny/final.pt

Re-running the same command with the same `out_dir` resumes from its latest checkpoint and continues
exactly as an uninterrupted run would.

Multi-host (`ddp.backend`): launch the same command on every host. With `ddp.backend="auto"` the
trainer calls `jax.distributed.initialize()` when it detects a cluster (TPU pods, SLURM, or the
environment variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID, which we pass
through explicitly); `"jax_distributed"` forces the call, `"none"` never calls it. The batch is then
split over every device of every host; `data.batch_size` stays the global micro-batch. The
reference's "nccl"/"gloo" are accepted as synonyms of "auto".
"""

from __future__ import annotations

import ml_collections

from piano_gpt_jax import config

# name: (n_layer, n_head, n_embd); the reference's model group files (section 3.2).
MODEL_PRESETS = {
    "gpt2_small": (2, 2, 64),
    "gpt2_minimal": (4, 4, 256),
    "gpt2_10M": (12, 8, 256),
    "gpt2": (12, 12, 768),
    "gpt2_100M": (16, 16, 768),
    "gpt2_200M": (16, 16, 1024),
    "gpt2_medium": (24, 16, 1024),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """`arg` picks a preset: None (full GPU recipe), "tiny" (CPU), or a model preset name.

    Every key starts at its declared default (piano_gpt_jax/config.py declares each key once,
    with its type, default and meaning); a recipe sets only what it chooses differently.
    """
    preset = arg or "gpt2"
    if preset not in MODEL_PRESETS and preset != "tiny":
        choices = ", ".join(["tiny", *MODEL_PRESETS])
        raise ValueError(f"unknown preset {preset!r} for configs/piano.py; choose one of: "
                         f"{choices}")

    c = ml_collections.ConfigDict(config.default_config())
    for key, field_type in config.optional_keys().items():  # None defaults keep their type
        *parents, leaf = key.split(".")
        node = c
        for p in parents:
            node = node[p]
        node[leaf] = ml_collections.FieldReference(None, field_type=field_type)

    # The GPU recipe: gpt2 (86M at this vocabulary), context 2048, bf16, PIANO tasks on
    # epr-labs/maestro-sustain-v2 (the declared defaults), plus:
    c.out_dir = f"runs/{preset}"
    c.model.n_layer, c.model.n_head, c.model.n_embd = MODEL_PRESETS.get(preset, (4, 4, 128))
    c.system.data_workers = 8
    c.optimizer.gradient_accumulation_steps = 2  # global batch 64 sequences
    if preset == "tiny":
        _tiny(c)
    return c


def _tiny(c: ml_collections.ConfigDict) -> None:
    """A few-minute CPU run on the built-in dataset whose validation loss visibly falls."""
    c.model.n_layer = 4
    c.model.n_head = 4
    c.model.n_embd = 128
    c.model.context_size = 256
    c.system.device = "cpu"
    c.system.dtype = "float32"
    c.system.data_workers = 0
    c.data.batch_size = 16
    c.data.context_size = 256
    c.data.notes_per_record = 48
    c.dataset.base_dataset_name = "builtin"
    c.optimizer.gradient_accumulation_steps = 1
    c.optimizer.max_iters = 600
    c.lr.learning_rate = 1e-3
    c.lr.min_lr = 1e-4
    c.lr.warmup_iters = 40
    c.eval_interval = 200
    c.eval_iters = 8
    c.checkpoint.keep_last = 2
    c.logging.log_interval = 25
