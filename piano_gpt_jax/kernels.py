"""Backend-dependent computation choices of the model, in one place.

Every `jax.default_backend()` check of the model lives here, each with the measurement that
chose it: the model states *what* it computes (a Dense contraction, causal attention) and this
module picks *how* on the backend at hand. Every path computes the same numbers up to float
rounding (model_test.py compares them), so a checkpoint never depends on where it was trained.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

# Query rows per block of the CPU causal attention (see blocked_causal_attention).
CPU_ATTENTION_BLOCK = 64


def _transposed(x):
    """x with its last two axes swapped, as a materialised copy: behind the barrier XLA cannot
    fold the transpose back into the matmul as a transposed operand, a form XLA CPU hands to
    Eigen instead of YNNPACK."""
    return jax.lax.optimization_barrier(jnp.swapaxes(x, -1, -2))


@jax.custom_vjp
def matmul_nn(a_MxK, b_KxN):
    """a @ b over any leading batch axes, with a backward whose two products are plain row-major
    matmuls: d_a = g @ b^T and d_b = copy(a^T) @ g. Autodiff's d_b contracts over a's rows,
    which XLA CPU runs through Eigen (with the work outside its thread pool's view) at about half
    YNNPACK's speed. CPU only (see dense_dot_general and blocked_causal_attention)."""
    return jnp.matmul(a_MxK, b_KxN)


def _matmul_nn_fwd(a_MxK, b_KxN):
    return jnp.matmul(a_MxK, b_KxN), (a_MxK, b_KxN)


def _matmul_nn_bwd(res, g_MxN):
    a_MxK, b_KxN = res
    return (jnp.matmul(g_MxN, jnp.swapaxes(b_KxN, -1, -2)).astype(a_MxK.dtype),
            jnp.matmul(_transposed(a_MxK), g_MxN).astype(b_KxN.dtype))


matmul_nn.defvjp(_matmul_nn_fwd, _matmul_nn_bwd)


@jax.custom_vjp
def matmul_nt(a_MxK, b_NxK):
    """a @ b^T over any leading batch axes (attention scores), with d_a = g @ b and
    d_b = copy(g^T) @ a: plain matmuls, as in matmul_nn."""
    return jnp.matmul(a_MxK, jnp.swapaxes(b_NxK, -1, -2))


def _matmul_nt_fwd(a_MxK, b_NxK):
    return jnp.matmul(a_MxK, jnp.swapaxes(b_NxK, -1, -2)), (a_MxK, b_NxK)


def _matmul_nt_bwd(res, g_MxN):
    a_MxK, b_NxK = res
    return (jnp.matmul(g_MxN, b_NxK).astype(a_MxK.dtype),
            jnp.matmul(_transposed(g_MxN), a_MxK).astype(b_NxK.dtype))


matmul_nt.defvjp(_matmul_nt_fwd, _matmul_nt_bwd)


def dense_dot_general(lhs, rhs, dimension_numbers, precision=None, **_):
    """nn.Dense's contraction (last input axis with the kernel's first). On CPU a (B, T, C)
    input is multiplied as one (B*T, C) matrix by matmul_nn, so the kernel's gradient is a single
    plain matmul over B*T rows: XLA CPU otherwise lays the 3-d contraction's gradient out through
    a transpose of the whole (B, T, F) upstream gradient fused with its elementwise producers
    (the GELU backward); the kernel gradient is then copy(x^T) @ g rather than XLA's
    transposed-operand dot. Each step of this was faster than the one before, measured on the
    whole train step (benchmarks/README.md, "CPU train step, per change": the 3-d contraction,
    per-sequence gradient blocks through a custom VJP, one 2-d matmul, the copied transpose).
    Accelerators keep XLA's own contraction."""
    plain = (lhs.ndim != 3 or dimension_numbers != (((2,), (0,)), ((), ()))
             or precision is not None)
    if plain or jax.default_backend() != "cpu":
        return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision)
    B, T, C = lhs.shape
    return matmul_nn(lhs.reshape(B * T, C), rhs).reshape(B, T, rhs.shape[1])


def attention_kind(attention: str, dtype: str, use_dropout: bool) -> str:
    """"einsum" (our softmax attention), "blocked" (the same, by blocks of query rows, skipping
    the keys a block cannot see) or "fused" (jax.nn.dot_product_attention).

    Dropout on the attention probabilities and float16 need the einsum path (XLA:CPU rejects
    dot_product_attention's f16 x f16 -> f32 dot under jit, and a float32 softmax is the safer
    choice for float16 anyway). "auto" on CPU takes the blocked path: XLA CPU's
    dot_product_attention was slower than the einsums, and the blocks halve the einsums' time
    (benchmarks/README.md). On GPU, "auto" lets XLA pick (cuDNN's fused kernel where it
    applies).
    """
    if use_dropout or dtype == "float16" or attention == "einsum":
        return "einsum"
    if attention == "auto" and jax.default_backend() == "cpu":
        return "blocked"
    return "fused"


