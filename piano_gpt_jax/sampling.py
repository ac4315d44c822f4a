"""Autoregressive sampling with a fixed-size key/value cache, compiled once per shape.

The whole decode (prefill, then one token per loop iteration) is a single jitted program with a
`lax.while_loop`, so nothing recompiles per token and Python is not in the per-token path.

Batches: rows share one position counter (the model's cache takes one `start` for the batch), so
prompts are left-aligned with per-row lengths. The shortest prompt (rounded down to a multiple of
16 to limit recompiles) is prefilled at once; rows with longer prompts are fed their remaining
prompt tokens one per step (teacher forcing) while shorter rows already sample.

Context: learned absolute positions mean the cache cannot roll. When it is full, the newest
`window_keep` tokens (default context_size // 2) are re-prefilled at positions 0.. and decoding
goes on; `window_keep = context_size` reproduces the reference exactly (crop to the last
context_size tokens before every token), at the cost of a full forward per token past the context.

Time steps (models with the music-time embedding) are tracked from the *full* history with the
reference's rule (counter from 1, advanced by time tokens, reset at <GENAI>, 0 on non-music
tokens), rather than recomputed on the cropped window as the reference does.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from piano_gpt_jax import memory_limits
from piano_gpt_jax.model import ModelConfig, forward_cached, init_cache
from piano_gpt_jax.music.time_steps import (
    TimeTables,
    clock_after,
    step_after,
    time_steps,
    time_tables,
)
from piano_gpt_jax.sampling_settings import SamplingSettings, draw_dtypes

__all__ = ["GenerationResult", "SamplingSettings", "TokenTables", "filter_logits", "sample",
           "sample_logits", "token_tables"]

_PREFILL_BUCKET = 16
_LENGTH_BUCKET = 64
PROGRESS_TOKENS = 32  # decoded positions between two progress reports


TokenTables = TimeTables  # the sampler's name for music/time_steps.py's tables


def token_tables(tokenizer: Any) -> TimeTables:
    """The music-time rule's tables and the stop token of a checkpoint's tokenizer."""
    return time_tables(tokenizer)


def prompt_time_steps(tables: TimeTables, ids: np.ndarray) -> tuple[np.ndarray, int]:
    """(time step of each prompt token, the running counter after the prompt)."""
    return time_steps(tables, ids), clock_after(tables, ids)


@dataclasses.dataclass
class GenerationResult:
    new_tokens: list[np.ndarray]  # per row: sampled ids after the prompt (with <EOGENAI> if hit)
    stopped: np.ndarray  # (B,) bool: the row ended on the stop token
    seconds: float  # decode time, compile excluded
    compile_seconds: float  # 0 when the program was already compiled

    @property
    def n_new_tokens(self) -> int:
        return int(sum(len(t) for t in self.new_tokens))

    @property
    def tokens_per_second(self) -> float:
        return self.n_new_tokens / self.seconds if self.seconds > 0 else float("nan")


# --------------------------------------------------------------------------------------------------
# Filters


def filter_logits(logits_BxV: jax.Array, draw: Mapping[str, Any]) -> jax.Array:
    """Set every token outside the top-k / nucleus (top-p) / min-p sets to -inf, in that order.

    `draw` is SamplingSettings.draw_values() (or its traced arrays): top_k <= 0, top_p >= 1 and
    min_p <= 0 switch a filter off. Ties at a threshold are kept. The most likely token always
    survives.
    """
    top_k, top_p, min_p = draw["top_k"], draw["top_p"], draw["min_p"]
    logits_BxV = jnp.asarray(logits_BxV)
    neg_inf = jnp.array(-jnp.inf, logits_BxV.dtype)
    V = logits_BxV.shape[-1]
    sorted_BxV = jnp.sort(logits_BxV, axis=-1)[..., ::-1]
    k = jnp.clip(top_k, 1, V)
    kth_Bx1 = jnp.take_along_axis(sorted_BxV, jnp.full(logits_BxV.shape[:-1] + (1,), k - 1),
                                  axis=-1)
    logits_BxV = jnp.where((top_k > 0) & (logits_BxV < kth_Bx1), neg_inf, logits_BxV)

    probs_BxV = jax.nn.softmax(logits_BxV, axis=-1)
    sorted_p_BxV = jnp.sort(probs_BxV, axis=-1)[..., ::-1]
    before_BxV = jnp.cumsum(sorted_p_BxV, axis=-1) - sorted_p_BxV  # mass of strictly higher ranks
    kept_BxV = before_BxV < top_p
    threshold_Bx1 = jnp.min(jnp.where(kept_BxV, sorted_p_BxV, jnp.inf), axis=-1, keepdims=True)
    logits_BxV = jnp.where((top_p < 1.0) & (probs_BxV < threshold_Bx1), neg_inf, logits_BxV)

    max_p_Bx1 = jnp.max(probs_BxV, axis=-1, keepdims=True)
    return jnp.where((min_p > 0.0) & (probs_BxV < min_p * max_p_Bx1), neg_inf, logits_BxV)


def sample_logits(key: jax.Array, logits_BxV: jax.Array, draw: Mapping[str, Any]) -> jax.Array:
    """One token id per row: argmax when temperature == 0, else a filtered categorical draw."""
    logits_BxV = logits_BxV.astype(jnp.float32)
    temperature = draw["temperature"]
    greedy_B = jnp.argmax(logits_BxV, axis=-1)
    scaled_BxV = logits_BxV / jnp.maximum(temperature, 1e-6)
    filtered_BxV = filter_logits(scaled_BxV, draw)
    drawn_B = jax.random.categorical(key, filtered_BxV, axis=-1)
    return jnp.where(temperature > 0, drawn_B, greedy_B).astype(jnp.int32)


# --------------------------------------------------------------------------------------------------
# The compiled decode


class _Decoder:
    """The traced pieces of decoding for one config; `consts` are runtime values (no recompile).

    consts: prompt_len_B, key, draw (temperature and the filters), max_new, stop_id and the three
    token tables. The state carries the token and time-step buffers, the cache and its offset.
    """

    def __init__(self, cfg: ModelConfig, params, consts: dict, batch: int, length: int):
        self.cfg, self.params, self.c, self.B, self.L = cfg, params, consts, batch, length

    def run(self, tok_BxT, stp_BxT, cache, start):
        logits_BxTxV, cache = forward_cached(
            self.cfg, self.params, tok_BxT, stp_BxT if self.cfg.use_time_embedding else None,
            cache, start)
        return logits_BxTxV[:, -1].astype(jnp.float32), cache

    def run_fresh(self, tok_BxT, stp_BxT):
        # Fill a cache exactly T long, then pad it to the context: XLA's CPU attention is several
        # times slower on a T x S score matrix with S != T than on a square one.
        T = tok_BxT.shape[1]
        logits_BxV, cache = self.run(tok_BxT, stp_BxT, init_cache(self.cfg, self.B, T), 0)
        pad = ((0, 0), (0, self.cfg.context_size - T), (0, 0), (0, 0))
        return logits_BxV, tuple((jnp.pad(k, pad), jnp.pad(v, pad)) for k, v in cache)

    def unfinished(self, s):
        return (s["n"] < self.L) & ~jnp.all(s["done"])

    def emit(self, s):
        """Pick token n for every row (its prompt token, a sample, or padding once done)."""
        c, n = self.c, s["n"]
        sampled_B = sample_logits(jax.random.fold_in(c["key"], n), s["logits"], c["draw"])
        forced_B = n < c["prompt_len"]
        generating_B = ~forced_B & ~s["done"]
        token_B = jnp.where(forced_B, s["tokens"][:, n], jnp.where(generating_B, sampled_B, 0))
        tables = TimeTables(c["time_increment"], c["is_music"], c["is_restart"], -1)
        counter_B, own_step_B = step_after(tables, s["counter"], token_B, where=jnp.where)
        step_B = jnp.where(forced_B, s["steps"][:, n], jnp.where(generating_B, own_step_B, 0))
        n_new_B = s["n_new"] + generating_B.astype(jnp.int32)
        ends_B = (n_new_B >= c["max_new"]) | (token_B == c["stop_id"])
        return dict(s, n=n + 1, tokens=s["tokens"].at[:, n].set(token_B),
                    steps=s["steps"].at[:, n].set(step_B),
                    counter=jnp.where(generating_B, counter_B, s["counter"]), n_new=n_new_B,
                    done=s["done"] | (generating_B & ends_B))

    def append(self, s):
        """Emit token n, write it to cache slot n - offset; its logits predict token n + 1."""
        s = self.emit(s)
        last = s["n"] - 1
        tok_Bx1 = jax.lax.dynamic_slice_in_dim(s["tokens"], last, 1, axis=1)
        stp_Bx1 = jax.lax.dynamic_slice_in_dim(s["steps"], last, 1, axis=1)
        logits_BxV, cache = self.run(tok_Bx1, stp_Bx1, s["cache"], last - s["offset"])
        return dict(s, logits=logits_BxV, cache=cache)

    def decode_window(self, s):
        """Append tokens until done or the cache is full: one flat loop, no branch per token.

        (A refill branch inside this loop, or an outer loop around it, made XLA CPU several
        times slower per token, so windows are chained from Python instead.)
        """
        room = lambda s: (self.unfinished(s) & (s["n"] - s["offset"] < self.cfg.context_size)
                          & (s["n"] < self.c["pause_at"]))
        return jax.lax.while_loop(room, self.append, s)


def _start(cfg: ModelConfig, prefill_len: int, params, tokens_BxL, steps_BxL, counter_B,
           consts):
    """Prefill the first `prefill_len` tokens, then decode the first window."""
    B, L = tokens_BxL.shape
    d = _Decoder(cfg, params, consts, B, L)
    logits_BxV, cache = d.run_fresh(tokens_BxL[:, :prefill_len], steps_BxL[:, :prefill_len])
    state = dict(n=jnp.int32(prefill_len), offset=jnp.int32(0), tokens=tokens_BxL,
                 steps=steps_BxL, counter=counter_B, n_new=jnp.zeros(B, jnp.int32),
                 done=jnp.zeros(B, bool), logits=logits_BxV, cache=cache)
    return d.decode_window(state)


def _resume(cfg: ModelConfig, keep: int, params, state, consts):
    """The cache is full: emit one token, re-prefill the newest `keep` tokens, decode on."""
    B, L = state["tokens"].shape
    d = _Decoder(cfg, params, consts, B, L)
    s = d.emit(state)
    offset = s["n"] - keep
    tok_BxK = jax.lax.dynamic_slice_in_dim(s["tokens"], offset, keep, axis=1)
    stp_BxK = jax.lax.dynamic_slice_in_dim(s["steps"], offset, keep, axis=1)
    logits_BxV, cache = d.run_fresh(tok_BxK, stp_BxK)
    s = dict(s, offset=offset, logits=logits_BxV, cache=cache)
    return d.decode_window(s)  # no iterations when already finished


def _continue(cfg: ModelConfig, unused: int, params, state, consts):
    """Decoding paused at `pause_at` (to report progress): go on in the same window."""
    B, L = state["tokens"].shape
    return _Decoder(cfg, params, consts, B, L).decode_window(state)


_start_jit = jax.jit(_start, static_argnums=(0, 1))
_resume_jit = jax.jit(_resume, static_argnums=(0, 1))
_continue_jit = jax.jit(_continue, static_argnums=(0, 1))
_COMPILED: dict = {}


def _compiled(jitted, cfg: ModelConfig, static: int, args: tuple):
    """(AOT-compiled program for these static values and argument shapes, compile seconds)."""
    leaves, treedef = jax.tree_util.tree_flatten(args)
    key = (jitted, cfg, static, treedef, tuple((x.shape, str(x.dtype)) for x in leaves))
    if key in _COMPILED:
        return _COMPILED[key], 0.0
    t0 = time.perf_counter()
    fn = jitted.lower(cfg, static, *args).compile()
    if len(_COMPILED) >= 32:
        _COMPILED.pop(next(iter(_COMPILED)))
    _COMPILED[key] = fn
    return fn, time.perf_counter() - t0


# Bytes per (row, position) the sampler holds: token and time-step buffers (int32) on the device,
# their host copies, and the returned ids.
_BYTES_PER_POSITION = 4 * 2 * 2 + 8


def check_buffer_memory(batch: int, length: int, max_new_tokens: int) -> None:
    """Refuse up front a request whose token buffers cannot fit in half of the memory this
    process can still take (the host's, its `ulimit -v`, its cgroup: memory_limits.py),
    instead of allocating until the kernel kills the process."""
    need = batch * length * _BYTES_PER_POSITION
    limit = memory_limits.host_budget()
    if limit is None:
        return
    budget = limit.bytes // 2
    if need > budget:
        overhead = length - max_new_tokens  # the prompt and rounding
        fits = max(budget // (batch * _BYTES_PER_POSITION) - overhead - _LENGTH_BUCKET, 0)
        raise ValueError(
            f"{batch} sample(s) of {max_new_tokens:,} new tokens need about "
            f"{need / 2**30:.1f} GiB of token buffers, more than half of what this process can "
            f"still use ({memory_limits.gib(limit.bytes)}, set by {limit.what}); ask for at "
            f"most {fits:,} new tokens per sample (or fewer samples).")


def _draw_arrays(settings: SamplingSettings) -> dict[str, jax.Array]:
    """The draw values as the compiled decode reads them (runtime values: no recompile)."""
    dtypes = draw_dtypes()
    return {name: jnp.asarray(value, dtypes[name])
            for name, value in settings.draw_values().items()}


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def sample(cfg: ModelConfig, params, prompts: Sequence[np.ndarray],
             settings: SamplingSettings | None = None,
             tables: TokenTables | None = None,
             progress: Callable[[int, int], None] | None = None) -> GenerationResult:
    """Continue each prompt (a 1-D array of token ids) with up to max_new_tokens sampled tokens.

    `tables` (from `token_tables(tokenizer)`) gives the stop token and the time steps;
    it is required for models with the music-time embedding. Prompts longer than the context
    keep their last context_size tokens (time steps still counted from their start).
    `progress(new_tokens_so_far, max_new_tokens)` is called every PROGRESS_TOKENS decoded
    positions (the web app's progress bar; an exception it raises stops the generation). The
    tokens are the same with or without it: every position draws from fold_in(key, position).
    """
    settings = settings or SamplingSettings()
    if len(prompts) == 0:
        raise ValueError("the sampler needs at least one prompt")
    ctx = cfg.context_size
    keep = settings.kept_tokens(ctx)
    if tables is None:
        if cfg.use_time_embedding:
            raise ValueError("this model uses music time steps: pass "
                             "tables=token_tables(tokenizer)")
        tables = TokenTables(np.zeros(cfg.vocab_size, np.int32), np.zeros(cfg.vocab_size, bool),
                             np.zeros(cfg.vocab_size, bool), -1)
    if len(tables.time_increment) != cfg.vocab_size:
        raise ValueError(f"token tables cover {len(tables.time_increment)} tokens but the model's "
                         f"vocab_size is {cfg.vocab_size}: use the checkpoint's own tokenizer")
    rows, row_steps, counters = [], [], []
    for p in prompts:
        ids = np.asarray(p, np.int64).reshape(-1)
        if ids.size == 0:
            raise ValueError("every prompt needs at least one token")
        if ids.min() < 0 or ids.max() >= cfg.vocab_size:
            raise ValueError(f"prompt token ids must lie in [0, {cfg.vocab_size})")
        st, counter = prompt_time_steps(tables, ids)
        rows.append(ids[-ctx:])
        row_steps.append(st[-ctx:])
        counters.append(counter)
    lens = np.array([len(r) for r in rows], np.int32)
    B = len(rows)
    L = _round_up(int(lens.max()) + settings.max_new_tokens, _LENGTH_BUCKET)
    check_buffer_memory(B, L, settings.max_new_tokens)
    tokens = np.zeros((B, L), np.int32)
    steps = np.zeros((B, L), np.int32)
    for i, (r, st) in enumerate(zip(rows, row_steps, strict=True)):
        tokens[i, :len(r)] = r
        steps[i, :len(r)] = st
    pmin = int(lens.min())
    prefill = pmin - pmin % _PREFILL_BUCKET if pmin >= _PREFILL_BUCKET else pmin

    stop_id = tables.stop_id if settings.stop_at_eos else -1
    pause_at = lambda n: jnp.int32(L if progress is None else min(L, n + PROGRESS_TOKENS))
    consts = dict(pause_at=pause_at(prefill), prompt_len=jnp.asarray(lens),
                  key=jax.random.PRNGKey(settings.seed),
                  draw=_draw_arrays(settings),
                  max_new=jnp.int32(settings.max_new_tokens), stop_id=jnp.int32(stop_id),
                  time_increment=jnp.asarray(tables.time_increment),
                  is_music=jnp.asarray(tables.is_music), is_restart=jnp.asarray(tables.is_restart))
    start_args = (params, jnp.asarray(tokens), jnp.asarray(steps),
                  jnp.asarray(np.array(counters, np.int32)), consts)
    start, compile_s = _compiled(_start_jit, cfg, prefill, start_args)
    t0 = time.perf_counter()
    state = start(*start_args)
    programs: dict = {}

    def step(jitted, static: int):
        nonlocal compile_s, t0
        if jitted not in programs:
            programs[jitted], c_s = _compiled(jitted, cfg, static, (params, state, consts))
            compile_s += c_s
            t0 += c_s
        return programs[jitted](params, state, consts)

    while int(state["n"]) < L and not bool(jnp.all(state["done"])):
        if progress is not None:
            progress(int(np.asarray(state["n_new"]).max()), settings.max_new_tokens)
        window_full = int(state["n"]) - int(state["offset"]) >= ctx
        consts = dict(consts, pause_at=pause_at(int(state["n"]) + int(window_full)))
        state = step(_resume_jit, keep) if window_full else step(_continue_jit, 0)
    out_tokens = np.asarray(state["tokens"])
    n_new = np.asarray(state["n_new"])
    seconds = time.perf_counter() - t0
    new = [out_tokens[i, lens[i]:lens[i] + n_new[i]].copy() for i in range(B)]
    stopped = np.array([len(t) > 0 and int(t[-1]) == stop_id for t in new])
    return GenerationResult(new, stopped, seconds, compile_s)
