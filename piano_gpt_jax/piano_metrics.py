"""PIANO metrics: how close a generated set of notes is to the target notes of a PIANO task.

A re-implementation of the reference ecosystem's `piano_metrics` (piano-dataset `406e18c`), so
numbers logged by this trainer can be compared with runs of the PyTorch trainer. Its quirks are
reproduced on purpose (see tokenizer-tasks-metrics.md section 3):

* distribution `wasserstein` treats the bin *probabilities* as samples (scipy without weights);
* F1 always probes segments with a 0.01 s time unit, whatever `min_time_unit` the config stores;
* the dstart / duration histograms have `n_bins - 1` bins (edges `linspace(lo, hi, n_bins)`);
* key segments start at t = 0, and an empty segment still contributes the "silence" key profile;
* F1 matches *sets* of (pitch, velocity) pairs, so duplicate notes count once.

Where the reference crashes we return defined values instead (documented per function): an empty
note list gives an all-zero distribution, a constant distribution gives correlation NaN, and F1 of
two empty inputs is 0.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
from scipy.stats import wasserstein_distance

from piano_gpt_jax.music.pieces import Notes, as_notes, n_notes

F1_PROBE_TIME_UNIT = 0.01  # the reference never forwards F1Metric.min_time_unit; 0.01 is what runs
SCORE_KEYS = ("correlation", "taxicab_distance", "wasserstein")
F1_KEYS = ("weighted_f1", "weighted_recall", "weighted_precision")

# --------------------------------------------------------------------------------------------------
# Inputs


# --------------------------------------------------------------------------------------------------
# Shared distribution scores


def distribution_scores(target: np.ndarray, generated: np.ndarray) -> dict[str, float]:
    """Correlation, taxicab distance and (value-based) wasserstein of two equal-length vectors.

    Correlation is NaN when either vector is constant (e.g. all zero), as np.corrcoef gives,
    but without its RuntimeWarning.
    """
    t = np.asarray(target, np.float64)
    g = np.asarray(generated, np.float64)
    if t.shape != g.shape:
        raise ValueError(f"distributions differ in length: {t.shape} vs {g.shape}")
    if t.size == 0:
        return {k: math.nan for k in SCORE_KEYS}
    if np.all(t == t[0]) or np.all(g == g[0]):
        correlation = math.nan
    else:
        correlation = float(np.corrcoef(t, g)[0, 1])
    return {
        "correlation": correlation,
        "taxicab_distance": float(np.sum(np.abs(t - g))),
        # Quirk kept from the reference: probabilities used as sample values, not as weights.
        "wasserstein": float(wasserstein_distance(t, g)),
    }


def _normalize(v: np.ndarray) -> np.ndarray:
    total = v.sum()
    return v / total if total > 0 else np.zeros_like(v)


# --------------------------------------------------------------------------------------------------
# Histograms


def pitch_distribution(notes, use_weighted: bool = True) -> np.ndarray:
    """88 bins for MIDI 21..108; weight duration * velocity / 127 (or counts). Sums to 1 or is 0."""
    n = as_notes(notes)
    hist = np.zeros(88, np.float64)
    ok = (n["pitch"] >= 21) & (n["pitch"] <= 108)
    idx = (n["pitch"][ok] - 21).astype(np.int64)
    w = n["duration"][ok] * n["velocity"][ok] / 127.0 if use_weighted else np.ones(idx.shape[0])
    np.add.at(hist, idx, w)
    return _normalize(hist)


def velocity_distribution(notes, use_weighted: bool = True) -> np.ndarray:
    """128 bins indexed by int(velocity); weight duration (or counts). Sums to 1 or is 0."""
    n = as_notes(notes)
    hist = np.zeros(128, np.float64)
    idx = n["velocity"].astype(np.int64)
    ok = (idx >= 0) & (idx < 128)
    w = n["duration"][ok] if use_weighted else np.ones(int(ok.sum()))
    np.add.at(hist, idx[ok], w)
    return _normalize(hist)


def dstart_distribution(notes, n_bins: int = 50) -> np.ndarray:
    """Histogram of start-to-next-start gaps (row order) over [0, 2] s with n_bins - 1 bins."""
    n = as_notes(notes)
    counts, _ = np.histogram(np.diff(n["start"]), bins=np.linspace(0.0, 2.0, n_bins))
    return _normalize(counts.astype(np.float64))


def duration_distribution(notes, n_bins: int = 50) -> np.ndarray:
    """Histogram of note durations over [0, 5] s with n_bins - 1 bins (longer notes dropped)."""
    n = as_notes(notes)
    counts, _ = np.histogram(n["duration"], bins=np.linspace(0.0, 5.0, n_bins))
    return _normalize(counts.astype(np.float64))


# --------------------------------------------------------------------------------------------------
# Key distribution (Chew's spiral array)

KEY_NAMES = tuple(
    [f"{p} major" for p in ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")]
    + [f"{p} minor" for p in ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")]
)
_SPIRAL_HEIGHT = math.sqrt(2.0 / 15.0)


def _pitch_class_points() -> np.ndarray:
    """(12, 3) spiral positions indexed by pitch class; k is the circle-of-fifths index."""
    pc = np.arange(12)
    k = (pc * 7) % 12
    return np.stack([np.cos(k * np.pi / 2), np.sin(k * np.pi / 2), k * _SPIRAL_HEIGHT], axis=1)


def _key_points() -> np.ndarray:
    """(24, 3): C..B major then C..B minor key centres."""
    p = _pitch_class_points()
    r = np.arange(12)
    major = 0.6 * p[r] + 0.3 * p[(r + 4) % 12] + 0.1 * p[(r + 7) % 12]
    minor = 0.5 * p[r] + 0.3 * p[(r + 3) % 12] + 0.2 * p[(r + 7) % 12]
    major_keys = 0.6 * major[r] + 0.2 * major[(r + 5) % 12] + 0.2 * major[(r + 7) % 12]
    minor_keys = (0.5 * minor[r] + 0.25 * minor[(r + 5) % 12]
                  + 0.25 * (0.7 * major[(r + 7) % 12] + 0.3 * minor[(r + 7) % 12]))
    return np.concatenate([major_keys, minor_keys], axis=0)


PITCH_CLASS_POINTS = _pitch_class_points()
KEY_POINTS = _key_points()


def key_probabilities(center: np.ndarray) -> np.ndarray:
    """softmax(-5 * distance from a centre of effect to each of the 24 key points)."""
    d = np.linalg.norm(KEY_POINTS - np.asarray(center, np.float64)[None, :], axis=1)
    z = -5.0 * d
    e = np.exp(z - z.max())
    return e / e.sum()


def key_distribution(notes, segment_duration: float = 0.125,
                     use_weighted: bool = True) -> tuple[np.ndarray, int]:
    """(24-vector summing to 1, number of segments); all zeros and 0 segments for no notes."""
    n = as_notes(notes)
    if n_notes(n) == 0:
        return np.zeros(24, np.float64), 0
    total = np.zeros(24, np.float64)
    seg_starts = np.arange(0.0, float(n["end"].max()), segment_duration)
    pcs = n["pitch"].astype(np.int64) % 12
    for t in seg_starts:
        t_end = t + segment_duration
        inside = (n["start"] < t_end) & (n["end"] > t)
        if use_weighted:
            overlap = np.minimum(n["end"][inside], t_end) - np.maximum(n["start"][inside], t)
            w = overlap * n["velocity"][inside] / 127.0
        else:
            w = np.ones(int(inside.sum()))
        w_sum = w.sum()
        if w_sum > 0:
            center = (w[:, None] / w_sum * PITCH_CLASS_POINTS[pcs[inside]]).sum(axis=0)
        else:
            center = np.zeros(3)
        total += key_probabilities(center) * segment_duration
    return _normalize(total), len(seg_starts)


# --------------------------------------------------------------------------------------------------
# Note F1


def _active_set(n: Notes, probe: float) -> set:
    on = (n["start"] <= probe) & (probe <= n["end"])
    return {(int(p), v.item()) for p, v in zip(n["pitch"][on], n["velocity"][on], strict=True)}


def f1_scores(target, generated, use_pitch_class: bool = True,
              velocity_threshold: float = 30.0) -> dict[str, Any]:
    """Duration-weighted note F1 over the segments between all note boundaries of both inputs.

    Returns weighted_f1/recall/precision plus per-segment lists. Two empty inputs give zeros
    (the reference returns a tuple and crashes there).
    """
    t_notes, g_notes = as_notes(target), as_notes(generated)
    grid = np.unique(np.concatenate([t_notes["start"], t_notes["end"], g_notes["start"],
                                     g_notes["end"]]))
    seg = {"time_points": [], "precision": [], "recall": [], "f1": [], "durations": []}
    for t0, t1 in zip(grid[:-1], grid[1:], strict=True):
        probe = t0 + F1_PROBE_TIME_UNIT / 2
        t_set, g_set = _active_set(t_notes, probe), _active_set(g_notes, probe)
        if not t_set and not g_set:
            continue
        if use_pitch_class:
            t_match = {(p % 12, v) for p, v in t_set}
            g_match = {(p % 12, v) for p, v in g_set}
        else:
            t_match, g_match = t_set, g_set
        used: set = set()
        tp = 0
        for tp_pitch, tp_vel in t_match:
            for cand in g_match:
                if cand in used:
                    continue
                if cand[0] == tp_pitch and abs(cand[1] - tp_vel) <= velocity_threshold:
                    used.add(cand)
                    tp += 1
                    break
        precision = tp / len(g_set) if g_set else 0.0
        recall = tp / len(t_set) if t_set else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
        seg["time_points"].append(float(t0))
        seg["precision"].append(precision)
        seg["recall"].append(recall)
        seg["f1"].append(f1)
        seg["durations"].append(int(round((t1 - t0) / F1_PROBE_TIME_UNIT)))
    w = np.asarray(seg["durations"], np.float64)
    total = w.sum()

    def avg(name: str) -> float:
        return float(np.dot(seg[name], w) / total) if total > 0 else 0.0

    return {"weighted_f1": avg("f1"), "weighted_recall": avg("recall"),
            "weighted_precision": avg("precision"), **seg}


# --------------------------------------------------------------------------------------------------
# Metric objects and the default set


@dataclasses.dataclass
class MetricResult:
    name: str
    metrics: dict[str, float]
    metadata: dict[str, Any]
    metric_config: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class F1Metric:
    name: str = "f1"
    use_pitch_class: bool = False
    velocity_threshold: float = 30.0
    min_time_unit: float = 0.01  # stored for the log only: the reference never applies it

    def calculate(self, target, generated) -> MetricResult:
        out = f1_scores(target, generated, self.use_pitch_class, self.velocity_threshold)
        return MetricResult(self.name, {k: out[k] for k in F1_KEYS},
                            {k: v for k, v in out.items() if k not in F1_KEYS},
                            dataclasses.asdict(self))


@dataclasses.dataclass(frozen=True)
class KeyDistributionMetric:
    name: str = "key distribution"
    segment_duration: float = 0.125
    use_weighted: bool = True

    def calculate(self, target, generated) -> MetricResult:
        t, n_seg = key_distribution(target, self.segment_duration, self.use_weighted)
        g, _ = key_distribution(generated, self.segment_duration, self.use_weighted)
        top = lambda d: [KEY_NAMES[i] for i in np.argsort(-d, kind="stable")[:3]]
        meta = {"target_distribution": t, "generated_distribution": g, "num_segments": n_seg,
                "segment_duration": self.segment_duration, "key_names": list(KEY_NAMES),
                "target_top_keys": top(t), "generated_top_keys": top(g)}
        return MetricResult(self.name, distribution_scores(t, g), meta, dataclasses.asdict(self))


@dataclasses.dataclass(frozen=True)
class PitchDistributionMetric:
    name: str = "pitch distribution"
    use_weighted: bool = True

    def calculate(self, target, generated) -> MetricResult:
        t = pitch_distribution(target, self.use_weighted)
        g = pitch_distribution(generated, self.use_weighted)
        meta = {"target_distribution": t, "generated_distribution": g,
                "target_active_pitches": int((t > 0).sum()),
                "generated_active_pitches": int((g > 0).sum()), "pitch_range": (21, 108)}
        return MetricResult(self.name, distribution_scores(t, g), meta, dataclasses.asdict(self))


@dataclasses.dataclass(frozen=True)
class VelocityDistributionMetric:
    name: str = "velocity distribution"
    use_weighted: bool = True

    def calculate(self, target, generated) -> MetricResult:
        t = velocity_distribution(target, self.use_weighted)
        g = velocity_distribution(generated, self.use_weighted)
        meta = {"target_distribution": t, "generated_distribution": g}
        return MetricResult(self.name, distribution_scores(t, g), meta, dataclasses.asdict(self))


@dataclasses.dataclass(frozen=True)
class DStartDistributionMetric:
    name: str = "dstart distribution"
    n_bins: int = 50

    def calculate(self, target, generated) -> MetricResult:
        t = dstart_distribution(target, self.n_bins)
        g = dstart_distribution(generated, self.n_bins)
        meta = {"target_distribution": t, "generated_distribution": g}
        return MetricResult(self.name, distribution_scores(t, g), meta, dataclasses.asdict(self))


@dataclasses.dataclass(frozen=True)
class DurationDistributionMetric:
    name: str = "duration distribution"
    n_bins: int = 50

    def calculate(self, target, generated) -> MetricResult:
        t = duration_distribution(target, self.n_bins)
        g = duration_distribution(generated, self.n_bins)
        meta = {"target_distribution": t, "generated_distribution": g}
        return MetricResult(self.name, distribution_scores(t, g), meta, dataclasses.asdict(self))


METRIC_CLASSES = {cls.__name__: cls for cls in (
    F1Metric, KeyDistributionMetric, PitchDistributionMetric, VelocityDistributionMetric,
    DStartDistributionMetric, DurationDistributionMetric)}

# The reference's metrics-default.yaml, which piano-gpt's evaluation loads.
DEFAULT_METRICS_CONFIG: tuple[dict[str, Any], ...] = (
    {"name": "confusion metrics", "class": "F1Metric",
     "params": {"use_pitch_class": True, "min_time_unit": 0.02}},
    {"name": "key distribution", "class": "KeyDistributionMetric",
     "params": {"segment_duration": 0.2}},
    {"name": "dstart distribution", "class": "DStartDistributionMetric", "params": {}},
    {"name": "duration distribution", "class": "DurationDistributionMetric",
     "params": {"n_bins": 50}},
    {"name": "velocity distribution", "class": "VelocityDistributionMetric",
     "params": {"use_weighted": True}},
    {"name": "pitch distribution", "class": "PitchDistributionMetric",
     "params": {"use_weighted": True}},
)


class MetricsManager:
    """A configured list of metrics, computed in config order."""

    def __init__(self, metrics_config=DEFAULT_METRICS_CONFIG) -> None:
        self.metrics = []
        for entry in metrics_config:
            cls_name = entry["class"]
            if cls_name not in METRIC_CLASSES:
                raise ValueError(f"unknown metric class {cls_name!r}; "
                                 f"choose one of {sorted(METRIC_CLASSES)}")
            self.metrics.append(METRIC_CLASSES[cls_name](name=entry["name"],
                                                         **entry.get("params", {})))

    @classmethod
    def load_default(cls) -> MetricsManager:
        return cls(DEFAULT_METRICS_CONFIG)

    def list_metrics(self) -> list[str]:
        return [m.name for m in self.metrics]

    def log_keys(self) -> list[str]:
        """Every scalar this manager produces, as "{metric name}/{key}"."""
        keys = []
        for m in self.metrics:
            subs = F1_KEYS if isinstance(m, F1Metric) else SCORE_KEYS
            keys.extend(f"{m.name}/{k}" for k in subs)
        return keys

    def calculate_all(self, target, generated) -> list[MetricResult]:
        t, g = as_notes(target), as_notes(generated)
        return [m.calculate(t, g) for m in self.metrics]

    def calculate_flat(self, target, generated) -> dict[str, float]:
        """{"{metric name}/{key}": value}, the reference's tracker names."""
        return {f"{r.name}/{k}": float(v)
                for r in self.calculate_all(target, generated) for k, v in r.metrics.items()}
