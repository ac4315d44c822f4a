"""The training state crosses between PyTorch and JAX in both directions, and the continued runs
agree: k steps in one framework, saved, m more steps in the other, equals m more steps in the
first (parameters within 1e-5).

The PyTorch side is written here from the reference document (sections 2.1, 2.2, 5.2, 5.3):
piano-gpt's two AdamW groups (>= 2-D decayed, fused), its cosine schedule on a 1-based iteration,
loss / gradient_accumulation_steps per micro-batch, global-norm clipping, and its resume
(`optimizer.load_state_dict`, `run_stats.iter + 1`). The JAX side is our trainer itself,
`init_from=<.pt>` with `init_optimizer=True` one way and its own `.pt` export the other.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from converters.torch_model import TorchGPT, masked_cross_entropy
from piano_gpt_jax import train as trainer
from piano_gpt_jax.checkpoints import load_model_checkpoint
from piano_gpt_jax.checkpoints.torch_format import params_to_state_dict
from piano_gpt_jax.config import build_train_config, set_dotted
from piano_gpt_jax.data.pipeline import build_tokenizer, make_pipeline
from piano_gpt_jax.data.settings import DataSettings
from piano_gpt_jax.model import ModelConfig

K, M, GAS = 3, 3, 2
LR = dict(learning_rate=1e-3, min_lr=1e-4, warmup_iters=2, lr_decay_iters=20)
TOLERANCE = 1e-5

pytestmark = pytest.mark.slow


def run_config(dataset: Path, out_dir: Path, max_iters: int, **over) -> dict:
    """Our config for a tiny next-token run on the MAESTRO import (float32, no dropout)."""
    cfg = {
        "out_dir": str(out_dir), "stage": "next_token_pretraining",
        "model": {"n_layer": 2, "n_head": 2, "n_embd": 32, "context_size": 64, "dropout": 0.0},
        "system": {"device": "cpu", "dtype": "float32", "data_workers": 0},
        "data": {"batch_size": 4, "context_size": 64},
        "dataset": {"base_dataset_name": str(dataset)},
        "optimizer": {"gradient_accumulation_steps": GAS, "max_iters": max_iters,
                      "weight_decay": 0.1, "grad_clip": 1.0, "beta1": 0.9, "beta2": 0.95},
        "lr": {**LR, "decay_lr": True},
        "eval_interval": 100, "eval_iters": 1,
        "logging": {"log_interval": 100},
        "checkpoint": {"keep_last": 2},
    }
    return set_dotted(cfg, over)


def reference_lr(it: int) -> float:
    """piano-gpt's CosineDecayLRScheduler.get_lr (section 5.2)."""
    lr, min_lr, warmup, decay = (LR[k] for k in ("learning_rate", "min_lr", "warmup_iters",
                                                   "lr_decay_iters"))
    if it < warmup:
        return lr * it / warmup
    if it > decay:
        return min_lr
    return min_lr + 0.5 * (1 + math.cos(math.pi * (it - warmup) / (decay - warmup))) * (lr - min_lr)


class TorchTrainer:
    """piano-gpt's optimizer setup and iteration (sections 5.1-5.3) around our PyTorch twin."""

    def __init__(self, model: TorchGPT, weight_decay: float = 0.1, grad_clip: float = 1.0):
        self.model = model
        params = dict(model.named_parameters())  # the tied matrix once, as the reference sees it
        decay = [p for p in params.values() if p.dim() >= 2]
        no_decay = [p for p in params.values() if p.dim() < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": weight_decay},
             {"params": no_decay, "weight_decay": 0.0}],
            lr=reference_lr(0), betas=(0.9, 0.95), fused=True)
        self.grad_clip = grad_clip

    def step(self, it: int, micro_batches: list[dict]) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = reference_lr(it)
        for b in micro_batches:
            logits = self.model(torch.as_tensor(b["tokens"], dtype=torch.long))
            loss = masked_cross_entropy(logits, torch.as_tensor(b["targets"], dtype=torch.long),
                                        torch.as_tensor(b["loss_mask"]).bool())
            (loss / len(micro_batches)).backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def micro_batches(cfg: dict, skip_updates: int, n_updates: int,
                  tokenizer_desc: dict | None = None) -> list[list[dict]]:
    """The batches our trainer's data iterator yields for updates skip+1 .. skip+n."""
    settings = DataSettings.from_config(build_train_config(cfg))
    pipeline = make_pipeline(settings, build_tokenizer(settings, tokenizer_desc))
    it = pipeline.train_iterator()
    for _ in range(skip_updates * GAS):
        next(it)
    return [[next(it) for _ in range(GAS)] for _ in range(n_updates)]


