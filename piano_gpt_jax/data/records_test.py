import json

import datasets
import numpy as np
import pytest

from piano_gpt_jax.data.records import Augmentation, NextTokenRecords, PianoTaskRecords, PieceStore
from piano_gpt_jax.music import layouts
from piano_gpt_jax.music.layouts import detect_prompt_layout, music_special_tokens, music_time_token
from piano_gpt_jax.music.tasks import HighNotesMasking, StrideMasking
from piano_gpt_jax.music.tokenizer import ExponentialTimeTokenizer

CONFIG = {"time_unit": 0.01, "max_time_step": 1.0, "n_velocity_bins": 32, "n_special_ids": 2048}
SOURCE = json.dumps({"composer": "Frédéric Chopin", "dataset": "maestro", "title": "x"})


@pytest.fixture(scope="module")
def tok():
    t = ExponentialTimeTokenizer.build(CONFIG)
    t.add_special_tokens(music_special_tokens(168))
    t.add_special_tokens(["<PARAMETRIC_HIGH_NOTES>", "<PARAMETER_1>", "<PARAMETRIC_STRIDE_MASK>",
                          "<PARAMETER_2>", "<GENAI>", "<EOGENAI>"])
    return t


# The reference worked example's record in the annotated layout, token by token (tokenizer-tasks-
# metrics.md, worked example 1.11, with HighNotesMasking(1)).
GOLDEN_RECORD = (
    "<MAESTRO> <CHOPIN> <N_NOTES_1> <PARAMETRIC_HIGH_NOTES> <PARAMETER_1> <MUSIC_TIME_3> "
    "<MUSIC_TIME_3> VELOCITY_20 NOTE_ON_60 16T 8T 1T VELOCITY_25 NOTE_ON_64 16T 8T 1T "
    "NOTE_OFF_60 NOTE_OFF_64 <GENAI> 16T 8T 1T VELOCITY_16 NOTE_ON_67 64T 32T 8T 4T NOTE_OFF_67"
).split()


def golden_split():
    # The reference worked example (1.11) shifted by 10 s: windows are moved back to t = 0.
    notes = {"pitch": [[60, 64, 67]], "velocity": [[80, 101, 64]],
             "start": [[10.0, 10.252, 10.254]], "end": [[10.5, 10.498, 11.333]]}
    rows = [{"notes": {k: v[0] for k, v in notes.items()}, "source": SOURCE}]
    return datasets.Dataset.from_list(rows)


def test_music_manager_tokens_and_ids(tok):
    assert len(music_special_tokens(168)) == 1395
    assert tok.token_to_id["<MAESTRO>"] == 217 and tok.token_to_id["<BACH>"] == 241
    assert tok.token_to_id["<N_NOTES_0>"] == 242 and tok.token_to_id["<MUSIC_TIME_1200>"] == 1611
    assert music_time_token(0.254) == "<MUSIC_TIME_3>"
    assert music_time_token(float("nan")) == "<MUSIC_TIME_0>"
    assert music_time_token(500.0) == "<MUSIC_TIME_1200>"


def test_piano_task_layout_matches_the_reference_example(tok):
    store = PieceStore.from_split(golden_split(), pause_threshold=4.0)
    recs = PianoTaskRecords(store, tok, [HighNotesMasking(1)], notes_per_record=3,
                            context_size=40)
    assert len(recs) == 1
    task, prompt, target = recs.parts(0)
    assert task == "high_notes_masking-x1"
    expected = GOLDEN_RECORD
    assert [tok.vocab[i] for i in np.concatenate([prompt, target])] == expected

    ex = recs.example(0)
    seq = expected + ["<EOGENAI>"]
    n = len(seq)
    assert [tok.vocab[i] for i in ex["tokens"][:n]] == seq
    assert [tok.vocab[i] for i in ex["targets"][: n - 1]] == seq[1:]
    assert (ex["tokens"][n:] == 0).all() and (ex["targets"][n - 1 :] == 0).all()
    assert ex["loss_mask"].tolist() == [1] * (n - 1) + [0] * (40 - n + 1)
    assert all(v.dtype == np.int32 and v.shape == (40,) for v in ex.values())

    fine = PianoTaskRecords(store, tok, [HighNotesMasking(1)], 3, 40, "finetuning").example(0)
    genai_at = expected.index("<GENAI>")
    # targets[genai_at - 1] is <GENAI> itself (not trained); targets[genai_at] is the first answer.
    assert tok.vocab[fine["targets"][genai_at - 1]] == "<GENAI>"
    assert fine["loss_mask"][:genai_at].sum() == 0
    assert fine["loss_mask"][genai_at : n - 1].all()


