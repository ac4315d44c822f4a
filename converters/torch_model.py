"""The piano GPT in PyTorch, written to have exactly the reference trainer's state_dict.

Keys, shapes and registration order follow piano-gpt's `gpt2/model.py` (nanoGPT variant), so a
state_dict from here loads into the reference `GPT` and vice versa. Differences, on purpose:
no `padding_idx` on the embeddings (it only zeroes the lookup gradient of one row; the Flax model
has none either) and `forward` returns logits for every position (the reference returns only the
last one when no targets are given).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from piano_gpt_jax.model import ModelConfig

# The twin is a second implementation to check the Flax model against, so its constants come from
# the reference document (../shared/reference/piano-gpt-reference.md, section 1.1 "Modules and
# math"), never from the code under test: LayerNorm is `F.layer_norm(..., eps=1e-5)`, and HEAD's
# music-time embedding `wmte` has n_time_steps = 10_000 rows, indexed by time steps clipped to
# [0, 9999].
LAYER_NORM_EPS = 1e-5
N_TIME_STEPS = 10_000
IGNORE_INDEX = -100


class LayerNorm(nn.Module):
    """LayerNorm whose bias is None (not a parameter) when bias=False, as in the reference."""

    def __init__(self, ndim: int, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, LAYER_NORM_EPS)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.n_embd = cfg.n_embd
        self.dropout = cfg.dropout
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x_BxTxC: torch.Tensor) -> torch.Tensor:
        B, T, C = x_BxTxC.shape
        q, k, v = self.c_attn(x_BxTxC).split(self.n_embd, dim=2)
        q_BxHxTxD = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        k_BxHxTxD = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v_BxHxTxD = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        y_BxHxTxD = F.scaled_dot_product_attention(
            q_BxHxTxD, k_BxHxTxD, v_BxHxTxD, attn_mask=None,
            dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        y_BxTxC = y_BxHxTxD.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y_BxTxC))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TorchGPT(nn.Module):
    """Twin of the Flax `GPT`; `state_dict()` has the reference keys, both tied names included."""

    def __init__(self, model_config: ModelConfig) -> None:
        super().__init__()
        cfg = model_config
        self.config = cfg
        modules = {
            "wte": nn.Embedding(cfg.vocab_size, cfg.n_embd),
            "wpe": nn.Embedding(cfg.context_size, cfg.n_embd),
        }
        if cfg.use_time_embedding:
            modules["wmte"] = nn.Embedding(N_TIME_STEPS, cfg.n_embd)
        modules["dropout"] = nn.Dropout(cfg.dropout)
        modules["h"] = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)])
        modules["ln_f"] = LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.transformer = nn.ModuleDict(modules)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # tied, as in the reference
        self.apply(self._init_weights)
        residual_std = 0.02 / math.sqrt(2 * cfg.n_layer)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=residual_std)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor, time_steps: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, V) for every position."""
        B, T = idx.shape
        if T > self.config.context_size:
            raise ValueError(f"sequence of {T} tokens exceeds context_size "
                             f"{self.config.context_size}")
        pos = torch.arange(T, dtype=torch.long, device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        if self.config.use_time_embedding:
            if time_steps is None:
                raise ValueError("this model has a music-time embedding: pass time_steps")
            x = x + self.transformer.wmte(torch.clamp(time_steps, 0, N_TIME_STEPS - 1))
        x = self.transformer.dropout(x)
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))

    def get_num_params(self) -> int:
        """As the reference counts: all parameters (tied matrix once) minus the position table."""
        return sum(p.numel() for p in self.parameters()) - self.transformer.wpe.weight.numel()


def masked_cross_entropy(logits_BxTxV: torch.Tensor, targets_BxT: torch.Tensor,
                         mask_BxT: torch.Tensor | None = None) -> torch.Tensor:
    """The reference loss: token mean over targets kept by the mask (others get ignore index -100).

    Unlike the reference, the caller's `targets` are not modified.
    """
    if mask_BxT is not None:
        targets_BxT = targets_BxT.masked_fill(~mask_BxT.bool(), IGNORE_INDEX)
    V = logits_BxTxV.shape[-1]
    return F.cross_entropy(logits_BxTxV.reshape(-1, V).float(), targets_BxT.reshape(-1),
                           ignore_index=IGNORE_INDEX)
