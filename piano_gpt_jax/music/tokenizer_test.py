import numpy as np
import pandas as pd
import pytest

from piano_gpt_jax.music.tokenizer import ExponentialTimeTokenizer

CONFIG = {"time_unit": 0.01, "max_time_step": 1.0, "n_velocity_bins": 32, "n_special_ids": 2048}

# Worked example of the reference document (section 1.11).
GOLDEN_NOTES = pd.DataFrame(
    {
        "pitch": [60, 64, 67],
        "velocity": [80, 101, 64],
        "start": [0.000, 0.252, 0.254],
        "end": [0.500, 0.498, 1.333],
    }
)
GOLDEN_TOKENS = (
    "VELOCITY_20 NOTE_ON_60 16T 8T 1T VELOCITY_25 NOTE_ON_64 VELOCITY_16 NOTE_ON_67 16T 8T 1T "
    "NOTE_OFF_60 NOTE_OFF_64 64T 16T 2T 1T NOTE_OFF_67"
).split()
GOLDEN_IDS = [
    198, 80, 214, 213, 210, 203, 88, 194, 94, 214, 213, 210, 81, 89, 216, 214, 211, 210, 95
]
GOLDEN_STEPS = [1, 1, 17, 25, 26, 26, 26, 26, 26, 42, 50, 51, 51, 51, 115, 131, 133, 134, 134]


@pytest.fixture(scope="module")
def tok():
    return ExponentialTimeTokenizer.build(CONFIG)


