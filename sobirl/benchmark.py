"""The MinAtar benchmarks: declared arms x games x seeds, run by resumable local workers, results kept as data.

    python sobirl/benchmark.py list main                 # every job's full command; runs nothing
    python sobirl/benchmark.py run main --workers 2      # skips finished runs, resumes stopped ones, starts the rest
    python sobirl/benchmark.py status main               # finished / partial / pending per arm x game
    python sobirl/benchmark.py report main               # tables and figures from docs/results/main alone

A benchmark is declared once, below (BENCHMARKS): its games, its budget, the flags every run shares and its arms
(name, algorithm, flags, how many seeds). Each run has a fixed folder, runs/bench/<bench>/<game>/<arm>/seed<k>,
so a stopped benchmark continues where it was: `run` skips runs whose results file exists, resumes runs that
saved a checkpoint (`--resume`), and starts the others, seed-major (every arm has the same seeds at any moment).
Ctrl-C or SIGTERM stops every running job with a checkpoint and exits; the next `run` goes on.

When a run finishes, its summary goes to docs/results/<bench>/<game>/<arm>/seed<k>.json (see `summarize_run`):
meant to be committed, so `report` rebuilds every table and figure without runs/.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from argparse import ArgumentDefaultsHelpFormatter
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from pathlib import Path

from agents.infra.cli import OneLineErrorParser, UsageError, require, run_cli

REPO = Path(__file__).resolve().parent.parent
ENTRY_POINT = "sobirl/beamrider.py"
RESULT_FORMAT = "sobirl-benchmark-result"
RESULT_VERSION = 1
GRID_POINTS = 20  # points of the fixed step grid every summary's curves are kept on
FINAL_FRACTION = 0.1  # final return: mean true score of the last 10% of a run's games
STOPPED = {signal.SIGINT: 130, signal.SIGTERM: 143}


# ---------------------------------------------------------------------------------------------------------------
# Declarations


@dataclasses.dataclass(frozen=True)
class Arm:
    name: str  # folder and legend key; also the run's --exp-name
    algo: str  # --algo of sobirl/beamrider.py
    flags: tuple[str, ...] = ()
    label: str = ""  # legend text
    seeds: int = 5  # the arm runs seeds 1..seeds
    frozen_from: str = ""  # SAC from scratch on the final reward model of this arm's run (same game and seed)
    demos: bool = False  # AIHF: --demos, recorded from the benchmark's demonstration source (Benchmark.demos)
    # Label efficiency: the arm (of this benchmark or of its baselines_from) whose label curve this arm is a point
    # of, at the labels its runs use (Benchmark.labels).
    curve: str = ""

    @property
    def title(self) -> str:
        return self.label or self.name


@dataclasses.dataclass(frozen=True)
class Benchmark:
    name: str
    description: str
    games: tuple[str, ...]
    steps: int  # env steps of every run
    common: tuple[str, ...]  # flags every run shares
    arms: tuple[Arm, ...]
    # Scores are normalised per game as (score - random) / (sac - random) with these arms' mean final returns,
    # taken from `baselines_from` (another benchmark's results) when this one does not run them.
    random_arm: str = "random"
    reference_arm: str = "sac"
    baselines_from: str = ""
    # "X vs Y" comparisons whose probability of improvement the report gives.
    comparisons: tuple[tuple[str, str], ...] = ()
    # Whether its summaries belong in docs/results (committed); otherwise they stay under the runs folder.
    committed: bool = True
    # Where demonstrations come from (arms with demos=True): (benchmark, arm, seed, steps): the finished run of that
    # arm and seed on each game, whose policy `sobirl/demos.py record` plays for that many steps (whole games kept).
    demos: tuple[str, str, int, int] | None = None
    # Its seeds are seed_offset + 1 ... seed_offset + each arm's count (a pilot on seeds the benchmarks it informs
    # do not use, so that choosing by its results does not select on those benchmarks' own runs).
    seed_offset: int = 0

    @property
    def arm_names(self) -> tuple[str, ...]:
        return tuple(arm.name for arm in self.arms)

    def arm(self, name: str) -> Arm:
        for arm in self.arms:
            if arm.name == name:
                return arm
        raise UsageError(f"benchmark {self.name} has no arm {name!r} (its arms: {', '.join(self.arm_names)})")

    def labels(self, arm: Arm) -> int | None:
        """The --total-pairs an arm's runs get (the last one given wins, as on the command line); None if not set."""
        flags = (*self.common, *arm.flags)
        given = [k for k, flag in enumerate(flags[:-1]) if flag == "--total-pairs"]
        return int(flags[given[-1] + 1]) if given else None


# The proving-ground settings: SAC as in the paper except a 100k replay and 5k random steps; the paper's preference
# schedule scaled to 100k steps: 5k SAC steps per outer iteration, 100 warm-up pairs x 100 epochs, 1,000 labels in
# 20 iterations, 25-step fragments, oracle teacher; every bilevel term on from 20k steps.
# A checkpoint every 25k steps (the replay included), so a machine that goes away mid-run costs at most a quarter run.
PROVING_GROUND = ("--buffer-size", "100000", "--learning-starts", "5000", "--save-every", "25000")


