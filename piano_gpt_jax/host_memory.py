"""Host memory that stays with the process: glibc malloc set to reuse freed blocks.

Why: XLA:CPU allocates every step's temporaries as one block (397,688,832 bytes for the tiny
preset's train step) from one of its worker threads, and frees it when the step ends. glibc serves
a block that large from a worker thread's arena with mmap and gives it back with munmap, so every
step the kernel maps, faults in and zeroes ~97,000 fresh pages: page faults and page clearing were
~25% of the process's CPU samples (perf, cpu-clock). With one arena, no mmap for large blocks and
no trimming of the heap's top, the block is reused from step to step: our train step and the
PyTorch twin's eager step (whose logits were mmap'd the same way) both became about a quarter
faster (benchmarks/README.md, "CPU train step, per change"). The costs: the process keeps its
peak host memory until it exits, and XLA's multi-threaded compilation shares one arena, so
compiling is slower. A training run compiles once; the test suite compiles hundreds of
programs, so it keeps glibc's defaults (conftest.py).

It must run before XLA starts its threads (a thread keeps the arena it first allocated from), so
the package applies it on import (`piano_gpt_jax/__init__.py`). `PIANO_GPT_JAX_MALLOC=default`
leaves glibc's defaults; other C libraries (musl, macOS) are left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# mallopt parameter numbers from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_NEVER_TRIM = 2**31 - 1  # the largest int mallopt takes: free heap top is kept up to 2 GiB

ENV_VAR = "PIANO_GPT_JAX_MALLOC"


def keep_freed_memory() -> bool:
    """Set glibc malloc to one arena, no mmap'd blocks and no heap trimming; True when applied.

    A no-op (False) off Linux/glibc or with PIANO_GPT_JAX_MALLOC=default."""
    if os.environ.get(ENV_VAR, "") == "default" or not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c") or "libc.so.6"
    try:
        libc = ctypes.CDLL(name)
        libc.gnu_get_libc_version  # noqa: B018 — glibc only: musl has mallopt without these knobs
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return all(mallopt(param, value) == 1 for param, value in (
        (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _NEVER_TRIM)))
