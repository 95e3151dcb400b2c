"""Expert demonstrations for AIHF: record a trained policy's games once, sample fragments from them in training.

    python sobirl/demos.py record --checkpoint runs/<run> --steps 10000 --out demos.npz            # every whole game
    python sobirl/demos.py record --checkpoint runs/<run> --steps 10000 --out demos.npz --min-return 2
    python sobirl/demos.py info demos.npz

`record` loads the actor of any checkpoint that holds a SAC agent (a `sac` run, or the lower level of a `drlhf`,
`sobirl` or `aihf` run), plays it on the checkpoint's --env-id with its --max-episode-frames in one environment for
--steps agent steps (actions sampled from the policy, or its argmax with --greedy), and keeps the whole games: the
game still running when the budget is spent is dropped, and --min-return R keeps only games whose true (unclipped)
score is at least R, the AIHF paper's "high bucket" of demonstrations. The autoreset step between two games is not
an agent step and is not counted. Games are played without --fire-after-life-loss whatever the checkpoint's flags:
frames are stored once, and those extra presses would put unrecorded frames into the stacks.

The file format, its checks and fragment sampling live in agents/feedback/demos.py.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from agents.feedback.demos import FORMAT, FORMAT_VERSION, DemoFragments, Demonstrations  # noqa: F401 - re-exported
from agents.infra.cli import DefaultsHelpFormatter, OneLineErrorParser, UsageError, integer, require, run_cli

# ---------------------------------------------------------------------------------------------------------------
# Recording


def _sac_state(state: Any) -> dict | None:
    """The SACTrainer state inside an algorithm's checkpoint state: the one dict whose "agent" holds an "actor"."""
    if not isinstance(state, dict):
        return None
    if isinstance(state.get("agent"), dict) and "actor" in state["agent"]:
        return state
    for value in state.values():
        found = _sac_state(value)
        if found is not None:
            return found
    return None


def load_checkpoint_actor(checkpoint: str):
    """(checkpoint path, its flags, algorithm, global step, actor state dict), or a UsageError naming --checkpoint."""
    from agents.infra.checkpoint import load_checkpoint, resolve_checkpoint

    try:
        path = resolve_checkpoint(checkpoint)
        state = load_checkpoint(path)
    except UsageError as err:
        raise UsageError(str(err).replace("--resume", "--checkpoint", 1)) from None
    sac = _sac_state(state.get("algorithm"))
    if sac is None:
        raise UsageError(f"--checkpoint {checkpoint}: the {state.get('algo')!r} run holds no SAC actor")
    return (
        path,
        state["args"],
        state.get("algo"),
        int(state.get("global_step", sac.get("global_step", 0))),
        sac["agent"]["actor"],
    )


def record(
    checkpoint: str, steps: int, min_return: float | None = None, seed: int = 1, greedy: bool = False
) -> tuple[Demonstrations, dict[str, Any]]:
    """Play the checkpoint's policy for `steps` agent steps; return the kept games and a summary of the rollout."""
    from agents.lower.networks import Actor
    from agents.lower.sac import check_env_spaces
    from wrappers import make_envs

    path, args, algo, global_step, actor_state = load_checkpoint_actor(checkpoint)
    env_id, max_frames = args["env_id"], int(args.get("max_episode_frames", 108_000))
    envs = make_envs(env_id, 1, seed, max_episode_frames=max_frames)
    try:
        num_actions, obs_shape = check_env_spaces(env_id, envs.single_action_space, envs.single_observation_space)
        stack = envs.frame_stack
        actor = Actor(obs_shape, num_actions)
        try:
            actor.load_state_dict(actor_state)
        except RuntimeError as err:
            raise UsageError(
                f"--checkpoint {checkpoint}: its actor does not fit {env_id} ({str(err).splitlines()[0]})"
            ) from None
        actor.use_fastest_layout().eval()
        generator = torch.Generator().manual_seed(seed)
        newest = (lambda obs: obs[-1]) if stack > 1 else (lambda obs: obs)
        games: list[dict[str, Any]] = []
        played: list[float] = []

        def new_game(first_obs: np.ndarray) -> dict[str, list]:
            first = list(first_obs) if stack > 1 else [first_obs]
            return {"frames": first, "actions": [], "rewards": [], "raw": [], "terminated": [], "probs": []}

        obs, _ = envs.reset()
        game = new_game(obs[0])
        with torch.no_grad():
            for _ in range(steps):
                probs = actor.probs(torch.as_tensor(obs))[0][0]
                action = int(probs.argmax()) if greedy else int(torch.multinomial(probs, 1, generator=generator))
                next_obs, reward, terminated, truncated, info = envs.step(np.array([action]))
                game["actions"].append(action)
                game["probs"].append(probs.numpy())
                game["rewards"].append(float(reward[0]))
                game["raw"].append(float(info["raw_reward"][0]))
                game["terminated"].append(bool(terminated[0]))
                if info["game_over"][0]:
                    score = float(info["episode"]["r"][0])
                    played.append(score)
                    if min_return is None or score >= min_return:
                        games.append({**game, "score": score, "truncated": bool(truncated[0] and not terminated[0])})
                    next_obs, *_ = envs.step(np.array([0]))  # the NEXT_STEP autoreset: the next game's first obs
                    game = new_game(next_obs[0])
                else:
                    # Frames are stored once: each stack must be the previous one shifted by the new frame.
                    if stack > 1 and not np.array_equal(next_obs[0][:-1], obs[0][1:]):
                        raise RuntimeError(f"{env_id}: consecutive observations do not share their stacked frames")
                    game["frames"].append(newest(next_obs[0]))
                obs = next_obs
    finally:
        envs.close()

    lengths = np.array([len(g["actions"]) for g in games], dtype=np.int64)
    ends = np.cumsum(lengths)
    frame_shape = tuple(obs_shape[1:]) if stack > 1 else tuple(obs_shape)
    concat = lambda key, dtype, shape=(): (
        np.concatenate([np.asarray(g[key], dtype=dtype) for g in games])
        if games
        else np.zeros((0, *shape), dtype=dtype)
    )
    arrays = {
        "frames": concat("frames", np.uint8, frame_shape),
        "actions": concat("actions", np.int64),
        "rewards": concat("rewards", np.float32),
        "raw_rewards": concat("raw", np.float32),
        "terminated": concat("terminated", bool),
        "probs": concat("probs", np.float32, (num_actions,)),
        "game_starts": ends - lengths,
        "game_ends": ends,
        "game_returns": np.array([g["score"] for g in games], dtype=np.float64),
        "game_truncated": np.array([g["truncated"] for g in games], dtype=bool),
        "played_returns": np.array(played, dtype=np.float64),
    }
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "env_id": env_id,
        "frame_stack": stack,
        "frame_shape": list(frame_shape),
        "num_actions": num_actions,
        "seed": seed,
        "greedy": greedy,
        "min_return": min_return,
        "steps_rolled_out": steps,
        "max_episode_frames": max_frames,
        "checkpoint": str(path),
        "checkpoint_algo": algo,
        "checkpoint_step": global_step,
        "recorded": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    return Demonstrations(meta, arrays, ""), {"played": len(played), "unfinished_steps": len(game["actions"])}


