"""Checkpoint files: atomic, checksummed, with the run's identity readable without loading the state.

Layout: a fixed-size JSON header (format, SHA-256 and length of the payload, algorithm, flags, global step), then
the payload written by `torch.save`. A checkpoint is written to a temporary file in the same directory, flushed to
disk and renamed over the previous one, so a crash, SIGKILL or full disk while saving leaves the last complete
checkpoint in place; temporary files of processes that died are removed at the next save. Loading checks the
checksum, so a truncated or corrupted file is refused with one line instead of loading silently.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from agents.infra.cli import UsageError

CHECKPOINT_NAME = "checkpoint.pt"
MAGIC = "sobirl-checkpoint"
FORMAT_VERSION = 2
HEADER_BYTES = 65536


class _HashingWriter(io.RawIOBase):
    """A write-only file that hashes and counts what passes through it."""

    def __init__(self, f):
        self.f, self.sha, self.size = f, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self.sha.update(view)
        self.size += len(view)
        return self.f.write(view)


class _PayloadReader(io.RawIOBase):
    """The part of a file from `offset` on, as a file of its own (torch.load seeks relative to the start)."""

    def __init__(self, f, offset: int):
        self.f, self.offset = f, offset
        self.f.seek(offset)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        return self.f.readinto(buffer)

    def seek(self, position: int, whence: int = 0) -> int:
        if whence == 0:
            position += self.offset
        return self.f.seek(position, whence) - self.offset

    def tell(self) -> int:
        return self.f.tell() - self.offset


def _remove_stale_temporaries(directory: Path, name: str) -> None:
    for tmp in directory.glob(f".{name}.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not process_alive(int(pid)):
            tmp.unlink(missing_ok=True)


def process_alive(pid: int) -> bool:
    """Whether a process with this id exists (one of another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def save_atomic(state: dict[str, Any], path: str | Path) -> None:
    """Write `state` (a dict; its "algo", "args" and "global_step" are copied into the header) to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path.parent, path.name)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(b"\0" * HEADER_BYTES)
            writer = _HashingWriter(f)
            torch.save(state, writer)
            header = {
                "magic": MAGIC,
                "format_version": FORMAT_VERSION,
                "sha256": writer.sha.hexdigest(),
                "payload_bytes": writer.size,
                "algo": state.get("algo"),
                "args": state.get("args"),
                "global_step": state.get("global_step"),
            }
            encoded = json.dumps(header, default=str).encode() + b"\n"
            if len(encoded) > HEADER_BYTES:
                raise ValueError(f"checkpoint header of {len(encoded)} bytes exceeds {HEADER_BYTES}")
            f.seek(0)
            f.write(encoded)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_directory(path.parent)  # the rename itself survives a power cut only once its directory is on disk
    finally:
        tmp.unlink(missing_ok=True)


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot sync a directory; the rename is still atomic
    finally:
        os.close(fd)


def resolve_checkpoint(path: str | Path, flag: str = "--resume") -> Path:
    """A checkpoint file, or a run directory holding one."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise UsageError(f"{flag} {path}: no checkpoint file there")
    return path


def _read_header(f, path: Path, flag: str = "--resume") -> dict[str, Any]:
    raw = f.read(HEADER_BYTES)
    try:
        header = json.loads(raw.split(b"\n", 1)[0].decode())
    except (UnicodeDecodeError, json.JSONDecodeError):
        header = None
    if not isinstance(header, dict) or header.get("magic") != MAGIC:
        raise UsageError(f"{flag} {path}: not a sobirl checkpoint")
    if header.get("format_version") != FORMAT_VERSION:
        raise UsageError(f"{flag} {path}: checkpoint format {header.get('format_version')}, expected {FORMAT_VERSION}")
    return header


def load_checkpoint_metadata(path: str | Path, flag: str = "--resume") -> dict[str, Any]:
    """The header only (algo, args, global step): cheap, whatever the size of the checkpoint."""
    path = resolve_checkpoint(path, flag)
    with open(path, "rb") as f:
        return _read_header(f, path, flag)


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu", flag: str = "--resume") -> dict[str, Any]:
    """Load a checkpoint written by `save_atomic`; a truncated, corrupted or foreign file is a UsageError naming it."""
    path = resolve_checkpoint(path, flag)
    with open(path, "rb") as f:
        header = _read_header(f, path, flag)
        size = os.fstat(f.fileno()).st_size - HEADER_BYTES
        if size != header["payload_bytes"]:
            raise UsageError(f"{flag} {path}: truncated checkpoint ({size} of {header['payload_bytes']} bytes)")
        sha = hashlib.sha256()
        while chunk := f.read(1 << 24):
            sha.update(chunk)
        if sha.hexdigest() != header["sha256"]:
            raise UsageError(f"{flag} {path}: corrupted checkpoint (checksum mismatch)")
        try:
            # weights_only=False: the file holds numpy RNG states and the run's flags; only load files you wrote.
            state = torch.load(_PayloadReader(f, HEADER_BYTES), map_location=device, weights_only=False)
        except Exception as err:  # noqa: BLE001 - torch raises many types for a damaged archive
            raise UsageError(f"{flag} {path}: not a readable checkpoint ({type(err).__name__}: {err})") from None
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


class GeneratorStates:
    """Named torch generators as one checkpointed part (state_dict / load_state_dict)."""

    def __init__(self, **generators: torch.Generator):
        self.generators = generators

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: generator.get_state() for name, generator in self.generators.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name, generator in self.generators.items():
            generator.set_state(state[name].cpu())


def restore_rng_state(state: dict[str, Any], numpy_rng: np.random.Generator, torch_generator: torch.Generator) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy_global"])
    numpy_rng.bit_generator.state = state["numpy"]
    torch.set_rng_state(state["torch"].cpu())
    torch_generator.set_state(state["torch_generator"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
