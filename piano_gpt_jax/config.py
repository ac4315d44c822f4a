"""The one place a run's config is declared and read: validated once, into frozen dataclasses.

Every config key is declared once, below, as a typed field with its default in the dataclass of
its section (`model.n_layer` is `ModelSection.n_layer`); the key table (SCHEMA) used to check a
config, suggest keys and fill defaults is derived from these declarations, and configs/piano.py
starts from them (`default_config`). A bad key or value stops the run here, with one message
that says what to change, before any data is loaded or anything compiles. Downstream code gets
the validated sections (`cfg.model`, `cfg.optimizer`, `cfg.logging`, ...), named as the keys.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.util
import math
import re
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from absl import flags
from ml_collections import config_flags

from piano_gpt_jax.music import layouts
from piano_gpt_jax.precision import DTYPES

STAGES = ("next_token_pretraining", "piano_task")
LOSS_MASKINGS = ("pretraining", "finetuning")
PROMPT_LAYOUTS = ("auto", *layouts.PROMPT_LAYOUTS, *layouts.LAYOUT_ALIASES)  # aliases: old names
DEVICES = {"cpu": "cpu", "gpu": "cuda", "cuda": "cuda", "tpu": "tpu"}
DDP_BACKENDS = {"auto": "auto", "nccl": "auto", "gloo": "auto",
                "jax_distributed": "jax_distributed", "none": "none"}
ATTENTIONS = ("auto", "einsum", "xla", "cudnn")
PARAM_SHARDINGS = ("none", "fsdp")
SCRATCH = "scratch_next_token"

# A key's rule is declared with the key (field metadata), so a new key and its check live in
# one line; `_check_rules` applies them: choices first, then ranges.
POSITIVE, NON_NEGATIVE, UNIT_INTERVAL = "positive", "non-negative", "in [0, 1)"


def _ruled(default: Any, rule: Any) -> Any:
    return dataclasses.field(default=default, metadata={"rule": rule})


def _choice(default: str, choices: Any) -> Any:
    return _ruled(default, ("one of", choices))


# ------------------------------------------------------------------------------ the declaration
@dataclasses.dataclass(frozen=True)
class ModelSection:
    n_layer: int = _ruled(12, POSITIVE)
    n_head: int = _ruled(12, POSITIVE)
    n_embd: int = _ruled(768, POSITIVE)
    dropout: float = _ruled(0.0, UNIT_INTERVAL)
    bias: bool = False
    context_size: int = _ruled(2048, POSITIVE)
    use_time_embedding: bool = False  # the music-time embedding (piano-gpt HEAD's wmte)
    one_hot_embedding: bool | None = None  # None = False: gather the token rows
    attention: str = _choice("auto", ATTENTIONS)
    remat: bool = False  # recompute block activations in the backward pass


@dataclasses.dataclass(frozen=True)
class SystemSection:
    device: str = "gpu"  # cpu | gpu | cuda | tpu
    dtype: str = _choice("bfloat16", DTYPES)  # float16: with dynamic loss scaling
    compile: bool = True  # False runs the step without jit (debugging)
    data_workers: int = _ruled(0, NON_NEGATIVE)  # Grain worker processes (0 = in-process)
    param_sharding: str = _choice("none", PARAM_SHARDINGS)  # none = data parallel


@dataclasses.dataclass(frozen=True)
class DdpSection:
    backend: str = _choice("auto", DDP_BACKENDS)  # nccl/gloo = auto
    # how long a process waits for the job's coordinator at start
    timeout_s: int = _ruled(300, POSITIVE)


@dataclasses.dataclass(frozen=True)
class DataSection:
    batch_size: int = _ruled(32, POSITIVE)  # global micro-batch (all devices of all processes)
    context_size: int = _ruled(2048, POSITIVE)
    notes_per_record: int = _ruled(128, POSITIVE)
    eval_splits: str | tuple[str, ...] = "auto"  # "auto" = full_val + composer splits present
    prompt_layout: str = _choice("auto", PROMPT_LAYOUTS)  # head | f37ac14: old names


@dataclasses.dataclass(frozen=True)
class AugmentationSection:
    speed_change_factors: tuple[float, ...] = ()
    max_pitch_shift: int = _ruled(0, NON_NEGATIVE)


@dataclasses.dataclass(frozen=True)
class DatasetSection:
    base_dataset_name: str = "epr-labs/maestro-sustain-v2"  # hub name, folder, or "builtin"
    extra_datasets: tuple[str, ...] = ()  # training data; empty = the base dataset's train
    pause_detection_threshold: float = 4.0
    augmentation: AugmentationSection = AugmentationSection()
    # Where prepared corpora live (data/prepare.py); "" = $PIANO_GPT_JAX_CACHE/prepared, else
    # ~/.cache/piano_gpt_jax/prepared. Multi-host: a folder every host sees, or each prepares.
    prepared_dir: str = ""


@dataclasses.dataclass(frozen=True)
class TokenizerSection:
    time_unit: float = 0.01
    max_time_step: float = 1.0
    n_velocity_bins: int = _ruled(32, POSITIVE)
    # the reference HEAD value; 1024 cannot hold all prefix tokens
    n_special_ids: int = _ruled(2048, POSITIVE)


@dataclasses.dataclass(frozen=True)
class OptimizerSection:
    gradient_accumulation_steps: int = _ruled(1, POSITIVE)  # global batch = data.batch_size x this
    max_iters: int = _ruled(100_000, POSITIVE)  # optimizer updates
    weight_decay: float = _ruled(0.1, NON_NEGATIVE)
    grad_clip: float = _ruled(1.0, NON_NEGATIVE)
    beta1: float = _ruled(0.9, UNIT_INTERVAL)
    beta2: float = _ruled(0.95, UNIT_INTERVAL)
    # AdamW's epsilon: torch.optim.AdamW's default, which piano-gpt keeps
    eps: float = _ruled(1e-8, POSITIVE)


@dataclasses.dataclass(frozen=True)
class LrSection:
    learning_rate: float = _ruled(3e-4, POSITIVE)
    min_lr: float = _ruled(3e-5, NON_NEGATIVE)
    warmup_iters: int = _ruled(1000, NON_NEGATIVE)
    decay_lr: bool = True
    lr_decay_iters: int | None = _ruled(None, NON_NEGATIVE)  # None = optimizer.max_iters


@dataclasses.dataclass(frozen=True)
class CheckpointSection:
    # recent checkpoints kept (the best by validation loss is kept too)
    keep_last: int = _ruled(3, POSITIVE)
    export_torch: bool = True  # write best.pt and final.pt in out_dir
    # also write best/ and final/ model folders (safetensors weights, config.json,
    # tokenizer.json, a model card): weights anyone can load without unpickling
    export_safetensors: bool = False


@dataclasses.dataclass(frozen=True)
class LoggingSection:
    wandb_log: bool = False
    wandb_project: str = "piano-gpt-jax"
    wandb_entity: str | None = None
    log_interval: int = _ruled(20, POSITIVE)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """A whole run's config, nested as configs/piano.py writes it. `build_train_config` returns
    it validated (numbers checked, names resolved, `lr.lr_decay_iters` filled in)."""

    out_dir: str = "runs/default"
    seed: int = 1337
    stage: str = _choice("piano_task", STAGES)
    init_from: str = SCRATCH  # or a run directory of ours, or a PyTorch .pt
    init_optimizer: bool = False  # init_from's AdamW state, step and tokens continue
    loss_masking: str = _choice("pretraining", LOSS_MASKINGS)  # finetuning: after <GENAI>
    tasks: str | tuple[str, ...] = "piano_default"  # a task-set name or task names
    model: ModelSection = ModelSection()
    system: SystemSection = SystemSection()
    ddp: DdpSection = DdpSection()
    data: DataSection = DataSection()
    dataset: DatasetSection = DatasetSection()
    tokenizer: TokenizerSection = TokenizerSection()
    optimizer: OptimizerSection = OptimizerSection()
    lr: LrSection = LrSection()
    eval_interval: int = _ruled(1000, POSITIVE)
    eval_iters: int = _ruled(50, POSITIVE)
    eval_only: bool = False
    eval_metrics: bool = False  # eval_only: also generate and score PIANO-task metrics
    eval_examples: int = _ruled(16, POSITIVE)  # examples per split for eval_metrics
    overwrite: bool = False  # a new run may move an earlier run's outputs in out_dir aside
    # stop after this many updates in a row with a NaN/inf loss
    nonfinite_patience: int = _ruled(10, POSITIVE)
    checkpoint: CheckpointSection = CheckpointSection()
    logging: LoggingSection = LoggingSection()

    # -------------------------------------------------------------- derived, not keys
    @property
    def from_scratch(self) -> bool:
        return self.init_from == SCRATCH

    @property
    def platform(self) -> str:
        """The JAX platform system.device names."""
        return DEVICES[self.system.device.split(":", 1)[0]]

    @property
    def ddp_backend(self) -> str:
        return DDP_BACKENDS[self.ddp.backend]

    @property
    def optim(self) -> OptimSettings:
        return OptimSettings(self.optimizer, self.lr)

    @property
    def raw(self) -> dict[str, Any]:
        """The whole config as plain nested values (checkpoints, wandb, exports)."""
        return nest({k: (list(v) if isinstance(v, tuple) else v)
                     for k, v in flatten(dataclasses.asdict(self)).items()})


@dataclasses.dataclass(frozen=True)
class OptimSettings:
    """What the optimizer and its schedule read: two sections of the config."""

    optimizer: OptimizerSection = OptimizerSection()
    lr: LrSection = LrSection()

    @classmethod
    def of(cls, **values: Any) -> OptimSettings:
        """From flat optimizer.* / lr.* values (`max_iters=10, learning_rate=1e-3`); the rest
        keep their defaults. For tests and benchmarks that set a few."""
        return cls().replace(**values)

    def replace(self, **changes: Any) -> OptimSettings:
        """A copy with flat optimizer.* / lr.* values changed (each name lives in one section)."""
        names = {f.name for f in dataclasses.fields(OptimizerSection)}
        unknown = [k for k in changes if k not in names
                   and k not in {f.name for f in dataclasses.fields(LrSection)}]
        if unknown:
            raise TypeError(f"no optimizer or lr setting named {unknown}")
        return OptimSettings(
            dataclasses.replace(self.optimizer, **{k: v for k, v in changes.items()
                                                   if k in names}),
            dataclasses.replace(self.lr, **{k: v for k, v in changes.items()
                                            if k not in names}))


class ConfigError(ValueError):
    """A configuration the user has to change; the message says how."""


# ------------------------------------------------------------------------------ the key table
_NUM = (int, float)
_SEQ = (tuple, list)


def _accepted_types(hint: Any) -> tuple[type, ...]:
    """isinstance types a config value of this annotation may have (ints for floats, lists for
    tuples: the forms ml_collections and command lines produce)."""
    if hint is float:
        return _NUM
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        out: tuple[type, ...] = ()
        for arg in typing.get_args(hint):
            out += _accepted_types(arg)
        return tuple(dict.fromkeys(out))
    if typing.get_origin(hint) is tuple:
        return _SEQ
    if hint is type(None):
        return (type(None),)
    return (hint,)


def _declared(cls: type, prefix: str = "") -> dict[str, tuple[tuple[type, ...], Any]]:
    out: dict[str, tuple[tuple[type, ...], Any]] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            out.update(_declared(hint, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = (_accepted_types(hint), f.default)
    return out


# dotted key -> (accepted types, default when absent): derived from the declaration above
SCHEMA: dict[str, tuple[tuple[type, ...], Any]] = _declared(TrainConfig)


def default_config() -> dict[str, Any]:
    """Every key with its default, nested (configs/piano.py starts from this)."""
    return nest({k: default for k, (_, default) in SCHEMA.items()})


def optional_keys() -> dict[str, type]:
    """Keys whose default is None, with the type they take when set (ml_collections needs it
    to parse a command-line override of a None field)."""
    return {k: next(t for t in types_ if t is not type(None))
            for k, (types_, default) in SCHEMA.items()
            if default is None and type(None) in types_}


def _build(cls: type, flat: Mapping[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            kwargs[f.name] = _build(hint, flat, f"{prefix}{f.name}.")
        else:
            kwargs[f.name] = flat[f"{prefix}{f.name}"]
    return cls(**kwargs)


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
    return set_dotted({}, flat)


def set_dotted(nested: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Set {"a.b": 1}-style keys inside a nested dict (in place; returned for chaining), the way
    `--config.a.b=1` overrides a config file."""
    for key, value in overrides.items():
        node = nested
        *parents, leaf = str(key).split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return nested


