"""The parameter layout rule: which dimension FSDP cuts, what stays replicated, and the bytes per
device it gives (computed for gpt2_medium on 8 devices, without the devices)."""

from __future__ import annotations

import jax
from jax.sharding import PartitionSpec as P

from piano_gpt_jax.config import build_train_config
from piano_gpt_jax.jitted_steps import init_train_state
from piano_gpt_jax.model import ModelConfig, init_params
from piano_gpt_jax.optim import make_optimizer
from piano_gpt_jax.precision import Precision
from piano_gpt_jax.sharding import leaf_spec, planned_bytes_per_device, unsharded_matrices


def test_largest_divisible_dimension_is_cut_and_vectors_stay_whole():
    assert leaf_spec((2265, 1024), 8) == P(None, "fsdp")  # 2265 is odd: the width is cut
    assert leaf_spec((1024, 4096), 8) == P(None, "fsdp")
    assert leaf_spec((4096, 1024), 8) == P("fsdp", None)
    assert leaf_spec((1024,), 8) == P()  # LayerNorm scales, biases: small, replicated
    assert leaf_spec((2265, 33), 8) == P()  # nothing divides: replicated (and reported)
    assert leaf_spec((2265, 1024), 1) == P()  # data parallel: everything replicated
    assert unsharded_matrices({"wte": jax.ShapeDtypeStruct((2265, 33), "float32"),
                               "ln": jax.ShapeDtypeStruct((33,), "float32")}, 8) == \
        ["['wte'] (2265, 33)"]


def test_gpt2_medium_on_8_devices_holds_an_eighth():
    cfg = ModelConfig(vocab_size=2265, n_layer=24, n_head=16, n_embd=1024, context_size=2048,
                      use_time_embedding=True)
    tx = make_optimizer(build_train_config({"optimizer": {"gradient_accumulation_steps": 2}}
                                           ).optim)
    state = jax.eval_shape(lambda: init_train_state(init_params(cfg, jax.random.key(0)), tx, 0,
                                                    Precision()))
    full = planned_bytes_per_device(state, 1)
    eighth = planned_bytes_per_device(state, 8)
    print(f"gpt2_medium params + AdamW + accumulated grads per device: {full / 2**30:.2f} GiB "
          f"replicated, {eighth / 2**30:.2f} GiB with 8-way FSDP")
    # 314.6M (+ wpe) parameters x 4 bytes x (params, mu, nu, accumulated gradient)
    assert abs(full / 2**30 - 4.72) < 0.01
    vectors = sum(int(x.size) * 4 for x in jax.tree_util.tree_leaves(state) if x.ndim < 2)
    assert eighth == (full - vectors) // 8 + vectors  # every matrix cut, only vectors whole
