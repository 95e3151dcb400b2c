"""Draw the paper's Figure 1 from the TensorBoard logs under runs/, and print a summary table.

Panels: true episodic return, episodic length and preference accuracy against env steps, one curve per
algorithm. With 5 or more seeds a curve is the interquartile mean over seeds with rliable's 95% bootstrap interval;
with fewer it is the mean, and the band is the range of the seeds (never an interval from so few runs). Runs are
grouped by the env id and experiment name they recorded (their checkpoint), wherever they sit under --runs-dir.

    python sobirl/plot.py --runs-dir runs --env-id BeamRiderNoFrameskip-v4 --output figure1.png
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backend_bases import FigureCanvasBase

from agents.infra.cli import UsageError, flag, parse_args, require, require_folder_name, run_cli
from sobirl.harness import stats
from sobirl.harness.events import event_files, load_run

RETURN_TAG = "charts/episodic_return"
LENGTH_TAG = "charts/episodic_length"
ACC_FRESH_TAG = "reward/accuracy_fresh"
ACC_TRAIN_TAG = "reward/accuracy_train"
# Whether the term an algorithm adds to the cross-entropy drifts (SoBiRL's implicit term, A-PARL's second-order
# term, the penalty, AIHF's demonstration term: reward/hyper_term): the cross-entropy, that term and its gradient
# over the BCE's.
DRIFT_TAGS = {
    "final_bce": "reward/bce",
    "final_hyper_term": "reward/hyper_term",
    "final_grad_ratio": "reward/extra_grad_ratio",
}
# Below this many seeds an interval means nothing: the range of the seeds is shown instead (rliable's advice).
IQM_MIN_SEEDS = stats.MIN_RUNS_FOR_INTERVAL
CONFIDENCE = stats.CONFIDENCE

# Fixed colours and order so that figures from different sweeps can be compared side by side.
ALGO_STYLE = {
    "sobirl": ("SoBiRL", "C3"),
    "drlhf": ("DRLHF", "C0"),
    "sac_discrete": ("SAC-discrete (true reward)", "C2"),
    "random": ("Random policy", "C7"),
    "sobirl_corrected": ("SoBiRL + ratio-baseline correction", "C1"),
    "parl": ("A-PARL", "C4"),
    "parl_corrected": ("A-PARL + ratio-baseline correction", "C8"),
    "penalty": ("Penalty (PBRL form)", "C5"),
    "aihf": ("AIHF (demonstrations + preferences)", "C6"),
    "aihf_w0.01": ("AIHF, demonstration weight 0.01", "C9"),
}
# The entry point's --algo name differs from the exp_name it writes, so accept both in --algos.
ALGO_ALIASES = {"sac": "sac_discrete"}


@dataclasses.dataclass
class Args:
    runs_dir: str = flag("runs", "folder holding one sub-folder of TensorBoard event files per run")
    env_id: str = flag("", "only plot runs of this env id; empty: every env found, one row of panels each")
    algos: str = flag("", "comma-separated exp_names to plot, e.g. sobirl,drlhf,sac_discrete; empty: all")
    output: str = flag("figure1.png", "where to save the figure (format from the extension)")
    json: str = flag("", "also write the summary table as JSON to this path")
    num_points: int = flag(100, "points of the common env-step grid each run's curve is resampled onto")
    smooth: int = flag(20, "rolling-mean window, in episodes, for the return and length curves (1 = raw)")
    bootstrap_reps: int = flag(2000, "bootstrap resamples for the 95%% intervals")
    final_fraction: float = flag(0.1, "final return = mean over each run's last this-fraction of episodes")
    return_tag: str = flag(RETURN_TAG, "scalar tag for the return panel (eval/episodic_return for eval scores)")
    seed: int = flag(0, "seed of the bootstrap, so the printed intervals are reproducible")


@dataclasses.dataclass
class Run:
    env_id: str
    algo: str
    seed: int
    start_time: int
    path: Path
    scalars: dict[str, tuple[np.ndarray, np.ndarray]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Curve:
    grid: np.ndarray
    point: np.ndarray
    low: np.ndarray | None  # None with a single seed: there is nothing to resample
    high: np.ndarray | None
    num_runs: int


# ---------------------------------------------------------------------------------------------------------------
# Pure helpers


def parse_run_name(name: str) -> tuple[str, str, int, int] | None:
    """Split `{env_id}__{exp_name}__{seed}__{unix_time}` (env_id may hold '/', as in ALE/BeamRider-v5)."""
    parts = name.rsplit("__", 3)
    if len(parts) != 4 or not parts[0] or not parts[1]:
        return None
    env_id, exp_name, seed, start_time = parts
    try:
        return env_id, exp_name, int(seed), int(start_time)
    except ValueError:
        return None


def rolling_mean(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over the last `window` values (fewer at the start), so early points are not dropped."""
    values = np.asarray(values, dtype=np.float64)
    if window <= 1 or values.size == 0:
        return values.copy()
    csum = np.concatenate([[0.0], np.cumsum(values)])
    idx = np.arange(1, values.size + 1)
    lo = np.maximum(0, idx - window)
    return (csum[idx] - csum[lo]) / (idx - lo)


