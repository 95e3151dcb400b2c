"""The import layering of the repository, read from the source (every import, function-level ones included):

    sobirl/  (entry points and tools)
    agents/<algorithm>.py  (one file per algorithm; none imports another)
    agents/pipeline/  (the preference outer loop, the loss seam)
    agents/feedback/  (pairs, teachers, labelling, demonstrations)
    agents/lower/  (SAC-discrete)      agents/exact/  (tabular references)
    agents/infra/  (flags, runs, checkpoints)
    wrappers/  (environments)

A module imports only from its own package or from layers below it; the harness imports no figure code; and the
module graph has no cycle. Also: every repository path a docstring or comment names exists.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("agents", "wrappers", "sobirl")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    return {module_name(path): path for package in PACKAGES for path in sorted((REPO / package).rglob("*.py"))}


def imported_modules(source: str, name: str, known: set[str]) -> set[str]:
    """The project modules `source` (the module `name`) imports anywhere in its body, relative imports resolved;
    `from package import module` counts as importing the module."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")[: -node.level] if not name.endswith("__init__") else name.split(".")
                base = ".".join([*anchor, base] if base else anchor)
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            # the longest project module the import names (agents.lower.sac.Args -> agents.lower.sac)
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    known = set(modules)
    return {name: imported_modules(path.read_text(), name, known) for name, path in modules.items()}


def layer(module: str) -> tuple[int, str]:
    """(rank, group): a module may import a lower rank, or its own group at its own rank."""
    parts = module.split(".")
    if parts[0] == "wrappers":
        return 0, "wrappers"
    if parts[0] == "sobirl":
        return 6, "sobirl"
    if len(parts) == 1:
        return 6, "agents"  # the package's own __init__
    ranks = {"infra": 1, "exact": 2, "lower": 2, "feedback": 3, "pipeline": 4}
    if parts[1] in ranks:
        return ranks[parts[1]], parts[1]
    if len(parts) == 2 and (REPO / "agents" / f"{parts[1]}.py").is_file():
        return 5, module  # an algorithm file is a group of its own: algorithms never import each other
    raise AssertionError(f"{module}: a package of agents/ not placed in a layer; add it to tests/test_layering.py")


def layering_violations(graph: dict[str, set[str]]) -> list[str]:
    problems = []
    for module, imports in sorted(graph.items()):
        rank, group = layer(module)
        for target in sorted(imports):
            target_rank, target_group = layer(target)
            if target_rank > rank or (target_rank == rank and target_group != group):
                problems.append(f"{module} imports {target} (layer {target_group} is not below {group})")
        if module.startswith("sobirl.harness"):
            outside = [t for t in sorted(imports) if t.startswith("sobirl.") and not t.startswith("sobirl.harness")]
            problems += [f"{module} imports {t} (the harness imports no figure or tool code)" for t in outside]
    return problems


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle's modules once (Tarjan's strongly connected components of more than one module)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_every_import_goes_down_the_layers():
    assert layering_violations(import_graph()) == []


def test_the_module_graph_has_no_cycle():
    assert cycles(import_graph()) == []


def test_a_planted_upward_import_or_cycle_is_caught():
    graph = import_graph()
    graph["agents.pipeline.learner"] = graph["agents.pipeline.learner"] | {"agents.sac_discrete"}
    assert layering_violations(graph) == [
        "agents.pipeline.learner imports agents.sac_discrete (layer agents.sac_discrete is not below pipeline)"
    ]
    graph["agents.lower.sac"] = graph["agents.lower.sac"] | {"agents.pipeline.learner"}
    assert any("agents.lower.sac" in component for component in cycles(graph))
    assert "agents.parl imports agents.sobirl (layer agents.sobirl is not below agents.parl)" in layering_violations(
        {"agents.parl": {"agents.sobirl"}, "agents.sobirl": set()}
    )


def test_function_level_imports_are_counted():
    source = "def f():\n    from agents.sac_discrete import main\n"
    assert imported_modules(source, "agents.pipeline.learner", set(project_modules())) == {"agents.sac_discrete"}


PATH_PATTERN = re.compile(r"(?<![\w/.-])((?:agents|sobirl|wrappers|tests|docs)/[\w./-]*\w)")


def named_paths(source: str) -> set[str]:
    """Repository paths named in a module's docstrings and comments (a trailing ':123' or '.' is not part of it)."""
    text = [ast.get_docstring(node) or "" for node in ast.walk(ast.parse(source)) if isinstance(node, (
        ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]  # fmt: skip
    text += [line.partition("#")[2] for line in source.splitlines() if "#" in line]
    return {match.rstrip(".") for chunk in text for match in PATH_PATTERN.findall(chunk)}


def test_every_path_a_docstring_or_comment_names_exists():
    missing = []
    for path in [*project_modules().values(), *sorted((REPO / "tests").glob("*.py"))]:
        for named in sorted(named_paths(path.read_text())):
            placeholder = "<" in named or "{" in named or "*" in named
            if not placeholder and not (REPO / named).exists():
                missing.append(f"{path.relative_to(REPO)} names {named}")
    assert missing == []


DOTTED_PATTERN = re.compile(r"(?<![\w/.])((?:agents|sobirl|wrappers)(?:\.\w+)+)")


def dotted_target_exists(dotted: str) -> bool:
    """Whether `agents.pipeline.losses.LOGIT_CLAMP`-style text names something real: the longest prefix that is a
    module, then (if any) its next part defined at the top level of that module."""
    parts = dotted.split(".")
    for end in range(len(parts), 0, -1):
        base = REPO.joinpath(*parts[:end])
        source = base.with_suffix(".py") if base.with_suffix(".py").exists() else base / "__init__.py"
        if source.exists():
            if end == len(parts):
                return True
            tree = ast.parse(source.read_text())
            defined = {node.name for node in tree.body if isinstance(node, (ast.ClassDef, ast.FunctionDef))}
            defined |= {t.id for node in tree.body if isinstance(node, (ast.Assign, ast.AnnAssign))
                        for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
                        if isinstance(t, ast.Name)}  # fmt: skip
            defined |= {alias.asname or alias.name for node in tree.body if isinstance(node, ast.ImportFrom)
                        for alias in node.names}  # fmt: skip
            return parts[end] in defined or (base / f"{parts[end]}.py").exists() or (base / parts[end]).is_dir()
    return False


def named_dotted(source: str) -> set[str]:
    """Dotted project names (agents.lower.replay.Fragments) in a module's docstrings and comments."""
    text = [ast.get_docstring(node) or "" for node in ast.walk(ast.parse(source)) if isinstance(node, (
        ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]  # fmt: skip
    text += [line.partition("#")[2] for line in source.splitlines() if "#" in line]
    return {match for chunk in text for match in DOTTED_PATTERN.findall(chunk)}


def test_every_dotted_name_a_docstring_or_comment_names_exists():
    missing = [
        f"{path.relative_to(REPO)} names {named}"
        for path in [*project_modules().values(), *sorted((REPO / "tests").glob("*.py"))]
        for named in sorted(named_dotted(path.read_text()))
        if not dotted_target_exists(named)
    ]
    assert missing == []


def test_a_stale_path_is_caught():
    assert not dotted_target_exists("agents.pipeline.learner.reward_update")
    assert dotted_target_exists("agents.pipeline.reward_training.reward_update")
    assert dotted_target_exists("agents.feedback.pairs.LOGIT_CLAMP")
    assert named_paths('"""See agents/pipeline/networks.py."""\nx = 1  # and docs/usage.md\n') == {
        "agents/pipeline/networks.py",
        "docs/usage.md",
    }
