"""sobirl/plot.py on synthetic TensorBoard event files with known values."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from torch.utils.tensorboard import SummaryWriter

from agents.infra.cli import UsageError, run_cli
from sobirl import plot
from sobirl.harness.events import load_run
from tests.conftest import cli_error

ENV = "BeamRiderNoFrameskip-v4"
EPISODE_STEPS = np.arange(100, 2001, 100)  # 20 episodes per run


def write_run(
    runs_dir: Path,
    algo: str,
    seed: int,
    scalars: dict[str, tuple],
    start_time: int = 1_700_000_000,
    env_id: str = ENV,
    walltime: float = 1000.0,
) -> Path:
    """scalars: tag -> (steps, values). Returns the run folder."""
    run_dir = runs_dir / f"{env_id}__{algo}__{seed}__{start_time}"
    writer = SummaryWriter(str(run_dir))
    for tag, (steps, values) in scalars.items():
        for i, (step, value) in enumerate(zip(steps, values)):
            writer.add_scalar(tag, float(value), int(step), walltime=walltime + i)
    writer.close()
    return run_dir


def returns(value_per_episode) -> tuple:
    return EPISODE_STEPS, np.broadcast_to(np.asarray(value_per_episode, dtype=float), EPISODE_STEPS.shape)


ACC_STEPS = np.arange(500, 2001, 500)


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory) -> Path:
    """sobirl returns 10*seed, drlhf returns 5 everywhere; lengths 50; constant accuracies."""
    root = tmp_path_factory.mktemp("runs")
    for seed in (1, 2, 3):
        write_run(
            root,
            "sobirl",
            seed,
            {
                plot.RETURN_TAG: returns(10.0 * seed),
                plot.LENGTH_TAG: returns(50.0),
                plot.ACC_FRESH_TAG: (ACC_STEPS, np.full(ACC_STEPS.shape, 0.8)),
                plot.ACC_TRAIN_TAG: (ACC_STEPS, np.full(ACC_STEPS.shape, 0.9)),
            },
        )
        write_run(
            root,
            "drlhf",
            seed,
            {
                plot.RETURN_TAG: returns(5.0),
                plot.LENGTH_TAG: returns(50.0),
                plot.ACC_FRESH_TAG: (ACC_STEPS, np.full(ACC_STEPS.shape, 0.7)),
                plot.ACC_TRAIN_TAG: (ACC_STEPS, np.full(ACC_STEPS.shape, 0.95)),
            },
        )
    # A folder that is not a run: must be skipped, not crash.
    SummaryWriter(str(root / "scratch")).close()
    return root


# --- pure functions -----------------------------------------------------------------------------------------


def test_parse_run_name():
    assert plot.parse_run_name(f"{ENV}__sobirl__3__1700000000") == (ENV, "sobirl", 3, 1700000000)
    assert plot.parse_run_name("ALE/BeamRider-v5__sac_discrete__1__17") == ("ALE/BeamRider-v5", "sac_discrete", 1, 17)
    assert plot.parse_run_name("scratch") is None
    assert plot.parse_run_name(f"{ENV}__sobirl__x__1700000000") is None


def test_estimate_is_the_iqm_with_an_interval_from_five_runs_and_the_range_below():
    name, point, low, high = plot.estimate(np.array([1.0, 2.0, 3.0, 4.0, 100.0]), reps=500)
    assert name == "IQM" and point == pytest.approx(3.0) and low <= 3.0 <= high < 100.0  # the outlier is trimmed
    assert plot.estimate(np.array([1.0, 2.0, 6.0]), reps=500) == ("mean", 3.0, 1.0, 6.0)


def test_rolling_mean_and_resample():
    assert plot.rolling_mean(np.array([2.0, 4.0, 6.0, 8.0]), 2).tolist() == [2.0, 3.0, 5.0, 7.0]
    assert plot.rolling_mean(np.array([2.0, 4.0]), 1).tolist() == [2.0, 4.0]
    out = plot.resample(np.array([10, 20]), np.array([0.0, 10.0]), np.array([5.0, 10.0, 15.0, 20.0, 25.0]))
    assert np.isnan(out[0]) and np.isnan(out[-1]) and out[1:4].tolist() == [0.0, 5.0, 10.0]
    grid = plot.common_grid([np.array([100, 2000]), np.array([200, 1000])], 5)
    assert grid[0] == 200 and grid[-1] == 1000 and len(grid) == 5


def test_final_value():
    assert plot.final_value(np.arange(1.0, 21.0), 0.1) == pytest.approx(19.5)  # last 2 of 20
    assert plot.final_value(np.array([3.0, 4.0]), 0.1) == 4.0  # at least one episode


# --- loading ------------------------------------------------------------------------------------------------


def test_load_run_reads_known_values(runs_dir):
    scalars = load_run(runs_dir / f"{ENV}__sobirl__2__1700000000")
    steps, values = scalars[plot.RETURN_TAG]
    assert steps.tolist() == EPISODE_STEPS.tolist()
    assert np.all(values == 20.0)
    assert scalars[plot.ACC_FRESH_TAG][1] == pytest.approx([0.8] * 4)


def test_load_run_merges_resumed_event_files(tmp_path):
    run_dir = write_run(
        tmp_path, "sobirl", 1, {plot.RETURN_TAG: (np.arange(0, 1001, 100), np.ones(11))}, walltime=1000.0
    )
    # The resumed process restarts from a checkpoint at step 600 and writes a second file into the same folder;
    # two episodes ending at step 700 (vector envs) must both survive.
    writer = SummaryWriter(str(run_dir))
    for i, step in enumerate([600, 700, 700, 800, 1500]):
        writer.add_scalar(plot.RETURN_TAG, 2.0, step, walltime=5000.0 + i)
    writer.close()
    assert len(list(run_dir.glob("*tfevents*"))) == 2
    steps, values = load_run(run_dir)[plot.RETURN_TAG]
    assert steps.tolist() == [0, 100, 200, 300, 400, 500, 600, 700, 700, 800, 1500]
    assert values.tolist() == [1.0] * 6 + [2.0] * 5


# --- end to end ---------------------------------------------------------------------------------------------


def test_main_writes_figure_table_and_json(runs_dir, tmp_path, capsys):
    png, js = tmp_path / "out" / "fig.png", tmp_path / "summary.json"
    rows = plot.main(
        [
            "--runs-dir",
            str(runs_dir),
            "--output",
            str(png),
            "--json",
            str(js),
            "--bootstrap-reps",
            "500",
            "--num-points",
            "20",
        ]
    )
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    by_algo = {row["algo"]: row for row in rows}
    assert [row["algo"] for row in rows] == ["sobirl", "drlhf"]  # paper order, not alphabetical
    sob, drl = by_algo["sobirl"], by_algo["drlhf"]
    assert sob["num_seeds"] == 3 and sob["estimator"] == "mean"
    assert sob["per_seed_final_return"] == pytest.approx([10.0, 20.0, 30.0])
    assert sob["final_return"] == pytest.approx(20.0)
    # Three seeds: their range, never an interval.
    assert sob["ci_low"] is None and (sob["range_low"], sob["range_high"]) == (10.0, 30.0)
    assert drl["final_return"] == pytest.approx(5.0) and drl["range_low"] == pytest.approx(5.0) == drl["range_high"]
    assert sob["final_accuracy_fresh"] == pytest.approx(0.8) and sob["final_accuracy_train"] == pytest.approx(0.9)
    assert drl["final_accuracy_fresh"] == pytest.approx(0.7)
    assert sob["min_last_step"] == 2000
    out, err = capsys.readouterr()
    assert "| BeamRiderNoFrameskip-v4 | sobirl | 3 | 2000 | 20.0 | mean |" in out
    assert "0.800" in out and "skipping" in err
    saved = json.loads(js.read_text())
    assert saved["groups"][0]["final_return"] == pytest.approx(20.0)


def test_aggregate_curve_on_known_runs(runs_dir):
    runs = [load_run(runs_dir / f"{ENV}__sobirl__{s}__1700000000")[plot.RETURN_TAG] for s in (1, 2, 3)]
    curve = plot.aggregate_curve(runs, num_points=10, smooth=5, reps=300)
    # The grid starts at the fifth game, where the rolling mean first averages five of them.
    assert curve.grid[0] == 500 and curve.grid[-1] == 2000 and curve.num_runs == 3
    assert curve.point == pytest.approx(np.full(10, 20.0))
    assert curve.low == pytest.approx(np.full(10, 10.0)) and curve.high == pytest.approx(np.full(10, 30.0))
    single = plot.aggregate_curve(runs[:1], num_points=10, smooth=5, reps=300)
    assert single.low is None and single.point == pytest.approx(np.full(10, 10.0))


def test_filters_iqm_and_newest_duplicate(tmp_path, capsys):
    # Five seeds switch the estimator to IQM; the outlier seed is trimmed away.
    for seed, value in zip(range(1, 6), [1.0, 2.0, 3.0, 4.0, 100.0]):
        write_run(tmp_path, "sac_discrete", seed, {plot.RETURN_TAG: returns(value)})
    # Seed 1 rerun from scratch later: only the newest folder counts.
    write_run(tmp_path, "sac_discrete", 1, {plot.RETURN_TAG: returns(1.5)}, start_time=1_800_000_000)
    write_run(tmp_path, "sobirl", 1, {plot.RETURN_TAG: returns(7.0)}, env_id="OtherEnv-v0")
    rows = plot.main(
        [
            "--runs-dir",
            str(tmp_path),
            "--algos",
            "sac",
            "--env-id",
            ENV,
            "--output",
            str(tmp_path / "f.png"),
            "--bootstrap-reps",
            "200",
        ]
    )
    assert len(rows) == 1
    row = rows[0]
    assert row["algo"] == "sac_discrete" and row["num_seeds"] == 5 and row["estimator"] == "IQM"
    assert row["final_return"] == pytest.approx(3.0)  # IQM of 1.5, 2, 3, 4, 100
    assert row["final_accuracy_fresh"] is None
    assert "newest" in capsys.readouterr().err


def test_bad_input_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(UsageError, match="not a folder"):
        plot.main(["--runs-dir", str(tmp_path / "missing")])
    with pytest.raises(UsageError, match="no run folders"):
        plot.main(["--runs-dir", str(tmp_path)])
    run_dir = write_run(tmp_path, "sobirl", 1, {plot.RETURN_TAG: returns(1.0)})
    with pytest.raises(UsageError, match="no runs match"):
        plot.main(["--runs-dir", str(tmp_path), "--algos", "drlhf"])
    # One run folder given directly works too (a single curve, no interval).
    [row] = plot.main(["--runs-dir", str(run_dir), "--output", str(tmp_path / "one.png")])
    assert row["num_seeds"] == 1 and row["final_return"] == 1.0 and row["ci_low"] is None
    with pytest.raises(SystemExit) as exc:
        run_cli(plot.main, ["--runs-dir", str(tmp_path / "missing")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1


def test_runs_in_sub_folders_and_behind_links_are_grouped_by_what_they_recorded(tmp_path):
    """Breaks if runs were grouped by their folder path (a harness layout, runs/bench/<game>/<arm>/seed<k>) or a
    symbolic link to a run folder were skipped."""
    root, elsewhere = tmp_path / "runs", tmp_path / "elsewhere"
    for seed in (1, 2):
        run_dir = root / "bench" / "Breakout" / "drlhf" / f"seed{seed}"
        writer = SummaryWriter(str(run_dir))
        writer.add_text("hyperparameters", f"|param|value|\n|-|-|\n|exp_name|drlhf|\n|seed|{seed}|\n"
                        f"|env_id|MinAtar/Breakout-v1|")  # fmt: skip
        for step, value in zip(*returns(float(seed))):
            writer.add_scalar(plot.RETURN_TAG, value, int(step))
        writer.close()
    linked = write_run(elsewhere, "drlhf", 3, {plot.RETURN_TAG: returns(3.0)}, env_id="MinAtar-Breakout-v1")
    (root / "linked").symlink_to(linked, target_is_directory=True)
    (root / "loop").symlink_to(root, target_is_directory=True)  # a link back up the tree is visited once
    rows = plot.main(["--runs-dir", str(root), "--env-id", "MinAtar/Breakout-v1", "--output", str(tmp_path / "f.png")])
    assert [(row["env_id"], row["algo"], row["num_seeds"]) for row in rows] == [("MinAtar/Breakout-v1", "drlhf", 3)]
    assert sorted(rows[0]["per_seed_final_return"]) == [1.0, 2.0, 3.0]


def test_every_panel_has_a_y_axis_label(runs_dir):
    args = plot.parse_args(plot.Args, ["--runs-dir", str(runs_dir)])
    runs = plot.select_runs(args)
    for run in runs:
        run.scalars = load_run(run.path)
    fig = plot.build_figure(plot.group_runs(runs), args)
    assert len(fig.axes) == 3 and all(ax.get_ylabel() for ax in fig.axes)


def test_a_curve_of_fewer_games_than_smooth_is_a_dot_with_a_note(tmp_path, capsys):
    """Breaks if a run shorter than --smooth left its panel empty under a legend entry, without a word."""
    write_run(tmp_path, "drlhf", 1, {plot.RETURN_TAG: ([100, 200, 300], [1.0, 2.0, 3.0])})
    args = plot.parse_args(plot.Args, ["--runs-dir", str(tmp_path), "--smooth", "20"])
    runs = plot.select_runs(args)
    for run in runs:
        run.scalars = load_run(run.path)
    fig = plot.build_figure(plot.group_runs(runs), args)
    [line] = fig.axes[0].lines
    assert len(line.get_xdata()) == 1 and line.get_marker() == "o"
    err = capsys.readouterr().err
    assert "one point" in err and "--smooth 20" in err and "3 values" in err


def test_output_errors_are_one_line_and_nothing_is_drawn_when_a_destination_is_bad(tmp_path, capsys):
    """Breaks if an unknown format, an output under a file, or a bad --json were tracebacks, or the figure were
    written before a --json that cannot be."""
    write_run(tmp_path / "runs", "drlhf", 1, {plot.RETURN_TAG: returns(1.0)})
    runs = ["--runs-dir", str(tmp_path / "runs")]
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert "unknown figure format 'xyz'" in cli_error(plot.main, [*runs, "--output", str(tmp_path / "f.xyz")], capsys)
    assert "is not a folder" in cli_error(plot.main, [*runs, "--output", str(blocker / "f.png")], capsys)
    assert "is a folder" in cli_error(plot.main, [*runs, "--output", str(tmp_path)], capsys)
    figure = tmp_path / "f.png"
    error = cli_error(plot.main, [*runs, "--output", str(figure), "--json", str(blocker / "s.json")], capsys)
    assert error.startswith("error: --json") and not figure.exists()
    assert "--runs-dir must name a folder" in cli_error(plot.main, ["--runs-dir", ""], capsys)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_output_folder_is_one_line(tmp_path, capsys):
    write_run(tmp_path / "runs", "drlhf", 1, {plot.RETURN_TAG: returns(1.0)})
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    error = cli_error(plot.main, ["--runs-dir", str(tmp_path / "runs"), "--output", str(locked / "f.png")], capsys)
    assert "not writable" in error


def test_the_newest_folder_wins_and_the_note_names_the_kept_and_the_dropped_one(tmp_path, capsys):
    """Breaks if a run replaced another of the same experiment name and seed (here a human-teacher run and an oracle
    one) without naming both folders and what they recorded differently."""
    for name, teacher in (("quickstart", "oracle"), ("labelled", "human")):
        run_dir = tmp_path / name / "seed1"
        writer = SummaryWriter(str(run_dir))
        writer.add_text("hyperparameters", f"|param|value|\n|-|-|\n|exp_name|drlhf|\n|seed|1|\n"
                        f"|env_id|MinAtar/Breakout-v1|\n|teacher|{teacher}|")  # fmt: skip
        for step, value in zip(*returns(1.0)):
            writer.add_scalar(plot.RETURN_TAG, value, int(step))
        writer.close()
        os.utime(next(run_dir.glob("*tfevents*")), (1e9, 1e9 + (name == "labelled")))  # the human-teacher run is newer
    args = plot.parse_args(plot.Args, ["--runs-dir", str(tmp_path)])
    [kept] = plot.select_runs(args)
    assert kept.path == tmp_path / "labelled" / "seed1"
    err = capsys.readouterr().err
    assert f"kept {tmp_path / 'labelled' / 'seed1'}, dropped {tmp_path / 'quickstart' / 'seed1'}" in err
    assert "teacher human vs oracle" in err
