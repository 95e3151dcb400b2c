"""Checkpoint files: atomic, checksummed, with the run's identity readable without loading the state.

Layout: a fixed-size JSON header (format, SHA-256 and length of the payload, algorithm, flags, global step), then
the payload written by `torch.save`. A checkpoint is written to a temporary file in the same directory, flushed to
disk and renamed over the previous one, so a crash, SIGKILL or full disk while saving leaves the last complete
checkpoint in place; temporary files of processes that died are removed at the next save. Loading checks the
checksum, so a truncated or corrupted file is refused with one line instead of loading silently.

Large row-wise state (the replay, up to 7 GB, and the stored pairs, about 1.2 GB) is not in the main file: a state
dict holds it as `ChunkedRows`, which `save_atomic` writes as chunk files beside the checkpoint,
`checkpoint.chunks/<key path>/chunk-<index>-<sha>.pt`, each named by its SHA-256, and the main file records every
chunk's name, size and SHA-256. A chunk a previous checkpoint already wrote (its rows unchanged since) is referenced
again instead of rewritten. Order on save: new
chunks are written under temporary names, fsynced and renamed to their (new, content-addressed) names; the main file
is then replaced atomically; only once that is on disk are the chunks it no longer references deleted. A kill at any
point leaves the previous main file and every chunk it references in place. Loading verifies a chunk only when its
rows are read (a resumed run reads them all; --frozen-reward and `sobirl/demos.py record` read none).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from agents.infra.checkpoint_header import (  # noqa: F401 - CHECKPOINT_NAME and the readers, re-exported
    CHECKPOINT_NAME,
    FORMAT_VERSION,
    HEADER_BYTES,
    MAGIC,
    load_checkpoint_metadata,
    process_alive,
    read_header,
    resolve_checkpoint,
)
from agents.infra.cli import UsageError

CHUNKS_SUFFIX = ".chunks"  # checkpoint.pt keeps its chunks in checkpoint.chunks/
_MANIFEST = "__sobirl_chunked_rows__"


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


class ChunkedRows:
    """Tensors of equal length along dim 0 (rows) that a checkpoint keeps in chunk files of `chunk_rows` rows each.

    A state dict builds one from its live tensors, with `reuse` (chunk index -> the entry a previous checkpoint wrote
    for the same rows, still unchanged) and `on_saved(entries)`, called once a checkpoint holding these rows is
    durable. `load_checkpoint` builds one from a saved manifest: `chunk(i)` then reads and verifies chunk i's file.
    """

    def __init__(
        self,
        tensors: dict[str, torch.Tensor] | None,
        rows: int,
        chunk_rows: int,
        reuse: dict[int, dict[str, Any]] | None = None,
        on_saved: Callable[[list[dict[str, Any]]], None] | None = None,
    ):
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be at least 1, got {chunk_rows}")
        self.tensors, self.rows, self.chunk_rows = tensors, rows, chunk_rows
        self.reuse, self.on_saved = reuse or {}, on_saved
        self.entries: list[dict[str, Any]] | None = None  # the chunk files, once saved or loaded
        self.directory: Path | None = None  # where the entries' file names are relative to
        self.flag = "--resume"

    def __len__(self) -> int:
        return -(-self.rows // self.chunk_rows)

    def bounds(self, index: int) -> tuple[int, int]:
        return index * self.chunk_rows, min((index + 1) * self.chunk_rows, self.rows)

    def chunk(self, index: int) -> dict[str, torch.Tensor]:
        """Rows bounds(index) of every tensor: views of the live tensors, or read from the chunk file (verified)."""
        if self.tensors is not None:
            start, stop = self.bounds(index)
            return {name: tensor[start:stop] for name, tensor in self.tensors.items()}
        assert self.entries is not None and self.directory is not None
        return _read_chunk(self.directory, self.entries[index], self.flag)


def ring_chunks(first: int, count: int, slots: int, chunk_rows: int) -> set[int]:
    """The chunks (of `chunk_rows` rows) holding rows first, first + 1, ..., first + count - 1 of a ring of `slots`
    rows (mod slots; count < slots): the chunks a ring buffer's writes since its last checkpoint changed."""
    if count <= 0:
        return set()
    first %= slots
    spans = [(first, min(first + count, slots))]
    if first + count > slots:
        spans.append((0, first + count - slots))
    return {index for start, stop in spans for index in range(start // chunk_rows, (stop - 1) // chunk_rows + 1)}


def chunk_directory(path: Path) -> Path:
    return path.with_name(path.stem + CHUNKS_SUFFIX)


def _replace_all(obj: Any, key_path: tuple[str, ...], replace: Callable[[Any, tuple[str, ...]], Any]) -> Any:
    """`obj` with every value for which `replace` returns something else replaced, containers copied only where a
    value inside them changed."""
    new = replace(obj, key_path)
    if new is not obj:
        return new
    if isinstance(obj, dict):
        out = None
        for key, value in obj.items():
            replaced = _replace_all(value, (*key_path, str(key)), replace)
            if replaced is not value:
                out = dict(obj) if out is None else out
                out[key] = replaced
        return obj if out is None else out
    if type(obj) in (list, tuple):
        items = [_replace_all(value, (*key_path, str(i)), replace) for i, value in enumerate(obj)]
        return obj if all(a is b for a, b in zip(items, obj, strict=True)) else type(obj)(items)
    return obj


def _namespace(key_path: tuple[str, ...]) -> str:
    """The chunk folder of a ChunkedRows at this key path: 'sac.replay.rows', 'parts.sac_b.replay.rows', ..."""
    parts = key_path[1:] if key_path[:1] == ("algorithm",) else key_path
    name = ".".join(parts) or "rows"
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)


def _write_chunk(path: Path, namespace: str, index: int, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """One chunk file, written to a temporary name, fsynced and renamed to a name holding its SHA-256: a file of
    that name already there has these very bytes, so no file a checkpoint references is ever changed."""
    folder = chunk_directory(path) / namespace
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".chunk-{index:06d}.tmp-{os.getpid()}"
    # Fresh storage holding the chunk's rows alone (torch.save writes a view's whole storage).
    rows = {name: t.clone() if t.device.type == "cpu" else t.cpu() for name, t in tensors.items()}
    try:
        with open(tmp, "wb") as f:
            writer = _HashingWriter(f)
            torch.save(rows, writer)
            f.flush()
            os.fsync(f.fileno())
        sha = writer.sha.hexdigest()
        final = folder / f"chunk-{index:06d}-{sha[:16]}.pt"
        if not (final.is_file() and final.stat().st_size == writer.size):
            os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    return {"file": final.relative_to(path.parent).as_posix(), "sha256": sha, "bytes": writer.size}


def _save_chunks(state: dict[str, Any], path: Path) -> tuple[dict[str, Any], list[tuple[ChunkedRows, list]]]:
    """Write the chunks of every ChunkedRows in `state` that no earlier checkpoint holds; return the state with
    manifests in their place, and each ChunkedRows with its entries (for `on_saved`)."""
    saved: list[tuple[ChunkedRows, list]] = []
    written_folders: set[Path] = set()

    def replace(value: Any, key_path: tuple[str, ...]) -> Any:
        if not isinstance(value, ChunkedRows):
            return value
        reuse = value.reuse
        if value.tensors is None:  # a loaded state saved again: its chunks are reused where they are, else copied
            assert value.entries is not None and value.directory is not None
            same_place = value.directory.resolve() == path.parent.resolve()
            reuse = dict(enumerate(value.entries)) if same_place else {}
        namespace = _namespace(key_path)
        entries = []
        for index in range(len(value)):
            start, stop = value.bounds(index)
            old = reuse.get(index)
            if old is not None and (old.get("start"), old.get("stop")) == (start, stop):
                if (path.parent / old["file"]).is_file():
                    entries.append(old)
                    continue
            entry = _write_chunk(path, namespace, index, value.chunk(index))
            entries.append({**entry, "start": start, "stop": stop})
            written_folders.add(chunk_directory(path) / namespace)
        saved.append((value, entries))
        return {_MANIFEST: 1, "rows": value.rows, "chunk_rows": value.chunk_rows, "chunks": entries}

    state = _replace_all(state, (), replace)
    for folder in written_folders:  # the new names survive a power cut before the main file that references them
        _fsync_directory(folder)
    if written_folders:
        _fsync_directory(chunk_directory(path))
        _fsync_directory(path.parent)
    return state, saved


def _collect_chunk_garbage(path: Path, referenced: set[str]) -> None:
    """Delete the chunk files the (durable) main file at `path` does not reference, and temporaries of dead
    processes."""
    root = chunk_directory(path)
    if not root.is_dir():
        return
    for file in root.rglob("*"):
        if not file.is_file():
            continue
        name = file.name
        if name.startswith(".chunk-") and ".tmp-" in name:
            pid = name.rsplit("-", 1)[-1]
            if pid.isdigit() and int(pid) != os.getpid() and not process_alive(int(pid)):
                file.unlink(missing_ok=True)
        elif name.startswith("chunk-") and file.relative_to(path.parent).as_posix() not in referenced:
            file.unlink(missing_ok=True)
    for folder in sorted((p for p in root.rglob("*") if p.is_dir()), reverse=True):
        try:
            folder.rmdir()  # only empty ones
        except OSError:
            pass
    try:
        root.rmdir()
    except OSError:
        pass


def save_atomic(state: dict[str, Any], path: str | Path) -> None:
    """Write `state` (a dict; its "algo", "args" and "global_step" are copied into the header) to `path`, and its
    ChunkedRows to chunk files beside it (only the chunks no earlier checkpoint there holds)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path.parent, path.name)
    state, chunked = _save_chunks(state, path)
    _write_main(state, path)
    for rows, entries in chunked:
        if rows.on_saved is not None:
            rows.on_saved(entries)
    # The new main file is durable: the chunks only the previous one referenced can go.
    try:
        _collect_chunk_garbage(path, {entry["file"] for _, entries in chunked for entry in entries})
    except OSError:
        pass  # left for the next save's collection


def _write_main(state: dict[str, Any], path: Path) -> None:
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


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu", flag: str = "--resume") -> dict[str, Any]:
    """Load a checkpoint written by `save_atomic`; a truncated, corrupted or foreign file is a UsageError naming it."""
    path = resolve_checkpoint(path, flag)
    with open(path, "rb") as f:
        header = read_header(f, path, flag)
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
    return _replace_all(state, (), lambda value, _: _chunked_from_manifest(value, path.parent, flag))


def _chunked_from_manifest(value: Any, directory: Path, flag: str) -> Any:
    if not (isinstance(value, dict) and _MANIFEST in value):
        return value
    rows = ChunkedRows(None, int(value["rows"]), int(value["chunk_rows"]))
    rows.entries, rows.directory, rows.flag = list(value["chunks"]), directory, flag
    return rows


def _read_chunk(directory: Path, entry: dict[str, Any], flag: str) -> dict[str, torch.Tensor]:
    """A chunk file's tensors; a missing, truncated or corrupted one is a UsageError naming it."""
    file = directory / entry["file"]
    try:
        data = file.read_bytes()
    except FileNotFoundError:
        raise UsageError(f"{flag} {file}: checkpoint chunk missing (the checkpoint beside it needs it)") from None
    except OSError as err:
        raise UsageError(f"{flag} {file}: checkpoint chunk unreadable ({err.strerror or err})") from None
    if len(data) != entry["bytes"]:
        raise UsageError(f"{flag} {file}: truncated checkpoint chunk ({len(data)} of {entry['bytes']} bytes)")
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise UsageError(f"{flag} {file}: corrupted checkpoint chunk (checksum mismatch)")
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many types for a damaged archive
        raise UsageError(f"{flag} {file}: not a readable checkpoint chunk ({type(err).__name__})") from None


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