def preference_budget(labels: int, iterations: int = 20, initial: int = 0) -> tuple[str, ...]:
    """The preference flags of `labels` labels over `iterations` outer iterations of 5k SAC steps; the warm-up
    labels `initial` pairs (default a tenth of the labels) and trains on them for 100 epochs."""
    return (
        "--inner-steps", "5000", "--initial-pairs", str(initial or labels // 10), "--warmup-epochs", "100",
        "--total-pairs", str(labels), "--schedule-iterations", str(iterations), "--pair-buffer", str(labels),
    )  # fmt: skip


PREF = preference_budget(1000)
SMOKE_PREF = ("--inner-steps", "500", "--initial-pairs", "10", "--warmup-epochs", "2", "--total-pairs", "30",
              "--schedule-iterations", "3", "--pair-buffer", "30", "--fragment-length", "10")  # fmt: skip
RANDOM = Arm("random", "sac", ("--learning-starts", "100000000"), "Random policy", seeds=10)
SAC = Arm("sac", "sac", (), "SAC-discrete (true reward)", seeds=10)
DRLHF = Arm("drlhf", "drlhf", PREF, "DRLHF", seeds=10)
SOBIRL = Arm("sobirl", "sobirl", (*PREF, "--hyper-start", "20000"), "SoBiRL as specified", seeds=10)
SOBIRL_CORRECTED = Arm(
    "sobirl_corrected",
    "sobirl",
    (*PREF, "--hyper-start", "20000", "--implicit-correction", "ratio-baseline"),
    "SoBiRL, ratio-baseline correction",
    seeds=10,
)


def penalty_flags(sigma: str) -> tuple[str, ...]:
    """The penalty method (PBRL) at the main budget: each agent half the env steps, the value gap on from 20k."""
    return (*PREF, "--penalty-start", "20000", "--inner-split", "half", "--sigma", sigma)


def at_labels(source: Arm, labels: int) -> Arm:
    """`source`, an arm of the main budget (its flags begin with PREF), at `labels` labels: a point of its curve."""
    assert source.flags[: len(PREF)] == PREF, source.name
    flags = (*preference_budget(labels), *source.flags[len(PREF) :])
    return Arm(f"{source.name}_{labels}", source.algo, flags, f"{source.title}, {labels:,} labels", curve=source.name)


BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        Benchmark(
            "main",
            "Every preference method against random play and SAC on the true reward, on three MinAtar games at "
            "equal env steps (100k) and label budget (1,000, of which a run uses 935: the query schedule's last two "
            "batches fall after its last step); the authors' pipeline (--reference-quirks) beside ours.",
            games=("SpaceInvaders", "Breakout", "Seaquest"),
            steps=100_000,
            common=PROVING_GROUND,
            arms=(
                RANDOM,
                SAC,
                DRLHF,
                SOBIRL,
                SOBIRL_CORRECTED,
                Arm(
                    "sobirl_quirks",
                    "sobirl",
                    (*PREF, "--hyper-start", "20000", "--reference-quirks"),
                    "SoBiRL, the authors' pipeline",
                ),
                Arm("drlhf_quirks", "drlhf", (*PREF, "--reference-quirks"), "DRLHF, the authors' pipeline"),
                # The frozen-reward check: a fresh SAC on each run's final reward model.
                Arm("drlhf_frozen", "sac", (), "SAC on DRLHF's final reward", seeds=3, frozen_from="drlhf"),
                Arm("sobirl_frozen", "sac", (), "SAC on SoBiRL's final reward", seeds=3, frozen_from="sobirl"),
                Arm(
                    "sobirl_corrected_frozen",
                    "sac",
                    (),
                    "SAC on corrected SoBiRL's final reward",
                    seeds=3,
                    frozen_from="sobirl_corrected",
                ),
            ),
            comparisons=(
                ("sobirl", "drlhf"),
                ("sobirl_corrected", "drlhf"),
                ("sobirl_corrected", "sobirl"),
                ("sobirl_quirks", "drlhf_quirks"),
                ("drlhf", "sac"),
            ),
        ),
        Benchmark(
            "pilot",
            "Which third game for main: SAC on the true reward against random play on MinAtar Seaquest and Freeway "
            "at main's settings (100k env steps), 3 seeds each (seeds 201-203, which no other benchmark uses). The "
            "rule: a game qualifies when SAC's lowest final return is above random play's highest. Main's choice of "
            "Seaquest was made on 2026-12-02 from an earlier run of this pilot on seeds 1-3, whose summaries were not "
            "committed (final return per seed: Seaquest SAC 0.69, 0.63, 0.56, random 0.09, 0.09, 0.13; Freeway SAC "
            "0.25, 0.50, 0.50, random 0.25, 0.75, 0.25); these runs repeat it on fresh seeds, with their data kept.",
            games=("Seaquest", "Freeway"),
            steps=100_000,
            common=PROVING_GROUND,
            arms=(dataclasses.replace(RANDOM, seeds=3), dataclasses.replace(SAC, seeds=3)),
            random_arm="",
            reference_arm="",
            seed_offset=200,
        ),
        Benchmark(
            "sigma",
            "Pilot for the penalty method's sigma (one number on both sides, in units of the discounted return): three "
            "values a decade apart on MinAtar SpaceInvaders at the main benchmark's budget, 2 seeds each (seeds 101 "
            "and 102, which no other benchmark uses), to choose the sigma of the peers benchmark before its runs. "
            "The rule, fixed before the pilot ran: the highest mean final return over the two seeds; where the runs' "
            "ranges overlap, the highest mean Spearman correlation of learned and true return on fresh fragments.",
            games=("SpaceInvaders",),
            steps=100_000,
            common=PROVING_GROUND,
            arms=tuple(
                Arm(f"penalty_sigma{sigma}", "penalty", penalty_flags(sigma), f"penalty, sigma = {sigma}", seeds=2)
                for sigma in ("1", "10", "100")
            ),
            baselines_from="main",
            seed_offset=100,
        ),
        Benchmark(
            "peers",
            "The peer methods of the source papers on the main benchmark's games and budget: A-PARL with PARL's "
            "mixed term (eq. 17), AIHF with w1 = 0.01 fixed before the runs (demonstrations: 10k steps of each game's "
            "SAC seed-1 policy from main), the penalty method (PBRL, each agent half the steps) at sigma = 100, chosen "
            "by the sigma pilot's rule (sigma = 10 had the highest mean return, 6.60 against 6.31, but the two "
            "arms' ranges over their seeds overlapped, and sigma = 100's fresh-fragment Spearman was 0.71 against "
            "0.25), 5 seeds; random play, SAC and DRLHF come from main.",
            games=("SpaceInvaders", "Breakout", "Seaquest"),
            steps=100_000,
            common=PROVING_GROUND,
            arms=(
                Arm("parl", "parl", (*PREF, "--parl-start", "20000"), "A-PARL (PARL's mixed term)"),
                Arm("aihf", "aihf", (*PREF, "--demo-weight", "0.01"), "AIHF, w1 = 0.01", demos=True),
                Arm("penalty", "penalty", penalty_flags("100"), "penalty, sigma = 100"),
            ),
            baselines_from="main",
            comparisons=(("parl", "drlhf"), ("aihf", "drlhf"), ("penalty", "drlhf")),
            demos=("main", "sac", 1, 10_000),
        ),
        Benchmark(
            "labels",
            "Label efficiency on MinAtar SpaceInvaders: DRLHF and the corrected SoBiRL at 250, 500 and 2,000 labels, "
            "5 seeds each, at the main benchmark's steps and schedule (the warm-up a tenth of the labels); the "
            "1,000-label points are main's runs. The SoBiRL variant is the one main puts first among its SoBiRL arms, "
            "the ratio-baseline correction: first at one seed per game when this benchmark was declared, and again "
            "in main's 5-seed aggregate.",
            games=("SpaceInvaders",),
            steps=100_000,
            common=PROVING_GROUND,
            arms=tuple(
                at_labels(source, labels) for source in (DRLHF, SOBIRL_CORRECTED) for labels in (250, 500, 2000)
            ),
            baselines_from="main",
        ),
        Benchmark(
            "robustness",
            "DRLHF and the corrected SoBiRL under B-Pref's imperfect teachers and with uncertainty-based query "
            "selection, on MinAtar Breakout at half the main budget (50k steps, 500 labels).",
            games=("Breakout",),
            steps=50_000,
            common=("--buffer-size", "50000", "--learning-starts", "5000", *preference_budget(500, 10, initial=100)),
            arms=tuple(
                Arm(
                    f"{method}_{teacher}_{selection}",
                    algo,
                    (*method_flags, *teacher_flags, *selection_flags),
                    f"{title}, {teacher}, {selection}",
                    seeds=3,
                )
                for method, algo, method_flags, title in (
                    ("drlhf", "drlhf", (), "DRLHF"),
                    (
                        "sobirl_corrected",
                        "sobirl",
                        ("--hyper-start", "20000", "--implicit-correction", "ratio-baseline"),
                        "SoBiRL corrected",
                    ),
                )
                for teacher, teacher_flags in (
                    ("oracle", ("--teacher", "oracle")),
                    *((t, ("--teacher", "bpref", "--bpref-preset", t)) for t in ("mistake", "noisy", "skip", "myopic")),
                )
                for selection, selection_flags in (
                    ("uniform", ()),
                    ("ensemble-uniform", ("--ensemble", "3")),
                    ("disagreement", ("--ensemble", "3", "--query-selection", "disagreement")),
                )
                if selection == "uniform" or teacher in ("oracle", "mistake")
            ),
            random_arm="",
            reference_arm="",
        ),
        Benchmark(
            "quickstart",
            "DRLHF, SoBiRL as specified and SoBiRL with the ratio-baseline correction on MinAtar Breakout: 50k env "
            "steps and a 500-label budget each, one seed (a first look, not evidence).",
            games=("Breakout",),
            steps=50_000,
            common=("--buffer-size", "50000", "--learning-starts", "5000", *preference_budget(500, 10)),
            arms=(
                Arm("drlhf", "drlhf", (), "DRLHF", seeds=1),
                Arm("sobirl", "sobirl", ("--hyper-start", "20000"), "SoBiRL as specified", seeds=1),
                Arm(
                    "sobirl_corrected",
                    "sobirl",
                    ("--hyper-start", "20000", "--implicit-correction", "ratio-baseline"),
                    "SoBiRL, ratio-baseline correction",
                    seeds=1,
                ),
            ),
            random_arm="",
            reference_arm="",
            committed=False,
        ),
        Benchmark(
            "smoke",
            "A one-minute check of the harness itself (tiny budgets; its numbers mean nothing).",
            games=("Breakout",),
            steps=2_000,
            common=("--buffer-size", "2000", "--learning-starts", "500", "--batch-size", "16", "--save-every", "500"),
            arms=(
                Arm("random", "sac", ("--learning-starts", "100000000"), seeds=2),
                Arm("sac", "sac", (), seeds=2),
                Arm("drlhf", "drlhf", SMOKE_PREF, seeds=2),
                Arm("drlhf_frozen", "sac", (), seeds=1, frozen_from="drlhf"),
                Arm("aihf", "aihf", (*SMOKE_PREF, "--demo-batch", "8"), seeds=1, demos=True),
            ),
            comparisons=(("drlhf", "sac"),),
            demos=("smoke", "sac", 1, 1000),
            committed=False,
        ),
    )
}


