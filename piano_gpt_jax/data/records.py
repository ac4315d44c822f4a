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

Records read their pieces from a store: in memory (PieceStore, TokenStore) or memory-mapped from a
prepared corpus on disk (data/prepared_store.py). Both expose the same columns, and every index a
record set needs (windows per piece, window starts) comes through `store.cached_index`, which a
prepared store keeps on disk, so a record set pickled to a loader worker carries paths and small
arrays only, whatever the corpus size.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow.compute as pc

from piano_gpt_jax.config import LOSS_MASKINGS
from piano_gpt_jax.music import layouts, pieces
from piano_gpt_jax.music.tasks import PianoTask
from piano_gpt_jax.music.tokenizer import ExponentialTimeTokenizer

# What a record needs of a piece's source: its dataset token, composer token and composer key.
SourceKey = tuple[str, str, "str | None"]
# Window starts are found with a rank/select index over non-NOTE_ON tokens in blocks of this size:
# one block (8 KiB of uint16 ids) is read per lookup; the index costs 8 bytes per block.
TOKEN_BLOCK = 4096


def source_key(source: str | None) -> SourceKey:
    return (layouts.dataset_token(source), layouts.composer_token(source),
            layouts.composer_key(source))


def source_table(sources: Sequence[str | None]) -> tuple[np.ndarray, list[SourceKey]]:
    """(per-piece index into the table, the table of distinct source keys): a corpus has few
    distinct (dataset, composer) pairs, so pieces carry a small integer instead of a string."""
    table: dict[SourceKey, int] = {}
    index = np.fromiter((table.setdefault(source_key(s), len(table)) for s in sources),
                        np.int32, count=len(sources))
    return index, list(table)


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

    @functools.cached_property
    def _sources(self) -> tuple[np.ndarray, list[SourceKey]]:
        return source_table(self.sources)

    @property
    def piece_source(self) -> np.ndarray:
        return self._sources[0]

    @property
    def source_table(self) -> list[SourceKey]:
        return self._sources[1]

    def cached_index(self, name: str, build: Callable[[], np.ndarray]) -> np.ndarray:
        """An index over this store (a prepared store keeps it on disk; in memory: built)."""
        return build()


    @classmethod
    def from_split(cls, split, pause_threshold: float | None) -> PieceStore:
        """Read a `datasets` split (columns notes, source) into pause-split pieces.

        Read through Arrow: the numpy format would silently cast float64 times to float32."""
        if "notes" not in split.column_names:
            raise ValueError(f"dataset split has no 'notes' column (columns: {split.column_names})")
        return cls.from_table(split.with_format("arrow")[:], pause_threshold)

    @classmethod
    def from_table(cls, table, pause_threshold: float | None) -> PieceStore:
        """Pause-split pieces of the rows of an Arrow table (a split or a slice of one)."""
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


