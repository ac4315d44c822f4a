"""Scale-out on one machine: several JAX processes as one job (the launcher), and FSDP.

- 2 processes x 1 device train exactly as 1 process x 2 devices (next-token and PIANO-task data,
  dropout on, gradient accumulation), into one run directory written once;
- kill -9 of one process stops the job within 60 s with one line; the same command resumes and
  ends exactly as the uninterrupted 2-process run;
- a 2-process run resumes on 1 process, and a 1-process run on 2;
- FSDP over 4 devices trains as data parallelism, holds a quarter of the bytes per device, and
  its checkpoints restore into either layout; its .pt export is one full state_dict.
"""

from __future__ import annotations

import os
import re
import shutil
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
STEPS, EVAL = 12, 4

pytestmark = pytest.mark.slow


def args(dataset: Path, out: Path, *extra: str, stage: str = "next_token_pretraining",
         steps: int = STEPS) -> list[str]:
    common = ["--config", "configs/piano.py:tiny", f"--config.out_dir={out}",
              f"--config.dataset.base_dataset_name={dataset}", f"--config.stage={stage}",
              "--config.model.n_layer=1", "--config.model.n_head=2", "--config.model.n_embd=32",
              "--config.model.context_size=96", "--config.data.context_size=96",
              "--config.data.batch_size=4", "--config.model.dropout=0.1",
              "--config.optimizer.gradient_accumulation_steps=2",
              f"--config.optimizer.max_iters={steps}", "--config.lr.warmup_iters=3",
              # fixed, not max_iters (the default): runs stopped early keep the same schedule
              f"--config.lr.lr_decay_iters={2 * STEPS}",
              f"--config.eval_interval={EVAL}", "--config.eval_iters=1",
              "--config.logging.log_interval=1", "--config.checkpoint.keep_last=2",
              "--config.data.notes_per_record=16", "--config.tasks=piano_medium"]
    return common + list(extra)


def env(devices: int = 1) -> dict:
    e = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
    e.pop("XLA_FLAGS", None)
    if devices > 1:
        e["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return e


def one_process(run_args: list[str], devices: int = 2) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "piano_gpt_jax.train", *run_args], cwd=REPO,
                       env=env(devices), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def launcher(run_args: list[str], n: int = 2, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "piano_gpt_jax.launch", "-n", str(n),
                             "--grace", "5", "--", *run_args], cwd=REPO, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def two_processes(run_args: list[str]) -> str:
    proc = launcher(run_args)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, (out + err)[-3000:]
    return out


def events(out: Path) -> list[dict]:
    return read_events(out / "metrics.jsonl", reproducible=True)


def assert_same_run(got: Path, want: Path, atol: float) -> None:
    a, b = events(got), events(want)
    assert [(e["event"], e["step"]) for e in a] == [(e["event"], e["step"]) for e in b]
    for x, y in zip(a, b, strict=True):
        for key in ("train_loss", "val_loss"):
            if key in x:
                assert x[key] == pytest.approx(y[key], abs=atol), (x["step"], key)
    import jax

    for name in ("final.pt", "best.pt"):
        p, q = load_any_checkpoint(got / name), load_any_checkpoint(want / name)
        assert p.step == q.step
        for u, v in zip(jax.tree_util.tree_leaves(p.params), jax.tree_util.tree_leaves(q.params),
                        strict=True):
            np.testing.assert_allclose(np.asarray(u), np.asarray(v), atol=max(atol, 1e-6))


@pytest.fixture(scope="module")
def runs(maestro_dataset, tmp_path_factory) -> dict[str, Path]:
    """The reference runs on next-token data: 1 process x 2 devices and 2 processes x 1
    device, each from 0 to STEPS."""
    root = tmp_path_factory.mktemp("scale")
    one, two = root / "one", root / "two"
    one_process(args(maestro_dataset, one))
    log = two_processes(args(maestro_dataset, two))
    return {"root": root, "one": one, "two": two, "log": log}