def env_id(game: str) -> str:
    return f"MinAtar/{game}-v1"


# ---------------------------------------------------------------------------------------------------------------
# Jobs


@dataclasses.dataclass(frozen=True)
class Layout:
    runs: Path  # runs/bench: run folders and job logs (ignored by git)
    results: Path  # docs/results: one summary per finished run (committed)


@dataclasses.dataclass(frozen=True)
class Job:
    bench: Benchmark
    game: str
    arm: Arm
    seed: int
    rerun: bool = False  # run again although a summary exists: its run folder, which a dependent needs, was lost

    @property
    def key(self) -> str:
        return f"{self.bench.name}/{self.game}/{self.arm.name}/seed{self.seed}"

    def run_dir(self, layout: Layout) -> Path:
        return layout.runs / self.bench.name / self.game / self.arm.name / f"seed{self.seed}"

    def log_path(self, layout: Layout) -> Path:
        return self.run_dir(layout).with_suffix(".log")

    def attempts_path(self, layout: Layout) -> Path:
        return self.run_dir(layout).with_suffix(".attempts.jsonl")

    def lock_path(self, layout: Layout) -> Path:
        return self.run_dir(layout).with_suffix(".lock")

    def result_path(self, layout: Layout) -> Path:
        return layout.results / self.bench.name / self.game / self.arm.name / f"seed{self.seed}.json"

    @property
    def source(self) -> Job | None:
        """The run this job needs finished first: the one whose final reward model a frozen-reward job trains on,
        or the one whose policy records an AIHF job's demonstrations."""
        if self.arm.frozen_from:
            return Job(self.bench, self.game, self.bench.arm(self.arm.frozen_from), self.seed)
        if self.arm.demos:
            bench_name, arm_name, seed, _ = self.bench.demos
            bench = BENCHMARKS[bench_name]
            return Job(bench, self.game, bench.arm(arm_name), seed)
        return None

    def demos_path(self, layout: Layout) -> Path:
        return layout.runs / self.bench.name / "demos" / f"{self.game}.npz"

    def demos_command(self, layout: Layout, python: str = "python") -> list[str]:
        """`sobirl/demos.py record` of the source run's policy: every whole game of the declared steps kept."""
        source, steps = self.source.run_dir(layout), self.bench.demos[3]
        return [python, "sobirl/demos.py", "record", "--checkpoint", str(source), "--steps", str(steps),
                "--out", str(self.demos_path(layout))]  # fmt: skip

    def flags(self, layout: Layout) -> list[str]:
        """Every flag of a fresh start, in the order the entry point reads them (later ones win in argparse, so the
        arm's flags follow the shared ones)."""
        run_dir = self.run_dir(layout)
        flags = ["--algo", self.arm.algo, "--env-id", env_id(self.game), "--seed", str(self.seed)]
        flags += ["--total-timesteps", str(self.bench.steps), *self.bench.common, *self.arm.flags]
        if self.arm.frozen_from:
            flags += ["--frozen-reward", str(self.source.run_dir(layout))]
        if self.arm.demos:
            flags += ["--demos", str(self.demos_path(layout))]
        flags += ["--exp-name", self.arm.name, "--runs-dir", str(run_dir.parent), "--run-name", run_dir.name]
        return flags + ["--no-progress"]

    def command(self, layout: Layout, python: str = "python") -> list[str]:
        return [python, ENTRY_POINT, *self.flags(layout)]

    def resume_command(self, layout: Layout, python: str = "python") -> list[str]:
        return [python, ENTRY_POINT, "--resume", str(self.run_dir(layout)), "--no-progress"]


