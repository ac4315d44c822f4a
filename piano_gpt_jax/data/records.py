"""Training records: from pieces of notes to fixed-length (tokens, targets, loss_mask) examples.

Two record kinds, chosen by `stage`:

* next_token_pretraining: each piece (a pause-split segment) is tokenized once; a record is
  `[dataset, composer] + ids[s : s + context_size - 1]`, right-padded to context_size + 1 tokens.
  Windows start at every token offset except a NOTE_ON (so no window opens between a velocity and
  its note) up to the last full window; a piece shorter than the context gives one padded record.
  Augmentation here is pitch shift only (done on ids); speed change would need re-tokenizing.
* piano_task: a record is `notes_per_record` consecutive notes of a piece, shifted to start at 0,
  split by one task into source and target, laid out by music/layouts.py in the "annotated"
  (piano-gpt HEAD) or "plain" (piano-gpt f37ac14) prompt layout: prompt + answer, cut to
  context_size + 1 and right-padded. The task is applied to the whole window (the f37ac14
  scheme, not HEAD's random inner windows). Record index = window * n_tasks + task, as the
  reference.

Augmentation (training only, from an RNG seeded by the caller per example): a pitch shift drawn
uniformly from the shifts in [-max_pitch_shift, max_pitch_shift] that keep every note in 21..108
(0 included), and a speed factor drawn uniformly from (1.0, *speed_change_factors).
Loss mask: every non-pad target; with loss_masking "finetuning" only targets after <GENAI> (the
first target token onward; <GENAI> itself is not trained, as the reference prompt masking).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow.compute as pc

from piano_gpt_jax.config import LOSS_MASKINGS
from piano_gpt_jax.music import layouts, pieces
from piano_gpt_jax.music.tasks import PianoTask
from piano_gpt_jax.music.tokenizer import ExponentialTimeTokenizer


@dataclass(frozen=True)
class Augmentation:
    max_pitch_shift: int = 0
    speed_change_factors: tuple[float, ...] = ()

    @property
    def active(self) -> bool:
        return self.max_pitch_shift > 0 or any(f != 1.0 for f in self.speed_change_factors)


@dataclass
class PieceStore:
    """All pieces of one split, concatenated by column; piece i is rows offsets[i]:offsets[i+1]."""

    pitch: np.ndarray
    velocity: np.ndarray
    start: np.ndarray
    end: np.ndarray
    offsets: np.ndarray
    sources: list[str]
    dropped_notes: int = 0
    skipped_records: int = 0

    @property
    def n_pieces(self) -> int:
        return len(self.offsets) - 1

    @property
    def n_notes(self) -> int:
        return int(self.offsets[-1])

    def piece(self, i: int, lo: int = 0, hi: int | None = None) -> dict[str, np.ndarray]:
        a = int(self.offsets[i])
        b = int(self.offsets[i + 1])
        sl = slice(a + lo, b if hi is None else a + hi)
        return {
            "pitch": self.pitch[sl],
            "velocity": self.velocity[sl],
            "start": self.start[sl],
            "end": self.end[sl],
        }

    def composer_keys(self) -> list[str | None]:
        return [layouts.composer_key(s) for s in self.sources]

    def subset(self, piece_ids: Sequence[int]) -> PieceStore:
        parts = [self.piece(i) for i in piece_ids]
        return _store_from_parts(parts, [self.sources[i] for i in piece_ids])

    @classmethod
    def from_split(cls, split, pause_threshold: float | None) -> PieceStore:
        """Read a `datasets` split (columns notes, source) into pause-split pieces.

        Read through Arrow: the numpy format would silently cast float64 times to float32."""
        if "notes" not in split.column_names:
            raise ValueError(f"dataset split has no 'notes' column (columns: {split.column_names})")
        table = split.with_format("arrow")[:]
        notes = table.column("notes").combine_chunks()
        cols, bounds = {}, {}
        for name in ("pitch", "velocity", "start", "end"):
            lists = notes.field(name)
            cols[name] = pc.list_flatten(lists).to_numpy(zero_copy_only=False)
            lengths = pc.fill_null(pc.list_value_length(lists), 0).to_numpy(zero_copy_only=False)
            # Per column: a record whose columns differ in length must not shift the rows after
            # it; clean_notes rejects it on its own.
            bounds[name] = np.concatenate([[0], np.cumsum(lengths)])
        n_rows = len(notes)
        has_source = "source" in table.column_names
        sources = table.column("source").to_pylist() if has_source else [None] * n_rows
        parts, part_sources = [], []
        dropped = skipped = 0
        for r in range(n_rows):
            record = {k: v[bounds[k][r] : bounds[k][r + 1]] for k, v in cols.items()}
            try:
                piece, drops = pieces.clean_notes(record)
            except pieces.BadRecordError:
                skipped += 1
                continue
            dropped += sum(drops.values())
            src = sources[r] if isinstance(sources[r], str) else json.dumps(sources[r] or {})
            n_before = len(parts)
            for seg in pieces.split_on_pauses(piece, pause_threshold):
                if pieces.n_notes(seg) >= 2:
                    parts.append(seg)
                    part_sources.append(src)
            skipped += len(parts) == n_before  # no piece of >= 2 notes in this record
        store = _store_from_parts(parts, part_sources)
        store.dropped_notes, store.skipped_records = dropped, skipped
        return store


def _store_from_parts(parts: list[dict], sources: list[str]) -> PieceStore:
    lengths = [len(p["pitch"]) for p in parts]

    def cat(key, dtype):
        if not parts:
            return np.zeros(0, dtype)
        return np.concatenate([np.asarray(p[key], dtype) for p in parts])

    return PieceStore(
        pitch=cat("pitch", np.int64),
        velocity=cat("velocity", np.int64),
        start=cat("start", np.float64),
        end=cat("end", np.float64),
        offsets=np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64),
        sources=list(sources),
    )


def _source_prefix_ids(store: PieceStore, tokenizer: ExponentialTimeTokenizer) -> np.ndarray:
    """(n_pieces, 2) ids of each piece's [dataset, composer] tokens, the start of every record."""
    return np.asarray(
        [layouts.token_ids(tokenizer, [layouts.dataset_token(s), layouts.composer_token(s)])
         for s in store.sources], np.int32,
    ).reshape(-1, 2)


