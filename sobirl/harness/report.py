"""A benchmark's results page, rebuilt from the run summaries under docs/results/<bench>/ alone (no runs/ needed):
`python sobirl/benchmark.py report BENCH` writes docs/results/<bench>/README.md and its figures.

Scores are normalised per game as (score - random) / (SAC on the true reward - random), both the means of those
arms' runs. Statistics follow rliable (stats.py): interquartile mean (IQM) and mean with stratified bootstrap
95% intervals over runs x games, probabilities of improvement (over games and on each game), differences of IQMs,
performance profiles; the area under the learning curve beside the final return; and the runs whose summaries
reruns replaced (history.py). A cell with fewer than 5 runs shows the range of its runs, never an interval.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections import defaultdict
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from agents.infra.cli import UsageError
from sobirl.harness import stats
from sobirl.harness.declarations import BENCHMARKS
from sobirl.harness.history import replaced_runs
from sobirl.harness.jobs import select_jobs
from sobirl.harness.summaries import load_results

MIN_RUNS = stats.MIN_RUNS_FOR_INTERVAL


# ---------------------------------------------------------------------------------------------------------------
# Cells and scores


def by_cell(results: Sequence[dict]) -> dict[tuple[str, str], dict[int, dict]]:
    """(arm, game) -> {seed: result}."""
    cells: dict[tuple[str, str], dict[int, dict]] = defaultdict(dict)
    for result in results:
        cells[(result["arm"], result["game"])][int(result["seed"])] = result
    return cells


def baselines(cells, games: Sequence[str], random_arm: str, reference_arm: str):
    """({game: (random's mean final return, SAC's)} for the games where SAC's mean beats random's, {game: why not}
    for the others)."""
    out, missing = {}, {}
    for game in games:
        random_runs = [r["final_return"] for r in cells.get((random_arm, game), {}).values()]
        reference_runs = [r["final_return"] for r in cells.get((reference_arm, game), {}).values()]
        if not random_runs or not reference_runs:
            missing[game] = "no finished runs of random play and SAC yet"
        elif np.mean(reference_runs) <= np.mean(random_runs):
            missing[game] = "SAC on the true reward does not beat random play"
        else:
            out[game] = (float(np.mean(random_runs)), float(np.mean(reference_runs)))
    return out, missing


def normalise(score: float, base: tuple[float, float]) -> float:
    low, high = base
    return (score - low) / (high - low)


def common_seeds(cells, arm: str, games: Sequence[str]) -> list[int]:
    """The seeds an arm has finished on every one of `games`."""
    sets = [set(cells.get((arm, game), {})) for game in games]
    return sorted(set.intersection(*sets)) if sets else []


def score_matrix(cells, arm: str, games: Sequence[str], base, seeds: Sequence[int]) -> np.ndarray:
    """(runs, games) normalised final returns of `seeds`."""
    return np.array(
        [[normalise(cells[(arm, game)][seed]["final_return"], base[game]) for game in games] for seed in seeds]
    )


# ---------------------------------------------------------------------------------------------------------------
# Formatting


def fmt(value: float | None, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    text = f"{value:.2e}" if abs(value) >= 1e4 else f"{value:,.{digits}f}"
    return text.replace("-", "−")


def level_text(confidence: float) -> str:
    """A confidence level as a percentage with at most three significant digits: 0.99 -> 99%, 0.98333 -> 98.3%."""
    return f"{100 * confidence:.3g}%"


def interval_text(point: float, low: float, high: float, digits: int = 2) -> str:
    return f"{fmt(point, digits)} [{fmt(low, digits)}, {fmt(high, digits)}]"


def range_text(values: Sequence[float], digits: int = 2) -> str:
    """The range of the runs (one run: its value)."""
    low, high = stats.run_range(np.asarray(values, dtype=np.float64))
    if len(values) == 1:
        return f"one run: {fmt(low, digits)}"
    return f"range {fmt(low, digits)} … {fmt(high, digits)}"


def wall_time_text(runs) -> str:
    """The range of the runs' wall times, from the runs whose every attempt was timed (the others are counted)."""
    timed = [r["wall_seconds"] / 60 for r in runs if r.get("wall_seconds") and not r.get("untimed_attempts")]
    untimed = sum(1 for r in runs if r.get("untimed_attempts"))
    text = "—"
    if timed:
        low, high = f"{min(timed):.1f}", f"{max(timed):.1f}"
        text = f"{low} min" if low == high else f"{low}–{high} min"
    return text + (f" ({untimed} run{'s' if untimed > 1 else ''} not fully timed)" if untimed else "")


