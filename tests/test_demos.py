"""sobirl/demos.py: recorded games replay exactly, fragments are windows of them, and bad files are one-line errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from agents.feedback.pairs import fragment_observations
from agents.infra.checkpoint import save_atomic
from agents.infra.cli import UsageError
from agents.lower.networks import Actor
from sobirl import demos as demos_cli
from sobirl.demos import Demonstrations, load_checkpoint_actor
from tests.conftest import cli_error, run_script
from wrappers import make_envs

BREAKOUT = "MinAtar/Breakout-v1"


@pytest.fixture(autouse=True)
def keep_torch_threads():
    """In-process runs set torch's thread count (agents/infra/run.py); give the other tests theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def expert(tmp_path_factory):
    """A SAC checkpoint on MinAtar Breakout after 400 steps (300 of them learning): the run directory."""
    pytest.importorskip("minatar")
    from agents import sac_discrete

    threads = torch.get_num_threads()
    runs = tmp_path_factory.mktemp("expert")
    try:
        sac_discrete.main(
            [
                "--env-id",
                BREAKOUT,
                "--total-timesteps",
                "400",
                "--learning-starts",
                "100",
                "--buffer-size",
                "1000",
                "--batch-size",
                "16",
                "--no-progress",
                "--runs-dir",
                str(runs),
            ]
        )
    finally:
        torch.set_num_threads(threads)
    (run_dir,) = [d for d in runs.iterdir() if d.is_dir()]
    return run_dir


@pytest.fixture(scope="module")
def recorded(expert, tmp_path_factory):
    out = tmp_path_factory.mktemp("demos") / "breakout.npz"
    demos_cli.main(["record", "--checkpoint", str(expert), "--steps", "610", "--seed", "3", "--out", str(out)])
    return out


def actor_checkpoint(path, env_id: str, max_frames: int, seed: int = 0) -> None:
    """A drlhf-style checkpoint (SAC state nested under "sac") holding a freshly initialised actor."""
    envs = make_envs(env_id, 1, 0, max_episode_frames=max_frames)
    shape, actions = envs.single_observation_space.shape, int(envs.single_action_space.n)
    envs.close()
    torch.manual_seed(seed)
    sac_state = {"global_step": 0, "agent": {"actor": Actor(shape, actions).state_dict()}}
    save_atomic(
        {
            "algo": "drlhf",
            "args": {"env_id": env_id, "max_episode_frames": max_frames},
            "global_step": 0,
            "algorithm": {"sac": sac_state, "iteration": 0},
        },
        path,
    )


def replay_games(demos: Demonstrations, seed: int) -> list[np.ndarray]:
    """Play the recorded actions again on a fresh env with the recording's seed; check every step's outcome against
    the file and return each game's observations as the environment produced them."""
    m = demos.meta
    envs = make_envs(m["env_id"], 1, seed, max_episode_frames=m["max_episode_frames"])
    obs, _ = envs.reset()
    games = []
    for g in range(demos.num_games):
        steps = demos.game_slice(g)
        seen, raw = [], 0.0
        for t, action in enumerate(demos.arrays["actions"][steps]):
            seen.append(obs[0])
            obs, reward, terminated, _, info = envs.step(np.array([action]))
            i = steps.start + t
            assert reward[0] == demos.arrays["rewards"][i] and info["raw_reward"][0] == demos.arrays["raw_rewards"][i]
            assert terminated[0] == demos.arrays["terminated"][i]
            assert info["game_over"][0] == (i == steps.stop - 1), "games end where the file says"
            raw += float(info["raw_reward"][0])
        assert raw == demos.arrays["game_returns"][g] == info["episode"]["r"][0]
        games.append(np.stack(seen))
        obs, *_ = envs.step(np.array([0]))  # the autoreset step
    envs.close()
    return games


def test_round_trip_replays_the_games_and_fragments_are_windows_of_them(expert, recorded, capsys):
    demos = Demonstrations.load(recorded, env_id=BREAKOUT)
    m = demos.meta
    assert (m["env_id"], m["seed"], m["frame_stack"], m["num_actions"], m["min_return"]) == (BREAKOUT, 3, 1, 3, None)
    assert m["checkpoint_algo"] == "sac" and m["checkpoint_step"] == 400 and expert.name in m["checkpoint"]
    assert demos.num_games >= 10 and demos.num_steps < 610, "the game running at the end of the budget is dropped"
    assert len(demos.arrays["played_returns"]) == demos.num_games
    # The observations the file rebuilds are the ones the environment shows when the actions are played again.
    for g, observed in enumerate(replay_games(demos, seed=3)):
        np.testing.assert_array_equal(demos.game_observations(g), observed)
    # The recorded probabilities are the checkpoint's policy on those observations.
    actor = Actor((4, 10, 10), 3)
    actor.load_state_dict(load_checkpoint_actor(str(expert))[4])
    with torch.no_grad():
        probs = actor.probs(
            torch.as_tensor(np.concatenate([demos.game_observations(g) for g in range(demos.num_games)]))
        )[0]
    np.testing.assert_allclose(demos.arrays["probs"], probs.numpy(), rtol=1e-5, atol=1e-6)

    length = 5
    fragments = demos.fragments(200, length, torch.Generator().manual_seed(0))
    assert fragments.frames.shape == (200, length, 4, 10, 10) and fragments.actions.shape == (200, length)
    obs = fragment_observations(fragments.frames, length).view(200, length, 4, 10, 10)
    for i in range(200):
        g, start = int(fragments.game[i]), int(fragments.start[i])
        assert start + length <= demos.game_lengths[g], "fragments stay inside one game"
        np.testing.assert_array_equal(obs[i].numpy(), demos.game_observations(g)[start : start + length])
        np.testing.assert_array_equal(
            fragments.actions[i].numpy(), demos.arrays["actions"][demos.game_slice(g)][start : start + length]
        )
    assert len(set(fragments.game.tolist())) > 5


