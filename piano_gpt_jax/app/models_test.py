"""Checkpoints for the Generate page: listing, and loading refusals as readable messages."""

from __future__ import annotations

import os

import pytest
import torch

from piano_gpt_jax.app import models
from piano_gpt_jax.app.errors import AppError


def test_list_and_load(runs_root, tmp_path):
    assert models.list_checkpoints(runs_root) == [runs_root / "tiny"]
    assert models.list_checkpoints(tmp_path / "missing") == []
    m = models.load_model(runs_root / "tiny")
    assert m.layout == "annotated" and m.model_config.n_layer == 2 and "context 96" in m.summary
    assert m.has_tokens(["<GENAI>", "<PARAMETRIC_HIGH_NOTES>"])
    assert models.cache_key(runs_root / "tiny")[1] > 0


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_bad_checkpoints_are_refused(tmp_path):
    with pytest.raises(AppError, match="does not exist"):
        models.load_model(tmp_path / "nothing")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint" * 100)
    with pytest.raises(AppError, match="cannot load checkpoint"):
        models.load_model(junk)
    empty_run = tmp_path / "empty-run"
    (empty_run / "checkpoints").mkdir(parents=True)
    with pytest.raises(AppError, match="cannot load checkpoint"):
        models.load_model(empty_run)
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.zeros(2)}, "extra": _Payload(marker)}, evil)
    with pytest.raises(AppError, match="refused"):
        models.load_model(evil)
    assert not marker.exists()  # the pickle's code never ran
