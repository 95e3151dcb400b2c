"""--graph-ready (issue 33): the sync-free act, the graph-ready update against today's, a guard against host syncs
and host-built tensors, and the loop's schedule. Everything runs on CPU: the code CUDA would capture runs eagerly here.

Each test was broken on purpose once and seen to fail; its docstring names the broken variant.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from agents.infra.run import detached_run
from agents.lower.sac import Args, SACDiscrete, SACTrainer, annealed_lr
from agents.pipeline.reward_model import RewardCNN
from agents.pipeline.reward_training import reward_function

pytestmark = pytest.mark.usefixtures("single_thread")

CPU = torch.device("cpu")
ENV = "MinAtar/SpaceInvaders-v1"
OBS_SHAPE, NUM_ACTIONS = (6, 10, 10), 4  # that game's


def tiny_args(**changes) -> Args:
    values = dict(
        env_id=ENV,
        num_envs=2,
        total_timesteps=400,
        learning_starts=40,
        buffer_size=400,
        batch_size=8,
        log_every=3,
        anneal_steps=600,  # the learning rates change materially from step to step
        target_network_frequency=50,
        progress=False,
        cuda=False,
        seed=3,
    )
    values.update(changes)
    return Args(**values)


def make_trainer(args: Args, reward_net: torch.nn.Module | None = None) -> SACTrainer:
    torch.manual_seed(0)  # the networks' initial weights
    trainer = SACTrainer(args, CPU, detached_run(args))
    if reward_net is not None:
        trainer.set_reward(reward_function(reward_net))
    return trainer


def record_logs(trainer: SACTrainer) -> list:
    logged = []
    trainer.run.logger.scalar = lambda tag, value, step: logged.append((tag, value, step))
    return logged


def agent_state(agent: SACDiscrete) -> dict[str, torch.Tensor]:
    """Every parameter, optimizer state tensor (step, exp_avg, exp_avg_sq) and log alpha, by name."""
    out = {"log_alpha": agent.log_alpha.detach()}
    for name in ("actor", "qf1", "qf2", "qf1_target", "qf2_target"):
        out.update({f"{name}.{key}": value for key, value in getattr(agent, name).state_dict().items()})
    for name in ("q_optimizer", "actor_optimizer", "alpha_optimizer"):
        for index, state in getattr(agent, name).state_dict()["state"].items():
            out.update({f"{name}.{index}.{key}": value for key, value in state.items()})
    return out


# ---------------------------------------------------------------------------------------------------------------
# Act


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_act_packed_reproduces_multinomial_draws_on_cpu(seed):
    """The answer to issue 33's question: on CPU, argmax(p / Exp(1)) from the default generator draws exactly what
    torch.multinomial(p, 1) draws from the same generator state (its one-sample path is this algorithm), so
    --graph-ready's act keeps the default path's random stream.

    Broken on purpose: the exponential noise drawn from a separate generator seeded alike (torch.Generator()
    .manual_seed(seed)) instead of the default one -> the actions differed."""
    torch.manual_seed(seed)
    agent = SACDiscrete((4, 10, 10), 6, Args(), CPU)
    obs = torch.randint(0, 256, (257, 4, 10, 10), dtype=torch.uint8)
    torch.manual_seed(100 + seed)
    actions, behaviour = agent.act(obs)
    torch.manual_seed(100 + seed)
    packed = agent.act_packed(obs)
    assert packed.shape == (2, 257) and packed.dtype == torch.float32
    assert torch.equal(packed[0].long(), actions)
    assert torch.equal(packed[1], behaviour)
    assert len(set(actions.tolist())) > 1  # the draws are random, not one argmax
    # And the generator is left in the same state: the next draws agree too.
    assert torch.equal(torch.rand(5), (torch.manual_seed(100 + seed), agent.act(obs), torch.rand(5))[2])


def test_graph_ready_collect_reads_actions_back_once_per_vector_step(monkeypatch):
    """One host copy per vector step in the learning phase: act's packed (2, N) tensor, nothing else in the act path.

    Broken on purpose: `_choose_actions` reading actions and probabilities back separately (two `.cpu()` calls) ->
    the count was 2 per step."""
    trainer = make_trainer(tiny_args(graph_ready=True, total_timesteps=60, learning_starts=40))
    trainer.collect(40)
    calls = []
    original = torch.Tensor.cpu
    monkeypatch.setattr(torch.Tensor, "cpu", lambda self, *a, **k: (calls.append(self.shape), original(self))[1])
    monkeypatch.setattr(trainer, "_update_graph_ready", lambda k: None)  # the act path alone
    trainer.collect(20)
    assert calls == [(2, 2)] * 10


# ---------------------------------------------------------------------------------------------------------------
# (a) The graph-ready update equals today's


def test_graph_ready_update_equals_the_default_update_for_k_1_to_4():
    """Same replay, same sample indices (injected into both samplers), same learned reward: K = 1, 2, 3, 4 graph-ready
    updates leave parameters, targets, Adam's state (step, exp_avg, exp_avg_sq) and log alpha bitwise equal to K
    calls of today's `_update`, with the learning rates annealed between vector steps and a target copy in between;
    the logged metrics (every 3rd update, so some logs fall inside a K-update step) and learned-reward statistics
    are the same values at the same steps.

    Broken on purpose: `set_learning_rates` not filling the learning-rate tensors under --graph-ready -> log alpha
    differed at K = 1 (and, separately, `_batch_rewards_on_device` returning the learned reward unclamped -> the
    parameters differed at K = 1)."""
    torch.manual_seed(7)
    reward_net = RewardCNN(OBS_SHAPE, NUM_ACTIONS).eval()
    with torch.no_grad():
        reward_net.head.bias.add_(1.0)  # some rewards beyond [-1, 1]: the clamp and saturation count matter
    eager = make_trainer(tiny_args(), copy.deepcopy(reward_net))
    ready = make_trainer(tiny_args(graph_ready=True), copy.deepcopy(reward_net))
    assert ready.agent.q_optimizer.param_groups[0]["capturable"]
    for trainer in (eager, ready):
        trainer.collect(40)  # the random phase: the same transitions in both replays
    written = eager.buffer.written  # the slots past it were never written (torch.empty)
    assert torch.equal(eager.buffer.frames[:written], ready.buffer.frames[:written])
    assert int(ready.buffer.written_t) == eager.buffer.written and int(ready.buffer.pos_t) == eager.buffer.pos
    assert agent_state(eager.agent).keys() == agent_state(ready.agent).keys()

    draw = torch.Generator().manual_seed(11)
    indices = [eager.buffer.sample_indices(8, draw) for _ in range(10)]
    queue_eager, queue_ready = list(indices), list(indices)
    eager.buffer.sample_indices = lambda *args: queue_eager.pop(0)
    ready.buffer.sample_indices_on_device = lambda *args: queue_ready.pop(0)
    logs_eager, logs_ready = record_logs(eager), record_logs(ready)

    step = 40
    for k in (1, 2, 3, 4):
        step += 4 * k
        for trainer in (eager, ready):
            trainer.global_step = step
            trainer.agent.set_learning_rates(step)
        for _ in range(k):
            eager._update()
        ready._update_graph_ready(k)
        assert eager.num_updates == ready.num_updates
        state_eager, state_ready = agent_state(eager.agent), agent_state(ready.agent)
        for name, value in state_eager.items():
            assert torch.equal(state_ready[name].to(value.dtype), value), (k, name)
        if k == 2:
            eager.agent.copy_targets()
            ready.agent.copy_targets()
            assert torch.equal(ready.agent.qf1_target.head[0].weight, ready.agent.qf1.head[0].weight)
    assert not queue_eager and not queue_ready
    lr = ready.agent.q_optimizer.param_groups[0]["lr"]
    assert lr is ready.agent.lr_tensors["q"] and float(lr) == annealed_lr(1e-4, step, 600)
    assert [tag for tag, _, _ in logs_eager].count("losses/qf1_loss") == 3  # updates 3, 6, 9
    saturated = [value for tag, value, _ in logs_eager if tag == "reward/sac_reward_saturated"]
    assert len(saturated) == 3 and all(0 < value < 1 for value in saturated)
    assert logs_ready == logs_eager


# ---------------------------------------------------------------------------------------------------------------
# (b) No host syncs, no tensors from host values


FORBIDDEN_OPS = {
    "aten._local_scalar_dense": "a read-back to the host (.item(), float(t), bool(t))",
    "aten.item": "a read-back to the host",
    "aten.nonzero": "an output size known only on the host",
    "aten.masked_select": "an output size known only on the host",
    "aten.unique": "an output size known only on the host",
    "aten._unique": "an output size known only on the host",
    "aten._unique2": "an output size known only on the host",
    "aten.unique_consecutive": "an output size known only on the host",
    "aten.unique_dim": "an output size known only on the host",
    "aten.lift_fresh": "a tensor built from host values (torch.tensor)",
    "aten.lift_fresh_copy": "a tensor built from host values (torch.tensor)",
    "aten.multinomial": "host-side checks of the probabilities (pytorch#108968)",
    "aten.equal": "a read-back to the host",
    "aten.is_nonzero": "a read-back to the host",
}
# Python-level calls that leave the device (invisible to a dispatch mode on CPU, where they need no kernel).
FORBIDDEN_METHODS = {
    torch.Tensor.cpu,
    torch.Tensor.numpy,
    torch.Tensor.tolist,
    torch.Tensor.item,
    torch.Tensor.__bool__,
    torch.Tensor.__float__,
    torch.Tensor.__int__,
    torch.Tensor.__index__,
    torch.tensor,
    torch.as_tensor,
    torch.from_numpy,
}


class HostSync(AssertionError):
    pass


class NoHostSyncDispatch(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.name().split(".")[0].replace("::", ".")  # aten::nonzero.out -> aten.nonzero
        if name in FORBIDDEN_OPS:
            raise HostSync(f"{func}: {FORBIDDEN_OPS[name]}")
        if name in ("aten.index", "aten.index_put", "aten.index_put_", "aten._index_put_impl_") and any(
            index is not None and index.dtype in (torch.bool, torch.uint8) for index in args[1]
        ):
            raise HostSync(f"{func} with a boolean mask: an output size known only on the host")
        if name == "aten.repeat_interleave" and (kwargs or {}).get("output_size") is None:
            raise HostSync(f"{func} without output_size: an output size known only on the host")
        return func(*args, **(kwargs or {}))


class NoHostSyncFunction(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in FORBIDDEN_METHODS:
            raise HostSync(f"{getattr(func, '__name__', func)}: leaves the device or builds a tensor from host values")
        return func(*args, **(kwargs or {}))


class no_host_sync:
    """Raise on any host read-back or host-built tensor inside the block (both modes)."""

    def __enter__(self):
        self.modes = [NoHostSyncFunction(), NoHostSyncDispatch()]
        for mode in self.modes:
            mode.__enter__()

    def __exit__(self, *exc):
        for mode in reversed(self.modes):
            mode.__exit__(*exc)


class Poisoned:
    """Stands for a host number that code captured in a CUDA graph must not read (it would be frozen there)."""

    def __init__(self, name):
        self.name = name

    def _raise(self, *args, **kwargs):
        raise HostSync(f"read the host's {self.name}: a CUDA graph would freeze its value at capture")

    __index__ = __int__ = __float__ = __add__ = __radd__ = __sub__ = __rsub__ = __mod__ = __rmod__ = _raise
    __lt__ = __le__ = __gt__ = __ge__ = __eq__ = __mul__ = __rmul__ = _raise


def test_the_guard_catches_what_it_should():
    x = torch.arange(4.0)
    for bad in (
        lambda: x.sum().item(),
        lambda: float(x[0]),
        lambda: x.nonzero(),
        lambda: x[x > 1],
        lambda: torch.tensor(3.0),
        lambda: x.tolist(),
        lambda: torch.unique(x),
        lambda: torch.repeat_interleave(x, torch.tensor([1, 2, 1, 0])),
        lambda: torch.multinomial(x + 1, 1),
    ):
        with pytest.raises(HostSync), no_host_sync():
            bad()
    with no_host_sync():
        torch.repeat_interleave(x, x.long(), output_size=6)
        torch.full_like(x, 3.0) + 1.0


def test_act_and_graph_ready_updates_never_sync_nor_build_host_tensors():
    """act_packed and `updates_without_sync` under the guard (dispatch ops and Python-level calls), with the replay's
    host `written`/`pos` poisoned; called twice with the state changed in place in between (a replay step written,
    the learning rates annealed, the reward model's output shifted, the targets copied, log alpha moved), and the
    second call shown to have read the new state.

    Broken on purpose, one at a time: (1) `sample_indices_on_device` drawing `torch.randint(0, self.written, ...)`
    -> failed (torch.randint refused the poisoned host `written` with a TypeError); (2) `_batch_rewards_on_device`
    counting with `torch.tensor(float(raw.numel()), device=raw.device)` -> HostSync (torch.tensor); (3)
    `act_packed` using torch.multinomial -> HostSync (aten.multinomial)."""
    torch.manual_seed(5)
    reward_net = RewardCNN(OBS_SHAPE, NUM_ACTIONS).eval()
    trainer = make_trainer(tiny_args(graph_ready=True), reward_net)
    trainer.collect(40)
    trainer.agent.set_learning_rates(44)
    obs = torch.as_tensor(trainer.obs)
    buffer = trainer.buffer

    def guarded(k):
        host = buffer.written, buffer.pos
        buffer.written, buffer.pos = Poisoned("replay size"), Poisoned("replay position")
        try:
            with no_host_sync():
                packed = trainer.agent.act_packed(obs)
                results = trainer.updates_without_sync(k)
        finally:
            buffer.written, buffer.pos = host
        return packed, results

    packed1, results1 = guarded(2)
    mean1 = float(results1[-1][1][0] / results1[-1][1][3])
    # The state changes in place, as the loop changes it between vector steps.
    trainer.buffer.add(trainer.obs, np.zeros(2, np.int64), np.zeros(2), np.zeros(2, bool), np.zeros(2, bool), [0.5] * 2)
    trainer.agent.set_learning_rates(300)
    with torch.no_grad():
        reward_net.head.bias.add_(0.25)
        trainer.agent.log_alpha.add_(0.5)
    trainer.agent.copy_targets()
    alpha_before = float(trainer.agent.log_alpha.detach().exp())
    packed2, results2 = guarded(2)
    assert int(buffer.written_t) == 21 == buffer.written
    assert float(results2[0][0]["losses/alpha"]) == pytest.approx(alpha_before)
    # The sums restart after a logged update (the 3rd, inside the first call): the second call's means are fresh.
    mean2 = float(results2[-1][1][0] / results2[-1][1][3])
    assert mean2 == pytest.approx(mean1 + 0.25, abs=0.1)
    assert float(trainer.agent.actor_optimizer.param_groups[0]["lr"]) == annealed_lr(1e-4, 300, 600)
    assert not torch.equal(packed1, packed2)
    assert int(buffer.invalid_draws) == 0


# ---------------------------------------------------------------------------------------------------------------
# (c) The loop: schedule, target copies and update counts as the default path's


def loop_schedule(args: Args) -> dict[str, list]:
    """Run a trainer through its random phase into learning and record when it updates, what learning rates each
    update saw, and when it copied the targets."""
    trainer = make_trainer(args)
    seen: dict[str, list] = {"updates": [], "copies": []}
    update = trainer.agent.update

    def recorded_update(batch, rewards):
        lrs = [float(o.param_groups[0]["lr"]) for o in (trainer.agent.q_optimizer, trainer.agent.actor_optimizer)]
        seen["updates"].append((trainer.global_step, *lrs))
        return update(batch, rewards)

    copy_targets = trainer.agent.copy_targets
    trainer.agent.update = recorded_update
    trainer.agent.copy_targets = lambda: (seen["copies"].append(trainer.global_step), copy_targets())[1]
    trainer.train()
    seen["num_updates"] = trainer.num_updates
    trainer.close()
    return seen


@pytest.mark.parametrize("num_envs", [1, 2, 8])
def test_graph_ready_loop_keeps_the_schedule(num_envs):
    """A tiny MinAtar run with --graph-ready completes and, at every env step, updates as often (1 per 4 env steps, K
    = N/4 per vector step), with the same annealed learning rates, and copies the targets at the same steps as the
    default path.

    Broken on purpose: `_update_graph_ready` running `self.step_graph(1, ...)` (one update per vector step whatever
    K) -> with 8 envs the update steps differed."""
    args = dict(num_envs=num_envs, total_timesteps=240, learning_starts=40)
    default, ready = loop_schedule(tiny_args(**args)), loop_schedule(tiny_args(graph_ready=True, **args))
    assert ready == default
    assert default["num_updates"] == (240 - 40) // 4
    assert default["copies"] == ([50, 100, 150, 200] if num_envs != 8 else [56, 104, 152, 200])


def test_graph_ready_cli_run_completes(tmp_path):
    from agents import sac_discrete
    from tests.conftest import only_run_dir, scalar_tags

    flags = ["--env-id", ENV, "--total-timesteps", "160", "--learning-starts", "80", "--buffer-size", "400"]
    flags += ["--batch-size", "8", "--num-envs", "4", "--log-every", "4", "--no-progress", "--graph-ready"]
    sac_discrete.main([*flags, "--runs-dir", str(tmp_path)])
    tags = scalar_tags(only_run_dir(tmp_path))
    assert [step for step, _ in tags["losses/qf1_loss"]] == [96, 112, 128, 144, 160]
