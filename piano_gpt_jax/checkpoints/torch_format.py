"""piano-gpt's `.pt` checkpoint format: the one place that reads and writes it.

torch is imported inside the functions that need it, so everything else in the package (and
every tool that only reads orbax directories) works without torch installed.

Reading never runs the file's pickle: torch's weights-only unpickler with an allow-list of
tensors, containers and stand-ins for OmegaConf's classes (omegaconf_stubs.py); anything else is
refused before it runs. Writing produces the dict piano-gpt's trainer saves (reference section
2.1): `run_config` (a nested OmegaConf DictConfig in both vocabularies, run_config.py),
`model` (state_dict, both tied names), `model_cfg` (the run_config.model node), `run_name`,
`train_loss`, `val_loss`, `run_stats` {iter, total_tokens, running_mfu, best_val_loss},
`optimizer` (torch.optim.AdamW's state_dict for the reference's two parameter groups),
`tokenizer_desc`, `wandb_id` — plus `piano_gpt_jax_meta` (the rest of our RunMeta) which
piano-gpt ignores.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import re
import tempfile
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from piano_gpt_jax.checkpoints import state_dict as sd_lib
from piano_gpt_jax.checkpoints.errors import CheckpointError
from piano_gpt_jax.checkpoints.omegaconf_stubs import allowed_globals, to_plain
from piano_gpt_jax.checkpoints.record import (
    AdamState,
    CheckpointRecord,
    RunMeta,
    finite_or_none,
    jsonable,
)
from piano_gpt_jax.checkpoints.run_config import export_run_config, split_run_config
from piano_gpt_jax.model import ModelConfig
from piano_gpt_jax.music.tokenizer import desc_vocabulary

META_KEY = "piano_gpt_jax_meta"
# What torch.optim.AdamW (fused, as piano-gpt builds it) stores per parameter group.
_ADAMW_GROUP = {"amsgrad": False, "maximize": False, "foreach": None, "capturable": False,
                "differentiable": False, "fused": True, "decoupled_weight_decay": True}
_RUN_STATS_KEYS = ("iter", "total_tokens", "running_mfu", "best_val_loss")
_BEST_UNSET = 1e9  # piano-gpt's RunStats.best_val_loss before any evaluation


# ------------------------------------------------------------------------------ safe reading
def torch_load_restricted(path: str | Path) -> Any:
    """`torch.load` on CPU that refuses anything but tensors, containers and omegaconf configs.

    Omegaconf objects come back as stubs; use `to_plain` to turn them into dicts.
    """
    import torch

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file; pass the path of a .pt checkpoint.")
    if not path.is_file():
        raise CheckpointError(f"{path}: is not a file; pass the path of a .pt checkpoint.")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"{path}: not a PyTorch zip checkpoint (truncated, corrupt, or another format). "
            "Re-copy the file, or re-save it with torch.save in a current torch.")
    try:
        with torch.serialization.safe_globals(allowed_globals()):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=False)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: refused to load: its pickle asks for something outside the allow-list of "
            f"tensors, containers and OmegaConf configs ({_short_reason(str(e))}). Nothing from it "
            "was executed. Only load checkpoints you trust, from their original source."
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, KeyError, OSError) as e:
        raise CheckpointError(
            f"{path}: could not read the checkpoint ({type(e).__name__}: {str(e)[:200]}); "
            "the file is probably truncated or corrupt — re-copy it.") from None


def _short_reason(msg: str) -> str:
    """What torch's refusal names (`GLOBAL posix.system`), without its advice to load with
    weights_only=False, which is exactly what must not be done with such a file."""
    msg = re.sub(r"\x1b\[[0-9;]*m", "", msg)  # torch colours its hint; keep the line plain
    m = re.search(r"(GLOBAL [\w.]+|function [^\s]+|got <[^>]+>|Unsupported operand \d+)",
                  msg)
    return m.group(0) if m else "an object of a type it does not allow"


def load_checkpoint_dict(path: str | Path) -> dict:
    """The checkpoint's top-level dict, with every omegaconf config turned into plain values."""
    obj = torch_load_restricted(path)
    if not isinstance(obj, dict):
        raise CheckpointError(
            f"{path}: holds a {type(obj).__name__}, not a checkpoint dict with a 'model' entry; "
            "pass a checkpoint written by the piano-gpt trainer or by converters.")
    return {k: (v if k in ("model", "optimizer") else to_plain(v)) for k, v in obj.items()}


