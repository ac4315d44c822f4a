"""The one place a run's ConfigDict is read: validated once, turned into frozen dataclasses.

Everything downstream receives plain values, so a bad key or value stops the run here, with one
message that says what to change, before any data is loaded or anything compiles.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import math
from collections.abc import Mapping
from typing import Any

STAGES = ("next_token_pretraining", "piano_task")
LOSS_MASKINGS = ("pretraining", "finetuning")
PROMPT_LAYOUTS = ("auto", "annotated", "plain", "head", "f37ac14")  # last two: old names
LAYOUT_ALIASES = {"head": "annotated", "f37ac14": "plain"}  # = music.layouts.LAYOUT_ALIASES
DTYPES = ("float32", "bfloat16", "float16")
DEVICES = {"cpu": "cpu", "gpu": "cuda", "cuda": "cuda", "tpu": "tpu"}
DDP_BACKENDS = {"auto": "auto", "nccl": "auto", "gloo": "auto",
                "jax_distributed": "jax_distributed", "none": "none"}
SCRATCH = "scratch_next_token"

_NUM = (int, float)
_SEQ = (tuple, list)
_OPT_STR = (str, type(None))
_OPT_BOOL = (bool, type(None))

# dotted key -> (accepted types, default when absent)
SCHEMA: dict[str, tuple[tuple[type, ...], Any]] = {
    "out_dir": ((str,), "runs/default"),
    "seed": ((int,), 1337),
    "stage": ((str,), "piano_task"),
    "init_from": ((str,), SCRATCH),
    "init_optimizer": ((bool,), False),
    "loss_masking": ((str,), "pretraining"),
    "tasks": ((str, *_SEQ), "piano_default"),
    "model.n_layer": ((int,), 12),
    "model.n_head": ((int,), 12),
    "model.n_embd": ((int,), 768),
    "model.dropout": (_NUM, 0.0),
    "model.bias": ((bool,), False),
    "model.context_size": ((int,), 2048),
    "model.use_time_embedding": ((bool,), False),
    "model.one_hot_embedding": (_OPT_BOOL, None),
    "model.attention": ((str,), "auto"),
    "model.remat": ((bool,), False),
    "system.device": ((str,), "gpu"),
    "system.dtype": ((str,), "bfloat16"),
    "system.compile": ((bool,), True),
    "system.data_workers": ((int,), 0),
    "system.param_sharding": ((str,), "none"),
    "ddp.backend": ((str,), "auto"),
    "ddp.timeout_s": ((int,), 300),
    "data.batch_size": ((int,), 32),
    "data.context_size": ((int,), 2048),
    "data.notes_per_record": ((int,), 128),
    "data.eval_splits": ((str, *_SEQ), "auto"),
    "data.prompt_layout": ((str,), "auto"),
    "dataset.base_dataset_name": ((str,), "epr-labs/maestro-sustain-v2"),
    "dataset.extra_datasets": (_SEQ, ()),
    "dataset.pause_detection_threshold": (_NUM, 4.0),
    "dataset.augmentation.speed_change_factors": (_SEQ, ()),
    "dataset.augmentation.max_pitch_shift": ((int,), 0),
    "tokenizer.time_unit": (_NUM, 0.01),
    "tokenizer.max_time_step": (_NUM, 1.0),
    "tokenizer.n_velocity_bins": ((int,), 32),
    "tokenizer.n_special_ids": ((int,), 2048),
    "optimizer.gradient_accumulation_steps": ((int,), 1),
    "optimizer.max_iters": ((int,), 100_000),
    "optimizer.weight_decay": (_NUM, 0.1),
    "optimizer.grad_clip": (_NUM, 1.0),
    "optimizer.beta1": (_NUM, 0.9),
    "optimizer.beta2": (_NUM, 0.95),
    "lr.learning_rate": (_NUM, 3e-4),
    "lr.min_lr": (_NUM, 3e-5),
    "lr.warmup_iters": ((int,), 1000),
    "lr.decay_lr": ((bool,), True),
    "lr.lr_decay_iters": ((int, type(None)), None),  # None: optimizer.max_iters
    "eval_interval": ((int,), 1000),
    "eval_iters": ((int,), 50),
    "eval_only": ((bool,), False),
    "overwrite": ((bool,), False),
    "nonfinite_patience": ((int,), 10),
    "eval_metrics": ((bool,), False),
    "eval_examples": ((int,), 16),
    "checkpoint.keep_last": ((int,), 3),
    "checkpoint.export_torch": ((bool,), True),
    "logging.wandb_log": ((bool,), False),
    "logging.wandb_project": ((str,), "piano-gpt-jax"),
    "logging.wandb_entity": (_OPT_STR, None),
    "logging.log_interval": ((int,), 20),
}


class ConfigError(ValueError):
    """A configuration the user has to change; the message says how."""


@dataclasses.dataclass(frozen=True)
class ModelSettings:
    n_layer: int
    n_head: int
    n_embd: int
    dropout: float
    bias: bool
    context_size: int
    use_time_embedding: bool
    one_hot_embedding: bool | None  # None (unset) = False: gather the token rows
    attention: str  # auto | einsum | xla | cudnn
    remat: bool  # recompute block activations in the backward pass


@dataclasses.dataclass(frozen=True)
class OptimSettings:
    gradient_accumulation_steps: int
    max_iters: int
    weight_decay: float
    grad_clip: float
    beta1: float
    beta2: float
    learning_rate: float
    min_lr: float
    warmup_iters: int
    decay_lr: bool
    lr_decay_iters: int


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """A validated run: what the trainer needs, and nothing it has to look up again."""

    out_dir: str
    seed: int
    stage: str
    init_from: str
    init_optimizer: bool  # init_from a .pt: continue its AdamW state, step and token count
    loss_masking: str
    model: ModelSettings
    optim: OptimSettings
    data_kwargs: Mapping[str, Any]  # keyword arguments of data.pipeline.DataSettings
    platform: str  # JAX platform name
    dtype: str
    compile: bool
    param_sharding: str  # "none" (replicated, data parallel) or "fsdp" (sharded, ZeRO-3)
    ddp_backend: str
    ddp_timeout_s: int  # how long a process waits for the job's coordinator at start
    eval_interval: int
    eval_iters: int
    eval_only: bool
    overwrite: bool  # a new run may move an earlier run's outputs in out_dir aside
    nonfinite_patience: int  # stop after this many consecutive updates with a non-finite loss
    eval_metrics: bool
    eval_examples: int
    keep_last: int
    export_torch: bool
    wandb_log: bool
    wandb_project: str
    wandb_entity: str | None
    log_interval: int
    raw: Mapping[str, Any]  # the whole config, nested as configs/piano.py writes it, plain values

    @property
    def from_scratch(self) -> bool:
        return self.init_from == SCRATCH

    def data_settings(self, **overrides: Any):
        """The pipeline's DataSettings (imported lazily: config stays importable on its own)."""
        from piano_gpt_jax.data.pipeline import DataSettings

        return DataSettings(**{**self.data_kwargs, **overrides})


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; ConfigDicts and plain dicts alike."""
    if hasattr(tree, "to_dict"):
        tree = tree.to_dict()
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) or hasattr(value, "to_dict"):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    """{"a.b": 1} -> {"a": {"b": 1}}: the inverse of `flatten`."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        node = out
        *parents, leaf = str(key).split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def complete(nested: Mapping[str, Any]) -> dict[str, Any]:
    """A nested config with every schema key, defaults filling what `nested` lacks."""
    flat = {key: default for key, (_, default) in SCHEMA.items()}
    flat.update({k: v for k, v in flatten(nested).items() if k in SCHEMA})
    if flat["lr.lr_decay_iters"] is None:
        flat["lr.lr_decay_iters"] = flat["optimizer.max_iters"]
    return nest({k: (list(v) if isinstance(v, tuple) else v) for k, v in flat.items()})


