"""Synthetic teachers: label y = P(fragment 1 preferred) from the fragments' sums of clipped ground-truth rewards."""

from __future__ import annotations

import torch

from agents.losses import LOGIT_CLAMP


def oracle_labels(returns1: torch.Tensor, returns2: torch.Tensor) -> torch.Tensor:
    """The paper's text: the higher return is preferred (y = 1 or 0); equal returns give y = 0.5."""
    return 0.5 * (torch.sign(returns1 - returns2) + 1.0).float()


def bernoulli_labels(
    returns1: torch.Tensor, returns2: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """The authors' code: y ~ Bernoulli(sigmoid(R1 - R2)), a Bradley-Terry-rational teacher at temperature 1."""
    p = torch.sigmoid(torch.clamp(returns1 - returns2, -LOGIT_CLAMP, LOGIT_CLAMP).float())
    if generator is not None and generator.device != p.device:
        return torch.bernoulli(p.cpu(), generator=generator).to(p.device)
    return torch.bernoulli(p, generator=generator)


TEACHERS = ("oracle", "bernoulli")


def label_pairs(
    teacher: str, returns1: torch.Tensor, returns2: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    if teacher == "oracle":
        return oracle_labels(returns1, returns2)
    if teacher == "bernoulli":
        return bernoulli_labels(returns1, returns2, generator)
    raise ValueError(f"unknown teacher {teacher!r}; expected one of {', '.join(TEACHERS)}")
