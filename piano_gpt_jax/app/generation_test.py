"""One Generate click without the page: notes from the tiny model, outputs in a fresh folder,
and the refusals the page shows."""

from __future__ import annotations

import json

import numpy as np
import pytest

from piano_gpt_jax.app import generation, models, prompts
from piano_gpt_jax.app.errors import AppError
from piano_gpt_jax.app.settings import AppSettings
from piano_gpt_jax.app.testing_support import arpeggio_notes, make_tiny_run
from piano_gpt_jax.music.midi import read_midi


@pytest.fixture(scope="module")
def model(runs_root):
    return models.load_model(runs_root / "tiny")


def test_continuation_and_task_write_notes_and_files(model, tmp_path):
    prompt = prompts.Prompt(arpeggio_notes(16), "arpeggio")
    request = generation.Request.make(max_new_tokens=32, num_samples=2, temperature=1.0, seed=1)
    gen = generation.run_request(model, prompt, request)
    assert len(gen.samples) == 2 and all(len(s.ids) <= 32 for s in gen.samples)
    assert sum(len(s.notes) for s in gen.samples) > 0
    # new notes follow the prompt the model saw (the notes that fit its context of 96)
    new = next(s.notes for s in gen.samples if len(s.notes))
    assert new["start"].min() >= gen.prompt["start"].max()
    assert len(gen.prompt) == (16 if gen.fit_note is None else
                               int(gen.fit_note.split("kept the first ")[1].split()[0]))
    settings = AppSettings(tmp_path / "runs", tmp_path / "out")
    first, second = settings.new_output_dir("g"), settings.new_output_dir("g")
    assert first != second  # one folder per click: nothing earlier is replaced
    files = generation.write_outputs(gen, first, model.path)
    assert {"prompt", "generation_0", "combined_1", "tokens"} <= set(files)
    assert len(read_midi(files["generation_0"])) == len(gen.samples[0].notes)
    saved = json.loads(files["tokens"].read_text())
    assert saved["samples"][1]["ids"] == [int(t) for t in gen.samples[1].ids]

    task = generation.run_request(model, prompt, generation.Request.make(
        task="high_notes_masking-x5", max_new_tokens=32, temperature=0.0))
    assert len(task.target) == 5 and len(task.prompt) == 11
    assert model.tokenizer.vocab[task.prompt_ids[-1]] == "<GENAI>"


def test_refusals_are_readable(model, tmp_path):
    prompt = prompts.Prompt(arpeggio_notes(16), "arpeggio")
    with pytest.raises(AppError, match="unknown task"):
        generation.run_request(model, prompt, generation.Request.make(task="no_such_task-x1"))
    with pytest.raises(AppError, match="choose a prompt with notes"):
        generation.run_request(model, prompts.empty_prompt(),
                               generation.Request.make(task="top_line_masking-x1"))
    with pytest.raises(AppError, match="top_p"):
        generation.Request.make(top_p=0.0)
    with pytest.raises(AppError, match="number of samples"):
        generation.check_request(generation.Request(num_samples=17))
    # an empty prompt still works for continuation: the model starts from its prefix tokens
    gen = generation.run_request(model, prompts.empty_prompt(),
                                 generation.Request.make(max_new_tokens=4))
    assert len(gen.prompt_ids) == 2 and len(gen.samples[0].ids) <= 4
    # a checkpoint trained without a task's tokens says so instead of sampling garbage
    narrow = models.load_model(make_tiny_run(tmp_path / "top-line", tasks="top_line", steps=0))
    assert generation.supported_tasks(narrow) == ["top_line_masking-x1", "top_line_masking-x2",
                                                  "top_line_masking-x3"]
    with pytest.raises(AppError, match="vocabulary has no.*PARAMETRIC_HIGH_NOTES"):
        generation.run_request(narrow, prompt,
                               generation.Request.make(task="high_notes_masking-x5"))


def test_a_prompt_longer_than_the_context_keeps_its_first_notes_and_its_task_tokens(model):
    """The page once sent only the last 96 tokens of a long prompt: the dataset, composer and
    task tokens were cut off, and the result was labelled with a task the model never saw."""
    prompt = prompts.Prompt(arpeggio_notes(200), "long arpeggio")
    request = generation.Request.make(task="high_notes_masking-x5", max_new_tokens=8)
    built = generation.build_prompt(model, prompt, request)
    vocab = model.tokenizer.vocab
    assert len(built.ids) < 96 and built.sees == f"prompt {len(built.ids)} tokens of context 96"
    assert vocab[built.ids[0]] == "<PIANO_FOR_AI>" and vocab[built.ids[-1]] == "<GENAI>"
    assert "<PARAMETRIC_HIGH_NOTES>" in [vocab[i] for i in built.ids[:6]]
    kept = int(built.fit_note.split("kept the first ")[1].split(" notes")[0])
    assert len(built.shown) + len(built.target) == kept < 200
    assert built.fit_note.startswith("the prompt of 200 notes is ")
    gen = generation.run_request(model, prompt, request)
    assert list(gen.prompt_ids) == list(built.ids) and gen.fit_note == built.fit_note


