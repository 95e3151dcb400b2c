"""Every command the README and docs/ show runs as written: the script exists and its flags parse with the
script's own parser (sweeps run as dry runs, and every job they would launch parses with its algorithm's parser);
`pip install -e ".[extras]"` names extras that exist; `python -c` snippets compile and import what they name."""

from __future__ import annotations

import ast
import importlib
import re
import shlex
from pathlib import Path

import pytest

from agents.infra.cli import build_parser
from sobirl import benchmark
from sobirl.beamrider import ALGORITHMS, DEFAULT_ALGO
from sobirl.harness.declarations import BENCHMARKS
from sobirl.harness.jobs import Layout, parse_seed_list, select_jobs, split_list
from tests.conftest import REPO, run_script

DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


def documented_commands() -> list[tuple[str, str]]:
    """(document, command line) for every line of a bash/sh code block (continuations joined, comments dropped)."""
    commands = []
    for path in DOCUMENTS:
        text = path.read_text()
        for block in re.findall(r"```(?:bash|sh)\n(.*?)```", text, flags=re.S):
            joined = re.sub(r"\\\n\s*", " ", block)
            for line in joined.splitlines():
                for part in split_commands(line):
                    commands.append((str(path.relative_to(REPO)), part))
    return commands


def split_commands(line: str) -> list[str]:
    """The commands of one shell line (`a && b; c`), quotes respected, a trailing comment dropped."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split, lexer.commenters = True, "#"
    commands, current = [], []
    for token in lexer:
        if token in ("&&", ";", "||", "&", "|"):
            commands.append(current)
            current = []
        else:
            current.append(token)
    return [shlex.join(command) for command in [*commands, current] if command]


COMMANDS = documented_commands()
PYTHON = [(doc, c) for doc, c in COMMANDS if c.startswith("python ")]


def test_the_docs_show_commands_of_every_kind():
    scripts = {shlex.split(c)[1] for _, c in PYTHON if not c.startswith("python -")}
    assert {"sobirl/beamrider.py", "sobirl/benchmark.py", "sobirl/sweep.py", "sobirl/plot.py"} <= scripts
    assert any(doc == "README.md" for doc, _ in PYTHON)


def algorithm_args(algo: str):
    module = importlib.import_module(ALGORITHMS[algo])
    return getattr(module, "TrueRewardArgs", module.Args)  # sac's command line has the frozen-reward flag


def script_parser(script: str, argv: list[str]):
    """(parser, arguments) that check `python script argv` without running it; None for sweep.py (dry run)."""
    if script == "sobirl/beamrider.py":
        algo = argv[argv.index("--algo") + 1] if "--algo" in argv else DEFAULT_ALGO
        rest = [a for i, a in enumerate(argv) if a != "--algo" and (i == 0 or argv[i - 1] != "--algo")]
        return build_parser(algorithm_args(algo)), rest
    if script.startswith("agents/"):
        module = importlib.import_module(script[:-3].replace("/", "."))
        return build_parser(getattr(module, "TrueRewardArgs", module.Args)), argv
    name = script.removeprefix("sobirl/").removesuffix(".py")
    module = importlib.import_module(f"sobirl.{name}")
    if name in ("plot", "bench"):
        return build_parser(module.Args if name == "plot" else module.BenchArgs), argv
    if name == "benchmark":
        return None, argv
    return module.build_parser(), argv


@pytest.mark.parametrize("doc,command", PYTHON, ids=[f"{d}: {c[:70]}" for d, c in PYTHON])
def test_documented_python_command_parses(doc, command):
    tokens = shlex.split(command)
    if tokens[1] == "-c":
        tree = ast.parse(tokens[2])
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                module = importlib.import_module(node.module)
                for alias in node.names:
                    assert hasattr(module, alias.name), (doc, command, alias.name)
        return
    script, argv = tokens[1], tokens[2:]
    assert (REPO / script).is_file(), f"{doc}: {script} does not exist"
    if script == "sobirl/sweep.py":
        check_sweep(argv)
        return
    if script == "sobirl/benchmark.py":
        args = benchmark.parse_args(argv)
        select_jobs(BENCHMARKS[args.bench], split_list(args.games), split_list(args.arms), parse_seed_list(args.seeds))
        return
    parser, rest = script_parser(script, argv)
    parse(parser, rest)


def parse(parser, argv: list[str]) -> None:
    """Parse as the script would; only --help may exit (status 0), a bad flag or value fails the test."""
    try:
        parser.parse_args(argv)
    except SystemExit as exit_:
        assert exit_.code == 0 and ("--help" in argv or "-h" in argv), f"exit {exit_.code} for {argv}"


def check_sweep(argv: list[str]) -> None:
    """Run the sweep as a dry run (Slurm commands locally) and parse every job it would launch."""
    if "--backend" in argv:
        argv[argv.index("--backend") + 1] = "local"
    sweep_args, passthrough = argv, []
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
        parser, rest = script_parser("sobirl/beamrider.py", tail)
        parse(parser, rest)


PIP = [(doc, c) for doc, c in COMMANDS if c.startswith("pip install -e")]


@pytest.mark.parametrize("doc,command", PIP)
def test_documented_installs_name_extras_that_exist(doc, command):
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+; the project supports 3.10
    extras = set(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    for spec in re.findall(r'"?\.\[([^\]]+)\]"?', command):
        assert set(spec.split(",")) <= extras, (doc, command)


def test_the_resume_paragraph_names_every_flag_a_resumed_run_may_change():
    """Breaks when a flag joins an algorithm's RESUMABLE set without the docs saying a resumed run may change it."""
    from agents.infra.cli import flag_name

    usage = (REPO / "docs" / "usage.md").read_text()
    paragraph = usage[usage.index("- **Resuming.**") :].split("\n- ")[0]
    resumable = {name for algo in ALGORITHMS for name in algorithm_args(algo).RESUMABLE}
    missing = sorted(flag_name(name) for name in resumable if f"`{flag_name(name)}`" not in paragraph)
    assert not missing, f"docs/usage.md's resume paragraph does not name {missing}"


