"""Test helpers: tiny models and checkpoints written the way the reference trainer writes them,
and losses recomputed by hand to check what the trainer reports.

The `reference_checkpoint` fixture (root conftest.py) is built from these."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from converters.torch_model import TorchGPT
from piano_gpt_jax.model import ModelConfig, forward


def tiny_config(bias: bool = False, time: bool = False, **kw) -> ModelConfig:
    base = dict(vocab_size=61, n_layer=2, n_head=2, n_embd=16, context_size=24, bias=bias,
                use_time_embedding=time)
    base.update(kw)
    return ModelConfig(**base)


def tokenizer_desc(vocab_size: int) -> dict:
    vocab = ["<PAD>", "<CLS>"] + [f"TOKEN_{i}" for i in range(vocab_size - 2)]
    return {"name": "ExponentialTimeTokenizer",
            "parameters": {"vocab": vocab, "step_sizes": [1, 2, 4], "first_placeholder_id": 2,
                           "tokenizer_config": {"time_unit": 0.01, "max_time_step": 1.0,
                                                "n_velocity_bins": 32, "n_special_ids": 8}}}


def write_reference_checkpoint(path: Path, model: TorchGPT, layout: str = "current") -> Path:
    """torch.save of the dict the reference's training loop (or legacy script) builds."""
    from omegaconf import OmegaConf

    cfg = model.config
    run_cfg = OmegaConf.create({
        "command": "init",
        "run_name_suffix": "pretraining-${now:%Y-%m-%d-%H-%M}",
        "model_task": "next_token_prediction",
        "out_dir_relative": "tmp/checkpoints", "out_dir": "/abs/tmp/checkpoints",
        "training": {"prompt_masking": False, "context_size": cfg.context_size,
                     "batch_size": 64, "microbatch_size": 8, "gradient_accumulation_steps": 8},
        "model": {"n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_embd": cfg.n_embd,
                  "dropout": 0.0, "bias": cfg.bias, "context_size": "${training.context_size}"},
        "dataset": {"base_dataset_name": "epr-labs/maestro-sustain-v2",
                    "extra_datasets": ["epr-labs/piano-midi-de"],
                    "augmentation": {"speed_change_factors": [0.95, 1.05], "max_pitch_shift": 5}},
        "lr": {"learning_rate": 6e-4, "warmup_iters": 10},
        "logging": {"wandb_log": False, "wandb_time_suffix": "${now:%H-%M}"},
    })
    # The reference saves the compiled module's state_dict: every key prefixed, both tied names.
    state = {f"_orig_mod.{k}": v for k, v in model.state_dict().items()}
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}], lr=6e-4)
    model(torch.zeros(1, 4, dtype=torch.long),
          torch.zeros(1, 4, dtype=torch.long) if cfg.use_time_embedding else None).sum().backward()
    opt.step()
    opt.zero_grad()
    if layout == "current":
        ckpt = {
            "run_config": run_cfg, "model": state, "run_name": "0M-pretraining-test",
            "model_cfg": run_cfg.model, "train_loss": 4.25, "val_loss": 4.5,
            "run_stats": {"iter": 501, "total_tokens": 123456, "running_mfu": 0.31,
                          "best_val_loss": 4.5},
            "optimizer": opt.state_dict(), "tokenizer_desc": tokenizer_desc(cfg.vocab_size),
        }
    else:  # legacy train_legacy.py: plain-dict run_config, losses as tensors, no prefix
        model_cfg = OmegaConf.create({"n_layer": cfg.n_layer, "n_head": cfg.n_head,
                                      "n_embd": cfg.n_embd, "dropout": 0.0, "bias": cfg.bias,
                                      "context_size": cfg.context_size})
        ckpt = {
            "model": model.state_dict(), "optimizer": opt.state_dict(), "model_cfg": model_cfg,
            "iter_num": 2000, "best_val_loss": torch.tensor(3.5), "val_loss": torch.tensor(3.5),
            "train_loss": torch.tensor(3.25),
            "run_config": OmegaConf.to_container(run_cfg, resolve=False),
            "total_tokens": 999, "tokenizer_desc": tokenizer_desc(cfg.vocab_size),
            "wandb": "https://wandb.ai/x", "wandb_run_name": "legacy-run", "wandb_id": "abc",
        }
    torch.save(ckpt, path)
    return path


def randomize(model: TorchGPT, seed: int = 0) -> TorchGPT:
    """Weights of order one (and non-trivial LayerNorm gains/biases), so logits differ by position
    and token and any mismatch in the math shows up at the 1e-5 level."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return model


def losses_by_hand(model_config: ModelConfig, params, batches: list[dict], genai_id: int,
                   pad_id: int) -> dict[str, float]:
    """Token-mean cross-entropy of `params` on `batches`, in float64 from the logits, over two
    masks built from the tokens alone (never from the batches' own `loss_mask`): `after_genai`
    (positions from the <GENAI> token on, whose targets are the answer) and `all` (every non-pad
    target). What a finetuning run must report is the first; a missed prompt mask gives the
    second."""
    totals = {"after_genai": [0.0, 0], "all": [0.0, 0]}
    for b in batches:
        tokens, targets = np.asarray(b["tokens"]), np.asarray(b["targets"])
        logits = np.asarray(forward(model_config, params, tokens, b.get("time_steps")), np.float64)
        peak = logits.max(-1, keepdims=True)
        lse = np.log(np.exp(logits - peak).sum(-1)) + peak[..., 0]
        nll = lse - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
        real = targets != pad_id
        position = np.arange(tokens.shape[1])[None, :]
        genai_at = np.argmax(tokens == genai_id, axis=1)[:, None]
        has_genai = (tokens == genai_id).any(axis=1)[:, None]
        for name, mask in (("after_genai", real & has_genai & (position >= genai_at)),
                           ("all", real)):
            totals[name][0] += float(nll[mask].sum())
            totals[name][1] += int(mask.sum())
    return {name: total / count for name, (total, count) in totals.items()}


def reference_lr(it: int, lr: float, min_lr: float, warmup: int, decay: int) -> float:
    """piano-gpt's CosineDecayLRScheduler.get_lr at its 1-based iteration `it`, transcribed from
    the reference document (section 5.2), not from our optim.py."""
    if it < warmup:
        return lr * it / warmup
    if it > decay:
        return min_lr
    return min_lr + 0.5 * (1 + math.cos(math.pi * (it - warmup) / (decay - warmup))) * (lr - min_lr)