def _fill_derived_defaults(flat: dict[str, Any]) -> None:
    """Defaults that follow another key: lr.lr_decay_iters None decays over the whole run."""
    if flat["lr.lr_decay_iters"] is None:
        flat["lr.lr_decay_iters"] = flat["optimizer.max_iters"]


def complete(nested: Mapping[str, Any]) -> dict[str, Any]:
    """A nested config with every schema key, defaults filling what `nested` lacks."""
    flat = {key: default for key, (_, default) in SCHEMA.items()}
    flat.update({k: v for k, v in flatten(nested).items() if k in SCHEMA})
    _fill_derived_defaults(flat)
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
    """Validate a ConfigDict (or nested dict) into the frozen TrainConfig; ConfigError if bad.

    Steps: every key known and typed → named choices valid → numbers in range → keys that must
    agree with each other agree → list-valued keys parsed into their tuple forms.
    """
    flat = flatten(cfg)
    unknown = [k for k in flat if k not in SCHEMA]
    if unknown:
        key = unknown[0]
        raise ConfigError(f"unknown config key {key!r}.{suggest_key(key)}")
    v = {key: _check_type(key, flat[key]) if key in flat else default
         for key, (_, default) in SCHEMA.items()}
    _check_choices(v)
    _check_ranges(v)
    _check_agreement(v)
    _parse_lists(v)
    raw = {key: (tuple(val) if isinstance(val, list) else val) for key, val in v.items()}
    return _build(TrainConfig, raw)


