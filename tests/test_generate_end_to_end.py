"""generate (JAX, from our checkpoint directory and from its .pt export) and torch_generate (the
PyTorch twin) on real MAESTRO prompts; PIANO-task evaluation on real validation music."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
import types
from pathlib import Path

import datasets
import jax
import numpy as np
import pandas as pd
import pytest

from converters import save_torch_checkpoint
from converters import torch_generate as tg
from piano_gpt_jax import evaluate, generate, piano_metrics, sampling
from piano_gpt_jax.checkpoints import CheckpointRecord, RunMeta, save_model_checkpoint
from piano_gpt_jax.data.pipeline import build_tokenizer, make_pipeline
from piano_gpt_jax.data.settings import DataSettings
from piano_gpt_jax.model import ModelConfig, init_params
from piano_gpt_jax.music.midi import read_midi

REPO = Path(__file__).resolve().parents[1]


def _sharpened(params):
    # A fresh model mostly repeats its input; sharper weights give varied greedy paths.
    f = lambda path, x: x * 5 if "kernel" in jax.tree_util.keystr(path) else x
    params = jax.tree_util.tree_map_with_path(f, params)
    return {**params, "wpe": params["wpe"] * 5}


@pytest.fixture(scope="module")
def setup(tmp_path_factory, maestro_dir):
    tmp = tmp_path_factory.mktemp("gen")
    settings = DataSettings(stage="piano_task", tasks="piano_medium", context_size=96,
                            notes_per_record=24, batch_size=2, use_time_steps=True,
                            shard_index=0, shard_count=1)
    tok = build_tokenizer(settings)
    cfg = ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=32,
                      context_size=96, use_time_embedding=True)
    params = _sharpened(init_params(cfg, jax.random.PRNGKey(0)))
    run_dir = tmp / "run"
    record = CheckpointRecord(cfg, params, tok.to_dict(), RunMeta(step=7))
    save_model_checkpoint(run_dir, record)
    pt = tmp / "model.pt"
    save_torch_checkpoint(pt, record)
    midi = sorted(maestro_dir.glob("*.mid"))[2]
    return dict(tmp=tmp, settings=settings, tok=tok, cfg=cfg, params=params, run_dir=run_dir,
                pt=pt, midi=midi)


def _args(setup, out, *extra):
    return generate.build_parser().parse_args(
        ["--checkpoint", str(setup["run_dir"]), "--out", str(out), "--prompt-midi",
         str(setup["midi"]), "--prompt-seconds", "4", "--temperature", "0",
         "--max-new-tokens", "60", *extra])


def test_task_generation_jax_dir_pt_and_torch_agree(setup):
    tmp = setup["tmp"]
    a = generate.run(_args(setup, tmp / "a", "--task", "high_notes_masking-x5"))
    files = a["files"]
    for key in ("prompt", "target", "generation", "combined", "pianoroll"):
        assert Path(files[key]).is_file(), key
    assert Path(files["pianoroll"]).stat().st_size > 10_000  # a real picture
    assert a["target_notes"] == 5
    # prompt.mid holds the task's source notes: prompt notes minus the 5 highest
    prompt_back = read_midi(files["prompt"])
    assert len(prompt_back) == a["prompt_notes"] and a["prompt_notes"] >= 5
    # generation.mid holds exactly what the new tokens decode to
    ids = np.array(a["samples"][0]["ids"])
    assert len(ids) == 60 or a["samples"][0]["stopped"]
    assert len(read_midi(files["generation"])) == len(setup["tok"].decode(ids))

    b = generate.run(generate.build_parser().parse_args(
        ["--checkpoint", str(setup["pt"]), "--out", str(tmp / "b"), "--prompt-midi",
         str(setup["midi"]), "--prompt-seconds", "4", "--temperature", "0",
         "--max-new-tokens", "60", "--task", "high_notes_masking-x5"]))
    assert b["samples"][0]["ids"] == a["samples"][0]["ids"]  # .pt export decodes the same

    args = generate.build_parser().parse_args(
        ["--checkpoint", str(setup["pt"]), "--out", str(tmp / "c"), "--prompt-midi",
         str(setup["midi"]), "--prompt-seconds", "4", "--temperature", "0",
         "--max-new-tokens", "60", "--task", "high_notes_masking-x5"])
    t = generate.run(args, sampler=tg.torch_sampler, load_checkpoint=tg._load)
    assert t["samples"][0]["ids"] == a["samples"][0]["ids"]  # greedy: same tokens as JAX


def test_continuation_samples_and_refusals(setup, capsys):
    tmp = setup["tmp"]
    out = tmp / "cont"
    s = generate.run(_args(setup, out, "--temperature", "1.0", "--top-p", "0.9",
                           "--num-samples", "2", "--seed", "3"))
    assert {"generation_0", "generation_1", "pianoroll_1"} <= set(s["files"])
    assert s["samples"][0]["ids"] != s["samples"][1]["ids"]
    # nothing is overwritten without --overwrite, and the message says what to do
    with pytest.raises(SystemExit, match="--overwrite"):
        generate.main(["--checkpoint", str(setup["run_dir"]), "--out", str(out),
                       "--prompt-midi", str(setup["midi"]), "--num-samples", "2"])
    with pytest.raises(SystemExit, match="unknown task"):
        generate.main(["--checkpoint", str(setup["run_dir"]), "--out", str(tmp / "x"),
                       "--prompt-midi", str(setup["midi"]), "--task", "no_such_task-x1"])
    with pytest.raises(SystemExit, match="cannot load checkpoint"):
        generate.main(["--checkpoint", str(tmp / "missing"), "--out", str(tmp / "x"),
                       "--prompt-midi", str(setup["midi"])])
    with pytest.raises(SystemExit, match="neither a .pt file nor a model folder"):
        tg.main(["--checkpoint", str(setup["run_dir"]), "--out", str(tmp / "x"),
                 "--prompt-midi", str(setup["midi"])])


def _ids(summary) -> list[int]:
    return summary["samples"][0]["ids"]


def test_prompt_from_a_dataset_record_with_tokens_and_filters(setup, eval_dataset, tmp_path):
    """--prompt-dataset SPLIT:INDEX (the README's first example) with --dataset, and from the
    run's own dataset; --composer-token; --top-k 1 and --min-p near 1 sample the greedy path."""
    tok = setup["tok"]
    record = datasets.load_from_disk(str(eval_dataset))["validation"][0]  # Liszt, 400 notes
    argv = ["--checkpoint", str(setup["run_dir"]), "--prompt-dataset", "validation:0",
            "--dataset", str(eval_dataset), "--prompt-notes", "12", "--max-new-tokens", "16"]
    run = lambda name, *extra: generate.run(generate.build_parser().parse_args(
        [*argv, "--out", str(tmp_path / name), *extra]))

    greedy = run("greedy", "--temperature", "0")
    assert greedy["prompt"] == f"{eval_dataset} validation[0]" and greedy["prompt_notes"] == 12
    prompt = json.loads(Path(greedy["files"]["ids"]).read_text())["prompt_ids"]
    assert [tok.vocab[i] for i in prompt[:2]] == ["<MAESTRO>", "<LISZT>"]  # from its source
    first = pd.DataFrame(record["notes"]).sort_values("start", kind="stable").iloc[:12]
    decoded = tok.decode(prompt[2:])  # the record's first 12 notes (chords in pitch order)
    assert sorted(decoded["pitch"]) == sorted(first["pitch"])
    span = first["start"].max() - first["start"].min()
    assert decoded["start"].max() == pytest.approx(span, abs=0.01)  # shifted to t = 0

    chopin = run("chopin", "--temperature", "0", "--composer-token", "<CHOPIN>")
    chopin_prompt = json.loads(Path(chopin["files"]["ids"]).read_text())["prompt_ids"]
    assert tok.vocab[chopin_prompt[1]] == "<CHOPIN>" and chopin_prompt[2:] == prompt[2:]

    assert _ids(run("top_k", "--temperature", "1", "--top-k", "1")) == _ids(greedy)
    assert _ids(run("min_p", "--temperature", "1", "--min-p", "0.999")) == _ids(greedy)
    assert _ids(run("free", "--temperature", "1")) != _ids(greedy)  # without them, it is not

    # Without --dataset: the dataset the checkpoint's run trained on.
    own = tmp_path / "own-run"
    save_model_checkpoint(own, CheckpointRecord(
        setup["cfg"], setup["params"], tok.to_dict(),
        RunMeta(step=1, config={"dataset": {"base_dataset_name": str(eval_dataset)}})))
    from_run = generate.run(generate.build_parser().parse_args(
        ["--checkpoint", str(own), "--out", str(tmp_path / "own"), "--prompt-dataset",
         "validation:1", "--prompt-notes", "12", "--temperature", "0", "--max-new-tokens", "4"]))
    assert from_run["prompt"] == f"{eval_dataset} validation[1]"
    own_prompt = json.loads(Path(from_run["files"]["ids"]).read_text())["prompt_ids"]
    assert tok.vocab[own_prompt[1]] == "<CHOPIN>"  # record 1 is the Chopin one


def test_torch_filters_match_jax_filters():
    import torch

    from piano_gpt_jax import sampling

    logits = np.log(np.array([0.42, 0.25, 0.15, 0.1, 0.05, 0.03]))
    for k, p, m in [(0, 1.0, 0.0), (3, 1.0, 0.0), (0, 0.6, 0.0), (4, 0.8, 0.1), (0, 1.0, 0.3)]:
        draw = sampling.SamplingSettings(top_k=k, top_p=p, min_p=m).draw_values()
        j = np.isfinite(np.asarray(sampling.filter_logits(logits[None], draw))[0])
        t = torch.isfinite(tg.filter_logits(torch.tensor(logits), draw)).numpy()
        np.testing.assert_array_equal(j, t)


@pytest.fixture(scope="module")
def eval_dataset(mini_maestro):
    """Real MAESTRO notes saved as a dataset directory (the format load_piano_dataset reads)."""
    return mini_maestro(400)


def test_run_task_evaluation_and_cli(setup, eval_dataset, capsys, monkeypatch):
    settings = dataclasses.replace(setup["settings"], base_dataset_name=str(eval_dataset))
    pipe = make_pipeline(settings, setup["tok"])
    res = evaluate.run_task_evaluation(setup["cfg"], setup["params"], setup["tok"], pipe,
                                       ["full_val", "chopin"], n_examples=4)
    assert set(res) == {"full_val", "chopin"}
    keys = piano_metrics.MetricsManager.load_default().log_keys()
    for per_task in res.values():
        assert list(per_task)[0] == "all"
        assert per_task["all"]["n_examples"] == 4
        assert sum(v["n_examples"] for t, v in per_task.items() if t != "all") == 4
        for k in keys:
            assert k in per_task["all"]
        # an untrained model does not answer the task: far from the perfect score below
        assert per_task["all"]["confusion metrics/weighted_f1"] < 0.5

    # the CLI: checkpoint dir + dataset, console table and metrics.jsonl in the run dir; --wandb
    # (offline) logs the same table, through a recording stand-in for the wandb package
    wandb_calls = []
    fake_run = types.SimpleNamespace(log=lambda d: wandb_calls.append(("log", d)),
                                     finish=lambda: wandb_calls.append(("finish", None)))
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(
        init=lambda **kw: wandb_calls.append(("init", kw)) or fake_run))
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert evaluate.main(["--checkpoint", str(setup["run_dir"]), "--dataset", str(eval_dataset),
                          "--split", "full_val", "--n-examples", "2", "--wandb"]) == 0
    out = capsys.readouterr().out
    assert "confusion metrics/weighted_f1" in out and "== full_val ==" in out
    lines = (setup["run_dir"] / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(x) for x in lines]
    assert rows[0]["event"] == "task_eval" and rows[0]["task"] == "all" and rows[0]["step"] == 7
    assert [c[0] for c in wandb_calls] == ["init", "log", "finish"]
    init, logged = wandb_calls[0][1], wandb_calls[1][1]
    assert init["mode"] == "offline" and init["config"]["step"] == 7
    assert logged["iter"] == 7
    assert logged["metrics/full_val_confusion metrics/weighted_f1"] == pytest.approx(
        rows[0]["confusion metrics/weighted_f1"])
    assert logged["metrics/full_val_n_examples"] == 2