def test_listening_window_starts_shortly_before_the_new_notes(model):
    prompt = prompts.Prompt(arpeggio_notes(16), "arpeggio")  # 4 s of prompt
    gen = generation.run_request(model, prompt, generation.Request.make(max_new_tokens=48, seed=3))
    k = next(i for i, s in enumerate(gen.samples) if len(s.notes))
    new = gen.samples[k].notes
    begin = float(new["start"].min())
    before, shifted = generation.listening_window(gen, k, 1.0)
    assert len(shifted) == len(new) and shifted["start"].min() == pytest.approx(1.0)
    assert 0 < len(before) < len(gen.prompt)  # only the notes still sounding in that second
    assert (before["end"] > 0).all() and before["start"].min() >= 0.0
    alone, new_alone = generation.listening_window(gen, k, 0.0)
    assert len(alone) == 0 and new_alone["start"].min() == pytest.approx(0.0)
    whole = generation.lead_in(gen, k, None)
    assert len(whole) == len(gen.prompt) + len(new) and whole["start"].min() == 0.0
    assert begin > 3.0  # after the 4 s prompt's last onset


def test_a_task_sample_is_scored_against_the_removed_notes(model):
    prompt = prompts.Prompt(arpeggio_notes(16), "arpeggio")
    gen = generation.run_request(model, prompt, generation.Request.make(
        task="high_notes_masking-x5", max_new_tokens=32, temperature=0.0))
    scores = generation.scores(gen, 0)
    assert 0.0 <= scores["confusion metrics/weighted_f1"] <= 1.0 and len(scores) == 18
    # the target scored against itself is perfect: the numbers are real F1s
    perfect = generation.Generation(gen.request, gen.prompt, gen.target, gen.prompt_ids,
                                    [generation.Sample(gen.samples[0].ids, gen.target, True)],
                                    1.0, 1.0, 0.0)
    assert generation.scores(perfect, 0)["confusion metrics/weighted_f1"] == pytest.approx(1.0)
    continuation = generation.run_request(model, prompt, generation.Request.make(max_new_tokens=4))
    assert generation.scores(continuation, 0) is None


def test_an_empty_sample_says_why_in_plain_words():
    from piano_gpt_jax.app.generate_page import _no_notes

    one = generation.Sample(np.array([5]), prompts.frame(None), stopped=False)
    assert _no_notes(0, one).endswith("its 1 token never closed a note.")
    ended = generation.Sample(np.array([3, 1]), prompts.frame(None), stopped=True)
    assert "the model ended it (<EOGENAI>) before closing one" in _no_notes(1, ended)


def test_the_task_list_comes_from_the_checkpoint_not_the_default_set(tmp_path):
    """A run trained on a task outside piano_default (high notes x 12) lists it; the app once
    listed only the default set, so such a task never showed."""
    import dataclasses

    import jax

    from piano_gpt_jax.checkpoints import CheckpointRecord, RunMeta, save_model_checkpoint
    from piano_gpt_jax.data.pipeline import build_tokenizer
    from piano_gpt_jax.data.settings import DataSettings
    from piano_gpt_jax.model import ModelConfig, init_params

    tasks = ["high_notes_masking-x12", "top_line_masking-x1"]
    tok = build_tokenizer(DataSettings(stage="piano_task", tasks=tasks, shard_index=0,
                                       shard_count=1))
    cfg = ModelConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=8,
                      context_size=32)
    save_model_checkpoint(tmp_path / "run", CheckpointRecord(
        cfg, jax.device_get(init_params(cfg, jax.random.PRNGKey(0))), tok.to_dict(),
        RunMeta(step=1, config={"stage": "piano_task", "tasks": tasks})))
    model = models.load_model(tmp_path / "run")
    assert generation.supported_tasks(model) == ["high_notes_masking-x12",
                                                 "top_line_masking-x1"]
    # a checkpoint that does not say: the default set's tasks whose tokens it has
    untold = dataclasses.replace(model, trained_tasks=None)
    assert set(generation.supported_tasks(untold)) == {"top_line_masking-x1",
                                                        "high_notes_masking-x1"}
