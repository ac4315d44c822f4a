"""A run's config in both vocabularies: ours (configs/piano.py) and piano-gpt's (Hydra schema).

An exported `.pt` carries one nested `run_config` that piano-gpt's own tools navigate (resume,
piano_eval, model tuning, the dashboard read `run_cfg.system.compile`, `run_cfg.model_task`,
`run_cfg.training.*`, `run_cfg.lr` ... by attribute, reference document sections 2.2, 3.1, 6)
and that holds our whole config too:

  * every key piano-gpt reads, in its schema, at the top level;
  * our keys whose names piano-gpt does not use (`stage`, `data`, `seed`, ...) beside them;
  * our whole config, untouched, under OUR_KEY. Where the two vocabularies share a name
    (`tasks`, `model`, `system`, `lr`, ...) the reference's form is the top-level one.

Reading goes the other way: `split_run_config` takes a run_config in any form we have written or
piano-gpt writes and returns our nested config (plus the reference one, kept verbatim).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from piano_gpt_jax import config as config_lib
from piano_gpt_jax.checkpoints.errors import CheckpointError
from piano_gpt_jax.model import ModelConfig
from piano_gpt_jax.music.layouts import ANNOTATED, checkpoint_layout
from piano_gpt_jax.music.tasks import PianoTask, resolve_tasks
from piano_gpt_jax.music.tokenizer import desc_vocabulary

if TYPE_CHECKING:
    from piano_gpt_jax.checkpoints.record import RunMeta

OUR_KEY = "piano_gpt_jax"
TOKENIZER_CLASS = "ExponentialTimeTokenizer"
MODEL_CFG_KEYS = ("n_layer", "n_head", "n_embd", "dropout", "bias", "context_size")
# Top-level keys of piano-gpt's run config (f37ac14 and HEAD, section 3.1 and 3.3).
REFERENCE_KEYS = ("command", "run_name_suffix", "model_task", "out_dir_relative", "out_dir",
                  "eval_interval", "eval_iters", "training", "ddp", "system", "logging", "model",
                  "tokenizer", "dataset", "lr", "optimizer", "tasks", "checkpoint_path",
                  "overrides")
_REFERENCE_ONLY = {"command", "run_name_suffix", "model_task", "out_dir_relative", "training",
                   "checkpoint_path", "overrides"}
HEAD_MIN_N_TASK_NOTES = 24  # piano-gpt HEAD's training.min_n_task_notes


# ------------------------------------------------------------------------------------ reading
def split_run_config(run_config: Any) -> tuple[dict, dict | None]:
    """(our nested config, piano-gpt's run_config or None) from any run_config we may meet.

    Forms: ours (new exports: under OUR_KEY; older exports: flat dotted keys; legacy piano-gpt
    and our own nested files: our key names), piano-gpt's Hydra schema (translated to ours), or
    nothing. Anything else is a CheckpointError: we cannot tell how the model was trained.
    """
    if run_config is None or (isinstance(run_config, Mapping) and not run_config):
        return {}, None
    if not isinstance(run_config, Mapping):
        raise CheckpointError(f"run_config is a {type(run_config).__name__}, not a config "
                              "mapping; it is in neither piano-gpt's nor piano-gpt-jax's "
                              "vocabulary.")
    if isinstance(run_config.get(OUR_KEY), Mapping):
        return _ours(run_config[OUR_KEY]), None
    if any("." in str(k) for k in run_config):  # exports before the nested schema
        return _ours(config_lib.nest(run_config)), None
    keys = set(map(str, run_config))
    if keys & _REFERENCE_ONLY:
        return translate_reference(run_config), copy.deepcopy(dict(run_config))
    ours_top = {k.split(".", 1)[0] for k in config_lib.SCHEMA}
    if keys & ours_top:
        return _ours(run_config), None
    if keys & set(REFERENCE_KEYS):
        return translate_reference(run_config), copy.deepcopy(dict(run_config))
    raise CheckpointError(
        f"run_config has none of the keys piano-gpt or piano-gpt-jax write (found "
        f"{sorted(keys)[:8]}); it is in neither vocabulary, so the run cannot be continued or "
        "re-exported. Re-save the checkpoint with piano-gpt or export it with "
        "converters.jax_to_torch.")


def _ours(nested: Mapping) -> dict:
    """Our keys only, nested (unknown keys from other versions dropped)."""
    flat = config_lib.flatten(nested)
    return config_lib.nest({k: v for k, v in flat.items() if k in config_lib.SCHEMA})


def _put(out: dict, key: str, value: Any) -> None:
    """Set dotted `key` when `value` has a type our schema accepts for it."""
    types, _ = config_lib.SCHEMA[key]
    if value is None or (isinstance(value, bool) and bool not in types):
        return
    if isinstance(value, list):
        value = tuple(value)
    if isinstance(value, types):
        out[key] = value


def translate_reference(rc: Mapping) -> dict:
    """Our nested config from piano-gpt's run_config (what can be expressed in ours)."""
    get = lambda path, default=None: _get(rc, path, default)
    flat: dict[str, Any] = {}
    model_task = get("model_task")
    if model_task is not None:
        flat["stage"] = "piano_task" if model_task == "piano_task" else "next_token_pretraining"
    if isinstance(get("training.prompt_masking"), bool):
        flat["loss_masking"] = "finetuning" if get("training.prompt_masking") else "pretraining"
    try:
        if isinstance(get("tasks"), Sequence) and not isinstance(get("tasks"), str):
            flat["tasks"] = tuple(t.task_name for t in resolve_tasks(list(get("tasks"))))
    except ValueError:
        pass  # task classes we do not know: keep our default
    for key in MODEL_CFG_KEYS:
        _put(flat, f"model.{key}", get(f"model.{key}"))
    _put(flat, "data.context_size", get("training.context_size"))
    _put(flat, "data.notes_per_record",
         get("training.notes_per_record", get("training.max_notes_per_record")))
    accumulation_steps, batch, micro = (
        get(f"training.{key}")
        for key in ("gradient_accumulation_steps", "batch_size", "microbatch_size"))
    if isinstance(batch, int) and isinstance(accumulation_steps, int) and accumulation_steps > 0:
        _put(flat, "data.batch_size", batch // accumulation_steps)
        _put(flat, "optimizer.gradient_accumulation_steps", accumulation_steps)
    elif isinstance(batch, int) and isinstance(micro, int) and micro > 0:
        _put(flat, "data.batch_size", micro)
        _put(flat, "optimizer.gradient_accumulation_steps", max(batch // micro, 1))
    device = get("system.device")
    if isinstance(device, str):
        _put(flat, "system.device", "cpu" if device.split(":")[0] in ("cpu", "mps") else device)
    for key in ("dtype", "compile", "data_workers"):
        _put(flat, f"system.{key}", get(f"system.{key}"))
    _put(flat, "ddp.backend", get("ddp.backend"))
    for key in ("base_dataset_name", "extra_datasets", "pause_detection_threshold",
                "augmentation.speed_change_factors", "augmentation.max_pitch_shift"):
        _put(flat, f"dataset.{key}", get(f"dataset.{key}"))
    for key in ("time_unit", "max_time_step", "n_velocity_bins", "n_special_ids"):
        _put(flat, f"tokenizer.{key}", get(f"tokenizer.config.{key}"))
    for key in ("weight_decay", "max_iters", "beta1", "beta2", "grad_clip"):
        _put(flat, f"optimizer.{key}", get(f"optimizer.{key}"))
    for key in ("learning_rate", "min_lr", "warmup_iters", "lr_decay_iters"):
        _put(flat, f"lr.{key}", get(f"lr.{key}"))
    if get("lr.type") is not None:
        flat["lr.decay_lr"] = get("lr.type") != "Constant"
    for key in ("eval_interval", "eval_iters"):
        _put(flat, key, get(key))
    for key in ("wandb_log", "wandb_project", "wandb_entity", "log_interval"):
        _put(flat, f"logging.{key}", get(f"logging.{key}"))
    _put(flat, "out_dir", get("out_dir_relative", get("out_dir")))
    return config_lib.nest(flat)


def _get(tree: Any, path: str, default: Any = None) -> Any:
    for part in path.split("."):
        if not isinstance(tree, Mapping) or part not in tree:
            return default
        tree = tree[part]
    return tree


# ------------------------------------------------------------------------------------ writing
def export_run_config(meta: RunMeta, model_config: ModelConfig,
                      tokenizer_desc: Mapping | None = None) -> dict:
    """The nested run_config of a `.pt` export (see the module docstring), as plain values."""
    model_cfg = {k: getattr(model_config, k) for k in MODEL_CFG_KEYS}
    if meta.config:
        ours = meta.config
    elif meta.reference_run_config:
        ours = translate_reference(meta.reference_run_config)
    else:
        ours = {}
    ours = config_lib.complete(ours)
    # The weights decide the architecture, whatever the config said.
    ours["model"].update({k: model_cfg[k] for k in MODEL_CFG_KEYS if k != "dropout"},
                         use_time_embedding=model_config.use_time_embedding)
    reference = reference_form(ours, meta, model_cfg, tokenizer_desc)
    if not meta.config and meta.reference_run_config:
        reference.update(copy.deepcopy(meta.reference_run_config))  # the file's own form wins
        reference["model"] = {**_mapping(reference.get("model")), **model_cfg}
    merged = {k: v for k, v in copy.deepcopy(ours).items() if k not in reference}
    merged.update(reference)
    merged[OUR_KEY] = ours
    return merged


def _mapping(value: Any) -> dict:
    return dict(value) if isinstance(value, Mapping) else {}


def reference_form(ours: Mapping, meta: RunMeta, model_cfg: Mapping,
                   tokenizer_desc: Mapping | None) -> dict:
    """Every key piano-gpt's tools read, in its schema, from our (complete) config."""
    c = config_lib.flatten(ours)
    stage = c["stage"]
    layout = checkpoint_layout(meta.prompt_layout, desc_vocabulary(tokenizer_desc))
    accumulation_steps = int(c["optimizer.gradient_accumulation_steps"])
    n_devices = max(int(meta.n_devices or 1), 1)
    micro = int(c["data.batch_size"])
    training: dict[str, Any] = {
        "prompt_masking": c["loss_masking"] == "finetuning",
        "context_size": int(c["data.context_size"]),
        "notes_per_record": int(c["data.notes_per_record"]),
        "batch_size": micro * accumulation_steps,  # global: what the model sees per update
        "microbatch_size": max(micro // n_devices, 1),  # per device
        "gradient_accumulation_steps": accumulation_steps,
    }
    if stage == "piano_task" and layout == ANNOTATED:
        n = int(c["data.notes_per_record"])
        training.update(min_n_task_notes=max(min(HEAD_MIN_N_TASK_NOTES, n - 2), 0),
                        min_notes_per_record=n, max_notes_per_record=n)
    if c["lr.decay_lr"]:
        lr = {"type": "CosineDecay", "decay_lr": True, "warmup_iters": int(c["lr.warmup_iters"]),
              "lr_decay_iters": int(c["lr.lr_decay_iters"]), "min_lr": float(c["lr.min_lr"]),
              "learning_rate": float(c["lr.learning_rate"])}
    else:
        lr = {"type": "Constant", "learning_rate": float(c["lr.learning_rate"])}
    device = str(c["system.device"])
    out_dir = str(c["out_dir"])
    run_name = meta.run_name or out_dir.rstrip("/").rsplit("/", 1)[-1]
    return {
        "command": "init",
        "run_name_suffix": run_name,
        "model_task": "piano_task" if stage == "piano_task" else "next_token_prediction",
        "out_dir_relative": out_dir,
        "out_dir": _absolute(out_dir),
        "eval_interval": int(c["eval_interval"]),
        "eval_iters": int(c["eval_iters"]),
        "training": training,
        "ddp": {"backend": c["ddp.backend"] if c["ddp.backend"] in ("nccl", "gloo") else "nccl"},
        "system": {
            # torch has no TPU device; piano-gpt's GPU recipe is what such a run maps to.
            "device": device if device.split(":")[0] in ("cpu", "cuda") else "cuda",
            "dtype": c["system.dtype"],
            "compile": bool(c["system.compile"]),
            # piano-gpt calls torch.set_num_threads(data_workers // world_size): 0 is refused.
            "data_workers": max(int(c["system.data_workers"]), 1),
        },
        "logging": {"wandb_log": bool(meta.wandb_ran), "wandb_entity": c["logging.wandb_entity"],
                    "wandb_project": c["logging.wandb_project"],
                    "log_interval": int(c["logging.log_interval"])},
        "model": dict(model_cfg),
        "tokenizer": {"class_name": TOKENIZER_CLASS,
                      "config": _tokenizer_config(c, tokenizer_desc)},
        "dataset": {
            "base_dataset_name": c["dataset.base_dataset_name"],
            "extra_datasets": list(c["dataset.extra_datasets"]),
            "pause_detection_threshold": c["dataset.pause_detection_threshold"],
            "augmentation": {
                "speed_change_factors": list(c["dataset.augmentation.speed_change_factors"]),
                "max_pitch_shift": int(c["dataset.augmentation.max_pitch_shift"])},
        },
        "lr": lr,
        "optimizer": {k: c[f"optimizer.{k}"] for k in
                      ("weight_decay", "max_iters", "beta1", "beta2", "grad_clip")},
        "tasks": task_list(resolve_tasks(_task_spec(c["tasks"])), head=layout == ANNOTATED),
    }


def _task_spec(spec: Any) -> Any:
    return list(spec) if isinstance(spec, (list, tuple)) else spec


def _tokenizer_config(c: Mapping, tokenizer_desc: Mapping | None) -> dict:
    """The grid the vocabulary was built with (the checkpoint's own, else our config's)."""
    params = (tokenizer_desc or {}).get("parameters") or {}
    own = params.get("tokenizer_config")
    if isinstance(own, Mapping) and own:
        return dict(own)
    return {k: c[f"tokenizer.{k}"] for k in
            ("time_unit", "max_time_step", "n_velocity_bins", "n_special_ids")}


def task_list(tasks: Sequence[PianoTask], head: bool) -> list[dict]:
    """The task list of piano-gpt's `tasks` config, for `PianoTaskManager(tasks_config=...)`:
    one `{class, params}` entry per task (f37ac14 files), or for annotated-layout runs HEAD's form,
    `{class, param_range: [params...]}` per run of one class (`params` for a single task)."""
    entries = [(type(t).__name__, {t.class_param: int(t.param)}) for t in tasks]
    if not head:
        return [{"class": cls, "params": params} for cls, params in entries]
    out: list[dict] = []
    for cls, params in entries:
        if out and out[-1]["class"] == cls:
            last = out[-1]
            if "params" in last:
                last["param_range"] = [last.pop("params")]
            last["param_range"].append(params)
        else:
            out.append({"class": cls, "params": params})
    return out


def _absolute(path: str) -> str:
    return os.path.abspath(path)
