"""The MinAtar benchmarks: declared arms x games x seeds, run by resumable local workers, results kept as data.

    python sobirl/benchmark.py list main                 # every job's full command; runs nothing
    python sobirl/benchmark.py run main --workers 2      # skips finished runs, resumes stopped ones, starts the rest
    python sobirl/benchmark.py status main               # finished / partial / pending per arm x game
    python sobirl/benchmark.py report main               # tables and figures from docs/results/main alone
    python sobirl/benchmark.py diagnostics main          # re-read finished runs' diagnostics from their folders

The command line of the harness in sobirl/harness/: the benchmarks are declared in declarations.py, jobs and their
states in jobs.py, the workers in runner.py, summaries of finished runs in summaries.py, the pages in report.py.
"""

from __future__ import annotations

import shlex
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from agents.infra.cli import DefaultsHelpFormatter, OneLineErrorParser, require, run_cli
from sobirl.harness.declarations import BENCHMARKS, Benchmark
from sobirl.harness.jobs import (
    Job,
    Layout,
    checkpoint_progress,
    job_state,
    lock_held,
    parse_seed_list,
    select_jobs,
    split_list,
    with_lost_sources,
)
from sobirl.harness.runner import STOPPED, Runner, progress_reader, progress_text
from sobirl.harness.summaries import refresh_diagnostics


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
    # A running job (its lock held by a live `run`) shows where its event file has got to, not its last checkpoint.
    now, running = time.time(), [job for job in jobs if lock_held(job.lock_path(layout))]
    for job in running:
        reader = progress_reader(job, layout)
        print(f"running: {progress_text(job, reader.read(), now, reader.learning_starts)}")
    partial = [
        (job, checkpoint_progress(job.run_dir(layout)))
        for job in jobs
        if job not in running and job_state(job, layout) == "partial"
    ]
    for job, (step, total) in partial:
        print(f"partial: {job.key} at step {step:,} of {total:,}")
    for job in with_lost_sources([job for job in jobs if job_state(job, layout) != "finished"], layout):
        if job.rerun:
            print(f"lost: {job.key} (its run folder is gone; `run` runs it again before the runs that need it)")


def command_run(jobs: Sequence[Job], layout: Layout, workers: int, progress_every: float = 60.0) -> None:
    unfinished = [job for job in jobs if job_state(job, layout) != "finished"]
    todo = with_lost_sources(unfinished, layout)
    reruns = len(todo) - len(unfinished)
    print(f"{len(jobs) - len(unfinished)} of {len(jobs)} runs already finished; {len(unfinished)} to go"
          + (f" and {reruns} to rerun" if reruns else "") + f", {workers} at a time", flush=True)  # fmt: skip
    for job in todo:
        if job.rerun:
            print(f"rerun: {job.key} (its run folder, which a run to go needs, is gone; its summary will be replaced)",
                  flush=True)  # fmt: skip
    runner = Runner(todo, layout, workers, progress_every)
    runner.run()
    if runner.stop_signal is not None:
        print(f"stopped; `run` again to continue ({runner.done} finished this time)", file=sys.stderr, flush=True)
        raise SystemExit(STOPPED[runner.stop_signal])
    if runner.failed:
        for job, rc in runner.failed:
            print(f"failed: {job.key} (exit {rc}); log: {job.log_path(layout)}", file=sys.stderr)
        raise SystemExit(1)
    print(f"done: {runner.done} runs finished", flush=True)


def command_diagnostics(jobs: Sequence[Job], layout: Layout) -> None:
    finished = [job for job in jobs if job.result_path(layout).is_file()]
    refreshed = sum(refresh_diagnostics(job, layout) for job in finished)
    print(f"diagnostics read again from the run folders under {layout.runs} into {refreshed} of {len(finished)} "
          f"finished runs' summaries in {layout.results}" + (f"; {len(finished) - refreshed} have no finished run "
          "folder there (or a `run` holds it)" if refreshed < len(finished) else ""))  # fmt: skip


def parse_args(argv: Sequence[str] | None):
    parser = OneLineErrorParser(description=__doc__.split("\n\n")[0], formatter_class=DefaultsHelpFormatter)
    parser.add_argument("command", choices=("list", "run", "status", "report", "diagnostics"))
    parser.add_argument("bench", help=f"one of: {', '.join(BENCHMARKS)}")
    parser.add_argument("--games", default="", help="comma-separated subset of the benchmark's games (default: all)")
    parser.add_argument("--arms", default="", help="comma-separated subset of the benchmark's arms (default: all)")
    parser.add_argument("--seeds", default="", help="seeds to run, e.g. 1-5 or 1,3 (default: each arm's own)")
    parser.add_argument("--workers", type=int, default=2, help="runs at a time (run), one thread each")
    parser.add_argument(
        "--progress-every",
        type=float,
        default=60.0,
        help="seconds between progress lines (step, speed, ETA) of the running jobs (run); 0: none",
    )
    parser.add_argument("--runs-dir", default="runs/bench", help="where the run folders and job logs go")
    parser.add_argument(
        "--results-dir",
        default="",
        help="where run summaries go (default: docs/results, to be committed; for quickstart and smoke "
        "<runs-dir>/<bench>-results)",
    )
    parser.add_argument("--reps", type=int, default=2000, help="bootstrap resamples (report)")
    parser.add_argument(
        "--history-dir",
        default="",
        help="a results folder in a git checkout whose history of the summaries tells which runs reruns replaced "
        "(report; default: the results folder)",
    )
    args = parser.parse_args(argv)
    require(args.bench in BENCHMARKS, f"unknown benchmark {args.bench!r}; declared: {', '.join(BENCHMARKS)}")
    require(args.workers >= 1, f"--workers must be at least 1, got {args.workers}")
    require(args.reps >= 100, f"--reps must be at least 100, got {args.reps}")
    require(args.progress_every >= 0, f"--progress-every must be 0 or more seconds, got {args.progress_every}")
    require(bool(args.runs_dir.strip()), "--runs-dir must name a folder")
    if not args.results_dir.strip():
        committed = BENCHMARKS[args.bench].committed
        args.results_dir = "docs/results" if committed else str(Path(args.runs_dir) / f"{args.bench}-results")
    return args


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
        command_run(jobs, layout, args.workers, args.progress_every)
    elif args.command == "diagnostics":
        command_diagnostics(jobs, layout)
    else:
        # Imported here: the pages' plotting (matplotlib) would add a third of a second to every other command.
        from sobirl.harness.report import write_report

        write_report(bench, layout, reps=args.reps, history=Path(args.history_dir) if args.history_dir else None)


if __name__ == "__main__":
    run_cli(main)