def reference_save(path: Path, trainer_: TorchTrainer, it: int, tokenizer_desc: dict,
                   total_tokens: int) -> Path:
    """What piano-gpt's training loop saves (section 2.1), in its own schema."""
    from omegaconf import OmegaConf

    c = trainer_.model.config
    run_cfg = OmegaConf.create({
        "command": "init", "run_name_suffix": "pretraining-2025-02-27-20-53",
        "model_task": "next_token_prediction", "out_dir_relative": "tmp/checkpoints",
        "out_dir": "tmp/checkpoints", "eval_interval": 500, "eval_iters": 50,
        "training": {"prompt_masking": False, "context_size": c.context_size,
                     "notes_per_record": 128, "batch_size": 8, "microbatch_size": 4,
                     "gradient_accumulation_steps": GAS},
        "ddp": {"backend": "nccl"},
        "system": {"device": "cpu", "dtype": "float32", "compile": True, "data_workers": 1},
        "logging": {"wandb_log": False, "wandb_entity": "x", "wandb_project": "piano-gpt",
                    "log_interval": 20},
        "model": {"n_layer": c.n_layer, "n_head": c.n_head, "n_embd": c.n_embd,
                  "dropout": 0.0, "bias": c.bias, "context_size": "${training.context_size}"},
        "tokenizer": {"class_name": "ExponentialTimeTokenizer",
                      "config": {"time_unit": 0.01, "max_time_step": 1.0,
                                 "n_velocity_bins": 32, "n_special_ids": 2048}},
        "lr": {"type": "CosineDecay", "decay_lr": True, **LR},
        "optimizer": {"weight_decay": 0.1, "max_iters": 300000, "beta1": 0.9, "beta2": 0.95,
                      "grad_clip": 1.0},
    })
    torch.save({
        "run_config": run_cfg,
        "model": {f"_orig_mod.{k}": v for k, v in trainer_.model.state_dict().items()},
        "run_name": "0M-pretraining-2025-02-27-20-53", "model_cfg": run_cfg.model,
        "train_loss": 7.0, "val_loss": 7.1,
        "run_stats": {"iter": it, "total_tokens": total_tokens, "running_mfu": -1.0,
                      "best_val_loss": 7.1},
        "optimizer": trainer_.optimizer.state_dict(), "tokenizer_desc": tokenizer_desc,
    }, path)
    return path


def max_param_diff(model: TorchGPT, params: dict) -> float:
    ours = params_to_state_dict(model.config, params)
    theirs = model.state_dict()
    return max(float((ours[k] - theirs[k]).abs().max()) for k in theirs)


def train_jax(cfg: dict) -> dict:
    return trainer.train(build_train_config(cfg))


@pytest.fixture(scope="module")
def dataset(maestro_dataset) -> Path:
    return maestro_dataset


def test_pytorch_run_continues_in_jax(dataset, tmp_path):
    out = tmp_path / "jax"
    cfg = run_config(dataset, out, K + M)
    settings = DataSettings.from_config(build_train_config(cfg))
    tokenizer = build_tokenizer(settings)
    model_cfg = ModelConfig(vocab_size=tokenizer.vocab_size, n_layer=2, n_head=2, n_embd=32,
                            context_size=64)
    torch.manual_seed(0)
    torch_run = TorchTrainer(TorchGPT(model_cfg))
    g = np.random.default_rng(0)
    for it in range(1, K + 1):  # k steps on PyTorch's own data
        fake = [{"tokens": g.integers(0, 300, (4, 64)), "targets": g.integers(0, 300, (4, 64)),
                 "loss_mask": np.ones((4, 64), bool)} for _ in range(GAS)]
        torch_run.step(it, fake)
    pt = reference_save(tmp_path / "torch.pt", torch_run, K, tokenizer.to_dict(), 4096)

    summary = train_jax({**cfg, "init_from": str(pt), "init_optimizer": True})
    assert summary["step"] == K + M and summary["total_tokens"] == 4096 + M * GAS * 4 * 64
    for it, batches in enumerate(micro_batches(cfg, 0, M), start=K + 1):
        torch_run.step(it, batches)  # run_stats.iter + 1 onwards, as piano-gpt resumes
    jax_params = load_model_checkpoint(out).params
    diff = max_param_diff(torch_run.model, jax_params)
    print(f"torch -> jax: max |param difference| after {M} continued steps: {diff:.2e}")
    assert diff < TOLERANCE
    # Without the optimizer state, the same continuation really differs (the test can fail).
    fresh = tmp_path / "fresh"
    train_jax({**run_config(dataset, fresh, K + M), "init_from": str(pt)})
    assert max_param_diff(torch_run.model, load_model_checkpoint(fresh).params) > 100 * TOLERANCE


