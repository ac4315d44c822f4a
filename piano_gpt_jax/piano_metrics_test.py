"""PIANO metrics against hand-computed values of the formulas in tokenizer-tasks-metrics.md s.3."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from piano_gpt_jax import piano_metrics as pm
from piano_gpt_jax.music import midi

H = math.sqrt(2 / 15)


def notes(*rows):
    """rows of (pitch, velocity, start, end)."""
    return pd.DataFrame(rows, columns=["pitch", "velocity", "start", "end"])


def test_distribution_scores_by_hand():
    s = pm.distribution_scores(np.array([1.0, 0, 0]), np.array([0.0, 1, 0]))
    # deviations (2/3,-1/3,-1/3) and (-1/3,2/3,-1/3): cov -3/9, var 6/9 each
    assert s["correlation"] == pytest.approx(-0.5)
    assert s["taxicab_distance"] == pytest.approx(2.0)
    # quirk: probabilities are the *values*; both sort to (0, 0, 1)
    assert s["wasserstein"] == pytest.approx(0.0)

    s = pm.distribution_scores(np.array([0.5, 0.5, 0, 0]), np.full(4, 0.25))
    assert math.isnan(s["correlation"])  # constant vector
    assert s["taxicab_distance"] == pytest.approx(1.0)
    assert s["wasserstein"] == pytest.approx(0.25)  # mean |(0,0,.5,.5) - .25|


def test_pitch_and_velocity_histograms_by_hand():
    df = notes((60, 127, 0.0, 1.0), (62, 127, 0.0, 2.0), (10, 127, 0.0, 1.0))
    p = pm.pitch_distribution(df)
    assert p.shape == (88,)
    expected = np.zeros(88)
    expected[60 - 21], expected[62 - 21] = 1 / 3, 2 / 3  # weights dur*vel/127 = 1, 2; pitch 10 out
    np.testing.assert_allclose(p, expected)
    unweighted = np.zeros(88)
    unweighted[39] = unweighted[41] = 0.5
    np.testing.assert_allclose(pm.pitch_distribution(df, use_weighted=False), unweighted)

    v = pm.velocity_distribution(notes((60, 80, 0.0, 1.0), (61, 40.7, 0.0, 3.0)))
    expected = np.zeros(128)
    expected[80], expected[40] = 0.25, 0.75  # duration weights 1 and 3, bin int(velocity)
    np.testing.assert_allclose(v, expected)


def test_dstart_and_duration_histograms_have_49_bins():
    df = notes((60, 80, 0.0, 0.1), (61, 80, 0.5, 6.5), (62, 80, 0.5, 5.5), (63, 80, 1.9, 6.9))
    d = pm.dstart_distribution(df)
    assert d.shape == (49,)
    expected = np.zeros(49)
    # gaps in row order 0.5, 0.0, 1.4 with bin width 2/49: bins 12, 0, 34
    expected[[12, 0, 34]] = 1 / 3
    np.testing.assert_allclose(d, expected)
    # unsorted rows give a negative gap, which is dropped
    np.testing.assert_allclose(pm.dstart_distribution(notes((60, 80, 1.0, 2), (60, 80, 0, 1))),
                               np.zeros(49))

    dur = pm.duration_distribution(df)
    assert dur.shape == (49,)
    expected = np.zeros(49)
    # durations 0.1 (bin 0), 6.0 (dropped), 5.0 (right edge: last bin), 5.0
    expected[0], expected[48] = 1 / 3, 2 / 3
    np.testing.assert_allclose(dur, expected)


def test_key_points_by_hand():
    # C major: 0.6*Maj(C) + 0.2*Maj(F) + 0.2*Maj(G), worked out on paper
    np.testing.assert_allclose(pm.KEY_POINTS[0], [0.54, 0.06, 2.74 * H], atol=1e-12)
    # A minor (id 21)
    np.testing.assert_allclose(pm.KEY_POINTS[21], [0.32, -0.32, 3.55 * H], atol=1e-12)
    # pitch class E sits at k = 4: (1, 0, 4h)
    np.testing.assert_allclose(pm.PITCH_CLASS_POINTS[4], [1, 0, 4 * H], atol=1e-12)


def _softmax_neg5_dist(center):
    d = np.sqrt(((pm.KEY_POINTS - np.asarray(center)) ** 2).sum(axis=1))
    e = np.exp(-5 * d)
    return e / e.sum()


def test_key_distribution_segments_start_at_zero():
    # One C from 1.0 to 1.2 s: segments of 0.2 s from t=0 -> five silent ones and one with C.
    dist, n_seg = pm.key_distribution(notes((60, 100, 1.0, 1.2)), segment_duration=0.2)
    assert n_seg == 6
    expected = (5 * _softmax_neg5_dist([0, 0, 0]) + _softmax_neg5_dist([1, 0, 0])) / 6
    np.testing.assert_allclose(dist, expected, rtol=1e-10)
    assert dist.sum() == pytest.approx(1.0)


def test_key_distribution_weights_by_overlap_and_velocity():
    # C (vel 127) over the whole segment and G (vel 127) for half of it: weights 1 : 0.5
    df = notes((60, 127, 0.0, 0.2), (67, 127, 0.1, 0.2))
    dist, _ = pm.key_distribution(df, segment_duration=0.2)
    center = (2 / 3) * np.array([1, 0, 0]) + (1 / 3) * np.array([0, 1, H])
    np.testing.assert_allclose(dist, _softmax_neg5_dist(center), rtol=1e-10)
    # a C major triad is heard as C major
    triad = notes((60, 90, 0, 1), (64, 90, 0, 1), (67, 90, 0, 1))
    assert pm.KEY_NAMES[int(np.argmax(pm.key_distribution(triad)[0]))] == "C major"


def test_f1_by_hand():
    target = notes((60, 80, 0.0, 1.0), (64, 80, 0.0, 1.0), (72, 80, 0.0, 1.0))
    generated = notes((60, 90, 0.0, 0.5), (67, 80, 0.0, 1.0))
    # segment [0, .5): target pcs {(0,80),(4,80)} (72 collapses onto 60), generated {(0,90),(7,80)}
    #   TP 1; precision 1/2; recall 1/3 (uncollapsed size); f1 0.4; weight 50
    # segment [.5, 1): generated only 67 -> TP 0; weight 50
    out = pm.f1_scores(target, generated, use_pitch_class=True)
    assert out["weighted_f1"] == pytest.approx(0.2)
    assert out["weighted_precision"] == pytest.approx(0.25)
    assert out["weighted_recall"] == pytest.approx(1 / 6)
    assert out["durations"] == [50, 50]
    # velocity 115 vs 80 is beyond the threshold of 30: no match at all
    louder = notes((60, 115, 0.0, 0.5), (67, 80, 0.0, 1.0))
    assert pm.f1_scores(target, louder)["weighted_f1"] == 0.0
    # the configured min_time_unit is ignored, as in the reference
    a = pm.F1Metric(use_pitch_class=True, min_time_unit=0.5).calculate(target, generated)
    assert a.metrics["weighted_f1"] == pytest.approx(0.2)


def test_f1_pitch_class_off_and_set_semantics():
    target = notes((60, 80, 0.0, 1.0), (72, 80, 0.0, 1.0))
    generated = notes((72, 80, 0.0, 1.0), (72, 80, 0.0, 1.0))  # duplicate pair counts once
    out = pm.f1_scores(target, generated, use_pitch_class=False)
    assert out["weighted_precision"] == pytest.approx(1.0)
    assert out["weighted_recall"] == pytest.approx(0.5)
    assert out["weighted_f1"] == pytest.approx(2 / 3)


def test_metrics_know_which_side_is_the_target():
    """calculate_flat(target, generated): precision is over the generated notes, recall over the
    target's. F1 itself is symmetric, so these two are what pin the argument order."""
    target = notes((60, 80, 0.0, 1.0), (64, 80, 0.0, 1.0))
    generated = notes((60, 80, 0.0, 1.0))
    m = pm.MetricsManager.load_default()
    flat = m.calculate_flat(target, generated)
    assert flat["confusion metrics/weighted_precision"] == 1.0  # the one generated note is right
    assert flat["confusion metrics/weighted_recall"] == 0.5  # it found one of two target notes
    assert flat["confusion metrics/weighted_f1"] == pytest.approx(2 / 3)
    swapped = m.calculate_flat(generated, target)
    assert swapped["confusion metrics/weighted_precision"] == 0.5
    assert swapped["confusion metrics/weighted_recall"] == 1.0
    # the histograms compare the target's to the generation's: 64 only in the target
    assert flat["pitch distribution/taxicab_distance"] == pytest.approx(1.0)


