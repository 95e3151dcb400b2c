"""Speed and memory of this machine's pipeline (a benchmark, not a test).

    python sobirl/bench.py            # human-readable
    python sobirl/bench.py --json     # one JSON object
    python sobirl/bench.py --gpu-report [--dry-run]   # issue 33's one-call GPU measurement (sobirl/bench_gpu.py)

Figures: agent steps/s of `make_envs` with 1 and 8 envs (random actions); SAC learning SPS on BeamRider (env steps
per second in the learning phase: acting with the actor, storing, one update of batch 64 per 4 env steps); replay
bytes per stored transition; one SoBiRL reward-model update (64 pairs of 25-step fragments, policy evaluated),
with its peak memory measured in a fresh process; and the CPU proving ground: end-to-end env steps/s of a DRLHF
run on MinAtar SpaceInvaders at the main benchmark's settings, one thread, after a burn-in, with the cost of each part
(sobirl/bench_proving_ground.py, in a fresh process).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from agents.infra.cli import flag, parse_args, require, require_positive, run_cli
from agents.infra.run import limit_cpu_threads, pick_device

ENV_ID = "BeamRiderNoFrameskip-v4"


@dataclass
class BenchArgs:
    json: bool = flag(False, "print one JSON object instead of text")
    cuda: bool = flag(True, "measure on CUDA when available")
    env_steps: int = flag(20_000, "agent steps per environment measurement")
    sac_steps: int = flag(800, "env steps of SAC learning to time (after a warm-up)")
    reward_repeats: int = flag(5, "reward-model updates to time (median)")
    skip_reward: bool = flag(False, "skip the reward-model update measurement")
    skip_proving_ground: bool = flag(False, "skip the MinAtar proving-ground measurement (about 2 minutes)")
    compile: bool = flag(False, "measure the SAC and proving-ground figures with --compile")
    gpu_report: bool = flag(
        False,
        "instead: issue 33's one-call GPU measurement (about 8 minutes at most; sobirl/bench_gpu.py): env steps/s "
        "for 1/4/8 envs, eager vs graph-ready vs graphed update time, kernel time per update, the bound 4/t, "
        "DRLHF's and SoBiRL's learning-phase env steps/s (1 and 4 envs, eager and --graph-ready), host syncs per "
        "vector step and the projected minutes of a 4.3M-step run",
    )
    dry_run: bool = flag(False, "with --gpu-report: tiny sizes on MinAtar (seconds on CPU), to check that it runs")


def env_steps_per_second(num_envs: int, steps: int) -> float:
    from wrappers import make_envs

    envs = make_envs(ENV_ID, num_envs, seed=0)
    envs.reset()
    rng = np.random.default_rng(0)
    actions = rng.integers(0, envs.single_action_space.n, size=(steps // num_envs + 1, num_envs))
    start = time.perf_counter()
    for row in actions:
        envs.step(row)
    elapsed = time.perf_counter() - start
    envs.close()
    return len(actions) * num_envs / elapsed


def sac_learning_sps(device: torch.device, steps: int, compile_: bool = False) -> float:
    from agents.lower.sac import Args, SACTrainer

    warmup = 1_000
    args = Args(
        buffer_size=20_000,
        learning_starts=warmup,
        total_timesteps=warmup + 2 * steps,
        progress=False,
        cuda=device.type == "cuda",
        compile=compile_,
    )
    trainer = SACTrainer(args, device)
    trainer.collect(warmup + 100)  # random phase, then the first updates (allocations, kernel selection)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    trainer.collect(steps)
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    trainer.close()
    return steps / elapsed


def replay_bytes_per_transition() -> float:
    from agents.lower.replay import FrameReplayBuffer

    return FrameReplayBuffer(10_000, 1, (4, 84, 84), 4, "cpu").bytes_per_transition


def measure(args: BenchArgs) -> dict:
    limit_cpu_threads()
    device = pick_device(args.cuda)
    results: dict = {"device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device)}
    results["env_steps_per_s_1env"] = round(env_steps_per_second(1, args.env_steps), 1)
    results["env_steps_per_s_8envs"] = round(env_steps_per_second(8, args.env_steps), 1)
    results["sac_learning_sps"] = round(sac_learning_sps(device, args.sac_steps, args.compile), 1)
    results["replay_bytes_per_transition"] = round(replay_bytes_per_transition(), 1)
    if not args.skip_reward:
        from sobirl.bench_reward import reward_update_benchmark

        threads = torch.get_num_threads()
        reward = reward_update_benchmark(device=device.type, threads=threads, repeats=args.reward_repeats)
        results["reward_update_s"] = round(reward["reward_update_s"], 4)
        results["reward_update_peak_mb"] = round(reward["reward_update_peak_mb"], 1)
    if not args.skip_proving_ground and device.type == "cpu":
        from sobirl.bench_proving_ground import proving_ground_benchmark

        ground = proving_ground_benchmark(compile_=args.compile)
        results["proving_ground_sps"] = round(ground["proving_ground_sps"], 1)
        for part in ("env_step_ms", "act_ms", "replay_add_ms", "sac_update_ms", "reward_epoch_ms"):
            results[f"proving_ground_{part}"] = round(ground[part], 3)
    results["compile"] = args.compile
    results["torch_threads"] = torch.get_num_threads()
    return results


def format_value(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)


def gpu_report(args: BenchArgs) -> dict:
    from sobirl.bench_gpu import gpu_report as report

    limit_cpu_threads()
    device = pick_device(args.cuda)
    emit = (lambda key, value: None) if args.json else lambda key, value: print(f"{key:<52} {format_value(value)}")
    results = report(device, args.dry_run, emit)
    if args.json:
        print(json.dumps(results))
    return results


def print_results(results: dict, as_json: bool) -> None:
    """A benchmark's figures: one JSON object, or one aligned `name  value` line each."""
    if as_json:
        print(json.dumps(results))
    else:
        width = max(map(len, results))
        for key, value in results.items():
            print(f"{key:<{width}}  {value}")


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(BenchArgs, argv, __doc__)
    require_positive(args, "env_steps", "sac_steps", "reward_repeats")
    require(not args.dry_run or args.gpu_report, "--dry-run applies to --gpu-report only")
    if args.gpu_report:
        return gpu_report(args)
    results = measure(args)
    print_results(results, args.json)
    return results


if __name__ == "__main__":
    run_cli(main)
