"""Finished runs -> summaries: the results record of each run (docs/results/<bench>/<game>/<arm>/seed<k>.json),
kept as committed data so that `report` rebuilds every table and figure without runs/; and each run's attempts log.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import shlex
import subprocess
from collections.abc import Sequence
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np

from agents.infra.checkpoint_header import load_checkpoint_metadata
from agents.infra.cli import UsageError
from sobirl.harness.declarations import env_id
from sobirl.harness.events import load_run
from sobirl.harness.history import replaced_record
from sobirl.harness.jobs import REPO, Job, Layout, checkpoint_progress, lock_held

RESULT_FORMAT = "sobirl-benchmark-result"
RESULT_VERSION = 1
GRID_POINTS = 20  # points of the fixed step grid every summary's curves are kept on
FINAL_FRACTION = 0.1  # final return: mean true score of the last 10% of a run's games


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
    steps, values = np.asarray(steps), np.asarray(values, dtype=np.float64)
    out = []
    for point in grid:
        seen = values[steps <= point]
        out.append(float(seen[-1]) if len(seen) else None)
    return out


def final_mean(values, fraction: float = FINAL_FRACTION) -> float | None:
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
    # The pooled implicit term (--implicit-pooling): its norm over the step's own before the cap, whether the cap
    # shrank it, and the cosine of its even and odd minibatches' halves (near 0: noise; near 1: a shared direction).
    "pooled_ratio": "reward/pooled_ratio",
    "pooled_capped": "reward/pooled_capped",
    "split_half_cosine": "reward/split_half_cosine",
    # --implicit-pairs learned or latest: the share of the stored pairs the implicit term reads (none logged: all).
    "implicit_pairs_share": "reward/implicit_pairs_share",
}
DIAGNOSTIC_CURVES = ("accuracy_fresh", "game_spearman", "bce")


def event_diagnostics(scalars: dict, grid: Sequence[int]) -> dict:
    """The summary's fields read from a run's reward diagnostics: each one's mean over the last 10% of reward phases
    and the curves of a few on the step grid."""
    return {
        "diagnostics": {name: final_mean(scalars[tag][1]) for name, tag in DIAGNOSTICS.items() if tag in scalars},
        "diagnostic_curves": {
            name: last_at(*scalars[DIAGNOSTICS[name]], grid)
            for name in DIAGNOSTIC_CURVES
            if DIAGNOSTICS[name] in scalars
        },
    }


def summarize_run(job: Job, layout: Layout) -> dict:
    """The results record of a finished run, from its event files, checkpoint header and attempts log."""
    run_dir = job.run_dir(layout)
    scalars = load_run(run_dir)
    meta = load_checkpoint_metadata(run_dir, flag="checkpoint")
    attempts = read_attempts(job.attempts_path(layout))
    grid = grid_for(job.bench.steps)
    steps, returns = scalars.get("charts/episodic_return", ([], []))
    final_count = max(1, math.ceil(FINAL_FRACTION * len(returns))) if len(returns) else 0
    labels = scalars.get("reward/pairs_queried")
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
        "workers": sorted({a["workers"] for a in started if a.get("workers")}),  # --workers of the `run`s that ran it
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
        # Runs logged reward/extra_grad_ratio times the reward batch size until commit 7d1fd73; from then on as is.
        "extra_grad_ratio_fixed": True,
        **event_diagnostics(scalars, grid),
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
    """Write a finished run's summary. The harness writes over an existing summary only when it ran the job again
    (a rerun of a run whose folder was lost: see jobs.source_lost); the new summary then records what it replaced
    (`replaces`: the old summary's finished time, final return and commits, after the old one's own records), so
    that the report can list replaced runs without git history."""
    path = job.result_path(layout)
    summary = summarize_run(job, layout)
    try:
        old = json.loads(path.read_text()) if path.is_file() else None
    except (OSError, json.JSONDecodeError):
        old = None
    if isinstance(old, dict) and old.get("finished"):
        summary["replaces"] = [*(old.get("replaces") or []), replaced_record(old)]
    write_json_atomic(path, clean_json(summary))
    return path


def refresh_diagnostics(job: Job, layout: Layout) -> bool:
    """Read a finished run's diagnostics again from its run folder's event files into its summary (after a
    diagnostic was added to DIAGNOSTICS); nothing else in the summary changes, its `finished` time included, so the
    report does not take it for a rerun. False, changing nothing, unless the summary is there and the run folder
    holds that run finished: not while a `run` holds the job (a rerun of a lost folder writes into it) and not where
    its checkpoint stops short of the summary's last step."""
    path = job.result_path(layout)
    run_dir = job.run_dir(layout)
    if not path.is_file() or lock_held(job.lock_path(layout)) or not any(run_dir.glob("events.out.tfevents.*")):
        return False
    summary = json.loads(path.read_text())
    progress = checkpoint_progress(run_dir)
    if "grid" not in summary or progress is None or progress[0] != summary.get("global_step"):
        return False
    summary.update(event_diagnostics(load_run(run_dir), summary["grid"]))
    write_json_atomic(path, clean_json(summary))
    return True


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


def load_results(results_dir: Path, bench: str) -> list[dict]:
    """Every run summary of one benchmark (docs/results/<bench>/<game>/<arm>/seed<k>.json)."""
    folder = Path(results_dir) / bench
    results = []
    for path in sorted(folder.glob("*/*/seed*.json")):
        try:
            result = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise UsageError(f"{path}: not a readable results file ({err})") from None
        if result.get("format") != RESULT_FORMAT:
            raise UsageError(f"{path}: not a benchmark results file")
        results.append(result)
    return results
