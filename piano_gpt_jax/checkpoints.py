"""Model checkpoints on disk (orbax): what tools, evaluation and fine-tuning start from.

Layout (shared with the trainer): RUN_DIR/checkpoints/<step>/ holds the latest checkpoints and
RUN_DIR/best/<step>/ the best by full_val loss. Each step directory has the orbax items `params`
(the float32 Flax params tree) and `meta` (JSON: model_config, tokenizer_desc, metadata); training
checkpoints add `train` and `data`, which only the trainer reads. Loading here restores `params` and
`meta` only, so it works for both kinds and needs no optimizer definition.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from .model import ModelConfig, init_params

CHECKPOINTS_SUBDIR = "checkpoints"
BEST_SUBDIR = "best"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message says what is wrong and what to do."""


@dataclasses.dataclass
class ModelCheckpoint:
    model_config: ModelConfig
    params: dict
    tokenizer_desc: dict | None
    metadata: dict
    step: int


def save_model_checkpoint(directory: str | Path, model_config: ModelConfig, params: dict,
                          tokenizer_desc: dict | None = None, metadata: dict | None = None,
                          step: int = 0) -> Path:
    """Write `directory/checkpoints/<step>/{params,meta}`; returns the step directory.

    Refuses a directory that already holds checkpoints rather than mixing two models' steps.
    orbax writes into a temporary directory and renames it when complete.
    """
    directory = Path(directory)
    for sub in (CHECKPOINTS_SUBDIR, BEST_SUBDIR):
        if (directory / sub).is_dir() and any((directory / sub).iterdir()):
            raise CheckpointError(f"{directory / sub} already holds checkpoints; choose a new "
                                  "output directory (nothing was written).")
    params_np = jax.tree_util.tree_map(lambda x: np.asarray(x, dtype=np.float32), params)
    _check_params_shapes(model_config, params_np)
    meta = {"model_config": model_config.to_dict(), "tokenizer_desc": jsonable(tokenizer_desc),
            "metadata": jsonable(metadata or {})}
    manager = ocp.CheckpointManager(directory.resolve() / CHECKPOINTS_SUBDIR,
                                    options=ocp.CheckpointManagerOptions(create=True))
    try:
        manager.save(int(step), args=ocp.args.Composite(
            params=ocp.args.StandardSave(params_np), meta=ocp.args.JsonSave(meta)))
        manager.wait_until_finished()
    finally:
        manager.close()
    return directory / CHECKPOINTS_SUBDIR / str(int(step))


def load_model_checkpoint(path: str | Path) -> ModelCheckpoint:
    """Params and meta from a run directory (latest of checkpoints/, else of best/), one of those
    two directories, or a single step directory."""
    step_dir = resolve_step_dir(Path(path))
    root, step = step_dir.parent, int(step_dir.name)
    manager = ocp.CheckpointManager(root.resolve())
    try:
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        try:
            model_config = ModelConfig.from_dict(meta["model_config"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{step_dir}: meta has no valid model_config ({e}); the "
                                  "checkpoint was not written by piano-gpt-jax.") from None
        abstract = abstract_params(model_config)
        try:
            params = manager.restore(step, args=ocp.args.Composite(
                params=ocp.args.StandardRestore(abstract))).params
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{step_dir}: params do not match its model_config "
                                  f"({str(e)[:300]})") from None
    finally:
        manager.close()
    return ModelCheckpoint(model_config, params, meta.get("tokenizer_desc"),
                           meta.get("metadata") or {}, step)


def load_any_checkpoint(path: str | Path) -> ModelCheckpoint:
    """A torch `.pt` (reference or exported; converted on the fly) or one of our directories."""
    path = Path(path)
    if path.is_file():
        from converters import load_torch_checkpoint  # torch is optional: import only when needed

        ck = load_torch_checkpoint(path)
        return ModelCheckpoint(ck.model_config, ck.params, ck.tokenizer_desc, ck.metadata,
                               ck.step)
    return load_model_checkpoint(path)


def resolve_step_dir(path: Path) -> Path:
    """The step directory that `path` designates (see load_model_checkpoint)."""
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory; pass a run directory, its "
                              "checkpoints/ or best/ directory, or a step directory.")
    if not path.is_dir():
        raise CheckpointError(f"{path}: is a file; pass a checkpoint directory (for a torch .pt "
                              "file use load_any_checkpoint or converters.torch_to_jax).")
    if _is_step_dir(path):
        return path
    for sub in (CHECKPOINTS_SUBDIR, BEST_SUBDIR):
        steps = _steps(path / sub)
        if steps:
            return path / sub / str(steps[-1])
    steps = _steps(path)
    if steps:
        return path / str(steps[-1])
    raise CheckpointError(f"{path}: holds no complete checkpoint (expected checkpoints/<step>/ "
                          "or best/<step>/ with params and meta).")


def _is_step_dir(path: Path) -> bool:
    return path.name.isdigit() and (path / "params").is_dir() and (path / "meta").is_dir()


def _steps(directory: Path) -> list[int]:
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if _is_step_dir(p))


def abstract_params(model_config: ModelConfig) -> Any:
    """Shapes/dtypes of the params on the first local device: the restore target."""
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    shapes = jax.eval_shape(lambda: init_params(model_config, jax.random.key(0)))
    return jax.tree_util.tree_map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)


def _check_params_shapes(model_config: ModelConfig, params: dict) -> None:
    expected = jax.tree_util.tree_map(lambda s: tuple(s.shape), abstract_params(model_config))
    got = jax.tree_util.tree_map(lambda a: tuple(a.shape), params)
    if expected != got:
        raise CheckpointError("params do not match the model config (names or shapes differ); "
                              "nothing was written.")


def jsonable(obj: Any) -> Any:
    """Plain JSON values: numpy to Python, tuples to lists, keys to str, NaN to None."""
    if isinstance(obj, (np.generic, np.ndarray)) or hasattr(obj, "__array__"):
        return jsonable(np.asarray(obj).tolist())
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return json.loads(json.dumps(obj, default=repr))
