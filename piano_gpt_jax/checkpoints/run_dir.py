"""The orbax run directory: what training writes and what every tool starts from.

Layout:
  RUN_DIR/checkpoints/<step>/params    the float32 Flax params tree
  RUN_DIR/checkpoints/<step>/meta      JSON: model_config, tokenizer_desc, metadata (RunMeta)
  RUN_DIR/checkpoints/<step>/train     training checkpoints: optimizer state, micro-step
                                       counter, rng, loss-scale state
  RUN_DIR/checkpoints/<step>/data      training checkpoints: the data iterator's JSON state
  RUN_DIR/checkpoints/<step>/metrics   training checkpoints: {"val_loss"}, orbax's own file
One orbax manager keeps the latest `keep_last` training checkpoints plus the one with the lowest
validation loss (orbax preservation policies), so "latest" and "best" can never disagree about
which steps exist. Runs written before this layout also have RUN_DIR/best/<step>/{params,meta};
they still load. orbax writes each step into a temporary directory and renames it when complete,
so a kill during a save leaves the previous steps intact.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as policies

from piano_gpt_jax.checkpoints.record import (
    AdamState,
    CheckpointError,
    CheckpointRecord,
    RunMeta,
    jsonable,
)
from piano_gpt_jax.model import ModelConfig, init_params

CHECKPOINTS_SUBDIR = "checkpoints"
BEST_SUBDIR = "best"  # written by earlier versions; read only


def meta_json(record: CheckpointRecord) -> dict:
    """The `meta` item of a step directory."""
    return {"model_config": record.model_config.to_dict(),
            "tokenizer_desc": jsonable(record.tokenizer_desc),
            "metadata": record.meta.to_json()}


def record_from_meta(meta: dict, params: dict, where: Path | str) -> CheckpointRecord:
    return CheckpointRecord(_model_config(meta, where), params, meta.get("tokenizer_desc"),
                            RunMeta.from_json(meta.get("metadata")))


def _model_config(meta: dict, where: Path | str) -> ModelConfig:
    try:
        return ModelConfig.from_dict(meta["model_config"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: meta has no valid model_config ({e}); the checkpoint "
                              "was not written by piano-gpt-jax.") from None


# ------------------------------------------------------------------------- model checkpoints
def save_model_checkpoint(directory: str | Path, record: CheckpointRecord) -> Path:
    """Write `directory/checkpoints/<record.step>/{params,meta}`; returns the step directory.

    Refuses a directory that already holds checkpoints rather than mixing two models' steps.
    """
    directory = Path(directory)
    for sub in (CHECKPOINTS_SUBDIR, BEST_SUBDIR):
        if (directory / sub).is_dir() and any((directory / sub).iterdir()):
            raise CheckpointError(f"{directory / sub} already holds checkpoints; choose a new "
                                  "output directory (nothing was written).")
    params_np = jax.tree_util.tree_map(lambda x: np.asarray(x, dtype=np.float32), record.params)
    _check_params_shapes(record.model_config, params_np)
    manager = ocp.CheckpointManager(directory.resolve() / CHECKPOINTS_SUBDIR,
                                    options=ocp.CheckpointManagerOptions(create=True))
    try:
        manager.save(int(record.step), args=ocp.args.Composite(
            params=ocp.args.StandardSave(params_np), meta=ocp.args.JsonSave(meta_json(record))))
        manager.wait_until_finished()
    finally:
        manager.close()
    return directory / CHECKPOINTS_SUBDIR / str(int(record.step))


def load_model_checkpoint(path: str | Path, with_optimizer: bool = False) -> CheckpointRecord:
    """A record from a run directory (latest of checkpoints/, else of best/), one of those two
    directories, or a single step directory. With `with_optimizer`, also its AdamW state (only
    training checkpoints have one; rebuilt with the run's own optimizer settings)."""
    step_dir = resolve_step_dir(Path(path))
    root, step = step_dir.parent, int(step_dir.name)
    manager = ocp.CheckpointManager(root.resolve())
    try:
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        model_config = _model_config(meta, step_dir)
        try:
            params = manager.restore(step, args=ocp.args.Composite(
                params=ocp.args.StandardRestore(abstract_params(model_config)))).params
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{step_dir}: params do not match its model_config "
                                  f"({str(e)[:300]})") from None
        record = record_from_meta(meta, params, step_dir)
        if record.meta.step != step:
            record.meta.step = step
        if with_optimizer:
            record.optimizer = _restore_adam(manager, step, record, step_dir)
    finally:
        manager.close()
    return record


