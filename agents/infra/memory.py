"""How much memory storage may take, checked before it is allocated: the GPU's free memory, or on CPU the machine's
physical memory lowered by a cgroup (container, Slurm --mem) or address-space (ulimit -v) limit."""

from __future__ import annotations

import os
import resource
from pathlib import Path

import torch


def format_bytes(count: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB", "PB"):
        if abs(count) < 1000 or unit == "PB":
            return f"{count:.0f} {unit}" if unit == "bytes" else f"{count:.1f} {unit}"
        count /= 1000
    raise AssertionError("unreachable")


def _cgroup_memory_limits() -> list[int]:
    """The memory limits of this process's cgroups and their ancestors (v1 and v2), as Slurm and containers set."""
    limits = []
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return limits
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            roots, name = (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified")), "memory.max"
        elif "memory" in controllers.split(","):
            roots, name = (Path("/sys/fs/cgroup/memory"),), "memory.limit_in_bytes"
        else:
            continue
        for root in roots:
            folder = root / path.lstrip("/")
            for ancestor in (folder, *folder.parents):
                if not ancestor.is_relative_to(root):
                    break
                try:
                    text = (ancestor / name).read_text().strip()
                except OSError:
                    continue
                if text.isdigit():
                    limits.append(int(text))
    return limits


def memory_available(device: torch.device | str) -> tuple[int, str]:
    """(bytes, what they are) that storage on `device` may take: the GPU's free memory, or on CPU the machine's
    physical memory, lowered by a cgroup (container, Slurm --mem) or address-space (ulimit -v) limit."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free), f"{device} has free"
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limit = min([physical, *_cgroup_memory_limits()])
    address_space = resource.getrlimit(resource.RLIMIT_AS)[0]
    if address_space != resource.RLIM_INFINITY:
        limit = min(limit, address_space)
    return limit, "this machine has" if limit == physical else "this process may use"


def require_memory(flag: str, value: object, what: str, needed: float, device: torch.device | str) -> None:
    """Refuse storage that cannot fit, before allocating it: a ValueError naming the flag, the bytes needed and
    the bytes available (torch.empty would otherwise fail with a traceback, or, with memory overcommit, succeed and
    let the run die of memory hours later)."""
    available, where = memory_available(device)
    if needed > available:
        raise ValueError(
            f"{flag} {value}: {what} needs {format_bytes(needed)} but {where} {format_bytes(available)}; lower {flag}"
        )
