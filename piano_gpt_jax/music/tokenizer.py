"""ExponentialTimeTokenizer: the piano-gpt note tokenizer, re-implemented with vectorised numpy.

A trained checkpoint is only usable with the exact vocabulary it was trained on, so ids are always
taken from a stored vocabulary list (id = position) and never recomputed from a config once a
tokenizer exists. Encoding reproduces the reference ordering rules: notes are first sorted by pitch
(numpy's quicksort, as pandas does), events are all note-offs then all note-ons, stably sorted by
time, so at equal times note-offs come before note-ons and each kind goes by ascending pitch. Gaps
are written greedily with the largest time token first.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from piano_gpt_jax.music import time_steps as time_steps_lib
from piano_gpt_jax.music.layouts import GENAI
from piano_gpt_jax.music.pieces import PITCH_MAX as MAX_PITCH
from piano_gpt_jax.music.pieces import PITCH_MIN as MIN_PITCH
from piano_gpt_jax.music.pieces import allowed_pitch_shifts, as_notes

PAD = "<PAD>"
CLS = "<CLS>"
PLACEHOLDER_PREFIX = "<PLACEHOLDER_"
TOKENIZER_NAME = "ExponentialTimeTokenizer"

_NOTE_KEYS = ("pitch", "velocity", "start", "end")
_TIME_RE = re.compile(r"^(\d+)T$")
_NOTE_RE = re.compile(r"^NOTE_(ON|OFF)_(\d+)$")
_VEL_RE = re.compile(r"^VELOCITY_(\d+)$")

# Token kinds used by the id -> meaning tables.
_OTHER, _TIME, _VELOCITY, _NOTE_ON, _NOTE_OFF = 0, 1, 2, 3, 4


def _time_token_multipliers(time_unit: float, max_time_step: float) -> list[int]:
    """Powers of two k with k * time_unit strictly below max_time_step (the reference loop)."""
    ks: list[int] = []
    dt, k = time_unit, 1
    while dt < max_time_step:
        ks.append(k)
        dt *= 2
        k *= 2
    return ks


def desc_vocabulary(desc: Mapping[str, Any] | None) -> list[str] | None:
    """The token list of a tokenizer_desc (v4 `lexicon` or v3 flat `vocab`), None when it has
    none; what a reader needs who asks only which tokens a checkpoint knows."""
    params = (desc or {}).get("parameters")
    if not isinstance(params, Mapping):
        return None
    lexicon = params.get("lexicon")
    if isinstance(lexicon, Mapping):
        return lexicon.get("vocab")
    return params.get("vocab")


class ExponentialTimeTokenizer:
    """Note-level tokenizer with power-of-two time tokens and reserved special-token slots."""

    def __init__(
        self,
        vocab: Sequence[str],
        tokenizer_config: Mapping[str, Any],
        step_sizes: Sequence[int] | None = None,
        first_placeholder_id: int | None = None,
    ):
        self.tokenizer_config = dict(tokenizer_config)
        self.time_unit = float(self.tokenizer_config["time_unit"])
        self.n_velocity_bins = int(self.tokenizer_config["n_velocity_bins"])
        edges = np.linspace(0, 128, self.n_velocity_bins + 1).astype(int)
        self._velocity_edges = edges
        self._bin_to_velocity = ((edges[:-1] + edges[1:]) / 2).astype(int)
        self._set_vocab(list(vocab))
        if step_sizes is None:
            step_sizes = sorted(
                (int(_TIME_RE.match(t).group(1)) for t in self.vocab if _TIME_RE.match(t)),
                reverse=True,
            )
        self.step_sizes = [int(s) for s in sorted(step_sizes, reverse=True)]
        missing = [f"{s}T" for s in self.step_sizes if f"{s}T" not in self.token_to_id]
        if missing or not self.step_sizes or self.step_sizes[-1] != 1:
            raise ValueError(f"tokenizer vocab needs time tokens down to 1T; missing {missing}")
        if first_placeholder_id is None:
            first_placeholder_id = next(
                (i for i, t in enumerate(self.vocab) if t.startswith(PLACEHOLDER_PREFIX)),
                len(self.vocab),
            )
        self.first_placeholder_id = int(first_placeholder_id)

    # ------------------------------------------------------------------ construction
    @classmethod
    def build(cls, config: Mapping[str, Any]) -> ExponentialTimeTokenizer:
        """A fresh tokenizer from a config; only for new runs (loaded runs use from_dict)."""
        keys = ("time_unit", "max_time_step", "n_velocity_bins", "n_special_ids")
        missing = [k for k in keys if k not in config]
        if missing:
            raise ValueError(f"tokenizer config lacks {missing}; it needs {list(keys)}")
        cfg = {k: config[k] for k in keys}
        vocab = [PAD, CLS]
        for p in range(MIN_PITCH, MAX_PITCH + 1):
            vocab += [f"NOTE_ON_{p}", f"NOTE_OFF_{p}"]
        vocab += [f"VELOCITY_{i}" for i in range(int(cfg["n_velocity_bins"]))]
        ks = _time_token_multipliers(float(cfg["time_unit"]), float(cfg["max_time_step"]))
        vocab += [f"{k}T" for k in ks]
        first_placeholder_id = len(vocab)
        vocab += [f"{PLACEHOLDER_PREFIX}{i}>" for i in range(int(cfg["n_special_ids"]))]
        return cls(vocab, cfg, step_sizes=ks[::-1], first_placeholder_id=first_placeholder_id)

    @classmethod
    def from_dict(cls, desc: Mapping[str, Any]) -> ExponentialTimeTokenizer:
        """Rebuild from a checkpoint's tokenizer_desc (v4 `lexicon` form or v3 flat `vocab`)."""
        name = desc.get("name")
        params = desc.get("parameters")
        if name != TOKENIZER_NAME or not isinstance(params, Mapping):
            raise ValueError(
                f"tokenizer_desc names {name!r}; only {TOKENIZER_NAME} descriptions "
                "({'name': ..., 'parameters': {...}}) can be loaded"
            )
        vocab = desc_vocabulary(desc)
        if vocab is not None:
            pass
        elif "min_time_unit" in params or "special_tokens" in params:
            raise ValueError(
                "this tokenizer_desc is the pre-2025 (v2) format (min_time_unit + special_tokens), "
                "whose ids differ from the current layout; it is not supported. Convert the "
                "checkpoint with a current piano-gpt/midi-tokenizers install first."
            )
        else:
            raise ValueError("tokenizer_desc parameters hold neither 'lexicon' nor 'vocab'")
        config = params.get("tokenizer_config")
        if not config or "time_unit" not in config or "n_velocity_bins" not in config:
            raise ValueError("tokenizer_desc lacks a tokenizer_config (time_unit, n_velocity_bins)")
        return cls(
            vocab,
            config,
            step_sizes=params.get("step_sizes"),
            first_placeholder_id=params.get("first_placeholder_id"),
        )

    def to_dict(self) -> dict:
        """The v4 (`lexicon`) tokenizer_desc that piano-gpt writes into checkpoints."""
        return {
            "name": TOKENIZER_NAME,
            "parameters": {
                "lexicon": {
                    "vocab": list(self.vocab),
                    "note_tokens": [t for t in self.vocab if t.startswith("NOTE_")],
                    "time_tokens": [f"{s}T" for s in self.step_sizes[::-1]],
                    "velocity_tokens": [t for t in self.vocab if t.startswith("VELOC")],
                },
                "step_sizes": list(self.step_sizes),
                "first_placeholder_id": self.first_placeholder_id,
                "tokenizer_config": dict(self.tokenizer_config),
            },
        }

    def _set_vocab(self, vocab: list[str]) -> None:
        self.vocab = vocab
        self.token_to_id = {t: i for i, t in enumerate(vocab)}
        if len(self.token_to_id) != len(vocab):
            raise ValueError("tokenizer vocabulary has duplicate tokens")
        if PAD not in self.token_to_id:
            raise ValueError("tokenizer vocabulary has no <PAD> token")
        kind = np.zeros(len(vocab), np.int8)
        value = np.zeros(len(vocab), np.int64)
        note_on = np.full(128, -1, np.int64)
        note_off = np.full(128, -1, np.int64)
        vel_ids = np.full(self.n_velocity_bins, -1, np.int64)
        for i, tok in enumerate(vocab):
            if tok.startswith("<"):
                continue
            if m := _TIME_RE.match(tok):
                kind[i], value[i] = _TIME, int(m.group(1))
            elif m := _NOTE_RE.match(tok):
                p = int(m.group(2))
                kind[i], value[i] = (_NOTE_ON if m.group(1) == "ON" else _NOTE_OFF), p
                (note_on if m.group(1) == "ON" else note_off)[p] = i
            elif m := _VEL_RE.match(tok):
                b = int(m.group(1))
                kind[i], value[i] = _VELOCITY, b
                if b < self.n_velocity_bins:
                    vel_ids[b] = i
        self._kind, self._value = kind, value
        self._time_tables: dict = {}
        self._note_on_ids, self._note_off_ids, self._velocity_ids = note_on, note_off, vel_ids

    def add_special_tokens(self, tokens: Iterable[str]) -> None:
        """Write new special tokens into the next free placeholder slots (vocab size is fixed)."""
        vocab = list(self.vocab)
        present = set(vocab)
        fid = self.first_placeholder_id
        for tok in tokens:
            if tok in present:
                continue
            if fid >= len(vocab) or not vocab[fid].startswith(PLACEHOLDER_PREFIX):
                raise ValueError(
                    f"no free placeholder slot for special token {tok!r}: all "
                    f"{self.tokenizer_config.get('n_special_ids')} special ids are used; raise "
                    "tokenizer n_special_ids for a fresh run"
                )
            vocab[fid] = tok
            present.add(tok)
            fid += 1
        self.first_placeholder_id = fid
        self._set_vocab(vocab)

    # ------------------------------------------------------------------ properties
    @property
    def free_special_slots(self) -> int:
        """How many new special tokens add_special_tokens can still take (the run of placeholders
        from first_placeholder_id; the vocab size is fixed, so this is all the room there is)."""
        n = 0
        for tok in self.vocab[self.first_placeholder_id:]:
            if not tok.startswith(PLACEHOLDER_PREFIX):
                break
            n += 1
        return n

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @property
    def pad_token_id(self) -> int:
        return self.token_to_id[PAD]

    # ------------------------------------------------------------------ encoding
    def encode_tokens(self, tokens: Sequence[str]) -> np.ndarray:
        try:
            return np.asarray([self.token_to_id[t] for t in tokens], dtype=np.int32)
        except KeyError as e:
            raise KeyError(f"token {e.args[0]!r} is not in the tokenizer vocabulary") from None

    def encode(self, notes: Any) -> np.ndarray:
        """Token ids (int32) of a set of notes; times are seconds from absolute zero."""
        n = as_notes(notes)
        return self.encode_arrays(n["pitch"].astype(np.int64, copy=False),
                                  n["velocity"].astype(np.int64, copy=False),
                                  n["start"].astype(np.float64, copy=False),
                                  n["end"].astype(np.float64, copy=False))

    def tokenize(self, notes: Any) -> list[str]:
        return [self.vocab[i] for i in self.encode(notes)]

    def encode_arrays(
        self, pitch: np.ndarray, velocity: np.ndarray, start: np.ndarray, end: np.ndarray
    ) -> np.ndarray:
        """encode() on plain arrays; the hot path of the data pipeline."""
        n = len(pitch)
        if n == 0:
            return np.zeros(0, np.int32)
        if pitch.min() < MIN_PITCH or pitch.max() > MAX_PITCH:
            bad = pitch[(pitch < MIN_PITCH) | (pitch > MAX_PITCH)][0]
            raise ValueError(f"pitch {bad} is outside the piano range {MIN_PITCH}..{MAX_PITCH}")
        if not (np.isfinite(start).all() and np.isfinite(end).all()):
            raise ValueError("note start/end times must be finite numbers")
        tu = self.time_unit
        vbin = np.digitize(velocity, self._velocity_edges) - 1
        if vbin.min() < 0 or vbin.max() >= self.n_velocity_bins:
            raise ValueError("velocity must lie in 0..127")
        start_q = np.round(start / tu) * tu
        end_q = np.round(end / tu) * tu
        end_q = np.where(start_q == end_q, end_q + tu, end_q)

        order = np.argsort(pitch, kind="quicksort")  # pandas sort_values("pitch") default
        p_sorted = pitch[order]
        times = np.concatenate([end_q[order], start_q[order]])
        is_on = np.concatenate([np.zeros(n, bool), np.ones(n, bool)])
        ev_order = np.argsort(times, kind="stable")
        times, is_on = times[ev_order], is_on[ev_order]
        ev_pitch = np.concatenate([p_sorted, p_sorted])[ev_order]
        ev_vbin = np.concatenate([vbin[order], vbin[order]])[ev_order]

        gaps = np.round(np.diff(times, prepend=0.0) / tu).astype(np.int64)
        if gaps.min() < 0:
            raise ValueError("note times must be non-negative and each note's end >= its start")
        steps = np.asarray(self.step_sizes, np.int64)
        counts = np.empty((len(gaps), len(steps)), np.int64)
        rest = gaps
        for j, s in enumerate(steps):  # loop over the few step sizes, not over notes
            counts[:, j], rest = np.divmod(rest, s)
        n_time = counts.sum(axis=1)
        n_event = np.where(is_on, 2, 1)
        block = n_time + n_event
        offsets = np.concatenate([[0], np.cumsum(block)[:-1]])
        out = np.empty(int(block.sum()), np.int64)

        step_ids = np.asarray([self.token_to_id[f"{s}T"] for s in steps], np.int64)
        time_ids = np.repeat(np.tile(step_ids, len(gaps)), counts.ravel())
        time_start = np.concatenate([[0], np.cumsum(n_time)[:-1]])
        time_pos = np.repeat(offsets - time_start, n_time) + np.arange(len(time_ids))
        out[time_pos] = time_ids

        first = offsets + n_time
        vel_ids = self._velocity_ids[ev_vbin]
        on_ids = self._note_on_ids[ev_pitch]
        off_ids = self._note_off_ids[ev_pitch]
        out[first] = np.where(is_on, vel_ids, off_ids)
        out[first[is_on] + 1] = on_ids[is_on]
        if out.min() < 0:
            raise ValueError("a note or velocity token is missing from this tokenizer's vocabulary")
        return out.astype(np.int32)

    # ------------------------------------------------------------------ decoding
    def decode(self, ids: Sequence[int] | np.ndarray) -> pd.DataFrame:
        """Notes (pitch, start, end, velocity) from any ids: non-music tokens and unclosed notes
        are dropped, as in the reference untokenize."""
        ids = np.asarray(ids, dtype=np.int64).ravel()
        ids = ids[(ids >= 0) & (ids < self.vocab_size)]
        kind = self._kind[ids]
        value = self._value[ids]
        # Reference accumulates time token by token; np.cumsum is the same sequential float sum.
        dt = np.where(kind == _TIME, value, 0) * self.time_unit
        t = np.cumsum(dt)
        is_vel = kind == _VELOCITY
        last_vel = np.where(is_vel, np.arange(len(ids)), -1)
        if len(ids):
            last_vel = np.maximum.accumulate(last_vel)
        bins = np.clip(value, 0, self.n_velocity_bins - 1)
        vel_at = np.where(last_vel >= 0, self._bin_to_velocity[bins[np.maximum(last_vel, 0)]], 0)

        ev = (kind == _NOTE_ON) | (kind == _NOTE_OFF)
        e_time, e_on, e_pitch = t[ev], kind[ev] == _NOTE_ON, value[ev]
        e_vel = np.where(e_on, vel_at[ev], 0)
        # Per pitch, in (time, off<on, velocity) order, each note-on is closed by the next event.
        order = np.lexsort((e_vel, e_on, e_time, e_pitch))
        e_time, e_on, e_pitch, e_vel = e_time[order], e_on[order], e_pitch[order], e_vel[order]
        has_next = np.zeros(len(order), bool)
        if len(order) > 1:
            has_next[:-1] = e_pitch[1:] == e_pitch[:-1]
        closed = e_on & has_next
        idx = np.nonzero(closed)[0]
        start = e_time[idx]
        end = e_time[idx + 1]
        end = np.where(end == start, end + self.time_unit, end)
        df = pd.DataFrame(
            {
                "pitch": e_pitch[idx].astype(np.int64),
                "start": start,
                "end": end,
                "velocity": e_vel[idx].astype(np.int64),
            }
        )
        df = df.sort_values("pitch", kind="quicksort").sort_values("start", kind="stable")
        return df.reset_index(drop=True)

    # ------------------------------------------------------------------ id-level helpers
    def is_note_on(self, ids: np.ndarray) -> np.ndarray:
        return self._kind[np.asarray(ids, np.int64)] == _NOTE_ON

    def allowed_id_shifts(self, ids: np.ndarray, max_shift: int) -> list[int]:
        """Shifts in [-max_shift, max_shift] that keep every note token of `ids` on the piano."""
        ids = np.asarray(ids, np.int64)
        kind = self._kind[ids]
        pitch = self._value[ids][(kind == _NOTE_ON) | (kind == _NOTE_OFF)]
        return allowed_pitch_shifts({"pitch": pitch}, max_shift)

    def transpose_ids(self, ids: np.ndarray, shift: int) -> np.ndarray:
        """Pitch-shift note tokens in id space (other tokens unchanged)."""
        ids = np.asarray(ids, np.int64)
        if shift == 0:
            return ids.astype(np.int32)
        kind = self._kind[ids]
        new_pitch = np.clip(self._value[ids] + shift, 0, 127)
        out = np.where(kind == _NOTE_ON, self._note_on_ids[new_pitch], ids)
        out = np.where(kind == _NOTE_OFF, self._note_off_ids[new_pitch], out)
        if out.min() < 0:
            raise ValueError(f"pitch shift {shift} moves notes off the piano range")
        return out.astype(np.int32)

    # ------------------------------------------------------------------ time steps
    def time_steps(
        self, ids: Sequence[int] | np.ndarray, restart_tokens: Sequence[str] = (GENAI,)
    ) -> np.ndarray:
        """Music-time position of each token (reference token_ids_to_time_steps): the rule of
        music/time_steps.py, which the samplers use too."""
        key = tuple(restart_tokens)
        if key not in self._time_tables:  # per vocabulary: _set_vocab clears it
            self._time_tables[key] = time_steps_lib.time_tables(self, key)
        return time_steps_lib.time_steps(self._time_tables[key], ids)

    def time_increments(self) -> np.ndarray:
        """(V,) how far each token advances the clock, in time units: k for "kT", else 0."""
        return np.where(self._kind == _TIME, self._value, 0).astype(np.int64)

    def music_token_mask(self) -> np.ndarray:
        """(V,) True for note, velocity and time tokens: the tokens with a place in time."""
        return self._kind != _OTHER
