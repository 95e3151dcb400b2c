"""The benchmark harness: every declared job parses with its algorithm's own parser; a stopped benchmark continues
where it was (every run at its exact final step, none started twice); summaries and reports from results alone."""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from agents.infra.cli import UsageError, build_parser
from sobirl import benchmark
from sobirl.beamrider import ALGORITHMS
from sobirl.harness import jobs as harness_jobs
from sobirl.harness import runner, stats, summaries
from sobirl.harness.declarations import BENCHMARKS, SMOKE_PREF, Arm, env_id
from sobirl.harness.history import replaced_runs
from sobirl.harness.jobs import Job, Layout, declared_jobs, parse_seed_list, select_jobs
from sobirl.harness.report import (
    by_cell,
    curve_area,
    diagnostics_table,
    fmt,
    improvement_reading,
    label_curves,
    level_text,
    provenance,
    wall_time_text,
    write_report,
)
from tests.conftest import REPO, assert_usage_error, run_script

# ---------------------------------------------------------------------------------------------------------------
# Declarations


def parse_job_flags(job, layout):
    """The job's flags through its algorithm's parser, as sobirl/beamrider.py would parse them."""
    flags = job.flags(layout)
    algo = flags[flags.index("--algo") + 1]
    rest = [f for i, f in enumerate(flags) if f != "--algo" and (i == 0 or flags[i - 1] != "--algo")]
    module = importlib.import_module(ALGORITHMS[algo])
    args_cls = getattr(module, "TrueRewardArgs", module.Args)  # sac's command line has the frozen-reward flag
    return algo, build_parser(args_cls).parse_args(rest)


@pytest.mark.parametrize("name", list(BENCHMARKS))
def test_every_declared_job_parses_with_its_algorithms_parser_at_the_declared_budget(name, tmp_path):
    layout = Layout(tmp_path / "runs", tmp_path / "results")
    jobs = select_jobs(BENCHMARKS[name])
    assert jobs
    for job in jobs:
        algo, parsed = parse_job_flags(job, layout)
        assert algo == job.arm.algo
        assert parsed.env_id == env_id(job.game) and parsed.env_id.startswith("MinAtar/")
        assert parsed.total_timesteps == job.bench.steps
        assert parsed.seed == job.seed and parsed.exp_name == job.arm.name
        assert (layout.runs / job.key).resolve() == (tmp_path / "runs" / parsed.runs_dir / parsed.run_name).resolve()


def test_the_main_benchmark_lists_every_job_with_a_minatar_env_and_its_budget():
    result = run_script("sobirl/benchmark.py", "list", "main")
    assert result.returncode == 0, result.stderr
    commands = [line for line in result.stdout.splitlines() if not line.startswith("#")]
    assert len(commands) == len(select_jobs(BENCHMARKS["main"]))
    assert all("--env-id MinAtar/" in c and "--total-timesteps 100000" in c for c in commands)


