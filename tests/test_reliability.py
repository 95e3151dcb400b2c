"""Reliability of a run's life: resume as the run's identity, stopping on signals, memory and disk in proportion,
the budget as a cap, bad paths and values, strict JSON from the plot, and a sweep passing Ctrl-C on to its jobs.

Runs are MinAtar (or a tiny Atari one where the Atari path matters) with TINY-style flags, so each takes seconds.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from agents.infra.checkpoint import load_checkpoint, load_checkpoint_metadata, save_atomic
from agents.infra.cli import run_cli
from agents.infra.run import Logger, Progress, Run, StopSignals, StopTraining, run_to_completion
from sobirl import beamrider, plot, sweep
from tests.conftest import REPO, only_run_dir, tiny_preference_flags

MINATAR = [
    "--env-id",
    "MinAtar/Breakout-v1",
    "--learning-starts",
    "100",
    "--buffer-size",
    "1000",
    "--batch-size",
    "8",
    "--max-episode-frames",
    "400",
    "--no-progress",
]
PREFERENCE = tiny_preference_flags()


def entry_point(*flags: str, capsys=None) -> tuple[int, str, str]:
    """`python sobirl/beamrider.py FLAGS` in this process (no interpreter start-up): exit status, stdout, stderr
    (both empty without `capsys`)."""
    threads = torch.get_num_threads()  # a run may set it (agents.infra.run.limit_cpu_threads); later tests keep theirs
    try:
        run_cli(beamrider.main, list(flags))
        code = 0
    except SystemExit as exit_info:
        code = exit_info.code
    finally:
        torch.set_num_threads(threads)
    captured = capsys.readouterr() if capsys is not None else SimpleNamespace(out="", err="")
    return code, captured.out, captured.err


@contextmanager
def signal_myself(signum: int, when):
    """Within the block, a thread sends `signum` to this process once a run's StopSignals handle it and `when()`
    holds (never before: pytest itself would get the signal). The run it stops must not be able to end on its own
    meanwhile."""
    cancel = threading.Event()

    def watch():
        while not cancel.wait(0.02):
            if isinstance(getattr(signal.getsignal(signum), "__self__", None), StopSignals) and when():
                os.kill(os.getpid(), signum)
                return

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield
    finally:
        cancel.set()
        thread.join()


def refused(capsys, *flags: str) -> str:
    """Run the entry point in this process; it must refuse with one line and exit 2. Returns that line."""
    code, _, err = entry_point(*flags, capsys=capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, (code, err)
    return lines[0]


def script(*args: str) -> list[str]:
    return [sys.executable, str(REPO / "sobirl" / "beamrider.py"), *args]


def finished(command: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    result = subprocess.run(
        command, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=dict(os.environ, PYTHONUNBUFFERED="1")
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def files_under(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")}


@pytest.fixture(scope="module")
def minatar_run(tmp_path_factory) -> Path:
    """A finished 200-step SAC run on MinAtar, made through the entry point; tests copy it before changing it."""
    runs = tmp_path_factory.mktemp("minatar")
    code, _, _ = entry_point("--algo", "sac", *MINATAR, "--total-timesteps", "200", "--runs-dir", str(runs))
    assert code == 0
    return only_run_dir(runs)


def copy_of(run_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run_dir, tmp_path / "runs" / run_dir.name))


# ---------------------------------------------------------------------------------------------------------------
# 1. Resume is the run's identity


def test_resume_through_the_entry_point_continues_a_minatar_run(minatar_run, tmp_path, capsys):
    run_dir = copy_of(minatar_run, tmp_path)
    # Only --resume and a resumable flag: the algorithm and the environment come from the checkpoint.
    code, out, err = entry_point("--resume", str(run_dir), "--total-timesteps", "300", capsys=capsys)
    assert code == 0, err
    assert f"run {run_dir.name} (sac)" in out
    state = load_checkpoint(run_dir)
    assert state["algo"] == "sac" and state["args"]["env_id"] == "MinAtar/Breakout-v1"
    assert state["global_step"] == state["algorithm"]["global_step"] == 300
    assert state["args"]["total_timesteps"] == 300 and state["args"]["buffer_size"] == 1000


def test_a_resumed_run_says_where_it_continues_and_logs_one_speed_point_per_step(tmp_path, capsys):
    """Caught before: the resumed run's first line did not say the step it continued from, and the last charts/SPS
    point of each phase ending on a multiple of 1000 steps was logged twice."""
    from tests.conftest import scalar_tags

    runs = tmp_path / "runs"
    flags = ["--algo", "sac", *MINATAR, "--learning-starts", "3000"]  # uniform random actions: no updates, fast
    code, out, err = entry_point(*flags, "--total-timesteps", "2000", "--runs-dir", str(runs), capsys=capsys)
    assert code == 0, err
    assert "resumed at" not in out
    run_dir = only_run_dir(runs)
    assert re.search(
        rf"done: 2,000 env steps in \d+:\d\d \(this process\), last game's return [\d.]+; curves: "
        rf"tensorboard --logdir {re.escape(str(run_dir))}\n",
        out,
    ), out
    assert [step for step, _ in scalar_tags(run_dir)["charts/SPS"]] == [1000, 2000]
    code, out, err = entry_point("--resume", str(run_dir), "--total-timesteps", "3000", capsys=capsys)
    assert code == 0, err
    assert f"run {run_dir.name} (sac) on cpu, resumed at step 2,000 of 3,000: logs in {run_dir}" in out
    steps = [step for step, _ in scalar_tags(run_dir)["charts/SPS"]]
    assert steps[-1] == 3000 and len(steps) == len(set(steps))


def test_a_lower_total_on_resume_ends_the_run_there_and_one_below_its_step_is_refused(tmp_path, capsys):
    """Caught before: a DRLHF run stopped inside an agent phase and resumed with a lower --total-timesteps trained on
    to the phase's old end (the restored phase end was never clamped), and a total below the run's step exited 0."""
    runs = tmp_path / "runs"
    flags = ["--algo", "drlhf", "--env-id", "MinAtar/Breakout-v1", *PREFERENCE, "--inner-steps", "100000"]

    def inside_agent_phase():
        found = list(runs.glob("*/checkpoint.pt"))
        state = load_checkpoint(found[0])["algorithm"] if found else None
        return state if state and state["stage"] == "agent" and state["sac"]["global_step"] >= 300 else None

    with signal_myself(signal.SIGTERM, when=inside_agent_phase):
        code, _, err = entry_point(*flags, "--total-timesteps", "1e6", "--save-every", "50", "--runs-dir", str(runs),
                                   capsys=capsys)  # fmt: skip
    assert code == 143, err[-3000:]
    run_dir = only_run_dir(runs)
    stopped_at = load_checkpoint(run_dir)["global_step"]
    assert load_checkpoint(run_dir)["algorithm"]["agent_phase_end"] > stopped_at + 100
    code, out, err = entry_point("--resume", str(run_dir), "--total-timesteps", str(stopped_at + 30), capsys=capsys)
    assert code == 0, err[-3000:]
    assert load_checkpoint(run_dir)["global_step"] == stopped_at + 30
    assert "note:" not in err, "the flags' notes were for the run's start"
    assert re.search(r"done: [\d,]+ env steps in \d+:\d\d \(this process\), last game's return [\d.]+;", out), out
    line = refused(capsys, "--resume", str(run_dir), "--total-timesteps", str(stopped_at))
    assert f"--total-timesteps {stopped_at}" in line and f"already at step {stopped_at + 30:,}" in line, line
    assert load_checkpoint(run_dir)["global_step"] == stopped_at + 30, "the refused resume left the checkpoint alone"


def test_a_run_ending_on_a_save_step_writes_its_last_checkpoint_once(tmp_path, capsys, monkeypatch):
    import agents.infra.run as run_module

    saved_at = []
    real_save = run_module.save_atomic
    monkeypatch.setattr(run_module, "save_atomic", lambda state, path: saved_at.append(state["global_step"]) or
                        real_save(state, path))  # fmt: skip
    flags = ["--algo", "sac", *MINATAR, "--total-timesteps", "300", "--save-every", "100"]
    code, _, err = entry_point(*flags, "--runs-dir", str(tmp_path / "runs"), capsys=capsys)
    assert code == 0, err
    assert saved_at == [100, 200, 300]


def test_the_eta_leaves_out_the_time_spent_waiting_for_labels(monkeypatch):
    import agents.infra.run as run_module

    now = [0.0]
    monkeypatch.setattr(run_module.time, "time", lambda: now[0])
    progress = run_module.Progress(1000, False, learning_starts=10)
    progress.update(20)  # learning started at t = 0, step 20
    now[0] = 10.0
    progress.update(120)  # 100 steps in 10 s: 880 steps left take 88 s
    assert progress.eta_seconds() == pytest.approx(88.0)
    now[0] = 310.0  # a person labelled for 300 s
    progress.exclude_from_eta(300.0)
    assert progress.eta_seconds() == pytest.approx(88.0)


def test_the_end_of_run_line_reads_its_duration_as_a_clock_and_names_what_it_knows():
    from agents.infra.run import clock_text, finished_message

    assert [clock_text(s) for s in (0, 59.4, 61, 3599, 3600, 90061)] == [
        "0:00",
        "0:59",
        "1:01",
        "59:59",
        "1:00:00",
        "25:01:01",
    ]
    assert finished_message(4_300_000, 125, 1234.0, Path("runs/a b")) == (
        "done: 4,300,000 env steps in 2:05 (this process), last game's return 1234; "
        "curves: tensorboard --logdir 'runs/a b'"
    )
    assert finished_message(10, 1, None, None) == "done: 10 env steps in 0:01 (this process)"


def test_resume_help_lists_the_flags_a_resumed_run_may_change():
    """Generated from RESUMABLE, so --help cannot omit one (the docs' list had left out --label-mode)."""
    import importlib

    from agents.infra.cli import build_parser, flag_name

    for algo, module in beamrider.ALGORITHMS.items():
        args_cls = getattr(importlib.import_module(module), "TrueRewardArgs" if algo == "sac" else "Args")
        resume = next(a for a in build_parser(args_cls)._actions if "--resume" in a.option_strings)
        listed = set(re.findall(r"--[a-z-]+", resume.help.split("may change only", 1)[1]))
        assert listed == {flag_name(name) for name in args_cls.RESUMABLE}, algo
        assert algo == "sac" or "--label-mode" in listed


def test_resume_through_the_entry_point_on_a_non_default_atari_id_and_mismatches_refused(tmp_path, capsys):
    runs = tmp_path / "runs"
    code, _, _ = entry_point(
        "--algo",
        "sobirl",
        "--env-id",
        "PongNoFrameskip-v4",
        *PREFERENCE,
        "--total-timesteps",
        "60",
        "--runs-dir",
        str(runs),
        capsys=capsys,
    )
    assert code == 0
    run_dir = only_run_dir(runs)
    assert run_dir.name.startswith("PongNoFrameskip-v4__sobirl__1__")
    before = files_under(tmp_path)
    for flags, words in [
        (["--algo", "drlhf"], ["--algo drlhf", "'sobirl'"]),
        (["--env-id", "BeamRiderNoFrameskip-v4"], ["--env-id", "PongNoFrameskip-v4"]),
        (["--fragment-length", "6"], ["--fragment-length 6", "differs"]),
        (["--exp-name", "renamed"], ["--exp-name renamed", "differs"]),
        (["--seed", "2"], ["--seed 2"]),
    ]:
        line = refused(capsys, *flags, "--resume", str(run_dir))
        assert all(word in line for word in words), (flags, line)
    assert files_under(tmp_path) == before, "a refused resume writes nothing"

    # The same algorithm (SoBiRL) and game continue to the new budget. A flag given again with the run's own
    # value is no change, so it is accepted.
    code, out, err = entry_point(
        "--resume", str(run_dir), "--env-id", "PongNoFrameskip-v4", "--total-timesteps", "110", capsys=capsys
    )
    assert code == 0, err
    assert f"run {run_dir.name} (sobirl)" in out
    state = load_checkpoint(run_dir)
    assert state["algo"] == "sobirl" and state["args"]["env_id"] == "PongNoFrameskip-v4"
    assert state["global_step"] == 110 and state["algorithm"]["iteration"] == 1


# ---------------------------------------------------------------------------------------------------------------
# 2. Saves when stopped


def start(*flags: str) -> subprocess.Popen:
    return subprocess.Popen(
        script(*flags),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )


def wait_until(condition, process: subprocess.Popen, timeout: float = 120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        if process.poll() is not None:
            raise AssertionError(process.communicate())
        time.sleep(0.05)
    process.kill()
    raise AssertionError("timed out")


def training(runs: Path, process: subprocess.Popen) -> Path:
    """Wait until the run is training, signal handlers installed (its first --save-every checkpoint exists);
    returns its folder."""
    return wait_until(lambda: list(runs.glob("*/checkpoint.pt")), process)[0].parent


def test_sigterm_saves_a_checkpoint_exits_143_and_the_printed_command_continues_the_run(tmp_path):
    """A real process and the command line as a user copies it from the terminal."""
    runs = tmp_path / "runs"
    process = start(
        "--algo", "sac", *MINATAR, "--total-timesteps", "1e8", "--save-every", "50", "--runs-dir", str(runs)
    )
    run_dir = training(runs, process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr[-3000:]
    assert "Traceback" not in stderr
    state = load_checkpoint(run_dir)  # checksum verified
    stopped_at = state["global_step"]
    assert state["algo"] == "sac" and 0 < stopped_at == state["algorithm"]["global_step"]
    line = next(line for line in stderr.splitlines() if "continue with:" in line)
    assert f"SIGTERM at step {stopped_at}: checkpoint saved" in line
    command = shlex.split(line.split("continue with: ", 1)[1])
    assert command[:5] == ["python", str(REPO / "sobirl" / "beamrider.py"), "--algo", "sac", "--resume"]
    # As printed, with a new budget (a resume may change it): run from the same folder, it continues the run.
    finished([sys.executable, *command[1:], "--total-timesteps", str(stopped_at + 100)])
    assert load_checkpoint(run_dir)["global_step"] == stopped_at + 100


def test_sigint_saves_a_checkpoint_and_exits_130(tmp_path, capsys):
    runs = tmp_path / "runs"
    with signal_myself(signal.SIGINT, when=lambda: list(runs.glob("*/events.*"))):
        code, _, err = entry_point(
            "--algo", "sac", *MINATAR, "--total-timesteps", "1e8", "--runs-dir", str(runs), capsys=capsys
        )
    assert code == 130, err
    state = load_checkpoint(only_run_dir(runs))
    assert state["algo"] == "sac" and state["global_step"] > 0
    assert f"SIGINT at step {state['global_step']}: checkpoint saved; continue with: python " in err


def test_a_second_signal_during_the_save_waits_for_it(tmp_path):
    """SIGTERM stops the run; a SIGINT arriving in the middle of the save neither interrupts it nor changes the exit
    status, and the checkpoint is complete."""
    signals = StopSignals()
    run = Run(SimpleNamespace(), "fake", Logger(), Progress(10, False), signals, directory=tmp_path)
    algorithm = SimpleNamespace(global_step=0)
    interrupted_saves = []

    def train():
        os.kill(os.getpid(), signal.SIGTERM)
        while True:  # the training loop's step boundaries
            algorithm.global_step += 1
            signals.check()

    def save():
        assert signals.saving
        save_atomic(
            {
                "algo": "fake",
                "args": {},
                "global_step": algorithm.global_step,
                "algorithm": {"weights": torch.arange(10_000)},
            },
            run.checkpoint_path,
        )
        os.kill(os.getpid(), signal.SIGINT)  # handled at once, between two bytecodes of this save
        interrupted_saves.append(signals.signum)
        save_atomic(
            {
                "algo": "fake",
                "args": {},
                "global_step": algorithm.global_step,
                "algorithm": {"weights": torch.arange(20_000)},
            },
            run.checkpoint_path,
        )

    algorithm.train = train
    run.save_hook = save
    previous = signal.getsignal(signal.SIGINT)
    with pytest.raises(SystemExit) as exit_info:
        run_to_completion(run, algorithm)
    assert exit_info.value.code == 143  # the first signal's status: the SIGINT did not stop the save
    assert interrupted_saves == [signal.SIGTERM]
    state = load_checkpoint(tmp_path)
    assert state["global_step"] == 1 and torch.equal(state["algorithm"]["weights"], torch.arange(20_000))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]
    assert signal.getsignal(signal.SIGINT) is previous  # handlers restored


def test_a_second_signal_outside_a_save_stops_at_once_without_saving(tmp_path, capsys):
    signals = StopSignals()
    run = Run(SimpleNamespace(), "fake", Logger(), Progress(10, False), signals, directory=tmp_path)
    saves = []
    run.save_hook = lambda: saves.append(1)

    def train():
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)  # before the step ends: stop now
        time.sleep(10)  # interrupted by the signal's handler
        raise AssertionError("the second signal did not stop the run")

    with pytest.raises(SystemExit) as exit_info:
        run_to_completion(run, SimpleNamespace(global_step=7, train=train))
    assert exit_info.value.code == 143 and saves == []
    assert "stopped at step 7 without saving; no checkpoint was written" in capsys.readouterr().err


def test_signals_after_the_stop_was_honoured_wait_for_its_save():
    signals = StopSignals()
    signals.install()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # let its handler run
        with pytest.raises(StopTraining):
            signals.check()
        os.kill(os.getpid(), signal.SIGTERM)  # between StopTraining and the save: recorded, not raised
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        assert signals.signum == signal.SIGINT
    finally:
        signals.uninstall()


def test_stale_temporary_files_of_dead_processes_are_removed_at_the_next_save(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for pid in (dead.pid, alive.pid):
            (tmp_path / f".checkpoint.pt.tmp-{pid}").write_bytes(b"x" * 1000)
        save_atomic({"algo": "fake", "args": {}, "global_step": 3}, tmp_path / "checkpoint.pt")
        assert sorted(p.name for p in tmp_path.iterdir()) == [".checkpoint.pt.tmp-" + str(alive.pid), "checkpoint.pt"]
    finally:
        alive.kill()
        alive.wait()
    assert load_checkpoint(tmp_path)["global_step"] == 3


def test_a_warm_up_stopped_half_way_resumes_where_it_was(tmp_path, capsys):
    runs = tmp_path / "runs"
    flags = [
        "--algo",
        "drlhf",
        "--env-id",
        "MinAtar/Breakout-v1",
        *PREFERENCE,
        "--total-timesteps",
        "60",
        "--warmup-epochs",
        "5000",
        "--warmup-save-every",
        "1",
    ]

    def warm_up_checkpoint(minimum: int):
        found = list(runs.glob("*/checkpoint.pt"))
        if not found:
            return None
        state = load_checkpoint(found[0])["algorithm"]
        return state if state["stage"] == "reward" and state["epochs_done"] >= minimum else None

    process = start(*flags, "--runs-dir", str(runs))
    wait_until(lambda: warm_up_checkpoint(1), process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr[-3000:]
    run_dir = only_run_dir(runs)
    state = load_checkpoint(run_dir)["algorithm"]
    done = state["epochs_done"]
    assert state["stage"] == "reward" and state["iteration"] == 0 and 1 <= done < 5000
    assert state["sac"]["global_step"] == 41  # the warm-up's rollout, not repeated on resume

    # Resumed with the progress bar (a resumable flag), whose phase names each warm-up epoch as it ends.
    with signal_myself(signal.SIGTERM, when=lambda: warm_up_checkpoint(done + 2)):
        code, _, err = entry_point("--resume", str(run_dir), "--progress", capsys=capsys)
    assert code == 143, err[-3000:]
    epochs = [int(n) for n in re.findall(r"reward warm-up (\d+)/5000", err)]
    assert epochs and min(epochs) == done + 1, (done, epochs[:5])
    state = load_checkpoint(run_dir)["algorithm"]
    assert state["stage"] == "reward" and state["epochs_done"] >= done + 2 and state["sac"]["global_step"] == 41


# ---------------------------------------------------------------------------------------------------------------
# 3. Memory and disk in proportion


def test_a_replay_larger_than_memory_is_refused_before_allocating(tmp_path, capsys):
    line = refused(capsys, "--algo", "sac", *MINATAR, "--buffer-size", "1e11", "--runs-dir", str(tmp_path / "runs"))
    assert "--buffer-size 100000000000" in line and "needs 42.0 TB" in line and "has" in line, line
    assert not any(tmp_path.iterdir())


def test_checkpoint_size_follows_the_steps_not_the_capacity(tmp_path, capsys):
    def checkpoint_bytes(name: str, capacity: int, steps: int) -> int:
        runs = tmp_path / name
        # No updates (learning starts after the budget), so the three checkpoints differ only in their replay.
        code, _, _ = entry_point(
            "--algo",
            "sac",
            *MINATAR,
            "--learning-starts",
            "100000",
            "--buffer-size",
            str(capacity),
            "--total-timesteps",
            str(steps),
            "--runs-dir",
            str(runs),
            capsys=capsys,
        )
        assert code == 0
        run_dir = only_run_dir(runs)  # the main file and the replay's chunk files beside it
        return sum(p.stat().st_size for p in [run_dir / "checkpoint.pt", *run_dir.glob("checkpoint.chunks/*/*")])

    small, large = checkpoint_bytes("small", 1000, 300), checkpoint_bytes("large", 100_000, 300)
    longer = checkpoint_bytes("longer", 100_000, 900)
    per_step = 4 * 10 * 10 + 8 + 4 + 4 + 4  # Breakout's 4x10x10 frame, action, reward, behaviour, 4 flags
    assert abs(large - small) < 1000, (small, large)  # 99,000 more slots of capacity: 41.6 MB if they were saved
    assert 600 * per_step <= longer - large <= 600 * per_step + 10_000, (large, longer)


# ---------------------------------------------------------------------------------------------------------------
# 4. The budget is a cap


@pytest.mark.parametrize("algo", ["drlhf", "sobirl"])
def test_a_budget_ending_before_learning_starts_ends_exactly_there_with_a_note(algo, tmp_path, capsys):
    code, _, err = entry_point(
        "--algo",
        algo,
        "--env-id",
        "MinAtar/Breakout-v1",
        *PREFERENCE,
        "--learning-starts",
        "1000",
        "--total-timesteps",
        "100",
        "--runs-dir",
        str(tmp_path),
        capsys=capsys,
    )
    assert code == 0 and "Traceback" not in err
    notes = [line for line in err.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "--total-timesteps 100" in notes[0] and "--learning-starts 1000" in notes[0], err
    state = load_checkpoint(only_run_dir(tmp_path))
    assert state["global_step"] == state["algorithm"]["sac"]["global_step"] == 100
    assert state["algorithm"]["stage"] == "agent" and state["algorithm"]["epochs_done"] == 2


def test_a_budget_ending_inside_the_warm_up_rollout_ends_exactly_there(tmp_path, capsys):
    code, _, err = entry_point(
        "--algo",
        "drlhf",
        "--env-id",
        "MinAtar/Breakout-v1",
        *PREFERENCE,
        "--total-timesteps",
        "20",
        "--runs-dir",
        str(tmp_path),
        capsys=capsys,
    )
    assert code == 0 and "Traceback" not in err
    state = load_checkpoint(only_run_dir(tmp_path))
    assert state["global_step"] == 20 and state["algorithm"]["stage"] == "agent"


def test_a_budget_shorter_than_one_fragment_is_refused_and_writes_nothing(tmp_path, capsys):
    code, _, err = entry_point(
        "--algo",
        "drlhf",
        "--env-id",
        "MinAtar/Breakout-v1",
        *PREFERENCE,
        "--total-timesteps",
        "3",
        "--runs-dir",
        str(tmp_path / "runs"),
        capsys=capsys,
    )
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and "Traceback" not in err and len(errors) == 1, err
    assert "--total-timesteps 3" in errors[0] and "--fragment-length 5" in errors[0]
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------------------------
# 5. Bad paths and values


def test_bad_paths_and_values_are_one_line_exit_2_and_write_nothing(tmp_path, capsys):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    before = files_under(tmp_path)
    for flags, words in [
        (["--algo", "sac", *MINATAR, "--runs-dir", str(not_a_folder / "runs")], ["--runs-dir", "not a directory"]),
        (["--algo", "sac", *MINATAR, "--policy-lr", "inf"], ["--policy-lr", "finite"]),
        (["--algo", "drlhf", "--reward-lr", "nan"], ["--reward-lr", "finite"]),
        (["--algo", "sobirl", "--q-lr=-inf"], ["--q-lr", "finite"]),
    ]:
        line = refused(capsys, *flags, *([] if "--runs-dir" in flags else ["--runs-dir", str(tmp_path / "runs")]))
        assert all(word in line for word in words), (flags, line)
    assert files_under(tmp_path) == before


def test_a_newcomers_bad_inputs_are_one_line_exit_2_and_write_nothing(tmp_path, capsys, monkeypatch):
    """Caught before: --runs-dir "" made the run folder in the current directory (the repository root, where it
    showed in git status); --total-timesteps 1e30 started a run; --seed -1 or 1e10 died in numpy with a traceback."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    short = ["--total-timesteps", "200"]  # so that a run that is not refused ends soon
    for flags, words in [
        (["--runs-dir", "", *short], ["--runs-dir", "must name a folder"]),
        (["--runs-dir", "  ", *short], ["--runs-dir", "must name a folder"]),
        # --batch-size 0 as well: were 1e30 accepted, validation would refuse the run rather than start it.
        (["--total-timesteps", "1e30", "--batch-size", "0"], ["--total-timesteps", "1e30", "out of range"]),
        (["--buffer-size", "1e19", *short], ["--buffer-size", "1e19", "out of range"]),
        (["--seed", "-1", *short], ["--seed", "-1"]),
        (["--seed", "1e10", *short], ["--seed", "10000000000"]),
    ]:
        line = refused(capsys, "--algo", "sac", *MINATAR, *flags)
        assert all(word in line for word in words), (flags, line)
    assert not any(tmp_path.rglob("*.*")) and [p.name for p in tmp_path.iterdir()] == ["cwd"]
    assert not any(cwd.iterdir())


def test_integer_flags_are_read_exactly_and_fit_64_bits():
    """Caught before: 1e30 became an int with 31 digits, and 1e23 the float's 99999999999999991611392."""
    import argparse

    from agents.infra.cli import INT64_MAX, integer

    assert integer("4.3e6") == 4_300_000 and integer("1e17") + 1 == 10**17 + 1 and integer("-3") == -3
    assert integer(str(INT64_MAX)) == INT64_MAX
    for text in ("1e30", "1e19", str(INT64_MAX + 1), "1.5", "nan", "inf", "abc", "1e-3"):
        with pytest.raises(argparse.ArgumentTypeError):
            integer(text)


def test_env_seeds_past_ales_range_are_folded_into_it():
    """A --seed near 2**32 (allowed) plus the step counts a run adds to it is past ale-py's 31-bit seeds: folded,
    the Atari env starts; seeds inside the range are kept. Caught: no folding (ale-py refuses the seed)."""
    from wrappers import make_envs
    from wrappers.atari import ALE_SEEDS, fold_seed

    assert fold_seed(7, 4) == 7 and fold_seed(ALE_SEEDS - 4, 4) == ALE_SEEDS - 4
    assert all(fold_seed(seed, 4) + 3 < ALE_SEEDS for seed in (ALE_SEEDS - 3, 2**32 - 1, 2**32 + 5_300_003))
    envs = make_envs("BeamRiderNoFrameskip-v4", 2, 2**32 - 1 + 5_300_003)
    try:
        obs, _ = envs.reset()
        assert obs.shape == (2, 4, 84, 84)
    finally:
        envs.close()


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a read-only folder")
def test_a_runs_dir_under_a_read_only_folder_is_refused(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        line = refused(capsys, "--algo", "sac", *MINATAR, "--runs-dir", str(locked / "runs"))
        assert "--runs-dir" in line and "not writable" in line
        assert not any(locked.iterdir())
    finally:
        locked.chmod(0o755)


def test_a_corrupted_checkpoint_is_refused_with_a_checksum_message(minatar_run, tmp_path, capsys):
    run_dir = copy_of(minatar_run, tmp_path)
    checkpoint = run_dir / "checkpoint.pt"
    data = bytearray(checkpoint.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 1000] = bytes(b ^ 0xFF for b in data[middle : middle + 1000])
    checkpoint.write_bytes(bytes(data))
    before = files_under(tmp_path)
    line = refused(capsys, "--resume", str(run_dir), "--total-timesteps", "300")
    assert "--resume" in line and "checksum" in line, line
    assert files_under(tmp_path) == before
    assert load_checkpoint_metadata(run_dir)["algo"] == "sac"  # the header is intact: the payload is what changed


def test_a_corrupted_or_missing_replay_chunk_is_refused_with_one_line_naming_it(minatar_run, tmp_path, capsys):
    """The replay lives in chunk files beside checkpoint.pt, each checked against the SHA-256 the main file records.
    Broken on purpose once: without the checksum comparison in `_read_chunk` the damaged chunk (its frames flipped,
    the archive still readable) loads and the run resumes."""
    run_dir = copy_of(minatar_run, tmp_path)
    chunks = sorted(run_dir.glob("checkpoint.chunks/replay.rows/chunk-*.pt"))
    assert len(chunks) == 1, chunks  # 200 MinAtar steps: one chunk
    chunk = chunks[0]
    data = bytearray(chunk.read_bytes())
    frames = data.index(b"data/0") + 200  # inside the first tensor's bytes (the frames), past the record's header
    data[frames : frames + 64] = bytes(b ^ 0xFF for b in data[frames : frames + 64])
    chunk.write_bytes(bytes(data))
    before = files_under(tmp_path)
    line = refused(capsys, "--resume", str(run_dir), "--total-timesteps", "300")
    assert f"--resume {chunk}" in line, line
    assert "corrupted checkpoint chunk" in line and "checksum" in line, line
    assert files_under(tmp_path) == before
    chunk.unlink()
    line = refused(capsys, "--resume", str(run_dir), "--total-timesteps", "300")
    assert f"--resume {chunk}" in line and "missing" in line, line


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the curves through inf and NaN
def test_plot_json_is_strict_with_null_for_missing_values(tmp_path):
    from tests.test_plot import returns, write_run

    steps = np.array([500, 1000])
    for seed in (1, 2):
        write_run(
            tmp_path / "runs",
            "drlhf",
            seed,
            {
                plot.RETURN_TAG: returns(5.0 * seed),
                plot.ACC_FRESH_TAG: (steps, np.full(2, math.nan)),  # every fresh pair a ground-truth tie
                plot.ACC_TRAIN_TAG: (steps, np.array([0.5, math.inf])),
            },
        )
    write_run(tmp_path / "runs", "sobirl", 1, {plot.RETURN_TAG: returns(3.0)})
    summary = tmp_path / "summary.json"
    plot.main(
        [
            "--runs-dir",
            str(tmp_path / "runs"),
            "--output",
            str(tmp_path / "fig.png"),
            "--json",
            str(summary),
            "--bootstrap-reps",
            "50",
        ]
    )

    def reject(constant):
        raise AssertionError(f"{constant} in {summary}")

    rows = {row["algo"]: row for row in json.loads(summary.read_text(), parse_constant=reject)["groups"]}
    assert rows["drlhf"]["final_accuracy_fresh"] is None and rows["drlhf"]["final_accuracy_train"] is None
    assert rows["drlhf"]["final_return"] == pytest.approx(7.5)
    assert rows["sobirl"]["ci_low"] is None and rows["sobirl"]["final_accuracy_fresh"] is None


# ---------------------------------------------------------------------------------------------------------------
# The sweep passes Ctrl-C on


FAKE_JOB = """import pathlib, signal, sys, time
a = sys.argv[1:]; out = pathlib.Path(a[a.index("--out") + 1]); seed = a[a.index("--seed") + 1]
received = []
def stop(signum, frame):
    received.append(signal.Signals(signum).name)
    (out / f"{seed}.signals").write_text(" ".join(received))
    time.sleep(0.5)  # saving a checkpoint
    (out / f"{seed}.saved").write_text("")
    sys.exit(128 + signum)
signal.signal(signal.SIGINT, stop)
signal.signal(signal.SIGTERM, stop)
(out / f"{seed}.ready").write_text("")
time.sleep(60)
"""


def test_ctrl_c_to_a_local_sweep_is_passed_on_to_its_running_jobs_once(tmp_path):
    job, out = tmp_path / "job.py", tmp_path / "out"
    job.write_text(FAKE_JOB)
    out.mkdir()
    logs = tmp_path / "logs"
    # Its own process group, as a shell gives a foreground command: Ctrl-C signals the whole group.
    process = subprocess.Popen(
        [
            sys.executable,
            "sobirl/sweep.py",
            "--script",
            str(job),
            "--algos",
            "fake",
            "--seeds",
            "1,2,3",
            "--workers",
            "2",
            "--log-dir",
            str(logs),
            "--",
            "--out",
            str(out),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    wait_until(lambda: (out / "1.ready").exists() and (out / "2.ready").exists(), process, timeout=60)
    os.killpg(process.pid, signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, (stdout, stderr)
    for seed in ("1", "2"):
        assert (out / f"{seed}.signals").read_text() == "SIGINT"  # exactly one SIGINT, no SIGTERM or kill
        assert (out / f"{seed}.saved").exists()  # the sweep waited for the job to finish saving
    assert not (out / "3.ready").exists() and not (logs / "fake__seed3.log").exists()  # queued: never started
    assert "0 of 3 jobs succeeded" in stdout and "fake__seed1: stopped (exit 130)" in stdout
    assert "stopped by SIGINT: 2 job(s) saved a checkpoint and exited, 1 not started" in stderr
    assert "not started: fake__seed3" in stderr and "failed" not in stderr


def test_run_local_without_signals_reports_as_before(tmp_path):
    jobs = [sweep.Job("ok", [sys.executable, "-c", "pass"]), sweep.Job("bad", [sys.executable, "-c", "exit(3)"])]
    results = sweep.run_local(jobs, 2, tmp_path, [])
    assert [(job.name, rc) for job, rc, _ in results] == [("ok", 0), ("bad", 3)]
    with pytest.raises(SystemExit) as exit_info:
        sweep.report(results)
    assert exit_info.value.code == 1