def test_two_processes_train_as_one_process_with_two_devices(runs):
    assert_same_run(runs["two"], runs["one"], atol=1e-5)
    log = runs["log"]
    assert "[p0] model:" in log and "[p1] model:" not in log  # process 0 logs, once
    assert "mesh data 2 x fsdp 1 over 2 process(es)" in log
    # one run directory, every file written once and complete
    steps = [(e["event"], e["step"]) for e in events(runs["two"])]
    assert len(steps) == len(set(steps))
    out = runs["two"]
    kept = sorted(int(p.name) for p in (out / "checkpoints").iterdir())
    assert kept[-2:] == [STEPS - EVAL, STEPS] and all(
        (out / "checkpoints" / str(s) / "commit_success.txt").exists() for s in kept)
    assert not list(out.rglob("*tmp*")) and (out / "final.pt").exists()


def test_piano_task_data_too(maestro_dataset, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    one_process(args(maestro_dataset, one, stage="piano_task", steps=EVAL))
    two_processes(args(maestro_dataset, two, stage="piano_task", steps=EVAL))
    assert_same_run(two, one, atol=1e-5)


def test_kill_9_of_one_process_stops_the_job_and_the_same_command_resumes(maestro_dataset,
                                                                          runs, tmp_path):
    out = tmp_path / "killed"
    run_args = args(maestro_dataset, out)
    proc = launcher(run_args)
    deadline = time.time() + 300
    while time.time() < deadline and not _logged(out, EVAL + 1):
        time.sleep(0.01)
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    killed_at = time.time()
    os.kill(int(children[1]), signal.SIGKILL)
    out_log, err = proc.communicate(timeout=120)
    assert time.time() - killed_at < 60 and proc.returncode != 0
    assert "Traceback" not in out_log + err  # the survivor's dying words are not shown
    last = err.strip().splitlines()[-1]
    assert re.match(r"error: process 1 of 2 \(pid \d+\) ended with killed by SIGKILL; stopped "
                    r"the others \(p0 .*\)\. Run the same command to resume", last), last
    two_processes(run_args)  # the same command
    assert_same_run(out, runs["two"], atol=1e-6)


@pytest.mark.parametrize("direction", ["2 -> 1 process", "1 -> 2 processes"])
def test_a_run_resumes_on_another_number_of_processes(maestro_dataset, runs, tmp_path,
                                                      direction):
    source, want = ("two", "one") if direction.startswith("2") else ("one", "two")
    out = tmp_path / "moved"
    shutil.copytree(runs[source], out)
    shutil.rmtree(out / "checkpoints" / str(STEPS))  # resume from STEPS - EVAL
    if source == "two":
        log = one_process(args(maestro_dataset, out)).stdout
    else:
        log = two_processes(args(maestro_dataset, out))
    assert f"resumed from {out}/checkpoints/{STEPS - EVAL}" in log
    assert_same_run(out, runs[want], atol=1e-5)


def _logged(out: Path, step: int) -> bool:
    return any(e["event"] == "train" and e["step"] >= step
               for e in read_events(out / "metrics.jsonl"))


def test_each_process_builds_only_its_block_of_every_global_batch():
    """The data each process touches: its own rows of each global batch, disjoint from the
    other's, together the very batch (same order) one process would build."""
    from piano_gpt_jax.data import loader

    class Counting:
        def __init__(self):
            self.touched: list[int] = []

        def __len__(self) -> int:
            return 50

        def example(self, index, rng=None, aug=None):
            self.touched.append(int(index))
            return {"tokens": np.asarray([index])}

    whole = loader.train_dataset(Counting(), seed=1, batch_size=8)
    parts = [Counting(), Counting()]
    shards = [loader.train_dataset(parts[p], seed=1, batch_size=4, shard_index=p, shard_count=2)
              for p in (0, 1)]
    for k in range(20):  # past the first epoch (50 records) too
        rows = [shards[p][k]["tokens"][:, 0] for p in (0, 1)]
        np.testing.assert_array_equal(np.concatenate(rows), whole[k]["tokens"][:, 0])
    assert len(parts[0].touched) == len(parts[1].touched) == 20 * 4  # nothing else was read
    first_epoch = [set(p.touched[:24]) for p in parts]  # 6 batches of 4 in the first 50
    assert not first_epoch[0] & first_epoch[1]


# ------------------------------------------------------------------------------ bad input
def test_a_batch_the_processes_cannot_split_is_refused():
    from piano_gpt_jax.data.settings import DataSettings

    with pytest.raises(ValueError, match=r"batch_size 3 must be divisible by the number of JAX "
                                         r"processes \(2\)"):
        DataSettings(batch_size=3, shard_index=0, shard_count=2)


def test_a_coordinator_that_never_comes_up_times_out_with_a_message(maestro_dataset, tmp_path):
    from piano_gpt_jax.launch import free_port

    e = {**env(), "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{free_port()}",
         "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "piano_gpt_jax.train",
                        *args(maestro_dataset, tmp_path / "x", "--config.ddp.timeout_s=2")],
                       cwd=REPO, env=e, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and time.time() - t0 < 60
    assert "could not join the coordinator at 127.0.0.1:" in r.stderr.strip().splitlines()[-1]


def test_processes_with_different_configs_are_refused(maestro_dataset, tmp_path):
    from piano_gpt_jax.launch import free_port

    address = f"127.0.0.1:{free_port()}"
    procs = []
    for i, lr in enumerate(("1e-3", "2e-3")):
        e = {**env(), "JAX_COORDINATOR_ADDRESS": address, "JAX_NUM_PROCESSES": "2",
             "JAX_PROCESS_ID": str(i)}
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "piano_gpt_jax.train",
             *args(maestro_dataset, tmp_path / "x", f"--config.lr.learning_rate={lr}")],
            cwd=REPO, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 2 and "run a different config than process 0" in err


