"""TensorBoard event files -> scalars: every scalar of a run, merged over the event files its attempts wrote; and
the progress of a run still being written (its latest step and speed).

Shared by the harness (summaries, progress of running jobs) and the figure script (sobirl/plot.py), so that neither
imports the other.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
from tensorboard.backend.event_processing import event_accumulator as ea
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.util import tensor_util


def event_files(run_dir: Path) -> list[Path]:
    return sorted(p for p in run_dir.iterdir() if p.is_file() and "tfevents" in p.name)


def read_event_file(path: Path) -> dict[str, list[tuple[float, int, float]]]:
    """All scalars of one event file as tag -> [(wall_time, step, value)], in the order written."""
    # size_guidance 0 keeps every scalar (the default reservoir samples 10k); purging is done by load_run, which
    # sees all the files of a run at once.
    acc = ea.EventAccumulator(
        str(path),
        size_guidance={
            ea.SCALARS: 0,
            ea.TENSORS: 0,
            ea.HISTOGRAMS: 1,
            ea.IMAGES: 1,
            ea.AUDIO: 1,
            ea.COMPRESSED_HISTOGRAMS: 1,
        },
        purge_orphaned_data=False,
    )
    acc.Reload()
    tags = acc.Tags()
    out = {tag: [(e.wall_time, e.step, float(e.value)) for e in acc.Scalars(tag)] for tag in tags.get(ea.SCALARS, [])}
    # Writers other than torch's SummaryWriter (tf.summary v2, tensorboard's own) store scalars as 0-d tensors.
    if tags.get(ea.TENSORS):
        for tag in tags[ea.TENSORS]:
            rows = []
            for e in acc.Tensors(tag):
                array = tensor_util.make_ndarray(e.tensor_proto)
                if array.size == 1 and np.issubdtype(array.dtype, np.number):
                    rows.append((e.wall_time, e.step, float(array.reshape(()))))
            if rows:
                out.setdefault(tag, []).extend(rows)
    return out


def load_run(run_dir: str | os.PathLike) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every scalar of a run as tag -> (steps, values), sorted by step, merged over the run's event files.

    A resumed run appends a new event file whose steps restart at the checkpoint, below where the first process
    had got to before it stopped. Files are applied oldest first; each one replaces the earlier points of its
    tags from its own first step on (its start is taken over the tags it shares with earlier files), so the
    abandoned stretch is dropped and the later run wins. Several episodes ending at the same step of a vector
    env are all kept, which plain dedupe-by-step would not do.
    """
    run_dir = Path(run_dir)
    files = [read_event_file(p) for p in event_files(run_dir)]
    files = [f for f in files if f]

    def first_wall_time(content: dict[str, list[tuple[float, int, float]]]) -> float:
        return min(rows[0][0] for rows in content.values() if rows)

    files.sort(key=first_wall_time)
    merged: dict[str, list[tuple[int, float]]] = {}
    for content in files:
        shared = [tag for tag in content if tag in merged and content[tag]]
        if shared:
            cut = min(min(step for _, step, _ in content[tag]) for tag in shared)
            for tag in content:
                if tag in merged:
                    merged[tag] = [(s, v) for s, v in merged[tag] if s < cut]
        for tag, rows in content.items():
            merged.setdefault(tag, []).extend((step, value) for _, step, value in rows)
    out = {}
    for tag, rows in merged.items():
        if not rows:
            continue
        steps = np.array([s for s, _ in rows], dtype=np.int64)
        values = np.array([v for _, v in rows], dtype=np.float64)
        order = np.argsort(steps, kind="stable")
        out[tag] = (steps[order], values[order])
    return out


@dataclasses.dataclass(frozen=True)
class Progress:
    step: int  # the latest env step the run logged a scalar at
    wall_time: float  # when it logged it (seconds since the epoch)
    speed: float | None  # env steps per second since learning started, reward phases included; None: not yet known


class ProgressReader:
    """Follows the newest event file of a run folder (the current attempt's), reading only what was appended since
    the last call. The speed is measured from the first step past `learning_starts` to the latest, so it includes the
    reward phases, as an ETA must; it is None before that step (random actions, far faster than the rest of a run)
    and for the first MIN_SPAN steps after it (the reward model's warm-up would make it far too slow)."""

    MIN_SPAN = 1000

    def __init__(self, run_dir: Path, learning_starts: int = 0):
        self.run_dir, self.learning_starts = Path(run_dir), learning_starts
        self.path: Path | None = None
        self.loader: EventFileLoader | None = None
        self.start: tuple[float, int] | None = None  # (wall time, step) of the file's first scalar past learning_starts
        self.last: tuple[float, int] | None = None

    def read(self) -> Progress | None:
        """The run's progress so far; None before its first scalar."""
        try:
            files = event_files(self.run_dir)
            newest = max(files, key=lambda path: path.stat().st_mtime) if files else None
        except OSError:  # no run folder yet, or a file went between listing and stat
            newest = None
        if newest is None:
            return None
        if newest != self.path:  # a new attempt (a resume) writes a file of its own
            self.path, self.loader = newest, EventFileLoader(str(newest))
            self.start = self.last = None
        for event in self.loader.Load():
            if not event.summary.value:
                continue
            point = (event.wall_time, int(event.step))
            if self.start is None and point[1] > self.learning_starts:
                self.start = point
            if self.last is None or point[1] >= self.last[1]:
                self.last = point
        if self.last is None:
            return None
        speed = None
        if self.start is not None:
            seconds, steps = self.last[0] - self.start[0], self.last[1] - self.start[1]
            speed = steps / seconds if seconds >= 1 and steps >= self.MIN_SPAN else None
        return Progress(self.last[1], self.last[0], speed)
