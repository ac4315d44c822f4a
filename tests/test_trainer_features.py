"""Trainer features end to end, in process (`train(build_train_config(...))`, no subprocess):
the logged learning rate, init_from a run directory of ours, eval_only on out_dir, the
architecture check on resume, one-hot embeddings, bfloat16, float16 loss scaling across a resume,
wandb (offline), and export_torch=false. One tiny next-token run on the MAESTRO import is shared
by the module; each variant is a few steps."""

from __future__ import annotations

import json
import math
import re
import shutil
import sys
import types
from pathlib import Path

import jax
import numpy as np
import pytest

from converters.testing import reference_lr
from piano_gpt_jax import train as trainer
from piano_gpt_jax.checkpoints import load_model_checkpoint
from piano_gpt_jax.config import build_train_config, set_dotted
from piano_gpt_jax.run import loop as training_loop
from piano_gpt_jax.run_log import METRICS_FILE

pytestmark = pytest.mark.slow
LR = {"learning_rate": 3e-3, "min_lr": 3e-4, "warmup_iters": 2, "lr_decay_iters": 6}


def config(dataset: Path, out_dir: Path, max_iters: int = 4, **over) -> dict:
    """A tiny float32 next-token run: 2 x 2 x 32, context 64, batch 4, eval every 2 steps."""
    cfg = {
        "out_dir": str(out_dir), "stage": "next_token_pretraining",
        "model": {"n_layer": 2, "n_head": 2, "n_embd": 32, "context_size": 64},
        "system": {"device": "cpu", "dtype": "float32", "data_workers": 0},
        "data": {"batch_size": 4, "context_size": 64},
        "dataset": {"base_dataset_name": str(dataset)},
        "optimizer": {"gradient_accumulation_steps": 1, "max_iters": max_iters},
        "lr": dict(LR), "eval_interval": 2, "eval_iters": 1,
        "logging": {"log_interval": 1}, "checkpoint": {"keep_last": 3},
    }
    return set_dotted(cfg, over)


def train(cfg: dict) -> dict:
    return trainer.train(build_train_config(cfg))


def events(out_dir: Path, kind: str | None = None) -> list[dict]:
    lines = (Path(out_dir) / METRICS_FILE).read_text().splitlines()
    return [e for e in map(json.loads, lines) if kind is None or e["event"] == kind]


def train_losses(out_dir: Path) -> dict[int, float]:
    return {e["step"]: e["train_loss"] for e in events(out_dir, "train")}


def schedule(it: int) -> float:
    """The reference schedule (converters.testing.reference_lr) with this module's LR."""
    return reference_lr(it, LR["learning_rate"], LR["min_lr"], LR["warmup_iters"],
                        LR["lr_decay_iters"])