def suggest_key(key: str, valid: list[str] | None = None) -> str:
    """A 'did you mean' hint for a mistyped dotted key (matched on the full path, then the leaf)."""
    valid = list(SCHEMA) if valid is None else valid
    leaf = key.rsplit(".", 1)[-1]
    same_leaf = [k for k in valid if k.rsplit(".", 1)[-1] == leaf and k != key]
    if len(same_leaf) == 1:  # e.g. max_iters -> optimizer.max_iters
        return f" Did you mean {same_leaf[0]!r}?"
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    if not close:
        leaf = key.rsplit(".", 1)[-1]
        by_leaf = {k.rsplit(".", 1)[-1]: k for k in valid}
        leaves = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.6)
        close = [by_leaf[leaves[0]]] if leaves else []
    return f" Did you mean {close[0]!r}?" if close else ""


def _check_type(key: str, value: Any) -> Any:
    types, _ = SCHEMA[key]
    if isinstance(value, bool) and bool not in types:
        raise ConfigError(f"config key {key!r} must be {_type_names(types)}, "
                          f"got the bool {value!r}.")
    if not isinstance(value, types):
        raise ConfigError(
            f"config key {key!r} must be {_type_names(types)}, got {type(value).__name__} "
            f"{value!r}. Fix it in the config file or with --config.{key}=...")
    if types == _NUM:
        if not math.isfinite(value):
            raise ConfigError(f"config key {key!r} is {value}; it must be a finite number.")
        return float(value)
    if isinstance(value, (list, tuple)) and any(
            isinstance(x, float) and not math.isfinite(x) for x in value):
        raise ConfigError(f"config key {key!r} holds a non-finite number ({value!r}); every "
                          "value must be finite.")
    if isinstance(value, list):
        return tuple(value)
    return value


