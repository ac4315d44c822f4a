"""Data pipeline throughput on this machine: tokenizer, loader, and a CPU training step.

    python benchmarks/data_pipeline.py [--maestro ../shared/data/maestro] [--batches 20]

Prints tokenizer notes/s on real MAESTRO notes, loader batches/s at batch 32 / context 2048 for
both stages (in-process, data_workers 0), one training step of the CPU preset model, and the
loader-vs-step ratio (> 1 means the loader keeps up)."""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

DEFAULT_MAESTRO = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "maestro"


def bench_tokenizer(maestro: Path) -> float:
    from piano_gpt_jax.data.pipeline import DEFAULT_TOKENIZER_CONFIG
    from piano_gpt_jax.music.midi import read_midi
    from piano_gpt_jax.music.tokenizer import ExponentialTimeTokenizer

    tok = ExponentialTimeTokenizer.build(DEFAULT_TOKENIZER_CONFIG)
    frames = [read_midi(f) for f in sorted(maestro.glob("*.mid"))]
    n = sum(len(f) for f in frames)
    for f in frames[:1]:
        tok.encode(f)
    t = time.perf_counter()
    n_tokens = sum(len(tok.encode(f)) for f in frames)
    dt = time.perf_counter() - t
    print(f"tokenizer: {n} notes -> {n_tokens} tokens in {dt:.3f} s = {n / dt:,.0f} notes/s")
    # Record-sized calls (128 notes), the loader's pattern.
    f = frames[0]
    chunks = [f.iloc[i : i + 128] for i in range(0, len(f) - 128, 128)]
    arrays = [tuple(c[k].to_numpy() for k in ("pitch", "velocity", "start", "end")) for c in chunks]
    t = time.perf_counter()
    for a in arrays:
        tok.encode_arrays(*a)
    dt = time.perf_counter() - t
    print(f"tokenizer, 128-note windows: {len(arrays) * 128 / dt:,.0f} notes/s")
    return n / dt


def bench_loader(dataset_dir: Path, stage: str, n_batches: int) -> float:
    from piano_gpt_jax.data.pipeline import build_tokenizer, make_pipeline
    from piano_gpt_jax.data.settings import DataSettings

    s = DataSettings(stage=stage, base_dataset_name=str(dataset_dir), batch_size=32,
                     context_size=2048, notes_per_record=128, use_time_steps=True,
                     max_pitch_shift=5, speed_change_factors=(0.95, 1.05), shard_index=0,
                     shard_count=1, data_workers=0)
    t = time.perf_counter()
    p = make_pipeline(s, build_tokenizer(s))
    setup = time.perf_counter() - t
    it = p.train_iterator()
    next(it)
    t = time.perf_counter()
    for _ in range(n_batches):
        next(it)
    rate = n_batches / (time.perf_counter() - t)
    print(f"loader {stage}: {rate:.1f} batches/s at batch 32, context 2048 "
          f"(setup {setup:.1f} s, {len(p.train_records):,} train records)")
    return rate


def bench_step(n_steps: int = 5) -> float:
    import jax
    import jax.numpy as jnp

    from piano_gpt_jax.model import ModelConfig, forward, init_params

    cfg = ModelConfig(vocab_size=2265, n_layer=4, n_head=4, n_embd=128, context_size=256)
    params = init_params(cfg, jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, 2265, (16, 256)), jnp.int32)
    targets = jnp.asarray(rng.integers(0, 2265, (16, 256)), jnp.int32)

    def loss_fn(p):
        logits = forward(cfg, p, tokens)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32))
        return -jnp.take_along_axis(logp, targets[..., None], -1).mean()

    step = jax.jit(lambda p: jax.tree.map(lambda a, g: a - 1e-3 * g, p, jax.grad(loss_fn)(p)))
    params = jax.block_until_ready(step(params))
    t = time.perf_counter()
    for _ in range(n_steps):
        params = step(params)
    jax.block_until_ready(params)
    dt = (time.perf_counter() - t) / n_steps
    print(f"train step, CPU preset (4x4x128, context 256, batch 16): {dt * 1000:.0f} ms")
    return dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--maestro", type=Path, default=DEFAULT_MAESTRO)
    ap.add_argument("--batches", type=int, default=20)
    args = ap.parse_args()
    if not args.maestro.is_dir():
        raise SystemExit(f"MAESTRO folder {args.maestro} not found; pass --maestro DIR")
    from piano_gpt_jax.data import import_midi

    bench_tokenizer(args.maestro)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "maestro"
        import_midi.main([str(args.maestro), str(out)])
        rates = {st: bench_loader(out, st, args.batches)
                 for st in ("piano_task", "next_token_pretraining")}
    step_s = bench_step()
    for st, r in rates.items():
        print(f"loader/step ratio ({st}): {r * step_s:.1f}x "
              f"(batches the loader makes per training step)")


if __name__ == "__main__":
    main()