def f37ac14_tokenizer(n_special_ids=1024):
    """A vocabulary as reference f37ac14 builds it (4.4, 4.6, Appendix A): dataset and composer
    tokens at 217-241, then the task tokens and <GENAI>; no N_NOTES/MUSIC_TIME/<EOGENAI>."""
    t = ExponentialTimeTokenizer.build(CONFIG | {"n_special_ids": n_special_ids})
    t.add_special_tokens([*layouts.DATASET_TOKENS, *layouts.COMPOSER_TOKENS])
    t.add_special_tokens(["<PARAMETRIC_HIGH_NOTES>", "<PARAMETER_1>", "<GENAI>"])
    return t


def test_f37ac14_layout_token_by_token():
    """Reference 4.6: `[DATASET][COMPOSER][TASK][PARAM] <source> <GENAI> <target> PAD...`, no
    <EOGENAI>; prompt masking leaves <GENAI> itself untrained and trains from the first answer
    token on. Same notes as the head-layout golden example above."""
    tok = f37ac14_tokenizer()
    assert tok.vocab_size == 1241
    store = PieceStore.from_split(golden_split(), pause_threshold=4.0)
    recs = PianoTaskRecords(store, tok, [HighNotesMasking(1)], notes_per_record=3,
                            context_size=40, prompt_layout="f37ac14")
    task, prompt, target = recs.parts(0)
    assert task == "high_notes_masking-x1"
    prompt_tokens = (
        "<MAESTRO> <CHOPIN> <PARAMETRIC_HIGH_NOTES> <PARAMETER_1> "
        "VELOCITY_20 NOTE_ON_60 16T 8T 1T VELOCITY_25 NOTE_ON_64 16T 8T 1T NOTE_OFF_60 NOTE_OFF_64 "
        "<GENAI>"
    ).split()
    target_tokens = "16T 8T 1T VELOCITY_16 NOTE_ON_67 64T 32T 8T 4T NOTE_OFF_67".split()
    assert [tok.vocab[i] for i in prompt] == prompt_tokens
    assert [tok.vocab[i] for i in target] == target_tokens
    assert prompt[:4].tolist() == [217, 230, 242, 243]  # ids of the f37ac14 vocabulary

    seq = prompt_tokens + target_tokens
    n = len(seq)
    ex = recs.example(0)
    assert [tok.vocab[i] for i in ex["tokens"][:n]] == seq
    assert [tok.vocab[i] for i in ex["targets"][: n - 1]] == seq[1:]
    assert (ex["tokens"][n:] == 0).all() and (ex["targets"][n - 1 :] == 0).all()  # no <EOGENAI>
    assert ex["loss_mask"].tolist() == [1] * (n - 1) + [0] * (40 - n + 1)

    fine = PianoTaskRecords(store, tok, [HighNotesMasking(1)], 3, 40, "finetuning",
                            prompt_layout="f37ac14").example(0)
    g = len(prompt_tokens) - 1  # y[len(prompt) - 1] is <GENAI>
    assert tok.vocab[fine["targets"][g - 1]] == "<GENAI>"
    assert fine["loss_mask"].tolist() == [0] * g + [1] * (n - 1 - g) + [0] * (40 - n + 1)


def test_f37ac14_layout_needs_no_music_manager_tokens():
    """The annotated layout cannot be built from an f37ac14 vocabulary: its tokens are absent."""
    tok = f37ac14_tokenizer()
    store = PieceStore.from_split(golden_split(), pause_threshold=4.0)
    with pytest.raises(KeyError):
        PianoTaskRecords(store, tok, [HighNotesMasking(1)], 3, 40)
    with pytest.raises(ValueError, match="prompt layout"):
        PianoTaskRecords(store, tok, [HighNotesMasking(1)], 3, 40, prompt_layout="f37")


def test_prompt_layout_detection(tok):
    assert detect_prompt_layout(tok) == "annotated"  # holds <MUSIC_TIME_0>
    assert detect_prompt_layout(tok, 168) == "annotated"
    small = f37ac14_tokenizer(1024)  # 979 free slots, 1370 MusicManager tokens missing
    assert small.free_special_slots == 1241 - 245
    assert detect_prompt_layout(small, 168) == "plain"
    assert detect_prompt_layout(small) == "plain"
    roomy = f37ac14_tokenizer(2048)  # room for MusicManager tokens, but trained on f37ac14
    assert detect_prompt_layout(roomy, 168) == "plain"  # records (it holds <GENAI>)
    assert detect_prompt_layout(roomy) == "plain"
    fresh = ExponentialTimeTokenizer.build(
        {"time_unit": 0.01, "max_time_step": 1.0, "n_velocity_bins": 32, "n_special_ids": 2048})
    assert detect_prompt_layout(fresh, 168) == "annotated"  # nothing trained yet, room to add