def reference_loop_tokens(tok, notes: pd.DataFrame) -> list[str]:
    """Straightforward per-event transcription of the reference algorithm (1.5-1.6)."""
    tu = tok.time_unit
    df = notes.copy()
    edges = np.linspace(0, 128, tok.n_velocity_bins + 1).astype(int)
    df["vbin"] = np.digitize(df.velocity, edges) - 1
    df["start"] = (df.start / tu).round() * tu
    df["end"] = (df.end / tu).round() * tu
    same = df.start == df.end
    df.loc[same, "end"] += tu
    df = df.sort_values("pitch")
    events = [(e, "off", p, 0) for p, e in zip(df.pitch, df.end, strict=True)]
    ons = zip(df.pitch, df.start, df.vbin, strict=True)
    events += [(s, "on", p, v) for p, s, v in ons]
    events = sorted(events, key=lambda e: e[0])  # stable
    out, prev = [], 0.0
    for t, kind, p, v in events:
        n = int(round((t - prev) / tu))
        for s in tok.step_sizes:
            out += [f"{s}T"] * (n // s)
            n %= s
        if kind == "on":
            out += [f"VELOCITY_{v}", f"NOTE_ON_{p}"]
        else:
            out += [f"NOTE_OFF_{p}"]
        prev = t
    return out


def test_vocabulary_layout(tok):
    assert tok.vocab_size == 2265
    assert tok.first_placeholder_id == 217
    assert tok.step_sizes == [64, 32, 16, 8, 4, 2, 1]
    assert tok.vocab[:4] == ["<PAD>", "<CLS>", "NOTE_ON_21", "NOTE_OFF_21"]
    assert tok.token_to_id["NOTE_OFF_108"] == 177
    assert tok.token_to_id["VELOCITY_0"] == 178 and tok.token_to_id["64T"] == 216
    assert tok.vocab[217] == "<PLACEHOLDER_0>" and tok.vocab[-1] == "<PLACEHOLDER_2047>"
    assert tok.pad_token_id == 0


@pytest.mark.parametrize(
    "time_unit, max_step, largest", [(0.005, 1.0, "128T"), (0.02, 2.0, "64T"), (0.01, 0.64, "32T")]
)
def test_time_vocabulary_bound_is_strict(time_unit, max_step, largest):
    cfg = dict(CONFIG, time_unit=time_unit, max_time_step=max_step)
    t = ExponentialTimeTokenizer.build(cfg)
    assert [v for v in t.vocab if v.endswith("T")][-1] == largest


def test_golden_worked_example(tok):
    assert tok.tokenize(GOLDEN_NOTES) == GOLDEN_TOKENS
    ids = tok.encode(GOLDEN_NOTES)
    assert ids.dtype == np.int32 and ids.tolist() == GOLDEN_IDS
    assert tok.time_steps(ids).tolist() == GOLDEN_STEPS
    dec = tok.decode(ids)
    assert list(dec.columns) == ["pitch", "start", "end", "velocity"]
    assert dec.pitch.tolist() == [60, 64, 67]
    assert np.round(dec.start, 6).tolist() == [0.0, 0.25, 0.25]
    assert np.round(dec.end, 6).tolist() == [0.5, 0.5, 1.33]
    assert dec.velocity.tolist() == [82, 102, 66]
    # A dict of arrays is accepted as well.
    as_dict = {c: GOLDEN_NOTES[c].to_numpy() for c in GOLDEN_NOTES}
    assert tok.encode(as_dict).tolist() == GOLDEN_IDS


def test_long_gap_repeats_largest_step(tok):
    notes = {"pitch": [60], "velocity": [64], "start": [2.57], "end": [2.6]}
    assert tok.tokenize(notes)[:5] == ["64T", "64T", "64T", "64T", "1T"]


def test_ties_offs_before_ons_then_ascending_pitch(tok):
    notes = {
        "pitch": [72, 60, 65],
        "velocity": [40, 40, 40],
        "start": [0.0, 0.5, 0.5],
        "end": [0.5, 1.0, 1.0],
    }
    toks = [t for t in tok.tokenize(notes) if not t.startswith("VELOCITY")]
    assert toks == ["NOTE_ON_72", "32T", "16T", "2T", "NOTE_OFF_72", "NOTE_ON_60", "NOTE_ON_65",
                    "32T", "16T", "2T", "NOTE_OFF_60", "NOTE_OFF_65"]


def test_zero_length_note_gets_one_time_unit(tok):
    notes = {"pitch": [60], "velocity": [64], "start": [0.101], "end": [0.103]}
    assert tok.tokenize(notes) == ["8T", "2T", "VELOCITY_16", "NOTE_ON_60", "1T", "NOTE_OFF_60"]


def test_vectorised_encode_matches_reference_loop_on_real_music(tok, maestro_dir):
    from piano_gpt_jax.music.midi import read_midi

    notes = read_midi(sorted(maestro_dir.glob("*.mid"))[0]).iloc[:1500]
    assert tok.tokenize(notes) == reference_loop_tokens(tok, notes)


def test_decode_encode_round_trip_within_one_time_unit(tok, maestro_dir):
    from piano_gpt_jax.music.midi import read_midi

    notes = read_midi(sorted(maestro_dir.glob("*.mid"))[1])
    dec = tok.decode(tok.encode(notes))
    assert len(dec) == len(notes)
    q_start = np.round(notes.start / 0.01)
    q_end = np.maximum(np.round(notes.end / 0.01), q_start + 1)  # zero-length notes get 1 unit
    a = notes.assign(qs=q_start, qe=q_end).sort_values(["qs", "pitch"], kind="stable")
    b = dec.assign(qs=np.round(dec.start / 0.01)).sort_values(["qs", "pitch"], kind="stable")
    assert (a.pitch.to_numpy() == b.pitch.to_numpy()).all()
    assert np.abs(a.start.to_numpy() - b.start.to_numpy()).max() <= 0.005 + 1e-6
    assert np.abs(a.qe.to_numpy() * 0.01 - b.end.to_numpy()).max() < 1e-6
    assert np.abs(a.end.to_numpy() - b.end.to_numpy()).max() <= 0.015 + 1e-6
    assert np.abs(a.velocity.to_numpy() - b.velocity.to_numpy()).max() <= 2


def test_decode_is_tolerant(tok):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, tok.vocab_size, 3000)
    dec = tok.decode(ids)
    assert list(dec.columns) == ["pitch", "start", "end", "velocity"]
    assert (dec.end > dec.start).all()
    # An unclosed note is dropped; specials and out-of-range ids are ignored.
    t2i = tok.token_to_id
    ids = [t2i["<CLS>"], t2i["VELOCITY_10"], t2i["NOTE_ON_60"], 99999, -3, t2i["4T"]]
    assert len(tok.decode(ids)) == 0
    assert len(tok.decode([])) == 0


