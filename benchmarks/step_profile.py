"""Where a CPU train step's time goes, per part, ours against the PyTorch twin's, in one process.

  python benchmarks/step_profile.py                                    # 4x128, batch 16 x 256
  python benchmarks/step_profile.py --n-embd 256 --context 512 --batch 8

Each part runs alone, jitted (JAX) or eager (torch), forward and forward+backward, on the same
shapes as the full step: one attention sublayer (ln + qkv + causal softmax attention + proj), one
MLP sublayer (ln + fc + GELU + proj), the ends (embeddings, final ln, tied head and cross-entropy:
the model with zero layers) and the optimizer (clipping + AdamW over every parameter). The last
lines put the parts together (attention and MLP times n_layer) against the measured full step, so
what is left over is the cost of running the parts as one program.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import piano_gpt_jax  # noqa: E402, F401 — sets the host allocator before XLA starts (host_memory.py)


def _best_of(fn, repeats: int) -> float:
    """Median seconds of `fn()` (which must block until its result exists) after two warm-ups."""
    fn()
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def jax_parts(cfg, batch_np, repeats: int) -> dict[str, tuple[float, float]]:
    """{part: (forward s, forward+backward s)} of our model's pieces."""
    from benchmarks.train_step import _opt_settings
    from piano_gpt_jax.jitted_steps import token_loss
    from piano_gpt_jax.model import MLP, CausalSelfAttention, _layer_norm, init_params
    from piano_gpt_jax.optim import make_optimizer

    B, T = batch_np["tokens"].shape
    x_BxTxC = jax.random.normal(jax.random.PRNGKey(1), (B, T, cfg.n_embd), jnp.float32)
    out = {}

    def sublayer(module):
        ln = _layer_norm(cfg.bias, "ln")
        params = {"ln": ln.init(jax.random.PRNGKey(2), x_BxTxC)["params"],
                  "m": module.init(jax.random.PRNGKey(3), x_BxTxC, True)["params"]}

        def f(p, x):
            y = module.apply({"params": p["m"]}, ln.apply({"params": p["ln"]}, x), True)
            y = y[0] if isinstance(y, tuple) else y
            return (x + y).sum()

        return params, f

    parts = {"attention": sublayer(CausalSelfAttention(cfg)), "mlp": sublayer(MLP(cfg))}
    ends_cfg = dataclasses.replace(cfg, n_layer=0)
    batch = {k: jnp.asarray(v) for k, v in batch_np.items()}
    parts["embed+head+loss"] = (init_params(ends_cfg, jax.random.PRNGKey(0)),
                                lambda p, _: token_loss(ends_cfg, p, batch)[0])
    for name, (params, f) in parts.items():
        fwd = jax.jit(f)
        both = jax.jit(jax.value_and_grad(f))
        out[name] = tuple(
            _best_of(lambda fn=fn, p=params: jax.block_until_ready(fn(p, x_BxTxC)), repeats)
            for fn in (fwd, both))

    tx = make_optimizer(_opt_settings())
    params = init_params(cfg, jax.random.PRNGKey(0))
    grads = jax.tree_util.tree_map(lambda p: jnp.full_like(p, 1e-3), params)
    opt_state = tx.init(params)

    @jax.jit
    def update(params, opt_state, grads):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    out["optimizer"] = (0.0, _best_of(
        lambda: jax.block_until_ready(update(params, opt_state, grads)), repeats))
    return out


def torch_parts(cfg, batch_np, repeats: int) -> dict[str, tuple[float, float]]:
    import torch
    import torch.nn.functional as F

    from converters.torch_model import MLP, CausalSelfAttention, LayerNorm, TorchGPT

    B, T = batch_np["tokens"].shape
    torch.manual_seed(0)
    x = torch.randn(B, T, cfg.n_embd)
    out = {}

    def sublayer(module):
        ln = LayerNorm(cfg.n_embd, cfg.bias)
        return lambda: (x + module(ln(x))).sum(), [*module.parameters(), *ln.parameters()]

    ends = TorchGPT(dataclasses.replace(cfg, n_layer=1))
    ends.transformer.h = torch.nn.ModuleList()  # the ends alone (its init divides by n_layer)
    idx = torch.from_numpy(batch_np["tokens"]).long()
    tgt = torch.from_numpy(batch_np["targets"]).long()

    def ends_loss():
        logits = ends(idx)
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), tgt.reshape(-1))

    parts = {"attention": sublayer(CausalSelfAttention(cfg)), "mlp": sublayer(MLP(cfg)),
             "embed+head+loss": (ends_loss, list(ends.parameters()))}
    for name, (f, params) in parts.items():
        def fwd(f=f):
            with torch.no_grad():
                f()

        def both(f=f, params=params):
            f().backward()
            for p in params:
                p.grad = None

        out[name] = (_best_of(fwd, repeats), _best_of(both, repeats))

    model = TorchGPT(cfg)
    for p in model.parameters():
        p.grad = torch.full_like(p, 1e-3)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=3e-4, betas=(0.9, 0.95), eps=1e-8)

    def step():
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    out["optimizer"] = (0.0, _best_of(step, repeats))
    return out


def main() -> None:
    import torch

    from benchmarks.train_step import (
        _batch,
        add_shape_arguments,
        allocator_mode,
        interleaved_seconds,
        jax_stepper,
        shape_config,
        torch_stepper,
    )
    from benchmarks.xla_cpu_flags import cpu_flags

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_arguments(p)
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()
    jax.config.update("jax_platforms", "cpu")
    torch.set_num_threads(os.cpu_count() or 1)
    cfg = shape_config(args)
    batch = _batch(args.vocab, args.batch, args.context)
    print(f"CPU: {cpu_flags()}; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; host allocator: "
          f"{allocator_mode()}")
    print(f"model {args.n_layer}x{args.n_embd} (heads {args.n_head}), vocab {args.vocab}, "
          f"batch {args.batch} x {args.context}, float32; ms, median of {args.repeats}")
    # The full step first, in a fresh process: after the parts' many programs it measured slower
    # (0.92 vs 1.06-1.10 of torch here), a state of the process rather than of the step.
    full = interleaved_seconds({"jax": jax_stepper(cfg, batch),
                                "torch": torch_stepper(cfg, batch)}, n_steps=5, rounds=4)
    step_jax, step_torch = full["jax"], full["torch"]
    ours, theirs = jax_parts(cfg, batch, args.repeats), torch_parts(cfg, batch, args.repeats)
    print(f"  {'part':<18} {'jax fwd':>8} {'torch fwd':>9} {'jax f+b':>8} {'torch f+b':>9} "
          f"{'torch/jax':>9}")
    total_jax = total_torch = 0.0
    for name in ours:
        times = (1, args.n_layer)[name in ("attention", "mlp")]
        (jf, jb), (tf, tb) = ours[name], theirs[name]
        total_jax += times * jb
        total_torch += times * tb
        label = f"{name} x{times}" if times > 1 else name
        print(f"  {label:<18} {1e3 * jf:8.1f} {1e3 * tf:9.1f} {1e3 * jb:8.1f} {1e3 * tb:9.1f} "
              f"{tb / jb:9.2f}")
    print(f"  {'sum of parts':<18} {'':>8} {'':>9} {1e3 * total_jax:8.1f} {1e3 * total_torch:9.1f} "
          f"{total_torch / total_jax:9.2f}")
    print(f"  {'full step':<18} {'':>8} {'':>9} {1e3 * step_jax:8.1f} {1e3 * step_torch:9.1f} "
          f"{step_torch / step_jax:9.2f}  (ratio = JAX/torch tokens/s)")


if __name__ == "__main__":
    main()