def _rules(cls: type, prefix: str = "") -> dict[str, Any]:
    """{dotted key: rule} from the fields' declarations."""
    found: dict[str, Any] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            found.update(_rules(hints[f.name], f"{prefix}{f.name}."))
        elif "rule" in f.metadata:
            found[f"{prefix}{f.name}"] = f.metadata["rule"]
    return found


RULES: dict[str, Any] = _rules(TrainConfig)


def _check_choices(v: dict[str, Any]) -> None:
    for key, rule in RULES.items():
        if isinstance(rule, tuple) and rule[0] == "one of":
            _one_of(key, v[key], rule[1])
    layout = v["data.prompt_layout"]
    v["data.prompt_layout"] = layouts.LAYOUT_ALIASES.get(layout, layout)
    device = v["system.device"].split(":", 1)[0]
    if device not in DEVICES:
        raise ConfigError(f"system.device = {v['system.device']!r} is not supported by JAX; choose "
                          f"one of {sorted(DEVICES)} (pick a GPU with CUDA_VISIBLE_DEVICES).")


def _check_ranges(v: dict[str, Any]) -> None:
    _fill_derived_defaults(v)
    for key, rule in RULES.items():
        if rule in (POSITIVE, NON_NEGATIVE):
            _positive(key, v[key], allow_zero=rule == NON_NEGATIVE)
        elif rule == UNIT_INTERVAL and not 0.0 <= v[key] < 1.0:
            raise ConfigError(f"{key} must be in [0, 1), got {v[key]}.")


