"""XLA:CPU options side by side: our jitted train step under each XLA_FLAGS set, against the same
step with the defaults (and the PyTorch twin's eager step), on this machine's CPU.

  python benchmarks/xla_cpu_flags.py                    # default shape (4x128, batch 16 x 256)
  python benchmarks/xla_cpu_flags.py --n-embd 256 --context 512 --batch 8

XLA reads XLA_FLAGS once per process, so each set runs in child processes, alternating with
children that run the defaults (the baseline), and the medians are compared. Prints the CPU's vector
flags first: a ratio means something only beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.train_step import (  # noqa: E402 (after the path it is found on)
    _batch,
    add_shape_arguments,
    shape_arguments,
    shape_config,
    time_jax_step,
    time_torch_step,
)

CANDIDATES = (
    "--xla_cpu_experimental_ynn_fusion_type=dot",
    "--xla_cpu_experimental_xnn_fusion_type=dot",
    "--xla_cpu_experimental_xnn_fusion_type=dot,eltwise,reduce",
    "--xla_cpu_use_xnnpack=false",
    "--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_fusion_type=dot",
    "--xla_cpu_prefer_vector_width=512",
    "--xla_cpu_enable_fast_math=true",
    "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY",
)


def cpu_flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown CPU"
    model = next((ln.split(":", 1)[1].strip() for ln in text.splitlines()
                  if ln.startswith("model name")), "?")
    flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines()
                  if ln.startswith("flags")), [])
    wanted = sorted(f for f in set(flags)
                    if f.startswith(("avx512", "amx")) or f in ("avx2", "fma"))
    return f"{model}; {' '.join(wanted)}"


def child(args: argparse.Namespace) -> None:
    import jax

    jax.config.update("jax_platforms", "cpu")
    cfg = shape_config(args)
    batch = _batch(args.vocab, args.batch, args.context)
    if args.torch:
        import torch

        torch.set_num_threads(os.cpu_count() or 1)
        seconds = time_torch_step(cfg, batch, args.steps)
    else:
        seconds = time_jax_step(cfg, batch, args.steps)
    print(json.dumps({"seconds": seconds}))


def run_child(args: argparse.Namespace, flags: str, torch: bool = False) -> float | str:
    cmd = [sys.executable, __file__, "--child", "--steps", str(args.steps),
           *shape_arguments(args)]
    if torch:
        cmd.append("--torch")
    env = {**os.environ, "XLA_FLAGS": flags}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    last = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""
    if r.returncode or not last.startswith("{"):
        lines = r.stderr.strip().splitlines() or ["?"]
        return next((ln for ln in reversed(lines) if "rror" in ln), lines[-1])[:150]
    return json.loads(last)["seconds"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_arguments(p)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3, help="baseline/candidate pairs per flag set")
    p.add_argument("--flags", action="append", help="a flag set to try (repeatable); default: "
                   "the built-in candidates")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--torch", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return
    print(f"CPU: {cpu_flags()}")
    print(f"model {args.n_layer}x{args.n_embd}, batch {args.batch} x {args.context}, "
          f"{args.steps} timed steps, float32")
    torch_s = run_child(args, "", torch=True)
    for flags in args.flags or CANDIDATES:
        # Alternate baseline and candidate: this VM's speed drifts by 10-30% over a minute, so
        # only interleaved medians compare like with like.
        base_runs, runs = [], []
        for _ in range(args.rounds):
            base_runs.append(run_child(args, ""))
            runs.append(run_child(args, flags))
        failed = next((r for r in runs if isinstance(r, str)), None)
        if failed or any(isinstance(r, str) for r in base_runs):
            print(f"  {flags:<72} failed: {failed}")
            continue
        seconds, baseline = float(np.median(runs)), float(np.median(base_runs))
        vs_torch = f"{torch_s / seconds:.2f}" if isinstance(torch_s, float) else "n/a"
        print(f"  {flags:<72} {1000 * seconds:7.1f} ms/step vs defaults {1000 * baseline:7.1f}: "
              f"{baseline / seconds:.2f}x  jax/torch {vs_torch}")
    if isinstance(torch_s, float):
        print(f"  torch eager {1000 * torch_s:.1f} ms/step")


if __name__ == "__main__":
    main()
