"""Penalty methods for bilevel RLHF with two discrete-SAC agents sharing the reward net: PBRL (Shen, Yang & Chen,
ICML 2024) and the first-order penalty method of Gaur et al. 2024, both after Kwon et al.'s penalty reformulation.

Agent A (`sac.SACTrainer`) is SAC on r_phi, the lower-level best response lambda*; agent B (`AgentBTrainer`,
`PenalisedSAC`) approximates the penalised policy lambda'_sigma = argmax J - sigma l_up. The reward loss
(`PenaltyLoss`) is

    mean_pairs l + (1/sigma) (J_A - J_B),      J_X = c_H * mean over X's fresh fragments of sum_{t<H} gamma^t r_phi

(c_H = `return_units`; with --value-gap-clamp on clamp(r_phi, -1, 1), the reward SAC learns from), and B's actor loss
adds sigma * kappa times a surrogate of grad l_up on a pool of labelled pairs (`preference_surrogate`). Both agents'
env steps count in the run's global step (`RunClock`); with --budget agent-a only A's do, and A gets DRLHF's steps.

Specification, the choices the papers leave open (--penalty-form, --upper-likelihood, --sigma, --inner-split,
--budget, --penalty-start, --penalty-surrogate, --penalty-units, --value-gap-clamp) and the tags logged:
docs/algorithms.md §8.2.

    python agents/penalty.py --env-id MinAtar/Breakout-v1 --sigma 1
    python sobirl/beamrider.py --algo penalty --penalty-form seed
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from agents.feedback.pairs import LOGIT_CLAMP, fragment_observations, pair_observations
from agents.infra.checkpoint import GeneratorStates
from agents.infra.cli import flag, require, require_non_negative, require_positive, run_cli
from agents.infra.run import Logger, Run, launch
from agents.lower import sac
from agents.pipeline.corrections import leave_one_out_baseline
from agents.pipeline.learner import PreferenceArgs, PreferenceLearner, enable_huge_pages
from agents.pipeline.losses import LossInputs, bradley_terry_bce, fragment_returns
from agents.pipeline.reward_training import predicted_returns, reward_function

ALGO = "penalty"
FORMS = ("pbrl", "seed")
LIKELIHOODS = ("log", "plain")
SPLITS = ("each", "half")
BUDGETS = ("both", "agent-a")
UNITS = ("return", "raw")
SURROGATES = ("clip", "ratio", "score")
B_SEED_OFFSET = 100_000_007  # agent B's environments, replay sampling and action draws


# ---------------------------------------------------------------------------------------------------------------
# The losses, as functions of tensors


def upper_losses(return1: torch.Tensor, return2: torch.Tensor, labels: torch.Tensor, likelihood: str) -> torch.Tensor:
    """Per-pair upper loss, (B,): the Bradley-Terry cross-entropy (log) or 1 - [y P + (1 - y)(1 - P)] (plain), with
    P = sigmoid(R1 - R2) (the difference clamped as in the cross-entropy)."""
    if likelihood == "log":
        return bradley_terry_bce(return1, return2, labels)
    if likelihood == "plain":
        p = torch.sigmoid(torch.clamp(return1 - return2, -LOGIT_CLAMP, LOGIT_CLAMP))
        y = labels.to(p.dtype)
        return 1.0 - (y * p + (1.0 - y) * (1.0 - p))
    raise ValueError(f"unknown likelihood {likelihood!r}; expected one of {', '.join(LIKELIHOODS)}")


def discounted_fragment_values(rewards: torch.Tensor, actions: torch.Tensor, gamma: float) -> torch.Tensor:
    """sum_{t<H} gamma^t r(s_t, a_t) per fragment: (N, H, A) per-action rewards, (N, H) actions -> (N,)."""
    taken = rewards.gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)
    discounts = gamma ** torch.arange(taken.shape[1], device=taken.device, dtype=taken.dtype)
    return (taken * discounts).sum(-1)


def return_units(length: int, gamma: float) -> float:
    """c_H = 1 / ((1 - gamma) sum_{t<H} gamma^t): turns an H-step discounted sum into the units of the whole
    discounted return (a constant reward r gives r / (1 - gamma) either way); 1 / (sum gamma^t) at gamma = 0."""
    covered = sum(gamma**t for t in range(length))
    return 1.0 / ((1.0 - gamma) * covered)


def fragment_values(rewards: torch.Tensor, actions: torch.Tensor, gamma: float) -> torch.Tensor:
    """Each fragment's value estimate J in return units: c_H sum_{t<H} gamma^t r(s_t, a_t), (N,)."""
    return return_units(actions.shape[1], gamma) * discounted_fragment_values(rewards, actions, gamma)


