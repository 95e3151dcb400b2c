"""Teachers: label y = P(fragment 1 preferred) for queried fragment pairs.

Every teacher is an object with one method the learner calls, like the reward loss:

    label(queries, ids, context) -> Labelled(pairs to store with their labels, counts to log)

`make_teacher(args)` builds the one a run asks for; the learner never switches on teacher names. A teacher with
state of its own (a person's pending pairs) also overrides `open`, `state_dict`, `load_state_dict` and `close`.

- oracle / bernoulli: synthetic, from the fragments' sums of clipped ground-truth rewards (the paper's text and the
  authors' code).
- bpref: B-Pref's (Lee et al. 2021) model of an imperfect teacher: rationality, myopia, mistakes, skipped and
  "equally good" queries, with the paper's presets.
- replay: the answers of a JSONL label log (the format of agents/feedback/labelling/label_log.py), looked up by pair id.
- human: a person in a browser, through the LabelServer of agents/feedback/labelling/server.py.

Every queried pair has an id, the number of pairs the run had queried before it (see PreferenceLearner.label), so
that a label log written by a run can be matched to the pairs of a later run with the same flags and seed.
agents/feedback/labelling/ (and with it flask, the optional extra `human`) is imported only by the replay and human
teachers.
"""

from __future__ import annotations

import math
import pathlib
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, NamedTuple

import numpy as np
import torch

from agents.feedback.pairs import FIELDS, LOGIT_CLAMP, PairBatch
from agents.infra.cli import UsageError

TEACHERS = ("oracle", "bernoulli", "bpref", "replay", "human")
LABEL_MODES = ("sync", "async")


def oracle_labels(returns1: torch.Tensor, returns2: torch.Tensor) -> torch.Tensor:
    """The paper's text: the higher return is preferred (y = 1 or 0); equal returns give y = 0.5."""
    return 0.5 * (torch.sign(returns1 - returns2) + 1.0).float()


