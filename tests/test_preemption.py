"""Preemption: SIGKILL at seeded random moments — between steps, in evaluations, inside
checkpoint saves and exports — then the same command once; every restart must continue, and the
run's metrics.jsonl and .pt exports must equal an uninterrupted run's.

`PIANO_GPT_PREEMPT_KILLS` sets the number of kills (default 10, about a minute and a half on 2
cores; more for a longer soak).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from piano_gpt_jax.checkpoints import load_any_checkpoint
from piano_gpt_jax.run_log import read_events

REPO = Path(__file__).resolve().parents[1]
MAX_ITERS, EVAL = 24, 2  # a save every other step: many kills land inside one
KILLS = int(os.environ.get("PIANO_GPT_PREEMPT_KILLS", "10"))

pytestmark = pytest.mark.slow


def command(dataset: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "piano_gpt_jax.train", "--config", "configs/piano.py:tiny",
            f"--config.out_dir={out}", f"--config.dataset.base_dataset_name={dataset}",
            "--config.stage=next_token_pretraining", "--config.model.n_layer=1",
            "--config.model.n_head=2", "--config.model.n_embd=32",
            "--config.model.context_size=64", "--config.data.context_size=64",
            "--config.data.batch_size=4", "--config.model.dropout=0.1",
            "--config.optimizer.gradient_accumulation_steps=2",
            f"--config.optimizer.max_iters={MAX_ITERS}", "--config.lr.warmup_iters=3",
            f"--config.eval_interval={EVAL}", "--config.eval_iters=1",
            "--config.logging.log_interval=1", "--config.checkpoint.keep_last=2"]


ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}


def events(out: Path) -> list[dict]:
    return read_events(out / "metrics.jsonl")


def comparable(out: Path) -> list[dict]:
    return read_events(out / "metrics.jsonl", reproducible=True)


def last_step(out: Path) -> int:
    return max((e["step"] for e in events(out) if e["event"] == "train"), default=0)


def saving(out: Path) -> bool:
    """A checkpoint or an export is being written right now."""
    return any(out.glob("checkpoints/*.orbax-checkpoint-tmp*")) or any(out.glob(".*.pt.*.tmp"))


def kill_at(proc: subprocess.Popen, out: Path, mode: str, target: int, deadline: float) -> str:
    """SIGKILL when `mode` happens: "step" (training passed `target`) or "save" (a write is in
    flight at or after step `target`). Returns what was interrupted."""
    while time.time() < deadline and proc.poll() is None:
        step = last_step(out)
        if mode == "save" and step >= target and saving(out):
            break
        if mode == "step" and step >= target:
            break
        time.sleep(0.005)
    if proc.poll() is not None:
        return "finished"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return f"{mode}@{last_step(out)}"


def test_sigkill_at_random_moments_then_the_same_command_continues_exactly(maestro_dataset,
                                                                           tmp_path):
    reference = tmp_path / "reference"
    r = subprocess.run(command(maestro_dataset, reference), cwd=REPO, env=ENV,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]

    out = tmp_path / "preempted"
    rng = random.Random(20261126)
    kills = []
    for _ in range(KILLS):
        progress = last_step(out)
        mode = rng.choice(["step", "save", "save"])
        target = min(progress + rng.randint(0, 5), MAX_ITERS)
        proc = subprocess.Popen(command(maestro_dataset, out), cwd=REPO, env=ENV,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        kills.append(kill_at(proc, out, mode, target, time.time() + 120))
        if kills[-1] == "finished":  # ran to the end before the kill: its log must say so
            assert proc.returncode == 0, proc.stderr.read()[-3000:]
            break
    print("kills:", kills)
    assert sum(k != "finished" for k in kills) >= min(KILLS, 10) or kills[-1] == "finished"
    assert any(k.startswith("save@") for k in kills)  # some landed inside a write

    r = subprocess.run(command(maestro_dataset, out), cwd=REPO, env=ENV, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr

    got, want = comparable(out), comparable(reference)
    assert [e["step"] for e in got] == [e["step"] for e in want]
    for a, b in zip(got, want, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            if isinstance(a[key], float):
                assert a[key] == pytest.approx(b[key], abs=1e-6), (a["step"], key)
            else:
                assert a[key] == b[key], (a["step"], key)
    for name in ("final.pt", "best.pt"):
        ours, theirs = load_any_checkpoint(out / name), load_any_checkpoint(reference / name)
        assert ours.step == theirs.step and ours.meta.total_tokens == theirs.meta.total_tokens
        import jax

        for x, y in zip(jax.tree_util.tree_leaves(ours.params),
                        jax.tree_util.tree_leaves(theirs.params), strict=True):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6)
    assert not list(out.glob("**/*orbax-checkpoint-tmp*")) and not list(out.glob(".*.tmp"))
