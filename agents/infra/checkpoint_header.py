"""The part of a checkpoint that needs no torch: its file name, its JSON header (algo, flags, global step, format)
and whether the process holding a lock or a temporary file is alive. The benchmark harness lists and reports run
folders with these alone, so `benchmark.py list` starts without importing torch; `agents/infra/checkpoint.py` writes
and loads the payload."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from agents.infra.cli import UsageError

CHECKPOINT_NAME = "checkpoint.pt"
MAGIC = "sobirl-checkpoint"
FORMAT_VERSION = 3  # 3: the replay (and, since 2026-12-07, the pairs) in chunk files (ChunkedRows); 2: inline
READABLE_VERSIONS = (2, FORMAT_VERSION)  # a version-2 checkpoint still loads: its replay arrives in the payload
HEADER_BYTES = 65536


def process_alive(pid: int) -> bool:
    """Whether a process with this id exists (one of another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def resolve_checkpoint(path: str | Path, flag: str = "--resume") -> Path:
    """A checkpoint file, or a run directory holding one."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise UsageError(f"{flag} {path}: no checkpoint file there")
    return path


def read_header(f, path: Path, flag: str = "--resume") -> dict[str, Any]:
    """The header at the start of an open checkpoint file; a foreign file or an unreadable format is a UsageError."""
    raw = f.read(HEADER_BYTES)
    try:
        header = json.loads(raw.split(b"\n", 1)[0].decode())
    except (UnicodeDecodeError, json.JSONDecodeError):
        header = None
    if not isinstance(header, dict) or header.get("magic") != MAGIC:
        raise UsageError(f"{flag} {path}: not a sobirl checkpoint")
    if header.get("format_version") not in READABLE_VERSIONS:
        raise UsageError(f"{flag} {path}: checkpoint format {header.get('format_version')}, expected {FORMAT_VERSION}")
    return header


def load_checkpoint_metadata(path: str | Path, flag: str = "--resume") -> dict[str, Any]:
    """The header only (algo, args, global step): cheap, whatever the size of the checkpoint."""
    path = resolve_checkpoint(path, flag)
    with open(path, "rb") as f:
        return read_header(f, path, flag)