def _pad_and_shift(
    seq: np.ndarray,
    context_size: int,
    pad_id: int,
    n_masked: int,
    tokenizer: ExponentialTimeTokenizer,
    use_time_steps: bool,
) -> dict[str, np.ndarray]:
    """Cut/pad a sequence to context_size + 1 and make the input/target pair."""
    full = np.full(context_size + 1, pad_id, np.int32)
    seq = seq[: context_size + 1]
    full[: len(seq)] = seq
    targets = full[1:]
    mask = (targets != pad_id).astype(np.int32)
    if n_masked > 0:
        mask[:n_masked] = 0
    out = {"tokens": full[:-1], "targets": targets, "loss_mask": mask}
    if use_time_steps:
        out["time_steps"] = tokenizer.time_steps(full)[:-1]
    return out


class PianoTaskRecords:
    """Index -> piano_task example; windows found by cumsum + searchsorted (no scans)."""

    def __init__(
        self,
        store: PieceStore,
        tokenizer: ExponentialTimeTokenizer,
        tasks: Sequence[PianoTask],
        notes_per_record: int,
        context_size: int,
        loss_masking: str = "pretraining",
        use_time_steps: bool = False,
        prompt_layout: str = layouts.ANNOTATED,
    ):
        self.prompt_layout = layouts.check_prompt_layout(prompt_layout)
        if loss_masking not in LOSS_MASKINGS:
            raise ValueError(f"loss_masking must be one of {LOSS_MASKINGS}, got {loss_masking!r}")
        self.store, self.tokenizer, self.tasks = store, tokenizer, list(tasks)
        self.notes_per_record = int(notes_per_record)
        self.context_size = int(context_size)
        self.finetuning = loss_masking == "finetuning"
        self.use_time_steps = use_time_steps
        counts = np.maximum(np.diff(store.offsets) - self.notes_per_record + 1, 0)
        self._window_cum = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.n_windows = int(self._window_cum[-1])
        self._source_tokens = [(layouts.dataset_token(s), layouts.composer_token(s))
                               for s in store.sources]
        self._answer_end = np.asarray(layouts.answer_end(tokenizer, self.prompt_layout), np.int32)

    def __len__(self) -> int:
        return self.n_windows * len(self.tasks)

    def locate(self, index: int) -> tuple[int, int, int]:
        """(piece, first note, task) of a record index."""
        window, task = divmod(int(index), len(self.tasks))
        piece = int(np.searchsorted(self._window_cum, window, side="right") - 1)
        return piece, window - int(self._window_cum[piece]), task

    def _window(self, index: int, rng: np.random.Generator | None, aug: Augmentation | None):
        piece, first, task_i = self.locate(index)
        notes = self.store.piece(piece, first, first + self.notes_per_record)
        if rng is not None and aug is not None and aug.active:
            shifts = pieces.allowed_pitch_shifts(notes, aug.max_pitch_shift)
            notes = dict(notes, pitch=notes["pitch"] + int(rng.choice(shifts)))
            factor = float(rng.choice((1.0, *aug.speed_change_factors)))
            if factor != 1.0:
                notes = dict(notes, start=notes["start"] / factor, end=notes["end"] / factor)
        return piece, task_i, pieces.shift_to_zero(notes)

    def parts(
        self, index: int, rng: np.random.Generator | None = None, aug: Augmentation | None = None
    ) -> tuple[str, np.ndarray, np.ndarray]:
        """(task name, prompt ids up to and including <GENAI>, target note ids), laid out by
        music/layouts.py, the builder generation uses too."""
        piece, task_i, notes = self._window(index, rng, aug)
        task = self.tasks[task_i]
        split = task.split(notes)
        dataset, composer = self._source_tokens[piece]
        prompt = layouts.task_prompt(self.tokenizer, self.prompt_layout, split, dataset, composer)
        return task.task_name, prompt, self.tokenizer.encode(split.target).astype(np.int32)

    def example(
        self, index: int, rng: np.random.Generator | None = None, aug: Augmentation | None = None
    ) -> dict[str, np.ndarray]:
        _, prompt, target = self.parts(index, rng, aug)
        seq = np.concatenate([prompt, target, self._answer_end])
        n_masked = len(prompt) - 1 if self.finetuning else 0
        return _pad_and_shift(
            seq, self.context_size, self.tokenizer.pad_token_id, n_masked, self.tokenizer,
            self.use_time_steps,
        )


