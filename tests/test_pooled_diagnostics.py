"""The pooled implicit term's diagnostics in summaries and pages: a diagnostic added after a run finished is read
again from its run folder into its summary (nothing else changes), and the page gives the pooled term's own table."""

from __future__ import annotations

import json
import os

import pytest

from sobirl import benchmark
from sobirl.harness import summaries
from sobirl.harness.declarations import BENCHMARKS
from sobirl.harness.jobs import Layout, select_jobs
from sobirl.harness.report import by_cell, diagnostics_table, pooled_table
from tests.test_benchmark import fake_result, write_fake_results


def write_reward_events(run_dir, tags: dict[str, list[float]]) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(run_dir))
    for tag, values in tags.items():
        for k, value in enumerate(values):
            writer.add_scalar(tag, value, 1000 * (k + 1))
    writer.close()


def finished_checkpoint(run_dir, step: int) -> None:
    from agents.infra.checkpoint import CHECKPOINT_NAME, save_atomic

    save_atomic({"algo": "drlhf", "args": {"total_timesteps": 2000}, "global_step": step}, run_dir / CHECKPOINT_NAME)


def test_diagnostics_are_read_again_into_finished_summaries_whose_run_folders_are_there(tmp_path, capsys):
    """Seed 1's folder logged the pooled term (20 phases: its last 10% are the last two); seed 2's folder is gone.
    Breaks if the refresh changed anything but the diagnostics, or touched a summary without its folder."""
    layout = Layout(tmp_path / "runs", tmp_path / "results")
    write_fake_results(layout.results, {("drlhf", "Breakout"): 1.0}, seeds=(1, 2))
    job1, job2 = select_jobs(BENCHMARKS["smoke"], ["Breakout"], ["drlhf"], [1, 2])
    before = [json.loads(job.result_path(layout).read_text()) for job in (job1, job2)]
    for summary, job in zip(before, (job1, job2)):
        summary.update(finished="2026-12-07T10:00:00+00:00", global_step=2000)
        job.result_path(layout).write_text(json.dumps(summary))
    finished_checkpoint(job1.run_dir(layout), 2000)
    ratios = [0.1 * k for k in range(20)]
    write_reward_events(
        job1.run_dir(layout),
        {"reward/bce": [0.7] * 19 + [0.3], "reward/pooled_ratio": ratios, "reward/split_half_cosine": [0.05] * 20},
    )
    benchmark.main(["diagnostics", "smoke", "--arms", "drlhf", "--games", "Breakout", "--seeds", "1,2",
                    "--runs-dir", str(layout.runs), "--results-dir", str(layout.results)])  # fmt: skip
    assert "into 1 of 2 finished runs' summaries" in capsys.readouterr().out
    after = [json.loads(job.result_path(layout).read_text()) for job in (job1, job2)]
    assert after[1] == before[1]
    assert after[0]["diagnostics"]["pooled_ratio"] == pytest.approx(sum(ratios[-2:]) / 2)  # event files: float32
    assert after[0]["diagnostics"]["bce"] == pytest.approx((0.7 + 0.3) / 2)
    assert after[0]["diagnostics"]["split_half_cosine"] == pytest.approx(0.05)
    assert "accuracy_fresh" not in after[0]["diagnostics"]  # the folder's events are the diagnostics now
    unchanged = {k: v for k, v in after[0].items() if k not in ("diagnostics", "diagnostic_curves")}
    assert unchanged == {k: v for k, v in before[0].items() if k not in ("diagnostics", "diagnostic_curves")}
    assert set(after[0]["diagnostic_curves"]) == {"bce"}


