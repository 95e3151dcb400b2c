"""Do a benchmark's runs all come from code that computes the same? A check for results gathered over weeks.

    python sobirl/same_code.py main              # every code state main's runs came from, against this checkout
    python sobirl/same_code.py main --arms drlhf,sobirl
    python sobirl/same_code.py main --against f3124da   # every arm at that commit, against this checkout (a refactor)

A benchmark runs from a checkout fixed at one commit while the code moves on, so its summaries name several
commits. What a run computes depends only on the code under COMPUTING_PATHS: commits whose trees agree there are
one code state. For each state other than this checkout's, this script checks the state's commit out in a git
worktree, runs a tiny version of each arm that has runs from that state (the arm's declared flags with the budget
shrunk, one seed, one thread) there and here, and compares every logged scalar bitwise (speed and timing tags
left out). "identical" means the arm's runs from both states are draws of the same computation, not just of the
same algorithm; "differs" names the tags that moved: such an arm should be rerun from one code state.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agents.infra.cli import (  # noqa: E402
    DefaultsHelpFormatter,
    OneLineErrorParser,
    UsageError,
    flag_name,
    require,
    run_cli,
)
from sobirl.beamrider import ALGORITHMS  # noqa: E402
from sobirl.harness.declarations import BENCHMARKS  # noqa: E402
from sobirl.harness.events import load_run  # noqa: E402
from sobirl.harness.jobs import REPO, Job, Layout, select_jobs, split_list  # noqa: E402
from sobirl.harness.summaries import load_results  # noqa: E402

COMPUTING_PATHS = ("agents", "wrappers", "sobirl/beamrider.py")
# A tiny budget: 3k steps, the learning and every bilevel term on from 500 / 1,000 steps, a few reward phases.
TINY = {
    "--total-timesteps": "3000",
    "--buffer-size": "3000",
    "--learning-starts": "500",
    "--save-every": "0",
    "--inner-steps": "500",
    "--initial-pairs": "10",
    "--warmup-epochs": "3",
    "--total-pairs": "60",
    "--schedule-iterations": "5",
    "--pair-buffer": "60",
    "--hyper-start": "1000",
    "--parl-start": "1000",
    "--penalty-start": "1000",
}
UNTIMED = ("SPS", "time", "seconds")  # tags that measure the machine, not the computation


def git(*args: str, repo: Path = REPO) -> str:
    return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True).stdout.strip()


def code_state(commit: str, repo: Path = REPO) -> str | None:
    """The trees of COMPUTING_PATHS at `commit`, as one string; None if this clone does not have the commit."""
    try:
        return " ".join(git("rev-parse", f"{commit}:{path}", repo=repo) for path in COMPUTING_PATHS)
    except subprocess.CalledProcessError:
        return None


def checkout_state() -> str:
    """This checkout's code state: the commit's trees, or 'working tree' when COMPUTING_PATHS have changes."""
    if git("status", "--porcelain", "--", *COMPUTING_PATHS):
        return "working tree"
    return code_state("HEAD") or "working tree"


def tiny_flags(flags: Sequence[str], steps: int) -> list[str]:
    """`flags` with the budget flags of TINY set to TINY's values. A value above the benchmark's steps means
    "never" (random play's --learning-starts) and is kept."""
    out = list(flags)
    for k in range(len(out) - 1):
        if out[k] in TINY and not (out[k + 1].isdigit() and int(out[k + 1]) > steps):
            out[k + 1] = TINY[out[k]]
    return out


def unchecked_start_flags(algo: str, flags: Sequence[str], steps: int) -> list[str]:
    """The flags that switch a term on at an env step (`--*-start`) which the tiny runs would leave beyond their
    budget, so that the check would compare runs in which the term never ran: a start flag the arm sets that TINY
    does not shrink, or one it leaves at a default past the tiny budget."""
    module = importlib.import_module(ALGORITHMS[algo])
    defaults = {flag_name(f.name): f.default for f in dataclasses.fields(module.Args) if f.name.endswith("_start")}
    tiny_total = int(TINY["--total-timesteps"])
    problems = []
    for name, default in sorted(defaults.items()):
        if name in flags and name not in TINY:
            value = flags[flags.index(name) + 1]
            if not (value.isdigit() and int(value) > steps):  # past the benchmark's own steps means "never"
                problems.append(f"{name} {value} (not in same_code.TINY)")
        elif name not in flags and isinstance(default, int) and tiny_total <= default <= steps:
            problems.append(f"{name} (default {default}, past the tiny runs' {tiny_total} steps)")
    return problems


def differing_tags(first: Mapping[str, tuple], second: Mapping[str, tuple]) -> list[str]:
    """The tags whose (steps, values) are not bitwise equal in two runs, or that only one run logged."""
    timed = lambda tag: any(word in tag for word in UNTIMED)  # noqa: E731
    tags = {tag for tag in (*first, *second) if not timed(tag)}
    return sorted(
        tag
        for tag in tags
        if tag not in first
        or tag not in second
        or any(not np.array_equal(a, b, equal_nan=True) for a, b in zip(first[tag], second[tag], strict=True))
    )


def relative_difference(first: tuple, second: tuple) -> float:
    """The largest |a - b| / max(|a|, |b|) over the points two runs logged of one tag (inf if the steps differ)."""
    (steps_a, a), (steps_b, b) = first, second
    if steps_a.shape != steps_b.shape or not np.array_equal(steps_a, steps_b):
        return math.inf
    scale = np.maximum(np.abs(a), np.abs(b))
    gaps = np.abs(a - b)[scale > 0] / scale[scale > 0]
    return float(gaps.max(initial=0.0))


def verdict(first: Mapping[str, tuple], second: Mapping[str, tuple]) -> str:
    """'identical', or the tags that moved with their largest relative differences."""
    moved = differing_tags(first, second)
    if not moved:
        return "identical"
    gaps = [
        f"{tag} ({relative_difference(first[tag], second[tag]):.1e})" if tag in first and tag in second else tag
        for tag in moved
    ]
    return f"differs in {len(moved)} tag(s): {', '.join(gaps[:6])} (largest relative difference)"


def tiny_run(job: Job, tree: Path, out: Path, seed: int) -> Path | None:
    """Run `job`'s arm at the tiny budget with the code in `tree`; its run folder, or None if it failed (the
    reason printed)."""
    run_dir = out / job.arm.name
    if (run_dir / "done").is_file():
        return run_dir
    layout = Layout(out / "unused", out / "unused")
    flags = tiny_flags(job.flags(layout), job.bench.steps)
    flags[flags.index("--seed") + 1] = str(seed)
    flags[flags.index("--runs-dir") + 1], flags[flags.index("--run-name") + 1] = str(out), job.arm.name
    if job.arm.frozen_from:
        flags[flags.index("--frozen-reward") + 1] = str(out / job.arm.frozen_from)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(tree)}
    result = subprocess.run([sys.executable, "sobirl/beamrider.py", *flags], cwd=tree, env=env, capture_output=True,
                            text=True)  # fmt: skip
    if result.returncode != 0:
        print(f"  {job.arm.name}: the tiny run failed at {tree.name}: {result.stderr.strip()[-300:]}", flush=True)
        return None
    (run_dir / "done").touch()
    return run_dir


