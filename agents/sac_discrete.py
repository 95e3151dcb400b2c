"""SAC-discrete on the true (clipped) game reward: the oracle baseline, and the frozen-reward check.

The lower level itself (agent, trainer, losses) is `agents/lower/sac.py`; this file runs it as an algorithm.

    python agents/sac_discrete.py --env-id BeamRiderNoFrameskip-v4 --total-timesteps 4300000
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from agents.infra.cli import flag, run_cli
from agents.infra.run import Run, launch
from agents.lower.sac import ALGO, Args, SACTrainer
from agents.pipeline.reward_model import load_frozen_reward
from agents.pipeline.reward_training import reward_function


@dataclass
class TrueRewardArgs(Args):
    """SAC-discrete as an algorithm of its own (not the lower level of a preference method)."""

    frozen_reward: str = flag(
        "",
        "learn from the final reward model of this preference run (its folder or checkpoint) instead of the game "
        "reward: the frozen-reward check, where a return far below the run's own points at reward hacking",
    )


def build_trainer(args: TrueRewardArgs, device: torch.device, run: Run) -> SACTrainer:
    trainer = SACTrainer(args, device, run)
    if args.frozen_reward:
        try:
            net = load_frozen_reward(args.frozen_reward, args.env_id, trainer.obs_shape, trainer.num_actions, device)
        except BaseException:
            trainer.close()
            raise
        trainer.set_reward(reward_function(net))
    return trainer


def main(argv: Sequence[str] | None = None) -> SACTrainer:
    return launch(ALGO, TrueRewardArgs, argv, __doc__, build_trainer)


if __name__ == "__main__":
    run_cli(main)
