"""SAC-discrete (Christodoulou 2019): the lower level every preference algorithm shares, and the whole of the
true-reward baseline (`agents/sac_discrete.py` runs it).

`SACDiscrete` holds the networks, optimizers and update rule; `SACTrainer` steps a vector env, stores transitions and
updates. The reward in the critic target is pluggable: the environment's clipped reward by default, or a learned
r_phi(s, a) handed over with `set_reward`, evaluated on every sampled batch (clamped to [-1, 1]), which relabels the
whole replay for free.
"""

from __future__ import annotations

import copy
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F

from agents.infra.checkpoint import restore_rng_state, rng_state
from agents.infra.cli import (
    UsageError,
    flag,
    require,
    require_folder_name,
    require_non_negative,
    require_positive,
)
from agents.infra.memory import require_memory
from agents.infra.run import Run, detached_run, limit_cpu_threads
from agents.lower.evaluation import play_games
from agents.lower.networks import Actor, SoftQNetwork, encoder_for
from agents.lower.replay import Batch, Fragments, FrameReplayBuffer
from agents.lower.step_graph import StepGraph
from wrappers import make_envs
from wrappers.video import record_greedy_episode

RewardFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
ALGO = "sac"


# np.random.seed takes seeds below 2**32 (environment seeds derived from it are folded into ALE's range).
MAX_SEED = 2**32 - 1


@dataclass
class Args:
    exp_name: str = flag("sac_discrete", "name of this experiment (part of the run name)")
    seed: int = flag(1, "seed of the experiment (environments, networks, sampling)")
    torch_deterministic: bool = flag(True, "set torch.backends.cudnn.deterministic")
    cuda: bool = flag(True, "use CUDA when available")
    compile: bool = flag(
        False,
        "torch.compile the SAC update (and the reward-model update): same math, less "
        "per-operation overhead; compiling takes a minute at start-up",
    )
    track: bool = flag(False, "mirror the TensorBoard logs to Weights & Biases")
    wandb_project_name: str = flag("sobirl", "W&B project name (with --track)")
    wandb_entity: str = flag("", "W&B entity (team), empty for the default")
    capture_video: bool = flag(
        False, "record a video of a greedy game under videos/{run_name} at each evaluation and at the end"
    )
    runs_dir: str = flag("runs", "directory for TensorBoard runs")
    run_name: str = flag(
        "",
        "the run's folder under --runs-dir (empty: {env_id}__{exp_name}__{seed}__{unix time}); a folder that "
        "already holds files is refused (continue a stopped run with --resume)",
    )
    progress: bool = flag(True, "show a progress bar")
    save_every: int = flag(
        100_000,
        "env steps between checkpoints in the run directory, besides the ones written when "
        "the run is stopped (SIGINT, SIGTERM) and at its end (0: only those)",
    )
    save_replay: bool = flag(True, "include the replay buffer in checkpoints (without it a resumed run refills it)")
    resume: str = flag("", "continue the run of this checkpoint (or run directory), with its flags")
    eval_every: int = flag(0, "env steps between evaluations on a separate environment (0: never)")
    eval_episodes: int = flag(
        5, "games per evaluation (one per parallel env), played with sampled and with greedy actions"
    )

    # Algorithm specific arguments
    env_id: str = flag("BeamRiderNoFrameskip-v4", "environment id")
    num_envs: int = flag(1, "number of parallel environments")
    total_timesteps: int = flag(4_300_000, "total environment steps, over all environments (the paper's 4.3M)")
    buffer_size: int = flag(1_000_000, "replay capacity in transitions, over all environments")
    gamma: float = flag(0.99, "discount factor")
    batch_size: int = flag(64, "minibatch size of an update")
    learning_starts: int = flag(20_000, "environment steps of uniform random actions before learning starts")
    policy_lr: float = flag(1e-4, "actor learning rate")
    q_lr: float = flag(1e-4, "critic and temperature learning rate")
    adam_eps: float = flag(1e-4, "Adam epsilon of all optimizers")
    anneal_steps: int = flag(8_000_000, "learning rates decay linearly to 0 at this env step (0 disables annealing)")
    update_frequency: int = flag(4, "environment steps (over all envs) per gradient update")
    target_network_frequency: int = flag(8_000, "environment steps between hard target-network copies")
    alpha: float = flag(1.0, "initial entropy temperature (fixed when --no-autotune)")
    autotune: bool = flag(True, "tune the temperature towards the target entropy")
    target_entropy_scale: float = flag(0.89, "target entropy = scale * ln(number of actions)")
    max_episode_frames: int = flag(108_000, "emulator frames after which a game is truncated (ALE's default)")
    log_every: int = flag(100, "gradient updates between loss logs (metrics stay on the device in between)")
    graph_ready: bool = flag(
        False,
        "the GPU path (issue 33; not yet measured on a GPU): act without host checks (argmax(p / Exp(1)), the "
        "draws torch.multinomial makes on CPU) with one read-back per vector step; run the K updates of a vector "
        "step without host syncs (replay size on the device, capturable optimizers, learning rates as tensors); "
        "on CUDA capture them once in a CUDA graph and replay it. Replay sampling draws from another random stream "
        "than the default path",
    )
    async_envs: str = flag(
        "auto",
        "with --graph-ready on Atari: step the emulators between the vector env's send and recv while the vector "
        "step's updates run (issue 33; not yet measured on a GPU), computing exactly what the synchronous order "
        "does. auto: on with --graph-ready on CUDA on Atari, else off (on CPU the updates and the emulator threads "
        "share the same cores); on: refused on MinAtar (no send/recv) and without --graph-ready",
        choices=("auto", "on", "off"),
    )
    fire_after_life_loss: bool = flag(
        False,
        "Atari: press FIRE after every lost life, as SB3's AtariWrapper (the "
        "authors' code) does; ale-py fires only at a game's start. Needs --num-envs 1",
    )

    # Flags a resumed run may change; every other flag is the run's identity (agents/infra/run.py).
    RESUMABLE: ClassVar[frozenset[str]] = frozenset(
        {
            "total_timesteps",
            "save_every",
            "save_replay",
            "eval_every",
            "eval_episodes",
            "log_every",
            "progress",
            "cuda",
            "compile",
            "async_envs",  # the overlapped order computes what the synchronous one does
            "track",
            "wandb_project_name",
            "wandb_entity",
            "capture_video",
            "runs_dir",
            "run_name",
        }
    )

    def __post_init__(self):
        pass  # subclasses expand presets here (--reference-quirks)

    def validate(self) -> None:
        require_positive(
            self,
            "num_envs",
            "total_timesteps",
            "buffer_size",
            "batch_size",
            "update_frequency",
            "target_network_frequency",
            "policy_lr",
            "q_lr",
            "adam_eps",
            "alpha",
            "log_every",
            "max_episode_frames",
            "eval_episodes",
        )
        require_non_negative(self, "learning_starts", "save_every", "eval_every", "anneal_steps")
        require(0 <= self.seed <= MAX_SEED, f"--seed must be in [0, {MAX_SEED}] (numpy's seeds), got {self.seed}")
        require_folder_name(self, "runs_dir")
        require(
            "/" not in self.run_name and self.run_name not in (".", ".."),
            f"--run-name {self.run_name!r} must be one folder name (no '/')",
        )
        if self.capture_video:
            needed = {"moviepy": "moviepy", "cv2": "opencv-python-headless"}  # module -> package
            missing = [package for module, package in needed.items() if importlib.util.find_spec(module) is None]
            require(not missing, f'--capture-video needs {" and ".join(missing)}: pip install -e ".[video]"')
        require(0.0 <= self.gamma < 1.0, f"--gamma must be in [0, 1), got {self.gamma}")
        require(
            self.batch_size <= self.buffer_size,
            f"--batch-size {self.batch_size} is larger than --buffer-size {self.buffer_size}",
        )
        if self.async_envs == "on":
            require(self.graph_ready, "--async-envs on needs --graph-ready (the overlapped order runs its updates)")
            require(
                not self.env_id.startswith("MinAtar/"),
                f"--async-envs on: {self.env_id} steps synchronously (MinAtar has no send/recv); use --async-envs off",
            )
        require(
            0.0 < self.target_entropy_scale <= 1.0,
            f"--target-entropy-scale must be in (0, 1], got {self.target_entropy_scale}",
        )

    def budget_notes(self) -> list[str]:
        """Settings that are valid but probably not what was meant: printed as notes when the run starts."""
        notes = []
        if self.total_timesteps <= self.learning_starts:
            notes.append(
                f"--total-timesteps {self.total_timesteps} ends before --learning-starts {self.learning_starts}: every "
                f"action is uniformly random and the agent never updates"
            )
        return notes


