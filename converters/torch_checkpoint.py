"""Read and write checkpoints in the PyTorch trainer's (piano-gpt) `.pt` layout."""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from piano_gpt_jax.model import ModelConfig

from .safe_load import CheckpointError, load_checkpoint_dict
from .state_dict import params_to_state_dict, state_dict_to_params, strip_compile_prefix

MODEL_CFG_KEYS = ("n_layer", "n_head", "n_embd", "dropout", "bias", "context_size")


@dataclasses.dataclass
class TorchCheckpoint:
    """What a `.pt` holds, in our terms; `params` are float32 numpy arrays in the Flax tree."""

    model_config: ModelConfig
    params: dict
    tokenizer_desc: dict | None
    metadata: dict
    step: int = 0


def load_torch_checkpoint(path: str | Path) -> TorchCheckpoint:
    """A reference (current or legacy layout) or exported `.pt`, read without running its pickle."""
    path = Path(path)
    ckpt = load_checkpoint_dict(path)
    if "model" not in ckpt:
        raise CheckpointError(f"{path}: no 'model' entry (found keys {sorted(ckpt)[:12]}); "
                              "this is not a piano-gpt training checkpoint.")
    if not isinstance(ckpt["model"], Mapping):
        raise CheckpointError(f"{path}: 'model' is a {type(ckpt['model']).__name__}, "
                              "not a state_dict")
    state_dict = strip_compile_prefix(ckpt["model"])
    run_config = ckpt.get("run_config") if isinstance(ckpt.get("run_config"), dict) else None
    model_cfg = ckpt.get("model_cfg")
    if not isinstance(model_cfg, dict) and run_config and isinstance(run_config.get("model"), dict):
        model_cfg = run_config["model"]
    if not isinstance(model_cfg, dict):
        raise CheckpointError(f"{path}: no usable 'model_cfg' (n_layer, n_head, n_embd, ...); "
                              "cannot tell the architecture.")
    try:
        model_config = infer_model_config(model_cfg, state_dict)
        params = state_dict_to_params(model_config, state_dict)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    tokenizer_desc = ckpt.get("tokenizer_desc")
    _check_vocab(path, tokenizer_desc, model_config.vocab_size)
    metadata = _metadata(ckpt, run_config, path)
    return TorchCheckpoint(model_config, params, to_jsonable(tokenizer_desc), metadata,
                           int(metadata.get("iteration") or 0))


def infer_model_config(model_cfg: Mapping, state_dict: Mapping[str, torch.Tensor]) -> ModelConfig:
    """ModelConfig from the checkpoint's model_cfg plus what only the tensors tell.

    vocab_size is not in the reference model_cfg (it comes from the tokenizer): take it from the
    token table. context_size may be an unresolvable interpolation: then take the position rows.
    The time embedding's presence is decided by its tensor.
    """
    fields = {}
    for key in ("n_layer", "n_head", "n_embd"):
        value = model_cfg.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise CheckpointError(f"model_cfg.{key} is {value!r}; a positive integer is needed.")
        fields[key] = value
    wte = state_dict.get("transformer.wte.weight", state_dict.get("lm_head.weight"))
    wpe = state_dict.get("transformer.wpe.weight")
    if not isinstance(wte, torch.Tensor) or wte.ndim != 2:
        raise CheckpointError("state_dict has no 2-D transformer.wte.weight / lm_head.weight; "
                              "cannot infer vocab_size.")
    context = model_cfg.get("context_size")
    if isinstance(context, bool) or not isinstance(context, int):
        if not isinstance(wpe, torch.Tensor) or wpe.ndim != 2:
            raise CheckpointError(f"model_cfg.context_size is {context!r} and the state_dict has "
                                  "no transformer.wpe.weight to infer it from.")
        context = int(wpe.shape[0])
    bias = model_cfg.get("bias")
    if not isinstance(bias, bool):
        bias = "transformer.ln_f.bias" in state_dict
    dropout = model_cfg.get("dropout", 0.0)
    try:
        return ModelConfig(
            vocab_size=int(wte.shape[0]), context_size=context, bias=bias,
            dropout=float(dropout) if isinstance(dropout, (int, float)) else 0.0,
            use_time_embedding="transformer.wmte.weight" in state_dict, **fields)
    except ValueError as e:
        raise CheckpointError(f"invalid model_cfg: {e}") from None


