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
