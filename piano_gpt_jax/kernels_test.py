"""Every backend path computes the model's numbers: the CPU Dense gradient, both attention
implementations and rematerialisation give the same logits and gradients as the plain forms."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from piano_gpt_jax import kernels
from piano_gpt_jax.model import ModelConfig, forward, init_params

TINY = ModelConfig(vocab_size=61, n_layer=2, n_head=2, n_embd=32, context_size=24)


def test_cpu_dense_gradient_equals_xla_contraction():
    """The CPU path (one 2-d matmul over B*T rows) has the 3-d contraction's value and gradients."""
    kx, kw, kg = jax.random.split(jax.random.PRNGKey(0), 3)
    x_BxTxC = jax.random.normal(kx, (3, 7, 16))
    w_CxF = jax.random.normal(kw, (16, 40))
    g_BxTxF = jax.random.normal(kg, (3, 7, 40))
    dims = (((2,), (0,)), ((), ()))

    def pulled_back(dot):
        y, vjp = jax.vjp(lambda x, w: dot(x, w, dims), x_BxTxC, w_CxF)
        return (y, *vjp(g_BxTxF))

    ours = pulled_back(kernels.dense_dot_general)
    plain = pulled_back(jax.lax.dot_general)
    for a, b in zip(ours, plain, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch", [(), (2, 3)])
def test_plain_matmul_backwards_are_the_matmul_gradients(batch):
    """matmul_nn / matmul_nt (row-major products in the backward) have autodiff's values and
    gradients, with and without leading batch axes."""
    ka, kb, kg = jax.random.split(jax.random.PRNGKey(1), 3)
    a_MxK = jax.random.normal(ka, (*batch, 5, 7))
    b_KxN = jax.random.normal(kb, (*batch, 7, 4))
    g_MxN = jax.random.normal(kg, (*batch, 5, 4))
    b_NxK = jnp.swapaxes(b_KxN, -1, -2)
    for ours, plain, b in ((kernels.matmul_nn, jnp.matmul, b_KxN),
                           (kernels.matmul_nt, lambda a, b: a @ jnp.swapaxes(b, -1, -2), b_NxK)):
        y1, vjp1 = jax.vjp(jax.jit(ours), a_MxK, b)
        y2, vjp2 = jax.vjp(plain, a_MxK, b)
        for x, y in zip((y1, *vjp1(g_MxN)), (y2, *vjp2(g_MxN)), strict=True):
            assert x.shape == y.shape
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("attention", "dtype", "dropout", "backend", "kind"), [
    ("auto", "float32", False, "cpu", "blocked"),
    ("auto", "float32", True, "cpu", "einsum"),
    ("auto", "float32", False, "gpu", "fused"),
    ("xla", "float32", False, "cpu", "fused"),
    ("xla", "float32", True, "gpu", "einsum"),  # dropout on probabilities needs the einsum
    ("cudnn", "float16", False, "gpu", "einsum"),  # float16 keeps a float32 softmax
    ("einsum", "bfloat16", False, "gpu", "einsum"),
])
def test_attention_kind(attention, dtype, dropout, backend, kind, monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    assert kernels.attention_kind(attention, dtype, dropout) == kind


def _loss_and_grads(cfg: ModelConfig, params: dict, tokens_BxT) -> tuple:
    def loss(p):
        logits_BxTxV = forward(cfg, p, tokens_BxT)
        return jnp.mean(jax.nn.log_softmax(logits_BxTxV)[..., 0]), logits_BxTxV

    (value, logits), grads = jax.value_and_grad(loss, has_aux=True)(params)
    return value, logits, grads


@pytest.mark.parametrize("variant", [{"attention": "xla"}, {"attention": "einsum"},
                                     {"remat": True}])
def test_runtime_choices_give_the_same_numbers(variant):
    """attention=xla (jax.nn.dot_product_attention), attention=einsum (one unblocked softmax)
    and remat=True against the CPU default (blocked attention, no remat): equal logits, loss and
    gradients to float32 rounding."""
    params = init_params(TINY, jax.random.PRNGKey(1))
    tokens_BxT = jax.random.randint(jax.random.PRNGKey(2), (2, 24), 0, TINY.vocab_size)
    base = _loss_and_grads(TINY, params, tokens_BxT)
    other = _loss_and_grads(dataclasses.replace(TINY, **variant), params, tokens_BxT)
    for a, b in zip(jax.tree_util.tree_leaves(base), jax.tree_util.tree_leaves(other),
                    strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize(("T", "block"), [(24, 10), (24, 24), (7, 3), (64, 16)])
def test_blocked_causal_attention_is_the_softmax_attention(T, block):
    """Blocks of any size, including a short last one, give the unblocked values and gradients."""
    kq, kk, kv, kg = jax.random.split(jax.random.PRNGKey(3), 4)
    shape = (2, T, 3, 8)
    q, k, v, g = (jax.random.normal(key, shape) for key in (kq, kk, kv, kg))
    mask_TxT = jnp.tril(jnp.ones((T, T), dtype=bool))

    def pulled_back(attention):
        y, vjp = jax.vjp(attention, q, k, v)
        return (y, *vjp(g))

    blocked = pulled_back(lambda q, k, v: kernels.blocked_causal_attention(q, k, v, block))
    plain = pulled_back(lambda q, k, v: kernels.softmax_attention(q, k, v, mask_TxT))
    for a, b in zip(blocked, plain, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
