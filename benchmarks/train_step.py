"""Training-step throughput: our jitted step vs the PyTorch twin's eager step, in one process.

  python benchmarks/train_step.py            # CPU: float32, same model/batch for both; prints
                                             # tokens/s, the ratio, and gather vs one-hot embeddings
  python benchmarks/train_step.py --gpu      # accelerator: gpt2 (124M-class) at context 2048 in
                                             # bfloat16, each attention implementation and remat
                                             # on/off; prints ms/step, tokens/s, MFU, peak memory

Both sides run a full step: forward, token-mean cross-entropy, backward, grad clipping and AdamW
(torch: fused=False on CPU, eager, no torch.compile - the reference's CPU path).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # configs/ for --gpu

# Before XLA starts: the package sets the host allocator on import (piano_gpt_jax/host_memory.py),
# for both sides of the comparison; PIANO_GPT_JAX_MALLOC=default measures glibc's defaults.
import piano_gpt_jax  # noqa: E402


def allocator_mode() -> str:
    """Which host allocator this process runs with (a ratio depends on it: host_memory.py)."""
    return "freed memory kept" if piano_gpt_jax.HOST_MEMORY_KEPT else "glibc defaults"


def _batch(vocab: int, batch: int, T: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    seq = rng.integers(1, vocab, (batch, T + 1)).astype(np.int32)
    return {"tokens": seq[:, :-1], "targets": seq[:, 1:],
            "loss_mask": np.ones((batch, T), np.int32)}


def add_shape_arguments(p: argparse.ArgumentParser) -> None:
    """The CPU benchmarks' model and batch shape (default: the tiny preset's)."""
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--vocab", type=int, default=2265)


def shape_arguments(args: argparse.Namespace) -> list[str]:
    """The same shape again as command-line arguments, for a child process."""
    return ["--n-layer", str(args.n_layer), "--n-head", str(args.n_head), "--n-embd",
            str(args.n_embd), "--context", str(args.context), "--batch", str(args.batch),
            "--vocab", str(args.vocab)]


def shape_config(args: argparse.Namespace, **overrides):
    from piano_gpt_jax.model import ModelConfig

    return ModelConfig(vocab_size=args.vocab, n_layer=args.n_layer, n_head=args.n_head,
                       n_embd=args.n_embd, context_size=args.context, **overrides)


def _opt_settings(max_iters: int = 10_000):
    from piano_gpt_jax.config import OptimSettings

    return OptimSettings.of(gradient_accumulation_steps=1, max_iters=max_iters, weight_decay=0.1,
                         grad_clip=1.0, beta1=0.9, beta2=0.95, learning_rate=3e-4, min_lr=3e-5,
                         warmup_iters=10, decay_lr=True, lr_decay_iters=max_iters)


def jax_stepper(model_config, batch_np, dtype: str = "float32") -> Callable[[], None]:
    """One step of our jitted train step per call (compiled and warmed up here), data-parallel
    over the devices; each call blocks until the step's loss exists."""
    from piano_gpt_jax.jitted_steps import (
        compile_steps,
        init_train_state,
        make_eval_step,
        make_mesh,
        make_train_step,
        replicate,
        shard_batch,
    )
    from piano_gpt_jax.model import init_params
    from piano_gpt_jax.optim import make_optimizer
    from piano_gpt_jax.precision import Precision

    mesh = make_mesh()
    tx = make_optimizer(_opt_settings())
    precision = Precision(dtype)
    train, _ = compile_steps(make_train_step(model_config, tx, precision),
                             make_eval_step(model_config), mesh)
    holder = {"state": replicate(init_train_state(
        init_params(model_config, jax.random.PRNGKey(0)), tx, 0, precision), mesh)}
    batch = shard_batch(batch_np, mesh)

    def step() -> None:
        holder["state"], m = train(holder["state"], batch)
        jax.block_until_ready(m["loss"])

    for _ in range(2):  # compile + warm up
        step()
    return step