def _check_agreement(v: dict[str, Any]) -> None:
    if v["init_optimizer"] and v["init_from"] == SCRATCH:
        raise ConfigError("init_optimizer=True continues the optimizer of init_from, but "
                          "init_from is scratch_next_token; set init_from to a .pt written with "
                          "an optimizer state (piano-gpt's, or our export).")
    if v["loss_masking"] == "finetuning" and v["stage"] != "piano_task":
        raise ConfigError("loss_masking='finetuning' needs stage='piano_task' (the loss is taken "
                          "on the tokens after <GENAI>, which only PIANO-task records have).")
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


def _parse_lists(v: dict[str, Any]) -> None:
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
    v["dataset.extra_datasets"] = tuple(v["dataset.extra_datasets"])
    v["dataset.augmentation.speed_change_factors"] = tuple(
        float(f) for f in v["dataset.augmentation.speed_change_factors"])


# ------------------------------------------------------------------ command line

_OVERRIDE = re.compile(r"^--config\.([A-Za-z0-9_.]+)(=|$)")


def check_override_keys(argv: list[str]) -> None:
    """Reject `--config.<key>` overrides naming no config key, with the closest valid name."""
    for arg in argv[1:]:
        m = _OVERRIDE.match(arg)
        if m and m.group(1) not in SCHEMA:
            raise ConfigError(f"unknown config key {m.group(1)!r} in {arg!r}."
                              f"{suggest_key(m.group(1))}")


