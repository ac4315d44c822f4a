"""Names and layouts of the reference (piano-gpt) state_dict, in numpy: no torch needed.

Flax `Dense.kernel` is (in, out) and torch `Linear.weight` is (out, in), so Linear weights are
transposed; LayerNorm `scale` is torch `weight`; embedding tables are copied as they are. The
output head is tied: the state_dict carries the token table under both `transformer.wte.weight`
and `lm_head.weight`, while `named_parameters()` (and so AdamW's parameter indices) lists it once.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np

from piano_gpt_jax.checkpoints.errors import CheckpointError
from piano_gpt_jax.model import N_TIME_STEPS, ModelConfig

COMPILE_PREFIX = "_orig_mod."
TIED_KEYS = ("transformer.wte.weight", "lm_head.weight")
_NORMS = ("ln_1", "ln_2")


class Entry(NamedTuple):
    torch_key: str
    flax_path: tuple[str, ...]
    kind: str  # table | norm | linear | bias
    torch_shape: tuple[int, ...]


def entries(cfg: ModelConfig) -> list[Entry]:
    """Every parameter in the reference's registration (= named_parameters) order, tied once."""
    n, out = cfg.n_embd, []
    out.append(Entry("transformer.wte.weight", ("wte",), "table", (cfg.vocab_size, n)))
    out.append(Entry("transformer.wpe.weight", ("wpe",), "table", (cfg.context_size, n)))
    if cfg.use_time_embedding:
        out.append(Entry("transformer.wmte.weight", ("wmte",), "table", (N_TIME_STEPS, n)))
    linear_shapes = {"attn.c_attn": (3 * n, n), "attn.c_proj": (n, n),
                     "mlp.c_fc": (4 * n, n), "mlp.c_proj": (n, 4 * n)}
    for i in range(cfg.n_layer):
        t, f = f"transformer.h.{i}", f"h_{i}"
        for name in ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj"):
            fpath = (f, *name.split("."))
            if name in _NORMS:
                out.append(Entry(f"{t}.{name}.weight", (*fpath, "scale"), "norm", (n,)))
                if cfg.bias:
                    out.append(Entry(f"{t}.{name}.bias", (*fpath, "bias"), "norm", (n,)))
            else:
                shape = linear_shapes[name]
                out.append(Entry(f"{t}.{name}.weight", (*fpath, "kernel"), "linear", shape))
                if cfg.bias:
                    out.append(Entry(f"{t}.{name}.bias", (*fpath, "bias"), "bias", (shape[0],)))
    out.append(Entry("transformer.ln_f.weight", ("ln_f", "scale"), "norm", (n,)))
    if cfg.bias:
        out.append(Entry("transformer.ln_f.bias", ("ln_f", "bias"), "norm", (n,)))
    return out


def adamw_groups(cfg: ModelConfig) -> tuple[list[Entry], list[Entry]]:
    """The reference's two AdamW parameter groups (decay: >= 2-D, no decay: < 2-D), each in
    named_parameters() order; torch numbers the parameters 0.. across the groups in turn."""
    params = entries(cfg)
    return ([e for e in params if len(e.torch_shape) >= 2],
            [e for e in params if len(e.torch_shape) < 2])


def expected_state_dict_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every key of the reference state_dict (both tied names) with its shape."""
    shapes = {e.torch_key: e.torch_shape for e in entries(cfg)}
    shapes["lm_head.weight"] = (cfg.vocab_size, cfg.n_embd)
    return shapes


def strip_compile_prefix(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Drop torch.compile's `_orig_mod.` prefix (the reference saves the compiled module's keys)."""
    return {k[len(COMPILE_PREFIX):] if k.startswith(COMPILE_PREFIX) else k: v
            for k, v in state_dict.items()}


def get_path(tree: Mapping, path: tuple[str, ...]) -> Any:
    for p in path:
        tree = tree[p]
    return tree