def test_listing_a_benchmark_imports_neither_torch_nor_matplotlib():
    """`list` and the harness's bookkeeping read checkpoint headers only (agents/infra/checkpoint_header.py), so a
    status check starts in under a second rather than after torch's import. Breaks if jobs.py or summaries.py took
    the header reader from agents/infra/checkpoint.py again, or if benchmark.py imported the report module (and
    with it matplotlib) at its top."""
    code = (
        "import sys, io, contextlib\n"
        "from sobirl import benchmark\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    benchmark.main(['list', 'main'])\n"
        "heavy = ('torch', 'matplotlib')\n"
        "print(sorted(name for name in sys.modules if name.split('.')[0] in heavy)[:3])\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_jobs_are_seed_major_and_each_arm_runs_its_own_seeds():
    jobs = select_jobs(BENCHMARKS["main"])
    seeds = [job.seed for job in jobs]
    assert seeds == sorted(seeds), "seed 1 of every arm and game first"
    per_arm = {}
    for job in jobs:
        per_arm.setdefault(job.arm.name, set()).add(job.seed)
    assert per_arm["drlhf"] == set(range(1, 11)) and per_arm["drlhf_quirks"] == set(range(1, 6))
    assert per_arm["drlhf_frozen"] == {1, 2, 3}


def test_each_pilot_runs_seeds_no_other_committed_benchmark_uses():
    """A pilot chooses a setting for other benchmarks: on their own seeds it would select on their runs."""
    seeds = {name: {job.seed for job in select_jobs(bench)} for name, bench in BENCHMARKS.items() if bench.committed}
    pilots = [name for name, bench in BENCHMARKS.items() if bench.seed_offset]
    assert {"sigma", "pilot"} <= set(pilots)
    for pilot in pilots:
        for other, used in seeds.items():
            assert other == pilot or not seeds[pilot] & used, (pilot, other, sorted(seeds[pilot] & used))


def test_every_label_curve_names_a_declared_arm_and_each_point_its_labels():
    """Breaks on a typo in Arm.curve (the report would drop the curve's own arm) or a point without --total-pairs."""
    for bench in BENCHMARKS.values():
        for curve, points in label_curves(bench).items():
            assert all(isinstance(labels, int) and labels > 0 for labels, _, _ in points), (bench.name, points)
            assert curve in [arm for _, arm, _ in points], (bench.name, curve)
    points = label_curves(BENCHMARKS["labels"])["drlhf"]
    assert points == [(250, "drlhf_250", 5), (500, "drlhf_500", 5), (1000, "drlhf", 5), (2000, "drlhf_2000", 5)]
    twice = dataclasses.replace(BENCHMARKS["labels"].arms[0], flags=("--total-pairs", "7", "--total-pairs", "9"))
    assert BENCHMARKS["labels"].labels(twice) == 9


def test_the_keys_of_every_declared_job_are_unique():
    keys = [job.key for job in declared_jobs()]
    assert len(keys) == len(set(keys))


def test_seed_lists_and_bad_selections_are_refused_naming_the_flag():
    assert parse_seed_list("1-3,7") == {1, 2, 3, 7}
    assert parse_seed_list("") is None
    with pytest.raises(UsageError, match="--seeds"):
        parse_seed_list("3-1")
    with pytest.raises(UsageError, match="--games"):
        select_jobs(BENCHMARKS["main"], games=["Pong"])
    with pytest.raises(UsageError, match="no arm"):
        select_jobs(BENCHMARKS["main"], arms=["nosuch"])
    assert_usage_error(run_script("sobirl/benchmark.py", "list", "nosuch"), "nosuch")
    assert_usage_error(run_script("sobirl/benchmark.py", "run", "smoke", "--workers", "0"), "--workers")


# ---------------------------------------------------------------------------------------------------------------
# Stopping and continuing


def start_harness(tmp_path, *extra):
    return subprocess.Popen(
        [sys.executable, "sobirl/benchmark.py", "run", "smoke", "--workers", "2", "--runs-dir", str(tmp_path / "runs"),
         "--results-dir", str(tmp_path / "results"), *extra],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def test_a_stopped_benchmark_continues_where_it_was(tmp_path):
    """SIGTERM part-way: the running jobs save and the harness exits 143; a second `run` resumes those and starts
    the rest. Breaks if the harness restarted a partial run from scratch or re-ran a finished one, or a rerun's
    summary did not record the summary it replaced."""
    layout = Layout(tmp_path / "runs", tmp_path / "results")
    jobs = select_jobs(BENCHMARKS["smoke"])
    harness = start_harness(tmp_path)
    # Wait until a run has finished and two are training (each has printed its run line: its stop handlers are in).
    deadline = time.time() + 240
    while time.time() < deadline:
        finished = [j for j in jobs if j.result_path(layout).is_file()]
        training = [j for j in jobs if runner.device_of(j.log_path(layout)) and not j.result_path(layout).is_file()]
        if finished and len(training) == 2:
            break
        time.sleep(0.2)
    else:
        harness.kill()
        pytest.fail("the harness never had a finished run and two training")
    harness.send_signal(signal.SIGTERM)
    output, _ = harness.communicate(timeout=120)
    assert harness.returncode == 143, output
    states = {job.key: harness_jobs.job_state(job, layout) for job in jobs}
    assert "partial" in states.values() and "finished" in states.values(), states
    assert any(state in ("pending", "blocked") for state in states.values()), states

    second = start_harness(tmp_path)
    output, _ = second.communicate(timeout=600)
    assert second.returncode == 0, output
    for job in jobs:
        result = json.loads(job.result_path(layout).read_text())
        assert result["global_step"] == job.bench.steps, job.key
        attempts = summaries.read_attempts(job.attempts_path(layout))
        starts = [a for a in attempts if a["event"] == "start"]
        assert len(starts) == 1, (job.key, attempts)
        if states[job.key] == "partial":
            assert [a["event"] for a in attempts if a["event"] != "exit"] == ["start", "resume"], job.key
            assert result["attempts"] == 2
        assert result["untimed_attempts"] == 0, "a stop logs its exit and time"
    # Nothing left to do: a third run starts nothing.
    third = start_harness(tmp_path)
    output, _ = third.communicate(timeout=120)
    assert third.returncode == 0 and f"{len(jobs)} of {len(jobs)} runs already finished" in output, output

    # The machine is lost before the frozen-reward run: its source's folder goes, its summary stays. The source runs
    # again (its summary replaced), then the frozen-reward run trains on the new source's reward model.
    frozen = next(job for job in jobs if job.arm.frozen_from)
    shutil.rmtree(frozen.source.run_dir(layout))
    shutil.rmtree(frozen.run_dir(layout))
    frozen.attempts_path(layout).unlink()
    frozen.result_path(layout).unlink()
    old_source = json.loads(frozen.source.result_path(layout).read_text())
    fourth = start_harness(tmp_path, "--arms", frozen.arm.name)
    output, _ = fourth.communicate(timeout=300)
    assert fourth.returncode == 0 and f"rerun: {frozen.source.key}" in output, output
    new_source = json.loads(frozen.source.result_path(layout).read_text())
    assert new_source["finished"] != old_source["finished"] and new_source["attempts"] == 1, (
        "replaced, lost run's attempts aside"
    )
    assert new_source["replaces"] == [{key: old_source[key] for key in ("finished", "final_return", "commits")}]
    assert json.loads(frozen.result_path(layout).read_text())["frozen_from"] == frozen.source.key
    source_exit = summaries.read_attempts(frozen.source.attempts_path(layout))[-1]
    frozen_start = [a for a in summaries.read_attempts(frozen.attempts_path(layout)) if a["event"] == "start"][-1]
    assert source_exit["event"] == "exit" and frozen_start["time"] >= source_exit["time"], "waited for the rerun"


def test_a_lost_source_runs_again_just_before_the_first_run_that_needs_it_and_only_then(tmp_path):
    """A frozen-reward or AIHF run needs its source's run folder; a summary alone (a machine lost between sessions)
    is not enough. Breaks if the lost source were skipped as finished, rerun twice, or rerun when nothing needs it."""
    layout = Layout(tmp_path / "runs", tmp_path / "results")
    bench = BENCHMARKS["smoke"]
    frozen, aihf, aihf_2 = (Job(bench, "Breakout", bench.arm(arm), seed) for arm, seed in
                            (("drlhf_frozen", 1), ("aihf", 1), ("aihf", 2)))  # fmt: skip
    for job in (frozen.source, aihf.source):
        job.result_path(layout).parent.mkdir(parents=True, exist_ok=True)
        job.result_path(layout).write_text("{}")
    assert harness_jobs.source_lost(frozen, layout) and harness_jobs.job_state(frozen, layout) == "blocked"
    plan = harness_jobs.with_lost_sources([frozen, aihf, aihf_2], layout)
    assert [(job.key, job.rerun) for job in plan] == [
        (frozen.source.key, True), (frozen.key, False), (aihf.source.key, True), (aihf.key, False),
        (aihf_2.key, False),
    ]  # fmt: skip
    assert harness_jobs.job_state(frozen.source, layout) == "finished"
    assert harness_jobs.job_state(plan[0], layout) == "pending", "a rerun ignores the summary it replaces"
    # A rerun part-way (its checkpoint not final) is still lost: the dependent waits, and the rerun resumes.
    partway = {str(frozen.source.run_dir(layout)): (25_000, 100_000)}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(harness_jobs, "checkpoint_progress", lambda run_dir: partway.get(str(run_dir)))
        assert harness_jobs.source_lost(frozen, layout) and harness_jobs.job_state(frozen, layout) == "blocked"
        assert harness_jobs.job_state(plan[0], layout) == "partial"
        partway[str(frozen.source.run_dir(layout))] = (100_000, 100_000)
        assert not harness_jobs.source_lost(frozen, layout) and harness_jobs.job_state(frozen, layout) == "pending"
    # Recorded demonstrations are all an AIHF run needs; a finished dependent needs nothing.
    aihf.demos_path(layout).parent.mkdir(parents=True, exist_ok=True)
    aihf.demos_path(layout).write_bytes(b"")
    frozen.result_path(layout).parent.mkdir(parents=True, exist_ok=True)
    frozen.result_path(layout).write_text("{}")
    assert harness_jobs.with_lost_sources([frozen, aihf], layout) == [frozen, aihf]


def test_a_dependent_waits_while_a_worker_holds_its_source_between_queue_and_lock(tmp_path):
    """Two workers: one takes the source off the queue, and until it claims the source's lock file the source is
    neither queued, running nor locked. Breaks if the other worker then drops the dependent as blocked (a `run`
    that exits 0 with a frozen-reward run never started: seen once in CI)."""
    layout = Layout(tmp_path / "runs", tmp_path / "results")
    bench = BENCHMARKS["smoke"]
    frozen = Job(bench, "Breakout", bench.arm("drlhf_frozen"), 1)
    workers = runner.Runner([frozen.source, frozen], layout, workers=2)
    assert workers.source_progress(frozen) == "waiting"  # queued
    assert workers.next_job().key == frozen.source.key  # worker A takes it; its lock is not claimed yet
    assert workers.source_progress(frozen) == "waiting"
    workers.taken.clear()  # had worker A let go of it unrun, nobody would run it
    assert workers.source_progress(frozen) == "blocked"


def test_a_dependent_waits_until_the_worker_of_its_finished_source_lets_go(tmp_path):
    """The source's final checkpoint is written while its process is still exiting and its worker has yet to log
    the exit and write the summary. Breaks if the dependent starts then (CI saw a frozen-reward run start 0.6 s
    before its source's exit was logged)."""
    from agents.infra.checkpoint import CHECKPOINT_NAME, save_atomic

    layout = Layout(tmp_path / "runs", tmp_path / "results")
    bench = BENCHMARKS["smoke"]
    frozen = Job(bench, "Breakout", bench.arm("drlhf_frozen"), 1)
    source_dir = frozen.source.run_dir(layout)
    source_dir.mkdir(parents=True)
    save_atomic({"algo": "drlhf", "args": {"total_timesteps": 10}, "global_step": 10, "algorithm": {}},
                source_dir / CHECKPOINT_NAME)  # fmt: skip
    assert harness_jobs.job_state(frozen.source, layout) == "complete"
    workers = runner.Runner([frozen], layout, workers=2)
    lock = frozen.source.lock_path(layout)
    assert runner.claim(lock)  # this process: a live worker still on the source
    assert workers.source_progress(frozen) == "waiting"
    lock.unlink()
    assert workers.source_progress(frozen) == "ready"


# ---------------------------------------------------------------------------------------------------------------
# Summaries


def test_windowed_means_carry_forward_and_last_at_is_a_step_function():
    steps, values = [5, 15, 16, 40], [1.0, 2.0, 4.0, 8.0]
    assert summaries.windowed_means(steps, values, [10, 20, 30, 40]) == [1.0, 3.0, 3.0, 8.0]
    assert summaries.windowed_means([25], [1.0], [10, 20, 30]) == [None, None, 1.0]
    assert summaries.last_at([10, 30], [1.0, 5.0], [5, 10, 20, 30]) == [None, 1.0, 1.0, 5.0]


def test_final_mean_takes_the_last_tenth_of_the_games():
    assert summaries.final_mean(list(range(20))) == 18.5
    assert summaries.final_mean([3.0]) == 3.0
    assert summaries.final_mean([math.nan]) is None


def test_result_json_is_strict_and_keeps_lists_of_numbers_on_one_line():
    content = summaries.clean_json({"curve": [1.0, math.nan, None, -2.5e-05], "nested": {"x": [math.inf]}})
    text = summaries.to_json(content)
    assert json.loads(text) == {"curve": [1.0, None, None, -2.5e-05], "nested": {"x": [None]}}
    assert '"curve": [1.0, null, null, -2.5e-05]' in text


# ---------------------------------------------------------------------------------------------------------------
# Reports from results alone


def fake_result(bench, game, arm, seed, final, curve_scale=1.0, labels=0):
    grid = summaries.grid_for(BENCHMARKS[bench].steps)
    return {
        "format": summaries.RESULT_FORMAT, "version": 1, "benchmark": bench, "game": game, "arm": arm, "seed": seed,
        "final_return": final, "grid": grid, "return_curve": [final * curve_scale * (k + 1) / len(grid)
                                                              for k in range(len(grid))],
        "labels_curve": [0] * len(grid), "labels": labels, "commits": ["abc"], "machines": [], "wall_seconds": 60.0,
        "diagnostics": {"bce": 0.5, "accuracy_fresh": 0.8} if arm not in ("random", "sac") else {},
    }  # fmt: skip


def write_fake_results(results_dir, arms_finals, seeds, bench="smoke", labels=0):
    """Run summaries of final return `final` + 0.01 * seed; `labels` used per run (plus the seed, when given)."""
    for (arm, game), final in arms_finals.items():
        for seed in seeds:
            path = results_dir / bench / game / arm / f"seed{seed}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            used = labels + seed if labels else 0
            path.write_text(json.dumps(fake_result(bench, game, arm, seed, final + 0.01 * seed, labels=used)))


def test_report_gives_intervals_from_five_runs_and_ranges_below(tmp_path):
    """Breaks if a cell of fewer than 5 runs got an interval, or the normalisation used the wrong arms."""
    layout = Layout(tmp_path / "runs", tmp_path / "results")
    finals = {("random", "Breakout"): 0.0, ("sac", "Breakout"): 2.0, ("drlhf", "Breakout"): 1.5}
    write_fake_results(layout.results, finals, seeds=range(1, 6))
    write_fake_results(layout.results, {("drlhf_frozen", "Breakout"): 1.0}, seeds=range(1, 3))
    page = write_report(BENCHMARKS["smoke"], layout, reps=200).read_text()
    returns_section = page.split("## Final return per game")[1].split("\n## ")[0]
    rows = {line.split("|")[2].strip(): line for line in returns_section.splitlines() if line.startswith("| Breakout")}
    assert "[" in rows["drlhf"].split("|")[5] and "range" not in rows["drlhf"]
    assert "range 1.01 … 1.02" in rows["drlhf_frozen"]
    # drlhf's normalised scores are (1.5 + 0.01 s - mean random) / (mean sac - mean random) = 0.75 for every seed.
    aggregate = next(line for line in page.splitlines() if line.startswith("| drlhf | 5 |"))
    assert aggregate.split("|")[3].strip().startswith("0.75")
    improvement = next(line for line in page.splitlines() if line.startswith("| drlhf vs sac |"))
    assert improvement.split("|")[3].strip().startswith("0.00")
    assert improvement.split("|")[4].strip() == "sac ahead: every run of sac above every run of drlhf"
    k = len(BENCHMARKS["smoke"].comparisons)
    header = next(line for line in page.splitlines() if line.startswith("| comparison (first vs second) |"))
    assert header.split("|")[5].strip() == f"[{100 * (1 - 0.05 / k):.3g}% CI], Bonferroni"
    assert improvement.split("|")[5].strip().startswith("0.00 [")
    assert (layout.results / "smoke" / "returns.png").stat().st_size > 0


def test_an_arm_is_read_as_ahead_only_when_the_interval_excludes_one_half():

    assert improvement_reading(0.55, 0.9, "A", "B", 5) == "A ahead"
    assert improvement_reading(0.1, 0.45, "A", "B", 5) == "B ahead"
    assert improvement_reading(0.5, 0.9, "A", "B", 10) == "not separated at 10 runs per game"
    assert improvement_reading(0.2, 0.5, "A", "B", 7) == "not separated at 7 runs per game"
    # as printed: 0.5004 reads 0.50, which does not exclude one half
    assert improvement_reading(0.5004, 0.9, "A", "B", 5).startswith("not separated")


def test_diagnostics_pool_every_games_runs_of_an_arm_into_one_row():
    """Breaks if the all-games row took one game's runs only, or a one-game benchmark grew a pooled row."""
    bench = dataclasses.replace(BENCHMARKS["smoke"], games=("Breakout", "Seaquest"))
    results = []
    for game, bce in (("Breakout", 0.5), ("Seaquest", 3.0)):
        for seed in (1, 2):
            result = fake_result("smoke", game, "drlhf", seed, 1.0)
            result["diagnostics"]["bce"] = bce + seed
            results.append(result)
    rows = [line for line in diagnostics_table(bench, by_cell(results)) if line.startswith("| all games | drlhf |")]
    assert len(rows) == 1
    runs, bce = rows[0].split("|")[3].strip(), rows[0].split("|")[7].strip()
    assert (runs, bce) == ("4", "3.25 [1.50, 5.00]")  # median of 1.5, 2.5, 4.0, 5.0
    one_game = diagnostics_table(BENCHMARKS["smoke"], by_cell(results[:2]))
    assert not any(line.startswith("| all games") for line in one_game)


def test_a_summary_from_before_the_ratio_fix_has_its_gradient_ratio_divided_by_the_reward_batch_size():
    """Summaries written before the fix hold reward/extra_grad_ratio times the reward batch size; new ones mark
    themselves and are read as they are. Breaks if either kind were read the other way."""
    from sobirl.harness.report import diagnostic

    old = {"diagnostics": {"extra_grad_ratio": 128.0, "bce": 0.7}, "flags": {"reward_batch_size": 32}}
    new = {"diagnostics": {"extra_grad_ratio": 4.0}, "flags": {"reward_batch_size": 32}, "extra_grad_ratio_fixed": True}
    assert diagnostic(old, "extra_grad_ratio") == 4.0 and diagnostic(old, "bce") == 0.7
    assert diagnostic(new, "extra_grad_ratio") == 4.0
    assert diagnostic({"diagnostics": {"extra_grad_ratio": 64.0}}, "extra_grad_ratio") == 1.0  # the default batch


COMMITTED_RESULTS = sorted(
    name
    for name, bench in BENCHMARKS.items()
    if bench.committed and any((REPO / "docs/results" / name).glob("*/*/seed*.json"))
)


def same_page(generated: str, committed: str) -> bool:
    """The same text, numbers allowed to differ by one in their last printed digit (a bootstrap on another machine
    may round the other way); the generation date is not compared."""
    number = r"(\d[\d,]*(?:\.\d+)?(?:e[+−-]\d+)?)"
    date = r"in this folder on \d{4}-\d{2}-\d{2};"
    ours, theirs = (re.split(number, re.sub(date, "", text)) for text in (generated, committed))
    if len(ours) != len(theirs) or ours[0::2] != theirs[0::2]:
        return False
    for a, b in zip(ours[1::2], theirs[1::2]):
        mantissa, _, exponent = a.partition("e")
        if "." not in mantissa:  # counts, seeds, years: exact
            if a != b:
                return False
            continue
        last_digit = 10.0 ** (int(exponent.replace("−", "-") or 0) - len(mantissa.split(".")[1]))
        if abs(float(a.replace(",", "")) - float(b.replace(",", "").replace("−", "-"))) > last_digit * 1.001:
            return False
    return True


def test_same_page_forgives_one_last_digit_and_nothing_else():
    page = "Generated ... in this folder on 2026-12-03; | DRLHF | 5 | 0.75 [0.61, 0.88] | 1,234 | 1.21e+04 |"
    assert same_page(page, page.replace("2026-12-03", "2027-01-01").replace("0.61", "0.62").replace("1.21e", "1.22e"))
    assert not same_page(page, page.replace("0.61", "0.63"))
    assert not same_page(page, page.replace("| 5 |", "| 6 |"))
    assert not same_page(page, page.replace("DRLHF", "SAC"))
    assert not same_page(page, page + " extra row 1")


@pytest.mark.parametrize("name", COMMITTED_RESULTS)
def test_each_committed_results_page_is_what_report_makes_of_the_committed_summaries(name, tmp_path):
    """Breaks when summaries were committed without regenerating their page (or summary.json), or the page was
    edited by hand. Runs `report` as a user does, on a copy of every committed summary (baselines come from main)."""
    committed = REPO / "docs/results" / name
    assert (committed / "README.md").exists(), f"no page: python sobirl/benchmark.py report {name}"
    results = tmp_path / "results"
    for summary in (REPO / "docs/results").glob("*/*/*/seed*.json"):
        target = results / summary.relative_to(REPO / "docs/results")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(summary.read_bytes())
    benchmark.main(["report", name, "--results-dir", str(results), "--runs-dir", str(tmp_path / "runs"),
                    "--history-dir", str(REPO / "docs/results")])  # fmt: skip
    regenerate = f"regenerate it: python sobirl/benchmark.py report {name}"
    assert same_page((results / name / "README.md").read_text(), (committed / "README.md").read_text()), regenerate
    generated_summary = json.loads((results / name / "summary.json").read_text())
    assert generated_summary == json.loads((committed / "summary.json").read_text()), regenerate


def findings(readme: str) -> str:
    return readme.split("## What we found", 1)[1].split("\n## ", 1)[0]


def test_every_decimal_in_the_readmes_findings_is_on_a_generated_results_page():
    """The README's findings quote the generated pages, which the test above ties to the committed summaries; a
    number typed in by hand, or left behind when the pages moved on, breaks this."""
    pages = " ".join((REPO / "docs/results" / name / "README.md").read_text() for name in COMMITTED_RESULTS)
    quoted = re.findall(r"(?<![\d.,])\d[\d,]*\.\d+(?!\d|\.\d)", findings((REPO / "README.md").read_text()))
    assert quoted, "the findings quote no results"
    missing = sorted({number for number in quoted if not re.search(rf"(?<![\d.,]){re.escape(number)}(?!\d)", pages)})
    assert not missing, f"README findings quote numbers on no results page: {missing}"
    intervals = re.findall(r"\d[\d.,]*\s\[[^\]]+\]", findings((REPO / "README.md").read_text()))
    assert not [text for text in intervals if text not in pages], "an estimate with its interval is on no page"


def test_report_draws_the_label_curve_with_the_curves_own_arm_at_its_labels(tmp_path):
    """Breaks if a point took another arm's runs or labels, if the curve's own arm (30 labels here, main's 1,000
    in the labels benchmark) were left out, or if a point of 2 runs got an interval."""

    def at(labels: int, seeds: int) -> Arm:
        flags = list(SMOKE_PREF)
        flags[flags.index("--total-pairs") + 1] = str(labels)
        return Arm(f"drlhf_{labels}", "drlhf", tuple(flags), seeds=seeds, curve="drlhf")

    bench = dataclasses.replace(BENCHMARKS["smoke"], arms=(*BENCHMARKS["smoke"].arms, at(60, 5), at(10, 2)))
    layout = Layout(tmp_path / "runs", tmp_path / "results")
    finals = {("random", "Breakout"): 0.0, ("sac", "Breakout"): 2.0}
    write_fake_results(layout.results, finals, seeds=range(1, 6))
    write_fake_results(layout.results, {("drlhf", "Breakout"): 1.5}, seeds=range(1, 6), labels=20)
    write_fake_results(layout.results, {("drlhf_60", "Breakout"): 1.9}, seeds=range(1, 6), labels=50)
    write_fake_results(layout.results, {("drlhf_10", "Breakout"): 0.5}, seeds=range(1, 3), labels=7)
    page = write_report(bench, layout, reps=200).read_text()
    section = page.split("## Label efficiency")[1].split("\n## ")[0]
    rows = [line.split("|")[2:6] for line in section.splitlines() if line.startswith("| drlhf |")]
    assert [(budget.strip(), used.strip(), runs.strip()) for budget, used, runs, _ in rows] == [
        ("10", "8–9", "2"), ("30", "21–25", "5"), ("60", "51–55", "5")
    ]  # fmt: skip
    # normalised: (final + 0.01 s - 0.03) / 2.0 for seeds s = 1..5 (random 0.03, SAC 2.03 on average)
    assert rows[0][3].strip().startswith("range 0.24") and "[" not in rows[0][3]
    assert rows[1][3].strip().startswith("0.75 [") and rows[2][3].strip().startswith("0.95 [")
    assert (layout.results / "smoke" / "labels.png").stat().st_size > 0


def test_the_labels_report_takes_baselines_and_the_1000_label_point_from_main_on_the_points_seeds(tmp_path):
    """Breaks if the curve's own arm (main's drlhf, 10 seeds) entered with seeds the other points do not run, or the
    normalisation did not come from main's random and SAC runs."""
    layout = Layout(tmp_path / "runs", tmp_path / "results")
    game = "SpaceInvaders"
    main = {("random", game): 0.0, ("sac", game): 2.0}
    write_fake_results(layout.results, main, seeds=range(1, 11), bench="main")
    write_fake_results(layout.results, {("drlhf", game): 1.0}, seeds=range(1, 11), bench="main", labels=930)
    write_fake_results(layout.results, {("drlhf_250", game): 0.5}, seeds=range(1, 6), bench="labels", labels=230)
    page = write_report(BENCHMARKS["labels"], layout, reps=200).read_text()
    section = page.split("## Label efficiency")[1].split("\n## ")[0]
    rows = {line.split("|")[2].strip(): line.split("|")[4:6] for line in section.splitlines() if "| DRLHF |" in line}
    used = {
        line.split("|")[2].strip(): line.split("|")[3].strip() for line in section.splitlines() if "| DRLHF |" in line
    }
    assert used["1,000"] == "931–935" and used["250"] == "231–235"  # main's seeds 1-5 only
    # random averages 0.055 over main's ten seeds, SAC 2.055: seeds 1-5 of drlhf normalise to 0.4725 + 0.005 s
    assert rows["1,000"][0].strip() == "5" and rows["1,000"][1].strip().startswith("0.49 [")
    assert rows["250"][0].strip() == "5" and rows["250"][1].strip().startswith("0.24 [")
    assert rows["500"][0].strip() == "0" and rows["2,000"][0].strip() == "0"


def test_wall_times_leave_out_runs_with_an_attempt_that_never_logged_its_exit():

    runs = [{"wall_seconds": 480.0}, {"wall_seconds": 600.0, "untimed_attempts": 0}]
    assert wall_time_text(runs) == "8.0–10.0 min"
    lost = {"wall_seconds": 36.0, "untimed_attempts": 1}  # a machine went away during its first attempt
    assert wall_time_text([*runs, lost]) == "8.0–10.0 min (1 run not fully timed)"
    assert wall_time_text([lost, lost]) == "— (2 runs not fully timed)"
    assert wall_time_text([*runs, {"wall_seconds": 9.0, "untimed_attempts": 2}]).endswith("(1 run not fully timed)")
    assert wall_time_text(runs[:1]) == "8.0 min"  # one run, or runs that round alike: one time, not "8.0–8.0"


def test_attempt_times_count_the_attempts_whose_exit_was_never_logged():
    start, resume = {"event": "start"}, {"event": "resume"}
    assert summaries.attempt_times([start, {"event": "exit", "seconds": 60.0}]) == {
        "attempts": 1,
        "wall_seconds": 60.0,
        "untimed_attempts": 0,
    }
    lost_twice = [start, resume, resume, {"event": "exit", "seconds": 30.04}]
    assert summaries.attempt_times(lost_twice) == {"attempts": 3, "wall_seconds": 30.0, "untimed_attempts": 2}


def test_report_numbers_use_one_minus_sign_and_thousands_separators():

    assert [fmt(-0.5), fmt(-1234.5), fmt(-14_200.0), fmt(15_600.0), fmt(math.nan)] == [
        "−0.50",
        "−1,234.50",
        "−1.42e+04",
        "1.56e+04",
        "—",
    ]


def test_provenance_counts_each_machines_runs_and_warns_when_wall_times_mix_machines():

    slow, fast = (
        json.dumps({"cpu": cpu, "cores": 2, "avx512": avx, "torch": "2.13"}) for cpu, avx in (("A", 0), ("B", 1))
    )
    results = [{"machines": [slow], "commits": ["abc"]}, {"machines": [slow, fast]}, {"machines": [fast]}]
    lines = provenance(results)
    assert "- Machine: A, 2 cores, AVX-512 no, torch 2.13: 2 runs" in lines
    assert "- Machine: B, 2 cores, AVX-512 yes, torch 2.13: 2 runs" in lines
    assert any("Wall times mix" in line for line in lines)
    alone = provenance(results[:1])
    assert "- Machine: A, 2 cores, AVX-512 no, torch 2.13: 1 run" in alone
    assert not any("Wall times mix" in line for line in alone)


def test_report_refuses_a_benchmark_without_results(tmp_path):
    result = run_script("sobirl/benchmark.py", "report", "smoke", "--results-dir", str(tmp_path))
    assert_usage_error(result, "no results", "smoke")


def test_status_counts_finished_and_pending_runs(tmp_path):
    write_fake_results(tmp_path, {("random", "Breakout"): 0.0}, seeds=[1])
    result = run_script("sobirl/benchmark.py", "status", "smoke", "--results-dir", str(tmp_path), "--runs-dir",
                        str(tmp_path / "runs"))  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in result.stdout.splitlines()
            if line.startswith("| ") and "arm" not in line}  # fmt: skip
    assert rows["random"] == "1 / 0 / 1" and rows["drlhf_frozen"] == "0 / 0 / 0 (1)"


def test_stats_interval_estimates_agree_with_a_plain_bootstrap_on_one_game():

    rng = np.random.default_rng(0)
    scores = rng.normal(size=(10, 1))
    points, intervals = stats.interval_estimates({"x": scores}, lambda x: np.array([x.mean()]), reps=4000)
    assert points["x"][0] == pytest.approx(scores.mean())
    resampled = [scores[rng.integers(0, 10, 10)].mean() for _ in range(4000)]
    assert intervals["x"][0, 0] == pytest.approx(np.percentile(resampled, 2.5), abs=0.05)
    assert intervals["x"][1, 0] == pytest.approx(np.percentile(resampled, 97.5), abs=0.05)


def test_bootstrap_intervals_are_the_same_on_every_call_with_one_seed():
    """The pages are regenerated and compared; rliable's resampling ignores its random_state (it draws from numpy's
    global generator), so without a seed of ours two reports of the same runs differ in their intervals."""
    rng = np.random.default_rng(0)
    scores = {"a": rng.normal(size=(5, 3)), "b": rng.normal(size=(5, 3))}
    first = stats.aggregate_estimates(scores, reps=200, seed=3)[1]["a"]
    np.random.rand(7)  # anything else that used the global generator in between
    assert np.array_equal(first, stats.aggregate_estimates(scores, reps=200, seed=3)[1]["a"])
    pairs = {"a vs b": (scores["a"], scores["b"])}
    once = stats.probability_of_improvement(pairs, reps=200, seed=3)[1]["a vs b"]
    np.random.rand(7)
    assert np.array_equal(once, stats.probability_of_improvement(pairs, reps=200, seed=3)[1]["a vs b"])


def test_a_bonferroni_interval_holds_the_plain_one_and_is_drawn_from_the_same_resamples():
    """The report's last P(first > second) column: the same bootstrap at level 1 - 0.05/k, so it can only widen."""
    assert stats.bonferroni_confidence(5) == pytest.approx(0.99)
    assert [level_text(stats.bonferroni_confidence(k)) for k in (1, 3, 5)] == ["95%", "98.3%", "99%"]
    rng = np.random.default_rng(1)
    pairs = {"a vs b": (rng.normal(0.3, 1, size=(8, 3)), rng.normal(size=(8, 3)))}
    point, plain = stats.probability_of_improvement(pairs, reps=500, seed=2)
    again, wide = stats.probability_of_improvement(pairs, reps=500, seed=2, confidence=0.99)
    assert point == again
    assert wide["a vs b"][0] < plain["a vs b"][0] <= point["a vs b"] <= plain["a vs b"][1] < wide["a vs b"][1]


def test_profile_points_agree_with_rliables_profile():
    """The few-run profile of the aggregate figure is rliable's point estimate without its band."""
    scores = np.random.default_rng(0).normal(0.5, 0.4, size=(5, 3))
    scores[0, :2] = 0.5, 1.0  # on a threshold: "above" is strict
    thresholds = np.linspace(-0.5, 1.5, 41)
    profiles, _ = stats.performance_profiles({"arm": scores}, thresholds, reps=50)
    np.testing.assert_allclose(stats.profile_points(scores, thresholds), profiles["arm"])


def test_a_job_lock_is_refused_while_its_holder_lives_and_taken_over_once_it_died(tmp_path):
    lock = tmp_path / "seed1.lock"
    assert runner.claim(lock) and lock.read_text() == str(__import__("os").getpid())
    assert not runner.claim(lock), "held by this (live) process"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock.write_text(dead.stdout.strip())
    assert runner.claim(lock), "a dead holder's lock is stale"


# ---------------------------------------------------------------------------------------------------------------
# Saying what it is doing


def write_events(run_dir, steps, seconds_per_step, start):
    """An event file as a running job writes it: charts/SPS at `steps`, logged `seconds_per_step[k]` apart."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(run_dir))
    wall = start
    for step, pace in zip(steps, seconds_per_step):
        wall += pace
        writer.add_scalar("charts/SPS", 1.0, step, walltime=wall)
    writer.close()
    return wall


def test_progress_is_read_from_the_event_file_with_the_speed_measured_once_learning_started(tmp_path):
    """Breaks if the fast random-action steps before learning starts entered the speed (the ETA of a run would be
    far too short), a speed were given from the first few steps of learning (the reward model's warm-up: far too
    long), or a resumed attempt's new event file were not followed."""
    from sobirl.harness.events import ProgressReader

    run_dir = tmp_path / "seed1"
    steps = list(range(100, 2001, 100))
    # 100 steps per 0.1 s up to step 500 (random actions), then 100 steps per 1 s: 100 steps/s.
    write_events(run_dir, steps, [0.1 if step <= 500 else 1.0 for step in steps], start=1000.0)
    reader = ProgressReader(run_dir, learning_starts=500)
    progress = reader.read()
    assert progress.step == 2000 and progress.speed == pytest.approx(100.0)
    assert ProgressReader(run_dir, learning_starts=5000).read().speed is None, "no speed before learning starts"
    assert ProgressReader(run_dir, learning_starts=1500).read().speed is None, "nor over its first 1,000 steps"
    assert reader.read() == progress, "reading again without new events changes nothing"
    time.sleep(0.05)  # the resumed attempt's file is the newer one
    resumed = list(range(2100, 3101, 100))
    write_events(run_dir, resumed, [2.0] * len(resumed), start=2000.0)
    assert reader.read().step == 3100 and reader.read().speed == pytest.approx(50.0)


def test_status_shows_a_running_jobs_step_speed_and_eta_from_its_event_file(tmp_path, capsys):
    """Breaks if `status` showed a running job by its last checkpoint only (or not at all before one)."""
    layout = Layout(tmp_path / "runs", tmp_path / "results")
    job = Job(BENCHMARKS["smoke"], "Breakout", BENCHMARKS["smoke"].arm("drlhf"), 1)
    steps = list(range(600, 1601, 100))  # learning starts at 500 in smoke
    write_events(job.run_dir(layout), steps, [1.0] * len(steps), start=time.time() - len(steps))
    assert runner.claim(job.lock_path(layout))  # this (live) process holds the job, as a worker of `run` does
    benchmark.main(["status", "smoke", "--arms", "drlhf", "--runs-dir", str(layout.runs),
                    "--results-dir", str(layout.results)])  # fmt: skip
    out = capsys.readouterr().out
    assert re.search(r"running: smoke/Breakout/drlhf/seed1 at step 1,600 of 2,000 \(80%\), 100 steps/s, ETA \d+ s", out)
    assert "smoke/Breakout/drlhf/seed2" not in out.split("|---|")[-1], "a job nobody runs has no progress line"


def test_run_prints_a_progress_line_per_running_job_when_it_has_moved_on(tmp_path, capsys):
    """Breaks if `run` stayed silent between a job's start and its end, or repeated a line for a job that has not
    moved on since its last one."""
    layout = Layout(tmp_path / "runs", tmp_path / "results")
    bench = BENCHMARKS["smoke"]
    job = Job(bench, "Breakout", bench.arm("drlhf"), 1)
    queued = Job(bench, "Breakout", bench.arm("sac"), 1)
    workers = runner.Runner([queued], layout, workers=1)
    now = time.time()
    workers.running[job.key] = None  # started 10 s ago (the process is not needed here)
    workers.watch(job, began=now - 10)
    steps = list(range(600, 1601, 100))
    write_events(job.run_dir(layout), steps, [2.0] * len(steps), start=now - 2.0 * len(steps))
    workers.report_progress(now)
    line = capsys.readouterr().out.strip()
    # 400 steps left at 50 steps/s: 8 s for this job, and the queued one is taken to last as long as this one's
    # projected time (10 s so far + 8 s left).
    assert line == (
        "[0 done, 1 running, 1 queued, ETA 26 s] progress: smoke/Breakout/drlhf/seed1 at step 1,600 of 2,000 (80%), "
        "50 steps/s, ETA 8 s"
    )
    workers.report_progress(now)
    assert capsys.readouterr().out == "", "no new step, no new line"


def test_report_says_what_it_is_doing_and_which_declared_runs_are_missing(tmp_path, capsys):
    """Breaks if `report` were silent while it bootstraps, or a partial benchmark's page did not name the runs it
    lacks (here smoke's frozen-reward and AIHF runs and drlhf's seed 2)."""
    layout = Layout(tmp_path / "runs", tmp_path / "results")
    write_fake_results(layout.results, {("random", "Breakout"): 0.0, ("sac", "Breakout"): 2.0}, seeds=(1, 2))
    write_fake_results(layout.results, {("drlhf", "Breakout"): 1.0}, seeds=(1,))
    page = write_report(BENCHMARKS["smoke"], layout, reps=200).read_text()
    out = capsys.readouterr().out
    missing = "3 of the 8 declared runs have no summary yet: drlhf (Breakout seed 2), drlhf_frozen (Breakout seed 1), "
    missing += "aihf (Breakout seed 1)"
    assert f"report smoke: {missing}\n" in out and f"- Missing: {missing}." in page
    for stage in ("loaded 5 summaries", "final return per game", "drawing", "over Breakout", "1 comparison ("):
        assert stage in out, stage
    write_fake_results(layout.results, {("drlhf", "Breakout"): 1.0, ("drlhf_frozen", "Breakout"): 1.0}, seeds=(1, 2))
    write_fake_results(layout.results, {("aihf", "Breakout"): 1.0}, seeds=(1,))
    assert "Missing" not in write_report(BENCHMARKS["smoke"], layout, reps=200).read_text()


def test_the_page_says_how_many_runs_ran_at_a_time_as_the_summaries_recorded_it():
    """Breaks if every page said "two runs at a time" whatever --workers the runs had."""
    one, three = [{"workers": [1], "machines": []}], [{"workers": [3], "machines": []}]
    assert provenance(one)[-1] == "- Device: unknown; one thread per run, one run at a time per `run` (its --workers)"
    assert provenance(three)[-1].endswith("3 runs at a time per `run` (its --workers)")
    mixed = provenance(one + three + [{}])[-1]
    assert mixed.endswith("1 or 3 runs at a time per `run` (its --workers); not recorded for 1")
    # Summaries from before the attempts recorded --workers: the committed benchmarks ran two at a time.
    assert provenance([{}])[-1].endswith("two runs at a time")


def test_help_gives_each_default_once():
    """Breaks on "(default: each arm's own) (default: )", or a "(default: )" for a flag whose empty default means
    something the help says."""
    result = run_script("sobirl/benchmark.py", "--help")
    text = " ".join(result.stdout.split())
    assert result.returncode == 0 and "(default: )" not in text
    assert text.count("(default: each arm's own)") == 1 and "own) (default" not in text


# ---------------------------------------------------------------------------------------------------------------
# Per-game probabilities, IQM differences, replaced runs, the area under the learning curve


def write_finals(results_dir, bench, game, arm, finals, seeds=None):
    """Summaries of `finals` (one per seed, seeds 1.. unless given)."""
    for seed, final in zip(seeds or range(1, len(finals) + 1), finals):
        path = results_dir / bench / game / arm / f"seed{seed}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(fake_result(bench, game, arm, seed, final)))


def section(page: str, title: str) -> str:
    return page.split(f"\n{title}\n")[1].split("\n## ")[0].split("\n### ")[0]


def table_rows(text: str, first_cell: str) -> list[list[str]]:
    return [[cell.strip() for cell in line.split("|")[1:-1]] for line in text.splitlines()
            if line.startswith(f"| {first_cell} |")]  # fmt: skip


def test_the_per_game_table_gives_each_games_probability_over_that_games_runs(tmp_path):
    """On Breakout 6 of the 25 pairs of runs have drlhf above sac (0.24), on Seaquest all of them (1.00, read as every
    run above); the aggregate is their mean, 0.62. Broken once on purpose: each game's row bootstrapped the whole
    (runs, games) matrices instead of that game's column, and every row read 0.62."""
    bench = dataclasses.replace(BENCHMARKS["smoke"], games=("Breakout", "Seaquest"))
    layout = Layout(tmp_path / "runs", tmp_path / "results")
    for game in bench.games:
        write_finals(layout.results, "smoke", game, "random", [0.0] * 5)
    write_finals(layout.results, "smoke", "Breakout", "drlhf", [0.1, 0.2, 0.3, 0.4, 0.5])
    write_finals(layout.results, "smoke", "Breakout", "sac", [0.25, 0.35, 0.45, 0.55, 0.65])
    write_finals(layout.results, "smoke", "Seaquest", "drlhf", [1.0, 2.0, 3.0, 4.0, 5.0])
    write_finals(layout.results, "smoke", "Seaquest", "sac", [0.1, 0.2, 0.3, 0.4, 0.5])
    page = write_report(bench, layout, reps=200).read_text()
    aggregate = table_rows(section(page, "## Probability of improvement"), "drlhf vs sac")
    assert aggregate[0][2].startswith("0.62 [") and aggregate[0][3] == "not separated at 5 runs per game"
    rows = {row[1]: row for row in table_rows(section(page, "### Per game"), "drlhf vs sac")}
    assert set(rows) == {"Breakout", "Seaquest"} and rows["Breakout"][2] == "5"
    point, low, high = (float(v) for v in re.findall(r"−?[\d.]+", rows["Breakout"][3].replace("−", "-")))
    assert point == 0.24 and low < 0.24 < high and (low, high) != (0.0, 1.0)
    assert rows["Breakout"][4] == "not separated at 5 runs per game"
    assert rows["Seaquest"][3] == "1.00 [1.00, 1.00]"
    assert rows["Seaquest"][4] == "drlhf ahead: every run of drlhf above every run of sac"


def test_the_iqm_difference_holds_its_point_and_flips_sign_when_the_arms_swap():
    """The point is IQM(first) - IQM(second), inside its interval; swapping the arms negates the point and, up to the
    resampling, the interval. Broken once on purpose: the difference taken as IQM(second) - IQM(first) (the swap
    still flips it; the point no longer matches the two IQMs)."""
    rng = np.random.default_rng(4)
    x, y = rng.normal(0.8, 0.1, size=(10, 3)), rng.normal(0.5, 0.1, size=(10, 3))
    points, intervals = stats.iqm_difference({"x vs y": (x, y), "y vs x": (y, x)}, reps=1000, seed=0)
    assert points["x vs y"] == pytest.approx(stats.iqm(x) - stats.iqm(y)) and points["x vs y"] > 0.2
    assert points["y vs x"] == pytest.approx(-points["x vs y"])
    low, high = intervals["x vs y"]
    assert 0 < low < points["x vs y"] < high
    swapped_low, swapped_high = intervals["y vs x"]
    assert swapped_high < 0 and swapped_low < points["y vs x"] < swapped_high
    assert swapped_low == pytest.approx(-high, abs=0.03) and swapped_high == pytest.approx(-low, abs=0.03)


def test_the_reading_says_every_run_above_where_one_arm_beats_every_run_of_the_other():
    """Breaks if a 0.00 [0.00, 0.00] interval were read only as "ahead", or a tie counted as being above. Broken once
    on purpose: stats.dominance compared with >= (a tie at the boundary then read as every run above)."""
    low_runs, high_runs = np.array([[0.1, 1.0], [0.2, 2.0]]), np.array([[0.3, 3.0], [0.4, 4.0]])
    assert stats.dominance(high_runs, low_runs) == 1 and stats.dominance(low_runs, high_runs) == -1
    tied = high_runs.copy()
    tied[0, 0] = 0.2  # one run of the higher arm ties the lower arm's best on one game
    assert stats.dominance(tied, low_runs) == 0
    assert stats.dominance(np.array([[0.5], [0.1]]), np.array([[0.3], [0.2]])) == 0  # overlapping
    assert improvement_reading(0.0, 0.0, "A", "B", 5, dominance=-1, games=3) == (
        "B ahead: every run of B above every run of A, on each game"
    )
    assert improvement_reading(1.0, 1.0, "A", "B", 5, dominance=1) == "A ahead: every run of A above every run of B"
    assert improvement_reading(0.0, 0.1, "A", "B", 5) == "B ahead"


def test_the_area_under_the_learning_curve_is_the_mean_of_the_normalised_grid_with_early_gaps_at_random_play():
    """Random play at 1, SAC at 3: the curve None, 1, 3, 3 normalises to (0), 0, 1, 1; its area over the run's steps is
    their mean, 0.5. Broken once on purpose: the missing early point dropped instead of counted as random play's
    level (2/3)."""
    assert curve_area([None, 1.0, 3.0, 3.0], (1.0, 3.0)) == pytest.approx(0.5)
    assert curve_area([2.0, 2.0, 5.0, 5.0], (1.0, 3.0)) == pytest.approx((0.5 + 0.5 + 2.0 + 2.0) / 4)


def test_the_page_gives_the_area_under_the_learning_curve_of_each_arm(tmp_path):
    """Random play at 0 and SAC averaging 2.03: drlhf's curve None, None, 2.03, 2.03 and then 0 at the other 16 grid
    points normalises to 0, 0, 1, 1, 0, ...: an area of 2 / 20 = 0.10 in every run. Broken once on purpose: the
    trapezoid rule over the grid points (2 / 19, printed 0.11), which treats the windows' means as point values."""
    layout = Layout(tmp_path / "runs", tmp_path / "results")
    write_fake_results(layout.results, {("random", "Breakout"): 0.0, ("sac", "Breakout"): 2.0}, seeds=range(1, 6))
    write_finals(layout.results, "smoke", "Breakout", "random", [0.0] * 5)
    write_finals(layout.results, "smoke", "Breakout", "drlhf", [1.0] * 5)
    for path in (layout.results / "smoke/Breakout/drlhf").glob("seed*.json"):
        result = json.loads(path.read_text())
        result["return_curve"] = [None, None, 2.03, 2.03] + [0.0] * 16
        path.write_text(json.dumps(result))
    page = write_report(BENCHMARKS["smoke"], layout, reps=200).read_text()
    row = table_rows(section(page, "## Area under the learning curve"), "drlhf")[0]
    assert row[1] == "5" and row[2] == "0.10 [0.10, 0.10]"


def git_in(folder):
    def git(*args: str) -> str:
        command = ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args]
        return subprocess.run(command, cwd=folder, capture_output=True, text=True, check=True).stdout.strip()

    return git


