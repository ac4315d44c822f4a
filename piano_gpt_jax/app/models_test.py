"""Checkpoints for the Generate page: listing, and loading refusals as readable messages."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest
import torch

from piano_gpt_jax.app import models
from piano_gpt_jax.app.errors import AppError
from piano_gpt_jax.checkpoints import CheckpointRecord, RunMeta
from piano_gpt_jax.checkpoints.torch_format import save_torch_checkpoint


def test_list_and_load(runs_root, tmp_path):
    assert models.list_checkpoints(runs_root) == [runs_root / "tiny", runs_root / "tiny-b"]
    assert models.list_checkpoints(tmp_path / "missing") == []
    m = models.load_model(runs_root / "tiny")
    assert m.layout == "annotated" and m.model_config.n_layer == 2 and "context 96" in m.summary
    assert m.has_tokens(["<GENAI>", "<PARAMETRIC_HIGH_NOTES>"])
    assert models.cache_key(runs_root / "tiny")[1] > 0


def test_a_pt_export_loads_as_its_run_directory_does(runs_root, tmp_path):
    """The same model through a PyTorch export: same weights, tokenizer, layout and step."""
    run = models.load_model(runs_root / "tiny")
    path = save_torch_checkpoint(tmp_path / "tiny.pt", CheckpointRecord(
        run.model_config, run.params, run.tokenizer.to_dict(), RunMeta(step=run.step)))
    pt = models.load_model(path)
    assert pt.model_config == run.model_config and pt.step == run.step
    assert pt.layout == run.layout and pt.tokenizer.vocab_size == run.tokenizer.vocab_size
    for a, b in zip(jax.tree_util.tree_leaves(pt.params), jax.tree_util.tree_leaves(run.params),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


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


def test_refusals_say_the_path_once_and_nothing_the_app_cannot_use(tmp_path):
    """A malicious .pt: what torch refused, without its cut-off advice; a device file: no Python
    function names (they mean nothing in the app)."""

    class Payload:
        def __reduce__(self):
            return (os.system, ("true",))

    evil = tmp_path / "evil.pt"
    torch.save({"model": {}, "x": Payload()}, evil)
    with pytest.raises(AppError) as refused:
        models.load_model(evil)
    message = str(refused.value)
    assert message.count(str(evil)) == 1 and "(GLOBAL posix.system)" in message
    assert "options" not in message and "weights_only" not in message
    with pytest.raises(AppError) as device:
        models.load_model("/dev/zero")
    assert "neither a .pt file nor a checkpoint directory" in str(device.value)
    assert "load_any_checkpoint" not in str(device.value) and "converters" not in str(device.value)
