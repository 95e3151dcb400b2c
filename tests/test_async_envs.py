"""--async-envs (issue 33, item 3): the overlapped order (`add_step` -> `envs.send` -> the vector step's updates ->
`envs.recv` -> `add_outcome`) against the synchronous one (`envs.step` -> `buffer.add` -> updates), on CPU.

A fake vector env with `send`/`recv` records the order of calls; for 1, 2, 4 and 8 envs both loops leave the same
replay after every vector step, sample from the same sampleable set at every update, update once per 4 env steps,
copy the targets at the same steps and end with the same networks. Each test was broken on purpose once and seen to
fail; its docstring names the broken variant.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch

from agents.infra.run import detached_run
from agents.lower.sac import Args, SACTrainer
from tests.test_graph_ready import agent_state, record_logs
from wrappers.atari import GameStatistics

pytestmark = pytest.mark.usefixtures("single_thread")

CPU = torch.device("cpu")
STACK = 4


class CountingFrames(gym.Env):
    """10x10 frames that encode (env, frame counter); games end by termination or truncation at random."""

    observation_space = gym.spaces.Box(0, 255, (10, 10), np.uint8)
    action_space = gym.spaces.Discrete(3)

    def __init__(self, env_index: int):
        self.env_index = env_index
        self.counter = 0

    def _frame(self):
        self.counter += 1
        frame = np.zeros((10, 10), np.uint8)
        frame[0, 0] = self.counter % 251 + 1
        frame[0, 1] = self.counter // 251 % 251 + 1
        frame[0, 2] = self.env_index + 1
        frame[1:, :] = self.np_random.integers(0, 256, (9, 10), dtype=np.uint8)
        return frame

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return self._frame(), {}

    def step(self, action):
        u = self.np_random.random()
        return self._frame(), float(action) - 1.0, bool(u < 0.06), bool(0.06 <= u < 0.09), {}


class SendRecvEnvs(gym.vector.VectorWrapper):
    """A vector env with ale-py's split step: `send(actions)`, later `recv()`; every call is appended to `calls`."""

    def __init__(self, env: gym.vector.VectorEnv, calls: list):
        super().__init__(env)
        self.calls = calls
        self._actions = None

    def step(self, actions):
        self.calls.append("step")
        return self.env.step(actions)

    def send(self, actions):
        assert self._actions is None, "send twice"
        self.calls.append("send")
        self._actions = np.array(actions, copy=True)

    def recv(self):
        assert self._actions is not None, "recv without send"
        self.calls.append("recv")
        actions, self._actions = self._actions, None
        return self.env.step(actions)


def fake_envs(num_envs: int, seed: int, calls: list | None = None, send_recv: bool = True) -> GameStatistics:
    fns = [
        lambda i=i: gym.wrappers.FrameStackObservation(CountingFrames(i), STACK, padding_type="zero")
        for i in range(num_envs)
    ]
    envs = gym.vector.SyncVectorEnv(fns, autoreset_mode=gym.vector.AutoresetMode.NEXT_STEP)
    if send_recv:
        envs = SendRecvEnvs(envs, [] if calls is None else calls)
    return GameStatistics(envs, seed=seed, frame_stack=STACK)


def fake_args(num_envs: int, **changes) -> Args:
    values = dict(
        env_id="FakeCounting-v0",  # built by fake_envs (SACTrainer._make_envs is patched)
        num_envs=num_envs,
        total_timesteps=240,
        learning_starts=40,
        buffer_size=32 * num_envs,  # 32 slots per env: the ring wraps several times
        batch_size=8,
        log_every=3,
        anneal_steps=600,
        target_network_frequency=48,
        graph_ready=True,
        progress=False,
        cuda=False,
        seed=3,
    )
    values.update(changes)
    return Args(**values)


def fake_trainer(monkeypatch, args: Args, calls: list | None = None) -> SACTrainer:
    monkeypatch.setattr(SACTrainer, "_make_envs", lambda self, seed: fake_envs(self.args.num_envs, seed, calls))
    torch.manual_seed(0)
    return SACTrainer(args, CPU, detached_run(args))


