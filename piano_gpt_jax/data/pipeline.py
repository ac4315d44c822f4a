"""The data edge of training: settings in, tokenizer and batch iterators out.

Training reads the train splits of `extra_datasets` (or of the base dataset when none are given);
validation reads the base dataset's validation split as `full_val` plus one split per reference
composer (bach, chopin, mozart) that is present. Evaluation batches are a fixed, seeded subset of
the validation records, identical on every call, so validation losses are comparable over time
(the reference resampled them on every evaluation).

Every split is read from its prepared store (data/prepare.py): prepared on first use, mapped from
disk afterwards, so start-up and each loader worker cost the same whatever the corpus size.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path
from typing import Any

import datasets
import numpy as np

from piano_gpt_jax.config import TokenizerSection
from piano_gpt_jax.data import loader
from piano_gpt_jax.data.preparation import PrepareError, default_root, ensure_store, store_kind
from piano_gpt_jax.data.prepared_store import describe
from piano_gpt_jax.data.records import ConcatRecords, NextTokenRecords, PianoTaskRecords
from piano_gpt_jax.data.settings import DataSettings
from piano_gpt_jax.data.sources import load_piano_dataset
from piano_gpt_jax.music import layouts
from piano_gpt_jax.music.layouts import (
    ANNOTATED,
    EOGENAI,
    GENAI,
    detect_prompt_layout,
    layout_prefix_tokens,
)
from piano_gpt_jax.music.tasks import resolve_tasks, task_special_tokens
from piano_gpt_jax.music.tokenizer import ExponentialTimeTokenizer

COMPOSER_SPLITS = ("bach", "chopin", "mozart")
REFERENCE_MAX_N_NOTES = 168  # the reference's <N_NOTES_k> range; keeps its vocabulary layout
EVAL_SEED = 1337
DEFAULT_TOKENIZER_CONFIG = dataclasses.asdict(TokenizerSection())


def _max_n_notes(settings: DataSettings) -> int:
    return max(settings.notes_per_record, REFERENCE_MAX_N_NOTES)


def resolve_prompt_layout(
    settings: DataSettings, tokenizer: ExponentialTimeTokenizer, fresh: bool = False
) -> str:
    """The prompt layout of these settings with this tokenizer.

    An explicit data.prompt_layout wins. "auto" means annotated for a fresh vocabulary, and for
    a checkpoint's vocabulary whatever it was made for (layouts.detect_prompt_layout): a
    reference f37ac14 checkpoint (no <MUSIC_TIME_0>, no room for the MusicManager tokens) can
    only be fine-tuned on the plain layout it was trained on.
    """
    if settings.prompt_layout != "auto":
        return settings.prompt_layout
    if fresh:
        return ANNOTATED
    return detect_prompt_layout(tokenizer, _max_n_notes(settings))


def required_special_tokens(settings: DataSettings, layout: str = ANNOTATED) -> list[str]:
    """Special tokens the records of these settings use, in the order a fresh vocab gets them."""
    tokens = layout_prefix_tokens(layout, _max_n_notes(settings))
    if settings.stage == "piano_task":
        tokens += task_special_tokens(resolve_tasks(settings.tasks)) + [GENAI]
        if layout == ANNOTATED:
            tokens.append(EOGENAI)
    return tokens


def _describe_tokens(tokens: list[str], settings: DataSettings) -> str:
    """'169 <N_NOTES_*>, 1201 <MUSIC_TIME_*>, <EOGENAI>': a token list by role, short enough
    for an error message."""
    roles = {t: "dataset" for t in layouts.DATASET_TOKENS}
    roles.update({t: "composer" for t in layouts.COMPOSER_TOKENS})
    if settings.stage == "piano_task":
        roles.update({t: "task" for t in task_special_tokens(resolve_tasks(settings.tasks))})
    groups: dict[str, int] = {}
    for t in tokens:
        head, sep, tail = t.rpartition("_")
        if t in roles:
            key = f"{roles[t]} tokens"
        elif sep and tail.rstrip(">").isdigit():
            key = f"{head}_*>"
        else:
            key = t
        groups[key] = groups.get(key, 0) + 1
    return ", ".join(k if n == 1 and k.startswith("<") else f"{n} {k}" for k, n in groups.items())


def build_tokenizer(
    settings: DataSettings, tokenizer_desc: dict | None = None
) -> ExponentialTimeTokenizer:
    """From the checkpoint's desc when given (ids kept), else fresh from the config; then the
    special tokens the prompt layout needs and the vocab lacks take the next placeholder slots
    (f37ac14: dataset/composer, task tokens, <GENAI>; head: also N_NOTES, MUSIC_TIME, <EOGENAI>).
    When they do not fit, one error says how many slots are free and what would need them,
    instead of failing on whichever token happened to overflow."""
    fresh = tokenizer_desc is None
    if fresh:
        tok = ExponentialTimeTokenizer.build(settings.tokenizer_config)
    else:
        tok = ExponentialTimeTokenizer.from_dict(tokenizer_desc)
    layout = resolve_prompt_layout(settings, tok, fresh)
    needed = required_special_tokens(settings, layout)
    missing = list(dict.fromkeys(t for t in needed if t not in tok.token_to_id))
    free = tok.free_special_slots
    if len(missing) > free:
        n_special = tok.tokenizer_config.get("n_special_ids")
        where = (
            f"a fresh tokenizer with n_special_ids={n_special}" if fresh
            else f"the checkpoint's tokenizer (vocab_size {tok.vocab_size}, n_special_ids "
                 f"{n_special})"
        )
        if fresh:
            fix = "raise tokenizer.n_special_ids" + (
                " (or set data.prompt_layout='plain', which needs no N_NOTES/MUSIC_TIME "
                "tokens)" if layout == ANNOTATED else "")
        elif layout == ANNOTATED and "<MUSIC_TIME_0>" not in tok.token_to_id:
            fix = ("this looks like a reference f37ac14 checkpoint: use data.prompt_layout="
                   "'plain' (or 'auto'), or fewer tasks")
        else:
            fix = "use fewer tasks, or a checkpoint whose tokenizer has more free slots"
        raise ValueError(
            f"{where} has {free} free special-token slots, but the {layout!r} prompt layout "
            f"(stage={settings.stage!r}, tasks={settings.tasks!r}) needs {len(missing)} new "
            f"tokens: {_describe_tokens(missing, settings)}. To fix: {fix}."
        )
    tok.add_special_tokens(missing)
    return tok


def _load_dataset(name: str, required_splits: tuple[str, ...]):
    return load_piano_dataset(name, required_splits=required_splits)


def _train_splits(settings: DataSettings, base) -> list[tuple[str, datasets.Dataset]]:
    """(dataset name, train split) of every training dataset, in order."""
    names = list(settings.extra_datasets)
    if not names:
        if "train" not in base:
            raise ValueError(
                f"dataset {settings.base_dataset_name!r} has no train split; give "
                "dataset.extra_datasets with train data"
            )
        return [(settings.base_dataset_name, base["train"])]
    splits = []
    for name in names:
        dd = base if name == settings.base_dataset_name else _load_dataset(name, ("train",))
        if "train" not in dd:
            raise ValueError(f"dataset {name!r} (in dataset.extra_datasets) has no train split")
        splits.append((name, dd["train"]))
    return splits


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class DataPipeline:
    def __init__(self, settings: DataSettings, tokenizer: ExponentialTimeTokenizer,
                 log=_log, progress: bool = True):
        self.settings = settings
        self.tokenizer = tokenizer
        s = settings
        self.prompt_layout = resolve_prompt_layout(s, tokenizer)
        needed = required_special_tokens(s, self.prompt_layout)
        missing = [t for t in needed if t not in tokenizer.token_to_id]
        if missing:
            raise ValueError(
                f"tokenizer lacks {len(missing)} special tokens these settings need for the "
                f"{self.prompt_layout!r} prompt layout (e.g. {missing[:3]}); build it with "
                "data.pipeline.build_tokenizer"
            )
        self.tasks = resolve_tasks(s.tasks) if s.stage == "piano_task" else []
        self._log, self._progress = log, progress
        base = _load_dataset(s.base_dataset_name, ("validation",))
        train = _train_splits(s, base)
        self.train_stores = [(name, self._store(split, name, "train")) for name, split in train]
        parts = [self._records(store) for _, store in self.train_stores]
        self.train_records = parts[0] if len(parts) == 1 else ConcatRecords(parts)
        if len(self.train_records) == 0:
            train_name = ", ".join(name for name, _ in train)
            raise ValueError(self._empty_message(f"train data of {train_name!r}",
                                                 [st for _, st in self.train_stores]))
        if "validation" not in base or len(base["validation"]) == 0:
            raise ValueError(
                f"dataset {s.base_dataset_name!r} has no (or an empty) validation split; "
                "give dataset.base_dataset_name a dataset with a validation split"
            )
        self.val_store = self._store(base["validation"], s.base_dataset_name, "validation")
        self.eval_records: dict[str, Any] = {"full_val": self._records(self.val_store)}
        if len(self.eval_records["full_val"]) == 0:
            raise ValueError(self._empty_message(
                f"validation split of {s.base_dataset_name!r}", [self.val_store]))
        table = self.val_store.source_table
        for composer in COMPOSER_SPLITS:
            keys = [i for i, key in enumerate(table) if key[2] == composer]
            ids = np.flatnonzero(np.isin(self.val_store.piece_source, keys))
            if len(ids):
                recs = self._records(self.val_store, ids)
                if len(recs):
                    self.eval_records[composer] = recs
        if s.eval_splits != "auto":
            wanted = [s.eval_splits] if isinstance(s.eval_splits, str) else list(s.eval_splits)
            unknown = [w for w in wanted if w not in self.eval_records]
            if unknown:
                raise ValueError(
                    f"eval_splits {unknown} do not exist for {s.base_dataset_name!r}; "
                    f"available: {list(self.eval_records)}"
                )
            self.eval_records = {w: self.eval_records[w] for w in wanted}
        self._eval_cache: dict[tuple[str, int], list] = {}

    def _store(self, split, name: str, split_name: str):
        """The split's prepared store (prepared here on first use)."""
        s = self.settings
        kind = store_kind(s.stage)
        root = Path(s.prepared_dir).expanduser() if s.prepared_dir else default_root()
        try:
            store = ensure_store(split, name, split_name, kind, s.pause_detection_threshold,
                                 self.tokenizer if kind == "tokens" else None, root,
                                 workers=os.cpu_count(), log=self._log, progress=self._progress)
        except PrepareError as e:
            raise ValueError(str(e)) from None
        self._log(f"data: {name} {split_name}: {describe(store)} ({store.path.name})")
        return store

    def prepared_stores(self) -> list[tuple[str, Any]]:
        """(label, store) of every store this pipeline reads."""
        return [(f"{Path(name).name} train", st) for name, st in self.train_stores] + [
            (f"{Path(self.settings.base_dataset_name).name} validation", self.val_store)]

    def _records(self, store, pieces=None):
        s = self.settings
        if s.stage == "piano_task":
            return PianoTaskRecords(
                store, self.tokenizer, self.tasks, s.notes_per_record, s.context_size,
                s.loss_masking, s.use_time_steps, self.prompt_layout, pieces,
            )
        return NextTokenRecords(store, self.tokenizer, s.context_size, s.use_time_steps, pieces)

    def _empty_message(self, what: str, stores: list) -> str:
        s = self.settings
        need = (
            f"pieces of at least notes_per_record={s.notes_per_record} notes"
            if s.stage == "piano_task"
            else "pieces of at least 2 notes"
        )
        pieces_ = sum(st.n_pieces for st in stores)
        notes = sum(st.n_notes for st in stores)
        skipped = sum(st.skipped_records for st in stores)
        dropped = sum(st.dropped_notes for st in stores)
        return (
            f"no usable records in the {what}: {pieces_} pieces, {notes} notes "
            f"(after splitting on pauses > {s.pause_detection_threshold} s; "
            f"{skipped} records skipped, {dropped} bad notes dropped); "
            f"{s.stage} needs {need}. Lower data.notes_per_record, raise "
            "dataset.pause_detection_threshold, or point the dataset names at more data."
        )

    # ------------------------------------------------------------------ training
    def train_iterator(self):
        s = self.settings
        ds = loader.train_dataset(
            self.train_records,
            seed=s.seed,
            batch_size=s.host_batch_size,
            shard_index=s.shard_index,
            shard_count=s.shard_count,
            augmentation=s.augmentation,
        )
        return loader.make_iterator(ds, s.data_workers)

    # ------------------------------------------------------------------ evaluation
    @property
    def eval_split_names(self) -> list[str]:
        return list(self.eval_records)

    def _records_for(self, split: str):
        if split not in self.eval_records:
            raise ValueError(f"unknown eval split {split!r}; available: {self.eval_split_names}")
        return self.eval_records[split]

    def _eval_indices(self, n_records: int, count: int, salt: int) -> np.ndarray:
        rng = np.random.default_rng([EVAL_SEED, salt])
        if count <= n_records:
            return rng.choice(n_records, size=count, replace=False)
        return rng.permutation(np.resize(np.arange(n_records), count))

    def eval_batches(self, split: str, n_batches: int) -> list[dict[str, np.ndarray]]:
        """The same `n_batches` host batches of `split` on every call (no augmentation)."""
        key = (split, int(n_batches))
        if key not in self._eval_cache:
            recs = self._records_for(split)
            s = self.settings
            bs = s.host_batch_size
            idx = self._eval_indices(len(recs), n_batches * bs * s.shard_count, 0)
            idx = idx.reshape(n_batches, s.shard_count, bs)[:, s.shard_index]
            self._eval_cache[key] = [
                loader.stack_examples([recs.example(int(i)) for i in row]) for row in idx
            ]
        return self._eval_cache[key]

    def eval_examples(self, split: str, n: int) -> list[dict[str, Any]]:
        """Prompts and targets for generation-based evaluation (piano_task stage; [] otherwise).

        prompt_ids end with <GENAI> and follow the pipeline's prompt layout; target_ids are the
        target's note tokens (no <EOGENAI>)."""
        recs = self._records_for(split)
        if not isinstance(recs, PianoTaskRecords):
            return []
        out = []
        for i in self._eval_indices(len(recs), int(n), 1):
            task, prompt, target = recs.parts(int(i))
            out.append(
                {
                    "task": task,
                    "prompt_ids": prompt,
                    "target_ids": target,
                    "prompt_time_steps": self.tokenizer.time_steps(prompt),
                }
            )
        return out

    def summary(self) -> dict[str, Any]:
        stores = [st for _, st in self.train_stores]
        return {
            "prompt_layout": self.prompt_layout,
            "train_pieces": sum(st.n_pieces for st in stores),
            "train_notes": sum(st.n_notes for st in stores),
            "train_records": len(self.train_records),
            **{f"{k}_records": len(v) for k, v in self.eval_records.items()},
        }


def make_pipeline(settings: DataSettings, tokenizer: ExponentialTimeTokenizer,
                  progress: bool = True) -> DataPipeline:
    """The pipeline of `settings`; `progress` shows a bar while a corpus is prepared."""
    return DataPipeline(settings, tokenizer, progress=progress)