# ALGO LOGIC: the losses, as pure functions of tensors.


def target_entropy(num_actions: int, scale: float) -> float:
    """Christodoulou's target: a fraction of the maximum entropy ln|A|."""
    return scale * float(np.log(num_actions))


def soft_state_value(
    probs: torch.Tensor, log_probs: torch.Tensor, q: torch.Tensor, alpha: float | torch.Tensor
) -> torch.Tensor:
    """V(s) = sum_a pi(a|s) (Q(s, a) - alpha log pi(a|s)), exact for discrete actions."""
    return (probs * (q - alpha * log_probs)).sum(-1)


def critic_target(
    rewards: torch.Tensor, terminated: torch.Tensor, next_value: torch.Tensor, gamma: float
) -> torch.Tensor:
    """y = r + gamma (1 - terminated) V(s'); a truncated episode still bootstraps."""
    return rewards + gamma * (1.0 - terminated) * next_value


def critic_losses(
    q1_taken: torch.Tensor, q2_taken: torch.Tensor, target: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return F.mse_loss(q1_taken, target), F.mse_loss(q2_taken, target)


def actor_loss(
    probs: torch.Tensor, log_probs: torch.Tensor, q: torch.Tensor, alpha: float | torch.Tensor
) -> torch.Tensor:
    """E_s sum_a pi(a|s)(alpha log pi(a|s) - Q(s, a)), averaged over batch x actions as the paper's code does."""
    return (probs * (alpha * log_probs - q)).mean()


def alpha_loss(
    probs: torch.Tensor, log_probs: torch.Tensor, log_alpha: torch.Tensor, entropy_target: float
) -> torch.Tensor:
    """Raises alpha while the policy entropy is below the target, lowers it above (batch x actions mean)."""
    return (probs.detach() * (-log_alpha.exp() * (log_probs.detach() + entropy_target))).mean()


def annealed_lr(base_lr: float, global_step: int, anneal_steps: int) -> float:
    """Linear decay from base_lr at step 1 to 0 at `anneal_steps` (the paper's code: 1 - (step - 1) / 8e6)."""
    if anneal_steps <= 0:
        return base_lr
    return base_lr * max(0.0, 1.0 - (global_step - 1.0) / anneal_steps)


def check_env_spaces(env_id: str, action_space: gym.Space, observation_space: gym.Space) -> tuple[int, tuple[int, ...]]:
    """(number of actions, observation shape), or a UsageError naming the env when the networks cannot take it."""
    require(
        isinstance(action_space, gym.spaces.Discrete),
        f"--env-id {env_id}: SAC-discrete needs a discrete action space, got {action_space}",
    )
    obs_shape = tuple(observation_space.shape or ())
    try:
        encoder_for(obs_shape)
    except ValueError as err:
        raise UsageError(f"--env-id {env_id}: {err}") from None
    return int(action_space.n), obs_shape


class SACDiscrete:
    """Networks, optimizers and the update rule; knows nothing about environments."""

    def __init__(self, obs_shape: tuple[int, ...], num_actions: int, args: Args, device: torch.device):
        self.args = args
        self.device = device
        self.actor = Actor(obs_shape, num_actions).to(device).use_fastest_layout()
        self.qf1 = SoftQNetwork(obs_shape, num_actions).to(device).use_fastest_layout()
        self.qf2 = SoftQNetwork(obs_shape, num_actions).to(device).use_fastest_layout()
        self.qf1_target = copy.deepcopy(self.qf1)
        self.qf2_target = copy.deepcopy(self.qf2)
        self.graph_ready = getattr(args, "graph_ready", False)
        # --graph-ready: each optimizer's learning rate is a tensor on the device, refreshed in place by
        # `set_learning_rates` (outside any CUDA graph), and the optimizers are capturable. On CPU the tensor is
        # float64, so the fused kernel reads exactly the float the default path passes; on CUDA float32, what the
        # fused CUDA kernel computes in anyway.
        lr_dtype = torch.float64 if device.type == "cpu" else torch.float32
        self.lr_tensors = (
            {name: torch.tensor(0.0, dtype=lr_dtype, device=device) for name in ("q", "actor", "alpha")}
            if self.graph_ready
            else {}
        )
        # fused: one kernel for all parameters; the per-tensor loop costs more than a convolution on a 2-core CPU.
        adam = lambda params, lr, name: torch.optim.Adam(
            params,
            lr=self.lr_tensors[name].fill_(lr) if self.graph_ready else lr,
            eps=args.adam_eps,
            fused=True,
            capturable=self.graph_ready,
        )
        self.q_optimizer = adam(list(self.qf1.parameters()) + list(self.qf2.parameters()), args.q_lr, "q")
        self.actor_optimizer = adam(self.actor.parameters(), args.policy_lr, "actor")
        self.entropy_target = target_entropy(num_actions, args.target_entropy_scale)
        self.log_alpha = torch.tensor(float(np.log(args.alpha)), device=device, requires_grad=True)
        self.alpha_optimizer = adam([self.log_alpha], args.q_lr, "alpha")
        # --compile: the loss functions are compiled (forward and backward graphs); the eager ones stay the reference.
        self._critic_loss = torch.compile(self.critic_loss) if args.compile else self.critic_loss
        self._actor_and_alpha_losses = (
            torch.compile(self.actor_and_alpha_losses) if args.compile else self.actor_and_alpha_losses
        )

    @property
    def alpha(self) -> float:
        return float(self.log_alpha.detach().exp())

    def _optimizers(self) -> tuple[tuple[str, torch.optim.Optimizer, float], ...]:
        a = self.args
        return (
            ("q", self.q_optimizer, a.q_lr),
            ("actor", self.actor_optimizer, a.policy_lr),
            ("alpha", self.alpha_optimizer, a.q_lr),
        )

    def set_learning_rates(self, global_step: int) -> None:
        for name, optimizer, base in self._optimizers():
            lr = annealed_lr(base, global_step, self.args.anneal_steps)
            if self.graph_ready:
                self.lr_tensors[name].fill_(lr)  # in place: a captured update reads it at every replay
            else:
                optimizer.param_groups[0]["lr"] = lr

    def _bind_learning_rate_tensors(self) -> None:
        """Point every optimizer at this agent's learning-rate tensors again (loading an optimizer's state replaces
        its param group's `lr` with the checkpoint's object)."""
        for name, optimizer, _ in self._optimizers():
            loaded = optimizer.param_groups[0]["lr"]
            self.lr_tensors[name].fill_(float(loaded))
            optimizer.param_groups[0]["lr"] = self.lr_tensors[name]

    @torch.no_grad()
    def act(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample actions from the current policy; returns them and the probability each was chosen with."""
        probs, _ = self.actor.probs(obs)
        actions = torch.multinomial(probs, 1)
        return actions.squeeze(-1), probs.gather(1, actions).squeeze(-1)

    @torch.no_grad()
    def act_packed(self, obs: torch.Tensor) -> torch.Tensor:
        """--graph-ready's act: a (2, N) float32 tensor on the device, the sampled actions (exact in float32) over
        the probability each was chosen with, so one copy brings both to the host.

        The action is argmax(p / E) with E ~ Exp(1) drawn from the default generator: torch.multinomial's own
        algorithm for one sample (pytorch's Distributions.cpp) without its host-side checks of p, which read values
        back. On CPU it reproduces multinomial's draws for the same generator state (tests/test_graph_ready.py);
        on CUDA the two consume the generator alike but were not compared.
        """
        probs, _ = self.actor.probs(obs)
        actions = (probs / torch.empty_like(probs).exponential_()).argmax(-1, keepdim=True)
        return torch.cat([actions.to(probs.dtype), probs.gather(1, actions)], dim=1).T

    def critic_loss(self, batch: Batch, rewards: torch.Tensor, alpha: torch.Tensor):
        """Twin soft-Q regression onto r + gamma (1 - terminated) V_target(s'); returns (loss, metrics)."""
        with torch.no_grad():
            next_probs, next_log_probs = self.actor.probs(batch.next_obs)
            next_q = torch.min(self.qf1_target(batch.next_obs), self.qf2_target(batch.next_obs))
            target = critic_target(
                rewards, batch.terminated, soft_state_value(next_probs, next_log_probs, next_q, alpha), self.args.gamma
            )
        actions = batch.actions[:, None]
        q1_taken = self.qf1(batch.obs).gather(1, actions).squeeze(1)
        q2_taken = self.qf2(batch.obs).gather(1, actions).squeeze(1)
        qf1_loss, qf2_loss = critic_losses(q1_taken, q2_taken, target)
        metrics = {
            "losses/qf1_values": q1_taken.mean().detach(),
            "losses/qf2_values": q2_taken.mean().detach(),
            "losses/qf1_loss": qf1_loss.detach(),
            "losses/qf2_loss": qf2_loss.detach(),
            "losses/qf_loss": ((qf1_loss + qf2_loss) / 2.0).detach(),
        }
        return qf1_loss + qf2_loss, metrics

    def actor_and_alpha_losses(self, obs: torch.Tensor, alpha: torch.Tensor):
        """The policy loss against the (just updated) critics and the temperature loss; returns both and metrics."""
        probs, log_probs = self.actor.probs(obs)
        with torch.no_grad():
            q = torch.min(self.qf1(obs), self.qf2(obs))
        policy_loss = actor_loss(probs, log_probs, q, alpha)
        temperature_loss = alpha_loss(probs, log_probs, self.log_alpha, self.entropy_target)
        metrics = {
            "losses/actor_loss": policy_loss.detach(),
            "losses/alpha_loss": temperature_loss.detach(),
            "losses/entropy": -(probs * log_probs).sum(-1).mean().detach(),
        }
        return policy_loss, temperature_loss, metrics

    def policy_losses(self, obs: torch.Tensor, alpha: torch.Tensor):
        """The actor and temperature losses an update descends (compiled with --compile); a subclass adds terms of
        its own here."""
        return self._actor_and_alpha_losses(obs, alpha)

    def update(self, batch: Batch, rewards: torch.Tensor) -> dict[str, torch.Tensor]:
        """One critic, actor and temperature step on `batch` with the given (already clamped) rewards; returns
        detached metrics (read them only now and then: on a GPU each read waits for the device)."""
        alpha = self.log_alpha.exp().detach()
        critic_loss, metrics = self._critic_loss(batch, rewards, alpha)
        self.q_optimizer.zero_grad(set_to_none=True)
        critic_loss.backward()
        self.q_optimizer.step()

        policy_loss, temperature_loss, actor_metrics = self.policy_losses(batch.obs, alpha)
        # One backward for both: the temperature loss sees the policy only through detached probabilities, so the
        # actor's gradient is the policy loss's alone and log alpha's the temperature loss's alone.
        self.actor_optimizer.zero_grad(set_to_none=True)
        self.alpha_optimizer.zero_grad(set_to_none=True)
        (policy_loss + temperature_loss if self.args.autotune else policy_loss).backward()
        self.actor_optimizer.step()
        if self.args.autotune:
            self.alpha_optimizer.step()
        return {**metrics, **actor_metrics, "losses/alpha": alpha}

    def state_dict(self) -> dict:
        nets = ("actor", "qf1", "qf2", "qf1_target", "qf2_target", "q_optimizer", "actor_optimizer", "alpha_optimizer")
        return {"log_alpha": self.log_alpha.detach().cpu(), **{name: getattr(self, name).state_dict() for name in nets}}

    def load_state_dict(self, state: dict) -> None:
        for name, value in state.items():
            if name == "log_alpha":
                with torch.no_grad():
                    self.log_alpha.copy_(value)
            else:
                getattr(self, name).load_state_dict(value)
        if self.graph_ready:
            self._bind_learning_rate_tensors()

    def copy_targets(self) -> None:
        if self.graph_ready:
            # The same values, copied into the targets' own storage in one call (a captured update reads them there).
            with torch.no_grad():
                targets = [*self.qf1_target.state_dict().values(), *self.qf2_target.state_dict().values()]
                torch._foreach_copy_(targets, [*self.qf1.state_dict().values(), *self.qf2.state_dict().values()])
            return
        self.qf1_target.load_state_dict(self.qf1.state_dict())
        self.qf2_target.load_state_dict(self.qf2.state_dict())


def crossed(previous_step: int, step: int, every: int) -> bool:
    """Whether a multiple of `every` lies in (previous_step, step]; never for every = 0."""
    return every > 0 and step // every > previous_step // every


class SACTrainer:
    """SAC-discrete on a vector env. `train()` runs to --total-timesteps; an outer loop (the preference algorithms)
    instead calls `collect(n)` to continue the same games for n more env steps between its own phases, with the
    reward it sets through `set_reward`, and reads the latest rollouts back with `recent_fragments`."""

    def __init__(self, args: Args, device: torch.device, run: Run | None = None):
        """Builds environments, networks and replay (raising UsageError for bad settings) before any run directory
        exists."""
        self.args = args
        self.device = device
        self.run = run or detached_run(args, ALGO)
        self.envs = self._make_envs(args.seed)
        self.num_actions, self.obs_shape = check_env_spaces(
            args.env_id, self.envs.single_action_space, self.envs.single_observation_space
        )
        limit_cpu_threads(self.obs_shape)
        stack = self.envs.frame_stack
        try:
            # Checked before anything large is allocated: the buffer's pages fill in as steps are stored, so an
            # oversized one would otherwise start fine and run out of memory hours later.
            require_memory(
                "--buffer-size",
                args.buffer_size,
                "a full replay buffer",
                FrameReplayBuffer.bytes_needed(args.buffer_size, args.num_envs, self.obs_shape, stack),
                device,
            )
        except ValueError as err:
            raise UsageError(str(err)) from None
        self.agent = SACDiscrete(self.obs_shape, self.num_actions, args, device)
        self.overlapped = self._overlapped_order()
        try:
            self.buffer = FrameReplayBuffer(args.buffer_size, args.num_envs, self.obs_shape, stack, device)
        except ValueError as err:
            raise UsageError(f"--buffer-size: {err}") from None
        self._reward_fn: RewardFn | None = None
        self._reward_stats: torch.Tensor | None = None
        self.global_step = 0
        self.num_updates = 0
        self._replay_ready = False
        self.rng = np.random.default_rng(args.seed)
        self.sample_generator = torch.Generator(device=device)
        self.sample_generator.manual_seed(args.seed)
        self.obs, _ = self.envs.reset()
        self.autoreset = np.zeros(args.num_envs, dtype=bool)
        self.last_score: float | None = None
        self._speed_logged_at: int | None = None  # the step of the last charts/SPS point
        self._random_prob = np.full(args.num_envs, 1.0 / self.num_actions, dtype=np.float32)
        self._obs_staging: tuple[torch.Tensor, torch.Tensor] | None = None  # --graph-ready on CUDA: pinned, device
        # --graph-ready: the learned reward's running sums since the last log, and the update count, on the device.
        self._reward_sums = torch.zeros(4, device=device)
        self._updates_t = torch.zeros((), dtype=torch.int64, device=device)
        self._step_graph: StepGraph | None = None

    def _make_envs(self, seed: int):
        a = self.args
        options = {"fire_after_life_loss": True} if a.fire_after_life_loss else {}
        if options and a.env_id.startswith("MinAtar/"):
            raise UsageError("--fire-after-life-loss: MinAtar games have no lives")
        return make_envs(a.env_id, a.num_envs, seed, max_episode_frames=a.max_episode_frames, **options)

    def _overlapped_order(self) -> bool:
        """Whether `collect` steps the envs between send and recv while it updates (--async-envs; see
        `_overlapped_step`). auto: with --graph-ready on CUDA, on an env that steps in the background (Atari)."""
        mode = getattr(self.args, "async_envs", "off")
        background = getattr(self.envs, "steps_in_background", False)
        if mode == "on":
            require(background, f"--async-envs on: the {self.args.env_id} envs have no send/recv")
            return True
        return mode == "auto" and self.agent.graph_ready and self.device.type == "cuda" and background

    # -- entry points for outer loops -----------------------------------------------------------------------------

    def set_reward(self, reward_fn: RewardFn | None) -> None:
        """Learn from r = reward_fn(obs, actions), clamped to [-1, 1], instead of the environment's reward."""
        self._reward_fn = reward_fn

    @property
    def alpha(self) -> float:
        return self.agent.alpha

    @torch.no_grad()
    def policy_probs(self, obs: torch.Tensor) -> torch.Tensor:
        """Current-policy action probabilities (N, A) for uint8 observations (N, *obs_shape)."""
        return self.agent.actor.probs(obs.to(self.device))[0]

    def steps_per_env_stored(self) -> int:
        """Complete transitions each env has in the replay (a fragment cannot be longer)."""
        return max(self.buffer.written - 1, 0)

    def collect_until_stored(self, steps_per_env: int) -> None:
        """Step the environments until each env has `steps_per_env` complete transitions stored (or the replay is
        full), without passing --total-timesteps."""
        target = min(steps_per_env, self.buffer.slots - 2)
        missing = target - (self.buffer.written - 1)  # the newest stored step's transition is not complete yet
        budget = self.args.total_timesteps - self.global_step  # a cap: never collect past it
        if missing > 0 and budget > 0:
            self.collect(min(missing * self.args.num_envs, budget))

    def recent_fragments(self, count: int, length: int, window_steps: int, generator: torch.Generator) -> Fragments:
        """`count` random `length`-step fragments from the latest `window_steps` env steps (over all envs). When episode
        ends leave no room for a whole fragment, the window is widened as far as the replay reaches and then, if still
        no game lasted `length` steps (short random-play games at a small label budget), the envs play on (twice the
        stored steps each time, within --total-timesteps and the replay) until one does."""
        self.collect_until_stored(length + 1)
        stored = self.steps_per_env_stored()
        if stored < length:
            if self.global_step >= self.args.total_timesteps:
                raise UsageError(
                    f"--total-timesteps {self.args.total_timesteps} ends before one fragment is collected: "
                    f"--fragment-length {length} needs {(length + 1) * self.args.num_envs} env steps"
                )
            raise UsageError(f"--fragment-length {length}: the run collected only {stored} steps per env")
        recent = min(max(length, -(-window_steps // self.args.num_envs)), stored)
        while True:
            fragments = self.buffer.recent_fragments(length, count, recent, generator)
            if fragments is not None:
                return fragments
            if recent < stored:
                recent = min(2 * recent, stored)
                continue
            self.collect_until_stored(2 * stored)
            if self.steps_per_env_stored() == stored:  # the budget or the replay is exhausted
                raise UsageError(
                    f"--fragment-length {length}: no {length}-step stretch inside one episode among the latest "
                    f"{stored} steps per env; use shorter fragments"
                )
            stored = recent = self.steps_per_env_stored()

    # -- the SAC loop ------------------------------------------------------------------------------------------------

    def train(self) -> None:
        self.collect(self.args.total_timesteps - self.global_step)
        if self.args.capture_video:
            self.record_video(self.args.seed)

    def _choose_actions(self) -> tuple[np.ndarray, np.ndarray]:
        """Actions and the probability the acting policy gave each (stored for off-policy corrections)."""
        if self.global_step < self.args.learning_starts:
            return self.rng.integers(0, self.num_actions, size=self.args.num_envs), self._random_prob
        if self.agent.graph_ready:
            packed = self.agent.act_packed(self._upload_obs()).cpu().numpy()  # the vector step's one host sync
            return packed[0].astype(np.int64), packed[1]
        actions, probs = self.agent.act(torch.as_tensor(self.obs, device=self.device))
        return actions.cpu().numpy(), probs.cpu().numpy()

    def _upload_obs(self) -> torch.Tensor:
        """The observations on the device; on CUDA through one pinned staging buffer (an asynchronous copy)."""
        if self.device.type != "cuda":
            return torch.as_tensor(self.obs, device=self.device)
        obs = np.asarray(self.obs)
        if self._obs_staging is None:
            host = torch.empty(obs.shape, dtype=torch.from_numpy(obs[:0]).dtype, pin_memory=True)
            self._obs_staging = host, torch.empty_like(host, device=self.device)
        host, device_obs = self._obs_staging
        host.numpy()[...] = obs  # the previous step's copy has finished: its actions were read back since
        return device_obs.copy_(host, non_blocking=True)

    def collect(self, num_steps: int) -> None:
        """Continue for `num_steps` environment steps (rounded up to whole vector steps), learning as it goes."""
        a, run = self.args, self.run
        end = self.global_step + num_steps
        if self.global_step < end:
            run.progress.set_phase("random" if self.global_step < a.learning_starts else "sac")
        while self.global_step < end:
            run.signals.check()
            actions, behaviour = self._choose_actions()
            previous_step = self.global_step
            if self.overlapped:
                info = self._overlapped_step(actions, behaviour)
            else:
                next_obs, rewards, terminated, truncated, info = self.envs.step(actions)
                self.buffer.add(self.obs, actions, rewards, terminated, self.autoreset, behaviour)
                self.obs, self.autoreset = next_obs, info["game_over"]
                self.global_step += a.num_envs
                self._log_games(info)
                self._learn(previous_step)
            if self.global_step % 1000 < a.num_envs:
                self._log_speed()
            if crossed(previous_step, self.global_step, a.eval_every):
                self.evaluate()
            # The run's last step saves at its end anyway (agents.infra.run.run_to_completion): not twice.
            if crossed(previous_step, self.global_step, a.save_every) and self.global_step < a.total_timesteps:
                run.save()
        self._log_speed()

    def _overlapped_step(self, actions: np.ndarray, behaviour: np.ndarray) -> dict:
        """One vector step in the overlapped order (--async-envs): the emulators step between `send` and `recv` while
        the vector step's updates run; returns the step's info.

        The same transitions are sampleable at every update as in the synchronous order (step; `buffer.add`; update),
        and everything an update reads is the same:
        * there, the update follows `add` of step t, which stores obs_t's frame, a_t and mu(a_t|s_t) in slot t and
          thereby makes transition t-1 (obs_{t-1}, a_{t-1}, r_{t-1}, obs_t) sampleable: its reward and termination
          were stored by step t-1's `add`. Transition t is not sampleable (obs_{t+1} is not stored), and once the ring
          is full slots t+1..t+stack-1 are not either. So the update samples transitions up to t-1, reads frames up
          to slot t and the rewards and terminations of slots up to t-1; r_t and terminated_t are never read;
        * here, `add_step` (before `send`) does exactly `add`'s part that needs no outcome of step t: slot t's frame,
          action, probability and game-start flags, transition t-1 made sampleable, the write head moved on. The
          updates then see the sampleable set, frames, slot t-1's reward and the write head the synchronous update
          sees; `add_outcome` stores r_t and terminated_t after `recv`, before the next update (the next vector
          step's), as `add` would have before it. Meanwhile slot t holds an older (or unwritten) reward: an update
          could read it only if rejection sampling ran short of sampleable draws and kept an unsampleable slot,
          which `buffer.invalid_draws` counts (it stays 0; the tests check);
        * the step count, the learning rates, the update count K and the target copy follow from the step count
          alone, advanced before the updates as there; the policy acting at step t is the one after the updates of
          step t-1 in both orders; the random phase's actions come from the same generator, called in the same order.
        `add_step` reads `self.obs` before `send`, so an env that reused its output arrays while stepping would do no
        harm. tests/test_async_envs.py checks all of this against the synchronous loop."""
        a = self.args
        previous_step = self.global_step
        self.buffer.add_step(self.obs, actions, self.autoreset, behaviour)
        self.envs.send(actions)
        self.global_step += a.num_envs
        self._learn(previous_step)  # on CUDA: launched, then run by the GPU while the emulators step
        next_obs, rewards, terminated, truncated, info = self.envs.recv()
        self.buffer.add_outcome(rewards, terminated)
        self.obs, self.autoreset = next_obs, info["game_over"]
        self._log_games(info)
        return info

    def _learn(self, previous_step: int) -> None:
        """After a vector step from `previous_step` to `global_step`: its updates (1 per --update-frequency env steps)
        and the target copy, in the learning phase."""
        a, run = self.args, self.run
        if self.global_step > a.learning_starts:
            if previous_step <= a.learning_starts:
                run.progress.set_phase("sac")
            self.agent.set_learning_rates(self.global_step)
            updates = self.global_step // a.update_frequency - previous_step // a.update_frequency
            if self.agent.graph_ready:
                self._update_graph_ready(updates)
            else:
                for _ in range(updates):
                    self._update()
            if crossed(previous_step, self.global_step, a.target_network_frequency):
                self.agent.copy_targets()

    def _batch_rewards(self, batch: Batch) -> torch.Tensor:
        if self._reward_fn is None:
            return batch.rewards
        with torch.no_grad():
            raw = self._reward_fn(batch.obs, batch.actions).float()
            # Running sums on the device, read at the next log: how the learned reward looks to SAC.
            stats = torch.stack(
                [
                    raw.sum(),
                    raw.square().sum(),
                    (raw.abs() >= 1.0).float().sum(),
                    torch.tensor(float(raw.numel()), device=raw.device),
                ]
            )
            self._reward_stats = stats if self._reward_stats is None else self._reward_stats + stats
            return raw.clamp(-1.0, 1.0)

    def _log_reward_stats(self) -> None:
        if self._reward_stats is None:
            return
        self._write_reward_stats(self._reward_stats)
        self._reward_stats = None

    def _write_reward_stats(self, stats: torch.Tensor) -> None:
        total, squares, saturated, count = stats.tolist()
        mean = total / count
        for tag, value in (
            ("mean", mean),
            ("std", max(squares / count - mean * mean, 0.0) ** 0.5),
            ("saturated", saturated / count),
        ):
            self.run.logger.scalar(f"reward/sac_reward_{tag}", value, self.global_step)

    def _update(self) -> None:
        # Counting sampleable transitions scans the whole buffer (and syncs a GPU), so it is done only until the
        # buffer first holds a batch: it can fall short only right after resuming without the replay buffer.
        if not self._replay_ready:
            self._replay_ready = len(self.buffer) >= self.args.batch_size
            if not self._replay_ready:
                return
        batch = self.buffer.sample(self.args.batch_size, self.sample_generator)
        metrics = self.agent.update(batch, self._batch_rewards(batch))
        self.num_updates += 1
        if self.num_updates % self.args.log_every == 0:
            for tag, value in metrics.items():
                self.run.logger.scalar(tag, float(value), self.global_step)
            self._log_reward_stats()

    # -- --graph-ready: the K updates of a vector step without a host sync (captured as a CUDA graph on CUDA) --------

    def _batch_rewards_on_device(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`_batch_rewards` without host values: the clamped rewards and the learned reward's sums since the last
        logged update (what `_reward_stats` holds in the default path, summed in the same order), or None."""
        if self._reward_fn is None:
            return batch.rewards, None
        with torch.no_grad():
            raw = self._reward_fn(batch.obs, batch.actions).float()
            total = raw.sum()
            stats = torch.stack(
                [total, raw.square().sum(), (raw.abs() >= 1.0).float().sum(), torch.full_like(total, raw.numel())]
            )
            # The default path starts new sums after each logged update (every --log-every-th).
            after_log = (self._updates_t % self.args.log_every == 0) & (self._updates_t > 0)
            sums = torch.where(after_log, torch.zeros_like(stats), self._reward_sums) + stats
            self._reward_sums.copy_(sums)
            return raw.clamp(-1.0, 1.0), sums

    def updates_without_sync(self, k: int) -> list[tuple[dict[str, torch.Tensor], torch.Tensor | None]]:
        """k SAC updates (sampling, learned reward, critics, actor, temperature) that read nothing back to the host
        and build no tensor from a host value: what `step_graph` captures on CUDA. Returns each update's metrics and
        learned-reward sums (tensors; read them before the next call)."""
        results = []
        for _ in range(k):
            slot, env = self.buffer.sample_indices_on_device(self.args.batch_size, self.sample_generator)
            batch = self.buffer.batch_at(slot, env)
            rewards, sums = self._batch_rewards_on_device(batch)
            results.append((self.agent.update(batch, rewards), sums))
            self._updates_t += 1
        return results

    @property
    def step_graph(self) -> StepGraph:
        """The wrapper that runs (on CUDA: captures and replays) `updates_without_sync`, built at its first use, when
        the agent is final (a subclass may replace it after this class's __init__)."""
        if self._step_graph is None:
            self._step_graph = StepGraph(
                self.updates_without_sync,
                self.device,
                generators=[self.sample_generator],
                # Compiled losses, and a subclass's own policy losses (the penalty method reads its pool's size on
                # the host), run the same code eagerly instead.
                capture=not self.args.compile and type(self.agent).policy_losses is SACDiscrete.policy_losses,
            )
        return self._step_graph

    def _update_graph_ready(self, k: int) -> None:
        """What k calls of `_update` do, with the updates run by `step_graph` and the logs read afterwards."""
        if k <= 0:
            return
        if not self._replay_ready:
            self._replay_ready = len(self.buffer) >= self.args.batch_size
            if not self._replay_ready:
                return
        results = self.step_graph(k, key=id(self._reward_fn))
        for metrics, sums in results:
            self.num_updates += 1
            if self.num_updates % self.args.log_every == 0:
                for tag, value in metrics.items():
                    self.run.logger.scalar(tag, float(value), self.global_step)
                if sums is not None:
                    self._write_reward_stats(sums)

    def _log_games(self, info: dict) -> None:
        if "_episode" not in info:
            return
        for env in np.nonzero(info["_episode"])[0]:
            self.last_score = float(info["episode"]["r"][env])
            self.run.logger.scalar("charts/episodic_return", self.last_score, self.global_step)
            self.run.logger.scalar("charts/episodic_length", int(info["episode"]["l"][env]), self.global_step)
            self.run.logger.scalar(
                "charts/episodic_length_frames", int(info["episode"]["frames"][env]), self.global_step
            )

    def _log_speed(self) -> None:
        progress = self.run.progress
        # A phase ending on a multiple of 1000 steps would log its last point twice (in the loop and at its end).
        if self._speed_logged_at != self.global_step:
            self.run.logger.scalar("charts/SPS", progress.sps(self.global_step), self.global_step)
            self._speed_logged_at = self.global_step
        score = "-" if self.last_score is None else f"{self.last_score:.0f}"
        progress.update(self.global_step, f"score={score} alpha={self.alpha:.3f}")
        progress.refresh()

    def evaluate(self) -> None:
        """Play `eval_episodes` games on fresh environments with sampled and with greedy actions (and record a video
        of a greedy game with --capture-video)."""
        a = self.args
        seed = a.seed + 1_000_003 + self.global_step  # games never seen in training
        for tag, greedy in (("eval/episodic_return", False), ("eval/episodic_return_greedy", True)):
            envs = make_envs(a.env_id, a.eval_episodes, seed, max_episode_frames=a.max_episode_frames)
            scores = play_games(envs, self.agent.actor, self.device, greedy)
            envs.close()
            self.run.logger.scalar(tag, float(np.mean(scores)), self.global_step)
        if a.capture_video:
            self.record_video(seed)

    def record_video(self, seed: int) -> None:
        if self.args.env_id.startswith("MinAtar/"):
            print("--capture-video: MinAtar games have no renderer here; no video recorded")
            return
        run_name = self.run.directory.name if self.run.directory is not None else "detached"
        folder = f"videos/{run_name}/step_{self.global_step}"
        record_greedy_episode(
            self.args.env_id, self.agent.actor, self.device, folder, seed, self.args.max_episode_frames
        )

    # -- checkpoints ---------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "global_step": self.global_step,
            "num_updates": self.num_updates,
            "agent": self.agent.state_dict(),
            # One buffer.add per vector step: the count lets a checkpoint skip the chunks no add touched since.
            "replay": self.buffer.state_dict(self.global_step // self.args.num_envs) if self.args.save_replay else None,
            "rng": rng_state(self.rng, self.sample_generator),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from a checkpoint. Environments cannot be snapshotted, so the games in progress are abandoned
        and new ones start, seeded by the step count."""
        self.global_step = int(state["global_step"])
        self.num_updates = int(state["num_updates"])
        self.agent.load_state_dict(state["agent"])
        if state["replay"] is not None:
            try:
                self.buffer.load_state_dict(state["replay"])
            except ValueError as err:
                raise UsageError(f"--resume: {err}") from None
        self.buffer.break_episodes()
        self.buffer.sync_device_cursor()
        self._updates_t.fill_(self.num_updates)
        restore_rng_state(state["rng"], self.rng, self.sample_generator)
        self.envs.close()
        self.envs = self._make_envs(self.args.seed + self.global_step)
        self.obs, _ = self.envs.reset()
        self.autoreset[:] = False
        self.run.progress.restart_clock(self.global_step)

    def close(self) -> None:
        self.envs.close()
