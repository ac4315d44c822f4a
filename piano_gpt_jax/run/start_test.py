"""A checkpoint is refused before training when it cannot serve this config: each refusal names
the mismatch and the key that fixes it."""

import dataclasses
import types

import pytest

from piano_gpt_jax.config import build_train_config
from piano_gpt_jax.model import ModelConfig
from piano_gpt_jax.run.errors import UsageError
from piano_gpt_jax.run.start import architecture, check_compatible

CFG = build_train_config({"model": {"n_layer": 2, "n_head": 2, "n_embd": 32, "context_size": 64},
                          "data": {"context_size": 64}})
MODEL = ModelConfig(vocab_size=300, n_layer=2, n_head=2, n_embd=32, context_size=64)


def tokenizer(vocab_size: int):
    return types.SimpleNamespace(vocab_size=vocab_size)


def test_a_fitting_checkpoint_passes():
    check_compatible(MODEL, tokenizer(300), CFG, "run/checkpoints/4")


@pytest.mark.parametrize(("model", "vocab", "words"), [
    (MODEL, 320, ["300 token embeddings", "needs 320", "scratch_next_token"]),
    (dataclasses.replace(MODEL, context_size=32), 300,
     ["data.context_size (64) exceeds", "context_size (32)"]),
    (dataclasses.replace(MODEL, use_time_embedding=True), 300,
     ["has a music-time embedding", "--config.model.use_time_embedding=True"]),
])
def test_a_checkpoint_that_cannot_serve_the_config_is_refused(model, vocab, words):
    with pytest.raises(UsageError) as refused:
        check_compatible(model, tokenizer(vocab), CFG, "best.pt")
    message = str(refused.value)
    assert message.startswith("best.pt: ")
    for word in words:
        assert word in message, message


def test_architecture_ignores_what_may_change_between_runs():
    """dropout, dtype and the attention path may change on resume; shapes may not."""
    changed = dataclasses.replace(MODEL, dropout=0.1, dtype="bfloat16", attention="einsum")
    assert architecture(changed) == architecture(MODEL)
    assert architecture(dataclasses.replace(MODEL, n_layer=3)) != architecture(MODEL)


def test_a_warmup_longer_than_the_run_is_warned_about():
    from piano_gpt_jax.config import build_train_config
    from piano_gpt_jax.run.start import schedule_notes

    short = build_train_config({"optimizer": {"max_iters": 3}, "lr": {"warmup_iters": 40,
                                                                      "learning_rate": 1e-3}})
    (note,) = schedule_notes(short)
    assert "never reaches lr.learning_rate=0.001" in note
    assert "ends at 7.5e-05" in note  # 3/40 of it
    assert schedule_notes(build_train_config({"optimizer": {"max_iters": 40},
                                              "lr": {"warmup_iters": 40}})) == []
    assert schedule_notes(build_train_config({"optimizer": {"max_iters": 3},
                                              "lr": {"warmup_iters": 40,
                                                     "decay_lr": False}})) == []