# ------------------------------------------------------------------------------ FSDP
def test_fsdp_trains_as_data_parallelism_in_a_quarter_of_the_memory(maestro_dataset, tmp_path):
    fsdp_args = ("--config.system.param_sharding=fsdp",)
    wide = ("--config.model.n_embd=64", "--config.data.batch_size=8")
    dp, fsdp = tmp_path / "dp", tmp_path / "fsdp"
    r_dp = one_process(args(maestro_dataset, dp, *wide, steps=2 * EVAL), devices=4)
    r_fs = one_process(args(maestro_dataset, fsdp, *wide, *fsdp_args, steps=EVAL), devices=4)
    mib = lambda r: [float(x) for x in re.findall(r"per device: params ([\d.]+) MiB \+ "
                                                  r"optimizer state ([\d.]+) MiB", r.stdout)[0]]
    print("per device (MiB, params / optimizer state): data parallel", mib(r_dp), "fsdp",
          mib(r_fs))
    assert "mesh data 1 x fsdp 4" in r_fs.stdout
    for full, quarter in zip(mib(r_dp), mib(r_fs), strict=True):
        assert 0.24 < quarter / full < 0.30  # only the LayerNorm vectors stay whole
    a, b = events(fsdp), events(dp)[:len(events(fsdp))]
    for x, y in zip(a, b, strict=True):
        for key in ("train_loss", "val_loss"):
            if key in x:
                assert x[key] == pytest.approx(y[key], abs=1e-5)
    # an FSDP checkpoint restores into the data-parallel layout (and on to the same end) ...
    one_process(args(maestro_dataset, fsdp, *wide, steps=2 * EVAL), devices=4)
    assert_same_run(fsdp, dp, atol=1e-5)
    # ... a data-parallel one into FSDP, whose export is one full state_dict
    back = tmp_path / "back"
    shutil.copytree(dp, back)
    shutil.rmtree(back / "checkpoints" / str(2 * EVAL))
    one_process(args(maestro_dataset, back, *wide, *fsdp_args, steps=2 * EVAL), devices=4)
    assert_same_run(back, dp, atol=1e-5)
    import torch

    state = torch.load(back / "final.pt", weights_only=False)["model"]
    assert tuple(state["transformer.wte.weight"].shape) == (2265, 64)
    assert tuple(state["transformer.h.0.mlp.c_fc.weight"].shape) == (256, 64)
