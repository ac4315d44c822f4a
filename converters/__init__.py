"""Conversion between our Flax checkpoints and the PyTorch trainer's (piano-gpt) `.pt` files."""

from .safe_load import CheckpointError
from .state_dict import params_to_state_dict, state_dict_to_params
from .torch_checkpoint import TorchCheckpoint, load_torch_checkpoint, save_torch_checkpoint
from .torch_model import TorchGPT

__all__ = [
    "CheckpointError",
    "TorchCheckpoint",
    "TorchGPT",
    "load_torch_checkpoint",
    "params_to_state_dict",
    "save_torch_checkpoint",
    "state_dict_to_params",
]
