"""A-PARL (Chakraborty et al., "PARL: a unified framework for policy alignment in RLHF", ICLR 2024) with discrete
SAC as the lower level: the reward update follows the implicit-function hyper-gradient, computed with
Hessian-vector products of the actor and a conjugate-gradient solve.

With l a pair's Bradley-Terry cross-entropy and g = grad_theta E[l] its score-function gradient through the actor,

    grad F(phi) = grad_phi E[l]  -  d2J/dphi dtheta (d2J/dtheta2)^-1 g.

`PARLLoss` computes, per reward minibatch: g (`implicit_direction`), v = (-d2J/dtheta2 + lambda I)^-1 g by
`conjugate_gradient` on Hessian-vector products of the SAC actor objective (Q held fixed) on replay states
(`damped_implicit_vector`), and the mixed term along v (`mixed_term`: PARL's eq. (17) on the minibatch's fragments,
`trajectory_mixed_surrogate`, or SoBiRL's one-step truncation); the loss is mean l + mixed.

The corrected A-PARL (issue 34; every part a flag whose default is the computation above): the Gauss-Newton/Fisher
curvature alpha E_s[J_z^T (diag pi - pi pi^T) J_z] in place of -d2J/dtheta2 (`fisher_implicit_vector`: positive
semi-definite, no negative-curvature stops), damping relative to alpha, curvature on the pairs' own states, the
mixed term through clamp(r, -1, 1) as SAC sees the reward, and a cap on the implicit part's norm.

Specification, the departures from the paper (which Hessian is inverted, fragments as truncated trajectories)
and the logged norms: docs/algorithms.md §8.1.

    python agents/parl.py --env-id BeamRiderNoFrameskip-v4
    python sobirl/beamrider.py --algo parl
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from agents.feedback.pairs import pair_observations
from agents.infra.cli import flag, require_non_negative, require_positive, run_cli
from agents.lower import sac
from agents.pipeline.corrections import CorrectionArgs, importance_weights, leave_one_out_baseline, parse_correction
from agents.pipeline.learner import PreferenceArgs, PreferenceLearner, run_preference_rl
from agents.pipeline.losses import LossInputs

ALGO = "parl"

Tensors = list[torch.Tensor]


# ---------------------------------------------------------------------------------------------------------------
# Linear algebra on parameter lists


def flatten(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten(flat: torch.Tensor, like: Sequence[torch.Tensor]) -> Tensors:
    out, start = [], 0
    for t in like:
        out.append(flat[start : start + t.numel()].view_as(t))
        start += t.numel()
    return out


def gradients(output: torch.Tensor, params: Sequence[torch.Tensor], retain_graph: bool = False) -> Tensors:
    """d output / d params, zeros for parameters the output does not depend on."""
    if not output.requires_grad:
        return [torch.zeros_like(p) for p in params]
    grads = torch.autograd.grad(output, params, retain_graph=retain_graph, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]


class CGResult(NamedTuple):
    x: torch.Tensor
    relative_residual: float  # ||b - A x|| / ||b|| (0 when b = 0)
    iterations: int  # matrix-vector products taken
    negative_curvature: bool  # stopped because p^T A p <= 0 (A not positive definite along p)


def conjugate_gradient(
    matvec: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, iterations: int, tol: float = 1e-10
) -> CGResult:
    """Approximately solve A x = b for a symmetric A given as `matvec`, starting from x = 0.

    Stops after `iterations` products, once ||r|| <= tol ||b||, or at the first direction of non-positive curvature
    (then x is the last iterate, 0 if it is the first: a truncated-Newton safeguard for an A that is indefinite
    away from the lower level's optimum)."""
    x = torch.zeros_like(b)
    b_norm = float(torch.linalg.vector_norm(b))
    if b_norm == 0.0:
        return CGResult(x, 0.0, 0, False)
    r = b.clone()
    p = r.clone()
    rs = r @ r
    done = 0
    for done in range(1, iterations + 1):
        Ap = matvec(p)
        curvature = p @ Ap
        if float(curvature) <= 0.0:
            return CGResult(x, float(rs.sqrt()) / b_norm, done, True)
        step = rs / curvature
        x = x + step * p
        r = r - step * Ap
        rs_new = r @ r
        if float(rs_new.sqrt()) <= tol * b_norm:
            rs = rs_new
            break
        p = r + (rs_new / rs) * p
        rs = rs_new
    return CGResult(x, float(rs.sqrt()) / b_norm, done, False)


def fisher_implicit_vector(
    actor: nn.Module,
    named: Sequence[tuple[str, torch.Tensor]],
    states: torch.Tensor,
    alpha: float,
    g: torch.Tensor,
    iterations: int,
    damping: float,
    chunk: int,
) -> CGResult:
    """v with (C + damping I) v = g by CG, C = alpha mean_s J_z(s)^T (diag pi_s - pi_s pi_s^T) J_z(s), the
    Gauss-Newton (Fisher) form of -d2/dtheta2 of the soft actor objective, J_z(s) = d logits(s) / d params.

    Each product is a Jacobian-vector product through the logits (forward mode) and a vector-Jacobian product back
    (reverse mode), `chunk` states at a time; no matrix is formed. C is positive semi-definite for every policy,
    so CG never meets negative curvature (with damping > 0, or g in C's range), and at a per-state soft optimum
    pi = softmax(Q / alpha) it equals -d2J/dtheta2 exactly: the other chain-rule term multiplies dJ/dz = 0."""
    names = [name for name, _ in named]
    primals = tuple(p.detach() for _, p in named)
    pieces = []  # (pi, vjp function) per chunk: the forward pass is taken once, reused by every product
    for start in range(0, len(states), chunk):
        part = states[start : start + chunk]

        def logits(*values: torch.Tensor, part: torch.Tensor = part) -> torch.Tensor:
            return torch.func.functional_call(actor, dict(zip(names, values)), (part,))

        z, pull_back = torch.func.vjp(logits, *primals)
        pieces.append((logits, torch.softmax(z.detach(), dim=-1), pull_back))
    scale = alpha / len(states)

    def matvec(v: torch.Tensor) -> torch.Tensor:
        tangents = tuple(unflatten(v, primals))
        out = [torch.zeros_like(p) for p in primals]
        for logits, pi, pull_back in pieces:
            _, dz = torch.func.jvp(logits, primals, tangents)
            w = pi * dz - pi * (pi * dz).sum(-1, keepdim=True)  # (diag pi - pi pi^T) J_z v
            for acc, grad in zip(out, pull_back(scale * w)):
                acc.add_(grad)
        return flatten(out) + damping * v

    return conjugate_gradient(matvec, g.detach(), iterations)


def damped_implicit_vector(
    objective: torch.Tensor, params: Sequence[torch.Tensor], g: torch.Tensor, iterations: int, damping: float
) -> CGResult:
    """v with (-d2 objective/dparams2 + damping I) v = g, by CG on Hessian-vector products (double backward).

    `objective` is a scalar built from `params` with autograd; g is flat. The sign makes the matrix positive
    semi-definite at a maximiser of the objective (the lower level maximises J)."""
    grad = flatten(
        [
            torch.zeros_like(p) if g is None else g
            for g, p in zip(torch.autograd.grad(objective, params, create_graph=True, allow_unused=True), params)
        ]
    )

    def matvec(v: torch.Tensor) -> torch.Tensor:
        hv = torch.autograd.grad(grad, params, grad_outputs=v, retain_graph=True, allow_unused=True)
        hv = flatten([torch.zeros_like(p) if h is None else h for h, p in zip(hv, params)])
        return damping * v - hv

    return conjugate_gradient(matvec, g.detach(), iterations)


# ---------------------------------------------------------------------------------------------------------------
# The actor's pieces


def soft_actor_objective(actor: nn.Module, states: torch.Tensor, q: torch.Tensor, alpha: float) -> torch.Tensor:
    """J = mean_s sum_a pi(a|s) (Q(s, a) - alpha log pi(a|s)) with Q a constant; a function of the actor alone."""
    log_pi = torch.log_softmax(actor(states), dim=-1)
    return (log_pi.exp() * (q.detach() - alpha * log_pi)).sum(-1).mean()


def score_gradient(
    actor: nn.Module,
    params: Sequence[torch.Tensor],
    obs: torch.Tensor,
    actions: torch.Tensor,
    weights: torch.Tensor,
    chunk: int,
    behaviour: torch.Tensor | None = None,
    ratio_clip: float = 10.0,
) -> Tensors:
    """grad_params sum_j weights_j log pi(actions_j | obs_j), over `chunk` observations at a time; with `behaviour`
    (mu(a_j|s_j) of the policy that acted), each weight also times the clipped ratio pi(a_j|s_j) / mu(a_j|s_j)."""
    total = [torch.zeros_like(p) for p in params]
    for start in range(0, len(obs), chunk):
        part = slice(start, start + chunk)
        log_pi = torch.log_softmax(actor(obs[part]), dim=-1)
        taken = log_pi.gather(-1, actions[part].long().unsqueeze(-1)).squeeze(-1)
        part_weights = weights[part].detach()
        if behaviour is not None:
            part_weights = part_weights * importance_weights(taken.detach().exp(), behaviour[part], ratio_clip)
        for acc, g in zip(total, gradients((part_weights * taken).sum(), params)):
            acc.add_(g)
    return total


def probability_jvp(actor: nn.Module, states: torch.Tensor, tangents: dict[str, torch.Tensor]) -> torch.Tensor:
    """D pi_theta(.|s)[v]: the directional derivative of the action probabilities along the parameter direction
    `tangents` (name -> tensor), (N, A), by forward-mode differentiation."""
    names = list(tangents)
    primals = {name: param.detach() for name, param in actor.named_parameters() if name in tangents}

    def probs(*values: torch.Tensor) -> torch.Tensor:
        return torch.softmax(torch.func.functional_call(actor, dict(zip(names, values)), (states,)), dim=-1)

    _, dpi = torch.func.jvp(probs, tuple(primals[n] for n in names), tuple(tangents[n] for n in names))
    return dpi


def taken_log_probability(actor: nn.Module, names: list[str], obs: torch.Tensor, actions: torch.Tensor):
    """The function params -> log pi(a|s) of the taken actions, (N,), for forward-mode differentiation."""

    def taken(*params: torch.Tensor) -> torch.Tensor:
        logits = torch.func.functional_call(actor, dict(zip(names, params)), (obs,))
        return torch.log_softmax(logits, dim=-1).gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)

    return taken


