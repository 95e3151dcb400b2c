"""DRLHF (Christiano et al. 2017) as the SoBiRL paper's baseline: preference-based reward learning with SAC-discrete.

The pipeline is SoBiRL's in every respect (reward CNN, synthetic teacher, query schedule, SAC on the learned reward)
except the reward loss, which is the Bradley-Terry cross-entropy alone: the reward model fits the preferences
without regard to how it shapes the policy, and the policy is never evaluated for it.

    python agents/drlhf.py --env-id BeamRiderNoFrameskip-v4
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from agents.infra.cli import flag, run_cli
from agents.pipeline.learner import PreferenceArgs, PreferenceLearner, run_preference_rl
from agents.pipeline.losses import BradleyTerryLoss

ALGO = "drlhf"


@dataclass
class Args(PreferenceArgs):
    exp_name: str = flag("drlhf", "name of this experiment (part of the run name)")


def main(argv: Sequence[str] | None = None) -> PreferenceLearner:
    return run_preference_rl(ALGO, Args, argv, lambda args, trainer: BradleyTerryLoss(), __doc__)


if __name__ == "__main__":
    run_cli(main)
