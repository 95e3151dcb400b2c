"""The one-call GPU measurement of issue 33 (`python sobirl/bench.py --gpu-report`), prepared on CPU before a GPU was at
hand: every figure it prints on CUDA is still to be measured.

In one call (at most about 8 minutes on a GPU machine; `--dry-run` is seconds on CPU, on MinAtar with tiny sizes):

1. a machine header: torch, CUDA, the device, the CPU, the commit;
2. env agent-steps/s with N = 1, 4, 8 envs (random actions);
3. one SAC update with the learned reward (batch 64): eager (today's `_update`), graph-ready (the same code CUDA
   captures, run eagerly) and, on CUDA, graphed (replays of the captured update), with graphed against eager after
   20 updates as a check, the profiler's summed kernel time per update, and the update-only bound 4 / t;
4. the real loop's learning-phase env steps/s (SAC on the learned reward, reward phases not included) for DRLHF and
   SoBiRL at 1 and 4 envs, default path and --graph-ready (synchronous order), and at 4 envs --graph-ready with the
   overlapped order (--async-envs on: the emulators step while the updates run; Atari only, n/a in the MinAtar dry
   run);
5. host syncs per vector step in the learning phase (`torch.cuda.set_sync_debug_mode("warn")`, counted);
6. the projected minutes of the paper's 4.3M-step run from those figures.

Each section catches its own failure and prints it, so one broken section does not lose the others; a section that
would start after the time budget is skipped and says so.
"""

from __future__ import annotations

import os
import platform
import subprocess
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
PAPER_STEPS = 4_300_000
PAPER_RANDOM_STEPS = 20_000
# The 4.3M run's reward phases: an estimate (about 430 outer iterations of one reward epoch, at the 8.6 ms
# reward update measured on an H200, docs/performance.md), not measured by this report.
REWARD_PHASES_MIN = 5.0

