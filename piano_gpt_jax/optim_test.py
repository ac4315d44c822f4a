"""The schedule is the reference's CosineDecay; weight decay touches only matrices."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from piano_gpt_jax.config import OptimSettings, build_train_config
from piano_gpt_jax.model import ModelConfig, init_params
from piano_gpt_jax.optim import adam_state, decay_mask, lr_at, make_optimizer, make_schedule

BASE = OptimSettings.of(gradient_accumulation_steps=1, max_iters=300, weight_decay=0.1,
                        grad_clip=1.0, beta1=0.9, beta2=0.95, learning_rate=8e-5, min_lr=8e-6,
                        warmup_iters=100, decay_lr=True, lr_decay_iters=250)


def reference_formula(it, lr, min_lr, warmup, decay):
    """The reference's CosineDecayLRScheduler.get_lr, transcribed from its description: the
    oracle of the schedule that runs (and that the logs show, through lr_at)."""
    if it < warmup:
        return lr * it / warmup
    if it > decay:
        return min_lr
    r = (it - warmup) / (decay - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * r)) * (lr - min_lr)


@pytest.mark.parametrize("warmup,decay", [(100, 250), (1, 300), (0, 50), (10, 11)])
def test_schedule_matches_reference_formula(warmup, decay):
    s = BASE.replace(warmup_iters=warmup, lr_decay_iters=decay)
    sched = jax.jit(make_schedule(s))
    for count in range(0, 320):
        it = count + 1  # optax counts updates from 0; the reference's iterations start at 1
        want = reference_formula(it, s.lr.learning_rate, s.lr.min_lr, warmup, decay)
        assert float(sched(count)) == pytest.approx(want, rel=2e-6)
        assert lr_at(s, it) == pytest.approx(want, rel=2e-6)  # what the logs show


def test_schedule_landmarks():
    sched = make_schedule(BASE)
    assert float(sched(0)) == pytest.approx(8e-7)  # first update: lr / warmup, not 0
    assert float(sched(99)) == pytest.approx(8e-5)  # it == warmup: the peak
    assert float(sched(249)) == pytest.approx(8e-6)  # it == decay: min_lr
    assert float(sched(5000)) == pytest.approx(8e-6)


def test_warmup_equal_to_decay_does_not_divide_by_zero():
    s = BASE.replace(warmup_iters=50, lr_decay_iters=50)
    assert lr_at(s, 50) == pytest.approx(8e-5) and lr_at(s, 51) == pytest.approx(8e-6)
    assert float(make_schedule(s)(49)) == pytest.approx(8e-5)


def test_constant_when_decay_off():
    s = BASE.replace(decay_lr=False)
    assert all(float(make_schedule(s)(c)) == pytest.approx(8e-5) for c in (0, 10, 10_000))
    assert lr_at(s, 1) == pytest.approx(8e-5)


def test_decay_mask_is_matrices_only():
    cfg = ModelConfig(vocab_size=40, n_layer=1, n_head=2, n_embd=16, context_size=8, bias=True)
    mask = decay_mask(init_params(cfg, jax.random.PRNGKey(0)))
    assert mask["wte"] and mask["wpe"] and mask["h_0"]["attn"]["c_attn"]["kernel"]
    assert not mask["h_0"]["attn"]["c_attn"]["bias"] and not mask["ln_f"]["scale"]


def test_adamw_update_matches_hand_computation():
    """One update: clip, Adam with bias correction, decoupled decay on matrices only."""
    s = BASE.replace(warmup_iters=0, decay_lr=False, grad_clip=0.5)
    params = {"w": jnp.ones((2, 2)), "b": jnp.ones((2,))}
    grads = {"w": jnp.full((2, 2), 3.0), "b": jnp.full((2,), 4.0)}
    tx = make_optimizer(s)
    updates, _ = tx.update(grads, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    # Adam's first step moves by lr*sign(g) whatever the gradient's scale (the clip cannot show
    # here; see the moment test below), plus decoupled decay lr*wd*w on the matrix only.
    lr = s.lr.learning_rate
    np.testing.assert_allclose(new["w"], 1 - lr - lr * 0.1, rtol=1e-6)
    np.testing.assert_allclose(new["b"], 1 - lr, rtol=1e-6)


@pytest.mark.parametrize("grad_clip,factor", [
    (0.5, 0.5 / math.sqrt(68.0)),  # global norm sqrt(4*3^2 + 2*4^2) = sqrt(68) > 0.5: scaled
    (100.0, 1.0),  # norm below the threshold: untouched
    (0.0, 1.0),  # 0 switches clipping off
], ids=["clipped", "below-threshold", "off"])
def test_grad_clip_scales_what_adam_accumulates(grad_clip, factor):
    """optimizer.grad_clip, seen where it matters: Adam's moments hold the clipped gradient,
    mu = (1 - beta1) g_clipped and nu = (1 - beta2) g_clipped^2 after one update."""
    s = build_train_config({"optimizer": {"grad_clip": grad_clip}}).optim  # the config key
    params = {"w": jnp.ones((2, 2)), "b": jnp.ones((2,))}
    grads = {"w": jnp.full((2, 2), 3.0), "b": jnp.full((2,), 4.0)}
    tx = make_optimizer(s)
    _, state = tx.update(grads, tx.init(params), params)
    adam, updates_done = adam_state(state)
    assert int(adam.count) == 1 and int(updates_done) == 1
    b1, b2 = s.optimizer.beta1, s.optimizer.beta2
    for k, g in (("w", 3.0), ("b", 4.0)):
        np.testing.assert_allclose(adam.mu[k], (1 - b1) * g * factor, rtol=1e-6)
        np.testing.assert_allclose(adam.nu[k], (1 - b2) * (g * factor) ** 2, rtol=1e-6)


def test_multisteps_applies_every_k_micro_steps():
    s = BASE.replace(gradient_accumulation_steps=3, decay_lr=False)
    params = {"w": jnp.ones((2, 2))}
    tx = make_optimizer(s)
    state = tx.init(params)
    moved = []
    for _ in range(6):
        updates, state = tx.update({"w": jnp.ones((2, 2))}, state, params)
        moved.append(bool(jnp.any(updates["w"] != 0)))
        params = optax.apply_updates(params, updates)
    assert moved == [False, False, True, False, False, True]
