"""Reward-model ensembles and uncertainty-based query selection: the pure functions, the learner's use of them in a
tiny run (with a resume), and bad input."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from agents import drlhf
from agents.pipeline.ensemble import (
    RewardEnsemble,
    binary_entropy,
    epoch_order,
    most_uncertain,
    preference_probabilities,
    query_uncertainty,
)
from agents.pipeline.reward_model import RewardCNN
from agents.pipeline.reward_training import ensemble_uncertainty, mean_stats, predicted_returns, reward_epoch
from tests.conftest import cli_error, only_run_dir, run_script, scalar_tags
from tests.test_preference import SMALL, bright_pairs, synthetic_buffer
from tests.test_preference_scripts import TINY, values


def test_epoch_order_is_a_permutation_or_a_resample():
    g = torch.Generator().manual_seed(0)
    assert torch.equal(epoch_order(50, False, g).sort().values, torch.arange(50))
    resample = epoch_order(1000, True, g)
    assert len(resample) == 1000 and 0 <= int(resample.min()) and int(resample.max()) < 1000
    # Drawing with replacement leaves out about 1/e of the rows.
    assert 0.33 < 1 - len(resample.unique()) / 1000 < 0.41


def test_reward_epoch_bootstrap_visits_resampled_rows(monkeypatch):
    g = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    buffer = synthetic_buffer(g, pairs=24)
    visited = []
    get = buffer.get
    monkeypatch.setattr(buffer, "get", lambda rows: visited.append(rows.tolist()) or get(rows))
    net = RewardCNN((4, SMALL, SMALL), 3)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    reward_epoch(net, optimizer, buffer, 8, generator=g)
    plain = sum(visited, [])
    visited.clear()
    reward_epoch(net, optimizer, buffer, 8, generator=g, bootstrap=True)
    resampled = sum(visited, [])
    assert sorted(plain) == list(range(24))
    assert len(resampled) == 24 and len(set(resampled)) < 24  # with replacement: some rows twice, some not at all


def test_preference_probabilities_and_entropy():
    r1 = torch.tensor([[0.0, 2.0], [1.0, -3.0]])
    r2 = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    p = preference_probabilities(r1, r2)
    assert torch.allclose(p, torch.sigmoid(r1))
    assert torch.allclose(binary_entropy(torch.tensor([0.0, 0.5, 1.0])), torch.tensor([0.0, math.log(2), 0.0]))


def test_query_uncertainty_by_hand():
    # Three members, three pairs: members agree on pair 0, split on pair 1, agree (near 0.5) on pair 2.
    p = torch.tensor([[0.9, 0.9, 0.5], [0.9, 0.1, 0.55], [0.9, 0.5, 0.45]])
    disagreement = query_uncertainty(p, "disagreement")
    expected = torch.tensor([0.0, math.sqrt(((0.4) ** 2 + 0.4**2 + 0) / 3), math.sqrt(2 * 0.05**2 / 3)])
    assert torch.allclose(disagreement, expected, atol=1e-6)
    entropy = query_uncertainty(p, "entropy")
    assert torch.allclose(entropy, binary_entropy(p).mean(0))
    assert most_uncertain(disagreement, 2).tolist() == [1, 2]
    assert most_uncertain(entropy, 1).tolist() == [2]  # the pair all members call a coin flip
    assert most_uncertain(torch.tensor([0.2, 0.7, 0.7, 0.1]), 3).tolist() == [1, 2, 0]  # ties: earlier first
    with pytest.raises(ValueError, match="uniform"):
        query_uncertainty(p, "uniform")


class ScaledPixelReward(nn.Module):
    """r(s, a) = scale * mean pixel of the newest frame, for every action."""

    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale

    def forward(self, obs):
        return self.scale * obs[:, -1].float().mean((1, 2))[:, None].expand(-1, 3) / 255


def test_ensemble_is_the_members_mean_and_its_uncertainty_matches_by_hand():
    members = [ScaledPixelReward(s) for s in (1.0, -1.0, 3.0)]
    obs = torch.randint(0, 256, (5, 4, 6, 6), dtype=torch.uint8)
    assert torch.allclose(RewardEnsemble(members)(obs), sum(m(obs) for m in members) / 3)
    pairs = bright_pairs(10, 3, torch.Generator().manual_seed(2), size=6)
    returns = [predicted_returns(m, pairs.frames1, pairs.actions1, pairs.frames2, pairs.actions2, 4) for m in members]
    probabilities = torch.sigmoid(torch.stack([r1 - r2 for r1, r2 in returns]))
    assert torch.allclose(ensemble_uncertainty(members, pairs, "disagreement"), probabilities.std(0, correction=0))
    # The two members of opposite sign disagree most where the returns differ most.
    gap = (returns[0][0] - returns[0][1]).abs()
    assert int(most_uncertain(ensemble_uncertainty(members, pairs, "disagreement"), 1)) == int(gap.argmax())


def test_mean_stats_averages_what_each_member_reports():
    out = mean_stats([{"bce": 1.0, "extra_grad_ratio": 4.0}, {"bce": 3.0}])
    assert out == {"bce": 2.0, "extra_grad_ratio": 4.0}


def test_ensemble_run_keeps_the_schedule_and_a_resumed_run_continues_with_all_members(tmp_path):
    """A tiny DRLHF run with 3 members and disagreement selection: the schedule's pair counts are unchanged, the
    selected pairs are more disputed than the candidates on average, and a resumed run continues with all
    members (their disagreement is still logged and positive)."""
    flags = [
        *TINY,
        "--runs-dir",
        str(tmp_path),
        "--ensemble",
        "3",
        "--query-selection",
        "disagreement",
        "--candidate-factor",
        "4",
    ]
    result = run_script("agents/drlhf.py", *flags, "--total-timesteps", "250")
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = only_run_dir(tmp_path)
    result = run_script("agents/drlhf.py", "--resume", str(run_dir), "--total-timesteps", "400", "--no-progress")
    assert result.returncode == 0, result.stderr[-3000:]
    tags = scalar_tags(run_dir)
    assert values(tags, "reward/num_pairs") == [4, 6, 8, 9, 9]
    selected, candidates = (
        values(tags, "reward/query_uncertainty_selected"),
        values(tags, "reward/query_uncertainty_candidates"),
    )
    assert len(selected) == 4  # every query after the warm-up, the resumed run's included
    assert all(s >= c for s, c in zip(selected, candidates)) and max(selected) > 0
    disagreement = dict(tags["reward/ensemble_disagreement"])
    assert max(step for step in disagreement) > 250 and all(d > 0 for d in disagreement.values())


def test_the_teacher_gets_the_most_uncertain_candidates(tmp_path, monkeypatch):
    """In the learner: the pairs handed to the teacher are exactly the top-uncertainty candidates, not the first
    ones drawn."""
    from agents.pipeline import learner as preference

    scored, labelled = [], []
    real_uncertainty, real_label = preference.ensemble_uncertainty, preference.PreferenceLearner.label

    def spy_uncertainty(members, pairs, mode):
        scored.append((pairs, real_uncertainty(members, pairs, mode)))
        return scored[-1][1]

    def spy_label(self, queries):
        labelled.append(None if queries is None else queries.frames1.clone())
        return real_label(self, queries)

    monkeypatch.setattr(preference, "ensemble_uncertainty", spy_uncertainty)
    monkeypatch.setattr(preference.PreferenceLearner, "label", spy_label)
    drlhf.main(
        [
            *TINY,
            "--runs-dir",
            str(tmp_path),
            "--ensemble",
            "2",
            "--query-selection",
            "entropy",
            "--candidate-factor",
            "5",
        ]
    )
    queries = [frames for frames in labelled[1:] if frames is not None and len(frames)]
    candidate_scores = [(pairs, u) for pairs, u in scored if len(pairs) > 4]  # the fresh-pair logs score 4 pairs
    assert len(queries) == len(candidate_scores) == 3
    differs_from_first = False
    for frames, (pairs, uncertainty) in zip(queries, candidate_scores):
        chosen = most_uncertain(uncertainty, len(frames))
        assert len(pairs) == 5 * len(frames)
        assert torch.equal(frames, pairs.frames1[chosen])
        differs_from_first |= not torch.equal(frames, pairs.frames1[: len(frames)])
    assert differs_from_first


def extra_gradient(loss_fn, x, params) -> torch.Tensor:
    """The gradient of what a loss adds to the cross-entropy (its value minus the mean BCE) in `params`."""
    loss, _ = loss_fn(x)
    grads = torch.autograd.grad(loss - x.bce.mean(), params, retain_graph=True, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for g, p in zip(grads, params)])


def test_policy_side_terms_scale_with_the_members_share():
    """An ensemble member supplies 1/K of the policy's reward, so every term that goes through the policy scales by
    its share, in value and in gradient: SoBiRL's implicit term, A-PARL's mixed term, the penalty's value gap and
    AIHF's demonstration term. Breaks if any of them ignored policy_share (its gradient would not scale)."""
    from dataclasses import replace

    from agents import penalty
    from agents.pipeline.losses import LossInputs
    from agents.sobirl import SoBiRLLoss
    from tests.test_aihf import LinearReward, fixed_loss
    from tests.test_aihf import loss_inputs as aihf_inputs
    from tests.test_parl import loss_inputs, make_parl_loss, tabular_case
    from tests.test_penalty import case as penalty_case
    from tests.test_penalty import inputs as penalty_inputs

    q_table, actor, reward, replay_states, pairs = tabular_case()
    x = loss_inputs(pairs, reward)
    pi = torch.softmax(torch.randn(*x.r1.shape, generator=torch.Generator().manual_seed(0)), -1)
    sobirl_x = LossInputs(pairs, x.r1, x.r2, x.bce, 0.5, 10, pi, pi, reward)
    penalty_model, p_pairs, fragments, _ = penalty_case()
    penalty_loss = penalty.PenaltyLoss(1.0, 0.9)
    penalty_loss.draw = lambda: fragments
    torch.manual_seed(0)
    aihf_model = LinearReward()
    cases = {
        "sobirl": (SoBiRLLoss(hyper_start=0), sobirl_x, [reward.table]),
        "parl": (make_parl_loss(q_table, actor, replay_states), x, [reward.table]),
        "penalty": (penalty_loss, penalty_inputs(penalty_model, p_pairs), [penalty_model.table]),
        "aihf": (fixed_loss(4, 0.7, 0.9), aihf_inputs(aihf_model, constant_pairs=True), list(aihf_model.parameters())),
    }
    for name, (loss_fn, inputs, params) in cases.items():
        full = extra_gradient(loss_fn, replace(inputs, policy_share=1.0), params)
        third = extra_gradient(loss_fn, replace(inputs, policy_share=1 / 3), params)
        assert full.abs().max() > 1e-6, name
        torch.testing.assert_close(third, full / 3, rtol=1e-9, atol=1e-12, msg=name)


