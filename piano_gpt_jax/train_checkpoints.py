"""Training checkpoints: resume exactly, keep the last N and the best, export PyTorch `.pt` files.

Layout (shared with piano_gpt_jax/checkpoints.py, which loads `params` + `meta` from either):
  RUN_DIR/checkpoints/<step>/{params, meta, train, data}   the last `keep_last` checkpoints
  RUN_DIR/best/<step>/{params, meta}                       the best by full_val loss
`train` holds everything else the step function carries (optimizer state, micro-step counter, rng,
loss-scale state); `data` the data iterator's JSON state. orbax writes each step into a temporary
directory and renames it when complete, so a kill during a save leaves the previous one intact.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from piano_gpt_jax.checkpoints import BEST_SUBDIR, CHECKPOINTS_SUBDIR, jsonable
from piano_gpt_jax.model import ModelConfig

log = logging.getLogger(__name__)


class TrainCheckpointer:
    """The two orbax managers of one run directory."""

    def __init__(self, run_dir: str | Path, keep_last: int, async_save: bool = True):
        self.run_dir = Path(run_dir).resolve()
        options = lambda keep: ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
        self._last = ocp.CheckpointManager(self.run_dir / CHECKPOINTS_SUBDIR,
                                           options=options(keep_last))
        self._best = ocp.CheckpointManager(self.run_dir / BEST_SUBDIR, options=options(1))

    def latest_step(self) -> int | None:
        return self._last.latest_step()

    def best_step(self) -> int | None:
        return self._best.latest_step()

    def save(self, step: int, state: dict, meta: dict, data_state: Any,
             is_best: bool) -> None:
        """Queue a training checkpoint (and a best one); returns once arrays are copied off."""
        meta = jsonable(meta)
        train = {k: v for k, v in state.items() if k != "params"}
        self._last.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(state["params"]), meta=ocp.args.JsonSave(meta),
            train=ocp.args.StandardSave(train), data=ocp.args.JsonSave(jsonable(data_state))),
            force=True)
        if is_best:
            self._best.save(step, args=ocp.args.Composite(
                params=ocp.args.StandardSave(state["params"]), meta=ocp.args.JsonSave(meta)),
                force=True)

    def restore_meta(self, step: int) -> dict:
        return self._last.restore(step, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore())).meta

    def restore(self, step: int, state_like: dict) -> tuple[dict, dict, Any]:
        """(state, meta, data_state) of `step`; `state_like` gives tree, shapes and shardings."""
        abstract = jax.tree_util.tree_map(_abstract, state_like)
        train_like = {k: v for k, v in abstract.items() if k != "params"}
        restored = self._last.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract["params"]), meta=ocp.args.JsonRestore(),
            train=ocp.args.StandardRestore(train_like), data=ocp.args.JsonRestore()))
        state = {"params": restored.params, **restored.train}
        return state, restored.meta, restored.data

    def restore_best_params(self, params_like: dict) -> tuple[dict, dict] | None:
        step = self.best_step()
        if step is None:
            return None
        abstract = jax.tree_util.tree_map(_abstract, params_like)
        restored = self._best.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        return restored.params, restored.meta

    def wait(self) -> None:
        self._last.wait_until_finished()
        self._best.wait_until_finished()

    def close(self) -> None:
        self._last.close()
        self._best.close()


def _abstract(x: Any) -> Any:
    if isinstance(x, jax.Array):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    return x


def export_torch(path: str | Path, model_config: ModelConfig, params: dict,
                 tokenizer_desc: dict | None, metadata: dict) -> Path | None:
    """Write a reference-layout `.pt` (atomically); None with a logged note when torch is absent."""
    try:
        from converters import save_torch_checkpoint
    except ImportError as e:  # torch is an optional dependency
        log.warning("skipping the .pt export of %s: %s (pip install torch to enable it)", path, e)
        return None
    host_params = jax.device_get(params)
    # Export the architecture only: the compute dtype / embedding style are runtime choices.
    cfg = ModelConfig.from_dict({**model_config.to_dict(), "dtype": "float32",
                                 "one_hot_embedding": False})
    path = Path(path)
    os.makedirs(path.parent, exist_ok=True)
    return save_torch_checkpoint(path, cfg, host_params, tokenizer_desc, metadata)
