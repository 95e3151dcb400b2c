"""sobirl/sweep.py: grid expansion, tiny local jobs through a fake entry point, dry run, failures, Slurm submission."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from agents.infra.cli import UsageError, run_cli
from sobirl import sweep
from tests.conftest import REPO, cli_error

# Stands in for sobirl/beamrider.py: records its argv (and thread cap) in --out, fails for --seed 13.
FAKE_SCRIPT = """import os, sys, pathlib
a = sys.argv[1:]; arg = lambda name: a[a.index(name) + 1]; omp = os.environ.get("OMP_NUM_THREADS", "")
pathlib.Path(arg("--out"), f"{arg('--algo')}_{arg('--seed')}.txt").write_text(" ".join(a) + "\\nOMP=" + omp)
sys.exit(1 if "13" in a else 0)
"""


@pytest.fixture
def fake(tmp_path: Path) -> tuple[Path, Path]:
    script, out = tmp_path / "fake_entry.py", tmp_path / "out"
    script.write_text(FAKE_SCRIPT)
    out.mkdir()
    return script, out


def test_expand_grid_cartesian_product_seed_major():
    grid = {"learning-rate": ["1e-4", "3e-4"], "cuda": ["true", "false"]}
    tails = sweep.expand_grid(["sobirl", "drlhf"], [1, 2], grid)
    assert len(tails) == 2 * 2 * 2 * 2
    assert tails[0] == ["--algo", "sobirl", "--seed", "1", "--learning-rate", "1e-4", "--cuda"]
    assert tails[1] == ["--algo", "sobirl", "--seed", "1", "--learning-rate", "1e-4", "--no-cuda"]
    # Seeds vary slowest: every algorithm gets seed 1 before any gets seed 2.
    assert [t[1] for t in tails[:8]] == ["sobirl"] * 4 + ["drlhf"] * 4 and {t[3] for t in tails[:8]} == {"1"}
    assert len({tuple(t) for t in tails}) == len(tails)
    assert sweep.expand_grid(["sac"], [7], {}) == [["--algo", "sac", "--seed", "7"]]


def test_parse_grid_and_job_names():
    assert sweep.parse_grid(["learning_rate=1e-4, 3e-4", "--tau=0.005"]) == {
        "learning-rate": ["1e-4", "3e-4"],
        "tau": ["0.005"],
    }
    for bad, message in [("lr", "FLAG=V1"), ("seed=1,2", "--seeds"), ("lr=1,", "empty value")]:
        with pytest.raises(UsageError, match=message):
            sweep.parse_grid([bad])
    with pytest.raises(UsageError, match="twice"):
        sweep.parse_grid(["lr=1", "lr=2"])
    assert (
        sweep.job_name(["--algo", "sobirl", "--seed", "3", "--learning-rate", "1e-4", "--no-cuda"])
        == "sobirl__seed3__learning-rate=1e-4__no-cuda"
    )
    assert (
        sweep.job_name(["--algo", "a", "--seed", "1", "--env-id", "ALE/BeamRider-v5"])
        == "a__seed1__env-id=ALE_BeamRider-v5"
    )


def test_two_local_jobs_run_with_passthrough(fake, tmp_path, monkeypatch, capsys):
    script, out = fake
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    logs = tmp_path / "logs"
    results = sweep.main(
        [
            "--script",
            str(script),
            "--algos",
            "sobirl",
            "--seeds",
            "1,2",
            "--workers",
            "2",
            "--grid",
            "tau=0.5",
            "--log-dir",
            str(logs),
            "--",
            "--out",
            str(out),
            "--total-timesteps",
            "10",
        ]
    )
    assert [rc for _, rc, _ in results] == [0, 0]
    for seed in (1, 2):
        argv, omp = (out / f"sobirl_{seed}.txt").read_text().splitlines()
        assert argv == f"--algo sobirl --seed {seed} --tau 0.5 --out {out} --total-timesteps 10"
        assert omp == f"OMP={max(1, len(os.sched_getaffinity(0)) // 2)}"
        assert (logs / f"sobirl__seed{seed}__tau=0.5.log").read_text().startswith("# OMP_NUM_THREADS=")
    assert "2 of 2 jobs succeeded" in capsys.readouterr().out


def test_dry_run_prints_commands_and_runs_nothing(fake, tmp_path, capsys):
    script, out = fake
    assert (
        sweep.main(
            [
                "--script",
                str(script),
                "--num-seeds",
                "2",
                "--start-seed",
                "5",
                "--dry-run",
                "--log-dir",
                str(tmp_path / "logs"),
                "--",
                "--out",
                str(out),
            ]
        )
        == []
    )
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("# 6 jobs: 3 algos x 2 seeds")
    assert lines[1].endswith(f"{script} --algo sobirl --seed 5 --out {out}") and sys.executable in lines[1]
    assert lines[-1].endswith(f"--algo sac --seed 6 --out {out}")
    assert not any(out.iterdir()) and not (tmp_path / "logs").exists()


def test_failing_job_makes_the_sweep_fail(fake, tmp_path, capsys):
    script, out = fake
    with pytest.raises(SystemExit) as exc:
        sweep.main(
            [
                "--script",
                str(script),
                "--algos",
                "drlhf",
                "--seeds",
                "1,13",
                "--workers",
                "2",
                "--log-dir",
                str(tmp_path / "logs"),
                "--",
                "--out",
                str(out),
            ]
        )
    assert exc.value.code == 1
    assert (out / "drlhf_1.txt").exists() and (out / "drlhf_13.txt").exists()  # the other job still ran
    captured = capsys.readouterr()
    assert "1 of 2 jobs succeeded" in captured.out and "failed: drlhf__seed13 (exit 1)" in captured.err


def test_bad_input_is_a_usage_error(fake, tmp_path, capsys):
    script, out = fake
    with pytest.raises(UsageError, match="does not exist"):
        sweep.main(["--script", str(tmp_path / "missing.py")])
    with pytest.raises(UsageError, match="would override"):
        sweep.main(["--script", str(script), "--", "--seed=4"])
    with pytest.raises(UsageError, match="duplicates"):
        sweep.main(["--script", str(script), "--seeds", "1,1"])
    with pytest.raises(SystemExit) as exc:
        run_cli(sweep.main, ["--script", str(script), "--workers", "0"])
    assert exc.value.code == 2 and capsys.readouterr().err.startswith("error: --workers")


ENTRY_POINT = str(REPO / "sobirl" / "beamrider.py")


@pytest.mark.parametrize(
    "extra,job_flags,words",
    [
        (
            ["--grid", "learning-rate=1e-4"],
            [],
            ["sobirl__seed1__learning-rate=1e-4", "unrecognized", "--learning-rate"],
        ),
        (["--grid", "reward-lr=1e-4,abc"], [], ["reward-lr=abc", "--reward-lr", "invalid float value: 'abc'"]),
        (["--grid", "gamma=1.5"], [], ["gamma=1.5", "--gamma must be in [0, 1)"]),
        ([], ["--no-such-flag", "3"], ["unrecognized arguments: --no-such-flag 3"]),
        (["--algos", "sobirl,sac", "--grid", "reward-lr=1e-4"], [], ["job sac__seed1__reward-lr=1e-4", "--algo sac"]),
        (["--log-dir", ""], [], ["--log-dir must name a folder"]),
    ],
)
@pytest.mark.parametrize("dry_run", [True, False])
def test_a_job_that_would_fail_on_its_flags_is_refused_before_any_runs(
    extra, job_flags, words, dry_run, tmp_path, capsys, monkeypatch
):
    """The real entry point's parser and checks, run on every job first. Caught before: a --grid over a flag that
    does not exist was listed by --dry-run, and a real sweep then failed every job."""
    monkeypatch.chdir(tmp_path)  # where an empty --log-dir would write, were it accepted
    argv = ["--script", ENTRY_POINT, "--algos", "sobirl", "--seeds", "1", "--log-dir", str(tmp_path / "logs")]
    # Tiny jobs, in case a regression lets them start: they end in seconds, and the test fails on their files.
    tiny = ["--env-id", "MinAtar/Breakout-v1", "--total-timesteps", "30", "--learning-starts", "10"]
    tiny += ["--buffer-size", "200", "--initial-pairs", "2", "--no-progress", "--runs-dir", str(tmp_path / "runs")]
    argv += [*(["--dry-run"] if dry_run else []), *extra, "--", *tiny, *job_flags]
    line = cli_error(sweep.main, argv, capsys)
    assert all(word in line for word in words), line
    assert not any(tmp_path.iterdir())


def test_a_grid_the_entry_point_accepts_is_listed(tmp_path, capsys):
    argv = ["--script", ENTRY_POINT, "--algos", "sobirl,drlhf", "--seeds", "1,2", "--dry-run"]
    sweep.main([*argv, "--grid", "reward-lr=1e-4,3e-4", "--", "--env-id", "MinAtar/Breakout-v1"])
    jobs = [line for line in capsys.readouterr().out.splitlines() if not line.startswith("#")]
    assert len(jobs) == 8 and all("--reward-lr" in job for job in jobs)
    assert not any(tmp_path.iterdir())


def test_slurm_without_submitit_says_how_to_install(fake, monkeypatch):
    script, _ = fake
    monkeypatch.setitem(sys.modules, "submitit", None)  # makes `import submitit` raise ImportError
    with pytest.raises(UsageError, match=r'pip install -e "\.\[sweep\]"'):
        sweep.main(["--script", str(script), "--backend", "slurm", "--seeds", "1"])


def test_slurm_array_through_fake_sbatch(fake, tmp_path, monkeypatch, capsys):
    """submitit writes a real sbatch array file; a fake sbatch captures it, then one task's payload is run."""
    pytest.importorskip("submitit")
    from submitit.core.utils import DelayedSubmission

    script, out = fake
    bin_dir, copy = tmp_path / "bin", tmp_path / "submission.sh"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\ncp "$1" {copy}\necho "Submitted batch job 4242"\n')
    for tool in ("srun", "sbatch"):
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    logs = tmp_path / "logs"
    sweep.main(
        [
            "--script",
            str(script),
            "--backend",
            "slurm",
            "--algos",
            "sobirl,drlhf",
            "--seeds",
            "1",
            "--workers",
            "1",
            "--slurm-partition",
            "gpu",
            "--slurm-gpus-per-task",
            "1",
            "--slurm-time-min",
            "90",
            "--log-dir",
            str(logs),
            "--",
            "--out",
            str(out),
        ]
    )
    text = copy.read_text()
    for line in ("--array=0-1%1", "--partition=gpu", "--gpus-per-task=1", "--time=90", "--cpus-per-task=8"):
        assert f"#SBATCH {line}" in text
    assert "4242_1: drlhf__seed1" in capsys.readouterr().out
    # What the cluster would execute for task 1: unpickle and call it here.
    task = DelayedSubmission.load(logs / "slurm" / "4242_1" / "4242_1_submitted.pkl")
    assert task.result() == 0
    assert (out / "drlhf_1.txt").read_text().startswith("--algo drlhf --seed 1 --out")


