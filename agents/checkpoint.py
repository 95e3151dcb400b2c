"""Atomic checkpoint files and the RNG states a resumed run needs.

A checkpoint is written to a temporary file in the same directory, flushed to disk, and renamed over the previous
one, so a crash (or SIGKILL) while saving leaves the last complete checkpoint in place.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from agents.common import UsageError

CHECKPOINT_NAME = "checkpoint.pt"
FORMAT_VERSION = 1


def save_atomic(state: dict[str, Any], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save({"format_version": FORMAT_VERSION, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or a run directory holding one."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise UsageError(f"--resume {path}: no checkpoint file there")
    return path


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by `save_atomic`; a truncated or foreign file is a UsageError naming it."""
    path = resolve_checkpoint(path)
    try:
        # weights_only=False: the file holds numpy RNG states and the run's arguments; only load files you wrote.
        state = torch.load(path, map_location=device, weights_only=False)
    except Exception as err:  # torch raises several types for a truncated zip archive
        raise UsageError(f"--resume {path}: not a readable checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise UsageError(f"--resume {path}: not a sobirl checkpoint (format version {FORMAT_VERSION} expected)")
    return state


def rng_state(numpy_rng: np.random.Generator, torch_generator: torch.Generator) -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy_global": np.random.get_state(),
        "numpy": numpy_rng.bit_generator.state,
        "torch": torch.get_rng_state(),
        "torch_generator": torch_generator.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any], numpy_rng: np.random.Generator, torch_generator: torch.Generator) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy_global"])
    numpy_rng.bit_generator.state = state["numpy"]
    torch.set_rng_state(state["torch"].cpu())
    torch_generator.set_state(state["torch_generator"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
