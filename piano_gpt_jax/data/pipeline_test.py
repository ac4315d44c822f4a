import json

import datasets
import numpy as np
import pytest

from piano_gpt_jax.data import pipeline
from piano_gpt_jax.data.pipeline import build_tokenizer, make_pipeline
from piano_gpt_jax.data.records import PieceStore, tokenize_pieces
from piano_gpt_jax.data.settings import DataSettings

COMPOSERS = ["Frédéric Chopin", "Johann Sebastian Bach", "Wolfgang Amadeus Mozart", "Franz Liszt"]


@pytest.fixture(scope="module")
def stand_in(maestro_dir):
    """A small DatasetDict of real MAESTRO notes, standing in for data.sources."""
    from piano_gpt_jax.music.midi import read_midi

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
        # The annotated layout announces the target's size (<N_NOTES_k>, third token); the
        # target ids must decode to exactly that many notes, and a task always leaves at least one.
        announced = p.tokenizer.vocab[e["prompt_ids"][2]]
        assert announced.startswith("<N_NOTES_")
        n_target = int(announced[len("<N_NOTES_"):-1])
        assert len(p.tokenizer.decode(e["target_ids"])) == n_target >= 1
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


def f37ac14_desc(tasks="piano_default"):
    """The tokenizer_desc of a reference f37ac14 checkpoint: n_special_ids 1024, vocab 1241,
    dataset and composer tokens, the task tokens and <GENAI> only."""
    from piano_gpt_jax.music import layouts
    from piano_gpt_jax.music.tasks import resolve_tasks, task_special_tokens
    from piano_gpt_jax.music.tokenizer import ExponentialTimeTokenizer

    tok = ExponentialTimeTokenizer.build(dict(pipeline.DEFAULT_TOKENIZER_CONFIG,
                                              n_special_ids=1024))
    tok.add_special_tokens([*layouts.DATASET_TOKENS, *layouts.COMPOSER_TOKENS])
    tok.add_special_tokens(task_special_tokens(resolve_tasks(tasks)) + ["<GENAI>"])
    assert tok.vocab_size == 1241
    return tok.to_dict()


def test_f37ac14_checkpoint_tokenizer_is_detected_and_keeps_its_ids():
    desc = f37ac14_desc("top_line")
    vocab = desc["parameters"]["lexicon"]["vocab"]
    s = settings(tasks="piano_default")
    assert pipeline.resolve_prompt_layout(s, build_tokenizer(s)) == "annotated"  # fresh
    tok = build_tokenizer(s, desc)  # auto: the checkpoint's own layout
    assert pipeline.resolve_prompt_layout(s, tok) == "plain"
    assert tok.vocab_size == 1241 and "<MUSIC_TIME_0>" not in tok.token_to_id
    assert "<EOGENAI>" not in tok.token_to_id and "<N_NOTES_0>" not in tok.token_to_id
    n_old = desc["parameters"]["first_placeholder_id"]
    assert tok.vocab[:n_old] == vocab[:n_old]  # only the new task tokens were added, after
    assert tok.token_to_id["<CHORD_MASK>"] >= n_old
    # A fresh run may ask for the plain (f37ac14) layout too; its vocab then lacks the
    # MusicManager time tokens, and a tokenizer built that way detects as plain.
    fresh = build_tokenizer(settings(prompt_layout="f37ac14"))
    assert "<GENAI>" in fresh.token_to_id and "<MUSIC_TIME_0>" not in fresh.token_to_id
    assert "<EOGENAI>" not in fresh.token_to_id


def test_layout_that_does_not_fit_names_free_slots_and_needs():
    with pytest.raises(ValueError) as err:
        build_tokenizer(settings(prompt_layout="head"), f37ac14_desc())
    msg = str(err.value)
    assert "979 free special-token slots" in msg and "needs 1371 new tokens" in msg
    assert "169 <N_NOTES_*>, 1201 <MUSIC_TIME_*>, <EOGENAI>" in msg
    assert "data.prompt_layout='plain'" in msg
    small = dict(pipeline.DEFAULT_TOKENIZER_CONFIG, n_special_ids=1024)
    with pytest.raises(ValueError, match="fresh tokenizer.*1024 free.*raise tokenizer.n_special"):
        build_tokenizer(settings(tokenizer_config=small))


