"""Run directories: metrics (with a torn line), curves per split, config from checkpoint meta."""

from __future__ import annotations

import json

import pytest

from piano_gpt_jax.app import runs
from piano_gpt_jax.app.testing_support import write_metrics


def test_metrics_curves_and_latest_eval(tmp_path):
    write_metrics(tmp_path / "a", steps=20, eval_every=10)
    run = runs.load_run(tmp_path / "a")
    assert run.torn_lines == 1 and len(run.of_kind("train")) == 20
    curves = runs.loss_curves([run])
    assert set(curves["curve"]) == {"train", "val full_val", "val bach"}  # NaN split dropped
    assert curves[curves.curve == "val bach"]["step"].tolist() == [0, 10, 20]
    assert curves["tokens"].max() == 20 * 2 * 96
    lr = runs.train_series([run], "lr")
    assert lr["lr"].iloc[-1] == 1e-3 and len(lr) == 20
    table = runs.latest_eval(run)
    assert table.attrs["step"] == 20 and {"full_val", "bach"} <= set(table.index)
    assert runs.latest_task_eval(run) is None
    assert run.config is None and run.exports == []


def test_find_runs_config_and_task_eval(tmp_path, runs_root):
    assert [p.name for p in runs.find_runs(runs_root)] == ["other", "tiny", "tiny-b"]
    run = runs.load_run(runs_root / "tiny")
    assert runs.config_value(run.config, "data.context_size") == 96
    assert "meta" in run.config_source
    assert runs.config_value({"data.notes_per_record": 7}, "data.notes_per_record") == 7
    assert runs.flat_config({"a": {"b": 1, "c": {"d": 2}}, "e": 3}) == {"a.b": 1, "a.c.d": 2,
                                                                       "e": 3}
    d = tmp_path / "r"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"lr": 0.1}))
    rows = [{"event": "task_eval", "step": s, "split": "full_val", "task": t, "f1": 0.5}
            for s in (5, 9) for t in ("all", "top_line_masking-x1")]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "final.pt").write_bytes(b"x")
    run = runs.load_run(d)
    assert run.config == {"lr": 0.1} and [p.name for p in run.exports] == ["final.pt"]
    assert len(runs.latest_task_eval(run)) == 2
    assert runs.find_runs(tmp_path / "missing") == []


def test_the_learning_rate_chart_shows_warmup_before_the_first_logged_step(tmp_path):
    """Logged every 25 steps, the chart used to start at step 25 and never show warmup; it is
    the run config's schedule from update 1."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    events = [{"event": "train", "step": s, "train_loss": 3.0, "lr": 0.0, "tokens": s * 100}
              for s in (25, 50, 75, 100)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    run = runs.load_run(run_dir)
    run.config = {"optimizer.max_iters": 100, "lr.learning_rate": 1e-3, "lr.min_lr": 1e-4,
                  "lr.warmup_iters": 20, "lr.lr_decay_iters": 100}
    lr = runs.lr_series([run]).set_index("step")["lr"]
    assert lr.index[0] == 1 and lr.loc[1] == pytest.approx(1e-3 / 20)  # warmup, 1-based
    assert lr.loc[20] == pytest.approx(1e-3) and lr.loc[100] == pytest.approx(1e-4)
    run.config = None  # no config: the logged values, as before
    assert runs.lr_series([run])["step"].tolist() == [25, 50, 75, 100]
