"""From real MIDI files on disk to training batches, through the real data sources."""

import numpy as np
import pytest

from piano_gpt_jax.data.pipeline import build_tokenizer, make_pipeline
from piano_gpt_jax.data.settings import DataSettings


def check_batch(batch, tok, settings) -> int:
    """Checks every row; returns how many rows hold their whole answer (up to <EOGENAI>)."""
    bs, ctx = settings.batch_size, settings.context_size
    assert all(v.dtype == np.int32 and v.shape == (bs, ctx) for v in batch.values())
    assert (batch["tokens"][:, 1:] == batch["targets"][:, :-1]).all()
    assert ((batch["targets"] != tok.pad_token_id) >= (batch["loss_mask"] == 1)).all()
    genai, eog = tok.token_to_id["<GENAI>"], tok.token_to_id["<EOGENAI>"]
    whole = 0
    for row in range(bs):
        tokens = batch["tokens"][row]
        g = np.nonzero(tokens == genai)[0]
        assert len(g) == 1, "one <GENAI> per record"
        g = int(g[0])
        assert tok.vocab[tokens[0]] == "<MAESTRO>" or tokens[0] == tok.token_to_id["<PIANO_FOR_AI>"]
        head = [tok.vocab[i] for i in tokens[:7]]
        assert head[2].startswith("<N_NOTES_") and head[5].startswith("<MUSIC_TIME_")
        n_target = int(head[2][len("<N_NOTES_"):-1])
        answer = tokens[g + 1 :]
        end = np.nonzero(np.concatenate([answer, batch["targets"][row, -1:]]) == eog)[0]
        if len(end):  # the record fits: the answer decodes to exactly the announced notes
            assert len(tok.decode(answer[: end[0]])) == n_target
            whole += 1
        else:  # cut by the context: no padding, the row is full up to its last target
            assert (batch["targets"][row] != tok.pad_token_id).all()
        assert len(tok.decode(tokens[:g])) > 0
        if settings.loss_masking == "finetuning":
            assert batch["loss_mask"][row, :g].sum() == 0
        steps = batch["time_steps"][row]
        full = np.concatenate([tokens, batch["targets"][row, -1:]])
        assert steps.tolist() == tok.time_steps(full)[:-1].tolist() and steps[g] == 0
    return whole


def test_imported_maestro_gives_correct_batches(maestro_dataset):
    from piano_gpt_jax.data.sources import load_piano_dataset

    dd = load_piano_dataset(str(maestro_dataset))
    n_notes = sum(len(r["notes"]["pitch"]) for split in dd.values() for r in split)
    assert 95_000 < n_notes < 110_000  # the ten performances, ~102k notes
    s = DataSettings(base_dataset_name=str(maestro_dataset), batch_size=8, context_size=1024,
                     notes_per_record=128, use_time_steps=True, loss_masking="finetuning",
                     max_pitch_shift=5, speed_change_factors=(0.95, 1.05), shard_index=0,
                     shard_count=1)
    tok = build_tokenizer(s)
    p = make_pipeline(s, tok)
    it = p.train_iterator()
    whole = sum(check_batch(next(it), tok, s) for _ in range(3))
    whole += sum(check_batch(p.eval_batches(split, 1)[0], tok, s) for split in p.eval_split_names)
    assert whole >= 8  # the announced-notes check above really ran, on many records
    ex = p.eval_examples("full_val", 4)
    assert all(len(tok.decode(e["target_ids"])) > 0 for e in ex)


@pytest.mark.slow
def test_builtin_dataset_gives_batches():
    s = DataSettings(base_dataset_name="builtin", batch_size=4, context_size=512,
                     notes_per_record=64, use_time_steps=True, shard_index=0, shard_count=1)
    tok = build_tokenizer(s)
    p = make_pipeline(s, tok)
    assert "bach" in p.eval_split_names
    check_batch(next(p.train_iterator()), tok, s)
    nt = DataSettings(stage="next_token_pretraining", base_dataset_name="builtin", batch_size=4,
                      context_size=512, shard_index=0, shard_count=1)
    batch = next(make_pipeline(nt, build_tokenizer(nt)).train_iterator())
    assert batch["tokens"].shape == (4, 512) and batch["loss_mask"].sum() > 0
