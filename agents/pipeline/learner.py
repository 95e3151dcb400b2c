"""The preference-learning pipeline every preference algorithm shares: the outer loop of SoBiRL's Algorithm 3
(and DRLHF's), with the upper-level reward loss as its one point of variation (`agents/pipeline/losses.py`).

Outer iteration i, as in the paper's algorithm box:
    1. query    gather schedule[i] new fragment pairs from the agent's most recent rollouts
    2. label    the teacher labels them; they enter the FIFO pair buffer
    3. reward   train the reward model (warmup_epochs epochs at i = 0, one epoch after) with the algorithm's loss
    4. agent    SAC-discrete runs --inner-steps env steps on the learned reward r_phi
A run can be checkpointed and resumed at every step boundary, inside the warm-up and inside the agent phase.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from agents import sac_discrete as sac
from agents.feedback.teachers import (
    BPREF_PARAMETERS,
    BPREF_PRESETS,
    LABEL_MODES,
    TEACHERS,
    BPrefTeacher,
    HumanTeacher,
    ReplayTeacher,
    cat_pairs,
    label_pairs,
)
from agents.infra.cli import UsageError, flag, flag_name, require, require_non_negative, require_positive
from agents.infra.run import Run, launch
from agents.pipeline.ensemble import (
    QUERY_SELECTIONS,
    RewardEnsemble,
    epoch_order,
    most_uncertain,
    preference_probabilities,
    query_uncertainty,
)
from agents.pipeline.losses import BradleyTerryLoss, LossInputs, RewardLoss, bradley_terry_bce, fragment_returns
from agents.pipeline.pairs import PairBatch, PairBuffer, pair_observations, pairs_schedule, split_pairs
from agents.pipeline.replay import FrameReplayBuffer, format_bytes, require_memory
from agents.pipeline.reward_model import RewardCNN

PolicyProbs = Callable[[torch.Tensor], torch.Tensor]  # uint8 (N, *obs_shape) -> (N, A) action probabilities


def enable_huge_pages() -> None:
    """Back PyTorch's large CPU tensors with 2 MB pages (read once, at PyTorch's first CPU allocation, so call this
    before creating any tensor). Every reward update allocates about a gigabyte of fresh activations; with 4 KB
    pages faulting them in costs about a third of the update on CPU."""
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


@dataclass
class PreferenceArgs(sac.Args):
    teacher: str = flag(
        "oracle",
        "who labels the pairs: oracle (higher clipped return preferred, ties 0.5; the paper's text), "
        "bernoulli (Bradley-Terry sampled labels; the authors' code), bpref (B-Pref's imperfect teacher: "
        "--teacher-beta/-gamma/-eps-*, --bpref-preset), replay (the answers of a label log, --labels) or human (a "
        "person, on a page this run serves: --label-port, --label-mode)",
        choices=TEACHERS,
    )
    teacher_beta: float = flag(
        -1.0,
        "--teacher bpref: rationality; <= 0: the higher return wins, > 0: Bradley-Terry "
        "label sampled with logit beta * (R1 - R2)",
    )
    teacher_gamma: float = flag(
        1.0, "--teacher bpref: myopia; step t of a fragment's H steps weighs gamma^(H-1-t) in the returns compared"
    )
    teacher_eps_mistake: float = flag(0.0, "--teacher bpref: probability of flipping a label")
    teacher_eps_skip: float = flag(
        0.0,
        "--teacher bpref: skip a pair (neither labelled nor stored) when both returns "
        "are at most eps * M, M the mean |return| of the fragments queried with it",
    )
    teacher_eps_equal: float = flag(0.0, "--teacher bpref: label 0.5 when the returns differ by less than eps * M")
    bpref_preset: str = flag(
        "none",
        "--teacher bpref: the B-Pref paper's teachers: oracle, mistake (eps-mistake "
        "0.1), noisy (beta 1), skip (eps-skip 0.1), myopic (gamma 0.9), equal (eps-equal 0.1)",
        choices=("none", *BPREF_PRESETS),
    )
    labels: str = flag(
        "",
        "--teacher replay: the JSONL label log to take labels from (a --teacher human run's "
        "labels.jsonl), matched by pair id; pairs it does not answer are dropped",
    )
    label_port: int = flag(0, "--teacher human: port of the labelling page on 127.0.0.1 (0: a free one)")
    label_mode: str = flag(
        "sync",
        "--teacher human: sync (each iteration waits until its pairs are answered) or "
        "async (train on the answers that have arrived; the warm-up pairs are always waited for)",
        choices=LABEL_MODES,
    )
    initial_pairs: int = flag(600, "pairs labelled before the first reward training (the warm-up)")
    warmup_epochs: int = flag(512, "reward-model epochs over the initial pairs")
    warmup_save_every: int = flag(
        32, "warm-up epochs between checkpoints, so a stopped warm-up resumes where it was (0: none)"
    )
    total_pairs: int = flag(9_000, "query budget of the schedule, initial pairs included")
    schedule_iterations: int = flag(2_000, "outer iterations over which the hyperbolic schedule spreads the budget")
    inner_steps: int = flag(10_000, "SAC environment steps per outer iteration")
    fragment_length: int = flag(25, "agent steps per fragment")
    pair_buffer: int = flag(3_000, "capacity of the FIFO of labelled pairs")
    reward_batch_size: int = flag(64, "pairs per reward-model minibatch")
    reward_lr: float = flag(3e-4, "AdamW learning rate of the reward model")
    reward_weight_decay: float = flag(0.01, "AdamW weight decay of the reward model")
    ensemble: int = flag(
        1,
        "reward models, each trained on its own bootstrap resample of the pair buffer every epoch "
        "(1: the paper's single model, trained on the buffer itself); the policy learns their mean",
    )
    query_selection: str = flag(
        "uniform",
        "which pairs go to the teacher: uniform (random recent fragments; the paper's), disagreement (the "
        "--candidate-factor times as many candidates' most disputed among the ensemble: std of the members' "
        "preference probabilities; needs --ensemble >= 2) or entropy (their highest mean predictive entropy)",
        choices=QUERY_SELECTIONS,
    )
    candidate_factor: int = flag(10, "--query-selection disagreement|entropy: candidate pairs drawn per pair queried")
    fresh_pairs: int = flag(
        64,
        "fragment pairs of the latest policy scored for reward/accuracy_fresh (0: off); "
        "drawn from their own generator, so this never changes the training run",
    )
    accuracy_pairs: int = flag(0, "newest stored pairs scored for reward/accuracy_train (0: all)")
    policy_chunk: int = flag(1600, "observations per policy forward pass when a loss needs the policy (bounds memory)")
    reference_quirks: bool = flag(
        False,
        "run as the authors' code did: --teacher bernoulli --reward-train-mode-in-sac --per-fragment-batchnorm "
        "--fire-after-life-loss, and SoBiRL's --reference-pi-scale (see the README)",
    )
    reward_train_mode_in_sac: bool = flag(
        False,
        "authors' code: the reward net labels SAC's batches in training mode (dropout on, BatchNorm on the "
        "batch's statistics, running statistics updated); default: evaluation mode",
    )
    per_fragment_batchnorm: bool = flag(
        False,
        "authors' code: reward training normalises each 25-step fragment with its own BatchNorm statistics "
        "(they ran fragments through the net one at a time); default: one batch of all pairs",
    )

    RESUMABLE: ClassVar[frozenset[str]] = sac.Args.RESUMABLE | {
        "warmup_save_every",
        "fresh_pairs",
        "accuracy_pairs",
        "policy_chunk",
        "label_port",
        "label_mode",
    }

    def __post_init__(self):
        super().__post_init__()
        if self.reference_quirks:
            self.teacher = "bernoulli"
            self.reward_train_mode_in_sac = self.per_fragment_batchnorm = True
            self.fire_after_life_loss = not self.env_id.startswith("MinAtar/")
        if self.bpref_preset != "none":
            self.apply_bpref_preset()

    def apply_bpref_preset(self) -> None:
        """Set the preset's five teacher parameters; a parameter given a value the preset contradicts is refused."""
        preset, default = BPREF_PRESETS[self.bpref_preset], BPrefTeacher()
        for name in BPREF_PARAMETERS:
            value, wanted = getattr(self, f"teacher_{name}"), getattr(preset, name)
            require(
                value in (wanted, getattr(default, name)),
                f"--bpref-preset {self.bpref_preset} sets {flag_name(f'teacher_{name}')} {wanted}; it cannot be "
                f"combined with {flag_name(f'teacher_{name}')} {value}",
            )
            setattr(self, f"teacher_{name}", wanted)

    def bpref_teacher(self) -> BPrefTeacher:
        return BPrefTeacher(**{name: getattr(self, f"teacher_{name}") for name in BPREF_PARAMETERS})

    def validate(self) -> None:
        super().validate()
        require_positive(
            self,
            "initial_pairs",
            "inner_steps",
            "fragment_length",
            "pair_buffer",
            "reward_batch_size",
            "reward_lr",
            "policy_chunk",
        )
        require_non_negative(
            self,
            "warmup_epochs",
            "warmup_save_every",
            "schedule_iterations",
            "fresh_pairs",
            "accuracy_pairs",
            "reward_weight_decay",
        )
        require(
            self.initial_pairs <= self.pair_buffer,
            f"--initial-pairs {self.initial_pairs} is more than --pair-buffer {self.pair_buffer} can hold",
        )
        require(
            self.total_pairs >= self.initial_pairs,
            f"--total-pairs {self.total_pairs} is smaller than --initial-pairs {self.initial_pairs}",
        )
        self.validate_teacher()
        self.validate_query_selection()
        steps_per_env = self.inner_steps // self.num_envs
        require(
            self.fragment_length <= steps_per_env,
            f"--fragment-length {self.fragment_length} is longer than a rollout: --inner-steps {self.inner_steps} "
            f"gives {steps_per_env} steps per env",
        )
        slots = self.buffer_size // self.num_envs
        require(
            self.fragment_length + 8 <= slots,
            f"--fragment-length {self.fragment_length} does not fit the replay: --buffer-size {self.buffer_size} "
            f"keeps {slots} steps per env",
        )
        one_fragment = (self.fragment_length + 1) * self.num_envs
        require(
            self.total_timesteps >= one_fragment,
            f"--total-timesteps {self.total_timesteps} ends before one fragment is collected: --fragment-length "
            f"{self.fragment_length} needs {one_fragment} env steps",
        )

    def warmup_rollout_per_env(self) -> int:
        """Complete transitions per env that iteration 0 stores before its first query: the initial pairs' worth,
        at most the uniform-random phase, at least one fragment."""
        rollout = max(
            self.fragment_length + 1, min(2 * self.initial_pairs * self.fragment_length, self.learning_starts)
        )
        return -(-rollout // self.num_envs)

    def warmup_rollout_steps(self) -> int:
        """Env steps of iteration 0's rollout (PreferenceLearner.query) plus the step completing its last transition."""
        return (self.warmup_rollout_per_env() + 1) * self.num_envs

    def budget_notes(self) -> list[str]:
        notes = super().budget_notes()
        rollout = self.warmup_rollout_steps()
        if self.total_timesteps < rollout:
            notes.append(
                f"--total-timesteps {self.total_timesteps} ends before the warm-up's rollout of {rollout} env "
                f"steps: the {self.initial_pairs} initial pairs come from the {self.total_timesteps} steps "
                f"taken, and no agent phase follows"
            )
        return notes

    def validate_query_selection(self) -> None:
        require_positive(self, "ensemble", "candidate_factor")
        require(
            self.query_selection != "disagreement" or self.ensemble >= 2,
            f"--query-selection disagreement needs --ensemble 2 or more, got --ensemble {self.ensemble}",
        )
        require(
            self.query_selection != "uniform" or self.candidate_factor == type(self).candidate_factor,
            "--candidate-factor applies to --query-selection disagreement|entropy only (this run's is uniform)",
        )

    def validate_teacher(self) -> None:
        require(0.0 <= self.teacher_gamma <= 1.0, f"--teacher-gamma must be in [0, 1], got {self.teacher_gamma}")
        require(
            0.0 <= self.teacher_eps_mistake <= 1.0,
            f"--teacher-eps-mistake must be in [0, 1], got {self.teacher_eps_mistake}",
        )
        require_non_negative(self, "teacher_eps_skip", "teacher_eps_equal")
        require(0 <= self.label_port <= 65535, f"--label-port must be in [0, 65535], got {self.label_port}")
        # Flags of one teacher given with another would be silently ignored: refuse them.
        default = BPrefTeacher()
        own = {
            "bpref": (["bpref_preset"] if self.bpref_preset != "none" else [])
            + [
                f"teacher_{name}"
                for name in BPREF_PARAMETERS
                if getattr(self, f"teacher_{name}") != getattr(default, name)
            ],
            "replay": ["labels"] if self.labels else [],
            "human": ["label_port"] * bool(self.label_port) + ["label_mode"] * (self.label_mode != "sync"),
        }
        for teacher, names in own.items():
            if teacher != self.teacher and names:
                raise UsageError(
                    f"{flag_name(names[0])} applies to --teacher {teacher} only (this run's teacher is {self.teacher})"
                )
        if self.teacher == "replay":
            ReplayTeacher.from_log(self.labels)  # a missing or corrupt log is refused before the run starts


# ---------------------------------------------------------------------------------------------------------------
# Reward-model updates


def probs_in_chunks(policy_probs: PolicyProbs, obs: torch.Tensor, chunk: int) -> torch.Tensor:
    """Policy probabilities for (N, *obs_shape) observations, `chunk` at a time so activations stay small."""
    with torch.no_grad():
        return torch.cat([policy_probs(part) for part in obs.split(chunk)])


def reward_update(
    reward_net: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    pairs: PairBatch,
    loss_fn: RewardLoss,
    alpha: float = 1.0,
    global_step: int = 0,
    policy_probs: PolicyProbs | None = None,
    weight: float = 1.0,
    policy_chunk: int = 1600,
    diagnose: bool = False,
    policy_share: float = 1.0,
) -> dict[str, torch.Tensor]:
    """One optimizer step on `pairs` with `loss_fn`, its loss scaled by `weight`; `policy_share` is
    LossInputs.policy_share (1/K for an ensemble member).

    Returns detached tensors (no host round trip): the loss, the mean cross-entropy, hyper_term (the loss minus
    the cross-entropy: what the algorithm adds to DRLHF's fit), the loss's own metrics, the train-mode agreement
    with the noise-free oracle (`correct` / `counted`) and with the teacher's labels (`teacher_correct` /
    `teacher_counted`, the accuracy the authors' code logged). With `diagnose`, also `extra_grad_ratio`: the norm
    of hyper_term's gradient over the cross-entropy's (two extra backward passes).
    """
    batch, length = pairs.actions1.shape
    obs = pair_observations(pairs.frames1, pairs.frames2, length)
    pi1 = pi2 = None
    if loss_fn.needs_policy(global_step):
        if policy_probs is None:
            raise ValueError("this loss needs the current policy: pass policy_probs")
        # Before the reward forward pass: the policy's activations are freed before the reward model's, which
        # autograd keeps until backward, are allocated, so the two never add up in peak memory.
        pi1, pi2 = split_pairs(probs_in_chunks(policy_probs, obs, policy_chunk).float(), batch, length)
    r1, r2 = split_pairs(reward_net(obs), batch, length)
    del obs
    return1, return2 = fragment_returns(r1, pairs.actions1), fragment_returns(r2, pairs.actions2)
    bce = bradley_terry_bce(return1, return2, pairs.labels)
    loss, metrics = loss_fn(LossInputs(pairs, r1, r2, bce, alpha, global_step, pi1, pi2, reward_net, policy_share))
    if diagnose:
        metrics["extra_grad_ratio"] = gradient_norm_ratio(loss - bce.mean(), bce.mean(), reward_net)
    optimizer.zero_grad(set_to_none=True)
    (loss * weight).backward()
    optimizer.step()
    with torch.no_grad():
        correct, counted = oracle_agreement(return1, return2, pairs.returns1, pairs.returns2)
        teacher_correct, teacher_counted = label_agreement(return1, return2, pairs.labels)
        bce_mean = bce.mean()
        out = {"loss": loss.detach(), "bce": bce_mean, "hyper_term": loss.detach() - bce_mean}
    out.update({key: torch.as_tensor(value).detach() for key, value in metrics.items()})
    return {
        **out,
        "correct": correct,
        "counted": counted,
        "teacher_correct": teacher_correct,
        "teacher_counted": teacher_counted,
    }


def gradient_norm_ratio(extra: torch.Tensor, bce: torch.Tensor, model: torch.nn.Module) -> torch.Tensor:
    """||grad extra|| / ||grad bce|| over the model's parameters (0 when the extra term has no gradient)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not extra.requires_grad:
        return torch.zeros((), device=bce.device)
    norm = lambda loss: torch.linalg.vector_norm(
        torch.cat(
            [
                (g if g is not None else torch.zeros_like(p)).flatten()
                for g, p in zip(torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True), params)
            ]
        )
    )
    return norm(extra) / norm(bce).clamp_min(1e-12)


def reward_epoch(
    reward_net: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    buffer: PairBuffer,
    batch_size: int,
    loss_fn: RewardLoss | None = None,
    alpha: float = 1.0,
    global_step: int = 0,
    policy_probs: PolicyProbs | None = None,
    generator: torch.Generator | None = None,
    policy_chunk: int = 1600,
    between_steps: Callable[[], None] = lambda: None,
    diagnose: bool = False,
    bootstrap: bool = False,
    policy_share: float = 1.0,
) -> dict[str, float]:
    """One pass over the pair buffer in shuffled minibatches of `batch_size`, the net in training mode throughout
    (with `bootstrap`, over len(buffer) pairs drawn from it with replacement: an ensemble member's resample).

    As in imitation's trainer (which the reference uses), the last, partial minibatch still takes a step, with its
    loss scaled by len / batch_size. The net is left in evaluation mode, ready to produce rewards for SAC.
    `between_steps` runs before every minibatch (the run's stop check). Returns pair-weighted means of loss, bce,
    hyper_term and the loss's metrics, the train-mode accuracy against the oracle (`accuracy`) and against the
    teacher's labels (`teacher_accuracy`), the number of steps, and with `diagnose` the first minibatch's
    `extra_grad_ratio`.
    """
    loss_fn = loss_fn or BradleyTerryLoss()
    if loss_fn.needs_policy(global_step) and policy_probs is None:
        raise ValueError("this loss needs the current policy: pass policy_probs")
    reward_net.train()
    order = epoch_order(len(buffer), bootstrap, generator)
    minibatches = order.split(batch_size) if len(order) else ()  # every pair dropped so far: nothing to fit
    rows = buffer.oldest_first()
    totals: dict[str, torch.Tensor] = {}
    sums = ("correct", "counted", "teacher_correct", "teacher_counted")
    first_step_only = ("extra_grad_ratio",)
    try:
        for index, part in enumerate(minibatches):
            between_steps()
            step = reward_update(
                reward_net,
                optimizer,
                buffer.get(rows[part]),
                loss_fn,
                alpha,
                global_step,
                policy_probs,
                len(part) / batch_size,
                policy_chunk,
                diagnose=diagnose and index == 0,
                policy_share=policy_share,
            )
            for key, value in step.items():
                scaled = value if key in sums else value * len(part)
                totals[key] = totals[key] + scaled if key in totals else scaled
    finally:
        reward_net.eval()
    n = max(len(buffer), 1)
    out = {key: float(value) / (1 if key in first_step_only else n) for key, value in totals.items() if key not in sums}
    for name, (correct, counted) in {
        "accuracy": ("correct", "counted"),
        "teacher_accuracy": ("teacher_correct", "teacher_counted"),
    }.items():
        total = float(totals.get(counted, 0))
        out[name] = float(totals[correct]) / total if total else math.nan
    out["steps"] = len(minibatches)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Evaluation


def oracle_agreement(
    predicted1: torch.Tensor, predicted2: torch.Tensor, returns1: torch.Tensor, returns2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(score, pairs counted) as tensors: pairs whose ground-truth returns tie are left out (the noise-free oracle
    has no preference); the others score 1 when the predicted order matches, 0.5 on a predicted tie and 0
    otherwise."""
    truth = torch.sign(returns1 - returns2)
    guess = torch.sign(predicted1 - predicted2)
    counted = truth != 0
    score = torch.where(guess == 0, 0.5, (guess == truth).float())
    return (score * counted).sum(), counted.sum()


def label_agreement(
    predicted1: torch.Tensor, predicted2: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(score, pairs counted) against the teacher's labels, as the authors' code measured accuracy: pairs labelled
    0.5 are left out, the others score 1 when the predicted order matches the label's side."""
    return oracle_agreement(predicted1, predicted2, labels, torch.full_like(labels, 0.5))


@torch.no_grad()
def predicted_returns(
    reward_net: torch.nn.Module,
    frames1: torch.Tensor,
    actions1: torch.Tensor,
    frames2: torch.Tensor,
    actions2: torch.Tensor,
    chunk_pairs: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reward model's returns (N,) of both fragments of N pairs, in eval mode, `chunk_pairs` pairs per forward
    pass. The net's mode is restored afterwards."""
    was_training = reward_net.training
    reward_net.eval()
    length = actions1.shape[1]
    parts1, parts2 = [], []
    try:
        for start in range(0, frames1.shape[0], chunk_pairs):
            part = slice(start, start + chunk_pairs)
            pairs = len(frames1[part])
            r1, r2 = split_pairs(reward_net(pair_observations(frames1[part], frames2[part], length)), pairs, length)
            parts1.append(fragment_returns(r1, actions1[part]))
            parts2.append(fragment_returns(r2, actions2[part]))
    finally:
        reward_net.train(was_training)
    empty = frames1.new_zeros(0, dtype=torch.float32)
    return (torch.cat(parts1), torch.cat(parts2)) if parts1 else (empty, empty)


def preference_accuracy(
    reward_net: torch.nn.Module,
    frames1: torch.Tensor,
    actions1: torch.Tensor,
    frames2: torch.Tensor,
    actions2: torch.Tensor,
    returns1: torch.Tensor,
    returns2: torch.Tensor,
    chunk_pairs: int = 64,
) -> float:
    """How often the reward model orders a pair of fragments as the noise-free oracle does (see `oracle_agreement`),
    evaluated in eval mode; nan when every pair is a ground-truth tie."""
    predicted1, predicted2 = predicted_returns(reward_net, frames1, actions1, frames2, actions2, chunk_pairs)
    score, counted = oracle_agreement(predicted1, predicted2, returns1, returns2)
    return float(score) / int(counted) if int(counted) else math.nan


def ensemble_uncertainty(members: Sequence[torch.nn.Module], pairs: PairBatch, mode: str) -> torch.Tensor:
    """Per-pair uncertainty (`agents.pipeline.ensemble.query_uncertainty`) of the members' preference probabilities."""
    returns = [predicted_returns(net, pairs.frames1, pairs.actions1, pairs.frames2, pairs.actions2) for net in members]
    return query_uncertainty(
        preference_probabilities(torch.stack([r[0] for r in returns]), torch.stack([r[1] for r in returns])), mode
    )


def mean_stats(stats: Sequence[dict[str, float]]) -> dict[str, float]:
    """Key-wise means of the ensemble members' epoch statistics (a key only some members report: their mean)."""
    keys = dict.fromkeys(key for member in stats for key in member)
    return {key: sum(m[key] for m in stats if key in m) / sum(key in m for m in stats) for key in keys}


def reward_function(
    reward_net: torch.nn.Module, train_mode: bool = False
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """r_phi(s, a) for the policy learner: (B, *obs_shape) uint8 and (B,) actions -> (B,), in evaluation mode (or in
    training mode, as the authors' code did, with `train_mode`)."""

    def rewards(obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        if reward_net.training != train_mode:
            reward_net.train(train_mode)
        with torch.no_grad():
            return reward_net(obs).gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)

    return rewards


# ---------------------------------------------------------------------------------------------------------------
# The outer loop


class PreferenceLearner:
    """Reward model, pair buffer, teacher and query schedule around a SACTrainer; `train` runs the outer loop.

    Iteration 0 first rolls out min(2 * initial_pairs * fragment_length, learning_starts) env steps of SAC's
    uniform-random phase (at least one fragment's worth); unlike the reference code's uncounted rollout, these steps
    count in global_step and the total budget, which is a cap for every phase.
    """

    def __init__(self, args: PreferenceArgs, trainer: sac.SACTrainer, loss_fn: RewardLoss, run: Run):
        self.args = args
        self.trainer = trainer
        self.loss_fn = loss_fn
        self.run = run
        self.device = trainer.device
        try:
            self.members = [
                RewardCNN(trainer.obs_shape, trainer.num_actions).to(self.device) for _ in range(args.ensemble)
            ]
        except ValueError as err:
            raise UsageError(f"--env-id {args.env_id}: {err}") from None
        # What the policy, the accuracies and the losses' policy-side terms read: the model, or the members' mean.
        self.reward_net = self.members[0] if args.ensemble == 1 else RewardEnsemble(self.members)
        self.optimizers = [
            torch.optim.AdamW(net.parameters(), lr=args.reward_lr, weight_decay=args.reward_weight_decay)
            for net in self.members
        ]
        # --compile trains through the compiled stock modules (the CPU kernels are an eager-mode optimisation).
        self.trained_models = list(self.members)
        if args.compile:
            # The diagnostics take gradients with retain_graph=True, which compiled graphs refuse when their
            # backward donates (frees) saved buffers.
            torch._functorch.config.donated_buffer = False
            for net in self.members:
                net.cpu_kernels = False
            self.trained_models = [torch.compile(net, dynamic=True) for net in self.members]
        replay = trainer.buffer
        pair_bytes = PairBuffer.bytes_needed(args.pair_buffer, args.fragment_length, replay.frame_shape, replay.stack)
        replay_bytes = FrameReplayBuffer.bytes_needed(args.buffer_size, args.num_envs, trainer.obs_shape, replay.stack)
        try:  # both buffers live on the device and fill in as the run goes: together they must fit
            require_memory(
                "--pair-buffer",
                args.pair_buffer,
                f"a full pair buffer ({format_bytes(pair_bytes)}) with the replay ({format_bytes(replay_bytes)})",
                pair_bytes + replay_bytes,
                self.device,
            )
        except ValueError as err:
            raise UsageError(str(err)) from None
        self.pairs = PairBuffer(args.pair_buffer, args.fragment_length, replay.frame_shape, replay.stack, self.device)
        self.schedule = pairs_schedule(args.initial_pairs, args.total_pairs, args.schedule_iterations)
        self.iteration = 0  # the outer iteration in progress
        # The next step of that iteration: query, label (--teacher human: the queried pairs wait for answers),
        # reward or agent.
        self.stage = "query"
        self.epochs_done = 0  # reward epochs of this iteration already taken (the warm-up resumes from here)
        self.agent_phase_end = 0  # global step where the agent phase ends
        # Each consumer of randomness has its own generator, so metrics never change the training run.
        self.fragment_generator = torch.Generator(device=self.device).manual_seed(args.seed + 7919)
        self.label_generator = torch.Generator().manual_seed(args.seed + 104729)
        self.shuffle_generator = torch.Generator().manual_seed(args.seed + 15485863)
        self.fresh_generator = torch.Generator(device=self.device).manual_seed(args.seed + 32452843)
        self.reward_net.eval()
        if args.per_fragment_batchnorm:
            for net in self.members:
                net.batchnorm_group = args.fragment_length
        # Set from the start so that no SAC update ever sees the true reward.
        trainer.set_reward(reward_function(self.reward_net, args.reward_train_mode_in_sac))
        # Teachers. Each queried pair's id is the number of pairs queried before it (label logs are keyed by it).
        self.pairs_queried = 0
        self.bpref = args.bpref_teacher() if args.teacher == "bpref" else None
        self.replay_teacher = ReplayTeacher.from_log(args.labels) if args.teacher == "replay" else None
        self.human = HumanTeacher(args.label_port, max_pending=args.pair_buffer) if args.teacher == "human" else None

    @property
    def global_step(self) -> int:
        return self.trainer.global_step

    def train(self) -> None:
        total = self.args.total_timesteps
        if self.human is not None:
            self.start_label_server()
        while True:
            if self.stage == "agent":
                self.train_agent()
                if self.global_step >= total:
                    return
                self.log_fresh_accuracy()
                self.iteration += 1
                self.stage = "query"
            if self.stage in ("query", "label"):
                self.pairs.add(self.label(self.query(self.new_pairs()) if self.stage == "query" else None))
                self.stage, self.epochs_done = "reward", 0
            self.train_reward()
            self.agent_phase_end = min(self.global_step + self.args.inner_steps, total)
            self.stage = "agent"

    def new_pairs(self) -> int:
        return self.schedule[self.iteration] if self.iteration < len(self.schedule) else 0

    # -- 1. query ----------------------------------------------------------------------------------------------------

    def query(self, count: int) -> PairBatch:
        """`count` new pairs of fragments from the most recent rollouts (iteration 0: from the random phase), drawn
        uniformly or, with --query-selection, the most uncertain of --candidate-factor times as many (not in the
        warm-up, whose reward model has not been trained yet)."""
        a = self.args
        self.run.progress.set_phase("query")
        if a.query_selection == "uniform" or self.iteration == 0 or count == 0:
            return self.query_candidates(count, 2 * count * a.fragment_length)
        candidates = count * a.candidate_factor
        # The candidates come from the latest agent phase, or from just enough steps to hold them without overlap.
        window = max(2 * count * a.fragment_length, min(2 * candidates * a.fragment_length, self.phase_steps()))
        pairs = self.query_candidates(candidates, window)
        uncertainty = ensemble_uncertainty(self.members, pairs, a.query_selection)
        chosen = most_uncertain(uncertainty, count)
        step, log = self.global_step, self.run.logger.scalar
        log("reward/query_uncertainty_candidates", float(uncertainty.mean()), step)
        log("reward/query_uncertainty_selected", float(uncertainty[chosen].mean()), step)
        return pairs.select(chosen.to(pairs.labels.device))

    def phase_steps(self) -> int:
        """Env steps of the queried agent's latest phase."""
        return self.args.inner_steps

    def query_candidates(self, count: int, window: int) -> PairBatch:
        """`count` pairs of random fragments from the latest `window` env steps (iteration 0: from all the
        uniform-random steps of the warm-up rollout, collected here first)."""
        a, trainer = self.args, self.trainer
        if self.iteration == 0:
            trainer.collect_until_stored(a.warmup_rollout_per_env())
            window = trainer.steps_per_env_stored() * a.num_envs
        return self.sample_pairs(count, window, self.fragment_generator)

    def sample_pairs(self, count: int, window_steps: int, generator: torch.Generator) -> PairBatch:
        fragments = self.trainer.recent_fragments(2 * count, self.args.fragment_length, window_steps, generator)
        returns = fragments.rewards.sum(1)
        first, second = slice(0, None, 2), slice(1, None, 2)
        # The env step at which the pair's older fragment began (the newest stored step is global_step - num_envs).
        started = self.global_step - (fragments.age + 1) * self.args.num_envs
        collected = torch.minimum(started[first], started[second])
        return PairBatch(
            fragments.frames[first],
            fragments.actions[first],
            fragments.frames[second],
            fragments.actions[second],
            torch.full((count,), math.nan, device=returns.device),
            returns[first],
            returns[second],
            fragments.behaviour[first],
            fragments.behaviour[second],
            collected,
            rewards1=fragments.rewards[first],
            rewards2=fragments.rewards[second],
        )

    # -- 2. label ----------------------------------------------------------------------------------------------------

    def label(self, queries: PairBatch | None) -> PairBatch:
        """The teacher's labels for `queries` (None: continue the human label step a checkpoint interrupted): the
        pairs to store, labels set. bpref may skip pairs; replay drops the pairs its log does not answer; human
        returns the pairs answered so far, these or earlier ones (--label-mode). A pair answered "can't tell" is
        dropped. Every queried pair takes an id, skipped or not."""
        a = self.args
        ids = []
        if queries is not None:
            ids = list(range(self.pairs_queried, self.pairs_queried + len(queries)))
            self.pairs_queried += len(queries)
        if a.teacher in ("oracle", "bernoulli"):
            queries.labels = label_pairs(a.teacher, queries.returns1, queries.returns2, self.label_generator)
            return queries
        if a.teacher == "bpref":
            queries.labels, keep = self.bpref.label(queries.rewards1, queries.rewards2, self.label_generator)
            self.log_label_step(dropped=int((~keep).sum()))
            return queries.select(keep)
        if a.teacher == "replay":
            labels, covered = self.replay_teacher.label(ids)
            queries.labels = labels.to(queries.labels.device)
            answered = covered & ~labels.isnan()
            self.log_label_step(dropped=int((covered & labels.isnan()).sum()), unlabelled=int((~covered).sum()))
            return queries.select(answered.to(queries.labels.device))
        return self.label_by_human(queries, ids)

    def label_by_human(self, queries: PairBatch | None, ids: list[int]) -> PairBatch:
        human, signals = self.start_label_server(), self.run.signals
        if queries is not None:
            human.submit(ids, queries)
            self.stage = "label"  # a checkpoint taken while waiting keeps the pairs (pending) and waits again
        wait = self.args.label_mode == "sync" or self.iteration == 0  # the warm-up needs its labels
        if wait and human.pending:
            self.run.progress.set_phase(f"label: {len(human.pending)} pairs at {human.url}")
        answered, dropped = human.collect(wait, lambda: signals.signum is not None, signals.check)
        self.log_label_step(dropped=dropped, pending=len(human.pending))
        return cat_pairs(answered) if answered else self.pairs.get(torch.zeros(0, dtype=torch.long))

    def start_label_server(self) -> HumanTeacher:
        """Serve the labelling page (once), logging answers to <run dir>/labels.jsonl; a resumed run stores the answers
        its checkpoint's pending pairs received after the checkpoint, and queues the others again."""
        human = self.human
        if human.started:
            return human
        if self.run.directory is None:
            raise UsageError("--teacher human needs a run directory for its label log")
        try:
            self.pairs_queried = human.start(self.run.directory / "labels.jsonl", self.pairs_queried)
        except OSError as err:
            raise UsageError(f"--label-port {self.args.label_port}: cannot serve the labelling page: {err}") from None
        except ValueError as err:  # a corrupt log in the run directory
            raise UsageError(f"--teacher human: {err}") from None
        print(f"label preferences at {human.url} (answers saved to {human.log_path})", flush=True)
        answered, _ = human.collect(wait=False)
        if answered:
            self.pairs.add(cat_pairs(answered))
        return human

    def log_label_step(self, **counts: int) -> None:
        """reward/dropped_pairs (skipped or "can't tell"), reward/unlabelled_pairs (not in the replayed log),
        reward/pending_pairs (waiting for a person)."""
        for name, count in counts.items():
            self.run.logger.scalar(f"reward/{name}_pairs", count, self.global_step)

    # -- 3. reward ---------------------------------------------------------------------------------------------------

    def train_reward(self) -> None:
        a = self.args
        self.run.progress.set_phase("reward warm-up" if self.iteration == 0 else "reward")
        epochs = a.warmup_epochs if self.iteration == 0 else 1
        stats = None
        while self.epochs_done < epochs:
            self.run.signals.check()
            last = self.epochs_done == epochs - 1
            stats = mean_stats(
                [
                    reward_epoch(
                        model,
                        optimizer,
                        self.pairs,
                        a.reward_batch_size,
                        self.loss_fn,
                        self.trainer.alpha,
                        self.global_step,
                        self.loss_fn.policy_probs or self.trainer.policy_probs,
                        self.shuffle_generator,
                        a.policy_chunk,
                        self.run.signals.check,
                        diagnose=last and k == 0,
                        bootstrap=a.ensemble > 1,
                        policy_share=1.0 / a.ensemble,
                    )
                    for k, (model, optimizer) in enumerate(zip(self.trained_models, self.optimizers))
                ]
            )
            self.epochs_done += 1
            if epochs > 1:
                self.run.progress.set_phase(f"reward warm-up {self.epochs_done}/{epochs}")
                if a.warmup_save_every and self.epochs_done % a.warmup_save_every == 0 and self.epochs_done < epochs:
                    self.run.save()
        self.log_reward_phase(stats)

    # -- 4. agent ----------------------------------------------------------------------------------------------------

    def train_agent(self) -> None:
        if self.global_step < self.agent_phase_end:
            self.trainer.collect(self.agent_phase_end - self.global_step)

    # -- metrics -----------------------------------------------------------------------------------------------------

    def stored_accuracy(self) -> float:
        rows = self.pairs.oldest_first()
        if self.args.accuracy_pairs:
            rows = rows[-self.args.accuracy_pairs :]
        p = self.pairs.get(rows)
        return preference_accuracy(
            self.reward_net, p.frames1, p.actions1, p.frames2, p.actions2, p.returns1, p.returns2
        )

    def log_reward_phase(self, stats: dict | None) -> None:
        step, log = self.global_step, self.run.logger.scalar
        if stats is not None:
            renamed = {"accuracy": "accuracy_train_mode", "teacher_accuracy": "accuracy_authors"}
            for key, value in stats.items():
                if key != "steps":
                    log(f"reward/{renamed.get(key, key)}", value, step)
        log("reward/accuracy_train", self.stored_accuracy(), step)
        # How off-policy the stored pairs are: collected before the latest agent phase, or by the uniform-random policy.
        collected = self.pairs.get(self.pairs.oldest_first()).collected
        if len(collected):
            latest_phase = self.global_step - self.args.inner_steps
            log("reward/offpolicy_share", float((collected < latest_phase).float().mean()), step)
            log("reward/random_policy_share", float((collected < self.args.learning_starts).float().mean()), step)
        log("reward/num_pairs", len(self.pairs), step)
        log("reward/new_pairs", self.new_pairs(), step)
        log("reward/iteration", self.iteration + 1, step)

    def log_fresh_accuracy(self) -> None:
        """Accuracy of the reward model the policy has just trained on, on the policy's own latest fragments."""
        if self.args.fresh_pairs <= 0:
            return
        p = self.sample_pairs(self.args.fresh_pairs, self.args.inner_steps, self.fresh_generator)
        accuracy = preference_accuracy(
            self.reward_net, p.frames1, p.actions1, p.frames2, p.actions2, p.returns1, p.returns2
        )
        self.run.logger.scalar("reward/accuracy_fresh", accuracy, self.global_step)
        if len(self.members) > 1:
            disagreement = ensemble_uncertainty(self.members, p, "disagreement")
            self.run.logger.scalar("reward/ensemble_disagreement", float(disagreement.mean()), self.global_step)

    # -- checkpoints ---------------------------------------------------------------------------------------------------

    _GENERATORS = ("fragment_generator", "label_generator", "shuffle_generator", "fresh_generator")

    def state_dict(self) -> dict:
        return {
            "sac": self.trainer.state_dict(),
            "iteration": self.iteration,
            "stage": self.stage,
            "epochs_done": self.epochs_done,
            "agent_phase_end": self.agent_phase_end,
            "reward_net": self.reward_net.state_dict(),
            "reward_optimizers": [optimizer.state_dict() for optimizer in self.optimizers],
            "pairs": self.pairs.state_dict(),
            "pairs_queried": self.pairs_queried,
            "pending_pairs": None if self.human is None else self.human.state_dict(),
            **{name: getattr(self, name).get_state() for name in self._GENERATORS},
        }

    def load_state_dict(self, state: dict) -> None:
        self.trainer.load_state_dict(state["sac"])
        self.iteration, self.stage = int(state["iteration"]), state["stage"]
        self.epochs_done, self.agent_phase_end = int(state["epochs_done"]), int(state["agent_phase_end"])
        self.reward_net.load_state_dict(state["reward_net"])
        self.reward_net.eval()
        saved_optimizers = state.get("reward_optimizers") or [state["reward_optimizer"]]  # before --ensemble: one
        for optimizer, saved in zip(self.optimizers, saved_optimizers, strict=True):
            optimizer.load_state_dict(saved)
        self.pairs.load_state_dict(state["pairs"])
        self.pairs_queried = int(state.get("pairs_queried", 0))
        if self.human is not None and state.get("pending_pairs") is not None:
            self.human.load_state_dict(state["pending_pairs"], self.device)
        for name in self._GENERATORS:
            getattr(self, name).set_state(state[name].cpu())

    def close(self) -> None:
        try:
            if self.human is not None:
                self.human.stop()
        finally:
            self.trainer.close()


def run_preference_rl(
    algo: str,
    args_cls: type[PreferenceArgs],
    argv: Sequence[str] | None,
    make_loss: Callable[[PreferenceArgs, sac.SACTrainer], RewardLoss],
    description: str | None = None,
    learner_cls: type[PreferenceLearner] = PreferenceLearner,
) -> PreferenceLearner:
    """Parse, validate, build and run a preference algorithm to completion: the shared pipeline with its loss
    (and, for algorithms with state of their own to checkpoint, a PreferenceLearner subclass)."""
    enable_huge_pages()

    def build(args: PreferenceArgs, device: torch.device, run: Run) -> PreferenceLearner:
        trainer = sac.SACTrainer(args, device, run)
        try:
            return learner_cls(args, trainer, make_loss(args, trainer), run)
        except BaseException:
            trainer.close()
            raise

    return launch(algo, args_cls, argv, description, build)
