"""A training run, from its start point to its exports (the CLI is piano_gpt_jax/train.py).

start.py resolves where a run starts and builds its model, data and state; loop.py runs the
updates, evaluations and checkpoints; saving.py writes checkpoints and PyTorch exports;
validation.py holds the validation losses and eval_only; processes.py the multi-process
start-up; errors.py the ways a run ends early.
"""