def test_time_steps_restart_after_genai(tok):
    store = PieceStore.from_split(golden_split(), pause_threshold=4.0)
    ex = PianoTaskRecords(store, tok, [HighNotesMasking(1)], 3, 40, use_time_steps=True).example(0)
    steps = ex["time_steps"]
    genai = list(ex["tokens"]).index(tok.token_to_id["<GENAI>"])
    assert steps[:7].tolist() == [0] * 7  # prefix specials
    assert steps[genai] == 0 and steps[genai + 1] == 17  # 16T after the restart
    full = np.concatenate([ex["tokens"], ex["targets"][-1:]])
    assert steps.tolist() == tok.time_steps(full)[:-1].tolist()


def test_truncation_to_context_keeps_the_head(tok):
    """A record longer than the context keeps its first context_size + 1 tokens: the prefix and
    the start of the source survive, the answer is cut (and with finetuning nothing is trained)."""
    store = PieceStore.from_split(golden_split(), pause_threshold=4.0)
    ex = PianoTaskRecords(store, tok, [HighNotesMasking(1)], 3, 10).example(0)
    assert [tok.vocab[i] for i in ex["tokens"]] == GOLDEN_RECORD[:10]  # up to NOTE_ON_60 16T
    assert [tok.vocab[i] for i in ex["targets"]] == GOLDEN_RECORD[1:11]
    assert ex["loss_mask"].tolist() == [1] * 10
    fine = PianoTaskRecords(store, tok, [HighNotesMasking(1)], 3, 10, "finetuning").example(0)
    assert fine["tokens"].tolist() == ex["tokens"].tolist()
    assert fine["loss_mask"].sum() == 0  # <GENAI> is token 20: no answer token fits
    # One token short of the whole record: everything but the final <EOGENAI> target survives.
    n = len(GOLDEN_RECORD)
    near = PianoTaskRecords(store, tok, [HighNotesMasking(1)], 3, n).example(0)
    assert [tok.vocab[i] for i in near["targets"]] == GOLDEN_RECORD[1:] + ["<EOGENAI>"]
    assert near["loss_mask"].all()


def real_store(maestro_dir, n_files=2):
    from piano_gpt_jax.music.midi import read_midi

    rows = []
    for f in sorted(maestro_dir.glob("*.mid"))[:n_files]:
        df = read_midi(f)
        rows.append({"notes": {c: df[c].to_numpy() for c in df.columns}, "source": SOURCE})
    return PieceStore.from_split(datasets.Dataset.from_list(rows), pause_threshold=4.0)


def toy_store(lengths: list[int]) -> PieceStore:
    """Pieces of the given note counts (one record each, no pauses): a store counted by hand."""
    rows = []
    for n in lengths:
        start = np.arange(n) * 0.5
        rows.append({"notes": {"pitch": [60] * n, "velocity": [80] * n, "start": start.tolist(),
                               "end": (start + 0.4).tolist()}, "source": SOURCE})
    return PieceStore.from_split(datasets.Dataset.from_list(rows), pause_threshold=4.0)


def test_window_index_counted_by_hand(tok):
    """Pieces of 5, 2 and 4 notes, windows of 3 notes, two tasks. Windows start at notes 0-2 of
    piece 0, none in piece 1 (too short), notes 0-1 of piece 2: 5 windows, 10 records, task
    varying fastest."""
    store = toy_store([5, 2, 4])
    recs = PianoTaskRecords(store, tok, [StrideMasking(2), HighNotesMasking(1)], 3, 64)
    assert len(recs) == 10
    expected = [(0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1), (0, 2, 0), (0, 2, 1),
                (2, 0, 0), (2, 0, 1), (2, 1, 0), (2, 1, 1)]
    assert [recs.locate(i) for i in range(10)] == expected
    # the window's notes are those of its piece and first note: record 8 is piece 2, notes 1..3
    _, _, notes = recs._window(8, None, None)
    np.testing.assert_allclose(notes["start"], [0.0, 0.5, 1.0])  # shifted to zero from 0.5
    assert len(PianoTaskRecords(toy_store([2, 2]), tok, [StrideMasking(2)], 3, 64)) == 0


