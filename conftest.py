"""Shared pytest fixtures: where the read-only reference material lives."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests run on CPU; keep JAX from grabbing an accelerator or preallocating memory by surprise.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

REPO_ROOT = Path(__file__).resolve().parent
SHARED_DIR = Path(os.environ.get("PIANO_GPT_SHARED", REPO_ROOT.parent / "shared"))
MAESTRO_DIR = SHARED_DIR / "data" / "maestro"


@pytest.fixture(scope="session")
def maestro_dir() -> Path:
    """Ten real MAESTRO performances (read-only; never copied into the project)."""
    if not MAESTRO_DIR.is_dir():
        pytest.skip(f"reference MIDI files not found at {MAESTRO_DIR}")
    return MAESTRO_DIR


@pytest.fixture
def reference_checkpoint(tmp_path):
    """Factory: (bias, time, layout) -> (path, TorchGPT with the saved weights) of a checkpoint
    written as piano-gpt's trainer writes it (converters/testing.py)."""
    import torch

    from converters.testing import randomize, tiny_config, write_reference_checkpoint
    from converters.torch_model import TorchGPT

    def make(bias: bool = False, time: bool = False, layout: str = "current", seed: int = 0):
        torch.manual_seed(seed)
        model = randomize(TorchGPT(tiny_config(bias, time)), seed)
        path = write_reference_checkpoint(tmp_path / f"ref-{bias}-{time}-{layout}.pt", model,
                                          layout)
        return path, model

    return make


@pytest.fixture(scope="session")
def maestro_dataset(maestro_dir, tmp_path_factory) -> Path:
    """The ten MAESTRO performances imported once per session (train 8 / validation 1 / test 1)."""
    from piano_gpt_jax.data import import_midi

    out = tmp_path_factory.mktemp("maestro") / "dataset"
    assert import_midi.main([str(maestro_dir), str(out)]) == 0
    return out
