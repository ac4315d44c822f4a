"""Numeric precision of a run, in one object: the compute dtype and float16's loss scaling.

Parameters (and optimizer state) are always float32 master copies; `dtype` is what the matmuls
run in (LayerNorm, softmax and the loss stay float32). float16 adds dynamic loss scaling: the
loss is multiplied by `scale`, a micro-batch with non-finite gradients is skipped (params and
optimizer state unchanged, scale times `backoff`), and after `growth_interval` good micro-steps
the scale doubles. No JAX import: numpy's dtypes (bfloat16 through ml_dtypes) serve Flax.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_dtypes
import numpy as np

DTYPES = ("float32", "bfloat16", "float16")
_COMPUTE = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
            "float16": np.dtype(np.float16)}


def compute_dtype(name: str) -> Any:
    """The dtype the matmuls run in for a `system.dtype` name."""
    if name not in _COMPUTE:
        raise ValueError(f"dtype must be one of {DTYPES}, got {name!r}")
    return _COMPUTE[name]


@dataclasses.dataclass(frozen=True)
class Precision:
    dtype: str = "float32"
    init_scale: float = 2.0**15
    growth_interval: int = 2000  # good micro-steps before the scale doubles
    backoff: float = 0.5

    def __post_init__(self) -> None:
        compute_dtype(self.dtype)  # validates the name

    @property
    def loss_scaling(self) -> bool:
        return self.dtype == "float16"

    @property
    def compute_dtype(self) -> Any:
        return compute_dtype(self.dtype)
