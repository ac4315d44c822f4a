"""Blind A/B judgements: the file they go to, the tally and its interval."""

from __future__ import annotations

import json
import random

import pytest

from piano_gpt_jax.app import blind_ab


def test_the_wilson_interval_matches_its_worked_values():
    # 8 of 10: the textbook 95% Wilson interval (0.490, 0.943); the normal one would end at 1.05
    lo, hi = blind_ab.wilson(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)
    assert blind_ab.wilson(0, 5)[0] == 0.0 and blind_ab.wilson(5, 5)[1] == 1.0


def test_judgements_are_appended_and_tallied_per_pair(tmp_path):
    a, b = "runs/a", "runs/b"
    rng = random.Random(0)
    orders = set()
    for choice in ("first", "second", "same", "first"):
        pair = blind_ab.Pair.draw(a, b, seed=1, rng=rng)
        orders.add(pair.order)
        blind_ab.record(tmp_path, pair, choice, {"temperature": 1.0})
    assert orders == {(a, b), (b, a)}  # played in both orders
    lines = (tmp_path / "ab" / "judgements.jsonl").read_text().splitlines()
    assert len(lines) == 4 and json.loads(lines[2])["winner"] is None
    with open(tmp_path / "ab" / "judgements.jsonl", "a") as f:
        f.write('{"played": ["runs/a"')  # a torn last line is skipped
    (t,) = blind_ab.tally(blind_ab.read(tmp_path))
    rows = blind_ab.read(tmp_path)
    a_wins = sum(r["winner"] == a for r in rows)
    assert (t.a, t.b, t.a_wins + t.b_wins, t.same) == (a, b, 3, 1) and t.a_wins == a_wins
    assert t.a_share == pytest.approx(a_wins / 3)
    with pytest.raises(ValueError, match="choice must be one of"):
        blind_ab.record(tmp_path, pair, "both")
