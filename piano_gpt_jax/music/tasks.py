"""PIANO tasks: rules that split a window of notes into a prompt (source) and a target.

These follow piano-dataset at commit 406e18c, the version piano-gpt trained with: the same task
names ("{name}-x{param}"), prefix tokens and selection rules, so a checkpoint's task tokens keep
their meaning. Notes are a dict of numpy arrays (pitch, velocity, start, end[, duration]); a
pandas DataFrame is accepted too. All tasks are deterministic.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from piano_gpt_jax.music.pieces import Notes, as_notes, n_notes, select

LINE_WINDOW_S = 0.2  # the reference's top/bottom-line window
CHORD_TOLERANCE_S = 0.015  # notes starting closer than this to the previous one form a chord


def _duration(notes: Notes) -> np.ndarray:
    if "duration" in notes:
        return np.asarray(notes["duration"], np.float64)
    return np.asarray(notes["end"], np.float64) - np.asarray(notes["start"], np.float64)


def _by_start(notes: Notes, idx: np.ndarray) -> Notes:
    idx = np.asarray(idx)
    return select(notes, idx[np.argsort(notes["start"][idx], kind="stable")])


@dataclass(frozen=True)
class TaskSplit:
    prefix_tokens: tuple[str, ...]
    source: Notes
    target: Notes

    @property
    def n_source_notes(self) -> int:
        return n_notes(self.source)

    @property
    def n_target_notes(self) -> int:
        return n_notes(self.target)


@dataclass(frozen=True)
class PianoTask:
    """Base: subclasses set `name`, `task_token` and implement `_target_rows`."""

    param: int
    name = "piano_task"
    task_token = "<TASK>"
    class_param = "param"

    @property
    def task_name(self) -> str:
        return f"{self.name}-x{self.param}"

    @property
    def prefix_tokens(self) -> tuple[str, ...]:
        return (self.task_token, f"<PARAMETER_{self.param}>")

    def _target_rows(self, notes: Notes) -> np.ndarray:
        raise NotImplementedError

    def split(self, notes: Any) -> TaskSplit:
        notes = as_notes(notes)
        is_target = np.zeros(n_notes(notes), bool)
        is_target[self._target_rows(notes)] = True
        return TaskSplit(
            self.prefix_tokens, select(notes, ~is_target), select(notes, np.nonzero(is_target)[0])
        )


def _line_rows(notes: Notes, pick_high: bool) -> np.ndarray:
    """One pass of the 0.2 s sliding window: the highest (lowest) ringing note per window."""
    start = np.asarray(notes["start"], np.float64)
    if len(start) == 0:
        return np.zeros(0, np.int64)
    end = np.asarray(notes["end"], np.float64)
    pitch = np.asarray(notes["pitch"], np.float64)
    t0, t_max = start.min(), start.max()
    n_win = int((t_max - t0) / LINE_WINDOW_S) + 2
    # Sequential float accumulation, exactly as the reference's `start_time += 0.2` loop.
    t = np.cumsum(np.concatenate([[t0], np.full(n_win, LINE_WINDOW_S)]))
    t = t[t <= t_max]
    ringing_WxN = (start[None, :] <= t[:, None] + LINE_WINDOW_S) & (end[None, :] > t[:, None])
    score = np.where(ringing_WxN, pitch if pick_high else -pitch, -np.inf)
    has_any = ringing_WxN.any(axis=1)
    return np.unique(np.argmax(score, axis=1)[has_any])  # argmax = first on ties, like idxmax


@dataclass(frozen=True)
class TopLineMasking(PianoTask):
    param: int = 1
    name = "top_line_masking"
    task_token = "<PARAMETRIC_TOP_LINE>"
    class_param = "n_repetitions"
    pick_high = True

    def split(self, notes: Any) -> TaskSplit:
        notes = as_notes(notes)
        remaining = np.arange(n_notes(notes))
        picked = []
        for _ in range(self.param):
            rows = remaining[_line_rows(select(notes, remaining), self.pick_high)]
            picked.append(rows)
            remaining = np.setdiff1d(remaining, rows)
        target = np.concatenate(picked) if picked else np.zeros(0, np.int64)
        return TaskSplit(self.prefix_tokens, select(notes, remaining), _by_start(notes, target))


@dataclass(frozen=True)
class BottomLineMasking(TopLineMasking):
    param: int = 1
    name = "bottom_line_masking"
    task_token = "<PARAMETRIC_BOTTOM_LINE>"
    pick_high = False


class _ExtremeNotes(PianoTask):
    """Target = the n notes with the largest/smallest value (first occurrences on ties)."""

    largest = True
    class_param = "n_notes"

    def _values(self, notes: Notes) -> np.ndarray:
        return np.asarray(notes["pitch"], np.float64)

    def split(self, notes: Any) -> TaskSplit:
        notes = as_notes(notes)
        v = self._values(notes)
        order = np.argsort(-v if self.largest else v, kind="stable")
        target = order[: self.param]
        rest = np.sort(order[self.param :])
        return TaskSplit(self.prefix_tokens, _by_start(notes, rest), _by_start(notes, target))


@dataclass(frozen=True)
class HighNotesMasking(_ExtremeNotes):
    param: int = 5
    name = "high_notes_masking"
    task_token = "<PARAMETRIC_HIGH_NOTES>"
    largest = True


@dataclass(frozen=True)
class LowNotesMasking(_ExtremeNotes):
    param: int = 5
    name = "low_notes_masking"
    task_token = "<PARAMETRIC_LOW_NOTES>"
    largest = False


@dataclass(frozen=True)
class ShortNotesMasking(_ExtremeNotes):
    param: int = 5
    name = "short_notes_masking"
    task_token = "<PARAMETRIC_SHORT_NOTES>"
    largest = False

    def _values(self, notes: Notes) -> np.ndarray:
        return _duration(notes)


@dataclass(frozen=True)
class LongNotesMasking(_ExtremeNotes):
    param: int = 5
    name = "long_notes_masking"
    task_token = "<PARAMETRIC_LONG_NOTES>"
    largest = True

    def _values(self, notes: Notes) -> np.ndarray:
        return _duration(notes)


@dataclass(frozen=True)
class StrideMasking(PianoTask):
    """Alternate blocks of `stride` rows (input order): even blocks stay, odd blocks are target."""

    param: int = 2
    name = "stride_notes_masking"
    task_token = "<PARAMETRIC_STRIDE_MASK>"
    class_param = "stride"

    def _target_rows(self, notes: Notes) -> np.ndarray:
        return np.nonzero((np.arange(n_notes(notes)) // self.param) % 2 == 1)[0]


@dataclass(frozen=True)
class ChordMasking(PianoTask):
    """Every chord note except the first, for chords of >= threshold notes chained within 15 ms."""

    param: int = 3
    name = "chord_masking"
    task_token = "<CHORD_MASK>"
    class_param = "n_notes_threshold"

    @property
    def prefix_tokens(self) -> tuple[str, ...]:
        return (self.task_token,)

    def _target_rows(self, notes: Notes) -> np.ndarray:
        start = np.asarray(notes["start"], np.float64)
        n = len(start)
        if n == 0:
            return np.zeros(0, np.int64)
        close = np.zeros(n, bool)
        close[1:] = np.diff(start) < CHORD_TOLERANCE_S
        run_id = np.concatenate([[0], np.cumsum(close[1:] != close[:-1])])
        run_len = np.bincount(run_id)[run_id]
        return np.nonzero(close & (run_len >= self.param - 1))[0]


TASK_CLASSES: dict[str, type[PianoTask]] = {
    c.__name__: c
    for c in (
        TopLineMasking,
        BottomLineMasking,
        HighNotesMasking,
        LowNotesMasking,
        ShortNotesMasking,
        LongNotesMasking,
        StrideMasking,
        ChordMasking,
    )
}
_BY_NAME = {c.name: c for c in TASK_CLASSES.values()}

_N_NOTES_DEFAULT = [1, 2, 3, 4, 5, 6, 7, 8, 10, 15, 20]
_N_NOTES_MEDIUM = [4, 5, 6, 7, 8, 10, 15]
_NOTE_CLASSES = ("LowNotesMasking", "HighNotesMasking", "ShortNotesMasking", "LongNotesMasking")

TASK_SETS: dict[str, list[tuple[str, list[int]]]] = {
    "piano_default": [
        ("BottomLineMasking", [1, 2, 3]),
        ("TopLineMasking", [1, 2, 3]),
        *[(c, _N_NOTES_DEFAULT) for c in _NOTE_CLASSES],
        ("StrideMasking", [1, 2, 3, 4, 5, 6, 8, 10, 15, 20]),
        ("ChordMasking", [3]),
    ],
    "piano_medium": [
        ("BottomLineMasking", [1, 2, 3]),
        ("TopLineMasking", [1, 2, 3]),
        *[(c, _N_NOTES_MEDIUM) for c in _NOTE_CLASSES],
        ("StrideMasking", [1, 2, 3, 4, 5]),
        ("ChordMasking", [3]),
    ],
    "top_line": [("TopLineMasking", [1, 2, 3])],
    "chords": [("ChordMasking", [3])],
}


def _from_class(class_name: str, params: Mapping[str, Any]) -> PianoTask:
    cls = TASK_CLASSES.get(class_name)
    if cls is None:
        raise ValueError(f"unknown task class {class_name!r}; valid: {sorted(TASK_CLASSES)}")
    params = dict(params)
    value = params.pop(cls.class_param, None)
    if params:
        raise ValueError(f"{class_name} takes only '{cls.class_param}', got {sorted(params)}")
    return cls() if value is None else cls(int(value))


def _from_name(task_name: str) -> PianoTask:
    m = re.fullmatch(r"(.+)-x(\d+)", task_name)
    if m is None or m.group(1) not in _BY_NAME:
        raise ValueError(
            f"unknown task {task_name!r}: give a task set ({sorted(TASK_SETS)}) or task names "
            f"'<name>-x<param>' with <name> one of {sorted(_BY_NAME)}, e.g. top_line_masking-x2"
        )
    return _BY_NAME[m.group(1)](int(m.group(2)))


def resolve_tasks(spec: str | Sequence[Any]) -> list[PianoTask]:
    """Tasks from a set name, a list of task names, or {class, params}/{class, param_range} dicts.

    Duplicate task names keep their first position (the reference dict keeps insertion order)."""
    if isinstance(spec, str):
        if spec in TASK_SETS:
            tasks = [TASK_CLASSES[c](p) for c, params in TASK_SETS[spec] for p in params]
        else:
            tasks = [_from_name(spec)]
    else:
        tasks = []
        for entry in spec:
            if isinstance(entry, str):
                tasks.append(_from_name(entry))
            elif isinstance(entry, Mapping) and "class" in entry and "params" in entry:
                tasks.append(_from_class(entry["class"], entry["params"] or {}))
            elif isinstance(entry, Mapping) and "class" in entry and "param_range" in entry:
                tasks += [_from_class(entry["class"], p) for p in entry["param_range"]]
            else:
                raise ValueError(
                    f"invalid task entry {entry!r}: use a task name, {{class, params}} or "
                    "{class, param_range}"
                )
    unique: dict[str, PianoTask] = {}
    for t in tasks:
        unique.setdefault(t.task_name, t)
    if not unique:
        raise ValueError("the task list is empty; name a task set such as 'piano_default'")
    return list(unique.values())


def task_special_tokens(tasks: Sequence[PianoTask]) -> list[str]:
    """Prefix tokens of all tasks in first-appearance order: deterministic across processes,
    unlike the reference's set order (its bug 14)."""
    seen: dict[str, None] = {}
    for t in tasks:
        for tok in t.prefix_tokens:
            seen.setdefault(tok, None)
    return list(seen)