def test_the_pooled_table_gives_each_pooling_arms_medians_and_nothing_for_arms_without_the_term():
    results = []
    for seed, (cosine, ratio, capped) in enumerate(((0.0, 0.5, 0.0), (0.1, 1.5, 0.5), (0.5, 0.7, 0.0)), start=1):
        result = fake_result("smoke", "Breakout", "drlhf", seed, 1.0)
        result["diagnostics"].update(split_half_cosine=cosine, pooled_ratio=ratio, pooled_capped=capped)
        results.append(result)
    results.append(fake_result("smoke", "Breakout", "aihf", 1, 1.0))
    lines = pooled_table(BENCHMARKS["smoke"], by_cell(results))
    rows = [line for line in lines if line.startswith("| Breakout")]
    assert rows == ["| Breakout | drlhf | 3 | 0.10 [0.00, 0.50] | 0.70 [0.50, 1.50] | 0.00 [0.00, 0.50] | — |"]
    for result, share in zip(results, (0.04, 0.05, 0.06)):  # --implicit-pairs latest: the term reads a few
        result["diagnostics"]["implicit_pairs_share"] = share
    rows = [line for line in pooled_table(BENCHMARKS["smoke"], by_cell(results)) if line.startswith("| Breakout")]
    assert rows[0].endswith("| 0.05 [0.04, 0.06] |")
    assert pooled_table(BENCHMARKS["smoke"], by_cell(results[3:])) == []


def test_a_summary_is_built_from_the_same_diagnostics_the_refresh_reads(tmp_path):
    """summarize_run and refresh_diagnostics share event_diagnostics: every DIAGNOSTICS tag logged is summarised."""
    run_dir = tmp_path / "run"
    write_reward_events(run_dir, {tag: [1.0, 2.0] for tag in summaries.DIAGNOSTICS.values()})
    grid = summaries.grid_for(2_000)
    fields = summaries.event_diagnostics(summaries.load_run(run_dir), grid)
    assert set(fields["diagnostics"]) == set(summaries.DIAGNOSTICS)
    assert all(value == 2.0 for value in fields["diagnostics"].values())
    assert set(fields["diagnostic_curves"]) == set(summaries.DIAGNOSTIC_CURVES)


def test_the_reward_diagnostics_give_the_share_of_off_policy_pairs():
    results = []
    for seed, share in ((1, 0.8), (2, 0.9), (3, 1.0)):
        result = fake_result("smoke", "Breakout", "drlhf", seed, 1.0)
        result["diagnostics"]["offpolicy_share"] = share
        results.append(result)
    lines = diagnostics_table(BENCHMARKS["smoke"], by_cell(results))
    header = next(line for line in lines if line.startswith("| game |"))
    row = next(line for line in lines if line.startswith("| Breakout | drlhf |"))
    assert header.split("|")[-2].strip() == "off-policy pairs"
    assert row.split("|")[-2].strip() == "0.90 [0.80, 1.00]"


def test_a_run_folder_that_does_not_hold_the_finished_run_is_left_alone(tmp_path):
    """A folder whose checkpoint stops short of the summary's last step (a rerun part-way) or whose job a live
    `run` holds: the summary keeps its diagnostics. Breaks if either check were dropped."""
    from sobirl.harness.summaries import refresh_diagnostics

    layout = Layout(tmp_path / "runs", tmp_path / "results")
    write_fake_results(layout.results, {("drlhf", "Breakout"): 1.0}, seeds=(1,))
    (job,) = select_jobs(BENCHMARKS["smoke"], ["Breakout"], ["drlhf"], [1])
    summary = json.loads(job.result_path(layout).read_text())
    job.result_path(layout).write_text(json.dumps({**summary, "global_step": 2000}))
    write_reward_events(job.run_dir(layout), {"reward/bce": [9.0] * 3})
    finished_checkpoint(job.run_dir(layout), 1000)
    assert not refresh_diagnostics(job, layout)
    finished_checkpoint(job.run_dir(layout), 2000)
    job.lock_path(layout).parent.mkdir(parents=True, exist_ok=True)
    job.lock_path(layout).write_text(str(os.getpid()))  # a live process holds the job
    assert not refresh_diagnostics(job, layout)
    assert json.loads(job.result_path(layout).read_text())["diagnostics"]["bce"] == 0.5
    job.lock_path(layout).unlink()
    assert refresh_diagnostics(job, layout)
    assert json.loads(job.result_path(layout).read_text())["diagnostics"]["bce"] == 9.0
