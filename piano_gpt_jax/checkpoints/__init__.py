"""Checkpoints: one record (record.py), our orbax run directory (run_dir.py), piano-gpt's `.pt`
format (torch_format.py, torch imported lazily), the safetensors model folder (model_folder.py),
and the run config in both vocabularies (run_config.py)."""

from piano_gpt_jax.checkpoints.errors import CheckpointError
from piano_gpt_jax.checkpoints.model_folder import (
    is_model_folder,
    load_model_folder,
    save_model_folder,
)
from piano_gpt_jax.checkpoints.record import (
    AdamState,
    CheckpointRecord,
    RunMeta,
    jsonable,
)
from piano_gpt_jax.checkpoints.run_dir import (
    BEST_SUBDIR,
    CHECKPOINTS_SUBDIR,
    TrainCheckpointer,
    abstract_params,
    holds_checkpoints,
    load_any_checkpoint,
    load_model_checkpoint,
    newest_meta,
    resolve_step_dir,
    save_model_checkpoint,
)

__all__ = [
    "BEST_SUBDIR",
    "CHECKPOINTS_SUBDIR",
    "AdamState",
    "CheckpointError",
    "CheckpointRecord",
    "RunMeta",
    "TrainCheckpointer",
    "abstract_params",
    "holds_checkpoints",
    "is_model_folder",
    "jsonable",
    "load_any_checkpoint",
    "load_model_checkpoint",
    "load_model_folder",
    "newest_meta",
    "resolve_step_dir",
    "save_model_checkpoint",
    "save_model_folder",
]