def _type_names(types: tuple[type, ...]) -> str:
    names = {"NoneType": "None", "tuple": "a tuple", "list": "a list"}
    return " or ".join(names.get(t.__name__, t.__name__) for t in types)


def _one_of(key: str, value: str, choices) -> None:
    if value not in choices:
        hint = difflib.get_close_matches(value, list(choices), n=1)
        tip = f" Did you mean {hint[0]!r}?" if hint else ""
        raise ConfigError(f"{key} = {value!r} is not valid; choose one of {sorted(choices)}.{tip}")


def _positive(key: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{key} must be {'>= 0' if allow_zero else '> 0'}, got {value}.")


def _names(key: str, value: Any) -> tuple[str, ...]:
    """A tuple of names from a tuple/list, a literal "('a', 'b')" or "a,b" (command-line forms:
    a key whose default is a string only accepts strings there)."""
    if isinstance(value, str):
        text = value.strip()
        if text[:1] in "([":
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                raise ConfigError(f"{key} = {value!r} is not a valid list of names; write e.g. "
                                  "\"('a', 'b')\" or a,b.") from None
        else:
            value = text.split(",")
    if isinstance(value, str) or not all(isinstance(x, str) for x in value):
        raise ConfigError(f"{key} must name strings, got {value!r}.")
    return tuple(x.strip() for x in value if x.strip())


def build_train_config(cfg: Any) -> TrainConfig:
    """Validate a ConfigDict (or nested dict) into the frozen TrainConfig; ConfigError if bad."""
    flat = flatten(cfg)
    unknown = [k for k in flat if k not in SCHEMA]
    if unknown:
        key = unknown[0]
        raise ConfigError(f"unknown config key {key!r}.{suggest_key(key)}")
    v = {key: _check_type(key, flat[key]) if key in flat else default
         for key, (_, default) in SCHEMA.items()}

    _one_of("stage", v["stage"], STAGES)
    _one_of("loss_masking", v["loss_masking"], LOSS_MASKINGS)
    _one_of("data.prompt_layout", v["data.prompt_layout"], PROMPT_LAYOUTS)
    v["data.prompt_layout"] = LAYOUT_ALIASES.get(v["data.prompt_layout"],
                                                 v["data.prompt_layout"])
    _one_of("system.dtype", v["system.dtype"], DTYPES)
    _one_of("system.param_sharding", v["system.param_sharding"], ("none", "fsdp"))
    _one_of("model.attention", v["model.attention"], ("auto", "einsum", "xla", "cudnn"))
    device = v["system.device"].split(":", 1)[0]
    if device not in DEVICES:
        raise ConfigError(f"system.device = {v['system.device']!r} is not supported by JAX; choose "
                          f"one of {sorted(DEVICES)} (pick a GPU with CUDA_VISIBLE_DEVICES).")
    _one_of("ddp.backend", v["ddp.backend"], DDP_BACKENDS)
    if v["init_optimizer"] and v["init_from"] == SCRATCH:
        raise ConfigError("init_optimizer=True continues the optimizer of init_from, but "
                          "init_from is scratch_next_token; set init_from to a .pt written with "
                          "an optimizer state (piano-gpt's, or our export).")
    if v["loss_masking"] == "finetuning" and v["stage"] != "piano_task":
        raise ConfigError("loss_masking='finetuning' needs stage='piano_task' (the loss is taken "
                          "on the tokens after <GENAI>, which only PIANO-task records have).")

    for key in ("model.n_layer", "model.n_head", "model.n_embd", "model.context_size",
                "data.batch_size", "data.context_size", "data.notes_per_record",
                "optimizer.gradient_accumulation_steps", "optimizer.max_iters", "eval_interval",
                "eval_iters", "logging.log_interval", "checkpoint.keep_last", "eval_examples",
                "nonfinite_patience", "ddp.timeout_s",
                "tokenizer.n_velocity_bins", "tokenizer.n_special_ids"):
        _positive(key, v[key])
    if v["lr.lr_decay_iters"] is None:  # decay over the whole run unless told otherwise
        v["lr.lr_decay_iters"] = v["optimizer.max_iters"]
    for key in ("lr.warmup_iters", "lr.lr_decay_iters", "optimizer.weight_decay",
                "optimizer.grad_clip", "lr.min_lr", "system.data_workers",
                "dataset.augmentation.max_pitch_shift"):
        _positive(key, v[key], allow_zero=True)
    _positive("lr.learning_rate", v["lr.learning_rate"])
    if not 0.0 <= v["model.dropout"] < 1.0:
        raise ConfigError(f"model.dropout must be in [0, 1), got {v['model.dropout']}.")
    for key in ("optimizer.beta1", "optimizer.beta2"):
        if not 0.0 <= v[key] < 1.0:
            raise ConfigError(f"{key} must be in [0, 1), got {v[key]}.")
    if v["model.n_embd"] % v["model.n_head"]:
        raise ConfigError(
            f"model.n_embd ({v['model.n_embd']}) must be divisible by model.n_head "
            f"({v['model.n_head']}); e.g. n_head="
            f"{max(h for h in range(1, v['model.n_head'] + 1) if v['model.n_embd'] % h == 0)}.")
    if v["data.context_size"] > v["model.context_size"]:
        raise ConfigError(
            f"data.context_size ({v['data.context_size']}) is larger than model.context_size "
            f"({v['model.context_size']}); the model has no position embedding beyond it. Lower "
            "data.context_size or raise model.context_size.")
    if v["lr.decay_lr"] and v["lr.min_lr"] > v["lr.learning_rate"]:
        raise ConfigError(f"lr.min_lr ({v['lr.min_lr']}) is above lr.learning_rate "
                          f"({v['lr.learning_rate']}); the cosine would climb instead of decay.")
    factors = v["dataset.augmentation.speed_change_factors"]
    if not all(isinstance(f, (int, float)) and not isinstance(f, bool) and math.isfinite(f)
               and f > 0 for f in factors):
        raise ConfigError(f"dataset.augmentation.speed_change_factors must be positive finite "
                          f"numbers, got {factors!r}; write e.g. --config.dataset.augmentation."
                          "speed_change_factors=\"(0.95, 1.05)\".")
    if not all(isinstance(d, str) for d in v["dataset.extra_datasets"]):
        raise ConfigError(f"dataset.extra_datasets must name datasets (strings), got "
                          f"{v['dataset.extra_datasets']!r}.")
    splits = v["data.eval_splits"]
    if splits != "auto":
        splits = _names("data.eval_splits", splits)
        if not splits:
            raise ConfigError("data.eval_splits is empty; use 'auto' or name at least 'full_val'.")
    tasks = _names("tasks", v["tasks"])
    tasks = tasks[0] if len(tasks) == 1 and "-x" not in tasks[0] else tasks  # a task-set name
    v["tasks"], v["data.eval_splits"] = tasks, splits  # parsed forms, also in `raw`

    model = ModelSettings(
        n_layer=v["model.n_layer"], n_head=v["model.n_head"], n_embd=v["model.n_embd"],
        dropout=v["model.dropout"], bias=v["model.bias"], context_size=v["model.context_size"],
        use_time_embedding=v["model.use_time_embedding"],
        one_hot_embedding=v["model.one_hot_embedding"], attention=v["model.attention"],
        remat=v["model.remat"])
    optim = OptimSettings(
        gradient_accumulation_steps=v["optimizer.gradient_accumulation_steps"],
        max_iters=v["optimizer.max_iters"], weight_decay=v["optimizer.weight_decay"],
        grad_clip=v["optimizer.grad_clip"], beta1=v["optimizer.beta1"],
        beta2=v["optimizer.beta2"], learning_rate=v["lr.learning_rate"], min_lr=v["lr.min_lr"],
        warmup_iters=v["lr.warmup_iters"], decay_lr=v["lr.decay_lr"],
        lr_decay_iters=v["lr.lr_decay_iters"])
    data_kwargs = {
        "stage": v["stage"],
        "loss_masking": v["loss_masking"],
        "tasks": tasks,
        "base_dataset_name": v["dataset.base_dataset_name"],
        "extra_datasets": tuple(v["dataset.extra_datasets"]),
        "pause_detection_threshold": v["dataset.pause_detection_threshold"],
        "speed_change_factors": tuple(float(f) for f in
                                      v["dataset.augmentation.speed_change_factors"]),
        "max_pitch_shift": v["dataset.augmentation.max_pitch_shift"],
        "batch_size": v["data.batch_size"],
        "context_size": v["data.context_size"],
        "notes_per_record": v["data.notes_per_record"],
        "data_workers": v["system.data_workers"],
        "seed": v["seed"],
        "use_time_steps": v["model.use_time_embedding"],
        "tokenizer_config": {
            "time_unit": v["tokenizer.time_unit"],
            "max_time_step": v["tokenizer.max_time_step"],
            "n_velocity_bins": v["tokenizer.n_velocity_bins"],
            "n_special_ids": v["tokenizer.n_special_ids"],
        },
        "eval_splits": splits,
        "prompt_layout": v["data.prompt_layout"],
    }
    raw = nest({key: (list(val) if isinstance(val, tuple) else val) for key, val in v.items()})
    return TrainConfig(
        out_dir=v["out_dir"], seed=v["seed"], stage=v["stage"], init_from=v["init_from"],
        init_optimizer=v["init_optimizer"],
        loss_masking=v["loss_masking"], model=model, optim=optim, data_kwargs=data_kwargs,
        platform=DEVICES[device], dtype=v["system.dtype"], compile=v["system.compile"],
        param_sharding=v["system.param_sharding"],
        ddp_backend=DDP_BACKENDS[v["ddp.backend"]], ddp_timeout_s=v["ddp.timeout_s"],
        eval_interval=v["eval_interval"],
        eval_iters=v["eval_iters"], eval_only=v["eval_only"], overwrite=v["overwrite"],
        nonfinite_patience=v["nonfinite_patience"], eval_metrics=v["eval_metrics"],
        eval_examples=v["eval_examples"], keep_last=v["checkpoint.keep_last"],
        export_torch=v["checkpoint.export_torch"], wandb_log=v["logging.wandb_log"],
        wandb_project=v["logging.wandb_project"], wandb_entity=v["logging.wandb_entity"],
        log_interval=v["logging.log_interval"], raw=raw)
