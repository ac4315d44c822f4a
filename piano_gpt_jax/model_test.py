"""The Flax GPT on its own: sizes, init, causality, time embedding, cached decoding, dtypes."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from piano_gpt_jax.model import (
    ModelConfig,
    count_params,
    forward,
    forward_cached,
    init_cache,
    init_params,
)

TINY = ModelConfig(vocab_size=50, n_layer=2, n_head=2, n_embd=16, context_size=12,
                   use_time_embedding=True)
_fwd = jax.jit(forward, static_argnums=0)


def _param_count(cfg: ModelConfig) -> int:
    shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    return count_params(shapes, include_position=False)


@pytest.mark.parametrize("layers,heads,width,vocab,time,expected", [
    (12, 8, 256, 1241, False, "9.76"),    # gpt2_10M at f37ac14 (millions, as the reference)
    (12, 8, 256, 2265, True, "12.58"),    # gpt2_10M at HEAD (time embedding, 2048 specials)
    (24, 16, 1024, 1241, False, "303.3"),  # gpt2_medium
    (24, 16, 1024, 2265, True, "314.6"),   # gpt2_medium at HEAD
])
def test_parameter_counts_match_reference(layers, heads, width, vocab, time, expected):
    cfg = ModelConfig(vocab_size=vocab, n_layer=layers, n_head=heads, n_embd=width,
                      context_size=1024, use_time_embedding=time)
    n = _param_count(cfg)
    assert n == layers * (12 * width**2 + 2 * width) + vocab * width + width + 10_000 * width * time
    decimals = len(expected.split(".")[1])
    assert f"{n / 1e6:.{decimals}f}" == expected


def test_init_statistics():
    cfg = ModelConfig(vocab_size=300, n_layer=4, n_head=4, n_embd=64, context_size=64)
    p = init_params(cfg, jax.random.key(0))
    assert abs(float(p["wte"].std()) - 0.02) < 2e-3
    assert abs(float(p["h_0"]["mlp"]["c_fc"]["kernel"].std()) - 0.02) < 2e-3
    assert abs(float(p["h_0"]["mlp"]["c_proj"]["kernel"].std()) - 0.02 / 8**0.5) < 1e-3
    assert abs(float(p["h_3"]["attn"]["c_proj"]["kernel"].std()) - 0.02 / 8**0.5) < 1e-3
    assert np.array_equal(p["ln_f"]["scale"], np.ones(64)) and "bias" not in p["ln_f"]
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(p))


def test_causal_and_time_steps_clipped():
    p = init_params(TINY, jax.random.key(1))
    tokens = jax.random.randint(jax.random.key(2), (2, 12), 0, 50)
    steps = jnp.tile(jnp.arange(12) * 7, (2, 1))
    base = _fwd(TINY, p, tokens, steps)
    changed = _fwd(TINY, p, tokens.at[:, 8:].set(3), steps.at[:, 8:].set(0))
    np.testing.assert_array_equal(base[:, :8], changed[:, :8])
    assert not np.allclose(base[:, 8:], changed[:, 8:])
    big = _fwd(TINY, p, tokens, steps.at[:, 5].set(20_000))
    top = _fwd(TINY, p, tokens, steps.at[:, 5].set(9_999))
    low = _fwd(TINY, p, tokens, steps.at[:, 5].set(-4))
    zero = _fwd(TINY, p, tokens, steps.at[:, 5].set(0))
    np.testing.assert_array_equal(big, top)
    np.testing.assert_array_equal(low, zero)
    with pytest.raises(ValueError, match="time_steps"):
        forward(TINY, p, tokens)


def test_one_hot_embedding_equals_the_gather():
    """model.one_hot_embedding: the token lookup as a one-hot matmul gives the gather's logits and
    the same gradient for the tied embedding table, on rows looked up and rows only the head
    uses."""
    p = init_params(TINY, jax.random.key(7))
    tokens = jax.random.randint(jax.random.key(8), (2, 12), 0, 40)  # ids 40..49 unused
    steps = jnp.arange(12)[None].repeat(2, 0)
    one_hot = ModelConfig(**{**TINY.to_dict(), "one_hot_embedding": True})

    @functools.partial(jax.jit, static_argnums=1)
    def logits_and_wte_grad(q, use_one_hot):
        cfg = one_hot if use_one_hot else TINY
        logits_of = lambda r: forward(cfg, r, tokens, steps)
        lse = lambda r: (jax.nn.logsumexp(logits_of(r), -1).sum(), logits_of(r))
        grads, logits = jax.grad(lse, has_aux=True)(q)
        return logits, grads["wte"]

    logits_gather, g_gather = map(np.asarray, logits_and_wte_grad(p, False))
    logits_one_hot, g_one_hot = map(np.asarray, logits_and_wte_grad(p, True))
    np.testing.assert_allclose(logits_one_hot, logits_gather, rtol=0, atol=1e-6)
    np.testing.assert_allclose(g_one_hot, g_gather, rtol=0, atol=1e-6)
    assert np.abs(g_gather).max() > 1e-3  # a real gradient
    unused = np.setdiff1d(np.arange(50), np.asarray(tokens))
    assert np.abs(g_gather[unused]).max() > 1e-3  # tied: unused rows get the head's gradient


def test_cached_decoding_matches_full_forward():
    p = init_params(TINY, jax.random.key(3))
    tokens = jax.random.randint(jax.random.key(4), (1, 12), 0, 50)
    steps = jnp.arange(12)[None] * 3
    full = _fwd(TINY, p, tokens, steps)
    cache = init_cache(TINY, 1)
    logits, cache = forward_cached(TINY, p, tokens[:, :7], steps[:, :7], cache, 0)
    np.testing.assert_allclose(logits, full[:, :7], atol=1e-5)
    for t in range(7, 12):
        logits, cache = forward_cached(TINY, p, tokens[:, t:t + 1], steps[:, t:t + 1], cache, t)
        np.testing.assert_allclose(logits[:, 0], full[:, t], atol=1e-5)


@pytest.mark.parametrize("dtype,mantissa_bits", [("bfloat16", 8), ("float16", 11)])
def test_low_precision_compute_errs_at_its_rounding_scale(dtype, mantissa_bits):
    """Logits of order one (weights ~0.3, LayerNorm gains ~1; a fresh init gives logits of ~0.08,
    where any tolerance is loose) differ from float32 by the compute dtype's own rounding: the
    mean error within a factor 4 of u * std(logits) (u = 2^-mantissa_bits), none beyond 10 u * std.
    float32 (error ~1e-7) fails the lower bound, as would float16 where bfloat16 was asked for."""
    rng = np.random.default_rng(4)
    p = jax.tree_util.tree_map_with_path(
        lambda path, x: (0.3 * rng.standard_normal(x.shape)
                         + jax.tree_util.keystr(path).endswith("['scale']")).astype(np.float32),
        init_params(TINY, jax.random.key(5)))
    tokens = jax.random.randint(jax.random.key(6), (2, 12), 0, 50)
    steps = jnp.zeros_like(tokens)
    ref = np.asarray(_fwd(TINY, p, tokens, steps))
    low = ModelConfig(**{**TINY.to_dict(), "dtype": dtype})
    out = _fwd(low, p, tokens, steps)
    assert out.dtype == jnp.dtype(dtype)
    err = np.abs(np.asarray(out, np.float32) - ref)
    scale = 2.0**-mantissa_bits * ref.std()
    assert ref.std() > 0.5
    assert scale / 4 < err.mean() < 4 * scale, (err.mean(), scale)
    assert err.max() < 10 * scale, (err.max(), scale)


def test_config_validation():
    with pytest.raises(ValueError, match="divisible by n_head"):
        ModelConfig(vocab_size=10, n_layer=1, n_head=3, n_embd=16, context_size=8)
    with pytest.raises(ValueError, match="dtype"):
        ModelConfig(vocab_size=10, n_layer=1, n_head=2, n_embd=16, context_size=8, dtype="fp8")
    assert ModelConfig.from_dict({**TINY.to_dict(), "unknown": 1}) == TINY


def test_eval_mode_dropout_is_the_identity():
    """Evaluation and sampling (deterministic=True) with dropout 0.3 give dropout 0's logits;
    training mode really drops (so the check above can fail)."""
    import dataclasses

    from piano_gpt_jax.model import GPT

    cfg0, cfg3 = (dataclasses.replace(TINY, dropout=d) for d in (0.0, 0.3))
    params = init_params(cfg0, jax.random.PRNGKey(0))
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 12), 0, 50)
    steps = jnp.broadcast_to(jnp.arange(12), (2, 12))
    eval_logits = forward(cfg3, params, tokens, steps)
    np.testing.assert_array_equal(eval_logits, forward(cfg0, params, tokens, steps))
    train_logits = GPT(cfg3).apply({"params": params}, tokens, steps, deterministic=False,
                                   rngs={"dropout": jax.random.PRNGKey(2)})
    assert float(jnp.max(jnp.abs(train_logits - eval_logits))) > 1e-3
