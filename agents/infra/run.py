"""The life of a training run, shared by every algorithm script: flags or resume, device and threads, the run
directory and its TensorBoard writer, progress, checkpoints, stopping on signals, completion.

An algorithm is any object with `global_step`, `train()`, `state_dict()`, `load_state_dict()` and `close()`, built
by `build(args, device, run)`; `launch` does the rest:

    launch("drlhf", Args, argv, __doc__, build)

A checkpoint records the algorithm, every flag and the algorithm's state. `--resume` restores all of them and
accepts, besides, only the flags an Args class lists in `RESUMABLE` (budget, cadences, device, progress); a flag
that would change the run itself (algorithm, environment, network or schedule) is refused with one line.

SIGINT (Ctrl-C) and SIGTERM (`timeout`, Slurm, preemption) ask the run to stop: it finishes the step it is in,
saves a checkpoint, prints the command that continues it and exits with 130 or 143. A second signal once that
save is under way (or during any periodic save) waits for it; a second signal before, while the step is still
running, stops at once without saving (exit 130 or 143), leaving the last checkpoint as it was.
"""

from __future__ import annotations

import os
import random
import shlex
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from agents.infra.checkpoint import CHECKPOINT_NAME, load_checkpoint, save_atomic
from agents.infra.cli import (
    CHECKING_FLAGS,
    FlagsChecked,
    UsageError,
    explicit_flags,
    flag_name,
    hyperparameter_table,
    make_run_name,
    parse_args,
    require,
)


class Algorithm(Protocol):
    global_step: int

    def train(self) -> None: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...

    def close(self) -> None: ...


# ---------------------------------------------------------------------------------------------------------------
# Device, threads, seeds


