"""The external oracle: a checkpoint written by piano-gpt's own code and the logits its model
computed (../shared/reference/upstream-checkpoint/). Every other model comparison in this suite is
against our PyTorch twin; this one is against numbers this repository did not produce, so a bug
shared by the Flax model and the twin (a constant, a mask, a layout) shows up here.

The file's real AdamW state is continued in JAX and in PyTorch in
tests/test_optimizer_crossing.py (test_upstream_checkpoint_continues_in_jax_as_in_pytorch).
"""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest
import torch

from converters import load_torch_checkpoint
from converters.torch_model import TorchGPT
from piano_gpt_jax.checkpoints.state_dict import expected_state_dict_shapes, strip_compile_prefix
from piano_gpt_jax.checkpoints.torch_format import torch_load_restricted
from piano_gpt_jax.model import ModelConfig, forward

LOGIT_TOLERANCE = 1e-4  # the upstream README's bound for float32 logits


@pytest.fixture(scope="module")
def upstream(upstream_checkpoint):
    record = load_torch_checkpoint(upstream_checkpoint["pt"])
    io = dict(np.load(upstream_checkpoint["io"]))
    return record, io


def test_loader_reads_the_architecture_the_upstream_readme_states(upstream):
    record, io = upstream
    # "2 layers, 4 heads, 64 wide, context 128, bias on, no time embedding", 2265 tokens.
    assert record.model_config == ModelConfig(vocab_size=2265, n_layer=2, n_head=4, n_embd=64,
                                          context_size=128, bias=True, use_time_embedding=False)
    assert len(record.tokenizer_desc["parameters"]["lexicon"]["vocab"]) == 2265
    assert io["idx"].shape == io["targets"].shape == (3, 100)
    assert io["logits"].shape == (3, 100, len(io["logit_columns"])) == (3, 100, 256)


def test_flax_forward_reproduces_upstream_logits_and_loss(upstream):
    record, io = upstream
    logits = np.asarray(jax.jit(forward, static_argnums=0)(record.model_config, record.params,
                                                             io["idx"].astype(np.int32)))
    theirs = io["logits"]
    assert theirs.std() > 0.1  # logits spread well beyond the tolerance: the bound means something
    np.testing.assert_allclose(logits[..., io["logit_columns"]], theirs, rtol=0,
                               atol=LOGIT_TOLERANCE)
    # The loss over all 300 targets needs every column of the vocabulary, not only the 256 given.
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, io["targets"]).mean()
    assert float(loss) == pytest.approx(float(io["loss"]), abs=LOGIT_TOLERANCE)


def test_pytorch_twin_reproduces_upstream_logits(upstream, upstream_checkpoint):
    """The twin is the reference of the other equivalence tests; here it is checked itself."""
    record, io = upstream
    state = strip_compile_prefix(torch_load_restricted(upstream_checkpoint["pt"])["model"])
    model = TorchGPT(record.model_config).eval()
    model.load_state_dict(state, strict=True)
    with torch.no_grad():
        logits = model(torch.as_tensor(io["idx"])).numpy()
    np.testing.assert_allclose(logits[..., io["logit_columns"]], io["logits"], rtol=0,
                               atol=LOGIT_TOLERANCE)


def test_state_dict_names_and_shapes_are_upstreams(upstream, upstream_checkpoint):
    record, _ = upstream
    raw = torch_load_restricted(upstream_checkpoint["pt"])["model"]
    assert all(k.startswith("_orig_mod.") for k in raw)  # saved from a torch.compile'd module
    theirs = {k: tuple(v.shape) for k, v in strip_compile_prefix(raw).items()}
    assert expected_state_dict_shapes(record.model_config) == theirs
    assert theirs["lm_head.weight"] == theirs["transformer.wte.weight"] == (2265, 64)
