"""Cached sampler: token for token equal to greedy full-forward decoding; filters by hand."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from piano_gpt_jax import sampling
from piano_gpt_jax.model import ModelConfig, forward, init_params
from piano_gpt_jax.music.tokenizer import ExponentialTimeTokenizer

CTX = 32


@pytest.fixture(scope="module")
def tokenizer():
    tok = ExponentialTimeTokenizer.build(
        {"time_unit": 0.01, "max_time_step": 1.0, "n_velocity_bins": 32, "n_special_ids": 8})
    tok.add_special_tokens(["<GENAI>", "<EOGENAI>"])
    return tok


@pytest.fixture(scope="module")
def prompts(tokenizer, maestro_dir):
    from piano_gpt_jax.music.midi import read_midi

    df = read_midi(sorted(maestro_dir.glob("*.mid"))[1])
    genai = tokenizer.token_to_id["<GENAI>"]
    first = tokenizer.encode(df.iloc[:6].assign(start=df.start - df.start[0],
                                                end=df.end - df.start[0]))
    second = tokenizer.encode(df.iloc[6:14].assign(start=df.start - df.start[6],
                                                   end=df.end - df.start[6]))
    return [np.append(first[:19], genai), np.append(second[:26], genai)]


def _model(tokenizer, time_embedding: bool, seed: int):
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, n_layer=2, n_head=2, n_embd=32,
                      context_size=CTX, use_time_embedding=time_embedding)
    params = init_params(cfg, jax.random.PRNGKey(seed))
    # A fresh model mostly repeats its input (tied embeddings); sharper weights give varied
    # greedy paths, so that equality below means something.
    sharpen = lambda path, x: x * 5 if "kernel" in jax.tree_util.keystr(path) else x
    params = jax.tree_util.tree_map_with_path(sharpen, params)
    params["wpe"] = params["wpe"] * 5
    return cfg, params


def reference_greedy(cfg, params, tokenizer, prompt, n_new, keep, stop_id=-1):
    """The reference's way: a full forward pass per token over the visible window.

    The window is the history from `offset`; when it would exceed the context, it restarts with
    the newest `keep` tokens (keep == context_size is the reference's crop-to-last-context).
    Time steps come from the full history (tokenizer.time_steps).
    """
    fwd = jax.jit(forward, static_argnums=0)
    hist = list(int(t) for t in prompt)
    offset = max(0, len(hist) - cfg.context_size)
    new = []
    for _ in range(n_new):
        window = hist[offset:]
        steps = tokenizer.time_steps(hist)[offset:]
        pad = cfg.context_size - len(window)  # right padding is invisible to causal attention
        tok = jnp.asarray([window + [0] * pad], jnp.int32)
        st = jnp.asarray([list(steps) + [0] * pad], jnp.int32)
        logits = fwd(cfg, params, tok, st if cfg.use_time_embedding else None)
        nxt = int(jnp.argmax(logits[0, len(window) - 1]))
        new.append(nxt)
        hist.append(nxt)
        if nxt == stop_id:
            break
        if len(hist) - offset > cfg.context_size:
            offset = len(hist) - keep
    return np.array(new)


def test_greedy_cache_equals_full_forward_past_the_context(tokenizer, prompts):
    cfg, params = _model(tokenizer, time_embedding=False, seed=0)
    greedy = sampling.SamplingSettings(temperature=0.0, max_new_tokens=40, window_keep=CTX,
                                       stop_at_eos=False)
    out = sampling.sample(cfg, params, [prompts[0]], greedy)
    expected = reference_greedy(cfg, params, tokenizer, prompts[0], 40, keep=CTX)
    assert len(prompts[0]) + 40 > 2 * CTX - 10  # well past the context
    np.testing.assert_array_equal(out.new_tokens[0], expected)
    assert len(set(expected.tolist())) > 5


def test_batch_with_time_embedding_and_half_window(tokenizer, prompts):
    cfg, params = _model(tokenizer, time_embedding=True, seed=1)
    settings = sampling.SamplingSettings(temperature=0.0, max_new_tokens=45, stop_at_eos=False)
    tables = sampling.token_tables(tokenizer)
    out = sampling.sample(cfg, params, prompts, settings, tables)  # lengths 20 and 27
    for row, prompt in enumerate(prompts):
        expected = reference_greedy(cfg, params, tokenizer, prompt, 45, keep=CTX // 2)
        np.testing.assert_array_equal(out.new_tokens[row], expected)
    assert not out.stopped.any()

    # stop per row on a token row 0 emits early: that row ends there, the other goes on
    stop = int(out.new_tokens[0][2])
    stop_tables = dataclasses.replace(tables, stop_id=stop)
    first_hit = int(np.flatnonzero(out.new_tokens[0] == stop)[0])
    stopped = sampling.sample(cfg, params, prompts,
                              dataclasses.replace(settings, stop_at_eos=True), stop_tables)
    np.testing.assert_array_equal(stopped.new_tokens[0], out.new_tokens[0][:first_hit + 1])
    assert stopped.stopped[0]
    hits = np.flatnonzero(out.new_tokens[1] == stop)
    n1 = hits[0] + 1 if len(hits) else 45
    np.testing.assert_array_equal(stopped.new_tokens[1], out.new_tokens[1][:n1])


def test_prompt_time_steps_match_tokenizer(tokenizer, prompts):
    tables = sampling.token_tables(tokenizer)
    ids = np.concatenate([prompts[0], prompts[1][:10]])  # a <GENAI> restart in the middle
    steps, counter = sampling.prompt_time_steps(tables, ids)
    np.testing.assert_array_equal(steps, tokenizer.time_steps(ids))
    assert counter == max(1, int(tokenizer.time_steps(ids)[-1]))


def test_budget_and_no_recompile_for_new_settings(tokenizer, prompts):
    cfg, params = _model(tokenizer, time_embedding=False, seed=2)
    plain = sampling.SamplingSettings(temperature=1.0, max_new_tokens=9, seed=3, stop_at_eos=False)
    a = sampling.sample(cfg, params, [prompts[1]], plain)
    assert len(a.new_tokens[0]) == 9 and not a.stopped[0]  # exactly the budget, no stop token
    b = sampling.sample(cfg, params, [prompts[1]],
                        sampling.SamplingSettings(temperature=0.7, top_k=5, top_p=0.9,
                                                  min_p=0.05, max_new_tokens=7, seed=4))
    assert b.compile_seconds == 0.0  # same shapes: sampling values are runtime arguments
    assert len(b.new_tokens[0]) == 7
    c = sampling.sample(cfg, params, [prompts[1]], plain)
    np.testing.assert_array_equal(a.new_tokens[0], c.new_tokens[0])  # seeded


def test_filters_that_keep_one_token_sample_the_greedy_path(tokenizer, prompts):
    """At temperature 1, top_k=1, a tiny top_p and a min_p near 1 each leave only the most likely
    token: the draw is the greedy path, for every seed. Unfiltered sampling is not, so a filter
    the sampler ignored would fail here."""
    cfg, params = _model(tokenizer, time_embedding=False, seed=2)
    run = lambda **kw: sampling.sample(cfg, params, [prompts[1]], sampling.SamplingSettings(
        max_new_tokens=12, stop_at_eos=False, **kw)).new_tokens[0]
    greedy = run(temperature=0.0)
    assert len(set(greedy.tolist())) > 3  # a varied path, not one repeated token
    for seed in (0, 1):
        for kw in ({"top_k": 1}, {"top_p": 1e-6}, {"min_p": 0.999}):
            np.testing.assert_array_equal(run(temperature=1.0, seed=seed, **kw), greedy,
                                          err_msg=str(kw))
    assert any(not np.array_equal(run(temperature=1.0, seed=seed), greedy) for seed in (0, 1))


def _draw(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    return sampling.SamplingSettings(temperature=temperature, top_k=top_k, top_p=top_p,
                                     min_p=min_p).draw_values()


def test_filters_on_hand_made_logits():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    inf = -np.inf

    def kept(top_k=0, top_p=1.0, min_p=0.0):
        out = np.asarray(sampling.filter_logits(logits, dict(top_k=top_k, top_p=top_p,
                                                              min_p=min_p)))
        return np.isfinite(out[0]).tolist()

    assert kept() == [True, True, True, True]
    assert kept(top_k=2) == [True, True, False, False]
    assert kept(top_p=0.7) == [True, True, False, False]  # .5 < .7 so .3 joins; .8 >= .7
    assert kept(top_p=0.5) == [True, False, False, False]
    assert kept(top_p=0.81) == [True, True, True, False]
    assert kept(min_p=0.4) == [True, True, False, False]  # threshold .4 * .5 = .2
    assert kept(min_p=0.11) == [True, True, True, False]  # threshold .055 drops .05
    # top-k renormalises before top-p: (.5,.3,.15)/.95 -> .526, .842 -> third dropped at .8
    assert kept(top_k=3, top_p=0.8) == [True, True, False, False]
    np.testing.assert_allclose(np.asarray(sampling.filter_logits(logits, _draw(top_k=1)))[0, 1:],
                               [inf, inf, inf])


def test_sampling_frequencies_follow_the_filtered_softmax():
    probs = np.array([0.45, 0.3, 0.15, 0.1])
    logits = jnp.tile(jnp.log(jnp.asarray(probs)), (4000, 1))
    drawn = lambda seed, **kw: np.asarray(
        sampling.sample_logits(jax.random.PRNGKey(seed), logits, _draw(**kw)))
    draws = drawn(0, top_k=2)
    assert set(draws.tolist()) <= {0, 1}
    assert abs((draws == 0).mean() - 0.6) < 0.03  # .45 / .75, binomial sd ~ .008
    # top_p 0.7 keeps ids 0 and 1 (mass before id 1 is .45 < .7, before id 2 .75): never 2 or 3
    nucleus = drawn(2, top_p=0.7)
    assert set(nucleus.tolist()) == {0, 1}
    assert abs((nucleus == 0).mean() - 0.6) < 0.03
    # min_p 0.5: threshold .5 * .45 = .225 keeps ids 0 and 1; id 2 (.15) and id 3 (.1) never drawn
    floor = drawn(3, min_p=0.5)
    assert set(floor.tolist()) == {0, 1}
    # min_p 0.3: threshold .135 now keeps id 2 (.15) but still never id 3 (.1)
    floor = drawn(4, min_p=0.3)
    assert set(floor.tolist()) == {0, 1, 2}
    greedy = drawn(0, temperature=0.0)
    assert (greedy == 0).all()
    hot = drawn(1, temperature=2.0)
    # temperature 2 flattens: p ~ sqrt(p); frequency of id 3 = .316 / 1.87 ~ .17
    assert abs((hot == 3).mean() - np.sqrt(0.1) / np.sqrt(probs).sum()) < 0.03


def test_progress_reports_do_not_change_the_tokens(tokenizer, prompts, monkeypatch):
    """The app's progress bar decodes in chunks of PROGRESS_TOKENS positions; sampled (not
    greedy) tokens past the context stay exactly those of one uninterrupted call."""
    cfg, params = _model(tokenizer, time_embedding=True, seed=5)
    monkeypatch.setattr(sampling, "PROGRESS_TOKENS", 7)
    settings = sampling.SamplingSettings(temperature=1.0, max_new_tokens=50, seed=11,
                                         stop_at_eos=False)
    tables = sampling.token_tables(tokenizer)
    whole = sampling.sample(cfg, params, prompts, settings, tables)
    seen: list[int] = []
    chunked = sampling.sample(cfg, params, prompts, settings, tables,
                              progress=lambda done, total: seen.append(done))
    for a, b in zip(whole.new_tokens, chunked.new_tokens, strict=True):
        np.testing.assert_array_equal(a, b)
    assert len(seen) >= 5 and seen == sorted(seen) and seen[-1] <= 50  # max over the rows
