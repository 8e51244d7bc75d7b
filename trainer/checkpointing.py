"""Complete, atomic run checkpoints: everything ``--resume`` needs to continue at the same step.

``checkpoint.pt`` holds the model (plain state dict, no ``module.`` prefix), both optimisers,
the scheduler, the step and epoch, the normalisation statistics, the camera index map and
the resolved config; each rank's RNG states go to ``rng-rank<R>.pt``. ``config.json`` is
written beside it. Files are written to a temporary name, fsynced and renamed.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINT = "checkpoint.pt"
BEST = "best_model.pt"
CONFIG = "config.json"


def state_digest(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 over a state dict's tensors in key order: shows two states are the same."""
    import hashlib

    digest = hashlib.sha256()
    for name in sorted(state_dict):
        digest.update(name.encode())
        digest.update(state_dict[name].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _save_atomic(obj: Any, path: Path) -> None:
    temp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(temp, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        # A full disk must not keep a checkpoint-sized temp file (restarted ranks have other pids).
        temp.unlink(missing_ok=True)
        raise


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_rank_rng(folder: Path, rank: int) -> None:
    _save_atomic(rng_state(), folder / f"rng-rank{rank}.pt")


def load_rank_rng(folder: Path, rank: int) -> bool:
    path = folder / f"rng-rank{rank}.pt"
    if not path.is_file():
        return False
    set_rng_state(torch.load(path, weights_only=False))
    return True


def save_checkpoint(folder: Path, state: dict[str, Any], config_json: str, best: bool = False) -> None:
    """Write ``checkpoint.pt`` (and ``best_model.pt`` when ``best``) and ``config.json``."""
    folder.mkdir(parents=True, exist_ok=True)
    _save_atomic(state, folder / CHECKPOINT)
    if best:
        _save_atomic(state, folder / BEST)
    temp = folder / f".{CONFIG}.tmp-{os.getpid()}"
    temp.write_text(config_json + "\n")
    os.replace(temp, folder / CONFIG)


def load_checkpoint(path: Path, device: torch.device) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no checkpoint to resume from; drop --resume to start afresh")
    return torch.load(path, map_location=device, weights_only=False)
