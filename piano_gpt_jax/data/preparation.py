"""Prepare a corpus once: clean, pause-split (and tokenize) every split, write it to disk.

The pipeline calls ensure_store for every split it reads: prepared on first use (or ahead of
time by `python -m piano_gpt_jax.data.prepare`), mapped from disk afterwards; later starts,
resumes and loader workers only map the files (prepared_store.py), whatever the corpus size.

A store is keyed by a fingerprint of everything that changes its content: the dataset's files
(path, size, modification time; for a hub dataset its cache files, whose path holds the
revision), the split, the pause threshold, the store kind (stage) and, for token stores, the ids
of the tokenizer's music tokens. Settings that change only how records are cut (context size,
notes per record, tasks, prompt layout) share a store and get their own small index in it.

Preparation streams: rows are cut into shards of about NOTES_PER_SHARD notes, each cleaned and
written by one of the worker processes (every core), then the shards are appended column by
column into the store; memory stays bounded by a few shards, whatever the corpus. Finished shards
survive an interruption (kill, full disk) and the next run continues from them; the store itself
appears by one rename, after its manifest, so a half-written store is never read. One process
prepares a store at a time (a lock file beside it); others wait, then read it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import hashlib
import json
import multiprocessing
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow.compute as pc
from tqdm import tqdm

from piano_gpt_jax.data import prepared_store as ps
from piano_gpt_jax.data.piano_dataset import default_cache_root
from piano_gpt_jax.data.records import PieceStore, block_ranks, tokenize_pieces
from piano_gpt_jax.music.tokenizer import ExponentialTimeTokenizer

# ~1 M notes per shard: a worker holds ~100 MB while cleaning one, and a 300 M-note corpus is
# 300 shards, enough to keep every core busy and to lose little work to an interruption.
NOTES_PER_SHARD = 1_000_000
SHARD_STATS = "stats.json"


class PrepareError(Exception):
    """Preparation could not finish; one line saying why and what to do."""


def store_kind(stage: str) -> str:
    return "tokens" if stage == "next_token_pretraining" else "notes"


def default_root() -> Path:
    """$PIANO_GPT_JAX_PREPARED, else the cache root's prepared/ (dataset.prepared_dir wins)."""
    override = os.environ.get("PIANO_GPT_JAX_PREPARED")
    return Path(override).expanduser() if override else default_cache_root() / "prepared"


# ------------------------------------------------------------------ fingerprints


def _split_files(split: datasets.Dataset) -> list[str] | None:
    """The Arrow files holding exactly this split's rows in order, or None (an in-memory split,
    or one behind an indices mapping): then its rows are read in this process."""
    files = [f["filename"] for f in split.cache_files]
    if not files or split._indices is not None:
        return None
    if sum(_arrow_file(f).num_rows for f in files) != len(split):
        return None
    return files


def dataset_identity(split: datasets.Dataset) -> dict[str, Any]:
    """What identifies the rows of a split without reading them: its files' paths, sizes and
    modification times (a hub dataset's cache path holds its revision), else the fingerprint
    `datasets` gave it."""
    files = _split_files(split)
    if files is None:
        return {"fingerprint": split._fingerprint, "rows": len(split)}
    stats = [os.stat(f) for f in files]
    return {"files": [[os.path.realpath(f), s.st_size, s.st_mtime_ns]
                      for f, s in zip(files, stats, strict=True)], "rows": len(split)}


def tokenizer_identity(tokenizer: ExponentialTimeTokenizer) -> str:
    """The ids of the music tokens: all a token store depends on (special tokens are added per
    run and looked up from the source table at read time)."""
    music = tokenizer.music_token_mask()
    pairs = [[i, t] for i, t in enumerate(tokenizer.vocab) if music[i]]
    return hashlib.sha256(json.dumps(pairs).encode()).hexdigest()[:16]


def fingerprint(split: datasets.Dataset, kind: str, pause_threshold: float | None,
                tokenizer: ExponentialTimeTokenizer | None) -> str:
    inputs = {"format": ps.FORMAT_VERSION, "kind": kind, "data": dataset_identity(split),
              "pause_threshold": pause_threshold,
              "tokenizer": tokenizer_identity(tokenizer) if kind == "tokens" else None}
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def store_path(root: Path, dataset_name: str, split_name: str, kind: str, fp: str) -> Path:
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(dataset_name.rstrip("/")).name or "dataset")
    return Path(root) / f"{slug[:60]}.{split_name}.{kind}-{fp}"