def test_empty_and_single_note_inputs():
    target = notes((60, 80, 0.0, 1.0), (62, 70, 0.5, 1.5))
    empty = pd.DataFrame()  # what decode returns for no notes
    m = pm.MetricsManager.load_default()
    flat = m.calculate_flat(target, empty)
    assert set(flat) == set(m.log_keys())
    assert flat["confusion metrics/weighted_f1"] == 0.0
    assert flat["confusion metrics/weighted_recall"] == 0.0
    assert math.isnan(flat["pitch distribution/correlation"])
    assert flat["pitch distribution/taxicab_distance"] == pytest.approx(1.0)
    both_empty = m.calculate_flat(empty, empty)
    assert both_empty["confusion metrics/weighted_f1"] == 0.0
    # a single note: no gaps -> all-zero dstart histogram -> NaN correlation
    single = notes((60, 80, 0.0, 1.0))
    s = m.calculate_flat(single, single)
    assert math.isnan(s["dstart distribution/correlation"])
    assert s["pitch distribution/correlation"] == pytest.approx(1.0)
    assert s["confusion metrics/weighted_f1"] == pytest.approx(1.0)


def test_identical_real_music_scores_perfectly(maestro_dir):
    path = sorted(maestro_dir.glob("*.mid"))[0]
    df = midi.read_midi(path)
    df = df[df.start < 20.0].reset_index(drop=True)
    m = pm.MetricsManager.load_default()
    assert m.list_metrics() == ["confusion metrics", "key distribution", "dstart distribution",
                                "duration distribution", "velocity distribution",
                                "pitch distribution"]
    flat = m.calculate_flat(df, df)
    for name in m.list_metrics()[1:]:
        assert flat[f"{name}/correlation"] == pytest.approx(1.0)
        assert flat[f"{name}/taxicab_distance"] == 0.0
        assert flat[f"{name}/wasserstein"] == 0.0
    # pitch classes collapse the matched sets while the denominators stay uncollapsed (a reference
    # quirk), so even identical music scores a little below 1; exact pitches score exactly 1
    assert 0.95 < flat["confusion metrics/weighted_f1"] < 1.0
    assert pm.f1_scores(df, df, use_pitch_class=False)["weighted_f1"] == pytest.approx(1.0)
    # a half-second shift hurts F1 but keeps the pitch histogram
    shifted = df.assign(start=df.start + 0.5, end=df.end + 0.5)
    moved = m.calculate_flat(df, shifted)
    assert moved["confusion metrics/weighted_f1"] < 0.9
    assert moved["pitch distribution/correlation"] == pytest.approx(1.0)


def test_f1_is_weighted_by_segment_duration():
    """Target: a 3 s note and a 1 s note starting together; generated: only the long one.
    Segment [0, 1] s has recall 1/2 and F1 2/3, segment [1, 3] s recall 1 and F1 1: weighted by
    duration, recall 5/6 and F1 8/9 (an unweighted mean would give 3/4 and 5/6)."""
    target = {"pitch": np.array([60, 64]), "velocity": np.array([80, 80]),
              "start": np.array([0.0, 0.0]), "end": np.array([3.0, 1.0])}
    generated = {k: v[:1] for k, v in target.items()}
    scores = pm.f1_scores(target, generated, use_pitch_class=False)
    assert scores["durations"] == [100, 200]
    assert scores["weighted_recall"] == pytest.approx(5 / 6)
    assert scores["weighted_f1"] == pytest.approx(8 / 9)
    assert scores["weighted_precision"] == pytest.approx(1.0)
