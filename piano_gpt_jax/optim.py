"""Learning-rate schedule and the optax chain (clip -> AdamW, accumulated over micro-batches).

The schedule reproduces the reference's CosineDecay exactly, including its 1-based iteration
counter: the first optimizer update uses `learning_rate / warmup_iters`, not 0.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from piano_gpt_jax.config import OptimSettings


def reference_lr(it: int, s: OptimSettings) -> float:
    """The reference formula for 1-based iteration `it`, in plain Python (for logs and tests)."""
    if not s.decay_lr:
        return s.learning_rate
    if it < s.warmup_iters:
        return s.learning_rate * it / s.warmup_iters
    if it > s.lr_decay_iters:
        return s.min_lr
    span = s.lr_decay_iters - s.warmup_iters
    ratio = 0.0 if span <= 0 else (it - s.warmup_iters) / span  # warmup == decay: no cosine
    return s.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (s.learning_rate - s.min_lr)


def make_schedule(s: OptimSettings) -> optax.Schedule:
    """optax schedule of the 0-based update count; update `count` is reference iteration count+1."""
    if not s.decay_lr:
        return optax.constant_schedule(s.learning_rate)
    lr, min_lr = s.learning_rate, s.min_lr
    warmup, decay = float(s.warmup_iters), float(s.lr_decay_iters)
    span = max(decay - warmup, 1.0)

    def schedule(count):
        it = jnp.asarray(count, jnp.float32) + 1.0
        warm = lr * it / max(warmup, 1.0)
        ratio = jnp.clip((it - warmup) / span, 0.0, 1.0)
        cosine = min_lr + 0.5 * (1.0 + jnp.cos(jnp.pi * ratio)) * (lr - min_lr)
        return jnp.where(it < warmup, warm, jnp.where(it > decay, min_lr, cosine))

    return schedule


def decay_mask(params) -> dict:
    """Weight decay only on matrices (embeddings included), as the reference's param groups do."""
    return jax.tree_util.tree_map(lambda p: p.ndim >= 2, params)


def make_optimizer(s: OptimSettings) -> optax.GradientTransformation:
    """clip_by_global_norm (when grad_clip > 0) -> AdamW, wrapped in MultiSteps.

    One `update` call consumes one micro-batch's gradients; the inner chain runs once every
    `gradient_accumulation_steps` calls, on the mean of the accumulated gradients.
    """
    parts = []
    if s.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(s.grad_clip))
    parts.append(optax.adamw(learning_rate=make_schedule(s), b1=s.beta1, b2=s.beta2, eps=1e-8,
                             weight_decay=s.weight_decay, mask=decay_mask))
    return optax.MultiSteps(optax.chain(*parts), every_k_schedule=s.gradient_accumulation_steps)