# ------------------------------------------------------------------------------ state dicts
def params_to_state_dict(cfg: ModelConfig, params: Mapping) -> OrderedDict:
    """Flax params -> reference state_dict of float32 CPU tensors (tied keys share one tensor)."""
    import torch

    arrays = sd_lib.params_to_arrays(cfg, params)
    out: OrderedDict = OrderedDict((k, torch.from_numpy(v)) for k, v in arrays.items()
                                   if k != "lm_head.weight")
    out["lm_head.weight"] = out["transformer.wte.weight"]
    return out


def state_dict_to_params(cfg: ModelConfig, state_dict: Mapping[str, Any]) -> dict:
    """Reference state_dict (tensors) -> Flax params of float32 numpy arrays (names checked)."""
    arrays = {}
    for key, value in state_dict.items():
        if not _is_tensor(value):
            raise CheckpointError(f"{key} is a {type(value).__name__}, not a tensor")
        arrays[key] = _numpy(value)
    return sd_lib.arrays_to_params(cfg, arrays)


def _is_tensor(value: Any) -> bool:
    return type(value).__module__.startswith("torch") and hasattr(value, "detach")


def _numpy(t: Any) -> np.ndarray:
    import torch

    return t.detach().to("cpu", torch.float32).numpy().copy()


def infer_model_config(model_cfg: Mapping, state_dict: Mapping[str, Any]) -> ModelConfig:
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
    if not _is_tensor(wte) or wte.ndim != 2:
        raise CheckpointError("state_dict has no 2-D transformer.wte.weight / lm_head.weight; "
                              "cannot infer vocab_size.")
    context = model_cfg.get("context_size")
    if isinstance(context, bool) or not isinstance(context, int):
        if not _is_tensor(wpe) or wpe.ndim != 2:
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


# ------------------------------------------------------------------------------ optimizer
def optimizer_state_dict(cfg: ModelConfig, adam: AdamState) -> dict:
    """`torch.optim.AdamW.state_dict()` for piano-gpt's two parameter groups (decay: >= 2-D,
    no decay: < 2-D; indices in named_parameters() order, the tied matrix once)."""
    import torch

    state: dict[int, dict] = {}
    groups = []
    index = 0
    for entries, decay in zip(sd_lib.adamw_groups(cfg), (adam.weight_decay, 0.0), strict=True):
        ids = []
        for e in entries:
            state[index] = {
                "step": torch.tensor(float(adam.count), dtype=torch.float32),
                "exp_avg": torch.from_numpy(
                    sd_lib.to_torch_layout(e, sd_lib.get_path(adam.mu, e.flax_path))),
                "exp_avg_sq": torch.from_numpy(
                    sd_lib.to_torch_layout(e, sd_lib.get_path(adam.nu, e.flax_path))),
            }
            ids.append(index)
            index += 1
        groups.append({"weight_decay": float(decay), "lr": float(adam.lr),
                       "betas": (float(adam.b1), float(adam.b2)), "eps": float(adam.eps),
                       **_ADAMW_GROUP, "params": ids})
    return {"state": state, "param_groups": groups}