def log_probability_jvp(
    actor: nn.Module, obs: torch.Tensor, actions: torch.Tensor, tangents: dict[str, torch.Tensor], chunk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log pi(a_j|s_j), D log pi(a_j|s_j)[v]) for every step j, (N,) each, `chunk` observations at a time: the
    taken actions' log-probabilities and their directional derivatives along the parameter direction `tangents`
    (forward mode), both constants."""
    names = [n for n, _ in actor.named_parameters() if n in tangents]
    primals = tuple(p.detach() for n, p in actor.named_parameters() if n in tangents)
    directions = tuple(tangents[n] for n in names)
    values, derivatives = [], []
    for start in range(0, len(obs), chunk):
        part = slice(start, start + chunk)
        value, derivative = torch.func.jvp(
            taken_log_probability(actor, names, obs[part], actions[part]), primals, directions
        )
        values.append(value.detach())
        derivatives.append(derivative.detach())
    return torch.cat(values), torch.cat(derivatives)


def trajectory_mixed_surrogate(
    rewards: torch.Tensor, scores: torch.Tensor, gamma: float, baseline: bool = False
) -> torch.Tensor:
    """PARL's mixed term (its eq. 17) along v as a surrogate in the reward: mean over fragments of
    sum_h gamma^h r_h c_h / sum_h gamma^h, with c_h = sum_{j<=h} scores_j (scores: the constants w_j Dlog pi_j[v]).
    rewards (N, H) r_phi(s_h, a_h) with gradient; `baseline` subtracts from each fragment's c_h the leave-one-out
    mean of the other fragments' (per h)."""
    cumulative = scores.detach().cumsum(-1)
    if baseline:
        cumulative = cumulative - leave_one_out_baseline(cumulative)
    discount = gamma ** torch.arange(rewards.shape[-1], device=rewards.device, dtype=rewards.dtype)
    return (rewards * cumulative.to(rewards.dtype) * discount).sum(-1).mean() / discount.sum()


