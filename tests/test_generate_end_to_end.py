"""generate (JAX, from our checkpoint directory and from its .pt export) and torch_generate (the
PyTorch twin) on real MAESTRO prompts; PIANO-task evaluation on real validation music."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import datasets
import jax
import numpy as np
import pytest

from converters import save_torch_checkpoint
from converters import torch_generate as tg
from piano_gpt_jax import evaluate, generate, piano_metrics
from piano_gpt_jax.checkpoints import CheckpointRecord, RunMeta, save_model_checkpoint
from piano_gpt_jax.data.midi_io import read_midi
from piano_gpt_jax.data.pipeline import DataSettings, build_tokenizer, make_pipeline
from piano_gpt_jax.model import ModelConfig, init_params

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
    with pytest.raises(SystemExit, match="not a .pt"):
        tg.main(["--checkpoint", str(setup["run_dir"]), "--out", str(tmp / "x"),
                 "--prompt-midi", str(setup["midi"])])


def test_torch_filters_match_jax_filters():
    import torch

    from piano_gpt_jax import sampling

    logits = np.log(np.array([0.42, 0.25, 0.15, 0.1, 0.05, 0.03]))
    for k, p, m in [(0, 1.0, 0.0), (3, 1.0, 0.0), (0, 0.6, 0.0), (4, 0.8, 0.1), (0, 1.0, 0.3)]:
        j = np.isfinite(np.asarray(sampling.filter_logits(logits[None], k, p, m))[0])
        t = torch.isfinite(tg.filter_logits(torch.tensor(logits), k, p, m)).numpy()
        np.testing.assert_array_equal(j, t)


@pytest.fixture(scope="module")
def eval_dataset(tmp_path_factory, maestro_dir):
    """Real MAESTRO notes saved as a dataset directory (the format load_piano_dataset reads)."""
    rows = []
    composers = ["Frédéric Chopin", "Johann Sebastian Bach", "Franz Liszt", "Frédéric Chopin"]
    for i, f in enumerate(sorted(maestro_dir.glob("*.mid"))[:4]):
        df = read_midi(f).iloc[:400]
        src = json.dumps({"composer": composers[i], "dataset": "maestro", "title": f.stem})
        rows.append({"notes": {c: df[c].to_numpy() for c in df.columns}, "source": src})
    ds = lambda r: datasets.Dataset.from_list(r)
    path = tmp_path_factory.mktemp("ds") / "maestro-mini"
    datasets.DatasetDict({"train": ds(rows[:2]), "validation": ds(rows[2:]),
                          "test": ds(rows[2:])}).save_to_disk(str(path))
    return path


def test_run_task_evaluation_and_cli(setup, eval_dataset, capsys):
    settings = dataclasses.replace(setup["settings"], base_dataset_name=str(eval_dataset))
    pipe = make_pipeline(settings, setup["tok"])
    res = evaluate.run_task_evaluation(setup["cfg"], setup["params"], setup["tok"], pipe,
                                       ["full_val", "chopin"], n_examples=4, temperature=1.0)
    assert set(res) == {"full_val", "chopin"}
    keys = piano_metrics.MetricsManager.load_default().log_keys()
    for per_task in res.values():
        assert list(per_task)[0] == "all"
        assert per_task["all"]["n_examples"] == 4
        assert sum(v["n_examples"] for t, v in per_task.items() if t != "all") == 4
        for k in keys:
            assert k in per_task["all"]
        assert 0.0 <= per_task["all"]["confusion metrics/weighted_f1"] <= 1.0

    # the CLI: checkpoint dir + dataset, console table and metrics.jsonl in the run dir
    assert evaluate.main(["--checkpoint", str(setup["run_dir"]), "--dataset", str(eval_dataset),
                          "--split", "full_val", "--n-examples", "2"]) == 0
    out = capsys.readouterr().out
    assert "confusion metrics/weighted_f1" in out and "== full_val ==" in out
    lines = (setup["run_dir"] / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(x) for x in lines]
    assert rows[0]["event"] == "task_eval" and rows[0]["task"] == "all" and rows[0]["step"] == 7


@pytest.mark.slow
def test_cli_subprocesses(setup, tmp_path):
    """The documented commands, as a user runs them (JAX CLI from the dir, torch CLI from .pt)."""
    for module, ck in (("piano_gpt_jax.generate", setup["run_dir"]),
                       ("converters.torch_generate", setup["pt"])):
        out = tmp_path / module
        r = subprocess.run(
            [sys.executable, "-m", module, "--checkpoint", str(ck), "--out", str(out),
             "--prompt-midi", str(setup["midi"]), "--prompt-seconds", "3", "--temperature", "0",
             "--max-new-tokens", "24"], cwd=REPO, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        assert "tokens/s" in r.stdout and (out / "generation.mid").is_file()
    bad = subprocess.run([sys.executable, "-m", "piano_gpt_jax.generate", "--checkpoint",
                          str(tmp_path / "nope"), "--out", str(tmp_path / "o"),
                          "--prompt-midi", str(setup["midi"])],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr and "error:" in bad.stderr