class HelpRequested(Exception):
    """`--help` on a command line; the message is the usage to print (exit 0)."""


HELP_FLAGS = ("-h", "--help", "--helpfull", "-help")


def usage(prog: str, what: str) -> str:
    """The usage of a command that takes the trainer's config flags; the presets are read from
    configs/piano.py when it is there (run from the repository root)."""
    presets = ""
    recipe = Path("configs/piano.py")
    if recipe.is_file():
        spec = importlib.util.spec_from_file_location("_piano_recipe", recipe)
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
            names = ", ".join(["tiny", *getattr(module, "MODEL_PRESETS", {})])
            presets = (f"\npresets (configs/piano.py:PRESET): {names}; none = the GPU recipe "
                       "(gpt2); tiny = a few minutes on a CPU with the built-in data")
        except Exception:  # noqa: BLE001 — a broken recipe file is reported when it is used
            presets = ""
    return (f"usage: python -m {prog} --config configs/piano.py[:PRESET] [--config.KEY=VALUE ...]"
            f"\n{what}{presets}"
            "\nkeys: any key of README.md \"Configuration\", e.g. --config.optimizer.max_iters=50 "
            "(a misspelt key is refused with the closest name)")


def parse_config(argv: list[str], prog: str = "piano_gpt_jax.train",
                 what: str = "Train (or with eval_only, evaluate) a piano GPT.") -> TrainConfig:
    """The config of a command line; HelpRequested for --help, ConfigError for a bad one."""
    if any(a in HELP_FLAGS for a in argv[1:]):
        raise HelpRequested(usage(prog, what))
    if "config" not in flags.FLAGS:
        config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/piano.py:tiny",
                                        lock_config=True)
    check_override_keys(argv)
    try:
        flags.FLAGS(argv)
    except Exception as e:  # noqa: BLE001 — absl wraps config-file errors in many types
        raise ConfigError(f"bad command line: {_one_line(e)}") from None
    if flags.FLAGS.config is None:
        raise ConfigError("no config given; run e.g. "
                          "`python -m piano_gpt_jax.train --config configs/piano.py:tiny`")
    return build_train_config(flags.FLAGS.config)


def _one_line(e: BaseException) -> str:
    """absl's message for a flag or config-file error, as one line a user can act on."""
    text = str(e)
    if "Error whilst parsing config file" in text:  # the config file raised: keep its message
        last = [ln.strip() for ln in text.replace("\\n", "\n").splitlines() if ln.strip()]
        text = last[-1] if last else text
        m = re.search(r"(\w+Error|\w+Exception): (.*)$", text)
        if m:
            text = m.group(2)
    text = " ".join(text.replace("\\n", " ").split())
    if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":
        text = text[1:-1]  # absl wraps some messages in quotes; keep quotes inside intact
    return text
