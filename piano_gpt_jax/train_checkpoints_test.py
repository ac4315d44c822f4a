"""Training checkpoints round-trip the whole state and share the model-checkpoint layout."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from piano_gpt_jax.checkpoints import load_model_checkpoint
from piano_gpt_jax.config import OptimSettings
from piano_gpt_jax.model import ModelConfig, init_params
from piano_gpt_jax.optim import make_optimizer
from piano_gpt_jax.train_checkpoints import TrainCheckpointer, export_torch
from piano_gpt_jax.train_step import Precision, init_train_state, make_mesh, replicate

CFG = ModelConfig(vocab_size=40, n_layer=1, n_head=2, n_embd=16, context_size=16)
OPT = OptimSettings(2, 10, 0.1, 1.0, 0.9, 0.95, 1e-3, 1e-4, 2, True, 10)


def trained_state():
    tx = make_optimizer(OPT)
    state = init_train_state(init_params(CFG, jax.random.PRNGKey(0)), tx, 3, Precision("float16"))
    grads = jax.tree_util.tree_map(jnp.ones_like, state["params"])
    for _ in range(3):  # mid-accumulation: MultiSteps holds a partial gradient sum
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        state = {**state, "params": optax.apply_updates(state["params"], updates),
                 "opt_state": opt_state, "micro_step": state["micro_step"] + 1}
    return replicate(state, make_mesh())


def meta(step, val):
    return {"model_config": CFG.to_dict(), "tokenizer_desc": {"name": "x", "parameters": {}},
            "metadata": {"step": step, "total_tokens": 10 * step, "val_loss": val}}


def test_round_trip_of_state_meta_and_data(tmp_path):
    state = trained_state()
    ck = TrainCheckpointer(tmp_path, keep_last=2)
    ck.save(5, state, meta(5, 3.0), {"position": 17, "nested": [1, 2]}, is_best=True)
    ck.wait()
    fresh = replicate(init_train_state(init_params(CFG, jax.random.PRNGKey(9)),
                                       make_optimizer(OPT), 0, Precision("float16")), make_mesh())
    restored, m, data = ck.restore(ck.latest_step(), fresh)
    ck.close()
    assert data == {"position": 17, "nested": [1, 2]} and m["metadata"]["total_tokens"] == 50
    assert type(restored["opt_state"]) is type(state["opt_state"])  # a real optax state again
    assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(state)
    for a, b in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(state),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_keeps_last_n_and_the_best(tmp_path):
    state = trained_state()
    ck = TrainCheckpointer(tmp_path, keep_last=2)
    for step, val, best in [(1, 5.0, True), (2, 4.0, True), (3, 4.5, False), (4, 4.2, False)]:
        ck.save(step, state, meta(step, val), {}, is_best=best)
    ck.wait()
    assert ck.latest_step() == 4 and ck.best_step() == 2
    params, best_meta = ck.restore_best_params(state["params"])
    ck.close()
    assert best_meta["metadata"]["val_loss"] == 4.0
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [3, 4]
    # the model-checkpoint loader reads training checkpoints (params + meta only)
    loaded = load_model_checkpoint(tmp_path)
    assert loaded.step == 4 and loaded.model_config == CFG
    np.testing.assert_array_equal(loaded.params["wte"], np.asarray(state["params"]["wte"]))
    assert load_model_checkpoint(tmp_path / "best").step == 2


def test_export_torch_writes_a_loadable_pt(tmp_path):
    from converters import load_torch_checkpoint

    params = init_params(CFG, jax.random.PRNGKey(4))
    bf16 = ModelConfig(**{**CFG.to_dict(), "dtype": "bfloat16", "one_hot_embedding": True})
    path = export_torch(tmp_path / "final.pt", bf16, params, None, {"step": 3, "val_loss": 2.5})
    ck = load_torch_checkpoint(path)
    assert ck.model_config.n_embd == 16 and ck.metadata["val_loss"] == 2.5
    np.testing.assert_array_equal(ck.params["h_0"]["attn"]["c_attn"]["kernel"],
                                  np.asarray(params["h_0"]["attn"]["c_attn"]["kernel"]))
