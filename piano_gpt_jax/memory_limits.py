"""How much memory this process may still take: the figure the trainer's and the sampler's
up-front refusals compare their needs with, so a request that cannot fit ends in one line
instead of minutes of swapping, a kernel OOM kill or a RESOURCE_EXHAUSTED traceback.

On an accelerator it is the device's own limit (`memory_stats()["bytes_limit"]`). On CPU it is
the smallest of: the host's available memory (MemAvailable), what `ulimit -v` leaves above the
address space already mapped (JAX maps ~1.5 GB before its first step), and what the cgroup's
limit (memory.max, or v1's memory.limit_in_bytes) leaves above its current use. Physical memory
alone was not enough: under `ulimit -v 6000000` the sampler offered 526 M tokens of buffers that
the limit could never hold.
"""

from __future__ import annotations

import dataclasses
import os
import resource
from pathlib import Path
from typing import Any

_CGROUP_FILES = (  # (limit, usage): cgroup v2, then v1
    ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
    ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
)


@dataclasses.dataclass(frozen=True)
class Budget:
    """`bytes` this process can still allocate, and `what` limits it (for the refusal line)."""

    bytes: int
    what: str


def host_budget() -> Budget | None:
    """The host memory this process can still take (None when nothing could be read)."""
    found = [b for b in (_available(), _address_space_left(), _cgroup_left()) if b is not None]
    return min(found, key=lambda b: b.bytes) if found else None


def device_budget(device: Any) -> Budget | None:
    """One device's memory: an accelerator's own limit, else the host's budget."""
    if getattr(device, "platform", "cpu") != "cpu":
        try:
            limit = (device.memory_stats() or {}).get("bytes_limit")
        except Exception:  # noqa: BLE001 — backends without memory_stats
            limit = None
        if limit:
            return Budget(int(limit), f"{device.device_kind}'s memory")
    return host_budget()


def _available() -> Budget | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return Budget(int(line.split()[1]) * 1024, "the host's available memory")
    except (OSError, ValueError, IndexError):
        pass
    try:
        return Budget(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
                      "the host's memory")
    except (ValueError, OSError, AttributeError):
        return None


def _address_space_left() -> Budget | None:
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    used = 0
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmSize:"):
                used = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return Budget(max(soft - used, 0), f"the process's address-space limit (ulimit -v "
                                       f"{soft // 1024})")


def _cgroup_left() -> Budget | None:
    for limit_file, usage_file in _CGROUP_FILES:
        try:
            text = Path(limit_file).read_text().strip()
            if text == "max":
                return None
            limit = int(text)
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit >= 2**60:  # v1's "no limit"
            return None
        return Budget(max(limit - usage, 0), f"the container's memory limit ({limit_file})")
    return None


def gib(n: float) -> str:
    """Bytes for a refusal line: GiB, or TiB/PiB for the absurd requests it refuses."""
    for unit, scale in (("PiB", 2**50), ("TiB", 2**40)):
        if n >= 10 * scale:
            return f"{n / scale:,.0f} {unit}"
    return f"{n / 2**30:.1f} GiB"
