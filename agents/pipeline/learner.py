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
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import numpy as np
import torch

from agents.feedback.pairs import PairBatch, PairBuffer, pairs_schedule
from agents.feedback.teachers import (
    BPREF_PARAMETERS,
    BPREF_PRESETS,
    LABEL_MODES,
    TEACHERS,
    BPrefTeacher,
    LabelContext,
    ReplayTeacher,
    make_teacher,
)
from agents.infra.cli import UsageError, flag, flag_name, require, require_non_negative, require_positive
from agents.infra.memory import format_bytes, require_memory
from agents.infra.run import Run, launch
from agents.lower import sac
from agents.lower.replay import FrameReplayBuffer
from agents.pipeline.ensemble import (
    QUERY_SELECTIONS,
    RewardEnsemble,
    most_uncertain,
)
from agents.pipeline.losses import RewardLoss
from agents.pipeline.reward_model import RewardCNN
from agents.pipeline.reward_training import (
    ensemble_uncertainty,
    learned_returns_of_steps,
    mean_stats,
    oracle_agreement,
    pearson,
    predicted_returns,
    preference_accuracy,
    reward_epoch,
    reward_function,
    spearman,
)


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def enable_huge_pages() -> None:
    """Back PyTorch's large CPU tensors with 2 MB pages (read once, at PyTorch's first CPU allocation, so call this
    before creating any tensor). Every reward update allocates about a gigabyte of fresh activations, and faulting
    them in 4 KB pages costs a large share of the update on CPU (docs/performance.md)."""
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
    scored_games: int = flag(
        64,
        "newest whole games of each agent phase whose learned and true returns are correlated "
        "(reward/game_pearson, reward/game_spearman; 0: off); reads the replay, never changes the run",
    )
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
        "--fire-after-life-loss, and SoBiRL's --reference-pi-scale (docs/algorithms.md §6)",
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
        "scored_games",
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
            "scored_games",
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
        # The next step of that iteration, one of STAGES (a checkpoint resumes there).
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
        # Each queried pair's id is the number of pairs queried before it (label logs are keyed by it).
        self.pairs_queried = 0
        self.queries: PairBatch | None = None  # the pairs queried this iteration, until the teacher has them
        self.teacher = make_teacher(args)
        # The one hook for an algorithm's own state (its generators, a second agent): name -> an object with
        # state_dict() and load_state_dict(state), kept in every checkpoint under "parts". A loss with state joins.
        self.checkpointed: dict[str, Stateful] = {"loss": loss_fn} if hasattr(loss_fn, "state_dict") else {}

    @property
    def global_step(self) -> int:
        return self.trainer.global_step

    @property
    def last_score(self) -> float | None:
        """The true return of the latest finished game of the agent the reward trains."""
        return self.trainer.last_score

    STAGES = ("query", "label", "reward", "agent")  # one outer iteration, in the order of the paper's Algorithm 3

    def train(self) -> None:
        """The outer loop: each iteration queries, labels, trains the reward and then the agent, from whichever
        stage a checkpoint stopped in."""
        total = self.args.total_timesteps
        self.open_teacher()
        while True:
            if self.stage == "query":
                self.queries = self.query(self.new_pairs())
                self.stage = "label"
            if self.stage == "label":
                labelled = self.label(self.queries)  # a resumed label step (a person's pending pairs) gets None
                self.pairs.add(labelled)
                self.queries = None
                self.stage, self.epochs_done = "reward", 0
            if self.stage == "reward":
                self.train_reward()
                self.agent_phase_end = min(self.global_step + self.args.inner_steps, total)
                self.stage = "agent"
            if self.stage == "agent":
                self.train_agent()
                self.log_fresh_accuracy()
                if self.global_step >= total:
                    return
                self.iteration += 1
                self.stage = "query"

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

    def sample_pairs(
        self, count: int, window_steps: int, generator: torch.Generator, trainer: sac.SACTrainer | None = None
    ) -> PairBatch:
        """`count` pairs of random fragments from the latest `window_steps` env steps of `trainer` (default: the
        agent whose policy the reward trains)."""
        trainer = trainer or self.trainer
        fragments = trainer.recent_fragments(2 * count, self.args.fragment_length, window_steps, generator)
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
        """The teacher's labels for `queries` (None: continue a label step a checkpoint interrupted): the pairs to
        store, labels set. Every queried pair takes an id, whether the teacher keeps it or not."""
        ids = []
        if queries is not None:
            ids = list(range(self.pairs_queried, self.pairs_queried + len(queries)))
            self.pairs_queried += len(queries)
        signals = self.run.signals
        context = LabelContext(
            self.label_generator,
            self.iteration == 0,
            lambda: signals.signum is not None,
            signals.check,
            self.run.progress.set_phase,
        )
        started = time.time()
        labelled, counts = self.teacher.label(queries, ids, context)
        self.run.progress.exclude_from_eta(time.time() - started)  # a person's answers take minutes
        if counts:
            self.log_label_step(**counts)
        return labelled if labelled is not None else self.pairs.get(torch.zeros(0, dtype=torch.long))

    def open_teacher(self) -> None:
        """Start the teacher (a person's labelling page); pairs answered while the run was stopped are stored."""
        self.pairs_queried, answered = self.teacher.open(self.run.directory, self.pairs_queried)
        if answered is not None:
            self.pairs.add(answered)

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
                        getattr(self.loss_fn, "policy_probs", None) or self.trainer.policy_probs,
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
        log("reward/pairs_queried", self.pairs_queried, step)
        log("reward/new_pairs", self.new_pairs(), step)
        log("reward/iteration", self.iteration + 1, step)

    def log_fresh_accuracy(self) -> None:
        """How the reward model the policy has just trained on scores the policy's own latest play: its accuracy and
        the correlation of learned with true returns on fresh fragment pairs, and the same correlations over the
        whole games of the latest agent phase. Draws only from its own generator, so the run is unchanged."""
        step, log = self.global_step, self.run.logger.scalar
        if self.args.fresh_pairs > 0:
            p = self.sample_pairs(self.args.fresh_pairs, self.args.inner_steps, self.fresh_generator)
            predicted1, predicted2 = predicted_returns(self.reward_net, p.frames1, p.actions1, p.frames2, p.actions2)
            score, counted = oracle_agreement(predicted1, predicted2, p.returns1, p.returns2)
            log("reward/accuracy_fresh", float(score) / int(counted) if int(counted) else math.nan, step)
            learned = torch.cat([predicted1, predicted2]).cpu().numpy()
            true = torch.cat([p.returns1, p.returns2]).cpu().numpy()
            log("reward/fresh_pearson", pearson(learned, true), step)
            log("reward/fresh_spearman", spearman(learned, true), step)
            if len(self.members) > 1:
                disagreement = ensemble_uncertainty(self.members, p, "disagreement")
                log("reward/ensemble_disagreement", float(disagreement.mean()), step)
        if self.args.scored_games > 0:
            learned, true = self.whole_game_returns(self.args.scored_games)
            log("reward/games_scored", len(true), step)
            log("reward/game_pearson", pearson(learned, true), step)
            log("reward/game_spearman", spearman(learned, true), step)

    def whole_game_returns(self, max_games: int) -> tuple[np.ndarray, np.ndarray]:
        """(learned, true) returns of the newest whole games of the latest agent phase: the sums over each game of
        r_phi(s_t, a_t) and of the clipped game reward the teacher sees."""
        replay = self.trainer.buffer
        steps_per_env = -(-self.phase_steps() // self.args.num_envs)
        slot, env, lengths = replay.completed_games(steps_per_env, max_games)
        learned = learned_returns_of_steps(
            self.reward_net, lambda index: replay.stacks(slot[index], env[index]), replay.actions[slot, env], lengths
        )
        group = torch.repeat_interleave(torch.arange(len(lengths), device=slot.device), lengths)
        true = torch.zeros(len(lengths), device=slot.device).index_add_(0, group, replay.rewards[slot, env])
        return learned.cpu().numpy(), true.cpu().numpy()

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
            "pending_pairs": self.teacher.state_dict(),
            **{name: getattr(self, name).get_state() for name in self._GENERATORS},
            "parts": {name: part.state_dict() for name, part in self.checkpointed.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        self.trainer.load_state_dict(state["sac"])
        self.iteration, self.stage = int(state["iteration"]), state["stage"]
        # A resume may lower --total-timesteps: the phase in progress then ends at the new total.
        self.epochs_done = int(state["epochs_done"])
        self.agent_phase_end = min(int(state["agent_phase_end"]), self.args.total_timesteps)
        self.reward_net.load_state_dict(state["reward_net"])
        self.reward_net.eval()
        saved_optimizers = state.get("reward_optimizers") or [state["reward_optimizer"]]  # before --ensemble: one
        for optimizer, saved in zip(self.optimizers, saved_optimizers, strict=True):
            optimizer.load_state_dict(saved)
        self.pairs.load_state_dict(state["pairs"])
        self.pairs_queried = int(state.get("pairs_queried", 0))
        if state.get("pending_pairs") is not None:
            self.teacher.load_state_dict(state["pending_pairs"], self.device)
        for name in self._GENERATORS:
            getattr(self, name).set_state(state[name].cpu())
        parts = state.get("parts", {})
        for name, part in self.checkpointed.items():
            if name not in parts and part.state_dict() == {}:
                continue  # nothing to restore (a checkpoint from before the part existed, or a part without state)
            if name not in parts:
                raise UsageError(
                    f"--resume: the checkpoint holds no {name!r} state (written before this algorithm kept it); "
                    "start the run again"
                )
            part.load_state_dict(parts[name])

    def close(self) -> None:
        try:
            self.teacher.close()
        finally:
            self.trainer.close()


def run_preference_rl(
    algo: str,
    args_cls: type[PreferenceArgs],
    argv: Sequence[str] | None,
    make_loss: Callable[[PreferenceArgs, sac.SACTrainer], RewardLoss],
    description: str | None = None,
) -> PreferenceLearner:
    """Parse, validate, build and run a preference algorithm to completion: the shared pipeline with its loss."""
    enable_huge_pages()

    def build(args: PreferenceArgs, device: torch.device, run: Run) -> PreferenceLearner:
        trainer = sac.SACTrainer(args, device, run)
        try:
            return PreferenceLearner(args, trainer, make_loss(args, trainer), run)
        except BaseException:
            trainer.close()
            raise

    return launch(algo, args_cls, argv, description, build)
