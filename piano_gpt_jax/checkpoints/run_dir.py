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

import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as policies

from piano_gpt_jax.checkpoints.errors import CheckpointError
from piano_gpt_jax.checkpoints.model_folder import is_model_folder, load_model_folder
from piano_gpt_jax.checkpoints.record import (
    AdamState,
    CheckpointRecord,
    RunMeta,
    jsonable,
)
from piano_gpt_jax.checkpoints.torch_format import load_torch_checkpoint
from piano_gpt_jax.config import ConfigError, build_train_config
from piano_gpt_jax.jitted_steps import init_train_state
from piano_gpt_jax.model import ModelConfig, init_params
from piano_gpt_jax.optim import AdamWSettings, adam_state, make_optimizer, schedule_lr
from piano_gpt_jax.precision import Precision

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


class DamagedCheckpoint(CheckpointError):
    """A step directory whose files cannot be read (truncated, deleted, garbage)."""


def load_model_checkpoint(path: str | Path, with_optimizer: bool = False,
                          optimizer_required: bool = True) -> CheckpointRecord:
    """A record from a run directory (its newest checkpoint that reads), its checkpoints/ (or
    old best/) directory, or a single step directory. A damaged newest checkpoint is skipped
    with a warning on stderr (the trainer, which owns the directory, moves it aside).
    With `with_optimizer`, also its AdamW state (only training checkpoints have one; rebuilt
    with the run's own optimizer settings); a weights-only checkpoint is then an error unless
    not `optimizer_required`."""
    path = Path(path)
    candidates = [resolve_step_dir(path)] if _is_step_dir(path) else _step_dirs_newest_first(path)
    skipped = []
    for step_dir in candidates:
        try:
            record = _load_step(step_dir, with_optimizer, optimizer_required)
        except DamagedCheckpoint as e:
            if len(candidates) == 1:
                raise
            skipped.append(str(e))
            continue
        for note in skipped:
            print(f"warning: skipped a damaged checkpoint: {note}", file=sys.stderr)
        return record
    raise CheckpointError(f"{path}: no checkpoint in it can be read ({skipped[0]})")


def newest_meta(run_dir: str | Path) -> tuple[dict | None, Path | None]:
    """(the `meta` item, its step directory) of the newest step that reads (checkpoints/, then
    an older run's best/); (None, None) when none does. Read-only, for tools that only show a
    run (the app): no manager, nothing moved aside."""
    for sub in (CHECKPOINTS_SUBDIR, BEST_SUBDIR):
        root = Path(run_dir) / sub
        for step in reversed(_steps(root)):
            reader = _StepReader(root / str(step))
            try:
                meta = reader.meta()
            except Exception:  # noqa: BLE001 — a damaged step: try the one before
                continue
            finally:
                reader.close()
            if isinstance(meta, dict):
                return meta, root / str(step)
    return None, None


def _step_dirs_newest_first(path: Path) -> list[Path]:
    newest = resolve_step_dir(path)  # raises the usual errors for a missing/empty path
    root = newest.parent
    return [root / str(step) for step in reversed(_steps(root))]


class _StepReader:
    """orbax's restore over one step directory, without a CheckpointManager (a manager over the
    whole directory parses every step's metadata first and fails on another step's damage)."""

    def __init__(self, step_dir: Path):
        self._dir = step_dir.resolve()
        self._checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler())

    def restore(self, **items: Any) -> Any:
        return self._checkpointer.restore(self._dir, args=ocp.args.Composite(**items))

    def meta(self) -> Any:
        return self.restore(meta=ocp.args.JsonRestore()).meta

    def close(self) -> None:
        self._checkpointer.close()


def _load_step(step_dir: Path, with_optimizer: bool, optimizer_required: bool
               ) -> CheckpointRecord:
    step = int(step_dir.name)
    reader = _StepReader(step_dir)
    try:
        try:
            meta = reader.meta()
        except Exception as e:  # noqa: BLE001 — orbax/json raise many types
            raise DamagedCheckpoint(f"{step_dir}: its meta cannot be read "
                                    f"({_first_line(e)})") from None
        model_config = _model_config(meta, step_dir)
        try:
            params = reader.restore(
                params=ocp.args.StandardRestore(abstract_params(model_config))).params
        except (ValueError, KeyError) as e:
            if "shape" in str(e).lower() or "structure" in str(e).lower():
                raise CheckpointError(f"{step_dir}: params do not match its model_config "
                                      f"({str(e)[:300]})") from None
            raise DamagedCheckpoint(f"{step_dir}: its params cannot be read "
                                    f"({_first_line(e)})") from None
        except Exception as e:  # noqa: BLE001
            raise DamagedCheckpoint(f"{step_dir}: its params cannot be read "
                                    f"({_first_line(e)})") from None
        record = record_from_meta(meta, params, step_dir)
        record.meta.step = step
        training_items = (step_dir / "data").is_dir() or (step_dir / "metrics").is_dir()
        if with_optimizer and (step_dir / "train").is_dir():
            record.optimizer = _restore_adam(reader, record, step_dir)
        elif with_optimizer and training_items:
            raise DamagedCheckpoint(f"{step_dir}: a training checkpoint without its train/ item "
                                    "(optimizer state)")
        elif with_optimizer and optimizer_required:
            raise CheckpointError(f"{step_dir} holds weights only (no optimizer state); export "
                                  "a training checkpoint (RUN_DIR/checkpoints/<step>) instead.")
    finally:
        reader.close()
    return record


