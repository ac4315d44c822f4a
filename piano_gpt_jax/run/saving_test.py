"""What a checkpoint carries into the next run, pinned fast (the end-to-end runs of tests/ catch
the same bugs, but only in the slow suite): the exported AdamW moments are ours, and a resumed
run's next batch is the uninterrupted run's."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from piano_gpt_jax.checkpoints import CheckpointRecord, RunMeta, TrainCheckpointer
from piano_gpt_jax.checkpoints import state_dict as sd_lib
from piano_gpt_jax.checkpoints.torch_format import optimizer_state_dict
from piano_gpt_jax.config import build_train_config
from piano_gpt_jax.data.pipeline import build_tokenizer, make_pipeline
from piano_gpt_jax.data.settings import DataSettings
from piano_gpt_jax.jitted_steps import init_train_state
from piano_gpt_jax.model import ModelConfig, init_params
from piano_gpt_jax.optim import make_optimizer
from piano_gpt_jax.precision import Precision
from piano_gpt_jax.run import saving
from piano_gpt_jax.run import start as start_lib

MODEL = ModelConfig(vocab_size=40, n_layer=1, n_head=2, n_embd=8, context_size=16, bias=True)


def test_the_exported_exp_avg_and_exp_avg_sq_are_our_first_and_second_moments(tmp_path):
    cfg = build_train_config({"optimizer": {"grad_clip": 0.0, "beta1": 0.8, "beta2": 0.9,
                                            "eps": 1e-7}})
    tx = make_optimizer(cfg.optim)
    params = init_params(MODEL, jax.random.PRNGKey(0))
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    grads = jax.tree_util.tree_unflatten(tree, [jax.random.normal(k, x.shape)
                                                for k, x in zip(keys, leaves, strict=True)])
    state = init_train_state(params, tx, 0, Precision())
    _, opt_state = tx.update(grads, state["opt_state"], params)
    state = {**state, "opt_state": opt_state}
    ckpt = TrainCheckpointer(tmp_path / "run", keep_last=1, async_save=False)
    ckpt.save(1, state, CheckpointRecord(MODEL, {}, None, RunMeta(step=1)), {"next": 0}, 1.0)
    record = saving._exportable(ckpt, 1, None, state, MODEL, cfg)
    ckpt.close()
    exported = optimizer_state_dict(MODEL, record.optimizer)
    entries = [e for group in sd_lib.adamw_groups(MODEL) for e in group]
    assert len(exported["state"]) == len(entries)
    for index, e in enumerate(entries):
        g = np.asarray(sd_lib.get_path(grads, e.flax_path), np.float32)
        s = exported["state"][index]
        assert s["step"].item() == 1.0
        # after one update: exp_avg = (1 - beta1) g, exp_avg_sq = (1 - beta2) g^2 (torch layout)
        np.testing.assert_allclose(s["exp_avg"].numpy(), sd_lib.to_torch_layout(e, 0.2 * g),
                                   rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(s["exp_avg_sq"].numpy(),
                                   sd_lib.to_torch_layout(e, 0.1 * g * g), rtol=1e-5, atol=1e-9)
    group = exported["param_groups"][0]  # the config's AdamW settings, not constants
    assert (group["betas"], group["eps"]) == ((0.8, 0.9), 1e-7)


def test_adams_eps_is_torchs_default():
    """eps 1e-8 (torch.optim.AdamW's default, kept by piano-gpt): with gradients of 1e-8 the
    first update is lr * g / (|g| + eps) = lr / 2; another eps moves it visibly."""
    cfg = build_train_config({"optimizer": {"grad_clip": 0.0}, "lr": {"decay_lr": False}})
    params = {"b": jnp.ones((3,))}  # a vector: no weight decay
    tx = make_optimizer(cfg.optim)
    updates, _ = tx.update({"b": jnp.full((3,), 1e-8)}, tx.init(params), params)
    np.testing.assert_allclose(optax.apply_updates(params, updates)["b"],
                               1 - cfg.lr.learning_rate / 2, rtol=1e-6)
    # optimizer.eps is a config key: eps 1e-2 shrinks the same update 10^6-fold
    wide = build_train_config({"optimizer": {"grad_clip": 0.0, "eps": 1e-2},
                               "lr": {"decay_lr": False}})
    tx = make_optimizer(wide.optim)
    updates, _ = tx.update({"b": jnp.full((3,), 1e-8)}, tx.init(params), params)
    np.testing.assert_allclose(updates["b"], -wide.lr.learning_rate * 1e-8 / (1e-8 + 1e-2),
                               rtol=1e-5)


def test_a_resumed_run_reads_the_batch_the_uninterrupted_run_reads_next(maestro_dataset,
                                                                         tmp_path):
    settings = DataSettings(base_dataset_name=str(maestro_dataset), batch_size=2,
                            context_size=64, notes_per_record=16, seed=7,
                            stage="next_token_pretraining", shard_index=0, shard_count=1)
    pipeline = make_pipeline(settings, build_tokenizer(settings))
    uninterrupted = start_lib.train_iterator(pipeline)
    for _ in range(3):
        next(uninterrupted)
    # the checkpoint stores the iterator's state through orbax's JSON item, as the loop does
    params = init_params(MODEL, jax.random.PRNGKey(0))
    tx = make_optimizer(build_train_config({}).optim)
    state = init_train_state(params, tx, 0, Precision())
    ckpt = TrainCheckpointer(tmp_path / "run", keep_last=1, async_save=False)
    ckpt.save(3, state, CheckpointRecord(MODEL, {}, None, RunMeta(step=3)),
              uninterrupted.get_state(), 1.0)
    want = [next(uninterrupted) for _ in range(2)]
    _, _, data_state = ckpt.restore(3, state)
    ckpt.close()
    resumed = start_lib.train_iterator(pipeline, data_state)
    for expected in want:
        got = next(resumed)
        assert set(got) == set(expected)
        for k in expected:
            np.testing.assert_array_equal(got[k], expected[k])
    first = next(start_lib.train_iterator(pipeline))  # not merely the first batch again
    assert not np.array_equal(first["tokens"], want[0]["tokens"])
