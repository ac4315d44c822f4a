"""The prepared corpus: the same batches as the in-memory pipeline, fingerprints, bad input."""

from __future__ import annotations

import errno
import hashlib
import json
import pickle
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest

from piano_gpt_jax.data import loader
from piano_gpt_jax.data import preparation as prepare
from piano_gpt_jax.data import prepared_store as ps
from piano_gpt_jax.data.pipeline import build_tokenizer, make_pipeline
from piano_gpt_jax.data.records import NextTokenRecords, PianoTaskRecords, PieceStore
from piano_gpt_jax.data.settings import DataSettings
from piano_gpt_jax.data.sources import load_piano_dataset
from piano_gpt_jax.music.tasks import resolve_tasks

REPO = Path(__file__).resolve().parents[2]


def digest(batches) -> str:
    h = hashlib.sha256()
    for b in batches:
        for k in sorted(b):
            a = np.ascontiguousarray(b[k])
            h.update(k.encode())
            h.update(str(a.shape).encode())
            h.update(a.astype(np.int64).tobytes())
    return h.hexdigest()[:16]


# Digests of the batches of the pipeline before prepared stores (commit 8df3fcf: every split
# read into memory and tokenized at each start; its builtin.py given this commit's install-path
# independent splits, builtin-v2), computed by the same `digest` over the same settings: train
# batches 0-2, two eval batches of every eval split, three eval examples.
COMMON = dict(use_time_steps=True, max_pitch_shift=5, seed=7)
CASES = {
    "maestro_task": (dict(batch_size=8, context_size=512, notes_per_record=64,
                          loss_masking="finetuning", speed_change_factors=(0.95, 1.05)),
                     {"train": "47bf479f5cb9d3b5", "full_val": "44c2636ba83609f2",
                      "examples": "07a8e0aff7ae563e"}),
    "maestro_next": (dict(stage="next_token_pretraining", batch_size=8, context_size=256),
                     {"train": "e45926cb7c24f5de", "full_val": "19cd94c82bfb98aa"}),
    "maestro_next_shard0": (dict(stage="next_token_pretraining", batch_size=8,
                                 context_size=256, shard_index=0, shard_count=2),
                            {"train": "053761f1adf87bd3", "full_val": "ffb91316e9adacc9"}),
    "maestro_next_shard1": (dict(stage="next_token_pretraining", batch_size=8,
                                 context_size=256, shard_index=1, shard_count=2),
                            {"train": "56d77c19b0728517", "full_val": "9d270777798bdb01"}),
    "builtin_task": (dict(base_dataset_name="builtin", batch_size=4, context_size=256,
                          notes_per_record=32, speed_change_factors=(0.9,)),
                     {"train": "5ed359c6d2666aff", "full_val": "36f52e65f57f556f",
                      "bach": "b60d95d51e8c28da", "mozart": "9e5c9ba61cb46fee",
                      "examples": "bb6903384ad3d7e7"}),
    "builtin_next": (dict(stage="next_token_pretraining", base_dataset_name="builtin",
                          batch_size=4, context_size=128),
                     {"train": "076903955a63b1fb", "full_val": "ac35c482e1a04c1e",
                      "bach": "593f798635d1c709", "mozart": "417dffa16298f39f"}),
    "extra_next": (dict(stage="next_token_pretraining", extra_datasets=("MAESTRO", "builtin"),
                        batch_size=4, context_size=128),
                   {"train": "d038e3b2bbd613d3", "full_val": "25872f86794ab8e0"}),
    "extra_task": (dict(base_dataset_name="builtin", extra_datasets=("builtin", "MAESTRO"),
                        batch_size=4, context_size=256, notes_per_record=32),
                   {"train": "e2d6ee2e95b48147", "full_val": "36f52e65f57f556f",
                    "bach": "b60d95d51e8c28da", "mozart": "9e5c9ba61cb46fee",
                    "examples": "bb6903384ad3d7e7"}),
}


def case_settings(name: str, maestro: Path, **extra) -> DataSettings:
    kw = {"base_dataset_name": str(maestro), **COMMON, **CASES[name][0], **extra}
    kw["extra_datasets"] = tuple(str(maestro) if d == "MAESTRO" else d
                                 for d in kw.get("extra_datasets", ()))
    return DataSettings(**kw)


def case_digests(settings: DataSettings) -> dict[str, str]:
    p = make_pipeline(settings, build_tokenizer(settings), progress=False)
    it = p.train_iterator()
    out = {"train": digest([next(it) for _ in range(3)])}
    out.update({split: digest(p.eval_batches(split, 2)) for split in p.eval_split_names})
    examples = p.eval_examples("full_val", 3)
    if examples:
        out["examples"] = digest([{"p": e["prompt_ids"], "t": e["target_ids"]}
                                  for e in examples])
    return out