def test_resume_refuses_a_selection_flag_the_checkpoint_predates(tmp_path, capsys):
    """A checkpoint written before --ensemble existed ran with one model: resuming it with --ensemble 3 is refused."""
    from agents.infra.checkpoint import load_checkpoint, resolve_checkpoint, save_atomic

    result = run_script("agents/drlhf.py", *TINY, "--runs-dir", str(tmp_path), "--total-timesteps", "60")
    assert result.returncode == 0, result.stderr[-3000:]
    path = resolve_checkpoint(only_run_dir(tmp_path))
    state = load_checkpoint(path)
    for name in ("ensemble", "query_selection", "candidate_factor"):
        del state["args"][name]
    save_atomic(state, path)
    line = cli_error(drlhf.main, ["--resume", str(path), "--ensemble", "3"], capsys)
    assert "--ensemble 3" in line and "differs" in line


@pytest.mark.parametrize(
    "flags,words",
    [
        (["--query-selection", "disagreement"], ["--query-selection", "--ensemble 2"]),
        (["--ensemble", "0"], ["--ensemble"]),
        (["--candidate-factor", "5"], ["--candidate-factor", "uniform"]),
        (["--query-selection", "entropy", "--candidate-factor", "0"], ["--candidate-factor"]),
        (["--query-selection", "mostly"], ["--query-selection"]),
    ],
)
def test_bad_selection_flags_are_one_line(flags, words, tmp_path, capsys):
    line = cli_error(drlhf.main, [*flags, "--runs-dir", str(tmp_path)], capsys)
    assert all(word in line for word in words), line
    assert not any(tmp_path.iterdir())
