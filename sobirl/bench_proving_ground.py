"""Benchmark the CPU proving ground: end-to-end env steps/s of a preference run on MinAtar, one thread, and what each
part of a step costs. Run in a fresh process (one thread) so nothing else in the benchmark skews it.

    python sobirl/bench_proving_ground.py [--total 30000] [--burn-in 10000] [--compile]

The run is DRLHF at the main benchmark's settings (MinAtar SpaceInvaders, 5k SAC steps per outer
iteration, 100 warm-up pairs x 100 epochs, 1,000 pairs over 20 iterations); the figure is the speed from the end
of the burn-in (random phase, reward warm-up, first learning steps) to the end, reward phases included.
"""

from __future__ import annotations

import argparse
import json
import time

ENV_ID = "MinAtar/SpaceInvaders-v1"
PROVING_GROUND = dict(
    env_id=ENV_ID,
    buffer_size=100_000,
    learning_starts=5_000,
    inner_steps=5_000,
    initial_pairs=100,
    warmup_epochs=100,
    total_pairs=1_000,
    schedule_iterations=20,
    pair_buffer=1_000,
    progress=False,
    cuda=False,
)


def per_call_ms(fn, repeats: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1e3


def part_costs(learner) -> dict:
    """Milliseconds per env step, action, replay write, SAC update and reward epoch, each timed alone."""
    import numpy as np
    import torch

    trainer = learner.trainer
    actions = np.zeros(1, dtype=np.int64)
    obs = torch.as_tensor(trainer.obs)
    batch = trainer.buffer.sample(trainer.args.batch_size, trainer.sample_generator)
    rewards = trainer._batch_rewards(batch)
    from agents.pipeline.reward_training import reward_epoch

    return {
        "env_step_ms": per_call_ms(lambda: trainer.envs.step(actions), 2000),
        "act_ms": per_call_ms(lambda: trainer.agent.act(obs), 2000),
        "replay_add_ms": per_call_ms(
            lambda: trainer.buffer.add(
                trainer.obs, actions, np.zeros(1), np.zeros(1, bool), np.zeros(1, bool), np.ones(1, np.float32)
            ),
            2000,
        ),
        "sac_update_ms": per_call_ms(lambda: trainer.agent.update(batch, rewards), 200),
        "reward_epoch_ms": per_call_ms(
            lambda: reward_epoch(
                learner.trained_models[0],
                learner.optimizers[0],
                learner.pairs,
                learner.args.reward_batch_size,
                learner.loss_fn,
            ),
            3,
        ),
    }


def measure_in_process(total: int, burn_in: int, compile_: bool) -> dict:
    import torch

    from agents.drlhf import Args
    from agents.infra.run import detached_run
    from agents.lower.sac import SACTrainer
    from agents.pipeline.learner import PreferenceLearner
    from agents.pipeline.losses import BradleyTerryLoss

    torch.set_num_threads(1)
    torch.manual_seed(1)
    args = Args(**PROVING_GROUND, total_timesteps=burn_in, compile=compile_)
    run = detached_run(args)
    learner = PreferenceLearner(args, SACTrainer(args, torch.device("cpu"), run), BradleyTerryLoss(), run)
    learner.train()
    args.total_timesteps = total
    start, step = time.perf_counter(), learner.global_step
    learner.train()
    seconds = time.perf_counter() - start
    result = {
        "proving_ground_sps": (learner.global_step - step) / seconds,
        "measured_steps": learner.global_step - step,
        "seconds": seconds,
        "compile": compile_,
        **part_costs(learner),
    }
    learner.close()
    return result


def proving_ground_benchmark(total: int = 30_000, burn_in: int = 10_000, compile_: bool = False) -> dict:
    """The same measurement in a fresh single-thread subprocess."""
    from sobirl.bench_reward import in_fresh_process

    arguments = ["--total", str(total), "--burn-in", str(burn_in)] + (["--compile"] if compile_ else [])
    return in_fresh_process(__file__, arguments, threads=1)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--total", type=int, default=30_000)
    parser.add_argument("--burn-in", type=int, default=10_000)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.child:
        result = measure_in_process(args.total, args.burn_in, args.compile)
    else:
        result = proving_ground_benchmark(args.total, args.burn_in, args.compile)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
