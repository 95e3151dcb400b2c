"""SAC-discrete: the losses on hand-checkable numbers, annealing, smoke runs, determinism and bad input."""

import math

import gymnasium as gym
import pytest
import torch

from agents.infra.cli import UsageError
from agents.lower.sac import (
    actor_loss,
    alpha_loss,
    annealed_lr,
    check_env_spaces,
    critic_losses,
    critic_target,
    soft_state_value,
    target_entropy,
)
from tests.conftest import assert_usage_error, only_run_dir, run_script, scalar_tags

TINY = [
    "--total-timesteps",
    "240",
    "--learning-starts",
    "200",
    "--buffer-size",
    "400",
    "--batch-size",
    "8",
    "--log-every",
    "1",
    "--max-episode-frames",
    "400",
    "--num-envs",
    "2",
    "--no-progress",
]
SAC_TAGS = {
    "charts/episodic_return",
    "charts/episodic_length",
    "charts/SPS",
    "losses/qf1_loss",
    "losses/qf_loss",
    "losses/actor_loss",
    "losses/alpha",
    "losses/alpha_loss",
}


def test_target_entropy_is_089_ln_actions():
    assert target_entropy(9, 0.89) == pytest.approx(0.89 * math.log(9)) == pytest.approx(1.9555, abs=1e-4)


def test_critic_target_on_a_hand_checked_batch():
    probs = torch.tensor([[0.5, 0.5], [1.0, 0.0]])
    log_probs = torch.log(probs.clamp_min(1e-30))
    q = torch.tensor([[1.0, 3.0], [2.0, -5.0]])
    alpha = 0.5
    # V = sum pi (Q - alpha log pi): row 0: 0.5*(1+0.5 ln2) + 0.5*(3+0.5 ln2) = 2 + 0.5 ln 2; row 1: 2.
    value = soft_state_value(probs, log_probs, q, alpha)
    torch.testing.assert_close(value, torch.tensor([2 + 0.5 * math.log(2), 2.0]))
    target = critic_target(torch.tensor([1.0, -1.0]), torch.tensor([0.0, 1.0]), value, gamma=0.9)
    torch.testing.assert_close(target, torch.tensor([1 + 0.9 * (2 + 0.5 * math.log(2)), -1.0]))
    l1, l2 = critic_losses(torch.tensor([0.0, 0.0]), torch.tensor([1.0, 1.0]), torch.tensor([1.0, 3.0]))
    assert l1.item() == pytest.approx((1 + 9) / 2) and l2.item() == pytest.approx((0 + 4) / 2)


def test_actor_loss_is_the_batch_action_mean_of_pi_times_alpha_logpi_minus_q():
    probs = torch.tensor([[0.25, 0.75]])
    log_probs = probs.log()
    q = torch.tensor([[2.0, 1.0]])
    expected = (0.25 * (0.1 * math.log(0.25) - 2.0) + 0.75 * (0.1 * math.log(0.75) - 1.0)) / 2
    assert actor_loss(probs, log_probs, q, 0.1).item() == pytest.approx(expected)


def test_actor_loss_gradient_moves_probability_towards_the_better_action():
    logits = torch.zeros(1, 2, requires_grad=True)
    log_probs = torch.log_softmax(logits, -1)
    actor_loss(log_probs.exp(), log_probs, torch.tensor([[1.0, 0.0]]), 0.01).backward()
    assert logits.grad[0, 0] < 0 < logits.grad[0, 1]


def test_alpha_loss_raises_alpha_when_entropy_is_below_target():
    log_alpha = torch.zeros((), requires_grad=True)
    probs = torch.tensor([[0.99, 0.01]])  # entropy 0.056 < target
    loss = alpha_loss(probs, probs.log(), log_alpha, entropy_target=0.89 * math.log(2))
    # loss = mean_a pi (-alpha (log pi + H*)) ; d/dlog_alpha = loss at alpha = 1
    expected = (0.99 * -(math.log(0.99) + 0.89 * math.log(2)) + 0.01 * -(math.log(0.01) + 0.89 * math.log(2))) / 2
    assert loss.item() == pytest.approx(expected)
    loss.backward()
    assert log_alpha.grad < 0, "gradient descent increases alpha"


