"""The run config in both vocabularies: every form we meet reads back as our nested config, and
the export holds piano-gpt's schema plus ours."""

from __future__ import annotations

import pytest

from piano_gpt_jax.checkpoints import CheckpointError, RunMeta
from piano_gpt_jax.checkpoints.run_config import (
    OUR_KEY,
    export_run_config,
    split_run_config,
    task_list,
    translate_reference,
)
from piano_gpt_jax.config import build_train_config, complete
from piano_gpt_jax.model import ModelConfig
from piano_gpt_jax.music.tasks import resolve_tasks

MODEL = ModelConfig(vocab_size=2265, n_layer=2, n_head=2, n_embd=32, context_size=96)

# piano-gpt's run config as its trainer stores it (the shared upstream checkpoint's, abridged).
REFERENCE = {
    "command": "init", "run_name_suffix": "pretraining-2025-02-27-20-53",
    "model_task": "piano_task", "out_dir_relative": "tmp/checkpoints",
    "out_dir": "/abs/tmp/checkpoints", "eval_interval": 500, "eval_iters": 50,
    "training": {"prompt_masking": True, "context_size": 1024, "notes_per_record": 128,
                 "batch_size": 64, "microbatch_size": 8, "gradient_accumulation_steps": 8},
    "ddp": {"backend": "nccl"},
    "system": {"device": "cuda", "dtype": "float16", "compile": True, "data_workers": 16},
    "logging": {"wandb_log": False, "wandb_entity": "epr-labs", "wandb_project": "piano-gpt",
                "log_interval": 20},
    "model": {"n_layer": 2, "n_head": 4, "n_embd": 64, "dropout": 0.0, "bias": True,
              "context_size": 1024},
    "tokenizer": {"class_name": "ExponentialTimeTokenizer",
                  "config": {"time_unit": 0.01, "max_time_step": 1.0, "n_velocity_bins": 32,
                             "n_special_ids": 1024}},
    "dataset": {"base_dataset_name": "epr-labs/maestro-sustain-v2",
                "extra_datasets": ["epr-labs/giant-midi-sustain-v2"],
                "pause_detection_threshold": 4,
                "augmentation": {"speed_change_factors": [], "max_pitch_shift": 0}},
    "lr": {"type": "Constant", "learning_rate": 3e-5},
    "optimizer": {"weight_decay": 0.1, "max_iters": 300000, "beta1": 0.9, "beta2": 0.95,
                  "grad_clip": 1.0},
    "tasks": [{"class": "TopLineMasking", "params": {"n_repetitions": 1}},
              {"class": "StrideMasking", "params": {"stride": 5}}],
}


def test_reference_schema_translates_to_ours():
    ours = translate_reference(REFERENCE)
    assert ours["stage"] == "piano_task" and ours["loss_masking"] == "finetuning"
    assert ours["tasks"] == ("top_line_masking-x1", "stride_notes_masking-x5")
    assert ours["data"] == {"context_size": 1024, "notes_per_record": 128, "batch_size": 8}
    assert ours["optimizer"]["gradient_accumulation_steps"] == 8  # 8 x 8 = batch_size 64
    assert ours["system"] == {"device": "cuda", "dtype": "float16", "compile": True,
                              "data_workers": 16}
    assert ours["lr"] == {"learning_rate": 3e-5, "decay_lr": False}
    assert ours["tokenizer"]["n_special_ids"] == 1024 and ours["out_dir"] == "tmp/checkpoints"
    assert build_train_config(ours).optimizer.gradient_accumulation_steps == 8  # valid as ours


@pytest.mark.parametrize("form", ["ours_nested_under_key", "ours_flat", "legacy", "reference"])
def test_every_form_reads_back(form):
    ours = complete({"stage": "next_token_pretraining", "data": {"batch_size": 4}})
    run_config = {
        "ours_nested_under_key": {"command": "init", OUR_KEY: ours},
        "ours_flat": {"stage": "next_token_pretraining", "data.batch_size": 4},
        "legacy": {"stage": "next_token_pretraining", "init_from": "scratch_next_token",
                   "data": {"batch_size": 4, "wandb": 1}, "always_save_checkpoint": True},
        "reference": {**REFERENCE, "model_task": "next_token_prediction",
                      "training": {**REFERENCE["training"], "batch_size": 32,
                                   "gradient_accumulation_steps": 8}},
    }[form]
    config, reference = split_run_config(run_config)
    assert config["stage"] == "next_token_pretraining" and config["data"]["batch_size"] == 4
    assert (reference is not None) == (form == "reference")


@pytest.mark.parametrize("bad", [{"foo": 1, "bar": {"baz": 2}}, ["a", "list"], "text"])
def test_a_run_config_in_neither_vocabulary_is_refused(bad):
    with pytest.raises(CheckpointError, match="neither"):
        split_run_config(bad)
    assert split_run_config(None) == ({}, None) and split_run_config({}) == ({}, None)


