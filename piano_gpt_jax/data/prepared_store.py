"""A prepared corpus on disk: one split's pieces as memory-mapped NumPy columns.

Why NumPy `.npy` files opened with `mmap_mode` (and not ArrayRecord or Arrow): records read a
window of consecutive notes or tokens at a computed offset, which a flat column answers with one
slice and no decoding; the page cache is shared by the trainer and every loader worker; a column
is appended to in one stream while preparing, so memory stays bounded; and the format needs no
library beyond NumPy. Measured on the 300 M-note benchmark (README "Large corpora"): 8.8 bytes
per note for the next-token store, against 40.4 for the hub-format Arrow dataset it came from.

Two kinds of store, by training stage:

* ``tokens`` (next_token_pretraining): ``ids``, ``offsets`` (piece i is tokens
  offsets[i]:offsets[i+1]), ``block_rank`` (non-NOTE_ON tokens before each records.TOKEN_BLOCK
  boundary: the index that finds window starts). Ids are packed two to three bytes while the
  vocabulary fits 12 bits (the piano vocabulary has 2,265 tokens): MAESTRO's 5.04 tokens per
  note take 7.6 bytes instead of 10.1 as uint16; larger vocabularies use uint16 or int32.
* ``notes`` (piano_task): ``pitch``/``velocity`` (uint8), ``start``/``end`` (float64, the exact
  times, so records equal those built in memory), ``offsets`` over notes.

Both hold ``piece_source`` (int32 per piece, into the manifest's small table of (dataset token,
composer token, composer key)) and ``manifest.json``, written last, with every file's size: a
store whose files disagree with it is damaged and never read. Indices that depend on a run's
settings (windows per piece for notes_per_record, window starts for a context size) are built on
first use and kept beside the columns as ``index-<name>.npy``, written atomically.

A store pickles as its path (loader workers re-open the maps), never as its arrays.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

FORMAT_VERSION = 2
KINDS = ("notes", "tokens")
MANIFEST = "manifest.json"
NOTE_DTYPES = {"pitch": np.uint8, "velocity": np.uint8, "start": np.float64, "end": np.float64}


class StoreDamaged(Exception):
    """A prepared store that must not be read; the message says what is wrong with it."""


def token_format(vocab_size: int) -> str:
    """How ids are stored: "u12" (packed), "uint16" or "int32"."""
    if vocab_size <= 1 << 12:
        return "u12"
    return "uint16" if vocab_size <= 1 << 16 else "int32"


def pack12(ids: np.ndarray) -> np.ndarray:
    """Pairs of 12-bit ids as 3 bytes each (an even number of ids)."""
    pairs = np.asarray(ids, np.uint16).reshape(-1, 2)
    out = np.empty((len(pairs), 3), np.uint8)
    out[:, 0] = pairs[:, 0] & 0xFF
    out[:, 1] = (pairs[:, 0] >> 8) | ((pairs[:, 1] & 0x0F) << 4)
    out[:, 2] = pairs[:, 1] >> 4
    return out.reshape(-1)


def unpack12(raw: np.ndarray) -> np.ndarray:
    triples = np.asarray(raw, np.uint8).reshape(-1, 3).astype(np.uint16)
    out = np.empty((len(triples), 2), np.uint16)
    out[:, 0] = triples[:, 0] | ((triples[:, 1] & 0x0F) << 8)
    out[:, 1] = (triples[:, 1] >> 4) | (triples[:, 2] << 4)
    return out.reshape(-1)


def read_ids(get: Callable[[int, int], np.ndarray], fmt: str, a: int, b: int) -> np.ndarray:
    """Token ids a:b of a column stored as `fmt`; `get(x, y)` returns its stored items x:y."""
    if fmt != "u12":
        return np.asarray(get(a, b))
    lo, hi = a - a % 2, b + b % 2
    return unpack12(get(3 * lo // 2, 3 * hi // 2))[a - lo: b - lo]


def write_npy_atomically(path: Path, array: np.ndarray) -> None:
    """np.save into a sibling temp file, then rename: readers see the whole file or none."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, array)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_manifest(path: Path) -> dict:
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        raise StoreDamaged(f"{path} has no {MANIFEST}") from None
    except (OSError, ValueError) as e:
        raise StoreDamaged(f"{path / MANIFEST} is unreadable ({e})") from None
    if manifest.get("format") != FORMAT_VERSION or manifest.get("kind") not in KINDS:
        raise StoreDamaged(f"{path} is a store of another format ({manifest.get('format')!r})")
    return manifest


def check_files(path: Path, manifest: dict) -> None:
    """Every column file present at the size the manifest recorded (a truncated or deleted
    file is found here, at start, instead of as wrong data later)."""
    for name, size in manifest["files"].items():
        file = path / name
        try:
            actual = file.stat().st_size
        except FileNotFoundError:
            raise StoreDamaged(f"{file} is missing") from None
        if actual != size:
            raise StoreDamaged(f"{file} has {actual:,} bytes, {size:,} expected")


class IndexColumn(np.memmap):
    """A mapped index that pickles as its path while it is the whole file (a record set sent to
    a loader worker would otherwise carry it: 1.6 MB at 300 M notes); slices pickle as data."""

    def __array_finalize__(self, obj) -> None:
        super().__array_finalize__(obj)
        self.whole_file = False

    def __reduce__(self):
        if self.whole_file:
            return load_index, (self.filename,)
        return np.asarray(self).__reduce__()