REPLAY = ("frames", "actions", "rewards", "behaviour", "terminated", "first", "real", "sampleable", "_next_first")


def replay_state(trainer: SACTrainer) -> dict:
    buffer = trainer.buffer
    out = {name: getattr(buffer, name)[: buffer.written].clone() for name in REPLAY if name != "_next_first"}
    out["_next_first"] = buffer._next_first.clone()
    out["cursor"] = (buffer.pos, buffer.written, int(buffer.pos_t), int(buffer.written_t))
    return out


def trace_loop(monkeypatch, num_envs: int, async_envs: str) -> dict:
    """Run a fake-env trainer one vector step at a time; record the replay after every vector step, what each update
    could sample, the steps of updates and target copies, the logs and the final networks."""
    trainer = fake_trainer(monkeypatch, fake_args(num_envs, async_envs=async_envs))
    assert trainer.overlapped == (async_envs == "on")
    seen: dict = {"replay": [], "updates": [], "copies": []}
    update = trainer.agent.update

    def recorded_update(batch, rewards):
        buffer = trainer.buffer
        seen["updates"].append(
            (trainer.global_step, buffer.sampleable.clone(), len(buffer), buffer.pos, int(buffer.written_t))
        )
        return update(batch, rewards)

    copy_targets = trainer.agent.copy_targets
    trainer.agent.update = recorded_update
    trainer.agent.copy_targets = lambda: (seen["copies"].append(trainer.global_step), copy_targets())[1]
    logs = record_logs(trainer)
    while trainer.global_step < trainer.args.total_timesteps:
        trainer.collect(num_envs)  # one vector step
        seen["replay"].append(replay_state(trainer))
    seen["logs"] = by_tag(logs)
    seen["state"] = agent_state(trainer.agent)
    seen["num_updates"] = trainer.num_updates
    seen["invalid_draws"] = int(trainer.buffer.invalid_draws)
    trainer.close()
    return seen


def by_tag(logs: list) -> dict[str, list]:
    """Logged scalars as tag -> [(step, value)], timing (charts/SPS) aside: within a vector step the overlapped loop
    logs finished games after the updates' losses, the synchronous loop before them."""
    out: dict[str, list] = {}
    for tag, value, step in logs:
        if tag != "charts/SPS":
            out.setdefault(tag, []).append((step, value))
    return out


def assert_same(a, b, where=""):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


