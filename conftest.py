"""Shared pytest fixtures: where the read-only reference material lives."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# Tests run on CPU; keep JAX from grabbing an accelerator or preallocating memory by surprise.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Many tests start the trainer (in this process or a subprocess, which inherits this): compiled
# steps come from a persistent cache instead of being compiled again each time.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      str(Path(tempfile.gettempdir()) / "piano-gpt-jax-test-xla-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# glibc's default allocator: the kept-memory setting (piano_gpt_jax/host_memory.py) speeds up each
# train step but makes XLA's multi-threaded compilation ~25% slower (one malloc arena), and the
# suite compiles hundreds of small programs and runs few steps of each. host_memory_test.py checks
# the setting itself in subprocesses that clear this variable.
os.environ.setdefault("PIANO_GPT_JAX_MALLOC", "default")
# Prepared corpora (data/prepare.py) of this session's temporary datasets go to a temporary
# folder, not the user's cache; subprocesses (trainer runs) inherit it.
os.environ.setdefault("PIANO_GPT_JAX_PREPARED", tempfile.mkdtemp(prefix="piano-gpt-jax-prepared-"))

REPO_ROOT = Path(__file__).resolve().parent
SHARED_DIR = Path(os.environ.get("PIANO_GPT_SHARED", REPO_ROOT.parent / "shared"))
MAESTRO_DIR = SHARED_DIR / "data" / "maestro"
UPSTREAM_DIR = SHARED_DIR / "reference" / "upstream-checkpoint"
# Set to 1 to turn a missing ../shared into skips (a partial run on a machine without it). CI never
# sets it: there a missing ../shared must fail, or a green run would prove nothing about real data.
SHARED_OPT_OUT = "PIANO_GPT_ALLOW_MISSING_SHARED"


def require_shared(path: Path, what: str) -> Path:
    """`path` when it exists; otherwise the test fails naming the path (skips under the opt-out)."""
    if path.exists():
        return path
    message = (f"{what} not found at {path}: the tests read the read-only reference material in "
               f"../shared (or $PIANO_GPT_SHARED). Provide it; only to run without it on purpose, "
               f"set {SHARED_OPT_OUT}=1 (those tests are then skipped).")
    if os.environ.get(SHARED_OPT_OUT) == "1":
        pytest.skip(message)
    pytest.fail(message, pytrace=False)


def pytest_report_header(config) -> str:
    state = "found" if MAESTRO_DIR.is_dir() and UPSTREAM_DIR.is_dir() else "MISSING"
    opt_out = f"; {SHARED_OPT_OUT}=1" if os.environ.get(SHARED_OPT_OUT) == "1" else ""
    return f"shared reference material: {SHARED_DIR} ({state}{opt_out})"


@pytest.fixture(scope="session")
def maestro_dir() -> Path:
    """Ten real MAESTRO performances (read-only; never copied into the project)."""
    return require_shared(MAESTRO_DIR, "the ten MAESTRO MIDI files")


@pytest.fixture(scope="session")
def upstream_checkpoint() -> dict[str, Path]:
    """The checkpoint piano-gpt's own code wrote (`pt`) and what its model computes (`io`)."""
    require_shared(UPSTREAM_DIR, "the upstream piano-gpt checkpoint")
    return {"pt": require_shared(UPSTREAM_DIR / "piano-gpt-f37ac14-bias.pt", "the upstream .pt"),
            "io": require_shared(UPSTREAM_DIR / "piano-gpt-f37ac14-bias_io.npz",
                                 "the upstream logits")}


@pytest.fixture
def reference_checkpoint(tmp_path):
    """Factory: (bias, time, layout) -> (path, TorchGPT with the saved weights) of a checkpoint
    written as piano-gpt's trainer writes it (converters/testing.py)."""
    import torch

    from converters.testing import randomize, tiny_config, write_reference_checkpoint
    from converters.torch_model import TorchGPT

    def make(bias: bool = False, time: bool = False, layout: str = "current", seed: int = 0):
        torch.manual_seed(seed)
        model = randomize(TorchGPT(tiny_config(bias, time)), seed)
        path = write_reference_checkpoint(tmp_path / f"ref-{bias}-{time}-{layout}.pt", model,
                                          layout)
        return path, model

    return make


@pytest.fixture(scope="session")
def maestro_dataset(maestro_dir, tmp_path_factory) -> Path:
    """The ten MAESTRO performances imported once per session (train 8 / validation 1 / test 1)."""
    from piano_gpt_jax.data import import_midi

    out = tmp_path_factory.mktemp("maestro") / "dataset"
    assert import_midi.main([str(maestro_dir), str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def mini_maestro(maestro_dir, tmp_path_factory):
    """`mini_maestro(n)`: the first n notes of four MAESTRO performances as a saved piano dataset
    (train: Chopin, Bach; validation and test: Liszt, Chopin) - small enough for page and
    evaluation tests, real music all the same."""
    return lambda n: _save_mini_maestro(maestro_dir, tmp_path_factory.mktemp("ds") / "mini", n)


def _save_mini_maestro(maestro_dir: Path, out: Path, notes_per_piece: int) -> Path:
    import json

    import datasets

    from piano_gpt_jax.music.midi import read_midi

    composers = ["Frédéric Chopin", "Johann Sebastian Bach", "Franz Liszt", "Frédéric Chopin"]
    rows = []
    for composer, f in zip(composers, sorted(maestro_dir.glob("*.mid"))[:4], strict=True):
        notes = read_midi(f).iloc[:notes_per_piece]
        source = json.dumps({"composer": composer, "dataset": "maestro", "title": f.stem})
        rows.append({"notes": {c: notes[c].to_numpy() for c in notes.columns}, "source": source})
    make = datasets.Dataset.from_list
    datasets.DatasetDict({"train": make(rows[:2]), "validation": make(rows[2:]),
                          "test": make(rows[2:])}).save_to_disk(str(out))
    return out



MAX_TEST_WORKERS = 4  # each worker holds a JAX runtime and compiled programs (~1-2 GB)


def pytest_xdist_auto_num_workers(config) -> int:
    """`-n auto` (pyproject.toml): one worker per core, at most MAX_TEST_WORKERS."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(cores or 1, MAX_TEST_WORKERS))
