"""DRLHF and SoBiRL scripts: tiny end-to-end runs, checkpoint resume and bad input."""

from __future__ import annotations

import math

import pytest

from agents import drlhf, sobirl
from tests.conftest import assert_usage_error, cli_error, only_run_dir, run_script, scalar_tags, tiny_preference_flags

# 40 rollout steps for the 4 warm-up pairs, then reward phases at steps 41, 141, 241, 341.
TINY = tiny_preference_flags(total_timesteps="400")
REWARD_TAGS = {
    "reward/loss",
    "reward/bce",
    "reward/hyper_term",
    "reward/accuracy_train",
    "reward/accuracy_fresh",
    "reward/num_pairs",
}


def run_tags(script: str, runs_dir, *flags: str) -> dict:
    result = run_script(script, *TINY, "--runs-dir", str(runs_dir), *flags)
    assert result.returncode == 0, result.stderr[-3000:]
    return scalar_tags(only_run_dir(runs_dir))


def values(tags: dict, tag: str) -> list[float]:
    return [value for _, value in tags[tag]]


def test_drlhf_smoke_run(tmp_path):
    tags = run_tags("agents/drlhf.py", tmp_path)
    assert REWARD_TAGS | {"losses/qf1_loss", "charts/episodic_return"} <= set(tags)
    assert [step for step, _ in tags["reward/loss"]] == [41, 141, 241, 341]
    # 4 warm-up pairs, then the schedule's 2 per iteration, in a FIFO of 9.
    assert values(tags, "reward/num_pairs") == [4, 6, 8, 9]
    assert values(tags, "reward/hyper_term") == [0.0] * 4
    assert values(tags, "reward/loss") == values(tags, "reward/bce")
    assert only_run_dir(tmp_path).name.startswith("BeamRiderNoFrameskip-v4__drlhf__1__")


def test_sobirl_smoke_run_switches_the_implicit_term_on(tmp_path):
    tags = run_tags("agents/sobirl.py", tmp_path, "--hyper-start", "200")
    assert REWARD_TAGS <= set(tags)
    hyper = dict(tags["reward/hyper_term"])
    inv_alpha = dict(tags["reward/inv_alpha"])
    assert hyper[41] == hyper[141] == 0.0 and inv_alpha[141] == 0.0
    assert hyper[241] != 0.0 and inv_alpha[241] > 0.0  # global_step 241 > --hyper-start 200
    for (_, loss), (_, bce), (_, h) in zip(tags["reward/loss"], tags["reward/bce"], tags["reward/hyper_term"]):
        assert math.isclose(loss, bce + h, rel_tol=1e-4, abs_tol=1e-6)
    assert only_run_dir(tmp_path).name.startswith("BeamRiderNoFrameskip-v4__sobirl__1__")


def test_sobirl_with_every_correction_flag_runs_and_logs_its_importance_weights(tmp_path):
    """The pipeline's path through --implicit-correction ratio-baseline, --implicit-pairs learned and --clamp-aware:
    the ratios are logged (mean, share at the clip) once the term is on, and the term is not zero."""
    tags = run_tags(
        "agents/sobirl.py", tmp_path, "--hyper-start", "200", "--implicit-correction", "ratio-baseline",
        "--implicit-pairs", "learned", "--clamp-aware", "--ratio-clip", "2",
    )  # fmt: skip
    ratio_mean, clipped = dict(tags["reward/ratio_mean"]), dict(tags["reward/ratio_clipped"])
    assert set(ratio_mean) == set(clipped) == {241, 341}, "logged from the first phase with the term on"
    assert all(0 < value <= 2 for value in ratio_mean.values())
    assert all(0 <= value <= 1 for value in clipped.values())
    assert dict(tags["reward/hyper_term"])[341] != 0.0


def test_resume_continues_the_outer_loop(tmp_path):
    run_tags("agents/drlhf.py", tmp_path, "--total-timesteps", "250")
    run_dir = only_run_dir(tmp_path)
    result = run_script("agents/drlhf.py", "--resume", str(run_dir), "--total-timesteps", "400", "--no-progress")
    assert result.returncode == 0, result.stderr[-3000:]
    tags = scalar_tags(run_dir)
    # The first run's phases at 41, 141, 241 and its pairs carry over; the resumed one adds phases at 250 and 350.
    assert [step for step, _ in tags["reward/num_pairs"]] == [41, 141, 241, 250, 350]
    assert values(tags, "reward/num_pairs") == [4, 6, 8, 9, 9]
    assert values(tags, "reward/iteration") == [1, 2, 3, 4, 5]


@pytest.mark.parametrize(
    "flags,words",
    [
        (["--teacher", "nosuch"], ["--teacher"]),
        (["--initial-pairs", "50", "--pair-buffer", "10"], ["--initial-pairs", "--pair-buffer"]),
        (["--fragment-length", "200", "--inner-steps", "100"], ["--fragment-length", "--inner-steps"]),
        (["--fragment-length", "30", "--inner-steps", "100", "--num-envs", "4"], ["--fragment-length"]),
        (["--fragment-length", "0"], ["--fragment-length"]),
        (
            ["--fragment-length", "35", "--buffer-size", "40", "--batch-size", "8"],
            ["--fragment-length", "--buffer-size"],
        ),
        (["--total-pairs", "5", "--initial-pairs", "10"], ["--total-pairs"]),
        (["--reward-lr", "-1"], ["--reward-lr"]),
        (["--warmup-epochs", "-1"], ["--warmup-epochs"]),
        (["--hyper-start", "-5"], ["--hyper-start"]),
        (["--env-id", "NoSuchGameNoFrameskip-v4"], ["--env-id"]),
    ],
)
def test_sobirl_bad_input_is_one_line_and_exit_2(flags, words, tmp_path, capsys):
    line = cli_error(sobirl.main, [*flags, "--runs-dir", str(tmp_path)], capsys)
    assert all(word in line for word in words), line
    assert not any(tmp_path.iterdir()), "bad input creates no run directory"


def test_drlhf_has_no_hyper_start(capsys):
    assert "--hyper-start" in cli_error(drlhf.main, ["--hyper-start", "5"], capsys)


def test_bad_input_from_the_command_line(tmp_path):
    """The real command lines: one line on stderr, exit status 2, no traceback, no run directory."""
    assert_usage_error(run_script("agents/sobirl.py", "--teacher", "nosuch", "--runs-dir", str(tmp_path)), "--teacher")
    assert_usage_error(
        run_script("agents/drlhf.py", "--initial-pairs", "50", "--pair-buffer", "10", "--runs-dir", str(tmp_path)),
        "--initial-pairs",
    )
    assert_usage_error(run_script("sobirl/beamrider.py", "--algo", "rlhf"), "--algo")
    assert not any(tmp_path.iterdir())


def test_entry_point_lists_the_preference_flags():
    result = run_script("sobirl/beamrider.py", "--algo", "drlhf", "--help")
    assert result.returncode == 0 and "--initial-pairs" in result.stdout and "--hyper-start" not in result.stdout
    result = run_script("sobirl/beamrider.py", "--algo", "sobirl", "--help")
    assert result.returncode == 0 and "--hyper-start" in result.stdout and "4300000" in result.stdout