def test_a_summary_is_listed_as_replaced_when_a_committed_version_of_it_had_another_finished_time(tmp_path):
    """In a tiny repository: a rewrite that keeps `finished` (a migration) replaces nothing; a rerun's new
    `finished`, committed or not yet, does; without git only the summaries' own `replaces` records are known, and the
    page says so. Broken once on purpose: any summary with more than one commit counted as replaced (the migrated
    one was then listed)."""
    repo = tmp_path / "repo"
    folder = repo / "docs/results/main"
    repo.mkdir()
    git = git_in(repo)
    git("init", "-q")

    def put(arm: str, seed: int, finished: str, final: float, **extra) -> dict:
        result = {**fake_result("main", "Breakout", arm, seed, final), "finished": finished, **extra}
        path = folder / "Breakout" / arm / f"seed{seed}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result))
        return result

    def commit(message: str) -> None:
        git("add", "-A")
        git("commit", "-qm", message)

    put("sac", 1, "2026-12-01T10:00:00+00:00", 2.4)
    put("random", 1, "2026-12-01T09:00:00+00:00", 0.4)
    put("drlhf", 2, "2026-12-01T11:00:00+00:00", 2.0)
    commit("first runs")
    put("random", 1, "2026-12-01T09:00:00+00:00", 0.4, untimed_attempts=0)  # a migration: same run
    put("sac", 1, "2026-12-03T10:00:00+00:00", 2.3)  # a rerun
    commit("migration and a rerun")
    current = [put("sac", 1, "2026-12-03T10:00:00+00:00", 2.3), put("random", 1, "2026-12-01T09:00:00+00:00", 0.4)]
    current.append(put("drlhf", 2, "2026-12-04T08:00:00+00:00", 2.2))  # a rerun not committed yet
    replaced, unavailable = replaced_runs(current, folder)
    assert unavailable is None
    assert [(e["arm"], e["seed"], e["found"]) for e in replaced] == [("sac", 1, "git"), ("drlhf", 2, "git")]
    assert replaced[0]["replaced"] == [{"finished": "2026-12-01T10:00:00+00:00", "final_return": 2.4,
                                        "commits": ["abc"]}]  # fmt: skip
    assert replaced[1]["replaced"][0]["final_return"] == 2.0 and replaced[1]["current"]["final_return"] == 2.2

    # A copy without git: the records the summaries carry, and a note.
    recorded = {**current[2], "replaces": [replaced[1]["replaced"][0]]}
    copy, unavailable = replaced_runs([current[0], recorded], tmp_path / "not_a_repo")
    assert unavailable == "git history not available"
    assert [(e["arm"], e["found"]) for e in copy] == [("drlhf", "summary")]
    # In the repository, a record the summary carries and git agree: one entry, found by both.
    both, _ = replaced_runs([recorded], folder)
    assert len(both[0]["replaced"]) == 1 and both[0]["found"] == "summary, git"


