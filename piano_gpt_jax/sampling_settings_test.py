"""The sampling settings are stated once: every tool's flags and defaults come from them."""

from __future__ import annotations

import dataclasses

import pytest

from piano_gpt_jax import evaluate, generate, sampling_settings
from piano_gpt_jax.sampling_settings import SamplingSettings


def test_generate_and_evaluate_offer_every_setting_with_its_one_default():
    gen_args = generate.build_parser().parse_args(["--checkpoint", "c", "--out", "o",
                                                   "--prompt-dataset", "validation:0"])
    assert sampling_settings.from_arguments(gen_args) == SamplingSettings()
    assert SamplingSettings().max_new_tokens == 512  # the CLI's default since the start
    eval_args = evaluate._parse(["--checkpoint", "c"])
    assert sampling_settings.from_arguments(eval_args) == SamplingSettings()
    assert not hasattr(eval_args, "max_new_tokens")  # each prompt's budget follows its target
    named = generate.build_parser().parse_args(
        ["--checkpoint", "c", "--out", "o", "--prompt-midi", "m.mid", "--temperature", "0.5",
         "--top-k", "7", "--top-p", "0.9", "--min-p", "0.05", "--seed", "3",
         "--max-new-tokens", "64"])
    assert sampling_settings.from_arguments(named) == SamplingSettings(
        temperature=0.5, top_k=7, top_p=0.9, min_p=0.05, seed=3, max_new_tokens=64)


def test_the_draw_values_are_the_settings_marked_with_a_dtype():
    settings = SamplingSettings(temperature=0.7, top_k=5, top_p=0.9, min_p=0.1)
    assert settings.draw_values() == {"temperature": 0.7, "top_k": 5, "top_p": 0.9,
                                      "min_p": 0.1}
    assert sampling_settings.draw_dtypes() == {"temperature": "float32", "top_k": "int32",
                                               "top_p": "float32", "min_p": "float32"}
    user = [f.name for f in sampling_settings.user_settings()]
    assert user == ["temperature", "top_k", "top_p", "min_p", "seed", "max_new_tokens"]
    assert all(f.metadata["help"] for f in sampling_settings.user_settings())


@pytest.mark.parametrize(("changes", "message"), [
    ({"temperature": -0.1}, r"temperature must be >= 0 \(0 = greedy\), got -0.1"),
    ({"temperature": float("nan")}, "temperature must be a finite number, got nan"),
    ({"top_k": -1}, r"top_k must be >= 0 \(0 = off\), got -1"),
    ({"top_p": 0.0}, r"top_p must be in \(0, 1\] \(1 = off\), got 0.0"),
    ({"top_p": 1.5}, r"top_p must be in \(0, 1\] \(1 = off\), got 1.5"),
    ({"min_p": 1.0}, r"min_p must be in \[0, 1\) \(0 = off\), got 1.0"),
    ({"max_new_tokens": 0}, "max_new_tokens must be >= 1, got 0"),
])
def test_each_setting_checks_its_own_rule(changes, message):
    with pytest.raises(ValueError, match=f"^{message}$"):
        SamplingSettings(**changes)
    assert dataclasses.replace(SamplingSettings(), seed=-1).seed == -1  # seeds are unchecked
