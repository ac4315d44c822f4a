"""One Generate click without the page: notes from the tiny model, outputs in a fresh folder,
and the refusals the page shows."""

from __future__ import annotations

import json

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
    request = generation.Request(max_new_tokens=32, num_samples=2, temperature=1.0, seed=1)
    gen = generation.generate(model, prompt, request)
    assert len(gen.samples) == 2 and all(len(s.ids) <= 32 for s in gen.samples)
    assert sum(len(s.notes) for s in gen.samples) > 0
    # new notes follow the prompt: they start after its last onset
    new = next(s.notes for s in gen.samples if len(s.notes))
    assert new["start"].min() >= prompt.notes["start"].max()
    settings = AppSettings(tmp_path / "runs", tmp_path / "out")
    first, second = settings.new_output_dir("g"), settings.new_output_dir("g")
    assert first != second  # one folder per click: nothing earlier is replaced
    files = generation.write_outputs(gen, first, model.path)
    assert {"prompt", "generation_0", "combined_1", "tokens"} <= set(files)
    assert len(read_midi(files["generation_0"])) == len(gen.samples[0].notes)
    saved = json.loads(files["tokens"].read_text())
    assert saved["samples"][1]["ids"] == [int(t) for t in gen.samples[1].ids]

    task = generation.generate(model, prompt, generation.Request(
        task="high_notes_masking-x5", max_new_tokens=32, temperature=0.0))
    assert len(task.target) == 5 and len(task.prompt) == 11
    assert model.tokenizer.vocab[task.prompt_ids[-1]] == "<GENAI>"


def test_refusals_are_readable(model, tmp_path):
    prompt = prompts.Prompt(arpeggio_notes(16), "arpeggio")
    with pytest.raises(AppError, match="unknown task"):
        generation.generate(model, prompt, generation.Request(task="no_such_task-x1"))
    with pytest.raises(AppError, match="choose a prompt with notes"):
        generation.generate(model, prompts.empty_prompt(),
                            generation.Request(task="top_line_masking-x1"))
    with pytest.raises(AppError, match="top_p"):
        generation.check_request(generation.Request(top_p=0.0))
    # an empty prompt still works for continuation: the model starts from its prefix tokens
    gen = generation.generate(model, prompts.empty_prompt(), generation.Request(max_new_tokens=4))
    assert len(gen.prompt_ids) == 2 and len(gen.samples[0].ids) <= 4
    # a checkpoint trained without a task's tokens says so instead of sampling garbage
    narrow = models.load_model(make_tiny_run(tmp_path / "top-line", tasks="top_line", steps=0))
    assert generation.supported_tasks(narrow) == ["top_line_masking-x1", "top_line_masking-x2",
                                                  "top_line_masking-x3"]
    with pytest.raises(AppError, match="vocabulary has no.*PARAMETRIC_HIGH_NOTES"):
        generation.generate(narrow, prompt, generation.Request(task="high_notes_masking-x5"))
