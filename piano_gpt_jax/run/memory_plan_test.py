"""The memory plan: an exact parameter count, an estimate close to XLA's own, and a refusal that
names what fits — raised by the trainer before anything is built or written."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import pytest

from piano_gpt_jax import memory_limits
from piano_gpt_jax.config import build_train_config
from piano_gpt_jax.jitted_steps import init_train_state, make_train_step
from piano_gpt_jax.model import ModelConfig, init_params
from piano_gpt_jax.optim import make_optimizer
from piano_gpt_jax.precision import Precision
from piano_gpt_jax.run import memory_plan
from piano_gpt_jax.run.errors import UsageError

MODEL = ModelConfig(vocab_size=2265, n_layer=2, n_head=4, n_embd=64, context_size=128)
GIB = 2**30


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("time_embedding", [False, True])
def test_the_parameter_count_is_init_params_size(bias, time_embedding):
    m = dataclasses.replace(MODEL, bias=bias, use_time_embedding=time_embedding, n_layer=3)
    shapes = jax.eval_shape(lambda: init_params(m, jax.random.PRNGKey(0)))
    assert memory_plan.param_count(m) == sum(x.size for x in jax.tree_util.tree_leaves(shapes))


def test_the_estimate_is_near_what_xla_allocates_for_the_step():
    # XLA:CPU's buffer assignment of the compiled step (arguments, outputs, temporaries).
    batch, context = 8, 128
    tx, precision = make_optimizer(build_train_config({}).optim), Precision()
    state = jax.eval_shape(lambda: init_train_state(
        init_params(MODEL, jax.random.PRNGKey(0)), tx, 0, precision))
    spec = lambda dtype: jax.ShapeDtypeStruct((batch, context), dtype)
    step = jax.jit(make_train_step(MODEL, tx, precision)).lower(
        state, {"tokens": spec(jnp.int32), "targets": spec(jnp.int32),
                "loss_mask": spec(jnp.float32)}).compile()
    used = step.memory_analysis()
    xla = used.argument_size_in_bytes + used.output_size_in_bytes + used.temp_size_in_bytes
    parts = memory_plan.step_bytes(memory_plan.shape_of(MODEL, batch, context,
                                                        {"data": 1, "fsdp": 1}))
    assert 0.6 < sum(parts.values()) / xla < 1.4, (parts, xla)
    # The state XLA takes in (params, AdamW mu and nu, MultiSteps' accumulator: 16 B per
    # parameter, plus the batch and a few scalars) is the plan's state less the gradients.
    state_in = used.argument_size_in_bytes - 3 * batch * context * 4
    assert parts["weights and optimizer state"] * 16 / 20 == pytest.approx(state_in, rel=0.01)


def test_a_step_that_cannot_fit_is_refused_with_the_largest_setting_that_fits():
    shape = memory_plan.shape_of(MODEL, 16, 128, {"data": 2, "fsdp": 1})
    budget = memory_limits.Budget(GIB, "a test budget")
    assert memory_plan.refusal(shape, budget) is None
    huge = dataclasses.replace(shape, batch_size=10**8)
    line = memory_plan.refusal(huge, budget)
    assert "per device" in line and "but a test budget leaves 1.0 GiB" in line
    batch = int(line.split("data.batch_size=")[1].split(",")[0].rstrip("."))
    room = GIB * memory_plan.SUGGEST_SHARE
    assert batch % 2 == 0  # splits over the two devices
    assert sum(memory_plan.step_bytes(dataclasses.replace(shape, batch_size=batch)).values()) \
        <= room < sum(memory_plan.step_bytes(dataclasses.replace(
            shape, batch_size=batch + 2)).values())
    deep = dataclasses.replace(shape, model=dataclasses.replace(MODEL, n_layer=100_000))
    assert "model.n_layer=" in memory_plan.refusal(deep, budget)


@pytest.mark.parametrize("override", [
    {"data.batch_size": 100_000_000},
    {"model.n_layer": 100_000},
    {"model.context_size": 1_000_000_000, "data.context_size": 1_000_000_000},
])
def test_the_trainer_refuses_before_building_anything(tmp_path, override):
    from piano_gpt_jax.config import set_dotted
    from piano_gpt_jax.run.loop import train

    cfg = set_dotted({"out_dir": str(tmp_path / "run"),
                      "model": {"n_layer": 2, "n_head": 2, "n_embd": 32, "context_size": 64},
                      "data": {"batch_size": 4, "context_size": 64},
                      "dataset": {"base_dataset_name": str(tmp_path / "no-data-needed")}},
                     override)
    with pytest.raises(UsageError, match=r"this run needs about .* leaves .* Lower it to"):
        train(build_train_config(cfg))
    assert not (tmp_path / "run").exists()  # nothing written
