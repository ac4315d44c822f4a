"""The piano GPT in Flax linen, numerically twinned with the PyTorch reference (nanoGPT variant).

The parameter tree mirrors the reference state_dict so conversion is a rename plus a transpose of
Linear weights: `wte`, `wpe`, optional `wmte`,
`h_{i}/{ln_1,attn/{c_attn,c_proj},ln_2,mlp/{c_fc,c_proj}}`, `ln_f`. The output head is tied to
`wte` (logits = x @ wte.T), as in the reference.

Shapes carry their axes in their names: B batch, T time, S cache length, C = n_embd, H heads,
D head dim, V vocab.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from piano_gpt_jax import kernels
from piano_gpt_jax.config import ATTENTIONS
from piano_gpt_jax.precision import compute_dtype

N_TIME_STEPS = 10_000  # rows of the music-time embedding (10 ms grid => 100 s)
LAYER_NORM_EPS = 1e-5  # torch's default; flax's own default (1e-6) would drift from the twin
_SQRT_HALF = 1.0 / math.sqrt(2.0)



@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of one model; what a checkpoint must agree on (plus the compute dtype)."""

    vocab_size: int
    n_layer: int
    n_head: int
    n_embd: int
    context_size: int
    dropout: float = 0.0
    bias: bool = False
    use_time_embedding: bool = False
    dtype: str = "float32"  # compute dtype; parameters are always float32
    one_hot_embedding: bool = False  # token lookup as a matmul: faster on XLA CPU (no scatter-add)
    # Runtime choices (not architecture; equal numbers up to rounding, see model_test.py):
    attention: str = "auto"  # auto | einsum | xla | cudnn (jax.nn.dot_product_attention)
    remat: bool = False  # recompute each block's activations in the backward pass (memory)

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}); "
                "pick an n_head that divides n_embd."
            )
        compute_dtype(self.dtype)  # validates the name
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got "
                             f"{self.attention!r}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def compute_dtype(self) -> Any:
        return compute_dtype(self.dtype)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def gelu(x):
    """torch nn.GELU(): x * Phi(x), written with erf as torch computes it. jax.nn.gelu's exact
    form goes through erfc, which XLA CPU splits into three fusions with a backward of two more,
    so this form is faster there (an MLP sublayer: benchmarks/README.md, "CPU train step, per
    change"), with the same values as torch's to 1.2e-6 on [-8, 8]."""
    return 0.5 * x * (1.0 + jax.lax.erf(x * _SQRT_HALF))


def _normal(std: float):
    return nn.initializers.normal(stddev=std)


def _residual_std(cfg: ModelConfig) -> float:
    return 0.02 / math.sqrt(2 * cfg.n_layer)


def _layer_norm(bias: bool, name: str) -> nn.LayerNorm:
    """LayerNorm in float32 with eps 1e-5 and an optional bias, as torch autocast runs it."""
    return nn.LayerNorm(epsilon=LAYER_NORM_EPS, use_bias=bias, dtype=jnp.float32,
                        param_dtype=jnp.float32, name=name)


def _dense(cfg: ModelConfig, features: int, name: str, std: float = 0.02) -> nn.Dense:
    return nn.Dense(
        features, use_bias=cfg.bias, dtype=cfg.compute_dtype, param_dtype=jnp.float32,
        kernel_init=_normal(std), bias_init=nn.initializers.zeros, name=name,
        dot_general=kernels.dense_dot_general,
    )


