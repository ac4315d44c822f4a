"""The allocator setting takes effect: a large block allocated on a worker thread (as XLA's step
temporaries are) comes from the reusable heap, not from a fresh mmap."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# Run in a fresh process: the setting must precede the threads that allocate.
_PROBE = r"""
import piano_gpt_jax
import ctypes, threading
import numpy as np

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                 "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
seen = {}

def worker():
    before = libc.mallinfo2().hblks
    block = np.ones(100 * 2**20, np.uint8)  # 100 MiB, as large as XLA's step temporaries
    seen["mmapped"] = libc.mallinfo2().hblks - before
    del block

t = threading.Thread(target=worker)
t.start()
t.join()
print(piano_gpt_jax.HOST_MEMORY_KEPT, seen["mmapped"])
"""


def _probe(env_value: str | None) -> tuple[str, int]:
    env = {k: v for k, v in os.environ.items() if k != "PIANO_GPT_JAX_MALLOC"}
    if env_value is not None:
        env["PIANO_GPT_JAX_MALLOC"] = env_value
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_large_thread_allocations_come_from_the_kept_heap():
    kept, mmapped = _probe(None)
    assert kept == "True"
    assert mmapped == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_opting_out_leaves_glibc_defaults():
    kept, mmapped = _probe("default")
    assert kept == "False"
    assert mmapped >= 1  # glibc's default: a block this large is mmap'd (and unmapped on free)
