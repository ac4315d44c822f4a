"""Sample from an exported (or reference) `.pt` with the PyTorch twin: proof that our checkpoints
serve PyTorch users without JAX in the decoding path.

    python -m converters.torch_generate --checkpoint OUT.pt --out OUT_DIR
        (--prompt-midi FILE | --prompt-dataset SPLIT:INDEX) [--task NAME] [--temperature T] ...

Same options and outputs as `python -m piano_gpt_jax.generate`. Decoding is the reference's way
(a full forward pass over the visible window for every token, no cache), with the same window
rule, time steps and filters as the JAX sampler, so greedy decoding gives the same tokens.
The checkpoint is read with the restricted loader (no arbitrary unpickling).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from converters.torch_model import TorchGPT
from piano_gpt_jax import sampling
from piano_gpt_jax.checkpoints.model_folder import is_model_folder, load_model_folder
from piano_gpt_jax.checkpoints.torch_format import load_torch_checkpoint, params_to_state_dict
from piano_gpt_jax.generate import main as generate_main
from piano_gpt_jax.music.time_steps import step_after


def filter_logits(logits_V: torch.Tensor, draw: Mapping[str, Any]) -> torch.Tensor:
    """top-k, then nucleus, then min-p, with the JAX sampler's tie and threshold rules; `draw`
    is SamplingSettings.draw_values(), as sampling.filter_logits takes it."""
    top_k, top_p, min_p = draw["top_k"], draw["top_p"], draw["min_p"]
    logits_V = logits_V.clone()
    if top_k > 0:
        kth = torch.topk(logits_V, min(top_k, logits_V.numel())).values[-1]
        logits_V[logits_V < kth] = -float("inf")
    probs_V = torch.softmax(logits_V, dim=-1)
    if top_p < 1.0:
        sorted_p, _ = torch.sort(probs_V, descending=True)
        before = torch.cumsum(sorted_p, 0) - sorted_p
        threshold = sorted_p[before < top_p].min()
        logits_V[probs_V < threshold] = -float("inf")
    if min_p > 0.0:
        logits_V[probs_V < min_p * probs_V.max()] = -float("inf")
    return logits_V


def torch_sample(model: TorchGPT, prompts: Sequence[np.ndarray],
                   settings: sampling.SamplingSettings,
                   tables: sampling.TokenTables) -> sampling.GenerationResult:
    """Decode each prompt (one row at a time) with a full forward pass per token."""
    ctx = model.config.context_size
    keep = settings.kept_tokens(ctx)
    longest = max(len(p) for p in prompts)
    sampling.check_buffer_memory(len(prompts), longest + settings.max_new_tokens,
                                 settings.max_new_tokens)
    stop_id = tables.stop_id if settings.stop_at_eos else -1
    gen = torch.Generator().manual_seed(settings.seed)
    draw = settings.draw_values()
    new_tokens, stopped = [], []
    t0 = time.perf_counter()
    model.eval()
    with torch.no_grad():
        for prompt in prompts:
            hist = [int(t) for t in prompt]
            steps, counter = sampling.prompt_time_steps(tables, np.asarray(hist))
            steps = [int(s) for s in steps]
            offset = max(0, len(hist) - ctx)
            new: list[int] = []
            while len(new) < settings.max_new_tokens:
                idx = torch.tensor([hist[offset:]], dtype=torch.long)
                st = torch.tensor([steps[offset:]], dtype=torch.long)
                logits = model(idx, st if model.config.use_time_embedding else None)[0, -1]
                if settings.temperature == 0:
                    tok = int(torch.argmax(logits))
                else:
                    filtered = filter_logits(logits.float() / settings.temperature, draw)
                    tok = int(torch.multinomial(torch.softmax(filtered, -1), 1, generator=gen))
                counter, step = step_after(tables, counter, tok)
                hist.append(tok)
                steps.append(int(step))
                new.append(tok)
                if tok == stop_id:
                    break
                if len(hist) - offset > ctx:
                    offset = len(hist) - keep
            new_tokens.append(np.asarray(new, np.int32))
            stopped.append(bool(new) and new[-1] == stop_id)
    return sampling.GenerationResult(new_tokens, np.array(stopped), time.perf_counter() - t0, 0.0)


def _load(path: str):
    if is_model_folder(path):
        return load_model_folder(path)
    if not Path(path).is_file() or Path(path).suffix != ".pt":
        raise ValueError(f"{path} is neither a .pt file nor a model folder; export one with "
                         "python -m converters.jax_to_torch or converters.export_hf, or use "
                         "python -m piano_gpt_jax.generate for checkpoint directories")
    return load_torch_checkpoint(path)


def torch_sampler(record, prompts, settings, tables) -> sampling.GenerationResult:
    model = TorchGPT(record.model_config)
    model.load_state_dict(params_to_state_dict(record.model_config, record.params))
    return torch_sample(model, prompts, settings, tables)


def main(argv: Sequence[str] | None = None) -> int:
    return generate_main(argv, prog="python -m converters.torch_generate",
                         sampler=torch_sampler, load_checkpoint=_load)


if __name__ == "__main__":
    sys.exit(main())