def _restore_adam(reader: _StepReader, record: CheckpointRecord, step_dir: Path) -> AdamState:
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
        train = reader.restore(train=ocp.args.StandardRestore(target)).train
    except Exception as e:  # noqa: BLE001
        if isinstance(e, (ValueError, KeyError)) and ("shape" in str(e).lower()
                                                      or "structure" in str(e).lower()):
            raise CheckpointError(f"{step_dir}: the optimizer state does not match the run's "
                                  f"optimizer settings ({str(e)[:300]})") from None
        raise DamagedCheckpoint(f"{step_dir}: its optimizer state cannot be read "
                                f"({_first_line(e)})") from None
    adam, _ = adam_state(train["opt_state"])
    host = lambda tree: jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), tree)
    return AdamState(count=int(adam.count), mu=host(adam.mu), nu=host(adam.nu),
                     lr=schedule_lr(optim, record.meta.step),
                     **AdamWSettings.of(optim).as_dict())


def load_any_checkpoint(path: str | Path, with_optimizer: bool = False) -> CheckpointRecord:
    """A torch `.pt` (piano-gpt's or our export; converted on the fly), a model folder
    (safetensors, model_folder.py) or one of our run directories."""
    path = Path(path)
    if path.is_file():
        return load_torch_checkpoint(path, with_optimizer=with_optimizer)
    if is_model_folder(path):
        if with_optimizer:
            raise CheckpointError(f"{path} is a model folder (weights only, no optimizer "
                                  "state); drop init_optimizer to fine-tune it with a fresh "
                                  "optimizer.")
        return load_model_folder(path)
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"{path}: is neither a .pt file nor a checkpoint directory (a "
                              "device or pipe); pass a run directory or a .pt file.")
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


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    line = text.splitlines()[0] if text else ""
    line = line.split(" See full TensorStore details")[0]  # the rest is a repr of a method
    return f"{type(error).__name__}: {line[:200]}" if line else type(error).__name__


def _abstract(x: Any) -> Any:
    """A restore target leaf: shape, dtype and sharding (the first local device by default)."""
    if isinstance(x, (jax.Array, jax.ShapeDtypeStruct)):
        sharding = getattr(x, "sharding", None) or jax.sharding.SingleDeviceSharding(
            jax.local_devices()[0])
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
    return x


# ------------------------------------------------------------------------- training checkpoints
def has_steps(run_dir: str | Path, subdirs: tuple[str, ...] = (CHECKPOINTS_SUBDIR,)) -> bool:
    """Whether RUN_DIR/checkpoints (or another of `subdirs`) holds any step directory
    (restorable or not). An empty checkpoints/ (a start killed before its first save, or an
    older version's) is no checkpoint."""
    for sub in subdirs:
        directory = Path(run_dir) / sub
        if directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir()):
            return True
    return False


def holds_checkpoints(run_dir: str | Path) -> bool:
    """Whether a tool can load a model from RUN_DIR (checkpoints/ or an older run's best/)."""
    return has_steps(run_dir, (CHECKPOINTS_SUBDIR, BEST_SUBDIR))


def _steps_orbax_cannot_list(directory: Path) -> list[tuple[Path, Exception]]:
    """Step directories whose JSON files read when orbax opens a directory do not parse."""
    found = []
    for step_dir in sorted(directory.glob("*")) if directory.is_dir() else []:
        if not step_dir.name.isdigit():
            continue
        for name in ("_CHECKPOINT_METADATA", "metrics/metrics"):
            path = step_dir / name
            try:
                if path.exists():
                    json.loads(path.read_bytes())
            except (OSError, ValueError) as e:
                found.append((step_dir, ValueError(f"{name}: {e}")))
                break
    return found