def set_path(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def to_torch_layout(entry: Entry, arr: Any) -> np.ndarray:
    """A Flax-layout array of `entry` as the reference stores it (C-contiguous float32 copy)."""
    arr = np.asarray(arr, dtype=np.float32)
    if entry.kind == "linear":
        arr = arr.T
    if tuple(arr.shape) != entry.torch_shape:
        raise CheckpointError(f"{'/'.join(entry.flax_path)} has shape {arr.shape} but the model "
                              f"config needs {entry.torch_shape} for {entry.torch_key}")
    return np.array(arr, dtype=np.float32, order="C", copy=True)


def to_flax_layout(entry: Entry, arr: Any) -> np.ndarray:
    """The inverse of `to_torch_layout`, checking the reference shape first."""
    arr = np.asarray(arr, dtype=np.float32)
    if tuple(arr.shape) != entry.torch_shape:
        raise CheckpointError(f"{entry.torch_key} has shape {tuple(arr.shape)} but the model "
                              f"config needs {entry.torch_shape}; the checkpoint's model_cfg and "
                              "tensors disagree.")
    return np.ascontiguousarray(arr.T if entry.kind == "linear" else arr).copy()


def params_to_arrays(cfg: ModelConfig, params: Mapping) -> OrderedDict[str, np.ndarray]:
    """Flax params -> reference state_dict as numpy arrays (both tied keys, the same array)."""
    sd: OrderedDict[str, np.ndarray] = OrderedDict()
    for e in entries(cfg):
        try:
            value = get_path(params, e.flax_path)
        except KeyError:
            raise CheckpointError(f"params lack {'/'.join(e.flax_path)} (needed for "
                                  f"{e.torch_key}); the params do not match the model config"
                                  ) from None
        sd[e.torch_key] = to_torch_layout(e, value)
    sd["lm_head.weight"] = sd["transformer.wte.weight"]
    return sd


def arrays_to_params(cfg: ModelConfig, state_dict: Mapping[str, np.ndarray]) -> dict:
    """Reference state_dict (numpy arrays) -> Flax params, checking names, shapes and the tie.

    Accepts `_orig_mod.`-prefixed keys, one or both tied names, and the causal-mask buffers
    (`attn.bias`, 4-D) that old torch versions registered.
    """
    sd = strip_compile_prefix(state_dict)
    mapping = entries(cfg)
    known = {e.torch_key for e in mapping} | {"lm_head.weight"}
    unexpected = [k for k in sd if k not in known and not _is_mask_buffer(k, sd[k])]
    if unexpected:
        raise CheckpointError(
            f"unexpected parameter name(s) {unexpected[:5]} in the state_dict for a model with "
            f"n_layer={cfg.n_layer}, bias={cfg.bias}, time embedding={cfg.use_time_embedding}; "
            "the weights do not belong to this architecture.")
    if "transformer.wte.weight" not in sd and "lm_head.weight" in sd:
        sd["transformer.wte.weight"] = sd["lm_head.weight"]
    missing = [e.torch_key for e in mapping if e.torch_key not in sd]
    if missing:
        raise CheckpointError(f"state_dict lacks {missing[:5]} needed by the model config "
                              f"(n_layer={cfg.n_layer}, bias={cfg.bias}).")
    if "lm_head.weight" in sd and not np.array_equal(np.asarray(sd["lm_head.weight"]),
                                                      np.asarray(sd["transformer.wte.weight"])):
        raise CheckpointError("lm_head.weight differs from transformer.wte.weight: the output "
                              "head is not tied to the token embedding, which this model needs.")
    params: dict = {}
    for e in mapping:
        set_path(params, e.flax_path, to_flax_layout(e, sd[e.torch_key]))
    return params


def _is_mask_buffer(key: str, value: Any) -> bool:
    return key.endswith(".attn.bias") and getattr(value, "ndim", 0) == 4
