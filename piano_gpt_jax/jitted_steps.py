"""Loss, the pure train/eval steps, data-parallel sharding and precision policies.

One train-step call consumes one micro-batch; `optax.MultiSteps` (see optim.py) turns every
`gradient_accumulation_steps` calls into one optimizer update, so the global batch is
batch_size x accumulation steps on any number of devices. The batch is split over every device of
every process; params and optimizer state are replicated or FSDP-sharded (sharding.py), and XLA
inserts the collectives.

float16 (precision.py): gradients of a loss multiplied by a dynamic scale; a micro-batch with
non-finite gradients is skipped (params and optimizer state unchanged, scale halved), so with
gradient accumulation the next optimizer update is delayed by one micro-batch.

State is a plain dict pytree (checkpointable as is):
  params, opt_state, micro_step (int32, micro-batches consumed), rng (uint32[2] base key),
  loss_scale {scale (f32), good_steps (int32)} (dynamic loss scaling; inert unless float16).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from piano_gpt_jax.model import GPT, ModelConfig
from piano_gpt_jax.precision import Precision
from piano_gpt_jax.sharding import (  # noqa: F401 — re-exported: the step's layout helpers
    DATA_AXIS,
    batch_sharding,
    check_batch_divisible,
    make_mesh,
    place,
    replicate,
    shard_batch,
    tree_shardings,
)


def token_loss(model_cfg: ModelConfig, params, batch: Mapping[str, jax.Array],
               dropout_rng: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """(token-mean cross-entropy over loss_mask, number of counted tokens).

    An all-masked micro-batch gives loss 0 and zero gradients instead of the reference's NaN.
    """
    deterministic = dropout_rng is None or model_cfg.dropout == 0.0
    rngs = None if deterministic else {"dropout": dropout_rng}
    logits_BxTxV = GPT(model_cfg).apply(
        {"params": params}, batch["tokens"], batch.get("time_steps"),
        deterministic=deterministic, rngs=rngs)
    # logsumexp minus the target logit rather than gathering from a full log_softmax: the same
    # value, but XLA CPU no longer materialises log-probabilities and their backward, which
    # halved the tied head plus loss (benchmarks/README.md, "CPU train step, per change").
    logits_BxTxV = logits_BxTxV.astype(jnp.float32)
    target_BxT = jnp.take_along_axis(logits_BxTxV, batch["targets"][..., None], axis=-1)[..., 0]
    nll_BxT = jax.nn.logsumexp(logits_BxTxV, axis=-1) - target_BxT
    mask_BxT = batch["loss_mask"].astype(jnp.float32)
    n_tokens = mask_BxT.sum()
    loss = (nll_BxT * mask_BxT).sum() / jnp.maximum(n_tokens, 1.0)
    return loss, n_tokens


def init_train_state(params, tx: optax.GradientTransformation, seed: int,
                     precision: Precision) -> dict:
    return {
        "params": params,
        "opt_state": tx.init(params),
        "micro_step": jnp.zeros((), jnp.int32),
        "rng": jax.random.PRNGKey(seed + 1),  # +1: not the key that initialised the params
        "loss_scale": {"scale": jnp.asarray(precision.init_scale if precision.loss_scaling
                                            else 1.0, jnp.float32),
                       "good_steps": jnp.zeros((), jnp.int32)},
    }


def _all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)]
    return jnp.stack(leaves).all()


def make_train_step(model_cfg: ModelConfig, tx: optax.GradientTransformation,
                    precision: Precision) -> Callable[[dict, dict], tuple[dict, dict]]:
    """A pure step(state, batch) -> (state, metrics) over one micro-batch."""

    def step(state: dict, batch: dict) -> tuple[dict, dict]:
        dropout_rng = jax.random.fold_in(state["rng"], state["micro_step"])
        scale = state["loss_scale"]["scale"]

        def scaled_loss(params):
            loss, n_tokens = token_loss(model_cfg, params, batch, dropout_rng)
            return loss * scale, (loss, n_tokens)

        grads, (loss, n_tokens) = jax.grad(scaled_loss, has_aux=True)(state["params"])
        grads = jax.tree_util.tree_map(lambda g: g.astype(jnp.float32) / scale, grads)
        updates, new_opt_state = tx.update(grads, state["opt_state"], state["params"])
        new_params = optax.apply_updates(state["params"], updates)
        new_state = {**state, "params": new_params, "opt_state": new_opt_state,
                     "micro_step": state["micro_step"] + 1}

        finite = jnp.asarray(True)
        if precision.loss_scaling:
            finite = _all_finite(grads)
            keep = lambda new, old: jax.tree_util.tree_map(
                lambda a, b: jnp.where(finite, a, b), new, old)
            new_state["params"] = keep(new_params, state["params"])
            new_state["opt_state"] = keep(new_opt_state, state["opt_state"])
            good = jnp.where(finite, state["loss_scale"]["good_steps"] + 1, 0)
            grow = good >= precision.growth_interval
            new_scale = jnp.where(finite, jnp.where(grow, scale * 2.0, scale),
                                  jnp.maximum(scale * precision.backoff, 1.0))
            new_state["loss_scale"] = {"scale": new_scale,
                                       "good_steps": jnp.where(grow, 0, good).astype(jnp.int32)}
        metrics = {"loss": loss, "n_tokens": n_tokens, "grads_finite": finite,
                   "loss_scale": new_state["loss_scale"]["scale"]}
        return new_state, metrics

    return step


def make_eval_step(model_cfg: ModelConfig) -> Callable[[dict, dict], tuple[jax.Array, jax.Array]]:
    """eval(params, batch) -> (NLL summed over loss_mask, token count): token means per split."""

    def evaluate(params, batch):
        loss, n_tokens = token_loss(model_cfg, params, batch)
        return loss * n_tokens, n_tokens

    return evaluate


def compile_steps(train_fn, eval_fn, mesh: Mesh, use_jit: bool = True, state_like=None):
    """Wrap both steps with jit and their shardings (or leave them eager when `use_jit` is
    False). `state_like` (arrays or shapes) gives the train state's layout (sharding.py);
    without it everything is replicated."""
    if not use_jit:
        return train_fn, eval_fn
    repl = NamedSharding(mesh, PartitionSpec())
    data = batch_sharding(mesh)
    state_sh = repl if state_like is None else tree_shardings(state_like, mesh)
    params_sh = repl if state_like is None else tree_shardings(state_like["params"], mesh)
    train = train_fn and jax.jit(train_fn, in_shardings=(state_sh, data),
                                 out_shardings=(state_sh, repl), donate_argnums=0)
    evaluate = jax.jit(eval_fn, in_shardings=(params_sh, data), out_shardings=(repl, repl))
    return train, evaluate
