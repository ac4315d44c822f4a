"""The train step: exact loss, gradient accumulation, precision policies, loss scaling."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from piano_gpt_jax.config import OptimSettings
from piano_gpt_jax.jitted_steps import (
    check_batch_divisible,
    compile_steps,
    init_train_state,
    make_eval_step,
    make_mesh,
    make_train_step,
    shard_batch,
    token_loss,
)
from piano_gpt_jax.model import ModelConfig, forward, init_params
from piano_gpt_jax.optim import make_optimizer
from piano_gpt_jax.precision import Precision

CFG = ModelConfig(vocab_size=48, n_layer=2, n_head=2, n_embd=32, context_size=32)
OPT = OptimSettings.of(gradient_accumulation_steps=1, max_iters=10, weight_decay=0.1, grad_clip=1.0,
                    beta1=0.9, beta2=0.95, learning_rate=1e-3, min_lr=1e-4, warmup_iters=2,
                    decay_lr=True, lr_decay_iters=10)


def make_batch(seed, batch=4, T=32, masked_prefix=5):
    rng = np.random.default_rng(seed)
    seq = rng.integers(1, CFG.vocab_size, (batch, T + 1)).astype(np.int32)
    mask = np.ones((batch, T), np.int32)
    mask[:, :masked_prefix] = 0
    return {"tokens": seq[:, :-1], "targets": seq[:, 1:], "loss_mask": mask}


def steps(cfg=CFG, opt=OPT, precision=None):
    precision = precision or Precision()
    tx = make_optimizer(opt)
    mesh = make_mesh()
    train, evaluate = compile_steps(make_train_step(cfg, tx, precision), make_eval_step(cfg), mesh)
    state = init_train_state(init_params(cfg, jax.random.PRNGKey(0)), tx, 0, precision)
    return train, evaluate, state, mesh


def test_loss_is_token_mean_cross_entropy_over_the_mask():
    params = init_params(CFG, jax.random.PRNGKey(1))
    b = make_batch(0)
    b["loss_mask"][1, 20:] = 0  # uneven counts per row: a token mean, not a row mean
    loss, n = token_loss(CFG, params, {k: jnp.asarray(v) for k, v in b.items()})
    logits = np.asarray(forward(CFG, params, b["tokens"]), np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, b["targets"][..., None], -1)[..., 0]
    m = b["loss_mask"].astype(bool)
    assert int(n) == m.sum()
    assert float(loss) == pytest.approx(nll[m].mean(), rel=1e-5)


def test_all_masked_micro_batch_gives_zero_loss_not_nan():
    train, _, state, mesh = steps()
    b = make_batch(0, masked_prefix=32)
    state, m = train(state, shard_batch(b, mesh))
    assert float(m["loss"]) == 0.0 and float(m["n_tokens"]) == 0.0
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(state))


def test_accumulating_two_halves_equals_one_full_batch():
    full = make_batch(3, batch=8)
    halves = [{k: v[:4] for k, v in full.items()}, {k: v[4:] for k, v in full.items()}]
    train1, _, s1, mesh = steps()
    train2, _, s2, _ = steps(opt=OPT.replace(gradient_accumulation_steps=2))
    for _ in range(3):  # three optimizer updates each
        s1, m1 = train1(s1, shard_batch(full, mesh))
        losses = []
        for h in halves:
            s2, m2 = train2(s2, shard_batch(h, mesh))
            losses.append(float(m2["loss"]))
        assert np.mean(losses) == pytest.approx(float(m1["loss"]), abs=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(s1["params"]),
                    jax.tree_util.tree_leaves(s2["params"]), strict=True):
        np.testing.assert_allclose(a, b, atol=2e-6)


def test_training_lowers_the_loss_and_eval_matches_loss():
    opt = OPT.replace(decay_lr=False, learning_rate=3e-3)
    train, evaluate, state, mesh = steps(opt=opt)
    b = shard_batch(make_batch(5), mesh)
    s, n = evaluate(state["params"], b)
    first = float(s) / float(n)
    for _ in range(20):
        state, m = train(state, b)
    s, n = evaluate(state["params"], b)
    assert float(s) / float(n) < first - 1.0  # memorises the batch
    assert int(state["micro_step"]) == 20


def test_dropout_is_a_function_of_the_micro_step():
    cfg = dataclasses.replace(CFG, dropout=0.2)
    train, _, state, mesh = steps(cfg)
    b = shard_batch(make_batch(2), mesh)
    copy = lambda: jax.tree_util.tree_map(jnp.copy, state)  # the step donates its input
    _, m1 = train(copy(), b)
    _, m2 = train(copy(), b)
    assert float(m1["loss"]) == float(m2["loss"])  # same state -> same dropout masks
    _, m3 = train({**copy(), "micro_step": jnp.int32(7)}, b)
    assert float(m3["loss"]) != float(m1["loss"])


def test_bfloat16_keeps_float32_master_params():
    cfg = dataclasses.replace(CFG, dtype="bfloat16")
    train, _, state, mesh = steps(cfg, precision=Precision("bfloat16"))
    b = shard_batch(make_batch(4), mesh)
    state, m = train(state, b)
    assert {x.dtype for x in jax.tree_util.tree_leaves(state["params"])} == {np.dtype("float32")}
    ref_loss, _ = token_loss(CFG, init_params(CFG, jax.random.PRNGKey(0)), b)
    # The loss really was computed in bfloat16: off the float32 loss by bfloat16 rounding of
    # logits of size ~0.1 (unit roundoff 2^-8: ~4e-4 per logit, less on the mean), yet more than
    # float32's own reordering noise (~1e-7 at a loss of ~3.9).
    diff = abs(float(m["loss"]) - float(ref_loss))
    assert 1e-6 < diff < 1e-3, diff


def test_float16_overflow_skips_steps_lowers_scale_keeps_params_finite():
    cfg = dataclasses.replace(CFG, dtype="float16")
    precision = Precision("float16", init_scale=2.0**40, growth_interval=3)
    train, _, state, mesh = steps(cfg, precision=precision)
    params0 = jax.tree_util.tree_map(np.array, state["params"])
    b = shard_batch(make_batch(6), mesh)
    finite, scales = [], []
    for _ in range(40):
        state, m = train(state, b)
        finite.append(bool(m["grads_finite"]))
        scales.append(float(m["loss_scale"]))
        assert all(np.isfinite(np.asarray(x)).all()
                   for x in jax.tree_util.tree_leaves(state["params"]))
    first_good = finite.index(True)
    assert first_good > 5 and not any(finite[:first_good])  # the forced overflows were skipped
    assert scales[first_good - 1] < 2.0**40 / 2**5  # and lowered the scale each time
    # skipped steps leave params untouched; the good ones train
    assert int(state["opt_state"].gradient_step) == sum(finite)
    assert any(not np.array_equal(a, b0) for a, b0 in zip(
        jax.tree_util.tree_leaves(state["params"]), jax.tree_util.tree_leaves(params0),
        strict=True))
    assert max(scales[first_good:]) > scales[first_good]  # grows again after good steps


def test_float16_skipped_step_leaves_params_bit_identical():
    cfg = dataclasses.replace(CFG, dtype="float16")
    train, _, state, mesh = steps(cfg, precision=Precision("float16", init_scale=2.0**60))
    before = jax.tree_util.tree_map(np.array, state["params"])
    state, m = train(state, shard_batch(make_batch(7), mesh))
    assert not bool(m["grads_finite"]) and float(m["loss_scale"]) == 2.0**59
    for a, b in zip(jax.tree_util.tree_leaves(state["params"]), jax.tree_util.tree_leaves(before),
                    strict=True):
        np.testing.assert_array_equal(a, b)


def test_batch_must_divide_over_devices():
    mesh = make_mesh(jax.devices()[:1])
    check_batch_divisible(3, mesh)
    with pytest.raises(ValueError, match="divisible"):
        check_batch_divisible(3, make_mesh(jax.devices()[:1] * 2))


def test_without_jit_gives_the_same_step():
    """system.compile=False runs the same pure function eagerly (for debugging)."""
    tx = make_optimizer(OPT)
    mesh = make_mesh()
    fns = [compile_steps(make_train_step(CFG, tx, Precision()), make_eval_step(CFG), mesh,
                         use_jit=j)[0] for j in (True, False)]
    b = shard_batch(make_batch(8), mesh)
    losses = []
    for fn in fns:
        state = init_train_state(init_params(CFG, jax.random.PRNGKey(0)), tx, 0, Precision())
        for _ in range(2):
            state, m = fn(state, b)
        losses.append(float(m["loss"]))
    assert losses[1] == pytest.approx(losses[0], abs=1e-5)


@pytest.mark.parametrize("clipped", [False, True])
def test_float16_gradients_are_unscaled_before_clipping_and_adam(clipped):
    """One float16 step (loss scale 2**10) and one float32 step from the same start give the
    same Adam first moment within float16 rounding. Gradients left scaled would be 1024x larger
    without clipping, and with a clip threshold above the true gradient norm they would be cut
    down to it: both far outside the tolerance."""
    from piano_gpt_jax.optim import adam_state

    params = init_params(CFG, jax.random.PRNGKey(0))
    batch = {k: jnp.asarray(v) for k, v in make_batch(3).items()}
    grads = jax.grad(lambda p: token_loss(CFG, p, batch)[0])(params)
    norm = float(optax_global_norm(grads))
    opt = OPT.replace(grad_clip=2.0 * norm if clipped else 0.0)
    mus = []
    for dtype, precision in (("float32", Precision()),
                             ("float16", Precision("float16", init_scale=2.0**10))):
        train, _, state, mesh = steps(dataclasses.replace(CFG, dtype=dtype), opt, precision)
        state, metrics = train(state, shard_batch(make_batch(3), mesh))
        assert bool(metrics["grads_finite"])
        mu = adam_state(jax.device_get(state["opt_state"]))[0].mu
        mus.append(np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(mu)]))
    mu32, mu16 = mus
    scale = np.abs(mu32).max()
    assert scale > 0
    np.testing.assert_allclose(mu16, mu32, atol=2e-2 * scale)


def optax_global_norm(tree):
    import optax

    return optax.global_norm(tree)