def test_f37ac14_pipeline_records_and_eval_examples(patched):
    s = settings(loss_masking="finetuning", notes_per_record=24, tasks="top_line")
    tok = build_tokenizer(s, f37ac14_desc("top_line"))
    p = make_pipeline(s, tok)
    assert p.prompt_layout == "plain" and p.summary()["prompt_layout"] == "plain"
    genai = tok.token_to_id["<GENAI>"]
    task_ids = {tok.token_to_id[t] for t in ("<PARAMETRIC_TOP_LINE>", "<PARAMETER_1>",
                                              "<PARAMETER_2>", "<PARAMETER_3>")}
    for e in p.eval_examples("full_val", 3):
        prompt = e["prompt_ids"]
        assert prompt[-1] == genai and tok.vocab[prompt[0]] == "<MAESTRO>"
        assert tok.vocab[prompt[1]] in ("<CHOPIN>", "<BACH>", "<MOZART>", "<LISZT>")
        assert set(prompt[2:4].tolist()) <= task_ids  # the task prefix right after composer
        assert tok.vocab[prompt[4]].startswith(("VELOCITY_", "NOTE_", "1T", "2T", "4T", "8T",
                                                "16T", "32T", "64T"))
    batch = p.eval_batches("full_val", 1)[0]
    assert batch["tokens"].max() < 1241


def test_settings_are_validated():
    with pytest.raises(ValueError, match="prompt_layout"):
        settings(prompt_layout="legacy")
    with pytest.raises(ValueError, match="stage"):
        settings(stage="pretrain")
    with pytest.raises(ValueError, match="divisible"):
        settings(batch_size=3, shard_count=2)


def _n_notes(split) -> int:
    return sum(len(r["notes"]["pitch"]) for r in split)


def test_extra_datasets_are_the_training_data(monkeypatch, stand_in):
    """dataset.extra_datasets: training reads every extra's train split, in order, and not the
    base's; validation still comes from the base dataset."""
    val = stand_in["validation"]
    by_name = {"base": stand_in,
               "extra-a": datasets.DatasetDict({"train": val.select([0])}),
               "extra-b": datasets.DatasetDict({"train": val.select([1, 2]),
                                                "validation": stand_in["train"]})}
    monkeypatch.setattr(pipeline, "_load_dataset", lambda name, required_splits: by_name[name])
    s = settings(base_dataset_name="base", extra_datasets=("extra-a", "extra-b"),
                 stage="next_token_pretraining")
    p = make_pipeline(s, build_tokenizer(s))
    assert [name for name, _ in p.train_stores] == ["extra-a", "extra-b"]
    n_notes = sum(store.n_notes for _, store in p.train_stores)
    assert n_notes == _n_notes(val) == 3 * 1500  # a (1 piece) + b (2 pieces)
    assert _n_notes(stand_in["train"]) == 3 * 1500  # same size: compare the notes themselves
    tok = p.tokenizer

    def first_ids(split):
        return tokenize_pieces(PieceStore.from_split(split, 4.0), tok)[0][:20].tolist()

    first_train_ids = p.train_stores[0][1].read(0, 20).tolist()
    assert first_train_ids == first_ids(val.select([0]))
    assert first_train_ids != first_ids(stand_in["train"].select([0]))
    base_only = make_pipeline(settings(base_dataset_name="base",
                                       stage="next_token_pretraining"), build_tokenizer(s))
    assert len(base_only.eval_records["full_val"]) == len(p.eval_records["full_val"])


def test_extra_dataset_without_a_train_split_is_an_error(monkeypatch, stand_in):
    by_name = {"base": stand_in,
               "only-val": datasets.DatasetDict({"validation": stand_in["validation"]})}
    monkeypatch.setattr(pipeline, "_load_dataset", lambda name, required_splits: by_name[name])
    s = settings(base_dataset_name="base", extra_datasets=("only-val",))
    with pytest.raises(ValueError, match=r"'only-val' \(in dataset.extra_datasets\) has no train"):
        make_pipeline(s, build_tokenizer(s))
    by_name["base"] = datasets.DatasetDict({"validation": stand_in["validation"]})
    s = settings(base_dataset_name="base")
    with pytest.raises(ValueError, match="'base' has no train split; give dataset.extra_datasets"):
        make_pipeline(s, build_tokenizer(s))