def _masked_softmax(att_BxHxTxS, mask_TxS):
    """Softmax over keys in float32, masked keys at float32's lowest value: exactly zero weight
    (a row always keeps its own position, so it is never all masked)."""
    att_BxHxTxS = jnp.where(mask_TxS[None, None], att_BxHxTxS, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(att_BxHxTxS, axis=-1)


def softmax_attention(q_BxTxHxD, k_BxSxHxD, v_BxSxHxD, mask_TxS, dropout=None):
    """Plain softmax attention (float32 softmax): the cached, dropout and float16 paths, and the
    reference the other paths are tested against."""
    scale = 1.0 / math.sqrt(q_BxTxHxD.shape[-1])
    att_BxHxTxS = jnp.einsum("bthd,bshd->bhts", q_BxTxHxD, k_BxSxHxD).astype(jnp.float32) * scale
    p_BxHxTxS = _masked_softmax(att_BxHxTxS, mask_TxS)
    if dropout is not None:
        p_BxHxTxS = dropout(p_BxHxTxS)
    return jnp.einsum("bhts,bshd->bthd", p_BxHxTxS.astype(v_BxSxHxD.dtype), v_BxSxHxD)


def blocked_causal_attention(q_BxTxHxD, k_BxTxHxD, v_BxTxHxD, block: int = CPU_ATTENTION_BLOCK):
    """Causal softmax attention computed `block` query rows at a time, each block against only
    the keys up to its last row: the same numbers as softmax_attention up to float rounding (the
    skipped scores are exactly zero after the softmax), with about half the score work, and score
    blocks that stay in cache. Heads move in front once, so every contraction is a plain batched
    matmul.

    The choices of form, each faster than what it replaced (figures, machine and shape:
    benchmarks/README.md, "CPU train step, per change"):
    - blocks of 64 query rows rather than one (B, H, T, T) einsum (32 and 128 were slower);
    - the mask added as a 0 / float32-lowest bias, and the softmax's division moved after the
      probability-value product (exp(s - max) @ v, divided by the row sums: (T, D) divisions
      instead of (T, S)). XLA CPU then fuses the score matmul with its bias and row max, and the
      backward has no (T, S) division. The row max carries no gradient (the softmax does not
      depend on it), so it is held constant for autodiff;
    - the products through matmul_nt / matmul_nn, whose key and value gradients are plain matmuls
      (autodiff's run on Eigen), as dense_dot_general does for the kernel gradient.
    """
    q_BxHxTxD, k_BxHxTxD, v_BxHxTxD = (x.transpose(0, 2, 1, 3)
                                       for x in (q_BxTxHxD, k_BxTxHxD, v_BxTxHxD))
    T = q_BxHxTxD.shape[2]
    scale = 1.0 / math.sqrt(q_BxHxTxD.shape[-1])
    outs = []
    for start in range(0, T, block):
        end = min(start + block, T)
        mask_QxS = jnp.arange(end)[None, :] <= jnp.arange(start, end)[:, None]
        bias_QxS = jnp.where(mask_QxS, 0.0, jnp.finfo(jnp.float32).min)
        att_BxHxQxS = matmul_nt(q_BxHxTxD[:, :, start:end],
                                k_BxHxTxD[:, :, :end]).astype(jnp.float32) * scale + bias_QxS
        max_BxHxQx1 = jax.lax.stop_gradient(att_BxHxQxS.max(axis=-1, keepdims=True))
        e_BxHxQxS = jnp.exp(att_BxHxQxS - max_BxHxQx1)  # masked keys: exactly 0
        y_BxHxQxD = matmul_nn(e_BxHxQxS.astype(v_BxHxTxD.dtype), v_BxHxTxD[:, :, :end])
        outs.append(y_BxHxQxD / e_BxHxQxS.sum(axis=-1, keepdims=True).astype(y_BxHxQxD.dtype))
    return jnp.concatenate(outs, axis=2).transpose(0, 2, 1, 3)


def fused_attention(attention: str, dtype: str, q_BxTxHxD, k_BxTxHxD, v_BxTxHxD):
    """jax.nn.dot_product_attention; "auto" asks for cuDNN's fused kernel in bfloat16 on GPU.

    Measured on one H100 (gpt2 124M-class, 8 x 2048 tokens, bf16): XLA's own attention 99.7
    ms/step, 12.4% MFU, 35.8 GiB peak; cuDNN 31.5 ms/step, 39.3% MFU, 7.9 GiB
    (benchmarks/train_step.py --gpu). XLA does not pick cuDNN by itself, so auto does; where
    cuDNN cannot run this call (no cuDNN, unsupported shape), XLA's implementation is used.
    """
    implementation = None if attention == "auto" else attention
    if attention == "auto" and dtype == "bfloat16" and jax.default_backend() == "gpu":
        try:
            return jax.nn.dot_product_attention(q_BxTxHxD, k_BxTxHxD, v_BxTxHxD, is_causal=True,
                                                implementation="cudnn")
        except Exception:  # noqa: BLE001 — cuDNN missing or the shape unsupported: XLA's
            implementation = None
    return jax.nn.dot_product_attention(q_BxTxHxD, k_BxTxHxD, v_BxTxHxD, is_causal=True,
                                        implementation=implementation)