class TrainCheckpointer:
    """One orbax manager for a training run: the latest `keep_last` checkpoints plus the best."""

    def __init__(self, run_dir: str | Path, keep_last: int, async_save: bool = True):
        self.run_dir = Path(run_dir).resolve()
        # Steps moved to RUN_DIR/damaged/ by this checkpointer, with their notes. orbax's manager
        # parses every step's _CHECKPOINT_METADATA and metrics file when it opens, so a step
        # damaged there is set aside before the manager exists (else: a JSONDecodeError).
        self.set_aside_steps: list[int] = []
        self.set_aside_notes: list[str] = []
        for step_dir, error in _steps_orbax_cannot_list(self.run_dir / CHECKPOINTS_SUBDIR):
            self.set_aside_notes.append(self._move_aside(int(step_dir.name), error))
        keep = policies.AnyPreservationPolicy([
            policies.LatestN(n=keep_last),
            # BestN keeps the largest metric values: rank by -loss to keep the lowest loss.
            policies.BestN(get_metric_fn=lambda m: -m["val_loss"], n=1,
                           keep_checkpoints_without_metrics=False),
        ])
        try:
            self._manager = ocp.CheckpointManager(
                self.run_dir / CHECKPOINTS_SUBDIR,
                options=ocp.CheckpointManagerOptions(
                    create=False, enable_async_checkpointing=async_save,
                    preservation_policy=keep, best_fn=lambda m: m["val_loss"], best_mode="min",
                    cleanup_tmp_directories=True))  # half-written steps of a killed run
        except Exception as e:  # noqa: BLE001 — orbax raises many types
            raise CheckpointError(
                f"{self.run_dir / CHECKPOINTS_SUBDIR} cannot be opened as a checkpoint directory "
                f"({_first_line(e)}); move it aside to start over, or choose another "
                "--config.out_dir.") from None

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def reload(self) -> None:
        """Re-read the steps on disk (after a failed or interrupted write)."""
        self._manager.reload()

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

    def restore_newest(self, target_fn: Callable[[dict], dict],
                       notes: list[str]) -> tuple[int, dict, dict, Any] | None:
        """(step, state, meta, data_state) of the newest checkpoint that restores, or None.

        `target_fn(meta)` gives the restore target (tree, shapes, shardings) for a checkpoint's
        meta. A checkpoint whose files are damaged (truncated, deleted, garbage) is moved aside
        to RUN_DIR/damaged/ (never deleted) with a line in `notes`, and the next older one is
        tried. One that is intact but does not fit the target (another optimizer or precision
        setup) raises CheckpointError instead: that is the config's doing, not damage.
        """
        notes.extend(self.set_aside_notes)
        for step in sorted(self._manager.all_steps(), reverse=True):
            try:
                meta = self.restore_meta(step)
                ModelConfig.from_dict(meta["model_config"])
                RunMeta.from_json(meta.get("metadata"))
            except Exception as e:  # noqa: BLE001 — any unreadable meta means damage
                notes.append(self.set_aside(step, e))
                continue
            target = target_fn(meta)
            try:
                return (step, *self.restore(step, target))
            except Exception as e:  # noqa: BLE001
                if not self._readable(step):
                    notes.append(self.set_aside(step, e))
                    continue
                raise CheckpointError(
                    f"checkpoint {self.run_dir / CHECKPOINTS_SUBDIR / str(step)} is intact but "
                    f"does not fit this config's training state ({_first_line(e)}); run with the "
                    "optimizer and precision settings it was written with, or choose a new "
                    "out_dir.") from None
        return None

    def _readable(self, step: int) -> bool:
        """Whether every item of `step` reads back without a target (no damage)."""
        try:
            self._manager.restore(step, args=ocp.args.Composite(
                params=ocp.args.StandardRestore(), train=ocp.args.StandardRestore(),
                meta=ocp.args.JsonRestore(), data=ocp.args.JsonRestore()))
            return True
        except Exception:  # noqa: BLE001
            return False

    def set_aside(self, step: int, error: BaseException) -> str:
        """Move damaged checkpoint `step` to RUN_DIR/damaged/<step>-<time>/; returns a note."""
        note = self._move_aside(step, error)
        self._manager.reload()
        return note

    def _move_aside(self, step: int, error: BaseException) -> str:
        source = self.run_dir / CHECKPOINTS_SUBDIR / str(step)
        target = self.run_dir / "damaged" / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(source, target)
        (target / "DAMAGED.txt").write_text(f"{type(error).__name__}: {error}\n")
        self.set_aside_steps.append(step)
        return (f"checkpoint {step} is damaged ({_first_line(error)}); moved it to {target} "
                "and fell back to the one before it")

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
        try:
            self._manager.wait_until_finished()  # background work must end before exit
        finally:
            self._manager.close()