def with_enough_runs(per_arm: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The arms whose (runs, ...) arrays have MIN_RUNS runs or more: those that get intervals."""
    return {name: runs for name, runs in per_arm.items() if len(runs) >= MIN_RUNS}


def single_game_estimate(values: Sequence[float], reps: int, seed: int) -> str:
    """IQM [95% interval] over runs, or the range with fewer than MIN_RUNS runs."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) < MIN_RUNS:
        return range_text(values)
    points, intervals = stats.interval_estimates({"x": values[:, None]}, lambda x: np.array([stats.iqm(x)]), reps, seed)
    return interval_text(points["x"][0], intervals["x"][0, 0], intervals["x"][1, 0])


# ---------------------------------------------------------------------------------------------------------------
# The page


def provenance(results: Sequence[dict]) -> list[str]:
    commits = sorted({c[:10] for r in results for c in r.get("commits", [])})
    machines = sorted({m for r in results for m in r.get("machines", [])})
    lines = [f"- Runs: {len(results)}; commits: {', '.join(commits) or 'unknown'}"]
    if any(r.get("dirty") for r in results):
        lines.append("- Some runs started from a working tree with uncommitted code changes (flagged `dirty`).")
    for text in machines:
        m, runs = json.loads(text), sum(text in r.get("machines", []) for r in results)
        lines.append(
            f"- Machine: {m.get('cpu')}, {m.get('cores')} cores, AVX-512 {'yes' if m.get('avx512') else 'no'}, "
            f"torch {m.get('torch')}: {runs} {'run' if runs == 1 else 'runs'}"
        )
    if len(machines) > 1:
        lines.append("- Wall times mix these machines: compare them only within one machine.")
    devices = sorted({r.get("device") or "unknown" for r in results})
    lines.append(f"- Device: {', '.join(devices)}; one thread per run, {concurrency_text(results)}")
    return lines


def concurrency_text(results: Sequence[dict]) -> str:
    """How many runs ran at a time, as the summaries recorded it (the --workers of the `run` that started them)."""
    recorded = sorted({w for r in results for w in r.get("workers", [])})
    if not recorded:
        # Summaries from before the attempts recorded --workers: every committed one ran two at a time (see
        # docs/results/README.md).
        return "two runs at a time"
    unrecorded = sum(1 for r in results if not r.get("workers"))
    text = "one run" if recorded == [1] else f"{' or '.join(map(str, recorded))} runs"
    return text + " at a time per `run` (its --workers)" + (f"; not recorded for {unrecorded}" if unrecorded else "")


def seeds_text(seeds: Sequence[int]) -> str:
    """[1, 2, 3, 5] -> "seeds 1-3, 5"; [4] -> "seed 4"."""
    seeds, parts = sorted(seeds), []
    for seed in seeds:
        if parts and seed == parts[-1][1] + 1:
            parts[-1][1] = seed
        else:
            parts.append([seed, seed])
    text = ", ".join(str(low) if low == high else f"{low}-{high}" for low, high in parts)
    return f"seed{'s' if len(seeds) > 1 else ''} {text}"


def missing_runs(bench, results: Sequence[dict]) -> tuple[int, str]:
    """(how many, which) of the benchmark's declared runs have no summary: "sobirl (Breakout seed 1), ..."."""
    have = {(r["game"], r["arm"], int(r["seed"])) for r in results}
    missing: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    count = 0
    for job in select_jobs(bench):
        if (job.game, job.arm.name, job.seed) not in have:
            missing[job.arm.name][job.game].append(job.seed)
            count += 1
    arms = [
        f"{arm} ({'; '.join(f'{game} {seeds_text(seeds)}' for game, seeds in missing[arm].items())})"
        for arm in bench.arm_names
        if arm in missing
    ]
    return count, ", ".join(arms)


def returns_table(bench, cells, reps: int) -> list[str]:
    lines = [
        "| game | arm | runs | mean final return | IQM [95% CI] or range | wall time per run |",
        "|---|---|---|---|---|---|",
    ]
    for game in bench.games:
        for arm in bench.arms:
            runs = cells.get((arm.name, game), {})
            if not runs:
                continue
            values = [r["final_return"] for r in runs.values()]
            wall = wall_time_text(runs.values())
            lines.append(
                f"| {game} | {arm.title} | {len(values)} | {fmt(float(np.mean(values)))} | "
                f"{single_game_estimate(values, reps, seed=len(lines))} | {wall} |"
            )
    return lines


def arm_rows(bench, cells, games, reps: int, score) -> tuple[list[str], dict[str, np.ndarray]]:
    """One table row per arm (random play, the reference and frozen-reward arms aside): the IQM and mean over runs x
    games of `score(arm, seeds)` (a runs x games matrix) with stratified-bootstrap intervals from MIN_RUNS runs, the
    range of the runs' means over games below that; and the matrices."""
    lines, matrices = [], {}
    for arm in bench.arms:
        if arm.name in (bench.random_arm, bench.reference_arm) or arm.frozen_from:
            continue
        seeds = common_seeds(cells, arm.name, games)
        if not seeds:
            continue
        matrix = score(arm.name, seeds)
        matrices[arm.name] = matrix
        if len(seeds) < MIN_RUNS:
            lines.append(
                f"| {arm.title} | {len(seeds)} | {range_text(matrix.mean(axis=1))} (mean over games per run) | — |"
            )
    enough = with_enough_runs(matrices)
    if enough:
        points, intervals = stats.aggregate_estimates(enough, reps)
        for name, matrix in enough.items():
            p, ci = points[name], intervals[name]
            lines.append(
                f"| {bench.arm(name).title} | {len(matrix)} | {interval_text(p[0], ci[0, 0], ci[1, 0])} | "
                f"{interval_text(p[1], ci[0, 1], ci[1, 1])} |"
            )
    return lines, matrices


def aggregate_table(bench, cells, base, reps: int) -> tuple[list[str], dict[str, np.ndarray]]:
    games = [g for g in bench.games if g in base]
    lines = [
        f"Normalised over {', '.join(games)}: (score − random) / (SAC − random), per run and game.",
        "",
        "| arm | runs per game | IQM [95% CI] | mean [95% CI] |",
        "|---|---|---|---|",
    ]
    rows, matrices = arm_rows(
        bench, cells, games, reps, lambda arm, seeds: score_matrix(cells, arm, games, base, seeds)
    )
    return lines + rows, matrices


@dataclasses.dataclass(frozen=True)
class GameChoice:
    """What a pilot's rule made of one game: each arm's (name, normalised IQM, runs), and the chosen arm (None: the
    rule keeps none), or `waiting` runs still missing (then nothing is chosen yet)."""

    iqms: tuple[tuple[str, float, int], ...]
    chosen: str | None
    waiting: int


def pilot_choices(bench, cells, base) -> dict[str, GameChoice]:
    """The declared rule (bench.choice) applied on each normalised game, once all its declared runs have finished."""
    choices = {}
    for game in (g for g in bench.games if g in base):
        waiting = sum(job.seed not in cells.get((job.arm.name, game), {}) for job in select_jobs(bench, games=[game]))
        iqms = tuple(
            (arm.name, stats.iqm(score_matrix(cells, arm.name, [game], base, sorted(runs))), len(runs))
            for arm in bench.arms
            if (runs := cells.get((arm.name, game)))
        )
        chosen = None if waiting else bench.choice.pick([(name, value) for name, value, _ in iqms])
        choices[game] = GameChoice(iqms, chosen, waiting)
    return choices


def choice_lines(bench, choices: dict[str, GameChoice]) -> list[str]:
    lines = [
        f"The rule, written before the runs: {bench.choice.rule}. Normalised IQM of final return over each arm's runs "
        "on the game.",
        "",
        "| game | arm | runs | normalised IQM | chosen |",
        "|---|---|---|---|---|",
    ]
    verdicts = []
    for game, choice in choices.items():
        for name, value, runs in choice.iqms:
            mark = "yes" if name == choice.chosen else ""
            lines.append(f"| {game} | {bench.arm(name).title} | {runs} | {fmt(value)} | {mark} |")
        if choice.waiting:
            verdicts.append(f"- {game}: not chosen yet, {choice.waiting} declared runs still missing.")
        elif choice.chosen is None:
            verdicts.append(f"- {game}: no arm meets the rule; the game leaves what this pilot informs.")
        else:
            verdicts.append(f"- {game}: {bench.arm(choice.chosen).title}.")
    return [*lines, "", *verdicts]


def arm_title(bench, name: str) -> str:
    """An arm's legend text, from this benchmark or the one it takes its baselines from."""
    for source in (bench, BENCHMARKS.get(bench.baselines_from)):
        if source is not None and any(arm.name == name for arm in source.arms):
            return source.arm(name).title
    return name


def improvement_reading(
    low: float, high: float, first: str, second: str, runs: int, dominance: int = 0, games: int = 1
) -> str:
    """What a probability-of-improvement interval supports: one arm ahead only when the interval, as printed (two
    decimals), excludes 0.5. Where every run of one arm scores above every run of the other (`dominance`, from
    stats.dominance: the interval is then 1.00 [1.00, 1.00] or 0.00 [0.00, 0.00], which says nothing of its own), the
    reading says so."""
    on_each = ", on each game" if games > 1 else ""
    if dominance > 0:
        return f"{first} ahead: every run of {first} above every run of {second}{on_each}"
    if dominance < 0:
        return f"{second} ahead: every run of {second} above every run of {first}{on_each}"
    if round(low, 2) > 0.5:
        return f"{first} ahead"
    if round(high, 2) < 0.5:
        return f"{second} ahead"
    return f"not separated at {runs} runs per game"


def difference_reading(low: float, high: float, first: str, second: str, runs: int) -> str:
    """What an interval of IQM(first) - IQM(second) supports: one IQM higher only where the interval, as printed
    (two decimals), excludes 0."""
    if round(low, 2) > 0:
        return f"{first} higher"
    if round(high, 2) < 0:
        return f"{second} higher"
    return f"not separated at {runs} runs per game"


def comparison_pairs(bench, cells, games: Sequence[str]):
    """For each declared comparison, in order: (name, (first's title, second's title), the seeds both arms share on
    every one of `games`, first arm, second arm)."""
    out = []
    for x, y in bench.comparisons:
        seeds = sorted(set(common_seeds(cells, x, games)) & set(common_seeds(cells, y, games)))
        titles = (arm_title(bench, x), arm_title(bench, y))
        out.append((f"{titles[0]} vs {titles[1]}", titles, seeds, x, y))
    return out


@dataclasses.dataclass(frozen=True)
class Improvement:
    """One declared comparison's probability of improvement over the normalised games: its point, 95% interval and
    Bonferroni-corrected interval (over the benchmark's comparisons), the runs per game it used and `dominance`
    (stats.dominance); `point` is None where fewer than MIN_RUNS seeds are shared."""

    name: str
    titles: tuple[str, str]
    runs: int
    point: float | None = None
    interval: tuple[float, float] = (float("nan"), float("nan"))
    corrected: tuple[float, float] = (float("nan"), float("nan"))
    dominance: int = 0


def improvements(bench, cells, base, reps: int) -> dict[tuple[str, str], Improvement]:
    """Every declared comparison's Improvement, keyed by (first arm, second arm), from one bootstrap of them all."""
    games = [g for g in bench.games if g in base]
    level = stats.bonferroni_confidence(len(bench.comparisons))
    out, pairs = {}, {}
    for name, titles, seeds, x, y in comparison_pairs(bench, cells, games):
        out[(x, y)] = Improvement(name, titles, len(seeds))
        if len(seeds) >= MIN_RUNS:
            pairs[name] = (score_matrix(cells, x, games, base, seeds), score_matrix(cells, y, games, base, seeds))
    if pairs:
        points, intervals = stats.probability_of_improvement(pairs, reps)
        _, corrected = stats.probability_of_improvement(pairs, reps, confidence=level)
        for key, found in out.items():
            if found.name in pairs:
                out[key] = dataclasses.replace(
                    found,
                    point=points[found.name],
                    interval=tuple(intervals[found.name]),
                    corrected=tuple(corrected[found.name]),
                    dominance=stats.dominance(*pairs[found.name]),
                )
    return out


def improvement_table(bench, found: dict[tuple[str, str], Improvement], games: int) -> list[str]:
    level = stats.bonferroni_confidence(len(bench.comparisons))
    lines = [
        "P(first > second): the probability that a run of the first arm scores above a run of the second on a game "
        f"drawn at random, with a 95% stratified-bootstrap interval, on the seeds both arms share ({MIN_RUNS} or "
        f"more). An arm is read as ahead only where the interval excludes 0.5; the {len(bench.comparisons)} "
        "intervals are not corrected for being several. The last column widens each to the level at which all of "
        f"them hold together at 95% (Bonferroni over the {len(bench.comparisons)} comparisons).",
        "",
        f"| comparison (first vs second) | runs per game | P(first > second) [95% CI] | reading | "
        f"[{level_text(level)} CI], Bonferroni |",
        "|---|---|---|---|---|",
    ]
    missing = [one for one in found.values() if one.point is None]
    for one in missing:
        lines.append(f"| {one.name} | {one.runs} | — (fewer than {MIN_RUNS} runs) | — | — |")
    for one in found.values():
        if one.point is None:
            continue
        reading = improvement_reading(*one.interval, *one.titles, one.runs, one.dominance, games)
        lines.append(
            f"| {one.name} | {one.runs} | {interval_text(one.point, *one.interval)} | {reading} | "
            f"{interval_text(one.point, *one.corrected)} |"
        )
    return lines


def success_lines(bench, found: dict[tuple[str, str], Improvement], results: Sequence[dict]) -> list[str]:
    """The declared success rule (bench.success) applied to the comparisons it reads, once every declared run of the
    arms it names has finished."""
    rule = bench.success
    level = level_text(stats.bonferroni_confidence(len(bench.comparisons)))
    named = {rule.baseline, *(arm for pair in rule.arms for arm in pair if arm)}
    have = {(r["game"], r["arm"], int(r["seed"])) for r in results}
    waiting = sum((job.game, job.arm.name, job.seed) not in have for job in select_jobs(bench) if job.arm.name in named)
    lines = [f"The rule, written before the runs: {rule.rule}.", ""]
    if waiting:
        return [*lines, f"Not applied yet: {waiting} declared runs of the arms it reads are still missing."]

    def cell(key: tuple[str, str]) -> tuple[str, str, bool]:
        one = found[key]
        if one.point is None:
            return "—", "—", False
        if one.dominance:  # the interval is then 1.00 [1.00, 1.00] or 0.00 [0.00, 0.00], which says nothing itself
            text = "every run above every run" if one.dominance > 0 else "every run below every run"
            return f"{fmt(one.point)}: {text} of {one.titles[1]}", "—", one.dominance > 0
        return (
            interval_text(one.point, *one.interval),
            interval_text(one.point, *one.corrected),
            round(one.interval[0], 2) > 0.5,
        )

    lines += [
        f"| arm | P(arm > {arm_title(bench, rule.baseline)}) [95% CI] | [{level} CI], Bonferroni | "
        f"P(arm > its placebo) [95% CI] | [{level} CI], Bonferroni | helps by the rule |",
        "|---|---|---|---|---|---|",
    ]
    helped = []
    for arm, placebo in rule.arms:
        over_base, over_base_corrected, above_base = cell((arm, rule.baseline))
        over_placebo, over_placebo_corrected, above_placebo = (
            cell((arm, placebo)) if placebo else ("no placebo", "—", True)
        )
        helps = above_base and above_placebo
        if helps:
            helped.append(arm_title(bench, arm))
        lines.append(
            f"| {arm_title(bench, arm)} | {over_base} | {over_base_corrected} | {over_placebo} | "
            f"{over_placebo_corrected} | {'yes' if helps else 'no'} |"
        )
    if helped:
        return [*lines, "", f"By the rule, {' and '.join(helped)} helped."]
    return [
        *lines,
        "",
        "By the rule, no arm helped. The diagnostics that explain it are below: the extra / BCE gradient ratio and the "
        "share of off-policy pairs under Reward diagnostics, the pooled term's split-half cosine in its own table.",
    ]


def per_game_improvement_table(bench, cells, base, reps: int) -> list[str]:
    """P(first > second) of each declared comparison on each game alone, on the seeds both arms share on that game:
    the same bootstrap as the aggregate's, whose strata are then that one game's runs."""
    games = [g for g in bench.games if g in base]
    lines = [
        "The same probability on each game alone, on the seeds both arms share on that game, with a 95% bootstrap "
        f"interval over that game's runs (the stratified bootstrap of one game). These {len(bench.comparisons)} × "
        f"{len(games)} intervals are not corrected for being several.",
        "",
        "| comparison (first vs second) | game | runs | P(first > second) [95% CI] | reading |",
        "|---|---|---|---|---|",
    ]
    pairs, rows = {}, []
    for name, titles, _, x, y in comparison_pairs(bench, cells, games):
        for game in games:
            seeds = sorted(set(cells.get((x, game), {})) & set(cells.get((y, game), {})))
            key = f"{name} | {game}"
            rows.append((key, name, game, titles, len(seeds)))
            if len(seeds) >= MIN_RUNS:
                pairs[key] = (score_matrix(cells, x, [game], base, seeds), score_matrix(cells, y, [game], base, seeds))
    points, intervals = stats.probability_of_improvement(pairs, reps) if pairs else ({}, {})
    for key, name, game, titles, runs in rows:
        if key not in pairs:
            lines.append(f"| {name} | {game} | {runs} | — (fewer than {MIN_RUNS} runs) | — |")
            continue
        low, high = intervals[key]
        reading = improvement_reading(low, high, *titles, runs, stats.dominance(*pairs[key]))
        lines.append(f"| {name} | {game} | {runs} | {interval_text(points[key], low, high)} | {reading} |")
    return lines


def iqm_difference_table(bench, cells, base, reps: int) -> list[str]:
    """IQM(first) - IQM(second) of the normalised final scores of each declared comparison, on the seeds both arms
    share on every game, with a 95% stratified-bootstrap interval of the difference."""
    games = [g for g in bench.games if g in base]
    lines = [
        "The IQM of the first arm's normalised final scores minus the second's, on the seeds both arms share, with a "
        "95% stratified-bootstrap interval of the difference: each resample draws the runs of both arms with "
        "replacement within each game, recomputes both IQMs and takes their difference. One IQM is read as higher "
        f"only where the interval excludes 0; the {len(bench.comparisons)} intervals are not corrected for being "
        "several.",
        "",
        "| comparison (first vs second) | runs per game | IQM first − IQM second [95% CI] | reading |",
        "|---|---|---|---|",
    ]
    pairs, counts, titles = {}, {}, {}
    for name, titles[name], seeds, x, y in comparison_pairs(bench, cells, games):
        if len(seeds) < MIN_RUNS:
            lines.append(f"| {name} | {len(seeds)} | — (fewer than {MIN_RUNS} runs) | — |")
            continue
        pairs[name] = (score_matrix(cells, x, games, base, seeds), score_matrix(cells, y, games, base, seeds))
        counts[name] = len(seeds)
    if pairs:
        points, intervals = stats.iqm_difference(pairs, reps)
        for name in pairs:
            low, high = intervals[name]
            reading = difference_reading(low, high, *titles[name], counts[name])
            lines.append(f"| {name} | {counts[name]} | {interval_text(points[name], low, high)} | {reading} |")
    return lines


def curve_area(curve: Sequence[float | None], base: tuple[float, float]) -> float:
    """The normalised area under a run's learning curve, divided by its steps: the mean over the fixed grid of the
    return curve normalised like the final return. A grid point is the mean score of the games that ended in its
    window (the previous point, this one], so the mean of the points is the area under that step function over the
    run's steps. A point before the run's first game ended (None) counts as random play's level, 0 (the agents act
    at random until learning starts), as in the aggregate figure."""
    values = normalise_curve(curve, base)
    return float(np.nan_to_num(values, nan=0.0).mean())


def area_table(bench, cells, base, reps: int) -> list[str]:
    """IQM and mean over runs x games of each arm's normalised area under the learning curve (`curve_area`), with
    stratified-bootstrap intervals from MIN_RUNS runs, the range of the runs' means over games below."""
    games = [g for g in bench.games if g in base]
    lines = [
        "A second statistic beside the final return (which stays the headline): the area under each run's learning "
        "curve divided by its steps, i.e. the mean over the 20 points of the fixed step grid of its return curve "
        "(each point the mean true score of the games that ended since the previous point), normalised per game like "
        "the final return, with random play's and SAC's mean final returns. 1 would be SAC's final level from the "
        "first step; a point before a run's first game ended would count as random play's level, 0.",
        "",
        "| arm | runs per game | IQM [95% CI] | mean [95% CI] |",
        "|---|---|---|---|",
    ]
    area = lambda arm, seeds: np.array(
        [[curve_area(cells[(arm, g)][s]["return_curve"], base[g]) for g in games] for s in seeds]
    )
    return lines + arm_rows(bench, cells, games, reps, area)[0]


def replaced_table(bench, replaced: Sequence[dict], unavailable: str | None) -> list[str]:
    """The runs whose summaries replaced others (history.replaced_runs), and how they were found."""
    how = (
        "Runs whose summary replaced an earlier run's: the harness runs a job again when its run folder, which a "
        "frozen-reward check or a demonstration recording needs, was lost, and the new summary takes the old one's "
        "place, so every table above uses the replacing run only. Found from the `replaces` record the harness "
        "writes into a rerun's summary and from the git history of the summary files: a committed version of a "
        "summary with a `finished` time other than the current one's was another run."
    )
    if unavailable:
        how += f" Here {unavailable}: only the runs whose summaries record it are listed."
    lines = [how, ""]
    if not replaced:
        return [*lines, "None."]
    order = {(game, arm): k for k, (game, arm) in enumerate((g, a) for g in bench.games for a in bench.arm_names)}
    lines += [
        "| game | arm | seed | replaced run: finished, final return | current run: finished, final return | found in |",
        "|---|---|---|---|---|---|",
    ]

    def run_text(record: dict) -> str:
        when = str(record.get("finished") or "unknown")[:16].replace("T", " ")
        value = record.get("final_return")
        return f"{when}, {fmt(value) if value is not None else '—'}"

    for entry in sorted(replaced, key=lambda e: (order.get((e["game"], e["arm"]), len(order)), e["seed"])):
        old = "; ".join(run_text(record) for record in entry["replaced"])
        lines.append(
            f"| {entry['game']} | {arm_title(bench, entry['arm'])} | {entry['seed']} | {old} | "
            f"{run_text(entry['current'])} | {entry['found']} |"
        )
    return lines


def label_curves(bench) -> dict[str, list[tuple[int, str, int]]]:
    """{curve: [(labels, arm, last seed), ...] in order of labels}: the arms that name the curve, and the curve's own
    arm (of this benchmark or of the one it takes its baselines from) at its own labels, on the seeds the curve's
    other points run (main's DRLHF runs 10 seeds; the labels benchmark's points 5)."""
    curves: dict[str, list[tuple[int, str, int]]] = defaultdict(list)
    for arm in bench.arms:
        if arm.curve:
            curves[arm.curve].append((bench.labels(arm), arm.name, bench.seed_offset + arm.seeds))
    for name, points in curves.items():
        owners = [b for b in (bench, BENCHMARKS.get(bench.baselines_from)) if b and name in b.arm_names]
        if not owners:
            raise UsageError(f"benchmark {bench.name}: curve {name!r} names no arm of it or of {bench.baselines_from}")
        owner = owners[0]
        last_seed = max(seed for _, _, seed in points)
        points.append((owner.labels(owner.arm(name)), name, last_seed))
    return {name: sorted(points) for name, points in curves.items()}


def labels_used_text(used: Sequence[int | None]) -> str:
    """The labels a point's runs used: one count, or their range; a dash if a summary does not say."""
    if not used or any(count is None for count in used):
        return "—"
    low, high = min(used), max(used)
    return f"{low:,}" if low == high else f"{low:,}–{high:,}"


def label_table(bench, cells, base, reps: int) -> tuple[list[str], dict[str, list[tuple]]]:
    """The normalised final score against labels, per curve: table lines, and {curve: [(labels, point, low, high,
    has interval)]} for the figure (IQM and its 95% interval from MIN_RUNS runs; below, the mean and the range)."""
    games = [g for g in bench.games if g in base]
    curves = label_curves(bench)
    matrices, used = {}, {}
    for points in curves.values():
        for _, arm, last_seed in points:
            if seeds := [seed for seed in common_seeds(cells, arm, games) if seed <= last_seed]:
                matrices[arm] = score_matrix(cells, arm, games, base, seeds)
                used[arm] = [cells[(arm, game)][seed].get("labels") for game in games for seed in seeds]
    enough = with_enough_runs(matrices)
    estimates, intervals = stats.aggregate_estimates(enough, reps) if enough else ({}, {})
    lines = [
        "| method | label budget | labels used | runs per game | IQM normalised score [95% CI] or range |",
        "|---|---|---|---|---|",
    ]
    drawn: dict[str, list[tuple]] = {}
    for curve, points in curves.items():
        for labels, arm, _ in points:
            if arm not in matrices:
                lines.append(f"| {arm_title(bench, curve)} | {labels:,} | — | 0 | — |")
                continue
            if arm in enough:
                point, low, high = estimates[arm][0], intervals[arm][0, 0], intervals[arm][1, 0]
                text = interval_text(point, low, high)
            else:
                per_run = matrices[arm].mean(axis=1)
                point, (low, high), text = per_run.mean(), stats.run_range(per_run), range_text(per_run)
            drawn.setdefault(curve, []).append((labels, float(point), float(low), float(high), arm in enough))
            used_text = labels_used_text(used[arm])
            lines.append(f"| {arm_title(bench, curve)} | {labels:,} | {used_text} | {len(matrices[arm])} | {text} |")
    return lines, drawn


def draw_label_curves(bench, drawn, path: Path) -> None:
    """Normalised final score against labels (log axis), one line per curve: filled points are IQMs with their 95%
    interval, hollow ones the mean of fewer than MIN_RUNS runs with their range."""
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for k, (curve, points) in enumerate(drawn.items()):
        labels, point, low, high, enough = (np.array(column) for column in zip(*points))
        color = f"C{k}"
        ax.plot(labels, point, color=color, label=arm_title(bench, curve))
        ax.fill_between(labels, low, high, color=color, alpha=0.15)
        ax.plot(labels[enough], point[enough], "o", color=color)
        ax.plot(labels[~enough], point[~enough], "o", markerfacecolor="white", color=color)
    ax.set_xscale("log")
    ax.set_xlabel("label budget (--total-pairs)")
    ax.set_ylabel(f"normalised final score (IQM; hollow: mean of < {MIN_RUNS} runs)")
    ax.set_title(f"{bench.name}: 0 = random, 1 = SAC on the true reward")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def diagnostic(run: dict, key: str) -> float | None:
    """A run's final diagnostic; summaries written before commit 7d1fd73 hold the extra / BCE gradient ratio times
    the reward batch size (the epoch scaled it as if it were a per-pair mean), which is divided out here."""
    value = run.get("diagnostics", {}).get(key)
    if key != "extra_grad_ratio" or value is None or run.get("extra_grad_ratio_fixed"):
        return value
    return value / (run.get("flags") or {}).get("reward_batch_size", 64)


def median_rows(bench, cells, columns, present: str) -> list[str]:
    """One table row per game (and, with several games, for all games pooled) and arm whose runs logged `present`:
    each column's median over the runs with their range."""
    pooled = [(game, [game]) for game in bench.games] + (
        [("all games", list(bench.games))] if len(bench.games) > 1 else []
    )
    lines = [
        "| game | arm | runs | " + " | ".join(title for _, title, _ in columns) + " |",
        "|---|---|---|" + "---|" * len(columns),
    ]
    for label, games in pooled:
        for arm in bench.arms:
            runs = [run for game in games for run in cells.get((arm.name, game), {}).values()]
            if not runs or not any(r.get("diagnostics", {}).get(present) is not None for r in runs):
                continue
            row = []
            for key, _, digits in columns:
                values = [diagnostic(r, key) for r in runs]
                values = np.array([v for v in values if v is not None], dtype=np.float64)
                if not len(values):
                    row.append("—")
                    continue
                low, high = stats.run_range(values)
                row.append(f"{fmt(float(np.median(values)), digits)} [{fmt(low, digits)}, {fmt(high, digits)}]")
            lines.append(f"| {label} | {arm.title} | {len(runs)} | " + " | ".join(row) + " |")
    return lines


def diagnostics_table(bench, cells) -> list[str]:
    columns = [
        ("accuracy_fresh", "fresh-pair accuracy", 2),
        ("game_spearman", "Spearman, whole games", 2),
        ("fresh_spearman", "Spearman, fresh fragments", 2),
        ("bce", "final cross-entropy", 2),
        ("hyper_term", "final extra term", 2),
        ("extra_grad_ratio", "extra / BCE gradient", 1),
        ("offpolicy_share", "off-policy pairs", 2),
    ]
    return [
        "Median over runs of each run's last 10% of reward phases (range in brackets)"
        + (
            "; the rows for all games pool every game's runs of an arm (runs there counts runs × games, and a game "
            "with more runs weighs more)."
            if len(bench.games) > 1
            else "."
        )
        + " Extra / BCE gradient: the ratio of the norms of the two terms' gradients on the first minibatch of a"
        " phase's last epoch; runs before commit 7d1fd73 logged it times the reward batch size (64), which is divided"
        " out here. With the pooled term it is that minibatch's own implicit term before the pooling, the scale"
        " beta and the cap (the step's extra term is then 0: the pooled term joins the epoch's last step alone; the"
        " next table has what it adds). Off-policy pairs: the share of the stored pairs collected before the latest"
        " agent phase, by an earlier policy than the one the implicit term's pi is.",
        "",
        *median_rows(bench, cells, columns, "bce"),
    ]


def pooled_table(bench, cells) -> list[str]:
    """The pooled implicit term's diagnostics, for the arms that pool it (--implicit-pooling)."""
    rows = median_rows(
        bench,
        cells,
        [
            ("split_half_cosine", "split-half cosine", 2),
            ("pooled_ratio", "pooled / cross-entropy gradient, before the cap", 2),
            ("pooled_capped", "share of phases capped", 2),
            ("implicit_pairs_share", "share of stored pairs read", 2),
        ],
        "pooled_ratio",
    )
    if len(rows) == 2:
        return []
    return [
        "The pooled implicit term (--implicit-pooling), on each reward epoch's last step; median over runs of each "
        "run's last 10% of reward phases (range in brackets). Split-half cosine: the cosine between the summed "
        "gradients of the epoch's even and odd minibatches, near 0 where the pooled direction is noise and near 1 "
        "where the minibatches share it. Pooled / cross-entropy gradient: the norm of the pooled term, times beta, "
        "over the norm of that step's cross-entropy gradient, before the cap (--implicit-cap) shrinks it to at most "
        "the cap; share capped: the share of those phases in which it did. Share of stored pairs read: the share "
        "of the stored pairs the term reads with --implicit-pairs latest (the latest agent phase's pairs, collected "
        "by a policy close to the term's pi: with the default window, one minus the off-policy share above) or "
        "learned; — where it reads them all.",
        "",
        *rows,
    ]


def frozen_table(bench, cells) -> list[str]:
    frozen = [arm for arm in bench.arms if arm.frozen_from]
    lines = [
        "A fresh SAC trained from scratch on each run's final reward model, against the run's own final return "
        "(same game and seed). A large drop points at reward hacking: a reward the policy could only use while it "
        "was being learned.",
        "",
        "| game | reward from | runs | run's own return (mean) | frozen-reward SAC (mean) | difference per seed |",
        "|---|---|---|---|---|---|",
    ]
    for game in bench.games:
        for arm in frozen:
            runs = cells.get((arm.name, game), {})
            sources = cells.get((arm.frozen_from, game), {})
            seeds = sorted(set(runs) & set(sources))
            if not seeds:
                continue
            own = [sources[s]["final_return"] for s in seeds]
            frozen_returns = [runs[s]["final_return"] for s in seeds]
            differences = ", ".join(fmt(f - o) for f, o in zip(frozen_returns, own))
            lines.append(
                f"| {game} | {bench.arm(arm.frozen_from).title} | {len(seeds)} | {fmt(float(np.mean(own)))} | "
                f"{fmt(float(np.mean(frozen_returns)))} | {differences} |"
            )
    return lines


# ---------------------------------------------------------------------------------------------------------------
# Figures


def arm_colors(bench) -> dict[str, str]:
    return {arm.name: f"C{k % 10}" for k, arm in enumerate(bench.arms)}


def curve_matrix(runs: Sequence[dict], key: str = "return_curve") -> np.ndarray:
    return np.array([[np.nan if v is None else v for v in r[key]] for r in runs], dtype=np.float64)


def draw_returns(bench, cells, path: Path, reps: int) -> None:
    colors = arm_colors(bench)
    fig = Figure(figsize=(5.2 * len(bench.games), 3.8))
    axes = fig.subplots(1, len(bench.games), squeeze=False)
    for ax, game in zip(axes[0], bench.games):
        for arm in bench.arms:
            runs = list(cells.get((arm.name, game), {}).values())
            if not runs or arm.frozen_from:
                continue
            grid = np.asarray(runs[0]["grid"])
            matrix = curve_matrix(runs)
            usable = np.all(np.isfinite(matrix), axis=0)
            if not usable.any():
                continue
            x, m = grid[usable], matrix[:, usable]
            if len(runs) >= MIN_RUNS:
                points, intervals = stats.curve_estimates({"c": m[:, None, :]}, reps=max(200, reps // 10))
                y, low, high = points["c"], intervals["c"][0], intervals["c"][1]
            else:
                y, low, high = m.mean(0), m.min(0), m.max(0)
            ax.plot(x, y, color=colors[arm.name], label=f"{arm.title} ({len(runs)})")
            ax.fill_between(x, low, high, color=colors[arm.name], alpha=0.15, linewidth=0)
        ax.set_title(f"MinAtar {game}")
        ax.set_xlabel("env steps")
        ax.set_ylabel("true game score (mean per 5% of steps)")
        ax.grid(alpha=0.3)
    handles, labels = max((ax.get_legend_handles_labels() for ax in axes[0]), key=lambda hl: len(hl[1]))
    fig.legend(handles, labels, fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 0.9))
    fig.suptitle(f"{bench.name}: IQM over runs, 95% bootstrap band (5+ runs) or min–max (fewer); runs in brackets")
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")


def draw_aggregate(bench, cells, base, matrices: dict[str, np.ndarray], path: Path, reps: int) -> None:
    """IQM normalised score against env steps and the performance profiles of the final scores: with a stratified
    bootstrap band for arms of MIN_RUNS runs or more; for fewer, dashed: the mean of the runs' means over games and
    their min-max (their curves say what happened, not what to expect)."""
    games = [g for g in bench.games if g in base]
    colors = arm_colors(bench)
    fig = Figure(figsize=(12, 4))
    left, right = fig.subplots(1, 2)
    curves = {}
    for name in matrices:
        seeds = common_seeds(cells, name, games)
        stacked = np.stack(
            [np.stack([normalise_curve(cells[(name, g)][s]["return_curve"], base[g]) for g in games]) for s in seeds]
        )  # (runs, games, points)
        if np.all(np.isfinite(stacked[..., -1])):
            curves[name] = np.nan_to_num(stacked, nan=0.0)
    enough = with_enough_runs(curves)
    points, intervals = stats.curve_estimates(enough, reps=max(200, reps // 10)) if enough else ({}, {})
    for name, curve in curves.items():
        grid = np.asarray(next(iter(cells[(name, games[0])].values()))["grid"])
        label, style = legend_entry(bench, name, len(curve))
        if name in enough:
            point, (low, high) = points[name], intervals[name]
        else:
            per_run = curve.mean(axis=1)  # (runs, points)
            point, low, high = per_run.mean(axis=0), per_run.min(axis=0), per_run.max(axis=0)
        left.plot(grid, point, color=colors[name], linestyle=style, label=label)
        left.fill_between(grid, low, high, color=colors[name], alpha=0.12)
    left.set_xlabel("env steps")
    left.set_ylabel("normalised score (IQM; dashed: mean)")
    left.set_title("Normalised score over training (0 = random, 1 = SAC on the true reward)")
    left.grid(alpha=0.3)
    thresholds = np.linspace(-0.5, 1.5, 41)
    enough = with_enough_runs(matrices)
    profiles, bands = stats.performance_profiles(enough, thresholds, reps=max(200, reps // 2)) if enough else ({}, {})
    for name, matrix in matrices.items():
        label, style = legend_entry(bench, name, len(matrix))
        profile = profiles[name] if name in enough else stats.profile_points(matrix, thresholds)
        right.plot(thresholds, profile, color=colors[name], linestyle=style, label=label)
        if name in enough:
            right.fill_between(thresholds, bands[name][0], bands[name][1], color=colors[name], alpha=0.15)
    right.set_xlabel("normalised score τ")
    right.set_ylabel("fraction of runs × games with score > τ")
    right.set_title("Performance profiles of the final scores")
    right.grid(alpha=0.3)
    if matrices:
        right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def legend_entry(bench, name: str, runs: int) -> tuple[str, str]:
    """(legend text with the run count, line style): dashed below MIN_RUNS runs."""
    title = bench.arm(name).title
    if runs >= MIN_RUNS:
        return f"{title} ({runs} runs per game)", "-"
    return f"{title} ({runs} run{'s' if runs > 1 else ''} per game: mean, min–max)", "--"


def normalise_curve(curve: Sequence[float | None], base: tuple[float, float]) -> np.ndarray:
    return np.array([np.nan if v is None else normalise(v, base) for v in curve], dtype=np.float64)


# ---------------------------------------------------------------------------------------------------------------


def write_report(bench, layout, reps: int = 2000, history: Path | None = None) -> Path:
    """Write docs/results/<bench>/README.md and its figures from the summaries; returns the page's path. Says what
    it is doing as it goes (the bootstraps of a large benchmark take minutes). `history`: the results folder whose
    git history tells which summaries reruns replaced (default: the one the summaries are read from)."""
    began = time.time()

    def say(text: str) -> None:
        print(f"report {bench.name}: {text}", flush=True)

    results = load_results(layout.results, bench.name)
    if not results:
        raise UsageError(f"no results for benchmark {bench.name} under {layout.results / bench.name}")
    cells = by_cell(results)
    baseline_cells = cells
    loaded = f"loaded {len(results)} summaries from {layout.results / bench.name}"
    if bench.baselines_from:
        baseline_results = load_results(layout.results, bench.baselines_from)
        baseline_cells = by_cell(baseline_results)
        loaded += f", and {len(baseline_results)} of {bench.baselines_from} for the baselines"
    say(loaded)
    absent, which = missing_runs(bench, results)
    gaps = []  # a partial benchmark's page names the runs it lacks
    if absent:
        text = f"{absent} of the {absent + len(results)} declared runs have no summary yet: {which}"
        say(text)
        gaps.append(f"- Missing: {text}.")
    # Comparisons and label curves may name the baseline benchmark's arms (DRLHF in main): their runs join here. An
    # arm this benchmark declares itself is never filled from there, even before it has runs of its own.
    joined = {**{key: runs for key, runs in baseline_cells.items() if key[0] not in bench.arm_names}, **cells}
    base, missing = {}, {}
    if bench.random_arm and bench.reference_arm:
        base, missing = baselines(baseline_cells, bench.games, bench.random_arm, bench.reference_arm)
    folder = layout.results / bench.name
    bootstrapped = sum(len(runs) >= MIN_RUNS for key, runs in cells.items() if key[0] in bench.arm_names)
    say(f"final return per game: {len(cells)} cells, {bootstrapped} of them bootstrapped ({reps:,} resamples each)")
    page = [
        f"# Benchmark `{bench.name}`",
        "",
        bench.description,
        "",
        f"Generated by `python sobirl/benchmark.py report {bench.name}` from the run summaries in this folder on "
        f"{datetime.now(timezone.utc):%Y-%m-%d}; every number below comes from them. Commands: "
        f"`python sobirl/benchmark.py list {bench.name}`.",
        "",
        *provenance(results),
        *gaps,
        "",
        "## Final return per game",
        "",
        "The mean true game score of each run's last 10% of games; IQM over runs with a 95% bootstrap interval "
        f"when a cell has {MIN_RUNS} or more runs, otherwise the range of the runs.",
        "",
        *returns_table(bench, cells, reps),
        "",
    ]
    say(f"drawing {folder / 'returns.png'} (a bootstrap band per curve of {MIN_RUNS} or more runs)")
    draw_returns(bench, cells, folder / "returns.png", reps)
    page += ["![returns](returns.png)", ""]
    matrices: dict[str, np.ndarray] = {}
    if base:
        say(f"aggregate over {', '.join(base)}: bootstrapping the IQM and mean of each arm ({reps:,} resamples)")
        lines, matrices = aggregate_table(bench, cells, base, reps)
        page += ["## Aggregate over games", "", *lines, ""]
        for game, why in missing.items():
            page += [f"Left out of the aggregate: {game} ({why}).", ""]
        if bench.choice is not None:
            page += ["## The rule's choice", "", *choice_lines(bench, pilot_choices(bench, cells, base)), ""]
        say(f"area under the learning curve: bootstrapping the IQM and mean of each arm ({reps:,} resamples)")
        page += ["## Area under the learning curve", "", *area_table(bench, cells, base, reps), ""]
        if bench.comparisons:
            say(
                f"probability of improvement: bootstrapping {len(bench.comparisons)} comparison"
                f"{'s' * (len(bench.comparisons) != 1)} ({reps:,} resamples, at 95% and at the Bonferroni level), "
                "then each on each game, then the difference of their IQMs"
            )
            found = improvements(bench, joined, base, reps)
            page += [
                "## Probability of improvement",
                "",
                *improvement_table(bench, found, len([g for g in bench.games if g in base])),
                "",
            ]
            if bench.success is not None:
                page += ["### The success rule", "", *success_lines(bench, found, results), ""]
            page += ["### Per game", "", *per_game_improvement_table(bench, joined, base, reps), ""]
            page += ["## Difference of IQMs", "", *iqm_difference_table(bench, joined, base, reps), ""]
        say(f"drawing {folder / 'aggregate.png'} (score over training and performance profiles, with bands)")
        draw_aggregate(bench, cells, base, matrices, folder / "aggregate.png", reps)
        page += ["![aggregate](aggregate.png)", ""]
        if any(arm.curve for arm in bench.arms):
            say(f"label efficiency: bootstrapping each point of {len(label_curves(bench))} label curve(s)")
            lines, drawn = label_table(bench, joined, base, reps)
            page += [
                "## Label efficiency",
                "",
                f"The normalised final score against the label budget (`--total-pairs`), over {', '.join(base)}; IQM "
                f"with a 95% stratified-bootstrap interval from {MIN_RUNS} runs, the range of the runs below. A run "
                "ends before its query schedule does, so it uses somewhat fewer labels than its budget: the runs' "
                "counts are in the table.",
                "",
                *lines,
                "",
            ]
            if drawn:
                draw_label_curves(bench, drawn, folder / "labels.png")
                page += ["![labels](labels.png)", ""]
    diagnostics = diagnostics_table(bench, cells)
    if len(diagnostics) > 4:
        page += ["## Reward diagnostics", "", *diagnostics, ""]
    pooled = pooled_table(bench, cells)
    if pooled:
        page += ["### The pooled implicit term", "", *pooled, ""]
    if any(arm.frozen_from for arm in bench.arms):
        page += ["## Frozen-reward check", "", *frozen_table(bench, cells), ""]
    replaced, unavailable = replaced_runs(results, Path(history or layout.results) / bench.name)
    say(f"runs replaced by reruns: {len(replaced)}" + (f" ({unavailable})" if unavailable else ""))
    page += ["## Runs replaced by reruns", "", *replaced_table(bench, replaced, unavailable), ""]
    path = folder / "README.md"
    path.write_text("\n".join(page))
    summary = {"benchmark": bench.name, "runs": len(results), "baselines": base}
    (folder / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"wrote {path} ({time.time() - began:.0f} s)")
    return path