@pytest.mark.parametrize("num_envs", [1, 2, 4, 8])
def test_overlapped_loop_equals_the_synchronous_loop(monkeypatch, num_envs):
    """For N = 1, 2, 4, 8 (graph-ready on both sides; the fake env's games end every ~11 steps; the 32-slot ring
    wraps): the same replay tensors and write head after every vector step, the same sampleable mask, len(buffer) and
    write head at every update, 1 update per 4 env steps at the same steps, target copies at the same steps, the same
    logged metrics and bitwise the same networks, optimizer states and log alpha at the end.

    Broken on purpose: the naive order `send` -> updates -> `recv` -> `buffer.add` (the whole `add` after `recv`, no
    `add_step` before the updates) -> the sampleable set at the first update differed (one transition short)."""
    sync, overlapped = trace_loop(monkeypatch, num_envs, "off"), trace_loop(monkeypatch, num_envs, "on")
    assert len(sync["updates"]) == sync["num_updates"] == (240 - 40) // 4 == overlapped["num_updates"]
    assert [u[0] for u in sync["updates"]] == [u[0] for u in overlapped["updates"]]
    for a, b in zip(sync["updates"], overlapped["updates"]):
        assert_same(a, b, f"update at env step {a[0]}")
    assert len(sync["replay"]) == 240 // num_envs
    for step, (a, b) in enumerate(zip(sync["replay"], overlapped["replay"])):
        assert_same(a, b, f"replay after vector step {step}")
    # 1 update per 4 env steps: by the end of the vector step reaching env step s, s // 4 - 10 updates (the random
    # phase's 40 steps have none).
    steps = [u[0] for u in sync["updates"]]
    for step in set(steps):
        assert sum(s <= step for s in steps) == step // 4 - 40 // 4, step
    expected_copies = sorted({-(-k * 48 // num_envs) * num_envs for k in range(1, 6)})
    assert sync["copies"] == overlapped["copies"] == expected_copies
    assert sync["logs"] == overlapped["logs"]
    assert {"losses/qf1_loss", "charts/episodic_return"} <= sync["logs"].keys()
    assert_same(sync["state"], overlapped["state"], "agent")
    assert sync["invalid_draws"] == overlapped["invalid_draws"] == 0


def call_order(monkeypatch, num_envs: int, async_envs: str) -> list[list[str]]:
    """The env, replay and update calls of each of 4 learning-phase vector steps."""
    calls: list = []
    trainer = fake_trainer(monkeypatch, fake_args(num_envs, async_envs=async_envs, learning_starts=16), calls)
    for name in ("add_step", "add_outcome"):
        method = getattr(trainer.buffer, name)
        setattr(trainer.buffer, name, lambda *args, m=method, n=name: (calls.append(n), m(*args))[1])
    updates = trainer.updates_without_sync
    trainer.updates_without_sync = lambda k: (calls.extend(["update"] * k), updates(k))[1]
    trainer.collect(16)  # the random phase
    steps = []
    for _ in range(4):
        calls.clear()
        trainer.collect(num_envs)
        steps.append(list(calls))
    trainer.close()
    return steps


@pytest.mark.parametrize("num_envs", [2, 8])
def test_overlapped_loop_steps_the_envs_while_it_updates(monkeypatch, num_envs):
    """The order of calls in a learning-phase vector step: `add_step` (the previous transition becomes sampleable),
    `send`, the K = N/4 updates (N = 2: one every other vector step), `recv`, `add_outcome`; the synchronous loop
    (--async-envs off) steps first and updates after `add`.

    Broken on purpose: the updates run after `recv` (`self._learn(previous_step)` moved below `self.envs.recv()`) ->
    the recorded order was add_step, send, recv, update, add_outcome."""
    orders = {mode: call_order(monkeypatch, num_envs, mode) for mode in ("on", "off")}
    k = num_envs // 4
    if num_envs == 2:  # one update every other vector step
        assert orders["on"] == [["add_step", "send", *["update"] * u, "recv", "add_outcome"] for u in (0, 1, 0, 1)]
        assert orders["off"] == [["step", "add_step", "add_outcome", *["update"] * u] for u in (0, 1, 0, 1)]
    else:
        assert orders["on"] == [["add_step", "send", *["update"] * k, "recv", "add_outcome"]] * 4
        assert orders["off"] == [["step", "add_step", "add_outcome", *["update"] * k]] * 4


@pytest.mark.parametrize("send_recv", [True, False])
def test_game_statistics_send_recv_equals_step(send_recv):
    """GameStatistics.send then recv returns what step returns (observations, clipped rewards, flags, whole-game
    scores and lengths, game_over), over games that end by termination and truncation, on an env with send/recv
    (stepping between them) and on one without (the synchronous fallback: recv takes the step); a second send
    before recv is refused.

    Broken on purpose: `recv` returning the wrapped env's result without `_finish_step` (no statistics, raw
    rewards) -> recv's info lacked 'game_over', '_episode' and 'raw_reward'."""
    stepped, split = fake_envs(3, seed=5, send_recv=send_recv), fake_envs(3, seed=5, send_recv=send_recv)
    assert split.steps_in_background == send_recv
    for envs in (stepped, split):
        envs.reset()
    rng = np.random.default_rng(0)
    games = 0
    for _ in range(200):
        actions = rng.integers(0, 3, 3)
        expected = stepped.step(actions)
        split.send(actions)
        got = split.recv()
        for a, b in zip(expected[:4], got[:4]):
            np.testing.assert_array_equal(a, b)
        assert expected[4].keys() == got[4].keys() and "game_over" in got[4]
        np.testing.assert_array_equal(expected[4]["game_over"], got[4]["game_over"])
        if "episode" in expected[4]:
            games += int(expected[4]["_episode"].sum())
            for key in ("r", "l"):
                np.testing.assert_array_equal(expected[4]["episode"][key], got[4]["episode"][key])
    assert games > 10
    split.send(np.zeros(3, np.int64))
    with pytest.raises(RuntimeError, match="send"):
        split.send(np.zeros(3, np.int64))


def test_async_envs_default_and_refusals(monkeypatch, capsys):
    """auto: synchronous on CPU, overlapped with --graph-ready on CUDA on an env with send/recv (the device is
    swapped in after construction: no GPU here), synchronous without --graph-ready and on MinAtar; --async-envs on
    with MinAtar or without --graph-ready is a one-line error with exit status 2.

    Broken on purpose: the MinAtar check removed from Args.validate -> the error came from the trainer ('the
    MinAtar/SpaceInvaders-v1 envs have no send/recv', after building it) and did not say MinAtar has no
    send/recv."""
    from agents import sac_discrete
    from tests.conftest import cli_error

    auto = fake_trainer(monkeypatch, fake_args(2))
    assert auto.args.async_envs == "auto" and auto.overlapped is False  # CPU
    auto.device = torch.device("cuda")
    assert auto._overlapped_order() is True
    auto.agent.graph_ready = False
    assert auto._overlapped_order() is False
    auto.close()
    monkeypatch.undo()
    minatar = SACTrainer(
        Args(env_id="MinAtar/SpaceInvaders-v1", num_envs=2, buffer_size=100, graph_ready=True, cuda=False), CPU
    )
    assert minatar.envs.steps_in_background is False
    minatar.device = torch.device("cuda")
    assert minatar._overlapped_order() is False
    minatar.close()

    base = ["--no-cuda", "--no-progress", "--total-timesteps", "8", "--buffer-size", "100", "--async-envs", "on"]
    error = cli_error(sac_discrete.main, [*base, "--env-id", "MinAtar/SpaceInvaders-v1", "--graph-ready"], capsys)
    assert "--async-envs on" in error and "MinAtar has no send/recv" in error
    error = cli_error(sac_discrete.main, [*base, "--env-id", "BeamRiderNoFrameskip-v4"], capsys)
    assert "--async-envs on needs --graph-ready" in error


def test_real_beamrider_overlapped_and_synchronous_loops_log_the_same(tmp_path):
    """ale-py's AtariVectorEnv has send/recv: 400 env steps of BeamRider with 2 envs and --graph-ready (200 random,
    then 50 updates), overlapped (--async-envs on) and synchronous, log the same scalars (timing aside) and leave
    the same replay.

    Broken on purpose: `_overlapped_step` sending `actions[::-1].copy()` (each env the other's action) -> the logged
    losses differed."""
    seen = {}
    for mode in ("on", "off"):
        args = Args(
            env_id="BeamRiderNoFrameskip-v4",
            num_envs=2,
            total_timesteps=400,
            learning_starts=200,
            buffer_size=2_000,
            batch_size=8,
            log_every=5,
            target_network_frequency=100,
            graph_ready=True,
            async_envs=mode,
            progress=False,
            cuda=False,
            seed=3,
        )
        torch.manual_seed(0)
        trainer = SACTrainer(args, CPU, detached_run(args))
        assert trainer.overlapped == (mode == "on") and trainer.envs.steps_in_background
        logs = record_logs(trainer)
        trainer.train()
        seen[mode] = (by_tag(logs), replay_state(trainer), agent_state(trainer.agent))
        trainer.close()
    assert seen["on"][0] == seen["off"][0]
    assert len(seen["on"][0]["losses/qf1_loss"]) == 10
    assert_same(seen["on"][1], seen["off"][1], "replay")
    assert_same(seen["on"][2], seen["off"][2], "agent")
