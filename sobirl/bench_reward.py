"""Benchmark one SoBiRL reward-model update: 64 pairs of 25-step BeamRider-shaped fragments, policy evaluated.

The update is the training code path itself (`agents.pipeline.reward_training.reward_update`): one batched
reward-CNN forward over 64 x 2 x 25 observations, a Nature-CNN actor's probabilities for the implicit term, backward
and an AdamW step. Each measurement runs in a fresh Python process so its peak memory is not inflated by anything
else. Figures and targets: docs/performance.md.

    PYTHONPATH=. python sobirl/bench_reward.py [--device cpu] [--threads 2] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

OBS_SHAPE = (4, 84, 84)
NUM_ACTIONS = 9  # BeamRider
PAIRS = 64
FRAGMENT_LENGTH = 25
# PyTorch reads this once, at its first CPU allocation: it backs large tensors with 2 MB pages, sparing the page
# faults of the many fresh activation buffers an update allocates (a large share of the update's time with 4 KB
# pages: docs/performance.md). The training scripts set it too (agents.pipeline.learner.enable_huge_pages).
THP_VARIABLE = "THP_MEM_ALLOC_ENABLE"


def _stand_in_actor(obs_shape: tuple[int, ...], num_actions: int):
    """Nature-CNN actor with random weights, used only if agents.lower.networks has no Actor."""
    import torch
    from torch import nn

    class Actor(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(
                nn.Conv2d(obs_shape[0], 32, 8, stride=4),
                nn.ReLU(),
                nn.Conv2d(32, 64, 4, stride=2),
                nn.ReLU(),
                nn.Conv2d(64, 64, 3, stride=1),
                nn.ReLU(),
                nn.Flatten(),
                nn.Linear(3136, 512),
                nn.ReLU(),
                nn.Linear(512, num_actions),
            )

        def forward(self, obs: torch.Tensor) -> torch.Tensor:
            return self.net(obs.float() / 255.0)

    return Actor()


def _make_actor(obs_shape: tuple[int, ...], num_actions: int):
    try:
        from agents.lower.networks import Actor
    except ImportError:
        return _stand_in_actor(obs_shape, num_actions)
    return Actor(obs_shape, num_actions)


def measure_in_process(device: str, threads: int, repeats: int) -> dict:
    """Time `repeats` updates after one warm-up update; peak memory of this process (or of the CUDA device)."""
    import resource

    import torch

    from agents.feedback.pairs import PairBatch
    from agents.pipeline.reward_model import RewardCNN
    from agents.pipeline.reward_training import reward_update
    from agents.sobirl import SoBiRLLoss

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    dev = torch.device(device)
    reward_net = RewardCNN(OBS_SHAPE, NUM_ACTIONS).to(dev)
    optimizer = torch.optim.AdamW(reward_net.parameters(), lr=3e-4)
    actor = _make_actor(OBS_SHAPE, NUM_ACTIONS).to(dev).eval()

    def policy_probs(obs: torch.Tensor) -> torch.Tensor:
        return torch.softmax(actor(obs), dim=-1)

    frames = (PAIRS, FRAGMENT_LENGTH + OBS_SHAPE[0] - 1, *OBS_SHAPE[1:])
    pairs = PairBatch(
        frames1=torch.randint(0, 256, frames, dtype=torch.uint8, device=dev),
        actions1=torch.randint(0, NUM_ACTIONS, (PAIRS, FRAGMENT_LENGTH), device=dev),
        frames2=torch.randint(0, 256, frames, dtype=torch.uint8, device=dev),
        actions2=torch.randint(0, NUM_ACTIONS, (PAIRS, FRAGMENT_LENGTH), device=dev),
        labels=torch.randint(0, 2, (PAIRS,), device=dev).float(),
        returns1=torch.zeros(PAIRS, device=dev),
        returns2=torch.ones(PAIRS, device=dev),
    )
    reward_net.train()

    def update() -> float:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        start = time.perf_counter()
        reward_update(
            reward_net, optimizer, pairs, SoBiRLLoss(hyper_start=0), alpha=1.0, global_step=1, policy_probs=policy_probs
        )
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return time.perf_counter() - start

    update()  # one-time costs: kernel selection, allocator growth
    cpu_start = time.process_time()
    seconds = [update() for _ in range(repeats)]
    cpu_seconds = (time.process_time() - cpu_start) / repeats
    if dev.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated(dev) / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    return {
        "reward_update_s": statistics.median(seconds),
        "reward_update_peak_mb": peak_mb,
        "reward_update_min_s": min(seconds),
        "reward_update_cpu_s": cpu_seconds,
        "device": str(dev),
        "threads": threads,
        "repeats": repeats,
    }


def in_fresh_process(script: str, arguments: list[str], threads: int) -> dict:
    """Run `script --child arguments` in a new Python process with `threads` threads; its last stdout line is JSON.

    A fresh process keeps one measurement's peak memory and thread settings from leaking into another's."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")])))
    env["OMP_NUM_THREADS"] = str(threads)
    env.setdefault(THP_VARIABLE, "1")
    command = [sys.executable, os.path.abspath(script), "--child", *arguments]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def reward_update_benchmark(device: str = "cpu", threads: int = 2, repeats: int = 5) -> dict:
    """Median seconds and peak memory (MB) of one SoBiRL reward update, measured in a fresh subprocess."""
    return in_fresh_process(
        __file__, ["--device", device, "--threads", str(threads), "--repeats", str(repeats)], threads
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.child:
        result = measure_in_process(args.device, args.threads, args.repeats)
    else:
        result = reward_update_benchmark(args.device, args.threads, args.repeats)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