@pytest.mark.parametrize("name", sorted(CASES))
def test_batches_are_token_identical_to_the_in_memory_pipeline(name, maestro_dataset):
    """Augmentation on, eval batches and examples, two processes' shards, several datasets."""
    assert case_digests(case_settings(name, maestro_dataset)) == CASES[name][1]


@pytest.mark.slow
def test_loader_workers_read_the_maps_and_give_the_same_batches(maestro_dataset):
    s = case_settings("maestro_task", maestro_dataset, data_workers=2)
    p = make_pipeline(s, build_tokenizer(s), progress=False)
    it = p.train_iterator()
    assert digest([next(it) for _ in range(3)]) == CASES["maestro_task"][1]["train"]


def test_every_record_equals_the_one_built_in_memory(maestro_dataset):
    """Not only the sampled batches: 300 records of each kind spread over the split, from the
    store on disk and from pieces read into memory (the old path, kept for small in-memory
    use)."""
    split = load_piano_dataset(str(maestro_dataset))["train"]
    memory = PieceStore.from_split(split, 4.0)
    s = DataSettings(base_dataset_name=str(maestro_dataset), use_time_steps=True)
    tok = build_tokenizer(s)
    tokens = prepare.ensure_store(split, "m", "train", "tokens", 4.0, tok, progress=False,
                                  log=lambda m: None)
    notes = prepare.ensure_store(split, "m", "train", "notes", 4.0, None, progress=False,
                                 log=lambda m: None)
    assert (tokens.n_pieces, tokens.n_notes) == (memory.n_pieces, memory.n_notes)
    pairs = [(NextTokenRecords(tokens, tok, 300, True), NextTokenRecords(memory, tok, 300, True)),
             (PianoTaskRecords(notes, tok, resolve_tasks("piano_medium"), 48, 400),
              PianoTaskRecords(memory, tok, resolve_tasks("piano_medium"), 48, 400))]
    for disk, mem in pairs:
        assert len(disk) == len(mem) > 1000
        for i in np.linspace(0, len(disk) - 1, 300).astype(int):
            a, b = disk.example(i), mem.example(i)
            assert all(np.array_equal(a[k], b[k]) for k in b), (type(disk).__name__, i)


def test_parallel_shards_write_the_same_store_as_one_process(maestro_dataset, tmp_path):
    split = load_piano_dataset(str(maestro_dataset))["train"]
    tok = build_tokenizer(DataSettings(stage="next_token_pretraining"))
    one = prepare.ensure_store(split, "m", "train", "tokens", 4.0, tok, tmp_path / "one",
                               workers=1, progress=False, log=lambda m: None)
    many = prepare.ensure_store(split, "m", "train", "tokens", 4.0, tok, tmp_path / "many",
                                workers=2, notes_per_shard=15_000, progress=False,
                                log=lambda m: None)
    for column in ("ids", "offsets", "piece_source", "block_rank"):
        assert (one.path / f"{column}.npy").read_bytes() == (
            many.path / f"{column}.npy").read_bytes(), column
    assert one.manifest["source_table"] == many.manifest["source_table"]
    assert not list(tmp_path.glob("*/*.partial"))


def test_a_worker_gets_paths_not_arrays(maestro_dataset):
    s = DataSettings(base_dataset_name=str(maestro_dataset), stage="next_token_pretraining",
                     context_size=256, max_pitch_shift=3)
    p = make_pipeline(s, build_tokenizer(s), progress=False)
    ds = loader.train_dataset(p.train_records, seed=1, batch_size=4,
                              augmentation=s.augmentation)
    payload = pickle.dumps(ds)
    assert len(payload) < 1_000_000  # the tokenizer's vocabulary is most of it
    store = p.train_stores[0][1]
    assert str(store.path).encode() in payload
    assert store.ids.tobytes()[:4096] not in payload
    window_index = p.train_records._start_cum  # per piece: grows with the corpus
    assert len(window_index) > 10 and window_index.tobytes() not in payload
    again = pickle.loads(payload)
    assert np.array_equal(next(iter(again))["tokens"], next(iter(ds))["tokens"])


# ------------------------------------------------------------------ fingerprints