def _check_vocab(path: Path, tokenizer_desc: Any, vocab_size: int) -> None:
    if not isinstance(tokenizer_desc, dict):
        return
    params = tokenizer_desc.get("parameters") or {}
    vocab = params.get("vocab")
    if vocab is None and isinstance(params.get("lexicon"), dict):
        vocab = params["lexicon"].get("vocab")
    if isinstance(vocab, list) and len(vocab) != vocab_size:
        raise CheckpointError(f"{path}: tokenizer_desc has {len(vocab)} tokens but the token "
                              f"table has {vocab_size} rows; the tokenizer and weights disagree.")


def _metadata(ckpt: dict, run_config: dict | None, path: Path) -> dict:
    """Training bookkeeping from either layout (`run_stats` now; `iter_num`... in legacy files)."""
    run_stats = ckpt.get("run_stats") if isinstance(ckpt.get("run_stats"), dict) else None
    meta: dict[str, Any] = {
        "source": str(path),
        "source_layout": "current" if run_stats is not None else "legacy",
        "run_config": run_config or {},
        "run_name": ckpt.get("run_name") or ckpt.get("wandb_run_name"),
        "train_loss": ckpt.get("train_loss"),
        "val_loss": ckpt.get("val_loss"),
    }
    if run_stats is not None:
        meta["run_stats"] = run_stats
        meta["iteration"] = run_stats.get("iter")
        meta["total_tokens"] = run_stats.get("total_tokens")
        meta["best_val_loss"] = run_stats.get("best_val_loss")
    else:
        meta["iteration"] = ckpt.get("iter_num")
        meta["total_tokens"] = ckpt.get("total_tokens")
        meta["best_val_loss"] = ckpt.get("best_val_loss")
    for key in ("wandb_id", "wandb", "piano_tasks_config"):
        if key in ckpt:
            meta[key] = ckpt[key]
    return to_jsonable(meta)


def to_jsonable(obj: Any) -> Any:
    """Plain JSON values (tensors/numpy scalars to numbers, tuples to lists, keys to str)."""
    if isinstance(obj, torch.Tensor):
        return obj.item() if obj.numel() == 1 else obj.detach().cpu().tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else obj
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return repr(obj)


def save_torch_checkpoint(path: str | Path, model_config: ModelConfig, params: Mapping,
                          tokenizer_desc: dict | None = None, metadata: dict | None = None) -> Path:
    """Write the reference layout so piano-gpt's own code can load, evaluate and resume from it.

    `model_cfg` and `run_config` are OmegaConf DictConfigs (what the reference reads, by
    attribute); without omegaconf installed they are nested `types.SimpleNamespace`s, which the
    reference's GPT(...) also reads but its resume/tune paths (OmegaConf.merge) do not.
    The file is written to a temporary name and renamed, so a failure leaves `path` untouched.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise CheckpointError(f"{path.parent}: directory does not exist; create it first.")
    metadata = dict(metadata or {})
    state_dict = params_to_state_dict(model_config, params)
    model_cfg = {k: getattr(model_config, k) for k in MODEL_CFG_KEYS}
    run_config = dict(metadata.get("run_config") or {})
    run_config["model"] = model_cfg  # HEAD builds the model from run_config.model
    run_config_obj, model_cfg_obj = _config_objects(run_config)
    n_params = sum(t.numel() for k, t in state_dict.items()
                   if k not in ("lm_head.weight", "transformer.wpe.weight"))
    run_stats = metadata.get("run_stats") or {
        "iter": int(metadata.get("iteration") or 0),
        "total_tokens": int(metadata.get("total_tokens") or 0),
        "running_mfu": -1.0,
        "best_val_loss": _float(metadata.get("best_val_loss"), 1e9),
    }
    ckpt = {
        "run_config": run_config_obj,
        "model": state_dict,
        "run_name": metadata.get("run_name") or f"{n_params / 1e6:.0f}M-converted",
        "model_cfg": model_cfg_obj,
        "train_loss": _float(metadata.get("train_loss"), float("nan")),
        "val_loss": _float(metadata.get("val_loss"), float("nan")),
        "run_stats": dict(run_stats),
        "tokenizer_desc": tokenizer_desc,
    }
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(ckpt, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _float(value: Any, default: float) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) \
        else default


def _config_objects(run_config: dict) -> tuple[Any, Any]:
    try:
        from omegaconf import OmegaConf
    except ImportError:
        ns = _namespace(run_config)
        return ns, ns.model
    cfg = OmegaConf.create(run_config)
    return cfg, cfg.model  # a node of the run config, as the reference stores it


def _namespace(value: Any) -> Any:
    if isinstance(value, Mapping):
        return SimpleNamespace(**{str(k): _namespace(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return [_namespace(v) for v in value]
    return value