def common_grid(step_arrays: Sequence[np.ndarray], num_points: int) -> np.ndarray:
    """Evenly spaced steps over the range every run covers, so each grid point averages all seeds."""
    start = max(float(s[0]) for s in step_arrays)
    end = min(float(s[-1]) for s in step_arrays)
    if end <= start:
        return np.array([end])
    return np.linspace(start, end, num_points)


def resample(steps: np.ndarray, values: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Linear interpolation of one run's curve onto `grid`; NaN outside the steps the run logged."""
    steps = np.asarray(steps, dtype=np.float64)
    grid = np.asarray(grid, dtype=np.float64)
    out = np.interp(grid, steps, np.asarray(values, dtype=np.float64))
    out[(grid < steps[0]) | (grid > steps[-1])] = np.nan
    return out


def final_value(values: np.ndarray, fraction: float) -> float:
    """Mean of the last `fraction` of a run's logged values (at least one)."""
    values = np.asarray(values, dtype=np.float64)
    k = max(1, math.ceil(fraction * values.size))
    return float(values[-k:].mean())


def estimate(finals: np.ndarray, reps: int, seed: int = 0) -> tuple[str, float, float, float]:
    """(estimator, point, low, high): IQM with rliable's 95% bootstrap interval from IQM_MIN_SEEDS runs on, else the
    mean with the range of the runs."""
    finals = np.asarray(finals, dtype=np.float64)
    if len(finals) < IQM_MIN_SEEDS:
        low, high = stats.run_range(finals)
        return "mean", float(finals.mean()), low, high
    points, intervals = stats.interval_estimates({"x": finals[:, None]}, lambda x: np.array([stats.iqm(x)]), reps, seed)
    return "IQM", float(points["x"][0]), float(intervals["x"][0, 0]), float(intervals["x"][1, 0])


def aggregate_curve(
    per_run: Sequence[tuple[np.ndarray, np.ndarray]], num_points: int, smooth: int, reps: int, seed: int = 0
) -> Curve:
    """One curve over runs on a common grid. The grid starts once every run has `smooth` points behind it, so the
    first point averages as many games as the others (a rolling mean over one or two games spikes)."""
    starts = [steps[min(smooth, len(steps)) - 1] for steps, _ in per_run]
    trimmed = [(steps[steps >= start], values[steps >= start]) for (steps, values), start in zip(per_run, starts)]
    grid = common_grid([steps for steps, _ in trimmed], num_points)
    matrix = np.stack([resample(steps, rolling_mean(values, smooth), grid) for steps, values in per_run])
    if len(per_run) < IQM_MIN_SEEDS:
        low, high = (matrix.min(0), matrix.max(0)) if len(per_run) > 1 else (None, None)
        return Curve(grid, matrix.mean(0), low, high, len(per_run))
    points, intervals = stats.curve_estimates({"c": matrix[:, None, :]}, reps, seed)
    return Curve(grid, points["c"], intervals["c"][0], intervals["c"][1], len(per_run))


# ---------------------------------------------------------------------------------------------------------------
# Finding and grouping runs


def recorded_flags(run_dir: Path) -> dict[str, str]:
    """The flags a run recorded: its checkpoint's header, else the hyperparameter table its first event file
    starts with (written before the first step); {} when neither is there."""
    from agents.infra.checkpoint_header import CHECKPOINT_NAME, load_checkpoint_metadata
    from agents.infra.cli import UsageError

    if (run_dir / CHECKPOINT_NAME).is_file():
        try:
            return {key: str(value) for key, value in load_checkpoint_metadata(run_dir)["args"].items()}
        except (UsageError, KeyError, TypeError, AttributeError):
            pass
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    for path in event_files(run_dir):
        try:
            for index, event in enumerate(EventFileLoader(str(path)).Load()):
                for value in event.summary.value:
                    if value.tag.startswith("hyperparameters") and value.tensor.string_val:
                        table = value.tensor.string_val[0].decode(errors="replace")
                        rows = (line.strip("|").split("|", 1) for line in table.splitlines()[2:])
                        return {row[0]: row[1] for row in rows if len(row) == 2}
                if index > 20:  # the table is among a run's first events
                    break
        except Exception:  # noqa: BLE001 - a damaged event file: fall back to the folder name
            continue
    return {}


def recorded_identity(run_dir: Path, relative: str) -> tuple[str, str, int, int] | None:
    """(env_id, exp_name, seed, start time) as the run recorded them, else parsed from its folder's path under
    --runs-dir ({env_id}__{exp_name}__{seed}__{unix time}); None when neither says."""
    flags = recorded_flags(run_dir)
    try:
        start = int(min(p.stat().st_mtime for p in event_files(run_dir)))
        return flags["env_id"], flags["exp_name"], int(flags["seed"]), start
    except (KeyError, ValueError, OSError):
        # A link named otherwise than the run folder it points to: the folder's own name.
        return parse_run_name(relative) or parse_run_name(run_dir.resolve().name)


def discover_runs(runs_dir: Path) -> tuple[list[Run], list[str]]:
    """Run folders anywhere under `runs_dir` (symbolic links followed, each folder once), without loading them;
    plus notes to print."""
    runs, notes, seen = [], [], set()
    for root, dirs, files in os.walk(runs_dir, followlinks=True):
        root_path = Path(root)
        real = root_path.resolve()
        if real in seen:  # a link back up the tree, or two links to one run
            dirs[:] = []
            continue
        seen.add(real)
        if not any("tfevents" in f for f in files):
            dirs.sort()
            continue
        # --runs-dir may name a single run folder instead of the folder above it.
        relative = root_path.name if root_path == runs_dir else root_path.relative_to(runs_dir).as_posix()
        identity = recorded_identity(root_path, relative)
        if identity is not None:
            runs.append(Run(*identity, path=root_path))
            dirs[:] = []  # add_hparams writes a sub-folder inside the run: it is not a run of its own
        else:
            notes.append(
                f"note: skipping {root_path}: it recorded no flags and is not an {{env_id}}__{{exp_name}}__... folder"
            )
            dirs.sort()
    return runs, notes


def env_key(env_id: str) -> str:
    """MinAtar/Breakout-v1 and MinAtar-Breakout-v1 (the run folders' spelling) name one environment."""
    return env_id.replace("/", "-")


def keep_newest_per_seed(runs: list[Run]) -> tuple[list[Run], list[str]]:
    """A seed restarted from scratch gets a new folder; counting both would weigh that seed twice. The newest folder
    wins, and a note names the folder kept and the one dropped (and the flags they recorded differently, since two
    unrelated runs may share an experiment name and a seed)."""
    newest: dict[tuple[str, str, int], Run] = {}
    notes = []
    for run in sorted(runs, key=lambda r: r.start_time):
        key = (env_key(run.env_id), run.algo, run.seed)
        if key in newest:
            dropped = newest[key]
            differ = differing_flags(recorded_flags(run.path), recorded_flags(dropped.path))
            notes.append(
                f"note: {run.algo} seed {run.seed} on {run.env_id} has several runs; the newest folder wins: kept "
                f"{run.path}, dropped {dropped.path}" + (f" (their flags differ: {differ})" if differ else "")
            )
        newest[key] = run
    return list(newest.values()), notes


# Flags that name where a run went or how it was watched, not what it computed.
PLACE_FLAGS = {"run_name", "runs_dir", "resume", "progress", "track", "wandb_project_name", "wandb_entity", "cuda"}


def differing_flags(kept: dict[str, str], dropped: dict[str, str], most: int = 4) -> str:
    """ "teacher human vs oracle, ..." for the flags two runs recorded differently (the first `most`)."""
    keys = [k for k in sorted(set(kept) & set(dropped)) if k not in PLACE_FLAGS and kept[k] != dropped[k]]
    text = ", ".join(f"{key} {kept[key]} vs {dropped[key]}" for key in keys[:most])
    return text + (f" and {len(keys) - most} more" if len(keys) > most else "")


def algo_order(algo: str) -> tuple[int, str]:
    order = list(ALGO_STYLE)
    return (order.index(algo) if algo in order else len(order), algo)


def group_runs(runs: list[Run]) -> dict[tuple[str, str], list[Run]]:
    groups: dict[tuple[str, str], list[Run]] = {}
    for run in sorted(runs, key=lambda r: (r.env_id, algo_order(r.algo), r.seed)):
        groups.setdefault((run.env_id, run.algo), []).append(run)
    return groups


def select_runs(args: Args) -> list[Run]:
    runs_dir = Path(args.runs_dir)
    require(runs_dir.is_dir(), f"--runs-dir {args.runs_dir} is not a folder")
    runs, notes = discover_runs(runs_dir)
    require(bool(runs), f"no run folders with TensorBoard event files under {args.runs_dir}")
    found = sorted({f"{r.env_id}:{r.algo}" for r in runs})
    if args.env_id:
        runs = [r for r in runs if env_key(r.env_id) == env_key(args.env_id)]
    if args.algos:
        wanted = {ALGO_ALIASES.get(a.strip(), a.strip()) for a in args.algos.split(",") if a.strip()}
        runs = [r for r in runs if r.algo in wanted]
    require(bool(runs), f"no runs match --env-id {args.env_id!r} --algos {args.algos!r}; found {', '.join(found)}")
    # One spelling per environment: the recorded one (MinAtar/Breakout-v1) over a folder name's (MinAtar-Breakout-v1).
    spelling = {env_key(r.env_id): r.env_id for r in sorted(runs, key=lambda r: "/" in r.env_id)}
    for run in runs:
        run.env_id = spelling[env_key(run.env_id)]
    runs, dup_notes = keep_newest_per_seed(runs)
    for note in notes + dup_notes:
        print(note, file=sys.stderr)
    return runs


# ---------------------------------------------------------------------------------------------------------------
# Summary and figure


def summarize(groups: dict[tuple[str, str], list[Run]], args: Args) -> list[dict]:
    rows = []
    for (env_id, algo), runs in groups.items():
        with_return = [r for r in runs if args.return_tag in r.scalars]
        row: dict = {
            "env_id": env_id,
            "algo": algo,
            "seeds": [r.seed for r in with_return],
            "num_seeds": len(with_return),
        }
        if with_return:
            finals = np.array([final_value(r.scalars[args.return_tag][1], args.final_fraction) for r in with_return])
            name, point, low, high = estimate(finals, args.bootstrap_reps, args.seed)
            interval = name == "IQM"
            row.update(
                estimator=name,
                final_return=point,
                per_seed_final_return=[float(v) for v in finals],
                min_last_step=int(min(r.scalars[args.return_tag][0][-1] for r in with_return)),
                ci_low=low if interval else None,
                ci_high=high if interval else None,
                range_low=None if interval else low,
                range_high=None if interval else high,
            )
        for key, tag in (
            ("final_accuracy_fresh", ACC_FRESH_TAG),
            ("final_accuracy_train", ACC_TRAIN_TAG),
            *DRIFT_TAGS.items(),
        ):
            accs = [final_value(r.scalars[tag][1], args.final_fraction) for r in runs if tag in r.scalars]
            row[key] = (
                (stats.iqm(np.array(accs)[:, None]) if len(accs) >= IQM_MIN_SEEDS else float(np.mean(accs)))
                if accs
                else None
            )
        rows.append(row)
    return rows


def _fmt(value: float | None, digits: int = 1) -> str:
    if value is None or not math.isfinite(value):
        return "—"
    return f"{value:.{digits}e}" if abs(value) >= 1e4 else f"{value:.{digits}f}"


def format_table(rows: list[dict]) -> str:
    lines = [
        "| env | algorithm | seeds | steps | final return | estimator | 95% CI, or range under 5 seeds "
        "| final acc (fresh) | final acc (train) | final BCE | final extra term | extra/BCE grad |",
        "|-|-|-|-|-|-|-|-|-|-|-|-|",
    ]
    for row in rows:
        if row.get("ci_low") is not None:
            ci = f"[{row['ci_low']:.1f}, {row['ci_high']:.1f}]"
        elif row.get("range_low") is not None and row["num_seeds"] > 1:
            ci = f"range {row['range_low']:.1f} … {row['range_high']:.1f}"
        else:
            ci = "—"
        lines.append(
            f"| {row['env_id']} | {row['algo']} | {row['num_seeds']} | {row.get('min_last_step', '—')} "
            f"| {_fmt(row.get('final_return'))} | {row.get('estimator', '—')} | {ci} "
            f"| {_fmt(row['final_accuracy_fresh'], 3)} | {_fmt(row['final_accuracy_train'], 3)} "
            f"| {_fmt(row['final_bce'], 2)} | {_fmt(row['final_hyper_term'], 2)} | {_fmt(row['final_grad_ratio'], 2)} |"
        )
    return "\n".join(lines)


def _style(algo: str, fallback_index: int) -> tuple[str, str]:
    return ALGO_STYLE.get(algo, (algo, f"C{4 + fallback_index % 6}"))


def _curve_for(runs: list[Run], tag: str, args: Args, smooth: int) -> Curve | None:
    per_run = [r.scalars[tag] for r in runs if tag in r.scalars]
    if not per_run:
        return None
    curve = aggregate_curve(per_run, args.num_points, smooth, args.bootstrap_reps, args.seed)
    fewest = min(len(steps) for steps, _ in per_run)
    if len(curve.grid) == 1 and fewest < smooth:
        print(
            f"note: {runs[0].algo} on {runs[0].env_id}: {tag} is one point (at step {int(curve.grid[0]):,}), drawn "
            f"as a dot: a run has {fewest} value{'s' * (fewest != 1)}, fewer than --smooth {smooth}; a lower "
            "--smooth draws a curve",
            file=sys.stderr,
        )
    longest = max(int(steps[-1]) for steps, _ in per_run)
    if len(per_run) > 1 and curve.grid[-1] < 0.95 * longest:
        print(
            f"note: {runs[0].algo} {tag} stops at step {int(curve.grid[-1])}, where the shortest of "
            f"{len(per_run)} runs ends (longest: {longest})",
            file=sys.stderr,
        )
    return curve


def _draw(ax, curve: Curve, label: str, color: str, linestyle: str = "-", band: bool = True) -> None:
    # A curve of one point (a run shorter than the smoothing window) is a dot: a line through one point is invisible.
    marker = "o" if len(curve.grid) == 1 else None
    ax.plot(curve.grid, curve.point, color=color, linestyle=linestyle, label=label, linewidth=1.6, marker=marker)
    if band and curve.low is not None:
        ax.fill_between(curve.grid, curve.low, curve.high, color=color, alpha=0.2, linewidth=0)


def build_figure(groups: dict[tuple[str, str], list[Run]], args: Args):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    env_ids = sorted({env for env, _ in groups})
    has_accuracy = any(
        tag in r.scalars for runs in groups.values() for r in runs for tag in (ACC_FRESH_TAG, ACC_TRAIN_TAG)
    )
    panels = [
        (args.return_tag, "true episodic return", "game score (rolling mean over games)"),
        (LENGTH_TAG, "episodic length", "agent steps per game"),
    ]
    if has_accuracy:
        panels.append((None, "preference accuracy", "share of pairs ordered as the oracle"))
    fig, axes = plt.subplots(len(env_ids), len(panels), figsize=(5.0 * len(panels), 3.6 * len(env_ids)), squeeze=False)
    for row, env_id in enumerate(env_ids):
        for i, ((_, algo), runs) in enumerate(item for item in groups.items() if item[0][0] == env_id):
            label, color = _style(algo, i)
            for col, (tag, _, _) in enumerate(panels[:2]):
                curve = _curve_for(runs, tag, args, args.smooth)
                if curve is not None:
                    _draw(axes[row][col], curve, f"{label} ({curve.num_runs} seed{'s' * (curve.num_runs != 1)})", color)
            if has_accuracy:
                ax = axes[row][2]
                fresh = _curve_for(runs, ACC_FRESH_TAG, args, 1)
                train = _curve_for(runs, ACC_TRAIN_TAG, args, 1)
                if fresh is not None:
                    _draw(ax, fresh, f"{label}, fresh pairs", color)
                if train is not None:
                    # Train accuracy drawn without a band: it is there to show the gap to fresh pairs (overfitting).
                    _draw(ax, train, f"{label}, training pairs", color, linestyle="--", band=fresh is None)
        for col, (_, title, ylabel) in enumerate(panels):
            ax = axes[row][col]
            ax.set_title(f"{env_id}: {title}", fontsize=10)
            ax.set_xlabel("environment steps")
            ax.set_ylabel(ylabel, fontsize=8)
            ax.grid(alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=7)
    fig.suptitle(
        "Mean over seeds, shaded: their range; from 5 seeds: IQM, shaded: 95% stratified bootstrap interval (rliable)",
        fontsize=9,
    )
    fig.tight_layout()
    return fig


def draw_figure(groups: dict[tuple[str, str], list[Run]], args: Args) -> None:
    import matplotlib.pyplot as plt

    fig = build_figure(groups, args)
    out = Path(args.output)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=150)
    except OSError as err:  # checked before drawing; a folder that changed since, or a full disk
        raise UsageError(f"--output {args.output}: {err.strerror or err}") from None
    finally:
        plt.close(fig)


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = parse_args(Args, argv, description=__doc__.splitlines()[0])
    require(args.num_points >= 2, f"--num-points must be at least 2, got {args.num_points}")
    require(args.smooth >= 1, f"--smooth must be at least 1, got {args.smooth}")
    require(args.bootstrap_reps >= 1, f"--bootstrap-reps must be positive, got {args.bootstrap_reps}")
    require(0.0 < args.final_fraction <= 1.0, f"--final-fraction must be in (0, 1], got {args.final_fraction}")
    require_folder_name(args, "runs_dir")
    # Both destinations are checked before anything is drawn, so that a bad --json leaves no figure behind.
    check_destination(args.output, "--output")
    formats = FigureCanvasBase.get_supported_filetypes()
    extension = Path(args.output).suffix.lstrip(".").lower()
    require(
        not extension or extension in formats,
        f"--output {args.output}: unknown figure format {extension!r}; one of {', '.join(sorted(formats))}",
    )
    if args.json:
        check_destination(args.json, "--json")
    runs = select_runs(args)
    for run in runs:
        run.scalars = load_run(run.path)
    empty = [r for r in runs if args.return_tag not in r.scalars]
    for run in empty:
        print(
            f"note: {run.path} has no {args.return_tag} yet; left out of the return panel and the table",
            file=sys.stderr,
        )
    require(len(empty) < len(runs), f"none of the selected runs has logged {args.return_tag}")
    groups = group_runs(runs)
    rows = summarize(groups, args)
    summary = {"return_tag": args.return_tag, "final_fraction": args.final_fraction, "confidence": CONFIDENCE}
    text = json.dumps(strict_json({**summary, "groups": rows}), indent=2, allow_nan=False) + "\n"
    draw_figure(groups, args)
    print(format_table(rows))
    print(f"\nfigure written to {args.output}")
    if args.json:
        try:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(text)
        except OSError as err:
            raise UsageError(f"--json {args.json}: {err.strerror or err}") from None
    return rows


def check_destination(path_text: str, flag_text: str) -> None:
    """Refuse an output file that cannot be written: a folder, or a place under a file or a read-only folder."""
    path = Path(path_text)
    require(bool(path_text.strip()), f"{flag_text} must name a file")
    require(not path.is_dir(), f"{flag_text} {path_text}: is a folder; name a file")
    if path.exists():
        require(os.access(path, os.W_OK), f"{flag_text} {path_text}: the file is not writable")
        return
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    require(parent.is_dir(), f"{flag_text} {path_text}: {parent} is not a folder")
    require(os.access(parent, os.W_OK | os.X_OK), f"{flag_text} {path_text}: {parent} is not writable")


def strict_json(value):
    """`value` with every NaN or infinite number (an accuracy over pairs that all tie, a run without a value) as
    None, so the file is standard JSON (null) rather than Python's NaN/Infinity, which strict parsers reject."""
    if isinstance(value, dict):
        return {key: strict_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(item) for item in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


if __name__ == "__main__":
    run_cli(main)