def load_index(file: Path) -> IndexColumn:
    column = np.load(file, mmap_mode="r").view(IndexColumn)
    column.whole_file = True
    return column


class PreparedStore:
    """The columns every store has; `open` picks the kind's class."""

    def __init__(self, path: Path, manifest: dict):
        self.path, self.manifest = Path(path), manifest
        self.offsets = self._map("offsets")
        self.piece_source = self._map("piece_source")
        self.source_table = [tuple(row) for row in manifest["source_table"]]

    @staticmethod
    def open(path: Path) -> PreparedStore:
        """The store at `path`, checked against its manifest (StoreDamaged if it is not whole)."""
        path = Path(path)
        manifest = read_manifest(path)
        check_files(path, manifest)
        cls = PreparedTokens if manifest["kind"] == "tokens" else PreparedNotes
        try:
            return cls(path, manifest)
        except ValueError as e:  # a column whose header NumPy cannot read
            raise StoreDamaged(f"{path}: {e}") from None

    def _map(self, column: str) -> np.ndarray:
        return np.load(self.path / f"{column}.npy", mmap_mode="r")

    def __getstate__(self) -> dict:  # workers get the path, not the maps
        return {"path": str(self.path), "manifest": self.manifest}

    def __setstate__(self, state: dict) -> None:
        self.__init__(Path(state["path"]), state["manifest"])

    @property
    def n_pieces(self) -> int:
        return int(self.manifest["n_pieces"])

    @property
    def n_notes(self) -> int:
        return int(self.manifest["n_notes"])

    @property
    def dropped_notes(self) -> int:
        return int(self.manifest["dropped_notes"])

    @property
    def skipped_records(self) -> int:
        return int(self.manifest["skipped_records"])

    @property
    def n_bytes(self) -> int:
        return int(sum(self.manifest["files"].values()))

    def cached_index(self, name: str, build: Callable[[], np.ndarray]) -> np.ndarray:
        """Index `name` from disk, built and written (atomically) on first use. Processes that
        build it at once write the same bytes; the last rename wins."""
        file = self.path / f"index-{name}.npy"
        try:
            return load_index(file)
        except (FileNotFoundError, ValueError, OSError):
            pass
        array = np.ascontiguousarray(build())
        try:
            write_npy_atomically(file, array)
        except OSError:  # a read-only shared store: use it from memory this time
            return array
        return load_index(file)


class PreparedNotes(PreparedStore):
    """Note columns of the piano_task stage (the interface of records.PieceStore)."""

    def __init__(self, path: Path, manifest: dict):
        super().__init__(path, manifest)
        self.columns = {c: self._map(c) for c in NOTE_DTYPES}

    def piece(self, i: int, lo: int = 0, hi: int | None = None) -> dict[str, np.ndarray]:
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        sl = slice(a + lo, b if hi is None else a + hi)
        return {"pitch": self.columns["pitch"][sl].astype(np.int64),
                "velocity": self.columns["velocity"][sl].astype(np.int64),
                "start": np.array(self.columns["start"][sl]),
                "end": np.array(self.columns["end"][sl])}


class PreparedTokens(PreparedStore):
    """Token ids of the next-token stage (the interface of records.TokenStore)."""

    def __init__(self, path: Path, manifest: dict):
        super().__init__(path, manifest)
        self.ids = self._map("ids")  # as stored (packed bytes for "u12"): read through read()
        self.format = manifest["token_format"]
        self.block_rank = self._map("block_rank")

    @property
    def n_tokens(self) -> int:
        return int(self.manifest["n_tokens"])

    def read(self, a: int, b: int) -> np.ndarray:
        return read_ids(lambda x, y: self.ids[x:y], self.format, a, b)

    def scan(self, a: int, b: int) -> np.ndarray:
        return scan_ids(self.path / "ids.npy", self.format, a, b)


def scan_ids(file: Path, fmt: str, a: int, b: int) -> np.ndarray:
    """Token ids a:b of an ids column read into private memory, for whole-corpus passes (the
    preparation's block ranks, a new context size's window counts): a pass through the map
    would leave every page of the file in this process's resident set."""
    return read_ids(lambda x, y: read_column(file, x, y), fmt, a, b)


def read_column(file: Path, a: int, b: int) -> np.ndarray:
    """Rows a:b of a 1-d .npy column, read (not mapped)."""
    with open(file, "rb") as f:
        major, _ = np.lib.format.read_magic(f)
        read_header = (np.lib.format.read_array_header_1_0 if major == 1
                       else np.lib.format.read_array_header_2_0)
        (n_rows,), _, dtype = read_header(f)
        a, b = min(a, n_rows), min(b, n_rows)
        f.seek(a * dtype.itemsize, os.SEEK_CUR)
        return np.fromfile(f, dtype=dtype, count=max(b - a, 0))


def describe(store: PreparedStore) -> str:
    """'12 pieces, 94,211 notes, 470,112 tokens, 0.9 MB': a store's size in one phrase."""
    parts = [f"{store.n_pieces:,} pieces", f"{store.n_notes:,} notes"]
    if isinstance(store, PreparedTokens):
        parts.append(f"{store.n_tokens:,} tokens")
    parts.append(f"{store.n_bytes / 1e6:,.1f} MB")
    return ", ".join(parts)
