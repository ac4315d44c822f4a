"""The safetensors model folder: piano-gpt's names loaded strictly by the PyTorch twin with the
same logits, a lossless round trip with `.pt`, every tool reading it, each bad input in one line,
and a model card whose figures are the run's own."""

from __future__ import annotations

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from converters import export_hf
from converters.torch_model import TorchGPT
from piano_gpt_jax import generate
from piano_gpt_jax.checkpoints import (
    CheckpointError,
    CheckpointRecord,
    RunMeta,
    load_any_checkpoint,
    save_model_checkpoint,
)
from piano_gpt_jax.checkpoints.torch_format import load_checkpoint_dict, save_torch_checkpoint
from piano_gpt_jax.data.pipeline import build_tokenizer
from piano_gpt_jax.data.settings import DataSettings
from piano_gpt_jax.model import ModelConfig, forward, init_params

STEP = 40
RUN_CONFIG = {"stage": "piano_task", "tasks": "piano_medium",
              "data": {"context_size": 32, "notes_per_record": 12},
              "model": {"n_layer": 2, "n_head": 2, "n_embd": 16, "context_size": 32,
                        "bias": True, "use_time_embedding": True},
              "dataset": {"base_dataset_name": "builtin"}, "optimizer": {"max_iters": 60}}


@pytest.fixture(scope="module")
def record() -> CheckpointRecord:
    """A small model of the piano vocabulary, weights sharpened so logits differ by position and
    token and any mismatch shows at the 1e-5 level."""
    tok = build_tokenizer(DataSettings(stage="piano_task", tasks="piano_medium",
                                       shard_index=0, shard_count=1))
    cfg = ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=16,
                      context_size=32, bias=True, use_time_embedding=True)
    params = init_params(cfg, jax.random.PRNGKey(3))
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(4), len(leaves))
    params = jax.tree_util.tree_unflatten(tree, [
        np.asarray(x + 0.3 * jax.random.normal(k, x.shape), np.float32)
        for k, x in zip(keys, leaves, strict=True)])
    meta = RunMeta(step=STEP, total_tokens=12_345, val_loss=3.5, best_val_loss=3.25,
                   val_losses={"full_val": 3.5, "bach": 3.75}, run_name="tiny-export",
                   config=RUN_CONFIG, prompt_layout="annotated")
    return CheckpointRecord(cfg, params, tok.to_dict(), meta)


@pytest.fixture(scope="module")
def run_dir(record, tmp_path_factory):
    """Our run directory: the checkpoint at STEP and a metrics.jsonl with its evaluation and an
    `evaluate` run."""
    run = tmp_path_factory.mktemp("export") / "run"
    save_model_checkpoint(run, record)
    events = [{"event": "eval", "step": 20, "val_loss": 4.0, "val_loss/full_val": 4.0},
              {"event": "eval", "step": STEP, "val_loss": 3.4321, "val_loss/full_val": 3.4321,
               "val_loss/bach": 3.6789, "val_loss/mozart": None},
              {"event": "task_eval", "step": STEP, "split": "full_val", "task": "all",
               "confusion metrics/weighted_f1": 0.4567,
               "confusion metrics/weighted_recall": 0.5, "confusion metrics/weighted_precision":
               0.42, "n_examples": 16.0}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    return run


def _export(source, out, *extra) -> None:
    assert export_hf.main([str(source), str(out), *extra]) == 0


def test_strict_load_into_the_state_dict_named_twin_gives_our_logits(record, tmp_path):
    from safetensors.torch import load_file

    pt = save_torch_checkpoint(tmp_path / "model.pt", record)
    folder = tmp_path / "folder"
    _export(pt, folder)
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json",
                                                         "model.safetensors", "tokenizer.json"]
    config = json.loads((folder / "config.json").read_text())
    assert (config["vocab_size"], config["pad_token_id"], config["prompt_layout"],
            config["use_time_embedding"]) == (record.model_config.vocab_size, 0, "annotated",
                                              True)
    twin = TorchGPT(ModelConfig(**{k: config[k] for k in (
        "vocab_size", "n_layer", "n_head", "n_embd", "context_size", "bias",
        "use_time_embedding")}))
    twin.load_state_dict(load_file(folder / "model.safetensors"), strict=True)
    twin.eval()
    rng = np.random.default_rng(0)
    ids = rng.integers(0, record.model_config.vocab_size, (2, 32))
    steps = rng.integers(0, 500, (2, 32))
    with torch.no_grad():
        theirs = twin(torch.from_numpy(ids), torch.from_numpy(steps)).numpy()
    ours = np.asarray(forward(record.model_config, record.params, jnp.asarray(ids),
                              jnp.asarray(steps)))
    assert np.abs(ours).max() > 1.0  # logits big enough that 1e-5 means something
    np.testing.assert_allclose(theirs, ours, atol=1e-5, rtol=0)


