"""Penalty methods (agents/penalty.py): the reward loss's gradient pieces on fixed fragments, agent B's penalised
actor loss, and tiny two-agent MinAtar runs with resume and bad flags."""

from __future__ import annotations

import signal

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from agents import penalty
from agents.feedback.pairs import PairBatch, pair_observations, split_pairs
from agents.infra.run import StopTraining, detached_run
from agents.pipeline.losses import LossInputs, bradley_terry_bce, fragment_returns
from tests.conftest import SHORT_PHASES, cli_error, only_run_dir, run_script, scalar_tags, tiny_preference_flags
from tests.conftest import TableModule as Table

pytestmark = pytest.mark.usefixtures("single_thread")
DTYPE = torch.float64
S, A, B, H, GAMMA = 5, 3, 4, 3, 0.9


def onehot(states: torch.Tensor) -> torch.Tensor:
    return F.one_hot(states, S).to(torch.uint8)


def case(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    model = Table(torch.randn(S, A, generator=g, dtype=DTYPE))
    s1, s2 = (torch.randint(0, S, (B, H), generator=g) for _ in range(2))
    a1, a2 = (torch.randint(0, A, (B, H), generator=g) for _ in range(2))
    pairs = PairBatch(onehot(s1), a1, onehot(s2), a2, torch.rand(B, generator=g), torch.zeros(B), torch.zeros(B))
    states_a, states_b = torch.randint(0, S, (6, H), generator=g), torch.randint(0, S, (2, H), generator=g)
    actions_a, actions_b = torch.randint(0, A, (6, H), generator=g), torch.randint(0, A, (2, H), generator=g)
    fragments = penalty.ValueFragments(
        onehot(states_a).reshape(-1, S), actions_a, onehot(states_b).reshape(-1, S), actions_b
    )
    return model, pairs, fragments, (states_a, actions_a, states_b, actions_b)


def inputs(model: nn.Module, pairs: PairBatch) -> LossInputs:
    r1, r2 = split_pairs(model(pair_observations(pairs.frames1, pairs.frames2, H)), B, H)
    bce = bradley_terry_bce(
        fragment_returns(r1, pairs.actions1), fragment_returns(r2, pairs.actions2), pairs.labels.to(DTYPE)
    )
    return LossInputs(pairs, r1, r2, bce, 0.5, 1000, model=model)


def discounted_visits(states: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """mean over fragments of sum_t gamma^t 1[(s_t, a_t) = (s, a)], (S, A): the gradient of J-hat in phi."""
    visits = torch.zeros(S, A, dtype=DTYPE)
    for n in range(states.shape[0]):
        for t in range(H):
            visits[states[n, t], actions[n, t]] += GAMMA**t
    return visits / states.shape[0]


@pytest.mark.parametrize("sigma", [1.0, 0.25])
def test_reward_loss_gradient_is_cross_entropy_plus_value_gap_over_sigma(sigma):
    model, pairs, fragments, (sa, aa, sb, ab) = case()
    loss_fn = penalty.PenaltyLoss(sigma, GAMMA)
    x = inputs(model, pairs)
    (bce_grad,) = torch.autograd.grad(x.bce.mean(), model.table, retain_graph=True)
    # without fragments (penalty off): the mean cross-entropy
    loss, metrics = loss_fn(x)
    assert set(metrics) == {"upper_loss"}
    (grad,) = torch.autograd.grad(loss, model.table, retain_graph=True)
    torch.testing.assert_close(grad, bce_grad)
    # with fragments: + (1/sigma)(mean_A c_H sum_t gamma^t grad r - mean_B c_H sum_t gamma^t grad r)
    loss_fn.draw = lambda: fragments
    loss, metrics = loss_fn(x)
    (grad,) = torch.autograd.grad(loss, model.table)
    units = 1.0 / ((1 - GAMMA) * sum(GAMMA**t for t in range(H)))
    expected_gap = units * (discounted_visits(sa, aa) - discounted_visits(sb, ab)) / sigma
    torch.testing.assert_close(grad, bce_grad + expected_gap)
    table = model.table.detach()
    value = lambda s, a: units * (table[s, a] * GAMMA ** torch.arange(H)).sum(-1).mean()
    torch.testing.assert_close(metrics["value_a"], value(sa, aa))
    torch.testing.assert_close(metrics["value_b"], value(sb, ab))
    torch.testing.assert_close(loss.detach(), x.bce.mean().detach() + (value(sa, aa) - value(sb, ab)) / sigma)
    assert loss_fn.reward_train_mode is False and model.training  # the model's mode is restored


def test_plain_likelihood_is_one_minus_the_label_likelihood():
    returns1 = torch.tensor([0.3, -1.0, 2.0, 0.0], dtype=DTYPE, requires_grad=True)
    returns2 = torch.tensor([0.1, 0.5, -1.0, 0.0], dtype=DTYPE)
    labels = torch.tensor([1.0, 0.0, 0.5, 0.8])
    plain = penalty.upper_losses(returns1, returns2, labels, "plain")
    p = torch.sigmoid(returns1.detach() - returns2)
    y = labels.to(DTYPE)
    torch.testing.assert_close(plain.detach(), 1 - (y * p + (1 - y) * (1 - p)))
    (grad,) = torch.autograd.grad(plain.sum(), returns1)
    torch.testing.assert_close(grad, -(2 * y - 1) * p * (1 - p))  # vs BCE's p - y: bounded, saturating
    torch.testing.assert_close(
        penalty.upper_losses(returns1, returns2, labels, "log"), bradley_terry_bce(returns1, returns2, labels)
    )


def test_plain_likelihood_reward_loss_uses_it():
    model, pairs, _, _ = case()
    x = inputs(model, pairs)
    loss, _ = penalty.PenaltyLoss(1.0, GAMMA, "plain")(x)
    returns = fragment_returns(x.r1, pairs.actions1), fragment_returns(x.r2, pairs.actions2)
    torch.testing.assert_close(loss, penalty.upper_losses(*returns, pairs.labels, "plain").mean())


def b_agent_with_pool(surrogate: str):
    args = penalty.Args(
        env_id="MinAtar/Breakout-v1",
        sigma=0.5,
        gamma=0.9,
        penalty_actor_pairs=3,
        cuda=False,
        penalty_surrogate=surrogate,
        penalty_clip=0.2,
    )
    obs_shape, actions = (4, 10, 10), 3
    torch.manual_seed(0)
    agent = penalty.PenalisedSAC(obs_shape, actions, args, torch.device("cpu"))
    g = torch.Generator().manual_seed(1)
    frames = lambda: torch.randint(0, 2, (5, 4, *obs_shape), generator=g, dtype=torch.uint8)  # 5 pairs, H = 4
    acts = lambda: torch.randint(0, actions, (5, 4), generator=g)
    f1, a1, f2, a2 = frames(), acts(), frames(), acts()
    with torch.no_grad():
        old = penalty.taken_log_probs(agent.actor, f1, a1, f2, a2)
    agent.pool = penalty.PreferencePool(f1, a1, f2, a2, torch.rand(5, generator=g) - 0.3, old)
    obs = torch.randint(0, 2, (8, *obs_shape), generator=g, dtype=torch.uint8)
    return agent, obs


def score_by_hand(agent, index) -> torch.Tensor:
    """mean over the drawn pairs of w_i * the sum of log pi over both fragments' steps, written out."""
    pool, total = agent.pool, 0.0
    for i in index.tolist():
        pair = 0.0
        for frames, actions in ((pool.frames1, pool.actions1), (pool.frames2, pool.actions2)):
            _, log_probs = agent.actor.probs(frames[i])
            pair = pair + log_probs.gather(-1, actions[i].unsqueeze(-1)).sum()
        total = total + pool.weights[i] * pair / len(index)
    return total


@pytest.mark.parametrize("surrogate", ["score", "ratio", "clip"])
def test_agent_b_actor_loss_adds_the_scaled_preference_term(surrogate):
    agent, obs = b_agent_with_pool(surrogate)
    assert agent.coefficient == pytest.approx(0.5 * 0.1 / 3)  # sigma (1 - gamma) / A
    alpha = torch.tensor(0.7)
    state = agent.pool_generator.get_state()
    policy_loss, _, metrics = agent.policy_losses(obs, alpha)
    base_loss, _, _ = agent.actor_and_alpha_losses(obs, alpha)
    index = torch.randint(0, 5, (3,), generator=torch.Generator().set_state(state))
    term = metrics["losses/preference_term"]
    torch.testing.assert_close(policy_loss, base_loss + agent.coefficient * term)
    score = score_by_hand(agent, index)
    params = list(agent.actor.parameters())
    # every surrogate has the score form's gradient at the policy that made the pool
    got = torch.autograd.grad(policy_loss - base_loss, params)
    want = torch.autograd.grad(agent.coefficient * score, params)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    if surrogate == "score":
        torch.testing.assert_close(term, score.detach())
    else:
        assert float(metrics["losses/preference_ratio"]) == pytest.approx(1.0)
        torch.testing.assert_close(term, (agent.pool.weights[index] * 8).mean())  # sum over 2 x 4 steps of rho = 1
    agent.pool = None
    policy_loss, _, metrics = agent.policy_losses(obs, alpha)
    torch.testing.assert_close(policy_loss, base_loss)
    assert "losses/preference_term" not in metrics


def test_clipped_surrogate_stops_pushing_past_the_trust_region():
    weights = torch.tensor([1.0, -1.0])  # pair 0 asks for lower probabilities, pair 1 for higher
    old = torch.zeros(2, 2, 1)
    for rho, expected in ((1.1, (1.0, -1.0)), (0.7, (0.0, -1.0)), (1.3, (1.0, 0.0))):
        log_pi = torch.full((2, 2, 1), rho).log().requires_grad_(True)
        term, metrics = penalty.preference_surrogate(log_pi, old, weights, "clip", 0.2)
        (grad,) = torch.autograd.grad(term, log_pi)
        # d(w rho)/d log pi = w rho per step (two steps per pair, mean over 2 pairs); 0 once rho is past 1 -+ 0.2 in
        # the direction w pushes it
        torch.testing.assert_close(grad.sum((0, 2)), torch.tensor(expected) * rho)
        assert float(metrics["losses/preference_clipped"]) == (0.0 if rho == 1.1 else 1.0)
    # unclipped: mean_i w_i sum_t rho_t
    ratio, _ = penalty.preference_surrogate(torch.full((2, 2, 1), 0.5).log(), old, torch.tensor([1.0, 0.5]), "ratio")
    assert float(ratio) == pytest.approx((1.0 * 0.5 * 2 + 0.5 * 0.5 * 2) / 2)


# ---------------------------------------------------------------------------------------------------------------
# End to end on MinAtar: A then B each agent phase, 100 env steps each

MINATAR = tiny_preference_flags(**SHORT_PHASES, value_fragments="8", penalty_pool="8", penalty_actor_pairs="2")


def test_penalty_runs_two_agents_on_minatar_and_resumes(tmp_path, monkeypatch):
    pytest.importorskip("minatar")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    result = run_script(
        "sobirl/beamrider.py", "--algo", "penalty", *MINATAR, "--total-timesteps", "250", "--runs-dir", str(tmp_path)
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = only_run_dir(tmp_path)
    assert run_dir.name.startswith("MinAtar-Breakout-v1__penalty__1__")
    # A's and B's replays and the shared pairs in chunk files of their own beside the checkpoint
    chunk_folders = {p.name for p in (run_dir / "checkpoint.chunks").iterdir()}
    assert chunk_folders == {"sac.replay.rows", "parts.sac_b.replay.rows", "pairs.rows"}
    result = run_script("sobirl/beamrider.py", "--resume", str(run_dir), "--total-timesteps", "400", "--no-progress")
    assert result.returncode == 0, result.stderr[-3000:]
    tags = scalar_tags(run_dir)
    assert {
        "reward/loss",
        "reward/bce",
        "reward/hyper_term",
        "reward/accuracy_train",
        "reward/accuracy_fresh",
        "charts/episodic_return",
        "charts_b/episodic_return",
        "losses/actor_loss",
        "losses_b/actor_loss",
        "losses_b/preference_term",
        "charts/agent_seconds",
        "charts_b/agent_seconds",
    } <= set(tags)
    # Iteration 0: A's 41 random steps; then 50 steps of A, then 50 of B, per phase, with --total-timesteps a cap
    # on both: the first run's last phase gets A 5 and B 4 (to 250), the resumed run's last A 25 and B 25 (to 400).
    assert [step for step, _ in tags["reward/loss"]] == [41, 141, 241, 250, 350]
    assert max(step for step, _ in tags["charts_b/SPS"]) == 400
    # the penalty is on once B has passed its 50 random steps (B at 50 by step 141, 100 by step 241)
    assert [value for _, value in tags["reward/penalty_active"]] == [0.0, 0.0, 1.0, 1.0, 1.0]
    hyper = dict(tags["reward/hyper_term"])
    assert hyper[41] == hyper[141] == 0.0 and all(hyper[step] != 0.0 for step in (241, 250, 350))
    assert [step for step, _ in tags["reward/value_gap"]] == [241, 250, 350]
    for (_, gap), (_, term) in zip(tags["reward/value_gap"], tags["reward/penalty_term"]):
        assert gap == pytest.approx(term)  # sigma = 1


def test_penalty_seed_form_plain_likelihood_half_split(tmp_path, monkeypatch):
    pytest.importorskip("minatar")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    result = run_script(
        "agents/penalty.py",
        *MINATAR,
        "--inner-steps",
        "100",
        "--total-timesteps",
        "350",
        "--penalty-form",
        "seed",
        "--upper-likelihood",
        "plain",
        "--inner-split",
        "half",
        "--sigma",
        "0.5",
        "--penalty-baseline",
        "--runs-dir",
        str(tmp_path),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    tags = scalar_tags(only_run_dir(tmp_path))
    # half: 50 steps of each agent per phase, as with --inner-steps 50 each
    assert [step for step, _ in tags["reward/loss"]] == [41, 141, 241, 341]
    assert max(step for step, _ in tags["charts_b/SPS"]) == 350
    # plain likelihood: the upper loss is no longer the cross-entropy (hyper_term = loss - bce includes the change)
    assert all(
        upper != pytest.approx(bce) for (_, upper), (_, bce) in zip(tags["reward/upper_loss"], tags["reward/bce"])
    )
    assert dict(tags["reward/penalty_active"])[241] == 1.0


# both: A's 41 random steps, then 60 steps of A and 60 of B per phase; the last phase splits the 120 steps left evenly.
# agent-a: A's phases are DRLHF's (60 steps, the last one the 59 left), and B runs as many after each.
RESUME_CASES = {
    "both": ([(41, 0), (101, 60), (161, 120)], (221, 179)),
    "agent-a": ([(41, 0), (101, 60), (161, 120), (221, 180), (281, 240), (341, 300)], (400, 359)),
}


@pytest.mark.parametrize("budget", list(RESUME_CASES))
def test_a_run_stopped_inside_agent_b_phase_resumes_its_plan(monkeypatch, budget):
    """Stopped (SIGTERM) half-way through B's part of an agent phase, a run restored from the state it saved finishes
    that phase's plan and then runs exactly as the uninterrupted run does (with --budget agent-a too)."""
    pytest.importorskip("minatar")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    args = tiny_args(budget=budget)
    expected_phases, expected_end = RESUME_CASES[budget]

    def learner():
        return penalty.build(args, torch.device("cpu"), detached_run(args, penalty.ALGO))

    def trace(run):
        """(A's, B's) step counts at every reward phase."""
        phases = []
        train_reward = run.train_reward
        monkeypatch.setattr(
            run,
            "train_reward",
            lambda: (phases.append((run.trainer_a.global_step, run.trainer_b.global_step)), train_reward()),
        )
        return phases

    whole = learner()
    whole_phases = trace(whole)
    whole.train()
    whole.close()
    assert whole_phases == expected_phases
    assert (whole.trainer_a.global_step, whole.trainer_b.global_step) == expected_end

    stopped = learner()
    phases = trace(stopped)

    def check():
        if stopped.trainer_b.global_step >= 90:  # inside B's second phase (60 -> 120)
            raise StopTraining(signal.SIGTERM)

    monkeypatch.setattr(stopped.run.signals, "check", check)
    with pytest.raises(StopTraining):
        stopped.train()
    state = stopped.state_dict()
    stopped.close()
    assert state["stage"] == "agent" and state["parts"]["sac_b"]["global_step"] == 90
    assert state["parts"]["phases"]["phase_ends"] == [161, 120] and state["sac"]["global_step"] == 161

    resumed = learner()
    resumed.load_state_dict(state)
    resumed_phases = trace(resumed)
    resumed.train()
    resumed.close()
    assert phases + resumed_phases == whole_phases
    assert (resumed.trainer_a.global_step, resumed.trainer_b.global_step) == expected_end


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--sigma", "-1"], ["--sigma", "positive"]),
        (["--sigma", "0"], ["--sigma", "positive"]),
        (["--inner-split", "half", "--inner-steps", "40", "--fragment-length", "25"], ["--fragment-length", "half"]),
        (["--penalty-form", "kwon"], ["--penalty-form"]),
        (["--penalty-actor-pairs", "0"], ["--penalty-actor-pairs"]),
        (["--budget", "agent-a", "--inner-split", "half"], ["--budget agent-a", "--inner-split each"]),
        (["--budget", "agent-b"], ["--budget"]),
    ],
)
def test_penalty_bad_flags_are_one_line_errors(tmp_path, capsys, flags, words):
    line = cli_error(penalty.main, [*flags, "--runs-dir", str(tmp_path)], capsys)
    assert all(word in line for word in words), line
    assert not any(tmp_path.iterdir())


def test_penalty_is_an_algorithm_of_the_beamrider_entry_point(tmp_path, capsys):
    from sobirl import beamrider

    line = cli_error(beamrider.main, ["--algo", "penalty", "--sigma", "-0.5", "--runs-dir", str(tmp_path)], capsys)
    assert "--sigma" in line


def test_sigma_means_one_thing_the_reward_side_and_agent_b_measure_j_in_the_same_units():
    """A one-state MDP (every action loops back), reward r(a), no entropy: J(theta) = E_pi r / (1 - gamma). The
    reward loss's value of H-step fragments, in expectation over pi, must be J itself, and agent B's SAC actor loss
    divided by its coefficient (sigma = 1) must have gradient -grad J: then sigma multiplies one J on both sides.
    Breaks without c_H (the reward side would read about 0.22 J for H = 25, gamma = 0.99)."""
    import itertools

    from agents.lower.sac import actor_loss

    gamma, horizon, actions = 0.99, 3, 2
    theta = torch.tensor([0.3, -0.4], dtype=DTYPE, requires_grad=True)
    r = torch.tensor([1.0, -0.5], dtype=DTYPE)
    pi = torch.softmax(theta, -1)
    J = (pi * r).sum() / (1 - gamma)
    # The reward side, exactly: every action sequence, weighted by its probability under pi.
    sequences = torch.tensor(list(itertools.product(range(actions), repeat=horizon)))
    probability = pi.detach()[sequences].prod(1)
    values = penalty.fragment_values(r.expand(len(sequences), horizon, actions), sequences, gamma)
    torch.testing.assert_close((probability * values).sum(), J.detach())
    # Agent B's side: SAC's actor loss with the exact Q = r + gamma J (held fixed), over its coefficient.
    q = (r + gamma * J.detach()).view(1, actions)
    loss = actor_loss(pi.view(1, actions), torch.log(pi).view(1, actions), q, alpha=0.0)
    coefficient = penalty.actor_penalty_coefficient(1.0, gamma, actions, "return")
    (grad_b,) = torch.autograd.grad(loss / coefficient, theta, retain_graph=True)
    (grad_j,) = torch.autograd.grad(J, theta)
    torch.testing.assert_close(grad_b, -grad_j)


class MeanPixel(nn.Module):
    """r(s, a) = the mean pixel of s, for every action (so fragments of bright frames are worth more)."""

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return obs.float().mean(tuple(range(1, obs.dim())))[:, None].expand(-1, 3).to(DTYPE)


def test_the_value_gap_is_agent_a_minus_agent_b_from_each_agents_own_fragments():
    """Agent A's rollouts are dark, B's bright: J_A < J_B, so the gap and its sign must say so. Breaks if the learner
    fed B's fragments to J_A (or the loss subtracted the other way): the gap's sign would flip."""
    from types import SimpleNamespace

    from agents.lower.replay import Fragments

    def trainer(brightness: int):
        def recent_fragments(count, length, window, generator):
            frames = torch.full((count, length, 2, 4, 4), brightness, dtype=torch.uint8)
            zeros = torch.zeros(count, length)
            return Fragments(frames, torch.zeros(count, length, dtype=torch.long), zeros, zeros, torch.zeros(count))

        return SimpleNamespace(recent_fragments=recent_fragments)

    learner = object.__new__(penalty.PenaltyLearner)
    learner.trainer_a, learner.trainer_b = trainer(10), trainer(200)
    learner.args = SimpleNamespace(value_fragments=3, fragment_length=4, agent_steps=lambda: 100)
    learner.value_generator = torch.Generator()
    loss_fn = penalty.PenaltyLoss(1.0, 0.9)
    loss_fn.draw = learner.value_fragments
    model, pairs, _, _ = case()
    x = inputs(model, pairs)
    _, metrics = loss_fn(LossInputs(pairs, x.r1, x.r2, x.bce, 0.5, 1000, model=MeanPixel()))
    assert float(metrics["value_a"]) == pytest.approx(10 / (1 - 0.9)) and float(metrics["value_b"]) > 1000
    assert float(metrics["value_gap"]) < 0 and float(metrics["value_gap_positive"]) == 0.0


def test_every_reward_minibatch_draws_fresh_value_fragments():
    """One draw per minibatch, not one per reward phase (the reward would otherwise fit that one draw)."""
    from agents.feedback.pairs import PairBuffer
    from agents.pipeline.reward_training import reward_epoch

    model, pairs, fragments, _ = case()
    buffer = PairBuffer(B, H, pairs.frames1.shape[2:], 1, "cpu")
    buffer.add(pairs)
    calls = []
    loss_fn = penalty.PenaltyLoss(1.0, GAMMA)
    loss_fn.draw = lambda: calls.append(1) or fragments
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    stats = reward_epoch(model, optimizer, buffer, batch_size=2, loss_fn=loss_fn, global_step=1000)
    assert len(calls) == stats["steps"] == -(-B // 2)


# ---------------------------------------------------------------------------------------------------------------
# --value-gap-clamp: the value gap on the reward SAC learns from


class Huge(nn.Module):
    """r(s, .) = 1000 * table[s]: a reward net whose outputs are far past SAC's clamp for most (s, a)."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = nn.Parameter(table)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return obs.to(DTYPE) @ self.table


def test_value_gap_clamp_bounds_the_gap_and_has_no_gradient_where_the_reward_is_saturated():
    """With --value-gap-clamp each J is taken of clamp(r, -1, 1), as SAC sees r: |J| <= 1/(1 - gamma), |gap| <=
    2/(1 - gamma), and the gradient is the unclamped one restricted to the unsaturated (s, a). Breaks on the variant
    that ignores the flag (the value gap on the unclamped r_phi): the gap is then 684 against the bound 20, and
    every visited (s, a) has a gradient."""
    _, pairs, fragments, (sa, aa, sb, ab) = case()
    # Rows 0-1 saturated (+-1000 per action), the other rows inside (-1, 1).
    table = torch.tensor([[1000.0, 900.0, 1200.0], [-800.0, -1000.0, -950.0]], dtype=DTYPE)
    table = torch.cat([table, torch.rand(S - 2, A, generator=torch.Generator().manual_seed(3), dtype=DTYPE) - 0.5])
    model = Huge(table)
    bound = 1 / (1 - GAMMA)
    units = 1.0 / ((1 - GAMMA) * sum(GAMMA**t for t in range(H)))
    saturated = table.abs() >= 1
    x = inputs(model, pairs)
    (bce_grad,) = torch.autograd.grad(x.bce.mean(), model.table, retain_graph=True)
    expected_gap_grad = units * (discounted_visits(sa, aa) - discounted_visits(sb, ab))
    assert (expected_gap_grad[saturated] != 0).any() and (expected_gap_grad[~saturated] != 0).any()

    clamped = penalty.PenaltyLoss(1.0, GAMMA, clamp=True)
    clamped.draw = lambda: fragments
    loss, metrics = clamped(x)
    assert abs(float(metrics["value_a"])) <= bound and abs(float(metrics["value_b"])) <= bound
    assert abs(float(metrics["value_gap"])) <= 2 * bound
    value = lambda s, a: units * (table.clamp(-1, 1)[s, a] * GAMMA ** torch.arange(H)).sum(-1).mean()
    torch.testing.assert_close(metrics["value_gap"], value(sa, aa) - value(sb, ab))
    (grad,) = torch.autograd.grad(loss, model.table, retain_graph=True)
    gap_grad = grad - bce_grad
    torch.testing.assert_close(gap_grad[saturated], torch.zeros_like(gap_grad[saturated]))
    torch.testing.assert_close(gap_grad[~saturated], expected_gap_grad[~saturated])

    # The default (today's computation): the unclamped reward, an unbounded gap, gradient everywhere visited.
    unclamped = penalty.PenaltyLoss(1.0, GAMMA)
    unclamped.draw = lambda: fragments
    loss, metrics = unclamped(x)
    assert abs(float(metrics["value_gap"])) > 2 * bound
    (grad,) = torch.autograd.grad(loss, model.table)
    torch.testing.assert_close(grad - bce_grad, expected_gap_grad)


# ---------------------------------------------------------------------------------------------------------------
# Through the real learner: fresh value fragments per minibatch, the ensemble share, --budget agent-a


def tiny_args(**changes) -> penalty.Args:
    """A two-agent run of seconds: A's 41 random steps, then 60-step agent phases; the penalty is on once B has
    passed its 50 random steps (B's first phase)."""
    values = dict(
        env_id="MinAtar/Breakout-v1",
        learning_starts=50,
        buffer_size=1000,
        batch_size=8,
        initial_pairs=4,
        warmup_epochs=1,
        inner_steps=60,
        fragment_length=5,
        pair_buffer=20,
        total_pairs=20,
        schedule_iterations=4,
        reward_batch_size=4,
        fresh_pairs=0,
        value_fragments=4,
        penalty_pool=8,
        penalty_actor_pairs=2,
        total_timesteps=400,
        progress=False,
        cuda=False,
    )
    return penalty.Args(**{**values, **changes})


def tiny_learner(args: penalty.Args) -> penalty.PenaltyLearner:
    args.validate()
    return penalty.build(args, torch.device("cpu"), detached_run(args, penalty.ALGO))


def test_the_learner_draws_fresh_value_fragments_for_every_reward_minibatch(monkeypatch):
    """Through the real PenaltyLearner: in every reward phase with the penalty on, the loss sees as many value-gap
    draws as the phase has minibatches, and no two of them alike. Breaks on the variant that draws once per reward
    phase (`active_value_fragments` caching its first draw for the phase: every minibatch then sees the same
    fragments), which the loss-level test of `reward_epoch` above does not catch: it replaces the learner's draw."""
    pytest.importorskip("minatar")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    learner = tiny_learner(tiny_args(total_timesteps=340, value_gap_clamp=True))
    assert learner.loss_fn.clamp, "--value-gap-clamp reaches the loss"
    phases: list[dict] = []
    values = learner.loss_fn.values

    def recording_values(model, fragments):
        phases[-1]["draws"].append([t.clone() for t in fragments])
        return values(model, fragments)

    train_reward = learner.train_reward

    def recording_train_reward():
        minibatches = -(-len(learner.pairs) // learner.args.reward_batch_size)
        phases.append({"active": learner.penalty_active(), "minibatches": minibatches, "draws": []})
        train_reward()

    monkeypatch.setattr(learner.loss_fn, "values", recording_values)
    monkeypatch.setattr(learner, "train_reward", recording_train_reward)
    learner.train()
    learner.close()
    active = [phase for phase in phases if phase["active"]]
    assert [phase["active"] for phase in phases] == [False, True, True]
    assert all(not phase["draws"] for phase in phases if not phase["active"])
    for phase in active:
        draws = phase["draws"]
        assert phase["minibatches"] >= 2 and len(draws) == phase["minibatches"]
        for i in range(len(draws)):
            for j in range(i):
                assert not all(torch.equal(a, b) for a, b in zip(draws[i], draws[j])), "a value-gap draw reused"


@pytest.mark.parametrize("ensemble", [1, 2])
def test_the_learner_hands_the_penalty_loss_each_members_share_of_the_policy(monkeypatch, ensemble):
    """Through the real PenaltyLearner with --ensemble K: every call of the loss gets policy_share 1/K, and the
    penalty term it adds is 1/K of the member's (J_A - J_B) / sigma. Breaks on the variant where the learner hands
    every member a share of 1 (`reward_epoch(..., policy_share=1.0)` in PreferenceLearner.train_reward): each of
    the K members would then push the policy's mean reward K times too hard along the value gap."""
    pytest.importorskip("minatar")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    shares, terms = [], []
    call = penalty.PenaltyLoss.__call__

    def recording_call(self, x):
        loss, metrics = call(self, x)
        shares.append(x.policy_share)
        if "penalty_term" in metrics:
            terms.append((float(metrics["penalty_term"]), float(metrics["value_gap"]) / self.sigma))
        return loss, metrics

    monkeypatch.setattr(penalty.PenaltyLoss, "__call__", recording_call)
    learner = tiny_learner(tiny_args(total_timesteps=280, ensemble=ensemble, sigma=0.5))
    learner.train()
    learner.close()
    assert shares and set(shares) == {1.0 / ensemble}
    assert terms, "the penalty was on in some reward phase"
    for term, gap_over_sigma in terms:
        assert term == pytest.approx(gap_over_sigma / ensemble, rel=1e-5, abs=1e-7)


def test_budget_agent_a_gives_agent_a_drlhfs_env_steps_and_query_schedule(tmp_path, monkeypatch):
    """--budget agent-a: A's global step at the end, the steps of every reward phase and the pairs queried and stored
    at each are DRLHF's with the same flags; B runs as many steps as A in every agent phase (A's 41 warm-up steps
    fewer in all), A's annealed learning rates are DRLHF's, and every tag is written at A's step (the run's), so no
    tag passes --total-timesteps. Breaks on the variants that count B's steps in the run's step (the run would end
    at 400 steps of A and B together, and the reward phases fall where the default's do: 41, 141, 241, ...) or that
    run B only inside the budget left over."""
    pytest.importorskip("minatar")
    from agents import drlhf

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    flags = [*tiny_preference_flags(**SHORT_PHASES), "--total-timesteps", "400", "--runs-dir", str(tmp_path)]
    extra = ["--value-fragments", "8", "--penalty-pool", "8", "--penalty-actor-pairs", "2", "--budget", "agent-a"]
    ours = penalty.main([*flags, *extra, "--run-name", "penalty"])
    theirs = drlhf.main([*flags, "--run-name", "drlhf"])
    assert ours.trainer_a.global_step == theirs.global_step == ours.global_step == 400
    assert ours.trainer_b.global_step == 400 - 41
    learning_rates = lambda learner: [
        getattr(learner.trainer.agent, name).param_groups[0]["lr"]
        for name in ("q_optimizer", "actor_optimizer", "alpha_optimizer")
    ]
    assert learning_rates(ours) == learning_rates(theirs)
    tags, reference = scalar_tags(tmp_path / "penalty"), scalar_tags(tmp_path / "drlhf")
    steps = lambda tag, of=tags: [step for step, _ in of[tag]]
    assert steps("reward/loss") == steps("reward/loss", reference) == [41, 91, 141, 191, 241, 291, 341, 391]
    for tag in ("reward/pairs_queried", "reward/num_pairs", "reward/iteration", "reward/new_pairs"):
        assert tags[tag] == reference[tag], tag
    assert max(step for points in tags.values() for step, _ in points) == 400
    assert {"charts_b/episodic_return", "losses_b/preference_term"} <= set(tags)
    # --penalty-start counts the run's step, A's: the penalty is on once B has passed its 50 random steps
    assert [value for _, value in tags["reward/penalty_active"]] == [0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
