"""The tiny preset is what README.md and configs/piano.py promise: a 1M-parameter model (4 layers
x 128, 4 heads) on 256-token PIANO-task records, batch 16, 600 steps at lr 1e-3 (warmup 40,
cosine to 1e-4 over the whole run), evaluated every 200 steps, float32 on the CPU, on the built-in
dataset; untrained, its validation loss is 7.74 (ln 2265 = 7.73: a nearly uniform guess). The
training run itself (about four minutes, 7.74 -> 2.18) is too long for the suite."""

from __future__ import annotations

import math

import jax
import pytest

from configs.piano import get_config
from piano_gpt_jax.config import build_train_config
from piano_gpt_jax.data.pipeline import build_tokenizer, make_pipeline
from piano_gpt_jax.data.settings import DataSettings
from piano_gpt_jax.jitted_steps import token_loss
from piano_gpt_jax.model import ModelConfig, count_params, init_params


def test_tiny_preset_numbers(maestro_dataset):
    tc = build_train_config(get_config("tiny"))
    m, o, lr = tc.model, tc.optimizer, tc.lr
    assert (m.n_layer, m.n_head, m.n_embd, m.context_size) == (4, 4, 128, 256)
    assert (tc.data.batch_size, tc.data.context_size) == (16, 256)
    assert tc.data.notes_per_record == 48 and tc.stage == "piano_task"
    assert tc.dataset.base_dataset_name == "builtin"
    assert (o.max_iters, o.gradient_accumulation_steps) == (600, 1)
    assert (lr.learning_rate, lr.min_lr, lr.warmup_iters, lr.lr_decay_iters) == (1e-3, 1e-4, 40,
                                                                                600)
    assert (tc.eval_interval, tc.system.dtype, tc.platform) == (200, "float32", "cpu")

    # The same records from the real MAESTRO import instead of the built-in dataset (whose
    # first build takes ~30 s): the vocabulary, hence the model, is the same.
    settings = DataSettings.from_config(tc, base_dataset_name=str(maestro_dataset))
    tok = build_tokenizer(settings)
    assert tok.vocab_size == 2265
    model = ModelConfig(vocab_size=tok.vocab_size, n_layer=m.n_layer, n_head=m.n_head,
                        n_embd=m.n_embd, context_size=m.context_size)
    params = init_params(model, jax.random.PRNGKey(tc.seed))
    n = count_params(params, include_position=False)
    assert n == 4 * (12 * 128**2 + 2 * 128) + 2265 * 128 + 128 == 1_077_504  # "1M"
    batches = make_pipeline(settings, tok).eval_batches("full_val", 2)
    total = sum(float(token_loss(model, params, b)[0]) * float(b["loss_mask"].sum())
                for b in batches)
    loss = total / sum(float(b["loss_mask"].sum()) for b in batches)
    assert loss == pytest.approx(7.74, abs=0.03)  # the documented untrained loss (7.76 here)
    # a near-uniform guess: ln V plus a little for the spread of small random logits
    assert math.log(2265) < loss < math.log(2265) + 0.05