def _answering(examples: list[dict], answer):
    """A stand-in for sampling.sample that answers each known prompt with answer(example)."""
    by_prompt = {tuple(e["prompt_ids"].tolist()): e for e in examples}

    def generate_(cfg, params, prompts, settings, tables=None):
        new = [np.asarray(answer(by_prompt[tuple(np.asarray(p).tolist())]), np.int32)
               for p in prompts]
        return sampling.GenerationResult(new, np.zeros(len(new), bool), 1.0, 0.0)

    return generate_


def test_evaluation_scores_a_perfect_and_an_empty_answer(setup, eval_dataset, monkeypatch):
    """The scoring path with answers whose scores are known: the target itself scores F1 = 1 and
    no empty generation; an empty answer scores F1 = 0, is counted as empty, and its all-zero
    pitch histogram gives a NaN correlation that is counted and left out of the mean.

    F1 on exact pitches here: the default config's pitch classes (a reference quirk, see
    piano_metrics_test) score even a perfect answer below 1 when two notes of one pitch class
    sound together, as they do in one of these targets."""
    exact = [dict(m, params={**m["params"], "use_pitch_class": False})
             if m["class"] == "F1Metric" else m for m in piano_metrics.DEFAULT_METRICS_CONFIG]
    monkeypatch.setattr(piano_metrics.MetricsManager, "load_default",
                        classmethod(lambda cls: cls(exact)))
    settings = dataclasses.replace(setup["settings"], base_dataset_name=str(eval_dataset))
    pipe = make_pipeline(settings, setup["tok"])
    examples = pipe.eval_examples("full_val", 4)
    assert len({e["task"] for e in examples}) > 1  # several tasks: "all" pools them

    def run(answer):
        monkeypatch.setattr(sampling, "sample", _answering(examples, answer))
        return evaluate.run_task_evaluation(setup["cfg"], setup["params"], setup["tok"], pipe,
                                            ["full_val"], n_examples=4)["full_val"]

    perfect = run(lambda e: e["target_ids"])
    for task, scores in perfect.items():
        assert scores["confusion metrics/weighted_f1"] == 1.0, task
        assert scores["confusion metrics/weighted_precision"] == 1.0, task
        assert scores["confusion metrics/weighted_recall"] == 1.0, task
        assert scores["pitch distribution/taxicab_distance"] == 0.0, task
        assert scores["n_empty_generations"] == 0, task
    assert perfect["all"]["n_examples"] == 4

    empty = run(lambda e: [])["all"]
    assert empty["confusion metrics/weighted_f1"] == 0.0
    assert empty["n_empty_generations"] == 4 == empty["n_examples"]
    assert empty["n_nan/pitch distribution/correlation"] == 4
    assert math.isnan(empty["pitch distribution/correlation"])