def parse_seed_list(text: str) -> set[int] | None:
    """ "1-5,8" -> {1, 2, 3, 4, 5, 8}; "" -> None (every declared seed)."""
    if not text:
        return None
    seeds: set[int] = set()
    for part in text.split(","):
        low, _, high = part.strip().partition("-")
        try:
            first, last = int(low), int(high or low)
        except ValueError:
            raise UsageError(f"--seeds {text!r}: expected numbers and ranges like 1-5,8") from None
        require(0 < first <= last, f"--seeds {text!r}: seeds count from 1 and ranges go upwards")
        seeds.update(range(first, last + 1))
    return seeds


def select_jobs(
    bench: Benchmark, games: Sequence[str] = (), arms: Sequence[str] = (), seeds: set[int] | None = None
) -> list[Job]:
    """The benchmark's jobs, seed-major: seed 1 of every game and arm, then seed 2, ... (a benchmark stopped early
    compares every arm on the same seeds)."""
    for game in games:
        require(game in bench.games, f"--games {game}: benchmark {bench.name} plays {', '.join(bench.games)}")
    chosen_arms = [bench.arm(name) for name in arms] if arms else list(bench.arms)
    top, offset = max(arm.seeds for arm in chosen_arms), bench.seed_offset
    return [
        Job(bench, game, arm, seed)
        for seed in range(offset + 1, offset + top + 1)
        if seeds is None or seed in seeds
        for game in (games or bench.games)
        for arm in chosen_arms
        if seed - offset <= arm.seeds
    ]


# ---------------------------------------------------------------------------------------------------------------
# Where a job stands


def checkpoint_progress(run_dir: Path) -> tuple[int, int] | None:
    """(global step, total steps) of the run's checkpoint, or None when it has none."""
    from agents.infra.checkpoint import CHECKPOINT_NAME, load_checkpoint_metadata

    if not (run_dir / CHECKPOINT_NAME).is_file():
        return None
    meta = load_checkpoint_metadata(run_dir, flag="checkpoint")
    return int(meta["global_step"]), int(meta["args"]["total_timesteps"])


