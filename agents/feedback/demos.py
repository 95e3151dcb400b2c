"""Demonstration files: the archives `python sobirl/demos.py record` writes, loaded, checked and sampled (AIHF's
expert data).

File layout (one `np.savez_compressed` archive, loadable with allow_pickle=False):

    meta          JSON: format, format_version, env_id, frame_stack, frame_shape, num_actions, seed, greedy,
                  min_return, steps_rolled_out, max_episode_frames, checkpoint (path), checkpoint_algo,
                  checkpoint_step (its global step), recorded (UTC time), sha256 (of the arrays: checked on load)
    frames        uint8 (sum over games of L_g + stack - 1, *frame_shape): each game's first observation whole (its
                  stack - 1 older frames are the environment's zero padding), then the newest frame of every later
                  observation, the replay buffer's layout (agents/lower/replay.py): step t of game g sees
                  frames[frame_start_g + t : frame_start_g + t + stack], frame_start_g = game_starts[g] + g (stack - 1)
    actions       int64 (T,), T = sum of L_g, the games one after the other
    rewards       float32 (T,) sign-clipped rewards (what the learner sees); raw_rewards float32 (T,) the game's points
    terminated    bool (T,) a life or the game ended at this step (Atari flags lost lives, as in training)
    probs         float32 (T, A) the policy's full action distribution at each step
    game_starts   int64 (G,) first step of each game in the step arrays; game_ends int64 (G,) one past its last step
    game_returns  float64 (G,) true scores; game_truncated bool (G,) cut by --max-episode-frames, not a game over
    played_returns float64: the scores of every whole game played, before --min-return

`Demonstrations.load` checks all of it: a missing, truncated or corrupt file,
one for another --env-id or of another format is a one-line error naming the flag and the file.
`Demonstrations.fragments(count, length, generator)` draws fragments of `length` steps inside games, uniformly over all
such windows, in the replay's fragment layout.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from agents.infra.cli import UsageError

FORMAT = "sobirl-demos"
FORMAT_VERSION = 1
ARRAYS = (
    "frames",
    "actions",
    "rewards",
    "raw_rewards",
    "terminated",
    "probs",
    "game_starts",
    "game_ends",
    "game_returns",
    "game_truncated",
    "played_returns",
)


@dataclass
class DemoFragments:
    frames: torch.Tensor  # uint8 (N, length + stack - 1, *frame_shape), as agents.lower.replay.Fragments
    actions: torch.Tensor  # int64 (N, length)
    game: torch.Tensor  # int64 (N,), the game each fragment comes from
    start: torch.Tensor  # int64 (N,), its first step within that game


class Demonstrations:
    """A loaded demonstrations file: numpy arrays for inspection, torch tensors on `device` for sampling."""

    def __init__(self, meta: dict[str, Any], arrays: dict[str, np.ndarray], path: str = ""):
        self.meta = meta
        self.arrays = arrays
        self.path = path
        self.device = torch.device("cpu")
        self._frames = torch.from_numpy(arrays["frames"])
        self._actions = torch.from_numpy(arrays["actions"])
        self._starts: dict[int, tuple[torch.Tensor, ...]] = {}

    # -- what it holds -------------------------------------------------------------------------------------------

    @property
    def env_id(self) -> str:
        return self.meta["env_id"]

    @property
    def stack(self) -> int:
        return int(self.meta["frame_stack"])

    @property
    def frame_shape(self) -> tuple[int, ...]:
        return tuple(self.meta["frame_shape"])

    @property
    def num_actions(self) -> int:
        return int(self.meta["num_actions"])

    @property
    def game_lengths(self) -> np.ndarray:
        return self.arrays["game_ends"] - self.arrays["game_starts"]

    @property
    def num_games(self) -> int:
        return len(self.arrays["game_starts"])

    @property
    def num_steps(self) -> int:
        return len(self.arrays["actions"])

    def game_frames(self, game: int) -> np.ndarray:
        """(L + stack - 1, *frame_shape) frames of one game."""
        start = int(self.arrays["game_starts"][game]) + game * (self.stack - 1)
        return self.arrays["frames"][start : start + int(self.game_lengths[game]) + self.stack - 1]

    def game_observations(self, game: int) -> np.ndarray:
        """(L, *obs_shape) the observations the policy saw during one game, rebuilt from the frames."""
        frames = self.game_frames(game)
        if self.stack == 1:
            return frames
        length = len(frames) - self.stack + 1
        return np.stack([frames[t : t + self.stack] for t in range(length)])

    def game_slice(self, game: int) -> slice:
        """The game's steps in actions, rewards, probs, ..."""
        return slice(int(self.arrays["game_starts"][game]), int(self.arrays["game_ends"][game]))

    # -- sampling --------------------------------------------------------------------------------------------------

    def to(self, device: torch.device | str) -> Demonstrations:
        self.device = torch.device(device)
        self._frames = self._frames.to(self.device)
        self._actions = self._actions.to(self.device)
        self._starts = {}
        return self

    def longest_game(self) -> int:
        return int(self.game_lengths.max()) if self.num_games else 0

    def _fragment_starts(self, length: int) -> tuple[torch.Tensor, ...]:
        """(game, start, step index, frame index) of every window of `length` steps inside a game."""
        if length not in self._starts:
            lengths = self.game_lengths
            games = np.nonzero(lengths >= length)[0]
            counts = lengths[games] - length + 1
            game = np.repeat(games, counts)
            start = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
            step = self.arrays["game_starts"][game] + start
            frame = step + game * (self.stack - 1)
            self._starts[length] = tuple(
                torch.as_tensor(x, dtype=torch.int64, device=self.device) for x in (game, start, step, frame)
            )
        return self._starts[length]

    def fragments(self, count: int, length: int, generator: torch.Generator | None = None) -> DemoFragments:
        """`count` fragments of `length` consecutive steps of one game each, drawn uniformly (with replacement) among
        all such windows of the dataset; frames in the replay's layout (N, length + stack - 1, *frame_shape)."""
        game, start, step, frame = self._fragment_starts(length)
        if len(game) == 0:
            raise UsageError(
                f"--fragment-length {length}: no game in {self.path or 'the demonstrations'} is that long "
                f"(the longest has {self.longest_game()} steps)"
            )
        pick = torch.randint(0, len(game), (count,), device=self.device, generator=generator)
        frames = self._frames[frame[pick, None] + torch.arange(length + self.stack - 1, device=self.device)]
        actions = self._actions[step[pick, None] + torch.arange(length, device=self.device)]
        return DemoFragments(frames, actions, game[pick], start[pick])

    # -- files -----------------------------------------------------------------------------------------------------

    def content_hash(self) -> str:
        """SHA-256 of every array's dtype, shape and bytes: zip's own CRC is not checked when numpy reads a member,
        so a flipped byte could otherwise load silently."""
        sha = hashlib.sha256()
        for name in ARRAYS:
            array = np.ascontiguousarray(self.arrays[name])
            sha.update(f"{name}:{array.dtype.str}:{array.shape};".encode())
            sha.update(memoryview(array).cast("B"))
        return sha.hexdigest()

    def save(self, path: str | Path) -> None:
        """Write atomically: a crash leaves either the previous file or the complete new one."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        self.meta["sha256"] = self.content_hash()
        try:
            with open(tmp, "wb") as f:
                np.savez_compressed(f, meta=np.array(json.dumps(self.meta)), **self.arrays)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    @classmethod
    def load(cls, path: str | Path, flag: str = "--demos", env_id: str | None = None) -> Demonstrations:
        """Read and check a file; every problem is a UsageError naming `flag` and the file. With `env_id`, the file
        must have been recorded on that environment."""
        where = f"{flag} {path}".strip()
        if not Path(path).is_file():
            raise UsageError(f"{where}: {'not a file' if Path(path).exists() else 'no such file'}")
        with open(path, "rb") as f:
            if f.read(4) != b"PK\x03\x04":
                raise UsageError(f"{where}: not a demonstrations file (not an .npz archive)")
        try:
            with np.load(path, allow_pickle=False) as archive:
                names = set(archive.files)
                missing = [name for name in ("meta", *ARRAYS) if name not in names]
                if missing:
                    raise UsageError(f"{where}: not a demonstrations file (no {', '.join(missing)})")
                meta = json.loads(str(archive["meta"]))
                arrays = {name: archive[name] for name in ARRAYS}
        except UsageError:
            raise
        except Exception as err:  # noqa: BLE001 - zipfile, zlib and numpy raise many types for a damaged archive
            detail = str(err).splitlines()[0] if str(err) else ""
            raise UsageError(f"{where}: unreadable, truncated or corrupt ({type(err).__name__}: {detail})") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise UsageError(f"{where}: not a demonstrations file")
        if meta.get("format_version") != FORMAT_VERSION:
            raise UsageError(f"{where}: format version {meta.get('format_version')}, expected {FORMAT_VERSION}")
        demos = cls(meta, arrays, str(path))
        if demos.content_hash() != meta.get("sha256"):
            raise UsageError(f"{where}: corrupt (checksum mismatch)")
        try:
            problem = demos._inconsistency()
        except (KeyError, TypeError, ValueError, IndexError) as err:
            problem = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        if problem:
            raise UsageError(f"{where}: corrupt ({problem})")
        if env_id is not None and demos.env_id != env_id:
            raise UsageError(f"{where}: recorded on {demos.env_id}, but this run's --env-id is {env_id}")
        return demos

    def _inconsistency(self) -> str:
        """What is wrong with the arrays and their description, or "" (raises on a badly malformed file)."""
        a, stack = self.arrays, self.stack
        steps, games = len(a["actions"]), len(a["game_starts"])
        if len(a["game_ends"]) != games:
            return "game arrays differ"
        lengths = a["game_ends"] - a["game_starts"]
        checks = [
            (all(len(a[k]) == steps for k in ("rewards", "raw_rewards", "terminated", "probs")), "step arrays differ"),
            (a["probs"].ndim == 2 and a["probs"].shape[1] == self.num_actions, "probs are not one row per step"),
            (all(len(a[k]) == games for k in ("game_ends", "game_returns", "game_truncated")), "game arrays differ"),
            (
                np.array_equal(a["game_starts"], np.concatenate([[0], a["game_ends"][:-1]])[:games])
                and (lengths > 0).all()
                and (games == 0 or a["game_ends"][-1] == steps),
                "games do not tile the steps",
            ),
            (
                a["frames"].dtype == np.uint8
                and tuple(a["frames"].shape[1:]) == self.frame_shape
                and len(a["frames"]) == steps + games * (stack - 1),
                "frame count does not match the games",
            ),
            (
                a["actions"].size == 0 or 0 <= a["actions"].min() <= a["actions"].max() < self.num_actions,
                "actions out of range",
            ),
        ]
        return next((message for ok, message in checks if not ok), "")
