"""The one checkpoint record: what every loader returns and every writer takes.

The orbax run directory, the PyTorch `.pt` export and both loaders speak this schema, so a field
added here travels everywhere. `RunMeta` is the bookkeeping around the weights (JSON-able, stored
as the orbax `meta` item and spread over the reference's `.pt` keys); `AdamState` is the optimizer
state in a layout both optax and torch.optim.AdamW can be rebuilt from.

No torch or orbax here: the schema stays importable without either.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from typing import Any

from piano_gpt_jax.checkpoints.errors import CheckpointError
from piano_gpt_jax.checkpoints.run_config import split_run_config
from piano_gpt_jax.model import ModelConfig
from piano_gpt_jax.music.tokenizer import ExponentialTimeTokenizer

SCHEMA_VERSION = 2


def jsonable(obj: Any) -> Any:
    """Plain JSON values: arrays/tensors/numpy scalars to Python, tuples to lists, keys to str,
    non-finite floats to None (JSON has no NaN, and a NaN loss means "unknown" here)."""
    if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):
        return jsonable(obj.tolist())
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return json.loads(json.dumps(obj, default=repr))


def finite_or_none(value: Any) -> float | None:
    """`value` as a float when it is one finite number (a Python or NumPy number, a one-element
    tensor), else None: how every checkpoint reader takes losses and counters."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            value = value.item()
        except (AttributeError, ValueError, RuntimeError, TypeError):
            return None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


_finite = finite_or_none


@dataclasses.dataclass
class RunMeta:
    """Bookkeeping of a checkpoint. `step` counts optimizer updates done (the reference's
    run_stats.iter); `config` is our run config nested as configs/piano.py writes it ({} when
    the checkpoint came from elsewhere); `reference_run_config` is a piano-gpt run_config kept
    verbatim so a converted `.pt` re-exports with the config it came with."""

    step: int = 0
    total_tokens: int = 0
    train_loss: float | None = None
    val_loss: float | None = None
    val_losses: dict[str, float] = dataclasses.field(default_factory=dict)
    best_val_loss: float | None = None
    running_mfu: float = -1.0
    run_name: str | None = None
    config: dict = dataclasses.field(default_factory=dict)
    n_devices: int = 1
    prompt_layout: str | None = None
    wandb_id: str | None = None
    wandb_ran: bool = False
    reference_run_config: dict | None = None
    source: str | None = None
    extra: dict = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict:
        return {"schema": SCHEMA_VERSION, **jsonable(dataclasses.asdict(self))}

    @classmethod
    def from_json(cls, d: Mapping[str, Any] | None) -> RunMeta:
        """Reads this schema and the earlier one (flat dotted `run_config`, `iteration`)."""
        d = dict(d or {})
        if d.get("schema") == SCHEMA_VERSION:
            names = {f.name for f in dataclasses.fields(cls)}
            return cls(**{k: v for k, v in d.items() if k in names})
        config, reference = split_run_config(d.get("run_config"))
        step = d.get("step", d.get("iteration"))
        return cls(
            step=int(step or 0), total_tokens=int(d.get("total_tokens") or 0),
            train_loss=_finite(d.get("train_loss")), val_loss=_finite(d.get("val_loss")),
            val_losses=dict(d.get("val_losses") or {}),
            best_val_loss=_finite(d.get("best_val_loss")), run_name=d.get("run_name"),
            config=config, reference_run_config=reference, wandb_id=d.get("wandb_id"),
            source=d.get("source"))


@dataclasses.dataclass
class AdamState:
    """AdamW state, shared by optax and torch: `mu`/`nu` are the raw (not bias-corrected) first
    and second moments as float32 trees shaped like the Flax params (torch's exp_avg /
    exp_avg_sq), `count` the Adam step used for bias correction (torch's per-parameter `step`).
    The hyper-parameters are what the optimizer last used; the schedule position is the
    record's `meta.step`, which can differ from `count` (a float16 run skips updates)."""

    count: int
    mu: dict
    nu: dict
    lr: float
    b1: float
    b2: float
    eps: float = 1e-8
    weight_decay: float = 0.0


@dataclasses.dataclass
class CheckpointRecord:
    """Weights, the tokenizer they were trained with, bookkeeping and (optionally) AdamW state."""

    model_config: ModelConfig
    params: dict
    tokenizer_desc: dict | None = None
    meta: RunMeta = dataclasses.field(default_factory=RunMeta)
    optimizer: AdamState | None = None

    @property
    def step(self) -> int:
        return self.meta.step

    def tokenizer(self, where: str) -> ExponentialTimeTokenizer:
        """The tokenizer the weights were trained with, checked against the model's vocabulary;
        CheckpointError (naming `where`) when the ids could not be decoded."""
        if self.tokenizer_desc is None:
            raise CheckpointError(f"{where} carries no tokenizer_desc, so its token ids cannot be "
                                  "decoded; export it with its tokenizer")
        try:
            tokenizer = ExponentialTimeTokenizer.from_dict(self.tokenizer_desc)
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"the tokenizer of {where} cannot be rebuilt: {e}") from None
        if tokenizer.vocab_size != self.model_config.vocab_size:
            raise CheckpointError(
                f"{where}: tokenizer ({tokenizer.vocab_size} tokens) and model "
                f"({self.model_config.vocab_size}) disagree; the checkpoint is broken")
        return tokenizer