def test_time_steps_restart_and_zero_on_specials(tok):
    tok = ExponentialTimeTokenizer.build(CONFIG)
    tok.add_special_tokens(["<GENAI>", "<EOGENAI>"])
    t2i = tok.token_to_id
    seq = [t2i[t] for t in ["<EOGENAI>", "4T", "VELOCITY_3", "NOTE_ON_60", "<GENAI>", "2T",
                            "NOTE_OFF_60", "<PAD>"]]
    assert tok.time_steps(seq).tolist() == [0, 5, 5, 5, 0, 3, 3, 0]
    assert tok.time_steps(seq, restart_tokens=()).tolist() == [0, 5, 5, 5, 0, 7, 7, 0]


def test_special_tokens_fill_placeholders_in_order(tok):
    tok = ExponentialTimeTokenizer.build(dict(CONFIG, n_special_ids=3))
    tok.add_special_tokens(["<A>", "<B>", "<A>"])
    assert tok.token_to_id["<A>"] == 217 and tok.token_to_id["<B>"] == 218
    assert tok.vocab[219] == "<PLACEHOLDER_2>" and tok.vocab_size == 220
    with pytest.raises(ValueError, match="n_special_ids"):
        tok.add_special_tokens(["<C>", "<D>"])


def test_desc_round_trip_v4_and_v3(tok):
    tok = ExponentialTimeTokenizer.build(CONFIG)
    tok.add_special_tokens(["<MAESTRO>", "<GENAI>"])
    desc = tok.to_dict()
    params = desc["parameters"]
    assert desc["name"] == "ExponentialTimeTokenizer"
    assert params["step_sizes"] == [64, 32, 16, 8, 4, 2, 1]
    assert params["first_placeholder_id"] == 219
    assert params["lexicon"]["time_tokens"] == ["1T", "2T", "4T", "8T", "16T", "32T", "64T"]
    assert len(params["lexicon"]["note_tokens"]) == 176
    assert len(params["lexicon"]["velocity_tokens"]) == 32
    again = ExponentialTimeTokenizer.from_dict(desc)
    assert again.to_dict() == desc
    v3 = {"name": desc["name"], "parameters": dict(params, vocab=params["lexicon"]["vocab"])}
    del v3["parameters"]["lexicon"]
    loaded = ExponentialTimeTokenizer.from_dict(v3)
    assert loaded.vocab == tok.vocab and loaded.first_placeholder_id == 219
    assert loaded.encode(GOLDEN_NOTES).tolist() == GOLDEN_IDS


def test_ids_come_from_the_stored_vocab_not_the_config():
    # A v3-style vocab with the notes moved (as a legacy layout would): ids must follow the list.
    base = ExponentialTimeTokenizer.build(CONFIG)
    vocab = ["<X>"] + base.vocab[:-1]
    desc = {"name": "ExponentialTimeTokenizer", "parameters": {"vocab": vocab,
                                                               "tokenizer_config": CONFIG}}
    t = ExponentialTimeTokenizer.from_dict(desc)
    assert t.encode(GOLDEN_NOTES).tolist() == [i + 1 for i in GOLDEN_IDS]
    assert t.pad_token_id == 1


def test_v2_desc_is_rejected_with_a_clear_message():
    desc = {"name": "ExponentialTimeTokenizer",
            "parameters": {"min_time_unit": 0.01, "n_velocity_bins": 32, "special_tokens": []}}
    with pytest.raises(ValueError, match="v2"):
        ExponentialTimeTokenizer.from_dict(desc)


def test_bad_notes_raise_clear_errors(tok):
    with pytest.raises(ValueError, match="piano range"):
        tok.encode({"pitch": [12], "velocity": [3], "start": [0.0], "end": [1.0]})
    with pytest.raises(ValueError, match="column"):
        tok.encode({"pitch": [60], "start": [0.0], "end": [1.0]})
    with pytest.raises(ValueError, match="velocity"):
        tok.encode({"pitch": [60], "velocity": [128], "start": [0.0], "end": [1.0]})


def test_transpose_ids(tok):
    ids = tok.encode(GOLDEN_NOTES)
    up = tok.transpose_ids(ids, 3)
    moved = GOLDEN_NOTES.assign(pitch=GOLDEN_NOTES.pitch + 3)
    assert up.tolist() == tok.encode(moved).tolist()
    assert tok.allowed_id_shifts(ids, 50) == list(range(21 - 60, 108 - 67 + 1))
