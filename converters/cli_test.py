"""The converter CLIs and the bad-input cases of the `.pt` reader and writer."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from converters import (
    CheckpointError,
    TorchGPT,
    load_torch_checkpoint,
    params_to_state_dict,
    save_torch_checkpoint,
    state_dict_to_params,
)
from converters import jax_to_torch as jax_to_torch_cli
from converters import torch_to_jax as torch_to_jax_cli
from converters.testing import randomize, tiny_config, tokenizer_desc
from piano_gpt_jax.checkpoints import (
    CheckpointRecord,
    RunMeta,
    load_model_checkpoint,
    save_model_checkpoint,
)

REPO = Path(__file__).resolve().parents[1]


def test_export_is_loadable_like_the_reference_does(tmp_path):
    cfg = tiny_config(bias=True, time=True)
    params = state_dict_to_params(cfg, randomize(TorchGPT(cfg)).state_dict())
    meta = RunMeta(step=7, run_name="run", val_loss=2.5,
                   config={"data": {"context_size": 24}, "stage": "piano_task"})
    path = save_torch_checkpoint(tmp_path / "out.pt",
                                 CheckpointRecord(cfg, params, tokenizer_desc(61), meta))
    # What the reference does: torch.load(weights_only=False), GPT(model_cfg, vocab, pad), strict.
    checkpoint = torch.load(path, weights_only=False)
    m = checkpoint["model_cfg"]
    assert (m.n_layer, m.n_head, m.n_embd, m.bias, m.context_size, m.dropout) == \
        (2, 2, 16, True, 24, 0.0)
    run_config = checkpoint["run_config"]
    assert run_config.model.n_embd == 16 and run_config.training.context_size == 24
    assert checkpoint["run_stats"] == {"iter": 7, "total_tokens": 0, "running_mfu": -1.0,
                               "best_val_loss": 1e9}
    assert checkpoint["run_name"] == "0M-run" and checkpoint["val_loss"] == 2.5
    assert set(checkpoint) >= {"model", "model_cfg", "run_config", "tokenizer_desc", "run_stats",
                       "train_loss", "val_loss", "run_name"}
    assert "optimizer" not in checkpoint  # none given: weights-only export
    twin = TorchGPT(cfg)
    twin.load_state_dict(checkpoint["model"], strict=True)
    for k, v in params_to_state_dict(cfg, params).items():
        assert torch.equal(twin.state_dict()[k], v)
    back = load_torch_checkpoint(path)
    assert back.model_config == cfg and back.step == 7
    assert back.meta.config["data"]["context_size"] == 24
    for a, b in zip(*(jax_leaves(p) for p in (params, back.params)), strict=True):
        assert np.array_equal(a, b)


def jax_leaves(tree):
    import jax

    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def test_export_without_omegaconf_uses_simplenamespace(tmp_path):
    code = textwrap.dedent(f"""
        import sys
        sys.modules["omegaconf"] = None
        import torch
        from converters import (CheckpointRecord, TorchGPT, load_torch_checkpoint,
                                save_torch_checkpoint, state_dict_to_params)
        from converters.testing import tiny_config
        cfg = tiny_config()
        p = state_dict_to_params(cfg, TorchGPT(cfg).state_dict())
        save_torch_checkpoint({str(tmp_path / 'ns.pt')!r}, CheckpointRecord(cfg, p))
        checkpoint = torch.load({str(tmp_path / 'ns.pt')!r}, weights_only=False)
        print(type(checkpoint["model_cfg"]).__name__, checkpoint["model_cfg"].n_embd,
              load_torch_checkpoint({str(tmp_path / 'ns.pt')!r}).model_config == cfg)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["SimpleNamespace", "16", "True"]


def _write(tmp_path, name, mutate):
    """A reference-style checkpoint with one thing broken by `mutate(ckpt)`."""
    from omegaconf import OmegaConf

    cfg = tiny_config()
    ckpt = {"model": dict(TorchGPT(cfg).state_dict()),
            "model_cfg": OmegaConf.create({"n_layer": 2, "n_head": 2, "n_embd": 16,
                                           "dropout": 0.0, "bias": False, "context_size": 24})}
    mutate(ckpt)
    path = tmp_path / name
    torch.save(ckpt, path)
    return path


