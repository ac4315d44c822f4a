"""Mutation smoke test: does the suite catch deliberate bugs in the core? Run by hand, not in CI:

    python tests/mutation_smoke.py            # every mutation
    python tests/mutation_smoke.py causal     # the mutations whose name contains "causal"

Each mutation replaces one exact line of a source file, runs the tests that should notice (the
fast ones; see RUNS), and puts the file back byte for byte, also on Ctrl-C. Before any mutation,
the same tests run on the untouched code and must pass, or a "caught" would mean nothing. Prints
a table of which mutations were caught; exits 1 when one was missed. pytest does not collect this
file (its name matches neither `test_*.py` nor `*_test.py`).
"""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Mutation:
    name: str
    path: str  # relative to the repository root
    old: str  # an exact substring that occurs once in the file
    new: str
    tests: tuple[str, ...]  # pytest arguments that should catch it


MUTATIONS = (
    # core modules: optimizer, sampling, metrics, model/attention, records
    Mutation("drop the gradient clip", "piano_gpt_jax/optim.py",
             "        parts.append(optax.clip_by_global_norm(o.grad_clip))\n",
             "        pass  # MUTATION: no gradient clipping\n",
             ("piano_gpt_jax/optim_test.py",)),
    Mutation("ignore top-p", "piano_gpt_jax/sampling.py",
             "    logits_BxV = jnp.where((top_p < 1.0) & (probs_BxV < threshold_Bx1), neg_inf, "
             "logits_BxV)\n",
             "    logits_BxV = logits_BxV  # MUTATION: top-p ignored\n",
             ("piano_gpt_jax/sampling_test.py",)),
    Mutation("swap target/generation in F1", "piano_gpt_jax/piano_metrics.py",
             "        out = f1_scores(target, generated, self.use_pitch_class, "
             "self.velocity_threshold)\n",
             "        out = f1_scores(generated, target, self.use_pitch_class, "
             "self.velocity_threshold)  # MUTATION\n",
             ("piano_gpt_jax/piano_metrics_test.py",)),
    Mutation("off-by-one in the causal mask", "piano_gpt_jax/model.py",
             "            mask_TxT = jnp.tril(jnp.ones((T, T), dtype=bool))\n",
             "            mask_TxT = jnp.tril(jnp.ones((T, T), dtype=bool), k=1)  # MUTATION\n",
             ("piano_gpt_jax/model_test.py", "converters/torch_model_test.py",
              "tests/test_upstream_oracle.py", "piano_gpt_jax/kernels_test.py")),
    Mutation("off-by-one in the blocked causal mask (CPU default)", "piano_gpt_jax/kernels.py",
             "        mask_QxS = jnp.arange(end)[None, :] <= jnp.arange(start, end)[:, None]\n",
             "        mask_QxS = jnp.arange(end)[None, :] <= jnp.arange(start, end)[:, None] + 1\n",
             ("piano_gpt_jax/model_test.py", "converters/torch_model_test.py",
              "tests/test_upstream_oracle.py", "piano_gpt_jax/kernels_test.py")),
    Mutation("skip the <GENAI> loss mask", "piano_gpt_jax/data/records.py",
             "        n_masked = len(prompt) - 1 if self.finetuning else 0\n",
             "        n_masked = 0  # MUTATION: prompt tokens trained under finetuning\n",
             ("piano_gpt_jax/data/records_test.py", "piano_gpt_jax/data/pipeline_test.py")),
    Mutation("wrong LayerNorm eps", "piano_gpt_jax/model.py",
             "LAYER_NORM_EPS = 1e-5",
             "LAYER_NORM_EPS = 1e-6",  # flax's own default
             ("tests/test_upstream_oracle.py", "converters/torch_model_test.py")),
    # optimizer, schedule, accumulation, precision
    Mutation("Adam eps 1e-6", "piano_gpt_jax/config.py",
             "    eps: float = _ruled(1e-8, POSITIVE)", "    eps: float = _ruled(1e-6, POSITIVE)",
             ("piano_gpt_jax/run/saving_test.py",)),
    Mutation("weight decay on vectors too", "piano_gpt_jax/optim.py",
             "    return jax.tree_util.tree_map(lambda p: p.ndim >= 2, params)\n",
             "    return jax.tree_util.tree_map(lambda p: p.ndim >= 1, params)  # MUTATION\n",
             ("piano_gpt_jax/optim_test.py",)),
    Mutation("warmup from 0 (0-based iteration)", "piano_gpt_jax/optim.py",
             "        it = jnp.asarray(count, jnp.float32) + 1.0\n",
             "        it = jnp.asarray(count, jnp.float32)  # MUTATION\n",
             ("piano_gpt_jax/optim_test.py",)),
    Mutation("no gradient accumulation", "piano_gpt_jax/optim.py",
             "every_k_schedule=o.gradient_accumulation_steps)",
             "every_k_schedule=1)  # MUTATION",
             ("piano_gpt_jax/optim_test.py",)),
    Mutation("float16 gradients left scaled", "piano_gpt_jax/jitted_steps.py",
             "lambda g: g.astype(jnp.float32) / scale, grads)\n",
             "lambda g: g.astype(jnp.float32), grads)  # MUTATION: not unscaled\n",
             ("piano_gpt_jax/jitted_steps_test.py",)),
    # export mapping, resume
    Mutation("exp_avg_sq exported as exp_avg", "piano_gpt_jax/run/saving.py",
             "    optimizer = AdamState(count=int(adam.count), mu=f32(adam.mu), nu=f32(adam.nu),",
             "    optimizer = AdamState(count=int(adam.count), mu=f32(adam.nu), nu=f32(adam.mu),",
             ("piano_gpt_jax/run/saving_test.py",)),
    Mutation("resume ignores the data iterator's state", "piano_gpt_jax/run/start.py",
             "        iterator.set_state(data_state)\n",
             "        pass  # MUTATION: batches start over on resume\n",
             ("piano_gpt_jax/run/saving_test.py",)),
    # tokenizer, records and masks, tasks
    Mutation("note ends not quantized", "piano_gpt_jax/music/tokenizer.py",
             "        end_q = np.round(end / tu) * tu\n",
             "        end_q = end  # MUTATION\n",
             ("piano_gpt_jax/music/tokenizer_test.py",)),
    Mutation("padding counted in the loss", "piano_gpt_jax/data/records.py",
             "    mask = (targets != pad_id).astype(np.int32)\n",
             "    mask = np.ones_like(targets, np.int32)  # MUTATION\n",
             ("piano_gpt_jax/data/records_test.py",)),
    Mutation("chord tolerance 15.5 ms", "piano_gpt_jax/music/tasks.py",
             "CHORD_TOLERANCE_S = 0.015", "CHORD_TOLERANCE_S = 0.0155",
             ("piano_gpt_jax/music/tasks_test.py",)),
    Mutation("line window exclusive at its end", "piano_gpt_jax/music/tasks.py",
             "    ringing_WxN = (start[None, :] <= t[:, None] + LINE_WINDOW_S)",
             "    ringing_WxN = (start[None, :] < t[:, None] + LINE_WINDOW_S)",
             ("piano_gpt_jax/music/tasks_test.py",)),
    # sampling, KV cache, metrics
    Mutation("top-k keeps one token more", "piano_gpt_jax/sampling.py",
             "    k = jnp.clip(top_k, 1, V)\n",
             "    k = jnp.clip(top_k + 1, 1, V)  # MUTATION\n",
             ("piano_gpt_jax/sampling_test.py",)),
    Mutation("KV cache written one position late", "piano_gpt_jax/model.py",
             "k_BxTxHxD.astype(k_cache_BxSxHxD.dtype), (0, start, 0, 0))",
             "k_BxTxHxD.astype(k_cache_BxSxHxD.dtype), (0, start + 1, 0, 0))",
             ("piano_gpt_jax/model_test.py", "piano_gpt_jax/sampling_test.py")),
    Mutation("F1 unweighted by segment duration", "piano_gpt_jax/piano_metrics.py",
             "    w = np.asarray(seg[\"durations\"], np.float64)\n",
             "    w = np.ones(len(seg[\"durations\"]))  # MUTATION\n",
             ("piano_gpt_jax/piano_metrics_test.py",)),
    # the memory plan
    Mutation("memory plan forgets the optimizer state", "piano_gpt_jax/run/memory_plan.py",
             "    state = p * (4 + 8 + 4 + 4)", "    state = p * 4",
             ("piano_gpt_jax/run/memory_plan_test.py",)),
)


