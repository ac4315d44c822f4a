"""evaluate's own arithmetic, by hand: cropping, the token budget, NaN and empty counts."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from piano_gpt_jax import evaluate, run_log


def notes(*rows):
    """rows of (pitch, velocity, start, end)."""
    return pd.DataFrame(rows, columns=["pitch", "velocity", "start", "end"])


def test_crop_keeps_notes_starting_before_the_targets_last_end():
    target = notes((60, 80, 0.0, 1.0), (62, 80, 0.5, 2.0))  # last end 2.0
    generated = notes((60, 80, 0.0, 3.0), (64, 80, 1.99, 2.5), (65, 80, 2.0, 2.1),
                      (67, 80, 4.0, 5.0))
    cropped = evaluate.crop_to_target(generated, target)
    assert cropped["pitch"].tolist() == [60, 64]  # 2.0 is not before 2.0; ends are not cut
    assert cropped["end"].tolist() == [3.0, 2.5] and cropped.index.tolist() == [0, 1]
    empty = pd.DataFrame(columns=["pitch", "velocity", "start", "end"])
    assert evaluate.crop_to_target(generated, empty) is generated  # nothing to crop against
    assert len(evaluate.crop_to_target(empty, target)) == 0


@pytest.mark.parametrize("lengths,context,expected", [
    ([10], 1024, 64),  # 1.5 * 10 + 32 = 47, raised to the floor of 64
    ([100, 20], 1024, 182),  # the longest target: 1.5 * 100 + 32
    ([1000], 512, 512),  # 1532 capped at one context
    ([], 1024, 64),  # no targets: the floor
])
def test_generation_budget(lengths, context, expected):
    assert evaluate.generation_budget(lengths, context) == expected


def test_summary_counts_nans_and_empty_generations():
    keys = ["a/correlation", "b/f1"]
    rows = [{"a/correlation": 0.5, "b/f1": 1.0, "empty_generation": 0.0},
            {"a/correlation": math.nan, "b/f1": 0.0, "empty_generation": 1.0},
            {"a/correlation": 0.1, "b/f1": 0.5, "empty_generation": 0.0}]
    out = evaluate._summarise(rows, keys)
    assert out["a/correlation"] == pytest.approx(0.3)  # NaN left out of the mean: (.5 + .1) / 2
    assert out["b/f1"] == pytest.approx(0.5)  # the empty generation's 0 counts
    assert out["n_examples"] == 3 and out["n_empty_generations"] == 1
    assert out["n_nan/a/correlation"] == 1 and "n_nan/b/f1" not in out
    all_nan = evaluate._summarise([rows[1]], keys)
    assert math.isnan(all_nan["a/correlation"]) and all_nan["n_nan/a/correlation"] == 1


def test_jsonl_writes_nan_as_null(tmp_path):
    path = tmp_path / "sub" / "metrics.jsonl"
    run_log.append_jsonl(path, [{"step": 1, "x": math.nan, "y": 0.25}])
    run_log.append_jsonl(path, [{"step": 2, "x": 1.0}])
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        {"step": 1, "x": None, "y": 0.25}, {"step": 2, "x": 1.0}]