BAD = {
    "no_model_key": (lambda c: c.pop("model"), "no 'model' entry"),
    "shape_disagrees": (lambda c: c["model_cfg"].__setattr__("context_size", 32),
                        r"transformer.wpe.weight has shape \(24, 16\).*needs \(32, 16\)"),
    "unexpected_name": (lambda c: c["model"].__setitem__("transformer.h.2.ln_1.weight",
                                                         torch.ones(16)),
                        "unexpected parameter name"),
    "heads_do_not_divide": (lambda c: c["model_cfg"].__setattr__("n_head", 3),
                            "must be divisible by n_head"),
    "missing_tensor": (lambda c: c["model"].pop("transformer.ln_f.weight"), "lacks"),
    "untied_head": (lambda c: c["model"].__setitem__("lm_head.weight",
                                                     torch.zeros(61, 16)), "not tied"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_checkpoint_gets_one_clear_error(tmp_path, case):
    mutate, message = BAD[case]
    path = _write(tmp_path, f"{case}.pt", mutate)
    with pytest.raises(CheckpointError, match=message):
        load_torch_checkpoint(path)
    out_dir = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        torch_to_jax_cli.main([str(path), str(out_dir)])
    assert isinstance(exc.value.code, str) and exc.value.code.startswith("error: ")
    assert not out_dir.exists()


def test_cli_exit_codes_and_untouched_outputs(tmp_path, reference_checkpoint):
    good, _ = reference_checkpoint(bias=False, time=True)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}

    def run(*args):
        return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True,
                              cwd=REPO, env=env, timeout=120)

    bad = tmp_path / "trunc.pt"
    bad.write_bytes(good.read_bytes()[:1000])
    r = run("converters.torch_to_jax", str(bad), str(tmp_path / "o"))
    assert r.returncode != 0 and "truncated" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()
    r = run("converters.torch_to_jax", "--help")
    assert r.returncode == 0 and "OUT" in r.stdout.upper()

    # Good conversion, then refusals that must leave existing outputs untouched.
    assert torch_to_jax_cli.main([str(good), str(tmp_path / "run")]) == 0
    with pytest.raises(SystemExit, match="already holds checkpoints"):
        torch_to_jax_cli.main([str(good), str(tmp_path / "run")])
    existing = tmp_path / "existing.pt"
    existing.write_bytes(b"keep me")
    with pytest.raises(SystemExit, match="already exists"):
        jax_to_torch_cli.main([str(tmp_path / "run"), str(existing)])
    with pytest.raises(SystemExit, match="holds no complete checkpoint"):
        jax_to_torch_cli.main([str(tmp_path), str(existing), "--overwrite"])
    assert existing.read_bytes() == b"keep me"
    assert jax_to_torch_cli.main([str(tmp_path / "run"), str(tmp_path / "back.pt")]) == 0
    a, b = load_torch_checkpoint(good), load_torch_checkpoint(tmp_path / "back.pt")
    assert a.model_config == b.model_config and a.step == b.step == 501
    for x, y in zip(jax_leaves(a.params), jax_leaves(b.params), strict=True):
        assert np.array_equal(x, y)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_failed_export_leaves_output_untouched(tmp_path):
    cfg = tiny_config()
    params = state_dict_to_params(cfg, TorchGPT(cfg).state_dict())
    run = tmp_path / "run"
    save_model_checkpoint(run, CheckpointRecord(cfg, params, meta=RunMeta(step=3)))
    out = tmp_path / "out.pt"
    out.write_bytes(b"old")
    broken = dict(load_model_checkpoint(run).params)
    broken.pop("ln_f")
    with pytest.raises(CheckpointError, match="ln_f"):
        save_torch_checkpoint(out, CheckpointRecord(cfg, broken))
    assert out.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.pt", "run"]


def test_torch_to_jax_step_option_names_the_checkpoint(tmp_path, reference_checkpoint):
    """--step stores the conversion under that step instead of the file's iteration (501); the
    weights and the rest of its metadata are unchanged."""
    good, _ = reference_checkpoint(bias=True)
    assert torch_to_jax_cli.main([str(good), str(tmp_path / "plain")]) == 0
    assert torch_to_jax_cli.main([str(good), str(tmp_path / "stepped"), "--step", "77"]) == 0
    assert [p.name for p in (tmp_path / "plain" / "checkpoints").iterdir()] == ["501"]
    assert [p.name for p in (tmp_path / "stepped" / "checkpoints").iterdir()] == ["77"]
    plain, stepped = (load_model_checkpoint(tmp_path / n) for n in ("plain", "stepped"))
    assert plain.step == 501 and stepped.step == 77
    assert stepped.meta.total_tokens == plain.meta.total_tokens == 123456
    for x, y in zip(jax_leaves(plain.params), jax_leaves(stepped.params), strict=True):
        assert np.array_equal(x, y)
