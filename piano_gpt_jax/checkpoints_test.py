"""Orbax model checkpoints: round trip, path forms, refusals, and .pt via load_any_checkpoint."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from piano_gpt_jax.checkpoints import (
    CheckpointError,
    load_any_checkpoint,
    load_model_checkpoint,
    save_model_checkpoint,
)
from piano_gpt_jax.model import ModelConfig, init_params

CFG = ModelConfig(vocab_size=40, n_layer=1, n_head=2, n_embd=8, context_size=16, bias=True,
                  use_time_embedding=True)


def _same(a, b) -> bool:
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    same_tree = jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    return same_tree and all(np.array_equal(np.asarray(x), np.asarray(y))
                             for x, y in zip(la, lb, strict=True))


def test_round_trip_and_path_forms(tmp_path):
    params = init_params(CFG, jax.random.key(0))
    desc = {"name": "ExponentialTimeTokenizer", "parameters": {"vocab": ["<PAD>"] * 40}}
    meta = {"iteration": 12, "val_loss": np.float32(2.5), "tasks": ("a", "b")}
    run = tmp_path / "run"
    step_dir = save_model_checkpoint(run, CFG, params, desc, meta, step=12)
    assert step_dir == run / "checkpoints" / "12"
    for path in (run, run / "checkpoints", step_dir):
        ck = load_model_checkpoint(path)
        assert ck.model_config == CFG and ck.step == 12 and ck.tokenizer_desc == desc
        assert ck.metadata == {"iteration": 12, "val_loss": 2.5, "tasks": ["a", "b"]}
        assert _same(ck.params, params)
    assert load_any_checkpoint(run).step == 12


def test_best_dir_is_used_when_no_latest(tmp_path):
    params = init_params(CFG, jax.random.key(1))
    save_model_checkpoint(tmp_path / "tmp", CFG, params, step=5)
    (tmp_path / "run").mkdir()
    (tmp_path / "tmp" / "checkpoints").rename(tmp_path / "run" / "best")
    assert load_model_checkpoint(tmp_path / "run").step == 5


def test_refusals(tmp_path):
    params = init_params(CFG, jax.random.key(0))
    save_model_checkpoint(tmp_path / "run", CFG, params, step=1)
    with pytest.raises(CheckpointError, match="already holds checkpoints"):
        save_model_checkpoint(tmp_path / "run", CFG, params, step=2)
    with pytest.raises(CheckpointError, match="no such file"):
        load_model_checkpoint(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="holds no complete checkpoint"):
        load_model_checkpoint(tmp_path)
    other = ModelConfig(vocab_size=41, n_layer=1, n_head=2, n_embd=8, context_size=16)
    with pytest.raises(CheckpointError, match="do not match"):
        save_model_checkpoint(tmp_path / "run2", other, params)
    assert not (tmp_path / "run2").exists()


def test_load_any_checkpoint_reads_a_torch_file(tmp_path):
    torch = pytest.importorskip("torch")
    from converters import TorchGPT, save_torch_checkpoint, state_dict_to_params

    cfg = ModelConfig(vocab_size=40, n_layer=1, n_head=2, n_embd=8, context_size=16)
    torch.manual_seed(0)
    params = state_dict_to_params(cfg, TorchGPT(cfg).state_dict())
    save_torch_checkpoint(tmp_path / "m.pt", cfg, params, metadata={"iteration": 9})
    ck = load_any_checkpoint(tmp_path / "m.pt")
    assert ck.model_config == cfg and ck.step == 9 and _same(ck.params, params)
