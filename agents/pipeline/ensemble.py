"""Reward-model ensembles and uncertainty-based query selection (DRLHF's and PEBBLE's active queries).

With `--ensemble K` the learner trains K reward models, each epoch on its own bootstrap resample of the pair buffer
(as in Christiano et al. 2017, where each predictor sees |D| pairs drawn from D with replacement), and the policy
learns from their mean. With `--query-selection disagreement|entropy` each outer iteration draws
`--candidate-factor` times more candidate pairs than it will label and sends the teacher the most uncertain ones:

    disagreement  the standard deviation over members of P_k(fragment 1 preferred) = sigma(R1_k - R2_k)
                  (B-Pref's `disagreement_sampling`; needs K >= 2)
    entropy       the members' mean of the binary entropy of P_k (B-Pref's `entropy_sampling`; works with K = 1)

Everything here is a small pure function or module, so each can be tested alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

QUERY_SELECTIONS = ("uniform", "disagreement", "entropy")


class RewardEnsemble(torch.nn.Module):
    """The mean of its members' rewards: (N, *obs_shape) -> (N, A), like each member."""

    def __init__(self, members: Sequence[torch.nn.Module]):
        super().__init__()
        self.members = torch.nn.ModuleList(members)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return torch.stack([member(obs) for member in self.members]).mean(0)


def epoch_order(size: int, bootstrap: bool, generator: torch.Generator | None = None) -> torch.Tensor:
    """The rows one reward epoch visits: a permutation of range(size), or `size` rows drawn with replacement."""
    if bootstrap and size > 0:
        return torch.randint(size, (size,), generator=generator)
    return torch.randperm(size, generator=generator)


def preference_probabilities(returns1: torch.Tensor, returns2: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry P(fragment 1 preferred) per member and pair: (K, N) returns -> (K, N)."""
    return torch.sigmoid(returns1.float() - returns2.float())


def binary_entropy(p: torch.Tensor) -> torch.Tensor:
    """-p log p - (1 - p) log(1 - p) in nats, 0 at p = 0 and p = 1."""
    return -(torch.special.xlogy(p, p) + torch.special.xlogy(1 - p, 1 - p))


def query_uncertainty(probabilities: torch.Tensor, mode: str) -> torch.Tensor:
    """Per-pair uncertainty of (K, N) member probabilities: `disagreement` (std over members, population form) or
    `entropy` (the members' mean binary entropy)."""
    if mode == "disagreement":
        return probabilities.std(0, correction=0)
    if mode == "entropy":
        return binary_entropy(probabilities).mean(0)
    raise ValueError(f"unknown query selection {mode!r}; expected one of {QUERY_SELECTIONS[1:]}")


def most_uncertain(uncertainty: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the `count` most uncertain pairs, most uncertain first (ties: the earlier candidate)."""
    order = torch.sort(uncertainty, descending=True, stable=True).indices
    return order[:count]