class CausalSelfAttention(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BxTxC, deterministic: bool, cache=None, start=None):
        cfg = self.cfg
        B, T, C = x_BxTxC.shape
        H, D = cfg.n_head, cfg.head_dim
        qkv_BxTx3C = _dense(cfg, 3 * C, "c_attn")(x_BxTxC)
        q_BxTxC, k_BxTxC, v_BxTxC = jnp.split(qkv_BxTx3C, 3, axis=-1)
        q_BxTxHxD = q_BxTxC.reshape(B, T, H, D)
        k_BxTxHxD = k_BxTxC.reshape(B, T, H, D)
        v_BxTxHxD = v_BxTxC.reshape(B, T, H, D)
        use_dropout = cfg.dropout > 0.0 and not deterministic

        new_cache = None
        if cache is not None:
            # Write this chunk at [start, start+T) of the fixed-size cache; attend over the cache
            # with a mask that lets query position p see keys at positions <= p.
            k_cache_BxSxHxD, v_cache_BxSxHxD = cache
            k_cache_BxSxHxD = jax.lax.dynamic_update_slice(
                k_cache_BxSxHxD, k_BxTxHxD.astype(k_cache_BxSxHxD.dtype), (0, start, 0, 0))
            v_cache_BxSxHxD = jax.lax.dynamic_update_slice(
                v_cache_BxSxHxD, v_BxTxHxD.astype(v_cache_BxSxHxD.dtype), (0, start, 0, 0))
            new_cache = (k_cache_BxSxHxD, v_cache_BxSxHxD)
            S = k_cache_BxSxHxD.shape[1]
            q_pos_T = start + jnp.arange(T)
            mask_TxS = jnp.arange(S)[None, :] <= q_pos_T[:, None]
            y_BxTxHxD = kernels.softmax_attention(
                q_BxTxHxD, k_cache_BxSxHxD.astype(q_BxTxHxD.dtype),
                v_cache_BxSxHxD.astype(q_BxTxHxD.dtype), mask_TxS)
        elif (kind := kernels.attention_kind(cfg.attention, cfg.dtype, use_dropout)) == "einsum":
            mask_TxT = jnp.tril(jnp.ones((T, T), dtype=bool))
            drop = lambda p: nn.Dropout(cfg.dropout)(p, deterministic=False)
            y_BxTxHxD = kernels.softmax_attention(q_BxTxHxD, k_BxTxHxD, v_BxTxHxD, mask_TxT,
                                                  dropout=drop if use_dropout else None)
        elif kind == "blocked":
            y_BxTxHxD = kernels.blocked_causal_attention(q_BxTxHxD, k_BxTxHxD, v_BxTxHxD)
        else:
            y_BxTxHxD = kernels.fused_attention(cfg.attention, cfg.dtype, q_BxTxHxD, k_BxTxHxD,
                                                v_BxTxHxD)
        y_BxTxC = y_BxTxHxD.reshape(B, T, C)
        y_BxTxC = _dense(cfg, C, "c_proj", _residual_std(cfg))(y_BxTxC)
        y_BxTxC = nn.Dropout(cfg.dropout)(y_BxTxC, deterministic=deterministic)
        return y_BxTxC, new_cache


class MLP(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BxTxC, deterministic: bool):
        cfg = self.cfg
        h_BxTxF = _dense(cfg, 4 * cfg.n_embd, "c_fc")(x_BxTxC)
        h_BxTxF = gelu(h_BxTxF)
        y_BxTxC = _dense(cfg, cfg.n_embd, "c_proj", _residual_std(cfg))(h_BxTxF)
        return nn.Dropout(cfg.dropout)(y_BxTxC, deterministic=deterministic)


class Block(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BxTxC, deterministic: bool, cache=None, start=None):
        a_BxTxC, new_cache = CausalSelfAttention(self.cfg, name="attn")(
            _layer_norm(self.cfg.bias, "ln_1")(x_BxTxC), deterministic, cache, start)
        x_BxTxC = x_BxTxC + a_BxTxC.astype(jnp.float32)
        m_BxTxC = MLP(self.cfg, name="mlp")(_layer_norm(self.cfg.bias, "ln_2")(x_BxTxC),
                                            deterministic)
        return x_BxTxC + m_BxTxC.astype(jnp.float32), new_cache