def adam_state_from_torch(cfg: ModelConfig, optimizer: Any, where: str) -> AdamState:
    """AdamState from an AdamW state_dict of piano-gpt's layout; CheckpointError naming the
    first disagreement (group sizes, a parameter's shapes, mixed step counts)."""
    if not isinstance(optimizer, Mapping) or not {"state", "param_groups"} <= set(optimizer):
        raise CheckpointError(f"{where}: 'optimizer' is not a torch optimizer state_dict (no "
                              "'state' / 'param_groups').")
    groups, state = optimizer["param_groups"], optimizer["state"]
    expected = sd_lib.adamw_groups(cfg)
    sizes = [len(g.get("params", ())) for g in groups]
    if sizes != [len(e) for e in expected]:
        raise CheckpointError(
            f"{where}: the optimizer has parameter groups of sizes {sizes}, but this model "
            f"needs [{len(expected[0])}, {len(expected[1])}] (AdamW decay group: the >= 2-D "
            "tensors, no-decay group: the rest); it was saved for another model.")
    mu: dict = {}
    nu: dict = {}
    counts = set()
    for group, entries in zip(groups, expected, strict=True):
        for index, e in zip(group["params"], entries, strict=True):
            s = state.get(index, state.get(str(index)))
            if not isinstance(s, Mapping) or not {"step", "exp_avg", "exp_avg_sq"} <= set(s):
                raise CheckpointError(f"{where}: the optimizer holds no AdamW state (step, "
                                      f"exp_avg, exp_avg_sq) for parameter {index} "
                                      f"({e.torch_key}).")
            for name, tree in (("exp_avg", mu), ("exp_avg_sq", nu)):
                value = s[name]
                if not _is_tensor(value) or tuple(value.shape) != e.torch_shape:
                    raise CheckpointError(
                        f"{where}: optimizer {name} of parameter {index} ({e.torch_key}) has "
                        f"shape {tuple(getattr(value, 'shape', ()))}, but the model needs "
                        f"{e.torch_shape}; the optimizer does not belong to these weights.")
                sd_lib.set_path(tree, e.flax_path, sd_lib.to_flax_layout(e, _numpy(value)))
            step = s["step"]
            counts.add(float(step.item() if _is_tensor(step) else step))
    if len(counts) != 1:
        raise CheckpointError(f"{where}: the optimizer's parameters were stepped a different "
                              f"number of times ({sorted(counts)[:4]}); cannot continue it.")
    g0 = groups[0]
    betas = tuple(g0.get("betas", (0.9, 0.999)))
    return AdamState(count=int(counts.pop()), mu=mu, nu=nu, lr=float(g0.get("lr", 0.0)),
                     b1=float(betas[0]), b2=float(betas[1]), eps=float(g0.get("eps", 1e-8)),
                     weight_decay=float(g0.get("weight_decay", 0.0)))


# ------------------------------------------------------------------------------ .pt files
def load_torch_checkpoint(path: str | Path, with_optimizer: bool = False) -> CheckpointRecord:
    """A piano-gpt `.pt` (current or legacy layout) or one of our exports, without running its
    pickle. With `with_optimizer`, its AdamW state too (CheckpointError when absent or when it
    does not match the weights)."""
    path = Path(path)
    ckpt = load_checkpoint_dict(path)
    if "model" not in ckpt:
        raise CheckpointError(f"{path}: no 'model' entry (found keys {sorted(ckpt)[:12]}); "
                              "this is not a piano-gpt training checkpoint.")
    if not isinstance(ckpt["model"], Mapping):
        raise CheckpointError(f"{path}: 'model' is a {type(ckpt['model']).__name__}, "
                              "not a state_dict")
    state_dict = sd_lib.strip_compile_prefix(ckpt["model"])
    try:
        meta = _read_meta(ckpt, path)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    run_config = ckpt.get("run_config") if isinstance(ckpt.get("run_config"), dict) else {}
    model_cfg = ckpt.get("model_cfg")
    if not isinstance(model_cfg, dict) and isinstance(run_config.get("model"), dict):
        model_cfg = run_config["model"]
    if not isinstance(model_cfg, dict):
        raise CheckpointError(f"{path}: no usable 'model_cfg' (n_layer, n_head, n_embd, ...); "
                              "cannot tell the architecture.")
    try:
        model_config = infer_model_config(model_cfg, state_dict)
        params = state_dict_to_params(model_config, state_dict)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    tokenizer_desc = jsonable(ckpt.get("tokenizer_desc"))
    _check_vocab(path, tokenizer_desc, model_config.vocab_size)
    optimizer = None
    if with_optimizer:
        if "optimizer" not in ckpt:
            raise CheckpointError(
                f"{path} holds no optimizer state (a legacy or weights-only checkpoint), so its "
                "training cannot be continued; drop init_optimizer to fine-tune it with a fresh "
                "optimizer.")
        optimizer = adam_state_from_torch(model_config, ckpt["optimizer"], str(path))
    return CheckpointRecord(model_config, params, tokenizer_desc, meta, optimizer)