def job_state(job: Job, layout: Layout) -> str:
    """finished (summary written), complete (ran to the end; summary missing), partial (a checkpoint to resume),
    blocked (waits for the run it depends on, or for that run to be rerun: see `source_lost`) or pending."""
    if job.result_path(layout).is_file() and not job.rerun:
        return "finished"
    progress = checkpoint_progress(job.run_dir(layout))
    if progress is not None:
        step, total = progress
        return "complete" if step >= total else "partial"
    if job.source is not None and (
        source_lost(job, layout) or job_state(job.source, layout) not in ("finished", "complete")
    ):
        return "blocked"
    return "pending"


def source_lost(job: Job, layout: Layout) -> bool:
    """The job needs its source's run folder (the final reward model to freeze, or the policy to record
    demonstrations from), the source has its summary, and the folder is gone: the machine it ran on was lost between
    sessions. Such a source runs again in full and its new summary replaces the old one (git keeps the old), so that
    a frozen-reward check compares a reward model with the run that learned it."""
    source = job.source
    if source is None or job.result_path(layout).is_file() or (job.arm.demos and job.demos_path(layout).is_file()):
        return False
    progress = checkpoint_progress(source.run_dir(layout))  # a rerun part-way is still lost: its folder is not final
    return source.result_path(layout).is_file() and (progress is None or progress[0] < progress[1])


def with_lost_sources(jobs: Sequence[Job], layout: Layout) -> list[Job]:
    """The jobs with a rerun of each lost source (`source_lost`) queued just before the first job that needs it."""
    planned: list[Job] = []
    for job in jobs:
        if source_lost(job, layout) and not any(p.key == job.source.key for p in planned):
            planned.append(dataclasses.replace(job.source, rerun=True))
        planned.append(job)
    return planned


# ---------------------------------------------------------------------------------------------------------------
# Summaries


def git_commit() -> dict:
    """The commit of the working tree and whether the code (not results) differs from it."""

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return ""

    dirty = git("status", "--porcelain", "--", "agents", "wrappers", "sobirl", "pyproject.toml")
    return {"commit": git("rev-parse", "HEAD") or "unknown", "dirty": bool(dirty)}


def machine() -> dict:
    """What the numbers were measured on: CPU model, cores, AVX-512, torch version."""
    from importlib.metadata import PackageNotFoundError, version

    model, flags = "", ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not model:
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = line
    except OSError:
        pass
    try:
        torch_version = version("torch")
    except PackageNotFoundError:
        torch_version = "unknown"
    return {
        "cpu": model or platform.processor() or "unknown",
        "cores": len(os.sched_getaffinity(0)),
        "avx512": "avx512f" in flags,
        "torch": torch_version,
        "python": platform.python_version(),
    }


def grid_for(steps: int) -> list[int]:
    return [round(steps * (k + 1) / GRID_POINTS) for k in range(GRID_POINTS)]


def windowed_means(steps, values, grid: Sequence[int]) -> list[float | None]:
    """Mean of the values logged in each grid window (previous point, point], carried forward over windows with
    none (long games); None before the first."""
    import numpy as np

    steps, values = np.asarray(steps), np.asarray(values, dtype=np.float64)
    out, last, previous = [], None, 0
    for point in grid:
        inside = values[(steps > previous) & (steps <= point)]
        if len(inside):
            last = float(inside.mean())
        out.append(last)
        previous = point
    return out


def last_at(steps, values, grid: Sequence[int]) -> list[float | None]:
    """The last value logged at or before each grid point (a step function: labels used so far)."""
    import numpy as np

    steps, values = np.asarray(steps), np.asarray(values, dtype=np.float64)
    out = []
    for point in grid:
        seen = values[steps <= point]
        out.append(float(seen[-1]) if len(seen) else None)
    return out


def final_mean(values, fraction: float = FINAL_FRACTION) -> float | None:
    import numpy as np

    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if not len(values):
        return None
    return float(values[-max(1, math.ceil(fraction * len(values))) :].mean())


DIAGNOSTICS = {
    "bce": "reward/bce",
    "hyper_term": "reward/hyper_term",
    "extra_grad_ratio": "reward/extra_grad_ratio",
    "accuracy_fresh": "reward/accuracy_fresh",
    "accuracy_train": "reward/accuracy_train",
    "fresh_pearson": "reward/fresh_pearson",
    "fresh_spearman": "reward/fresh_spearman",
    "game_pearson": "reward/game_pearson",
    "game_spearman": "reward/game_spearman",
    "sac_reward_saturated": "reward/sac_reward_saturated",
    "offpolicy_share": "reward/offpolicy_share",
    "entropy": "losses/entropy",
}
DIAGNOSTIC_CURVES = ("accuracy_fresh", "game_spearman", "bce")


