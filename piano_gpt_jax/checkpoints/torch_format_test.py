"""piano-gpt `.pt` files: reference checkpoints load without running their pickle (malicious
ones are refused), and what we write is what piano-gpt writes."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from converters.testing import tiny_config
from converters.torch_model import TorchGPT
from piano_gpt_jax.checkpoints import CheckpointError
from piano_gpt_jax.checkpoints.omegaconf_stubs import to_plain
from piano_gpt_jax.checkpoints.torch_format import (
    load_checkpoint_dict,
    load_torch_checkpoint,
    torch_load_restricted,
)
from piano_gpt_jax.model import forward

REPO = Path(__file__).resolve().parents[1]


def _logit_diff(path: Path, model: TorchGPT) -> float:
    record = load_torch_checkpoint(path)
    cfg = record.model_config
    g = torch.Generator().manual_seed(5)
    idx = torch.randint(0, cfg.vocab_size, (2, cfg.context_size), generator=g)
    steps = torch.randint(0, 300, (2, cfg.context_size), generator=g) \
        if cfg.use_time_embedding else None
    with torch.no_grad():
        ref = model.eval()(idx, steps).numpy()
    ours = np.asarray(forward(cfg, record.params, jnp.asarray(idx.numpy()),
                              None if steps is None else jnp.asarray(steps.numpy())))
    return float(np.abs(ours - ref).max())


@pytest.mark.parametrize("bias,time", [(False, False), (True, True)])
def test_reference_checkpoint_loads_and_matches(reference_checkpoint, bias, time):
    path, model = reference_checkpoint(bias=bias, time=time)
    record = load_torch_checkpoint(path)
    cfg = record.model_config
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.bias, cfg.use_time_embedding) == \
        (2, 2, 16, bias, time)
    assert cfg.vocab_size == 61 and cfg.context_size == 24  # inferred / interpolation resolved
    meta = record.meta
    assert record.step == 501 and meta.total_tokens == 123456 and meta.best_val_loss == 4.5
    assert meta.run_name == "0M-pretraining-test" and meta.val_loss == 4.5
    reference = meta.reference_run_config
    assert reference["model"]["context_size"] == 24
    assert reference["run_name_suffix"] == "pretraining-${now:%Y-%m-%d-%H-%M}"
    assert reference["dataset"]["augmentation"]["speed_change_factors"] == [0.95, 1.05]
    # ... and in our vocabulary
    assert meta.config["stage"] == "next_token_pretraining"
    assert meta.config["data"] == {"context_size": 24, "batch_size": 8}
    assert meta.config["optimizer"]["gradient_accumulation_steps"] == 8
    assert meta.config["dataset"]["extra_datasets"] == ("epr-labs/piano-midi-de",)
    assert len(record.tokenizer_desc["parameters"]["vocab"]) == 61
    json.dumps(meta.to_json())
    assert _logit_diff(path, model) < 1e-5


def test_legacy_checkpoint_loads(reference_checkpoint):
    path, model = reference_checkpoint(bias=False, time=False, layout="legacy")
    record = load_torch_checkpoint(path)
    assert record.step == 2000 and record.meta.best_val_loss == 3.5
    assert record.meta.train_loss == 3.25 and record.meta.run_name == "legacy-run"
    assert record.meta.wandb_id == "abc" and record.meta.extra["wandb"] == "https://wandb.ai/x"
    assert _logit_diff(path, model) < 1e-5


def test_unresolvable_context_size_is_inferred_from_wpe(tmp_path):
    from omegaconf import OmegaConf

    model = TorchGPT(tiny_config())
    cfg = OmegaConf.create({"n_layer": 2, "n_head": 2, "n_embd": 16, "dropout": 0.0,
                            "bias": False, "context_size": "${training.context_size}"})
    torch.save({"model": model.state_dict(), "model_cfg": cfg}, tmp_path / "x.pt")
    assert load_torch_checkpoint(tmp_path / "x.pt").model_config.context_size == 24


def test_interpolations_relative_embedded_and_lists(tmp_path):
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"a": {"b": 3, "c": "${.b}", "d": "x-${a.b}-${now:%Y}",
                                  "e": "${..top}", "f": ["${a.b}", 2], "g": "${missing.key}"},
                            "top": "t", "h": "id-${a.b}"})
    torch.save({"cfg": cfg}, tmp_path / "c.pt")
    plain = to_plain(torch_load_restricted(tmp_path / "c.pt")["cfg"])
    assert plain == {"a": {"b": 3, "c": 3, "d": "x-${a.b}-${now:%Y}", "e": "t", "f": [3, 2],
                           "g": "${missing.key}"}, "top": "t", "h": "id-3"}


def test_loads_without_omegaconf_installed(reference_checkpoint):
    path, model = reference_checkpoint(bias=True, time=True)
    code = textwrap.dedent(f"""
        import sys
        sys.modules["omegaconf"] = None  # any import of omegaconf now fails
        from converters import load_torch_checkpoint
        record = load_torch_checkpoint({str(path)!r})
        assert "omegaconf" not in [m for m, v in sys.modules.items() if v is not None]
        print(record.model_config.context_size, record.model_config.bias, record.step,
              record.meta.reference_run_config["model"]["context_size"])
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["24", "True", "501", "24"]


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _ExecPayload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


@pytest.mark.parametrize("payload", [_Payload, _ExecPayload])
def test_malicious_checkpoint_is_refused_and_payload_never_runs(tmp_path, payload):
    marker = tmp_path / "pwned"
    model = TorchGPT(tiny_config())
    path = tmp_path / "evil.pt"
    torch.save({"model": model.state_dict(), "extra": payload(marker)}, path)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="refused to load.*Nothing from it was executed"):
        load_torch_checkpoint(path)
    assert not marker.exists()
    # Sanity: the same file really would run its payload under an unrestricted load.
    with zipfile.ZipFile(path) as z:
        name = next(n for n in z.namelist() if n.endswith("data.pkl"))
        assert b"system" in z.read(name) or b"exec" in z.read(name)