def test_learning_rate_anneals_linearly_to_zero_at_8m_steps():
    assert annealed_lr(1e-4, 1, 8_000_000) == pytest.approx(1e-4)
    assert annealed_lr(1e-4, 4_000_001, 8_000_000) == pytest.approx(0.5e-4)
    assert annealed_lr(1e-4, 4_300_001, 8_000_000) == pytest.approx(1e-4 * (1 - 4.3 / 8))
    assert annealed_lr(1e-4, 8_000_001, 8_000_000) == 0.0
    assert annealed_lr(1e-4, 9_000_000, 8_000_000) == 0.0
    assert annealed_lr(1e-4, 9_000_000, 0) == 1e-4


def test_env_space_checks():
    box = gym.spaces.Box(0, 255, (4, 84, 84))
    assert check_env_spaces("X", gym.spaces.Discrete(9), box) == (9, (4, 84, 84))
    with pytest.raises(UsageError, match="discrete action space"):
        check_env_spaces("X", gym.spaces.Box(-1, 1, (2,)), box)
    with pytest.raises(UsageError, match="--env-id X"):
        check_env_spaces("X", gym.spaces.Discrete(9), gym.spaces.Box(0, 1, (7,)))


def test_smoke_run_writes_the_cleanrl_tags(tmp_path):
    result = run_script("agents/sac_discrete.py", *TINY, "--runs-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = only_run_dir(tmp_path)
    assert run_dir.name.startswith("BeamRiderNoFrameskip-v4__sac_discrete__1__")
    tags = scalar_tags(run_dir)
    assert SAC_TAGS <= set(tags), SAC_TAGS - set(tags)
    # Truncated games (400 frames = 100 agent steps) report their true score at the step they end.
    assert all(length == 100 for _, length in tags["charts/episodic_length"])


def test_entry_point_runs_sac(tmp_path):
    result = run_script("sobirl/beamrider.py", "--algo", "sac", *TINY, "--runs-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert SAC_TAGS <= set(scalar_tags(only_run_dir(tmp_path)))


def test_evaluation_logs_true_scores_and_records_videos(tmp_path):
    pytest.importorskip("moviepy")
    result = run_script(
        "agents/sac_discrete.py",
        *TINY,
        "--runs-dir",
        str(tmp_path / "runs"),
        "--eval-every",
        "200",
        "--eval-episodes",
        "2",
        "--capture-video",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    tags = scalar_tags(only_run_dir(tmp_path / "runs"))
    assert [step for step, _ in tags["eval/episodic_return"]] == [200]
    assert "eval/episodic_return_greedy" in tags
    videos = sorted(p.relative_to(tmp_path / "videos").parts[1] for p in (tmp_path / "videos").rglob("*.mp4"))
    assert videos == ["step_200", "step_240"], "one greedy game at the evaluation and one at the end"


def test_same_seed_gives_identical_first_losses(tmp_path):
    losses = []
    for name in ("a", "b"):
        from agents import sac_discrete

        sac_discrete.main([*TINY, "--runs-dir", str(tmp_path / name)])
        tags = scalar_tags(only_run_dir(tmp_path / name))
        losses.append((tags["losses/qf1_loss"], tags["losses/actor_loss"], tags["charts/episodic_return"]))
    assert len(losses[0][0]) >= 5
    assert losses[0] == losses[1]


@pytest.mark.parametrize(
    "flags,words",
    [
        (["--env-id", "NoSuchGameNoFrameskip-v4"], ["--env-id"]),
        (["--env-id", "CartPole-v1"], ["--env-id"]),
        (["--batch-size", "500", "--buffer-size", "400"], ["--batch-size", "--buffer-size"]),
        (["--num-envs", "0"], ["--num-envs"]),
        (["--buffer-size", "-5"], ["--buffer-size"]),
        (["--total-timesteps", "0"], ["--total-timesteps"]),
        (["--gamma", "1.5"], ["--gamma"]),
        (["--batch-size", "abc"], ["--batch-size"]),
        (["--no-such-flag"], ["--no-such-flag"]),
        (["--buffer-size", "8", "--batch-size", "4", "--num-envs", "2"], ["--buffer-size"]),
    ],
)
def test_bad_input_is_one_line_and_exit_2(flags, words, tmp_path):
    assert_usage_error(run_script("agents/sac_discrete.py", *flags, "--runs-dir", str(tmp_path)), *words)
    assert not any(tmp_path.iterdir()), "bad input creates no run directory"


def test_unknown_algo_is_one_line_and_exit_2():
    assert_usage_error(run_script("sobirl/beamrider.py", "--algo", "ppo"), "--algo")
