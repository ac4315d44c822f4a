"""Checkpoints to and from PyTorch: the CLIs (`torch_to_jax`, `jax_to_torch`), our PyTorch twin
of the model (`torch_model`) and sampling with it (`torch_generate`).

The `.pt` format itself lives in `piano_gpt_jax.checkpoints.torch_format` (this package depends
on piano_gpt_jax, never the reverse); its public functions are re-exported here.
"""

from piano_gpt_jax.checkpoints import CheckpointError, CheckpointRecord
from piano_gpt_jax.checkpoints.torch_format import (
    load_torch_checkpoint,
    params_to_state_dict,
    save_torch_checkpoint,
    state_dict_to_params,
)

from .torch_model import TorchGPT

__all__ = [
    "CheckpointError",
    "CheckpointRecord",
    "TorchGPT",
    "load_torch_checkpoint",
    "params_to_state_dict",
    "save_torch_checkpoint",
    "state_dict_to_params",
]