FULL = dict(
    env_id="BeamRiderNoFrameskip-v4",
    batch_size=64,
    env_steps=3_000,
    replay_steps=3_000,
    updates=100,
    loop_random=2_000,
    loop_warmup=200,
    loop_steps=2_000,
    sync_vector_steps=200,
    budget_s=450.0,
)
DRY = dict(
    env_id="MinAtar/SpaceInvaders-v1",
    batch_size=16,
    env_steps=200,
    replay_steps=200,
    updates=4,
    loop_random=100,
    loop_warmup=40,
    loop_steps=80,
    sync_vector_steps=10,
    budget_s=120.0,
)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def header(device: torch.device) -> dict:
    import gymnasium

    info = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "none",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "cpu": cpu_name(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gymnasium": gymnasium.__version__,
        "commit": commit(),
    }
    try:
        import ale_py

        info["ale_py"] = ale_py.__version__
    except ImportError:
        info["ale_py"] = "none"
    return info


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_call(fn: Callable[[], object], calls: int, device: torch.device, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / calls


def env_steps_per_second(env_id: str, num_envs: int, steps: int) -> float:
    from wrappers import make_envs

    envs = make_envs(env_id, num_envs, seed=0)
    envs.reset()
    rng = np.random.default_rng(0)
    actions = rng.integers(0, envs.single_action_space.n, size=(max(steps // num_envs, 1), num_envs))
    start = time.perf_counter()
    for row in actions:
        envs.step(row)
    elapsed = time.perf_counter() - start
    envs.close()
    return len(actions) * num_envs / elapsed


def sac_args(sizes: dict, device: torch.device, **changes):
    from agents.lower.sac import Args

    values = dict(
        env_id=sizes["env_id"],
        buffer_size=max(4 * sizes["replay_steps"], 1_000),
        learning_starts=sizes["replay_steps"],
        total_timesteps=10**9,
        progress=False,
        cuda=device.type == "cuda",
        seed=1,
        batch_size=sizes["batch_size"],
    )
    values.update(changes)
    return Args(**values)


def trainer_with_learned_reward(sizes: dict, device: torch.device, graph_ready: bool):
    """A SACTrainer past its random phase, learning from a (random) reward CNN, as DRLHF's and SoBiRL's do."""
    from agents.infra.run import detached_run
    from agents.lower.sac import SACTrainer
    from agents.pipeline.reward_model import RewardCNN
    from agents.pipeline.reward_training import reward_function

    args = sac_args(sizes, device, graph_ready=graph_ready)
    torch.manual_seed(0)
    trainer = SACTrainer(args, device, detached_run(args))
    net = RewardCNN(trainer.obs_shape, trainer.num_actions).to(device).eval()
    trainer.set_reward(reward_function(net))
    trainer.collect(args.learning_starts + 4 * args.num_envs)  # the random phase, then a few updates
    return trainer


def kernel_ms_per_call(fn: Callable[[], object], calls: int, device: torch.device) -> float:
    """The profiler's summed GPU kernel time per call (CUDA only)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    fn()
    synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        synchronize(device)
    total_us = sum(e.time_range.elapsed_us() for e in prof.events() if e.device_type == DeviceType.CUDA)
    return total_us / calls / 1e3


def update_figures(sizes: dict, device: torch.device, out: dict) -> None:
    calls = sizes["updates"]
    eager = trainer_with_learned_reward(sizes, device, graph_ready=False)
    out["update_eager_ms"] = seconds_per_call(eager._update, calls, device) * 1e3
    eager.close()
    ready = trainer_with_learned_reward(sizes, device, graph_ready=True)
    out["update_graph_ready_ms"] = seconds_per_call(lambda: ready.updates_without_sync(1), calls, device) * 1e3
    if device.type == "cuda":
        out["kernel_ms_per_update"] = kernel_ms_per_call(lambda: ready.updates_without_sync(1), calls, device)
        key = id(ready._reward_fn)
        graphed = ready.step_graph
        if not graphed.capture:
            out["update_graphed_ms"] = "capture off"
        else:
            out["update_graphed_ms"] = seconds_per_call(lambda: graphed(1, key), calls, device, warmup=5) * 1e3
            out["graph_replays"] = graphed.replays
    else:
        out["kernel_ms_per_update"] = "n/a on CPU"
        out["update_graphed_ms"] = "n/a on CPU"
    ready.close()
    for name in ("eager", "graph_ready", "graphed"):
        t = out.get(f"update_{name}_ms")
        if isinstance(t, float):
            out[f"bound_4_over_t_{name}"] = 4.0 / (t / 1e3)
    if device.type == "cuda":
        out["graphed_vs_eager_max_abs_diff_20_updates"] = graphed_against_eager(sizes, device, 20)


def graphed_against_eager(sizes: dict, device: torch.device, updates: int) -> float:
    """Two identical graph-ready trainers, one running its updates eagerly and one through the CUDA graph: the largest
    parameter difference after `updates` updates (0 if the graph replays exactly what eager code computes)."""
    a = trainer_with_learned_reward(sizes, device, graph_ready=True)
    b = trainer_with_learned_reward(sizes, device, graph_ready=True)
    key = id(b._reward_fn)
    for _ in range(updates):
        a.updates_without_sync(1)
        b.step_graph(1, key)
    synchronize(device)
    diff = max(
        float((p - q).abs().max())
        for p, q in zip(
            [*a.agent.actor.parameters(), *a.agent.qf1.parameters(), a.agent.log_alpha],
            [*b.agent.actor.parameters(), *b.agent.qf1.parameters(), b.agent.log_alpha],
        )
    )
    a.close()
    b.close()
    return diff


def learner(algo: str, sizes: dict, device: torch.device, num_envs: int, graph_ready: bool, async_envs: str = "off"):
    """A DRLHF or SoBiRL learner (the paper's settings but a small pair buffer and replay), past its random phase."""
    from agents.drlhf import Args as DrlhfArgs
    from agents.infra.run import detached_run
    from agents.lower.sac import SACTrainer
    from agents.pipeline.learner import PreferenceLearner
    from agents.pipeline.losses import BradleyTerryLoss
    from agents.sobirl import Args as SobirlArgs
    from agents.sobirl import make_loss

    base = vars(sac_args(sizes, device))
    base.update(
        num_envs=num_envs,
        learning_starts=sizes["loop_random"],
        buffer_size=max(8 * (sizes["loop_random"] + sizes["loop_warmup"] + sizes["loop_steps"]), 2_000),
        graph_ready=graph_ready,
        async_envs=async_envs,  # explicit: "auto" would overlap --graph-ready on CUDA
        initial_pairs=4,
        pair_buffer=16,
        total_pairs=16,
    )
    args = (DrlhfArgs if algo == "drlhf" else SobirlArgs)(**base)
    args.validate()
    torch.manual_seed(0)
    run = detached_run(args)
    trainer = SACTrainer(args, device, run)
    loss = BradleyTerryLoss() if algo == "drlhf" else make_loss(args, trainer)
    learn = PreferenceLearner(args, trainer, loss, run)
    trainer.collect(args.learning_starts)
    return learn


def loop_sps(
    algo: str, sizes: dict, device: torch.device, num_envs: int, graph_ready: bool, async_envs: str = "off"
) -> float:
    learn = learner(algo, sizes, device, num_envs, graph_ready, async_envs)
    trainer = learn.trainer
    trainer.collect(sizes["loop_warmup"])  # first updates: kernel choice, the CUDA graph's warm-up and capture
    synchronize(device)
    start, step = time.perf_counter(), trainer.global_step
    trainer.collect(sizes["loop_steps"])
    synchronize(device)
    sps = (trainer.global_step - step) / (time.perf_counter() - start)
    learn.close()
    return sps


def syncs_per_vector_step(sizes: dict, device: torch.device, graph_ready: bool) -> float | str:
    if device.type != "cuda":
        return "n/a on CPU"
    learn = learner("sobirl", sizes, device, 4, graph_ready)
    trainer = learn.trainer
    trainer.collect(sizes["loop_warmup"])
    vector_steps = sizes["sync_vector_steps"]
    synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            trainer.collect(vector_steps * trainer.args.num_envs)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    learn.close()
    syncs = sum("synchroniz" in str(w.message).lower() for w in caught)
    return syncs / vector_steps


def projection(out: dict) -> None:
    """Minutes of the 4.3M-step run: the random phase at the 1-env env rate, learning at each measured loop speed,
    plus an estimate of the reward phases (REWARD_PHASES_MIN, not measured here) and no checkpoint time."""
    out["projection_assumes"] = (
        f"{PAPER_RANDOM_STEPS:,} random steps at env_steps_per_s_1, {PAPER_STEPS - PAPER_RANDOM_STEPS:,} learning "
        f"steps at the loop's speed, + {REWARD_PHASES_MIN:g} min of reward phases (an estimate from the "
        "reward-update time measured on an H200, not measured here), no checkpoint time"
    )
    env_sps = out.get("env_steps_per_s_1")
    random_min = PAPER_RANDOM_STEPS / env_sps / 60 if isinstance(env_sps, float) else float("nan")
    for key, sps in list(out.items()):
        if key.startswith("loop_sobirl_") and isinstance(sps, float):
            learning_min = (PAPER_STEPS - PAPER_RANDOM_STEPS) / sps / 60
            out["projected_min_" + key[len("loop_") :]] = random_min + learning_min + REWARD_PHASES_MIN


def gpu_report(device: torch.device, dry_run: bool, emit: Callable[[str, object], None]) -> dict:
    sizes = DRY if dry_run else FULL
    start = time.perf_counter()
    out: dict = {"mode": "dry run" if dry_run else "full", "env_id": sizes["env_id"]}
    for key, value in header(device).items():
        out[key] = value
        emit(key, value)
    emit("mode", f"{out['mode']} on {sizes['env_id']}")

    def section(name: str, body: Callable[[], None]) -> None:
        if time.perf_counter() - start > sizes["budget_s"]:
            out[name] = "skipped: over the time budget"
            emit(name, out[name])
            return
        before = set(out)
        try:
            body()
        except Exception as err:  # one broken section must not lose the others' figures
            out[f"{name}_error"] = f"{type(err).__name__}: {err}"
        for key in [k for k in out if k not in before]:
            emit(key, out[key])

    def envs() -> None:
        for n in (1, 4, 8):
            out[f"env_steps_per_s_{n}"] = env_steps_per_second(sizes["env_id"], n, sizes["env_steps"])

    section("envs", envs)
    section("update", lambda: update_figures(sizes, device, out))

    def loops() -> None:
        # (name, --graph-ready, --async-envs); the overlapped order at 4 envs only, and only where envs have send/recv.
        modes = [("eager", False, "off"), ("graph_ready", True, "off"), ("graph_ready_async", True, "on")]
        for algo in ("drlhf", "sobirl"):
            for n in (1, 4):
                for mode, graph_ready, async_envs in modes:
                    name = f"loop_{algo}_{n}env_{mode}"
                    if async_envs == "on" and n != 4:
                        continue
                    if async_envs == "on" and sizes["env_id"].startswith("MinAtar/"):
                        out[name] = "n/a on MinAtar (no send/recv)"
                    elif time.perf_counter() - start > sizes["budget_s"]:
                        out[name] = "skipped: over the time budget"
                    else:
                        out[name] = loop_sps(algo, sizes, device, n, graph_ready, async_envs)

    section("loop", loops)

    def syncs() -> None:
        for graph_ready in (False, True):
            name = f"host_syncs_per_vector_step_sobirl_4env_{'graph_ready' if graph_ready else 'eager'}"
            out[name] = syncs_per_vector_step(sizes, device, graph_ready)

    section("syncs", syncs)
    section("projection", lambda: projection(out))
    out["report_seconds"] = time.perf_counter() - start
    emit("report_seconds", out["report_seconds"])
    return out