def _restore_adam(manager, step: int, record: CheckpointRecord, step_dir: Path) -> AdamState:
    from piano_gpt_jax.config import ConfigError, build_train_config
    from piano_gpt_jax.optim import adam_state, make_optimizer, schedule_lr
    from piano_gpt_jax.train_step import Precision, init_train_state

    if not (step_dir / "train").is_dir():
        raise CheckpointError(f"{step_dir} holds weights only (no optimizer state); export a "
                              "training checkpoint (RUN_DIR/checkpoints/<step>) instead.")
    try:
        optim = build_train_config(record.meta.config).optim
    except ConfigError as e:
        raise CheckpointError(f"{step_dir}: its run config cannot rebuild the optimizer "
                              f"({e})") from None
    tx = make_optimizer(optim)
    like = jax.eval_shape(lambda: init_train_state(
        init_params(record.model_config, jax.random.key(0)), tx, 0, Precision()))
    target = jax.tree_util.tree_map(_abstract, {k: v for k, v in like.items() if k != "params"})
    try:
        train = manager.restore(step, args=ocp.args.Composite(
            train=ocp.args.StandardRestore(target))).train
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{step_dir}: the optimizer state does not match the run's "
                              f"optimizer settings ({str(e)[:300]})") from None
    adam, _ = adam_state(train["opt_state"])
    host = lambda tree: jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), tree)
    return AdamState(count=int(adam.count), mu=host(adam.mu), nu=host(adam.nu),
                     lr=schedule_lr(optim, record.meta.step), b1=optim.beta1, b2=optim.beta2,
                     eps=1e-8, weight_decay=optim.weight_decay)


def load_any_checkpoint(path: str | Path, with_optimizer: bool = False) -> CheckpointRecord:
    """A torch `.pt` (piano-gpt's or our export; converted on the fly) or one of our run
    directories."""
    path = Path(path)
    if path.is_file():
        from piano_gpt_jax.checkpoints.torch_format import load_torch_checkpoint

        return load_torch_checkpoint(path, with_optimizer=with_optimizer)
    return load_model_checkpoint(path, with_optimizer=with_optimizer)


def resolve_step_dir(path: Path) -> Path:
    """The step directory that `path` designates (see load_model_checkpoint)."""
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory; pass a run directory, its "
                              "checkpoints/ directory, or a step directory.")
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
                          "with params and meta).")


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


def _abstract(x: Any) -> Any:
    """A restore target leaf: shape, dtype and sharding (the first local device by default)."""
    if isinstance(x, (jax.Array, jax.ShapeDtypeStruct)):
        sharding = getattr(x, "sharding", None) or jax.sharding.SingleDeviceSharding(
            jax.local_devices()[0])
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
    return x


# ------------------------------------------------------------------------- training checkpoints
class TrainCheckpointer:
    """One orbax manager for a training run: the latest `keep_last` checkpoints plus the best."""

    def __init__(self, run_dir: str | Path, keep_last: int, async_save: bool = True):
        self.run_dir = Path(run_dir).resolve()
        keep = policies.AnyPreservationPolicy([
            policies.LatestN(n=keep_last),
            # BestN keeps the largest metric values: rank by -loss to keep the lowest loss.
            policies.BestN(get_metric_fn=lambda m: -m["val_loss"], n=1,
                           keep_checkpoints_without_metrics=False),
        ])
        self._manager = ocp.CheckpointManager(
            self.run_dir / CHECKPOINTS_SUBDIR,
            options=ocp.CheckpointManagerOptions(
                create=True, enable_async_checkpointing=async_save, preservation_policy=keep,
                best_fn=lambda m: m["val_loss"], best_mode="min"))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def best_step(self) -> int | None:
        """The step with the lowest finite validation loss (None before any)."""
        step = self._manager.best_step()
        return step if step is not None and self._manager.metrics(step) else None

    def save(self, step: int, state: dict, record: CheckpointRecord, data_state: Any,
             val_loss: float | None) -> None:
        """Queue a training checkpoint; returns once arrays are copied off the devices.

        A non-finite `val_loss` is stored without a metric, so it can never become the best.
        """
        train = {k: v for k, v in state.items() if k != "params"}
        metrics = {"val_loss": float(val_loss)} if val_loss is not None and math.isfinite(
            val_loss) else None
        self._manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(state["params"]),
            meta=ocp.args.JsonSave(meta_json(record)),
            train=ocp.args.StandardSave(train), data=ocp.args.JsonSave(jsonable(data_state))),
            metrics=metrics, force=True)

    def restore_meta(self, step: int) -> dict:
        return self._manager.restore(step, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore())).meta

    def restore(self, step: int, state_like: dict) -> tuple[dict, dict, Any]:
        """(state, meta, data_state) of `step`; `state_like` gives tree, shapes and shardings."""
        abstract = jax.tree_util.tree_map(_abstract, state_like)
        train_like = {k: v for k, v in abstract.items() if k != "params"}
        restored = self._manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract["params"]), meta=ocp.args.JsonRestore(),
            train=ocp.args.StandardRestore(train_like), data=ocp.args.JsonRestore()))
        state = {"params": restored.params, **restored.train}
        return state, restored.meta, restored.data

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()
