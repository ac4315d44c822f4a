"""Renaming between the Flax params tree and the reference torch state_dict.

Flax `Dense.kernel` is (in, out) and torch `Linear.weight` is (out, in), so Linear weights are
transposed; LayerNorm `scale` is torch `weight`; embedding tables are copied as they are. The output
head is tied: the state_dict carries the token table under both `transformer.wte.weight` and
`lm_head.weight`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping

import numpy as np
import torch

from piano_gpt_jax.model import N_TIME_STEPS, ModelConfig

from .safe_load import CheckpointError

COMPILE_PREFIX = "_orig_mod."
TIED_KEYS = ("transformer.wte.weight", "lm_head.weight")
_NORMS = ("ln_1", "ln_2")


def _mapping(cfg: ModelConfig) -> list[tuple[str, tuple[str, ...], str, tuple[int, ...]]]:
    """(torch key, flax path, kind, torch shape) in the reference registration order."""
    n, out = cfg.n_embd, []
    out.append(("transformer.wte.weight", ("wte",), "table", (cfg.vocab_size, n)))
    out.append(("transformer.wpe.weight", ("wpe",), "table", (cfg.context_size, n)))
    if cfg.use_time_embedding:
        out.append(("transformer.wmte.weight", ("wmte",), "table", (N_TIME_STEPS, n)))
    linear_shapes = {"attn.c_attn": (3 * n, n), "attn.c_proj": (n, n),
                     "mlp.c_fc": (4 * n, n), "mlp.c_proj": (n, 4 * n)}
    for i in range(cfg.n_layer):
        t, f = f"transformer.h.{i}", f"h_{i}"
        for name in ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj"):
            fpath = (f, *name.split("."))
            if name in _NORMS:
                out.append((f"{t}.{name}.weight", (*fpath, "scale"), "norm", (n,)))
                if cfg.bias:
                    out.append((f"{t}.{name}.bias", (*fpath, "bias"), "norm", (n,)))
            else:
                shape = linear_shapes[name]
                out.append((f"{t}.{name}.weight", (*fpath, "kernel"), "linear", shape))
                if cfg.bias:
                    out.append((f"{t}.{name}.bias", (*fpath, "bias"), "bias", (shape[0],)))
    out.append(("transformer.ln_f.weight", ("ln_f", "scale"), "norm", (n,)))
    if cfg.bias:
        out.append(("transformer.ln_f.bias", ("ln_f", "bias"), "norm", (n,)))
    return out


def expected_state_dict_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every key of the reference state_dict (both tied names) with its shape."""
    shapes = {key: shape for key, _, _, shape in _mapping(cfg)}
    shapes["lm_head.weight"] = (cfg.vocab_size, cfg.n_embd)
    return shapes


def strip_compile_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop torch.compile's `_orig_mod.` prefix (the reference saves the compiled module's keys)."""
    return {k[len(COMPILE_PREFIX):] if k.startswith(COMPILE_PREFIX) else k: v
            for k, v in state_dict.items()}


def _get(tree: Mapping, path: tuple[str, ...]):
    for p in path:
        tree = tree[p]
    return tree


def params_to_state_dict(model_config: ModelConfig, params: Mapping) -> OrderedDict:
    """Flax params -> reference state_dict (float32 CPU tensors; tied keys share one tensor)."""
    sd: OrderedDict[str, torch.Tensor] = OrderedDict()
    for key, fpath, kind, shape in _mapping(model_config):
        try:
            arr = np.asarray(_get(params, fpath), dtype=np.float32)
        except KeyError:
            raise CheckpointError(
                f"params lack {'/'.join(fpath)} (needed for {key}); the params do not match "
                "the model config") from None
        if kind == "linear":
            arr = arr.T
        if tuple(arr.shape) != shape:
            raise CheckpointError(f"params {'/'.join(fpath)} has shape {arr.shape} but the model "
                                  f"config needs {shape} for {key}")
        sd[key] = torch.from_numpy(np.array(arr, dtype=np.float32, order="C", copy=True))
    sd["lm_head.weight"] = sd["transformer.wte.weight"]
    return sd


def state_dict_to_params(model_config: ModelConfig, state_dict: Mapping[str, torch.Tensor]
                         ) -> dict:
    """Reference state_dict -> Flax params of float32 numpy arrays, checking names and shapes.

    Accepts `_orig_mod.`-prefixed keys, one or both tied names, and the causal-mask buffers
    (`attn.bias`, 4-D) that old torch versions registered.
    """
    sd = strip_compile_prefix(state_dict)
    mapping = _mapping(model_config)
    known = {key for key, _, _, _ in mapping} | {"lm_head.weight"}
    unexpected = [k for k in sd if k not in known and not _is_mask_buffer(k, sd[k])]
    if unexpected:
        raise CheckpointError(
            f"unexpected parameter name(s) {unexpected[:5]} in the state_dict for a model with "
            f"n_layer={model_config.n_layer}, bias={model_config.bias}, time embedding="
            f"{model_config.use_time_embedding}; the weights do not belong to this architecture.")
    if "transformer.wte.weight" not in sd and "lm_head.weight" in sd:
        sd["transformer.wte.weight"] = sd["lm_head.weight"]
    missing = [key for key, _, _, _ in mapping if key not in sd]
    if missing:
        raise CheckpointError(f"state_dict lacks {missing[:5]} needed by the model config "
                              f"(n_layer={model_config.n_layer}, bias={model_config.bias}).")
    if "lm_head.weight" in sd and not torch.equal(sd["lm_head.weight"],
                                                   sd["transformer.wte.weight"]):
        raise CheckpointError("lm_head.weight differs from transformer.wte.weight: the output "
                              "head is not tied to the token embedding, which this model needs.")
    params: dict = {}
    for key, fpath, kind, shape in mapping:
        t = sd[key]
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"{key} is a {type(t).__name__}, not a tensor")
        if tuple(t.shape) != shape:
            raise CheckpointError(f"{key} has shape {tuple(t.shape)} but the model config needs "
                                  f"{shape}; the checkpoint's model_cfg and weights disagree.")
        arr = t.detach().to("cpu", torch.float32).numpy().copy()
        if kind == "linear":
            arr = np.ascontiguousarray(arr.T)
        node = params
        for p in fpath[:-1]:
            node = node.setdefault(p, {})
        node[fpath[-1]] = arr
    return params


def _is_mask_buffer(key: str, value) -> bool:
    return key.endswith(".attn.bias") and isinstance(value, torch.Tensor) and value.ndim == 4
