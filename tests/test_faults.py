"""Faults and bad input: every case ends in the right behaviour or one clear line and a non-zero
exit, and nothing a user had is overwritten or deleted.

The trainer runs in-process (`train(cfg)`) on a tiny next-token model over the MAESTRO import;
command-line cases run the real CLI in a subprocess.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from piano_gpt_jax import train as trainer
from piano_gpt_jax.checkpoints import TrainCheckpointer, load_model_checkpoint
from piano_gpt_jax.config import ConfigError, build_train_config, set_dotted
from piano_gpt_jax.run_log import read_events

REPO = Path(__file__).resolve().parents[1]
MAX_ITERS, EVAL = 6, 3

pytestmark = pytest.mark.slow


def config(dataset: Path, out: Path, **over) -> dict:
    cfg = {"out_dir": str(out), "stage": "next_token_pretraining", "seed": 3,
           "model": {"n_layer": 1, "n_head": 2, "n_embd": 32, "context_size": 64},
           "system": {"device": "cpu", "dtype": "float32", "data_workers": 0},
           "data": {"batch_size": 4, "context_size": 64},
           "dataset": {"base_dataset_name": str(dataset)},
           "optimizer": {"max_iters": MAX_ITERS}, "lr": {"warmup_iters": 2},
           "eval_interval": EVAL, "eval_iters": 1, "logging": {"log_interval": 1},
           "checkpoint": {"keep_last": 2}}
    return set_dotted(cfg, over)


def train(dataset: Path, out: Path, **over) -> dict:
    return trainer.train(build_train_config(config(dataset, out, **over)))


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def weights(path: Path) -> list[np.ndarray]:
    import jax

    from piano_gpt_jax.checkpoints import load_any_checkpoint

    return [np.asarray(x) for x in jax.tree_util.tree_leaves(load_any_checkpoint(path).params)]


@pytest.fixture(scope="module")
def finished(maestro_dataset, tmp_path_factory) -> Path:
    """An uninterrupted run: checkpoints 3 and 6, metrics.jsonl, final.pt, best.pt."""
    out = tmp_path_factory.mktemp("faults") / "run"
    train(maestro_dataset, out)
    return out


def copy_run(finished: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    return out


# ------------------------------------------------------------------------- 1. lost files
def test_a_new_run_never_overwrites_an_earlier_runs_outputs(maestro_dataset, finished,
                                                             tmp_path):
    out = copy_run(finished, tmp_path)
    shutil.rmtree(out / "checkpoints")
    before = {name: digest(out / name) for name in ("final.pt", "best.pt", "metrics.jsonl")}
    with pytest.raises(trainer.UsageError, match=r"earlier run \(final.pt, best.pt\).*"
                                                 r"another --config.out_dir.*overwrite=True"):
        train(maestro_dataset, out)
    assert {name: digest(out / name) for name in before} == before
    assert sorted(p.name for p in out.iterdir()) == ["best.pt", "final.pt", "metrics.jsonl"]
    # the explicit key starts over, moving (not deleting) the earlier outputs
    train(maestro_dataset, out, overwrite=True)
    (replaced,) = out.glob("replaced-*")
    assert {name: digest(replaced / name) for name in before} == before
    assert (out / "final.pt").exists() and len(list((out / "checkpoints").iterdir())) == 2


def test_a_start_that_never_reached_a_checkpoint_starts_over(maestro_dataset, finished,
                                                             tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    lines = [json.loads(x) for x in (finished / "metrics.jsonl").read_text().splitlines()]
    early = [e for e in lines if e["step"] < EVAL]
    (out / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in early))
    train(maestro_dataset, out)
    assert _comparable(out) == _comparable(finished)


# -------------------------------------------------------- 2, 3. preemption and damaged steps
DAMAGE = {
    "step directory deleted": lambda d: shutil.rmtree(d),
    "params data deleted": lambda d: shutil.rmtree(d / "params" / "ocdbt.process_0"),
    "params data truncated": lambda d: [f.write_bytes(f.read_bytes()[:100]) for f in
                                        (d / "params" / "ocdbt.process_0" / "d").iterdir()],
    "train item deleted": lambda d: shutil.rmtree(d / "train"),
    "garbage in meta": lambda d: (d / "meta" / "metadata").write_text("garbage"),
    "garbage in data state": lambda d: (d / "data" / "metadata").write_text("{"),
    # orbax's own files included: its manager parses _CHECKPOINT_METADATA and metrics on opening
    "every file truncated": lambda d: [f.write_bytes(b"") for f in d.rglob("*") if f.is_file()],
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_latest_checkpoint_is_set_aside_and_the_run_continues_in_one_go(
        maestro_dataset, finished, tmp_path, damage, capfd):
    out = copy_run(finished, tmp_path)
    DAMAGE[damage](out / "checkpoints" / str(MAX_ITERS))
    capfd.readouterr()
    # read-only tools fall back too when what they read (params, meta) is damaged, without
    # touching the directory
    weights_intact = damage in ("train item deleted", "garbage in data state")
    assert load_model_checkpoint(out).step == (MAX_ITERS if weights_intact else EVAL)
    train(maestro_dataset, out)  # resumes from 3, trains to 6, saves 6 again
    assert _comparable(out) == _comparable(finished)
    for a, b in zip(weights(out / "final.pt"), weights(finished / "final.pt"), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    if damage != "step directory deleted":
        (aside,) = (out / "damaged").iterdir()  # moved aside, never deleted
        assert aside.name.startswith(f"{MAX_ITERS}-") and (aside / "DAMAGED.txt").exists()
    err = capfd.readouterr().err
    assert "Traceback" not in err and "ERROR:" not in err, err  # said in one line, no orbax log


def test_every_checkpoint_damaged_is_said_and_starting_over_takes_overwrite(
        maestro_dataset, finished, tmp_path):
    out = copy_run(finished, tmp_path)
    for step in (EVAL, MAX_ITERS):
        for f in (out / "checkpoints" / str(step) / "params").rglob("*"):
            if f.is_file():
                f.write_bytes(f.read_bytes()[:3])
    before = {name: digest(out / name) for name in ("final.pt", "best.pt", "metrics.jsonl")}
    with pytest.raises(trainer.UsageError, match=rf"found 2 damaged checkpoint\(s\) \(step "
                                                 rf"{MAX_ITERS}, {EVAL}\).*moved them to .*damaged"
                                                 r".*overwrite=True"):
        train(maestro_dataset, out)
    assert {name: digest(out / name) for name in before} == before
    assert len(list((out / "damaged").iterdir())) == 2
    train(maestro_dataset, out, overwrite=True)  # starts over, the earlier exports moved aside
    assert _comparable(out) == _comparable(finished) and list(out.glob("replaced-*"))


def test_leftover_temporary_files_are_cleaned(maestro_dataset, finished, tmp_path):
    out = copy_run(finished, tmp_path)
    shutil.rmtree(out / "checkpoints" / str(MAX_ITERS))
    (out / "checkpoints" / f"{MAX_ITERS}.orbax-checkpoint-tmp-1234").mkdir()
    (out / ".final.pt.abc.tmp").write_bytes(b"half")
    train(maestro_dataset, out)
    assert not list(out.glob("**/*orbax-checkpoint-tmp*")) and not list(out.glob(".*.tmp"))


def test_an_intact_checkpoint_of_another_setup_is_not_called_damaged(maestro_dataset, finished,
                                                                      tmp_path):
    out = copy_run(finished, tmp_path)
    with pytest.raises(trainer.UsageError, match="intact but does not fit"):
        train(maestro_dataset, out, **{"optimizer.grad_clip": 0.0})  # no clip state in chain
    assert not (out / "damaged").exists() and len(list((out / "checkpoints").iterdir())) == 2


# ------------------------------------------------------------------------- 5. non-finite
def test_a_loss_that_turns_non_finite_stops_the_run_without_saving_it(maestro_dataset,
                                                                      tmp_path):
    out = tmp_path / "run"
    with pytest.raises(trainer.NonFiniteLoss, match=r"not finite for the last 2 update"):
        train(maestro_dataset, out, nonfinite_patience=2, **{
            "lr.learning_rate": 1e30, "lr.min_lr": 0.0, "lr.warmup_iters": 0,
            "optimizer.max_iters": 30, "eval_interval": 10})
    saved = TrainCheckpointer(out, 2)
    assert saved.latest_step() is None  # nothing with NaN weights was written
    saved.close()
    assert not (out / "final.pt").exists()


def test_non_finite_numbers_are_refused_in_the_config():
    for key in ("lr.learning_rate", "lr.min_lr", "optimizer.weight_decay", "model.dropout"):
        section, leaf = key.split(".")
        with pytest.raises(ConfigError, match=f"'{key}' is nan; it must be a finite number"):
            build_train_config({section: {leaf: float("nan")}})


# ------------------------------------------------------------------------- 6. I/O faults
def test_a_full_disk_is_one_line_and_the_run_resumes_afterwards(maestro_dataset, finished,
                                                                 tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_save = TrainCheckpointer.save

    def save(self, step, *args, **kw):
        if step == MAX_ITERS:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(self, step, *args, **kw)

    monkeypatch.setattr(TrainCheckpointer, "save", save)
    with pytest.raises(trainer.CheckpointWriteError,
                       match=rf"could not write checkpoint {MAX_ITERS} .*no space left on the "
                             rf"device\); checkpoint {EVAL} is complete: run the same command"):
        train(maestro_dataset, out)
    monkeypatch.setattr(TrainCheckpointer, "save", real_save)
    train(maestro_dataset, out)
    assert _comparable(out) == _comparable(finished)


@pytest.mark.parametrize("where", ["a file", "/proc", "/sys"])
def test_an_unusable_out_dir_is_one_line(maestro_dataset, tmp_path, where):
    out = {"a file": tmp_path / "file", "/proc": Path("/proc/piano-gpt-jax/run"),
           "/sys": Path("/sys/piano-gpt-jax")}[where]
    if where == "a file":
        out.write_text("mine")
    with pytest.raises(trainer.UsageError, match="is a file|cannot write to out_dir"):
        train(maestro_dataset, out)
    if where == "a file":
        assert out.read_text() == "mine"


def test_a_run_stopped_by_a_data_check_leaves_no_out_dir(tmp_path):
    out = tmp_path / "new"
    with pytest.raises(trainer.UsageError, match="cannot build the data pipeline"):
        train(tmp_path / "no-such-dataset", out)
    assert not out.exists()


# ------------------------------------------------------------------------- CLI
def cli(*args: str, module: str = "piano_gpt_jax.train", timeout: int = 300):
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "JAX_PLATFORMS": ""})


CLI_CASES = {
    "gpu recipe on a CPU machine": (["--config", "configs/piano.py"],
                                    "system.device asks for 'cuda' but JAX cannot use it"),
    "misplaced key": (["--config", "configs/piano.py:tiny", "--config.max_iters=3"],
                      "Did you mean 'optimizer.max_iters'?"),
    "misplaced log_interval": (["--config", "configs/piano.py:tiny",
                                "--config.log_interval=3"],
                               "Did you mean 'logging.log_interval'?"),
    "not a number": (["--config", "configs/piano.py:tiny", "--config.model.n_layer=abc"],
                     "invalid literal for int() with base 10: 'abc'"),
    "unknown preset": (["--config", "configs/piano.py:huge"],
                       "bad command line: unknown preset 'huge' for configs/piano.py; choose "
                       "one of: tiny,"),
}


@pytest.mark.parametrize("case", sorted(CLI_CASES))
def test_command_line_mistakes_are_one_line(case):
    args, message = CLI_CASES[case]
    r = cli(*args)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") and message in lines[-1], lines[-3:]
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("signal_name", ["SIGINT", "SIGTERM"])
def test_ctrl_c_writes_a_checkpoint_and_says_how_to_resume(maestro_dataset, finished, tmp_path,
                                                           signal_name):
    import signal
    import time

    out = tmp_path / "run"
    args = _cli_args(maestro_dataset, out) + ["--config.optimizer.max_iters=400"]
    proc = subprocess.Popen([sys.executable, "-m", "piano_gpt_jax.train", *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    deadline = time.time() + 120
    while time.time() < deadline and not _logged_step(out, 2):
        time.sleep(0.05)
    proc.send_signal(getattr(signal, signal_name))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"interrupted ({signal_name}) at step ") and "Traceback" not in err
    step = int(last.split("at step ")[1].split(";")[0])
    assert f"checkpoint {step} is written: run the same command to resume" in last
    saved = TrainCheckpointer(out, 2)
    assert saved.latest_step() == step
    saved.close()


def _cli_args(dataset: Path, out: Path) -> list[str]:
    c = config(dataset, out)
    return ["--config", "configs/piano.py:tiny", f"--config.out_dir={out}",
            "--config.stage=next_token_pretraining", "--config.seed=3",
            "--config.model.n_layer=1", "--config.model.n_head=2", "--config.model.n_embd=32",
            "--config.model.context_size=64", "--config.data.context_size=64",
            "--config.data.batch_size=4", f"--config.dataset.base_dataset_name={dataset}",
            "--config.optimizer.gradient_accumulation_steps=1",
            f"--config.optimizer.max_iters={c['optimizer']['max_iters']}",
            "--config.lr.warmup_iters=2", f"--config.eval_interval={EVAL}",
            "--config.eval_iters=1", "--config.logging.log_interval=1",
            "--config.checkpoint.keep_last=2"]


def _logged_step(out: Path, step: int) -> bool:
    path = out / "metrics.jsonl"
    if not path.exists():
        return False
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) >= step and json.loads(line)["event"] == "train":
                return True
        except json.JSONDecodeError:
            pass
    return False


def _comparable(out: Path) -> list[dict]:
    """metrics.jsonl without what depends on the wall clock."""
    return read_events(out / "metrics.jsonl", reproducible=True)
