"""--compile: the compiled SAC and reward-model updates compute what the eager reference computes."""

from __future__ import annotations

import copy

import pytest
import torch

from agents.lower.replay import Batch
from agents.lower.sac import Args, SACDiscrete
from agents.pipeline.reward_model import RewardCNN

pytestmark = pytest.mark.usefixtures("single_thread")

OBS = (4, 10, 10)


def batch(generator: torch.Generator, size: int = 16) -> Batch:
    obs = lambda: torch.randint(0, 256, (size, *OBS), dtype=torch.uint8, generator=generator)
    return Batch(
        obs(),
        torch.randint(0, 3, (size,), generator=generator),
        torch.rand(size, generator=generator),
        obs(),
        (torch.rand(size, generator=generator) < 0.1).float(),
    )


def test_compiled_sac_update_matches_eager():
    torch.manual_seed(0)
    eager = SACDiscrete(OBS, 3, Args(compile=False), torch.device("cpu"))
    compiled = SACDiscrete(OBS, 3, Args(compile=True), torch.device("cpu"))
    compiled.load_state_dict(copy.deepcopy(eager.state_dict()))
    g = torch.Generator().manual_seed(1)
    for _ in range(3):  # three steps: the optimizers' states must evolve alike too
        b = batch(g)
        m_eager, m_compiled = eager.update(b, b.rewards), compiled.update(b, b.rewards)
        for key in m_eager:
            torch.testing.assert_close(m_compiled[key], m_eager[key], rtol=1e-4, atol=1e-5)
    for p_eager, p_compiled in zip(eager.actor.parameters(), compiled.actor.parameters()):
        torch.testing.assert_close(p_compiled, p_eager, rtol=1e-4, atol=1e-5)


def test_compiled_reward_model_matches_stock_and_cpu_kernels():
    torch.manual_seed(2)
    net = RewardCNN(OBS, 3, dropout=0.0).train()
    obs = torch.randint(0, 256, (12, *OBS), dtype=torch.uint8)
    stock = copy.deepcopy(net)
    stock.cpu_kernels = False
    compiled = torch.compile(stock, dynamic=True)

    def out_and_grads(model):
        model.zero_grad()
        out = model(obs)
        out.square().sum().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters()]

    out, grads = out_and_grads(net)  # the CPU kernels
    out_c, grads_c = out_and_grads(compiled)
    torch.testing.assert_close(out_c, out, rtol=1e-4, atol=1e-5)
    for a, b in zip(grads_c, grads):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