@pytest.fixture(scope="module")
def base(maestro_dataset, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("base") / "run"
    cfg = config(maestro_dataset, out)
    summary = train(cfg)
    return {"cfg": cfg, "out": out, "summary": summary, "dataset": maestro_dataset}


def test_logged_lr_is_the_reference_schedule(base):
    train_events = events(base["out"], "train")
    assert [e["step"] for e in train_events] == [1, 2, 3, 4]
    # The log shows the schedule that ran, computed in float32 inside the step (a few ulp).
    for e in train_events:
        assert e["lr"] == pytest.approx(schedule(e["step"]), rel=3e-7), e
    # the first update uses lr / warmup, not 0; step 4 is on the cosine (4 of 2..6)
    assert train_events[0]["lr"] == pytest.approx(1.5e-3)
    assert train_events[3]["lr"] == pytest.approx(3e-4 + 0.5 * (1 + math.cos(math.pi / 2)) * 2.7e-3)
    for e in events(base["out"], "eval"):
        assert e["lr"] == pytest.approx(schedule(max(e["step"], 1)), rel=3e-7), e


def test_the_log_reports_startup_and_the_loaders_share(base):
    """One startup event (compile time, time to the first update) and, per train line, the
    loader's share of the wall time: fractions, and the first interval leaves compilation out."""
    (startup,) = events(base["out"], "startup")
    assert startup["step"] == 1 and 0 < startup["compile_s"] < startup["first_update_s"]
    train_events = events(base["out"], "train")
    assert all(0.0 <= e["data_share"] < 1.0 for e in train_events)
    assert train_events[0]["step_time_s"] < startup["compile_s"]


def test_init_from_our_run_directory_without_export(base, tmp_path):
    """init_from=<run dir>: its weights, tokenizer and architecture (not the config's n_layer),
    a fresh optimizer from step 0; export_torch=false writes checkpoints but no .pt."""
    out = tmp_path / "tuned"
    summary = train(config(base["dataset"], out, max_iters=2, **{
        "init_from": str(base["out"]), "model.n_layer": 3,
        "checkpoint.export_torch": False}))
    start = load_model_checkpoint(base["out"])
    # Step 0 evaluates the loaded weights on the same fixed batches: the base run's last loss.
    assert summary["first_val_loss"] == pytest.approx(base["summary"]["last_val_loss"], abs=1e-6)
    assert summary["step"] == 2 and sorted(train_losses(out)) == [1, 2]
    tuned = load_model_checkpoint(out)
    assert tuned.model_config.n_layer == 2 and tuned.model_config == start.model_config
    assert tuned.tokenizer_desc == start.tokenizer_desc
    assert tuned.meta.source == str(base["out"])
    assert (out / "checkpoints" / "2").is_dir()
    assert not (out / "final.pt").exists() and not (out / "best.pt").exists()
    assert (base["out"] / "final.pt").is_file()  # the default exports


def test_eval_only_without_init_from_evaluates_out_dir(base, capsys):
    cfg = build_train_config({**base["cfg"], "eval_only": True})
    result = trainer.eval_only(cfg)
    assert result["losses"]["full_val"] == pytest.approx(base["summary"]["last_val_loss"],
                                                         abs=1e-6)
    assert f"validation loss of {base['out']} (step 4" in capsys.readouterr().out


def test_resuming_into_another_architecture_is_refused(base, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(base["out"], out)
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    with pytest.raises(trainer.UsageError, match="holds a run of a different model"):
        train(config(base["dataset"], out, max_iters=6, **{"model.n_layer": 3}))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before
    assert train_losses(out) == train_losses(base["out"])  # its log untouched


def test_one_hot_embedding_trains_like_the_gather(base, tmp_path, monkeypatch):
    calls = []
    one_hot = jax.nn.one_hot
    monkeypatch.setattr(jax.nn, "one_hot", lambda *a, **k: calls.append(a[1]) or one_hot(*a, **k))
    out = tmp_path / "one-hot"
    train(config(base["dataset"], out, max_iters=2, **{"model.one_hot_embedding": True}))
    vocab = load_model_checkpoint(out).model_config.vocab_size
    assert vocab in calls  # the token lookup really ran as a one-hot matmul
    got, want = train_losses(out), train_losses(base["out"])
    for step in (1, 2):
        assert got[step] == pytest.approx(want[step], abs=1e-5), step


def test_bfloat16_run_logged_to_wandb_offline(base, tmp_path, monkeypatch):
    """system.dtype=bfloat16 trains with float32 master weights, its losses off float32's by
    bfloat16 rounding; logging.wandb_log without an API key logs every event offline."""
    calls: list[tuple] = []
    run = types.SimpleNamespace(id=None, log=lambda d, step: calls.append(("log", step, d)),
                                finish=lambda: calls.append(("finish",)))

    def init(**kw):
        calls.append(("init", kw))
        run.id = kw["id"]
        return run

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    for var in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    out = tmp_path / "bf16"
    train(config(base["dataset"], out, max_iters=2, **{"system.dtype": "bfloat16",
                                                        "logging.wandb_log": True}))
    got, want = train_losses(out), train_losses(base["out"])
    for step in (1, 2):  # bfloat16 rounding of logits of ~0.1 (measured ~1e-5); float32: 0
        assert 1e-6 < abs(got[step] - want[step]) < 1e-3, (step, got[step], want[step])
    record = load_model_checkpoint(out)
    assert {np.asarray(x).dtype for x in jax.tree_util.tree_leaves(record.params)} == {
        np.dtype("float32")}

    init_kw = calls[0][1]
    assert calls[0][0] == "init" and init_kw["mode"] == "offline" and init_kw["dir"] == str(out)
    assert init_kw["config"]["system"]["dtype"] == "bfloat16"
    assert record.meta.wandb_id == init_kw["id"]  # the run id the checkpoint (and .pt) carries
    logged = [(c[1], c[2]) for c in calls if c[0] == "log"]
    written = events(out)
    assert [step for step, _ in logged] == [e["step"] for e in written]
    for (_, data), event in zip(logged, written, strict=True):
        assert data == {k: v for k, v in event.items() if k != "step"}
    assert calls[-1] == ("finish",)


def test_float16_loss_scale_survives_a_resume(base, tmp_path, monkeypatch, capsys):
    """float16's dynamic loss scale is part of the checkpoint: stopped at step 4 and resumed, the
    run skips the same overflowing step and ends with the same weights as one uninterrupted run.
    The scale doubles every good step here (growth_interval 1), so it overflows soon after 4."""
    real = training_loop.Precision
    monkeypatch.setattr(training_loop, "Precision",
                        lambda dtype="float32", **kw: real(dtype, **{**kw, "growth_interval": 1}))
    f16 = {"system.dtype": "float16"}

    def scales(text: str) -> dict[int, float]:
        return {int(m[1]): float(m[2])
                for m in re.finditer(r"step\s+(\d+) \|.*\| scale (\d+)", text)}

    whole = tmp_path / "whole"
    train(config(base["dataset"], whole, max_iters=6, **f16))
    want = scales(capsys.readouterr().out)
    assert sorted(want) == [1, 2, 3, 4, 5, 6]
    assert want[5] < want[4]  # an overflow after the resume point: the scale was halved

    split = tmp_path / "split"
    train(config(base["dataset"], split, max_iters=4, **f16))
    capsys.readouterr()
    train(config(base["dataset"], split, max_iters=6, **f16))  # resumes from checkpoint 4
    resumed = capsys.readouterr().out
    assert "resumed from" in resumed
    assert scales(resumed) == {5: want[5], 6: want[6]}
    assert train_losses(split) == train_losses(whole)
    a, b = load_model_checkpoint(split).params, load_model_checkpoint(whole).params
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