def test_jax_run_continues_in_pytorch(dataset, tmp_path):
    out = tmp_path / "jax"
    train_jax(run_config(dataset, out, K))
    exported = shutil.copy(out / "final.pt", tmp_path / "at_k.pt")
    train_jax(run_config(dataset, out, K + M))  # the uninterrupted JAX continuation

    # piano-gpt's resume path (section 2.2) on our export.
    checkpoint = torch.load(exported, weights_only=False)
    run_cfg = checkpoint["run_config"]
    model = TorchGPT(ModelConfig(
        vocab_size=len(checkpoint["tokenizer_desc"]["parameters"]["lexicon"]["vocab"]),
        n_layer=run_cfg.model.n_layer, n_head=run_cfg.model.n_head, n_embd=run_cfg.model.n_embd,
        context_size=checkpoint["model_cfg"].context_size, bias=checkpoint["model_cfg"].bias))
    model.load_state_dict({k.removeprefix("_orig_mod."): v
                           for k, v in checkpoint["model"].items()}, strict=True)
    torch_run = TorchTrainer(model, run_cfg.optimizer.weight_decay, run_cfg.optimizer.grad_clip)
    torch_run.optimizer.load_state_dict(checkpoint["optimizer"])
    assert checkpoint["run_stats"]["iter"] == K
    assert torch_run.optimizer.state_dict()["state"][0]["step"].item() == K
    start = checkpoint["run_stats"]["iter"] + 1
    for it, batches in enumerate(micro_batches(run_config(dataset, out, K + M), K, M),
                                 start=start):
        torch_run.step(it, batches)
    diff = max_param_diff(torch_run.model, load_model_checkpoint(out).params)
    print(f"jax -> torch: max |param difference| after {M} continued steps: {diff:.2e}")
    assert diff < TOLERANCE


def test_upstream_checkpoint_continues_in_jax_as_in_pytorch(dataset, upstream_checkpoint,
                                                           tmp_path):
    """The checkpoint piano-gpt's own code wrote: its AdamW state (3 steps) and run_stats
    (iter 14) continue here as they continue in PyTorch."""
    pt = upstream_checkpoint["pt"]
    upstream = torch.load(pt, weights_only=False)
    assert upstream["run_stats"]["iter"] == 14
    assert upstream["optimizer"]["state"][0]["step"].item() == 3
    model = TorchGPT(ModelConfig(vocab_size=2265, n_layer=2, n_head=4, n_embd=64,
                                 context_size=128, bias=True))
    model.load_state_dict({k.removeprefix("_orig_mod."): v
                           for k, v in upstream["model"].items()}, strict=True)
    torch_run = TorchTrainer(model)
    torch_run.optimizer.load_state_dict(upstream["optimizer"])

    out = tmp_path / "jax"
    over = {"model.n_layer": 2, "model.n_head": 4, "model.n_embd": 64, "model.bias": True,
            "model.context_size": 128}
    cfg = run_config(dataset, out, 14 + M, **over)
    train_jax({**cfg, "init_from": str(pt), "init_optimizer": True})
    desc = upstream["tokenizer_desc"]
    for it, batches in enumerate(micro_batches(cfg, 0, M, desc), start=15):
        torch_run.step(it, batches)
    diff = max_param_diff(torch_run.model, load_model_checkpoint(out).params)
    print(f"upstream -> jax: max |param difference| after {M} continued steps: {diff:.2e}")
    assert diff < TOLERANCE