def summarize_run(job: Job, layout: Layout) -> dict:
    """The results record of a finished run, from its event files, checkpoint header and attempts log."""
    from agents.infra.checkpoint import load_checkpoint_metadata
    from sobirl.plot import load_run

    run_dir = job.run_dir(layout)
    scalars = load_run(run_dir)
    meta = load_checkpoint_metadata(run_dir, flag="checkpoint")
    attempts = read_attempts(job.attempts_path(layout))
    grid = grid_for(job.bench.steps)
    steps, returns = scalars.get("charts/episodic_return", ([], []))
    final_count = max(1, math.ceil(FINAL_FRACTION * len(returns))) if len(returns) else 0
    labels = scalars.get("reward/pairs_queried")
    diagnostics = {name: final_mean(scalars[tag][1]) for name, tag in DIAGNOSTICS.items() if tag in scalars}
    curves = {
        name: last_at(*scalars[DIAGNOSTICS[name]], grid) for name in DIAGNOSTIC_CURVES if DIAGNOSTICS[name] in scalars
    }
    started = [a for a in attempts if a.get("event") in ("start", "resume")]
    return {
        "format": RESULT_FORMAT,
        "version": RESULT_VERSION,
        "benchmark": job.bench.name,
        "game": job.game,
        "env_id": env_id(job.game),
        "arm": job.arm.name,
        "algo": meta.get("algo"),
        "seed": job.seed,
        "frozen_from": job.source.key if job.arm.frozen_from else None,
        "demos_from": job.source.key if job.arm.demos else None,
        "command": shlex.join(job.command(layout)),
        "flags": meta.get("args"),
        "global_step": int(meta["global_step"]),
        "commits": sorted({a["commit"] for a in started if a.get("commit")}),
        "dirty": any(a.get("dirty") for a in started),
        "machines": sorted({json.dumps(a["machine"], sort_keys=True) for a in started if a.get("machine")}),
        "device": next((a.get("device") for a in reversed(attempts) if a.get("device")), None),
        **attempt_times(attempts),
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "games_played": len(returns),
        "final_return": final_mean(returns) if len(returns) else None,
        "final_games": final_count,
        "labels": int(labels[1][-1]) if labels is not None else 0,
        "grid": grid,
        "return_curve": windowed_means(steps, returns, grid) if len(returns) else [None] * len(grid),
        "labels_curve": last_at(*labels, grid) if labels is not None else [0] * len(grid),
        "diagnostics": diagnostics,
        "diagnostic_curves": curves,
    }


def to_json(content: dict) -> str:
    """Strict JSON, one key per line, with lists of numbers kept on one line (curves stay readable in a diff)."""
    text = json.dumps(content, indent=1, allow_nan=False, default=str)
    return re.sub(r"\[\s*((?:-?[\d.e+-]+|null)(?:,\s*(?:-?[\d.e+-]+|null))*)\s*\]",
                  lambda m: "[" + re.sub(r",\s*", ", ", m.group(1)) + "]", text)  # fmt: skip


def write_json_atomic(path: Path, content: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(to_json(content) + "\n")
    os.replace(tmp, path)


def clean_json(value):
    """NaN and infinities become None (strict JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: clean_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean_json(v) for v in value]
    return value


def write_summary(job: Job, layout: Layout) -> Path:
    path = job.result_path(layout)
    write_json_atomic(path, clean_json(summarize_run(job, layout)))
    return path


def attempt_times(attempts: Sequence[dict]) -> dict:
    """A run's attempts (starts and resumes), the seconds their exits logged, and how many never logged an exit (a
    machine that went away): their time is missing from wall_seconds."""
    started = sum(a.get("event") in ("start", "resume") for a in attempts)
    exits = [a for a in attempts if a.get("event") == "exit"]
    return {
        "attempts": started,
        "wall_seconds": round(sum(a.get("seconds", 0.0) for a in exits), 1),
        "untimed_attempts": started - len(exits),
    }


def read_attempts(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    attempts = []
    for line in path.read_text().splitlines():
        try:
            attempts.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
    return attempts


def append_attempt(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


# ---------------------------------------------------------------------------------------------------------------
# Running


def lock_held(path: Path) -> bool:
    """Whether a live process holds this lock file."""
    from agents.infra.checkpoint import process_alive

    try:
        return process_alive(int(path.read_text().strip()))
    except (OSError, ValueError):
        return False


def claim(path: Path) -> bool:
    """Take the job's lock file for this process (atomically: O_EXCL), unless a live process holds it; a lock left
    by a dead process is taken over. Several `run`s of one benchmark can so share its queue."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            if lock_held(path):
                return False
            path.unlink(missing_ok=True)  # stale: its process died
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return True
    return False


