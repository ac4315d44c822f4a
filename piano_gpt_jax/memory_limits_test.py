"""The memory budget honours the process's own limits, and the sampler's refusal uses it."""

from __future__ import annotations

import resource
import subprocess
import sys

import pytest

from piano_gpt_jax import memory_limits, sampling


def test_the_budget_is_the_smallest_of_the_host_and_the_process_limits(monkeypatch):
    free = memory_limits.host_budget()
    assert free is not None and free.bytes > 0
    limit = 3 * 2**30
    monkeypatch.setattr(resource, "getrlimit", lambda what: (limit, resource.RLIM_INFINITY))
    capped = memory_limits.host_budget()
    assert capped.what.startswith("the process's address-space limit (ulimit -v")
    assert capped.bytes < limit  # what is already mapped is not available again


def test_the_samplers_refusal_offers_what_the_address_space_limit_allows():
    # A real `ulimit -v` (6 GB) in a child process: before, the offer was half of physical
    # memory (526,587,072 tokens on a 24 GB host) and asking for it ran out of memory.
    limit = 6_000_000 * 1024
    code = ("from piano_gpt_jax import sampling\n"
            "try:\n    sampling.check_buffer_memory(1, 500_000_064, 500_000_000)\n"
            "except ValueError as e:\n    print(e)\n")
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit))).stdout
    assert "ulimit -v 6000000" in out, out
    offered = int(out.split("ask for at most ")[1].split(" new tokens")[0].replace(",", ""))
    assert 0 < offered * sampling._BYTES_PER_POSITION < limit / 2


def test_an_accelerators_own_limit_wins():
    class Device:
        platform, device_kind = "gpu", "NVIDIA H200"

        def memory_stats(self):
            return {"bytes_limit": 100 * 2**30}

    assert memory_limits.device_budget(Device()) == memory_limits.Budget(
        100 * 2**30, "NVIDIA H200's memory")


@pytest.mark.parametrize("limit_text", ["max", str(2**63 - 4096)])
def test_an_unlimited_cgroup_is_no_limit(tmp_path, monkeypatch, limit_text):
    (tmp_path / "memory.max").write_text(limit_text + "\n")
    (tmp_path / "memory.current").write_text("1000\n")
    monkeypatch.setattr(memory_limits, "_CGROUP_FILES", (
        (str(tmp_path / "memory.max"), str(tmp_path / "memory.current")),))
    assert memory_limits._cgroup_left() is None
    (tmp_path / "memory.max").write_text(f"{2**30}\n")
    assert memory_limits._cgroup_left().bytes == 2**30 - 1000