# ---------------------------------------------------------------------------------------------------------------
# The loss

MIXED_FORMS = ("paper", "one-step")
CURVATURES = ("hessian", "fisher")
CURVATURE_STATES = ("replay", "pairs")
SAC_REWARD_CLAMP = 1.0  # SAC learns from clamp(r, -1, 1) (agents/lower/sac.py)


class PARLLoss:
    """Mean Bradley-Terry cross-entropy plus PARL's implicit (second-order) term once global_step > parl_start.

    actor: the lower level's policy network (obs -> logits); critic: obs -> Q(s, .) (called without gradient);
    sample_states: generator -> a batch of replay observations. The reward model is the one in LossInputs.model.
    """

    policy_probs = None  # the loss evaluates the actor itself, with gradient

    def __init__(
        self,
        actor: nn.Module,
        critic: Callable[[torch.Tensor], torch.Tensor],
        sample_states: Callable[[torch.Generator], torch.Tensor],
        generator: torch.Generator,
        parl_start: int = 100_000,
        cg_iters: int = 10,
        cg_damping: float = 0.1,
        policy_chunk: int = 1600,
        reward_train_mode: bool = False,
        correction: str = "none",
        ratio_clip: float = 10.0,
        mixed: str = "paper",
        gamma: float = 0.99,
        curvature: str = "hessian",
        cg_damping_relative: float = 0.0,
        curvature_states: str = "replay",
        reward_clamp: bool = False,
        max_ratio: float = 0.0,
    ):
        if mixed not in MIXED_FORMS:
            raise ValueError(f"unknown mixed term {mixed!r}; expected one of {', '.join(MIXED_FORMS)}")
        if curvature not in CURVATURES:
            raise ValueError(f"unknown curvature {curvature!r}; expected one of {', '.join(CURVATURES)}")
        if curvature_states not in CURVATURE_STATES:
            raise ValueError(
                f"unknown curvature states {curvature_states!r}; expected one of {', '.join(CURVATURE_STATES)}"
            )
        self.curvature = curvature
        self.cg_damping_relative = cg_damping_relative
        self.curvature_states = curvature_states
        self.reward_clamp = reward_clamp
        self.max_ratio = max_ratio
        self.mixed = mixed
        self.gamma = gamma
        self.actor = actor
        self.critic = critic
        self.sample_states = sample_states
        self.generator = generator
        self.parl_start = parl_start
        self.cg_iters = cg_iters
        self.cg_damping = cg_damping
        self.policy_chunk = policy_chunk
        self.reward_train_mode = reward_train_mode
        self.correction = parse_correction(correction)
        self.ratio_clip = ratio_clip

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"].cpu())

    def needs_policy(self, global_step: int) -> bool:
        return False  # no constant policy probabilities: the actor is evaluated here, with gradient

    def active(self, global_step: int) -> bool:
        return global_step > self.parl_start

    def damping(self, alpha: float) -> float:
        """lambda: --cg-damping-relative times alpha when that is positive, else the absolute --cg-damping."""
        return self.cg_damping_relative * alpha if self.cg_damping_relative > 0 else self.cg_damping

    def implicit_direction(self, x: LossInputs) -> tuple[torch.Tensor, CGResult, torch.Tensor, dict]:
        """(the curvature's states: replay states or the pairs' own, the CG result for v, ||g||, v as tangents:
        parameter name -> tensor)."""
        p = x.pairs
        batch, length = p.actions1.shape
        named = [(name, q) for name, q in self.actor.named_parameters() if q.requires_grad]
        params = [q for _, q in named]
        # 1. g: the score-function gradient of the minibatch's mean cross-entropy (fragment 1s first, then 2s).
        obs = pair_observations(p.frames1, p.frames2, length)
        actions = torch.cat([p.actions1, p.actions2]).reshape(-1)
        losses = x.bce.detach()
        if self.correction.baseline:
            losses = losses - leave_one_out_baseline(losses)
        weights = (losses.repeat(2) / batch).repeat_interleave(length)
        behaviour = torch.cat([p.behaviour1, p.behaviour2]).reshape(-1) if self.correction.ratios else None
        g = flatten(
            score_gradient(self.actor, params, obs, actions, weights, self.policy_chunk, behaviour, self.ratio_clip)
        )
        # 2. v = (C + lambda I)^-1 g, C = -d2J/dtheta2 (hessian) or its Fisher form, on replay or the pairs' states.
        states = obs if self.curvature_states == "pairs" else self.sample_states(self.generator)
        del obs
        damping = self.damping(x.alpha)
        if self.curvature == "fisher":
            cg = fisher_implicit_vector(
                self.actor, named, states, x.alpha, g, self.cg_iters, damping, self.policy_chunk
            )
        else:
            with torch.no_grad():
                q = self.critic(states)
            objective = soft_actor_objective(self.actor, states, q, x.alpha)
            cg = damped_implicit_vector(objective, params, g, self.cg_iters, damping)
            del objective
        tangents = {name: t for (name, _), t in zip(named, unflatten(cg.x, params))}
        return states, cg, torch.linalg.vector_norm(g), tangents

    def mixed_term(self, x: LossInputs, states: torch.Tensor, tangents: dict[str, torch.Tensor]) -> torch.Tensor:
        """3. The mixed term's surrogate along v (its phi-gradient is d2J/dphi dtheta v): --parl-mixed paper on the
        minibatch's fragments, one-step on the curvature's states (replay states, or the pairs' own). Off-policy
        corrections (--implicit-correction) reach the paper form's scores; the one-step form takes the exact
        expectation over actions (D pi[v]) on its states, with no sampled action to correct."""
        if self.mixed == "one-step":
            dpi = probability_jvp(self.actor, states, tangents).detach()
            rewards = self.reward_on(x.model, states)
            return (dpi.to(rewards.dtype) * rewards).sum(-1).mean()
        p = x.pairs
        fragments, length = 2 * p.actions1.shape[0], p.actions1.shape[1]
        obs = pair_observations(p.frames1, p.frames2, length)
        actions = torch.cat([p.actions1, p.actions2]).reshape(-1)
        log_pi, scores = log_probability_jvp(self.actor, obs, actions, tangents, self.policy_chunk)
        if self.correction.ratios:
            behaviour = torch.cat([p.behaviour1, p.behaviour2]).reshape(-1)
            scores = scores * importance_weights(log_pi.exp(), behaviour, self.ratio_clip)
        rewards = self.reward_on(x.model, obs).gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)
        return trajectory_mixed_surrogate(
            rewards.view(fragments, length), scores.view(fragments, length), self.gamma, self.correction.baseline
        )

    def reward_on(self, model: nn.Module, states: torch.Tensor) -> torch.Tensor:
        """r_phi(s, .) with gradient, in the mode the lower level sees it; with --parl-reward-clamp also through
        clamp(r, -1, 1), as SAC sees it (zero gradient where the reward is saturated)."""
        was_training = model.training
        model.train(self.reward_train_mode)
        try:
            rewards = model(states)
        finally:
            model.train(was_training)
        return rewards.clamp(-SAC_REWARD_CLAMP, SAC_REWARD_CLAMP) if self.reward_clamp else rewards

    def __call__(self, x: LossInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if x.model is None:
            raise ValueError("PARL's loss needs the reward model (LossInputs.model)")
        phi = [q for q in x.model.parameters() if q.requires_grad]
        bce = x.bce.mean()
        # retain_graph: callers may still differentiate the cross-entropy (reward_update's diagnostics).
        grads = gradients(bce, phi, retain_graph=True)
        metrics = {"bce_grad_norm": torch.linalg.vector_norm(flatten(grads))}
        mixed = torch.zeros((), dtype=bce.dtype, device=bce.device)
        if self.active(x.global_step):
            states, cg, g_norm, tangents = self.implicit_direction(x)
            mixed = x.policy_share * self.mixed_term(x, states, tangents).to(bce.dtype)
            mixed_grads = gradients(mixed, phi)
            second_order_norm = torch.linalg.vector_norm(flatten(mixed_grads))
            if self.max_ratio > 0:
                # --parl-max-ratio: both gradients are at hand, so the cap scales the implicit part's gradient (and
                # its value) by one constant, ||grad mixed|| <= kappa ||grad mean l||, at no extra backward pass.
                scale = torch.clamp(
                    self.max_ratio * metrics["bce_grad_norm"] / second_order_norm.clamp_min(1e-30), max=1.0
                ).detach()
                mixed_grads = [scale * g for g in mixed_grads]
                mixed = scale * mixed
                metrics["second_order_scale"] = scale
            grads = [a + b for a, b in zip(grads, mixed_grads)]
            metrics.update(
                second_order_norm=second_order_norm,
                cg_residual=torch.tensor(cg.relative_residual),
                cg_iterations=torch.tensor(float(cg.iterations)),
                cg_negative_curvature=torch.tensor(float(cg.negative_curvature)),
                score_grad_norm=g_norm.detach(),
                implicit_vector_norm=torch.linalg.vector_norm(cg.x),
            )
        # Value mean l + mixed, gradient exactly grads: backward through `link` only replays the two gradients.
        link = sum((q * g.detach()).sum() for q, g in zip(phi, grads))
        return bce.detach() + mixed.detach() + (link - link.detach()), metrics


# ---------------------------------------------------------------------------------------------------------------
# The algorithm: DRLHF's pipeline (agents/pipeline/learner.py) with PARL's loss


@dataclass
class Args(CorrectionArgs, PreferenceArgs):
    exp_name: str = flag("parl", "name of this experiment (part of the run name)")
    parl_start: int = flag(
        100_000,
        "the implicit term is on once global_step exceeds this (as SoBiRL's --hyper-start); "
        "the mean cross-entropy alone before",
    )
    cg_iters: int = flag(
        10, "conjugate-gradient iterations (curvature-vector products: Hessian or Fisher) per reward minibatch"
    )
    cg_damping: float = flag(
        0.1,
        "lambda in (-d2J/dtheta2 + lambda I) v = g: regularises the solve where the actor's "
        "Hessian is singular (softmax shifts) or indefinite (away from the optimum); unused when "
        "--cg-damping-relative is positive",
    )
    hvp_batch: int = flag(
        256, "replay states on which J and its curvature-vector products are taken (with --curvature-states replay)"
    )
    parl_mixed: str = flag(
        "paper",
        "the mixed second derivative d2J/dphi dtheta: paper (PARL's eq. 17: discounted reward sums times the "
        "cumulative scores along the minibatch's fragments) or one-step (the SAC actor objective's with Q held "
        "fixed, grad Q ~ grad r: SoBiRL's truncation; the form this file had before)",
        choices=MIXED_FORMS,
    )

    parl_curvature: str = flag(
        "hessian",
        "the matrix the CG solve inverts: hessian (-d2J/dtheta2 of the SAC actor objective by double backward; "
        "indefinite away from the optimum, CG stops at negative curvature) or fisher (its Gauss-Newton form "
        "alpha E_s[J_z^T (diag pi - pi pi^T) J_z] through the actor's logits: positive semi-definite, equal to "
        "the Hessian at a soft optimum)",
        choices=CURVATURES,
    )
    cg_damping_relative: float = flag(
        0.0,
        "when positive, the solve's damping is this times the SAC temperature alpha (lambda = C alpha, relative to "
        "the curvature's scale) in place of the absolute --cg-damping; 0: --cg-damping",
    )
    curvature_states: str = flag(
        "replay",
        "the states of the curvature (and of the one-step mixed term): replay (--hvp-batch replay states) or pairs "
        "(the minibatch's own fragment states, those g and the paper's mixed term are taken on)",
        choices=CURVATURE_STATES,
    )
    parl_reward_clamp: bool = flag(
        False,
        "differentiate the mixed term through clamp(r, -1, 1), the reward SAC learns from (no gradient where SAC "
        "sees a saturated reward); off: the unclamped r_phi",
    )
    parl_max_ratio: float = flag(
        0.0,
        "when positive, cap the norm of the implicit (second-order) part of each minibatch's reward gradient at "
        "this times the cross-entropy's gradient norm; 0: no cap",
    )

    def validate(self) -> None:
        super().validate()
        require_non_negative(self, "parl_start", "cg_damping", "cg_damping_relative", "parl_max_ratio")
        require_positive(self, "cg_iters", "hvp_batch")


def make_loss(args: Args, trainer: sac.SACTrainer) -> PARLLoss:
    agent = trainer.agent

    def critic(obs: torch.Tensor) -> torch.Tensor:
        return torch.min(agent.qf1(obs), agent.qf2(obs))

    def sample_states(generator: torch.Generator) -> torch.Tensor:
        return trainer.buffer.sample(args.hvp_batch, generator).obs

    generator = torch.Generator(device=trainer.device).manual_seed(args.seed + 49979687)
    return PARLLoss(
        agent.actor,
        critic,
        sample_states,
        generator,
        args.parl_start,
        args.cg_iters,
        args.cg_damping,
        args.policy_chunk,
        args.reward_train_mode_in_sac,
        args.implicit_correction,
        args.ratio_clip,
        args.parl_mixed,
        args.gamma,
        args.parl_curvature,
        args.cg_damping_relative,
        args.curvature_states,
        args.parl_reward_clamp,
        args.parl_max_ratio,
    )


def main(argv: Sequence[str] | None = None) -> PreferenceLearner:
    return run_preference_rl(ALGO, Args, argv, make_loss, __doc__)


if __name__ == "__main__":
    run_cli(main)