class NextTokenRecords:
    """Index -> next-token window over a piece's token ids."""

    def __init__(
        self,
        store: PieceStore,
        tokenizer: ExponentialTimeTokenizer,
        context_size: int,
        use_time_steps: bool = False,
    ):
        self.store, self.tokenizer = store, tokenizer
        self.context_size = int(context_size)
        self.use_time_steps = use_time_steps
        self._content = self.context_size + 1 - 2  # two prefix tokens
        ids = [
            tokenizer.encode_arrays(*(p[k] for k in ("pitch", "velocity", "start", "end")))
            for p in (store.piece(i) for i in range(store.n_pieces))
        ]
        lengths = np.asarray([len(x) for x in ids], np.int64)
        self._ids = np.concatenate(ids) if ids else np.zeros(0, np.int32)
        self._offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        note_on = tokenizer.is_note_on(self._ids)
        starts = []
        for i in range(store.n_pieces):  # per piece, vectorised inside
            last = max(int(lengths[i]) - self._content, 0)
            pos = np.arange(last + 1)
            pos = pos[~note_on[self._offsets[i] + pos]] if lengths[i] else pos
            starts.append(self._offsets[i] + pos)
        self._starts = np.concatenate(starts) if starts else np.zeros(0, np.int64)
        self._prefix = _source_prefix_ids(store, tokenizer)

    def __len__(self) -> int:
        return len(self._starts)

    def example(
        self, index: int, rng: np.random.Generator | None = None, aug: Augmentation | None = None
    ) -> dict[str, np.ndarray]:
        pos = int(self._starts[int(index)])
        piece = int(np.searchsorted(self._offsets, pos, side="right") - 1)
        end = min(pos + self._content, int(self._offsets[piece + 1]))
        body = self._ids[pos:end]
        if rng is not None and aug is not None and aug.max_pitch_shift > 0:
            shifts = self.tokenizer.allowed_id_shifts(body, aug.max_pitch_shift)
            body = self.tokenizer.transpose_ids(body, int(rng.choice(shifts)))
        seq = np.concatenate([self._prefix[piece], body])
        return _pad_and_shift(
            seq, self.context_size, self.tokenizer.pad_token_id, 0, self.tokenizer,
            self.use_time_steps,
        )