def test_the_page_lists_replaced_runs_or_says_the_history_is_not_available(tmp_path):
    """Breaks if a replaced run went unmentioned, or a page made without git history claimed a complete list."""
    layout = Layout(tmp_path / "runs", tmp_path / "results")
    write_fake_results(layout.results, {("random", "Breakout"): 0.0, ("sac", "Breakout"): 2.0}, seeds=(1, 2))
    path = layout.results / "smoke/Breakout/sac/seed1.json"
    rerun = {**json.loads(path.read_text()), "finished": "2026-12-04T01:48:05+00:00"}
    rerun["replaces"] = [{"finished": "2026-12-02T23:32:07+00:00", "final_return": 2.48, "commits": ["abc"]}]
    path.write_text(json.dumps(rerun))
    page = write_report(BENCHMARKS["smoke"], layout, reps=200).read_text()
    text = section(page, "## Runs replaced by reruns")
    assert "Here git history not available: only the runs whose summaries record it are listed." in text
    assert table_rows(text, "Breakout") == [
        ["Breakout", "sac", "1", "2026-12-02 23:32, 2.48", "2026-12-04 01:48, 2.01", "summary"]
    ]


def test_a_rerun_summary_records_the_summaries_it_replaced(tmp_path, monkeypatch):
    """Breaks if the harness wrote over a summary without saying so, or a second rerun lost the first's record.
    Broken once on purpose: the old summary's own `replaces` records not carried over."""
    layout = Layout(tmp_path / "runs", tmp_path / "results")
    job = Job(BENCHMARKS["smoke"], "Breakout", BENCHMARKS["smoke"].arm("sac"), 1)
    runs = iter(
        [("2026-12-01T00:00:00+00:00", 1.0), ("2026-12-02T00:00:00+00:00", 2.0), ("2026-12-03T00:00:00+00:00", 3.0)]
    )

    def summarize(job, layout):
        finished, final = next(runs)
        return {**fake_result("smoke", job.game, job.arm.name, job.seed, final), "finished": finished}

    monkeypatch.setattr(summaries, "summarize_run", summarize)
    path = summaries.write_summary(job, layout)
    assert "replaces" not in json.loads(path.read_text())
    summaries.write_summary(job, layout)
    summaries.write_summary(job, layout)
    third = json.loads(path.read_text())
    assert third["final_return"] == 3.0
    assert third["replaces"] == [
        {"finished": "2026-12-01T00:00:00+00:00", "final_return": 1.0, "commits": ["abc"]},
        {"finished": "2026-12-02T00:00:00+00:00", "final_return": 2.0, "commits": ["abc"]},
    ]
