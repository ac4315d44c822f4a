"""Blind A/B listening: which of two checkpoints a listener prefers, as a number with its
uncertainty.

A pair is one sample from each checkpoint on the same prompt, task and settings, played in an
order drawn at random and shown without names. Each judgement ("first", "second" or "same") is
appended as one JSON line to OUT/ab/judgements.jsonl, naming both checkpoints and the order they
were played in, so a tally can be recomputed from the file at any time. The tally per checkpoint
pair counts wins and ties and gives the share of decisive judgements won by the first checkpoint
(sorted by name) with a 95% Wilson score interval — honest at the small counts listening yields
(the normal approximation gives intervals outside [0, 1] there).
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from pathlib import Path

from piano_gpt_jax.run_log import append_jsonl

CHOICES = ("first", "second", "same")
JUDGEMENTS = Path("ab") / "judgements.jsonl"
Z_95 = 1.959963984540054


@dataclasses.dataclass(frozen=True)
class Pair:
    """Two checkpoints' samples in the order they are played (`order[0]` is heard first)."""

    order: tuple[str, str]  # checkpoint paths, as played
    seed: int

    @classmethod
    def draw(cls, a: str, b: str, seed: int, rng: random.Random | None = None) -> Pair:
        first_is_a = (rng or random.SystemRandom()).random() < 0.5
        return cls((a, b) if first_is_a else (b, a), seed)


def record(out_dir: Path, pair: Pair, choice: str, settings: dict | None = None) -> Path:
    """Append one judgement; returns the file."""
    if choice not in CHOICES:
        raise ValueError(f"choice must be one of {CHOICES}, got {choice!r}")
    winner = {"first": pair.order[0], "second": pair.order[1], "same": None}[choice]
    path = Path(out_dir) / JUDGEMENTS
    append_jsonl(path, [{"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "played": list(pair.order),
                         "choice": choice, "winner": winner, "seed": pair.seed,
                         "settings": settings or {}}])
    return path


def read(out_dir: Path) -> list[dict]:
    """Every well-formed judgement in the file (a torn last line is skipped)."""
    path = Path(out_dir) / JUDGEMENTS
    if not path.is_file():
        return []
    rows = []
    for text in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(text)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and row.get("choice") in CHOICES and len(row.get("played",
                                                                                  ())) == 2:
            rows.append(row)
    return rows


@dataclasses.dataclass(frozen=True)
class Tally:
    a: str  # the pair's checkpoints, sorted by name
    b: str
    a_wins: int
    b_wins: int
    same: int

    @property
    def judgements(self) -> int:
        return self.a_wins + self.b_wins + self.same

    @property
    def a_share(self) -> float:
        """Share of decisive judgements that preferred `a` (NaN before any)."""
        decisive = self.a_wins + self.b_wins
        return self.a_wins / decisive if decisive else math.nan

    @property
    def interval(self) -> tuple[float, float]:
        return wilson(self.a_wins, self.a_wins + self.b_wins)


def tally(rows: list[dict]) -> list[Tally]:
    counts: dict[tuple[str, str], list[int]] = {}
    for row in rows:
        a, b = sorted(row["played"])
        c = counts.setdefault((a, b), [0, 0, 0])
        if row["winner"] is None:
            c[2] += 1
        else:
            c[0 if row["winner"] == a else 1] += 1
    return [Tally(a, b, *c) for (a, b), c in sorted(counts.items())]


def wilson(wins: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval of a binomial share (NaNs for n = 0)."""
    if n == 0:
        return math.nan, math.nan
    p = wins / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)