def test_pt_to_folder_to_our_loader_to_pt_keeps_every_tensor(record, tmp_path):
    first = save_torch_checkpoint(tmp_path / "first.pt", record)
    _export(first, tmp_path / "folder")
    back = load_any_checkpoint(tmp_path / "folder")
    second = save_torch_checkpoint(tmp_path / "second.pt", back)
    a, b = load_checkpoint_dict(first)["model"], load_checkpoint_dict(second)["model"]
    assert list(a) == list(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert (back.step, back.meta.total_tokens, back.meta.val_losses, back.meta.run_name) == (
        STEP, 12_345, {"full_val": 3.5, "bach": 3.75}, load_any_checkpoint(first).meta.run_name)
    assert back.tokenizer_desc == record.tokenizer_desc


def test_the_model_card_figures_are_the_runs_metrics(run_dir, tmp_path):
    _export(run_dir, tmp_path / "card")
    card = (tmp_path / "card" / "README.md").read_text()
    rows = dict(re.findall(r"^\| (\w+) \| (\d+\.\d{4}) \|$", card, flags=re.M))
    assert rows == {"full_val": "3.4321", "bach": "3.6789"}  # metrics.jsonl, not the meta
    assert "| full_val | all | 0.4567 | 0.5000 | 0.4200 | 16 |" in card
    assert f"step {STEP:,} of 60, 12,345 tokens" in card
    assert "python -m piano_gpt_jax.train --config configs/piano.py" in card
    assert "--config.model.bias=True" in card and "--config.tasks=piano_medium" in card
    assert "--config.model.n_layer=2" in card  # the GPU recipe's 12 layers overridden
    assert "load_state_dict(load_file(" in card and "strict=True" in card
    # --step picks another checkpoint of the run; one that does not exist is one line
    with pytest.raises(SystemExit, match=r"^error: .* has no checkpoint 7 "):
        export_hf.main([str(run_dir), str(tmp_path / "seven"), "--step", "7"])


def test_every_tool_reads_the_folder(record, run_dir, tmp_path, maestro_dir):
    folder = tmp_path / "folder"
    _export(run_dir, folder)
    out = tmp_path / "gen"
    assert generate.main(["--checkpoint", str(folder), "--out", str(out), "--prompt-midi",
                          str(maestro_dir / "Maestro_1.mid"), "--max-new-tokens", "4",
                          "--temperature", "0"]) == 0
    from converters import torch_generate

    assert torch_generate.main(["--checkpoint", str(folder), "--out", str(tmp_path / "tgen"),
                                "--prompt-midi", str(maestro_dir / "Maestro_1.mid"),
                                "--max-new-tokens", "4", "--temperature", "0"]) == 0
    ours = json.loads((out / "generation.json").read_text())
    theirs = json.loads((tmp_path / "tgen" / "generation.json").read_text())
    assert ours["samples"][0]["ids"] == theirs["samples"][0]["ids"]  # same greedy tokens
    from piano_gpt_jax.app import models

    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "exported").symlink_to(folder)
    assert models.list_checkpoints(tmp_path / "runs") == [tmp_path / "runs" / "exported"]
    assert models.load_model(tmp_path / "runs" / "exported").step == STEP
    with pytest.raises(CheckpointError, match="model folder .*no optimizer state"):
        load_any_checkpoint(folder, with_optimizer=True)