def test_info_describes_the_file(recorded):
    result = run_script("sobirl/demos.py", "info", str(recorded))
    assert result.returncode == 0, result.stderr
    demos = Demonstrations.load(recorded)
    assert f"{demos.num_games} kept" in result.stdout and BREAKOUT in result.stdout
    assert f"{demos.num_steps} kept of 610 rolled out" in result.stdout and "global step 400" in result.stdout


def test_min_return_keeps_the_high_scoring_games_of_the_same_rollout(expert, recorded, tmp_path):
    every = Demonstrations.load(recorded)
    scores = every.arrays["game_returns"]
    threshold = float(np.sort(scores)[len(scores) // 2]) + 0.5  # keeps a strict, non-empty subset
    if not (scores >= threshold).any():
        threshold = float(scores.max())
    out = tmp_path / "high.npz"
    demos_cli.main(
        [
            "record",
            "--checkpoint",
            str(expert),
            "--steps",
            "610",
            "--seed",
            "3",
            "--out",
            str(out),
            "--min-return",
            str(threshold),
        ]
    )
    high = Demonstrations.load(out)
    keep = np.nonzero(scores >= threshold)[0]
    assert high.num_games == len(keep) < every.num_games and high.meta["min_return"] == threshold
    np.testing.assert_array_equal(high.arrays["played_returns"], every.arrays["played_returns"])
    for mine, theirs in enumerate(keep):
        np.testing.assert_array_equal(high.game_frames(mine), every.game_frames(theirs))
        for key in ("actions", "raw_rewards", "probs"):
            np.testing.assert_array_equal(
                high.arrays[key][high.game_slice(mine)], every.arrays[key][every.game_slice(theirs)]
            )


def test_atari_stacks_are_zero_padded_at_game_start_and_match_the_env(tmp_path):
    checkpoint = tmp_path / "checkpoint.pt"
    actor_checkpoint(checkpoint, "BeamRiderNoFrameskip-v4", max_frames=400)  # games cut after about 100 steps
    out = tmp_path / "beamrider.npz"
    demos_cli.main(["record", "--checkpoint", str(checkpoint), "--steps", "250", "--out", str(out), "--greedy"])
    demos = Demonstrations.load(out, env_id="BeamRiderNoFrameskip-v4")
    assert demos.num_games == 2 and demos.arrays["game_truncated"].all() and demos.meta["greedy"]
    assert demos.arrays["frames"].shape == (demos.num_steps + 2 * 3, 84, 84)
    for g, observed in enumerate(replay_games(demos, seed=1)):
        np.testing.assert_array_equal(demos.game_observations(g), observed)
        assert not demos.game_frames(g)[:3].any() and demos.game_frames(g)[3].any()
        np.testing.assert_array_equal(
            demos.arrays["actions"][demos.game_slice(g)], demos.arrays["probs"][demos.game_slice(g)].argmax(1)
        )
    fragments = demos.fragments(64, 25, torch.Generator().manual_seed(1))
    assert fragments.frames.shape == (64, 28, 84, 84)
    for i in range(64):
        g, start = int(fragments.game[i]), int(fragments.start[i])
        np.testing.assert_array_equal(fragments.frames[i].numpy(), demos.game_frames(g)[start : start + 28])


def demos_error(argv: list[str], capsys) -> str:
    return cli_error(demos_cli.main, argv, capsys)


def test_bad_files_are_one_line_errors(recorded, tmp_path, capsys):
    assert "no such file" in demos_error(["info", str(tmp_path / "missing.npz")], capsys)
    data = recorded.read_bytes()
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(data[: len(data) // 2])
    assert str(truncated) in demos_error(["info", str(truncated)], capsys)
    flipped = bytearray(data)
    flipped[len(data) // 3] ^= 0xFF
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(bytes(flipped))
    assert str(corrupt) in demos_error(["info", str(corrupt)], capsys)
    foreign = tmp_path / "foreign.npz"
    np.savez(foreign, frames=np.zeros(3))
    assert "not a demonstrations file" in demos_error(["info", str(foreign)], capsys)
    with pytest.raises(UsageError, match="--demos .*recorded on MinAtar/Breakout-v1.*--env-id is MinAtar/Asterix-v1"):
        Demonstrations.load(recorded, "--demos", env_id="MinAtar/Asterix-v1")


def test_bad_record_flags_are_one_line_errors(expert, tmp_path, capsys):
    out = str(tmp_path / "x.npz")
    assert "--checkpoint" in demos_error(
        ["record", "--checkpoint", str(tmp_path / "none"), "--steps", "9", "--out", out], capsys
    )
    assert "--min-return" in demos_error(
        ["record", "--checkpoint", str(expert), "--steps", "50", "--out", out, "--min-return", "1000"], capsys
    )
    assert "--steps" in demos_error(["record", "--checkpoint", str(expert), "--steps", "0", "--out", out], capsys)
    assert "--out" in demos_error(
        ["record", "--checkpoint", str(expert), "--steps", "9", "--out", str(tmp_path / "no" / "dir.npz")], capsys
    )
    assert not (tmp_path / "x.npz").exists()


def test_record_help_states_each_default_once_and_no_empty_ones():
    """Caught before: --min-return's help ended "(default: every whole game) (default: None)", and the required
    flags said "(default: None)"."""
    help_text = " ".join(demos_cli.build_parser()._subparsers._group_actions[0].choices["record"].format_help().split())
    assert "(default: None)" not in help_text and "(default: )" not in help_text
    assert help_text.count("(default: every whole game)") == 1 and "(default: 1)" in help_text  # --seed's is kept
