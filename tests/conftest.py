import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# submitit configures logging when imported (logging.config.dictConfig), which closes every existing handler;
# absl's handler (imported with rliable, e.g. by the plot tests) holds pytest's capture stream and closes it,
# after which pytest itself fails at the end of the session. The tests need no submitit log configuration.
os.environ.setdefault("SUBMITIT_LOG_LEVEL", "NOCONFIG")

REPO = Path(__file__).resolve().parents[1]

# Two CI cores: keep torch from oversubscribing when pytest and a subprocess run side by side.
torch.set_num_threads(min(2, torch.get_num_threads()))


# A preference run of seconds: a 40-step rollout for the 4 warm-up pairs, then reward phases every 100 steps.
TINY_PREFERENCE = {
    "--learning-starts": "100",
    "--buffer-size": "1000",
    "--batch-size": "8",
    "--initial-pairs": "4",
    "--warmup-epochs": "2",
    "--inner-steps": "100",
    "--fragment-length": "5",
    "--pair-buffer": "9",
    "--reward-batch-size": "4",
    "--total-pairs": "20",
    "--schedule-iterations": "10",
    "--fresh-pairs": "4",
    "--max-episode-frames": "400",
    "--num-envs": "1",
    "--log-every": "5",
}


# Shorter phases for the two-level methods' end-to-end runs (A-PARL, the penalty method): 50 random steps, then
# 50-step agent phases and four reward phases.
SHORT_PHASES = {
    "env_id": "MinAtar/Breakout-v1",
    "learning_starts": "50",
    "inner_steps": "50",
    "pair_buffer": "20",
    "schedule_iterations": "4",
}


def tiny_preference_flags(**values: str) -> list[str]:
    """TINY_PREFERENCE as command-line flags, with `values` changed or added (learning_starts="50" is
    --learning-starts 50), and no progress bar."""
    flags = dict(TINY_PREFERENCE, **{"--" + name.replace("_", "-"): value for name, value in values.items()})
    return [*(item for pair in flags.items() for item in pair), "--no-progress"]


def run_script(*args: str, timeout: float = 300, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """Run a repository script as a user would (`python agents/<algo>.py ...`), from the repository root by default."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    script, *rest = args
    return subprocess.run(
        [sys.executable, str(REPO / script), *rest], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def assert_usage_error(result: subprocess.CompletedProcess, *words: str) -> None:
    """Bad input: exit 2, one line on stderr naming the problem, no traceback."""
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])


def cli_error(main, argv: list[str], capsys) -> str:
    """Run a script's main as its command line does, in this process; return the one-line error it reports
    (exit status 2, no traceback)."""
    from agents.infra.cli import run_cli

    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, argv)
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in lines[0], lines
    return lines[0]


class TableModule(torch.nn.Module):
    """obs (N, S) one-hot uint8 -> obs @ table, (N, A): a tabular actor or reward whose gradients are indicators."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = torch.nn.Parameter(table.clone())

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return obs.to(self.table.dtype) @ self.table


def scalar_tags(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def only_run_dir(runs_dir: Path) -> Path:
    dirs = [d for d in runs_dir.iterdir() if d.is_dir()]
    assert len(dirs) == 1, dirs
    return dirs[0]


@pytest.fixture
def single_thread():
    """For tests on tiny tensors: one thread is faster, and immune to the stalls a second OpenMP thread suffers when
    other processes share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