def test_unlisted_class_is_refused(tmp_path):
    path = tmp_path / "odd.pt"
    torch.save({"model": {}, "x": pickle.PickleError("boom")}, path)
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint_dict(path)


@pytest.mark.parametrize("content", [b"", b"not a zip at all", None])
def test_truncated_or_non_zip_files_are_refused(tmp_path, reference_checkpoint, content):
    path = tmp_path / "bad.pt"
    if content is None:  # a real checkpoint cut in half
        good, _ = reference_checkpoint()
        path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    else:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match="truncated|corrupt|not a PyTorch zip"):
        load_torch_checkpoint(path)


def test_missing_path_and_directory_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        load_torch_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="is not a file"):
        load_torch_checkpoint(tmp_path)


def test_every_run_meta_field_travels_through_pt_and_orbax(tmp_path):
    """A field added to RunMeta reaches both formats and comes back (the .pt reader once listed
    by hand which fields it read back). A new field must be given a value here, or this fails."""
    import dataclasses

    import jax

    from piano_gpt_jax.checkpoints import (
        CheckpointRecord,
        RunMeta,
        load_model_checkpoint,
        save_model_checkpoint,
    )
    from piano_gpt_jax.checkpoints.torch_format import load_torch_checkpoint, save_torch_checkpoint
    from piano_gpt_jax.config import flatten
    from piano_gpt_jax.model import ModelConfig, init_params

    values = {"step": 7, "total_tokens": 1234, "train_loss": 2.5, "val_loss": 2.75,
              "val_losses": {"full_val": 2.75, "bach": 3.0}, "best_val_loss": 2.25,
              "running_mfu": 0.125, "run_name": "1M-every-field",
              "config": {"optimizer": {"max_iters": 99}, "stage": "next_token_pretraining"},
              "n_devices": 4, "prompt_layout": "plain", "wandb_id": "abc123",
              "wandb_ran": True, "reference_run_config": None, "source": "somewhere.pt",
              "extra": {"note": "kept"}}
    assert set(values) == {f.name for f in dataclasses.fields(RunMeta)}
    cfg = ModelConfig(vocab_size=40, n_layer=1, n_head=2, n_embd=8, context_size=16)
    record = CheckpointRecord(cfg, jax.device_get(init_params(cfg, jax.random.PRNGKey(0))),
                              None, RunMeta(**values))
    pt = load_torch_checkpoint(save_torch_checkpoint(tmp_path / "m.pt", record)).meta
    orbax = load_model_checkpoint(save_model_checkpoint(tmp_path / "run", record)).meta
    for meta, where in ((pt, ".pt"), (orbax, "orbax")):
        for name, value in values.items():
            got = getattr(meta, name)
            if name == "config":  # completed with every default, the weights' model section
                assert flatten(value).items() <= flatten(got).items(), where
            elif name == "source" and where == ".pt":
                assert got == str(tmp_path / "m.pt")  # where it was read from
            else:
                assert got == value, (where, name, got)


def test_a_field_added_to_the_record_comes_back_from_pt_orbax_and_a_model_folder(
        tmp_path, monkeypatch):
    """The promise of record.py ("a field added here travels everywhere"), tried as a newcomer
    would: RunMeta gains a field (a subclass stands in for the edit, put wherever the name is
    imported), and the writers and readers, unchanged, carry it."""
    import dataclasses
    import sys

    import jax

    from piano_gpt_jax.checkpoints import (
        CheckpointRecord,
        RunMeta,
        load_model_checkpoint,
        save_model_checkpoint,
    )
    from piano_gpt_jax.checkpoints.model_folder import load_model_folder, save_model_folder
    from piano_gpt_jax.checkpoints.torch_format import load_torch_checkpoint, save_torch_checkpoint
    from piano_gpt_jax.model import ModelConfig, init_params
    from piano_gpt_jax.music.tokenizer import ExponentialTimeTokenizer

    @dataclasses.dataclass
    class WithNewField(RunMeta):
        listening_notes: dict = dataclasses.field(default_factory=dict)

    for module in list(sys.modules.values()):
        if getattr(module, "__name__", "").startswith("piano_gpt_jax") and \
                getattr(module, "RunMeta", None) is RunMeta:
            monkeypatch.setattr(module, "RunMeta", WithNewField)
    tokenizer = ExponentialTimeTokenizer.build({"time_unit": 0.01, "max_time_step": 1.0,
                                                "n_velocity_bins": 32, "n_special_ids": 64})
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, n_layer=1, n_head=2, n_embd=8,
                      context_size=16)
    record = CheckpointRecord(cfg, jax.device_get(init_params(cfg, jax.random.PRNGKey(0))),
                              tokenizer.to_dict(),
                              WithNewField(step=3, listening_notes={"sample 0": "good"}))
    read_back = {
        ".pt": load_torch_checkpoint(save_torch_checkpoint(tmp_path / "m.pt", record)).meta,
        "orbax": load_model_checkpoint(save_model_checkpoint(tmp_path / "run", record)).meta,
        "model folder": load_model_folder(
            save_model_folder(record, tmp_path / "folder", card="a card")).meta,
    }
    for where, meta in read_back.items():
        assert isinstance(meta, WithNewField), where
        assert meta.listening_notes == {"sample 0": "good"} and meta.step == 3, where