FAKE_RUN = """import json, pathlib, signal, sys, time
a = sys.argv[1:]
if "--resume" in a:
    folder = pathlib.Path(a[a.index("--resume") + 1])
    state = json.loads((folder / "checkpoint.pt").read_text())
    (folder / "resumed").write_text(str(state["step"]))
    sys.exit(0)
folder = pathlib.Path(a[a.index("--runs-dir") + 1]) / a[a.index("--run-name") + 1]
folder.mkdir(parents=True)
step = 0
def stop(signum, frame):
    (folder / "checkpoint.pt").write_text(json.dumps({"step": step, "signal": signal.Signals(signum).name}))
    sys.exit(143)
signal.signal(signal.SIGTERM, stop)
(folder / "ready").write_text("")
while True:
    step += 1
    time.sleep(0.01)
"""


def test_a_slurm_task_saves_and_requeues_itself_with_resume_on_submitits_signal(tmp_path, monkeypatch):
    """The signal submitit gets before a time limit or on preemption, sent through submitit's own handler (its local
    executor runs the same JobEnvironment code as on Slurm): the run is stopped with SIGTERM, saves, and the
    requeued task resumes its folder. Breaks if the task restarted the run from scratch, or the run died of USR2."""
    pytest.importorskip("submitit")
    import json
    import time

    script = tmp_path / "run.py"
    script.write_text(FAKE_RUN)
    monkeypatch.chdir(tmp_path)
    # A one-minute limit with the signal 50 s ahead: submitit's controller signals the task 10 s after its start.
    args = sweep.Args(script=str(script), backend="slurm", log_dir=str(tmp_path / "logs"), slurm_time_min=1,
                      slurm_signal_delay_s=50)  # fmt: skip
    jobs = sweep.build_jobs(str(script), ["drlhf"], [1], {}, ["--runs-dir", str(tmp_path / "runs")])
    [task] = sweep.submit_slurm(jobs, args, cluster="local")
    folder = tmp_path / "runs" / jobs[0].name
    deadline = time.time() + 60
    while not (folder / "ready").exists() and time.time() < deadline:
        time.sleep(0.1)
    assert (folder / "ready").exists(), task.stderr()
    assert task.result() == 0, task.stderr()
    saved = json.loads((folder / "checkpoint.pt").read_text())
    assert saved["signal"] == "SIGTERM" and saved["step"] > 0
    assert (folder / "resumed").read_text() == str(saved["step"]), "the requeued task resumed the saved run"


def test_slurm_jobs_get_a_fixed_run_folder_under_their_runs_dir():
    cmd, folder = sweep.run_folder(["python", "x.py", "--algo", "sac", "--runs-dir", "out"], "sac__seed1")
    assert cmd[-2:] == ["--run-name", "sac__seed1"] and folder == "out/sac__seed1"
    assert sweep.run_folder(["python", "x.py"], "a")[1] == "runs/a"
    with pytest.raises(UsageError, match="--run-name"):
        sweep.run_folder(["python", "x.py", "--run-name", "mine"], "a")
