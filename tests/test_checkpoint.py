"""Checkpoints: round trip, kill and resume, Ctrl-C, corrupt files, and CPU reproducibility over 1,000 updates."""

import signal
import subprocess
import sys
import time

import torch

from agents.infra.checkpoint import load_checkpoint, save_atomic
from agents.infra.cli import UsageError
from agents.lower.sac import Args, SACTrainer
from tests.conftest import REPO, assert_usage_error, only_run_dir, run_script, scalar_tags

TINY = [
    "--learning-starts",
    "200",
    "--buffer-size",
    "1000",
    "--batch-size",
    "8",
    "--log-every",
    "1",
    "--max-episode-frames",
    "400",
    "--no-progress",
]


def tiny_trainer(**overrides) -> SACTrainer:
    args = Args(learning_starts=50, buffer_size=500, batch_size=8, max_episode_frames=400, progress=False, cuda=False)
    for key, value in overrides.items():
        setattr(args, key, value)
    return SACTrainer(args, torch.device("cpu"))


def test_round_trip_restores_networks_optimizers_and_replay(tmp_path):
    torch.manual_seed(0)
    trainer = tiny_trainer()
    trainer.collect(120)
    save_atomic(trainer.state_dict(), tmp_path / "checkpoint.pt")
    torch.manual_seed(123)  # a different initialisation, overwritten by the checkpoint
    restored = tiny_trainer()
    restored.load_state_dict(load_checkpoint(tmp_path / "checkpoint.pt"))
    obs = torch.as_tensor(trainer.obs)
    for name in ("actor", "qf1", "qf2", "qf1_target", "qf2_target"):
        torch.testing.assert_close(
            getattr(restored.agent, name)(obs), getattr(trainer.agent, name)(obs), rtol=0, atol=0
        )
    saved_opt, restored_opt = trainer.agent.q_optimizer.state_dict(), restored.agent.q_optimizer.state_dict()
    for key, value in saved_opt["state"].items():
        torch.testing.assert_close(restored_opt["state"][key]["exp_avg"], value["exp_avg"], rtol=0, atol=0)
    assert restored.alpha == trainer.alpha and restored.global_step == trainer.global_step == 120
    written = trainer.buffer.written  # slots past it were never written (the storage is allocated untouched)
    assert restored.buffer.written == written
    assert torch.equal(restored.buffer.frames[:written], trainer.buffer.frames[:written])
    # The environments restart, so the last stored step must not be joined to the next game's first frame.
    last = (restored.buffer.pos - 1) % restored.buffer.slots
    assert not restored.buffer.real[last].any()
    trainer.close()
    restored.close()


def test_truncated_checkpoint_is_refused_with_one_line(tmp_path):
    trainer = tiny_trainer()
    save_atomic(trainer.state_dict(), tmp_path / "checkpoint.pt")
    trainer.close()
    data = (tmp_path / "checkpoint.pt").read_bytes()
    (tmp_path / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    try:
        load_checkpoint(tmp_path / "checkpoint.pt")
        raise AssertionError("a truncated checkpoint was accepted")
    except UsageError as err:
        assert "--resume" in str(err)
    assert_usage_error(run_script("agents/sac_discrete.py", "--resume", str(tmp_path)), "--resume")
    assert_usage_error(run_script("agents/sac_discrete.py", "--resume", str(tmp_path / "missing")), "--resume")


def start(runs_dir, *flags):
    return subprocess.Popen(
        [sys.executable, "agents/sac_discrete.py", "--runs-dir", str(runs_dir), *TINY, *flags],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_checkpoint(runs_dir, process, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = list(runs_dir.glob("*/checkpoint.pt"))
        if found:
            return found[0]
        assert process.poll() is None, process.communicate()
        time.sleep(0.05)
    raise AssertionError("no checkpoint appeared")


def test_sigkill_then_resume_reaches_the_same_step_with_a_continuous_log(tmp_path):
    runs = tmp_path / "runs"
    process = start(runs, "--total-timesteps", "800", "--save-every", "100")
    checkpoint = wait_for_checkpoint(runs, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = load_checkpoint(checkpoint)["global_step"]
    assert killed_at < 800
    result = run_script("agents/sac_discrete.py", "--resume", str(checkpoint.parent), "--no-progress")
    assert result.returncode == 0, result.stderr[-3000:]
    assert load_checkpoint(checkpoint)["global_step"] == 800
    run_dir = only_run_dir(runs)
    steps = [step for step, _ in scalar_tags(run_dir)["losses/qf1_loss"]]
    # One update per 4 env steps from step 204 on, each logged exactly once across the two processes.
    assert steps == list(range(204, 801, 4))


def test_ctrl_c_saves_a_checkpoint_and_exits_130(tmp_path):
    runs = tmp_path / "runs"
    process = start(runs, "--total-timesteps", "100000000")
    deadline = time.time() + 120
    while not list(runs.glob("*/events.*")) and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-2000:]
    state = load_checkpoint(only_run_dir(runs))
    assert state["global_step"] > 0


def test_same_seed_and_command_give_the_same_losses_for_1000_updates(tmp_path):
    # One update per env step and small batches keep 1,000 updates cheap; the code path is the paper's.
    flags = [
        "--total-timesteps",
        "1100",
        "--learning-starts",
        "100",
        "--update-frequency",
        "1",
        "--buffer-size",
        "2000",
        "--batch-size",
        "4",
        "--log-every",
        "1",
        "--max-episode-frames",
        "2000",
        "--no-progress",
    ]
    runs = []
    for name in ("a", "b"):
        result = run_script("agents/sac_discrete.py", *flags, "--runs-dir", str(tmp_path / name), timeout=900)
        assert result.returncode == 0, result.stderr[-3000:]
        runs.append(scalar_tags(only_run_dir(tmp_path / name)))
    for tag in ("losses/qf1_loss", "losses/qf2_loss", "losses/actor_loss", "losses/alpha_loss"):
        assert len(runs[0][tag]) == 1000
        assert runs[0][tag] == runs[1][tag], tag