def small_split(n_pieces: int = 6, notes: int = 40, seed: int = 0, **row_overrides):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_pieces):  # two phrases with a 2 s rest between them
        start = np.concatenate([np.sort(rng.uniform(0, 5, notes // 2)),
                                np.sort(rng.uniform(8, 13, notes - notes // 2))])
        rows.append({"notes": {"pitch": rng.integers(30, 90, notes).tolist(),
                               "velocity": rng.integers(20, 110, notes).tolist(),
                               "start": start.tolist(),
                               "end": (start + rng.uniform(0.1, 1, notes)).tolist()},
                     "source": json.dumps({"composer": ["Johann Sebastian Bach",
                                                        "Frédéric Chopin"][i % 2],
                                           "title": f"piece {i}", "dataset": "maestro"})})
    rows.extend(row_overrides.get("extra_rows", []))
    return datasets.Dataset.from_list(rows)


@pytest.fixture
def saved(tmp_path):
    """`saved(split)`: the split saved to disk and loaded back (files, as real datasets)."""
    def save(split, name="ds"):
        path = tmp_path / name
        datasets.DatasetDict({"train": split}).save_to_disk(str(path))
        return datasets.load_from_disk(str(path))["train"]
    return save


def test_the_fingerprint_changes_with_the_content_and_only_with_it(saved):
    tok = build_tokenizer(DataSettings(stage="next_token_pretraining"))
    split = saved(small_split())
    fp = prepare.fingerprint
    base = fp(split, "tokens", 4.0, tok)
    assert fp(split, "tokens", 4.0, tok) == base  # stable
    assert fp(split, "tokens", 2.0, tok) != base  # pause threshold
    assert fp(split, "notes", 4.0, None) != base  # stage
    coarse = build_tokenizer(DataSettings(stage="next_token_pretraining",
                                          tokenizer_config={"time_unit": 0.02,
                                                            "max_time_step": 1.0,
                                                            "n_velocity_bins": 32,
                                                            "n_special_ids": 2048}))
    assert fp(split, "tokens", 4.0, coarse) != base  # the tokenizer's music tokens
    # special tokens (tasks, layouts) and record settings do not change the store
    task_tok = build_tokenizer(DataSettings(stage="piano_task", tasks="top_line"))
    assert fp(split, "tokens", 4.0, task_tok) == base
    # rewriting the dataset's files does
    rewritten = saved(small_split(seed=1), "ds2")
    assert fp(rewritten, "tokens", 4.0, tok) != base


def test_stores_of_other_settings_are_never_used(saved, tmp_path):
    split = saved(small_split())
    kw = dict(root=tmp_path / "p", progress=False, log=lambda m: None)
    a = prepare.ensure_store(split, "ds", "train", "notes", 4.0, None, **kw)
    b = prepare.ensure_store(split, "ds", "train", "notes", 0.5, None, **kw)
    assert a.path != b.path
    assert prepare.ensure_store(split, "ds", "train", "notes", 4.0, None, **kw).path == a.path
    assert b.n_pieces > a.n_pieces  # split on the shorter pauses


# ------------------------------------------------------------------ bad input


def test_corrupt_and_empty_rows_are_skipped_and_counted(saved, tmp_path):
    bad = [{"notes": {"pitch": [], "velocity": [], "start": [], "end": []},
            "source": "{}"},
           {"notes": {"pitch": [60, 61], "velocity": [50], "start": [0.0, 1.0],
                      "end": [0.5, 1.5]}, "source": "{}"},
           {"notes": {"pitch": [60, 200, 62], "velocity": [50, 50, 50],
                      "start": [0.0, 0.1, 0.2], "end": [0.5, 0.6, float("nan")]},
            "source": "{}"}]
    split = saved(small_split(extra_rows=bad))
    store = prepare.ensure_store(split, "ds", "train", "notes", 4.0, None, tmp_path / "p",
                                 progress=False, log=lambda m: None)
    memory = PieceStore.from_split(split, 4.0)
    assert store.skipped_records == memory.skipped_records == 3
    assert store.dropped_notes == memory.dropped_notes == 2
    assert store.n_notes == memory.n_notes == 6 * 40


def test_a_full_disk_is_one_line_and_the_next_start_continues(saved, tmp_path, monkeypatch):
    split = saved(small_split(n_pieces=12))
    real = prepare.prepare_shard
    calls, full = [], [True]

    def disk_fills_on_the_third_shard(job):
        calls.append(job.chunk.index)
        if len(calls) == 3 and full[0]:
            full[0] = False
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(job)

    monkeypatch.setattr(prepare, "prepare_shard", disk_fills_on_the_third_shard)
    kw = dict(root=tmp_path / "p", workers=1, notes_per_shard=80, progress=False,
              log=lambda m: None)
    with pytest.raises(prepare.PrepareError, match="no space left") as err:
        prepare.ensure_store(split, "ds", "train", "notes", 4.0, None, **kw)
    assert "\n" not in str(err.value) and "continues" in str(err.value)
    assert not [p for p in (tmp_path / "p").iterdir() if p.is_dir()
                and not p.name.endswith(".partial")]  # no store, half-written or whole
    calls.clear()
    store = prepare.ensure_store(split, "ds", "train", "notes", 4.0, None, **kw)
    assert calls == [2, 3, 4, 5]  # the two finished shards were kept
    clean = prepare.ensure_store(split, "ds", "train", "notes", 4.0, None,
                                 root=tmp_path / "clean", progress=False, log=lambda m: None)
    for column in ("offsets", "pitch", "start", "piece_source"):
        assert np.array_equal(np.load(store.path / f"{column}.npy"),
                              np.load(clean.path / f"{column}.npy"))


def test_an_interrupted_preparation_is_never_read_and_resumes(saved, tmp_path, monkeypatch):
    split = saved(small_split(n_pieces=8))
    real = prepare.prepare_shard

    def killed_after_one(job):
        if job.chunk.index == 1:
            raise KeyboardInterrupt
        return real(job)

    monkeypatch.setattr(prepare, "prepare_shard", killed_after_one)
    kw = dict(root=tmp_path / "p", workers=1, notes_per_shard=80, progress=False,
              log=lambda m: None)
    with pytest.raises(KeyboardInterrupt):
        prepare.ensure_store(split, "ds", "train", "notes", 4.0, None, **kw)
    monkeypatch.setattr(prepare, "prepare_shard", real)
    store = prepare.ensure_store(split, "ds", "train", "notes", 4.0, None, **kw)
    assert store.n_notes == 8 * 40


@pytest.mark.parametrize("damage", ["truncate", "delete", "manifest"])
def test_a_damaged_store_is_found_at_start_said_in_one_line_and_rebuilt(saved, tmp_path,
                                                                        damage):
    split = saved(small_split())
    tok = build_tokenizer(DataSettings(stage="next_token_pretraining"))
    lines: list[str] = []
    kw = dict(root=tmp_path / "p", progress=False, log=lines.append)
    store = prepare.ensure_store(split, "ds", "train", "tokens", 4.0, tok, **kw)
    ids, target = np.array(store.ids), store.path
    del store
    if damage == "truncate":
        data = (target / "ids.npy").read_bytes()
        (target / "ids.npy").write_bytes(data[: len(data) // 2])
    elif damage == "delete":
        (target / "offsets.npy").unlink()
    else:
        (target / "manifest.json").write_text("{")
    lines.clear()
    again = prepare.ensure_store(split, "ds", "train", "tokens", 4.0, tok, **kw)
    assert any("damaged" in line for line in lines), lines
    assert np.array_equal(again.ids, ids)


def test_two_processes_preparing_at_once_make_one_store(saved, tmp_path):
    split = saved(small_split(n_pieces=30, notes=200))
    script = (
        "import sys, datasets\n"
        "from piano_gpt_jax.data import preparation as prepare\n"
        f"split = datasets.load_from_disk({str(tmp_path / 'ds')!r})['train']\n"
        f"root = {str(tmp_path / 'p')!r}\n"
        "s = prepare.ensure_store(split, 'ds', 'train', 'notes', 4.0, None, root, workers=1,"
        " notes_per_shard=500, progress=False)\n"
        "print('NOTES', s.n_notes, s.path)\n")
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, cwd=REPO) for _ in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    results = [line for out in outs for line in out.splitlines() if line.startswith("NOTES")]
    assert len(results) == 2 and results[0] == results[1] == results[0]
    stores = [p for p in (tmp_path / "p").iterdir() if p.is_dir()]
    assert len(stores) == 1 and stores[0].name.startswith("ds.train.notes-")
    assert sum("once into" in out for out in outs) == 1  # the other one waited and read it
    assert ps.PreparedStore.open(stores[0]).n_notes == 30 * 200
    assert split is not None


def test_the_prepare_command_prepares_what_the_trainer_reads(maestro_dataset, tmp_path):
    args = [sys.executable, "-m", "piano_gpt_jax.data.prepare", "--config",
            "configs/piano.py:tiny", f"--config.dataset.base_dataset_name={maestro_dataset}",
            f"--config.dataset.prepared_dir={tmp_path / 'p'}",
            "--config.stage=next_token_pretraining"]
    done = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "train" in done.stdout and "validation" in done.stdout and "B/note" in done.stdout
    assert "preparing" in done.stderr
    again = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "preparing" not in again.stderr  # reused
    bad = subprocess.run(args + ["--config.dataset.pause_treshold=3"], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "pause_detection_threshold" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


def test_ids_packed_in_12_bits_read_back_exactly_at_every_offset():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 4096, 101).astype(np.uint16)
    ids[:3] = [0, 4095, 2264]
    packed = ps.pack12(np.concatenate([ids, [0]]))
    assert len(packed) == 3 * 51 and np.array_equal(ps.unpack12(packed)[:101], ids)
    for a in range(0, 101, 7):
        for b in (a, a + 1, a + 2, 101):
            got = ps.read_ids(lambda x, y: packed[x:y], "u12", a, min(b, 101))
            assert np.array_equal(got, ids[a:min(b, 101)]), (a, b)
    assert ps.token_format(2265) == "u12" and ps.token_format(5000) == "uint16"