def _damaged(folder, tmp_path, how: str):
    from safetensors.numpy import load_file, save_file

    bad = tmp_path / how.replace(" ", "-")
    import shutil

    shutil.copytree(folder, bad)
    weights, config = bad / "model.safetensors", bad / "config.json"
    arrays = load_file(str(weights))
    if how == "missing tensor":
        arrays.pop("transformer.ln_f.bias")
        save_file(arrays, str(weights))
    elif how == "extra tensor":
        arrays["transformer.h.0.attn.bias"] = np.ones((1, 1, 32, 32), np.float32)
        save_file(arrays, str(weights))
    elif how == "shape disagrees with config.json":
        c = json.loads(config.read_text())
        config.write_text(json.dumps({**c, "context_size": 64}))
    elif how == "truncated weights":
        weights.write_bytes(weights.read_bytes()[:5000])
    elif how == "config of another vocabulary":
        c = json.loads(config.read_text())
        config.write_text(json.dumps({**c, "vocab_size": 1241}))
    return bad


@pytest.mark.parametrize(("how", "said"), [
    ("missing tensor", r"do not match config.json \(missing transformer.ln_f.bias\)"),
    ("extra tensor", r"unexpected transformer.h.0.attn.bias"),
    ("shape disagrees with config.json", r"transformer.wpe.weight has shape \(32, 16\) but "
                                         r"config.json gives \(64, 16\)"),
    ("truncated weights", r"not a complete safetensors file .* truncated"),
    ("config of another vocabulary", r"config.json is for a vocabulary of 1241 tokens but "
                                     r"tokenizer.json has \d+"),
])
def test_a_bad_folder_is_one_line(record, tmp_path, how, said, maestro_dir, capsys):
    folder = tmp_path / "good"
    _export(save_torch_checkpoint(tmp_path / "m.pt", record), folder)
    bad = _damaged(folder, tmp_path, how)
    with pytest.raises(CheckpointError, match=said):
        load_any_checkpoint(bad)
    with pytest.raises(SystemExit) as exc:  # and the CLIs end in that one line, exit != 0
        generate.main(["--checkpoint", str(bad), "--out", str(tmp_path / "o"), "--prompt-midi",
                       str(maestro_dir / "Maestro_1.mid")])
    assert str(exc.value.code).startswith("error: cannot load checkpoint")
    assert re.search(said, str(exc.value.code)) and not (tmp_path / "o").exists()


def test_an_existing_output_is_never_replaced_unasked(record, tmp_path, capsys):
    pt = save_torch_checkpoint(tmp_path / "m.pt", record)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(SystemExit, match="already exists; choose a new folder .*not a model"):
        export_hf.main([str(pt), str(mine), "--overwrite"])
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    _export(pt, tmp_path / "folder")
    with pytest.raises(SystemExit, match="pass --overwrite"):
        export_hf.main([str(pt), str(tmp_path / "folder")])
    _export(pt, tmp_path / "folder", "--overwrite")


def test_push_without_the_hub_keeps_the_folder_and_says_why(record, tmp_path, monkeypatch):
    pt = save_torch_checkpoint(tmp_path / "m.pt", record)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit) as exc:
        export_hf.main([str(pt), str(tmp_path / "folder"), "--push", "someone/piano-model"])
    message = str(exc.value.code)
    assert message.startswith("error: could not upload to someone/piano-model (")
    assert message.endswith(f"the folder is kept at {tmp_path / 'folder'}")
    assert (tmp_path / "folder" / "model.safetensors").is_file()