def build_parser() -> OneLineErrorParser:
    parser = OneLineErrorParser(description=__doc__.split("\n\n")[0], formatter_class=DefaultsHelpFormatter)
    parser.add_argument("bench", help=f"one of: {', '.join(BENCHMARKS)}")
    parser.add_argument("--arms", default="", help="comma-separated subset of the benchmark's arms")
    parser.add_argument("--results-dir", default="docs/results", help="where the benchmark's run summaries are")
    parser.add_argument("--work-dir", default="runs/same_code", help="worktrees and tiny runs go here")
    parser.add_argument("--seed", type=int, default=7, help="the tiny runs' seed")
    parser.add_argument(
        "--against",
        default="",
        help="check every arm at this commit against this checkout, whatever commits the runs name (after a "
        "refactor: did anything an arm computes change?)",
    )
    return parser


def parse_args(argv: Sequence[str] | None):
    args = build_parser().parse_args(argv)
    require(args.bench in BENCHMARKS, f"unknown benchmark {args.bench!r}; declared: {', '.join(BENCHMARKS)}")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    bench = BENCHMARKS[args.bench]
    arms = [bench.arm(name) for name in split_list(args.arms)] or list(bench.arms)
    for arm in arms:
        unchecked = unchecked_start_flags(arm.algo, [*bench.common, *arm.flags], bench.steps)
        if unchecked:
            raise UsageError(
                f"arm {arm.name}: {', '.join(unchecked)}: the tiny runs would never switch that term on; add the "
                "flag to TINY in sobirl/same_code.py"
            )
    results = load_results(Path(args.results_dir), bench.name)
    require(bool(results) or bool(args.against), f"no run summaries of {bench.name} under {args.results_dir}")
    # code state -> arm -> (game, seed, commit) of each run that ran (in part) on a commit of that state
    states: dict[str, dict[str, set[tuple[str, int, str]]]] = {}
    for result in results:
        for commit in result["commits"]:
            state = code_state(commit) or f"commit {commit[:10]}, not in this clone"
            runs = states.setdefault(state, {}).setdefault(result["arm"], set())
            runs.add((result["game"], result["seed"], commit[:10]))
    if args.against:
        state = code_state(args.against)
        require(state is not None, f"--against {args.against}: no such commit in this clone")
        commit = git("rev-parse", args.against)[:10]
        states = {state: {arm.name: {(game, 0, commit) for game in bench.games[:1]} for arm in arms}}
    here = checkout_state()
    work = Path(args.work_dir).resolve()
    shutil.rmtree(work / "runs", ignore_errors=True)  # tiny runs of an earlier checkout are not this one's
    jobs = {job.arm.name: job for job in select_jobs(bench, games=bench.games[:1], seeds={bench.seed_offset + 1})}
    failures = 0
    print(f"{bench.name}: {len(results)} runs from {len(states)} code state(s); this checkout: {here[:40]}")
    for state, by_arm in states.items():
        commits = sorted({commit for runs in by_arm.values() for _, _, commit in runs})
        if state == here:
            print(f"- {', '.join(commits)}: this checkout's code")
            continue
        if state.startswith("commit "):
            print(f"- {state}: cannot be checked here (fetch the full history)")
            failures += 1
            continue
        tree = work / "trees" / commits[0]
        if not tree.exists():
            git("worktree", "add", "--detach", str(tree), commits[0])
        print(f"- {', '.join(commits)}: checked out at {tree}", flush=True)
        try:
            for arm in arms:
                if arm.name not in by_arm and not any(other.frozen_from == arm.name for other in arms):
                    continue
                if arm.demos:
                    print(f"  {arm.name}: not checked (needs demonstrations)")
                    continue
                then = tiny_run(jobs[arm.name], tree, work / "runs" / commits[0], args.seed)
                now = tiny_run(jobs[arm.name], REPO, work / "runs" / "checkout", args.seed)
                if then is None or now is None:
                    failures += 1
                    continue
                if arm.name not in by_arm:
                    continue  # a source of a frozen-reward arm, run for it only
                text = verdict(load_run(then), load_run(now))
                failures += text != "identical"
                runs = len({(game, seed) for game, seed, _ in by_arm[arm.name]})
                print(f"  {arm.name} ({runs} run{'s' * (runs != 1)} from this state): {text}", flush=True)
        finally:
            git("worktree", "remove", "--force", str(tree))
    raise SystemExit(1 if failures else 0)


if __name__ == "__main__":
    run_cli(main)