def torch_stepper(model_config, batch_np) -> Callable[[], None]:
    """One step of the PyTorch twin per call: eager, float32, on the CPU (warmed up here)."""
    import torch
    import torch.nn.functional as F

    from converters import TorchGPT

    torch.manual_seed(0)
    model = TorchGPT(model_config)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=3e-4, betas=(0.9, 0.95), eps=1e-8)
    x = torch.from_numpy(batch_np["tokens"]).long()
    y = torch.from_numpy(batch_np["targets"]).long()

    def step() -> None:
        logits = model(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    return step


def interleaved_seconds(steppers: dict[str, Callable[[], None]], n_steps: int,
                        rounds: int = 5) -> dict[str, float]:
    """Median seconds per step of each stepper, timed in turns: `rounds` rounds, each running
    every stepper for `n_steps` steps. A 2-core cloud VM's speed drifts by 10-30% within a minute
    (seen here), so timings taken one after the other compare the minutes as much as the code;
    taken in turns, every stepper sees the same minutes."""
    times: dict[str, list[float]] = {name: [] for name in steppers}
    for _ in range(rounds):
        for name, step in steppers.items():
            t0 = time.perf_counter()
            for _ in range(n_steps):
                step()
            times[name].append((time.perf_counter() - t0) / n_steps)
    return {name: float(np.median(ts)) for name, ts in times.items()}


def time_jax_step(model_config, batch_np, n_steps: int, dtype: str = "float32") -> float:
    """Seconds per step of our jitted train step (after compilation)."""
    return interleaved_seconds({"jax": jax_stepper(model_config, batch_np, dtype)}, n_steps,
                               rounds=1)["jax"]


def time_torch_step(model_config, batch_np, n_steps: int) -> float:
    """Seconds per step of the PyTorch twin, eager, float32, on the CPU."""
    return interleaved_seconds({"torch": torch_stepper(model_config, batch_np)}, n_steps,
                               rounds=1)["torch"]


def cpu_mode(args) -> None:
    import torch

    from benchmarks.xla_cpu_flags import cpu_flags

    torch.set_num_threads(os.cpu_count() or 1)
    base = shape_config(args)
    batch = _batch(args.vocab, args.batch, args.context)
    tokens = args.batch * args.context
    print(f"CPU: {cpu_flags()}; host allocator: {allocator_mode()}")
    print(f"model {args.n_layer}x{args.n_embd} (heads {args.n_head}), vocab {args.vocab}, batch "
          f"{args.batch} x {args.context} tokens, float32, {os.cpu_count()} CPU threads, "
          f"median of {args.rounds} interleaved rounds of {args.steps} steps")
    steppers = {name: jax_stepper(dataclasses.replace(base, one_hot_embedding=one_hot), batch)
                for name, one_hot in (("jax gather", False), ("jax one-hot", True))}
    steppers["torch eager"] = torch_stepper(base, batch)
    results = interleaved_seconds(steppers, args.steps, args.rounds)
    for name, dt in results.items():
        print(f"  {name:<12} {1000 * dt:8.1f} ms/step {tokens / dt:10,.0f} tokens/s")
    best_jax = min(results["jax gather"], results["jax one-hot"])
    print(f"ratio jax/torch tokens/s: gather {results['torch eager'] / results['jax gather']:.2f}"
          f", one-hot {results['torch eager'] / results['jax one-hot']:.2f} "
          f"(best {results['torch eager'] / best_jax:.2f}); faster embedding on this CPU: "
          f"{'one-hot' if results['jax one-hot'] < results['jax gather'] else 'gather'}")


GPU_VARIANTS = (("auto", False), ("cudnn", False), ("xla", False), ("einsum", False),
                ("auto", True))
if os.environ.get("GPU_VARIANTS"):  # e.g. "auto:0,auto:1" to re-measure a few
    GPU_VARIANTS = tuple((a, r == "1") for a, r in
                         (v.split(":") for v in os.environ["GPU_VARIANTS"].split(",")))


def gpu_variant(args) -> dict:
    """One accelerator measurement (run in its own process, so peak memory is its own)."""
    from configs.piano import MODEL_PRESETS
    from piano_gpt_jax.model import ModelConfig, count_params, init_params
    from piano_gpt_jax.run_log import flops_per_token, mfu

    n_layer, n_head, n_embd = MODEL_PRESETS[args.gpu_preset]
    T = args.gpu_context
    cfg = ModelConfig(vocab_size=2265, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                      context_size=T, dtype="bfloat16", attention=args.attention,
                      remat=args.remat)
    n_dev = jax.device_count()
    batch = _batch(cfg.vocab_size, args.gpu_batch * n_dev, T)
    n_params = count_params(jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0))),
                            include_position=False)
    kind = jax.devices()[0].device_kind
    t0 = time.perf_counter()
    dt = time_jax_step(cfg, batch, args.steps, dtype="bfloat16")
    tps = batch["tokens"].size / dt
    m = mfu(tps, flops_per_token(n_params, n_layer, n_head, cfg.head_dim, T), kind, n_dev)
    stats = jax.devices()[0].memory_stats() or {}
    return {"preset": args.gpu_preset, "params_m": n_params / 1e6, "device": kind,
            "n_devices": n_dev, "batch": list(batch["tokens"].shape), "attention": args.attention,
            "remat": args.remat, "ms_per_step": 1000 * dt, "tokens_per_s": tps,
            "mfu": m, "peak_gib": stats.get("peak_bytes_in_use", 0) / 2**30,
            "wall_s": time.perf_counter() - t0}


