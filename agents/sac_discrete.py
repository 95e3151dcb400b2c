"""SAC-discrete (Christodoulou 2019) on Atari: the lower level of SoBiRL and its ground-truth-reward baseline.

Defaults are the SoBiRL paper's settings (its code adapted CleanRL's sac_atari). The reward in the critic target
is pluggable: `SACTrainer.reward_fn = None` uses the environment's clipped reward; the preference algorithms set
it to a learned r_phi(s, a) evaluated on every sampled batch (clamped to [-1, 1]), which relabels the whole replay
buffer for free.

    python agents/sac_discrete.py --env-id BeamRiderNoFrameskip-v4 --total-timesteps 5000000
"""

from __future__ import annotations

import copy
import importlib.util
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from agents.checkpoint import CHECKPOINT_NAME, load_checkpoint, restore_rng_state, rng_state, save_atomic
from agents.common import (
    UsageError, explicit_flags, flag, hyperparameter_table, limit_cpu_threads, make_run_name, parse_args, pick_device, require,
    require_positive, run_cli, seed_everything,
)
from agents.networks import Actor, SoftQNetwork, encoder_for
from agents.replay import Batch, FrameReplayBuffer
from wrappers import make_envs

RewardFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Args:
    exp_name: str = flag("sac_discrete", "name of this experiment (part of the run name)")
    seed: int = flag(1, "seed of the experiment (environments, networks, sampling)")
    torch_deterministic: bool = flag(True, "set torch.backends.cudnn.deterministic")
    cuda: bool = flag(True, "use CUDA when available")
    track: bool = flag(False, "mirror the TensorBoard logs to Weights & Biases")
    wandb_project_name: str = flag("sobirl", "W&B project name (with --track)")
    wandb_entity: str = flag("", "W&B entity (team), empty for the default")
    capture_video: bool = flag(False, "record a video of a greedy game under videos/{run_name} at each evaluation and at the end")
    runs_dir: str = flag("runs", "directory for TensorBoard runs")
    progress: bool = flag(True, "show a progress bar")
    save_every: int = flag(0, "env steps between checkpoints in the run directory (0: only on Ctrl-C and at the end)")
    save_replay: bool = flag(True, "include the replay buffer in checkpoints (without it a resumed run refills it)")
    resume: str = flag("", "continue the run of this checkpoint (or run directory); other flags given override it")
    eval_every: int = flag(0, "env steps between evaluations on a separate environment (0: never)")
    eval_episodes: int = flag(5, "games per evaluation (one per parallel env), played with sampled and with greedy actions")

    # Algorithm specific arguments
    env_id: str = flag("BeamRiderNoFrameskip-v4", "environment id")
    num_envs: int = flag(1, "number of parallel environments")
    total_timesteps: int = flag(5_000_000, "total environment steps, over all environments")
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
    log_every: int = flag(100, "gradient updates between loss logs")


def validate(args: Args) -> None:
    require_positive(
        args, "num_envs", "total_timesteps", "buffer_size", "batch_size", "update_frequency",
        "target_network_frequency", "policy_lr", "q_lr", "adam_eps", "alpha", "log_every", "max_episode_frames",
    )
    require(args.learning_starts >= 0, f"--learning-starts must be non-negative, got {args.learning_starts}")
    if args.capture_video:
        require(importlib.util.find_spec("moviepy") is not None,
                '--capture-video needs moviepy: pip install -e ".[video]"')
    require(args.eval_episodes > 0, f"--eval-episodes must be positive, got {args.eval_episodes}")
    for name in ("save_every", "eval_every"):
        require(getattr(args, name) >= 0, f"--{name.replace('_', '-')} must be non-negative, got {getattr(args, name)}")
    require(args.anneal_steps >= 0, f"--anneal-steps must be non-negative, got {args.anneal_steps}")
    require(0.0 <= args.gamma < 1.0, f"--gamma must be in [0, 1), got {args.gamma}")
    require(
        args.batch_size <= args.buffer_size,
        f"--batch-size {args.batch_size} is larger than --buffer-size {args.buffer_size}",
    )
    require(0.0 < args.target_entropy_scale <= 1.0, f"--target-entropy-scale must be in (0, 1], got {args.target_entropy_scale}")


# ALGO LOGIC: the losses, as pure functions of tensors.


