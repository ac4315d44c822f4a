import json

import datasets
import numpy as np
import pytest

from piano_gpt_jax.data import pipeline
from piano_gpt_jax.data.pipeline import DataSettings, build_tokenizer, make_pipeline

COMPOSERS = ["Frédéric Chopin", "Johann Sebastian Bach", "Wolfgang Amadeus Mozart", "Franz Liszt"]


@pytest.fixture(scope="module")
def stand_in(maestro_dir):
    """A small DatasetDict of real MAESTRO notes, standing in for data.sources."""
    from piano_gpt_jax.data.midi_io import read_midi

    rows = []
    for i, f in enumerate(sorted(maestro_dir.glob("*.mid"))[:6]):
        df = read_midi(f).iloc[:1500]
        src = json.dumps({"composer": COMPOSERS[i % 4], "dataset": "maestro", "title": f.stem})
        rows.append({"notes": {c: df[c].to_numpy() for c in df.columns}, "source": src})
    ds = lambda r: datasets.Dataset.from_list(r)
    return datasets.DatasetDict(
        {"train": ds(rows[:3]), "validation": ds(rows[3:]), "test": ds(rows[3:])}
    )


@pytest.fixture
def patched(monkeypatch, stand_in):
    monkeypatch.setattr(pipeline, "_load_dataset", lambda name, required_splits: stand_in)


def settings(**kw):
    base = dict(batch_size=4, context_size=256, notes_per_record=48, seed=5, shard_index=0,
                shard_count=1, tasks="piano_medium")
    return DataSettings(**(base | kw))


def test_fresh_tokenizer_vocabulary_is_deterministic():
    tok = build_tokenizer(settings(tasks="piano_default"))
    assert tok.vocab_size == 2265
    assert tok.token_to_id["<MUSIC_TIME_1200>"] == 1611  # reference MusicManager layout
    assert tok.token_to_id["<GENAI>"] == 1631 and tok.token_to_id["<EOGENAI>"] == 1632
    assert tok.first_placeholder_id == 1633
    assert build_tokenizer(settings(tasks="piano_default")).vocab == tok.vocab


def test_tokenizer_from_desc_keeps_ids_and_adds_missing_tokens():
    first = build_tokenizer(settings(tasks="top_line"))
    again = build_tokenizer(settings(tasks="piano_default"), first.to_dict())
    assert again.vocab[: first.first_placeholder_id] == first.vocab[: first.first_placeholder_id]
    assert again.token_to_id["<GENAI>"] == first.token_to_id["<GENAI>"]
    assert again.token_to_id["<CHORD_MASK>"] >= first.first_placeholder_id


def test_piano_task_pipeline(patched):
    s = settings(use_time_steps=True, loss_masking="finetuning", notes_per_record=24)
    p = make_pipeline(s, build_tokenizer(s))
    assert p.eval_split_names == ["full_val", "bach", "chopin"]  # Liszt is no reference split
    batch = next(p.train_iterator())
    assert all(v.shape == (4, 256) and v.dtype == np.int32 for v in batch.values())
    genai = p.tokenizer.token_to_id["<GENAI>"]
    for row in range(4):
        where = np.nonzero(batch["tokens"][row] == genai)[0]
        if len(where) == 0:  # prompt filled the context: nothing left to train on
            assert batch["loss_mask"][row].sum() == 0
            continue
        g = int(where[0])
        assert batch["loss_mask"][row, :g].sum() == 0  # finetuning: answer tokens only
        assert batch["loss_mask"][row, g] == (batch["targets"][row, g] != 0)


def test_eval_batches_and_examples_are_deterministic(patched):
    s = settings()
    p = make_pipeline(s, build_tokenizer(s))
    a = p.eval_batches("bach", 2)
    b = make_pipeline(s, build_tokenizer(s)).eval_batches("bach", 2)
    assert len(a) == 2
    assert all((x[k] == y[k]).all() for x, y in zip(a, b, strict=True) for k in x)
    ex = p.eval_examples("full_val", 3)
    assert len(ex) == 3
    genai = p.tokenizer.token_to_id["<GENAI>"]
    for e in ex:
        assert e["prompt_ids"][-1] == genai and genai not in e["target_ids"]
        assert len(e["prompt_time_steps"]) == len(e["prompt_ids"])
        assert len(p.tokenizer.decode(e["target_ids"])) >= 0
    assert [e["task"] for e in ex] == [e["task"] for e in p.eval_examples("full_val", 3)]


def test_next_token_pipeline(patched):
    s = settings(stage="next_token_pretraining", max_pitch_shift=2)
    p = make_pipeline(s, build_tokenizer(s))
    batch = next(p.train_iterator())
    assert set(batch) == {"tokens", "targets", "loss_mask"}
    assert batch["loss_mask"].all()  # windows over long pieces are full
    assert p.eval_examples("full_val", 2) == []


def test_unknown_eval_split_lists_the_available_ones(patched):
    s = settings(eval_splits=("full_val", "mozart"))
    with pytest.raises(ValueError, match=r"\['mozart'\].*available.*full_val"):
        make_pipeline(s, build_tokenizer(s))


def test_no_usable_records_gives_one_clear_message(patched):
    big = dict(pipeline.DEFAULT_TOKENIZER_CONFIG, n_special_ids=4096)
    s = settings(notes_per_record=1600, tokenizer_config=big)  # pieces have 1500 notes
    with pytest.raises(ValueError, match="no usable records.*Lower data.notes_per_record"):
        make_pipeline(s, build_tokenizer(s))


def test_settings_are_validated():
    with pytest.raises(ValueError, match="stage"):
        settings(stage="pretrain")
    with pytest.raises(ValueError, match="divisible"):
        settings(batch_size=3, shard_count=2)
