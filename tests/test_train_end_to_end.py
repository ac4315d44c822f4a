"""The trainer end to end on real MAESTRO music: outputs, kill -9 + resume, two devices, eval_only.

Every run is a real `python -m piano_gpt_jax.train` subprocess on a tiny model.
"""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from converters.testing import reference_lr

REPO = Path(__file__).resolve().parent.parent
MAX_ITERS = 12
FINETUNE_DROP = 0.02  # at least this fall in the 2 fine-tuning steps below (measured: 0.05)
VAL_DROP = 0.2  # at least this validation-loss fall over the 12 steps (measured: 7.73 -> 7.43)

# Every test here launches `python -m piano_gpt_jax.train` or needs the module's reference run.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dataset(maestro_dataset):
    return maestro_dataset


def command(dataset, out_dir, *extra):
    return [sys.executable, "-m", "piano_gpt_jax.train", "--config", "configs/piano.py:tiny",
            f"--config.out_dir={out_dir}", f"--config.dataset.base_dataset_name={dataset}",
            "--config.stage=next_token_pretraining", "--config.model.n_layer=2",
            "--config.model.n_head=2", "--config.model.n_embd=32",
            "--config.model.context_size=64", "--config.data.context_size=64",
            "--config.data.batch_size=4", "--config.model.dropout=0.1",
            "--config.optimizer.gradient_accumulation_steps=2",
            f"--config.optimizer.max_iters={MAX_ITERS}", "--config.lr.warmup_iters=3",
            "--config.eval_interval=4", "--config.eval_iters=2", "--config.logging.log_interval=1",
            "--config.checkpoint.keep_last=2", *extra]


def env(devices=1):
    e = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
    if devices > 1:
        e["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return e


def run(dataset, out_dir, *extra, devices=1, check=True):
    r = subprocess.run(command(dataset, out_dir, *extra), cwd=REPO, env=env(devices),
                       capture_output=True, text=True, timeout=400)
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def assert_same_params(a, b):
    flat_a = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(a)}
    flat_b = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(b)}
    assert sorted(flat_a) == sorted(flat_b)
    for key, value in flat_a.items():
        np.testing.assert_array_equal(np.asarray(value), np.asarray(flat_b[key]), err_msg=key)


def events(out_dir):
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


def train_losses(out_dir):
    return {e["step"]: e["train_loss"] for e in events(out_dir) if e["event"] == "train"}