class GPT(nn.Module):
    """Decoder-only transformer; returns logits for every position.

    `cache` (a tuple of per-layer (k, v) arrays from `init_cache`) with `start` (the position of the
    first token in `tokens`) switches on incremental decoding; the updated cache is returned.
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(self, tokens_BxT, time_steps_BxT=None, *, deterministic: bool = True,
                 cache=None, start=0):
        cfg = self.cfg
        B, T = tokens_BxT.shape
        wte = self.param("wte", _normal(0.02), (cfg.vocab_size, cfg.n_embd), jnp.float32)
        wpe = self.param("wpe", _normal(0.02), (cfg.context_size, cfg.n_embd), jnp.float32)
        if cfg.one_hot_embedding:
            x_BxTxC = jax.nn.one_hot(tokens_BxT, cfg.vocab_size, dtype=jnp.float32) @ wte
        else:
            x_BxTxC = jnp.take(wte, tokens_BxT, axis=0)
        x_BxTxC = x_BxTxC + jax.lax.dynamic_slice_in_dim(wpe, start, T, axis=0)[None]
        if cfg.use_time_embedding:
            wmte = self.param("wmte", _normal(0.02), (N_TIME_STEPS, cfg.n_embd), jnp.float32)
            if time_steps_BxT is None:
                raise ValueError("this model has a music-time embedding: pass time_steps")
            steps_BxT = jnp.clip(time_steps_BxT, 0, N_TIME_STEPS - 1)
            x_BxTxC = x_BxTxC + jnp.take(wmte, steps_BxT, axis=0)
        x_BxTxC = nn.Dropout(cfg.dropout)(x_BxTxC, deterministic=deterministic)

        new_cache = []
        # remat: keep only each block's input for the backward pass and recompute the rest
        # (long contexts: activations, not weights, fill the accelerator). Not for decoding.
        block = nn.remat(Block, static_argnums=(2,)) if cfg.remat and cache is None else Block
        for i in range(cfg.n_layer):
            layer_cache = None if cache is None else cache[i]
            if cache is None:
                x_BxTxC, c = block(cfg, name=f"h_{i}")(x_BxTxC, deterministic)
            else:
                x_BxTxC, c = block(cfg, name=f"h_{i}")(x_BxTxC, deterministic, layer_cache,
                                                       start)
            new_cache.append(c)
        x_BxTxC = _layer_norm(cfg.bias, "ln_f")(x_BxTxC)
        # The tied head as x @ wte.T through the Dense contraction: one 2-d matmul on CPU, faster
        # than a 3-d einsum (benchmarks/README.md, "CPU train step, per change").
        logits_BxTxV = kernels.dense_dot_general(
            x_BxTxC.astype(cfg.compute_dtype), wte.astype(cfg.compute_dtype).T,
            (((2,), (0,)), ((), ())))
        if cache is None:
            return logits_BxTxV
        return logits_BxTxV, tuple(new_cache)


def init_params(cfg: ModelConfig, rng: jax.Array) -> dict:
    """Fresh float32 parameters with the reference initialisation."""
    tokens = jnp.zeros((1, min(8, cfg.context_size)), jnp.int32)
    steps = tokens if cfg.use_time_embedding else None
    return GPT(cfg).init(rng, tokens, steps)["params"]


def forward(cfg: ModelConfig, params: dict, tokens, time_steps=None):
    """Deterministic logits (B, T, V) for every position; jit it with `cfg` static."""
    return GPT(cfg).apply({"params": params}, tokens, time_steps, deterministic=True)


def init_cache(cfg: ModelConfig, batch_size: int, length: int | None = None):
    """Per-layer zero (k, v) arrays of shape (B, S, H, D) for incremental decoding."""
    S = length or cfg.context_size
    shape = (batch_size, S, cfg.n_head, cfg.head_dim)
    zeros = jnp.zeros(shape, cfg.compute_dtype)
    return tuple((zeros, zeros) for _ in range(cfg.n_layer))


def forward_cached(cfg: ModelConfig, params: dict, tokens, time_steps, cache, start):
    """Logits for `tokens` placed at positions [start, start+T), attending to the cache; returns
    (logits_BxTxV, new_cache). The cache must hold at most `context_size` positions."""
    return GPT(cfg).apply({"params": params}, tokens, time_steps, deterministic=True,
                          cache=cache, start=start)


def count_params(params: dict, include_position: bool = True) -> int:
    """Parameter count; `include_position=False` matches the reference's get_num_params()."""
    total = sum(x.size for x in jax.tree_util.tree_leaves(params))
    if not include_position:
        total -= params["wpe"].size
    return int(total)
