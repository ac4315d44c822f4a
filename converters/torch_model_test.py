"""Equivalence of the Flax GPT and its PyTorch twin: logits, loss, gradients, an AdamW step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from converters.testing import randomize, tiny_config
from converters.torch_model import TorchGPT, masked_cross_entropy
from piano_gpt_jax.checkpoints.state_dict import expected_state_dict_shapes
from piano_gpt_jax.checkpoints.torch_format import params_to_state_dict, state_dict_to_params
from piano_gpt_jax.model import ModelConfig, count_params, forward, init_params

VARIANTS = [(False, False), (True, False), (False, True), (True, True)]
IDS = ["nobias", "bias", "nobias-time", "bias-time"]


def _batch(cfg: ModelConfig, seed: int = 1, B: int = 3):
    g = torch.Generator().manual_seed(seed)
    T = cfg.context_size
    idx = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
    targets = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.3
    steps = torch.randint(-5, 12_000, (B, T), generator=g) if cfg.use_time_embedding else None
    return idx, steps, targets, mask


_forward = jax.jit(forward, static_argnums=0)


def _jax_loss(cfg, params, idx, steps, targets, mask):
    logits = forward(cfg, params, idx, steps)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return jnp.sum(ce * mask) / jnp.sum(mask)


def _at(tree, path):
    for k in path:
        tree = tree[k.key]
    return tree


def _j(t):
    return None if t is None else jnp.asarray(t.numpy())


@pytest.mark.parametrize("bias,time", VARIANTS, ids=IDS)
def test_logits_match_torch_to_jax(bias, time):
    cfg = tiny_config(bias, time)
    model = randomize(TorchGPT(cfg)).eval()
    idx, steps, _, _ = _batch(cfg)
    with torch.no_grad():
        ref = model(idx, steps).numpy()
    params = state_dict_to_params(cfg, model.state_dict())
    ours = np.asarray(_forward(cfg, params, _j(idx), _j(steps)))
    assert ref.std() > 1.0  # logits of order one: the comparison below is meaningful
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("bias,time", VARIANTS, ids=IDS)
def test_logits_match_jax_to_torch(bias, time):
    cfg = tiny_config(bias, time)
    # Order-one weights in the Flax tree (LayerNorm gains around one).
    rng = np.random.default_rng(4)
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: (0.3 * rng.standard_normal(x.shape)
                         + (jax.tree_util.keystr(path).endswith("['scale']"))).astype(np.float32),
        jax.eval_shape(lambda: init_params(cfg, jax.random.key(0))))
    model = TorchGPT(cfg).eval()
    model.load_state_dict(params_to_state_dict(cfg, params), strict=True)
    idx, steps, _, _ = _batch(cfg, seed=2)
    with torch.no_grad():
        ref = model(idx, steps).numpy()
    ours = np.asarray(_forward(cfg, params, _j(idx), _j(steps)))
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("bias,time", [VARIANTS[0], VARIANTS[3]], ids=[IDS[0], IDS[3]])
def test_loss_grads_and_adamw_step_match(bias, time):
    cfg = tiny_config(bias, time)
    model = randomize(TorchGPT(cfg)).train()
    params = jax.tree_util.tree_map(jnp.asarray, state_dict_to_params(cfg, model.state_dict()))
    idx, steps, targets, mask = _batch(cfg)

    loss_t = masked_cross_entropy(model(idx, steps), targets, mask)
    loss_t.backward()
    loss_j, grads = jax.jit(jax.value_and_grad(_jax_loss, argnums=1), static_argnums=0)(
        cfg, params, _j(idx), _j(steps), _j(targets), _j(mask))
    np.testing.assert_allclose(float(loss_j), loss_t.item(), rtol=1e-6)

    torch_grads = state_dict_to_params(cfg, {n: p.grad for n, p in model.named_parameters()})
    flat_t = dict(jax.tree_util.tree_leaves_with_path(torch_grads))
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        ref = flat_t[path]
        err = np.abs(np.asarray(g) - ref).max() / max(np.abs(ref).max(), 1e-12)
        assert err < 1e-5, (jax.tree_util.keystr(path), err)

    # The reference's learning rate. On Adam's first step an element whose gradient is ~eps (here
    # 3e-7, a float32 cancellation whose last bits depend on summation order) moves by
    # lr*g/(|g|+eps); a 4% difference in such a tiny g shifts it by ~1e-3*lr, so lr 1e-2 would
    # show ~1e-5 from rounding alone.
    lr, wd, betas, eps = 6e-4, 0.1, (0.9, 0.95), 1e-8
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": wd},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=betas, eps=eps)
    opt.step()
    tx = optax.adamw(lr, b1=betas[0], b2=betas[1], eps=eps, weight_decay=wd,
                     mask=jax.tree_util.tree_map(lambda p: p.ndim >= 2, params))
    new_params = jax.jit(lambda g, p: optax.apply_updates(p, tx.update(g, tx.init(p), p)[0]))(
        grads, params)
    stepped = state_dict_to_params(cfg, model.state_dict())
    moved = 0.0
    for (path, p_new), p_old in zip(jax.tree_util.tree_leaves_with_path(new_params),
                                    jax.tree_util.tree_leaves(params), strict=True):
        ref = dict(jax.tree_util.tree_leaves_with_path(stepped))[path]
        name = jax.tree_util.keystr(path)
        p_new = np.asarray(p_new)
        if name.endswith("['c_attn']['bias']"):
            # The key bias adds q.b_k to every score of a row, which softmax ignores: its true
            # gradient is 0 and both frameworks return rounding noise (~1e-9), which Adam scales
            # to +-lr. Check that it is noise, and compare the q and v parts.
            C = cfg.n_embd
            g_k = np.asarray(_at(grads, path))[C:2 * C]
            assert np.abs(g_k).max() < 1e-6 * np.abs(np.asarray(_at(grads, path))).max()
            keep = np.r_[0:C, 2 * C:3 * C]
            p_new, ref = p_new[keep], ref[keep]
        np.testing.assert_allclose(p_new, ref, rtol=0, atol=1e-5, err_msg=name)
        if p_new.ndim == 2:
            moved = max(moved, float(np.abs(p_new - np.asarray(p_old)).max()))
    assert moved > 5e-4  # the step really moved the weights (by about lr)


@pytest.mark.parametrize("bias,time", VARIANTS, ids=IDS)
def test_torch_jax_torch_round_trip_is_bit_identical(bias, time):
    cfg = tiny_config(bias, time)
    sd = randomize(TorchGPT(cfg)).state_dict()
    back = params_to_state_dict(cfg, state_dict_to_params(cfg, sd))
    assert list(back) == list(sd)  # same keys, same (reference) order
    for k in sd:
        assert back[k].dtype == torch.float32 and torch.equal(back[k], sd[k]), k


@pytest.mark.parametrize("bias,time", VARIANTS, ids=IDS)
def test_state_dict_names_shapes_and_counts(bias, time):
    cfg = tiny_config(bias, time)
    model = TorchGPT(cfg)
    sd = model.state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected_state_dict_shapes(cfg)
    assert sd["lm_head.weight"].data_ptr() == sd["transformer.wte.weight"].data_ptr()
    params = init_params(cfg, jax.random.key(0))
    assert count_params(params, include_position=False) == model.get_num_params()
    assert count_params(params) == sum(p.numel() for p in model.parameters())


def test_twin_init_statistics():
    cfg = tiny_config(n_layer=4, n_embd=64, n_head=4, vocab_size=500, context_size=64)
    torch.manual_seed(0)
    model = TorchGPT(cfg)
    sd = model.state_dict()
    assert abs(sd["transformer.h.0.mlp.c_fc.weight"].std().item() - 0.02) < 2e-3
    assert abs(sd["transformer.h.0.mlp.c_proj.weight"].std().item() - 0.02 / 8 ** 0.5) < 1e-3
    assert torch.equal(sd["transformer.ln_f.weight"], torch.ones(64))


def test_loss_ignores_masked_targets_without_mutating_them():
    cfg = tiny_config()
    logits = torch.randn(2, 5, cfg.vocab_size)
    targets = torch.randint(0, cfg.vocab_size, (2, 5))
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[0, 1] = True
    before = targets.clone()
    loss = masked_cross_entropy(logits, targets, mask)
    expected = torch.nn.functional.cross_entropy(logits[0, 1][None], targets[0, 1][None])
    assert torch.allclose(loss, expected) and torch.equal(targets, before)