def _read_meta(ckpt: Mapping, path: Path) -> RunMeta:
    """RunMeta from either layout (`run_stats` now; `iter_num`, ... in legacy files)."""
    config, reference = split_run_config(ckpt.get("run_config"))
    run_stats = ckpt.get("run_stats") if isinstance(ckpt.get("run_stats"), Mapping) else None
    if run_stats is not None:
        step, tokens = run_stats.get("iter"), run_stats.get("total_tokens")
        best, mfu = run_stats.get("best_val_loss"), run_stats.get("running_mfu", -1.0)
    else:
        step, tokens = ckpt.get("iter_num"), ckpt.get("total_tokens")
        best, mfu = ckpt.get("best_val_loss"), -1.0
    best = finite_or_none(best)
    ours = jsonable(ckpt.get(META_KEY)) if isinstance(ckpt.get(META_KEY), Mapping) else {}
    extra = {k: jsonable(ckpt[k]) for k in ("wandb", "wandb_run_name", "piano_tasks_config")
             if k in ckpt}
    meta = RunMeta(
        step=int(finite_or_none(step) or 0), total_tokens=int(finite_or_none(tokens) or 0),
        train_loss=finite_or_none(ckpt.get("train_loss")),
        val_loss=finite_or_none(ckpt.get("val_loss")),
        best_val_loss=None if best is None or best >= _BEST_UNSET else best,
        running_mfu=finite_or_none(mfu) if finite_or_none(mfu) is not None else -1.0,
        run_name=ckpt.get("run_name") or ckpt.get("wandb_run_name"), config=config,
        reference_run_config=jsonable(reference), wandb_id=ckpt.get("wandb_id"),
        source=str(path), extra=extra)
    # Every other field of ours comes back as written (a field added to RunMeta travels through
    # .pt files without being listed here); the configs are read above, `source` is this file.
    for f in dataclasses.fields(RunMeta):
        if f.name in ours and f.name not in ("config", "reference_run_config", "source"):
            setattr(meta, f.name, ours[f.name])
    return meta


def _check_vocab(path: Path, tokenizer_desc: Any, vocab_size: int) -> None:
    if not isinstance(tokenizer_desc, dict):
        return
    vocab = desc_vocabulary(tokenizer_desc)
    if isinstance(vocab, list) and len(vocab) != vocab_size:
        raise CheckpointError(f"{path}: tokenizer_desc has {len(vocab)} tokens but the token "
                              f"table has {vocab_size} rows; the tokenizer and weights disagree.")


def save_torch_checkpoint(path: str | Path, record: CheckpointRecord) -> Path:
    """Write `record` in piano-gpt's layout (module docstring) so its own tools load, evaluate,
    tune and resume from it. Atomic: written to a temporary name and renamed, so a failure
    leaves `path` untouched. Without omegaconf installed, the configs are nested
    `types.SimpleNamespace`s (attribute access works; OmegaConf.merge does not)."""
    import torch

    path = Path(path)
    if not path.parent.is_dir():
        raise CheckpointError(f"{path.parent}: directory does not exist; create it first.")
    cfg, meta = record.model_config, record.meta
    state_dict = params_to_state_dict(cfg, record.params)
    run_config_obj, model_cfg_obj = _config_objects(
        export_run_config(meta, cfg, record.tokenizer_desc))
    n_params = sum(t.numel() for k, t in state_dict.items()
                   if k not in ("lm_head.weight", "transformer.wpe.weight"))
    run_name = meta.run_name or "converted"
    if not re.match(r"^\d+M-", run_name):  # piano-gpt names runs "{params}M-{suffix}"
        run_name = f"{n_params / 1e6:.0f}M-{run_name}"
    ckpt: dict[str, Any] = {
        "run_config": run_config_obj,
        "model": state_dict,
        "run_name": run_name,
        "model_cfg": model_cfg_obj,
        "train_loss": _or_nan(meta.train_loss),
        "val_loss": _or_nan(meta.val_loss),
        "run_stats": {"iter": int(meta.step), "total_tokens": int(meta.total_tokens),
                      "running_mfu": float(meta.running_mfu),
                      "best_val_loss": _BEST_UNSET if meta.best_val_loss is None
                      else float(meta.best_val_loss)},
        "tokenizer_desc": record.tokenizer_desc,
    }
    if record.optimizer is not None:
        ckpt["optimizer"] = optimizer_state_dict(cfg, record.optimizer)
    if meta.wandb_id:
        ckpt["wandb_id"] = str(meta.wandb_id)
    ckpt[META_KEY] = {k: v for k, v in meta.to_json().items()
                      if k not in ("config", "reference_run_config")}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would hide the export from others
        torch.save(ckpt, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _or_nan(value: float | None) -> float:
    return float("nan") if value is None else float(value)


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


__all__ = ["adam_state_from_torch", "infer_model_config", "load_checkpoint_dict",
           "load_torch_checkpoint", "optimizer_state_dict", "params_to_state_dict",
           "save_torch_checkpoint", "state_dict_to_params", "torch_load_restricted"]
