"""Replay buffer that stores each observation frame once and rebuilds frame stacks at sample time.

A 4-stack observation and its successor share three frames, so storing (obs, next_obs) stacks keeps each 84x84
frame eight times. Here every agent step stores only the newest frame of its observation (7,056 bytes for Atari)
plus action, reward, flags and the probability with which the acting policy chose the action (the behaviour
probability mu(a_t|s_t), for off-policy corrections): 1M transitions take about 7 GB instead of 56 GB. The frame
storage is allocated without being touched, so resident memory grows with the steps taken, and checkpoints hold
only the slots written so far. Storage and sampling live on the
training device, so a sampled batch never crosses the host-device boundary.

Layout: one ring of `slots = capacity // num_envs` steps per sub-env, all written together (the vector env steps
all sub-envs at once). Slot t of env e holds the newest frame of obs_t, a_t, r_t, terminated_t and whether obs_t
is the first observation of a game. The stack of obs_t is rebuilt from frames t-stack+1..t with the frames before
the game's first observation zeroed, exactly as the environment zero-pads its stack at a game start;
next_obs_t is the stack at slot t+1. Transition t is sampleable once slot t+1 is written, when it is real (not the
NEXT_STEP autoreset step from a game's terminal observation into the next game), and while its frames have not
been overwritten by the write head.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from agents.infra.checkpoint import ChunkedRows, ring_chunks


@dataclass
class Batch:
    obs: torch.Tensor  # uint8 (B, *obs_shape)
    actions: torch.Tensor  # int64 (B,)
    rewards: torch.Tensor  # float32 (B,), the environment's (clipped) reward
    next_obs: torch.Tensor  # uint8 (B, *obs_shape)
    terminated: torch.Tensor  # float32 (B,), 1 where the transition ends an episode (a life, for Atari)


@dataclass
class Fragments:
    """Consecutive transitions of one env each: the observation at step h is frames[:, h : h + stack]."""

    frames: torch.Tensor  # uint8 (N, length + stack - 1, *frame_shape), frames before the episode start zeroed
    actions: torch.Tensor  # int64 (N, length)
    rewards: torch.Tensor  # float32 (N, length), the environment's (clipped) rewards
    behaviour: torch.Tensor  # float32 (N, length), mu(a_t|s_t) of the policy that acted
    age: torch.Tensor  # int64 (N,), vector steps between the fragment's first step and the newest stored step


class FrameReplayBuffer:
    """Ring buffer of single frames for `num_envs` parallel environments.

    `obs_shape` is one observation's shape; with `stack > 1` its first axis is the frame stack and only the newest
    frame is stored, with `stack == 1` the whole observation is the stored frame.
    """

    OVERSAMPLE = 4  # candidate draws per sampled transition (see `sample`)
    # Per transition besides the frame: action (int64), reward and behaviour (float32), four bool flags.
    EXTRA_BYTES_PER_TRANSITION = 8 + 4 + 4 + 4

    @classmethod
    def bytes_needed(cls, capacity: int, num_envs: int, obs_shape: tuple[int, ...], stack: int) -> int:
        """What the storage of a full buffer takes (an empty one takes next to nothing: see `__init__`)."""
        frame_shape = tuple(obs_shape[1:]) if stack > 1 else tuple(obs_shape)
        slots = capacity // num_envs
        return slots * num_envs * (math.prod(frame_shape) + cls.EXTRA_BYTES_PER_TRANSITION)

    def __init__(
        self, capacity: int, num_envs: int, obs_shape: tuple[int, ...], stack: int, device: torch.device | str
    ):
        if stack < 1:
            raise ValueError(f"stack must be at least 1, got {stack}")
        if stack > 1 and obs_shape[0] != stack:
            raise ValueError(f"observation shape {obs_shape} does not start with the frame stack {stack}")
        self.slots = capacity // num_envs
        if self.slots < stack + 2:
            raise ValueError(
                f"buffer of {capacity} transitions leaves {self.slots} per env for {num_envs} envs; "
                f"need at least {stack + 2}"
            )
        self.num_envs = num_envs
        self.obs_shape = tuple(obs_shape)
        self.stack = stack
        self.frame_shape = self.obs_shape[1:] if stack > 1 else self.obs_shape
        self.device = torch.device(device)
        shape = (self.slots, num_envs)
        # torch.empty leaves the pages untouched until a step is written there: memory grows with the steps taken.
        self.frames = torch.empty(shape + self.frame_shape, dtype=torch.uint8, device=self.device)
        self.actions = torch.empty(shape, dtype=torch.int64, device=self.device)
        self.rewards = torch.empty(shape, dtype=torch.float32, device=self.device)
        self.behaviour = torch.empty(shape, dtype=torch.float32, device=self.device)
        self.terminated = torch.zeros(shape, dtype=torch.bool, device=self.device)
        self.first = torch.zeros(shape, dtype=torch.bool, device=self.device)
        self.real = torch.zeros(shape, dtype=torch.bool, device=self.device)
        self.sampleable = torch.zeros(shape, dtype=torch.bool, device=self.device)
        self.pos = 0  # next slot to write
        self.written = 0  # slots written so far, capped at self.slots
        # The same two numbers on the device, updated in place by `add` (and `sync_device_cursor`): what a sampler
        # that never reads a host value (`sample_indices_on_device`, captured in a CUDA graph) draws from.
        self.pos_t = torch.zeros((), dtype=torch.int64, device=self.device)
        self.written_t = torch.zeros((), dtype=torch.int64, device=self.device)
        self._next_first = torch.ones(num_envs, dtype=torch.bool, device=self.device)
        self.invalid_draws = torch.zeros((), dtype=torch.int64, device=self.device)
        self._saved_chunks: _SavedChunks | None = None  # the chunk files of the last checkpoint (state_dict)
        self._outcome_slot: int | None = None  # the slot `add_step` wrote whose reward `add_outcome` has not yet

    def __len__(self) -> int:
        """Number of transitions that can be sampled now (all envs)."""
        return int(self.sampleable.sum())

    @property
    def bytes_per_transition(self) -> float:
        tensors = [getattr(self, name) for name in self._STATE if name != "_next_first"]
        return sum(t.element_size() * t.numel() for t in tensors) / (self.slots * self.num_envs)

    def add(self, obs, actions, rewards, terminated, autoreset, behaviour) -> None:
        """Store one vector step taken from `obs`; `behaviour[e]` is the probability the acting policy gave the action.

        `autoreset[e]` is true when env e's previous step ended its game, so this step only reset it (NEXT_STEP
        autoreset): `obs[e]` is that game's terminal observation and the transition out of it is not real.
        """
        self.add_step(obs, actions, autoreset, behaviour)
        self.add_outcome(rewards, terminated)

    def add_step(self, obs, actions, autoreset, behaviour) -> None:
        """`add`'s first half, all that is known before the environments step: the frame of `obs`, the action and its
        probability, the game-start flags; the previous step's transition becomes sampleable (its next observation,
        `obs`, is now stored) and the write head moves on. The reward and termination of this step follow with
        `add_outcome` (the overlapped loop of `SACTrainer.collect` runs its updates in between): until then the new
        slot is not sampleable, so nothing sampled reads them."""
        as_tensor = lambda x, dtype: torch.as_tensor(np.asarray(x), dtype=dtype).to(self.device, non_blocking=True)
        obs = as_tensor(obs, torch.uint8)
        autoreset = as_tensor(autoreset, torch.bool)
        p = self.pos
        self.frames[p] = obs[:, -1] if self.stack > 1 else obs
        self.actions[p] = as_tensor(actions, torch.int64)
        self.behaviour[p] = as_tensor(behaviour, torch.float32)
        self.first[p] = self._next_first
        self.real[p] = ~autoreset
        self._next_first = autoreset
        self.sampleable[p] = False  # its next observation is not stored yet
        if self.written > 0:
            previous = (p - 1) % self.slots
            self.sampleable[previous] = self.real[previous]
        if self.written == self.slots:
            # The slots just after the write head lost the older frames their stacks are built from.
            self.sampleable[(p + torch.arange(1, self.stack, device=self.device)) % self.slots] = False
        self._outcome_slot = p
        self.pos = (p + 1) % self.slots
        self.written = min(self.written + 1, self.slots)
        self.sync_device_cursor()

    def add_outcome(self, rewards, terminated) -> None:
        """`add`'s second half: the reward and termination of the step `add_step` stored last."""
        p, self._outcome_slot = self._outcome_slot, None
        if p is None:
            raise RuntimeError("add_outcome without a preceding add_step")
        as_tensor = lambda x, dtype: torch.as_tensor(np.asarray(x), dtype=dtype).to(self.device, non_blocking=True)
        self.rewards[p] = as_tensor(rewards, torch.float32)
        self.terminated[p] = as_tensor(terminated, torch.bool)

    def sync_device_cursor(self) -> None:
        """Copy `pos` and `written` into `pos_t` and `written_t`, in place (call it after loading a state)."""
        self.pos_t.fill_(self.pos)
        self.written_t.fill_(self.written)

    def break_episodes(self) -> None:
        """The environments restart (a resumed run): the stored last step leads nowhere and the next one is a start."""
        if self.written > 0:
            self.real[(self.pos - 1) % self.slots] = False
        self._next_first.fill_(True)

    _STATE = ("frames", "actions", "rewards", "behaviour", "terminated", "first", "real", "sampleable", "_next_first")
    CHUNK_BYTES = 64 << 20  # a checkpoint keeps the replay in files of about this many bytes of slots each

    def state_dict(self, vector_steps: int | None = None) -> dict:
        """The written slots only (the ring fills slots 0, 1, ... before it wraps), so a checkpoint's size follows the
        steps collected, not the capacity. They go into chunk files beside the checkpoint (`ChunkedRows`); given
        `vector_steps`, the number of `add` calls so far, a chunk whose slots no `add` touched since the last
        checkpoint saved (its `on_saved`) is not written again but referenced."""
        pos, written = int(self.pos), int(self.written)
        tensors = {name: getattr(self, name) for name in self._STATE if name != "_next_first"}
        saved = self._saved_chunks
        chunk_rows = saved.chunk_rows if saved is not None else self._chunk_rows()
        reuse = {} if saved is None else saved.unchanged(vector_steps, pos, written, self.slots, self.stack)

        def on_saved(entries: list[dict]) -> None:
            self._saved_chunks = _SavedChunks(vector_steps, pos, written, chunk_rows, entries)

        return {
            "slots": self.slots,
            "pos": pos,
            "written": written,
            "vector_steps": vector_steps,
            "frame_shape": tuple(self.frames.shape[1:]),
            "_next_first": self._next_first.cpu(),
            "rows": ChunkedRows(tensors, written, chunk_rows, reuse, on_saved),
        }

    def _chunk_rows(self) -> int:
        row_bytes = sum(getattr(self, name)[:1].nbytes for name in self._STATE if name != "_next_first")
        return max(1, self.CHUNK_BYTES // row_bytes)

    def load_state_dict(self, state: dict) -> None:
        """A state from `state_dict`, or (checkpoint format 2) one with every written slot's tensors inline."""
        rows = state.get("rows")
        frame_shape = tuple(state["frame_shape"]) if rows is not None else tuple(state["frames"].shape[1:])
        if int(state["slots"]) != self.slots or frame_shape != tuple(self.frames.shape[1:]):
            raise ValueError(
                f"the checkpoint's replay holds {int(state['slots'])} steps of {frame_shape} per "
                f"slot; this run's holds {self.slots} of {tuple(self.frames.shape[1:])}"
            )
        written = int(state["written"])
        self._next_first.copy_(state["_next_first"])
        if rows is None:
            for name in self._STATE[:-1]:
                getattr(self, name)[:written].copy_(state[name])
        else:
            for index in range(len(rows)):
                start, stop = rows.bounds(index)
                for name, part in rows.chunk(index).items():
                    getattr(self, name)[start:stop].copy_(part)
        self.sampleable[written:] = False
        self.pos, self.written = int(state["pos"]), written
        saved_files = None if rows is None else rows.entries
        self._saved_chunks = (
            None
            if saved_files is None
            else _SavedChunks(state.get("vector_steps"), self.pos, written, rows.chunk_rows, saved_files)
        )

    def stacks(self, slot: torch.Tensor, env: torch.Tensor) -> torch.Tensor:
        """Observations (B, *obs_shape) at the given slots, rebuilt from single frames."""
        if self.stack == 1:
            return self.frames[slot, env]
        back = torch.arange(self.stack, device=self.device)  # 0 = newest frame
        slots = (slot[:, None] - back) % self.slots
        frames = self.frames[slots, env[:, None]]  # (B, stack, *frame_shape), newest first
        # Frame t-o belongs to an earlier game if a game started at any of t-o+1..t.
        started = self.first[slots[:, :-1], env[:, None]].cumsum(1) > 0
        keep = torch.cat([torch.ones_like(started[:, :1]), ~started], dim=1)
        frames = frames * keep.view(*keep.shape, *([1] * len(self.frame_shape)))
        return frames.flip(1)

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> Batch:
        """A uniform batch of sampleable transitions (with replacement), without a host round trip.

        Rejection sampling in one pass: draw OVERSAMPLE x batch_size slots, keep the first batch_size sampleable ones
        (a stable sort puts them in front), which are independent and uniform over the sampleable transitions. Unusable
        slots are a handful per game plus `stack - 1` at the write head, so running short of valid draws is
        astronomically unlikely; `invalid_draws` counts any that happen (it stays 0; a test checks).
        """
        return self.batch_at(*self.sample_indices(batch_size, generator))

    def sample_indices(self, batch_size: int, generator: torch.Generator | None = None):
        """(slot, env) of the transitions `sample` takes: slots drawn below the host's `written`."""
        draws = self.OVERSAMPLE * batch_size
        slot = torch.randint(0, self.written, (draws,), device=self.device, generator=generator)
        return self._keep_sampleable(slot, batch_size, generator)

    def sample_indices_on_device(self, batch_size: int, generator: torch.Generator | None = None):
        """`sample_indices` without reading a host value: slots are floor(u * written_t), u ~ U[0, 1) in float64
        (uniform over the written slots up to a 2^-53 bias), so a CUDA graph that captured it draws from the
        replay's size at each replay. Another random stream than `sample_indices` (torch.randint's integers cannot
        be reproduced from a device-side bound)."""
        draws = self.OVERSAMPLE * batch_size
        u = torch.rand(draws, dtype=torch.float64, device=self.device, generator=generator)
        slot = torch.minimum((u * self.written_t).long(), self.written_t - 1)
        return self._keep_sampleable(slot, batch_size, generator)

    def _keep_sampleable(self, slot: torch.Tensor, batch_size: int, generator: torch.Generator | None):
        env = torch.randint(0, self.num_envs, (slot.shape[0],), device=self.device, generator=generator)
        ok = self.sampleable[slot, env]
        chosen = torch.sort((~ok).to(torch.uint8), stable=True).indices[:batch_size]
        slot, env = slot[chosen], env[chosen]
        self.invalid_draws += batch_size - ok[chosen].sum()
        return slot, env

    def batch_at(self, slot: torch.Tensor, env: torch.Tensor) -> Batch:
        """The transitions at (slot, env), observations rebuilt from frames."""
        return Batch(
            obs=self.stacks(slot, env),
            actions=self.actions[slot, env],
            rewards=self.rewards[slot, env],
            next_obs=self.stacks((slot + 1) % self.slots, env),
            terminated=self.terminated[slot, env].float(),
        )

    def recent_fragments(
        self, length: int, count: int, recent_steps: int, generator: torch.Generator | None = None
    ) -> Fragments | None:
        """`count` random fragments of `length` consecutive real transitions from each env's latest steps, or None
        when no stretch of `length` steps inside one episode lies in that window.

        A fragment never crosses an episode end: only its last transition may be terminal. Frames before the episode
        start are zeroed, as the environment zero-pads its stack at a game start.
        """
        recent = min(recent_steps, self.written - 1)
        if recent < length:
            raise ValueError(f"fragments of {length} steps need at least {length} stored steps per env, have {recent}")
        # Chronological window of the newest complete transitions: slots pos-1-recent .. pos-2.
        window = (self.pos - 1 - recent + torch.arange(recent, device=self.device)) % self.slots
        starts = _fragment_starts(self.sampleable[window], self.terminated[window], length)
        candidates = starts.nonzero()
        if candidates.numel() == 0:
            return None
        pick = candidates[torch.randint(0, len(candidates), (count,), device=self.device, generator=generator)]
        start_slot, env = window[pick[:, 0]], pick[:, 1]
        steps = (start_slot[:, None] + torch.arange(length, device=self.device)) % self.slots  # (count, length)
        env_rows = env[:, None].expand_as(steps)
        if self.stack == 1:
            frames = self.frames[steps, env_rows]
        else:
            history = self.stacks(start_slot, env)  # (count, stack, *frame_shape) with pre-episode frames zeroed
            frames = torch.cat([history, self.frames[steps[:, 1:], env_rows[:, 1:]]], dim=1)
        age = (self.pos - 1 - start_slot) % self.slots
        return Fragments(
            frames, self.actions[steps, env_rows], self.rewards[steps, env_rows], self.behaviour[steps, env_rows], age
        )

    def completed_games(self, recent_steps: int, max_games: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The newest (at most `max_games`) whole games played within each env's latest `recent_steps` steps:
        (slot (T,), env (T,)) of their transitions, game after game, and each game's length (G,). A game is the real
        transitions from a first observation up to the autoreset step that ends it, so a game still running, or one
        that began before the window, is left out."""
        # Once the ring has wrapped, the oldest stack - 1 slots have lost the frames their stacks are built from.
        usable = self.written if self.written < self.slots else self.slots - (self.stack - 1)
        recent = min(recent_steps, usable)
        window = (self.pos - recent + torch.arange(max(recent, 0), device=self.device)) % self.slots
        games: list[tuple[int, np.ndarray, int]] = []  # (end position in the window, slots, env)
        first, real = self.first[window].cpu().numpy(), self.real[window].cpu().numpy()
        slots = window.cpu().numpy()
        for env in range(self.num_envs):
            start = None
            for t in range(len(slots)):
                if first[t, env]:
                    start = t
                if not real[t, env]:
                    if start is not None and t > start:
                        games.append((t, slots[start:t], env))
                    start = None
        games = sorted(games, key=lambda game: game[0])[-max_games:] if max_games > 0 else []
        if not games:
            empty = torch.zeros(0, dtype=torch.long, device=self.device)
            return empty, empty, empty
        slot = torch.as_tensor(np.concatenate([g[1] for g in games]), device=self.device)
        env = torch.as_tensor(np.concatenate([np.full(len(g[1]), g[2]) for g in games]), device=self.device)
        return slot, env, torch.tensor([len(g[1]) for g in games], device=self.device)


@dataclass
class _SavedChunks:
    """The replay's chunk files in the last checkpoint that saved it, and where the write head was then."""

    vector_steps: int | None
    pos: int
    written: int
    chunk_rows: int
    entries: list[dict]

    def unchanged(self, vector_steps: int | None, pos: int, written: int, slots: int, stack: int) -> dict[int, dict]:
        """The saved chunks (index -> entry) whose slots no `add` can have touched since, given that `vector_steps`
        adds have happened in all: an add at slot p writes slot p, marks p - 1 sampleable and, once the ring is
        full, p + 1 .. p + stack - 1 unsampleable (and `break_episodes` changes pos - 1); `stack` slots of margin on
        each side cover these. Anything unexpected (no step counts, a head not where they put it) reuses nothing."""
        if vector_steps is None or self.vector_steps is None:
            return {}
        adds = vector_steps - self.vector_steps
        if adds < 0 or (self.pos + adds) % slots != pos or min(self.written + adds, slots) != written:
            return {}
        touched = adds + 2 * stack
        if touched >= slots:
            return {}
        dirty = ring_chunks(self.pos - stack, touched, slots, self.chunk_rows)
        return {i: entry for i, entry in enumerate(self.entries) if i not in dirty}


def _fragment_starts(ok: torch.Tensor, ends_episode: torch.Tensor, length: int) -> torch.Tensor:
    """Mask of window positions where `length` consecutive transitions are all sampleable and none but the last is
    terminal; inputs are (T, N) in chronological order, output (T - length + 1, N)."""

    def window_sum(x: torch.Tensor, width: int) -> torch.Tensor:
        padded = torch.cat([torch.zeros_like(x[:1]), x.cumsum(0)])
        return padded[width:] - padded[:-width]

    all_ok = window_sum(ok.long(), length) == length
    if length == 1:
        return all_ok
    no_early_end = window_sum(ends_episode.long(), length - 1)[: all_ok.shape[0]] == 0
    return all_ok & no_early_end