# ------------------------------------------------------------------ shards


@dataclass(frozen=True)
class Chunk:
    """Rows lo:hi of one Arrow file of the split (file None: of the split itself)."""

    index: int
    file: str | None
    lo: int
    hi: int
    n_notes: int

    @property
    def name(self) -> str:
        return f"shard-{self.index:06d}-{self.lo}-{self.hi}"


@functools.lru_cache(maxsize=8)
def _arrow_file(path: str) -> datasets.Dataset:
    return datasets.Dataset.from_file(path)


def _row_note_counts(table) -> np.ndarray:
    """Notes per row, from the list offsets alone (no note is read)."""
    column = table.column("notes")
    parts = [pc.fill_null(pc.list_value_length(chunk.field("pitch")), 0).to_numpy(
        zero_copy_only=False) for chunk in column.chunks]
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


def plan_chunks(split: datasets.Dataset, notes_per_shard: int) -> list[Chunk]:
    """Consecutive row ranges of about notes_per_shard notes, in the split's row order."""
    files = _split_files(split)
    if files is not None:
        sources = [(f, _arrow_file(f).data.table) for f in files]
    else:
        sources = [(None, split.with_format("arrow")[:])]
    chunks: list[Chunk] = []
    for file, table in sources:
        counts = _row_note_counts(table)
        lo, acc = 0, 0
        for row, n in enumerate(counts):
            acc += int(n)
            if acc >= notes_per_shard:
                chunks.append(Chunk(len(chunks), file, lo, row + 1, acc))
                lo, acc = row + 1, 0
        if lo < len(counts):
            chunks.append(Chunk(len(chunks), file, lo, len(counts), acc))
    return chunks


@dataclass(frozen=True)
class _ShardJob:
    chunk: Chunk
    out_dir: str
    kind: str
    pause_threshold: float | None
    tokenizer_desc: dict | None
    token_dtype: str
    table: Any = None  # the rows themselves when the split has no files to read them from


@functools.lru_cache(maxsize=2)
def _tokenizer(desc_json: str) -> ExponentialTimeTokenizer:
    return ExponentialTimeTokenizer.from_dict(json.loads(desc_json))


def prepare_shard(job: _ShardJob) -> dict:
    """Clean and pause-split one chunk of rows (and tokenize it), write its columns into its
    shard folder; the folder appears by rename once complete. Runs in a worker process."""
    c = job.chunk
    if job.table is not None:
        table = job.table
    else:  # mapped for this shard only: a map kept open would keep every page read resident
        table = datasets.Dataset.from_file(c.file).data.table.slice(c.lo, c.hi - c.lo)
    store = PieceStore.from_table(table, job.pause_threshold)
    del table
    final = Path(job.out_dir) / c.name
    tmp = final.with_name(f".{c.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if job.kind == "tokens":
            tok = _tokenizer(json.dumps(job.tokenizer_desc))
            ids, offsets = tokenize_pieces(store, tok)
            np.save(tmp / "ids.npy", ids.astype(job.token_dtype))
            n_tokens = len(ids)
        else:
            for column, dtype in ps.NOTE_DTYPES.items():
                np.save(tmp / f"{column}.npy", getattr(store, column).astype(dtype))
            offsets, n_tokens = store.offsets, 0
        np.save(tmp / "lengths.npy", np.diff(offsets).astype(np.int64))
        np.save(tmp / "piece_source.npy", store.piece_source.astype(np.int32))
        stats = {"rows": c.hi - c.lo, "n_pieces": store.n_pieces, "n_notes": store.n_notes,
                 "n_tokens": int(n_tokens), "dropped_notes": int(store.dropped_notes),
                 "skipped_records": int(store.skipped_records),
                 "source_table": [list(k) for k in store.source_table]}
        (tmp / SHARD_STATS).write_text(json.dumps(stats))
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return stats


def _run_jobs(jobs: list[_ShardJob], workers: int) -> Iterator[dict]:
    """Shard results in order; several jobs go to a pool of spawned processes (the trainer's
    process has XLA threads: never fork it)."""
    if workers <= 1 or len(jobs) <= 1 or any(j.table is not None for j in jobs):
        for job in jobs:
            yield prepare_shard(job)
        return
    with multiprocessing.get_context("spawn").Pool(min(workers, len(jobs))) as pool:
        yield from pool.imap(prepare_shard, jobs)


# ------------------------------------------------------------------ merge


def _write_column(path: Path, dtype: Any, total: int, parts: Iterable[np.ndarray]) -> None:
    """A 1-d .npy of `total` rows written part by part (never the whole column in memory)."""
    dtype = np.dtype(dtype)
    written = 0
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(
            f, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
                "shape": (total,)})
        for part in parts:
            part = np.ascontiguousarray(part, dtype)
            part.tofile(f)
            written += len(part)
    if written != total:
        raise RuntimeError(f"{path}: wrote {written} rows, expected {total}")


