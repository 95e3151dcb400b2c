"""Fragment pairs: turning stored frames into observations, the query schedule, and the FIFO of labelled pairs.

A fragment is stored as `frames`, uint8 (H + stack - 1, *frame_shape): the observation at step h is
frames[h : h + stack] (frames[h] when stack == 1), so a 25-step Atari fragment costs 28 frames instead of 100.
Ground-truth rewards reach the reward learner only through the teachers' labels; the returns kept next to each
pair serve the accuracy metrics alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np
import torch

from agents.infra.checkpoint import ChunkedRows, ring_chunks

# Bradley-Terry logits R1 - R2 are clamped to +-LOGIT_CLAMP wherever a preference probability is computed (the
# reference clamps before the sigmoid, RLHF.py:480): log P >= -50, so the cross-entropy never saturates to inf.
LOGIT_CLAMP = 50.0


def stack_windows(frames: torch.Tensor, stack: int, frame_ndim: int = 2) -> torch.Tensor:
    """(..., H + stack - 1, *frame_shape) frames -> (..., H, stack, *frame_shape) observations, as a view.

    `frame_ndim` is len(frame_shape) (2 for image frames). With stack == 1 the frames already are the observations.
    """
    if stack == 1:
        return frames
    time_dim = frames.dim() - frame_ndim - 1
    windows = frames.unfold(time_dim, stack, 1)  # (..., H, *frame_shape, stack)
    return windows.movedim(-1, time_dim + 1)


def fragment_observations(frames: torch.Tensor, length: int) -> torch.Tensor:
    """(N, length + stack - 1, *frame_shape) fragments -> dense (N * length, *obs_shape) observations.

    The stack is implied by the shapes: a fragment of `length` steps keeps stack - 1 frames of history. Stacks of
    image frames come out channels-last (the stack is the innermost axis in memory): gathering them that way is
    what `unfold` gives for free, and it is the layout the CNNs run fastest in on CPU.
    """
    stack = frames.shape[1] - length + 1
    if stack < 1:
        raise ValueError(f"fragments of {frames.shape[1]} frames cannot hold {length} steps")
    count = frames.shape[0] * length
    if stack > 1 and frames.dim() == 4:
        windows = frames.unfold(1, stack, 1)  # (N, length, height, width, stack)
        return windows.reshape(count, *windows.shape[2:]).permute(0, 3, 1, 2)
    obs = stack_windows(frames, stack, frame_ndim=frames.dim() - 2)
    return obs.reshape(count, *obs.shape[2:])


def round_preserving_sum(x: np.ndarray) -> np.ndarray:
    """Integers that sum to round(sum(x)) and are each within 1 of x: floor everything, then add one to the entries
    with the largest fractional parts (this minimises every Lp distance to x; it is imitation's rounding)."""
    floors = np.floor(x)
    fractions = x - floors
    missing = int(round(fractions.sum()))
    order = np.argsort(-fractions, kind="stable")
    floors[order[:missing]] += 1
    return floors.astype(np.int64)


def pairs_schedule(initial_pairs: int, total_pairs: int, schedule_iterations: int) -> list[int]:
    """New pairs to query at each outer iteration: [initial_pairs, n_1, ..., n_{schedule_iterations}].

    The remaining total_pairs - initial_pairs are spread over the iterations proportionally to the "hyperbolic"
    schedule 1 / (1 + t), t = linspace(0, 1, schedule_iterations), then rounded to integers that keep the total.
    With the paper's 600 / 9000 / 2000 this gives [600, 6 x 212, 5, ...] and 2,967 pairs by iteration 431.
    """
    if schedule_iterations <= 0:
        return [initial_pairs]
    weights = 1.0 / (1.0 + np.linspace(0.0, 1.0, schedule_iterations))
    shares = weights / weights.sum() * (total_pairs - initial_pairs)
    return [initial_pairs] + round_preserving_sum(shares).tolist()


@dataclass
class PairBatch:
    """Labelled pairs of fragments (B of them, H steps each)."""

    frames1: torch.Tensor  # uint8 (B, H + stack - 1, *frame_shape)
    actions1: torch.Tensor  # int64 (B, H)
    frames2: torch.Tensor
    actions2: torch.Tensor
    labels: torch.Tensor  # float32 (B,), P(fragment 1 preferred) given by the teacher
    returns1: torch.Tensor  # float32 (B,), ground-truth fragment returns, for accuracy metrics only
    returns2: torch.Tensor
    # mu(a_t|s_t) of the policy that acted, float32 (B, H); NaN where unknown (pairs made outside a run)
    behaviour1: torch.Tensor | None = None
    behaviour2: torch.Tensor | None = None
    # int64 (B,), the global step at which the pair's older fragment began (-1: unknown)
    collected: torch.Tensor | None = None
    # float32 (B, H), the per-step ground-truth (clipped) rewards, for teachers that weigh steps (B-Pref's myopia);
    # None where not kept. Only queries carry them: the pair buffer does not store them (see FIELDS).
    rewards1: torch.Tensor | None = None
    rewards2: torch.Tensor | None = None

    def __post_init__(self):
        batch, length = self.actions1.shape
        unknown = torch.full((batch, length), float("nan"), device=self.labels.device)
        if self.behaviour1 is None:
            self.behaviour1 = unknown
        if self.behaviour2 is None:
            self.behaviour2 = unknown
        if self.collected is None:
            self.collected = torch.full((batch,), -1, dtype=torch.int64, device=self.labels.device)

    def __len__(self) -> int:
        return self.labels.shape[0]

    def select(self, index) -> PairBatch:
        """The pairs at `index` (a slice, mask or index tensor)."""
        return PairBatch(*(_apply(getattr(self, f.name), lambda t: t[index]) for f in fields(PairBatch)))

    def to(self, device: torch.device | str) -> PairBatch:
        return PairBatch(*(_apply(getattr(self, f.name), lambda t: t.to(device)) for f in fields(PairBatch)))


def _apply(value: torch.Tensor | None, function):
    return None if value is None else function(value)


class PairBuffer:
    """FIFO of labelled fragment pairs: once `capacity` pairs are stored, each new pair replaces the oldest."""

    CHUNK_BYTES = 64 << 20  # a checkpoint keeps the pairs in files of about this many bytes of rows each

    def __init__(
        self, capacity: int, fragment_length: int, frame_shape: tuple[int, ...], stack: int, device: torch.device | str
    ):
        if capacity < 1:
            raise ValueError(f"pair buffer capacity must be positive, got {capacity}")
        self.capacity = capacity
        self.fragment_length = fragment_length
        self.device = torch.device(device)
        frames_shape = (capacity, fragment_length + stack - 1, *frame_shape)
        # torch.empty does not touch the pages, so an unfilled buffer costs no memory.
        self.frames1 = torch.empty(frames_shape, dtype=torch.uint8, device=self.device)
        self.frames2 = torch.empty(frames_shape, dtype=torch.uint8, device=self.device)
        self.actions1 = torch.empty((capacity, fragment_length), dtype=torch.int64, device=self.device)
        self.actions2 = torch.empty_like(self.actions1)
        self.labels = torch.empty(capacity, dtype=torch.float32, device=self.device)
        self.returns1 = torch.empty_like(self.labels)
        self.returns2 = torch.empty_like(self.labels)
        self.behaviour1 = torch.empty((capacity, fragment_length), dtype=torch.float32, device=self.device)
        self.behaviour2 = torch.empty_like(self.behaviour1)
        self.collected = torch.empty(capacity, dtype=torch.int64, device=self.device)
        self.pos = 0  # next row to write
        self.size = 0
        self.total_added = 0
        self._saved_chunks: _SavedPairChunks | None = None  # the last checkpoint's chunk files of the rows

    def __len__(self) -> int:
        return self.size

    @staticmethod
    def bytes_needed(capacity: int, fragment_length: int, frame_shape: tuple[int, ...], stack: int) -> int:
        """What a full buffer's storage takes (it is allocated untouched: an empty one takes next to nothing)."""
        frames = 2 * (fragment_length + stack - 1) * math.prod(frame_shape)  # uint8, both fragments
        per_step = 2 * fragment_length * (8 + 4)  # actions (int64) and behaviour (float32), both fragments
        return capacity * (frames + per_step + 3 * 4 + 8)  # labels, returns1, returns2 (float32), collected (int64)

    def add(self, pairs: PairBatch) -> None:
        n = len(pairs)
        if n > self.capacity:  # only the newest `capacity` pairs would survive anyway
            pairs = pairs.select(slice(n - self.capacity, n))
            self.total_added += n - self.capacity
            n = self.capacity
        rows = (self.pos + torch.arange(n)) % self.capacity
        rows = rows.to(self.device)
        for name in FIELDS:
            getattr(self, name)[rows] = getattr(pairs, name).to(self.device, getattr(self, name).dtype)
        self.pos = (self.pos + n) % self.capacity
        self.size = min(self.size + n, self.capacity)
        self.total_added += n

    def get(self, index: torch.Tensor) -> PairBatch:
        index = index.to(self.device)
        return PairBatch(*(getattr(self, name)[index] for name in FIELDS))

    def oldest_first(self) -> torch.Tensor:
        """Row indices of the stored pairs from oldest to newest."""
        start = self.pos if self.size == self.capacity else 0
        return (start + torch.arange(self.size)) % self.capacity

    def state_dict(self) -> dict:
        """The stored rows only (the ring fills rows 0, 1, ... before it wraps), so a checkpoint's size follows the
        pairs collected, with the write head. They go into chunk files beside the checkpoint (`ChunkedRows`): a chunk
        no pair was written into since the last checkpoint saved (its `on_saved`) is referenced, not written again, so
        until the ring wraps a save writes the chunks of the new pairs only."""
        pos, size, added = self.pos, self.size, self.total_added
        saved = self._saved_chunks
        chunk_rows = saved.chunk_rows if saved is not None else self._chunk_rows()
        reuse = {} if saved is None else saved.unchanged(added, pos, self.capacity)

        def on_saved(entries: list[dict]) -> None:
            self._saved_chunks = _SavedPairChunks(added, pos, chunk_rows, entries)

        tensors = {name: getattr(self, name) for name in FIELDS}
        return {
            "total_added": added,
            "pos": pos,
            "size": size,
            "rows": ChunkedRows(tensors, size, chunk_rows, reuse, on_saved),
        }

    def _chunk_rows(self) -> int:
        row_bytes = sum(getattr(self, name)[:1].nbytes for name in FIELDS)
        return max(1, self.CHUNK_BYTES // row_bytes)

    def load_state_dict(self, state: dict) -> None:
        """A state from `state_dict`, or (checkpoints before the pairs moved to chunk files) one with the stored pairs
        inline, oldest first."""
        self.pos = self.size = 0
        self._saved_chunks = None
        rows = state.get("rows")
        if rows is None:
            if len(state["labels"]):
                self.add(PairBatch(*(state[name] for name in FIELDS)))
        else:
            size, pos = int(state["size"]), int(state["pos"])
            if size > self.capacity or pos >= self.capacity:
                raise ValueError(
                    f"the checkpoint's pair buffer holds {size} pairs with its head at {pos}; this run's holds "
                    f"{self.capacity} (--pair-buffer)"
                )
            for index in range(len(rows)):
                start, stop = rows.bounds(index)
                for name, part in rows.chunk(index).items():
                    getattr(self, name)[start:stop].copy_(part)
            self.pos, self.size = pos, size
            if rows.entries is not None:
                self._saved_chunks = _SavedPairChunks(int(state["total_added"]), pos, rows.chunk_rows, rows.entries)
        self.total_added = int(state["total_added"])


@dataclass
class _SavedPairChunks:
    """The pair rows' chunk files in the last checkpoint that saved them, and the buffer's count and head then."""

    total_added: int
    pos: int
    chunk_rows: int
    entries: list[dict]

    def unchanged(self, total_added: int, pos: int, capacity: int) -> dict[int, dict]:
        """The saved chunks (index -> entry) that no pair added since can have been written into: the adds since
        wrote rows self.pos, self.pos + 1, ... (mod capacity). Anything unexpected (fewer pairs than then, a head not
        where the adds put it) or a whole ring of adds reuses nothing."""
        adds = total_added - self.total_added
        if adds < 0 or adds >= capacity or (self.pos + adds) % capacity != pos:
            return {}
        dirty = ring_chunks(self.pos, adds, capacity, self.chunk_rows)
        return {i: entry for i, entry in enumerate(self.entries) if i not in dirty}


# What the pair buffer stores (and checkpoints): every field but the per-step rewards, which only the teacher sees.
FIELDS = tuple(f.name for f in fields(PairBatch) if f.name not in ("rewards1", "rewards2"))


def pair_observations(frames1: torch.Tensor, frames2: torch.Tensor, length: int) -> torch.Tensor:
    """Both fragments of every pair as one (2 B H, *obs_shape) batch, fragment 1 first.

    One batch matters beyond speed: in training mode BatchNorm normalises over both fragments of every pair together.
    """
    return fragment_observations(torch.cat([frames1, frames2]), length)


def split_pairs(values: torch.Tensor, pairs: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(2 B H, A) per-observation values of `pair_observations` -> (B, H, A) for fragment 1 and for fragment 2."""
    both = values.view(2, pairs, length, -1)
    return both[0], both[1]