def bernoulli_labels(
    returns1: torch.Tensor, returns2: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """The authors' code: y ~ Bernoulli(sigmoid(R1 - R2)), a Bradley-Terry-rational teacher at temperature 1."""
    p = torch.sigmoid(torch.clamp(returns1 - returns2, -LOGIT_CLAMP, LOGIT_CLAMP).float())
    if generator is not None and generator.device != p.device:
        return torch.bernoulli(p.cpu(), generator=generator).to(p.device)
    return torch.bernoulli(p, generator=generator)


def label_pairs(
    teacher: str, returns1: torch.Tensor, returns2: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Labels from the fragment returns alone: the oracle and bernoulli teachers."""
    if teacher == "oracle":
        return oracle_labels(returns1, returns2)
    if teacher == "bernoulli":
        return bernoulli_labels(returns1, returns2, generator)
    raise ValueError(f"unknown teacher {teacher!r} for labels from returns alone; expected oracle or bernoulli")


# ---------------------------------------------------------------------------------------------------------------
# The seam


@dataclass
class LabelContext:
    """What a teacher may use from the run while it labels one iteration's queries."""

    generator: torch.Generator  # the run's label generator (checkpointed with it): Bernoulli draws, mistakes
    warmup: bool = False  # iteration 0: nothing trains before these pairs are labelled
    stopping: Callable[[], bool] = lambda: False  # a stop signal has arrived (a waiting teacher stops waiting)
    check: Callable[[], None] = lambda: None  # raises to stop the run at this boundary
    set_phase: Callable[[str], None] = field(default=lambda phase: None)  # the progress bar's phase text


class Labelled(NamedTuple):
    """A label step's outcome: the pairs to store, labels set (None: none yet), and counts logged as
    reward/<name>_pairs."""

    pairs: PairBatch | None
    counts: dict[str, int]


class Teacher:
    """Labels the pairs the learner queries. `ids[i]` is the id of queries row i; `queries` is None only when a
    checkpoint interrupted a label step, which a teacher with pending pairs continues."""

    def open(self, directory: pathlib.Path | None, next_pair_id: int) -> tuple[int, PairBatch | None]:
        """Called once before training: (the id the next queried pair gets, pairs answered since the checkpoint)."""
        return next_pair_id, None

    def label(self, queries: PairBatch | None, ids: list[int], context: LabelContext) -> Labelled:
        raise NotImplementedError

    def state_dict(self) -> dict | None:
        return None

    def load_state_dict(self, state: dict, device: torch.device | str) -> None:
        pass

    def close(self) -> None:
        pass


class ReturnTeacher(Teacher):
    """oracle (the paper's text) or bernoulli (the authors' code): labels from the fragments' clipped returns."""

    def __init__(self, kind: str):
        label_pairs(kind, torch.zeros(1), torch.zeros(1))  # refuses an unknown kind now
        self.kind = kind

    def label(self, queries: PairBatch | None, ids: list[int], context: LabelContext) -> Labelled:
        queries.labels = label_pairs(self.kind, queries.returns1, queries.returns2, context.generator)
        return Labelled(queries, {})


# ---------------------------------------------------------------------------------------------------------------
# B-Pref's simulated teacher


@dataclass(frozen=True)
class BPrefTeacher(Teacher):
    """B-Pref's teacher (Lee et al. 2021, "B-Pref: Benchmarking Preference-Based Reinforcement Learning"), with its
    parameter names. For each pair, in B-Pref's order:

    1. skip   if eps_skip > 0 and both fragments' returns are at most eps_skip * M, the pair is skipped: not labelled
              and not stored (B-Pref keeps a pair when max(R1, R2) > threshold);
    2. prefer on the myopic returns sum_t gamma^(H-1-t) r_t (the last step weighs 1): beta <= 0, the higher one wins;
              beta > 0, y ~ Bernoulli(sigmoid(beta * (R1 - R2))) (Bradley-Terry with rationality beta);
              equal myopic returns give y = 0.5 in both cases (B-Pref's code gives exact ties to fragment 1);
    3. mistake with probability eps_mistake the label is flipped (y -> 1 - y; 0.5 stays 0.5);
    4. equal  if |R1 - R2| < eps_equal * M, y = 0.5 (B-Pref's "equally preferable", on the undiscounted returns).

    M, the reference return, is the mean |return| over both fragments of every pair in the batch labelled at once
    (one query round). B-Pref uses "the average segment return", estimated from the agent's recent episode returns
    scaled to the segment length; the query batch's own fragments give the same quantity for the current policy
    without tracking episodes, and |.| keeps the thresholds non-negative where rewards are negative. B-Pref's code
    also multiplies its thresholds by eps a second time after the first query round (eps^2 * M); that looks like a
    slip and is not reproduced here: the thresholds are eps * M in every round.
    """

    beta: float = -1.0
    gamma: float = 1.0
    eps_mistake: float = 0.0
    eps_skip: float = 0.0
    eps_equal: float = 0.0

    def thresholds(self, returns1: torch.Tensor, returns2: torch.Tensor) -> tuple[float, float]:
        """(skip threshold, equal threshold) for one batch of fragment returns."""
        both = torch.cat([returns1, returns2]).double()
        reference = float(both.abs().mean()) if len(both) else 0.0
        return self.eps_skip * reference, self.eps_equal * reference

    def myopic_weights(self, length: int) -> torch.Tensor:
        """gamma^(H-1-t) for t = 0..H-1: the latest step counts fully, earlier ones fade."""
        return self.gamma ** torch.arange(length - 1, -1, -1, dtype=torch.float64)

    def label(self, queries: PairBatch | None, ids: list[int], context: LabelContext) -> Labelled:
        """The seam: skipped pairs are neither labelled nor stored (reward/dropped_pairs counts them)."""
        queries.labels, keep = self.label_rewards(queries.rewards1, queries.rewards2, context.generator)
        return Labelled(queries.select(keep), {"dropped": int((~keep).sum())})

    def label_rewards(
        self, rewards1: torch.Tensor, rewards2: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-step rewards (B, H) of both fragments -> (labels (B,) float32, NaN where skipped; keep (B,) bool).

        Randomness (Bradley-Terry samples, then mistakes) is drawn from `generator` on the CPU, for every pair in
        the batch, skipped or not, so one pair's draws do not depend on the others' returns.
        """
        if rewards1.dim() != 2 or rewards1.shape != rewards2.shape:
            raise ValueError(
                f"per-step rewards must be two (B, H) tensors of one shape, got "
                f"{tuple(rewards1.shape)} and {tuple(rewards2.shape)}"
            )
        device = rewards1.device
        r1, r2 = rewards1.detach().double().cpu(), rewards2.detach().double().cpu()
        batch, length = r1.shape
        returns1, returns2 = r1.sum(1), r2.sum(1)
        skip_threshold, equal_threshold = self.thresholds(returns1, returns2)
        keep = torch.ones(batch, dtype=torch.bool)
        if skip_threshold > 0:
            keep = torch.maximum(returns1, returns2) > skip_threshold
        weights = self.myopic_weights(length)
        gap = (r1 * weights).sum(1) - (r2 * weights).sum(1)
        if self.beta > 0:
            p = torch.sigmoid(torch.clamp(self.beta * gap, -LOGIT_CLAMP, LOGIT_CLAMP)).float()
            labels = torch.bernoulli(p, generator=generator)
        else:
            labels = (gap > 0).float()
        labels[gap == 0] = 0.5
        if self.eps_mistake > 0:
            flip = torch.rand(batch, generator=generator) < self.eps_mistake
            labels = torch.where(flip, 1.0 - labels, labels)
        if equal_threshold > 0:
            labels[(returns1 - returns2).abs() < equal_threshold] = 0.5
        labels[~keep] = math.nan
        return labels.to(device), keep.to(device)


# The B-Pref paper's teachers: Oracle, Mistake (eps = 0.1), Noisy (beta = 1), Skip (eps = 0.1), Myopic
# (gamma = 0.9), Equal (eps = 0.1); every other parameter at the oracle's value.
BPREF_PRESETS: dict[str, BPrefTeacher] = {
    "oracle": BPrefTeacher(),
    "mistake": BPrefTeacher(eps_mistake=0.1),
    "noisy": BPrefTeacher(beta=1.0),
    "skip": BPrefTeacher(eps_skip=0.1),
    "myopic": BPrefTeacher(gamma=0.9),
    "equal": BPrefTeacher(eps_equal=0.1),
}
BPREF_PARAMETERS = tuple(f.name for f in fields(BPrefTeacher))  # each is the flag --teacher-<name>


# ---------------------------------------------------------------------------------------------------------------
# Label logs (agents/feedback/labelling/, imported on first use: it needs flask)


def labelling_module(teacher: str):
    try:
        import agents.feedback.labelling as labelling
    except ImportError as err:
        raise UsageError(
            f"--teacher {teacher} needs flask ({err}); install it with: pip install -e '.[human]'"
        ) from None
    return labelling


class ReplayTeacher(Teacher):
    """The answers of a label log: pair id -> 1.0, 0.0, 0.5, or None ("can't tell": the pair is dropped).

    The ids are those of the run that wrote the log, so the pairs match only in a run with the same flags and seed
    that queries the same fragments: an uninterrupted run (a resumed one plays new games after the checkpoint) whose
    labels did not depend on timing (--label-mode sync).
    """

    def __init__(self, answers: dict[int, float | None]):
        self.answers = answers

    @classmethod
    def from_log(cls, path: str) -> ReplayTeacher:
        """Load `path` (a JSONL label log); a missing, unreadable, malformed or empty log is a UsageError naming
        --labels."""
        if not path:
            raise UsageError("--teacher replay needs --labels FILE: a label log (a --teacher human run's labels.jsonl)")
        file = pathlib.Path(path)
        if not file.is_file():
            raise UsageError(f"--labels {path}: no such file")
        load_label_log = labelling_module("replay").load_label_log
        try:
            answers = load_label_log(file)
        except (OSError, ValueError) as err:
            raise UsageError(f"--labels {path}: not a label log: {err}".replace("\n", " ")) from None
        if not answers:
            raise UsageError(f"--labels {path}: the log holds no answers")
        return cls({pair_id: answer.label for pair_id, answer in answers.items()})

    def label(self, queries: PairBatch | None, ids: list[int], context: LabelContext) -> Labelled:
        """The seam: the log's labels; pairs it does not answer (reward/unlabelled_pairs) or answered "can't tell"
        (reward/dropped_pairs) are not stored."""
        labels, covered = self.answers_for(ids)
        queries.labels = labels.to(queries.labels.device)
        answered = covered & ~labels.isnan()
        counts = {"dropped": int((covered & labels.isnan()).sum()), "unlabelled": int((~covered).sum())}
        return Labelled(queries.select(answered.to(queries.labels.device)), counts)

    def answers_for(self, pair_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(labels (B,) float32, NaN where there is none; covered (B,) bool: the log answers the pair). Covered
        pairs with a NaN label were answered "can't tell"."""
        covered = torch.tensor([pair_id in self.answers for pair_id in pair_ids], dtype=torch.bool)
        labels = [self.answers.get(pair_id) for pair_id in pair_ids]
        return torch.tensor([math.nan if y is None else y for y in labels], dtype=torch.float32), covered


# ---------------------------------------------------------------------------------------------------------------
# A person in a browser


def fragment_clip(frames: torch.Tensor, length: int, labelling) -> np.ndarray:
    """One stored fragment, uint8 (length + stack - 1, *frame_shape) -> its RGB clip (length, H, W, 3): MinAtar
    boards (C, 10, 10) are drawn with render_minatar; grayscale frames (Atari) with render_gray, one frame per step,
    the newest frame of each stacked observation."""
    frames = frames.detach().cpu().numpy()
    if frames.ndim == 4:  # (T, C, H, W) boards; stack 1
        return labelling.render_minatar(frames[-length:])
    if frames.ndim == 3:
        return labelling.render_gray(frames[-length:].astype(np.uint8, copy=False))
    raise ValueError(f"cannot draw frames of shape {tuple(frames.shape)}")


def cat_pairs(batches: list[PairBatch]) -> PairBatch:
    """The pairs of several batches as one (the stored fields only)."""
    return PairBatch(*(torch.cat([getattr(b, name) for b in batches]) for name in FIELDS))


class _StopFlag:
    """What LabelServer.wait_until_labelled polls: set once a stop signal has arrived."""

    def __init__(self, stopping: Callable[[], bool]):
        self.is_set = stopping


class HumanTeacher(Teacher):
    """A LabelServer on this machine plus the pairs waiting for its answers.

    `submit` queues pairs (by id) and keeps their data in `pending` until a person answers; `collect` hands back the
    answered pairs with their labels (optionally waiting until none is pending) and forgets the dropped ones. At most
    `max_pending` pairs wait: beyond that the oldest are forgotten (the page may still show them; their answers are
    then ignored).

    Crash safety: every answer is in the log before it counts. The learner stores each answered pair in its pair
    buffer as soon as it is collected, and checkpoints `pending`; a resumed run (`start` after `load_state_dict`)
    collects from the log the answers to pending pairs that arrived after the checkpoint, and queues the others
    again. Answers in the log to pairs queried after the checkpoint belong to pairs the resumed run never sees again
    (it plays new games): `start` returns the first pair id above them, where the run's ids continue.

    The checkpoint also records the page's port: a resumed run without --label-port serves on it again if it is
    free, so a tab left open on the page keeps working (otherwise on a free port, and says so).
    """

    def __init__(
        self,
        port: int = 0,
        host: str = "127.0.0.1",
        max_pending: int = 3_000,
        mode: str = "sync",
        env_id: str = "",
    ):
        self.labelling = labelling_module("human")
        self.port, self.host, self.max_pending, self.mode, self.env_id = port, host, max_pending, mode, env_id
        self.previous_port = 0  # the port a checkpoint's run served on (0: none)
        self.moved = ""  # why the page is not on previous_port, if it is not
        self.server = None
        self.log_path: pathlib.Path | None = None
        self.pending: dict[int, PairBatch] = {}  # id -> that pair (one row), oldest first
        self.refresh_every = 1.0  # seconds between updates of the waiting count while blocked on a person
        self._taken: list = []  # answers already taken (from the log, or by a stopped collect), not handed back
        self.ignored = 0  # answers to pairs no longer pending

    # -- the seam ----------------------------------------------------------------------------------------------------

    def open(self, directory: pathlib.Path | None, next_pair_id: int) -> tuple[int, PairBatch | None]:
        """Serve the labelling page, logging answers to <run dir>/labels.jsonl; a resumed run gets back the answers
        its checkpoint's pending pairs received after the checkpoint, and queues the others again."""
        if directory is None:
            raise UsageError("--teacher human needs a run directory for its label log")
        try:
            next_pair_id = self.start(pathlib.Path(directory) / "labels.jsonl", next_pair_id)
        except OSError as err:
            raise UsageError(f"--label-port {self.port}: cannot serve the labelling page: {err}") from None
        except ValueError as err:  # a corrupt log in the run directory
            raise UsageError(f"--teacher human: {err}") from None
        if self.moved:
            print(f"note: {self.moved}; the page moved to {self.url}", file=sys.stderr, flush=True)
        print(f"label preferences at {self.url} (answers saved to {self.log_path})", flush=True)
        answered, _ = self.collect(wait=False)
        return next_pair_id, cat_pairs(answered) if answered else None

    def label(self, queries: PairBatch | None, ids: list[int], context: LabelContext) -> Labelled:
        """Queue `queries` on the page and hand back the pairs answered so far, these or earlier ones; --label-mode
        sync (and the warm-up, whose pairs everything waits for) first waits until none is pending."""
        if queries is not None:
            self.submit(ids, queries)
        wait = self.mode == "sync" or context.warmup
        show = lambda waiting: context.set_phase(f"label: {waiting} pairs at {self.url}")
        answered, dropped = self.collect(wait, context.stopping, context.check, show)
        return Labelled(cat_pairs(answered) if answered else None, {"dropped": dropped, "pending": len(self.pending)})

    def close(self) -> None:
        self.stop()

    # -- the page ----------------------------------------------------------------------------------------------------

    @property
    def started(self) -> bool:
        return self.server is not None

    def start(self, log_path: pathlib.Path, next_pair_id: int) -> int:
        """Serve the page, logging to `log_path` (reloaded if it exists); returns the id the next queried pair
        should get."""
        self.log_path = pathlib.Path(log_path)
        server = self.labelling.LabelServer(self.log_path, host=self.host, env_id=self.env_id)
        logged = self.labelling.load_label_log(self.log_path)
        if not self.port and self.previous_port:
            try:
                self._listen(server, self.previous_port)
            except OSError as err:
                self.moved = f"port {self.previous_port}, where the stopped run served the page, is taken ({err})"
                self._listen(server, 0)
        else:
            self._listen(server, self.port)
        self.server = server
        for pair_id, pair in self.pending.items():
            if pair_id in logged:
                self._taken.append(logged[pair_id])
            else:
                self._submit_one(pair_id, pair)
        return max(next_pair_id, max(logged, default=-1) + 1)

    def _listen(self, server, port: int) -> None:
        """Start `server` on `port` (0: a free one); OSError if the port is taken."""
        if port:
            # werkzeug reports a port in use on stderr and exits; probe first to raise an OSError instead.
            with socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind((self.host, port))
        server.port = port
        try:
            server.start()
        except SystemExit:
            raise OSError(f"cannot listen on {self.host}:{port}") from None

    @property
    def url(self) -> str:
        return self.server.url

    def _submit_one(self, pair_id: int, pair: PairBatch) -> None:
        length = pair.actions1.shape[1]
        clip1 = fragment_clip(pair.frames1[0], length, self.labelling)
        clip2 = fragment_clip(pair.frames2[0], length, self.labelling)
        self.server.submit(pair_id, clip1, clip2)

    def submit(self, pair_ids: list[int], pairs: PairBatch) -> None:
        for index, pair_id in enumerate(pair_ids):
            pair = pairs.select(slice(index, index + 1))
            self.pending[pair_id] = pair
            self._submit_one(pair_id, pair)
        while len(self.pending) > self.max_pending:
            self.pending.pop(next(iter(self.pending)))

    def collect(
        self,
        wait: bool,
        stopping: Callable[[], bool] = lambda: False,
        check: Callable[[], None] = lambda: None,
        show: Callable[[int], None] = lambda waiting: None,
    ) -> tuple[list[PairBatch], int]:
        """(answered pairs, labels set, in the order answered; how many were dropped as "can't tell"). With
        `wait`, first block until no pair is pending, telling `show` how many still wait every `refresh_every`
        seconds and calling `check` (which may raise to stop) each time. Pairs leave `pending` only when this
        returns: if `check` raises, a checkpoint still holds every pair whose answer was not handed back (and the
        answers are in the log)."""
        answers: dict = {}  # pair id -> its answer, in the order they came
        try:
            while True:
                for answer in self._taken + self.server.take_labels():
                    if answer.pair_id in self.pending:
                        answers[answer.pair_id] = answer
                    else:
                        self.ignored += 1
                self._taken = []
                waiting = [pair_id for pair_id in self.pending if pair_id not in answers]
                if not wait or not waiting:
                    break
                show(len(waiting))
                tick = time.monotonic() + self.refresh_every
                stop = _StopFlag(lambda tick=tick: stopping() or time.monotonic() > tick)
                self.server.wait_until_labelled(waiting, stop=stop)
                check()
        except BaseException:
            self._taken = list(answers.values())  # taken from the server: a later collect hands them back
            raise
        answered, dropped = [], 0
        for pair_id, answer in answers.items():
            pair = self.pending.pop(pair_id)
            if answer.label is None:
                dropped += 1
            else:
                pair.labels = torch.full_like(pair.labels, answer.label)
                answered.append(pair)
        return answered, dropped

    def state_dict(self) -> dict:
        ids = list(self.pending)
        rows = cat_pairs(list(self.pending.values())) if ids else None
        return {
            "ids": ids,
            "pairs": None if rows is None else {name: getattr(rows, name).cpu() for name in FIELDS},
            "port": self.server.port if self.server is not None else self.port or self.previous_port,
        }

    def load_state_dict(self, state: dict, device: torch.device | str) -> None:
        self.pending = {}
        self.previous_port = int(state.get("port", 0))  # absent from checkpoints of older versions
        if state["ids"]:
            rows = PairBatch(*(state["pairs"][name].to(device) for name in FIELDS))
            for index, pair_id in enumerate(state["ids"]):
                self.pending[int(pair_id)] = rows.select(slice(index, index + 1))

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()


def make_teacher(args: Any) -> Teacher:
    """The teacher a run's flags (agents.pipeline.learner.PreferenceArgs) ask for."""
    if args.teacher == "bpref":
        return args.bpref_teacher()
    if args.teacher == "replay":
        return ReplayTeacher.from_log(args.labels)
    if args.teacher == "human":
        return HumanTeacher(args.label_port, max_pending=args.pair_buffer, mode=args.label_mode, env_id=args.env_id)
    return ReturnTeacher(args.teacher)