def _packed(parts: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
    """The ids of all shards as one packed stream (an odd id waits for the next shard)."""
    carry = np.zeros(0, np.uint16)
    for part in parts:
        ids = np.concatenate([carry, np.asarray(part, np.uint16)])
        even = len(ids) - len(ids) % 2
        yield ps.pack12(ids[:even])
        carry = ids[even:]
    if len(carry):
        yield ps.pack12(np.concatenate([carry, np.zeros(1, np.uint16)]))


def _merge(partial: Path, chunks: list[Chunk], stats: list[dict], kind: str,
           token_format: str, is_note_on: Callable | None, meta: dict) -> Path:
    out = partial / "store"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    shards = [partial / c.name for c in chunks]
    table: dict[tuple, int] = {}
    remaps = []
    for st in stats:
        remaps.append(np.asarray([table.setdefault(tuple(k), len(table))
                                  for k in st["source_table"]] or [0], np.int32))
    n_pieces = sum(s["n_pieces"] for s in stats)
    n_tokens = sum(s["n_tokens"] for s in stats)
    n_notes = sum(s["n_notes"] for s in stats)

    def offsets() -> Iterator[np.ndarray]:
        base = 0
        yield np.zeros(1, np.int64)
        for shard in shards:
            lengths = np.load(shard / "lengths.npy")
            yield base + np.cumsum(lengths)
            base += int(lengths.sum())

    _write_column(out / "offsets.npy", np.int64, n_pieces + 1, offsets())
    _write_column(out / "piece_source.npy", np.int32, n_pieces,
                  (remap[np.load(s / "piece_source.npy")] for s, remap in zip(shards, remaps,
                                                                              strict=True)))
    if kind == "tokens":
        ids = (np.load(s / "ids.npy") for s in shards)
        if token_format == "u12":
            _write_column(out / "ids.npy", np.uint8, 3 * ((n_tokens + 1) // 2), _packed(ids))
        else:
            _write_column(out / "ids.npy", token_format, n_tokens, ids)
        ranks = block_ranks(lambda a, b: ps.scan_ids(out / "ids.npy", token_format, a, b),
                            n_tokens, is_note_on)
        np.save(out / "block_rank.npy", ranks)
    else:
        for column, dtype in ps.NOTE_DTYPES.items():
            _write_column(out / f"{column}.npy", dtype, n_notes,
                          (np.load(s / f"{column}.npy") for s in shards))
    manifest = {
        **meta, "format": ps.FORMAT_VERSION, "kind": kind,
        "n_rows": sum(s["rows"] for s in stats), "n_pieces": n_pieces, "n_notes": n_notes,
        "n_tokens": n_tokens, "dropped_notes": sum(s["dropped_notes"] for s in stats),
        "skipped_records": sum(s["skipped_records"] for s in stats),
        "source_table": [list(k) for k in table], "token_format": token_format,
        "files": {f.name: f.stat().st_size for f in sorted(out.iterdir())},
    }
    tmp = out / f".{ps.MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, out / ps.MANIFEST)
    return out


# ------------------------------------------------------------------ one store


@contextlib.contextmanager
def _locked(path: Path, log: Callable[[str], None]) -> Iterator[None]:
    """One preparer per store: others wait here, then find the store made."""
    lock = path.with_name(path.name + ".lock")
    with open(lock, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for another process preparing {path.name}")
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError:  # a file system without locks: the final rename still decides
            pass
        yield


def _disk_full(e: OSError) -> bool:
    return e.errno in (errno.ENOSPC, errno.EDQUOT)


def prepare_store(split: datasets.Dataset, path: Path, kind: str,
                  pause_threshold: float | None, tokenizer: ExponentialTimeTokenizer | None,
                  meta: dict, workers: int | None = None,
                  notes_per_shard: int = NOTES_PER_SHARD, progress: bool = True) -> Path:
    """Write the store of `split` at `path` (see the module docstring); returns `path`."""
    workers = workers or os.cpu_count() or 1
    partial = path.with_name(path.name + ".partial")
    partial.mkdir(parents=True, exist_ok=True)
    for stale in partial.glob(".shard-*"):  # a shard a killed worker was writing
        shutil.rmtree(stale, ignore_errors=True)
    started = time.perf_counter()
    chunks = plan_chunks(split, notes_per_shard)
    fmt = ps.token_format(tokenizer.vocab_size) if tokenizer is not None else "int32"
    dtype = np.dtype(np.int32 if fmt == "int32" else np.uint16)  # in shards
    in_memory = bool(chunks) and chunks[0].file is None
    arrow = split.with_format("arrow") if in_memory else None
    jobs = []
    for c in chunks:
        if (partial / c.name / SHARD_STATS).is_file():
            continue
        jobs.append(_ShardJob(c, str(partial), kind, pause_threshold,
                              tokenizer.to_dict() if tokenizer is not None else None, dtype.str,
                              arrow[c.lo:c.hi] if in_memory else None))
    total = sum(c.n_notes for c in chunks)
    done = total - sum(j.chunk.n_notes for j in jobs)
    bar = tqdm(total=total, initial=done, unit=" notes", unit_scale=True, disable=not progress,
               desc=f"preparing {path.name}", file=sys.stderr, mininterval=2.0, smoothing=0.1)
    with bar:
        for job, _ in zip(jobs, _run_jobs(jobs, workers), strict=False):
            bar.update(job.chunk.n_notes)
    stats = [json.loads((partial / c.name / SHARD_STATS).read_text()) for c in chunks]
    out = _merge(partial, chunks, stats, kind, fmt,
                 tokenizer.is_note_on if tokenizer is not None else None,
                 {**meta, "prepare_seconds": round(time.perf_counter() - started, 1)})
    try:
        os.replace(out, path)
    except OSError:  # another host finished the same store first: keep theirs (same bytes)
        if not (path / ps.MANIFEST).is_file():
            raise
    shutil.rmtree(partial, ignore_errors=True)
    return path


def ensure_store(split: datasets.Dataset, dataset_name: str, split_name: str, kind: str,
                 pause_threshold: float | None, tokenizer: ExponentialTimeTokenizer | None,
                 root: Path | None = None, workers: int | None = None,
                 log: Callable[[str], None] = print, progress: bool = True,
                 notes_per_shard: int = NOTES_PER_SHARD) -> ps.PreparedStore:
    """The prepared store of `split`: opened when it exists and is whole, else prepared (a
    damaged one is said in one line and prepared again)."""
    root = Path(root) if root else default_root()
    fp = fingerprint(split, kind, pause_threshold, tokenizer)
    path = store_path(root, dataset_name, split_name, kind, fp)
    what = f"{dataset_name!r} {split_name}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        for attempt in range(2):
            try:
                return ps.PreparedStore.open(path)
            except ps.StoreDamaged as e:
                if path.exists():
                    log(f"prepared store of {what} is damaged ({e}); preparing it again")
                    shutil.rmtree(path, ignore_errors=True)
            if attempt:
                break
            with _locked(path, log):
                if (path / ps.MANIFEST).is_file():  # made while we waited
                    continue
                log(f"preparing {what} ({kind}) once into {path}")
                prepare_store(split, path, kind, pause_threshold, tokenizer,
                              {"dataset": dataset_name, "split": split_name, "fingerprint": fp},
                              workers, notes_per_shard, progress)
        return ps.PreparedStore.open(path)
    except ps.StoreDamaged as e:
        raise PrepareError(f"the store prepared for {what} cannot be read: {e}") from None
    except OSError as e:
        if _disk_full(e):
            raise PrepareError(
                f"no space left on the disk of {root} while preparing {what}: free space (or "
                "set dataset.prepared_dir to a larger disk) and start again; the finished "
                "shards are kept and preparation continues from them") from None
        raise PrepareError(f"cannot prepare {what} in {root}: {e.strerror or e} "
                           f"({e.filename or root}); set dataset.prepared_dir to a writable "
                           "folder") from None