class ValueFragments(NamedTuple):
    """Fragments of both agents' latest rollouts for the value-gap term: observations (N * H, *obs_shape) and
    actions (N, H) of each."""

    obs_a: torch.Tensor
    actions_a: torch.Tensor
    obs_b: torch.Tensor
    actions_b: torch.Tensor


class PenaltyLoss:
    """mean_pairs l + (1/sigma)(J_A - J_B) while `draw` returns fragments (the penalty is on), the mean upper loss
    alone when it returns None or is unset. The learner sets `draw` once: fresh fragments of both agents per call.

    With `clamp`, J is taken of clamp(r_phi, -1, 1), the reward SAC learns from: each J is then within
    +-1/(1 - gamma) and the gap within +-2/(1 - gamma), and a saturated r_phi(s, a) has no gradient."""

    policy_probs = None

    def __init__(
        self,
        sigma: float,
        gamma: float,
        likelihood: str = "log",
        reward_train_mode: bool = False,
        clamp: bool = False,
    ):
        if not sigma > 0:
            raise ValueError(f"sigma must be positive, got {sigma}")
        self.sigma = sigma
        self.gamma = gamma
        self.likelihood = likelihood
        self.reward_train_mode = reward_train_mode
        self.clamp = clamp
        self.draw: Callable[[], ValueFragments | None] | None = None

    def needs_policy(self, global_step: int) -> bool:
        return False

    def values(self, model: torch.nn.Module, f: ValueFragments) -> tuple[torch.Tensor, torch.Tensor]:
        """(J_A, J_B): mean fragment values under r_phi in return units, with gradient, from one forward pass."""
        count_a, length = f.actions_a.shape
        was_training = model.training
        model.train(self.reward_train_mode)
        try:
            rewards = model(torch.cat([f.obs_a, f.obs_b]))
        finally:
            model.train(was_training)
        rewards = rewards.view(-1, length, rewards.shape[-1])
        if self.clamp:
            rewards = rewards.clamp(-1.0, 1.0)  # as SAC sees r_phi (sac.SACTrainer._batch_rewards)
        values = fragment_values(rewards, torch.cat([f.actions_a, f.actions_b]), self.gamma)
        return values[:count_a].mean(), values[count_a:].mean()

    def __call__(self, x: LossInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        p = x.pairs
        if self.likelihood == "log":
            upper = x.bce.mean()
        else:
            returns = fragment_returns(x.r1, p.actions1), fragment_returns(x.r2, p.actions2)
            upper = upper_losses(*returns, p.labels, self.likelihood).mean()
        metrics = {"upper_loss": upper.detach()}
        fragments = self.draw() if self.draw is not None else None
        if fragments is None:
            return upper, metrics
        if x.model is None:
            raise ValueError("the penalty loss needs the reward model (LossInputs.model)")
        value_a, value_b = self.values(x.model, fragments)
        gap = value_a - value_b
        # The agents follow the (ensemble's) mean reward, so this model's share of their values is policy_share.
        penalty = x.policy_share * gap / self.sigma
        metrics.update(
            value_a=value_a.detach(), value_b=value_b.detach(), value_gap=gap.detach(), penalty_term=penalty.detach(),
            value_gap_positive=(gap > 0).to(gap.dtype).detach(),
        )  # fmt: skip
        return upper + penalty, metrics


# ---------------------------------------------------------------------------------------------------------------
# Agent B: SAC-discrete with the penalised actor loss


class PreferencePool(NamedTuple):
    """Labelled pairs for B's score term: their constant weights w_i, (P,), and the log-probabilities B's actor gave
    the pairs' actions when the pool was made (the start of B's phase), (2, P, H): fragment 1s, then fragment 2s."""

    frames1: torch.Tensor
    actions1: torch.Tensor
    frames2: torch.Tensor
    actions2: torch.Tensor
    weights: torch.Tensor
    old_log_probs: torch.Tensor


def taken_log_probs(
    actor: torch.nn.Module,
    frames1: torch.Tensor,
    actions1: torch.Tensor,
    frames2: torch.Tensor,
    actions2: torch.Tensor,
) -> torch.Tensor:
    """log pi(a_t|s_t) along both fragments of each pair, (2, pairs, H), with gradient in the actor."""
    count, length = actions1.shape
    _, log_probs = actor.probs(pair_observations(frames1, frames2, length))
    return log_probs.gather(-1, torch.cat([actions1, actions2]).reshape(-1, 1)).view(2, count, length)


def preference_surrogate(
    log_pi: torch.Tensor,
    old_log_pi: torch.Tensor,
    weights: torch.Tensor,
    surrogate: str = "clip",
    clip: float = 0.2,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """B's surrogate for grad l_up from log pi(a_t|s_t) (2, k, H) with gradient, the pool-time log pi_old (2, k, H)
    and the pairs' weights w (k,); and metrics. All three have the gradient mean_i w_i sum_t grad log pi(a_t|s_t) at
    pi = pi_old:

        score  mean_i w_i sum_t log pi(a_t|s_t)                              (unbounded below: on a pool held
                                                                              fixed it drives log pi to -inf)
        ratio  mean_i w_i sum_t rho_t,  rho_t = pi(a_t|s_t) / pi_old(a_t|s_t) (bounded below for w >= 0)
        clip   mean_i sum_t max(w_i rho_t, w_i clip(rho_t, 1 - eps, 1 + eps)) (PPO's pessimistic clip, for a loss:
                                                                              no gradient once rho_t has moved by
                                                                              eps in the direction w_i asks)
    """
    w = weights.view(1, -1, 1)
    if surrogate == "score":
        return (w * log_pi).sum((0, 2)).mean(), {}
    ratio = torch.exp(log_pi - old_log_pi)
    metrics = {"losses/preference_ratio": ratio.mean().detach()}
    if surrogate == "ratio":
        return (w * ratio).sum((0, 2)).mean(), metrics
    if surrogate == "clip":
        clipped = torch.maximum(w * ratio, w * ratio.clamp(1.0 - clip, 1.0 + clip))
        metrics["losses/preference_clipped"] = ((ratio - 1.0).abs() > clip).float().mean().detach()
        return clipped.sum((0, 2)).mean(), metrics
    raise ValueError(f"unknown surrogate {surrogate!r}; expected one of {', '.join(SURROGATES)}")


def preference_term(
    actor: torch.nn.Module,
    pool: PreferencePool,
    index: torch.Tensor,
    surrogate: str = "clip",
    clip: float = 0.2,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`preference_surrogate` over the pool's pairs at `index`, the actor evaluated with gradient."""
    log_pi = taken_log_probs(
        actor, pool.frames1[index], pool.actions1[index], pool.frames2[index], pool.actions2[index]
    )
    return preference_surrogate(log_pi, pool.old_log_probs[:, index], pool.weights[index], surrogate, clip)


def actor_penalty_coefficient(sigma: float, gamma: float, num_actions: int, units: str) -> float:
    """sigma * kappa: kappa = (1 - gamma) / A ("return") or 1 ("raw"); why: docs/algorithms.md §8.2."""
    return sigma * ((1.0 - gamma) / num_actions if units == "return" else 1.0)


class PenalisedSAC(sac.SACDiscrete):
    """SAC-discrete whose actor loss adds coefficient * the preference score term while `pool` is set."""

    def __init__(self, obs_shape: tuple[int, ...], num_actions: int, args: Args, device: torch.device):
        super().__init__(obs_shape, num_actions, args, device)
        self.coefficient = actor_penalty_coefficient(args.sigma, args.gamma, num_actions, args.penalty_units)
        self.actor_pairs = args.penalty_actor_pairs
        self.surrogate, self.clip = args.penalty_surrogate, args.penalty_clip
        self.pool: PreferencePool | None = None
        self.pool_generator = torch.Generator(device=device).manual_seed(args.seed + 2718281)

    def policy_losses(self, obs: torch.Tensor, alpha: torch.Tensor):
        """SAC's losses (compiled with --compile) plus the score term (eager) while a pool is set."""
        policy_loss, temperature_loss, metrics = super().policy_losses(obs, alpha)
        if self.pool is None:
            return policy_loss, temperature_loss, metrics
        index = torch.randint(
            0, len(self.pool.weights), (self.actor_pairs,), device=self.device, generator=self.pool_generator
        )
        term, extra = preference_term(self.actor, self.pool, index, self.surrogate, self.clip)
        metrics = {**metrics, **extra, "losses/preference_term": term.detach()}
        return policy_loss + self.coefficient * term, temperature_loss, metrics

    def state_dict(self) -> dict:
        return {**super().state_dict(), "pool_generator": self.pool_generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        state = dict(state)
        self.pool_generator.set_state(state.pop("pool_generator").cpu())
        super().load_state_dict(state)


class AgentBTrainer(sac.SACTrainer):
    """A SACTrainer whose agent is PenalisedSAC (its environments, replay and generators from its own seed)."""

    def __init__(self, args: Args, device: torch.device, run: Run):
        super().__init__(args, device, run)
        # Built after the SACDiscrete the base class made, as in every penalty run so far: B's initial weights are
        # the global generator's second draw, and building once would change them.
        self.agent = PenalisedSAC(self.obs_shape, self.num_actions, args, device)


# ---------------------------------------------------------------------------------------------------------------
# Two agents, one run: logging and progress at the combined step


class RunClock:
    """The run's global step: the env steps of every agent it counts (A's alone with --budget agent-a)."""

    def __init__(self):
        self.agents: tuple = ()

    def __call__(self) -> int:
        return sum(agent.global_step for agent in self.agents)


class CombinedStepLogger(Logger):
    """Writes every scalar at the run's global step, whatever step the caller (an agent) passes."""

    def __init__(self, clock: RunClock):
        super().__init__()
        self.clock = clock

    def scalar(self, tag: str, value: float, step: int) -> None:
        super().scalar(tag, value, self.clock())


class AgentBLogger:
    """Agent B's tags: charts/x -> charts_b/x, losses/x -> losses_b/x, and so on, through the run's logger."""

    def __init__(self, base: Logger):
        self.base = base

    def scalar(self, tag: str, value: float, step: int) -> None:
        group, _, name = tag.partition("/")
        self.base.scalar(f"{group}_b/{name}" if name else f"{tag}_b", value, step)

    def close(self) -> None:
        pass


class CombinedStepProgress:
    """The run's progress bar, driven by either agent at the combined step (`label` names the agent's phases)."""

    def __init__(self, progress, clock: RunClock, label: str = ""):
        self.progress = progress
        self.clock = clock
        self.label = label

    def __getattr__(self, name):
        return getattr(self.progress, name)

    def set_phase(self, phase: str) -> None:
        self.progress.set_phase(self.label + phase)

    def update(self, step: int, extra: str = "") -> None:
        self.progress.update(self.clock(), self.label + extra)

    def sps(self, step: int) -> float:
        return self.progress.sps(self.clock())

    def restart_clock(self, step: int) -> None:
        self.progress.restart_clock(self.clock())


# ---------------------------------------------------------------------------------------------------------------
# The algorithm


@dataclass
class Args(PreferenceArgs):
    exp_name: str = flag("penalty", "name of this experiment (part of the run name)")
    sigma: float = flag(
        1.0,
        "penalty parameter sigma (> 0), one number in both places, with J in units of the whole discounted return: "
        "B maximises J - sigma l_up, the reward loss adds (J_A - J_B) / sigma; the bias is O(sigma), the noise of "
        "the value gap O(1/sigma)",
    )
    penalty_form: str = flag(
        "pbrl",
        "whose pairs are queried and labelled for the upper loss: pbrl (agent B's, "
        "the penalised policy: PBRL / Kwon et al.) or seed (agent A's: Gaur et al.'s Algorithm 1)",
        choices=FORMS,
    )
    upper_likelihood: str = flag(
        "log",
        "upper loss per pair: log (Bradley-Terry cross-entropy) or plain (1 - the label's likelihood, Gaur et al.'s G)",
        choices=LIKELIHOODS,
    )
    penalty_start: int = flag(
        0,
        "the penalty (value gap and B's score term) is on once global_step exceeds this and "
        "agent B has passed its --learning-starts",
    )
    inner_split: str = flag(
        "each",
        "env steps per outer iteration: each (both agents run --inner-steps) or half (--inner-steps / 2 each)",
        choices=SPLITS,
    )
    budget: str = flag(
        "both",
        "whose env steps the run's step counts (--total-timesteps, the phase plan, the run's end, --penalty-start, "
        "the logs): both (A's + B's) or agent-a (A's alone: A runs DRLHF's steps and schedule, B as many more "
        "after A each phase; needs --inner-split each)",
        choices=BUDGETS,
    )
    value_gap_clamp: bool = flag(
        False,
        "the value gap J_A - J_B of the reward loss on clamp(r_phi, -1, 1), the reward SAC learns from (each J "
        "within 1/(1 - gamma)); default: on the unclamped r_phi",
    )
    value_fragments: int = flag(
        32, "fragments of each agent's latest rollouts for the value gap, drawn afresh for every reward minibatch"
    )
    penalty_pool: int = flag(64, "newest labelled pairs from which agent B's score term draws")
    penalty_actor_pairs: int = flag(8, "pairs per agent-B actor update in its score term")
    penalty_units: str = flag(
        "return",
        "scale of B's score term: return (sigma (1 - gamma) / A: SAC's actor loss in the units of J) or raw (sigma)",
        choices=UNITS,
    )
    penalty_surrogate: str = flag(
        "clip",
        "B's surrogate for the score term on its fixed pool of pairs: clip (PPO-style "
        "clipped ratios pi/pi_old), ratio (unclipped), score (w log pi, the literal form; "
        "diverges on a pool held fixed for a whole phase)",
        choices=SURROGATES,
    )
    penalty_clip: float = flag(
        0.2, "--penalty-surrogate clip: eps, the relative change of pi(a_t|s_t) past which a step stops pushing"
    )
    penalty_baseline: bool = flag(False, "subtract the leave-one-out pool mean from B's score weights")
    b_buffer_size: int = flag(0, "agent B's replay capacity (0: --buffer-size)")

    def validate(self) -> None:
        super().validate()
        require_positive(self, "sigma", "value_fragments", "penalty_pool", "penalty_actor_pairs", "penalty_clip")
        require_non_negative(self, "penalty_start", "b_buffer_size")
        require(
            self.budget == "both" or self.inner_split == "each",
            "--budget agent-a gives agent A --inner-steps per outer iteration, as DRLHF's agent: it needs "
            f"--inner-split each, got --inner-split {self.inner_split}",
        )
        per_agent = self.agent_steps()
        require(
            per_agent >= self.num_envs,
            f"--inner-steps {self.inner_steps} with --inner-split half leaves no env step for each agent",
        )
        # Pairs and value fragments come from each agent's latest rollout: L-step fragments need L + 2 stored steps
        # per env (the newest transition is incomplete), or the sampler would step agent B past the budget.
        require(
            self.fragment_length + 2 <= per_agent // self.num_envs,
            f"--fragment-length {self.fragment_length} needs {self.fragment_length + 2} steps per env of each "
            f"agent's rollout: --inner-steps {self.inner_steps} with --inner-split {self.inner_split} gives "
            f"{per_agent // self.num_envs}",
        )
        if self.b_buffer_size:
            require(
                self.batch_size <= self.b_buffer_size,
                f"--batch-size {self.batch_size} is larger than --b-buffer-size {self.b_buffer_size}",
            )
            require(
                self.fragment_length + 8 <= self.b_buffer_size // self.num_envs,
                f"--fragment-length {self.fragment_length} does not fit agent B's replay: --b-buffer-size "
                f"{self.b_buffer_size} keeps {self.b_buffer_size // self.num_envs} steps per env",
            )

    def agent_steps(self) -> int:
        """Env steps each agent runs per outer iteration."""
        return self.inner_steps if self.inner_split == "each" else self.inner_steps // 2

    def counts_agent_b(self) -> bool:
        """Whether B's env steps count in the run's step (--budget both)."""
        return self.budget == "both"

    def agent_b_args(self) -> Args:
        return dataclasses.replace(
            self, seed=self.seed + B_SEED_OFFSET, buffer_size=self.b_buffer_size or self.buffer_size
        )


@dataclass
class AgentPhases:
    """The two-agent phase in progress: the outer iteration it was planned for, and A's and B's own step counts at
    which it ends (a checkpoint resumes inside it)."""

    iteration: int = -1
    ends: tuple[int, int] = (0, 0)

    def state_dict(self) -> dict:
        return {"planned_iteration": self.iteration, "phase_ends": list(self.ends)}

    def load_state_dict(self, state: dict) -> None:
        self.iteration = int(state["planned_iteration"])
        self.ends = tuple(int(end) for end in state["phase_ends"])


class PenaltyLearner(PreferenceLearner):
    """The shared outer loop around two agents: `trainer` is A (the best response), `trainer_b` is B (penalised).

    Each agent phase runs A for its planned steps, then B, every phase planned so that the run's global step
    (A's + B's; A's alone with --budget agent-a) stays within --total-timesteps. Queries come from B's rollouts
    (pbrl) or A's (seed); every reward minibatch draws fresh value-gap fragments."""

    def __init__(
        self, args: Args, trainer: sac.SACTrainer, trainer_b: AgentBTrainer, loss_fn: PenaltyLoss, run: Run, run_b: Run
    ):
        self.trainer_a, self.trainer_b, self.run_b = trainer, trainer_b, run_b
        super().__init__(args, trainer, loss_fn, run)
        trainer_b.set_reward(reward_function(self.reward_net, args.reward_train_mode_in_sac))
        self.phases = AgentPhases()
        self.value_generator = torch.Generator(device=self.device).manual_seed(args.seed + 86028121)
        loss_fn.draw = self.active_value_fragments
        self.checkpointed.update(
            sac_b=trainer_b, phases=self.phases, generators=GeneratorStates(value=self.value_generator)
        )

    @property
    def global_step(self) -> int:
        if not self.args.counts_agent_b():
            return self.trainer_a.global_step
        return self.trainer_a.global_step + self.trainer_b.global_step

    def train(self) -> None:
        self.run_b.directory = self.run.directory
        super().train()

    def penalty_active(self) -> bool:
        return self.global_step > self.args.penalty_start and self.trainer_b.global_step > self.args.learning_starts

    # -- 1. query ----------------------------------------------------------------------------------------------------

    def phase_steps(self) -> int:
        return self.args.agent_steps()

    def query_candidates(self, count: int, window: int):
        """Iteration 0: A's uniform-random phase (both agents' policy then). Later: B's rollouts (pbrl) or A's (seed).

        A pair's `collected` step is the run's step minus the fragment's age in the agent's steps: exact for B's
        latest phase (B runs last), earlier by the other agent's interleaved steps otherwise. With --budget agent-a
        the run's step is A's, which stands still while B runs: B's fragments then date from before A's phase end by
        their age in B's steps."""
        if self.iteration == 0 or self.args.penalty_form == "seed":
            return super().query_candidates(count, window)
        self.run.progress.set_phase("query B")
        return self.sample_pairs(count, window, self.fragment_generator, self.trainer_b)

    # -- 3. reward ---------------------------------------------------------------------------------------------------

    def train_reward(self) -> None:
        super().train_reward()
        self.run.logger.scalar("reward/penalty_active", float(self.penalty_active()), self.global_step)

    def active_value_fragments(self) -> ValueFragments | None:
        """The value-gap fragments of one reward minibatch, or None while the penalty is off."""
        return self.value_fragments() if self.penalty_active() else None

    def value_fragments(self) -> ValueFragments:
        """--value-fragments fresh fragments of each agent's latest rollouts: A's for J_A, B's for J_B."""
        a = self.args
        window = self.args.agent_steps()
        draw = lambda trainer: trainer.recent_fragments(
            a.value_fragments, a.fragment_length, window, self.value_generator
        )
        fa, fb = draw(self.trainer_a), draw(self.trainer_b)
        return ValueFragments(
            fragment_observations(fa.frames, a.fragment_length),
            fa.actions,
            fragment_observations(fb.frames, a.fragment_length),
            fb.actions,
        )

    # -- 4. agents ---------------------------------------------------------------------------------------------------

    def plan_agent_phase(self) -> None:
        """Each agent's steps this phase: --inner-steps (or half) each, the remaining budget split evenly when short.
        With --budget agent-a: A's steps are DRLHF's (--inner-steps, or what is left of --total-timesteps), and B
        runs as many."""
        remaining = max(self.args.total_timesteps - self.global_step, 0)
        if self.args.counts_agent_b():
            steps_a = min(self.args.agent_steps(), -(-remaining // 2))
            steps_b = min(self.args.agent_steps(), remaining - steps_a)
            self.agent_phase_end = self.global_step + steps_a + steps_b
        else:
            steps_a = steps_b = min(self.args.agent_steps(), remaining)
            self.agent_phase_end = self.global_step + steps_a
        self.phases.ends = (self.trainer_a.global_step + steps_a, self.trainer_b.global_step + steps_b)
        self.phases.iteration = self.iteration

    def planned_end(self) -> int:
        """The run's step at which the planned phase ends."""
        return sum(self.phases.ends) if self.args.counts_agent_b() else self.phases.ends[0]

    def train_agent(self) -> None:
        # Planned once per outer iteration; again when a resume lowered --total-timesteps below the plan's end.
        if self.phases.iteration != self.iteration or self.planned_end() > self.args.total_timesteps:
            self.plan_agent_phase()
        end_a, end_b = self.phases.ends
        if self.trainer_a.global_step < end_a:
            started = time.perf_counter()
            self.trainer_a.collect(end_a - self.trainer_a.global_step)
            self.run.logger.scalar("charts/agent_seconds", time.perf_counter() - started, self.global_step)
        if self.trainer_b.global_step < end_b:
            started = time.perf_counter()
            self.trainer_b.agent.pool = self.preference_pool() if self.penalty_active() else None
            try:
                self.trainer_b.collect(end_b - self.trainer_b.global_step)
            finally:
                self.trainer_b.agent.pool = None
            self.run_b.logger.scalar("charts/agent_seconds", time.perf_counter() - started, self.global_step)

    @torch.no_grad()
    def preference_pool(self) -> PreferencePool | None:
        """The newest --penalty-pool labelled pairs with their upper losses under the current reward model."""
        rows = self.pairs.oldest_first()[-self.args.penalty_pool :]
        if len(rows) == 0:
            return None
        p = self.pairs.get(rows)
        count, length = p.actions1.shape
        returns = predicted_returns(self.reward_net, p.frames1, p.actions1, p.frames2, p.actions2, chunk_pairs=count)
        weights = upper_losses(*returns, p.labels, self.args.upper_likelihood).float()
        if self.args.penalty_baseline:
            weights = weights - leave_one_out_baseline(weights)
        actor, chunk = self.trainer_b.agent.actor, max(1, self.args.policy_chunk // (2 * length))
        parts = [slice(start, start + chunk) for start in range(0, count, chunk)]
        old = torch.cat(
            [
                taken_log_probs(actor, p.frames1[part], p.actions1[part], p.frames2[part], p.actions2[part])
                for part in parts
            ],
            dim=1,
        )
        return PreferencePool(p.frames1, p.actions1, p.frames2, p.actions2, weights, old)

    def close(self) -> None:
        try:
            super().close()
        finally:
            self.trainer_b.close()


def build(args: Args, device: torch.device, run: Run) -> PenaltyLearner:
    """Both agents, their shared run (logs and progress at the run's step: A's + B's, or A's with --budget
    agent-a), the learner."""
    clock = RunClock()
    progress = run.progress
    run.logger = CombinedStepLogger(clock)
    run.progress = CombinedStepProgress(progress, clock)
    run_b = Run(
        args,
        ALGO,
        AgentBLogger(run.logger),
        CombinedStepProgress(progress, clock, "B "),
        run.signals,
        save_hook=run.save,
    )
    trainer_a = sac.SACTrainer(args, device, run)
    trainer_b = None
    try:
        trainer_b = AgentBTrainer(args.agent_b_args(), device, run_b)
        clock.agents = (trainer_a, trainer_b) if args.counts_agent_b() else (trainer_a,)
        loss = PenaltyLoss(
            args.sigma, args.gamma, args.upper_likelihood, args.reward_train_mode_in_sac, args.value_gap_clamp
        )
        return PenaltyLearner(args, trainer_a, trainer_b, loss, run, run_b)
    except BaseException:
        trainer_a.close()
        if trainer_b is not None:
            trainer_b.close()
        raise


def main(argv: Sequence[str] | None = None) -> PenaltyLearner:
    enable_huge_pages()
    return launch(ALGO, Args, argv, __doc__, build)


if __name__ == "__main__":
    run_cli(main)
