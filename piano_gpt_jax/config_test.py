"""The config is validated once, with messages that say what to change."""

import subprocess
import sys
from pathlib import Path

import pytest

from configs.piano import MODEL_PRESETS, get_config
from piano_gpt_jax.config import SCHEMA, ConfigError, build_train_config, flatten
from piano_gpt_jax.data.settings import DataSettings

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("preset", [None, "tiny", *MODEL_PRESETS])
def test_every_preset_is_valid_and_complete(preset):
    cfg = get_config(preset)
    assert set(flatten(cfg)) == set(SCHEMA)  # every documented key is present, nothing else
    tc = build_train_config(cfg)
    if preset in MODEL_PRESETS:
        assert (tc.model.n_layer, tc.model.n_head, tc.model.n_embd) == MODEL_PRESETS[preset]


def test_full_recipe_and_tiny_preset_values():
    full = build_train_config(get_config())
    assert (full.model.n_layer, full.model.n_head, full.model.n_embd) == (12, 12, 768)
    assert full.system.dtype == "bfloat16" and full.platform == "cuda"
    assert full.stage == "piano_task"
    assert full.dataset.base_dataset_name == "epr-labs/maestro-sustain-v2"
    assert full.data.context_size == 2048 and full.tasks == "piano_default"
    tiny = build_train_config(get_config("tiny"))
    assert tiny.platform == "cpu" and tiny.dataset.base_dataset_name == "builtin"
    assert DataSettings.from_config(full).prompt_layout == "auto"
    cfg = get_config("tiny")
    cfg.data.prompt_layout = "f37ac14"
    assert DataSettings.from_config(build_train_config(cfg)).prompt_layout == "plain"  # old name


def test_lr_decay_iters_follows_max_iters():
    cfg = get_config("tiny")
    cfg.optimizer.max_iters = 123
    assert build_train_config(cfg).lr.lr_decay_iters == 123


def _error(mutate) -> str:
    cfg = get_config("tiny").to_dict()
    mutate(cfg)
    with pytest.raises(ConfigError) as err:
        build_train_config(cfg)
    return str(err.value)


def test_unknown_key_suggests_the_closest():
    msg = _error(lambda c: c["optimizer"].update(max_itres=3))
    assert "optimizer.max_itres" in msg and "optimizer.max_iters" in msg


def test_wrong_type():
    assert "model.n_layer" in _error(lambda c: c["model"].update(n_layer="four"))
    assert "system.compile" in _error(lambda c: c["system"].update(compile=1))


def test_heads_must_divide_width():
    msg = _error(lambda c: c["model"].update(n_head=5))
    assert "divisible" in msg and "n_head=4" in msg


def test_data_context_within_model_context():
    msg = _error(lambda c: c["data"].update(context_size=512))
    assert "data.context_size (512)" in msg and "model.context_size (256)" in msg


@pytest.mark.parametrize("key,value,expect", [
    ("stage", "pretrain", "stage"), ("loss_masking", "all", "loss_masking"),
    ("system.dtype", "fp16", "system.dtype"), ("system.device", "mps", "system.device"),
    ("ddp.backend", "mpi", "ddp.backend"), ("lr.min_lr", 1.0, "lr.min_lr"),
    ("data.eval_splits", (), "eval_splits"), ("data.prompt_layout", "f37", "prompt_layout"),
])
def test_bad_values(key, value, expect):
    group, _, leaf = key.rpartition(".")
    msg = _error(lambda c: (c[group] if group else c).update({leaf: value}))
    assert expect in msg


@pytest.mark.slow  # `python -m piano_gpt_jax.train` subprocesses
def test_cli_rejects_bad_config_with_exit_code_2(tmp_path):
    def run(*overrides):
        return subprocess.run(
            [sys.executable, "-m", "piano_gpt_jax.train", "--config", "configs/piano.py:tiny",
             f"--config.out_dir={tmp_path}", *overrides],
            cwd=REPO, capture_output=True, text=True, timeout=120)

    r = run("--config.optimizer.max_itres=5")
    assert r.returncode == 2 and "optimizer.max_iters" in r.stderr
    assert "Traceback" not in r.stderr
    r = run("--config.model.n_head=3")
    assert r.returncode == 2 and "divisible" in r.stderr and "Traceback" not in r.stderr
    r = run("--config.model.n_layer=two")
    assert r.returncode == 2 and "n_layer" in r.stderr and "Traceback" not in r.stderr
    assert not any(tmp_path.iterdir())  # nothing written


@pytest.mark.parametrize("text,want", [
    ("piano_default", "piano_default"),
    ("('high_notes_masking-x5',)", ("high_notes_masking-x5",)),
    ("top_line_masking-x2, stride_notes_masking-x5",
     ("top_line_masking-x2", "stride_notes_masking-x5")),
])
def test_task_lists_from_the_command_line(text, want):
    cfg = get_config("tiny")
    cfg.tasks = text
    assert DataSettings.from_config(build_train_config(cfg)).tasks == want


def test_eval_splits_from_the_command_line():
    cfg = get_config("tiny")
    cfg.data.eval_splits = "('full_val', 'bach')"
    assert DataSettings.from_config(build_train_config(cfg)).eval_splits == ("full_val", "bach")
    cfg.data.eval_splits = "('full_val'"
    with pytest.raises(ConfigError, match="data.eval_splits"):
        build_train_config(cfg)
