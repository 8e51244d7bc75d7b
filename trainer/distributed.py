"""Rank, world size and device from torchrun's environment, and the collective helpers.

One code path for CPU and GPU: NCCL when CUDA is present, gloo otherwise. Decisions that
change control flow (skip a batch, stop) go through :func:`agree_any` so every rank takes them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(
            f"environment variable {name}={value!r} is not an integer; torchrun sets it"
        ) from None


def init_distributed(device: str = "auto", timeout_s: float = 300.0) -> DistEnv:
    """Join the process group torchrun described (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*).

    Args:
        device: "auto" (CUDA when available), "cuda" or "cpu".
        timeout_s: collective timeout; kept well under NCCL's 10-minute default so that a rank
            stuck on a stalled stream fails the job quickly and torchrun restarts it.
    """
    if device not in ("auto", "cuda", "cpu"):
        raise ValueError(f"device {device!r}: expected 'auto', 'cuda' or 'cpu'")
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but torch sees no CUDA device; use --device cpu")
    rank, world_size = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    if use_cuda:
        torch.cuda.set_device(local_rank)
        target = torch.device("cuda", local_rank)
    else:
        target = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        store = _restart_store(world_size, timeout_s)
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            timeout=timedelta(seconds=timeout_s),
            device_id=target if use_cuda else None,
            **({"store": store, "rank": rank, "world_size": world_size} if store is not None else {}),
        )
    return DistEnv(rank, world_size, local_rank, target)


def _restart_store(world_size: int, timeout_s: float) -> dist.Store | None:
    """torchrun's agent store under a prefix per restart of the workers; None outside torchrun.

    torchrun (torch 2.13) gives every restart of the workers the same agent store and no
    per-attempt prefix, so restarted ranks read the addresses the killed ones published and fail
    ("Gloo connectFullMesh failed ... Connection refused"; NCCL reads a stale unique id):
    ``--max-restarts`` never worked. ``TORCHELASTIC_RESTART_COUNT`` is the same on every rank of
    a node; across nodes it can differ after a restart that torchelastic does not count (a
    membership change), which this does not cover.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    agent_store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        _env_int("MASTER_PORT", 0),
        world_size,
        is_master=False,
        timeout=timedelta(seconds=timeout_s),
    )
    return dist.PrefixStore(f"multiface/attempt-{_env_int('TORCHELASTIC_RESTART_COUNT', 0)}", agent_store)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_reduce_mean(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Mean of each named scalar over all ranks (a no-op on one process)."""
    if not values:
        return {}
    names = sorted(values)
    tensor = torch.tensor([float(values[name]) for name in names], dtype=torch.float64, device=device)
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor /= dist.get_world_size()
    return dict(zip(names, tensor.tolist(), strict=True))


def all_reduce_sum(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Sum of each named scalar over all ranks."""
    names = sorted(values)
    tensor = torch.tensor([float(values[name]) for name in names], dtype=torch.float64, device=device)
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return dict(zip(names, tensor.tolist(), strict=True))


def agree_any(flag: bool, device: torch.device) -> bool:
    """True on every rank if it is true on any rank: a collective decision."""
    tensor = torch.tensor([1.0 if flag else 0.0], device=device)
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item() > 0)


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def shutdown() -> None:
    if is_distributed():
        dist.destroy_process_group()
