"""Learning-rate schedule and the optax chain (clip -> AdamW, accumulated over micro-batches).

The schedule reproduces the reference's CosineDecay exactly, including its 1-based iteration
counter: the first optimizer update uses `learning_rate / warmup_iters`, not 0.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from piano_gpt_jax.config import OptimSettings


@dataclasses.dataclass(frozen=True)
class AdamWSettings:
    """AdamW's hyper-parameters, read from the config in one place: the optimizer, the
    checkpoint writers (`.pt` param groups, a restored AdamState) and init_optimizer's
    comparison with a file's own all take them from here."""

    b1: float
    b2: float
    eps: float
    weight_decay: float

    @classmethod
    def of(cls, s: OptimSettings) -> AdamWSettings:
        o = s.optimizer
        return cls(b1=o.beta1, b2=o.beta2, eps=o.eps, weight_decay=o.weight_decay)

    def as_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


def make_schedule(s: OptimSettings) -> optax.Schedule:
    """optax schedule of the 0-based update count; update `count` is reference iteration
    count + 1. This is the schedule that runs, and the one the logs show (`lr_at`); the
    reference's Python formula is the tests' oracle for it (optim_test.py)."""
    lr_cfg = s.lr
    if not lr_cfg.decay_lr:
        return optax.constant_schedule(lr_cfg.learning_rate)
    lr, min_lr = lr_cfg.learning_rate, lr_cfg.min_lr
    warmup, decay = float(lr_cfg.warmup_iters), float(lr_cfg.lr_decay_iters)
    span = max(decay - warmup, 1.0)  # warmup == decay: no cosine (the reference divides by 0)

    def schedule(count):
        it = jnp.asarray(count, jnp.float32) + 1.0
        warm = lr * it / max(warmup, 1.0)
        ratio = jnp.clip((it - warmup) / span, 0.0, 1.0)
        cosine = min_lr + 0.5 * (1.0 + jnp.cos(jnp.pi * ratio)) * (lr - min_lr)
        return jnp.where(it < warmup, warm, jnp.where(it > decay, min_lr, cosine))

    return schedule


def lr_at(s: OptimSettings, step: int) -> float:
    """The learning rate of update `step` (1-based; 0 reads as 1): what the logs report."""
    return float(make_schedule(s)(max(int(step), 1) - 1))


def decay_mask(params) -> dict:
    """Weight decay only on matrices (embeddings included), as the reference's param groups do."""
    return jax.tree_util.tree_map(lambda p: p.ndim >= 2, params)


def make_optimizer(s: OptimSettings) -> optax.GradientTransformation:
    """clip_by_global_norm (when grad_clip > 0) -> AdamW, wrapped in MultiSteps.

    One `update` call consumes one micro-batch's gradients; the inner chain runs once every
    `gradient_accumulation_steps` calls, on the mean of the accumulated gradients.
    """
    o = s.optimizer
    parts = []
    if o.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(o.grad_clip))
    parts.append(optax.adamw(learning_rate=make_schedule(s), mask=decay_mask,
                             **AdamWSettings.of(s).as_dict()))
    return optax.MultiSteps(optax.chain(*parts), every_k_schedule=o.gradient_accumulation_steps)


def adam_state(opt_state) -> tuple[optax.ScaleByAdamState, jax.Array]:
    """(Adam moments and bias-correction count, schedule position) inside our optimizer state.

    The schedule position counts updates applied (reference iteration - 1 of the next update);
    it equals the Adam count unless float16 skipped steps.
    """
    found: dict[str, object] = {}

    def visit(node) -> None:
        if isinstance(node, optax.ScaleByAdamState):
            found["adam"] = node
        elif isinstance(node, optax.ScaleByScheduleState):
            found["schedule"] = node.count
        elif isinstance(node, optax.MultiStepsState):
            visit(node.inner_opt_state)
        elif isinstance(node, tuple):
            for child in node:
                visit(child)

    visit(opt_state)
    if "adam" not in found or "schedule" not in found:
        raise ValueError("the optimizer state holds no AdamW moments and schedule count")
    return found["adam"], found["schedule"]


def with_adam_state(opt_state, count: int, mu, nu, updates_done: int):
    """`opt_state` continuing someone else's AdamW: moments `mu`/`nu`, bias-correction `count`,
    and the schedule (and MultiSteps) at `updates_done` updates. Accumulated gradients stay
    zero: a checkpoint is only ever taken between updates."""

    def rebuild(node):
        if isinstance(node, optax.ScaleByAdamState):
            as_like = lambda new, old: jax.tree_util.tree_map(
                lambda n, o: jnp.asarray(n, o.dtype).reshape(o.shape), new, old)
            return node._replace(count=jnp.asarray(count, node.count.dtype),
                                 mu=as_like(mu, node.mu), nu=as_like(nu, node.nu))
        if isinstance(node, optax.ScaleByScheduleState):
            return node._replace(count=jnp.asarray(updates_done, node.count.dtype))
        if isinstance(node, optax.MultiStepsState):
            return node._replace(
                gradient_step=jnp.asarray(updates_done, node.gradient_step.dtype),
                inner_opt_state=rebuild(node.inner_opt_state))
        if isinstance(node, tuple) and not hasattr(node, "_fields"):
            return tuple(rebuild(child) for child in node)
        return node

    return rebuild(opt_state)


def schedule_lr(s: OptimSettings, updates_done: int) -> float:
    """The learning rate the schedule gave the last of `updates_done` updates (the first
    update's for 0): what torch's AdamW param groups hold after that update."""
    return lr_at(s, updates_done)