def test_augmentation_is_deterministic_and_keeps_notes_on_the_piano(tok, maestro_dir):
    store = real_store(maestro_dir, 1)
    recs = PianoTaskRecords(store, tok, [StrideMasking(2)], 64, 1024)
    aug = Augmentation(max_pitch_shift=5, speed_change_factors=(0.5,))
    a = recs.example(100, np.random.default_rng(7), aug)
    b = recs.example(100, np.random.default_rng(7), aug)
    assert all((a[k] == b[k]).all() for k in a)
    shifts, factors = set(), set()
    plain = tok.decode(recs.example(100)["tokens"])
    for seed in range(40):
        ex = recs.example(100, np.random.default_rng(seed), aug)
        dec = tok.decode(ex["tokens"])
        assert dec.pitch.between(21, 108).all()
        shifts.add(int(dec.pitch.min() - plain.pitch.min()))
        factors.add(round(dec.end.max() / plain.end.max(), 1))
    assert len(shifts) > 5 and (2 in shifts or -2 in shifts)  # even shifts too (reference bug 15)
    assert factors == {1.0, 2.0}


def test_next_token_windows(tok, maestro_dir):
    store = real_store(maestro_dir, 1)
    recs = NextTokenRecords(store, tok, context_size=256, use_time_steps=True)
    ids = np.concatenate([tok.encode(store.piece(i)) for i in range(store.n_pieces)])
    assert len(recs) > 0.4 * len(ids)  # every offset except NOTE_ONs, minus the tails
    ex = recs.example(0)
    assert [tok.vocab[i] for i in ex["tokens"][:2]] == ["<MAESTRO>", "<CHOPIN>"]
    assert ex["tokens"][2:].tolist() == ids[:254].tolist()
    assert ex["targets"].tolist() == ex["tokens"][1:].tolist() + [ids[254]]
    assert ex["loss_mask"].all()
    for i in range(0, len(recs), 997):
        first = tok.vocab[recs.example(i)["tokens"][2]]
        assert not first.startswith("NOTE_ON")
    # Pitch shift: the same window with every note moved by one shift s, |s| <= 3, per seed;
    # every other token unchanged.
    plain = [tok.vocab[i] for i in recs.example(5)["tokens"]]
    note = lambda t: t.startswith(("NOTE_ON_", "NOTE_OFF_"))
    seen = set()
    for seed in range(8):
        shifted = [tok.vocab[i] for i in recs.example(5, np.random.default_rng(seed),
                                                      Augmentation(max_pitch_shift=3))["tokens"]]
        shifts = {int(b.rsplit("_", 1)[1]) - int(a.rsplit("_", 1)[1])
                  for a, b in zip(plain, shifted, strict=True) if note(a)}
        assert len(shifts) == 1 and abs(next(iter(shifts))) <= 3, shifts
        assert [a for a in plain if not note(a)] == [b for b in shifted if not note(b)]
        assert [a.rsplit("_", 1)[0] for a in plain if note(a)] == \
            [b.rsplit("_", 1)[0] for b in shifted if note(b)]
        seen |= shifts
    assert len(seen - {0}) >= 3  # really shifted, by several amounts


def test_short_piece_gives_one_padded_next_token_record(tok):
    store = PieceStore.from_split(golden_split(), pause_threshold=4.0)
    recs = NextTokenRecords(store, tok, context_size=64)
    assert len(recs) == 1
    ex = recs.example(0)
    assert ex["loss_mask"].sum() == 19 + 1  # composer->first note + 19 note tokens
    assert (ex["tokens"][21:] == 0).all()


def test_bad_records_are_skipped_with_counts(tok):
    rows = [
        {"notes": {"pitch": [60, 130, 62], "velocity": [50, 50, 50], "start": [0.0, 0.1, 0.2],
                   "end": [0.5, 0.6, 0.1]}, "source": SOURCE},
        {"notes": {"pitch": [], "velocity": [], "start": [], "end": []}, "source": SOURCE},
    ]
    store = PieceStore.from_split(datasets.Dataset.from_list(rows), pause_threshold=4.0)
    assert store.dropped_notes == 2 and store.skipped_records == 2 and store.n_pieces == 0


def test_record_with_unequal_columns_is_skipped_without_shifting_the_next(tok):
    good = {"pitch": [60, 62], "velocity": [50, 60], "start": [0.0, 0.5], "end": [0.4, 0.9]}
    rows = [
        {"notes": {**good, "velocity": [50]}, "source": SOURCE},  # one velocity too few
        {"notes": good, "source": SOURCE},
    ]
    store = PieceStore.from_split(datasets.Dataset.from_list(rows), pause_threshold=4.0)
    assert store.skipped_records == 1 and store.n_pieces == 1
    assert store.velocity.tolist() == [50, 60] and store.pitch.tolist() == [60, 62]