@pytest.fixture(scope="module")
def reference_run(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "run"
    run(dataset, out)
    return out


def test_run_writes_checkpoints_metrics_and_pt(reference_run):
    out = reference_run
    evs = events(out)
    train = [e for e in evs if e["event"] == "train"]
    evals = [e for e in evs if e["event"] == "eval"]
    assert [e["step"] for e in train] == list(range(1, MAX_ITERS + 1))
    assert [e["step"] for e in evals] == [0, 4, 8, 12]
    for e in train:
        assert {"train_loss", "lr", "tokens", "tokens_per_s"} <= set(e)
    assert train[-1]["tokens"] == MAX_ITERS * 2 * 4 * 64
    assert all("val_loss" in e and "val_loss/full_val" in e for e in evals)
    # the tiny preset's schedule with these overrides: warmup 3, decayed over max_iters (12)
    for e in train:
        assert e["lr"] == pytest.approx(reference_lr(e["step"], 1e-3, 1e-4, 3, MAX_ITERS)), e
    best_step = min(evals[1:], key=lambda e: e["val_loss"])["step"]
    kept = sorted(int(p.name) for p in (out / "checkpoints").iterdir())
    assert kept == sorted({8, 12, best_step})  # keep_last 2, plus the best

    from converters import load_torch_checkpoint
    from piano_gpt_jax.checkpoints import load_model_checkpoint

    ours = load_model_checkpoint(out)
    assert ours.step == MAX_ITERS and ours.meta.total_tokens == MAX_ITERS * 2 * 4 * 64
    # Untrained, the model predicts nearly uniformly over the vocabulary: loss ln V. Then a real
    # drop on the same fixed validation batches (a run that does not learn stays near ln V).
    vocab = ours.model_config.vocab_size
    assert vocab == 2265
    assert evals[0]["val_loss"] == pytest.approx(math.log(vocab), abs=0.05)
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - VAL_DROP
    # final.pt is the last checkpoint, every tensor of it; best.pt the best one.
    pt = load_torch_checkpoint(out / "final.pt")
    assert pt.model_config == ours.model_config and pt.step == MAX_ITERS
    assert pt.tokenizer_desc == ours.tokenizer_desc
    assert_same_params(pt.params, ours.params)
    best = load_torch_checkpoint(out / "best.pt")
    assert best.meta.val_loss == pytest.approx(min(e["val_loss"] for e in evals[1:]))
    assert best.step == best_step
    assert_same_params(best.params, load_model_checkpoint(out / "checkpoints" / str(best_step))
                       .params)


def test_kill_9_then_same_command_continues_exactly(dataset, reference_run, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(command(dataset, out), cwd=REPO, env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            # Kill after the step-4 checkpoint is committed (saves are asynchronous), mid-way
            # to the next one.
            metrics = out / "metrics.jsonl"
            committed = (out / "checkpoints" / "4" / "commit_success.txt").exists()
            if committed and metrics.exists() and any(
                    json.loads(line).get("step", 0) >= 6 and json.loads(line)["event"] == "train"
                    for line in metrics.read_text().splitlines() if line.endswith("}")):
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert max(train_losses(out)) < MAX_ITERS  # really interrupted
    r = run(dataset, out)
    assert "resumed from" in r.stderr + r.stdout
    got, want = train_losses(out), train_losses(reference_run)
    assert sorted(got) == list(range(1, MAX_ITERS + 1))  # one event per step: reads as one run
    for step in want:
        assert got[step] == pytest.approx(want[step], abs=1e-6), step
    steps = [e["step"] for e in events(out)]
    assert steps == sorted(steps)


def test_two_devices_match_one(dataset, reference_run, tmp_path):
    out = tmp_path / "run2"
    r = run(dataset, out, devices=2)
    assert "2 x cpu" in r.stderr + r.stdout
    got, want = train_losses(out), train_losses(reference_run)
    assert sorted(got) == sorted(want)
    for step in want:
        assert got[step] == pytest.approx(want[step], abs=1e-5), step
    got_val = [e["val_loss"] for e in events(out) if e["event"] == "eval"]
    want_val = [e["val_loss"] for e in events(reference_run) if e["event"] == "eval"]
    np.testing.assert_allclose(got_val, want_val, atol=1e-5)


def test_eval_only_on_the_exported_pt(dataset, reference_run, tmp_path):
    r = run(dataset, tmp_path / "eval", "--config.eval_only=True",
            f"--config.init_from={reference_run / 'final.pt'}")
    row = next(line for line in r.stdout.splitlines() if line.startswith("full_val"))
    last = [e for e in events(reference_run) if e["event"] == "eval"][-1]
    assert float(row.split()[-1]) == pytest.approx(last["val_loss"], abs=1e-4)


def test_export_safetensors_writes_model_folders_every_tool_reads(dataset, reference_run,
                                                                   tmp_path):
    """checkpoint.export_safetensors: final/ and best/ beside final.pt and best.pt, the same
    weights; init_from reads the folder (eval_only gives the run's last validation loss)."""
    import shutil

    from converters import load_torch_checkpoint
    from piano_gpt_jax.checkpoints import load_any_checkpoint

    out = tmp_path / "run"
    shutil.copytree(reference_run, out)
    run(dataset, out, "--config.checkpoint.export_safetensors=True")  # at max_iters: exports
    for name in ("final", "best"):
        folder = load_any_checkpoint(out / name)
        pt = load_torch_checkpoint(out / f"{name}.pt")
        assert folder.step == pt.step and folder.tokenizer_desc == pt.tokenizer_desc
        assert_same_params(folder.params, pt.params)
        assert (out / name / "README.md").read_text().count("| full_val |") == 1
    r = run(dataset, tmp_path / "eval", "--config.eval_only=True",
            f"--config.init_from={out / 'final'}")
    row = next(line for line in r.stdout.splitlines() if line.startswith("full_val"))
    last = [e for e in events(reference_run) if e["event"] == "eval"][-1]
    assert float(row.split()[-1]) == pytest.approx(last["val_loss"], abs=1e-4)


def test_unknown_eval_split_stops_with_a_message(dataset, tmp_path):
    r = run(dataset, tmp_path / "bad", "--config.data.eval_splits=('full_val','liszt')",
            check=False)
    assert r.returncode == 2 and "['liszt']" in r.stderr and "Traceback" not in r.stderr


def test_finetune_a_pt_on_piano_tasks_then_eval_metrics(dataset, reference_run, tmp_path):
    """init_from a torch .pt: tokenizer and shape from the checkpoint, the task tokens take free
    placeholder slots, loss only after <GENAI>; then eval_only with generation metrics."""
    out = tmp_path / "tuned"
    tune = ("--config.stage=piano_task", "--config.loss_masking=finetuning",
            "--config.tasks=('high_notes_masking-x5',)", "--config.data.notes_per_record=12",
            f"--config.init_from={reference_run / 'final.pt'}",
            "--config.optimizer.max_iters=2", "--config.eval_interval=2")
    r = run(dataset, out, *tune)
    assert "init_from=" in r.stdout + r.stderr
    evals = [e for e in events(out) if e["event"] == "eval"]
    assert [e["step"] for e in evals] == [0, 2]

    from converters import load_torch_checkpoint
    from converters.testing import losses_by_hand
    from piano_gpt_jax.config import build_train_config
    from piano_gpt_jax.data.pipeline import build_tokenizer, make_pipeline
    from piano_gpt_jax.data.settings import DataSettings

    before = load_torch_checkpoint(reference_run / "final.pt")
    after = load_torch_checkpoint(out / "final.pt")
    # The tuned vocabulary: the .pt's ids kept, its size fixed, the PIANO-task tokens written
    # into its free placeholder slots.
    vocab = lambda record: record.tokenizer_desc["parameters"]["lexicon"]["vocab"]
    n_old = before.tokenizer_desc["parameters"]["first_placeholder_id"]
    assert len(vocab(after)) == len(vocab(before)) == after.model_config.vocab_size == 2265
    assert vocab(after)[:n_old] == vocab(before)[:n_old]
    added = vocab(after)[n_old:after.tokenizer_desc["parameters"]["first_placeholder_id"]]
    assert {"<GENAI>", "<EOGENAI>", "<PARAMETRIC_HIGH_NOTES>", "<PARAMETER_5>"} <= set(added)
    assert "<GENAI>" not in vocab(before)
    assert {"<N_NOTES_5>", "<MUSIC_TIME_0>"} <= set(vocab(before)[:n_old])  # there already
    # Loss only after <GENAI>: step 0 evaluated the .pt's own weights on the fixed validation
    # batches; recompute that loss by hand from the tokens, over the answer positions only.
    settings = DataSettings.from_config(build_train_config(after.meta.config))
    tok = build_tokenizer(settings, after.tokenizer_desc)
    batches = make_pipeline(settings, tok).eval_batches("full_val", 2)
    by_hand = losses_by_hand(before.model_config, before.params, batches,
                             tok.token_to_id["<GENAI>"], tok.pad_token_id)
    assert evals[0]["val_loss/full_val"] == pytest.approx(by_hand["after_genai"], abs=1e-5)
    # ... while the all-token loss is 1000x that tolerance away (measured: 0.042)
    assert abs(by_hand["all"] - by_hand["after_genai"]) > 0.01
    # Two fine-tuning steps lower the loss on those same fixed batches.
    assert evals[1]["val_loss"] < evals[0]["val_loss"] - FINETUNE_DROP

    r = run(dataset, out, *tune[:4], "--config.eval_only=True", "--config.eval_metrics=True",
            "--config.eval_examples=2", "--config.data.eval_splits=('full_val',)")
    assert "full_val / all" in r.stdout, r.stdout[-2000:]


def test_model_mismatch_with_init_checkpoint_is_a_clear_error(dataset, reference_run, tmp_path):
    r = run(dataset, tmp_path / "x", f"--config.init_from={reference_run / 'final.pt'}",
            "--config.model.use_time_embedding=True", check=False)
    assert r.returncode == 2 and "music-time embedding" in r.stderr
    assert "Traceback" not in r.stderr


def test_eval_only_with_an_unsplittable_batch_is_a_clear_error(dataset, reference_run, tmp_path):
    r = run(dataset, tmp_path / "e", "--config.eval_only=True", "--config.data.batch_size=3",
            f"--config.init_from={reference_run / 'final.pt'}", devices=2, check=False)
    assert r.returncode == 2 and "divisible by the number of devices" in r.stderr
    assert "Traceback" not in r.stderr