class Runner:
    """Local workers, one job (one process, one thread) each; a stop signal is passed on to every running job."""

    def __init__(self, jobs: Sequence[Job], layout: Layout, workers: int):
        self.layout, self.workers = layout, workers
        self.queue = list(jobs)
        self.lock = threading.Condition()
        self.running: dict[str, subprocess.Popen] = {}
        self.taken: set[str] = set()  # jobs a worker has taken off the queue and not yet finished with
        self.stop_signal: int | None = None
        self.failed: list[tuple[Job, int]] = []
        self.done = 0
        self.durations: list[float] = []
        self.started_at = time.time()

    # -- scheduling ------------------------------------------------------------------------------------------------

    def source_progress(self, job: Job) -> str:
        """ready (no source, or it finished and no worker holds it), waiting (it is queued or held, here or in
        another `run`) or blocked (nobody will run it)."""
        source = job.source
        if source is None:
            return "ready"
        # `taken` covers the moment between a worker taking the source off the queue and claiming its lock. A source
        # whose final checkpoint is written is still held until its worker has logged the exit and the summary.
        held = source.key in self.taken or lock_held(source.lock_path(self.layout))
        if (
            not held
            and job_state(source, self.layout) in ("finished", "complete")
            and not source_lost(job, self.layout)
        ):
            return "ready"
        if held or any(queued.key == source.key for queued in self.queue):
            return "waiting"
        return "blocked"

    def next_job(self) -> Job | None:
        """The first queued job whose source run (if any) is finished; None when the queue is empty or stopped.
        Waits while the queued jobs wait on sources that are being run."""
        with self.lock:
            while True:
                if self.stop_signal is not None or not self.queue:
                    return None
                progress = [self.source_progress(job) for job in self.queue]
                if "ready" in progress:
                    job = self.queue.pop(progress.index("ready"))
                    self.taken.add(job.key)
                    return job
                for job, state in zip(list(self.queue), progress):
                    if state == "blocked":
                        print(f"blocked: {job.key} (needs {job.source.key}, which nobody is running)", flush=True)
                        self.queue.remove(job)
                self.lock.wait(timeout=5)

    def worker(self) -> None:
        while (job := self.next_job()) is not None:
            self.run_job(job)
            with self.lock:
                self.taken.discard(job.key)
                self.lock.notify_all()

    def eta(self) -> str:
        if not self.durations:
            return "-"
        left = len(self.queue) + len(self.running)
        seconds = left * (sum(self.durations) / len(self.durations)) / self.workers
        return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"

    def run_job(self, job: Job) -> None:
        lock = job.lock_path(self.layout)
        if not claim(lock):
            print(f"skipped: {job.key} (another `run` is on it)", flush=True)
            return
        try:
            self.run_claimed(job)
        finally:
            lock.unlink(missing_ok=True)

    def run_claimed(self, job: Job) -> None:
        layout, run_dir = self.layout, job.run_dir(self.layout)
        state = job_state(job, layout)
        if state == "finished":
            return
        if state == "complete":
            print(f"summary: {job.key} ({write_summary(job, layout)})", flush=True)
            return
        if job.arm.demos and not job.demos_path(layout).is_file() and not self.record_demos(job):
            return
        if state == "partial":
            event, command = "resume", job.resume_command(layout, sys.executable)
        else:
            event, command = "start", job.command(layout, sys.executable)
            if run_dir.exists():  # a start that died before its first checkpoint: nothing in it can be resumed
                shutil.rmtree(run_dir)
        attempts = job.attempts_path(layout)
        if job.rerun and event == "start" and attempts.is_file():  # the lost run's attempts are not this run's
            attempts.replace(attempts.with_suffix(".lost.jsonl"))
        append_attempt(attempts, {"event": event, "time": time.time(), **git_commit(), "machine": machine()})
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONUNBUFFERED": "1"}
        # The runs use this checkout's code, even where an editable install points at another checkout.
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")]))
        begin = time.time()
        with open(job.log_path(layout), "a") as log, self.lock:
            log.write(f"\n$ {shlex.join(command)}\n")
            log.flush()
            # A session of its own: a Ctrl-C in the terminal reaches the harness, which passes it on once.
            process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True)  # fmt: skip
            self.running[job.key] = process
            print(f"[{self.done} done, {len(self.running)} running, {len(self.queue)} queued, ETA {self.eta()}] "
                  f"{event}: {job.key}", flush=True)  # fmt: skip
        rc = process.wait()
        seconds = time.time() - begin
        device = device_of(job.log_path(layout))
        append_attempt(attempts, {"event": "exit", "time": time.time(), "rc": rc, "seconds": seconds, "device": device})
        with self.lock:
            self.running.pop(job.key, None)
            if rc == 0:
                self.done += 1
                self.durations.append(seconds)
        if rc == 0:
            print(f"finished: {job.key} in {seconds / 60:.1f} min -> {write_summary(job, layout)}", flush=True)
        elif rc in STOPPED.values() and self.stop_signal is not None:
            print(f"stopped: {job.key} (checkpoint saved; the next run resumes it)", flush=True)
        else:
            self.failed.append((job, rc))
            print(f"FAILED: {job.key} exit {rc}; see {job.log_path(layout)}", flush=True)

    def record_demos(self, job: Job) -> bool:
        """Record the job's demonstrations (once per game, under a lock of their own); False if that failed."""
        path = job.demos_path(self.layout)
        lock = path.with_suffix(".lock")
        while not claim(lock):
            time.sleep(2)  # another worker is recording them
        try:
            if path.is_file():
                return True
            command = job.demos_command(self.layout, sys.executable)
            print(f"demos: {shlex.join(command)}", flush=True)
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")]))
            with open(path.with_suffix(".log"), "a") as log:
                rc = subprocess.run(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
            if rc != 0:
                self.failed.append((job, rc))
                print(f"FAILED: demonstrations for {job.key} (exit {rc}); see {path.with_suffix('.log')}", flush=True)
            return rc == 0
        finally:
            lock.unlink(missing_ok=True)

    # -- stopping --------------------------------------------------------------------------------------------------

    def forward(self, signum, frame) -> None:
        with self.lock:
            if self.stop_signal is None:
                print(f"\n{signal.Signals(signum).name}: stopping {len(self.running)} job(s) with a checkpoint; "
                      f"queued jobs do not start", flush=True)  # fmt: skip
            self.stop_signal = self.stop_signal or signum
            for process in self.running.values():
                if process.poll() is None:
                    process.send_signal(signal.SIGTERM)
            self.lock.notify_all()

    def run(self) -> None:
        previous = {sig: signal.signal(sig, self.forward) for sig in STOPPED}
        try:
            threads = [threading.Thread(target=self.worker, daemon=True) for _ in range(self.workers)]
            for thread in threads:
                thread.start()
            while any(thread.is_alive() for thread in threads):
                for thread in threads:
                    thread.join(timeout=0.5)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def device_of(log_path: Path) -> str | None:
    """The device a run reported ("run NAME (algo) on cpu: ...") in its log, last attempt first."""
    try:
        found = re.findall(r"^run \S+ \(\w+\) on (\S+):", log_path.read_text(), flags=re.M)
    except OSError:
        return None
    return found[-1] if found else None


# ---------------------------------------------------------------------------------------------------------------
# Subcommands


def command_list(bench: Benchmark, jobs: Sequence[Job], layout: Layout) -> None:
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `list ... | head` ends quietly
    print(f"# {bench.name}: {bench.description}")
    print(f"# {len(jobs)} jobs, seed-major; each its own process (OMP_NUM_THREADS=1 under `run`)")
    for job in jobs:
        print(shlex.join(job.command(layout)))


def state_table(bench: Benchmark, jobs: Sequence[Job], layout: Layout) -> dict[tuple[str, str], dict[str, int]]:
    table: dict[tuple[str, str], dict[str, int]] = {}
    for job in jobs:
        cell = table.setdefault((job.arm.name, job.game), {})
        state = job_state(job, layout)
        cell[state] = cell.get(state, 0) + 1
    return table


def command_status(bench: Benchmark, jobs: Sequence[Job], layout: Layout) -> None:
    table = state_table(bench, jobs, layout)
    games = [g for g in bench.games if any(key[1] == g for key in table)]
    print(f"{bench.name}: finished / partial / pending (blocked) per arm and game; results in {layout.results}")
    print("| arm | " + " | ".join(games) + " |")
    print("|---|" + "---|" * len(games))
    for arm in dict.fromkeys(key[0] for key in table):
        cells = []
        for game in games:
            c = table.get((arm, game), {})
            text = f"{c.get('finished', 0)} / {c.get('partial', 0) + c.get('complete', 0)} / {c.get('pending', 0)}"
            cells.append(text + (f" ({c['blocked']})" if c.get("blocked") else ""))
        print(f"| {arm} | " + " | ".join(cells) + " |")
    partial = [(job, checkpoint_progress(job.run_dir(layout))) for job in jobs if job_state(job, layout) == "partial"]
    for job, (step, total) in partial:
        print(f"partial: {job.key} at step {step:,} of {total:,}")
    for job in with_lost_sources([job for job in jobs if job_state(job, layout) != "finished"], layout):
        if job.rerun:
            print(f"lost: {job.key} (its run folder is gone; `run` runs it again before the runs that need it)")


def command_run(jobs: Sequence[Job], layout: Layout, workers: int) -> None:
    unfinished = [job for job in jobs if job_state(job, layout) != "finished"]
    todo = with_lost_sources(unfinished, layout)
    reruns = len(todo) - len(unfinished)
    print(f"{len(jobs) - len(unfinished)} of {len(jobs)} runs already finished; {len(unfinished)} to go"
          + (f" and {reruns} to rerun" if reruns else "") + f", {workers} at a time", flush=True)  # fmt: skip
    for job in todo:
        if job.rerun:
            print(f"rerun: {job.key} (its run folder, which a run to go needs, is gone; its summary will be replaced)",
                  flush=True)  # fmt: skip
    runner = Runner(todo, layout, workers)
    runner.run()
    if runner.stop_signal is not None:
        print(f"stopped; `run` again to continue ({runner.done} finished this time)", file=sys.stderr, flush=True)
        raise SystemExit(STOPPED[runner.stop_signal])
    if runner.failed:
        for job, rc in runner.failed:
            print(f"failed: {job.key} (exit {rc}); log: {job.log_path(layout)}", file=sys.stderr)
        raise SystemExit(1)
    print(f"done: {runner.done} runs finished", flush=True)


def parse_args(argv: Sequence[str] | None):
    parser = OneLineErrorParser(description=__doc__.split("\n\n")[0], formatter_class=ArgumentDefaultsHelpFormatter)
    parser.add_argument("command", choices=("list", "run", "status", "report"))
    parser.add_argument("bench", help=f"one of: {', '.join(BENCHMARKS)}")
    parser.add_argument("--games", default="", help="comma-separated subset of the benchmark's games")
    parser.add_argument("--arms", default="", help="comma-separated subset of the benchmark's arms")
    parser.add_argument("--seeds", default="", help="seeds to run, e.g. 1-5 or 1,3 (default: each arm's own)")
    parser.add_argument("--workers", type=int, default=2, help="runs at a time (run), one thread each")
    parser.add_argument("--runs-dir", default="runs/bench", help="where the run folders and job logs go")
    parser.add_argument(
        "--results-dir",
        default="",
        help="where run summaries go (default: docs/results, to be committed; for quickstart and smoke "
        "<runs-dir>/<bench>-results)",
    )
    parser.add_argument("--reps", type=int, default=2000, help="bootstrap resamples (report)")
    args = parser.parse_args(argv)
    require(args.bench in BENCHMARKS, f"unknown benchmark {args.bench!r}; declared: {', '.join(BENCHMARKS)}")
    require(args.workers >= 1, f"--workers must be at least 1, got {args.workers}")
    require(args.reps >= 100, f"--reps must be at least 100, got {args.reps}")
    require(bool(args.runs_dir.strip()), "--runs-dir must name a folder")
    if not args.results_dir.strip():
        committed = BENCHMARKS[args.bench].committed
        args.results_dir = "docs/results" if committed else str(Path(args.runs_dir) / f"{args.bench}-results")
    return args


def split_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    bench = BENCHMARKS[args.bench]
    layout = Layout(Path(args.runs_dir), Path(args.results_dir))
    jobs = select_jobs(bench, split_list(args.games), split_list(args.arms), parse_seed_list(args.seeds))
    if args.command == "list":
        command_list(bench, jobs, layout)
    elif args.command == "status":
        command_status(bench, jobs, layout)
    elif args.command == "run":
        command_run(jobs, layout, args.workers)
    else:
        from sobirl.report import write_report

        write_report(bench, layout, reps=args.reps)


def declared_jobs() -> Iterable[Job]:
    """Every job of every declared benchmark (the listing test parses each one's flags)."""
    for bench in BENCHMARKS.values():
        yield from select_jobs(bench)


if __name__ == "__main__":
    run_cli(main)