def gpu_mode(args) -> None:
    """Every accelerator choice at once (attention implementation, remat), each in a fresh
    process: the first GPU session measures them all in one go."""
    import json
    import subprocess

    print(f"{args.gpu_preset}, context {args.gpu_context}, {args.gpu_batch} sequences per "
          "device, bf16 compute (f32 master weights), donated state, AdamW + clipping")
    for attention, remat in GPU_VARIANTS:
        cmd = [sys.executable, __file__, "--gpu-child", "--attention", attention,
               "--gpu-preset", args.gpu_preset, "--gpu-context", str(args.gpu_context),
               "--gpu-batch", str(args.gpu_batch), "--steps", str(args.steps)]
        if remat:
            cmd.append("--remat")
        r = subprocess.run(cmd, capture_output=True, text=True)
        line = r.stdout.strip().splitlines()[-1] if r.returncode == 0 and r.stdout.strip() else ""
        if not line.startswith("{"):
            lines = r.stderr.strip().splitlines() or ["?"]
            err = next((ln for ln in reversed(lines) if "Error" in ln), lines[-1])[:160]
            print(f"  attention={attention:<6} remat={remat!s:<5} failed: {err}")
            continue
        d = json.loads(line)
        mfu_text = "n/a" if d["mfu"] is None else f"{100 * d['mfu']:.1f}%"
        print(f"  attention={attention:<6} remat={remat!s:<5} {d['ms_per_step']:8.1f} ms/step "
              f"{d['tokens_per_s']:>10,.0f} tokens/s  MFU {mfu_text:>6}  peak "
              f"{d['peak_gib']:.1f} GiB  ({d['params_m']:.1f}M params, {d['n_devices']} x "
              f"{d['device']}, batch {d['batch']})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpu", action="store_true", help="accelerator mode (gpt2 preset, bf16)")
    add_shape_arguments(p)
    p.add_argument("--gpu-batch", type=int, default=8, help="sequences per device (--gpu)")
    p.add_argument("--gpu-preset", default="gpt2",
                   help="model preset of configs/piano.py (--gpu)")
    p.add_argument("--gpu-context", type=int, default=2048, help="context size (--gpu)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (CPU mode)")
    p.add_argument("--gpu-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--attention", default="auto", help=argparse.SUPPRESS)
    p.add_argument("--remat", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.gpu_child:
        import json

        print(json.dumps(gpu_variant(args)))
    elif args.gpu:
        gpu_mode(args)
    else:
        jax.config.update("jax_platforms", "cpu")
        cpu_mode(args)


if __name__ == "__main__":
    main()