def test_export_holds_the_reference_schema_and_ours():
    ours = complete({"stage": "piano_task", "tasks": "top_line", "loss_masking": "finetuning",
                     "data": {"batch_size": 8, "context_size": 96, "notes_per_record": 16},
                     "optimizer": {"gradient_accumulation_steps": 4},
                     "system": {"device": "tpu", "data_workers": 0},
                     "out_dir": "runs/x"})
    meta = RunMeta(config=ours, n_devices=2, prompt_layout="head", run_name="x")
    rc = export_run_config(meta, MODEL)
    assert rc["model_task"] == "piano_task" and rc["command"] == "init"
    assert rc["training"] == {"prompt_masking": True, "context_size": 96, "notes_per_record": 16,
                              "batch_size": 32, "microbatch_size": 4,
                              "gradient_accumulation_steps": 4, "min_n_task_notes": 14,
                              "min_notes_per_record": 16, "max_notes_per_record": 16}
    assert rc["system"]["device"] == "cuda" and rc["system"]["data_workers"] == 1
    assert rc["model"] == {"n_layer": 2, "n_head": 2, "n_embd": 32, "dropout": 0.0,
                           "bias": False, "context_size": 96}
    assert rc["lr"]["type"] == "CosineDecay" and set(rc["optimizer"]) == {
        "weight_decay", "max_iters", "beta1", "beta2", "grad_clip"}
    assert rc["tasks"] == [{"class": "TopLineMasking", "param_range": [
        {"n_repetitions": 1}, {"n_repetitions": 2}, {"n_repetitions": 3}]}]
    assert rc["out_dir_relative"] == "runs/x" and rc["out_dir"].endswith("/runs/x")
    # ours: whole under OUR_KEY, and beside the reference keys where no name collides
    assert rc[OUR_KEY]["tasks"] == "top_line" and rc[OUR_KEY]["system"]["device"] == "tpu"
    assert rc["stage"] == "piano_task" and rc["data"]["notes_per_record"] == 16
    assert split_run_config(rc) == (rc[OUR_KEY], None)


def test_a_converted_reference_checkpoint_reexports_its_own_run_config():
    meta = RunMeta(config=translate_reference(REFERENCE), reference_run_config=REFERENCE)
    meta.config = {}  # as a .pt read without our key: only the reference form is known
    rc = export_run_config(meta, ModelConfig(vocab_size=1241, n_layer=2, n_head=4, n_embd=64,
                                             context_size=1024, bias=True))
    for key in ("training", "lr", "tasks", "dataset", "tokenizer", "system"):
        assert rc[key] == REFERENCE[key], key
    assert rc[OUR_KEY]["loss_masking"] == "finetuning"


def test_task_list_forms_build_the_same_tasks():
    tasks = resolve_tasks("piano_default")
    for head in (False, True):
        entries = task_list(tasks, head=head)
        assert [t.task_name for t in resolve_tasks(entries)] == [t.task_name for t in tasks]
    assert len(task_list(tasks, head=False)) == 61 and len(task_list(tasks, head=True)) == 8
    assert task_list(tasks, head=True)[-1] == {"class": "ChordMasking",
                                               "params": {"n_notes_threshold": 3}}



@pytest.mark.parametrize(("recorded", "vocabulary", "layout"), [
    ("head", ["<MUSIC_TIME_0>"], "annotated"),  # what the run recorded wins (aliases named)
    ("f37ac14", ["<MUSIC_TIME_0>", "<GENAI>"], "plain"),
    (None, ["<GENAI>", "<MUSIC_TIME_0>"], "annotated"),  # else the vocabulary says
    (None, ["<GENAI>"], "plain"),
    (None, ["1T", "<PAD>"], "plain"),  # a next-token vocabulary without MUSIC_TIME, as it is
    (None, None, "annotated"),  # nothing to read: piano-gpt's current form
])
def test_one_rule_gives_a_checkpoints_prompt_layout(recorded, vocabulary, layout):
    from piano_gpt_jax.music.layouts import checkpoint_layout

    assert checkpoint_layout(recorded, vocabulary) == layout


@pytest.mark.parametrize(("vocabulary", "n_task_entries"), [
    (["<MUSIC_TIME_0>"], 8),  # the annotated (head) form: a class with its param_range
    (["<GENAI>"], 61),  # the plain (f37ac14) form: one entry per task
])
def test_the_export_asks_the_same_rule_as_generate(vocabulary, n_task_entries):
    """A next-token run records no layout: its export's task form follows the vocabulary (as
    generate and the model folder do), not whether the model has the music-time embedding."""
    desc = {"name": "ExponentialTimeTokenizer", "parameters": {"vocab": vocabulary}}
    for time_embedding in (False, True):
        ours = complete({"stage": "next_token_pretraining", "tasks": "piano_default",
                         "model": {"use_time_embedding": time_embedding}})
        rc = export_run_config(RunMeta(config=ours), MODEL, desc)
        assert len(rc["tasks"]) == n_task_entries
