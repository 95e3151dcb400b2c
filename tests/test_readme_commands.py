"""Every sweep command line the README documents runs as a dry run, and every job it would launch passes the
entry point's flag parser (a grid over a flag that does not exist would fail every job of a real sweep)."""

from __future__ import annotations

import importlib
import re
import shlex

import pytest

from agents.infra.cli import build_parser
from sobirl.beamrider import ALGORITHMS
from tests.conftest import REPO, run_script


def documented_commands(prefix: str) -> list[str]:
    """Command lines in the README's code blocks that start with `prefix` (backslash continuations joined)."""
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", text, flags=re.S)
    commands = []
    for block in blocks:
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split(" #")[0].strip()
            if line.startswith(prefix):
                commands.append(line)
    return commands


SWEEPS = documented_commands("python sobirl/sweep.py")


def test_the_readme_documents_sweeps():
    assert len(SWEEPS) >= 3


@pytest.mark.parametrize("command", SWEEPS)
def test_documented_sweep_runs_as_a_dry_run_with_real_flags(command):
    argv = shlex.split(command)[2:]
    if "--backend" in argv:  # Slurm commands: check the jobs they would submit, locally
        index = argv.index("--backend")
        argv[index + 1] = "local"
    sweep_args, _, passthrough = (argv, None, [])
    if "--" in argv:
        cut = argv.index("--")
        sweep_args, passthrough = argv[:cut], argv[cut:]
    sweep_args = [a for a in sweep_args if a not in ("--slurm-wait",)]
    sweep_args = [
        a
        for i, a in enumerate(sweep_args)
        if not (a.startswith("--slurm-") or (i > 0 and sweep_args[i - 1].startswith("--slurm-")))
    ]
    result = run_script("sobirl/sweep.py", *sweep_args, "--dry-run", *passthrough)
    assert result.returncode == 0, result.stderr
    jobs = [line for line in result.stdout.splitlines() if line and not line.startswith("#")]
    assert jobs
    for job in jobs:
        tokens = shlex.split(job)
        tail = tokens[tokens.index("sobirl/beamrider.py") + 1 :]
        algo = tail[tail.index("--algo") + 1]
        flags = [t for i, t in enumerate(tail) if t != "--algo" and (i == 0 or tail[i - 1] != "--algo")]
        args_cls = importlib.import_module(ALGORITHMS[algo]).Args
        build_parser(args_cls).parse_args(flags)  # exits (fails the test) on a flag the algorithm does not have
