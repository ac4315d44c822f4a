"""Music time: the position of each token on the piece's clock, which the music-time embedding
(wmte) reads (reference 4.6, midi-tokenizers de8fed8).

The rule: a counter starts at 1; each time token `kT` advances it by k (the time token itself
gets the advanced value); a restart token (<GENAI>) resets it to 1; note, velocity and time
tokens get the counter, every other token (specials, PAD, <GENAI>) 0.

Training records (tokenizer.time_steps), the JAX sampler and the PyTorch sampler all take the
rule's tables from here, derived from the tokenizer's own view of its vocabulary.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from piano_gpt_jax.music.layouts import EOGENAI, GENAI


@dataclasses.dataclass(frozen=True)
class TimeTables:
    """Per-token lookups of the rule (also what the compiled sampling loop carries)."""

    time_increment: np.ndarray  # (V,) int32: k for "kT", else 0
    is_music: np.ndarray  # (V,) bool: note, velocity and time tokens
    is_restart: np.ndarray  # (V,) bool: tokens that reset the clock (<GENAI>)
    stop_id: int  # <EOGENAI> id, or -1 when the vocabulary has none


def time_tables(tokenizer: Any, restart_tokens: Sequence[str] = (GENAI,),
                stop_token: str = EOGENAI) -> TimeTables:
    """The tables of `tokenizer`'s vocabulary (ids = positions), from its token kinds."""
    increment, music = tokenizer.time_increments(), tokenizer.music_token_mask()
    restart = np.zeros(len(increment), bool)
    for token in restart_tokens:
        if token in tokenizer.token_to_id:
            restart[tokenizer.token_to_id[token]] = True
    return TimeTables(increment.astype(np.int32), music, restart,
                      int(tokenizer.token_to_id.get(stop_token, -1)))


def time_steps(tables: TimeTables, ids: Sequence[int] | np.ndarray) -> np.ndarray:
    """The rule over a whole sequence, vectorised."""
    ids = np.asarray(ids, np.int64).ravel()
    n = len(ids)
    if n == 0:
        return np.zeros(0, np.int32)
    csum = np.cumsum(tables.time_increment[ids])
    is_restart = tables.is_restart[ids]
    last = np.maximum.accumulate(np.where(is_restart, np.arange(n), -1))
    base = np.where(last >= 0, csum[np.maximum(last, 0)], 0)
    steps = 1 + csum - base
    return np.where(tables.is_music[ids], steps, 0).astype(np.int32)


def clock_after(tables: TimeTables, ids: Sequence[int] | np.ndarray) -> int:
    """The counter after `ids`: where generation continues the clock."""
    ids = np.asarray(ids, np.int64).ravel()
    restarts = np.nonzero(tables.is_restart[ids])[0]
    tail = ids[restarts[-1] + 1:] if len(restarts) else ids
    return 1 + int(tables.time_increment[tail].sum())


def step_after(tables: TimeTables, counter: Any, token: Any, where: Any = np.where
               ) -> tuple[Any, Any]:
    """(the counter after `token`, `token`'s time step): the rule one token at a time, as both
    samplers apply it to each new token. `where` is np.where for the PyTorch sampler's ints, or
    jnp.where inside the compiled decode (tables of device arrays, a batch of tokens), so the
    rule is written once for numpy and JAX alike."""
    counter = where(tables.is_restart[token], 1, counter + tables.time_increment[token])
    return counter, where(tables.is_music[token], counter, 0)
