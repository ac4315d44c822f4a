"""The orbax run directory: model and training checkpoints round-trip, path forms, refusals,
one manager keeping the latest N plus the best, and `.pt` files through load_any_checkpoint."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from piano_gpt_jax.checkpoints import (
    CheckpointError,
    CheckpointRecord,
    RunMeta,
    TrainCheckpointer,
    load_any_checkpoint,
    load_model_checkpoint,
    save_model_checkpoint,
)
from piano_gpt_jax.config import OptimSettings, build_train_config
from piano_gpt_jax.jitted_steps import init_train_state, make_mesh, replicate
from piano_gpt_jax.model import ModelConfig, init_params
from piano_gpt_jax.optim import adam_state, make_optimizer
from piano_gpt_jax.precision import Precision

CFG = ModelConfig(vocab_size=40, n_layer=1, n_head=2, n_embd=8, context_size=16, bias=True,
                  use_time_embedding=True)
TRAIN_CFG = ModelConfig(vocab_size=40, n_layer=1, n_head=2, n_embd=16, context_size=16)
RUN_CONFIG = {"optimizer": {"gradient_accumulation_steps": 2, "max_iters": 10},
              "lr": {"learning_rate": 1e-3, "min_lr": 1e-4, "warmup_iters": 2,
                     "lr_decay_iters": 10}}
OPT: OptimSettings = build_train_config(RUN_CONFIG).optim


def _same(a, b) -> bool:
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    same_tree = jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    return same_tree and all(np.array_equal(np.asarray(x), np.asarray(y))
                             for x, y in zip(la, lb, strict=True))


def test_round_trip_and_path_forms(tmp_path):
    params = init_params(CFG, jax.random.key(0))
    desc = {"name": "ExponentialTimeTokenizer", "parameters": {"vocab": ["<PAD>"] * 40}}
    meta = RunMeta(step=12, val_loss=float(np.float32(2.5)), config={"tasks": ["a", "b"]})
    run = tmp_path / "run"
    step_dir = save_model_checkpoint(run, CheckpointRecord(CFG, params, desc, meta))
    assert step_dir == run / "checkpoints" / "12"
    for path in (run, run / "checkpoints", step_dir):
        record = load_model_checkpoint(path)
        assert record.model_config == CFG and record.step == 12 and record.tokenizer_desc == desc
        assert record.meta == RunMeta(step=12, val_loss=2.5, config={"tasks": ["a", "b"]})
        assert _same(record.params, params)
    assert load_any_checkpoint(run).step == 12


def test_runs_written_before_the_record_schema_still_load(tmp_path):
    """Old meta: flat dotted run_config, `iteration`; old layout: a separate best/ directory."""
    import orbax.checkpoint as ocp

    params = init_params(CFG, jax.random.key(1))
    old_meta = {"model_config": CFG.to_dict(), "tokenizer_desc": None,
                "metadata": {"step": 5, "iteration": 5, "total_tokens": 640, "val_loss": 3.5,
                             "run_config": {"data.batch_size": 4, "stage": "piano_task"}}}
    manager = ocp.CheckpointManager(tmp_path / "run" / "best")
    manager.save(5, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                            meta=ocp.args.JsonSave(old_meta)))
    manager.wait_until_finished()
    manager.close()
    record = load_model_checkpoint(tmp_path / "run")
    assert record.step == 5 and record.meta.total_tokens == 640 and record.meta.val_loss == 3.5
    assert record.meta.config == {"data": {"batch_size": 4}, "stage": "piano_task"}
    assert _same(record.params, params)


def test_refusals(tmp_path):
    params = init_params(CFG, jax.random.key(0))
    save_model_checkpoint(tmp_path / "run", CheckpointRecord(CFG, params, meta=RunMeta(step=1)))
    with pytest.raises(CheckpointError, match="already holds checkpoints"):
        save_model_checkpoint(tmp_path / "run", CheckpointRecord(CFG, params))
    with pytest.raises(CheckpointError, match="no such file"):
        load_model_checkpoint(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="holds no complete checkpoint"):
        load_model_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="holds weights only"):
        load_model_checkpoint(tmp_path / "run", with_optimizer=True)
    other = ModelConfig(vocab_size=41, n_layer=1, n_head=2, n_embd=8, context_size=16)
    with pytest.raises(CheckpointError, match="do not match"):
        save_model_checkpoint(tmp_path / "run2", CheckpointRecord(other, params))
    assert not (tmp_path / "run2").exists()


def test_load_any_checkpoint_reads_a_torch_file(tmp_path):
    import torch

    from converters import TorchGPT, save_torch_checkpoint, state_dict_to_params

    cfg = ModelConfig(vocab_size=40, n_layer=1, n_head=2, n_embd=8, context_size=16)
    torch.manual_seed(0)
    params = state_dict_to_params(cfg, TorchGPT(cfg).state_dict())
    save_torch_checkpoint(tmp_path / "m.pt", CheckpointRecord(cfg, params, meta=RunMeta(step=9)))
    record = load_any_checkpoint(tmp_path / "m.pt")
    assert record.model_config == cfg and record.step == 9 and _same(record.params, params)


# ------------------------------------------------------------------------------ training
def trained_state():
    tx = make_optimizer(OPT)
    state = init_train_state(init_params(TRAIN_CFG, jax.random.PRNGKey(0)), tx, 3,
                             Precision("float16"))
    grads = jax.tree_util.tree_map(jnp.ones_like, state["params"])
    for _ in range(3):  # mid-accumulation: MultiSteps holds a partial gradient sum
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        state = {**state, "params": optax.apply_updates(state["params"], updates),
                 "opt_state": opt_state, "micro_step": state["micro_step"] + 1}
    return replicate(state, make_mesh())


def record(step, val):
    return CheckpointRecord(TRAIN_CFG, {}, {"name": "x", "parameters": {}},
                            RunMeta(step=step, total_tokens=10 * step, val_loss=val,
                                    config=RUN_CONFIG))


def test_round_trip_of_state_meta_and_data(tmp_path):
    state = trained_state()
    checkpointer = TrainCheckpointer(tmp_path, keep_last=2)
    checkpointer.save(5, state, record(5, 3.0), {"position": 17, "nested": [1, 2]}, val_loss=3.0)
    checkpointer.wait()
    fresh = replicate(init_train_state(init_params(TRAIN_CFG, jax.random.PRNGKey(9)),
                                       make_optimizer(OPT), 0, Precision("float16")), make_mesh())
    restored, m, data = checkpointer.restore(checkpointer.latest_step(), fresh)
    checkpointer.close()
    assert data == {"position": 17, "nested": [1, 2]}
    assert RunMeta.from_json(m["metadata"]).total_tokens == 50
    assert type(restored["opt_state"]) is type(state["opt_state"])  # a real optax state again
    assert _same(restored, state)


def test_keeps_last_n_and_the_best_and_never_a_nan_best(tmp_path):
    state = trained_state()
    checkpointer = TrainCheckpointer(tmp_path, keep_last=2)
    for step, val in [(1, 5.0), (2, 4.0), (3, 4.5), (4, float("nan")), (5, 4.2)]:
        checkpointer.save(step, state, record(step, val), {}, val_loss=val)
    checkpointer.wait()
    assert checkpointer.latest_step() == 5 and checkpointer.best_step() == 2
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [2, 4, 5]
    checkpointer.close()
    reopened = TrainCheckpointer(tmp_path, keep_last=2)
    assert reopened.best_step() == 2 and reopened.latest_step() == 5
    reopened.close()
    # the model-checkpoint loader reads training checkpoints (params + meta only) ...
    loaded = load_model_checkpoint(tmp_path)
    assert loaded.step == 5 and loaded.model_config == TRAIN_CFG
    np.testing.assert_array_equal(loaded.params["wte"], np.asarray(state["params"]["wte"]))
    # ... and, rebuilding the run's optimizer from its config, their AdamW state
    with_adam = load_model_checkpoint(tmp_path / "checkpoints" / "2", with_optimizer=True)
    adam, _ = adam_state(state["opt_state"])
    assert with_adam.optimizer.count == int(adam.count) == 1
    assert _same(with_adam.optimizer.mu, adam.mu) and _same(with_adam.optimizer.nu, adam.nu)
    adamw = with_adam.optimizer
    assert (adamw.b1, adamw.b2) == (OPT.optimizer.beta1, OPT.optimizer.beta2)


def test_opening_a_run_writes_nothing_until_the_first_save(tmp_path):
    # A start killed before its first save left an empty checkpoints/ that tools took for "a run
    # without checkpoints"; the directory now appears with the first step, and an empty one
    # (an older version's) is no checkpoint.
    from piano_gpt_jax.checkpoints import holds_checkpoints

    ckpt = TrainCheckpointer(tmp_path / "run", keep_last=2)
    assert ckpt.latest_step() is None and not (tmp_path / "run" / "checkpoints").exists()
    ckpt.close()
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    assert not holds_checkpoints(tmp_path / "run")
