"""The trainer's refusals around init_from / init_optimizer: one clear message, exit code 2,
nothing written (the out_dir is not even created)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from piano_gpt_jax import train as trainer
from piano_gpt_jax.config import ConfigError, build_train_config

REPO = Path(__file__).resolve().parents[1]


def _variant(reference_checkpoint, tmp_path: Path, name: str, mutate) -> Path:
    path, _ = reference_checkpoint(bias=True)
    ckpt = torch.load(path, weights_only=False)
    mutate(ckpt)
    out = tmp_path / name
    torch.save(ckpt, out)
    return out


def _move_one_param_between_groups(ckpt):
    groups = ckpt["optimizer"]["param_groups"]
    groups[0]["params"].append(groups[1]["params"].pop(0))


def _wrong_moment_shape(ckpt):
    ckpt["optimizer"]["state"][0]["exp_avg"] = torch.zeros(3, 3)


CASES = {
    "no optimizer": (lambda c: c.pop("optimizer"), True, "holds no optimizer state"),
    "group sizes": (_move_one_param_between_groups, True,
                    r"groups of sizes \[11, 17\], but this model needs \[10, 18\]"),
    "moment shape": (_wrong_moment_shape, True, r"exp_avg of parameter 0 .* shape \(3, 3\)"),
    "foreign run_config": (lambda c: c.__setitem__("run_config", {"foo": {"bar": 1}}), False,
                           "neither vocabulary"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_init_checkpoints_stop_before_anything_is_written(reference_checkpoint, tmp_path,
                                                               case):
    mutate, init_optimizer, message = CASES[case]
    pt = _variant(reference_checkpoint, tmp_path, "bad.pt", mutate)
    out = tmp_path / "run"
    cfg = build_train_config({"out_dir": str(out), "init_from": str(pt),
                              "init_optimizer": init_optimizer,
                              "dataset": {"base_dataset_name": str(tmp_path / "no-data")}})
    with pytest.raises(trainer.UsageError, match=message):
        trainer.train(cfg)
    assert not out.exists()


def test_init_from_already_past_max_iters_is_refused_before_anything_is_written(
        reference_checkpoint, tmp_path):
    """It used to exit 0 with "done: step N", training nothing and leaving an empty
    checkpoints/ and a 0-byte metrics.jsonl."""
    pt, _ = reference_checkpoint(bias=True)  # written at a step past 3
    out = tmp_path / "run"
    cfg = build_train_config({"out_dir": str(out), "init_from": str(pt), "init_optimizer": True,
                              "optimizer": {"max_iters": 3},
                              "dataset": {"base_dataset_name": str(tmp_path / "no-data")}})
    with pytest.raises(trainer.UsageError, match=r"at step (\d+), already at or past "
                                                 r"optimizer.max_iters=3.*above \1"):
        trainer.train(cfg)
    assert not out.exists()


@pytest.mark.slow  # a `python -m piano_gpt_jax.train` subprocess
def test_the_command_line_exits_2_with_one_line(reference_checkpoint, tmp_path):
    pt = _variant(reference_checkpoint, tmp_path, "legacy.pt", lambda c: c.pop("optimizer"))
    out = tmp_path / "run"
    r = subprocess.run(
        [sys.executable, "-m", "piano_gpt_jax.train", "--config", "configs/piano.py:tiny",
         f"--config.init_from={pt}", "--config.init_optimizer=True",
         f"--config.out_dir={out}"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert "holds no optimizer state" in r.stderr and "drop init_optimizer" in r.stderr
    assert not out.exists()


def test_init_optimizer_needs_a_checkpoint():
    with pytest.raises(ConfigError, match="init_optimizer=True .* init_from is "
                                          "scratch_next_token"):
        build_train_config({"init_optimizer": True})


def test_a_checkpoint_vocabulary_without_room_for_the_prompt_layout_stops(tmp_path):
    """init_from a piano-gpt f37ac14-era vocabulary (1241 tokens, 1024 special ids) but ask for
    the head prompt layout: its 1,371 prefix tokens cannot fit the 979 free slots. One message
    names the numbers and the fix, before any data is read or anything is written."""
    import jax

    from piano_gpt_jax.checkpoints import CheckpointRecord, RunMeta
    from piano_gpt_jax.checkpoints.torch_format import save_torch_checkpoint
    from piano_gpt_jax.model import ModelConfig, init_params
    from piano_gpt_jax.music import layouts
    from piano_gpt_jax.music.tokenizer import ExponentialTimeTokenizer

    tok = ExponentialTimeTokenizer.build({"time_unit": 0.01, "max_time_step": 1.0,
                                          "n_velocity_bins": 32, "n_special_ids": 1024})
    tok.add_special_tokens([*layouts.DATASET_TOKENS, *layouts.COMPOSER_TOKENS, "<GENAI>"])
    model = ModelConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=16,
                        context_size=64)
    pt = save_torch_checkpoint(tmp_path / "f37ac14.pt", CheckpointRecord(
        model, init_params(model, jax.random.PRNGKey(0)), tok.to_dict(), RunMeta(step=5)))
    out = tmp_path / "run"
    cfg = build_train_config({"out_dir": str(out), "init_from": str(pt),
                              "model": {"context_size": 64}, "data": {
                                  "context_size": 64, "prompt_layout": "head"},
                              "dataset": {"base_dataset_name": str(tmp_path / "no-data")}})
    with pytest.raises(trainer.UsageError,
                       match=r"vocab_size 1241, n_special_ids 1024\) has \d+ free special-token "
                             r"slots.*'annotated' prompt layout.*data.prompt_layout='plain'"):
        trainer.train(cfg)
    assert not out.exists()


def test_help_shows_the_usage_and_the_presets(capsys):
    assert trainer.main(["piano_gpt_jax.train", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m piano_gpt_jax.train --config configs/piano.py")
    assert "tiny" in out and "gpt2_medium" in out and 'README.md "Configuration"' in out
