"""Jobs: one run of an arm on a game and seed, its fixed folder and command, and where it stands.

Each run has a fixed folder, runs/bench/<bench>/<game>/<arm>/seed<k>, so a stopped benchmark continues where it was:
a job is finished (summary written), complete, partial (a checkpoint to resume), blocked or pending.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from pathlib import Path

from agents.infra.checkpoint_header import CHECKPOINT_NAME, load_checkpoint_metadata, process_alive
from agents.infra.cli import UsageError, require
from sobirl.harness.declarations import BENCHMARKS, Arm, Benchmark, env_id

REPO = Path(__file__).resolve().parent.parent.parent
ENTRY_POINT = "sobirl/beamrider.py"


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


def split_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def declared_jobs() -> Iterable[Job]:
    """Every job of every declared benchmark (the listing test parses each one's flags)."""
    for bench in BENCHMARKS.values():
        yield from select_jobs(bench)


# ---------------------------------------------------------------------------------------------------------------
# Where a job stands


def lock_held(path: Path) -> bool:
    """Whether a live process holds this job lock file (see runner.claim)."""
    try:
        return process_alive(int(path.read_text().strip()))
    except (OSError, ValueError):
        return False


def checkpoint_progress(run_dir: Path) -> tuple[int, int] | None:
    """(global step, total steps) of the run's checkpoint, or None when it has none."""
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