# ---------------------------------------------------------------------------------------------------------------
# The command line


def _stats(values: np.ndarray) -> str:
    if len(values) == 0:
        return "-"
    return f"min {values.min():g} / mean {values.mean():.4g} / max {values.max():g}"


def describe(demos: Demonstrations) -> str:
    m, a = demos.meta, demos.arrays
    bucket = "" if m["min_return"] is None else f" with score >= {m['min_return']:g}"
    policy = "greedy" if m["greedy"] else "sampled"
    lengths = demos.game_lengths
    lines = [
        f"env        {m['env_id']} (frame stack {m['frame_stack']}, frames {tuple(m['frame_shape'])}, "
        f"{m['num_actions']} actions)",
        f"games      {demos.num_games} kept{bucket}, of {len(a['played_returns'])} whole games played "
        f"({int(a['game_truncated'].sum())} kept games cut by --max-episode-frames {m['max_episode_frames']})",
        f"steps      {demos.num_steps} kept of {m['steps_rolled_out']} rolled out; game lengths {_stats(lengths)}",
        f"returns    {_stats(a['game_returns'])} (kept); {_stats(a['played_returns'])} (all played)",
        f"policy     {policy} actions, seed {m['seed']}, from {m['checkpoint']} ({m['checkpoint_algo']} run at "
        f"global step {m['checkpoint_step']})",
        f"recorded   {m['recorded']}, format {m['format']} v{m['format_version']}",
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="{record,info}")
    rec = commands.add_parser(
        "record",
        help="play a checkpoint's policy and save its whole games",
        formatter_class=DefaultsHelpFormatter,
    )
    rec.add_argument("--checkpoint", required=True, help="checkpoint file, or a run directory holding one")
    rec.add_argument(
        "--steps",
        required=True,
        type=integer,
        help="agent steps to roll out (autoreset steps between games not counted)",
    )
    rec.add_argument("--out", required=True, help="file to write (np.savez_compressed archive)")
    rec.add_argument(
        "--min-return",
        type=float,
        default=None,
        help="keep only games whose true score is at least this (default: every whole game)",
    )
    rec.add_argument("--seed", type=integer, default=1, help="seed of the environment and of the sampled actions")
    rec.add_argument("--greedy", action="store_true", help="play the most probable action instead of sampling")
    info = commands.add_parser("info", help="describe a demonstrations file")
    info.add_argument("file", help="the demonstrations file")
    return parser


def main(argv: Sequence[str] | None = None) -> Demonstrations:
    args = build_parser().parse_args(argv)
    if args.command == "info":
        demos = Demonstrations.load(args.file, flag="")
        print(f"{args.file}: {os.path.getsize(args.file) / 1e6:.2f} MB\n{describe(demos)}")
        return demos
    require(args.steps > 0, f"--steps must be positive, got {args.steps}")
    require(
        args.min_return is None or math.isfinite(args.min_return),
        f"--min-return must be a finite number, got {args.min_return}",
    )
    out = Path(args.out)
    require(
        out.parent.is_dir() and os.access(out.parent, os.W_OK | os.X_OK),
        f"--out {out}: {out.parent} is not a writable directory",
    )
    require(not out.is_dir(), f"--out {out}: is a directory")
    demos, rollout = record(args.checkpoint, args.steps, args.min_return, args.seed, args.greedy)
    if demos.num_games == 0:
        raise UsageError(
            f"--min-return {args.min_return:g}: none of the {rollout['played']} games played scored that much"
            if rollout["played"]
            else f"--steps {args.steps}: no game ended within the budget; raise --steps"
        )
    demos.save(out)
    demos.path = str(out)
    print(
        f"wrote {out}: {demos.num_games} games, {demos.num_steps} steps "
        f"({rollout['unfinished_steps']} steps of an unfinished game dropped)\n{describe(demos)}"
    )
    return demos


if __name__ == "__main__":
    run_cli(main)