@pytest.mark.slow
def test_cli_subprocesses(setup, tmp_path):
    """The documented commands, as a user runs them (JAX CLI from the dir, torch CLI from .pt)."""
    for module, record in (("piano_gpt_jax.generate", setup["run_dir"]),
                       ("converters.torch_generate", setup["pt"])):
        out = tmp_path / module
        r = subprocess.run(
            [sys.executable, "-m", module, "--checkpoint", str(record), "--out", str(out),
             "--prompt-midi", str(setup["midi"]), "--prompt-seconds", "3", "--temperature", "0",
             "--max-new-tokens", "24"], cwd=REPO, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        assert "tokens/s" in r.stdout and (out / "generation.mid").is_file()
    # greedy: the PyTorch twin samples exactly the tokens JAX does, from the same prompt
    jax_ids, torch_ids = (json.loads((tmp_path / m / "generation.json").read_text())
                          for m in ("piano_gpt_jax.generate", "converters.torch_generate"))
    assert torch_ids["prompt_ids"] == jax_ids["prompt_ids"]
    assert torch_ids["samples"][0]["ids"] == jax_ids["samples"][0]["ids"]
    assert len(jax_ids["samples"][0]["ids"]) == 24 and len(set(jax_ids["samples"][0]["ids"])) > 3
    bad = subprocess.run([sys.executable, "-m", "piano_gpt_jax.generate", "--checkpoint",
                          str(tmp_path / "nope"), "--out", str(tmp_path / "o"),
                          "--prompt-midi", str(setup["midi"])],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr and "error:" in bad.stderr
