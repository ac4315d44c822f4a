r"""Training recipes for `python -m piano_gpt_jax.train`.

Run (from the repository root):

  # CPU recipe: PIANO tasks on the built-in offline dataset (4 layers x 128, context 256,
  # batch 16, 600 steps). Measured on 2 CPU cores: 3 min 46 s (~0.34 s/step, ~12k tokens/s), plus
  # a one-time ~30 s build of the built-in dataset on a fresh machine; full_val loss 7.74
  # (untrained) -> 2.55 (step 200) -> 2.28 (step 400) -> 2.17 (step 600).
  python -m piano_gpt_jax.train --config configs/piano.py:tiny

  # The full GPU recipe: gpt2 (124M-class), context 2048, bf16, epr-labs/maestro-sustain-v2,
  # PIANO tasks.
  python -m piano_gpt_jax.train --config configs/piano.py

  # Reference model sizes: gpt2_10M, gpt2 (124M-class), gpt2_100M, gpt2_200M, gpt2_medium.
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
    """`arg` picks a preset: None (full GPU recipe), "tiny" (CPU), or a model preset name."""
    preset = arg or "gpt2"
    if preset not in MODEL_PRESETS and preset != "tiny":
        choices = ", ".join(["tiny", *MODEL_PRESETS])
        raise ValueError(f"unknown preset {preset!r} for configs/piano.py; choose one of: "
                         f"{choices}")

    c = ml_collections.ConfigDict()
    c.out_dir = f"runs/{preset}"
    c.seed = 1337
    c.stage = "piano_task"  # or "next_token_pretraining"
    c.init_from = "scratch_next_token"  # or a run directory of ours, or a PyTorch .pt
    # True: continue init_from's AdamW state, step (schedule position) and token count, e.g. a
    # run trained in PyTorch goes on here where it stopped. False: a fresh optimizer (fine-tune).
    c.init_optimizer = False
    c.loss_masking = "pretraining"  # or "finetuning": loss only on tokens after <GENAI>
    c.tasks = "piano_default"  # a task-set name, or a tuple of task names

    n_layer, n_head, n_embd = MODEL_PRESETS.get(preset, (4, 4, 128))
    c.model = ml_collections.ConfigDict()
    c.model.n_layer = n_layer
    c.model.n_head = n_head
    c.model.n_embd = n_embd
    c.model.dropout = 0.0
    c.model.bias = False
    c.model.context_size = 2048
    c.model.use_time_embedding = False
    # None/False = gather (faster on CPU at this vocabulary, see benchmarks/train_step.py);
    # True = one-hot matmul.
    c.model.one_hot_embedding = ml_collections.FieldReference(None, field_type=bool)
    # auto: our einsum attention on CPU (faster there), XLA's choice (cuDNN's fused kernel where
    # it applies) on GPU; or force einsum | xla | cudnn. Equal logits (model_test.py).
    c.model.attention = "auto"
    c.model.remat = False  # recompute block activations in the backward pass: long contexts

    c.system = ml_collections.ConfigDict()
    c.system.device = "gpu"  # cpu | gpu | cuda | tpu
    c.system.dtype = "bfloat16"  # float32 | bfloat16 | float16 (dynamic loss scaling)
    c.system.compile = True  # False runs the step without jit (debugging)
    c.system.data_workers = 8
    # "none": every device holds all parameters and optimizer state (data parallel); "fsdp":
    # they are sharded over all devices (ZeRO-3), for models that do not fit one device.
    c.system.param_sharding = "none"

    c.ddp = ml_collections.ConfigDict()
    c.ddp.backend = "auto"  # auto | jax_distributed | none (nccl/gloo = auto)
    c.ddp.timeout_s = 300  # how long each process waits for the job's coordinator at start

    c.data = ml_collections.ConfigDict()
    c.data.batch_size = 32  # global micro-batch (all devices together)
    c.data.context_size = 2048
    c.data.notes_per_record = 128
    c.data.eval_splits = "auto"  # "auto" = full_val + composer splits present, or a tuple of names
    # PIANO-task prompt layout (music/layouts.py): "annotated" (piano-gpt HEAD: N_NOTES and
    # MUSIC_TIME tokens announce the answer, <EOGENAI> ends it), "plain" ([dataset, composer] +
    # task tokens + source + <GENAI> + target, what reference f37ac14 checkpoints were trained
    # on), or "auto": annotated for fresh runs, and for init_from whatever the checkpoint's
    # vocabulary was made for. ("head" and "f37ac14" are the old names.)
    c.data.prompt_layout = "auto"

    c.dataset = ml_collections.ConfigDict()
    c.dataset.base_dataset_name = "epr-labs/maestro-sustain-v2"
    c.dataset.extra_datasets = ()
    c.dataset.pause_detection_threshold = 4.0
    c.dataset.augmentation = ml_collections.ConfigDict()
    c.dataset.augmentation.speed_change_factors = ()
    c.dataset.augmentation.max_pitch_shift = 0

    c.tokenizer = ml_collections.ConfigDict()
    c.tokenizer.time_unit = 0.01
    c.tokenizer.max_time_step = 1.0
    c.tokenizer.n_velocity_bins = 32
    c.tokenizer.n_special_ids = 2048  # the reference HEAD value; 1024 cannot hold all prefix tokens

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.gradient_accumulation_steps = 2  # global batch = batch_size x this
    c.optimizer.max_iters = 100_000  # optimizer updates
    c.optimizer.weight_decay = 0.1
    c.optimizer.grad_clip = 1.0
    c.optimizer.beta1 = 0.9
    c.optimizer.beta2 = 0.95

    c.lr = ml_collections.ConfigDict()
    c.lr.learning_rate = 3e-4
    c.lr.min_lr = 3e-5
    c.lr.warmup_iters = 1000
    c.lr.decay_lr = True
    # None = optimizer.max_iters. (Not a FieldReference to it: overriding one would move both.)
    c.lr.lr_decay_iters = ml_collections.FieldReference(None, field_type=int)

    c.eval_interval = 1000
    c.eval_iters = 50
    c.eval_only = False
    c.overwrite = False  # True: a new run moves an earlier run's outputs in out_dir aside
    c.nonfinite_patience = 10  # stop after this many consecutive updates with a NaN/inf loss
    c.eval_metrics = False  # eval_only: also generate and score PIANO-task metrics
    c.eval_examples = 16  # examples per split for eval_metrics

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.keep_last = 3
    c.checkpoint.export_torch = True  # write best.pt and final.pt in out_dir

    c.logging = ml_collections.ConfigDict()
    c.logging.wandb_log = False
    c.logging.wandb_project = "piano-gpt-jax"
    c.logging.wandb_entity = ml_collections.FieldReference(None, field_type=str)
    c.logging.log_interval = 20

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
    c.optimizer.weight_decay = 0.1
    c.lr.learning_rate = 1e-3
    c.lr.min_lr = 1e-4
    c.lr.warmup_iters = 40
    c.eval_interval = 200
    c.eval_iters = 8
    c.checkpoint.keep_last = 2
    c.logging.log_interval = 25
