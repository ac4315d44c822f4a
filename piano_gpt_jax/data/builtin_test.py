import collections
import json
import time

import numpy as np
import pytest

from piano_gpt_jax.data import builtin
from piano_gpt_jax.data.piano_dataset import SPLITS, piano_features
from piano_gpt_jax.data.sources import load_piano_dataset
from piano_gpt_jax.music.layouts import composer_key


def _corpus_path(rel):
    from music21 import corpus

    return str(corpus.getWork(rel))


def test_render_chorale_merges_ties_like_music21():
    from music21 import converter

    path = _corpus_path("bach/bwv101.7")
    piece, source_json = builtin.render_score(path, "bach")
    source = json.loads(source_json)
    assert source["composer"] == "Johann Sebastian Bach"
    assert source["dataset"] == "music21-corpus"
    assert source["tempo_qpm"] == builtin.DEFAULT_QPM  # the chorale has no metronome mark

    stripped = converter.parse(path).stripTies()
    expected = sorted(
        (float(n.getOffsetInHierarchy(stripped)), p.midi, float(n.quarterLength))
        for n in stripped.recurse().notes
        for p in n.pitches
    )
    assert len(piece["pitch"]) == len(expected)
    spq = 60.0 / builtin.DEFAULT_QPM
    got = sorted(zip(piece["start"] / spq, piece["pitch"], piece["duration"] / spq, strict=True))
    np.testing.assert_allclose(np.array(got), np.array(expected), atol=1e-9)
    assert 21 <= piece["pitch"].min() and piece["pitch"].max() <= 108
    assert len(set(piece["velocity"].tolist())) > 3  # deterministic variation around mf
    again, _ = builtin.render_score(path, "bach")
    assert again["velocity"].tolist() == piece["velocity"].tolist()


def test_render_quartet_uses_dynamics_and_tempo_mark():
    piece, source_json = builtin.render_score(_corpus_path("mozart/k156/movement1"), "mozart")
    source = json.loads(source_json)
    assert source["tempo_qpm"] == 144.0
    velocity = piece["velocity"]
    # f (88) and p (50) passages both occur, so velocities span well beyond the jitter.
    assert velocity.min() < 50 and velocity.max() > 88


def test_seconds_map_and_pitch_folding():
    to_sec = builtin._seconds_map([(0.0, 60.0), (4.0, 120.0)])
    np.testing.assert_allclose(to_sec(np.array([0.0, 2.0, 4.0, 6.0])), [0.0, 2.0, 4.0, 5.0])
    default = builtin._seconds_map([])
    np.testing.assert_allclose(default(np.array([3.0])), [3.0 * 60 / builtin.DEFAULT_QPM])
    folded = builtin._fold_pitches(np.array([9, 21, 108, 120, 127]))
    assert folded.tolist() == [21, 21, 108, 108, 103]


def test_split_pieces_gives_each_composer_validation_and_test():
    paths = {"bach": [f"bach/{i}" for i in range(40)], "mozart": ["m/1", "m/2", "m/3"],
             "chopin": ["c/1"]}  # fmt: skip
    split = builtin.split_pieces(paths)
    counts = collections.Counter((p.split("/")[0], s) for p, s in split.items())
    assert counts[("bach", "validation")] == 4 and counts[("bach", "test")] == 4
    assert counts[("m", "validation")] == 1 and counts[("m", "test")] == 1
    assert split["c/1"] == "train"
    assert split == builtin.split_pieces(paths)


@pytest.mark.slow
def test_first_build_into_fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PIANO_GPT_JAX_CACHE", str(tmp_path / "cache"))
    began = time.perf_counter()
    ds = load_piano_dataset("builtin")
    elapsed = time.perf_counter() - began
    assert elapsed < 240, f"built-in dataset build took {elapsed:.0f} s"  # ~40 s on idle 2 cores
    assert (tmp_path / "cache" / "builtin-v2" / "dataset_dict.json").is_file()
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["builtin-v2"]

    assert set(ds) == set(SPLITS)
    for split in SPLITS:
        assert ds[split].features == piano_features()
    keys = {
        split: collections.Counter(composer_key(s) for s in ds[split]["source"]) for split in SPLITS
    }
    assert keys["validation"]["bach"] >= 10 and keys["validation"]["mozart"] >= 1
    assert keys["train"]["beethoven"] >= 5 and keys["train"]["haydn"] >= 3
    notes = sum(len(r["pitch"]) for split in SPLITS for r in ds[split]["notes"])
    assert notes > 150_000
    sources = {json.loads(s)["corpus_path"] for split in SPLITS for s in ds[split]["source"]}
    assert len(sources) == sum(len(ds[s]) for s in SPLITS)  # each piece in one split only

    # Second use reads the cache instead of rebuilding.
    began = time.perf_counter()
    again = load_piano_dataset("builtin")
    assert time.perf_counter() - began < 5
    assert again["validation"]["source"] == ds["validation"]["source"]


def test_splits_do_not_depend_on_where_music21_is_installed():
    """builtin-v1 hashed absolute paths: a clone in another folder got other splits."""
    from piano_gpt_jax.data.builtin import split_pieces

    rel = [f"bach/bwv{i}.mxl" for i in range(40)] + [f"mozart/k{i}.mxl" for i in range(12)]

    def splits(prefix: str) -> dict[str, str]:
        by_composer: dict[str, list[str]] = {}
        for r in rel:
            by_composer.setdefault(r.split("/")[0], []).append(f"{prefix}/music21/corpus/{r}")
        return {p.split("/corpus/")[-1]: s for p, s in split_pieces(by_composer).items()}

    here, there = splits("/work/main/.venv/lib"), splits("/tmp/ci/main/.venv/lib")
    assert here == there and set(here.values()) == {"train", "validation", "test"}