def seed_everything(seed: int, torch_deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = torch_deterministic
    if torch_deterministic:
        torch.backends.cudnn.benchmark = False


def pick_device(cuda: bool) -> torch.device:
    return torch.device("cuda" if cuda and torch.cuda.is_available() else "cpu")


def limit_cpu_threads(obs_shape: tuple[int, ...] | None = None) -> None:
    """Use every core the process may run on (CI machines have 2), unless the user already set OMP_NUM_THREADS.

    Networks on small observations (MinAtar's 10x10 boards) run fastest on one thread: their per-layer work is too
    small to split, and two threads spend most of an update waiting on each other (figures: docs/performance.md).
    """
    if "OMP_NUM_THREADS" in os.environ:
        return
    small = obs_shape is not None and int(np.prod(obs_shape)) < 84 * 84
    torch.set_num_threads(1 if small else max(1, len(os.sched_getaffinity(0))))


def prepare(args: Any) -> torch.device:
    """Threads, seeds and device."""
    limit_cpu_threads()
    seed_everything(args.seed, args.torch_deterministic)
    return pick_device(args.cuda)


# ---------------------------------------------------------------------------------------------------------------
# Logging and progress


class Logger:
    """TensorBoard scalars; a no-op until a writer is attached (benchmarks and tests run without a run directory)."""

    def __init__(self):
        self.writer = None

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(tag, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class Progress:
    """A progress bar over env steps that names the phase and shows SPS and an ETA.

    The ETA divides the steps left by the speed measured since learning started (reward phases included), so the
    fast random-action phase at the start does not make a 30-hour run look like a 30-minute one.
    """

    def __init__(self, total: int, enabled: bool, learning_starts: int = 0):
        self.total = total
        self.enabled = enabled
        self.learning_starts = learning_starts
        self.bar = None  # opened by `start`, once the run is built: bad input must print its error alone
        self.n = 0
        self.phase = "start"
        self.extra = ""
        self._start = (time.time(), 0)
        self._learning_start: tuple[float, int] | None = None

    def start(self) -> None:
        from tqdm import tqdm

        self.bar = tqdm(
            total=self.total,
            initial=self.n,
            disable=not self.enabled,
            unit="step",
            dynamic_ncols=True,
            bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]",
        )

    def restart_clock(self, step: int) -> None:
        self.n = step
        self._start = (time.time(), step)
        self._learning_start = None

    def set_phase(self, phase: str) -> None:
        self.phase = phase
        self.refresh()

    def update(self, step: int, extra: str = "") -> None:
        self.n = step
        self.extra = extra
        if self._learning_start is None and step > self.learning_starts:
            self._learning_start = (time.time(), step)

    def sps(self, step: int) -> float:
        start_time, start_step = self._start
        return (step - start_step) / max(time.time() - start_time, 1e-9)

    def exclude_from_eta(self, seconds: float) -> None:
        """Leave `seconds` of waiting (for a person's labels) out of the speed the ETA extrapolates."""
        if self._learning_start is not None:
            start_time, start_step = self._learning_start
            self._learning_start = (start_time + seconds, start_step)

    def eta_seconds(self) -> float | None:
        if self._learning_start is None:
            return None
        start_time, start_step = self._learning_start
        done = self.n - start_step
        if done <= 0:
            return None
        return (self.total - self.n) * (time.time() - start_time) / done

    def refresh(self) -> None:
        if self.bar is None:
            return
        eta = self.eta_seconds()
        eta_text = (
            "-" if eta is None else time.strftime("%H:%M:%S", time.gmtime(eta)) if eta < 86400 else f"{eta / 3600:.0f}h"
        )
        self.bar.n = self.n
        self.bar.set_postfix_str(f"phase={self.phase} SPS={self.sps(self.n):.0f} ETA={eta_text} {self.extra}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------------------------------------------------------
# Stopping


class StopTraining(Exception):
    """Raised at a step boundary after SIGINT or SIGTERM: the run saves and exits."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopNow(KeyboardInterrupt):
    """A second SIGINT or SIGTERM while no save is under way: the run stops at once, without saving."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopSignals:
    """Turns SIGINT/SIGTERM into a request that the training loops honour at their next step boundary.

    Once the request has been honoured (`check` raised StopTraining) or while a checkpoint is being written
    (`saving`), further signals are only recorded: the save is never interrupted half-way.
    """

    def __init__(self):
        self.signum: int | None = None
        self.saving = False
        self.stopping = False  # StopTraining was raised: the run is saving and exiting
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.signum is None or self.saving or self.stopping:
            self.signum = self.signum or signum
            return
        raise StopNow(signum)  # a second signal outside a save: stop now; the last checkpoint stays as it was

    def check(self) -> None:
        """Call at step boundaries: raises StopTraining once a signal has arrived."""
        if self.signum is not None:
            self.stopping = True
            raise StopTraining(self.signum)


EXIT_STATUS = {signal.SIGINT: 130, signal.SIGTERM: 143}


# ---------------------------------------------------------------------------------------------------------------
# The run


@dataclass
class Run:
    """What an algorithm needs from its run: logging, progress, stop requests and a way to checkpoint."""

    args: Any
    algo: str
    logger: Logger
    progress: Progress
    signals: StopSignals
    directory: Path | None = None
    save_hook: Callable[[], None] | None = None

    @property
    def checkpoint_path(self) -> Path | None:
        return None if self.directory is None else self.directory / CHECKPOINT_NAME

    def save(self) -> None:
        if self.save_hook is not None:
            self.signals.saving = True
            try:
                self.save_hook()
            finally:
                self.signals.saving = False


def detached_run(args: Any, algo: str = "") -> Run:
    """A run with no directory, no progress bar and no signal handling: for benchmarks and tests."""
    return Run(args, algo, Logger(), Progress(args.total_timesteps, False), StopSignals())


def resumable_flags(args_cls: type) -> set[str]:
    return set(args_cls.RESUMABLE) | {"resume"}


def parse_or_resume(
    args_cls: type, argv: Sequence[str] | None, description: str | None, algo: str
) -> tuple[Any, dict | None]:
    """Parse the flags; with --resume the checkpoint's flags apply, and only `RESUMABLE` flags may change."""
    args = parse_args(args_cls, argv, description)
    if not args.resume:
        return args, None
    state = load_checkpoint(args.resume)
    saved_algo = state.get("algo")
    require(
        saved_algo == algo,
        f"--resume {args.resume}: the checkpoint is a {saved_algo!r} run; resume it with --algo {saved_algo}",
    )
    saved, explicit = state["args"], explicit_flags(args_cls, argv)
    allowed = resumable_flags(args_cls)
    # A flag the checkpoint does not record is newer than the run, which therefore ran with its default.
    recorded = lambda name: saved.get(name, args_cls.__dataclass_fields__[name].default)
    for name in sorted(explicit - allowed):
        if recorded(name) != getattr(args, name):
            raise UsageError(
                f"--resume {args.resume}: {flag_name(name)} {getattr(args, name)} differs from the run's "
                f"{recorded(name)!r}; a resumed run may change only {', '.join(sorted(map(flag_name, allowed)))}"
            )
    merged = {k: (getattr(args, k) if k in explicit else saved.get(k, getattr(args, k))) for k in vars(args)}
    merged["resume"] = args.resume
    return args_cls(**merged), state


def run_directory(args: Any, state: dict | None) -> Path:
    if state is None:
        return Path(args.runs_dir) / (args.run_name or make_run_name(args.env_id, args.exp_name, args.seed))
    resume = Path(args.resume)
    return resume if resume.is_dir() else resume.parent


def check_writable(directory: Path, flag: str) -> None:
    """Refuse a directory that cannot be created or written, before anything is built."""
    parent = directory
    while not parent.exists():
        parent = parent.parent
    require(parent.is_dir(), f"{flag} {directory}: {parent} is not a directory")
    require(os.access(parent, os.W_OK | os.X_OK), f"{flag} {directory}: {parent} is not writable")


def open_writer(args: Any, directory: Path, purge_step: int | None):
    from torch.utils.tensorboard import SummaryWriter

    if args.track:
        import wandb

        wandb.init(
            project=args.wandb_project_name,
            entity=args.wandb_entity or None,
            sync_tensorboard=True,
            config=vars(args),
            name=directory.name,
            save_code=True,
        )
    # purge_step hides anything a killed run logged after its checkpoint, so resumed curves continue without overlap.
    writer = SummaryWriter(str(directory), purge_step=purge_step)
    if purge_step is None:
        writer.add_text("hyperparameters", hyperparameter_table(args))
    return writer


def launch(
    algo: str,
    args_cls: type,
    argv: Sequence[str] | None,
    description: str | None,
    build: Callable[[Any, torch.device, Run], Algorithm],
) -> Algorithm:
    """Parse (or resume), validate, build, then train to completion with checkpoints and signal handling."""
    args, state = parse_or_resume(args_cls, argv, description, algo)
    args.validate()
    directory = run_directory(args, state)
    directory_flag = "--runs-dir" if state is None else "--resume"
    check_writable(directory, directory_flag)
    if state is None and directory.is_dir() and any(directory.iterdir()):
        raise UsageError(
            f"--run-name {args.run_name}: {directory} already holds files; continue a stopped run with --resume "
            f"{directory}"
        )
    if CHECKING_FLAGS.get():
        raise FlagsChecked()
    device = prepare(args)
    run = Run(args, algo, Logger(), Progress(args.total_timesteps, args.progress, args.learning_starts), StopSignals())
    algorithm = build(args, device, run)  # raises UsageError for bad settings before the run directory exists
    created = [d for d in (directory, *directory.parents) if not d.exists()]  # what this run will create
    try:
        if state is not None:
            algorithm.load_state_dict(state["algorithm"])
            require(
                algorithm.global_step <= args.total_timesteps,
                f"--total-timesteps {args.total_timesteps}: the run in --resume {args.resume} is already at step "
                f"{algorithm.global_step:,}; give at least that",
            )
        else:  # notes about the flags a run started with: a resumed run heard them when it started
            for note in args.budget_notes():
                print(f"note: {note}", file=sys.stderr, flush=True)
        run.directory = directory
        run.progress.start()
        try:
            run.logger.writer = open_writer(args, directory, None if state is None else algorithm.global_step)
        except OSError as err:  # e.g. a full disk, or a directory that became unwritable since the check
            raise UsageError(f"{directory_flag} {directory}: {err}") from None
        run.save_hook = lambda: save_atomic(
            {
                "algo": algo,
                "args": vars(args).copy(),
                "global_step": algorithm.global_step,
                "algorithm": algorithm.state_dict(),
            },
            run.checkpoint_path,
        )
        resumed = "" if state is None else f", resumed at step {algorithm.global_step:,} of {args.total_timesteps:,}"
        print(f"run {directory.name} ({algo}) on {device}{resumed}: logs in {directory}", flush=True)
        run_to_completion(run, algorithm)
    except UsageError:
        # Bad input found only once training ran (a budget too small for one fragment, say): unless a checkpoint
        # was saved, the run leaves nothing behind, as bad input found before it started does.
        run.logger.close()
        if created:
            discard_unsaved_run(created)
        raise
    finally:
        algorithm.close()
        run.progress.close()
        run.logger.close()
    return algorithm


def discard_unsaved_run(created: Sequence[Path]) -> None:
    """Remove the run directory and the folders above it that this process created (`created`, the run directory
    first), if it holds no checkpoint: only this process's event files are deleted, and only empty folders."""
    directory = created[0]
    if not directory.is_dir() or (directory / CHECKPOINT_NAME).exists():
        return
    for path in directory.iterdir():
        if path.is_file() and "tfevents" in path.name and path.name.split(".")[-2:-1] == [str(os.getpid())]:
            path.unlink()
    for folder in created:
        try:
            folder.rmdir()
        except OSError:  # not empty (or gone): leave it, and the folders above it, alone
            return


def resume_command(run: Run) -> str:
    """The command line that continues `run`, to be run from the current directory: the checkpoint holds every flag,
    so the script and the run directory are all it needs."""
    entry = Path(sys.argv[0]).as_posix() if sys.argv and sys.argv[0].endswith(".py") else "sobirl/beamrider.py"
    algo = ["--algo", run.algo] if entry.endswith("beamrider.py") else []
    return shlex.join(["python", entry, *algo, "--resume", str(run.directory)])


def clock_text(seconds: float) -> str:
    """A duration as h:mm:ss (or m:ss under an hour)."""
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def finished_message(steps: int, seconds: float, last_return: float | None, directory: Path | None) -> str:
    """The line a run prints when it ends normally, so that a run without a progress bar does not end in silence."""
    game = "" if last_return is None else f", last game's return {last_return:g}"
    where = "" if directory is None else f"; curves: tensorboard --logdir {shlex.quote(str(directory))}"
    return f"done: {steps:,} env steps in {clock_text(seconds)} (this process){game}{where}"


def run_to_completion(run: Run, algorithm: Algorithm) -> None:
    """Train; a stop signal saves a checkpoint first (exit 130 or 143); the end of training saves one too."""
    run.signals.install()
    started = time.time()
    try:
        try:
            algorithm.train()
            run.save()
            run.progress.close()  # the bar's last line first: the message must not land on the bar's line
            seconds, last_return = time.time() - started, getattr(algorithm, "last_score", None)
            print(finished_message(algorithm.global_step, seconds, last_return, run.directory), flush=True)
        except StopTraining as stop:
            run.save()
            print(
                f"\n{stop} at step {algorithm.global_step}: checkpoint saved; continue with: {resume_command(run)}",
                file=sys.stderr,
                flush=True,
            )
            raise SystemExit(EXIT_STATUS[stop.signum]) from None
    except KeyboardInterrupt as interrupt:  # StopNow (a second signal), or Ctrl-C with the handlers not installed
        last = (
            f"the last checkpoint, in {run.directory}, is unchanged"
            if run.checkpoint_path is not None and run.checkpoint_path.exists()
            else "no checkpoint was written"
        )
        print(f"\nstopped at step {algorithm.global_step} without saving; {last}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_STATUS.get(getattr(interrupt, "signum", signal.SIGINT), 130)) from None
    finally:
        run.signals.uninstall()