def target_entropy(num_actions: int, scale: float) -> float:
    """Christodoulou's target: a fraction of the maximum entropy ln|A|."""
    return scale * float(np.log(num_actions))


def soft_state_value(probs: torch.Tensor, log_probs: torch.Tensor, q: torch.Tensor, alpha: float | torch.Tensor) -> torch.Tensor:
    """V(s) = sum_a pi(a|s) (Q(s, a) - alpha log pi(a|s)), exact for discrete actions."""
    return (probs * (q - alpha * log_probs)).sum(-1)


def critic_target(rewards: torch.Tensor, terminated: torch.Tensor, next_value: torch.Tensor, gamma: float) -> torch.Tensor:
    """y = r + gamma (1 - terminated) V(s'); a truncated episode still bootstraps."""
    return rewards + gamma * (1.0 - terminated) * next_value


def critic_losses(q1_taken: torch.Tensor, q2_taken: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return F.mse_loss(q1_taken, target), F.mse_loss(q2_taken, target)


def actor_loss(probs: torch.Tensor, log_probs: torch.Tensor, q: torch.Tensor, alpha: float | torch.Tensor) -> torch.Tensor:
    """E_s sum_a pi(a|s)(alpha log pi(a|s) - Q(s, a)), averaged over batch x actions as the paper's code does."""
    return (probs * (alpha * log_probs - q)).mean()


def alpha_loss(probs: torch.Tensor, log_probs: torch.Tensor, log_alpha: torch.Tensor, entropy_target: float) -> torch.Tensor:
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
        self.actor = Actor(obs_shape, num_actions).to(device).use_channels_last()
        self.qf1 = SoftQNetwork(obs_shape, num_actions).to(device).use_channels_last()
        self.qf2 = SoftQNetwork(obs_shape, num_actions).to(device).use_channels_last()
        self.qf1_target = copy.deepcopy(self.qf1)
        self.qf2_target = copy.deepcopy(self.qf2)
        # fused: one kernel for all parameters; the per-tensor loop costs more than a convolution on a 2-core CPU.
        adam = lambda params, lr: torch.optim.Adam(params, lr=lr, eps=args.adam_eps, fused=True)
        self.q_optimizer = adam(list(self.qf1.parameters()) + list(self.qf2.parameters()), args.q_lr)
        self.actor_optimizer = adam(self.actor.parameters(), args.policy_lr)
        self.entropy_target = target_entropy(num_actions, args.target_entropy_scale)
        self.log_alpha = torch.tensor(float(np.log(args.alpha)), device=device, requires_grad=True)
        self.alpha_optimizer = adam([self.log_alpha], args.q_lr)

    @property
    def alpha(self) -> float:
        return float(self.log_alpha.detach().exp())

    def set_learning_rates(self, global_step: int) -> None:
        a = self.args
        for optimizer, base in (
            (self.q_optimizer, a.q_lr), (self.actor_optimizer, a.policy_lr), (self.alpha_optimizer, a.q_lr)
        ):
            optimizer.param_groups[0]["lr"] = annealed_lr(base, global_step, a.anneal_steps)

    @torch.no_grad()
    def act(self, obs: torch.Tensor) -> torch.Tensor:
        """Sample actions from the current policy."""
        probs, _ = self.actor.probs(obs)
        return torch.multinomial(probs, 1).squeeze(-1)

    def update(self, batch: Batch, rewards: torch.Tensor) -> dict[str, torch.Tensor]:
        """One critic, actor and temperature step on `batch` with the given (already clamped) rewards."""
        alpha = self.log_alpha.exp().detach()
        with torch.no_grad():
            next_probs, next_log_probs = self.actor.probs(batch.next_obs)
            next_q = torch.min(self.qf1_target(batch.next_obs), self.qf2_target(batch.next_obs))
            target = critic_target(
                rewards, batch.terminated, soft_state_value(next_probs, next_log_probs, next_q, alpha), self.args.gamma
            )
        actions = batch.actions[:, None]
        q1 = self.qf1(batch.obs)
        q2 = self.qf2(batch.obs)
        qf1_loss, qf2_loss = critic_losses(q1.gather(1, actions).squeeze(1), q2.gather(1, actions).squeeze(1), target)
        self.q_optimizer.zero_grad(set_to_none=True)
        (qf1_loss + qf2_loss).backward()
        self.q_optimizer.step()

        probs, log_probs = self.actor.probs(batch.obs)
        with torch.no_grad():
            q = torch.min(self.qf1(batch.obs), self.qf2(batch.obs))
        policy_loss = actor_loss(probs, log_probs, q, alpha)
        self.actor_optimizer.zero_grad(set_to_none=True)
        policy_loss.backward()
        self.actor_optimizer.step()

        temperature_loss = torch.zeros((), device=self.device)
        if self.args.autotune:
            temperature_loss = alpha_loss(probs, log_probs, self.log_alpha, self.entropy_target)
            self.alpha_optimizer.zero_grad(set_to_none=True)
            temperature_loss.backward()
            self.alpha_optimizer.step()
        return {
            "losses/qf1_values": q1.gather(1, actions).mean().detach(),
            "losses/qf2_values": q2.gather(1, actions).mean().detach(),
            "losses/qf1_loss": qf1_loss.detach(),
            "losses/qf2_loss": qf2_loss.detach(),
            "losses/qf_loss": ((qf1_loss + qf2_loss) / 2.0).detach(),
            "losses/actor_loss": policy_loss.detach(),
            "losses/alpha": alpha,
            "losses/alpha_loss": temperature_loss.detach(),
            "losses/entropy": -(probs * log_probs).sum(-1).mean().detach(),
        }

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

    def copy_targets(self) -> None:
        self.qf1_target.load_state_dict(self.qf1.state_dict())
        self.qf2_target.load_state_dict(self.qf2.state_dict())


def crossed(previous_step: int, step: int, every: int) -> bool:
    """Whether a multiple of `every` lies in (previous_step, step]; never for every = 0."""
    return every > 0 and step // every > previous_step // every


class SACTrainer:
    """Runs SAC-discrete on a vector env; `run(n)` continues the same environments for n more env steps, so an
    outer loop (the preference algorithms) can interleave its own phases without resetting games."""

    def __init__(self, args: Args, device: torch.device):
        """Builds environments, networks and replay (raising UsageError for bad settings) before any run directory
        exists; `start_or_resume` attaches the TensorBoard writer afterwards."""
        self.args = args
        self.writer: SummaryWriter | None = None
        self.device = device
        self.envs = self._make_envs(args.seed)
        self.num_actions, self.obs_shape = check_env_spaces(
            args.env_id, self.envs.single_action_space, self.envs.single_observation_space
        )
        limit_cpu_threads(self.obs_shape)
        self.agent = SACDiscrete(self.obs_shape, self.num_actions, args, device)
        try:
            self.buffer = FrameReplayBuffer(args.buffer_size, args.num_envs, self.obs_shape, self.envs.frame_stack, device)
        except ValueError as err:
            raise UsageError(f"--buffer-size: {err}") from None
        self.reward_fn: RewardFn | None = None
        self.global_step = 0
        self.num_updates = 0
        self._replay_ready = False
        self.rng = np.random.default_rng(args.seed)
        self.sample_generator = torch.Generator(device=device)
        self.sample_generator.manual_seed(args.seed)
        self.obs, _ = self.envs.reset()
        self.autoreset = np.zeros(args.num_envs, dtype=bool)
        self.last_score: float | None = None
        self.phase = "sac"
        self.checkpoint_path: Path | None = None
        self.run_name = ""
        # Outer loops (the preference algorithms) add their own state to checkpoints through these two hooks.
        self.extra_state: Callable[[], dict] = dict
        self.load_extra_state: Callable[[dict], None] = lambda state: None
        self._progress = tqdm(total=args.total_timesteps, disable=not args.progress, unit="step", dynamic_ncols=True)
        self._start_time = time.time()
        self._start_step = 0

    def _make_envs(self, seed: int):
        return make_envs(self.args.env_id, self.args.num_envs, seed, max_episode_frames=self.args.max_episode_frames)

    @property
    def alpha(self) -> float:
        return self.agent.alpha

    @torch.no_grad()
    def policy_probs(self, obs: torch.Tensor) -> torch.Tensor:
        return self.agent.actor.probs(obs.to(self.device))[0]

    def _batch_rewards(self, batch: Batch) -> torch.Tensor:
        if self.reward_fn is None:
            return batch.rewards
        with torch.no_grad():
            return self.reward_fn(batch.obs, batch.actions).float().clamp(-1.0, 1.0)

    def _choose_actions(self) -> np.ndarray:
        if self.global_step < self.args.learning_starts:
            return self.rng.integers(0, self.num_actions, size=self.args.num_envs)
        obs = torch.as_tensor(self.obs, device=self.device)
        return self.agent.act(obs).cpu().numpy()

    def run(self, num_steps: int) -> None:
        """Continue for `num_steps` environment steps (rounded up to whole vector steps)."""
        a = self.args
        end = self.global_step + num_steps
        while self.global_step < end:
            actions = self._choose_actions()
            next_obs, rewards, terminated, truncated, info = self.envs.step(actions)
            self.buffer.add(self.obs, actions, rewards, terminated, self.autoreset)
            self.obs, self.autoreset = next_obs, info["game_over"]
            previous_step = self.global_step
            self.global_step += a.num_envs
            self._log_games(info)
            if self.global_step > a.learning_starts:
                self.agent.set_learning_rates(self.global_step)
                for _ in range(self.global_step // a.update_frequency - previous_step // a.update_frequency):
                    self._update()
                if crossed(previous_step, self.global_step, a.target_network_frequency):
                    self.agent.copy_targets()
            self._progress.update(a.num_envs)
            if self.global_step % 1000 < a.num_envs:
                self._log_speed()
            if crossed(previous_step, self.global_step, a.eval_every):
                self.evaluate()
            if crossed(previous_step, self.global_step, a.save_every):
                self.save_checkpoint()
        self._log_speed()

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
                self.log_scalar(tag, float(value), self.global_step)

    def _log_games(self, info: dict) -> None:
        if "_episode" not in info:
            return
        for env in np.nonzero(info["_episode"])[0]:
            self.last_score = float(info["episode"]["r"][env])
            self.log_scalar("charts/episodic_return", self.last_score, self.global_step)
            self.log_scalar("charts/episodic_length", int(info["episode"]["l"][env]), self.global_step)

    def log_scalar(self, tag: str, value: float, step: int) -> None:
        if self.writer is not None:  # benchmarks run without a run directory
            self.writer.add_scalar(tag, value, step)

    @property
    def sps(self) -> float:
        return (self.global_step - self._start_step) / max(time.time() - self._start_time, 1e-9)

    def _log_speed(self) -> None:
        self.log_scalar("charts/SPS", self.sps, self.global_step)
        score = "-" if self.last_score is None else f"{self.last_score:.0f}"
        self._progress.set_postfix_str(f"phase={self.phase} SPS={self.sps:.0f} score={score} alpha={self.alpha:.3f}", refresh=False)

    def evaluate(self) -> None:
        """Play `eval_episodes` games on fresh environments with sampled and with greedy actions (and record a video
        of a greedy game with --capture-video)."""
        from agents.evaluation import play_games

        a = self.args
        seed = a.seed + 1_000_003 + self.global_step  # games never seen in training
        for tag, greedy in (("eval/episodic_return", False), ("eval/episodic_return_greedy", True)):
            envs = make_envs(a.env_id, a.eval_episodes, seed, max_episode_frames=a.max_episode_frames)
            scores = play_games(envs, self.agent.actor, self.device, greedy)
            envs.close()
            self.log_scalar(tag, float(np.mean(scores)), self.global_step)
        if a.capture_video:
            self.record_video(seed)

    def record_video(self, seed: int) -> None:
        from wrappers.video import record_greedy_episode

        if self.args.env_id.startswith("MinAtar/"):
            print("--capture-video: MinAtar games have no renderer here; no video recorded")
            return
        folder = f"videos/{self.run_name}/step_{self.global_step}"
        record_greedy_episode(
            self.args.env_id, self.agent.actor, self.device, folder, seed, self.args.max_episode_frames
        )

    def state_dict(self) -> dict:
        return {
            "args": vars(self.args).copy(),
            "global_step": self.global_step,
            "num_updates": self.num_updates,
            "agent": self.agent.state_dict(),
            "replay": self.buffer.state_dict() if self.args.save_replay else None,
            "rng": rng_state(self.rng, self.sample_generator),
            "extra": self.extra_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from a checkpoint. Environments cannot be snapshotted, so the games in progress are abandoned
        and new ones start, seeded by the step count."""
        self.global_step = int(state["global_step"])
        self.num_updates = int(state["num_updates"])
        self.agent.load_state_dict(state["agent"])
        if state["replay"] is not None:
            self.buffer.load_state_dict(state["replay"])
        self.buffer.break_episodes()
        restore_rng_state(state["rng"], self.rng, self.sample_generator)
        self.load_extra_state(state["extra"])
        self.envs.close()
        self.envs = self._make_envs(self.args.seed + self.global_step)
        self.obs, _ = self.envs.reset()
        self.autoreset[:] = False
        self._progress.n = self._start_step = self.global_step
        self._start_time = time.time()

    def save_checkpoint(self) -> None:
        if self.checkpoint_path is not None:
            save_atomic(self.state_dict(), self.checkpoint_path)

    def close(self) -> None:
        self._progress.close()
        self.envs.close()
        if self.writer is not None:
            self.writer.close()


def prepare(args: Args) -> torch.device:
    """Threads, seeds and device."""
    limit_cpu_threads()
    seed_everything(args.seed, args.torch_deterministic)
    return pick_device(args.cuda)


def open_run(args: Args) -> tuple[str, SummaryWriter]:
    """Run name and TensorBoard writer (mirrored to W&B with --track); call once the inputs are validated."""
    run_name = make_run_name(args.env_id, args.exp_name, args.seed)
    if args.track:
        import wandb

        wandb.init(
            project=args.wandb_project_name, entity=args.wandb_entity or None, sync_tensorboard=True,
            config=vars(args), name=run_name, save_code=True,
        )
    writer = SummaryWriter(f"{args.runs_dir}/{run_name}")
    writer.add_text("hyperparameters", hyperparameter_table(args))
    return run_name, writer


def parse_or_resume(args_cls: type, argv: Sequence[str] | None, description: str | None) -> tuple[Args, dict | None]:
    """Parse the flags; with --resume, the checkpoint's arguments apply except for flags given on the command line."""
    args = parse_args(args_cls, argv, description)
    if not args.resume:
        return args, None
    state = load_checkpoint(args.resume)
    saved, explicit = state["args"], explicit_flags(args_cls, argv)
    require(
        saved.get("exp_name") == args.exp_name or "exp_name" in explicit,
        f"--resume {args.resume}: the checkpoint is from {saved.get('exp_name')!r}, not {args.exp_name!r}",
    )
    merged = {k: (getattr(args, k) if k in explicit else saved.get(k, getattr(args, k))) for k in vars(args)}
    merged["resume"] = args.resume
    return args_cls(**merged), state


def start_or_resume(trainer: SACTrainer, args: Args, state: dict | None) -> str:
    """Open the run directory (a new one, or the checkpoint's own so its curves continue) and restore state."""
    if state is None:
        run_name, trainer.writer = open_run(args)
        run_dir = Path(args.runs_dir) / run_name
    else:
        trainer.load_state_dict(state)
        run_dir = Path(args.resume) if Path(args.resume).is_dir() else Path(args.resume).parent
        run_name = run_dir.name
        # purge_step hides anything the killed run logged after its checkpoint, so curves continue without overlap.
        trainer.writer = SummaryWriter(str(run_dir), purge_step=trainer.global_step)
    trainer.checkpoint_path = run_dir / CHECKPOINT_NAME
    trainer.run_name = run_name
    return run_name


def run_to_completion(trainer: SACTrainer, loop: Callable[[], None]) -> None:
    """Run `loop`; Ctrl-C saves a checkpoint first (exit status 130), the end of training saves one too."""
    try:
        loop()
        trainer.save_checkpoint()
    except KeyboardInterrupt:
        trainer.save_checkpoint()
        print(f"\ninterrupted at step {trainer.global_step}: resume with --resume {trainer.checkpoint_path}")
        raise SystemExit(130) from None
    finally:
        trainer.close()


def main(argv: Sequence[str] | None = None) -> SACTrainer:
    args, state = parse_or_resume(Args, argv, __doc__)
    validate(args)
    device = prepare(args)
    trainer = SACTrainer(args, device)
    run_name = start_or_resume(trainer, args, state)
    print(f"run {run_name} on {device}: logs in {trainer.checkpoint_path.parent}")
    run_to_completion(trainer, lambda: trainer.run(args.total_timesteps - trainer.global_step))
    if args.capture_video:
        trainer.record_video(args.seed)
    return trainer


if __name__ == "__main__":
    run_cli(main)