def run_pytest(tests: tuple[str, ...]) -> tuple[int, list[str], float]:
    """(exit code, failed test ids, seconds) of the fast tests among `tests`."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    began = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        "-m", "not slow", "-rf", *tests], cwd=REPO, env=env,
                       capture_output=True, text=True)
    failed = re.findall(r"^FAILED (\S+)", r.stdout, flags=re.M)
    return r.returncode, failed, time.perf_counter() - began


class Mutated:
    """The file with one mutation applied, restored on exit (exceptions and signals too)."""

    def __init__(self, m: Mutation):
        self.path = REPO / m.path
        self.original = self.path.read_bytes()
        text = self.original.decode()
        if text.count(m.old) != 1:
            raise SystemExit(f"mutation {m.name!r}: expected exactly one {m.old.strip()!r} in "
                             f"{m.path}, found {text.count(m.old)}; update MUTATIONS")
        self.mutated = text.replace(m.old, m.new).encode()

    def __enter__(self) -> Mutated:
        self._previous = {s: signal.signal(s, self._restore_and_exit)
                          for s in (signal.SIGINT, signal.SIGTERM)}
        self.path.write_bytes(self.mutated)
        return self

    def _restore_and_exit(self, signum, frame) -> None:
        self.restore()
        raise SystemExit(f"interrupted; {self.path} restored")

    def restore(self) -> None:
        self.path.write_bytes(self.original)

    def __exit__(self, *exc) -> None:
        self.restore()
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def main(argv: list[str]) -> int:
    chosen = [m for m in MUTATIONS if not argv or any(a in m.name for a in argv)]
    for m in chosen:  # fail early on a stale mutation, before touching anything
        Mutated(m)
    tests = tuple(dict.fromkeys(t for m in chosen for t in m.tests))
    code, failed, seconds = run_pytest(tests)
    if code != 0:
        print(f"the unmutated code fails these tests ({failed or f'exit {code}'}); fix that first")
        return 2
    print(f"baseline: {len(tests)} test files pass on the unmutated code ({seconds:.0f} s)\n")

    rows, missed = [], 0
    for m in chosen:
        with Mutated(m):
            code, failed, seconds = run_pytest(m.tests)
        if code == 1:
            first = failed[0].split("::", 1)[-1] if failed else "?"
            verdict = f"caught: {len(failed)} failed ({first}{', ...' if len(failed) > 1 else ''})"
        elif code == 0:
            verdict, missed = "MISSED", missed + 1
        else:
            verdict, missed = f"ERROR (pytest exit {code})", missed + 1
        rows.append((m.name, m.path, verdict, f"{seconds:.0f} s"))
        print(f"{m.name}: {verdict}", flush=True)

    header = ("mutation", "file", "result", "time")
    widths = [max(len(str(r[i])) for r in (header, *rows)) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(
        str(c).ljust(w) for c, w in zip(r, widths, strict=True)) + " |"
    print("\n" + "\n".join([line(header), line(tuple("-" * w for w in widths)),
                            *map(line, rows)]))
    print(f"\n{len(rows) - missed} of {len(rows)} mutations caught")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
