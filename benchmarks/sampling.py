"""Tokens/s of the cached sampler against a full forward pass per token (the reference's way).

    python benchmarks/sampling.py [--n-layer 4 --n-embd 128 --context 1024 --prompt 896 --new 128]

Both sides run greedy decoding of the same model from the same prompt, compile excluded (each side
is run once to warm up). The full-forward side pads its window to the context length so that it
compiles once; a causal model ignores the padding, so this costs what an eager full pass costs.
Optionally (--torch) the PyTorch twin's eager full-forward loop is timed as well.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from piano_gpt_jax import sampling
from piano_gpt_jax.model import ModelConfig, count_params, forward, init_params


def full_forward_greedy(cfg: ModelConfig, params, prompt: np.ndarray, n_new: int) -> np.ndarray:
    """Crop to the last context_size tokens, run the whole window, take the last logits."""
    ctx = cfg.context_size

    @jax.jit
    def next_token(params, window_1xT, last):
        logits = forward(cfg, params, window_1xT)
        return jnp.argmax(logits[0, last])

    hist = list(int(t) for t in prompt)
    for _ in range(n_new):
        window = hist[-ctx:]
        padded = jnp.asarray([window + [0] * (ctx - len(window))], jnp.int32)
        hist.append(int(next_token(params, padded, len(window) - 1)))
    return np.array(hist[len(prompt):])


def torch_full_forward_greedy(cfg: ModelConfig, params, prompt: np.ndarray, n_new: int):
    import torch

    from converters.torch_model import TorchGPT
    from piano_gpt_jax.checkpoints.torch_format import params_to_state_dict

    model = TorchGPT(cfg)
    model.load_state_dict(params_to_state_dict(cfg, params))
    model.eval()
    idx = torch.as_tensor(prompt[None], dtype=torch.long)
    with torch.no_grad():
        for _ in range(n_new):
            logits = model(idx[:, -cfg.context_size:])
            idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return idx[0, len(prompt):].numpy()


def timed(fn, *args) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--n-embd", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=2265)  # exponential.yaml
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--prompt", type=int, default=896)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--torch", action="store_true", help="also time the PyTorch twin, eager")
    args = ap.parse_args()

    cfg = ModelConfig(vocab_size=args.vocab, n_layer=args.n_layer, n_head=args.n_head,
                      n_embd=args.n_embd, context_size=args.context)
    params = init_params(cfg, jax.random.PRNGKey(0))
    prompt = np.random.default_rng(0).integers(2, 217, size=args.prompt).astype(np.int32)
    settings = sampling.SamplingSettings(temperature=0.0, max_new_tokens=args.new,
                                         stop_at_eos=False, window_keep=args.context)
    print(f"model {args.n_layer}x{args.n_embd} ({count_params(params) / 1e6:.2f} M params), "
          f"context {args.context}, prompt {args.prompt}, {args.new} new tokens, "
          f"backend {jax.default_backend()}")

    warm = sampling.sample(cfg, params, [prompt], settings)
    cached = sampling.sample(cfg, params, [prompt], settings)
    cached_tps = cached.tokens_per_second
    print(f"cached sampler : {cached_tps:9.1f} tokens/s "
          f"({cached.seconds:.3f} s; compile {warm.compile_seconds:.1f} s, once)")

    full_forward_greedy(cfg, params, prompt, 2)  # compile
    full_s, full_tokens = timed(full_forward_greedy, cfg, params, prompt, args.new)
    full_tps = args.new / full_s
    print(f"full forward   : {full_tps:9.1f} tokens/s ({full_s:.3f} s)")
    same = np.array_equal(full_tokens, cached.new_tokens[0])
    print(f"speed-up       : {cached_tps / full_tps:9.1f}x  (greedy tokens identical: {same})")

    if args.torch:
        torch_full_forward_greedy(cfg, params, prompt, 1)
        t_s, t_tokens = timed(torch_full_forward_greedy, cfg, params, prompt, args.new)
        print(f"torch eager    : {args.new / t_s:9.1f} tokens/s ({t_s:.3f} s); cached is "
              f"{cached_tps / (args.new / t_s):.1f}x faster "
              f"(greedy tokens identical: {np.array_equal(t_tokens, cached.new_tokens[0])})")


if __name__ == "__main__":
    main()
