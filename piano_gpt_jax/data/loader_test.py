import json

import datasets
import numpy as np
import pytest

from piano_gpt_jax.data import loader
from piano_gpt_jax.data.records import Augmentation, PianoTaskRecords, PieceStore
from piano_gpt_jax.music.layouts import music_special_tokens
from piano_gpt_jax.music.tasks import resolve_tasks, task_special_tokens
from piano_gpt_jax.music.tokenizer import ExponentialTimeTokenizer

CONFIG = {"time_unit": 0.01, "max_time_step": 1.0, "n_velocity_bins": 32, "n_special_ids": 2048}


@pytest.fixture(scope="module")
def records(maestro_dir):
    from piano_gpt_jax.music.midi import read_midi

    df = read_midi(sorted(maestro_dir.glob("*.mid"))[0])
    src = json.dumps({"composer": "Johann Sebastian Bach", "dataset": "maestro"})
    split = datasets.Dataset.from_list(
        [{"notes": {c: df[c].to_numpy() for c in df.columns}, "source": src}]
    )
    tasks = resolve_tasks("piano_medium")
    tok = ExponentialTimeTokenizer.build(CONFIG)
    tok.add_special_tokens(music_special_tokens(168) + task_special_tokens(tasks)
                           + ["<GENAI>", "<EOGENAI>"])
    store = PieceStore.from_split(split, pause_threshold=4.0)
    return PianoTaskRecords(store, tok, tasks, 32, 192, use_time_steps=True)


def make(records, **kw):
    args = dict(seed=3, batch_size=4, augmentation=Augmentation(3, (0.9, 1.1)))
    args.update(kw)
    return loader.train_dataset(records, **args)


def test_batches_are_int32_numpy_dicts(records):
    batch = next(loader.make_iterator(make(records)))
    assert set(batch) == {"tokens", "targets", "loss_mask", "time_steps"}
    assert all(v.dtype == np.int32 and v.shape == (4, 192) for v in batch.values())
    assert (batch["tokens"][:, 1:] == batch["targets"][:, :-1]).all()


def test_iterator_state_restores_the_exact_batches(records):
    it = loader.make_iterator(make(records))
    for _ in range(5):
        next(it)
    state = it.get_state()
    json.dumps(state)  # JSON-serialisable for the checkpoint
    expected = [next(it) for _ in range(5)]
    fresh = loader.make_iterator(make(records))
    fresh.set_state(state)
    for want in expected:
        got = next(fresh)
        assert all((got[k] == want[k]).all() for k in want)


def test_shards_are_disjoint_and_cover_each_epoch():
    n = 40
    a = loader.index_stream(n, seed=3, shard_index=0, shard_count=2)
    b = loader.index_stream(n, seed=3, shard_index=1, shard_count=2)
    epoch_a, epoch_b = [a[i] for i in range(n // 2)], [b[i] for i in range(n // 2)]
    assert sorted(epoch_a + epoch_b) == list(range(n))
    assert epoch_a != sorted(epoch_a)
    second = [a[i] for i in range(n // 2, n)]
    assert second != epoch_a  # each epoch reshuffled


def test_workers_give_the_same_batches_as_in_process(records):
    ds = make(records)
    plain = loader.make_iterator(ds)
    expected = [next(plain) for _ in range(3)]
    mp = loader.make_iterator(ds, data_workers=1)
    try:
        for want in expected:
            got = next(mp)
            assert all((got[k] == want[k]).all() for k in want)
    finally:
        mp.close()


def test_workers_exit_when_the_trainer_is_killed(maestro_dataset, tmp_path):
    """kill -9 of the process that owns the iterator: its Grain workers follow it."""
    import os
    import signal
    import subprocess
    import sys
    import time

    script = tmp_path / "owner.py"
    script.write_text(
        "import os, sys, time\n"
        "from piano_gpt_jax.data.pipeline import build_tokenizer, make_pipeline\n"
        "from piano_gpt_jax.data.settings import DataSettings\n"
        "if __name__ == '__main__':\n"
        f"    s = DataSettings(base_dataset_name={str(maestro_dataset)!r}, batch_size=4,\n"
        "                     context_size=128, stage='next_token_pretraining', data_workers=2)\n"
        "    it = make_pipeline(s, build_tokenizer(s), progress=False).train_iterator()\n"
        "    next(it)\n"
        "    print('READY', flush=True)\n"
        "    time.sleep(600)\n")
    owner = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout.readline().strip() == "READY"
        workers = [int(p) for p in os.listdir("/proc") if p.isdigit()
                   and _parent_of(int(p)) == owner.pid]
        assert len([w for w in workers if b"spawn_main" in _cmdline(w)]) >= 2
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait()
    deadline = time.time() + 15
    while time.time() < deadline and any(os.path.exists(f"/proc/{w}") and _alive(w)
                                         for w in workers):
        time.sleep(0.2)
    assert not [w for w in workers if os.path.exists(f"/proc/{w}") and _alive(w)]


def _parent_of(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return -1


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