def test_the_cpu_build_of_torch_comes_before_the_first_install_command():
    """A reader who runs commands as they read must meet the CPU-torch instruction before `pip install -e .` (after
    it, pip has already fetched several GB of CUDA packages)."""
    readme = (REPO / "README.md").read_text()
    first_install = readme.index("pip install -e .")
    assert "download.pytorch.org/whl/cpu" in readme[:first_install]


def test_the_test_extra_brings_what_the_slurm_tests_need():
    """CI installs `.[test]`: without submitit the Slurm requeue tests of tests/test_sweep.py skip there."""
    tomllib = pytest.importorskip("tomllib")
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]

    def requirements(extra: str) -> list[str]:
        out = []
        for requirement in extras[extra]:
            nested = re.fullmatch(r"sobirl\[(\w+)\]", requirement)
            out += requirements(nested.group(1)) if nested else [requirement]
        return out

    assert any(requirement.startswith("submitit") for requirement in requirements("test"))


def test_the_results_docs_say_what_a_reproduction_on_another_cpu_gives():
    text = (REPO / "docs" / "results" / "README.md").read_text()
    paragraph = text[text.index("**What a reproduction gives.**") :].split("\n\n")[0]
    assert "machine that ran it" in paragraph and "another machine" in paragraph
    assert "2.575" in paragraph and "2.466" in paragraph, "the measured example (Breakout DRLHF seed 3)"


def test_the_results_readme_reruns_one_committed_run_apart_and_compares_it_with_its_summary():
    """Breaks if the recipe went, selected more than one run, wrote into the committed results, or compared files
    other than the committed summary and the one its rerun writes."""
    recipe = [shlex.split(c) for doc, c in PYTHON if doc == "docs/results/README.md"]
    reruns = [t for t in recipe if t[1:3] == ["sobirl/benchmark.py", "run"] and "--results-dir" in t]
    assert len(reruns) == 1, "one rerun of a single run, into results of its own"
    args = benchmark.parse_args(reruns[0][2:])
    selection = split_list(args.games), split_list(args.arms), parse_seed_list(args.seeds)
    [job] = select_jobs(BENCHMARKS[args.bench], *selection)
    assert args.results_dir != "docs/results" and args.runs_dir != "runs/bench"
    committed = job.result_path(Layout(Path(args.runs_dir), Path("docs/results")))
    rerun = job.result_path(Layout(Path(args.runs_dir), Path(args.results_dir)))
    assert (REPO / committed).is_file()
    [compare] = [tokens for tokens in recipe if tokens[1] == "-c" and "json.load" in tokens[2]]
    assert compare[3:] == [str(committed), str(rerun)]