def _prefix_ids(store, tokenizer: ExponentialTimeTokenizer) -> np.ndarray:
    """(n_table, 2) ids of each source key's [dataset, composer] tokens, the start of every
    next-token record."""
    return np.asarray(
        [layouts.token_ids(tokenizer, [dataset, composer])
         for dataset, composer, _ in store.source_table], np.int32,
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


def _selection(pieces_: Sequence[int] | np.ndarray | None) -> np.ndarray | None:
    return None if pieces_ is None else np.asarray(pieces_, np.int64)


def _cumulative(counts: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).astype(np.int64)


class PianoTaskRecords:
    """Index -> piano_task example; windows found by cumsum + searchsorted (no scans).

    `pieces` restricts the records to those pieces of the store (in that order), as the composer
    validation splits do."""

    def __init__(
        self,
        store,
        tokenizer: ExponentialTimeTokenizer,
        tasks: Sequence[PianoTask],
        notes_per_record: int,
        context_size: int,
        loss_masking: str = "pretraining",
        use_time_steps: bool = False,
        prompt_layout: str = layouts.ANNOTATED,
        pieces: Sequence[int] | np.ndarray | None = None,
    ):
        self.prompt_layout = layouts.check_prompt_layout(prompt_layout)
        if loss_masking not in LOSS_MASKINGS:
            raise ValueError(f"loss_masking must be one of {LOSS_MASKINGS}, got {loss_masking!r}")
        self.store, self.tokenizer, self.tasks = store, tokenizer, list(tasks)
        self.notes_per_record = int(notes_per_record)
        self.context_size = int(context_size)
        self.finetuning = loss_masking == "finetuning"
        self.use_time_steps = use_time_steps
        self._pieces = _selection(pieces)
        npr = self.notes_per_record
        if self._pieces is None:
            self._window_cum = store.cached_index(
                f"windows-n{npr}",
                lambda: _cumulative(np.maximum(np.diff(store.offsets) - npr + 1, 0)))
        else:
            lengths = np.asarray(store.offsets)[self._pieces + 1] - np.asarray(
                store.offsets)[self._pieces]
            self._window_cum = _cumulative(np.maximum(lengths - npr + 1, 0))
        self.n_windows = int(self._window_cum[-1])
        self._answer_end = np.asarray(layouts.answer_end(tokenizer, self.prompt_layout), np.int32)

    def __len__(self) -> int:
        return self.n_windows * len(self.tasks)

    def locate(self, index: int) -> tuple[int, int, int]:
        """(piece, first note, task) of a record index."""
        window, task = divmod(int(index), len(self.tasks))
        local = int(np.searchsorted(self._window_cum, window, side="right") - 1)
        piece = local if self._pieces is None else int(self._pieces[local])
        return piece, window - int(self._window_cum[local]), task

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
        dataset, composer, _ = self.store.source_table[int(self.store.piece_source[piece])]
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


# ---------------------------------------------------------------------- token stores


def tokenize_pieces(store: PieceStore, tokenizer: ExponentialTimeTokenizer
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(ids of every piece, concatenated; per-piece offsets into them): the next-token stage's
    content, computed once per corpus (in memory here, on disk by data/prepare.py)."""
    ids = [tokenizer.encode_arrays(*(p[k] for k in ("pitch", "velocity", "start", "end")))
           for p in (store.piece(i) for i in range(store.n_pieces))]
    lengths = np.asarray([len(x) for x in ids], np.int64)
    flat = np.concatenate(ids) if ids else np.zeros(0, np.int32)
    return flat, _cumulative(lengths)


def non_note_on_ranks(
    read: Callable[[int, int], np.ndarray], n_tokens: int, positions: np.ndarray,
    is_note_on: Callable[[np.ndarray], np.ndarray], chunk: int = 1 << 22,
) -> np.ndarray:
    """For each position (ascending, each <= n_tokens): how many non-NOTE_ON tokens lie before
    it. One pass over the ids in chunks of `chunk` (`read(a, b)` returns ids[a:b]), so the
    corpus never has to fit in memory."""
    positions = np.asarray(positions, np.int64)
    out = np.empty(len(positions), np.int64)
    carry, done = 0, 0
    for a in range(0, n_tokens, chunk):
        b = min(a + chunk, n_tokens)
        ranks = np.empty(b - a + 1, np.int64)
        ranks[0] = carry
        np.cumsum(~is_note_on(read(a, b)), out=ranks[1:])
        ranks[1:] += carry
        upto = int(np.searchsorted(positions, b, side="right"))
        out[done:upto] = ranks[positions[done:upto] - a]
        done, carry = upto, int(ranks[-1])
    out[done:] = carry  # positions at n_tokens (all of them when there are no tokens)
    return out


def block_ranks(read: Callable[[int, int], np.ndarray], n_tokens: int,
                is_note_on: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Non-NOTE_ON tokens before each TOKEN_BLOCK boundary (and before n_tokens): the rank
    half of the rank/select index that finds window starts."""
    bounds = np.minimum(np.arange(n_tokens // TOKEN_BLOCK + 2) * TOKEN_BLOCK, n_tokens)
    return non_note_on_ranks(read, n_tokens, bounds, is_note_on)


@dataclass
class TokenStore:
    """Token ids of all pieces of one split (next-token stage), with the piece offsets into them
    and the block ranks of non-NOTE_ON tokens; in memory. data/prepared_store.py maps the same
    columns from disk."""

    ids: np.ndarray
    offsets: np.ndarray
    piece_source: np.ndarray
    source_table: list[SourceKey]
    block_rank: np.ndarray
    n_notes: int = 0
    dropped_notes: int = 0
    skipped_records: int = 0

    @classmethod
    def from_pieces(cls, store: PieceStore, tokenizer: ExponentialTimeTokenizer) -> TokenStore:
        ids, offsets = tokenize_pieces(store, tokenizer)
        return cls(ids, offsets, store.piece_source, store.source_table,
                   block_ranks(lambda a, b: ids[a:b], len(ids), tokenizer.is_note_on),
                   store.n_notes, store.dropped_notes, store.skipped_records)

    @property
    def n_pieces(self) -> int:
        return len(self.offsets) - 1

    @property
    def n_tokens(self) -> int:
        return int(self.offsets[-1])

    def read(self, a: int, b: int) -> np.ndarray:
        return np.asarray(self.ids[a:b])

    scan = read  # whole-corpus passes: in memory, reading is all there is

    def cached_index(self, name: str, build: Callable[[], np.ndarray]) -> np.ndarray:
        return build()


def window_start_counts(store, content: int, is_note_on) -> np.ndarray:
    """Per piece: how many next-token windows of `content` tokens start in it (at every offset
    that is not a NOTE_ON, up to the last full window; a short piece has one, at 0)."""
    offsets = np.asarray(store.offsets, np.int64)
    lengths = np.diff(offsets)
    last = np.maximum(lengths - content, 0)
    bounds = np.empty(2 * len(lengths), np.int64)
    bounds[0::2], bounds[1::2] = offsets[:-1], offsets[:-1] + last + 1
    ranks = non_note_on_ranks(store.scan, store.n_tokens, bounds, is_note_on)
    return ranks[1::2] - ranks[0::2]


class NextTokenRecords:
    """Index -> next-token window over a piece's token ids.

    Windows are not listed (that would be 8 bytes per token): the record index finds its piece
    through the cumulative window counts, and the k-th window of a piece starts at its k-th
    non-NOTE_ON token, found with the store's block ranks and one block of ids."""

    def __init__(
        self,
        store,
        tokenizer: ExponentialTimeTokenizer,
        context_size: int,
        use_time_steps: bool = False,
        pieces: Sequence[int] | np.ndarray | None = None,
    ):
        if isinstance(store, PieceStore):
            store = TokenStore.from_pieces(store, tokenizer)
        self.store, self.tokenizer = store, tokenizer
        self.context_size = int(context_size)
        self.use_time_steps = use_time_steps
        self._content = self.context_size + 1 - 2  # two prefix tokens
        self._pieces = _selection(pieces)
        content = self._content
        counts = store.cached_index(
            f"starts-c{content}",
            lambda: _cumulative(window_start_counts(store, content, tokenizer.is_note_on)))
        if self._pieces is None:
            self._start_cum = counts
        else:
            counts = np.asarray(counts)
            self._start_cum = _cumulative(counts[self._pieces + 1] - counts[self._pieces])
        self._prefix = _prefix_ids(store, tokenizer)

    def __len__(self) -> int:
        return int(self._start_cum[-1])

    def _rank(self, position: int) -> int:
        """Non-NOTE_ON tokens before `position`."""
        block = position // TOKEN_BLOCK
        head = self.store.read(block * TOKEN_BLOCK, position)
        return int(self.store.block_rank[block]) + int(np.count_nonzero(
            ~self.tokenizer.is_note_on(head)))

    def _select(self, rank: int) -> int:
        """Position of the non-NOTE_ON token with `rank` non-NOTE_ON tokens before it."""
        block = int(np.searchsorted(self.store.block_rank, rank, side="right") - 1)
        a = block * TOKEN_BLOCK
        ids = self.store.read(a, min(a + TOKEN_BLOCK, self.store.n_tokens))
        hits = np.flatnonzero(~self.tokenizer.is_note_on(ids))
        return a + int(hits[rank - int(self.store.block_rank[block])])

    def start(self, index: int) -> tuple[int, int]:
        """(piece, token position) where record `index` starts."""
        local = int(np.searchsorted(self._start_cum, index, side="right") - 1)
        piece = local if self._pieces is None else int(self._pieces[local])
        k = int(index) - int(self._start_cum[local])
        return piece, self._select(self._rank(int(self.store.offsets[piece])) + k)

    def example(
        self, index: int, rng: np.random.Generator | None = None, aug: Augmentation | None = None
    ) -> dict[str, np.ndarray]:
        piece, pos = self.start(int(index))
        end = min(pos + self._content, int(self.store.offsets[piece + 1]))
        body = self.store.read(pos, end).astype(np.int32)
        if rng is not None and aug is not None and aug.max_pitch_shift > 0:
            shifts = self.tokenizer.allowed_id_shifts(body, aug.max_pitch_shift)
            body = self.tokenizer.transpose_ids(body, int(rng.choice(shifts)))
        seq = np.concatenate([self._prefix[int(self.store.piece_source[piece])], body])
        return _pad_and_shift(
            seq, self.context_size, self.tokenizer.pad_token_id, 0, self.tokenizer,
            self.use_time_steps,
        )


class ConcatRecords:
    """Several record sets read as one stream, in order (dataset.extra_datasets): the same
    indices the records of the concatenated datasets would have, since both record kinds number
    pieces' windows in piece order."""

    def __init__(self, parts: Sequence):
        self.parts = list(parts)
        self._cum = _cumulative(np.asarray([len(p) for p in self.parts], np.int64))

    def __len__(self) -> int:
        return int(self._cum[-1])

    def _part(self, index: int) -> tuple[object, int]:
        i = int(np.searchsorted(self._cum, index, side="right") - 1)
        return self.parts[i], int(index) - int(self._cum[i])

    def example(self, index: int, rng: np.random.Generator | None = None,
                aug: Augmentation | None = None) -> dict[str, np.ndarray]:
        part, local = self._part(index)
        return part.example(local, rng, aug)
