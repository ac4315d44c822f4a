"""Backend-dependent computation choices of the model, in one place.

Every `jax.default_backend()` check of the model lives here, each with the measurement that
chose it: the model states *what* it computes (a Dense contraction, causal attention) and this
module picks *how* on the backend at hand. Every path computes the same numbers up to float
rounding (model_test.py compares them), so a checkpoint never depends on where it was trained.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


@jax.custom_vjp
def _matmul_BxTxC(x_BxTxC, w_CxF):
    return jnp.einsum("btc,cf->btf", x_BxTxC, w_CxF)


def _matmul_fwd(x_BxTxC, w_CxF):
    return _matmul_BxTxC(x_BxTxC, w_CxF), (x_BxTxC, w_CxF)


def _matmul_bwd(res, g_BxTxF):
    # The kernel gradient is summed per sequence (a batched dot over B, then a sum over B) instead
    # of one (B*T)-contraction: XLA CPU lays the latter out by transposing the whole (B*T, F)
    # upstream gradient in a loop fusion together with its elementwise producers (the erf-GELU
    # backward), which was ~25 ms per c_fc on 16x256x512 - about half of each MLP's backward.
    # Per-sequence blocks keep that transpose cache-sized (MLP fwd+bwd 55 -> 28 ms).
    x_BxTxC, w_CxF = res
    dx_BxTxC = jnp.einsum("btf,cf->btc", g_BxTxF, w_CxF)
    dw_CxF = jnp.einsum("btc,btf->bcf", x_BxTxC, g_BxTxF).sum(0)
    return dx_BxTxC, dw_CxF


_matmul_BxTxC.defvjp(_matmul_fwd, _matmul_bwd)


def dense_dot_general(lhs, rhs, dimension_numbers, precision=None, **_):
    """nn.Dense's contraction (last input axis with the kernel's first) via `_matmul_BxTxC` on
    CPU only: on accelerators the per-sequence (B, C, F) gradient blocks would cost memory and
    bandwidth for nothing, so they keep XLA's own contraction."""
    plain = lhs.ndim != 3 or dimension_numbers != (((2,), (0,)), ((), ()))
    if plain or jax.default_backend() != "cpu":
        return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision)
    return _matmul_BxTxC(lhs, rhs)


def attention_kind(attention: str, dtype: str, use_dropout: bool) -> str:
    """"einsum" (our softmax attention) or "fused" (jax.nn.dot_product_attention).

    Dropout on the attention probabilities and float16 need the einsum path (XLA:CPU rejects
    dot_product_attention's f16 x f16 -> f32 dot under jit, and a float32 softmax is the safer
    choice for float16 anyway). "auto" takes it on CPU too: XLA CPU's dot_product_attention was
    ~1.25x slower than these einsums (fwd+bwd 35 vs 28 ms per layer at 16x256, 4 heads of 32);
    on GPU, "auto" lets XLA pick (cuDNN's fused kernel where it applies).
    """
    if use_dropout or dtype == "float16" or attention == "einsum":
        return "einsum"
    if attention == "auto" and jax.default_backend() == "cpu":
        return "einsum"
    return "fused"


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
