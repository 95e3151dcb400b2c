"""AIHF: the demonstration term's gradient and sign, its BatchNorm batch, and end-to-end runs on MinAtar."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from agents import aihf
from agents.aihf import AIHFLoss, discounted_returns
from agents.feedback.pairs import PairBatch, fragment_observations
from agents.pipeline.losses import LossInputs, bradley_terry_bce, fragment_returns
from sobirl import demos as demos_cli
from tests.conftest import cli_error, only_run_dir, run_script, scalar_tags, tiny_preference_flags
from tests.test_demos import actor_checkpoint

BREAKOUT = "MinAtar/Breakout-v1"
OBS, ACTIONS, H = (4, 10, 10), 3, 6


class LinearReward(nn.Module):
    """r(s, .) = W flatten(s) / 255 + b, in float64, counting its forward passes and their batch sizes."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(math.prod(OBS), ACTIONS, dtype=torch.float64)
        self.calls: list[int] = []

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        self.calls.append(obs.shape[0])
        return self.linear(obs.reshape(obs.shape[0], -1).double() / 255.0)


def fragments(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    frames = torch.randint(0, 256, (count, H, *OBS), dtype=torch.uint8, generator=g)  # stack 1: H frames
    return frames, torch.randint(0, ACTIONS, (count, H), generator=g)


def loss_inputs(model: nn.Module, pairs: int = 5, constant_pairs: bool = False) -> LossInputs:
    """A minibatch of pairs; with `constant_pairs` the preference term carries no gradient, so the loss's gradient is
    the demonstration term's alone."""
    (f1, a1), (f2, a2) = fragments(pairs, 1), fragments(pairs, 2)
    labels = torch.tensor([1.0, 0.0, 0.5, 1.0, 0.0])[:pairs]
    nan = torch.full((pairs,), math.nan)
    batch = PairBatch(f1, a1, f2, a2, labels, nan, nan)
    r1 = model(fragment_observations(f1, H)).view(pairs, H, ACTIONS)
    r2 = model(fragment_observations(f2, H)).view(pairs, H, ACTIONS)
    if constant_pairs:
        r1, r2 = r1.detach(), r2.detach()
    bce = bradley_terry_bce(fragment_returns(r1, a1), fragment_returns(r2, a2), labels)
    return LossInputs(batch, r1, r2, bce, alpha=0.3, global_step=0, model=model)


def fixed_loss(batch: int, weight: float, gamma: float) -> AIHFLoss:
    demo, agent = fragments(batch, 3), fragments(batch, 4)
    return AIHFLoss(lambda n, length, g: demo, lambda n, length, g: agent, H, batch, weight, gamma)


def explicit_return(model: nn.Module, frames: torch.Tensor, actions: torch.Tensor, gamma: float) -> torch.Tensor:
    """mean over fragments of sum_t gamma^t r(s_t, a_t), one observation at a time."""
    total = 0.0
    for frame, action in zip(frames, actions):
        for t in range(H):
            total = total + gamma**t * model(frame[t : t + 1])[0, action[t]]
    return total / len(frames)


def parameter_gradient(value: torch.Tensor, model: nn.Module) -> torch.Tensor:
    return torch.cat([g.flatten() for g in torch.autograd.grad(value, list(model.linear.parameters()))])


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_demo_term_gradient_is_w1_times_agent_minus_demo_return_gradients(gamma):
    torch.manual_seed(0)
    model, w1, batch = LinearReward(), 0.7, 4
    loss_fn = fixed_loss(batch, w1, gamma)
    x = loss_inputs(model, constant_pairs=True)
    model.calls.clear()
    loss, metrics = loss_fn(x)
    assert model.calls == [2 * batch * H], "demo and agent fragments share one forward pass (BatchNorm statistics)"
    demo, agent = fragments(batch, 3), fragments(batch, 4)
    demo_return, agent_return = explicit_return(model, *demo, gamma), explicit_return(model, *agent, gamma)
    expected = w1 * (parameter_gradient(agent_return, model) - parameter_gradient(demo_return, model))
    got = parameter_gradient(loss, model)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    assert torch.isclose(metrics["demo_return"], demo_return.detach()) and torch.isclose(
        metrics["agent_return"], agent_return.detach()
    )
    assert torch.isclose(metrics["demo_term"], w1 * (agent_return - demo_return).detach())

    # Central differences of the loss's demonstration term along a random direction agree with its gradient.
    direction = torch.randn_like(expected)
    params = list(model.linear.parameters())
    flat = torch.cat([p.detach().flatten() for p in params])

    def demo_term_at(point: torch.Tensor) -> float:
        with torch.no_grad():
            offset = 0
            for p in params:
                p.copy_(point[offset : offset + p.numel()].view_as(p))
                offset += p.numel()
            return float(loss_fn(loss_inputs(model))[1]["demo_term"])

    eps = 1e-4
    slope = (demo_term_at(flat + eps * direction) - demo_term_at(flat - eps * direction)) / (2 * eps)
    assert slope == pytest.approx(float(expected @ direction), rel=1e-6, abs=1e-9)


def test_preference_term_uses_the_discounted_return_and_is_the_pipelines_bce_without():
    model = LinearReward()
    x = loss_inputs(model)
    loss, metrics = fixed_loss(4, 1.0, 1.0)(x)
    assert torch.equal(metrics["preference_term"], x.bce.mean().detach())
    assert torch.isclose(loss, x.bce.mean() + metrics["demo_term"])
    _, metrics = fixed_loss(4, 1.0, 0.9)(x)
    p = x.pairs
    weights = 0.9 ** torch.arange(H, dtype=torch.float64)
    taken = lambda r, a: (r.gather(-1, a.unsqueeze(-1)).squeeze(-1) * weights).sum(-1)
    expected = bradley_terry_bce(taken(x.r1, p.actions1), taken(x.r2, p.actions2), p.labels).mean()
    assert torch.isclose(metrics["preference_term"], expected.detach())
    assert torch.allclose(discounted_returns(x.r1, p.actions1, 0.9), taken(x.r1, p.actions1))


def test_a_descent_step_raises_demo_returns_over_agent_returns():
    """Minimising the loss ascends the paper's w1 (R(tau^E) - R(tau^A)) (its estimator (19))."""
    model = LinearReward()
    loss_fn = fixed_loss(4, 1.0, 0.99)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    gaps = []
    for _ in range(3):
        loss, metrics = loss_fn(loss_inputs(model, constant_pairs=True))
        gaps.append(float(metrics["demo_return"] - metrics["agent_return"]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert gaps[0] < gaps[1] < gaps[2]


def test_generators_round_trip_through_a_checkpoint_state():
    draws = lambda loss_fn: (
        torch.randint(0, 10**6, (3,), generator=loss_fn.demo_generator).tolist(),
        torch.randint(0, 10**6, (3,), generator=loss_fn.agent_generator).tolist(),
    )
    first = fixed_loss(2, 1.0, 1.0)
    draws(first)
    state = first.state_dict()
    second = fixed_loss(2, 1.0, 1.0)
    second.load_state_dict(state)
    assert draws(first) == draws(second)


# ---------------------------------------------------------------------------------------------------------------
# The script

TINY = tiny_preference_flags(env_id=BREAKOUT, total_timesteps="400")


@pytest.fixture(scope="module")
def demo_file(tmp_path_factory):
    pytest.importorskip("minatar")
    folder = tmp_path_factory.mktemp("aihf_demos")
    actor_checkpoint(folder / "checkpoint.pt", BREAKOUT, max_frames=1000)
    out = folder / "breakout.npz"
    demos_cli.main(["record", "--checkpoint", str(folder / "checkpoint.pt"), "--steps", "300", "--out", str(out)])
    return out


def test_aihf_runs_on_minatar_from_the_entry_point(demo_file, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    result = run_script(
        "sobirl/beamrider.py",
        "--algo",
        "aihf",
        "--demos",
        str(demo_file),
        "--demo-weight",
        "0.5",
        *TINY,
        "--runs-dir",
        str(tmp_path),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = only_run_dir(tmp_path)
    assert run_dir.name.startswith("MinAtar-Breakout-v1__aihf__1__")
    tags = scalar_tags(run_dir)
    assert {"reward/demo_return", "reward/agent_return", "reward/demo_term", "charts/episodic_return"} <= set(tags)
    assert [step for step, _ in tags["reward/demo_return"]] == [41, 141, 241, 341]
    for key in ("demo_return", "agent_return", "demo_term", "preference_term", "loss", "bce", "hyper_term"):
        tags[key] = [value for _, value in tags[f"reward/{key}"]]
    for i in range(4):
        assert tags["demo_term"][i] == pytest.approx(
            0.5 * (tags["agent_return"][i] - tags["demo_return"][i]), rel=1e-4, abs=1e-6
        )
        assert tags["loss"][i] == pytest.approx(tags["preference_term"][i] + tags["demo_term"][i], rel=1e-4, abs=1e-6)
        assert tags["loss"][i] == pytest.approx(tags["bce"][i] + tags["hyper_term"][i], rel=1e-4, abs=1e-6)


@pytest.fixture
def keep_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def aihf_error(argv: list[str], capsys) -> str:
    return cli_error(aihf.main, argv, capsys)


def test_bad_demonstrations_are_one_line_errors(demo_file, tmp_path, capsys, keep_torch_threads):
    runs = ["--runs-dir", str(tmp_path / "runs")]
    assert "--demos" in aihf_error([*TINY, *runs], capsys)
    assert "no such file" in aihf_error([*TINY, *runs, "--demos", str(tmp_path / "none.npz")], capsys)
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(demo_file.read_bytes()[:2000])
    assert "--demos" in aihf_error([*TINY, *runs, "--demos", str(truncated)], capsys)
    line = aihf_error([*TINY, *runs, "--demos", str(demo_file), "--env-id", "MinAtar/Asterix-v1"], capsys)
    assert "--demos" in line and "MinAtar/Asterix-v1" in line and BREAKOUT in line
    line = aihf_error([*TINY, *runs, "--demos", str(demo_file), "--fragment-length", "90"], capsys)
    assert "--fragment-length 90" in line
    assert "--demo-weight" in aihf_error([*TINY, *runs, "--demos", str(demo_file), "--demo-weight", "-1"], capsys)
    assert not (tmp_path / "runs").exists(), "bad input creates no run directory"


@pytest.mark.parametrize("ensemble", [1, 2])
def test_the_learner_hands_the_aihf_loss_each_members_share_of_the_policy(
    demo_file, tmp_path, monkeypatch, keep_torch_threads, ensemble
):
    """Through the real learner (`aihf.main`) with --ensemble K: every call of AIHF's loss gets policy_share 1/K, and
    its demonstration term is 1/K of w1 (R(agent) - R(demo)). Breaks on the variant where the learner hands every
    member a share of 1 (`reward_epoch(..., policy_share=1.0)` in PreferenceLearner.train_reward): with K members
    the policy, which follows their mean reward, would get the demonstration term K times over."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    calls = []
    call = AIHFLoss.__call__

    def recording_call(self, x):
        loss, metrics = call(self, x)
        calls.append((x.policy_share, self.demo_weight, {key: float(value) for key, value in metrics.items()}))
        return loss, metrics

    monkeypatch.setattr(AIHFLoss, "__call__", recording_call)
    flags = [*TINY, "--total-timesteps", "150", "--ensemble", str(ensemble), "--demo-weight", "0.5"]
    aihf.main([*flags, "--demos", str(demo_file), "--runs-dir", str(tmp_path)])
    assert calls and {share for share, _, _ in calls} == {1.0 / ensemble}
    for _, weight, metrics in calls:
        unshared = weight * (metrics["agent_return"] - metrics["demo_return"])
        assert metrics["demo_term"] == pytest.approx(unshared / ensemble, rel=1e-5, abs=1e-7)
