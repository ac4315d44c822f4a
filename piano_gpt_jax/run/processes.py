"""The processes of a job: the JAX platform, multi-process start-up and agreement.

Every process of a multi-host job runs the same command; these helpers make them join one
`jax.distributed` job, check they run one config, and agree on stopping (a checkpoint save is
collective, so one process must never stop alone).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from piano_gpt_jax.config import TrainConfig
from piano_gpt_jax.run.errors import UsageError


def select_platform(cfg: TrainConfig) -> None:
    """Pin JAX to system.device; must run before any backend starts."""
    jax.config.update("jax_platforms", cfg.platform)


def check_devices(cfg: TrainConfig) -> None:
    try:
        jax.devices()
    except Exception as e:  # noqa: BLE001 — RuntimeError, or an AssertionError from jax
        reason = (str(e).strip().splitlines()[0] if str(e).strip()
                  else f"no {cfg.platform} backend is available")
        raise UsageError(
            f"system.device asks for {cfg.platform!r} but JAX cannot use it here ({reason}). "
            "On a CPU-only machine add --config.system.device=cpu (or use the :tiny preset)."
        ) from None


def _in_a_cluster(env: os._Environ | dict) -> bool:
    return ("JAX_COORDINATOR_ADDRESS" in env
            or int(env.get("SLURM_NTASKS", "1")) > 1
            or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
            or "TPU_WORKER_HOSTNAMES" in env and "," in env["TPU_WORKER_HOSTNAMES"])


def maybe_init_distributed(cfg: TrainConfig) -> None:
    """jax.distributed.initialize() for multi-process launches (see configs/piano.py docstring)."""
    if cfg.ddp_backend == "none":
        return
    env = os.environ
    if not (cfg.ddp_backend == "jax_distributed" or _in_a_cluster(env)):
        return
    kwargs: dict[str, Any] = {"initialization_timeout": cfg.ddp.timeout_s}
    where = "the cluster's coordinator"
    if "JAX_COORDINATOR_ADDRESS" in env:
        try:
            kwargs.update(coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
                          num_processes=int(env["JAX_NUM_PROCESSES"]),
                          process_id=int(env["JAX_PROCESS_ID"]))
        except (KeyError, ValueError) as e:
            raise UsageError(f"JAX_COORDINATOR_ADDRESS is set, so JAX_NUM_PROCESSES and "
                             f"JAX_PROCESS_ID must be integers too ({e})") from None
        where = (f"the coordinator at {kwargs['coordinator_address']} (process "
                 f"{kwargs['process_id']} of {kwargs['num_processes']})")
    if cfg.platform == "cpu":  # cross-process collectives on CPU need an implementation
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if kwargs.get("process_id"):
        # JAX aborts the whole process (no exception) when the coordinator never answers, so a
        # non-coordinator process first waits for the coordinator's port itself.
        _wait_for_coordinator(kwargs["coordinator_address"], cfg.ddp.timeout_s, where)
    try:
        jax.distributed.initialize(**kwargs)
    except Exception as e:  # noqa: BLE001 — timeouts and connection errors of many kinds
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise UsageError(
            f"could not join {where} within ddp.timeout_s={cfg.ddp.timeout_s} s ({reason}); "
            "start every process of the job with the same address, or check that the "
            "coordinator (process 0) is running and reachable.") from None


def _wait_for_coordinator(address: str, timeout_s: int, where: str) -> None:
    host, _, port = address.rpartition(":")
    deadline = time.time() + timeout_s
    while True:
        try:
            with socket.create_connection((host or "127.0.0.1", int(port)), timeout=2):
                return
        except (OSError, ValueError) as e:
            if time.time() >= deadline:
                raise UsageError(
                    f"could not join {where} within ddp.timeout_s={timeout_s} s ({e}); start "
                    "process 0 (the coordinator) with the same JAX_COORDINATOR_ADDRESS, or "
                    "check the address and port.") from None
            time.sleep(0.5)


def check_same_config(cfg: TrainConfig) -> None:
    """Every process of a job must run the same config: compare a hash of it at start."""
    if jax.process_count() == 1:
        return
    digest = hashlib.sha256(json.dumps(cfg.raw, sort_keys=True, default=str).encode()).digest()
    mine = np.frombuffer(digest, np.uint8)
    every = np.asarray(multihost_utils.process_allgather(mine))
    differ = [i for i, row in enumerate(every) if not np.array_equal(row, every[0])]
    if differ:
        raise UsageError(f"process(es) {differ} run a different config than process 0 (config "
                         "hashes differ); launch every process with the same command line.")


def stop_agreed(requested: bool, step: int, cfg: TrainConfig) -> bool:
    """Whether to stop after this update. Several processes must agree (a checkpoint save is
    collective), so they compare their requests at log intervals, where they sync anyway."""
    if jax.process_count() == 1:
        return requested
    if step % cfg.logging.log_interval and step != cfg.optimizer.max_iters:
        return False
    every = multihost_utils.process_allgather(np.asarray([requested], np.int32))
    return bool(np.asarray(every).any())
