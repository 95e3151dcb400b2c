"""sobirl/same_code.py: which commits compute the same, the tiny budget, and the bitwise comparison of runs."""

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from sobirl.harness.declarations import BENCHMARKS
from sobirl.harness.jobs import REPO, Layout, select_jobs
from sobirl.same_code import code_state, differing_tags, tiny_flags
from tests.conftest import run_script


def test_commits_that_change_only_docs_share_a_code_state_and_a_code_change_makes_a_new_one(tmp_path):
    def git(*args: str) -> str:
        command = ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args]
        return subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, check=True).stdout.strip()

    def commit(path: str, text: str) -> str:
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(text)
        git("add", "-A")
        git("commit", "-qm", path)
        return git("rev-parse", "HEAD")

    git("init", "-q")
    for path in ("wrappers/env.py", "sobirl/beamrider.py"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("x = 1\n")
    first = commit("agents/loss.py", "def loss(): return 1\n")
    docs = commit("docs/notes.md", "a result\n")
    harness = commit("sobirl/harness/declarations.py", "# declarations\n")
    code = commit("agents/loss.py", "def loss(): return 2\n")
    entry = commit("sobirl/beamrider.py", "x = 2\n")
    states = [code_state(c, repo=tmp_path) for c in (first, docs, harness, code, entry)]
    assert states[0] == states[1] == states[2]
    assert len(set(states[2:])) == 3
    assert code_state("0" * 40, repo=tmp_path) is None


def test_the_tiny_budget_shrinks_every_budget_flag_but_keeps_random_plays_never():
    bench = BENCHMARKS["main"]
    jobs = {job.arm.name: job for job in select_jobs(bench, games=["Breakout"], seeds={1})}
    layout = Layout(Path("runs"), Path("results"))

    def values(flags, name):
        return [flags[k + 1] for k, flag in enumerate(flags[:-1]) if flag == name]

    sobirl = tiny_flags(jobs["sobirl"].flags(layout), bench.steps)
    assert values(sobirl, "--total-timesteps") == ["3000"] and values(sobirl, "--total-pairs") == ["60"]
    assert values(sobirl, "--hyper-start") == ["1000"] and values(sobirl, "--learning-starts") == ["500"]
    assert "--implicit-correction" not in sobirl and values(sobirl, "--env-id") == ["MinAtar/Breakout-v1"]
    random = tiny_flags(jobs["random"].flags(layout), bench.steps)
    assert values(random, "--learning-starts") == ["500", "100000000"], "random play must stay random"


def test_runs_differ_in_exactly_the_tags_whose_values_moved_timings_aside():
    steps = np.arange(3)
    run = {"losses/qf_loss": (steps, np.array([1.0, 0.5, 0.25])), "charts/SPS": (steps, np.ones(3))}
    assert differing_tags(run, dict(run)) == []
    same_but_slower = {**run, "charts/SPS": (steps, np.full(3, 2.0))}
    assert differing_tags(run, same_but_slower) == []
    last_bit = {**run, "losses/qf_loss": (steps, np.array([1.0, 0.5, np.nextafter(0.25, 1.0)]))}
    assert differing_tags(run, last_bit) == ["losses/qf_loss"]
    assert differing_tags(run, {**run, "reward/bce": (steps, np.zeros(3))}) == ["reward/bce"]
    assert differing_tags(run, {**run, "losses/qf_loss": (steps + 1, run["losses/qf_loss"][1])}) == ["losses/qf_loss"]


@pytest.mark.parametrize("words", [["--arms", "nosuch"], ["nosuch"]])
def test_bad_input_is_one_line(words, tmp_path):
    result = run_script("sobirl/same_code.py", *(["main"] if words[0] == "--arms" else []), *words,
                        "--results-dir", str(tmp_path))  # fmt: skip
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr


def test_a_run_from_a_commit_this_clone_lacks_is_reported_unchecked(tmp_path):
    summary = tmp_path / "main" / "Breakout" / "sac" / "seed1.json"
    summary.parent.mkdir(parents=True)
    fake = json.loads((REPO / "docs/results/main/Breakout/sac/seed1.json").read_text())
    fake["commits"] = ["f" * 40]
    summary.write_text(json.dumps(fake))
    result = run_script("sobirl/same_code.py", "main", "--results-dir", str(tmp_path),
                        "--work-dir", str(tmp_path / "work"))  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert "commit ffffffffff, not in this clone" in result.stdout and "cannot be checked" in result.stdout


def test_the_verdict_says_how_far_a_moved_tag_moved():
    from sobirl.same_code import verdict

    steps = np.arange(2)
    run = {"reward/extra_grad_ratio": (steps, np.array([0.0, 4.0]))}
    assert verdict(run, dict(run)) == "identical"
    text = verdict(run, {"reward/extra_grad_ratio": (steps, np.array([0.0, 4.0 * (1 + 1e-7)]))})
    assert "reward/extra_grad_ratio (1.0e-07)" in text
    assert "(inf)" in verdict(run, {"reward/extra_grad_ratio": (steps + 1, np.array([0.0, 4.0]))})


def test_a_start_flag_the_tiny_runs_would_leave_off_is_refused(monkeypatch):
    """A term switched on at --*-start must switch on inside the tiny runs, or the check compares runs without it."""
    from sobirl import same_code
    from sobirl.same_code import unchecked_start_flags

    assert unchecked_start_flags("sobirl", ["--hyper-start", "20000"], 100_000) == []
    assert unchecked_start_flags("drlhf", [], 100_000) == []
    # left at its default (100k), the implicit term would never run in 3k steps
    assert unchecked_start_flags("sobirl", [], 200_000) == [
        "--hyper-start (default 100000, past the tiny runs' 3000 steps)"
    ]
    # a start flag TINY does not shrink
    monkeypatch.setattr(same_code, "TINY", {k: v for k, v in same_code.TINY.items() if k != "--parl-start"})
    assert unchecked_start_flags("parl", ["--parl-start", "20000"], 100_000) == [
        "--parl-start 20000 (not in same_code.TINY)"
    ]
    # past the benchmark's own steps means "never" in the benchmark too: nothing to check
    assert unchecked_start_flags("parl", ["--parl-start", "200000"], 100_000) == []
